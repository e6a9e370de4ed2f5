//! The gauges a worker's `Stats` answer carries for the SFU's `/metrics`: sessions by role
//! and the simulcast layers paused at publishers. A three-layer str0m publisher with one
//! subscriber bounded to the lowest layer: the two layers above are paused once the pause hold
//! (`pause::PAUSE_HOLD`, 5 s) has passed, and the count drops back to 0 when the bound is lifted.

mod support;

use std::time::{Duration, Instant};

use media_core::worker::{WorkerCommand, WorkerStats};
use support::{Client, Worker, connect_bounded_subscriber, connect_simulcast_publisher};

const RIDS: [&str; 3] = ["q", "h", "f"];

/// One small VP8 packet (descriptor with a 15-bit picture ID, then a frame header byte).
fn vp8_frame(picture_id: u16, key: bool) -> Vec<u8> {
    let pid = picture_id.to_be_bytes();
    let mut v = vec![0x90, 0x80, 0x80 | (pid[0] & 0x7f), pid[1]];
    v.push(if key { 0x10 } else { 0x11 });
    v.resize(80, 0xab);
    v
}

/// Sends 30 frames/s on every layer (keyframes every 30 frames) while stepping both clients,
/// until `done` holds for the worker's stats or `limit` passes; returns the last stats.
fn run_until_stats(
    w: &Worker,
    p: &mut Client,
    s: &mut Client,
    frame: &mut u32,
    limit: Duration,
    done: impl Fn(&WorkerStats) -> bool,
) -> WorkerStats {
    let end = Instant::now() + limit;
    let mut next = Instant::now();
    let mut asked = Instant::now();
    let mut last = WorkerStats::default();
    while Instant::now() < end {
        if Instant::now() >= next {
            let mid = p.mids[0];
            for (l, rid) in RIDS.iter().enumerate() {
                let seq = 10_000 * (l as u64 + 1) + u64::from(*frame);
                let ts = 1_000_000 * (l as u32 + 1) + 3000 * *frame;
                let pid = (5_000 * (l as u16 + 1)).wrapping_add(*frame as u16) & 0x7fff;
                p.write_rtp_rid(mid, rid, seq, ts, &vp8_frame(pid, frame.is_multiple_of(30)));
            }
            *frame += 1;
            next += Duration::from_millis(33);
        }
        p.step();
        s.step();
        if asked.elapsed() >= Duration::from_millis(200) {
            asked = Instant::now();
            last = w
                .ask(|reply| WorkerCommand::Stats { reply })
                .expect("stats");
            if done(&last) {
                return last;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    last
}

#[test]
fn stats_count_sessions_by_role_and_the_simulcast_layers_paused_at_the_publisher() {
    let w = Worker::start(Duration::from_secs(30));
    let (mut p, _) = connect_simulcast_publisher(&w, 1, &RIDS);
    let (mut s, _) = connect_bounded_subscriber(&w, 2, 1, Some(0), &mut p);

    let stats = w
        .ask(|reply| WorkerCommand::Stats { reply })
        .expect("stats");
    assert_eq!(
        (stats.sessions, stats.publishers, stats.subscribers),
        (2, 1, 1),
        "{stats:?}"
    );
    assert_eq!(
        stats.egress_budget,
        u64::MAX,
        "no budget set yet: {stats:?}"
    );
    assert_eq!(
        stats.paused_layers, 0,
        "nothing is paused at once: {stats:?}"
    );

    // Media flows; after the 5 s hold the two layers above the bound are paused.
    let mut frame = 0;
    let started = Instant::now();
    let stats = run_until_stats(
        &w,
        &mut p,
        &mut s,
        &mut frame,
        Duration::from_secs(20),
        |st| st.paused_layers == 2,
    );
    assert_eq!(stats.paused_layers, 2, "layers h and f paused: {stats:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "paused only after the hold, not after {:?}",
        started.elapsed()
    );
    assert!(stats.rtp_forwarded > 0, "{stats:?}");

    // Bound lifted: the layers come back at once.
    w.ask(|reply| WorkerCommand::SelectStream {
        session: 2,
        max_layer: None,
        max_temporal: None,
        reply,
    })
    .expect("select stream");
    let stats = run_until_stats(
        &w,
        &mut p,
        &mut s,
        &mut frame,
        Duration::from_secs(10),
        |st| st.paused_layers == 0,
    );
    assert_eq!(stats.paused_layers, 0, "all layers on again: {stats:?}");

    w.handle
        .send(WorkerCommand::SetEgressBudget { bps: 3_000_000 });
    let stats = w
        .ask(|reply| WorkerCommand::Stats { reply })
        .expect("stats");
    assert_eq!(stats.egress_budget, 3_000_000, "{stats:?}");
}
