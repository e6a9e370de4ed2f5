//! The meeting page in headless Debian Chromium (fake camera and microphone) against the real
//! `talkbox signaling` and a fake SFU: the page joins a stand-alone room through the built-in
//! backend, reaches the joined state, publishes its camera with an offer that arrives at the SFU
//! through signaling, gets the SFU's answer, and subscribes to another participant in the call.
//! Needs `apt-get install chromium chromium-driver`.

mod common;
mod signaling_common;

use std::time::Duration;

use common::browser::Browser;
use fantoccini::Locator;
use serde_json::{Value, json};
use signaling_common::fake_proxy::*;
use signaling_common::*;

async fn post(sig: &Signaling, path: &str, body: &Value) -> Value {
    let (status, v) = post_json(sig.http, path, body).await;
    assert!(status < 300, "{path}: {status} {v}");
    v
}

#[tokio::test]
async fn meeting_page_joins_publishes_through_signaling_and_subscribes() {
    let talk = start_fake_talk(String::new()).await;
    let proxy = start_fake_proxy().await;
    let sig = start_signaling(&talk.base(), &format!("sfu_url = \"{}\"", proxy.url())).await;
    let (_, public) = appliance::secrets::proxy_token_keys(&sig.data).expect("proxy key");
    *proxy.state.public_key.lock().expect("lock") = Some(public);
    for _ in 0..100 {
        if !proxy.state.hellos.lock().expect("lock").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Another participant, already in the call and publishing, as a plain client.
    let grant = post(
        &sig,
        "/api/v1/rooms/browser-room/join",
        &json!({"displayname":"Robot"}),
    )
    .await;
    let mut robot = Client::connect(&sig.ws_url()).await;
    robot
        .send(json!({"id":"1","type":"hello","hello":{"version":"2.0","auth":{"url":grant["url"],"params":{"token":grant["token"]}}}}))
        .await;
    let h = robot.recv_type("hello").await;
    let robot_sid = h["hello"]["sessionid"].as_str().expect("sid").to_string();
    robot
        .join("browser-room", grant["sessionid"].as_str().expect("rsid"))
        .await;
    post(
        &sig,
        "/api/v1/rooms/browser-room/incall",
        &json!({"sessionid": grant["sessionid"], "incall": 7}),
    )
    .await;
    robot
        .send(json!({"id":"o","type":"message","message":{"recipient":{"type":"session","sessionid":robot_sid},
            "data":{"type":"offer","roomType":"video","sid":"robot-1","payload":{"type":"offer","sdp":"v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"}}}}))
        .await;
    proxy.wait_for("command", "create-publisher").await;

    let browser = Browser::start(&[]).await;
    let c = &browser.client;
    c.goto(&format!("http://{}/r/browser-room", sig.http))
        .await
        .expect("open the room link");
    browser
        .wait_for(
            "return document.body.dataset.state",
            &json!("join"),
            Duration::from_secs(10),
        )
        .await;
    c.find(Locator::Id("join-name"))
        .await
        .expect("name field")
        .send_keys("Tester")
        .await
        .expect("type a name");
    c.find(Locator::Id("join-button"))
        .await
        .expect("join button")
        .click()
        .await
        .expect("click join");
    browser
        .wait_for(
            "return document.body.dataset.state",
            &json!("joined"),
            Duration::from_secs(15),
        )
        .await;

    // The camera offer goes through signaling to the SFU.
    browser
        .wait_for(
            "return document.body.dataset.published || null",
            &json!("offer-sent"),
            Duration::from_secs(15),
        )
        .await;
    let mut page_offer = None;
    for _ in 0..100 {
        page_offer = proxy
            .received_of("payload", "offer")
            .into_iter()
            .find(|m| m["payload"]["payload"]["nick"] == "Tester");
        if page_offer.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let page_offer = page_offer.expect("the page's offer reached the SFU");
    let sdp = page_offer["payload"]["payload"]["sdp"]
        .as_str()
        .expect("sdp");
    assert!(sdp.contains("m=audio") && sdp.contains("m=video"), "{sdp}");
    let publishers = proxy.received_of("command", "create-publisher");
    assert!(
        publishers
            .iter()
            .any(|p| p["command"]["mediatypes"] == 3 && p["command"]["streamType"] == "video"),
        "{publishers:?}"
    );
    // The SFU's answer came back to the page through signaling.
    browser
        .wait_for(
            "return document.body.dataset.answered || null",
            &json!("video"),
            Duration::from_secs(10),
        )
        .await;

    // The page subscribes to the robot, who is in the call: requestoffer -> SFU subscriber.
    let sub = proxy.wait_for("command", "create-subscriber").await;
    assert_eq!(sub["command"]["streamType"], "video");
    let requests = proxy.received_of("payload", "requestoffer");
    assert!(!requests.is_empty());

    // The grid shows the page's own tile with its name.
    let names = browser
        .eval("return [...document.querySelectorAll('.tile .name')].map(e => e.textContent)")
        .await;
    assert!(
        names
            .as_array()
            .is_some_and(|a| a.contains(&json!("Tester (you)"))),
        "{names}"
    );

    // Leaving tells everyone.
    c.find(Locator::Id("leave"))
        .await
        .expect("leave button")
        .click()
        .await
        .expect("click leave");
    browser
        .wait_for(
            "return document.body.dataset.state",
            &json!("left"),
            Duration::from_secs(5),
        )
        .await;
    let mut left = false;
    for _ in 0..20 {
        match robot.try_recv(Duration::from_secs(1)).await {
            Some(v) if v["type"] == "event" && v["event"]["type"] == "leave" => {
                left = true;
                break;
            }
            Some(_) => continue,
            None => break,
        }
    }
    assert!(left, "the other participant saw the page leave");
    browser.close().await;
}
