//! What the relay may do: which peer addresses it may reach ([`PeerPolicy`]), how many
//! allocations a user and the server may hold ([`Quotas`]), and how fast one allocation may
//! relay ([`RateLimit`]).
//!
//! Pure data and arithmetic; time is a parameter. The engine (`turn-server-proto`) has none of
//! this, so `server.rs` applies it around the engine.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use super::Instant;
use ipnet::IpNet;

/// Why a peer address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRefusal {
    Loopback,
    Private,
    LinkLocal,
    SharedCgnat,
    Multicast,
    Unspecified,
    UniqueLocal,
    Reserved,
    OwnAddress,
}

impl PeerRefusal {
    /// Label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerRefusal::Loopback => "peer_loopback",
            PeerRefusal::Private => "peer_private",
            PeerRefusal::LinkLocal => "peer_link_local",
            PeerRefusal::SharedCgnat => "peer_cgnat",
            PeerRefusal::Multicast => "peer_multicast",
            PeerRefusal::Unspecified => "peer_unspecified",
            PeerRefusal::UniqueLocal => "peer_unique_local",
            PeerRefusal::Reserved => "peer_reserved",
            PeerRefusal::OwnAddress => "peer_own_address",
        }
    }
}

/// The peer address filter: special-purpose ranges and the box's own addresses are refused
/// unless an admin-listed network contains the peer.
///
/// One exception for the box's own addresses: the ports of its own relays and of its SFU
/// (`own_ports`). Two relay-only clients of this server talk relay to relay, and the SFU on the
/// same box is the peer of every relayed participant; refusing those would break calls, while
/// every other port of the box (SSH, DNS, the TURN listener itself) stays out of reach. TURN
/// permissions are per IP, so the data path checks the port again for every datagram.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    allowed: Vec<IpNet>,
    own: Vec<IpAddr>,
    own_ports: Vec<(u16, u16)>,
}

impl PeerPolicy {
    /// `allowed` are CIDRs or single addresses (already validated by the config reader; anything
    /// unparsable is ignored, never widened). `own` are the box's addresses.
    pub fn new(allowed: &[String], own: Vec<IpAddr>, own_ports: Vec<(u16, u16)>) -> Self {
        let allowed = allowed
            .iter()
            .filter_map(|s| {
                s.parse::<IpNet>()
                    .ok()
                    .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
            })
            .collect();
        Self {
            allowed,
            own,
            own_ports,
        }
    }

    /// Ok if the relay may send to `peer`.
    pub fn check(&self, peer: SocketAddr) -> Result<(), PeerRefusal> {
        let ip = canonical(peer.ip());
        if self.allowed.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        if let Some(r) = special(ip) {
            return Err(r);
        }
        if self.own.iter().any(|a| canonical(*a) == ip)
            && !self
                .own_ports
                .iter()
                .any(|(lo, hi)| (*lo..=*hi).contains(&peer.port()))
        {
            return Err(PeerRefusal::OwnAddress);
        }
        Ok(())
    }
}

/// IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn special(ip: IpAddr) -> Option<PeerRefusal> {
    match ip {
        IpAddr::V4(a) => special_v4(a),
        IpAddr::V6(a) => special_v6(a),
    }
}

fn special_v4(a: Ipv4Addr) -> Option<PeerRefusal> {
    let o = a.octets();
    if a.is_unspecified() || o[0] == 0 {
        Some(PeerRefusal::Unspecified)
    } else if a.is_loopback() {
        Some(PeerRefusal::Loopback)
    } else if a.is_private() {
        Some(PeerRefusal::Private)
    } else if a.is_link_local() {
        Some(PeerRefusal::LinkLocal)
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some(PeerRefusal::SharedCgnat)
    } else if a.is_multicast() {
        Some(PeerRefusal::Multicast)
    } else if a.is_broadcast()
        || o[0] >= 240
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
    {
        // Reserved, IETF protocol assignments, benchmarking.
        Some(PeerRefusal::Reserved)
    } else {
        None
    }
}

fn special_v6(a: Ipv6Addr) -> Option<PeerRefusal> {
    let s = a.segments();
    if a.is_unspecified() {
        Some(PeerRefusal::Unspecified)
    } else if a.is_loopback() {
        Some(PeerRefusal::Loopback)
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some(PeerRefusal::LinkLocal)
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some(PeerRefusal::UniqueLocal)
    } else if a.is_multicast() {
        Some(PeerRefusal::Multicast)
    } else if (s[0] & 0xffc0) == 0xfec0 {
        // Deprecated site-local: as private as ULA.
        Some(PeerRefusal::UniqueLocal)
    } else if s[0] == 0x64 && s[1] == 0xff9b {
        // NAT64 prefix: judge the IPv4 address inside, so it cannot smuggle 127.0.0.1 or 10/8.
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        special_v4(v4)
    } else if s[0] == 0x2002 {
        // 6to4 embeds an IPv4 address the same way.
        let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        special_v4(v4)
    } else if s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0 {
        // IPv4-compatible (deprecated) addresses.
        Some(PeerRefusal::Reserved)
    } else {
        None
    }
}

/// Allocation quotas. Counting is done by the caller, which knows the live allocations.
#[derive(Debug, Clone, Copy)]
pub struct Quotas {
    pub per_user: u32,
    pub total: u32,
}

/// Why a new allocation is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaRefusal {
    User,
    Total,
}

impl Quotas {
    pub fn check(&self, user_allocations: u32, total_allocations: u32) -> Result<(), QuotaRefusal> {
        if total_allocations >= self.total {
            Err(QuotaRefusal::Total)
        } else if user_allocations >= self.per_user {
            Err(QuotaRefusal::User)
        } else {
            Ok(())
        }
    }
}

/// A token bucket in bytes: `rate` bytes per second, bursts up to one second's worth (at least
/// one full-size datagram).
#[derive(Debug, Clone)]
pub struct RateLimit {
    bytes_per_s: u64,
    burst: u64,
    tokens: u64,
    last: Instant,
}

impl RateLimit {
    /// `kbps` = 0 means unlimited.
    pub fn new(kbps: u64, now: Instant) -> Self {
        let bytes_per_s = kbps.saturating_mul(1000) / 8;
        let burst = bytes_per_s.max(65_536);
        Self {
            bytes_per_s,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// True if `len` bytes may pass now; they are then taken from the bucket.
    pub fn allow(&mut self, len: usize, now: Instant) -> bool {
        if self.bytes_per_s == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last);
        if elapsed > Duration::ZERO {
            let add = (elapsed
                .as_nanos()
                .saturating_mul(u128::from(self.bytes_per_s))
                / 1_000_000_000) as u64;
            if add > 0 {
                self.tokens = self.tokens.saturating_add(add).min(self.burst);
                self.last = now;
            }
        }
        let len = len as u64;
        if self.tokens >= len {
            self.tokens -= len;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn at(s: &str) -> SocketAddr {
        SocketAddr::new(ip(s), 9)
    }

    #[test]
    fn default_policy_refuses_internal_and_special_peers() {
        let p = PeerPolicy::new(&[], vec![ip("203.0.113.7")], vec![(20000, 29999)]);
        let cases = [
            ("127.0.0.1", PeerRefusal::Loopback),
            ("10.0.0.1", PeerRefusal::Private),
            ("172.16.5.4", PeerRefusal::Private),
            ("192.168.1.1", PeerRefusal::Private),
            ("169.254.1.1", PeerRefusal::LinkLocal),
            ("100.64.0.1", PeerRefusal::SharedCgnat),
            ("100.127.255.254", PeerRefusal::SharedCgnat),
            ("224.0.0.1", PeerRefusal::Multicast),
            ("0.0.0.0", PeerRefusal::Unspecified),
            ("255.255.255.255", PeerRefusal::Reserved),
            ("::1", PeerRefusal::Loopback),
            ("::", PeerRefusal::Unspecified),
            ("fe80::1", PeerRefusal::LinkLocal),
            ("fd00::1", PeerRefusal::UniqueLocal),
            ("ff02::1", PeerRefusal::Multicast),
            ("::ffff:127.0.0.1", PeerRefusal::Loopback),
            ("::ffff:10.1.2.3", PeerRefusal::Private),
            ("64:ff9b::7f00:1", PeerRefusal::Loopback),
            ("2002:0a00:0001::1", PeerRefusal::Private),
            ("203.0.113.7", PeerRefusal::OwnAddress),
        ];
        for (a, want) in cases {
            assert_eq!(p.check(at(a)), Err(want), "{a}");
        }
        for a in ["8.8.8.8", "100.128.0.1", "2001:db8::1", "2a00:1450::1"] {
            assert_eq!(p.check(at(a)), Ok(()), "{a}");
        }
    }

    #[test]
    fn allow_list_opens_exactly_the_listed_networks() {
        let p = PeerPolicy::new(
            &["127.0.0.0/8".into(), "::1/128".into(), "10.1.2.3".into()],
            vec![],
            vec![],
        );
        assert_eq!(p.check(at("127.0.0.1")), Ok(()));
        assert_eq!(p.check(at("::1")), Ok(()));
        assert_eq!(p.check(at("10.1.2.3")), Ok(()));
        assert_eq!(p.check(at("10.1.2.4")), Err(PeerRefusal::Private));
        assert_eq!(p.check(at("169.254.1.1")), Err(PeerRefusal::LinkLocal));
    }

    #[test]
    fn own_address_is_reachable_only_on_relay_and_sfu_ports() {
        let p = PeerPolicy::new(
            &[],
            vec![ip("203.0.113.7")],
            vec![(20000, 29999), (50000, 50063)],
        );
        let own = |port| SocketAddr::new(ip("203.0.113.7"), port);
        assert_eq!(p.check(own(20000)), Ok(()));
        assert_eq!(p.check(own(50063)), Ok(()));
        for port in [22, 53, 3478, 19999, 30000, 50064] {
            assert_eq!(p.check(own(port)), Err(PeerRefusal::OwnAddress), "{port}");
        }
        // The exception is for the box's own addresses, not for special ranges.
        let lo = PeerPolicy::new(&[], vec![ip("127.0.0.1")], vec![(20000, 29999)]);
        assert_eq!(
            lo.check("127.0.0.1:20000".parse().expect("addr")),
            Err(PeerRefusal::Loopback)
        );
    }

    #[test]
    fn quotas_refuse_at_the_limit() {
        let q = Quotas {
            per_user: 2,
            total: 3,
        };
        assert_eq!(q.check(1, 1), Ok(()));
        assert_eq!(q.check(2, 2), Err(QuotaRefusal::User));
        assert_eq!(q.check(0, 3), Err(QuotaRefusal::Total));
    }

    #[test]
    fn rate_limit_passes_the_rate_and_drops_the_excess() {
        let t0 = Instant::from_nanos(0);
        // 800 kbit/s = 100 kB/s, burst 100 kB.
        let mut r = RateLimit::new(800, t0);
        let mut passed = 0;
        for _ in 0..200 {
            if r.allow(1000, t0) {
                passed += 1;
            }
        }
        assert_eq!(passed, 100);
        let t1 = t0 + Duration::from_millis(500);
        let mut later = 0;
        for _ in 0..200 {
            if r.allow(1000, t1) {
                later += 1;
            }
        }
        assert_eq!(later, 50);
        let mut unlimited = RateLimit::new(0, t0);
        assert!((0..10_000).all(|_| unlimited.allow(1500, t0)));
    }
}
