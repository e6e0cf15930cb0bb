//! Signed answers: an HMAC proves which agent wrote a result.
//!
//! A card may name an environment variable that holds its secret (`secret_env`). Every
//! `RESULT`, `FAILED` or `HUMAN_DECISION` that answers a step of such a card must then carry the
//! header [`SIGNATURE_HEADER`]: the hex HMAC-SHA256, keyed with the card's secret, of
//!
//! ```text
//! switchyard-v1\n<task_id>\n<step_id>\n<attempt>\n<hex SHA-256 of the record's value bytes>
//! ```
//!
//! (`step_id` and `attempt` as the event states them, empty when absent). Signing the value's
//! bytes as they travel needs no canonical form of the payload, so an agent in any language can
//! sign. The router checks the signature before it decides; `switchyard agent` signs everything
//! it publishes when its card has a secret. Secrets are never printed: [`Secret`]'s `Debug` is
//! redacted.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use rdkafka::message::{Header, OwnedHeaders};
use sha2::{Digest, Sha256};

/// The header that carries a result's signature.
pub const SIGNATURE_HEADER: &str = "switchyard.signature";

/// A card's signing secret, read from the environment.
#[derive(Clone)]
pub struct Secret(Arc<[u8]>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// A secret from its bytes.
    pub fn new(bytes: impl AsRef<[u8]>) -> Self {
        Self(Arc::from(bytes.as_ref()))
    }

    /// The secret held by environment variable `var`, if it is set and not empty.
    pub fn from_env(var: &str) -> Option<Self> {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(|v| Self::new(v.as_encoded_bytes()))
    }

    fn mac(
        &self,
        task_id: &str,
        step_id: Option<u32>,
        attempt: Option<u32>,
        value: &[u8],
    ) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        let number = |n: Option<u32>| n.map(|n| n.to_string()).unwrap_or_default();
        let message = format!(
            "switchyard-v1\n{task_id}\n{}\n{}\n{}",
            number(step_id),
            number(attempt),
            sha256_hex(value)
        );
        mac.update(message.as_bytes());
        mac
    }

    /// The signature of an answer to (`task_id`, `step_id`, `attempt`) whose record value is
    /// `value`, as hex.
    pub fn sign(
        &self,
        task_id: &str,
        step_id: Option<u32>,
        attempt: Option<u32>,
        value: &[u8],
    ) -> String {
        hex::encode(
            self.mac(task_id, step_id, attempt, value)
                .finalize()
                .into_bytes(),
        )
    }

    /// The headers that sign an answer: [`SIGNATURE_HEADER`] with [`Secret::sign`]'s signature.
    pub fn headers(
        &self,
        task_id: &str,
        step_id: Option<u32>,
        attempt: Option<u32>,
        value: &[u8],
    ) -> OwnedHeaders {
        let signature = self.sign(task_id, step_id, attempt, value);
        OwnedHeaders::new().insert(Header {
            key: SIGNATURE_HEADER,
            value: Some(&signature),
        })
    }

    /// Whether `signature` (hex) is this secret's signature of the answer (compared in constant
    /// time).
    pub fn verify(
        &self,
        task_id: &str,
        step_id: Option<u32>,
        attempt: Option<u32>,
        value: &[u8],
        signature: &[u8],
    ) -> bool {
        let Ok(bytes) = hex::decode(signature) else {
            return false;
        };
        self.mac(task_id, step_id, attempt, value)
            .verify_slice(&bytes)
            .is_ok()
    }
}

/// The hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The secrets of the cards that declare one, by card name. `None` marks a card whose
/// `secret_env` is not set in this process: the router refuses to start without it, replay
/// reports the signatures it could not check.
#[derive(Debug, Clone, Default)]
pub struct Secrets(HashMap<String, Option<Secret>>);

impl Secrets {
    /// Records `card`'s secret (or that it is missing).
    pub fn insert(&mut self, card: &str, secret: Option<Secret>) {
        self.0.insert(card.to_string(), secret);
    }

    /// What `card` needs: `None` if it signs nothing, `Some(None)` if its secret is missing here.
    pub fn get(&self, card: &str) -> Option<Option<&Secret>> {
        self.0.get(card).map(Option::as_ref)
    }

    /// The cards whose secret is declared but not set here, sorted.
    pub fn missing(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self
            .0
            .iter()
            .filter(|(_, s)| s.is_none())
            .map(|(c, _)| c.as_str())
            .collect();
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_with_its_secret_and_its_bytes() {
        let secret = Secret::new("s3cret");
        let sig = secret.sign("t", Some(2), Some(1), b"{\"a\":1}");
        assert!(secret.verify("t", Some(2), Some(1), b"{\"a\":1}", sig.as_bytes()));
        assert!(!secret.verify("t", Some(2), Some(1), b"{\"a\":2}", sig.as_bytes()));
        assert!(!secret.verify("t", Some(3), Some(1), b"{\"a\":1}", sig.as_bytes()));
        assert!(!secret.verify("u", Some(2), Some(1), b"{\"a\":1}", sig.as_bytes()));
        assert!(!Secret::new("other").verify("t", Some(2), Some(1), b"{\"a\":1}", sig.as_bytes()));
        assert!(!secret.verify("t", Some(2), Some(1), b"{\"a\":1}", b"not hex"));
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
    }
}
