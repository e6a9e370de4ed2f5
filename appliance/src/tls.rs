//! The box's TLS certificate: a self-signed one on first start, and the rustls server config
//! every HTTPS and TLS listener uses.
//!
//! The certificate names the box's names and addresses (localhost, loopback, the host name and
//! `supervisor.names`). An uploaded or ACME certificate later replaces the same two files
//! (`tls/cert.pem`, `tls/key.pem`) through [`crate::storage::write_atomic`].

use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::DataDir;
use crate::storage;

/// Largest certificate chain or key file accepted.
const MAX_PEM_BYTES: u64 = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot create a certificate: {0}")]
    Generate(String),
}

pub fn cert_path(data: &DataDir) -> PathBuf {
    data.tls_dir().join("cert.pem")
}

pub fn key_path(data: &DataDir) -> PathBuf {
    data.tls_dir().join("key.pem")
}

/// The names a self-signed certificate of this box carries.
pub fn box_names(extra: &[String]) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if let Ok(h) = nix::unistd::gethostname()
        && let Some(h) = h.to_str()
        && !h.is_empty()
    {
        names.push(h.to_string());
    }
    for n in extra {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    names
}

/// Creates a self-signed certificate and key if there is none yet.
pub fn ensure_certificate(data: &DataDir, names: &[String]) -> Result<(), TlsError> {
    let dir = data.tls_dir();
    storage::ensure_private_dir(&dir, 0o700).map_err(|source| TlsError::Io {
        path: dir.clone(),
        source,
    })?;
    storage::remove_stale_temporaries(&dir);
    let (cert, key) = (cert_path(data), key_path(data));
    if cert.exists() && key.exists() {
        // Refuse to start on a damaged pair rather than serve something unexpected.
        load_server_config(data)?;
        return Ok(());
    }
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    for n in names {
        let san = match n.parse::<IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) => rcgen::SanType::DnsName(
                n.clone()
                    .try_into()
                    .map_err(|e: rcgen::Error| TlsError::Generate(format!("{n}: {e}")))?,
            ),
        };
        params.subject_alt_names.push(san);
    }
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "talkbox (self-signed)");
    let key_pair = rcgen::KeyPair::generate().map_err(|e| TlsError::Generate(e.to_string()))?;
    let cert_der = params
        .self_signed(&key_pair)
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    // Key first: a certificate without its key is useless, the other way round is recreated.
    storage::write_atomic(&key, key_pair.serialize_pem().as_bytes(), 0o600).map_err(|source| {
        TlsError::Io {
            path: key.clone(),
            source,
        }
    })?;
    storage::write_atomic(&cert, cert_der.pem().as_bytes(), 0o600).map_err(|source| {
        TlsError::Io {
            path: cert.clone(),
            source,
        }
    })?;
    tracing::info!(file = %cert.display(), names = ?names, "created self-signed certificate");
    Ok(())
}

fn read_limited(path: &PathBuf) -> Result<Vec<u8>, TlsError> {
    let io_err = |source| TlsError::Io {
        path: path.clone(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io_err)?;
    if meta.len() > MAX_PEM_BYTES {
        return Err(TlsError::Invalid {
            path: path.clone(),
            reason: format!("{} bytes; at most {MAX_PEM_BYTES} allowed", meta.len()),
        });
    }
    std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.clone(),
        source,
    })
}

/// Loads the box's certificate chain and key into a rustls server config (HTTP/1.1 and h2).
pub fn load_server_config(data: &DataDir) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (cert, key) = (cert_path(data), key_path(data));
    let cert_pem = read_limited(&cert)?;
    let key_pem = read_limited(&key)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid {
            path: cert.clone(),
            reason: format!("not a PEM certificate chain: {e}"),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Invalid {
            path: cert,
            reason: "no certificate in the file".into(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Invalid {
        path: key.clone(),
        reason: format!("not a PEM private key: {e}"),
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Generate(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| TlsError::Invalid {
            path: key,
            reason: format!("key does not fit the certificate: {e}"),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_certificate_is_created_once_and_loads() {
        let d = tempfile::tempdir().expect("tempdir");
        let data = DataDir::new(d.path());
        let names = box_names(&["talk.example.org".into()]);
        ensure_certificate(&data, &names).expect("create");
        let first = std::fs::read(cert_path(&data)).expect("read");
        ensure_certificate(&data, &names).expect("second start");
        assert_eq!(first, std::fs::read(cert_path(&data)).expect("read"));
        load_server_config(&data).expect("loads into rustls");
    }

    #[test]
    fn mismatched_key_is_refused_with_the_file_named() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let (da, db) = (DataDir::new(a.path()), DataDir::new(b.path()));
        ensure_certificate(&da, &box_names(&[])).expect("a");
        ensure_certificate(&db, &box_names(&[])).expect("b");
        std::fs::copy(key_path(&db), key_path(&da)).expect("copy");
        let e = load_server_config(&da).expect_err("key of another cert");
        assert!(e.to_string().contains("key.pem"), "{e}");
    }
}
