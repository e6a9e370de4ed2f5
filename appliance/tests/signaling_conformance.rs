//! Conformance of `talkbox signaling` with the Nextcloud Talk HPB protocol, modelled on the
//! scenarios of upstream `server/hub_test.go`, against a fake Talk backend that checks our HMAC
//! on every request and publishes a real hello-v2 signing key.

mod signaling_common;

use std::time::Duration;

use appliance::secrets::Secret;
use appliance::signaling::checksum;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};
use signaling_common::*;

fn es256() -> (EncodingKey, String) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("p256");
    (
        EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).expect("ec"),
        kp.public_key_pem(),
    )
}

fn ed25519() -> (EncodingKey, String) {
    let kp = Ed25519KeyPair::generate().expect("ed25519");
    let pkcs8 = kp.to_pkcs8().expect("pkcs8");
    (
        EncodingKey::from_ed_der(pkcs8.as_ref()),
        base64::engine::general_purpose::STANDARD.encode(kp.public_key().as_ref()),
    )
}

fn rs256() -> (EncodingKey, String) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("rsa");
    (
        EncodingKey::from_rsa_pem(kp.serialize_pem().as_bytes()).expect("rsa"),
        kp.public_key_pem(),
    )
}

async fn setup(public_key: String, extra: &str) -> (FakeTalk, Signaling) {
    let talk = start_fake_talk(public_key).await;
    let sig = start_signaling(&talk.base(), extra).await;
    (talk, sig)
}

async fn hello_v2(sig: &Signaling, talk: &FakeTalk, token: &str) -> (Client, Value) {
    let mut c = Client::connect(&sig.ws_url()).await;
    c.send(json!({"id":"1","type":"hello","hello":{"version":"2.0","auth":{"url":talk.auth_url(),"params":{"token":token}}}})).await;
    let r = c.recv().await;
    (c, r)
}

#[tokio::test]
async fn welcome_and_hello_carry_the_features_talk_requires() {
    let (key, public) = es256();
    let (talk, sig) = setup(public, "").await;
    let t = jwt(
        &key,
        Algorithm::ES256,
        json!({"iss":talk.base(),"iat":now(),"exp":now()+60,"sub":"alice","userdata":{"displayname":"Alice"}}),
    );
    let (c, h) = hello_v2(&sig, &talk, &t).await;
    for f in [
        "audio-video-permissions",
        "federation",
        "incall-all",
        "hello-v2",
        "switchto",
        "welcome",
        "transient-data",
        "recipient-call",
        "join-features",
        "chat-relay",
        "dialout",
        "serverinfo",
    ] {
        assert!(
            c.welcome["welcome"]["features"]
                .as_array()
                .expect("list")
                .contains(&json!(f)),
            "welcome lacks {f}"
        );
        assert!(
            h["hello"]["server"]["features"]
                .as_array()
                .expect("list")
                .contains(&json!(f)),
            "hello lacks {f}"
        );
    }
    assert!(
        !c.welcome["welcome"]["features"]
            .as_array()
            .expect("list")
            .contains(&json!("mcu")),
        "no SFU, no mcu"
    );
    assert_eq!(h["id"], "1");
    assert_eq!(h["hello"]["userid"], "alice");
    assert_eq!(h["hello"]["user"]["displayname"], "Alice");
    assert!(
        h["hello"]["sessionid"]
            .as_str()
            .is_some_and(|s| s.len() > 20)
    );
    assert_eq!(
        talk.state
            .bad_hmac
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn hello_v2_accepts_eddsa_and_rs256_tokens() {
    for (alg, (key, public)) in [(Algorithm::EdDSA, ed25519()), (Algorithm::RS256, rs256())] {
        let (talk, sig) = setup(public, "").await;
        let t = jwt(&key, alg, json!({"iat":now(),"exp":now()+60,"sub":"bob"}));
        let (_c, h) = hello_v2(&sig, &talk, &t).await;
        assert_eq!(h["hello"]["userid"], "bob", "{alg:?}: {h}");
    }
}

#[tokio::test]
async fn hello_v2_failure_modes_have_their_error_codes() {
    let (key, public) = es256();
    let (other, _) = es256();
    let (talk, sig) = setup(public, "").await;
    let cases = [
        (
            jwt(
                &other,
                Algorithm::ES256,
                json!({"iat":now(),"exp":now()+60}),
            ),
            "invalid_token",
        ),
        (
            jwt(
                &key,
                Algorithm::ES256,
                json!({"iat":now()-300,"exp":now()-240}),
            ),
            "token_expired",
        ),
        (
            jwt(
                &key,
                Algorithm::ES256,
                json!({"iat":now()+300,"exp":now()+360}),
            ),
            "token_not_valid_yet",
        ),
        (
            jwt(&key, Algorithm::ES256, json!({"exp":now()+60})),
            "token_not_valid_yet",
        ),
        ("not.a.token".to_string(), "invalid_token"),
    ];
    for (token, code) in cases {
        let (_c, r) = hello_v2(&sig, &talk, &token).await;
        assert_eq!(r["error"]["code"], code, "{r}");
    }
    let mut c = Client::connect(&sig.ws_url()).await;
    let t = jwt(&key, Algorithm::ES256, json!({"iat":now(),"exp":now()+60}));
    c.send(json!({"id":"1","type":"hello","hello":{"version":"2.0","auth":{"url":"https://evil.example/ocs/v2.php/apps/spreed/api/v3/signaling/backend","params":{"token":t}}}})).await;
    assert_eq!(c.recv().await["error"]["code"], "invalid_backend");
    c.send(json!({"id":"2","type":"hello","hello":{"version":"3.0"}}))
        .await;
    assert_eq!(c.recv().await["error"]["code"], "invalid_hello_version");
}

#[tokio::test]
async fn hello_v1_is_checked_by_talk_and_its_errors_pass_through() {
    let (talk, sig) = setup(es256().1, "").await;
    let (_a, h) = Client::hello_v1(&sig.ws_url(), &talk.auth_url(), "alice").await;
    assert_eq!(h["hello"]["userid"], "alice");
    let mut c = Client::connect(&sig.ws_url()).await;
    c.send(json!({"id":"2","type":"hello","hello":{"version":"1.0","auth":{"url":talk.auth_url(),"params":{"userid":"alice","ticket":"bad"}}}})).await;
    let e = c.recv().await;
    assert_eq!(e["error"]["code"], "invalid_ticket", "{e}");
    assert_eq!(e["id"], "2");
    assert_eq!(talk.requests_of("auth").len(), 2);
    assert_eq!(
        talk.state
            .bad_hmac
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn internal_hello_needs_the_internal_secret_and_gets_virtual_sessions() {
    let (talk, sig) = setup(es256().1, "").await;
    let secret = sig.secret(Secret::InternalSecret);
    let random = checksum::new_random();
    let token = checksum::calculate(&random, b"", secret.as_bytes());
    let mut c = Client::connect(&sig.ws_url()).await;
    c.send(json!({"type":"hello","hello":{"version":"1.0","auth":{"type":"internal","params":{"random":random,"token":"00".repeat(32),"backend":talk.base()}}}})).await;
    assert_eq!(c.recv().await["error"]["code"], "auth_failed");
    c.send(json!({"type":"hello","hello":{"version":"1.0","auth":{"type":"internal","params":{"random":random,"token":token,"backend":talk.base()}}}})).await;
    let h = c.recv().await;
    assert_eq!(
        h["hello"]["server"]["features"],
        json!(["virtual-sessions"]),
        "{h}"
    );
}

#[tokio::test]
async fn resume_within_the_window_and_takeover_by_a_new_connection() {
    let (talk, sig) = setup(es256().1, "").await;
    let (mut a, h) = Client::hello_v1(&sig.ws_url(), &talk.auth_url(), "alice").await;
    let resume = h["hello"]["resumeid"]
        .as_str()
        .expect("resumeid")
        .to_string();
    let sid = h["hello"]["sessionid"].clone();
    // Takeover: the old connection is told and closed.
    let mut b = Client::connect(&sig.ws_url()).await;
    b.send(json!({"id":"r","type":"hello","hello":{"version":"1.0","resumeid":resume}}))
        .await;
    let r = b.recv().await;
    assert_eq!(r["hello"]["sessionid"], sid, "{r}");
    assert_eq!(a.recv().await["bye"]["reason"], "session_resumed");
    // Resume after a disconnect.
    drop(b);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = Client::connect(&sig.ws_url()).await;
    c.send(json!({"id":"r","type":"hello","hello":{"version":"1.0","resumeid":resume}}))
        .await;
    assert_eq!(c.recv().await["hello"]["sessionid"], sid);
    let mut d = Client::connect(&sig.ws_url()).await;
    d.send(json!({"id":"r","type":"hello","hello":{"version":"1.0","resumeid":"bogus"}}))
        .await;
    assert_eq!(d.recv().await["error"]["code"], "no_such_session");
}

#[tokio::test]
async fn room_join_events_messages_to_every_recipient_type_and_leave() {
    let (talk, sig) = setup(es256().1, "").await;
    let url = sig.ws_url();
    let (mut a, ha) = Client::hello_v1(&url, &talk.auth_url(), "alice").await;
    let (mut b, hb) = Client::hello_v1(&url, &talk.auth_url(), "bob").await;
    let (sa, sb) = (
        ha["hello"]["sessionid"].clone(),
        hb["hello"]["sessionid"].clone(),
    );
    let r = a.join("room1", "talk-a").await;
    assert_eq!(r["room"]["properties"]["name"], "Room room1");
    assert_eq!(r["room"]["bandwidth"]["maxstreambitrate"], 1_048_576);
    a.recv_event("room", "join").await;
    b.join("room1", "talk-b").await;
    let j = a.recv_event("room", "join").await;
    assert_eq!(j["join"][0]["sessionid"], sb);
    assert_eq!(j["join"][0]["roomsessionid"], "talk-b");
    b.recv_event("room", "join").await;
    let joins = talk.requests_of("room");
    assert_eq!(joins.len(), 2);
    assert_eq!(joins[1]["room"]["sessionid"], "talk-b");

    let data = json!({"type":"nickChanged","payload":{"name":"A"}});
    a.send(json!({"type":"message","message":{"recipient":{"type":"session","sessionid":sb},"data":data}})).await;
    let m = b.recv_type("message").await;
    assert_eq!(
        m["message"]["sender"],
        json!({"type":"session","sessionid":sa,"userid":"alice"})
    );
    assert_eq!(m["message"]["data"], data);
    a.send(json!({"type":"message","message":{"recipient":{"type":"user","userid":"bob"},"data":{"n":2}}})).await;
    assert_eq!(
        b.recv_type("message").await["message"]["sender"]["type"],
        "user"
    );
    a.send(json!({"type":"message","message":{"recipient":{"type":"room"},"data":{"n":3}}}))
        .await;
    assert_eq!(b.recv_type("message").await["message"]["data"]["n"], 3);
    // `call` reaches only sessions in the call: bob joins the call through Talk.
    let (status, headers, _) = backend_post(
        sig.http,
        "room1",
        &json!({"type":"incall","incall":{"incall":7,"changed":[{"sessionId":"talk-b","inCall":7}],"users":[{"sessionId":"talk-b","inCall":7},{"sessionId":"talk-gone","inCall":1}]}}),
        TALK_SECRET,
        Some(&talk.base()),
    )
    .await;
    assert_eq!(status, 200);
    assert!(headers.get("x-spreed-signaling-features").is_some());
    let u = a.recv_event("participants", "update").await;
    assert_eq!(
        u["update"]["users"],
        json!([{"sessionId":sb,"inCall":7}]),
        "Talk ids rewritten, unknown dropped"
    );
    b.recv_event("participants", "update").await;
    b.send(json!({"type":"message","message":{"recipient":{"type":"call"},"data":{"n":4}}}))
        .await;
    assert!(
        a.try_recv(Duration::from_millis(500)).await.is_none(),
        "alice is not in the call"
    );
    a.send(json!({"type":"message","message":{"recipient":{"type":"call"},"data":{"n":5}}}))
        .await;
    assert_eq!(
        b.recv_type("message").await["message"]["sender"]["type"],
        "call"
    );

    b.send(json!({"id":"l","type":"room","room":{"roomid":""}}))
        .await;
    assert_eq!(b.recv_type("room").await["room"]["roomid"], "");
    assert_eq!(a.recv_event("room", "leave").await["leave"], json!([sb]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        talk.requests_of("room")
            .iter()
            .any(|r| r["room"]["action"] == "leave")
    );
    assert_eq!(
        talk.state
            .bad_hmac
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn control_and_transient_data_follow_permissions() {
    let (talk, sig) = setup(es256().1, "").await;
    let url = sig.ws_url();
    let (mut m, hm) = Client::hello_v1(&url, &talk.auth_url(), "moderator").await;
    let (mut g, hg) = Client::hello_v1(&url, &talk.auth_url(), "muted").await;
    m.join("r", "tm").await;
    g.join("r", "tg").await;
    let (sm, sg) = (
        hm["hello"]["sessionid"].clone(),
        hg["hello"]["sessionid"].clone(),
    );
    g.send(json!({"type":"control","control":{"recipient":{"type":"session","sessionid":sm},"data":{"type":"forceMute"}}})).await;
    m.send(json!({"type":"control","control":{"recipient":{"type":"session","sessionid":sg},"data":{"type":"forceMute"}}})).await;
    let c = g.recv_type("control").await;
    assert_eq!(c["control"]["data"]["type"], "forceMute");
    assert!(
        m.try_recv(Duration::from_millis(300))
            .await
            .is_none_or(|v| v["type"] != "control"),
        "no control without permission"
    );
    g.send(json!({"id":"t","type":"transient","transient":{"type":"set","key":"k","value":1}}))
        .await;
    assert_eq!(g.recv_type("error").await["error"]["code"], "not_allowed");
    m.send(json!({"type":"transient","transient":{"type":"set","key":"k","value":{"a":1}}}))
        .await;
    assert_eq!(
        g.recv_type("transient").await["transient"],
        json!({"type":"set","key":"k","value":{"a":1}})
    );
    m.send(json!({"type":"transient","transient":{"type":"remove","key":"k"}}))
        .await;
    assert_eq!(
        g.recv_type("transient").await["transient"]["type"],
        "remove"
    );
}

#[tokio::test]
async fn internal_client_adds_updates_and_removes_a_virtual_session() {
    let (talk, sig) = setup(es256().1, "").await;
    let (mut a, _) = Client::hello_v1(&sig.ws_url(), &talk.auth_url(), "alice").await;
    a.join("r", "ta").await;
    a.recv_event("room", "join").await;
    let secret = sig.secret(Secret::InternalSecret);
    let random = checksum::new_random();
    let mut i = Client::connect(&sig.ws_url()).await;
    i.send(json!({"type":"hello","hello":{"version":"1.0","auth":{"type":"internal","params":{"random":random,"token":checksum::calculate(&random, b"", secret.as_bytes()),"backend":talk.base()}}}})).await;
    i.recv_type("hello").await;
    i.send(json!({"type":"internal","internal":{"type":"addsession","addsession":{"sessionid":"phone-1","roomid":"r","user":{"type":"phone"},"flags":4,"incall":9}}})).await;
    let j = a.recv_event("room", "join").await;
    let vsid = j["join"][0]["sessionid"].clone();
    let u = a.recv_event("participants", "update").await;
    assert_eq!(u["update"]["users"][0]["virtual"], true);
    assert_eq!(
        a.recv_event("participants", "flags").await["flags"]["flags"],
        4
    );
    i.send(json!({"type":"internal","internal":{"type":"updatesession","updatesession":{"sessionid":"phone-1","roomid":"r","flags":1}}})).await;
    assert_eq!(
        a.recv_event("participants", "flags").await["flags"]["flags"],
        1
    );
    a.send(json!({"type":"message","message":{"recipient":{"type":"session","sessionid":vsid},"data":{"type":"hangup"}}})).await;
    assert_eq!(
        i.recv_type("message").await["message"]["recipient"]["sessionid"],
        "phone-1"
    );
    i.send(json!({"type":"internal","internal":{"type":"removesession","removesession":{"sessionid":"phone-1","roomid":"r"}}})).await;
    assert_eq!(a.recv_event("room", "leave").await["leave"], json!([vsid]));
    // Regular clients may not send internal messages.
    a.send(json!({"type":"internal","internal":{"type":"incall","incall":{"incall":1}}}))
        .await;
    assert_eq!(a.recv_type("error").await["error"]["code"], "not_allowed");
}

#[tokio::test]
async fn backend_requests_switchto_incall_all_invite_and_bad_checksums() {
    let (talk, sig) = setup(es256().1, "").await;
    let (mut a, _) = Client::hello_v1(&sig.ws_url(), &talk.auth_url(), "alice").await;
    a.join("r", "ta").await;
    let base = talk.base();
    let post = |body: Value| {
        let base = base.clone();
        let http = sig.http;
        async move { backend_post(http, "r", &body, TALK_SECRET, Some(&base)).await }
    };
    assert_eq!(
        post(json!({"type":"switchto","switchto":{"roomid":"breakout","sessions":{"ta":{"x":1}}}}))
            .await
            .0,
        200
    );
    assert_eq!(
        a.recv_event("room", "switchto").await["switchto"],
        json!({"roomid":"breakout","details":{"x":1}})
    );
    assert_eq!(
        post(json!({"type":"switchto","switchto":{"roomid":"b2","sessions":["ta"]}}))
            .await
            .0,
        200
    );
    assert_eq!(
        a.recv_event("room", "switchto").await["switchto"],
        json!({"roomid":"b2"})
    );
    assert_eq!(
        post(json!({"type":"incall","incall":{"incall":0,"all":true}}))
            .await
            .0,
        200
    );
    assert_eq!(
        a.recv_event("participants", "update").await["update"],
        json!({"roomid":"r","incall":0,"all":true})
    );
    assert_eq!(post(json!({"type":"invite","invite":{"userids":["alice"],"alluserids":["alice"],"properties":{"name":"R"}}})).await.0, 200);
    assert_eq!(
        a.recv_event("roomlist", "invite").await["invite"]["roomid"],
        "r"
    );
    assert_eq!(
        post(json!({"type":"message","message":{"data":{"type":"chat","chat":{"refresh":true}}}}))
            .await
            .0,
        200
    );
    assert_eq!(
        a.recv_event("room", "message").await["message"]["data"]["chat"]["refresh"],
        true
    );
    assert_eq!(post(json!({"type":"transient"})).await.0, 400);
    assert_eq!(
        post(json!({"type":"dialout","dialout":{"number":"+49"}}))
            .await
            .0,
        400,
        "room id must be numeric"
    );
    // Wrong secret, unknown backend, missing headers.
    let (s, h, _) = backend_post(
        sig.http,
        "r",
        &json!({"type":"update","update":{}}),
        "wrong-secret-wrong-secret",
        Some(&base),
    )
    .await;
    assert_eq!(s, 403);
    assert!(h.get("x-spreed-signaling-features").is_some());
    assert_eq!(
        backend_post(
            sig.http,
            "r",
            &json!({}),
            TALK_SECRET,
            Some("https://evil.example/")
        )
        .await
        .0,
        403
    );
    let (s, _, _) = raw_http(sig.http, "POST /api/v1/room/r HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_string().as_bytes()).await;
    assert_eq!(s, 403);
    // Disinvite by Talk session id closes the session.
    assert_eq!(
        post(json!({"type":"disinvite","disinvite":{"sessionids":["ta"],"alluserids":[]}}))
            .await
            .0,
        200
    );
    assert_eq!(
        a.recv_event("roomlist", "disinvite").await["disinvite"]["reason"],
        "disinvited"
    );
    assert!(a.closed().await);
}

#[tokio::test]
async fn http_endpoints_carry_features_and_date_and_stats_are_restricted_to_loopback() {
    let (_talk, sig) = setup(
        es256().1,
        "turn_servers = [\"turn:127.0.0.1:3478?transport=udp\"]",
    )
    .await;
    let (s, h, body) = http_get(sig.http, "/api/v1/welcome").await;
    assert_eq!(s, 200);
    let features = h
        .get("x-spreed-signaling-features")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    for f in [
        "audio-video-permissions",
        "federation",
        "incall-all",
        "hello-v2",
        "switchto",
    ] {
        assert!(features.split(',').any(|x| x == f), "{features}");
    }
    assert!(h.get("date").is_some(), "Date header");
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json")["nextcloud-spreed-signaling"],
        "Welcome"
    );
    assert_eq!(http_get(sig.http, "/api/v1/stats").await.0, 200);
    let (s, _, m) = http_get(sig.http, "/metrics").await;
    assert_eq!(s, 200);
    assert!(m.contains("signaling_hub_rooms"), "{m}");
    assert_eq!(http_get(sig.http, "/api/v1/serverinfo").await.0, 200);
    let key = sig.secret(Secret::InternalSecret);
    let (s, _, body) = http_get(
        sig.http,
        &format!("/turn/credentials?service=turn&username=janus&key={key}"),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    let user = v["username"].as_str().expect("username");
    assert!(user.ends_with(":janus"));
    let (_, expected) = checksum::turn_credentials(
        sig.secret(Secret::TurnSecret).as_bytes(),
        user.split(':')
            .next()
            .and_then(|e| e.parse().ok())
            .expect("expiry"),
        "janus",
    );
    assert_eq!(v["password"], expected);
    assert_eq!(
        http_get(sig.http, "/turn/credentials?service=turn&key=wrong")
            .await
            .0,
        403
    );
    assert_eq!(
        http_get(sig.http, "/turn/credentials?username=x").await.0,
        400
    );
}

#[tokio::test]
async fn bad_input_gets_error_codes_and_leaves_other_sessions_alone() {
    let (talk, sig) = setup(es256().1, "").await;
    let url = sig.ws_url();
    let (mut a, _) = Client::hello_v1(&url, &talk.auth_url(), "alice").await;
    let (mut b, hb) = Client::hello_v1(&url, &talk.auth_url(), "bob").await;
    a.send_raw("{not json".into()).await;
    assert_eq!(a.recv().await["error"]["code"], "invalid_format");
    a.send(json!({"id":"u","type":"frobnicate"})).await;
    assert_eq!(a.recv().await["error"]["code"], "invalid_format");
    a.send(json!({"type":"message","message":{"recipient":{"type":"session","sessionid":"forged"},"data":{}}})).await;
    assert_eq!(a.recv().await["error"]["code"], "no_such_session");
    a.send(json!({"type":"message","message":{"recipient":{"type":"planet"},"data":{}}}))
        .await;
    assert_eq!(a.recv().await["error"]["code"], "invalid_format");
    a.send(json!({"id":"h2","type":"hello","hello":{"version":"1.0","auth":{"url":talk.auth_url(),"params":{}}}})).await;
    a.send(json!({"id":"j","type":"room","room":{"roomid":"no-such-room","sessionid":"x"}}))
        .await;
    let e = a.recv().await;
    assert_eq!(
        e["error"]["code"], "no_such_room",
        "second hello is ignored, Talk's error passes through: {e}"
    );
    // Messages before hello.
    let mut c = Client::connect(&url).await;
    c.send(json!({"id":"m","type":"room","room":{"roomid":"r"}}))
        .await;
    assert_eq!(c.recv().await["error"]["code"], "hello_expected");
    // An oversized frame closes that connection only.
    let mut d = Client::connect(&url).await;
    d.send_raw(format!(
        "{{\"type\":\"hello\",\"x\":\"{}\"}}",
        "a".repeat(70 * 1024)
    ))
    .await;
    assert!(d.closed().await);
    // Hello timeout.
    let mut e = Client::connect(&url).await;
    assert_eq!(e.recv().await["bye"]["reason"], "hello_timeout");
    // The others still work.
    a.send(json!({"type":"message","message":{"recipient":{"type":"session","sessionid":hb["hello"]["sessionid"]},"data":{"ok":1}}})).await;
    assert_eq!(b.recv_type("message").await["message"]["data"]["ok"], 1);
}

#[tokio::test]
async fn repeated_failed_hellos_are_throttled_per_address() {
    let (talk, sig) = setup(es256().1, "").await;
    let mut c = Client::connect(&sig.ws_url()).await;
    let mut last = Value::Null;
    for i in 0..12 {
        c.send(json!({"id":i.to_string(),"type":"hello","hello":{"version":"1.0","auth":{"url":talk.auth_url(),"params":{"ticket":"bad"}}}})).await;
        last = c.recv().await;
    }
    assert_eq!(last["error"]["code"], "too_many_requests");
}

#[tokio::test]
async fn dialout_waits_for_the_sip_bridge_and_answers_its_call_id() {
    let (talk, sig) = setup(es256().1, "").await;
    let secret = sig.secret(Secret::InternalSecret);
    let random = checksum::new_random();
    let token = checksum::calculate(&random, b"", secret.as_bytes());
    let mut bridge = Client::connect(&sig.ws_url()).await;
    bridge.send(json!({"type":"hello","hello":{"version":"1.0","features":["start-dialout"],"auth":{"type":"internal","params":{"random":random,"token":token,"backend":talk.base()}}}})).await;
    assert_eq!(bridge.recv().await["type"], "hello");
    let base = talk.base();
    for (answer, status, body) in [
        (
            json!({"type":"status","status":{"callid":"call-1","status":"accepted"}}),
            200,
            json!({"type":"dialout","dialout":{"callid":"call-1"}}),
        ),
        (
            json!({"type":"error","error":{"code":"invalid_number","message":"bad number"}}),
            502,
            json!({"type":"dialout","dialout":{"error":{"code":"invalid_number","message":"bad number"}}}),
        ),
    ] {
        let http = sig.http;
        let base = base.clone();
        let request = tokio::spawn(async move {
            backend_post(
                http,
                "123",
                &json!({"type":"dialout","dialout":{"number":"+4912345","options":{"actorId":"a"}}}),
                TALK_SECRET,
                Some(&base),
            )
            .await
        });
        let r = bridge.recv_type("internal").await;
        assert_eq!(r["internal"]["dialout"]["roomid"], "123", "{r}");
        assert_eq!(r["internal"]["dialout"]["request"]["number"], "+4912345");
        let mut reply = json!({"type":"internal","internal":{"type":"dialout","dialout":answer}});
        reply["id"] = r["id"].clone();
        reply["internal"]["dialout"]["roomid"] = json!("123");
        bridge.send(reply).await;
        let (s, _, text) = request.await.expect("request");
        assert_eq!(s, status, "{text}");
        assert_eq!(serde_json::from_str::<Value>(&text).expect("json"), body);
    }
}

#[tokio::test]
async fn the_leave_request_goes_to_the_url_the_session_said_hello_with() {
    let talk = start_fake_talk(es256().1).await;
    let port = talk.addr.port();
    // One Nextcloud reachable under two names; the session uses the second.
    let other = format!("http://localhost:{port}");
    let sig = start_signaling_urls(&[talk.base(), other.clone()], "").await;
    let auth_url = format!("{other}/ocs/v2.php/apps/spreed/api/v3/signaling/backend");
    let (mut c, _) = Client::hello_v1(&sig.ws_url(), &auth_url, "alice").await;
    c.join("r", "talk-a").await;
    c.send(json!({"id":"l","type":"room","room":{"roomid":""}}))
        .await;
    c.recv_type("room").await;
    let mut leave = None;
    for _ in 0..50 {
        leave = talk
            .requests_of("room")
            .into_iter()
            .find(|r| r["room"]["action"] == "leave");
        if leave.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let leave = leave.expect("a leave request");
    assert_eq!(leave["_host"], format!("localhost:{port}"), "{leave}");
    let join = talk
        .requests_of("room")
        .into_iter()
        .find(|r| r["room"]["action"].is_null())
        .expect("join");
    assert_eq!(join["_host"], format!("localhost:{port}"));
}

/// The `room` reply's `bandwidth` follows upstream: the lower of the box-wide cap and the
/// backend's own (a backend may lower a cap, never raise it), in the join reply only.
#[tokio::test]
async fn the_room_reply_carries_the_lower_of_the_global_and_the_backend_bitrate_caps() {
    let talk = start_fake_talk(es256().1).await;
    let sig = start_signaling_full(
        &[talk.base()],
        "max_stream_bitrate = 2000000",
        "max_stream_bitrate = 500000\nmax_screen_bitrate = 9000000",
    )
    .await;
    let (mut a, _) = Client::hello_v1(&sig.ws_url(), &talk.auth_url(), "alice").await;
    let r = a.join("room1", "talk-a").await;
    assert_eq!(
        r["room"]["bandwidth"],
        json!({"maxstreambitrate": 500_000, "maxscreenbitrate": 2_097_152}),
        "{r}"
    );
    // Every join reply says the same; the join events carry no caps.
    let (mut b, _) = Client::hello_v1(&sig.ws_url(), &talk.auth_url(), "bob").await;
    let rb = b.join("room1", "talk-b").await;
    assert_eq!(rb["room"]["bandwidth"]["maxstreambitrate"], 500_000);
    let j = a.recv_event("room", "join").await;
    assert!(j.get("bandwidth").is_none(), "{j}");
}
