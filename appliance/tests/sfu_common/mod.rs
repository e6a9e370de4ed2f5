//! Shared harness of the SFU tests: the real `talkbox sfu` process in a temporary data
//! directory, a proxy-protocol client that speaks to its `/proxy` WebSocket like a signaling
//! server would (RS256 hello token signed with the box's proxy token key), and webrtc-rs
//! peers (an independent WebRTC stack) that publish and subscribe through it.

#![allow(dead_code)]

use std::net::{TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appliance::config::{Config, DataDir};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription, Registry,
    register_default_interceptors,
};

pub fn talkbox() -> &'static str {
    env!("CARGO_BIN_EXE_talkbox")
}

pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free tcp port")
}

/// A port free for both UDP and TCP (media workers bind both).
pub fn free_udp_port() -> u16 {
    loop {
        let u = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = u.local_addr().expect("addr").port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A `talkbox sfu` process; killed when dropped.
pub struct SfuProcess {
    pub dir: tempfile::TempDir,
    pub child: Child,
    pub control: u16,
    pub media: u16,
    pub private_key_pem: String,
}

impl SfuProcess {
    pub fn start(ice_timeout_s: u64) -> SfuProcess {
        Self::start_with_grace(ice_timeout_s, 30)
    }

    /// As [`Self::start`], with `sfu.resume_grace_s` set.
    pub fn start_with_grace(ice_timeout_s: u64, resume_grace_s: u64) -> SfuProcess {
        Self::start_with_config(ice_timeout_s, resume_grace_s, "", "")
    }

    /// As [`Self::start_with_grace`], with more `[sfu]` keys (`sfu_keys`, TOML lines) and more
    /// sections (`sections`, such as `[sizing]`) in the config.
    pub fn start_with_config(
        ice_timeout_s: u64,
        resume_grace_s: u64,
        sfu_keys: &str,
        sections: &str,
    ) -> SfuProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let control = free_tcp_port();
        let media = free_udp_port();
        let text = format!(
            "[sfu]\nlisten = \"127.0.0.1:{control}\"\nworkers = 1\nmedia_port_min = {media}\nmedia_port_max = {media}\npublic_ips = [\"127.0.0.1\"]\nice_timeout_s = {ice_timeout_s}\nresume_grace_s = {resume_grace_s}\n{sfu_keys}\n\
             [signaling]\nenabled = false\n[web]\nenabled = false\n[turn]\nenabled = false\n{sections}"
        );
        let cfg_path = dir.path().join("talkbox.toml");
        std::fs::write(&cfg_path, &text).expect("write config");
        let config = Config::from_toml("talkbox.toml", &text).expect("valid config");
        let data = DataDir::new(dir.path());
        appliance::supervisor::prepare_data_dir(&data, &config).expect("data dir");
        let (private_key_pem, _) = appliance::secrets::proxy_token_keys(&data).expect("keys");
        let log = std::fs::File::create(dir.path().join("sfu.log")).expect("log");
        let child = Command::new(talkbox())
            .args(["sfu", "--data-dir"])
            .arg(dir.path())
            .arg("--config")
            .arg(&cfg_path)
            .env_remove("NOTIFY_SOCKET")
            .env(
                "RUST_LOG",
                std::env::var("SFU_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start talkbox sfu");
        let p = SfuProcess {
            dir,
            child,
            control,
            media,
            private_key_pem,
        };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", control)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "sfu did not listen:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sfu.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn token(&self) -> String {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(self.private_key_pem.as_bytes())
            .expect("rsa key");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &json!({"iss": "talkbox-signaling", "iat": now}),
            &key,
        )
        .expect("sign")
    }
}

impl Drop for SfuProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A signaling server's side of `/proxy`.
pub struct ProxyClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Messages without our request id (events, async payloads) seen while waiting.
    pub events: Vec<Value>,
}

impl ProxyClient {
    pub async fn connect(sfu: &SfuProcess) -> ProxyClient {
        let (ws, _) =
            tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/proxy", sfu.control))
                .await
                .expect("connect /proxy");
        ProxyClient {
            ws,
            next_id: 1,
            events: Vec::new(),
        }
    }

    /// Connects and says hello with a valid token.
    pub async fn hello(sfu: &SfuProcess) -> ProxyClient {
        let mut c = Self::connect(sfu).await;
        let r = c
            .request(json!({"type":"hello","hello":{"version":"1.0","token": sfu.token()}}))
            .await;
        assert_eq!(r["type"], "hello", "{r}");
        c
    }

    pub async fn send_raw(&mut self, text: String) {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("send");
    }

    pub async fn recv(&mut self, timeout: Duration) -> Option<Value> {
        loop {
            let m = tokio::time::timeout(timeout, self.ws.next())
                .await
                .ok()??
                .ok()?;
            if let Message::Text(t) = m {
                return serde_json::from_str(t.as_str()).ok();
            }
        }
    }

    /// Sends `msg` with a fresh id and returns the reply with that id.
    pub async fn request(&mut self, mut msg: Value) -> Value {
        let id = self.next_id.to_string();
        self.next_id += 1;
        msg["id"] = json!(id);
        self.send_raw(msg.to_string()).await;
        loop {
            let r = self
                .recv(Duration::from_secs(15))
                .await
                .expect("reply in time");
            if r["id"] == json!(id) {
                return r;
            }
            self.events.push(r);
        }
    }

    /// Waits for an event of `kind` for `client_id`.
    pub async fn wait_event(&mut self, kind: &str, client_id: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.events.iter().any(|e| {
                e["type"] == "event"
                    && e["event"]["type"] == kind
                    && e["event"]["clientId"] == client_id
            }) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if let Some(m) = self.recv(left).await {
                self.events.push(m);
            }
        }
    }

    pub async fn command(&mut self, body: Value) -> Value {
        self.request(json!({"type":"command","command": body}))
            .await
    }

    pub async fn payload(&mut self, kind: &str, client_id: &str, payload: Value) -> Value {
        self.request(json!({"type":"payload","payload":{"type": kind, "clientId": client_id, "payload": payload}}))
            .await
    }

    pub async fn create_publisher(&mut self, stream: &str) -> String {
        let r = self
            .command(json!({"type":"create-publisher","streamType": stream, "publisherSettings": {"bitrate": 1000000, "mediatypes": 3}}))
            .await;
        r["command"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("publisher id: {r}"))
            .to_string()
    }

    pub async fn create_subscriber(&mut self, publisher: &str, stream: &str) -> String {
        let r = self
            .command(
                json!({"type":"create-subscriber","publisherId": publisher, "streamType": stream}),
            )
            .await;
        r["command"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("subscriber id: {r}"))
            .to_string()
    }
}

/// What a webrtc-rs peer saw.
#[derive(Default)]
pub struct Seen {
    pub connected: bool,
    pub failed: bool,
    pub gathered: bool,
    /// Video RTP as (sequence number, timestamp, payload), each sequence number once.
    pub rtp: Vec<(u16, u32, Vec<u8>)>,
    /// Video packets whose sequence number had been seen already, left out of `rtp`: the
    /// SFU's bandwidth probing pads with RTX resends of sent packets (str0m), and webrtc-rs
    /// hands a repaired packet to the track again under its original sequence number, where a
    /// receiver's jitter buffer would drop it.
    pub video_duplicates: usize,
    video_seqs: std::collections::HashSet<u16>,
    /// Audio RTP payloads.
    pub audio: Vec<Vec<u8>>,
    pub messages: Vec<String>,
}

#[derive(Clone)]
struct Handler {
    seen: Arc<Mutex<Seen>>,
    notify: mpsc::UnboundedSender<()>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.seen.lock().expect("lock").gathered = true;
            let _ = self.notify.send(());
        }
    }
    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let mut s = self.seen.lock().expect("lock");
        match state {
            RTCPeerConnectionState::Connected => s.connected = true,
            RTCPeerConnectionState::Failed => s.failed = true,
            _ => {}
        }
        let _ = self.notify.send(());
    }
    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let seen = self.seen.clone();
        tokio::spawn(async move {
            let audio = track.kind().await == rtc::rtp_transceiver::rtp_sender::RtpCodecKind::Audio;
            while let Some(ev) = track.poll().await {
                if let TrackRemoteEvent::OnRtpPacket(p) = ev {
                    let mut s = seen.lock().expect("lock");
                    if audio {
                        s.audio.push(p.payload.to_vec());
                        continue;
                    }
                    if !s.video_seqs.insert(p.header.sequence_number) {
                        s.video_duplicates += 1;
                        continue;
                    }
                    s.rtp.push((
                        p.header.sequence_number,
                        p.header.timestamp,
                        p.payload.to_vec(),
                    ));
                }
            }
        });
    }
    async fn on_data_channel(&self, dc: Arc<dyn DataChannel>) {
        let seen = self.seen.clone();
        tokio::spawn(async move {
            while let Some(ev) = dc.poll().await {
                match ev {
                    DataChannelEvent::OnMessage(m) => {
                        seen.lock()
                            .expect("lock")
                            .messages
                            .push(String::from_utf8_lossy(&m.data).to_string());
                    }
                    DataChannelEvent::OnClose => break,
                    _ => {}
                }
            }
        });
    }
}

/// A webrtc-rs peer connection on loopback.
pub struct Peer {
    pub pc: Arc<dyn PeerConnection>,
    pub seen: Arc<Mutex<Seen>>,
    notify: mpsc::UnboundedReceiver<()>,
}

impl Peer {
    pub async fn new() -> Peer {
        let mut me = MediaEngine::default();
        me.register_default_codecs().expect("codecs");
        Self::with_engine(me).await
    }

    /// A peer that also negotiates the audio-level header extension (RFC 6464), as browsers
    /// do; its id is in the SDP (`audio_level_ext_id`).
    pub async fn with_audio_level() -> Peer {
        let mut me = MediaEngine::default();
        me.register_default_codecs().expect("codecs");
        me.register_header_extension(
            rtc::rtp_transceiver::rtp_sender::RTCRtpHeaderExtensionCapability {
                uri: AUDIO_LEVEL_URI.to_string(),
            },
            rtc::rtp_transceiver::rtp_sender::RtpCodecKind::Audio,
            None,
        )
        .expect("audio-level extension");
        Self::with_engine(me).await
    }

    async fn with_engine(mut me: MediaEngine) -> Peer {
        let registry =
            register_default_interceptors(Registry::new(), &mut me).expect("interceptors");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (tx, rx) = mpsc::unbounded_channel();
        let pc = PeerConnectionBuilder::new()
            .with_media_engine(me)
            .with_interceptor_registry(registry)
            .with_handler(Arc::new(Handler {
                seen: seen.clone(),
                notify: tx,
            }))
            .with_udp_addrs(vec!["127.0.0.1:0"])
            .build()
            .await
            .expect("peer connection");
        Peer {
            pc: Arc::new(pc),
            seen,
            notify: rx,
        }
    }

    /// A peer whose driver tasks live on `rt`, so that shutting `rt` down makes the client
    /// vanish mid-call (no DTLS close, no more ICE) as a crashed browser would.
    pub async fn new_on(rt: &tokio::runtime::Handle) -> Peer {
        rt.spawn(Peer::new()).await.expect("peer on runtime")
    }

    pub async fn wait(&mut self, what: &str, timeout: Duration, pred: impl Fn(&Seen) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.seen.lock().expect("lock")) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for {what}");
            let _ =
                tokio::time::timeout(left.min(Duration::from_millis(50)), self.notify.recv()).await;
        }
    }

    /// Creates the offer and waits for ICE gathering so the SDP carries the candidates.
    pub async fn offer(&mut self) -> String {
        let offer = self.pc.create_offer(None).await.expect("offer");
        self.pc
            .set_local_description(offer)
            .await
            .expect("set local");
        self.wait("gathering", Duration::from_secs(10), |s| s.gathered)
            .await;
        self.pc
            .local_description()
            .await
            .expect("local description")
            .sdp
    }

    pub async fn answer(&mut self, offer_sdp: &str) -> String {
        self.pc
            .set_remote_description(
                RTCSessionDescription::offer(offer_sdp.to_string()).expect("offer sdp"),
            )
            .await
            .expect("set remote offer");
        let answer = self.pc.create_answer(None).await.expect("answer");
        self.pc
            .set_local_description(answer)
            .await
            .expect("set local");
        self.wait("gathering", Duration::from_secs(10), |s| s.gathered)
            .await;
        self.pc
            .local_description()
            .await
            .expect("local description")
            .sdp
    }

    pub async fn accept_answer(&self, sdp: &str) {
        self.pc
            .set_remote_description(
                RTCSessionDescription::answer(sdp.to_string()).expect("answer sdp"),
            )
            .await
            .expect("set remote answer");
    }
}

/// The audio-level header extension (RFC 6464).
pub const AUDIO_LEVEL_URI: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";

/// The id an SDP gives the audio-level extension, if it has one.
pub fn audio_level_ext_id(sdp: &str) -> Option<u8> {
    sdp.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("a=extmap:")?;
        let (id, uri) = rest.split_once(' ')?;
        (uri.trim() == AUDIO_LEVEL_URI)
            .then(|| id.split('/').next()?.parse().ok())
            .flatten()
    })
}

/// A VP8 track a publisher writes RTP into.
pub fn vp8_track() -> Arc<TrackLocalStaticRTP> {
    use rtc::media_stream::MediaStreamTrack;
    use rtc::rtp_transceiver::rtp_sender::{
        RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
    };
    Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        "talkbox-test".to_string(),
        "video0".to_string(),
        "video0".to_string(),
        RtpCodecKind::Video,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(0x1234_5678),
                ..Default::default()
            },
            codec: RTCRtpCodec {
                mime_type: "video/VP8".to_string(),
                clock_rate: 90000,
                channels: 0,
                sdp_fmtp_line: String::new(),
                rtcp_feedback: vec![],
            },
            ..Default::default()
        }],
    )))
}

/// An Opus track a publisher writes RTP into.
pub fn opus_track() -> Arc<TrackLocalStaticRTP> {
    use rtc::media_stream::MediaStreamTrack;
    use rtc::rtp_transceiver::rtp_sender::{
        RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
    };
    Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        "talkbox-test".to_string(),
        "audio0".to_string(),
        "audio0".to_string(),
        RtpCodecKind::Audio,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(0x0a0d_10ff),
                ..Default::default()
            },
            codec: RTCRtpCodec {
                mime_type: "audio/opus".to_string(),
                clock_rate: 48000,
                channels: 2,
                sdp_fmtp_line: "minptime=10;useinbandfec=1".to_string(),
                rtcp_feedback: vec![],
            },
            ..Default::default()
        }],
    )))
}

/// An Opus RTP packet whose payload is `opus-<i>`.
pub fn audio_packet(i: u32) -> rtc::rtp::Packet {
    rtc::rtp::Packet {
        header: rtc::rtp::Header {
            version: 2,
            payload_type: 111,
            sequence_number: (7000 + i) as u16,
            timestamp: 960 * i,
            ssrc: 0x0a0d_10ff,
            ..Default::default()
        },
        payload: bytes::Bytes::from(format!("opus-{i:06}").into_bytes()),
    }
}

/// An RTP packet whose payload names its index (a VP8 descriptor byte, then "pkt-<i>").
pub fn numbered_packet(i: u32) -> rtc::rtp::Packet {
    let mut payload = vec![0x10u8]; // VP8 payload descriptor: start of partition
    payload.extend_from_slice(format!("pkt-{i:06}").as_bytes());
    rtc::rtp::Packet {
        header: rtc::rtp::Header {
            version: 2,
            marker: true,
            payload_type: 96,
            sequence_number: (1000 + i) as u16,
            timestamp: 3000 * i,
            ssrc: 0x1234_5678,
            ..Default::default()
        },
        payload: bytes::Bytes::from(payload),
    }
}

/// Reads the index back from a forwarded payload.
pub fn packet_index(payload: &[u8]) -> Option<u32> {
    std::str::from_utf8(payload.get(1..)?)
        .ok()?
        .strip_prefix("pkt-")?
        .parse()
        .ok()
}

/// A publisher and a subscriber connected through the SFU, with the publisher's track and
/// data channel.
pub struct Call {
    pub publisher_id: String,
    pub subscriber_id: String,
    pub publisher: Peer,
    pub subscriber: Peer,
    pub track: Arc<TrackLocalStaticRTP>,
    pub audio: Arc<TrackLocalStaticRTP>,
    pub channel: Arc<dyn DataChannel>,
}

pub async fn establish_call(proxy: &mut ProxyClient) -> Call {
    establish_call_on(proxy, &tokio::runtime::Handle::current()).await
}

/// As [`establish_call`], with the peers' drivers on `rt`.
pub async fn establish_call_on(proxy: &mut ProxyClient, rt: &tokio::runtime::Handle) -> Call {
    let publisher_id = proxy.create_publisher("video").await;
    let mut publisher = Peer::new_on(rt).await;
    let track = vp8_track();
    let audio = opus_track();
    publisher
        .pc
        .add_track(audio.clone() as Arc<dyn TrackLocal>)
        .await
        .expect("add audio track");
    publisher
        .pc
        .add_track(track.clone() as Arc<dyn TrackLocal>)
        .await
        .expect("add track");
    let channel = publisher
        .pc
        .create_data_channel("status", None)
        .await
        .expect("data channel");
    let offer = publisher.offer().await;
    let r = proxy
        .payload("offer", &publisher_id, json!({"type":"offer","sdp": offer}))
        .await;
    let answer = r["payload"]["payload"]["sdp"]
        .as_str()
        .unwrap_or_else(|| panic!("answer: {r}"))
        .to_string();
    if std::env::var("SFU_DEBUG_SDP").is_ok() {
        eprintln!("PUBLISHER OFFER\n{offer}\nSFU ANSWER\n{answer}");
    }
    publisher.accept_answer(&answer).await;
    publisher
        .wait("publisher connected", Duration::from_secs(15), |s| {
            s.connected
        })
        .await;

    let subscriber_id = proxy.create_subscriber(&publisher_id, "video").await;
    let r = proxy
        .payload("requestoffer", &subscriber_id, json!({}))
        .await;
    let offer = r["payload"]["payload"]["sdp"]
        .as_str()
        .unwrap_or_else(|| panic!("offer: {r}"))
        .to_string();
    let mut subscriber = Peer::new_on(rt).await;
    let answer = subscriber.answer(&offer).await;
    if std::env::var("SFU_DEBUG_SDP").is_ok() {
        eprintln!("SFU OFFER\n{offer}\nSUBSCRIBER ANSWER\n{answer}");
    }
    let r = proxy
        .payload(
            "answer",
            &subscriber_id,
            json!({"type":"answer","sdp": answer}),
        )
        .await;
    assert_eq!(r["type"], "payload", "{r}");
    subscriber
        .wait("subscriber connected", Duration::from_secs(15), |s| {
            s.connected
        })
        .await;
    Call {
        publisher_id,
        subscriber_id,
        publisher,
        subscriber,
        track,
        audio,
        channel,
    }
}
