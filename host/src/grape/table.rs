//! The grape's own table of announces: which addresses announced a name
//! through this grape's HTTP API and when, what the DHT was told, and what
//! expired since. A state machine without I/O: it takes the time and the
//! DHT's answers, and says what to publish and what a lookup finds.
//!
//! Why the grape keeps its own table: grenache-grape forgets an announce
//! `dht_peer_maxAge` (library default 120 s) after the last one
//! (grenache-wire.md §1.7), and so must this grape, whatever the DHT's
//! nodes keep: ours keep an announce for their own peer age (each grape's
//! `--dpa`, each `dht` node's `--peer-ttl`), other BEP 5 nodes by their own
//! rules (mainline's kept announces for good). Nothing published can be
//! taken back. The table is the truth for what this grape received: a
//! lookup answers its live announces, plus the DHT's addresses minus those
//! this grape published and saw expire (unless announced again). Another
//! grape still finds them through the DHT until its nodes forget them.
//!
//! Bounds: [`MAX_NAMES`] names, each with [`MAX_ADDRS_PER_NAME`] live and as
//! many expired addresses; the newest announce wins, evicting the least
//! recently announced. An evicted name's retractions outlive it in
//! `Retractions` ([`MAX_RETRACTIONS`], each for [`RETRACTION_KEPT`]), so
//! that eviction does not bring its DHT copies back for good.
//!
//! Cost: an announce, a lookup and an expiry step are O(log n) amortised in
//! the table's size (a flood must not make every request scan the table):
//! expiry pops a time-ordered queue of announces, eviction pops an LRU
//! order of names; per-name work is bounded by [`MAX_ADDRS_PER_NAME`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

/// Most names the table holds.
pub const MAX_NAMES: usize = 4096;
/// Most live addresses per name (as many as one lookup answers), and most
/// expired ones remembered.
pub const MAX_ADDRS_PER_NAME: usize = 100;
/// How long a port stays published before a new announce of it publishes
/// it again (our hosts' re-announce interval; half the peer max age when
/// that is shorter, so that DHT nodes with the same age keep it). Links
/// announce every second; the DHT hears a port at most this often.
pub const DHT_REFRESH: Duration = Duration::from_secs(30);
/// Most retractions of evicted names remembered; past that, the oldest go.
pub const MAX_RETRACTIONS: usize = 65_536;
/// How long a retraction of an evicted name is remembered. DHT nodes keep
/// an announce until newer ones push it out or they restart; a day covers
/// the usual life of both without growing for ever.
pub const RETRACTION_KEPT: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Default)]
struct NameEntry {
    /// Live addresses and when each was last announced, oldest first.
    live: Vec<(SocketAddrV4, Instant)>,
    /// Addresses that expired, as the DHT may still give them.
    expired: Vec<SocketAddrV4>,
    /// The port the DHT was last told, and when.
    published: Option<(u16, Instant)>,
    /// The name's place in [`AnnounceTable::lru`].
    lru_tick: u64,
}

/// Announces received through the HTTP API, by name.
#[derive(Debug)]
pub struct AnnounceTable {
    /// `None`: announces never expire (grape's `--dpa 0`).
    max_age: Option<Duration>,
    /// The address DHT nodes store this grape's publications under (as
    /// far as it can tell: its own DHT node sees it so).
    published_ip: Ipv4Addr,
    names: HashMap<String, NameEntry>,
    /// Names by their last announce, least recent first (keys are
    /// [`NameEntry::lru_tick`]).
    lru: BTreeMap<u64, String>,
    /// The next LRU tick.
    tick: u64,
    /// Every announce `(at, name, addr)`, earliest first; an entry whose
    /// address was announced again, dropped or evicted since is stale and
    /// skipped when popped. Compacted when stale entries dominate.
    due: BinaryHeap<Reverse<(Instant, String, SocketAddrV4)>>,
    /// Live addresses over all names (to bound `due`).
    live_count: usize,
    /// What evicted names had announced here.
    retractions: Retractions,
}

/// Addresses of evicted names that the DHT may still give but that expired
/// here (or will, at the time kept): bounded in count and time.
#[derive(Debug, Default)]
struct Retractions {
    /// name → address → from when it is retracted.
    by_name: HashMap<String, HashMap<SocketAddrV4, Instant>>,
    /// `(recorded, name, address, from)`, oldest first: for the count and
    /// time bounds; an entry no longer in `by_name` with this `from` is
    /// stale.
    order: VecDeque<(Instant, String, SocketAddrV4, Instant)>,
}

impl Retractions {
    fn insert(&mut self, now: Instant, name: &str, addr: SocketAddrV4, from: Instant) {
        while self.order.len() >= MAX_RETRACTIONS {
            self.pop_oldest();
        }
        self.by_name
            .entry(name.to_string())
            .or_default()
            .insert(addr, from);
        self.order.push_back((now, name.to_string(), addr, from));
    }

    fn pop_oldest(&mut self) {
        let Some((_, name, addr, from)) = self.order.pop_front() else {
            return;
        };
        if let Some(addrs) = self.by_name.get_mut(&name) {
            if addrs.get(&addr) == Some(&from) {
                addrs.remove(&addr);
                if addrs.is_empty() {
                    self.by_name.remove(&name);
                }
            }
        }
    }

    /// Forgets what was recorded [`RETRACTION_KEPT`] before `now`.
    fn expire(&mut self, now: Instant) {
        while self.order.front().is_some_and(|(recorded, ..)| {
            now.saturating_duration_since(*recorded) >= RETRACTION_KEPT
        }) {
            self.pop_oldest();
        }
    }

    /// `name` at `addr` is announced again: no longer retracted.
    fn forget(&mut self, name: &str, addr: SocketAddrV4) {
        if let Some(addrs) = self.by_name.get_mut(name) {
            addrs.remove(&addr);
            if addrs.is_empty() {
                self.by_name.remove(name);
            }
        }
    }

    fn is_retracted(&self, now: Instant, name: &str, addr: &SocketAddrV4) -> bool {
        self.by_name
            .get(name)
            .and_then(|addrs| addrs.get(addr))
            .is_some_and(|from| *from <= now)
    }
}

impl AnnounceTable {
    /// An empty table whose announces live `max_age` after the last one
    /// (`None`: until evicted); DHT nodes see this grape at `published_ip`.
    pub fn new(max_age: Option<Duration>, published_ip: Ipv4Addr) -> Self {
        AnnounceTable {
            max_age,
            published_ip,
            names: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            due: BinaryHeap::new(),
            live_count: 0,
            retractions: Retractions::default(),
        }
    }

    /// How long a published port stays published: [`DHT_REFRESH`], or
    /// half the peer max age when that is shorter.
    fn refresh(&self) -> Duration {
        self.max_age
            .map_or(DHT_REFRESH, |age| DHT_REFRESH.min(age / 2))
    }

    /// Records an announce of `name` at `addr`; returns the port to publish
    /// on the DHT, or `None` if it was published less than the refresh interval
    /// ago.
    pub fn announce(&mut self, now: Instant, name: &str, addr: SocketAddrV4) -> Option<u16> {
        if !self.names.contains_key(name) && self.names.len() >= MAX_NAMES {
            self.evict_oldest_name(now);
        }
        let refresh = self.refresh();
        let published_as = SocketAddrV4::new(self.published_ip, addr.port());
        self.retractions.forget(name, addr);
        self.retractions.forget(name, published_as);
        self.tick += 1;
        let tick = self.tick;
        let entry = self.names.entry(name.to_string()).or_default();
        if entry.lru_tick != 0 {
            self.lru.remove(&entry.lru_tick);
        }
        entry.lru_tick = tick;
        self.lru.insert(tick, name.to_string());
        let before = entry.live.len();
        entry.live.retain(|(a, _)| *a != addr);
        entry.expired.retain(|a| *a != addr && *a != published_as);
        if entry.live.len() >= MAX_ADDRS_PER_NAME {
            entry.live.remove(0);
        }
        entry.live.push((addr, now));
        self.live_count = self.live_count + entry.live.len() - before;
        let publish = match entry.published {
            Some((port, at)) if port == addr.port() && now.duration_since(at) < refresh => None,
            _ => {
                entry.published = Some((addr.port(), now));
                Some(addr.port())
            }
        };
        if self.max_age.is_some() {
            self.due.push(Reverse((now, name.to_string(), addr)));
            self.compact_due();
        }
        publish
    }

    /// The DHT did not take `port` for `name`: the next announce tries again.
    pub fn publish_failed(&mut self, name: &str, port: u16) {
        if let Some(entry) = self.names.get_mut(name) {
            if entry.published.map(|(p, _)| p) == Some(port) {
                entry.published = None;
            }
        }
    }

    /// Moves what has expired by `now` out of the live addresses; returns
    /// the `(name, address)` pairs that expired.
    pub fn expire(&mut self, now: Instant) -> Vec<(String, SocketAddrV4)> {
        let Some(max_age) = self.max_age else {
            return Vec::new();
        };
        self.retractions.expire(now);
        let mut gone = Vec::new();
        while let Some(Reverse((at, _, _))) = self.due.peek() {
            if now.saturating_duration_since(*at) < max_age {
                break;
            }
            let Some(Reverse((at, name, addr))) = self.due.pop() else {
                break;
            };
            let Some(entry) = self.names.get_mut(&name) else {
                continue; // evicted since
            };
            let Some(i) = entry.live.iter().position(|l| *l == (addr, at)) else {
                continue; // announced again or dropped since
            };
            entry.live.remove(i);
            self.live_count -= 1;
            let published_as = SocketAddrV4::new(self.published_ip, addr.port());
            for retract in [addr, published_as] {
                if !entry.expired.contains(&retract) {
                    if entry.expired.len() >= MAX_ADDRS_PER_NAME {
                        entry.expired.remove(0);
                    }
                    entry.expired.push(retract);
                }
            }
            gone.push((name, addr));
        }
        gone
    }

    /// Who serves `name` as of `now`: the live addresses (newest first),
    /// then the DHT's `found` without the addresses that expired here, unless
    /// a live address has the same port (the DHT cannot tell them apart).
    pub fn lookup(&self, now: Instant, name: &str, found: Vec<SocketAddrV4>) -> Vec<SocketAddrV4> {
        let Some(entry) = self.names.get(name) else {
            return found
                .into_iter()
                .filter(|p| !self.retractions.is_retracted(now, name, p))
                .collect();
        };
        let live: Vec<SocketAddrV4> = entry
            .live
            .iter()
            .rev()
            .filter(|(_, at)| self.is_live(now, *at))
            .map(|(addr, _)| *addr)
            .collect();
        let retracted = |peer: &SocketAddrV4| {
            (entry.expired.contains(peer) || self.retractions.is_retracted(now, name, peer))
                && !live.iter().any(|l| l.port() == peer.port())
        };
        let from_dht: Vec<SocketAddrV4> = found.into_iter().filter(|p| !retracted(p)).collect();
        live.into_iter().chain(from_dht).collect()
    }

    /// How many names the table holds.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the table holds no names.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    fn is_live(&self, now: Instant, at: Instant) -> bool {
        self.max_age
            .is_none_or(|max_age| now.saturating_duration_since(at) < max_age)
    }

    /// Evicts the least recently announced name, keeping its retractions:
    /// what expired here already, and what is live from when it would
    /// expire (at once without a max age: it leaves the lookups now).
    fn evict_oldest_name(&mut self, now: Instant) {
        let Some((_, name)) = self.lru.pop_first() else {
            return;
        };
        let Some(entry) = self.names.remove(&name) else {
            return;
        };
        self.live_count -= entry.live.len();
        for addr in entry.expired {
            self.retractions.insert(now, &name, addr, now);
        }
        for (addr, at) in entry.live {
            let from = self.max_age.map_or(now, |age| at + age);
            let published_as = SocketAddrV4::new(self.published_ip, addr.port());
            self.retractions.insert(now, &name, addr, from);
            self.retractions.insert(now, &name, published_as, from);
        }
    }

    /// Rebuilds the expiry queue from the live addresses once stale entries
    /// (re-announces, evictions) outnumber them, so it stays within a
    /// constant factor of the table: O(1) amortised per announce.
    fn compact_due(&mut self) {
        if self.due.len() <= 2 * self.live_count + 1024 {
            return;
        }
        self.due = self
            .names
            .iter()
            .flat_map(|(name, entry)| {
                entry
                    .live
                    .iter()
                    .map(move |(addr, at)| Reverse((*at, name.clone(), *addr)))
            })
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const AGE: Duration = Duration::from_secs(120);

    fn at(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new([127, 0, 0, 1].into(), port)
    }

    fn me(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(ME, port)
    }

    const fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn an_announce_lives_max_age_after_the_last_one() {
        let t0 = Instant::now();
        let mut table = AnnounceTable::new(Some(AGE), ME);
        assert_eq!(table.announce(t0, "svc", at(5555)), Some(5555));
        assert_eq!(table.lookup(t0 + AGE / 2, "svc", vec![]), [at(5555)]);
        // Re-announced: lives on.
        table.announce(t0 + AGE / 2, "svc", at(5555));
        assert!(table.expire(t0 + AGE).is_empty());
        assert_eq!(table.lookup(t0 + AGE, "svc", vec![]), [at(5555)]);
        // Not again: gone.
        let later = t0 + AGE / 2 + AGE;
        assert_eq!(table.lookup(later, "svc", vec![]), []);
        assert_eq!(table.expire(later), [("svc".to_string(), at(5555))]);
    }

    #[test]
    fn what_expired_here_is_dropped_from_the_dhts_answer() {
        let t0 = Instant::now();
        let mut table = AnnounceTable::new(Some(AGE), ME);
        table.announce(t0, "svc", at(5555));
        table.expire(t0 + AGE);
        // The DHT still has it, under the caller's address or ours; another
        // host's announce of the same name stays.
        let dht = vec![at(5555), me(5555), at(7777)];
        assert_eq!(table.lookup(t0 + AGE, "svc", dht.clone()), [at(7777)]);
        // Announced again: the DHT's copies are right again.
        table.announce(t0 + AGE, "svc", at(5555));
        assert_eq!(
            table.lookup(t0 + AGE, "svc", dht.clone()),
            [at(5555), at(5555), me(5555), at(7777)]
        );
        // Names this grape never heard of pass as the DHT has them.
        assert_eq!(table.lookup(t0, "other", dht.clone()), dht);
    }

    #[test]
    fn an_expired_port_that_is_live_again_elsewhere_is_kept() {
        let t0 = Instant::now();
        let mut table = AnnounceTable::new(Some(AGE), ME);
        table.announce(t0, "svc", at(5555));
        table.expire(t0 + AGE);
        let other = SocketAddrV4::new([10, 0, 0, 9].into(), 5555);
        table.announce(t0 + AGE, "svc", other);
        // me(5555) may be the publication of `other`'s announce.
        assert_eq!(
            table.lookup(t0 + AGE, "svc", vec![me(5555)]),
            [other, me(5555)]
        );
    }

    #[test]
    fn the_dht_hears_a_port_again_only_after_the_refresh_interval() {
        let t0 = Instant::now();
        let mut table = AnnounceTable::new(Some(AGE), ME);
        assert_eq!(table.announce(t0, "svc", at(1)), Some(1));
        assert_eq!(table.announce(t0 + secs(1), "svc", at(1)), None);
        // Another port is news.
        assert_eq!(table.announce(t0 + secs(2), "svc", at(2)), Some(2));
        assert_eq!(table.announce(t0 + secs(3), "svc", at(2)), None);
        assert_eq!(
            table.announce(t0 + secs(2) + DHT_REFRESH, "svc", at(2)),
            Some(2)
        );
        // A failed publish is retried on the next announce.
        table.publish_failed("svc", 2);
        assert_eq!(table.announce(t0 + secs(40), "svc", at(2)), Some(2));
    }

    #[test]
    fn without_max_age_announces_stay_until_evicted() {
        let t0 = Instant::now();
        let mut table = AnnounceTable::new(None, ME);
        table.announce(t0, "svc", at(1));
        let much_later = t0 + secs(86_400);
        assert!(table.expire(much_later).is_empty());
        assert_eq!(table.lookup(much_later, "svc", vec![]), [at(1)]);
    }

    #[test]
    fn the_table_is_bounded_and_the_newest_announce_wins() {
        let t0 = Instant::now();
        let mut table = AnnounceTable::new(Some(AGE), ME);
        let too_many = MAX_ADDRS_PER_NAME as u16 + 5;
        for port in 1..=too_many {
            table.announce(t0 + Duration::from_millis(port.into()), "svc", at(port));
        }
        let found = table.lookup(t0 + secs(1), "svc", vec![]);
        assert_eq!(found.len(), MAX_ADDRS_PER_NAME);
        assert_eq!(found[0], at(too_many), "newest first");
        assert!(!found.contains(&at(1)), "the oldest went");
        table.expire(t0 + secs(1000));
        assert_eq!(table.names["svc"].expired.len(), MAX_ADDRS_PER_NAME);

        for i in 0..MAX_NAMES + 3 {
            table.announce(t0 + secs(2 + i as u64), &format!("n{i}"), at(9));
        }
        assert_eq!(table.len(), MAX_NAMES);
        // The least recently announced names went.
        assert!(!table.names.contains_key("svc"));
        assert!(!table.names.contains_key("n0"));
        assert!(table.names.contains_key(&format!("n{}", MAX_NAMES + 2)));
    }

    #[test]
    fn a_request_costs_the_same_on_a_full_table() {
        // 100k announces of distinct names, each with the expiry and lookup
        // the node runs per request: the table stays full, the oldest expire
        // and get evicted. Scanning the table per request (the old code) took
        // minutes here; O(log n) per request takes well under a second.
        let t0 = Instant::now();
        let mut table = AnnounceTable::new(Some(secs(10)), ME);
        let started = std::time::Instant::now();
        for i in 0..100_000u32 {
            let now = t0 + Duration::from_millis(i.into());
            let name = format!("flood-{i}");
            table.expire(now);
            table.announce(now, &name, at((i % 60_000) as u16 + 1));
            assert_eq!(table.lookup(now, &name, vec![]).len(), 1);
        }
        let took = started.elapsed();
        assert_eq!(table.len(), MAX_NAMES);
        assert!(
            took < secs(20),
            "100k requests took {took:?}: a request must not scan the table"
        );
        // The expiry queue stays within a constant factor of the table.
        assert!(table.due.len() <= 2 * table.live_count + 1024);
        // Expiry still happens on time after all the evictions.
        let last = t0 + Duration::from_millis(99_999);
        let gone = table.expire(last + secs(10));
        assert_eq!(gone.len(), MAX_NAMES);
        assert_eq!(table.live_count, 0);
    }

    #[test]
    fn an_address_pushed_out_of_a_full_name_does_not_expire_twice() {
        let t0 = Instant::now();
        let mut table = AnnounceTable::new(Some(AGE), ME);
        for port in 1..=MAX_ADDRS_PER_NAME as u16 + 1 {
            table.announce(t0, "svc", at(port));
        }
        // Re-announced later: only the later announce counts.
        table.announce(t0 + secs(60), "svc", at(50));
        let gone = table.expire(t0 + AGE);
        assert_eq!(gone.len(), MAX_ADDRS_PER_NAME - 1);
        assert!(!gone.iter().any(|(_, a)| *a == at(1) || *a == at(50)));
        assert_eq!(table.lookup(t0 + AGE, "svc", vec![]), [at(50)]);
        assert_eq!(table.expire(t0 + secs(60) + AGE), [("svc".into(), at(50))]);
    }

    #[test]
    fn an_evicted_name_stays_retracted() {
        let t0 = Instant::now();
        let mut table = AnnounceTable::new(Some(AGE), ME);
        table.announce(t0, "gone", at(5555));
        table.announce(t0, "expired", at(6666));
        table.expire(t0 + AGE);
        // A flood of names pushes both out of the table.
        for i in 0..MAX_NAMES {
            table.announce(t0 + AGE + secs(1), &format!("flood-{i}"), at(9));
        }
        assert!(!table.names.contains_key("gone"));
        assert!(!table.names.contains_key("expired"));
        let later = t0 + AGE + secs(2);
        // What expired here stays dropped from the DHT's answer...
        assert_eq!(
            table.lookup(later, "expired", vec![at(6666), me(6666), at(7)]),
            [at(7)]
        );
        // ...and so does what would have expired by now, under either address.
        assert_eq!(
            table.lookup(later, "gone", vec![at(5555), me(5555), at(7)]),
            [at(7)]
        );
        // Announced again: served again.
        table.announce(later, "gone", at(5555));
        assert_eq!(
            table.lookup(later, "gone", vec![at(5555), me(5555)]),
            [at(5555), at(5555), me(5555)]
        );
        // Retractions are kept for a bounded time.
        let next_day = later + RETRACTION_KEPT;
        table.expire(next_day);
        assert_eq!(
            table.lookup(next_day, "expired", vec![at(6666)]),
            [at(6666)]
        );
    }

    #[test]
    fn an_evicted_live_announce_is_retracted_only_when_it_would_expire() {
        let t0 = Instant::now();
        let mut table = AnnounceTable::new(Some(AGE), ME);
        table.announce(t0, "svc", at(5555));
        for i in 0..MAX_NAMES {
            table.announce(t0 + secs(1), &format!("flood-{i}"), at(9));
        }
        assert_eq!(
            table.lookup(t0 + secs(2), "svc", vec![me(5555)]),
            [me(5555)]
        );
        assert_eq!(table.lookup(t0 + AGE, "svc", vec![me(5555)]), []);
    }

    #[test]
    fn retractions_are_bounded_in_count() {
        let t0 = Instant::now();
        let mut table = AnnounceTable::new(None, ME);
        for i in 0..MAX_RETRACTIONS + MAX_NAMES + 10 {
            table.announce(t0, &format!("n{i}"), at(1));
        }
        assert_eq!(table.retractions.order.len(), MAX_RETRACTIONS);
        let entries: usize = table.retractions.by_name.values().map(HashMap::len).sum();
        assert!(entries <= MAX_RETRACTIONS);
    }
}
