//! talkbox provisioning: signed bundles, engineer keys, enrolment tokens, and the engineer's
//! CLI `talkbox-provision` (feature `cli`).
//!
//! Everything here is sans-I/O except the CLI: a bundle is checked by [`bundle::open`] with the
//! trusted keys, the box id, the last serial and the time as parameters, so every refusal is a
//! deterministic unit test. The box side (where bundles come from, try-and-revert, audit log,
//! the push listener) lives in the appliance (`appliance/src/provision/`), which also validates
//! the bundle's config with its own loader before anything is written.

pub mod bundle;
pub mod key;
pub mod time;
pub mod token;

#[cfg(feature = "cli")]
pub mod push;

pub use bundle::{Payload, Policy, Refusal, Verified};
pub use key::{EngineerKey, EngineerSecret, fingerprint_of};

/// A box's id from its identity key's SubjectPublicKeyInfo: `tb-` and the first 20 hex digits
/// of its SHA-256. Stable for as long as the box keeps its identity key.
pub fn identity_id(spki_der: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki_der);
    format!("tb-{}", &hex::encode(d)[..20])
}

/// The name the push API's client and server use in the box certificate.
pub const BOX_CERT_NAME: &str = "talkbox-provisioning";

/// Path of the push API.
pub const PUSH_PATH: &str = "/v1/provision";
/// Header carrying the enrolment token.
pub const TOKEN_HEADER: &str = "x-talkbox-enrolment-token";
