//! API key material: `adt_<id>_<secret>`.
//!
//! The id (12 hex digits) is public: it names the key in lists and in the usage log. The
//! secret is 256 random bits. Only the SHA-256 of the whole key is stored; a fast hash is
//! enough because the secret is random (nothing to guess from a dictionary), and it keeps the
//! check on every request under a microsecond.

use sha2::{Digest, Sha256};

const SCHEME: &str = "adt_";
const ID_HEX: usize = 12;
const SECRET_HEX: usize = 64;

/// The SHA-256 of a key.
pub type KeyHash = [u8; 32];

/// A newly generated key. `secret` is the only copy of the full key: it is shown once.
pub struct NewKey {
    pub id: String,
    pub secret: String,
    pub hash: KeyHash,
}

pub fn generate() -> NewKey {
    let mut random = [0u8; ID_HEX / 2 + SECRET_HEX / 2];
    getrandom::fill(&mut random).expect("the operating system provides random bytes");
    let id = format!("{SCHEME}{}", hex(&random[..ID_HEX / 2]));
    let secret = format!("{id}_{}", hex(&random[ID_HEX / 2..]));
    let hash = hash(&secret);
    NewKey { id, secret, hash }
}

pub fn hash(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// The public id of a presented key, if it has the shape of one of ours.
pub fn id_of(key: &str) -> Option<&str> {
    let id = key.get(..SCHEME.len() + ID_HEX)?;
    let rest = &key[id.len()..];
    let well_formed = id.starts_with(SCHEME)
        && id[SCHEME.len()..].bytes().all(is_lower_hex)
        && rest.len() == 1 + SECRET_HEX
        && rest.starts_with('_')
        && rest[1..].bytes().all(is_lower_hex);
    well_formed.then_some(id)
}

/// Is `id` shaped like a key id (`adt_` and 12 hex digits)?
pub fn is_key_id(id: &str) -> bool {
    id.len() == SCHEME.len() + ID_HEX
        && id.starts_with(SCHEME)
        && id[SCHEME.len()..].bytes().all(is_lower_hex)
}

/// Equality that takes the same time wherever the first difference is.
pub fn same_hash(a: &KeyHash, b: &KeyHash) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn from_hex(s: &str) -> Option<KeyHash> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_parses_back_to_its_id_and_hash() {
        let key = generate();
        assert_eq!(id_of(&key.secret), Some(key.id.as_str()));
        assert!(is_key_id(&key.id));
        assert!(same_hash(&hash(&key.secret), &key.hash));
        assert_eq!(from_hex(&hex(&key.hash)), Some(key.hash));
        assert_eq!(key.secret.len(), 4 + 12 + 1 + 64);
    }

    #[test]
    fn keys_are_random() {
        assert_ne!(generate().secret, generate().secret);
    }

    #[test]
    fn malformed_keys_have_no_id() {
        let key = generate().secret;
        for bad in [
            "",
            "adt_",
            &key[..key.len() - 1],
            &format!("{key}0"),
            &key.replace("adt_", "xyz_"),
            &key.to_uppercase(),
            "adt_0123456789ab_ü",
        ] {
            assert_eq!(id_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn hashes_differ_in_any_byte() {
        let a = hash("a");
        let mut b = a;
        b[31] ^= 1;
        assert!(!same_hash(&a, &b));
        assert!(same_hash(&a, &a));
    }
}
