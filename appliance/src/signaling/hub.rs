//! The signaling state: sessions, rooms, transient data, and who receives what.
//!
//! Sans-I/O: every method takes the current time where it matters and returns an [`Out`] that
//! lists the frames to send (by session), the connections to close and the requests to make to
//! Nextcloud. It never touches a socket, a clock or a backend; `server.rs` does that around it.
//! Authentication (hello) happens before a session reaches the hub; the hub trusts what it is
//! told about a new session.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::api::{self, ApiError, MessageClient, TransientClient};

pub type Sid = u64;

/// How long a disconnected session waits for its client to resume.
pub const RESUME_WINDOW: Duration = Duration::from_secs(30);
/// How long an anonymous session may stay outside a room.
pub const ANONYMOUS_JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Transient keys per room and size of one value, so one client cannot fill the memory.
pub const MAX_TRANSIENT_KEYS: usize = 1000;
pub const MAX_TRANSIENT_VALUE_BYTES: usize = 16 * 1024;

/// In-call flags (upstream `room.go`).
pub const IN_CALL: u32 = 1;
/// Default in-call flags of virtual sessions (in call, with phone).
pub const VIRTUAL_IN_CALL_DEFAULT: u32 = 9;
/// Default in-call flags of internal clients (in call, with audio).
pub const INTERNAL_IN_CALL_DEFAULT: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientType {
    Client,
    Internal,
    Virtual,
}

impl ClientType {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientType::Client => "client",
            ClientType::Internal => "internal",
            ClientType::Virtual => "virtual",
        }
    }
}

/// What the authentication step established about a new session.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub backend: String,
    /// Where this session's backend requests go (its hello `auth.url`, or the backend's).
    pub backend_url: String,
    pub client_type: ClientType,
    pub user_id: String,
    pub user_data: Option<Value>,
    pub features: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Session {
    pub sid: Sid,
    pub public_id: String,
    pub private_id: String,
    pub backend: String,
    pub backend_url: String,
    pub client_type: ClientType,
    pub user_id: String,
    pub user_data: Option<Value>,
    pub features: Vec<String>,
    pub room: Option<String>,
    pub room_session_id: Option<String>,
    /// `None` while Talk has sent no permission list: nothing is restricted.
    pub permissions: Option<Vec<String>>,
    pub in_call: u32,
    pub flags: u32,
    pub connected: bool,
    pub disconnected_at: Option<Instant>,
    pub created: Instant,
    /// Virtual sessions: the internal session that owns them and the id it gave them.
    pub owner: Option<(Sid, String)>,
}

impl Session {
    pub fn has_permission(&self, p: &str) -> bool {
        self.client_type != ClientType::Client
            || self
                .permissions
                .as_ref()
                .is_none_or(|list| list.iter().any(|x| x == p))
    }

    fn has_feature(&self, f: &str) -> bool {
        self.features.iter().any(|x| x == f)
    }

    fn sender(&self, kind: &str) -> Value {
        let mut s = json!({"type": kind, "sessionid": self.public_id});
        if !self.user_id.is_empty() {
            s["userid"] = Value::String(self.user_id.clone());
        }
        s
    }

    fn join_entry(&self) -> Value {
        let mut e = json!({"sessionid": self.public_id, "userid": self.user_id});
        if let Some(u) = &self.user_data {
            e["user"] = u.clone();
        }
        if let Some(r) = &self.room_session_id {
            e["roomsessionid"] = Value::String(r.clone());
        }
        if !self.features.is_empty() {
            e["features"] = json!(self.features);
        }
        e
    }
}

#[derive(Debug, Clone)]
struct TransientEntry {
    value: Value,
    expires: Option<Instant>,
}

#[derive(Debug, Default)]
pub struct Room {
    pub properties: Value,
    pub sessions: BTreeSet<Sid>,
    transient: HashMap<String, TransientEntry>,
}

/// A request to Nextcloud that a state change calls for.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendCall {
    /// `room` with `action: leave` for a Talk session that left or expired.
    RoomLeave {
        backend: String,
        url: String,
        room: String,
        user_id: String,
        room_session_id: String,
    },
}

/// What a hub call wants done.
#[derive(Debug, Default)]
pub struct Out {
    pub frames: Vec<(Sid, Arc<str>)>,
    /// Connections to close after their frames are sent, with the `bye` reason already queued.
    pub close: Vec<Sid>,
    pub backend: Vec<BackendCall>,
    /// Sessions that left their room or ended: their SFU publishers and subscribers go.
    pub left: Vec<Sid>,
}

impl Out {
    fn send(&mut self, sid: Sid, v: &Value) {
        self.frames.push((sid, Arc::from(v.to_string())));
    }
    fn broadcast(&mut self, sids: impl IntoIterator<Item = Sid>, v: &Value) {
        let text: Arc<str> = Arc::from(v.to_string());
        for sid in sids {
            self.frames.push((sid, text.clone()));
        }
    }
    pub fn merge(&mut self, other: Out) {
        self.frames.extend(other.frames);
        self.close.extend(other.close);
        self.backend.extend(other.backend);
        self.left.extend(other.left);
    }
}

/// Talk sessions of one room to keep alive: (backend, room, [(user id, Talk session id)]).
pub type PingBatch = (String, String, Vec<(String, String)>);

/// Where a message goes, resolved from a public session id by the caller (which owns the codec).
#[derive(Debug, Clone)]
pub enum Target {
    Session(Option<Sid>),
    User(String),
    Room,
    Call,
}

type RoomKey = (String, String);

/// All sessions and rooms of this server.
#[derive(Debug, Default)]
pub struct Hub {
    sessions: HashMap<Sid, Session>,
    rooms: HashMap<RoomKey, Room>,
    by_public: HashMap<String, Sid>,
    next_sid: Sid,
    sfu_connected: bool,
}

impl Hub {
    pub fn new() -> Self {
        Self {
            next_sid: 1,
            ..Self::default()
        }
    }

    pub fn session(&self, sid: Sid) -> Option<&Session> {
        self.sessions.get(&sid)
    }

    pub fn sid_of_public(&self, public_id: &str) -> Option<Sid> {
        self.by_public.get(public_id).copied()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Sessions per (backend, client type), for `/metrics`.
    pub fn session_counts(&self) -> HashMap<(String, &'static str), i64> {
        let mut m = HashMap::new();
        for s in self.sessions.values() {
            *m.entry((s.backend.clone(), s.client_type.as_str()))
                .or_insert(0) += 1;
        }
        m
    }

    pub fn backend_session_count(&self, backend: &str) -> usize {
        self.sessions
            .values()
            .filter(|s| s.backend == backend && s.client_type == ClientType::Client)
            .count()
    }

    pub fn set_sfu_connected(&mut self, connected: bool) {
        self.sfu_connected = connected;
    }

    pub fn sfu_connected(&self) -> bool {
        self.sfu_connected
    }

    /// Reserves the next session number (the caller derives the ids from it).
    pub fn next_sid(&mut self) -> Sid {
        let sid = self.next_sid;
        self.next_sid += 1;
        sid
    }

    /// Adds an authenticated session with the ids the caller made for `sid`.
    pub fn add_session(
        &mut self,
        sid: Sid,
        public_id: String,
        private_id: String,
        n: NewSession,
        now: Instant,
    ) -> &Session {
        // Internal clients without `internal-incall` count as in the call with audio.
        let in_call = if n.client_type == ClientType::Internal
            && !n.features.iter().any(|f| f == "internal-incall")
        {
            INTERNAL_IN_CALL_DEFAULT
        } else {
            0
        };
        self.by_public.insert(public_id.clone(), sid);
        self.sessions.entry(sid).or_insert(Session {
            sid,
            public_id,
            private_id,
            backend: n.backend,
            backend_url: n.backend_url,
            client_type: n.client_type,
            user_id: n.user_id,
            user_data: n.user_data,
            features: n.features,
            room: None,
            room_session_id: None,
            permissions: None,
            in_call,
            flags: 0,
            connected: true,
            disconnected_at: None,
            created: now,
            owner: None,
        })
    }

    /// The hello reply for a session (new or resumed).
    pub fn hello_reply(&self, sid: Sid, version: &str, id: Option<&str>) -> Option<Value> {
        let s = self.sessions.get(&sid)?;
        let features: Vec<&str> = if s.client_type == ClientType::Internal {
            api::INTERNAL_FEATURES.to_vec()
        } else {
            api::features(self.sfu_connected)
        };
        let mut h = json!({
            "version": version,
            "sessionid": s.public_id,
            "resumeid": s.private_id,
            "userid": s.user_id,
            "server": {"version": api::SERVER_VERSION, "features": features},
        });
        if let Some(u) = &s.user_data {
            h["user"] = u.clone();
        }
        Some(api::with_id(json!({"type": "hello", "hello": h}), id))
    }

    /// The connection of a session went away; it may resume within [`RESUME_WINDOW`].
    pub fn disconnected(&mut self, sid: Sid, now: Instant) {
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.connected = false;
            s.disconnected_at = Some(now);
        }
    }

    /// A resume id came back: the session is connected again. Returns whether another connection
    /// still held it (that one must be told `session_resumed` and closed by the caller).
    pub fn resume(&mut self, sid: Sid) -> Result<bool, ApiError> {
        let s = self
            .sessions
            .get_mut(&sid)
            .filter(|s| s.client_type != ClientType::Virtual)
            .ok_or_else(|| {
                ApiError::new("no_such_session", "The session to resume does not exist.")
            })?;
        let was_connected = s.connected;
        s.connected = true;
        s.disconnected_at = None;
        Ok(was_connected)
    }

    /// Ends a session (bye, expiry, or a closed connection of a session that cannot resume).
    pub fn remove_session(&mut self, sid: Sid) -> Out {
        let mut out = self.leave_room(sid);
        if !out.left.contains(&sid) {
            out.left.push(sid);
        }
        // Virtual sessions die with their internal client.
        let owned: Vec<Sid> = self
            .sessions
            .values()
            .filter(|s| s.owner.as_ref().is_some_and(|(o, _)| *o == sid))
            .map(|s| s.sid)
            .collect();
        for v in owned {
            out.merge(self.remove_session(v));
        }
        if let Some(s) = self.sessions.remove(&sid) {
            self.by_public.remove(&s.public_id);
        }
        out
    }

    /// Sessions whose resume window ran out, and anonymous sessions that never joined a room.
    pub fn expire(&mut self, now: Instant) -> Out {
        let mut out = Out::default();
        let mut gone = Vec::new();
        for s in self.sessions.values() {
            if s.disconnected_at
                .is_some_and(|t| now.duration_since(t) >= RESUME_WINDOW)
            {
                gone.push(s.sid);
            } else if s.connected
                && s.client_type == ClientType::Client
                && s.user_id.is_empty()
                && s.room.is_none()
                && now.duration_since(s.created) >= ANONYMOUS_JOIN_TIMEOUT
            {
                out.send(s.sid, &api::bye("room_join_timeout", None));
                out.close.push(s.sid);
                gone.push(s.sid);
            }
        }
        for sid in gone {
            out.merge(self.remove_session(sid));
        }
        for ((_, room_id), room) in self.rooms.iter_mut() {
            let expired: Vec<String> = room
                .transient
                .iter()
                .filter(|(_, e)| e.expires.is_some_and(|t| t <= now))
                .map(|(k, _)| k.clone())
                .collect();
            for key in expired {
                if let Some(e) = room.transient.remove(&key) {
                    let _ = room_id;
                    out.broadcast(
                        room.sessions.iter().copied(),
                        &json!({"type":"transient","transient":{"type":"remove","key":key,"oldvalue":e.value}}),
                    );
                }
            }
        }
        out
    }

    /// The other sessions in `sid`'s room (none when it is in no room).
    pub fn room_mates(&self, sid: Sid) -> Vec<Sid> {
        let Some(s) = self.sessions.get(&sid) else {
            return Vec::new();
        };
        let Some(room) = &s.room else {
            return Vec::new();
        };
        let mut v = self.room_members(&(s.backend.clone(), room.clone()));
        v.retain(|o| *o != sid);
        v
    }

    fn room_members(&self, key: &RoomKey) -> Vec<Sid> {
        self.rooms
            .get(key)
            .map(|r| r.sessions.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The reply for a `room` request of a session already in `room_id`, if it is.
    pub fn already_joined(&self, sid: Sid, room_id: &str) -> Option<ApiError> {
        let s = self.sessions.get(&sid)?;
        if s.room.as_deref() != Some(room_id) {
            return None;
        }
        let props = self
            .rooms
            .get(&(s.backend.clone(), room_id.to_string()))
            .map(|r| r.properties.clone())
            .unwrap_or(Value::Null);
        Some(
            ApiError::new("already_joined", "Already joined this room.").with_details(
                json!({"roomid": room_id, "room": {"roomid": room_id, "properties": props}}),
            ),
        )
    }

    /// Joins a room after Nextcloud allowed it. `bandwidth` is the `room` reply's bitrate caps.
    #[allow(clippy::too_many_arguments)]
    pub fn join_room(
        &mut self,
        sid: Sid,
        room_id: &str,
        room_session_id: Option<String>,
        properties: Value,
        permissions: Option<Vec<String>>,
        bandwidth: Option<Value>,
        request_id: Option<&str>,
    ) -> Out {
        let mut out = self.leave_room(sid);
        let Some(backend) = self.sessions.get(&sid).map(|s| s.backend.clone()) else {
            return out;
        };
        // The same Talk session on a new signaling session: the old one is told and closed.
        if let Some(rsid) = &room_session_id {
            let old: Vec<Sid> = self
                .sessions
                .values()
                .filter(|s| {
                    s.sid != sid && s.backend == backend && s.room_session_id.as_ref() == Some(rsid)
                })
                .map(|s| s.sid)
                .collect();
            for o in old {
                out.send(o, &api::bye("room_session_reconnected", None));
                out.close.push(o);
                let mut gone = self.remove_session(o);
                // The Talk session continues on the new connection: no leave towards Talk.
                gone.backend.clear();
                out.merge(gone);
            }
        }
        let key = (backend.clone(), room_id.to_string());
        let room = self.rooms.entry(key.clone()).or_default();
        room.properties = properties.clone();
        let others: Vec<Sid> = room.sessions.iter().copied().collect();
        room.sessions.insert(sid);
        let initial: serde_json::Map<String, Value> = room
            .transient
            .iter()
            .map(|(k, e)| (k.clone(), e.value.clone()))
            .collect();
        let Some(s) = self.sessions.get_mut(&sid) else {
            return out;
        };
        s.room = Some(room_id.to_string());
        s.room_session_id = room_session_id;
        s.permissions = permissions;
        let mut reply = json!({"roomid": room_id, "properties": properties});
        if let Some(b) = bandwidth {
            reply["bandwidth"] = b;
        }
        out.send(
            sid,
            &api::with_id(json!({"type": "room", "room": reply}), request_id),
        );
        let me = self.sessions[&sid].join_entry();
        out.broadcast(
            others.iter().copied(),
            &api::event("room", "join", json!([me])),
        );
        let mut everyone: Vec<Value> = others
            .iter()
            .filter_map(|o| self.sessions.get(o))
            .map(|o| o.join_entry())
            .collect();
        everyone.push(me);
        out.send(sid, &api::event("room", "join", Value::Array(everyone)));
        if !initial.is_empty() {
            out.send(
                sid,
                &json!({"type":"transient","transient":{"type":"initial","data":initial}}),
            );
        }
        out
    }

    /// Leaves the current room (if any): others get `leave`, Talk gets a `room` leave.
    pub fn leave_room(&mut self, sid: Sid) -> Out {
        let mut out = Out::default();
        let Some(s) = self.sessions.get_mut(&sid) else {
            return out;
        };
        let Some(room_id) = s.room.take() else {
            return out;
        };
        let rsid = s.room_session_id.take();
        s.in_call = 0;
        out.left.push(sid);
        let (backend, url, user_id, public_id, client_type) = (
            s.backend.clone(),
            s.backend_url.clone(),
            s.user_id.clone(),
            s.public_id.clone(),
            s.client_type,
        );
        let key = (backend.clone(), room_id.clone());
        if let Some(room) = self.rooms.get_mut(&key) {
            room.sessions.remove(&sid);
            let sd_key = format!("sd:{public_id}");
            if let Some(e) = room.transient.remove(&sd_key) {
                out.broadcast(
                    room.sessions.iter().copied(),
                    &json!({"type":"transient","transient":{"type":"remove","key":sd_key,"oldvalue":e.value}}),
                );
            }
            out.broadcast(
                room.sessions.iter().copied(),
                &api::event("room", "leave", json!([public_id])),
            );
            if room.sessions.is_empty() {
                self.rooms.remove(&key);
            }
        }
        if let (ClientType::Client, Some(rsid)) = (client_type, rsid) {
            out.backend.push(BackendCall::RoomLeave {
                backend,
                url,
                room: room_id,
                user_id,
                room_session_id: rsid,
            });
        }
        out
    }

    fn in_room_key(&self, sid: Sid) -> Option<RoomKey> {
        let s = self.sessions.get(&sid)?;
        Some((s.backend.clone(), s.room.clone()?))
    }

    /// Routes a `message` (or, with `control`, a `control`) from `sid`.
    pub fn route(
        &mut self,
        sid: Sid,
        target: Target,
        msg: &MessageClient,
        control: bool,
    ) -> Result<Out, ApiError> {
        let mut out = Out::default();
        let Some(from) = self.sessions.get(&sid) else {
            return Ok(out);
        };
        if control && !from.has_permission("control") {
            // Upstream ignores control messages of sessions without the permission.
            return Ok(out);
        }
        let kind = if control { "control" } else { "message" };
        let frame = |sender_kind: &str, recipient: Option<Value>| {
            let mut body = json!({"sender": from.sender(sender_kind), "data": msg.data});
            if let Some(r) = recipient {
                body["recipient"] = r;
            }
            let mut v = json!({"type": kind});
            v[kind] = body;
            v
        };
        match target {
            Target::Session(None) => {}
            Target::Session(Some(to)) => {
                let Some(dest) = self.sessions.get(&to) else {
                    return Ok(out);
                };
                if to == sid || dest.backend != from.backend {
                    return Ok(out);
                }
                match &dest.owner {
                    Some((owner, virtual_id)) => {
                        let v = frame(
                            "session",
                            Some(json!({"type":"session","sessionid":virtual_id})),
                        );
                        out.send(*owner, &v);
                    }
                    None => out.send(to, &frame("session", None)),
                }
            }
            Target::User(user) => {
                if user.is_empty() || user == from.user_id {
                    return Ok(out);
                }
                let v = frame("user", None);
                let dests: Vec<Sid> = self
                    .sessions
                    .values()
                    .filter(|s| s.user_id == user && s.backend == from.backend && s.owner.is_none())
                    .map(|s| s.sid)
                    .collect();
                out.broadcast(dests, &v);
            }
            Target::Room | Target::Call => {
                let Some(key) = self.in_room_key(sid) else {
                    return Ok(out);
                };
                let call_only = matches!(target, Target::Call);
                let kind = if call_only { "call" } else { "room" };
                let v = frame(kind, None);
                let dests: Vec<Sid> = self
                    .room_members(&key)
                    .into_iter()
                    .filter(|d| *d != sid)
                    .filter_map(|d| self.sessions.get(&d))
                    .filter(|d| d.owner.is_none() && (!call_only || d.in_call & IN_CALL != 0))
                    .map(|d| d.sid)
                    .collect();
                out.broadcast(dests, &v);
            }
        }
        Ok(out)
    }

    /// `transient` set / remove from a session.
    pub fn transient(
        &mut self,
        sid: Sid,
        t: &TransientClient,
        now: Instant,
        request_id: Option<&str>,
    ) -> Result<Out, ApiError> {
        let mut out = Out::default();
        let Some(s) = self.sessions.get(&sid) else {
            return Ok(out);
        };
        if !s.has_permission("transient-data") {
            return Err(ApiError::new(
                "not_allowed",
                "Not allowed to update transient data.",
            ));
        }
        let Some(key) = self.in_room_key(sid) else {
            return Err(ApiError::new(
                "not_in_room",
                "Need to join a room to set transient data.",
            ));
        };
        let name = t
            .key
            .clone()
            .filter(|k| !k.is_empty() && k.len() <= 256)
            .ok_or_else(|| {
                ApiError::new("invalid_format", "transient needs a key of 1 to 256 bytes")
            })?;
        // `sd:<sid>` keys belong to that session only.
        if let Some(owner) = name.strip_prefix("sd:")
            && owner != s.public_id
        {
            return Err(ApiError::new(
                "not_allowed",
                "Session data keys belong to their session.",
            ));
        }
        let _ = request_id;
        let room = self.rooms.entry(key).or_default();
        let members: Vec<Sid> = room.sessions.iter().copied().collect();
        match t.kind.as_str() {
            "set" => {
                let value = t.value.clone().unwrap_or(Value::Null);
                if value.is_null() {
                    return self.transient(
                        sid,
                        &TransientClient {
                            kind: "remove".into(),
                            key: Some(name),
                            value: None,
                            ttl: None,
                        },
                        now,
                        request_id,
                    );
                }
                if value.to_string().len() > MAX_TRANSIENT_VALUE_BYTES {
                    return Err(ApiError::new(
                        "invalid_format",
                        "transient value is too large",
                    ));
                }
                if !room.transient.contains_key(&name) && room.transient.len() >= MAX_TRANSIENT_KEYS
                {
                    return Err(ApiError::new(
                        "not_allowed",
                        "Too many transient keys in this room.",
                    ));
                }
                let expires = t
                    .ttl
                    .filter(|n| *n > 0)
                    .map(|n| now + Duration::from_nanos(n));
                let old = room.transient.insert(
                    name.clone(),
                    TransientEntry {
                        value: value.clone(),
                        expires,
                    },
                );
                if old.as_ref().is_some_and(|o| o.value == value) {
                    return Ok(out);
                }
                let mut body = json!({"type":"set","key":name,"value":value});
                if let Some(o) = old {
                    body["oldvalue"] = o.value;
                }
                out.broadcast(members, &json!({"type":"transient","transient":body}));
            }
            "remove" => {
                if let Some(o) = room.transient.remove(&name) {
                    out.broadcast(
                        members,
                        &json!({"type":"transient","transient":{"type":"remove","key":name,"oldvalue":o.value}}),
                    );
                }
            }
            other => {
                return Err(ApiError::new(
                    "invalid_format",
                    format!("unknown transient type {other:?}"),
                ));
            }
        }
        Ok(out)
    }

    /// Sets transient data on behalf of the server (dial-out call status).
    pub fn server_transient(
        &mut self,
        backend: &str,
        room_id: &str,
        key: &str,
        value: Value,
    ) -> Out {
        let mut out = Out::default();
        let Some(room) = self
            .rooms
            .get_mut(&(backend.to_string(), room_id.to_string()))
        else {
            return out;
        };
        let old = room.transient.insert(
            key.to_string(),
            TransientEntry {
                value: value.clone(),
                expires: None,
            },
        );
        let mut body = json!({"type":"set","key":key,"value":value});
        if let Some(o) = old {
            body["oldvalue"] = o.value;
        }
        out.broadcast(
            room.sessions.iter().copied(),
            &json!({"type":"transient","transient":body}),
        );
        out
    }

    // ---- internal clients -------------------------------------------------------------------

    /// A virtual session (`addsession`) of internal client `owner`.
    #[allow(clippy::too_many_arguments)]
    pub fn add_virtual(
        &mut self,
        owner: Sid,
        sid: Sid,
        public_id: String,
        virtual_id: String,
        room_id: &str,
        user_id: String,
        user_data: Option<Value>,
        flags: u32,
        in_call: u32,
        now: Instant,
    ) -> Result<Out, ApiError> {
        let backend = self
            .sessions
            .get(&owner)
            .filter(|s| s.client_type == ClientType::Internal)
            .map(|s| s.backend.clone())
            .ok_or_else(|| {
                ApiError::new("not_allowed", "Only internal clients may add sessions.")
            })?;
        if self
            .sessions
            .values()
            .any(|s| s.owner.as_ref() == Some(&(owner, virtual_id.clone())))
        {
            return Err(ApiError::new(
                "invalid_format",
                "A virtual session with this id exists.",
            ));
        }
        let key = (backend.clone(), room_id.to_string());
        if !self.rooms.contains_key(&key) {
            return Err(ApiError::new(
                "no_such_room",
                "The room of the virtual session is not active here.",
            ));
        }
        self.by_public.insert(public_id.clone(), sid);
        self.sessions.insert(
            sid,
            Session {
                sid,
                public_id: public_id.clone(),
                private_id: String::new(),
                backend_url: String::new(),
                backend,
                client_type: ClientType::Virtual,
                user_id,
                user_data,
                features: Vec::new(),
                room: Some(room_id.to_string()),
                room_session_id: Some(virtual_id.clone()),
                permissions: None,
                in_call,
                flags,
                connected: true,
                disconnected_at: None,
                created: now,
                owner: Some((owner, virtual_id)),
            },
        );
        let mut out = Out::default();
        let members = self.room_members(&key);
        if let Some(r) = self.rooms.get_mut(&key) {
            r.sessions.insert(sid);
        }
        let entry = self.sessions[&sid].join_entry();
        out.broadcast(
            members.iter().copied(),
            &api::event("room", "join", json!([entry])),
        );
        out.merge(self.participants_changed(&key, &[sid]));
        if flags != 0 {
            out.broadcast(
                members,
                &api::event(
                    "participants",
                    "flags",
                    json!({"roomid": room_id, "sessionid": public_id, "flags": flags}),
                ),
            );
        }
        Ok(out)
    }

    fn virtual_sid(&self, owner: Sid, virtual_id: &str) -> Option<Sid> {
        self.sessions
            .values()
            .find(|s| {
                s.owner
                    .as_ref()
                    .is_some_and(|(o, v)| *o == owner && v == virtual_id)
            })
            .map(|s| s.sid)
    }

    pub fn update_virtual(
        &mut self,
        owner: Sid,
        virtual_id: &str,
        flags: Option<u32>,
        in_call: Option<u32>,
    ) -> Result<Out, ApiError> {
        let sid = self
            .virtual_sid(owner, virtual_id)
            .ok_or_else(|| ApiError::new("no_such_session", "No virtual session with this id."))?;
        let mut out = Out::default();
        let Some(key) = self.in_room_key(sid) else {
            return Ok(out);
        };
        let Some(s) = self.sessions.get_mut(&sid) else {
            return Ok(out);
        };
        let mut in_call_changed = false;
        if let Some(f) = flags.filter(|f| *f != s.flags) {
            s.flags = f;
            let v = api::event(
                "participants",
                "flags",
                json!({"roomid": key.1, "sessionid": s.public_id, "flags": f}),
            );
            out.broadcast(self.room_members(&key), &v);
        }
        if let Some(c) = in_call
            && let Some(s) = self.sessions.get_mut(&sid)
        {
            in_call_changed = s.in_call != c;
            s.in_call = c;
        }
        if in_call_changed {
            out.merge(self.participants_changed(&key, &[sid]));
        }
        Ok(out)
    }

    pub fn remove_virtual(&mut self, owner: Sid, virtual_id: &str) -> Result<Out, ApiError> {
        let sid = self
            .virtual_sid(owner, virtual_id)
            .ok_or_else(|| ApiError::new("no_such_session", "No virtual session with this id."))?;
        Ok(self.remove_session(sid))
    }

    /// `internal` `incall` of an internal client in its room.
    pub fn internal_in_call(&mut self, sid: Sid, in_call: u32) -> Out {
        let Some(key) = self.in_room_key(sid) else {
            return Out::default();
        };
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.in_call = in_call;
        }
        self.participants_changed(&key, &[sid])
    }

    /// A participants `update` listing the given internal/virtual sessions.
    fn participants_changed(&self, key: &RoomKey, sids: &[Sid]) -> Out {
        let mut out = Out::default();
        let users: Vec<Value> = sids
            .iter()
            .filter_map(|s| self.sessions.get(s))
            .map(synthetic_user)
            .collect();
        let v = api::event(
            "participants",
            "update",
            json!({"roomid": key.1, "changed": users, "users": users}),
        );
        out.broadcast(
            self.room_members(key)
                .into_iter()
                .filter(|s| !sids.contains(s)),
            &v,
        );
        out
    }

    /// An internal client of `backend` that can place phone calls, if one is connected.
    pub fn dialout_client(&self, backend: &str) -> Option<Sid> {
        self.sessions
            .values()
            .find(|s| {
                s.client_type == ClientType::Internal
                    && s.connected
                    && s.backend == backend
                    && s.has_feature("start-dialout")
            })
            .map(|s| s.sid)
    }

    // ---- requests from Nextcloud (backend API) ------------------------------------------------

    fn user_sessions(&self, backend: &str, users: &[String]) -> Vec<Sid> {
        self.sessions
            .values()
            .filter(|s| {
                s.backend == backend
                    && s.client_type == ClientType::Client
                    && users.contains(&s.user_id)
            })
            .map(|s| s.sid)
            .collect()
    }

    fn by_room_session(&self, backend: &str, room_session_ids: &[String]) -> Vec<Sid> {
        self.sessions
            .values()
            .filter(|s| {
                s.backend == backend
                    && s.room_session_id
                        .as_ref()
                        .is_some_and(|r| room_session_ids.contains(r))
            })
            .map(|s| s.sid)
            .collect()
    }

    pub fn backend_invite(
        &mut self,
        backend: &str,
        room_id: &str,
        users: &[String],
        all_users: &[String],
        properties: &Value,
    ) -> Out {
        let mut out = Out::default();
        let invited = self.user_sessions(backend, users);
        out.broadcast(
            invited,
            &api::event(
                "roomlist",
                "invite",
                json!({"roomid": room_id, "properties": properties}),
            ),
        );
        self.roomlist_update_others(&mut out, backend, room_id, users, all_users, properties);
        out
    }

    pub fn backend_disinvite(
        &mut self,
        backend: &str,
        room_id: &str,
        users: &[String],
        room_session_ids: &[String],
        all_users: &[String],
        properties: &Value,
    ) -> Out {
        let mut out = Out::default();
        let mut targets = self.user_sessions(backend, users);
        targets.extend(self.by_room_session(backend, room_session_ids));
        targets.sort_unstable();
        targets.dedup();
        let ev = api::event(
            "roomlist",
            "disinvite",
            json!({"roomid": room_id, "reason": "disinvited"}),
        );
        for sid in targets {
            out.send(sid, &ev);
            let in_room = self
                .sessions
                .get(&sid)
                .is_some_and(|s| s.room.as_deref() == Some(room_id));
            if in_room {
                out.close.push(sid);
                let mut gone = self.remove_session(sid);
                gone.backend.clear();
                out.merge(gone);
            }
        }
        self.roomlist_update_others(&mut out, backend, room_id, users, all_users, properties);
        out
    }

    /// Tells the users of the room who were not invited or disinvited that its properties
    /// changed (`roomlist` `update`), as upstream does after invite and disinvite.
    fn roomlist_update_others(
        &self,
        out: &mut Out,
        backend: &str,
        room_id: &str,
        users: &[String],
        all_users: &[String],
        properties: &Value,
    ) {
        let rest: Vec<String> = all_users
            .iter()
            .filter(|u| !users.contains(u))
            .cloned()
            .collect();
        out.broadcast(
            self.user_sessions(backend, &rest),
            &api::event(
                "roomlist",
                "update",
                json!({"roomid": room_id, "properties": properties}),
            ),
        );
    }

    pub fn backend_update(
        &mut self,
        backend: &str,
        room_id: &str,
        users: &[String],
        properties: &Value,
    ) -> Out {
        let mut out = Out::default();
        let key = (backend.to_string(), room_id.to_string());
        if let Some(room) = self.rooms.get_mut(&key) {
            room.properties = properties.clone();
            out.broadcast(
                room.sessions.iter().copied().collect::<Vec<_>>(),
                &json!({"type":"room","room":{"roomid": room_id, "properties": properties}}),
            );
        }
        out.broadcast(
            self.user_sessions(backend, users),
            &api::event(
                "roomlist",
                "update",
                json!({"roomid": room_id, "properties": properties}),
            ),
        );
        out
    }

    pub fn backend_delete(&mut self, backend: &str, room_id: &str, users: &[String]) -> Out {
        let mut out = Out::default();
        out.broadcast(
            self.user_sessions(backend, users),
            &api::event(
                "roomlist",
                "disinvite",
                json!({"roomid": room_id, "reason": "deleted"}),
            ),
        );
        let key = (backend.to_string(), room_id.to_string());
        let members = self.room_members(&key);
        out.broadcast(
            members.iter().copied(),
            &json!({"type":"room","room":{"roomid":""}}),
        );
        for sid in members {
            let mut left = self.leave_room(sid);
            // The room is gone in Talk already: no leave requests, no leave events.
            left.backend.clear();
            left.frames.clear();
            out.merge(left);
        }
        self.rooms.remove(&key);
        out
    }

    /// `participants` / `incall` updates: Talk session ids become signaling session ids, users
    /// without a live session are dropped, internal and virtual sessions are added.
    pub fn backend_participants(&mut self, backend: &str, room_id: &str, update: &Value) -> Out {
        let mut out = Out::default();
        let key = (backend.to_string(), room_id.to_string());
        let Some(room) = self.rooms.get(&key) else {
            return out;
        };
        let members: Vec<Sid> = room.sessions.iter().copied().collect();
        let mut payload = update.clone();
        if update.get("all").and_then(Value::as_bool) == Some(true) {
            let in_call = update.get("incall").and_then(Value::as_u64).unwrap_or(0) as u32;
            for sid in &members {
                if let Some(s) = self.sessions.get_mut(sid)
                    && s.client_type == ClientType::Client
                {
                    s.in_call = in_call;
                }
            }
            let ev = api::event(
                "participants",
                "update",
                json!({"roomid": room_id, "incall": in_call, "all": true}),
            );
            out.broadcast(members, &ev);
            return out;
        }
        for list in ["changed", "users"] {
            let Some(items) = update.get(list).and_then(Value::as_array) else {
                continue;
            };
            let mut rewritten = Vec::new();
            for item in items {
                let Some(talk_sid) = item.get("sessionId").and_then(Value::as_str) else {
                    continue;
                };
                let Some(sid) = members.iter().copied().find(|m| {
                    self.sessions
                        .get(m)
                        .and_then(|s| s.room_session_id.as_deref())
                        == Some(talk_sid)
                }) else {
                    continue;
                };
                let Some(s) = self.sessions.get_mut(&sid) else {
                    continue;
                };
                if list == "changed"
                    && let Some(p) = item.get("permissions").and_then(Value::as_array)
                {
                    s.permissions = Some(
                        p.iter()
                            .filter_map(|x| x.as_str().map(str::to_string))
                            .collect(),
                    );
                }
                if let Some(c) = item.get("inCall").and_then(Value::as_u64) {
                    s.in_call = c as u32;
                }
                let mut item = item.clone();
                item["sessionId"] = Value::String(s.public_id.clone());
                rewritten.push(item);
            }
            if list == "users" {
                for sid in &members {
                    if let Some(s) = self
                        .sessions
                        .get(sid)
                        .filter(|s| s.client_type != ClientType::Client)
                    {
                        rewritten.push(synthetic_user(s));
                    }
                }
            }
            payload[list] = Value::Array(rewritten);
        }
        payload["roomid"] = Value::String(room_id.to_string());
        out.broadcast(members, &api::event("participants", "update", payload));
        out
    }

    /// A room `message` event (chat); clients without `chat-relay` get only `refresh`.
    pub fn backend_message(&mut self, backend: &str, room_id: &str, data: &Value) -> Out {
        let mut out = Out::default();
        let key = (backend.to_string(), room_id.to_string());
        let full = api::event("room", "message", json!({"roomid": room_id, "data": data}));
        let mut reduced_data = data.clone();
        if let Some(chat) = reduced_data.get_mut("chat").and_then(Value::as_object_mut) {
            chat.remove("comment");
            chat.remove("comments");
            chat.insert("refresh".into(), Value::Bool(true));
        }
        let reduced = api::event(
            "room",
            "message",
            json!({"roomid": room_id, "data": reduced_data}),
        );
        let (relay, plain): (Vec<Sid>, Vec<Sid>) =
            self.room_members(&key).into_iter().partition(|s| {
                self.sessions
                    .get(s)
                    .is_some_and(|s| s.has_feature("chat-relay"))
            });
        out.broadcast(relay, &full);
        out.broadcast(plain, &reduced);
        out
    }

    /// `switchto`: Talk session ids (list) or a map of Talk session id → details.
    pub fn backend_switchto(
        &mut self,
        backend: &str,
        room_id: &str,
        target_room: &str,
        sessions: &Value,
    ) -> Out {
        let mut out = Out::default();
        let key = (backend.to_string(), room_id.to_string());
        let members = self.room_members(&key);
        let entries: Vec<(String, Option<Value>)> = match sessions {
            Value::Array(a) => a
                .iter()
                .filter_map(|v| v.as_str().map(|s| (s.to_string(), None)))
                .collect(),
            Value::Object(m) => m
                .iter()
                .map(|(k, v)| (k.clone(), (!v.is_null()).then(|| v.clone())))
                .collect(),
            _ => Vec::new(),
        };
        for (talk_sid, details) in entries {
            for sid in &members {
                let Some(s) = self.sessions.get(sid) else {
                    continue;
                };
                if s.room_session_id.as_deref() != Some(talk_sid.as_str()) {
                    continue;
                }
                let mut body = json!({"roomid": target_room});
                if let Some(d) = &details {
                    body["details"] = d.clone();
                }
                out.send(*sid, &api::event("room", "switchto", body));
            }
        }
        out
    }

    /// Whether two sessions are in the same room and both in the call (upstream `isInSameCall`):
    /// the condition for subscribing to another session's stream. Internal clients may always.
    pub fn in_same_call(&self, a: Sid, b: Sid) -> bool {
        let (Some(x), Some(y)) = (self.sessions.get(&a), self.sessions.get(&b)) else {
            return false;
        };
        if x.client_type == ClientType::Internal {
            return true;
        }
        x.backend == y.backend
            && x.room.is_some()
            && x.room == y.room
            && x.in_call & IN_CALL != 0
            && y.in_call & IN_CALL != 0
    }

    /// Talk sessions to keep alive with `ping`: (backend, room, [(user id, Talk session id)]).
    pub fn ping_entries(&self) -> Vec<PingBatch> {
        let mut v = Vec::new();
        for ((backend, room_id), room) in &self.rooms {
            let entries: Vec<(String, String)> = room
                .sessions
                .iter()
                .filter_map(|s| self.sessions.get(s))
                .filter(|s| s.client_type == ClientType::Client)
                .filter_map(|s| s.room_session_id.clone().map(|r| (s.user_id.clone(), r)))
                .collect();
            if !entries.is_empty() {
                v.push((backend.clone(), room_id.clone(), entries));
            }
        }
        v
    }
}

fn synthetic_user(s: &Session) -> Value {
    let mut u =
        json!({"sessionId": s.public_id, "inCall": s.in_call, "lastPing": 0, "participantType": 0});
    match s.client_type {
        ClientType::Internal => u["internal"] = Value::Bool(true),
        ClientType::Virtual => u["virtual"] = Value::Bool(true),
        ClientType::Client => {}
    }
    u
}

/// Which publish permission an SFU offer needs (used by the SFU seam).
pub fn publish_allowed(s: &Session, room_type: &str, has_audio: bool, has_video: bool) -> bool {
    if s.has_permission("publish-media") {
        return true;
    }
    match room_type {
        "screen" => s.has_permission("publish-screen"),
        _ => {
            (!has_audio || s.has_permission("publish-audio"))
                && (!has_video || s.has_permission("publish-video"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub_with(n: usize, now: Instant) -> (Hub, Vec<Sid>) {
        let mut hub = Hub::new();
        let mut sids = Vec::new();
        for i in 0..n {
            let sid = hub.next_sid();
            hub.add_session(
                sid,
                format!("pub{sid}"),
                format!("priv{sid}"),
                NewSession {
                    backend: "nc".into(),
                    client_type: ClientType::Client,
                    user_id: format!("user{i}"),
                    user_data: None,
                    features: vec![],
                    backend_url: String::new(),
                },
                now,
            );
            sids.push(sid);
        }
        (hub, sids)
    }

    fn frames_to(out: &Out, sid: Sid) -> Vec<Value> {
        out.frames
            .iter()
            .filter(|(s, _)| *s == sid)
            .map(|(_, t)| serde_json::from_str(t).expect("json"))
            .collect()
    }

    fn msg(data: Value) -> MessageClient {
        MessageClient {
            recipient: api::Recipient {
                kind: "session".into(),
                sessionid: None,
                userid: None,
            },
            data,
        }
    }

    #[test]
    fn joining_tells_others_and_gives_the_joiner_everyone() {
        let now = Instant::now();
        let (mut hub, s) = hub_with(2, now);
        hub.join_room(
            s[0],
            "r",
            Some("t0".into()),
            json!({"name":"R"}),
            None,
            None,
            None,
        );
        let out = hub.join_room(
            s[1],
            "r",
            Some("t1".into()),
            json!({"name":"R"}),
            None,
            None,
            Some("4"),
        );
        let to0 = frames_to(&out, s[0]);
        assert_eq!(to0[0]["event"]["join"][0]["sessionid"], "pub2");
        let to1 = frames_to(&out, s[1]);
        assert_eq!(to1[0]["id"], "4");
        assert_eq!(to1[0]["room"]["roomid"], "r");
        assert_eq!(to1[1]["event"]["join"].as_array().map(Vec::len), Some(2));
        assert!(hub.already_joined(s[1], "r").is_some());
    }

    #[test]
    fn leaving_sends_leave_and_asks_talk() {
        let now = Instant::now();
        let (mut hub, s) = hub_with(2, now);
        hub.join_room(s[0], "r", Some("t0".into()), json!({}), None, None, None);
        hub.join_room(s[1], "r", Some("t1".into()), json!({}), None, None, None);
        let out = hub.leave_room(s[1]);
        assert_eq!(frames_to(&out, s[0])[0]["event"]["leave"][0], "pub2");
        assert_eq!(
            out.backend,
            vec![BackendCall::RoomLeave {
                backend: "nc".into(),
                url: String::new(),
                room: "r".into(),
                user_id: "user1".into(),
                room_session_id: "t1".into()
            }]
        );
    }

    #[test]
    fn messages_reach_session_user_room_and_call_but_never_the_sender() {
        let now = Instant::now();
        let (mut hub, s) = hub_with(3, now);
        for (i, sid) in s.iter().enumerate() {
            hub.join_room(
                *sid,
                "r",
                Some(format!("t{i}")),
                json!({}),
                None,
                None,
                None,
            );
        }
        let m = msg(json!({"type":"nickChanged"}));
        let out = hub
            .route(s[0], Target::Session(Some(s[1])), &m, false)
            .expect("ok");
        assert_eq!(out.frames.len(), 1);
        assert_eq!(
            frames_to(&out, s[1])[0]["message"]["sender"]["sessionid"],
            "pub1"
        );
        let out = hub
            .route(s[0], Target::Session(Some(s[0])), &m, false)
            .expect("ok");
        assert!(out.frames.is_empty(), "to oneself is dropped");
        let out = hub
            .route(s[0], Target::User("user2".into()), &m, false)
            .expect("ok");
        assert_eq!(
            frames_to(&out, s[2])[0]["message"]["sender"]["type"],
            "user"
        );
        let out = hub.route(s[0], Target::Room, &m, false).expect("ok");
        assert_eq!(out.frames.len(), 2);
        hub.backend_participants(
            "nc",
            "r",
            &json!({"changed":[{"sessionId":"t2","inCall":7}],"users":[]}),
        );
        let out = hub.route(s[0], Target::Call, &m, false).expect("ok");
        assert_eq!(out.frames.len(), 1);
        assert_eq!(out.frames[0].0, s[2]);
    }

    #[test]
    fn control_needs_the_control_permission() {
        let now = Instant::now();
        let (mut hub, s) = hub_with(2, now);
        hub.join_room(
            s[0],
            "r",
            None,
            json!({}),
            Some(vec!["publish-audio".into()]),
            None,
            None,
        );
        hub.join_room(
            s[1],
            "r",
            None,
            json!({}),
            Some(vec!["control".into()]),
            None,
            None,
        );
        let m = msg(json!({"type":"forceMute"}));
        assert!(
            hub.route(s[0], Target::Session(Some(s[1])), &m, true)
                .expect("ok")
                .frames
                .is_empty()
        );
        let out = hub
            .route(s[1], Target::Session(Some(s[0])), &m, true)
            .expect("ok");
        assert_eq!(frames_to(&out, s[0])[0]["type"], "control");
    }

    #[test]
    fn transient_data_is_set_removed_expired_and_given_to_joiners() {
        let now = Instant::now();
        let (mut hub, s) = hub_with(2, now);
        let set = |k: &str, v: Value, ttl: Option<u64>| TransientClient {
            kind: "set".into(),
            key: Some(k.into()),
            value: Some(v),
            ttl,
        };
        assert_eq!(
            hub.transient(s[0], &set("k", json!(1), None), now, None)
                .expect_err("no room")
                .code,
            "not_in_room"
        );
        hub.join_room(s[0], "r", None, json!({}), None, None, None);
        let out = hub
            .transient(s[0], &set("k", json!(1), None), now, None)
            .expect("set");
        assert_eq!(frames_to(&out, s[0])[0]["transient"]["value"], 1);
        let out = hub
            .transient(s[0], &set("k", json!(1), None), now, None)
            .expect("same");
        assert!(out.frames.is_empty());
        hub.transient(s[0], &set("t", json!("x"), Some(1_000_000_000)), now, None)
            .expect("ttl");
        let out = hub.join_room(s[1], "r", None, json!({}), None, None, None);
        let initial = frames_to(&out, s[1])
            .into_iter()
            .find(|f| f["transient"]["type"] == "initial")
            .expect("initial");
        assert_eq!(initial["transient"]["data"]["k"], 1);
        let out = hub.expire(now + Duration::from_secs(2));
        assert_eq!(frames_to(&out, s[1])[0]["transient"]["key"], "t");
        hub.join_room(s[1], "r2", None, json!({}), Some(vec![]), None, None);
        assert_eq!(
            hub.transient(s[1], &set("k", json!(1), None), now, None)
                .expect_err("perm")
                .code,
            "not_allowed"
        );
    }

    #[test]
    fn disconnected_session_expires_after_the_resume_window_and_anonymous_must_join() {
        let now = Instant::now();
        let (mut hub, s) = hub_with(1, now);
        hub.disconnected(s[0], now);
        assert!(hub.expire(now + Duration::from_secs(29)).close.is_empty());
        assert!(hub.session(s[0]).is_some());
        assert_eq!(hub.resume(s[0]), Ok(false));
        hub.disconnected(s[0], now);
        hub.expire(now + RESUME_WINDOW);
        assert!(hub.session(s[0]).is_none());
        assert_eq!(hub.resume(s[0]).expect_err("gone").code, "no_such_session");

        let sid = hub.next_sid();
        hub.add_session(
            sid,
            "g".into(),
            "gp".into(),
            NewSession {
                backend: "nc".into(),
                client_type: ClientType::Client,
                user_id: String::new(),
                user_data: None,
                features: vec![],
                backend_url: String::new(),
            },
            now,
        );
        assert!(hub.expire(now + Duration::from_secs(9)).close.is_empty());
        let out = hub.expire(now + ANONYMOUS_JOIN_TIMEOUT);
        assert_eq!(out.close, vec![sid]);
        assert_eq!(
            frames_to(&out, sid)[0]["bye"]["reason"],
            "room_join_timeout"
        );
    }

    #[test]
    fn same_talk_session_on_a_new_connection_closes_the_old_one() {
        let now = Instant::now();
        let (mut hub, s) = hub_with(2, now);
        hub.join_room(s[0], "r", Some("t".into()), json!({}), None, None, None);
        let out = hub.join_room(s[1], "r", Some("t".into()), json!({}), None, None, None);
        assert_eq!(out.close, vec![s[0]]);
        assert_eq!(
            frames_to(&out, s[0])[0]["bye"]["reason"],
            "room_session_reconnected"
        );
        assert!(out.backend.is_empty());
    }

    #[test]
    fn participants_update_rewrites_talk_ids_and_drops_unknown_users() {
        let now = Instant::now();
        let (mut hub, s) = hub_with(1, now);
        hub.join_room(
            s[0],
            "r",
            Some("talk-a".into()),
            json!({}),
            None,
            None,
            None,
        );
        let out = hub.backend_participants(
            "nc",
            "r",
            &json!({"changed":[{"sessionId":"talk-a","inCall":7,"permissions":["publish-audio"]}],"users":[{"sessionId":"talk-a","inCall":7},{"sessionId":"gone","inCall":1}]}),
        );
        let ev = &frames_to(&out, s[0])[0]["event"]["update"];
        assert_eq!(ev["users"], json!([{"sessionId":"pub1","inCall":7}]));
        assert_eq!(ev["changed"][0]["sessionId"], "pub1");
        assert_eq!(
            hub.session(s[0]).expect("s").permissions,
            Some(vec!["publish-audio".to_string()])
        );
        let out = hub.backend_participants("nc", "r", &json!({"incall":0,"all":true}));
        assert_eq!(
            frames_to(&out, s[0])[0]["event"]["update"],
            json!({"roomid":"r","incall":0,"all":true})
        );
    }

    #[test]
    fn virtual_sessions_join_update_and_leave_with_their_owner() {
        let now = Instant::now();
        let (mut hub, s) = hub_with(1, now);
        hub.join_room(s[0], "r", Some("t".into()), json!({}), None, None, None);
        let owner = hub.next_sid();
        hub.add_session(
            owner,
            "int".into(),
            "intp".into(),
            NewSession {
                backend: "nc".into(),
                client_type: ClientType::Internal,
                user_id: String::new(),
                user_data: None,
                features: vec![],
                backend_url: String::new(),
            },
            now,
        );
        let v = hub.next_sid();
        let out = hub
            .add_virtual(
                owner,
                v,
                "vpub".into(),
                "phone-1".into(),
                "r",
                String::new(),
                None,
                4,
                9,
                now,
            )
            .expect("add");
        let to0 = frames_to(&out, s[0]);
        assert_eq!(to0[0]["event"]["join"][0]["sessionid"], "vpub");
        assert_eq!(to0[1]["event"]["update"]["users"][0]["virtual"], true);
        assert_eq!(to0[2]["event"]["flags"]["flags"], 4);
        // A message to the virtual session reaches its internal client, naming the virtual id.
        let out = hub
            .route(s[0], Target::Session(Some(v)), &msg(json!({"x":1})), false)
            .expect("ok");
        assert_eq!(
            frames_to(&out, owner)[0]["message"]["recipient"]["sessionid"],
            "phone-1"
        );
        let out = hub
            .update_virtual(owner, "phone-1", Some(1), None)
            .expect("update");
        assert_eq!(frames_to(&out, s[0])[0]["event"]["flags"]["flags"], 1);
        let out = hub.remove_session(owner);
        assert_eq!(frames_to(&out, s[0])[0]["event"]["leave"][0], "vpub");
        assert!(hub.session(v).is_none());
    }

    #[test]
    fn disinvite_by_talk_session_closes_it_and_switchto_reaches_listed_sessions() {
        let now = Instant::now();
        let (mut hub, s) = hub_with(2, now);
        hub.join_room(s[0], "r", Some("t0".into()), json!({}), None, None, None);
        hub.join_room(s[1], "r", Some("t1".into()), json!({}), None, None, None);
        let out = hub.backend_switchto("nc", "r", "breakout", &json!({"t1": {"x": 1}, "t9": null}));
        assert_eq!(
            frames_to(&out, s[1])[0]["event"]["switchto"],
            json!({"roomid":"breakout","details":{"x":1}})
        );
        assert!(frames_to(&out, s[0]).is_empty());
        let out = hub.backend_switchto("nc", "r", "b2", &json!(["t0"]));
        assert_eq!(
            frames_to(&out, s[0])[0]["event"]["switchto"],
            json!({"roomid":"b2"})
        );
        let out = hub.backend_disinvite("nc", "r", &[], &["t1".into()], &[], &json!({}));
        assert_eq!(
            frames_to(&out, s[1])[0]["event"]["disinvite"]["reason"],
            "disinvited"
        );
        assert_eq!(out.close, vec![s[1]]);
    }

    #[test]
    fn chat_comments_only_reach_chat_relay_clients() {
        let now = Instant::now();
        let (mut hub, s) = hub_with(2, now);
        if let Some(x) = hub.sessions.get_mut(&s[1]) {
            x.features = vec!["chat-relay".into()];
        }
        hub.join_room(s[0], "r", None, json!({}), None, None, None);
        hub.join_room(s[1], "r", None, json!({}), None, None, None);
        let out = hub.backend_message(
            "nc",
            "r",
            &json!({"type":"chat","chat":{"refresh":true,"comment":{"m":"hi"}}}),
        );
        assert_eq!(
            frames_to(&out, s[0])[0]["event"]["message"]["data"]["chat"],
            json!({"refresh":true})
        );
        assert_eq!(
            frames_to(&out, s[1])[0]["event"]["message"]["data"]["chat"]["comment"]["m"],
            "hi"
        );
    }

    #[test]
    fn publish_permissions_follow_media_kind() {
        let now = Instant::now();
        let (mut hub, s) = hub_with(1, now);
        hub.join_room(
            s[0],
            "r",
            None,
            json!({}),
            Some(vec!["publish-audio".into()]),
            None,
            None,
        );
        let sess = hub.session(s[0]).expect("s");
        assert!(publish_allowed(sess, "video", true, false));
        assert!(!publish_allowed(sess, "video", true, true));
        assert!(!publish_allowed(sess, "screen", false, true));
    }
}
