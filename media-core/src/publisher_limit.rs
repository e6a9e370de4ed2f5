//! Per-stream bitrate caps towards publishers (issue #5: camera 1 Mbit/s, screen 2 Mbit/s by
//! default, set by the signaling server per Nextcloud backend).
//!
//! A cap reaches the publishing browser two ways, because neither alone is enough:
//! - `b=AS` (kbit/s, RFC 4566) on every video m-section of our SDP answer: Chromium and Firefox
//!   take it as the encoder's ceiling from the start. str0m writes no bandwidth lines, so the
//!   answer text is edited here ([`add_bandwidth_lines`]). Only `b=AS`, not `b=TIAS` beside
//!   it: str0m's own parser (and so any str0m-based client) refuses a section with two `b=`
//!   lines ("Media is missing a=mid", found by `publisher_limit_and_speaker`).
//! - REMB (receiver estimated maximum bitrate) with the cap, repeated while the publisher sends
//!   ([`RembSchedule`]): Chromium's congestion controller never plans more than the last REMB,
//!   and it keeps working for clients that ignore SDP bandwidth lines. Like Janus's publisher
//!   `bitrate`, the figure is for the whole stream of the publisher; a simulcast publisher may
//!   send 1.4 x the cap in all, so that its top layer alone can come close to it
//!   ([`publisher_total`]).
//!
//! Sans-I/O: text in, text out; time is a parameter.

use std::time::{Duration, Instant};

/// How often REMB is repeated while a publisher sends. Chromium keeps a REMB bound until the
/// next one; repeating it covers a lost RTCP packet within a second.
pub const REMB_INTERVAL: Duration = Duration::from_secs(1);

/// Adds `b=AS:<kbit/s>` for `bitrate` (bit/s) to every `m=video` section of `sdp`, replacing
/// bandwidth lines already there. Per RFC 4566's order (`m= i= c= b= …`), the line goes after the section's `c=` line, or after `m=`/`i=` when it has no `c=`. Sessions
/// other than video, and `bitrate` 0 (no cap), leave the text as it was. Line ends are kept
/// (`\r\n` as SDP asks, or `\n`).
pub fn add_bandwidth_lines(sdp: &str, bitrate: u64) -> String {
    if bitrate == 0 {
        return sdp.to_string();
    }
    let eol = if sdp.contains("\r\n") { "\r\n" } else { "\n" };
    let kbps = (bitrate / 1000).max(1);
    let lines: Vec<&str> = sdp.split(eol).collect();
    let mut out: Vec<String> = Vec::with_capacity(lines.len() + 8);
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if !line.starts_with("m=video") {
            out.push(line.to_string());
            i += 1;
            continue;
        }
        // One video section: from its m= line up to the next m= line.
        let end = lines[i + 1..]
            .iter()
            .position(|l| l.starts_with("m="))
            .map_or(lines.len(), |p| i + 1 + p);
        let section: Vec<&str> = lines[i..end]
            .iter()
            .copied()
            .filter(|l| !l.starts_with("b="))
            .collect();
        // Insert after the last leading m=/i=/c= line.
        let at = section
            .iter()
            .position(|l| !(l.starts_with("m=") || l.starts_with("i=") || l.starts_with("c=")))
            .unwrap_or(section.len());
        for (k, l) in section.iter().enumerate() {
            if k == at {
                out.push(format!("b=AS:{kbps}"));
            }
            out.push((*l).to_string());
        }
        if at == section.len() {
            out.push(format!("b=AS:{kbps}"));
        }
        i = end;
    }
    out.join(eol)
}

/// The most simulcast layers one video section of an offer sends (`a=rid:<id> send`), 1 when
/// none has simulcast.
pub fn simulcast_layers(sdp: &str) -> usize {
    let mut best = 1;
    let mut in_video = false;
    let mut count = 0;
    for line in sdp.lines() {
        if line.starts_with("m=") {
            best = best.max(count);
            count = 0;
            in_video = line.starts_with("m=video");
        } else if in_video
            && let Some(rest) = line.strip_prefix("a=rid:")
            && rest.split_whitespace().nth(1) == Some("send")
        {
            count += 1;
        }
    }
    best.max(count)
}

/// What a publisher may send in all under a per-stream cap `cap` when it sends `layers`
/// simulcast layers. The cap is for one forwarded stream, i.e. one layer: the top layer may
/// come close to it, and the lower layers come on top. Chromium gives the lower layers their
/// target rates first (at 960x540, 150 + 350 kbit/s; at 1280x720, 150 + 500) and the top layer
/// the rest, so 1.4 x the cap leaves the top layer at most the cap (968 of 1048 kbit/s at
/// 960x540). With the plain cap as the total, Chromium at 960x540 kept its top layer off
/// ("bandwidth" limited, quality_shaping), and no subscriber could get it.
pub fn publisher_total(cap: u64, layers: usize) -> u64 {
    if layers > 1 {
        cap.saturating_mul(7) / 5
    } else {
        cap
    }
}

/// When to send the next REMB to one publisher.
#[derive(Debug, Clone)]
pub struct RembSchedule {
    /// The per-stream cap in bit/s.
    pub cap: u64,
    /// What the publisher may send in all (REMB and `b=AS`): the cap, raised for simulcast
    /// ([`publisher_total`]).
    pub bitrate: u64,
    last: Option<Instant>,
}

impl RembSchedule {
    pub fn new(cap: u64) -> RembSchedule {
        RembSchedule {
            cap,
            bitrate: cap,
            last: None,
        }
    }

    /// The publisher's offer sends `layers` simulcast layers (at most, per video section).
    pub fn set_layers(&mut self, layers: usize) {
        self.bitrate = publisher_total(self.cap, layers);
    }

    /// True when a REMB is due at `now` (the first at once, then every [`REMB_INTERVAL`]);
    /// the caller sends it and this counts it as sent.
    pub fn due(&mut self, now: Instant) -> bool {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < REMB_INTERVAL => false,
            _ => {
                self.last = Some(now);
                true
            }
        }
    }

    /// Forgets the last send, so the next check sends at once (a new stream appeared).
    pub fn reset(&mut self) {
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulcast_offers_raise_the_total_so_the_top_layer_can_use_the_cap() {
        let offer = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rid:x send\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=rid:q send\r\na=rid:h send\r\n\
a=rid:f send\r\na=rid:z recv\r\na=simulcast:send q;h;f\r\n";
        assert_eq!(simulcast_layers(offer), 3);
        assert_eq!(simulcast_layers("v=0\r\nm=video 9 X 96\r\na=mid:0\r\n"), 1);
        let mut r = RembSchedule::new(1_000_000);
        r.set_layers(3);
        assert_eq!(r.bitrate, 1_400_000);
        r.set_layers(1);
        assert_eq!(r.bitrate, 1_000_000);
    }

    const ANSWER: &str = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n\
        a=group:BUNDLE 0 1 2\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\n\
        m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\nb=AS:5000\r\na=mid:1\r\na=rtpmap:96 VP8/90000\r\n\
        m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\na=mid:2\r\n";

    #[test]
    fn video_sections_get_as_after_their_c_line_and_nothing_else_changes() {
        let out = add_bandwidth_lines(ANSWER, 1_048_576);
        let lines: Vec<&str> = out.split("\r\n").collect();
        let m = lines
            .iter()
            .position(|l| l.starts_with("m=video"))
            .expect("video");
        assert_eq!(lines[m + 1], "c=IN IP4 0.0.0.0");
        assert_eq!(lines[m + 2], "b=AS:1048");
        assert_eq!(lines[m + 3], "a=mid:1");
        // The old b= line is replaced, not kept beside ours.
        assert!(!out.contains("b=AS:5000"));
        assert_eq!(out.matches("b=AS:").count(), 1, "{out}");
        // Audio and data sections are untouched.
        let audio = lines
            .iter()
            .position(|l| l.starts_with("m=audio"))
            .expect("audio");
        assert_eq!(lines[audio + 2], "a=mid:0");
        assert!(out.ends_with("a=mid:2\r\n"));
        assert_eq!(
            out.len(),
            ANSWER.len() - "b=AS:5000\r\n".len() + "b=AS:1048\r\n".len()
        );
    }

    #[test]
    fn every_video_section_is_capped_and_a_section_without_c_still_gets_the_lines() {
        let sdp = "v=0\nm=video 9 RTP/AVP 96\na=mid:0\nm=video 9 RTP/AVP 97\ni=cam\na=mid:1\nm=video 9 RTP/AVP 98";
        let out = add_bandwidth_lines(sdp, 300_000);
        assert_eq!(
            out,
            "v=0\nm=video 9 RTP/AVP 96\nb=AS:300\na=mid:0\n\
             m=video 9 RTP/AVP 97\ni=cam\nb=AS:300\na=mid:1\n\
             m=video 9 RTP/AVP 98\nb=AS:300"
        );
    }

    #[test]
    fn no_cap_or_no_video_leaves_the_sdp_alone() {
        assert_eq!(add_bandwidth_lines(ANSWER, 0), ANSWER);
        let audio_only = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\n";
        assert_eq!(add_bandwidth_lines(audio_only, 500_000), audio_only);
        // Below 1 kbit/s, AS still says 1 (0 would mean "send nothing").
        assert_eq!(
            add_bandwidth_lines("m=video 9 X 96", 500),
            "m=video 9 X 96\nb=AS:1"
        );
    }

    #[test]
    fn remb_is_due_at_once_then_every_interval_and_again_after_a_reset() {
        let t0 = Instant::now();
        let mut s = RembSchedule::new(1_000_000);
        assert!(s.due(t0));
        assert!(!s.due(t0 + Duration::from_millis(999)));
        assert!(s.due(t0 + Duration::from_millis(1000)));
        assert!(!s.due(t0 + Duration::from_millis(1500)));
        s.reset();
        assert!(s.due(t0 + Duration::from_millis(1501)));
    }
}
