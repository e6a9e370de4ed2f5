//! The TURN service's counters, in Prometheus text exposition.
//!
//! [`Metrics`] is cheap to clone (every metric is shared); the sans-I/O core counts allocations,
//! relayed traffic and refusals, and [`Metrics::render`] gives the text that `/metrics` serves.
//! Label values are fixed words (never usernames or addresses), so a client cannot grow the
//! label space.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;

type Labels = Vec<(&'static str, &'static str)>;

/// Direction of relayed traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From a client, through its allocation, to a peer.
    ToPeer,
    /// From a peer, through an allocation, to its client.
    ToClient,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::ToPeer => "to_peer",
            Direction::ToClient => "to_client",
        }
    }
}

/// All TURN metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    allocations: Gauge,
    allocations_created: Counter,
    relayed_bytes: Family<Labels, Counter>,
    relayed_packets: Family<Labels, Counter>,
    dropped_packets: Family<Labels, Counter>,
    refusals: Family<Labels, Counter>,
    tcp_connections: Gauge,
    /// The relayed_bytes / relayed_packets children of each direction, taken from their
    /// families once: counting a relayed packet is then two atomic adds, where a lookup per
    /// packet cost a label vector allocation, a lock and a hash (visible in the TURN profile).
    relayed_to_peer: (Counter, Counter),
    relayed_to_client: (Counter, Counter),
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("allocations", &self.allocations.get())
            .finish()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("talkbox_turn");
        let m = Metrics {
            registry: Arc::new(Registry::default()),
            allocations: Gauge::default(),
            allocations_created: Counter::default(),
            relayed_bytes: Family::default(),
            relayed_packets: Family::default(),
            dropped_packets: Family::default(),
            refusals: Family::default(),
            tcp_connections: Gauge::default(),
            relayed_to_peer: Default::default(),
            relayed_to_client: Default::default(),
        };
        r.register("allocations", "Allocations held now", m.allocations.clone());
        r.register(
            "allocations_created",
            "Allocations created",
            m.allocations_created.clone(),
        );
        r.register(
            "relayed_bytes",
            "Payload bytes relayed, by direction",
            m.relayed_bytes.clone(),
        );
        r.register(
            "relayed_packets",
            "Packets relayed, by direction",
            m.relayed_packets.clone(),
        );
        r.register(
            "dropped_packets",
            "Relay packets dropped, by reason (bandwidth cap, no route)",
            m.dropped_packets.clone(),
        );
        r.register(
            "refusals",
            "Requests refused, by reason (auth, stale nonce, peer policy, quota, malformed)",
            m.refusals.clone(),
        );
        r.register(
            "tcp_connections",
            "Open TURN connections over TCP and TLS",
            m.tcp_connections.clone(),
        );
        // Counter clones share one atomic with the family's child.
        let children = |dir: Direction| {
            let l = vec![("direction", dir.as_str())];
            (
                m.relayed_bytes.get_or_create(&l).clone(),
                m.relayed_packets.get_or_create(&l).clone(),
            )
        };
        Metrics {
            registry: Arc::new(r),
            relayed_to_peer: children(Direction::ToPeer),
            relayed_to_client: children(Direction::ToClient),
            ..m
        }
    }

    pub fn allocation_created(&self) {
        self.allocations.inc();
        self.allocations_created.inc();
    }

    pub fn allocation_removed(&self) {
        self.allocations.dec();
    }

    pub fn relayed(&self, dir: Direction, bytes: usize) {
        let (b, p) = match dir {
            Direction::ToPeer => &self.relayed_to_peer,
            Direction::ToClient => &self.relayed_to_client,
        };
        b.inc_by(bytes as u64);
        p.inc();
    }

    pub fn dropped(&self, reason: &'static str) {
        self.dropped_packets
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    pub fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&vec![("reason", reason)]).inc();
    }

    pub fn tcp_connection_opened(&self) {
        self.tcp_connections.inc();
    }

    pub fn tcp_connection_closed(&self) {
        self.tcp_connections.dec();
    }

    /// Allocations held now.
    pub fn allocations(&self) -> i64 {
        self.allocations.get()
    }

    /// Count of refusals for one reason.
    pub fn refusals(&self, reason: &'static str) -> u64 {
        self.refusals.get_or_create(&vec![("reason", reason)]).get()
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_shows_counts_by_label() {
        let m = Metrics::new();
        m.allocation_created();
        m.relayed(Direction::ToPeer, 100);
        m.relayed(Direction::ToPeer, 50);
        m.refused("peer_loopback");
        let t = m.render();
        assert!(t.contains("talkbox_turn_allocations 1"), "{t}");
        assert!(
            t.contains("talkbox_turn_relayed_bytes_total{direction=\"to_peer\"} 150"),
            "{t}"
        );
        assert!(
            t.contains("talkbox_turn_relayed_packets_total{direction=\"to_peer\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("talkbox_turn_refusals_total{reason=\"peer_loopback\"} 1"),
            "{t}"
        );
        assert_eq!(m.refusals("peer_loopback"), 1);
    }
}
