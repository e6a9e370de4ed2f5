//! One client WebSocket on `/spreed`: `welcome`, the hello deadline, reading frames (at most
//! 64 KiB each) into [`Server::handle_frame`], writing queued frames, and the ping/pong keepalive.
//!
//! The reader and the writer are separate tasks joined by a bounded queue, so a session that
//! sends to a slow receiver waits (back-pressure) instead of growing memory without bound.
//! (One task for both would deadlock when a frame's handler waits for room in its own full
//! queue.) The queue is the only channel between them: pings travel through it and the reader
//! learns that the writer stopped from the queue closing, because every channel and timer
//! kept per connection is resident memory for each of up to 100 000 idle sessions.

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
    let writer = tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Some(Outbound::Text(t)) => {
                    // Frames already queued go out with this one in one write (one
                    // syscall instead of one per frame under load), at most WRITE_BATCH.
                    if sink
                        .feed(Message::Text(Utf8Bytes::from(&*t)))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    let mut close = false;
                    for _ in 1..WRITE_BATCH {
                        match rx.try_recv() {
                            Ok(Outbound::Text(t)) => {
                                if sink
                                    .feed(Message::Text(Utf8Bytes::from(&*t)))
                                    .await
                                    .is_err()
                                {
                                    close = true;
                                    break;
                                }
                            }
                            Ok(Outbound::Ping) => {
                                if sink.feed(Message::Ping(Default::default())).await.is_err() {
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
                Some(Outbound::Ping) => {
                    if sink.send(Message::Ping(Default::default())).await.is_err() {
                        break;
                    }
                }
                Some(Outbound::Close) | None => {
                    let _ = sink.send(Message::Close(None)).await;
                    break;
                }
            }
        }
        let _ = sink.close().await;
        // Dropping `rx` here closes the queue, which tells the reader (`tx.closed()`).
        drop(rx);
    });
    let mut conn = ConnState {
        id: server.new_conn_id(),
        tx: tx.clone(),
        sid: None,
        ip,
    };
    // Serialised at once: a `Value` bound here would live in this task until the connection
    // ends, and its maps and arrays were 1.8 KiB of every idle session (heaptrack, benches/signaling).
    let welcome: Arc<str> = Arc::from(api::welcome(server.hub().sfu_connected()).to_string());
    let _ = tx.send(Outbound::Text(welcome)).await;
    let hello_deadline =
        tokio::time::Instant::now() + Duration::from_millis(server.config.hello_timeout_ms);
    let mut ping = tokio::time::interval(PING_PERIOD);
    ping.tick().await;
    let mut last_seen = Instant::now();
    {
        // Made once: a fresh `closed()` per turn would register and remove a waiter on the queue
        // for every frame read. (In a block: it borrows `tx`, which is dropped below.)
        let writer_gone = tx.closed();
        tokio::pin!(writer_gone);
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
                _ = &mut writer_gone => break,
                _ = tokio::time::sleep_until(hello_deadline), if conn.sid.is_none() => {
                    let _ = tx.send(Outbound::Text(Arc::from(api::bye("hello_timeout", None).to_string()))).await;
                    let _ = tx.send(Outbound::Close).await;
                    break;
                }
                _ = ping.tick() => {
                    if last_seen.elapsed() > PONG_WAIT {
                        break;
                    }
                    // Not waiting for room: a client whose queue is full gets no ping this round.
                    let _ = tx.try_send(Outbound::Ping);
                }
                _ = shutdown.changed() => {
                    let _ = tx.send(Outbound::Close).await;
                    break;
                }
            }
        }
    }
    server.connection_closed(&conn);
    drop(tx);
    drop(conn);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}
