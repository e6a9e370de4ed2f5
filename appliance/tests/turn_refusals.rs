//! Every refusal of `talkbox turn` with its exact error code, against the real binary with the
//! default peer policy (no allow list).

mod common;

use std::net::SocketAddr;

use appliance::turn::credentials;
use common::stun_msgs::{self, Creds};
use common::{TurnClient, TurnProcess, unix_now};

fn server() -> TurnProcess {
    TurnProcess::start("max_allocations_per_user = 2")
}

#[test]
fn expired_turn_credential_is_rejected_with_401() {
    let turn = server();
    let mut c = TurnClient::udp(turn.udp_addr());
    let (u, p) = credentials::rest_credentials(&turn.secret, "alice", 0, unix_now() - 10);
    let creds = c.login(&u, &p);
    let r = c.request(&stun_msgs::allocate(&creds)).expect("answered");
    assert_eq!(r.code, Some(401), "{r:?}");
    assert!(turn.metrics().contains("reason=\"auth_expired\""));
}

#[test]
fn wrong_hmac_is_rejected_with_401() {
    let turn = server();
    let mut c = TurnClient::udp(turn.udp_addr());
    let (u, _) = turn.credentials("alice");
    let wrong = credentials::password_for("not-the-secret", &u);
    let creds = c.login(&u, &wrong);
    let r = c.request(&stun_msgs::allocate(&creds)).expect("answered");
    assert_eq!(r.code, Some(401), "{r:?}");
    // Over TCP too.
    let mut t = TurnClient::tcp(turn.udp_addr());
    let creds = t.login(&u, &wrong);
    let r = t.request(&stun_msgs::allocate(&creds)).expect("answered");
    assert_eq!(r.code, Some(401), "{r:?}");
}

#[test]
fn stale_nonce_is_rejected_with_438_and_a_fresh_nonce() {
    let turn = server();
    let mut c = TurnClient::udp(turn.udp_addr());
    let (u, p) = turn.credentials("alice");
    let mut creds = c.login(&u, &p);
    let fresh = creds.nonce.clone();
    creds.nonce = "stale-nonce-0123".into();
    let r = c.request(&stun_msgs::allocate(&creds)).expect("answered");
    assert_eq!(r.code, Some(438), "{r:?}");
    assert_eq!(
        r.nonce.as_deref(),
        Some(fresh.as_str()),
        "438 carries the current nonce"
    );
    creds.nonce = fresh;
    let r = c.request(&stun_msgs::allocate(&creds)).expect("answered");
    assert!(r.success, "retry with the fresh nonce succeeds: {r:?}");
}

#[test]
fn previous_secret_is_still_accepted_after_rotation() {
    let turn = TurnProcess::start_with("", |data| {
        std::fs::write(
            data.join("secrets/turn-secret.prev"),
            "previous-secret-previous-secret-previous-secret\n",
        )
        .expect("write previous secret");
    });
    let (u, p) = credentials::rest_credentials(
        "previous-secret-previous-secret-previous-secret",
        "bob",
        600,
        unix_now(),
    );
    let mut c = TurnClient::udp(turn.udp_addr());
    let (_, relayed) = c.allocate(&u, &p);
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");
    let (u, p) = turn.credentials("carol");
    let mut c = TurnClient::udp(turn.udp_addr());
    c.allocate(&u, &p);
}

fn permission(c: &mut TurnClient, creds: &Creds, peer: &str) -> Option<u16> {
    let peer: SocketAddr = peer.parse().expect("peer");
    let r = c
        .request(&stun_msgs::create_permission(creds, peer))
        .expect("answered");
    if r.success { None } else { r.code }
}

#[test]
fn internal_peers_are_refused_with_403_by_default() {
    let turn = server();
    let mut c = TurnClient::udp(turn.udp_addr());
    let (u, p) = turn.credentials("alice");
    let (creds, _) = c.allocate(&u, &p);
    for peer in [
        "127.0.0.1:9",
        "10.0.0.1:9",
        "169.254.1.1:9",
        "[::1]:9",
        "100.64.0.1:9",
        "192.168.1.1:9",
        "[fd00::1]:9",
        "[fe80::1]:9",
        "224.0.0.1:9",
        "0.0.0.0:9",
    ] {
        assert_eq!(
            permission(&mut c, &creds, peer),
            Some(403),
            "CreatePermission {peer}"
        );
    }
    let r = c
        .request(&stun_msgs::channel_bind(
            &creds,
            0x4001,
            "127.0.0.1:9".parse().expect("peer"),
        ))
        .expect("answered");
    assert_eq!(r.code, Some(403), "ChannelBind to loopback: {r:?}");
    assert!(r.signed, "the 403 is signed with the client's key");
    // A public peer is fine.
    assert_eq!(permission(&mut c, &creds, "8.8.8.8:9"), None);
    let m = turn.metrics();
    assert!(
        m.contains("talkbox_turn_refusals_total{reason=\"peer_loopback\"} 3"),
        "{m}"
    );
    assert!(m.contains("reason=\"peer_private\""), "{m}");
    assert!(m.contains("reason=\"peer_link_local\""), "{m}");
}

#[test]
fn allocation_quota_per_user_is_enforced_with_486() {
    let turn = server();
    let (u, p) = turn.credentials("alice");
    let mut clients: Vec<(TurnClient, Creds)> = (0..2)
        .map(|_| {
            let mut c = TurnClient::udp(turn.udp_addr());
            let (creds, _) = c.allocate(&u, &p);
            (c, creds)
        })
        .collect();
    let mut third = TurnClient::udp(turn.udp_addr());
    let creds = third.login(&u, &p);
    let r = third
        .request(&stun_msgs::allocate(&creds))
        .expect("answered");
    assert_eq!(r.code, Some(486), "{r:?}");
    // Another user is not affected.
    let (u2, p2) = turn.credentials("bob");
    TurnClient::udp(turn.udp_addr()).allocate(&u2, &p2);
    // Releasing one allocation (Refresh lifetime 0) makes room again.
    let (c0, creds0) = &mut clients[0];
    let r = c0
        .request(&stun_msgs::refresh(creds0, 0))
        .expect("answered");
    assert!(r.success, "{r:?}");
    let r = third
        .request(&stun_msgs::allocate(&creds))
        .expect("answered");
    assert!(r.success, "after a release the quota has room: {r:?}");
}

#[test]
fn tcp_allocations_are_refused_with_442() {
    let turn = server();
    let mut c = TurnClient::tcp(turn.udp_addr());
    let (u, p) = turn.credentials("alice");
    let creds = c.login(&u, &p);
    let r = c
        .request(&stun_msgs::allocate_tcp(&creds))
        .expect("answered");
    assert_eq!(r.code, Some(442), "{r:?}");
}

#[test]
fn logs_never_contain_credentials() {
    let turn = server();
    let (u, p) = turn.credentials("alice");
    let mut c = TurnClient::udp(turn.udp_addr());
    c.allocate(&u, &p);
    let log = turn.log();
    assert!(!log.is_empty());
    assert!(!log.contains(&p), "password in log");
    assert!(!log.contains(&turn.secret), "secret in log");
    assert!(!log.contains(&u), "username in log");
}

#[test]
fn closing_a_tcp_connection_releases_its_allocation_and_quota() {
    let turn = server();
    let (u, p) = turn.credentials("alice");
    let mut first = TurnClient::tcp(turn.udp_addr());
    first.allocate(&u, &p);
    let mut second = TurnClient::tcp(turn.udp_addr());
    second.allocate(&u, &p);
    let mut third = TurnClient::tcp(turn.udp_addr());
    let creds = third.login(&u, &p);
    assert_eq!(
        third
            .request(&stun_msgs::allocate(&creds))
            .and_then(|r| r.code),
        Some(486)
    );
    drop(first);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let r = third
            .request(&stun_msgs::allocate(&creds))
            .expect("answered");
        if r.success {
            break;
        }
        assert_eq!(r.code, Some(486), "{r:?}");
        assert!(
            std::time::Instant::now() < deadline,
            "the closed connection's allocation was not released"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let m = turn.metrics();
    assert!(m.contains("talkbox_turn_allocations 2"), "{m}");
}
