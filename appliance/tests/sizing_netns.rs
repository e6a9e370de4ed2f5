//! NIC-aware sizing across two network namespaces joined by a veth pair whose box side is
//! shaped with `tc … tbf`: the box measures its uplink against a peer running
//! `talkbox sizing sink`, and when the shaping changes and a measurement is asked for, the
//! running box's limits follow within 10 s.
//!
//! Needs root (for `ip netns` and `tc`) and iproute2; traffic stays inside the namespaces the
//! test creates.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{Killed, Netns};
use serde_json::Value;

fn shape(ns: &Netns, dev: &str, verb: &str, mbit: u32) {
    let rate = format!("{mbit}mbit");
    ns.run(&[
        "tc", "qdisc", verb, "dev", dev, "root", "tbf", "rate", &rate, "burst", "256kb", "latency",
        "50ms",
    ]);
}

fn measured(state: &Value) -> Option<f64> {
    state["measured"]["mbps"].as_f64()
}

#[test]
fn a_shaped_uplink_is_measured_and_the_limits_follow_a_change_within_10_s() {
    let pid = std::process::id();
    let boxns = Netns::new(format!("tbsz-b{pid}"));
    let peerns = Netns::new(format!("tbsz-p{pid}"));
    let (vb, vp) = (format!("tbszb{pid}"), format!("tbszp{pid}"));
    let ok = Command::new("ip")
        .args(["link", "add", &vb, "type", "veth", "peer", "name", &vp])
        .status()
        .expect("ip");
    assert!(ok.success(), "creating the veth pair");
    for (dev, ns, addr) in [
        (&vb, &boxns, "10.231.0.1/24"),
        (&vp, &peerns, "10.231.0.2/24"),
    ] {
        let ok = Command::new("ip")
            .args(["link", "set", dev, "netns", &ns.0])
            .status()
            .expect("ip");
        assert!(ok.success());
        ns.run(&["ip", "addr", "add", addr, "dev", dev]);
        ns.run(&["ip", "link", "set", dev, "up"]);
    }
    shape(&boxns, &vb, "add", 100);

    // The peer: a sizing sink.
    let mut sink = Killed(
        peerns
            .cmd(common::talkbox())
            .args(["sizing", "sink", "--listen", "10.231.0.2:9446"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the sink"),
    );
    let mut line = String::new();
    BufReader::new(sink.0.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("sink output");
    assert!(line.contains("listening"), "sink said {line:?}");
    let peer = "http://10.231.0.2:9446";

    // 1. The CLI alone, no box running.
    let scratch = tempfile::tempdir().expect("tempdir");
    let out = boxns
        .cmd(common::talkbox())
        .args(["sizing", "--json", "--peer", peer, "--data-dir"])
        .arg(scratch.path())
        .output()
        .expect("talkbox sizing");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state: Value = serde_json::from_slice(&out.stdout).expect("json");
    let mbps = measured(&state).expect("a measurement");
    eprintln!("CLI measured {mbps:.1} Mbit/s through tbf 100mbit");
    assert!(
        (85.0..=115.0).contains(&mbps),
        "{mbps} Mbit/s for tbf 100mbit"
    );
    assert_eq!(
        state["capacity_mbps"].as_f64(),
        Some(mbps),
        "the lowest figure wins"
    );

    // 2. A running box measures at start and puts the limits in force.
    let config = common::isolated_config(&[
        ("sizing", &format!("peer = \"{peer}\"")),
        ("sizing", "egress_fraction = 0.8"),
    ]);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("talkbox.toml"), config).expect("config");
    let log = std::fs::File::create(dir.path().join("supervisor.log")).expect("log");
    let _box = Killed(
        boxns
            .cmd(common::talkbox())
            .args(["run", "--data-dir"])
            .arg(dir.path())
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("talkbox run"),
    );
    let state_file = dir.path().join("sizing/state.json");
    let read_state =
        || -> Option<Value> { serde_json::from_slice(&std::fs::read(&state_file).ok()?).ok() };
    let until = Instant::now() + Duration::from_secs(60);
    let first = loop {
        if let Some(s) = read_state()
            && measured(&s).is_some()
        {
            break s;
        }
        assert!(
            Instant::now() < until,
            "no measured state from the box within 60 s; log:\n{}",
            std::fs::read_to_string(dir.path().join("supervisor.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let mbps = measured(&first).expect("measured");
    eprintln!("box measured {mbps:.1} Mbit/s at start");
    assert!((85.0..=115.0).contains(&mbps), "{mbps}");
    let budget = first["budget_bps"].as_u64().expect("budget");
    assert_eq!(budget, (mbps * 1e6 * 0.8) as u64);
    assert!(
        first["table"]["video"].as_u64().expect("table") >= 8,
        "{first}"
    );

    // 3. The shaping halves; a measurement is asked for; the new limits are in force within
    // 10 s of the change.
    shape(&boxns, &vb, "change", 50);
    let changed = Instant::now();
    let out = boxns
        .cmd(common::talkbox())
        .args(["sizing", "--apply", "--json", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("talkbox sizing --apply");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let applied: Value = serde_json::from_slice(&out.stdout).expect("json");
    let in_force = read_state().expect("state");
    let took = changed.elapsed();
    let mbps = measured(&in_force).expect("measured");
    eprintln!("after tbf 50mbit: {mbps:.1} Mbit/s in force after {took:?}");
    assert!(
        took < Duration::from_secs(10),
        "limits followed only after {took:?}"
    );
    assert!(
        (42.5..=57.5).contains(&mbps),
        "{mbps} Mbit/s for tbf 50mbit"
    );
    assert_eq!(applied, in_force, "--apply prints the state in force");
    let budget = in_force["budget_bps"].as_u64().expect("budget");
    assert_eq!(budget, (mbps * 1e6 * 0.8) as u64);
}
