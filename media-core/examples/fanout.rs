//! Fan-out measurement: one str0m publisher sends 1000-byte RTP packets through a media worker
//! to N str0m subscribers on loopback; prints forwarded packets per second and the worker
//! thread's CPU time per forwarded packet (from /proc).
//!
//! `cargo run --release -p media-core --example fanout -- [subscribers] [packets]`

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use media_core::session::StreamType;
use media_core::worker::WorkerCommand;
use support::{Client, Worker, run_until};

fn worker_cpu_ticks() -> Option<u64> {
    for t in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = t.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() == "media-worker-0" {
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = f.get(11)?.parse().ok()?;
            let stime: u64 = f.get(12)?.parse().ok()?;
            return Some(utime + stime);
        }
    }
    None
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let subs: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(4);
    let packets: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let w = Worker::start(Duration::from_secs(30));
    w.ask(|reply| WorkerCommand::CreatePublisher {
        session: 1,
        stream_type: StreamType::Video,
        reply,
    })
    .expect("publisher");
    let mut p = Client::new();
    let offer = p.publish_offer();
    let answer = w
        .ask(|reply| WorkerCommand::Offer {
            session: 1,
            sdp: offer,
            reply,
        })
        .expect("answer");
    p.accept_answer(&answer);
    assert!(run_until(&mut [&mut p], Duration::from_secs(10), |c| c[0].connected));
    let mut clients: Vec<Client> = Vec::new();
    for i in 0..subs {
        let session = 10 + i as u32;
        w.ask(|reply| WorkerCommand::CreateSubscriber {
            session,
            publisher: 1,
            reply,
        })
        .expect("subscriber");
        let offer = w
            .ask(|reply| WorkerCommand::RequestOffer { session, reply })
            .expect("offer");
        let mut s = Client::new();
        let answer = s.answer(&offer);
        w.ask(|reply| WorkerCommand::Answer {
            session,
            sdp: answer,
            reply,
        })
        .expect("answer");
        assert!(run_until(
            &mut [&mut s, &mut p],
            Duration::from_secs(10),
            |c| c[0].connected
        ));
        clients.push(s);
    }
    // Let every subscriber's DTLS settle.
    let mut all: Vec<&mut Client> = clients.iter_mut().collect();
    all.push(&mut p);
    run_until(&mut all, Duration::from_millis(300), |_| false);
    let mid = p.mids[0];
    let payload = vec![0xabu8; 1000];
    let stats0 = w
        .ask(|reply| WorkerCommand::Stats { reply })
        .expect("stats");
    let cpu0 = worker_cpu_ticks().unwrap_or(0);
    let t0 = Instant::now();
    for i in 0..packets {
        p.write_rtp(mid, 1000 + i, (i * 3000) as u32, &payload);
        if i % 16 == 0 {
            p.step();
            for s in clients.iter_mut() {
                s.step();
            }
        }
    }
    let mut all: Vec<&mut Client> = clients.iter_mut().collect();
    all.push(&mut p);
    run_until(&mut all, Duration::from_millis(500), |_| false);
    let elapsed = t0.elapsed() - Duration::from_millis(500);
    let stats = w
        .ask(|reply| WorkerCommand::Stats { reply })
        .expect("stats");
    let cpu = worker_cpu_ticks().unwrap_or(0) - cpu0;
    let fwd = stats.rtp_forwarded - stats0.rtp_forwarded;
    let hz = 100.0; // USER_HZ on Linux
    let received: usize = clients.iter().map(|c| c.rtp.len()).sum();
    println!(
        "subscribers={subs} packets_in={packets} forwarded={fwd} received={received} elapsed={:.2}s \
         forwarded/s={:.0} worker_cpu={:.2}s cpu_per_forwarded={:.2}us datagrams_out={} dropped_send={}",
        elapsed.as_secs_f64(),
        fwd as f64 / elapsed.as_secs_f64(),
        cpu as f64 / hz,
        cpu as f64 / hz * 1e6 / fwd.max(1) as f64,
        stats.datagrams_out - stats0.datagrams_out,
        stats.dropped_send - stats0.dropped_send,
    );
}
