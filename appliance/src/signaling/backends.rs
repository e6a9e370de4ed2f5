//! Which Nextcloud servers may use this box, and how a request or hello names one.
//!
//! A backend is found by URL: a hello's `auth.url` (everything from `ocs/v2.php/apps/spreed/`
//! on is ignored, as upstream does) or a request's `Spreed-Signaling-Backend` header. A URL
//! that matches no `[[signaling.backend]]` is refused with `invalid_backend`, unless
//! `allow_all` is on (test setups), in which case it is accepted with the box's own backend
//! secret. [`read_secret_files`] reads the `secret_file`s (the service calls it as root, before
//! dropping privileges); everything else here does no I/O.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::config::{BackendConfig, SignalingConfig};

/// Largest backend secret file accepted.
const MAX_SECRET_FILE_BYTES: u64 = 4096;

/// Reads one backend secret file: one line of 16 to 1024 characters.
pub fn read_secret_file(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("reading backend secret file {}", path.display()))?;
    if !meta.is_file() || meta.len() > MAX_SECRET_FILE_BYTES {
        bail!(
            "backend secret file {}: expected a regular file of at most {MAX_SECRET_FILE_BYTES} bytes",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading backend secret file {}", path.display()))?;
    let secret = text.trim_end_matches(['\n', '\r']);
    if secret.len() < 16 || secret.len() > 1024 || secret.contains('\n') {
        bail!(
            "backend secret file {}: expected one line of 16 to 1024 characters",
            path.display()
        );
    }
    Ok(secret.to_string())
}

/// The secrets of every backend, by id: the file's content where `secret_file` is set.
pub fn read_secret_files(config: &SignalingConfig) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for b in &config.backends {
        let secret = match &b.secret_file {
            Some(path) => read_secret_file(path)
                .with_context(|| format!("signaling.backend {:?} secret_file", b.id))?,
            None => b.secret.clone(),
        };
        out.insert(b.id.clone(), secret);
    }
    Ok(out)
}

/// Id of the backend that stands for "any URL" when `allow_all` is on.
pub const ALLOW_ALL_ID: &str = "allow-all";

#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub id: String,
    pub urls: Vec<String>,
    pub secret: Vec<u8>,
    pub session_limit: u32,
    pub max_stream_bitrate: u64,
    pub max_screen_bitrate: u64,
}

#[derive(Debug, Clone)]
pub struct Backends {
    list: Vec<Backend>,
    allow_all: Option<Backend>,
    /// The built-in backend of stand-alone rooms (`signaling.builtin_backend`); found by its URL
    /// ([`super::builtin::BUILTIN_URL`]) and id, never by a backend request's HMAC.
    builtin: Option<Backend>,
}

/// The Nextcloud base URL of a hello `auth.url` or a backend header.
pub fn base_url(url: &str) -> String {
    let cut = url.find("ocs/v2.php/").map(|i| &url[..i]).unwrap_or(url);
    cut.trim_end_matches('/').to_string()
}

impl Backends {
    /// `secrets` maps backend ids to their secrets ([`read_secret_files`]).
    pub fn new(
        config: &SignalingConfig,
        secrets: &HashMap<String, String>,
        own_secret: &str,
    ) -> Self {
        // As upstream: the lower of the box-wide cap and the backend's own, 0 meaning "none".
        // A backend cannot raise the box-wide cap: that one protects the box's uplink, the
        // backend's is the tenant's choice.
        let bitrate = |v: u64, global: u64| match (v, global) {
            (0, g) => g,
            (b, 0) => b,
            (b, g) => b.min(g),
        };
        let list = config
            .backends
            .iter()
            .map(|b: &BackendConfig| Backend {
                id: b.id.clone(),
                urls: b.urls.clone(),
                secret: secrets.get(&b.id).unwrap_or(&b.secret).as_bytes().to_vec(),
                session_limit: b.session_limit,
                max_stream_bitrate: bitrate(b.max_stream_bitrate, config.max_stream_bitrate),
                max_screen_bitrate: bitrate(b.max_screen_bitrate, config.max_screen_bitrate),
            })
            .collect();
        let allow_all = config.allow_all.then(|| Backend {
            id: ALLOW_ALL_ID.into(),
            urls: Vec::new(),
            secret: own_secret.as_bytes().to_vec(),
            session_limit: 0,
            max_stream_bitrate: config.max_stream_bitrate,
            max_screen_bitrate: config.max_screen_bitrate,
        });
        let builtin = config.builtin_backend.then(|| Backend {
            id: super::builtin::BUILTIN_ID.into(),
            urls: vec![super::builtin::BUILTIN_URL.into()],
            // Never used: the built-in backend is answered in-process, not over HTTP.
            secret: Vec::new(),
            session_limit: 0,
            max_stream_bitrate: config.max_stream_bitrate,
            max_screen_bitrate: config.max_screen_bitrate,
        });
        Self {
            list,
            allow_all,
            builtin,
        }
    }

    pub fn builtin(&self) -> Option<&Backend> {
        self.builtin.as_ref()
    }

    /// The backend serving `url`, if any.
    pub fn for_url(&self, url: &str) -> Option<&Backend> {
        let base = base_url(url);
        let lower = base.to_ascii_lowercase();
        self.list
            .iter()
            .chain(self.builtin.as_ref())
            .find(|b| {
                b.urls
                    .iter()
                    .any(|u| u.eq_ignore_ascii_case(&lower) || u.eq_ignore_ascii_case(&base))
            })
            .or(self.allow_all.as_ref())
    }

    pub fn by_id(&self, id: &str) -> Option<&Backend> {
        self.list
            .iter()
            .chain(self.allow_all.as_ref())
            .chain(self.builtin.as_ref())
            .find(|b| b.id == id)
    }

    /// Every backend whose secret a request without a backend header might use.
    pub fn all(&self) -> impl Iterator<Item = &Backend> {
        self.list.iter().chain(self.allow_all.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config(extra: &str) -> SignalingConfig {
        Config::from_toml(
            "t",
            &format!(
                "[signaling]\n{extra}\n[[signaling.backend]]\nid = \"nc1\"\nurls = [\"https://cloud.example.com/\"]\nsecret = \"0123456789abcdef0\"\n"
            ),
        )
        .expect("valid")
        .signaling
    }

    #[test]
    fn hello_url_is_matched_by_its_nextcloud_base() {
        let c = config("");
        let b = Backends::new(
            &c,
            &read_secret_files(&c).expect("inline"),
            "own-secret-own-secret-own-secret",
        );
        let url = "https://cloud.example.com/ocs/v2.php/apps/spreed/api/v3/signaling/backend";
        assert_eq!(b.for_url(url).map(|b| b.id.as_str()), Some("nc1"));
        assert_eq!(
            b.for_url("https://cloud.example.com/")
                .map(|b| b.id.as_str()),
            Some("nc1")
        );
        assert!(
            b.for_url("https://evil.example.com/ocs/v2.php/apps/spreed/api/v3/signaling/backend")
                .is_none()
        );
        assert_eq!(
            b.by_id("nc1").map(|b| b.max_stream_bitrate),
            Some(1_048_576)
        );
    }

    #[test]
    fn secret_file_is_read_and_checked() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("nc1-secret");
        std::fs::write(&path, "file-secret-0123456789\n").expect("write");
        let c = Config::from_toml(
            "t",
            &format!(
                "[[signaling.backend]]\nid = \"nc1\"\nurls = [\"https://cloud.example.com/\"]\nsecret_file = \"{}\"\n",
                path.display()
            ),
        )
        .expect("valid")
        .signaling;
        let secrets = read_secret_files(&c).expect("read");
        let b = Backends::new(&c, &secrets, "own-secret-own-secret-own-secret");
        assert_eq!(
            b.by_id("nc1").map(|b| b.secret.clone()),
            Some(b"file-secret-0123456789".to_vec())
        );
        std::fs::write(&path, "short\n").expect("write");
        let e = read_secret_files(&c).expect_err("too short");
        assert!(format!("{e:#}").contains("nc1-secret"), "{e:#}");
        let both = Config::from_toml(
            "t",
            "[[signaling.backend]]\nid = \"a\"\nurls = [\"https://a/\"]\nsecret = \"0123456789abcdef0\"\nsecret_file = \"/x\"\n",
        );
        assert!(both.is_err(), "secret and secret_file together are refused");
    }

    #[test]
    fn a_backend_cap_lowers_the_global_one_but_never_raises_it() {
        let c = Config::from_toml(
            "t",
            "[signaling]\nmax_stream_bitrate = 800000\n\
             [[signaling.backend]]\nid = \"low\"\nurls = [\"https://a/\"]\nsecret = \"0123456789abcdef0\"\nmax_stream_bitrate = 300000\nmax_screen_bitrate = 5000000\n\
             [[signaling.backend]]\nid = \"plain\"\nurls = [\"https://b/\"]\nsecret = \"0123456789abcdef0\"\n",
        )
        .expect("valid")
        .signaling;
        let b = Backends::new(&c, &HashMap::new(), "own-secret-own-secret-own-secret");
        let caps = |id: &str| {
            b.by_id(id)
                .map(|b| (b.max_stream_bitrate, b.max_screen_bitrate))
        };
        assert_eq!(caps("low"), Some((300_000, 2_097_152)));
        assert_eq!(caps("plain"), Some((800_000, 2_097_152)));
    }

    #[test]
    fn allow_all_accepts_any_url_with_the_own_secret() {
        let b = Backends::new(
            &config("allow_all = true"),
            &HashMap::new(),
            "own-secret-own-secret-own-secret",
        );
        let any = b.for_url("http://10.0.0.1:1234/auth").expect("allowed");
        assert_eq!(any.id, ALLOW_ALL_ID);
        assert_eq!(any.secret, b"own-secret-own-secret-own-secret".to_vec());
    }
}
