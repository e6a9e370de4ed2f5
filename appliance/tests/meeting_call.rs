//! A real call through the whole box: `talkbox run` (signaling, SFU, TURN, setup page) and three
//! headless Debian Chromium instances with fake camera and microphone on the meeting page. Each
//! browser must decode the other two's video (frame counters rising) and receive their audio;
//! one shares its screen (Chromium's fake desktop capture, picked without a dialog under
//! `--use-fake-ui-for-media-stream`) and the two others decode it as its own "screen" stream;
//! when one leaves, the others see its tiles go away. Media flows browser → SFU → browser; no
//! fake anywhere. Needs `apt-get install chromium chromium-driver`.

mod common;

use std::time::{Duration, Instant};

use common::browser::Browser;
use common::{Supervisor, free_port, isolated_config};
use fantoccini::Locator;
use serde_json::Value;

/// What a page receives from the others: per remote tile (camera or screen), the video frames
/// and audio samples WebRTC decoded for that participant (inbound-rtp `framesDecoded` and
/// `totalSamplesReceived` of the subscription, read through the page's own `call` state), and
/// the receive counters that tell a missing keyframe from missing packets when a check fails.
const REMOTE_MEDIA: &str = r#"
const done = arguments[arguments.length - 1];
const tiles = [...document.querySelectorAll('#grid .tile:not(.self)')];
Promise.all(tiles.map(async t => {
  const p = call.peers.get(t.dataset.session);
  const pc = p && p.subs && p.subs[t.dataset.roomType];
  let samples = 0, frames = 0;
  const diag = {};
  if (pc) {
    diag.state = pc.connectionState;
    (await pc.getStats()).forEach(r => {
      if (r.type === 'inbound-rtp' && r.kind === 'audio') samples += r.totalSamplesReceived || 0;
      if (r.type === 'inbound-rtp' && r.kind === 'video') {
        frames += r.framesDecoded || 0;
        diag.packets = r.packetsReceived; diag.lost = r.packetsLost; diag.key = r.keyFramesDecoded;
        diag.pli = r.pliCount; diag.fir = r.firCount; diag.nack = r.nackCount;
        diag.received = r.framesReceived; diag.dropped = r.framesDropped; diag.ssrc = r.ssrc;
      }
    });
  }
  return { session: t.dataset.session, roomType: t.dataset.roomType, frames, audio: samples, diag };
})).then(done, e => done({ error: String(e) }));
"#;

async fn remote_media(b: &Browser) -> Value {
    b.client
        .execute_async(REMOTE_MEDIA, vec![])
        .await
        .unwrap_or_else(|e| panic!("reading the page's media: {e}"))
}

/// One remote tile as the page reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tile {
    session: String,
    room_type: String,
    frames: u64,
    audio: u64,
}

fn tiles(v: &Value) -> Vec<Tile> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|t| Tile {
                    session: t["session"].as_str().unwrap_or("").to_string(),
                    room_type: t["roomType"].as_str().unwrap_or("").to_string(),
                    frames: t["frames"].as_u64().unwrap_or(0),
                    audio: t["audio"].as_u64().unwrap_or(0),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Polls every browser's remote tiles until `ok` holds for all of them (returning the tiles)
/// or `limit` passes (failing with the pages' counters and the box's log).
async fn wait_media(
    browsers: &[&Browser],
    sup: &Supervisor,
    limit: Duration,
    what: &str,
    ok: impl Fn(usize, &[Tile]) -> bool,
) -> Vec<Vec<Tile>> {
    let start = Instant::now();
    loop {
        let mut all = Vec::new();
        let mut raw = Vec::new();
        for b in browsers {
            let v = remote_media(b).await;
            all.push(tiles(&v));
            raw.push(v);
        }
        if all.iter().enumerate().all(|(i, t)| ok(i, t)) {
            return all;
        }
        if start.elapsed() >= limit {
            let mut notes = Vec::new();
            for b in browsers {
                notes.push(b.eval("return call.notes").await);
            }
            panic!(
                "{what}: not after {limit:?}; the pages show {:#}\nthe pages noted {:#}\n\
                 supervisor log:\n{}",
                Value::Array(raw),
                Value::Array(notes),
                sup.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether every tile of `before` that `pick` selects has more frames (and, for cameras, more
/// audio) in `now`: the media keeps flowing, it is not one frozen frame.
fn rising(before: &[Tile], now: &[Tile], pick: impl Fn(&Tile) -> bool) -> bool {
    before.iter().filter(|t| pick(t)).all(|t0| {
        now.iter().any(|t1| {
            t1.session == t0.session
                && t1.room_type == t0.room_type
                && t1.frames > t0.frames
                && (t0.room_type != "video" || t1.audio > t0.audio)
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_browsers_see_and_hear_each_other_share_a_screen_and_see_a_leave() {
    let port = free_port();
    let listen = format!("listen = \"127.0.0.1:{port}\"");
    let sup = Supervisor::start(Some(&isolated_config(&[("signaling", &listen)])));
    sup.wait_ready();
    let url = format!("https://127.0.0.1:{port}/r/three-way-call");

    let mut browsers = Vec::new();
    for name in ["Ann", "Ben", "Cat"] {
        browsers.push(Browser::meeting_participant(&url, name).await);
    }
    let mut sids = Vec::new();
    for b in &browsers {
        sids.push(
            b.eval("return call.me")
                .await
                .as_str()
                .unwrap_or("")
                .to_string(),
        );
    }
    let all: Vec<&Browser> = browsers.iter().collect();
    let cameras = |t: &Tile| t.room_type == "video";

    // Within 20 s every browser decodes two remote cameras and has their audio, and the frame
    // counters keep rising.
    let first = wait_media(
        &all,
        &sup,
        Duration::from_secs(20),
        "every browser decodes the two other cameras and hears them",
        |_, t| {
            let cams: Vec<&Tile> = t.iter().filter(|t| cameras(t)).collect();
            cams.len() == 2 && cams.iter().all(|t| t.frames > 0 && t.audio > 0)
        },
    )
    .await;
    wait_media(
        &all,
        &sup,
        Duration::from_secs(10),
        "the cameras' frames and audio keep rising",
        |i, t| rising(&first[i], t, cameras),
    )
    .await;

    // Ann shares her screen from the page's button; Ben and Cat get it as a second stream of
    // hers ("screen") and decode it, and keep decoding it.
    browsers[0]
        .client
        .find(Locator::Id("toggle-screen"))
        .await
        .expect("share button")
        .click()
        .await
        .expect("click share");
    browsers[0]
        .wait_for(
            "return document.body.dataset.answered || ''",
            &Value::from("screen"),
            Duration::from_secs(20),
        )
        .await;
    let ann = sids[0].clone();
    let screen_of_ann = |t: &Tile| t.room_type == "screen" && t.session == ann;
    let first = wait_media(
        &all,
        &sup,
        Duration::from_secs(20),
        "Ben and Cat decode Ann's screen",
        |i, t| i == 0 || t.iter().any(|t| screen_of_ann(t) && t.frames > 0),
    )
    .await;
    let later = wait_media(
        &all,
        &sup,
        Duration::from_secs(10),
        "the screen's frames keep rising",
        |i, t| rising(&first[i], t, |t| t.room_type == "screen"),
    )
    .await;
    assert!(
        later[0].iter().all(|t| t.room_type == "video"),
        "Ann sees no remote screen: {:?}",
        later[0]
    );

    // Cat leaves; Ann and Ben see its tiles go away, and keep theirs.
    let cat = browsers.pop().expect("three browsers");
    cat.client
        .find(Locator::Id("leave"))
        .await
        .expect("leave button")
        .click()
        .await
        .expect("click leave");
    let gone = sids[2].clone();
    let left: Vec<&Browser> = browsers.iter().collect();
    wait_media(
        &left,
        &sup,
        Duration::from_secs(10),
        "the leaver's tiles go away",
        |i, t| !t.iter().any(|t| t.session == gone) && t.len() == if i == 0 { 1 } else { 2 },
    )
    .await;
    cat.close().await;
    for b in browsers {
        b.close().await;
    }
}
