//! Random secrets and their stored digests.

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
