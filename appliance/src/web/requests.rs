//! The narrow vocabulary the setup page may ask of the supervisor over its link
//! (`REQUEST=<json>` → one JSON answer), shared by both ends.
//!
//! The web service runs as the unprivileged service user, like the internet-facing services, so
//! it cannot write the config, the secrets or the certificate itself, and it cannot read the
//! admin password hash from a file the other services could read too. Each request below names
//! one change; the supervisor (root) validates it again, writes it with
//! [`crate::storage::write_atomic`], and applies it. Nothing here is a generic file write.

use serde::{Deserialize, Serialize};

/// Largest request the supervisor accepts (a certificate chain plus key fits easily).
pub const MAX_REQUEST_BYTES: usize = 200 * 1024;

/// One request from the setup page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum SetupRequest {
    /// Claim state and the admin password hash (argon2id PHC string), read at web start.
    State,
    /// Claim an unclaimed box with the setup code shown on the console.
    Claim {
        code: String,
        password_hash: String,
        engineer_key: Option<String>,
    },
    /// Replace the admin password hash (the web service checked the old password or a
    /// one-time login link before asking).
    SetPassword {
        password_hash: String,
    },
    /// Add or edit a Nextcloud backend; a new backend gets a generated shared secret.
    PutBackend {
        id: String,
        urls: Vec<String>,
        #[serde(default)]
        new_secret: bool,
    },
    RemoveBackend {
        id: String,
    },
    /// The values to paste into Talk's admin settings, per backend (includes secrets).
    TalkValues,
    /// Validate and install a certificate chain and key as the box's certificate.
    InstallCertificate {
        cert_pem: String,
        key_pem: String,
    },
    /// The network, identity and TURN settings the page may edit, as in force.
    Settings,
    /// Change some of those settings (`section.key` → value); validated as a whole config
    /// before anything is written.
    PutSettings {
        values: serde_json::Map<String, serde_json::Value>,
    },
    /// ACME state for the Certificates page.
    AcmeStatus,
    /// Order a certificate over ACME at once, whatever the current one's dates.
    AcmeRenew,
    /// The key authorization of a pending HTTP-01 challenge (asked by the port-80 listener).
    AcmeChallenge {
        token: String,
    },
    /// The certificate and key in force, unless their SHA-256 is `have_sha256` (the web
    /// service swaps in a certificate the supervisor installed, e.g. from ACME).
    CurrentCertificate {
        have_sha256: String,
    },
    /// Consume the one-time login link written by provisioning if the token's hash matches.
    ConsumeLoginLink {
        token_sha256: String,
    },
    /// The last entries of the provisioning audit log.
    ProvisioningAudit,
    /// Use (or with `mbps` absent, forget) the download speed the admin's browser measured
    /// from the box as a sizing figure; `peer` says which browser (its address).
    SizingBrowser {
        #[serde(default)]
        mbps: Option<f64>,
        peer: String,
    },
    /// Ask the SFU to measure against its sizing peer again.
    SizingMeasure,
    /// Recent log lines of one service (or all), at `level` or more severe, from the journal.
    Logs {
        service: Option<String>,
        level: String,
    },
    /// Support bundle: the config with secrets removed, versions, recent logs.
    SupportBundle,
    /// An encrypted backup of the config and what the box cannot recreate.
    Backup {
        passphrase: String,
    },
    /// Restore such a backup (everything restarts with it).
    Restore {
        backup: String,
        passphrase: String,
    },
    /// Forget the admin, secrets, certificate, backends, engineer keys and rooms; the box is
    /// unclaimed again. `confirm` must be the typed words "factory reset".
    FactoryReset {
        confirm: String,
    },
}

/// The answer: `ok` plus data, or an error an admin can act on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetupAnswer {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl SetupAnswer {
    pub fn ok(data: serde_json::Value) -> Self {
        Self {
            ok: true,
            error: None,
            data,
        }
    }
    pub fn err(e: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(e.into()),
            data: serde_json::Value::Null,
        }
    }
}

/// Claim state as the web service keeps it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdminState {
    pub claimed: bool,
    pub password_hash: Option<String>,
}

/// Seconds since the Unix epoch as RFC 3339 in UTC (`2026-11-22T12:00:00Z`).
pub fn rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    )
}

/// Parses RFC 3339 (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`) to Unix seconds.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.bytes().take_while(u8::is_ascii_digit).count();
        rest = &r[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 => {
            let sign = match &rest[..1] {
                "+" => 1,
                "-" => -1,
                _ => return None,
            };
            sign * (rest[1..3].parse::<i64>().ok()? * 3600 + rest[4..6].parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    // Days-from-civil.
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + se - offset)
}

/// Now, in Unix seconds.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_and_handles_offsets() {
        for t in [0, 951_782_400, 1_795_000_000, 4_102_444_800] {
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t), "{}", rfc3339(t));
        }
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(
            parse_rfc3339("2026-11-22T13:00:00.5+01:00"),
            parse_rfc3339("2026-11-22T12:00:00Z")
        );
        assert_eq!(parse_rfc3339("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn requests_are_tagged_json() {
        let r: SetupRequest =
            serde_json::from_str(r#"{"op":"remove-backend","id":"nc1"}"#).expect("parse");
        assert_eq!(r, SetupRequest::RemoveBackend { id: "nc1".into() });
        assert!(serde_json::from_str::<SetupRequest>(r#"{"op":"write-file"}"#).is_err());
    }
}
