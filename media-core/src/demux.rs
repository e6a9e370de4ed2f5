//! Which session a datagram belongs to, decided without str0m: the local ICE ufrag names the
//! worker and session, and the first STUN binding request carries it in USERNAME.
//!
//! This module owns the ufrag format and a bounds-checked STUN USERNAME reader. It does not
//! validate STUN integrity (str0m does that once the datagram reaches the session) and it
//! never panics on any input.

use std::fmt;

/// A session's address within the SFU: worker index and session number on that worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey {
    pub worker: u16,
    pub session: u32,
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}s{}", self.worker, self.session)
    }
}

/// Length of the ufrag: 4 hex digits of worker, 8 of session, 4 random characters (RFC 8839
/// wants at least 24 bits of randomness in ufrag+pwd together; the password carries 128).
pub const UFRAG_LEN: usize = 16;

/// The local ufrag of a session: `WWWWSSSSSSSSrrrr` with `rrrr` from `salt` so that a reused
/// session number never yields an old ufrag.
pub fn ufrag_for(key: SessionKey, salt: u16) -> String {
    format!("{:04x}{:08x}{:04x}", key.worker, key.session, salt)
}

/// Reads the session a ufrag names, if it has our shape.
pub fn parse_ufrag(ufrag: &str) -> Option<SessionKey> {
    if ufrag.len() != UFRAG_LEN || !ufrag.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let worker = u16::from_str_radix(ufrag.get(0..4)?, 16).ok()?;
    let session = u32::from_str_radix(ufrag.get(4..12)?, 16).ok()?;
    Some(SessionKey { worker, session })
}

const STUN_MAGIC: u32 = 0x2112_A442;
const ATTR_USERNAME: u16 = 0x0006;
const BINDING_REQUEST: u16 = 0x0001;

/// True when `buf` looks like a STUN message (RFC 7983 first-byte range plus magic cookie).
pub fn is_stun(buf: &[u8]) -> bool {
    buf.len() >= 20
        && buf[0] < 4
        && u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) == STUN_MAGIC
}

/// The local ufrag named by a STUN binding request (`USERNAME = local:remote`), or `None` for
/// anything else, including truncated or malformed messages.
pub fn binding_request_ufrag(buf: &[u8]) -> Option<&str> {
    if !is_stun(buf) {
        return None;
    }
    let msg_type = u16::from_be_bytes([buf[0], buf[1]]);
    if msg_type != BINDING_REQUEST {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    let body = buf.get(20..20 + len)?;
    let mut at = 0usize;
    while at + 4 <= body.len() {
        let kind = u16::from_be_bytes([body[at], body[at + 1]]);
        let alen = usize::from(u16::from_be_bytes([body[at + 2], body[at + 3]]));
        let value = body.get(at + 4..at + 4 + alen)?;
        if kind == ATTR_USERNAME {
            let text = std::str::from_utf8(value).ok()?;
            return text.split(':').next();
        }
        // Attributes are padded to four bytes.
        at += 4 + alen.div_ceil(4) * 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding_request(username: &str) -> Vec<u8> {
        let mut attrs = Vec::new();
        attrs.extend_from_slice(&ATTR_USERNAME.to_be_bytes());
        attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attrs.extend_from_slice(username.as_bytes());
        while attrs.len() % 4 != 0 {
            attrs.push(0);
        }
        let mut m = Vec::new();
        m.extend_from_slice(&BINDING_REQUEST.to_be_bytes());
        m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        m.extend_from_slice(&STUN_MAGIC.to_be_bytes());
        m.extend_from_slice(&[7u8; 12]);
        m.extend_from_slice(&attrs);
        m
    }

    #[test]
    fn ufrag_round_trips_worker_and_session() {
        let key = SessionKey {
            worker: 3,
            session: 0xdead_beef,
        };
        let u = ufrag_for(key, 0x1234);
        assert_eq!(u.len(), UFRAG_LEN);
        assert_eq!(parse_ufrag(&u), Some(key));
        assert_eq!(parse_ufrag("short"), None);
        assert_eq!(parse_ufrag("zzzz00000001abcd"), None);
    }

    #[test]
    fn binding_request_names_the_local_ufrag() {
        let m = binding_request("0001000000020abc:remote");
        assert_eq!(binding_request_ufrag(&m), Some("0001000000020abc"));
    }

    #[test]
    fn truncated_or_foreign_datagrams_name_nothing() {
        let m = binding_request("0001000000020abc:remote");
        for cut in 0..m.len() {
            // Any prefix is either rejected or still parses to the same ufrag; never a panic.
            let r = binding_request_ufrag(&m[..cut]);
            assert!(r.is_none() || r == Some("0001000000020abc"));
        }
        assert_eq!(binding_request_ufrag(&[0x80, 0x60, 0, 1]), None);
        assert_eq!(binding_request_ufrag(&[0x16; 40]), None);
        let mut bad_len = m.clone();
        bad_len[2] = 0xff;
        assert_eq!(binding_request_ufrag(&bad_len), None);
        let mut bad_attr = m;
        bad_attr[23] = 0xff;
        assert_eq!(binding_request_ufrag(&bad_attr), None);
    }
}
