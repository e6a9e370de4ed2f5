//! The "UDP media port reachable" self-check in headless Chromium: the Self-checks page makes a
//! direct test call (no ICE servers) from the browser to the box's SFU, which answers it as a
//! short-lived publisher; the check passes only over UDP to a media port.
//!
//! Two boxes: one whose announced address reaches the SFU (the check passes and names the
//! port), and one that announces an address where nothing listens on the media port (the SFU
//! is bound to 127.0.0.2 but tells browsers 127.0.0.1, as a box behind a NAT without the port
//! forward looks from outside): the check fails with the remedy, and the box keeps running.
//! All traffic stays on loopback.

mod common;

use std::time::Duration;

use appliance::supervisor::status::ServiceState;
use common::browser::Browser;
use common::setup_page::{claim, goto_page};
use common::{Supervisor, isolated_config};
use serde_json::Value;

fn listen_of(config: &str, section: &str) -> String {
    config
        .split(&format!("[{section}]"))
        .nth(1)
        .and_then(|s| s.split("listen = \"").nth(1))
        .and_then(|s| s.split('"').next())
        .expect("listen address in the config")
        .to_string()
}

fn media_port(config: &str) -> u16 {
    config
        .split("media_port_min = ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("sfu.media_port_min in the config")
}

/// Starts a box with `extra`, claims it in Chromium, opens Self-checks and returns the UDP
/// check's result text and the whole table.
async fn run_check(extra: &[(&str, &str)]) -> (String, String, u16, Supervisor) {
    let config = isolated_config(extra);
    let web = listen_of(&config, "web");
    let port = media_port(&config);
    let sup = Supervisor::start(Some(&config));
    sup.wait_for("web and sfu running", Duration::from_secs(40), |s| {
        ["web", "sfu"].iter().all(|n| {
            s.services
                .iter()
                .any(|x| x.name == *n && x.state == ServiceState::Running)
        })
    });
    let code = sup
        .status()
        .and_then(|s| s.setup_code)
        .expect("setup code in `talkbox status`");
    let b = Browser::start(&["--ignore-certificate-errors", "--window-size=1280,900"]).await;
    claim(
        &b,
        &format!("https://{web}/"),
        &code,
        "correct horse battery",
    )
    .await;
    goto_page(&b, "#checks", "UDP media port reachable").await;
    let result = b
        .wait_until_set(
            "(() => { const c = document.getElementById('udp-check'); return c && c.textContent !== 'Testing…' ? c.textContent : null; })()",
            Duration::from_secs(60),
        )
        .await;
    let table = b
        .eval("return document.getElementById('checks').innerText;")
        .await;
    let table = table.as_str().unwrap_or("").to_string();
    let result = match result {
        Ok(Value::String(s)) => s,
        other => panic!("the UDP check gave no result: {other:?}\n{table}"),
    };
    let shot = b.client.screenshot().await.expect("screenshot");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/setup-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    let name = if result.starts_with("OK") {
        "17-udp-ok"
    } else {
        "18-udp-blocked"
    };
    std::fs::write(dir.join(format!("{name}.png")), shot).expect("write screenshot");
    b.close().await;
    (result, table, port, sup)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_udp_media_check_makes_a_real_test_call_and_fails_when_the_port_is_not_reached() {
    // The announced address reaches the SFU: the call connects over UDP to the media port.
    let (ok, table, port, sup) = run_check(&[("sfu", "enabled = true")]).await;
    println!("reachable box: {ok}");
    assert!(
        ok.starts_with("OK: this browser reached the SFU over UDP at 127.0.0.1:")
            && ok.contains(&format!(":{port} ")),
        "{ok}\n{table}"
    );
    drop(sup);

    // The SFU listens on 127.0.0.2 only, but browsers are told 127.0.0.1: nothing answers on
    // the announced media port, as with a NAT that does not forward it.
    let (bad, table, port, sup) = run_check(&[
        ("sfu", "enabled = true"),
        ("sfu", "media_bind = \"127.0.0.2\""),
    ])
    .await;
    println!("unreachable box: {bad}");
    assert!(
        bad.starts_with("No direct UDP path from this browser to the SFU")
            && bad.contains(&format!("127.0.0.1:{port}"))
            && bad.contains("Forward UDP"),
        "{bad}\n{table}"
    );
    assert!(table.contains("forward the media ports (UDP)"), "{table}");
    // The failed test call hurt nothing: the SFU and the page still run, never restarted.
    let st = sup.status().expect("status");
    for name in ["sfu", "web"] {
        let s = st
            .services
            .iter()
            .find(|s| s.name == name)
            .expect("service listed");
        assert!(s.state == ServiceState::Running && s.restarts == 0, "{s:?}");
    }
}
