//! The engineer's side of the push API: mutual TLS with the engineer key, the box certificate
//! pinned, one POST of a bundle with the enrolment token.
//!
//! The client certificate is a self-signed certificate made on the fly for the engineer's
//! Ed25519 key; the box identifies the engineer by that key, not by any CA. The box's own
//! certificate is self-signed too, so it is checked by its SHA-256 fingerprint only: given with
//! `--pin`, or remembered on first contact in the known-boxes file (trust on first use, like
//! SSH) and required to match ever after.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use std::sync::Mutex;

use crate::key::{EngineerSecret, fingerprint_of};
use crate::{BOX_CERT_NAME, PUSH_PATH, TOKEN_HEADER};

/// Largest answer read from a box.
const MAX_ANSWER: usize = 64 * 1024;

/// What the engineer asked for.
pub struct PushRequest<'a> {
    /// `HOST:PORT` of the box's provisioning API.
    pub address: &'a str,
    pub bundle: &'a [u8],
    pub token: &'a str,
    pub key: &'a EngineerSecret,
    /// An expected box certificate fingerprint (`sha256:…`).
    pub pin: Option<&'a str>,
    /// File of `HOST:PORT sha256:…` lines remembered from earlier contacts.
    pub known_boxes: &'a Path,
    /// How long to wait for the box's verdict (it runs its self-checks first).
    pub timeout: Duration,
}

/// The box's answer.
#[derive(Debug)]
pub struct PushAnswer {
    pub status: u16,
    pub body: String,
    /// The fingerprint of the box certificate seen.
    pub box_fingerprint: String,
    /// True when this contact recorded the fingerprint for the first time.
    pub first_contact: bool,
}

#[derive(Debug)]
struct PinningVerifier {
    expected: Option<String>,
    seen: Mutex<Option<String>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint_of(end_entity.as_ref());
        if let Ok(mut s) = self.seen.lock() {
            *s = Some(fp.clone());
        }
        match &self.expected {
            Some(want) if *want != fp => Err(rustls::Error::General(format!(
                "box certificate {fp} is not the pinned {want}"
            ))),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A self-signed client certificate for the engineer's key.
fn client_certificate(
    key: &EngineerSecret,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
    let der = PrivatePkcs8KeyDer::from(key.pkcs8().to_vec());
    let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)
        .map_err(|e| anyhow!("engineer key unusable for TLS: {e}"))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, key.public().fingerprint());
    let cert = params.self_signed(&pair)?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(der)))
}

/// The default known-boxes file.
pub fn default_known_boxes() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(h) => Path::new(&h).join(".config/talkbox-provision/known-boxes"),
        None => PathBuf::from("talkbox-known-boxes"),
    }
}

fn known_fingerprint(file: &Path, address: &str) -> Result<Option<String>> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    Ok(text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some(address)).then(|| w.next().map(str::to_string))?
    }))
}

fn remember(file: &Path, address: &str, fp: &str) -> Result<()> {
    if let Some(dir) = file.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .with_context(|| format!("opening {}", file.display()))?;
    writeln!(f, "{address} {fp}").with_context(|| format!("writing {}", file.display()))?;
    Ok(())
}

/// Pushes a bundle and returns the box's answer.
pub async fn push(req: PushRequest<'_>) -> Result<PushAnswer> {
    let known = known_fingerprint(req.known_boxes, req.address)?;
    if let (Some(pin), Some(k)) = (req.pin, &known)
        && pin != k
    {
        bail!(
            "--pin {pin} contradicts {k} remembered for {} in {}; if the box was really re-installed, remove that line",
            req.address,
            req.known_boxes.display()
        );
    }
    let expected = req.pin.map(str::to_string).or(known.clone());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(PinningVerifier {
        expected: expected.clone(),
        seen: Mutex::new(None),
        provider: provider.clone(),
    });
    let (cert, key) = client_certificate(req.key)?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_client_auth_cert(vec![cert], key)
        .context("setting up the client certificate")?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let work = async {
        let tcp = tokio::net::TcpStream::connect(req.address)
            .await
            .with_context(|| format!("connecting to {}", req.address))?;
        let name = ServerName::try_from(BOX_CERT_NAME)?;
        let tls = connector.connect(name, tcp).await.map_err(|e| {
            anyhow!(
                "TLS with {} failed: {e} (wrong pin, or the box does not accept this engineer key?)",
                req.address
            )
        })?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let request = hyper::Request::post(PUSH_PATH)
            .header(hyper::header::HOST, BOX_CERT_NAME)
            .header(TOKEN_HEADER, req.token)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::copy_from_slice(req.bundle)))?;
        let resp = send.send_request(request).await?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| anyhow!("reading the box's answer: {e}"))?
            .to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).to_string()))
    };
    let (status, body) = tokio::time::timeout(req.timeout, work)
        .await
        .map_err(|_| anyhow!("no answer from {} within {:?}", req.address, req.timeout))??;
    let seen = verifier
        .seen
        .lock()
        .ok()
        .and_then(|s| s.clone())
        .unwrap_or_default();
    let first_contact = known.is_none();
    if first_contact {
        remember(req.known_boxes, req.address, &seen)?;
    }
    Ok(PushAnswer {
        status,
        body,
        box_fingerprint: seen,
        first_contact,
    })
}
