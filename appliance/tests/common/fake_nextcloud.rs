//! A Nextcloud stand-in for the setup page's tests: a real HTTP peer on loopback that answers
//! the capabilities and signaling-backend calls the box makes (checking the box's checksum),
//! and that, like Talk's BackendNotifier, announces conversation changes to its signaling
//! server with a signed `POST <signaling url>api/v1/room/{token}` (Spreed-Signaling-Random,
//! -Checksum = hex(HMAC-SHA256(secret, random ‖ body)), -Backend = its own URL) over HTTPS
//! (curl -k: Talk with "Validate SSL certificate" off). Its signaling URL, secret and clock
//! offset are what a test "pastes into Talk's settings".

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use appliance::signaling::checksum;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde_json::{Value, json};

/// What the stand-in knows: what an admin pasted into Talk's settings, and its clock offset.
#[derive(Default)]
pub struct Talk {
    /// Its own base URL: Talk sends it as Spreed-Signaling-Backend.
    pub base: String,
    pub signaling_url: String,
    pub secret: String,
    pub skew_s: i64,
    /// Every announcement sent to the signaling server: (type, HTTP status, feature header).
    pub sent: Vec<(String, u32, String)>,
    pub rooms: u32,
}

pub type Shared = Arc<Mutex<Talk>>;

pub const ADMIN: &str = "admin";
pub const APP_PASSWORD: &str = "app-password-1";

fn ocs(status: StatusCode, data: Value, skew_s: i64) -> Response {
    let date = SystemTime::now()
        .checked_add(Duration::from_secs(skew_s.max(0) as u64))
        .and_then(|t| t.checked_sub(Duration::from_secs((-skew_s).max(0) as u64)))
        .unwrap_or_else(SystemTime::now);
    (
        status,
        [(header::DATE, httpdate::fmt_http_date(date))],
        axum::Json(
            json!({"ocs": {"meta": {"status": "ok", "statuscode": status.as_u16()}, "data": data}}),
        ),
    )
        .into_response()
}

async fn capabilities(State(t): State<Shared>) -> Response {
    let skew = t.lock().expect("lock").skew_s;
    ocs(
        StatusCode::OK,
        json!({"capabilities": {"spreed": {"features": ["signaling-v3", "audio-video-permissions"],
            "config": {"signaling": {"session-ping-limit": 200}}}}}),
        skew,
    )
}

/// Talk's signaling backend endpoint: checks the box's checksum; the probe room does not exist.
async fn backend(State(t): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let (secret, skew) = {
        let t = t.lock().expect("lock");
        (t.secret.clone(), t.skew_s)
    };
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !checksum::verify(
        h(checksum::HEADER_RANDOM),
        &body,
        secret.as_bytes(),
        h(checksum::HEADER_CHECKSUM),
    ) {
        return ocs(
            StatusCode::OK,
            json!({"type": "error", "error": {"code": "invalid_request", "message": "The request could not be authenticated."}}),
            skew,
        );
    }
    ocs(
        StatusCode::OK,
        json!({"type": "error", "error": {"code": "no_such_room", "message": "The user is not invited to this room."}}),
        skew,
    )
}

fn admin_ok(headers: &HeaderMap) -> bool {
    use base64::Engine;
    let want = base64::engine::general_purpose::STANDARD.encode(format!("{ADMIN}:{APP_PASSWORD}"));
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(format!("Basic {want}").as_str())
}

/// What Talk's BackendNotifier does: a signed POST to `<signaling url>api/v1/room/<token>`.
async fn announce(t: &Shared, token: &str, body: Value) {
    let (url, secret, base) = {
        let t = t.lock().expect("lock");
        (t.signaling_url.clone(), t.secret.clone(), t.base.clone())
    };
    let body = body.to_string();
    let random = checksum::new_random();
    let sum = checksum::calculate(&random, body.as_bytes(), secret.as_bytes());
    let kind = serde_json::from_str::<Value>(&body).expect("json")["type"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let target = format!("{}api/v1/room/{token}", url);
    let out = tokio::task::spawn_blocking(move || {
        // -k: the box still has its self-signed certificate (Talk's "Validate SSL certificate"
        // switched off).
        Command::new("curl")
            .args([
                "-sk",
                "--max-time",
                "10",
                "-D",
                "-",
                "-o",
                "/dev/null",
                "-X",
                "POST",
            ])
            .args(["-H", "Content-Type: application/json"])
            .arg("-H")
            .arg(format!("Spreed-Signaling-Random: {random}"))
            .arg("-H")
            .arg(format!("Spreed-Signaling-Checksum: {sum}"))
            .arg("-H")
            .arg(format!("Spreed-Signaling-Backend: {base}"))
            .arg("--data-binary")
            .arg(body)
            .arg(target)
            .output()
            .expect("curl")
    })
    .await
    .expect("join");
    let head = String::from_utf8_lossy(&out.stdout).to_string();
    let code = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let features = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-spreed-signaling-features:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    t.lock().expect("lock").sent.push((kind, code, features));
}

async fn create_room(State(t): State<Shared>, headers: HeaderMap) -> Response {
    let skew = t.lock().expect("lock").skew_s;
    if !admin_ok(&headers) {
        return ocs(StatusCode::UNAUTHORIZED, json!([]), skew);
    }
    let token = {
        let mut t = t.lock().expect("lock");
        t.rooms += 1;
        format!("tst{:05}", t.rooms)
    };
    announce(
        &t,
        &token,
        json!({"type": "invite", "invite": {"userids": [ADMIN], "alluserids": [ADMIN],
            "properties": {"name": "talkbox connection test", "type": 3}}}),
    )
    .await;
    ocs(
        StatusCode::CREATED,
        json!({"token": token, "type": 3}),
        skew,
    )
}

async fn delete_room(
    State(t): State<Shared>,
    UrlPath(token): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let skew = t.lock().expect("lock").skew_s;
    if !admin_ok(&headers) {
        return ocs(StatusCode::UNAUTHORIZED, json!([]), skew);
    }
    announce(
        &t,
        &token,
        json!({"type": "delete", "delete": {"userids": [ADMIN]}}),
    )
    .await;
    ocs(StatusCode::OK, json!([]), skew)
}

/// Starts the stand-in on a loopback port; it runs on the caller's tokio runtime.
pub async fn start() -> (Shared, SocketAddr) {
    let talk: Shared = Arc::default();
    let app = axum::Router::new()
        .route("/ocs/v2.php/cloud/capabilities", get(capabilities))
        .route(
            "/ocs/v2.php/apps/spreed/api/v3/signaling/backend",
            post(backend),
        )
        .route("/ocs/v2.php/apps/spreed/api/v4/room", post(create_room))
        .route(
            "/ocs/v2.php/apps/spreed/api/v4/room/{token}",
            delete(delete_room),
        )
        .with_state(talk.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    talk.lock().expect("lock").base = format!("http://{addr}/");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (talk, addr)
}
