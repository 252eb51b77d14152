//! API keys: `obx_<prefix>_<secret>`, stored as a SHA-256 of the secret.

use argon2::password_hash::rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};

/// Prefix of every API key: `obx_<prefix>_<secret>`.
pub const API_KEY_TAG: &str = "obx_";

/// A new API key: (the key to show once, its prefix, the hash to store).
pub fn new_api_key() -> (String, String, String) {
    let mut bytes = [0u8; 24];
    OsRng.fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let (prefix, secret) = hex.split_at(8);
    let key = format!("{API_KEY_TAG}{prefix}_{secret}");
    (key, prefix.to_owned(), sha256_hex(secret))
}

/// API key secrets are long random strings: a fast hash suffices (and keeps
/// per-request checks cheap), unlike passwords.
pub(super) fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_have_a_prefix_and_hash() {
        let (key, prefix, hash) = new_api_key();
        assert!(key.starts_with(&format!("{API_KEY_TAG}{prefix}_")));
        let secret = key.rsplit('_').next().unwrap_or_default();
        assert_eq!(sha256_hex(secret), hash);
    }
}
