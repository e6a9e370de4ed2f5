//! Criterion micro-benchmark of signaling's per-message hot path: one client `message` frame
//! addressed to the room, parsed from its JSON text and fanned out by the sans-I/O hub to every
//! other member of a 10-session room (`Hub::route`, which serialises the outgoing frame once and
//! shares it). Sockets and the WebSocket codec are not included.

use std::time::Instant;

use appliance::signaling::api::ClientMessage;
use appliance::signaling::hub::{ClientType, Hub, NewSession, Target};
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;

fn fanout(c: &mut Criterion) {
    let now = Instant::now();
    let mut hub = Hub::new();
    let mut sids = Vec::new();
    for i in 0..10 {
        let sid = hub.next_sid();
        hub.add_session(
            sid,
            format!("public-{sid}"),
            format!("private-{sid}"),
            NewSession {
                backend: "nc".into(),
                backend_url: String::new(),
                client_type: ClientType::Client,
                user_id: format!("user{i}"),
                user_data: None,
                features: vec![],
            },
            now,
        );
        hub.join_room(
            sid,
            "room1",
            Some(format!("talk-{i}")),
            json!({"name": "Bench"}),
            None,
            None,
            None,
        );
        sids.push(sid);
    }
    // What a Talk client sends while in a call: a small room-wide status message.
    let text = json!({
        "id": "42",
        "type": "message",
        "message": {
            "recipient": {"type": "room"},
            "data": {"type": "nickChanged", "payload": {"name": "Alice Example"}, "roomType": "video"}
        }
    })
    .to_string();
    let mut g = c.benchmark_group("signaling");
    g.bench_function("parse + fan out one room message to 9 others", |b| {
        b.iter(|| {
            let m: ClientMessage = serde_json::from_str(&text).expect("valid frame");
            let msg = m.message.expect("message body");
            let out = hub
                .route(sids[0], Target::Room, &msg, false)
                .expect("routed");
            assert_eq!(out.frames.len(), 9);
            out.frames.len()
        })
    });
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
