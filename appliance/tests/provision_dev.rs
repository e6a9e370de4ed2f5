//! Provisioning from a bundle file dropped into the data directory (dev mode): a bundle made
//! with `talkbox-provision` is applied at start and the running services use it; bad bundles
//! are refused with a clear message and change nothing.

mod common;
mod provision_common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::*;
use provision_common::*;

const AUDIT_WAIT: Duration = Duration::from_secs(120);

#[test]
fn bundle_made_with_the_cli_is_applied_at_start_and_the_services_use_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (key, public) = keygen(tmp.path(), "engineer");
    let fingerprint = ok(&run_cli(&["fingerprint", public.to_str().expect("utf8")]));
    let keys = trusted_dir(tmp.path(), &[&public]);
    let keys_line = format!("engineer_keys_dir = \"{}\"", keys.display());
    let initial = isolated_config(&[("provision", &keys_line)]);
    let backend = reachable_backend();
    let site = format!(
        "{}\n[[signaling.backend]]\nid = \"nc1\"\nurls = [\"{backend}\"]\nsecret_file = \"${{DATA_DIR}}/secrets/nc1\"\n",
        isolated_config(&[
            ("provision", &keys_line),
            ("supervisor", "names = [\"box.example.test\"]"),
        ])
    );
    let secret = tmp.path().join("nc1-secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").expect("secret");
    let bundle = make_bundle(
        tmp.path(),
        "site",
        &key,
        &site,
        &[
            "--serial",
            "1",
            "--target",
            "any",
            "--valid-for",
            "1h",
            "--secret",
            &format!("nc1={}", secret.display()),
            "--comment",
            "site A",
        ],
    );
    let shown = ok(&run_cli(&[
        "bundle",
        "inspect",
        bundle.to_str().expect("utf8"),
    ]));
    assert!(
        shown.contains("signature valid") && shown.contains("serial:     1"),
        "{shown}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("talkbox.toml"), &initial).expect("config");
    std::fs::create_dir_all(dir.path().join("provisioning/incoming")).expect("incoming");
    std::fs::copy(
        &bundle,
        dir.path().join("provisioning/incoming/site.bundle"),
    )
    .expect("drop");
    let sup = Supervisor::start_in(dir);
    let data = sup.data_dir().to_path_buf();

    let entries = wait_audit(&data, 0, AUDIT_WAIT, || sup.log());
    let e = &entries[0];
    assert_eq!(e.result, "applied", "{e:?}\n{}", sup.log());
    assert_eq!(e.source, appliance::provision::Source::DevDir);
    assert_eq!(e.serial, 1);
    assert_eq!(e.key, fingerprint.trim());
    sup.wait_ready();

    // The services run on the bundle's config: signaling on its port, with a certificate made
    // for its name, and the backend secret installed where the config says.
    let (code, body) = welcome("box.example.test", listen_port(&site, "signaling"), &data);
    assert_eq!(code, 200, "{body}\n{}", sup.log());
    let (old, _) = welcome("localhost", listen_port(&initial, "signaling"), &data);
    assert_eq!(old, 0, "the old signaling port no longer serves");
    let installed = std::fs::read_to_string(data.join("talkbox.toml")).expect("config");
    assert!(
        installed.contains(&format!("{}/secrets/nc1", data.display())),
        "{installed}"
    );
    assert_eq!(
        std::fs::read(data.join("secrets/nc1")).expect("secret"),
        std::fs::read(&secret).expect("secret")
    );
    assert!(
        !data.join("provisioning/incoming/site.bundle").exists(),
        "taken"
    );
    assert!(!data.join("provisioning/trial").exists(), "committed");

    // The admin's one-time login for the setup page.
    let link: serde_json::Value = serde_json::from_slice(
        &std::fs::read(data.join("web/login-link.json")).expect("login link"),
    )
    .expect("json");
    assert_eq!(
        link["token_sha256"].as_str().map(str::len),
        Some(64),
        "{link}"
    );
    assert!(link["expires"].as_str().is_some_and(|t| t.ends_with('Z')));
    let log = sup.log();
    let url = log
        .split_whitespace()
        .find(|w| w.contains("/login/once?token="))
        .unwrap_or_else(|| panic!("no login link in the journal:\n{log}"));
    assert!(url.starts_with("https://box.example.test:"), "{url}");
}

/// Drops `bytes` as a bundle and returns the audit entry it produced.
fn drop_bundle(sup: &Supervisor, name: &str, bytes: &[u8]) -> appliance::provision::AuditEntry {
    let data = sup.data_dir();
    let seen = appliance::provision::read_audit(&appliance::config::DataDir::new(data)).len();
    let tmp = data.join(format!("provisioning/.{name}.tmp"));
    std::fs::write(&tmp, bytes).expect("write");
    std::fs::rename(
        &tmp,
        data.join(format!("provisioning/incoming/{name}.bundle")),
    )
    .expect("drop");
    let new = wait_audit(data, seen, AUDIT_WAIT, || sup.log());
    assert_eq!(new.len(), 1, "{new:?}");
    new[0].clone()
}

#[test]
fn bad_bundles_are_refused_with_clear_messages_and_change_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (key, public) = keygen(tmp.path(), "engineer");
    let (stranger, _) = keygen(tmp.path(), "stranger");
    let keys = trusted_dir(tmp.path(), &[&public]);
    let keys_line = format!("engineer_keys_dir = \"{}\"", keys.display());
    let config = isolated_config(&[("provision", &keys_line)]);
    let sup = Supervisor::start(Some(&config));
    sup.wait_ready();
    let data = sup.data_dir().to_path_buf();
    let box_id = ok(&run_talkbox_enrol(&data));

    let args =
        |serial: &'static str| vec!["--serial", serial, "--target", "any", "--valid-for", "1h"];
    let good =
        std::fs::read(make_bundle(tmp.path(), "good", &key, &config, &args("5"))).expect("read");
    let envelope: serde_json::Value = serde_json::from_slice(&good).expect("json");

    let mut unsigned = envelope.clone();
    unsigned
        .as_object_mut()
        .expect("object")
        .remove("signature");
    let mut tampered = envelope.clone();
    let mut payload: serde_json::Value = serde_json::from_slice(
        &STANDARD
            .decode(envelope["payload"].as_str().expect("payload"))
            .expect("base64"),
    )
    .expect("payload json");
    payload["config"] = format!("{config}\n# changed after signing\n").into();
    tampered["payload"] = STANDARD
        .encode(serde_json::to_vec(&payload).expect("json"))
        .into();
    let untrusted = std::fs::read(make_bundle(
        tmp.path(),
        "stranger",
        &stranger,
        &config,
        &args("6"),
    ))
    .expect("read");
    let expired = std::fs::read(make_bundle(
        tmp.path(),
        "expired",
        &key,
        &config,
        &["--serial", "7", "--target", "any", "--valid-for", "1s"],
    ))
    .expect("read");
    let other_box = std::fs::read(make_bundle(
        tmp.path(),
        "other",
        &key,
        &config,
        &[
            "--serial",
            "8",
            "--target",
            "tb-ffffffffffffffffffff",
            "--valid-for",
            "1h",
        ],
    ))
    .expect("read");
    let invalid_config = std::fs::read(make_bundle(
        tmp.path(),
        "invalid",
        &key,
        &format!("{config}\n[sfu]\nworkers = -3\n"),
        &args("9"),
    ))
    .expect("read");
    std::thread::sleep(Duration::from_millis(1100)); // let "expired" expire

    let before = std::fs::read(data.join("talkbox.toml")).expect("config");
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        (
            "unsigned",
            serde_json::to_vec(&unsigned).expect("json"),
            "unsigned bundle".into(),
        ),
        ("untrusted", untrusted, "signed by an untrusted key".into()),
        (
            "tampered",
            serde_json::to_vec(&tampered).expect("json"),
            "changed after it was signed".into(),
        ),
        ("expired", expired, "expired bundle".into()),
        (
            "other-box",
            other_box,
            format!(
                "addressed to box tb-ffffffffffffffffffff, but this is box {}",
                box_id.trim()
            ),
        ),
        (
            "malformed",
            b"{\"hello\": 1}".to_vec(),
            "malformed bundle".into(),
        ),
        ("invalid-config", invalid_config, "config is invalid".into()),
    ];
    for (name, bytes, want) in cases {
        let e = drop_bundle(&sup, name, &bytes);
        assert_eq!(e.result, "refused", "{name}: {e:?}");
        assert!(
            e.message.contains(&want),
            "{name}: {:?} lacks {want:?}",
            e.message
        );
        assert!(
            e.message.contains("nothing changed"),
            "{name}: {}",
            e.message
        );
        assert_eq!(
            std::fs::read(data.join("talkbox.toml")).expect("config"),
            before,
            "{name} changed the config"
        );
        assert!(!data.join("provisioning/trial").exists(), "{name}");
        assert!(
            !data.join("provisioning/state.json").exists(),
            "{name} spent a serial"
        );
    }

    // A good bundle is applied; sending it again, or an older one, is a replay.
    let e = drop_bundle(&sup, "good", &good);
    assert_eq!(e.result, "applied", "{e:?}\n{}", sup.log());
    let older =
        std::fs::read(make_bundle(tmp.path(), "older", &key, &config, &args("4"))).expect("read");
    for (name, bytes) in [("again", good), ("older", older)] {
        let e = drop_bundle(&sup, name, &bytes);
        assert_eq!(e.result, "refused", "{name}: {e:?}");
        assert!(
            e.message.contains("replayed bundle"),
            "{name}: {}",
            e.message
        );
    }
    sup.wait_ready();
}

/// `talkbox enrol-token` against a data directory; returns the box id line's value.
fn run_talkbox_enrol(data: &std::path::Path) -> std::process::Output {
    let out = std::process::Command::new(talkbox())
        .args(["enrol-token", "--data-dir"])
        .arg(data)
        .output()
        .expect("enrol-token");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("box id:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    std::process::Output {
        status: out.status,
        stdout: id.into_bytes(),
        stderr: out.stderr,
    }
}
