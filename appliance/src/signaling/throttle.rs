//! Brute-force throttling of failed hellos, resumes and backend requests, per client address.
//!
//! Upstream delays and finally refuses clients that fail authentication repeatedly; here a client
//! address with more than [`MAX_FAILURES`] failures within [`WINDOW`] gets `too_many_requests`
//! until the window has passed. Time is a parameter; the table is bounded.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

pub const WINDOW: Duration = Duration::from_secs(60);
pub const MAX_FAILURES: u32 = 10;
/// Addresses tracked at once; beyond that the oldest windows are dropped.
const MAX_TRACKED: usize = 100_000;

#[derive(Debug, Default)]
pub struct Throttle {
    failures: HashMap<(IpAddr, &'static str), (Instant, u32)>,
}

impl Throttle {
    /// Whether `ip` may try `action` now.
    pub fn allowed(&mut self, ip: IpAddr, action: &'static str, now: Instant) -> bool {
        match self.failures.get(&(ip, action)) {
            Some((start, n)) if now.duration_since(*start) < WINDOW => *n < MAX_FAILURES,
            Some(_) => {
                self.failures.remove(&(ip, action));
                true
            }
            None => true,
        }
    }

    /// Records a failed attempt.
    pub fn failed(&mut self, ip: IpAddr, action: &'static str, now: Instant) {
        if self.failures.len() >= MAX_TRACKED {
            self.failures
                .retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        let e = self.failures.entry((ip, action)).or_insert((now, 0));
        if now.duration_since(e.0) >= WINDOW {
            *e = (now, 0);
        }
        e.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_failures_are_refused_until_the_window_passes() {
        let mut t = Throttle::default();
        let ip: IpAddr = [192, 0, 2, 1].into();
        let other: IpAddr = [192, 0, 2, 2].into();
        let now = Instant::now();
        for _ in 0..MAX_FAILURES {
            assert!(t.allowed(ip, "hello", now));
            t.failed(ip, "hello", now);
        }
        assert!(!t.allowed(ip, "hello", now + Duration::from_secs(1)));
        assert!(
            t.allowed(other, "hello", now),
            "other addresses are unaffected"
        );
        assert!(
            t.allowed(ip, "resume", now),
            "actions are counted separately"
        );
        assert!(t.allowed(ip, "hello", now + WINDOW));
    }
}
