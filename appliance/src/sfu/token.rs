//! The hello token of the proxy protocol: an RS256/384/512 JWT whose `iss` names the key that
//! signed it (upstream `[tokens] <id> = pubkey.pem`). Rules follow upstream `parseToken`: RSA
//! algorithms only, `iat` required and at most five minutes (plus one minute of leeway) old and
//! not in the future, `exp`/`nbf` checked when present. Time is a parameter.

use std::collections::HashMap;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::protocol::errors;

/// Allowed clock difference.
pub const LEEWAY_S: i64 = 60;
/// Oldest `iat` accepted (upstream `maxTokenAge`).
pub const MAX_AGE_S: i64 = 300;
/// Longest token accepted.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// The public keys the SFU trusts, by token id.
#[derive(Clone, Default)]
pub struct TokenKeys {
    keys: HashMap<String, DecodingKey>,
}

impl TokenKeys {
    /// Adds a key from its PEM text; an error names what is wrong.
    pub fn add_pem(&mut self, id: &str, pem: &str) -> Result<(), String> {
        let key = DecodingKey::from_rsa_pem(pem.as_bytes())
            .map_err(|e| format!("token key {id:?} is not an RSA public key in PEM: {e}"))?;
        self.keys.insert(id.to_string(), key);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks a hello token at `now_unix`; returns the issuer or the upstream error.
    pub fn verify(
        &self,
        token: &str,
        now_unix: i64,
    ) -> Result<String, (&'static str, &'static str)> {
        let fail = errors::AUTH_FAILED;
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(fail);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| fail)?;
        if !matches!(
            header.alg,
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512
        ) {
            return Err(fail);
        }
        // The issuer picks the key, so read it before the signature can be checked.
        let issuer = unverified_issuer(token).ok_or(fail)?;
        let key = self.keys.get(&issuer).ok_or(fail)?;
        let mut v = Validation::new(header.alg);
        v.validate_exp = false;
        v.validate_nbf = false;
        v.validate_aud = false;
        v.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<Value>(token, key, &v).map_err(|_| fail)?;
        let claims = data.claims;
        let num = |name: &str| claims.get(name).and_then(Value::as_i64);
        let Some(iat) = num("iat") else {
            return Err(errors::TOKEN_EXPIRED);
        };
        if iat > now_unix + LEEWAY_S {
            return Err(errors::TOKEN_NOT_VALID_YET);
        }
        if iat < now_unix - MAX_AGE_S - LEEWAY_S {
            return Err(errors::TOKEN_EXPIRED);
        }
        if num("nbf").is_some_and(|nbf| nbf > now_unix + LEEWAY_S) {
            return Err(errors::TOKEN_NOT_VALID_YET);
        }
        if num("exp").is_some_and(|exp| exp < now_unix - LEEWAY_S) {
            return Err(errors::TOKEN_EXPIRED);
        }
        Ok(issuer)
    }
}

fn unverified_issuer(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.get("iss")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    fn keys() -> (EncodingKey, String) {
        let d = tempfile::tempdir().expect("tempdir");
        let data = crate::config::DataDir::new(d.path());
        crate::secrets::ensure_all(&data).expect("secrets");
        let (private, public) = crate::secrets::proxy_token_keys(&data).expect("keys");
        (
            EncodingKey::from_rsa_pem(private.as_bytes()).expect("private key"),
            public,
        )
    }

    fn token(key: &EncodingKey, claims: Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, key).expect("sign")
    }

    #[test]
    fn hello_tokens_are_checked_for_issuer_signature_and_age() {
        let (enc, public) = keys();
        let mut k = TokenKeys::default();
        k.add_pem("talkbox-signaling", &public).expect("public key");
        let now = 1_800_000_000;
        let good = token(
            &enc,
            serde_json::json!({"iss":"talkbox-signaling","iat":now}),
        );
        assert_eq!(k.verify(&good, now).as_deref(), Ok("talkbox-signaling"));
        let other = token(&enc, serde_json::json!({"iss":"someone-else","iat":now}));
        assert_eq!(k.verify(&other, now), Err(errors::AUTH_FAILED));
        let old = token(
            &enc,
            serde_json::json!({"iss":"talkbox-signaling","iat":now - 400}),
        );
        assert_eq!(k.verify(&old, now), Err(errors::TOKEN_EXPIRED));
        let future = token(
            &enc,
            serde_json::json!({"iss":"talkbox-signaling","iat":now + 120}),
        );
        assert_eq!(k.verify(&future, now), Err(errors::TOKEN_NOT_VALID_YET));
        let no_iat = token(&enc, serde_json::json!({"iss":"talkbox-signaling"}));
        assert!(k.verify(&no_iat, now).is_err());
        // Change one signature character well inside the last segment.
        let mut forged = good.clone().into_bytes();
        let at = forged.len() - 20;
        forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).expect("ascii");
        assert_eq!(k.verify(&forged, now), Err(errors::AUTH_FAILED));
        assert_eq!(k.verify("garbage", now), Err(errors::AUTH_FAILED));
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"iss":"talkbox-signaling","iat":now}),
            &EncodingKey::from_secret(b"k"),
        )
        .expect("hs");
        assert_eq!(k.verify(&hs, now), Err(errors::AUTH_FAILED));
    }
}
