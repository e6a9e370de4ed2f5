//! The shared-secret checks of the backend API and the TURN REST credentials.
//!
//! Backend requests in both directions carry `Spreed-Signaling-Random` and
//! `Spreed-Signaling-Checksum = hex(HMAC-SHA256(secret, random ‖ body))` (reference §2.1).
//! Internal clients prove the internal secret the same way over their random string. TURN REST
//! credentials are `expiry:name` with `base64(HMAC-SHA1(turn secret, username))` (§4).
//! Pure functions: no I/O, time is a parameter.

use aws_lc_rs::hmac;
use base64::Engine;

pub const HEADER_RANDOM: &str = "spreed-signaling-random";
pub const HEADER_CHECKSUM: &str = "spreed-signaling-checksum";
pub const HEADER_BACKEND: &str = "spreed-signaling-backend";
pub const HEADER_FEATURES: &str = "x-spreed-signaling-features";

/// Shortest random string accepted from a peer (Talk and upstream send 64).
pub const MIN_RANDOM_LEN: usize = 32;

/// `hex(HMAC-SHA256(secret, random ‖ body))`.
pub fn calculate(random: &str, body: &[u8], secret: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(random.as_bytes());
    ctx.update(body);
    hex::encode(ctx.sign().as_ref())
}

/// Whether `checksum` is the HMAC of `random ‖ body`, compared in constant time.
pub fn verify(random: &str, body: &[u8], secret: &[u8], checksum: &str) -> bool {
    if random.len() < MIN_RANDOM_LEN {
        return false;
    }
    let Ok(tag) = hex::decode(checksum.trim()) else {
        return false;
    };
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut msg = Vec::with_capacity(random.len() + body.len());
    msg.extend_from_slice(random.as_bytes());
    msg.extend_from_slice(body);
    hmac::verify(&key, &msg, &tag).is_ok()
}

/// Equality of two secrets without an early exit (HMAC of both, then compare the tags).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, b"talkbox constant-time compare");
    let tag = hmac::sign(&key, b);
    hmac::verify(&key, a, tag.as_ref()).is_ok()
}

/// A fresh 64-character random string for outgoing requests.
pub fn new_random() -> String {
    let mut b = [0u8; 32];
    // aws-lc's generator only fails if the OS has no entropy, which is not recoverable here;
    // a zero random is still a valid (if weak) request and is caught by the peer's replay rules.
    let _ = aws_lc_rs::rand::fill(&mut b);
    hex::encode(b)
}

/// TURN REST credentials: (`expiry:name`, base64(HMAC-SHA1(secret, username))).
pub fn turn_credentials(secret: &[u8], expiry_unix: u64, name: &str) -> (String, String) {
    let username = format!("{expiry_unix}:{name}");
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let tag = hmac::sign(&key, username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(tag.as_ref());
    (username, password)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = r#"{"type":"auth","auth":{"version":"1.0","params":{"hello":"world"}}}"#;
    const RANDOM: &str = "afb6b872ab03e3376b31bf0af601067222ff7990335ca02d327071b73c0119c6";

    #[test]
    fn checksum_matches_the_documented_test_vector() {
        assert_eq!(
            calculate(RANDOM, BODY.as_bytes(), b"MySecretValue"),
            "3c4a69ff328299803ac2879614b707c807b4758cf19450755c60656cac46e3bc"
        );
    }

    #[test]
    fn wrong_secret_body_or_short_random_is_refused() {
        let good = calculate(RANDOM, BODY.as_bytes(), b"MySecretValue");
        assert!(verify(RANDOM, BODY.as_bytes(), b"MySecretValue", &good));
        assert!(!verify(RANDOM, BODY.as_bytes(), b"other", &good));
        assert!(!verify(RANDOM, b"{}", b"MySecretValue", &good));
        assert!(!verify(RANDOM, BODY.as_bytes(), b"MySecretValue", "zz"));
        let short = "abc";
        let c = calculate(short, BODY.as_bytes(), b"MySecretValue");
        assert!(!verify(short, BODY.as_bytes(), b"MySecretValue", &c));
    }

    #[test]
    fn turn_credentials_match_the_value_measured_on_debian() {
        let (u, p) = turn_credentials(b"made-up-turn-secret", 1795419680, "alice");
        assert_eq!(u, "1795419680:alice");
        assert_eq!(p, "UrwcfF6qX7SBpQGeOxJCPVpXMig=");
    }

    #[test]
    fn new_random_is_long_enough_and_varies() {
        let (a, b) = (new_random(), new_random());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
