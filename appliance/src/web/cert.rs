//! Reading and checking the box's TLS certificate: what the Certificates page shows, and the
//! checks an uploaded certificate must pass before it replaces the one in service.
//!
//! An upload is refused unless the key belongs to the first certificate, every certificate is
//! signed by the next one, the last one is self-signed or issued by a well-known root (so the
//! chain a browser receives is complete), the dates hold now, and the names cover the box's
//! configured public names. The file writing is not here (see [`super::store`]).

use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Largest certificate chain or key accepted in an upload.
pub const MAX_PEM_BYTES: usize = 64 * 1024;

/// What the Certificates page shows about a chain.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CertInfo {
    pub subject: String,
    pub names: Vec<String>,
    pub issuer: String,
    pub not_before: i64,
    pub not_after: i64,
    pub self_signed: bool,
    /// Certificates in the chain, the leaf included.
    pub chain_len: usize,
}

fn chain_der(cert_pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    if cert_pem.len() > MAX_PEM_BYTES {
        return Err(format!(
            "the certificate file has {} bytes; at most {MAX_PEM_BYTES} are accepted",
            cert_pem.len()
        ));
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the certificate is not PEM (-----BEGIN CERTIFICATE-----): {e}"))?;
    if chain.is_empty() {
        return Err(
            "no certificate found: paste the PEM text that starts with -----BEGIN CERTIFICATE-----"
                .into(),
        );
    }
    Ok(chain)
}

fn parse<'a>(der: &'a CertificateDer<'_>, n: usize) -> Result<X509Certificate<'a>, String> {
    X509Certificate::from_der(der.as_ref())
        .map(|(_, c)| c)
        .map_err(|e| format!("certificate {n} of the chain cannot be read: {e}"))
}

fn names_of(c: &X509Certificate<'_>) -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(Some(san)) = c.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => {
                        let a: [u8; 4] = [b[0], b[1], b[2], b[3]];
                        names.push(IpAddr::from(a).to_string());
                    }
                    16 => {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(b);
                        names.push(IpAddr::from(a).to_string());
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    names
}

/// Describes a PEM chain (no checks beyond being readable).
pub fn describe(cert_pem: &[u8]) -> Result<CertInfo, String> {
    let chain = chain_der(cert_pem)?;
    let leaf = parse(&chain[0], 1)?;
    Ok(CertInfo {
        subject: leaf.subject().to_string(),
        names: names_of(&leaf),
        issuer: leaf.issuer().to_string(),
        not_before: leaf.validity().not_before.timestamp(),
        not_after: leaf.validity().not_after.timestamp(),
        self_signed: leaf.subject().as_raw() == leaf.issuer().as_raw(),
        chain_len: chain.len(),
    })
}

/// True when `name` (a DNS name or IP address) is covered by one of the certificate's names.
pub fn covers(cert_names: &[String], name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    cert_names.iter().any(|n| {
        let n = n.to_ascii_lowercase();
        if n == name {
            return true;
        }
        // One wildcard label, leftmost only.
        match (n.strip_prefix("*."), name.split_once('.')) {
            (Some(suffix), Some((_, rest))) => suffix == rest,
            _ => false,
        }
    })
}

fn issued_by_public_root(c: &X509Certificate<'_>) -> bool {
    let raw = c.issuer().as_raw();
    webpki_roots::TLS_SERVER_ROOTS.iter().any(|a| {
        let s: &[u8] = a.subject.as_ref();
        // Anchors hold the Name's contents; the certificate holds the whole DER (with header).
        raw == s || (raw.len() > s.len() && raw.len() - s.len() <= 4 && raw.ends_with(s))
    })
}

/// Loads the key and checks it belongs to the leaf; gives the rustls key ready to serve.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key_pem: &[u8],
) -> Result<Arc<CertifiedKey>, String> {
    if key_pem.len() > MAX_PEM_BYTES {
        return Err(format!(
            "the key file has {} bytes; at most {MAX_PEM_BYTES} are accepted",
            key_pem.len()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        format!(
            "the private key is not PEM (-----BEGIN PRIVATE KEY----- or EC/RSA PRIVATE KEY): {e}"
        )
    })?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("the private key cannot be used: {e}"))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|_| {
        "the private key does not belong to the certificate: upload the key that was created with this certificate's request".to_string()
    })?;
    Ok(Arc::new(ck))
}

/// Checks that a PEM chain and key belong together (restore of a backup).
pub fn check_pair(cert_pem: &[u8], key_pem: &[u8]) -> Result<(), String> {
    certified_key(chain_der(cert_pem)?, key_pem).map(|_| ())
}

/// Every check an upload must pass. `names` are the box's configured public names (may be
/// empty); `now` is Unix seconds.
pub fn validate_upload(
    cert_pem: &[u8],
    key_pem: &[u8],
    names: &[String],
    now: i64,
) -> Result<(CertInfo, Arc<CertifiedKey>), String> {
    let chain = chain_der(cert_pem)?;
    let parsed: Vec<X509Certificate<'_>> = chain
        .iter()
        .enumerate()
        .map(|(i, c)| parse(c, i + 1))
        .collect::<Result<_, _>>()?;
    for (i, pair) in parsed.windows(2).enumerate() {
        let (child, parent) = (&pair[0], &pair[1]);
        if child.issuer().as_raw() != parent.subject().as_raw()
            || child.verify_signature(Some(parent.public_key())).is_err()
        {
            return Err(format!(
                "the chain is out of order: certificate {} ({}) is not signed by certificate {} ({}); put the server certificate first, then each issuer",
                i + 1,
                child.subject(),
                i + 2,
                parent.subject()
            ));
        }
    }
    let last = &parsed[parsed.len() - 1];
    let last_self_signed = last.subject().as_raw() == last.issuer().as_raw();
    if last_self_signed {
        if last.verify_signature(None).is_err() {
            return Err(format!(
                "certificate {} ({}) claims to be self-signed but its signature does not verify",
                parsed.len(),
                last.subject()
            ));
        }
    } else if !issued_by_public_root(last) {
        return Err(format!(
            "the chain is incomplete: the certificate that issued \"{}\" is missing (issuer: {}); paste the full chain your CA gave you (server certificate, then the intermediate certificates)",
            last.subject(),
            last.issuer()
        ));
    }
    let leaf = &parsed[0];
    let (nb, na) = (
        leaf.validity().not_before.timestamp(),
        leaf.validity().not_after.timestamp(),
    );
    if now < nb {
        return Err(format!(
            "the certificate is not valid yet: it starts at {} (check the box's clock too)",
            super::requests::rfc3339(nb)
        ));
    }
    if now > na {
        return Err(format!(
            "the certificate expired at {}",
            super::requests::rfc3339(na)
        ));
    }
    let cert_names = names_of(leaf);
    if cert_names.is_empty() {
        return Err("the certificate names no host (no subjectAltName DNS or IP entry); browsers refuse such certificates".into());
    }
    let missing: Vec<&String> = names.iter().filter(|n| !covers(&cert_names, n)).collect();
    if !missing.is_empty() {
        return Err(format!(
            "the certificate is for {} but the box is configured as {} (supervisor.names); get a certificate for these names",
            cert_names.join(", "),
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let info = CertInfo {
        subject: leaf.subject().to_string(),
        names: cert_names,
        issuer: leaf.issuer().to_string(),
        not_before: nb,
        not_after: na,
        self_signed: leaf.subject().as_raw() == leaf.issuer().as_raw(),
        chain_len: parsed.len(),
    };
    drop(parsed);
    let ck = certified_key(chain, key_pem)?;
    Ok((info, ck))
}

/// The certificate the setup page serves, replaceable without a restart (so admin sessions
/// survive a certificate change).
#[derive(Debug)]
pub struct SwappableCert(RwLock<Arc<CertifiedKey>>);

impl SwappableCert {
    pub fn new(ck: Arc<CertifiedKey>) -> Self {
        Self(RwLock::new(ck))
    }
    pub fn replace(&self, ck: Arc<CertifiedKey>) {
        if let Ok(mut g) = self.0.write() {
            *g = ck;
        }
    }
}

impl ResolvesServerCert for SwappableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|g| g.clone())
    }
}

/// A rustls server config (h2 and HTTP/1.1) serving whatever `cert` currently holds.
pub fn server_config(cert: Arc<SwappableCert>) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_and_leaf(names: &[&str]) -> (String, String, String) {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "Test CA");
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf_key = rcgen::KeyPair::generate().expect("key");
        let leaf =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params")
                .signed_by(&leaf_key, &issuer)
                .expect("leaf");
        (leaf.pem(), ca_cert.pem(), leaf_key.serialize_pem())
    }

    #[test]
    fn full_chain_with_matching_key_is_accepted() {
        let (leaf, ca, key) = ca_and_leaf(&["talk.example.org"]);
        let (info, _) = validate_upload(
            format!("{leaf}{ca}").as_bytes(),
            key.as_bytes(),
            &["talk.example.org".into()],
            super::super::requests::now_unix(),
        )
        .expect("valid");
        assert_eq!(info.names, vec!["talk.example.org".to_string()]);
        assert_eq!(info.chain_len, 2);
        assert!(info.issuer.contains("Test CA"), "{}", info.issuer);
    }

    #[test]
    fn each_broken_upload_is_refused_with_the_reason() {
        let now = super::super::requests::now_unix();
        let (leaf, ca, key) = ca_and_leaf(&["talk.example.org"]);
        let (_, _, other_key) = ca_and_leaf(&["talk.example.org"]);
        let full = format!("{leaf}{ca}");
        // rcgen's default validity is 1975 to 4096.
        let cases: [(&str, &str, &[String], i64, &str); 6] = [
            (&leaf, &key, &[], now, "incomplete"),
            (&full, &other_key, &[], now, "does not belong"),
            (&format!("{ca}{leaf}"), &key, &[], now, "out of order"),
            (
                &full,
                &key,
                &["other.example.org".to_string()],
                now,
                "configured as",
            ),
            (&full, &key, &[], 67_200_000_000, "expired"),
            (&full, &key, &[], 0, "not valid yet"),
        ];
        for (cert, k, names, at, want) in cases {
            let e = validate_upload(cert.as_bytes(), k.as_bytes(), names, at)
                .map(|_| ())
                .expect_err(want);
            assert!(e.contains(want), "wanted {want:?} in {e:?}");
        }
        let e = validate_upload(b"hello", key.as_bytes(), &[], now).expect_err("not pem");
        assert!(e.contains("BEGIN CERTIFICATE"), "{e}");
    }

    #[test]
    fn wildcards_cover_one_label() {
        let n = vec!["*.example.org".to_string()];
        assert!(covers(&n, "talk.example.org"));
        assert!(!covers(&n, "a.talk.example.org"));
        assert!(!covers(&n, "example.org"));
    }
}
