//! A short memory of the backend requests this server received (`POST /api/v1/room/{token}`):
//! room token, request type, and whether the checksum matched a backend's secret.
//!
//! It exists for the setup page's Nextcloud test: the box asks Nextcloud to make a change that
//! Talk announces to its signaling server, then asks this server (over a signed request,
//! [`super::http`]'s `/api/v1/talkbox/backend-seen`) whether that announcement arrived and
//! whether its checksum matched. That proves the direction Nextcloud → box, which the box
//! cannot observe any other way. Bounded: the last [`KEEP`] requests of the last [`MAX_AGE`].

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many requests are remembered.
pub const KEEP: usize = 64;
/// How long one is remembered.
pub const MAX_AGE: Duration = Duration::from_secs(600);
/// Longest room token stored (longer ones are cut; Talk's tokens are 8 characters).
const MAX_TOKEN: usize = 256;

/// One backend request as received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub token: String,
    /// The request's `type` (`invite`, `update`, `delete`, …); empty when the checksum failed
    /// (the body is not parsed then).
    pub kind: String,
    /// The checksum matched a configured backend's secret.
    pub ok: bool,
    pub at: Instant,
}

#[derive(Default)]
pub struct SeenRequests {
    inner: Mutex<VecDeque<Seen>>,
}

impl SeenRequests {
    pub fn record(&self, token: &str, kind: &str, ok: bool) {
        let mut q = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= KEEP {
            q.pop_front();
        }
        let cut = |s: &str, n: usize| s.chars().take(n).collect::<String>();
        q.push_back(Seen {
            token: cut(token, MAX_TOKEN),
            kind: cut(kind, 32),
            ok,
            at: Instant::now(),
        });
    }

    /// The requests for `token` still remembered, oldest first.
    pub fn for_token(&self, token: &str) -> Vec<Seen> {
        let q = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        q.iter()
            .filter(|s| s.token == token && s.at.elapsed() <= MAX_AGE)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_requests_per_token() {
        let s = SeenRequests::default();
        s.record("abc", "invite", true);
        s.record("other", "", false);
        s.record("abc", "delete", true);
        let got = s.for_token("abc");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].kind, "invite");
        assert!(got.iter().all(|x| x.ok));
        for i in 0..KEEP {
            s.record(&format!("t{i}"), "invite", true);
        }
        assert!(s.for_token("abc").is_empty(), "bounded to KEEP entries");
    }
}
