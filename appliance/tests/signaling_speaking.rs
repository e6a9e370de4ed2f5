//! The SFU's `speaking` / `stopped-speaking` events (a talkbox extension of the proxy protocol)
//! reach the others in the publisher's room as `speaking` / `stoppedSpeaking` messages from the
//! publisher, the names Talk clients use on the data channel; not the publisher itself, not
//! another room, and not for a client id the signaling server does not know. Against a fake SFU.

mod signaling_common;

use std::time::Duration;

use serde_json::{Value, json};
use signaling_common::fake_proxy::*;
use signaling_common::*;

const OFFER_SDP: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendrecv\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendrecv\r\n";

/// The next message whose data type is `kind`, skipping others; `None` after `wait`.
async fn data_of(c: &mut Client, kind: &str, wait: Duration) -> Option<Value> {
    let end = tokio::time::Instant::now() + wait;
    loop {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        let m = c.try_recv(left).await?;
        if m["type"] == "message" && m["message"]["data"]["type"] == kind {
            return Some(m["message"].clone());
        }
    }
}

async fn in_room(sig: &Signaling, talk: &FakeTalk, user: &str, room: &str) -> (Client, String) {
    let (mut c, h) = Client::hello_v1(&sig.ws_url(), &talk.auth_url(), user).await;
    c.join(room, &format!("talk-{user}")).await;
    (
        c,
        h["hello"]["sessionid"].as_str().expect("sid").to_string(),
    )
}

#[tokio::test]
async fn sfu_speaking_events_reach_the_publishers_room_as_messages_from_it() {
    let talk = start_fake_talk(String::new()).await;
    let proxy = start_fake_proxy().await;
    let sig = start_signaling(&talk.base(), &format!("sfu_url = \"{}\"", proxy.url())).await;
    let (_, public) = appliance::secrets::proxy_token_keys(&sig.data).expect("proxy key");
    *proxy.state.public_key.lock().expect("lock") = Some(public);
    // The SFU client is up once a welcome lists `mcu`.
    for _ in 0..200 {
        let c = Client::connect(&sig.ws_url()).await;
        if c.welcome["welcome"]["features"]
            .as_array()
            .is_some_and(|f| f.contains(&json!("mcu")))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (mut alice, alice_sid) = in_room(&sig, &talk, "alice", "room1").await;
    let (mut bob, _) = in_room(&sig, &talk, "bob", "room1").await;
    let (mut carol, _) = in_room(&sig, &talk, "carol", "room2").await;
    let body = json!({"type":"incall","incall":{"incall":7,"changed":[{"sessionId":"talk-alice","inCall":7}],"users":[{"sessionId":"talk-alice","inCall":7}]}});
    let (status, _, _) = backend_post(sig.http, "room1", &body, TALK_SECRET, None).await;
    assert_eq!(status, 200);
    alice
        .send(json!({"id":"m","type":"message","message":{"recipient":{"type":"session","sessionid":alice_sid},
            "data":{"to":alice_sid,"type":"offer","sid":"s-1","roomType":"video","payload":{"type":"offer","sdp":OFFER_SDP}}}}))
        .await;
    data_of(&mut alice, "answer", Duration::from_secs(10))
        .await
        .expect("alice's publisher is answered");
    let create = proxy.wait_for("command", "create-publisher").await;
    assert_eq!(create["command"]["streamType"], "video");
    let publisher = "pub-1";

    // An event for a client id nobody owns is dropped; then Alice's publisher speaks.
    proxy.push(json!({"type":"event","event":{"type":"speaking","clientId":"pub-999"}}));
    proxy.push(json!({"type":"event","event":{"type":"speaking","clientId":publisher}}));
    let m = data_of(&mut bob, "speaking", Duration::from_secs(5))
        .await
        .expect("bob hears that alice speaks");
    assert_eq!(m["sender"], json!({"type":"session","sessionid":alice_sid}));
    assert_eq!(m["data"]["from"], alice_sid.as_str());
    assert_eq!(m["data"]["roomType"], "video");
    // Exactly one speaking message reached Bob (the unknown id made none).
    assert!(
        data_of(&mut bob, "speaking", Duration::from_millis(500))
            .await
            .is_none()
    );
    proxy.push(json!({"type":"event","event":{"type":"stopped-speaking","clientId":publisher}}));
    let m = data_of(&mut bob, "stoppedSpeaking", Duration::from_secs(5))
        .await
        .expect("bob hears that alice stopped");
    assert_eq!(m["sender"]["sessionid"], alice_sid.as_str());
    // Not the speaker itself, not another room.
    assert!(
        data_of(&mut alice, "speaking", Duration::from_millis(300))
            .await
            .is_none()
    );
    assert!(
        data_of(&mut carol, "speaking", Duration::from_millis(300))
            .await
            .is_none()
    );
}
