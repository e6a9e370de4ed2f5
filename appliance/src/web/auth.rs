//! Admin sessions, CSRF tokens and login throttling of the setup page, as plain state with
//! time passed in (so every rule is a unit test).
//!
//! - A session is a random 256-bit id in a `Secure; HttpOnly; SameSite=Strict` cookie, kept in
//!   memory only: a restarted web service forgets every session (admins log in again). It ends
//!   after `web.session_idle_s` without a request, after `web.session_max_s` in any case, at
//!   logout, and (all of them) when the password changes.
//! - Every change needs the session's CSRF token in the `X-CSRF-Token` header. Before login,
//!   the claim and login forms use a double-submit token (cookie + header), so another site
//!   cannot log a browser into this box either.
//! - Throttling, per client address: the first [`FREE_FAILURES`] wrong codes or passwords cost
//!   nothing, then each further attempt must wait 1 s, 2 s, 4 s ... up to [`MAX_DELAY`] after
//!   the last failure; a success clears the count. Waiting attempts are refused with 429
//!   without being checked, so a guesser gains nothing by trying faster.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::secrets;

/// Wrong attempts per address before delays start.
pub const FREE_FAILURES: u32 = 3;
/// Longest delay between attempts.
pub const MAX_DELAY: Duration = Duration::from_secs(300);
/// Most sessions at once (each login adds one).
pub const MAX_SESSIONS: usize = 64;
/// Most addresses tracked by the throttle.
const MAX_TRACKED: usize = 10_000;

/// One admin session.
#[derive(Debug, Clone)]
pub struct Session {
    pub csrf: String,
    created: Instant,
    last_seen: Instant,
    /// Opened by a one-time login link on a box without password: only setting one is allowed.
    pub must_set_password: bool,
}

/// All sessions of the setup page.
#[derive(Debug)]
pub struct Sessions {
    map: HashMap<String, Session>,
    idle: Duration,
    max: Duration,
}

impl Sessions {
    pub fn new(idle: Duration, max: Duration) -> Self {
        Self {
            map: HashMap::new(),
            idle,
            max,
        }
    }

    /// Opens a session; gives its id (cookie value).
    pub fn open(&mut self, now: Instant, must_set_password: bool) -> Result<String, String> {
        self.expire(now);
        if self.map.len() >= MAX_SESSIONS {
            // The oldest one goes: a forgotten browser must not lock the admin out.
            if let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(k, _)| k.clone())
            {
                self.map.remove(&oldest);
            }
        }
        let id = secrets::random_token(32).map_err(|e| e.to_string())?;
        let csrf = secrets::random_token(32).map_err(|e| e.to_string())?;
        self.map.insert(
            id.clone(),
            Session {
                csrf,
                created: now,
                last_seen: now,
                must_set_password,
            },
        );
        Ok(id)
    }

    fn expire(&mut self, now: Instant) {
        let (idle, max) = (self.idle, self.max);
        self.map.retain(|_, s| {
            now.duration_since(s.last_seen) < idle && now.duration_since(s.created) < max
        });
    }

    /// The live session behind `id`, refreshed; `None` if unknown or expired.
    pub fn touch(&mut self, id: &str, now: Instant) -> Option<Session> {
        self.expire(now);
        let s = self.map.get_mut(id)?;
        s.last_seen = now;
        Some(s.clone())
    }

    pub fn close(&mut self, id: &str) {
        self.map.remove(id);
    }

    /// Ends every session but `keep` (after a password change).
    pub fn close_others(&mut self, keep: &str) {
        self.map.retain(|k, _| k == keep);
    }

    pub fn set_password_done(&mut self, id: &str) {
        if let Some(s) = self.map.get_mut(id) {
            s.must_set_password = false;
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

/// Growing delays after wrong codes or passwords, per client address.
#[derive(Debug, Default)]
pub struct Throttle {
    map: HashMap<IpAddr, Failures>,
}

/// The delay after `count` failures in a row.
pub fn delay_after(count: u32) -> Duration {
    if count < FREE_FAILURES {
        return Duration::ZERO;
    }
    let exp = (count - FREE_FAILURES).min(16);
    Duration::from_secs(1u64 << exp).min(MAX_DELAY)
}

impl Throttle {
    /// `Err(wait)` when `ip` must wait before its next attempt.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let Some(f) = self.map.get(&ip) else {
            return Ok(());
        };
        let ready = f.last + delay_after(f.count);
        if now >= ready {
            Ok(())
        } else {
            Err(ready - now)
        }
    }

    /// Records a wrong attempt; gives the delay the next attempt must wait.
    pub fn failed(&mut self, ip: IpAddr, now: Instant) -> Duration {
        if self.map.len() >= MAX_TRACKED && !self.map.contains_key(&ip) {
            self.map
                .retain(|_, f| now.duration_since(f.last) < delay_after(f.count));
            if self.map.len() >= MAX_TRACKED {
                // Still full of live entries: treat the newcomer as the worst case.
                return MAX_DELAY;
            }
        }
        let f = self.map.entry(ip).or_insert(Failures {
            count: 0,
            last: now,
        });
        f.count = f.count.saturating_add(1);
        f.last = now;
        delay_after(f.count)
    }

    pub fn succeeded(&mut self, ip: IpAddr) {
        self.map.remove(&ip);
    }
}

/// Constant-time comparison of two tokens.
pub fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Hashes a password with argon2id (slow on purpose: run it off the async threads).
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt_bytes = secrets::random(16).map_err(|e| e.to_string())?;
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| e.to_string())?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing the password: {e}"))
}

/// Checks a password against an argon2id PHC string.
pub fn verify_password(password: &str, hash: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(hash).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// Rules for a new admin password; the message says what is allowed.
pub fn check_new_password(p: &str) -> Result<(), String> {
    let n = p.chars().count();
    if !(10..=256).contains(&n) {
        return Err("the password must have 10 to 256 characters".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_after_three_failures_and_cap() {
        let want = [0, 0, 0, 1, 2, 4, 8, 16];
        for (count, secs) in want.iter().enumerate() {
            assert_eq!(
                delay_after(count as u32),
                Duration::from_secs(*secs),
                "after {count}"
            );
        }
        assert_eq!(delay_after(40), MAX_DELAY);
    }

    #[test]
    fn throttle_refuses_until_the_delay_has_passed_and_success_clears() {
        let mut t = Throttle::default();
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let other: IpAddr = "192.0.2.2".parse().expect("ip");
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(t.check(ip, t0).is_ok());
            t.failed(ip, t0);
        }
        let wait = t.check(ip, t0).expect_err("throttled");
        assert_eq!(wait, Duration::from_secs(1));
        assert!(
            t.check(other, t0).is_ok(),
            "another address is not throttled"
        );
        let t1 = t0 + Duration::from_secs(1);
        assert!(t.check(ip, t1).is_ok());
        assert_eq!(t.failed(ip, t1), Duration::from_secs(2));
        t.succeeded(ip);
        assert!(t.check(ip, t1).is_ok());
    }

    #[test]
    fn sessions_expire_when_idle_or_too_old_and_close() {
        let mut s = Sessions::new(Duration::from_secs(10), Duration::from_secs(25));
        let t0 = Instant::now();
        let id = s.open(t0, false).expect("open");
        assert!(s.touch(&id, t0 + Duration::from_secs(9)).is_some());
        assert!(s.touch(&id, t0 + Duration::from_secs(18)).is_some());
        assert!(
            s.touch(&id, t0 + Duration::from_secs(26)).is_none(),
            "max age"
        );
        let id = s.open(t0, false).expect("open");
        assert!(s.touch(&id, t0 + Duration::from_secs(11)).is_none(), "idle");
        let id = s.open(t0, false).expect("open");
        s.close(&id);
        assert!(s.touch(&id, t0).is_none());
        assert!(s.touch("made-up", t0).is_none());
    }

    #[test]
    fn passwords_verify_only_with_the_right_one() {
        let h = hash_password("correct horse battery").expect("hash");
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("wrong horse battery", &h));
        assert!(!verify_password("x", "not a hash"));
        assert!(check_new_password("short").is_err());
    }
}
