//! Issue #5 at the worker, with str0m clients on loopback: a publisher's bitrate cap reaches
//! it as `b=AS` in the answer and as repeated REMB; a publisher whose audio-level
//! extension goes loud and then quiet is reported as speaking and then stopped, within the
//! hysteresis bounds (250 ms to start, 1 s to stop).

mod support;

use std::time::{Duration, Instant};

use media_core::session::StreamType;
use media_core::worker::{WorkerCommand, WorkerError, WorkerEvent};
use support::{Client, Worker, run_until};

/// The m=video section of an SDP.
fn video_section(sdp: &str) -> String {
    let start = sdp.find("m=video").expect("video section");
    let rest = &sdp[start..];
    let end = rest[1..].find("\r\nm=").map_or(rest.len(), |e| e + 1);
    rest[..end].to_string()
}

#[test]
fn a_capped_publisher_gets_bandwidth_lines_in_its_answer_and_remb_at_the_cap_every_second() {
    let w = Worker::start(Duration::from_secs(30));
    for session in [1, 2] {
        w.ask(|reply| WorkerCommand::CreatePublisher {
            session,
            stream_type: StreamType::Video,
            reply,
        })
        .expect("create publisher");
    }
    // Publisher 1 is capped at 300 kbit/s; publisher 2 is not.
    w.ask(|reply| WorkerCommand::LimitPublisher {
        session: 1,
        bitrate: 300_000,
        reply,
    })
    .expect("limit");
    assert_eq!(
        w.ask(|reply| WorkerCommand::LimitPublisher {
            session: 9,
            bitrate: 300_000,
            reply,
        }),
        Err(WorkerError::UnknownSession)
    );
    let mut capped = Client::new();
    let mut free = Client::new();
    let mut answers = Vec::new();
    for (session, c) in [(1u32, &mut capped), (2, &mut free)] {
        let offer = c.publish_offer_with_audio();
        let answer = w
            .ask(|reply| WorkerCommand::Offer {
                session,
                sdp: offer,
                reply,
            })
            .expect("answer");
        c.accept_answer(&answer);
        answers.push(answer);
    }
    let video = video_section(&answers[0]);
    assert!(
        video.contains("\r\nb=AS:300\r\n"),
        "capped answer's video section:\n{video}"
    );
    assert_eq!(
        answers[0].matches("b=AS:").count(),
        1,
        "only the video section is capped:\n{}",
        answers[0]
    );
    assert!(!answers[1].contains("b=AS:"), "{}", answers[1]);
    assert!(run_until(
        &mut [&mut capped, &mut free],
        Duration::from_secs(10),
        |c| c.iter().all(|c| c.connected)
    ));

    // Both send video for 3.5 s (a packet every 10 ms, as a camera at a few hundred kbit/s).
    let (vmid_capped, vmid_free) = (capped.mids[1], free.mids[1]);
    let started = Instant::now();
    let mut seq = 1u64;
    while started.elapsed() < Duration::from_millis(3500) {
        capped.write_rtp(vmid_capped, seq, seq as u32 * 900, &[0x10; 800]);
        free.write_rtp(vmid_free, seq, seq as u32 * 900, &[0x10; 800]);
        seq += 1;
        run_until(
            &mut [&mut capped, &mut free],
            Duration::from_millis(10),
            |_| false,
        );
    }
    let rembs = capped.remb.clone();
    assert!(
        rembs.len() >= 3,
        "REMB repeated every second while sending for 3.5 s: {rembs:?}"
    );
    assert!(
        rembs
            .iter()
            .all(|(mid, bps)| *mid == vmid_capped && *bps == 300_000),
        "every REMB carries the cap on the video line: {rembs:?}"
    );
    assert!(
        rembs.len() <= 5,
        "REMB at most once a second (plus one at the start): {rembs:?}"
    );
    assert!(free.remb.is_empty(), "uncapped: {:?}", free.remb);

    // Lifting the cap stops the REMB.
    w.ask(|reply| WorkerCommand::LimitPublisher {
        session: 1,
        bitrate: 0,
        reply,
    })
    .expect("lift");
    let before = capped.remb.len();
    let lifted = Instant::now();
    while lifted.elapsed() < Duration::from_millis(1500) {
        capped.write_rtp(vmid_capped, seq, seq as u32 * 900, &[0x10; 800]);
        seq += 1;
        run_until(&mut [&mut capped], Duration::from_millis(10), |_| false);
    }
    assert!(
        capped.remb.len() <= before + 1,
        "at most one REMB already queued after lifting: {:?}",
        capped.remb
    );
}

#[test]
fn loud_then_quiet_audio_levels_make_speaking_then_stopped_events_within_the_hysteresis() {
    let w = Worker::start(Duration::from_secs(30));
    w.ask(|reply| WorkerCommand::CreatePublisher {
        session: 4,
        stream_type: StreamType::Video,
        reply,
    })
    .expect("create publisher");
    let mut p = Client::new();
    let offer = p.publish_offer_with_audio();
    let answer = w
        .ask(|reply| WorkerCommand::Offer {
            session: 4,
            sdp: offer,
            reply,
        })
        .expect("answer");
    assert!(
        answer.contains("urn:ietf:params:rtp-hdrext:ssrc-audio-level"),
        "the SFU negotiates the audio-level extension:\n{answer}"
    );
    p.accept_answer(&answer);
    assert!(run_until(&mut [&mut p], Duration::from_secs(10), |c| c[0].connected));
    let amid = p.mids[0];

    // 1 s at 100 dBov (room noise), 1.5 s at 30 dBov (speech), 2 s at 100 dBov; one Opus
    // packet every 20 ms. Events are timed against the moment the level changed.
    let phases = [
        (Duration::from_millis(1000), 100u8),
        (Duration::from_millis(1500), 30),
        (Duration::from_millis(2000), 100),
    ];
    let mut events: Vec<(usize, Duration, bool)> = Vec::new();
    let mut seq = 1u64;
    for (phase, (len, level)) in phases.iter().enumerate() {
        let start = Instant::now();
        while start.elapsed() < *len {
            p.write_audio(amid, seq, seq as u32 * 960, *level);
            seq += 1;
            run_until(&mut [&mut p], Duration::from_millis(20), |_| false);
            while let Ok(ev) = w.events.try_recv() {
                match ev {
                    WorkerEvent::Speaking { key, speaking } => {
                        assert_eq!(key.session, 4);
                        events.push((phase, start.elapsed(), speaking));
                    }
                    other => panic!("unexpected event {other:?}"),
                }
            }
        }
    }
    assert_eq!(
        events.iter().map(|e| (e.0, e.2)).collect::<Vec<_>>(),
        vec![(1, true), (2, false)],
        "speaking during the loud phase, stopped in the quiet one: {events:?}"
    );
    let (on, off) = (events[0].1, events[1].1);
    // Lower bounds are the hysteresis; upper bounds allow for a loaded machine.
    assert!(
        on >= Duration::from_millis(240) && on <= Duration::from_millis(800),
        "speaking {on:?} after the level rose (hysteresis 250 ms)"
    );
    assert!(
        off >= Duration::from_millis(980) && off <= Duration::from_millis(1800),
        "stopped {off:?} after the level fell (hysteresis 1 s)"
    );
    eprintln!("speaking after {on:?}, stopped after {off:?}");
}
