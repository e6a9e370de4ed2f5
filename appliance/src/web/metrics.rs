//! The 15-minute history behind the status page's charts: CPU, memory and network in/out of
//! the box, sampled from /proc every [`EVERY`], plus what /sys says about the NICs.
//!
//! Readers of /proc are pure functions of the file text (unit-tested); the sampler task only
//! reads files and keeps the last [`KEEP`] samples.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

/// Sampling period.
pub const EVERY: Duration = Duration::from_secs(5);
/// Samples kept: 15 minutes.
pub const KEEP: usize = 180;

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Sample {
    /// Unix seconds.
    pub t: i64,
    pub cpu_pct: f64,
    pub mem_pct: f64,
    pub rx_mbps: f64,
    pub tx_mbps: f64,
}

/// CPU jiffies: (busy, total) from the first line of /proc/stat.
pub fn cpu_jiffies(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?;
    let mut it = line.split_whitespace();
    if it.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = it.filter_map(|x| x.parse().ok()).collect();
    if v.len() < 4 {
        return None;
    }
    let total: u64 = v.iter().sum();
    // idle + iowait are not busy.
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Memory in use, percent, from /proc/meminfo (MemTotal − MemAvailable).
pub fn mem_pct(meminfo: &str) -> Option<f64> {
    let field = |name: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let total = field("MemTotal:")?;
    let avail = field("MemAvailable:")?;
    (total > 0.0).then(|| 100.0 * (total - avail) / total)
}

/// Bytes received and sent by all interfaces but loopback, from /proc/net/dev.
pub fn net_bytes(dev: &str, include_loopback: bool) -> (u64, u64) {
    let mut rx = 0;
    let mut tx = 0;
    for line in dev.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() == "lo" && !include_loopback {
            continue;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() >= 9 {
            rx += v[0];
            tx += v[8];
        }
    }
    (rx, tx)
}

/// The kept samples.
pub type History = Arc<Mutex<VecDeque<Sample>>>;

/// Starts the sampler; it runs until the process ends.
pub fn spawn_sampler() -> History {
    let history: History = Arc::new(Mutex::new(VecDeque::with_capacity(KEEP)));
    let h = history.clone();
    tokio::spawn(async move {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let mut prev_cpu = cpu_jiffies(&read("/proc/stat"));
        let mut prev_net = net_bytes(&read("/proc/net/dev"), false);
        let mut t = tokio::time::interval(EVERY);
        t.tick().await;
        loop {
            t.tick().await;
            let cpu = cpu_jiffies(&read("/proc/stat"));
            let net = net_bytes(&read("/proc/net/dev"), false);
            let cpu_pct = match (prev_cpu, cpu) {
                (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                    100.0 * (b1.saturating_sub(b0)) as f64 / (t1 - t0) as f64
                }
                _ => 0.0,
            };
            let secs = EVERY.as_secs_f64();
            let mbps = |a: u64, b: u64| (b.saturating_sub(a)) as f64 * 8.0 / secs / 1e6;
            let s = Sample {
                t: super::requests::now_unix(),
                cpu_pct,
                mem_pct: mem_pct(&read("/proc/meminfo")).unwrap_or(0.0),
                rx_mbps: mbps(prev_net.0, net.0),
                tx_mbps: mbps(prev_net.1, net.1),
            };
            prev_cpu = cpu;
            prev_net = net;
            if let Ok(mut q) = h.lock() {
                if q.len() >= KEEP {
                    q.pop_front();
                }
                q.push_back(s);
            }
        }
    });
    history
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_read() {
        assert_eq!(
            cpu_jiffies("cpu  10 0 10 70 10 0 0 0 0 0\ncpu0 1 2 3 4\n"),
            Some((20, 100))
        );
        assert_eq!(cpu_jiffies("garbage"), None);
        let m = "MemTotal:       1000 kB\nMemFree:  100 kB\nMemAvailable:    250 kB\n";
        assert_eq!(mem_pct(m), Some(75.0));
        let dev = "Inter-|   Receive\n face |bytes    packets errs drop fifo frame compressed multicast|bytes\n    lo: 500 5 0 0 0 0 0 0 500 5 0 0 0 0 0 0\n  eth0: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0\n";
        assert_eq!(net_bytes(dev, false), (1000, 2000));
        assert_eq!(net_bytes(dev, true), (1500, 2500));
    }
}
