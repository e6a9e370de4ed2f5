//! The `web` service: the admin setup page on its own HTTPS port (`web.listen`, default 9443).
//!
//! It serves one static page (HTML/CSS/JS compiled into the binary, no build step) and a JSON
//! API behind it. The service runs as the unprivileged service user and holds no admin secret
//! on disk: claim state and every change go to the supervisor as narrow requests over the link
//! ([`requests`], carried out by [`store`] in the supervisor). Sessions, CSRF and throttling
//! live in [`auth`]; certificate checks in [`cert`]; the charts' history in [`metrics`]; the
//! API handlers in [`api`].

pub mod acme;
pub mod api;
pub mod auth;
pub mod backup;
pub mod cert;
pub mod metrics;
pub mod nctest;
pub mod page;
pub mod requests;
pub mod store;
pub mod udpcheck;

use std::net::TcpListener as StdTcpListener;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::http::{HeaderValue, header};
use axum::response::Response;

use crate::config::{Config, DataDir};
use crate::https;
use crate::service::Service;
use crate::service_runtime::{self, ServiceContext};
use crate::supervisor::link::ServiceLink;
use crate::tls;

/// Root-only preparation: the TLS certificate and key, and the bound listener.
struct Prepared {
    cert: Arc<cert::SwappableCert>,
    cert_pem: Vec<u8>,
    listener: StdTcpListener,
    /// Plain HTTP for the ACME CA's HTTP-01 challenges (`web.acme_http_listen`), when on.
    acme_listener: Option<StdTcpListener>,
    /// For the UDP media self-check, or why it cannot run.
    sfu_probe: Result<Arc<udpcheck::SfuProbe>, String>,
}

/// Runs the web service process.
pub fn main(config: Config, data: DataDir) -> Result<()> {
    service_runtime::run(Service::Web, config, data, 2, prepare, serve)
}

fn prepare(config: &Config, data: &DataDir) -> Result<Prepared> {
    let cert_path = tls::cert_path(data);
    let cert_pem =
        std::fs::read(&cert_path).with_context(|| format!("reading {}", cert_path.display()))?;
    let key_path = tls::key_path(data);
    let key_pem =
        std::fs::read(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            anyhow::anyhow!("{}: not a PEM certificate chain: {e}", cert_path.display())
        })?;
    let ck = cert::certified_key(chain, &key_pem)
        .map_err(|e| anyhow::anyhow!("{}: {e}", key_path.display()))?;
    let listener = StdTcpListener::bind(config.web.listen).with_context(|| {
        format!(
            "binding the setup page to {} (web.listen)",
            config.web.listen
        )
    })?;
    listener.set_nonblocking(true)?;
    let acme_listener = if config.web.acme_enabled {
        let l = StdTcpListener::bind(config.web.acme_http_listen).with_context(|| {
            format!(
                "binding the ACME challenge listener to {} (web.acme_http_listen)",
                config.web.acme_http_listen
            )
        })?;
        l.set_nonblocking(true)?;
        Some(l)
    } else {
        None
    };
    // Read while still root, like every service's secrets (the key file is 0600).
    let sfu_probe = match (
        udpcheck::unavailable(config),
        config.signaling.sfu_url.as_deref(),
    ) {
        (Some(why), _) => Err(why),
        (None, None) => Err("no SFU is configured (signaling.sfu_url)".into()),
        (None, Some(url)) => crate::secrets::proxy_token_keys(data)
            .map_err(|e| format!("the SFU cannot be asked: {e}"))
            .and_then(|(key, _)| {
                udpcheck::SfuProbe::new(url, &key, Some(&cert_pem))
                    .map(Arc::new)
                    .map_err(|e| format!("the SFU cannot be asked: {e:#}"))
            }),
    };
    Ok(Prepared {
        cert: Arc::new(cert::SwappableCert::new(ck)),
        cert_pem,
        listener,
        acme_listener,
        sfu_probe,
    })
}

use rustls::pki_types::pem::PemObject;

/// Everything the handlers share.
pub struct App {
    pub link: Arc<ServiceLink>,
    pub config: Config,
    pub auth: Mutex<AuthState>,
    pub cert: Arc<cert::SwappableCert>,
    pub cert_pem: RwLock<Vec<u8>>,
    pub history: metrics::History,
    pub nextcloud: crate::signaling::nextcloud::NextcloudClient,
    /// The Nextcloud → box test's clients ([`nctest`]).
    pub nctest: nctest::Clients,
    /// The last Nextcloud → box result per Nextcloud URL (shown on the Self-checks page; the
    /// test needs an admin login, so it runs only from the Test button).
    pub last_inbound: Mutex<std::collections::HashMap<String, serde_json::Value>>,
    /// For the sizing state the SFU keeps (`sizing::read_state`).
    pub data: crate::config::DataDir,
    pub sfu_probe: Result<Arc<udpcheck::SfuProbe>, String>,
}

/// Sessions, throttle and what the page knows of the admin account.
pub struct AuthState {
    pub sessions: auth::Sessions,
    pub throttle: auth::Throttle,
    pub admin: requests::AdminState,
}

async fn serve(ctx: ServiceContext, p: Prepared) -> Result<()> {
    let listener = tokio::net::TcpListener::from_std(p.listener)?;
    let addr = listener.local_addr()?;
    let admin = match ctx
        .link
        .request(&serde_json::to_string(&requests::SetupRequest::State)?)
        .await
    {
        Ok(bytes) => serde_json::from_slice::<requests::SetupAnswer>(&bytes)
            .ok()
            .and_then(|a| serde_json::from_value(a.data).ok())
            .unwrap_or_default(),
        Err(e) => {
            tracing::warn!(error = %e, "no claim state from the supervisor; the page cannot change anything");
            requests::AdminState::default()
        }
    };
    let tls = cert::server_config(p.cert.clone()).map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
    let app = Arc::new(App {
        data: ctx.data.clone(),
        link: ctx.link.clone(),
        auth: Mutex::new(AuthState {
            sessions: auth::Sessions::new(
                Duration::from_secs(ctx.config.web.session_idle_s),
                Duration::from_secs(ctx.config.web.session_max_s),
            ),
            throttle: auth::Throttle::default(),
            admin,
        }),
        config: ctx.config.clone(),
        cert: p.cert,
        cert_pem: RwLock::new(p.cert_pem),
        history: metrics::spawn_sampler(),
        nextcloud: crate::signaling::nextcloud::NextcloudClient::new(Duration::from_secs(5), 2)?,
        nctest: nctest::Clients::new()?,
        last_inbound: Mutex::new(Default::default()),
        sfu_probe: p.sfu_probe,
    });
    if let Some(l) = p.acme_listener {
        let l = tokio::net::TcpListener::from_std(l)?;
        tracing::info!(addr = %l.local_addr()?, "answering ACME HTTP-01 challenges");
        tokio::spawn(https::serve_plain(
            l,
            api::challenge_router(app.clone()),
            https::Limits {
                max_connections: 64,
                handshake_timeout: Duration::from_secs(10),
            },
            ctx.shutdown.clone(),
        ));
    }
    tokio::spawn(follow_certificate(app.clone()));
    let router = api::router(app).layer(axum::middleware::map_response(security_headers));
    ctx.link.ready().await;
    ctx.link
        .status(&format!("setup page on https://{addr}/"))
        .await;
    tracing::info!(%addr, "setup page listening");
    https::serve(
        listener,
        tls,
        router,
        https::Limits {
            max_connections: 256,
            handshake_timeout: Duration::from_secs(10),
        },
        ctx.shutdown.clone(),
    )
    .await;
    Ok(())
}

/// How often the web service asks whether the supervisor installed another certificate.
const CERT_FOLLOW_EVERY: Duration = Duration::from_secs(3);

/// Serves the certificate the supervisor has in force: one it installed without this process
/// (an ACME order or renewal) is swapped in without a restart, so admin sessions survive.
async fn follow_certificate(app: Arc<App>) {
    let mut t = tokio::time::interval(CERT_FOLLOW_EVERY);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        t.tick().await;
        let have = {
            let pem = app.cert_pem.read().map(|p| p.clone()).unwrap_or_default();
            hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &pem))
        };
        let a = api::ask(
            &app,
            &requests::SetupRequest::CurrentCertificate { have_sha256: have },
        )
        .await;
        if !a.ok || a.data["changed"] != serde_json::Value::Bool(true) {
            continue;
        }
        let (Some(cert_pem), Some(key_pem)) =
            (a.data["cert_pem"].as_str(), a.data["key_pem"].as_str())
        else {
            continue;
        };
        let chain = match rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "the supervisor's certificate is not PEM; keeping the old one");
                continue;
            }
        };
        match cert::certified_key(chain, key_pem.as_bytes()) {
            Ok(ck) => {
                app.cert.replace(ck);
                if let Ok(mut p) = app.cert_pem.write() {
                    *p = cert_pem.as_bytes().to_vec();
                }
                tracing::info!("the setup page now serves the box's new certificate");
            }
            Err(e) => {
                tracing::warn!(error = %e, "the supervisor's certificate cannot be served; keeping the old one")
            }
        }
    }
}

async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
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
