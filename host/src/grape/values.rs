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

/// Values by their 20-byte DHT target, at most [`MAX_VALUES`].
#[derive(Debug, Default)]
pub struct ValueStore {
    values: HashMap<[u8; 20], StoredValue>,
    order: VecDeque<[u8; 20]>,
}

impl ValueStore {
    /// Keeps `value` under `target`. A mutable value replaces one with a
    /// lower `seq` only; returns whether it was kept.
    pub fn insert(&mut self, target: [u8; 20], value: StoredValue) -> bool {
        if let Some(old) = self.values.get(&target) {
            let older = match (&old.signed, &value.signed) {
                (Some(old), Some(new)) => old.seq <= new.seq,
                _ => true,
            };
            if !older {
                return false;
            }
            self.values.insert(target, value);
            return true;
        }
        if self.order.len() >= MAX_VALUES {
            if let Some(oldest) = self.order.pop_front() {
                self.values.remove(&oldest);
            }
        }
        self.order.push_back(target);
        self.values.insert(target, value);
        true
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
        assert!(store.insert([1; 20], mutable("a", 2)));
        assert!(!store.insert([1; 20], mutable("old", 1)));
        assert_eq!(store.get(&[1; 20]).unwrap().value, b"a");
        assert!(store.insert([1; 20], mutable("b", 3)));
        assert_eq!(store.get(&[1; 20]).unwrap().value, b"b");
    }

    #[test]
    fn the_store_is_bounded_and_forgets_the_oldest() {
        let mut store = ValueStore::default();
        for i in 0..MAX_VALUES + 1 {
            let mut target = [0; 20];
            target[..8].copy_from_slice(&(i as u64).to_be_bytes());
            store.insert(target, immutable("x"));
        }
        assert!(store.get(&[0; 20]).is_none());
        let mut last = [0; 20];
        last[..8].copy_from_slice(&(MAX_VALUES as u64).to_be_bytes());
        assert!(store.get(&last).is_some());
        assert_eq!(store.values.len(), MAX_VALUES);
    }
}
