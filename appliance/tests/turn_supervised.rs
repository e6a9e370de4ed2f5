//! `talkbox run` starts the TURN service as a supervised child: it reports ready, answers
//! STUN, and stops cleanly on SIGTERM.

mod common;

use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, free_relay_range, stun_msgs};

#[test]
fn supervisor_runs_turn_until_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, tls_port) = (free_port(), free_port());
    let (lo, hi) = free_relay_range(16);
    let config = dir.path().join("talkbox.toml");
    std::fs::write(
        &config,
        format!(
            "[signaling]\nenabled = false\n[sfu]\nenabled = false\n[web]\nenabled = false\n\
             [turn]\nport = {port}\ntls_port = {tls_port}\nrelay_port_min = {lo}\nrelay_port_max = {hi}\n"
        ),
    )
    .expect("config");
    let data = dir.path().join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_talkbox"))
        .args(["run", "--data-dir"])
        .arg(&data)
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start talkbox run");
    let deadline = Instant::now() + Duration::from_secs(30);
    let state = loop {
        let out = Command::new(env!("CARGO_BIN_EXE_talkbox"))
            .args(["status", "--json", "--data-dir"])
            .arg(&data)
            .output()
            .expect("talkbox status");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            let turn = v["services"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["name"] == "turn"))
                .cloned();
            if let Some(t) = turn.filter(|t| t["state"] == "running") {
                break t;
            }
        }
        assert!(
            Instant::now() < deadline,
            "turn never became running: {text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(state["pid"].as_u64().is_some(), "{state}");
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    sock.send_to(&stun_msgs::binding(), ("127.0.0.1", port))
        .expect("send");
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("Binding answered");
    let r = stun_msgs::parse_reply(&buf[..n]).expect("a STUN response");
    assert_eq!(r.mapped, Some(sock.local_addr().expect("addr")));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "supervisor exit: {status}");
            break;
        }
        assert!(Instant::now() < deadline, "supervisor did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
}
