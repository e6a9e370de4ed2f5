//! Malformed input never crashes `talkbox turn` and never disturbs other allocations: truncated
//! headers, wrong lengths, bad attributes, bad fingerprints, ChannelData on unbound channels,
//! garbage streams, and TCP/TLS clients that stall are dropped, answered with 400, or closed.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use common::stun_msgs;
use common::{TurnClient, TurnProcess};

/// A UDP echo peer on loopback.
fn echo_peer() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind peer");
    let addr = s.local_addr().expect("addr");
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    });
    addr
}

/// A client with an allocation and a channel to the echo peer, checked by a round trip.
struct Healthy {
    client: TurnClient,
    channel: u16,
}

impl Healthy {
    fn new(turn: &TurnProcess, peer: SocketAddr) -> Healthy {
        let mut client = TurnClient::udp(turn.udp_addr());
        let (u, p) = turn.credentials("healthy");
        let (creds, _) = client.allocate(&u, &p);
        let r = client
            .request(&stun_msgs::channel_bind(&creds, 0x4001, peer))
            .expect("answered");
        assert!(r.success, "ChannelBind: {r:?}");
        Healthy {
            client,
            channel: 0x4001,
        }
    }

    fn round_trip(&mut self, n: u32) {
        for i in 0..n {
            let payload = format!("ping {i}");
            self.client
                .send(&stun_msgs::channel_data(self.channel, payload.as_bytes()));
            // Generous: the machine may be busy with other builds; loss is what fails.
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut got = false;
            while !got && Instant::now() < deadline {
                got = self
                    .client
                    .recv()
                    .and_then(|b| stun_msgs::parse_data(&b))
                    .is_some_and(|(_, ch, data)| {
                        ch == Some(self.channel) && data == payload.as_bytes()
                    });
            }
            assert!(
                got,
                "echo {i} through the healthy allocation did not come back"
            );
        }
    }
}

fn garbage_datagrams(good: &[u8]) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = (0..20)
        .map(|n| good[..n.min(good.len())].to_vec())
        .collect();
    // Header claims more than is there.
    let mut long = good.to_vec();
    long[2] = 0x0f;
    long[3] = 0xf0;
    v.push(long);
    // Length not a multiple of four.
    let mut odd = good.to_vec();
    odd[3] = odd[3].wrapping_add(1);
    v.push(odd);
    // An attribute whose length runs past the end.
    let mut bad_attr = stun_msgs::binding();
    bad_attr[3] = 8;
    bad_attr.extend_from_slice(&[0x00, 0x06, 0x00, 0x40, b'a', b'b', b'c', b'd']);
    v.push(bad_attr);
    // Unknown comprehension-required attribute in a Binding: 420, not a crash.
    let mut unknown = stun_msgs::binding();
    unknown[3] = 8;
    unknown.extend_from_slice(&[0x00, 0x7f, 0x00, 0x04, 1, 2, 3, 4]);
    v.push(unknown);
    // A bad fingerprint.
    v.push(stun_msgs::corrupt_fingerprint(good.to_vec()));
    // ChannelData for channels nobody bound, and truncated ChannelData.
    v.push(stun_msgs::channel_data(0x4002, b"who am i"));
    v.push(stun_msgs::channel_data(0x7fff, &[0u8; 1200]));
    v.push(vec![0x40, 0x01, 0x04, 0x00, 1, 2]);
    // Wrong magic cookie, and random-looking bytes.
    let mut cookie = stun_msgs::binding();
    cookie[4] = 0;
    v.push(cookie);
    v.push(
        (0..1500u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
    );
    v
}

#[test]
fn malformed_input_is_dropped_and_other_allocations_keep_relaying() {
    let turn = TurnProcess::start("allowed_peers = [\"127.0.0.0/8\"]\ntcp_handshake_timeout_s = 2");
    let peer = echo_peer();
    let mut healthy = Healthy::new(&turn, peer);
    healthy.round_trip(3);

    // A second client that is already authenticated sends broken requests too.
    let mut attacker = TurnClient::udp(turn.udp_addr());
    let (u, p) = turn.credentials("attacker");
    let (creds, _) = attacker.allocate(&u, &p);
    let good = stun_msgs::create_permission(&creds, peer);
    let raw = UdpSocket::bind("127.0.0.1:0").expect("bind");
    raw.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    for d in garbage_datagrams(&good) {
        for sock in [&raw, attacker.udp.as_ref().expect("udp")] {
            sock.send_to(&d, turn.udp_addr()).expect("send");
        }
    }
    // Anything that comes back is an error response (400 or 420), never a success.
    let mut buf = [0u8; 2048];
    while let Ok(n) = raw.recv(&mut buf) {
        if let Some(r) = stun_msgs::parse_reply(&buf[..n]) {
            assert!(
                !r.success || r.mapped.is_some(),
                "garbage got a success: {r:?}"
            );
            if let Some(code) = r.code {
                assert!(matches!(code, 400 | 420), "unexpected error code {code}");
            }
        }
    }

    // Streams: garbage closes the connection; a started frame that stalls is closed after the
    // handshake timeout; so is a TLS client that never finishes its handshake.
    let mut garbage = TcpStream::connect(turn.udp_addr()).expect("tcp");
    garbage
        .write_all(b"\x80GET / HTTP/1.1\r\n\r\n")
        .expect("write");
    assert_closed_within(&mut garbage, Duration::from_secs(3), "garbage TCP stream");

    let mut partial = TcpStream::connect(turn.udp_addr()).expect("tcp");
    partial.write_all(&good[..30]).expect("write");
    assert_closed_within(&mut partial, Duration::from_secs(5), "stalled TCP frame");

    let mut tls_silent = TcpStream::connect(("127.0.0.1", turn.tls_port)).expect("tls tcp");
    let mut tls_half = TcpStream::connect(("127.0.0.1", turn.tls_port)).expect("tls tcp");
    // The first bytes of a ClientHello, then nothing.
    tls_half
        .write_all(&[0x16, 0x03, 0x01, 0x01, 0x00, 0x01, 0x00])
        .expect("write");
    healthy.round_trip(5);
    assert_closed_within(&mut tls_silent, Duration::from_secs(5), "silent TLS client");
    assert_closed_within(
        &mut tls_half,
        Duration::from_secs(5),
        "stalled TLS handshake",
    );

    // The TCP client that sent garbage did not hurt a well-behaved TCP client either.
    let mut tcp_ok = TurnClient::tcp(turn.udp_addr());
    let (u, p) = turn.credentials("tcp-ok");
    tcp_ok.allocate(&u, &p);

    healthy.round_trip(5);
    let mut turn = turn;
    assert!(turn.alive(), "talkbox turn exited; log:\n{}", turn.log());
    let m = turn.metrics();
    assert!(
        m.contains("talkbox_turn_refusals_total{reason=\"malformed\"}"),
        "{m}"
    );
    assert!(
        m.contains("talkbox_turn_tcp_connections 1"),
        "only the good TCP client is left: {m}"
    );
}

fn assert_closed_within(s: &mut TcpStream, limit: Duration, what: &str) {
    s.set_read_timeout(Some(limit + Duration::from_secs(2)))
        .expect("timeout");
    let start = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("{what}: still open after {:?} ({e})", start.elapsed()),
        }
    }
    assert!(
        start.elapsed() <= limit + Duration::from_secs(1),
        "{what}: closed only after {:?}",
        start.elapsed()
    );
}
