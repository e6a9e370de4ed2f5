//! The Nextcloud Test button, both directions, and the clock comparison with Nextcloud.
//!
//! Box → Nextcloud is checked in [`super::api`] (capabilities and a signed backend request).
//! Nextcloud → box cannot be seen from the box alone: Talk sends signed requests to its
//! signaling server only when a conversation changes. So, with a Nextcloud admin login that
//! the admin types into the Test form (used for these calls only, never stored), the box
//! creates a throw-away public conversation over Talk's OCS API and deletes it again; Talk
//! announces both to the signaling server it is configured with (`invite`, `delete`: signed
//! `POST /api/v1/room/{token}`). The box then asks its own signaling service whether a request
//! for that token arrived and whether its checksum matched the backend's secret
//! (`/api/v1/talkbox/backend-seen`, [`crate::signaling::seen`]). That question and its answer are
//! signed with the same secret, so the loopback TLS connection needs no certificate check.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use base64::Engine;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::signaling::checksum;

/// Largest answer read from Nextcloud or the signaling service.
const MAX_ANSWER: usize = 256 * 1024;
/// Per request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the box waits for Talk's announcement to reach its signaling service.
const ANNOUNCE_WAIT: Duration = Duration::from_secs(10);
/// Clock difference with Nextcloud above which the check fails: Talk's hello-v2 tokens live
/// 60 s, and Talk itself warns about a skewed signaling server.
pub const MAX_SKEW_S: i64 = 30;
/// Longest admin user name or app password accepted in the form.
pub const MAX_LOGIN_LEN: usize = 256;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Two clients: one to Nextcloud (public web roots, like the signaling service's), one to the
/// box's own signaling service on loopback (certificate not checked: answers are signed).
pub struct Clients {
    nextcloud: HttpsClient,
    local: HttpsClient,
}

/// A Nextcloud admin login typed into the Test form.
pub struct Login {
    pub user: String,
    pub password: String,
}

/// Accepts any server certificate; only used towards the box's own signaling service on a
/// loopback address, whose answers carry an HMAC of the backend secret (see the module doc).
#[derive(Debug)]
struct SignedAnswersOnly(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for SignedAnswersOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl Clients {
    pub fn new() -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let nc = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(provider.clone())?
            .https_or_http()
            .enable_http1()
            .build();
        let local_tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SignedAnswersOnly(provider)))
            .with_no_client_auth();
        let local = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(local_tls)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            nextcloud: Client::builder(TokioExecutor::new()).build(nc),
            local: Client::builder(TokioExecutor::new()).build(local),
        })
    }
}

/// One request; the answer's status, headers and body (bounded, with a timeout).
async fn call(
    client: &HttpsClient,
    req: Request<Full<Bytes>>,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let url = req.uri().to_string();
    let work = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("no answer from {url}: {}", error_chain(&e)))?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("reading the answer of {url}: {e}"))?
            .to_bytes();
        Ok((parts.status, parts.headers, body))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, work)
        .await
        .map_err(|_| format!("{url} did not answer within {}s", REQUEST_TIMEOUT.as_secs()))?
}

/// The causes of a client error joined, so "connection refused" is not hidden behind
/// hyper's "client error (Connect)".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn ocs_request(
    method: Method,
    url: &str,
    login: Option<&Login>,
    body: Option<&Value>,
) -> Result<Request<Full<Bytes>>, String> {
    let mut b = Request::builder()
        .method(method)
        .uri(url)
        .header("OCS-APIRequest", "true")
        .header(header::ACCEPT, "application/json");
    if let Some(l) = login {
        let pair =
            base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", l.user, l.password));
        b = b.header(header::AUTHORIZATION, format!("Basic {pair}"));
    }
    let body = match body {
        Some(v) => {
            b = b.header(header::CONTENT_TYPE, "application/json");
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    b.body(Full::new(body))
        .map_err(|e| format!("{url} is not a usable URL: {e}"))
}

/// Seconds Nextcloud's clock is ahead of the box's (negative: behind), from the `Date` header
/// of its capabilities answer; accurate to about a second plus half the round trip.
pub async fn clock_skew(clients: &Clients, base: &str) -> Result<i64, String> {
    let url = format!(
        "{}/ocs/v2.php/cloud/capabilities?format=json",
        base.trim_end_matches('/')
    );
    let start = Instant::now();
    let (_, headers, _) = call(
        &clients.nextcloud,
        ocs_request(Method::GET, &url, None, None)?,
    )
    .await?;
    let date = headers
        .get(header::DATE)
        .and_then(|d| d.to_str().ok())
        .ok_or_else(|| format!("{url} answered without a Date header"))?;
    let theirs = httpdate::parse_http_date(date)
        .map_err(|e| format!("{url} sent an unreadable Date header {date:?}: {e}"))?;
    // Compare with our clock at the middle of the round trip.
    let ours = SystemTime::now() - start.elapsed() / 2;
    let diff = match theirs.duration_since(ours) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    };
    Ok(diff.round() as i64)
}

/// Where the web process reaches the box's signaling service: the plain loopback listener if
/// there is one, else the TLS listener (an "every address" listener is asked on loopback).
pub fn signaling_url(config: &crate::config::Config) -> String {
    let local = |a: SocketAddr| {
        let ip = match a.ip() {
            IpAddr::V4(v) if v.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v) if v.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        SocketAddr::new(ip, a.port())
    };
    match config.signaling.http_listen {
        Some(a) => format!("http://{}", local(a)),
        None => format!("https://{}", local(config.signaling.listen)),
    }
}

/// What the signaling service saw for `token`: `[{"type", "ok", "age_s"}]`.
async fn seen(
    clients: &Clients,
    signaling: &str,
    secret: &[u8],
    token: &str,
) -> Result<Vec<Value>, String> {
    let url = format!("{signaling}/api/v1/talkbox/backend-seen");
    let body = json!({ "token": token }).to_string();
    let random = checksum::new_random();
    let req = Request::builder()
        .method(Method::POST)
        .uri(&url)
        .header(header::CONTENT_TYPE, "application/json")
        .header(checksum::HEADER_RANDOM, &random)
        .header(
            checksum::HEADER_CHECKSUM,
            checksum::calculate(&random, body.as_bytes(), secret),
        )
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("{url}: {e}"))?;
    let (status, headers, answer) = call(&clients.local, req).await?;
    if status != StatusCode::OK {
        return Err(format!(
            "the box's signaling service refused the question ({status}): {}",
            String::from_utf8_lossy(&answer).trim()
        ));
    }
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !checksum::verify(
        h(checksum::HEADER_RANDOM),
        &answer,
        secret,
        h(checksum::HEADER_CHECKSUM),
    ) {
        return Err("the signaling service's answer is not signed with this backend's secret (is it running with the current configuration?)".into());
    }
    let v: Value = serde_json::from_slice(&answer)
        .map_err(|e| format!("the signaling service's answer is not JSON: {e}"))?;
    if v["nonce"] != random.as_str() || v["token"] != token {
        return Err("the signaling service answered another question".into());
    }
    Ok(v["seen"].as_array().cloned().unwrap_or_default())
}

/// The result of the Nextcloud → box test for one Nextcloud.
pub struct Inbound {
    pub ok: bool,
    pub detail: String,
    pub remedy: String,
}

/// Has Nextcloud at `base` announce a throw-away conversation to its signaling server and
/// checks that the announcement reached this box with a matching checksum.
pub async fn nextcloud_to_box(
    clients: &Clients,
    base: &str,
    login: &Login,
    signaling: &str,
    secret: &[u8],
    box_url: &str,
) -> Inbound {
    let bad = |detail: String, remedy: &str| Inbound {
        ok: false,
        detail,
        remedy: remedy.to_string(),
    };
    let rooms = format!(
        "{}/ocs/v2.php/apps/spreed/api/v4/room",
        base.trim_end_matches('/')
    );
    let create = json!({"roomType": 3, "roomName": "talkbox connection test (deleted at once)"});
    let answer = match ocs_request(Method::POST, &rooms, Some(login), Some(&create)) {
        Ok(r) => call(&clients.nextcloud, r).await,
        Err(e) => Err(e),
    };
    let (status, _, body) = match answer {
        Ok(a) => a,
        Err(e) => {
            return bad(
                e,
                "The box cannot reach Nextcloud at this URL (see the check above).",
            );
        }
    };
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return bad(
            format!("Nextcloud refused the login of {:?} ({status})", login.user),
            "Use a Nextcloud administrator's user name and an app password (Personal settings → Security → Devices & sessions).",
        );
    }
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(token) = v["ocs"]["data"]["token"]
        .as_str()
        .filter(|t| !t.is_empty() && t.len() <= 64)
        .map(str::to_string)
    else {
        return bad(
            format!(
                "Nextcloud did not create the test conversation ({status}): {}",
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(300)
                    .collect::<String>()
            ),
            "Check that the Talk app is enabled and the user may create conversations.",
        );
    };
    let start = Instant::now();
    let mut found: Vec<Value> = Vec::new();
    let mut deleted = false;
    let mut last_error = None;
    while start.elapsed() < ANNOUNCE_WAIT {
        // Deleting is announced too: a second chance, and it cleans up.
        if !deleted && (start.elapsed() > Duration::from_secs(2) || !found.is_empty()) {
            let url = format!("{rooms}/{token}");
            if let Ok(r) = ocs_request(Method::DELETE, &url, Some(login), None) {
                let _ = call(&clients.nextcloud, r).await;
            }
            deleted = true;
        }
        match seen(clients, signaling, secret, &token).await {
            Ok(list) => {
                found = list;
                last_error = None;
            }
            Err(e) => last_error = Some(e),
        }
        if found.iter().any(|s| s["ok"] == true) && deleted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if !deleted
        && let Ok(r) = ocs_request(
            Method::DELETE,
            &format!("{rooms}/{token}"),
            Some(login),
            None,
        )
    {
        // Best effort: a conversation left behind is harmless and named as a test.
        let _ = call(&clients.nextcloud, r).await;
    }
    if let Some(e) = last_error {
        return bad(
            e,
            "The box's signaling service is not answering; see the Status page.",
        );
    }
    let kinds: Vec<String> = found
        .iter()
        .filter(|s| s["ok"] == true)
        .filter_map(|s| s["type"].as_str().map(str::to_string))
        .collect();
    if !kinds.is_empty() {
        return Inbound {
            ok: true,
            detail: format!(
                "Nextcloud announced test conversation {token} to the box with the right secret ({})",
                kinds.join(", ")
            ),
            remedy: String::new(),
        };
    }
    if !found.is_empty() {
        return bad(
            format!(
                "requests for test conversation {token} arrived from Nextcloud, but signed with another secret"
            ),
            "Nextcloud reaches the box but its shared secret differs: paste the shared secret shown here into Talk's High-performance backend settings.",
        );
    }
    bad(
        format!(
            "no request for test conversation {token} reached the box within {} s",
            ANNOUNCE_WAIT.as_secs()
        ),
        &format!(
            "Nextcloud cannot reach the box, or Talk uses another signaling server: in Talk's High-performance backend settings the URL must be {box_url}, and the Nextcloud server must be able to open it (firewall, DNS, reverse proxy; turn off \"Validate SSL certificate\" only for a self-signed certificate)."
        ),
    )
}
