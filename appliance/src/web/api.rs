//! The setup page's HTTP API. Public: the page's files, `GET /api/session`, the claim and login
//! forms (double-submit token) and `GET /login/once`. Everything else needs an admin session
//! (401 without one) and, for changes, the session's CSRF token (403 without it): one middleware
//! layer ([`require_admin`]) guards every admin route.

// Helpers return the finished refusal as their error; a few admin requests a minute make the
// size of `Response` irrelevant, and boxing it would only add noise to every handler.
#![allow(clippy::result_large_err)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::Extension;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::requests::{SetupAnswer, SetupRequest, now_unix, rfc3339};
use super::{App, auth, cert, metrics, nctest, page, store};

/// Session cookie (the `__Host-` prefix pins it to this origin, Secure, Path=/).
const SESSION_COOKIE: &str = "__Host-talkbox-session";
/// Double-submit cookie of the claim and login forms.
const PRE_COOKIE: &str = "__Host-talkbox-pre";
const CSRF_HEADER: &str = "x-csrf-token";
/// Largest JSON body of a request (a certificate chain and key fit).
const MAX_JSON_BYTES: usize = 192 * 1024;
/// Largest upload of the speed test.
const MAX_SPEEDTEST_BYTES: usize = 32 * 1024 * 1024;

type AppState = Arc<App>;

/// The admin routes: (method, path). Tests walk this list, so none is forgotten.
pub const ADMIN_GET: &[&str] = &[
    "/api/status",
    "/api/backends",
    "/api/certificate",
    "/api/network",
    "/api/settings",
    "/api/checks",
    "/api/checks/turn-credentials",
    "/api/provisioning",
    "/api/speedtest/down",
    "/api/logs",
    "/api/support-bundle",
];
pub const ADMIN_POST: &[&str] = &[
    "/api/logout",
    "/api/password",
    "/api/backends",
    "/api/backends/remove",
    "/api/backends/test",
    "/api/checks/udp-offer",
    "/api/certificate",
    "/api/acme/renew",
    "/api/settings",
    "/api/speedtest/up",
    "/api/sizing/browser",
    "/api/sizing/measure",
    "/api/backup",
    "/api/restore",
    "/api/factory-reset",
];

pub fn router(app: AppState) -> Router {
    let guard = |allow_unset: bool| {
        axum::middleware::from_fn_with_state((app.clone(), allow_unset), require_admin)
    };
    // Every route here needs an admin session, and a change its CSRF token (one layer, so no
    // handler can forget it; ADMIN_GET and ADMIN_POST list them for the tests).
    let admin_routes = Router::new()
        .route("/api/status", get(status))
        .route("/api/backends", get(backends).post(put_backend))
        .route("/api/backends/remove", post(remove_backend))
        .route("/api/backends/test", post(test_backend))
        .route(
            "/api/certificate",
            get(certificate).post(upload_certificate),
        )
        .route("/api/acme/renew", post(acme_renew))
        .route("/api/network", get(network))
        .route("/api/settings", get(settings).post(put_settings))
        .route("/api/checks", get(checks))
        .route("/api/checks/turn-credentials", get(turn_credentials))
        .route("/api/checks/udp-offer", post(udp_offer))
        .route("/api/provisioning", get(provisioning))
        .route("/api/speedtest/down", get(speed_down))
        .route("/api/sizing/browser", post(sizing_browser))
        .route("/api/sizing/measure", post(sizing_measure))
        .route("/api/logs", get(logs))
        .route("/api/backup", post(make_backup))
        .route("/api/restore", post(restore))
        .route("/api/factory-reset", post(factory_reset))
        .route("/api/support-bundle", get(support_bundle))
        .route(
            "/api/speedtest/up",
            post(speed_up).layer(DefaultBodyLimit::max(MAX_SPEEDTEST_BYTES)),
        )
        .route_layer(guard(false));
    // These two also serve a session opened by a login link on a box without a password yet.
    let unset_routes = Router::new()
        .route("/api/logout", post(logout))
        .route("/api/password", post(change_password))
        .route_layer(guard(true));
    Router::new()
        .route("/", get(|| async { html(page::INDEX_HTML) }))
        .route(
            "/setup.js",
            get(|| async { asset(page::APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/setup.css",
            get(|| async { asset(page::APP_CSS, "text/css; charset=utf-8") }),
        )
        .route("/api/session", get(session_info))
        .route("/api/claim", post(claim))
        .route("/api/login", post(login))
        .route("/login/once", get(login_once))
        .merge(admin_routes)
        .merge(unset_routes)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_JSON_BYTES))
        .with_state(app)
        // Another box (or `talkbox sizing`) measures its uplink against this one: a sink that
        // only counts bytes, one measurement at a time, at most 35 s each.
        .merge(crate::sizing::probe::sink_router())
}

/// The admin session a request passed [`require_admin`] with.
#[derive(Clone)]
pub struct AdminSession {
    pub id: String,
    pub session: auth::Session,
}

/// The guard of every admin route: a live session, and for anything but GET/HEAD its CSRF
/// token. A refused request's body is read first (bounded), since over HTTP/2 an answer sent
/// before the body was taken resets the stream and the client sees no answer at all.
async fn require_admin(
    State((app, allow_unset)): State<(AppState, bool)>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let change = !matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    match admin(&app, req.headers(), change, allow_unset) {
        Ok((id, session)) => {
            req.extensions_mut().insert(AdminSession { id, session });
            next.run(req).await
        }
        Err(refusal) => {
            let _ = axum::body::to_bytes(req.into_body(), MAX_JSON_BYTES).await;
            refusal
        }
    }
}

/// The plain HTTP listener for the ACME CA (`web.acme_http_listen`): the HTTP-01 challenge
/// answers and nothing else.
pub fn challenge_router(app: AppState) -> Router {
    Router::new()
        .route("/.well-known/acme-challenge/{token}", get(acme_challenge))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(1024))
        .with_state(app)
}

async fn acme_challenge(
    State(app): State<AppState>,
    axum::extract::Path(token): axum::extract::Path<String>,
) -> Response {
    if token.len() > super::acme::MAX_TOKEN_LEN {
        return fail(StatusCode::NOT_FOUND, "no such challenge");
    }
    let a = ask(&app, &SetupRequest::AcmeChallenge { token }).await;
    match a.data["key_authorization"].as_str() {
        Some(k) if a.ok => (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            k.to_string(),
        )
            .into_response(),
        _ => fail(StatusCode::NOT_FOUND, "no such challenge"),
    }
}

async fn settings(State(app): State<AppState>) -> Response {
    answer(ask(&app, &SetupRequest::Settings).await)
}

#[derive(Deserialize)]
struct SettingsForm {
    values: serde_json::Map<String, Value>,
}

async fn put_settings(State(app): State<AppState>, body: Bytes) -> Response {
    let f: SettingsForm = match parse_json(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    answer(ask(&app, &SetupRequest::PutSettings { values: f.values }).await)
}

/// The speed test's figure, offered for sizing: `{"mbps": 87.5}` uses it, `{"mbps": null}`
/// forgets it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SizingBrowserForm {
    mbps: Option<f64>,
}

/// Uses the download speed the admin's browser measured from the box as a sizing figure (the
/// lowest figure wins, DESIGN.md §5). The SFU's sizer takes it within seconds.
async fn sizing_browser(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Response {
    let f: SizingBrowserForm = match parse_json(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if let Some(mbps) = f.mbps
        && let Err(e) = crate::sizing::check_browser_mbps(mbps)
    {
        return fail(StatusCode::BAD_REQUEST, e);
    }
    let peer = format!("the admin's browser at {}", peer.ip().to_canonical());
    answer(ask(&app, &SetupRequest::SizingBrowser { mbps: f.mbps, peer }).await)
}

async fn sizing_measure(State(app): State<AppState>, _body: Bytes) -> Response {
    answer(ask(&app, &SetupRequest::SizingMeasure).await)
}

async fn acme_renew(State(app): State<AppState>, _body: Bytes) -> Response {
    answer(ask(&app, &SetupRequest::AcmeRenew).await)
}

/// Unknown paths. The body is read first: over HTTP/2 an answer sent before the request body
/// was taken resets the stream, and clients then see no answer at all instead of the 404.
async fn not_found(_body: Bytes) -> Response {
    fail(StatusCode::NOT_FOUND, "no such page or API")
}

fn html(body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

fn asset(body: &'static str, ty: &'static str) -> Response {
    ([(header::CONTENT_TYPE, ty)], body).into_response()
}

fn fail(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, axum::Json(json!({"error": msg.into()}))).into_response()
}

fn throttled(wait: std::time::Duration) -> Response {
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    let mut r = fail(
        StatusCode::TOO_MANY_REQUESTS,
        format!("too many wrong attempts; try again in {secs} s"),
    );
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn set_cookie(r: &mut Response, name: &str, value: &str, max_age: Option<u64>) {
    let age = max_age
        .map(|a| format!("; Max-Age={a}"))
        .unwrap_or_default();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; Secure; HttpOnly; SameSite=Strict{age}"
    )) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
}

fn ip_of(peer: SocketAddr) -> IpAddr {
    peer.ip().to_canonical()
}

/// A live admin session; `change` also demands its CSRF token. Sessions opened by a login
/// link on a box without password may only set one (`allow_unset`).
fn admin(
    app: &App,
    headers: &HeaderMap,
    change: bool,
    allow_unset: bool,
) -> Result<(String, auth::Session), Response> {
    let Some(id) = cookie(headers, SESSION_COOKIE) else {
        return Err(fail(StatusCode::UNAUTHORIZED, "log in first"));
    };
    let mut st = app.auth.lock().unwrap_or_else(|p| p.into_inner());
    let Some(s) = st.sessions.touch(&id, Instant::now()) else {
        return Err(fail(
            StatusCode::UNAUTHORIZED,
            "the session has ended; log in again",
        ));
    };
    if change {
        let sent = headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !auth::same_token(sent, &s.csrf) {
            return Err(fail(
                StatusCode::FORBIDDEN,
                "missing or wrong CSRF token; reload the page",
            ));
        }
    }
    if s.must_set_password && !allow_unset {
        return Err(fail(StatusCode::FORBIDDEN, "set an admin password first"));
    }
    Ok((id, s))
}

/// The claim and login forms: the double-submit token must match its cookie.
fn pre_token_ok(headers: &HeaderMap) -> bool {
    let sent = headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    cookie(headers, PRE_COOKIE).is_some_and(|c| !c.is_empty() && auth::same_token(sent, &c))
}

pub(crate) async fn ask(app: &App, req: &SetupRequest) -> SetupAnswer {
    let json = match serde_json::to_string(req) {
        Ok(j) => j,
        Err(e) => return SetupAnswer::err(e.to_string()),
    };
    match app.link.request(&json).await {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            SetupAnswer::err(format!("undecodable answer from the supervisor: {e}"))
        }),
        Err(e) => SetupAnswer::err(format!("the supervisor cannot be asked: {e}")),
    }
}

fn answer(a: SetupAnswer) -> Response {
    if a.ok {
        axum::Json(a.data).into_response()
    } else {
        fail(
            StatusCode::BAD_REQUEST,
            a.error.unwrap_or_else(|| "refused".into()),
        )
    }
}

async fn hash(password: String) -> Result<String, Response> {
    tokio::task::spawn_blocking(move || auth::hash_password(&password))
        .await
        .map_err(|e| fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| fail(StatusCode::INTERNAL_SERVER_ERROR, e))
}

async fn verify(password: String, hash: String) -> bool {
    tokio::task::spawn_blocking(move || auth::verify_password(&password, &hash))
        .await
        .unwrap_or(false)
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Response> {
    serde_json::from_slice(body)
        .map_err(|e| fail(StatusCode::BAD_REQUEST, format!("malformed request: {e}")))
}

async fn session_info(State(app): State<AppState>, headers: HeaderMap) -> Response {
    let now = Instant::now();
    let (claimed, session) = {
        let mut st = app.auth.lock().unwrap_or_else(|p| p.into_inner());
        let s = cookie(&headers, SESSION_COOKIE).and_then(|id| st.sessions.touch(&id, now));
        (st.admin.claimed, s)
    };
    let supervised = app.link.supervised();
    if let Some(s) = session {
        let state = if s.must_set_password {
            "set-password"
        } else {
            "admin"
        };
        return axum::Json(json!({"state": state, "csrf": s.csrf, "supervised": supervised}))
            .into_response();
    }
    let pre = crate::secrets::random_token(24).unwrap_or_default();
    let state = if claimed { "login" } else { "unclaimed" };
    let mut r =
        axum::Json(json!({"state": state, "pre": pre, "supervised": supervised})).into_response();
    set_cookie(&mut r, PRE_COOKIE, &pre, None);
    r
}

fn login_response(app: &App, must_set_password: bool) -> Response {
    let id = {
        let mut st = app.auth.lock().unwrap_or_else(|p| p.into_inner());
        st.sessions.open(Instant::now(), must_set_password)
    };
    match id {
        Ok(id) => {
            let mut r = axum::Json(json!({"ok": true})).into_response();
            set_cookie(&mut r, SESSION_COOKIE, &id, None);
            r
        }
        Err(e) => fail(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Refuses at once while `ip` must wait.
/// The forms that come before a session (claim, login): the double-submit form token, the
/// per-address throttle, then the JSON body.
fn pre_session_form<T: serde::de::DeserializeOwned>(
    app: &App,
    peer: SocketAddr,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(IpAddr, T), Response> {
    if !pre_token_ok(headers) {
        return Err(fail(
            StatusCode::FORBIDDEN,
            "missing or wrong form token; reload the page",
        ));
    }
    let ip = ip_of(peer);
    check_throttle(app, ip)?;
    Ok((ip, parse_json(body)?))
}

fn check_throttle(app: &App, ip: IpAddr) -> Result<(), Response> {
    let st = app.auth.lock().unwrap_or_else(|p| p.into_inner());
    st.throttle.check(ip, Instant::now()).map_err(throttled)
}

fn record_failure(app: &App, ip: IpAddr) {
    let mut st = app.auth.lock().unwrap_or_else(|p| p.into_inner());
    let next = st.throttle.failed(ip, Instant::now());
    tracing::warn!(client = %ip, next_delay_s = next.as_secs(), "wrong setup code or password");
}

#[derive(Deserialize)]
struct ClaimForm {
    code: String,
    password: String,
    #[serde(default)]
    engineer_key: Option<String>,
}

async fn claim(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (ip, form): (IpAddr, ClaimForm) = match pre_session_form(&app, peer, &headers, &body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if form.code.len() > 64 || form.engineer_key.as_ref().is_some_and(|k| k.len() > 200) {
        return fail(StatusCode::BAD_REQUEST, "field too long");
    }
    if let Err(e) = auth::check_new_password(&form.password) {
        return fail(StatusCode::BAD_REQUEST, e);
    }
    if let Some(k) = form
        .engineer_key
        .as_deref()
        .filter(|k| !k.trim().is_empty())
        && let Err(e) = store::engineer_key_line(k)
    {
        return fail(StatusCode::BAD_REQUEST, e);
    }
    let h = match hash(form.password).await {
        Ok(h) => h,
        Err(r) => return r,
    };
    let a = ask(
        &app,
        &SetupRequest::Claim {
            code: form.code,
            password_hash: h.clone(),
            engineer_key: form.engineer_key,
        },
    )
    .await;
    if !a.ok {
        if a.error.as_deref() == Some("wrong setup code") {
            record_failure(&app, ip);
            return fail(
                StatusCode::FORBIDDEN,
                "wrong setup code: use the code shown on the box's console or by `talkbox status`",
            );
        }
        return answer(a);
    }
    {
        let mut st = app.auth.lock().unwrap_or_else(|p| p.into_inner());
        st.throttle.succeeded(ip);
        st.admin.claimed = true;
        st.admin.password_hash = Some(h);
    }
    tracing::info!(client = %ip, "box claimed");
    login_response(&app, false)
}

#[derive(Deserialize)]
struct LoginForm {
    password: String,
}

async fn login(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (ip, form): (IpAddr, LoginForm) = match pre_session_form(&app, peer, &headers, &body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let stored = {
        let st = app.auth.lock().unwrap_or_else(|p| p.into_inner());
        st.admin.password_hash.clone()
    };
    let Some(stored) = stored else {
        return fail(
            StatusCode::CONFLICT,
            "no admin password is set: claim the box first",
        );
    };
    if form.password.len() > 1024 || !verify(form.password, stored).await {
        record_failure(&app, ip);
        return fail(StatusCode::FORBIDDEN, "wrong password");
    }
    app.auth
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .throttle
        .succeeded(ip);
    tracing::info!(client = %ip, "admin logged in");
    login_response(&app, false)
}

#[derive(Deserialize)]
struct OnceQuery {
    token: String,
}

async fn login_once(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(q): Query<OnceQuery>,
) -> Response {
    let ip = ip_of(peer);
    if let Err(r) = check_throttle(&app, ip) {
        return r;
    }
    if q.token.is_empty() || q.token.len() > 256 {
        record_failure(&app, ip);
        return fail(StatusCode::FORBIDDEN, "this login link is not valid");
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, q.token.as_bytes());
    let a = ask(
        &app,
        &SetupRequest::ConsumeLoginLink {
            token_sha256: hex::encode(digest.as_ref()),
        },
    )
    .await;
    if !a.ok {
        record_failure(&app, ip);
        return fail(
            StatusCode::FORBIDDEN,
            a.error.unwrap_or_else(|| "refused".into()),
        );
    }
    let password_set = {
        let st = app.auth.lock().unwrap_or_else(|p| p.into_inner());
        st.admin.password_hash.is_some()
    };
    let mut r = login_response(&app, !password_set);
    // Navigate to the page proper (the token leaves the address bar).
    let target = Redirect::to(if password_set {
        "/#status"
    } else {
        "/#account"
    })
    .into_response();
    let cookies: Vec<HeaderValue> = r
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .cloned()
        .collect();
    r = target;
    for c in cookies {
        r.headers_mut().append(header::SET_COOKIE, c);
    }
    tracing::info!(client = %ip, "admin logged in with a one-time provisioning link");
    r
}

/// `_body` is read (and dropped) so that an early refusal never leaves an unread request
/// body behind, which HTTP/2 clients report as a broken stream.
async fn logout(
    State(app): State<AppState>,
    Extension(a): Extension<AdminSession>,
    _body: Bytes,
) -> Response {
    let id = a.id;
    app.auth
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .sessions
        .close(&id);
    let mut r = axum::Json(json!({"ok": true})).into_response();
    set_cookie(&mut r, SESSION_COOKIE, "", Some(0));
    r
}

#[derive(Deserialize)]
struct PasswordForm {
    #[serde(default)]
    old: String,
    new: String,
}

async fn change_password(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(a): Extension<AdminSession>,
    body: Bytes,
) -> Response {
    let (id, s) = (a.id, a.session);
    let form: PasswordForm = match parse_json(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if let Err(e) = auth::check_new_password(&form.new) {
        return fail(StatusCode::BAD_REQUEST, e);
    }
    let ip = ip_of(peer);
    if !s.must_set_password {
        if let Err(r) = check_throttle(&app, ip) {
            return r;
        }
        let stored = app
            .auth
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admin
            .password_hash
            .clone()
            .unwrap_or_default();
        if form.old.len() > 1024 || !verify(form.old, stored).await {
            record_failure(&app, ip);
            return fail(StatusCode::FORBIDDEN, "the current password is wrong");
        }
    }
    let h = match hash(form.new).await {
        Ok(h) => h,
        Err(r) => return r,
    };
    let a = ask(
        &app,
        &SetupRequest::SetPassword {
            password_hash: h.clone(),
        },
    )
    .await;
    if !a.ok {
        return answer(a);
    }
    let mut st = app.auth.lock().unwrap_or_else(|p| p.into_inner());
    st.admin.password_hash = Some(h);
    st.admin.claimed = true;
    st.sessions.close_others(&id);
    st.sessions.set_password_done(&id);
    tracing::info!(client = %ip, "admin password changed; other sessions ended");
    axum::Json(json!({"ok": true})).into_response()
}

/// The boot slot from the kernel command line (`talkbox.slot=` or RAUC's `rauc.slot=`).
fn boot_slot() -> String {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    cmdline
        .split_whitespace()
        .find_map(|w| {
            w.strip_prefix("talkbox.slot=")
                .or_else(|| w.strip_prefix("rauc.slot="))
        })
        .map(str::to_string)
        .unwrap_or_else(|| "none (not booted from the talkbox image)".into())
}

/// Sessions, rooms, publishers and subscribers from the signaling service on loopback.
async fn signaling_counts(app: &App) -> Value {
    if !app.config.signaling.enabled {
        return json!({"error": "signaling is disabled"});
    }
    let Some(http) = app.config.signaling.http_listen else {
        return json!({"error": "set signaling.http_listen to a loopback address to see session counts here"});
    };
    let base = format!("http://{}", loopback_of(http));
    let get = |path: &str| {
        let url = format!("{base}{path}");
        async move {
            let uri: axum::http::Uri = url.parse().ok()?;
            fetch_json(uri).await
        }
    };
    let stats = get("/api/v1/stats").await;
    let info = get("/api/v1/serverinfo").await;
    json!({
        "sessions": stats.as_ref().and_then(|s| s["sessions"].as_u64()),
        "rooms": stats.as_ref().and_then(|s| s["rooms"].as_u64()),
        "publishers": info.as_ref().and_then(|s| s["sfu"]["publishers"].as_u64()),
        "subscribers": info.as_ref().and_then(|s| s["sfu"]["subscribers"].as_u64()),
    })
}

fn loopback_of(a: SocketAddr) -> SocketAddr {
    if a.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], a.port()))
    } else {
        a
    }
}

/// A small plain-HTTP GET on loopback (signaling's own stats port), 2 s, 64 KiB.
async fn fetch_json(uri: axum::http::Uri) -> Option<Value> {
    use http_body_util::{BodyExt, Empty, Limited};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let work = async {
        let resp = client.get(uri).await.ok()?;
        let body = Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .ok()?;
        serde_json::from_slice(&body.to_bytes()).ok()
    };
    tokio::time::timeout(std::time::Duration::from_secs(2), work)
        .await
        .ok()
        .flatten()
}

async fn status(State(app): State<AppState>) -> Response {
    let sup = app.link.query_status().await;
    let history: Vec<metrics::Sample> = app
        .history
        .lock()
        .map(|h| h.iter().copied().collect())
        .unwrap_or_default();
    let counts = signaling_counts(&app).await;
    axum::Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "boot_slot": boot_slot(),
        "supervisor": sup.as_ref().ok(),
        "supervisor_error": sup.as_ref().err().map(|e| e.to_string()),
        "signaling": counts,
        "history": history,
        "sample_every_s": metrics::EVERY.as_secs(),
    }))
    .into_response()
}

async fn backends(State(app): State<AppState>) -> Response {
    answer(ask(&app, &SetupRequest::TalkValues).await)
}

#[derive(Deserialize)]
struct BackendForm {
    id: String,
    urls: Vec<String>,
    #[serde(default)]
    new_secret: bool,
}

async fn put_backend(State(app): State<AppState>, body: Bytes) -> Response {
    let f: BackendForm = match parse_json(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    answer(
        ask(
            &app,
            &SetupRequest::PutBackend {
                id: f.id,
                urls: f.urls,
                new_secret: f.new_secret,
            },
        )
        .await,
    )
}

#[derive(Deserialize)]
struct IdForm {
    id: String,
}

async fn remove_backend(State(app): State<AppState>, body: Bytes) -> Response {
    let f: IdForm = match parse_json(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    answer(ask(&app, &SetupRequest::RemoveBackend { id: f.id }).await)
}

#[derive(Deserialize)]
struct TestForm {
    id: String,
    /// A Nextcloud admin login for the Nextcloud → box direction; used once, never stored.
    #[serde(default)]
    nc_user: String,
    #[serde(default)]
    nc_password: String,
}

/// The Test button of one backend, for each of its Nextcloud URLs: box → Nextcloud
/// (capabilities: Talk installed; a signed backend request: the shared secret is accepted when
/// Talk answers with a room error instead of an authentication error), the two clocks, and,
/// given an admin login, Nextcloud → box ([`super::nctest`]: Talk announces a throw-away
/// conversation to its signaling server and the box checks the announcement arrived, signed
/// with this backend's secret).
async fn test_backend(State(app): State<AppState>, body: Bytes) -> Response {
    let f: TestForm = match parse_json(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if f.nc_user.len() > nctest::MAX_LOGIN_LEN || f.nc_password.len() > nctest::MAX_LOGIN_LEN {
        return fail(
            StatusCode::BAD_REQUEST,
            format!(
                "the Nextcloud user name and app password may have at most {} bytes each",
                nctest::MAX_LOGIN_LEN
            ),
        );
    }
    let login = (!f.nc_user.is_empty()).then(|| nctest::Login {
        user: f.nc_user.clone(),
        password: f.nc_password.clone(),
    });
    let values = ask(&app, &SetupRequest::TalkValues).await;
    let box_url = values.data["signaling_url"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let Some(b) = values.data["backends"]
        .as_array()
        .and_then(|l| l.iter().find(|b| b["id"] == f.id.as_str()))
        .cloned()
    else {
        return fail(
            StatusCode::NOT_FOUND,
            format!("there is no backend \"{}\"", f.id),
        );
    };
    let secret = b["secret"].as_str().unwrap_or("").as_bytes().to_vec();
    let signaling = nctest::signaling_url(&app.config);
    let mut results = Vec::new();
    for url in b["urls"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| u.as_str())
        .take(8)
    {
        let mut checks = Vec::new();
        let mut add = |name: &str, ok: Option<bool>, detail: String, remedy: &str| {
            checks.push(json!({"name": name, "ok": ok, "detail": detail,
                "remedy": if ok == Some(true) { "" } else { remedy }}));
        };
        let caps = app.nextcloud.capabilities(url, true).await;
        let talk = !caps.features.is_empty();
        add(
            "Box → Nextcloud: Talk's capabilities",
            Some(talk),
            format!("{} Talk features advertised", caps.features.len()),
            "The box cannot fetch /ocs/v2.php/cloud/capabilities from this URL: check the URL, DNS and the firewall between the box and Nextcloud, Nextcloud's certificate, and that the Talk app is enabled.",
        );
        let backend = crate::signaling::backends::Backend {
            id: f.id.clone(),
            urls: vec![url.to_string()],
            secret: secret.clone(),
            session_limit: 0,
            max_stream_bitrate: 0,
            max_screen_bitrate: 0,
        };
        let probe = json!({"type": "room", "room": {"version": "1.0", "roomid": "talkbox-setup-test",
            "userid": "", "sessionid": "talkbox-setup-test", "action": "leave"}});
        let signed = app
            .nextcloud
            .request(
                &backend,
                &crate::signaling::nextcloud::signaling_backend_url(url),
                &probe,
            )
            .await;
        let (secret_ok, detail) = match &signed {
            Ok(_) => (true, "Talk accepted a signed request".to_string()),
            Err(e) if e.code == "no_such_room" || e.code == "room_not_found" => {
                (true, "Talk checked the signature and answered (the test room does not exist, as expected)".into())
            }
            Err(e) => (false, format!("{}: {}", e.code, e.message)),
        };
        add(
            "Box → Nextcloud: signed backend request",
            Some(secret_ok),
            detail.clone(),
            "Nextcloud refused the signed request: paste the shared secret shown here into Talk's High-performance backend settings (and the box's URL there).",
        );
        match nctest::clock_skew(&app.nctest, url).await {
            Ok(skew) => add(
                "Clocks of the box and Nextcloud agree",
                Some(skew.abs() <= nctest::MAX_SKEW_S),
                format!(
                    "Nextcloud's clock is {} s {} the box's",
                    skew.abs(),
                    if skew >= 0 { "ahead of" } else { "behind" }
                ),
                "The clocks differ by more than 30 s: Talk's sign-in tokens for the signaling server live 60 s, so calls fail to start. Let both servers synchronise with NTP.",
            ),
            Err(e) => add(
                "Clocks of the box and Nextcloud agree",
                None,
                e,
                "Could not read Nextcloud's clock (no answer or no Date header).",
            ),
        }
        match &login {
            Some(login) => {
                let r = nctest::nextcloud_to_box(
                    &app.nctest,
                    url,
                    login,
                    &signaling,
                    &secret,
                    &box_url,
                )
                .await;
                if let Ok(mut m) = app.last_inbound.lock() {
                    // Bounded: one entry per configured Nextcloud URL at most.
                    if m.len() < 64 || m.contains_key(url) {
                        m.insert(
                            url.to_string(),
                            json!({"ok": r.ok, "detail": r.detail, "remedy": r.remedy, "at": now_unix()}),
                        );
                    }
                }
                add(
                    "Nextcloud → box: signed round trip",
                    Some(r.ok),
                    r.detail,
                    &r.remedy,
                );
            }
            None => add(
                "Nextcloud → box: signed round trip",
                None,
                "not tested: no Nextcloud admin login given".into(),
                "Enter a Nextcloud administrator's user name and an app password next to the Test button: the box then has Talk announce a throw-away conversation to its signaling server and checks that it arrives with the right secret. The login is used for this test only and not stored.",
            ),
        }
        let ok = checks.iter().all(|c| c["ok"] != false);
        results.push(json!({
            "url": url,
            "ok": ok,
            "capabilities": talk,
            "signed_round_trip": secret_ok,
            "detail": detail,
            "checks": checks,
        }));
    }
    axum::Json(json!({"id": f.id, "results": results})).into_response()
}

fn names_for_checks(app: &App) -> Vec<String> {
    app.config.supervisor.names.clone()
}

async fn certificate(State(app): State<AppState>) -> Response {
    let pem = app.cert_pem.read().map(|p| p.clone()).unwrap_or_default();
    let acme = ask(&app, &SetupRequest::AcmeStatus).await;
    let acme = if acme.ok {
        acme.data
    } else {
        json!({"error": acme.error})
    };
    match cert::describe(&pem) {
        Ok(info) => axum::Json(json!({
            "certificate": info,
            "not_before": rfc3339(info.not_before),
            "not_after": rfc3339(info.not_after),
            "days_left": (info.not_after - now_unix()) / 86_400,
            "public_name": store::public_name(&app.config),
            "acme": acme,
        }))
        .into_response(),
        Err(e) => fail(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[derive(Deserialize)]
struct CertForm {
    cert: String,
    key: String,
}

async fn upload_certificate(State(app): State<AppState>, body: Bytes) -> Response {
    let f: CertForm = match parse_json(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    // Checked here first for a quick answer; the supervisor checks again before writing.
    let ck = match cert::validate_upload(
        f.cert.as_bytes(),
        f.key.as_bytes(),
        &names_for_checks(&app),
        now_unix(),
    ) {
        Ok((_, ck)) => ck,
        Err(e) => return fail(StatusCode::BAD_REQUEST, e),
    };
    let a = ask(
        &app,
        &SetupRequest::InstallCertificate {
            cert_pem: f.cert.clone(),
            key_pem: f.key,
        },
    )
    .await;
    if !a.ok {
        return answer(a);
    }
    app.cert.replace(ck);
    if let Ok(mut p) = app.cert_pem.write() {
        *p = f.cert.into_bytes();
    }
    tracing::info!("new certificate in service on the setup page");
    axum::Json(a.data).into_response()
}

/// Participants a budget carries, per kind of room (reference §4.1 formulas).
fn capacity(budget_mbps: f64, video_mbps: f64, screen_mbps: f64) -> Value {
    const AUDIO_MBPS: f64 = 0.05;
    let mut rows = Vec::new();
    for n in [2u64, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50] {
        let nf = n as f64;
        let video_out = video_mbps * nf * (nf - 1.0);
        let audio_out = AUDIO_MBPS * nf * (nf - 1.0);
        let screen_out = screen_mbps * (nf - 1.0) + audio_out;
        rows.push(json!({
            "participants": n,
            "video_out": video_out, "video_in": video_mbps * nf,
            "audio_out": audio_out, "audio_in": AUDIO_MBPS * nf,
            "screen_out": screen_out, "screen_in": screen_mbps + AUDIO_MBPS * nf,
            "video_fits": video_out <= budget_mbps,
            "audio_fits": audio_out <= budget_mbps,
            "screen_fits": screen_out <= budget_mbps,
        }));
    }
    let max_n = |per: &dyn Fn(f64) -> f64| {
        let mut n = 1u64;
        while n < 100_000 && per((n + 1) as f64) <= budget_mbps {
            n += 1;
        }
        n
    };
    json!({
        "rows": rows,
        "max_video": max_n(&|n| video_mbps * n * (n - 1.0)),
        "max_audio": max_n(&|n| AUDIO_MBPS * n * (n - 1.0)),
        "max_screen": max_n(&|n| screen_mbps * (n - 1.0) + AUDIO_MBPS * n * (n - 1.0)),
        "audio_mbps": AUDIO_MBPS,
    })
}

async fn network(State(app): State<AppState>) -> Response {
    let c = &app.config;
    // What the SFU has in force (with its measurement), else the same figures computed now.
    let sizing = crate::sizing::read_state(&app.data).unwrap_or_else(|| {
        let browser = crate::sizing::read_browser(&app.data);
        crate::sizing::compute(crate::sizing::links_now(), c, None, None, browser)
    });
    let budget = sizing.budget_bps.map(|b| b as f64 / 1e6);
    let video = c.signaling.max_stream_bitrate as f64 / 1e6;
    let screen = c.signaling.max_screen_bitrate as f64 / 1e6;
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.to_str().map(str::to_string))
        .unwrap_or_default();
    let mut out = json!({
        "hostname": hostname,
        "public_name": store::public_name(c),
        "names": c.supervisor.names,
        "public_ips": c.sfu.public_ips,
        "ports": [
            {"service": "signaling (HTTPS, WebSocket)", "proto": "tcp", "port": c.signaling.listen.port().to_string(), "enabled": c.signaling.enabled},
            {"service": "setup page (HTTPS)", "proto": "tcp", "port": c.web.listen.port().to_string(), "enabled": c.web.enabled},
            {"service": "TURN/STUN", "proto": "udp+tcp", "port": c.turn.port.to_string(), "enabled": c.turn.enabled},
            {"service": "TURN over TLS", "proto": "tcp", "port": c.turn.tls_port.to_string(), "enabled": c.turn.enabled},
            {"service": "TURN relay range", "proto": "udp", "port": format!("{}-{}", c.turn.relay_port_min, c.turn.relay_port_max), "enabled": c.turn.enabled},
            {"service": "SFU media", "proto": "udp", "port": format!("{}-{}", c.sfu.media_port_min, c.sfu.media_port_max), "enabled": c.sfu.enabled},
        ],
        "turn": {
            "enabled": c.turn.enabled, "realm": c.turn.realm, "port": c.turn.port, "tls_port": c.turn.tls_port,
            "relay_ports": format!("{}-{}", c.turn.relay_port_min, c.turn.relay_port_max),
            "max_allocations": c.turn.max_allocations, "max_allocations_per_user": c.turn.max_allocations_per_user,
            "bandwidth_per_allocation_kbps": c.turn.bandwidth_per_allocation_kbps,
        },
        "nics": sizing.links,
        "nic_mbps": sizing.link_mbps,
        "declared_uplink_mbps": sizing.declared_uplink_mbps,
        "measured": sizing.measured,
        "browser_measured": crate::sizing::read_browser(&app.data),
        "sizing_peer": c.sizing.peer,
        "measure_error": sizing.measure_error,
        "capacity_mbps": sizing.capacity_mbps,
        "egress_fraction": sizing.egress_fraction,
        "budget_mbps": budget,
        "video_cap_mbps": video,
        "screen_cap_mbps": screen,
        "capacity": budget.map(|b| capacity(b, video, screen)),
    });
    // This process's config dates from its start; names, ports and TURN settings changed on
    // the page since are in force in the supervisor (which restarted the services concerned).
    let now = ask(&app, &SetupRequest::Settings).await;
    if now.ok {
        let v = &now.data;
        out["names"] = v["supervisor.names"].clone();
        out["public_ips"] = v["sfu.public_ips"].clone();
        let t = &mut out["turn"];
        for k in ["enabled", "realm", "port", "tls_port"] {
            t[k] = v[format!("turn.{k}")].clone();
        }
        t["relay_ports"] = json!(format!(
            "{}-{}",
            v["turn.relay_port_min"], v["turn.relay_port_max"]
        ));
        if let Some(names) = v["supervisor.names"].as_array()
            && let Some(first) = names.first().and_then(|n| n.as_str())
        {
            out["public_name"] = json!(first);
        }
        for p in out["ports"].as_array_mut().into_iter().flatten() {
            let port = match p["service"].as_str().unwrap_or("") {
                "signaling (HTTPS, WebSocket)" => v["signaling.listen"]
                    .as_str()
                    .and_then(|a| a.rsplit(':').next())
                    .map(str::to_string),
                "TURN/STUN" => Some(v["turn.port"].to_string()),
                "TURN over TLS" => Some(v["turn.tls_port"].to_string()),
                "TURN relay range" => Some(format!(
                    "{}-{}",
                    v["turn.relay_port_min"], v["turn.relay_port_max"]
                )),
                "SFU media" => Some(format!(
                    "{}-{}",
                    v["sfu.media_port_min"], v["sfu.media_port_max"]
                )),
                _ => None,
            };
            if let Some(port) = port {
                p["port"] = json!(port);
            }
        }
    }
    axum::Json(out).into_response()
}

/// True when the kernel says the clock is synchronised (adjtimex does not report TIME_ERROR).
fn clock_synchronised() -> bool {
    // SAFETY: adjtimex with modes = 0 only reads the kernel's clock state into the struct.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    state >= 0 && state != libc::TIME_ERROR
}

async fn checks(State(app): State<AppState>) -> Response {
    let mut out = Vec::new();
    let mut add = |name: &str, ok: Option<bool>, detail: String, remedy: &str| {
        out.push(json!({"name": name, "ok": ok, "detail": detail, "remedy": if ok == Some(true) { "" } else { remedy }}));
    };
    let synced = clock_synchronised();
    add(
        "Clock synchronised",
        Some(synced),
        format!("now {}", rfc3339(now_unix())),
        "The box's clock is not synchronised: certificates and TURN credentials depend on it. Let the box reach an NTP server (outgoing UDP 123 through the firewall) or check the time server the image is configured with.",
    );
    let name = store::public_name(&app.config);
    let pem = app.cert_pem.read().map(|p| p.clone()).unwrap_or_default();
    match cert::describe(&pem) {
        Ok(info) => {
            let valid_now = info.not_before <= now_unix() && now_unix() <= info.not_after;
            let covers = cert::covers(&info.names, &name);
            let ok = valid_now && covers && !info.self_signed;
            add(
                "Certificate valid for the public name",
                Some(ok),
                format!(
                    "{name}: certificate for {} by {}, until {}",
                    info.names.join(", "),
                    info.issuer,
                    rfc3339(info.not_after)
                ),
                if info.self_signed {
                    "The box still uses its self-signed certificate: browsers and Nextcloud will not trust it. Upload a certificate for the public name on the Certificates page."
                } else if !covers {
                    "The certificate does not name the box's public name: get one that does, or set supervisor.names to the name the certificate carries."
                } else {
                    "The certificate is outside its validity dates: renew it and upload the new one."
                },
            );
        }
        Err(e) => add(
            "Certificate valid for the public name",
            Some(false),
            e,
            "Upload a certificate on the Certificates page.",
        ),
    }
    // DNS: every configured name must resolve to one of the box's addresses.
    let mut own: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .map(|it| {
            it.filter_map(|i| i.address)
                .filter_map(|a| {
                    a.as_sockaddr_in()
                        .map(|s| IpAddr::from(s.ip()))
                        .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::from(s.ip())))
                })
                .collect()
        })
        .unwrap_or_default();
    own.extend(
        app.config
            .sfu
            .public_ips
            .iter()
            .filter_map(|s| s.parse::<IpAddr>().ok()),
    );
    if app.config.supervisor.names.is_empty() {
        add(
            "DNS names resolve to the box",
            None,
            "no public name configured (supervisor.names)".into(),
            "Set supervisor.names to the DNS name Nextcloud and browsers use for the box.",
        );
    }
    for n in app.config.supervisor.names.iter().take(8) {
        if n.parse::<IpAddr>().is_ok() {
            continue;
        }
        let lookup = tokio::time::timeout(
            std::time::Duration::from_secs(3),
            tokio::net::lookup_host(format!("{n}:443")),
        )
        .await;
        let addrs: Vec<IpAddr> = match lookup {
            Ok(Ok(it)) => it.map(|a| a.ip()).collect(),
            _ => Vec::new(),
        };
        let ok = addrs.iter().any(|a| own.contains(a));
        add(
            &format!("DNS: {n} resolves to the box"),
            Some(ok),
            if addrs.is_empty() {
                "does not resolve".into()
            } else {
                format!(
                    "resolves to {}",
                    addrs
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
            "Create an A/AAAA record for this name pointing to the box's public address (DNS only, not proxied through a CDN), and set sfu.public_ips if the box is behind NAT.",
        );
    }
    let values = ask(&app, &SetupRequest::TalkValues).await;
    for b in values.data["backends"].as_array().into_iter().flatten() {
        for url in b["urls"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|u| u.as_str())
        {
            let caps = app.nextcloud.capabilities(url, true).await;
            add(
                &format!("Nextcloud reachable from the box: {url}"),
                Some(!caps.features.is_empty()),
                format!("{} Talk features advertised", caps.features.len()),
                "The box cannot read Talk's capabilities from this URL: check DNS, the firewall and the certificate of the Nextcloud server, and that Talk is enabled.",
            );
            match nctest::clock_skew(&app.nctest, url).await {
                Ok(skew) => add(
                    &format!("Clock agrees with Nextcloud: {url}"),
                    Some(skew.abs() <= nctest::MAX_SKEW_S),
                    format!(
                        "Nextcloud's clock is {} s {} the box's",
                        skew.abs(),
                        if skew >= 0 { "ahead of" } else { "behind" }
                    ),
                    "The clocks differ by more than 30 s: Talk's sign-in tokens for the signaling server live 60 s, so calls fail to start. Let both servers synchronise with NTP.",
                ),
                Err(e) => add(
                    &format!("Clock agrees with Nextcloud: {url}"),
                    None,
                    e,
                    "Could not read Nextcloud's clock (no answer or no Date header).",
                ),
            }
            let last = app
                .last_inbound
                .lock()
                .ok()
                .and_then(|m| m.get(url).cloned());
            match last {
                Some(r) => add(
                    &format!("The box reachable from Nextcloud: {url}"),
                    r["ok"].as_bool(),
                    format!(
                        "{} (tested {})",
                        r["detail"].as_str().unwrap_or(""),
                        rfc3339(r["at"].as_i64().unwrap_or(0))
                    ),
                    r["remedy"].as_str().unwrap_or(""),
                ),
                None => add(
                    &format!("The box reachable from Nextcloud: {url}"),
                    None,
                    "not tested yet".into(),
                    "Run the Test of this Nextcloud on the Nextcloud page with an admin login: Talk then announces a throw-away conversation to the box, signed with the shared secret.",
                ),
            }
        }
    }
    add(
        "TURN reachable from this browser",
        None,
        "run by this page: a relay-only test call through the box's TURN server (two connections in this browser that may only use TURN relay addresses, one data-channel message echoed)".into(),
        "If this fails, forward UDP and TCP port 3478 (or turn.port) and the relay port range to the box.",
    );
    // The box cannot send itself a datagram from outside; what it can check is whether the
    // addresses it gives browsers can be reached from the internet at all.
    let sfu = &app.config.sfu;
    let ports = format!("UDP {}-{}", sfu.media_port_min, sfu.media_port_max);
    let global = |ip: &IpAddr| match ip {
        IpAddr::V4(v) => {
            !(v.is_private()
                || v.is_loopback()
                || v.is_link_local()
                || v.is_unspecified()
                || v.octets()[0] == 100 && (v.octets()[1] & 0xc0) == 64)
        }
        IpAddr::V6(v) => {
            !(v.is_loopback()
                || v.is_unspecified()
                || (v.segments()[0] & 0xfe00) == 0xfc00
                || (v.segments()[0] & 0xffc0) == 0xfe80)
        }
    };
    let advertised: Vec<IpAddr> = sfu
        .public_ips
        .iter()
        .filter_map(|s| s.parse::<IpAddr>().ok())
        .collect();
    if !sfu.enabled {
        add(
            "UDP media port reachable",
            None,
            "the SFU is off (sfu.enabled)".into(),
            "",
        );
    } else if advertised.is_empty() && !own.iter().any(global) {
        add(
            "UDP media port reachable",
            Some(false),
            format!(
                "the box has no public address and sfu.public_ips is empty: browsers outside this network are given only private addresses for {ports}"
            ),
            "The box is behind NAT: set the public address on the Network page (public IPs for ICE) and forward the media ports (UDP) from the router to the box.",
        );
    } else {
        let shown: Vec<String> = if advertised.is_empty() {
            own.iter()
                .filter(|a| global(a))
                .map(|a| a.to_string())
                .collect()
        } else {
            advertised.iter().map(|a| a.to_string()).collect()
        };
        add(
            "UDP media port reachable",
            None,
            format!(
                "run by this page: a direct test call from this browser to the SFU (no TURN) that must connect over UDP to {} on {ports}; it proves the path from this browser's network, so run it from outside the box's network to test the port forwarding",
                shown.join(", ")
            ),
            "If it fails, forward the media ports (UDP) to the box and check the address under public IPs on the Network page (sfu.public_ips); calls then need TURN, which is slower and costs the box more.",
        );
    }
    axum::Json(json!({"checks": out})).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UdpOfferForm {
    sdp: String,
}

/// The UDP media self-check's test call: the SFU answers the page's offer as a short-lived
/// publisher (`udpcheck`); the page then sees whether it reaches the media port over UDP.
async fn udp_offer(State(app): State<AppState>, body: Bytes) -> Response {
    let f: UdpOfferForm = match parse_json(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if let Err(e) = super::udpcheck::check_offer(&f.sdp) {
        return fail(StatusCode::BAD_REQUEST, e);
    }
    let probe = match &app.sfu_probe {
        Ok(p) => p.clone(),
        Err(why) => return fail(StatusCode::SERVICE_UNAVAILABLE, why.clone()),
    };
    match probe.answer(f.sdp).await {
        Ok(sdp) => axum::Json(json!({
            "sdp": sdp,
            "media_ports": [app.config.sfu.media_port_min, app.config.sfu.media_port_max],
            "hold_s": super::udpcheck::HOLD.as_secs(),
        }))
        .into_response(),
        Err(None) => fail(
            StatusCode::CONFLICT,
            format!(
                "a UDP test call is already running; try again in {} s",
                super::udpcheck::HOLD.as_secs()
            ),
        ),
        Err(Some(e)) => fail(StatusCode::BAD_GATEWAY, e),
    }
}

async fn turn_credentials(State(app): State<AppState>, headers: HeaderMap) -> Response {
    let v = ask(&app, &SetupRequest::TalkValues).await;
    let Some(secret) = v.data["turn_secret"].as_str() else {
        return fail(StatusCode::SERVICE_UNAVAILABLE, "no TURN secret available");
    };
    let (username, credential) = crate::turn::credentials::rest_credentials(
        secret,
        "setup-page-test",
        600,
        now_unix() as u64,
    );
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| {
            h.rsplit_once(':')
                .map(|(a, _)| a.to_string())
                .or(Some(h.to_string()))
        })
        .unwrap_or_else(|| store::public_name(&app.config));
    let port = app.config.turn.port;
    axum::Json(json!({
        "urls": [format!("turn:{host}:{port}?transport=udp"), format!("turn:{host}:{port}?transport=tcp")],
        "username": username,
        "credential": credential,
        "enabled": app.config.turn.enabled,
    }))
    .into_response()
}

async fn provisioning(State(app): State<AppState>) -> Response {
    answer(ask(&app, &SetupRequest::ProvisioningAudit).await)
}

#[derive(Deserialize)]
struct BackupForm {
    passphrase: String,
}

async fn make_backup(State(app): State<AppState>, body: Bytes) -> Response {
    let f: BackupForm = match parse_json(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if let Err(e) = super::backup::check_passphrase(&f.passphrase) {
        return fail(StatusCode::BAD_REQUEST, e);
    }
    let a = ask(
        &app,
        &SetupRequest::Backup {
            passphrase: f.passphrase,
        },
    )
    .await;
    if !a.ok {
        return answer(a);
    }
    let text = a.data["backup"].as_str().unwrap_or("").to_string();
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"talkbox-backup.json\"",
            ),
        ],
        text,
    )
        .into_response()
}

#[derive(Deserialize)]
struct RestoreForm {
    backup: String,
    passphrase: String,
}

async fn restore(State(app): State<AppState>, body: Bytes) -> Response {
    let f: RestoreForm = match parse_json(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let a = ask(
        &app,
        &SetupRequest::Restore {
            backup: f.backup,
            passphrase: f.passphrase,
        },
    )
    .await;
    if a.ok {
        tracing::warn!("configuration restored from a backup; every service restarts");
    }
    answer(a)
}

#[derive(Deserialize)]
struct ResetForm {
    confirm: String,
}

async fn factory_reset(State(app): State<AppState>, body: Bytes) -> Response {
    let f: ResetForm = match parse_json(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let a = ask(&app, &SetupRequest::FactoryReset { confirm: f.confirm }).await;
    if a.ok {
        tracing::warn!("factory reset from the setup page; the box is unclaimed again");
    }
    answer(a)
}

#[derive(Deserialize)]
struct LogsQuery {
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    level: Option<String>,
}

async fn logs(State(app): State<AppState>, Query(q): Query<LogsQuery>) -> Response {
    answer(
        ask(
            &app,
            &SetupRequest::Logs {
                service: q.service.filter(|s| !s.is_empty() && s != "all"),
                level: q.level.unwrap_or_else(|| "info".into()),
            },
        )
        .await,
    )
}

async fn support_bundle(State(app): State<AppState>) -> Response {
    let a = ask(&app, &SetupRequest::SupportBundle).await;
    if !a.ok {
        return answer(a);
    }
    let mut data = a.data;
    data["status"] =
        serde_json::to_value(app.link.query_status().await.ok()).unwrap_or(Value::Null);
    let body = serde_json::to_vec_pretty(&data).unwrap_or_default();
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"talkbox-support.json\"",
            ),
        ],
        body,
    )
        .into_response()
}

#[derive(Deserialize)]
struct DownQuery {
    #[serde(default)]
    mb: Option<u32>,
}

async fn speed_down(Query(q): Query<DownQuery>) -> Response {
    let mb = q.mb.unwrap_or(8).clamp(1, 64) as usize;
    // Random bytes, so no compression on the way can flatter the figure.
    let chunk = crate::secrets::random(64 * 1024).unwrap_or_else(|_| vec![0x5a; 64 * 1024]);
    let mut body = Vec::with_capacity(mb * 1024 * 1024);
    while body.len() < mb * 1024 * 1024 {
        body.extend_from_slice(&chunk);
    }
    ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response()
}

async fn speed_up(body: Bytes) -> Response {
    axum::Json(json!({"received": body.len()})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_follows_the_all_video_formula() {
        let c = capacity(100.0, 1.0, 2.0);
        // n × (n−1) ≤ 100 → n = 10 (90), n = 11 would need 110.
        assert_eq!(c["max_video"], 10);
        let row3 = &c["rows"][1];
        assert_eq!(row3["participants"], 3);
        assert_eq!(row3["video_out"], 6.0);
        assert_eq!(row3["video_in"], 3.0);
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; __Host-talkbox-session=xyz; b=2"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE).as_deref(), Some("xyz"));
        assert_eq!(cookie(&h, PRE_COOKIE), None);
    }
}
