//! The built-in backend: stand-alone rooms that no Nextcloud knows about, for the meeting page
//! and room links.
//!
//! It plays Talk's part for its rooms, and nothing else: it issues hello-v2 tokens (EdDSA, signed
//! with a key made at service start, valid 60 s like Talk's) to people who pass the room's
//! password, and answers the `room`, `ping` and `auth` backend requests in-process through
//! [`BackendClient`], exactly as Talk answers them over HTTP. The signaling server does not know
//! which of the two it talks to. In-call changes go the other way as Talk's `incall` backend
//! request would ([`BuiltinBackend::in_call`] builds it; the HTTP layer hands it to the same
//! handler Nextcloud's requests reach).
//!
//! A join is bound to a "room session id" (Talk's session id): a random token given only after
//! the password check; the `room` request must name it. Rooms are kept in
//! `DATA_DIR/rooms/rooms.json` (argon2id password hashes, a hash of the moderator key), written
//! with [`storage::write_atomic`]. Tickets live in memory.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::api::ApiError;
use super::backend_client::{BackendClient, BoxFuture};
use super::backends::Backend;
use super::nextcloud::Capabilities;
use crate::secrets;
use crate::storage;

/// Backend id of the built-in backend (logs, metrics, session ids).
pub const BUILTIN_ID: &str = "builtin";
/// The `auth.url` of the built-in backend's hellos and the `iss` of its tokens. Not a network
/// address: no request ever goes there.
pub const BUILTIN_URL: &str = "talkbox:builtin";
/// Validity of a hello-v2 token (Talk's is 60 s too).
pub const TOKEN_LIFETIME_S: i64 = 60;
/// How long a granted join may wait for its `room` request.
const TICKET_LIFETIME: Duration = Duration::from_secs(600);
/// Most rooms kept; creation is refused beyond.
pub const MAX_ROOMS: usize = 10_000;
/// Most tickets (joins granted and not yet left) at once.
const MAX_TICKETS: usize = 100_000;

/// Permissions of a guest and of the room's moderator (Talk's permission names).
const GUEST_PERMISSIONS: &[&str] = &[
    "publish-audio",
    "publish-video",
    "publish-screen",
    "transient-data",
];
const MODERATOR_PERMISSIONS: &[&str] = &[
    "publish-audio",
    "publish-video",
    "publish-screen",
    "transient-data",
    "control",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredRoom {
    name: String,
    /// Argon2id PHC string; absent = no password.
    #[serde(default)]
    password_hash: Option<String>,
    /// Hex SHA-256 of the moderator key given to the creator.
    moderator_key_sha256: String,
    created: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RoomFile {
    rooms: BTreeMap<String, StoredRoom>,
}

#[derive(Debug, Clone)]
struct Ticket {
    room: String,
    display_name: String,
    moderator: bool,
    issued: Instant,
    in_call: u32,
}

/// What the page needs to connect after a granted join.
#[derive(Debug, Clone, Serialize)]
pub struct JoinGrant {
    pub url: &'static str,
    pub token: String,
    pub roomid: String,
    /// Talk's room session id, to send in the `room` request.
    pub sessionid: String,
    pub moderator: bool,
    /// Set when this join created the room: the key that makes its holder moderator again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moderator_key: Option<String>,
}

/// Public facts about a room.
#[derive(Debug, Clone, Serialize)]
pub struct RoomInfo {
    pub id: String,
    pub name: String,
    pub password: bool,
}

pub struct BuiltinBackend {
    signing_key: jsonwebtoken::EncodingKey,
    capabilities: Arc<Capabilities>,
    store_path: Option<PathBuf>,
    rooms: Mutex<RoomFile>,
    tickets: Mutex<HashMap<String, Ticket>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A room id as it appears in links: 3 to 64 letters, digits, `-` or `_`.
pub fn valid_room_id(id: &str) -> bool {
    (3..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn clean_text(s: &str, max: usize) -> Option<String> {
    let t = s.trim();
    (!t.is_empty() && t.chars().count() <= max && !t.chars().any(char::is_control))
        .then(|| t.to_string())
}

fn sha256_hex(s: &str) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, s.as_bytes()).as_ref())
}

fn invalid(code: &str, message: &str) -> ApiError {
    ApiError::new(code, message)
}

/// An argon2id hash of a room password (PHC string), with a random salt.
pub fn hash_password(password: &str) -> Result<String, ApiError> {
    let salt_bytes = secrets::random(16).map_err(|e| invalid("internal_error", &e.to_string()))?;
    let salt = SaltString::encode_b64(&salt_bytes)
        .map_err(|e| invalid("internal_error", &e.to_string()))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| invalid("internal_error", &e.to_string()))
}

fn password_matches(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

impl BuiltinBackend {
    /// A backend keeping its rooms in `store_path` (read now if it exists), or in memory only.
    pub fn new(store_path: Option<PathBuf>) -> anyhow::Result<Self> {
        let key = Ed25519KeyPair::generate()
            .map_err(|_| anyhow::anyhow!("cannot create the built-in backend's signing key"))?;
        let pkcs8 = key
            .to_pkcs8()
            .map_err(|_| anyhow::anyhow!("cannot encode the built-in backend's signing key"))?;
        let public = base64::engine::general_purpose::STANDARD.encode(key.public_key().as_ref());
        let rooms = match &store_path {
            Some(p) if p.exists() => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?;
                serde_json::from_str(&text).map_err(|e| {
                    anyhow::anyhow!(
                        "{}: not a room file ({e}); restore {}.prev or remove it",
                        p.display(),
                        p.display()
                    )
                })?
            }
            _ => RoomFile::default(),
        };
        Ok(Self {
            signing_key: jsonwebtoken::EncodingKey::from_ed_der(pkcs8.as_ref()),
            capabilities: Arc::new(Capabilities {
                features: Vec::new(),
                hello_v2_key: Some(public),
                session_ping_limit: None,
            }),
            store_path,
            rooms: Mutex::new(rooms),
            tickets: Mutex::new(HashMap::new()),
        })
    }

    fn save(&self, rooms: &RoomFile) -> Result<(), ApiError> {
        let Some(path) = &self.store_path else {
            return Ok(());
        };
        let text = serde_json::to_vec_pretty(rooms)
            .map_err(|e| invalid("internal_error", &e.to_string()))?;
        storage::write_atomic(path, &text, 0o600).map_err(|e| {
            tracing::error!(file = %path.display(), error = %e, "cannot store the rooms");
            invalid("internal_error", "The rooms could not be stored.")
        })
    }

    pub fn room_info(&self, id: &str) -> Option<RoomInfo> {
        lock(&self.rooms).rooms.get(id).map(|r| RoomInfo {
            id: id.to_string(),
            name: r.name.clone(),
            password: r.password_hash.is_some(),
        })
    }

    /// Creates a room. `password_hash` comes from [`hash_password`] (slow; the caller runs it
    /// off the async threads). Returns the room and its moderator key.
    pub fn create_room(
        &self,
        id: Option<&str>,
        name: Option<&str>,
        password_hash: Option<String>,
        now_unix: i64,
    ) -> Result<(RoomInfo, String), ApiError> {
        let id = match id {
            Some(id) if valid_room_id(id) => id.to_string(),
            Some(_) => {
                return Err(invalid(
                    "invalid_room",
                    "A room id has 3 to 64 letters, digits, '-' or '_'.",
                ));
            }
            None => {
                secrets::random_token(9).map_err(|e| invalid("internal_error", &e.to_string()))?
            }
        };
        let name = match name {
            Some(n) => clean_text(n, 100)
                .ok_or_else(|| invalid("invalid_name", "A room name has 1 to 100 characters."))?,
            None => id.clone(),
        };
        let key =
            secrets::random_token(24).map_err(|e| invalid("internal_error", &e.to_string()))?;
        let mut rooms = lock(&self.rooms);
        if rooms.rooms.contains_key(&id) {
            return Err(invalid("room_exists", "A room with this id exists."));
        }
        if rooms.rooms.len() >= MAX_ROOMS {
            return Err(invalid("too_many_rooms", "This box has too many rooms."));
        }
        rooms.rooms.insert(
            id.clone(),
            StoredRoom {
                name: name.clone(),
                password_hash,
                moderator_key_sha256: sha256_hex(&key),
                created: now_unix,
            },
        );
        if let Err(e) = self.save(&rooms) {
            rooms.rooms.remove(&id);
            return Err(e);
        }
        let password = rooms.rooms[&id].password_hash.is_some();
        Ok((RoomInfo { id, name, password }, key))
    }

    /// The password hash a join must match, if the room has one (checked by the caller with
    /// [`Self::check_password`] off the async threads).
    pub fn password_hash(&self, id: &str) -> Option<String> {
        lock(&self.rooms)
            .rooms
            .get(id)
            .and_then(|r| r.password_hash.clone())
    }

    pub fn check_password(hash: &str, password: &str) -> bool {
        password_matches(hash, password)
    }

    /// Grants a join to a room that exists, after the password check passed. A link to a room
    /// that does not exist creates it, with the joiner as its moderator.
    pub fn join(
        &self,
        id: &str,
        display_name: &str,
        moderator_key: Option<&str>,
        now: Instant,
        now_unix: i64,
    ) -> Result<JoinGrant, ApiError> {
        let display_name = clean_text(display_name, 64)
            .ok_or_else(|| invalid("invalid_name", "A display name has 1 to 64 characters."))?;
        let mut created_key = None;
        if self.room_info(id).is_none() {
            let (_, key) = self.create_room(Some(id), None, None, now_unix)?;
            created_key = Some(key);
        }
        let moderator = created_key.is_some()
            || moderator_key.is_some_and(|k| {
                lock(&self.rooms)
                    .rooms
                    .get(id)
                    .is_some_and(|r| r.moderator_key_sha256 == sha256_hex(k))
            });
        let sessionid =
            secrets::random_token(24).map_err(|e| invalid("internal_error", &e.to_string()))?;
        {
            let mut tickets = lock(&self.tickets);
            tickets.retain(|_, t| t.in_call != 0 || now.duration_since(t.issued) < TICKET_LIFETIME);
            if tickets.len() >= MAX_TICKETS {
                return Err(invalid("too_many_requests", "Too many joins at once."));
            }
            tickets.insert(
                sessionid.clone(),
                Ticket {
                    room: id.to_string(),
                    display_name: display_name.clone(),
                    moderator,
                    issued: now,
                    in_call: 0,
                },
            );
        }
        let claims = json!({
            "iss": BUILTIN_URL,
            "iat": now_unix,
            "exp": now_unix + TOKEN_LIFETIME_S,
            "userdata": {"displayname": display_name},
        });
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
            &claims,
            &self.signing_key,
        )
        .map_err(|e| invalid("internal_error", &e.to_string()))?;
        Ok(JoinGrant {
            url: BUILTIN_URL,
            token,
            roomid: id.to_string(),
            sessionid,
            moderator,
            moderator_key: created_key,
        })
    }

    /// Sets the in-call flags of a room session of `room` and returns the `incall` backend
    /// request Talk would send for it.
    pub fn in_call(
        &self,
        room: &str,
        room_session_id: &str,
        in_call: u32,
    ) -> Result<Value, ApiError> {
        let mut tickets = lock(&self.tickets);
        let t = tickets
            .get_mut(room_session_id)
            .filter(|t| t.room == room)
            .ok_or_else(|| invalid("no_such_session", "This room session is not in this room."))?;
        t.in_call = in_call;
        let entry = |rsid: &str, t: &Ticket| {
            json!({
                "sessionId": rsid,
                "inCall": t.in_call,
                "participantType": if t.moderator { 6 } else { 4 },
                "actorType": "guests",
                "displayName": t.display_name,
                "lastPing": 0,
            })
        };
        let changed = vec![entry(room_session_id, &tickets[room_session_id])];
        let users: Vec<Value> = tickets
            .iter()
            .filter(|(_, t)| t.room == room && t.in_call != 0)
            .map(|(k, t)| entry(k, t))
            .collect();
        Ok(json!({"type":"incall","incall":{"incall":in_call,"changed":changed,"users":users}}))
    }

    /// Talk's answer to a `room` request.
    fn answer_room(&self, r: &Value) -> Result<Value, ApiError> {
        let room_id = r["roomid"].as_str().unwrap_or("");
        let rsid = r["sessionid"].as_str().unwrap_or("");
        if r["action"] == "leave" {
            lock(&self.tickets).remove(rsid);
            return Ok(json!({"type":"room","room":{"version":"1.0","roomid":room_id}}));
        }
        let ticket = lock(&self.tickets)
            .get(rsid)
            .filter(|t| t.room == room_id)
            .cloned()
            .ok_or_else(|| {
                invalid(
                    "no_such_room",
                    "The room does not exist or the session may not join it.",
                )
            })?;
        let name = self
            .room_info(room_id)
            .map(|i| i.name)
            .ok_or_else(|| invalid("no_such_room", "The room does not exist."))?;
        let permissions = if ticket.moderator {
            MODERATOR_PERMISSIONS
        } else {
            GUEST_PERMISSIONS
        };
        Ok(json!({"type":"room","room":{
            "version":"1.0",
            "roomid":room_id,
            // Talk's room type 3 is a public room (guests allowed).
            "properties":{"name":name,"type":3,"lobby-state":0,"read-only":0,"sip-enabled":0},
            "permissions":permissions,
        }}))
    }
}

impl BackendClient for BuiltinBackend {
    fn capabilities<'a>(
        &'a self,
        _url: &'a str,
        _refresh: bool,
    ) -> BoxFuture<'a, Arc<Capabilities>> {
        let c = self.capabilities.clone();
        Box::pin(async move { c })
    }

    fn request<'a>(
        &'a self,
        _backend: &'a Backend,
        _url: &'a str,
        body: &'a Value,
    ) -> BoxFuture<'a, Result<Value, ApiError>> {
        let answer = match body["type"].as_str() {
            Some("room") => self.answer_room(&body["room"]),
            Some("ping") => Ok(json!({"type":"room","room":{"version":"1.0"}})),
            // Hello v1 tickets are Talk's; stand-alone rooms use hello v2 only.
            Some("auth") => Err(invalid(
                "invalid_ticket",
                "The built-in backend accepts hello v2 tokens only.",
            )),
            _ => Err(invalid("unknown_type", "Unknown request type.")),
        };
        Box::pin(async move { answer })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> Backend {
        Backend {
            id: BUILTIN_ID.into(),
            urls: vec![BUILTIN_URL.into()],
            secret: Vec::new(),
            session_limit: 0,
            max_stream_bitrate: 1,
            max_screen_bitrate: 1,
        }
    }

    #[tokio::test]
    async fn a_link_creates_the_room_and_its_creator_is_moderator() {
        let b = BuiltinBackend::new(None).expect("backend");
        let now = Instant::now();
        let g = b
            .join("team-room", "Alice", None, now, 1_800_000_000)
            .expect("join");
        assert!(g.moderator && g.moderator_key.is_some());
        let key = b
            .capabilities(BUILTIN_URL, false)
            .await
            .hello_v2_key
            .clone();
        let claims = super::super::jwt::verify(&g.token, key.as_deref(), 1_800_000_000)
            .expect("token verifies with the published key");
        assert_eq!(claims.user_id, "");
        assert_eq!(claims.user_data, Some(json!({"displayname":"Alice"})));
        let guest = b
            .join("team-room", "Bob", None, now, 1_800_000_000)
            .expect("join");
        assert!(!guest.moderator);
        let again = b
            .join(
                "team-room",
                "Alice",
                g.moderator_key.as_deref(),
                now,
                1_800_000_000,
            )
            .expect("join");
        assert!(
            again.moderator,
            "the moderator key makes its holder moderator again"
        );

        let be = backend();
        let r = super::super::backend_client::room(
            &b,
            &be,
            BUILTIN_URL,
            "team-room",
            "",
            &guest.sessionid,
            false,
        )
        .await
        .expect("room");
        assert_eq!(r["properties"]["name"], "team-room");
        assert!(
            !r["permissions"]
                .as_array()
                .expect("list")
                .contains(&json!("control"))
        );
        let r = super::super::backend_client::room(
            &b,
            &be,
            BUILTIN_URL,
            "team-room",
            "",
            &g.sessionid,
            false,
        )
        .await
        .expect("room");
        assert!(
            r["permissions"]
                .as_array()
                .expect("list")
                .contains(&json!("control"))
        );
        let e = super::super::backend_client::room(
            &b,
            &be,
            BUILTIN_URL,
            "other",
            "",
            &g.sessionid,
            false,
        )
        .await
        .expect_err("a ticket is for its room only");
        assert_eq!(e.code, "no_such_room");
    }

    #[test]
    fn passwords_are_argon2id_and_rooms_survive_a_restart() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("rooms.json");
        let b = BuiltinBackend::new(Some(path.clone())).expect("backend");
        let hash = hash_password("s3cret pass").expect("hash");
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        let (info, _) = b
            .create_room(Some("board"), Some("Board meeting"), Some(hash), 1)
            .expect("create");
        assert!(info.password);
        let text = std::fs::read_to_string(&path).expect("stored");
        assert!(
            !text.contains("s3cret"),
            "the password itself is never stored"
        );
        let b2 = BuiltinBackend::new(Some(path)).expect("reload");
        let h = b2.password_hash("board").expect("has a password");
        assert!(BuiltinBackend::check_password(&h, "s3cret pass"));
        assert!(!BuiltinBackend::check_password(&h, "wrong"));
        assert_eq!(b2.room_info("board").expect("room").name, "Board meeting");
        assert_eq!(
            b2.create_room(Some("board"), None, None, 1)
                .expect_err("dup")
                .code,
            "room_exists"
        );
        assert_eq!(
            b2.create_room(Some("a/b"), None, None, 1)
                .expect_err("bad id")
                .code,
            "invalid_room"
        );
    }

    #[test]
    fn in_call_builds_talks_incall_request_with_every_participant_in_the_call() {
        let b = BuiltinBackend::new(None).expect("backend");
        let now = Instant::now();
        let a = b.join("room1", "A", None, now, 1).expect("a");
        let c = b.join("room1", "C", None, now, 1).expect("c");
        b.in_call("room1", &a.sessionid, 7).expect("a in call");
        assert!(
            b.in_call("room2", &c.sessionid, 3).is_err(),
            "a ticket is for its room"
        );
        let body = b.in_call("room1", &c.sessionid, 3).expect("c in call");
        assert_eq!(body["type"], "incall");
        assert_eq!(
            body["incall"]["changed"][0]["sessionId"],
            c.sessionid.as_str()
        );
        assert_eq!(body["incall"]["users"].as_array().map(Vec::len), Some(2));
        assert!(b.in_call("room1", "nope", 1).is_err());
    }
}
