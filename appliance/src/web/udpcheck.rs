//! The "UDP media port reachable" self-check: a real WebRTC test call from the admin's browser
//! to the SFU.
//!
//! The box cannot send itself a datagram from outside, and a plain STUN answer on the media
//! port proves nothing in Chromium without NAT (a server-reflexive candidate equal to the host
//! candidate is dropped, so an answer looks like no answer; measured in session 4). What does
//! prove the path is a call: the page makes an RTCPeerConnection with no ICE servers (so only
//! a direct path can work), offers a silent audio track, and this module has the SFU answer it
//! as a short-lived publisher over the SFU's own control protocol (`/proxy`, the same one the
//! signaling server speaks, docs/sfu-proxy-protocol.md). The SFU is ICE-lite with one UDP host
//! candidate per announced address on its media port, so a pair that reaches `connected`
//! (ICE checks both ways, then DTLS) is UDP to the media port; the page still reads the
//! selected pair from getStats and says which address and port it reached.
//!
//! Limits: one check at a time (a second gets 409), offers of at most [`MAX_SDP_BYTES`], the
//! SFU connection held at most [`HOLD`] and then the publisher deleted. The web process holds
//! the proxy token key for this (read as root before it drops privileges, like the signaling
//! service): it can create SFU publishers, which the internet-facing signaling service can too.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::signaling::proxy_client::{MEDIA_AUDIO, ProxyClient};

/// Largest offer the page may send (the SFU's own limit is 64 KiB).
pub const MAX_SDP_BYTES: usize = 64 * 1024;
/// How long the test publisher lives: the page needs a few seconds for ICE and DTLS.
pub const HOLD: Duration = Duration::from_secs(20);
/// Each step of the exchange with the SFU.
const STEP: Duration = Duration::from_secs(10);
/// Largest frame accepted from the SFU.
const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// What the web service needs to talk to its SFU.
pub struct SfuProbe {
    url: String,
    client: ProxyClient,
    busy: AtomicBool,
}

/// Why the check cannot run on this box (shown as the check's result).
pub type Unavailable = String;

impl SfuProbe {
    /// `url` is `signaling.sfu_url` as resolved; `key_pem` the proxy token key.
    pub fn new(url: &str, key_pem: &str, box_cert_pem: Option<&[u8]>) -> Result<Self> {
        Ok(Self {
            url: url.to_string(),
            client: ProxyClient::new(url, key_pem, box_cert_pem)?,
            busy: AtomicBool::new(false),
        })
    }

    /// Has the SFU answer `offer` as a test publisher; returns the answer SDP. The publisher
    /// lives [`HOLD`], then it is deleted. `Err(None)` when a check is already running.
    pub async fn answer(self: &Arc<Self>, offer: String) -> Result<String, Option<String>> {
        if self.busy.swap(true, Ordering::AcqRel) {
            return Err(None);
        }
        let me = self.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let r = me.run(offer, tx).await;
            if let Err(e) = r {
                tracing::info!(error = %format!("{e:#}"), "UDP self-check: SFU exchange ended");
            }
            me.busy.store(false, Ordering::Release);
        });
        match rx.await {
            Ok(Ok(sdp)) => Ok(sdp),
            Ok(Err(e)) => Err(Some(e)),
            Err(_) => Err(Some("the SFU exchange ended without an answer".into())),
        }
    }

    async fn run(
        &self,
        offer: String,
        done: tokio::sync::oneshot::Sender<Result<String, String>>,
    ) -> Result<()> {
        let uri: axum::http::Uri = self.url.parse().context("signaling.sfu_url")?;
        let host = uri
            .host()
            .context("signaling.sfu_url has no host")?
            .trim_matches(['[', ']'])
            .to_string();
        let tls = self.client.tls_config();
        let port = uri
            .port_u16()
            .unwrap_or(if tls.is_some() { 443 } else { 80 });
        let tcp = match tokio::time::timeout(
            STEP,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                let _ = done.send(Err(format!(
                    "the SFU's control port {host}:{port} refused: {e} (is the sfu service running?)"
                )));
                return Ok(());
            }
            Err(_) => {
                let _ = done.send(Err(format!(
                    "the SFU's control port {host}:{port} did not answer"
                )));
                return Ok(());
            }
        };
        match tls {
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .context("the SFU host name")?;
                match tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, tcp)
                    .await
                {
                    Ok(s) => self.exchange(s, offer, done).await,
                    Err(e) => {
                        let _ = done.send(Err(format!("TLS with the SFU: {e}")));
                        Ok(())
                    }
                }
            }
            None => self.exchange(tcp, offer, done).await,
        }
    }

    async fn exchange<S>(
        &self,
        stream: S,
        offer: String,
        done: tokio::sync::oneshot::Sender<Result<String, String>>,
    ) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut config = WebSocketConfig::default();
        config.max_message_size = Some(MAX_FRAME_BYTES);
        config.max_frame_size = Some(MAX_FRAME_BYTES);
        let (mut ws, _) = tokio::time::timeout(
            STEP,
            tokio_tungstenite::client_async_with_config(self.url.as_str(), stream, Some(config)),
        )
        .await
        .context("the SFU WebSocket handshake timed out")?
        .context("the SFU WebSocket handshake")?;
        let steps = async {
            let now = crate::web::requests::now_unix();
            let token = self.client.token(now).map_err(|e| anyhow::anyhow!("{e}"))?;
            request(
                &mut ws,
                json!({"id":"1","type":"hello","hello":{"version":"1.0","token":token}}),
            )
            .await?;
            let sid = hex::encode(crate::secrets::random(16).unwrap_or_else(|_| vec![7; 16]));
            let created = request(
                &mut ws,
                json!({"id":"2","type":"command","command":{"type":"create-publisher","sid":sid,
                    "streamType":"video","publisherSettings":{"mediatypes":MEDIA_AUDIO}}}),
            )
            .await?;
            let client_id = created["command"]["id"]
                .as_str()
                .context("create-publisher answered no id")?
                .to_string();
            let answered = request(
                &mut ws,
                json!({"id":"3","type":"payload","payload":{"type":"offer","clientId":client_id,
                    "payload":{"type":"offer","sdp":offer}}}),
            )
            .await?;
            let sdp = answered["payload"]["payload"]["sdp"]
                .as_str()
                .context("the SFU's answer has no SDP")?
                .to_string();
            anyhow::Ok((client_id, sdp))
        };
        let (client_id, sdp) = match steps.await {
            Ok(x) => x,
            Err(e) => {
                let _ = done.send(Err(format!("the SFU refused the test call: {e:#}")));
                let _ = ws.close(None).await;
                return Ok(());
            }
        };
        let _ = done.send(Ok(sdp));
        // Keep the connection (and so the publisher) while the page connects; events are read
        // and dropped. Then the test publisher is deleted, not left to the resume grace.
        let _ = tokio::time::timeout(HOLD, async {
            while let Some(Ok(m)) = ws.next().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
        let _ = ws
            .send(Message::Text(
                json!({"id":"4","type":"command","command":{"type":"delete-publisher","clientId":client_id}})
                    .to_string()
                    .into(),
            ))
            .await;
        let _ = tokio::time::timeout(STEP, ws.next()).await;
        let _ = ws.close(None).await;
        Ok(())
    }
}

/// Sends one request and waits for the answer with its id (events in between are skipped).
async fn request<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, msg: Value) -> Result<Value>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let id = msg["id"].clone();
    ws.send(Message::Text(msg.to_string().into()))
        .await
        .context("sending to the SFU")?;
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .context("the SFU did not answer in time")?;
        let text = match frame {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) | None => bail!("the SFU closed the connection"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => bail!("reading from the SFU: {e}"),
        };
        let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
            continue;
        };
        if v["id"] != id {
            continue;
        }
        if v["type"] == "error" {
            bail!(
                "{}: {}",
                v["error"]["code"].as_str().unwrap_or("error"),
                v["error"]["message"].as_str().unwrap_or("")
            );
        }
        return Ok(v);
    }
}

/// Checks what the page sends before it reaches the SFU: size and shape of an SDP offer.
pub fn check_offer(sdp: &str) -> Result<(), String> {
    if sdp.len() > MAX_SDP_BYTES {
        return Err(format!(
            "sdp: {} bytes; at most {MAX_SDP_BYTES} are allowed",
            sdp.len()
        ));
    }
    if !sdp.starts_with("v=0") || !sdp.contains("\nm=") {
        return Err("sdp: not an SDP offer (it must start with v=0 and have an m= section)".into());
    }
    Ok(())
}

/// What the page shows when the SFU cannot be asked at all.
pub fn unavailable(config: &crate::config::Config) -> Option<Unavailable> {
    if !config.sfu.enabled {
        return Some("the SFU is off (sfu.enabled)".into());
    }
    if config.signaling.sfu_url.is_none() {
        return Some("no SFU is configured (signaling.sfu_url)".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_are_checked_for_size_and_shape() {
        assert!(
            check_offer("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n")
                .is_ok()
        );
        let e = check_offer("hello").expect_err("not SDP");
        assert!(e.contains("v=0"), "{e}");
        let big = format!("v=0\r\nm=audio\r\n{}", "a".repeat(MAX_SDP_BYTES));
        let e = check_offer(&big).expect_err("too big");
        assert!(e.contains("at most"), "{e}");
    }
}
