//! Logging for the supervisor and every service: journald under systemd, stderr elsewhere.
//!
//! systemd sets `JOURNAL_STREAM` when a unit's stderr goes to the journal; then structured
//! records go straight to journald (with `talkbox-<service>` as `SYSLOG_IDENTIFIER`). Otherwise
//! human-readable lines, prefixed with the service name, go to stderr. The level comes from
//! `[supervisor] log_level`; `RUST_LOG`, when set, overrides it.

use std::fmt;
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{Format, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;

/// True when stderr is the journal stream systemd announced.
fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(meta.dev()) && ino.parse::<u64>().ok() == Some(meta.ino())
}

/// Crates that would log credentials at verbose levels, capped at `warn` (the engine also logs every allocation at `info`).
const NO_CREDENTIALS_IN_LOGS: &[&str] = &[
    "turn_server_proto=warn",
    "stun_proto=off",
    "turn_types=warn",
    "stun_types=warn",
];

/// Installs the global subscriber. `service` names the process in every line.
pub fn init(service: &str, level: &str) {
    let filter = || {
        let f = EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new(format!("{level},hyper=warn,rustls=warn,h2=warn")));
        // The TURN engine traces usernames, nonces and keys at debug/trace level; those lines
        // must never reach a log, whatever level is asked for. stun_proto also reports every
        // ordinary 401 challenge as an ERROR, which would let any client flood the log.
        NO_CREDENTIALS_IN_LOGS
            .iter()
            .filter_map(|d| d.parse().ok())
            .fold(f, |f, d| f.add_directive(d))
    };
    if stderr_is_journal()
        && let Ok(layer) = tracing_journald::layer()
    {
        let layer = layer.with_syslog_identifier(format!("talkbox-{service}"));
        let _ = tracing_subscriber::registry()
            .with(filter())
            .with(layer)
            .try_init();
        return;
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .event_format(Prefixed {
            prefix: service.to_string(),
            inner: Format::default().with_target(false),
        });
    let _ = tracing_subscriber::registry()
        .with(filter())
        .with(fmt)
        .try_init();
}

/// The default line format with the service name in front, so that the interleaved stderr of
/// the supervisor and its children stays readable.
struct Prefixed {
    prefix: String,
    inner: Format,
}

impl<S, N> FormatEvent<S, N> for Prefixed
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        write!(w, "[{}] ", self.prefix)?;
        self.inner.format_event(ctx, w, event)
    }
}
