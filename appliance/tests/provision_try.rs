//! Try mode: a bundle whose self-checks fail (Nextcloud backend unreachable, certificate not
//! valid for the box's name) is rolled back by itself, and the old config serves again.

mod common;
mod provision_common;

use std::time::Duration;

use common::*;
use provision_common::*;

const AUDIT_WAIT: Duration = Duration::from_secs(150);

fn drop_and_wait(
    sup: &Supervisor,
    name: &str,
    bundle: &std::path::Path,
) -> Vec<appliance::provision::AuditEntry> {
    let data = sup.data_dir();
    let seen = appliance::provision::read_audit(&appliance::config::DataDir::new(data)).len();
    std::fs::copy(bundle, data.join(format!("provisioning/.{name}"))).expect("copy");
    std::fs::rename(
        data.join(format!("provisioning/.{name}")),
        data.join(format!("provisioning/incoming/{name}.bundle")),
    )
    .expect("drop");
    wait_audit(data, seen, AUDIT_WAIT, || sup.log())
}

#[test]
fn bundles_failing_their_self_checks_are_rolled_back_and_the_old_config_serves_again() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (key, public) = keygen(tmp.path(), "engineer");
    let keys = trusted_dir(tmp.path(), &[&public]);
    let keys_line = format!("engineer_keys_dir = \"{}\"", keys.display());
    let initial = isolated_config(&[
        ("provision", &keys_line),
        ("supervisor", "names = [\"old.example.test\"]"),
    ]);
    let sup = Supervisor::start(Some(&initial));
    sup.wait_ready();
    let data = sup.data_dir().to_path_buf();
    let old_port = listen_port(&initial, "signaling");
    assert_eq!(welcome("old.example.test", old_port, &data).0, 200);
    let old_cert = std::fs::read(data.join("tls/cert.pem")).expect("cert");

    // 1. The Nextcloud backend does not answer.
    let unreachable = format!(
        "{}\n[[signaling.backend]]\nid = \"nc1\"\nurls = [\"{}\"]\nsecret = \"0123456789abcdef0123\"\n",
        isolated_config(&[("provision", &keys_line)]),
        unreachable_backend()
    );
    let b = make_bundle(
        tmp.path(),
        "unreachable",
        &key,
        &unreachable,
        &["--serial", "1", "--target", "any", "--valid-for", "1h"],
    );
    let new = drop_and_wait(&sup, "unreachable", &b);
    let e = new.last().expect("entry");
    assert_eq!(e.result, "rolled-back", "{new:?}\n{}", sup.log());
    assert!(
        e.message.contains("Nextcloud backend nc1") && e.message.contains("unreachable"),
        "{}",
        e.message
    );
    assert!(
        e.message.contains("previous config is back"),
        "{}",
        e.message
    );
    assert_eq!(
        std::fs::read_to_string(data.join("talkbox.toml")).expect("config"),
        initial
    );
    sup.wait_ready();
    eventually(
        "the old config serving again",
        Duration::from_secs(60),
        || welcome("old.example.test", old_port, &data).0 == 200,
    );
    assert_eq!(
        welcome("localhost", listen_port(&unreachable, "signaling"), &data).0,
        0,
        "the tried port is closed again"
    );

    // 2. A certificate that is not valid for the box's name.
    let other =
        rcgen::generate_simple_self_signed(vec!["other.example.test".to_string()]).expect("cert");
    let (cert, cert_key) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    std::fs::write(&cert, other.cert.pem()).expect("cert");
    std::fs::write(&cert_key, other.signing_key.serialize_pem()).expect("key");
    let wrong_name = isolated_config(&[
        ("provision", &keys_line),
        ("supervisor", "names = [\"talk.example.test\"]"),
    ]);
    let b = make_bundle(
        tmp.path(),
        "wrong-name",
        &key,
        &wrong_name,
        &[
            "--serial",
            "2",
            "--target",
            "any",
            "--valid-for",
            "1h",
            "--tls-cert",
            cert.to_str().expect("utf8"),
            "--tls-key",
            cert_key.to_str().expect("utf8"),
        ],
    );
    let new = drop_and_wait(&sup, "wrong-name", &b);
    let e = new.last().expect("entry");
    assert_eq!(e.result, "rolled-back", "{new:?}\n{}", sup.log());
    assert!(
        e.message.contains("not valid for talk.example.test"),
        "{}",
        e.message
    );
    assert_eq!(
        std::fs::read(data.join("tls/cert.pem")).expect("cert"),
        old_cert,
        "the old certificate is back"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("talkbox.toml")).expect("config"),
        initial
    );
    sup.wait_ready();
    eventually(
        "the old config serving again",
        Duration::from_secs(60),
        || welcome("old.example.test", old_port, &data).0 == 200,
    );
    assert!(!data.join("provisioning/trial").exists());
}

/// A loopback "Nextcloud" that accepts connections and never answers (its check takes the
/// full timeout); returns its base URL.
fn silent_backend() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in l.incoming().take(1000).flatten() {
            held.push(c);
        }
    });
    format!("http://127.0.0.1:{port}")
}

#[test]
fn a_trial_cut_short_by_a_crash_is_rolled_back_at_the_next_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (key, public) = keygen(tmp.path(), "engineer");
    let keys = trusted_dir(tmp.path(), &[&public]);
    let keys_line = format!("engineer_keys_dir = \"{}\"", keys.display());
    let initial = isolated_config(&[("provision", &keys_line)]);
    let mut sup = Supervisor::start(Some(&initial));
    sup.wait_ready();
    let data = sup.data_dir().to_path_buf();
    let site = format!(
        "{}\n[[signaling.backend]]\nid = \"nc1\"\nurls = [\"{}\"]\nsecret = \"0123456789abcdef0123\"\n",
        isolated_config(&[("provision", &keys_line)]),
        silent_backend()
    );
    let b = make_bundle(
        tmp.path(),
        "slow",
        &key,
        &site,
        &["--serial", "1", "--target", "any", "--valid-for", "1h"],
    );
    std::fs::copy(&b, data.join("provisioning/incoming/slow.bundle")).expect("drop");
    // The trial's manifest is written before the new files (so that a crash in between can be
    // undone); wait until both are there.
    let wanted = site.replace("${DATA_DIR}", &data.display().to_string());
    eventually("the trial to start", Duration::from_secs(60), || {
        data.join("provisioning/trial/manifest.json").exists()
            && std::fs::read_to_string(data.join("talkbox.toml")).is_ok_and(|c| c == wanted)
    });
    // Power cut: the supervisor and its children die at once.
    sup.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(sup.wait_exit(Duration::from_secs(10)).is_some());
    std::thread::sleep(Duration::from_millis(500));

    let log = data.join("second.log");
    let mut again = std::process::Command::new(talkbox())
        .args(["run", "--data-dir"])
        .arg(&data)
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("restart");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let new = wait_audit(&data, 0, AUDIT_WAIT, read_log);
    let _ = again.kill();
    let _ = again.wait();
    let e = new.last().expect("entry");
    assert_eq!(e.result, "rolled-back", "{new:?}\n{}", read_log());
    assert!(e.message.contains("restarted"), "{}", e.message);
    assert_eq!(
        std::fs::read_to_string(data.join("talkbox.toml")).expect("config"),
        initial
    );
    assert!(!data.join("provisioning/trial").exists());
}
