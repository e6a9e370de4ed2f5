//! The SFU's Prometheus `/metrics` on `sfu.listen`: the media workers' counters and gauges,
//! labelled `worker="N"`, and the control plane's own figures.
//!
//! Nothing is counted here: the workers keep their counters (`WorkerStats`) on their own
//! threads, and a scrape asks each for a snapshot (`WorkerCommand::Stats`) and renders it, so
//! the media path pays nothing for metrics between scrapes. A worker that does not answer is
//! shown as `talkbox_sfu_worker_up{worker="N"} 0` with no other series, rather than as zeros
//! that would look like a counter reset. Only the addresses in `sfu.metrics_allowed_ips`
//! (default loopback) may read it, by the same rule as signaling's `stats_allowed_ips`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use media_core::worker::WorkerStats;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use super::server::Sfu;

/// What signaling's `/metrics` answers with as well.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    worker: String,
    role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    worker: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// What the control plane knows besides the workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ControlFigures {
    /// Publishers plus subscribers held (the `load` of `update-load`).
    pub load: u64,
    /// Proxy sessions of signaling servers, with and without a connection.
    pub proxy_attached: u64,
    pub proxy_detached: u64,
}

fn gauge(v: u64) -> Gauge {
    let g = Gauge::<i64>::default();
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
    g
}

/// The text exposition of one scrape: `workers[n]` is worker n's snapshot, `None` when it did
/// not answer.
pub fn render(workers: &[Option<WorkerStats>], control: ControlFigures) -> String {
    let mut r = Registry::with_prefix("talkbox_sfu");
    let up = Family::<WorkerLabels, Gauge>::default();
    let sessions = Family::<RoleLabels, Gauge>::default();
    let paused = Family::<WorkerLabels, Gauge>::default();
    let budget = Family::<WorkerLabels, Gauge>::default();
    let received = Family::<WorkerLabels, Counter>::default();
    let sent = Family::<WorkerLabels, Counter>::default();
    let dropped = Family::<ReasonLabels, Counter>::default();
    let rtp = Family::<WorkerLabels, Counter>::default();
    let messages = Family::<WorkerLabels, Counter>::default();
    let panics = Family::<WorkerLabels, Counter>::default();
    let switches = Family::<WorkerLabels, Counter>::default();
    let temporal = Family::<WorkerLabels, Counter>::default();
    for (i, w) in workers.iter().enumerate() {
        let worker = i.to_string();
        let l = WorkerLabels {
            worker: worker.clone(),
        };
        up.get_or_create(&l).set(i64::from(w.is_some()));
        let Some(s) = w else {
            continue;
        };
        for (role, n) in [("publisher", s.publishers), ("subscriber", s.subscribers)] {
            sessions
                .get_or_create(&RoleLabels {
                    worker: worker.clone(),
                    role,
                })
                .set(n as i64);
        }
        paused.get_or_create(&l).set(s.paused_layers as i64);
        // No series while no budget is known: the allocator then follows estimates only.
        if s.egress_budget != u64::MAX {
            budget
                .get_or_create(&l)
                .set(i64::try_from(s.egress_budget).unwrap_or(i64::MAX));
        }
        received.get_or_create(&l).inc_by(s.datagrams_in);
        sent.get_or_create(&l).inc_by(s.datagrams_out);
        for (reason, n) in [
            ("unknown_sender", s.dropped_unknown),
            ("send_failed", s.dropped_send),
        ] {
            dropped
                .get_or_create(&ReasonLabels {
                    worker: worker.clone(),
                    reason,
                })
                .inc_by(n);
        }
        rtp.get_or_create(&l).inc_by(s.rtp_forwarded);
        messages
            .get_or_create(&l)
            .inc_by(s.channel_messages_forwarded);
        panics.get_or_create(&l).inc_by(s.session_panics);
        switches.get_or_create(&l).inc_by(s.layer_switches);
        temporal.get_or_create(&l).inc_by(s.temporal_dropped);
    }
    r.register(
        "worker_up",
        "1 if the media worker answered this scrape, 0 if it did not (its other series are then left out)",
        up,
    );
    r.register(
        "sessions",
        "Media sessions on the worker now, by role (publisher, subscriber)",
        sessions,
    );
    r.register(
        "paused_layers",
        "Simulcast layers paused now at the worker's publishers (held off by REMB because no subscriber wants them), over all their video tracks",
        paused,
    );
    r.register_with_unit(
        "egress_budget",
        "Egress budget the worker's allocator plans its subscribers' layers within (its share of the sizing budget); absent while no budget is known",
        Unit::Other("bits_per_second".into()),
        budget,
    );
    r.register(
        "datagrams_received",
        "Datagrams the worker received on its media port (UDP, and ICE-TCP frames)",
        received,
    );
    r.register(
        "datagrams_sent",
        "Datagrams the worker sent (UDP, and ICE-TCP frames)",
        sent,
    );
    r.register(
        "datagrams_dropped",
        "Datagrams dropped by reason: unknown_sender (received, belonging to no session or unparsable), send_failed (the socket did not take it)",
        dropped,
    );
    r.register(
        "rtp_forwarded",
        "RTP packets forwarded to subscribers (one per subscriber a packet went to)",
        rtp,
    );
    r.register(
        "channel_messages_forwarded",
        "Data-channel messages forwarded from publishers to subscribers (one per subscriber)",
        messages,
    );
    r.register(
        "session_panics",
        "Media sessions closed because their WebRTC state machine panicked (the worker went on)",
        panics,
    );
    r.register(
        "layer_switches",
        "Simulcast layer switches done for subscribers (a subscriber's first layer included)",
        switches,
    );
    r.register(
        "temporal_dropped",
        "VP8 packets not forwarded to a subscriber because their temporal layer was above the one it gets",
        temporal,
    );
    r.register(
        "load",
        "Publishers plus subscribers the control plane holds: the load announced to signaling servers in update-load",
        gauge(control.load),
    );
    let proxy = Family::<StateLabels, Gauge>::default();
    proxy
        .get_or_create(&StateLabels { state: "attached" })
        .set(i64::try_from(control.proxy_attached).unwrap_or(i64::MAX));
    proxy
        .get_or_create(&StateLabels { state: "detached" })
        .set(i64::try_from(control.proxy_detached).unwrap_or(i64::MAX));
    r.register(
        "proxy_sessions",
        "Proxy sessions of signaling servers: attached (connected) or detached (waiting for a resume within sfu.resume_grace_s)",
        proxy,
    );
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut text, &r);
    text
}

/// `GET /metrics`: the text exposition, for `sfu.metrics_allowed_ips` only.
pub async fn handler(
    State(sfu): State<Arc<Sfu>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if !sfu.metrics_allowed(peer) {
        let body = format!(
            "403 Forbidden: {} may not read /metrics; allowed are the addresses in sfu.metrics_allowed_ips\n",
            peer.ip().to_canonical()
        );
        return (
            StatusCode::FORBIDDEN,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            body,
        )
            .into_response();
    }
    let workers = sfu.worker_stats().await;
    let text = render(&workers, sfu.control_figures());
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_labels_each_worker_and_leaves_out_a_silent_one_and_an_unknown_budget() {
        let a = WorkerStats {
            publishers: 1,
            subscribers: 2,
            rtp_forwarded: 7,
            dropped_send: 3,
            paused_layers: 2,
            egress_budget: 40_000_000,
            ..WorkerStats::default()
        };
        let b = WorkerStats {
            egress_budget: u64::MAX,
            ..WorkerStats::default()
        };
        let t = render(
            &[Some(a), None, Some(b)],
            ControlFigures {
                load: 3,
                proxy_attached: 1,
                proxy_detached: 0,
            },
        );
        for line in [
            "talkbox_sfu_worker_up{worker=\"0\"} 1",
            "talkbox_sfu_worker_up{worker=\"1\"} 0",
            "talkbox_sfu_sessions{worker=\"0\",role=\"subscriber\"} 2",
            "talkbox_sfu_rtp_forwarded_total{worker=\"0\"} 7",
            "talkbox_sfu_rtp_forwarded_total{worker=\"2\"} 0",
            "talkbox_sfu_datagrams_dropped_total{worker=\"0\",reason=\"send_failed\"} 3",
            "talkbox_sfu_paused_layers{worker=\"0\"} 2",
            "talkbox_sfu_egress_budget_bits_per_second{worker=\"0\"} 40000000",
            "talkbox_sfu_load 3",
            "talkbox_sfu_proxy_sessions{state=\"attached\"} 1",
        ] {
            assert!(t.lines().any(|l| l == line), "{line} missing in\n{t}");
        }
        assert!(!t.contains("worker=\"1\",") && !t.contains("_total{worker=\"1\"}"));
        assert!(
            !t.contains("egress_budget_bits_per_second{worker=\"2\"}"),
            "{t}"
        );
        assert!(
            t.contains("# HELP talkbox_sfu_rtp_forwarded RTP packets"),
            "{t}"
        );
    }
}
