//! Fuzzes everything the TURN service parses from the network: the TCP stream framer and the
//! sans-I/O core (STUN/TURN messages, ChannelData) as a UDP client, a TCP client and a peer.
//! Any panic is a bug: malformed input must be dropped or answered with an error.
#![no_main]

use std::net::SocketAddr;
use std::time::Duration;

use appliance::turn::Instant;
use appliance::turn::framing::Framer;
use appliance::turn::metrics::Metrics;
use appliance::turn::auth::RestAuth;
use appliance::turn::policy::{PeerPolicy, Quotas};
use appliance::turn::server::{CoreConfig, FiveTuple, Now, Output, Transport, TurnCore};
use libfuzzer_sys::fuzz_target;

fn core() -> TurnCore {
    let udp: SocketAddr = "192.0.2.1:3478".parse().unwrap();
    let config = CoreConfig {
        policy: PeerPolicy::new(&["127.0.0.0/8".into()], vec![]),
        quotas: Quotas { per_user: 4, total: 16 },
        bandwidth_per_allocation_kbps: 1000,
        nonce_lifetime_s: 30,
    };
    TurnCore::new(
        &[(Transport::Udp, udp), (Transport::Tcp, udp)],
        RestAuth::new("fuzz".into(), "fuzz-secret".into(), Some("old".into())),
        config,
        Metrics::new(),
    )
}

fn drain(core: &mut TurnCore, now: Now, port: &mut u16) {
    while let Some(o) = core.poll_output() {
        if let Output::BindRelay(req) = o {
            *port = port.wrapping_add(1);
            core.relay_bound(req, Ok(SocketAddr::from(([192, 0, 2, 1], *port))), now);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut core = core();
    let listen: SocketAddr = "192.0.2.1:3478".parse().unwrap();
    let mut port = 20_000u16;
    let mut t = Duration::ZERO;
    // The input is a sequence of chunks: [kind, len_hi, len_lo, bytes...].
    let mut rest = data;
    while rest.len() >= 3 {
        let kind = rest[0];
        let len = (usize::from(rest[1]) << 8 | usize::from(rest[2])).min(rest.len() - 3);
        let chunk = &rest[3..3 + len];
        rest = &rest[3 + len..];
        t += Duration::from_secs(u64::from(kind >> 4));
        let now = Now { mono: Instant::from_nanos(t.as_nanos() as i64), unix_s: 1_800_000_000 + t.as_secs() };
        let client = SocketAddr::from(([198, 51, 100, kind & 3], 40_000));
        match kind & 0x0c {
            0 => {
                let tuple = FiveTuple { transport: Transport::Udp, listen, client };
                core.recv_from_client(tuple, chunk, now);
            }
            4 => {
                let tuple = FiveTuple { transport: Transport::Tcp, listen, client };
                let mut f = Framer::new();
                f.push(chunk);
                while let Ok(Some(frame)) = f.next_frame() {
                    let frame = frame.to_vec();
                    core.recv_from_client(tuple, &frame, now);
                }
            }
            8 => {
                let relayed = SocketAddr::from(([192, 0, 2, 1], 20_001));
                core.recv_from_peer(relayed, "127.0.0.1:9".parse().unwrap(), chunk, now);
            }
            _ => core.handle_timeout(now),
        }
        drain(&mut core, now, &mut port);
    }
});
