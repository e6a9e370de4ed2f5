//! Engineer keys: Ed25519 key pairs, their one-line text forms and fingerprints.
//!
//! A public key is one line, `talkbox-engineer-ed25519 <base64 of the 32-byte key> [comment]`,
//! the form the box's trust lists (`/usr/share/talkbox/engineer-keys/*.pub`,
//! `DATA/provisioning/trusted-keys`) hold. A secret key file holds
//! `talkbox-engineer-ed25519-secret <base64 of PKCS#8 v2>`; only the CLI reads it. The
//! fingerprint, `sha256:<hex>` of the raw public key, names a key in audit logs and messages.

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// The first word of a public key line.
pub const PUBLIC_TAG: &str = "talkbox-engineer-ed25519";
/// The first word of a secret key file.
pub const SECRET_TAG: &str = "talkbox-engineer-ed25519-secret";
/// Longest public key line accepted (the comment included).
pub const MAX_KEY_LINE: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "not an engineer public key: expected `{PUBLIC_TAG} <base64 of 32 bytes> [comment]`, found {0}"
    )]
    NotPublicKey(String),
    #[error("not an engineer secret key: expected `{SECRET_TAG} <base64>`, found {0}")]
    NotSecretKey(String),
    #[error("the secret key does not decode as an Ed25519 PKCS#8 key: {0}")]
    BadSecretKey(String),
    #[error("no random numbers from the operating system")]
    Random,
}

/// An engineer's public key, as trusted by a box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineerKey {
    pub raw: [u8; 32],
    pub comment: String,
}

impl EngineerKey {
    pub fn from_raw(raw: [u8; 32]) -> Self {
        Self {
            raw,
            comment: String::new(),
        }
    }

    /// Parses one line `talkbox-engineer-ed25519 <base64> [comment]`.
    pub fn parse_line(line: &str) -> Result<Self, KeyError> {
        let shown = || {
            let l = line.trim();
            if l.len() > 60 {
                format!("{:?}…", l.chars().take(60).collect::<String>())
            } else {
                format!("{l:?}")
            }
        };
        if line.len() > MAX_KEY_LINE {
            return Err(KeyError::NotPublicKey(format!(
                "a line of {} bytes (at most {MAX_KEY_LINE})",
                line.len()
            )));
        }
        let mut words = line.trim().splitn(3, char::is_whitespace);
        if words.next() != Some(PUBLIC_TAG) {
            return Err(KeyError::NotPublicKey(shown()));
        }
        let raw = words
            .next()
            .and_then(|b| STANDARD.decode(b).ok())
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or_else(|| KeyError::NotPublicKey(shown()))?;
        Ok(Self {
            raw,
            comment: words.next().unwrap_or("").trim().to_string(),
        })
    }

    /// Parses a trust list: one key per line; empty lines and `#` comments are skipped. Each
    /// bad line is reported with its number.
    pub fn parse_list(text: &str) -> (Vec<EngineerKey>, Vec<(usize, KeyError)>) {
        let mut keys = Vec::new();
        let mut bad = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let l = line.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            match Self::parse_line(l) {
                Ok(k) => keys.push(k),
                Err(e) => bad.push((i + 1, e)),
            }
        }
        (keys, bad)
    }

    /// The one-line text form.
    pub fn to_line(&self) -> String {
        let b = STANDARD.encode(self.raw);
        if self.comment.is_empty() {
            format!("{PUBLIC_TAG} {b}")
        } else {
            format!("{PUBLIC_TAG} {b} {}", self.comment)
        }
    }

    /// `sha256:<hex>` of the raw key.
    pub fn fingerprint(&self) -> String {
        fingerprint_of(&self.raw)
    }

    /// Whether `signature` is this key's Ed25519 signature of `message`.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.raw)
            .verify(message, signature)
            .is_ok()
    }
}

/// `sha256:<hex>` of some bytes: how keys and certificates are named to people.
pub fn fingerprint_of(bytes: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes))
    )
}

/// An engineer's key pair (the CLI's side).
pub struct EngineerSecret {
    pkcs8: Vec<u8>,
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for EngineerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EngineerSecret({})", self.public().fingerprint())
    }
}

impl EngineerSecret {
    /// A new random key pair.
    pub fn generate() -> Result<Self, KeyError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
            .map_err(|_| KeyError::Random)?;
        Self::from_pkcs8(doc.as_ref())
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<Self, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8(der)
            .or_else(|_| Ed25519KeyPair::from_pkcs8_maybe_unchecked(der))
            .map_err(|e| KeyError::BadSecretKey(e.to_string()))?;
        Ok(Self {
            pkcs8: der.to_vec(),
            pair,
        })
    }

    /// Parses the secret key file's text.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let mut words = text.split_whitespace();
        if words.next() != Some(SECRET_TAG) {
            return Err(KeyError::NotSecretKey(
                "another first word (is this the .pub file?)".into(),
            ));
        }
        let der = words
            .next()
            .and_then(|b| STANDARD.decode(b).ok())
            .ok_or_else(|| KeyError::NotSecretKey("no base64 key after the tag".into()))?;
        Self::from_pkcs8(&der)
    }

    /// The secret key file's text.
    pub fn to_text(&self) -> String {
        format!("{SECRET_TAG} {}\n", STANDARD.encode(&self.pkcs8))
    }

    /// The PKCS#8 document (for the CLI's TLS client certificate).
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    pub fn public(&self) -> EngineerKey {
        let mut raw = [0u8; 32];
        raw.copy_from_slice(self.pair.public_key().as_ref());
        EngineerKey::from_raw(raw)
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }
}

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE { SEQUENCE { OID
/// 1.3.101.112 }, BIT STRING (33 bytes, no unused bits) }.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The Ed25519 SubjectPublicKeyInfo DER of a raw key.
pub fn ed25519_spki(raw: &[u8; 32]) -> Vec<u8> {
    let mut v = ED25519_SPKI_PREFIX.to_vec();
    v.extend_from_slice(raw);
    v
}

/// Finds the Ed25519 key in an X.509 certificate by its SubjectPublicKeyInfo. A certificate
/// holding the prefix more than once is refused: whoever uses the key verifies the TLS
/// handshake signature with exactly this key, so an ambiguous certificate must not pass.
pub fn ed25519_key_in_certificate(der: &[u8]) -> Option<[u8; 32]> {
    let mut found = None;
    for i in 0..der.len().saturating_sub(ED25519_SPKI_PREFIX.len() + 31) {
        if der[i..].starts_with(&ED25519_SPKI_PREFIX) {
            if found.is_some() {
                return None;
            }
            let start = i + ED25519_SPKI_PREFIX.len();
            let mut raw = [0u8; 32];
            raw.copy_from_slice(&der[start..start + 32]);
            found = Some(raw);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_line_round_trips_with_comment() {
        let s = EngineerSecret::generate().expect("generate");
        let mut k = s.public();
        k.comment = "alice@example.org laptop".into();
        let back = EngineerKey::parse_line(&k.to_line()).expect("parse");
        assert_eq!(back, k);
        assert!(k.fingerprint().starts_with("sha256:"));
        assert_eq!(k.fingerprint().len(), 7 + 64);
    }

    #[test]
    fn secret_key_text_round_trips_and_signs() {
        let s = EngineerSecret::generate().expect("generate");
        let back = EngineerSecret::parse(&s.to_text()).expect("parse");
        assert_eq!(back.public(), s.public());
        let sig = back.sign(b"hello");
        assert!(s.public().verifies(b"hello", &sig));
        assert!(!s.public().verifies(b"hellO", &sig));
    }

    #[test]
    fn bad_key_lines_say_what_is_expected() {
        for bad in [
            "ssh-ed25519 AAAA",
            "talkbox-engineer-ed25519",
            "talkbox-engineer-ed25519 notbase64!!",
            "talkbox-engineer-ed25519 AAAA",
        ] {
            let e = EngineerKey::parse_line(bad).expect_err(bad).to_string();
            assert!(e.contains("expected `talkbox-engineer-ed25519"), "{e}");
        }
        let e = EngineerSecret::parse(&EngineerSecret::generate().expect("g").public().to_line())
            .expect_err("public key given as secret");
        assert!(e.to_string().contains(".pub"), "{e}");
    }

    #[test]
    fn trust_list_skips_comments_and_reports_bad_lines_by_number() {
        let k = EngineerSecret::generate().expect("g").public();
        let text = format!("# keys\n\n{}\nnonsense\n", k.to_line());
        let (keys, bad) = EngineerKey::parse_list(&text);
        assert_eq!(keys, vec![k]);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0, 4);
    }

    #[test]
    fn key_is_found_in_spki_and_ambiguity_is_refused() {
        let raw = [7u8; 32];
        let mut cert = vec![0x30, 0x82, 0x01, 0x00];
        cert.extend(ed25519_spki(&raw));
        cert.extend([0u8; 40]);
        assert_eq!(ed25519_key_in_certificate(&cert), Some(raw));
        cert.extend(ed25519_spki(&[8u8; 32]));
        assert_eq!(ed25519_key_in_certificate(&cert), None);
        assert_eq!(ed25519_key_in_certificate(&[0x30, 0x00]), None);
    }
}
