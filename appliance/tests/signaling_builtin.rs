//! The built-in backend against the real `talkbox signaling` process: room API, password,
//! hello v2 with the box's token, room join through the same `room` request path as Talk's,
//! permissions, in-call updates; and the session timers of anonymous sessions (10 s to join a
//! room, 30 s to resume), measured on the binary.

mod signaling_common;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use signaling_common::*;

async fn post(sig: &Signaling, path: &str, body: &Value) -> (u16, Value) {
    post_json(sig.http, path, body).await
}

async fn hello_builtin(sig: &Signaling, grant: &Value) -> (Client, Value) {
    let mut c = Client::connect(&sig.ws_url()).await;
    c.send(json!({"id":"1","type":"hello","hello":{"version":"2.0","auth":{"url":grant["url"],"params":{"token":grant["token"]}}}}))
        .await;
    let h = c.recv().await;
    (c, h)
}

async fn started() -> (FakeTalk, Signaling) {
    let talk = start_fake_talk(String::new()).await;
    let sig = start_signaling(&talk.base(), "").await;
    (talk, sig)
}

#[tokio::test]
async fn stand_alone_room_with_password_joins_through_hello_v2_and_the_room_request() {
    let (_talk, sig) = started().await;
    let (status, created) = post(
        &sig,
        "/api/v1/rooms",
        &json!({"id":"board-room","name":"Board","password":"open sesame"}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["link"], "/r/board-room");
    let key = created["moderator_key"].as_str().expect("moderator key");
    let (status, _, info) = http_get(sig.http, "/api/v1/rooms/board-room").await;
    assert_eq!(status, 200);
    let info: Value = serde_json::from_str(&info).expect("json");
    assert_eq!(
        info,
        json!({"id":"board-room","name":"Board","password":true})
    );
    assert!(
        std::fs::read_to_string(sig.data.root.join("rooms/rooms.json"))
            .expect("room file")
            .contains("$argon2id$"),
        "the password is stored as an argon2id hash"
    );

    let (status, e) = post(
        &sig,
        "/api/v1/rooms/board-room/join",
        &json!({"displayname":"Eve","password":"guess"}),
    )
    .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (403, Some("wrong_password"))
    );

    let (status, mod_grant) = post(
        &sig,
        "/api/v1/rooms/board-room/join",
        &json!({"displayname":"Alice","password":"open sesame","moderator_key":key}),
    )
    .await;
    assert_eq!(status, 200, "{mod_grant}");
    assert_eq!(mod_grant["moderator"], true);
    let (_, guest_grant) = post(
        &sig,
        "/api/v1/rooms/board-room/join",
        &json!({"displayname":"Bob","password":"open sesame"}),
    )
    .await;
    assert_eq!(guest_grant["moderator"], false);

    let (mut alice, h) = hello_builtin(&sig, &mod_grant).await;
    assert_eq!(h["type"], "hello", "{h}");
    assert_eq!(h["hello"]["userid"], "");
    assert_eq!(h["hello"]["user"]["displayname"], "Alice");
    let r = alice
        .join("board-room", mod_grant["sessionid"].as_str().expect("sid"))
        .await;
    assert_eq!(r["room"]["properties"]["name"], "Board", "{r}");

    let (mut bob, bob_hello) = hello_builtin(&sig, &guest_grant).await;
    // Bob's room session id is his own: Alice's is refused for him.
    bob.send(json!({"id":"x","type":"room","room":{"roomid":"board-room","sessionid":"forged"}}))
        .await;
    let e = bob.recv_type("error").await;
    assert_eq!(e["error"]["code"], "no_such_room", "{e}");
    let r = bob
        .join(
            "board-room",
            guest_grant["sessionid"].as_str().expect("sid"),
        )
        .await;
    assert_eq!(r["room"]["roomid"], "board-room");
    // Alice first got the list of everyone at her own join; then Bob's join.
    let mine = alice.recv_event("room", "join").await;
    assert_eq!(mine["join"][0]["user"]["displayname"], "Alice", "{mine}");
    let joined = alice.recv_event("room", "join").await;
    assert_eq!(joined["join"][0]["user"]["displayname"], "Bob", "{joined}");

    // Only the moderator has `control`.
    let alice_sid = h["hello"]["sessionid"].clone();
    let bob_sid = bob_hello["hello"]["sessionid"].clone();
    bob.send(json!({"type":"control","control":{"recipient":{"type":"session","sessionid":alice_sid},"data":{"action":"forceMute"}}}))
        .await;
    assert!(alice.try_recv(Duration::from_millis(300)).await.is_none());
    alice.send(json!({"type":"control","control":{"recipient":{"type":"session","sessionid":bob_sid},"data":{"action":"forceMute"}}}))
        .await;
    let c = bob.recv_type("control").await;
    assert_eq!(c["control"]["data"]["action"], "forceMute");

    // Joining the call reaches everyone as Talk's participants update, with signaling ids.
    let (status, _) = post(
        &sig,
        "/api/v1/rooms/board-room/incall",
        &json!({"sessionid": guest_grant["sessionid"], "incall": 7}),
    )
    .await;
    assert_eq!(status, 200);
    let ev = alice.recv_event("participants", "update").await;
    let users = ev["update"]["users"].as_array().expect("users");
    assert_eq!(users.len(), 1, "{ev}");
    assert_eq!(users[0]["inCall"], 7);
    assert!(
        users[0]["sessionId"]
            .as_str()
            .is_some_and(|s| s != guest_grant["sessionid"])
    );
}

#[tokio::test]
async fn a_link_creates_the_room_and_bad_requests_are_refused() {
    let (_talk, sig) = started().await;
    let (status, _, _) = http_get(sig.http, "/api/v1/rooms/new-room").await;
    assert_eq!(status, 404);
    let (status, g) = post(
        &sig,
        "/api/v1/rooms/new-room/join",
        &json!({"displayname":"Carol"}),
    )
    .await;
    assert_eq!(status, 200, "{g}");
    assert_eq!(g["moderator"], true);
    assert!(g["moderator_key"].is_string());
    let (status, _, _) = http_get(sig.http, "/api/v1/rooms/new-room").await;
    assert_eq!(status, 200);
    for (path, body, code) in [
        ("/api/v1/rooms/a%2Fb/join", json!({"displayname":"x"}), 400),
        (
            "/api/v1/rooms/new-room/join",
            json!({"displayname":""}),
            400,
        ),
        ("/api/v1/rooms/new-room/join", json!({"displayname":5}), 400),
        ("/api/v1/rooms", json!({"id":"new-room"}), 409),
        ("/api/v1/rooms", json!({"id":"x"}), 400),
        (
            "/api/v1/rooms/new-room/incall",
            json!({"sessionid":"nope","incall":1}),
            404,
        ),
    ] {
        let (status, v) = post(&sig, path, &body).await;
        assert_eq!(status, code, "{path} {body}: {v}");
    }
    let (status, _) = post(&sig, "/api/v1/rooms", &json!({"name": "x".repeat(5000)})).await;
    assert_eq!(status, 413);
    // The built-in backend takes no backend requests over HTTP, whatever the checksum.
    let (status, _, _) = backend_post(
        sig.http,
        "new-room",
        &json!({"type":"message","message":{"data":{}}}),
        "",
        Some("talkbox:builtin"),
    )
    .await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn anonymous_session_must_join_within_10_s_and_a_lost_one_resumes_only_for_30_s() {
    let (_talk, sig) = started().await;
    let (_, grant) = post(
        &sig,
        "/api/v1/rooms/timer-room/join",
        &json!({"displayname":"T"}),
    )
    .await;
    let (mut idle, h) = hello_builtin(&sig, &grant).await;
    assert_eq!(h["type"], "hello");
    let start = Instant::now();
    let bye = idle
        .try_recv(Duration::from_secs(13))
        .await
        .expect("a bye before 13 s");
    assert_eq!(bye["bye"]["reason"], "room_join_timeout", "{bye}");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited <= Duration::from_secs(12),
        "{waited:?}"
    );

    // A session in a room whose connection drops can resume for 30 s, not longer.
    let (_, grant) = post(
        &sig,
        "/api/v1/rooms/timer-room/join",
        &json!({"displayname":"U"}),
    )
    .await;
    let (mut c, h) = hello_builtin(&sig, &grant).await;
    c.join("timer-room", grant["sessionid"].as_str().expect("sid"))
        .await;
    let resume = h["hello"]["resumeid"].clone();
    drop(c);
    tokio::time::sleep(Duration::from_secs(25)).await;
    let mut again = Client::connect(&sig.ws_url()).await;
    again
        .send(json!({"id":"r","type":"hello","hello":{"version":"2.0","resumeid":resume}}))
        .await;
    let r = again.recv().await;
    assert_eq!(r["type"], "hello", "resumed after 25 s: {r}");
    drop(again);
    tokio::time::sleep(Duration::from_secs(32)).await;
    let mut late = Client::connect(&sig.ws_url()).await;
    late.send(json!({"id":"r","type":"hello","hello":{"version":"2.0","resumeid":resume}}))
        .await;
    let r = late.recv().await;
    assert_eq!(r["error"]["code"], "no_such_session", "after 32 s: {r}");
}
