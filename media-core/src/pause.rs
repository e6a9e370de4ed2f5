//! Pausing simulcast layers that no subscriber uses, at the publisher (issue #5), sans-I/O.
//!
//! The SFU forwards no layer nobody is on, but the publisher would keep encoding and sending it:
//! uplink and CPU spent on nothing. Talk clients cannot be told to stop a layer (Talk's
//! protocol has no such message), so the lever is the one every WebRTC sender obeys: REMB.
//! Chromium's simulcast allocator gives the lowest layer its rate first and turns a higher
//! layer on only when the bitrate left reaches that layer's minimum, so a REMB a little above
//! what the layers in use need turns the layers above them off, and raising it turns them on
//! again. That also means REMB can pause only from the top: a middle layer nobody uses stays
//! on while someone uses the top one.
//!
//! - What a subscriber "uses" is every layer up to its `selectStream` bound, not only the layer
//!   its estimate carries now: a subscriber whose estimate fell recovers only if the layers
//!   above are there to probe for and switch to. Pausing by estimate was tried first and a
//!   shaped subscriber never got back above the lowest layer (`quality_shaping`). So layers
//!   are paused when nobody subscribes, or when every subscriber's bound is below them.
//! - [`LayerPause`] keeps, per publisher video track, the highest layer kept on (`keep_top`).
//!   A subscriber that wants a higher layer raises it at once; lowering waits [`PAUSE_HOLD`]
//!   of the subscribers wanting less, so a subscriber moving around does not flap the
//!   publisher's encoder. With no subscriber only the lowest layer stays on, so that a new
//!   subscriber has a picture within a second.
//! - [`pause_remb`] is the REMB that keeps exactly the layers up to `keep_top` on.

use std::time::{Duration, Instant};

use crate::layers::Bps;

/// How long subscribers must want fewer layers before the publisher's top layers are paused.
pub const PAUSE_HOLD: Duration = Duration::from_secs(5);
/// What the publisher's audio takes out of a REMB (REMB bounds the whole connection).
const AUDIO_ALLOWANCE: Bps = 50_000;
/// Never ask for less: the lowest layer and audio must keep flowing.
const MIN_REMB: Bps = 150_000;

/// The layers of one publisher video track kept on.
#[derive(Debug, Clone)]
pub struct LayerPause {
    layers: usize,
    keep_top: usize,
    lower_since: Option<Instant>,
    hold_max: usize,
    /// How often `keep_top` changed (for logs and tests).
    pub changes: u64,
}

impl LayerPause {
    /// A track of `layers` simulcast layers, all on.
    pub fn new(layers: usize) -> LayerPause {
        let layers = layers.max(1);
        LayerPause {
            layers,
            keep_top: layers - 1,
            lower_since: None,
            hold_max: 0,
            changes: 0,
        }
    }

    /// The highest layer kept on.
    pub fn keep_top(&self) -> usize {
        self.keep_top
    }

    /// How many layers are paused (from the top).
    pub fn paused(&self) -> usize {
        self.layers - 1 - self.keep_top
    }

    /// Takes the highest layer any subscriber wants now (0 when there is none); true when
    /// the kept layers changed.
    pub fn update(&mut self, wanted: usize, now: Instant) -> bool {
        let wanted = wanted.min(self.layers - 1);
        if wanted >= self.keep_top {
            self.lower_since = None;
            if wanted > self.keep_top {
                self.keep_top = wanted;
                self.changes += 1;
                return true;
            }
            return false;
        }
        match self.lower_since {
            None => {
                self.lower_since = Some(now);
                self.hold_max = wanted;
                false
            }
            Some(since) => {
                self.hold_max = self.hold_max.max(wanted);
                if now.saturating_duration_since(since) < PAUSE_HOLD {
                    return false;
                }
                self.lower_since = None;
                self.keep_top = self.hold_max;
                self.changes += 1;
                true
            }
        }
    }
}

/// The REMB (bit/s, for the publisher's whole connection) that keeps layers `0..=keep_top` on
/// and the ones above off, from the layers' last measured rates (`rates[i]`, lowest first):
/// what the kept layers send plus a tenth, a quarter of the next layer (below the minimum
/// Chromium needs to turn it on, which is its target rate at the lower sizes and about 350
/// kbit/s at 960x540), and audio. `total` (the cap) when nothing is paused or a kept layer's
/// rate is not known yet.
pub fn pause_remb(rates: &[Option<Bps>], keep_top: usize, total: Bps) -> Bps {
    if keep_top + 1 >= rates.len() {
        return total;
    }
    let mut kept: Bps = 0;
    for r in &rates[..=keep_top] {
        match r {
            Some(r) => kept += r,
            None => return total,
        }
    }
    let next = rates[keep_top + 1].unwrap_or(kept);
    (kept + kept / 10 + next / 4 + AUDIO_ALLOWANCE)
        .max(MIN_REMB)
        .min(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_is_at_once_and_lowering_waits_for_the_hold() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut p = LayerPause::new(3);
        assert_eq!((p.keep_top(), p.paused()), (2, 0));
        // Nobody wants more than the lowest: paused only after the hold.
        assert!(!p.update(0, at(0)));
        assert!(!p.update(0, at(4_900)));
        assert!(p.update(0, at(5_000)));
        assert_eq!((p.keep_top(), p.paused()), (0, 2));
        // A subscriber wanting the top brings it back at once.
        assert!(p.update(2, at(5_250)));
        assert_eq!(p.keep_top(), 2);
        // Wanting less for a moment, then the top again: no change (no flapping).
        assert!(!p.update(1, at(6_000)));
        assert!(!p.update(2, at(8_000)));
        assert!(!p.update(1, at(12_000)));
        assert!(!p.update(1, at(16_000)));
        // The hold keeps the highest wanted during it.
        assert!(!p.update(0, at(16_500)));
        assert!(p.update(0, at(17_000)));
        assert_eq!(p.keep_top(), 1);
        assert_eq!(p.changes, 3);
        // Out-of-range wishes are clamped.
        assert!(p.update(9, at(17_250)));
        assert_eq!(p.keep_top(), 2);
        // One layer: nothing to pause.
        let mut one = LayerPause::new(1);
        assert!(!one.update(0, at(0)));
        assert!(!one.update(0, at(60_000)));
        assert_eq!(one.paused(), 0);
    }

    #[test]
    fn the_remb_keeps_the_wanted_layers_and_stays_below_the_next() {
        let rates = [Some(110_000), Some(320_000), Some(950_000)];
        // Nothing paused: the cap.
        assert_eq!(pause_remb(&rates, 2, 1_400_000), 1_400_000);
        // Top paused: q + h + a tenth + a quarter of f + audio.
        let r = pause_remb(&rates, 1, 1_400_000);
        assert_eq!(r, 430_000 + 43_000 + 237_500 + 50_000);
        // Below what Chromium needs to keep f on: q and h at their rates plus f's minimum.
        assert!(r < 110_000 + 320_000 + 350_000 + 50_000, "{r}");
        // Only the lowest: below the 150 kbit/s Chromium needs to add h, beside audio.
        let r = pause_remb(&rates, 0, 1_400_000);
        assert!(r < 110_000 + 150_000 + 50_000, "{r}");
        assert!(r >= MIN_REMB);
        // A kept layer never measured: no pausing on a guess.
        assert_eq!(pause_remb(&[None, Some(1), Some(1)], 1, 900_000), 900_000);
        // Never above the cap, never below the floor.
        assert_eq!(pause_remb(&rates, 1, 300_000), 300_000);
        assert_eq!(
            pause_remb(&[Some(1_000), Some(2_000)], 0, 1_000_000),
            MIN_REMB
        );
    }
}
