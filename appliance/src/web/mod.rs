//! The `web` service: the admin setup page on its own HTTPS port.
//!
//! For now it serves the read-only status page (services, state, PID, uptime, restarts, last
//! exit) from the supervisor's own status, fetched over the supervisor link; claiming, login and
//! configuration arrive with the setup-page work. It never reads secrets other than the TLS key.

mod page;

use std::net::TcpListener as StdTcpListener;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use crate::config::{Config, DataDir};
use crate::https;
use crate::service::Service;
use crate::service_runtime::{self, ServiceContext};
use crate::supervisor::link::ServiceLink;
use crate::tls;

/// Root-only preparation: the TLS key and the bound listener.
struct Prepared {
    tls: Arc<rustls::ServerConfig>,
    listener: StdTcpListener,
}

/// Runs the web service process.
pub fn main(config: Config, data: DataDir) -> Result<()> {
    service_runtime::run(Service::Web, config, data, 2, prepare, serve)
}

fn prepare(config: &Config, data: &DataDir) -> Result<Prepared> {
    let tls = tls::load_server_config(data)?;
    let listener = StdTcpListener::bind(config.web.listen).with_context(|| {
        format!(
            "binding the setup page to {} (web.listen)",
            config.web.listen
        )
    })?;
    listener.set_nonblocking(true)?;
    Ok(Prepared { tls, listener })
}

async fn serve(ctx: ServiceContext, p: Prepared) -> Result<()> {
    let listener = tokio::net::TcpListener::from_std(p.listener)?;
    let addr = listener.local_addr()?;
    let app = router(ctx.link.clone());
    ctx.link.ready().await;
    ctx.link
        .status(&format!("setup page on https://{addr}/"))
        .await;
    tracing::info!(%addr, "setup page listening");
    https::serve(
        listener,
        p.tls,
        app,
        https::Limits::default(),
        ctx.shutdown.clone(),
    )
    .await;
    Ok(())
}

fn router(link: Arc<ServiceLink>) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/api/status", get(status_json))
        .with_state(link)
        .layer(axum::middleware::map_response(security_headers))
}

async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    r
}

async fn status_json(State(link): State<Arc<ServiceLink>>) -> Response {
    match link.query_status().await {
        Ok(s) => axum::Json(s).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("status unavailable: {e}\n"),
        )
            .into_response(),
    }
}

async fn status_page(State(link): State<Arc<ServiceLink>>) -> Html<String> {
    Html(page::render(
        link.query_status().await.map_err(|e| e.to_string()),
    ))
}
