//! BEP 44 values as a Grape puts them and our DHT nodes store them: the key
//! of an immutable value, the target of a mutable one, and the check of a
//! mutable value's signature. Pure functions, used by the server node's
//! `put` ([`super::node`]) and the grape's HTTP API (`crate::grape::api`).
//!
//! Facts from BEP 44 and grenache-grape 1.0.0 (`lib/Grape.js` `put`, via
//! bittorrent-dht 10.0.0 `client.js` `_put`): a Grape's values are strings,
//! put as bencoded byte strings, so an immutable key is
//! `sha1("<len>:<bytes>")` (`"hello world"` → `6d33adc2…0527`); a mutable
//! target is `sha1(k ‖ salt)`, and its ed25519 signature covers the bencoded
//! `salt`, `seq` and `v` entries without the dictionary's `d`…`e`.

/// Largest value (bytes of `v`'s string) a Grape and our DHT nodes accept:
/// bittorrent-dht refuses `v.length >= 1000` and mainline's nodes refuse
/// values over 1000 bytes; a Grape's values count as UTF-8 bytes.
pub const MAX_VALUE_BYTES: usize = 999;
/// Longest salt, in bytes (BEP 44).
pub const MAX_SALT_BYTES: usize = 64;

/// The 20-byte DHT key of an immutable value: SHA-1 of its bencoding.
pub fn immutable_key(value: &[u8]) -> [u8; 20] {
    let mut hash = sha1_smol::Sha1::new();
    hash.update(format!("{}:", value.len()).as_bytes());
    hash.update(value);
    hash.digest().bytes()
}

/// The 20-byte DHT target of a mutable value: SHA-1 of the public key
/// followed by the salt.
pub fn mutable_target(public_key: &[u8; 32], salt: Option<&[u8]>) -> [u8; 20] {
    let mut hash = sha1_smol::Sha1::new();
    hash.update(public_key);
    hash.update(salt.unwrap_or_default());
    hash.digest().bytes()
}

/// The bytes a mutable value's signature covers:
/// `[4:salt<len>:<salt>]3:seqi<seq>e1:v<len>:<value>`.
pub fn signed_bytes(seq: i64, value: &[u8], salt: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 96);
    if let Some(salt) = salt {
        out.extend_from_slice(format!("4:salt{}:", salt.len()).as_bytes());
        out.extend_from_slice(salt);
    }
    out.extend_from_slice(format!("3:seqi{seq}e1:v{}:", value.len()).as_bytes());
    out.extend_from_slice(value);
    out
}

/// Whether `signature` by `public_key` covers this value (ed25519, strict:
/// no small-order keys, no malleable signatures).
pub fn signature_holds(
    public_key: &[u8; 32],
    signature: &[u8; 64],
    seq: i64,
    value: &[u8],
    salt: Option<&[u8]>,
) -> bool {
    let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(public_key) else {
        return false;
    };
    let signature = ed25519_dalek::Signature::from_bytes(signature);
    key.verify_strict(&signed_bytes(seq, value, salt), &signature)
        .is_ok()
}

pub use crate::units::{from_hex, hex};

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    #[test]
    fn the_key_of_hello_world_is_the_one_a_grape_answers() {
        // grenache-wire.md TV-13, measured against grenache-grape 1.0.0.
        assert_eq!(
            hex(&immutable_key(b"hello world")),
            "6d33adc2b6b2c14c3036feefb7fedbca1a880527"
        );
    }

    #[test]
    fn signed_bytes_are_the_bencoded_entries_without_the_dictionary() {
        assert_eq!(
            signed_bytes(1, b"Hello World!", None),
            b"3:seqi1e1:v12:Hello World!".to_vec()
        );
        assert_eq!(
            signed_bytes(1, b"Hello World!", Some(b"foobar")),
            b"4:salt6:foobar3:seqi1e1:v12:Hello World!".to_vec()
        );
    }

    #[test]
    fn a_signature_holds_only_for_what_was_signed() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let public = key.verifying_key().to_bytes();
        let signature = key.sign(&signed_bytes(4, b"v1", Some(b"s"))).to_bytes();
        assert!(signature_holds(&public, &signature, 4, b"v1", Some(b"s")));
        assert!(!signature_holds(&public, &signature, 5, b"v1", Some(b"s")));
        assert!(!signature_holds(&public, &signature, 4, b"v2", Some(b"s")));
        assert!(!signature_holds(&public, &signature, 4, b"v1", None));
        assert!(!signature_holds(&[0; 32], &signature, 4, b"v1", Some(b"s")));
    }

    #[test]
    fn the_target_of_a_mutable_value_hashes_key_and_salt() {
        let key = [1u8; 32];
        let mut joined = key.to_vec();
        joined.extend_from_slice(b"salt");
        assert_eq!(
            mutable_target(&key, Some(b"salt")),
            sha1_smol::Sha1::from(&joined).digest().bytes()
        );
        assert_eq!(
            mutable_target(&key, None),
            sha1_smol::Sha1::from(&key[..]).digest().bytes()
        );
    }

    #[test]
    fn hex_round_trips_and_refuses_garbage() {
        assert_eq!(from_hex("00ffAB").unwrap(), vec![0, 255, 171]);
        assert_eq!(hex(&[0, 255, 171]), "00ffab");
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex("é1"), None);
    }
}
