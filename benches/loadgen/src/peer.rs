//! webrtc-rs peers of the load generator: publishers that write synthetic VP8 and Opus RTP at
//! a fixed rate, and subscribers that count what arrives without decoding it.
//!
//! Every payload carries, at [`STAMP_AT`], the packet's index in its track, the sender's wall
//! clock in nanoseconds and the track kind, so a subscriber can compute loss, one-way delay and
//! delay variation (RFC 3550 interarrival jitter on the send stamps) whatever the SFU rewrote
//! in the RTP header. Sender and receivers share one machine and hence one clock.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use tokio::sync::mpsc;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription, Registry,
    SettingEngineBuilder, register_default_interceptors,
};

/// Where the stamp starts: after the VP8 payload descriptor and a 10-byte keyframe header.
pub const STAMP_AT: usize = 16;
const STAMP_LEN: usize = 13;
/// 1250-byte video packets at 100/s: 1 Mbit/s of payload.
pub const VIDEO_BYTES: usize = 1250;
pub const VIDEO_INTERVAL: Duration = Duration::from_millis(10);
/// 120-byte audio packets at 50/s: 48 kbit/s of payload (an Opus 20 ms frame rate).
pub const AUDIO_BYTES: usize = 120;
pub const AUDIO_EVERY: u32 = 2;

const KIND_AUDIO: u8 = 0;
const KIND_VIDEO: u8 = 1;

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Packets received on one track while measuring.
#[derive(Default)]
pub struct TrackStats {
    pub received: u64,
    pub min_idx: Option<u32>,
    pub max_idx: u32,
    /// One-way delay of every packet, µs.
    pub delays_us: Vec<u32>,
    pub jitter_us: f64,
    last_transit: Option<i64>,
}

impl TrackStats {
    fn record(&mut self, idx: u32, sent_ns: u64, recv_ns: u64) {
        self.received += 1;
        self.min_idx = Some(self.min_idx.map_or(idx, |m| m.min(idx)));
        self.max_idx = self.max_idx.max(idx);
        let transit = recv_ns as i64 - sent_ns as i64;
        self.delays_us
            .push((transit.max(0) / 1000).min(i64::from(u32::MAX)) as u32);
        if let Some(prev) = self.last_transit {
            let d = ((transit - prev).abs() / 1000) as f64;
            self.jitter_us += (d - self.jitter_us) / 16.0;
        }
        self.last_transit = Some(transit);
    }

    /// Packets the publisher sent between the first and last one seen here.
    pub fn expected(&self) -> u64 {
        self.min_idx
            .map_or(0, |m| u64::from(self.max_idx.saturating_sub(m)) + 1)
    }
}

/// What one subscriber connection received, per kind (0 audio, 1 video).
#[derive(Default)]
pub struct Received {
    pub tracks: [TrackStats; 2],
}

#[derive(Clone)]
struct Handler {
    state: Arc<Mutex<PcState>>,
    notify: mpsc::UnboundedSender<()>,
    received: Arc<Mutex<Received>>,
    measuring: Arc<AtomicBool>,
}

#[derive(Default)]
struct PcState {
    connected: bool,
    failed: bool,
    gathered: bool,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete
            && let Ok(mut s) = self.state.lock()
        {
            s.gathered = true;
        }
        let _ = self.notify.send(());
    }
    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        if let Ok(mut s) = self.state.lock() {
            match state {
                RTCPeerConnectionState::Connected => s.connected = true,
                RTCPeerConnectionState::Failed => s.failed = true,
                _ => {}
            }
        }
        let _ = self.notify.send(());
    }
    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let received = self.received.clone();
        let measuring = self.measuring.clone();
        tokio::spawn(async move {
            while let Some(ev) = track.poll().await {
                let TrackRemoteEvent::OnRtpPacket(p) = ev else {
                    continue;
                };
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                let Some(stamp) = p.payload.get(STAMP_AT..STAMP_AT + STAMP_LEN) else {
                    continue;
                };
                let idx = u32::from_be_bytes([stamp[0], stamp[1], stamp[2], stamp[3]]);
                let mut sent = [0u8; 8];
                sent.copy_from_slice(&stamp[4..12]);
                let kind = usize::from(stamp[12] == KIND_VIDEO);
                let recv_ns = now_nanos();
                if let Ok(mut r) = received.lock() {
                    r.tracks[kind].record(idx, u64::from_be_bytes(sent), recv_ns);
                }
            }
        });
    }
}

/// One webrtc-rs peer connection with its own UDP socket on `ip`.
pub struct Peer {
    pub pc: Arc<dyn PeerConnection>,
    state: Arc<Mutex<PcState>>,
    notify: mpsc::UnboundedReceiver<()>,
    pub received: Arc<Mutex<Received>>,
}

impl Peer {
    pub async fn new(ip: IpAddr, measuring: Arc<AtomicBool>) -> Result<Peer> {
        let mut me = MediaEngine::default();
        me.register_default_codecs()
            .context("registering the default codecs")?;
        let registry = register_default_interceptors(Registry::new(), &mut me)
            .context("registering the default interceptors")?;
        let state = Arc::new(Mutex::new(PcState::default()));
        let received = Arc::new(Mutex::new(Received::default()));
        let (tx, rx) = mpsc::unbounded_channel();
        // No mDNS: it would bind a multicast socket per peer, which a loopback-only network
        // namespace refuses (ENODEV), and loopback candidates need no name resolution.
        let setting_engine = SettingEngineBuilder::new()
            .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
            .build();
        let pc = PeerConnectionBuilder::new()
            .with_setting_engine(setting_engine)
            .with_media_engine(me)
            .with_interceptor_registry(registry)
            .with_handler(Arc::new(Handler {
                state: state.clone(),
                notify: tx,
                received: received.clone(),
                measuring,
            }))
            .with_udp_addrs(vec![format!("{ip}:0")])
            .build()
            .await
            .context("building a webrtc-rs peer connection")?;
        Ok(Peer {
            pc: Arc::new(pc),
            state,
            notify: rx,
            received,
        })
    }

    async fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: fn(&PcState) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let s = self
                    .state
                    .lock()
                    .map_err(|_| anyhow::anyhow!("peer state lock poisoned"))?;
                if pred(&s) {
                    return Ok(());
                }
                if s.failed {
                    bail!("peer connection failed while waiting for {what}");
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            let _ =
                tokio::time::timeout(left.min(Duration::from_millis(50)), self.notify.recv()).await;
        }
    }

    pub async fn wait_connected(&mut self) -> Result<()> {
        self.wait("ICE+DTLS connection", Duration::from_secs(20), |s| {
            s.connected
        })
        .await
    }

    async fn local_sdp(&mut self) -> Result<String> {
        self.wait("ICE gathering", Duration::from_secs(10), |s| s.gathered)
            .await?;
        Ok(self
            .pc
            .local_description()
            .await
            .context("no local description after gathering")?
            .sdp)
    }

    /// Offer with the candidates in it (no trickle).
    pub async fn offer(&mut self) -> Result<String> {
        let offer = self.pc.create_offer(None).await.context("create offer")?;
        self.pc
            .set_local_description(offer)
            .await
            .context("set local offer")?;
        self.local_sdp().await
    }

    pub async fn answer(&mut self, offer_sdp: &str) -> Result<String> {
        self.pc
            .set_remote_description(
                RTCSessionDescription::offer(offer_sdp.to_string()).context("SFU offer")?,
            )
            .await
            .context("set remote offer")?;
        let answer = self.pc.create_answer(None).await.context("create answer")?;
        self.pc
            .set_local_description(answer)
            .await
            .context("set local answer")?;
        self.local_sdp().await
    }

    pub async fn accept_answer(&self, sdp: &str) -> Result<()> {
        self.pc
            .set_remote_description(
                RTCSessionDescription::answer(sdp.to_string()).context("SFU answer")?,
            )
            .await
            .context("set remote answer")
    }
}

fn track(kind_video: bool, ssrc: u32, id: &str) -> Arc<TrackLocalStaticRTP> {
    use rtc::media_stream::MediaStreamTrack;
    use rtc::rtp_transceiver::rtp_sender::{
        RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
    };
    let (kind, codec) = if kind_video {
        (
            RtpCodecKind::Video,
            RTCRtpCodec {
                mime_type: "video/VP8".to_string(),
                clock_rate: 90000,
                channels: 0,
                sdp_fmtp_line: String::new(),
                rtcp_feedback: vec![],
            },
        )
    } else {
        (
            RtpCodecKind::Audio,
            RTCRtpCodec {
                mime_type: "audio/opus".to_string(),
                clock_rate: 48000,
                channels: 2,
                sdp_fmtp_line: "minptime=10;useinbandfec=1".to_string(),
                rtcp_feedback: vec![],
            },
        )
    };
    Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        format!("loadgen-{id}"),
        format!("{id}-{}", if kind_video { "video" } else { "audio" }),
        format!("{id}-{}", if kind_video { "video" } else { "audio" }),
        kind,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(ssrc),
                ..Default::default()
            },
            codec,
            ..Default::default()
        }],
    )))
}

/// A publisher's two tracks, added to its peer connection before the offer.
pub struct Tracks {
    pub audio: Arc<TrackLocalStaticRTP>,
    pub video: Arc<TrackLocalStaticRTP>,
    audio_ssrc: u32,
    video_ssrc: u32,
}

pub async fn add_tracks(peer: &Peer, n: u32) -> Result<Tracks> {
    let (audio_ssrc, video_ssrc) = (0x1000_0000 + 2 * n, 0x1000_0001 + 2 * n);
    let t = Tracks {
        audio: track(false, audio_ssrc, &format!("p{n}")),
        video: track(true, video_ssrc, &format!("p{n}")),
        audio_ssrc,
        video_ssrc,
    };
    peer.pc
        .add_track(t.audio.clone() as Arc<dyn TrackLocal>)
        .await
        .context("add audio track")?;
    peer.pc
        .add_track(t.video.clone() as Arc<dyn TrackLocal>)
        .await
        .context("add video track")?;
    Ok(t)
}

fn payload(len: usize, video: bool, idx: u32) -> Bytes {
    let mut p = vec![0u8; len];
    if video {
        // VP8 descriptor (start of partition), then a keyframe header (show_frame, start code,
        // 640x480), so that no SFU waits for a keyframe before forwarding.
        p[..11].copy_from_slice(&[
            0x10, 0x10, 0x00, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01,
        ]);
    } else {
        p[0] = 0xfc; // Opus TOC: CELT fullband 20 ms, one frame
    }
    p[STAMP_AT..STAMP_AT + 4].copy_from_slice(&idx.to_be_bytes());
    p[STAMP_AT + 4..STAMP_AT + 12].copy_from_slice(&now_nanos().to_be_bytes());
    p[STAMP_AT + 12] = if video { KIND_VIDEO } else { KIND_AUDIO };
    Bytes::from(p)
}

/// Writes video every [`VIDEO_INTERVAL`] and audio every [`AUDIO_EVERY`]th tick until `stop`
/// or `limit` passes; counts what it wrote into `sent`.
pub async fn send_media(
    t: Tracks,
    stop: Arc<AtomicBool>,
    limit: Duration,
    sent: Arc<AtomicU64>,
    seed: u32,
) {
    let start = Instant::now();
    let mut tick = tokio::time::interval(VIDEO_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut i: u32 = 0;
    let (vseq, aseq) = (seed as u16, (seed >> 16) as u16);
    while !stop.load(Ordering::Relaxed) && start.elapsed() < limit {
        tick.tick().await;
        let v = rtc::rtp::Packet {
            header: rtc::rtp::Header {
                version: 2,
                marker: true,
                payload_type: 96,
                sequence_number: vseq.wrapping_add(i as u16),
                timestamp: i.wrapping_mul(900),
                ssrc: t.video_ssrc,
                ..Default::default()
            },
            payload: payload(VIDEO_BYTES, true, i),
        };
        if t.video.write_rtp(v).await.is_ok() {
            sent.fetch_add(1, Ordering::Relaxed);
        }
        if i.is_multiple_of(AUDIO_EVERY) {
            let n = i / AUDIO_EVERY;
            let a = rtc::rtp::Packet {
                header: rtc::rtp::Header {
                    version: 2,
                    payload_type: 111,
                    sequence_number: aseq.wrapping_add(n as u16),
                    timestamp: n.wrapping_mul(960),
                    ssrc: t.audio_ssrc,
                    ..Default::default()
                },
                payload: payload(AUDIO_BYTES, false, n),
            };
            if t.audio.write_rtp(a).await.is_ok() {
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }
        i = i.wrapping_add(1);
    }
}
