//! Fuzzes everything the TURN service parses from the network: the TCP stream framer and the
//! sans-I/O core (STUN/TURN messages, ChannelData) as a UDP client, a TCP client and a peer, and
//! correctly signed requests with fuzzed contents so the authenticated paths are reached too.
//! Any panic is a bug: malformed input must be dropped or answered with an error.
#![no_main]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use appliance::turn::Instant;
use appliance::turn::auth::RestAuth;
use appliance::turn::credentials::rest_credentials;
use appliance::turn::engine::stun::types::attribute::{Nonce, Realm, Username};
use appliance::turn::engine::stun::types::message::{
    IntegrityAlgorithm, LongTermCredentials, Message, MessageIntegrityCredentials, MessageWrite, MessageWriteExt,
    MessageWriteVec,
};
use appliance::turn::engine::types::attribute::{ChannelNumber, Lifetime, RequestedTransport, XorPeerAddress};
use appliance::turn::engine::types::message::{ALLOCATE, CHANNEL_BIND, CREATE_PERMISSION, REFRESH};
use appliance::turn::framing::Framer;
use appliance::turn::metrics::Metrics;
use appliance::turn::policy::{PeerPolicy, Quotas};
use appliance::turn::server::{CoreConfig, FiveTuple, Now, Output, Transport, TurnCore};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-secret";
const UNIX0: u64 = 1_800_000_000;

fn core() -> TurnCore {
    let udp: SocketAddr = "192.0.2.1:3478".parse().unwrap();
    let config = CoreConfig {
        policy: PeerPolicy::new(&["127.0.0.0/8".into()], vec!["192.0.2.1".parse().unwrap()], vec![(20_000, 20_100)]),
        quotas: Quotas { per_user: 4, total: 16 },
        bandwidth_per_allocation_kbps: 1000,
        nonce_lifetime_s: 30,
    };
    TurnCore::new(
        &[(Transport::Udp, udp), (Transport::Tcp, udp)],
        RestAuth::new("fuzz".into(), SECRET.into(), Some("old".into())),
        config,
        Metrics::new(),
    )
}

/// Carries out outputs; remembers the nonce each client was given.
fn drain(core: &mut TurnCore, now: Now, port: &mut u16, nonces: &mut HashMap<SocketAddr, String>) {
    while let Some(o) = core.poll_output() {
        match o {
            Output::BindRelay(req) => {
                *port = port.wrapping_add(1);
                core.relay_bound(req, Ok(SocketAddr::from(([192, 0, 2, 1], *port))), now);
            }
            Output::Transmit { to, data, .. } => {
                if let Ok(m) = Message::from_bytes(&data) {
                    if let Ok(n) = m.attribute::<Nonce>() {
                        nonces.insert(to, n.nonce().to_string());
                    }
                }
            }
            _ => {}
        }
    }
}

/// A correctly signed request whose method and attributes come from the fuzzer.
fn signed_request(bytes: &[u8], nonce: &str, unix_s: u64) -> Option<Vec<u8>> {
    let b = |i: usize| bytes.get(i).copied().unwrap_or(0);
    let method = [ALLOCATE, REFRESH, CREATE_PERMISSION, CHANNEL_BIND][usize::from(b(0) & 3)];
    let peer = SocketAddr::from(([b(1), b(2), b(3), b(4)], u16::from_be_bytes([b(5), b(6)])));
    let ttl = u64::from(b(7)) * 10;
    let (username, password) = rest_credentials(if b(8) & 1 == 0 { SECRET } else { "old" }, "fuzz", ttl, unix_s.saturating_sub(300));
    let mut m = Message::builder_request(method, MessageWriteVec::new());
    let tid = m.transaction_id();
    if b(9) & 1 != 0 {
        m.add_attribute(&RequestedTransport::new(b(10))).ok()?;
    }
    if b(9) & 2 != 0 {
        m.add_attribute(&Lifetime::new(u32::from_be_bytes([b(11), b(12), b(13), b(14)]))).ok()?;
    }
    if b(9) & 4 != 0 {
        m.add_attribute(&XorPeerAddress::new(peer, tid)).ok()?;
    }
    if b(9) & 8 != 0 {
        m.add_attribute(&ChannelNumber::new(u16::from_be_bytes([b(15), b(16)]))).ok()?;
    }
    if b(9) & 16 != 0 {
        // A second peer address.
        m.add_attribute(&XorPeerAddress::new(SocketAddr::from(([127, 0, 0, b(17)], 9)), tid)).ok()?;
    }
    m.add_attribute(&Username::new(&username).ok()?).ok()?;
    m.add_attribute(&Realm::new("fuzz").ok()?).ok()?;
    m.add_attribute(&Nonce::new(nonce).ok()?).ok()?;
    let key: MessageIntegrityCredentials =
        LongTermCredentials::new(username, password).to_key("fuzz".into()).into();
    let algo = if b(9) & 32 != 0 { IntegrityAlgorithm::Sha256 } else { IntegrityAlgorithm::Sha1 };
    m.add_message_integrity(&key, algo).ok()?;
    if b(9) & 64 != 0 {
        m.add_fingerprint().ok()?;
    }
    Some(m.finish())
}

fuzz_target!(|data: &[u8]| {
    let mut core = core();
    let listen: SocketAddr = "192.0.2.1:3478".parse().unwrap();
    let mut port = 20_000u16;
    let mut nonces: HashMap<SocketAddr, String> = HashMap::new();
    let mut t = Duration::ZERO;
    // The input is a sequence of chunks: [kind, len_hi, len_lo, bytes...].
    let mut rest = data;
    while rest.len() >= 3 {
        let kind = rest[0];
        let len = (usize::from(rest[1]) << 8 | usize::from(rest[2])).min(rest.len() - 3);
        let chunk = &rest[3..3 + len];
        rest = &rest[3 + len..];
        t += Duration::from_secs(u64::from(kind >> 4) * 7);
        let now = Now { mono: Instant::from_nanos(t.as_nanos() as i64), unix_s: UNIX0 + t.as_secs() };
        let client = SocketAddr::from(([198, 51, 100, kind & 3], 40_000));
        let transport = if kind & 0x40 != 0 { Transport::Tcp } else { Transport::Udp };
        let tuple = FiveTuple { transport, listen, client };
        match kind & 0x0c {
            0 => core.recv_from_client(tuple, chunk, now),
            4 => {
                let mut f = Framer::new();
                f.push(chunk);
                while let Ok(Some(frame)) = f.next_frame() {
                    let frame = frame.to_vec();
                    core.recv_from_client(tuple, &frame, now);
                }
            }
            8 => {
                let relayed = SocketAddr::from(([192, 0, 2, 1], 20_001 + u16::from(kind & 3)));
                let peer = SocketAddr::from(([127, 0, 0, 1], 9));
                core.recv_from_peer(relayed, peer, chunk, now);
            }
            _ => {
                let nonce = nonces.get(&client).cloned().unwrap_or_else(|| "none".into());
                if let Some(req) = signed_request(chunk, &nonce, now.unix_s) {
                    core.recv_from_client(tuple, &req, now);
                }
            }
        }
        if kind >> 4 == 15 {
            core.handle_timeout(now);
        }
        drain(&mut core, now, &mut port, &mut nonces);
    }
});
