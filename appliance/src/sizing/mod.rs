//! NIC-aware sizing: what the box can send, and the limits that follow from it (DESIGN.md §5).
//!
//! Four figures, the lowest wins: the link speed of the NIC that carries the default route
//! ([`nic`]), the uplink the admin declared (`sizing.uplink_mbps`, for a WAN slower than the
//! NIC), an active measurement against a peer ([`probe`]: another talkbox, or
//! `talkbox sizing sink`) and the download speed the admin's browser measured from the box on
//! the setup page, when the admin chose to use it (`DATA/sizing/browser.json`, written by the
//! supervisor for the web service; [`read_browser`]). The browser figure is the admin's choice
//! rather than automatic because a laptop on Wi-Fi measures its own link, not the box's. The egress budget is `sizing.egress_fraction` of that capacity; the
//! SFU's allocator (media-core `allocator`) never plans more, and the capacity table says what
//! it means in participants.
//!
//! The SFU service runs [`Sizer`]: it re-reads the links every [`POLL`], measures at start,
//! every `sizing.remeasure_minutes` and whenever `DATA/sizing/measure-request` appears (what
//! `talkbox sizing --apply` and the setup page's "Measure again" create), re-reads the browser
//! figure every [`POLL`], and writes the result to
//! `DATA/sizing/state.json` for the status page and the CLI. An edited uplink restarts the SFU
//! (config change), so every source of change is in force within seconds.

pub mod nic;
pub mod probe;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::{Config, DataDir};

/// How often links and the request file are looked at.
pub const POLL: Duration = Duration::from_secs(2);
/// Camera, audio and screen-share rates the capacity table assumes (the defaults of the caps;
/// DESIGN.md §5).
pub const AUDIO_BPS: u64 = 50_000;

/// One active measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    pub peer: String,
    pub mbps: f64,
    /// Unix seconds.
    pub at: u64,
}

/// How many participants the budget carries in one room of each kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapacityTable {
    /// Everyone sends and receives camera video (out = cap × n × (n−1), in = cap × n).
    pub video: u64,
    /// Audio only (out = audio × n × (n−1)).
    pub audio_only: u64,
    /// Camera video for everyone plus one screen share seen by the n−1 others.
    pub video_and_screen: u64,
}

/// Everything sizing knows at one moment, and the limits in force.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    pub links: Vec<LinkState>,
    pub link_mbps: Option<u64>,
    pub declared_uplink_mbps: Option<u64>,
    pub measured: Option<Measurement>,
    /// The download speed the admin's browser measured from the box (setup page), if the
    /// admin chose to use it for sizing.
    #[serde(default)]
    pub browser: Option<Measurement>,
    /// The last measurement failed: why (the other figures still count).
    pub measure_error: Option<String>,
    /// The lowest of the three; `None` when nothing is known (no limit is then planned).
    pub capacity_mbps: Option<f64>,
    pub egress_fraction: f64,
    pub budget_bps: Option<u64>,
    pub camera_bps: u64,
    pub screen_bps: u64,
    pub table: Option<CapacityTable>,
    /// Unix seconds when this was computed.
    pub computed_at: u64,
}

/// A link as stored (serde-friendly copy of [`nic::Link`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkState {
    pub name: String,
    pub speed_mbps: Option<u64>,
    pub up: bool,
    pub default_route: bool,
}

/// The most participants `n` (up to 10 000) with `need(n) <= budget`.
fn most(budget: u64, need: impl Fn(u64) -> u64) -> u64 {
    let mut n = 1;
    while n < 10_000 && need(n + 1) <= budget {
        n += 1;
    }
    if need(1) > budget { 0 } else { n }
}

/// The capacity table for an egress budget (ingress is assumed to be at least as large: links
/// and most uplinks are symmetric or faster downstream).
pub fn table(budget_bps: u64, camera_bps: u64, screen_bps: u64) -> CapacityTable {
    CapacityTable {
        video: most(budget_bps, |n| {
            (camera_bps * n * (n - 1)).max(camera_bps * n)
        }),
        audio_only: most(budget_bps, |n| AUDIO_BPS * n * (n - 1)),
        video_and_screen: most(budget_bps, |n| {
            (camera_bps * n * (n - 1) + screen_bps * (n - 1)).max(camera_bps * n + screen_bps)
        }),
    }
}

/// Combines the four figures into the capacity and its limits.
pub fn compute(
    links: Vec<nic::Link>,
    config: &Config,
    measured: Option<Measurement>,
    measure_error: Option<String>,
    browser: Option<Measurement>,
) -> Capacity {
    let link_mbps = nic::limiting_speed(&links);
    let declared = (config.sizing.uplink_mbps > 0).then_some(config.sizing.uplink_mbps);
    let capacity_mbps = [
        link_mbps.map(|v| v as f64),
        declared.map(|v| v as f64),
        measured.as_ref().map(|m| m.mbps),
        browser.as_ref().map(|m| m.mbps),
    ]
    .into_iter()
    .flatten()
    .reduce(f64::min);
    let budget_bps =
        capacity_mbps.map(|c| (c * 1_000_000.0 * config.sizing.egress_fraction) as u64);
    let camera_bps = config.signaling.max_stream_bitrate;
    let screen_bps = config.signaling.max_screen_bitrate;
    Capacity {
        links: links
            .into_iter()
            .map(|l| LinkState {
                name: l.name,
                speed_mbps: l.speed_mbps,
                up: l.up,
                default_route: l.default_route,
            })
            .collect(),
        link_mbps,
        declared_uplink_mbps: declared,
        measured,
        browser,
        measure_error,
        capacity_mbps,
        egress_fraction: config.sizing.egress_fraction,
        budget_bps,
        camera_bps,
        screen_bps,
        table: budget_bps.map(|b| table(b, camera_bps, screen_bps)),
        computed_at: unix_now(),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The sizing directory in the data dir (owned by the service user).
pub fn dir(data: &DataDir) -> PathBuf {
    data.sizing_dir()
}
pub fn state_path(data: &DataDir) -> PathBuf {
    dir(data).join("state.json")
}
pub fn request_path(data: &DataDir) -> PathBuf {
    dir(data).join("measure-request")
}

pub fn browser_path(data: &DataDir) -> PathBuf {
    dir(data).join("browser.json")
}

/// The largest browser figure taken (400 Gbit/s): anything above is a broken measurement.
pub const MAX_BROWSER_MBPS: f64 = 400_000.0;
/// The smallest (100 kbit/s): below it not even one camera fits, so it is a broken measurement
/// rather than a figure to size by.
pub const MIN_BROWSER_MBPS: f64 = 0.1;
/// `browser.json` is a few dozen bytes; a larger file is not ours.
const MAX_BROWSER_FILE: u64 = 4096;

/// Checks a browser figure before it is stored: finite and within
/// [`MIN_BROWSER_MBPS`]..=[`MAX_BROWSER_MBPS`].
pub fn check_browser_mbps(mbps: f64) -> Result<(), String> {
    if !mbps.is_finite() || !(MIN_BROWSER_MBPS..=MAX_BROWSER_MBPS).contains(&mbps) {
        return Err(format!(
            "mbps: {mbps} is not a measured speed; allowed are {MIN_BROWSER_MBPS} to {MAX_BROWSER_MBPS} Mbit/s"
        ));
    }
    Ok(())
}

/// The browser figure the admin chose to use, if any (a missing, oversized or invalid file
/// counts as none, so a damaged file can never set a limit).
pub fn read_browser(data: &DataDir) -> Option<Measurement> {
    use std::io::Read as _;
    let f = std::fs::File::open(browser_path(data)).ok()?;
    let mut text = Vec::new();
    f.take(MAX_BROWSER_FILE + 1).read_to_end(&mut text).ok()?;
    if text.len() as u64 > MAX_BROWSER_FILE {
        return None;
    }
    let m: Measurement = serde_json::from_slice(&text).ok()?;
    check_browser_mbps(m.mbps).ok().map(|_| m)
}

/// Stores (or with `None` forgets) the browser figure; the SFU's [`Sizer`] takes it within
/// [`POLL`].
pub fn write_browser(data: &DataDir, m: Option<&Measurement>) -> Result<()> {
    let path = browser_path(data);
    match m {
        Some(m) => {
            check_browser_mbps(m.mbps).map_err(anyhow::Error::msg)?;
            let text = serde_json::to_vec_pretty(m)?;
            crate::storage::write_atomic(&path, &text, 0o644)
                .with_context(|| format!("writing {}", path.display()))
        }
        None => match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
        },
    }
}

/// Asks the running SFU to measure against its peer again (what `talkbox sizing --apply`
/// does, without waiting).
pub fn request_measurement(data: &DataDir) -> Result<()> {
    let path = request_path(data);
    std::fs::write(&path, b"").with_context(|| format!("writing {}", path.display()))
}

/// The state the SFU last wrote, if any.
pub fn read_state(data: &DataDir) -> Option<Capacity> {
    let text = std::fs::read(state_path(data)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Measures against the configured peer, if there is one.
pub async fn measure_peer(config: &Config) -> (Option<Measurement>, Option<String>) {
    let Some(peer) = &config.sizing.peer else {
        return (None, None);
    };
    match probe::measure(peer, Duration::from_secs(config.sizing.measure_seconds)).await {
        Ok(r) => match r.mbps() {
            Some(mbps) => (
                Some(Measurement {
                    peer: peer.clone(),
                    mbps,
                    at: unix_now(),
                }),
                None,
            ),
            None => (
                None,
                Some(format!("{peer}: too little data arrived to measure")),
            ),
        },
        Err(e) => (None, Some(format!("{e:#}"))),
    }
}

/// The SFU's sizing loop: keeps `tx` and `DATA/sizing/state.json` current until `shutdown`.
pub struct Sizer {
    config: Config,
    data: DataDir,
    sys: PathBuf,
    route: PathBuf,
}

impl Sizer {
    pub fn new(config: Config, data: DataDir) -> Self {
        Self {
            config,
            data,
            sys: PathBuf::from("/sys/class/net"),
            route: PathBuf::from("/proc/net/route"),
        }
    }

    /// Creates the sizing directory for the service user (while the service may still be
    /// root), so that the SFU can write its state after dropping privileges.
    pub fn prepare(config: &Config, data: &DataDir) -> Result<()> {
        crate::storage::hand_over_dir(&dir(data), 0o755, &config.supervisor.user)
    }

    pub async fn run(
        self,
        tx: watch::Sender<Option<Capacity>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let remeasure = Duration::from_secs(self.config.sizing.remeasure_minutes * 60);
        let mut measured = None;
        let mut error = None;
        let mut last_measure: Option<tokio::time::Instant> = None;
        let mut last: Option<Capacity> = None;
        loop {
            let requested = std::fs::remove_file(request_path(&self.data)).is_ok();
            let due = match last_measure {
                None => true,
                Some(at) => requested || (!remeasure.is_zero() && at.elapsed() >= remeasure),
            };
            if due && self.config.sizing.peer.is_some() {
                let (m, e) = measure_peer(&self.config).await;
                if let Some(e) = &e {
                    tracing::warn!(error = %e, "sizing measurement failed; the other figures still count");
                }
                // A failed repetition keeps the last good figure.
                if m.is_some() {
                    measured = m;
                }
                error = e;
                last_measure = Some(tokio::time::Instant::now());
            } else if due {
                last_measure = Some(tokio::time::Instant::now());
            }
            let links = nic::links(&self.sys, &self.route);
            let browser = read_browser(&self.data);
            let mut cap = compute(
                links,
                &self.config,
                measured.clone(),
                error.clone(),
                browser,
            );
            let changed = last.as_ref().is_none_or(|l| {
                let mut l = l.clone();
                l.computed_at = cap.computed_at;
                l != cap
            });
            if changed || requested {
                tracing::info!(
                    capacity_mbps = ?cap.capacity_mbps,
                    budget_bps = ?cap.budget_bps,
                    link_mbps = ?cap.link_mbps,
                    measured_mbps = ?cap.measured.as_ref().map(|m| m.mbps),
                    browser_mbps = ?cap.browser.as_ref().map(|m| m.mbps),
                    "sizing limits in force"
                );
                cap.computed_at = unix_now();
                if let Err(e) = write_state(&self.data, &cap) {
                    tracing::warn!(error = %format!("{e:#}"), "writing the sizing state");
                }
                tx.send_replace(Some(cap.clone()));
                last = Some(cap);
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

fn write_state(data: &DataDir, cap: &Capacity) -> Result<()> {
    let text = serde_json::to_vec_pretty(cap)?;
    crate::storage::write_atomic(&state_path(data), &text, 0o644)
        .with_context(|| format!("writing {}", state_path(data).display()))
}

/// Human-readable summary (the CLI's output).
pub fn describe(cap: &Capacity) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let mbps = |v: Option<f64>| v.map_or("unknown".to_string(), |v| format!("{v:.1} Mbit/s"));
    let _ = writeln!(s, "links:");
    for l in &cap.links {
        let _ = writeln!(
            s,
            "  {:<12} {:>14} {}{}",
            l.name,
            l.speed_mbps
                .map_or("no speed".to_string(), |v| format!("{v} Mbit/s")),
            if l.up { "up" } else { "down" },
            if l.default_route {
                ", default route"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(
        s,
        "link speed (limiting): {}",
        mbps(cap.link_mbps.map(|v| v as f64))
    );
    let _ = writeln!(
        s,
        "declared uplink:       {}",
        cap.declared_uplink_mbps
            .map_or("not declared".into(), |v| format!("{v} Mbit/s"))
    );
    match (&cap.measured, &cap.measure_error) {
        (Some(m), _) => {
            let _ = writeln!(
                s,
                "measured:              {:.1} Mbit/s against {}",
                m.mbps, m.peer
            );
        }
        (None, Some(e)) => {
            let _ = writeln!(s, "measured:              failed: {e}");
        }
        (None, None) => {
            let _ = writeln!(s, "measured:              no peer configured (sizing.peer)");
        }
    }
    if let Some(b) = &cap.browser {
        let _ = writeln!(
            s,
            "measured by a browser: {:.1} Mbit/s ({}, taken on the setup page)",
            b.mbps, b.peer
        );
    }
    let _ = writeln!(s, "capacity:              {}", mbps(cap.capacity_mbps));
    let _ = writeln!(
        s,
        "egress budget:         {} ({:.0} % of capacity)",
        mbps(cap.budget_bps.map(|b| b as f64 / 1e6)),
        cap.egress_fraction * 100.0
    );
    if let Some(t) = cap.table {
        let _ = writeln!(
            s,
            "one room at these limits (camera {:.2} Mbit/s, screen {:.2} Mbit/s, audio {} kbit/s):",
            cap.camera_bps as f64 / 1e6,
            cap.screen_bps as f64 / 1e6,
            AUDIO_BPS / 1000
        );
        let _ = writeln!(s, "  participants with video:          {}", t.video);
        let _ = writeln!(
            s,
            "  participants with video + 1 screen: {}",
            t.video_and_screen
        );
        let _ = writeln!(s, "  participants audio only:           {}", t.audio_only);
    }
    s
}

/// `talkbox sizing --apply`: ask the running SFU to measure again and wait for its new state.
pub fn request_and_wait(data: &DataDir, timeout: Duration) -> Result<Capacity> {
    let dir = dir(data);
    if !dir.is_dir() {
        anyhow::bail!(
            "{} does not exist: is the box running (`talkbox run`) with this data directory?",
            dir.display()
        );
    }
    let before = read_state(data).map(|c| c.computed_at);
    let asked = unix_now();
    request_measurement(data)?;
    let until = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < until {
        if let Some(c) = read_state(data)
            && Some(c.computed_at) != before
            && c.computed_at >= asked
        {
            return Ok(c);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    anyhow::bail!(
        "the SFU did not answer the measurement request within {} s (is the sfu service running?)",
        timeout.as_secs()
    )
}

/// Reads links now (for the CLI without a running box).
pub fn links_now() -> Vec<nic::Link> {
    nic::links(Path::new("/sys/class/net"), Path::new("/proc/net/route"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_follows_the_formulas_of_the_design() {
        // 100 Mbit/s budget, 1 Mbit/s cameras: n(n−1) ≤ 100 → n = 10 (90), 11 needs 110.
        let t = table(100_000_000, 1_000_000, 2_000_000);
        assert_eq!(t.video, 10);
        // + one 2 Mbit/s screen to n−1: 10 needs 90 + 18 = 108 > 100; 9 needs 72 + 16 = 88.
        assert_eq!(t.video_and_screen, 9);
        // 50 kbit/s audio: n(n−1) ≤ 2000 → 45 (1980).
        assert_eq!(t.audio_only, 45);
        // Nothing fits: zero participants, not one.
        assert_eq!(table(500_000, 1_000_000, 2_000_000).video, 0);
    }

    #[test]
    fn the_lowest_figure_wins() {
        let mut config = Config::default();
        let link = |speed| nic::Link {
            name: "eth0".into(),
            speed_mbps: Some(speed),
            up: true,
            default_route: true,
        };
        let c = compute(vec![link(1000)], &config, None, None, None);
        assert_eq!(c.capacity_mbps, Some(1000.0));
        assert_eq!(c.budget_bps, Some(800_000_000));
        config.sizing.uplink_mbps = 200;
        let m = Measurement {
            peer: "x".into(),
            mbps: 95.5,
            at: 0,
        };
        let c = compute(vec![link(1000)], &config, Some(m.clone()), None, None);
        assert_eq!(c.capacity_mbps, Some(95.5));
        assert_eq!(c.budget_bps, Some(76_400_000));
        // A browser figure below the others wins too; above them it changes nothing.
        let browser = |mbps| Measurement {
            peer: "the admin's browser at 192.0.2.7".into(),
            mbps,
            at: 0,
        };
        let c = compute(
            vec![link(1000)],
            &config,
            Some(m.clone()),
            None,
            Some(browser(42.0)),
        );
        assert_eq!(c.capacity_mbps, Some(42.0));
        let c = compute(
            vec![link(1000)],
            &config,
            Some(m),
            None,
            Some(browser(500.0)),
        );
        assert_eq!(c.capacity_mbps, Some(95.5));
        let c = compute(vec![], &Config::default(), None, None, None);
        assert_eq!((c.capacity_mbps, c.budget_bps, c.table), (None, None, None));
    }

    #[test]
    fn browser_figures_are_checked_and_a_damaged_file_sets_no_limit() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = DataDir::new(tmp.path());
        std::fs::create_dir_all(dir(&data)).expect("mkdir");
        assert_eq!(read_browser(&data), None);
        for bad in [f64::NAN, f64::INFINITY, -5.0, 0.0, 0.05, 1e9] {
            let m = Measurement {
                peer: "b".into(),
                mbps: bad,
                at: 1,
            };
            let e = write_browser(&data, Some(&m)).expect_err("refused");
            assert!(e.to_string().contains("allowed are"), "{e}");
            assert!(!browser_path(&data).exists());
        }
        let m = Measurement {
            peer: "the admin's browser at 192.0.2.7".into(),
            mbps: 87.5,
            at: 1_795_000_000,
        };
        write_browser(&data, Some(&m)).expect("stored");
        assert_eq!(read_browser(&data), Some(m));
        // Hand-edited or damaged: ignored, never a limit of 0 or a panic.
        for text in [
            &b"{\"peer\":\"x\",\"mbps\":-1,\"at\":0}"[..],
            b"not json",
            &[b' '; 5000],
        ] {
            std::fs::write(browser_path(&data), text).expect("write");
            assert_eq!(read_browser(&data), None);
        }
        write_browser(&data, None).expect("forgotten");
        write_browser(&data, None).expect("forgetting twice is fine");
        assert!(!browser_path(&data).exists());
    }
}
