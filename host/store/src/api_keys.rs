//! API key issuance and checking: the key text format, its hash, and constant-time matching.
//!
//! A key is `"weft_" + id + "_" + secret` where `id` is 16 lowercase hex characters (8 random
//! bytes) and `secret` is 43 base64url characters (32 random bytes, no padding). The id is not
//! secret: it names the key in listings and revocations, and lets the server find the one stored
//! hash to compare against. Only [`hash`] of the full key text is ever stored, and the comparison
//! in [`matches()`] is constant time so that response timing leaks nothing about the stored hash.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use subtle::ConstantTimeEq as _;
use weft_core::{Error, Result};

use crate::signing::{hex, sha256_hex};

const PREFIX: &str = "weft_";
const ID_LEN: usize = 16;
const SECRET_LEN: usize = 43;

/// A new API key: `(id, full key text)`.
pub fn generate() -> Result<(String, String)> {
    let mut id = [0u8; ID_LEN / 2];
    let mut secret = [0u8; 32];
    for buf in [&mut id[..], &mut secret[..]] {
        getrandom::fill(buf).map_err(|e| {
            Error::internal(format!(
                "cannot read the operating system's random number generator: {e}"
            ))
        })?;
    }
    let id = hex(&id);
    let key = format!("{PREFIX}{id}_{}", URL_SAFE_NO_PAD.encode(secret));
    secret.fill(0);
    Ok((id, key))
}

/// Lowercase hex sha256 of the key text; only this is ever stored.
pub fn hash(key: &str) -> String {
    sha256_hex(key.as_bytes())
}

/// The id embedded in a well-formed key, `None` if `key` is not one.
pub fn id_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(PREFIX)?;
    let id = rest.get(..ID_LEN)?;
    let secret = rest.get(ID_LEN..)?.strip_prefix('_')?;
    let id_ok = id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let secret_ok = secret.len() == SECRET_LEN
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (id_ok && secret_ok).then_some(id)
}

/// Whether `key` hashes to `stored_hash`, compared in constant time.
pub fn matches(key: &str, stored_hash: &str) -> bool {
    hash(key).as_bytes().ct_eq(stored_hash.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn generated_key_format() {
        let (id, key) = generate().unwrap();
        assert_eq!(id.len(), 16);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(key.starts_with(&format!("weft_{id}_")));
        assert_eq!(key.len(), 5 + 16 + 1 + 43);
        assert_eq!(id_of(&key), Some(id.as_str()));
        let secret = &key[5 + 16 + 1..];
        assert_eq!(URL_SAFE_NO_PAD.decode(secret).unwrap().len(), 32);
    }

    #[test]
    fn generated_keys_are_unique() {
        let (id_a, key_a) = generate().unwrap();
        let (id_b, key_b) = generate().unwrap();
        assert_ne!(id_a, id_b);
        assert_ne!(key_a, key_b);
    }

    #[test]
    fn hash_and_matches() {
        let (_, key) = generate().unwrap();
        let stored = hash(&key);
        assert_eq!(stored.len(), 64);
        assert_ne!(stored, key);
        assert!(matches(&key, &stored));
        assert!(!matches(&format!("{key}x"), &stored));
        let (_, other) = generate().unwrap();
        assert!(!matches(&other, &stored));
        assert!(!matches(&key, ""));
        assert!(!matches(&key, &stored[..63]));
        assert!(!matches(&key, &stored.to_uppercase()));
    }

    #[test]
    fn id_of_rejects_malformed_keys() {
        let (_, key) = generate().unwrap();
        let secret = &key[22..];
        for bad in [
            String::new(),
            "weft_".to_owned(),
            key[..key.len() - 1].to_owned(),
            format!("{key}A"),
            key.replacen("weft_", "wefx_", 1),
            format!("weft_{}_{secret}", "0123456789ABCDEF"),
            format!("weft_{}_{secret}", "0123456789abcde"),
            format!("weft_{}-{secret}", "0123456789abcdef"),
            format!("weft_{}_{}", "0123456789abcdef", "+".repeat(43)),
            format!("weft_{}_{}", "0123456789abcdef", "é".repeat(22)),
            // Multi-byte characters where the id should be must not panic on slicing.
            format!("weft_{}_{secret}", "ééééééééé"),
        ] {
            assert_eq!(id_of(&bad), None, "{bad:?}");
        }
        let ok = format!("weft_0123456789abcdef_{}", "a-_Z".repeat(10) + "abc");
        assert_eq!(id_of(&ok), Some("0123456789abcdef"));
    }
}
