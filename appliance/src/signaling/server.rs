//! The running signaling server: the shared state behind every connection and HTTP request,
//! and the handling of each client frame once it is parsed.
//!
//! It owns the [`Hub`] (behind a mutex that is never held across an await), the registry of live
//! connections (a bounded queue per session, plus frames parked while a session waits for its
//! client to resume), the backends, the Nextcloud client, the session-id codec and the throttle.
//! Calls to Nextcloud happen here, outside the hub lock; the hub's answers ([`Out`]) are
//! delivered by [`Server::apply`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::api::{self, ApiError, ClientMessage};
use super::backend_client::{self, BackendClient};
use super::backends::{Backend, Backends, base_url};
use super::builtin::{BUILTIN_ID, BuiltinBackend};
use super::checksum;
use super::hub::{BackendCall, ClientType, Hub, NewSession, Out, Sid, Target};
use super::jwt;
use super::nextcloud::{NextcloudClient, signaling_backend_url};
use super::proxy_client::{
    self, MEDIA_AUDIO, MEDIA_SCREEN, MEDIA_VIDEO, Owner, ProxyClient, SfuHandle,
};
use super::session_id::{SessionIdCodec, SessionIdData};
use super::throttle::Throttle;
use crate::config::SignalingConfig;

/// Frames queued for one connection before its senders wait.
pub const QUEUE_FRAMES: usize = 1024;
/// Frames kept for a disconnected session until it resumes.
const PARKED_FRAMES: usize = 1000;
/// How long a sender waits for a slow receiver before that receiver is dropped.
const SLOW_RECEIVER: Duration = Duration::from_secs(10);

/// `message` data types that go to the SFU when the recipient is a session (reference §1.6).
const SFU_TYPES: &[&str] = &[
    "offer",
    "answer",
    "candidate",
    "endOfCandidates",
    "requestoffer",
    "sendoffer",
    "selectStream",
    "unshareScreen",
];

/// How long a dial-out request waits for the internal client's answer (upstream
/// `startDialoutTimeout`).
const DIALOUT_TIMEOUT: Duration = Duration::from_secs(10);

/// Upstream waits this long after `unshareScreen` before it closes the screen publisher.
const UNSHARE_SCREEN_DELAY: Duration = Duration::from_secs(1);

fn client_not_found() -> ApiError {
    ApiError::new(
        "client_not_found",
        "No MCU client found to send message to.",
    )
}

/// What a connection's writer task is asked to do.
#[derive(Debug, Clone)]
pub enum Outbound {
    Text(Arc<str>),
    Close,
}

struct Conn {
    id: u64,
    tx: mpsc::Sender<Outbound>,
}

/// Per-message counters for `/metrics`.
#[derive(Default)]
pub struct Counters {
    pub messages: Mutex<HashMap<String, u64>>,
    pub backend_requests: AtomicU64,
    pub backend_errors: AtomicU64,
    pub bruteforce: AtomicU64,
}

pub struct Server {
    pub config: SignalingConfig,
    pub backends: Backends,
    pub nextcloud: NextcloudClient,
    pub builtin: Option<Arc<BuiltinBackend>>,
    /// The SFU client (`signaling.sfu_url`), if an SFU is configured.
    pub proxy: Option<Arc<ProxyClient>>,
    pub codec: SessionIdCodec,
    pub internal_secret: Vec<u8>,
    pub turn_secret: Vec<u8>,
    /// The box's TURN port (`[turn] port`) for the meeting page's ICE servers; `None` = no TURN.
    pub turn_port: Option<u16>,
    hub: Mutex<Hub>,
    conns: Mutex<HashMap<Sid, Conn>>,
    parked: Mutex<HashMap<Sid, Vec<Arc<str>>>>,
    throttle: Mutex<Throttle>,
    /// Dial-out requests waiting for their internal client's answer: message id → (client, answer).
    dialouts: Mutex<HashMap<String, (Sid, tokio::sync::oneshot::Sender<Value>)>>,
    next_conn: AtomicU64,
    pub counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What a connection knows about itself.
pub struct ConnState {
    pub id: u64,
    pub tx: mpsc::Sender<Outbound>,
    pub sid: Option<Sid>,
    pub ip: IpAddr,
}

impl Server {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: SignalingConfig,
        backends: Backends,
        nextcloud: NextcloudClient,
        builtin: Option<Arc<BuiltinBackend>>,
        proxy: Option<Arc<ProxyClient>>,
        codec: SessionIdCodec,
        internal_secret: Vec<u8>,
        turn_secret: Vec<u8>,
        turn_port: Option<u16>,
    ) -> Self {
        Self {
            config,
            backends,
            nextcloud,
            builtin,
            proxy,
            codec,
            internal_secret,
            turn_secret,
            turn_port,
            hub: Mutex::new(Hub::new()),
            conns: Mutex::new(HashMap::new()),
            parked: Mutex::new(HashMap::new()),
            throttle: Mutex::new(Throttle::default()),
            dialouts: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            counters: Counters::default(),
        }
    }

    /// Who answers `backend`'s requests: the built-in backend in-process, or its Nextcloud.
    pub fn client_for(&self, backend: &Backend) -> &dyn BackendClient {
        match &self.builtin {
            Some(b) if backend.id == BUILTIN_ID => b.as_ref(),
            _ => &self.nextcloud,
        }
    }

    pub fn hub(&self) -> MutexGuard<'_, Hub> {
        lock(&self.hub)
    }

    pub fn new_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    pub fn count_message(&self, kind: &str) {
        let mut m = lock(&self.counters.messages);
        let key = if matches!(
            kind,
            "hello" | "bye" | "room" | "message" | "control" | "internal" | "transient"
        ) {
            kind
        } else {
            "unknown"
        };
        *m.entry(key.to_string()).or_insert(0) += 1;
    }

    /// Delivers what the hub asked for: frames in order, then closes, then calls to Nextcloud.
    pub async fn apply(self: &Arc<Self>, out: Out) {
        for (sid, text) in out.frames {
            let tx = lock(&self.conns).get(&sid).map(|c| c.tx.clone());
            match tx {
                Some(tx) => {
                    if tokio::time::timeout(SLOW_RECEIVER, tx.send(Outbound::Text(text)))
                        .await
                        .is_err()
                    {
                        tracing::info!(sid, "dropping a receiver that does not read");
                        let _ = tx.try_send(Outbound::Close);
                    }
                }
                None => {
                    let mut parked = lock(&self.parked);
                    if let Some(q) = parked.get_mut(&sid)
                        && q.len() < PARKED_FRAMES
                    {
                        q.push(text);
                    }
                }
            }
        }
        for sid in out.close {
            let conn = lock(&self.conns).remove(&sid);
            lock(&self.parked).remove(&sid);
            if let Some(c) = conn {
                let _ = c.tx.send(Outbound::Close).await;
            }
        }
        if let Some(proxy) = &self.proxy {
            for sid in &out.left {
                let gone = lock(&proxy.clients).remove_session(*sid);
                for (client_id, publisher) in gone {
                    proxy.delete(client_id, publisher);
                }
            }
        }
        for call in out.backend {
            let me = self.clone();
            tokio::spawn(async move { me.backend_call(call).await });
        }
    }

    async fn backend_call(&self, call: BackendCall) {
        match call {
            BackendCall::RoomLeave {
                backend,
                url,
                room,
                user_id,
                room_session_id,
            } => {
                let Some(b) = self.backends.by_id(&backend).cloned() else {
                    return;
                };
                self.counters
                    .backend_requests
                    .fetch_add(1, Ordering::Relaxed);
                let client = self.client_for(&b);
                if let Err(e) =
                    backend_client::room(client, &b, &url, &room, &user_id, &room_session_id, true)
                        .await
                {
                    self.counters.backend_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(room, error = %e, "room leave request failed");
                }
            }
        }
    }

    async fn send_to(&self, conn: &ConnState, v: Value) {
        let _ = conn.tx.send(Outbound::Text(Arc::from(v.to_string()))).await;
    }

    pub fn throttled(&self, ip: IpAddr, action: &'static str) -> bool {
        let allowed = lock(&self.throttle).allowed(ip, action, Instant::now());
        if !allowed {
            self.counters.bruteforce.fetch_add(1, Ordering::Relaxed);
        }
        !allowed
    }

    pub fn failed_attempt(&self, ip: IpAddr, action: &'static str) {
        lock(&self.throttle).failed(ip, action, Instant::now());
    }

    /// The connection ended: a session stays resumable for the resume window.
    pub fn connection_closed(&self, conn: &ConnState) {
        let Some(sid) = conn.sid else { return };
        let mut conns = lock(&self.conns);
        if conns.get(&sid).is_some_and(|c| c.id == conn.id) {
            conns.remove(&sid);
            drop(conns);
            let mut hub = self.hub();
            if hub.session(sid).is_some() {
                hub.disconnected(sid, Instant::now());
                lock(&self.parked).insert(sid, Vec::new());
            }
        }
    }

    /// Handles one text frame of a connection.
    pub async fn handle_frame(self: &Arc<Self>, conn: &mut ConnState, text: &str) {
        let msg: ClientMessage = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => {
                self.send_to(
                    conn,
                    ApiError::new("invalid_format", format!("Invalid data format: {e}"))
                        .to_json(None),
                )
                .await;
                return;
            }
        };
        self.count_message(&msg.kind);
        let id = msg.id.clone();
        let id = id.as_deref();
        let Some(sid) = conn.sid else {
            if msg.kind != "hello" {
                self.send_to(
                    conn,
                    ApiError::new("hello_expected", "Expected Hello request.").to_json(id),
                )
                .await;
                return;
            }
            if let Err(e) = self.hello(conn, &msg).await {
                self.send_to(conn, e.to_json(id)).await;
            }
            return;
        };
        let result = match msg.kind.as_str() {
            // Upstream ignores a second hello on an authenticated connection.
            "hello" => Ok(()),
            "bye" => {
                self.send_to(conn, api::bye("", id)).await;
                let out = self.hub().remove_session(sid);
                lock(&self.conns).remove(&sid);
                self.apply(out).await;
                let _ = conn.tx.send(Outbound::Close).await;
                conn.sid = None;
                Ok(())
            }
            "room" => self.room(conn, sid, &msg).await,
            "message" | "control" => self.message(sid, &msg).await,
            "transient" => self.transient(sid, &msg).await,
            "internal" => self.internal(sid, &msg).await,
            other => Err(ApiError::new(
                "invalid_format",
                format!("Unknown message type {other:?}."),
            )),
        };
        if let Err(e) = result {
            self.send_to(conn, e.to_json(id)).await;
        }
    }

    fn register(&self, conn: &mut ConnState, sid: Sid) {
        let old = lock(&self.conns).insert(
            sid,
            Conn {
                id: conn.id,
                tx: conn.tx.clone(),
            },
        );
        if let Some(old) = old.filter(|o| o.id != conn.id) {
            let bye = Arc::from(api::bye("session_resumed", None).to_string());
            let _ = old.tx.try_send(Outbound::Text(bye));
            let _ = old.tx.try_send(Outbound::Close);
        }
        conn.sid = Some(sid);
    }

    async fn hello(
        self: &Arc<Self>,
        conn: &mut ConnState,
        msg: &ClientMessage,
    ) -> Result<(), ApiError> {
        let id = msg.id.as_deref();
        let hello = msg
            .hello
            .as_ref()
            .ok_or_else(|| ApiError::new("invalid_format", "hello needs a hello object"))?;
        if hello.version != "1.0" && hello.version != "2.0" {
            return Err(ApiError::new(
                "invalid_hello_version",
                "The hello version is not supported.",
            ));
        }
        // Go clients send `"resumeid":""` with a fresh hello.
        if let Some(resume) = hello.resumeid.as_ref().filter(|r| !r.is_empty()) {
            if self.throttled(conn.ip, "resume") {
                return Err(ApiError::new("too_many_requests", "Too many requests."));
            }
            let sid = self.codec.decode_private(resume).ok().map(|d| d.sid);
            let resumed = sid.and_then(|sid| {
                let mut hub = self.hub();
                hub.session(sid).filter(|s| s.private_id == *resume)?;
                hub.resume(sid).ok().map(|_| sid)
            });
            let Some(sid) = resumed else {
                self.failed_attempt(conn.ip, "resume");
                return Err(ApiError::new(
                    "no_such_session",
                    "The session to resume does not exist.",
                ));
            };
            self.register(conn, sid);
            let reply = self.hub().hello_reply(sid, &hello.version, id);
            if let Some(r) = reply {
                self.send_to(conn, r).await;
            }
            let parked = lock(&self.parked).remove(&sid).unwrap_or_default();
            for f in parked {
                let _ = conn.tx.send(Outbound::Text(f)).await;
            }
            return Ok(());
        }
        if self.throttled(conn.ip, "hello") {
            return Err(ApiError::new("too_many_requests", "Too many requests."));
        }
        let result = self.authenticate(hello).await;
        let (backend, _url, new) = match result {
            Ok(x) => x,
            Err(e) => {
                if matches!(
                    e.code.as_str(),
                    "auth_failed"
                        | "invalid_token"
                        | "invalid_ticket"
                        | "invalid_backend"
                        | "token_expired"
                        | "token_not_valid_yet"
                ) {
                    self.failed_attempt(conn.ip, "hello");
                }
                return Err(e);
            }
        };
        if backend.session_limit > 0
            && self.hub().backend_session_count(&backend.id) >= backend.session_limit as usize
            && new.client_type == ClientType::Client
        {
            return Err(ApiError::new(
                "session_limit_exceeded",
                "Too many sessions connected for this backend.",
            ));
        }
        let sid = {
            let mut hub = self.hub();
            let sid = hub.next_sid();
            let data = SessionIdData {
                sid,
                backend_id: backend.id.clone(),
            };
            let now = unix_now();
            let public = self
                .codec
                .encode_public(&data, now)
                .map_err(|e| ApiError::new("internal_error", e.to_string()))?;
            let private = self
                .codec
                .encode_private(&data, now)
                .map_err(|e| ApiError::new("internal_error", e.to_string()))?;
            hub.add_session(sid, public, private, new, Instant::now());
            sid
        };
        self.register(conn, sid);
        let reply = self.hub().hello_reply(sid, &hello.version, id);
        if let Some(r) = reply {
            self.send_to(conn, r).await;
        }
        Ok(())
    }

    /// Checks a hello's credentials: (backend, Nextcloud URL for later requests, the session).
    async fn authenticate(
        &self,
        hello: &api::HelloClient,
    ) -> Result<(Backend, String, NewSession), ApiError> {
        let auth = hello
            .auth
            .as_ref()
            .ok_or_else(|| ApiError::new("invalid_format", "hello needs auth"))?;
        let params = auth.params.clone().unwrap_or(Value::Null);
        let kind = auth.kind.as_deref().unwrap_or("client");
        let invalid_backend =
            || ApiError::new("invalid_backend", "The backend URL is not allowed.");
        match kind {
            "internal" => {
                let random = params["random"].as_str().unwrap_or("");
                let token = params["token"].as_str().unwrap_or("");
                let backend_url = params["backend"].as_str().unwrap_or("");
                if random.len() < checksum::MIN_RANDOM_LEN
                    || !checksum::verify(random, b"", &self.internal_secret, token)
                {
                    return Err(ApiError::new("auth_failed", "Authentication check failed."));
                }
                let backend = self
                    .backends
                    .for_url(backend_url)
                    .cloned()
                    .ok_or_else(invalid_backend)?;
                let url = signaling_backend_url(&base_url(backend_url));
                Ok((
                    backend,
                    url.clone(),
                    NewSession {
                        backend: String::new(),
                        backend_url: url.clone(),
                        client_type: ClientType::Internal,
                        user_id: String::new(),
                        user_data: None,
                        features: hello.features.clone(),
                    },
                ))
            }
            "client" => {
                let url = auth
                    .url
                    .clone()
                    .filter(|u| !u.is_empty() && u.len() <= 2048)
                    .ok_or_else(|| ApiError::new("invalid_format", "hello needs auth.url"))?;
                let backend = self
                    .backends
                    .for_url(&url)
                    .cloned()
                    .ok_or_else(invalid_backend)?;
                let client = self.client_for(&backend);
                let (user_id, user_data) = if hello.version == "2.0" {
                    let token = params["token"].as_str().ok_or_else(jwt::invalid_token)?;
                    let caps = client.capabilities(&url, false).await;
                    let key = match caps.hello_v2_key.clone() {
                        Some(k) => Some(k),
                        None => client.capabilities(&url, true).await.hello_v2_key.clone(),
                    };
                    let c = jwt::verify(token, key.as_deref(), unix_now())?;
                    (c.user_id, c.user_data)
                } else {
                    self.counters
                        .backend_requests
                        .fetch_add(1, Ordering::Relaxed);
                    backend_client::auth(client, &backend, &url, &params)
                        .await
                        .inspect_err(|_| {
                            self.counters.backend_errors.fetch_add(1, Ordering::Relaxed);
                        })?
                };
                Ok((
                    backend,
                    url.clone(),
                    NewSession {
                        backend: String::new(),
                        backend_url: url.clone(),
                        client_type: ClientType::Client,
                        user_id,
                        user_data,
                        features: hello.features.clone(),
                    },
                ))
            }
            "federation" => Err(ApiError::new(
                "federation_unsupported",
                "Federated sessions are not supported by this server yet.",
            )),
            _ => Err(ApiError::new(
                "invalid_client_type",
                "The client type is not supported.",
            )),
        }
        .map(|(b, url, mut n)| {
            n.backend = b.id.clone();
            (b, url, n)
        })
    }

    async fn room(
        self: &Arc<Self>,
        conn: &mut ConnState,
        sid: Sid,
        msg: &ClientMessage,
    ) -> Result<(), ApiError> {
        let id = msg.id.as_deref();
        let room = msg
            .room
            .as_ref()
            .ok_or_else(|| ApiError::new("invalid_format", "room needs a room object"))?;
        if room.roomid.is_empty() {
            let out = self.hub().leave_room(sid);
            self.apply(out).await;
            self.send_to(
                conn,
                api::with_id(json!({"type":"room","room":{"roomid":""}}), id),
            )
            .await;
            return Ok(());
        }
        if room.roomid.len() > 256 {
            return Err(ApiError::new("invalid_format", "room id is too long"));
        }
        if room.federation.is_some() {
            return Err(ApiError::new(
                "federation_unsupported",
                "Federated rooms are not supported by this server yet.",
            ));
        }
        if let Some(e) = self.hub().already_joined(sid, &room.roomid) {
            return Err(e);
        }
        let (backend_id, url, user_id, client_type) = {
            let hub = self.hub();
            let s = hub
                .session(sid)
                .ok_or_else(|| ApiError::new("no_such_session", "session is gone"))?;
            (
                s.backend.clone(),
                s.backend_url.clone(),
                s.user_id.clone(),
                s.client_type,
            )
        };
        let backend = self
            .backends
            .by_id(&backend_id)
            .cloned()
            .ok_or_else(|| ApiError::new("invalid_backend", "backend is gone"))?;
        let talk_session = room.sessionid.clone().unwrap_or_default();
        let (properties, permissions) = if client_type == ClientType::Client {
            self.counters
                .backend_requests
                .fetch_add(1, Ordering::Relaxed);
            let client = self.client_for(&backend);
            let r = backend_client::room(
                client,
                &backend,
                &url,
                &room.roomid,
                &user_id,
                &talk_session,
                false,
            )
            .await
            .inspect_err(|_| {
                self.counters.backend_errors.fetch_add(1, Ordering::Relaxed);
            })?;
            let perms = r["permissions"].as_array().map(|a| {
                a.iter()
                    .filter_map(|p| p.as_str().map(str::to_string))
                    .collect()
            });
            (r["properties"].clone(), perms)
        } else {
            (Value::Null, None)
        };
        // Only in the join reply, and left out when there is no cap at all, as upstream.
        let bandwidth = (backend.max_stream_bitrate != 0 || backend.max_screen_bitrate != 0)
            .then(|| json!({"maxstreambitrate": backend.max_stream_bitrate, "maxscreenbitrate": backend.max_screen_bitrate}));
        let rsid = (!talk_session.is_empty()).then_some(talk_session);
        let out = self.hub().join_room(
            sid,
            &room.roomid,
            rsid,
            properties,
            permissions,
            bandwidth,
            id,
        );
        self.apply(out).await;
        Ok(())
    }

    fn target(&self, r: &api::Recipient) -> Result<Target, ApiError> {
        match r.kind.as_str() {
            "session" => {
                let public = r.sessionid.as_deref().unwrap_or("");
                // Fast path: the id exactly as issued (what clients send). It skips the HMAC and
                // AES of a decode, ≈10 % of the server's CPU under message load (perf,
                // benches/signaling).
                if let Some(sid) = self.hub().sid_of_public(public) {
                    return Ok(Target::Session(Some(sid)));
                }
                // Any encoding of the session's data names it (ids carry a random IV), so the
                // session is found by the decoded number, not by the exact string we issued.
                let data = self.codec.decode_public(public).map_err(|_| {
                    ApiError::new("no_such_session", "The recipient session id is not valid.")
                })?;
                let hub = self.hub();
                let found = hub
                    .session(data.sid)
                    .filter(|s| s.backend == data.backend_id)
                    .map(|s| s.sid);
                Ok(Target::Session(found))
            }
            "user" => Ok(Target::User(r.userid.clone().unwrap_or_default())),
            "room" => Ok(Target::Room),
            "call" => Ok(Target::Call),
            other => Err(ApiError::new(
                "invalid_format",
                format!("Unsupported recipient type {other:?}."),
            )),
        }
    }

    async fn message(self: &Arc<Self>, sid: Sid, msg: &ClientMessage) -> Result<(), ApiError> {
        let control = msg.kind == "control";
        let m = if control {
            msg.control.as_ref()
        } else {
            msg.message.as_ref()
        }
        .ok_or_else(|| {
            ApiError::new(
                "invalid_format",
                format!("{} needs a {} object", msg.kind, msg.kind),
            )
        })?;
        let target = self.target(&m.recipient)?;
        // With an SFU connected, offers, answers, candidates and the like to a session are
        // the SFU's (reference §1.6); without one they pass through like any data.
        if let (false, Target::Session(to), Some(kind)) = (
            control,
            &target,
            m.data["type"]
                .as_str()
                .filter(|k| SFU_TYPES.contains(k) && self.sfu_active()),
        ) {
            let to = to.ok_or_else(client_not_found)?;
            return self
                .sfu_message(sid, to, kind, &m.data, msg.id.clone())
                .await;
        }
        let out = self.hub().route(sid, target, m, control)?;
        self.apply(out).await;
        Ok(())
    }

    async fn transient(self: &Arc<Self>, sid: Sid, msg: &ClientMessage) -> Result<(), ApiError> {
        let t = msg
            .transient
            .as_ref()
            .ok_or_else(|| ApiError::new("invalid_format", "transient needs a transient object"))?;
        let out = self
            .hub()
            .transient(sid, t, Instant::now(), msg.id.as_deref())?;
        self.apply(out).await;
        Ok(())
    }

    async fn internal(self: &Arc<Self>, sid: Sid, msg: &ClientMessage) -> Result<(), ApiError> {
        let i = msg
            .internal
            .as_ref()
            .ok_or_else(|| ApiError::new("invalid_format", "internal needs an internal object"))?;
        let is_internal = self
            .hub()
            .session(sid)
            .is_some_and(|s| s.client_type == ClientType::Internal);
        if !is_internal {
            return Err(ApiError::new(
                "not_allowed",
                "Only internal clients may send internal messages.",
            ));
        }
        let out = match i.kind.as_str() {
            "addsession" => {
                let a = i
                    .addsession
                    .as_ref()
                    .ok_or_else(|| ApiError::new("invalid_format", "addsession missing"))?;
                let mut hub = self.hub();
                let backend = hub
                    .session(sid)
                    .map(|s| s.backend.clone())
                    .unwrap_or_default();
                let vsid = hub.next_sid();
                let public = self
                    .codec
                    .encode_public(
                        &SessionIdData {
                            sid: vsid,
                            backend_id: backend,
                        },
                        unix_now(),
                    )
                    .map_err(|e| ApiError::new("internal_error", e.to_string()))?;
                hub.add_virtual(
                    sid,
                    vsid,
                    public,
                    a.sessionid.clone(),
                    &a.roomid,
                    a.userid.clone().unwrap_or_default(),
                    a.user.clone(),
                    a.flags.unwrap_or(0),
                    a.incall.unwrap_or(super::hub::VIRTUAL_IN_CALL_DEFAULT),
                    Instant::now(),
                )?
            }
            "updatesession" => {
                let u = i
                    .updatesession
                    .as_ref()
                    .ok_or_else(|| ApiError::new("invalid_format", "updatesession missing"))?;
                self.hub()
                    .update_virtual(sid, &u.sessionid, u.flags, u.incall)?
            }
            "removesession" => {
                let r = i
                    .removesession
                    .as_ref()
                    .ok_or_else(|| ApiError::new("invalid_format", "removesession missing"))?;
                self.hub().remove_virtual(sid, &r.sessionid)?
            }
            "incall" => {
                let c = i
                    .incall
                    .as_ref()
                    .ok_or_else(|| ApiError::new("invalid_format", "incall missing"))?;
                self.hub().internal_in_call(sid, c.incall)
            }
            "dialout" => {
                let d = i.dialout.clone().unwrap_or(Value::Null);
                // The answer to a dial-out request we sent goes to the waiting backend request;
                // an error answer goes nowhere else.
                if let Some(id) = msg.id.as_deref() {
                    let waiter = {
                        let mut w = lock(&self.dialouts);
                        match w.get(id) {
                            Some((owner, _)) if *owner == sid => w.remove(id),
                            _ => None,
                        }
                    };
                    if let Some((_, tx)) = waiter {
                        let _ = tx.send(d.clone());
                        if d["type"] == "error" {
                            return Ok(());
                        }
                    }
                }
                let room = d["roomid"].as_str().unwrap_or("").to_string();
                let mut hub = self.hub();
                let backend = hub
                    .session(sid)
                    .map(|s| s.backend.clone())
                    .unwrap_or_default();
                match (d["type"].as_str(), d["status"]["callid"].as_str()) {
                    (Some("status"), Some(call)) => hub.server_transient(
                        &backend,
                        &room,
                        &format!("callstatus_{call}"),
                        d["status"].clone(),
                    ),
                    _ => Out::default(),
                }
            }
            other => {
                return Err(ApiError::new(
                    "invalid_format",
                    format!("Unknown internal type {other:?}."),
                ));
            }
        };
        self.apply(out).await;
        Ok(())
    }

    fn sfu_active(&self) -> bool {
        self.proxy.is_some() && self.hub().sfu_connected()
    }

    /// Sends an SFU-originated `message` (answer, offer, candidate) to session `to`, as coming
    /// from session `from`, in the shape Talk clients expect (upstream `sendMcuMessageResponse`).
    pub async fn send_sfu_frame(
        self: &Arc<Self>,
        to: Sid,
        from: Sid,
        kind: &str,
        room_type: &str,
        payload: Value,
        sfu_sid: &str,
    ) {
        let (to_public, from_public) = {
            let hub = self.hub();
            match (hub.session(to), hub.session(from)) {
                (Some(t), Some(f)) => (t.public_id.clone(), f.public_id.clone()),
                _ => return,
            }
        };
        let frame = json!({"type":"message","message":{
            "sender":{"type":"session","sessionid":from_public},
            "data":{"to":to_public,"from":from_public,"type":kind,"roomType":room_type,"payload":payload,"sid":sfu_sid},
        }});
        let mut out = Out::default();
        out.frames.push((to, Arc::from(frame.to_string())));
        self.apply(out).await;
    }

    /// Something the SFU sent on its own for one of its clients: a trickled candidate or an
    /// updated offer, delivered to the session that owns the client.
    pub async fn sfu_to_client(self: &Arc<Self>, owner: &Owner, kind: &str, payload: Value) {
        let Some(proxy) = &self.proxy else { return };
        let (to, from, stream, handle) = {
            let clients = lock(&proxy.clients);
            match owner {
                Owner::Publisher { session, stream } => (
                    *session,
                    *session,
                    stream.clone(),
                    clients.publisher(*session, stream).cloned(),
                ),
                Owner::Subscriber {
                    session,
                    publisher,
                    stream,
                } => (
                    *session,
                    *publisher,
                    stream.clone(),
                    clients.subscriber(*session, *publisher, stream).cloned(),
                ),
            }
        };
        if let Some(h) = handle {
            self.send_sfu_frame(to, from, kind, &stream, payload, &h.sid)
                .await;
        }
    }

    /// The SFU heard a camera/microphone publisher start or stop speaking (its `speaking` /
    /// `stopped-speaking` events, a talkbox extension): the others in the publisher's room get
    /// a message from it with `{"type":"speaking"}` or `{"type":"stoppedSpeaking"}`, the names
    /// Talk clients send each other over the data channel. Upstream has no server-side speaking
    /// event; a Talk client keeps learning it from the data channel (which the SFU relays) and
    /// ignores message types it does not handle; the meeting page uses these.
    pub async fn sfu_speaking(self: &Arc<Self>, owner: &Owner, speaking: bool) {
        let Owner::Publisher { session, stream } = owner else {
            return;
        };
        if stream == "screen" {
            return;
        }
        let (from_public, mates) = {
            let hub = self.hub();
            let Some(s) = hub.session(*session) else {
                return;
            };
            (s.public_id.clone(), hub.room_mates(*session))
        };
        let kind = if speaking {
            "speaking"
        } else {
            "stoppedSpeaking"
        };
        let frame: Arc<str> = Arc::from(
            json!({"type":"message","message":{
                "sender":{"type":"session","sessionid":from_public},
                "data":{"type":kind,"from":from_public,"roomType":stream},
            }})
            .to_string(),
        );
        let mut out = Out::default();
        for to in mates {
            out.frames.push((to, frame.clone()));
        }
        self.apply(out).await;
    }

    /// May `sid` send media of this kind (upstream `IsAllowedToSend`)?
    fn may_send(&self, sid: Sid, room_type: &str) -> bool {
        let hub = self.hub();
        let Some(s) = hub.session(sid) else {
            return false;
        };
        if room_type == "screen" {
            s.has_permission("publish-screen")
        } else {
            s.has_permission("publish-media")
                || s.has_permission("publish-audio")
                || s.has_permission("publish-video")
        }
    }

    /// Closes publishers whose session lost the permission to publish them (Talk changed the
    /// participant's permissions), as upstream does.
    fn close_forbidden_publishers(&self) {
        let Some(proxy) = &self.proxy else { return };
        let publishers = lock(&proxy.clients).publishers();
        for (session, stream, client_id) in publishers {
            if !self.may_send(session, &stream) {
                tracing::info!(
                    session,
                    stream,
                    "publishing no longer allowed; closing the publisher"
                );
                lock(&proxy.clients).remove(&client_id);
                proxy.delete(client_id, true);
            }
        }
    }

    /// A Talk client's SFU message (`data.type` in [`SFU_TYPES`]) from `sid` to session `to`.
    async fn sfu_message(
        self: &Arc<Self>,
        sid: Sid,
        to: Sid,
        kind: &str,
        data: &Value,
        request_id: Option<String>,
    ) -> Result<(), ApiError> {
        let proxy = self.proxy.clone().ok_or_else(client_not_found)?;
        let room_type = data["roomType"].as_str().unwrap_or("video").to_string();
        if room_type != "video" && room_type != "screen" {
            return Err(ApiError::new(
                "invalid_format",
                "roomType must be video or screen.",
            ));
        }
        let client_sid = data["sid"].as_str().unwrap_or("").to_string();
        match kind {
            "offer" => {
                let sdp = data["payload"]["sdp"]
                    .as_str()
                    .ok_or_else(|| ApiError::new("no_sdp", "The offer has no SDP."))?;
                let media = if room_type == "screen" {
                    MEDIA_SCREEN
                } else {
                    proxy_client::offered_media(sdp)
                };
                let (allowed, backend) = {
                    let hub = self.hub();
                    let s = hub.session(sid).ok_or_else(client_not_found)?;
                    (
                        super::hub::publish_allowed(
                            s,
                            &room_type,
                            media & MEDIA_AUDIO != 0,
                            media & MEDIA_VIDEO != 0,
                        ),
                        s.backend.clone(),
                    )
                };
                if !allowed {
                    return Err(ApiError::new("not_allowed", "Not allowed to publish."));
                }
                let existing = lock(&proxy.clients).publisher(sid, &room_type).cloned();
                let handle = match existing {
                    Some(h) => h,
                    None => {
                        let max = self
                            .backends
                            .by_id(&backend)
                            .map(|b| {
                                if room_type == "screen" {
                                    b.max_screen_bitrate
                                } else {
                                    b.max_stream_bitrate
                                }
                            })
                            .unwrap_or(0);
                        let asked = data["bitrate"].as_u64().unwrap_or(0);
                        let bitrate = if asked == 0 || (max > 0 && asked > max) {
                            max
                        } else {
                            asked
                        };
                        let mut settings = json!({"bitrate": bitrate, "mediatypes": media});
                        for (from, to) in [
                            ("audiocodec", "audiocodec"),
                            ("videocodec", "videocodec"),
                            ("vp9profile", "vp9_profile"),
                            ("h264profile", "h264_profile"),
                        ] {
                            if let Some(v) = data[from].as_str().filter(|v| !v.is_empty()) {
                                settings[to] = Value::String(v.to_string());
                            }
                        }
                        let answer = proxy
                            .command(json!({"type":"create-publisher","sid":client_sid,"streamType":room_type,
                                "bitrate":bitrate,"mediatypes":media,"publisherSettings":settings}))
                            .await?;
                        let client_id = answer["id"]
                            .as_str()
                            .filter(|i| !i.is_empty())
                            .ok_or_else(|| {
                                ApiError::new("processing_failed", "The SFU gave no publisher id.")
                            })?;
                        let h = SfuHandle {
                            client_id: client_id.to_string(),
                            sid: client_sid.clone(),
                        };
                        let old = lock(&proxy.clients).add(
                            Owner::Publisher {
                                session: sid,
                                stream: room_type.clone(),
                            },
                            h.clone(),
                        );
                        if let Some(old) = old {
                            proxy.delete(old.client_id, true);
                        }
                        h
                    }
                };
                let answer = proxy
                    .payload(
                        "offer",
                        &handle.client_id,
                        Some(&client_sid),
                        Some(&data["payload"]),
                    )
                    .await?;
                if answer["type"] == "answer" {
                    self.send_sfu_frame(sid, sid, "answer", &room_type, answer, &handle.sid)
                        .await;
                }
                Ok(())
            }
            "answer" | "candidate" | "endOfCandidates" | "selectStream" => {
                if kind == "selectStream" && to == sid {
                    return Ok(());
                }
                let handle = if to == sid {
                    if !self.may_send(sid, &room_type) {
                        return Err(ApiError::new(
                            "not_allowed",
                            "Not allowed to send candidate.",
                        ));
                    }
                    lock(&proxy.clients).publisher(sid, &room_type).cloned()
                } else {
                    lock(&proxy.clients)
                        .subscriber(sid, to, &room_type)
                        .cloned()
                };
                let handle = handle.ok_or_else(client_not_found)?;
                proxy
                    .payload(
                        kind,
                        &handle.client_id,
                        Some(&client_sid),
                        Some(&data["payload"]),
                    )
                    .await?;
                Ok(())
            }
            "requestoffer" | "sendoffer" => {
                // Subscribing may wait for the SFU; other messages of this client go on.
                let (subscriber, publisher) = if kind == "requestoffer" {
                    (sid, to)
                } else {
                    (to, sid)
                };
                if subscriber == publisher {
                    return Ok(());
                }
                if kind == "requestoffer" && !self.hub().in_same_call(subscriber, publisher) {
                    return Err(ApiError::new(
                        "not_allowed",
                        "Not allowed to request offer.",
                    ));
                }
                if kind == "sendoffer" && !self.may_send(sid, &room_type) {
                    return Err(ApiError::new("not_allowed", "Not allowed to send offer"));
                }
                let me = self.clone();
                let kind = kind.to_string();
                tokio::spawn(async move {
                    let r = me
                        .subscribe(
                            &proxy,
                            subscriber,
                            publisher,
                            &room_type,
                            &kind,
                            &client_sid,
                        )
                        .await;
                    if let Err(e) = r {
                        let mut out = Out::default();
                        out.frames
                            .push((sid, Arc::from(e.to_json(request_id.as_deref()).to_string())));
                        me.apply(out).await;
                    }
                });
                Ok(())
            }
            "unshareScreen" => {
                if to == sid {
                    tokio::spawn(async move {
                        tokio::time::sleep(UNSHARE_SCREEN_DELAY).await;
                        let gone = lock(&proxy.clients)
                            .publisher(sid, "screen")
                            .map(|h| h.client_id.clone());
                        if let Some(id) = gone {
                            lock(&proxy.clients).remove(&id);
                            proxy.delete(id, true);
                        }
                    });
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Gets or creates the subscriber of `subscriber` to `publisher`'s stream and sends the
    /// SFU's offer for it to the subscriber (`requestoffer`, `sendoffer`).
    async fn subscribe(
        self: &Arc<Self>,
        proxy: &Arc<ProxyClient>,
        subscriber: Sid,
        publisher: Sid,
        room_type: &str,
        kind: &str,
        client_sid: &str,
    ) -> Result<(), ApiError> {
        let publisher_id = lock(&proxy.clients)
            .publisher(publisher, room_type)
            .map(|h| h.client_id.clone())
            .ok_or_else(client_not_found)?;
        let existing = lock(&proxy.clients)
            .subscriber(subscriber, publisher, room_type)
            .cloned();
        let handle = match existing {
            Some(h) => h,
            None => {
                let answer = proxy
                    .command(json!({"type":"create-subscriber","streamType":room_type,"publisherId":publisher_id}))
                    .await?;
                let client_id =
                    answer["id"]
                        .as_str()
                        .filter(|i| !i.is_empty())
                        .ok_or_else(|| {
                            ApiError::new("processing_failed", "The SFU gave no subscriber id.")
                        })?;
                let h = SfuHandle {
                    client_id: client_id.to_string(),
                    sid: answer["sid"].as_str().unwrap_or("").to_string(),
                };
                let old = lock(&proxy.clients).add(
                    Owner::Subscriber {
                        session: subscriber,
                        publisher,
                        stream: room_type.to_string(),
                    },
                    h.clone(),
                );
                if let Some(old) = old {
                    proxy.delete(old.client_id, false);
                }
                h
            }
        };
        let offer = proxy
            .payload(kind, &handle.client_id, Some(client_sid), None)
            .await?;
        if offer["type"] == "offer" {
            self.send_sfu_frame(
                subscriber,
                publisher,
                "offer",
                room_type,
                offer,
                &handle.sid,
            )
            .await;
        }
        Ok(())
    }

    /// Periodic work: expiry of sessions and transient data.
    pub async fn tick(self: &Arc<Self>) {
        let out = self.hub().expire(Instant::now());
        let gone: Vec<Sid> = out.close.clone();
        self.apply(out).await;
        let hub = self.hub();
        let mut parked = lock(&self.parked);
        parked.retain(|sid, _| hub.session(*sid).is_some());
        drop(gone);
    }

    /// Keeps Talk sessions alive: `ping` per room, in batches.
    pub async fn ping_backends(self: &Arc<Self>) {
        let entries = self.hub().ping_entries();
        for (backend_id, room, list) in entries {
            let Some(backend) = self.backends.by_id(&backend_id).cloned() else {
                continue;
            };
            let Some(base) = backend.urls.first() else {
                continue;
            };
            let url = signaling_backend_url(base);
            let client = self.client_for(&backend);
            let limit = client
                .capabilities(&url, false)
                .await
                .session_ping_limit
                .unwrap_or(50);
            for chunk in list.chunks(limit.max(1)) {
                self.counters
                    .backend_requests
                    .fetch_add(1, Ordering::Relaxed);
                if let Err(e) = backend_client::ping(client, &backend, &url, &room, chunk).await {
                    self.counters.backend_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(room, error = %e, "ping failed");
                }
            }
        }
    }

    pub fn backend_request_allowed(&self, ip: IpAddr) -> bool {
        !self.throttled(ip, "backend")
    }

    pub fn backend_request_failed(&self, ip: IpAddr) {
        self.failed_attempt(ip, "backend");
    }

    /// One authenticated `POST /api/v1/room/{token}` from Nextcloud.
    pub async fn backend_room_request(
        self: &Arc<Self>,
        backend: &Backend,
        room: &str,
        req: &Value,
    ) -> Result<Value, (axum::http::StatusCode, Value)> {
        use axum::http::StatusCode;
        let kind = req["type"].as_str().unwrap_or("");
        let body = &req[kind];
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let b = backend.id.as_str();
        let out = match kind {
            "invite" => self.hub().backend_invite(
                b,
                room,
                &strings(&body["userids"]),
                &strings(&body["alluserids"]),
                &body["properties"],
            ),
            "disinvite" => self.hub().backend_disinvite(
                b,
                room,
                &strings(&body["userids"]),
                &strings(&body["sessionids"]),
                &strings(&body["alluserids"]),
                &body["properties"],
            ),
            "update" => {
                self.hub()
                    .backend_update(b, room, &strings(&body["userids"]), &body["properties"])
            }
            "delete" => self
                .hub()
                .backend_delete(b, room, &strings(&body["userids"])),
            "participants" | "incall" => {
                let out = self.hub().backend_participants(b, room, body);
                self.close_forbidden_publishers();
                out
            }
            "message" => self.hub().backend_message(b, room, &body["data"]),
            "switchto" => {
                let target = body["roomid"].as_str().unwrap_or("").to_string();
                self.hub()
                    .backend_switchto(b, room, &target, &body["sessions"])
            }
            "dialout" => {
                let err = |status: StatusCode, code: &str, message: &str| {
                    Err((
                        status,
                        json!({"type":"dialout","dialout":{"error":{"code":code,"message":message}}}),
                    ))
                };
                if room.is_empty() || !room.bytes().all(|c| c.is_ascii_digit()) {
                    return err(
                        StatusCode::BAD_REQUEST,
                        "invalid_roomid",
                        "The room id must be numeric.",
                    );
                }
                let Some(client) = self.hub().dialout_client(b) else {
                    return err(
                        StatusCode::NOT_FOUND,
                        "no_client_available",
                        "No client is available to dial out.",
                    );
                };
                let id = checksum::new_random();
                let request = json!({"id": id, "type":"internal","internal":{"type":"dialout","dialout":{"roomid":room,"backend":backend.urls.first(),"request":body}}});
                let (tx, rx) = tokio::sync::oneshot::channel();
                lock(&self.dialouts).insert(id.clone(), (client, tx));
                let mut out = Out::default();
                out.frames.push((client, Arc::from(request.to_string())));
                self.apply(out).await;
                let answer = tokio::time::timeout(DIALOUT_TIMEOUT, rx).await;
                lock(&self.dialouts).remove(&id);
                let d = match answer {
                    Ok(Ok(d)) => d,
                    _ => {
                        return err(
                            StatusCode::BAD_GATEWAY,
                            "timeout",
                            "Timeout while waiting for dialout to start.",
                        );
                    }
                };
                return match (d["type"].as_str(), d["status"]["status"].as_str()) {
                    (Some("status"), Some("accepted")) => {
                        Ok(json!({"type":"dialout","dialout":{"callid": d["status"]["callid"]}}))
                    }
                    (Some("error"), _) => Err((
                        StatusCode::BAD_GATEWAY,
                        json!({"type":"dialout","dialout":{"error": d["error"]}}),
                    )),
                    _ => err(
                        StatusCode::BAD_GATEWAY,
                        "unsupported_status",
                        "The dial-out client answered with an unsupported status.",
                    ),
                };
            }
            _ => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    json!({"type":"error","error":{"code":"invalid_request","message":format!("Unsupported request type: {kind}")}}),
                ));
            }
        };
        self.apply(out).await;
        Ok(json!({}))
    }
}
