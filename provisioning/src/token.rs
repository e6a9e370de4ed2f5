//! Enrolment tokens: one-time secrets that allow one push to a box over its provisioning API.
//!
//! The box keeps only the SHA-256 of a token and its expiry ([`StoredToken`]); the token itself
//! is shown once (console, journal, `talkbox enrol-token`) and given to the engineer. A token is
//! consumed by its first successful use. Comparing is constant-time. No clock and no random
//! source here: the caller passes both.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::time::rfc3339;

/// Random bytes behind a token.
pub const TOKEN_BYTES: usize = 24;
/// Longest token text accepted from the network.
pub const MAX_TOKEN_LEN: usize = 128;

/// What the box stores about its current token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredToken {
    pub sha256: String,
    /// Unix seconds.
    pub expires: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "no enrolment token is open on this box; create one on the box (`talkbox enrol-token`)"
    )]
    NoneOpen,
    #[error("wrong enrolment token")]
    Wrong,
    #[error("the enrolment token expired at {0}; create a new one on the box")]
    Expired(String),
}

fn sha256_hex(token: &str) -> String {
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        token.as_bytes(),
    ))
}

/// Makes a token from random bytes; returns the text to show and what to store.
pub fn issue(random: &[u8; TOKEN_BYTES], now_unix: u64, valid_s: u64) -> (String, StoredToken) {
    let token = URL_SAFE_NO_PAD.encode(random);
    let stored = StoredToken {
        sha256: sha256_hex(&token),
        expires: now_unix.saturating_add(valid_s),
    };
    (token, stored)
}

/// Checks a presented token against the stored one. The caller deletes the stored token on
/// `Ok` (single use).
pub fn check(
    stored: Option<&StoredToken>,
    presented: &str,
    now_unix: u64,
) -> Result<(), TokenError> {
    let Some(stored) = stored else {
        return Err(TokenError::NoneOpen);
    };
    if presented.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Wrong);
    }
    let same = aws_lc_rs::constant_time::verify_slices_are_equal(
        sha256_hex(presented).as_bytes(),
        stored.sha256.as_bytes(),
    )
    .is_ok();
    if !same {
        return Err(TokenError::Wrong);
    }
    if now_unix >= stored.expires {
        return Err(TokenError::Expired(rfc3339(stored.expires)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_token_checks_and_others_do_not() {
        let (t, s) = issue(&[9u8; TOKEN_BYTES], 1000, 60);
        assert_eq!(check(Some(&s), &t, 1000), Ok(()));
        assert_eq!(check(Some(&s), "nope", 1000), Err(TokenError::Wrong));
        assert_eq!(
            check(Some(&s), &"x".repeat(500), 1000),
            Err(TokenError::Wrong)
        );
        assert_eq!(check(None, &t, 1000), Err(TokenError::NoneOpen));
        assert!(matches!(
            check(Some(&s), &t, 1060),
            Err(TokenError::Expired(_))
        ));
        assert!(!s.sha256.contains(&t), "only the hash is stored");
    }
}
