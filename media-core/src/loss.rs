//! A fast, loss-based reaction to a bandwidth drop towards one subscriber (sans-I/O, time as
//! a parameter).
//!
//! str0m's send-side estimate is delay-based first: when a subscriber's downlink drops (a
//! policer or a short queue, as `tc … tbf` gives), it took 0.3-2.2 s to fall (quality_shaping),
//! and the picture stood still all that time because the layer forwarded no longer fit. The
//! receiver, though, tells at once: Chromium sends a NACK for every gap it sees, and its
//! receiver reports carry the fraction lost. This detector reads the cumulative egress
//! counters str0m reports every stats interval (packets and bytes sent, NACK messages
//! received, the RR fraction lost) for a subscriber's video, and trips when a short window
//! shows heavy loss; the worker then plans with [`LossDetector::observe`]'s cap (about the
//! rate that still arrives) until str0m's own estimate has caught up.
//!
//! It must not trip on a single lost packet (one NACK, repeated a few times until the
//! retransmission arrives) or on jitter (no loss at all): it needs [`MIN_NACKS`] NACK
//! messages and NACKs for at least [`MIN_NACK_SHARE`] of the packets sent within [`WINDOW`],
//! or a receiver report of [`MIN_RR_LOSS`] lost together with some NACKs.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

use crate::allocator::Bps;

/// How far back the detector looks.
pub const WINDOW: Duration = Duration::from_millis(500);
/// NACK messages within [`WINDOW`] before loss counts as heavy. A lost packet gives one NACK
/// and a few repeats until its retransmission arrives; a link that drops most of a layer
/// gives one per packet that gets through after a gap, tens per second.
pub const MIN_NACKS: u64 = 6;
/// NACK messages per packet sent within [`WINDOW`], as a fraction (numerator, denominator).
/// A message may name several packets, so this is below the real loss; 1 in 10 is far above
/// what a working link gives and far below what a dropped layer gives.
pub const MIN_NACK_SHARE: (u64, u64) = (1, 10);
/// A receiver report's fraction lost that counts as heavy (with at least 2 NACKs in the
/// window, so that one old report is not enough).
pub const MIN_RR_LOSS: f32 = 0.2;
/// After tripping, the detector stays quiet this long: the queue the old layer filled still
/// drains and loses packets after the switch, and that is no news.
pub const QUIET_AFTER_TRIP: Duration = Duration::from_secs(2);
/// Packets sent within [`WINDOW`] below which nothing is judged (too few to tell).
pub const MIN_PACKETS: u64 = 15;
/// Video sent within [`WINDOW`] below which nothing is judged (bit/s): a stream this small
/// gains nothing from a lower layer, and a loaded receiver NACKs now and then. (Seen under
/// load: a trip on 22 kbit/s sent capped a subscriber at 11 kbit/s.)
pub const MIN_RATE: Bps = 100_000;
/// The loss assumed when no receiver report came within the window.
const ASSUMED_LOSS: f32 = 0.5;

/// Cumulative egress counters of one stream, as str0m's stats report them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub nacks: u64,
}

#[derive(Debug, Clone, Copy)]
struct Step {
    /// The report before this one (of the same stream): the step covers since..at.
    since: Instant,
    at: Instant,
    packets: u64,
    bytes: u64,
    nacks: u64,
    loss: Option<f32>,
}

/// Watches one subscriber's video streams (keyed by `K`, e.g. the mid).
#[derive(Debug)]
pub struct LossDetector<K> {
    last: HashMap<K, (Counters, Instant)>,
    steps: VecDeque<Step>,
    quiet_until: Option<Instant>,
    /// The cap of the last trip and when it tripped.
    tripped: Option<(Bps, Instant)>,
}

impl<K> Default for LossDetector<K> {
    fn default() -> Self {
        Self {
            last: HashMap::new(),
            steps: VecDeque::new(),
            quiet_until: None,
            tripped: None,
        }
    }
}

impl<K: Eq + Hash> LossDetector<K> {
    /// Takes one stats report of stream `key` (cumulative counters, and the RR fraction lost
    /// if a report came since the last one). Returns the rate to plan with at most (bit/s)
    /// when the window now shows heavy loss: the rate sent over the window times the share
    /// that arrives (from the receiver reports, else assumed half).
    pub fn observe(&mut self, key: K, c: Counters, loss: Option<f32>, now: Instant) -> Option<Bps> {
        let before = self.last.insert(key, (c, now));
        // The first report of a stream only sets where its counters start.
        let (before, since) = before?;
        self.steps.push_back(Step {
            since,
            at: now,
            packets: c.packets.saturating_sub(before.packets),
            bytes: c.bytes.saturating_sub(before.bytes),
            nacks: c.nacks.saturating_sub(before.nacks),
            loss: loss.filter(|l| l.is_finite()),
        });
        while self
            .steps
            .front()
            .is_some_and(|s| now.saturating_duration_since(s.at) > WINDOW)
        {
            self.steps.pop_front();
        }
        // Bounded: a stream reporting far more often than expected cannot grow the window.
        while self.steps.len() > 256 {
            self.steps.pop_front();
        }
        if self.quiet_until.is_some_and(|t| now < t) {
            return None;
        }
        let (packets, bytes, nacks) = self.steps.iter().fold((0, 0, 0), |a, s| {
            (a.0 + s.packets, a.1 + s.bytes, a.2 + s.nacks)
        });
        let rr = self
            .steps
            .iter()
            .filter_map(|s| s.loss)
            .fold(None, |m: Option<f32>, l| Some(m.map_or(l, |m| m.max(l))));
        if packets < MIN_PACKETS {
            return None;
        }
        let by_nacks = nacks >= MIN_NACKS && nacks * MIN_NACK_SHARE.1 >= packets * MIN_NACK_SHARE.0;
        let by_rr = nacks >= 2 && rr.is_some_and(|l| l >= MIN_RR_LOSS);
        if !(by_nacks || by_rr) {
            return None;
        }
        // The window the sums cover: from the report before its first step to now (at
        // least 100 ms, so that a burst does not read huge).
        let first = self.steps.iter().map(|s| s.since).min().unwrap_or(now);
        let span = now
            .saturating_duration_since(first)
            .max(Duration::from_millis(100))
            .as_secs_f64();
        let sent = (bytes as f64 * 8.0 / span) as Bps;
        if sent < MIN_RATE {
            return None;
        }
        let arrives = 1.0 - rr.unwrap_or(ASSUMED_LOSS).clamp(0.25, 0.9);
        self.steps.clear();
        self.quiet_until = Some(now + QUIET_AFTER_TRIP);
        let cap = (sent as f64 * arrives as f64) as Bps;
        self.tripped = Some((cap, now));
        Some(cap)
    }

    /// The cap of the last trip while it is younger than `hold`.
    pub fn cap(&self, now: Instant, hold: Duration) -> Option<Bps> {
        self.tripped
            .filter(|(_, at)| now.saturating_duration_since(*at) < hold)
            .map(|(c, _)| c)
    }

    /// Forgets a stream (it was removed).
    pub fn forget(&mut self, key: &K) {
        self.last.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);
    /// A top layer: 1.2 Mbit/s in 1100-byte packets, ~136 packets/s.
    const RATE: u64 = 1_200_000;
    const PKT: u64 = 1100;

    /// Feeds `ticks` stats reports of one stream sending at RATE, with `nacks(i)` NACK
    /// messages and RR loss `rr(i)` in report i; returns the tick (and cap) of the first trip.
    fn run(
        ticks: u32,
        nacks: impl Fn(u32) -> u64,
        rr: impl Fn(u32) -> Option<f32>,
    ) -> Option<(u32, Bps)> {
        let t0 = Instant::now();
        let mut d = LossDetector::default();
        let mut c = Counters::default();
        let mut first = None;
        for i in 0..ticks {
            let bytes = RATE / 8 / 10;
            c.bytes += bytes;
            c.packets += bytes / PKT;
            c.nacks += nacks(i);
            if let Some(cap) = d.observe(1u8, c, rr(i), t0 + TICK * i)
                && first.is_none()
            {
                first = Some((i, cap));
            }
        }
        first
    }

    #[test]
    fn no_loss_never_trips() {
        assert_eq!(run(600, |_| 0, |_| Some(0.0)), None);
    }

    #[test]
    fn a_single_lost_packet_does_not_trip() {
        // One loss at tick 50: a NACK and three repeats before the retransmission arrives,
        // and a receiver report that saw 1 of ~14 packets missing in its interval.
        let n = |i| if (50..54).contains(&i) { 1 } else { 0 };
        let rr = |i| if i == 55 { Some(0.07) } else { Some(0.0) };
        assert_eq!(run(600, n, rr), None);
    }

    #[test]
    fn sparse_loss_on_a_working_link_does_not_trip() {
        // 1 % loss: one packet of about a hundred, each NACKed twice.
        let n = |i| if i % 8 < 2 { 1 } else { 0 };
        let rr = |i| if i % 10 == 0 { Some(0.01) } else { None };
        assert_eq!(run(600, n, rr), None);
    }

    #[test]
    fn a_tbf_like_drop_trips_within_400_ms_and_caps_near_what_arrives() {
        // From tick 100 on the link carries 300 kbit/s: three of four packets are lost, the
        // receiver NACKs each gap it sees (~3 per 100 ms) and, once a report comes (every
        // 1 s, the first 600 ms after the drop), reports 0.75 lost.
        let n = |i| if i >= 100 { 3 } else { 0 };
        let rr = |i: u32| (i >= 106 && i % 10 == 6).then_some(0.75);
        let (at, cap) = run(200, n, rr).expect("trips");
        assert!(
            (101..=104).contains(&at),
            "tripped at tick {at} (drop at 100)"
        );
        // Without a report the half assumed: 600 kbit/s, between the link's 300 and the
        // 1.2 Mbit/s sent.
        assert!((450_000..=700_000).contains(&cap), "cap {cap}");
    }

    #[test]
    fn a_receiver_report_of_heavy_loss_sets_the_cap() {
        let n = |i| if i >= 100 { 1 } else { 0 };
        let rr = |i| if i >= 100 { Some(0.75) } else { Some(0.0) };
        let (at, cap) = run(200, n, rr).expect("trips");
        assert!((101..=103).contains(&at), "tripped at tick {at}");
        assert!((250_000..=350_000).contains(&cap), "cap {cap}");
    }

    #[test]
    fn it_stays_quiet_after_tripping_then_trips_again_if_loss_goes_on() {
        let t0 = Instant::now();
        let mut d = LossDetector::default();
        let mut c = Counters::default();
        let mut trips = Vec::new();
        for i in 0..60u32 {
            c.bytes += 15_000;
            c.packets += 14;
            c.nacks += 4;
            if d.observe(7u8, c, None, t0 + TICK * i).is_some() {
                trips.push(i);
            }
        }
        assert!(trips.len() >= 2, "{trips:?}");
        for w in trips.windows(2) {
            assert!(TICK * (w[1] - w[0]) >= QUIET_AFTER_TRIP, "{trips:?}");
        }
    }

    #[test]
    fn a_small_stream_is_not_judged() {
        // 60 kbit/s in small packets, a third of them NACKed.
        let t0 = Instant::now();
        let mut d = LossDetector::default();
        let mut c = Counters::default();
        for i in 0..50u32 {
            c.packets += 10;
            c.bytes += 750;
            c.nacks += 3;
            assert_eq!(d.observe(0u8, c, Some(0.3), t0 + TICK * i), None);
        }
    }

    #[test]
    fn few_packets_are_not_judged() {
        // Audio-like rate: 5 packets per report, all NACKed.
        let t0 = Instant::now();
        let mut d = LossDetector::default();
        let mut c = Counters::default();
        for i in 0..50u32 {
            c.packets += 1;
            c.bytes += 100;
            c.nacks += 1;
            assert_eq!(d.observe(0u8, c, Some(0.5), t0 + TICK * i), None);
        }
    }
}
