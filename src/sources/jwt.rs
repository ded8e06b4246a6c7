//! Just enough JWT: read the `exp` and `aud` claims without verifying the
//! signature (the receiving service verifies it), sign the RS256 assertions
//! a service-account key exchanges for tokens, and sign (HS256) and verify
//! (RS256) tokens in the emulator.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

/// Why a JWT could not be read. The messages never quote the token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not `header.payload.signature`.
    #[error("not a JWT (expected three dot-separated parts)")]
    Shape,
    /// A part is not unpadded base64url.
    #[error("JWT {0} is not base64url")]
    Encoding(&'static str),
    /// The payload is not a JSON object with the claims we need.
    #[error("JWT payload is not a JSON object with a numeric `exp` claim")]
    Claims,
    /// The header is not `{"alg": "RS256", "kid": …}` JSON.
    #[error("JWT header is not JSON with alg RS256 and a kid")]
    Header,
    /// The signature does not verify with the key.
    #[error("JWT signature does not verify")]
    Signature,
    /// The private key refused to sign.
    #[error("cannot sign the JWT with the key")]
    Signing,
}

/// The claims the broker relies on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// Expiry, seconds since the Unix epoch.
    pub exp: i64,
    /// The audiences the token is for (`aud` may be a string or a list).
    pub aud: Vec<String>,
}

#[derive(Deserialize)]
struct RawClaims {
    exp: i64,
    #[serde(default)]
    aud: Audience,
}

#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Audience {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

/// Reads the claims of a compact JWT without checking its signature.
pub fn decode_claims(jwt: &str) -> Result<Claims, JwtError> {
    let mut parts = jwt.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Shape);
    };
    for (name, part) in [("header", header), ("signature", signature)] {
        if part.is_empty() || !part.bytes().all(is_base64url) {
            return Err(JwtError::Encoding(name));
        }
    }
    let payload = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| JwtError::Encoding("payload"))?;
    let raw: RawClaims = serde_json::from_slice(&payload).map_err(|_| JwtError::Claims)?;
    let aud = match raw.aud {
        Audience::None => Vec::new(),
        Audience::One(aud) => vec![aud],
        Audience::Many(auds) => auds,
    };
    Ok(Claims { exp: raw.exp, aud })
}

fn is_base64url(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_'
}

/// Signs `claims` as an HS256 JWT with `key` (used by the emulator).
pub fn sign_hs256(claims: &serde_json::Value, key: &[u8]) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{payload}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let signature = URL_SAFE_NO_PAD.encode(ring::hmac::sign(&key, signing_input.as_bytes()));
    format!("{signing_input}.{signature}")
}

/// Signs `claims` as an RS256 JWT whose header names `key_id` (`kid`).
pub fn sign_rs256(
    claims: &serde_json::Value,
    key_id: &str,
    key: &ring::rsa::KeyPair,
) -> Result<String, JwtError> {
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": key_id});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        signing_input.as_bytes(),
        &mut signature,
    )
    .map_err(|_| JwtError::Signing)?;
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature)
    ))
}

/// The `kid` of an RS256 JWT, read before its signature is checked (to
/// pick the key to check it with).
pub fn rs256_key_id(jwt: &str) -> Result<String, JwtError> {
    let header = jwt.split('.').next().ok_or(JwtError::Shape)?;
    let header = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| JwtError::Encoding("header"))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|_| JwtError::Header)?;
    if header["alg"] != "RS256" {
        return Err(JwtError::Header);
    }
    header["kid"]
        .as_str()
        .map(str::to_string)
        .ok_or(JwtError::Header)
}

/// Verifies an RS256 JWT with an RSA public key (PKCS#1 `RSAPublicKey`
/// DER) and returns its claims.
pub fn verify_rs256(jwt: &str, public_key: &[u8]) -> Result<serde_json::Value, JwtError> {
    rs256_key_id(jwt)?;
    let (signing_input, signature) = jwt.rsplit_once('.').ok_or(JwtError::Shape)?;
    let (_, payload) = signing_input.split_once('.').ok_or(JwtError::Shape)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| JwtError::Encoding("signature"))?;
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        public_key,
    )
    .verify(signing_input.as_bytes(), &signature)
    .map_err(|_| JwtError::Signature)?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| JwtError::Encoding("payload"))?;
    let claims: serde_json::Value =
        serde_json::from_slice(&payload).map_err(|_| JwtError::Claims)?;
    if !claims.is_object() {
        return Err(JwtError::Claims);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_exp_and_audience_of_a_signed_token() {
        let jwt = sign_hs256(
            &json!({"exp": 1_900_000_000, "aud": "https://a.run.app"}),
            b"k",
        );
        let claims = decode_claims(&jwt).unwrap();
        assert_eq!(claims.exp, 1_900_000_000);
        assert_eq!(claims.aud, vec!["https://a.run.app".to_string()]);
    }

    fn test_key(index: usize) -> ring::rsa::KeyPair {
        use rustls::pki_types::PrivatePkcs8KeyDer;
        use rustls::pki_types::pem::PemObject;
        let pem = [
            include_str!("../../tests/fixtures/test-only-key-1.pem"),
            include_str!("../../tests/fixtures/test-only-key-2.pem"),
        ][index];
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).unwrap();
        ring::rsa::KeyPair::from_pkcs8(der.secret_pkcs8_der()).unwrap()
    }

    #[test]
    fn rs256_tokens_verify_only_with_their_key() {
        use ring::signature::KeyPair;
        let (key, other) = (test_key(0), test_key(1));
        let claims = json!({"iss": "a@b.c", "exp": 1});
        let signed = sign_rs256(&claims, "kid-1", &key).unwrap();
        let verified = verify_rs256(&signed, key.public_key().as_ref()).unwrap();
        assert_eq!(verified, claims);
        assert_eq!(rs256_key_id(&signed), Ok("kid-1".to_string()));
        assert_eq!(
            verify_rs256(&signed, other.public_key().as_ref()).unwrap_err(),
            JwtError::Signature
        );
        let forged = signed.replacen(
            signed.split('.').nth(1).unwrap(),
            &URL_SAFE_NO_PAD.encode(r#"{"iss":"evil@b.c","exp":1}"#),
            1,
        );
        assert_eq!(
            verify_rs256(&forged, key.public_key().as_ref()).unwrap_err(),
            JwtError::Signature
        );
        let hs256 = sign_hs256(&claims, b"k");
        assert_eq!(rs256_key_id(&hs256), Err(JwtError::Header));
    }

    #[test]
    fn accepts_a_list_of_audiences() {
        let jwt = sign_hs256(&json!({"exp": 1, "aud": ["a", "b"]}), b"k");
        assert_eq!(decode_claims(&jwt).unwrap().aud, vec!["a", "b"]);
    }

    #[test]
    fn rejects_what_is_not_a_jwt_with_exp() {
        let no_exp = sign_hs256(&json!({"aud": "a"}), b"k");
        let string_exp = sign_hs256(&json!({"exp": "soon"}), b"k");
        assert_eq!(decode_claims(&no_exp), Err(JwtError::Claims));
        assert_eq!(decode_claims(&string_exp), Err(JwtError::Claims));
        assert_eq!(decode_claims("garbage"), Err(JwtError::Shape));
        assert_eq!(decode_claims("a.b.c.d"), Err(JwtError::Shape));
        assert_eq!(decode_claims("a.!!!.c"), Err(JwtError::Encoding("payload")));
        assert_eq!(decode_claims(".e30.c"), Err(JwtError::Encoding("header")));
        assert_eq!(decode_claims("a.e30.c"), Err(JwtError::Claims));
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,600}") {
            let _ = decode_claims(&text);
        }

        #[test]
        fn arbitrary_parts_never_panic(
            header in "[A-Za-z0-9_-]{0,40}",
            payload in proptest::collection::vec(any::<u8>(), 0..200),
            signature in "[A-Za-z0-9_-]{0,40}",
        ) {
            let jwt = format!("{header}.{}.{signature}", URL_SAFE_NO_PAD.encode(payload));
            let _ = decode_claims(&jwt);
        }

        #[test]
        fn signed_claims_read_back(exp in any::<i64>(), aud in ".{0,100}") {
            let jwt = sign_hs256(&json!({"exp": exp, "aud": aud.clone()}), b"key");
            let claims = decode_claims(&jwt).unwrap();
            prop_assert_eq!(claims.exp, exp);
            prop_assert_eq!(claims.aud, vec![aud]);
        }
    }
}
