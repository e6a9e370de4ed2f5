//! Shared harness of the signaling tests: a fake Talk backend (axum on loopback, real signing
//! keys, HMAC checked on every request), the real `talkbox signaling` process, and a WebSocket
//! client.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use appliance::config::{Config, DataDir};
use appliance::signaling::checksum;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

pub mod fake_proxy;

pub const TALK_SECRET: &str = "fake-talk-secret-0123456789";

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Keys Talk would publish, one per algorithm the tests use.
pub struct TalkKeys {
    pub es256: (jsonwebtoken::EncodingKey, String),
    pub ed25519: (jsonwebtoken::EncodingKey, String),
    pub rs256: (jsonwebtoken::EncodingKey, String),
}

#[derive(Default)]
pub struct FakeTalkState {
    pub requests: Mutex<Vec<Value>>,
    pub bad_hmac: AtomicUsize,
    /// The public key served in capabilities.
    pub key: Mutex<String>,
}

pub struct FakeTalk {
    pub addr: SocketAddr,
    pub state: Arc<FakeTalkState>,
}

impl FakeTalk {
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn auth_url(&self) -> String {
        format!(
            "{}/ocs/v2.php/apps/spreed/api/v3/signaling/backend",
            self.base()
        )
    }
    pub fn requests_of(&self, kind: &str) -> Vec<Value> {
        self.state
            .requests
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r["type"] == kind)
            .cloned()
            .collect()
    }
}

fn ocs(data: Value) -> axum::Json<Value> {
    axum::Json(json!({"ocs":{"meta":{"status":"ok","statuscode":200,"message":"OK"},"data":data}}))
}

async fn capabilities(State(st): State<Arc<FakeTalkState>>) -> axum::Json<Value> {
    let key = st.key.lock().expect("lock").clone();
    ocs(
        json!({"capabilities":{"spreed":{"features":["signaling-v3"],"config":{"signaling":{"hello-v2-token-key":key,"session-ping-limit":2}}}}}),
    )
}

/// Permissions Talk gives each test user.
fn permissions(user: &str) -> Value {
    match user {
        "moderator" => json!([
            "publish-audio",
            "publish-video",
            "publish-screen",
            "control",
            "transient-data"
        ]),
        "muted" => json!([]),
        _ => json!(["publish-audio", "publish-video", "transient-data"]),
    }
}

async fn backend(
    State(st): State<Arc<FakeTalkState>>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::Json<Value> {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    if !checksum::verify(
        &h("spreed-signaling-random"),
        &body,
        TALK_SECRET.as_bytes(),
        &h("spreed-signaling-checksum"),
    ) {
        st.bad_hmac.fetch_add(1, Ordering::SeqCst);
        return ocs(
            json!({"type":"error","error":{"code":"invalid_request","message":"bad checksum"}}),
        );
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    // Recorded with the Host it was sent to, so tests can tell which backend URL was used.
    let mut recorded = req.clone();
    recorded["_host"] = Value::String(h("host"));
    st.requests.lock().expect("lock").push(recorded);
    match req["type"].as_str() {
        Some("auth") => {
            let ticket = req["auth"]["params"]["ticket"].as_str().unwrap_or("");
            match ticket.strip_prefix("valid-") {
                Some(user) => ocs(
                    json!({"type":"auth","auth":{"version":"1.0","userid":user,"user":{"displayname":user}}}),
                ),
                None => ocs(
                    json!({"type":"error","error":{"code":"invalid_ticket","message":"The given ticket is not valid for this user."}}),
                ),
            }
        }
        Some("room") => {
            let room = req["room"]["roomid"].as_str().unwrap_or("");
            if room == "no-such-room" {
                return ocs(
                    json!({"type":"error","error":{"code":"no_such_room","message":"The user is not invited to this room."}}),
                );
            }
            let user = req["room"]["userid"].as_str().unwrap_or("");
            ocs(
                json!({"type":"room","room":{"version":"1.0","roomid":room,"properties":{"name":format!("Room {room}"),"type":3},"permissions":permissions(user)}}),
            )
        }
        Some("ping") => ocs(json!({"type":"room","room":{"version":"1.0"}})),
        _ => ocs(json!({"type":"error","error":{"code":"unknown_type","message":"Unknown type"}})),
    }
}

pub async fn start_fake_talk(key: String) -> FakeTalk {
    let state = Arc::new(FakeTalkState {
        key: Mutex::new(key),
        ..Default::default()
    });
    let app = axum::Router::new()
        .route("/ocs/v2.php/cloud/capabilities", get(capabilities))
        .route(
            "/ocs/v2.php/apps/spreed/api/v3/signaling/backend",
            post(backend),
        )
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind fake talk");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    FakeTalk { addr, state }
}

/// A `talkbox signaling` process.
pub struct Signaling {
    pub child: Child,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub data: DataDir,
    _dir: tempfile::TempDir,
}

impl Drop for Signaling {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Signaling {
    pub fn secret(&self, s: appliance::secrets::Secret) -> String {
        appliance::secrets::read(&self.data, s).expect("secret")
    }
    pub fn ws_url(&self) -> String {
        format!("ws://{}/spreed", self.http)
    }
}

pub async fn start_signaling(talk_base: &str, extra: &str) -> Signaling {
    start_signaling_urls(&[talk_base.to_string()], extra).await
}

/// A signaling process whose one backend has these URLs.
pub async fn start_signaling_urls(talk_bases: &[String], extra: &str) -> Signaling {
    start_signaling_full(talk_bases, extra, "").await
}

/// As [`start_signaling_urls`], with `backend_extra` lines added to the backend's table
/// (`max_stream_bitrate = …`).
pub async fn start_signaling_full(
    talk_bases: &[String],
    extra: &str,
    backend_extra: &str,
) -> Signaling {
    let dir = tempfile::tempdir().expect("tempdir");
    let (p1, p2) = (free_port(), free_port());
    let urls: Vec<String> = talk_bases.iter().map(|b| format!("\"{b}/\"")).collect();
    let urls = urls.join(", ");
    let text = format!(
        "[signaling]\nlisten = \"127.0.0.1:{p1}\"\nhttp_listen = \"127.0.0.1:{p2}\"\n{extra}\n[[signaling.backend]]\nid = \"nc1\"\nurls = [{urls}]\nsecret = \"{TALK_SECRET}\"\n{backend_extra}\n"
    );
    let config_path: PathBuf = dir.path().join("talkbox.toml");
    std::fs::write(&config_path, &text).expect("config");
    let config = Config::from_toml("test", &text).expect("valid config");
    let data = DataDir::new(dir.path().join("data"));
    appliance::supervisor::prepare_data_dir(&data, &config).expect("data dir");
    let child = Command::new(env!("CARGO_BIN_EXE_talkbox"))
        .arg("signaling")
        .arg("--data-dir")
        .arg(&data.root)
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .spawn()
        .expect("start talkbox signaling");
    let s = Signaling {
        child,
        http: SocketAddr::from(([127, 0, 0, 1], p2)),
        https: SocketAddr::from(([127, 0, 0, 1], p1)),
        data,
        _dir: dir,
    };
    for _ in 0..200 {
        if TcpStream::connect(s.http).await.is_ok() {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("talkbox signaling did not start");
}

pub struct Client {
    pub ws: WebSocketStream<TcpStream>,
    pub welcome: Value,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let addr = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .expect("addr")
            .to_string();
        let tcp = TcpStream::connect(&addr).await.expect("connect");
        let (ws, _) = tokio_tungstenite::client_async(url, tcp)
            .await
            .expect("websocket");
        let mut c = Client {
            ws,
            welcome: Value::Null,
        };
        c.welcome = c.recv().await;
        assert_eq!(c.welcome["type"], "welcome", "{}", c.welcome);
        c
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, text: String) {
        let _ = self.ws.send(Message::Text(text.into())).await;
    }

    /// Next JSON frame (5 s at most).
    pub async fn recv(&mut self) -> Value {
        self.try_recv(Duration::from_secs(5))
            .await
            .expect("a frame within 5 s")
    }

    pub async fn try_recv(&mut self, wait: Duration) -> Option<Value> {
        loop {
            let m = tokio::time::timeout(wait, self.ws.next()).await.ok()??;
            match m {
                Ok(Message::Text(t)) => return serde_json::from_str(t.as_str()).ok(),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// Skips frames until one of `kind` arrives.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        for _ in 0..20 {
            let v = self.recv().await;
            if v["type"] == kind {
                return v;
            }
        }
        panic!("no {kind} frame");
    }

    /// The next event with this target and type.
    pub async fn recv_event(&mut self, target: &str, kind: &str) -> Value {
        for _ in 0..20 {
            let v = self.recv().await;
            if v["type"] == "event" && v["event"]["target"] == target && v["event"]["type"] == kind
            {
                return v["event"].clone();
            }
        }
        panic!("no {target}/{kind} event");
    }

    /// True when the server closed the connection (within 5 s).
    pub async fn closed(&mut self) -> bool {
        for _ in 0..50 {
            match tokio::time::timeout(Duration::from_secs(5), self.ws.next()).await {
                Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return true,
                Ok(Some(Ok(_))) => continue,
                Err(_) => return false,
            }
        }
        false
    }

    pub async fn hello_v1(url: &str, auth_url: &str, user: &str) -> (Client, Value) {
        let mut c = Client::connect(url).await;
        c.send(json!({"id":"h","type":"hello","hello":{"version":"1.0","auth":{"url":auth_url,"params":{"userid":user,"ticket":format!("valid-{user}")}}}}))
            .await;
        let h = c.recv().await;
        assert_eq!(h["type"], "hello", "{h}");
        (c, h)
    }

    pub async fn join(&mut self, room: &str, talk_session: &str) -> Value {
        self.send(json!({"id":"j","type":"room","room":{"roomid":room,"sessionid":talk_session}}))
            .await;
        self.recv_type("room").await
    }
}

/// POSTs a backend request to the signaling server with the given secret.
pub async fn backend_post(
    server: SocketAddr,
    room: &str,
    body: &Value,
    secret: &str,
    backend: Option<&str>,
) -> (u16, HeaderMap, String) {
    let payload = body.to_string();
    let random = checksum::new_random();
    let sum = checksum::calculate(&random, payload.as_bytes(), secret.as_bytes());
    let mut req = format!(
        "POST /api/v1/room/{room} HTTP/1.1\r\nHost: {server}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nSpreed-Signaling-Random: {random}\r\nSpreed-Signaling-Checksum: {sum}\r\nConnection: close\r\n",
        payload.len()
    );
    if let Some(b) = backend {
        req.push_str(&format!("Spreed-Signaling-Backend: {b}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&payload);
    raw_http(server, req.as_bytes()).await
}

/// Sends raw HTTP/1.1 bytes and parses the answer: (status, headers, body).
pub async fn raw_http(server: SocketAddr, request: &[u8]) -> (u16, HeaderMap, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(server).await.expect("connect");
    tcp.write_all(request).await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut headers = HeaderMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':')
            && let (Ok(k), Ok(v)) = (
                axum::http::HeaderName::try_from(k.trim()),
                axum::http::HeaderValue::from_str(v.trim()),
            )
        {
            headers.append(k, v);
        }
    }
    (status, headers, body.to_string())
}

/// POSTs a JSON body (room API): (status, JSON answer or null).
pub async fn post_json(server: SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    let payload = body.to_string();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {server}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    );
    let (status, _, text) = raw_http(server, req.as_bytes()).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

pub async fn http_get(server: SocketAddr, path: &str) -> (u16, HeaderMap, String) {
    raw_http(
        server,
        format!("GET {path} HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

pub fn jwt(key: &jsonwebtoken::EncodingKey, alg: jsonwebtoken::Algorithm, claims: Value) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, key).expect("sign")
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}
