//! Remote push over mutual TLS with a one-time enrolment token: applied and reported back to
//! the engineer; the token does not work twice; an untrusted client key is refused; wrong
//! tokens are refused and then throttled.

mod common;
mod provision_common;

use std::path::Path;
use std::process::Output;

use common::*;
use provision_common::*;

/// `talkbox enrol-token`: returns (token, pin).
fn enrol(data: &Path) -> (String, String) {
    let out = std::process::Command::new(talkbox())
        .args(["enrol-token", "--valid-for", "1h", "--data-dir"])
        .arg(data)
        .output()
        .expect("enrol-token");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    (field("enrolment token:"), field("pin:"))
}

struct Push<'a> {
    address: String,
    key: &'a Path,
    known: &'a Path,
}

impl Push<'_> {
    fn run(
        &self,
        bundle: &Path,
        token: &str,
        pin: Option<&str>,
    ) -> (Option<i32>, serde_json::Value, String) {
        let mut args = vec![
            "push".to_string(),
            "--box".into(),
            self.address.clone(),
            "--bundle".into(),
            bundle.display().to_string(),
            "--key".into(),
            self.key.display().to_string(),
            "--token".into(),
            token.into(),
            "--known-boxes".into(),
            self.known.display().to_string(),
            "--timeout".into(),
            "240s".into(),
        ];
        if let Some(p) = pin {
            args.extend(["--pin".to_string(), p.to_string()]);
        }
        let out: Output = std::process::Command::new(cli())
            .args(&args)
            .output()
            .expect("push");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let json = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
        (out.status.code(), json, format!("{stdout}\n{stderr}"))
    }
}

#[test]
fn push_over_mtls_applies_once_per_token_and_wrong_tokens_are_throttled() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (key, public) = keygen(tmp.path(), "engineer");
    let (stranger, _) = keygen(tmp.path(), "stranger");
    let keys = trusted_dir(tmp.path(), &[&public]);
    let keys_line = format!("engineer_keys_dir = \"{}\"", keys.display());
    let initial = isolated_config(&[("provision", &keys_line)]);
    let provision_port = listen_port(&initial, "provision");
    let sup = Supervisor::start(Some(&initial));
    sup.wait_ready();
    let data = sup.data_dir().to_path_buf();
    let (token, pin) = enrol(&data);
    let known = tmp.path().join("known-boxes");

    // The site config keeps the provisioning API where it is (the push waits on it).
    let site = isolated_config(&[
        ("provision", &keys_line),
        (
            "provision",
            &format!("listen = \"127.0.0.1:{provision_port}\""),
        ),
        ("supervisor", "names = [\"site.example.test\"]"),
    ]);
    let args =
        |serial: &'static str| vec!["--serial", serial, "--target", "any", "--valid-for", "1h"];
    let b1 = make_bundle(tmp.path(), "site1", &key, &site, &args("1"));
    let b2 = make_bundle(tmp.path(), "site2", &key, &site, &args("2"));

    let engineer = Push {
        address: format!("127.0.0.1:{provision_port}"),
        key: &key,
        known: &known,
    };
    // A key the box does not trust is refused, and does not spend the token.
    let intruder = Push {
        address: engineer.address.clone(),
        key: &stranger,
        known: &known,
    };
    let (code, answer, text) = intruder.run(&b1, &token, Some(&pin));
    assert_eq!(code, Some(3), "{text}");
    assert_eq!(answer["reason"], "client", "{text}");
    assert!(text.contains("not a trusted engineer key"), "{text}");

    // The engineer's push with the token is applied and reported back with the login link.
    let (code, answer, text) = engineer.run(&b1, &token, Some(&pin));
    assert_eq!(code, Some(0), "{text}\n{}", sup.log());
    assert_eq!(answer["result"], "applied", "{text}");
    assert_eq!(answer["serial"], 1);
    assert!(
        answer["login_link"].as_str().is_some_and(
            |l| l.starts_with("https://site.example.test:") && l.contains("/login/once?token=")
        ),
        "{text}"
    );
    assert!(
        std::fs::read_to_string(&known)
            .expect("known")
            .contains(&pin)
    );
    sup.wait_ready();
    assert_eq!(
        welcome("site.example.test", listen_port(&site, "signaling"), &data).0,
        200
    );
    let audit = appliance::provision::read_audit(&appliance::config::DataDir::new(&data));
    let last = audit.last().expect("audit");
    assert_eq!(
        (last.source, last.result.as_str(), last.serial),
        (appliance::provision::Source::Push, "applied", 1)
    );

    // The token does not work twice (the remembered pin is used now).
    let (code, answer, text) = engineer.run(&b2, &token, None);
    assert_eq!(code, Some(3), "{text}");
    assert_eq!(answer["reason"], "token", "{text}");
    assert!(text.contains("no enrolment token is open"), "{text}");

    // A wrong token is refused; after ten failures a minute (the spent token above was the
    // first), even the right one is throttled for a while.
    let (fresh, _) = enrol(&data);
    for i in 0..9 {
        let (code, answer, text) = engineer.run(&b2, &format!("wrong-{i}"), None);
        assert_eq!(code, Some(3), "{text}");
        assert_eq!(
            answer["message"], "wrong enrolment token; nothing changed",
            "{text}"
        );
    }
    let (code, answer, text) = engineer.run(&b2, &fresh, None);
    assert_eq!(code, Some(3), "{text}");
    assert_eq!(answer["reason"], "throttled", "{text}");
    assert!(text.contains("too many wrong enrolment tokens"), "{text}");
    assert_eq!(
        std::fs::read_to_string(data.join("talkbox.toml")).expect("config"),
        site,
        "nothing changed after the first push"
    );

    // A box presenting another certificate than the pinned one is refused by the CLI.
    let (code, _, text) = engineer.run(&b2, &fresh, Some(&format!("sha256:{}", "0".repeat(64))));
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("contradicts"), "{text}");
}
