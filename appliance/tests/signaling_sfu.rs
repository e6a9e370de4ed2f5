//! The SFU client of `talkbox signaling` against a fake SFU speaking the proxy protocol: RS256
//! hello, `mcu` features only while connected, Talk clients' publish / subscribe / trickle /
//! simulcast messages turned into proxy commands and payloads, answers and offers routed back,
//! publish permissions enforced, and reconnection.

mod signaling_common;

use std::time::Duration;

use serde_json::{Value, json};
use signaling_common::fake_proxy::*;
use signaling_common::*;

const OFFER_SDP: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendrecv\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendrecv\r\n";

async fn setup() -> (FakeTalk, FakeProxy, Signaling) {
    let talk = start_fake_talk(String::new()).await;
    let proxy = start_fake_proxy().await;
    let sig = start_signaling(&talk.base(), &format!("sfu_url = \"{}\"", proxy.url())).await;
    let (_, public) = appliance::secrets::proxy_token_keys(&sig.data).expect("proxy key");
    *proxy.state.public_key.lock().expect("lock") = Some(public);
    (talk, proxy, sig)
}

fn has_mcu(welcome: &Value) -> bool {
    welcome["welcome"]["features"]
        .as_array()
        .is_some_and(|f| f.contains(&json!("mcu")) && f.contains(&json!("simulcast")))
}

/// Connects until the welcome lists the SFU features (or not), 20 s at most.
async fn welcome_with_mcu(sig: &Signaling, want: bool) {
    for _ in 0..200 {
        let c = Client::connect(&sig.ws_url()).await;
        if has_mcu(&c.welcome) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the welcome never had mcu = {want}");
}

async fn in_room(sig: &Signaling, talk: &FakeTalk, user: &str) -> (Client, String) {
    let (mut c, h) = Client::hello_v1(&sig.ws_url(), &talk.auth_url(), user).await;
    c.join("room1", &format!("talk-{user}")).await;
    (
        c,
        h["hello"]["sessionid"].as_str().expect("sid").to_string(),
    )
}

async fn recv_data(c: &mut Client, kind: &str) -> Value {
    for _ in 0..20 {
        let m = c.recv().await;
        if m["type"] == "message" && m["message"]["data"]["type"] == kind {
            return m["message"].clone();
        }
        if m["type"] == "error" {
            panic!("error instead of {kind}: {m}");
        }
    }
    panic!("no {kind} message");
}

fn msg(to: &str, data: Value) -> Value {
    json!({"id":"m","type":"message","message":{"recipient":{"type":"session","sessionid":to},"data":data}})
}

#[tokio::test]
async fn talk_clients_publish_and_subscribe_through_the_proxy_protocol() {
    let (talk, proxy, sig) = setup().await;
    welcome_with_mcu(&sig, true).await;
    let claims = proxy.state.hellos.lock().expect("lock")[0].clone();
    assert_eq!(claims["iss"], "talkbox-signaling");
    assert!(claims["exp"].as_i64() > claims["iat"].as_i64(), "{claims}");

    let (mut alice, alice_sid) = in_room(&sig, &talk, "alice").await;
    let (mut bob, bob_sid) = in_room(&sig, &talk, "bob").await;
    let body = json!({"type":"incall","incall":{"incall":7,"changed":[{"sessionId":"talk-alice","inCall":7},{"sessionId":"talk-bob","inCall":7}],"users":[{"sessionId":"talk-alice","inCall":7},{"sessionId":"talk-bob","inCall":7}]}});
    let (status, _, _) = backend_post(sig.http, "room1", &body, TALK_SECRET, None).await;
    assert_eq!(status, 200);

    // Publish: an offer to one's own session becomes create-publisher + payload offer.
    alice
        .send(msg(&alice_sid, json!({"to":alice_sid,"type":"offer","sid":"s-1","roomType":"video","bitrate":5_000_000,"videocodec":"vp8",
            "payload":{"type":"offer","sdp":OFFER_SDP,"nick":"Alice"}})))
        .await;
    let answer = recv_data(&mut alice, "answer").await;
    assert_eq!(answer["sender"]["sessionid"], alice_sid.as_str());
    assert_eq!(answer["data"]["from"], alice_sid.as_str());
    assert_eq!(answer["data"]["roomType"], "video");
    assert_eq!(answer["data"]["sid"], "s-1");
    assert_eq!(answer["data"]["payload"]["sdp"], FAKE_ANSWER_SDP);
    let create = proxy.wait_for("command", "create-publisher").await;
    assert_eq!(create["command"]["streamType"], "video");
    assert_eq!(create["command"]["mediatypes"], 3, "audio and video");
    assert_eq!(
        create["command"]["bitrate"], 1_048_576,
        "capped at the backend's maximum"
    );
    assert_eq!(create["command"]["publisherSettings"]["videocodec"], "vp8");
    let offer = proxy.wait_for("payload", "offer").await;
    assert_eq!(offer["payload"]["clientId"], "pub-1");
    assert_eq!(offer["payload"]["payload"]["sdp"], OFFER_SDP);
    // The SFU's trickled candidate reaches the publisher, from itself.
    let cand = recv_data(&mut alice, "candidate").await;
    assert_eq!(
        cand["data"]["payload"]["candidate"]["candidate"],
        FAKE_CANDIDATE
    );
    alice
        .send(msg(&alice_sid, json!({"to":alice_sid,"type":"candidate","sid":"s-1","roomType":"video",
            "payload":{"candidate":{"candidate":"candidate:2 1 udp 1 127.0.0.1 5000 typ host","sdpMLineIndex":0,"sdpMid":"0"}}})))
        .await;
    let c = proxy.wait_for("payload", "candidate").await;
    assert_eq!(c["payload"]["clientId"], "pub-1");

    // Subscribe: requestoffer to the publisher gives an SFU offer that seems to come from it.
    bob.send(msg(
        &alice_sid,
        json!({"type":"requestoffer","roomType":"video"}),
    ))
    .await;
    let offer = recv_data(&mut bob, "offer").await;
    assert_eq!(offer["sender"]["sessionid"], alice_sid.as_str());
    assert_eq!(offer["data"]["from"], alice_sid.as_str());
    assert_eq!(offer["data"]["to"], bob_sid.as_str());
    assert_eq!(offer["data"]["payload"]["sdp"], FAKE_OFFER_SDP);
    let sub_sid = offer["data"]["sid"].as_str().expect("sid").to_string();
    assert_eq!(sub_sid, "sub-2-sid");
    let create = proxy.wait_for("command", "create-subscriber").await;
    assert_eq!(create["command"]["publisherId"], "pub-1");
    bob.send(msg(&alice_sid, json!({"to":alice_sid,"type":"answer","sid":sub_sid,"roomType":"video","payload":{"type":"answer","sdp":"v=0 bob"}})))
        .await;
    let a = proxy.wait_for("payload", "answer").await;
    assert_eq!(a["payload"]["clientId"], "sub-2");
    bob.send(msg(&alice_sid, json!({"type":"selectStream","roomType":"video","sid":sub_sid,"payload":{"substream":1,"temporal":0}})))
        .await;
    let s = proxy.wait_for("payload", "selectStream").await;
    assert_eq!(s["payload"]["payload"], json!({"substream":1,"temporal":0}));
    bob.send(msg(
        &alice_sid,
        json!({"type":"endOfCandidates","roomType":"video","sid":sub_sid}),
    ))
    .await;
    proxy.wait_for("payload", "endOfCandidates").await;

    // Screen share needs publish-screen, which alice lacks.
    alice
        .send(msg(&alice_sid, json!({"type":"offer","roomType":"screen","sid":"s-2","payload":{"type":"offer","sdp":OFFER_SDP}})))
        .await;
    let e = alice.recv_type("error").await;
    assert_eq!(e["error"]["code"], "not_allowed", "{e}");

    // The SFU closes the publisher: its candidates have nowhere to go.
    proxy.push(json!({"type":"event","event":{"type":"publisher-closed","clientId":"pub-1"}}));
    tokio::time::sleep(Duration::from_millis(300)).await;
    alice
        .send(msg(&alice_sid, json!({"type":"candidate","roomType":"video","sid":"s-1","payload":{"candidate":{"candidate":""}}})))
        .await;
    let e = alice.recv_type("error").await;
    assert_eq!(e["error"]["code"], "client_not_found", "{e}");

    // Talk takes alice's publish permissions away: her publisher on the SFU is closed.
    alice
        .send(msg(&alice_sid, json!({"type":"offer","roomType":"video","sid":"s-3","payload":{"type":"offer","sdp":OFFER_SDP}})))
        .await;
    recv_data(&mut alice, "answer").await;
    let republished = proxy.received_of("command", "create-publisher").len();
    assert_eq!(
        republished, 2,
        "a new publisher after the SFU closed the first"
    );
    let body = json!({"type":"participants","participants":{"changed":[{"sessionId":"talk-alice","inCall":7,"permissions":[]}],"users":[]}});
    let (status, _, _) = backend_post(sig.http, "room1", &body, TALK_SECRET, None).await;
    assert_eq!(status, 200);
    let d = proxy.wait_for("command", "delete-publisher").await;
    assert_eq!(d["command"]["clientId"], "pub-3");

    proxy.push(json!({"type":"event","event":{"type":"update-load","load":42}}));
    let mut info = Value::Null;
    for _ in 0..50 {
        let (_, _, text) = http_get(sig.http, "/api/v1/serverinfo").await;
        info = serde_json::from_str(&text).expect("json");
        if info["sfu"]["load"] == 42 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(info["sfu"]["connected"], true, "{info}");
    assert_eq!(info["sfu"]["load"], 42, "{info}");
    assert_eq!(info["sfu"]["subscribers"], 1, "{info}");

    // Leaving the room deletes the session's subscribers on the SFU.
    bob.send(json!({"id":"l","type":"room","room":{"roomid":""}}))
        .await;
    let d = proxy.wait_for("command", "delete-subscriber").await;
    assert_eq!(d["command"]["clientId"], "sub-2");
}

#[tokio::test]
async fn publish_permissions_and_the_call_are_checked_before_the_sfu_is_asked() {
    let (talk, proxy, sig) = setup().await;
    welcome_with_mcu(&sig, true).await;
    let (mut muted, muted_sid) = in_room(&sig, &talk, "muted").await;
    muted
        .send(msg(&muted_sid, json!({"type":"offer","roomType":"video","sid":"x","payload":{"type":"offer","sdp":OFFER_SDP}})))
        .await;
    let e = muted.recv_type("error").await;
    assert_eq!(e["error"]["code"], "not_allowed", "{e}");
    assert_eq!(e["id"], "m");
    // Not in the call: no subscription.
    let (mut bob, _) = in_room(&sig, &talk, "bob").await;
    bob.send(msg(
        &muted_sid,
        json!({"type":"requestoffer","roomType":"video"}),
    ))
    .await;
    let e = bob.recv_type("error").await;
    assert_eq!(e["error"]["code"], "not_allowed", "{e}");
    assert!(proxy.received_of("command", "create-publisher").is_empty());
    assert!(proxy.received_of("command", "create-subscriber").is_empty());
}

#[tokio::test]
async fn mcu_features_follow_the_sfu_connection() {
    let (talk, proxy, sig) = setup().await;
    welcome_with_mcu(&sig, true).await;
    proxy.stop();
    welcome_with_mcu(&sig, false).await;
    // Without an SFU, SFU message types pass through to the other session like any data
    // (peer-to-peer calls).
    let (mut alice, _) = in_room(&sig, &talk, "alice").await;
    let (mut bob, bob_sid) = in_room(&sig, &talk, "bob").await;
    alice
        .send(msg(
            &bob_sid,
            json!({"type":"offer","roomType":"video","payload":{"type":"offer","sdp":"v=0 p2p"}}),
        ))
        .await;
    let m = recv_data(&mut bob, "offer").await;
    assert_eq!(m["data"]["payload"]["sdp"], "v=0 p2p");
    assert!(proxy.received_of("command", "create-publisher").is_empty());
    // The client keeps trying (backoff 1 s doubling) and gets the features back.
    proxy.restart();
    welcome_with_mcu(&sig, true).await;
    assert!(
        proxy.state.hellos.lock().expect("lock").len() >= 2,
        "a second hello"
    );
}

#[tokio::test]
async fn wss_to_the_sfu_is_checked_against_the_box_certificate() {
    let talk = start_fake_talk(String::new()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let (tls_tx, tls_rx) = tokio::sync::oneshot::channel();
    let proxy = start_fake_proxy_tls(listener, tls_rx);
    let sig = start_signaling(&talk.base(), &format!("sfu_url = \"{}\"", proxy.tls_url())).await;
    let (_, public) = appliance::secrets::proxy_token_keys(&sig.data).expect("proxy key");
    *proxy.state.public_key.lock().expect("lock") = Some(public);
    // The SFU presents the box's own certificate, the only one the client trusts.
    let tls = appliance::tls::load_server_config(&sig.data).expect("box certificate");
    let _ = tls_tx.send(tls);
    welcome_with_mcu(&sig, true).await;
    assert_eq!(
        proxy.state.hellos.lock().expect("lock")[0]["iss"],
        "talkbox-signaling"
    );
}

#[tokio::test]
async fn an_sfu_with_another_certificate_is_refused() {
    let talk = start_fake_talk(String::new()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let (tls_tx, tls_rx) = tokio::sync::oneshot::channel();
    let proxy = start_fake_proxy_tls(listener, tls_rx);
    let sig = start_signaling(&talk.base(), &format!("sfu_url = \"{}\"", proxy.tls_url())).await;
    let (_, public) = appliance::secrets::proxy_token_keys(&sig.data).expect("proxy key");
    *proxy.state.public_key.lock().expect("lock") = Some(public);
    // A certificate valid for 127.0.0.1 but not the box's.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("cert");
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(other.signing_key.serialize_der()).expect("key");
    let tls = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![other.cert.der().clone()], key)
    .expect("tls config");
    let _ = tls_tx.send(std::sync::Arc::new(tls));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let c = Client::connect(&sig.ws_url()).await;
    assert!(!has_mcu(&c.welcome), "{}", c.welcome);
    assert!(proxy.state.hellos.lock().expect("lock").is_empty());
}

/// A lost SFU connection is resumed: the next hello carries `resumeid` (and a fresh token), and
/// the publisher created before keeps its SFU client id, so the call goes on without a new
/// `create-publisher`. An SFU that no longer knows the session (`no_such_session`) gets a fresh
/// hello, and the old publishers are forgotten.
#[tokio::test]
async fn a_lost_sfu_connection_is_resumed_and_publishers_keep_their_ids() {
    let (talk, proxy, sig) = setup().await;
    welcome_with_mcu(&sig, true).await;
    let (mut alice, alice_sid) = in_room(&sig, &talk, "alice").await;
    let body = json!({"type":"incall","incall":{"incall":7,"changed":[{"sessionId":"talk-alice","inCall":7}],"users":[{"sessionId":"talk-alice","inCall":7}]}});
    let (status, _, _) = backend_post(sig.http, "room1", &body, TALK_SECRET, None).await;
    assert_eq!(status, 200);
    alice
        .send(msg(&alice_sid, json!({"type":"offer","sid":"s-1","roomType":"video","payload":{"type":"offer","sdp":OFFER_SDP}})))
        .await;
    recv_data(&mut alice, "answer").await;
    let publisher = proxy.wait_for("command", "create-publisher").await;
    assert!(publisher["command"]["streamType"] == "video");
    let candidate = |n: u32| {
        msg(
            &alice_sid,
            json!({"type":"candidate","sid":"s-1","roomType":"video",
            "payload":{"candidate":{"candidate":format!("candidate:{n} 1 udp 1 127.0.0.1 5000 typ host"),"sdpMLineIndex":0,"sdpMid":"0"}}}),
        )
    };

    // The hiccup.
    proxy.stop();
    welcome_with_mcu(&sig, false).await;
    proxy.restart();
    welcome_with_mcu(&sig, true).await;
    let hellos = proxy.received_of("hello", "");
    let last = hellos.last().expect("hellos");
    assert_eq!(
        last["hello"]["resumeid"], "fake-proxy-session",
        "no resume: {hellos:?}"
    );
    assert!(last["hello"]["token"].is_string(), "{last}");
    alice.send(candidate(7)).await;
    let mut seen = Value::Null;
    for _ in 0..100 {
        if let Some(c) = proxy.received_of("payload", "candidate").pop() {
            seen = c;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        seen["payload"]["clientId"], "pub-1",
        "the publisher's id after resume: {seen}"
    );
    assert_eq!(proxy.received_of("command", "create-publisher").len(), 1);

    // An SFU that lost the session: resume refused, fresh hello, publishers forgotten.
    proxy
        .state
        .forget_sessions
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let before = proxy.received_of("hello", "").len();
    proxy.stop();
    welcome_with_mcu(&sig, false).await;
    proxy.restart();
    welcome_with_mcu(&sig, true).await;
    let hellos = proxy.received_of("hello", "");
    let new: Vec<&Value> = hellos[before..].iter().collect();
    assert!(
        new.len() >= 2
            && new[0]["hello"]["resumeid"] == "fake-proxy-session"
            && new[new.len() - 1]["hello"]["resumeid"].is_null(),
        "a refused resume, then a fresh hello: {new:?}"
    );
    alice.send(candidate(8)).await;
    let e = alice.recv_type("error").await;
    assert_eq!(e["error"]["code"], "client_not_found", "{e}");
}
