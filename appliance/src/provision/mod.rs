//! The box side of remote provisioning: where signed bundles come from, the checks before
//! anything is written, try-and-revert, the audit log and the one-time setup-page login.
//!
//! Split by privilege (docs/provisioning.md, docs/architecture.md):
//! - the **supervisor** (root) owns every decision and every write: [`Provisioner`] reads
//!   bundles from a `TALKBOX-PROV` stick or partition and qemu fw_cfg at boot, from
//!   `DATA_DIR/provisioning/incoming/` (dropped files), and from the push spool; it checks
//!   them with the `provisioning` crate and the config loader, applies them in try mode
//!   ([`trial`]), runs the self-checks ([`checks`]) and rolls back on failure;
//! - the **provision service** ([`service`], unprivileged, faces the network) only terminates
//!   mutual TLS, throttles, and passes each push through a spool directory ([`spool`]) it may
//!   write and the supervisor reads.
//!
//! Files under `DATA_DIR/provisioning/`: `identity/` (the box's key and certificate, its id),
//! `trusted-keys` (engineer keys set when the box was claimed), `state.json` (last serial),
//! `audit.jsonl`, `enrol-token.json` (hash and expiry only), `trial/` (what a trial replaced),
//! `incoming/`, `spool/`.

pub mod checks;
pub mod identity;
pub mod service;
pub mod sources;
pub mod spool;
pub mod trial;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use provisioning::bundle::{self, Policy, Refusal};
use provisioning::key::EngineerKey;
use provisioning::time::rfc3339;
use provisioning::token::{self, StoredToken};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::config::{Config, DataDir};
use crate::storage;

/// How often the supervisor looks for pushed and dropped bundles.
const POLL_EVERY: Duration = Duration::from_millis(200);
/// Largest trust list read.
const MAX_KEYS_FILE: u64 = 256 * 1024;
/// How long a one-time setup-page login link stays valid.
const LOGIN_LINK_VALID_S: u64 = 3600;
/// How long the enrolment token a new box makes for itself stays valid.
pub const FIRST_TOKEN_VALID_S: u64 = 7 * 86_400;

/// Where a bundle came from (the audit log's `source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    #[serde(rename = "dev-dir")]
    DevDir,
    #[serde(rename = "usb")]
    Usb,
    #[serde(rename = "fw_cfg")]
    FwCfg,
    #[serde(rename = "push")]
    Push,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::DevDir => "dev-dir",
            Source::Usb => "usb",
            Source::FwCfg => "fw_cfg",
            Source::Push => "push",
        }
    }
}

/// One line of `audit.jsonl` (the contract with the setup page).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub time: String,
    pub source: Source,
    /// Fingerprint of the engineer key that signed the bundle (empty when unknown).
    pub key: String,
    pub serial: u64,
    /// `applied`, `rolled-back` or `refused`.
    pub result: String,
    pub message: String,
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The files of `DATA_DIR/provisioning/`.
#[derive(Debug, Clone)]
pub struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn new(data: &DataDir) -> Self {
        Self {
            dir: data.provisioning_dir(),
        }
    }
    pub fn audit(&self) -> PathBuf {
        self.dir.join("audit.jsonl")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn trusted_keys(&self) -> PathBuf {
        self.dir.join("trusted-keys")
    }
    pub fn token(&self) -> PathBuf {
        self.dir.join("enrol-token.json")
    }
    pub fn incoming(&self) -> PathBuf {
        self.dir.join("incoming")
    }
    pub fn spool(&self) -> PathBuf {
        self.dir.join("spool")
    }
    pub fn trial(&self) -> PathBuf {
        self.dir.join("trial")
    }
    pub fn identity(&self) -> PathBuf {
        self.dir.join("identity")
    }
}

/// `DATA_DIR/provisioning/state.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    last_serial: Option<u64>,
}

fn read_state(p: &Paths) -> Result<State> {
    match std::fs::read(p.state()) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| {
            format!(
                "{} is damaged; restore it from a backup (it holds the last applied serial)",
                p.state().display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.state().display())),
    }
}

fn write_state(p: &Paths, s: &State) -> Result<()> {
    let bytes = serde_json::to_vec(s)?;
    storage::write_atomic(&p.state(), &bytes, 0o600)
        .with_context(|| format!("writing {}", p.state().display()))
}

/// Appends one line to the audit log (and mirrors it to the journal).
pub fn audit(p: &Paths, entry: &AuditEntry) {
    tracing::info!(
        source = entry.source.as_str(),
        key = %entry.key,
        serial = entry.serial,
        result = %entry.result,
        "provisioning: {}",
        entry.message
    );
    let line = match serde_json::to_string(entry) {
        Ok(l) => l,
        Err(_) => return,
    };
    let r = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p.audit())
        .and_then(|mut f| {
            f.write_all(format!("{line}\n").as_bytes())?;
            f.sync_data()
        });
    if let Err(e) = r {
        tracing::error!(file = %p.audit().display(), error = %e, "cannot write the provisioning audit log");
    }
}

/// Reads the audit log (for tests and tools; the setup page reads the file itself).
pub fn read_audit(data: &DataDir) -> Vec<AuditEntry> {
    std::fs::read_to_string(Paths::new(data).audit())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn read_key_file(path: &Path, keys: &mut Vec<EngineerKey>) {
    let text = match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() <= MAX_KEYS_FILE => {
            std::fs::read_to_string(path).unwrap_or_default()
        }
        Ok(_) => {
            tracing::warn!(file = %path.display(), "ignored: not a regular file of at most {MAX_KEYS_FILE} bytes");
            return;
        }
        Err(_) => return,
    };
    let (found, bad) = EngineerKey::parse_list(&text);
    for (line, e) in bad {
        tracing::warn!(file = %path.display(), line, "ignored engineer key line: {e}");
    }
    keys.extend(found);
}

/// The engineer keys this box trusts: `provision.engineer_keys_dir/*.pub` (baked into the
/// image) and `DATA_DIR/provisioning/trusted-keys` (set when the box was claimed).
pub fn trusted_keys(config: &Config, data: &DataDir) -> Vec<EngineerKey> {
    let mut keys = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&config.provision.engineer_keys_dir) {
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "pub"))
            .collect();
        files.sort();
        for f in files.iter().take(1000) {
            read_key_file(f, &mut keys);
        }
    }
    read_key_file(&Paths::new(data).trusted_keys(), &mut keys);
    keys
}

fn read_token(p: &Paths) -> Option<StoredToken> {
    let b = std::fs::read(p.token()).ok()?;
    serde_json::from_slice(&b).ok()
}

/// Opens a new enrolment token (replacing any open one); returns the token to show.
pub fn issue_enrolment_token(data: &DataDir, valid_s: u64) -> Result<(String, u64)> {
    let p = Paths::new(data);
    storage::ensure_private_dir(&p.dir, 0o700)
        .with_context(|| format!("creating {}", p.dir.display()))?;
    let mut random = [0u8; token::TOKEN_BYTES];
    getrandom::fill(&mut random).map_err(|e| anyhow::anyhow!("no random numbers: {e}"))?;
    let (text, stored) = token::issue(&random, now_unix(), valid_s);
    storage::write_atomic(&p.token(), &serde_json::to_vec(&stored)?, 0o600)
        .with_context(|| format!("writing {}", p.token().display()))?;
    Ok((text, stored.expires))
}

/// Writes `DATA_DIR/web/login-link.json` and returns the one-time link to the setup page.
pub fn issue_login_link(data: &DataDir, config: &Config) -> Result<String> {
    let dir = data.root.join("web");
    storage::ensure_private_dir(&dir, 0o700)
        .with_context(|| format!("creating {}", dir.display()))?;
    let token = crate::secrets::random_token(32)?;
    let sha = hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        token.as_bytes(),
    ));
    let body = serde_json::json!({
        "token_sha256": sha,
        "expires": rfc3339(now_unix() + LOGIN_LINK_VALID_S),
    });
    let path = dir.join("login-link.json");
    storage::write_atomic(&path, body.to_string().as_bytes(), 0o600)
        .with_context(|| format!("writing {}", path.display()))?;
    let host = match config.supervisor.names.first() {
        Some(n) => n.clone(),
        None if !config.web.listen.ip().is_unspecified() => config.web.listen.ip().to_string(),
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into()),
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    Ok(format!(
        "https://{host}:{}/login/once?token={token}",
        config.web.listen.port()
    ))
}

/// Who pushed a bundle (for the audit message and the spool answer).
#[derive(Debug, Clone)]
pub struct Pusher {
    pub request_id: String,
    pub peer: String,
    pub client_key: EngineerKey,
}

/// What the supervisor must do after a provisioning step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The config and files changed: re-read the config and restart every service.
    ReloadAndRestartAll(String),
}

enum TrialPhase {
    /// Waiting for every service to be ready on the new config.
    Starting,
    /// The self-checks run; their verdict arrives here.
    Checking(oneshot::Receiver<Result<(), String>>),
}

struct Running {
    trial: trial::Trial,
    phase: TrialPhase,
    started: Instant,
    deadline: Instant,
    pusher: Option<Pusher>,
}

/// The supervisor's provisioning state machine (single-threaded, driven by its tick).
pub struct Provisioner {
    data: DataDir,
    paths: Paths,
    /// Provisioning writes DATA_DIR/talkbox.toml; an explicit `--config` elsewhere would make
    /// it pointless, so bundles are then refused.
    foreign_config: Option<PathBuf>,
    box_id: String,
    running: Option<Running>,
    last_poll: Instant,
}

impl Provisioner {
    /// Prepares the provisioning directory and identity, finishes a trial a restart cut short
    /// (by rolling it back), and applies a bundle found at boot. Returns true when the config
    /// file changed (the caller re-reads it before starting services).
    pub fn start(
        data: &DataDir,
        explicit_config: Option<&Path>,
        config: &Config,
    ) -> Result<(Provisioner, bool)> {
        let paths = Paths::new(data);
        storage::ensure_private_dir(&paths.dir, 0o700)
            .with_context(|| format!("creating {}", paths.dir.display()))?;
        storage::remove_stale_temporaries(&paths.dir);
        storage::ensure_private_dir(&paths.incoming(), 0o700)
            .with_context(|| format!("creating {}", paths.incoming().display()))?;
        spool::prepare(&paths.spool(), &config.supervisor.user)?;
        let id = identity::ensure(&paths.identity())?;
        tracing::info!(box_id = %id.box_id, fingerprint = %id.fingerprint, "box identity (pin this fingerprint when pushing)");
        let foreign_config = explicit_config
            .filter(|p| *p != data.config_file())
            .map(Path::to_path_buf);
        let mut me = Provisioner {
            data: data.clone(),
            paths,
            foreign_config,
            box_id: id.box_id,
            running: None,
            last_poll: Instant::now(),
        };
        let mut changed = false;
        if let Some(t) = trial::Trial::load(&me.paths.trial())? {
            let (serial, source, key) = (t.serial, t.source, t.key.clone());
            t.roll_back(&me.data)?;
            audit(
                &me.paths,
                &AuditEntry {
                    time: rfc3339(now_unix()),
                    source,
                    key,
                    serial,
                    result: "rolled-back".into(),
                    message: "the box restarted before the self-checks passed; the previous config is back".into(),
                },
            );
            changed = true;
        }
        let mut boot_bundles = Vec::new();
        if sources::is_image() {
            boot_bundles.extend(sources::read_usb().into_iter().map(|b| (Source::Usb, b)));
        }
        boot_bundles.extend(sources::read_fw_cfg().map(|b| (Source::FwCfg, b)));
        boot_bundles.extend(
            sources::take_incoming(&me.paths.incoming())
                .into_iter()
                .map(|b| (Source::DevDir, b)),
        );
        for (source, bytes) in boot_bundles {
            if me.offer(config, source, &bytes, None).is_some() {
                changed = true;
            }
        }
        let state = read_state(&me.paths)?;
        if state.last_serial.is_none() && !me.paths.token().exists() {
            let (t, expires) = issue_enrolment_token(data, FIRST_TOKEN_VALID_S)?;
            // The box is unprovisioned: show how an engineer may push to it (like a setup code).
            tracing::warn!(
                box_id = %me.box_id,
                "unprovisioned box: enrolment token {t} (valid until {}; `talkbox enrol-token` makes a new one)",
                rfc3339(expires)
            );
        }
        Ok((me, changed))
    }

    pub fn box_id(&self) -> &str {
        &self.box_id
    }

    /// Checks a bundle and, if it passes, applies it in try mode. Returns the step for the
    /// supervisor when something was written.
    fn offer(
        &mut self,
        config: &Config,
        source: Source,
        bytes: &[u8],
        pusher: Option<Pusher>,
    ) -> Option<Step> {
        let inspected = bundle::inspect(bytes).ok();
        let key_hint = inspected
            .as_ref()
            .and_then(|i| i.signer.as_ref())
            .map(|k| k.fingerprint())
            .unwrap_or_default();
        let serial_hint = inspected
            .as_ref()
            .and_then(|i| i.payload.as_ref().ok())
            .map(|p| p.serial)
            .unwrap_or(0);
        let who = pusher
            .as_ref()
            .map(|p| {
                format!(
                    " (pushed from {} by {})",
                    p.peer,
                    p.client_key.fingerprint()
                )
            })
            .unwrap_or_default();
        let refuse = |me: &mut Provisioner, reason: &str, msg: String| {
            audit(
                &me.paths,
                &AuditEntry {
                    time: rfc3339(now_unix()),
                    source,
                    key: key_hint.clone(),
                    serial: serial_hint,
                    result: "refused".into(),
                    message: format!("{msg}{who}"),
                },
            );
            if let Some(p) = &pusher {
                spool::answer(
                    &me.paths.spool(),
                    &p.request_id,
                    &spool::Answer::new("refused", reason, &msg, &me.box_id, serial_hint),
                );
            }
            None
        };
        if self.running.is_some() {
            return refuse(
                self,
                "busy",
                "another bundle is being tried; nothing changed, try again when it is decided"
                    .into(),
            );
        }
        if let Some(f) = &self.foreign_config {
            let msg = format!(
                "the box runs with --config {}; provisioning writes {} and is refused while another file is in force; nothing changed",
                f.display(),
                self.data.config_file().display()
            );
            return refuse(self, "bundle", msg);
        }
        let state = match read_state(&self.paths) {
            Ok(s) => s,
            Err(e) => return refuse(self, "bundle", format!("{e:#}; nothing changed")),
        };
        let trusted = trusted_keys(config, &self.data);
        let policy = Policy {
            trusted: &trusted,
            box_id: &self.box_id,
            last_serial: state.last_serial,
            now_unix: now_unix(),
        };
        let verified = match bundle::open(bytes, &policy) {
            Ok(v) => v,
            Err(r) => {
                let msg = match &r {
                    Refusal::UntrustedKey(_) if trusted.is_empty() => format!(
                        "{r} (none is set: no *.pub in {} and no {})",
                        config.provision.engineer_keys_dir.display(),
                        self.paths.trusted_keys().display()
                    ),
                    _ => r.to_string(),
                };
                return refuse(self, "bundle", format!("{msg}; nothing changed"));
            }
        };
        let serial = verified.payload.serial;
        let key = verified.signer.fingerprint();
        let staged = match trial::stage(&self.data, &verified) {
            Ok(s) => s,
            Err(e) => return refuse(self, "bundle", format!("{e}; nothing changed")),
        };
        // The serial is spent before anything is written, so a bundle that is rolled back
        // cannot be replayed to disturb the box again.
        if let Err(e) = write_state(
            &self.paths,
            &State {
                last_serial: Some(serial),
            },
        ) {
            return refuse(self, "bundle", format!("{e:#}; nothing changed"));
        }
        let t = match trial::Trial::begin(
            &self.data,
            &self.paths.trial(),
            staged,
            serial,
            source,
            &key,
        ) {
            Ok(t) => t,
            Err(e) => {
                return refuse(
                    self,
                    "bundle",
                    format!("applying failed and was undone: {e:#}"),
                );
            }
        };
        tracing::info!(serial, source = source.as_str(), %key, "provisioning: bundle applied in try mode; self-checks follow");
        let now = Instant::now();
        self.running = Some(Running {
            trial: t,
            phase: TrialPhase::Starting,
            started: now,
            deadline: now + Duration::from_secs(staged_timeout(&self.data, config)),
            pusher,
        });
        Some(Step::ReloadAndRestartAll(format!(
            "provisioning bundle serial {serial} (try mode)"
        )))
    }

    /// Driven by the supervisor's tick. `ready_since(t)` says whether every service is ready
    /// in a process started at or after `t`.
    pub fn tick(&mut self, config: &Config, ready_since: impl Fn(Instant) -> bool) -> Option<Step> {
        let now = Instant::now();
        if let Some(step) = self.poll_sources(config, now) {
            return Some(step);
        }
        if let Some(r) = &mut self.running {
            match &mut r.phase {
                TrialPhase::Starting if ready_since(r.started) => {
                    let (tx, rx) = oneshot::channel();
                    let (cfg, data) = (config.clone(), self.data.clone());
                    tokio::spawn(async move {
                        let _ = tx.send(checks::run(&cfg, &data).await);
                    });
                    r.phase = TrialPhase::Checking(rx);
                }
                TrialPhase::Checking(rx) => match rx.try_recv() {
                    Ok(Ok(())) => return self.commit(config),
                    Ok(Err(why)) => return self.roll_back(format!("self-check failed: {why}")),
                    Err(oneshot::error::TryRecvError::Closed) => {
                        return self.roll_back("the self-checks ended without a verdict".into());
                    }
                    Err(oneshot::error::TryRecvError::Empty) => {}
                },
                TrialPhase::Starting => {}
            }
            if now >= r.deadline {
                let secs = r.deadline.duration_since(r.started).as_secs();
                let what = match r.phase {
                    TrialPhase::Starting => "not every service became ready",
                    TrialPhase::Checking(_) => "the self-checks did not finish",
                };
                return self.roll_back(format!("{what} within {secs} s (provision.try_timeout_s)"));
            }
            return None;
        }
        None
    }

    /// Takes dropped bundles and pushes; while a trial runs they are refused as busy.
    fn poll_sources(&mut self, config: &Config, now: Instant) -> Option<Step> {
        if now.duration_since(self.last_poll) < POLL_EVERY {
            return None;
        }
        self.last_poll = now;
        let mut step = None;
        for bytes in sources::take_incoming(&self.paths.incoming()) {
            step = step.or(self.offer(config, Source::DevDir, &bytes, None));
        }
        for req in spool::take_requests(&self.paths.spool()) {
            step = step.or(self.offer_push(config, req));
        }
        step
    }

    fn offer_push(&mut self, config: &Config, req: spool::Request) -> Option<Step> {
        let answer_now = |me: &Provisioner, reason: &str, msg: String| {
            audit(
                &me.paths,
                &AuditEntry {
                    time: rfc3339(now_unix()),
                    source: Source::Push,
                    // The bundle is not opened; the TLS client key is who knocked.
                    key: provisioning::fingerprint_of(&req.client_key),
                    serial: 0,
                    result: "refused".into(),
                    message: format!("push from {}: {msg}", req.peer),
                },
            );
            spool::answer(
                &me.paths.spool(),
                &req.id,
                &spool::Answer::new("refused", reason, &msg, &me.box_id, 0),
            );
            None
        };
        if self.running.is_some() {
            // Checked before the token, so that a push that must wait does not spend it.
            spool::answer(
                &self.paths.spool(),
                &req.id,
                &spool::Answer::new(
                    "refused",
                    "busy",
                    "another bundle is being tried; nothing changed, the token is still open; push again when it is decided",
                    &self.box_id,
                    0,
                ),
            );
            return None;
        }
        let stored = read_token(&self.paths);
        if let Err(e) = token::check(stored.as_ref(), &req.token, now_unix()) {
            return answer_now(self, "token", format!("{e}; nothing changed"));
        }
        let trusted = trusted_keys(config, &self.data);
        let Some(client_key) = trusted.iter().find(|k| k.raw == req.client_key).cloned() else {
            return answer_now(
                self,
                "client",
                format!(
                    "the TLS client key {} is not a trusted engineer key; nothing changed",
                    provisioning::fingerprint_of(&req.client_key)
                ),
            );
        };
        // Single use: the token is spent by the first authenticated push, whatever follows.
        if let Err(e) = std::fs::remove_file(self.paths.token()) {
            return answer_now(
                self,
                "token",
                format!("cannot spend the enrolment token: {e}; nothing changed"),
            );
        }
        let pusher = Pusher {
            request_id: req.id.clone(),
            peer: req.peer.clone(),
            client_key,
        };
        self.offer(config, Source::Push, &req.bundle, Some(pusher))
    }

    fn finish(&mut self, result: &str, message: String, login_link: Option<String>) {
        let Some(r) = self.running.take() else { return };
        audit(
            &self.paths,
            &AuditEntry {
                time: rfc3339(now_unix()),
                source: r.trial.source,
                key: r.trial.key.clone(),
                serial: r.trial.serial,
                result: result.into(),
                message: match &r.pusher {
                    Some(p) => format!(
                        "{message} (pushed from {} by {})",
                        p.peer,
                        p.client_key.fingerprint()
                    ),
                    None => message.clone(),
                },
            },
        );
        if let Some(p) = &r.pusher {
            let mut a = spool::Answer::new(
                result,
                if result == "applied" { "" } else { "checks" },
                &message,
                &self.box_id,
                r.trial.serial,
            );
            a.login_link = login_link;
            spool::answer(&self.paths.spool(), &p.request_id, &a);
        }
    }

    fn commit(&mut self, config: &Config) -> Option<Step> {
        let Some(r) = &self.running else { return None };
        if let Err(e) = r.trial.commit() {
            tracing::error!("provisioning: {e:#}");
        }
        let link = match issue_login_link(&self.data, config) {
            Ok(l) => {
                tracing::warn!(
                    "provisioning applied; one-time setup-page login for the admin: {l}"
                );
                Some(l)
            }
            Err(e) => {
                tracing::error!("provisioning applied, but no login link: {e:#}");
                None
            }
        };
        self.finish(
            "applied",
            "applied: every service is ready and the self-checks passed".into(),
            link,
        );
        None
    }

    fn roll_back(&mut self, why: String) -> Option<Step> {
        let Some(r) = &self.running else { return None };
        let serial = r.trial.serial;
        let message = match r.trial.roll_back(&self.data) {
            Ok(()) => format!("{why}; the previous config is back"),
            Err(e) => format!("{why}; restoring the previous config failed: {e:#}"),
        };
        tracing::error!(serial, "provisioning rolled back: {message}");
        self.finish("rolled-back", message, None);
        Some(Step::ReloadAndRestartAll(format!(
            "rollback of provisioning bundle serial {serial}"
        )))
    }
}

/// The try deadline comes from the *new* config (the bundle may lengthen it for a slow site).
fn staged_timeout(data: &DataDir, fallback: &Config) -> u64 {
    Config::from_file(&data.config_file())
        .map(|c| c.provision.try_timeout_s)
        .unwrap_or(fallback.provision.try_timeout_s)
}
