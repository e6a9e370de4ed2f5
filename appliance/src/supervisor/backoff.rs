//! When to restart a service that died, and when to call it a crash loop.
//!
//! Pure logic with time as a parameter, so the policy is tested without processes or clocks:
//! the delay starts at `initial` and doubles with each failure in a row up to `max`; a run that
//! lasted `healthy_after` or longer resets the count; `crash_loop_after` failures in a row mark
//! a crash loop (the service is still retried, at the longest delay it has reached).

use std::time::Duration;

use crate::config::SupervisorConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub healthy_after: Duration,
    pub crash_loop_after: u32,
}

impl RestartPolicy {
    pub fn from_config(c: &SupervisorConfig) -> Self {
        Self {
            initial: Duration::from_millis(c.restart_initial_ms),
            max: Duration::from_millis(c.restart_max_ms.max(c.restart_initial_ms)),
            healthy_after: Duration::from_secs(c.healthy_after_s),
            crash_loop_after: c.crash_loop_restarts,
        }
    }
}

/// Failure history of one service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestartTracker {
    pub consecutive_failures: u32,
    pub restarts: u32,
}

/// What to do after a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartDecision {
    pub delay: Duration,
    pub crash_loop: bool,
}

impl RestartTracker {
    /// Records that the process ended after running for `ran_for`, and decides the delay.
    pub fn on_exit(&mut self, policy: &RestartPolicy, ran_for: Duration) -> RestartDecision {
        if ran_for >= policy.healthy_after {
            self.consecutive_failures = 0;
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let doublings = (self.consecutive_failures - 1).min(30);
        let delay = policy
            .initial
            .checked_mul(1u32 << doublings)
            .unwrap_or(policy.max)
            .min(policy.max);
        RestartDecision {
            delay,
            crash_loop: self.consecutive_failures >= policy.crash_loop_after,
        }
    }

    /// Called when a run has lasted `healthy_after`: the service is healthy again.
    pub fn on_healthy(&mut self) {
        self.consecutive_failures = 0;
    }

    pub fn on_restart(&mut self) {
        self.restarts = self.restarts.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(60),
            crash_loop_after: 5,
        }
    }

    #[test]
    fn delay_doubles_from_half_a_second_up_to_thirty() {
        let mut t = RestartTracker::default();
        let delays: Vec<u64> = (0..10)
            .map(|_| {
                t.on_exit(&policy(), Duration::from_millis(10))
                    .delay
                    .as_millis() as u64
            })
            .collect();
        assert_eq!(
            delays,
            vec![
                500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000
            ]
        );
    }

    #[test]
    fn crash_loop_is_declared_after_the_configured_failures_in_a_row() {
        let mut t = RestartTracker::default();
        let loops: Vec<bool> = (0..6)
            .map(|_| t.on_exit(&policy(), Duration::ZERO).crash_loop)
            .collect();
        assert_eq!(loops, vec![false, false, false, false, true, true]);
    }

    #[test]
    fn a_minute_of_health_resets_the_delay() {
        let mut t = RestartTracker::default();
        for _ in 0..4 {
            t.on_exit(&policy(), Duration::from_secs(1));
        }
        let d = t.on_exit(&policy(), Duration::from_secs(61));
        assert_eq!(
            d,
            RestartDecision {
                delay: Duration::from_millis(500),
                crash_loop: false
            }
        );
        t.on_exit(&policy(), Duration::from_secs(1));
        t.on_healthy();
        assert_eq!(
            t.on_exit(&policy(), Duration::from_secs(1)).delay,
            Duration::from_millis(500)
        );
    }

    #[test]
    fn huge_failure_counts_do_not_overflow() {
        let mut t = RestartTracker {
            consecutive_failures: u32::MAX - 1,
            restarts: 0,
        };
        assert_eq!(
            t.on_exit(&policy(), Duration::ZERO).delay,
            Duration::from_secs(30)
        );
        assert_eq!(
            t.on_exit(&policy(), Duration::ZERO).delay,
            Duration::from_secs(30)
        );
    }
}
