//! The supervisor as a user meets it: `talkbox run` on a fresh data directory, `talkbox status`,
//! the status page over HTTPS, restarts after crashes, crash loops, clean stops, and no orphans.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use appliance::config::Config;
use appliance::service::Service;
use appliance::supervisor::status::ServiceState;
use common::{Supervisor, alive, free_port, https_get, isolated_config, wait_gone};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The services this build contains, in the order the supervisor starts them.
fn built_services() -> Vec<&'static str> {
    Service::to_run(&Config::default())
        .iter()
        .map(|s| s.name())
        .collect()
}

fn pids_of(s: &appliance::supervisor::status::SupervisorStatus) -> Vec<(String, u32)> {
    s.services
        .iter()
        .filter_map(|x| x.pid.map(|p| (x.name.clone(), p)))
        .collect()
}

#[test]
fn fresh_start_without_config_runs_every_built_service_and_serves_the_status_page() {
    // No config file at all: the built-in defaults, including the default ports.
    let sup = Supervisor::start(None);
    let status = sup.wait_ready();
    let names: Vec<&str> = status.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        built_services(),
        "status must list exactly the services that exist"
    );
    for s in &status.services {
        assert_eq!(s.state, ServiceState::Running, "{s:?}");
        assert!(s.pid.is_some_and(alive), "{s:?}");
        assert_eq!(s.restarts, 0);
    }

    // First start created every secret and the certificate, owner-only.
    let data = sup.data_dir();
    for f in [
        "secrets/backend-secret",
        "secrets/turn-secret",
        "secrets/internal-secret",
        "secrets/session-hash-key",
        "secrets/session-block-key",
        "tls/key.pem",
        "tls/cert.pem",
    ] {
        let mode = std::fs::metadata(data.join(f))
            .expect(f)
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let sock_mode = std::fs::metadata(data.join("run/control.sock"))
        .expect("control socket")
        .permissions()
        .mode();
    assert_eq!(sock_mode & 0o077, 0, "control socket must be owner-only");

    // The setup page answers over HTTPS with a certificate valid for 127.0.0.1; its status
    // is for a logged-in admin only (tests/setup_http.rs logs in).
    let ca = data.join("tls/cert.pem");
    let (code, body) = https_get("https://127.0.0.1:9443/", &ca);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("talkbox setup"), "{body}");
    let (code, body) = https_get("https://localhost:9443/api/status", &ca);
    assert_eq!(code, 401, "{body}");
}

#[test]
fn kill_9_of_a_child_is_restarted_within_2_s_and_counted() {
    let sup = Supervisor::start(Some(&isolated_config(&[])));
    let before = sup.wait_ready();
    for victim in built_services() {
        let old_pid = sup
            .status()
            .and_then(|s| {
                s.services
                    .iter()
                    .find(|x| x.name == victim)
                    .and_then(|x| x.pid)
            })
            .expect("pid");
        let others_before: Vec<_> = pids_of(&sup.status().expect("status"))
            .into_iter()
            .filter(|(n, _)| n != victim)
            .collect();
        let t0 = Instant::now();
        kill(Pid::from_raw(old_pid as i32), Signal::SIGKILL).expect("kill -9");
        let after = sup.wait_for("the killed service back up", Duration::from_secs(5), |s| {
            s.services.iter().any(|x| {
                x.name == victim
                    && x.state == ServiceState::Running
                    && x.pid.is_some_and(|p| p != old_pid)
            })
        });
        let took = t0.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "{victim} took {took:?} to come back"
        );
        let svc = after
            .services
            .iter()
            .find(|x| x.name == victim)
            .expect("service");
        assert_eq!(svc.restarts, 1, "{svc:?}");
        assert_eq!(svc.last_exit.as_deref(), Some("killed by SIGKILL"));
        // Nobody else was touched.
        let others_after: Vec<_> = pids_of(&after)
            .into_iter()
            .filter(|(n, _)| n != victim)
            .collect();
        assert_eq!(others_before, others_after);
    }
    assert_eq!(before.services.len(), built_services().len());
}

#[test]
fn a_child_that_exits_at_once_goes_into_a_crash_loop_with_growing_backoff_while_others_run() {
    // The setup page's port is taken, so the web service fails at once on every start.
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = blocker.local_addr().expect("addr").port();
    let listen = format!("listen = \"127.0.0.1:{port}\"");
    let config = isolated_config(&[
        ("supervisor", "restart_initial_ms = 100"),
        ("supervisor", "crash_loop_restarts = 4"),
        ("web", &listen),
    ]);
    let sup = Supervisor::start(Some(&config));
    let s = sup.wait_for("web in a crash loop", Duration::from_secs(15), |s| {
        s.services
            .iter()
            .any(|x| x.name == "web" && x.state == ServiceState::CrashLoop)
    });
    let web = s.services.iter().find(|x| x.name == "web").expect("web");
    assert!(web.consecutive_failures >= 4, "{web:?}");
    assert!(
        web.last_exit
            .as_deref()
            .is_some_and(|e| e.starts_with("exited with code")),
        "{web:?}"
    );
    // Every other service keeps running, untouched.
    for other in s.services.iter().filter(|x| x.name != "web") {
        assert_eq!(other.state, ServiceState::Running, "{other:?}");
        assert_eq!(other.restarts, 0, "{other:?}");
    }
    // The delays the supervisor chose grow: 100, 200, 400, ... ms.
    let log = sup.log();
    let delays: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("service=\"web\"") || l.contains("service=web"))
        .filter_map(|l| l.split("retry_in_ms=").nth(1))
        .filter_map(|r| r.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect();
    assert!(delays.len() >= 4, "delays {delays:?}\n{log}");
    assert_eq!(&delays[..4], &[100, 200, 400, 800], "{log}");
    assert!(log.contains("crash loop"), "{log}");
    // The status page of a crash-looping service is, by construction, unreachable here; the
    // human-readable status says so.
    let out = common::run_talkbox(&[
        "status",
        "--data-dir",
        sup.data_dir().to_str().expect("utf8"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("crash-loop"), "{text}");
    drop(blocker);
}

#[test]
fn sigterm_stops_every_child_within_5_s_and_exits_0() {
    let mut sup = Supervisor::start(Some(&isolated_config(&[])));
    let status = sup.wait_ready();
    let pids: Vec<u32> = pids_of(&status).into_iter().map(|(_, p)| p).collect();
    assert!(!pids.is_empty());
    let t0 = Instant::now();
    sup.signal(Signal::SIGTERM);
    let exit = sup
        .wait_exit(Duration::from_secs(5))
        .expect("supervisor exits within 5 s");
    assert_eq!(exit.code(), Some(0), "{}", sup.log());
    assert!(
        wait_gone(&pids, Duration::from_secs(5).saturating_sub(t0.elapsed())),
        "children left: {pids:?}"
    );
    assert!(
        !sup.data_dir().join("run/control.sock").exists(),
        "control socket removed on exit"
    );
}

#[test]
fn sigint_stops_cleanly_too() {
    let mut sup = Supervisor::start(Some(&isolated_config(&[])));
    let pids: Vec<u32> = pids_of(&sup.wait_ready())
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    sup.signal(Signal::SIGINT);
    let exit = sup.wait_exit(Duration::from_secs(5)).expect("exits");
    assert_eq!(exit.code(), Some(0));
    assert!(wait_gone(&pids, Duration::from_secs(1)));
}

#[test]
fn sigkill_of_the_supervisor_leaves_no_child_behind() {
    let mut sup = Supervisor::start(Some(&isolated_config(&[])));
    let pids: Vec<u32> = pids_of(&sup.wait_ready())
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    sup.signal(Signal::SIGKILL);
    sup.wait_exit(Duration::from_secs(2))
        .expect("supervisor gone");
    assert!(
        wait_gone(&pids, Duration::from_secs(2)),
        "orphans survived: {pids:?}"
    );
    // The next start on the same data directory works (stale control socket replaced).
    let dir = std::mem::replace(&mut sup.dir, tempfile::tempdir().expect("tempdir"));
    drop(sup);
    let again = Supervisor::start_in(dir);
    again.wait_ready();
}

#[test]
fn second_supervisor_on_the_same_data_dir_is_refused() {
    let sup = Supervisor::start(Some(&isolated_config(&[])));
    sup.wait_ready();
    let out = common::run_talkbox(&["run", "--data-dir", sup.data_dir().to_str().expect("utf8")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another supervisor is running"), "{err}");
    sup.wait_ready();
}

#[test]
fn services_run_as_the_unprivileged_user_without_capabilities_when_started_as_root() {
    if !nix::unistd::Uid::effective().is_root() {
        // Started by an ordinary user there is nothing to drop; the root path is what matters
        // in the image and in CI, which runs as root.
        eprintln!("not root: privilege drop not exercised");
        return;
    }
    let sup = Supervisor::start(Some(&isolated_config(&[])));
    let status = sup.wait_ready();
    let user = nix::unistd::User::from_name("talkbox")
        .expect("lookup")
        .expect("user talkbox exists (CI creates it)");
    for (name, pid) in pids_of(&status) {
        let proc_status =
            std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        let field = |k: &str| {
            proc_status
                .lines()
                .find(|l| l.starts_with(k))
                .map(|l| {
                    l[k.len()..]
                        .split_whitespace()
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        assert!(
            field("Uid:").iter().all(|u| *u == user.uid.to_string()),
            "{name}: {:?}",
            field("Uid:")
        );
        assert!(
            field("Gid:").iter().all(|g| *g == user.gid.to_string()),
            "{name}: {:?}",
            field("Gid:")
        );
        // Every port of the test config is above 1024, so no capability at all is kept.
        for cap in ["CapEff:", "CapPrm:", "CapBnd:", "CapAmb:"] {
            assert_eq!(
                field(cap),
                vec!["0000000000000000".to_string()],
                "{name} {cap}"
            );
        }
        assert_eq!(field("NoNewPrivs:"), vec!["1".to_string()], "{name}");
    }
}

#[test]
fn a_service_on_a_port_below_1024_keeps_only_cap_net_bind_service() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("not root: privilege drop not exercised");
        return;
    }
    // Port 1023 on loopback: privileged, and almost certainly free.
    let sup = Supervisor::start(Some(&isolated_config(&[(
        "web",
        "listen = \"127.0.0.1:1023\"",
    )])));
    let status = sup.wait_ready();
    let web = status
        .services
        .iter()
        .find(|s| s.name == "web")
        .and_then(|s| s.pid)
        .expect("web pid");
    let proc_status = std::fs::read_to_string(format!("/proc/{web}/status")).expect("proc status");
    let cap = |k: &str| {
        proc_status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| u64::from_str_radix(l[k.len()..].trim(), 16).ok())
            .expect(k)
    };
    let net_bind_service = 1u64 << 10;
    assert_eq!(cap("CapEff:"), net_bind_service);
    assert_eq!(cap("CapPrm:"), net_bind_service);
    assert_eq!(cap("CapBnd:"), net_bind_service);
    assert_ne!(
        proc_status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .expect("uid"),
        "Uid:\t0\t0\t0\t0"
    );
}

#[test]
fn config_apply_restarts_only_the_affected_service() {
    let sup = Supervisor::start(Some(&isolated_config(&[])));
    let before = sup.wait_ready();
    let new_port = free_port();
    let mut text = std::fs::read_to_string(sup.data_dir().join("talkbox.toml")).expect("config");
    let old_listen = text
        .lines()
        .skip_while(|l| *l != "[web]")
        .nth(1)
        .expect("web listen")
        .to_string();
    text = text.replace(&old_listen, &format!("listen = \"127.0.0.1:{new_port}\""));
    let file = sup.data_dir().join("new.toml");
    std::fs::write(&file, &text).expect("write");
    let out = common::run_talkbox(&[
        "config",
        "apply",
        file.to_str().expect("utf8"),
        "--data-dir",
        sup.data_dir().to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let old_web = before
        .services
        .iter()
        .find(|s| s.name == "web")
        .and_then(|s| s.pid)
        .expect("pid");
    let after = sup.wait_for(
        "web restarted on the new port",
        Duration::from_secs(10),
        |s| {
            s.ready
                && s.services
                    .iter()
                    .any(|x| x.name == "web" && x.pid.is_some_and(|p| p != old_web))
        },
    );
    let ca = sup.data_dir().join("tls/cert.pem");
    let (code, body) = https_get(&format!("https://127.0.0.1:{new_port}/"), &ca);
    assert_eq!(code, 200, "{body}");
    for s in after.services.iter().filter(|s| s.name != "web") {
        let was = before
            .services
            .iter()
            .find(|b| b.name == s.name)
            .and_then(|b| b.pid);
        assert_eq!(s.pid, was, "{} must not restart for a web change", s.name);
    }
    let web = after
        .services
        .iter()
        .find(|s| s.name == "web")
        .expect("web");
    assert_eq!(
        web.consecutive_failures, 0,
        "a config restart is not a failure"
    );
}
