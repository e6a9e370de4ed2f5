//! One client WebSocket on `/spreed`: `welcome`, the hello deadline, reading frames (at most
//! 64 KiB each) into [`Server::handle_frame`], writing queued frames, and the ping/pong keepalive.
//!
//! The reader and the writer are separate tasks joined by a bounded queue, so a session that
//! sends to a slow receiver waits (back-pressure) instead of growing memory without bound.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};

use super::api;
use super::server::{ConnState, Outbound, QUEUE_FRAMES, Server};

/// Most queued frames written with one flush.
const WRITE_BATCH: usize = 64;

/// Upstream `pingPeriod` and `pongWait`.
const PING_PERIOD: Duration = Duration::from_secs(54);
const PONG_WAIT: Duration = Duration::from_secs(60);

pub async fn run(
    server: Arc<Server>,
    socket: WebSocket,
    ip: IpAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Outbound>(QUEUE_FRAMES);
    let (ping_tx, mut ping_rx) = mpsc::channel::<()>(1);
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(Outbound::Text(t)) => {
                        // Frames already queued go out with this one in one write (one
                        // syscall instead of one per frame under load), at most WRITE_BATCH.
                        if sink.feed(Message::Text(Utf8Bytes::from(&*t))).await.is_err() {
                            break;
                        }
                        let mut close = false;
                        for _ in 1..WRITE_BATCH {
                            match rx.try_recv() {
                                Ok(Outbound::Text(t)) => {
                                    if sink.feed(Message::Text(Utf8Bytes::from(&*t))).await.is_err() {
                                        close = true;
                                        break;
                                    }
                                }
                                Ok(Outbound::Close) => {
                                    close = true;
                                    let _ = sink.feed(Message::Close(None)).await;
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        if sink.flush().await.is_err() || close {
                            break;
                        }
                    }
                    Some(Outbound::Close) | None => {
                        let _ = sink.send(Message::Close(None)).await;
                        break;
                    }
                },
                Some(()) = ping_rx.recv() => {
                    if sink.send(Message::Ping(Default::default())).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = sink.close().await;
        let _ = done_tx.send(());
    });
    let mut conn = ConnState {
        id: server.new_conn_id(),
        tx: tx.clone(),
        sid: None,
        ip,
    };
    let welcome = api::welcome(server.hub().sfu_connected());
    let _ = tx
        .send(Outbound::Text(Arc::from(welcome.to_string())))
        .await;
    let hello_deadline =
        tokio::time::Instant::now() + Duration::from_millis(server.config.hello_timeout_ms);
    let mut ping = tokio::time::interval(PING_PERIOD);
    ping.tick().await;
    let mut last_seen = Instant::now();
    loop {
        tokio::select! {
            frame = stream.next() => {
                let Some(Ok(frame)) = frame else { break };
                last_seen = Instant::now();
                match frame {
                    // Boxed: handling a frame can await a backend request, and that future
                    // stored inline would make every idle connection's task as large
                    // (memory per idle session, benches/signaling).
                    Message::Text(t) => Box::pin(server.handle_frame(&mut conn, t.as_str())).await,
                    Message::Binary(_) => {
                        let e = api::ApiError::new("invalid_format", "Binary frames are not supported.");
                        let _ = tx.send(Outbound::Text(Arc::from(e.to_json(None).to_string()))).await;
                    }
                    Message::Close(_) => break,
                    Message::Ping(_) | Message::Pong(_) => {}
                }
            }
            _ = &mut done_rx => break,
            _ = tokio::time::sleep_until(hello_deadline), if conn.sid.is_none() => {
                let _ = tx.send(Outbound::Text(Arc::from(api::bye("hello_timeout", None).to_string()))).await;
                let _ = tx.send(Outbound::Close).await;
                break;
            }
            _ = ping.tick() => {
                if last_seen.elapsed() > PONG_WAIT {
                    break;
                }
                let _ = ping_tx.try_send(());
            }
            _ = shutdown.changed() => {
                let _ = tx.send(Outbound::Close).await;
                break;
            }
        }
    }
    server.connection_closed(&conn);
    drop(tx);
    drop(conn);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}
