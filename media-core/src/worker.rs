//! A media worker: one thread, pinned to a core, owning one UDP socket, its sessions, a timer
//! queue and the forwarding table of the publishers placed on it.
//!
//! The control plane talks to it only through [`WorkerHandle`] (commands over a channel plus an
//! eventfd wake-up) and hears back through the event callback given at spawn. Inside, the loop
//! is: wait for the socket, the eventfd or the next timer; run commands; receive a batch and
//! demultiplex it (4-tuple map first, then the ufrag in a STUN binding request; anything else
//! is dropped and counted); fire due timers; forward what publishers produced; send a batch.
//! A panic inside one session (str0m fails fast by policy) closes that session only.
//!
//! ICE-TCP (passive, RFC 6544) runs on an optional listener on the same port: a connection's
//! first RFC 4571 frame must be a binding request naming a session, after which the
//! connection carries that session's packets.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::io;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use str0m::bwe::{Bitrate, BweKind};
use str0m::format::Codec;
use str0m::media::{KeyframeRequestKind, MediaKind, Mid, Rid, Rids};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{RtpPacket, RtpWrite, SeqNo};
use str0m::{Event, IceConnectionState, Input, Output};

use crate::allocator::{self, Hysteresis, Limits};
use crate::demux::{self, SessionKey};
use crate::forward::KeyframeThrottle;
use crate::io::{BATCH, DatagramIo, OutDatagram, RecvMeta};
use crate::layers::{self, Bps, Decision, LayerRates, VideoCodec};
use crate::pause::{LayerPause, pause_remb};
use crate::publisher_limit::{self, RembSchedule, add_bandwidth_lines};
use crate::session::{self, PublishedTrack, Role, Session, SessionError, SessionSetup, StreamType};
use crate::speaker::{Speakers, dbov};
use crate::tcp::{FrameReader, frame};
use crate::temporal::{TemporalDecision, TemporalRates};

/// A reply to a command, called once from the worker thread.
pub type Reply<T> = Box<dyn FnOnce(Result<T, WorkerError>) + Send>;

/// Why a command failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum WorkerError {
    #[error("no such session")]
    UnknownSession,
    #[error("a session with this number exists")]
    SessionExists,
    #[error("no such publisher")]
    UnknownPublisher,
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("the session failed and was closed")]
    SessionFailed,
}

/// What the control plane asks of a worker. Session numbers are chosen by the control plane
/// and are unique per worker.
pub enum WorkerCommand {
    CreatePublisher {
        session: u32,
        stream_type: StreamType,
        reply: Reply<()>,
    },
    CreateSubscriber {
        session: u32,
        publisher: u32,
        reply: Reply<()>,
    },
    /// Publisher: the client's offer; replies with our answer.
    Offer {
        session: u32,
        sdp: String,
        reply: Reply<String>,
    },
    /// Subscriber: replies with our offer.
    RequestOffer {
        session: u32,
        reply: Reply<String>,
    },
    /// Subscriber: the client's answer.
    Answer {
        session: u32,
        sdp: String,
        reply: Reply<()>,
    },
    Candidate {
        session: u32,
        candidate: String,
        reply: Reply<()>,
    },
    Close {
        session: u32,
        reply: Reply<()>,
    },
    /// Subscriber: the client's `selectStream` choice, the highest simulcast layer (0 =
    /// lowest) and the highest VP8 temporal layer it wants of the video it receives; `None`
    /// lifts a bound.
    SelectStream {
        session: u32,
        max_layer: Option<usize>,
        max_temporal: Option<u8>,
        reply: Reply<()>,
    },
    /// The egress budget of this worker changed (sizing): the allocator plans within it.
    SetEgressBudget {
        bps: Bps,
    },
    /// Publisher: caps what it may send at `bitrate` bit/s (0: no cap). Sent before its offer,
    /// so the answer carries the cap as `b=AS`; REMB repeats it while it sends
    /// (`publisher_limit`).
    LimitPublisher {
        session: u32,
        bitrate: u64,
        reply: Reply<()>,
    },
    Stats {
        reply: Reply<WorkerStats>,
    },
    Shutdown,
}

/// What a worker tells the control plane on its own initiative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerEvent {
    /// A session ended without being asked to (ICE timeout, DTLS failure, its publisher left).
    SessionClosed {
        key: SessionKey,
        reason: &'static str,
    },
    /// A publisher started (`true`) or stopped speaking, by the audio-level extension of its
    /// packets (`speaker`).
    Speaking { key: SessionKey, speaking: bool },
}

/// Counters of one worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    pub sessions: usize,
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub dropped_unknown: u64,
    pub dropped_send: u64,
    pub rtp_forwarded: u64,
    pub channel_messages_forwarded: u64,
    pub session_panics: u64,
    /// Simulcast layer switches done for subscribers (first layer included).
    pub layer_switches: u64,
    /// VP8 packets not forwarded to a subscriber because of their temporal layer.
    pub temporal_dropped: u64,
    /// Of `sessions`, the publishers and the subscribers (filled when asked).
    pub publishers: usize,
    pub subscribers: usize,
    /// Simulcast layers paused at their publishers now, over all publisher video tracks
    /// (`pause`; filled when asked).
    pub paused_layers: usize,
    /// The egress budget the allocator plans within, bit/s (`Bps::MAX`: none known).
    pub egress_budget: Bps,
}

/// How a worker runs.
#[derive(Clone)]
pub struct WorkerConfig {
    pub index: u16,
    /// Core to pin the thread to, if any.
    pub core: Option<usize>,
    pub setup: SessionSetup,
    /// A session that receives nothing for this long is closed (covers clients that vanish
    /// before or after connecting).
    pub ice_timeout: Duration,
    /// Least time between keyframe requests to one publisher stream.
    pub keyframe_interval: Duration,
    /// Egress budget of this worker for the allocator (all its subscribers together).
    pub egress_budget: Bps,
    /// How long a higher layer must fit before a subscriber is moved up to it.
    pub upgrade_hold: Duration,
}

struct Wake(OwnedFd);

impl Wake {
    fn new() -> io::Result<Wake> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        Ok(Wake(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
    fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
    fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our non-blocking eventfd.
        unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

/// The control plane's end of a worker.
#[derive(Clone)]
pub struct WorkerHandle {
    pub index: u16,
    pub local_addr: SocketAddr,
    tx: mpsc::Sender<WorkerCommand>,
    wake: Arc<Wake>,
    load: Arc<AtomicU64>,
}

impl WorkerHandle {
    /// Sends a command; false if the worker has stopped.
    pub fn send(&self, cmd: WorkerCommand) -> bool {
        let ok = self.tx.send(cmd).is_ok();
        self.wake.ring();
        ok
    }
    /// Number of sessions on the worker (for placement).
    pub fn load(&self) -> u64 {
        self.load.load(Ordering::Relaxed)
    }
}

/// Most ICE-TCP connections one worker holds.
const MAX_TCP_CONNECTIONS: usize = 4096;
/// Most bytes queued towards one ICE-TCP peer before its packets are dropped.
const MAX_TCP_BACKLOG: usize = 1 << 20;
/// How long a TCP connection may stay without naming a session.
const TCP_UNBOUND_TIMEOUT: Duration = Duration::from_secs(10);

/// One accepted ICE-TCP connection.
struct TcpConn {
    stream: TcpStream,
    reader: FrameReader,
    out: Vec<u8>,
    session: Option<u32>,
    since: Instant,
}

/// Starts a worker thread on `io` (and `tcp`, a listener for passive ICE-TCP on the same
/// port, if given); `events` is called from that thread.
pub fn spawn<I: DatagramIo + Send + 'static>(
    config: WorkerConfig,
    io: I,
    tcp: Option<TcpListener>,
    events: Box<dyn Fn(WorkerEvent) + Send>,
) -> io::Result<(WorkerHandle, JoinHandle<()>)> {
    if let Some(l) = &tcp {
        l.set_nonblocking(true)?;
    }
    let (tx, rx) = mpsc::channel();
    let wake = Arc::new(Wake::new()?);
    let load = Arc::new(AtomicU64::new(0));
    let local_addr = io.local_addr()?;
    let handle = WorkerHandle {
        index: config.index,
        local_addr,
        tx,
        wake: wake.clone(),
        load: load.clone(),
    };
    let name = format!("media-worker-{}", config.index);
    let join = std::thread::Builder::new().name(name).spawn(move || {
        if let Some(core) = config.core {
            pin_to_core(core);
        }
        let mut w = Worker::new(config, io, rx, wake, load, events);
        w.tcp = tcp;
        w.run();
    })?;
    Ok((handle, join))
}

fn pin_to_core(core: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(core).is_ok()
        && let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
    {
        tracing::warn!(core, error = %e, "could not pin media worker");
    }
}

struct Worker<I> {
    config: WorkerConfig,
    io: I,
    local_addr: SocketAddr,
    rx: mpsc::Receiver<WorkerCommand>,
    wake: Arc<Wake>,
    load: Arc<AtomicU64>,
    events: Box<dyn Fn(WorkerEvent) + Send>,
    sessions: HashMap<u32, Session>,
    by_addr: HashMap<SocketAddr, u32>,
    /// publisher → subscribers.
    routes: HashMap<u32, Vec<u32>>,
    /// (publisher, mid, simulcast rid) → throttle.
    keyframes: HashMap<(u32, Mid, Option<Rid>), KeyframeThrottle>,
    /// (publisher, mid) → its simulcast layers and their received rates.
    pub_layers: HashMap<(u32, Mid), PubLayers>,
    /// Holds layer upgrades back (allocator).
    hysteresis: Hysteresis,
    /// Earliest time a deferred keyframe request comes due, if any is deferred.
    keyframe_due: Option<Instant>,
    /// Bitrate caps of publishers and when each gets its next REMB.
    limits: HashMap<u32, RembSchedule>,
    /// Who of the publishers speaks.
    speakers: Speakers,
    timers: BinaryHeap<Reverse<(Instant, u32)>>,
    tcp: Option<TcpListener>,
    /// ICE-TCP connections by peer address.
    conns: HashMap<SocketAddr, TcpConn>,
    /// Sessions written to (forwarded media, messages, keyframe requests) whose output is
    /// polled once per loop turn rather than once per packet.
    dirty: HashSet<u32>,
    out: Vec<OutDatagram>,
    stats: WorkerStats,
    seed: u64,
    stop: bool,
}

/// What a session produced that concerns others.
enum Produced {
    Rtp(Box<RtpPacket>),
    ChannelOpen(str0m::channel::ChannelId, String),
    ChannelData(bool, Vec<u8>),
    KeyframeRequest(Mid, KeyframeRequestKind),
    Estimate(BweKind),
    /// A stats report of one outgoing stream: mid, cumulative counters, RR fraction lost.
    EgressStats(Mid, crate::loss::Counters, Option<f32>),
    MediaAdded(Mid, MediaKind),
    Connected,
    Closed(&'static str),
}

impl<I: DatagramIo> Worker<I> {
    fn new(
        config: WorkerConfig,
        io: I,
        rx: mpsc::Receiver<WorkerCommand>,
        wake: Arc<Wake>,
        load: Arc<AtomicU64>,
        events: Box<dyn Fn(WorkerEvent) + Send>,
    ) -> Self {
        let local_addr = io
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let hysteresis = Hysteresis::new(config.upgrade_hold);
        let seed = Instant::now().elapsed().as_nanos() as u64
            ^ (u64::from(config.index) << 48)
            ^ std::process::id() as u64;
        Self {
            config,
            io,
            local_addr,
            rx,
            wake,
            load,
            events,
            sessions: HashMap::new(),
            by_addr: HashMap::new(),
            routes: HashMap::new(),
            keyframes: HashMap::new(),
            pub_layers: HashMap::new(),
            hysteresis,
            keyframe_due: None,
            limits: HashMap::new(),
            speakers: Speakers::default(),
            timers: BinaryHeap::new(),
            tcp: None,
            conns: HashMap::new(),
            dirty: HashSet::new(),
            out: Vec::with_capacity(256),
            stats: WorkerStats::default(),
            seed: seed | 1,
            stop: false,
        }
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: numbering starts and ufrag salts, not secrets.
        self.seed ^= self.seed >> 12;
        self.seed ^= self.seed << 25;
        self.seed ^= self.seed >> 27;
        self.seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn run(&mut self) {
        let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); BATCH];
        let mut meta = vec![
            RecvMeta {
                len: 0,
                source: self.local_addr
            };
            BATCH
        ];
        // The socket, eventfd and ICE-TCP listener are registered once; plain poll(2) is the
        // fallback when epoll is unavailable and the path while ICE-TCP connections exist.
        let mut fixed = vec![(self.io.readiness_fd(), 0), (self.wake.0.as_raw_fd(), 1)];
        if let Some(l) = &self.tcp {
            fixed.push((l.as_raw_fd(), 2));
        }
        let epoll = match crate::io::Epoll::new(&fixed) {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::warn!(error = %e, "media worker: epoll unavailable, using poll(2)");
                None
            }
        };
        let mut housekeeping = Instant::now();
        while !self.stop {
            let now = Instant::now();
            let next = self
                .timers
                .peek()
                .map(|Reverse((t, _))| *t)
                .unwrap_or(now + Duration::from_millis(200))
                .min(housekeeping + Duration::from_millis(250))
                .min(
                    self.keyframe_due
                        .unwrap_or(now + Duration::from_millis(250)),
                );
            // Rounded up: rounded down, a deadline less than 1 ms away gave a zero timeout and
            // the loop spun (poll, clock read, nothing due) until it passed.
            let wait_us = next.saturating_duration_since(now).as_micros();
            let wait_ms = wait_us.div_ceil(1000).min(250) as i32;
            let ready = self.wait(epoll.as_ref(), wait_ms);
            let (readable, woken) = (ready.udp, ready.wake);
            if woken {
                self.wake.drain();
                while let Ok(cmd) = self.rx.try_recv() {
                    self.command(cmd);
                }
                self.drain_dirty(Instant::now());
            }
            // Receive until the socket is empty, but flush between batches.
            for _ in 0..if readable { 8 } else { 0 } {
                let n = match self.io.recv_batch(&mut bufs, &mut meta) {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(error = %e, "media socket receive failed");
                        0
                    }
                };
                let now = Instant::now();
                for i in 0..n {
                    let m = meta[i];
                    self.datagram(&bufs[i][..m.len], m.source, now);
                }
                self.drain_dirty(now);
                self.flush();
                if n < BATCH {
                    break;
                }
            }
            if ready.listener {
                self.accept_tcp(Instant::now());
            }
            for peer in ready.conns {
                self.read_tcp(peer, Instant::now());
            }
            self.drain_dirty(Instant::now());
            let now = Instant::now();
            self.fire_timers(now);
            if self.keyframe_due.is_some_and(|t| t <= now) {
                self.send_due_keyframe_requests(now);
            }
            if now >= housekeeping + Duration::from_millis(250) {
                housekeeping = now;
                self.housekeeping(now);
            }
            self.drain_dirty(now);
            self.flush();
        }
    }

    /// Waits for the sockets, the wake-up eventfd or the timeout; returns which were ready.
    fn wait(&self, epoll: Option<&crate::io::Epoll>, timeout_ms: i32) -> Ready {
        if let Some(ep) = epoll
            && self.conns.is_empty()
        {
            return match ep.wait(timeout_ms.max(0)) {
                Ok(set) => Ready {
                    udp: set & 1 != 0,
                    wake: set & 2 != 0,
                    listener: set & 4 != 0,
                    conns: Vec::new(),
                },
                // EINTR and friends: look at everything once.
                Err(_) => Ready {
                    udp: true,
                    wake: true,
                    listener: self.tcp.is_some(),
                    conns: Vec::new(),
                },
            };
        }
        let pollfd = |fd, events| libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let mut fds = vec![
            pollfd(self.io.readiness_fd(), libc::POLLIN),
            pollfd(self.wake.0.as_raw_fd(), libc::POLLIN),
        ];
        if let Some(l) = &self.tcp {
            fds.push(pollfd(l.as_raw_fd(), libc::POLLIN));
        }
        let peers: Vec<SocketAddr> = self.conns.keys().copied().collect();
        for p in &peers {
            if let Some(c) = self.conns.get(p) {
                let mut ev = libc::POLLIN;
                if !c.out.is_empty() {
                    ev |= libc::POLLOUT;
                }
                fds.push(pollfd(c.stream.as_raw_fd(), ev));
            }
        }
        // SAFETY: poll reads and writes the live pollfd entries of `fds`.
        let r = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                timeout_ms.max(0),
            )
        };
        if r < 0 {
            // EINTR and friends: look at everything once.
            return Ready {
                udp: true,
                wake: true,
                listener: self.tcp.is_some(),
                conns: peers,
            };
        }
        let first_conn = if self.tcp.is_some() { 3 } else { 2 };
        Ready {
            udp: fds[0].revents != 0,
            wake: fds[1].revents != 0,
            listener: self.tcp.is_some() && fds[2].revents != 0,
            conns: peers
                .into_iter()
                .enumerate()
                .filter(|(i, _)| fds.get(first_conn + i).is_some_and(|f| f.revents != 0))
                .map(|(_, p)| p)
                .collect(),
        }
    }

    fn accept_tcp(&mut self, now: Instant) {
        let Some(l) = &self.tcp else {
            return;
        };
        loop {
            match l.accept() {
                Ok((stream, peer)) => {
                    if self.conns.len() >= MAX_TCP_CONNECTIONS
                        || stream.set_nonblocking(true).is_err()
                    {
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    self.conns.insert(
                        peer,
                        TcpConn {
                            stream,
                            reader: FrameReader::default(),
                            out: Vec::new(),
                            session: None,
                            since: now,
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "ICE-TCP accept failed");
                    return;
                }
            }
        }
    }

    /// Reads what a TCP peer sent and feeds its whole packets to the session.
    fn read_tcp(&mut self, peer: SocketAddr, now: Instant) {
        let mut buf = [0u8; 16 * 1024];
        let mut frames: Vec<Vec<u8>> = Vec::new();
        let mut broken = false;
        {
            let Some(c) = self.conns.get_mut(&peer) else {
                return;
            };
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        broken = true;
                        break;
                    }
                    Ok(n) => {
                        c.reader.push(&buf[..n]);
                        while let Some(f) = c.reader.next_frame() {
                            frames.push(f.to_vec());
                        }
                        if c.reader.buffered() > 2 * crate::tcp::MAX_FRAME {
                            broken = true;
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        broken = true;
                        break;
                    }
                }
            }
            // Write what is queued while we are here.
            flush_tcp(c);
        }
        for f in frames {
            self.tcp_packet(peer, &f, now);
        }
        if broken {
            self.conns.remove(&peer);
        }
    }

    fn tcp_packet(&mut self, peer: SocketAddr, buf: &[u8], now: Instant) {
        self.stats.datagrams_in += 1;
        let bound = self.conns.get(&peer).and_then(|c| c.session);
        let (session, from_stun) = match bound {
            Some(s) => (s, false),
            None => match self.session_named_by(buf) {
                Some(s) => (s, true),
                None => {
                    self.stats.dropped_unknown += 1;
                    return;
                }
            },
        };
        let destination = self.destination_for(peer);
        let Ok(input) = Receive::new(Protocol::Tcp, peer, destination, buf) else {
            self.stats.dropped_unknown += 1;
            return;
        };
        if self.feed(session, input, now) && from_stun {
            let answered = self.conns.get(&peer).is_some_and(|c| !c.out.is_empty());
            if answered && let Some(c) = self.conns.get_mut(&peer) {
                c.session = Some(session);
            }
        }
    }

    fn flush(&mut self) {
        for c in self.conns.values_mut() {
            if !c.out.is_empty() {
                flush_tcp(c);
            }
        }
        if self.out.is_empty() {
            return;
        }
        let n = self.io.send_batch(&self.out).unwrap_or(0);
        self.stats.datagrams_out += n as u64;
        self.stats.dropped_send += (self.out.len() - n) as u64;
        self.out.clear();
    }

    fn key(&self, session: u32) -> SessionKey {
        SessionKey {
            worker: self.config.index,
            session,
        }
    }

    fn new_credentials(&mut self, session: u32) -> (String, String) {
        let salt = self.random() as u16;
        let ufrag = demux::ufrag_for(self.key(session), salt);
        let pass = format!("{:016x}{:016x}", self.random(), self.random());
        (ufrag, pass)
    }

    fn command(&mut self, cmd: WorkerCommand) {
        let now = Instant::now();
        match cmd {
            WorkerCommand::CreatePublisher {
                session,
                stream_type,
                reply,
            } => {
                if self.sessions.contains_key(&session) {
                    return reply(Err(WorkerError::SessionExists));
                }
                let (ufrag, pass) = self.new_credentials(session);
                let s = Session::new_publisher(
                    self.key(session),
                    ufrag,
                    &pass,
                    stream_type,
                    &self.config.setup,
                    now,
                );
                self.sessions.insert(session, s);
                self.routes.insert(session, Vec::new());
                self.update_load();
                reply(Ok(()))
            }
            WorkerCommand::CreateSubscriber {
                session,
                publisher,
                reply,
            } => {
                if self.sessions.contains_key(&session) {
                    return reply(Err(WorkerError::SessionExists));
                }
                if !self
                    .sessions
                    .get(&publisher)
                    .is_some_and(|p| p.is_publisher())
                {
                    return reply(Err(WorkerError::UnknownPublisher));
                }
                let (ufrag, pass) = self.new_credentials(session);
                let s = Session::new_subscriber(
                    self.key(session),
                    ufrag,
                    &pass,
                    publisher,
                    &self.config.setup,
                    now,
                );
                self.sessions.insert(session, s);
                self.routes.entry(publisher).or_default().push(session);
                self.update_load();
                reply(Ok(()))
            }
            WorkerCommand::Offer {
                session,
                sdp,
                reply,
            } => {
                let r = self.with_session(session, now, |s| s.accept_offer(&sdp));
                let r = match self.limits.get_mut(&session) {
                    Some(l) => {
                        // A new negotiation may bring new streams: REMB them at once.
                        l.reset();
                        l.set_layers(publisher_limit::simulcast_layers(&sdp));
                        r.map(|answer| add_bandwidth_lines(&answer, l.bitrate))
                    }
                    None => r,
                };
                reply(r)
            }
            WorkerCommand::LimitPublisher {
                session,
                bitrate,
                reply,
            } => match self.sessions.get(&session) {
                Some(s) if s.is_publisher() => {
                    if bitrate == 0 {
                        self.limits.remove(&session);
                    } else {
                        self.limits.insert(session, RembSchedule::new(bitrate));
                    }
                    reply(Ok(()))
                }
                Some(_) => reply(Err(WorkerError::Session(SessionError::WrongRole(
                    "publisher",
                )))),
                None => reply(Err(WorkerError::UnknownSession)),
            },
            WorkerCommand::RequestOffer { session, reply } => {
                let Some(publisher) = self.sessions.get(&session).and_then(|s| match &s.role {
                    Role::Subscriber { publisher, .. } => Some(*publisher),
                    Role::Publisher { .. } => None,
                }) else {
                    return reply(Err(if self.sessions.contains_key(&session) {
                        WorkerError::Session(SessionError::WrongRole("subscriber"))
                    } else {
                        WorkerError::UnknownSession
                    }));
                };
                let (tracks, label) = match self.sessions.get(&publisher).map(|p| &p.role) {
                    Some(Role::Publisher {
                        tracks, channel, ..
                    }) => (
                        tracks.clone(),
                        channel
                            .as_ref()
                            .map(|(_, l)| l.clone())
                            .unwrap_or_else(|| "status".to_string()),
                    ),
                    _ => return reply(Err(WorkerError::UnknownPublisher)),
                };
                let starts: Vec<(u16, u32)> = (0..tracks.len())
                    .map(|_| {
                        let r = self.random();
                        ((r as u16) & 0x7fff, (r >> 32) as u32)
                    })
                    .collect();
                let mut i = 0;
                let r = self.with_session(session, now, |s| {
                    s.create_offer(&tracks, &label, || {
                        let v = starts.get(i).copied().unwrap_or((1, 0));
                        i += 1;
                        v
                    })
                });
                reply(r)
            }
            WorkerCommand::Answer {
                session,
                sdp,
                reply,
            } => {
                let r = self.with_session(session, now, |s| s.accept_answer(&sdp));
                reply(r)
            }
            WorkerCommand::Candidate {
                session,
                candidate,
                reply,
            } => {
                let r = self.with_session(session, now, |s| s.add_remote_candidate(&candidate));
                reply(r)
            }
            WorkerCommand::Close { session, reply } => {
                if self.sessions.contains_key(&session) {
                    self.close(session, None);
                    reply(Ok(()))
                } else {
                    reply(Err(WorkerError::UnknownSession))
                }
            }
            WorkerCommand::SelectStream {
                session,
                max_layer,
                max_temporal,
                reply,
            } => match self.sessions.get_mut(&session).map(|s| &mut s.role) {
                Some(Role::Subscriber {
                    max_layer: m,
                    max_temporal: t,
                    ..
                }) => {
                    *m = max_layer;
                    *t = max_temporal;
                    self.reallocate(now);
                    self.request_pending_keyframes(session, now, true);
                    reply(Ok(()))
                }
                Some(Role::Publisher { .. }) => reply(Err(WorkerError::Session(
                    SessionError::WrongRole("subscriber"),
                ))),
                None => reply(Err(WorkerError::UnknownSession)),
            },
            WorkerCommand::SetEgressBudget { bps } => {
                self.config.egress_budget = bps;
                self.reallocate(now);
            }
            WorkerCommand::Stats { reply } => {
                let mut s = self.stats;
                s.sessions = self.sessions.len();
                s.publishers = self
                    .sessions
                    .values()
                    .filter(|x| matches!(x.role, Role::Publisher { .. }))
                    .count();
                s.subscribers = s.sessions - s.publishers;
                s.paused_layers = self.pub_layers.values().map(|l| l.pause.paused()).sum();
                s.egress_budget = self.config.egress_budget;
                reply(Ok(s))
            }
            WorkerCommand::Shutdown => self.stop = true,
        }
    }

    /// Runs `f` on a session, then drains what it produced.
    fn with_session<T>(
        &mut self,
        session: u32,
        now: Instant,
        f: impl FnOnce(&mut Session) -> Result<T, SessionError>,
    ) -> Result<T, WorkerError> {
        let Some(s) = self.sessions.get_mut(&session) else {
            return Err(WorkerError::UnknownSession);
        };
        let r = match catch_unwind(AssertUnwindSafe(|| f(s))) {
            Ok(r) => r.map_err(WorkerError::from),
            Err(_) => {
                self.stats.session_panics += 1;
                self.close(session, Some("internal error"));
                return Err(WorkerError::SessionFailed);
            }
        };
        self.drain(session, now);
        r
    }

    fn update_load(&self) {
        self.load
            .store(self.sessions.len() as u64, Ordering::Relaxed);
    }

    /// Handles one received datagram.
    fn datagram(&mut self, buf: &[u8], source: SocketAddr, now: Instant) {
        self.stats.datagrams_in += 1;
        let (session, from_stun) = match self.by_addr.get(&source) {
            Some(s) => (*s, false),
            None => match self.session_named_by(buf) {
                Some(s) => (s, true),
                None => {
                    self.stats.dropped_unknown += 1;
                    return;
                }
            },
        };
        let destination = self.destination_for(source);
        let Ok(input) = Receive::new(Protocol::Udp, source, destination, buf) else {
            // Not STUN, DTLS, RTP or RTCP: drop.
            self.stats.dropped_unknown += 1;
            return;
        };
        let before = self.out.len();
        if self.feed(session, input, now)
            && from_stun
            && self.out[before..].iter().any(|d| d.destination == source)
        {
            // str0m answered the check (integrity verified): remember the 4-tuple.
            self.by_addr.insert(source, session);
        }
    }

    /// The session a STUN binding request names with its full local ufrag, if any.
    fn session_named_by(&self, buf: &[u8]) -> Option<u32> {
        let ufrag = demux::binding_request_ufrag(buf)?;
        let key = demux::parse_ufrag(ufrag)?;
        let s = self.sessions.get(&key.session)?;
        (key.worker == self.config.index && s.ufrag == ufrag).then_some(key.session)
    }

    /// Hands one received packet to a session and drains it; false if the session is gone.
    fn feed(&mut self, session: u32, input: Receive<'_>, now: Instant) -> bool {
        let Some(s) = self.sessions.get_mut(&session) else {
            return false;
        };
        s.last_rx = now;
        let ok = catch_unwind(AssertUnwindSafe(|| {
            s.rtc.handle_input(Input::Receive(now, input)).is_ok()
        }));
        match ok {
            Ok(true) => {}
            Ok(false) => {
                // A packet str0m refuses (bad SRTP, malformed RTCP): drop, keep the session.
                self.stats.dropped_unknown += 1;
            }
            Err(_) => {
                self.stats.session_panics += 1;
                self.close(session, Some("internal error"));
                return false;
            }
        }
        self.drain(session, now);
        true
    }

    /// The local address to report for a datagram: the announced candidate of the source's
    /// family (str0m matches it against its local candidates).
    fn destination_for(&self, source: SocketAddr) -> SocketAddr {
        self.config
            .setup
            .candidates
            .iter()
            .find(|c| c.is_ipv4() == source.is_ipv4())
            .copied()
            .unwrap_or(self.local_addr)
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((t, session))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(s) = self.sessions.get_mut(&session) else {
                continue;
            };
            // Entries are not removed when a session reschedules; skip stale ones.
            if s.next_timeout != Some(t) {
                continue;
            }
            s.next_timeout = None;
            let r = catch_unwind(AssertUnwindSafe(|| s.rtc.handle_input(Input::Timeout(now))));
            if r.is_err() {
                self.stats.session_panics += 1;
                self.close(session, Some("internal error"));
                continue;
            }
            self.drain(session, now);
        }
    }

    fn housekeeping(&mut self, now: Instant) {
        let timeout = self.config.ice_timeout;
        let stale: Vec<u32> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                now.saturating_duration_since(s.last_rx) > timeout || !s.rtc.is_alive()
            })
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            self.close(k, Some("ice timeout"));
        }
        self.conns.retain(|_, c| {
            c.session.is_some() || now.saturating_duration_since(c.since) < TCP_UNBOUND_TIMEOUT
        });
        self.send_due_rembs(now);
        for publisher in self.speakers.tick(now) {
            let key = self.key(publisher);
            (self.events)(WorkerEvent::Speaking {
                key,
                speaking: false,
            });
        }
        self.reallocate(now);
        if tracing::enabled!(tracing::Level::DEBUG) {
            for (k, s) in &self.sessions {
                if let Role::Subscriber {
                    estimate: Some(e),
                    bwe_asked,
                    twcc,
                    ..
                } = &s.role
                {
                    tracing::debug!(subscriber = k, estimate = e, twcc, asked = ?bwe_asked, "bandwidth estimate");
                }
            }
        }
        let subs: Vec<u32> = self
            .sessions
            .iter()
            .filter(|(_, s)| !s.is_publisher() && s.connected)
            .map(|(k, _)| *k)
            .collect();
        for s in subs {
            self.request_pending_keyframes(s, now, true);
        }
    }

    /// Repeats each capped publisher's bitrate cap as REMB on its video streams (every stream
    /// the publisher sends of each video line: one, or one per simulcast layer).
    fn send_due_rembs(&mut self, now: Instant) {
        for (publisher, limit) in self.limits.iter_mut() {
            let Some(p) = self.sessions.get_mut(publisher) else {
                continue;
            };
            let Role::Publisher { tracks, .. } = &p.role else {
                continue;
            };
            let mut lines: Vec<(Mid, Vec<Option<str0m::media::Rid>>)> = Vec::new();
            for t in tracks.iter().filter(|t| t.kind == MediaKind::Video) {
                let mut rids = vec![None];
                if let Some(str0m::media::Rids::Specific(v)) =
                    p.rtc.media(t.mid).map(|m| m.rids_rx())
                {
                    rids.extend(v.iter().copied().map(Some));
                }
                lines.push((t.mid, rids));
            }
            let mut api = p.rtc.direct_api();
            let present: Vec<(Mid, Option<str0m::media::Rid>)> = lines
                .into_iter()
                .flat_map(|(mid, rids)| rids.into_iter().map(move |r| (mid, r)))
                .filter(|(mid, rid)| api.stream_rx_by_mid(*mid, *rid).is_some())
                .collect();
            // Nothing received yet: wait, and send the first REMB as soon as a stream exists.
            if present.is_empty() || !limit.due(now) {
                continue;
            }
            // Layers paused at this publisher lower the REMB (pause.rs); one simulcast video
            // track is what the meeting page and Talk send.
            let paused = self
                .pub_layers
                .iter()
                .filter(|((p, _), pl)| p == publisher && pl.rids.len() > 1)
                .map(|(_, pl)| pause_remb(&pl.last_rates(), pl.pause.keep_top(), limit.bitrate))
                .min()
                .unwrap_or(limit.bitrate);
            let bitrate = str0m::bwe::Bitrate::bps(paused);
            for (mid, rid) in present {
                if let Some(rx) = api.stream_rx_by_mid(mid, rid) {
                    rx.request_remb(bitrate);
                }
            }
            self.dirty.insert(*publisher);
        }
    }

    /// Takes the audio level of a publisher's packet; tells the control plane when the
    /// publisher starts or stops speaking. Screen shares do not speak.
    fn observe_audio_level(&mut self, publisher: u32, level: i8, now: Instant) {
        let screen = self.sessions.get(&publisher).is_some_and(|s| {
            matches!(
                s.role,
                Role::Publisher {
                    stream_type: StreamType::Screen,
                    ..
                }
            )
        });
        if screen {
            return;
        }
        if let Some(speaking) = self.speakers.observe(publisher, dbov(level), now) {
            let key = self.key(publisher);
            (self.events)(WorkerEvent::Speaking { key, speaking });
        }
    }

    /// Sends the deferred keyframe requests that came due and notes when the next one does.
    /// They go straight to the publisher: their throttle already counted them (passing them
    /// through `send_keyframe_request` again would defer them once more, forever).
    fn send_due_keyframe_requests(&mut self, now: Instant) {
        let due: Vec<(u32, Mid, Option<Rid>)> = self
            .keyframes
            .iter_mut()
            .filter_map(|(k, t)| t.poll(now).then_some(*k))
            .collect();
        for (p, mid, rid) in due {
            self.request_keyframe_of(p, mid, rid, KeyframeRequestKind::Pli);
        }
        self.keyframe_due = self.keyframes.values().filter_map(|t| t.due_at()).min();
    }

    /// Drains every session marked dirty (draining may mark more).
    fn drain_dirty(&mut self, now: Instant) {
        while !self.dirty.is_empty() {
            let batch: Vec<u32> = self.dirty.drain().collect();
            for s in batch {
                self.drain(s, now);
            }
        }
    }

    /// Polls a session until it has nothing more to say, routing what it produced.
    fn drain(&mut self, session: u32, now: Instant) {
        let mut produced = Vec::new();
        loop {
            let Some(s) = self.sessions.get_mut(&session) else {
                return;
            };
            let r = catch_unwind(AssertUnwindSafe(|| s.rtc.poll_output()));
            let out = match r {
                Ok(Ok(o)) => o,
                Ok(Err(e)) => {
                    tracing::debug!(session = %s.key, error = %e, "session failed");
                    produced.push(Produced::Closed("failed"));
                    break;
                }
                Err(_) => {
                    self.stats.session_panics += 1;
                    produced.push(Produced::Closed("internal error"));
                    break;
                }
            };
            match out {
                Output::Timeout(t) => {
                    if s.next_timeout != Some(t) {
                        s.next_timeout = Some(t);
                        self.timers.push(Reverse((t, session)));
                    }
                    break;
                }
                Output::Transmit(t) if t.proto == Protocol::Tcp => {
                    if let Some(c) = self.conns.get_mut(&t.destination)
                        && c.out.len() < MAX_TCP_BACKLOG
                        && frame(&t.contents, &mut c.out)
                    {
                        self.stats.datagrams_out += 1;
                    } else {
                        self.stats.dropped_send += 1;
                    }
                }
                Output::Transmit(t) => self.out.push(OutDatagram {
                    destination: t.destination,
                    data: t.contents.into(),
                }),
                Output::Event(e) => match e {
                    Event::Connected => {
                        s.connected = true;
                        produced.push(Produced::Connected);
                    }
                    Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                        produced.push(Produced::Closed("ice disconnected"));
                    }
                    Event::MediaAdded(m) => produced.push(Produced::MediaAdded(m.mid, m.kind)),
                    Event::RtpPacket(p) => produced.push(Produced::Rtp(Box::new(p))),
                    Event::ChannelOpen(id, label) => {
                        produced.push(Produced::ChannelOpen(id, label))
                    }
                    Event::ChannelData(d) => produced.push(Produced::ChannelData(d.binary, d.data)),
                    Event::KeyframeRequest(k) => {
                        produced.push(Produced::KeyframeRequest(k.mid, k.kind))
                    }
                    Event::Closed => produced.push(Produced::Closed("closed")),
                    Event::EgressBitrateEstimate(k) => produced.push(Produced::Estimate(k)),
                    Event::MediaEgressStats(st) => produced.push(Produced::EgressStats(
                        st.mid,
                        crate::loss::Counters {
                            packets: st.packets,
                            bytes: st.bytes,
                            nacks: st.nacks,
                        },
                        st.loss,
                    )),
                    _ => {}
                },
            }
        }
        for p in produced {
            self.route(session, p, now);
        }
    }

    fn route(&mut self, session: u32, p: Produced, now: Instant) {
        match p {
            Produced::Closed(reason) => self.close(session, Some(reason)),
            Produced::MediaAdded(mid, kind) => {
                if let Some(Session {
                    role: Role::Publisher { tracks, .. },
                    ..
                }) = self.sessions.get_mut(&session)
                    && !tracks.iter().any(|t| t.mid == mid)
                {
                    tracks.push(PublishedTrack { mid, kind });
                }
            }
            Produced::ChannelOpen(id, label) => {
                match self.sessions.get_mut(&session).map(|s| &mut s.role) {
                    Some(Role::Publisher { channel, .. }) => *channel = Some((id, label)),
                    Some(Role::Subscriber {
                        channel,
                        channel_open,
                        ..
                    }) if *channel == Some(id) => *channel_open = true,
                    _ => {}
                }
            }
            Produced::ChannelData(binary, data) => self.forward_channel(session, binary, &data),
            Produced::Rtp(pkt) => {
                if let Some(level) = pkt.header.ext_vals.audio_level {
                    self.observe_audio_level(session, level, now);
                }
                self.forward_rtp(session, pkt, now)
            }
            Produced::Connected => {
                // A subscriber that just connected needs a layer chosen and a keyframe of it
                // to start decoding: planning now sets its targets, and every pending switch
                // asks for one.
                if self
                    .sessions
                    .get(&session)
                    .is_some_and(|s| !s.is_publisher())
                {
                    self.reallocate(now);
                    self.request_pending_keyframes(session, now, true);
                }
            }
            Produced::KeyframeRequest(mid, kind) => {
                // The subscriber's decoder wants a keyframe of what it receives: the layer
                // forwarded now, or the one a switch waits for.
                let sub = self.sessions.get(&session).and_then(|s| match &s.role {
                    Role::Subscriber {
                        publisher, tracks, ..
                    } => tracks.iter().find(|t| t.mid == mid).map(|t| {
                        (
                            *publisher,
                            t.source_mid,
                            t.switch.target().or(t.switch.current()),
                        )
                    }),
                    Role::Publisher { .. } => None,
                });
                if let Some((publisher, source_mid, layer)) = sub {
                    let rid = self.rid_of(publisher, source_mid, layer.unwrap_or(0));
                    self.send_keyframe_request(publisher, source_mid, rid, kind, now, true);
                }
            }
            Produced::EgressStats(mid, counters, rr_loss) => {
                let mut tripped = false;
                if let Some(Session {
                    role:
                        Role::Subscriber {
                            tracks,
                            loss,
                            fell_at,
                            estimate,
                            ..
                        },
                    ..
                }) = self.sessions.get_mut(&session)
                    && tracks
                        .iter()
                        .any(|t| t.mid == mid && t.kind == MediaKind::Video)
                    && let Some(cap) = {
                        tracing::trace!(
                            target: "media_core::loss",
                            subscriber = session,
                            %mid,
                            packets = counters.packets,
                            nacks = counters.nacks,
                            rr_loss = ?rr_loss,
                            "egress stats"
                        );
                        loss.observe(mid, counters, rr_loss, now)
                    }
                {
                    tracing::debug!(
                        subscriber = session,
                        cap,
                        estimate = ?estimate,
                        "heavy loss: planning with at most the rate that arrives"
                    );
                    *fell_at = Some(now);
                    tripped = true;
                }
                // As with a falling estimate: at once, each moment on a layer the link no
                // longer carries freezes the picture.
                if tripped {
                    self.reallocate(now);
                }
            }
            Produced::Estimate(kind) => {
                let mut fell = false;
                if let Some(Session {
                    role:
                        Role::Subscriber {
                            estimate,
                            twcc,
                            fell_at,
                            planned_with,
                            sending,
                            ..
                        },
                    ..
                }) = self.sessions.get_mut(&session)
                {
                    let new = match kind {
                        BweKind::Twcc { estimate: e, .. } => {
                            *twcc = true;
                            Some(e.as_u64())
                        }
                        // REMB only where the client gives no transport-wide feedback.
                        BweKind::Remb { estimate: e, .. } if !*twcc => Some(e.as_u64()),
                        _ => None,
                    };
                    if let Some(new) = new {
                        // Against the estimate last planned with, not the last event: str0m
                        // smooths its estimate, so a drop arrives as several smaller steps.
                        // And only below what is being sent: an estimate that wobbles above
                        // the plan is no reason to plan more cautiously (on loopback, str0m's
                        // estimate wobbles by more than a tenth; worker_simulcast).
                        fell = new < *sending
                            && planned_with
                                .or(*estimate)
                                .is_some_and(|old| new < old / 10 * 9);
                        if fell {
                            *fell_at = Some(now);
                        }
                        *estimate = Some(new);
                    }
                }
                // A falling estimate is acted on at once, not at the next housekeeping: each
                // moment on a layer the link no longer carries loses packets, and the picture
                // stands still until the lower layer's keyframe arrives.
                if fell {
                    self.reallocate(now);
                }
            }
        }
    }

    fn send_keyframe_request(
        &mut self,
        publisher: u32,
        mid: Mid,
        rid: Option<Rid>,
        kind: KeyframeRequestKind,
        now: Instant,
        defer: bool,
    ) {
        // A publisher stream that has not been received yet cannot be asked; its first
        // frame is a keyframe anyway, so the throttle is left untouched.
        let known = self
            .sessions
            .get_mut(&publisher)
            .is_some_and(|p| p.rtc.direct_api().stream_rx_by_mid(mid, rid).is_some());
        if !known {
            tracing::debug!(publisher, %mid, ?rid, "keyframe request for a stream not received yet");
            return;
        }
        let interval = self.config.keyframe_interval;
        let throttle = self
            .keyframes
            .entry((publisher, mid, rid))
            .or_insert_with(|| KeyframeThrottle::new(interval));
        if !defer {
            // A repeat for a switch still waiting: only if the interval allows it now (the
            // next housekeeping asks again), so it never pushes other requests back.
            if throttle.try_request(now) {
                self.request_keyframe_of(publisher, mid, rid, kind);
            }
        } else if throttle.request(now) {
            self.request_keyframe_of(publisher, mid, rid, kind);
        } else if let Some(due) = throttle.due_at() {
            // Deferred, not dropped: whoever asked (a joining subscriber, say) still gets a
            // keyframe one interval after the last one at most.
            self.keyframe_due = Some(self.keyframe_due.map_or(due, |t| t.min(due)));
        }
    }

    /// Asks a publisher's stream for a keyframe now (no throttling).
    fn request_keyframe_of(
        &mut self,
        publisher: u32,
        mid: Mid,
        rid: Option<Rid>,
        kind: KeyframeRequestKind,
    ) {
        let Some(p) = self.sessions.get_mut(&publisher) else {
            return;
        };
        let mut api = p.rtc.direct_api();
        if let Some(rx) = api.stream_rx_by_mid(mid, rid) {
            rx.request_keyframe(kind);
            tracing::trace!(publisher, %mid, ?rid, ?kind, "keyframe requested");
        }
        self.dirty.insert(publisher);
    }

    fn forward_rtp(&mut self, publisher: u32, pkt: Box<RtpPacket>, now: Instant) {
        let Some(p) = self.sessions.get_mut(&publisher) else {
            return;
        };
        let ssrc = pkt.header.ssrc;
        let mut api = p.rtc.direct_api();
        let Some((mid, rid)) = api.stream_rx(&ssrc).map(|s| (s.mid(), s.rid())) else {
            tracing::trace!(%ssrc, "RTP from an SSRC without a stream");
            return;
        };
        let Some(params) = p.params_of(pkt.header.payload_type) else {
            tracing::trace!(pt = %pkt.header.payload_type, "RTP with an unnegotiated payload type");
            return;
        };
        let clock_rate = params.spec().clock_rate.get();
        let codec = match params.spec().codec {
            Codec::Vp8 => VideoCodec::Vp8,
            Codec::H264 => VideoCodec::H264,
            _ => VideoCodec::Other,
        };
        let layers = self
            .pub_layers
            .entry((publisher, mid))
            .or_insert_with(|| PubLayers::of(p.rtc.media(mid).map(|m| m.rids_rx())));
        let Some(layer) = layers.layer_of(rid) else {
            tracing::trace!(?rid, "RTP with an rid the SDP did not announce");
            return;
        };
        layers.rates.on_packet(layer, pkt.payload.len(), now);
        // The VP8 descriptor, read once for every subscriber's temporal filter.
        let vp8 = if codec == VideoCodec::Vp8 {
            layers::vp8_descriptor(&pkt.payload).map(|d| {
                let picture = layers::vp8_picture_id(&pkt.payload, &d);
                (d, picture)
            })
        } else {
            None
        };
        if layer == 0 && codec == VideoCodec::Vp8 {
            let tid = vp8.as_ref().and_then(|(d, _)| d.tid);
            layers.temporal.on_packet(tid, pkt.payload.len(), now);
        }
        // Where a subscriber may start on this layer: a keyframe of a simulcast layer; any
        // packet of a single-layer stream (nothing to switch between: the decoder asks for a
        // keyframe itself if it needs one) or of a codec whose keyframes are not parsed.
        let keyframe_start = layers.rids.len() == 1
            || codec == VideoCodec::Other
            || layers::is_keyframe_start(codec, &pkt.payload);
        // Layers a subscriber just switched down to.
        let mut down_switches: Vec<usize> = Vec::new();
        // Take the list out while writing (nothing below changes routes), put it back after.
        let subs = self
            .routes
            .get_mut(&publisher)
            .map(std::mem::take)
            .unwrap_or_default();
        for &sub in &subs {
            let Some(s) = self.sessions.get_mut(&sub) else {
                continue;
            };
            if !s.connected {
                continue;
            }
            let Role::Subscriber { tracks, .. } = &mut s.role else {
                continue;
            };
            let Some(t) = tracks.iter_mut().find(|t| t.source_mid == mid) else {
                continue;
            };
            let video = t.kind == MediaKind::Video;
            // Audio has one layer and is always forwarded; video only from the layer the
            // subscriber is on, or from its target once that layer's keyframe starts.
            let before = t.switch.current();
            let switched = if video {
                match t.switch.on_packet(layer, keyframe_start) {
                    Decision::Drop => continue,
                    Decision::Forward { switched } => switched,
                }
            } else {
                false
            };
            if switched {
                self.stats.layer_switches += 1;
                tracing::debug!(sub, %mid, layer, "simulcast layer switched");
                if before.is_some_and(|b| b > layer) {
                    down_switches.push(layer);
                }
                // The new layer starts on a keyframe, which references nothing.
                t.temporal.reset();
            }
            // VP8 temporal layers above the subscriber's target are dropped whole frames at a
            // time; the numbering closes over them so the receiver sees no loss.
            if let Some((d, picture)) = &vp8
                && let TemporalDecision::Drop { frame_start } =
                    t.temporal.on_descriptor(d, *picture)
            {
                t.rewriter.skip(*ssrc, *pkt.seq_no);
                if frame_start {
                    t.vp8.skip_frame(&pkt.payload);
                }
                self.stats.temporal_dropped += 1;
                continue;
            }
            let pt_out = *t
                .pt_map
                .entry(pkt.header.payload_type)
                .or_insert_with(|| s.rtc.codec_config().match_params(params).map(|q| q.pt()));
            let Some(pt_out) = pt_out else {
                tracing::trace!(codec = ?params.spec().codec, "subscriber has no matching codec");
                continue;
            };
            let Some(rw) =
                t.rewriter
                    .rewrite(*ssrc, *pkt.seq_no, pkt.header.timestamp, clock_rate, now)
            else {
                continue;
            };
            let payload = if codec == VideoCodec::Vp8 {
                let mut v = pkt.payload.to_vec();
                t.vp8.rewrite(&mut v, switched);
                Arc::<[u8]>::from(v)
            } else {
                pkt.payload.clone()
            };
            let out_mid = t.mid;
            let mut api = s.rtc.direct_api();
            let Some(tx) = api.stream_tx_by_mid(out_mid, None) else {
                continue;
            };
            if switched {
                // The subscriber's decoder starts over at this keyframe, so resending packets
                // of the layer before it would only take the link from the keyframe: dump the
                // resend cache (str0m's defaults again), and NACKs for older packets go
                // unanswered. After a drop, the old layer's resends and the new layer's
                // keyframe competed for the shaped link, and the picture came back 0.6-0.8 s
                // after the keyframe was forwarded (quality_shaping).
                tx.set_rtx_cache(RTX_CACHE_PACKETS, RTX_CACHE_AGE, RTX_RATIO_CAP);
            }
            // Forwarded media goes out as it comes (the allocator keeps each subscriber within
            // its estimate by choosing layers); the pacer only spaces padding and probes.
            // Measured with Chromium (quality_shaping): paced at str0m's 1.1 x estimate, the
            // estimate never climbed back from a drop; unpaced it did.
            tx.set_unpaced(true);
            tx.write_rtp(
                RtpWrite::new(pt_out, SeqNo::from(rw.seq), rw.ts, now, payload)
                    .marker(pkt.header.marker)
                    .nackable(video),
            );
            self.stats.rtp_forwarded += 1;
            self.dirty.insert(sub);
        }
        if let Some(v) = self.routes.get_mut(&publisher) {
            *v = subs;
        }
        // A switch down usually comes with a full link: the old layer's packets still fill
        // the bottleneck's queue and take parts of the new layer's keyframe with them, and
        // retransmissions are cut off by then (str0m's RTX ratio cap). A second keyframe of
        // the new layer, one throttle interval later (the request is deferred), restarts
        // the picture without waiting for the receiver's own request. Measured
        // (quality_shaping): the switch to the low layer came 0.47 s after the drop, the
        // picture 1.5 s later.
        if !down_switches.is_empty() {
            let rid = self
                .pub_layers
                .get(&(publisher, mid))
                .and_then(|l| l.rids.get(layer).copied().flatten());
            self.send_keyframe_request(publisher, mid, rid, KeyframeRequestKind::Pli, now, true);
        }
    }

    /// The rid of layer `layer` of a publisher stream (`None` without simulcast).
    fn rid_of(&self, publisher: u32, mid: Mid, layer: usize) -> Option<Rid> {
        self.pub_layers
            .get(&(publisher, mid))
            .and_then(|l| l.rids.get(layer).copied().flatten())
    }

    /// Asks for a keyframe of every layer a subscriber's video waits to switch to (throttled
    /// per publisher layer). `repeat`: a reminder from housekeeping while the switch is still
    /// pending, sent only if the throttle allows it now (never deferred).
    fn request_pending_keyframes(&mut self, session: u32, now: Instant, repeat: bool) {
        let wanted: Vec<(u32, Mid, usize)> = match self.sessions.get(&session).map(|s| &s.role) {
            Some(Role::Subscriber {
                publisher, tracks, ..
            }) => tracks
                .iter()
                .filter(|t| t.kind == MediaKind::Video && t.switch.pending())
                .filter_map(|t| t.switch.target().map(|l| (*publisher, t.source_mid, l)))
                .collect(),
            _ => return,
        };
        for (publisher, mid, layer) in wanted {
            let rid = self.rid_of(publisher, mid, layer);
            self.send_keyframe_request(publisher, mid, rid, KeyframeRequestKind::Pli, now, !repeat);
        }
    }

    /// Plans every connected subscriber's layers from its bandwidth estimate (the allocator,
    /// through the upgrade hold), sets them as switch targets, and tells each subscriber's
    /// BWE what to probe for.
    fn reallocate(&mut self, now: Instant) {
        // Sources: every track of every publisher with subscribers here. A video source's
        // allocator layers are its live layers only (a layer Chromium stopped sending
        // cannot be chosen); `map` turns the allocator's index back into the real layer.
        let mut sources = Vec::new();
        let mut ids: HashMap<(u32, Mid), u32> = HashMap::new();
        let mut maps: HashMap<u32, Vec<Step>> = HashMap::new();
        for (&pid, subs) in &self.routes {
            if subs.is_empty() {
                continue;
            }
            let Some(Session {
                role:
                    Role::Publisher {
                        tracks,
                        stream_type,
                        ..
                    },
                ..
            }) = self.sessions.get(&pid)
            else {
                continue;
            };
            for t in tracks {
                let id = sources.len() as u32;
                ids.insert((pid, t.mid), id);
                let (kind, layers, map) = if t.kind == MediaKind::Audio {
                    (
                        allocator::Kind::Audio,
                        vec![AUDIO_RATE],
                        vec![Step::layer(0)],
                    )
                } else {
                    let kind = if *stream_type == StreamType::Screen {
                        allocator::Kind::Screen
                    } else {
                        allocator::Kind::Camera
                    };
                    let (rates, map) = match self.pub_layers.get(&(pid, t.mid)) {
                        Some(l) => l.steps(now),
                        None => (Vec::new(), Vec::new()),
                    };
                    if map.is_empty() {
                        // Nothing received yet: plan the lowest layer at a nominal rate so
                        // that its first keyframe is waited for.
                        (kind, vec![MIN_VIDEO_RATE], vec![Step::layer(0)])
                    } else {
                        (kind, rates, map)
                    }
                };
                sources.push(allocator::Source {
                    id,
                    kind,
                    layers,
                    // The speaker detector's state: the allocator lowers other cameras before
                    // the active speaker's when the box's budget runs short.
                    speaking: kind == allocator::Kind::Camera && self.speakers.is_speaking(pid),
                });
                maps.insert(id, map);
            }
        }
        let initial = session::INITIAL_ESTIMATE_KBPS * 1000;
        let subscribers: Vec<allocator::Subscriber> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.connected)
            .filter_map(|(&sid, s)| match &s.role {
                Role::Subscriber {
                    publisher,
                    tracks,
                    estimate,
                    max_layer,
                    fell_at,
                    loss,
                    ..
                } => Some(allocator::Subscriber {
                    id: sid,
                    estimate: planning_rate(
                        with_loss_cap(estimate.unwrap_or(initial), loss.cap(now, LOSS_HOLD)),
                        fell_at.is_some_and(|t| now.saturating_duration_since(t) < AFTER_FALL),
                    ),
                    subscriptions: tracks
                        .iter()
                        .filter_map(|t| {
                            let source = *ids.get(&(*publisher, t.source_mid))?;
                            let map = maps.get(&source)?;
                            Some(allocator::Subscription {
                                source,
                                max_layer: max_layer.map(|m| {
                                    map.iter().take_while(|s| s.layer <= m).count().max(1) - 1
                                }),
                            })
                        })
                        .collect(),
                }),
                Role::Publisher { .. } => None,
            })
            .collect();
        // The per-stream caps are enforced at the publishers (b=AS and REMB, per backend:
        // `limits`), so every layer they send is already within its cap; the allocator's
        // box-wide defaults would only refuse a backend's higher cap.
        let limits = Limits {
            budget: self.config.egress_budget,
            camera_cap: Bps::MAX,
            screen_cap: Bps::MAX,
        };
        let mut plan = allocator::allocate(&sources, &subscribers, &limits);
        self.hold_full_frame_rate(&mut plan, &sources, &maps, now);
        let plan = self.hysteresis.apply(plan, &sources, now);
        let mut changed = Vec::new();
        // The highest layer of each publisher track some subscriber may use (pause.rs).
        let mut wants: HashMap<(u32, Mid), usize> = HashMap::new();
        for sp in &plan.subscribers {
            let Some(s) = self.sessions.get_mut(&sp.id) else {
                continue;
            };
            let Role::Subscriber {
                publisher,
                tracks,
                bwe_asked,
                probe,
                fell_at,
                estimate,
                planned_with,
                max_layer: bound,
                max_temporal,
                sending,
                ..
            } = &mut s.role
            else {
                continue;
            };
            // What to probe for: every subscription at its best eligible layer; what to
            // sustain: the plan plus the next step up, so padding tests that step.
            let mut desired: Bps = 0;
            let mut next_step: Option<Bps> = None;
            // What is sent in fact: a video the plan pauses keeps its lowest layer unless the
            // budget paused it (below). Padding must sustain that plus the next step, or a
            // probe that read too much (through a policer's bucket) is never disproved
            // before the upgrade it allows.
            let mut in_force: Bps = 0;
            // Whether any video received has layers to choose between.
            let mut simulcast = false;
            // Every assignment with its subscription. (This once zipped the assignments with
            // an Option of the list, which yields one pair: only the first stream, the audio,
            // was counted, and the BWE was asked to probe for 50 kbit/s.)
            let subscriptions = subscribers
                .iter()
                .find(|x| x.id == sp.id)
                .map_or(&[][..], |x| &x.subscriptions[..]);
            for (a, sub) in sp.assignments.iter().filter_map(|a| {
                subscriptions
                    .iter()
                    .find(|x| x.source == a.source)
                    .map(|x| (a, x))
            }) {
                let Some(src) = sources.get(a.source as usize) else {
                    continue;
                };
                simulcast |= src.kind != allocator::Kind::Audio && src.layers.len() > 1;
                let top = sub
                    .max_layer
                    .unwrap_or(usize::MAX)
                    .min(src.layers.len().saturating_sub(1));
                let cap = match src.kind {
                    allocator::Kind::Camera => limits.camera_cap,
                    allocator::Kind::Screen => limits.screen_cap,
                    allocator::Kind::Audio => Bps::MAX,
                };
                desired += src.layers[..=top]
                    .iter()
                    .copied()
                    .filter(|r| *r <= cap)
                    .max()
                    .unwrap_or(src.layers[0]);
                let (layer, rate) = match a.layer {
                    None if !sp.limited_by_budget && src.kind != allocator::Kind::Audio => {
                        (Some(0), src.layers.first().copied().unwrap_or(0))
                    }
                    l => (l, a.rate),
                };
                in_force += rate;
                if let Some(l) = layer
                    && let Some(up) = src.layers.get(l + 1)
                    && l < top
                {
                    let step = up.saturating_sub(rate);
                    next_step = Some(next_step.map_or(step, |n| n.min(step)));
                }
            }
            let publisher = *publisher;
            for a in &sp.assignments {
                let Some(map) = maps.get(&a.source) else {
                    continue;
                };
                let Some(t) = tracks.iter_mut().find(|t| {
                    t.kind == MediaKind::Video
                        && ids.get(&(publisher, t.source_mid)) == Some(&a.source)
                }) else {
                    continue;
                };
                // A video the estimate cannot carry even at its lowest layer keeps that layer:
                // the picture stays, and the measured rates include keyframe bursts that
                // would otherwise pause a stream for a moment's overshoot. Only the box's
                // budget pauses video.
                let layer = match a.layer {
                    None if !sp.limited_by_budget => Some(0),
                    l => l,
                };
                let step = layer.and_then(|l| map.get(l).copied());
                let target = step.map(|s| s.layer);
                // A downgrade below the client's selectStream bound means the link carries
                // less than planned: the next plans take the estimate as fallen too (a drop
                // can lower it in steps of under a tenth). One to the bound is the client's
                // choice and says nothing about the link.
                let bound = bound.unwrap_or(usize::MAX);
                // What this subscriber may use of the track: everything up to its
                // selectStream bound, whatever its estimate carries now (an estimate that fell
                // recovers only if the layers above are there to probe for and switch to).
                if let Some(pl) = self.pub_layers.get(&(publisher, t.source_mid)) {
                    let w = wants.entry((publisher, t.source_mid)).or_insert(0);
                    *w = (*w).max(bound.min(pl.rids.len().saturating_sub(1)));
                }
                let old_rank = t.switch.target().map(|l| Step::rank_of(l, t.planned_tid));
                let new_rank = step.map(|s| s.rank());
                if new_rank < old_rank && new_rank.is_none_or(|r| r < (bound, u8::MAX)) {
                    probe.downgraded(now);
                    *fell_at = Some(now);
                }
                if old_rank != new_rank {
                    tracing::debug!(
                        subscriber = sp.id,
                        ?target,
                        temporal = ?step.and_then(|s| s.tid),
                        planned = sp.total,
                        estimate = subscribers
                            .iter()
                            .find(|x| x.id == sp.id)
                            .map_or(0, |x| x.estimate),
                        "simulcast target changed"
                    );
                }
                if t.switch.target() != target {
                    t.switch.set_target(target);
                    changed.push(sp.id);
                }
                // The temporal layers forwarded: the plan's step within the client's bound.
                t.planned_tid = step.and_then(|s| s.tid);
                t.temporal
                    .set_target(lowest_tid(t.planned_tid, *max_temporal));
            }
            // What str0m's BWE is asked for, after the targets are set: a downgrade in this
            // pass counts (no padding towards the next step while it settles, and no probe
            // renewal now). Asked before, the renewal's dip fell on the very pass that left the
            // top layer after a drop, and its rise made str0m probe the shaped link while the
            // low layer's keyframe crossed it (quality_shaping: the picture stood 1.75 s).
            // Only within AFTER_FALL of a fall or downgrade: that is when a probe may read more
            // than a bottleneck just found carries (an upgrade on it failed without this).
            // Later, padding that fills the estimate is harmful: str0m's estimate stopped
            // moving for 30 s and more (twice in quality_shaping, after an upgrade 22 s after
            // the drop).
            let recent_fall =
                fell_at.is_some_and(|t| now.saturating_duration_since(t) < AFTER_FALL);
            let step = if probe.settling(now) || !recent_fall {
                0
            } else {
                next_step.unwrap_or(0)
            };
            // Without simulcast there is no layer to probe for (the estimate chooses nothing
            // for a single-layer video): sustaining what the plan sends only padded every gap
            // of the media (str0m's own 50 kbit/s floor stays). Towards a webrtc-rs
            // subscriber with small packets that gave 142-162 RTX padding resends beside 100
            // media packets (sfu_proxy). With simulcast the rate in force is still sustained,
            // at the top layer too: quality_shaping was measured so (turning it off at the top
            // layer was followed by more runs whose unshaped top layer did not hold).
            let minimum = if !simulcast {
                0
            } else {
                (in_force + step).min(desired)
            };
            let wanted = probe.desired(in_force, desired.max(minimum), now);
            let asked = (minimum.min(wanted), wanted);
            if differs(*bwe_asked, asked) {
                *bwe_asked = asked;
                s.rtc
                    .bwe()
                    .set_bitrate(Bitrate::bps(asked.0), Bitrate::bps(asked.1));
                self.dirty.insert(sp.id);
            }
            *planned_with = *estimate;
            *sending = in_force;
        }
        for sid in changed {
            self.request_pending_keyframes(sid, now, false);
        }
        self.update_pauses(&wants, now);
    }

    /// Keeps the lowest layer's full frame rate for a subscriber whose estimate has been below
    /// it for less than [`SLOW_LINK`]: a temporal step by estimate is for a link that stays
    /// that slow. "Below" counts the estimate itself, not the reduced rate planning uses for a
    /// while after a fall or heavy loss: with those counted, the repeated short falls of the
    /// upgrade attempts on a 300 kbit/s link kept the subscriber at half the frame rate. Right after a drop the estimate undershoots (measured in quality_shaping:
    /// 80-95 kbit/s for 5 s on a 300 kbit/s link, after a failed upgrade), and sending a
    /// quarter of the frames then only slowed the estimate's recovery (the top layer came back
    /// after 15.6 s). A plan lowered by the box's budget is left as it is, and nothing is
    /// raised past the budget.
    fn hold_full_frame_rate(
        &mut self,
        plan: &mut allocator::Plan,
        sources: &[allocator::Source],
        maps: &HashMap<u32, Vec<Step>>,
        now: Instant,
    ) {
        for sp in &mut plan.subscribers {
            let Some(Session {
                role:
                    Role::Subscriber {
                        slow_since,
                        estimate,
                        ..
                    },
                ..
            }) = self.sessions.get_mut(&sp.id)
            else {
                continue;
            };
            if sp.limited_by_budget {
                continue;
            }
            // The estimate itself, without the reductions planning applies after a fall or
            // loss (they are for leaving a layer fast, and last seconds).
            let raw = estimate.unwrap_or(session::INITIAL_ESTIMATE_KBPS * 1000);
            let mut slow = false;
            let held = slow_since.is_none_or(|t| now.saturating_duration_since(t) < SLOW_LINK);
            for a in &mut sp.assignments {
                let (Some(map), Some(src)) = (maps.get(&a.source), sources.get(a.source as usize))
                else {
                    continue;
                };
                if src.kind == allocator::Kind::Audio {
                    continue;
                }
                // The lowest layer at its full frame rate.
                let Some(full) = map.iter().position(|s| s.tid.is_none()) else {
                    continue;
                };
                if a.layer.is_some_and(|l| l >= full) {
                    continue;
                }
                let rate = src.layers.get(full).copied().unwrap_or(a.rate);
                // Slow only if the estimate itself cannot carry the full frame rate.
                let too_slow = sp.total.saturating_sub(a.rate).saturating_add(rate) > raw;
                slow |= too_slow;
                // Never past the box's egress budget: a plan the estimate lowered first may
                // be at the budget's limit too.
                let within_budget = plan.total.saturating_sub(a.rate).saturating_add(rate)
                    <= self.config.egress_budget;
                if (held || !too_slow) && within_budget {
                    sp.total = sp.total.saturating_sub(a.rate).saturating_add(rate);
                    plan.total = plan.total.saturating_sub(a.rate).saturating_add(rate);
                    a.layer = Some(full);
                    a.rate = rate;
                }
            }
            if !slow {
                *slow_since = None;
            } else if slow_since.is_none() {
                *slow_since = Some(now);
            }
        }
    }

    /// Takes what subscribers want of each simulcast publisher track (nothing: the lowest
    /// layer) and, when the layers kept on change, sends the new REMB at once.
    fn update_pauses(&mut self, wants: &HashMap<(u32, Mid), usize>, now: Instant) {
        let mut changed = Vec::new();
        for ((pid, mid), pl) in self.pub_layers.iter_mut() {
            if pl.rids.len() < 2 {
                continue;
            }
            let want = wants.get(&(*pid, *mid)).copied().unwrap_or(0);
            if pl.pause.update(want, now) {
                tracing::info!(
                    publisher = pid,
                    keep_top = pl.pause.keep_top(),
                    paused = pl.pause.paused(),
                    "simulcast layers kept on at the publisher changed"
                );
                changed.push(*pid);
            }
        }
        for pid in changed {
            if let Some(limit) = self.limits.get_mut(&pid) {
                limit.reset();
            }
        }
    }

    fn forward_channel(&mut self, publisher: u32, binary: bool, data: &[u8]) {
        if !self
            .sessions
            .get(&publisher)
            .is_some_and(|s| s.is_publisher())
        {
            return;
        }
        let subs = self.routes.get(&publisher).cloned().unwrap_or_default();
        for sub in subs {
            let Some(s) = self.sessions.get_mut(&sub) else {
                continue;
            };
            let Role::Subscriber {
                channel: Some(id),
                channel_open: true,
                ..
            } = s.role
            else {
                continue;
            };
            if let Some(mut ch) = s.rtc.channel(id)
                && matches!(ch.write(binary, data), Ok(true))
            {
                self.stats.channel_messages_forwarded += 1;
            }
            self.dirty.insert(sub);
        }
    }

    /// Removes a session; `reason` set means it ended on its own and the control plane is
    /// told. A publisher takes its subscribers with it.
    fn close(&mut self, session: u32, reason: Option<&'static str>) {
        let Some(mut s) = self.sessions.remove(&session) else {
            return;
        };
        s.rtc.disconnect();
        self.by_addr.retain(|_, v| *v != session);
        self.conns.retain(|_, c| c.session != Some(session));
        match &s.role {
            Role::Publisher { .. } => {
                self.keyframes.retain(|(p, _, _), _| *p != session);
                self.pub_layers.retain(|(p, _), _| *p != session);
                self.limits.remove(&session);
                if self.speakers.remove(session) {
                    (self.events)(WorkerEvent::Speaking {
                        key: s.key,
                        speaking: false,
                    });
                }
                for sub in self.routes.remove(&session).unwrap_or_default() {
                    self.close(sub, Some("publisher closed"));
                }
            }
            Role::Subscriber { publisher, .. } => {
                if let Some(v) = self.routes.get_mut(publisher) {
                    v.retain(|x| *x != session);
                }
            }
        }
        self.update_load();
        if let Some(reason) = reason {
            (self.events)(WorkerEvent::SessionClosed { key: s.key, reason });
        }
    }
}

/// Planned rate of an audio stream (DESIGN.md §4: about 50 kbit/s).
const AUDIO_RATE: Bps = 50_000;
/// The share of a subscriber's bandwidth estimate that the allocator plans with. Forwarded
/// media goes out unpaced (keyframes in bursts), retransmissions and padding come on top, and
/// after a drop the estimate lags the link: measured with Chromium behind a 300 kbit/s tbf
/// (quality_shaping), the estimate read 395 kbit/s half a second after the drop, and planning
/// with all of it chose the middle layer (322 kbit/s with audio) for half a second before the
/// low one, which cost that much more of a frozen picture.
const PLANNING_SHARE: (u64, u64) = (4, 5);

/// The share planned with for [`AFTER_FALL`] after the estimate fell by a tenth at once.
/// Measured in the same test: the estimate read 474 kbit/s 1.2 s after the drop to 300, so
/// 4/5 of it still chose the middle layer, whose keyframe (tens of kB) could not pass the
/// full link: the picture stood still 3 s until the low layer came. And probes through the
/// tbf's bucket read 440 kbit/s ten seconds later, enough at 4/5 for an upgrade that failed.
const FALLEN_SHARE: (u64, u64) = (3, 5);

/// How long after a fall the estimate is planned with [`FALLEN_SHARE`].
const AFTER_FALL: Duration = Duration::from_secs(15);

/// How long the loss detector's cap holds after it tripped. str0m's estimate fell 0.3-2.2 s
/// after a drop (quality_shaping); after this it plans alone again (and the upgrade hold keeps
/// a cap that was too low from taking effect at once).
pub const LOSS_HOLD: Duration = Duration::from_secs(4);

/// The estimate, or less while a loss cap (loss.rs) holds.
fn with_loss_cap(estimate: Bps, cap: Option<Bps>) -> Bps {
    cap.map_or(estimate, |c| estimate.min(c))
}

fn planning_rate(estimate: Bps, fallen: bool) -> Bps {
    let (n, d) = if fallen { FALLEN_SHARE } else { PLANNING_SHARE };
    estimate / d * n
}

/// Least rate a video layer is planned at, before its rate is measured.
const MIN_VIDEO_RATE: Bps = 50_000;

/// The resend cache of a subscriber's video stream, as str0m sets it by default; set again to
/// empty it at a layer switch.
const RTX_CACHE_PACKETS: usize = 2000;
const RTX_CACHE_AGE: Duration = Duration::from_secs(3);
const RTX_RATIO_CAP: Option<f32> = Some(0.15);

/// How long a subscriber's estimate must stay below the lowest layer's full rate before the
/// allocator's temporal steps (a lower frame rate) apply to it ([`Worker::hold_full_frame_rate`]).
const SLOW_LINK: Duration = Duration::from_secs(10);

/// Whether BWE rates moved enough (a tenth) to be given to str0m again.
fn differs(a: (Bps, Bps), b: (Bps, Bps)) -> bool {
    let far = |x: Bps, y: Bps| x.abs_diff(y) > x.max(y) / 10;
    far(a.0, b.0) || far(a.1, b.1)
}

/// One step of a video source for the allocator: a simulcast layer, and below the lowest
/// layer's full rate its temporal layers (`tid`: the highest forwarded; `None`: all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Step {
    layer: usize,
    tid: Option<u8>,
}

impl Step {
    fn layer(layer: usize) -> Step {
        Step { layer, tid: None }
    }

    /// Order of steps: by layer, then by temporal layer (all above any TID).
    fn rank_of(layer: usize, tid: Option<u8>) -> (usize, u8) {
        (layer, tid.unwrap_or(u8::MAX))
    }

    fn rank(&self) -> (usize, u8) {
        Step::rank_of(self.layer, self.tid)
    }
}

/// The lower of two temporal bounds (`None`: all layers).
fn lowest_tid(a: Option<u8>, b: Option<u8>) -> Option<u8> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// The simulcast layers of one publisher stream: rid of each layer (lowest first; one `None`
/// entry without simulcast) and their received rates.
struct PubLayers {
    rids: Vec<Option<Rid>>,
    rates: LayerRates,
    /// The layers kept on at the publisher (the others paused by REMB).
    pause: LayerPause,
    /// Temporal layer shares of the lowest layer: the allocator's steps below it.
    temporal: TemporalRates,
}

impl PubLayers {
    fn of(rids: Option<&Rids>) -> PubLayers {
        let rids: Vec<Option<Rid>> = match rids {
            Some(Rids::Specific(v)) if !v.is_empty() => {
                let names: Vec<&str> = v.iter().map(|r| &**r).collect();
                let order = layers::layer_order(&names);
                let mut out = vec![None; v.len()];
                for (i, l) in order.into_iter().enumerate() {
                    out[l] = Some(v[i]);
                }
                out
            }
            _ => vec![None],
        };
        let rates = LayerRates::new(rids.len());
        let pause = LayerPause::new(rids.len());
        PubLayers {
            rids,
            rates,
            pause,
            temporal: TemporalRates::default(),
        }
    }

    /// Layer of a packet's rid; without simulcast everything is layer 0.
    fn layer_of(&self, rid: Option<Rid>) -> Option<usize> {
        if self.rids.len() == 1 && self.rids[0].is_none() {
            return Some(0);
        }
        self.rids.iter().position(|r| *r == rid)
    }

    /// The last measured rate of every layer, lowest first.
    fn last_rates(&self) -> Vec<Option<Bps>> {
        (0..self.rids.len())
            .map(|l| self.rates.last_rate(l))
            .collect()
    }

    /// The allocator's steps of this stream, lowest first, with their rates: the live layers
    /// and, when the lowest one has VP8 temporal layers, T0 and T0 + T1 of it below its full
    /// rate. Temporal steps only below the lowest layer: above it a lower resolution at the
    /// full frame rate costs less than a higher one at a fraction, and the picture of a
    /// subscriber the estimate cannot give even the lowest layer keeps moving, slower, instead
    /// of overrunning its link.
    fn steps(&self, now: Instant) -> (Vec<Bps>, Vec<Step>) {
        let (rates, layers) = self.live_rates(now);
        let mut out = (Vec::new(), Vec::new());
        if let (Some(&0), Some(&q), Some(shares)) =
            (layers.first(), rates.first(), self.temporal.shares())
        {
            for (tid, share) in [(0u8, shares[0]), (1, shares[1])] {
                let rate = ((q as f64 * share) as Bps).clamp(MIN_VIDEO_RATE.min(q), q);
                out.0.push(rate);
                out.1.push(Step {
                    layer: 0,
                    tid: Some(tid),
                });
            }
        }
        for (rate, layer) in rates.into_iter().zip(layers) {
            out.0.push(rate);
            out.1.push(Step::layer(layer));
        }
        out
    }

    /// Rates of the live layers (at least [`MIN_VIDEO_RATE`]) and their real indices.
    fn live_rates(&self, now: Instant) -> (Vec<Bps>, Vec<usize>) {
        (0..self.rids.len())
            .filter_map(|l| self.rates.rate(l, now).map(|r| (r.max(MIN_VIDEO_RATE), l)))
            .unzip()
    }
}

/// What `wait` found ready.
struct Ready {
    udp: bool,
    wake: bool,
    listener: bool,
    conns: Vec<SocketAddr>,
}

/// Writes as much of a connection's queue as the kernel takes now.
fn flush_tcp(c: &mut TcpConn) {
    while !c.out.is_empty() {
        match c.stream.write(&c.out) {
            Ok(0) => return,
            Ok(n) => {
                c.out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}
