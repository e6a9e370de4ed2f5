//! Bursts: a publisher that sends many packets back to back (a video keyframe) must have
//! all of them forwarded to its subscriber.

mod support;

use std::time::Duration;

use media_core::session::StreamType;
use media_core::worker::WorkerCommand;
use support::{Client, Worker, run_until};

#[test]
fn back_to_back_packets_all_reach_the_subscriber() {
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
    w.ask(|reply| WorkerCommand::CreateSubscriber {
        session: 2,
        publisher: 1,
        reply,
    })
    .expect("sub");
    let offer = w
        .ask(|reply| WorkerCommand::RequestOffer { session: 2, reply })
        .expect("offer");
    let mut s = Client::new();
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
