//! The relay: forwards a uTP session between two registered hosts that
//! cannot reach each other directly (both behind symmetric NATs, or UDP
//! between them blocked), as a sans-IO state machine (`docs/wire.md §5.5`).
//!
//! The introducer opens a *session* between two hosts it has registered,
//! by their observed addresses, when it rules a direct path out or a caller
//! asks for one after a failed punch; each side gets its own random 8-byte
//! token. A host then sends each datagram for the other wrapped in a relay
//! frame (`crate::transport::relay_frame`: magic, the sender's token, the
//! destination's address, the payload) to the introducer's main port, and
//! the relay sends the same payload on to the destination, in a frame that
//! carries the destination's token and the sender's address.
//!
//! [`Relay::forward`] decides about one frame and does nothing else: it
//! forwards only when the sender is registered, its token is its token of
//! the session with the frame's address, that address is the session's other
//! host and still registered, and both the sender's and the relay's byte
//! rates allow it. Everything else is dropped and counted by reason
//! ([`RelayStats`]). So the relay:
//! - never sends to an address that is not a registered host in a session
//!   with the sender (it is no open proxy, and no reflector);
//! - never amplifies: a session joins two addresses of one family, so the
//!   frame out is exactly as long as the frame in;
//! - cannot be used by a spoofer: without the sender's token (which only
//!   the introducer's answer to that host carried) a frame spends neither
//!   the sender's quota nor anyone's bandwidth;
//! - sees only what the hosts' uTP carries: ciphertext between our hosts
//!   (`docs/wire.md §8`).
//!
//! Sessions end when idle for [`SESSION_IDLE`], or when either host's
//! registration goes. The quotas are [`RelayLimits`], with documented
//! defaults; `dht` and `grape` take flags to change them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::units::{TokenBucket, TokenBuckets};

/// A host's token for one relay session: only frames carrying it are
/// forwarded from that host in that session.
pub type Token = [u8; crate::transport::RELAY_TOKEN_LEN];

/// A session neither side sent a frame on for this long ends; a host
/// that still needs it asks for a new one (a new introduction).
pub const SESSION_IDLE: Duration = Duration::from_secs(60);
/// A session idle this long is ended to make room when a new one would
/// be over a quota (the host's, the peer's or the relay's).
pub const EVICTABLE_IDLE: Duration = Duration::from_secs(10);
/// Default of [`RelayLimits::sessions_per_host`].
pub const SESSIONS_PER_HOST: usize = 16;
/// The hosts on one IP may send at most 1/`IP_BYTES_SHARE` of the relay's
/// total byte rate (and burst) together: with the defaults 1 MiB/s, four
/// hosts' worth, so at least eight addresses are needed to use up the relay.
pub const IP_BYTES_SHARE: u32 = 8;
/// Most sessions the hosts on one IP take part in: one address (many
/// registrations on it) cannot fill the relay. A carrier-grade NAT's
/// customers share it.
pub const SESSIONS_PER_IP: usize = 64;
/// Most sessions one host has with hosts on one other IP: callers on one
/// address cannot take all of a worker's [`SESSIONS_PER_HOST`].
pub const SESSIONS_PER_PEER_PER_IP: usize = 4;
/// Default of [`RelayLimits::sessions`].
pub const SESSIONS: usize = 4_096;
/// Default of [`RelayLimits::host_bytes_per_second`]: 256 KiB/s.
pub const HOST_BYTES_PER_SECOND: u32 = 256 << 10;
/// Default of [`RelayLimits::host_burst_bytes`]: 1 MiB.
pub const HOST_BURST_BYTES: u32 = 1 << 20;
/// Default of [`RelayLimits::bytes_per_second`]: 8 MiB/s.
pub const BYTES_PER_SECOND: u32 = 8 << 20;
/// Default of [`RelayLimits::burst_bytes`]: 8 MiB.
pub const BURST_BYTES: u32 = 8 << 20;
/// Idle sessions and those of hosts no longer registered are dropped at
/// most this often (on the next call after it).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The relay's quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    /// Most sessions one host (one observed address) takes part in; more
    /// are refused ([`Refusal::HostQuota`], [`Refusal::PeerQuota`]).
    pub sessions_per_host: usize,
    /// Most sessions at once in all; more are refused
    /// ([`Refusal::TotalQuota`]). 0 turns the relay off.
    pub sessions: usize,
    /// Bytes per second (frames as received) one host may send through the
    /// relay, over all its sessions; frames over it are dropped (uTP's
    /// congestion control backs off).
    pub host_bytes_per_second: u32,
    /// What a host may send at once beyond its rate.
    pub host_burst_bytes: u32,
    /// Bytes per second the relay forwards in all.
    pub bytes_per_second: u32,
    /// What the relay forwards at once beyond its rate.
    pub burst_bytes: u32,
    /// Bytes per second the hosts on one IP may send together (by default
    /// 1/[`IP_BYTES_SHARE`] of `bytes_per_second`).
    pub ip_bytes_per_second: u32,
    /// What they may send at once beyond it.
    pub ip_burst_bytes: u32,
}

impl RelayLimits {
    /// Sets the relay's total rate and burst, and the per-IP share of them
    /// (1/[`IP_BYTES_SHARE`]).
    pub fn with_total_rate(self, bytes_per_second: u32, burst_bytes: u32) -> Self {
        RelayLimits {
            bytes_per_second,
            burst_bytes,
            ip_bytes_per_second: (bytes_per_second / IP_BYTES_SHARE).max(1),
            ip_burst_bytes: (burst_bytes / IP_BYTES_SHARE).max(1),
            ..self
        }
    }
}

impl Default for RelayLimits {
    /// The documented defaults: [`SESSIONS_PER_HOST`], [`SESSIONS`],
    /// [`HOST_BYTES_PER_SECOND`], [`HOST_BURST_BYTES`],
    /// [`BYTES_PER_SECOND`], [`BURST_BYTES`].
    fn default() -> Self {
        RelayLimits {
            sessions_per_host: SESSIONS_PER_HOST,
            sessions: SESSIONS,
            host_bytes_per_second: HOST_BYTES_PER_SECOND,
            host_burst_bytes: HOST_BURST_BYTES,
            bytes_per_second: BYTES_PER_SECOND,
            burst_bytes: BURST_BYTES,
            ip_bytes_per_second: BYTES_PER_SECOND / IP_BYTES_SHARE,
            ip_burst_bytes: BURST_BYTES / IP_BYTES_SHARE,
        }
    }
}

/// Why the relay refused to open a session; [`Refusal::describe`] says it
/// to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The caller has [`RelayLimits::sessions_per_host`] sessions already.
    HostQuota(usize),
    /// The peer has [`RelayLimits::sessions_per_host`] sessions already.
    PeerQuota(usize),
    /// The relay has [`RelayLimits::sessions`] sessions already.
    TotalQuota(usize),
    /// One host is on IPv4, the other on IPv6 (their frames would differ
    /// in size).
    Family,
}

/// `n` relayed session(s), in words.
fn sessions(n: usize) -> String {
    match n {
        1 => "1 relayed session".to_string(),
        n => format!("{n} relayed sessions"),
    }
}

impl Refusal {
    /// What the caller is told.
    pub fn describe(self) -> String {
        match self {
            Refusal::HostQuota(n) => format!(
                "this host already has {} (the most per host), none idle for 10 s; close some connections, or try again when one is idle", sessions(n)
            ),
            Refusal::PeerQuota(n) => format!(
                "the peer already has {} (the most per host), none idle for 10 s; try another peer of the service, or later", sessions(n)
            ),
            Refusal::TotalQuota(0) => {
                "relaying is turned off on this introducer".to_string()
            }
            Refusal::TotalQuota(n) => format!(
                "it relays {n} sessions already (the most in all); try later, or another introducer"
            ),
            Refusal::Family => {
                "one host is on IPv4 and the other on IPv6; the relay joins hosts of one address family only".to_string()
            }
        }
    }
}

/// What the relay did, by outcome; every dropped frame is counted once.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    /// Sessions open now.
    pub sessions: u64,
    /// Sessions opened so far.
    pub opened: u64,
    /// Sessions refused over a quota (or between address families).
    pub refused: u64,
    /// Frames forwarded.
    pub frames: u64,
    /// Bytes forwarded (frames as sent).
    pub bytes: u64,
    /// Frames dropped: not a relay frame (too short, bad address).
    pub malformed: u64,
    /// Frames dropped: no session between the sender and the address.
    pub unknown_session: u64,
    /// Frames dropped: the token is not the sender's for that session.
    pub bad_token: u64,
    /// Frames dropped: a side is no longer registered (its session ends).
    pub unregistered: u64,
    /// Frames dropped: over the sender's or the relay's byte rate.
    pub over_rate: u64,
}

impl RelayStats {
    /// One line for logs.
    pub fn summary(&self) -> String {
        format!(
            "{} relay sessions open ({} opened, {} refused); {} frames ({} bytes) forwarded; dropped: {} malformed, {} without a session, {} with a bad token, {} from or to an unregistered host, {} over a byte rate",
            self.sessions,
            self.opened,
            self.refused,
            self.frames,
            self.bytes,
            self.malformed,
            self.unknown_session,
            self.bad_token,
            self.unregistered,
            self.over_rate
        )
    }
}

/// One session: two hosts in address order, their tokens, its last use.
#[derive(Debug)]
struct Session {
    tokens: [Token; 2],
    last_used: Instant,
}

/// The relay's sessions and quotas.
#[derive(Debug)]
pub struct Relay {
    limits: RelayLimits,
    /// By the two hosts' observed addresses, the lower first.
    sessions: HashMap<(SocketAddr, SocketAddr), Session>,
    /// Sessions per host.
    per_host: HashMap<SocketAddr, usize>,
    /// Bytes each host sent through the relay.
    host_bytes: TokenBuckets<SocketAddr>,
    /// Bytes the hosts on each IP sent through the relay, together: many
    /// registrations on one address share [`IP_BYTES_SHARE`] of the total.
    ip_bytes: TokenBuckets<std::net::IpAddr>,
    /// Bytes forwarded in all; created at the first frame.
    all_bytes: Option<TokenBucket>,
    next_sweep: Option<Instant>,
    stats: RelayStats,
}

/// The session key of two hosts, and which side `a` is (0 or 1).
fn key(a: SocketAddr, b: SocketAddr) -> ((SocketAddr, SocketAddr), usize) {
    if a <= b {
        ((a, b), 0)
    } else {
        ((b, a), 1)
    }
}

/// Compares two tokens in constant time (a spoofer learns nothing from how
/// long a guess took to drop; it cannot time the relay anyway, but cheap).
fn same_token(a: &Token, b: &Token) -> bool {
    a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

impl Relay {
    /// A relay without sessions, with these quotas.
    pub fn new(limits: RelayLimits) -> Self {
        Relay {
            limits,
            sessions: HashMap::new(),
            per_host: HashMap::new(),
            host_bytes: TokenBuckets::new(
                limits.host_bytes_per_second,
                limits.host_burst_bytes,
                // Every host of a full relay has a bucket.
                limits.sessions.saturating_mul(2).max(1),
            ),
            ip_bytes: TokenBuckets::new(
                limits.ip_bytes_per_second,
                limits.ip_burst_bytes,
                limits.sessions.saturating_mul(2).max(1),
            ),
            all_bytes: None,
            next_sweep: None,
            stats: RelayStats::default(),
        }
    }

    /// Its quotas.
    pub fn limits(&self) -> RelayLimits {
        self.limits
    }

    /// What it did so far.
    pub fn stats(&self) -> RelayStats {
        RelayStats {
            sessions: self.sessions.len() as u64,
            ..self.stats
        }
    }

    /// Opens (or refreshes) the session between `caller` and `peer`, both
    /// registered hosts: returns the caller's token and the peer's. An
    /// existing session keeps its tokens (a repeated introduction gets the
    /// same answer).
    pub fn open(
        &mut self,
        now: Instant,
        caller: SocketAddr,
        peer: SocketAddr,
        registered: impl Fn(SocketAddr) -> bool,
    ) -> Result<(Token, Token), Refusal> {
        self.sweep(now, &registered);
        let (k, side) = key(caller, peer);
        // A repeated introduction gets the same tokens but does not count
        // as use: only forwarded frames keep a session from being idle, so
        // introductions alone cannot hold a host's sessions.
        if let Some(s) = self.sessions.get(&k) {
            return Ok((s.tokens[side], s.tokens[1 - side]));
        }
        // The hosts on one IP have a share of their own: over it, their
        // least recently used session ends (whatever its age), so a
        // script's fresh `call`s each get one, and an address can only
        // crowd out itself.
        self.end_lru_where(
            |a, b| (a == peer && b.ip() == caller.ip()) || (b == peer && a.ip() == caller.ip()),
            SESSIONS_PER_PEER_PER_IP,
        );
        self.end_lru_where(
            |a, b| a.ip() == caller.ip() || b.ip() == caller.ip(),
            SESSIONS_PER_IP,
        );
        // A full host (or relay) makes room by ending its session idle the
        // longest, if that one is idle enough: a script's `call`s, each a
        // new host and session, do not lock a worker out for a minute.
        for host in [Some(caller), Some(peer), None] {
            let full = match host {
                Some(h) => self.count(h) >= self.limits.sessions_per_host,
                None => self.sessions.len() >= self.limits.sessions,
            };
            if full {
                self.end_idlest(now, host);
            }
        }
        let refused = if caller.is_ipv4() != peer.is_ipv4() || caller == peer {
            Some(Refusal::Family)
        } else if self.sessions.len() >= self.limits.sessions {
            Some(Refusal::TotalQuota(self.limits.sessions))
        } else if self.count(caller) >= self.limits.sessions_per_host {
            Some(Refusal::HostQuota(self.limits.sessions_per_host))
        } else if self.count(peer) >= self.limits.sessions_per_host {
            Some(Refusal::PeerQuota(self.limits.sessions_per_host))
        } else {
            None
        };
        if let Some(refusal) = refused {
            self.stats.refused += 1;
            return Err(refusal);
        }
        let tokens: [Token; 2] = [rand::random(), rand::random()];
        self.sessions.insert(
            k,
            Session {
                tokens,
                last_used: now,
            },
        );
        *self.per_host.entry(caller).or_default() += 1;
        *self.per_host.entry(peer).or_default() += 1;
        self.stats.opened += 1;
        Ok((tokens[side], tokens[1 - side]))
    }

    /// Ends the session (of `host`, or of anyone) idle the longest, if it
    /// has been idle for [`EVICTABLE_IDLE`] at least. O(sessions), only
    /// when a quota is reached.
    fn end_idlest(&mut self, now: Instant, host: Option<SocketAddr>) {
        let idlest = self
            .sessions
            .iter()
            .filter(|((a, b), _)| host.is_none_or(|h| h == *a || h == *b))
            .min_by_key(|(_, s)| s.last_used)
            .filter(|(_, s)| now.saturating_duration_since(s.last_used) >= EVICTABLE_IDLE)
            .map(|(k, _)| *k);
        if let Some(k) = idlest {
            self.remove(k);
        }
    }

    /// While at least `limit` sessions match `share`, ends the least
    /// recently used of them. O(sessions), only when a session opens.
    fn end_lru_where(&mut self, share: impl Fn(SocketAddr, SocketAddr) -> bool, limit: usize) {
        loop {
            let matching: Vec<_> = self
                .sessions
                .iter()
                .filter(|((a, b), _)| share(*a, *b))
                .map(|(k, s)| (s.last_used, *k))
                .collect();
            match matching.iter().min() {
                Some(&(_, k)) if matching.len() >= limit => self.remove(k),
                _ => return,
            }
        }
    }

    fn count(&self, host: SocketAddr) -> usize {
        self.per_host.get(&host).copied().unwrap_or(0)
    }

    fn remove(&mut self, k: (SocketAddr, SocketAddr)) {
        if self.sessions.remove(&k).is_none() {
            return;
        }
        for host in [k.0, k.1] {
            if let Some(n) = self.per_host.get_mut(&host) {
                *n -= 1;
                if *n == 0 {
                    self.per_host.remove(&host);
                }
            }
        }
    }

    /// Drops idle sessions and those of hosts no longer registered, at
    /// most every [`SWEEP_INTERVAL`].
    /// Ends idle sessions and those of hosts no longer registered (at most
    /// every [`SWEEP_INTERVAL`]); a driver calls it on a timer too, so the
    /// session count is current while nothing arrives.
    pub fn sweep(&mut self, now: Instant, registered: &impl Fn(SocketAddr) -> bool) {
        if self.next_sweep.is_some_and(|at| now < at) {
            return;
        }
        self.next_sweep = Some(now + SWEEP_INTERVAL);
        let ended: Vec<_> = self
            .sessions
            .iter()
            .filter(|((a, b), s)| {
                now.saturating_duration_since(s.last_used) >= SESSION_IDLE
                    || !registered(*a)
                    || !registered(*b)
            })
            .map(|(k, _)| *k)
            .collect();
        for k in ended {
            self.remove(k);
        }
    }

    /// Counts a datagram that looked like a relay frame but did not parse.
    pub fn malformed(&mut self) {
        self.stats.malformed += 1;
    }

    /// Decides about one frame of `len` bytes from `from` carrying `token`
    /// for the host at `to`: `Some(receiver's token)` when it is to be
    /// forwarded (as a frame of the same length naming `from`), `None` when
    /// it is dropped (and counted). `registered` says whether an observed
    /// address is a registered host now. O(1) hash look-ups and one sweep
    /// step: a flood of frames cannot starve the introductions.
    pub fn forward(
        &mut self,
        now: Instant,
        from: SocketAddr,
        token: &Token,
        to: SocketAddr,
        len: usize,
        registered: impl Fn(SocketAddr) -> bool,
    ) -> Option<Token> {
        self.sweep(now, &registered);
        let (k, side) = key(from, to);
        let Some(session) = self.sessions.get(&k) else {
            self.stats.unknown_session += 1;
            return None;
        };
        if !same_token(&session.tokens[side], token) {
            self.stats.bad_token += 1;
            return None;
        }
        if !registered(from) || !registered(to) {
            self.stats.unregistered += 1;
            self.remove(k);
            return None;
        }
        let bytes = u32::try_from(len).unwrap_or(u32::MAX);
        let all = self.all_bytes.get_or_insert_with(|| {
            TokenBucket::new(now, self.limits.bytes_per_second, self.limits.burst_bytes)
        });
        // The relay's own rate first: a host is not charged for a frame
        // the relay drops anyway. The hosts on one IP share a part of the
        // total, so a few addresses cannot take all of it.
        if !all.has_many(now, bytes)
            || !self.ip_bytes.take_many(from.ip(), now, bytes)
            || !self.host_bytes.take_many(from, now, bytes)
        {
            self.stats.over_rate += 1;
            return None;
        }
        all.take_many(now, bytes);
        let session = self.sessions.get_mut(&k).expect("looked up above");
        session.last_used = now;
        self.stats.frames += 1;
        self.stats.bytes += len as u64;
        Some(session.tokens[1 - side])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// Two registered hosts behind symmetric NATs, and the set of
    /// registered addresses.
    fn two_hosts() -> (SocketAddr, SocketAddr, HashSet<SocketAddr>) {
        let a = addr("198.51.100.2:40001");
        let b = addr("203.0.113.3:50002");
        (a, b, HashSet::from([a, b]))
    }

    #[test]
    fn callers_on_one_ip_share_a_few_of_a_peers_sessions_and_introductions_do_not_hold_them() {
        let worker = addr("203.0.113.3:50002");
        let callers: Vec<SocketAddr> = (0..8)
            .map(|i| addr(&format!("198.51.100.9:{}", 40_000 + i)))
            .collect();
        let is = |_| true;
        let mut relay = Relay::new(RelayLimits::default());
        let t0 = Instant::now();
        let other = addr("192.0.2.5:1");
        let (other_token, _) = relay.open(t0, other, worker, is).unwrap();
        // Fresh callers on one IP, one a second (a script's `call`s): each
        // gets a session, and the IP's oldest gives way beyond its share.
        for (i, c) in callers.iter().enumerate() {
            let now = t0 + Duration::from_secs(i as u64 + 1);
            relay.open(now, *c, worker, is).unwrap();
        }
        let with_ip = |r: &Relay| {
            r.sessions
                .keys()
                .filter(|(a, b)| a.ip() == callers[0].ip() || b.ip() == callers[0].ip())
                .count()
        };
        assert_eq!(with_ip(&relay), SESSIONS_PER_PEER_PER_IP);
        assert!(
            relay.sessions.contains_key(&key(callers[7], worker).0),
            "the newest is kept"
        );
        assert!(
            !relay.sessions.contains_key(&key(callers[0], worker).0),
            "the oldest gave way"
        );
        // The caller on another IP kept its session.
        assert_eq!(
            relay.open(t0, other, worker, is).map(|t| t.0),
            Ok(other_token)
        );

        // Re-sent introductions do not keep sessions from being idle: once
        // they are, they make room for a newcomer on another IP.
        let limits = RelayLimits {
            sessions_per_host: 2,
            ..RelayLimits::default()
        };
        let mut small = Relay::new(limits);
        let (a, b) = (addr("192.0.2.1:1"), addr("192.0.2.2:1"));
        small.open(t0, a, worker, is).unwrap();
        small.open(t0, b, worker, is).unwrap();
        let later = t0 + EVICTABLE_IDLE;
        small.open(later, a, worker, is).unwrap();
        small.open(later, b, worker, is).unwrap();
        assert!(
            small.open(later, addr("192.0.2.3:1"), worker, is).is_ok(),
            "an idle session made room although it was introduced again"
        );
    }

    #[test]
    fn a_session_forwards_between_its_two_hosts_with_their_tokens() {
        let (a, b, registered) = two_hosts();
        let is = |x| registered.contains(&x);
        let mut relay = Relay::new(RelayLimits::default());
        let now = Instant::now();
        let (ta, tb) = relay.open(now, a, b, is).unwrap();
        assert_ne!(ta, tb);
        // Asked again (a re-sent introduction): the same tokens, either way.
        assert_eq!(relay.open(now, a, b, is), Ok((ta, tb)));
        assert_eq!(relay.open(now, b, a, is), Ok((tb, ta)));
        assert_eq!(relay.stats().sessions, 1);
        // a → b goes out with b's token, and back with a's.
        assert_eq!(relay.forward(now, a, &ta, b, 100, is), Some(tb));
        assert_eq!(relay.forward(now, b, &tb, a, 100, is), Some(ta));
        let stats = relay.stats();
        assert_eq!((stats.frames, stats.bytes), (2, 200));
    }

    #[test]
    fn spoofed_sources_wrong_tokens_and_strangers_are_dropped() {
        let (a, b, mut registered) = two_hosts();
        let mut relay = Relay::new(RelayLimits::default());
        let now = Instant::now();
        let (ta, tb) = relay.open(now, a, b, |x| registered.contains(&x)).unwrap();
        let victim = addr("192.0.2.9:80");
        let is = |x| registered.contains(&x);
        // A's token, but to an address outside the session: never sent.
        assert_eq!(relay.forward(now, a, &ta, victim, 100, is), None);
        // From a spoofed source, or B's own token from A's address.
        assert_eq!(relay.forward(now, victim, &ta, b, 100, is), None);
        assert_eq!(relay.forward(now, a, &tb, b, 100, is), None);
        // A guessed token.
        assert_eq!(relay.forward(now, a, &[0; 8], b, 100, is), None);
        let stats = relay.stats();
        assert_eq!((stats.unknown_session, stats.bad_token), (2, 2));
        assert_eq!(stats.frames, 0);
        // The victim registers: still no session with it, nothing goes.
        registered.insert(victim);
        let is = |x| registered.contains(&x);
        assert_eq!(relay.forward(now, a, &ta, victim, 100, is), None);
        // B's registration goes: its session ends at the next frame.
        registered.remove(&b);
        let is = |x| registered.contains(&x);
        assert_eq!(relay.forward(now, a, &ta, b, 100, is), None);
        assert_eq!(relay.stats().unregistered, 1);
        assert_eq!(relay.stats().sessions, 0);
    }

    #[test]
    fn sessions_end_when_idle_or_when_a_registration_goes() {
        let (a, b, mut registered) = two_hosts();
        let c = addr("203.0.113.4:50003");
        registered.insert(c);
        let mut relay = Relay::new(RelayLimits::default());
        let now = Instant::now();
        let is = |x| registered.contains(&x);
        let (ta, _) = relay.open(now, a, b, is).unwrap();
        relay.open(now, a, c, is).unwrap();
        // Used now and then, a session lives on.
        let mut t = now;
        for _ in 0..5 {
            t += SESSION_IDLE / 2;
            assert!(relay.forward(t, a, &ta, b, 10, is).is_some());
        }
        // The idle one ended at the sweep.
        assert_eq!(relay.stats().sessions, 1);
        // C unregisters and B goes idle: the next sweep ends both.
        registered.remove(&c);
        let is = |x| registered.contains(&x);
        let later = t + SESSION_IDLE;
        assert_eq!(relay.forward(later, a, &ta, b, 10, is), None);
        assert_eq!(relay.stats().sessions, 0);
        assert_eq!(relay.count(a), 0, "the per-host counts follow");
    }

    #[test]
    fn session_quotas_per_host_and_in_all_refuse_with_a_clear_reason() {
        let limits = RelayLimits {
            sessions_per_host: 2,
            sessions: 3,
            ..RelayLimits::default()
        };
        let mut relay = Relay::new(limits);
        let now = Instant::now();
        let host = |i: u8| addr(&format!("203.0.113.{i}:4000"));
        let all = |_| true;
        let a = host(1);
        relay.open(now, a, host(2), all).unwrap();
        relay.open(now, a, host(3), all).unwrap();
        let refused = relay.open(now, a, host(4), all).unwrap_err();
        assert_eq!(refused, Refusal::HostQuota(2));
        assert!(
            refused
                .describe()
                .contains("this host already has 2 relayed sessions (the most per host)"),
            "{}",
            refused.describe()
        );
        // The peer's quota counts too.
        assert_eq!(relay.open(now, host(5), a, all), Err(Refusal::PeerQuota(2)));
        relay.open(now, host(5), host(6), all).unwrap();
        let refused = relay.open(now, host(7), host(8), all).unwrap_err();
        assert_eq!(refused, Refusal::TotalQuota(3));
        assert!(refused.describe().contains("the most in all"));
        assert_eq!(relay.stats().refused, 3);
        // Sessions idle long enough make room instead: the oldest goes.
        let later = now + EVICTABLE_IDLE;
        relay.open(later, a, host(4), all).unwrap();
        assert_eq!(relay.count(a), 2);
        relay.open(later, host(7), host(8), all).unwrap();
        assert_eq!(relay.stats().sessions, 3);
        // Mixed families would make frames change size: refused.
        let mut relay = Relay::new(RelayLimits::default());
        assert_eq!(
            relay.open(now, a, addr("[2001:db8::1]:4000"), all),
            Err(Refusal::Family)
        );
    }

    #[test]
    fn the_hosts_on_one_ip_share_a_part_of_the_relays_rate() {
        let limits = RelayLimits::default().with_total_rate(80_000, 80_000);
        assert_eq!(limits.ip_burst_bytes, 10_000);
        let mut relay = Relay::new(limits);
        let now = Instant::now();
        let all = |_| true;
        let worker = addr("192.0.2.1:1");
        // Four hosts on one IP, each well within its own rate: together
        // they get the IP's 10,000 bytes, and no more.
        let mut sent = 0;
        for port in 1..=4u16 {
            let host = SocketAddr::new(std::net::IpAddr::from([198, 51, 100, 9]), port);
            let (token, _) = relay.open(now, host, worker, all).unwrap();
            sent += (0..10)
                .filter(|_| {
                    relay
                        .forward(now, host, &token, worker, 1_000, all)
                        .is_some()
                })
                .count();
        }
        assert_eq!(sent, 10);
        // A host on another IP still gets through.
        let other = addr("203.0.113.7:1");
        let (token, _) = relay.open(now, other, worker, all).unwrap();
        assert!(relay
            .forward(now, other, &token, worker, 1_000, all)
            .is_some());
    }

    #[test]
    fn byte_rates_per_host_and_in_all_drop_what_is_over() {
        let limits = RelayLimits {
            host_bytes_per_second: 10_000,
            host_burst_bytes: 20_000,
            bytes_per_second: 30_000,
            burst_bytes: 30_000,
            ..RelayLimits::default()
        };
        let mut relay = Relay::new(limits);
        let now = Instant::now();
        let all = |_| true;
        let host = |i: u8| addr(&format!("203.0.113.{i}:4000"));
        let (ta, _) = relay.open(now, host(1), host(2), all).unwrap();
        let (tc, _) = relay.open(now, host(3), host(4), all).unwrap();
        // A sends its burst, then is over its rate.
        let sent = (0..30)
            .filter(|_| {
                relay
                    .forward(now, host(1), &ta, host(2), 1_000, all)
                    .is_some()
            })
            .count();
        assert_eq!(sent, 20);
        // C still has the relay's remaining 10,000 bytes, and no more.
        let sent = (0..30)
            .filter(|_| {
                relay
                    .forward(now, host(3), &tc, host(4), 1_000, all)
                    .is_some()
            })
            .count();
        assert_eq!(sent, 10);
        assert_eq!(relay.stats().over_rate, 30);
        // A second later the rates have refilled.
        let later = now + Duration::from_secs(1);
        assert!(relay
            .forward(later, host(1), &ta, host(2), 1_000, all)
            .is_some());
    }
}
