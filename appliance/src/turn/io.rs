//! The sockets around [`TurnCore`]: the UDP listener, TCP and TLS listeners with their
//! connections, the relay sockets, and the timer.
//!
//! One mutex guards the core and the socket tables; every task takes it briefly, feeds the core,
//! and carries out the core's outputs with non-blocking calls (a datagram that does not fit a
//! full socket buffer is dropped, as the network would). Connections have a size-bounded send
//! queue, a handshake/partial-message timeout and an idle timeout, and their number is capped.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use turn_server_proto::api::SocketAllocateError;
use turn_server_proto::types::AddressFamily;

use super::Instant;
use super::framing::Framer;
use super::server::{FiveTuple, Now, Output, RelayRequest, Transport, TurnCore};

/// Frames queued towards one TCP/TLS client before further ones are dropped.
const TCP_SEND_QUEUE: usize = 256;
/// Largest UDP datagram read.
const MAX_DATAGRAM: usize = 65_536;

/// Limits of the I/O layer.
#[derive(Debug, Clone)]
pub struct IoLimits {
    pub relay_ip: IpAddr,
    pub relay_ports: (u16, u16),
    pub max_tcp_connections: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
}

struct TcpClient {
    send: mpsc::Sender<Vec<u8>>,
    close: Arc<Notify>,
}

struct State {
    core: TurnCore,
    udp: HashMap<SocketAddr, Arc<UdpSocket>>,
    relays: HashMap<SocketAddr, (Arc<UdpSocket>, JoinHandle<()>)>,
    tcp: HashMap<(SocketAddr, SocketAddr), TcpClient>,
}

/// The running server: shared by every task.
pub struct Io {
    state: Mutex<State>,
    limits: IoLimits,
    base: std::time::Instant,
    tcp_open: AtomicUsize,
    next_port: AtomicUsize,
    wake_timer: Notify,
}

impl Io {
    pub fn new(core: TurnCore, limits: IoLimits) -> Arc<Self> {
        let span = usize::from(limits.relay_ports.1.saturating_sub(limits.relay_ports.0)) + 1;
        let start = crate::secrets::random(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])) % span)
            .unwrap_or(0);
        Arc::new(Self {
            state: Mutex::new(State {
                core,
                udp: HashMap::new(),
                relays: HashMap::new(),
                tcp: HashMap::new(),
            }),
            limits,
            base: std::time::Instant::now(),
            tcp_open: AtomicUsize::new(0),
            next_port: AtomicUsize::new(start),
            wake_timer: Notify::new(),
        })
    }

    fn now(&self) -> Now {
        let mono =
            Instant::from_nanos(i64::try_from(self.base.elapsed().as_nanos()).unwrap_or(i64::MAX));
        let unix_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Now { mono, unix_s }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; keep serving rather than cascade.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Feeds the core under the lock and carries out what it asks for.
    fn with_core(self: &Arc<Self>, f: impl FnOnce(&mut TurnCore, Now)) {
        let now = self.now();
        let mut st = self.lock();
        f(&mut st.core, now);
        self.execute(&mut st, now);
    }

    fn execute(self: &Arc<Self>, st: &mut State, now: Now) {
        let mut woke = false;
        while let Some(out) = st.core.poll_output() {
            match out {
                Output::Transmit {
                    transport: Transport::Udp,
                    from,
                    to,
                    data,
                } => {
                    let sock = st
                        .udp
                        .get(&from)
                        .or_else(|| st.relays.get(&from).map(|(s, _)| s));
                    if let Some(sock) = sock {
                        // Full buffer or unreachable peer: the datagram is lost, as on a network.
                        let _ = sock.try_send_to(&data, to);
                    }
                }
                Output::Transmit {
                    transport: Transport::Tcp,
                    from,
                    to,
                    data,
                } => {
                    if let Some(c) = st.tcp.get(&(from, to))
                        && c.send.try_send(data).is_err()
                    {
                        st.core.metrics().dropped("tcp_queue_full");
                    }
                }
                Output::BindRelay(req) => {
                    let result = self.bind_relay(st, req);
                    st.core.relay_bound(req, result, now);
                    woke = true;
                }
                Output::CloseRelay(addr) => {
                    if let Some((_, task)) = st.relays.remove(&addr) {
                        task.abort();
                    }
                }
                Output::CloseTcp { listen, client } => {
                    if let Some(c) = st.tcp.remove(&(listen, client)) {
                        c.close.notify_one();
                    }
                }
            }
        }
        if woke {
            self.wake_timer.notify_one();
        }
    }

    /// Binds a relay socket on a free port of the range, starting at a random place.
    fn bind_relay(
        self: &Arc<Self>,
        st: &mut State,
        req: RelayRequest,
    ) -> Result<SocketAddr, SocketAllocateError> {
        let ip = self.limits.relay_ip;
        let family_ok = matches!(
            (req.family, ip),
            (AddressFamily::IPV4, IpAddr::V4(_)) | (AddressFamily::IPV6, IpAddr::V6(_))
        );
        if !family_ok {
            return Err(SocketAllocateError::AddressFamilyNotSupported);
        }
        let (lo, hi) = self.limits.relay_ports;
        let span = usize::from(hi - lo) + 1;
        // Try at most 64 ports: a full range must answer 508 quickly, not scan 10 000 ports.
        for _ in 0..span.min(64) {
            let n = self.next_port.fetch_add(1, Ordering::Relaxed) % span;
            let port = lo + n as u16;
            let addr = SocketAddr::new(ip, port);
            if st.relays.contains_key(&addr) {
                continue;
            }
            let Ok(std_sock) = std::net::UdpSocket::bind(addr) else {
                continue;
            };
            if std_sock.set_nonblocking(true).is_err() {
                continue;
            }
            let Ok(sock) = UdpSocket::from_std(std_sock) else {
                continue;
            };
            let sock = Arc::new(sock);
            let task = tokio::spawn(relay_loop(self.clone(), sock.clone(), addr));
            st.relays.insert(addr, (sock, task));
            return Ok(addr);
        }
        tracing::warn!(range = ?self.limits.relay_ports, "no free relay port (turn.relay_port_min..relay_port_max)");
        Err(SocketAllocateError::InsufficientCapacity)
    }

    /// Serves a UDP listener until the task is dropped.
    pub async fn serve_udp(self: Arc<Self>, sock: UdpSocket) {
        let sock = Arc::new(sock);
        let Ok(local) = sock.local_addr() else { return };
        self.lock().udp.insert(local, sock.clone());
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                continue;
            };
            let tuple = FiveTuple {
                transport: Transport::Udp,
                listen: local,
                client: from,
            };
            let data = &buf[..n];
            self.with_core(|core, now| core.recv_from_client(tuple, data, now));
        }
    }

    /// Runs the core's timers.
    pub async fn run_timer(self: Arc<Self>) {
        loop {
            let now = self.now();
            let next = {
                let mut st = self.lock();
                st.core.handle_timeout(now);
                self.execute(&mut st, now);
                st.core.next_timeout(now)
            };
            let wait = next
                .checked_duration_since(now.mono)
                .unwrap_or(Duration::ZERO)
                .clamp(Duration::from_millis(10), Duration::from_secs(1));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {},
                _ = self.wake_timer.notified() => {},
            }
        }
    }

    /// Accepts TCP connections; `tls` wraps each in TLS first.
    pub async fn serve_tcp(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) {
        let Ok(local) = listener.local_addr() else {
            return;
        };
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                // Out of descriptors and the like: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            if self.tcp_open.fetch_add(1, Ordering::AcqRel) >= self.limits.max_tcp_connections {
                self.tcp_open.fetch_sub(1, Ordering::AcqRel);
                drop(stream);
                continue;
            }
            let _ = stream.set_nodelay(true);
            let io = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                io.lock().core.metrics().tcp_connection_opened();
                match tls {
                    None => io.clone().serve_connection(stream, local, peer).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(
                            io.limits.handshake_timeout,
                            acceptor.accept(stream),
                        )
                        .await
                        {
                            Ok(Ok(s)) => io.clone().serve_connection(s, local, peer).await,
                            Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    }
                }
                io.lock().core.metrics().tcp_connection_closed();
                io.tcp_open.fetch_sub(1, Ordering::AcqRel);
            });
        }
    }

    async fn serve_connection<S>(self: Arc<Self>, stream: S, local: SocketAddr, peer: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_SEND_QUEUE);
        let close = Arc::new(Notify::new());
        self.lock().tcp.insert(
            (local, peer),
            TcpClient {
                send: tx,
                close: close.clone(),
            },
        );
        let idle = self.limits.idle_timeout;
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let writer = tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                // A client that does not read for the idle time is gone.
                match tokio::time::timeout(idle, wr.write_all(&frame)).await {
                    Ok(Ok(())) => {}
                    _ => break,
                }
            }
            let _ = wr.shutdown().await;
            let _ = stop_tx.send(true);
        });
        let tuple = FiveTuple {
            transport: Transport::Tcp,
            listen: local,
            client: peer,
        };
        let mut framer = Framer::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            // A started frame must complete quickly; between frames the idle timeout applies.
            let limit = if framer.pending() > 0 {
                self.limits.handshake_timeout
            } else {
                idle
            };
            let n = tokio::select! {
                r = tokio::time::timeout(limit, rd.read(&mut buf)) => match r {
                    Ok(Ok(n)) if n > 0 => n,
                    _ => break,
                },
                _ = close.notified() => break,
                _ = stop_rx.changed() => break,
            };
            framer.push(&buf[..n]);
            let mut frames = Vec::new();
            let mut bad = false;
            loop {
                match framer.next_frame() {
                    Ok(Some(f)) => frames.push(f.to_vec()),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(%peer, "closing TURN connection: {e}");
                        self.lock().core.metrics().refused("malformed");
                        bad = true;
                        break;
                    }
                }
            }
            if !frames.is_empty() {
                self.with_core(|core, now| {
                    for f in &frames {
                        core.recv_from_client(tuple, f, now);
                    }
                });
            }
            if bad {
                break;
            }
        }
        self.lock().tcp.remove(&(local, peer));
        self.with_core(|core, now| core.tcp_closed(local, peer, now));
        writer.abort();
    }
}

async fn relay_loop(io: Arc<Io>, sock: Arc<UdpSocket>, local: SocketAddr) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let data = &buf[..n];
        io.with_core(|core, now| core.recv_from_peer(local, from, data, now));
    }
}
