//! Shared helpers for tests that run the real `talkbox` binary: free ports, a supervisor in a
//! temporary data directory, status polling, and process inspection through /proc.
#![allow(dead_code)]

pub mod browser;
pub mod fake_nextcloud;
pub mod netns;
pub mod setup_page;
pub mod stun_msgs;
pub mod turn;

#[allow(unused_imports)]
pub use turn::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use appliance::supervisor::status::{ServiceState, SupervisorStatus};

pub fn talkbox() -> &'static str {
    env!("CARGO_BIN_EXE_talkbox")
}

/// A TCP and UDP port that is free right now on 127.0.0.1 and was not handed out before
/// in this test process: the kernel may give the same ephemeral port to two binds in a
/// row once the first socket is closed, and one config asking for two such ports is
/// (rightly) refused as a collision.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let t = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let port = t.local_addr().expect("addr").port();
        let mut given = GIVEN.lock().expect("port list");
        if given.contains(&port) {
            continue;
        }
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
}

/// A config that moves every port of the box to free ports, so tests run in parallel.
/// `extra` adds `key = value` lines to the named sections.
pub fn isolated_config(extra: &[(&str, &str)]) -> String {
    let media = free_port();
    let relay = free_port();
    let mut sections: Vec<(String, String)> = vec![
        ("supervisor".into(), "restart_initial_ms = 200\n".into()),
        (
            "signaling".into(),
            format!("listen = \"127.0.0.1:{}\"\n", free_port()),
        ),
        (
            "web".into(),
            format!("listen = \"127.0.0.1:{}\"\n", free_port()),
        ),
        (
            "provision".into(),
            format!("listen = \"127.0.0.1:{}\"\n", free_port()),
        ),
        (
            "turn".into(),
            format!(
                "port = {}\ntls_port = {}\nrelay_port_min = {relay}\nrelay_port_max = {relay}\n",
                free_port(),
                free_port()
            ),
        ),
        (
            "sfu".into(),
            format!(
                "workers = 1\nmedia_port_min = {media}\nmedia_port_max = {media}\nlisten = \"127.0.0.1:{}\"\npublic_ips = [\"127.0.0.1\"]\n",
                free_port()
            ),
        ),
    ];
    for (section, line) in extra {
        match sections.iter_mut().find(|(s, _)| s == section) {
            Some((_, body)) => {
                // A key given again replaces the default line for it.
                let key = line.split('=').next().unwrap_or("").trim();
                *body = body
                    .lines()
                    .filter(|l| l.split('=').next().unwrap_or("").trim() != key)
                    .map(|l| format!("{l}\n"))
                    .collect();
                body.push_str(line);
                body.push('\n');
            }
            None => sections.push((section.to_string(), format!("{line}\n"))),
        }
    }
    sections
        .iter()
        .map(|(s, body)| format!("[{s}]\n{body}\n"))
        .collect()
}

/// A supervisor started by a test; killed with SIGKILL when dropped if still running.
pub struct Supervisor {
    pub dir: tempfile::TempDir,
    pub child: Child,
    pub stderr_log: PathBuf,
}

impl Supervisor {
    /// Starts `talkbox run` in a fresh data directory, with `config` as DATA_DIR/talkbox.toml
    /// (none when `None`).
    pub fn start(config: Option<&str>) -> Supervisor {
        let dir = tempfile::tempdir().expect("tempdir");
        if let Some(c) = config {
            std::fs::write(dir.path().join("talkbox.toml"), c).expect("write config");
        }
        Self::start_in(dir)
    }

    pub fn start_in(dir: tempfile::TempDir) -> Supervisor {
        let stderr_log = dir.path().join("supervisor.log");
        let log = std::fs::File::create(&stderr_log).expect("log file");
        let child = Command::new(talkbox())
            .args(["run", "--data-dir"])
            .arg(dir.path())
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start talkbox run");
        Supervisor {
            dir,
            child,
            stderr_log,
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// `talkbox status --json` against this supervisor.
    pub fn status(&self) -> Option<SupervisorStatus> {
        let out = Command::new(talkbox())
            .args(["status", "--json", "--data-dir"])
            .arg(self.data_dir())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Polls the status until `pred` holds, or panics after `timeout` with the last status
    /// and the supervisor's log.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&SupervisorStatus) -> bool,
    ) -> SupervisorStatus {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < timeout {
            if let Some(s) = self.status() {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "timed out after {timeout:?} waiting for {what}\nlast status: {last:#?}\nlog:\n{}",
            self.log()
        );
    }

    pub fn wait_ready(&self) -> SupervisorStatus {
        self.wait_for("every service running", Duration::from_secs(20), |s| {
            s.ready && s.services.iter().all(|x| x.state == ServiceState::Running)
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig)
            .expect("signal supervisor");
    }

    /// Waits for the supervisor to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// True while a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            // The state follows the command name in parentheses, which may contain spaces.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
    }
}

/// Waits until none of `pids` is alive.
pub fn wait_gone(pids: &[u32], timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if pids.iter().all(|p| !alive(*p)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Runs `talkbox ARGS` and returns its output.
pub fn run_talkbox(args: &[&str]) -> Output {
    Command::new(talkbox())
        .args(args)
        .output()
        .expect("run talkbox")
}

/// Fetches an HTTPS URL with curl, trusting only the box's own certificate (so the
/// certificate must be valid for the address used).
pub fn https_get(url: &str, ca: &Path) -> (u32, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", "--cacert"])
        .arg(ca)
        .arg(url)
        .output()
        .expect("curl is needed for HTTPS tests (apt-get install curl)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        format!("{body}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

/// A small deterministic random generator for tests (seed printed by the caller).
pub struct Lcg(pub u64);
impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
