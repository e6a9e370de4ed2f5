//! The meeting page and the built-in backend's room API, served by the signaling service.
//!
//! - `GET /` and `GET /r/{room}`: the meeting page (HTML, CSS and JS embedded in the binary);
//! - `POST /api/v1/rooms`: create a room (`{id?, name?, password?}`), answers its moderator key;
//! - `GET /api/v1/rooms/{room}`: name and whether a password is needed;
//! - `POST /api/v1/rooms/{room}/join`: `{displayname, password?, moderator_key?}` → a hello-v2
//!   token, the room session id and ICE servers (TURN REST credentials from the TURN secret);
//! - `POST /api/v1/rooms/{room}/incall`: `{sessionid, incall}`, what Talk's "join call" does:
//!   it reaches the hub as Talk's `incall` backend request.
//!
//! The page then speaks the spreed protocol on `/spreed` like any Talk client. docs/meeting.md
//! describes the API. Bodies are JSON of at most 4 KiB; creation and failed passwords are
//! throttled per address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::api::ApiError;
use super::builtin::{self, BuiltinBackend};
use super::checksum;
use super::http::AppState;
use super::server::{Server, unix_now};

const PAGE_HTML: &str = include_str!("meeting/index.html");
const PAGE_JS: &str = include_str!("meeting/meeting.js");
const PAGE_CSS: &str = include_str!("meeting/meeting.css");

/// Largest request body of the room API.
const MAX_BODY: usize = 4096;
/// Lifetime of the TURN credentials given to the page (Talk gives 24 h as well).
const TURN_CREDENTIAL_TTL_S: i64 = 86_400;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(page))
        .route("/r/{room}", get(page))
        .route("/meeting.js", get(script))
        .route("/meeting.css", get(style))
        .route("/api/v1/rooms", post(create))
        .route("/api/v1/rooms/{room}", get(info))
        .route("/api/v1/rooms/{room}/join", post(join))
        .route("/api/v1/rooms/{room}/incall", post(in_call))
}

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn page() -> Response {
    let mut r = static_file("text/html; charset=utf-8", PAGE_HTML);
    if let Ok(v) = header::HeaderValue::from_str(
        "default-src 'self'; connect-src 'self' ws: wss:; media-src 'self' blob: mediastream:; img-src 'self' data:; frame-ancestors 'none'",
    ) {
        r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
    }
    r
}

async fn script() -> Response {
    static_file("text/javascript; charset=utf-8", PAGE_JS)
}

async fn style() -> Response {
    static_file("text/css; charset=utf-8", PAGE_CSS)
}

fn reply(status: StatusCode, v: Value) -> Response {
    (status, axum::Json(v)).into_response()
}

fn fail(status: StatusCode, e: &ApiError) -> Response {
    reply(status, e.to_json(None))
}

/// A refused request: the status and the error shown to the page.
struct Reject(StatusCode, ApiError);

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        fail(self.0, &self.1)
    }
}

impl From<ApiError> for Reject {
    fn from(e: ApiError) -> Self {
        Reject(status_of(&e), e)
    }
}

fn status_of(e: &ApiError) -> StatusCode {
    match e.code.as_str() {
        "room_exists" => StatusCode::CONFLICT,
        "no_such_room" => StatusCode::NOT_FOUND,
        "no_such_session" => StatusCode::NOT_FOUND,
        "too_many_rooms" | "too_many_requests" => StatusCode::TOO_MANY_REQUESTS,
        "internal_error" => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    }
}

/// The built-in backend, or the 404 that says it is switched off.
fn builtin_of(server: &Server) -> Result<Arc<BuiltinBackend>, Reject> {
    server.builtin.clone().ok_or_else(|| {
        Reject(
            StatusCode::NOT_FOUND,
            ApiError::new(
                "builtin_disabled",
                "Stand-alone rooms are switched off (signaling.builtin_backend).",
            ),
        )
    })
}

fn parse_body(body: &Bytes) -> Result<Value, Reject> {
    if body.len() > MAX_BODY {
        return Err(Reject(
            StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::new("invalid_format", "The body may have at most 4096 bytes."),
        ));
    }
    match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err(Reject(
            StatusCode::BAD_REQUEST,
            ApiError::new("invalid_format", "The body must be a JSON object."),
        )),
    }
}

fn opt_str<'a>(v: &'a Value, key: &str) -> Result<Option<&'a str>, Reject> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= 1024 => Ok(Some(s.as_str())),
        _ => Err(Reject(
            StatusCode::BAD_REQUEST,
            ApiError::new(
                "invalid_format",
                format!("{key} must be a string of at most 1024 bytes"),
            ),
        )),
    }
}

fn too_many() -> Reject {
    Reject(
        StatusCode::TOO_MANY_REQUESTS,
        ApiError::new("too_many_requests", "Too many requests."),
    )
}

/// Hashes a password off the async threads (argon2 is slow on purpose).
async fn hash(password: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || builtin::hash_password(&password))
        .await
        .map_err(|e| ApiError::new("internal_error", e.to_string()))?
}

async fn create(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Result<Response, Reject> {
    let server = &st.server;
    let b = builtin_of(server)?;
    let ip = peer.ip().to_canonical();
    if server.throttled(ip, "create_room") {
        return Err(too_many());
    }
    // Each creation counts against the address, so one client cannot fill the box with rooms.
    server.failed_attempt(ip, "create_room");
    let v = parse_body(&body)?;
    let (id, name, password) = (
        opt_str(&v, "id")?,
        opt_str(&v, "name")?,
        opt_str(&v, "password")?,
    );
    let password_hash = match password.filter(|p| !p.is_empty()) {
        Some(p) => Some(hash(p.to_string()).await?),
        None => None,
    };
    let (info, key) = b.create_room(id, name, password_hash, unix_now())?;
    Ok(reply(
        StatusCode::CREATED,
        json!({"id": info.id, "name": info.name, "password": info.password,
               "link": format!("/r/{}", info.id), "moderator_key": key}),
    ))
}

async fn info(State(st): State<AppState>, Path(room): Path<String>) -> Result<Response, Reject> {
    let b = builtin_of(&st.server)?;
    match b.room_info(&room) {
        Some(i) => Ok(reply(StatusCode::OK, json!(i))),
        None => Err(Reject(
            StatusCode::NOT_FOUND,
            ApiError::new("no_such_room", "No room with this id; joining creates it."),
        )),
    }
}

/// TURN servers with REST credentials for the host the browser reached us by.
fn ice_servers(server: &Server, headers: &HeaderMap) -> Value {
    let Some(port) = server.turn_port else {
        return json!([]);
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<axum::http::uri::Authority>().ok())
        .map(|a| a.host().to_string())
        .unwrap_or_else(|| "127.0.0.1".into());
    let name = checksum::new_random()[..16].to_string();
    let (username, credential) = checksum::turn_credentials(
        &server.turn_secret,
        (unix_now() + TURN_CREDENTIAL_TTL_S) as u64,
        &name,
    );
    json!([{
        "urls": [format!("turn:{host}:{port}?transport=udp"), format!("turn:{host}:{port}?transport=tcp")],
        "username": username,
        "credential": credential,
    }])
}

async fn join(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Reject> {
    let server = &st.server;
    let b = builtin_of(server)?;
    if !builtin::valid_room_id(&room) {
        return Err(Reject(
            StatusCode::BAD_REQUEST,
            ApiError::new(
                "invalid_room",
                "A room id has 3 to 64 letters, digits, '-' or '_'.",
            ),
        ));
    }
    let ip = peer.ip().to_canonical();
    if server.throttled(ip, "room_password") {
        return Err(too_many());
    }
    let v = parse_body(&body)?;
    // Opening a link to a room that does not exist creates it: that counts as a creation.
    if b.room_info(&room).is_none() {
        if server.throttled(ip, "create_room") {
            return Err(too_many());
        }
        server.failed_attempt(ip, "create_room");
    }
    let name = opt_str(&v, "displayname")?.unwrap_or("");
    let password = opt_str(&v, "password")?.unwrap_or("");
    let key = opt_str(&v, "moderator_key")?;
    if let Some(hash) = b.password_hash(&room) {
        let password = password.to_string();
        let ok =
            tokio::task::spawn_blocking(move || BuiltinBackend::check_password(&hash, &password))
                .await
                .unwrap_or(false);
        if !ok {
            server.failed_attempt(ip, "room_password");
            return Err(Reject(
                StatusCode::FORBIDDEN,
                ApiError::new("wrong_password", "The room password is not right."),
            ));
        }
    }
    let grant = b.join(&room, name, key, Instant::now(), unix_now())?;
    let mut v = json!(grant);
    v["ice_servers"] = ice_servers(server, &headers);
    Ok(reply(StatusCode::OK, v))
}

async fn in_call(
    State(st): State<AppState>,
    Path(room): Path<String>,
    body: Bytes,
) -> Result<Response, Reject> {
    let server = &st.server;
    let b = builtin_of(server)?;
    let v = parse_body(&body)?;
    let Some(rsid) = v["sessionid"].as_str() else {
        return Err(Reject(
            StatusCode::BAD_REQUEST,
            ApiError::new("invalid_format", "sessionid is required"),
        ));
    };
    let flags = v["incall"].as_u64().filter(|f| *f <= 15).unwrap_or(0) as u32;
    let request = b.in_call(&room, rsid, flags)?;
    let Some(backend) = server.backends.builtin().cloned() else {
        return Err(Reject(
            StatusCode::NOT_FOUND,
            ApiError::new("builtin_disabled", "Stand-alone rooms are switched off."),
        ));
    };
    // The same handler Talk's `incall` request reaches over the backend API.
    Ok(
        match server.backend_room_request(&backend, &room, &request).await {
            Ok(v) => reply(StatusCode::OK, v),
            Err((status, v)) => reply(status, v),
        },
    )
}
