//! The sans-I/O TURN server of the box: `turn-server-proto` plus what it lacks.
//!
//! [`TurnCore`] takes bytes in (a UDP datagram or one framed TCP/TLS message from a client, a
//! datagram from a peer on a relay address), with the time as a parameter, and gives
//! [`Output`]s back (bytes to send, relay sockets to bind or close, connections to close). No
//! sockets, threads or clocks inside, so every behaviour is a deterministic unit test.
//!
//! The engine does Allocate/Refresh/CreatePermission/ChannelBind, Send/Data indications,
//! ChannelData, realm and nonces (438 when stale) and the RFC lifetimes (allocations 600 s by
//! default and at most 3600 s, permissions 300 s, channels 600 s — its constants, not
//! configurable). Wrapped around it or replaced here, because its API cannot do them:
//! - STUN Binding: the engine (0.7.3) sends the response to its own listen address;
//! - REST credentials with two secrets (`auth.rs`): the engine has a static user table;
//! - peer address filtering (403): the engine installs any permission it is asked for, so
//!   CreatePermission and ChannelBind for refused peers are answered here and never reach it;
//! - allocation quotas per user and in total (486): a TODO in the engine;
//! - a bandwidth cap per allocation: the engine relays whatever it gets;
//! - TCP allocations (RFC 6062) are refused with 442: the relay is UDP only, which is all
//!   WebRTC needs, and a TCP relay would need its own peer filtering;
//! - releasing an allocation when its TCP/TLS connection closes (RFC 8656 §3.1);
//! - ChannelData padding on streams (`framing.rs`), metrics.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};

use stun_proto::types::attribute::{
    AttributeStaticType, ErrorCode, Fingerprint, Nonce, Realm, Username, XorMappedAddress,
};
use stun_proto::types::message::{
    BINDING, IntegrityAlgorithm, LongTermCredentials, Message, MessageClass,
    MessageIntegrityCredentials, MessageWrite, MessageWriteExt, MessageWriteVec,
};
use turn_server_proto::api::{
    SocketAllocateError, TcpConnectError, TurnServerApi, TurnServerPollRet,
};
use turn_server_proto::server::TurnServer;
use turn_server_proto::stun as stun_proto;
use turn_server_proto::types::attribute::{Lifetime, RequestedTransport, XorPeerAddress};
use turn_server_proto::types::message::{
    ALLOCATE, CHANNEL_BIND, CONNECT, CREATE_PERMISSION, REFRESH,
};
use turn_server_proto::types::{AddressFamily, TransportType};

use super::Instant;
use super::auth::{AuthCheck, RestAuth, ValidCredential};
use super::metrics::{Direction, Metrics};
use super::policy::{PeerPolicy, Quotas, RateLimit};

/// How a client reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    /// TCP or TLS (TLS is decrypted by the I/O layer; the core sees the plain stream).
    Tcp,
}

impl Transport {
    fn engine(self) -> TransportType {
        match self {
            Transport::Udp => TransportType::Udp,
            Transport::Tcp => TransportType::Tcp,
        }
    }
    fn from_engine(t: TransportType) -> Self {
        match t {
            TransportType::Udp => Transport::Udp,
            TransportType::Tcp => Transport::Tcp,
        }
    }
}

/// A client's 5-tuple: the allocation's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    pub transport: Transport,
    pub listen: SocketAddr,
    pub client: SocketAddr,
}

/// The time, twice: monotonic for lifetimes, wall clock for credential expiry.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub mono: Instant,
    pub unix_s: u64,
}

/// A relay socket the I/O layer must bind, then report with [`TurnCore::relay_bound`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayRequest {
    pub owner: FiveTuple,
    pub family: AddressFamily,
    allocation_transport: TransportType,
}

/// What the I/O layer must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    /// Send `data`. `Udp`: from the UDP listener or relay socket bound at `from`. `Tcp`: on the
    /// connection between listener `from` and client `to` (already framed for a stream).
    Transmit {
        transport: Transport,
        from: SocketAddr,
        to: SocketAddr,
        data: Vec<u8>,
    },
    /// Bind a UDP socket in the relay range for this family.
    BindRelay(RelayRequest),
    /// The allocation behind this relay address ended: close its socket.
    CloseRelay(SocketAddr),
    /// Close a client connection.
    CloseTcp {
        listen: SocketAddr,
        client: SocketAddr,
    },
}

/// Limits and policy of a [`TurnCore`].
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub policy: PeerPolicy,
    pub quotas: Quotas,
    pub bandwidth_per_allocation_kbps: u64,
    pub nonce_lifetime_s: u64,
}

struct Relay {
    owner: FiveTuple,
    to_peer: RateLimit,
    to_client: RateLimit,
}

struct Owner {
    username: String,
    relays: Vec<SocketAddr>,
    /// False once the client's connection closed: the engine keeps the allocation until it
    /// expires, but it no longer counts against quotas.
    counted: bool,
}

/// The last accepted credential and nonce of a TCP/TLS client, to release its allocation
/// when the connection closes.
struct TcpAuth {
    username: String,
    nonce: String,
    key: MessageIntegrityCredentials,
}

/// Usernames handed to the engine, with their expiry, so they can be revoked.
struct KnownUser {
    expiry: u64,
}

/// The box's TURN server; see the module documentation.
pub struct TurnCore {
    servers: Vec<TurnServer>,
    auth: RestAuth,
    config: CoreConfig,
    relays: HashMap<SocketAddr, Relay>,
    owners: HashMap<FiveTuple, Owner>,
    /// Allocate requests passed to the engine, awaiting their relay socket.
    pending: HashMap<FiveTuple, String>,
    /// TCP/TLS clients only; removed when their connection closes.
    tcp_auth: HashMap<FiveTuple, TcpAuth>,
    known_users: HashMap<String, KnownUser>,
    /// What each engine said when it was last drained.
    wait_until: Vec<Instant>,
    out: VecDeque<Output>,
    metrics: Metrics,
    next_sweep_unix: u64,
}

impl std::fmt::Debug for TurnCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnCore")
            .field("listeners", &self.servers.len())
            .field("relays", &self.relays.len())
            .field("allocations", &self.owners.len())
            .finish()
    }
}

impl TurnCore {
    /// A server answering on each of `listeners` (UDP, TCP and TLS listener addresses; TLS
    /// counts as `Tcp`).
    pub fn new(
        listeners: &[(Transport, SocketAddr)],
        auth: RestAuth,
        config: CoreConfig,
        metrics: Metrics,
    ) -> Self {
        let nonce = std::time::Duration::from_secs(config.nonce_lifetime_s.max(30));
        let servers = listeners
            .iter()
            .map(|(t, addr)| {
                let mut s = TurnServer::new(t.engine(), *addr, auth.realm().to_string());
                s.set_nonce_expiry_duration(nonce);
                s
            })
            .collect();
        Self {
            servers,
            auth,
            config,
            relays: HashMap::new(),
            owners: HashMap::new(),
            pending: HashMap::new(),
            tcp_auth: HashMap::new(),
            known_users: HashMap::new(),
            wait_until: vec![Instant::from_nanos(0); listeners.len()],
            out: VecDeque::new(),
            metrics,
            next_sweep_unix: 0,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Allocations held now (one per client 5-tuple, whatever its address families).
    pub fn allocations(&self) -> usize {
        self.owners.values().filter(|o| o.counted).count()
    }

    fn server_index(&self, transport: Transport, listen: SocketAddr) -> Option<usize> {
        self.servers
            .iter()
            .position(|s| s.transport() == transport.engine() && s.listen_address() == listen)
    }

    /// One datagram (UDP) or one frame (TCP/TLS, see `framing.rs`) from a client.
    pub fn recv_from_client(&mut self, tuple: FiveTuple, data: &[u8], now: Now) {
        let Some(idx) = self.server_index(tuple.transport, tuple.listen) else {
            return;
        };
        self.sweep_users(now);
        let is_channel_data = data.first().is_some_and(|b| b >> 6 == 1);
        // STUN class bits: 0x0010 marks an indication (Send); the engine needs no drain after it.
        let is_indication =
            data.len() >= 2 && data[0] >> 6 == 0 && data[1] & 0x10 != 0 && data[0] & 0x01 == 0;
        match Message::from_bytes(data) {
            Ok(msg) => {
                if msg.method() == BINDING {
                    // The engine sends Binding responses to its own listen address (0.7.3,
                    // `handle_stun_binding`), so Binding is answered here.
                    if msg.has_class(MessageClass::Request)
                        && let Some(reply) = binding_response(&msg, tuple.client)
                    {
                        self.push_transmit(stun_proto::agent::Transmit::new(
                            reply,
                            tuple.transport.engine(),
                            tuple.listen,
                            tuple.client,
                        ));
                    }
                    return;
                }
                if msg.has_class(MessageClass::Request) && self.intercept_request(tuple, &msg, now)
                {
                    self.drain(idx, now);
                    return;
                }
            }
            Err(_) if is_channel_data && data.len() >= 4 => {}
            Err(_) => {
                // Truncated, a bad length, attribute or fingerprint: RFC 8489 says discard
                // silently; the engine would do the same, so it never sees it.
                self.metrics.refused("malformed");
                return;
            }
        }
        let transmit = stun_proto::agent::Transmit::new(
            data,
            tuple.transport.engine(),
            tuple.client,
            tuple.listen,
        );
        let reply = self.servers[idx]
            .recv(transmit, now.mono)
            .map(|t| t.build());
        match reply {
            Some(t) => self.emit(t, now),
            None if is_channel_data => self.metrics.dropped("no_channel"),
            None => {}
        }
        // Requests may leave work in the engine (relay sockets to bind, responses to send);
        // relayed data never does, and the engine's poll walks every allocation, so the data
        // path skips it. The timer drains whatever is left.
        if !is_channel_data && !is_indication {
            self.drain(idx, now);
        }
        // An Allocate the engine refused (it answers errors at once) must not keep counting
        // against the quotas; one it accepted waits for its relay socket.
        if self.pending.contains_key(&tuple)
            && !self
                .out
                .iter()
                .any(|o| matches!(o, Output::BindRelay(r) if r.owner == tuple))
        {
            self.pending.remove(&tuple);
        }
    }

    /// A datagram from `peer` to the relay address `relayed`.
    pub fn recv_from_peer(&mut self, relayed: SocketAddr, peer: SocketAddr, data: &[u8], now: Now) {
        let Some(relay) = self.relays.get(&relayed) else {
            return;
        };
        let Some(idx) = self.server_index(relay.owner.transport, relay.owner.listen) else {
            return;
        };
        let transmit = stun_proto::agent::Transmit::new(data, TransportType::Udp, peer, relayed);
        let Some(out) = self.servers[idx]
            .recv(transmit, now.mono)
            .map(|t| t.build())
        else {
            self.metrics.dropped("no_permission");
            return;
        };
        if let Some(relay) = self.relays.get_mut(&relayed)
            && !relay.to_client.allow(data.len(), now.mono)
        {
            self.metrics.dropped("bandwidth");
            return;
        }
        self.metrics.relayed(Direction::ToClient, data.len());
        self.push_transmit(out);
    }

    /// A client's TCP or TLS connection closed (or was closed).
    pub fn tcp_closed(&mut self, listen: SocketAddr, client: SocketAddr, now: Now) {
        let tuple = FiveTuple {
            transport: Transport::Tcp,
            listen,
            client,
        };
        self.pending.remove(&tuple);
        let last_auth = self.tcp_auth.remove(&tuple);
        let Some(idx) = self.server_index(Transport::Tcp, listen) else {
            return;
        };
        // RFC 8656 §3.1: the allocation lives as long as its connection. The engine has no call
        // for that, so it gets the Refresh with lifetime 0 the client would have sent, signed
        // with the credential and nonce of the client's last accepted request.
        if self.owners.contains_key(&tuple)
            && let Some(auth) = last_auth
            && let Some(refresh) = self.release_request(&auth)
        {
            let t =
                stun_proto::agent::Transmit::new(&refresh[..], TransportType::Tcp, client, listen);
            let _ = self.servers[idx].recv(t, now.mono);
        }
        // Empty data tells the engine the stream ended, so it drops its buffer.
        let t = stun_proto::agent::Transmit::new(&[][..], TransportType::Tcp, client, listen);
        let _ = self.servers[idx].recv(t, now.mono);
        self.drain(idx, now);
        // If the release failed (its nonce had gone stale), the engine keeps the allocation until
        // it expires; it stops counting against the quotas now.
        if let Some(owner) = self.owners.get_mut(&tuple)
            && owner.counted
        {
            owner.counted = false;
            self.metrics.allocation_removed();
        }
    }

    /// A Refresh with LIFETIME 0, as the client would send it.
    fn release_request(&self, auth: &TcpAuth) -> Option<Vec<u8>> {
        let mut m = Message::builder_request(REFRESH, MessageWriteVec::new());
        m.add_attribute(&Lifetime::new(0)).ok()?;
        m.add_attribute(&Username::new(&auth.username).ok()?).ok()?;
        m.add_attribute(&Realm::new(self.auth.realm()).ok()?).ok()?;
        m.add_attribute(&Nonce::new(&auth.nonce).ok()?).ok()?;
        m.add_message_integrity(&auth.key, IntegrityAlgorithm::Sha1)
            .ok()?;
        m.add_fingerprint().ok()?;
        Some(m.finish())
    }

    /// The I/O layer's answer to [`Output::BindRelay`].
    pub fn relay_bound(
        &mut self,
        req: RelayRequest,
        result: Result<SocketAddr, SocketAllocateError>,
        now: Now,
    ) {
        let Some(idx) = self.server_index(req.owner.transport, req.owner.listen) else {
            return;
        };
        if let Ok(addr) = result {
            let username = self
                .pending
                .remove(&req.owner)
                .or_else(|| self.owners.get(&req.owner).map(|o| o.username.clone()))
                .unwrap_or_default();
            let kbps = self.config.bandwidth_per_allocation_kbps;
            self.relays.insert(
                addr,
                Relay {
                    owner: req.owner,
                    to_peer: RateLimit::new(kbps, now.mono),
                    to_client: RateLimit::new(kbps, now.mono),
                },
            );
            let owner = self.owners.entry(req.owner).or_insert_with(|| {
                self.metrics.allocation_created();
                Owner {
                    username,
                    relays: Vec::new(),
                    counted: true,
                }
            });
            owner.relays.push(addr);
        } else {
            self.pending.remove(&req.owner);
            self.metrics.refused("relay_ports_exhausted");
        }
        self.servers[idx].allocated_socket(
            req.owner.transport.engine(),
            req.owner.listen,
            req.owner.client,
            req.allocation_transport,
            req.family,
            result,
            now.mono,
        );
        self.drain(idx, now);
    }

    /// Runs timers; call at [`TurnCore::next_timeout`] (or earlier).
    pub fn handle_timeout(&mut self, now: Now) {
        self.sweep_users(now);
        for idx in 0..self.servers.len() {
            self.drain(idx, now);
        }
    }

    /// The next thing to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`TurnCore::handle_timeout`] must run next (at the latest in one second).
    pub fn next_timeout(&self, now: Now) -> Instant {
        let next = now.mono + std::time::Duration::from_secs(1);
        self.wait_until.iter().copied().fold(next, Instant::min)
    }

    /// Our checks before the engine sees a request. True if we answered it ourselves.
    fn intercept_request(&mut self, tuple: FiveTuple, msg: &Message<'_>, now: Now) -> bool {
        let cred = match self.auth.check(msg, now.unix_s) {
            AuthCheck::Unsigned => return false,
            AuthCheck::Invalid { username, reason } => {
                self.metrics.refused(reason);
                if let Some(u) = username
                    && self.known_users.remove(&u).is_some()
                {
                    self.revoke(&u);
                }
                // The engine answers 401 (unknown user or failed integrity) or 438.
                return false;
            }
            AuthCheck::Valid(c) => c,
        };
        for s in &mut self.servers {
            s.add_user(cred.username.clone(), cred.password.clone());
        }
        self.known_users.insert(
            cred.username.clone(),
            KnownUser {
                expiry: cred.expiry,
            },
        );
        if tuple.transport == Transport::Tcp
            && let Ok(nonce) = msg.attribute::<Nonce>()
        {
            let key = LongTermCredentials::new(cred.username.clone(), cred.password.clone())
                .to_key(self.auth.realm().to_string())
                .into();
            self.tcp_auth.insert(
                tuple,
                TcpAuth {
                    username: cred.username.clone(),
                    nonce: nonce.nonce().to_string(),
                    key,
                },
            );
        }
        let method = msg.method();
        if method == ALLOCATE {
            return self.check_allocate(tuple, msg, &cred);
        }
        if method == CREATE_PERMISSION || method == CHANNEL_BIND || method == CONNECT {
            let peers: Vec<SocketAddr> = (0..)
                .map_while(|n| msg.nth_attribute::<XorPeerAddress>(n).ok())
                .map(|a| a.addr(msg.transaction_id()))
                .take(16)
                .collect();
            for peer in peers {
                if let Err(r) = self.config.policy.check(peer) {
                    self.metrics.refused(r.as_str());
                    tracing::debug!(peer = %peer.ip(), reason = r.as_str(), "peer refused");
                    self.reply_error(tuple, msg, ErrorCode::FORBIDDEN, &cred);
                    return true;
                }
            }
        }
        false
    }

    fn check_allocate(
        &mut self,
        tuple: FiveTuple,
        msg: &Message<'_>,
        cred: &ValidCredential,
    ) -> bool {
        if let Ok(rt) = msg.attribute::<RequestedTransport>()
            && rt.protocol() != RequestedTransport::UDP
        {
            self.metrics.refused("tcp_allocation");
            self.reply_error(tuple, msg, ErrorCode::UNSUPPORTED_TRANSPORT_PROTOCOL, cred);
            return true;
        }
        if self.owners.contains_key(&tuple) || self.pending.contains_key(&tuple) {
            // A retransmission or a second Allocate on the same 5-tuple: the engine answers.
            return false;
        }
        let user = self
            .owners
            .values()
            .filter(|o| o.counted && o.username == cred.username)
            .count()
            + self
                .pending
                .values()
                .filter(|u| **u == cred.username)
                .count();
        let total = self.allocations() + self.pending.len();
        if let Err(q) = self.config.quotas.check(user as u32, total as u32) {
            let reason = match q {
                super::policy::QuotaRefusal::User => "quota_user",
                super::policy::QuotaRefusal::Total => "quota_total",
            };
            self.metrics.refused(reason);
            self.reply_error(tuple, msg, ErrorCode::ALLOCATION_QUOTA_REACHED, cred);
            return true;
        }
        self.pending.insert(tuple, cred.username.clone());
        false
    }

    /// A signed error response of our own.
    fn reply_error(
        &mut self,
        tuple: FiveTuple,
        msg: &Message<'_>,
        code: u16,
        cred: &ValidCredential,
    ) {
        if let Some(data) = signed_error(msg, code, &cred.key, cred.algorithm) {
            self.push_transmit(stun_proto::agent::Transmit::new(
                data,
                tuple.transport.engine(),
                tuple.listen,
                tuple.client,
            ));
        }
    }

    /// Replaces a username's password in the engine by one no client knows, so it stops
    /// verifying.
    fn revoke(&mut self, username: &str) {
        let unusable = self.auth.revoked_password(username);
        for s in &mut self.servers {
            s.add_user(username.to_string(), unusable.clone());
        }
    }

    /// Revokes usernames that expired (checked at most once a minute).
    fn sweep_users(&mut self, now: Now) {
        if now.unix_s < self.next_sweep_unix {
            return;
        }
        self.next_sweep_unix = now.unix_s + 60;
        let expired: Vec<String> = self
            .known_users
            .iter()
            .filter(|(_, k)| k.expiry <= now.unix_s)
            .map(|(u, _)| u.clone())
            .collect();
        for u in expired {
            self.known_users.remove(&u);
            self.revoke(&u);
        }
    }

    /// Collects everything the engine wants done.
    fn drain(&mut self, idx: usize, now: Now) {
        // Bounded: each round handles one engine request; the engine has finitely many.
        for _ in 0..10_000 {
            match self.servers[idx].poll(now.mono) {
                TurnServerPollRet::WaitUntil(t) => {
                    self.wait_until[idx] = t;
                    break;
                }
                TurnServerPollRet::AllocateSocket {
                    transport,
                    listen_addr,
                    client_addr,
                    allocation_transport,
                    family,
                } => {
                    let req = RelayRequest {
                        owner: FiveTuple {
                            transport: Transport::from_engine(transport),
                            listen: listen_addr,
                            client: client_addr,
                        },
                        family,
                        allocation_transport,
                    };
                    if allocation_transport != TransportType::Udp {
                        self.servers[idx].allocated_socket(
                            transport,
                            listen_addr,
                            client_addr,
                            allocation_transport,
                            family,
                            Err(SocketAllocateError::AddressFamilyNotSupported),
                            now.mono,
                        );
                    } else {
                        self.out.push_back(Output::BindRelay(req));
                    }
                }
                TurnServerPollRet::TcpConnect {
                    relayed_addr,
                    peer_addr,
                    listen_addr,
                    client_addr,
                } => {
                    // Never reached: TCP allocations are refused before the engine sees them.
                    self.servers[idx].tcp_connected(
                        relayed_addr,
                        peer_addr,
                        listen_addr,
                        client_addr,
                        Err(TcpConnectError::Forbidden),
                        now.mono,
                    );
                }
                TurnServerPollRet::TcpClose {
                    local_addr,
                    remote_addr,
                } => {
                    if self.server_index(Transport::Tcp, local_addr).is_some() {
                        self.out.push_back(Output::CloseTcp {
                            listen: local_addr,
                            client: remote_addr,
                        });
                    }
                }
                TurnServerPollRet::SocketClose { listen_addr, .. } => {
                    self.relay_closed(listen_addr)
                }
            }
        }
        while let Some(t) = self.servers[idx].poll_transmit(now.mono) {
            self.emit(t, now);
        }
    }

    fn relay_closed(&mut self, addr: SocketAddr) {
        let Some(relay) = self.relays.remove(&addr) else {
            return;
        };
        self.out.push_back(Output::CloseRelay(addr));
        if let Some(owner) = self.owners.get_mut(&relay.owner) {
            owner.relays.retain(|a| *a != addr);
            if owner.relays.is_empty() {
                if owner.counted {
                    self.metrics.allocation_removed();
                }
                self.owners.remove(&relay.owner);
            }
        }
    }

    /// Accounts and queues a transmit from the engine: one whose source is a relay address
    /// carries a client's ChannelData or Send indication to a peer.
    fn emit(&mut self, t: stun_proto::agent::Transmit<Vec<u8>>, now: Now) {
        if t.transport == TransportType::Udp
            && let Some(relay) = self.relays.get_mut(&t.from)
        {
            // Permissions are per IP; the port of an own-address peer is checked here.
            if self.config.policy.check(t.to).is_err() {
                self.metrics.dropped("peer_policy");
                return;
            }
            if !relay.to_peer.allow(t.data.len(), now.mono) {
                self.metrics.dropped("bandwidth");
                return;
            }
            self.metrics.relayed(Direction::ToPeer, t.data.len());
            self.push_transmit(t);
            return;
        }
        self.push_transmit(t);
    }

    fn push_transmit(&mut self, t: stun_proto::agent::Transmit<Vec<u8>>) {
        let transport = Transport::from_engine(t.transport);
        let data = match transport {
            Transport::Tcp => super::framing::pad_for_stream(t.data),
            Transport::Udp => t.data,
        };
        self.out.push_back(Output::Transmit {
            transport,
            from: t.from,
            to: t.to,
            data,
        });
    }
}

/// The answer to a Binding request: the client's reflexive address (RFC 8489 §7.3.1), or 420
/// for unknown comprehension-required attributes.
fn binding_response(msg: &Message<'_>, client: SocketAddr) -> Option<Vec<u8>> {
    if let Some(error) =
        Message::check_attribute_types(msg, &[Fingerprint::TYPE], &[], MessageWriteVec::new())
    {
        return Some(error.finish());
    }
    let mut b = Message::builder_success(msg, MessageWriteVec::new());
    b.add_attribute(&XorMappedAddress::new(client, msg.transaction_id()))
        .ok()?;
    b.add_fingerprint().ok()?;
    Some(b.finish())
}

/// An error response signed with the request's key, with FINGERPRINT.
fn signed_error(
    msg: &Message<'_>,
    code: u16,
    key: &MessageIntegrityCredentials,
    algorithm: IntegrityAlgorithm,
) -> Option<Vec<u8>> {
    let error = ErrorCode::builder(code).build().ok()?;
    let mut b = Message::builder_error(msg, MessageWriteVec::new());
    b.add_attribute(&error).ok()?;
    b.add_message_integrity(key, algorithm).ok()?;
    b.add_fingerprint().ok()?;
    Some(b.finish())
}

/// The address family of an IP.
pub fn family_of(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::IPV4,
        IpAddr::V6(_) => AddressFamily::IPV6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::turn::credentials::rest_credentials;
    use crate::turn::test_msgs::{self as msgs, Creds, Reply};
    use std::time::Duration;

    const SECRET: &str = "unit-test-secret";
    const UNIX0: u64 = 1_800_000_000;

    fn listen() -> SocketAddr {
        "198.51.100.1:3478".parse().expect("addr")
    }

    struct Harness {
        core: TurnCore,
        t: Duration,
        next_relay: u16,
        transport: Transport,
    }

    impl Harness {
        fn new(per_user: u32, kbps: u64) -> Self {
            let config = CoreConfig {
                policy: PeerPolicy::new(
                    &["127.0.0.0/8".into()],
                    vec!["198.51.100.1".parse().expect("ip")],
                    vec![(20_000, 20_999)],
                ),
                quotas: Quotas {
                    per_user,
                    total: 100,
                },
                bandwidth_per_allocation_kbps: kbps,
                nonce_lifetime_s: 30,
            };
            let auth = RestAuth::new("test".into(), SECRET.into(), None);
            let core = TurnCore::new(
                &[(Transport::Udp, listen()), (Transport::Tcp, listen())],
                auth,
                config,
                Metrics::new(),
            );
            Harness {
                core,
                t: Duration::ZERO,
                next_relay: 20_000,
                transport: Transport::Udp,
            }
        }

        fn now(&self) -> Now {
            Now {
                mono: Instant::from_nanos(self.t.as_nanos() as i64),
                unix_s: UNIX0 + self.t.as_secs(),
            }
        }

        fn advance(&mut self, d: Duration) {
            self.t += d;
            let now = self.now();
            self.core.handle_timeout(now);
        }

        /// Runs the outputs: binds relays at fake addresses, returns the transmits.
        fn outputs(&mut self) -> Vec<Output> {
            let mut out = Vec::new();
            while let Some(o) = self.core.poll_output() {
                if let Output::BindRelay(req) = o {
                    let addr = SocketAddr::from(([198, 51, 100, 1], self.next_relay));
                    self.next_relay += 1;
                    let now = self.now();
                    self.core.relay_bound(req, Ok(addr), now);
                } else {
                    out.push(o);
                }
            }
            out
        }

        fn send(&mut self, client: SocketAddr, data: &[u8]) -> Vec<Output> {
            let tuple = FiveTuple {
                transport: self.transport,
                listen: listen(),
                client,
            };
            let now = self.now();
            self.core.recv_from_client(tuple, data, now);
            self.outputs()
        }

        fn request(&mut self, client: SocketAddr, data: &[u8]) -> Reply {
            let out = self.send(client, data);
            out.iter()
                .find_map(|o| match o {
                    Output::Transmit { to, data, .. } if *to == client => msgs::parse_reply(data),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("no reply in {out:?}"))
        }

        fn login(&mut self, client: SocketAddr, ttl: u64) -> Creds {
            let (username, password) =
                rest_credentials(SECRET, "unit", ttl, UNIX0 + self.t.as_secs());
            let r = self.request(client, &msgs::allocate_unsigned());
            assert_eq!(r.code, Some(401));
            Creds {
                username,
                password,
                realm: r.realm.expect("realm"),
                nonce: r.nonce.expect("nonce"),
            }
        }

        fn allocate(&mut self, client: SocketAddr) -> (Creds, SocketAddr) {
            let c = self.login(client, 3600);
            let r = self.request(client, &msgs::allocate(&c));
            assert!(r.success, "{r:?}");
            (c, r.relayed.expect("relayed"))
        }
    }

    fn client(n: u16) -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 9], 40_000 + n))
    }

    #[test]
    fn binding_reports_the_reflexive_address() {
        let mut h = Harness::new(5, 0);
        let r = h.request(client(1), &msgs::binding());
        assert!(r.success);
        assert_eq!(r.mapped, Some(client(1)));
    }

    #[test]
    fn allocation_lives_600_s_by_default_then_its_relay_closes() {
        let mut h = Harness::new(5, 0);
        let (_, relayed) = h.allocate(client(1));
        assert_eq!(h.core.allocations(), 1);
        h.advance(Duration::from_secs(599));
        assert!(h.outputs().is_empty());
        h.advance(Duration::from_secs(2));
        assert_eq!(h.outputs(), vec![Output::CloseRelay(relayed)]);
        assert_eq!(h.core.allocations(), 0);
        assert_eq!(h.core.metrics().allocations(), 0);
    }

    #[test]
    fn requested_lifetimes_are_clamped_to_600_and_3600_s() {
        use turn_server_proto::types::attribute::Lifetime;
        let mut h = Harness::new(5, 0);
        let c = h.login(client(1), 7200);
        let long = msgs::signed(ALLOCATE, &c, |m| {
            m.add_attribute(&RequestedTransport::new(RequestedTransport::UDP))
                .expect("add");
            m.add_attribute(&Lifetime::new(7200)).expect("add");
        });
        let r = h.request(client(1), &long);
        assert_eq!(r.lifetime, Some(3600), "{r:?}");
        let r = h.request(client(1), &msgs::refresh(&c, 60));
        assert_eq!(r.lifetime, Some(600), "{r:?}");
        // Without a refresh the allocation ends after 600 s from that refresh.
        h.advance(Duration::from_secs(601));
        assert!(matches!(h.outputs().as_slice(), [Output::CloseRelay(_)]));
    }

    #[test]
    fn nonce_goes_stale_after_its_lifetime() {
        let mut h = Harness::new(5, 0);
        let (c, _) = h.allocate(client(1));
        let peer: SocketAddr = "127.0.0.1:5000".parse().expect("peer");
        assert!(
            h.request(client(1), &msgs::create_permission(&c, peer))
                .success
        );
        h.advance(Duration::from_secs(31));
        let r = h.request(client(1), &msgs::create_permission(&c, peer));
        assert_eq!(r.code, Some(438));
        let fresh = Creds {
            nonce: r.nonce.expect("new nonce"),
            ..c
        };
        assert!(
            h.request(client(1), &msgs::create_permission(&fresh, peer))
                .success
        );
    }

    #[test]
    fn credential_that_expires_during_an_allocation_stops_working() {
        let mut h = Harness::new(5, 0);
        let c = h.login(client(1), 20);
        assert!(h.request(client(1), &msgs::allocate(&c)).success);
        h.advance(Duration::from_secs(21));
        let r = h.request(client(1), &msgs::refresh(&c, 600));
        assert_eq!(r.code, Some(401), "{r:?}");
        assert_eq!(h.core.metrics().refusals("auth_expired"), 1);
    }

    #[test]
    fn refused_peers_get_403_and_no_permission() {
        let mut h = Harness::new(5, 0);
        let (c, relayed) = h.allocate(client(1));
        for peer in ["10.0.0.1:9", "198.51.100.1:9", "[::1]:9"] {
            let r = h.request(
                client(1),
                &msgs::create_permission(&c, peer.parse().expect("peer")),
            );
            assert_eq!(r.code, Some(403), "{peer}");
            assert!(r.signed);
        }
        // The box's own address is reachable on relay ports only (relay-to-relay, the SFU).
        let relay_peer: SocketAddr = "198.51.100.1:20005".parse().expect("peer");
        assert!(
            h.request(client(1), &msgs::create_permission(&c, relay_peer))
                .success
        );
        let own_ssh: SocketAddr = "198.51.100.1:22".parse().expect("peer");
        let sent = h.send(client(1), &msgs::send_indication(own_ssh, b"x"));
        assert!(
            sent.is_empty(),
            "same IP, other port: dropped on the data path"
        );
        let sent = h.send(client(1), &msgs::send_indication(relay_peer, b"x"));
        assert!(
            sent.iter()
                .any(|o| matches!(o, Output::Transmit { to, .. } if *to == relay_peer))
        );
        // Data from the refused peer is not relayed.
        let now = h.now();
        h.core
            .recv_from_peer(relayed, "10.0.0.1:9".parse().expect("peer"), b"x", now);
        assert!(h.outputs().is_empty());
        assert_eq!(h.core.metrics().refusals("peer_own_address"), 1);
    }

    #[test]
    fn quota_refuses_the_third_allocation_of_a_user_with_486() {
        let mut h = Harness::new(2, 0);
        h.allocate(client(1));
        h.allocate(client(2));
        let c = h.login(client(3), 3600);
        assert_eq!(h.request(client(3), &msgs::allocate(&c)).code, Some(486));
        // A retransmitted Allocate on an existing allocation is the engine's to answer.
        let (c1, _) = (h.login(client(1), 3600), ());
        assert_ne!(h.request(client(1), &msgs::allocate(&c1)).code, Some(486));
    }

    #[test]
    fn tcp_allocation_is_released_when_its_connection_closes() {
        let mut h = Harness::new(1, 0);
        h.transport = Transport::Tcp;
        let (_, relayed) = h.allocate(client(1));
        assert_eq!(h.core.allocations(), 1);
        let now = h.now();
        h.core.tcp_closed(listen(), client(1), now);
        let out = h.outputs();
        assert!(out.contains(&Output::CloseRelay(relayed)), "{out:?}");
        assert_eq!(h.core.allocations(), 0);
        assert_eq!(h.core.metrics().allocations(), 0);
        assert!(h.core.tcp_auth.is_empty());
        // The quota of one is free again for a new connection.
        h.allocate(client(2));
    }

    #[test]
    fn refused_allocate_does_not_use_up_the_quota() {
        let mut h = Harness::new(1, 0);
        let c = h.login(client(1), 3600);
        // No REQUESTED-TRANSPORT: the engine answers 400 and creates nothing.
        let bad = msgs::signed(turn_server_proto::types::message::ALLOCATE, &c, |_| {});
        assert_eq!(h.request(client(1), &bad).code, Some(400));
        assert!(h.core.pending.is_empty());
        // No relay port: 508, and nothing stays pending either.
        let tuple = FiveTuple {
            transport: Transport::Udp,
            listen: listen(),
            client: client(1),
        };
        let now = h.now();
        h.core.recv_from_client(tuple, &msgs::allocate(&c), now);
        let Some(Output::BindRelay(req)) = h.core.poll_output() else {
            panic!("expected a relay request");
        };
        h.core
            .relay_bound(req, Err(SocketAllocateError::InsufficientCapacity), now);
        let reply = h.outputs().iter().find_map(|o| match o {
            Output::Transmit { data, .. } => msgs::parse_reply(data),
            _ => None,
        });
        assert_eq!(reply.and_then(|r| r.code), Some(508));
        assert!(h.core.pending.is_empty());
        // So the quota of one is still free.
        assert!(h.request(client(1), &msgs::allocate(&c)).success);
    }

    #[test]
    fn bandwidth_cap_drops_what_exceeds_the_rate() {
        // 800 kbit/s = 100 kB/s with a 100 kB burst.
        let mut h = Harness::new(5, 800);
        let (c, relayed) = h.allocate(client(1));
        let peer: SocketAddr = "127.0.0.1:5000".parse().expect("peer");
        assert!(
            h.request(client(1), &msgs::channel_bind(&c, 0x4000, peer))
                .success
        );
        let payload = [7u8; 1000];
        let mut relayed_out = 0;
        for _ in 0..300 {
            for o in h.send(client(1), &msgs::channel_data(0x4000, &payload)) {
                if matches!(o, Output::Transmit { from, to, .. } if from == relayed && to == peer) {
                    relayed_out += 1;
                }
            }
        }
        assert_eq!(
            relayed_out, 100,
            "one burst's worth passes, the rest is dropped"
        );
        h.advance(Duration::from_secs(1));
        let out = h.send(client(1), &msgs::channel_data(0x4000, &payload));
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Transmit { to, .. } if *to == peer))
        );
    }

    #[test]
    fn channel_data_on_an_unbound_channel_is_dropped() {
        let mut h = Harness::new(5, 0);
        h.allocate(client(1));
        assert!(
            h.send(client(1), &msgs::channel_data(0x4123, b"nobody"))
                .is_empty()
        );
        assert!(
            h.send(client(9), &msgs::channel_data(0x4000, b"no allocation"))
                .is_empty()
        );
    }
}
