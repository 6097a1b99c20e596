//! The server node's peer storage: who announced which info hash
//! (BEP 5 `announce_peer`), bounded, expiring, and answered in an order
//! that puts a caller's best first tries first. No I/O; time is passed in.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::Bound;
use std::time::{Duration, Instant};

use super::krpc::Id;

/// Most entries one source IP keeps under one info hash. A host announces
/// one port per service; a handful of hosts behind one NAT share its IP.
/// Beyond it the IP's least-recently-refreshed entry gives way (newest wins:
/// a restarted host's new port replaces its dead one, and one IP planting
/// hundreds of entries keeps only its last 16).
pub const MAX_PEERS_PER_IP_PER_KEY: usize = 16;
/// Most entries under one info hash; beyond it the least-recently-refreshed
/// one gives way.
pub const MAX_PEERS_PER_KEY: usize = 1024;
/// Most entries one source IP keeps over all info hashes (a NAT with 256
/// hosts of 16 services each); beyond it the IP's least-recently-refreshed
/// entry gives way, so one IP announcing ever new info hashes replaces its
/// own entries and cannot fill the store.
pub const MAX_ENTRIES_PER_IP: usize = 4096;
/// Most entries stored in all; when full, the IP holding the most entries
/// gives up its oldest for a new one (refreshes are always taken), so IPs
/// that flood share the room and newcomers still get in.
pub const MAX_ENTRIES: usize = 262_144;
// Info hashes are bounded by the entries (each has one at least), not on
// their own: a bound of their own could be filled by IPs announcing each
// info hash in pairs, so that no eviction of one entry frees one.
/// Most values in one `get_peers` answer: 64 × 6 bytes, with the token and 8
/// compact nodes (208 bytes) about 700 bytes, well under mainline's
/// 2048-byte receive buffer and a 1500-byte MTU.
pub const MAX_VALUES: usize = 64;

/// What an announce did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// A new entry.
    Added,
    /// An entry already stored, refreshed.
    Refreshed,
}

/// One stored peer: address, last announce, first announce.
type Entry = (SocketAddrV4, Instant, Instant);

/// Peers by info hash; each entry keyed by (info hash, IP, port), never by
/// the announcer's node id, with the time it was last announced.
#[derive(Debug)]
pub struct PeerStore {
    /// Per info hash: each peer, when it was last announced and when it
    /// was first (kept while it is refreshed).
    swarms: BTreeMap<Id, Vec<Entry>>,
    /// Per source IP: its entries by last announce, oldest first.
    by_ip: HashMap<Ipv4Addr, BTreeSet<(Instant, Id, u16)>>,
    /// Source IPs by how many entries they hold (for the largest).
    by_count: BTreeSet<(usize, Ipv4Addr)>,
    entries: usize,
    ttl: Duration,
    /// Where the next [`PeerStore::sweep`] starts (after this key).
    cursor: Option<Id>,
}

impl PeerStore {
    /// An empty store whose entries live `ttl` after their last announce.
    pub fn new(ttl: Duration) -> Self {
        PeerStore {
            swarms: BTreeMap::new(),
            by_ip: HashMap::new(),
            by_count: BTreeSet::new(),
            entries: 0,
            ttl,
            cursor: None,
        }
    }

    /// Entries stored (expired ones count until swept).
    pub fn len(&self) -> usize {
        self.entries
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Info hashes stored.
    pub fn keys(&self) -> usize {
        self.swarms.len()
    }

    fn live(&self, now: Instant, refreshed: Instant) -> bool {
        now.saturating_duration_since(refreshed) < self.ttl
    }

    /// Records entry (`key`, `peer`, last announced `at`) in the per-IP
    /// index.
    fn index(&mut self, key: Id, peer: SocketAddrV4, at: Instant) {
        let set = self.by_ip.entry(*peer.ip()).or_default();
        let before = set.len();
        set.insert((at, key, peer.port()));
        self.by_count.remove(&(before, *peer.ip()));
        self.by_count.insert((before + 1, *peer.ip()));
        self.entries += 1;
    }

    /// Forgets entry (`key`, `peer`, last announced `at`) in the per-IP
    /// index.
    fn unindex(&mut self, key: Id, peer: SocketAddrV4, at: Instant) {
        let ip = *peer.ip();
        let Some(set) = self.by_ip.get_mut(&ip) else {
            return;
        };
        let before = set.len();
        if !set.remove(&(at, key, peer.port())) {
            return;
        }
        self.by_count.remove(&(before, ip));
        if before > 1 {
            self.by_count.insert((before - 1, ip));
        } else {
            self.by_ip.remove(&ip);
        }
        self.entries -= 1;
    }

    /// Removes the least-recently-refreshed entry of `ip` (and its info
    /// hash if that was its last entry).
    fn evict_oldest_of(&mut self, ip: Ipv4Addr) {
        let Some(&(at, key, port)) = self.by_ip.get(&ip).and_then(|set| set.first()) else {
            return;
        };
        let peer = SocketAddrV4::new(ip, port);
        self.unindex(key, peer, at);
        if let Some(swarm) = self.swarms.get_mut(&key) {
            swarm.retain(|(p, a, _)| !(*p == peer && *a == at));
            if swarm.is_empty() {
                self.swarms.remove(&key);
            }
        }
    }

    /// The IP holding the most entries.
    fn largest(&self) -> Option<Ipv4Addr> {
        self.by_count.last().map(|&(_, ip)| ip)
    }

    /// Stores or refreshes `peer` under `info_hash` at `now`, within the
    /// bounds above. Returns what it did and how many expired entries it
    /// dropped on the way.
    pub fn announce(&mut self, now: Instant, info_hash: Id, peer: SocketAddrV4) -> (Stored, usize) {
        let ttl = self.ttl;
        let mut expired = 0;
        if let Some(swarm) = self.swarms.get_mut(&info_hash) {
            // Expired entries leave (no allocation unless some do).
            let mut gone = Vec::new();
            swarm.retain(|&(p, at, _)| {
                let live = now.saturating_duration_since(at) < ttl;
                if !live {
                    gone.push((p, at));
                }
                live
            });
            let position = swarm.iter().position(|(p, _, _)| *p == peer);
            let refreshed = position.map(|i| {
                let old = swarm[i].1;
                swarm[i].1 = now;
                old
            });
            let same_ip = swarm.iter().filter(|(p, _, _)| p.ip() == peer.ip()).count();
            let evict = match refreshed {
                Some(_) => None,
                None if same_ip >= MAX_PEERS_PER_IP_PER_KEY => {
                    oldest(swarm, |p| p.ip() == peer.ip())
                }
                None if swarm.len() >= MAX_PEERS_PER_KEY => oldest(swarm, |_| true),
                None => None,
            }
            .map(|i| swarm.remove(i));
            for (p, at) in gone {
                expired += 1;
                self.unindex(info_hash, p, at);
            }
            if let Some(old) = refreshed {
                self.unindex(info_hash, peer, old);
                self.index(info_hash, peer, now);
                return (Stored::Refreshed, expired);
            }
            if let Some((p, at, _)) = evict {
                self.unindex(info_hash, p, at);
            }
        }
        // A new entry: make room by the bounds.
        let own = self.by_ip.get(peer.ip()).map_or(0, BTreeSet::len);
        if own >= MAX_ENTRIES_PER_IP {
            self.evict_oldest_of(*peer.ip());
        } else if self.entries >= MAX_ENTRIES {
            if let Some(ip) = self.largest() {
                self.evict_oldest_of(ip);
            }
        }
        self.swarms
            .entry(info_hash)
            .or_default()
            .push((peer, now, now));
        self.index(info_hash, peer, now);
        (Stored::Added, expired)
    }

    /// The live peers of `info_hash`, at most `max`, best first tries
    /// first:
    ///
    /// - source IPs take turns (round-robin), so one IP with many entries
    ///   takes at most every other slot while another IP has entries left;
    /// - IPs with fewer entries go first (a planted crowd goes last), ties
    ///   broken by the longest-lived: the IP whose oldest live entry was
    ///   first announced earliest (a host that has kept re-announcing comes
    ///   before addresses planted since, however often those re-announce);
    /// - within one IP, the most recently refreshed first, so a restarted
    ///   host's new port comes before its dead predecessor on the same IP.
    ///
    /// Callers rely on this order: a lookup that takes the first batch or
    /// the first few values (mainline's client, Node's bittorrent-dht) gets
    /// the best first; our RPC client keeps each IP's order and takes turns
    /// by IP the same way (`rpc::health::spread_by_ip`).
    pub fn peers(&self, now: Instant, info_hash: &Id, max: usize) -> Vec<SocketAddrV4> {
        let Some(swarm) = self.swarms.get(info_hash) else {
            return vec![];
        };
        let mut by_ip: HashMap<Ipv4Addr, Vec<Entry>> = HashMap::new();
        for &entry in swarm.iter().filter(|(_, at, _)| self.live(now, *at)) {
            by_ip.entry(*entry.0.ip()).or_default().push(entry);
        }
        let mut groups: Vec<Vec<Entry>> = by_ip.into_values().collect();
        for group in &mut groups {
            group.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.port().cmp(&b.0.port())));
        }
        let since = |group: &[Entry]| group.iter().map(|e| e.2).min();
        groups.sort_by(|a, b| {
            a.len()
                .cmp(&b.len())
                .then(since(a).cmp(&since(b)))
                .then(a[0].0.ip().cmp(b[0].0.ip()))
        });
        let mut out = Vec::with_capacity(max.min(swarm.len()));
        for round in 0.. {
            let mut took = false;
            for group in &groups {
                if let Some((peer, _, _)) = group.get(round) {
                    if out.len() == max {
                        return out;
                    }
                    out.push(*peer);
                    took = true;
                }
            }
            if !took {
                break;
            }
        }
        out
    }

    /// Drops expired entries, looking at about `budget` entries at most
    /// (whole info hashes), from where the last sweep stopped; returns how
    /// many it dropped. Called every tick, it goes round the whole store.
    pub fn sweep(&mut self, now: Instant, budget: usize) -> usize {
        let ttl = self.ttl;
        let start = match self.cursor {
            Some(key) => Bound::Excluded(key),
            None => Bound::Unbounded,
        };
        let mut examined = 0;
        let mut dropped = 0;
        let mut emptied = Vec::new();
        let mut gone = Vec::new();
        let mut last = None;
        for (key, swarm) in self.swarms.range_mut((start, Bound::Unbounded)) {
            if examined >= budget {
                break;
            }
            examined += swarm.len();
            swarm.retain(|&(p, at, _)| {
                let keep = now.saturating_duration_since(at) < ttl;
                if !keep {
                    gone.push((*key, p, at));
                }
                keep
            });
            if swarm.is_empty() {
                emptied.push(*key);
            }
            last = Some(*key);
        }
        dropped += gone.len();
        for (key, p, at) in gone {
            self.unindex(key, p, at);
        }
        // Reached the end: start over next time.
        self.cursor = match last {
            Some(key) if examined >= budget => Some(key),
            _ => None,
        };
        for key in emptied {
            self.swarms.remove(&key);
        }
        dropped
    }
}

/// The index of the least-recently-refreshed entry among those that `pick`.
fn oldest(
    swarm: &[(SocketAddrV4, Instant, Instant)],
    pick: impl Fn(&SocketAddrV4) -> bool,
) -> Option<usize> {
    swarm
        .iter()
        .enumerate()
        .filter(|(_, (p, _, _))| pick(p))
        .min_by_key(|(_, (_, at, _))| *at)
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(75);
    const KEY: Id = [7; 20];

    fn peer(ip: [u8; 4], port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(ip.into(), port)
    }

    #[test]
    fn a_re_announce_refreshes_its_one_entry_and_entries_expire_after_the_ttl() {
        let t0 = Instant::now();
        let mut store = PeerStore::new(TTL);
        let host = peer([127, 0, 0, 1], 5000);
        assert_eq!(store.announce(t0, KEY, host), (Stored::Added, 0));
        for i in 1..100 {
            let at = t0 + Duration::from_secs(i * 30);
            assert_eq!(store.announce(at, KEY, host), (Stored::Refreshed, 0));
        }
        assert_eq!(store.len(), 1);
        let last = t0 + Duration::from_secs(99 * 30);
        assert_eq!(
            store.peers(last + TTL - Duration::from_millis(1), &KEY, 64),
            vec![host]
        );
        assert_eq!(store.peers(last + TTL, &KEY, 64), vec![]);
        assert_eq!(store.sweep(last + TTL, 1000), 1);
        assert!(store.is_empty());
        assert_eq!(store.keys(), 0);
    }

    #[test]
    fn one_ip_keeps_its_newest_16_entries_per_key() {
        let t0 = Instant::now();
        let mut store = PeerStore::new(TTL);
        for port in 1..=500u16 {
            let at = t0 + Duration::from_millis(port.into());
            store.announce(at, KEY, peer([127, 0, 0, 66], port));
        }
        assert_eq!(store.len(), MAX_PEERS_PER_IP_PER_KEY);
        let now = t0 + Duration::from_secs(1);
        let got = store.peers(now, &KEY, 64);
        let want: Vec<_> = (485..=500)
            .rev()
            .map(|p| peer([127, 0, 0, 66], p))
            .collect();
        assert_eq!(got, want, "newest first");
    }

    #[test]
    fn ips_take_turns_the_smallest_group_first_and_newest_first_within_an_ip() {
        let t0 = Instant::now();
        let mut store = PeerStore::new(TTL);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        for port in 1..=5u16 {
            store.announce(at(port.into()), KEY, peer([127, 0, 0, 66], port));
        }
        // A host restarted on a new port: the dead one is older.
        store.announce(at(10), KEY, peer([127, 0, 0, 1], 4000));
        store.announce(at(20), KEY, peer([127, 0, 0, 1], 4001));
        store.announce(at(30), KEY, peer([10, 0, 0, 9], 80));
        let got = store.peers(at(40), &KEY, 64);
        assert_eq!(
            got,
            vec![
                peer([10, 0, 0, 9], 80),
                peer([127, 0, 0, 1], 4001),
                peer([127, 0, 0, 66], 5),
                peer([127, 0, 0, 1], 4000),
                peer([127, 0, 0, 66], 4),
                peer([127, 0, 0, 66], 3),
                peer([127, 0, 0, 66], 2),
                peer([127, 0, 0, 66], 1),
            ]
        );
        assert_eq!(store.peers(at(40), &KEY, 3).len(), 3);
    }

    #[test]
    fn a_long_lived_host_comes_before_ips_planted_since_however_often_they_re_announce() {
        let t0 = Instant::now();
        let mut store = PeerStore::new(TTL);
        let at = |s: u64| t0 + Duration::from_secs(s);
        // The host has announced every 30 s for a while.
        for s in [0, 30, 60] {
            store.announce(at(s), KEY, peer([10, 0, 0, 9], 80));
        }
        // 100 IPs, one entry each (as many as the host), planted later and
        // re-announced every second, so each is fresher than the host.
        for s in 61..=70 {
            for i in 0..100u8 {
                store.announce(at(s), KEY, peer([127, 0, 1, i], 9));
            }
        }
        let got = store.peers(at(70), &KEY, 64);
        assert_eq!(got[0], peer([10, 0, 0, 9], 80), "{got:?}");
    }

    #[test]
    fn a_key_keeps_its_newest_1024_an_ip_its_newest_4096_and_newcomers_get_in_when_full() {
        let t0 = Instant::now();
        let mut store = PeerStore::new(TTL);
        for i in 0..(MAX_PEERS_PER_KEY as u32 + 10) {
            let b = i.to_be_bytes();
            store.announce(
                t0 + Duration::from_micros(i.into()),
                KEY,
                peer([10, b[1], b[2], b[3]], 1),
            );
        }
        assert_eq!(store.len(), MAX_PEERS_PER_KEY);
        let live = store.peers(t0 + Duration::from_secs(1), &KEY, usize::MAX);
        assert!(!live.contains(&peer([10, 0, 0, 0], 1)), "the oldest went");
        assert!(live.contains(&peer([10, 0, 4, 9], 1)), "the newest stayed");

        let key = |k: u32| {
            let mut key = [0u8; 20];
            key[..4].copy_from_slice(&k.to_be_bytes());
            key
        };
        // One IP announcing ever new info hashes keeps its newest ones.
        let mut store = PeerStore::new(TTL);
        let n = MAX_ENTRIES_PER_IP as u32 + 100;
        for k in 0..n {
            let at = t0 + Duration::from_micros(k.into());
            assert_eq!(
                store.announce(at, key(k), peer([10, 0, 0, 1], 1)).0,
                Stored::Added
            );
        }
        assert_eq!(
            (store.len(), store.keys()),
            (MAX_ENTRIES_PER_IP, MAX_ENTRIES_PER_IP)
        );
        let later = t0 + Duration::from_secs(1);
        assert!(store.peers(later, &key(0), 1).is_empty(), "its oldest went");
        assert_eq!(
            store.peers(later, &key(n - 1), 1),
            vec![peer([10, 0, 0, 1], 1)]
        );

        // 64 IPs fill the store: a newcomer still gets in,
        // in the place of the oldest entry of an IP holding the most.
        let mut store = PeerStore::new(TTL);
        for k in 0..MAX_ENTRIES as u32 {
            let ip = [10, 0, (k / MAX_ENTRIES_PER_IP as u32) as u8, 1];
            let at = t0 + Duration::from_micros(k.into());
            assert_eq!(store.announce(at, key(k), peer(ip, 1)).0, Stored::Added);
        }
        assert_eq!(store.keys(), MAX_ENTRIES);
        let newcomer = peer([192, 0, 2, 1], 4000);
        assert_eq!(store.announce(later, [0xff; 20], newcomer).0, Stored::Added);
        assert_eq!(store.keys(), MAX_ENTRIES);
        assert_eq!(store.peers(later, &[0xff; 20], 1), vec![newcomer]);
        // The largest holders are tied: the highest IP gave up its oldest.
        let first_of_last_ip = (MAX_ENTRIES - MAX_ENTRIES_PER_IP) as u32;
        assert!(store.peers(later, &key(first_of_last_ip), 1).is_empty());
        assert!(!store.peers(later, &key(0), 1).is_empty());
    }

    #[test]
    fn the_sweep_is_bounded_per_call_and_goes_round_the_whole_store() {
        let t0 = Instant::now();
        let mut store = PeerStore::new(TTL);
        for k in 0..100u8 {
            for port in 1..=10 {
                store.announce(t0, [k; 20], peer([10, 0, 0, 1], port));
            }
        }
        let later = t0 + TTL;
        let first = store.sweep(later, 95);
        assert_eq!(
            first, 100,
            "ten keys of ten entries: the budget stops at a whole key"
        );
        let mut total = first;
        for _ in 0..20 {
            total += store.sweep(later, 95);
        }
        assert_eq!(total, 1000);
        assert!(store.is_empty());
        assert_eq!(store.keys(), 0);
    }
}
