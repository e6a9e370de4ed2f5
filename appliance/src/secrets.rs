//! The box's secrets: created once on first start, each in its own 0600 file.
//!
//! Secrets never live in the config file, so a config can be shown, backed up or sent in a
//! support bundle without leaking them. Each service reads only the secrets it needs, before it
//! drops its privileges. Rotation (keeping the previous TURN secret valid) builds on
//! [`crate::storage::write_atomic`], which keeps `NAME.prev`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine;

use crate::config::DataDir;
use crate::storage;

/// A named secret of the box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secret {
    /// Shared secret of the built-in Nextcloud backend (HMAC-SHA256 of backend requests).
    BackendSecret,
    /// TURN REST shared secret (HMAC-SHA1 credentials).
    TurnSecret,
    /// Secret of `internal` hello clients (SIP bridge, recording).
    InternalSecret,
    /// Key that signs session and resume ids.
    SessionHashKey,
    /// Key that encrypts session and resume ids.
    SessionBlockKey,
}

impl Secret {
    pub const ALL: [Secret; 5] = [
        Secret::BackendSecret,
        Secret::TurnSecret,
        Secret::InternalSecret,
        Secret::SessionHashKey,
        Secret::SessionBlockKey,
    ];

    pub fn file_name(self) -> &'static str {
        match self {
            Secret::BackendSecret => "backend-secret",
            Secret::TurnSecret => "turn-secret",
            Secret::InternalSecret => "internal-secret",
            Secret::SessionHashKey => "session-hash-key",
            Secret::SessionBlockKey => "session-block-key",
        }
    }

    /// Random bytes behind the secret (before base64url encoding).
    fn random_bytes(self) -> usize {
        match self {
            Secret::SessionBlockKey => 32,
            _ => 48,
        }
    }

    pub fn path(self, data: &DataDir) -> PathBuf {
        data.secrets_dir().join(self.file_name())
    }
}

/// Errors while creating or reading secrets, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path}: secret is malformed ({reason}); restore it from a backup or delete it to create a new one"
    )]
    Malformed { path: PathBuf, reason: &'static str },
    #[error("no random numbers from the operating system: {0}")]
    Random(String),
}

/// Random bytes from the operating system.
pub fn random(n: usize) -> Result<Vec<u8>, SecretError> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).map_err(|e| SecretError::Random(e.to_string()))?;
    Ok(b)
}

/// A random token encoded with URL-safe base64 without padding.
pub fn random_token(bytes: usize) -> Result<String, SecretError> {
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random(bytes)?))
}

/// Creates every secret that does not exist yet; existing ones are checked, never replaced.
pub fn ensure_all(data: &DataDir) -> Result<(), SecretError> {
    let dir = data.secrets_dir();
    storage::ensure_private_dir(&dir, 0o700).map_err(|source| SecretError::Io {
        path: dir.clone(),
        source,
    })?;
    storage::remove_stale_temporaries(&dir);
    for s in Secret::ALL {
        let path = s.path(data);
        if path.exists() {
            read(data, s)?;
            continue;
        }
        let token = random_token(s.random_bytes())?;
        storage::write_atomic(&path, format!("{token}\n").as_bytes(), 0o600).map_err(|source| {
            SecretError::Io {
                path: path.clone(),
                source,
            }
        })?;
        tracing::info!(file = %path.display(), "created secret");
    }
    ensure_proxy_token_key(data)
}

/// File of the RSA key the signaling service signs its `/proxy` hello tokens (RS256) with; the
/// SFU checks them with the public half. Token id: [`PROXY_TOKEN_ID`].
pub fn proxy_token_key_path(data: &DataDir) -> PathBuf {
    data.secrets_dir().join("proxy-token-key.pem")
}

/// The token id (`iss` claim and key name) of the box's own signaling server towards its SFU.
pub const PROXY_TOKEN_ID: &str = "talkbox-signaling";

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn ensure_proxy_token_key(data: &DataDir) -> Result<(), SecretError> {
    use aws_lc_rs::encoding::AsDer;
    let path = proxy_token_key_path(data);
    if path.exists() {
        proxy_token_keys(data)?;
        return Ok(());
    }
    let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
        .map_err(|_| SecretError::Random("RSA key generation failed".into()))?;
    let der = key
        .as_der()
        .map_err(|_| SecretError::Random("RSA key encoding failed".into()))?;
    storage::write_atomic(&path, pem("PRIVATE KEY", der.as_ref()).as_bytes(), 0o600).map_err(
        |source| SecretError::Io {
            path: path.clone(),
            source,
        },
    )?;
    tracing::info!(file = %path.display(), "created proxy token key");
    Ok(())
}

/// The proxy token key as (private PKCS#8 PEM, public SubjectPublicKeyInfo PEM).
pub fn proxy_token_keys(data: &DataDir) -> Result<(String, String), SecretError> {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::KeyPair as _;
    use rustls::pki_types::PrivatePkcs8KeyDer;
    use rustls::pki_types::pem::PemObject;
    let path = proxy_token_key_path(data);
    let text = fs::read_to_string(&path).map_err(|source| SecretError::Io {
        path: path.clone(),
        source,
    })?;
    let malformed = |reason| SecretError::Malformed {
        path: path.clone(),
        reason,
    };
    let der = PrivatePkcs8KeyDer::from_pem_slice(text.as_bytes())
        .map_err(|_| malformed("not a PKCS#8 PEM private key"))?;
    let key = aws_lc_rs::rsa::KeyPair::from_pkcs8(der.secret_pkcs8_der())
        .map_err(|_| malformed("not an RSA key"))?;
    let public = key
        .public_key()
        .as_der()
        .map_err(|_| malformed("public key cannot be encoded"))?;
    Ok((text, pem("PUBLIC KEY", public.as_ref())))
}

/// Reads one secret, checking that it is a complete token.
pub fn read(data: &DataDir, s: Secret) -> Result<String, SecretError> {
    read_file(&s.path(data))
}

/// Reads the previous version of a secret (`NAME.prev`, kept by a rotation), if there is one.
pub fn read_previous(data: &DataDir, s: Secret) -> Result<Option<String>, SecretError> {
    let path = storage::previous_version(&s.path(data));
    if !path.exists() {
        return Ok(None);
    }
    read_file(&path).map(Some)
}

fn read_file(path: &Path) -> Result<String, SecretError> {
    let text = fs::read_to_string(path).map_err(|source| SecretError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let Some(token) = text.strip_suffix('\n') else {
        return Err(SecretError::Malformed {
            path: path.to_path_buf(),
            reason: "no final newline",
        });
    };
    if token.len() < 32
        || !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(SecretError::Malformed {
            path: path.to_path_buf(),
            reason: "expected at least 32 base64url characters",
        });
    }
    Ok(token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn first_start_creates_every_secret_owner_only_and_second_start_keeps_them() {
        let d = tempfile::tempdir().expect("tempdir");
        let data = DataDir::new(d.path());
        ensure_all(&data).expect("create");
        let first: Vec<String> = Secret::ALL
            .iter()
            .map(|s| read(&data, *s).expect("read"))
            .collect();
        for s in Secret::ALL {
            let mode = fs::metadata(s.path(&data))
                .expect("meta")
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "{}", s.file_name());
        }
        let dir_mode = fs::metadata(data.secrets_dir())
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        ensure_all(&data).expect("second start");
        let second: Vec<String> = Secret::ALL
            .iter()
            .map(|s| read(&data, *s).expect("read"))
            .collect();
        assert_eq!(first, second);
        assert_eq!(
            first.iter().collect::<std::collections::HashSet<_>>().len(),
            5,
            "secrets differ"
        );
    }

    #[test]
    fn truncated_secret_is_refused_not_used() {
        let d = tempfile::tempdir().expect("tempdir");
        let data = DataDir::new(d.path());
        ensure_all(&data).expect("create");
        fs::write(Secret::TurnSecret.path(&data), "abc").expect("write");
        let e = ensure_all(&data).expect_err("truncated secret must be refused");
        assert!(e.to_string().contains("turn-secret"), "{e}");
    }
}
