//! The values put through this grape, kept so that `/get` finds them without
//! the DHT, as grenache-grape answers a `/get` from its own cache (token
//! `null`). Bounded: the oldest value goes first.

use std::collections::{HashMap, VecDeque};

/// Most values kept (bittorrent-dht 10.0.0's default `maxValues`).
pub const MAX_VALUES: usize = 1000;

/// The signature fields of a mutable value (BEP 44).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// ed25519 public key.
    pub key: [u8; 32],
    /// ed25519 signature over the salt, seq and value.
    pub signature: [u8; 64],
    /// Sequence number.
    pub seq: i64,
    /// Salt, if any (part of the target).
    pub salt: Option<Vec<u8>>,
}

/// A value and, for a mutable one, its signature fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredValue {
    /// The value's bytes (a Grape's values are UTF-8 strings).
    pub value: Vec<u8>,
    /// `None` for an immutable value.
    pub signed: Option<Signed>,
}

/// Why a mutable put was refused (BEP 44's errors 301 and 302).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PutRefused {
    /// `cas` is not the stored value's `seq`.
    #[error("CAS mismatch, re-read value and try again")]
    CasMismatch,
    /// `seq` is lower than the stored one's, or the same with another value.
    #[error("sequence number less than current")]
    SeqTooLow,
}

/// Values by their 20-byte DHT target, at most [`MAX_VALUES`].
#[derive(Debug, Default)]
pub struct ValueStore {
    values: HashMap<[u8; 20], StoredValue>,
    order: VecDeque<[u8; 20]>,
}

impl ValueStore {
    /// Keeps `value` under `target`, by BEP 44's rules for a mutable one:
    /// with `cas`, only over a stored value of that `seq`; only over a lower
    /// `seq`, or the same `seq` and the same value. A refused put changes
    /// nothing.
    pub fn insert(
        &mut self,
        target: [u8; 20],
        value: StoredValue,
        cas: Option<i64>,
    ) -> Result<(), PutRefused> {
        if let Some(old) = self.values.get(&target) {
            if let (Some(old_signed), Some(new)) = (&old.signed, &value.signed) {
                if cas.is_some_and(|cas| cas != old_signed.seq) {
                    return Err(PutRefused::CasMismatch);
                }
                if new.seq < old_signed.seq
                    || (new.seq == old_signed.seq && old.value != value.value)
                {
                    return Err(PutRefused::SeqTooLow);
                }
            }
            self.values.insert(target, value);
            return Ok(());
        }
        if self.order.len() >= MAX_VALUES {
            if let Some(oldest) = self.order.pop_front() {
                self.values.remove(&oldest);
            }
        }
        self.order.push_back(target);
        self.values.insert(target, value);
        Ok(())
    }

    /// The value under `target`, if kept.
    pub fn get(&self, target: &[u8; 20]) -> Option<&StoredValue> {
        self.values.get(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn immutable(v: &str) -> StoredValue {
        StoredValue {
            value: v.as_bytes().to_vec(),
            signed: None,
        }
    }

    fn mutable(v: &str, seq: i64) -> StoredValue {
        StoredValue {
            value: v.as_bytes().to_vec(),
            signed: Some(Signed {
                key: [1; 32],
                signature: [2; 64],
                seq,
                salt: None,
            }),
        }
    }

    #[test]
    fn a_mutable_value_is_replaced_only_by_a_newer_one() {
        let mut store = ValueStore::default();
        assert_eq!(store.insert([1; 20], mutable("a", 2), None), Ok(()));
        assert_eq!(
            store.insert([1; 20], mutable("old", 1), None),
            Err(PutRefused::SeqTooLow)
        );
        assert_eq!(store.get(&[1; 20]).unwrap().value, b"a");
        // The same seq: the same value again only.
        assert_eq!(
            store.insert([1; 20], mutable("other", 2), None),
            Err(PutRefused::SeqTooLow)
        );
        assert_eq!(store.insert([1; 20], mutable("a", 2), None), Ok(()));
        assert_eq!(store.get(&[1; 20]).unwrap().value, b"a");
        assert_eq!(store.insert([1; 20], mutable("b", 3), None), Ok(()));
        assert_eq!(store.get(&[1; 20]).unwrap().value, b"b");
    }

    #[test]
    fn a_put_with_cas_replaces_only_the_seq_it_names() {
        let mut store = ValueStore::default();
        // Nothing stored: nothing to compare.
        assert_eq!(store.insert([1; 20], mutable("a", 3), Some(1)), Ok(()));
        assert_eq!(
            store.insert([1; 20], mutable("cas-wrong", 4), Some(2)),
            Err(PutRefused::CasMismatch)
        );
        assert_eq!(store.get(&[1; 20]).unwrap().value, b"a");
        assert_eq!(store.insert([1; 20], mutable("b", 4), Some(3)), Ok(()));
        assert_eq!(store.get(&[1; 20]).unwrap().value, b"b");
    }

    #[test]
    fn the_store_is_bounded_and_forgets_the_oldest() {
        let mut store = ValueStore::default();
        for i in 0..MAX_VALUES + 1 {
            let mut target = [0; 20];
            target[..8].copy_from_slice(&(i as u64).to_be_bytes());
            store.insert(target, immutable("x"), None).unwrap();
        }
        assert!(store.get(&[0; 20]).is_none());
        let mut last = [0; 20];
        last[..8].copy_from_slice(&(MAX_VALUES as u64).to_be_bytes());
        assert!(store.get(&last).is_some());
        assert_eq!(store.values.len(), MAX_VALUES);
    }
}
