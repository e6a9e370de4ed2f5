//! Issue #5 through `/proxy`, with a webrtc-rs publisher (an independent WebRTC stack) and the
//! real `talkbox sfu`: the `bitrate` of create-publisher comes back as `b=AS` on the answer's
//! video section, and audio whose level extension goes loud then quiet makes the SFU send
//! `speaking` then `stopped-speaking` for that publisher, within the hysteresis bounds.

mod sfu_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sfu_common::*;
use webrtc::media_stream::track_local::TrackLocal;

/// The m=video section of an SDP.
fn video_section(sdp: &str) -> &str {
    let start = sdp.find("m=video").expect("video section");
    let rest = &sdp[start..];
    let end = rest[1..].find("\nm=").map_or(rest.len(), |e| e + 1);
    &rest[..end]
}

/// An Opus packet with the audio-level extension at `dbov` (id `ext`).
fn leveled_audio(i: u32, ext: u8, dbov: u8) -> rtc::rtp::Packet {
    let mut p = audio_packet(i);
    p.header.extension = true;
    p.header.extension_profile = 0xBEDE;
    // RFC 6464: voice-activity bit, then the level in -dBov.
    let v = if dbov < 60 { 0x80 } else { 0 };
    p.header
        .set_extension(ext, bytes::Bytes::from(vec![v | dbov.min(127)]))
        .expect("set extension");
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_publisher_gets_b_as_and_its_speaking_reaches_the_proxy_client_within_the_hysteresis()
 {
    let sfu = SfuProcess::start(30);
    let mut proxy = ProxyClient::hello(&sfu).await;
    let r = proxy
        .command(json!({"type":"create-publisher","streamType":"video",
            "publisherSettings":{"bitrate":300000,"mediatypes":3}}))
        .await;
    assert_eq!(r["command"]["bitrate"], 300000, "{r}");
    let publisher_id = r["command"]["id"].as_str().expect("id").to_string();

    let mut publisher = Peer::with_audio_level().await;
    let audio = opus_track();
    let video = vp8_track();
    publisher
        .pc
        .add_track(audio.clone() as Arc<dyn TrackLocal>)
        .await
        .expect("add audio");
    publisher
        .pc
        .add_track(video.clone() as Arc<dyn TrackLocal>)
        .await
        .expect("add video");
    let offer = publisher.offer().await;
    let ext = audio_level_ext_id(&offer).expect("the publisher offers the audio-level extension");
    let r = proxy
        .payload("offer", &publisher_id, json!({"type":"offer","sdp": offer}))
        .await;
    let answer = r["payload"]["payload"]["sdp"]
        .as_str()
        .unwrap_or_else(|| panic!("answer: {r}"))
        .to_string();
    assert!(
        video_section(&answer).contains("\nb=AS:300\r"),
        "the answer's video section carries the cap:\n{answer}"
    );
    assert_eq!(
        audio_level_ext_id(&answer),
        Some(ext),
        "the SFU accepts the audio-level extension:\n{answer}"
    );
    publisher.accept_answer(&answer).await;
    publisher
        .wait("publisher connected", Duration::from_secs(15), |s| {
            s.connected
        })
        .await;

    // 1 s of room noise (100 dBov), 1.5 s of speech (30 dBov), 2.5 s quiet again; an Opus
    // packet every 20 ms. Events are timed from the change of level.
    let phases = [(1000u64, 100u8), (1500, 30), (2500, 100)];
    let mut seen: Vec<(usize, Duration, String)> = Vec::new();
    let mut i = 0u32;
    for (phase, (len, level)) in phases.iter().enumerate() {
        let start = Instant::now();
        let mut next = start;
        while start.elapsed() < Duration::from_millis(*len) {
            audio
                .write_rtp(leveled_audio(i, ext, *level))
                .await
                .expect("write audio");
            i += 1;
            next += Duration::from_millis(20);
            // Read proxy events until the next packet is due.
            while let Some(left) = next.checked_duration_since(Instant::now()) {
                let Some(m) = proxy.recv(left).await else {
                    break;
                };
                let kind = m["event"]["type"].as_str().unwrap_or_default().to_string();
                if m["type"] == "event" && kind.contains("speaking") {
                    assert_eq!(m["event"]["clientId"], publisher_id.as_str(), "{m}");
                    seen.push((phase, start.elapsed(), kind));
                }
            }
        }
    }
    let order: Vec<(usize, &str)> = seen.iter().map(|(p, _, k)| (*p, k.as_str())).collect();
    assert_eq!(
        order,
        vec![(1, "speaking"), (2, "stopped-speaking")],
        "events: {seen:?}\n{}",
        sfu.log()
    );
    let (on, off) = (seen[0].1, seen[1].1);
    eprintln!("speaking {on:?} after the level rose, stopped {off:?} after it fell");
    // Lower bounds are the hysteresis; upper bounds leave room for a loaded machine.
    assert!(
        (Duration::from_millis(240)..=Duration::from_millis(800)).contains(&on),
        "speaking {on:?} after the level rose (hysteresis 250 ms)"
    );
    assert!(
        (Duration::from_millis(980)..=Duration::from_millis(1800)).contains(&off),
        "stopped {off:?} after the level fell (hysteresis 1 s)"
    );
}
