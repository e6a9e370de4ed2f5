//! The `/proxy` control server: authenticates signaling servers, turns proxy-protocol
//! commands and payloads into worker commands, and sends worker events back as proxy events.
//!
//! It owns the map from proxy client ids (publisher/subscriber ids handed to the signaling
//! server) to (worker, session), placement of publishers on workers (least loaded; a
//! subscriber lives on its publisher's worker), and per-proxy-session ownership.
//!
//! A signaling server's `hello` opens a *proxy session* (its `sessionid`). Publishers and
//! subscribers belong to that session, not to the WebSocket: when the connection drops, the
//! session is kept for `sfu.resume_grace_s` (default 30 s) with its media sessions running, and a `hello` with
//! `resumeid` = that session id (upstream's proxy resume) reattaches it, so calls survive a
//! signaling↔SFU hiccup. Events for a detached session wait (bounded) and are sent on resume.
//! When the grace ends without a resume, the session's publishers and subscribers are closed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::IntoResponse;
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};
use media_core::session::StreamType;
use media_core::worker::{Reply, WorkerCommand, WorkerError, WorkerEvent, WorkerStats};
use media_core::{SessionKey, WorkerHandle};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

use super::metrics::{self, ControlFigures};
use super::protocol::{ClientMessage, MAX_MESSAGE_BYTES, ServerMessage, errors};
use super::token::TokenKeys;

/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a worker may take to answer a command.
const WORKER_TIMEOUT: Duration = Duration::from_secs(10);
/// Most clients (publishers + subscribers) one SFU holds.
const MAX_CLIENTS: usize = 100_000;
/// Most events kept for a detached session (publisher-closed etc.); older ones are dropped.
const MAX_BACKLOG: usize = 1024;

#[derive(Debug, Clone)]
struct Client {
    worker: usize,
    session: u32,
    publisher: bool,
    stream_type: StreamType,
    owner: u64,
}

/// A signaling server's proxy session: survives its connection for the resume grace.
struct ProxySession {
    /// The `sessionid` of the hello answer, which is also the resume id.
    id: String,
    /// The connection serving it (connection number, its outgoing queue), if any.
    attached: Option<(u64, mpsc::UnboundedSender<ServerMessage>)>,
    /// When its connection ended (`None` while attached).
    detached_at: Option<Instant>,
    /// Events that arrived while detached.
    backlog: Vec<ServerMessage>,
}

impl ProxySession {
    fn send(&mut self, m: ServerMessage) {
        match &self.attached {
            Some((_, tx)) => {
                let _ = tx.send(m);
            }
            None => {
                if self.backlog.len() >= MAX_BACKLOG {
                    self.backlog.remove(0);
                }
                self.backlog.push(m);
            }
        }
    }
}

#[derive(Default)]
struct State_ {
    clients: HashMap<String, Client>,
    by_key: HashMap<SessionKey, String>,
    /// Proxy sessions by number (`Client::owner`).
    sessions: HashMap<u64, ProxySession>,
    /// Session numbers by resume id.
    by_resume_id: HashMap<String, u64>,
}

/// The SFU as the control plane sees it.
pub struct Sfu {
    workers: Vec<WorkerHandle>,
    keys: TokenKeys,
    state: Mutex<State_>,
    next_session: AtomicU32,
    next_conn: AtomicU64,
    next_proxy_session: AtomicU64,
    resume_grace: Duration,
    shutdown: watch::Receiver<bool>,
    /// Peers allowed to read `/metrics` (`sfu.metrics_allowed_ips`).
    metrics_allowed_ips: Vec<IpAddr>,
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    if getrandom::fill(&mut b).is_err() {
        // Never reached on Linux; fall back to the clock rather than fail a join.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = (t >> (i % 16 * 8)) as u8);
    }
    hex::encode(b)
}

/// A client id in upstream's UUID shape.
fn new_client_id() -> String {
    let h = random_hex(16);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

type Failure = (&'static str, String);

fn from_worker(e: WorkerError) -> Failure {
    match e {
        WorkerError::UnknownSession => (errors::UNKNOWN_CLIENT.0, errors::UNKNOWN_CLIENT.1.into()),
        WorkerError::UnknownPublisher => ("unknown_client", "Unknown publisher id given.".into()),
        other => ("processing_failed", other.to_string()),
    }
}

fn err(pair: (&'static str, &'static str)) -> Failure {
    (pair.0, pair.1.to_string())
}

/// What a `selectStream` payload allows: the highest simulcast layer (`substream`, 0 = lowest,
/// as the Talk clients send it to Janus) and the highest VP8 temporal layer (`temporal`, 0 =
/// T0 only: a quarter of the frame rate with Chromium's three layers). Absent or null lifts a
/// bound, as it does in Janus.
fn select_stream_bound(
    payload: &serde_json::Map<String, Value>,
) -> Result<(Option<usize>, Option<u8>), Failure> {
    let field = |name: &str| match payload.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= 2 => Ok(Some(n as u8)),
            _ => Err((
                "invalid_format",
                format!("payload.{name} must be 0, 1 or 2 (got {v})"),
            )),
        },
    };
    Ok((field("substream")?.map(usize::from), field("temporal")?))
}

impl Sfu {
    pub fn new(
        workers: Vec<WorkerHandle>,
        keys: TokenKeys,
        resume_grace: Duration,
        shutdown: watch::Receiver<bool>,
        metrics_allowed_ips: Vec<IpAddr>,
    ) -> Arc<Sfu> {
        Arc::new(Sfu {
            workers,
            keys,
            state: Mutex::new(State_::default()),
            next_session: AtomicU32::new(1),
            next_conn: AtomicU64::new(1),
            next_proxy_session: AtomicU64::new(1),
            resume_grace,
            shutdown,
            metrics_allowed_ips,
        })
    }

    /// Whether `peer` may read `/metrics`.
    pub fn metrics_allowed(&self, peer: SocketAddr) -> bool {
        self.metrics_allowed_ips.contains(&peer.ip().to_canonical())
    }

    /// A snapshot of every worker's counters, in worker order; `None` for a worker that did
    /// not answer. The workers are asked at once, so one slow worker delays a scrape by at most
    /// the worker timeout, not once per worker.
    pub async fn worker_stats(&self) -> Vec<Option<WorkerStats>> {
        let asks = (0..self.workers.len()).map(|i| async move {
            self.ask(i, |reply| WorkerCommand::Stats { reply })
                .await
                .ok()
        });
        futures_util::future::join_all(asks).await
    }

    /// The control plane's own figures for `/metrics`.
    pub fn control_figures(&self) -> ControlFigures {
        let st = self.state();
        let attached = st
            .sessions
            .values()
            .filter(|s| s.attached.is_some())
            .count() as u64;
        ControlFigures {
            load: st.clients.len() as u64,
            proxy_attached: attached,
            proxy_detached: st.sessions.len() as u64 - attached,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State_> {
        // A poisoned lock only means another task panicked mid-update; the maps stay usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of publishers and subscribers, the `load` of `update-load`.
    pub fn load(&self) -> u64 {
        self.state().clients.len() as u64
    }

    async fn ask<T: Send + 'static>(
        &self,
        worker: usize,
        make: impl FnOnce(Reply<T>) -> WorkerCommand,
    ) -> Result<T, Failure> {
        let (tx, rx) = oneshot::channel();
        let cmd = make(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        let Some(w) = self.workers.get(worker) else {
            return Err(("internal_error", "no such media worker".into()));
        };
        if !w.send(cmd) {
            return Err(("internal_error", "the media worker has stopped".into()));
        }
        match tokio::time::timeout(WORKER_TIMEOUT, rx).await {
            Ok(Ok(r)) => r.map_err(from_worker),
            Ok(Err(_)) => Err((
                "internal_error",
                "the media worker dropped the request".into(),
            )),
            Err(_) => Err(("timeout", "The media worker did not answer in time.".into())),
        }
    }

    /// Handles a worker's own event (from the worker threads, via a channel).
    pub fn worker_event(&self, ev: WorkerEvent) {
        match ev {
            WorkerEvent::SessionClosed { key, reason } => self.session_closed(key, reason),
            WorkerEvent::Speaking { key, speaking } => self.speaking(key, speaking),
        }
    }

    /// A publisher started or stopped speaking: its owner hears `speaking` or
    /// `stopped-speaking` with the publisher's client id (a talkbox extension of the proxy
    /// protocol; upstream's signaling server logs unknown event types and goes on).
    fn speaking(&self, key: SessionKey, speaking: bool) {
        let mut st = self.state();
        let Some(id) = st.by_key.get(&key).cloned() else {
            return;
        };
        let Some(owner) = st.clients.get(&id).map(|c| c.owner) else {
            return;
        };
        let kind = if speaking {
            "speaking"
        } else {
            "stopped-speaking"
        };
        tracing::debug!(client = %id, kind, "speaker change");
        if let Some(s) = st.sessions.get_mut(&owner) {
            s.send(ServerMessage::event(json!({"type": kind, "clientId": id})));
        }
    }

    fn session_closed(&self, key: SessionKey, reason: &'static str) {
        let mut st = self.state();
        let Some(id) = st.by_key.remove(&key) else {
            return;
        };
        let Some(c) = st.clients.remove(&id) else {
            return;
        };
        tracing::info!(client = %id, %key, reason, "media session ended");
        let kind = if c.publisher {
            "publisher-closed"
        } else {
            "subscriber-closed"
        };
        if let Some(s) = st.sessions.get_mut(&c.owner) {
            s.send(ServerMessage::event(json!({"type": kind, "clientId": id})));
        }
    }

    fn least_loaded_worker(&self) -> usize {
        self.workers
            .iter()
            .enumerate()
            .min_by_key(|(_, w)| w.load())
            .map(|(i, _)| i)
            .unwrap_or(0)
    }

    fn client(&self, id: &str) -> Option<Client> {
        self.state().clients.get(id).cloned()
    }

    fn register(&self, id: &str, c: Client) {
        let mut st = self.state();
        st.by_key.insert(
            SessionKey {
                worker: c.worker as u16,
                session: c.session,
            },
            id.to_string(),
        );
        st.clients.insert(id.to_string(), c);
    }

    fn unregister(&self, id: &str) -> Option<Client> {
        let mut st = self.state();
        let c = st.clients.remove(id)?;
        st.by_key.remove(&SessionKey {
            worker: c.worker as u16,
            session: c.session,
        });
        Some(c)
    }

    async fn command(&self, owner: u64, msg: &ClientMessage) -> Result<ServerMessage, Failure> {
        let Some(cmd) = &msg.command else {
            return Err(("invalid_format", "command missing".into()));
        };
        let id = msg.id.clone();
        match cmd.kind.as_str() {
            "create-publisher" => {
                if *self.shutdown.borrow() {
                    return Err(err(errors::SHUTDOWN_SCHEDULED));
                }
                let Some(stream_type) = StreamType::parse(&cmd.stream_type) else {
                    return Err(("invalid_format", "stream type missing or unknown".into()));
                };
                if self.state().clients.len() >= MAX_CLIENTS {
                    return Err(("processing_failed", "the SFU is full".into()));
                }
                let bitrate = cmd
                    .publisher_settings
                    .as_ref()
                    .and_then(|s| s.get("bitrate"))
                    .or(cmd.bitrate.as_ref())
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                let worker = self.least_loaded_worker();
                let session = self.next_session.fetch_add(1, Ordering::Relaxed);
                self.ask(worker, |reply| WorkerCommand::CreatePublisher {
                    session,
                    stream_type,
                    reply,
                })
                .await?;
                if bitrate > 0 {
                    // Enforced at the publisher: b=AS in our answer and REMB while it sends.
                    let limited = self
                        .ask(worker, |reply| WorkerCommand::LimitPublisher {
                            session,
                            bitrate,
                            reply,
                        })
                        .await;
                    if let Err(e) = limited {
                        let _ = self
                            .ask(worker, |reply| WorkerCommand::Close { session, reply })
                            .await;
                        return Err(e);
                    }
                }
                let client_id = new_client_id();
                self.register(
                    &client_id,
                    Client {
                        worker,
                        session,
                        publisher: true,
                        stream_type,
                        owner,
                    },
                );
                tracing::info!(client = %client_id, stream = stream_type.as_str(), worker, bitrate, "created publisher");
                let mut body = json!({"id": client_id});
                if bitrate > 0 {
                    body["bitrate"] = json!(bitrate);
                }
                Ok(ServerMessage::command(id, body))
            }
            "create-subscriber" => {
                if cmd.publisher_id.is_empty() {
                    return Err(("invalid_format", "publisher id missing".into()));
                }
                if !cmd.remote_url.is_empty() {
                    return Err(err(errors::REMOTE_UNSUPPORTED));
                }
                let publisher = match self.client(&cmd.publisher_id) {
                    Some(c) if c.publisher => c,
                    _ => return Err(("unknown_client", "Unknown publisher id given.".into())),
                };
                if self.state().clients.len() >= MAX_CLIENTS {
                    return Err(("processing_failed", "the SFU is full".into()));
                }
                let session = self.next_session.fetch_add(1, Ordering::Relaxed);
                self.ask(publisher.worker, |reply| WorkerCommand::CreateSubscriber {
                    session,
                    publisher: publisher.session,
                    reply,
                })
                .await?;
                let client_id = new_client_id();
                self.register(
                    &client_id,
                    Client {
                        worker: publisher.worker,
                        session,
                        publisher: false,
                        stream_type: publisher.stream_type,
                        owner,
                    },
                );
                let sid = random_hex(8);
                Ok(ServerMessage::command(
                    id,
                    json!({"id": client_id, "sid": sid}),
                ))
            }
            kind @ ("delete-publisher" | "delete-subscriber") => {
                if cmd.client_id.is_empty() {
                    return Err(("invalid_format", "client id missing".into()));
                }
                let want_publisher = kind == "delete-publisher";
                match self.client(&cmd.client_id) {
                    Some(c) if c.publisher == want_publisher => {}
                    _ => return Err(err(errors::UNKNOWN_CLIENT)),
                }
                let Some(c) = self.unregister(&cmd.client_id) else {
                    return Err(err(errors::UNKNOWN_CLIENT));
                };
                // The worker may have closed it on its own meanwhile; the client is gone either way.
                let _ = self
                    .ask(c.worker, |reply| WorkerCommand::Close {
                        session: c.session,
                        reply,
                    })
                    .await;
                // A publisher's subscribers close with it in the worker, which reports each
                // as `subscriber-closed` to its owner.
                Ok(ServerMessage::command(id, json!({"id": cmd.client_id})))
            }
            _ => Err(err(errors::UNSUPPORTED_COMMAND)),
        }
    }

    async fn payload(&self, msg: &ClientMessage) -> Result<ServerMessage, Failure> {
        let Some(p) = &msg.payload else {
            return Err(("invalid_format", "payload missing".into()));
        };
        if p.client_id.is_empty() {
            return Err(("invalid_format", "client id missing".into()));
        }
        let Some(c) = self.client(&p.client_id) else {
            return Err(err(errors::UNKNOWN_CLIENT));
        };
        let id = msg.id.clone();
        let reply = |body: Value| {
            ServerMessage::payload(
                id.clone(),
                json!({"type": p.kind, "clientId": p.client_id, "payload": body}),
            )
        };
        let sdp = || -> Result<String, Failure> {
            match p.payload.get("sdp").and_then(Value::as_str) {
                Some(s) if s.len() <= media_core::session::MAX_SDP_BYTES => Ok(s.to_string()),
                Some(_) => Err(("processing_failed", "the SDP is too large".into())),
                None => Err(("invalid_format", "payload.sdp missing".into())),
            }
        };
        let session = c.session;
        match p.kind.as_str() {
            "offer" => {
                if !c.publisher {
                    return Err(err(errors::UNSUPPORTED_PAYLOAD));
                }
                let sdp = sdp()?;
                let answer = self
                    .ask(c.worker, |reply| WorkerCommand::Offer {
                        session,
                        sdp,
                        reply,
                    })
                    .await?;
                Ok(reply(json!({"type": "answer", "sdp": answer})))
            }
            "answer" => {
                if c.publisher {
                    return Err(err(errors::UNSUPPORTED_PAYLOAD));
                }
                let sdp = sdp()?;
                self.ask(c.worker, |reply| WorkerCommand::Answer {
                    session,
                    sdp,
                    reply,
                })
                .await?;
                Ok(reply(json!({})))
            }
            "requestoffer" | "sendoffer" => {
                if c.publisher {
                    return Err(err(errors::UNSUPPORTED_PAYLOAD));
                }
                let offer = self
                    .ask(c.worker, |reply| WorkerCommand::RequestOffer {
                        session,
                        reply,
                    })
                    .await?;
                Ok(reply(json!({"type": "offer", "sdp": offer})))
            }
            "candidate" => {
                // Either {"candidate": {"candidate": "candidate:…", "sdpMid": …}} or a string.
                let line = match p.payload.get("candidate") {
                    Some(Value::Object(o)) => o.get("candidate").and_then(Value::as_str),
                    Some(Value::String(s)) => Some(s.as_str()),
                    _ => None,
                };
                let Some(line) = line else {
                    return Err(("invalid_format", "payload.candidate missing".into()));
                };
                if line.trim().is_empty() {
                    // An empty candidate is the end-of-candidates marker.
                    return Ok(reply(json!({})));
                }
                let candidate = line.to_string();
                self.ask(c.worker, |reply| WorkerCommand::Candidate {
                    session,
                    candidate,
                    reply,
                })
                .await?;
                Ok(reply(json!({})))
            }
            "selectStream" => {
                if c.publisher {
                    return Err(err(errors::UNSUPPORTED_PAYLOAD));
                }
                let (max_layer, max_temporal) = select_stream_bound(&p.payload)?;
                self.ask(c.worker, |reply| WorkerCommand::SelectStream {
                    session,
                    max_layer,
                    max_temporal,
                    reply,
                })
                .await?;
                Ok(reply(json!({})))
            }
            "endOfCandidates" => Ok(reply(json!({}))),
            _ => Err(err(errors::UNSUPPORTED_PAYLOAD)),
        }
    }

    /// Opens a proxy session served by connection `conn`; returns its number and id.
    fn open_session(&self, conn: u64, tx: &mpsc::UnboundedSender<ServerMessage>) -> (u64, String) {
        let num = self.next_proxy_session.fetch_add(1, Ordering::Relaxed);
        let id = random_hex(16);
        let mut st = self.state();
        st.by_resume_id.insert(id.clone(), num);
        st.sessions.insert(
            num,
            ProxySession {
                id: id.clone(),
                attached: Some((conn, tx.clone())),
                detached_at: None,
                backlog: Vec::new(),
            },
        );
        (num, id)
    }

    /// Reattaches the session with resume id `id` to connection `conn`: queued events go out
    /// first. A connection still serving it is told `bye` (the newer one wins, as when the
    /// signaling side saw a dead connection the SFU has not noticed yet).
    fn resume_session(
        &self,
        id: &str,
        conn: u64,
        tx: &mpsc::UnboundedSender<ServerMessage>,
    ) -> Option<u64> {
        let mut st = self.state();
        let num = *st.by_resume_id.get(id)?;
        let s = st.sessions.get_mut(&num)?;
        if let Some((_, old)) = s.attached.take() {
            let _ = old.send(ServerMessage::bye("session_resumed"));
        }
        s.detached_at = None;
        for m in s.backlog.drain(..) {
            let _ = tx.send(m);
        }
        s.attached = Some((conn, tx.clone()));
        Some(num)
    }

    /// Connection `conn` ended: its session (if it still serves it) waits for a resume for
    /// the grace period, then closes.
    fn connection_closed(self: &Arc<Self>, conn: u64, session: u64) {
        {
            let mut st = self.state();
            let Some(s) = st.sessions.get_mut(&session) else {
                return;
            };
            if !matches!(&s.attached, Some((c, _)) if *c == conn) {
                return;
            }
            s.attached = None;
            s.detached_at = Some(Instant::now());
        }
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(me.resume_grace).await;
            let expired = {
                let mut st = me.state();
                let expired = st.sessions.get(&session).is_some_and(|s| {
                    s.detached_at
                        .is_some_and(|t| t.elapsed() >= me.resume_grace)
                });
                if expired && let Some(s) = st.sessions.remove(&session) {
                    st.by_resume_id.remove(&s.id);
                }
                expired
            };
            if expired {
                tracing::info!(
                    session,
                    "proxy session not resumed in time; closing its clients"
                );
                me.close_session_clients(session).await;
            }
        });
    }

    /// Closes every publisher and subscriber a proxy session created.
    async fn close_session_clients(&self, session: u64) {
        let owned: Vec<(String, Client)> = {
            let st = self.state();
            st.clients
                .iter()
                .filter(|(_, c)| c.owner == session)
                .map(|(k, c)| (k.clone(), c.clone()))
                .collect()
        };
        for (id, c) in owned {
            if self.unregister(&id).is_some() {
                let _ = self
                    .ask(c.worker, |reply| WorkerCommand::Close {
                        session: c.session,
                        reply,
                    })
                    .await;
            }
        }
    }

    /// Tells every connection the current load when it changed.
    pub async fn load_updates(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let mut last = u64::MAX;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let load = self.load();
            if load != last {
                last = load;
                let st = self.state();
                for (_, tx) in st.sessions.values().filter_map(|s| s.attached.as_ref()) {
                    let _ = tx.send(load_event(load));
                }
            }
        }
    }
}

fn load_event(load: u64) -> ServerMessage {
    ServerMessage::event(json!({"type": "update-load", "load": load}))
}

/// The routes of the control server: `/proxy` (WebSocket), `/welcome` and `/metrics`
/// (Prometheus, for `sfu.metrics_allowed_ips` only).
pub fn router(sfu: Arc<Sfu>) -> Router {
    Router::new()
        .route("/proxy", get(upgrade))
        .route("/welcome", get(welcome))
        .route("/metrics", get(metrics::handler))
        .with_state(sfu)
}

async fn welcome() -> impl IntoResponse {
    axum::Json(
        json!({"nextcloud-spreed-signaling-proxy": "Welcome", "version": env!("CARGO_PKG_VERSION")}),
    )
}

async fn upgrade(State(sfu): State<Arc<Sfu>>, ws: WebSocketUpgrade) -> impl IntoResponse {
    ws.max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| connection(sfu, socket))
}

async fn connection(sfu: Arc<Sfu>, socket: WebSocket) {
    let conn = sfu.next_conn.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<ServerMessage>();
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let close = m.kind == "bye";
            let Ok(text) = serde_json::to_string(&m) else {
                continue;
            };
            if sink.send(Message::Text(text.into())).await.is_err() {
                break;
            }
            if close {
                let _ = sink.close().await;
                break;
            }
        }
    });
    let mut shutdown = sfu.shutdown.clone();
    // The proxy session this connection serves, once hello succeeded.
    let mut session: Option<u64> = None;
    let hello_deadline = tokio::time::sleep(HELLO_TIMEOUT);
    tokio::pin!(hello_deadline);
    loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = &mut hello_deadline, if session.is_none() => {
                let _ = tx.send(ServerMessage::bye("hello_timeout"));
                break;
            }
            _ = shutdown.changed() => {
                let _ = tx.send(ServerMessage::bye("shutdown"));
                break;
            }
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Binary(_))) => {
                let _ = tx.send(ServerMessage::error(
                    None,
                    errors::INVALID_FORMAT.0,
                    errors::INVALID_FORMAT.1,
                ));
                continue;
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => continue,
        };
        let parsed: ClientMessage = match serde_json::from_str(text.as_str()) {
            Ok(m) => m,
            Err(_) => {
                let _ = tx.send(ServerMessage::error(
                    None,
                    errors::INVALID_FORMAT.0,
                    errors::INVALID_FORMAT.1,
                ));
                continue;
            }
        };
        let Some(owner) = session else {
            match hello(&sfu, &parsed, conn, &tx) {
                Ok((num, reply)) => {
                    session = Some(num);
                    let _ = tx.send(reply);
                    let _ = tx.send(load_event(sfu.load()));
                }
                Err((code, message)) => {
                    let _ = tx.send(ServerMessage::error(parsed.id.clone(), code, message));
                }
            }
            continue;
        };
        let result = match parsed.kind.as_str() {
            "command" => sfu.command(owner, &parsed).await,
            "payload" => sfu.payload(&parsed).await,
            "bye" => break,
            "hello" => Err(("invalid_format", "already authenticated".to_string())),
            _ => Err(err(errors::UNSUPPORTED_MESSAGE)),
        };
        let reply = result.unwrap_or_else(|(code, message)| {
            ServerMessage::error(parsed.id.clone(), code, message)
        });
        let _ = tx.send(reply);
    }
    if let Some(num) = session {
        sfu.connection_closed(conn, num);
    }
    drop(tx);
    let _ = writer.await;
}

/// Checks a hello and opens (or resumes) the proxy session; returns its number and the answer.
fn hello(
    sfu: &Sfu,
    m: &ClientMessage,
    conn: u64,
    tx: &mpsc::UnboundedSender<ServerMessage>,
) -> Result<(u64, ServerMessage), Failure> {
    if m.kind != "hello" {
        return Err(err(errors::HELLO_EXPECTED));
    }
    let Some(h) = &m.hello else {
        return Err(("invalid_format", "hello missing".into()));
    };
    if h.version != "1.0" {
        return Err((
            "invalid_format",
            format!("unsupported hello version: {}", h.version),
        ));
    }
    let answer = |id: &str| {
        ServerMessage::hello(
            m.id.clone(),
            json!({
                "version": "1.0",
                "sessionid": id,
                "server": {"version": env!("CARGO_PKG_VERSION"), "features": []},
            }),
        )
    };
    if !h.resumeid.is_empty() {
        // Upstream's signaling server resumes with the session id alone (a 128-bit secret it
        // was given after a valid token); a token, if sent as well, must still be valid.
        if !h.token.is_empty() {
            sfu.keys.verify(&h.token, now_unix()).map_err(err)?;
        }
        if h.resumeid.len() > 64 {
            return Err(err(errors::NO_SUCH_SESSION));
        }
        let num = sfu
            .resume_session(&h.resumeid, conn, tx)
            .ok_or_else(|| err(errors::NO_SUCH_SESSION))?;
        tracing::info!(session = num, "signaling server resumed its proxy session");
        return Ok((num, answer(&h.resumeid)));
    }
    let issuer = sfu.keys.verify(&h.token, now_unix()).map_err(err)?;
    let (num, id) = sfu.open_session(conn, tx);
    tracing::info!(%issuer, session = num, "signaling server connected");
    Ok((num, answer(&id)))
}

#[cfg(test)]
mod select_stream_tests {
    use super::*;

    fn bound(v: Value) -> Result<(Option<usize>, Option<u8>), Failure> {
        select_stream_bound(v.as_object().expect("object"))
    }

    #[test]
    fn substream_and_temporal_are_bounds_and_out_of_range_values_are_refused() {
        assert_eq!(
            bound(json!({"substream": 0, "temporal": 2})),
            Ok((Some(0), Some(2)))
        );
        assert_eq!(bound(json!({"substream": 2})), Ok((Some(2), None)));
        assert_eq!(bound(json!({"temporal": 0})), Ok((None, Some(0))));
        assert_eq!(bound(json!({})), Ok((None, None)));
        assert_eq!(
            bound(json!({"substream": null, "temporal": null})),
            Ok((None, None))
        );
        assert!(bound(json!({"substream": 3})).is_err());
        assert!(bound(json!({"substream": -1})).is_err());
        assert!(bound(json!({"substream": "1"})).is_err());
        let e = bound(json!({"substream": 1, "temporal": 5})).expect_err("refused");
        assert!(e.1.contains("payload.temporal must be 0, 1 or 2"), "{e:?}");
    }
}
