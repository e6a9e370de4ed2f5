//! Bandwidth allocation, sans-I/O: which layer of which stream each subscriber receives.
//!
//! Inputs are what the SFU knows at one moment: the publishers' streams with the expected
//! bitrate of each simulcast layer, every subscriber's bandwidth estimate (str0m's send-side
//! GoogCC, or REMB) and its subscriptions with the `selectStream` upper bound, the per-stream
//! caps (camera, screen) and the box's egress budget (a fraction of the measured capacity, see
//! the appliance's sizing). The output is a plan: a layer or "paused" per subscription.
//!
//! Rules, in this order (DESIGN.md §4, §5):
//! 1. A subscriber never gets more than its estimate. Within it, audio comes first, then screen
//!    share, then the active speaker's camera, then the other cameras; every stream first gets
//!    its lowest layer (by priority), and the remaining room raises layers, higher priority
//!    classes first and round-robin inside a class, so equal cameras share equally.
//! 2. The whole plan never exceeds the egress budget. When it would, camera layers are lowered
//!    one step at a time at the subscriber that currently receives the most camera video
//!    ("largest consumers first"), other cameras before the active speaker's: the speaker's
//!    camera is lowered only when no other camera video is left anywhere, screen share only
//!    when no camera video is left, and audio is dropped only when neither is (what whole
//!    dropped audio streams leave unused goes back to audio where it fits).
//! 3. A layer above the per-kind cap or above the subscriber's `selectStream` bound is never
//!    chosen (the lowest layer stays eligible: the publisher is capped by REMB/SDP instead).
//!
//! [`Hysteresis`] adds time (as a parameter): downgrades apply at once, upgrades only after
//! the plan has allowed them for a hold time, so an estimate that wobbles does not make the
//! picture switch back and forth (each switch costs a keyframe).
//!
//! The layers no subscriber uses ([`Plan::layers_in_use`]) are the ones to pause at the
//! publisher.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Bits per second.
pub type Bps = u64;

/// What a stream carries; the order is the priority order inside one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Audio,
    Screen,
    Camera,
}

/// One publisher stream as the allocator sees it.
#[derive(Debug, Clone)]
pub struct Source {
    /// The caller's id of the stream (unique among the sources of one call to [`allocate`]).
    pub id: u32,
    pub kind: Kind,
    /// Expected bitrate of each layer, lowest first (one entry without simulcast). For a layer
    /// that is paused, the caller passes its last measured or its nominal rate, so that it can
    /// be chosen (and then resumed) again.
    pub layers: Vec<Bps>,
    /// The publisher is the room's active speaker (its camera goes before other cameras).
    pub speaking: bool,
}

/// One stream a subscriber receives.
#[derive(Debug, Clone, Copy)]
pub struct Subscription {
    pub source: u32,
    /// The client's `selectStream` choice: never send a higher layer than this.
    pub max_layer: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct Subscriber {
    pub id: u32,
    /// Current bandwidth estimate towards this subscriber.
    pub estimate: Bps,
    pub subscriptions: Vec<Subscription>,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Egress budget of the whole box (all subscribers together).
    pub budget: Bps,
    /// Highest bitrate of a camera layer that may be forwarded (default 1 Mbit/s).
    pub camera_cap: Bps,
    /// Highest bitrate of a screen-share layer that may be forwarded (default 2 Mbit/s).
    pub screen_cap: Bps,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            budget: Bps::MAX,
            camera_cap: 1_000_000,
            screen_cap: 2_000_000,
        }
    }
}

/// The decision for one subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    pub source: u32,
    /// `None`: paused (nothing of this stream is sent to this subscriber).
    pub layer: Option<usize>,
    /// Bitrate of the chosen layer (0 when paused).
    pub rate: Bps,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberPlan {
    pub id: u32,
    /// One entry per subscription, in the order they were given.
    pub assignments: Vec<Assignment>,
    /// Sum of the assigned rates.
    pub total: Bps,
    /// The egress budget, not this subscriber's estimate, lowered something here.
    pub limited_by_budget: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub subscribers: Vec<SubscriberPlan>,
    /// Planned egress of the box.
    pub total: Bps,
}

impl Plan {
    /// For each source, the layers at least one subscriber receives; every other layer of that
    /// source can be paused at the publisher. Sources nobody receives are absent.
    pub fn layers_in_use(&self) -> BTreeMap<u32, BTreeSet<usize>> {
        let mut used: BTreeMap<u32, BTreeSet<usize>> = BTreeMap::new();
        for a in self.subscribers.iter().flat_map(|s| &s.assignments) {
            if let Some(layer) = a.layer {
                used.entry(a.source).or_default().insert(layer);
            }
        }
        used
    }

    /// The plan of one subscriber.
    pub fn subscriber(&self, id: u32) -> Option<&SubscriberPlan> {
        self.subscribers.iter().find(|s| s.id == id)
    }
}

/// Priority class inside a subscriber: lower goes first.
fn class(src: &Source) -> u8 {
    match (src.kind, src.speaking) {
        (Kind::Audio, _) => 0,
        (Kind::Screen, _) => 1,
        (Kind::Camera, true) => 2,
        (Kind::Camera, false) => 3,
    }
}

/// The layers a subscription may use, lowest first: within the subscriber's bound and the
/// per-kind cap, but always at least the lowest layer.
fn eligible(src: &Source, sub: &Subscription, limits: &Limits) -> Vec<usize> {
    let cap = match src.kind {
        Kind::Audio => Bps::MAX,
        Kind::Screen => limits.screen_cap,
        Kind::Camera => limits.camera_cap,
    };
    let bound = sub.max_layer.unwrap_or(usize::MAX);
    let mut layers: Vec<usize> = (0..src.layers.len())
        .filter(|&i| i <= bound && src.layers[i] <= cap)
        .collect();
    if layers.is_empty() && !src.layers.is_empty() {
        layers.push(0);
    }
    layers
}

/// Working state of one subscription during planning.
struct Slot<'a> {
    src: &'a Source,
    eligible: Vec<usize>,
    /// Index into `eligible`, `None` = paused.
    pos: Option<usize>,
}

impl Slot<'_> {
    fn rate(&self) -> Bps {
        self.pos.map_or(0, |p| self.src.layers[self.eligible[p]])
    }

    fn rate_at(&self, pos: usize) -> Bps {
        self.src.layers[self.eligible[pos]]
    }
}

/// Plans every subscriber's layers; see the module documentation for the rules.
pub fn allocate(sources: &[Source], subscribers: &[Subscriber], limits: &Limits) -> Plan {
    let by_id: BTreeMap<u32, &Source> = sources.iter().map(|s| (s.id, s)).collect();
    let mut all: Vec<Vec<Slot<'_>>> = subscribers
        .iter()
        .map(|sub| plan_within_estimate(sub, &by_id, limits))
        .collect();
    let mut limited = vec![false; subscribers.len()];
    fit_budget(&mut all, &mut limited, limits.budget);
    refill_audio(&mut all, subscribers, limits.budget);

    let mut total: Bps = 0;
    let plans = subscribers
        .iter()
        .zip(all)
        .zip(limited)
        .map(|((sub, slots), limited_by_budget)| {
            let mut by_sub = slots.into_iter();
            let assignments: Vec<Assignment> = sub
                .subscriptions
                .iter()
                .map(|s| match by_id.get(&s.source) {
                    // Unknown sources have no slot (they were skipped when planning).
                    None => Assignment {
                        source: s.source,
                        layer: None,
                        rate: 0,
                    },
                    Some(_) => match by_sub.next() {
                        Some(slot) => Assignment {
                            source: s.source,
                            layer: slot.pos.map(|p| slot.eligible[p]),
                            rate: slot.rate(),
                        },
                        None => Assignment {
                            source: s.source,
                            layer: None,
                            rate: 0,
                        },
                    },
                })
                .collect();
            let sub_total = assignments.iter().map(|a| a.rate).sum();
            total += sub_total;
            SubscriberPlan {
                id: sub.id,
                assignments,
                total: sub_total,
                limited_by_budget,
            }
        })
        .collect();
    Plan {
        subscribers: plans,
        total,
    }
}

/// Rule 1: the best layers that fit one subscriber's estimate. The slots come back in the
/// order of the subscriptions (unknown sources left out).
fn plan_within_estimate<'a>(
    sub: &Subscriber,
    by_id: &BTreeMap<u32, &'a Source>,
    limits: &Limits,
) -> Vec<Slot<'a>> {
    let mut slots: Vec<Slot<'a>> = sub
        .subscriptions
        .iter()
        .filter_map(|s| {
            let src = *by_id.get(&s.source)?;
            Some(Slot {
                src,
                eligible: eligible(src, s, limits),
                pos: None,
            })
        })
        .collect();
    // Priority order: class, then source id, so that equal inputs give equal plans.
    let mut order: Vec<usize> = (0..slots.len()).collect();
    order.sort_by_key(|&i| (class(slots[i].src), slots[i].src.id));

    let mut used: Bps = 0;
    // Lowest layers first, by priority.
    for &i in &order {
        let slot = &mut slots[i];
        if slot.eligible.is_empty() {
            continue;
        }
        let r = slot.rate_at(0);
        if used.saturating_add(r) <= sub.estimate {
            slot.pos = Some(0);
            used += r;
        }
    }
    // Then raise layers: class by class, one step per stream per round inside a class.
    let mut start = 0;
    while start < order.len() {
        let c = class(slots[order[start]].src);
        let end = order[start..]
            .iter()
            .position(|&i| class(slots[i].src) != c)
            .map_or(order.len(), |n| start + n);
        loop {
            let mut raised = false;
            for &i in &order[start..end] {
                let slot = &mut slots[i];
                let Some(p) = slot.pos else { continue };
                if p + 1 >= slot.eligible.len() {
                    continue;
                }
                let (cur, next) = (slot.rate_at(p), slot.rate_at(p + 1));
                let after = used - cur + next;
                if after <= sub.estimate {
                    slot.pos = Some(p + 1);
                    used = after;
                    raised = true;
                }
            }
            if !raised {
                break;
            }
        }
        start = end;
    }
    slots
}

/// Rule 2: lower layers until the sum fits the budget, by class from the least important
/// (other cameras, then the active speaker's camera, then screen share, then audio), and
/// inside a class at the largest consumer of that class first. Each subscriber session of a
/// Talk client carries one publisher, so the speaker's priority over other cameras matters
/// here, across subscribers, more than inside one.
fn fit_budget(all: &mut [Vec<Slot<'_>>], limited: &mut [bool], budget: Bps) {
    let mut total: Bps = all.iter().flatten().map(Slot::rate).sum();
    for c in [3, 2, 1, 0] {
        while total > budget {
            // The subscriber receiving the most of this class (ties: the first).
            let mut best: Option<(usize, Bps)> = None;
            for (i, slots) in all.iter().enumerate() {
                let amount: Bps = slots
                    .iter()
                    .filter(|s| class(s.src) == c)
                    .map(Slot::rate)
                    .sum();
                if amount > 0 && best.is_none_or(|(_, b)| amount > b) {
                    best = Some((i, amount));
                }
            }
            let Some((i, _)) = best else { break };
            // Inside it, the stream of this class with the highest rate that still flows.
            let Some(slot) = all[i]
                .iter_mut()
                .filter(|s| class(s.src) == c && s.pos.is_some())
                .max_by_key(|s| (s.rate(), std::cmp::Reverse(s.src.id)))
            else {
                break;
            };
            let before = slot.rate();
            slot.pos = match slot.pos {
                Some(0) | None => None,
                Some(p) => Some(p - 1),
            };
            total = total - before + slot.rate();
            limited[i] = true;
        }
    }
}

/// Dropping whole audio streams for the budget leaves up to one stream's rate unused; give it
/// back to audio where it fits (subscribers with the least audio first).
fn refill_audio(all: &mut [Vec<Slot<'_>>], subscribers: &[Subscriber], budget: Bps) {
    let mut total: Bps = all.iter().flatten().map(Slot::rate).sum();
    let mut order: Vec<usize> = (0..all.len()).collect();
    order.sort_by_key(|&i| {
        let audio: Bps = all[i]
            .iter()
            .filter(|s| s.src.kind == Kind::Audio)
            .map(Slot::rate)
            .sum();
        (audio, i)
    });
    for i in order {
        let mut used: Bps = all[i].iter().map(Slot::rate).sum();
        for slot in all[i].iter_mut() {
            if slot.src.kind != Kind::Audio || slot.pos.is_some() || slot.eligible.is_empty() {
                continue;
            }
            let r = slot.rate_at(0);
            if used + r <= subscribers[i].estimate && total + r <= budget {
                slot.pos = Some(0);
                used += r;
                total += r;
            }
        }
    }
}

/// Holds upgrades back until the plan has wanted them for a while; downgrades pass at once.
///
/// Keyed by (subscriber id, source id). Holding a lower layer only ever lowers rates, so every
/// guarantee of [`allocate`] (estimate, budget, audio first) still holds for the output.
///
/// An upgrade that is undone within [`FAILED_UPGRADE`] failed: the link did not carry it (a
/// probe over a shaped link can read more than the link sustains). Each failure doubles the
/// hold of that subscription, up to 16 times; an upgrade that lasts [`FAILED_UPGRADE`] resets
/// it. Measured with Chromium behind a 300 kbit/s tbf (quality_shaping): with a fixed 2 s
/// hold the subscriber went up to the middle layer and back every few seconds while shaped.
#[derive(Debug)]
pub struct Hysteresis {
    hold: Duration,
    state: BTreeMap<(u32, u32), HoldState>,
}

/// An upgrade undone within this time counted as failed. It was 10 s; but a test's link drop
/// 8-10 s after the last upgrade then counted as one more failure, and with the failures of
/// the first seconds' wobble the hold after the link came back reached 16-32 s (recovery to
/// the top layer took 35 s in one quality_shaping run, 3-22 s over the others). A failed
/// upgrade over a shaped link shows within a second or two (the loss detector, loss.rs,
/// trips on the first window of heavy loss), so 5 s still catches it.
pub const FAILED_UPGRADE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
struct HoldState {
    /// Layer currently sent.
    layer: Option<usize>,
    /// Since when a higher layer has been allowed without a break.
    since: Option<Instant>,
    /// When the last upgrade was put in force.
    upgraded: Option<Instant>,
    /// Failed upgrades in a row (the hold is doubled this many times, at most 4).
    failures: u32,
}

impl Hysteresis {
    pub fn new(hold: Duration) -> Self {
        Self {
            hold,
            state: BTreeMap::new(),
        }
    }

    /// Applies the hold to `plan` (made at `now`) and returns the plan to put in force.
    pub fn apply(&mut self, mut plan: Plan, sources: &[Source], now: Instant) -> Plan {
        let by_id: BTreeMap<u32, &Source> = sources.iter().map(|s| (s.id, s)).collect();
        let mut seen = BTreeSet::new();
        let mut total = 0;
        for sub in &mut plan.subscribers {
            let mut sub_total = 0;
            for a in &mut sub.assignments {
                let key = (sub.id, a.source);
                seen.insert(key);
                let src = by_id.get(&a.source);
                let rate_of = |layer: Option<usize>| {
                    layer
                        .and_then(|l| src.and_then(|s| s.layers.get(l)))
                        .copied()
                        .unwrap_or(0)
                };
                match self.state.get_mut(&key) {
                    // A new subscription starts at once at whatever fits: holding it back
                    // would only delay the first picture.
                    None => {
                        self.state.insert(
                            key,
                            HoldState {
                                layer: a.layer,
                                since: None,
                                upgraded: None,
                                failures: 0,
                            },
                        );
                    }
                    Some(e) => {
                        let recent = |t: Option<Instant>| {
                            t.is_some_and(|t| now.saturating_duration_since(t) < FAILED_UPGRADE)
                        };
                        if e.upgraded.is_some() && !recent(e.upgraded) {
                            // The last upgrade held: the link carries it.
                            e.upgraded = None;
                            e.failures = 0;
                        }
                        // Option orders None (paused) below every layer.
                        let upgrade = a.layer > e.layer;
                        // Audio is never held back, and holding must never cost more than
                        // the plan (measured layer rates need not rise with the index).
                        let holdable = src.is_some_and(|s| s.kind != Kind::Audio)
                            && rate_of(e.layer) <= a.rate;
                        if upgrade && holdable {
                            let since = *e.since.get_or_insert(now);
                            let hold = self.hold * (1 << e.failures.min(4));
                            if now.saturating_duration_since(since) < hold {
                                a.layer = e.layer;
                                a.rate = rate_of(e.layer);
                            } else {
                                e.layer = a.layer;
                                e.since = None;
                                e.upgraded = Some(now);
                            }
                        } else {
                            if a.layer < e.layer && recent(e.upgraded) {
                                e.failures += 1;
                                e.upgraded = None;
                            }
                            e.layer = a.layer;
                            e.since = None;
                        }
                    }
                }
                sub_total += a.rate;
            }
            sub.total = sub_total;
            total += sub_total;
        }
        plan.total = total;
        self.state.retain(|k, _| seen.contains(k));
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (no external crate; reproducible from the seed).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 33
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    fn cam(id: u32, speaking: bool) -> Source {
        Source {
            id,
            kind: Kind::Camera,
            layers: vec![150_000, 500_000, 1_000_000],
            speaking,
        }
    }
    fn audio(id: u32) -> Source {
        Source {
            id,
            kind: Kind::Audio,
            layers: vec![50_000],
            speaking: false,
        }
    }
    fn screen(id: u32) -> Source {
        Source {
            id,
            kind: Kind::Screen,
            layers: vec![300_000, 1_500_000],
            speaking: false,
        }
    }
    fn subscribe(id: u32, estimate: Bps, sources: &[u32]) -> Subscriber {
        Subscriber {
            id,
            estimate,
            subscriptions: sources
                .iter()
                .map(|&source| Subscription {
                    source,
                    max_layer: None,
                })
                .collect(),
        }
    }
    fn layer(plan: &Plan, sub: u32, src: u32) -> Option<usize> {
        plan.subscriber(sub)?
            .assignments
            .iter()
            .find(|a| a.source == src)?
            .layer
    }

    #[test]
    fn ample_estimate_gets_top_layers() {
        let sources = [audio(1), cam(2, false), cam(3, false)];
        let subs = [subscribe(10, 10_000_000, &[1, 2, 3])];
        let plan = allocate(&sources, &subs, &Limits::default());
        assert_eq!(layer(&plan, 10, 1), Some(0));
        assert_eq!(layer(&plan, 10, 2), Some(2));
        assert_eq!(layer(&plan, 10, 3), Some(2));
        assert_eq!(plan.total, 2_050_000);
    }

    #[test]
    fn low_estimate_gets_low_layer_and_audio_first() {
        let sources = [audio(1), cam(2, false)];
        // 300 kbit/s: audio + the 150k layer fit, 500k does not.
        let plan = allocate(
            &sources,
            &[subscribe(10, 300_000, &[1, 2])],
            &Limits::default(),
        );
        assert_eq!(layer(&plan, 10, 1), Some(0));
        assert_eq!(layer(&plan, 10, 2), Some(0));
        // 100 kbit/s: audio only.
        let plan = allocate(
            &sources,
            &[subscribe(10, 100_000, &[1, 2])],
            &Limits::default(),
        );
        assert_eq!(layer(&plan, 10, 1), Some(0));
        assert_eq!(layer(&plan, 10, 2), None);
    }

    #[test]
    fn screen_and_speaker_before_other_cameras() {
        let sources = [cam(1, false), cam(2, true), screen(3)];
        // Room for every base layer (600k) plus the screen's top layer (+1.2M), not more.
        let plan = allocate(
            &sources,
            &[subscribe(10, 1_900_000, &[1, 2, 3])],
            &Limits::default(),
        );
        assert_eq!(layer(&plan, 10, 3), Some(1));
        assert_eq!(layer(&plan, 10, 2), Some(0));
        assert_eq!(layer(&plan, 10, 1), Some(0));
        // 350k more: the speaker rises (to 500k), the other camera does not.
        let plan = allocate(
            &sources,
            &[subscribe(10, 2_250_000, &[1, 2, 3])],
            &Limits::default(),
        );
        assert_eq!(layer(&plan, 10, 2), Some(1));
        assert_eq!(layer(&plan, 10, 1), Some(0));
    }

    #[test]
    fn select_stream_and_caps_bound_the_layer() {
        let sources = [cam(1, false), screen(2)];
        let mut sub = subscribe(10, 100_000_000, &[1, 2]);
        sub.subscriptions[0].max_layer = Some(1);
        let limits = Limits {
            screen_cap: 1_000_000,
            ..Limits::default()
        };
        let plan = allocate(&sources, &[sub], &limits);
        assert_eq!(layer(&plan, 10, 1), Some(1));
        // The 1.5 Mbit/s screen layer is above the 1 Mbit/s cap.
        assert_eq!(layer(&plan, 10, 2), Some(0));
    }

    #[test]
    fn budget_lowers_the_largest_consumer_first() {
        let sources = [audio(1), cam(2, false), cam(3, false)];
        let subs = [
            subscribe(10, 10_000_000, &[1, 2, 3]), // wants 2.05M
            subscribe(11, 700_000, &[1, 2, 3]),    // gets 50k + 150k + 500k
        ];
        let limits = Limits {
            budget: 2_100_000,
            ..Limits::default()
        };
        let plan = allocate(&sources, &subs, &limits);
        assert!(plan.total <= 2_100_000);
        // Subscriber 11 was not the largest consumer at any step.
        assert!(!plan.subscriber(11).is_some_and(|s| s.limited_by_budget));
        assert!(plan.subscriber(10).is_some_and(|s| s.limited_by_budget));
        // Subscriber 11 (700k) keeps what its estimate allows; 10 gives up its top layers.
        assert_eq!(plan.subscriber(11).map(|s| s.total), Some(700_000));
        assert_eq!(layer(&plan, 10, 2), Some(1));
        assert_eq!(layer(&plan, 10, 3), Some(1));
        assert_eq!(plan.layers_in_use()[&2], BTreeSet::from([1]));
    }

    #[test]
    fn budget_lowers_other_cameras_before_the_speakers_even_at_a_smaller_consumer() {
        // One subscriber session per publisher, as Talk's clients make them: 10 receives the
        // speaker's camera, 11 another camera; 10 consumes more.
        let sources = [cam(1, true), cam(2, false)];
        let subs = [
            subscribe(10, 10_000_000, &[1]), // 1M
            subscribe(11, 600_000, &[2]),    // 500k
        ];
        let limits = Limits {
            budget: 1_200_000,
            ..Limits::default()
        };
        let plan = allocate(&sources, &subs, &limits);
        assert!(plan.total <= 1_200_000);
        // The other camera goes down to its lowest layer first; the speaker keeps its top.
        assert_eq!(layer(&plan, 10, 1), Some(2));
        assert_eq!(layer(&plan, 11, 2), Some(0));
        // Without a speaker, the largest consumer (10) gives way first.
        let quiet = [cam(1, false), cam(2, false)];
        let plan = allocate(&quiet, &subs, &limits);
        assert_eq!(layer(&plan, 10, 1), Some(1));
        assert_eq!(layer(&plan, 11, 2), Some(1));
    }

    /// Generated estimate sequences through the upgrade hold, on a clock the test advances
    /// (250 ms per step, as the workers re-plan): what is put in force never exceeds the
    /// budget or an estimate of the moment, audio is never paused for video, and no layer is
    /// above what the plan of that moment allows.
    #[test]
    fn generated_sequences_through_the_hold_keep_the_guarantees() {
        let mut rng = Lcg(0x5eed_4a11);
        let t0 = Instant::now();
        for case in 0..300 {
            let sources = [
                audio(1),
                cam(2, rng.below(2) == 0),
                cam(3, false),
                screen(4),
            ];
            let n_subs = 1 + rng.below(6) as u32;
            let picks: Vec<Vec<u32>> = (0..n_subs)
                .map(|_| {
                    let mut v = vec![1];
                    v.extend([2u32, 3, 4].into_iter().filter(|_| rng.below(2) == 0));
                    v
                })
                .collect();
            let mut estimates: Vec<Bps> = (0..n_subs).map(|_| rng.below(4_000_000)).collect();
            let mut hold = Hysteresis::new(Duration::from_secs(2));
            let budget = 500_000 + rng.below(10_000_000);
            let limits = Limits {
                budget,
                ..Limits::default()
            };
            for step in 0..60u64 {
                for e in estimates.iter_mut() {
                    // Mostly small moves, sometimes a drop or a jump.
                    *e = match rng.below(10) {
                        0 => *e / 4,
                        1 => *e + rng.below(3_000_000),
                        _ => (*e + rng.below(200_000)).saturating_sub(rng.below(200_000)),
                    };
                }
                let subs: Vec<Subscriber> = picks
                    .iter()
                    .zip(&estimates)
                    .enumerate()
                    .map(|(i, (p, &e))| subscribe(100 + i as u32, e, p))
                    .collect();
                let plan = allocate(&sources, &subs, &limits);
                let held = hold.apply(
                    plan.clone(),
                    &sources,
                    t0 + Duration::from_millis(250 * step),
                );
                assert!(held.total <= budget, "case {case} step {step}: over budget");
                for ((sub, h), p) in subs.iter().zip(&held.subscribers).zip(&plan.subscribers) {
                    assert!(
                        h.total <= sub.estimate,
                        "case {case} step {step}: over estimate"
                    );
                    let video = h
                        .assignments
                        .iter()
                        .any(|a| a.source != 1 && a.layer.is_some());
                    let audio = h.assignments.iter().find(|a| a.source == 1);
                    let planned_audio = p.assignments.iter().find(|a| a.source == 1);
                    if video && planned_audio.is_some_and(|a| a.layer.is_some()) {
                        assert!(
                            audio.is_some_and(|a| a.layer.is_some()),
                            "case {case} step {step}: audio paused for video"
                        );
                    }
                    for (a, b) in h.assignments.iter().zip(&p.assignments) {
                        assert!(
                            a.layer <= b.layer,
                            "case {case} step {step}: above the plan"
                        );
                    }
                }
            }
        }
    }

    /// Many generated mixes: the guarantees of the module documentation hold for each.
    #[test]
    fn generated_mixes_keep_every_guarantee() {
        let mut rng = Lcg(0x7a1b_0c5e);
        for case in 0..3000 {
            let n_sources = 1 + rng.below(8) as u32;
            let mut sources = Vec::new();
            for id in 0..n_sources {
                let kind = match rng.below(5) {
                    0 | 1 => Kind::Audio,
                    2 => Kind::Screen,
                    _ => Kind::Camera,
                };
                let n_layers = if kind == Kind::Audio {
                    1
                } else {
                    1 + rng.below(3) as usize
                };
                let mut rate = 20_000 + rng.below(200_000);
                let mut layers = Vec::new();
                for _ in 0..n_layers {
                    layers.push(rate);
                    rate = rate * (2 + rng.below(3)) + rng.below(100_000);
                }
                sources.push(Source {
                    id,
                    kind,
                    layers,
                    speaking: rng.below(4) == 0,
                });
            }
            let n_subs = 1 + rng.below(12) as u32;
            let mut subs = Vec::new();
            for id in 0..n_subs {
                let mut subscriptions = Vec::new();
                for source in 0..n_sources {
                    if rng.below(4) == 0 {
                        continue;
                    }
                    let max_layer = (rng.below(3) == 0).then(|| rng.below(3) as usize);
                    subscriptions.push(Subscription { source, max_layer });
                }
                subs.push(Subscriber {
                    id: 100 + id,
                    estimate: rng.below(6_000_000),
                    subscriptions,
                });
            }
            let limits = Limits {
                budget: rng.below(20_000_000),
                camera_cap: 300_000 + rng.below(1_500_000),
                screen_cap: 500_000 + rng.below(3_000_000),
            };
            let unlimited = Limits {
                budget: Bps::MAX,
                ..limits
            };
            let plan = allocate(&sources, &subs, &limits);
            let free = allocate(&sources, &subs, &unlimited);
            check(case, &sources, &subs, &limits, &plan, &free);
        }
    }

    fn check(
        case: u32,
        sources: &[Source],
        subs: &[Subscriber],
        limits: &Limits,
        plan: &Plan,
        free: &Plan,
    ) {
        let src = |id: u32| sources.iter().find(|s| s.id == id).expect("known source");
        let kind_total = |p: &SubscriberPlan, k: Kind| -> Bps {
            p.assignments
                .iter()
                .filter(|a| src(a.source).kind == k)
                .map(|a| a.rate)
                .sum()
        };
        // Budget and totals.
        assert!(plan.total <= limits.budget, "case {case}: over budget");
        assert_eq!(
            plan.total,
            plan.subscribers.iter().map(|s| s.total).sum::<Bps>()
        );
        if free.total <= limits.budget {
            assert_eq!(
                plan, free,
                "case {case}: degraded although the budget sufficed"
            );
        }
        let any_video = plan
            .subscribers
            .iter()
            .any(|p| kind_total(p, Kind::Camera) + kind_total(p, Kind::Screen) > 0);
        let any_camera = plan
            .subscribers
            .iter()
            .any(|p| kind_total(p, Kind::Camera) > 0);
        for (sub, p) in subs.iter().zip(&plan.subscribers) {
            assert!(
                p.total <= sub.estimate,
                "case {case}: over estimate of {}",
                sub.id
            );
            for (s, a) in sub.subscriptions.iter().zip(&p.assignments) {
                let source = src(s.source);
                if let Some(l) = a.layer {
                    assert_eq!(a.rate, source.layers[l]);
                    if l > 0 {
                        // Bounds: selectStream and the cap (the lowest layer is always allowed).
                        assert!(
                            s.max_layer.is_none_or(|m| l <= m),
                            "case {case}: above selectStream"
                        );
                        let cap = match source.kind {
                            Kind::Audio => Bps::MAX,
                            Kind::Screen => limits.screen_cap,
                            Kind::Camera => limits.camera_cap,
                        };
                        assert!(source.layers[l] <= cap, "case {case}: above cap");
                    }
                } else if source.kind == Kind::Audio {
                    // Audio missing: it must not have fitted next to the audio this
                    // subscriber gets (whatever video it gets), or the budget took it when no
                    // video was left anywhere.
                    let own_audio = kind_total(p, Kind::Audio);
                    let rate = source.layers[0];
                    assert!(
                        own_audio + rate > sub.estimate
                            || (plan.total + rate > limits.budget && !any_video),
                        "case {case}: audio of {} dropped for video",
                        sub.id
                    );
                }
            }
        }
        // Screen share is lowered for the budget only when no camera video is left.
        for (p, f) in plan.subscribers.iter().zip(&free.subscribers) {
            for (a, b) in p.assignments.iter().zip(&f.assignments) {
                if src(a.source).kind == Kind::Screen && a.layer != b.layer {
                    assert!(
                        !any_camera,
                        "case {case}: screen lowered while cameras flow"
                    );
                }
            }
        }
        let class_total = |p: &SubscriberPlan, c: u8| -> Bps {
            p.assignments
                .iter()
                .filter(|a| class(src(a.source)) == c)
                .map(|a| a.rate)
                .sum()
        };
        // The active speaker's camera is lowered for the budget only when no other camera
        // video is left anywhere.
        let other_cameras = plan.subscribers.iter().any(|p| class_total(p, 3) > 0);
        for (p, f) in plan.subscribers.iter().zip(&free.subscribers) {
            for (a, b) in p.assignments.iter().zip(&f.assignments) {
                if class(src(a.source)) == 2 && a.layer != b.layer {
                    assert!(
                        !other_cameras,
                        "case {case}: speaker's camera lowered while other cameras flow"
                    );
                }
            }
        }
        // Fairness, per camera class: a subscriber whose cameras of the class were lowered for
        // the budget was the largest consumer of the class each time: after its last step it
        // had at least what anyone ends with.
        for c in [3, 2] {
            let max_class = plan
                .subscribers
                .iter()
                .map(|p| class_total(p, c))
                .max()
                .unwrap_or(0);
            for (p, f) in plan.subscribers.iter().zip(&free.subscribers) {
                let (now, before) = (class_total(p, c), class_total(f, c));
                if now < before {
                    let largest_step = sources
                        .iter()
                        .filter(|s| class(s) == c)
                        .flat_map(|s| {
                            s.layers
                                .iter()
                                .enumerate()
                                .map(|(i, &r)| r - if i == 0 { 0 } else { s.layers[i - 1] })
                        })
                        .max()
                        .unwrap_or(0);
                    assert!(
                        now + largest_step >= max_class,
                        "case {case}: subscriber {} lowered to {now} (class {c}) while another \
                         keeps {max_class}",
                        p.id
                    );
                }
            }
        }
        // Pausing: exactly the chosen layers are in use.
        let in_use = plan.layers_in_use();
        for p in &plan.subscribers {
            for a in &p.assignments {
                if let Some(l) = a.layer {
                    assert!(in_use[&a.source].contains(&l));
                }
            }
        }
        assert_eq!(
            in_use.values().map(BTreeSet::len).sum::<usize>(),
            plan.subscribers
                .iter()
                .flat_map(|p| p
                    .assignments
                    .iter()
                    .filter_map(|a| a.layer.map(|l| (a.source, l))))
                .collect::<BTreeSet<_>>()
                .len()
        );
    }

    #[test]
    fn hysteresis_holds_upgrades_and_passes_downgrades() {
        let t0 = Instant::now();
        let sources = [audio(1), cam(2, false)];
        let limits = Limits::default();
        let mut h = Hysteresis::new(Duration::from_secs(3));
        let at = |s: u64| t0 + Duration::from_secs(s);
        let run = |h: &mut Hysteresis, estimate: Bps, t: Instant| {
            let plan = allocate(&sources, &[subscribe(10, estimate, &[1, 2])], &limits);
            h.apply(plan, &sources, t)
        };
        // A new subscription starts at once at what fits.
        let p = run(&mut h, 2_000_000, at(0));
        assert_eq!(layer(&p, 10, 2), Some(2));
        // The estimate drops: down at once.
        let p = run(&mut h, 300_000, at(1));
        assert_eq!(layer(&p, 10, 2), Some(0));
        assert_eq!(p.total, 200_000);
        // It recovers: held for 3 s, then up.
        for s in 2..5 {
            let p = run(&mut h, 2_000_000, at(s));
            assert_eq!(layer(&p, 10, 2), Some(0), "at {s} s");
        }
        let p = run(&mut h, 2_000_000, at(5));
        assert_eq!(layer(&p, 10, 2), Some(2));
        // Undone after 1 s: a failed upgrade, the hold doubles (6 s). A wobble restarts it.
        let _ = run(&mut h, 300_000, at(6));
        let _ = run(&mut h, 2_000_000, at(7));
        let _ = run(&mut h, 300_000, at(8));
        let p = run(&mut h, 2_000_000, at(10));
        assert_eq!(layer(&p, 10, 2), Some(0));
        let p = run(&mut h, 2_000_000, at(13));
        assert_eq!(layer(&p, 10, 2), Some(0), "held 6 s after a failed upgrade");
        let p = run(&mut h, 2_000_000, at(16));
        assert_eq!(layer(&p, 10, 2), Some(2));
        // Failed again: 12 s.
        let _ = run(&mut h, 300_000, at(17));
        let p = run(&mut h, 2_000_000, at(18));
        assert_eq!(layer(&p, 10, 2), Some(0));
        let p = run(&mut h, 2_000_000, at(29));
        assert_eq!(layer(&p, 10, 2), Some(0), "held 12 s after two");
        let p = run(&mut h, 2_000_000, at(30));
        assert_eq!(layer(&p, 10, 2), Some(2));
        // This one lasts 10 s: the hold is back to 3 s for the next drop.
        let p = run(&mut h, 2_000_000, at(40));
        assert_eq!(layer(&p, 10, 2), Some(2));
        let _ = run(&mut h, 300_000, at(41));
        let _ = run(&mut h, 2_000_000, at(42));
        let p = run(&mut h, 2_000_000, at(45));
        assert_eq!(layer(&p, 10, 2), Some(2));
    }

    #[test]
    fn a_drop_some_seconds_after_an_upgrade_is_no_failed_upgrade() {
        // quality_shaping: the link dropped 8-10 s after the last upgrade; counted as a
        // failed upgrade (on top of the first seconds' wobble), it held the recovery back
        // 16-32 s.
        let t0 = Instant::now();
        let sources = [audio(1), cam(2, false)];
        let limits = Limits::default();
        let mut h = Hysteresis::new(Duration::from_secs(2));
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let run = |h: &mut Hysteresis, estimate: Bps, t: Instant| {
            let plan = allocate(&sources, &[subscribe(10, estimate, &[1, 2])], &limits);
            h.apply(plan, &sources, t)
        };
        // Polls every 250 ms from `t` with a high estimate until the top layer is in force.
        let up_from = |h: &mut Hysteresis, mut t: u64| {
            while layer(&run(h, 2_000_000, at(t)), 10, 2) != Some(2) {
                t += 250;
                assert!(t < 200_000, "never up");
            }
            t
        };
        let _ = run(&mut h, 2_000_000, at(0));
        // Wobble at the start: two upgrades undone within a second.
        let mut t = 1000;
        for _ in 0..2 {
            let _ = run(&mut h, 300_000, at(t));
            t = up_from(&mut h, t + 250);
            t += 500;
            let _ = run(&mut h, 300_000, at(t));
        }
        // Up again (held 8 s by now), and the link drops 6 s later.
        let up = up_from(&mut h, t + 250);
        t = up;
        while t < up + 6_000 {
            t += 250;
            let _ = run(&mut h, 2_000_000, at(t));
        }
        let _ = run(&mut h, 300_000, at(t));
        // The link comes back: the base hold (2 s), not a doubled one.
        let back = t + 15_000;
        let _ = run(&mut h, 2_000_000, at(back));
        let p = run(&mut h, 2_000_000, at(back + 2_000));
        assert_eq!(
            layer(&p, 10, 2),
            Some(2),
            "held over 2 s after the link came back"
        );
    }
}
