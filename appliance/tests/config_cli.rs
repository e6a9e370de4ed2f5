//! `talkbox config check` / `config apply` / `run` with bad configs, and saves interrupted by
//! SIGKILL: a refused config never replaces the good one, and no kill leaves a torn file.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use appliance::config::{Config, DataDir};
use appliance::secrets::{self, Secret};
use common::{Lcg, isolated_config, run_talkbox, talkbox};

struct Case {
    name: &'static str,
    text: &'static str,
    /// What the one-line message must contain.
    expect: &'static str,
}

const BAD: &[Case] = &[
    Case {
        name: "unknown key",
        text: "[turn]\nport = 3478\nrelay_prot_min = 20000\n",
        expect: ":3: turn.relay_prot_min = 20000: unknown key; keys of [turn]: enabled, listen_address, port",
    },
    Case {
        name: "wrong type",
        text: "[web]\nenabled = \"yes\"\n",
        expect: ":2: web.enabled = \"yes\": expected true or false, found a string",
    },
    Case {
        name: "out-of-range port",
        text: "[turn]\ntls_port = 65536\n",
        expect: ":2: turn.tls_port = 65536: out of range: allowed 1 to 65535",
    },
    Case {
        name: "overlapping port ranges",
        text: "[sfu]\nmedia_port_min = 25000\nmedia_port_max = 25063\n",
        expect: "sfu.media_port_min = 25000-25063: SFU media ports (udp 25000-25063) collide with the TURN relay range (turn.relay_port_min, udp 20000-29999)",
    },
    Case {
        name: "same port twice",
        text: "[signaling]\nlisten = \"127.0.0.1:9443\"\n",
        expect: "web.listen = 9443-9443: the setup page (tcp 9443-9443) collides with",
    },
    Case {
        name: "unknown section",
        text: "[trun]\nport = 3478\n",
        expect: ":1: trun = {...}: unknown section",
    },
    Case {
        name: "syntax error",
        text: "[web]\nlisten = \"127.0.0.1:9443\n",
        expect: ":2: (syntax): not valid TOML",
    },
    Case {
        name: "bad address",
        text: "[web]\nlisten = \"localhost\"\n",
        expect: ":2: web.listen = \"localhost\": expected ADDRESS:PORT",
    },
];

fn write(dir: &Path, name: &str, text: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

#[test]
fn config_check_accepts_a_valid_file_and_an_empty_one() {
    let d = tempfile::tempdir().expect("tempdir");
    for text in ["", &isolated_config(&[])] {
        let f = write(d.path(), "ok.toml", text.as_bytes());
        let out = run_talkbox(&["config", "check", f.to_str().expect("utf8")]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_kind_of_bad_config_exits_2_naming_file_line_key_and_what_is_allowed() {
    let d = tempfile::tempdir().expect("tempdir");
    for case in BAD {
        let f = write(d.path(), "bad.toml", case.text.as_bytes());
        let out = run_talkbox(&["config", "check", f.to_str().expect("utf8")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {err}", case.name);
        assert!(
            err.contains(case.expect),
            "{}: expected {:?} in:\n{err}",
            case.name,
            case.expect
        );
        assert!(
            err.lines()
                .all(|l| l.starts_with(f.to_str().expect("utf8"))),
            "{}: every line names the file:\n{err}",
            case.name
        );
    }
}

#[test]
fn unreadable_files_are_errors_with_exit_2() {
    let d = tempfile::tempdir().expect("tempdir");
    let missing = d.path().join("missing.toml");
    let dir = d.path().to_path_buf();
    let big = write(d.path(), "big.toml", &vec![b'#'; 2 * 1024 * 1024]);
    let binary = write(d.path(), "bin.toml", b"[web]\nlisten = \"\xff\xfe\"\n");
    for (what, p, frag) in [
        ("missing", &missing, "cannot read the file"),
        ("directory", &dir, "not a regular file"),
        ("oversized", &big, "at most 1048576 bytes"),
        ("not UTF-8", &binary, "not UTF-8"),
    ] {
        let out = run_talkbox(&["config", "check", p.to_str().expect("utf8")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(err.contains(frag), "{what}: {err}");
    }
}

#[test]
fn apply_of_a_bad_config_changes_nothing() {
    let d = tempfile::tempdir().expect("tempdir");
    let data = d.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    let good = isolated_config(&[]);
    let good2 = isolated_config(&[("supervisor", "log_level = \"debug\"")]);
    // Two good applies so that both the file and its previous version exist.
    for text in [&good, &good2] {
        let f = write(d.path(), "good.toml", text.as_bytes());
        let out = run_talkbox(&[
            "config",
            "apply",
            f.to_str().expect("utf8"),
            "--data-dir",
            data.to_str().expect("utf8"),
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let current = std::fs::read(data.join("talkbox.toml")).expect("config");
    let previous = std::fs::read(data.join("talkbox.toml.prev")).expect("prev");
    assert_eq!(current, good2.as_bytes());
    assert_eq!(previous, good.as_bytes());
    for case in BAD {
        let f = write(d.path(), "bad.toml", case.text.as_bytes());
        let out = run_talkbox(&[
            "config",
            "apply",
            f.to_str().expect("utf8"),
            "--data-dir",
            data.to_str().expect("utf8"),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {err}", case.name);
        assert!(err.contains("nothing changed"), "{err}");
        assert_eq!(
            std::fs::read(data.join("talkbox.toml")).expect("config"),
            current,
            "{}",
            case.name
        );
        assert_eq!(
            std::fs::read(data.join("talkbox.toml.prev")).expect("prev"),
            previous,
            "{}",
            case.name
        );
    }
}

#[test]
fn run_with_a_bad_config_exits_2_and_starts_nothing() {
    let d = tempfile::tempdir().expect("tempdir");
    let f = write(d.path(), "bad.toml", b"[turn]\nport = \"x\"\n");
    let out = Command::new(talkbox())
        .args(["run", "--data-dir"])
        .arg(d.path().join("data"))
        .arg("--config")
        .arg(&f)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("turn.port"));
    assert!(
        !d.path().join("data").exists(),
        "nothing may be created for a refused config"
    );
}

#[test]
fn a_save_killed_at_any_moment_leaves_the_old_or_the_new_config_never_a_torn_one() {
    let d = tempfile::tempdir().expect("tempdir");
    let data = d.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    // Large files make the write itself take long enough for kills to land inside it.
    let padding = format!("# {}\n", "x".repeat(200)).repeat(3000);
    let a = format!(
        "{padding}{}",
        isolated_config(&[("supervisor", "log_level = \"warn\"")])
    );
    let b = format!(
        "{padding}{}",
        isolated_config(&[("supervisor", "log_level = \"debug\"")])
    );
    let fa = write(d.path(), "a.toml", a.as_bytes());
    let fb = write(d.path(), "b.toml", b.as_bytes());
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    eprintln!("seed {seed}");
    let mut rng = Lcg(seed);
    let mut killed_mid_way = 0;
    for i in 0..120 {
        let f = if i % 2 == 0 { &fa } else { &fb };
        let mut child = Command::new(talkbox())
            .args(["config", "apply"])
            .arg(f)
            .arg("--data-dir")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_micros(rng.below(12_000)));
        let _ = child.kill();
        let status = child.wait().expect("wait");
        if !status.success() {
            killed_mid_way += 1;
        }
        let path = data.join("talkbox.toml");
        if let Ok(now) = std::fs::read(&path) {
            assert!(
                now == a.as_bytes() || now == b.as_bytes(),
                "iteration {i}: torn config ({} bytes)",
                now.len()
            );
            Config::from_file(&path).expect("the file in place always validates");
        }
        if let Ok(prev) = std::fs::read(data.join("talkbox.toml.prev")) {
            assert!(
                prev == a.as_bytes() || prev == b.as_bytes(),
                "iteration {i}: torn previous version"
            );
        }
    }
    assert!(
        killed_mid_way > 20,
        "too few kills landed before the end ({killed_mid_way}); the test proves nothing"
    );
}

#[test]
fn a_first_start_killed_at_any_moment_never_leaves_a_torn_secret_or_key() {
    let d = tempfile::tempdir().expect("tempdir");
    let config = write(d.path(), "c.toml", isolated_config(&[]).as_bytes());
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    eprintln!("seed {seed}");
    let mut rng = Lcg(seed);
    for i in 0..25 {
        let root = d.path().join(format!("data{i}"));
        let mut child = Command::new(talkbox())
            .args(["run", "--data-dir"])
            .arg(&root)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_micros(rng.below(60_000)));
        let _ = child.kill();
        let _ = child.wait();
        let data = DataDir::new(&root);
        for s in Secret::ALL {
            if s.path(&data).exists() {
                secrets::read(&data, s).unwrap_or_else(|e| panic!("iteration {i}: {e}"));
            }
        }
        if root.join("tls/cert.pem").exists() {
            assert!(
                root.join("tls/key.pem").exists(),
                "iteration {i}: certificate without key"
            );
            appliance::tls::load_server_config(&data)
                .unwrap_or_else(|e| panic!("iteration {i}: {e}"));
        }
        // Whatever was left, the next first start completes it.
        appliance::supervisor::prepare_data_dir(&data, &Config::default())
            .unwrap_or_else(|e| panic!("iteration {i}: {e:#}"));
        for s in Secret::ALL {
            secrets::read(&data, s).unwrap_or_else(|e| panic!("iteration {i}: {e}"));
        }
        appliance::tls::load_server_config(&data).unwrap_or_else(|e| panic!("iteration {i}: {e}"));
    }
}
