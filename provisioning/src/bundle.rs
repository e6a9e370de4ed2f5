//! Provisioning bundles: what they hold, how they are signed, and every check a box makes
//! before it applies one.
//!
//! A bundle file is a JSON envelope:
//!
//! ```json
//! {"format": "talkbox-bundle/1",
//!  "payload": "<base64 of the payload JSON>",
//!  "signature": {"key": "<base64 of the 32-byte Ed25519 key>", "ed25519": "<base64>"}}
//! ```
//!
//! The signature covers `talkbox-bundle/1\n` followed by the payload bytes exactly as carried,
//! so nothing is re-serialised before checking. The payload ([`Payload`]) holds the serial, the
//! target box (or `any`), creation and expiry times, the config TOML in the appliance's own
//! format, and the secret and certificate files. [`open`] checks, in this order: size and form,
//! signature present, signer trusted, signature valid, payload well-formed, not expired,
//! addressed to this box, serial newer than the last applied. It does no I/O and takes the time
//! as a parameter. Validating the config TOML is the box's loader's job, not this crate's.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use crate::key::{EngineerKey, EngineerSecret};
use crate::time::rfc3339;

/// The `format` of version 1 envelopes; also the signature's domain separator.
pub const FORMAT: &str = "talkbox-bundle/1";
/// Largest bundle file accepted (its config, certificates and secrets included).
pub const MAX_BUNDLE_BYTES: usize = 2 * 1024 * 1024;
/// Largest config TOML in a bundle (the loader's own limit).
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024;
/// Most files a bundle may carry, and the largest one.
pub const MAX_FILES: usize = 32;
pub const MAX_FILE_BYTES: usize = 256 * 1024;
/// `target` value of a bundle any box may apply.
pub const ANY_BOX: &str = "any";
/// Stands for the box's data directory in a bundle's config (for `secret_file` paths).
pub const DATA_DIR_PLACEHOLDER: &str = "${DATA_DIR}";

/// What a bundle carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// Monotonically increasing per box: a box applies only a serial above the last one.
    pub serial: u64,
    /// A box id (`tb-…`) or `any`.
    pub target: String,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds after which no box accepts the bundle.
    pub expires: u64,
    /// Free text for people (site, ticket).
    #[serde(default)]
    pub comment: String,
    /// The box's config file (`talkbox.toml`), in the appliance's format.
    pub config: String,
    /// Files to install, by path relative to the data directory (see [`check_file_path`]), with
    /// their contents in base64.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Signature {
    key: String,
    ed25519: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    format: String,
    payload: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signature: Option<Signature>,
}

/// Why a box refuses a bundle. Every message says what was found and what is needed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("malformed bundle: {0}")]
    Malformed(String),
    #[error(
        "unsigned bundle: it carries no signature; sign it with `talkbox-provision bundle create --key`"
    )]
    Unsigned,
    #[error(
        "signed by an untrusted key {0}: this box trusts only the keys baked into its image and those set when it was claimed"
    )]
    UntrustedKey(String),
    #[error(
        "bad signature by {0}: the bundle was changed after it was signed (or is damaged); make a new one"
    )]
    BadSignature(String),
    #[error("expired bundle: it expired at {expired}, it is now {now}; make a new one")]
    Expired { expired: String, now: String },
    #[error("bundle addressed to box {target}, but this is box {this_box}")]
    WrongBox { target: String, this_box: String },
    #[error(
        "replayed bundle: serial {serial} is not above the last serial applied on this box ({last}); make a new one with a higher --serial"
    )]
    Replayed { serial: u64, last: u64 },
}

/// What the box knows when it checks a bundle.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    pub trusted: &'a [EngineerKey],
    pub box_id: &'a str,
    /// The serial of the last bundle applied (or tried) on this box.
    pub last_serial: Option<u64>,
    pub now_unix: u64,
}

/// A bundle that passed every check.
#[derive(Debug, Clone)]
pub struct Verified {
    pub payload: Payload,
    pub signer: EngineerKey,
    /// The files, decoded.
    pub files: BTreeMap<String, Vec<u8>>,
}

/// Checks that a file path of a bundle is one a bundle may write: `talkbox.toml` is carried as
/// `config`; `tls/cert.pem`, `tls/key.pem`, and `secrets/NAME` (NAME of lowercase letters,
/// digits, `.`, `-`, `_`, at most 64, not starting with `.`).
pub fn check_file_path(path: &str) -> Result<(), String> {
    if path == "tls/cert.pem" || path == "tls/key.pem" {
        return Ok(());
    }
    if let Some(name) = path.strip_prefix("secrets/")
        && !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
    {
        return Ok(());
    }
    Err(format!(
        "file {path:?} is not allowed: a bundle may carry tls/cert.pem, tls/key.pem and secrets/NAME (NAME: a-z, 0-9, '.', '-', '_', at most 64)"
    ))
}

/// Whether `s` is a box id as [`crate::identity_id`] makes them, or `any`.
pub fn check_target(s: &str) -> Result<(), String> {
    let ok = s == ANY_BOX
        || (s.len() == 3 + 20
            && s.starts_with("tb-")
            && s[3..]
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "target {s:?} is neither `any` nor a box id like tb-0123456789abcdef0123 (shown on the box's setup page and by `talkbox-provision push`)"
        ))
    }
}

fn signed_message(payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(FORMAT.len() + 1 + payload.len());
    m.extend_from_slice(FORMAT.as_bytes());
    m.push(b'\n');
    m.extend_from_slice(payload);
    m
}

impl Payload {
    /// Checks the payload's own consistency (not trust, time or target) and decodes its files.
    pub fn check(&self) -> Result<BTreeMap<String, Vec<u8>>, String> {
        check_target(&self.target)?;
        if self.serial == 0 {
            return Err("serial must be at least 1".into());
        }
        if self.expires <= self.created {
            return Err(format!(
                "expires ({}) is not after created ({})",
                rfc3339(self.expires),
                rfc3339(self.created)
            ));
        }
        if self.config.len() > MAX_CONFIG_BYTES {
            return Err(format!(
                "config is {} bytes; at most {MAX_CONFIG_BYTES}",
                self.config.len()
            ));
        }
        if self.comment.len() > 1024 {
            return Err("comment is longer than 1024 bytes".into());
        }
        if self.files.len() > MAX_FILES {
            return Err(format!(
                "{} files; a bundle carries at most {MAX_FILES}",
                self.files.len()
            ));
        }
        let mut files = BTreeMap::new();
        for (path, b64) in &self.files {
            check_file_path(path)?;
            let bytes = STANDARD
                .decode(b64)
                .map_err(|e| format!("file {path:?}: not base64 ({e})"))?;
            if bytes.len() > MAX_FILE_BYTES {
                return Err(format!(
                    "file {path:?} is {} bytes; at most {MAX_FILE_BYTES}",
                    bytes.len()
                ));
            }
            files.insert(path.clone(), bytes);
        }
        Ok(files)
    }

    /// Signs the payload into a bundle file.
    pub fn sign(&self, key: &EngineerSecret) -> Result<Vec<u8>, String> {
        self.check()?;
        let payload = serde_json::to_vec(self).map_err(|e| e.to_string())?;
        let sig = key.sign(&signed_message(&payload));
        let env = Envelope {
            format: FORMAT.into(),
            payload: STANDARD.encode(&payload),
            signature: Some(Signature {
                key: STANDARD.encode(key.public().raw),
                ed25519: STANDARD.encode(sig),
            }),
        };
        let mut out = serde_json::to_vec_pretty(&env).map_err(|e| e.to_string())?;
        out.push(b'\n');
        if out.len() > MAX_BUNDLE_BYTES {
            return Err(format!(
                "the bundle would be {} bytes; at most {MAX_BUNDLE_BYTES}",
                out.len()
            ));
        }
        Ok(out)
    }

    /// An unsigned envelope (for tests of refusals and for inspection tooling).
    pub fn unsigned(&self) -> Result<Vec<u8>, String> {
        let payload = serde_json::to_vec(self).map_err(|e| e.to_string())?;
        serde_json::to_vec(&Envelope {
            format: FORMAT.into(),
            payload: STANDARD.encode(payload),
            signature: None,
        })
        .map_err(|e| e.to_string())
    }
}

/// The signer and payload of a bundle, read without any trust decision (`bundle inspect`).
#[derive(Debug, Clone)]
pub struct Inspected {
    pub payload: Result<Payload, String>,
    pub signer: Option<EngineerKey>,
    pub signature_valid: bool,
}

struct Parsed {
    payload_bytes: Vec<u8>,
    signature: Option<(EngineerKey, Vec<u8>)>,
}

fn parse_envelope(bytes: &[u8]) -> Result<Parsed, Refusal> {
    let bad = |m: String| Refusal::Malformed(m);
    if bytes.len() > MAX_BUNDLE_BYTES {
        return Err(bad(format!(
            "{} bytes; a bundle is at most {MAX_BUNDLE_BYTES}",
            bytes.len()
        )));
    }
    let env: Envelope = serde_json::from_slice(bytes).map_err(|e| {
        bad(format!(
            "not a talkbox bundle (expected a JSON object with format, payload, signature): {e}"
        ))
    })?;
    if env.format != FORMAT {
        return Err(bad(format!(
            "format {:?} is not supported; this box reads {FORMAT:?}",
            env.format
        )));
    }
    let payload_bytes = STANDARD
        .decode(env.payload.trim())
        .map_err(|e| bad(format!("payload is not base64: {e}")))?;
    let signature = match env.signature {
        None => None,
        Some(s) => {
            let raw = STANDARD
                .decode(&s.key)
                .ok()
                .and_then(|v| <[u8; 32]>::try_from(v).ok())
                .ok_or_else(|| bad("signature.key is not a base64 32-byte Ed25519 key".into()))?;
            let sig = STANDARD
                .decode(&s.ed25519)
                .ok()
                .filter(|v| v.len() == 64)
                .ok_or_else(|| bad("signature.ed25519 is not a base64 64-byte signature".into()))?;
            Some((EngineerKey::from_raw(raw), sig))
        }
    };
    Ok(Parsed {
        payload_bytes,
        signature,
    })
}

fn parse_payload(bytes: &[u8]) -> Result<Payload, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("payload: {e}"))
}

/// Reads a bundle for display: who signed it and whether the signature holds, without trust.
pub fn inspect(bytes: &[u8]) -> Result<Inspected, Refusal> {
    let p = parse_envelope(bytes)?;
    let (signer, signature_valid) = match &p.signature {
        Some((k, sig)) => (
            Some(k.clone()),
            k.verifies(&signed_message(&p.payload_bytes), sig),
        ),
        None => (None, false),
    };
    Ok(Inspected {
        payload: parse_payload(&p.payload_bytes),
        signer,
        signature_valid,
    })
}

/// Every check a box makes before applying a bundle; see the module documentation for the order.
pub fn open(bytes: &[u8], policy: &Policy<'_>) -> Result<Verified, Refusal> {
    let p = parse_envelope(bytes)?;
    let Some((key, sig)) = p.signature else {
        return Err(Refusal::Unsigned);
    };
    let Some(trusted) = policy.trusted.iter().find(|t| t.raw == key.raw) else {
        return Err(Refusal::UntrustedKey(key.fingerprint()));
    };
    if !trusted.verifies(&signed_message(&p.payload_bytes), &sig) {
        return Err(Refusal::BadSignature(trusted.fingerprint()));
    }
    let payload = parse_payload(&p.payload_bytes).map_err(Refusal::Malformed)?;
    let files = payload.check().map_err(Refusal::Malformed)?;
    if policy.now_unix >= payload.expires {
        return Err(Refusal::Expired {
            expired: rfc3339(payload.expires),
            now: rfc3339(policy.now_unix),
        });
    }
    if payload.target != ANY_BOX && payload.target != policy.box_id {
        return Err(Refusal::WrongBox {
            target: payload.target.clone(),
            this_box: policy.box_id.to_string(),
        });
    }
    if let Some(last) = policy.last_serial
        && payload.serial <= last
    {
        return Err(Refusal::Replayed {
            serial: payload.serial,
            last,
        });
    }
    Ok(Verified {
        payload,
        signer: trusted.clone(),
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_795_000_000;
    const BOX: &str = "tb-0123456789abcdef0123";

    fn payload() -> Payload {
        let mut files = BTreeMap::new();
        files.insert(
            "secrets/nc1".into(),
            STANDARD.encode("0123456789abcdef-secret\n"),
        );
        Payload {
            serial: 5,
            target: ANY_BOX.into(),
            created: NOW - 60,
            expires: NOW + 3600,
            comment: "site A".into(),
            config: "[supervisor]\nnames = [\"talk.example.org\"]\n".into(),
            files,
        }
    }

    fn policy(trusted: &[EngineerKey]) -> Policy<'_> {
        Policy {
            trusted,
            box_id: BOX,
            last_serial: Some(4),
            now_unix: NOW,
        }
    }

    #[test]
    fn signed_bundle_from_a_trusted_key_opens_with_its_files() {
        let k = EngineerSecret::generate().expect("key");
        let b = payload().sign(&k).expect("sign");
        let v = open(&b, &policy(&[k.public()])).expect("open");
        assert_eq!(v.payload, payload());
        assert_eq!(v.signer, k.public());
        assert_eq!(v.files["secrets/nc1"], b"0123456789abcdef-secret\n");
        let mut to_this_box = payload();
        to_this_box.target = BOX.into();
        let b = to_this_box.sign(&k).expect("sign");
        open(&b, &policy(&[k.public()])).expect("addressed to this box");
    }

    #[test]
    fn unsigned_bundle_is_refused() {
        let k = EngineerSecret::generate().expect("key");
        let b = payload().unsigned().expect("unsigned");
        assert_eq!(
            open(&b, &policy(&[k.public()])).err(),
            Some(Refusal::Unsigned)
        );
    }

    #[test]
    fn bundle_of_an_untrusted_key_is_refused_with_its_fingerprint() {
        let (k, other) = (
            EngineerSecret::generate().expect("key"),
            EngineerSecret::generate().expect("key"),
        );
        let b = payload().sign(&other).expect("sign");
        match open(&b, &policy(&[k.public()])) {
            Err(Refusal::UntrustedKey(f)) => assert_eq!(f, other.public().fingerprint()),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn bundle_changed_after_signing_is_refused() {
        let k = EngineerSecret::generate().expect("key");
        let b = payload().sign(&k).expect("sign");
        let mut env: serde_json::Value = serde_json::from_slice(&b).expect("json");
        let mut p = payload();
        p.config = "[supervisor]\nnames = [\"evil.example.org\"]\n".into();
        env["payload"] = STANDARD.encode(serde_json::to_vec(&p).expect("p")).into();
        let tampered = serde_json::to_vec(&env).expect("json");
        assert_eq!(
            open(&tampered, &policy(&[k.public()])).err(),
            Some(Refusal::BadSignature(k.public().fingerprint()))
        );
        // A key swapped in without a matching signature is no better.
        env["signature"]["key"] = STANDARD.encode(k.public().raw).into();
        let mut bytes = b.clone();
        let i = bytes.len() / 2;
        bytes[i] ^= 1;
        assert!(open(&bytes, &policy(&[k.public()])).is_err());
    }

    #[test]
    fn expired_bundle_is_refused_with_both_times() {
        let k = EngineerSecret::generate().expect("key");
        let mut p = payload();
        p.expires = NOW;
        let e = open(&p.sign(&k).expect("sign"), &policy(&[k.public()])).expect_err("expired");
        assert!(matches!(e, Refusal::Expired { .. }));
        assert!(e.to_string().contains(&rfc3339(NOW)), "{e}");
    }

    #[test]
    fn replayed_serial_is_refused_and_a_higher_one_accepted() {
        let k = EngineerSecret::generate().expect("key");
        for (serial, ok) in [(3, false), (4, false), (5, true)] {
            let mut p = payload();
            p.serial = serial;
            let r = open(&p.sign(&k).expect("sign"), &policy(&[k.public()]));
            match (r, ok) {
                (Ok(_), true) => {}
                (Err(Refusal::Replayed { serial: s, last: 4 }), false) => assert_eq!(s, serial),
                (r, _) => panic!("serial {serial}: {r:?}"),
            }
        }
        let fresh = Policy {
            last_serial: None,
            ..policy(&[])
        };
        let trusted = [k.public()];
        let fresh = Policy {
            trusted: &trusted,
            ..fresh
        };
        let mut p = payload();
        p.serial = 1;
        open(&p.sign(&k).expect("sign"), &fresh).expect("first bundle of a box");
    }

    #[test]
    fn bundle_for_another_box_is_refused_naming_both() {
        let k = EngineerSecret::generate().expect("key");
        let mut p = payload();
        p.target = "tb-ffffffffffffffffffff".into();
        let e = open(&p.sign(&k).expect("sign"), &policy(&[k.public()])).expect_err("other box");
        assert_eq!(
            e.to_string(),
            format!("bundle addressed to box tb-ffffffffffffffffffff, but this is box {BOX}")
        );
    }

    #[test]
    fn malformed_bundles_are_refused_saying_what_is_wrong() {
        let k = EngineerSecret::generate().expect("key");
        let trusted = [k.public()];
        let pol = policy(&trusted);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"".to_vec(), "not a talkbox bundle"),
            (b"hello".to_vec(), "not a talkbox bundle"),
            (vec![b' '; MAX_BUNDLE_BYTES + 1], "at most"),
            (
                br#"{"format":"talkbox-bundle/9","payload":""}"#.to_vec(),
                "not supported",
            ),
            (
                br#"{"format":"talkbox-bundle/1","payload":"!!"}"#.to_vec(),
                "not base64",
            ),
            (
                br#"{"format":"talkbox-bundle/1","payload":"","signature":{"key":"AA==","ed25519":"AA=="}}"#
                    .to_vec(),
                "32-byte",
            ),
            (
                br#"{"format":"talkbox-bundle/1","payload":"","extra":1}"#.to_vec(),
                "unknown field",
            ),
        ];
        for (bytes, want) in cases {
            let e = open(&bytes, &pol).expect_err(want).to_string();
            assert!(
                e.starts_with("malformed bundle") && e.contains(want),
                "{want}: {e}"
            );
        }
        // Signed but with a payload that breaks the rules.
        let mut p = payload();
        p.files.insert("../etc/passwd".into(), STANDARD.encode("x"));
        assert!(p.sign(&k).is_err(), "the CLI refuses to sign it");
        let payload_bytes = serde_json::to_vec(&p).expect("p");
        let env = Envelope {
            format: FORMAT.into(),
            payload: STANDARD.encode(&payload_bytes),
            signature: Some(Signature {
                key: STANDARD.encode(k.public().raw),
                ed25519: STANDARD.encode(k.sign(&signed_message(&payload_bytes))),
            }),
        };
        let e = open(&serde_json::to_vec(&env).expect("env"), &pol)
            .expect_err("path")
            .to_string();
        assert!(
            e.contains("../etc/passwd") && e.contains("is not allowed"),
            "{e}"
        );
    }

    #[test]
    fn file_paths_and_targets_are_checked() {
        for ok in [
            "tls/cert.pem",
            "tls/key.pem",
            "secrets/nc1",
            "secrets/turn-secret",
        ] {
            check_file_path(ok).expect(ok);
        }
        for bad in [
            "talkbox.toml",
            "secrets/",
            "secrets/../x",
            "secrets/.hidden",
            "secrets/A",
            "tls/other.pem",
            "/etc/x",
        ] {
            assert!(check_file_path(bad).is_err(), "{bad}");
        }
        check_target("any").expect("any");
        check_target(BOX).expect("box");
        for bad in [
            "",
            "ANY",
            "tb-0123",
            "tb-0123456789ABCDEF0123",
            "xx-0123456789abcdef0123",
        ] {
            assert!(check_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn inspect_shows_signer_and_validity_without_trust() {
        let k = EngineerSecret::generate().expect("key");
        let b = payload().sign(&k).expect("sign");
        let i = inspect(&b).expect("inspect");
        assert!(i.signature_valid);
        assert_eq!(i.signer, Some(k.public()));
        assert_eq!(i.payload, Ok(payload()));
        let u = inspect(&payload().unsigned().expect("u")).expect("inspect");
        assert!(!u.signature_valid && u.signer.is_none());
    }
}
