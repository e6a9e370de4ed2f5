//! `talkbox-provision` refuses every bad input with one line naming what is wrong and what is
//! expected, and never overwrites a file.

mod common;
mod provision_common;

use provision_common::*;

fn fails_with(args: &[&str], want: &str) {
    let out = run_cli(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(err.contains(want), "{args:?}: {err:?} lacks {want:?}");
}

#[test]
fn bad_inputs_are_refused_with_clear_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (key, public) = keygen(tmp.path(), "engineer");
    let p = |name: &str| tmp.path().join(name).display().to_string();
    let key_s = key.display().to_string();
    let pub_s = public.display().to_string();
    std::fs::write(tmp.path().join("site.toml"), "[web]\n").expect("config");
    let site = p("site.toml");
    let out = p("out.bundle");

    fails_with(&["keygen", "--out", &key_s], "exists; choose another --out");
    let base = |extra: &[&'static str]| {
        let mut v: Vec<String> = vec![
            "bundle".into(),
            "create".into(),
            "--key".into(),
            key_s.clone(),
            "--config".into(),
            site.clone(),
            "--out".into(),
            out.clone(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |extra: &[&'static str], want: &str| {
        let args = base(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&refs, want);
    };
    run(&["--serial", "1", "--target", "any"], "give --expires");
    run(
        &["--serial", "1", "--target", "box7", "--valid-for", "1h"],
        "neither `any` nor a box id",
    );
    run(
        &["--serial", "1", "--target", "any", "--valid-for", "7w"],
        "not a duration",
    );
    run(
        &[
            "--serial",
            "1",
            "--target",
            "any",
            "--expires",
            "2020-01-01T00:00:00Z",
        ],
        "already past",
    );
    run(
        &["--serial", "1", "--target", "any", "--expires", "tomorrow"],
        "not a UTC time",
    );
    run(
        &["--serial", "0", "--target", "any", "--valid-for", "1h"],
        "serial must be at least 1",
    );
    run(
        &[
            "--serial",
            "1",
            "--target",
            "any",
            "--valid-for",
            "1h",
            "--secret",
            "nc1",
        ],
        "expected NAME=PATH",
    );
    run(
        &[
            "--serial",
            "1",
            "--target",
            "any",
            "--valid-for",
            "1h",
            "--secret",
            "../x=/etc/hostname",
        ],
        "is not allowed",
    );
    run(
        &[
            "--serial",
            "1",
            "--target",
            "any",
            "--valid-for",
            "1h",
            "--secret",
            "nc1=/nonexistent",
        ],
        "/nonexistent",
    );
    // The public key is not a signing key.
    fails_with(
        &[
            "bundle",
            "create",
            "--key",
            &pub_s,
            "--config",
            &site,
            "--out",
            &out,
            "--serial",
            "1",
            "--target",
            "any",
            "--valid-for",
            "1h",
        ],
        ".pub",
    );
    assert!(!tmp.path().join("out.bundle").exists(), "nothing written");

    // A good bundle is not overwritten by the next one.
    let args = base(&["--serial", "1", "--target", "any", "--valid-for", "1h"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&run_cli(&refs));
    fails_with(&refs, "never overwritten");
    fails_with(&["bundle", "inspect", &site], "malformed bundle");
    fails_with(
        &[
            "push",
            "--box",
            "127.0.0.1:9",
            "--bundle",
            &out,
            "--key",
            &key_s,
        ],
        "enrolment token",
    );
    fails_with(
        &[
            "push",
            "--box",
            "127.0.0.1:9",
            "--bundle",
            &out,
            "--key",
            &key_s,
            "--token",
            "t",
            "--pin",
            "abc",
        ],
        "--pin",
    );
}
