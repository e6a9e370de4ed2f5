//! ACME (RFC 8555) certificates for the box, with automatic renewal, through `instant-acme`.
//!
//! Who does what: the supervisor (root) owns the account key and the certificate, so it runs
//! the order ([`run_order`], a task on its event loop that only waits on the network) and
//! installs the result with [`crate::storage::write_atomic`]. The CA's HTTP-01 validation
//! request reaches the unprivileged web service's plain HTTP listener (`web.acme_http_listen`,
//! port 80), which asks the supervisor over its link for the key authorization of the token
//! ([`Acme::challenge`]); tokens and key authorizations are public by design, so nothing secret
//! leaves the supervisor. The web service picks the new certificate up without a restart (it
//! asks for the certificate in force every few seconds); signaling and TURN load it at start
//! and are restarted, as for an uploaded certificate.
//!
//! When: every `web.acme_check_interval_s` the supervisor looks at the certificate in force. It
//! orders one when the certificate is self-signed, does not cover every DNS name of
//! `supervisor.names`, or expires within `web.acme_renew_before_days`. A failed order keeps the
//! old certificate in service, is shown on the Certificates page with the CA's words, and is
//! tried again after the same interval.
//!
//! Files: `DATA/tls/acme-account.json` (the account's key and URL, 0600) and the usual
//! `DATA/tls/cert.pem` + `key.pem`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType,
    HttpClient, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

use super::cert;
use super::requests::{now_unix, rfc3339};
use crate::config::{Config, DataDir};
use crate::storage;

/// The longest an order may take from the first request to the certificate.
const ORDER_TIMEOUT: Duration = Duration::from_secs(180);
/// Largest answer read from the ACME server (a certificate chain is a few KiB).
const MAX_ANSWER_BYTES: usize = 256 * 1024;
/// Token length the challenge route accepts (RFC 8555 §8.3: at least 128 bits, base64url).
pub const MAX_TOKEN_LEN: usize = 128;

/// What the Certificates page shows about ACME.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AcmeStatus {
    pub enabled: bool,
    pub ordering: bool,
    pub directory: String,
    pub names: Vec<String>,
    pub renew_before_days: u64,
    pub last_attempt: Option<String>,
    pub last_success: Option<String>,
    pub last_error: Option<String>,
    pub next_check: Option<String>,
}

/// The supervisor's ACME state: pending challenges, the result of the last order, and when
/// to look again.
#[derive(Default)]
pub struct Acme {
    challenges: Arc<Mutex<HashMap<String, String>>>,
    next_check: Option<Instant>,
    next_check_unix: Option<i64>,
    force: bool,
    running: bool,
    last_attempt: Option<i64>,
    last_success: Option<i64>,
    last_error: Option<String>,
}

/// One order to run, everything copied out of the supervisor's state.
pub struct Job {
    directory: String,
    contact: String,
    ca_file: Option<std::path::PathBuf>,
    names: Vec<String>,
    account_file: std::path::PathBuf,
    challenges: Arc<Mutex<HashMap<String, String>>>,
}

/// A certificate chain and its new key, both PEM.
#[derive(Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The DNS names an order is for: `supervisor.names` without IP addresses and `localhost`.
pub fn order_names(config: &Config) -> Vec<String> {
    config
        .supervisor
        .names
        .iter()
        .filter(|n| n.parse::<std::net::IpAddr>().is_err() && *n != "localhost")
        .map(|n| n.to_ascii_lowercase())
        .collect()
}

fn token_ok(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Acme {
    /// The key authorization for a pending HTTP-01 challenge token.
    pub fn challenge(&self, token: &str) -> Option<String> {
        if !token_ok(token) {
            return None;
        }
        self.challenges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .cloned()
    }

    pub fn status(&self, config: &Config) -> AcmeStatus {
        AcmeStatus {
            enabled: config.web.acme_enabled,
            ordering: self.running,
            directory: config.web.acme_directory.clone(),
            names: order_names(config),
            renew_before_days: config.web.acme_renew_before_days,
            last_attempt: self.last_attempt.map(rfc3339),
            last_success: self.last_success.map(rfc3339),
            last_error: self.last_error.clone(),
            next_check: if config.web.acme_enabled && !self.running {
                self.next_check_unix.map(rfc3339)
            } else {
                None
            },
        }
    }

    /// "Renew now" on the page: order at the next tick whatever the certificate's dates.
    pub fn renew_now(&mut self, config: &Config) -> Result<(), String> {
        if !config.web.acme_enabled {
            return Err("ACME is off: set web.acme_enabled (and supervisor.names) first".into());
        }
        if self.running {
            return Err("an order is already running; wait for its result".into());
        }
        self.force = true;
        self.next_check = None;
        Ok(())
    }

    /// Called on every tick: the order to start now, if one is due.
    pub fn due(&mut self, now: Instant, config: &Config, data: &DataDir) -> Option<Job> {
        if !config.web.acme_enabled || self.running {
            return None;
        }
        if self.next_check.is_some_and(|t| now < t) {
            return None;
        }
        let every = config.web.acme_check_interval_s;
        self.next_check = Some(now + Duration::from_secs(every));
        self.next_check_unix = Some(now_unix() + every as i64);
        let names = order_names(config);
        if names.is_empty() {
            self.last_error = Some(
                "no DNS name to order a certificate for: put the box's public name (such as talk.example.org) in supervisor.names, and point it at the box with port 80 open".into(),
            );
            return None;
        }
        let force = std::mem::take(&mut self.force);
        if !force && !needs_order(data, &names, config.web.acme_renew_before_days) {
            return None;
        }
        self.running = true;
        self.last_attempt = Some(now_unix());
        tracing::info!(names = ?names, directory = %config.web.acme_directory, "ordering a certificate over ACME");
        Some(Job {
            directory: config.web.acme_directory.clone(),
            contact: config.web.acme_contact.clone(),
            ca_file: config.web.acme_ca_file.clone(),
            names,
            account_file: data.tls_dir().join("acme-account.json"),
            challenges: self.challenges.clone(),
        })
    }

    /// The order ended: install its certificate (checked first) or record why not. Gives
    /// `true` when a new certificate is in place.
    pub fn finished(&mut self, result: Result<Issued, String>, data: &DataDir) -> bool {
        self.running = false;
        self.challenges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let installed = result.and_then(|i| {
            check_issued(&i)?;
            super::store::install_pair(data, &i.cert_pem, &i.key_pem)
        });
        match installed {
            Ok(()) => {
                self.last_success = Some(now_unix());
                self.last_error = None;
                tracing::info!("installed a certificate from the ACME CA");
                true
            }
            Err(e) => {
                let e = format!(
                    "the order at {} failed: {e}. The current certificate stays in use; the next try is at {}.",
                    rfc3339(self.last_attempt.unwrap_or_else(now_unix)),
                    self.next_check_unix
                        .map(rfc3339)
                        .unwrap_or_else(|| "the next check".into())
                );
                tracing::warn!(error = %e, "ACME order failed");
                self.last_error = Some(e);
                false
            }
        }
    }
}

/// Does the certificate in force need replacing?
fn needs_order(data: &DataDir, names: &[String], renew_before_days: u64) -> bool {
    let Ok(pem) = std::fs::read(crate::tls::cert_path(data)) else {
        return true;
    };
    let Ok(info) = cert::describe(&pem) else {
        return true;
    };
    info.self_signed
        || names.iter().any(|n| !cert::covers(&info.names, n))
        || info.not_after - now_unix() < (renew_before_days * 86_400) as i64
}

/// What the CA sent must be a usable chain for our names, valid now, with our key.
fn check_issued(i: &Issued) -> Result<(), String> {
    cert::check_pair(i.cert_pem.as_bytes(), i.key_pem.as_bytes())
        .map_err(|e| format!("the CA's certificate cannot be used: {e}"))?;
    let info = cert::describe(i.cert_pem.as_bytes())?;
    let now = now_unix();
    if now < info.not_before || now > info.not_after {
        return Err(format!(
            "the CA's certificate is valid from {} to {}, not now (check the box's clock)",
            rfc3339(info.not_before),
            rfc3339(info.not_after)
        ));
    }
    Ok(())
}

/// The HTTP client for the ACME server: HTTPS only, the public web roots or `ca_file`.
struct AcmeHttp(Client<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>);

impl AcmeHttp {
    fn new(ca_file: Option<&Path>) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match ca_file {
            None => builder
                .with_provider_and_webpki_roots(provider)
                .map_err(|e| format!("TLS setup: {e}"))?,
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("web.acme_ca_file {}: {e}", path.display()))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("web.acme_ca_file {}: {e}", path.display()))?;
                for c in certs {
                    roots.add(c).map_err(|e| {
                        format!(
                            "web.acme_ca_file {}: not a CA certificate: {e}",
                            path.display()
                        )
                    })?;
                }
                let tls = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| format!("TLS setup: {e}"))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                builder.with_tls_config(tls)
            }
        };
        let https = builder.https_only().enable_http1().build();
        Ok(Self(Client::builder(TokioExecutor::new()).build(https)))
    }
}

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        req: axum::http::Request<BodyWrapper<Bytes>>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>,
    > {
        let fut = self.0.request(req);
        Box::pin(async move {
            let rsp = tokio::time::timeout(Duration::from_secs(30), fut)
                .await
                .map_err(|_| {
                    instant_acme::Error::Str("the ACME server did not answer within 30 s")
                })?
                .map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
            // The body is bounded before the library collects it.
            let (parts, body) = rsp.into_parts();
            let limited = http_body_util::Limited::new(body, MAX_ANSWER_BYTES);
            let bytes = http_body_util::BodyExt::collect(limited)
                .await
                .map_err(|e| instant_acme::Error::Other(format!("reading the answer: {e}").into()))?
                .to_bytes();
            Ok(BytesResponse::from(axum::http::Response::from_parts(
                parts,
                http_body_util::Full::new(bytes),
            )))
        })
    }
}

#[derive(Serialize, Deserialize)]
struct AccountFile {
    directory: String,
    credentials: AccountCredentials,
}

async fn account(job: &Job) -> Result<Account, String> {
    let http = || AcmeHttp::new(job.ca_file.as_deref()).map(|h| Box::new(h) as Box<dyn HttpClient>);
    if let Ok(text) = std::fs::read_to_string(&job.account_file)
        && let Ok(f) = serde_json::from_str::<AccountFile>(&text)
        && f.directory == job.directory
    {
        return Account::builder_with_http(http()?)
            .from_credentials(f.credentials)
            .await
            .map_err(|e| {
                format!(
                    "the saved ACME account cannot be used at {}: {e}",
                    job.directory
                )
            });
    }
    let contact = format!("mailto:{}", job.contact);
    let contacts: Vec<&str> = if job.contact.is_empty() {
        Vec::new()
    } else {
        vec![contact.as_str()]
    };
    let (account, credentials) = Account::builder_with_http(http()?)
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            job.directory.clone(),
            None,
        )
        .await
        .map_err(|e| format!("creating an account at {}: {e}", job.directory))?;
    let body = serde_json::to_vec_pretty(&AccountFile {
        directory: job.directory.clone(),
        credentials,
    })
    .map_err(|e| e.to_string())?;
    storage::write_atomic(&job.account_file, &body, 0o600)
        .map_err(|e| format!("writing {}: {e}", job.account_file.display()))?;
    tracing::info!(directory = %job.directory, "created an ACME account");
    Ok(account)
}

/// Runs one order to the end (or [`ORDER_TIMEOUT`]).
pub async fn run_order(job: Job) -> Result<Issued, String> {
    let result = tokio::time::timeout(ORDER_TIMEOUT, order(&job))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the CA did not finish the order within {} s",
                ORDER_TIMEOUT.as_secs()
            ))
        });
    job.challenges
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    result
}

async fn order(job: &Job) -> Result<Issued, String> {
    let account = account(job).await?;
    let identifiers: Vec<Identifier> = job
        .names
        .iter()
        .map(|n| Identifier::Dns(n.clone()))
        .collect();
    let mut order = match account.new_order(&NewOrder::new(&identifiers)).await {
        Ok(o) => o,
        Err(e) => {
            let e = e.to_string();
            if e.contains("accountDoesNotExist") || e.contains("unauthorized") {
                // The CA forgot the account (or it was deactivated): make a new one next time.
                let _ = std::fs::remove_file(&job.account_file);
            }
            return Err(format!(
                "the CA refused the order for {}: {e}",
                job.names.join(", ")
            ));
        }
    };
    let mut authorizations = order.authorizations();
    while let Some(a) = authorizations.next().await {
        let mut authz = a.map_err(|e| format!("reading the CA's authorization: {e}"))?;
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => return Err(format!("the CA's authorization is {other:?}")),
        }
        let mut challenge = authz.challenge(ChallengeType::Http01).ok_or_else(|| {
            "the CA offers no HTTP-01 challenge, the only one the box answers".to_string()
        })?;
        let key_auth = challenge.key_authorization().as_str().to_string();
        job.challenges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(challenge.token.clone(), key_auth);
        challenge
            .set_ready()
            .await
            .map_err(|e| format!("telling the CA the challenge is ready: {e}"))?;
    }
    let retries = RetryPolicy::new()
        .initial_delay(Duration::from_millis(500))
        .backoff(1.5)
        .timeout(Duration::from_secs(90));
    let status = order.poll_ready(&retries).await.map_err(|e| {
        format!(
            "the CA could not validate the box (it fetches http://{}/.well-known/acme-challenge/… on port 80: check DNS and that port 80 reaches web.acme_http_listen): {e}",
            job.names[0]
        )
    })?;
    if status != OrderStatus::Ready {
        let detail = order
            .state()
            .error
            .as_ref()
            .map(|p| p.to_string())
            .unwrap_or_default();
        return Err(format!(
            "the CA could not validate the box ({status:?}{}): it fetches http://{}/.well-known/acme-challenge/… on port 80; check DNS and that port 80 reaches web.acme_http_listen",
            if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            },
            job.names[0]
        ));
    }
    let key = rcgen::KeyPair::generate().map_err(|e| format!("making a key: {e}"))?;
    let mut params = rcgen::CertificateParams::new(job.names.clone())
        .map_err(|e| format!("certificate request: {e}"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| format!("certificate request: {e}"))?;
    order
        .finalize_csr(csr.der())
        .await
        .map_err(|e| format!("the CA refused the certificate request: {e}"))?;
    let chain = order
        .poll_certificate(&retries)
        .await
        .map_err(|e| format!("fetching the certificate: {e}"))?;
    Ok(Issued {
        cert_pem: chain,
        key_pem: key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_before_lookup() {
        let a = Acme::default();
        a.challenges
            .lock()
            .expect("lock")
            .insert("abc-DEF_123".into(), "abc-DEF_123.thumb".into());
        assert_eq!(
            a.challenge("abc-DEF_123").as_deref(),
            Some("abc-DEF_123.thumb")
        );
        assert_eq!(a.challenge("../etc"), None);
        assert_eq!(a.challenge(&"a".repeat(MAX_TOKEN_LEN + 1)), None);
    }

    #[test]
    fn only_dns_names_are_ordered() {
        let mut c = Config::default();
        c.supervisor.names = vec![
            "Talk.Example.org".into(),
            "192.0.2.1".into(),
            "localhost".into(),
        ];
        assert_eq!(order_names(&c), vec!["talk.example.org".to_string()]);
    }
}
