//! The systemd side of the supervisor: the unit file in the repo passes `systemd-analyze`
//! (syntax and sandboxing score), and the supervisor speaks the sd_notify protocol (READY,
//! STATUS, WATCHDOG, STOPPING) to the socket systemd names in NOTIFY_SOCKET.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{isolated_config, talkbox};

const UNIT: &str = include_str!("../systemd/talkbox.service");

fn systemd_analyze() -> &'static str {
    let p = "/usr/bin/systemd-analyze";
    assert!(
        std::path::Path::new(p).exists(),
        "systemd-analyze is needed (apt-get install systemd)"
    );
    p
}

/// The unit with ExecStart pointing at the binary under test (verify checks that it exists).
fn unit_for_test(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("talkbox.service");
    std::fs::write(&path, UNIT.replace("/usr/bin/talkbox", talkbox())).expect("write unit");
    path
}

#[test]
fn unit_file_passes_systemd_analyze_verify() {
    let d = tempfile::tempdir().expect("tempdir");
    let unit = unit_for_test(d.path());
    let out = Command::new(systemd_analyze())
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        !err.contains("talkbox.service:"),
        "warnings about our unit: {err}"
    );
    assert!(UNIT.contains("Type=notify") && UNIT.contains("WatchdogSec="));
}

#[test]
fn unit_file_sandboxing_scores_ok_or_better() {
    let d = tempfile::tempdir().expect("tempdir");
    let unit = unit_for_test(d.path());
    let out = Command::new(systemd_analyze())
        .args(["security", "--offline=true"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for talkbox.service: ")
                .nth(1)
        })
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    // systemd calls 0-3.9 "OK"; the supervisor must keep setuid for the privilege drop, so a
    // perfect score is impossible, but anything that weakens the sandbox shows up here.
    assert!(score <= 3.0, "exposure {score} is worse than 3.0:\n{text}");
}

#[test]
fn supervisor_reports_ready_status_watchdog_and_stopping_to_systemd() {
    let d = tempfile::tempdir().expect("tempdir");
    let sock_path = d.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    std::fs::write(d.path().join("talkbox.toml"), isolated_config(&[])).expect("config");
    // systemd names the main PID in WATCHDOG_PID; `exec` keeps the shell's PID for talkbox.
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" run --data-dir \"$1\"")
        .arg(talkbox())
        .arg(d.path())
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run");
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    let mut stopped = false;
    while start.elapsed() < Duration::from_secs(20) {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
        let ready = seen.contains("READY=1");
        let pings = seen.matches("WATCHDOG=1").count();
        if ready && pings >= 2 && !stopped {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .expect("SIGTERM");
            stopped = true;
        }
        if stopped && seen.contains("STOPPING=1") {
            break;
        }
    }
    if !stopped {
        let _ = child.kill();
    }
    let status = child.wait().expect("wait");
    assert!(status.success());
    assert!(seen.contains("READY=1"), "{seen}");
    assert!(
        seen.contains("STATUS=") && seen.contains("web running"),
        "{seen}"
    );
    assert!(seen.matches("WATCHDOG=1").count() >= 2, "{seen}");
    assert!(seen.contains("STOPPING=1"), "{seen}");
    // READY comes only after every service said it is ready.
    let ready_at = seen.find("READY=1").expect("ready");
    let web_running = seen.find("web running").expect("status");
    assert!(web_running <= ready_at + 200, "{seen}");
}
