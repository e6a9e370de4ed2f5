//! Encrypted backups of a box's configuration and what it cannot recreate (secrets, certificate
//! and key, admin password hash, engineer keys, stand-alone rooms), and their restore.
//!
//! Format: JSON `{"format":"talkbox-backup-1","salt","nonce","ciphertext"}` (base64); the key is
//! argon2id(passphrase, salt), the cipher AES-256-GCM, so a wrong passphrase or any changed byte
//! is refused before anything is written. Runs in the supervisor (root), which owns the files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use base64::Engine;
use serde::{Deserialize, Serialize};

const FORMAT: &str = "talkbox-backup-1";
/// Largest backup accepted for restore.
pub const MAX_BACKUP_BYTES: usize = 150 * 1024;
/// Files (relative to the data directory) a backup carries, besides every file in secrets/.
const FILES: &[&str] = &[
    "tls/cert.pem",
    "tls/key.pem",
    "tls/acme-account.json",
    "web/admin.json",
    "provisioning/trusted-keys",
    "rooms/rooms.json",
];

#[derive(Serialize, Deserialize)]
struct Envelope {
    format: String,
    salt: String,
    nonce: String,
    ciphertext: String,
}

/// What is inside.
#[derive(Serialize, Deserialize)]
pub struct Contents {
    pub config: Option<String>,
    /// Relative path → base64 file contents.
    pub files: BTreeMap<String, String>,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn key_of(passphrase: &str, salt: &[u8]) -> Result<LessSafeKey, String> {
    let mut key = [0u8; 32];
    argon2::Argon2::default()
        .hash_password_into(passphrase.as_bytes(), salt, &mut key)
        .map_err(|e| format!("deriving the backup key: {e}"))?;
    let unbound = UnboundKey::new(&AES_256_GCM, &key).map_err(|e| e.to_string())?;
    Ok(LessSafeKey::new(unbound))
}

/// Rules for a backup passphrase.
pub fn check_passphrase(p: &str) -> Result<(), String> {
    if (12..=256).contains(&p.chars().count()) {
        Ok(())
    } else {
        Err("the backup passphrase must have 12 to 256 characters".into())
    }
}

/// Collects the files of `root` and the config text.
pub fn collect(root: &Path, config: &Path) -> Result<Contents, String> {
    let mut files = BTreeMap::new();
    let mut names: Vec<String> = FILES.iter().map(|s| s.to_string()).collect();
    if let Ok(dir) = std::fs::read_dir(root.join("secrets")) {
        for e in dir.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if !n.starts_with('.') && e.path().is_file() {
                names.push(format!("secrets/{n}"));
            }
        }
    }
    for n in names {
        match std::fs::read(root.join(&n)) {
            Ok(b) => {
                files.insert(n, b64().encode(b));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("reading {n}: {e}")),
        }
    }
    let config = match std::fs::read_to_string(config) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("reading {}: {e}", config.display())),
    };
    Ok(Contents { config, files })
}

/// Encrypts `contents` with `passphrase`; gives the backup file's text.
pub fn seal(contents: &Contents, passphrase: &str) -> Result<String, String> {
    check_passphrase(passphrase)?;
    let salt = crate::secrets::random(16).map_err(|e| e.to_string())?;
    let nonce_bytes = crate::secrets::random(12).map_err(|e| e.to_string())?;
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&nonce_bytes);
    let mut data = serde_json::to_vec(contents).map_err(|e| e.to_string())?;
    key_of(passphrase, &salt)?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(FORMAT),
            &mut data,
        )
        .map_err(|_| "encrypting the backup failed".to_string())?;
    serde_json::to_string(&Envelope {
        format: FORMAT.into(),
        salt: b64().encode(salt),
        nonce: b64().encode(nonce),
        ciphertext: b64().encode(data),
    })
    .map_err(|e| e.to_string())
}

/// Decrypts a backup; a wrong passphrase or a damaged file is refused.
pub fn open(text: &str, passphrase: &str) -> Result<Contents, String> {
    if text.len() > MAX_BACKUP_BYTES {
        return Err(format!(
            "the backup has {} bytes; at most {MAX_BACKUP_BYTES}",
            text.len()
        ));
    }
    let env: Envelope =
        serde_json::from_str(text).map_err(|_| "this is not a talkbox backup file".to_string())?;
    if env.format != FORMAT {
        return Err(format!(
            "unknown backup format {:?}; this box reads {FORMAT}",
            env.format
        ));
    }
    let dec = |s: &str| {
        b64()
            .decode(s)
            .map_err(|_| "the backup file is damaged".to_string())
    };
    let (salt, nonce_v, mut data) = (dec(&env.salt)?, dec(&env.nonce)?, dec(&env.ciphertext)?);
    let nonce: [u8; 12] = nonce_v
        .try_into()
        .map_err(|_| "the backup file is damaged".to_string())?;
    let plain = key_of(passphrase, &salt)?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(FORMAT),
            &mut data,
        )
        .map_err(|_| "wrong passphrase, or the backup file was changed".to_string())?;
    serde_json::from_slice(plain).map_err(|_| "the backup's contents are damaged".to_string())
}

/// The files a restore writes: checked names only (no `..`, only the known places).
pub fn files_to_write(c: &Contents) -> Result<Vec<(PathBuf, Vec<u8>)>, String> {
    let mut out = Vec::new();
    for (name, v) in &c.files {
        let known = FILES.contains(&name.as_str())
            || name.strip_prefix("secrets/").is_some_and(|n| {
                !n.is_empty()
                    && n.len() <= 100
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                    && !n.starts_with('.')
            });
        if !known {
            return Err(format!("the backup names an unexpected file {name:?}"));
        }
        let bytes = b64()
            .decode(v)
            .map_err(|_| format!("{name} in the backup is damaged"))?;
        out.push((PathBuf::from(name), bytes));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backups_open_only_with_their_passphrase_and_unchanged() {
        let mut files = BTreeMap::new();
        files.insert("secrets/turn-secret".to_string(), b64().encode(b"s3cret"));
        let c = Contents {
            config: Some("[web]\n".into()),
            files,
        };
        let sealed = seal(&c, "correct horse battery").expect("seal");
        assert!(!sealed.contains("s3cret") && !sealed.contains(&b64().encode(b"s3cret")));
        let back = open(&sealed, "correct horse battery").expect("open");
        assert_eq!(back.config.as_deref(), Some("[web]\n"));
        assert!(open(&sealed, "wrong horse battery").is_err());
        let mut env: serde_json::Value = serde_json::from_str(&sealed).expect("json");
        let mut ct = b64()
            .decode(env["ciphertext"].as_str().expect("ct"))
            .expect("b64");
        ct[0] ^= 1;
        env["ciphertext"] = b64().encode(ct).into();
        assert!(open(&env.to_string(), "correct horse battery").is_err());
        assert!(seal(&c, "short").is_err());
    }

    #[test]
    fn restore_writes_only_known_places() {
        for bad in [
            "../etc/passwd",
            "secrets/../../x",
            "tls/other.pem",
            "secrets/.hidden",
        ] {
            let mut files = BTreeMap::new();
            files.insert(bad.to_string(), b64().encode(b"x"));
            let c = Contents {
                config: None,
                files,
            };
            assert!(files_to_write(&c).is_err(), "{bad} accepted");
        }
    }
}
