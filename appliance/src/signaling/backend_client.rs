//! The seam between the signaling server and whatever answers Talk's signaling backend
//! requests: [`BackendClient`].
//!
//! Two implement it: [`super::nextcloud::NextcloudClient`] posts the requests to a Nextcloud
//! over HTTPS; [`super::builtin::BuiltinBackend`] answers them in-process for stand-alone rooms.
//! Both get the same JSON bodies (`{"type":"room","room":{…}}`, `ping`, `auth`) and give the
//! same answers (the OCS `data`), so hello v2, room joins, permissions and pings run through one
//! code path whichever backend a session belongs to. The request builders below are that path.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{Value, json};

use super::api::ApiError;
use super::backends::Backend;
use super::nextcloud::Capabilities;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub trait BackendClient: Send + Sync {
    /// Talk's capabilities for the backend at `url` (hello-v2 key, features, ping batch size).
    fn capabilities<'a>(&'a self, url: &'a str, refresh: bool) -> BoxFuture<'a, Arc<Capabilities>>;

    /// One signaling backend request; returns the answer's `data`, or Talk's error as an error.
    fn request<'a>(
        &'a self,
        backend: &'a Backend,
        url: &'a str,
        body: &'a Value,
    ) -> BoxFuture<'a, Result<Value, ApiError>>;
}

/// `auth` (hello v1): returns (user id, user data).
pub async fn auth(
    client: &dyn BackendClient,
    backend: &Backend,
    url: &str,
    params: &Value,
) -> Result<(String, Option<Value>), ApiError> {
    let body = json!({"type":"auth","auth":{"version":"1.0","params":params}});
    let d = client.request(backend, url, &body).await?;
    if d["type"] != "auth" {
        return Err(ApiError::new(
            "auth_failed",
            "The backend did not confirm the ticket.",
        ));
    }
    let user = d["auth"]["userid"].as_str().unwrap_or("").to_string();
    Ok((
        user,
        d["auth"].get("user").cloned().filter(|u| !u.is_null()),
    ))
}

/// `room` join or leave; returns the `room` object of the answer.
pub async fn room(
    client: &dyn BackendClient,
    backend: &Backend,
    url: &str,
    room: &str,
    user: &str,
    talk_session: &str,
    leave: bool,
) -> Result<Value, ApiError> {
    let mut r = json!({"version":"1.0","roomid":room,"userid":user,"sessionid":talk_session});
    if leave {
        r["action"] = Value::String("leave".into());
    }
    let d = client
        .request(backend, url, &json!({"type":"room","room":r}))
        .await?;
    if d["type"] != "room" {
        return Err(ApiError::new(
            "room_join_failed",
            "The backend did not confirm the room.",
        ));
    }
    Ok(d["room"].clone())
}

/// `ping` for Talk sessions of one room: [(user id, Talk session id)].
pub async fn ping(
    client: &dyn BackendClient,
    backend: &Backend,
    url: &str,
    room: &str,
    entries: &[(String, String)],
) -> Result<(), ApiError> {
    let entries: Vec<Value> = entries
        .iter()
        .map(|(u, s)| json!({"userid": u, "sessionid": s}))
        .collect();
    let body = json!({"type":"ping","ping":{"version":"1.0","roomid":room,"entries":entries}});
    client.request(backend, url, &body).await.map(|_| ())
}
