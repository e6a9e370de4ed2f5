//! VP8 temporal layers with Chromium (issue #5, "temporal layers where the codec gives them"):
//! `talkbox run`, a Chromium publisher on the meeting page (three VP8 simulcast layers, each
//! with Chromium's three temporal layers) and a Chromium subscriber that sends Talk's
//! `selectStream` with a `temporal` bound. At T0 only the subscriber must decode about a
//! quarter of the frames, at T0 + T1 about half, and all of them again when the bound is
//! lifted, without the picture stopping at any step (the SFU drops whole frames and closes the
//! numbering over them, so the receiver sees no loss and asks for no keyframe). The bitrate of
//! each step is printed: how the publisher's bytes split over its temporal layers. Needs
//! `apt-get install chromium chromium-driver`.

mod common;

use std::time::{Duration, Instant};

use common::browser::Browser;
use common::{Supervisor, free_port, isolated_config};
use serde_json::Value;

/// The subscriber's first remote camera: [frameHeight, framesDecoded, bytesReceived,
/// pliCount, nackCount, freezeCount], or null.
const INBOUND: &str = r#"
const done = arguments[arguments.length - 1];
const t = [...document.querySelectorAll('#grid .tile:not(.self)')].find(x => x.dataset.roomType === 'video');
const p = t && call.peers.get(t.dataset.session);
const pc = p && p.subs && p.subs.video;
if (!pc) { done(null); } else {
  pc.getStats().then(st => {
    let o = null;
    st.forEach(r => {
      if (r.type === 'inbound-rtp' && r.kind === 'video') {
        o = [r.frameHeight || 0, r.framesDecoded || 0, r.bytesReceived || 0, r.pliCount || 0,
             r.nackCount || 0, r.freezeCount || 0];
      }
    });
    done(o);
  }, e => done(null));
}
"#;

/// framesEncoded of the publisher's lowest layer (rid `q`).
const PUBLISHER_Q: &str = r#"
const done = arguments[arguments.length - 1];
const pc = call.pubs && call.pubs.video;
if (!pc) { done(0); } else {
  pc.getStats().then(st => {
    let n = 0;
    st.forEach(r => { if (r.type === 'outbound-rtp' && r.rid === 'q') n = r.framesEncoded || 0; });
    done(n);
  }, e => done(0));
}
"#;

async fn encoded_q(b: &Browser) -> u64 {
    b.client
        .execute_async(PUBLISHER_Q, vec![])
        .await
        .ok()
        .and_then(|v| v.as_u64())
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, Default)]
struct Inbound {
    height: u64,
    decoded: u64,
    bytes: u64,
    plis: u64,
    nacks: u64,
    freezes: u64,
}

async fn inbound(b: &Browser) -> Option<Inbound> {
    let v: Value = b
        .client
        .execute_async(INBOUND, vec![])
        .await
        .expect("subscriber stats");
    let a = v.as_array()?;
    let n = |i: usize| a.get(i).and_then(Value::as_u64).unwrap_or(0);
    Some(Inbound {
        height: n(0),
        decoded: n(1),
        bytes: n(2),
        plis: n(3),
        nacks: n(4),
        freezes: n(5),
    })
}

/// What one step measured over its window.
#[derive(Debug, Clone, Copy)]
struct Window {
    fps: f64,
    /// Frames decoded per frame the publisher encoded on the layer (Chromium lowers its
    /// frame rate under CPU load, so the share is what the SFU's choice shows).
    share: f64,
    kbps: f64,
    /// Longest time framesDecoded did not move (sampled every 100 ms).
    longest_still: Duration,
    height: u64,
}

/// Samples the subscriber `b` every 100 ms for `dur`, and the publisher `p` at both ends.
async fn measure(b: &Browser, p: &Browser, dur: Duration) -> Window {
    let start = Instant::now();
    let encoded_first = encoded_q(p).await;
    let first = inbound(b).await.unwrap_or_default();
    let (mut last_change, mut last_decoded) = (Instant::now(), first.decoded);
    let mut longest_still = Duration::ZERO;
    let mut last = first;
    while start.elapsed() < dur {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = inbound(b).await.unwrap_or_default();
        if now.decoded != last_decoded {
            last_decoded = now.decoded;
            last_change = Instant::now();
        }
        longest_still = longest_still.max(last_change.elapsed());
        last = now;
    }
    let secs = start.elapsed().as_secs_f64();
    let encoded = encoded_q(p).await.saturating_sub(encoded_first).max(1);
    Window {
        fps: (last.decoded - first.decoded) as f64 / secs,
        share: (last.decoded - first.decoded) as f64 / encoded as f64,
        kbps: (last.bytes - first.bytes) as f64 * 8.0 / 1000.0 / secs,
        longest_still,
        height: last.height,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temporal_bound_lowers_the_frame_rate_without_stopping_the_picture() {
    let port = free_port();
    let listen = format!("listen = \"127.0.0.1:{port}\"");
    // The media workers' layer decisions (debug) are printed at the end.
    let config = isolated_config(&[
        ("signaling", &listen),
        ("supervisor", "log_level = \"debug\""),
    ]);
    let sup = Supervisor::start(Some(&config));
    sup.wait_ready();
    let room = format!("https://127.0.0.1:{port}/r/temporal-layers");
    let ann = Browser::meeting_participant(&room, "Ann").await;
    let bob = Browser::meeting_participant(&room, "Bob").await;
    let start = Instant::now();
    while inbound(&bob).await.is_none_or(|i| i.decoded <= 30) {
        assert!(
            start.elapsed() < Duration::from_secs(45),
            "Bob decodes no video: {:?}",
            inbound(&bob).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The lowest simulcast layer for every step: the layer the temporal steps are for, and
    // light enough for two Chromiums on a loaded 2-core machine to keep their frame rate.
    let ann_sid = bob.first_remote_session().await;
    bob.select_stream_temporal(&ann_sid, 0, 2).await;
    let start = Instant::now();
    while inbound(&bob).await.is_none_or(|i| i.height != 135) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "Bob is not on the lowest layer: {:?}",
            inbound(&bob).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let before = inbound(&bob).await.unwrap_or_default();
    let window = Duration::from_secs(5);
    let settle = Duration::from_secs(1);
    let all = measure(&bob, &ann, window).await;
    let mut steps = Vec::new();
    for temporal in [0u64, 1, 2] {
        bob.select_stream_temporal(&ann_sid, 0, temporal).await;
        tokio::time::sleep(settle).await;
        steps.push((temporal, measure(&bob, &ann, window).await));
    }
    let after = inbound(&bob).await.unwrap_or_default();
    println!("all temporal layers: {all:?}");
    for (t, w) in &steps {
        println!(
            "temporal {t}: {w:?}; {:.0} % of the frames, {:.0} % of the bitrate",
            w.share * 100.0,
            w.kbps / all.kbps * 100.0
        );
    }
    println!(
        "over the steps: {} PLIs, {} NACKs, {} freezes counted by Chromium",
        after.plis - before.plis,
        after.nacks - before.nacks,
        after.freezes - before.freezes
    );
    let log = sup.log();
    let decisions: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("simulcast target changed") || l.contains("layer switched"))
        .collect();
    println!(
        "the box's layer decisions (last 20):\n{}",
        decisions[decisions.len().saturating_sub(20)..].join("\n")
    );
    assert!(all.fps >= 5.0, "too few frames to compare: {all:?}");
    assert!(all.share >= 0.8, "all frames unbounded: {all:?}");
    let (t0, t1, back) = (steps[0].1, steps[1].1, steps[2].1);
    // Chromium: T0 every 4th frame, T1 every 4th (between), T2 every other frame.
    assert!(
        t0.fps > 0.0 && (0.15..=0.35).contains(&t0.share),
        "T0 only must be about a quarter of the frames: {t0:?} vs {all:?}"
    );
    assert!(
        (0.35..=0.65).contains(&t1.share),
        "T0 + T1 must be about half of the frames: {t1:?} vs {all:?}"
    );
    assert!(
        back.share >= 0.8,
        "every frame again with the bound lifted: {back:?} vs {all:?}"
    );
    assert!(
        t0.kbps < all.kbps * 0.8,
        "dropping frames must save bitrate: {t0:?} vs {all:?}"
    );
    // At T0 a frame comes every 133 ms at 30 frames/s: the picture never stops for long.
    for (t, w) in &steps {
        assert!(
            w.longest_still <= Duration::from_millis(700),
            "the picture stood still at temporal {t}: {w:?}"
        );
        assert_eq!(w.height, 135, "still the lowest layer at temporal {t}");
    }
    bob.close().await;
    ann.close().await;
}
