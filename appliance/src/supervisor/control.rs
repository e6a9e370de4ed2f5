//! The supervisor's local control socket (`DATA_DIR/run/control.sock`) and its client.
//!
//! Only the owner of the data directory can reach it: the socket lives in a 0700 directory and
//! is itself 0600. The protocol is one JSON request line and one JSON answer line per
//! connection, bounded in size and time. `talkbox status` is its client.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use super::status::SupervisorStatus;

/// Largest request line accepted.
const MAX_REQUEST: u64 = 4096;
/// Largest answer the client accepts.
const MAX_ANSWER: u64 = 4 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "request", rename_all = "kebab-case")]
pub enum ControlRequest {
    Status,
    /// Re-read the config file and restart the services it changes.
    Reload,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ControlAnswer {
    Status(SupervisorStatus),
    Error(String),
}

/// A request waiting for the supervisor loop to answer it.
pub type Pending = (ControlRequest, oneshot::Sender<ControlAnswer>);

/// Binds the control socket, owner-only, replacing a stale one left by a killed supervisor.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another supervisor is running on this data directory ({} answers)",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(listener)
}

/// Accepts connections and forwards their requests to the supervisor loop.
pub async fn serve(listener: UnixListener, to_loop: mpsc::Sender<Pending>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let to_loop = to_loop.clone();
        tokio::spawn(async move {
            if let Err(e) =
                tokio::time::timeout(Duration::from_secs(5), answer(stream, to_loop)).await
            {
                tracing::debug!(error = %e, "control connection timed out");
            }
        });
    }
}

async fn answer(stream: UnixStream, to_loop: mpsc::Sender<Pending>) {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(r.take(MAX_REQUEST));
    if reader.read_line(&mut line).await.is_err() {
        return;
    }
    let answer = match serde_json::from_str::<ControlRequest>(line.trim()) {
        Err(e) => ControlAnswer::Error(format!(
            "bad request: {e}; expected {{\"request\":\"status\"}}"
        )),
        Ok(req) => {
            let (tx, rx) = oneshot::channel();
            if to_loop.send((req, tx)).await.is_err() {
                return;
            }
            match rx.await {
                Ok(a) => a,
                Err(_) => return,
            }
        }
    };
    if let Ok(mut bytes) = serde_json::to_vec(&answer) {
        bytes.push(b'\n');
        let _ = w.write_all(&bytes).await;
    }
}

/// Asks a running supervisor for its status.
pub async fn request_status(path: &Path) -> Result<SupervisorStatus> {
    request(path, &ControlRequest::Status).await
}

/// Asks a running supervisor to re-read its config; answers with the new status.
pub async fn request_reload(path: &Path) -> Result<SupervisorStatus> {
    request(path, &ControlRequest::Reload).await
}

async fn request(path: &Path, req: &ControlRequest) -> Result<SupervisorStatus> {
    let stream = UnixStream::connect(path).await.map_err(|e| {
        anyhow!(
            "no supervisor answers on {} ({e}); is `talkbox run` running with this --data-dir, and are you its user?",
            path.display()
        )
    })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(r.take(MAX_ANSWER)).read_line(&mut line),
    )
    .await
    .map_err(|_| anyhow!("the supervisor did not answer within 5 s"))??;
    match serde_json::from_str::<ControlAnswer>(&line)
        .context("decoding the supervisor's answer")?
    {
        ControlAnswer::Status(s) => Ok(s),
        ControlAnswer::Error(e) => bail!("supervisor: {e}"),
    }
}
