//! The Nextcloud Test button and the Nextcloud self-checks against a real HTTP peer
//! (`common/fake_nextcloud.rs`: a Nextcloud stand-in on loopback that, like Talk, announces
//! conversation changes to its signaling server with signed requests over HTTPS). Checked: both directions pass with
//! the right secret and URL; a wrong secret on the Nextcloud side, a wrong signaling URL, a
//! wrong admin login and a skewed Nextcloud clock each fail with their own remedy; without a
//! login the Nextcloud → box direction says "not tested"; the Self-checks page shows the last
//! result.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use appliance::supervisor::status::ServiceState;
use common::fake_nextcloud::{self, ADMIN, APP_PASSWORD};
use common::{Supervisor, isolated_config};
use serde_json::{Value, json};

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
    let (talk, talk_addr) = rt.block_on(fake_nextcloud::start());
    let nc = format!("http://{talk_addr}");
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
