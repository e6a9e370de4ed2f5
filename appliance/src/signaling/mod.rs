//! The signaling service: the Nextcloud Talk HPB client API (`/spreed`), the backend API
//! (`/api/v1/...`), and the built-in backend for stand-alone rooms.
//!
//! - [`api`]: JSON shapes and feature ids; [`hub`]: the sans-I/O session and room state;
//! - [`checksum`], [`jwt`], [`session_id`]: the authentication primitives;

pub mod api;
pub mod backend_client;
pub mod backends;
pub mod builtin;
pub mod checksum;
pub mod connection;
pub mod http;
pub mod hub;
pub mod jwt;
pub mod meeting;
pub mod nextcloud;
pub mod proxy_client;
pub mod seen;
pub mod server;
pub mod session_id;
pub mod throttle;

use std::net::TcpListener as StdTcpListener;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::config::{Config, DataDir};
use crate::secrets::{self, Secret};
use crate::service::Service;
use crate::service_runtime::{self, ServiceContext};
use crate::{https, tls};

/// What is read and bound as root, before privileges are dropped.
struct Prepared {
    tls: Arc<rustls::ServerConfig>,
    listener: StdTcpListener,
    http_listener: Option<StdTcpListener>,
    backend_secret: String,
    backend_secrets: std::collections::HashMap<String, String>,
    internal_secret: String,
    turn_secret: String,
    hash_key: String,
    block_key: String,
    /// The built-in backend's room file, in a directory the service user owns.
    rooms_file: Option<std::path::PathBuf>,
    /// The proxy token key (private PEM) and the box certificate, for the SFU client.
    proxy_key: String,
    box_cert: Option<Vec<u8>>,
}

/// Runs the signaling service process.
pub fn main(config: Config, data: DataDir) -> Result<()> {
    service_runtime::run(Service::Signaling, config, data, 2, prepare, serve)
}

fn prepare(config: &Config, data: &DataDir) -> Result<Prepared> {
    let tls = tls::load_server_config(data)?;
    let bind = |addr: std::net::SocketAddr, key: &str| -> Result<StdTcpListener> {
        let l = StdTcpListener::bind(addr)
            .with_context(|| format!("binding the signaling API to {addr} ({key})"))?;
        l.set_nonblocking(true)?;
        Ok(l)
    };
    let listener = bind(config.signaling.listen, "signaling.listen")?;
    let http_listener = config
        .signaling
        .http_listen
        .map(|a| bind(a, "signaling.http_listen"))
        .transpose()?;
    Ok(Prepared {
        tls,
        listener,
        http_listener,
        backend_secret: secrets::read(data, Secret::BackendSecret)?,
        backend_secrets: backends::read_secret_files(&config.signaling)?,
        internal_secret: secrets::read(data, Secret::InternalSecret)?,
        turn_secret: secrets::read(data, Secret::TurnSecret)?,
        hash_key: secrets::read(data, Secret::SessionHashKey)?,
        block_key: secrets::read(data, Secret::SessionBlockKey)?,
        proxy_key: secrets::proxy_token_keys(data)?.0,
        box_cert: std::fs::read(tls::cert_path(data)).ok(),
        rooms_file: if config.signaling.builtin_backend {
            Some(rooms_dir(config, data)?.join("rooms.json"))
        } else {
            None
        },
    })
}

/// `DATA_DIR/rooms/`, where the built-in backend keeps its rooms. The service writes it after
/// dropping root, so when started as root it hands the directory to the service user and lets
/// that user pass through the data directory (0711: no listing; secrets/ and tls/ stay 0700).
fn rooms_dir(config: &Config, data: &DataDir) -> Result<std::path::PathBuf> {
    let dir = data.root.join("rooms");
    crate::storage::hand_over_dir(&dir, 0o700, &config.supervisor.user)?;
    Ok(dir)
}

async fn serve(ctx: ServiceContext, p: Prepared) -> Result<()> {
    let cfg = ctx.config.signaling.clone();
    let backends = backends::Backends::new(&cfg, &p.backend_secrets, &p.backend_secret);
    let client = nextcloud::NextcloudClient::new(
        Duration::from_secs(cfg.backend_timeout_s),
        cfg.connections_per_host as usize,
    )?;
    let builtin = match p.rooms_file.clone() {
        Some(f) => Some(Arc::new(builtin::BuiltinBackend::new(Some(f))?)),
        None => None,
    };
    let proxy = match &cfg.sfu_url {
        Some(url) => Some(Arc::new(
            proxy_client::ProxyClient::new(url, &p.proxy_key, p.box_cert.as_deref())
                .context("signaling.sfu_url")?,
        )),
        None => None,
    };
    let codec = session_id::SessionIdCodec::new(p.hash_key.as_bytes(), p.block_key.as_bytes())
        .context("the session keys in the secrets directory")?;
    let server = Arc::new(server::Server::new(
        cfg.clone(),
        backends,
        client,
        builtin,
        proxy.clone(),
        codec,
        p.internal_secret.into_bytes(),
        p.turn_secret.into_bytes(),
        ctx.config.turn.enabled.then_some(ctx.config.turn.port),
    ));
    let state = http::AppState {
        server: server.clone(),
        shutdown: ctx.shutdown.clone(),
    };
    let app = http::router(state);
    let listener = tokio::net::TcpListener::from_std(p.listener)?;
    let addr = listener.local_addr()?;
    let limits = https::Limits {
        max_connections: cfg.max_sessions as usize,
        ..https::Limits::default()
    };
    if let Some(l) = p.http_listener {
        let l = tokio::net::TcpListener::from_std(l)?;
        tracing::info!(addr = %l.local_addr()?, "signaling plain HTTP listening");
        tokio::spawn(https::serve_plain(
            l,
            app.clone(),
            limits,
            ctx.shutdown.clone(),
        ));
    }
    if let Some(proxy) = proxy {
        tokio::spawn(proxy.run(server.clone(), ctx.shutdown.clone()));
    }
    let timers = server.clone();
    let mut stop = ctx.shutdown.clone();
    let ping_every = Duration::from_secs(cfg.ping_interval_s);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut ping = tokio::time::interval(ping_every);
        loop {
            tokio::select! {
                _ = tick.tick() => timers.tick().await,
                _ = ping.tick() => {
                    let s = timers.clone();
                    tokio::spawn(async move { s.ping_backends().await });
                }
                _ = stop.changed() => break,
            }
        }
    });
    ctx.link.ready().await;
    ctx.link
        .status(&format!("signaling on https://{addr}/"))
        .await;
    tracing::info!(%addr, backends = cfg.backends.len(), allow_all = cfg.allow_all, "signaling listening");
    https::serve(listener, p.tls, app, limits, ctx.shutdown.clone()).await;
    Ok(())
}
