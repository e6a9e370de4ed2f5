//! The `provision` service: the push API on `provision.listen`, mutual TLS 1.3 only.
//!
//! The server certificate is the box identity (pinned by the engineer); a client must present
//! a certificate for an Ed25519 key and prove it holds that key in the handshake. Whether that
//! key is trusted, whether the enrolment token is right, and everything about the bundle are
//! the supervisor's decisions: this process runs unprivileged, cannot read the data
//! directory, and only hands each push through the spool ([`super::spool`]) and waits for the
//! verdict. Wrong tokens are throttled per client address (10 a minute, then 429).

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, SubjectPublicKeyInfoDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::sync::Semaphore;

use super::spool::{Answer, Spool};
use super::{Paths, identity};
use crate::config::{Config, DataDir};
use crate::service::Service;
use crate::service_runtime::{self, ServiceContext};
use crate::signaling::throttle::Throttle;

/// Connections served at once.
const MAX_CONNECTIONS: usize = 32;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the service looks for the supervisor's verdict.
const ANSWER_POLL: Duration = Duration::from_millis(100);
/// The throttle's name for wrong enrolment tokens.
const THROTTLE_ACTION: &str = "enrolment-token";

/// Accepts a client certificate only for an Ed25519 key, and checks the handshake signature
/// with exactly that key. Which keys are trusted is decided by the supervisor.
#[derive(Debug)]
struct EngineerKeyVerifier {
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for EngineerKeyVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        provisioning::key::ed25519_key_in_certificate(end_entity)
            .map(|_| ClientCertVerified::assertion())
            .ok_or_else(|| {
                rustls::Error::General(
                    "the client certificate must carry an Ed25519 engineer key".into(),
                )
            })
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let key = provisioning::key::ed25519_key_in_certificate(cert).ok_or_else(|| {
            rustls::Error::General("the client certificate carries no Ed25519 key".into())
        })?;
        let spki = provisioning::key::ed25519_spki(&key);
        rustls::crypto::verify_tls13_signature_with_raw_key(
            message,
            &SubjectPublicKeyInfoDer::from(spki.as_slice()),
            dss,
            &self.algs,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

struct Prepared {
    tls: Arc<rustls::ServerConfig>,
    listener: StdTcpListener,
    spool: Spool,
    box_id: String,
    fingerprint: String,
}

/// Runs the provision service process.
pub fn main(config: Config, data: DataDir) -> Result<()> {
    service_runtime::run(Service::Provision, config, data, 2, prepare, serve)
}

fn prepare(config: &Config, data: &DataDir) -> Result<Prepared> {
    let paths = Paths::new(data);
    let id = identity::ensure(&paths.identity())?;
    let cert_pem = std::fs::read(&id.cert).with_context(|| format!("{}", id.cert.display()))?;
    let key_pem = std::fs::read(&id.key).with_context(|| format!("{}", id.key.display()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("{}: {e}", id.cert.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| anyhow!("{}: {e}", id.key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(EngineerKeyVerifier {
        algs: provider.signature_verification_algorithms,
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| anyhow!("{}: {e}", id.key.display()))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let listener = StdTcpListener::bind(config.provision.listen).with_context(|| {
        format!(
            "binding the provisioning API to {} (provision.listen)",
            config.provision.listen
        )
    })?;
    listener.set_nonblocking(true)?;
    let spool = Spool::open(&paths.spool())?;
    Ok(Prepared {
        tls: Arc::new(tls),
        listener,
        spool,
        box_id: id.box_id,
        fingerprint: id.fingerprint,
    })
}

struct Shared {
    spool: Spool,
    throttle: Mutex<Throttle>,
    answer_timeout: Duration,
}

async fn serve(ctx: ServiceContext, p: Prepared) -> Result<()> {
    let listener = tokio::net::TcpListener::from_std(p.listener)?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        spool: p.spool,
        throttle: Mutex::new(Throttle::default()),
        answer_timeout: Duration::from_secs(ctx.config.provision.try_timeout_s * 2 + 120),
    });
    let acceptor = tokio_rustls::TlsAcceptor::from(p.tls);
    ctx.link.ready().await;
    ctx.link
        .status(&format!(
            "provisioning API on {addr} (box {}, certificate {})",
            p.box_id, p.fingerprint
        ))
        .await;
    tracing::info!(%addr, box_id = %p.box_id, fingerprint = %p.fingerprint, "provisioning API listening");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut shutdown = ctx.shutdown.clone();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return Ok(()) },
            _ = shutdown.changed() => return Ok(()),
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return Ok(()),
        };
        let (acceptor, shared) = (acceptor.clone(), shared.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "provisioning: TLS handshake refused");
                    return;
                }
                Err(_) => return,
            };
            let Some(key) = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| provisioning::key::ed25519_key_in_certificate(c))
            else {
                return;
            };
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(req, &shared, key, peer).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

fn json(status: StatusCode, a: &Answer) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(a).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

fn refusal(status: StatusCode, reason: &str, message: String) -> Response<Full<Bytes>> {
    json(status, &Answer::new("refused", reason, &message, "", 0))
}

async fn handle(
    req: Request<Incoming>,
    shared: &Shared,
    client_key: [u8; 32],
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    if req.uri().path() != provisioning::PUSH_PATH {
        return refusal(
            StatusCode::NOT_FOUND,
            "path",
            format!("no such path; push with POST {}", provisioning::PUSH_PATH),
        );
    }
    if req.method() != Method::POST {
        return refusal(
            StatusCode::METHOD_NOT_ALLOWED,
            "method",
            "only POST is allowed".into(),
        );
    }
    let now = Instant::now();
    let allowed = shared
        .throttle
        .lock()
        .map(|mut t| t.allowed(peer.ip(), THROTTLE_ACTION, now))
        .unwrap_or(false);
    if !allowed {
        return refusal(
            StatusCode::TOO_MANY_REQUESTS,
            "throttled",
            format!(
                "too many wrong enrolment tokens from {}; wait a minute",
                peer.ip()
            ),
        );
    }
    let token = req
        .headers()
        .get(provisioning::TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.is_empty() && t.len() <= provisioning::token::MAX_TOKEN_LEN)
        .map(str::to_string);
    let Some(token) = token else {
        return refusal(
            StatusCode::UNAUTHORIZED,
            "token",
            format!(
                "the enrolment token is missing (header {}, at most {} characters)",
                provisioning::TOKEN_HEADER,
                provisioning::token::MAX_TOKEN_LEN
            ),
        );
    };
    let body = match Limited::new(req.into_body(), provisioning::bundle::MAX_BUNDLE_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                "bundle",
                format!(
                    "the bundle could not be read ({e}); at most {} bytes",
                    provisioning::bundle::MAX_BUNDLE_BYTES
                ),
            );
        }
    };
    let id = match shared
        .spool
        .submit(&token, &client_key, &peer.to_string(), &body)
    {
        Ok(id) => id,
        Err(e) => {
            tracing::error!("provisioning: {e:#}");
            return refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "spool",
                "the box cannot take a push right now".into(),
            );
        }
    };
    let deadline = Instant::now() + shared.answer_timeout;
    let answer = loop {
        if let Some(a) = shared.spool.take_answer(&id) {
            break a;
        }
        if Instant::now() >= deadline {
            shared.spool.withdraw(&id);
            return refusal(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "no verdict in time; see the audit log on the setup page".into(),
            );
        }
        tokio::time::sleep(ANSWER_POLL).await;
    };
    let status = match (answer.result.as_str(), answer.reason.as_str()) {
        ("applied", _) => StatusCode::OK,
        ("refused", "token") => {
            if let Ok(mut t) = shared.throttle.lock() {
                t.failed(peer.ip(), THROTTLE_ACTION, Instant::now());
            }
            StatusCode::UNAUTHORIZED
        }
        ("refused", "client") => StatusCode::FORBIDDEN,
        ("refused", "busy") => StatusCode::CONFLICT,
        ("refused", _) => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::FAILED_DEPENDENCY,
    };
    json(status, &answer)
}
