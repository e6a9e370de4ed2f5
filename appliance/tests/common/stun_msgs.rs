//! TURN client messages for tests, built and parsed with the same stun-types the server uses.
//! Pure functions: the unit tests of the sans-I/O core include this file too.
#![allow(dead_code)]

use std::net::SocketAddr;

use turn_server_proto::stun::types::attribute::{
    ErrorCode, MessageIntegrity, Nonce, Realm, Username, XorMappedAddress,
};
use turn_server_proto::stun::types::message::{
    BINDING, IntegrityAlgorithm, LongTermCredentials, Message, MessageClass,
    MessageIntegrityCredentials, MessageWrite, MessageWriteExt, MessageWriteVec, Method,
};
use turn_server_proto::types::attribute::{
    ChannelNumber, Data, Lifetime, RequestedTransport, XorPeerAddress, XorRelayedAddress,
};
use turn_server_proto::types::channel::ChannelData;
use turn_server_proto::types::message::{
    ALLOCATE, CHANNEL_BIND, CREATE_PERMISSION, DATA, REFRESH, SEND,
};

/// Long-term credentials with the realm and nonce the server gave.
#[derive(Debug, Clone)]
pub struct Creds {
    pub username: String,
    pub password: String,
    pub realm: String,
    pub nonce: String,
}

/// The parts of a response a test looks at.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub success: bool,
    pub code: Option<u16>,
    pub realm: Option<String>,
    pub nonce: Option<String>,
    pub relayed: Option<SocketAddr>,
    pub mapped: Option<SocketAddr>,
    pub lifetime: Option<u32>,
    pub signed: bool,
    pub transaction: [u8; 12],
}

pub fn binding() -> Vec<u8> {
    Message::builder_request(BINDING, MessageWriteVec::new()).finish()
}

pub fn allocate_unsigned() -> Vec<u8> {
    let mut m = Message::builder_request(ALLOCATE, MessageWriteVec::new());
    add(&mut m, &RequestedTransport::new(RequestedTransport::UDP));
    m.finish()
}

fn add(m: &mut MessageWriteVec, a: &dyn turn_server_proto::stun::types::attribute::AttributeWrite) {
    m.add_attribute(a).expect("attribute fits");
}

/// A request signed with long-term credentials; `body` adds the method's attributes.
pub fn signed(method: Method, c: &Creds, body: impl FnOnce(&mut MessageWriteVec)) -> Vec<u8> {
    let mut m = Message::builder_request(method, MessageWriteVec::new());
    body(&mut m);
    add(&mut m, &Username::new(&c.username).expect("username"));
    add(&mut m, &Realm::new(&c.realm).expect("realm"));
    add(&mut m, &Nonce::new(&c.nonce).expect("nonce"));
    let key: MessageIntegrityCredentials =
        LongTermCredentials::new(c.username.clone(), c.password.clone())
            .to_key(c.realm.clone())
            .into();
    m.add_message_integrity(&key, IntegrityAlgorithm::Sha1)
        .expect("integrity");
    m.add_fingerprint().expect("fingerprint");
    m.finish()
}

pub fn allocate(c: &Creds) -> Vec<u8> {
    signed(ALLOCATE, c, |m| {
        add(m, &RequestedTransport::new(RequestedTransport::UDP))
    })
}

pub fn allocate_tcp(c: &Creds) -> Vec<u8> {
    signed(ALLOCATE, c, |m| {
        add(m, &RequestedTransport::new(RequestedTransport::TCP))
    })
}

pub fn refresh(c: &Creds, lifetime: u32) -> Vec<u8> {
    signed(REFRESH, c, |m| add(m, &Lifetime::new(lifetime)))
}

pub fn create_permission(c: &Creds, peer: SocketAddr) -> Vec<u8> {
    signed(CREATE_PERMISSION, c, |m| {
        let tid = m.transaction_id();
        add(m, &XorPeerAddress::new(peer, tid));
    })
}

pub fn channel_bind(c: &Creds, channel: u16, peer: SocketAddr) -> Vec<u8> {
    signed(CHANNEL_BIND, c, |m| {
        let tid = m.transaction_id();
        add(m, &ChannelNumber::new(channel));
        add(m, &XorPeerAddress::new(peer, tid));
    })
}

pub fn send_indication(peer: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut m = Message::builder_indication(SEND, MessageWriteVec::new());
    let tid = m.transaction_id();
    add(&mut m, &XorPeerAddress::new(peer, tid));
    add(&mut m, &Data::new(data));
    m.finish()
}

pub fn channel_data(channel: u16, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + data.len());
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Parses a STUN response; None if `bytes` is not one.
pub fn parse_reply(bytes: &[u8]) -> Option<Reply> {
    let msg = Message::from_bytes(bytes).ok()?;
    if !msg.is_response() {
        return None;
    }
    let tid = msg.transaction_id();
    let mut transaction = [0u8; 12];
    transaction.copy_from_slice(&bytes[8..20]);
    Some(Reply {
        success: msg.has_class(MessageClass::Success),
        code: msg.attribute::<ErrorCode>().ok().map(|e| e.code()),
        realm: msg.attribute::<Realm>().ok().map(|r| r.realm().to_string()),
        nonce: msg.attribute::<Nonce>().ok().map(|n| n.nonce().to_string()),
        relayed: msg
            .attribute::<XorRelayedAddress>()
            .ok()
            .map(|a| a.addr(tid)),
        mapped: msg
            .attribute::<XorMappedAddress>()
            .ok()
            .map(|a| a.addr(tid)),
        lifetime: msg.attribute::<Lifetime>().ok().map(|l| l.seconds()),
        signed: msg.attribute::<MessageIntegrity>().is_ok(),
        transaction,
    })
}

/// Data from a peer: a Data indication or ChannelData (channel, payload).
pub fn parse_data(bytes: &[u8]) -> Option<(Option<SocketAddr>, Option<u16>, Vec<u8>)> {
    if let Ok(msg) = Message::from_bytes(bytes) {
        if msg.has_method(DATA) && msg.has_class(MessageClass::Indication) {
            let peer = msg
                .attribute::<XorPeerAddress>()
                .ok()
                .map(|a| a.addr(msg.transaction_id()));
            let data = msg.attribute::<Data>().ok()?.data().to_vec();
            return Some((peer, None, data));
        }
        return None;
    }
    let cd = ChannelData::parse(bytes).ok()?;
    Some((None, Some(cd.id()), cd.data().to_vec()))
}

/// Sets a FINGERPRINT-carrying message's last byte wrong.
pub fn corrupt_fingerprint(mut msg: Vec<u8>) -> Vec<u8> {
    if let Some(b) = msg.last_mut() {
        *b ^= 0xff;
    }
    msg
}
