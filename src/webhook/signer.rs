//! Standard Webhooks signatures: `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`.
//!
//! `webhook_secret` holds one `whsec_<base64 key>`, or several separated by spaces while a key is
//! rotated: every key signs, and the header lists the signatures space-separated, so receivers
//! holding either the old or the new key accept the delivery.

use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Why a `webhook_secret` cannot be used. Never carries the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("each secret must be whsec_ followed by a base64 key")]
    Format,
    #[error("a secret's key must be between 24 and 64 bytes")]
    Length,
}

/// Signs delivery bodies with one or more keys.
#[derive(Clone)]
pub struct Signer {
    keys: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({} keys)", self.keys.len())
    }
}

impl Signer {
    /// Parses `whsec_<base64>` secrets separated by whitespace.
    pub fn parse(secrets: &str) -> Result<Self, SecretError> {
        let keys = secrets
            .split_whitespace()
            .map(|secret| {
                let key = secret
                    .strip_prefix("whsec_")
                    .and_then(|b64| STANDARD.decode(b64).ok())
                    .ok_or(SecretError::Format)?;
                if !(24..=64).contains(&key.len()) {
                    return Err(SecretError::Length);
                }
                Ok(key)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(SecretError::Format);
        }
        Ok(Self { keys })
    }

    /// The `webhook-signature` header value for one attempt.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut header = String::new();
        for key in &self.keys {
            let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            if !header.is_empty() {
                header.push(' ');
            }
            header.push_str("v1,");
            header.push_str(&STANDARD.encode(mac.finalize().into_bytes()));
        }
        header
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTOR_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const VECTOR_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const VECTOR_TS: i64 = 1_614_265_330;
    const VECTOR_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const VECTOR_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn reproduces_the_standard_webhooks_test_vector() {
        let signer = Signer::parse(VECTOR_SECRET).unwrap();
        assert_eq!(
            signer.sign(VECTOR_ID, VECTOR_TS, VECTOR_BODY),
            VECTOR_SIGNATURE
        );
        // Any other id, time or body gives another signature.
        assert_ne!(
            signer.sign("msg_other", VECTOR_TS, VECTOR_BODY),
            VECTOR_SIGNATURE
        );
        assert_ne!(
            signer.sign(VECTOR_ID, VECTOR_TS + 1, VECTOR_BODY),
            VECTOR_SIGNATURE
        );
        assert_ne!(signer.sign(VECTOR_ID, VECTOR_TS, b"{}"), VECTOR_SIGNATURE);
    }

    #[test]
    fn two_secrets_give_two_signatures_for_rotation() {
        let other = format!("whsec_{}", STANDARD.encode([7u8; 32]));
        let signer = Signer::parse(&format!("{other}  {VECTOR_SECRET}")).unwrap();
        let header = signer.sign(VECTOR_ID, VECTOR_TS, VECTOR_BODY);
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert!(parts[0].starts_with("v1,") && parts[0] != VECTOR_SIGNATURE);
        assert_eq!(parts[1], VECTOR_SIGNATURE);
    }

    #[test]
    fn refuses_unusable_secrets() {
        assert_eq!(Signer::parse("").unwrap_err(), SecretError::Format);
        assert_eq!(
            Signer::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_err(),
            SecretError::Format
        );
        assert_eq!(
            Signer::parse("whsec_not base64!").unwrap_err(),
            SecretError::Format
        );
        assert_eq!(
            Signer::parse("whsec_c2hvcnQ=").unwrap_err(),
            SecretError::Length
        );
        assert!(!format!("{:?}", Signer::parse(VECTOR_SECRET).unwrap()).contains("MfKQ"));
    }
}
