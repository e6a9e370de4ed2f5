//! The Nextcloud Test button and the Nextcloud self-checks against a real HTTP peer: a small
//! Nextcloud stand-in on loopback that answers the capabilities and signaling-backend calls
//! the box makes, and that, like Talk, announces conversation changes to its signaling server
//! with a signed `POST /api/v1/room/{token}` (random + HMAC-SHA256 checksum of the backend
//! secret) sent over HTTPS to the box's signaling service. Checked: both directions pass with
//! the right secret and URL; a wrong secret on the Nextcloud side, a wrong signaling URL, a
//! wrong admin login and a skewed Nextcloud clock each fail with their own remedy; without a
//! login the Nextcloud → box direction says "not tested"; the Self-checks page shows the last
//! result.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use appliance::signaling::checksum;
use appliance::supervisor::status::ServiceState;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use common::{Supervisor, isolated_config};
use serde_json::{Value, json};

/// What the stand-in knows: what an admin pasted into Talk's settings, and its clock offset.
#[derive(Default)]
struct Talk {
    /// Its own base URL: Talk sends it as Spreed-Signaling-Backend.
    base: String,
    signaling_url: String,
    secret: String,
    skew_s: i64,
    /// Every announcement sent to the signaling server: (type, HTTP status, feature header).
    sent: Vec<(String, u32, String)>,
    rooms: u32,
}

type Shared = Arc<Mutex<Talk>>;

const ADMIN: &str = "admin";
const APP_PASSWORD: &str = "app-password-1";

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

fn start_talk(rt: &tokio::runtime::Runtime) -> (Shared, SocketAddr) {
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
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    rt.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (talk, addr)
}

/// curl with a cookie jar, as in setup_http.
struct Admin {
    base: String,
    jar: PathBuf,
    csrf: String,
}

impl Admin {
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u32, Value) {
        let mut c = Command::new("curl");
        c.args([
            "-sk",
            "--max-time",
            "90",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
        ])
        .arg("-b")
        .arg(&self.jar)
        .arg("-c")
        .arg(&self.jar)
        .arg("-H")
        .arg(format!("X-CSRF-Token: {}", self.csrf));
        if let Some(b) = body {
            c.args(["-H", "Content-Type: application/json", "--data-binary"])
                .arg(b.to_string());
        }
        let out = c
            .arg(format!("{}{path}", self.base))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (
            code.trim().parse().unwrap_or(0),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    }

    fn session(&mut self) -> Value {
        let (_, v) = self.call("GET", "/api/session", None);
        self.csrf = v["csrf"]
            .as_str()
            .or(v["pre"].as_str())
            .unwrap_or("")
            .to_string();
        v
    }
}

fn check<'a>(result: &'a Value, name: &str) -> &'a Value {
    result["checks"]
        .as_array()
        .and_then(|l| l.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name:?} in {result}"))
}

fn wait_signaling(sup: &Supervisor, old_pid: Option<u32>) {
    sup.wait_for(
        "signaling running (restarted)",
        Duration::from_secs(60),
        |s| {
            s.services.iter().any(|x| {
                x.name == "signaling"
                    && x.state == ServiceState::Running
                    && (old_pid.is_none() || x.pid != old_pid)
            })
        },
    );
}

fn signaling_pid(sup: &Supervisor) -> Option<u32> {
    sup.status().and_then(|s| {
        s.services
            .iter()
            .find(|x| x.name == "signaling")
            .and_then(|x| x.pid)
    })
}

fn listen_port(config: &str, section: &str) -> u16 {
    config
        .split(&format!("[{section}]"))
        .nth(1)
        .and_then(|s| s.split("listen = \"").nth(1))
        .and_then(|s| s.split('"').next())
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("listen port")
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("supervisor.log")).unwrap_or_default()
}

#[test]
fn nextcloud_test_checks_both_directions_against_a_real_peer() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (talk, talk_addr) = start_talk(&rt);
    let nc = format!("http://{talk_addr}");
    talk.lock().expect("lock").base = format!("{nc}/");
    let config = isolated_config(&[
        ("sfu", "enabled = false"),
        ("supervisor", "names = [\"localhost\"]"),
    ]);
    let web_port = listen_port(&config, "web");
    let sup = Supervisor::start(Some(&config));
    sup.wait_for("web running", Duration::from_secs(60), |s| {
        s.services
            .iter()
            .any(|x| x.name == "web" && x.state == ServiceState::Running)
    });
    let mut a = Admin {
        base: format!("https://127.0.0.1:{web_port}"),
        jar: sup.data_dir().join("jar-nc"),
        csrf: String::new(),
    };
    a.session();
    let code = sup.status().and_then(|s| s.setup_code).expect("setup code");
    let (c, v) = a.call(
        "POST",
        "/api/claim",
        Some(&json!({"code": code, "password": "a long password"})),
    );
    assert_eq!(c, 200, "{v}");
    a.session();
    let before = signaling_pid(&sup);
    let (c, v) = a.call(
        "POST",
        "/api/backends",
        Some(&json!({"id": "cloud", "urls": [nc]})),
    );
    assert_eq!(c, 200, "{v}");
    wait_signaling(&sup, before);
    // The admin pastes the values shown into Talk's settings.
    let (_, values) = a.call("GET", "/api/backends", None);
    let box_url = values["signaling_url"].as_str().expect("url").to_string();
    assert!(box_url.starts_with("https://localhost:"), "{values}");
    {
        let mut t = talk.lock().expect("lock");
        t.signaling_url = box_url.clone();
        t.secret = values["backends"][0]["secret"]
            .as_str()
            .expect("secret")
            .to_string();
    }
    let test = |login: bool| -> Value {
        let mut body = json!({"id": "cloud"});
        if login {
            body["nc_user"] = json!(ADMIN);
            body["nc_password"] = json!(APP_PASSWORD);
        }
        let (c, v) = a.call("POST", "/api/backends/test", Some(&body));
        assert_eq!(c, 200, "{v}\n{}", log_of(sup.data_dir()));
        v["results"][0].clone()
    };

    // Without a login: box → Nextcloud passes, Nextcloud → box is not tested.
    let r = test(false);
    assert_eq!(
        check(&r, "Box → Nextcloud: Talk's capabilities")["ok"],
        true,
        "{r}"
    );
    assert_eq!(
        check(&r, "Box → Nextcloud: signed backend request")["ok"],
        true,
        "{r}"
    );
    assert_eq!(
        check(&r, "Clocks of the box and Nextcloud agree")["ok"],
        true,
        "{r}"
    );
    assert_eq!(
        check(&r, "Nextcloud → box: signed round trip")["ok"],
        Value::Null,
        "{r}"
    );
    assert!(talk.lock().expect("lock").sent.is_empty());

    // With the admin login: the stand-in announces the test conversation to the box.
    let r = test(true);
    let inbound = check(&r, "Nextcloud → box: signed round trip");
    assert_eq!(inbound["ok"], true, "{r}\n{}", log_of(sup.data_dir()));
    assert!(
        inbound["detail"].as_str().unwrap_or("").contains("invite"),
        "{r}"
    );
    assert_eq!(r["ok"], true, "{r}");
    let sent = talk.lock().expect("lock").sent.clone();
    assert!(
        sent.iter()
            .any(|(k, code, f)| k == "invite" && *code == 200 && f.contains("hello-v2")),
        "the box must accept Talk's signed announcement with its feature header: {sent:?}"
    );
    assert!(
        sent.iter().any(|(k, _, _)| k == "delete"),
        "the test conversation is deleted: {sent:?}"
    );
    println!("announcements seen by Talk's side: {sent:?}");

    // The Self-checks page shows the result and the clock comparison.
    let (c, checks) = a.call("GET", "/api/checks", None);
    assert_eq!(c, 200);
    let list = checks["checks"].as_array().expect("checks");
    let by = |prefix: &str| {
        list.iter()
            .find(|c| c["name"].as_str().unwrap_or("").starts_with(prefix))
            .unwrap_or_else(|| panic!("no check {prefix}: {checks}"))
            .clone()
    };
    assert_eq!(
        by("The box reachable from Nextcloud")["ok"],
        true,
        "{checks}"
    );
    assert_eq!(
        by("Nextcloud reachable from the box")["ok"],
        true,
        "{checks}"
    );
    assert_eq!(by("Clock agrees with Nextcloud")["ok"], true, "{checks}");
    assert_eq!(
        by("DNS: localhost resolves to the box")["ok"],
        true,
        "{checks}"
    );

    // A wrong admin login is refused with its own remedy.
    {
        let body = json!({"id": "cloud", "nc_user": ADMIN, "nc_password": "wrong"});
        let (_, v) = a.call("POST", "/api/backends/test", Some(&body));
        let inbound = check(&v["results"][0], "Nextcloud → box: signed round trip");
        assert_eq!(inbound["ok"], false, "{v}");
        assert!(
            inbound["remedy"]
                .as_str()
                .unwrap_or("")
                .contains("app password"),
            "{v}"
        );
    }

    // Nextcloud holds another secret and its clock is two minutes ahead.
    {
        let mut t = talk.lock().expect("lock");
        t.secret = "not the secret the box gave".into();
        t.skew_s = 120;
    }
    let r = test(true);
    assert_eq!(
        check(&r, "Box → Nextcloud: signed backend request")["ok"],
        false,
        "{r}"
    );
    let inbound = check(&r, "Nextcloud → box: signed round trip");
    assert_eq!(inbound["ok"], false, "{r}");
    assert!(
        inbound["detail"]
            .as_str()
            .unwrap_or("")
            .contains("another secret"),
        "{r}"
    );
    let clock = check(&r, "Clocks of the box and Nextcloud agree");
    assert_eq!(clock["ok"], false, "{r}");
    let detail = clock["detail"].as_str().unwrap_or("");
    assert!(detail.contains("ahead"), "{r}");
    assert!(
        clock["remedy"].as_str().unwrap_or("").contains("NTP"),
        "{r}"
    );

    // Talk is configured with another signaling URL: nothing reaches the box.
    {
        let mut t = talk.lock().expect("lock");
        t.secret = values["backends"][0]["secret"]
            .as_str()
            .expect("secret")
            .to_string();
        t.skew_s = 0;
        t.signaling_url = format!("https://127.0.0.1:{}/", common::free_port());
    }
    let r = test(true);
    let inbound = check(&r, "Nextcloud → box: signed round trip");
    assert_eq!(inbound["ok"], false, "{r}");
    assert!(
        inbound["detail"]
            .as_str()
            .unwrap_or("")
            .contains("no request"),
        "{r}"
    );
    assert!(
        inbound["remedy"].as_str().unwrap_or("").contains(&box_url),
        "{r}"
    );
    let (_, checks) = a.call("GET", "/api/checks", None);
    let last = checks["checks"]
        .as_array()
        .and_then(|l| {
            l.iter()
                .find(|c| {
                    c["name"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with("The box reachable from Nextcloud")
                })
                .cloned()
        })
        .expect("check");
    assert_eq!(
        last["ok"], false,
        "the Self-checks page shows the last result: {checks}"
    );
    drop(sup);
    drop(rt);
}
