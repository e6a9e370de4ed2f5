//! The self-checks a provisioned config must pass in try mode (after every service became
//! ready on it): the box certificate loads and is valid for every name in `supervisor.names`,
//! and every Nextcloud backend answers HTTP at its base URL. A check failing names the thing
//! and what was seen.

use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::config::{Config, DataDir};
use crate::tls;

/// How long one backend may take to answer.
const BACKEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the box certificate does not fit `names`, or `None` when it does.
pub fn certificate_problem(data: &DataDir, names: &[String]) -> Option<String> {
    let path = tls::cert_path(data);
    let pem = match std::fs::read(&path) {
        Ok(p) => p,
        Err(e) => return Some(format!("{}: {e}", path.display())),
    };
    let Some(Ok(first)) = CertificateDer::pem_slice_iter(&pem).next() else {
        return Some(format!("{}: no PEM certificate", path.display()));
    };
    let parsed = match rustls::server::ParsedCertificate::try_from(&first) {
        Ok(p) => p,
        Err(e) => return Some(format!("{}: {e}", path.display())),
    };
    for n in names {
        let fits = ServerName::try_from(n.as_str())
            .map_err(|e| e.to_string())
            .and_then(|sn| {
                rustls::client::verify_server_name(&parsed, &sn).map_err(|e| e.to_string())
            });
        if let Err(e) = fits {
            return Some(format!(
                "the certificate {} is not valid for {n} (supervisor.names): {e}",
                path.display()
            ));
        }
    }
    None
}

/// Runs every check; the first failure is the verdict.
pub async fn run(config: &Config, data: &DataDir) -> Result<(), String> {
    if let Err(e) = tls::load_server_config(data) {
        return Err(format!("the box certificate does not load: {e}"));
    }
    if let Some(p) = certificate_problem(data, &config.supervisor.names) {
        return Err(p);
    }
    if !config.signaling.enabled || config.signaling.backends.is_empty() {
        return Ok(());
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(provider)
        .map_err(|e| format!("TLS client: {e}"))?
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    for b in &config.signaling.backends {
        for url in &b.urls {
            let target = format!("{url}/status.php");
            let uri: hyper::Uri = target
                .parse()
                .map_err(|e| format!("backend {} URL {url}: {e}", b.id))?;
            let answer = tokio::time::timeout(BACKEND_TIMEOUT, client.get(uri)).await;
            match answer {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    let mut msg = e.to_string();
                    let mut src = std::error::Error::source(&e);
                    while let Some(s) = src {
                        msg = format!("{msg}: {s}");
                        src = s.source();
                    }
                    return Err(format!(
                        "Nextcloud backend {} at {url} is unreachable: {msg}",
                        b.id
                    ));
                }
                Err(_) => {
                    return Err(format!(
                        "Nextcloud backend {} at {url} did not answer within {} s",
                        b.id,
                        BACKEND_TIMEOUT.as_secs()
                    ));
                }
            }
        }
    }
    Ok(())
}
