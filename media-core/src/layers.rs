//! Simulcast layers, sans-I/O: which layer a `rid` is, where a keyframe starts in VP8 and H264
//! payloads, how fast each layer of a publisher arrives, and, per subscriber video stream,
//! when to switch from the layer being forwarded to the one the allocator wants.
//!
//! A switch happens only at the first packet of a keyframe of the target layer (the
//! subscriber's decoder can start there); until then the old layer keeps flowing, so the
//! picture never stops while waiting. VP8 carries its own picture numbering (picture ID,
//! TL0PICIDX) that receivers use to find frame references; [`Vp8Rewriter`] keeps it
//! continuous across switches the way [`crate::forward::SeqTsRewriter`] does for sequence
//! numbers and timestamps. Time is a parameter; nothing here reads a clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Bits per second.
pub type Bps = u64;

/// The video codecs whose payloads are inspected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VideoCodec {
    Vp8,
    H264,
    /// Anything else: no keyframe detection, so no layer switching (single layer only).
    Other,
}

/// Layer index (0 = lowest) of each rid, given the rids in the order the publisher's SDP
/// lists them. Well-known names decide when every rid is one of a set: `q`/`h`/`f`
/// (quarter, half, full: Chromium samples, the meeting page), `l`/`m`/`h` (low, medium, high:
/// Nextcloud Talk's clients) and decimal numbers (lowest number lowest). Otherwise the SDP
/// order is taken as lowest first.
pub fn layer_order(rids: &[&str]) -> Vec<usize> {
    let rank_in = |names: &[&str]| -> Option<Vec<usize>> {
        let pos: Option<Vec<usize>> = rids
            .iter()
            .map(|r| names.iter().position(|n| n.eq_ignore_ascii_case(r)))
            .collect();
        pos.map(|p| ranks(&p))
    };
    if let Some(r) = rank_in(&["q", "h", "f"]) {
        return r;
    }
    if let Some(r) = rank_in(&["l", "m", "h"]) {
        return r;
    }
    let nums: Option<Vec<usize>> = rids.iter().map(|r| r.parse::<usize>().ok()).collect();
    if let Some(n) = nums {
        return ranks(&n);
    }
    (0..rids.len()).collect()
}

/// Rank of each value among all (0 = smallest); ties keep their order.
fn ranks(values: &[usize]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by_key(|&i| values[i]);
    let mut out = vec![0; values.len()];
    for (rank, i) in idx.into_iter().enumerate() {
        out[i] = rank;
    }
    out
}

/// Where the fields of a VP8 payload descriptor (RFC 7741 §4.2) sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vp8Descriptor {
    /// Start of a VP8 partition (S bit).
    pub start: bool,
    /// Partition index.
    pub pid: u8,
    /// Offset and length (1 or 2 bytes) of the picture ID, if present.
    pub picture_id: Option<(usize, usize)>,
    /// Offset of TL0PICIDX, if present.
    pub tl0: Option<usize>,
    /// Temporal layer index, if present.
    pub tid: Option<u8>,
    /// Layer sync (Y bit): this frame depends only on TL0 frames, so a receiver may start
    /// taking its temporal layer here.
    pub sync: bool,
    /// Length of the descriptor: the VP8 payload starts here.
    pub len: usize,
}

/// Reads a VP8 payload descriptor; `None` if the payload is too short for what it announces.
pub fn vp8_descriptor(p: &[u8]) -> Option<Vp8Descriptor> {
    let b0 = *p.first()?;
    let mut d = Vp8Descriptor {
        start: b0 & 0x10 != 0,
        pid: b0 & 0x07,
        picture_id: None,
        tl0: None,
        tid: None,
        sync: false,
        len: 1,
    };
    if b0 & 0x80 == 0 {
        return Some(d);
    }
    let x = *p.get(1)?;
    d.len = 2;
    if x & 0x80 != 0 {
        let m = *p.get(d.len)? & 0x80 != 0;
        let n = if m { 2 } else { 1 };
        p.get(d.len + n - 1)?;
        d.picture_id = Some((d.len, n));
        d.len += n;
    }
    if x & 0x40 != 0 {
        p.get(d.len)?;
        d.tl0 = Some(d.len);
        d.len += 1;
    }
    if x & 0x30 != 0 {
        let b = *p.get(d.len)?;
        if x & 0x20 != 0 {
            d.tid = Some(b >> 6);
            d.sync = b & 0x20 != 0;
        }
        d.len += 1;
    }
    (p.len() >= d.len).then_some(d)
}

/// True if this packet is the first packet of a keyframe: where a decoder can start.
pub fn is_keyframe_start(codec: VideoCodec, payload: &[u8]) -> bool {
    match codec {
        VideoCodec::Vp8 => {
            let Some(d) = vp8_descriptor(payload) else {
                return false;
            };
            // First byte of the VP8 frame header: bit 0 clear = key frame (RFC 6386 §9.1).
            d.start && d.pid == 0 && payload.get(d.len).is_some_and(|b| b & 0x01 == 0)
        }
        VideoCodec::H264 => h264_keyframe_start(payload),
        VideoCodec::Other => false,
    }
}

/// H264 (RFC 6184): a packet carrying an SPS, or the start of an IDR slice. Chromium sends
/// SPS and PPS in a STAP-A right before the IDR, so the switch happens on that packet and the
/// decoder gets the parameter sets with the picture.
fn h264_keyframe_start(p: &[u8]) -> bool {
    let Some(&b0) = p.first() else {
        return false;
    };
    match b0 & 0x1f {
        5 | 7 => true,
        // STAP-A: 16-bit size, NAL unit, repeated.
        24 => {
            let mut i = 1;
            while i + 2 < p.len() {
                let size = usize::from(u16::from_be_bytes([p[i], p[i + 1]]));
                let Some(&h) = p.get(i + 2) else {
                    return false;
                };
                if matches!(h & 0x1f, 5 | 7) {
                    return true;
                }
                i += 2 + size;
            }
            false
        }
        // FU-A: start bit and the fragmented unit's type.
        28 => p.get(1).is_some_and(|&fu| fu & 0x80 != 0 && fu & 0x1f == 5),
        _ => false,
    }
}

/// Keeps VP8 picture IDs and TL0PICIDX continuous on one outgoing stream whose source layer
/// changes. Call [`Vp8Rewriter::rewrite`] on every forwarded packet, with `switched` on the
/// first packet of a new source, and [`Vp8Rewriter::skip_frame`] on the first packet of each
/// frame dropped on purpose.
#[derive(Debug, Clone, Default)]
pub struct Vp8Rewriter {
    /// out = in + delta (mod 2^15 for picture IDs, 2^8 for TL0PICIDX).
    pid_delta: u16,
    tl0_delta: u8,
    /// Last picture ID and TL0PICIDX written, for the next switch to continue from.
    last_pid: Option<u16>,
    last_tl0: Option<u8>,
    /// Newest input picture ID of the current source (forwarded or dropped).
    newest_in: Option<u16>,
    /// Input picture IDs of the frames dropped since the switch (the last few): a late packet
    /// of an earlier frame (a retransmission) is numbered as before those drops.
    skipped: VecDeque<u16>,
}

/// Dropped frames remembered for late packets: about 2 s at 15 dropped frames a second. A
/// packet older than that is numbered as if it were newer than them; its frame is long late.
const SKIPPED_FRAMES: usize = 32;

/// Picture ID of a VP8 payload and its counter's mask (7 or 15 bits).
pub(crate) fn vp8_picture_id(payload: &[u8], d: &Vp8Descriptor) -> Option<(u16, u16)> {
    let (at, n) = d.picture_id?;
    Some(if n == 2 {
        (
            u16::from_be_bytes([payload[at] & 0x7f, payload[at + 1]]),
            0x7fff,
        )
    } else {
        (u16::from(payload[at] & 0x7f), 0x7f)
    })
}

impl Vp8Rewriter {
    /// Rewrites the descriptor of `payload` in place.
    pub fn rewrite(&mut self, payload: &mut [u8], switched: bool) {
        let Some(d) = vp8_descriptor(payload) else {
            return;
        };
        if let Some((input, mask)) = vp8_picture_id(payload, &d)
            && let Some((at, n)) = d.picture_id
        {
            if switched {
                let next = self.last_pid.map_or(input, |l| l.wrapping_add(1));
                self.pid_delta = next.wrapping_sub(input);
                self.skipped.clear();
                self.newest_in = None;
            }
            // A late packet does not move down for the frames dropped after it.
            let late = self.newest_in.is_some_and(|n| newer(n, input, mask));
            let later_drops = if late {
                self.skipped
                    .iter()
                    .filter(|&&s| newer(s, input, mask))
                    .count() as u16
            } else {
                self.newest_in = Some(input);
                0
            };
            let out = input.wrapping_add(self.pid_delta).wrapping_add(later_drops) & mask;
            if n == 2 {
                let b = out.to_be_bytes();
                payload[at] = 0x80 | b[0];
                payload[at + 1] = b[1];
            } else {
                payload[at] = out as u8;
            }
            if self.last_pid.is_none_or(|l| newer(out, l, mask)) || switched {
                self.last_pid = Some(out);
            }
        }
        if let Some(at) = d.tl0 {
            let input = payload[at];
            if switched {
                let next = self.last_tl0.map_or(input, |l| l.wrapping_add(1));
                self.tl0_delta = next.wrapping_sub(input);
            }
            let out = input.wrapping_add(self.tl0_delta);
            payload[at] = out;
            if self.last_tl0.is_none_or(|l| out.wrapping_sub(l) < 0x80) || switched {
                self.last_tl0 = Some(out);
            }
        }
    }

    /// The frame `payload` starts was dropped on purpose (temporal filtering): the following
    /// frames move down one picture ID so the subscriber sees no gap. TL0PICIDX needs no
    /// correction because TL0 frames are never dropped. A frame older than the newest seen
    /// (a late packet) changes nothing: its picture ID is a hole already.
    pub fn skip_frame(&mut self, payload: &[u8]) {
        let Some((input, mask)) = vp8_descriptor(payload)
            .as_ref()
            .and_then(|d| vp8_picture_id(payload, d))
        else {
            return;
        };
        if self
            .newest_in
            .is_some_and(|n| n == input || newer(n, input, mask))
        {
            return;
        }
        self.newest_in = Some(input);
        self.pid_delta = self.pid_delta.wrapping_sub(1);
        self.skipped.push_back(input);
        if self.skipped.len() > SKIPPED_FRAMES {
            self.skipped.pop_front();
        }
    }
}

/// `a` is ahead of `b` in a counter space of `mask + 1` values.
pub(crate) fn newer(a: u16, b: u16, mask: u16) -> bool {
    let diff = a.wrapping_sub(b) & mask;
    diff != 0 && diff < mask / 2
}

/// How long a layer may stay silent before it counts as not sent (Chromium stops its top
/// layers when its own uplink estimate or CPU drops).
pub const LAYER_SILENCE: Duration = Duration::from_millis(1000);

/// Received bitrate of each layer of one publisher stream.
#[derive(Debug, Clone)]
pub struct LayerRates {
    layers: Vec<LayerRate>,
}

#[derive(Debug, Clone, Copy, Default)]
struct LayerRate {
    window_start: Option<Instant>,
    window_bytes: u64,
    /// Smoothed rate, once one window has passed.
    rate: Option<Bps>,
    last: Option<Instant>,
}

/// Length of one measuring window.
const RATE_WINDOW: Duration = Duration::from_millis(500);

impl LayerRates {
    pub fn new(count: usize) -> Self {
        Self {
            layers: vec![LayerRate::default(); count.max(1)],
        }
    }

    pub fn count(&self) -> usize {
        self.layers.len()
    }

    /// Counts a packet of `bytes` payload bytes of `layer` at `now`.
    pub fn on_packet(&mut self, layer: usize, bytes: usize, now: Instant) {
        let Some(l) = self.layers.get_mut(layer) else {
            return;
        };
        l.last = Some(now);
        let start = *l.window_start.get_or_insert(now);
        // Payload plus RTP/UDP/IP and SRTP overhead of about 50 bytes.
        l.window_bytes += bytes as u64 + 50;
        let span = now.saturating_duration_since(start);
        if span >= RATE_WINDOW {
            let r = l.window_bytes * 8 * 1000 / (span.as_millis().max(1) as u64);
            // Smoothed over a few seconds both ways: a keyframe (several times a delta
            // frame) must not make the layer look too expensive for a moment, which would
            // move subscribers down and ask for yet another keyframe.
            l.rate = Some(match l.rate {
                Some(old) => (old * 4 + r) / 5,
                None => r,
            });
            l.window_start = Some(now);
            l.window_bytes = 0;
        }
    }

    /// The layer's rate if it is being sent (a packet within [`LAYER_SILENCE`]).
    pub fn rate(&self, layer: usize, now: Instant) -> Option<Bps> {
        let l = self.layers.get(layer)?;
        let live = l
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < LAYER_SILENCE);
        live.then_some(l.rate.unwrap_or(0))
    }

    /// The layer's last measured rate, whether or not it is sent now (for a layer paused at
    /// the publisher: what it will cost when it comes back).
    pub fn last_rate(&self, layer: usize) -> Option<Bps> {
        self.layers.get(layer)?.rate
    }

    /// Whether a packet of `layer` arrived within [`LAYER_SILENCE`].
    pub fn live(&self, layer: usize, now: Instant) -> bool {
        self.rate(layer, now).is_some()
    }
}

/// What to do with one packet for one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Forward it; `switched` on the first packet of a new layer.
    Forward {
        switched: bool,
    },
    Drop,
}

/// The layer one subscriber video stream receives, and the one it should move to.
#[derive(Debug, Clone, Default)]
pub struct LayerSwitch {
    current: Option<usize>,
    target: Option<usize>,
    /// Switches done (for statistics and tests).
    pub switches: u64,
}

impl LayerSwitch {
    /// Layer being forwarded.
    pub fn current(&self) -> Option<usize> {
        self.current
    }

    /// Layer wanted (`None`: nothing, the stream is paused for this subscriber).
    pub fn target(&self) -> Option<usize> {
        self.target
    }

    /// Sets the wanted layer; true if a keyframe of it is now needed (a switch is pending).
    pub fn set_target(&mut self, target: Option<usize>) -> bool {
        self.target = target;
        if target.is_none() {
            self.current = None;
        }
        self.pending()
    }

    /// A switch waits for a keyframe of the target layer.
    pub fn pending(&self) -> bool {
        self.target.is_some() && self.target != self.current
    }

    /// Decides for a packet of `layer`; `keyframe_start` says whether it begins a keyframe.
    pub fn on_packet(&mut self, layer: usize, keyframe_start: bool) -> Decision {
        if Some(layer) == self.target && self.current != self.target && keyframe_start {
            self.current = Some(layer);
            self.switches += 1;
            return Decision::Forward { switched: true };
        }
        if Some(layer) == self.current {
            return Decision::Forward { switched: false };
        }
        Decision::Drop
    }

    /// The current layer stopped arriving: forget it, so that only the target's keyframe
    /// restarts the stream (nothing else would come anyway).
    pub fn current_lost(&mut self) {
        self.current = None;
    }
}

/// How often a subscriber that gets less than it would like asks the BWE to probe again.
pub const PROBE_RENEW_INTERVAL: Duration = Duration::from_secs(3);

/// How long after a downgrade probes are renewed.
pub const PROBE_RENEW_WINDOW: Duration = Duration::from_secs(60);

/// Renews str0m's allocation probe for one subscriber after a downgrade. str0m probes when
/// the desired rate *rises* above the estimate (and on its own in application-limited periods,
/// which padding towards the next layer prevents); a subscriber held down by a past drop keeps
/// the same desired rate, so without a rise its estimate grows only by additive increase,
/// capped at 1.5 x what is sent. Measured with Chromium (quality_shaping): 18-22 s from
/// lifting a 300 kbit/s limit to the top layer that way. So, from [`PROBE_RENEW_INTERVAL`]
/// after a downgrade until [`PROBE_RENEW_WINDOW`] after it, every interval while the
/// subscriber is below its desired rate, the desired rate given to str0m dips to what is
/// planned for one housekeeping turn and rises again, which asks for a probe (at most twice
/// the estimate, str0m's cap). Not otherwise: at start str0m's own initial probing does the
/// work, and extra probes there made a loopback estimate wobble (worker_simulcast).
///
/// Each further downgrade within the window (more than 2 s after the one before: the steps
/// of one drop count once) doubles the interval, up to 8 times: a probe that read more than
/// the link sustains (a tbf bucket lets a probe burst through) led to an upgrade that failed.
#[derive(Debug, Clone, Default)]
pub struct ProbeRenewal {
    down: Option<Instant>,
    last: Option<Instant>,
    dipped: bool,
    /// Downgrades in a row within the window, less one.
    streak: u32,
}

impl ProbeRenewal {
    /// The plan just lowered this subscriber's layers.
    pub fn downgraded(&mut self, now: Instant) {
        let since = self.down.map(|d| now.saturating_duration_since(d));
        match since {
            Some(d) if d <= Duration::from_secs(2) => {}
            Some(d) if d < PROBE_RENEW_WINDOW => self.streak = (self.streak + 1).min(3),
            _ => self.streak = 0,
        }
        self.down = Some(now);
        self.last = Some(now);
        self.dipped = false;
    }

    /// Within [`PROBE_RENEW_INTERVAL`] of a downgrade: padding towards the next layer is
    /// held back too, so that the lower layer's keyframe and the drained queue get the link.
    /// (Measured: sustaining the next step at once after a drop to 300 kbit/s kept the link
    /// full and the picture stood still 2.4 s after the switch to the low layer.)
    pub fn settling(&self, now: Instant) -> bool {
        self.down
            .is_some_and(|d| now.saturating_duration_since(d) < PROBE_RENEW_INTERVAL)
    }

    /// The desired rate to give str0m now, for a subscriber planned `planned` that would like
    /// `desired`.
    pub fn desired(&mut self, planned: Bps, desired: Bps, now: Instant) -> Bps {
        let recovering = self
            .down
            .is_some_and(|d| now.saturating_duration_since(d) < PROBE_RENEW_WINDOW);
        if planned >= desired || !recovering {
            self.dipped = false;
            return desired;
        }
        if self.dipped {
            self.dipped = false;
            self.last = Some(now);
            return desired;
        }
        match self.last {
            Some(t)
                if now.saturating_duration_since(t) < PROBE_RENEW_INTERVAL * (1 << self.streak) =>
            {
                desired
            }
            _ => {
                self.dipped = true;
                planned
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_renewal_dips_once_per_interval_after_a_downgrade_while_below() {
        let t0 = Instant::now();
        let mut r = ProbeRenewal::default();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // No downgrade yet: str0m's own probing, no dips.
        assert_eq!(r.desired(200, 600, at(0)), 600);
        assert_eq!(r.desired(200, 600, at(4000)), 600);
        // After a downgrade: the first dip an interval later, the rise on the next turn,
        // then nothing for an interval.
        r.downgraded(at(5000));
        assert!(r.settling(at(7750)) && !r.settling(at(8000)));
        assert_eq!(r.desired(200, 600, at(7750)), 600);
        assert_eq!(r.desired(200, 600, at(8000)), 200);
        assert_eq!(r.desired(200, 600, at(8250)), 600);
        assert_eq!(r.desired(200, 600, at(11_000)), 600);
        assert_eq!(r.desired(200, 600, at(11_250)), 200);
        // Reaching the desired rate between dip and rise cancels the rise.
        assert_eq!(r.desired(600, 600, at(11_500)), 600);
        assert_eq!(r.desired(200, 600, at(11_750)), 200);
        assert_eq!(r.desired(200, 600, at(12_000)), 600);
        // Past the window: no more dips.
        assert_eq!(r.desired(200, 600, at(65_000)), 600);
        assert_eq!(r.desired(200, 600, at(70_000)), 600);
        // Downgrades in a row double the interval; the steps of one drop count once.
        r.downgraded(at(100_000));
        r.downgraded(at(101_000));
        assert_eq!(r.desired(200, 600, at(104_000)), 200);
        assert_eq!(r.desired(200, 600, at(104_250)), 600);
        r.downgraded(at(105_000));
        assert_eq!(r.desired(200, 600, at(110_000)), 600);
        assert_eq!(r.desired(200, 600, at(111_000)), 200);
    }

    fn vp8(picture_id: u16, tl0: u8, tid: u8, start: bool, key: bool) -> Vec<u8> {
        let pid = picture_id.to_be_bytes();
        vec![
            0x80 | if start { 0x10 } else { 0 },
            0x80 | 0x40 | 0x20,
            0x80 | pid[0],
            pid[1],
            tl0,
            tid << 6,
            if key { 0x10 } else { 0x11 },
            0xaa,
        ]
    }

    #[test]
    fn rid_names_order_layers_lowest_first() {
        assert_eq!(layer_order(&["q", "h", "f"]), vec![0, 1, 2]);
        assert_eq!(layer_order(&["f", "h", "q"]), vec![2, 1, 0]);
        assert_eq!(layer_order(&["h", "m", "l"]), vec![2, 1, 0]);
        assert_eq!(layer_order(&["2", "0", "1"]), vec![2, 0, 1]);
        assert_eq!(layer_order(&["a", "b"]), vec![0, 1]);
        assert_eq!(layer_order(&["h", "f"]), vec![0, 1]);
    }

    #[test]
    fn vp8_descriptor_and_keyframes_are_read() {
        let p = vp8(0x1234, 7, 2, true, true);
        let d = vp8_descriptor(&p).expect("descriptor");
        assert_eq!(d.picture_id, Some((2, 2)));
        assert_eq!(d.tl0, Some(4));
        assert_eq!(d.tid, Some(2));
        assert_eq!(d.len, 6);
        assert!(is_keyframe_start(VideoCodec::Vp8, &p));
        assert!(!is_keyframe_start(
            VideoCodec::Vp8,
            &vp8(1, 1, 0, true, false)
        ));
        assert!(!is_keyframe_start(
            VideoCodec::Vp8,
            &vp8(1, 1, 0, false, true)
        ));
        // A descriptor announcing more than it carries.
        assert_eq!(vp8_descriptor(&[0x90, 0xc0, 0x80]), None);
        assert!(!is_keyframe_start(VideoCodec::Vp8, &[]));
        // Minimal descriptor.
        assert!(is_keyframe_start(VideoCodec::Vp8, &[0x10, 0x00]));
    }

    #[test]
    fn h264_keyframes_are_found_in_single_stap_a_and_fu_a() {
        assert!(is_keyframe_start(VideoCodec::H264, &[0x67, 1, 2]));
        assert!(is_keyframe_start(VideoCodec::H264, &[0x65, 1, 2]));
        assert!(!is_keyframe_start(VideoCodec::H264, &[0x41, 1, 2]));
        // STAP-A with SPS (2 bytes) then PPS.
        assert!(is_keyframe_start(
            VideoCodec::H264,
            &[0x78, 0, 2, 0x67, 0, 0, 2, 0x68, 0]
        ));
        assert!(!is_keyframe_start(
            VideoCodec::H264,
            &[0x78, 0, 2, 0x06, 0, 0, 40, 0x68, 0]
        ));
        assert!(is_keyframe_start(VideoCodec::H264, &[0x7c, 0x85, 0]));
        assert!(!is_keyframe_start(VideoCodec::H264, &[0x7c, 0x05, 0]));
        assert!(!is_keyframe_start(VideoCodec::H264, &[0x7c, 0x81, 0]));
        assert!(!is_keyframe_start(VideoCodec::Other, &[0x67]));
    }

    #[test]
    fn vp8_picture_ids_continue_across_a_switch() {
        let mut r = Vp8Rewriter::default();
        let mut a = vp8(100, 10, 0, true, true);
        r.rewrite(&mut a, true);
        let mut b = vp8(101, 11, 0, true, false);
        r.rewrite(&mut b, false);
        assert_eq!(vp8_pid(&b), 101);
        // New layer with unrelated numbering.
        let mut c = vp8(30_000, 200, 0, true, true);
        r.rewrite(&mut c, true);
        assert_eq!(vp8_pid(&c), 102);
        assert_eq!(c[4], 12);
        let mut d = vp8(30_001, 201, 0, true, false);
        r.rewrite(&mut d, false);
        assert_eq!(vp8_pid(&d), 103);
        assert_eq!(d[4], 13);
        // The M bit stays set and the payload is untouched.
        assert_eq!(d[2] & 0x80, 0x80);
        assert_eq!(&d[6..], &[0x11, 0xaa]);
        // Wrap of the 15-bit space.
        let mut e = vp8(0x7fff, 0, 0, true, true);
        let mut r2 = Vp8Rewriter::default();
        r2.rewrite(&mut e, true);
        let mut f = vp8(0, 1, 0, true, false);
        r2.rewrite(&mut f, false);
        assert_eq!(vp8_pid(&f), 0);
    }

    fn vp8_pid(p: &[u8]) -> u16 {
        u16::from_be_bytes([p[2] & 0x7f, p[3]])
    }

    #[test]
    fn a_switch_waits_for_a_keyframe_of_the_target_and_keeps_the_old_layer_until_then() {
        let mut s = LayerSwitch::default();
        assert!(s.set_target(Some(0)));
        assert_eq!(s.on_packet(0, false), Decision::Drop, "no keyframe yet");
        assert_eq!(s.on_packet(0, true), Decision::Forward { switched: true });
        assert_eq!(s.on_packet(0, false), Decision::Forward { switched: false });
        assert_eq!(s.on_packet(2, true), Decision::Drop, "not the target");
        assert!(s.set_target(Some(2)));
        assert_eq!(s.on_packet(2, false), Decision::Drop);
        assert_eq!(s.on_packet(0, false), Decision::Forward { switched: false });
        assert_eq!(s.on_packet(2, true), Decision::Forward { switched: true });
        assert_eq!(s.on_packet(0, true), Decision::Drop, "old layer stops");
        assert_eq!(s.current(), Some(2));
        assert!(!s.pending());
        assert_eq!(s.switches, 2);
        assert!(!s.set_target(None));
        assert_eq!(s.on_packet(2, true), Decision::Drop);
    }

    #[test]
    fn layer_rates_are_measured_and_silent_layers_are_not_live() {
        let t0 = Instant::now();
        let mut r = LayerRates::new(2);
        // 100 packets of 1200 bytes per second = about 1 Mbit/s.
        for i in 0..100u64 {
            r.on_packet(1, 1200, t0 + Duration::from_millis(10 * i));
        }
        let rate = r.rate(1, t0 + Duration::from_millis(1000)).expect("live");
        assert!((900_000..1_100_000).contains(&rate), "{rate}");
        assert_eq!(r.rate(0, t0), None);
        assert!(!r.live(1, t0 + Duration::from_millis(2100)));
        r.on_packet(9, 10, t0);
    }
}
