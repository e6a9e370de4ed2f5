//! ACME against a real ACME server: Debian's `pebble`, whose validation authority resolves the
//! box's name through a small DNS server in this test (every A query answers 127.0.0.1) and
//! then really fetches the HTTP-01 challenge from the box's port-80 listener
//! (`web.acme_http_listen`, on a free loopback port that pebble is told to use).
//!
//! Shows: the order is issued and the new certificate is served by the setup page (without a
//! restart of the web process) and by signaling; nothing is ordered while the certificate is
//! outside the renewal window; widening the window renews it; when the CA is gone the failure
//! is shown on the page with the reason while the old certificate stays served. Needs
//! `apt-get install pebble curl openssl`.

mod common;

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use appliance::supervisor::status::ServiceState;
use common::{Supervisor, free_port, isolated_config};
use serde_json::{Value, json};

const NAME: &str = "box.talkbox.test";

/// Answers every A question with 127.0.0.1 and every other type with an empty answer.
struct Dns {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Dns {
    fn start() -> Dns {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind dns");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let port = sock.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stop2.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(answer) = dns_answer(&buf[..n]) {
                    let _ = sock.send_to(&answer, from);
                }
            }
        });
        Dns {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn dns_answer(q: &[u8]) -> Option<Vec<u8>> {
    if q.len() < 12 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    // Walk the one question's name to find its type.
    let mut i = 12;
    while i < q.len() && q[i] != 0 {
        i += 1 + usize::from(q[i]);
    }
    let end = i + 5;
    if end > q.len() {
        return None;
    }
    let qtype = u16::from_be_bytes([q[i + 1], q[i + 2]]);
    let mut r = Vec::with_capacity(end + 16);
    r.extend_from_slice(&q[..2]);
    r.extend_from_slice(&[0x84, 0x00]); // response, authoritative, NOERROR
    r.extend_from_slice(&[0, 1, 0, u8::from(qtype == 1), 0, 0, 0, 0]);
    r.extend_from_slice(&q[12..end]);
    if qtype == 1 {
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
    }
    Some(r)
}

/// A pebble ACME server on loopback with its own TLS certificate.
struct Pebble {
    child: Child,
    directory: String,
    management: String,
    tls_ca: PathBuf,
    log: PathBuf,
}

impl Pebble {
    fn start(dir: &Path, http_port: u16, dns_port: u16) -> Pebble {
        // Pebble's HTTPS listener: a CA made here, and a certificate for 127.0.0.1 from it.
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "pebble listener test CA");
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let leaf_key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("params");
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).expect("leaf");
        let tls_ca = dir.join("pebble-listener-ca.pem");
        std::fs::write(&tls_ca, ca_cert.pem()).expect("write");
        std::fs::write(dir.join("pebble-cert.pem"), leaf_cert.pem()).expect("write");
        std::fs::write(dir.join("pebble-key.pem"), leaf_key.serialize_pem()).expect("write");
        let (listen, mgmt) = (free_port(), free_port());
        let config = json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{listen}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": dir.join("pebble-cert.pem"),
            "privateKey": dir.join("pebble-key.pem"),
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        std::fs::write(dir.join("pebble.json"), config.to_string()).expect("write");
        let log = dir.join("pebble.log");
        let child = Command::new("pebble")
            .arg("-config")
            .arg(dir.join("pebble.json"))
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{dns_port}"))
            // No random sleeps before validation; no deliberately rejected nonces.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble is needed (apt-get install pebble)");
        let p = Pebble {
            child,
            directory: format!("https://127.0.0.1:{listen}/dir"),
            management: format!("https://127.0.0.1:{mgmt}"),
            tls_ca,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while curl_ca(&p.directory, &p.tls_ca).0 != 200 {
            assert!(
                Instant::now() < deadline,
                "pebble did not start: {}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The root of the certificates pebble issues (it makes a new one at every start).
    fn issuing_root(&self, dir: &Path) -> PathBuf {
        let (code, body) = curl_ca(&format!("{}/roots/0", self.management), &self.tls_ca);
        assert_eq!(code, 200, "pebble's root: {body}");
        let path = dir.join("pebble-issuing-root.pem");
        std::fs::write(&path, body).expect("write");
        path
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
    }
}

fn curl_ca(url: &str, ca: &Path) -> (u32, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
            "--cacert",
        ])
        .arg(ca)
        .arg(url)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        format!("{body}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

/// The leaf certificate a TLS listener presents for `NAME`, as PEM.
fn served_leaf(addr: &str) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", addr, "-servername", NAME])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("openssl");
    first_pem(&String::from_utf8_lossy(&out.stdout))
}

fn first_pem(text: &str) -> String {
    let start = text.find("-----BEGIN CERTIFICATE-----");
    let end = text.find("-----END CERTIFICATE-----");
    match (start, end) {
        (Some(s), Some(e)) if e > s => text[s..e].split_whitespace().collect(),
        _ => String::new(),
    }
}

/// Does `addr` serve a certificate for `NAME` that chains to `root`?
fn verifies(addr: &str, root: &Path) -> bool {
    let port = addr.rsplit(':').next().unwrap_or("0");
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "--max-time", "10", "--cacert"])
        .arg(root)
        .arg("--resolve")
        .arg(format!("{NAME}:{port}:127.0.0.1"))
        .arg(format!("https://{NAME}:{port}/"))
        .output()
        .expect("curl");
    out.status.success()
}

/// The admin's view of the page, over HTTP with a cookie jar.
struct Admin {
    base: String,
    jar: PathBuf,
    csrf: String,
}

impl Admin {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let mut c = Command::new("curl");
        c.args(["-sk", "--max-time", "20", "-X", method, "-b"])
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
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn claim(base: &str, dir: &Path, code: &str) -> Admin {
        let mut a = Admin {
            base: base.into(),
            jar: dir.join("jar-admin"),
            csrf: String::new(),
        };
        let s = a.call("GET", "/api/session", None);
        a.csrf = s["pre"].as_str().unwrap_or("").into();
        let r = a.call(
            "POST",
            "/api/claim",
            Some(json!({"code": code, "password": "a long password"})),
        );
        assert!(r.get("error").is_none(), "claim: {r}");
        let s = a.call("GET", "/api/session", None);
        a.csrf = s["csrf"].as_str().unwrap_or("").into();
        assert!(!a.csrf.is_empty(), "{s}");
        a
    }
}

fn wait<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
    log: &dyn Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn pid_of(sup: &Supervisor, name: &str) -> Option<u32> {
    sup.status()?
        .services
        .into_iter()
        .find(|s| s.name == name && s.state == ServiceState::Running)?
        .pid
}

#[test]
fn acme_issues_serves_renews_in_the_window_and_reports_failure_keeping_the_old_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dns = Dns::start();
    let http_port = free_port();
    let mut pebble = Pebble::start(dir.path(), http_port, dns.port);
    let (directory, tls_ca) = (pebble.directory.clone(), pebble.tls_ca.clone());
    let first = isolated_config(&[
        ("sfu", "enabled = false"),
        ("supervisor", &format!("names = [\"{NAME}\"]")),
        ("web", "acme_enabled = true"),
        ("web", &format!("acme_directory = \"{directory}\"")),
        ("web", &format!("acme_ca_file = \"{}\"", tls_ca.display())),
        (
            "web",
            &format!("acme_http_listen = \"127.0.0.1:{http_port}\""),
        ),
        ("web", "acme_check_interval_s = 1"),
        ("web", "acme_renew_before_days = 30"),
    ]);
    // The same ports every time: only the window changes.
    let config = |renew_days: u32| {
        first.replace(
            "acme_renew_before_days = 30",
            &format!("acme_renew_before_days = {renew_days}"),
        )
    };
    let addr_of = |section: &str| -> String {
        first
            .split(&format!("[{section}]"))
            .nth(1)
            .and_then(|s| s.split("listen = \"").nth(1))
            .and_then(|s| s.split('"').next())
            .expect("listen address")
            .to_string()
    };
    let (web, signaling) = (addr_of("web"), addr_of("signaling"));
    let sup = Supervisor::start(Some(&first));
    let pebble_log = pebble.log.clone();
    let log = || {
        format!(
            "supervisor:\n{}\npebble:\n{}",
            sup.log(),
            std::fs::read_to_string(&pebble_log).unwrap_or_default()
        )
    };
    let web_pid = wait(
        "the web service",
        Duration::from_secs(60),
        || pid_of(&sup, "web"),
        &log,
    );
    let cert_file = sup.data_dir().join("tls/cert.pem");
    let on_disk = || first_pem(&std::fs::read_to_string(&cert_file).unwrap_or_default());

    // 1. Ordered at start (the self-signed certificate does not count), validated over HTTP-01.
    let root = pebble.issuing_root(dir.path());
    let issued = wait(
        "a certificate from pebble served by the setup page",
        Duration::from_secs(120),
        || verifies(&web, &root).then(on_disk),
        &log,
    );
    assert_eq!(
        served_leaf(&web),
        issued,
        "the setup page serves the issued certificate"
    );
    wait(
        "signaling serving the issued certificate",
        Duration::from_secs(60),
        || (verifies(&signaling, &root) && served_leaf(&signaling) == issued).then_some(()),
        &log,
    );
    assert_eq!(
        pid_of(&sup, "web"),
        Some(web_pid),
        "the setup page was restarted to pick up the certificate"
    );
    assert!(
        sup.data_dir().join("tls/acme-account.json").exists(),
        "account not persisted"
    );
    let admin = Admin::claim(
        &format!("https://{web}"),
        dir.path(),
        &sup.status().and_then(|s| s.setup_code).expect("setup code"),
    );
    let page = admin.call("GET", "/api/certificate", None);
    assert_eq!(page["acme"]["enabled"], true, "{page}");
    assert!(page["acme"]["last_success"].is_string(), "{page}");
    assert!(page["acme"]["last_error"].is_null(), "{page}");
    assert!(
        page["certificate"]["issuer"]
            .as_str()
            .unwrap_or("")
            .contains("Pebble"),
        "{page}"
    );

    // 2. Outside the renewal window (pebble's certificates last years): nothing is ordered.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(on_disk(), issued, "renewed outside the renewal window");

    // 3. A renewal window longer than the certificate's life: it is renewed. The window goes
    //    back to 30 days once the renewal is on disk (a fresh certificate would otherwise be
    //    inside the window again at once), then the setup page serves the renewed one without
    //    a restart (the window is a supervisor-only key).
    let set_window = |days: u32| {
        std::fs::write(sup.data_dir().join("talkbox.toml"), config(days)).expect("config");
        sup.signal(nix::sys::signal::Signal::SIGHUP);
    };
    set_window(3650);
    wait(
        "a renewal on disk",
        Duration::from_secs(120),
        || (on_disk() != issued).then_some(()),
        &log,
    );
    set_window(30);
    let renewed = wait(
        "the renewed certificate, stable and served by the setup page",
        Duration::from_secs(120),
        || {
            let now = on_disk();
            std::thread::sleep(Duration::from_secs(2));
            (now == on_disk() && served_leaf(&web) == now && verifies(&web, &root)).then_some(now)
        },
        &log,
    );
    assert_ne!(renewed, issued);
    assert_eq!(pid_of(&sup, "web"), Some(web_pid), "web restarted");
    wait(
        "signaling serving the renewed certificate",
        Duration::from_secs(60),
        || (served_leaf(&signaling) == renewed).then_some(()),
        &log,
    );

    // 4. The CA is gone when a renewal is due: the order fails, the page says why, the old
    //    certificate stays on disk and in service.
    pebble.stop();
    set_window(3650);
    let page = wait(
        "the failure on the page",
        Duration::from_secs(120),
        || {
            let p = admin.call("GET", "/api/certificate", None);
            p["acme"]["last_error"].is_string().then_some(p)
        },
        &log,
    );
    let error = page["acme"]["last_error"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        error.contains("failed") && error.contains("current certificate stays in use"),
        "unclear error: {error}"
    );
    assert_eq!(on_disk(), renewed, "the certificate on disk changed");
    assert_eq!(
        served_leaf(&web),
        renewed,
        "the setup page changed its certificate"
    );
    assert_eq!(
        served_leaf(&signaling),
        renewed,
        "signaling changed its certificate"
    );
    assert!(
        verifies(&web, &root),
        "the old certificate is no longer served"
    );
    eprintln!("ACME error shown on the page: {error}");
}
