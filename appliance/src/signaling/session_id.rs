//! Session ids and resume ids: signed with the session hash key and encrypted with the session
//! block key, in the format upstream spreed-signaling uses.
//!
//! Upstream encodes `SessionIdData {Sid, Created, BackendId}` with Go's `encoding/gob`, then
//! gorilla `securecookie` (AES-CTR with the block key, HMAC-SHA256 over `name|date|value` with the
//! hash key, URL-safe base64 twice), under the names `private-session` (the resume id) and
//! `public-session` (the session id, whose bytes are also reversed). Keeping that format means
//! that tools which share the `[sessions]` keys with the server, such as upstream's load client,
//! can turn a resume id into the session id, and that ids stay unguessable and unforgeable.
//!
//! This module owns that codec and the few gob messages it needs; it does no I/O, and time is a
//! parameter.

use aws_lc_rs::cipher::{AES_256, EncryptingKey, EncryptionContext, UnboundCipherKey};
use aws_lc_rs::hmac;
use aws_lc_rs::iv::FixedLength;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE;

pub const PRIVATE_NAME: &str = "private-session";
pub const PUBLIC_NAME: &str = "public-session";

/// Longest id accepted (securecookie's default limit).
pub const MAX_ID_LEN: usize = 4096;

/// What a session id carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionIdData {
    pub sid: u64,
    pub backend_id: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionIdError {
    #[error("session id is too long")]
    TooLong,
    #[error("session id is not base64")]
    Encoding,
    #[error("session id signature does not match")]
    BadMac,
    #[error("session id content is malformed ({0})")]
    Malformed(&'static str),
    #[error("session block key must be at least 32 bytes")]
    ShortKey,
}

/// Encodes and decodes session ids with the box's session keys.
#[derive(Clone)]
pub struct SessionIdCodec {
    hash: hmac::Key,
    block: [u8; 32],
}

impl SessionIdCodec {
    /// `hash_key`: any length (upstream recommends 32 or 64 bytes); `block_key`: its first 32
    /// bytes are the AES-256 key, as upstream uses the configured text's bytes directly.
    pub fn new(hash_key: &[u8], block_key: &[u8]) -> Result<Self, SessionIdError> {
        let block: [u8; 32] = block_key
            .get(..32)
            .and_then(|b| b.try_into().ok())
            .ok_or(SessionIdError::ShortKey)?;
        Ok(Self {
            hash: hmac::Key::new(hmac::HMAC_SHA256, hash_key),
            block,
        })
    }

    fn xor_ctr(&self, iv: [u8; 16], data: &mut [u8]) -> Result<(), SessionIdError> {
        let key =
            UnboundCipherKey::new(&AES_256, &self.block).map_err(|_| SessionIdError::ShortKey)?;
        let key = EncryptingKey::ctr(key).map_err(|_| SessionIdError::ShortKey)?;
        key.less_safe_encrypt(data, EncryptionContext::Iv128(FixedLength::from(iv)))
            .map_err(|_| SessionIdError::Malformed("cipher"))?;
        Ok(())
    }

    /// securecookie `Encode(name, data)`.
    fn encode(
        &self,
        name: &str,
        data: &SessionIdData,
        now_unix: i64,
    ) -> Result<String, SessionIdError> {
        let mut payload = gob::encode(data);
        let mut iv = [0u8; 16];
        aws_lc_rs::rand::fill(&mut iv).map_err(|_| SessionIdError::Malformed("no randomness"))?;
        self.xor_ctr(iv, &mut payload)?;
        let mut value = iv.to_vec();
        value.extend_from_slice(&payload);
        let value = URL_SAFE.encode(&value);
        let signed = format!("{name}|{now_unix}|{value}");
        let mac = hmac::sign(&self.hash, signed.as_bytes());
        let mut out = signed.into_bytes()[name.len() + 1..].to_vec();
        out.push(b'|');
        out.extend_from_slice(mac.as_ref());
        Ok(URL_SAFE.encode(out))
    }

    /// securecookie `Decode(name, id)` (no age limit, as upstream sets `MaxAge(0)`).
    fn decode(&self, name: &str, id: &str) -> Result<SessionIdData, SessionIdError> {
        if id.len() > MAX_ID_LEN {
            return Err(SessionIdError::TooLong);
        }
        let b = URL_SAFE.decode(id).map_err(|_| SessionIdError::Encoding)?;
        let mut parts = b.splitn(3, |c| *c == b'|');
        let (Some(date), Some(value), Some(mac)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(SessionIdError::BadMac);
        };
        let signed_len = b.len() - mac.len() - 1;
        let mut signed = Vec::with_capacity(name.len() + 1 + signed_len);
        signed.extend_from_slice(name.as_bytes());
        signed.push(b'|');
        signed.extend_from_slice(&b[..signed_len]);
        hmac::verify(&self.hash, &signed, mac).map_err(|_| SessionIdError::BadMac)?;
        std::str::from_utf8(date)
            .ok()
            .and_then(|d| d.parse::<i64>().ok())
            .ok_or(SessionIdError::Malformed("timestamp"))?;
        let raw = URL_SAFE
            .decode(value)
            .map_err(|_| SessionIdError::Encoding)?;
        if raw.len() < 16 {
            return Err(SessionIdError::Malformed("too short"));
        }
        let (iv, ct) = raw.split_at(16);
        let mut plain = ct.to_vec();
        let iv: [u8; 16] = iv.try_into().map_err(|_| SessionIdError::Malformed("iv"))?;
        self.xor_ctr(iv, &mut plain)?;
        gob::decode(&plain)
    }

    /// The resume id (private: only the session's own client ever sees it).
    pub fn encode_private(
        &self,
        data: &SessionIdData,
        now_unix: i64,
    ) -> Result<String, SessionIdError> {
        self.encode(PRIVATE_NAME, data, now_unix)
    }

    pub fn decode_private(&self, id: &str) -> Result<SessionIdData, SessionIdError> {
        self.decode(PRIVATE_NAME, id)
    }

    /// The public session id, shown to everyone in the room.
    pub fn encode_public(
        &self,
        data: &SessionIdData,
        now_unix: i64,
    ) -> Result<String, SessionIdError> {
        reverse(&self.encode(PUBLIC_NAME, data, now_unix)?)
    }

    pub fn decode_public(&self, id: &str) -> Result<SessionIdData, SessionIdError> {
        if id.len() > MAX_ID_LEN {
            return Err(SessionIdError::TooLong);
        }
        self.decode(PUBLIC_NAME, &reverse(id)?)
    }
}

/// Upstream reverses the bytes of public ids so they do not share a prefix with resume ids.
fn reverse(id: &str) -> Result<String, SessionIdError> {
    let mut b = URL_SAFE.decode(id).map_err(|_| SessionIdError::Encoding)?;
    b.reverse();
    Ok(URL_SAFE.encode(b))
}

/// The part of Go's `encoding/gob` that `SessionIdData` needs: a struct of unsigned integers,
/// strings and opaque `GobEncoder` values (Go's `time.Time`), sent with its type definition.
mod gob {
    use super::{SessionIdData, SessionIdError};

    const UINT: i64 = 3;
    const STRING: i64 = 6;
    const BYTES: i64 = 5;
    /// Our one user type id (Go assigns user types ids from 64 on).
    const TYPE_ID: i64 = 65;

    fn put_uint(out: &mut Vec<u8>, x: u64) {
        if x < 128 {
            out.push(x as u8);
            return;
        }
        let bytes = x.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push((256 - (8 - skip)) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }

    fn put_int(out: &mut Vec<u8>, i: i64) {
        let u = if i < 0 {
            ((!i as u64) << 1) | 1
        } else {
            (i as u64) << 1
        };
        put_uint(out, u);
    }

    fn put_string(out: &mut Vec<u8>, s: &str) {
        put_uint(out, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }

    fn message(out: &mut Vec<u8>, body: &[u8]) {
        put_uint(out, body.len() as u64);
        out.extend_from_slice(body);
    }

    /// A type definition and one value, as `gob.NewEncoder(w).Encode(data)` writes them.
    pub fn encode(d: &SessionIdData) -> Vec<u8> {
        // wireType{StructT: &structType{CommonType{Name, Id}, Field: [{Sid uint}, {BackendId string}]}}
        let mut def = Vec::new();
        put_int(&mut def, -TYPE_ID);
        def.push(3); // field 2 of wireType: StructT
        def.push(1); // field 0 of structType: CommonType
        def.push(1);
        put_string(&mut def, "SessionIdData");
        def.push(1);
        put_int(&mut def, TYPE_ID);
        def.push(0);
        def.push(1); // field 1 of structType: Field
        put_uint(&mut def, 2);
        for (name, id) in [("Sid", UINT), ("BackendId", STRING)] {
            def.push(1);
            put_string(&mut def, name);
            def.push(1);
            put_int(&mut def, id);
            def.push(0);
        }
        def.push(0); // end of structType
        def.push(0); // end of wireType
        let mut value = Vec::new();
        put_int(&mut value, TYPE_ID);
        let mut delta = 1;
        if d.sid != 0 {
            value.push(delta);
            put_uint(&mut value, d.sid);
            delta = 1;
        } else {
            delta += 1;
        }
        if !d.backend_id.is_empty() {
            value.push(delta);
            put_string(&mut value, &d.backend_id);
        }
        value.push(0);
        let mut out = Vec::new();
        message(&mut out, &def);
        message(&mut out, &value);
        out
    }

    struct Reader<'a> {
        b: &'a [u8],
    }

    const BAD: SessionIdError = SessionIdError::Malformed("gob");

    impl<'a> Reader<'a> {
        fn byte(&mut self) -> Result<u8, SessionIdError> {
            let (&c, rest) = self.b.split_first().ok_or(BAD)?;
            self.b = rest;
            Ok(c)
        }
        fn uint(&mut self) -> Result<u64, SessionIdError> {
            let c = self.byte()?;
            if c < 128 {
                return Ok(u64::from(c));
            }
            let n = 256 - usize::from(c);
            if n > 8 || n > self.b.len() {
                return Err(BAD);
            }
            let mut x = 0u64;
            for _ in 0..n {
                x = (x << 8) | u64::from(self.byte()?);
            }
            Ok(x)
        }
        fn int(&mut self) -> Result<i64, SessionIdError> {
            let u = self.uint()?;
            Ok(if u & 1 == 1 {
                !((u >> 1) as i64)
            } else {
                (u >> 1) as i64
            })
        }
        fn bytes(&mut self) -> Result<&'a [u8], SessionIdError> {
            let n = usize::try_from(self.uint()?).map_err(|_| BAD)?;
            if n > self.b.len() {
                return Err(BAD);
            }
            let (s, rest) = self.b.split_at(n);
            self.b = rest;
            Ok(s)
        }
        fn string(&mut self) -> Result<String, SessionIdError> {
            String::from_utf8(self.bytes()?.to_vec()).map_err(|_| BAD)
        }
        /// Reads the fields of a struct as (index, reader positioned at its value) pairs.
        fn fields(
            &mut self,
            mut each: impl FnMut(i64, &mut Self) -> Result<(), SessionIdError>,
        ) -> Result<(), SessionIdError> {
            let mut index = -1i64;
            loop {
                let delta = self.uint()?;
                if delta == 0 {
                    return Ok(());
                }
                index = index
                    .checked_add(i64::try_from(delta).map_err(|_| BAD)?)
                    .ok_or(BAD)?;
                each(index, self)?;
            }
        }
    }

    /// Type id and name of a `CommonType`.
    fn common(r: &mut Reader<'_>) -> Result<(), SessionIdError> {
        r.fields(|i, r| match i {
            0 => r.string().map(|_| ()),
            1 => r.int().map(|_| ()),
            _ => Err(BAD),
        })
    }

    /// Decodes a stream of type definitions followed by one `SessionIdData` value.
    pub fn decode(mut b: &[u8]) -> Result<SessionIdData, SessionIdError> {
        // Field types by user type id: only struct fields of uint, string, bytes or opaque types.
        let mut structs: Vec<(i64, Vec<(String, i64)>)> = Vec::new();
        let mut opaque: Vec<i64> = Vec::new();
        for _ in 0..16 {
            let mut r = Reader { b };
            let len = usize::try_from(r.uint()?).map_err(|_| BAD)?;
            if len > r.b.len() {
                return Err(BAD);
            }
            let (msg, rest) = r.b.split_at(len);
            b = rest;
            let mut m = Reader { b: msg };
            let id = m.int()?;
            if id < 0 {
                let mut fields = Vec::new();
                let mut is_opaque = false;
                m.fields(|i, m| match i {
                    2 => m.fields(|j, m| match j {
                        0 => common(m),
                        1 => {
                            let n = m.uint()?;
                            for _ in 0..n.min(64) {
                                let (mut name, mut ty) = (String::new(), 0);
                                m.fields(|k, m| match k {
                                    0 => {
                                        name = m.string()?;
                                        Ok(())
                                    }
                                    1 => {
                                        ty = m.int()?;
                                        Ok(())
                                    }
                                    _ => Err(BAD),
                                })?;
                                fields.push((name, ty));
                            }
                            Ok(())
                        }
                        _ => Err(BAD),
                    }),
                    4..=6 => {
                        is_opaque = true;
                        m.fields(|j, m| if j == 0 { common(m) } else { Err(BAD) })
                    }
                    _ => Err(BAD),
                })?;
                if is_opaque {
                    opaque.push(-id);
                } else {
                    structs.push((-id, fields));
                }
                continue;
            }
            let fields = &structs.iter().find(|(t, _)| *t == id).ok_or(BAD)?.1;
            let mut data = SessionIdData {
                sid: 0,
                backend_id: String::new(),
            };
            m.fields(|i, m| {
                let (name, ty) = usize::try_from(i)
                    .ok()
                    .and_then(|i| fields.get(i))
                    .ok_or(BAD)?;
                match (name.as_str(), *ty) {
                    ("Sid", UINT) => data.sid = m.uint()?,
                    ("BackendId", STRING) => data.backend_id = m.string()?,
                    (_, UINT) => {
                        m.uint()?;
                    }
                    (_, STRING | BYTES) => {
                        m.bytes()?;
                    }
                    (_, t) if opaque.contains(&t) => {
                        m.bytes()?;
                    }
                    _ => return Err(BAD),
                }
                Ok(())
            })?;
            return Ok(data);
        }
        Err(BAD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> SessionIdCodec {
        SessionIdCodec::new(
            b"0123456789abcdef0123456789abcdef",
            b"abcdef0123456789abcdef0123456789",
        )
        .expect("keys")
    }

    fn data() -> SessionIdData {
        SessionIdData {
            sid: 1234567,
            backend_id: "nc1".into(),
        }
    }

    #[test]
    fn private_and_public_ids_round_trip_and_are_not_interchangeable() {
        let c = codec();
        let private = c.encode_private(&data(), 1_700_000_000).expect("encode");
        let public = c.encode_public(&data(), 1_700_000_000).expect("encode");
        assert_eq!(c.decode_private(&private), Ok(data()));
        assert_eq!(c.decode_public(&public), Ok(data()));
        assert!(c.decode_public(&private).is_err());
        assert!(c.decode_private(&public).is_err());
        assert_ne!(
            c.encode_public(&data(), 1_700_000_000).expect("encode"),
            public,
            "random iv"
        );
    }

    #[test]
    fn forged_or_other_key_ids_are_refused() {
        let c = codec();
        let id = c.encode_private(&data(), 1).expect("encode");
        let other = SessionIdCodec::new(
            b"another hash key of thirty-two b",
            b"abcdef0123456789abcdef0123456789",
        )
        .expect("keys");
        assert_eq!(other.decode_private(&id), Err(SessionIdError::BadMac));
        let mut raw = URL_SAFE.decode(&id).expect("b64");
        raw[3] ^= 1;
        assert!(c.decode_private(&URL_SAFE.encode(raw)).is_err());
        assert_eq!(
            c.decode_private("not base64!"),
            Err(SessionIdError::Encoding)
        );
        assert_eq!(
            c.decode_private(&"A".repeat(5000)),
            Err(SessionIdError::TooLong)
        );
    }

    #[test]
    fn gob_value_written_by_go_with_a_time_field_decodes() {
        // gob of SessionIdData{Sid: 300, Created: <GobEncoder bytes>, BackendId: "nc1"} with the
        // definitions Go sends: Time (opaque GobEncoder, id 66) and the struct (id 65).
        let mut s = Vec::new();
        let time_def: &[u8] = &[
            0xff, 0x83, 0x05, 0x01, 0x01, 0x04, b'T', b'i', b'm', b'e', 0x01, 0xff, 0x84, 0x00,
            0x00, 0x00,
        ];
        let struct_def: &[u8] = &[
            0xff, 0x81, 0x03, 0x01, 0x01, 0x0d, b'S', b'e', b's', b's', b'i', b'o', b'n', b'I',
            b'd', b'D', b'a', b't', b'a', 0x01, 0xff, 0x82, 0x00, 0x01, 0x03, 0x01, 0x03, b'S',
            b'i', b'd', 0x01, 0x06, 0x00, 0x01, 0x07, b'C', b'r', b'e', b'a', b't', b'e', b'd',
            0x01, 0xff, 0x84, 0x00, 0x01, 0x09, b'B', b'a', b'c', b'k', b'e', b'n', b'd', b'I',
            b'd', 0x01, 0x0c, 0x00, 0x00, 0x00,
        ];
        let value: &[u8] = &[
            0xff, 0x82, 0x01, 0xfe, 0x01, 0x2c, 0x01, 0x02, 0xaa, 0xbb, 0x01, 0x03, b'n', b'c',
            b'1', 0x00,
        ];
        for m in [time_def, struct_def, value] {
            s.push(m.len() as u8);
            s.extend_from_slice(m);
        }
        assert_eq!(
            gob::decode(&s),
            Ok(SessionIdData {
                sid: 300,
                backend_id: "nc1".into()
            })
        );
    }

    #[test]
    fn truncated_gob_is_an_error_not_a_panic() {
        let full = gob::encode(&data());
        for n in 0..full.len() {
            let _ = gob::decode(&full[..n]);
        }
        assert_eq!(gob::decode(&full), Ok(data()));
    }
}
