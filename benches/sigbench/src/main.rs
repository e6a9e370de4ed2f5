//! `sigbench`: the load client of the signaling benchmark (`benches/signaling/run.sh`). It speaks
//! the client side of Talk's `/spreed` protocol (hello v1) to any compatible server, so the same
//! load goes to talkbox and to Debian's nextcloud-spreed-signaling 0.4.1.
//!
//! - `idle`: opens hello'd sessions in steps (e.g. 10k, 50k, 100k), prints `READY …` after each
//!   step and waits for a line on stdin before the next one, so the caller can read the server's
//!   memory while exactly that many sessions are open. Connections come from several
//!   127.0.1.x source addresses, because one source address has only ~28k ephemeral ports.
//! - `load`: opens N sessions, then sends `message`s to random other sessions at a fixed total
//!   rate for a fixed time. Each message carries its send time; the receiver records the
//!   latency. Prints `RESULT …` with sent, received, rate and latency percentiles.
//!
//! Both modes answer the server's auth requests themselves (a fake Talk endpoint on
//! 127.0.0.1, any request is a valid user), so the servers run with "allow all backends".
//! Everything is bounded: session counts, run time, drain time, frame sizes.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Largest frame accepted from the server (the servers' own limit is 64 KiB).
const MAX_FRAME: usize = 64 * 1024;
/// Largest HTTP request head / body the fake Talk endpoint reads.
const MAX_HTTP_HEAD: usize = 16 * 1024;
const MAX_HTTP_BODY: usize = 64 * 1024;
/// How long a hello may take before the session counts as failed.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser)]
#[command(about = "Signaling benchmark client (hello v1 sessions, idle or timed messages)")]
struct Cli {
    /// The server's HTTP address (its `/spreed` WebSocket).
    #[arg(long)]
    server: SocketAddr,
    /// Number of 127.0.1.x source addresses to spread connections over (1..=250).
    #[arg(long, default_value_t = 8)]
    sources: u8,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Open sessions in steps and hold them; `READY` after each step, next step on a stdin line.
    Idle {
        /// Cumulative session counts, e.g. 10000,50000,100000 (at most 200000).
        #[arg(long, value_delimiter = ',')]
        steps: Vec<usize>,
    },
    /// Exchange messages between sessions at a fixed total rate; print `RESULT`.
    Load {
        #[arg(long, default_value_t = 100)]
        clients: usize,
        /// Messages per second over all clients (at most 1 000 000).
        #[arg(long)]
        rate: u64,
        /// Sending time in seconds (at most 300).
        #[arg(long)]
        secs: u64,
    },
}

type Ws = WebSocketStream<TcpStream>;

fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.sources == 0 || cli.sources > 250 {
        bail!("--sources {} out of range: 1..=250", cli.sources);
    }
    raise_nofile()?;
    // One thread: the client shares the machine with the server under test and is pinned to
    // one CPU by the caller; a single-threaded runtime does the most work per CPU there.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async move {
        let auth_url = start_fake_talk().await?;
        match cli.cmd {
            Cmd::Idle { ref steps } => idle(&cli, &auth_url, steps).await,
            Cmd::Load {
                clients,
                rate,
                secs,
            } => load(&cli, &auth_url, clients, rate, secs).await,
        }
    })
}

/// Soft RLIMIT_NOFILE up to the hard limit (the caller raises the hard limit as root).
fn raise_nofile() -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit(RLIMIT_NOFILE) failed");
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            bail!("setrlimit(RLIMIT_NOFILE, {}) failed", lim.rlim_max);
        }
    }
    Ok(())
}

/// A fake Talk backend on 127.0.0.1: every POST is a valid hello v1 auth (the servers check
/// their own side of the checksum scheme; this endpoint does not need to), every GET gets
/// capabilities with `signaling-v3`. Keep-alive, one task per connection.
async fn start_fake_talk() -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("fake Talk endpoint: bind 127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = serve_talk(sock).await;
            });
        }
    });
    Ok(format!(
        "http://{addr}/ocs/v2.php/apps/spreed/api/v3/signaling/backend"
    ))
}

async fn serve_talk(sock: TcpStream) -> Result<()> {
    let _ = sock.set_nodelay(true);
    let mut r = BufReader::new(sock);
    let auth = r#"{"ocs":{"meta":{"status":"ok","statuscode":200,"message":"OK"},"data":{"type":"auth","auth":{"version":"1.0","userid":"bench-user","user":{"displayname":"Bench"}}}}}"#;
    let caps = r#"{"ocs":{"meta":{"status":"ok","statuscode":200,"message":"OK"},"data":{"capabilities":{"spreed":{"features":["signaling-v3"],"config":{"signaling":{}}}}}}}"#;
    loop {
        let mut head = String::new();
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            if head.len() + line.len() > MAX_HTTP_HEAD {
                bail!("fake Talk endpoint: request head over {MAX_HTTP_HEAD} bytes");
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v
                    .trim()
                    .parse()
                    .context("fake Talk endpoint: content-length")?;
            }
            head.push_str(&line);
        }
        if len > MAX_HTTP_BODY {
            bail!("fake Talk endpoint: body of {len} bytes, at most {MAX_HTTP_BODY}");
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await?;
        let reply = if head.starts_with("GET") { caps } else { auth };
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
            reply.len()
        );
        r.get_mut().write_all(resp.as_bytes()).await?;
    }
}

/// Opens a WebSocket from `src` and completes hello v1; returns the stream and session id.
async fn session(server: SocketAddr, src: Ipv4Addr, auth_url: &str) -> Result<(Ws, String)> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::from((src, 0)))
        .with_context(|| format!("bind {src}:0"))?;
    let tcp = sock
        .connect(server)
        .await
        .with_context(|| format!("connect {server} from {src}"))?;
    tcp.set_nodelay(true)?;
    // Small buffers: the idle test holds 100k of these in this process.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_FRAME))
        .max_frame_size(Some(MAX_FRAME));
    let url = format!("ws://{server}/spreed");
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config))
        .await
        .context("WebSocket handshake")?;
    let hello = serde_json::json!({"id":"1","type":"hello","hello":{"version":"1.0","auth":{"url":auth_url,"params":{}}}});
    ws.send(Message::text(hello.to_string())).await?;
    let deadline = Instant::now() + HELLO_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, ws.next())
            .await
            .map_err(|_| anyhow!("no hello answer within {HELLO_TIMEOUT:?}"))?
            .ok_or_else(|| anyhow!("closed before the hello answer"))??;
        let Message::Text(t) = msg else { continue };
        let v: serde_json::Value = serde_json::from_str(&t)?;
        match v["type"].as_str() {
            Some("hello") => {
                let sid = v["hello"]["sessionid"]
                    .as_str()
                    .ok_or_else(|| anyhow!("hello answer without sessionid: {t}"))?;
                return Ok((ws, sid.to_owned()));
            }
            Some("welcome") => continue,
            _ => bail!("hello refused: {t}"),
        }
    }
}

fn source(cli: &Cli, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 1, 1 + (i % cli.sources as usize) as u8)
}

/// Opens sessions `from..to` with at most `--concurrency` handshakes at once; each opened
/// session is passed to `keep`. Returns the number that failed and the first error.
async fn open_many<F>(
    cli: &Cli,
    auth_url: &str,
    from: usize,
    to: usize,
    keep: F,
) -> (usize, Option<String>)
where
    F: Fn(usize, Ws, String) + Clone + 'static,
{
    let sem = Arc::new(Semaphore::new(cli.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in from..to {
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let (server, src, auth, keep) = (
            cli.server,
            source(cli, i),
            auth_url.to_owned(),
            keep.clone(),
        );
        tasks.spawn_local(async move {
            let r = session(server, src, &auth).await;
            drop(permit);
            match r {
                Ok((ws, sid)) => {
                    keep(i, ws, sid);
                    Ok(())
                }
                Err(e) => Err(format!("{e:#}")),
            }
        });
        // Reap finished handshakes as we go so the set stays small.
        while let Some(r) = tasks.try_join_next() {
            let _ = r;
        }
    }
    let (mut failed, mut first) = (0, None);
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            failed += 1;
            first.get_or_insert(e);
        }
    }
    (failed, first)
}

async fn idle(cli: &Cli, auth_url: &str, steps: &[usize]) -> Result<()> {
    if steps.is_empty() || steps.iter().any(|&s| s > 200_000) || !steps.is_sorted() {
        bail!("--steps must be ascending session counts of at most 200000, got {steps:?}");
    }
    let dropped = Arc::new(AtomicU64::new(0));
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let mut open = 0usize;
            let mut failed_total = 0usize;
            let mut stdin = BufReader::new(tokio::io::stdin()).lines();
            for &step in steps {
                let t0 = Instant::now();
                let d = dropped.clone();
                // Each held session only reads (answering pings) until the server closes it.
                let keep = move |_i: usize, mut ws: Ws, _sid: String| {
                    let d = d.clone();
                    tokio::task::spawn_local(async move {
                        while let Some(Ok(_)) = ws.next().await {}
                        d.fetch_add(1, Ordering::Relaxed);
                    });
                };
                let (failed, first) = open_many(cli, auth_url, open, step, keep).await;
                failed_total += failed;
                open = step;
                // Let the server settle (freed handshake buffers, background tasks).
                tokio::time::sleep(Duration::from_secs(2)).await;
                println!(
                    "READY sessions={} failed={failed_total} dropped={} secs={:.1}{}",
                    step - failed_total,
                    dropped.load(Ordering::Relaxed),
                    t0.elapsed().as_secs_f64(),
                    first
                        .map(|e| format!(" first_error={e:?}"))
                        .unwrap_or_default()
                );
                if stdin.next_line().await?.is_none() {
                    break;
                }
            }
            Ok(())
        })
        .await
}

async fn load(cli: &Cli, auth_url: &str, clients: usize, rate: u64, secs: u64) -> Result<()> {
    if !(2..=10_000).contains(&clients) || rate == 0 || rate > 1_000_000 || secs == 0 || secs > 300
    {
        bail!("load: clients 2..=10000, rate 1..=1000000, secs 1..=300");
    }
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let opened = Arc::new(std::sync::Mutex::new(Vec::new()));
            let o = opened.clone();
            let keep = move |i: usize, ws: Ws, sid: String| {
                if let Ok(mut v) = o.lock() {
                    v.push((i, ws, sid));
                }
            };
            let (failed, first) = open_many(cli, auth_url, 0, clients, keep).await;
            if failed > 0 {
                bail!("{failed} of {clients} sessions failed: {first:?}");
            }
            let mut sessions = std::mem::take(&mut *opened.lock().map_err(|_| anyhow!("lock"))?);
            sessions.sort_by_key(|s| s.0);
            let sids: Arc<Vec<String>> = Arc::new(sessions.iter().map(|s| s.2.clone()).collect());
            let base = Instant::now();
            let sent = Arc::new(AtomicU64::new(0));
            let recv = Arc::new(AtomicU64::new(0));
            let (stop_tx, stop_rx) = watch::channel(false);
            let period = Duration::from_nanos(clients as u64 * 1_000_000_000 / rate);
            let deadline = base + Duration::from_secs(secs);
            let mut writers = Vec::new();
            let mut readers = Vec::new();
            for (i, ws, _) in sessions {
                let (mut sink, mut stream) = ws.split();
                let (sids, sent) = (sids.clone(), sent.clone());
                writers.push(tokio::task::spawn_local(async move {
                    // Spread the clients' ticks over one period.
                    let offset = period.mul_f64(i as f64 / clients as f64);
                    let mut tick = tokio::time::interval_at((base + offset).into(), period);
                    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64 + 1);
                    loop {
                        tick.tick().await;
                        if Instant::now() >= deadline {
                            break;
                        }
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let mut to = (rng % (sids.len() as u64 - 1)) as usize;
                        if to >= i {
                            to += 1;
                        }
                        let bt = base.elapsed().as_micros() as u64;
                        let m = format!(
                            r#"{{"type":"message","message":{{"recipient":{{"type":"session","sessionid":"{}"}},"data":{{"bt":{bt}}}}}}}"#,
                            sids[to]
                        );
                        if sink.send(Message::text(m)).await.is_err() {
                            break;
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    sink
                }));
                let (recv, mut stop) = (recv.clone(), stop_rx.clone());
                readers.push(tokio::task::spawn_local(async move {
                    let mut lat: Vec<u32> = Vec::new();
                    loop {
                        tokio::select! {
                            m = stream.next() => {
                                let Some(Ok(Message::Text(t))) = m else {
                                    if m.is_none() || matches!(m, Some(Err(_))) { break; }
                                    continue;
                                };
                                let now = base.elapsed().as_micros() as u64;
                                let v: serde_json::Value = match serde_json::from_str(&t) {
                                    Ok(v) => v,
                                    Err(_) => continue,
                                };
                                if let Some(bt) = v["message"]["data"]["bt"].as_u64() {
                                    lat.push(now.saturating_sub(bt).min(u32::MAX as u64) as u32);
                                    recv.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            _ = stop.changed() => break,
                        }
                    }
                    lat
                }));
            }
            let mut sinks = Vec::new();
            for w in writers {
                sinks.push(w.await?);
            }
            let send_secs = base.elapsed().as_secs_f64();
            // Drain: wait until everything sent has arrived, at most 10 s.
            let drain_end = Instant::now() + Duration::from_secs(10);
            while recv.load(Ordering::Relaxed) < sent.load(Ordering::Relaxed)
                && Instant::now() < drain_end
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = stop_tx.send(true);
            let mut lat = Vec::new();
            for r in readers {
                lat.extend(r.await?);
            }
            drop(sinks);
            lat.sort_unstable();
            let pct = |p: f64| -> u32 {
                if lat.is_empty() {
                    return 0;
                }
                lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)]
            };
            let (s, r) = (sent.load(Ordering::Relaxed), recv.load(Ordering::Relaxed));
            println!(
                "RESULT clients={clients} offered={rate} secs={send_secs:.2} sent={s} recv={r} lost={} rate={:.0} p50_us={} p90_us={} p99_us={} max_us={}",
                s.saturating_sub(r),
                r as f64 / send_secs,
                pct(0.50),
                pct(0.90),
                pct(0.99),
                lat.last().copied().unwrap_or(0)
            );
            Ok(())
        })
        .await
}
