//! Criterion micro-benchmark of the TURN relay's per-packet hot path: one 1200-byte ChannelData
//! message from a client relayed to its peer, and one datagram from the peer relayed back as
//! ChannelData, through the sans-I/O core (`TurnCore::recv_from_client` / `recv_from_peer` and
//! `poll_output`), without sockets. The allocation and channel are set up with real signed
//! TURN requests first (the client messages are the test suite's, `tests/common/stun_msgs.rs`).

#[path = "../tests/common/stun_msgs.rs"]
mod stun_msgs;

use std::net::SocketAddr;

use appliance::turn::Instant;
use appliance::turn::auth::RestAuth;
use appliance::turn::credentials::rest_credentials;
use appliance::turn::metrics::Metrics;
use appliance::turn::policy::{PeerPolicy, Quotas};
use appliance::turn::server::{CoreConfig, FiveTuple, Now, Output, Transport, TurnCore};
use criterion::{Criterion, criterion_group, criterion_main};
use stun_msgs::Creds;

const SECRET: &str = "bench-secret";
const UNIX0: u64 = 1_800_000_000;

fn listen() -> SocketAddr {
    SocketAddr::from(([198, 51, 100, 1], 3478))
}

fn now(t_ns: i64) -> Now {
    Now {
        mono: Instant::from_nanos(t_ns),
        unix_s: UNIX0 + (t_ns / 1_000_000_000) as u64,
    }
}

/// Feeds `data` from `client` and returns the transmits; binds relay sockets at fake addresses.
fn send(core: &mut TurnCore, client: SocketAddr, data: &[u8], t: i64) -> Vec<Output> {
    let tuple = FiveTuple {
        transport: Transport::Udp,
        listen: listen(),
        client,
    };
    core.recv_from_client(tuple, data, now(t));
    let mut out = Vec::new();
    while let Some(o) = core.poll_output() {
        if let Output::BindRelay(req) = o {
            core.relay_bound(
                req,
                Ok(SocketAddr::from(([198, 51, 100, 1], 20_000))),
                now(t),
            );
        } else {
            out.push(o);
        }
    }
    out
}

fn reply(out: &[Output], client: SocketAddr) -> stun_msgs::Reply {
    out.iter()
        .find_map(|o| match o {
            Output::Transmit { to, data, .. } if *to == client => stun_msgs::parse_reply(data),
            _ => None,
        })
        .expect("a reply to the client")
}

fn relay(c: &mut Criterion) {
    let config = CoreConfig {
        policy: PeerPolicy::new(
            &["127.0.0.0/8".into()],
            vec!["198.51.100.1".parse().expect("ip")],
            vec![(20_000, 20_999)],
        ),
        quotas: Quotas {
            per_user: 10,
            total: 100,
        },
        bandwidth_per_allocation_kbps: 0,
        nonce_lifetime_s: 3600,
    };
    let mut core = TurnCore::new(
        &[(Transport::Udp, listen())],
        RestAuth::new("bench".into(), SECRET.into(), None),
        config,
        Metrics::new(),
    );
    let client = SocketAddr::from(([203, 0, 113, 9], 40_000));
    let peer = SocketAddr::from(([127, 0, 0, 1], 5000));
    let r = reply(
        &send(&mut core, client, &stun_msgs::allocate_unsigned(), 0),
        client,
    );
    let (username, password) = rest_credentials(SECRET, "bench", 86_400, UNIX0);
    let creds = Creds {
        username,
        password,
        realm: r.realm.expect("realm"),
        nonce: r.nonce.expect("nonce"),
    };
    let r = reply(
        &send(&mut core, client, &stun_msgs::allocate(&creds), 0),
        client,
    );
    let relayed = r.relayed.expect("allocated");
    let r = reply(
        &send(
            &mut core,
            client,
            &stun_msgs::channel_bind(&creds, 0x4000, peer),
            0,
        ),
        client,
    );
    assert!(r.success, "channel bind: {r:?}");
    let cd = stun_msgs::channel_data(0x4000, &[0x5au8; 1200]);
    let from_peer = vec![0xa5u8; 1200];
    // The clock moves 1 µs per relayed packet: criterion runs tens of millions of iterations,
    // and at 10 µs each the simulated time passed the 300 s permission lifetime, after which
    // the core (rightly) drops the peer's packets.
    let mut t: i64 = 1_000_000;

    let mut g = c.benchmark_group("turn");
    g.bench_function("relay one 1200-byte ChannelData client -> peer", |b| {
        b.iter(|| {
            t += 1_000;
            let tuple = FiveTuple {
                transport: Transport::Udp,
                listen: listen(),
                client,
            };
            core.recv_from_client(tuple, &cd, now(t));
            let mut n = 0;
            while let Some(o) = core.poll_output() {
                if let Output::Transmit { to, data, .. } = o {
                    debug_assert_eq!(to, peer);
                    n += data.len();
                }
            }
            assert!(n > 0, "relayed");
            n
        })
    });
    g.bench_function(
        "relay one 1200-byte datagram peer -> client (as ChannelData)",
        |b| {
            b.iter(|| {
                t += 1_000;
                core.recv_from_peer(relayed, peer, &from_peer, now(t));
                let mut n = 0;
                while let Some(o) = core.poll_output() {
                    if let Output::Transmit { data, .. } = o {
                        n += data.len();
                    }
                }
                assert!(n > 0, "relayed");
                n
            })
        },
    );
    g.finish();
}

criterion_group!(benches, relay);
criterion_main!(benches);
