//! TURN REST credentials, the scheme Nextcloud Talk and coturn (`use-auth-secret`) share:
//! username `EXPIRY:NAME` (EXPIRY in Unix seconds), password `base64(HMAC-SHA1(secret, username))`.
//!
//! This module is pure: the signaling service calls [`rest_credentials`] and [`turn_urls`] to
//! hand an ICE server entry to the meeting page and `GET /turn/credentials`; the TURN service calls [`password_for`] and
//! [`expiry_of`] to check them. Nonces, realms and which secret is current live in `auth.rs`.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;

/// Longest username accepted: STUN allows 513 bytes; ours are `u64:name` and much shorter.
pub const MAX_USERNAME_BYTES: usize = 513;

/// The password for a REST username under `secret`.
pub fn password_for(secret: &str, username: &str) -> String {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail here.
    let mut mac = match Hmac::<Sha1>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Credentials valid for `ttl_s` seconds from `now_unix`: `(username, password)`.
///
/// `name` identifies the user in logs and quotas (for example the Talk session id); a `:` in it
/// is kept, since only the first `:` separates the expiry.
pub fn rest_credentials(secret: &str, name: &str, ttl_s: u64, now_unix: u64) -> (String, String) {
    let username = format!("{}:{name}", now_unix.saturating_add(ttl_s));
    let password = password_for(secret, &username);
    (username, password)
}

/// The TURN URLs of a box for an ICE server entry: UDP and TCP on `port`, TLS on `tls_port`.
/// `host` is a DNS name or an IP address (IPv6 is bracketed here).
pub fn turn_urls(host: &str, port: u16, tls_port: u16) -> Vec<String> {
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    vec![
        format!("turn:{host}:{port}?transport=udp"),
        format!("turn:{host}:{port}?transport=tcp"),
        format!("turns:{host}:{tls_port}?transport=tcp"),
    ]
}

/// Why a REST username is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UsernameError {
    #[error("username is not EXPIRY:NAME")]
    Malformed,
    #[error("username expired")]
    Expired,
}

/// The expiry (Unix seconds) of a REST username, checked against `now_unix`.
///
/// coturn also accepts a bare `EXPIRY` without a name; so does this.
pub fn expiry_of(username: &str, now_unix: u64) -> Result<u64, UsernameError> {
    if username.is_empty() || username.len() > MAX_USERNAME_BYTES {
        return Err(UsernameError::Malformed);
    }
    let expiry = username.split_once(':').map_or(username, |(e, _)| e);
    if expiry.is_empty() || !expiry.bytes().all(|b| b.is_ascii_digit()) {
        return Err(UsernameError::Malformed);
    }
    let expiry: u64 = expiry.parse().map_err(|_| UsernameError::Malformed)?;
    if expiry <= now_unix {
        return Err(UsernameError::Expired);
    }
    Ok(expiry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_matches_coturn_and_talk() {
        // Reference value computed with: printf '1700000000:alice' | openssl dgst -sha1 -hmac secret -binary | base64
        assert_eq!(
            password_for("secret", "1700000000:alice"),
            "d8soP47RbdIKLDUOpnJPVQyq5Ts="
        );
    }

    #[test]
    fn rest_credentials_expire_after_ttl() {
        let (u, p) = rest_credentials("s3cret", "session-1", 3600, 1_000_000);
        assert_eq!(u, "1003600:session-1");
        assert_eq!(p, password_for("s3cret", &u));
        assert_eq!(expiry_of(&u, 1_003_599), Ok(1_003_600));
        assert_eq!(expiry_of(&u, 1_003_600), Err(UsernameError::Expired));
    }

    #[test]
    fn turn_urls_cover_udp_tcp_and_tls() {
        assert_eq!(
            turn_urls("talk.example.org", 3478, 5349),
            vec![
                "turn:talk.example.org:3478?transport=udp",
                "turn:talk.example.org:3478?transport=tcp",
                "turns:talk.example.org:5349?transport=tcp",
            ]
        );
        assert_eq!(
            turn_urls("2001:db8::1", 3478, 443)[2],
            "turns:[2001:db8::1]:443?transport=tcp"
        );
    }

    #[test]
    fn malformed_usernames_are_refused() {
        for u in [
            "",
            "alice",
            ":alice",
            "12a:alice",
            "-5:x",
            "99999999999999999999999:x",
        ] {
            assert_eq!(expiry_of(u, 0), Err(UsernameError::Malformed), "{u}");
        }
        assert_eq!(
            expiry_of(&"1".repeat(600), 0),
            Err(UsernameError::Malformed)
        );
        assert_eq!(expiry_of("2000000000", 0), Ok(2_000_000_000));
    }
}
