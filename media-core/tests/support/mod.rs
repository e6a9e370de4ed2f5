//! A str0m WebRTC client on a loopback UDP socket and a media worker to talk to, for the
//! media-core tests and the fan-out example: exercises the worker without the appliance.

#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use media_core::WorkerHandle;
use media_core::io::{DatagramIo, MmsgSocket, OutDatagram, RecvMeta};
use media_core::session::SessionSetup;
use media_core::tcp::{FrameReader, frame};
use media_core::worker::{self, Reply, WorkerCommand, WorkerConfig, WorkerError, WorkerEvent};
use std::io::{Read, Write};
use str0m::bwe::BweKind;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::format::Codec;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid};
use str0m::net::{Protocol, Receive, TcpType};
use str0m::rtp::{RtpWrite, SeqNo};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

pub struct Worker {
    pub handle: WorkerHandle,
    pub events: mpsc::Receiver<WorkerEvent>,
    join: Option<std::thread::JoinHandle<()>>,
}

/// A socket that loses every `nth` outgoing media-sized datagram (over 500 bytes), to make
/// receivers NACK.
pub struct LossyIo {
    pub inner: MmsgSocket,
    pub nth: usize,
    seen: usize,
}

impl DatagramIo for LossyIo {
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
    fn readiness_fd(&self) -> std::os::fd::RawFd {
        self.inner.readiness_fd()
    }
    fn recv_batch(
        &mut self,
        bufs: &mut [Vec<u8>],
        meta: &mut [RecvMeta],
    ) -> std::io::Result<usize> {
        self.inner.recv_batch(bufs, meta)
    }
    fn send_batch(&mut self, out: &[OutDatagram]) -> std::io::Result<usize> {
        let mut keep = Vec::with_capacity(out.len());
        for d in out {
            if d.data.len() > 500 {
                self.seen += 1;
                if self.seen.is_multiple_of(self.nth) {
                    if std::env::var_os("SHOW_LOSS").is_some() {
                        eprintln!("lost a {}-byte datagram", d.data.len());
                    }
                    continue;
                }
            }
            keep.push(d.clone());
        }
        self.inner.send_batch(&keep)?;
        Ok(out.len())
    }
}

impl Worker {
    pub fn start(ice_timeout: Duration) -> Worker {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let mut io = MmsgSocket::new(sock).expect("mmsg");
        if std::env::var_os("NO_GSO").is_some() {
            io.disable_gso();
        }
        Self::start_on(io, ice_timeout)
    }

    /// A worker whose socket loses every `nth` media datagram it sends.
    pub fn start_lossy(nth: usize) -> Worker {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let inner = MmsgSocket::new(sock).expect("mmsg");
        Self::start_on(
            LossyIo {
                inner,
                nth,
                seen: 0,
            },
            Duration::from_secs(30),
        )
    }

    pub fn start_on<I: DatagramIo + Send + 'static>(io: I, ice_timeout: Duration) -> Worker {
        Self::start_full(io, None, ice_timeout)
    }

    /// A worker that also accepts ICE-TCP on the UDP socket's port.
    pub fn start_with_tcp() -> Worker {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = sock.local_addr().expect("addr").port();
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port)).expect("tcp bind");
        Self::start_full(
            MmsgSocket::new(sock).expect("mmsg"),
            Some(tcp),
            Duration::from_secs(30),
        )
    }

    fn start_full<I: DatagramIo + Send + 'static>(
        io: I,
        tcp: Option<std::net::TcpListener>,
        ice_timeout: Duration,
    ) -> Worker {
        let addr = io.local_addr().expect("addr");
        let mut setup = SessionSetup::new(vec![addr]).expect("setup");
        setup.tcp = tcp.is_some();
        let (tx, rx) = mpsc::channel();
        let (handle, join) = worker::spawn(
            WorkerConfig {
                index: 0,
                core: None,
                setup,
                ice_timeout,
                // As `talkbox sfu` runs it.
                keyframe_interval: Duration::from_millis(500),
                egress_budget: u64::MAX,
                upgrade_hold: Duration::from_secs(2),
            },
            io,
            tcp,
            Box::new(move |e| {
                let _ = tx.send(e);
            }),
        )
        .expect("spawn");
        Worker {
            handle,
            events: rx,
            join: Some(join),
        }
    }

    pub fn ask<T: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<T>) -> WorkerCommand,
    ) -> Result<T, WorkerError> {
        let (tx, rx) = mpsc::channel();
        assert!(self.handle.send(make(Box::new(move |r| {
            let _ = tx.send(r);
        }))));
        rx.recv_timeout(Duration::from_secs(5))
            .expect("worker reply")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.handle.send(WorkerCommand::Shutdown);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// A browser stand-in: str0m in RTP mode, full ICE, on its own socket.
pub struct Client {
    pub rtc: Rtc,
    pub sock: UdpSocket,
    pub addr: SocketAddr,
    pub connected: bool,
    pub rtp: Vec<(u64, u32, Vec<u8>)>,
    pub keyframe_requests: usize,
    /// The rid of every keyframe request received (simulcast publishers).
    pub keyframe_rids: Vec<Option<String>>,
    /// REMB received: (media line, bit/s).
    pub remb: Vec<(Mid, u64)>,
    pub channel: Option<ChannelId>,
    pub channel_open: bool,
    pub messages: Vec<Vec<u8>>,
    /// Datagrams received.
    pub datagrams: usize,
    /// What str0m refused.
    pub errors: Vec<String>,
    /// Media lines, from our own offer or from `MediaAdded`.
    pub mids: Vec<Mid>,
    pending: Option<SdpPendingOffer>,
    buf: Vec<u8>,
    /// ICE-TCP instead of UDP: the connection to the worker and its frame reader.
    tcp: Option<(std::net::TcpStream, FrameReader, SocketAddr)>,
}

impl Client {
    pub fn new() -> Client {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(1)))
            .expect("timeout");
        let addr = sock.local_addr().expect("addr");
        let mut rtc = RtcConfig::new()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .build(Instant::now());
        rtc.add_local_candidate(Candidate::host(addr, "udp").expect("candidate"));
        Client {
            rtc,
            sock,
            addr,
            connected: false,
            rtp: Vec::new(),
            keyframe_requests: 0,
            keyframe_rids: Vec::new(),
            remb: Vec::new(),
            channel: None,
            channel_open: false,
            messages: Vec::new(),
            mids: Vec::new(),
            datagrams: 0,
            errors: Vec::new(),
            pending: None,
            buf: vec![0; 2048],
            tcp: None,
        }
    }

    /// A client that reaches the worker only over ICE-TCP (an active candidate on a TCP
    /// connection it opened to `worker`), as a browser behind a UDP-blocking firewall would.
    pub fn new_tcp(worker: SocketAddr) -> Client {
        let stream = std::net::TcpStream::connect(worker).expect("connect ICE-TCP");
        stream
            .set_read_timeout(Some(Duration::from_millis(1)))
            .expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        let local = stream.local_addr().expect("addr");
        let mut c = Client::new();
        c.rtc = RtcConfig::new()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .build(Instant::now());
        c.rtc.add_local_candidate(
            Candidate::builder()
                .tcp()
                .host(local)
                .tcptype(TcpType::Active)
                .build()
                .expect("tcp candidate"),
        );
        c.addr = local;
        c.tcp = Some((stream, FrameReader::default(), worker));
        c
    }

    /// Publisher side: an offer with one video track and the `status` data channel.
    pub fn publish_offer(&mut self) -> String {
        let mut api = self.rtc.sdp_api();
        let mid = api.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
        self.mids.push(mid);
        self.channel = Some(api.add_channel("status".into()));
        let (offer, pending) = api.apply().expect("changes");
        self.pending = Some(pending);
        offer.to_sdp_string()
    }

    /// Publisher side: an offer with one audio and one video track and the `status` data
    /// channel, as Talk's camera publisher sends.
    pub fn publish_offer_with_audio(&mut self) -> String {
        let mut api = self.rtc.sdp_api();
        let audio = api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
        let video = api.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
        self.mids.push(audio);
        self.mids.push(video);
        self.channel = Some(api.add_channel("status".into()));
        let (offer, pending) = api.apply().expect("changes");
        self.pending = Some(pending);
        offer.to_sdp_string()
    }

    /// Writes one Opus packet on `mid` with the audio-level extension at `dbov` (0 loudest,
    /// 127 silence).
    pub fn write_audio(&mut self, mid: Mid, seq: u64, ts: u32, dbov: u8) {
        let pt = self
            .rtc
            .codec_config()
            .params()
            .iter()
            .find(|p| p.spec().codec == Codec::Opus)
            .map(|p| p.pt())
            .expect("opus");
        let ext = str0m::rtp::ExtensionValues {
            audio_level: Some(-(dbov.min(127) as i8)),
            voice_activity: Some(dbov < 60),
            ..Default::default()
        };
        let mut api = self.rtc.direct_api();
        let tx = api.stream_tx_by_mid(mid, None).expect("send stream");
        tx.write_rtp(
            RtpWrite::new(
                pt,
                SeqNo::from(seq),
                ts,
                Instant::now(),
                vec![0xf8, 0xff, 0xfe],
            )
            .ext_vals(ext),
        );
    }

    /// Publisher side: an offer with one video track sent as simulcast with `rids` (in this
    /// order in `a=simulcast`) and the `status` data channel.
    pub fn publish_simulcast_offer(&mut self, rids: &[&str]) -> String {
        let mut sim = str0m::media::Simulcast::new();
        for r in rids {
            sim.add_send_layer(str0m::media::SimulcastLayer::new(r));
        }
        let mut api = self.rtc.sdp_api();
        let mid = api.add_media(MediaKind::Video, Direction::SendOnly, None, None, Some(sim));
        self.mids.push(mid);
        self.channel = Some(api.add_channel("status".into()));
        let (offer, pending) = api.apply().expect("changes");
        self.pending = Some(pending);
        offer.to_sdp_string()
    }

    /// Writes one RTP packet on layer `rid` of a simulcast video track.
    pub fn write_rtp_rid(&mut self, mid: Mid, rid: &str, seq: u64, ts: u32, payload: &[u8]) {
        let pt = self
            .rtc
            .codec_config()
            .params()
            .iter()
            .find(|p| p.spec().codec == Codec::Vp8)
            .map(|p| p.pt())
            .expect("vp8");
        let mut api = self.rtc.direct_api();
        let tx = api
            .stream_tx_by_mid(mid, Some(rid.into()))
            .expect("send stream of the layer");
        tx.write_rtp(
            RtpWrite::new(pt, SeqNo::from(seq), ts, Instant::now(), payload.to_vec())
                .marker(true)
                .nackable(true),
        );
    }

    pub fn accept_answer(&mut self, sdp: &str) {
        let answer = SdpAnswer::from_sdp_string(sdp).expect("answer");
        let pending = self.pending.take().expect("pending offer");
        self.rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .expect("accept answer");
    }

    pub fn answer(&mut self, sdp: &str) -> String {
        let offer = SdpOffer::from_sdp_string(sdp).expect("offer");
        self.rtc
            .sdp_api()
            .accept_offer(offer)
            .expect("accept offer")
            .to_sdp_string()
    }

    /// Sends what is due and records events. str0m wants this after every input: in RTP mode
    /// it holds one received packet per stream until polled.
    fn poll(&mut self) {
        loop {
            match self.rtc.poll_output().expect("poll") {
                Output::Timeout(_) => break,
                Output::Transmit(t) => {
                    if let Some((stream, _, _)) = &mut self.tcp {
                        let mut framed = Vec::new();
                        if t.proto == Protocol::Tcp && frame(&t.contents, &mut framed) {
                            let _ = stream.write_all(&framed);
                        }
                    } else {
                        let _ = self.sock.send_to(&t.contents, t.destination);
                    }
                }
                Output::Event(e) => match e {
                    Event::Connected => self.connected = true,
                    Event::MediaAdded(m) if !self.mids.contains(&m.mid) => self.mids.push(m.mid),
                    Event::RtpPacket(p) => {
                        self.rtp
                            .push((*p.seq_no, p.header.timestamp, p.payload.to_vec()))
                    }
                    Event::KeyframeRequest(k) => {
                        self.keyframe_requests += 1;
                        self.keyframe_rids.push(k.rid.map(|r| r.to_string()));
                    }
                    Event::EgressBitrateEstimate(BweKind::Remb { estimate, mid }) => {
                        self.remb.push((mid, estimate.as_u64()))
                    }
                    Event::ChannelOpen(id, _) => {
                        self.channel = Some(id);
                        self.channel_open = true;
                    }
                    Event::ChannelData(d) => self.messages.push(d.data),
                    _ => {}
                },
            }
        }
    }

    /// Sends what is due, reads what has arrived (up to 256 datagrams, polling after each),
    /// advances time; returns how many datagrams were read.
    pub fn step(&mut self) -> usize {
        self.poll();
        let mut read = 0;
        if self.tcp.is_some() {
            let mut frames = Vec::new();
            let mut peer = self.addr;
            if let Some((stream, reader, worker)) = &mut self.tcp {
                peer = *worker;
                if let Ok(n) = stream.read(&mut self.buf)
                    && n > 0
                {
                    reader.push(&self.buf[..n]);
                    while let Some(f) = reader.next_frame() {
                        frames.push(f.to_vec());
                    }
                }
            }
            for f in frames {
                read += 1;
                self.datagrams += 1;
                if let Ok(r) = Receive::new(Protocol::Tcp, peer, self.addr, &f)
                    && let Err(e) = self.rtc.handle_input(Input::Receive(Instant::now(), r))
                {
                    self.errors.push(e.to_string());
                }
                self.poll();
            }
        }
        while self.tcp.is_none() && read < 256 {
            let Ok((n, source)) = self.sock.recv_from(&mut self.buf) else {
                break;
            };
            read += 1;
            self.datagrams += 1;
            if let Ok(r) = Receive::new(Protocol::Udp, source, self.addr, &self.buf[..n])
                && let Err(e) = self.rtc.handle_input(Input::Receive(Instant::now(), r))
            {
                self.errors.push(e.to_string());
            }
            self.poll();
        }
        let _ = self.rtc.handle_input(Input::Timeout(Instant::now()));
        self.poll();
        read
    }

    /// Writes one RTP packet on the first video track.
    pub fn write_rtp(&mut self, mid: Mid, seq: u64, ts: u32, payload: &[u8]) {
        let pt = self
            .rtc
            .codec_config()
            .params()
            .iter()
            .find(|p| p.spec().codec == Codec::Vp8)
            .map(|p| p.pt())
            .expect("vp8");
        let mut api = self.rtc.direct_api();
        let tx = api.stream_tx_by_mid(mid, None).expect("send stream");
        tx.write_rtp(
            RtpWrite::new(pt, SeqNo::from(seq), ts, Instant::now(), payload.to_vec())
                .marker(true)
                .nackable(true),
        );
    }

    pub fn request_keyframe(&mut self, mid: Mid) {
        let mut api = self.rtc.direct_api();
        if let Some(rx) = api.stream_rx_by_mid(mid, None) {
            rx.request_keyframe(KeyframeRequestKind::Pli);
        }
    }

    pub fn send_message(&mut self, text: &str) -> bool {
        let Some(id) = self.channel else { return false };
        self.rtc
            .channel(id)
            .is_some_and(|mut c| c.write(false, text.as_bytes()).unwrap_or(false))
    }
}

/// Steps every client until `done` holds or `timeout` passes; returns whether it held.
pub fn run_until(
    clients: &mut [&mut Client],
    timeout: Duration,
    mut done: impl FnMut(&[&mut Client]) -> bool,
) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        let mut read = 0;
        for c in clients.iter_mut() {
            read += c.step();
        }
        if done(clients) {
            return true;
        }
        if read == 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    false
}

/// A single-video publisher `session`, connected with its data channel open.
pub fn connect_publisher(w: &Worker, session: u32) -> Client {
    let mut p = Client::new();
    w.ask(|reply| WorkerCommand::CreatePublisher {
        session,
        stream_type: media_core::session::StreamType::Video,
        reply,
    })
    .expect("create publisher");
    let offer = p.publish_offer();
    let answer = w
        .ask(|reply| WorkerCommand::Offer {
            session,
            sdp: offer,
            reply,
        })
        .expect("answer");
    p.accept_answer(&answer);
    assert!(run_until(&mut [&mut p], Duration::from_secs(10), |c| c[0]
        .connected
        && c[0].channel_open));
    p
}

/// A simulcast publisher `session` sending `rids`, connected with its data channel open;
/// also the worker's answer.
pub fn connect_simulcast_publisher(w: &Worker, session: u32, rids: &[&str]) -> (Client, String) {
    let mut p = Client::new();
    w.ask(|reply| WorkerCommand::CreatePublisher {
        session,
        stream_type: media_core::session::StreamType::Video,
        reply,
    })
    .expect("create publisher");
    let offer = p.publish_simulcast_offer(rids);
    let answer = w
        .ask(|reply| WorkerCommand::Offer {
            session,
            sdp: offer,
            reply,
        })
        .expect("answer");
    p.accept_answer(&answer);
    assert!(run_until(&mut [&mut p], Duration::from_secs(10), |c| c[0]
        .connected
        && c[0].channel_open));
    (p, answer)
}

/// A subscriber `session` of `publisher`, connected (stepping `others` meanwhile).
pub fn connect_subscriber(w: &Worker, session: u32, publisher: u32, others: &mut Client) -> Client {
    connect_bounded_subscriber(w, session, publisher, None, others).0
}

/// As [`connect_subscriber`], with the `selectStream` layer bound `max_layer` set before the
/// offer (none: no `selectStream`); also the worker's offer.
pub fn connect_bounded_subscriber(
    w: &Worker,
    session: u32,
    publisher: u32,
    max_layer: Option<usize>,
    others: &mut Client,
) -> (Client, String) {
    let mut s = Client::new();
    w.ask(|reply| WorkerCommand::CreateSubscriber {
        session,
        publisher,
        reply,
    })
    .expect("create subscriber");
    if max_layer.is_some() {
        w.ask(|reply| WorkerCommand::SelectStream {
            session,
            max_layer,
            max_temporal: None,
            reply,
        })
        .expect("select stream");
    }
    let offer = w
        .ask(|reply| WorkerCommand::RequestOffer { session, reply })
        .expect("offer");
    let answer = s.answer(&offer);
    w.ask(|reply| WorkerCommand::Answer {
        session,
        sdp: answer,
        reply,
    })
    .expect("answer accepted");
    assert!(run_until(
        &mut [&mut s, others],
        Duration::from_secs(10),
        |c| c[0].connected && c[0].channel_open
    ));
    (s, offer)
}
