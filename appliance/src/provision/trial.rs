//! Try mode: a verified bundle is staged (its config validated by the one config loader, its
//! certificate loaded into rustls) before anything is written; then what it will replace is
//! saved under `provisioning/trial/`, the files are written atomically, and the trial is either
//! committed (the saved copies are dropped) or rolled back (they are written back).
//!
//! The manifest is written after the saved copies and before the first new file, so a power cut
//! at any moment leaves either nothing changed or a manifest that the next start rolls back.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use provisioning::Verified;
use provisioning::bundle::DATA_DIR_PLACEHOLDER;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use super::Source;
use crate::config::{Config, DataDir};
use crate::{storage, tls};

/// A bundle that passed every check and is ready to be written.
#[derive(Debug)]
pub struct Staged {
    config_text: String,
    files: Vec<(PathBuf, Vec<u8>)>,
    /// The bundle brings no certificate and the box's self-signed one does not cover the new
    /// `supervisor.names`: make a new self-signed one for them.
    new_self_signed_for: Option<Vec<String>>,
}

/// Validates a verified bundle against this box: its config through the config loader, its
/// certificate and key through rustls. Nothing is written.
pub fn stage(data: &DataDir, v: &Verified) -> Result<Staged, String> {
    let root = data.root.to_str().ok_or_else(|| {
        format!(
            "data directory {} is not UTF-8; cannot place it in the config",
            data.root.display()
        )
    })?;
    let root = std::path::absolute(root)
        .map_err(|e| format!("data directory {root}: {e}"))?
        .display()
        .to_string();
    let config_text = v.payload.config.replace(DATA_DIR_PLACEHOLDER, &root);
    let config = Config::from_toml(
        &format!("talkbox.toml of bundle serial {}", v.payload.serial),
        &config_text,
    )
    .map_err(|e| format!("the bundle's config is invalid:\n{e}"))?;
    let cert = v.files.get("tls/cert.pem");
    let key = v.files.get("tls/key.pem");
    match (cert, key) {
        (Some(c), Some(k)) => check_certificate(c, k)?,
        (None, None) => {}
        _ => {
            return Err(
                "the bundle carries only one of tls/cert.pem and tls/key.pem; give both".into(),
            );
        }
    }
    let files = v
        .files
        .iter()
        .map(|(rel, bytes)| (data.root.join(rel), bytes.clone()))
        .collect();
    let new_self_signed_for = (cert.is_none()
        && super::checks::certificate_problem(data, &config.supervisor.names).is_some())
    .then(|| tls::box_names(&config.supervisor.names));
    Ok(Staged {
        config_text,
        files,
        new_self_signed_for,
    })
}

fn check_certificate(cert_pem: &[u8], key_pem: &[u8]) -> Result<(), String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls/cert.pem of the bundle is not a PEM certificate chain: {e}"))?;
    if chain.is_empty() {
        return Err("tls/cert.pem of the bundle holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("tls/key.pem of the bundle is not a PEM private key: {e}"))?;
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("tls/key.pem of the bundle does not fit tls/cert.pem: {e}"))?;
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    path: PathBuf,
    existed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    serial: u64,
    source: Source,
    key: String,
    entries: Vec<Entry>,
}

/// A bundle applied in try mode, with what it replaced.
#[derive(Debug)]
pub struct Trial {
    dir: PathBuf,
    pub serial: u64,
    pub source: Source,
    pub key: String,
    entries: Vec<Entry>,
}

fn saved(dir: &Path, i: usize) -> PathBuf {
    dir.join("saved").join(i.to_string())
}

impl Trial {
    /// Saves what `staged` replaces, then writes it. On an error half-way, what was written is
    /// undone before returning.
    pub fn begin(
        data: &DataDir,
        dir: &Path,
        staged: Staged,
        serial: u64,
        source: Source,
        key: &str,
    ) -> Result<Trial> {
        let mut targets: Vec<PathBuf> = vec![data.config_file()];
        targets.extend(staged.files.iter().map(|(p, _)| p.clone()));
        if staged.new_self_signed_for.is_some() {
            targets.push(tls::cert_path(data));
            targets.push(tls::key_path(data));
        }
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        storage::ensure_private_dir(&dir.join("saved"), 0o700)
            .with_context(|| format!("creating {}", dir.display()))?;
        let mut entries = Vec::new();
        for (i, path) in targets.iter().enumerate() {
            let existed = path.exists();
            if existed {
                let bytes =
                    std::fs::read(path).with_context(|| format!("saving {}", path.display()))?;
                storage::write_atomic(&saved(dir, i), &bytes, 0o600)
                    .with_context(|| format!("saving {}", path.display()))?;
            }
            entries.push(Entry {
                path: path.clone(),
                existed,
            });
        }
        let t = Trial {
            dir: dir.to_path_buf(),
            serial,
            source,
            key: key.to_string(),
            entries,
        };
        let manifest = Manifest {
            serial,
            source,
            key: key.to_string(),
            entries: t.entries.clone(),
        };
        storage::write_atomic(
            &dir.join("manifest.json"),
            &serde_json::to_vec(&manifest)?,
            0o600,
        )
        .with_context(|| format!("writing {}", dir.display()))?;
        if let Err(e) = t.write(data, &staged) {
            let undo = t.roll_back(data);
            return Err(match undo {
                Ok(()) => e,
                Err(u) => anyhow!("{e:#}; undoing it failed too: {u:#}"),
            });
        }
        Ok(t)
    }

    fn write(&self, data: &DataDir, staged: &Staged) -> Result<()> {
        for (path, bytes) in &staged.files {
            if let Some(parent) = path.parent() {
                storage::ensure_private_dir(parent, 0o700)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            storage::write_atomic(path, bytes, 0o600)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        let cfg = data.config_file();
        storage::write_atomic(&cfg, staged.config_text.as_bytes(), 0o600)
            .with_context(|| format!("writing {}", cfg.display()))?;
        if let Some(names) = &staged.new_self_signed_for {
            for p in [tls::cert_path(data), tls::key_path(data)] {
                match std::fs::remove_file(&p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(e).with_context(|| format!("replacing {}", p.display()));
                    }
                    _ => {}
                }
            }
            tls::ensure_certificate(data, names)?;
        }
        Ok(())
    }

    /// The trial a restart interrupted, if any.
    pub fn load(dir: &Path) -> Result<Option<Trial>> {
        let m = dir.join("manifest.json");
        let bytes = match std::fs::read(&m) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Saved copies without a manifest: the trial never started writing.
                if dir.exists() {
                    std::fs::remove_dir_all(dir)
                        .with_context(|| format!("clearing {}", dir.display()))?;
                }
                return Ok(None);
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", m.display())),
        };
        let m: Manifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is damaged", m.display()))?;
        Ok(Some(Trial {
            dir: dir.to_path_buf(),
            serial: m.serial,
            source: m.source,
            key: m.key,
            entries: m.entries,
        }))
    }

    /// Keeps the new files.
    pub fn commit(&self) -> Result<()> {
        std::fs::remove_dir_all(&self.dir)
            .with_context(|| format!("removing {}", self.dir.display()))
    }

    /// Writes back what the trial replaced and removes what it added.
    pub fn roll_back(&self, data: &DataDir) -> Result<()> {
        let _ = data;
        for (i, e) in self.entries.iter().enumerate() {
            if e.existed {
                let bytes = std::fs::read(saved(&self.dir, i))
                    .with_context(|| format!("reading the saved copy of {}", e.path.display()))?;
                storage::write_atomic(&e.path, &bytes, 0o600)
                    .with_context(|| format!("restoring {}", e.path.display()))?;
            } else {
                match std::fs::remove_file(&e.path) {
                    Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                        return Err(err).with_context(|| format!("removing {}", e.path.display()));
                    }
                    _ => {}
                }
            }
        }
        std::fs::remove_dir_all(&self.dir)
            .with_context(|| format!("removing {}", self.dir.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use provisioning::bundle::Payload;
    use provisioning::key::EngineerSecret;
    use std::collections::BTreeMap;

    fn verified(config: &str, files: &[(&str, &[u8])]) -> Verified {
        let k = EngineerSecret::generate().expect("key");
        let mut payload_files = BTreeMap::new();
        let mut decoded = BTreeMap::new();
        for (p, b) in files {
            use base64::Engine;
            payload_files.insert(
                p.to_string(),
                base64::engine::general_purpose::STANDARD.encode(b),
            );
            decoded.insert(p.to_string(), b.to_vec());
        }
        Verified {
            payload: Payload {
                serial: 1,
                target: "any".into(),
                created: 1,
                expires: 2,
                comment: String::new(),
                config: config.into(),
                files: payload_files,
            },
            signer: k.public(),
            files: decoded,
        }
    }

    #[test]
    fn invalid_config_is_refused_with_its_line_before_anything_is_written() {
        let d = tempfile::tempdir().expect("tempdir");
        let data = DataDir::new(d.path());
        let e = stage(&data, &verified("[web]\nlisten = \"nope\"\n", &[])).expect_err("bad");
        assert!(
            e.contains("invalid") && e.contains(":2:") && e.contains("web.listen"),
            "{e}"
        );
        assert!(!data.config_file().exists());
    }

    #[test]
    fn trial_writes_then_rolls_back_to_exactly_the_old_files() {
        let d = tempfile::tempdir().expect("tempdir");
        let data = DataDir::new(d.path());
        std::fs::write(data.config_file(), "[web]\nenabled = true\n").expect("old config");
        let v = verified(
            "[signaling]\n[[signaling.backend]]\nid = \"nc1\"\nurls = [\"https://cloud.example.org\"]\nsecret_file = \"${DATA_DIR}/secrets/nc1\"\n",
            &[("secrets/nc1", b"0123456789abcdef0123\n")],
        );
        let staged = stage(&data, &v).expect("stage");
        let t = Trial::begin(
            &data,
            &d.path().join("trial"),
            staged,
            1,
            Source::DevDir,
            "k",
        )
        .expect("begin");
        let written = std::fs::read_to_string(data.config_file()).expect("new");
        assert!(
            written.contains(&format!("{}/secrets/nc1", d.path().display())),
            "{written}"
        );
        assert!(d.path().join("secrets/nc1").exists());
        let again = Trial::load(&d.path().join("trial"))
            .expect("load")
            .expect("pending");
        assert_eq!(again.serial, 1);
        t.roll_back(&data).expect("roll back");
        assert_eq!(
            std::fs::read_to_string(data.config_file()).expect("old"),
            "[web]\nenabled = true\n"
        );
        assert!(!d.path().join("secrets/nc1").exists(), "added file removed");
        assert!(
            Trial::load(&d.path().join("trial"))
                .expect("load")
                .is_none()
        );
    }

    #[test]
    fn certificate_that_does_not_fit_its_key_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let data = DataDir::new(d.path());
        let a = rcgen::generate_simple_self_signed(vec!["a.example".into()]).expect("a");
        let b = rcgen::generate_simple_self_signed(vec!["b.example".into()]).expect("b");
        let e = stage(
            &data,
            &verified(
                "",
                &[
                    ("tls/cert.pem", a.cert.pem().as_bytes()),
                    ("tls/key.pem", b.signing_key.serialize_pem().as_bytes()),
                ],
            ),
        )
        .expect_err("mismatch");
        assert!(e.contains("does not fit"), "{e}");
        let e = stage(&data, &verified("", &[("tls/cert.pem", b"x")])).expect_err("one");
        assert!(e.contains("give both"), "{e}");
    }
}
