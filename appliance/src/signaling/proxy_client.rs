//! The SFU client: the signaling side of the spreed signaling **proxy** protocol (reference
//! §3.2), as upstream's `sfu/proxy/proxy.go` speaks it to a proxy's `/proxy` WebSocket.
//!
//! - One connection to `signaling.sfu_url` (`ws://` on loopback, or `wss://` checked against
//!   the box certificate), reconnected with backoff (1 s doubling to 30 s). It opens with
//!   `hello` carrying an RS256 JWT (`iss` = [`PROXY_TOKEN_ID`], `iat`, `exp`) signed with the
//!   box's proxy token key. The `mcu`, `simulcast` and `update-sdp` features are advertised
//!   only while the hello has succeeded.
//! - Commands (`create-publisher`, `create-subscriber`, `delete-publisher`,
//!   `delete-subscriber`) and payloads (`offer`, `answer`, `candidate`, `endOfCandidates`,
//!   `requestoffer`, `sendoffer`, `selectStream`) are requests answered by id; payloads the SFU
//!   sends on its own (trickled `candidate`s, updated `offer`s) and events (`publisher-closed`,
//!   `subscriber-closed`, `update-load`, and talkbox's `speaking`/`stopped-speaking`) are routed
//!   by `clientId` to the session they belong to (speaking: to the others in its room).
//! - [`SfuClients`] is the sans-I/O table of which SFU client id belongs to which session's
//!   publisher or subscriber; [`Server`] turns Talk clients' SFU messages into these requests
//!   (`server.rs`, `sfu_message`).
//!
//! - Resume: the SFU's hello answer names a proxy session. When the connection drops, the
//!   client table is kept and the next connection says `hello` with `resumeid` = that session
//!   (and a fresh token); the SFU keeps the session's publishers and subscribers for its grace
//!   period (30 s), so calls survive the hiccup. Deletes asked for meanwhile are sent after the
//!   resume. If the SFU answers `no_such_session` (it restarted, or the grace ran out), the
//!   table is cleared and a fresh hello follows: those publishers are gone, Talk clients
//!   renegotiate.
//!
//! What it does not do: pick among several SFUs, remote streams between SFUs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::api::ApiError;
use super::hub::Sid;
use super::server::{Server, unix_now};
use crate::secrets::PROXY_TOKEN_ID;

/// How long a command or payload may wait for the SFU's answer (upstream `proxytimeout`).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame accepted from the SFU (an SDP with many candidates fits easily).
const MAX_FRAME_BYTES: usize = 1024 * 1024;
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Lifetime of the hello token (upstream sends `iat` only; the SFU checks its age).
const TOKEN_LIFETIME_S: i64 = 60;

/// Media type bits of `create-publisher` (upstream `sfu.MediaType`).
pub const MEDIA_AUDIO: u32 = 1;
pub const MEDIA_VIDEO: u32 = 2;
pub const MEDIA_SCREEN: u32 = 4;

/// Whose an SFU client id is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    Publisher {
        session: Sid,
        stream: String,
    },
    Subscriber {
        session: Sid,
        publisher: Sid,
        stream: String,
    },
}

/// One publisher or subscriber on the SFU: its client id and the `sid` clients see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SfuHandle {
    pub client_id: String,
    pub sid: String,
}

/// Which SFU clients belong to which sessions. No I/O.
#[derive(Debug, Default)]
pub struct SfuClients {
    publishers: HashMap<(Sid, String), SfuHandle>,
    subscribers: HashMap<(Sid, Sid, String), SfuHandle>,
    owners: HashMap<String, Owner>,
}

impl SfuClients {
    pub fn publisher(&self, session: Sid, stream: &str) -> Option<&SfuHandle> {
        self.publishers.get(&(session, stream.to_string()))
    }

    pub fn subscriber(&self, session: Sid, publisher: Sid, stream: &str) -> Option<&SfuHandle> {
        self.subscribers
            .get(&(session, publisher, stream.to_string()))
    }

    pub fn owner(&self, client_id: &str) -> Option<&Owner> {
        self.owners.get(client_id)
    }

    /// Records a new client; returns the client it replaced (to delete on the SFU), if any.
    pub fn add(&mut self, owner: Owner, handle: SfuHandle) -> Option<SfuHandle> {
        self.owners.insert(handle.client_id.clone(), owner.clone());
        let old = match owner {
            Owner::Publisher { session, stream } => {
                self.publishers.insert((session, stream), handle)
            }
            Owner::Subscriber {
                session,
                publisher,
                stream,
            } => self
                .subscribers
                .insert((session, publisher, stream), handle),
        };
        if let Some(o) = &old {
            self.owners.remove(&o.client_id);
        }
        old
    }

    /// Forgets a client the SFU closed.
    pub fn remove(&mut self, client_id: &str) -> Option<Owner> {
        let owner = self.owners.remove(client_id)?;
        match &owner {
            Owner::Publisher { session, stream } => {
                self.publishers.remove(&(*session, stream.clone()));
            }
            Owner::Subscriber {
                session,
                publisher,
                stream,
            } => {
                self.subscribers
                    .remove(&(*session, *publisher, stream.clone()));
            }
        }
        Some(owner)
    }

    /// Removes every client of `session` (as publisher or subscriber); returns
    /// (client id, is publisher) to delete on the SFU.
    pub fn remove_session(&mut self, session: Sid) -> Vec<(String, bool)> {
        let ids: Vec<(String, bool)> = self
            .owners
            .iter()
            .filter_map(|(id, o)| match o {
                Owner::Publisher { session: s, .. } if *s == session => Some((id.clone(), true)),
                Owner::Subscriber { session: s, .. } if *s == session => Some((id.clone(), false)),
                _ => None,
            })
            .collect();
        for (id, _) in &ids {
            self.remove(id);
        }
        ids
    }

    /// Every publisher: (session, stream type, client id).
    pub fn publishers(&self) -> Vec<(Sid, String, String)> {
        self.publishers
            .iter()
            .map(|((s, t), h)| (*s, t.clone(), h.client_id.clone()))
            .collect()
    }

    pub fn clear(&mut self) {
        *self = Self::default();
    }

    pub fn counts(&self) -> (usize, usize) {
        (self.publishers.len(), self.subscribers.len())
    }
}

/// Media kinds an SDP offer sends (`m=` sections with a port, not `recvonly`/`inactive`).
pub fn offered_media(sdp: &str) -> u32 {
    let mut media = 0;
    let mut current: Option<(u32, bool)> = None;
    let close = |c: Option<(u32, bool)>, media: &mut u32| {
        if let Some((kind, sends)) = c
            && sends
        {
            *media |= kind;
        }
    };
    for line in sdp.lines() {
        let line = line.trim_end();
        if let Some(m) = line.strip_prefix("m=") {
            close(current.take(), &mut media);
            let mut parts = m.split_whitespace();
            let kind = match parts.next() {
                Some("audio") => MEDIA_AUDIO,
                Some("video") => MEDIA_VIDEO,
                _ => 0,
            };
            let port_open = parts.next().is_some_and(|p| p != "0");
            current = Some((kind, port_open));
        } else if matches!(line, "a=recvonly" | "a=inactive")
            && let Some((_, sends)) = current.as_mut()
        {
            *sends = false;
        }
    }
    close(current, &mut media);
    media
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The connection to the SFU and the clients on it.
pub struct ProxyClient {
    url: String,
    token_key: jsonwebtoken::EncodingKey,
    tls: Option<Arc<rustls::ClientConfig>>,
    pub clients: Mutex<SfuClients>,
    sender: Mutex<Option<mpsc::Sender<String>>>,
    pending: Mutex<HashMap<String, oneshot::Sender<Value>>>,
    next_id: AtomicU64,
    load: AtomicU64,
    /// The SFU's proxy session id (its resume id), once a hello succeeded.
    proxy_session: Mutex<Option<String>>,
    /// Deletes asked for while disconnected: (client id, is publisher), sent after a resume.
    orphans: Mutex<Vec<(String, bool)>>,
}

/// Most deletes remembered while disconnected (one per publisher or subscriber that ended).
const MAX_ORPHANS: usize = 100_000;

fn sfu_error(code: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(code, message)
}

impl ProxyClient {
    /// A client for `url`, signing with the proxy token key (private PKCS#8 PEM); `box_cert`
    /// (PEM) is the only certificate trusted for `wss://`.
    pub fn new(url: &str, private_key_pem: &str, box_cert_pem: Option<&[u8]>) -> Result<Self> {
        let token_key = jsonwebtoken::EncodingKey::from_rsa_pem(private_key_pem.as_bytes())
            .context("the proxy token key is not an RSA private key")?;
        let tls = match (url.starts_with("wss://"), box_cert_pem) {
            (true, Some(pem)) => {
                use rustls::pki_types::CertificateDer;
                use rustls::pki_types::pem::PemObject;
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(pem) {
                    roots
                        .add(c.context("the box certificate")?)
                        .context("the box certificate")?;
                }
                let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
                let cfg = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Some(Arc::new(cfg))
            }
            (true, None) => {
                anyhow::bail!("signaling.sfu_url is wss:// but there is no box certificate")
            }
            _ => None,
        };
        Ok(Self {
            url: url.to_string(),
            token_key,
            tls,
            clients: Mutex::new(SfuClients::default()),
            sender: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            load: AtomicU64::new(0),
            proxy_session: Mutex::new(None),
            orphans: Mutex::new(Vec::new()),
        })
    }

    pub fn load(&self) -> u64 {
        self.load.load(Ordering::Relaxed)
    }

    /// The TLS configuration for a `wss://` URL (only the box certificate trusted), `None`
    /// for `ws://`.
    pub fn tls_config(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.tls.clone()
    }

    /// The hello token: RS256, `iss` = the token id, `iat` and `exp`.
    pub fn token(&self, now_unix: i64) -> Result<String, ApiError> {
        let claims =
            json!({"iss": PROXY_TOKEN_ID, "iat": now_unix, "exp": now_unix + TOKEN_LIFETIME_S});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &self.token_key,
        )
        .map_err(|e| sfu_error("internal_error", e.to_string()))
    }

    /// Sends a request and waits for the SFU's answer with the same id. An `error` answer comes
    /// back as that error.
    pub async fn request(&self, mut msg: Value) -> Result<Value, ApiError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed).to_string();
        msg["id"] = Value::String(id.clone());
        let Some(tx) = lock(&self.sender).clone() else {
            return Err(sfu_error("client_not_found", "The SFU is not connected."));
        };
        let (done_tx, done_rx) = oneshot::channel();
        lock(&self.pending).insert(id.clone(), done_tx);
        if tx.send(msg.to_string()).await.is_err() {
            lock(&self.pending).remove(&id);
            return Err(sfu_error("processing_failed", "The SFU connection closed."));
        }
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, done_rx).await;
        lock(&self.pending).remove(&id);
        match answer {
            Ok(Ok(v)) if v["type"] == "error" => Err(sfu_error(
                v["error"]["code"].as_str().unwrap_or("processing_failed"),
                v["error"]["message"]
                    .as_str()
                    .unwrap_or("The SFU refused the request."),
            )),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(sfu_error("processing_failed", "The SFU connection closed.")),
            Err(_) => Err(sfu_error(
                "processing_failed",
                "The SFU did not answer in time.",
            )),
        }
    }

    /// A `command` request; returns the answer's `command` object.
    pub async fn command(&self, command: Value) -> Result<Value, ApiError> {
        let v = self
            .request(json!({"type":"command","command":command}))
            .await?;
        Ok(v["command"].clone())
    }

    /// A `payload` request; returns the answer's inner `payload` (may be null).
    pub async fn payload(
        &self,
        kind: &str,
        client_id: &str,
        sid: Option<&str>,
        payload: Option<&Value>,
    ) -> Result<Value, ApiError> {
        let mut p = json!({"type": kind, "clientId": client_id});
        if let Some(s) = sid.filter(|s| !s.is_empty()) {
            p["sid"] = Value::String(s.to_string());
        }
        if let Some(v) = payload.filter(|v| !v.is_null()) {
            p["payload"] = v.clone();
        }
        let v = self.request(json!({"type":"payload","payload":p})).await?;
        Ok(v["payload"]["payload"].clone())
    }

    /// Deletes a publisher or subscriber on the SFU, not waiting for the answer. While
    /// disconnected the delete waits for the resume (the SFU still holds the client then).
    pub fn delete(self: &Arc<Self>, client_id: String, publisher: bool) {
        if lock(&self.sender).is_none() {
            let mut o = lock(&self.orphans);
            if o.len() < MAX_ORPHANS {
                o.push((client_id, publisher));
            }
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let kind = if publisher {
                "delete-publisher"
            } else {
                "delete-subscriber"
            };
            if let Err(e) = me
                .command(json!({"type": kind, "clientId": client_id}))
                .await
            {
                tracing::debug!(client_id, error = %e, "SFU delete failed");
            }
        });
    }

    /// Keeps the connection up until `shutdown`: connect, hello, serve, back off, again.
    pub async fn run(self: Arc<Self>, server: Arc<Server>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let result = tokio::select! {
                r = self.connect_once(&server) => r,
                _ = shutdown.changed() => return,
            };
            let was_up = matches!(result, Ok(true));
            if let Err(e) = &result {
                tracing::debug!(url = %self.url, error = %format!("{e:#}"), "SFU connection failed");
            }
            self.connection_lost(&server);
            if was_up {
                backoff = BACKOFF_MIN;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn connection_lost(&self, server: &Server) {
        let was = {
            let mut hub = server.hub();
            let was = hub.sfu_connected();
            hub.set_sfu_connected(false);
            was
        };
        if was {
            tracing::warn!(url = %self.url, "SFU disconnected; mcu features withdrawn");
        }
        *lock(&self.sender) = None;
        lock(&self.pending).clear();
        // The client table stays: the next connection resumes the proxy session.
    }

    /// The SFU has no (more) session for us: its publishers and subscribers are gone.
    fn session_lost(&self) {
        *lock(&self.proxy_session) = None;
        lock(&self.clients).clear();
        lock(&self.orphans).clear();
    }

    fn hello_message(&self, id: &str, resume: Option<&str>) -> Result<String> {
        let token = self.token(unix_now()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut hello = json!({"id": id, "type":"hello","hello":{"version":"1.0","token":token}});
        if let Some(r) = resume {
            hello["hello"]["resumeid"] = Value::String(r.to_string());
        }
        Ok(hello.to_string())
    }

    /// One connection; `Ok(true)` if the hello succeeded before it ended.
    async fn connect_once(self: &Arc<Self>, server: &Arc<Server>) -> Result<bool> {
        let uri: axum::http::Uri = self.url.parse().context("signaling.sfu_url")?;
        let host = uri
            .host()
            .context("signaling.sfu_url has no host")?
            .to_string();
        let port = uri
            .port_u16()
            .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let tcp = tokio::time::timeout(
            REQUEST_TIMEOUT,
            tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port)),
        )
        .await
        .context("connecting to the SFU timed out")?
        .with_context(|| format!("connecting to the SFU at {host}:{port}"))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from(
                    host.trim_matches(['[', ']']).to_string(),
                )
                .context("the SFU host name")?;
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, tcp)
                    .await
                    .context("TLS with the SFU (checked against the box certificate)")?;
                self.serve(server, tls).await
            }
            None => self.serve(server, tcp).await,
        }
    }

    async fn serve<S>(self: &Arc<Self>, server: &Arc<Server>, stream: S) -> Result<bool>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut config = WebSocketConfig::default();
        config.max_message_size = Some(MAX_FRAME_BYTES);
        config.max_frame_size = Some(MAX_FRAME_BYTES);
        let (ws, _) = tokio::time::timeout(
            REQUEST_TIMEOUT,
            tokio_tungstenite::client_async_with_config(self.url.as_str(), stream, Some(config)),
        )
        .await
        .context("the SFU WebSocket handshake timed out")?
        .context("the SFU WebSocket handshake")?;
        let (mut sink, mut source) = ws.split();
        let (tx, mut rx) = mpsc::channel::<String>(256);
        let writer = tokio::spawn(async move {
            while let Some(text) = rx.recv().await {
                if sink.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let mut hello_id = self.next_id.fetch_add(1, Ordering::Relaxed).to_string();
        let mut resuming = lock(&self.proxy_session).clone();
        tx.send(self.hello_message(&hello_id, resuming.as_deref())?)
            .await
            .context("sending hello to the SFU")?;
        let mut up = false;
        let result = loop {
            let frame = if up {
                source.next().await
            } else {
                match tokio::time::timeout(REQUEST_TIMEOUT, source.next()).await {
                    Ok(f) => f,
                    Err(_) => break Err(anyhow::anyhow!("the SFU did not answer hello")),
                }
            };
            let text = match frame {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(_))) | None => break Ok(()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => break Err(anyhow::anyhow!("reading from the SFU: {e}")),
            };
            let Ok(msg) = serde_json::from_str::<Value>(text.as_str()) else {
                tracing::debug!("the SFU sent a frame that is not JSON");
                continue;
            };
            if !up {
                if msg["id"] != hello_id.as_str() {
                    continue;
                }
                if msg["type"] == "error"
                    && msg["error"]["code"] == "no_such_session"
                    && resuming.take().is_some()
                {
                    tracing::warn!(url = %self.url, "the SFU no longer has our proxy session; its publishers and subscribers are gone");
                    self.session_lost();
                    hello_id = self.next_id.fetch_add(1, Ordering::Relaxed).to_string();
                    if tx.send(self.hello_message(&hello_id, None)?).await.is_err() {
                        break Err(anyhow::anyhow!("the SFU connection closed"));
                    }
                    continue;
                }
                if msg["type"] != "hello" {
                    break Err(anyhow::anyhow!("the SFU refused hello: {}", msg["error"]));
                }
                let Some(session) = msg["hello"]["sessionid"].as_str().filter(|s| !s.is_empty())
                else {
                    break Err(anyhow::anyhow!("the SFU's hello answer has no sessionid"));
                };
                let resumed = resuming.as_deref() == Some(session);
                if !resumed {
                    // A new session: nothing of an earlier one exists on the SFU.
                    self.session_lost();
                    *lock(&self.proxy_session) = Some(session.to_string());
                }
                up = true;
                *lock(&self.sender) = Some(tx.clone());
                server.hub().set_sfu_connected(true);
                tracing::info!(url = %self.url, session, resumed, "SFU connected; mcu features advertised");
                if resumed {
                    let orphans = std::mem::take(&mut *lock(&self.orphans));
                    for (id, publisher) in orphans {
                        self.delete(id, publisher);
                    }
                }
                continue;
            }
            self.dispatch(server, msg).await;
        };
        drop(tx);
        writer.abort();
        result.map(|_| up)
    }

    async fn dispatch(self: &Arc<Self>, server: &Arc<Server>, msg: Value) {
        if let Some(id) = msg["id"].as_str().filter(|i| !i.is_empty()) {
            let waiter = lock(&self.pending).remove(id);
            if let Some(w) = waiter {
                let _ = w.send(msg);
                return;
            }
        }
        match msg["type"].as_str() {
            Some("payload") => {
                let p = &msg["payload"];
                let Some(client_id) = p["clientId"].as_str() else {
                    return;
                };
                let owner = lock(&self.clients).owner(client_id).cloned();
                let Some(owner) = owner else {
                    tracing::debug!(client_id, "SFU payload for an unknown client");
                    return;
                };
                match p["type"].as_str() {
                    Some("candidate") => {
                        server
                            .sfu_to_client(
                                &owner,
                                "candidate",
                                json!({"candidate": p["payload"]["candidate"]}),
                            )
                            .await
                    }
                    Some("offer") => {
                        server
                            .sfu_to_client(&owner, "offer", p["payload"]["offer"].clone())
                            .await
                    }
                    other => tracing::debug!(?other, "unsupported SFU payload"),
                }
            }
            Some("event") => {
                let e = &msg["event"];
                match e["type"].as_str() {
                    Some("update-load") => {
                        self.load
                            .store(e["load"].as_u64().unwrap_or(0), Ordering::Relaxed);
                    }
                    Some("publisher-closed") | Some("subscriber-closed") => {
                        if let Some(id) = e["clientId"].as_str() {
                            lock(&self.clients).remove(id);
                        }
                    }
                    Some(kind @ ("speaking" | "stopped-speaking")) => {
                        let owner = e["clientId"]
                            .as_str()
                            .and_then(|id| lock(&self.clients).owner(id).cloned());
                        if let Some(owner) = owner {
                            server.sfu_speaking(&owner, kind == "speaking").await;
                        }
                    }
                    other => tracing::debug!(?other, "SFU event"),
                }
            }
            Some("bye") => tracing::info!(reason = %msg["bye"]["reason"], "the SFU said bye"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offered_media_reads_sending_sections_only() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendrecv\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendonly\r\n";
        assert_eq!(offered_media(sdp), MEDIA_AUDIO | MEDIA_VIDEO);
        let sdp = "v=0\r\nm=audio 9 UDP 111\r\nm=video 0 UDP 96\r\n";
        assert_eq!(offered_media(sdp), MEDIA_AUDIO);
        let sdp = "v=0\r\nm=audio 9 UDP 111\r\na=recvonly\r\nm=video 9 UDP 96\r\n";
        assert_eq!(offered_media(sdp), MEDIA_VIDEO);
        assert_eq!(offered_media("garbage"), 0);
    }

    #[test]
    fn clients_are_found_by_id_and_removed_with_their_session() {
        let mut c = SfuClients::default();
        let h = |id: &str| SfuHandle {
            client_id: id.into(),
            sid: "s".into(),
        };
        c.add(
            Owner::Publisher {
                session: 1,
                stream: "video".into(),
            },
            h("p1"),
        );
        c.add(
            Owner::Subscriber {
                session: 2,
                publisher: 1,
                stream: "video".into(),
            },
            h("s1"),
        );
        assert_eq!(c.publisher(1, "video"), Some(&h("p1")));
        assert_eq!(c.subscriber(2, 1, "video"), Some(&h("s1")));
        let replaced = c.add(
            Owner::Publisher {
                session: 1,
                stream: "video".into(),
            },
            h("p2"),
        );
        assert_eq!(replaced, Some(h("p1")));
        assert!(c.owner("p1").is_none());
        assert_eq!(c.remove_session(2), vec![("s1".to_string(), false)]);
        assert_eq!(c.counts(), (1, 0));
        assert!(matches!(c.remove("p2"), Some(Owner::Publisher { .. })));
        assert_eq!(c.counts(), (0, 0));
    }
}
