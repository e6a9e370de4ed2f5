//! REST-credential authentication in front of the engine: which secret signed a request, and
//! whether its username is still valid.
//!
//! The engine (`turn-server-proto`) only knows a static table of username → password and owns
//! realm and nonces (issued per client address, expiring after `turn.nonce_lifetime_s`, answered
//! with 438 when stale). So for every signed request this module peeks at USERNAME, checks the
//! expiry, and finds which secret — the current one or the previous one kept for rotation — makes
//! MESSAGE-INTEGRITY verify. Only then is the password handed to the engine, which performs the
//! RFC 8489 checks itself. A username whose check fails never enters the engine's table, so a
//! client cannot grow it with made-up names.

use stun_proto::types::attribute::{
    AttributeStaticType, MessageIntegrity, MessageIntegritySha256, Username,
};
use stun_proto::types::message::{
    IntegrityAlgorithm, LongTermCredentials, Message, MessageIntegrityCredentials,
};
use turn_server_proto::stun as stun_proto;

use super::credentials::{self, UsernameError};

/// The result of looking at one request's credentials.
#[derive(Debug)]
pub enum AuthCheck {
    /// No MESSAGE-INTEGRITY: the engine answers with 401, realm and nonce (or it is an
    /// unauthenticated method such as Binding).
    Unsigned,
    /// A live REST username whose password under one of the secrets verifies the message.
    Valid(ValidCredential),
    /// Signed, but not acceptable; the engine must answer 401 (or 438 if the nonce is stale).
    Invalid {
        username: Option<String>,
        reason: &'static str,
    },
}

/// A verified credential: what the engine needs, and the key to sign our own answers with.
#[derive(Debug, Clone)]
pub struct ValidCredential {
    pub username: String,
    pub password: String,
    pub expiry: u64,
    pub key: MessageIntegrityCredentials,
    pub algorithm: IntegrityAlgorithm,
}

/// The shared secrets and realm.
pub struct RestAuth {
    realm: String,
    secrets: Vec<String>,
}

impl std::fmt::Debug for RestAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secrets.
        f.debug_struct("RestAuth")
            .field("realm", &self.realm)
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl RestAuth {
    /// `current` first; `previous` (after a rotation) is still accepted.
    pub fn new(realm: String, current: String, previous: Option<String>) -> Self {
        let mut secrets = vec![current];
        secrets.extend(previous);
        Self { realm, secrets }
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// A password for `username` that no client can know (it needs the secret, and is not the
    /// REST password); what the engine gets for a credential that must stop working.
    pub fn revoked_password(&self, username: &str) -> String {
        let key = format!(
            "{}\0revoked",
            self.secrets.first().map(String::as_str).unwrap_or("")
        );
        credentials::password_for(&key, username)
    }

    /// Checks a request's credentials at wall-clock time `now_unix`.
    pub fn check(&self, msg: &Message<'_>, now_unix: u64) -> AuthCheck {
        if !msg.has_attribute(MessageIntegrity::TYPE)
            && !msg.has_attribute(MessageIntegritySha256::TYPE)
        {
            return AuthCheck::Unsigned;
        }
        let Ok(user) = msg.attribute::<Username>() else {
            return AuthCheck::Invalid {
                username: None,
                reason: "auth_no_username",
            };
        };
        let username = user.username().to_string();
        let expiry = match credentials::expiry_of(&username, now_unix) {
            Ok(e) => e,
            Err(UsernameError::Expired) => {
                return AuthCheck::Invalid {
                    username: Some(username),
                    reason: "auth_expired",
                };
            }
            Err(UsernameError::Malformed) => {
                return AuthCheck::Invalid {
                    username: Some(username),
                    reason: "auth_malformed_username",
                };
            }
        };
        for secret in &self.secrets {
            let password = credentials::password_for(secret, &username);
            let key: MessageIntegrityCredentials =
                LongTermCredentials::new(username.clone(), password.clone())
                    .to_key(self.realm.clone())
                    .into();
            if let Ok(algorithm) = msg.validate_integrity(&key) {
                return AuthCheck::Valid(ValidCredential {
                    username,
                    password,
                    expiry,
                    key,
                    algorithm,
                });
            }
        }
        AuthCheck::Invalid {
            username: Some(username),
            reason: "auth_bad_hmac",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun_proto::types::attribute::{Nonce, Realm};
    use stun_proto::types::message::{MessageWrite, MessageWriteExt, MessageWriteVec};
    use turn_server_proto::types::message::ALLOCATE;

    fn signed(username: &str, password: &str, realm: &str) -> Vec<u8> {
        let mut m = Message::builder_request(ALLOCATE, MessageWriteVec::new());
        m.add_attribute(&Username::new(username).expect("username"))
            .expect("add");
        m.add_attribute(&Realm::new(realm).expect("realm"))
            .expect("add");
        m.add_attribute(&Nonce::new("n0nce").expect("nonce"))
            .expect("add");
        let key: MessageIntegrityCredentials =
            LongTermCredentials::new(username.into(), password.into())
                .to_key(realm.into())
                .into();
        m.add_message_integrity(&key, IntegrityAlgorithm::Sha1)
            .expect("integrity");
        m.finish()
    }

    fn check(auth: &RestAuth, bytes: &[u8], now: u64) -> AuthCheck {
        let msg = Message::from_bytes(bytes).expect("parse");
        auth.check(&msg, now)
    }

    #[test]
    fn current_and_previous_secret_are_accepted() {
        let auth = RestAuth::new("r".into(), "new-secret".into(), Some("old-secret".into()));
        for secret in ["new-secret", "old-secret"] {
            let (u, p) = credentials::rest_credentials(secret, "alice", 60, 1000);
            match check(&auth, &signed(&u, &p, "r"), 1000) {
                AuthCheck::Valid(v) => assert_eq!((v.username, v.password), (u, p)),
                other => panic!("{secret}: {other:?}"),
            }
        }
    }

    #[test]
    fn expired_wrong_hmac_and_unknown_secret_are_invalid() {
        let auth = RestAuth::new("r".into(), "s".into(), None);
        let (u, p) = credentials::rest_credentials("s", "alice", 60, 1000);
        assert!(matches!(
            check(&auth, &signed(&u, &p, "r"), 1060),
            AuthCheck::Invalid {
                reason: "auth_expired",
                ..
            }
        ));
        assert!(matches!(
            check(&auth, &signed(&u, "AAAA", "r"), 1000),
            AuthCheck::Invalid {
                reason: "auth_bad_hmac",
                ..
            }
        ));
        let (u, p) = credentials::rest_credentials("other", "alice", 60, 1000);
        assert!(matches!(
            check(&auth, &signed(&u, &p, "r"), 1000),
            AuthCheck::Invalid {
                reason: "auth_bad_hmac",
                ..
            }
        ));
        assert!(matches!(
            check(&auth, &signed("alice", "x", "r"), 1000),
            AuthCheck::Invalid {
                reason: "auth_malformed_username",
                ..
            }
        ));
    }

    #[test]
    fn unsigned_requests_go_to_the_engine() {
        let m = Message::builder_request(ALLOCATE, MessageWriteVec::new()).finish();
        let auth = RestAuth::new("r".into(), "s".into(), None);
        assert!(matches!(check(&auth, &m, 0), AuthCheck::Unsigned));
    }
}
