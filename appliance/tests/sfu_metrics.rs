//! The SFU's Prometheus `/metrics` on `sfu.listen`, scraped from a real `talkbox sfu` while
//! webrtc-rs peers (an independent WebRTC stack) publish and subscribe through it: the
//! forwarding counters follow what the subscriber received, the session gauges follow the
//! proxy commands, the egress budget is the one sizing computed, and only the addresses in
//! `sfu.metrics_allowed_ips` may read it (a peer connecting from 127.0.0.2 is refused with
//! 403 by default, and admitted when listed).

mod sfu_common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::json;
use sfu_common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use webrtc::media_stream::track_local::TrackLocal;

/// Most bytes of a scrape read (one worker's metrics are a few KiB).
const MAX_RESPONSE: u64 = 1 << 20;

/// An HTTP response: status, content type, body.
struct Response {
    status: u16,
    content_type: String,
    body: String,
}

/// `GET /metrics` from source address `from` (a loopback address of this host).
async fn get_metrics(sfu: &SfuProcess, from: Ipv4Addr) -> Response {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(IpAddr::V4(from), 0))
        .unwrap_or_else(|e| panic!("binding the client to {from}: {e}"));
    let mut stream = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], sfu.control)))
        .await
        .expect("connect to sfu.listen");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .expect("send request");
    let mut raw = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(20),
        (&mut stream).take(MAX_RESPONSE).read_to_end(&mut raw),
    )
    .await
    .expect("response in time")
    .expect("read response");
    let text = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("header end");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line: {head}"));
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    Response {
        status,
        content_type,
        body: body.to_string(),
    }
}

/// The samples of a text exposition: `name{labels}` (as written) to value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Scrapes from 127.0.0.1 (allowed by default).
async fn scrape(sfu: &SfuProcess) -> HashMap<String, f64> {
    let r = get_metrics(sfu, Ipv4Addr::LOCALHOST).await;
    assert_eq!(r.status, 200, "{}", r.body);
    samples(&r.body)
}

fn value(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("{key} missing in the scrape: {m:?}"))
}

/// Scrapes until `pred` holds or `limit` passes; returns the last scrape.
async fn scrape_until(
    sfu: &SfuProcess,
    limit: Duration,
    pred: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    let end = Instant::now() + limit;
    loop {
        let m = scrape(sfu).await;
        if pred(&m) || Instant::now() >= end {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

const RTP: &str = "talkbox_sfu_rtp_forwarded_total{worker=\"0\"}";
const MESSAGES: &str = "talkbox_sfu_channel_messages_forwarded_total{worker=\"0\"}";
const PUBLISHERS: &str = "talkbox_sfu_sessions{worker=\"0\",role=\"publisher\"}";
const SUBSCRIBERS: &str = "talkbox_sfu_sessions{worker=\"0\",role=\"subscriber\"}";
const BUDGET: &str = "talkbox_sfu_egress_budget_bits_per_second{worker=\"0\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_forwarded_media_and_sessions_of_a_real_call_and_refuse_unlisted_peers() {
    // A declared uplink gives sizing a budget whatever the NICs report.
    let sfu = SfuProcess::start_with_config(30, 30, "", "[sizing]\nuplink_mbps = 50\n");

    // Refused: 127.0.0.2 is loopback but not in the default list.
    let r = get_metrics(&sfu, Ipv4Addr::new(127, 0, 0, 2)).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        r.body.contains("127.0.0.2") && r.body.contains("sfu.metrics_allowed_ips"),
        "the refusal says who and which key: {}",
        r.body
    );
    assert!(
        !r.body.contains("talkbox_sfu_"),
        "no metrics in a refusal: {}",
        r.body
    );

    let r = get_metrics(&sfu, Ipv4Addr::LOCALHOST).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.content_type, "text/plain; version=0.0.4; charset=utf-8");
    for help in [
        "# HELP talkbox_sfu_rtp_forwarded ",
        "# TYPE talkbox_sfu_rtp_forwarded counter",
        "# HELP talkbox_sfu_sessions ",
        "# TYPE talkbox_sfu_sessions gauge",
        "# HELP talkbox_sfu_paused_layers ",
    ] {
        assert!(r.body.contains(help), "{help} missing:\n{}", r.body);
    }
    let before = samples(&r.body);
    assert_eq!(value(&before, "talkbox_sfu_worker_up{worker=\"0\"}"), 1.0);
    assert_eq!(value(&before, RTP), 0.0, "nothing forwarded yet");
    assert_eq!(value(&before, PUBLISHERS), 0.0);
    assert_eq!(value(&before, SUBSCRIBERS), 0.0);

    // A real call: numbered video, audio and data-channel messages for a while.
    let mut proxy = ProxyClient::hello(&sfu).await;
    let call = establish_call(&mut proxy).await;
    let start = Instant::now();
    let mut i = 0u32;
    while start.elapsed() < Duration::from_secs(20) {
        call.track
            .write_rtp(numbered_packet(i))
            .await
            .expect("write rtp");
        call.audio
            .write_rtp(audio_packet(i))
            .await
            .expect("write audio rtp");
        if i.is_multiple_of(10) {
            let _ = call.channel.send_text(r#"{"type":"speaking"}"#).await;
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
        let s = call.subscriber.seen.lock().expect("lock");
        if s.rtp.len() >= 200 && s.audio.len() >= 100 && s.messages.len() >= 5 {
            break;
        }
    }
    // Let the last packets land, then take what the subscriber got.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (video, audio, messages) = {
        let s = call.subscriber.seen.lock().expect("lock");
        (s.rtp.len(), s.audio.len(), s.messages.len())
    };
    assert!(
        video >= 200 && audio >= 100 && messages >= 5,
        "the call carried too little: {video} video, {audio} audio, {messages} messages of {i} sent\n{}",
        sfu.log()
    );

    let m = scrape_until(&sfu, Duration::from_secs(20), |m| m.contains_key(BUDGET)).await;
    // What sizing computed (it writes its state before handing the budget to the workers).
    let budget_bps = std::fs::read_to_string(sfu.dir.path().join("sizing/state.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["budget_bps"].as_f64());
    let forwarded = value(&m, RTP);
    eprintln!(
        "forwarded {forwarded} RTP packets, subscriber got {video} video + {audio} audio; {} messages forwarded, {messages} received; budget {:?}",
        value(&m, MESSAGES),
        m.get(BUDGET)
    );
    // Every packet the subscriber got was forwarded (padding is not counted, duplicates are
    // left out of `video`), so the counter is at least that.
    assert!(
        forwarded >= (video + audio) as f64,
        "rtp_forwarded {forwarded} < {video} video + {audio} audio received"
    );
    assert!(value(&m, MESSAGES) >= messages as f64, "{m:?}");
    assert!(
        value(&m, "talkbox_sfu_datagrams_received_total{worker=\"0\"}") > 0.0,
        "{m:?}"
    );
    assert!(
        value(&m, "talkbox_sfu_datagrams_sent_total{worker=\"0\"}") >= forwarded,
        "every forwarded packet left in a datagram: {m:?}"
    );
    assert_eq!(value(&m, PUBLISHERS), 1.0);
    assert_eq!(value(&m, SUBSCRIBERS), 1.0);
    assert_eq!(value(&m, "talkbox_sfu_load"), 2.0);
    assert_eq!(
        value(&m, "talkbox_sfu_proxy_sessions{state=\"attached\"}"),
        1.0
    );
    // One simulcast-less publisher: nothing to pause, no layer switch beyond the first.
    assert_eq!(value(&m, "talkbox_sfu_paused_layers{worker=\"0\"}"), 0.0);
    assert_eq!(
        value(&m, "talkbox_sfu_session_panics_total{worker=\"0\"}"),
        0.0
    );
    // The budget the worker plans with is sizing's (one worker: all of it).
    let budget_bps = budget_bps.expect("sizing wrote its state with a budget");
    assert!(budget_bps > 0.0 && budget_bps <= 40e6, "{budget_bps}");
    assert_eq!(value(&m, BUDGET), budget_bps, "{m:?}");

    // The subscriber leaves: the gauge follows, the counters stay.
    let r = proxy
        .command(json!({"type":"delete-subscriber","clientId": call.subscriber_id}))
        .await;
    assert_eq!(r["type"], "command", "{r}");
    let m = scrape_until(&sfu, Duration::from_secs(10), |m| {
        m.get(SUBSCRIBERS) == Some(&0.0)
    })
    .await;
    assert_eq!(value(&m, SUBSCRIBERS), 0.0, "{m:?}");
    assert_eq!(value(&m, PUBLISHERS), 1.0);
    assert!(value(&m, RTP) >= forwarded, "counters never go back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_allowed_ips_admits_the_listed_address_and_refuses_the_others() {
    let sfu = SfuProcess::start_with_config(30, 30, "metrics_allowed_ips = [\"127.0.0.2\"]", "");
    let r = get_metrics(&sfu, Ipv4Addr::new(127, 0, 0, 2)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.contains("talkbox_sfu_worker_up{worker=\"0\"} 1"),
        "{}",
        r.body
    );
    let r = get_metrics(&sfu, Ipv4Addr::LOCALHOST).await;
    assert_eq!(
        r.status, 403,
        "127.0.0.1 is not listed any more: {}",
        r.body
    );
}
