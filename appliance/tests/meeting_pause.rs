//! Simulcast layers no subscriber uses are paused at the publisher, and resumed when needed
//! (issue #5): `talkbox run` and a Chromium publisher on the meeting page (three VP8 layers).
//! Alone in the room, its two upper layers must stop (Chromium's own getStats: framesEncoded
//! of `h` and `f` flat while `q` goes on), because the SFU lowers its REMB to what the lowest
//! layer needs (media-core `pause`). When a second participant joins, that participant must
//! see a picture at once (from the layer still on) and the top layer must come back and reach
//! it. Needs `apt-get install chromium chromium-driver`.

mod common;

use std::time::{Duration, Instant};

use common::browser::Browser;
use common::{Supervisor, free_port, isolated_config};
use serde_json::Value;

/// The publisher's layers: [[rid, framesEncoded], …] sorted by rid (f, h, q).
const PUBLISHER_LAYERS: &str = r#"
const done = arguments[arguments.length - 1];
const pc = call.pubs && call.pubs.video;
if (!pc) { done([]); } else {
  pc.getStats().then(st => {
    const out = [];
    st.forEach(r => {
      if (r.type === 'outbound-rtp' && r.kind === 'video') out.push([r.rid || '', r.framesEncoded || 0]);
    });
    out.sort();
    done(out);
  }, e => done(String(e)));
}
"#;

/// The subscriber's first remote camera: [frameHeight, framesDecoded], or null.
const SUBSCRIBER: &str = r#"
const done = arguments[arguments.length - 1];
const t = [...document.querySelectorAll('#grid .tile:not(.self)')].find(x => x.dataset.roomType === 'video');
const p = t && call.peers.get(t.dataset.session);
const pc = p && p.subs && p.subs.video;
if (!pc) { done(null); } else {
  pc.getStats().then(st => {
    let o = null;
    st.forEach(r => { if (r.type === 'inbound-rtp' && r.kind === 'video') o = [r.frameHeight || 0, r.framesDecoded || 0]; });
    done(o);
  }, e => done(null));
}
"#;

/// framesEncoded per rid: (f, h, q).
async fn encoded(b: &Browser) -> (u64, u64, u64) {
    let v = b
        .client
        .execute_async(PUBLISHER_LAYERS, vec![])
        .await
        .expect("publisher stats");
    let get = |rid: &str| {
        v.as_array()
            .and_then(|a| a.iter().find(|x| x[0] == rid))
            .and_then(|x| x[1].as_u64())
            .unwrap_or(0)
    };
    (get("f"), get("h"), get("q"))
}

async fn subscriber(b: &Browser) -> Option<(u64, u64)> {
    let v: Value = b
        .client
        .execute_async(SUBSCRIBER, vec![])
        .await
        .expect("subscriber stats");
    let a = v.as_array()?;
    Some((a[0].as_u64()?, a[1].as_u64()?))
}

/// Waits until over a 3 s window the layers in `on` advance and the others do not; returns
/// the time taken and the last window's advance per layer (f, h, q).
async fn wait_layers(
    b: &Browser,
    on: [bool; 3],
    timeout: Duration,
    what: &str,
) -> (Duration, [u64; 3]) {
    let t0 = Instant::now();
    let mut last = encoded(b).await;
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = encoded(b).await;
        let d = [now.0 - last.0, now.1 - last.1, now.2 - last.2];
        // At 30 fps a layer on advances by ~90 frames in 3 s; off, by none.
        if (0..3).all(|i| (d[i] > 10) == on[i]) {
            return (t0.elapsed(), d);
        }
        assert!(
            t0.elapsed() < timeout,
            "{what}: layers (f, h, q) advanced {d:?} in the last 3 s, wanted on = {on:?}, after {:?}",
            t0.elapsed()
        );
        last = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_layers_pause_at_the_publisher_and_come_back_for_a_subscriber() {
    let port = free_port();
    let listen = format!("listen = \"127.0.0.1:{port}\"");
    let sup = Supervisor::start(Some(&isolated_config(&[("signaling", &listen)])));
    sup.wait_ready();
    let room = format!("https://127.0.0.1:{port}/r/layer-pause");
    let ann = Browser::meeting_participant(&room, "Ann").await;

    // First all three layers run (the SFU knows each layer's rate before pausing any).
    let (t, d) = wait_layers(&ann, [true, true, true], Duration::from_secs(40), "start").await;
    println!("all three layers on after {t:?}: {d:?}");
    // Alone: h and f stop, q goes on.
    let (paused_after, d) = wait_layers(
        &ann,
        [false, false, true],
        Duration::from_secs(40),
        "alone in the room",
    )
    .await;
    println!("alone: h and f paused after {paused_after:?} more (last 3 s: {d:?})");

    // Bob joins: a picture at once from q, then the top layer comes back and reaches him.
    let joined = Instant::now();
    let bob = Browser::meeting_participant(&room, "Bob").await;
    let first = loop {
        if subscriber(&bob).await.is_some_and(|(_, frames)| frames > 0) {
            break joined.elapsed();
        }
        assert!(
            joined.elapsed() < Duration::from_secs(30),
            "Bob saw no picture within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let resumed = Instant::now();
    let (_, d) = wait_layers(
        &ann,
        [true, true, true],
        Duration::from_secs(40),
        "Bob in the room",
    )
    .await;
    let layers_back = resumed.elapsed();
    let top = loop {
        if subscriber(&bob).await.is_some_and(|(h, _)| h == 540) {
            break resumed.elapsed();
        }
        assert!(
            resumed.elapsed() < Duration::from_secs(60),
            "Bob never got the top layer: {:?}",
            subscriber(&bob).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!(
        "Bob: first frame {first:?} after his join began (page load, join, ICE, DTLS included); layers back at the publisher within {layers_back:?} ({d:?}); top layer (540 lines) at Bob {top:?} after his first frame"
    );
    // Bob asks for the lowest layer only (Talk does so for small tiles): nobody may use h and
    // f any more, so they pause again; Bob keeps his picture from q. Asking for the top
    // brings them back.
    let ann_sid = bob.first_remote_session().await;
    bob.select_stream(&ann_sid, 0).await;
    let (bounded, d) = wait_layers(
        &ann,
        [false, false, true],
        Duration::from_secs(40),
        "Bob bounded to the lowest layer",
    )
    .await;
    let at_bob = subscriber(&bob).await;
    assert!(
        at_bob.is_some_and(|(h, _)| h == 135),
        "Bob is not on the lowest layer: {at_bob:?}"
    );
    let before = at_bob.map_or(0, |x| x.1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = subscriber(&bob).await.map_or(0, |x| x.1);
    assert!(after > before, "Bob's picture stopped: {before} -> {after}");
    println!("selectStream 0: h and f paused after {bounded:?} ({d:?})");
    bob.select_stream(&ann_sid, 2).await;
    let back = Instant::now();
    loop {
        if subscriber(&bob).await.is_some_and(|(h, _)| h == 540) {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(60),
            "the top layer did not come back after selectStream 2: {:?} {:?}",
            subscriber(&bob).await,
            encoded(&ann).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "selectStream 2: top layer at Bob after {:?}",
        back.elapsed()
    );
    assert!(
        sup.log()
            .contains("simulcast layers kept on at the publisher changed"),
        "the SFU did not log the pause"
    );
    ann.close().await;
    bob.close().await;
}
