//! The supervisor's side of the setup page: it carries out the [`SetupRequest`]s the web
//! service sends over its link, as root, and owns the files they touch.
//!
//! Files (all written with [`storage::write_atomic`], 0600, in 0700 directories):
//! - `DATA/web/admin.json`: the admin password hash (argon2id PHC string) and claim time;
//! - `DATA/secrets/backend-ID`: generated shared secrets of Nextcloud backends;
//! - `DATA/talkbox.toml` (or the `--config` file): backends are edited in it, the result is
//!   validated by [`Config::from_toml`] before it is written, then the supervisor reloads;
//! - `DATA/tls/cert.pem`, `key.pem`: an uploaded certificate, after [`cert::validate_upload`];
//! - `DATA/provisioning/trusted-keys`: engineer keys given when claiming (one per line);
//! - `DATA/web/login-link.json`: written by provisioning, consumed (deleted) here.
//!
//! The setup code of an unclaimed box lives only in the supervisor's memory: it is printed to
//! the console and the journal at start and shown by `talkbox status` to a local root.

use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::requests::{AdminState, SetupAnswer, SetupRequest, now_unix, parse_rfc3339, rfc3339};
use super::{backup, cert};
use crate::config::{Config, DataDir};
use crate::secrets::{self, Secret};
use crate::storage;

/// Work of a request that may block, run off the supervisor's loop; gives the answer.
pub type Deferred = Box<dyn FnOnce() -> SetupAnswer + Send>;

/// What the supervisor must do after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    None,
    /// The config file changed: reload it (restarts only affected services).
    ReloadConfig,
    /// The certificate changed: restart the services that loaded it at start.
    RestartTlsUsers,
    /// Config, secrets and certificate were replaced (restore, factory reset): reload the
    /// config and restart every service, the web service too, once the answer is out.
    RestartAll,
}

#[derive(Debug, Serialize, Deserialize)]
struct AdminFile {
    password_hash: String,
    claimed: String,
}

/// Largest file of provisioning read here (audit log tail, login link).
const MAX_AUDIT_BYTES: u64 = 1024 * 1024;
const AUDIT_ENTRIES: usize = 100;

/// The supervisor's setup-page state.
pub struct SetupStore {
    data: DataDir,
    /// Where edited configs are written (the file in force, or DATA/talkbox.toml).
    config_path: PathBuf,
    setup_code: Option<String>,
    /// A provisioning login link was used on an unclaimed box: its session may set the first
    /// password (which claims the box) without the setup code.
    link_used_unclaimed: bool,
    /// ACME orders and their pending challenges (run by the supervisor's loop).
    pub acme: super::acme::Acme,
}

/// Alphabet of setup codes: no 0/O, 1/I/L lookalikes.
const CODE_ALPHABET: &[u8] = b"ABCDEFGHJKMNPQRSTUVWXYZ23456789";

fn normalize_code(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn check_hash(h: &str) -> Result<(), String> {
    if h.starts_with("$argon2id$") && h.len() < 512 {
        Ok(())
    } else {
        Err("the password hash must be an argon2id PHC string".into())
    }
}

/// Accepts `talkbox-engineer-ed25519 <base64>` or bare base64 of a 32-byte Ed25519 key and
/// gives the canonical line.
pub fn engineer_key_line(s: &str) -> Result<String, String> {
    let s = s.trim();
    let b64 = s
        .strip_prefix("talkbox-engineer-ed25519")
        .unwrap_or(s)
        .trim();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| "the engineer key is not base64; paste the line `talkbox-engineer-ed25519 <base64>` the engineer gave you".to_string())?;
    if bytes.len() != 32 {
        return Err(format!(
            "the engineer key has {} bytes; an Ed25519 public key has 32",
            bytes.len()
        ));
    }
    Ok(format!(
        "talkbox-engineer-ed25519 {}",
        base64::engine::general_purpose::STANDARD.encode(&bytes)
    ))
}

fn check_backend_id(id: &str) -> Result<(), String> {
    if !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && id != "builtin"
    {
        Ok(())
    } else {
        Err(
            "the backend name must be 1 to 64 letters, digits, '-' or '_' (and not \"builtin\")"
                .into(),
        )
    }
}

impl SetupStore {
    /// Opens the store; an unclaimed box gets a fresh setup code.
    pub fn open(data: &DataDir, config_path: Option<PathBuf>) -> std::io::Result<SetupStore> {
        storage::ensure_private_dir(&data.root.join("web"), 0o700)?;
        let mut s = SetupStore {
            data: data.clone(),
            config_path: config_path.unwrap_or_else(|| data.config_file()),
            setup_code: None,
            link_used_unclaimed: false,
            acme: super::acme::Acme::default(),
        };
        if s.admin().is_none() {
            s.setup_code = Some(new_code()?);
        }
        Ok(s)
    }

    /// The setup code while the box is unclaimed.
    pub fn setup_code(&self) -> Option<&str> {
        self.setup_code.as_deref()
    }

    fn admin_path(&self) -> PathBuf {
        self.data.root.join("web").join("admin.json")
    }

    fn admin(&self) -> Option<AdminFile> {
        let text = std::fs::read_to_string(self.admin_path()).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn write_admin(&self, hash: &str) -> Result<(), String> {
        let claimed = self
            .admin()
            .map(|a| a.claimed)
            .unwrap_or_else(|| rfc3339(now_unix()));
        let f = AdminFile {
            password_hash: hash.to_string(),
            claimed,
        };
        let body = serde_json::to_vec_pretty(&f).map_err(|e| e.to_string())?;
        storage::write_atomic(&self.admin_path(), &body, 0o600)
            .map_err(|e| format!("writing {}: {e}", self.admin_path().display()))
    }

    /// A request whose work may block (it runs `journalctl`): the part that needs this
    /// store is done now, the rest is returned to run off the supervisor's loop. `None` for
    /// every other request, which [`SetupStore::handle`] answers at once.
    pub fn deferred(&self, json: &str) -> Option<Deferred> {
        if json.len() > super::requests::MAX_REQUEST_BYTES {
            return None;
        }
        match serde_json::from_str::<SetupRequest>(json).ok()? {
            SetupRequest::Logs { service, level } => Some(Box::new(move || {
                match logs(service.as_deref(), &level, LOG_LINES) {
                    Ok(v) => SetupAnswer::ok(v),
                    Err(e) => SetupAnswer::err(e),
                }
            })),
            SetupRequest::SupportBundle => {
                let bundle = self.support_bundle_without_logs();
                Some(Box::new(move || match bundle {
                    Ok(mut b) => {
                        b["logs"] = logs(None, "info", 200).unwrap_or_else(|e| json!({"error": e}));
                        SetupAnswer::ok(b)
                    }
                    Err(e) => SetupAnswer::err(e),
                }))
            }
            _ => None,
        }
    }

    /// Carries out one request (a JSON [`SetupRequest`]).
    pub fn handle(&mut self, json: &str, config: &Config) -> (SetupAnswer, Effect) {
        if json.len() > super::requests::MAX_REQUEST_BYTES {
            return (SetupAnswer::err("request too large"), Effect::None);
        }
        let req: SetupRequest = match serde_json::from_str(json) {
            Ok(r) => r,
            Err(e) => {
                return (
                    SetupAnswer::err(format!("malformed setup request: {e}")),
                    Effect::None,
                );
            }
        };
        let op = format!("{req:?}")
            .split([' ', '{'])
            .next()
            .unwrap_or("")
            .to_string();
        let (answer, effect) = match self.apply(req, config) {
            Ok(x) => x,
            Err(e) => (SetupAnswer::err(e), Effect::None),
        };
        if !answer.ok {
            tracing::warn!(request = %op, error = answer.error.as_deref().unwrap_or(""), "setup page request refused");
        } else if effect != Effect::None || op == "Claim" || op == "SetPassword" {
            tracing::info!(request = %op, "setup page request applied");
        }
        (answer, effect)
    }

    fn apply(
        &mut self,
        req: SetupRequest,
        config: &Config,
    ) -> Result<(SetupAnswer, Effect), String> {
        let done = |v: Value| Ok((SetupAnswer::ok(v), Effect::None));
        match req {
            SetupRequest::State => {
                let a = self.admin();
                let st = AdminState {
                    claimed: a.is_some(),
                    password_hash: a.map(|a| a.password_hash),
                };
                done(serde_json::to_value(st).map_err(|e| e.to_string())?)
            }
            SetupRequest::Claim {
                code,
                password_hash,
                engineer_key,
            } => {
                let Some(expected) = self.setup_code.clone() else {
                    return Err("this box is already claimed; log in instead".into());
                };
                if !ct_eq(
                    normalize_code(&code).as_bytes(),
                    normalize_code(&expected).as_bytes(),
                ) {
                    return Err("wrong setup code".into());
                }
                check_hash(&password_hash)?;
                let key_line = engineer_key
                    .filter(|k| !k.trim().is_empty())
                    .map(|k| engineer_key_line(&k))
                    .transpose()?;
                if let Some(line) = key_line {
                    self.add_trusted_key(&line)?;
                }
                self.write_admin(&password_hash)?;
                self.setup_code = None;
                tracing::info!("the box was claimed on the setup page");
                done(json!({}))
            }
            SetupRequest::SetPassword { password_hash } => {
                check_hash(&password_hash)?;
                if self.admin().is_none() && !self.link_used_unclaimed {
                    return Err("the box is not claimed yet: claim it with the setup code".into());
                }
                self.write_admin(&password_hash)?;
                self.setup_code = None;
                self.link_used_unclaimed = false;
                done(json!({}))
            }
            SetupRequest::PutBackend {
                id,
                urls,
                new_secret,
            } => {
                check_backend_id(&id)?;
                self.put_backend(&id, &urls, new_secret, config)?;
                Ok((SetupAnswer::ok(json!({})), Effect::ReloadConfig))
            }
            SetupRequest::RemoveBackend { id } => {
                check_backend_id(&id)?;
                self.remove_backend(&id)?;
                Ok((SetupAnswer::ok(json!({})), Effect::ReloadConfig))
            }
            SetupRequest::TalkValues => done(self.talk_values(config)?),
            SetupRequest::InstallCertificate { cert_pem, key_pem } => {
                let (info, _) = cert::validate_upload(
                    cert_pem.as_bytes(),
                    key_pem.as_bytes(),
                    &config.supervisor.names,
                    now_unix(),
                )?;
                self.install_certificate(&cert_pem, &key_pem)?;
                Ok((
                    SetupAnswer::ok(serde_json::to_value(info).map_err(|e| e.to_string())?),
                    Effect::RestartTlsUsers,
                ))
            }
            SetupRequest::Settings => done(settings(config)),
            SetupRequest::PutSettings { values } => {
                self.put_settings(&values)?;
                Ok((SetupAnswer::ok(json!({})), Effect::ReloadConfig))
            }
            SetupRequest::AcmeStatus => {
                done(serde_json::to_value(self.acme.status(config)).map_err(|e| e.to_string())?)
            }
            SetupRequest::AcmeRenew => {
                self.acme.renew_now(config)?;
                done(json!({}))
            }
            // An unknown token is an ordinary answer: anyone may probe port 80.
            SetupRequest::AcmeChallenge { token } => {
                done(json!({"key_authorization": self.acme.challenge(&token)}))
            }
            SetupRequest::CurrentCertificate { have_sha256 } => {
                done(self.current_certificate(&have_sha256)?)
            }
            SetupRequest::ConsumeLoginLink { token_sha256 } => {
                self.consume_login_link(&token_sha256)?;
                let password_set = self.admin().is_some();
                self.link_used_unclaimed = !password_set;
                done(json!({"password_set": password_set}))
            }
            SetupRequest::ProvisioningAudit => done(self.audit()),
            SetupRequest::SizingBrowser { mbps, peer } => {
                if peer.len() > 100 || peer.chars().any(char::is_control) {
                    return Err("peer: at most 100 printable characters".into());
                }
                let m = mbps.map(|mbps| crate::sizing::Measurement {
                    peer,
                    mbps,
                    at: now_unix().max(0) as u64,
                });
                if let Some(m) = &m {
                    crate::sizing::check_browser_mbps(m.mbps)?;
                }
                let dir = crate::sizing::dir(&self.data);
                std::fs::create_dir_all(&dir)
                    .map_err(|e| format!("creating {}: {e}", dir.display()))?;
                crate::sizing::write_browser(&self.data, m.as_ref())
                    .map_err(|e| format!("{e:#}"))?;
                done(json!({}))
            }
            SetupRequest::SizingMeasure => {
                if config.sizing.peer.is_none() {
                    return Err("no sizing peer is configured (sizing.peer): set one on this page or in the config, then measure".into());
                }
                crate::sizing::request_measurement(&self.data).map_err(|e| {
                    format!("{e:#} (is the SFU running? it keeps the sizing directory)")
                })?;
                done(json!({}))
            }
            // Normally taken off the loop through `deferred`; answered here when called directly.
            SetupRequest::Logs { service, level } => {
                done(logs(service.as_deref(), &level, LOG_LINES)?)
            }
            SetupRequest::SupportBundle => {
                let mut b = self.support_bundle_without_logs()?;
                b["logs"] = logs(None, "info", 200).unwrap_or_else(|e| json!({"error": e}));
                done(b)
            }
            SetupRequest::Backup { passphrase } => {
                let c = backup::collect(&self.data.root, &self.config_path)?;
                done(json!({"backup": backup::seal(&c, &passphrase)?}))
            }
            SetupRequest::Restore {
                backup: text,
                passphrase,
            } => {
                self.restore(&text, &passphrase)?;
                Ok((SetupAnswer::ok(json!({})), Effect::RestartAll))
            }
            SetupRequest::FactoryReset { confirm } => {
                if confirm.trim() != "factory reset" {
                    return Err("type the words factory reset to confirm".into());
                }
                self.factory_reset(config)?;
                Ok((SetupAnswer::ok(json!({})), Effect::RestartAll))
            }
        }
    }

    fn restore(&mut self, text: &str, passphrase: &str) -> Result<(), String> {
        let c = backup::open(text, passphrase)?;
        let files = backup::files_to_write(&c)?;
        // Everything is checked before the first file is written.
        if let Some(cfg) = &c.config {
            Config::from_toml("the backup's config", cfg)
                .map_err(|e| format!("the backup's config is not valid here: {e}"))?;
        }
        let find = |n: &str| {
            files
                .iter()
                .find(|(p, _)| p == Path::new(n))
                .map(|(_, b)| b)
        };
        if let (Some(cert_pem), Some(key_pem)) = (find("tls/cert.pem"), find("tls/key.pem")) {
            cert::check_pair(cert_pem, key_pem)
                .map_err(|e| format!("the backup's certificate: {e}"))?;
        }
        for (rel, bytes) in &files {
            let path = self.data.root.join(rel);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            storage::write_atomic(&path, bytes, 0o600)
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
        }
        if let Some(cfg) = &c.config {
            storage::write_atomic(&self.config_path, cfg.as_bytes(), 0o600)
                .map_err(|e| format!("writing {}: {e}", self.config_path.display()))?;
        }
        if self.admin().is_some() {
            self.setup_code = None;
        }
        tracing::warn!(
            files = files.len(),
            "configuration restored from a backup; restarting every service"
        );
        Ok(())
    }

    fn factory_reset(&mut self, config: &Config) -> Result<(), String> {
        if self.config_path.exists() {
            let mut table = self.config_table()?;
            if let Some(sig) = table.get_mut("signaling").and_then(|s| s.as_table_mut()) {
                sig.remove("backend");
            }
            self.write_config(&table)?;
        }
        let root = &self.data.root;
        let mut gone: Vec<PathBuf> = std::fs::read_dir(root.join("secrets"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        for f in [
            "tls/cert.pem",
            "tls/key.pem",
            "tls/acme-account.json",
            "web/admin.json",
            "web/login-link.json",
            "provisioning/trusted-keys",
            "rooms/rooms.json",
        ] {
            let p = root.join(f);
            gone.push(storage::previous_version(&p));
            gone.push(p);
        }
        for p in gone {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("removing {}: {e}", p.display())),
            }
        }
        secrets::ensure_all(&self.data).map_err(|e| e.to_string())?;
        crate::tls::ensure_certificate(
            &self.data,
            &crate::tls::box_names(&config.supervisor.names),
        )
        .map_err(|e| e.to_string())?;
        let code = new_code().map_err(|e| e.to_string())?;
        tracing::warn!(setup_code = %code, "factory reset: the box is unclaimed again; enter the new setup code on the setup page");
        eprintln!("talkbox: setup code: {code}");
        self.setup_code = Some(code);
        self.link_used_unclaimed = false;
        Ok(())
    }

    fn add_trusted_key(&self, line: &str) -> Result<(), String> {
        let dir = self.data.root.join("provisioning");
        storage::ensure_private_dir(&dir, 0o700)
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let path = dir.join("trusted-keys");
        let mut text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.lines().any(|l| l.trim() == line) {
            return Ok(());
        }
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(line);
        text.push('\n');
        storage::write_atomic(&path, text.as_bytes(), 0o600)
            .map_err(|e| format!("writing {}: {e}", path.display()))
    }

    fn config_table(&self) -> Result<toml::Table, String> {
        match std::fs::read_to_string(&self.config_path) {
            Ok(t) => toml::from_str(&t).map_err(|e| format!("{}: {e}", self.config_path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(toml::Table::new()),
            Err(e) => Err(format!("reading {}: {e}", self.config_path.display())),
        }
    }

    /// Validates the edited config and installs it; nothing is written if it is invalid.
    fn write_config(&self, table: &toml::Table) -> Result<(), String> {
        let text = toml::to_string(table).map_err(|e| e.to_string())?;
        Config::from_toml(&self.config_path.display().to_string(), &text)
            .map_err(|e| format!("the change was not applied: {e}"))?;
        storage::write_atomic(&self.config_path, text.as_bytes(), 0o600)
            .map_err(|e| format!("writing {}: {e}", self.config_path.display()))
    }

    /// Sets the given editable keys in the config file, checked as a whole before it is written.
    fn put_settings(&self, values: &serde_json::Map<String, Value>) -> Result<(), String> {
        if values.is_empty() {
            return Err("nothing to change".into());
        }
        let mut table = self.config_table()?;
        for (name, v) in values {
            let Some((section, key, kind)) = EDITABLE
                .iter()
                .find(|(s, k, _)| format!("{s}.{k}") == *name)
                .copied()
            else {
                return Err(format!(
                    "{name} cannot be changed on the page; it may change: {}",
                    EDITABLE
                        .iter()
                        .map(|(s, k, _)| format!("{s}.{k}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            };
            let value = match (kind, v) {
                (Kind::Bool, Value::Bool(b)) => toml::Value::Boolean(*b),
                (Kind::Int, Value::Number(n)) if n.as_i64().is_some() => {
                    toml::Value::Integer(n.as_i64().unwrap_or(0))
                }
                (Kind::Int, Value::String(s)) if s.trim().parse::<i64>().is_ok() => {
                    toml::Value::Integer(s.trim().parse().unwrap_or(0))
                }
                (Kind::Str, Value::String(s)) if s.len() <= 512 => {
                    toml::Value::String(s.trim().to_string())
                }
                (Kind::List, Value::Array(a)) if a.len() <= 64 => {
                    let mut items = Vec::new();
                    for x in a {
                        match x {
                            Value::String(s) if s.len() <= 256 => {
                                if !s.trim().is_empty() {
                                    items.push(toml::Value::String(s.trim().to_string()));
                                }
                            }
                            _ => return Err(format!("{name}: each entry must be text")),
                        }
                    }
                    toml::Value::Array(items)
                }
                _ => {
                    return Err(format!(
                        "{name}: expected {}",
                        match kind {
                            Kind::Bool => "yes or no",
                            Kind::Int => "a whole number",
                            Kind::Str => "text (at most 512 characters)",
                            Kind::List => "a list of at most 64 entries",
                        }
                    ));
                }
            };
            let t = table
                .entry(section)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let Some(t) = t.as_table_mut() else {
                return Err(format!("[{section}] in the config is not a table"));
            };
            t.insert(key.to_string(), value);
        }
        self.write_config(&table)
    }

    fn backend_secret_path(&self, id: &str) -> Result<PathBuf, String> {
        let root = std::fs::canonicalize(&self.data.root)
            .map_err(|e| format!("{}: {e}", self.data.root.display()))?;
        Ok(root.join("secrets").join(format!("backend-{id}")))
    }

    fn put_backend(
        &self,
        id: &str,
        urls: &[String],
        new_secret: bool,
        config: &Config,
    ) -> Result<(), String> {
        let urls: Vec<String> = urls
            .iter()
            .map(|u| u.trim().trim_end_matches('/').to_string())
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() || urls.len() > 16 {
            return Err("give 1 to 16 Nextcloud URLs, such as https://cloud.example.com".into());
        }
        let mut table = self.config_table()?;
        let signaling = table
            .entry("signaling")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(signaling) = signaling.as_table_mut() else {
            return Err("[signaling] in the config is not a table".into());
        };
        let list = signaling
            .entry("backend")
            .or_insert_with(|| toml::Value::Array(Vec::new()));
        let Some(list) = list.as_array_mut() else {
            return Err("signaling.backend in the config is not a list of tables".into());
        };
        let existing = list
            .iter_mut()
            .filter_map(|v| v.as_table_mut())
            .find(|t| t.get("id").and_then(|v| v.as_str()) == Some(id));
        let secret_path = self.backend_secret_path(id)?;
        let write_secret = |path: &Path| -> Result<(), String> {
            let s = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(secrets::random(32).map_err(|e| e.to_string())?);
            storage::ensure_private_dir(&self.data.secrets_dir(), 0o700)
                .map_err(|e| e.to_string())?;
            storage::write_atomic(path, format!("{s}\n").as_bytes(), 0o600)
                .map_err(|e| format!("writing {}: {e}", path.display()))
        };
        let url_values = toml::Value::Array(urls.into_iter().map(toml::Value::String).collect());
        match existing {
            Some(t) => {
                t.insert("urls".into(), url_values);
                if new_secret {
                    write_secret(&secret_path)?;
                    t.remove("secret");
                    t.insert(
                        "secret_file".into(),
                        toml::Value::String(secret_path.display().to_string()),
                    );
                }
            }
            None => {
                if config.signaling.backends.len() >= 64 {
                    return Err("at most 64 backends".into());
                }
                write_secret(&secret_path)?;
                let mut t = toml::Table::new();
                t.insert("id".into(), toml::Value::String(id.into()));
                t.insert("urls".into(), url_values);
                t.insert(
                    "secret_file".into(),
                    toml::Value::String(secret_path.display().to_string()),
                );
                list.push(toml::Value::Table(t));
            }
        }
        self.write_config(&table)
    }

    fn remove_backend(&self, id: &str) -> Result<(), String> {
        let mut table = self.config_table()?;
        let list = table
            .get_mut("signaling")
            .and_then(|s| s.as_table_mut())
            .and_then(|s| s.get_mut("backend"))
            .and_then(|b| b.as_array_mut())
            .ok_or_else(|| format!("there is no backend \"{id}\""))?;
        let before = list.len();
        list.retain(|v| v.get("id").and_then(|v| v.as_str()) != Some(id));
        if list.len() == before {
            return Err(format!("there is no backend \"{id}\""));
        }
        self.write_config(&table)?;
        let _ = std::fs::remove_file(self.backend_secret_path(id)?);
        Ok(())
    }

    fn talk_values(&self, config: &Config) -> Result<Value, String> {
        let name = public_name(config);
        let host = |port: u16, default: u16| {
            if port == default {
                name.clone()
            } else {
                format!("{name}:{port}")
            }
        };
        let turn_secret =
            secrets::read(&self.data, Secret::TurnSecret).map_err(|e| e.to_string())?;
        let mut backends = Vec::new();
        for b in &config.signaling.backends {
            let secret = match &b.secret_file {
                Some(p) => std::fs::read_to_string(p)
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|e| format!("(cannot read {}: {e})", p.display())),
                None => b.secret.clone(),
            };
            backends.push(json!({"id": b.id, "urls": b.urls, "secret": secret}));
        }
        Ok(json!({
            "signaling_url": format!("https://{}/", host(config.signaling.listen.port(), 443)),
            "turn_server": format!("{name}:{}", config.turn.port),
            "turn_protocols": "udp,tcp",
            "turn_secret": turn_secret.trim(),
            "stun_server": format!("{name}:{}", config.turn.port),
            "turn_enabled": config.turn.enabled,
            "backends": backends,
        }))
    }

    fn install_certificate(&self, cert_pem: &str, key_pem: &str) -> Result<(), String> {
        install_pair(&self.data, cert_pem, key_pem)?;
        tracing::info!("installed an uploaded certificate");
        Ok(())
    }

    fn current_certificate(&self, have_sha256: &str) -> Result<Value, String> {
        let (cert, key) = (
            crate::tls::cert_path(&self.data),
            crate::tls::key_path(&self.data),
        );
        let cert_pem =
            std::fs::read(&cert).map_err(|e| format!("reading {}: {e}", cert.display()))?;
        let sha = hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            &cert_pem,
        ));
        if sha.eq_ignore_ascii_case(have_sha256) {
            return Ok(json!({"changed": false}));
        }
        let key_pem = std::fs::read(&key).map_err(|e| format!("reading {}: {e}", key.display()))?;
        Ok(json!({
            "changed": true,
            "sha256": sha,
            "cert_pem": String::from_utf8_lossy(&cert_pem),
            "key_pem": String::from_utf8_lossy(&key_pem),
        }))
    }

    fn consume_login_link(&self, token_sha256: &str) -> Result<(), String> {
        #[derive(Deserialize)]
        struct Link {
            token_sha256: String,
            expires: String,
        }
        let refused = || "this login link is not valid (used, expired or unknown)".to_string();
        let path = self.data.root.join("web").join("login-link.json");
        let meta = std::fs::metadata(&path).map_err(|_| refused())?;
        if meta.len() > 4096 {
            return Err(refused());
        }
        let text = std::fs::read_to_string(&path).map_err(|_| refused())?;
        let link: Link = serde_json::from_str(&text).map_err(|_| refused())?;
        let expires = parse_rfc3339(&link.expires).ok_or_else(refused)?;
        if !ct_eq(
            link.token_sha256.to_ascii_lowercase().as_bytes(),
            token_sha256.to_ascii_lowercase().as_bytes(),
        ) {
            return Err(refused());
        }
        if now_unix() > expires {
            let _ = std::fs::remove_file(&path);
            return Err(refused());
        }
        std::fs::remove_file(&path).map_err(|e| format!("consuming {}: {e}", path.display()))?;
        tracing::info!("a one-time login link from provisioning was used");
        Ok(())
    }

    fn audit(&self) -> Value {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.data.root.join("provisioning").join("audit.jsonl");
        let Ok(mut f) = std::fs::File::open(&path) else {
            return json!({"entries": [], "present": false});
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let start = len.saturating_sub(MAX_AUDIT_BYTES);
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut buf).is_err() {
            return json!({"entries": [], "present": true, "error": format!("cannot read {}", path.display())});
        }
        let text = String::from_utf8_lossy(&buf);
        let mut entries: Vec<Value> = text
            .lines()
            .skip(usize::from(start > 0))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v.is_object())
            .map(|v| {
                let field = |k: &str| {
                    let s = match v.get(k) {
                        Some(Value::String(s)) => s.clone(),
                        Some(Value::Null) | None => String::new(),
                        Some(other) => other.to_string(),
                    };
                    Value::String(s.chars().take(500).collect())
                };
                json!({"time": field("time"), "source": field("source"), "key": field("key"),
                       "serial": field("serial"), "result": field("result"), "message": field("message")})
            })
            .collect();
        let skip = entries.len().saturating_sub(AUDIT_ENTRIES);
        entries.drain(..skip);
        entries.reverse();
        json!({"entries": entries, "present": true})
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Bool,
    Int,
    Str,
    List,
}

/// The keys the Network and TURN pages may change: (section, key, kind).
const EDITABLE: &[(&str, &str, Kind)] = &[
    ("supervisor", "names", Kind::List),
    ("sfu", "public_ips", Kind::List),
    ("sfu", "media_port_min", Kind::Int),
    ("sfu", "media_port_max", Kind::Int),
    ("signaling", "listen", Kind::Str),
    ("turn", "enabled", Kind::Bool),
    ("turn", "realm", Kind::Str),
    ("turn", "port", Kind::Int),
    ("turn", "tls_port", Kind::Int),
    ("turn", "relay_port_min", Kind::Int),
    ("turn", "relay_port_max", Kind::Int),
    ("turn", "relay_address", Kind::Str),
    ("turn", "allowed_peers", Kind::List),
];

/// The editable settings as in force (the supervisor's config, which the web process's copy
/// may lag behind until it restarts).
fn settings(c: &Config) -> Value {
    json!({
        "supervisor.names": c.supervisor.names,
        "sfu.public_ips": c.sfu.public_ips,
        "sfu.media_port_min": c.sfu.media_port_min,
        "sfu.media_port_max": c.sfu.media_port_max,
        "signaling.listen": c.signaling.listen.to_string(),
        "turn.enabled": c.turn.enabled,
        "turn.realm": c.turn.realm,
        "turn.port": c.turn.port,
        "turn.tls_port": c.turn.tls_port,
        "turn.relay_port_min": c.turn.relay_port_min,
        "turn.relay_port_max": c.turn.relay_port_max,
        "turn.relay_address": c.turn.relay_address,
        "turn.allowed_peers": c.turn.allowed_peers,
    })
}

/// Replaces the box's certificate and key (key first; if the certificate cannot be written
/// the old key is put back, so the pair on disk always matches).
pub fn install_pair(data: &DataDir, cert_pem: &str, key_pem: &str) -> Result<(), String> {
    let (cert, key) = (crate::tls::cert_path(data), crate::tls::key_path(data));
    storage::write_atomic(&key, key_pem.as_bytes(), 0o600)
        .map_err(|e| format!("writing {}: {e}", key.display()))?;
    if let Err(e) = storage::write_atomic(&cert, cert_pem.as_bytes(), 0o600) {
        let _ = std::fs::rename(storage::previous_version(&key), &key);
        return Err(format!("writing {}: {e}", cert.display()));
    }
    tracing::info!(file = %cert.display(), "installed a new certificate");
    Ok(())
}

/// Lines of log a request returns at most.
const LOG_LINES: usize = 300;
/// Bytes of log text an answer carries at most (the link's datagram is 256 KiB).
const LOG_BYTES: usize = 120 * 1024;

/// Recent journal lines of the talkbox services (`SYSLOG_IDENTIFIER=talkbox-*`). Only under
/// systemd: elsewhere the services log to the supervisor's stderr, which the box cannot read back.
fn logs(service: Option<&str>, level: &str, lines: usize) -> Result<Value, String> {
    const SERVICES: [&str; 5] = ["supervisor", "signaling", "sfu", "turn", "web"];
    let priority = match level {
        "error" => "3",
        "warn" => "4",
        "info" => "6",
        "debug" => "7",
        _ => return Err("level must be error, warn, info or debug".into()),
    };
    if let Some(s) = service
        && !SERVICES.contains(&s)
    {
        return Err(format!(
            "unknown service {s:?}; one of {}",
            SERVICES.join(", ")
        ));
    }
    if std::env::var_os("JOURNAL_STREAM").is_none() {
        return Ok(json!({"available": false, "lines": [],
            "reason": "the box is not running under systemd: logs go to the terminal that started `talkbox run`"}));
    }
    let mut cmd = std::process::Command::new("timeout");
    cmd.args([
        "2",
        "journalctl",
        "--no-pager",
        "-o",
        "short-iso",
        "-p",
        priority,
        "-n",
    ])
    .arg(lines.to_string());
    match service {
        Some(s) => {
            cmd.arg(format!("SYSLOG_IDENTIFIER=talkbox-{s}"));
        }
        None => {
            for (i, s) in SERVICES.iter().enumerate() {
                if i > 0 {
                    cmd.arg("+");
                }
                cmd.arg(format!("SYSLOG_IDENTIFIER=talkbox-{s}"));
            }
        }
    }
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("running journalctl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut kept: Vec<&str> = Vec::new();
    let mut size = 0;
    for l in text.lines().rev() {
        size += l.len() + 1;
        if size > LOG_BYTES {
            break;
        }
        kept.push(l);
    }
    kept.reverse();
    Ok(json!({"available": true, "lines": kept}))
}

/// Keys whose values never leave the box in a support bundle.
fn redact(v: &mut toml::Value) {
    match v {
        toml::Value::Table(t) => {
            for (k, val) in t.iter_mut() {
                if k == "secret" || k.ends_with("_secret") || k.ends_with("password") {
                    *val = toml::Value::String("(removed)".into());
                } else {
                    redact(val);
                }
            }
        }
        toml::Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
}

impl SetupStore {
    fn support_bundle_without_logs(&self) -> Result<Value, String> {
        let mut table = toml::Value::Table(self.config_table()?);
        redact(&mut table);
        let config = toml::to_string(&table).map_err(|e| e.to_string())?;
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        Ok(json!({
            "talkbox": env!("CARGO_PKG_VERSION"),
            "kernel": kernel,
            "created": rfc3339(now_unix()),
            "config_file": self.config_path.display().to_string(),
            "config": config,
            "claimed": self.admin().is_some(),
            "logs": Value::Null,
        }))
    }
}

/// The name Nextcloud and browsers use for the box: the first of `supervisor.names`, else
/// the host name.
pub fn public_name(config: &Config) -> String {
    config
        .supervisor
        .names
        .first()
        .cloned()
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.to_str().map(str::to_string))
        })
        .unwrap_or_else(|| "localhost".into())
}

fn new_code() -> std::io::Result<String> {
    let bytes = secrets::random(16).map_err(std::io::Error::other)?;
    let chars: Vec<char> = bytes
        .iter()
        .map(|b| CODE_ALPHABET[usize::from(*b) % CODE_ALPHABET.len()] as char)
        .collect();
    Ok(chars
        .chunks(4)
        .map(|c| c.iter().collect::<String>())
        .collect::<Vec<_>>()
        .join("-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SetupStore) {
        let d = tempfile::tempdir().expect("tempdir");
        let data = DataDir::new(d.path());
        crate::secrets::ensure_all(&data).expect("secrets");
        let s = SetupStore::open(&data, None).expect("open");
        (d, s)
    }

    fn req(s: &mut SetupStore, r: Value) -> (SetupAnswer, Effect) {
        s.handle(&r.to_string(), &Config::default())
    }

    #[test]
    fn claim_needs_the_code_and_happens_once() {
        let (_d, mut s) = store();
        let code = s.setup_code().expect("unclaimed").to_string();
        assert_eq!(code.len(), 19, "{code}");
        let hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo";
        let (a, _) = req(
            &mut s,
            json!({"op":"claim","code":"AAAA-AAAA","password_hash":hash,"engineer_key":null}),
        );
        assert_eq!(a.error.as_deref(), Some("wrong setup code"));
        let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let (a, _) = req(
            &mut s,
            json!({"op":"claim","code":code.to_lowercase().replace('-', " "),"password_hash":hash,"engineer_key":format!("talkbox-engineer-ed25519 {key}")}),
        );
        assert!(a.ok, "{a:?}");
        assert!(s.setup_code().is_none());
        let (a, _) = req(
            &mut s,
            json!({"op":"claim","code":code,"password_hash":hash,"engineer_key":null}),
        );
        assert!(!a.ok);
        let (a, _) = req(&mut s, json!({"op":"state"}));
        assert_eq!(a.data["password_hash"], hash);
        let keys =
            std::fs::read_to_string(s.data.root.join("provisioning/trusted-keys")).expect("keys");
        assert_eq!(keys, format!("talkbox-engineer-ed25519 {key}\n"));
    }

    #[test]
    fn backends_are_added_with_generated_secret_and_removed() {
        let (_d, mut s) = store();
        let (a, e) = req(
            &mut s,
            json!({"op":"put-backend","id":"nc1","urls":["https://cloud.example.com/"]}),
        );
        assert!(a.ok, "{a:?}");
        assert_eq!(e, Effect::ReloadConfig);
        let c = Config::from_file(&s.config_path).expect("valid config written");
        assert_eq!(
            c.signaling.backends[0].urls,
            vec!["https://cloud.example.com".to_string()]
        );
        let (a, _) = s.handle(&json!({"op":"talk-values"}).to_string(), &c);
        let secret = a.data["backends"][0]["secret"]
            .as_str()
            .expect("secret")
            .to_string();
        assert!(secret.len() >= 40, "{secret}");
        let (a, _) = req(
            &mut s,
            json!({"op":"put-backend","id":"nc2","urls":["ftp://x"]}),
        );
        assert!(
            a.error.as_deref().unwrap_or("").contains("not applied"),
            "{a:?}"
        );
        let (a, _) = req(&mut s, json!({"op":"remove-backend","id":"nc1"}));
        assert!(a.ok, "{a:?}");
        let c = Config::from_file(&s.config_path).expect("valid");
        assert!(c.signaling.backends.is_empty());
    }

    #[test]
    fn settings_are_validated_as_a_whole_before_they_are_written() {
        let (_d, mut s) = store();
        let (a, e) = req(
            &mut s,
            json!({"op":"put-settings","values":{"turn.realm":"talk.example.org","sfu.public_ips":["203.0.113.7"]}}),
        );
        assert!(a.ok, "{a:?}");
        assert_eq!(e, Effect::ReloadConfig);
        let c = Config::from_file(&s.config_path).expect("valid config written");
        assert_eq!(c.turn.realm, "talk.example.org");
        assert_eq!(settings(&c)["sfu.public_ips"][0], "203.0.113.7");
        let before = std::fs::read_to_string(&s.config_path).expect("config");
        for (bad, says) in [
            (json!({"turn.port": 70000}), "turn.port"),
            (json!({"turn.port": "many"}), "a whole number"),
            (json!({"sfu.public_ips": ["not an ip"]}), "public_ips"),
            (json!({"web.listen": "0.0.0.0:1"}), "cannot be changed"),
        ] {
            let (a, e) = req(&mut s, json!({"op":"put-settings","values":bad}));
            assert!(!a.ok && e == Effect::None, "{bad} accepted");
            assert!(
                a.error.as_deref().unwrap_or("").contains(says),
                "{bad}: {a:?}"
            );
        }
        assert_eq!(
            before,
            std::fs::read_to_string(&s.config_path).expect("config")
        );
    }

    #[test]
    fn login_link_is_consumed_once_and_only_with_the_right_token() {
        let (_d, mut s) = store();
        let path = s.data.root.join("web/login-link.json");
        let good = "ab".repeat(32);
        std::fs::write(
            &path,
            json!({"token_sha256": good, "expires": rfc3339(now_unix() + 60)}).to_string(),
        )
        .expect("write");
        let (a, _) = req(
            &mut s,
            json!({"op":"consume-login-link","token_sha256":"cd".repeat(32)}),
        );
        assert!(!a.ok);
        assert!(path.exists());
        let (a, _) = req(
            &mut s,
            json!({"op":"consume-login-link","token_sha256":good}),
        );
        assert!(a.ok, "{a:?}");
        assert!(!path.exists());
        let (a, _) = req(
            &mut s,
            json!({"op":"consume-login-link","token_sha256":good}),
        );
        assert!(!a.ok);
        std::fs::write(
            &path,
            json!({"token_sha256": good, "expires": rfc3339(now_unix() - 1)}).to_string(),
        )
        .expect("write");
        let (a, _) = req(
            &mut s,
            json!({"op":"consume-login-link","token_sha256":good}),
        );
        assert!(!a.ok, "expired link accepted");
    }

    #[test]
    fn audit_shows_the_last_entries_newest_first() {
        let (_d, mut s) = store();
        let (a, _) = req(&mut s, json!({"op":"provisioning-audit"}));
        assert_eq!(a.data["present"], false);
        std::fs::create_dir_all(s.data.root.join("provisioning")).expect("dir");
        let mut text = String::new();
        for i in 0..150 {
            text.push_str(&json!({"time":"2026-11-22T12:00:00Z","source":"usb","key":"SHA256:x","serial":i,"result":"applied","message":"ok"}).to_string());
            text.push('\n');
        }
        text.push_str("not json\n");
        std::fs::write(s.data.root.join("provisioning/audit.jsonl"), text).expect("write");
        let (a, _) = req(&mut s, json!({"op":"provisioning-audit"}));
        let e = a.data["entries"].as_array().expect("entries");
        assert_eq!(e.len(), 100);
        assert_eq!(e[0]["serial"], "149");
    }
}
