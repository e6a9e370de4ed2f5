//! One WebRTC peer connection of the SFU: a str0m `Rtc` in RTP mode with ICE-lite, in the role
//! of a publisher (receives one client's stream) or a subscriber (sends one publisher's
//! stream to one client).
//!
//! This module owns SDP handling for the roles (publisher answers, subscriber offers), the
//! candidate and size checks, and the per-subscriber forwarding state. It does not own sockets,
//! clocks or the map of sessions: the worker feeds it datagrams and time and reads its output.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use str0m::bwe::Bitrate;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::config::{CryptoProvider, DtlsCert};
use str0m::format::PayloadParams;
use str0m::media::{Direction, MediaKind, Mid, Pt};
use str0m::net::TcpType;
use str0m::{Candidate, IceCreds, Rtc, RtcConfig};

use crate::demux::SessionKey;
use crate::forward::SeqTsRewriter;
use crate::layers::{Bps, LayerSwitch, Vp8Rewriter};
use crate::temporal::TemporalFilter;

/// Largest SDP accepted from a client; real ones are a few KiB.
pub const MAX_SDP_BYTES: usize = 64 * 1024;
/// Largest ICE candidate line accepted.
pub const MAX_CANDIDATE_BYTES: usize = 1024;

/// The kind of stream a publisher sends, as Talk names it (`roomType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamType {
    Audio,
    Video,
    Screen,
}

impl StreamType {
    pub fn parse(s: &str) -> Option<StreamType> {
        match s {
            "audio" => Some(StreamType::Audio),
            "video" => Some(StreamType::Video),
            "screen" => Some(StreamType::Screen),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            StreamType::Audio => "audio",
            StreamType::Video => "video",
            StreamType::Screen => "screen",
        }
    }
}

/// Why a session operation failed; the text is safe to show to the signaling server.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("the SDP is larger than {MAX_SDP_BYTES} bytes")]
    SdpTooLarge,
    #[error("the SDP could not be parsed: {0}")]
    BadSdp(String),
    #[error("the SDP was refused: {0}")]
    Refused(String),
    #[error("the candidate could not be parsed")]
    BadCandidate,
    #[error("this operation is for a {0}")]
    WrongRole(&'static str),
    #[error("no offer is pending for this subscriber")]
    NoPendingOffer,
    #[error("the publisher has no media yet")]
    PublisherHasNoMedia,
}

/// A publisher's incoming media line.
#[derive(Debug, Clone, Copy)]
pub struct PublishedTrack {
    pub mid: Mid,
    pub kind: MediaKind,
}

/// One outgoing media line of a subscriber and how it maps the publisher's line onto it.
#[derive(Debug)]
pub struct SubscribedTrack {
    pub source_mid: Mid,
    pub mid: Mid,
    pub kind: MediaKind,
    pub rewriter: SeqTsRewriter,
    /// Publisher payload type → subscriber payload type for the same codec.
    pub pt_map: HashMap<Pt, Option<Pt>>,
    /// Simulcast: the layer forwarded and the one to switch to (video only).
    pub switch: LayerSwitch,
    /// VP8 picture numbering kept continuous across layer switches.
    pub vp8: Vp8Rewriter,
    /// VP8 temporal layers forwarded (video only; all without a plan or bound).
    pub temporal: TemporalFilter,
    /// The temporal step the allocator planned (`None`: all), before the client's bound.
    pub planned_tid: Option<u8>,
}

/// Role-specific state.
#[derive(Debug)]
pub enum Role {
    Publisher {
        stream_type: StreamType,
        tracks: Vec<PublishedTrack>,
        /// The client's data channel (id, label) once open.
        channel: Option<(ChannelId, String)>,
    },
    Subscriber {
        publisher: u32,
        tracks: Vec<SubscribedTrack>,
        pending: Option<(SdpPendingOffer, String)>,
        channel: Option<ChannelId>,
        channel_open: bool,
        /// Send-side bandwidth estimate towards the client (TWCC, else REMB), once known.
        estimate: Option<Bps>,
        /// A TWCC estimate arrived: REMB reports are ignored from then on.
        twcc: bool,
        /// Last (minimum, desired) rates given to str0m's BWE.
        bwe_asked: (Bps, Bps),
        /// The client's `selectStream` bound: never a higher video layer than this.
        max_layer: Option<usize>,
        /// The client's `selectStream` temporal bound: never a higher VP8 TID than this.
        max_temporal: Option<u8>,
        /// Since when the estimate has kept a video below the lowest layer's full rate.
        slow_since: Option<Instant>,
        /// When to ask the BWE for another probe towards the desired rate.
        probe: crate::layers::ProbeRenewal,
        /// When the estimate last fell by more than a tenth below the one last planned with.
        fell_at: Option<Instant>,
        /// The estimate the last plan was made with.
        planned_with: Option<Bps>,
        /// What the last plan sends (bit/s).
        sending: Bps,
        /// Heavy loss on the video sent to the client, read from its NACKs and reports; its
        /// cap is planned with for `worker::LOSS_HOLD`, until str0m's estimate has caught up.
        loss: Box<crate::loss::LossDetector<Mid>>,
    },
}

/// What every session of a worker shares: addresses to announce and the DTLS certificate.
#[derive(Clone)]
pub struct SessionSetup {
    pub candidates: Vec<SocketAddr>,
    pub dtls_cert: DtlsCert,
    pub crypto: Arc<CryptoProvider>,
    /// Also announce passive ICE-TCP candidates on the same addresses.
    pub tcp: bool,
}

impl SessionSetup {
    /// Uses the aws-lc-rs provider and one fresh DTLS certificate for every session (making a
    /// certificate per session would cost a key generation per join).
    pub fn new(candidates: Vec<SocketAddr>) -> Option<SessionSetup> {
        let crypto = str0m::crypto::from_feature_flags();
        let dtls_cert = crypto.dtls_provider.generate_certificate()?;
        Some(SessionSetup {
            candidates,
            dtls_cert,
            crypto: Arc::new(crypto),
            tcp: false,
        })
    }
}

/// One peer connection.
pub struct Session {
    pub key: SessionKey,
    pub ufrag: String,
    pub rtc: Rtc,
    pub role: Role,
    pub created: Instant,
    pub last_rx: Instant,
    pub connected: bool,
    /// The time str0m asked to be woken at.
    pub next_timeout: Option<Instant>,
    /// A publisher before its first offer: what rebuilding its `Rtc` takes, for an offer
    /// that prefers H264 (str0m answers in its own codec order, so VP8 would win).
    rebuild: Option<Box<Rebuild>>,
}

/// What [`rtc_for`] needs again when a publisher's first offer asks for another codec order.
struct Rebuild {
    pass: String,
    setup: SessionSetup,
    created: Instant,
}

/// Whether an offer's first video section lists H264 first (a client's codec preference, e.g.
/// `setCodecPreferences`; RFC 3264: the first payload type is the preferred one).
pub fn offer_prefers_h264(sdp: &str) -> bool {
    let Some(first_pt) = sdp
        .lines()
        .find(|l| l.starts_with("m=video"))
        .and_then(|l| l.split_whitespace().nth(3))
    else {
        return false;
    };
    let prefix = format!("a=rtpmap:{first_pt} ");
    sdp.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .is_some_and(|codec| codec.trim().to_ascii_uppercase().starts_with("H264/"))
}

/// Where a subscriber's bandwidth estimate starts: enough for a middle layer and audio, so the
/// first picture comes quickly; probing raises it from there.
pub const INITIAL_ESTIMATE_KBPS: u64 = 500;

/// How often str0m reports a subscriber's egress counters (NACKs, receiver reports).
pub const STATS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

fn rtc_for(
    ufrag: &str,
    pass: &str,
    setup: &SessionSetup,
    now: Instant,
    bwe: bool,
    h264_first: bool,
) -> Rtc {
    let config = RtcConfig::new()
        .set_rtp_mode(true)
        .set_ice_lite(true)
        .set_local_ice_credentials(IceCreds {
            ufrag: ufrag.to_string(),
            pass: pass.to_string(),
        })
        .set_dtls_cert(setup.dtls_cert.clone())
        .set_crypto_provider(setup.crypto.clone())
        .clear_codecs()
        .enable_opus(true, false);
    // The answer lists codecs in this order and the client sends the first: VP8 unless the
    // publisher asked for H264 first.
    let config = if h264_first {
        config.enable_h264(true).enable_vp8(true)
    } else {
        config.enable_vp8(true).enable_h264(true)
    };
    let mut rtc = config
        .enable_bwe(bwe.then(|| Bitrate::kbps(INITIAL_ESTIMATE_KBPS)))
        // Egress stats feed the loss detector of subscribers (loss.rs): often enough to
        // react within a few hundred milliseconds of a drop.
        .set_stats_interval(bwe.then_some(STATS_INTERVAL))
        .build(now);
    for addr in &setup.candidates {
        if let Ok(c) = Candidate::host(*addr, "udp") {
            rtc.add_local_candidate(c);
        }
        if setup.tcp
            && let Ok(c) = Candidate::builder()
                .tcp()
                .host(*addr)
                .tcptype(TcpType::Passive)
                .build()
        {
            rtc.add_local_candidate(c);
        }
    }
    rtc
}

impl Session {
    pub fn new_publisher(
        key: SessionKey,
        ufrag: String,
        pass: &str,
        stream_type: StreamType,
        setup: &SessionSetup,
        now: Instant,
    ) -> Session {
        Session {
            key,
            rtc: rtc_for(&ufrag, pass, setup, now, false, false),
            ufrag,
            role: Role::Publisher {
                stream_type,
                tracks: Vec::new(),
                channel: None,
            },
            created: now,
            last_rx: now,
            connected: false,
            next_timeout: None,
            rebuild: Some(Box::new(Rebuild {
                pass: pass.to_string(),
                setup: setup.clone(),
                created: now,
            })),
        }
    }

    pub fn new_subscriber(
        key: SessionKey,
        ufrag: String,
        pass: &str,
        publisher: u32,
        setup: &SessionSetup,
        now: Instant,
    ) -> Session {
        Session {
            key,
            rtc: rtc_for(&ufrag, pass, setup, now, true, false),
            ufrag,
            role: Role::Subscriber {
                publisher,
                tracks: Vec::new(),
                pending: None,
                channel: None,
                channel_open: false,
                estimate: None,
                twcc: false,
                bwe_asked: (0, 0),
                max_layer: None,
                max_temporal: None,
                slow_since: None,
                probe: Default::default(),
                fell_at: None,
                planned_with: None,
                sending: 0,
                loss: Default::default(),
            },
            created: now,
            last_rx: now,
            connected: false,
            next_timeout: None,
            rebuild: None,
        }
    }

    pub fn is_publisher(&self) -> bool {
        matches!(self.role, Role::Publisher { .. })
    }

    /// Publisher: takes the client's offer and returns our answer.
    pub fn accept_offer(&mut self, sdp: &str) -> Result<String, SessionError> {
        if !self.is_publisher() {
            return Err(SessionError::WrongRole("publisher"));
        }
        if sdp.len() > MAX_SDP_BYTES {
            return Err(SessionError::SdpTooLarge);
        }
        let offer =
            SdpOffer::from_sdp_string(sdp).map_err(|e| SessionError::BadSdp(e.to_string()))?;
        // Only the first offer may change the codec order: later ones renegotiate what is
        // already agreed.
        if let Some(r) = self.rebuild.take()
            && offer_prefers_h264(sdp)
        {
            self.rtc = rtc_for(&self.ufrag, &r.pass, &r.setup, r.created, false, true);
        }
        let mids: Vec<Mid> = offer.media_lines.iter().map(|m| m.mid()).collect();
        let answer = self
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| SessionError::Refused(e.to_string()))?;
        // Learn the tracks now rather than from `MediaAdded` events, so subscribers can be
        // offered the publisher's media before its client has connected.
        let found: Vec<PublishedTrack> = mids
            .into_iter()
            .filter_map(|mid| {
                self.rtc.media(mid).map(|m| PublishedTrack {
                    mid,
                    kind: m.kind(),
                })
            })
            .collect();
        if let Role::Publisher { tracks, .. } = &mut self.role {
            for t in found {
                if !tracks.iter().any(|x| x.mid == t.mid) {
                    tracks.push(t);
                }
            }
        }
        Ok(answer.to_sdp_string())
    }

    /// Subscriber: makes (or repeats, while unanswered) the offer carrying `source`'s tracks
    /// and a data channel labelled `label`.
    pub fn create_offer(
        &mut self,
        source: &[PublishedTrack],
        label: &str,
        mut start: impl FnMut() -> (u16, u32),
    ) -> Result<String, SessionError> {
        let Role::Subscriber {
            tracks,
            pending,
            channel,
            ..
        } = &mut self.role
        else {
            return Err(SessionError::WrongRole("subscriber"));
        };
        if let Some((_, text)) = pending {
            return Ok(text.clone());
        }
        if source.is_empty() {
            return Err(SessionError::PublisherHasNoMedia);
        }
        let mut api = self.rtc.sdp_api();
        for t in source {
            if tracks.iter().any(|s| s.source_mid == t.mid) {
                continue;
            }
            let mid = api.add_media(t.kind, Direction::SendOnly, None, None, None);
            let (seq, ts) = start();
            tracks.push(SubscribedTrack {
                source_mid: t.mid,
                mid,
                kind: t.kind,
                rewriter: SeqTsRewriter::new(seq, ts),
                pt_map: HashMap::new(),
                switch: LayerSwitch::default(),
                vp8: Vp8Rewriter::default(),
                temporal: TemporalFilter::default(),
                planned_tid: None,
            });
        }
        if channel.is_none() {
            *channel = Some(api.add_channel(label.to_string()));
        }
        match api.apply() {
            Some((offer, p)) => {
                let text = offer.to_sdp_string();
                *pending = Some((p, text.clone()));
                Ok(text)
            }
            // Nothing new to negotiate: the client already has every track.
            None => Err(SessionError::Refused("nothing to negotiate".into())),
        }
    }

    /// Subscriber: takes the client's answer to our offer.
    pub fn accept_answer(&mut self, sdp: &str) -> Result<(), SessionError> {
        let Role::Subscriber { pending, .. } = &mut self.role else {
            return Err(SessionError::WrongRole("subscriber"));
        };
        if sdp.len() > MAX_SDP_BYTES {
            return Err(SessionError::SdpTooLarge);
        }
        let answer =
            SdpAnswer::from_sdp_string(sdp).map_err(|e| SessionError::BadSdp(e.to_string()))?;
        let Some((p, _)) = pending.take() else {
            return Err(SessionError::NoPendingOffer);
        };
        self.rtc
            .sdp_api()
            .accept_answer(p, answer)
            .map_err(|e| SessionError::Refused(e.to_string()))
    }

    /// Adds a trickled remote candidate (`candidate:…` line, with or without the prefix).
    pub fn add_remote_candidate(&mut self, line: &str) -> Result<(), SessionError> {
        if line.len() > MAX_CANDIDATE_BYTES {
            return Err(SessionError::BadCandidate);
        }
        let line = line.trim().trim_start_matches("a=");
        let c = Candidate::from_sdp_string(line).map_err(|_| SessionError::BadCandidate)?;
        self.rtc.add_remote_candidate(c);
        Ok(())
    }

    /// The codec behind a payload type this session negotiated.
    pub fn params_of(&self, pt: Pt) -> Option<PayloadParams> {
        self.rtc
            .codec_config()
            .params()
            .iter()
            .find(|p| p.pt() == pt)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_video_payload_type_names_the_preferred_codec() {
        let offer = |pts: &str| {
            format!(
                "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n\
                 m=video 9 UDP/TLS/RTP/SAVPF {pts}\r\na=rtpmap:96 VP8/90000\r\n\
                 a=rtpmap:102 H264/90000\r\na=rtpmap:97 rtx/90000\r\n"
            )
        };
        assert!(offer_prefers_h264(&offer("102 96 97")));
        assert!(!offer_prefers_h264(&offer("96 102 97")));
        // No video, or a payload type without rtpmap: no preference.
        assert!(!offer_prefers_h264(
            "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
        ));
        assert!(!offer_prefers_h264(&offer("120 96")));
        // Lower case as some clients write it.
        assert!(offer_prefers_h264(
            "v=0\nm=video 9 UDP/TLS/RTP/SAVPF 126\na=rtpmap:126 h264/90000\n"
        ));
    }
}
