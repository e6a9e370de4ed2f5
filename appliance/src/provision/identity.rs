//! The box's identity: a key pair and self-signed certificate made on first start in
//! `DATA_DIR/provisioning/identity/`. The certificate is the push API's server certificate;
//! its SHA-256 fingerprint is what an engineer pins, and the box id (`tb-…`, from the public
//! key) is what a bundle's `target` names. It is separate from the box's web certificate, which
//! admins replace; the identity stays for the life of the data partition.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::storage;

#[derive(Debug, Clone)]
pub struct Identity {
    pub box_id: String,
    /// `sha256:<hex>` of the certificate (DER).
    pub fingerprint: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn describe(dir: &Path, cert_pem: &[u8]) -> Result<Identity> {
    let cert_path = dir.join("cert.pem");
    let der = CertificateDer::from_pem_slice(cert_pem)
        .map_err(|e| anyhow!("{}: not a PEM certificate: {e}", cert_path.display()))?;
    let parsed = rustls::server::ParsedCertificate::try_from(&der)
        .map_err(|e| anyhow!("{}: {e}", cert_path.display()))?;
    let spki = parsed.subject_public_key_info();
    Ok(Identity {
        box_id: provisioning::identity_id(spki.as_ref()),
        fingerprint: provisioning::fingerprint_of(der.as_ref()),
        cert: cert_path,
        key: dir.join("key.pem"),
    })
}

/// Loads the identity, creating it on first start.
pub fn ensure(dir: &Path) -> Result<Identity> {
    storage::ensure_private_dir(dir, 0o700)
        .with_context(|| format!("creating {}", dir.display()))?;
    storage::remove_stale_temporaries(dir);
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert.exists() && key.exists() {
        let pem = std::fs::read(&cert).with_context(|| format!("reading {}", cert.display()))?;
        return describe(dir, &pem);
    }
    let pair = rcgen::KeyPair::generate().map_err(|e| anyhow!("making the box key: {e}"))?;
    let mut params = rcgen::CertificateParams::new(vec![provisioning::BOX_CERT_NAME.to_string()])
        .map_err(|e| anyhow!("{e}"))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, provisioning::BOX_CERT_NAME);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "talkbox box identity");
    // The identity outlives any calendar an engineer would pick; pinning, not expiry, is what
    // makes it trustworthy.
    params.not_after = rcgen::date_time_ymd(2099, 12, 31);
    let der = params
        .self_signed(&pair)
        .map_err(|e| anyhow!("making the box certificate: {e}"))?;
    storage::write_atomic(&key, pair.serialize_pem().as_bytes(), 0o600)
        .with_context(|| format!("writing {}", key.display()))?;
    storage::write_atomic(&cert, der.pem().as_bytes(), 0o644)
        .with_context(|| format!("writing {}", cert.display()))?;
    let ident = describe(dir, der.pem().as_bytes())?;
    tracing::info!(box_id = %ident.box_id, "created the box identity");
    Ok(ident)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_made_once_and_its_id_is_stable() {
        let d = tempfile::tempdir().expect("tempdir");
        let a = ensure(d.path()).expect("create");
        let b = ensure(d.path()).expect("load");
        assert_eq!(a.box_id, b.box_id);
        assert_eq!(a.fingerprint, b.fingerprint);
        provisioning::bundle::check_target(&a.box_id).expect("id is a valid target");
    }
}
