//! What the supervisor knows about its services, as shown by `talkbox status`, the status page
//! and (later) the setup page. Plain data with serde, shared by both ends of every channel.

use serde::{Deserialize, Serialize};

/// Lifecycle state of one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceState {
    /// Not started yet (waiting for the services before it).
    Waiting,
    /// Started, not ready yet.
    Starting,
    /// Ready and serving.
    Running,
    /// Died; will be restarted after a delay.
    Backoff,
    /// Died `crash_loop_restarts` times in a row soon after starting; still retried at the
    /// longest delay, and reported so that an admin looks at it.
    CrashLoop,
    /// Being stopped.
    Stopping,
    /// Stopped and not restarted (supervisor shutting down).
    Stopped,
}

impl ServiceState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Waiting => "waiting",
            ServiceState::Starting => "starting",
            ServiceState::Running => "running",
            ServiceState::Backoff => "backoff",
            ServiceState::CrashLoop => "crash-loop",
            ServiceState::Stopping => "stopping",
            ServiceState::Stopped => "stopped",
        }
    }
}

/// One service as the supervisor sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub state: ServiceState,
    pub pid: Option<u32>,
    /// Seconds since the current process started.
    pub uptime_s: Option<f64>,
    pub restarts: u32,
    /// Failures in a row without a healthy run in between.
    pub consecutive_failures: u32,
    /// Milliseconds until the next restart, while in backoff or crash loop.
    pub next_restart_in_ms: Option<u64>,
    /// Why the last process ended ("exited with code 1", "killed by SIGKILL", ...).
    pub last_exit: Option<String>,
    /// The last STATUS= line the service sent.
    pub message: Option<String>,
}

/// The whole supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SupervisorStatus {
    pub version: String,
    pub pid: u32,
    pub uptime_s: f64,
    pub data_dir: String,
    /// True once every enabled service has been ready at least once.
    pub ready: bool,
    pub services: Vec<ServiceStatus>,
    /// The one-time setup code while the box is unclaimed. Only the owner-only control socket
    /// (`talkbox status`, a local root) carries it; the copy sent to the web service has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_code: Option<String>,
}
