//! The server node's BEP 44 storage: immutable and mutable items put with
//! `put`, answered to `get`. No I/O; time is passed in. A grape keeps the
//! values put through its HTTP API here too (its DHT node's store), so that
//! `/get` finds them without a DHT round.
//!
//! Rules (BEP 44, "put message"): a mutable item replaces a stored one only
//! with a higher `seq`, or the same `seq` and the same value (which only
//! refreshes it); with `cas`, only over a stored item of that `seq`. An
//! immutable item's target is the SHA-1 of its value, so a put of it only
//! ever refreshes it. Signatures and sizes are checked before an item gets
//! here ([`super::node`]).
//!
//! Bounds: items live [`ITEM_TTL`] after their last put (BEP 44:
//! "Without re-announcement these items MAY expire in 2 hours"); at most
//! [`MAX_ITEMS_PER_IP`] items last put from one IP, that IP's least recently
//! put giving way (newest wins: an IP filling its share replaces its own
//! items, no one else's), and [`MAX_ITEMS`] in all, new ones refused when
//! full. Each item is at most 999 value bytes, 64 salt bytes and the key and
//! signature: a full store holds about 18 MB. Puts need a token, so the IP
//! an item is counted against has shown it receives there.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::krpc::Id;

/// How long an item is kept after its last put (BEP 44's 2 hours).
pub const ITEM_TTL: Duration = Duration::from_secs(2 * 3600);
/// Most items stored in all.
pub const MAX_ITEMS: usize = 16_384;
/// Most items whose last put came from one IP. A grape puts every value
/// its HTTP clients give it from its own IP, so one IP's share is large;
/// bittorrent-dht 10.0.0 (a Node grape's DHT) keeps 1000 values in all.
pub const MAX_ITEMS_PER_IP: usize = 1024;

/// The signature fields of a mutable item (BEP 44).
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

/// An item's value and, for a mutable one, its signature fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredValue {
    /// The value's bytes (`v`, a bencoded byte string; a Grape's values are
    /// UTF-8 strings).
    pub value: Vec<u8>,
    /// `None` for an immutable item.
    pub signed: Option<Signed>,
}

/// Why a put was refused, with BEP 44's error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PutRefused {
    /// `cas` is not the stored item's `seq` (301).
    #[error("CAS mismatch, re-read value and try again")]
    CasMismatch,
    /// `seq` is lower than the stored one's, or the same with another
    /// value (302).
    #[error("sequence number less than current")]
    SeqTooLow,
    /// [`MAX_ITEMS`] are stored (201, a generic error).
    #[error("storage full")]
    Full,
}

impl PutRefused {
    /// The KRPC error code (BEP 44; 201 for a full store, as BEP 5's
    /// generic error).
    pub fn code(self) -> i64 {
        match self {
            PutRefused::CasMismatch => 301,
            PutRefused::SeqTooLow => 302,
            PutRefused::Full => 201,
        }
    }
}

#[derive(Debug)]
struct Entry {
    value: StoredValue,
    /// The IP of the last put: the share it counts against.
    from: Ipv4Addr,
    put_at: Instant,
}

/// Items by their 20-byte target.
#[derive(Debug)]
pub struct ItemStore {
    items: HashMap<Id, Entry>,
    /// Every item by its last put, earliest first: expiry order.
    by_time: BTreeSet<(Instant, Id)>,
    /// Per IP, its items by their last put, earliest first.
    by_ip: HashMap<Ipv4Addr, BTreeSet<(Instant, Id)>>,
    ttl: Duration,
}

impl Default for ItemStore {
    fn default() -> Self {
        ItemStore::new(ITEM_TTL)
    }
}

impl ItemStore {
    /// An empty store whose items live `ttl` after their last put.
    pub fn new(ttl: Duration) -> Self {
        ItemStore {
            items: HashMap::new(),
            by_time: BTreeSet::new(),
            by_ip: HashMap::new(),
            ttl,
        }
    }

    /// Items stored.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Keeps `value` under `target`, put from `from` at `now`, by the rules
    /// in the module docs. A refused put changes nothing.
    pub fn put(
        &mut self,
        now: Instant,
        target: Id,
        value: StoredValue,
        cas: Option<i64>,
        from: Ipv4Addr,
    ) -> Result<(), PutRefused> {
        match self.live(now, &target) {
            Some(old) => {
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
                self.remove(&target);
            }
            None => {
                // An expired one, if any.
                self.remove(&target);
                let share_full = self
                    .by_ip
                    .get(&from)
                    .is_some_and(|share| share.len() >= MAX_ITEMS_PER_IP);
                if !share_full && self.items.len() >= MAX_ITEMS {
                    return Err(PutRefused::Full);
                }
            }
        }
        if let Some(&(_, oldest)) = self
            .by_ip
            .get(&from)
            .filter(|share| share.len() >= MAX_ITEMS_PER_IP)
            .and_then(|share| share.first())
        {
            self.remove(&oldest);
        }
        self.by_time.insert((now, target));
        self.by_ip.entry(from).or_default().insert((now, target));
        self.items.insert(
            target,
            Entry {
                value,
                from,
                put_at: now,
            },
        );
        Ok(())
    }

    /// The item under `target`, unless it expired.
    pub fn get(&self, now: Instant, target: &Id) -> Option<&StoredValue> {
        self.live(now, target)
    }

    fn live(&self, now: Instant, target: &Id) -> Option<&StoredValue> {
        self.items
            .get(target)
            .filter(|e| now.saturating_duration_since(e.put_at) < self.ttl)
            .map(|e| &e.value)
    }

    fn remove(&mut self, target: &Id) {
        let Some(entry) = self.items.remove(target) else {
            return;
        };
        self.by_time.remove(&(entry.put_at, *target));
        if let Some(share) = self.by_ip.get_mut(&entry.from) {
            share.remove(&(entry.put_at, *target));
            if share.is_empty() {
                self.by_ip.remove(&entry.from);
            }
        }
    }

    /// Drops up to `budget` expired items, earliest first; how many.
    pub fn sweep(&mut self, now: Instant, budget: usize) -> usize {
        let mut dropped = 0;
        while dropped < budget {
            match self.by_time.first() {
                Some(&(at, target)) if now.saturating_duration_since(at) >= self.ttl => {
                    self.remove(&target);
                    dropped += 1;
                }
                _ => break,
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOME: Ipv4Addr = Ipv4Addr::LOCALHOST;

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

    fn target(i: usize) -> Id {
        let mut target = [0; 20];
        target[..8].copy_from_slice(&(i as u64).to_be_bytes());
        target
    }

    #[test]
    fn a_mutable_item_is_replaced_only_by_a_newer_one() {
        let now = Instant::now();
        let mut store = ItemStore::default();
        let put = |s: &mut ItemStore, v, seq, cas| s.put(now, [1; 20], mutable(v, seq), cas, HOME);
        assert_eq!(put(&mut store, "a", 2, None), Ok(()));
        assert_eq!(put(&mut store, "old", 1, None), Err(PutRefused::SeqTooLow));
        assert_eq!(store.get(now, &[1; 20]).unwrap().value, b"a");
        // The same seq: the same value again only.
        assert_eq!(
            put(&mut store, "other", 2, None),
            Err(PutRefused::SeqTooLow)
        );
        assert_eq!(put(&mut store, "a", 2, None), Ok(()));
        assert_eq!(store.get(now, &[1; 20]).unwrap().value, b"a");
        assert_eq!(put(&mut store, "b", 3, None), Ok(()));
        assert_eq!(store.get(now, &[1; 20]).unwrap().value, b"b");
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn a_put_with_cas_replaces_only_the_seq_it_names() {
        let now = Instant::now();
        let mut store = ItemStore::default();
        let put = |s: &mut ItemStore, v, seq, cas| s.put(now, [1; 20], mutable(v, seq), cas, HOME);
        // Nothing stored: nothing to compare.
        assert_eq!(put(&mut store, "a", 3, Some(1)), Ok(()));
        assert_eq!(
            put(&mut store, "cas-wrong", 4, Some(2)),
            Err(PutRefused::CasMismatch)
        );
        assert_eq!(store.get(now, &[1; 20]).unwrap().value, b"a");
        assert_eq!(put(&mut store, "b", 4, Some(3)), Ok(()));
        assert_eq!(store.get(now, &[1; 20]).unwrap().value, b"b");
    }

    #[test]
    fn items_expire_after_the_ttl_unless_put_again() {
        let start = Instant::now();
        let ttl = Duration::from_secs(60);
        let mut store = ItemStore::new(ttl);
        store
            .put(start, [1; 20], immutable("a"), None, HOME)
            .unwrap();
        store
            .put(start, [2; 20], immutable("b"), None, HOME)
            .unwrap();
        let later = start + Duration::from_secs(40);
        store
            .put(later, [2; 20], immutable("b"), None, HOME)
            .unwrap();
        let expired = start + ttl;
        assert!(store.get(expired, &[1; 20]).is_none());
        assert!(store.get(expired, &[2; 20]).is_some());
        assert_eq!(store.sweep(expired, 10), 1);
        assert_eq!(store.len(), 1);
        // An expired mutable item does not hold back a lower seq.
        store
            .put(start, [3; 20], mutable("new", 9), None, HOME)
            .unwrap();
        assert_eq!(
            store.put(expired, [3; 20], mutable("old", 1), None, HOME),
            Ok(())
        );
    }

    #[test]
    fn one_ip_filling_its_share_replaces_only_its_own_oldest_items() {
        let now = Instant::now();
        let mut store = ItemStore::default();
        let other = Ipv4Addr::new(10, 0, 0, 2);
        store
            .put(now, [0xff; 20], immutable("theirs"), None, other)
            .unwrap();
        for i in 0..MAX_ITEMS_PER_IP + 10 {
            let at = now + Duration::from_millis(i as u64);
            store
                .put(at, target(i), immutable("x"), None, HOME)
                .unwrap();
        }
        assert_eq!(store.len(), MAX_ITEMS_PER_IP + 1);
        assert!(store.get(now, &target(9)).is_none());
        assert!(store.get(now, &target(10)).is_some());
        assert!(store.get(now, &[0xff; 20]).is_some());
    }

    #[test]
    fn a_full_store_refuses_new_items_and_keeps_refreshing_old_ones() {
        let now = Instant::now();
        let mut store = ItemStore::default();
        for i in 0..MAX_ITEMS {
            let ip = Ipv4Addr::from((i / MAX_ITEMS_PER_IP) as u32 + 1);
            store.put(now, target(i), immutable("x"), None, ip).unwrap();
        }
        let fresh = Ipv4Addr::new(10, 9, 9, 9);
        assert_eq!(
            store.put(now, target(MAX_ITEMS), immutable("x"), None, fresh),
            Err(PutRefused::Full)
        );
        assert_eq!(
            store.put(now, target(0), immutable("x"), None, fresh),
            Ok(())
        );
        assert_eq!(store.len(), MAX_ITEMS);
    }
}
