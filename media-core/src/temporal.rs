//! VP8 temporal layer filtering for one subscriber stream, sans-I/O.
//!
//! Chromium's VP8 simulcast layers carry temporal layers (TID in the payload descriptor,
//! RFC 7741): with three, T0 is every 4th frame, T2 every other frame. Dropping the frames above
//! a target TID halves or quarters the frame rate and bitrate without a keyframe. Whole frames
//! are dropped, so marker bits stay right; the caller closes the gaps with
//! [`crate::forward::SeqTsRewriter::skip`] (sequence numbers, so the subscriber does not NACK)
//! and [`crate::layers::Vp8Rewriter::skip_frame`] (picture IDs). Timestamps stay as they are.
//!
//! Going down is safe at any frame start (lower layers never reference higher ones). Going up
//! waits for a frame the decoder can take: a TL0 frame or a layer-sync (Y bit) frame of a layer
//! within the new target, because a T1/T2 frame without Y may reference a higher-layer frame
//! that was dropped.

use std::time::{Duration, Instant};

use crate::layers::{Vp8Descriptor, newer, vp8_descriptor, vp8_picture_id};

/// What to do with one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemporalDecision {
    Forward,
    /// Drop; `frame_start` is set on the first packet seen of the dropped frame (skip one
    /// picture ID), even when its real first packet was lost on the way in.
    Drop {
        frame_start: bool,
    },
}

/// Temporal filter state of one outgoing VP8 stream.
#[derive(Debug, Clone, Default)]
pub struct TemporalFilter {
    /// Highest TID wanted; `None` = all.
    target: Option<u8>,
    /// Highest TID being forwarded now (may lag behind an upswitch); `None` = all.
    current: Option<u8>,
    /// Decision for the frame in progress (packets of one frame share it).
    frame_forward: bool,
    /// Picture ID of the frame in progress, when the stream has them: a packet of an earlier
    /// frame (a retransmission) is then told apart from the frame in progress.
    frame_pic: Option<u16>,
    /// Upswitches completed, for metrics.
    pub upswitches: u64,
}

impl TemporalFilter {
    /// Sets the highest TID to forward (`None` = all). Going down takes effect at the next
    /// frame start; going up at the next sync point.
    pub fn set_target(&mut self, target: Option<u8>) {
        self.target = target;
    }

    /// The highest TID forwarded now (`None` = all), for metrics.
    pub fn current(&self) -> Option<u8> {
        self.current
    }

    /// A new source (spatial switch) starts on a keyframe, which references nothing: the
    /// target applies at once.
    pub fn reset(&mut self) {
        self.current = self.target;
        self.frame_pic = None;
    }

    /// Decides for one VP8 payload. Packets without a TID (no temporal layers) are forwarded.
    pub fn on_packet(&mut self, payload: &[u8]) -> TemporalDecision {
        match vp8_descriptor(payload) {
            Some(d) => self.on_descriptor(&d, vp8_picture_id(payload, &d)),
            None => TemporalDecision::Forward,
        }
    }

    /// As [`TemporalFilter::on_packet`], for a descriptor and picture ID (with its mask) read
    /// once per packet by the caller, which hands the same packet to many subscribers.
    pub fn on_descriptor(
        &mut self,
        d: &Vp8Descriptor,
        picture: Option<(u16, u16)>,
    ) -> TemporalDecision {
        let Some(tid) = d.tid else {
            return TemporalDecision::Forward;
        };
        let frame_start = d.start && d.pid == 0;
        // Which frame the packet belongs to: by picture ID where there is one (a late packet
        // of an earlier frame goes by its own layer and changes nothing), else by the start bit.
        let new_frame = match (picture, self.frame_pic) {
            (Some((p, _)), Some(f)) if p == f => false,
            (Some((p, mask)), Some(f)) if !newer(p, f, mask) => {
                return if below(self.current, Some(tid)) {
                    TemporalDecision::Drop { frame_start: false }
                } else {
                    TemporalDecision::Forward
                };
            }
            (Some(_), _) => true,
            (None, _) => frame_start,
        };
        if !new_frame {
            return if self.frame_forward {
                TemporalDecision::Forward
            } else {
                TemporalDecision::Drop { frame_start: false }
            };
        }
        self.frame_pic = picture.map(|(p, _)| p);
        // Switch only where a frame really starts (its first packet may have been lost).
        if frame_start {
            if below(self.target, self.current) {
                // Down: any frame boundary.
                self.current = self.target;
            } else if below(self.current, self.target)
                && (tid == 0 || (d.sync && !below(self.target, Some(tid))))
            {
                self.current = self.target;
                self.upswitches += 1;
            }
        }
        self.frame_forward = !below(self.current, Some(tid));
        if self.frame_forward {
            TemporalDecision::Forward
        } else {
            TemporalDecision::Drop { frame_start: true }
        }
    }
}

/// Share of one layer's bytes in its temporal layers, measured on the publisher's stream: what
/// forwarding only T0, or T0 and T1, costs. Chromium's VP8 simulcast sends three temporal
/// layers per simulcast layer by default, about 40 / 20 / 40 % of the bytes in T0 / T1 / T2
/// (T0 every 4th frame, T1 every 4th frame, T2 every other frame).
#[derive(Debug, Clone, Default)]
pub struct TemporalRates {
    window_start: Option<Instant>,
    /// Bytes in the current window by TID (0, 1, 2 and above).
    window: [u64; 3],
    /// Smoothed shares of the bytes in T0 and in T0 + T1.
    shares: Option<[f64; 2]>,
    /// Temporal layers were seen on this stream (sticky: the allocator's steps keep their
    /// shape, so its hold state keeps meaning the same step).
    layered: bool,
}

/// Length of one measuring window: long enough to hold a few T0 frames and a keyframe's
/// weight averaged out.
const SHARE_WINDOW: Duration = Duration::from_secs(1);

impl TemporalRates {
    /// Counts a packet of `bytes` with temporal layer `tid` (`None`: the packet has none).
    pub fn on_packet(&mut self, tid: Option<u8>, bytes: usize, now: Instant) {
        let Some(tid) = tid else {
            return;
        };
        self.layered = true;
        let start = *self.window_start.get_or_insert(now);
        self.window[usize::from(tid.min(2))] += bytes as u64 + 50;
        if now.saturating_duration_since(start) >= SHARE_WINDOW {
            let total = self.window.iter().sum::<u64>().max(1) as f64;
            let w = [
                self.window[0] as f64 / total,
                (self.window[0] + self.window[1]) as f64 / total,
            ];
            self.shares = Some(match self.shares {
                Some(old) => [(old[0] * 3.0 + w[0]) / 4.0, (old[1] * 3.0 + w[1]) / 4.0],
                None => w,
            });
            self.window = [0; 3];
            self.window_start = Some(now);
        }
    }

    /// Shares of the layer's rate in T0 and in T0 + T1, once the stream is known to have
    /// temporal layers; before the first window is measured, libwebrtc's nominal split.
    pub fn shares(&self) -> Option<[f64; 2]> {
        self.layered.then(|| self.shares.unwrap_or([0.4, 0.6]))
    }
}

/// `a < b` where `None` means "all layers" (above every TID).
fn below(a: Option<u8>, b: Option<u8>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a < b,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::SeqTsRewriter;
    use crate::layers::Vp8Rewriter;

    /// One packet: VP8 descriptor with 15-bit picture ID, TL0PICIDX, TID and Y.
    fn pkt(pid: u16, tl0: u8, tid: u8, sync: bool, start: bool) -> Vec<u8> {
        let b = pid.to_be_bytes();
        vec![
            0x80 | if start { 0x10 } else { 0 },
            0x80 | 0x40 | 0x20,
            0x80 | b[0],
            b[1],
            tl0,
            (tid << 6) | if sync { 0x20 } else { 0 },
            0x11,
            0xaa,
        ]
    }

    /// Chromium's 3-layer pattern: T0 T2 T1 T2, the first T1/T2 after T0 carry Y.
    fn tid_of(frame: u16) -> (u8, bool) {
        match frame % 4 {
            0 => (0, false),
            1 => (2, true),
            2 => (1, true),
            _ => (2, false),
        }
    }

    struct Out {
        seq: u64,
        pid: u16,
        tl0: u8,
        tid: u8,
    }

    /// Feeds `frames` frames (2 packets each) of source `ssrc` through filter and rewriters;
    /// `new_source`: the first packet forwarded starts a new source (a switch), else the
    /// stream continues.
    #[allow(clippy::too_many_arguments)]
    fn run(
        f: &mut TemporalFilter,
        seq: &mut SeqTsRewriter,
        vp8: &mut Vp8Rewriter,
        ssrc: u32,
        first_frame: u16,
        frames: u16,
        pid_base: u16,
        seq_base: u64,
        new_source: bool,
        out: &mut Vec<Out>,
    ) {
        let now = Instant::now();
        let mut switched = new_source;
        for fr in first_frame..first_frame + frames {
            let (tid, sync) = tid_of(fr);
            let tl0 = (fr / 4) as u8;
            for part in 0..2u64 {
                let mut p = pkt(pid_base + fr, tl0, tid, sync, part == 0);
                let in_seq = seq_base + u64::from(fr) * 2 + part;
                match f.on_packet(&p) {
                    TemporalDecision::Forward => {
                        let r = seq.rewrite(ssrc, in_seq, 0, 90_000, now).expect("numbered");
                        vp8.rewrite(&mut p, switched);
                        switched = false;
                        out.push(Out {
                            seq: r.seq,
                            pid: u16::from_be_bytes([p[2] & 0x7f, p[3]]),
                            tl0: p[4],
                            tid,
                        });
                    }
                    TemporalDecision::Drop { frame_start } => {
                        seq.skip(ssrc, in_seq);
                        if frame_start && !switched {
                            vp8.skip_frame(&p);
                        }
                    }
                }
            }
        }
    }

    fn assert_continuous(out: &[Out]) {
        for w in out.windows(2) {
            assert_eq!(w[1].seq, w[0].seq + 1, "seq gap");
            let dp = w[1].pid.wrapping_sub(w[0].pid) & 0x7fff;
            assert!(dp <= 1, "picture ID gap {} -> {}", w[0].pid, w[1].pid);
            let dt = w[1].tl0.wrapping_sub(w[0].tl0);
            assert!(dt <= 1, "TL0PICIDX gap {} -> {}", w[0].tl0, w[1].tl0);
        }
    }

    #[test]
    fn target_zero_forwards_only_tl0_frames_with_no_gaps() {
        let mut f = TemporalFilter::default();
        f.set_target(Some(0));
        f.reset();
        let (mut s, mut v, mut out) = (SeqTsRewriter::new(100, 0), Vp8Rewriter::default(), vec![]);
        run(&mut f, &mut s, &mut v, 1, 0, 40, 500, 7000, true, &mut out);
        assert_eq!(out.len(), 20, "10 T0 frames of 2 packets");
        assert!(out.iter().all(|o| o.tid == 0));
        assert_continuous(&out);
        // Each forwarded frame takes the next picture ID.
        assert_eq!(out[19].pid, out[0].pid + 9);
    }

    #[test]
    fn packets_without_tid_are_all_forwarded() {
        let mut f = TemporalFilter::default();
        f.set_target(Some(0));
        f.reset();
        assert_eq!(f.on_packet(&[0x10, 0x11]), TemporalDecision::Forward);
        assert_eq!(f.on_packet(&[0x00, 0x11]), TemporalDecision::Forward);
    }

    #[test]
    fn going_up_waits_for_a_sync_point_and_going_down_is_immediate() {
        let mut f = TemporalFilter::default();
        f.set_target(Some(0));
        f.reset();
        assert_eq!(
            f.on_packet(&pkt(0, 0, 0, false, true)),
            TemporalDecision::Forward
        );
        f.set_target(Some(2));
        // A T2 frame without Y cannot be taken.
        assert_eq!(
            f.on_packet(&pkt(1, 0, 2, false, true)),
            TemporalDecision::Drop { frame_start: true }
        );
        assert_eq!(
            f.on_packet(&pkt(1, 0, 2, false, false)),
            TemporalDecision::Drop { frame_start: false }
        );
        assert_eq!(f.current(), Some(0));
        // A T1 frame with Y: switch up.
        assert_eq!(
            f.on_packet(&pkt(2, 0, 1, true, true)),
            TemporalDecision::Forward
        );
        assert_eq!(f.current(), Some(2));
        assert_eq!(f.upswitches, 1);
        assert_eq!(
            f.on_packet(&pkt(3, 0, 2, false, true)),
            TemporalDecision::Forward
        );
        // Down at the next frame start, mid-frame packets keep the frame's decision.
        f.set_target(Some(1));
        assert_eq!(
            f.on_packet(&pkt(3, 0, 2, false, false)),
            TemporalDecision::Forward
        );
        assert_eq!(
            f.on_packet(&pkt(5, 1, 2, true, true)),
            TemporalDecision::Drop { frame_start: true }
        );
        // Up to all at a TL0 frame.
        f.set_target(None);
        assert_eq!(
            f.on_packet(&pkt(8, 2, 0, false, true)),
            TemporalDecision::Forward
        );
        assert_eq!(f.current(), None);
    }

    #[test]
    fn numbering_stays_continuous_across_an_upswitch_and_a_spatial_switch() {
        let mut f = TemporalFilter::default();
        f.set_target(Some(0));
        f.reset();
        let (mut s, mut v, mut out) = (SeqTsRewriter::new(100, 0), Vp8Rewriter::default(), vec![]);
        run(&mut f, &mut s, &mut v, 1, 0, 10, 500, 7000, true, &mut out);
        // Raise the bound mid-stream: frame 10 is a T1 with Y, the switch happens there.
        f.set_target(Some(2));
        let mut rest = vec![];
        let mut v2 = v.clone();
        run(
            &mut f, &mut s, &mut v2, 1, 10, 10, 500, 7000, false, &mut rest,
        );
        assert_eq!(rest[0].tid, 1, "upswitch at the first sync frame");
        out.extend(rest);
        assert_continuous(&out);
        // Spatial switch to a source with unrelated numbering, at T0 only again.
        f.set_target(Some(0));
        f.reset();
        let mut other = vec![];
        run(
            &mut f, &mut s, &mut v2, 2, 0, 16, 20_000, 40_000, true, &mut other,
        );
        assert!(other.iter().all(|o| o.tid == 0));
        out.extend(other);
        assert_continuous(&out);
    }

    /// A packet of a forwarded frame lost on the way in and retransmitted after later frames
    /// were dropped keeps the numbers it would have had; a late packet of a dropped frame
    /// stays dropped and moves nothing.
    #[test]
    fn late_packets_keep_their_numbers_across_drops() {
        let now = Instant::now();
        let mut f = TemporalFilter::default();
        f.set_target(Some(0));
        f.reset();
        let (mut s, mut v) = (SeqTsRewriter::new(100, 0), Vp8Rewriter::default());
        let mut sent: Vec<(u64, u16)> = Vec::new();
        let mut feed = |f: &mut TemporalFilter, fr: u16, part: u64, first: bool| {
            let (tid, sync) = tid_of(fr);
            let mut p = pkt(700 + fr, (fr / 4) as u8, tid, sync, part == 0);
            let in_seq = 5000 + u64::from(fr) * 2 + part;
            match f.on_packet(&p) {
                TemporalDecision::Forward => {
                    let r = s.rewrite(9, in_seq, 0, 90_000, now).expect("numbered");
                    v.rewrite(&mut p, first);
                    sent.push((r.seq, u16::from_be_bytes([p[2] & 0x7f, p[3]])));
                    true
                }
                TemporalDecision::Drop { frame_start } => {
                    s.skip(9, in_seq);
                    if frame_start {
                        v.skip_frame(&p);
                    }
                    false
                }
            }
        };
        assert!(feed(&mut f, 0, 0, true));
        // Frame 0's second packet is lost for now; frames 1-3 (T2, T1, T2) are dropped.
        for fr in 1..4 {
            assert!(!feed(&mut f, fr, 0, false));
            assert!(!feed(&mut f, fr, 1, false));
        }
        // The retransmission of frame 0's second packet comes during frame 4 (T0).
        assert!(feed(&mut f, 4, 0, false));
        assert!(
            feed(&mut f, 0, 1, false),
            "late packet of a forwarded frame"
        );
        // A late packet of a dropped frame stays dropped.
        assert!(!feed(&mut f, 2, 1, false));
        assert!(feed(&mut f, 4, 1, false));
        for fr in 5..8 {
            assert!(!feed(&mut f, fr, 0, false));
            assert!(!feed(&mut f, fr, 1, false));
        }
        assert!(feed(&mut f, 8, 0, false));
        let (s0, p0) = sent[0];
        assert_eq!(
            sent,
            vec![
                (s0, p0),
                (s0 + 2, p0 + 1),
                (s0 + 1, p0),
                (s0 + 3, p0 + 1),
                (s0 + 4, p0 + 2)
            ]
        );
    }

    #[test]
    fn temporal_rates_measure_the_share_of_each_layer() {
        let t0 = Instant::now();
        let mut r = TemporalRates::default();
        r.on_packet(None, 1000, t0);
        assert_eq!(r.shares(), None, "no TID: no temporal layers");
        // 30 frames a second for 3 s in Chromium's pattern, T0 frames twice as large.
        for i in 0..90u32 {
            let (tid, _) = tid_of(i as u16);
            let bytes = if tid == 0 { 1950 } else { 950 };
            r.on_packet(
                Some(tid),
                bytes,
                t0 + Duration::from_millis(u64::from(i) * 33),
            );
        }
        let [s0, s1] = r.shares().expect("layered");
        // Per 4 frames: T0 2000, T1 1000, T2 2 x 1000 (with 50 bytes of headers each).
        assert!((s0 - 0.4).abs() < 0.03, "{s0}");
        assert!((s1 - 0.6).abs() < 0.03, "{s1}");
    }
}
