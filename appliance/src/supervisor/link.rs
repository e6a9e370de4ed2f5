//! The link between the supervisor and each of its services.
//!
//! The supervisor hands every child one end of a Unix datagram socket pair as file descriptor 3
//! (`TALKBOX_SUPERVISOR_FD=3`). Over it the child speaks the sd_notify vocabulary (`READY=1`,
//! `STATUS=...`, `WATCHDOG=1`, `STOPPING=1`), so a service behaves the same under the supervisor
//! and directly under systemd, where [`ServiceLink`] falls back to `NOTIFY_SOCKET`. A child may
//! also send `QUERY=status` and gets the supervisor's [`SupervisorStatus`] as JSON in reply; the
//! status page uses this, so it needs no access to the owner-only control socket. The `web`
//! service alone may also send `REQUEST=<json>` (one [`crate::web::requests::SetupRequest`]) and
//! gets one JSON answer: the setup page's narrow way to change the box (see `web::store`).
//!
//! A socket pair (rather than a path) means no other process can pretend to be a service.

use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use tokio::net::UnixDatagram;
use tokio::sync::Mutex;

use super::status::SupervisorStatus;

/// Environment variable naming the inherited link descriptor.
pub const LINK_FD_ENV: &str = "TALKBOX_SUPERVISOR_FD";
/// The descriptor number the link is placed at in the child.
pub const LINK_FD: i32 = 3;
/// Largest datagram either side sends or accepts.
pub const MAX_DATAGRAM: usize = 256 * 1024;

/// A child's end of the link (or systemd's notify socket when run without the supervisor).
pub struct ServiceLink {
    socket: Option<UnixDatagram>,
    /// One query at a time: replies carry no id, so requests must not interleave.
    query: Mutex<()>,
}

/// One message from a child, parsed from sd_notify `KEY=VALUE` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildMessage {
    Ready,
    Watchdog,
    Stopping,
    Status(String),
    QueryStatus,
    /// A setup-page request (JSON); the supervisor honours it from the web service only.
    Request(String),
}

/// Parses one datagram; unknown assignments are ignored as sd_notify does.
pub fn parse_child_datagram(data: &[u8]) -> Vec<ChildMessage> {
    let text = String::from_utf8_lossy(data);
    text.lines()
        .filter_map(|line| match line.split_once('=') {
            Some(("READY", "1")) => Some(ChildMessage::Ready),
            Some(("WATCHDOG", "1")) => Some(ChildMessage::Watchdog),
            Some(("STOPPING", "1")) => Some(ChildMessage::Stopping),
            Some(("STATUS", s)) => Some(ChildMessage::Status(s.chars().take(200).collect())),
            Some(("QUERY", "status")) => Some(ChildMessage::QueryStatus),
            Some(("REQUEST", json)) => Some(ChildMessage::Request(json.to_string())),
            _ => None,
        })
        .collect()
}

impl ServiceLink {
    /// Takes the link descriptor from the environment. Call once, early in the child's main,
    /// before any thread exists; [`ServiceLink::activate`] then registers it with the runtime.
    pub fn take_from_env() -> Result<Option<std::os::unix::net::UnixDatagram>> {
        let Ok(v) = std::env::var(LINK_FD_ENV) else {
            return Ok(None);
        };
        let fd: i32 = v
            .parse()
            .map_err(|_| anyhow!("{LINK_FD_ENV}={v} is not a descriptor number"))?;
        // The variable must not leak into processes this service might start.
        // SAFETY: called before any other thread exists, so nothing reads the environment
        // concurrently.
        unsafe { std::env::remove_var(LINK_FD_ENV) };
        // SAFETY: the supervisor placed a datagram socket at this descriptor for us alone;
        // nothing else in this process owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let sock = std::os::unix::net::UnixDatagram::from(owned);
        sock.set_nonblocking(true).context("link socket")?;
        Ok(Some(sock))
    }

    /// Registers the link with the running async runtime.
    pub fn activate(socket: Option<std::os::unix::net::UnixDatagram>) -> Result<ServiceLink> {
        Ok(ServiceLink {
            socket: socket
                .map(UnixDatagram::from_std)
                .transpose()
                .context("registering the supervisor link")?,
            query: Mutex::new(()),
        })
    }

    /// True when running under the talkbox supervisor.
    pub fn supervised(&self) -> bool {
        self.socket.is_some()
    }

    async fn send(&self, msg: &str) {
        match &self.socket {
            Some(s) => {
                if let Err(e) = s.send(msg.as_bytes()).await {
                    tracing::debug!(error = %e, "supervisor link send failed");
                }
            }
            None => {
                let state = match msg.split_once('=') {
                    Some(("READY", _)) => sd_notify::NotifyState::Ready,
                    Some(("WATCHDOG", _)) => sd_notify::NotifyState::Watchdog,
                    Some(("STOPPING", _)) => sd_notify::NotifyState::Stopping,
                    Some(("STATUS", s)) => sd_notify::NotifyState::Status(s),
                    _ => return,
                };
                let _ = sd_notify::notify(false, &[state]);
            }
        }
    }

    pub async fn ready(&self) {
        self.send("READY=1").await;
    }
    pub async fn status(&self, text: &str) {
        self.send(&format!("STATUS={}", text.replace('\n', " ")))
            .await;
    }
    pub async fn stopping(&self) {
        self.send("STOPPING=1").await;
    }

    /// Sends a watchdog ping every `every` until the process ends.
    pub fn spawn_watchdog(self: &std::sync::Arc<Self>, every: Duration) {
        let link = self.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                t.tick().await;
                link.send("WATCHDOG=1").await;
            }
        });
    }

    /// Sends one message and waits for the supervisor's one datagram in reply.
    async fn ask(&self, msg: &[u8], timeout: Duration) -> Result<Vec<u8>> {
        let s = self
            .socket
            .as_ref()
            .ok_or_else(|| anyhow!("not running under the talkbox supervisor"))?;
        let _one_at_a_time = self.query.lock().await;
        let mut buf = vec![0u8; MAX_DATAGRAM];
        // A reply that arrived after an earlier caller gave up must not answer this question.
        while s.try_recv(&mut buf).is_ok() {}
        s.send(msg).await.context("asking the supervisor")?;
        let n = tokio::time::timeout(timeout, s.recv(&mut buf))
            .await
            .map_err(|_| anyhow!("the supervisor did not answer within {timeout:?}"))?
            .context("reading the supervisor's answer")?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Asks the supervisor for its status.
    pub async fn query_status(&self) -> Result<SupervisorStatus> {
        let answer = self.ask(b"QUERY=status", Duration::from_secs(2)).await?;
        serde_json::from_slice(&answer).context("decoding the supervisor's status")
    }

    /// Sends one setup-page request (a single line of JSON) and returns the JSON answer.
    pub async fn request(&self, json: &str) -> Result<Vec<u8>> {
        if json.contains('\n') {
            anyhow::bail!("a setup request must be one line of JSON");
        }
        self.ask(
            format!("REQUEST={json}").as_bytes(),
            Duration::from_secs(10),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_lines_are_parsed_and_unknown_ones_ignored() {
        let m = parse_child_datagram(
            b"READY=1\nSTATUS=serving 3 rooms\nMAINPID=5\nWATCHDOG=1\nQUERY=status\nREQUEST={\"op\":\"state\"}",
        );
        assert_eq!(
            m,
            vec![
                ChildMessage::Ready,
                ChildMessage::Status("serving 3 rooms".into()),
                ChildMessage::Watchdog,
                ChildMessage::QueryStatus,
                ChildMessage::Request("{\"op\":\"state\"}".into())
            ]
        );
        assert!(parse_child_datagram(b"\xff\xfe garbage").is_empty());
    }
}
