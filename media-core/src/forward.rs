//! Forwarding state per subscriber stream, sans-I/O: what sequence number and RTP timestamp a
//! forwarded packet gets, and when a keyframe may be asked of a publisher.
//!
//! The SSRC itself is the subscriber's own send stream (str0m writes it); this module keeps the
//! numbering continuous when the source behind that stream changes (publisher renegotiated, or
//! later a simulcast layer switch), so the receiver's jitter buffer sees one smooth stream.
//! Time is a parameter; nothing here reads a clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How many dropped sequence numbers a rewriter remembers for late packets: at 3 packets per
/// dropped frame and 15 dropped frames a second, about 2 s. A packet older than the oldest
/// one remembered is not forwarded (its number can no longer be worked out).
const SKIP_MEMORY: usize = 96;

/// Sequence number and timestamp for one forwarded packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    /// Extended sequence number (the low 16 bits go on the wire; str0m derives the ROC).
    pub seq: u64,
    pub ts: u32,
}

#[derive(Debug, Clone, Copy)]
struct Source {
    ssrc: u32,
    /// out_seq = in_seq + seq_delta.
    seq_delta: i64,
    /// out_ts = in_ts + ts_delta (mod 2^32).
    ts_delta: u32,
    /// First number this source was given; anything below belongs to an earlier source.
    first_out: u64,
    /// Newest input sequence number of this source seen (forwarded or skipped).
    newest_in: u64,
}

/// Rewrites one source's numbering onto one outgoing stream.
#[derive(Debug, Clone)]
pub struct SeqTsRewriter {
    start_seq: u64,
    start_ts: u32,
    source: Option<Source>,
    /// Highest sequence number sent so far and the timestamp and time it was sent at.
    highest: Option<(u64, u32, Instant)>,
    /// Input numbers of the current source dropped on purpose ([`SeqTsRewriter::skip`]),
    /// ascending: a late packet from before some of them is numbered as if they had been
    /// dropped after it.
    skipped: VecDeque<u64>,
    /// Highest skip no longer remembered: packets older than it are not forwarded.
    forgotten: Option<u64>,
}

impl SeqTsRewriter {
    /// `start_seq` must stay below 2^16 so that the receiver's rollover counter starts at 0
    /// without out-of-band signalling; the caller picks both starts at random.
    pub fn new(start_seq: u16, start_ts: u32) -> Self {
        Self {
            start_seq: u64::from(start_seq),
            start_ts,
            source: None,
            highest: None,
            skipped: VecDeque::new(),
            forgotten: None,
        }
    }

    /// Numbers for a packet from `ssrc` with extended sequence number `in_seq` and RTP
    /// timestamp `in_ts`, arriving at `now`; `None` means drop it (older than the point where
    /// this source joined the stream).
    pub fn rewrite(
        &mut self,
        ssrc: u32,
        in_seq: u64,
        in_ts: u32,
        clock_rate: u32,
        now: Instant,
    ) -> Option<Rewritten> {
        let src = match self.source {
            Some(s) if s.ssrc == ssrc => s,
            _ => {
                let (out_seq, out_ts) = match self.highest {
                    None => (self.start_seq, self.start_ts),
                    Some((seq, ts, at)) => {
                        // Continue right after the last packet, advancing the clock by the time
                        // that passed (at least one tick, so timestamps never repeat).
                        let elapsed = now.saturating_duration_since(at);
                        let ticks = (elapsed.as_secs_f64() * f64::from(clock_rate)) as u64;
                        (
                            seq + 1,
                            ts.wrapping_add(ticks.clamp(1, u64::from(u32::MAX)) as u32),
                        )
                    }
                };
                let s = Source {
                    ssrc,
                    seq_delta: out_seq as i64 - in_seq as i64,
                    ts_delta: out_ts.wrapping_sub(in_ts),
                    first_out: out_seq,
                    newest_in: in_seq,
                };
                self.source = Some(s);
                self.skipped.clear();
                self.forgotten = None;
                s
            }
        };
        // Packets newer than every skip take the current delta; a late one also counts the
        // skips that came after it, which did not move it.
        let mut later_skips = 0;
        if in_seq < src.newest_in {
            if self.forgotten.is_some_and(|f| in_seq < f) || self.skipped.contains(&in_seq) {
                return None;
            }
            later_skips = self.skipped.iter().filter(|&&s| s > in_seq).count() as i64;
        } else if let Some(s) = self.source.as_mut() {
            s.newest_in = in_seq;
        }
        let out = in_seq as i64 + src.seq_delta + later_skips;
        if out < src.first_out as i64 {
            return None;
        }
        let r = Rewritten {
            seq: out as u64,
            ts: in_ts.wrapping_add(src.ts_delta),
        };
        match self.highest {
            Some((h, _, _)) if h >= r.seq => {}
            _ => self.highest = Some((r.seq, r.ts, now)),
        }
        Some(r)
    }

    /// A packet of the current source with extended sequence number `in_seq` is dropped on
    /// purpose (temporal filtering): later packets move down one number so the subscriber
    /// sees no gap and sends no NACK. A packet of another source is ignored, and so is a late
    /// one (older than the newest seen): its number was a hole in the output already, and
    /// closing it now would renumber packets already sent.
    pub fn skip(&mut self, ssrc: u32, in_seq: u64) {
        let Some(s) = self.source.as_mut().filter(|s| s.ssrc == ssrc) else {
            return;
        };
        if in_seq <= s.newest_in {
            return;
        }
        s.newest_in = in_seq;
        s.seq_delta -= 1;
        self.skipped.push_back(in_seq);
        if self.skipped.len() > SKIP_MEMORY {
            self.forgotten = self.skipped.pop_front();
        }
    }
}

/// Limits how often keyframes are asked of one publisher stream; a request refused now is
/// remembered and comes due when the interval has passed, so a joining subscriber still gets
/// its keyframe.
#[derive(Debug, Clone)]
pub struct KeyframeThrottle {
    interval: Duration,
    last: Option<Instant>,
    pending: bool,
}

impl KeyframeThrottle {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            pending: false,
        }
    }

    /// Someone wants a keyframe at `now`; true if the request should go out now.
    pub fn request(&mut self, now: Instant) -> bool {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.interval => {
                self.pending = true;
                false
            }
            _ => {
                self.last = Some(now);
                self.pending = false;
                true
            }
        }
    }

    /// Someone would like a keyframe at `now` but asks again later anyway: true if it should go
    /// out now; when the interval has not passed, nothing is deferred.
    pub fn try_request(&mut self, now: Instant) -> bool {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.interval => false,
            _ => {
                self.last = Some(now);
                self.pending = false;
                true
            }
        }
    }

    /// True once if a deferred request is due at `now`; the caller then sends it without
    /// asking `request` again (it already counts as the latest request).
    pub fn poll(&mut self, now: Instant) -> bool {
        self.pending && self.request(now)
    }

    /// When a deferred request comes due, for the timer queue.
    pub fn due_at(&self) -> Option<Instant> {
        match (self.pending, self.last) {
            (true, Some(t)) => Some(t + self.interval),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_packet_starts_at_the_chosen_numbers_and_deltas_are_kept() {
        let t0 = Instant::now();
        let mut r = SeqTsRewriter::new(1000, 5000);
        let a = r
            .rewrite(0xaaaa, 40_000, 123_456, 90_000, t0)
            .expect("first");
        assert_eq!(
            a,
            Rewritten {
                seq: 1000,
                ts: 5000
            }
        );
        let b = r
            .rewrite(0xaaaa, 40_001, 126_456, 90_000, t0)
            .expect("next");
        assert_eq!(
            b,
            Rewritten {
                seq: 1001,
                ts: 8000
            }
        );
        // Out of order inside the window keeps its relative number.
        let c = r.rewrite(0xaaaa, 40_005, 130_000, 90_000, t0).expect("gap");
        assert_eq!(c.seq, 1005);
        let d = r
            .rewrite(0xaaaa, 40_003, 129_000, 90_000, t0)
            .expect("late");
        assert_eq!(d.seq, 1003);
    }

    #[test]
    fn packets_from_before_the_join_are_dropped() {
        let t0 = Instant::now();
        let mut r = SeqTsRewriter::new(0, 0);
        r.rewrite(1, 500, 0, 48_000, t0).expect("first");
        assert_eq!(r.rewrite(1, 499, 0, 48_000, t0), None);
    }

    #[test]
    fn timestamp_wraps_modulo_2_pow_32() {
        let t0 = Instant::now();
        let mut r = SeqTsRewriter::new(10, u32::MAX - 100);
        r.rewrite(1, 1, 0, 90_000, t0).expect("first");
        let b = r.rewrite(1, 2, 3000, 90_000, t0).expect("second");
        assert_eq!(b.ts, 2899);
    }

    #[test]
    fn sequence_crosses_65535_as_an_extended_number() {
        let t0 = Instant::now();
        let mut r = SeqTsRewriter::new(65_530, 0);
        r.rewrite(7, 100, 0, 90_000, t0).expect("first");
        let b = r.rewrite(7, 110, 0, 90_000, t0).expect("after wrap");
        assert_eq!(b.seq, 65_540);
        assert_eq!(b.seq as u16, 4);
    }

    #[test]
    fn source_switch_continues_numbering_without_a_jump() {
        let t0 = Instant::now();
        let mut r = SeqTsRewriter::new(100, 1000);
        for i in 0..10u64 {
            r.rewrite(1, 7000 + i, 90_000 + 3000 * i as u32, 90_000, t0)
                .expect("old source");
        }
        // New SSRC with unrelated numbering, 100 ms later.
        let t1 = t0 + Duration::from_millis(100);
        let a = r.rewrite(2, 20, 4_000_000, 90_000, t1).expect("switch");
        assert_eq!(a.seq, 110);
        assert_eq!(a.ts, 1000 + 27_000 + 9_000);
        let b = r
            .rewrite(2, 21, 4_003_000, 90_000, t1)
            .expect("after switch");
        assert_eq!((b.seq, b.ts), (111, a.ts + 3000));
    }

    #[test]
    fn skips_close_gaps_and_late_packets_keep_their_numbers() {
        let t0 = Instant::now();
        let mut r = SeqTsRewriter::new(100, 0);
        let seq = |r: &mut SeqTsRewriter, i: u64| r.rewrite(1, i, 0, 90_000, t0).map(|x| x.seq);
        assert_eq!(seq(&mut r, 10), Some(100));
        // 11 is lost upstream for now; 12 and 13 are a dropped frame; 14 follows.
        r.skip(1, 12);
        r.skip(1, 13);
        assert_eq!(seq(&mut r, 14), Some(102));
        // 11 comes late (a retransmission): it keeps the number it would have had, before the
        // two skips, which is the hole between 100 and 102.
        assert_eq!(seq(&mut r, 11), Some(101));
        // A dropped packet asked for again, a duplicate skip and a late skip change nothing.
        assert_eq!(seq(&mut r, 12), None);
        r.skip(1, 13);
        r.skip(1, 9);
        assert_eq!(seq(&mut r, 15), Some(103));
        // A skip of another source is ignored.
        r.skip(2, 16);
        assert_eq!(seq(&mut r, 16), Some(104));
    }

    #[test]
    fn packets_older_than_the_skips_remembered_are_not_forwarded() {
        let t0 = Instant::now();
        let mut r = SeqTsRewriter::new(0, 0);
        r.rewrite(1, 1000, 0, 90_000, t0).expect("first");
        // Every other packet dropped, more than are remembered.
        let n = SKIP_MEMORY as u64 + 10;
        for i in 0..n {
            r.skip(1, 1001 + 2 * i);
            r.rewrite(1, 1002 + 2 * i, 0, 90_000, t0).expect("kept");
        }
        // A late packet from before the forgotten skips cannot be numbered.
        assert_eq!(r.rewrite(1, 1002, 0, 90_000, t0), None);
        // One within the memory still can: 1002 + 2 (n - 1) went out as n, so the packet
        // before it, 1000 + 2 (n - 1) (kept), went out as n - 1.
        let last_kept = 1002 + 2 * (n - 1);
        let before = r.rewrite(1, last_kept - 2, 0, 90_000, t0).map(|x| x.seq);
        assert_eq!(before, Some(n - 1));
        // A source switch forgets the skips.
        let t1 = t0 + Duration::from_millis(20);
        let s = r.rewrite(2, 5, 0, 90_000, t1).expect("switch").seq;
        assert_eq!(r.rewrite(2, 6, 0, 90_000, t1).map(|x| x.seq), Some(s + 1));
    }

    #[test]
    fn keyframe_requests_are_throttled_and_deferred_not_lost() {
        let t0 = Instant::now();
        let mut k = KeyframeThrottle::new(Duration::from_millis(500));
        assert!(k.request(t0));
        assert!(!k.request(t0 + Duration::from_millis(100)));
        assert!(!k.request(t0 + Duration::from_millis(200)));
        assert_eq!(k.due_at(), Some(t0 + Duration::from_millis(500)));
        assert!(!k.poll(t0 + Duration::from_millis(499)));
        assert!(k.poll(t0 + Duration::from_millis(500)));
        assert!(!k.poll(t0 + Duration::from_millis(600)), "fires once");
        assert_eq!(k.due_at(), None);
        // A reminder neither goes out inside the interval nor defers anything.
        assert!(!k.try_request(t0 + Duration::from_millis(700)));
        assert_eq!(k.due_at(), None);
        assert!(k.try_request(t0 + Duration::from_millis(1000)));
        assert!(!k.request(t0 + Duration::from_millis(1100)));
    }
}
