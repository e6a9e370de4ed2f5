//! The spreed signaling *proxy* protocol as the SFU serves it on `/proxy`: the JSON shapes of
//! client (signaling server) and server (SFU) messages, following upstream `proxy/api.go`.
//!
//! Only the shapes live here; what a message does is `server.rs`'s business.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Largest WebSocket message accepted from a signaling server (SDPs are a few KiB).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

#[derive(Debug, Deserialize)]
pub struct ClientMessage {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub hello: Option<HelloClient>,
    #[serde(default)]
    pub command: Option<CommandClient>,
    #[serde(default)]
    pub payload: Option<PayloadClient>,
}

#[derive(Debug, Deserialize)]
pub struct HelloClient {
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub resumeid: String,
    #[serde(default)]
    pub token: String,
}

#[derive(Debug, Deserialize)]
pub struct CommandClient {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub sid: String,
    #[serde(default, rename = "streamType")]
    pub stream_type: String,
    #[serde(default, rename = "publisherId")]
    pub publisher_id: String,
    #[serde(default, rename = "clientId")]
    pub client_id: String,
    #[serde(default, rename = "remoteUrl")]
    pub remote_url: String,
    #[serde(default, rename = "publisherSettings")]
    pub publisher_settings: Option<Value>,
    #[serde(default)]
    pub bitrate: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct PayloadClient {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, rename = "clientId")]
    pub client_id: String,
    #[serde(default)]
    pub sid: String,
    #[serde(default)]
    pub payload: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServerMessage {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hello: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bye: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<Value>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ErrorBody {
    pub code: &'static str,
    pub message: String,
}

impl ServerMessage {
    fn empty(id: Option<String>, kind: &'static str) -> Self {
        Self {
            id,
            kind,
            error: None,
            hello: None,
            bye: None,
            command: None,
            payload: None,
            event: None,
        }
    }
    pub fn error(id: Option<String>, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            error: Some(ErrorBody {
                code,
                message: message.into(),
            }),
            ..Self::empty(id, "error")
        }
    }
    pub fn hello(id: Option<String>, body: Value) -> Self {
        Self {
            hello: Some(body),
            ..Self::empty(id, "hello")
        }
    }
    pub fn bye(reason: &str) -> Self {
        Self {
            bye: Some(serde_json::json!({ "reason": reason })),
            ..Self::empty(None, "bye")
        }
    }
    pub fn command(id: Option<String>, body: Value) -> Self {
        Self {
            command: Some(body),
            ..Self::empty(id, "command")
        }
    }
    pub fn payload(id: Option<String>, body: Value) -> Self {
        Self {
            payload: Some(body),
            ..Self::empty(id, "payload")
        }
    }
    pub fn event(body: Value) -> Self {
        Self {
            event: Some(body),
            ..Self::empty(None, "event")
        }
    }
}

/// Upstream's error codes, with their messages.
pub mod errors {
    pub const INVALID_FORMAT: (&str, &str) = ("invalid_format", "Invalid data format.");
    pub const HELLO_EXPECTED: (&str, &str) = ("hello_expected", "Expected Hello request.");
    pub const NO_SUCH_SESSION: (&str, &str) =
        ("no_such_session", "The session to resume does not exist.");
    pub const AUTH_FAILED: (&str, &str) = ("auth_failed", "The token could not be authenticated.");
    pub const TOKEN_EXPIRED: (&str, &str) = ("token_expired", "The token is expired.");
    pub const TOKEN_NOT_VALID_YET: (&str, &str) =
        ("token_not_valid_yet", "The token is not valid yet.");
    pub const UNKNOWN_CLIENT: (&str, &str) = ("unknown_client", "Unknown client id given.");
    pub const UNSUPPORTED_COMMAND: (&str, &str) = ("bad_request", "Unsupported command received.");
    pub const UNSUPPORTED_MESSAGE: (&str, &str) = ("bad_request", "Unsupported message received.");
    pub const UNSUPPORTED_PAYLOAD: (&str, &str) =
        ("unsupported_payload", "Unsupported payload type.");
    pub const REMOTE_UNSUPPORTED: (&str, &str) = (
        "unsupported_subscriber",
        "Remote subscribers are not supported.",
    );
    pub const SHUTDOWN_SCHEDULED: (&str, &str) =
        ("shutdown_scheduled", "The server is scheduled to shutdown.");
}
