//! The `turn` service: STUN (RFC 8489) and TURN (RFC 8656) over UDP and TCP on `turn.port` and
//! over TLS on `turn.tls_port`, for clients behind NATs and firewalls.
//!
//! - [`credentials`]: the TURN REST credential scheme (pure; the signaling service uses it too);
//! - [`auth`]: which secret signed a request, expiry, rotation;
//! - [`policy`]: peer address filter, quotas, bandwidth cap;
//! - [`server`]: the sans-I/O core around `turn-server-proto`;
//! - [`framing`]: TURN over a byte stream;
//! - [`io`]: sockets, connections and timers around the core;
//! - [`metrics`]: Prometheus counters.
//!
//! Not here: TURN credentials for clients (the signaling service hands them out with
//! [`credentials::rest_credentials`]) and relaying straight into the SFU's workers.

pub mod auth;
pub mod credentials;
pub mod framing;
pub mod io;
pub mod metrics;
pub mod policy;
pub mod server;

/// Client messages for the unit tests, shared with the integration tests.
#[cfg(test)]
#[path = "../../tests/common/stun_msgs.rs"]
pub(crate) mod test_msgs;

use std::net::{IpAddr, SocketAddr, TcpListener as StdTcpListener, UdpSocket as StdUdpSocket};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

pub use stun_proto::Instant;
/// The TURN engine, for tools that build messages of the same version (the fuzz target).
pub use turn_server_proto as engine;
use turn_server_proto::stun as stun_proto;

use crate::config::{Config, DataDir};
use crate::secrets::{self, Secret};
use crate::service::Service;
use crate::service_runtime::{self, ServiceContext};
use crate::tls;

use self::auth::RestAuth;
use self::io::{Io, IoLimits};
use self::metrics::Metrics;
use self::policy::{PeerPolicy, Quotas};
use self::server::{CoreConfig, Transport, TurnCore};

/// What `prepare` gathers while the process may still be root.
struct Prepared {
    secret: String,
    previous_secret: Option<String>,
    tls: Arc<rustls::ServerConfig>,
    udp: StdUdpSocket,
    tcp: StdTcpListener,
    tls_listener: StdTcpListener,
    metrics_listener: Option<StdTcpListener>,
    own_addresses: Vec<IpAddr>,
}

/// Runs the TURN service process.
pub fn main(config: Config, data: DataDir) -> Result<()> {
    service_runtime::run(Service::Turn, config, data, 2, prepare, serve)
}

fn prepare(config: &Config, data: &DataDir) -> Result<Prepared> {
    let c = &config.turn;
    let secret = secrets::read(data, Secret::TurnSecret)?;
    let previous_secret = secrets::read_previous(data, Secret::TurnSecret)?;
    // The box's certificate, but TURN's ALPN (RFC 7443): the shared config offers h2 and
    // http/1.1, and a client asking only for "stun.turn" would otherwise fail the handshake.
    let mut tls_config = (*tls::load_server_config(data)?).clone();
    tls_config.alpn_protocols = vec![b"stun.turn".to_vec()];
    let tls = Arc::new(tls_config);
    let at = |port| SocketAddr::new(c.listen_address, port);
    let udp = StdUdpSocket::bind(at(c.port)).with_context(|| {
        format!(
            "binding TURN to UDP {} (turn.listen_address, turn.port)",
            at(c.port)
        )
    })?;
    udp.set_nonblocking(true)?;
    enlarge_buffers(&udp);
    let tcp = StdTcpListener::bind(at(c.port)).with_context(|| {
        format!(
            "binding TURN to TCP {} (turn.listen_address, turn.port)",
            at(c.port)
        )
    })?;
    tcp.set_nonblocking(true)?;
    let tls_listener = StdTcpListener::bind(at(c.tls_port)).with_context(|| {
        format!(
            "binding TURN over TLS to {} (turn.tls_port)",
            at(c.tls_port)
        )
    })?;
    tls_listener.set_nonblocking(true)?;
    let metrics_listener = if c.metrics_listen.is_empty() {
        None
    } else {
        let l = StdTcpListener::bind(&c.metrics_listen).with_context(|| {
            format!(
                "binding TURN metrics to {} (turn.metrics_listen)",
                c.metrics_listen
            )
        })?;
        l.set_nonblocking(true)?;
        Some(l)
    };
    let mut own_addresses = interface_addresses();
    own_addresses.push(c.listen_address);
    own_addresses.push(c.relay_ip());
    Ok(Prepared {
        secret,
        previous_secret,
        tls,
        udp,
        tcp,
        tls_listener,
        metrics_listener,
        own_addresses,
    })
}

/// Bytes of kernel buffer for the UDP listener: every client's datagrams queue there, and a
/// burst larger than the default (about 200 KiB) is lost before the service sees it.
const UDP_LISTENER_BUFFER: usize = 4 << 20;

/// Raises the UDP listener's buffers; the `*Force` options need root (we are, in `prepare`) and
/// pass `net.core.rmem_max`. Failure only costs throughput, so it is logged, not fatal.
fn enlarge_buffers(sock: &StdUdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    let rcv = setsockopt(sock, sockopt::RcvBufForce, &UDP_LISTENER_BUFFER)
        .or_else(|_| setsockopt(sock, sockopt::RcvBuf, &UDP_LISTENER_BUFFER));
    let snd = setsockopt(sock, sockopt::SndBufForce, &UDP_LISTENER_BUFFER)
        .or_else(|_| setsockopt(sock, sockopt::SndBuf, &UDP_LISTENER_BUFFER));
    if let Err(e) = rcv.and(snd) {
        tracing::warn!("cannot enlarge the TURN UDP socket buffers: {e}");
    }
}

/// The box's own addresses, which peers must not be (the relay would talk to the box itself).
fn interface_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|s| {
            if let Some(v4) = s.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

/// Ports of the box that relayed clients may reach on its own addresses: the relays of other
/// allocations (two relay-only clients) and the SFU's media ports.
fn own_peer_ports(config: &Config) -> Vec<(u16, u16)> {
    let mut ports = vec![(config.turn.relay_port_min, config.turn.relay_port_max)];
    if config.sfu.enabled {
        ports.push((config.sfu.media_port_min, config.sfu.media_port_max));
    }
    ports
}

/// Builds the sans-I/O core for a config (also used by tests and the fuzz target).
pub fn core_for(
    config: &Config,
    listeners: &[(Transport, SocketAddr)],
    secret: String,
    previous: Option<String>,
    own: Vec<IpAddr>,
) -> TurnCore {
    let c = &config.turn;
    let auth = RestAuth::new(c.realm.clone(), secret, previous);
    let core_config = CoreConfig {
        policy: PeerPolicy::new(&c.allowed_peers, own, own_peer_ports(config)),
        quotas: Quotas {
            per_user: c.max_allocations_per_user,
            total: c.max_allocations,
        },
        bandwidth_per_allocation_kbps: c.bandwidth_per_allocation_kbps,
        nonce_lifetime_s: c.nonce_lifetime_s,
    };
    TurnCore::new(listeners, auth, core_config, Metrics::new())
}

async fn serve(ctx: ServiceContext, p: Prepared) -> Result<()> {
    let c = &ctx.config.turn;
    let udp = tokio::net::UdpSocket::from_std(p.udp)?;
    let tcp = tokio::net::TcpListener::from_std(p.tcp)?;
    let tls_listener = tokio::net::TcpListener::from_std(p.tls_listener)?;
    let listeners = [
        (Transport::Udp, udp.local_addr()?),
        (Transport::Tcp, tcp.local_addr()?),
        (Transport::Tcp, tls_listener.local_addr()?),
    ];
    let core = core_for(
        &ctx.config,
        &listeners,
        p.secret,
        p.previous_secret,
        p.own_addresses,
    );
    let metrics = core.metrics().clone();
    let relay_ip = c.relay_ip();
    let io = Io::new(
        core,
        IoLimits {
            relay_ip,
            relay_ports: (c.relay_port_min, c.relay_port_max),
            max_tcp_connections: c.max_tcp_connections as usize,
            handshake_timeout: Duration::from_secs(c.tcp_handshake_timeout_s),
            idle_timeout: Duration::from_secs(c.tcp_idle_timeout_s),
        },
    );
    let acceptor = tokio_rustls::TlsAcceptor::from(p.tls);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(io.clone().serve_udp(udp));
    tasks.spawn(io.clone().serve_tcp(tcp, None));
    tasks.spawn(io.clone().serve_tcp(tls_listener, Some(acceptor)));
    tasks.spawn(io.clone().run_timer());
    if let Some(l) = p.metrics_listener {
        let l = tokio::net::TcpListener::from_std(l)?;
        tasks.spawn(serve_metrics(l, metrics));
    }
    ctx.link.ready().await;
    let msg = format!(
        "TURN on udp/tcp {}, tls {}, relay ports {}-{}",
        listeners[0].1, listeners[2].1, c.relay_port_min, c.relay_port_max
    );
    ctx.link.status(&msg).await;
    tracing::info!("{msg}");
    let mut shutdown = ctx.shutdown.clone();
    let _ = shutdown.wait_for(|s| *s).await;
    tasks.abort_all();
    Ok(())
}

async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Metrics) {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    m.render(),
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!("TURN metrics listener stopped: {e}");
    }
}
