//! The JSON shapes of the client API (`/spreed`) and the feature ids, as the spreed standalone
//! signaling API v1 defines them (reference/signaling-protocol.md §1).
//!
//! Client frames are parsed into typed structs; everything the protocol treats as opaque (message
//! `data`, room properties, user data) stays a `serde_json::Value` and is passed through untouched.
//! Server frames are built by the helpers at the end, so every reply has one shape. This module
//! does no I/O and keeps no state.

use serde::Deserialize;
use serde_json::{Value, json};

/// Version we announce in `welcome`, `hello.server` and `/api/v1/welcome`.
pub const SERVER_VERSION: &str = concat!("talkbox-", env!("CARGO_PKG_VERSION"));

/// Largest WebSocket frame a client may send (upstream `maxMessageSize`).
pub const MAX_FRAME_BYTES: usize = 64 * 1024;

/// Features every client is told about (`welcome`, `hello.server.features`, the HTTP header).
pub const FEATURES: &[&str] = &[
    "audio-video-permissions",
    "chat-relay",
    "dialout",
    "federation",
    "hello-v2",
    "incall-all",
    "join-features",
    "recipient-call",
    "serverinfo",
    "switchto",
    "transient-data",
    "transient-sessiondata",
    "virtual-sessions",
    "welcome",
];

/// Added while an SFU is connected (upstream `Hub.SetMcu`).
pub const SFU_FEATURES: &[&str] = &["mcu", "simulcast", "update-sdp"];

/// Features sent to internal clients in their hello reply.
pub const INTERNAL_FEATURES: &[&str] = &["virtual-sessions"];

/// The feature list for the current SFU state, sorted as upstream sends it.
pub fn features(sfu_connected: bool) -> Vec<&'static str> {
    let mut f: Vec<&'static str> = FEATURES.to_vec();
    if sfu_connected {
        f.extend_from_slice(SFU_FEATURES);
    }
    f.sort_unstable();
    f
}

/// One frame from a client.
#[derive(Debug, Deserialize)]
pub struct ClientMessage {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub hello: Option<HelloClient>,
    #[serde(default)]
    pub room: Option<RoomClient>,
    #[serde(default)]
    pub message: Option<MessageClient>,
    #[serde(default)]
    pub control: Option<MessageClient>,
    #[serde(default)]
    pub internal: Option<InternalClient>,
    #[serde(default)]
    pub transient: Option<TransientClient>,
}

#[derive(Debug, Deserialize)]
pub struct HelloClient {
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub features: Vec<String>,
    #[serde(default)]
    pub resumeid: Option<String>,
    #[serde(default)]
    pub auth: Option<HelloAuth>,
}

#[derive(Debug, Deserialize)]
pub struct HelloAuth {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub params: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct RoomClient {
    #[serde(default)]
    pub roomid: String,
    #[serde(default)]
    pub sessionid: Option<String>,
    #[serde(default)]
    pub federation: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct MessageClient {
    pub recipient: Recipient,
    #[serde(default)]
    pub data: Value,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Recipient {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub sessionid: Option<String>,
    #[serde(default)]
    pub userid: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct TransientClient {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub value: Option<Value>,
    /// Time to live in nanoseconds; 0 or absent = until removed.
    #[serde(default)]
    pub ttl: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct InternalClient {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub addsession: Option<AddSession>,
    #[serde(default)]
    pub updatesession: Option<UpdateSession>,
    #[serde(default)]
    pub removesession: Option<RemoveSession>,
    #[serde(default)]
    pub incall: Option<InternalInCall>,
    #[serde(default)]
    pub dialout: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct AddSession {
    pub sessionid: String,
    pub roomid: String,
    #[serde(default)]
    pub userid: Option<String>,
    #[serde(default)]
    pub user: Option<Value>,
    #[serde(default)]
    pub flags: Option<u32>,
    #[serde(default)]
    pub incall: Option<u32>,
    #[serde(default)]
    pub options: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct UpdateSession {
    pub sessionid: String,
    pub roomid: String,
    #[serde(default)]
    pub flags: Option<u32>,
    #[serde(default)]
    pub incall: Option<u32>,
}

#[derive(Debug, Deserialize)]
pub struct RemoveSession {
    pub sessionid: String,
    pub roomid: String,
    #[serde(default)]
    pub userid: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct InternalInCall {
    pub incall: u32,
}

/// An error reply (`{"type":"error","error":{code,message,details}}`).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: String,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_string(),
            message: message.into(),
            details: None,
        }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn to_json(&self, id: Option<&str>) -> Value {
        let mut e = json!({"code": self.code, "message": self.message});
        if let Some(d) = &self.details {
            e["details"] = d.clone();
        }
        with_id(json!({"type": "error", "error": e}), id)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// Adds the request id to a reply when the request had one.
pub fn with_id(mut v: Value, id: Option<&str>) -> Value {
    if let Some(id) = id {
        v["id"] = Value::String(id.to_string());
    }
    v
}

pub fn welcome(sfu_connected: bool) -> Value {
    json!({"type": "welcome", "welcome": {"version": SERVER_VERSION, "features": features(sfu_connected)}})
}

pub fn bye(reason: &str, id: Option<&str>) -> Value {
    with_id(json!({"type": "bye", "bye": {"reason": reason}}), id)
}

pub fn event(target: &str, kind: &str, payload: Value) -> Value {
    let mut e = json!({"target": target, "type": kind});
    e[kind] = payload;
    json!({"type": "event", "event": e})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_carry_what_talk_requires_and_sfu_flags_only_with_an_sfu() {
        let f = features(false);
        for needed in [
            "audio-video-permissions",
            "federation",
            "incall-all",
            "hello-v2",
            "switchto",
        ] {
            assert!(f.contains(&needed), "{needed}");
        }
        assert!(!f.contains(&"mcu"));
        let f = features(true);
        assert!(f.contains(&"mcu") && f.contains(&"simulcast") && f.contains(&"update-sdp"));
    }

    #[test]
    fn error_reply_echoes_the_request_id() {
        let v = ApiError::new("no_such_session", "gone").to_json(Some("7"));
        assert_eq!(
            v,
            json!({"id":"7","type":"error","error":{"code":"no_such_session","message":"gone"}})
        );
    }

    #[test]
    fn hello_parses_with_unknown_fields_ignored() {
        let m: ClientMessage = serde_json::from_str(
            r#"{"id":"1","type":"hello","hello":{"version":"2.0","x":1,"auth":{"url":"u","params":{"token":"t"}}}}"#,
        )
        .expect("parses");
        assert_eq!(m.kind, "hello");
        assert_eq!(
            m.hello.expect("hello").auth.expect("auth").url.as_deref(),
            Some("u")
        );
    }
}
