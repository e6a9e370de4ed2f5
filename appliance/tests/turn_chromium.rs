//! A real WebRTC client through our TURN: two Chromium peer connections in one page, both with
//! `iceTransportPolicy: "relay"` and only `talkbox turn` as ICE server, exchange a data channel
//! message and fake-camera video (until the SFU lands, this is the call).

mod common;

use std::time::Duration;

use common::TurnProcess;
use common::browser::{Browser, serve_page};

const PAGE: &str = r#"<!doctype html>
<html><head><title>turn relay test</title></head><body><video id="v" autoplay muted playsinline></video>
<script>
window.result = null;
const cfg = { iceServers: [{ urls: "turn:127.0.0.1:__PORT__?transport=udp", username: "__USER__", credential: "__PASS__" }],
              iceTransportPolicy: "relay" };
async function pairOf(pc) {
  const stats = await pc.getStats();
  let sel = null;
  stats.forEach(s => { if (s.type === "transport" && s.selectedCandidatePairId) sel = stats.get(s.selectedCandidatePairId); });
  if (!sel) return null;
  const l = stats.get(sel.localCandidateId), r = stats.get(sel.remoteCandidateId);
  return { state: sel.state, local: l.candidateType, remote: r.candidateType,
           localAddr: l.address + ":" + l.port, remoteAddr: r.address + ":" + r.port, relayProtocol: l.relayProtocol || null };
}
async function main() {
  const pc1 = new RTCPeerConnection(cfg), pc2 = new RTCPeerConnection(cfg);
  const cands = { pc1: [], pc2: [] };
  pc1.onicecandidate = e => { if (e.candidate) { cands.pc1.push(e.candidate.candidate); pc2.addIceCandidate(e.candidate); } };
  pc2.onicecandidate = e => { if (e.candidate) { cands.pc2.push(e.candidate.candidate); pc1.addIceCandidate(e.candidate); } };
  const stream = await navigator.mediaDevices.getUserMedia({ video: { width: 320, height: 240 }, audio: false });
  stream.getTracks().forEach(t => pc1.addTrack(t, stream));
  const dc = pc1.createDataChannel("chat");
  let message = null;
  pc2.ondatachannel = e => { e.channel.onmessage = m => { message = m.data; }; };
  dc.onopen = () => dc.send("hello through talkbox turn");
  pc2.ontrack = e => { document.getElementById("v").srcObject = e.streams[0]; };
  const offer = await pc1.createOffer();
  await pc1.setLocalDescription(offer);
  await pc2.setRemoteDescription(offer);
  const answer = await pc2.createAnswer();
  await pc2.setLocalDescription(answer);
  await pc1.setRemoteDescription(answer);
  const t0 = Date.now();
  while (Date.now() - t0 < 40000) {
    await new Promise(r => setTimeout(r, 500));
    const stats = await pc2.getStats();
    let frames = 0;
    stats.forEach(s => { if (s.type === "inbound-rtp" && s.kind === "video") frames = s.framesDecoded || 0; });
    const progress = { frames, message, pair1: await pairOf(pc1), pair2: await pairOf(pc2),
                       ice1: pc1.iceConnectionState, ice2: pc2.iceConnectionState, cands, ms: Date.now() - t0 };
    window.progress = progress;
    if (frames >= 30 && message && progress.pair1 && progress.pair2) { window.result = Object.assign({ ok: true }, progress); return; }
  }
  window.result = Object.assign({ ok: false }, window.progress);
}
main().catch(e => { window.result = { ok: false, error: String(e), progress: window.progress }; });
</script></body></html>"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_peers_relayed_only_through_our_turn_exchange_data_and_video() {
    let turn = TurnProcess::start("allowed_peers = [\"127.0.0.0/8\", \"::1/128\"]");
    let (user, pass) = turn.credentials("chromium-test");
    let html = PAGE
        .replace("__PORT__", &turn.port.to_string())
        .replace("__USER__", &user)
        .replace("__PASS__", &pass);
    let url = serve_page(html);
    let browser = Browser::start(&[]).await;
    browser.client.goto(&url).await.expect("open the test page");
    let result = browser
        .wait_until_set("window.result", Duration::from_secs(60))
        .await;
    let metrics = turn.metrics();
    browser.close().await;
    let result = result.unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", turn.log()));
    assert_eq!(
        result["ok"], true,
        "call through TURN failed: {result:#}\nmetrics:\n{metrics}"
    );
    for pair in ["pair1", "pair2"] {
        assert_eq!(result[pair]["local"], "relay", "{pair}: {result:#}");
        assert_eq!(result[pair]["remote"], "relay", "{pair}: {result:#}");
        assert_eq!(result[pair]["relayProtocol"], "udp", "{pair}: {result:#}");
    }
    assert_eq!(result["message"], "hello through talkbox turn");
    assert!(result["frames"].as_u64().unwrap_or(0) >= 30, "{result:#}");
    // The media really went through our relay.
    let packets = metrics
        .lines()
        .find(|l| l.starts_with("talkbox_turn_relayed_packets_total{direction=\"to_client\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(
        packets > 100,
        "too few relayed packets ({packets}):\n{metrics}"
    );
    eprintln!("chromium through talkbox turn: {result}");
}
