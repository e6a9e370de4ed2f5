//! The one TOML config of a box: its sections, defaults, validation and documentation.
//!
//! Every key has a default, so no file is needed for a local start. A file is read with
//! [`Config::from_toml`], which reports *all* problems (unknown keys, wrong types, out-of-range
//! values, overlapping port ranges) with their line, instead of stopping at the first one.
//! [`reference_markdown`] renders the key reference that docs/config.md must contain; a test
//! keeps the two in step. Writing the file is [`crate::storage`]'s job, not this module's.

mod reader;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

pub use reader::{KeyDoc, Problem, SectionReader};
use reader::{line_of_span, show, type_name};

/// The sections, in the order they are documented.
const SECTIONS: &[&str] = &[
    "supervisor",
    "signaling",
    "sfu",
    "turn",
    "web",
    "sizing",
    "provision",
];

/// Largest config file accepted; a config is a few KiB, anything bigger is a mistake.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// `[supervisor]`: how the supervisor runs and restarts the services.
#[derive(Debug, Clone, PartialEq)]
pub struct SupervisorConfig {
    pub log_level: String,
    pub user: String,
    pub names: Vec<String>,
    pub stop_timeout_ms: u64,
    pub restart_initial_ms: u64,
    pub restart_max_ms: u64,
    pub healthy_after_s: u64,
    pub crash_loop_restarts: u32,
    pub ready_timeout_s: u64,
    pub watchdog_timeout_s: u64,
}

/// `[signaling]`: the Nextcloud Talk HPB API and the meeting page.
#[derive(Debug, Clone, PartialEq)]
pub struct SignalingConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub http_listen: Option<SocketAddr>,
    pub backends: Vec<BackendConfig>,
    pub allow_all: bool,
    pub builtin_backend: bool,
    pub hello_timeout_ms: u64,
    pub backend_timeout_s: u64,
    pub connections_per_host: u32,
    pub ping_interval_s: u64,
    pub max_stream_bitrate: u64,
    pub max_screen_bitrate: u64,
    pub max_sessions: u32,
    pub trusted_proxies: Vec<IpAddr>,
    pub stats_allowed_ips: Vec<IpAddr>,
    pub turn_servers: Vec<String>,
    /// The SFU's proxy-protocol WebSocket (`ws://` on loopback, `wss://` checked against the
    /// box certificate); `None` = no SFU.
    pub sfu_url: Option<String>,
}

/// `signaling.sfu_url` by default: the box's own SFU, wherever `sfu.listen` puts it.
pub const DEFAULT_SFU_URL: &str = "auto";

/// One `[[signaling.backend]]`: a Nextcloud server allowed to use this box as its HPB.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    pub id: String,
    /// Base URLs (`https://cloud.example.com/`), without a trailing slash.
    pub urls: Vec<String>,
    /// Inline shared secret (kept for tests and quick setups; `secret_file` is the documented way).
    pub secret: String,
    /// File holding the shared secret, read by the signaling service before it drops root.
    pub secret_file: Option<PathBuf>,
    /// Most client sessions at once; 0 = no limit.
    pub session_limit: u32,
    /// Bitrate caps in bit/s; 0 = the `[signaling]` defaults.
    pub max_stream_bitrate: u64,
    pub max_screen_bitrate: u64,
}

fn check_backend_url(s: &str) -> Result<(), String> {
    let ok = (s.starts_with("https://") || s.starts_with("http://"))
        && s.parse::<axum::http::Uri>()
            .is_ok_and(|u| u.host().is_some_and(|h| !h.is_empty()) && u.query().is_none());
    if ok {
        Ok(())
    } else {
        Err("expected the Nextcloud base URL, such as https://cloud.example.com/ or https://example.com/nextcloud/".into())
    }
}

impl BackendConfig {
    fn read(r: &mut SectionReader<'_, '_>) -> Self {
        let b = Self {
            id: r.string(
                "id",
                "",
                "Name of the backend in logs and metrics (letters, digits, `-`, `_`).",
                |s| {
                    if !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                        Ok(())
                    } else {
                        Err("expected 1 to 64 letters, digits, '-' or '_'".into())
                    }
                },
            ),
            urls: r
                .string_list(
                    "urls",
                    &[],
                    "Base URLs of the Nextcloud server; requests and hellos from other URLs are refused with `invalid_backend`.",
                    check_backend_url,
                )
                .into_iter()
                .map(|u| u.trim_end_matches('/').to_string())
                .collect(),
            secret: r.string(
                "secret",
                "",
                "Shared secret inline, as entered in Talk's \"High-performance backend\" settings (at least 16 characters). Prefer `secret_file`: a config file may be shown or backed up, a 0600 secret file is not.",
                |s| {
                    if s.is_empty() || (s.len() >= 16 && s.len() <= 1024) {
                        Ok(())
                    } else {
                        Err("expected 16 to 1024 characters".into())
                    }
                },
            ),
            secret_file: Some(r.string(
                "secret_file",
                "",
                "Absolute path of a file holding the shared secret (one line, 16 to 1024 characters), readable by root; the signaling service reads it before dropping privileges. The documented way to give the secret.",
                |s| {
                    if s.is_empty() || (s.starts_with('/') && s.len() <= 4096) {
                        Ok(())
                    } else {
                        Err("expected an absolute path such as /var/lib/talkbox/secrets/nc1-secret".into())
                    }
                },
            ))
            .filter(|s| !s.is_empty())
            .map(PathBuf::from),
            session_limit: r.int("session_limit", 0, (0, 1_000_000), "Most client sessions of this backend at once; 0 = no limit.") as u32,
            max_stream_bitrate: r.int("max_stream_bitrate", 0, (0, 100_000_000), "Camera bitrate cap in bit/s for this backend; it can only lower `signaling.max_stream_bitrate` (the lower of the two applies, as upstream); 0 = the global cap.") as u64,
            max_screen_bitrate: r.int("max_screen_bitrate", 0, (0, 100_000_000), "Screen-share bitrate cap in bit/s for this backend; it can only lower `signaling.max_screen_bitrate` (the lower of the two applies, as upstream); 0 = the global cap.") as u64,
        };
        if b.id.is_empty() {
            r.problem("id", None, "every [[signaling.backend]] needs an id");
        }
        if b.urls.is_empty() {
            r.problem(
                "urls",
                None,
                "every [[signaling.backend]] needs at least one URL",
            );
        }
        match (b.secret.is_empty(), b.secret_file.is_none()) {
            (true, true) => r.problem(
                "secret_file",
                None,
                "every [[signaling.backend]] needs the shared secret: set secret_file (or secret)",
            ),
            (false, false) => {
                r.problem("secret", None, "set either secret_file or secret, not both")
            }
            _ => {}
        }
        b
    }
}

/// `[sfu]`: the media node.
#[derive(Debug, Clone, PartialEq)]
pub struct SfuConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub tls: bool,
    pub trusted_token_keys: Vec<String>,
    pub workers: u32,
    pub media_bind: IpAddr,
    pub ice_tcp: bool,
    pub ice_timeout_s: u64,
    pub resume_grace_s: u64,
    pub media_port_min: u16,
    pub media_port_max: u16,
    pub public_ips: Vec<String>,
    pub metrics_allowed_ips: Vec<IpAddr>,
}

/// `[turn]`: the STUN/TURN server.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnConfig {
    pub enabled: bool,
    pub listen_address: IpAddr,
    pub port: u16,
    pub tls_port: u16,
    pub relay_port_min: u16,
    pub relay_port_max: u16,
    pub relay_address: String,
    pub realm: String,
    pub allowed_peers: Vec<String>,
    pub max_allocations_per_user: u32,
    pub max_allocations: u32,
    pub bandwidth_per_allocation_kbps: u64,
    pub nonce_lifetime_s: u64,
    pub max_tcp_connections: u32,
    pub tcp_handshake_timeout_s: u64,
    pub tcp_idle_timeout_s: u64,
    pub metrics_listen: String,
}

/// `[web]`: the admin setup page.
#[derive(Debug, Clone, PartialEq)]
pub struct WebConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub session_idle_s: u64,
    pub session_max_s: u64,
    pub acme_enabled: bool,
    pub acme_directory: String,
    pub acme_contact: String,
    pub acme_ca_file: Option<PathBuf>,
    pub acme_http_listen: SocketAddr,
    pub acme_renew_before_days: u64,
    pub acme_check_interval_s: u64,
}

/// `[provision]`: remote provisioning (signed bundles, the mTLS push API, try-and-revert).
#[derive(Debug, Clone, PartialEq)]
pub struct ProvisionConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub try_timeout_s: u64,
    pub engineer_keys_dir: PathBuf,
}

/// `[sizing]`: what the box may send, from which the SFU's limits follow.
#[derive(Debug, Clone, PartialEq)]
pub struct SizingConfig {
    pub uplink_mbps: u64,
    pub egress_fraction: f64,
    /// Another box's (or any talkbox sizing sink's) base URL to measure against; `None` = none.
    pub peer: Option<String>,
    pub measure_seconds: u64,
    pub remeasure_minutes: u64,
}

/// The whole configuration of a box.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub supervisor: SupervisorConfig,
    pub signaling: SignalingConfig,
    pub sfu: SfuConfig,
    pub turn: TurnConfig,
    pub web: WebConfig,
    pub sizing: SizingConfig,
    pub provision: ProvisionConfig,
}

fn check_user_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 32
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && !s.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err("expected a system user name: lowercase letters, digits, '_' or '-', at most 32".into())
    }
}

fn check_name(s: &str) -> Result<(), String> {
    if s.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err("expected a DNS name (such as talk.example.org) or an IP address".into())
    }
}

fn check_realm(s: &str) -> Result<(), String> {
    if !s.is_empty() && s.len() <= 127 && s.chars().all(|c| c.is_ascii_graphic()) {
        Ok(())
    } else {
        Err("expected 1 to 127 printable ASCII characters without spaces".into())
    }
}

fn check_cidr(s: &str) -> Result<(), String> {
    s.parse::<ipnet::IpNet>()
        .map(|_| ())
        .or_else(|_| s.parse::<IpAddr>().map(|_| ()))
        .map_err(|_| {
            "expected a network in CIDR notation (10.1.0.0/16, fd00::/8) or one IP address".into()
        })
}

fn check_loopback_listen(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Ok(());
    }
    match s.parse::<SocketAddr>() {
        Ok(a) if a.ip().is_loopback() && a.port() != 0 => Ok(()),
        _ => Err("expected empty or a loopback ADDRESS:PORT such as 127.0.0.1:9478".into()),
    }
}

fn check_ip(s: &str) -> Result<(), String> {
    s.parse::<IpAddr>()
        .map(|_| ())
        .map_err(|_| "expected an IPv4 or IPv6 address".into())
}

impl SupervisorConfig {
    fn read(r: &mut SectionReader<'_, '_>) -> Self {
        Self {
            log_level: r.choice(
                "log_level",
                "info",
                &["error", "warn", "info", "debug", "trace"],
                "Log level of the supervisor and every service. `RUST_LOG`, when set, overrides it.",
            ),
            user: r.string(
                "user",
                "talkbox",
                "Unprivileged system user the services switch to when the supervisor is started as root.",
                check_user_name,
            ),
            names: r.string_list(
                "names",
                &[],
                "Extra DNS names and IP addresses of the box, added to the self-signed certificate \
                 (localhost, 127.0.0.1, ::1 and the host name are always in it).",
                check_name,
            ),
            stop_timeout_ms: r.int(
                "stop_timeout_ms",
                3000,
                (100, 60_000),
                "How long a service may take to exit after SIGTERM before it gets SIGKILL.",
            ) as u64,
            restart_initial_ms: r.int(
                "restart_initial_ms",
                500,
                (10, 60_000),
                "Delay before the first restart of a service that died; doubles on each further failure.",
            ) as u64,
            restart_max_ms: r.int(
                "restart_max_ms",
                30_000,
                (10, 600_000),
                "Longest delay between restarts.",
            ) as u64,
            healthy_after_s: r.int(
                "healthy_after_s",
                60,
                (1, 3600),
                "A service that has run this long is healthy again: its restart delay starts over.",
            ) as u64,
            crash_loop_restarts: r.int(
                "crash_loop_restarts",
                5,
                (1, 1000),
                "Failures in a row, each before `healthy_after_s`, after which a service is reported as in a crash loop.",
            ) as u32,
            ready_timeout_s: r.int(
                "ready_timeout_s",
                30,
                (1, 600),
                "How long a service may take to report ready before it counts as failed.",
            ) as u64,
            watchdog_timeout_s: r.int(
                "watchdog_timeout_s",
                20,
                (2, 600),
                "A ready service that sends no watchdog ping for this long is killed and restarted.",
            ) as u64,
        }
    }
}

impl SignalingConfig {
    fn read(r: &mut SectionReader<'_, '_>) -> Self {
        let enabled = r.bool("enabled", true, "Run the signaling service.");
        let listen = r.socket_addr(
            "listen",
            "127.0.0.1:8443",
            "HTTPS address of the signaling API (`/spreed`, `/api/v1/...`) and the meeting page.",
        );
        let http_listen = r.string(
            "http_listen",
            "",
            "Plain-HTTP address of the same API, for a TLS-terminating reverse proxy on the box or loopback tests; empty = none.",
            |s| if s.is_empty() { Ok(()) } else { reader_socket_addr(s).map(|_| ()) },
        );
        let tables = r.table_array(
            "backend",
            "Nextcloud servers allowed to use this box (`[[signaling.backend]]` with `id`, `urls`, `secret_file` (or `secret`), and optional `session_limit`, `max_stream_bitrate`, `max_screen_bitrate`).",
            |e| {
                BackendConfig::read(e);
            },
        );
        let mut backends: Vec<BackendConfig> = Vec::new();
        for (i, t) in tables.into_iter().enumerate() {
            let mut e = r.entry("backend", i, t);
            let b = BackendConfig::read(&mut e);
            if backends.iter().any(|o| o.id == b.id) {
                e.problem(
                    "id",
                    Some(format!("{:?}", b.id)),
                    "another [[signaling.backend]] has this id",
                );
            }
            if let Some(u) = b
                .urls
                .iter()
                .find(|u| backends.iter().any(|o| o.urls.contains(u)))
            {
                e.problem(
                    "urls",
                    Some(format!("{u:?}")),
                    "another [[signaling.backend]] has this URL",
                );
            }
            e.finish();
            backends.push(b);
        }
        Self {
            enabled,
            listen,
            http_listen: reader_socket_addr(&http_listen).ok(),
            backends,
            allow_all: r.bool(
                "allow_all",
                false,
                "Accept any Nextcloud URL with the built-in backend secret. Insecure: for test setups only.",
            ),
            builtin_backend: r.bool(
                "builtin_backend",
                true,
                "Serve stand-alone rooms (meeting page, links, `/api/v1/rooms`) from the built-in backend.",
            ),
            sfu_url: Some(r.string(
                "sfu_url",
                DEFAULT_SFU_URL,
                "The SFU's proxy-protocol WebSocket (`/proxy`): `auto` = this box's SFU at `sfu.listen` (`wss://` when `sfu.tls`); `ws://` only on loopback, `wss://` verified against the box certificate; empty = no SFU (no `mcu` feature).",
                check_sfu_url,
            ))
            .filter(|s| !s.is_empty()),
            hello_timeout_ms: r.int("hello_timeout_ms", 2000, (100, 60_000), "A client must send `hello` within this time after connecting.") as u64,
            backend_timeout_s: r.int("backend_timeout_s", 10, (1, 120), "Timeout of requests to Nextcloud (auth, room, ping, capabilities).") as u64,
            connections_per_host: r.int("connections_per_host", 8, (1, 1024), "Most simultaneous requests to one Nextcloud host.") as u32,
            ping_interval_s: r.int("ping_interval_s", 10, (1, 10), "How often Talk sessions in rooms are kept alive with `ping` requests.") as u64,
            max_stream_bitrate: r.int("max_stream_bitrate", 1_048_576, (10_000, 100_000_000), "Camera bitrate cap in bit/s (upstream's `[mcu] maxstreambitrate`): announced in `room` replies and enforced on each camera publisher (SDP `b=AS`, REMB); a backend's own cap may lower it.") as u64,
            max_screen_bitrate: r.int("max_screen_bitrate", 2_097_152, (10_000, 100_000_000), "Screen-share bitrate cap in bit/s (upstream's `[mcu] maxscreenbitrate`): announced in `room` replies and enforced on each screen publisher; a backend's own cap may lower it.") as u64,
            max_sessions: r.int("max_sessions", 10_000, (1, 1_000_000), "Most WebSocket connections at once.") as u32,
            trusted_proxies: r
                .string_list(
                    "trusted_proxies",
                    &[],
                    "Reverse proxies whose `X-Real-IP` / `X-Forwarded-For` name the client (for throttling and logs).",
                    check_ip,
                )
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect(),
            stats_allowed_ips: r
                .string_list(
                    "stats_allowed_ips",
                    &["127.0.0.1", "::1"],
                    "Addresses allowed to read `/api/v1/stats`, `/api/v1/serverinfo` and `/metrics`.",
                    check_ip,
                )
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect(),
            turn_servers: r.string_list(
                "turn_servers",
                &[],
                "TURN URIs returned by `/turn/credentials` (such as `turn:turn.example.org:3478?transport=udp`); empty = the endpoint answers 404.",
                |s| {
                    if (s.starts_with("turn:") || s.starts_with("turns:")) && s.len() <= 256 && !s.contains(char::is_whitespace) {
                        Ok(())
                    } else {
                        Err("expected a turn: or turns: URI".into())
                    }
                },
            ),
        }
    }
}

/// `ws://` only to this machine (the proxy hello token would travel in clear otherwise);
/// `wss://` anywhere.
fn check_sfu_url(s: &str) -> Result<(), String> {
    if s.is_empty() || s == DEFAULT_SFU_URL {
        return Ok(());
    }
    let uri = s
        .parse::<axum::http::Uri>()
        .ok()
        .filter(|u| matches!(u.scheme_str(), Some("ws") | Some("wss")) && u.host().is_some());
    let Some(uri) = uri else {
        return Err(
            "expected `auto`, a ws:// or wss:// URL such as ws://127.0.0.1:9444/proxy, or empty"
                .into(),
        );
    };
    let host = uri.host().unwrap_or("").trim_matches(['[', ']']);
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if uri.scheme_str() == Some("ws") && !loopback {
        return Err(
            "plain ws:// only to a loopback address; use wss:// for an SFU on another machine"
                .into(),
        );
    }
    Ok(())
}

fn reader_socket_addr(s: &str) -> Result<SocketAddr, String> {
    match s.parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 => Ok(a),
        _ => Err("expected ADDRESS:PORT such as 127.0.0.1:8080".into()),
    }
}

impl SfuConfig {
    fn read(r: &mut SectionReader<'_, '_>) -> Self {
        let c = Self {
            enabled: r.bool("enabled", true, "Run the SFU media service."),
            listen: r.socket_addr(
                "listen",
                "127.0.0.1:9444",
                "Address of the SFU control endpoint (`/proxy` WebSocket of the spreed proxy protocol) that signaling servers connect to.",
            ),
            tls: r.bool(
                "tls",
                false,
                "Serve `/proxy` over HTTPS with the box's certificate (for signaling servers on other hosts); off = plain HTTP, for loopback.",
            ),
            trusted_token_keys: r.string_list(
                "trusted_token_keys",
                &[],
                "Extra signaling servers allowed to use this SFU, as `TOKEN_ID=/path/to/rsa-public-key.pem` (the box's own signaling server is always trusted).",
                |s| match s.split_once('=') {
                    Some((id, path)) if !id.is_empty() && id.len() <= 64 && path.starts_with('/') => Ok(()),
                    _ => Err("expected TOKEN_ID=/absolute/path/to/public-key.pem".into()),
                },
            ),
            workers: r.int(
                "workers",
                0,
                (0, 256),
                "Media worker threads, one UDP port each; 0 = one per core left after the control plane.",
            ) as u32,
            media_port_min: r.port(
                "media_port_min",
                50000,
                "First UDP port of the media workers (worker n uses media_port_min + n).",
            ),
            media_port_max: r.port(
                "media_port_max",
                50063,
                "Last UDP port the media workers may use.",
            ),
            media_bind: r.ip(
                "media_bind",
                "0.0.0.0",
                "Address the media workers' UDP sockets bind to (IPv4).",
            ),
            ice_tcp: r.bool(
                "ice_tcp",
                true,
                "Also accept ICE over TCP (passive, RFC 6544) on each media port, for clients whose UDP is blocked.",
            ),
            ice_timeout_s: r.int(
                "ice_timeout_s",
                30,
                (1, 3600),
                "A media session that receives nothing for this long (client gone, ICE never completed) is closed.",
            ) as u64,
            resume_grace_s: r.int(
                "resume_grace_s",
                30,
                (0, 600),
                "How long a signaling server's proxy session (its publishers and subscribers) outlives a lost /proxy connection, waiting for it to resume; 0 = close at once.",
            ) as u64,
            public_ips: r.string_list(
                "public_ips",
                &[],
                "Addresses announced in ICE candidates (public IPs, 1:1 NAT mappings); empty = the interface addresses.",
                check_ip,
            ),
            metrics_allowed_ips: r
                .string_list(
                    "metrics_allowed_ips",
                    &["127.0.0.1", "::1"],
                    "Addresses allowed to read the SFU's Prometheus `/metrics` on `sfu.listen` (others get 403), as `signaling.stats_allowed_ips` does for signaling.",
                    check_ip,
                )
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect(),
        };
        if c.media_port_min > c.media_port_max {
            r.problem(
                "media_port_max",
                Some(c.media_port_max.to_string()),
                format!(
                    "must not be below sfu.media_port_min ({})",
                    c.media_port_min
                ),
            );
        } else if c.workers > 0 && u32::from(c.media_port_max - c.media_port_min) + 1 < c.workers {
            r.problem(
                "workers",
                Some(c.workers.to_string()),
                format!(
                    "needs one port each but sfu.media_port_min..media_port_max holds only {}",
                    c.media_port_max - c.media_port_min + 1
                ),
            );
        }
        c
    }
}

impl TurnConfig {
    /// The address relay sockets bind to and announce.
    pub fn relay_ip(&self) -> IpAddr {
        self.relay_address.parse().unwrap_or(self.listen_address)
    }

    fn read(r: &mut SectionReader<'_, '_>) -> Self {
        let c = Self {
            enabled: r.bool("enabled", true, "Run the STUN/TURN service."),
            listen_address: r.ip(
                "listen_address",
                "127.0.0.1",
                "Address TURN listens on (UDP and TCP `port`, TLS `tls_port`); 0.0.0.0 or :: for all.",
            ),
            port: r.port("port", 3478, "STUN/TURN port, UDP and TCP."),
            tls_port: r.port("tls_port", 5349, "TURN over TLS port."),
            relay_port_min: r.port(
                "relay_port_min",
                20000,
                "First UDP port of the relay range (keep it outside the kernel's ephemeral range).",
            ),
            relay_port_max: r.port("relay_port_max", 29999, "Last UDP port of the relay range."),
            relay_address: r.string(
                "relay_address",
                "",
                "Address relay sockets bind to and announce to clients; empty = `listen_address` \
                 (required when that is 0.0.0.0 or ::).",
                |s| if s.is_empty() { Ok(()) } else { check_ip(s) },
            ),
            realm: r.string(
                "realm",
                "talkbox",
                "TURN realm sent to clients.",
                check_realm,
            ),
            allowed_peers: r.string_list(
                "allowed_peers",
                &[],
                "Peer networks (CIDR, such as 192.168.10.0/24) the relay may reach although they are \
                 loopback, private, link-local, CGNAT, multicast, ULA or the box's own addresses, \
                 which are refused by default (relaying into the LAN is the classic TURN hole). \
                 The box's own relay and SFU media ports are always reachable.",
                check_cidr,
            ),
            max_allocations_per_user: r.int(
                "max_allocations_per_user",
                50,
                (1, 100_000),
                "Allocations one TURN username may hold at once; more are refused with 486.",
            ) as u32,
            max_allocations: r.int(
                "max_allocations",
                10_000,
                (1, 1_000_000),
                "Allocations the server holds at once; more are refused with 486.",
            ) as u32,
            bandwidth_per_allocation_kbps: r.int(
                "bandwidth_per_allocation_kbps",
                20_000,
                (0, 10_000_000),
                "Relayed kbit/s per allocation and direction; packets beyond it are dropped. 0 = no cap.",
            ) as u64,
            nonce_lifetime_s: r.int(
                "nonce_lifetime_s",
                600,
                (30, 86_400),
                "How long a nonce stays valid; after it a request gets 438 (Stale Nonce) and retries.",
            ) as u64,
            max_tcp_connections: r.int(
                "max_tcp_connections",
                4096,
                (1, 1_000_000),
                "Open TURN connections over TCP and TLS at once; further connections are closed at once.",
            ) as u32,
            tcp_handshake_timeout_s: r.int(
                "tcp_handshake_timeout_s",
                10,
                (1, 300),
                "Time a TLS client has to finish its handshake, and a TCP client to complete a message it started.",
            ) as u64,
            tcp_idle_timeout_s: r.int(
                "tcp_idle_timeout_s",
                600,
                (10, 86_400),
                "A TCP or TLS connection that sends nothing for this long is closed.",
            ) as u64,
            metrics_listen: r.string(
                "metrics_listen",
                "",
                "Loopback ADDRESS:PORT serving the TURN metrics as Prometheus text at /metrics; empty = not served.",
                check_loopback_listen,
            ),
        };
        if c.relay_port_min > c.relay_port_max {
            r.problem(
                "relay_port_max",
                Some(c.relay_port_max.to_string()),
                format!(
                    "must not be below turn.relay_port_min ({})",
                    c.relay_port_min
                ),
            );
        }
        if c.relay_address.is_empty() && c.listen_address.is_unspecified() {
            r.problem(
                "listen_address",
                Some(format!("{:?}", c.listen_address.to_string())),
                "listens on every address, so set turn.relay_address to the address clients reach the relay on",
            );
        }
        if c.port == c.tls_port {
            r.problem(
                "tls_port",
                Some(c.tls_port.to_string()),
                "must differ from turn.port (both are TCP listeners)",
            );
        }
        c
    }
}

impl WebConfig {
    /// What the web process itself uses; the other `acme_*` keys concern only the supervisor,
    /// so changing them must not restart the setup page (and log the admin out).
    pub fn web_process_part(&self) -> (bool, SocketAddr, u64, u64, bool, SocketAddr) {
        (
            self.enabled,
            self.listen,
            self.session_idle_s,
            self.session_max_s,
            self.acme_enabled,
            self.acme_http_listen,
        )
    }

    fn read(r: &mut SectionReader<'_, '_>) -> Self {
        Self {
            enabled: r.bool("enabled", true, "Run the setup page service."),
            listen: r.socket_addr(
                "listen",
                "127.0.0.1:9443",
                "HTTPS address of the admin setup page (restrict it to an admin network where you can).",
            ),
            session_idle_s: r.int(
                "session_idle_s",
                1800,
                (2, 86_400),
                "An admin session ends after this many seconds without a request.",
            ) as u64,
            session_max_s: r.int(
                "session_max_s",
                43_200,
                (60, 604_800),
                "An admin session ends this many seconds after login, however active.",
            ) as u64,
            acme_enabled: r.bool(
                "acme_enabled",
                false,
                "Get the box's certificate from an ACME CA (HTTP-01 challenge on `web.acme_http_listen`) for the DNS names in `supervisor.names`, and renew it automatically. A certificate already in place (uploaded, say) that covers those names is kept until it enters the renewal window.",
            ),
            acme_directory: r.string(
                "acme_directory",
                "https://acme-v02.api.letsencrypt.org/directory",
                "Directory URL of the ACME CA (the default is Let's Encrypt's production CA).",
                check_https_url,
            ),
            acme_contact: r.string(
                "acme_contact",
                "",
                "E-mail address the CA may write to about the certificate (empty: none).",
                check_email,
            ),
            acme_ca_file: {
                let s = r.string(
                    "acme_ca_file",
                    "",
                    "PEM file of the root CA the ACME server's own HTTPS certificate is checked against, for a private ACME CA (empty: the public web roots).",
                    |_| Ok(()),
                );
                (!s.is_empty()).then(|| PathBuf::from(s))
            },
            acme_http_listen: r.socket_addr(
                "acme_http_listen",
                "0.0.0.0:80",
                "Plain HTTP address where the web service answers the CA's HTTP-01 challenges while `web.acme_enabled` is on (the CA connects to port 80 of the public name).",
            ),
            acme_renew_before_days: r.int(
                "acme_renew_before_days",
                30,
                (1, 3650),
                "Renew the ACME certificate when it expires within this many days.",
            ) as u64,
            acme_check_interval_s: r.int(
                "acme_check_interval_s",
                3600,
                (1, 86_400),
                "How often the supervisor checks whether the certificate needs an ACME order; also the wait after a failed order before the next try.",
            ) as u64,
        }
    }
}

fn check_https_url(s: &str) -> Result<(), String> {
    let uri: axum::http::Uri = s
        .parse()
        .map_err(|_| "not a URL; expected https://HOST/PATH".to_string())?;
    match uri.scheme_str() {
        Some("https") if uri.host().is_some() => Ok(()),
        _ => Err("expected an https:// URL with a host".to_string()),
    }
}

fn check_email(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Ok(());
    }
    let ok = s.len() <= 254
        && s.split_once('@').is_some_and(|(user, host)| {
            !user.is_empty()
                && !host.is_empty()
                && s.chars().all(|c| c.is_ascii_graphic() && c != ',')
                && check_name(host).is_ok()
        });
    if ok {
        Ok(())
    } else {
        Err("expected empty or one e-mail address such as admin@example.org".into())
    }
}

fn check_sizing_peer(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Ok(());
    }
    let uri: axum::http::Uri = s
        .parse()
        .map_err(|_| "not a URL; expected http://HOST:PORT or https://HOST:PORT".to_string())?;
    match uri.scheme_str() {
        Some("http") | Some("https") if uri.host().is_some() => Ok(()),
        _ => Err("expected an http:// or https:// URL with a host".to_string()),
    }
}

impl ProvisionConfig {
    fn read(r: &mut SectionReader<'_, '_>) -> Self {
        Self {
            enabled: r.bool(
                "enabled",
                true,
                "Run the provisioning service: the mutual-TLS push API through which an engineer's `talkbox-provision push` delivers a signed bundle with a one-time enrolment token.",
            ),
            listen: r.socket_addr(
                "listen",
                "127.0.0.1:9445",
                "Address of the provisioning push API (mutual TLS; its certificate is the box identity the engineer pins).",
            ),
            try_timeout_s: r.int(
                "try_timeout_s",
                90,
                (5, 3600),
                "How long a newly provisioned config has to pass the self-checks (every service ready, Nextcloud backends reachable, certificate valid for `supervisor.names`) before the previous config comes back.",
            ) as u64,
            engineer_keys_dir: PathBuf::from(r.string(
                "engineer_keys_dir",
                "/usr/share/talkbox/engineer-keys",
                "Directory of engineer public keys (`*.pub`) baked into the image; bundles signed by them, or by keys in DATA_DIR/provisioning/trusted-keys, are accepted.",
                |s| {
                    if s.starts_with('/') && s.len() <= 4096 {
                        Ok(())
                    } else {
                        Err("expected an absolute directory path".into())
                    }
                },
            )),
        }
    }
}

impl SizingConfig {
    fn read(r: &mut SectionReader<'_, '_>) -> Self {
        Self {
            uplink_mbps: r.int(
                "uplink_mbps",
                0,
                (0, 400_000),
                "Declared uplink in Mbit/s when the WAN is slower than the NIC; 0 = not declared.",
            ) as u64,
            egress_fraction: r.float(
                "egress_fraction",
                0.8,
                (0.1, 1.0),
                "Share of the measured capacity the SFU may plan to send.",
            ),
            peer: Some(r.string(
                "peer",
                "",
                "Base URL (`http://` or `https://`) of another talkbox, or of `talkbox sizing sink`, to measure the uplink against; empty = no active measurement.",
                check_sizing_peer,
            ))
            .filter(|s| !s.is_empty()),
            measure_seconds: r.int(
                "measure_seconds",
                3,
                (1, 30),
                "How long one active measurement sends.",
            ) as u64,
            remeasure_minutes: r.int(
                "remeasure_minutes",
                0,
                (0, 10_080),
                "Repeat the active measurement this often; 0 = only at start and when asked (`talkbox sizing --apply`, setup page).",
            ) as u64,
        }
    }
}

/// Where a problem was found: a file or an in-memory text.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}: {}", self.file, p.line, p.key)?;
            if let Some(v) = &p.value {
                write!(f, " = {v}")?;
            }
            write!(f, ": {}", p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A port a service binds, for the overlap check.
struct PortUse {
    what: &'static str,
    key: &'static str,
    proto: &'static str,
    range: (u16, u16),
}

impl Config {
    /// Parses and validates a config text. `file` only names the source in problems.
    pub fn from_toml(file: &str, text: &str) -> Result<Config, ConfigErrors> {
        let errors = |problems| ConfigErrors {
            file: file.to_string(),
            problems,
        };
        let root = match DeTable::parse(text) {
            Ok(t) => t,
            Err(e) => {
                return Err(errors(vec![Problem {
                    line: line_of_span(text, e.span()),
                    key: "(syntax)".into(),
                    value: None,
                    message: format!("not valid TOML: {}", e.message().trim()),
                }]));
            }
        };
        let mut problems = Vec::new();
        let mut docs = Vec::new();
        let mut tables: BTreeMap<&str, &DeTable<'_>> = BTreeMap::new();
        for (key, value) in root.get_ref().iter() {
            let name: &str = key.get_ref();
            match (SECTIONS.iter().find(|s| **s == name), value.get_ref()) {
                (Some(s), DeValue::Table(t)) => {
                    tables.insert(s, t);
                }
                (Some(_), other) => problems.push(Problem {
                    line: reader::line_of_offset(text, key.span().start),
                    key: name.to_string(),
                    value: Some(show(other)),
                    message: format!("expected a [{name}] table, found {}", type_name(other)),
                }),
                (None, other) => problems.push(Problem {
                    line: reader::line_of_offset(text, key.span().start),
                    key: name.to_string(),
                    value: Some(show(other)),
                    message: format!("unknown section; sections: {}", SECTIONS.join(", ")),
                }),
            }
        }
        let config = Self::read_all(text, &tables, &mut problems, &mut docs);
        if problems.is_empty() {
            Ok(config)
        } else {
            problems.sort_by_key(|p| p.line);
            Err(errors(problems))
        }
    }

    fn read_all(
        text: &str,
        tables: &BTreeMap<&str, &DeTable<'_>>,
        problems: &mut Vec<Problem>,
        docs: &mut Vec<KeyDoc>,
    ) -> Config {
        macro_rules! section {
            ($name:literal, $ty:ty) => {{
                let mut r =
                    SectionReader::new($name, tables.get($name).copied(), text, problems, docs);
                let c = <$ty>::read(&mut r);
                let lines = PORT_KEYS
                    .iter()
                    .filter(|(s, _)| *s == $name)
                    .map(|(_, k)| (*k, r.line_of(k)))
                    .collect::<Vec<_>>();
                r.finish();
                (c, lines)
            }};
        }
        let (supervisor, _) = section!("supervisor", SupervisorConfig);
        let (signaling, l1) = section!("signaling", SignalingConfig);
        let (sfu, l2) = section!("sfu", SfuConfig);
        let (turn, l3) = section!("turn", TurnConfig);
        let (web, l4) = section!("web", WebConfig);
        let (sizing, _) = section!("sizing", SizingConfig);
        let (provision, l5) = section!("provision", ProvisionConfig);
        let mut signaling = signaling;
        if signaling.sfu_url.as_deref() == Some(DEFAULT_SFU_URL) {
            signaling.sfu_url = sfu.enabled.then(|| {
                // The SFU may listen on every address; signaling reaches it on loopback.
                let mut at = sfu.listen;
                if at.ip().is_unspecified() {
                    at.set_ip(IpAddr::from([127, 0, 0, 1]));
                }
                let scheme = if sfu.tls { "wss" } else { "ws" };
                format!("{scheme}://{at}/proxy")
            });
        }
        let config = Config {
            supervisor,
            signaling,
            sfu,
            turn,
            web,
            sizing,
            provision,
        };
        let lines: Vec<(&str, usize)> = l1
            .into_iter()
            .chain(l2)
            .chain(l3)
            .chain(l4)
            .chain(l5)
            .collect();
        config.check_port_overlaps(&lines, problems);
        config
    }

    fn port_uses(&self) -> Vec<PortUse> {
        let mut uses = Vec::new();
        let one = |p: u16| (p, p);
        if self.signaling.enabled {
            uses.push(PortUse {
                what: "the signaling API",
                key: "signaling.listen",
                proto: "tcp",
                range: one(self.signaling.listen.port()),
            });
        }
        if let (true, Some(a)) = (self.signaling.enabled, self.signaling.http_listen) {
            uses.push(PortUse {
                what: "signaling (plain HTTP)",
                key: "signaling.http_listen",
                proto: "tcp",
                range: one(a.port()),
            });
        }
        if self.web.enabled {
            uses.push(PortUse {
                what: "the setup page",
                key: "web.listen",
                proto: "tcp",
                range: one(self.web.listen.port()),
            });
            if self.web.acme_enabled {
                uses.push(PortUse {
                    what: "the ACME challenge listener",
                    key: "web.acme_http_listen",
                    proto: "tcp",
                    range: one(self.web.acme_http_listen.port()),
                });
            }
        }
        if self.provision.enabled {
            uses.push(PortUse {
                what: "the provisioning API",
                key: "provision.listen",
                proto: "tcp",
                range: one(self.provision.listen.port()),
            });
        }
        if self.turn.enabled {
            for proto in ["udp", "tcp"] {
                uses.push(PortUse {
                    what: "TURN",
                    key: "turn.port",
                    proto,
                    range: one(self.turn.port),
                });
            }
            uses.push(PortUse {
                what: "TURN over TLS",
                key: "turn.tls_port",
                proto: "tcp",
                range: one(self.turn.tls_port),
            });
            if self.turn.relay_port_min <= self.turn.relay_port_max {
                uses.push(PortUse {
                    what: "the TURN relay range",
                    key: "turn.relay_port_min",
                    proto: "udp",
                    range: (self.turn.relay_port_min, self.turn.relay_port_max),
                });
            }
        }
        if self.sfu.enabled {
            uses.push(PortUse {
                what: "the SFU control endpoint",
                key: "sfu.listen",
                proto: "tcp",
                range: one(self.sfu.listen.port()),
            });
        }
        if self.sfu.enabled && self.sfu.media_port_min <= self.sfu.media_port_max {
            uses.push(PortUse {
                what: "SFU media ports",
                key: "sfu.media_port_min",
                proto: "udp",
                range: (self.sfu.media_port_min, self.sfu.media_port_max),
            });
            if self.sfu.ice_tcp {
                uses.push(PortUse {
                    what: "SFU media ports (ICE-TCP)",
                    key: "sfu.media_port_min",
                    proto: "tcp",
                    range: (self.sfu.media_port_min, self.sfu.media_port_max),
                });
            }
        }
        uses
    }

    fn check_port_overlaps(&self, lines: &[(&str, usize)], problems: &mut Vec<Problem>) {
        let uses = self.port_uses();
        for (i, a) in uses.iter().enumerate() {
            for b in &uses[i + 1..] {
                let same_host =
                    a.proto == b.proto && a.range.0 <= b.range.1 && b.range.0 <= a.range.1;
                // turn.port is listed once per protocol; it does not overlap with itself.
                if same_host && a.key != b.key {
                    let line = lines
                        .iter()
                        .filter(|(k, _)| *k == b.key || *k == a.key)
                        .map(|(_, l)| *l)
                        .max()
                        .unwrap_or(0);
                    problems.push(Problem {
                        line,
                        key: b.key.to_string(),
                        value: Some(format!("{}-{}", b.range.0, b.range.1)),
                        message: format!(
                            "{} ({} {}-{}) {} {} ({}, {} {}-{}); give each its own ports",
                            b.what,
                            b.proto,
                            b.range.0,
                            b.range.1,
                            if b.what.ends_with('s') {
                                "collide with"
                            } else {
                                "collides with"
                            },
                            a.what,
                            a.key,
                            a.proto,
                            a.range.0,
                            a.range.1
                        ),
                    });
                }
            }
        }
    }

    /// Reads and validates a config file, refusing unreadable or oversized files.
    pub fn from_file(path: &Path) -> Result<Config, ConfigErrors> {
        let text = read_config_text(path)?;
        Config::from_toml(&path.display().to_string(), &text)
    }

    /// The lowest TCP/UDP port the given service binds, to decide if it needs
    /// CAP_NET_BIND_SERVICE.
    pub fn lowest_port_of(&self, service: &str) -> Option<u16> {
        let keys: &[&str] = match service {
            "signaling" => &["signaling.listen", "signaling.http_listen"],
            "web" => &["web.listen", "web.acme_http_listen"],
            "provision" => &["provision.listen"],
            "turn" => &["turn.port", "turn.tls_port", "turn.relay_port_min"],
            "sfu" => &["sfu.listen", "sfu.media_port_min"],
            _ => &[],
        };
        self.port_uses()
            .iter()
            .filter(|u| keys.contains(&u.key))
            .map(|u| u.range.0)
            .min()
    }
}

/// Keys whose line is needed by the cross-section port check.
const PORT_KEYS: &[(&str, &str)] = &[
    ("signaling", "listen"),
    ("signaling", "http_listen"),
    ("web", "listen"),
    ("web", "acme_http_listen"),
    ("provision", "listen"),
    ("turn", "port"),
    ("turn", "tls_port"),
    ("turn", "relay_port_min"),
    ("sfu", "listen"),
    ("sfu", "media_port_min"),
];

impl Default for Config {
    fn default() -> Self {
        let tables = BTreeMap::new();
        let mut problems = Vec::new();
        let mut docs = Vec::new();
        // The defaults are valid by construction; a test proves that no problem is reported.
        Config::read_all("", &tables, &mut problems, &mut docs)
    }
}

/// Reads a config file as text with a size limit and a clear error.
pub fn read_config_text(path: &Path) -> Result<String, ConfigErrors> {
    let fail = |message: String| ConfigErrors {
        file: path.display().to_string(),
        problems: vec![Problem {
            line: 0,
            key: "(file)".into(),
            value: None,
            message,
        }],
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read the file: {e}")))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(fail(format!(
            "file is {} bytes; a config may be at most {MAX_CONFIG_BYTES} bytes",
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| fail(format!("cannot read the file: {e}")))?;
    String::from_utf8(bytes).map_err(|e| {
        fail(format!(
            "not UTF-8 text (byte {})",
            e.utf8_error().valid_up_to()
        ))
    })
}

/// The key reference, as docs/config.md contains it between its markers.
pub fn reference_markdown() -> String {
    let tables = BTreeMap::new();
    let mut problems = Vec::new();
    let mut docs = Vec::new();
    Config::read_all("", &tables, &mut problems, &mut docs);
    let mut out = String::new();
    for section in SECTIONS {
        out.push_str(&format!(
            "\n### `[{section}]`\n\n| key | type | default | meaning |\n|---|---|---|---|\n"
        ));
        for d in docs
            .iter()
            .filter(|d| d.key.split('.').next() == Some(section))
        {
            let key = d.key.split_once('.').map(|(_, k)| k).unwrap_or(&d.key);
            out.push_str(&format!(
                "| `{key}` | {} | `{}` | {} |\n",
                d.kind, d.default, d.doc
            ));
        }
    }
    out
}

/// Where a box keeps its config, secrets, certificates and runtime sockets.
#[derive(Debug, Clone)]
pub struct DataDir {
    pub root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    /// The config file the supervisor and the setup page use.
    pub fn config_file(&self) -> PathBuf {
        self.root.join("talkbox.toml")
    }
    pub fn secrets_dir(&self) -> PathBuf {
        self.root.join("secrets")
    }
    pub fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn control_socket(&self) -> PathBuf {
        self.run_dir().join("control.sock")
    }
    /// Sizing state written by the SFU (`sizing::Sizer`) and its measurement requests.
    pub fn sizing_dir(&self) -> PathBuf {
        self.root.join("sizing")
    }

    /// Provisioning state: identity, trusted keys, last serial, audit log, trial snapshot.
    pub fn provisioning_dir(&self) -> PathBuf {
        self.root.join("provisioning")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<Problem> {
        Config::from_toml("t.toml", text)
            .expect_err("config should be refused")
            .problems
    }

    #[test]
    fn defaults_are_valid_and_need_no_file() {
        let c = Config::from_toml("empty.toml", "").expect("empty config is valid");
        assert_eq!(c, Config::default());
        assert_eq!(c.signaling.listen.to_string(), "127.0.0.1:8443");
        assert_eq!(c.web.listen.to_string(), "127.0.0.1:9443");
        assert_eq!((c.turn.port, c.turn.tls_port), (3478, 5349));
        assert_eq!(
            (c.turn.relay_port_min, c.turn.relay_port_max),
            (20000, 29999)
        );
        assert_eq!(c.sfu.media_port_min, 50000);
    }

    #[test]
    fn unknown_key_is_named_with_its_line_and_the_known_keys() {
        let p = problems("[web]\nlisten = \"127.0.0.1:9443\"\nlisen = 1\n");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].line, 3);
        assert_eq!(p[0].key, "web.lisen");
        assert!(p[0].message.contains("unknown key"), "{}", p[0].message);
        assert!(p[0].message.contains("listen"));
    }

    #[test]
    fn unknown_section_is_refused() {
        let p = problems("[turm]\nport = 3478\n");
        assert_eq!(p[0].key, "turm");
        assert!(p[0].message.contains("unknown section"));
    }

    #[test]
    fn wrong_type_names_expected_and_found() {
        let p = problems("[turn]\nport = \"3478\"\n");
        assert_eq!(p[0].key, "turn.port");
        assert_eq!(p[0].line, 2);
        assert!(
            p[0].message.contains("expected an integer"),
            "{}",
            p[0].message
        );
        assert!(p[0].message.contains("found a string"));
    }

    #[test]
    fn out_of_range_port_says_what_is_allowed() {
        let p = problems("[turn]\n\nport = 70000\n");
        assert_eq!(p[0].line, 3);
        assert_eq!(p[0].value.as_deref(), Some("70000"));
        assert!(p[0].message.contains("1 to 65535"));
    }

    #[test]
    fn overlapping_port_ranges_are_refused() {
        let p = problems("[turn]\nrelay_port_min = 49000\nrelay_port_max = 50010\n");
        assert!(p.iter().any(|p| p.message.contains("collide")), "{p:?}");
        let p = problems("[web]\nlisten = \"127.0.0.1:8443\"\n");
        assert!(
            p.iter()
                .any(|p| p.key == "web.listen" && p.message.contains("collides")),
            "{p:?}"
        );
    }

    #[test]
    fn turn_on_every_address_needs_a_relay_address() {
        let p = problems("[turn]\nlisten_address = \"0.0.0.0\"\n");
        assert_eq!(p[0].key, "turn.listen_address");
        assert_eq!(p[0].line, 2);
        assert!(
            p[0].message.contains("turn.relay_address"),
            "{}",
            p[0].message
        );
        let c = Config::from_toml("t", "[turn]\nlisten_address = \"::\"\nrelay_address = \"2001:db8::5\"\nallowed_peers = [\"10.1.0.0/16\"]\n")
            .expect("valid");
        assert_eq!(c.turn.relay_ip().to_string(), "2001:db8::5");
        assert!(Config::from_toml("t", "[turn]\nallowed_peers = [\"10.1.0.0/33\"]\n").is_err());
    }

    #[test]
    fn disabled_service_ports_do_not_overlap() {
        Config::from_toml(
            "t",
            "[web]\nlisten = \"127.0.0.1:8443\"\n[signaling]\nenabled = false\n",
        )
        .expect("no overlap with a disabled service");
    }

    #[test]
    fn every_problem_is_reported_not_just_the_first() {
        let p = problems("[turn]\nport = 0\nrealm = 5\n[web]\nbogus = true\n");
        assert_eq!(p.len(), 3, "{p:?}");
        assert_eq!(p.iter().map(|p| p.line).collect::<Vec<_>>(), vec![2, 3, 5]);
    }

    #[test]
    fn syntax_error_has_a_line() {
        let p = problems("[web]\nlisten = \n");
        assert_eq!(p[0].key, "(syntax)");
        assert_eq!(p[0].line, 2);
    }

    #[test]
    fn display_is_one_line_per_problem_with_file_line_key_value() {
        let e = Config::from_toml("box.toml", "[turn]\nport = 70000\n[sfu]\nworkers = -1\n")
            .expect_err("bad");
        let text = e.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].starts_with("box.toml:2: turn.port = 70000: out of range"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("box.toml:4: sfu.workers = -1:"),
            "{text}"
        );
    }

    #[test]
    fn docs_config_md_lists_every_key_as_the_code_defines_it() {
        let doc = include_str!("../../../docs/config.md");
        let begin = "<!-- BEGIN GENERATED KEYS -->";
        let end = "<!-- END GENERATED KEYS -->";
        let (Some(a), Some(b)) = (doc.find(begin), doc.find(end)) else {
            panic!("docs/config.md lacks the generated-keys markers");
        };
        let current = &doc[a + begin.len()..b];
        assert_eq!(
            current.trim(),
            reference_markdown().trim(),
            "docs/config.md is out of date: run `talkbox config reference` and paste its output between the markers"
        );
    }

    #[test]
    fn signaling_backends_are_read_with_their_keys() {
        let c = Config::from_toml(
            "t",
            "[[signaling.backend]]\nid = \"nc1\"\nurls = [\"https://cloud.example.com/\"]\nsecret = \"0123456789abcdef0\"\nsession_limit = 5\n",
        )
        .expect("valid");
        assert_eq!(c.signaling.backends.len(), 1);
        assert_eq!(
            c.signaling.backends[0].urls,
            vec!["https://cloud.example.com".to_string()]
        );
        assert_eq!(c.signaling.backends[0].session_limit, 5);
        assert!(!c.signaling.allow_all, "allow_all is off by default");
    }

    #[test]
    fn sfu_url_follows_the_local_sfu_unless_set() {
        let c = Config::from_toml("t", "[sfu]\nlisten = \"0.0.0.0:9555\"\n").expect("valid");
        assert_eq!(
            c.signaling.sfu_url.as_deref(),
            Some("ws://127.0.0.1:9555/proxy")
        );
        let c = Config::from_toml("t", "[sfu]\nenabled = false\n").expect("valid");
        assert_eq!(c.signaling.sfu_url, None);
        let c = Config::from_toml(
            "t",
            "[signaling]\nsfu_url = \"wss://sfu.example.org/proxy\"\n",
        )
        .expect("valid");
        assert_eq!(
            c.signaling.sfu_url.as_deref(),
            Some("wss://sfu.example.org/proxy")
        );
        assert_eq!(
            Config::default().signaling.sfu_url.as_deref(),
            Some("ws://127.0.0.1:9444/proxy")
        );
    }

    #[test]
    fn sfu_url_is_plain_only_on_loopback() {
        for ok in [
            "",
            "ws://127.0.0.1:9090/proxy",
            "ws://[::1]:9/proxy",
            "ws://localhost:9/proxy",
            "wss://sfu.example.org/proxy",
        ] {
            check_sfu_url(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "ws://10.0.0.2:9090/proxy",
            "http://127.0.0.1/proxy",
            "ws://",
            "sfu",
        ] {
            assert!(check_sfu_url(bad).is_err(), "{bad}");
        }
        let p = problems("[signaling]\nsfu_url = \"ws://192.0.2.1/proxy\"\n");
        assert_eq!(p[0].key, "signaling.sfu_url");
    }

    #[test]
    fn bad_signaling_backend_entries_are_named_with_lines() {
        let p = problems(
            "[[signaling.backend]]\nid = \"a\"\nurls = [\"ftp://x\"]\nsecret = \"short\"\nsecrte = 1\n[[signaling.backend]]\nurls = [\"https://b/\"]\nsecret = \"0123456789abcdef0\"\n",
        );
        let keys: Vec<(&str, usize)> = p.iter().map(|p| (p.key.as_str(), p.line)).collect();
        assert!(keys.contains(&("signaling.backend[0].urls", 3)), "{p:?}");
        assert!(keys.contains(&("signaling.backend[0].secret", 4)), "{p:?}");
        assert!(keys.contains(&("signaling.backend[0].secrte", 5)), "{p:?}");
        assert!(
            keys.iter().any(|(k, _)| *k == "signaling.backend[1].id"),
            "{p:?}"
        );
        let p = problems("[signaling]\nbackend = 3\n");
        assert_eq!(p[0].key, "signaling.backend");
    }
}
