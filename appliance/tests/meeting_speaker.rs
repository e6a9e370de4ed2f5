//! Active speaker through the whole box (issue #5): `talkbox run`, two headless Debian Chromium
//! instances on the meeting page. Ann's microphone is a WAV file Chromium loops (2 s of tone,
//! 4 s of silence); Chromium puts the level of each packet into the audio-level extension, the
//! SFU detects speech from it and the signaling server relays `speaking`/`stoppedSpeaking` to
//! the room. Ben's page must mark Ann's tile as speaking by the server's word
//! (`data-server-speaking`), then not, then again as the file loops. Needs
//! `apt-get install chromium chromium-driver`.

mod common;

use std::time::{Duration, Instant};

use common::browser::Browser;
use common::{Supervisor, free_port, isolated_config};

/// A 48 kHz mono 16-bit WAV: `tone` of a 440 Hz sine at half scale, then `silence`.
fn tone_then_silence(tone: Duration, silence: Duration) -> Vec<u8> {
    let rate = 48_000u32;
    let n_tone = (rate as f64 * tone.as_secs_f64()) as usize;
    let n_all = n_tone + (rate as f64 * silence.as_secs_f64()) as usize;
    let mut pcm = Vec::with_capacity(n_all * 2);
    for i in 0..n_all {
        let v = if i < n_tone {
            (16_000.0 * (2.0 * std::f64::consts::PI * 440.0 * i as f64 / rate as f64).sin()) as i16
        } else {
            0
        };
        pcm.extend_from_slice(&v.to_le_bytes());
    }
    let mut w = Vec::with_capacity(44 + pcm.len());
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + pcm.len() as u32).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes()); // PCM
    w.extend_from_slice(&1u16.to_le_bytes()); // mono
    w.extend_from_slice(&rate.to_le_bytes());
    w.extend_from_slice(&(rate * 2).to_le_bytes());
    w.extend_from_slice(&2u16.to_le_bytes());
    w.extend_from_slice(&16u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&(pcm.len() as u32).to_le_bytes());
    w.extend_from_slice(&pcm);
    w
}

async fn join(url: &str, name: &str, extra: &[&str]) -> Browser {
    let mut flags = vec![
        "--ignore-certificate-errors",
        "--autoplay-policy=no-user-gesture-required",
    ];
    flags.extend_from_slice(extra);
    let b = Browser::start(&flags).await;
    b.join_meeting(url, name).await;
    b
}

/// Waits until Ben's tile of `session` has `data-server-speaking` = `want`; returns when.
async fn wait_speaking(b: &Browser, session: &str, want: bool, limit: Duration) -> Option<Instant> {
    let script = format!(
        "const t = document.querySelector('#grid .tile[data-session=\"{session}\"][data-room-type=\"video\"]'); \
         return t ? t.dataset.serverSpeaking || '' : 'no tile';"
    );
    let start = Instant::now();
    while start.elapsed() < limit {
        if b.eval(&script).await == (if want { "true" } else { "false" }) {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_talking_participant_is_highlighted_at_the_others_by_the_sfus_word() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wav = dir.path().join("ann.wav");
    std::fs::write(
        &wav,
        tone_then_silence(Duration::from_secs(2), Duration::from_secs(4)),
    )
    .expect("write wav");
    let port = free_port();
    let listen = format!("listen = \"127.0.0.1:{port}\"");
    let sup = Supervisor::start(Some(&isolated_config(&[("signaling", &listen)])));
    sup.wait_ready();
    let url = format!("https://127.0.0.1:{port}/r/who-speaks");
    let audio_flag = format!("--use-file-for-fake-audio-capture={}", wav.display());
    let ann = join(&url, "Ann", &[&audio_flag]).await;
    let ben = join(&url, "Ben", &[]).await;
    let ann_sid = ann
        .eval("return call.me")
        .await
        .as_str()
        .unwrap_or("")
        .to_string();

    let Some(on) = wait_speaking(&ben, &ann_sid, true, Duration::from_secs(40)).await else {
        panic!(
            "Ben never saw Ann speaking by the server's word; Ben noted {:#}\nlog:\n{}",
            ben.eval("return call.notes").await,
            sup.log()
        );
    };
    let off = wait_speaking(&ben, &ann_sid, false, Duration::from_secs(10))
        .await
        .expect("Ann's speaking ended within 10 s");
    let again = wait_speaking(&ben, &ann_sid, true, Duration::from_secs(10))
        .await
        .expect("Ann spoke again as the file looped");
    let (talk, pause) = (off - on, again - off);
    eprintln!(
        "Ben saw Ann speaking for {talk:?}, then silent for {pause:?} (tone 2 s, silence 4 s)"
    );
    // Tone 2 s: speaking from ~250 ms into it until ~1 s after it; silence 4 s: quiet from
    // ~1 s into it until ~250 ms into the next tone. Wide bounds: two browsers and the box
    // share a loaded machine.
    assert!(
        (Duration::from_millis(1800)..=Duration::from_millis(4000)).contains(&talk),
        "speaking lasted {talk:?} for a 2 s tone"
    );
    assert!(
        (Duration::from_millis(2000)..=Duration::from_millis(4500)).contains(&pause),
        "silence lasted {pause:?} for 4 s without sound"
    );
    ann.close().await;
    ben.close().await;
}
