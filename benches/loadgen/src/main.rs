//! SFU load generator for `benches/sfu/run.sh`: P publishers (synthetic VP8 at 1 Mbit/s and
//! Opus-sized audio at 48 kbit/s) and their subscribers, each a webrtc-rs (`webrtc` 0.21)
//! peer connection on loopback, set up through talkbox's `/proxy` protocol or Janus's
//! VideoRoom API. After a warm-up it measures, over a fixed window, what the subscribers
//! received (packets/s, loss, delay variation, one-way delay) and the server process's CPU
//! time and peak RSS from /proc, and prints one JSON line.
//!
//! Scenarios: `fanout:N` (1 publisher → N subscribers), `rooms:M` (M rooms of 3, everyone
//! publishes and subscribes to the other two), `room:K` (one room of K, all video).

mod peer;
mod signal;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use serde_json::json;

use peer::{Peer, Received};
use signal::{Control, PubRef};

#[derive(Parser)]
#[command(about = "SFU load generator (webrtc-rs peers against talkbox /proxy or Janus VideoRoom)")]
struct Args {
    /// `talkbox` (drives ws://…/proxy) or `janus` (drives the Janus WebSocket API).
    #[arg(long)]
    server: String,
    /// Control URL: ws://127.0.0.1:PORT/proxy or ws://127.0.0.1:8188.
    #[arg(long)]
    url: String,
    /// talkbox only: the proxy token private key (DATA/secrets/proxy-token-key.pem).
    #[arg(long)]
    key: Option<PathBuf>,
    /// fanout:N, rooms:M or room:K.
    #[arg(long)]
    scenario: String,
    /// Address the peers' UDP sockets bind to (Janus on loopback needs 127.0.0.2).
    #[arg(long, default_value = "127.0.0.1")]
    ip: IpAddr,
    /// Measurement window, seconds (at most 120).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Warm-up after everything connected, seconds.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Server process whose CPU time and peak RSS are reported.
    #[arg(long)]
    server_pid: u32,
    /// Created when the measurement window opens (lets a profiler attach to just the window).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Janus room numbers start here (rooms are never reused within a Janus run).
    #[arg(long, default_value_t = 1000)]
    room_base: u64,
}

/// Rooms of the scenario: per room, its publisher count and who subscribes to whom (one
/// entry per subscription, naming the publisher).
fn plan(scenario: &str) -> Result<Vec<(usize, Vec<usize>)>> {
    let (kind, n) = scenario
        .split_once(':')
        .ok_or_else(|| anyhow!("scenario {scenario:?}: expected fanout:N, rooms:M or room:K"))?;
    let n: usize = n
        .parse()
        .with_context(|| format!("scenario {scenario:?}: count is not a number"))?;
    if n == 0 || n > 200 {
        bail!("scenario {scenario:?}: count must be 1..=200");
    }
    let mesh = |k: usize| -> (usize, Vec<usize>) {
        (
            k,
            (0..k)
                .flat_map(|a| (0..k).filter(move |&b| b != a))
                .collect(),
        )
    };
    Ok(match kind {
        "fanout" => vec![(1, vec![0; n])],
        "rooms" => (0..n).map(|_| mesh(3)).collect(),
        "room" if n >= 2 => vec![mesh(n)],
        _ => bail!("scenario {scenario:?}: expected fanout:N, rooms:M or room:K (K >= 2)"),
    })
}

/// user+system CPU ticks of a process, all threads.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let rest = stat
        .rsplit_once(')')
        .ok_or_else(|| anyhow!("/proc/{pid}/stat has no ')'"))?
        .1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| -> Result<u64> {
        f.get(i)
            .ok_or_else(|| anyhow!("/proc/{pid}/stat: field {i} missing"))?
            .parse()
            .with_context(|| format!("/proc/{pid}/stat: field {i}"))
    };
    Ok(get(11)? + get(12)?)
}

fn status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Clock ticks per second in /proc/PID/stat: Linux's USER_HZ, 100 on every architecture the
/// benchmarks run on (std has no sysconf).
fn clk_tck() -> u64 {
    100
}

fn percentile(v: &mut [u32], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    f64::from(v[i.min(v.len() - 1)]) / 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    match tokio::time::timeout(Duration::from_secs(600), run(args)).await {
        Ok(Ok(line)) => println!("{line}"),
        Ok(Err(e)) => {
            eprintln!("loadgen: {e:#}");
            std::process::exit(1);
        }
        Err(_) => {
            eprintln!("loadgen: gave up after 600 s");
            std::process::exit(1);
        }
    }
}

async fn run(args: Args) -> Result<String> {
    if args.seconds == 0 || args.seconds > 120 || args.warmup > 30 {
        bail!("--seconds must be 1..=120 and --warmup at most 30");
    }
    let rooms = plan(&args.scenario)?;
    let mut control = match args.server.as_str() {
        "talkbox" => {
            let path = args
                .key
                .as_ref()
                .ok_or_else(|| anyhow!("--key is required with --server talkbox"))?;
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Control::proxy(&args.url, &pem).await?
        }
        "janus" => Control::janus(&args.url).await?,
        s => bail!("--server {s:?}: expected talkbox or janus"),
    };

    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let send_limit = Duration::from_secs(args.seconds + args.warmup + 300);
    let setup_start = Instant::now();
    let mut peers: Vec<Peer> = Vec::new();
    let mut subscribers: Vec<Arc<std::sync::Mutex<Received>>> = Vec::new();
    let mut senders = Vec::new();
    let mut n_pub: u32 = 0;
    for (r, (size, pairs)) in rooms.iter().enumerate() {
        let size = *size;
        let room = args.room_base + r as u64;
        control.create_room(room, size).await?;
        let mut pubs: Vec<PubRef> = Vec::new();
        for _ in 0..size {
            let mut p = Peer::new(args.ip, measuring.clone()).await?;
            let tracks = peer::add_tracks(&p, n_pub).await?;
            let offer = p.offer().await?;
            let (id, answer) = control.publish(room, n_pub, &offer).await?;
            p.accept_answer(&answer).await?;
            p.wait_connected()
                .await
                .with_context(|| format!("publisher {n_pub}"))?;
            senders.push(tokio::spawn(peer::send_media(
                tracks,
                stop.clone(),
                send_limit,
                sent.clone(),
                n_pub.wrapping_mul(0x9e37_79b9),
            )));
            pubs.push(id);
            peers.push(p);
            n_pub += 1;
        }
        for &b in pairs {
            let (sub, offer) = control.subscribe(&pubs[b]).await?;
            let mut s = Peer::new(args.ip, measuring.clone()).await?;
            let answer = s.answer(&offer).await?;
            control.answer(&sub, &answer).await?;
            s.wait_connected()
                .await
                .with_context(|| format!("subscriber of {b} in room {room}"))?;
            subscribers.push(s.received.clone());
            peers.push(s);
        }
    }
    let setup_s = setup_start.elapsed().as_secs_f64();

    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    let sent0 = sent.load(Ordering::Relaxed);
    let c0 = cpu_ticks(args.server_pid)?;
    let t0 = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    if let Some(f) = &args.ready_file {
        std::fs::write(f, b"measuring\n").with_context(|| format!("writing {}", f.display()))?;
    }
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let c1 = cpu_ticks(args.server_pid)?;
    let wall = t0.elapsed().as_secs_f64();
    let sent_pkts = sent.load(Ordering::Relaxed) - sent0;
    let peak_rss_kb = status_kb(args.server_pid, "VmHWM:");
    stop.store(true, Ordering::Relaxed);

    let (mut received, mut expected) = (0u64, 0u64);
    let mut delays: Vec<u32> = Vec::new();
    let (mut jitter_sum, mut jitter_n) = (0.0, 0u64);
    let mut silent = 0usize;
    for r in &subscribers {
        let r = r.lock().map_err(|_| anyhow!("stats lock poisoned"))?;
        if r.tracks.iter().all(|t| t.received == 0) {
            silent += 1;
        }
        for t in &r.tracks {
            received += t.received;
            expected += t.expected();
            delays.extend_from_slice(&t.delays_us);
            if t.received > 1 {
                jitter_sum += t.jitter_us;
                jitter_n += 1;
            }
        }
    }
    for h in senders {
        let _ = tokio::time::timeout(Duration::from_secs(2), h).await;
    }
    for p in &peers {
        let _ = tokio::time::timeout(Duration::from_secs(2), p.pc.close()).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), control.close()).await;

    let cpu_s = (c1 - c0) as f64 / clk_tck() as f64;
    let loss_pct = if expected > 0 {
        100.0 * (expected.saturating_sub(received)) as f64 / expected as f64
    } else {
        100.0
    };
    let line = json!({
        "server": args.server,
        "scenario": args.scenario,
        "publishers": n_pub,
        "subscriptions": subscribers.len(),
        "silent_subscriptions": silent,
        "setup_s": (setup_s * 10.0).round() / 10.0,
        "window_s": (wall * 100.0).round() / 100.0,
        "sent_pkts": sent_pkts,
        "recv_pkts": received,
        "recv_pps": (received as f64 / wall).round(),
        "loss_pct": (loss_pct * 1000.0).round() / 1000.0,
        "jitter_ms": if jitter_n > 0 { (jitter_sum / jitter_n as f64 / 10.0).round() / 100.0 } else { 0.0 },
        "delay_p50_ms": (percentile(&mut delays, 0.5) * 100.0).round() / 100.0,
        "delay_p99_ms": (percentile(&mut delays, 0.99) * 100.0).round() / 100.0,
        "server_cpu_s": cpu_s,
        "cpu_s_per_mpkt": if received > 0 { (cpu_s * 1e6 / received as f64 * 100.0).round() / 100.0 } else { 0.0 },
        "peak_rss_kb": peak_rss_kb,
    });
    Ok(line.to_string())
}
