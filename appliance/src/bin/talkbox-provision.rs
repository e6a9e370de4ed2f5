//! `talkbox-provision`: the certified engineer's command line. Makes Ed25519 keys, makes and
//! inspects signed provisioning bundles, and pushes a bundle to a box over its mTLS API with an
//! enrolment token. Errors meet the user here as one line saying what and where.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use clap::{Parser, Subcommand};

use provisioning::bundle::{self, ANY_BOX, Payload};
use provisioning::key::{EngineerKey, EngineerSecret};
use provisioning::time::{parse_duration, parse_rfc3339, rfc3339};

/// Exit code when a box refused or rolled back a pushed bundle.
const EXIT_NOT_APPLIED: u8 = 3;
/// Largest input file read (config, certificate, secret, key, bundle).
const MAX_INPUT: u64 = bundle::MAX_BUNDLE_BYTES as u64;

#[derive(Parser)]
#[command(
    name = "talkbox-provision",
    version,
    about = "Make engineer keys and signed provisioning bundles for talkbox boxes, and push them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a new Ed25519 engineer key: FILE (secret, mode 0600) and FILE.pub (give that to
    /// the boxes that should trust you).
    Keygen {
        /// Where to write the secret key; FILE.pub gets the public key.
        #[arg(long, short)]
        out: PathBuf,
        /// A comment on the public key line (your name, organisation).
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Make or read provisioning bundles.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Push a bundle to a box's provisioning API (mutual TLS) with a one-time enrolment token.
    Push {
        /// HOST:PORT of the box's provisioning API (`provision.listen`, port 9445 by default).
        #[arg(long = "box")]
        address: String,
        /// The bundle file.
        #[arg(long)]
        bundle: PathBuf,
        /// Your secret engineer key (the TLS client identity; the box must trust it).
        #[arg(long)]
        key: PathBuf,
        /// The enrolment token shown by the box (or set TALKBOX_ENROLMENT_TOKEN).
        #[arg(long, env = "TALKBOX_ENROLMENT_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// A file holding the enrolment token (first line).
        #[arg(long, conflicts_with = "token")]
        token_file: Option<PathBuf>,
        /// The box certificate's fingerprint (sha256:…) as shown on its console or setup page.
        /// Without it the first contact records what the box presents.
        #[arg(long)]
        pin: Option<String>,
        /// Where fingerprints of boxes met before are kept.
        #[arg(long)]
        known_boxes: Option<PathBuf>,
        /// How long to wait for the box's verdict (it runs its self-checks first).
        #[arg(long, default_value = "180s")]
        timeout: String,
    },
    /// Print the fingerprint of a public or secret engineer key file.
    Fingerprint { file: PathBuf },
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Sign a site config (and its certificate and secret files) into a bundle.
    Create {
        /// Your secret engineer key.
        #[arg(long)]
        key: PathBuf,
        /// The box's config file, in talkbox.toml format (check it first with
        /// `talkbox config check`). `${DATA_DIR}` in it stands for the box's data directory.
        #[arg(long)]
        config: PathBuf,
        /// Must be higher than the serial of the last bundle the box applied.
        #[arg(long)]
        serial: u64,
        /// The box id (tb-…) this bundle is for, or `any`.
        #[arg(long)]
        target: String,
        /// When the bundle stops being accepted, UTC (2026-12-31T23:59:00Z).
        #[arg(long, conflicts_with = "valid_for")]
        expires: Option<String>,
        /// How long the bundle is accepted from now (90m, 12h, 7d).
        #[arg(long)]
        valid_for: Option<String>,
        /// The box's TLS certificate chain (PEM); installed as tls/cert.pem.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The key of that certificate (PEM); installed as tls/key.pem.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// A secret file: NAME=PATH installs PATH's contents as DATA_DIR/secrets/NAME
        /// (for `secret_file` of a Nextcloud backend, for example). May be repeated.
        #[arg(long = "secret", value_name = "NAME=PATH")]
        secrets: Vec<String>,
        /// Free text (site, ticket).
        #[arg(long, default_value = "")]
        comment: String,
        /// Where to write the bundle.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Show what a bundle holds, who signed it and whether the signature holds.
    Inspect {
        file: PathBuf,
        /// Also say whether the signer is one of the keys in this public key file.
        #[arg(long)]
        trusted: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("talkbox-provision: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn read_limited(path: &Path, what: &str) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).with_context(|| format!("{what} {}", path.display()))?;
    if !meta.is_file() {
        bail!("{what} {}: not a regular file", path.display());
    }
    if meta.len() > MAX_INPUT {
        bail!(
            "{what} {}: {} bytes; at most {MAX_INPUT}",
            path.display(),
            meta.len()
        );
    }
    std::fs::read(path).with_context(|| format!("{what} {}", path.display()))
}

fn read_text(path: &Path, what: &str) -> Result<String> {
    String::from_utf8(read_limited(path, what)?)
        .map_err(|_| anyhow!("{what} {}: not UTF-8 text", path.display()))
}

fn load_secret(path: &Path) -> Result<EngineerSecret> {
    let text = read_text(path, "engineer key")?;
    EngineerSecret::parse(&text).with_context(|| format!("engineer key {}", path.display()))
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| {
            format!(
                "creating {} (an existing file is never overwritten)",
                path.display()
            )
        })?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn run(command: Command) -> Result<u8> {
    match command {
        Command::Keygen { out, comment } => {
            let secret = EngineerSecret::generate()?;
            let mut public = secret.public();
            public.comment = comment;
            let pub_path = PathBuf::from(format!("{}.pub", out.display()));
            if pub_path.exists() {
                bail!("{} exists; choose another --out", pub_path.display());
            }
            write_new(&out, secret.to_text().as_bytes(), 0o600)?;
            write_new(
                &pub_path,
                format!("{}\n", public.to_line()).as_bytes(),
                0o644,
            )?;
            println!("secret key: {}", out.display());
            println!("public key: {}", pub_path.display());
            println!("fingerprint: {}", public.fingerprint());
            Ok(0)
        }
        Command::Fingerprint { file } => {
            let text = read_text(&file, "key file")?;
            let key = match EngineerKey::parse_line(text.lines().next().unwrap_or("")) {
                Ok(k) => k,
                Err(_) => EngineerSecret::parse(&text)
                    .map(|s| s.public())
                    .map_err(|_| {
                        anyhow!(
                            "{}: neither a public nor a secret engineer key",
                            file.display()
                        )
                    })?,
            };
            println!("{}", key.fingerprint());
            Ok(0)
        }
        Command::Bundle(BundleCommand::Create {
            key,
            config,
            serial,
            target,
            expires,
            valid_for,
            tls_cert,
            tls_key,
            secrets,
            comment,
            out,
        }) => {
            let secret = load_secret(&key)?;
            let config_text = read_text(&config, "config")?;
            bundle::check_target(&target).map_err(|e| anyhow!("--target: {e}"))?;
            let now = now_unix();
            let expires = match (expires, valid_for) {
                (Some(e), None) => parse_rfc3339(&e).map_err(|m| anyhow!("--expires: {m}"))?,
                (None, Some(d)) => {
                    now + parse_duration(&d).map_err(|m| anyhow!("--valid-for: {m}"))?
                }
                _ => bail!(
                    "give --expires (UTC time) or --valid-for (duration) so the bundle cannot be replayed forever"
                ),
            };
            if expires <= now {
                bail!("--expires {} is already past", rfc3339(expires));
            }
            let mut files = BTreeMap::new();
            if let (Some(c), Some(k)) = (&tls_cert, &tls_key) {
                files.insert(
                    "tls/cert.pem".to_string(),
                    STANDARD.encode(read_limited(c, "--tls-cert")?),
                );
                files.insert(
                    "tls/key.pem".to_string(),
                    STANDARD.encode(read_limited(k, "--tls-key")?),
                );
            }
            for s in &secrets {
                let Some((name, path)) = s.split_once('=') else {
                    bail!("--secret {s:?}: expected NAME=PATH, such as nc1=./nc1-secret");
                };
                let dest = format!("secrets/{name}");
                bundle::check_file_path(&dest).map_err(|e| anyhow!("--secret {s:?}: {e}"))?;
                files.insert(
                    dest,
                    STANDARD.encode(read_limited(Path::new(path), "--secret")?),
                );
            }
            let payload = Payload {
                serial,
                target,
                created: now,
                expires,
                comment,
                config: config_text,
                files,
            };
            let bytes = payload.sign(&secret).map_err(|e| anyhow!("{e}"))?;
            write_new(&out, &bytes, 0o600)?;
            println!(
                "wrote {} (serial {serial}, for {}, expires {}, signed by {})",
                out.display(),
                payload.target,
                rfc3339(expires),
                secret.public().fingerprint()
            );
            Ok(0)
        }
        Command::Bundle(BundleCommand::Inspect { file, trusted }) => {
            let bytes = read_limited(&file, "bundle")?;
            let i = bundle::inspect(&bytes).map_err(|e| anyhow!("{}: {e}", file.display()))?;
            match &i.signer {
                Some(k) => println!(
                    "signed by:  {} ({})",
                    k.fingerprint(),
                    if i.signature_valid {
                        "signature valid"
                    } else {
                        "SIGNATURE INVALID: changed after signing"
                    }
                ),
                None => println!("signed by:  nobody (UNSIGNED: no box accepts it)"),
            }
            if let (Some(t), Some(k)) = (trusted, &i.signer) {
                let (keys, _) = EngineerKey::parse_list(&read_text(&t, "trusted keys")?);
                let ok = keys.iter().any(|x| x.raw == k.raw);
                println!(
                    "trusted:    {}",
                    if ok { "yes" } else { "NO (not in that file)" }
                );
            }
            let p = i
                .payload
                .map_err(|e| anyhow!("{}: malformed bundle: {e}", file.display()))?;
            let now = now_unix();
            println!("serial:     {}", p.serial);
            println!(
                "target:     {}",
                if p.target == ANY_BOX {
                    "any box".to_string()
                } else {
                    p.target.clone()
                }
            );
            println!("created:    {}", rfc3339(p.created));
            println!(
                "expires:    {}{}",
                rfc3339(p.expires),
                if p.expires <= now { " (EXPIRED)" } else { "" }
            );
            if !p.comment.is_empty() {
                println!("comment:    {}", p.comment);
            }
            println!("config:     {} bytes", p.config.len());
            for (path, b64) in &p.files {
                println!("file:       {path} ({} base64 characters)", b64.len());
            }
            if let Err(e) = p.check() {
                println!("problem:    {e}");
                return Ok(1);
            }
            Ok(if i.signature_valid { 0 } else { 1 })
        }
        Command::Push {
            address,
            bundle,
            key,
            token,
            token_file,
            pin,
            known_boxes,
            timeout,
        } => {
            let bytes = read_limited(&bundle, "bundle")?;
            bundle::inspect(&bytes).map_err(|e| anyhow!("{}: {e}", bundle.display()))?;
            let secret = load_secret(&key)?;
            let token = match (token, token_file) {
                (Some(t), _) => t,
                (None, Some(f)) => read_text(&f, "token file")?
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string(),
                (None, None) => bail!(
                    "give the box's enrolment token with --token, --token-file or TALKBOX_ENROLMENT_TOKEN"
                ),
            };
            if token.is_empty() || token.len() > provisioning::token::MAX_TOKEN_LEN {
                bail!("the enrolment token is empty or too long; copy it as the box shows it");
            }
            if let Some(p) = &pin
                && !(p.starts_with("sha256:") && p.len() == 71)
            {
                bail!("--pin {p:?}: expected sha256: and 64 hex digits, as the box shows it");
            }
            let timeout = Duration::from_secs(
                parse_duration(&timeout).map_err(|m| anyhow!("--timeout: {m}"))?,
            );
            let known = known_boxes.unwrap_or_else(provisioning::push::default_known_boxes);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let answer =
                rt.block_on(provisioning::push::push(provisioning::push::PushRequest {
                    address: &address,
                    bundle: &bytes,
                    token: &token,
                    key: &secret,
                    pin: pin.as_deref(),
                    known_boxes: &known,
                    timeout,
                }))?;
            if answer.first_contact {
                eprintln!(
                    "first contact with {address}: its certificate {} is now remembered in {}",
                    answer.box_fingerprint,
                    known.display()
                );
            }
            println!("{}", answer.body.trim_end());
            Ok(if answer.status == 200 {
                0
            } else {
                EXIT_NOT_APPLIED
            })
        }
    }
}
