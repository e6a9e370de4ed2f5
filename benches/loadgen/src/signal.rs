//! The two control planes the load generator drives with the same load shape: talkbox's
//! spreed `/proxy` protocol (what its signaling server uses towards the SFU) and Janus's
//! VideoRoom API over the Janus WebSocket transport (what nextcloud-spreed-signaling uses
//! towards Janus). Requests are sequential; replies are matched by id / transaction, and
//! unrelated events in between are skipped.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Largest control message accepted (SDPs are a few KiB).
const MAX_MESSAGE: usize = 1 << 20;
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

async fn next_json(ws: &mut Ws) -> Result<Value> {
    loop {
        let m = tokio::time::timeout(REPLY_TIMEOUT, ws.next())
            .await
            .map_err(|_| anyhow!("no control message within {REPLY_TIMEOUT:?}"))?
            .ok_or_else(|| anyhow!("control WebSocket closed"))?
            .context("reading the control WebSocket")?;
        if let Message::Text(t) = m {
            if t.len() > MAX_MESSAGE {
                bail!("control message of {} bytes (limit {MAX_MESSAGE})", t.len());
            }
            return serde_json::from_str(t.as_str()).context("control message is not JSON");
        }
    }
}

/// A subscription as the server names it.
#[derive(Clone, Debug)]
pub enum SubRef {
    Proxy(String),
    Janus(u64),
}

/// A publisher as the server names it: the proxy client id, or Janus (room, feed id).
#[derive(Clone, Debug)]
pub enum PubRef {
    Proxy(String),
    Janus(u64, u64),
}

pub enum Control {
    Proxy { ws: Ws, next: u64 },
    Janus { ws: Ws, next: u64, session: u64 },
}

/// An RS256 hello token for talkbox's `/proxy`, signed with the box's proxy token key.
fn proxy_token(key_pem: &str, token_id: &str) -> Result<String> {
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(key_pem.as_bytes())
        .context("proxy token key is not an RSA PEM key")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &json!({"iss": token_id, "iat": now}),
        &key,
    )
    .context("signing the hello token")
}

impl Control {
    pub async fn proxy(url: &str, key_pem: &str) -> Result<Control> {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let mut c = Control::Proxy { ws, next: 1 };
        let token = proxy_token(key_pem, "talkbox-signaling")?;
        let r = c
            .proxy_request(json!({"type":"hello","hello":{"version":"1.0","token": token}}))
            .await?;
        if r["type"] != "hello" {
            bail!("/proxy hello refused: {r}");
        }
        Ok(c)
    }

    pub async fn janus(url: &str) -> Result<Control> {
        let mut req = url
            .into_client_request()
            .with_context(|| format!("Janus URL {url}"))?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "janus-protocol".parse().context("header value")?,
        );
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let mut c = Control::Janus {
            ws,
            next: 1,
            session: 0,
        };
        let r = c.janus_request(json!({"janus":"create"}), false).await?;
        let id = r["data"]["id"]
            .as_u64()
            .ok_or_else(|| anyhow!("Janus create: no session id in {r}"))?;
        if let Control::Janus { session, .. } = &mut c {
            *session = id;
        }
        Ok(c)
    }

    async fn proxy_request(&mut self, mut msg: Value) -> Result<Value> {
        let Control::Proxy { ws, next } = self else {
            bail!("not a /proxy connection");
        };
        let id = next.to_string();
        *next += 1;
        msg["id"] = json!(id);
        ws.send(Message::Text(msg.to_string().into()))
            .await
            .context("sending to /proxy")?;
        loop {
            let r = next_json(ws).await?;
            if r["id"] == json!(id) {
                if r["type"] == "error" {
                    bail!("/proxy error for {msg}: {r}");
                }
                return Ok(r);
            }
        }
    }

    /// A Janus request; with `wait_event`, skips the "ack" and returns the plugin event that
    /// carries the same transaction.
    async fn janus_request(&mut self, mut msg: Value, wait_event: bool) -> Result<Value> {
        let Control::Janus { ws, next, session } = self else {
            bail!("not a Janus connection");
        };
        let tx = format!("t{next}");
        *next += 1;
        msg["transaction"] = json!(tx);
        if *session != 0 {
            msg["session_id"] = json!(*session);
        }
        ws.send(Message::Text(msg.to_string().into()))
            .await
            .context("sending to Janus")?;
        loop {
            let r = next_json(ws).await?;
            if r["transaction"] != json!(tx) {
                continue;
            }
            match r["janus"].as_str() {
                Some("ack") if wait_event => continue,
                Some("error") => bail!("Janus error for {msg}: {r}"),
                _ => {}
            }
            if let Some(e) = r["plugindata"]["data"]["error"].as_str() {
                bail!("Janus VideoRoom error for {msg}: {e}");
            }
            return Ok(r);
        }
    }

    async fn janus_attach(&mut self) -> Result<u64> {
        let r = self
            .janus_request(
                json!({"janus":"attach","plugin":"janus.plugin.videoroom"}),
                false,
            )
            .await?;
        r["data"]["id"]
            .as_u64()
            .ok_or_else(|| anyhow!("Janus attach: no handle id in {r}"))
    }

    async fn janus_message(
        &mut self,
        handle: u64,
        body: Value,
        jsep: Option<Value>,
    ) -> Result<Value> {
        let mut m = json!({"janus":"message","handle_id": handle, "body": body});
        if let Some(j) = jsep {
            m["jsep"] = j;
        }
        self.janus_request(m, true).await
    }

    /// Creates room `room` (Janus); talkbox's proxy has no rooms (the signaling server keeps
    /// them), so there it is a no-op.
    pub async fn create_room(&mut self, room: u64, publishers: usize) -> Result<()> {
        if let Control::Proxy { .. } = self {
            return Ok(());
        }
        let h = self.janus_attach().await?;
        let r = self
            .janus_request(
                json!({"janus":"message","handle_id": h, "body": {
                    "request":"create","room": room,"publishers": publishers.max(2),
                    "bitrate": 0,"audiocodec":"opus","videocodec":"vp8",
                    "notify_joining": false,"permanent": false}}),
                false,
            )
            .await?;
        if r["plugindata"]["data"]["videoroom"] != "created" {
            bail!("Janus room {room} not created: {r}");
        }
        self.janus_request(json!({"janus":"detach","handle_id": h}), false)
            .await?;
        Ok(())
    }

    /// Publishes `offer` in `room`; returns the publisher and the SFU's answer.
    pub async fn publish(&mut self, room: u64, n: u32, offer: &str) -> Result<(PubRef, String)> {
        match self {
            Control::Proxy { .. } => {
                let r = self
                    .proxy_request(json!({"type":"command","command":{"type":"create-publisher","streamType":"video","publisherSettings":{"bitrate":1_200_000,"mediatypes":3}}}))
                    .await?;
                let id = r["command"]["id"]
                    .as_str()
                    .ok_or_else(|| anyhow!("create-publisher: no id in {r}"))?
                    .to_string();
                let r = self
                    .proxy_request(json!({"type":"payload","payload":{"type":"offer","clientId": id,"payload":{"type":"offer","sdp": offer}}}))
                    .await?;
                let answer = r["payload"]["payload"]["sdp"]
                    .as_str()
                    .ok_or_else(|| anyhow!("publisher offer: no answer in {r}"))?
                    .to_string();
                Ok((PubRef::Proxy(id), answer))
            }
            Control::Janus { .. } => {
                let h = self.janus_attach().await?;
                let r = self
                    .janus_message(
                        h,
                        json!({"request":"join","ptype":"publisher","room": room,"display": format!("p{n}")}),
                        None,
                    )
                    .await?;
                let feed = r["plugindata"]["data"]["id"]
                    .as_u64()
                    .ok_or_else(|| anyhow!("Janus join: no feed id in {r}"))?;
                let r = self
                    .janus_message(
                        h,
                        json!({"request":"configure","audio": true,"video": true}),
                        Some(json!({"type":"offer","sdp": offer,"trickle": false})),
                    )
                    .await?;
                let answer = r["jsep"]["sdp"]
                    .as_str()
                    .ok_or_else(|| anyhow!("Janus configure: no answer in {r}"))?
                    .to_string();
                Ok((PubRef::Janus(room, feed), answer))
            }
        }
    }

    /// Subscribes to `publisher`; returns the subscription and the SFU's offer.
    pub async fn subscribe(&mut self, publisher: &PubRef) -> Result<(SubRef, String)> {
        match publisher {
            PubRef::Proxy(id) => {
                let r = self
                    .proxy_request(json!({"type":"command","command":{"type":"create-subscriber","publisherId": id,"streamType":"video"}}))
                    .await?;
                let sub = r["command"]["id"]
                    .as_str()
                    .ok_or_else(|| anyhow!("create-subscriber: no id in {r}"))?
                    .to_string();
                let r = self
                    .proxy_request(
                        json!({"type":"payload","payload":{"type":"requestoffer","clientId": sub}}),
                    )
                    .await?;
                let offer = r["payload"]["payload"]["sdp"]
                    .as_str()
                    .ok_or_else(|| anyhow!("requestoffer: no offer in {r}"))?
                    .to_string();
                Ok((SubRef::Proxy(sub), offer))
            }
            PubRef::Janus(room, feed) => {
                let h = self.janus_attach().await?;
                // Janus reports "No such feed" until it has processed the publisher's
                // webrtcup, which can trail the client's own "connected" on a loaded machine.
                let mut tries = 0;
                let r = loop {
                    let r = self
                        .janus_message(
                            h,
                            json!({"request":"join","ptype":"subscriber","room": room,"streams":[{"feed": feed}]}),
                            None,
                        )
                        .await;
                    match r {
                        Err(e) if tries < 50 && format!("{e:#}").contains("No such feed") => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        r => break r?,
                    }
                };
                let offer = r["jsep"]["sdp"]
                    .as_str()
                    .ok_or_else(|| anyhow!("Janus subscriber join: no offer in {r}"))?
                    .to_string();
                Ok((SubRef::Janus(h), offer))
            }
        }
    }

    pub async fn answer(&mut self, sub: &SubRef, answer: &str) -> Result<()> {
        match sub {
            SubRef::Proxy(id) => {
                self.proxy_request(json!({"type":"payload","payload":{"type":"answer","clientId": id,"payload":{"type":"answer","sdp": answer}}}))
                    .await?;
            }
            SubRef::Janus(h) => {
                self.janus_message(
                    *h,
                    json!({"request":"start"}),
                    Some(json!({"type":"answer","sdp": answer,"trickle": false})),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Ends the control session (talkbox closes the connection's clients, Janus its handles).
    pub async fn close(mut self) -> Result<()> {
        if let Control::Janus { .. } = self {
            self.janus_request(json!({"janus":"destroy"}), false)
                .await?;
        }
        let (Control::Proxy { ws, .. } | Control::Janus { ws, .. }) = &mut self;
        let _ = ws.close(None).await;
        Ok(())
    }
}
