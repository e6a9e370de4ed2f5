//! Automatic video quality through the whole box (#5): a Chromium publisher on the meeting page
//! sends its camera as three simulcast layers; a second Chromium, inside a network namespace
//! whose downlink the test shapes with `tc … tbf`, subscribes. When its downlink drops to
//! 300 kbit/s the SFU's bandwidth estimate for it falls and it must be moved to the low layer
//! and keep decoding; when the shaping is lifted it must climb back to the top layer; layer
//! switches must not freeze the picture. The subscriber page samples its inbound-rtp stats
//! (frameWidth, frameHeight, framesDecoded) every 250 ms.
//!
//! Asserted as the issue states them:
//! - the low layer within 15 s of the drop;
//! - the top layer within 30 s of the recovery;
//! - no freeze over 1 s from the drop to the end: no gap over 1000 ms between two samples
//!   with rising framesDecoded (a gap between rises bounds the freeze from above).
//!
//! The freeze right at the drop used to last until str0m's delay-based estimate reacted
//! (0.3-2.2 s), so this test was kept out of the suite with a 4 s bound. The worker now reacts
//! to the receiver's NACKs and reports (media-core/src/loss.rs) and the freeze stayed within
//! 1 s in every run measured (docs/architecture.md, "Quality and sizing"): the issue's 1 s is
//! asserted. In about one run in five (on a machine loaded with other builds) the subscriber
//! did not hold the top layer for 5 s *before* any shaping (the publisher's Chromium turned its
//! upper layers off; once the SFU's estimate did not climb), which says nothing about the
//! shaping: such a run, and one whose browsers did not start or join, is tried once more from
//! scratch; every run that gets to the shaping is held to the issue's bounds.
//! `TALKBOX_QUALITY_FREEZE_MS` sets another bound for a run by hand (e.g. to see a whole series
//! through on an overloaded machine); the measured freeze is printed either way.
//!
//! The test waits longer than those bounds before it gives up, so that a failure prints how
//! long it actually took.
//!
//! The measured figures are printed. Needs root (for `ip netns` and `tc`), iproute2 and
//! `apt-get install chromium chromium-driver`; traffic stays on loopback and the veth pair the
//! test creates.

mod common;

use std::net::IpAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::browser::Browser;
use common::netns::Netns;
use common::{Supervisor, free_port, isolated_config};
use serde_json::Value;

/// The longest freeze allowed: the issue's bound (see the module comment).
const FREEZE_LIMIT_MS: u64 = 1000;

/// Installs a sampler in the page: every 250 ms, the inbound video of the first remote camera
/// tile as [unix ms, frameWidth, frameHeight, framesDecoded, bytesReceived].
const SAMPLER: &str = r#"
window.qs = [];
setInterval(async () => {
  const t = [...document.querySelectorAll('#grid .tile:not(.self)')]
    .find(x => x.dataset.roomType === 'video');
  const p = t && call.peers.get(t.dataset.session);
  const pc = p && p.subs && p.subs.video;
  if (!pc) return;
  const now = Date.now();
  (await pc.getStats()).forEach(r => {
    if (r.type === 'inbound-rtp' && r.kind === 'video') {
      window.qs.push([now, r.frameWidth || 0, r.frameHeight || 0, r.framesDecoded || 0,
                      r.bytesReceived || 0]);
    }
  });
}, 250);
return true;
"#;

/// The publisher's layers as its outbound-rtp reports them: rid, frameWidth, bytesSent,
/// qualityLimitationReason.
const PUBLISHER_LAYERS: &str = r#"
const done = arguments[arguments.length - 1];
const pc = call.pubs && call.pubs.video;
if (!pc) { done([]); } else {
  pc.getStats().then(st => {
    const out = [];
    st.forEach(r => {
      if (r.type === 'outbound-rtp' && r.kind === 'video') {
        out.push([r.rid || '', r.frameWidth || 0, r.bytesSent || 0,
                  r.qualityLimitationReason || '']);
      }
    });
    out.sort();
    done(out);
  }, e => done(String(e)));
}
"#;

/// One sample: time (ms since the epoch), width, height, frames decoded.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: u64,
    width: u64,
    height: u64,
    decoded: u64,
}

/// A time of day (UTC) as the box's log shows it, for reading the two side by side.
fn clock(ms: u64) -> String {
    let s = ms / 1000 % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        ms % 1000
    )
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Takes the samples the page collected since the last call.
async fn drain(b: &Browser, into: &mut Vec<Sample>) {
    let v = b.eval("return window.qs.splice(0);").await;
    for s in v.as_array().into_iter().flatten() {
        let n = |i: usize| s[i].as_f64().unwrap_or(0.0) as u64;
        into.push(Sample {
            at: n(0),
            width: n(1),
            height: n(2),
            decoded: n(3),
        });
    }
}

async fn publisher_layers(b: &Browser) -> Value {
    b.client
        .execute_async(PUBLISHER_LAYERS, vec![])
        .await
        .unwrap_or_else(|e| Value::from(format!("stats failed: {e}")))
}

/// Width of each layer as the publisher sends it now (0: not sent).
#[derive(Debug, Clone, Copy, Default)]
struct Widths {
    q: u64,
    f: u64,
}

fn widths(layers: &Value) -> Widths {
    let mut w = Widths::default();
    for l in layers.as_array().into_iter().flatten() {
        let width = l[1].as_u64().unwrap_or(0);
        match l[0].as_str() {
            Some("q") => w.q = width,
            Some("f") => w.f = width,
            _ => {}
        }
    }
    w
}

/// The subscriber shows the publisher's full layer (Chromium may scale all layers down
/// under CPU load, so this compares with what it sends now).
fn is_top(s: &Sample, w: &Widths) -> bool {
    w.f > 0 && s.width * 10 >= w.f * 9
}

/// The subscriber shows the publisher's quarter layer.
fn is_low(s: &Sample, w: &Widths) -> bool {
    s.width > 0 && w.q > 0 && s.width * 10 <= w.q * 11
}

/// Samples until `ok` holds for a new sample (returning its time) or `limit` passes; the
/// publisher's layer widths are read along.
async fn until(
    b: &Browser,
    publisher: &Browser,
    samples: &mut Vec<Sample>,
    limit: Duration,
    ok: impl Fn(&Sample, &Widths) -> bool,
) -> Option<u64> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let w = widths(&publisher_layers(publisher).await);
        let from = samples.len();
        drain(b, samples).await;
        if let Some(s) = samples[from..].iter().find(|s| ok(s, &w)) {
            return Some(s.at);
        }
    }
    None
}

/// Longest time between two samples whose framesDecoded rose, over samples taken after
/// `from` (ms since the epoch); also when it ended.
fn longest_freeze(samples: &[Sample], from: u64) -> (u64, u64) {
    let mut worst = (0, 0);
    let mut last_rise: Option<(u64, u64)> = None;
    for s in samples.iter().filter(|s| s.at >= from) {
        match last_rise {
            None => last_rise = Some((s.at, s.decoded)),
            Some((t, d)) if s.decoded > d => {
                if s.at - t > worst.0 {
                    worst = (s.at - t, s.at);
                }
                last_rise = Some((s.at, s.decoded));
            }
            Some(_) => {}
        }
    }
    // A freeze still going on at the end counts too.
    if let (Some((t, _)), Some(last)) = (last_rise, samples.last())
        && last.at - t > worst.0
    {
        worst = (last.at - t, last.at);
    }
    worst
}

/// The box log's lines with their time of day ("HH:MM:SS.mmm", as [`clock`] gives it).
fn timed_log_lines(log: &str) -> Vec<(String, &str)> {
    log.lines()
        .filter_map(|l| {
            let t = l.find('T').and_then(|i| l.get(i + 1..i + 13))?;
            Some((t.to_string(), l))
        })
        .collect()
}

fn shape(dev: &str, verb: &str) {
    let mut c = Command::new("tc");
    c.args(["qdisc", verb, "dev", dev, "root"]);
    if verb != "del" {
        // 300 kbit/s; a burst of a few packets and at most 100 ms of queue, as a slow DSL or
        // mobile downlink would have.
        c.args(["tbf", "rate", "300kbit", "burst", "6kb", "latency", "100ms"]);
    }
    let ok = c.status().expect("tc (apt-get install iproute2)");
    assert!(ok.success(), "tc qdisc {verb} on {dev}");
}

// Needs root, chromium and chromium-driver (scripts/install-deps). The waits are generous
// (90 s for the first top layer, 20 s for the low layer, 40 s for recovery; page steps 45 s)
// so that a loaded 2-core box fails only on what the issue bounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shaped_subscriber_drops_to_the_low_layer_and_climbs_back_without_freezing() {
    // A run that fails before the shaping starts (a browser that does not start or join, an
    // unshaped call that never settles at the top layer) says nothing about what the issue
    // bounds: it gets one more try, with a fresh box, namespace and browsers, and says why.
    // Everything from the shaping on is asserted in every run that gets there.
    for attempt in 1..=2u32 {
        let shaping = Arc::new(AtomicBool::new(false));
        let run = tokio::spawn(shaped_run(attempt, shaping.clone())).await;
        match run {
            Ok(()) => return,
            Err(e) if e.is_panic() && !shaping.load(Ordering::SeqCst) && attempt < 2 => {
                eprintln!(
                    "attempt {attempt} failed before the shaping started (see the panic above); \
                     once more"
                );
            }
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("the run was cancelled: {e}"),
        }
    }
}

/// One whole run; `shaping` is set once the shaping starts.
async fn shaped_run(attempt: u32, shaping: Arc<AtomicBool>) {
    let pid = std::process::id();
    let net = format!("10.232.{}", (pid + attempt) % 250);
    let (host_ip, ns_ip): (IpAddr, IpAddr) = (
        format!("{net}.1").parse().expect("ip"),
        format!("{net}.2").parse().expect("ip"),
    );
    let ns = Netns::new(format!("tbqs{pid}a{attempt}"));
    let (vh, vn) = (
        format!("tbqh{pid}a{attempt}"),
        format!("tbqn{pid}a{attempt}"),
    );
    let ok = Command::new("ip")
        .args(["link", "add", &vh, "type", "veth", "peer", "name", &vn])
        .status()
        .expect("ip");
    assert!(ok.success(), "creating the veth pair (needs root)");
    let ok = Command::new("ip")
        .args(["link", "set", &vn, "netns", &ns.0])
        .status()
        .expect("ip");
    assert!(ok.success());
    let ok = Command::new("ip")
        .args(["addr", "add", &format!("{host_ip}/24"), "dev", &vh])
        .status()
        .expect("ip");
    assert!(ok.success());
    let ok = Command::new("ip")
        .args(["link", "set", &vh, "up"])
        .status()
        .expect("ip");
    assert!(ok.success());
    ns.run(&["ip", "addr", "add", &format!("{ns_ip}/24"), "dev", &vn]);
    ns.run(&["ip", "link", "set", &vn, "up"]);
    // The veth goes with the namespace (deleting one end deletes both).
    struct DelLink(String);
    impl Drop for DelLink {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }
    let _link = DelLink(vh.clone());

    // The box listens on the host's end of the veth, where both browsers reach it, and
    // announces only that address for media.
    let port = free_port();
    let listen = format!("listen = \"{host_ip}:{port}\"");
    let ips = format!("public_ips = [\"{host_ip}\"]");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = isolated_config(&[("signaling", &listen), ("sfu", &ips)]);
    std::fs::write(dir.path().join("talkbox.toml"), config).expect("write config");
    let stderr_log = dir.path().join("supervisor.log");
    let log = std::fs::File::create(&stderr_log).expect("log file");
    // The media workers' layer decisions (debug) go to the log shown on failure.
    let child = Command::new(common::talkbox())
        .args(["run", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "info,media_core=debug,media_core::loss=trace")
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start talkbox run");
    let sup = Supervisor {
        dir,
        child,
        stderr_log,
    };
    sup.wait_ready();
    let url = format!("https://{host_ip}:{port}/r/quality-shaping");
    let flags = [
        "--ignore-certificate-errors",
        "--autoplay-policy=no-user-gesture-required",
    ];

    let publisher = Browser::start(&flags).await;
    publisher.join_meeting(&url, "Pub").await;
    let subscriber = Browser::start_in_netns(&ns.0, ns_ip, host_ip, &flags).await;
    subscriber.join_meeting(&url, "Sub").await;
    assert_eq!(subscriber.eval(SAMPLER).await, Value::Bool(true));

    let mut samples: Vec<Sample> = Vec::new();
    let report = |what: &str, samples: &[Sample], layers: &Value| {
        let tail: Vec<String> = samples
            .iter()
            .rev()
            .take(12)
            .rev()
            .map(|s| format!("{}x{}/{}", s.width, s.height, s.decoded))
            .collect();
        format!(
            "{what}\nlast samples (WxH/decoded): {tail:?}\npublisher layers (rid, width, \
             bytes, limitation): {layers}\nbox log:\n{}",
            sup.log()
        )
    };

    // Unshaped, the subscriber reaches the top layer (the estimate starts at 500 kbit/s and
    // probing raises it).
    let top = until(
        &subscriber,
        &publisher,
        &mut samples,
        Duration::from_secs(90),
        is_top,
    )
    .await;
    let layers = publisher_layers(&publisher).await;
    eprintln!("publisher layers before shaping: {layers}");
    if top.is_none() {
        panic!(
            "{}",
            report("never reached the top layer unshaped", &samples, &layers)
        );
    }
    // The top layer must hold for 5 s before the shaping starts, so that what follows is the
    // shaping's doing.
    let mut stable_since = unix_ms();
    let stable = loop {
        let from = samples.len();
        until(
            &subscriber,
            &publisher,
            &mut samples,
            Duration::from_millis(500),
            |_, _| false,
        )
        .await;
        let w = widths(&publisher_layers(&publisher).await);
        if samples[from..].iter().any(|s| !is_top(s, &w)) {
            stable_since = unix_ms();
        }
        if unix_ms() - stable_since >= 5000 {
            break true;
        }
        if top.is_some_and(|t| unix_ms() - t > 90_000) {
            break false;
        }
    };
    assert!(
        stable,
        "{}",
        report(
            "the top layer did not hold for 5 s unshaped within 90 s",
            &samples,
            &publisher_layers(&publisher).await
        )
    );
    until(
        &subscriber,
        &publisher,
        &mut samples,
        Duration::from_secs(3),
        |_, _| false,
    )
    .await;

    // 300 kbit/s downlink.
    shaping.store(true, Ordering::SeqCst);
    shape(&vh, "add");
    let dropped_at = unix_ms();
    eprintln!("shaped to 300 kbit/s at {}", clock(dropped_at));
    let low = until(
        &subscriber,
        &publisher,
        &mut samples,
        Duration::from_secs(20),
        is_low,
    )
    .await;
    let layers = publisher_layers(&publisher).await;
    let Some(low) = low else {
        shape(&vh, "del");
        panic!(
            "{}",
            report(
                "no low layer within 20 s of the 300 kbit/s shaping (15 s allowed)",
                &samples,
                &layers
            )
        );
    };
    let to_low = low.saturating_sub(dropped_at);
    // Stay shaped for 15 s more: the picture keeps coming, and at the low layer.
    until(
        &subscriber,
        &publisher,
        &mut samples,
        Duration::from_secs(15),
        |_, _| false,
    )
    .await;
    let low_width = widths(&publisher_layers(&publisher).await).q;
    let shaped_tail: Vec<Sample> = samples
        .iter()
        .filter(|s| s.at >= low + 10_000)
        .copied()
        .collect();
    let shaped_frames = match (shaped_tail.first(), shaped_tail.last()) {
        (Some(a), Some(b)) => b.decoded.saturating_sub(a.decoded),
        _ => 0,
    };
    let shaped_max_width = shaped_tail.iter().map(|s| s.width).max().unwrap_or(0);

    // Lift the shaping.
    shape(&vh, "del");
    let lifted_at = unix_ms();
    eprintln!("shaping lifted at {}", clock(lifted_at));
    let back = until(
        &subscriber,
        &publisher,
        &mut samples,
        Duration::from_secs(40),
        is_top,
    )
    .await;
    let layers_after = publisher_layers(&publisher).await;
    // A few seconds at the top again, so a freeze right after the last switch shows.
    until(
        &subscriber,
        &publisher,
        &mut samples,
        Duration::from_secs(3),
        |_, _| false,
    )
    .await;
    let (freeze, freeze_end) = longest_freeze(&samples, dropped_at.saturating_sub(1000));

    let to_top = back.map(|b| b.saturating_sub(lifted_at));
    // The samples around both switches, to read beside the box's log.
    for (what, t) in [("drop", dropped_at), ("lift", lifted_at)] {
        let around: Vec<String> = samples
            .iter()
            .filter(|s| s.at + 1000 >= t && s.at <= t + 4000)
            .map(|s| format!("{} {}x{}/{}", clock(s.at), s.width, s.height, s.decoded))
            .collect();
        eprintln!("samples around the {what}: {around:?}");
    }
    let switches: Vec<String> = sup
        .log()
        .lines()
        .filter(|l| {
            l.contains("simulcast target changed")
                || l.contains("layer switched")
                || l.contains("heavy loss")
        })
        .map(|l| l.to_string())
        .collect();
    // The loss detector's input around the drop (loss.rs), to tune it against what Chromium
    // sends: the box logs its egress counters at trace level.
    let (from, to) = (
        clock(dropped_at.saturating_sub(500)),
        clock(dropped_at + 2500),
    );
    let log = sup.log();
    let stats: Vec<&str> = timed_log_lines(&log)
        .into_iter()
        .filter(|(t, l)| l.contains("egress stats") && *t >= from && *t <= to)
        .map(|(_, l)| l)
        .collect::<Vec<_>>();
    eprintln!("egress stats around the drop:\n{}", stats.join("\n"));
    eprintln!(
        "the box's layer decisions (last 40):\n{}",
        switches[switches.len().saturating_sub(40)..].join("\n")
    );
    eprintln!(
        "measured: drop -> low layer {:.1} s; low layer decoded {shaped_frames} frames in the \
         last ~5 s shaped (widest {shaped_max_width}); recovery -> top layer {}; longest \
         freeze from the drop on {:.2} s (ended {:.1} s after the drop; the issue's 1 s \
         bound {}); publisher layers after: {layers_after}",
        to_low as f64 / 1000.0,
        to_top.map_or("never".to_string(), |t| format!(
            "{:.1} s",
            t as f64 / 1000.0
        )),
        freeze as f64 / 1000.0,
        freeze_end.saturating_sub(dropped_at) as f64 / 1000.0,
        if freeze <= 1000 { "met" } else { "MISSED" },
    );
    assert!(
        shaped_frames >= 25 && shaped_max_width * 10 <= low_width * 11,
        "{}",
        report(
            &format!(
                "shaped, the subscriber must keep decoding the low layer: {shaped_frames} \
                 frames in ~5 s, widest {shaped_max_width}"
            ),
            &samples,
            &layers
        )
    );
    assert!(
        to_low <= 15_000,
        "{}",
        report(
            &format!("the low layer came {to_low} ms after the drop (15 s allowed)"),
            &samples,
            &layers
        )
    );
    assert!(
        to_top.is_some_and(|t| t <= 30_000),
        "{}",
        report(
            &format!(
                "the top layer came back {to_top:?} ms after lifting the shaping (30 s \
                 allowed; waited 40 s)"
            ),
            &samples,
            &layers_after
        )
    );
    let freeze_limit = std::env::var("TALKBOX_QUALITY_FREEZE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(FREEZE_LIMIT_MS);
    assert!(
        freeze <= freeze_limit,
        "{}",
        report(
            &format!(
                "a freeze of {freeze} ms (ended {} ms after the drop; {freeze_limit} ms allowed)",
                freeze_end.saturating_sub(dropped_at)
            ),
            &samples,
            &layers_after
        )
    );
    subscriber.close().await;
    publisher.close().await;
}
