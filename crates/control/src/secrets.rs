//! Random secrets, their stored digests, and the derivation of each
//! instance's one-time bootstrap secret.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// A new random secret: 32 bytes, hex-encoded, with a readable prefix.
pub fn generate(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

/// The SHA-256 hex digest we store instead of a secret.
pub fn digest(secret: &str) -> String {
    digest_hex(&digest_bytes(secret))
}

/// The SHA-256 digest of a secret, as bytes: a cache key that keeps no
/// secret in memory and costs no string ([`digest_hex`] gives [`digest`]).
pub fn digest_bytes(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// [`digest_bytes`]' digest as stored: hex.
pub fn digest_hex(digest: &[u8; 32]) -> String {
    hex::encode(digest)
}

/// The server key from which each instance's one-time bootstrap secret is
/// derived (HMAC of the instance id), so the store keeps only digests and a
/// retried create hands out the same secret. Cheap to clone.
#[derive(Clone)]
pub struct BootstrapKey(std::sync::Arc<str>);

impl BootstrapKey {
    pub fn new(key: impl Into<std::sync::Arc<str>>) -> Self {
        Self(key.into())
    }

    /// The one-time secret handed to the instance's agent.
    pub fn secret(&self, id: gpufleet_domain::InstanceId) -> String {
        use hmac::{Mac, SimpleHmac};
        let mut mac = <SimpleHmac<Sha256> as Mac>::new_from_slice(self.0.as_bytes())
            .expect("HMAC takes keys of any length");
        mac.update(id.to_string().as_bytes());
        format!("gfb_{}", hex::encode(mac.finalize().into_bytes()))
    }
}

impl std::fmt::Debug for BootstrapKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BootstrapKey(***)")
    }
}

/// Compare two strings in time independent of where they differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_unique_and_digests_stable() {
        let a = generate("gfb_");
        let b = generate("gfb_");
        assert_ne!(a, b);
        assert!(a.starts_with("gfb_") && a.len() == 4 + 64);
        assert_eq!(digest(&a), digest(&a));
        assert_ne!(digest(&a), digest(&b));
        assert!(constant_time_eq(&a, &a.clone()));
        assert!(!constant_time_eq(&a, &b));
        assert!(!constant_time_eq("x", "xy"));
    }
}
