//! A fake SFU speaking the proxy protocol (`/proxy`, upstream `proxy/api.go` shapes): it checks
//! the hello JWT with the box's public proxy token key (RS256, `iss`, `iat`, `exp`), records
//! every message, and answers like the SFU: publisher and subscriber ids, an SDP answer to a
//! publisher offer, an SDP offer to `requestoffer`/`sendoffer`, and one trickled candidate.
//! Its one proxy session (`fake-proxy-session`) can be resumed with `hello` + `resumeid`
//! unless [`FakeProxyState::forget_sessions`] is set (then `no_such_session`, as after a restart).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

pub const FAKE_ANSWER_SDP: &str = "v=0\r\no=fake-sfu 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n";
pub const FAKE_OFFER_SDP: &str = "v=0\r\no=fake-sfu 2 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n";
pub const FAKE_CANDIDATE: &str = "candidate:1 1 udp 2122260223 127.0.0.1 40000 typ host";

#[derive(Default)]
pub struct FakeProxyState {
    /// Every client message, in order.
    pub received: Mutex<Vec<Value>>,
    /// Claims of each accepted hello token.
    pub hellos: Mutex<Vec<Value>>,
    /// The box's public proxy token key (PEM), set once the signaling data dir exists.
    pub public_key: Mutex<Option<String>>,
    /// Refuse resumes with `no_such_session` (an SFU that restarted).
    pub forget_sessions: std::sync::atomic::AtomicBool,
    next: Mutex<u32>,
}

pub struct FakeProxy {
    pub addr: SocketAddr,
    pub state: Arc<FakeProxyState>,
    push: broadcast::Sender<Value>,
    stop: watch::Sender<bool>,
}

#[derive(Clone)]
struct Ctx {
    state: Arc<FakeProxyState>,
    push: broadcast::Sender<Value>,
    stop: watch::Receiver<bool>,
}

impl FakeProxy {
    pub fn url(&self) -> String {
        format!("ws://{}/proxy", self.addr)
    }

    pub fn tls_url(&self) -> String {
        format!("wss://{}/proxy", self.addr)
    }

    /// Sends a server message (an event) to every connected signaling server.
    pub fn push(&self, v: Value) {
        let _ = self.push.send(v);
    }

    /// Closes every connection and refuses new ones.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Accepts connections again after [`Self::stop`].
    pub fn restart(&self) {
        let _ = self.stop.send(false);
    }

    pub fn received_of(&self, kind: &str, sub: &str) -> Vec<Value> {
        self.state
            .received
            .lock()
            .expect("lock")
            .iter()
            .filter(|m| m["type"] == kind && (m[kind]["type"] == sub || sub.is_empty()))
            .cloned()
            .collect()
    }

    /// Waits until a message of this type arrived (5 s at most).
    pub async fn wait_for(&self, kind: &str, sub: &str) -> Value {
        for _ in 0..100 {
            if let Some(m) = self.received_of(kind, sub).pop() {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the fake SFU got no {kind}/{sub}; it got {:?}",
            self.state.received.lock().expect("lock")
        );
    }
}

pub async fn start_fake_proxy() -> FakeProxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind fake proxy");
    let (proxy, app) = fake_proxy_app(listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    proxy
}

/// A fake proxy for `listener`, served over TLS once `tls` is given (the box certificate,
/// which exists only after the signaling data directory does): until then it accepts
/// connections and drops them.
pub fn start_fake_proxy_tls(
    listener: tokio::net::TcpListener,
    tls: tokio::sync::oneshot::Receiver<Arc<rustls::ServerConfig>>,
) -> FakeProxy {
    let (proxy, app) = fake_proxy_app(listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let accept_and_drop = async {
            loop {
                let _ = listener.accept().await;
            }
        };
        let tls = tokio::select! {
            t = tls => t,
            _ = accept_and_drop => return,
        };
        let Ok(tls) = tls else { return };
        let (_keep, never) = tokio::sync::watch::channel(false);
        appliance::https::serve(
            listener,
            tls,
            app,
            appliance::https::Limits::default(),
            never,
        )
        .await;
    });
    proxy
}

fn fake_proxy_app(addr: SocketAddr) -> (FakeProxy, axum::Router) {
    let state = Arc::new(FakeProxyState::default());
    let (push, _) = broadcast::channel(64);
    let (stop, stop_rx) = watch::channel(false);
    let ctx = Ctx {
        state: state.clone(),
        push: push.clone(),
        stop: stop_rx,
    };
    let app = axum::Router::new()
        .route("/proxy", get(upgrade))
        .with_state(ctx);
    (
        FakeProxy {
            addr,
            state,
            push,
            stop,
        },
        app,
    )
}

async fn upgrade(State(ctx): State<Ctx>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| session(ctx, socket))
}

fn check_token(state: &FakeProxyState, token: &str) -> Result<Value, String> {
    let key = state
        .public_key
        .lock()
        .expect("lock")
        .clone()
        .ok_or("no key yet")?;
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(key.as_bytes()).map_err(|e| e.to_string())?;
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_required_spec_claims(&["iss", "iat", "exp"]);
    v.set_issuer(&["talkbox-signaling"]);
    v.validate_aud = false;
    jsonwebtoken::decode::<Value>(token, &key, &v)
        .map(|d| d.claims)
        .map_err(|e| e.to_string())
}

fn next_id(state: &FakeProxyState, prefix: &str) -> String {
    let mut n = state.next.lock().expect("lock");
    *n += 1;
    format!("{prefix}-{n}")
}

fn answer(state: &FakeProxyState, m: &Value) -> Vec<Value> {
    let id = m["id"].clone();
    match m["type"].as_str() {
        Some("hello") => {
            let resume = m["hello"]["resumeid"].as_str().unwrap_or("");
            if !resume.is_empty()
                && (resume != "fake-proxy-session"
                    || state
                        .forget_sessions
                        .load(std::sync::atomic::Ordering::Relaxed))
            {
                return vec![
                    json!({"id":id,"type":"error","error":{"code":"no_such_session","message":"The session to resume does not exist."}}),
                ];
            }
            // The key is set right after the signaling process created it.
            match check_token(state, m["hello"]["token"].as_str().unwrap_or("")) {
                Ok(claims) => {
                    state.hellos.lock().expect("lock").push(claims);
                    vec![
                        json!({"id":id,"type":"hello","hello":{"version":"1.0","sessionid":"fake-proxy-session","server":{"version":"fake","features":[]}}}),
                    ]
                }
                Err(e) => {
                    vec![json!({"id":id,"type":"error","error":{"code":"auth-failed","message":e}})]
                }
            }
        }
        Some("command") => {
            let c = &m["command"];
            match c["type"].as_str() {
                Some("create-publisher") => vec![
                    json!({"id":id,"type":"command","command":{"id":next_id(state,"pub"),"bitrate":c["bitrate"]}}),
                ],
                Some("create-subscriber") => {
                    let sub = next_id(state, "sub");
                    vec![
                        json!({"id":id,"type":"command","command":{"id":sub,"sid":format!("{sub}-sid")}}),
                    ]
                }
                _ => vec![json!({"id":id,"type":"command","command":{"id":c["clientId"]}})],
            }
        }
        Some("payload") => {
            let p = &m["payload"];
            let client = p["clientId"].clone();
            match p["type"].as_str() {
                Some("offer") => vec![
                    json!({"id":id,"type":"payload","payload":{"type":"offer","clientId":client,"payload":{"type":"answer","sdp":FAKE_ANSWER_SDP}}}),
                    json!({"type":"payload","payload":{"type":"candidate","clientId":client,"payload":{"candidate":{"candidate":FAKE_CANDIDATE,"sdpMLineIndex":0,"sdpMid":"0"}}}}),
                ],
                Some("requestoffer") | Some("sendoffer") => vec![
                    json!({"id":id,"type":"payload","payload":{"type":p["type"],"clientId":client,"payload":{"type":"offer","sdp":FAKE_OFFER_SDP}}}),
                ],
                _ => vec![
                    json!({"id":id,"type":"payload","payload":{"type":p["type"],"clientId":client}}),
                ],
            }
        }
        _ => vec![json!({"id":id,"type":"error","error":{"code":"invalid_format","message":"?"}})],
    }
}

async fn session(ctx: Ctx, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let mut push = ctx.push.subscribe();
    let mut stop = ctx.stop.clone();
    if *stop.borrow() {
        return;
    }
    loop {
        tokio::select! {
            frame = stream.next() => {
                let Some(Ok(Message::Text(t))) = frame else { break };
                let Ok(m) = serde_json::from_str::<Value>(t.as_str()) else { continue };
                ctx.state.received.lock().expect("lock").push(m.clone());
                // Give the signaling process a moment to have written its key.
                if m["type"] == "hello" {
                    for _ in 0..50 {
                        if ctx.state.public_key.lock().expect("lock").is_some() { break; }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                for reply in answer(&ctx.state, &m) {
                    if sink.send(Message::Text(reply.to_string().into())).await.is_err() {
                        return;
                    }
                }
            }
            Ok(v) = push.recv() => {
                if sink.send(Message::Text(v.to_string().into())).await.is_err() {
                    return;
                }
            }
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    let _ = sink.send(Message::Close(None)).await;
                    return;
                }
            }
        }
    }
}
