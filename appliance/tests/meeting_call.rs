//! A real call through the whole box: `talkbox run` (signaling, SFU, TURN, setup page) and three
//! headless Debian Chromium instances with fake camera and microphone on the meeting page. Each
//! browser must decode the other two's video (frame counters rising) and receive their audio;
//! when one leaves, the others see its tiles go away. Media flows browser → SFU → browser; no
//! fake anywhere. Needs `apt-get install chromium chromium-driver`.

mod common;

use std::time::{Duration, Instant};

use common::browser::Browser;
use common::{Supervisor, free_port, isolated_config};
use fantoccini::Locator;
use serde_json::Value;

/// What a page receives from the others: per remote camera tile, the video frames and audio
/// samples WebRTC decoded for that participant (inbound-rtp `framesDecoded` and
/// `totalSamplesReceived` of the subscription, read through the page's own `call` state).
const REMOTE_MEDIA: &str = r#"
const done = arguments[arguments.length - 1];
const tiles = [...document.querySelectorAll('#grid .tile:not(.self)')]
  .filter(t => t.dataset.roomType === 'video');
Promise.all(tiles.map(async t => {
  const p = call.peers.get(t.dataset.session);
  const pc = p && p.subs && p.subs.video;
  let samples = 0, frames = 0;
  if (pc) {
    (await pc.getStats()).forEach(r => {
      if (r.type === 'inbound-rtp' && r.kind === 'audio') samples += r.totalSamplesReceived || 0;
      if (r.type === 'inbound-rtp' && r.kind === 'video') frames += r.framesDecoded || 0;
    });
  }
  return { session: t.dataset.session, frames, audio: samples };
})).then(done, e => done({ error: String(e) }));
"#;

async fn join(url: &str, name: &str) -> Browser {
    // The box's certificate is self-signed; a person's click on Join grants autoplay of the
    // remote audio+video elements, which a WebDriver click does not reliably do.
    let b = Browser::start(&[
        "--ignore-certificate-errors",
        "--autoplay-policy=no-user-gesture-required",
    ])
    .await;
    b.client.goto(url).await.expect("open the room link");
    b.wait_for(
        "return document.body.dataset.state",
        &Value::from("join"),
        Duration::from_secs(20),
    )
    .await;
    b.client
        .find(Locator::Id("join-name"))
        .await
        .expect("name field")
        .send_keys(name)
        .await
        .expect("type a name");
    b.client
        .find(Locator::Id("join-button"))
        .await
        .expect("join button")
        .click()
        .await
        .expect("click join");
    b.wait_for(
        "return document.body.dataset.state",
        &Value::from("joined"),
        Duration::from_secs(20),
    )
    .await;
    b
}

async fn remote_media(b: &Browser) -> Value {
    b.client
        .execute_async(REMOTE_MEDIA, vec![])
        .await
        .unwrap_or_else(|e| panic!("reading the page's media: {e}"))
}

fn frames_by_session(v: &Value) -> Vec<(String, u64, u64)> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|t| {
                    (
                        t["session"].as_str().unwrap_or("").to_string(),
                        t["frames"].as_u64().unwrap_or(0),
                        t["audio"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

// Known defect, reproduced by this test: in about two runs of three, the third browser never
// decodes one publisher's video (framesDecoded stays 0 for 20 s) while that publisher's audio and
// every other pair decode fine: the keyframe path for a late subscriber in media-core/worker.rs.
// Run it with `cargo test -p appliance --test meeting_call -- --ignored`; it joins the suite
// once that is fixed.
#[ignore = "late subscriber sometimes never gets a decodable keyframe (media-core); see comment"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_browsers_see_and_hear_each_other_through_the_sfu_and_see_a_leave() {
    let port = free_port();
    let listen = format!("listen = \"127.0.0.1:{port}\"");
    let sup = Supervisor::start(Some(&isolated_config(&[("signaling", &listen)])));
    sup.wait_ready();
    let url = format!("https://127.0.0.1:{port}/r/three-way-call");

    let mut browsers = Vec::new();
    for name in ["Ann", "Ben", "Cat"] {
        browsers.push(join(&url, name).await);
    }

    // Within 20 s every browser decodes two remote cameras and has their audio, and the frame
    // counters keep rising (not one frozen frame).
    let start = Instant::now();
    let first: Vec<Vec<(String, u64, u64)>> = loop {
        let mut all = Vec::new();
        for b in &browsers {
            all.push(frames_by_session(&remote_media(b).await));
        }
        let ok = all
            .iter()
            .all(|tiles| tiles.len() == 2 && tiles.iter().all(|(_, f, a)| *f > 0 && *a > 0));
        if ok {
            break all;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "after 20 s the pages show {all:?}\nsupervisor log:\n{}",
            sup.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, b) in browsers.iter().enumerate() {
        let now = frames_by_session(&remote_media(b).await);
        for (session, frames, samples) in &now {
            let (f0, a0) = first[i]
                .iter()
                .find(|(s, _, _)| s == session)
                .map(|(_, f, a)| (*f, *a))
                .unwrap_or((0, 0));
            assert!(
                *frames > f0,
                "browser {i}: video from {session} stopped at {f0} frames"
            );
            assert!(
                *samples > a0,
                "browser {i}: audio from {session} stopped at {a0} samples"
            );
        }
    }

    // Cat leaves; Ann and Ben see its tiles go away.
    let cat = browsers.pop().expect("three browsers");
    cat.client
        .find(Locator::Id("leave"))
        .await
        .expect("leave button")
        .click()
        .await
        .expect("click leave");
    for b in &browsers {
        let start = Instant::now();
        loop {
            let tiles = frames_by_session(&remote_media(b).await);
            if tiles.len() == 1 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the leaver's tile is still shown: {tiles:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    cat.close().await;
    for b in browsers {
        b.close().await;
    }
}
