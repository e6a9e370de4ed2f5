//! Bursts: a publisher that sends many packets back to back (a video keyframe) must have
//! all of them forwarded to its subscriber.

mod support;

use std::time::Duration;

use media_core::session::StreamType;
use media_core::worker::WorkerCommand;
use support::{Client, Worker, run_until};

fn connected_pair(w: &Worker) -> (Client, Client) {
    connected_pair_with(w, Client::new())
}

fn connected_pair_with(w: &Worker, mut s: Client) -> (Client, Client) {
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
    w.ask(|reply| WorkerCommand::CreateSubscriber {
        session: 2,
        publisher: 1,
        reply,
    })
    .expect("sub");
    let offer = w
        .ask(|reply| WorkerCommand::RequestOffer { session: 2, reply })
        .expect("offer");
    let answer = s.answer(&offer);
    w.ask(|reply| WorkerCommand::Answer {
        session: 2,
        sdp: answer,
        reply,
    })
    .expect("answer");
    assert!(run_until(
        &mut [&mut s, &mut p],
        Duration::from_secs(10),
        |c| c[0].connected && c[0].channel_open
    ));
    (p, s)
}

#[test]
fn back_to_back_packets_all_reach_the_subscriber() {
    let w = Worker::start(Duration::from_secs(30));
    let (mut p, mut s) = connected_pair(&w);
    let mid = p.mids[0];
    for burst in 0..10u64 {
        for k in 0..16u64 {
            let i = burst * 16 + k;
            p.write_rtp(
                mid,
                100 + i,
                (burst * 3000) as u32,
                format!("b{i:04}").as_bytes(),
            );
        }
        run_until(&mut [&mut p, &mut s], Duration::from_millis(20), |_| false);
    }
    run_until(&mut [&mut p, &mut s], Duration::from_secs(2), |c| {
        c[1].rtp.len() >= 160
    });
    let stats = w
        .ask(|reply| WorkerCommand::Stats { reply })
        .expect("stats");
    let seqs: Vec<u64> = s.rtp.iter().map(|r| r.0).collect();
    assert_eq!(
        s.rtp.len(),
        160,
        "received {} of 160 ({} datagrams, seqs {seqs:?}); {stats:?}",
        s.rtp.len(),
        s.datagrams
    );
    assert!(
        s.errors.is_empty(),
        "{:?}",
        &s.errors[..s.errors.len().min(5)]
    );
}

#[test]
fn packets_lost_on_the_way_to_the_subscriber_are_resent_from_the_cache_on_nack() {
    // Every 7th media datagram the worker sends is lost; the subscriber's NACKs must be
    // answered (RTX is negotiated) so that every packet arrives in the end.
    let w = Worker::start_lossy(7);
    let (mut p, mut s) = connected_pair(&w);
    let mid = p.mids[0];
    let payload = vec![0x5a; 900];
    for i in 0..120u64 {
        let mut body = payload.clone();
        body[..8].copy_from_slice(&i.to_be_bytes());
        p.write_rtp(mid, 500 + i, (i * 3000) as u32, &body);
        run_until(&mut [&mut p, &mut s], Duration::from_millis(3), |_| false);
    }
    assert!(
        run_until(&mut [&mut p, &mut s], Duration::from_secs(5), |c| {
            let mut got: Vec<u64> = c[1].rtp.iter().map(|r| r.0).collect();
            got.sort_unstable();
            got.dedup();
            got.len() >= 120
        }),
        "only {} distinct packets arrived",
        {
            let mut got: Vec<u64> = s.rtp.iter().map(|r| r.0).collect();
            got.sort_unstable();
            got.dedup();
            got.len()
        }
    );
}

#[test]
fn a_subscriber_reaches_the_worker_over_ice_tcp_only() {
    let w = Worker::start_with_tcp();
    let s = Client::new_tcp(w.handle.local_addr);
    let (mut p, mut s) = connected_pair_with(&w, s);
    let mid = p.mids[0];
    for i in 0..50u64 {
        p.write_rtp(
            mid,
            10 + i,
            (i * 3000) as u32,
            format!("t{i:04}").as_bytes(),
        );
        run_until(&mut [&mut p, &mut s], Duration::from_millis(3), |_| false);
    }
    assert!(
        run_until(&mut [&mut p, &mut s], Duration::from_secs(3), |c| c[1]
            .rtp
            .len()
            >= 50),
        "{} of 50 over TCP; errors {:?}",
        s.rtp.len(),
        s.errors
    );
    for (k, r) in s.rtp.iter().enumerate() {
        assert_eq!(r.2, format!("t{k:04}").into_bytes());
    }
}
