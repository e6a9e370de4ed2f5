//! coturn's own clients (Debian package `coturn`) against `talkbox turn` on loopback.
//!
//! turnutils_stunclient gets the reflexive address; turnutils_uclient with the REST secret
//! (`-W`) runs 20 clients × 500 messages through turnutils_peer over UDP and TCP, with and
//! without channels, and every message must come back.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{TurnProcess, free_port, require_program};

const UCLIENT: &str = "/usr/bin/turnutils_uclient";
const PEER: &str = "/usr/bin/turnutils_peer";
const STUNCLIENT: &str = "/usr/bin/turnutils_stunclient";

struct Peer(Child, u16);

impl Peer {
    fn start() -> Peer {
        require_program(PEER, "coturn");
        let port = free_port();
        let child = Command::new(PEER)
            .args(["-L", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start turnutils_peer");
        std::thread::sleep(Duration::from_millis(300));
        Peer(child, port)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The load runs share two cores with other builds: one at a time, so losses mean bugs.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn server() -> TurnProcess {
    TurnProcess::start("allowed_peers = [\"127.0.0.0/8\", \"::1/128\"]")
}

/// Runs turnutils_uclient; returns (sent, received, lost, output).
fn uclient(turn: &TurnProcess, peer: &Peer, extra: &[&str]) -> (u64, u64, String) {
    require_program(UCLIENT, "coturn");
    let mut args: Vec<String> = vec![
        "-W".into(),
        turn.secret.clone(),
        "-e".into(),
        "127.0.0.1".into(),
    ];
    args.extend([
        "-r".into(),
        peer.1.to_string(),
        "-n".into(),
        "500".into(),
        "-m".into(),
        "20".into(),
    ]);
    args.extend([
        "-l".into(),
        "120".into(),
        "-p".into(),
        turn.port.to_string(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("127.0.0.1".into());
    let out = Command::new("timeout")
        .arg("120")
        .arg(UCLIENT)
        .args(&args)
        .output()
        .expect("run turnutils_uclient");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "turnutils_uclient {extra:?} failed ({}):\n{text}\nserver log:\n{}",
        out.status,
        tail(&turn.log())
    );
    let total = text
        .lines()
        .rev()
        .find(|l| l.contains("tot_send_msgs=") && !l.contains("msz="))
        .unwrap_or_else(|| panic!("no totals in uclient output:\n{text}"));
    let num = |key: &str| -> u64 {
        total
            .split(key)
            .nth(1)
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {total}"))
    };
    (num("tot_send_msgs="), num("tot_recv_msgs="), text)
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn assert_all_echoed(label: &str, (sent, received, text): (u64, u64, String)) {
    assert_eq!(
        sent,
        20 * 500,
        "{label}: uclient did not send every message:\n{text}"
    );
    assert_eq!(
        received, sent,
        "{label}: not every message came back:\n{text}"
    );
    assert!(
        text.contains("Total lost packets 0 (0.000000%), total send dropped 0 (0.000000%)"),
        "{label}: losses reported:\n{text}"
    );
}

#[test]
fn stunclient_gets_the_reflexive_address() {
    require_program(STUNCLIENT, "coturn");
    let _one = serial();
    let turn = server();
    let out = Command::new("timeout")
        .args(["10", STUNCLIENT, "-p", &turn.port.to_string(), "127.0.0.1"])
        .output()
        .expect("run turnutils_stunclient");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stunclient failed: {text}");
    assert!(
        text.contains("UDP reflexive addr: 127.0.0.1:"),
        "no reflexive address in:\n{text}"
    );
}

#[test]
fn uclient_over_udp_with_channels_gets_every_message_echoed() {
    let _one = serial();
    let turn = server();
    let peer = Peer::start();
    assert_all_echoed("udp+channels", uclient(&turn, &peer, &[]));
    let m = turn.metrics();
    assert!(
        m.contains("talkbox_turn_relayed_packets_total{direction=\"to_peer\"}"),
        "{m}"
    );
}

#[test]
fn uclient_over_udp_without_channels_gets_every_message_echoed() {
    let _one = serial();
    let turn = server();
    let peer = Peer::start();
    assert_all_echoed("udp+send-indications", uclient(&turn, &peer, &["-c"]));
}

#[test]
fn uclient_over_tcp_with_channels_gets_every_message_echoed() {
    let _one = serial();
    let turn = server();
    let peer = Peer::start();
    assert_all_echoed("tcp+channels", uclient(&turn, &peer, &["-t"]));
}

#[test]
fn uclient_over_tcp_without_channels_gets_every_message_echoed() {
    let _one = serial();
    let turn = server();
    let peer = Peer::start();
    assert_all_echoed("tcp+send-indications", uclient(&turn, &peer, &["-t", "-c"]));
}

#[test]
fn uclient_over_tls_gets_every_message_echoed() {
    let _one = serial();
    let turn = server();
    let peer = Peer::start();
    // -S: TLS; the port is the TLS port.
    let tls_port = turn.tls_port.to_string();
    let mut r = uclient(&turn, &peer, &["-t", "-S", "-p", &tls_port]);
    // uclient prints its totals the same way over TLS.
    r.2.push('\n');
    assert_all_echoed("tls+channels", r);
}
