//! Criterion micro-benchmark of the SFU's per-packet hot path: one RTP packet forwarded to one
//! subscriber, as the media worker does it (`worker.rs` `forward_rtp` + `drain`): sequence and
//! timestamp rewrite, `write_rtp` on the subscriber's str0m session, and `poll_output` until
//! the SRTP-protected datagram comes out. No sockets: the subscriber session and a str0m client
//! are connected in memory (ICE, DTLS, SRTP keys) before timing starts, and the client is fed
//! what the session sent (untimed) between timed chunks so the session stays alive.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use media_core::demux::{SessionKey, ufrag_for};
use media_core::forward::SeqTsRewriter;
use media_core::session::{PublishedTrack, Role, Session, SessionSetup};
use str0m::change::SdpOffer;
use str0m::media::{MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{RtpWrite, SeqNo};
use str0m::{Candidate, Input, Output, Rtc, RtcConfig};

const SFU: &str = "10.0.0.1:5000";
const CLIENT: &str = "10.0.0.2:6000";

struct Pair {
    sfu: Session,
    client: Rtc,
    now: Instant,
    sfu_addr: SocketAddr,
    client_addr: SocketAddr,
}

impl Pair {
    fn new() -> Pair {
        let sfu_addr: SocketAddr = SFU.parse().expect("addr");
        let client_addr: SocketAddr = CLIENT.parse().expect("addr");
        let now = Instant::now();
        let setup = SessionSetup::new(vec![sfu_addr]).expect("dtls certificate");
        let key = SessionKey {
            worker: 0,
            session: 2,
        };
        let mut sfu = Session::new_subscriber(
            key,
            ufrag_for(key, 7),
            "0123456789abcdef0123456789abcdef",
            1,
            &setup,
            now,
        );
        let offer = sfu
            .create_offer(
                &[PublishedTrack {
                    mid: Mid::from("1"),
                    kind: MediaKind::Video,
                }],
                "status",
                || (1000, 5000),
            )
            .expect("offer");
        let mut client = RtcConfig::new()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .build(now);
        client.add_local_candidate(Candidate::host(client_addr, "udp").expect("candidate"));
        let answer = client
            .sdp_api()
            .accept_offer(SdpOffer::from_sdp_string(&offer).expect("offer sdp"))
            .expect("answer");
        sfu.accept_answer(&answer.to_sdp_string())
            .expect("accept answer");
        let mut p = Pair {
            sfu,
            client,
            now,
            sfu_addr,
            client_addr,
        };
        for _ in 0..2000 {
            p.pump(Duration::from_millis(5));
            if p.sfu.rtc.is_connected() && p.client.is_connected() {
                return p;
            }
        }
        panic!("in-memory pair did not connect");
    }

    /// Moves everything both sides want to send to the other, then advances time.
    fn pump(&mut self, step: Duration) {
        loop {
            let mut moved = false;
            while let Ok(o) = self.sfu.rtc.poll_output() {
                match o {
                    Output::Transmit(t) => {
                        moved = true;
                        let r = Receive::new(
                            Protocol::Udp,
                            self.sfu_addr,
                            self.client_addr,
                            &t.contents,
                        )
                        .expect("datagram");
                        let _ = self.client.handle_input(Input::Receive(self.now, r));
                    }
                    Output::Timeout(_) => break,
                    Output::Event(_) => {}
                }
            }
            while let Ok(o) = self.client.poll_output() {
                match o {
                    Output::Transmit(t) => {
                        moved = true;
                        let r = Receive::new(
                            Protocol::Udp,
                            self.client_addr,
                            self.sfu_addr,
                            &t.contents,
                        )
                        .expect("datagram");
                        let _ = self.sfu.rtc.handle_input(Input::Receive(self.now, r));
                    }
                    Output::Timeout(_) => break,
                    Output::Event(_) => {}
                }
            }
            if !moved {
                break;
            }
        }
        self.now += step;
        let _ = self.sfu.rtc.handle_input(Input::Timeout(self.now));
        let _ = self.client.handle_input(Input::Timeout(self.now));
    }
}

fn forward(c: &mut Criterion) {
    let mut p = Pair::new();
    let Role::Subscriber { tracks, .. } = &p.sfu.role else {
        panic!("subscriber role");
    };
    let out_mid = tracks[0].mid;
    let pt = p
        .sfu
        .rtc
        .codec_config()
        .params()
        .iter()
        .find(|q| q.spec().codec == str0m::format::Codec::Vp8)
        .map(|q| q.pt())
        .expect("vp8 negotiated");
    let mut rewriter = SeqTsRewriter::new(1000, 5000);
    let payload = vec![0x10u8; 1200];
    let mut in_seq: u64 = 70_000;
    let mut group = c.benchmark_group("sfu");
    group.bench_function(
        "forward one 1200-byte RTP packet (rewrite + write_rtp + SRTP)",
        |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let chunk = (iters - done).min(200);
                    let start = Instant::now();
                    let mut out = 0usize;
                    for _ in 0..chunk {
                        in_seq += 1;
                        p.now += Duration::from_micros(100);
                        let rw = rewriter
                            .rewrite(
                                0xabcd,
                                in_seq,
                                (in_seq as u32).wrapping_mul(900),
                                90_000,
                                p.now,
                            )
                            .expect("in order");
                        let mut api = p.sfu.rtc.direct_api();
                        let tx = api.stream_tx_by_mid(out_mid, None).expect("send stream");
                        tx.write_rtp(
                            RtpWrite::new(pt, SeqNo::from(rw.seq), rw.ts, p.now, payload.clone())
                                .marker(true)
                                .nackable(true),
                        );
                        while let Ok(o) = p.sfu.rtc.poll_output() {
                            match o {
                                Output::Transmit(t) => out += t.contents.len(),
                                Output::Timeout(_) => break,
                                Output::Event(_) => {}
                            }
                        }
                    }
                    timed += start.elapsed();
                    std::hint::black_box(out);
                    done += chunk;
                    // Untimed: let both sides exchange RTCP/ICE so the session stays connected.
                    p.pump(Duration::ZERO);
                }
                timed
            })
        },
    );
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
