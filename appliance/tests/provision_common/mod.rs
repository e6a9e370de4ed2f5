//! Shared helpers of the provisioning tests: the engineer's CLI (`talkbox-provision`, built on
//! demand next to `talkbox`), keys and bundles made with it, a minimal HTTP server standing in
//! for a reachable Nextcloud, and waiting for audit log lines.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use appliance::config::DataDir;
use appliance::provision::{AuditEntry, read_audit};

/// The engineer's CLI.
pub fn cli() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_talkbox-provision"))
}

pub fn run_cli(args: &[&str]) -> Output {
    Command::new(cli())
        .args(args)
        .env_remove("TALKBOX_ENROLMENT_TOKEN")
        .output()
        .expect("run talkbox-provision")
}

pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "talkbox-provision failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Makes an engineer key in `dir` and returns (secret key path, public key path).
pub fn keygen(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let k = dir.join(name);
    ok(&run_cli(&["keygen", "--out", k.to_str().expect("utf8")]));
    (k.clone(), PathBuf::from(format!("{}.pub", k.display())))
}

/// A directory of trusted engineer keys (as baked into an image) holding `pubs`.
pub fn trusted_dir(parent: &Path, pubs: &[&Path]) -> PathBuf {
    let d = parent.join("engineer-keys");
    std::fs::create_dir_all(&d).expect("keys dir");
    for (i, p) in pubs.iter().enumerate() {
        std::fs::copy(p, d.join(format!("k{i}.pub"))).expect("copy key");
    }
    d
}

/// `bundle create` with the given config text and extra arguments; returns the bundle path.
pub fn make_bundle(dir: &Path, name: &str, key: &Path, config: &str, extra: &[&str]) -> PathBuf {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, config).expect("write bundle config");
    let out = dir.join(format!("{name}.bundle"));
    let mut args = vec![
        "bundle",
        "create",
        "--key",
        key.to_str().expect("utf8"),
        "--config",
        cfg.to_str().expect("utf8"),
        "--out",
        out.to_str().expect("utf8"),
    ];
    args.extend_from_slice(extra);
    ok(&run_cli(&args));
    out
}

/// An HTTP server on loopback answering every request with 200 (a reachable "Nextcloud");
/// returns its base URL. The thread ends with the test process.
pub fn reachable_backend() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in l.incoming().take(10_000) {
            let Ok(mut c) = conn else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ = c.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
            );
        }
    });
    format!("http://127.0.0.1:{port}")
}

/// A loopback URL where nothing listens.
pub fn unreachable_backend() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

/// Waits until the audit log has more than `seen` lines; returns the new ones.
pub fn wait_audit(
    data: &Path,
    seen: usize,
    timeout: Duration,
    log: impl Fn() -> String,
) -> Vec<AuditEntry> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        let a = read_audit(&DataDir::new(data));
        if a.len() > seen {
            return a[seen..].to_vec();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "no new audit line after {timeout:?}; audit: {:?}\nlog:\n{}",
        read_audit(&DataDir::new(data)),
        log()
    );
}

/// `GET https://NAME:PORT/api/v1/welcome` with NAME resolved to 127.0.0.1, trusting only the
/// box's certificate: proves the port serves and the certificate is valid for NAME.
pub fn welcome(name: &str, port: u16, data: &Path) -> (u32, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code}",
            "--resolve",
        ])
        .arg(format!("{name}:{port}:127.0.0.1"))
        .arg("--cacert")
        .arg(data.join("tls/cert.pem"))
        .arg(format!("https://{name}:{port}/api/v1/welcome"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        format!("{body}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

/// Waits until `f` holds, polling.
pub fn eventually(what: &str, timeout: Duration, f: impl Fn() -> bool) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// The port of `listen = "127.0.0.1:PORT"` in a section of a config text.
pub fn listen_port(config: &str, section: &str) -> u16 {
    let mut in_section = false;
    for l in config.lines() {
        if l.starts_with('[') {
            in_section = l.trim() == format!("[{section}]");
        } else if in_section && l.starts_with("listen") {
            let v = l.split('"').nth(1).expect("quoted");
            return v.rsplit(':').next().expect("port").parse().expect("num");
        }
    }
    panic!("no [{section}] listen in {config}");
}
