//! Hello v2: the JWT a Talk server signs for its users, checked with the public key Talk
//! publishes in its capabilities (`spreed.config.signaling.hello-v2-token-key`).
//!
//! The rules follow upstream `processHelloV2`: only public-key algorithms (RS256/384/512,
//! ES256/384, EdDSA), one minute of leeway, `iat` required and not in the future, `exp` required
//! and not before `iat`. A bad signature or shape is `invalid_token`; time problems are
//! `token_not_valid_yet` / `token_expired`, which the Talk client answers by fetching a fresh
//! token. Ed25519 keys arrive as raw base64, the others as PEM. Time is a parameter.

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::api::ApiError;

/// Allowed clock difference between Talk and us (upstream `tokenLeeway`).
pub const LEEWAY_S: i64 = 60;

/// Longest token accepted; Talk's are a few hundred bytes.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// What a valid token says about the user.
#[derive(Debug, Clone, PartialEq)]
pub struct HelloV2Claims {
    /// `sub`; empty for guests.
    pub user_id: String,
    pub user_data: Option<Value>,
}

pub fn invalid_token() -> ApiError {
    ApiError::new("invalid_token", "The passed token is invalid.")
}

fn decoding_key(alg: Algorithm, key_text: &str) -> Option<DecodingKey> {
    let pem = key_text.trim();
    match alg {
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => {
            DecodingKey::from_rsa_pem(pem.as_bytes()).ok()
        }
        Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem.as_bytes()).ok(),
        Algorithm::EdDSA if pem.starts_with("-----BEGIN ") => {
            DecodingKey::from_ed_pem(pem.as_bytes()).ok()
        }
        Algorithm::EdDSA => {
            let raw = base64::engine::general_purpose::STANDARD.decode(pem).ok()?;
            (raw.len() == 32).then(|| DecodingKey::from_ed_der(&raw))
        }
        _ => None,
    }
}

/// Checks a hello v2 token against the Talk server's public key at time `now_unix`.
pub fn verify(
    token: &str,
    key_text: Option<&str>,
    now_unix: i64,
) -> Result<HelloV2Claims, ApiError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(invalid_token());
    }
    let header = jsonwebtoken::decode_header(token).map_err(|_| invalid_token())?;
    let key_text = key_text.ok_or_else(invalid_token)?;
    let key = decoding_key(header.alg, key_text).ok_or_else(invalid_token)?;
    let mut validation = Validation::new(header.alg);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let data =
        jsonwebtoken::decode::<Value>(token, &key, &validation).map_err(|_| invalid_token())?;
    let claims = data.claims;
    let num = |name: &str| -> Result<Option<i64>, ApiError> {
        match claims.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_i64()
                .or_else(|| v.as_f64().map(|f| f as i64))
                .map(Some)
                .ok_or_else(invalid_token),
        }
    };
    let (iat, exp, nbf) = (num("iat")?, num("exp")?, num("nbf")?);
    let not_yet = || ApiError::new("token_not_valid_yet", "The token is not valid yet.");
    let expired = || ApiError::new("token_expired", "The token is expired.");
    if let Some(nbf) = nbf
        && nbf > now_unix + LEEWAY_S
    {
        return Err(not_yet());
    }
    let Some(iat) = iat else {
        return Err(not_yet());
    };
    if iat > now_unix + LEEWAY_S {
        return Err(not_yet());
    }
    match exp {
        Some(exp) if exp < iat => return Err(expired()),
        Some(exp) if exp >= now_unix - LEEWAY_S => {}
        _ => return Err(expired()),
    }
    let user_id = match claims.get("sub") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(invalid_token()),
    };
    Ok(HelloV2Claims {
        user_id,
        user_data: claims.get("userdata").cloned().filter(|v| !v.is_null()),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    /// (private PKCS#8 PEM, public key text as Talk publishes it) for an algorithm.
    pub(crate) fn key_pair(alg: Algorithm) -> (EncodingKey, String) {
        match alg {
            Algorithm::EdDSA => {
                let kp = Ed25519KeyPair::generate().expect("ed25519");
                let pkcs8 = kp.to_pkcs8().expect("pkcs8");
                let public =
                    base64::engine::general_purpose::STANDARD.encode(kp.public_key().as_ref());
                (EncodingKey::from_ed_der(pkcs8.as_ref()), public)
            }
            Algorithm::ES256 => {
                let kp =
                    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("p256");
                (
                    EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).expect("ec"),
                    kp.public_key_pem(),
                )
            }
            Algorithm::ES384 => {
                let kp =
                    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("p384");
                (
                    EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).expect("ec"),
                    kp.public_key_pem(),
                )
            }
            _ => {
                let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("rsa");
                (
                    EncodingKey::from_rsa_pem(kp.serialize_pem().as_bytes()).expect("rsa"),
                    kp.public_key_pem(),
                )
            }
        }
    }

    fn token(alg: Algorithm, key: &EncodingKey, claims: Value) -> String {
        jsonwebtoken::encode(&Header::new(alg), &claims, key).expect("sign")
    }

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn every_algorithm_talk_uses_is_accepted() {
        for alg in [
            Algorithm::ES256,
            Algorithm::ES384,
            Algorithm::EdDSA,
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
        ] {
            let (k, public) = key_pair(alg);
            let t = token(
                alg,
                &k,
                json!({"iss":"https://nc/","iat":NOW,"exp":NOW+60,"sub":"alice","userdata":{"displayname":"Alice"}}),
            );
            let c = verify(&t, Some(&public), NOW).unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            assert_eq!(c.user_id, "alice");
            assert_eq!(c.user_data, Some(json!({"displayname":"Alice"})));
        }
    }

    #[test]
    fn guest_token_has_no_subject() {
        let (k, public) = key_pair(Algorithm::ES256);
        let t = token(Algorithm::ES256, &k, json!({"iat":NOW,"exp":NOW+60}));
        assert_eq!(verify(&t, Some(&public), NOW).expect("valid").user_id, "");
    }

    #[test]
    fn each_failure_mode_has_its_error_code() {
        let (k, public) = key_pair(Algorithm::ES256);
        let (_, other_public) = key_pair(Algorithm::ES256);
        let code = |claims: Value, key: Option<&str>| {
            verify(&token(Algorithm::ES256, &k, claims), key, NOW)
                .expect_err("refused")
                .code
        };
        assert_eq!(
            code(json!({"iat":NOW,"exp":NOW+60}), Some(&other_public)),
            "invalid_token"
        );
        assert_eq!(code(json!({"iat":NOW,"exp":NOW+60}), None), "invalid_token");
        assert_eq!(
            code(json!({"exp":NOW+60}), Some(&public)),
            "token_not_valid_yet"
        );
        assert_eq!(
            code(json!({"iat":NOW+120,"exp":NOW+180}), Some(&public)),
            "token_not_valid_yet"
        );
        assert_eq!(
            code(json!({"iat":NOW,"exp":NOW+60,"nbf":NOW+120}), Some(&public)),
            "token_not_valid_yet"
        );
        assert_eq!(
            code(json!({"iat":NOW-200,"exp":NOW-61}), Some(&public)),
            "token_expired"
        );
        assert_eq!(code(json!({"iat":NOW}), Some(&public)), "token_expired");
        assert_eq!(
            code(json!({"iat":NOW,"exp":NOW-10}), Some(&public)),
            "token_expired"
        );
        assert_eq!(
            code(json!({"iat":NOW,"exp":NOW+60,"sub":5}), Some(&public)),
            "invalid_token"
        );
        assert_eq!(
            verify("a.b.c", Some(&public), NOW)
                .expect_err("garbage")
                .code,
            "invalid_token"
        );
        assert_eq!(
            verify(&"x".repeat(MAX_TOKEN_LEN + 1), Some(&public), NOW)
                .expect_err("long")
                .code,
            "invalid_token"
        );
    }

    #[test]
    fn leeway_of_one_minute_applies_both_ways() {
        let (k, public) = key_pair(Algorithm::ES256);
        let t = token(Algorithm::ES256, &k, json!({"iat":NOW+50,"exp":NOW+110}));
        verify(&t, Some(&public), NOW).expect("iat 50 s ahead is within leeway");
        let t = token(Algorithm::ES256, &k, json!({"iat":NOW-100,"exp":NOW-50}));
        verify(&t, Some(&public), NOW).expect("expired 50 s ago is within leeway");
    }

    #[test]
    fn symmetric_algorithms_are_refused() {
        let k = EncodingKey::from_secret(b"secret");
        let t = token(Algorithm::HS256, &k, json!({"iat":NOW,"exp":NOW+60}));
        assert_eq!(
            verify(&t, Some("secret"), NOW).expect_err("hs256").code,
            "invalid_token"
        );
    }
}
