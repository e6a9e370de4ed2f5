//! The one HTTP server loop every web-facing service uses (setup page, signaling, meeting page).
//!
//! It accepts TCP connections up to a bound, completes the TLS handshake within a deadline
//! (plain HTTP only where a service asks for it, e.g. behind a TLS-terminating proxy or for
//! loopback tools), serves an axum router over HTTP/1.1 or HTTP/2 (with upgrades, for
//! WebSockets) with the client address as axum's `ConnectInfo`, and stops accepting when the
//! shutdown signal fires, giving open connections a grace period.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// Limits of one HTTPS listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves `app` over HTTPS on `listener` until `shutdown` becomes true.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) {
    accept_loop(
        listener,
        Some(TlsAcceptor::from(tls)),
        app,
        limits,
        shutdown,
    )
    .await
}

/// Serves `app` over plain HTTP on `listener`, with the same bound and shutdown as [`serve`].
pub async fn serve_plain(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) {
    accept_loop(listener, None, app, limits, shutdown).await
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.changed() => return,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        let app = app.clone();
        let conn_shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Some(acceptor) = tls else {
                serve_connection(tcp, peer, app, conn_shutdown).await;
                return;
            };
            match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => serve_connection(stream, peer, app, conn_shutdown).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

async fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Handlers see the client address as axum's `ConnectInfo`, as with `axum::serve`.
    let app = app.map_request(
        move |mut req: axum::extract::Request<hyper::body::Incoming>| {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            req
        },
    );
    let service = TowerToHyperService::new(app);
    let builder = Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
        }
    }
}
