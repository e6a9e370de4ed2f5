//! The setup page over HTTP against a real supervisor: no admin route answers without a
//! session, no change without the CSRF token; wrong codes and passwords are throttled with
//! growing delays; sessions end when idle, at logout and at a password change (of another
//! session); the one-time
//! login link of provisioning works once; an invalid config change changes nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use appliance::supervisor::status::ServiceState;
use appliance::web::api::{ADMIN_GET, ADMIN_POST};
use common::{Supervisor, isolated_config};
use serde_json::{Value, json};

/// One HTTP answer from curl.
#[derive(Debug)]
struct Answer {
    code: u32,
    headers: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// A browser-like client: curl with its own cookie jar.
struct Client {
    base: String,
    jar: PathBuf,
    csrf: String,
}

impl Client {
    fn new(base: &str, dir: &Path, name: &str) -> Client {
        Client {
            base: base.to_string(),
            jar: dir.join(format!("jar-{name}")),
            csrf: String::new(),
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>, csrf: Option<&str>) -> Answer {
        let mut c = Command::new("curl");
        c.args(["-sk", "--max-time", "20", "-D", "-", "-X", method])
            .arg("-b")
            .arg(&self.jar)
            .arg("-c")
            .arg(&self.jar);
        if let Some(t) = csrf {
            c.arg("-H").arg(format!("X-CSRF-Token: {t}"));
        }
        if let Some(b) = body {
            c.args(["-H", "Content-Type: application/json", "--data-binary"])
                .arg(b.to_string());
        }
        let out = c
            .arg(format!("{}{path}", self.base))
            .output()
            .expect("curl is needed (apt-get install curl)");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (headers, body) = text
            .split_once("\r\n\r\n")
            .map(|(h, b)| (h.to_string(), b.to_string()))
            .unwrap_or((text.clone(), String::new()));
        let code = headers
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        if code == 0 {
            let log = std::fs::read_to_string(self.jar.with_file_name("supervisor.log"))
                .unwrap_or_default();
            panic!(
                "{method} {path}: no HTTP answer ({}); supervisor log:\n{log}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Answer {
            code,
            headers,
            body,
        }
    }

    fn get(&self, path: &str) -> Answer {
        self.call("GET", path, None, None)
    }

    /// GET /api/session: remembers the form or session token.
    fn session(&mut self) -> Value {
        let v = self.get("/api/session").json();
        self.csrf = v["csrf"]
            .as_str()
            .or(v["pre"].as_str())
            .unwrap_or("")
            .to_string();
        v
    }

    fn post(&self, path: &str, body: Value) -> Answer {
        self.call("POST", path, Some(&body), Some(&self.csrf))
    }
}

fn start(extra: &[(&str, &str)]) -> (Supervisor, String) {
    start_with(extra, "")
}

/// `tail` is appended to the config (for tables such as `[[signaling.backend]]`).
fn start_with(extra: &[(&str, &str)], tail: &str) -> (Supervisor, String) {
    let mut cfg: Vec<(&str, &str)> = vec![("sfu", "enabled = false")];
    cfg.extend_from_slice(extra);
    let config = isolated_config(&cfg) + tail;
    let web = config
        .split("[web]")
        .nth(1)
        .and_then(|s| s.split('"').nth(1))
        .expect("web.listen in the config")
        .to_string();
    let sup = Supervisor::start(Some(&config));
    sup.wait_for("web running", Duration::from_secs(30), |s| {
        s.services
            .iter()
            .any(|x| x.name == "web" && x.state == ServiceState::Running)
    });
    (sup, format!("https://{web}"))
}

fn setup_code(sup: &Supervisor) -> String {
    sup.status()
        .and_then(|s| s.setup_code)
        .expect("an unclaimed box shows its setup code to `talkbox status`")
}

#[test]
fn admin_routes_refuse_without_session_and_without_csrf_token() {
    let (sup, base) = start(&[]);
    let mut c = Client::new(&base, sup.data_dir(), "a");
    // The page itself and the session probe are public.
    assert_eq!(c.get("/").code, 200);
    assert_eq!(c.session()["state"], "unclaimed");
    for path in ADMIN_GET {
        let a = c.get(path);
        assert_eq!(a.code, 401, "GET {path} without a session: {a:?}");
    }
    for path in ADMIN_POST {
        let a = c.post(path, json!({}));
        assert_eq!(a.code, 401, "POST {path} without a session: {a:?}");
    }
    // The claim form needs its double-submit token.
    let a = c.call(
        "POST",
        "/api/claim",
        Some(&json!({"code": setup_code(&sup), "password": "a long password"})),
        None,
    );
    assert_eq!(a.code, 403, "claim without form token: {a:?}");
    c.session();
    let a = c.post(
        "/api/claim",
        json!({"code": setup_code(&sup), "password": "a long password"}),
    );
    assert_eq!(a.code, 200, "{a:?}");
    let cookie = a
        .headers
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie: __host-talkbox-session=")
        })
        .expect("session cookie")
        .to_string();
    for attr in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attr), "{attr} missing in {cookie}");
    }
    assert!(
        sup.status().expect("status").setup_code.is_none(),
        "code must be gone after claiming"
    );
    c.session();
    for path in ADMIN_POST {
        let a = c.call("POST", path, Some(&json!({})), None);
        assert_eq!(a.code, 403, "POST {path} without CSRF token: {a:?}");
        let a = c.call("POST", path, Some(&json!({})), Some("forged-token"));
        assert_eq!(a.code, 403, "POST {path} with a wrong CSRF token: {a:?}");
    }
    for path in ADMIN_GET {
        let a = c.get(path);
        assert_eq!(a.code, 200, "GET {path} with a session: {a:?}");
    }
    // A config change that does not validate is refused and changes nothing.
    let before = std::fs::read_to_string(sup.data_dir().join("talkbox.toml")).expect("config");
    let a = c.post(
        "/api/backends",
        json!({"id": "nc1", "urls": ["ftp://cloud.example.com"]}),
    );
    assert_eq!(a.code, 400, "{a:?}");
    assert!(
        a.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("signaling.backend"),
        "{a:?}"
    );
    assert_eq!(
        before,
        std::fs::read_to_string(sup.data_dir().join("talkbox.toml")).expect("config")
    );
    // A valid one is written with a generated secret file and shown as the Talk values.
    let a = c.post(
        "/api/backends",
        json!({"id": "nc1", "urls": ["https://cloud.example.com/"]}),
    );
    assert_eq!(a.code, 200, "{a:?}");
    let v = c.get("/api/backends").json();
    let secret = v["backends"][0]["secret"]
        .as_str()
        .expect("secret")
        .to_string();
    let file = sup.data_dir().join("secrets/backend-nc1");
    assert_eq!(
        std::fs::read_to_string(&file).expect("secret file").trim(),
        secret
    );
    assert!(
        v["signaling_url"]
            .as_str()
            .unwrap_or("")
            .starts_with("https://"),
        "{v}"
    );
    assert!(v["turn_secret"].as_str().unwrap_or("").len() >= 32, "{v}");
    // Settings: an invalid value is refused with the key named and nothing is written; a
    // valid one is in force in the supervisor at once.
    let before = std::fs::read_to_string(sup.data_dir().join("talkbox.toml")).expect("config");
    for (bad, says) in [
        (json!({"values": {"turn.port": 70000}}), "turn.port"),
        (json!({"values": {"sfu.public_ips": ["nat"]}}), "public_ips"),
        (
            json!({"values": {"web.listen": "0.0.0.0:1"}}),
            "cannot be changed",
        ),
        (json!({"values": {}}), "nothing to change"),
    ] {
        let a = c.post("/api/settings", bad.clone());
        assert_eq!(a.code, 400, "{bad}: {a:?}");
        assert!(
            a.json()["error"].as_str().unwrap_or("").contains(says),
            "{bad}: {a:?}"
        );
    }
    assert_eq!(
        before,
        std::fs::read_to_string(sup.data_dir().join("talkbox.toml")).expect("config")
    );
    let a = c.post(
        "/api/settings",
        json!({"values": {"sfu.public_ips": ["203.0.113.9"], "supervisor.names": ["talk.example.org"]}}),
    );
    assert_eq!(a.code, 200, "{a:?}");
    let v = c.get("/api/settings").json();
    assert_eq!(v["sfu.public_ips"], json!(["203.0.113.9"]), "{v}");
    let v = c.get("/api/network").json();
    assert_eq!(v["public_name"], "talk.example.org", "{v}");
    // A password change ends the other sessions.
    let mut a1 = Client::new(&base, sup.data_dir(), "a1");
    let mut a2 = Client::new(&base, sup.data_dir(), "a2");
    for x in [&mut a1, &mut a2] {
        x.session();
        assert_eq!(
            x.post("/api/login", json!({"password": "a long password"}))
                .code,
            200
        );
        x.session();
    }
    let a = a1.post(
        "/api/password",
        json!({"old": "a long password", "new": "second password 2"}),
    );
    assert_eq!(a.code, 200, "{a:?}");
    assert_eq!(a1.get("/api/status").code, 200);
    assert_eq!(a2.get("/api/status").code, 401, "other session ended");
    // The new password is stored by the supervisor: it holds after a web restart.
    let hash = std::fs::read_to_string(sup.data_dir().join("web/admin.json")).expect("admin.json");
    assert!(hash.contains("$argon2id$"), "{hash}");
    assert!(!hash.contains("second password"), "{hash}");
    // Logout ends the session; its token no longer works.
    assert_eq!(a1.post("/api/logout", json!({})).code, 200);
    assert_eq!(a1.get("/api/status").code, 401);
}

#[test]
fn wrong_codes_and_passwords_are_throttled_with_growing_delays() {
    let (sup, base) = start(&[]);
    let mut c = Client::new(&base, sup.data_dir(), "t");
    c.session();
    let wrong = json!({"code": "AAAA-BBBB-CCCC-DDDD", "password": "a long password"});
    for i in 0..3 {
        let a = c.post("/api/claim", wrong.clone());
        assert_eq!(a.code, 403, "wrong code {i}: {a:?}");
    }
    // The fourth attempt must wait 1 s; even the right code is not looked at meanwhile.
    let right = json!({"code": setup_code(&sup), "password": "a long password"});
    let a = c.post("/api/claim", right.clone());
    assert_eq!(a.code, 429, "{a:?}");
    assert_eq!(a.header("retry-after").as_deref(), Some("1"), "{a:?}");
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(c.post("/api/claim", wrong.clone()).code, 403);
    let a = c.post("/api/claim", wrong.clone());
    assert_eq!(a.code, 429);
    assert_eq!(
        a.header("retry-after").as_deref(),
        Some("2"),
        "the delay doubles: {a:?}"
    );
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(c.post("/api/claim", wrong.clone()).code, 403);
    let a = c.post("/api/claim", right.clone());
    assert_eq!(a.code, 429);
    assert_eq!(
        a.header("retry-after").as_deref(),
        Some("4"),
        "and doubles again: {a:?}"
    );
    // Measured: how long the right code stays refused after the sixth failure.
    let t0 = Instant::now();
    let waited = loop {
        let a = c.post("/api/claim", right.clone());
        if a.code == 200 {
            break t0.elapsed();
        }
        assert_eq!(a.code, 429, "{a:?}");
        assert!(t0.elapsed() < Duration::from_secs(20), "still refused");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        waited >= Duration::from_millis(3500),
        "accepted after {waited:?}, before the 4 s delay"
    );
    println!(
        "throttle measured: Retry-After 1 s, 2 s, 4 s after the 4th, 5th and 6th wrong code; the right code was accepted {waited:?} after the 6th failure's refusal"
    );

    // Passwords: same figures, per client; a success clears the count.
    let mut l = Client::new(&base, sup.data_dir(), "l");
    assert_eq!(l.session()["state"], "login");
    let t0 = Instant::now();
    for i in 0..3 {
        let a = l.post("/api/login", json!({"password": format!("wrong {i}")}));
        assert_eq!(a.code, 403, "{a:?}");
    }
    let a = l.post("/api/login", json!({"password": "a long password"}));
    assert_eq!(a.code, 429, "{a:?}");
    assert_eq!(a.header("retry-after").as_deref(), Some("1"));
    while t0.elapsed() < Duration::from_secs(30) {
        let a = l.post("/api/login", json!({"password": "a long password"}));
        if a.code == 200 {
            break;
        }
        assert_eq!(a.code, 429, "{a:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(l.session()["state"], "admin");
    let a = l.post("/api/login", json!({"password": "wrong again"}));
    assert_eq!(a.code, 403, "{a:?}");
    println!("throttle: 3 free failures, then 1 s, 2 s, 4 s ... (max 300 s) per client address");
}

#[test]
fn sessions_end_when_idle_and_login_links_work_once() {
    let (sup, base) = start(&[("web", "session_idle_s = 2")]);
    let data = sup.data_dir().to_path_buf();
    // A one-time login link on an unclaimed box gives a session that must set a password.
    let token = "one-time-token-from-provisioning";
    let sha = hex_sha256(token);
    let link = data.join("web/login-link.json");
    let expires = appliance::web::requests::rfc3339(appliance::web::requests::now_unix() + 120);
    std::fs::write(
        &link,
        json!({"token_sha256": sha, "expires": expires}).to_string(),
    )
    .expect("link");
    let mut c = Client::new(&base, &data, "s");
    assert_eq!(c.get("/login/once?token=wrong-token").code, 403);
    assert!(link.exists(), "a wrong token must not consume the link");
    let a = c.get(&format!("/login/once?token={token}"));
    assert_eq!(a.code, 303, "{a:?}");
    assert!(!link.exists(), "the link is consumed");
    assert_eq!(c.session()["state"], "set-password");
    assert_eq!(
        c.get("/api/status").code,
        403,
        "nothing but setting a password"
    );
    let a = c.post("/api/password", json!({"new": "first password 1"}));
    assert_eq!(a.code, 200, "{a:?}");
    assert_eq!(c.get("/api/status").code, 200);
    let again = Client::new(&base, &data, "again");
    assert_eq!(
        again.get(&format!("/login/once?token={token}")).code,
        403,
        "used once"
    );
    // Idle expiry.
    std::thread::sleep(Duration::from_millis(2600));
    assert_eq!(c.get("/api/status").code, 401, "idle session must end");
    let mut a1 = Client::new(&base, &data, "a1");
    a1.session();
    assert_eq!(
        a1.post("/api/login", json!({"password": "first password 1"}))
            .code,
        200
    );
    a1.session();
    // The provisioning audit log is shown newest first.
    std::fs::create_dir_all(data.join("provisioning")).expect("dir");
    std::fs::write(
        data.join("provisioning/audit.jsonl"),
        "{\"time\":\"2026-11-22T10:00:00Z\",\"source\":\"usb\",\"key\":\"SHA256:ab\",\"serial\":1,\"result\":\"applied\",\"message\":\"first\"}\n{\"time\":\"2026-11-22T11:00:00Z\",\"source\":\"network\",\"key\":\"SHA256:ab\",\"serial\":2,\"result\":\"refused\",\"message\":\"<b>second</b>\"}\n",
    )
    .expect("audit");
    let v = a1.get("/api/provisioning").json();
    assert_eq!(v["entries"][0]["message"], "<b>second</b>", "{v}");
    assert_eq!(v["entries"][1]["serial"], "1", "{v}");
}

#[test]
fn sessions_end_at_their_absolute_lifetime_however_active() {
    // 60 s is the shortest lifetime the config allows; the idle limit is longer than the gap
    // between requests, so only the absolute lifetime can end this session.
    let (sup, base) = start(&[
        ("web", "session_max_s = 60"),
        ("web", "session_idle_s = 30"),
    ]);
    let mut c = Client::new(&base, sup.data_dir(), "max");
    c.session();
    let a = c.post(
        "/api/claim",
        json!({"code": setup_code(&sup), "password": "a long password"}),
    );
    assert_eq!(a.code, 200, "{a:?}");
    let login = Instant::now();
    c.session();
    let ended = loop {
        let a = c.get("/api/status");
        let t = login.elapsed();
        if a.code == 401 {
            break t;
        }
        assert_eq!(a.code, 200, "{a:?}");
        assert!(
            t < Duration::from_secs(75),
            "session still open after {t:?}"
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    assert!(
        ended >= Duration::from_secs(58),
        "session ended after {ended:?}, before its 60 s lifetime"
    );
    println!(
        "absolute session lifetime 60 s: first refusal {ended:?} after login (requests every 2 s)"
    );
    // A new login opens a new session.
    let mut l = Client::new(&base, sup.data_dir(), "max2");
    l.session();
    assert_eq!(
        l.post("/api/login", json!({"password": "a long password"}))
            .code,
        200
    );
    assert_eq!(l.get("/api/status").code, 200);
}

#[test]
fn engineer_key_given_at_claim_is_trusted_and_bad_keys_are_refused() {
    let (sup, base) = start(&[]);
    let mut c = Client::new(&base, sup.data_dir(), "e");
    c.session();
    let a = c.post(
        "/api/claim",
        json!({"code": setup_code(&sup), "password": "a long password", "engineer_key": "talkbox-engineer-ed25519 AAAA"}),
    );
    assert_eq!(a.code, 400, "{a:?}");
    assert!(a.body.contains("32"), "{a:?}");
    let key = "talkbox-engineer-ed25519 ".to_string() + &"A".repeat(43) + "=";
    let a = c.post(
        "/api/claim",
        json!({"code": setup_code(&sup), "password": "a long password", "engineer_key": key}),
    );
    assert_eq!(a.code, 200, "{a:?}");
    let keys =
        std::fs::read_to_string(sup.data_dir().join("provisioning/trusted-keys")).expect("keys");
    assert_eq!(keys.trim(), key);
}

#[test]
fn support_bundle_has_the_config_without_secrets_and_logs_answer() {
    let secret = "inline-secret-0123456789-abcdef";
    let (sup, base) = start_with(
        &[],
        &format!(
            "[[signaling.backend]]\nid = \"inl\"\nurls = [\"https://cloud.example.org\"]\nsecret = \"{secret}\"\n"
        ),
    );
    let mut c = Client::new(&base, sup.data_dir(), "b");
    c.session();
    let code = sup.status().and_then(|s| s.setup_code).expect("code");
    assert_eq!(
        c.post(
            "/api/claim",
            json!({"code": code, "password": "a long password"})
        )
        .code,
        200
    );
    let a = c.get("/api/support-bundle");
    assert_eq!(a.code, 200, "{a:?}");
    assert!(
        a.header("content-disposition")
            .unwrap_or_default()
            .contains("attachment"),
        "{a:?}"
    );
    assert!(
        !a.body.contains(secret),
        "secret leaked into the bundle: {}",
        a.body
    );
    let v = a.json();
    assert!(
        v["config"]
            .as_str()
            .unwrap_or("")
            .contains("cloud.example.org"),
        "{v}"
    );
    assert!(
        v["config"].as_str().unwrap_or("").contains("(removed)"),
        "{v}"
    );
    assert_eq!(v["talkbox"], env!("CARGO_PKG_VERSION"));
    assert!(v["status"]["services"].is_array(), "{v}");
    assert!(v["status"].get("setup_code").is_none(), "{v}");
    // Logs answer (from the journal under systemd; a plain note elsewhere); bad levels are refused.
    let a = c.get("/api/logs?service=web&level=warn");
    assert_eq!(a.code, 200, "{a:?}");
    assert!(a.json()["available"].is_boolean(), "{a:?}");
    assert_eq!(c.get("/api/logs?level=loud").code, 400);
    assert_eq!(c.get("/api/logs?service=../../etc&level=info").code, 400);
}

/// Waits until a fresh client sees the page in `state` (services restart after a restore).
fn wait_state(base: &str, dir: &Path, state: &str) {
    let start = Instant::now();
    let mut last = Value::Null;
    while start.elapsed() < Duration::from_secs(30) {
        let out = Command::new("curl")
            .args(["-sk", "--max-time", "5"])
            .arg(format!("{base}/api/session"))
            .output()
            .expect("curl");
        last = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if last["state"] == state {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "the page never showed {state}; last {last}; dir {}",
        dir.display()
    );
}

#[test]
fn backup_restores_only_with_its_passphrase_and_factory_reset_needs_the_typed_words() {
    let (sup, base) = start(&[]);
    let data = sup.data_dir().to_path_buf();
    let mut c = Client::new(&base, &data, "k");
    c.session();
    let code = sup.status().and_then(|s| s.setup_code).expect("code");
    assert_eq!(
        c.post(
            "/api/claim",
            json!({"code": code, "password": "the first password"})
        )
        .code,
        200
    );
    c.session();
    assert_eq!(c.post("/api/backups", json!({})).code, 404);
    assert_eq!(
        c.post("/api/backup", json!({"passphrase": "short"})).code,
        400
    );
    let a = c.post("/api/backup", json!({"passphrase": "backup passphrase 1"}));
    assert_eq!(a.code, 200, "{a:?}");
    let backup = a.body.clone();
    let turn_secret = std::fs::read_to_string(data.join("secrets/turn-secret")).expect("secret");
    assert!(!backup.contains(turn_secret.trim()), "backup not encrypted");
    // Changes after the backup: a backend and a new password.
    assert_eq!(
        c.post(
            "/api/backends",
            json!({"id": "later", "urls": ["https://later.example.com"]})
        )
        .code,
        200
    );
    assert_eq!(
        c.post(
            "/api/password",
            json!({"old": "the first password", "new": "the second password"})
        )
        .code,
        200
    );
    let config_before = std::fs::read_to_string(data.join("talkbox.toml")).expect("config");
    let a = c.post(
        "/api/restore",
        json!({"backup": backup, "passphrase": "not the passphrase"}),
    );
    assert_eq!(a.code, 400, "{a:?}");
    assert!(a.body.contains("wrong passphrase"), "{a:?}");
    assert_eq!(
        config_before,
        std::fs::read_to_string(data.join("talkbox.toml")).expect("config"),
        "a refused restore changed the config"
    );
    let a = c.post(
        "/api/restore",
        json!({"backup": backup, "passphrase": "backup passphrase 1"}),
    );
    assert_eq!(a.code, 200, "{a:?}");
    assert!(
        !std::fs::read_to_string(data.join("talkbox.toml"))
            .expect("config")
            .contains("later"),
        "backend of after the backup still there"
    );
    // Every service restarts; the password of the backup holds again.
    std::thread::sleep(Duration::from_millis(1500));
    wait_state(&base, &data, "login");
    let mut l = Client::new(&base, &data, "l2");
    l.session();
    assert_eq!(
        l.post("/api/login", json!({"password": "the second password"}))
            .code,
        403
    );
    assert_eq!(
        l.post("/api/login", json!({"password": "the first password"}))
            .code,
        200
    );
    l.session();
    // Factory reset: only with the typed words; then the box is unclaimed with new secrets.
    assert_eq!(
        l.post("/api/factory-reset", json!({"confirm": "yes"})).code,
        400
    );
    assert!(data.join("web/admin.json").exists());
    let a = l.post("/api/factory-reset", json!({"confirm": "factory reset"}));
    assert_eq!(a.code, 200, "{a:?}");
    assert!(!data.join("web/admin.json").exists());
    let new_turn = std::fs::read_to_string(data.join("secrets/turn-secret")).expect("new secret");
    assert_ne!(new_turn, turn_secret, "secrets must be made anew");
    std::thread::sleep(Duration::from_millis(1500));
    wait_state(&base, &data, "unclaimed");
    let new_code = sup
        .status()
        .and_then(|s| s.setup_code)
        .expect("a new setup code");
    assert_ne!(new_code, code);
    assert!(
        sup.log().contains(&format!("setup code: {new_code}")),
        "new code not on the console"
    );
}

fn hex_sha256(s: &str) -> String {
    let out = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut ch| {
            use std::io::Write;
            ch.stdin.take().expect("stdin").write_all(s.as_bytes())?;
            ch.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// Reading the journal must not stop the supervisor's loop. A slow journal is stood in for by
/// a `journalctl` on PATH that takes 1.6 s (the thing under test is the supervisor, which runs
/// `timeout 2 journalctl …`); while the page reads logs three times in a row, `talkbox status`
/// (answered by the same loop) must keep answering quickly.
#[test]
fn the_supervisor_keeps_answering_while_logs_are_read() {
    let stub = tempfile::tempdir().expect("tempdir");
    let journalctl = stub.path().join("journalctl");
    std::fs::write(
        &journalctl,
        "#!/bin/sh\nsleep 1.6\necho '2026-11-22T12:00:00+0000 box talkbox-web[1]: a slow journal line'\n",
    )
    .expect("write stub");
    std::fs::set_permissions(
        &journalctl,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let config = isolated_config(&[("sfu", "enabled = false")]);
    let web = config
        .split("[web]")
        .nth(1)
        .and_then(|s| s.split('"').nth(1))
        .expect("web.listen")
        .to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("talkbox.toml"), &config).expect("config");
    let stderr_log = dir.path().join("supervisor.log");
    let child = Command::new(common::talkbox())
        .args(["run", "--data-dir"])
        .arg(dir.path())
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        // Claims a journal (it does not match stderr, so the services still log to stderr).
        .env("JOURNAL_STREAM", "0:0")
        .env(
            "PATH",
            format!(
                "{}:{}",
                stub.path().display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_log).expect("log"))
        .spawn()
        .expect("start talkbox run");
    let sup = Supervisor {
        dir,
        child,
        stderr_log,
    };
    sup.wait_for("web running", Duration::from_secs(30), |s| {
        s.services
            .iter()
            .any(|x| x.name == "web" && x.state == ServiceState::Running)
    });
    let base = format!("https://{web}");
    let mut c = Client::new(&base, sup.data_dir(), "logs");
    c.session();
    let code = sup.status().and_then(|s| s.setup_code).expect("code");
    assert_eq!(
        c.post(
            "/api/claim",
            json!({"code": code, "password": "a long password"})
        )
        .code,
        200
    );
    c.session();
    let reader = std::thread::spawn(move || {
        let start = Instant::now();
        for _ in 0..3 {
            let a = c.get("/api/logs?level=info");
            assert_eq!(a.code, 200, "{a:?}");
            let v = a.json();
            assert_eq!(v["available"], true, "{v}");
            assert!(
                v["lines"][0]
                    .as_str()
                    .unwrap_or("")
                    .contains("a slow journal line"),
                "{v}"
            );
        }
        start.elapsed()
    });
    let mut worst = Duration::ZERO;
    let mut answered = 0;
    while !reader.is_finished() {
        let t = Instant::now();
        assert!(sup.status().is_some(), "talkbox status got no answer");
        worst = worst.max(t.elapsed());
        answered += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let reading = reader.join().expect("log reader");
    eprintln!(
        "3 log reads took {reading:?}; {answered} status answers meanwhile, the slowest {worst:?}"
    );
    assert!(
        reading >= Duration::from_millis(4500),
        "the journal was not slow: {reading:?}"
    );
    assert!(answered >= 5, "only {answered} status answers");
    assert!(
        worst < Duration::from_millis(1000),
        "talkbox status waited {worst:?} while logs were read: the journal blocks the loop"
    );
}

/// The speed test's download figure, offered by the page, is a sizing figure: the SFU's sizer
/// takes it within seconds (the lowest figure wins), bad figures are refused with the allowed
/// range and change nothing, and forgetting it brings the other figures back.
#[test]
fn a_browser_figure_sizes_the_box_and_bad_figures_change_nothing() {
    let (sup, base) = start(&[
        ("sfu", "enabled = true"),
        ("sizing", "uplink_mbps = 500"),
        ("sizing", "egress_fraction = 0.5"),
    ]);
    let mut c = Client::new(&base, sup.data_dir(), "s");
    c.session();
    let code = setup_code(&sup);
    let a = c.post(
        "/api/claim",
        json!({"code": code, "password": "a long password"}),
    );
    assert_eq!(a.code, 200, "{a:?}");
    c.session();
    // The SFU's sizer has written its state: 500 Mbit/s declared, half of it the budget.
    let capacity = |c: &Client| {
        let v = c.get("/api/network").json();
        (v["capacity_mbps"].as_f64(), v["budget_mbps"].as_f64())
    };
    let wait_capacity = |c: &Client, want: f64| {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if capacity(c).0 == Some(want) && sup.data_dir().join("sizing/state.json").exists() {
                return t0.elapsed();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("capacity never became {want}: {:?}", capacity(c));
    };
    wait_capacity(&c, 500.0);
    let a = c.post("/api/sizing/browser", json!({"mbps": 42.5}));
    assert_eq!(a.code, 200, "{a:?}");
    let took = wait_capacity(&c, 42.5);
    println!("a browser figure was in force after {took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(capacity(&c).1, Some(21.25));
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(sup.data_dir().join("sizing/state.json")).expect("state"),
    )
    .expect("state.json");
    assert_eq!(state["budget_bps"], 21_250_000, "the SFU's limits: {state}");
    assert!(
        state["browser"]["peer"]
            .as_str()
            .unwrap_or("")
            .contains("127.0.0.1"),
        "{state}"
    );
    // Refused with the reason; the figure in force stays.
    for (body, want) in [
        (json!({"mbps": -1}), "allowed are"),
        (json!({"mbps": 0}), "allowed are"),
        (json!({"mbps": 1e12}), "allowed are"),
        (json!({"mbps": "fast"}), "malformed request"),
        (json!({"mbps": 5, "peer": "spoofed"}), "malformed request"),
    ] {
        let a = c.post("/api/sizing/browser", body.clone());
        assert_eq!(a.code, 400, "{body}: {a:?}");
        assert!(a.body.contains(want), "{body}: {a:?}");
    }
    // Without the CSRF token: refused, nothing stored.
    let a = c.call(
        "POST",
        "/api/sizing/browser",
        Some(&json!({"mbps": 1})),
        None,
    );
    assert_eq!(a.code, 403, "{a:?}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(capacity(&c).0, Some(42.5));
    // No peer configured: "measure again" says what is missing.
    let a = c.post("/api/sizing/measure", json!({}));
    assert_eq!(a.code, 400, "{a:?}");
    assert!(a.body.contains("sizing.peer"), "{a:?}");
    // Forgotten: the declared uplink is the capacity again.
    let a = c.post("/api/sizing/browser", json!({"mbps": null}));
    assert_eq!(a.code, 200, "{a:?}");
    wait_capacity(&c, 500.0);
}

/// The UDP self-check's offer route checks what it forwards to the SFU: not SDP, too large or
/// an unknown field is refused with the reason; an SDP the SFU cannot use comes back as the
/// SFU's refusal, and the check can run again at once (no test call left holding the slot).
#[test]
fn udp_test_call_offers_are_checked_before_they_reach_the_sfu() {
    let (sup, base) = start(&[("sfu", "enabled = true")]);
    let mut c = Client::new(&base, sup.data_dir(), "u");
    c.session();
    let code = setup_code(&sup);
    let a = c.post(
        "/api/claim",
        json!({"code": code, "password": "a long password"}),
    );
    assert_eq!(a.code, 200, "{a:?}");
    c.session();
    for (body, want) in [
        (json!({"sdp": "hello"}), "must start with v=0"),
        (
            json!({"sdp": format!("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n{}", "a=x\r\n".repeat(14_000))}),
            "at most 65536",
        ),
        (json!({"sdp": "v=0", "extra": 1}), "malformed request"),
        (json!({}), "malformed request"),
    ] {
        let a = c.post("/api/checks/udp-offer", body.clone());
        assert_eq!(a.code, 400, "{a:?}");
        assert!(a.body.contains(want), "{want}: {a:?}");
    }
    // Shaped like SDP but not an offer the SFU can answer: its refusal, twice (the slot is free
    // again after a refusal).
    for _ in 0..2 {
        let a = c.post(
            "/api/checks/udp-offer",
            json!({"sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"}),
        );
        assert_eq!(a.code, 502, "{a:?}");
        assert!(a.body.contains("the SFU refused the test call"), "{a:?}");
    }
}
