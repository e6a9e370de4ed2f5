//! The SFU service (`talkbox sfu`): media workers from media-core behind the `/proxy`
//! WebSocket of the spreed signaling proxy protocol.
//!
//! - [`protocol`]: the proxy protocol's JSON shapes; [`token`]: the RS256 hello token;
//! - [`server`]: the control server that maps proxy clients onto worker sessions;
//! - [`metrics`]: its Prometheus `/metrics` (the workers' counters, for
//!   `sfu.metrics_allowed_ips`).
//!
//! Start-up follows `service_runtime`: sockets are bound and keys read in `prepare` (maybe as
//! root), worker threads start in `serve` after privileges are dropped.

pub mod metrics;
pub mod protocol;
pub mod server;
pub mod token;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener as StdTcpListener, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use media_core::io::MmsgSocket;
use media_core::session::SessionSetup;
use media_core::worker::{self, WorkerCommand, WorkerConfig};

use crate::config::{Config, DataDir};
use crate::secrets;
use crate::service::Service;
use crate::service_runtime::{self, ServiceContext};
use crate::{https, tls};

/// What is bound and read before privileges are dropped.
struct Prepared {
    listener: StdTcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    sockets: Vec<UdpSocket>,
    /// Passive ICE-TCP listeners, one per worker on its media port (when `sfu.ice_tcp`).
    tcp: Vec<Option<StdTcpListener>>,
    keys: token::TokenKeys,
}

/// Runs the SFU service process.
pub fn main(config: Config, data: DataDir) -> Result<()> {
    service_runtime::run(Service::Sfu, config, data, 1, prepare, serve)
}

/// Media workers for this config: `sfu.workers`, or one per core left after the control plane.
pub fn worker_count(config: &Config) -> usize {
    match config.sfu.workers {
        0 => std::thread::available_parallelism()
            .map(|n| n.get().saturating_sub(1))
            .unwrap_or(1)
            .clamp(
                1,
                usize::from(config.sfu.media_port_max - config.sfu.media_port_min) + 1,
            ),
        n => n as usize,
    }
}

fn prepare(config: &Config, data: &DataDir) -> Result<Prepared> {
    let c = &config.sfu;
    let listener = StdTcpListener::bind(c.listen).with_context(|| {
        format!(
            "binding the SFU control endpoint to {} (sfu.listen)",
            c.listen
        )
    })?;
    listener.set_nonblocking(true)?;
    let tls = if c.tls {
        Some(tls::load_server_config(data)?)
    } else {
        None
    };
    let mut sockets = Vec::new();
    let mut tcp = Vec::new();
    for i in 0..worker_count(config) {
        let port = c.media_port_min + i as u16;
        let addr = SocketAddr::new(c.media_bind, port);
        let s = UdpSocket::bind(addr).with_context(|| {
            format!("binding media worker {i} to UDP {addr} (sfu.media_port_min + {i})")
        })?;
        sockets.push(s);
        tcp.push(if c.ice_tcp {
            Some(StdTcpListener::bind(addr).with_context(|| {
                format!("binding media worker {i} to TCP {addr} for ICE-TCP (sfu.ice_tcp)")
            })?)
        } else {
            None
        });
    }
    crate::sizing::Sizer::prepare(config, data)?;
    let mut keys = token::TokenKeys::default();
    let (_, public) = secrets::proxy_token_keys(data)?;
    keys.add_pem(secrets::PROXY_TOKEN_ID, &public)
        .map_err(anyhow::Error::msg)?;
    for entry in &c.trusted_token_keys {
        let Some((id, path)) = entry.split_once('=') else {
            continue;
        };
        let pem = std::fs::read_to_string(path).with_context(|| {
            format!("reading token key {id:?} from {path} (sfu.trusted_token_keys)")
        })?;
        keys.add_pem(id, &pem).map_err(anyhow::Error::msg)?;
    }
    Ok(Prepared {
        listener,
        tls,
        sockets,
        tcp,
        keys,
    })
}

/// The addresses to announce for a worker on `port`: the configured public IPs, else the
/// interface addresses (loopback only when there is nothing else).
pub fn announced_addresses(public_ips: &[String], port: u16) -> Vec<SocketAddr> {
    let mut ips: Vec<IpAddr> = public_ips.iter().filter_map(|s| s.parse().ok()).collect();
    if ips.is_empty()
        && let Ok(addrs) = nix::ifaddrs::getifaddrs()
    {
        for ifa in addrs {
            let Some(a) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) else {
                continue;
            };
            let ip = a.ip();
            if !ip.is_loopback()
                && !ip.is_link_local()
                && !ip.is_unspecified()
                && !ips.contains(&IpAddr::V4(ip))
            {
                ips.push(IpAddr::V4(ip));
            }
        }
    }
    if ips.is_empty() {
        ips.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    ips.into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect()
}

async fn serve(ctx: ServiceContext, p: Prepared) -> Result<()> {
    let c = ctx.config.sfu.clone();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut handles = Vec::new();
    let mut joins = Vec::new();
    for (i, (socket, tcp)) in p.sockets.into_iter().zip(p.tcp).enumerate() {
        let port = socket.local_addr()?.port();
        let candidates = announced_addresses(&c.public_ips, port);
        let mut setup = SessionSetup::new(candidates.clone())
            .context("creating the DTLS certificate of the media workers")?;
        setup.tcp = tcp.is_some();
        let io = MmsgSocket::new(socket).context("preparing a media socket")?;
        let tx = ev_tx.clone();
        let config = WorkerConfig {
            index: i as u16,
            // Core 0 is left to the control plane when there is more than one.
            core: (cores > 1).then(|| 1 + i % (cores - 1)),
            setup,
            ice_timeout: Duration::from_secs(c.ice_timeout_s),
            keyframe_interval: Duration::from_millis(500),
            // Until sizing knows the link (below): the allocator then follows estimates only.
            egress_budget: u64::MAX,
            upgrade_hold: Duration::from_secs(2),
        };
        let (h, j) = worker::spawn(
            config,
            io,
            tcp,
            Box::new(move |e| {
                let _ = tx.send(e);
            }),
        )
        .with_context(|| format!("starting media worker {i}"))?;
        tracing::info!(worker = i, port, candidates = ?candidates, "media worker started");
        handles.push(h);
        joins.push(j);
    }
    drop(ev_tx);
    let sfu = server::Sfu::new(
        handles.clone(),
        p.keys,
        Duration::from_secs(c.resume_grace_s),
        ctx.shutdown.clone(),
        c.metrics_allowed_ips.clone(),
    );
    let events = sfu.clone();
    tokio::spawn(async move {
        while let Some(e) = ev_rx.recv().await {
            events.worker_event(e);
        }
    });
    tokio::spawn(sfu.clone().load_updates(ctx.shutdown.clone()));
    // Sizing: the egress budget the allocator plans within, kept current (links, measurement).
    let (sizing_tx, mut sizing_rx) = tokio::sync::watch::channel(None);
    tokio::spawn(
        crate::sizing::Sizer::new(ctx.config.clone(), ctx.data.clone())
            .run(sizing_tx, ctx.shutdown.clone()),
    );
    let app = server::router(sfu);
    let listener = tokio::net::TcpListener::from_std(p.listener)?;
    let addr = listener.local_addr()?;
    let limits = https::Limits {
        max_connections: 256,
        ..https::Limits::default()
    };
    ctx.link.ready().await;
    let status = format!("sfu: {} workers, /proxy on {addr}", handles.len());
    ctx.link.status(&status).await;
    let link = ctx.link.clone();
    let workers = handles.clone();
    tokio::spawn(async move {
        while sizing_rx.changed().await.is_ok() {
            let bps = sizing_rx.borrow().as_ref().and_then(|c| c.budget_bps);
            // Each worker gets an equal share: rooms are spread over the workers.
            let share = bps.map_or(u64::MAX, |b| b / workers.len().max(1) as u64);
            for w in &workers {
                w.send(WorkerCommand::SetEgressBudget { bps: share });
            }
            let budget = bps.map_or("no limit known".to_string(), |b| {
                format!("{:.1} Mbit/s", b as f64 / 1e6)
            });
            link.status(&format!("{status}, egress budget {budget}"))
                .await;
        }
    });
    tracing::info!(%addr, workers = handles.len(), tls = p.tls.is_some(), "sfu control listening");
    match p.tls {
        Some(tls) => https::serve(listener, tls, app, limits, ctx.shutdown.clone()).await,
        None => https::serve_plain(listener, app, limits, ctx.shutdown.clone()).await,
    }
    for h in &handles {
        h.send(WorkerCommand::Shutdown);
    }
    tokio::task::spawn_blocking(move || {
        for j in joins {
            let _ = j.join();
        }
    })
    .await?;
    Ok(())
}
