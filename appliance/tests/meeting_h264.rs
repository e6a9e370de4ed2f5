//! H264 simulcast from Chromium through the SFU (issue #5: "three layers for VP8 and H264"):
//! `talkbox run`, a Chromium publisher on the meeting page with `?codec=h264` (Debian's
//! Chromium encodes H264 with OpenH264, three rid layers), and a Chromium subscriber that moves
//! between the layers with Talk's `selectStream` (top → lowest → top). The subscriber must
//! decode H264 at each layer's size, and the picture must not freeze at a switch: the SFU
//! switches only at an H264 keyframe of the new layer (SPS/IDR in Chromium's STAP-A / FU-A
//! packets) and rewrites sequence numbers and timestamps so the decoder sees one stream.
//! Needs `apt-get install chromium chromium-driver`.

mod common;

use std::time::{Duration, Instant};

use common::browser::Browser;
use common::{Supervisor, free_port, isolated_config};

/// Every 250 ms, the subscriber's inbound video: [unix ms, height, framesDecoded, codec].
const SAMPLER: &str = r#"
window.qs = [];
setInterval(async () => {
  const t = [...document.querySelectorAll('#grid .tile:not(.self)')]
    .find(x => x.dataset.roomType === 'video');
  const p = t && call.peers.get(t.dataset.session);
  const pc = p && p.subs && p.subs.video;
  if (!pc) return;
  const now = Date.now();
  const st = await pc.getStats();
  st.forEach(r => {
    if (r.type === 'inbound-rtp' && r.kind === 'video') {
      const c = r.codecId && st.get(r.codecId);
      window.qs.push([now, r.frameHeight || 0, r.framesDecoded || 0, c ? c.mimeType : '']);
    }
  });
}, 250);
return true;
"#;

/// The publisher's layers: [rid, codec, framesEncoded], sorted by rid.
const PUBLISHER_LAYERS: &str = r#"
const done = arguments[arguments.length - 1];
const pc = call.pubs && call.pubs.video;
if (!pc) { done([]); } else {
  pc.getStats().then(st => {
    const out = [];
    st.forEach(r => {
      if (r.type === 'outbound-rtp' && r.kind === 'video') {
        const c = r.codecId && st.get(r.codecId);
        out.push([r.rid || '', c ? c.mimeType : '', r.framesEncoded || 0]);
      }
    });
    out.sort();
    const m = (d) => d ? d.sdp.split('\r\n').filter(l => l.startsWith('m=video')).join(' | ') : '';
    out.push(['sdp', m(pc.localDescription), m(pc.remoteDescription)]);
    done(out);
  }, e => done(String(e)));
}
"#;

/// (unix ms, height, frames decoded, codec) samples so far.
async fn samples(b: &Browser) -> Vec<(u64, u64, u64, String)> {
    let v = b.eval("return window.qs || [];").await;
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s[0].as_f64().unwrap_or(0.0) as u64,
                        s[1].as_u64().unwrap_or(0),
                        s[2].as_u64().unwrap_or(0),
                        s[3].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the subscriber decodes H264 at a height in `heights` (frames still advancing);
/// returns how long it took.
async fn wait_height(
    b: &Browser,
    heights: std::ops::RangeInclusive<u64>,
    timeout: Duration,
    what: &str,
) -> Duration {
    let t0 = Instant::now();
    loop {
        let s = samples(b).await;
        let n = s.len();
        if n >= 3 {
            let last = &s[n - 1];
            if heights.contains(&last.1) && last.3 == "video/H264" && last.2 > s[n - 3].2 {
                return t0.elapsed();
            }
        }
        assert!(
            t0.elapsed() < timeout,
            "{what}: no H264 at a height in {heights:?} within {timeout:?}; last samples: {:?}",
            &s[n.saturating_sub(8)..]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_h264_simulcast_layers_switch_without_a_freeze() {
    let port = free_port();
    let listen = format!("listen = \"127.0.0.1:{port}\"");
    let sup = Supervisor::start(Some(&isolated_config(&[("signaling", &listen)])));
    sup.wait_ready();
    let room = format!("https://127.0.0.1:{port}/r/h264-simulcast");
    let ann = Browser::meeting_participant(&format!("{room}?codec=h264"), "Ann").await;
    let bob = Browser::meeting_participant(&room, "Bob").await;
    bob.eval(SAMPLER).await;

    // Ann sends three H264 layers.
    let t0 = Instant::now();
    let layers = loop {
        let l = ann
            .client
            .execute_async(PUBLISHER_LAYERS, vec![])
            .await
            .expect("publisher stats");
        let ok = l.as_array().is_some_and(|a| {
            a.len() == 4
                && a.iter()
                    .take(3)
                    .all(|x| x[1] == "video/H264" && x[2].as_u64().unwrap_or(0) > 0)
        });
        if ok {
            break l;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "the publisher does not send three H264 layers: {l}\n{}",
            sup.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!("publisher layers (rid, codec, frames): {layers}");

    // Bob decodes the top layer (960x540 from the fake camera) first: loopback carries it.
    let first = wait_height(
        &bob,
        540..=540,
        Duration::from_secs(40),
        "top layer at start",
    )
    .await;
    println!("top layer decoded after {first:?}");
    let ann_sid = bob
        .eval("return document.querySelector('#grid .tile:not(.self)').dataset.session;")
        .await;
    let ann_sid = ann_sid
        .as_str()
        .expect("publisher's session id")
        .to_string();

    let switches_from = samples(&bob).await.len();
    bob.select_stream(&ann_sid, 0).await;
    // A quarter of 540 lines; the H264 encoder makes it even (134).
    let down = wait_height(&bob, 134..=136, Duration::from_secs(20), "lowest layer").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    bob.select_stream(&ann_sid, 2).await;
    let up = wait_height(&bob, 540..=540, Duration::from_secs(30), "top layer again").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("selectStream 0: lowest layer after {down:?}; selectStream 2: top layer after {up:?}");

    // No freeze: frames kept being decoded through both switches (samples every 250 ms).
    let s = samples(&bob).await;
    let s = &s[switches_from.saturating_sub(1)..];
    let mut longest = 0;
    let mut since = s.first().map_or(0, |x| x.0);
    for w in s.windows(2) {
        if w[1].2 > w[0].2 {
            since = w[1].0;
        } else {
            longest = longest.max(w[1].0 - since);
        }
    }
    println!("longest freeze across the switches: {longest} ms");
    assert!(
        s.iter().all(|x| x.3 == "video/H264"),
        "the subscriber left H264: {:?}",
        s.iter().map(|x| &x.3).collect::<Vec<_>>()
    );
    assert!(
        longest <= 1000,
        "the picture froze {longest} ms at a switch; samples: {s:?}"
    );
    ann.close().await;
    bob.close().await;
}
