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
//! "Without re-announcement these items MAY expire in 2 hours"). Each item
//! counts against the IP that first put it (a refresh from elsewhere keeps
//! it there, so no one can move another's item into their own share and
//! evict it); a newer signed version, which only the key's holder can
//! make, moves it to its sender. At most [`MAX_ITEMS_PER_IP`] per IP, that
//! IP's least recently put giving way (newest wins: an IP filling its share
//! replaces its own items, no one else's), and [`MAX_ITEMS`] in all; when
//! full, the IP holding the most gives up its least recently put item
//! (except [protected](ItemStore::protect) IPs: a grape's own), so IPs
//! that flood share the room and newcomers still get in. Each item is
//! at most 999 value bytes, 64 salt bytes and the key and signature: a full
//! store holds about 18 MB. Puts need a token, so the IP an item is counted
//! against has shown it receives there.
//!
//! A mutable item that leaves the store (expired or evicted) leaves its
//! `seq` behind for [`ITEM_TTL`] ([`MAX_SEQ_MARKS`] at most): a put of an
//! older version is refused meanwhile, so eviction cannot be used to roll a
//! value back. No mark is dropped early to make room for an eviction: with
//! the marks full, a put that would evict a mutable item is refused
//! ([`PutRefused::Full`]) instead. An item keeps its kind: a mutable put never replaces an
//! immutable item, nor the reverse.

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
/// Most `seq` marks of mutable items that left the store.
pub const MAX_SEQ_MARKS: usize = 65_536;

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
    /// `seq` is lower than the stored one's (or the last one seen for an
    /// item that left the store), or the same with another value (302).
    #[error("sequence number less than current")]
    SeqTooLow,
    /// A mutable put over an immutable item or the reverse (203).
    #[error("an item of the other kind is stored under this target")]
    OtherKind,
    /// No room without forgetting a mutable item's seq mark before its
    /// time (201, a generic error).
    #[error("storage full")]
    Full,
}

impl PutRefused {
    /// The KRPC error code (BEP 44; 203, BEP 5's protocol error, for the
    /// other kind).
    pub fn code(self) -> i64 {
        match self {
            PutRefused::CasMismatch => 301,
            PutRefused::SeqTooLow => 302,
            PutRefused::OtherKind => 203,
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
    /// IPs by how many items they hold (for the largest).
    by_count: BTreeSet<(usize, Ipv4Addr)>,
    /// The `seq` of mutable items that left the store, and when they left.
    seq_marks: HashMap<Id, (i64, Instant)>,
    /// The marks by when they were made, earliest first.
    seq_mark_order: BTreeSet<(Instant, Id)>,
    /// IPs whose items the largest-share rule never takes.
    protected: std::collections::HashSet<Ipv4Addr>,
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
            by_count: BTreeSet::new(),
            seq_marks: HashMap::new(),
            seq_mark_order: BTreeSet::new(),
            protected: Default::default(),
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

    /// Whether a put of `value` with `cas` under `target` would be taken,
    /// without taking it: what can be known before checking a signature.
    pub fn check(
        &self,
        now: Instant,
        target: &Id,
        value: &StoredValue,
        cas: Option<i64>,
    ) -> Result<(), PutRefused> {
        if let Some(old) = self.live(now, target) {
            return match (&old.signed, &value.signed) {
                (None, None) => Ok(()),
                (Some(old_signed), Some(new)) => {
                    if cas.is_some_and(|cas| cas != old_signed.seq) {
                        Err(PutRefused::CasMismatch)
                    } else if new.seq < old_signed.seq
                        || (new.seq == old_signed.seq && old.value != value.value)
                    {
                        Err(PutRefused::SeqTooLow)
                    } else {
                        Ok(())
                    }
                }
                _ => Err(PutRefused::OtherKind),
            };
        }
        match (&value.signed, self.seq_marks.get(target)) {
            (Some(new), Some(&(seq, at)))
                if new.seq < seq && now.saturating_duration_since(at) < self.ttl =>
            {
                Err(PutRefused::SeqTooLow)
            }
            _ => Ok(()),
        }
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
        // An expired item not yet swept goes first, leaving its seq mark.
        if self.items.contains_key(&target) && self.live(now, &target).is_none() {
            self.remove(now, &target, true);
        }
        self.check(now, &target, &value, cas)?;
        // The IP it counts against: whoever put it first, while it lives;
        // a newer signed version (only the key's holder can make one)
        // moves it to its sender.
        let owner = match self.items.get(&target) {
            Some(e) => match (&e.value.signed, &value.signed) {
                (Some(old), Some(new)) if new.seq > old.seq => from,
                _ => e.from,
            },
            None => from,
        };
        let replacing = self.items.contains_key(&target);
        if !replacing {
            let share = self.by_ip.get(&owner).map_or(0, BTreeSet::len);
            let victim = if share >= MAX_ITEMS_PER_IP {
                Some(owner)
            } else if self.items.len() >= MAX_ITEMS {
                self.largest_evictable()
            } else {
                None
            };
            if let Some(ip) = victim {
                self.evict_oldest_of(now, ip)?;
            }
            if self.items.len() >= MAX_ITEMS {
                return Err(PutRefused::Full);
            }
        }
        // An earlier version makes way.
        self.remove(now, &target, false);
        self.insert(now, target, value, owner);
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

    fn insert(&mut self, now: Instant, target: Id, value: StoredValue, owner: Ipv4Addr) {
        self.by_time.insert((now, target));
        let share = self.by_ip.entry(owner).or_default();
        let before = share.len();
        share.insert((now, target));
        self.by_count.remove(&(before, owner));
        self.by_count.insert((before + 1, owner));
        self.items.insert(
            target,
            Entry {
                value,
                from: owner,
                put_at: now,
            },
        );
    }

    /// Takes `target` out; with `mark`, a mutable item leaves its `seq`
    /// behind (see the module docs).
    fn remove(&mut self, now: Instant, target: &Id, mark: bool) {
        let Some(entry) = self.items.remove(target) else {
            return;
        };
        self.by_time.remove(&(entry.put_at, *target));
        if let Some(share) = self.by_ip.get_mut(&entry.from) {
            let before = share.len();
            share.remove(&(entry.put_at, *target));
            self.by_count.remove(&(before, entry.from));
            if share.is_empty() {
                self.by_ip.remove(&entry.from);
            } else {
                self.by_count.insert((share.len(), entry.from));
            }
        }
        if let (true, Some(signed)) = (mark, &entry.value.signed) {
            self.mark_seq(now, *target, signed.seq);
        }
    }

    fn mark_seq(&mut self, now: Instant, target: Id, seq: i64) {
        if let Some((_, at)) = self.seq_marks.remove(&target) {
            self.seq_mark_order.remove(&(at, target));
        }
        // Only an expiry gets here with the marks full (an eviction checks
        // for room first): the oldest mark goes.
        while self.seq_marks.len() >= MAX_SEQ_MARKS {
            let Some((_, oldest)) = self.seq_mark_order.pop_first() else {
                break;
            };
            self.seq_marks.remove(&oldest);
        }
        self.seq_marks.insert(target, (seq, now));
        self.seq_mark_order.insert((now, target));
    }

    /// Evicts `ip`'s least recently put item. A mutable one must leave
    /// its seq mark: when the marks are full of unexpired ones, nothing is
    /// evicted and the put that asked is refused ([`PutRefused::Full`]).
    fn evict_oldest_of(&mut self, now: Instant, ip: Ipv4Addr) -> Result<(), PutRefused> {
        let Some(&(_, oldest)) = self.by_ip.get(&ip).and_then(|share| share.first()) else {
            return Ok(());
        };
        let mutable = self
            .items
            .get(&oldest)
            .is_some_and(|e| e.value.signed.is_some());
        if mutable && !self.room_for_a_mark(now) {
            return Err(PutRefused::Full);
        }
        self.remove(now, &oldest, true);
        Ok(())
    }

    /// Whether a seq mark can be made without dropping an unexpired one.
    fn room_for_a_mark(&mut self, now: Instant) -> bool {
        while let Some(&(at, target)) = self.seq_mark_order.first() {
            if now.saturating_duration_since(at) < self.ttl {
                break;
            }
            self.seq_mark_order.pop_first();
            self.seq_marks.remove(&target);
        }
        self.seq_marks.len() < MAX_SEQ_MARKS
    }

    /// Marks `ip`'s items as never taken by the "largest share gives way"
    /// rule (only by its own share's bound): a grape's own IP, under which
    /// it keeps every value its HTTP clients put.
    pub fn protect(&mut self, ip: Ipv4Addr) {
        self.protected.insert(ip);
    }

    /// The IP holding the most items, protected ones left out.
    fn largest_evictable(&self) -> Option<Ipv4Addr> {
        self.by_count
            .iter()
            .rev()
            .map(|&(_, ip)| ip)
            .find(|ip| !self.protected.contains(ip))
    }

    /// Drops up to `budget` expired items, earliest first; how many.
    pub fn sweep(&mut self, now: Instant, budget: usize) -> usize {
        let mut dropped = 0;
        while dropped < budget {
            match self.by_time.first() {
                Some(&(at, target)) if now.saturating_duration_since(at) >= self.ttl => {
                    self.remove(now, &target, true);
                    dropped += 1;
                }
                _ => break,
            }
        }
        // Marks older than the TTL are of no use.
        while let Some(&(at, target)) = self.seq_mark_order.first() {
            if now.saturating_duration_since(at) < self.ttl {
                break;
            }
            self.seq_mark_order.pop_first();
            self.seq_marks.remove(&target);
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
        // An expired mutable item, swept or not, still holds back a lower
        // seq (its mark), but not a newer one.
        store
            .put(start, [3; 20], mutable("new", 9), None, HOME)
            .unwrap();
        assert_eq!(
            store.put(expired, [3; 20], mutable("old", 1), None, HOME),
            Err(PutRefused::SeqTooLow)
        );
        assert_eq!(
            store.put(expired, [3; 20], mutable("newer", 10), None, HOME),
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
    fn a_full_store_takes_newcomers_from_the_largest_share() {
        let now = Instant::now();
        let mut store = ItemStore::default();
        for i in 0..MAX_ITEMS {
            let ip = Ipv4Addr::from((i / MAX_ITEMS_PER_IP) as u32 + 1);
            let at = now + Duration::from_micros(i as u64);
            store.put(at, target(i), immutable("x"), None, ip).unwrap();
        }
        let fresh = Ipv4Addr::new(10, 9, 9, 9);
        let later = now + Duration::from_secs(1);
        assert_eq!(
            store.put(later, target(MAX_ITEMS), immutable("x"), None, fresh),
            Ok(())
        );
        assert_eq!(store.len(), MAX_ITEMS);
        assert!(store.get(later, &target(MAX_ITEMS)).is_some());
        // The shares are tied: the highest IP gave up its oldest item.
        assert!(store
            .get(later, &target(MAX_ITEMS - MAX_ITEMS_PER_IP))
            .is_none());
        assert!(store.get(later, &target(0)).is_some());
    }

    #[test]
    fn a_refresh_from_elsewhere_does_not_move_an_item_into_that_ips_share() {
        let now = Instant::now();
        let mut store = ItemStore::default();
        let victim = Ipv4Addr::new(10, 0, 0, 5);
        let attacker = Ipv4Addr::new(10, 0, 0, 66);
        store
            .put(now, [1; 20], mutable("v2", 2), None, victim)
            .unwrap();
        store
            .put(now, [2; 20], immutable("mine"), None, victim)
            .unwrap();
        // The attacker puts both again, unchanged, then fills its share.
        let later = now + Duration::from_secs(1);
        store
            .put(later, [1; 20], mutable("v2", 2), None, attacker)
            .unwrap();
        store
            .put(later, [2; 20], immutable("mine"), None, attacker)
            .unwrap();
        for i in 0..MAX_ITEMS_PER_IP + 5 {
            let at = later + Duration::from_micros(i as u64 + 1);
            store
                .put(at, target(i), immutable("junk"), None, attacker)
                .unwrap();
        }
        let after = later + Duration::from_secs(1);
        assert_eq!(store.get(after, &[1; 20]).unwrap().value, b"v2");
        assert!(store.get(after, &[2; 20]).is_some());
    }

    #[test]
    fn an_evicted_or_expired_mutable_item_cannot_be_rolled_back() {
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        let mut store = ItemStore::new(ttl);
        let owner = Ipv4Addr::new(10, 0, 0, 5);
        store
            .put(now, [1; 20], mutable("v2", 2), None, owner)
            .unwrap();
        // Its owner's share overflows: the item is evicted.
        for i in 0..MAX_ITEMS_PER_IP {
            let at = now + Duration::from_micros(i as u64 + 1);
            store
                .put(at, target(i), immutable("x"), None, owner)
                .unwrap();
        }
        assert!(store.get(now, &[1; 20]).is_none());
        let replay = store.put(now, [1; 20], mutable("v1", 1), None, owner);
        assert_eq!(replay, Err(PutRefused::SeqTooLow));
        assert_eq!(
            store.put(now, [1; 20], mutable("v3", 3), None, owner),
            Ok(())
        );
        // Expired: the mark outlives it by the TTL.
        let expired = now + ttl + Duration::from_secs(1);
        store.sweep(expired, usize::MAX);
        assert!(store.is_empty());
        let replay = store.put(expired, [1; 20], mutable("v2", 2), None, owner);
        assert_eq!(replay, Err(PutRefused::SeqTooLow));
        let much_later = expired + ttl;
        store.sweep(much_later, usize::MAX);
        assert_eq!(
            store.put(much_later, [1; 20], mutable("v2", 2), None, owner),
            Ok(())
        );
    }

    #[test]
    fn a_newer_signed_version_moves_the_item_to_its_sender() {
        let now = Instant::now();
        let mut store = ItemStore::default();
        let squatter = Ipv4Addr::new(10, 0, 0, 66);
        let holder = Ipv4Addr::new(10, 0, 0, 5);
        // The squatter puts a copy first; the key's holder then puts seq 2.
        store
            .put(now, [1; 20], mutable("v1", 1), None, squatter)
            .unwrap();
        store
            .put(now, [1; 20], mutable("v2", 2), None, holder)
            .unwrap();
        for i in 0..MAX_ITEMS_PER_IP + 5 {
            let at = now + Duration::from_micros(i as u64 + 1);
            store
                .put(at, target(i), immutable("junk"), None, squatter)
                .unwrap();
        }
        assert_eq!(store.get(now, &[1; 20]).unwrap().value, b"v2");
    }

    #[test]
    fn no_seq_mark_is_dropped_early_to_make_room() {
        let now = Instant::now();
        let mut store = ItemStore::default();
        let ip = |i: usize| Ipv4Addr::from((i / MAX_ITEMS_PER_IP) as u32 + 1);
        // Fill the marks with evictions of mutable items.
        let mut made = 0;
        for i in 0.. {
            if store.seq_marks.len() == MAX_SEQ_MARKS {
                break;
            }
            let at = now + Duration::from_micros(i as u64);
            store
                .put(
                    at,
                    target(i),
                    mutable("x", 1),
                    None,
                    ip(i % (MAX_ITEMS_PER_IP * 2)),
                )
                .unwrap();
            made += 1;
        }
        assert!(made > MAX_SEQ_MARKS);
        // Now a put that would evict a mutable item is refused, and every
        // mark stays.
        let full_share = ip(0);
        let at = now + Duration::from_secs(1);
        assert_eq!(
            store.put(at, [0xfe; 20], immutable("y"), None, full_share),
            Err(PutRefused::Full)
        );
        assert_eq!(store.seq_marks.len(), MAX_SEQ_MARKS);
        // After the TTL, marks make way again.
        let later = now + ITEM_TTL + Duration::from_secs(2);
        assert_eq!(
            store.put(later, [0xfe; 20], immutable("y"), None, full_share),
            Ok(())
        );
    }

    #[test]
    fn a_protected_ip_is_never_the_largest_share_that_gives_way() {
        let now = Instant::now();
        let mut store = ItemStore::default();
        let grape = Ipv4Addr::new(10, 0, 0, 1);
        store.protect(grape);
        for i in 0..MAX_ITEMS_PER_IP {
            store
                .put(now, target(i), immutable("mine"), None, grape)
                .unwrap();
        }
        for i in MAX_ITEMS_PER_IP..MAX_ITEMS {
            let ip = Ipv4Addr::new(10, 1, (i / 256) as u8, 1);
            store.put(now, target(i), immutable("x"), None, ip).unwrap();
        }
        let newcomer = Ipv4Addr::new(10, 9, 9, 9);
        store
            .put(now, [0xfe; 20], immutable("new"), None, newcomer)
            .unwrap();
        assert!((0..MAX_ITEMS_PER_IP).all(|i| store.get(now, &target(i)).is_some()));
    }

    #[test]
    fn an_item_keeps_its_kind() {
        let now = Instant::now();
        let mut store = ItemStore::default();
        store.put(now, [1; 20], immutable("a"), None, HOME).unwrap();
        assert_eq!(
            store.put(now, [1; 20], mutable("a", 1), None, HOME),
            Err(PutRefused::OtherKind)
        );
        store
            .put(now, [2; 20], mutable("a", 1), None, HOME)
            .unwrap();
        assert_eq!(
            store.put(now, [2; 20], immutable("a"), None, HOME),
            Err(PutRefused::OtherKind)
        );
    }
}
