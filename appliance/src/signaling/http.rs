//! The HTTP side of the signaling service: the `/spreed` upgrade, the backend API Nextcloud
//! calls (`POST /api/v1/room/{token}`), `/api/v1/welcome`, `/api/v1/stats`,
//! `/api/v1/serverinfo`, `/metrics` and `/turn/credentials`.
//!
//! Every response carries `X-Spreed-Signaling-Features` and `Server` (hyper adds `Date`), as
//! Talk's compatibility check reads them. Backend requests are authenticated by their HMAC
//! before their body is parsed; bodies are limited to 1 MiB.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::api::{self, MAX_FRAME_BYTES};
use super::checksum;
use super::connection;
use super::server::{Server, unix_now};

/// Largest backend request body (Talk sends whole participant lists; upstream allows 256 KiB).
pub const MAX_BACKEND_BODY: usize = 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub server: Arc<Server>,
    pub shutdown: watch::Receiver<bool>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/spreed", get(spreed))
        .route("/api/v1/welcome", get(welcome))
        .route("/api/v1/room/{token}", post(room_request))
        .route("/api/v1/talkbox/backend-seen", post(backend_seen))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/serverinfo", get(serverinfo))
        .route("/metrics", get(metrics))
        .route("/turn/credentials", get(turn_credentials))
        .merge(super::meeting::routes())
        .layer(DefaultBodyLimit::max(MAX_BACKEND_BODY))
        .with_state(state)
        .layer(axum::middleware::map_response(feature_headers))
}

async fn feature_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&api::features(false).join(",")) {
        h.insert(checksum::HEADER_FEATURES, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!(
        "nextcloud-spreed-signaling/{}",
        api::SERVER_VERSION
    )) {
        h.insert(header::SERVER, v);
    }
    r
}

/// The client address, from a trusted reverse proxy's header where there is one.
fn client_ip(server: &Server, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
    let ip = peer.ip().to_canonical();
    if !server.config.trusted_proxies.contains(&ip) {
        return ip;
    }
    let from_header = headers
        .get("x-real-ip")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next_back())
        })
        .and_then(|v| v.trim().parse::<IpAddr>().ok());
    from_header.unwrap_or(ip)
}

/// Initial read buffer of a client WebSocket (see [`spreed`]). tungstenite zero-fills it, so
/// all of it is resident for every idle session: 4 KiB of the 14 KiB per idle session measured
/// with 4096. Signaling frames are mostly a few hundred bytes; a larger one makes the buffer
/// grow to the frame's size (up to MAX_FRAME_BYTES), and at most this much is read per call.
const WS_READ_BUFFER: usize = 1024;

async fn spreed(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let ip = client_ip(&st.server, peer, &headers);
    ws.max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        // tungstenite allocates its read buffer up front (128 KiB by default) and it ends up
        // resident: measured 144 KiB RSS per idle session (benches/signaling). Signaling frames
        // are small; the buffer still grows for a larger frame, up to MAX_FRAME_BYTES.
        .read_buffer_size(WS_READ_BUFFER)
        .on_upgrade(move |socket| connection::run(st.server, socket, ip, st.shutdown))
}

async fn welcome() -> Response {
    axum::Json(json!({"nextcloud-spreed-signaling": "Welcome", "version": api::SERVER_VERSION}))
        .into_response()
}

fn error(status: StatusCode, text: &str) -> Response {
    (status, format!("{text}\n")).into_response()
}

async fn room_request(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let server = &st.server;
    let ip = client_ip(server, peer, &headers);
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !header(header::CONTENT_TYPE.as_str()).starts_with("application/json") {
        return error(
            StatusCode::BAD_REQUEST,
            "Content-Type must be application/json",
        );
    }
    let (random, sum) = (
        header(checksum::HEADER_RANDOM),
        header(checksum::HEADER_CHECKSUM),
    );
    if random.is_empty() || sum.is_empty() {
        return error(
            StatusCode::FORBIDDEN,
            "Authentication check failed: Spreed-Signaling-Random and -Checksum are required",
        );
    }
    if !server.backend_request_allowed(ip) {
        return error(StatusCode::TOO_MANY_REQUESTS, "Too many requests");
    }
    let backend_url = header(checksum::HEADER_BACKEND);
    let candidates: Vec<_> = if backend_url.is_empty() {
        server.backends.all().cloned().collect()
    } else {
        match server.backends.for_url(backend_url) {
            // The built-in backend is answered in-process; it takes no requests over HTTP.
            Some(b) if b.id != super::builtin::BUILTIN_ID => vec![b.clone()],
            _ => {
                server.backend_request_failed(ip);
                return (StatusCode::FORBIDDEN, axum::Json(json!({"type":"error","error":{"code":"invalid_backend","message":"The backend URL is not allowed."}}))).into_response();
            }
        }
    };
    let Some(backend) = candidates
        .into_iter()
        .find(|b| checksum::verify(random, &body, &b.secret, sum))
    else {
        server.backend_request_failed(ip);
        server.seen.record(&token, "", false);
        return error(StatusCode::FORBIDDEN, "Authentication check failed");
    };
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "Could not parse the request body as a JSON object",
            );
        }
    };
    server
        .seen
        .record(&token, req["type"].as_str().unwrap_or(""), true);
    if token.is_empty() || token.len() > 256 {
        return error(
            StatusCode::BAD_REQUEST,
            "room token must be 1 to 256 characters",
        );
    }
    match server.backend_room_request(&backend, &token, &req).await {
        Ok(v) => axum::Json(v).into_response(),
        Err((status, v)) => (status, axum::Json(v)).into_response(),
    }
}

/// The setup page's question "did a backend request for this room token arrive?" (see
/// [`super::seen`]). Asked with a backend's secret like a backend request (`{"token": …}`,
/// random + checksum headers); answered with `{"token", "nonce" (the question's random),
/// "seen": [{"type", "ok", "age_s"}]}`, signed the same way with the same secret, so the asker
/// can trust the answer without checking this server's certificate. Not a Talk API.
async fn backend_seen(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let server = &st.server;
    let ip = client_ip(server, peer, &headers);
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    let (random, sum) = (
        header(checksum::HEADER_RANDOM),
        header(checksum::HEADER_CHECKSUM),
    );
    if !server.backend_request_allowed(ip) {
        return error(StatusCode::TOO_MANY_REQUESTS, "Too many requests");
    }
    let Some(backend) = server
        .backends
        .all()
        .find(|b| checksum::verify(random, &body, &b.secret, sum))
    else {
        server.backend_request_failed(ip);
        return error(StatusCode::FORBIDDEN, "Authentication check failed");
    };
    let Some(token) = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["token"].as_str().map(str::to_string))
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "the body must be {\"token\": \"<room token>\"}",
        );
    };
    let seen: Vec<Value> = server
        .seen
        .for_token(&token)
        .iter()
        .map(|s| json!({"type": s.kind, "ok": s.ok, "age_s": s.at.elapsed().as_secs()}))
        .collect();
    let answer = json!({"token": token, "nonce": random, "seen": seen}).to_string();
    let reply_random = checksum::new_random();
    let reply_sum = checksum::calculate(&reply_random, answer.as_bytes(), &backend.secret);
    (
        [
            (
                header::CONTENT_TYPE.as_str(),
                "application/json".to_string(),
            ),
            (checksum::HEADER_RANDOM, reply_random),
            (checksum::HEADER_CHECKSUM, reply_sum),
        ],
        answer,
    )
        .into_response()
}

fn stats_allowed(server: &Server, peer: SocketAddr) -> bool {
    server
        .config
        .stats_allowed_ips
        .contains(&peer.ip().to_canonical())
}

async fn stats(State(st): State<AppState>, ConnectInfo(peer): ConnectInfo<SocketAddr>) -> Response {
    if !stats_allowed(&st.server, peer) {
        return error(StatusCode::FORBIDDEN, "Authentication check failed");
    }
    let hub = st.server.hub();
    axum::Json(json!({"rooms": hub.room_count(), "sessions": hub.session_count()})).into_response()
}

async fn serverinfo(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if !stats_allowed(&st.server, peer) {
        return error(StatusCode::FORBIDDEN, "Authentication check failed");
    }
    let server = &st.server;
    let connected = server.hub().sfu_connected();
    let sfu = match &server.proxy {
        Some(p) => {
            let (publishers, subscribers) =
                p.clients.lock().map(|c| c.counts()).unwrap_or_default();
            json!({"mode": "proxy", "url": server.config.sfu_url, "connected": connected,
                   "load": p.load(), "publishers": publishers, "subscribers": subscribers})
        }
        None => json!({"mode": "none"}),
    };
    axum::Json(json!({
        "version": api::SERVER_VERSION,
        "features": api::features(connected),
        "sfu": sfu,
    }))
    .into_response()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct SessionLabels {
    backend: String,
    clienttype: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct TypeLabels {
    r#type: String,
}

async fn metrics(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if !stats_allowed(&st.server, peer) {
        return error(StatusCode::FORBIDDEN, "Authentication check failed");
    }
    let server = &st.server;
    let mut registry = Registry::with_prefix("signaling");
    let sessions = Family::<SessionLabels, Gauge>::default();
    let rooms = Gauge::<i64>::default();
    {
        let hub = server.hub();
        for ((backend, kind), n) in hub.session_counts() {
            sessions
                .get_or_create(&SessionLabels {
                    backend,
                    clienttype: kind.to_string(),
                })
                .set(n);
        }
        rooms.set(hub.room_count() as i64);
    }
    registry.register("hub_sessions", "The current number of sessions", sessions);
    registry.register("hub_rooms", "The current number of rooms", rooms);
    // Counters are kept by the server; they are exposed as gauges of their running totals.
    let messages = Family::<TypeLabels, Gauge>::default();
    for (kind, n) in server
        .counters
        .messages
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default()
    {
        messages
            .get_or_create(&TypeLabels { r#type: kind })
            .set(n as i64);
    }
    registry.register(
        "server_messages",
        "The total number of signaling messages by type",
        messages,
    );
    let gauge = |v: u64| {
        let g = Gauge::<i64>::default();
        g.set(v as i64);
        g
    };
    registry.register(
        "backend_client_requests",
        "The total number of backend client requests",
        gauge(server.counters.backend_requests.load(Ordering::Relaxed)),
    );
    registry.register(
        "backend_client_errors",
        "The total number of backend client errors",
        gauge(server.counters.backend_errors.load(Ordering::Relaxed)),
    );
    registry.register(
        "throttle_bruteforce",
        "The total number of rate-limited requests",
        gauge(server.counters.bruteforce.load(Ordering::Relaxed)),
    );
    let mut text = String::new();
    if encode(&mut text, &registry).is_err() {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "could not encode metrics",
        );
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct TurnQuery {
    service: Option<String>,
    username: Option<String>,
    key: Option<String>,
    api: Option<String>,
}

/// The Janus-style TURN REST endpoint: `?service=turn&username=U&key=API_KEY`.
async fn turn_credentials(State(st): State<AppState>, Query(q): Query<TurnQuery>) -> Response {
    let server = &st.server;
    let key = q.key.or(q.api).unwrap_or_default();
    if q.service.as_deref() != Some("turn") || key.is_empty() {
        return error(StatusCode::BAD_REQUEST, "service=turn and key are required");
    }
    if !checksum::constant_time_eq(key.as_bytes(), &server.internal_secret) {
        return error(StatusCode::FORBIDDEN, "Authentication check failed");
    }
    if server.config.turn_servers.is_empty() {
        return error(StatusCode::NOT_FOUND, "No TURN servers available");
    }
    let name = q
        .username
        .filter(|u| !u.is_empty() && u.len() <= 128 && !u.contains(':'))
        .unwrap_or_else(|| checksum::new_random()[..32].to_string());
    let ttl = 86_400;
    let (username, password) =
        checksum::turn_credentials(&server.turn_secret, (unix_now() + ttl) as u64, &name);
    axum::Json(json!({"username": username, "password": password, "ttl": ttl, "uris": server.config.turn_servers})).into_response()
}
