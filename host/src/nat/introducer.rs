//! The introducer: the public side of introductions, as a sans-IO state
//! machine (`docs/wire.md §5.3`).
//!
//! A public `dht` node runs one on two UDP ports ([`super::IntroducerAddr`]).
//! It answers probes with the address it saw (and a filter test from a fresh
//! port), keeps the registrations of hosts behind NATs, and introduces
//! callers to them: it answers the caller with the peer's observed address
//! and asks the peer, over the mapping its registrations keep open, to punch
//! the caller. [`Introducer::on_message`] takes the time and one message and
//! returns the datagrams to send; [`super::introducer_driver`] owns the
//! sockets.
//!
//! Every source address can be spoofed, so (`docs/wire.md §5.4`):
//! - Only a probe is answered without proof, and only when the datagram is
//!   at least as long as the answer (hosts pad theirs to
//!   [`super::wire::HOST_DATAGRAM_MIN`]): never a reflector.
//! - `observed` carries a cookie, a keyed hash (HMAC-SHA-256, rotating
//!   secret) of the address it went to. `register` and `introduce` must echo
//!   a valid cookie for their source, which proves the sender receives
//!   there; without one they get only a fresh cookie (if padded enough).
//! - A registration is bound to its host's identity: `key` is its Ed25519
//!   public key and `sig` its signature over the cookie and port
//!   ([`super::wire::registration_signed_bytes`]), checked (strict
//!   verification, at most [`SIGNATURE_CHECKS_PER_SECOND`] per source IP).
//!   Another sender (the same NAT, a carrier-grade NAT, the same machine)
//!   can neither register under that key nor take over the public IP and
//!   port a live host claims, and punch requests carry the cookie of the
//!   host's registration so the host can tell them from forgeries.
//! - Introductions are rate-limited per source IP and punch requests per
//!   target; the registration table is bounded per IP and in all, and when
//!   full evicts the registration that would expire first.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::birthday::{ATTEMPTS_PER_10S, ATTEMPT_BURST, ATTEMPT_COST};
use super::kind::{method, BirthdayRole, Method, NatKind};
use super::relay::{Relay, RelayLimits, RelayStats, Token};
use super::wire::{Message, Outcome};
use crate::units::TokenBuckets;

/// A registration not refreshed for this long is forgotten: three of a
/// host's registration intervals ([`super::host::REGISTER_INTERVAL`]), so one
/// or two lost registrations do not make it unknown.
const REGISTRATION_TTL: Duration = Duration::from_secs(12);
/// An introduction the peer may not have received is re-sent to it when it
/// next registers, for this long.
const PENDING_TTL: Duration = Duration::from_secs(6);
/// Most hosts an introducer keeps registered; more are refused (a flood of
/// registrations cannot grow it without bound).
const MAX_REGISTRATIONS: usize = 65_536;
/// Most punch requests an introducer keeps for re-sending.
const MAX_PENDING: usize = 4_096;
/// Expired registrations and punch requests are dropped at most this often
/// (on the next message after it), not on every message.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Most hosts registered from one public IP (a carrier-grade NAT hides many
/// behind one): a flood from one address cannot fill the table.
const MAX_REGISTRATIONS_PER_IP: usize = 256;
/// The cookie secret is replaced this often; cookies made with the previous
/// one are still accepted, so a cookie lives 1–2 rotations. A host renews
/// its cookie with every registration (every 4 s) and probe.
pub const COOKIE_ROTATION: Duration = Duration::from_secs(120);
/// Introductions one source IP may ask for per second, and at once.
pub const INTRODUCTIONS_PER_SECOND: u32 = 20;
/// See [`INTRODUCTIONS_PER_SECOND`].
pub const INTRODUCTION_BURST: u32 = 40;
/// Punch requests one registered host is sent per second, and at once, in
/// all: what many callers together can make it punch.
pub const PUNCH_REQUESTS_PER_SECOND: u32 = 100;
/// See [`PUNCH_REQUESTS_PER_SECOND`].
pub const PUNCH_REQUEST_BURST: u32 = 200;
/// Punch requests one registered host is sent per second, and at once, on
/// behalf of one caller IP: one caller cannot use up the host's whole
/// budget and keep other callers from being introduced. Each fresh `call`
/// process is a new caller socket and needs its own punch: a script (or a
/// NAT of several callers) making a call every 100 ms stays within it (at
/// 2/s, the sixth of a quick series of calls waited out its timeout behind
/// a port-restricted NAT, measured in the lab).
pub const PUNCH_REQUESTS_PER_CALLER_PER_SECOND: u32 = 10;
/// See [`PUNCH_REQUESTS_PER_CALLER_PER_SECOND`].
pub const PUNCH_REQUEST_PER_CALLER_BURST: u32 = 20;
/// Most rate-limit buckets kept (per source IP, per target); the least
/// recently used is forgotten first.
const MAX_BUCKETS: usize = 4_096;

/// Registration signatures checked per second per source IP, and at once:
/// a host registers every 4 s, many hosts may share a carrier-grade NAT's
/// IP, and a check costs tens of microseconds.
pub const SIGNATURE_CHECKS_PER_SECOND: u32 = 100;
/// See [`SIGNATURE_CHECKS_PER_SECOND`].
pub const SIGNATURE_CHECK_BURST: u32 = 200;
/// Bytes of a cookie (128 bits of HMAC-SHA-256).
pub const COOKIE_BYTES: usize = 16;

/// What the introducer refused or dropped, by reason.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IntroducerStats {
    /// Datagrams shorter than the answer they asked for from an unverified
    /// source: dropped unanswered.
    pub unpadded: u64,
    /// `register` / `introduce` without a valid cookie: answered with a
    /// cookie only.
    pub challenged: u64,
    /// Registrations refused: the address is claimed by another live host,
    /// or the table (or the sender's IP's share) is full.
    pub refused_registrations: u64,
    /// Registrations whose key or signature did not hold.
    pub bad_signatures: u64,
    /// Introductions and punch requests over their rate.
    pub rate_limited: u64,
    /// Birthday introductions refused: over [`ATTEMPTS_PER_10S`] for the
    /// target, or over its punch request rates (answered `impossible`).
    pub birthdays_refused: u64,
}

/// Which of the introducer's sockets (`docs/wire.md §5.2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// The main port: everything but the probe's second leg.
    Main,
    /// The other port, which only answers probes.
    Alt,
    /// A new socket on an ephemeral port, for this one datagram: the filter
    /// test must come from a port the host's NAT cannot have seen before.
    Fresh,
}

/// A datagram the introducer must send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The socket to send it from.
    pub via: Port,
    /// The host's observed address.
    pub to: SocketAddr,
    /// What to send; the driver encodes it.
    pub message: Message,
}

/// One registered host, keyed by its observed address.
#[derive(Debug)]
struct Registration {
    /// Its local RPC port: the port the DHT announces for it.
    port: u16,
    nat: NatKind,
    expires: Instant,
    /// The host's identity (Ed25519 public key, hex).
    key: String,
    /// The cookie and signature of its accepted registration: the cookie
    /// goes back in punch requests; a registration repeating both needs no
    /// new check.
    cookie: String,
    sig: String,
}

/// The registered hosts, indexed so that every operation is O(log n): by
/// observed address, by (key, local port), by the (IP, local port) they
/// claim, by IP (a count), and by expiry.
///
/// A host is its key and its local RPC port: hosts that share a state
/// directory (on one machine) share an identity, each with its own port.
#[derive(Debug, Default)]
struct Registrations {
    hosts: HashMap<SocketAddr, Registration>,
    by_key: HashMap<(String, u16), SocketAddr>,
    claims: HashMap<(std::net::IpAddr, u16), SocketAddr>,
    per_ip: HashMap<std::net::IpAddr, usize>,
    expiries: std::collections::BTreeSet<(Instant, SocketAddr)>,
}

impl Registrations {
    fn len(&self) -> usize {
        self.hosts.len()
    }

    fn get(&self, addr: &SocketAddr) -> Option<&Registration> {
        self.hosts.get(addr)
    }

    /// The host the DHT announces as `peer`: registered at that observed
    /// address, or claiming its IP and local port (behind a symmetric NAT
    /// the observed port differs from the local one).
    fn find_peer(&self, peer: SocketAddr) -> Option<(SocketAddr, &Registration)> {
        let addr = match self.hosts.contains_key(&peer) {
            true => peer,
            false => *self.claims.get(&(peer.ip(), peer.port()))?,
        };
        self.hosts.get(&addr).map(|r| (addr, r))
    }

    /// The registration claiming `ip` and local port `port`, with its
    /// observed address.
    fn claim(&self, ip: std::net::IpAddr, port: u16) -> Option<(SocketAddr, &Registration)> {
        let addr = *self.claims.get(&(ip, port))?;
        self.hosts.get(&addr).map(|r| (addr, r))
    }

    fn has_host(&self, key: &str, port: u16) -> bool {
        self.by_key.contains_key(&(key.to_string(), port))
    }

    fn on_ip(&self, ip: std::net::IpAddr) -> usize {
        self.per_ip.get(&ip).copied().unwrap_or(0)
    }

    fn remove(&mut self, addr: SocketAddr) {
        let Some(r) = self.hosts.remove(&addr) else {
            return;
        };
        if self.by_key.get(&(r.key.clone(), r.port)) == Some(&addr) {
            self.by_key.remove(&(r.key.clone(), r.port));
        }
        if self.claims.get(&(addr.ip(), r.port)) == Some(&addr) {
            self.claims.remove(&(addr.ip(), r.port));
        }
        if let Some(n) = self.per_ip.get_mut(&addr.ip()) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&addr.ip());
            }
        }
        self.expiries.remove(&(r.expires, addr));
    }

    /// Stores `r` at `addr`, replacing what was there and the same host's
    /// (key and port) registration elsewhere (its NAT rebound it to a new
    /// address).
    fn insert(&mut self, addr: SocketAddr, r: Registration) {
        self.remove(addr);
        let host = (r.key.clone(), r.port);
        if let Some(&old) = self.by_key.get(&host) {
            self.remove(old);
        }
        self.by_key.insert(host, addr);
        self.claims.insert((addr.ip(), r.port), addr);
        *self.per_ip.entry(addr.ip()).or_default() += 1;
        self.expiries.insert((r.expires, addr));
        self.hosts.insert(addr, r);
    }

    /// Drops the registrations expired at `now`.
    fn expire(&mut self, now: Instant) {
        while let Some(&(at, addr)) = self.expiries.first() {
            if at > now {
                break;
            }
            self.remove(addr);
        }
    }

    /// Drops the registration that would expire first.
    fn evict_first_to_expire(&mut self) {
        if let Some(&(_, addr)) = self.expiries.first() {
            self.remove(addr);
        }
    }
}

/// A registration as its host signs it (`docs/wire.md §5.1`): its local
/// RPC port, its identity's public key, the cookie and the signature.
struct SignedRegistration {
    port: u16,
    key: String,
    cookie: String,
    sig: String,
}

/// The public side: registrations and introductions.
#[derive(Debug)]
pub struct Introducer {
    /// Registered hosts.
    hosts: Registrations,
    /// Punch requests re-sent when their target next registers.
    pending: Vec<(SocketAddr, Instant, Message)>,
    /// When expired registrations and punch requests are next dropped.
    next_sweep: Option<Instant>,
    /// The cookie secrets: current, previous.
    secrets: [[u8; 32]; 2],
    /// When the current secret is replaced; `None` before the first message.
    rotate_at: Option<Instant>,
    /// Introductions asked for, per source IP.
    introductions: TokenBuckets<std::net::IpAddr>,
    /// Punch requests sent, per registered host.
    punch_requests: TokenBuckets<SocketAddr>,
    /// Punch requests sent, per registered host and caller IP.
    punch_requests_by_caller: TokenBuckets<(SocketAddr, std::net::IpAddr)>,
    /// Registration signatures checked, per source IP.
    signature_checks: TokenBuckets<std::net::IpAddr>,
    /// Birthday attempts asked of each registered host, in tenths
    /// ([`super::birthday::attempt_budget`]): one attempt makes it open
    /// hundreds of sockets or send up to 1,500 probes, a hundred times what
    /// a punch request costs.
    birthdays: TokenBuckets<SocketAddr>,
    stats: IntroducerStats,
    /// Sessions between registered hosts no direct path joins.
    relay: Relay,
}

impl Default for Introducer {
    fn default() -> Self {
        Self::new()
    }
}

impl Introducer {
    /// An introducer that knows nobody yet, with fresh random cookie
    /// secrets and a relay with the default quotas.
    pub fn new() -> Self {
        Self::with_relay(RelayLimits::default())
    }

    /// [`Self::new`] with the relay's quotas `limits`.
    pub fn with_relay(limits: RelayLimits) -> Self {
        Introducer {
            relay: Relay::new(limits),
            hosts: Registrations::default(),
            pending: Vec::new(),
            next_sweep: None,
            secrets: [rand::random(), rand::random()],
            rotate_at: None,
            introductions: TokenBuckets::new(
                INTRODUCTIONS_PER_SECOND,
                INTRODUCTION_BURST,
                MAX_BUCKETS,
            ),
            punch_requests: TokenBuckets::new(
                PUNCH_REQUESTS_PER_SECOND,
                PUNCH_REQUEST_BURST,
                MAX_BUCKETS,
            ),
            punch_requests_by_caller: TokenBuckets::new(
                PUNCH_REQUESTS_PER_CALLER_PER_SECOND,
                PUNCH_REQUEST_PER_CALLER_BURST,
                MAX_BUCKETS,
            ),
            signature_checks: TokenBuckets::new(
                SIGNATURE_CHECKS_PER_SECOND,
                SIGNATURE_CHECK_BURST,
                MAX_BUCKETS,
            ),
            birthdays: TokenBuckets::new(
                ATTEMPTS_PER_10S,
                ATTEMPT_BURST * ATTEMPT_COST,
                MAX_BUCKETS,
            ),
            stats: IntroducerStats::default(),
        }
    }

    /// How many hosts are registered.
    pub fn registered(&self) -> usize {
        self.hosts.len()
    }

    /// What it refused so far.
    pub fn stats(&self) -> IntroducerStats {
        self.stats
    }

    /// The keyed hash of `addr` under `secret`: HMAC-SHA-256 of the
    /// address's text.
    fn mac(secret: &[u8; 32], addr: SocketAddr) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret)
            .expect("HMAC takes keys of any length");
        mac.update(addr.to_string().as_bytes());
        mac
    }

    /// The cookie a host at `addr` gets now: the first
    /// [`COOKIE_BYTES`] of its keyed hash, in hex.
    pub fn cookie(&self, addr: SocketAddr) -> String {
        use hmac::Mac;
        crate::units::hex(
            &Self::mac(&self.secrets[0], addr).finalize().into_bytes()[..COOKIE_BYTES],
        )
    }

    /// Whether `cookie` is one this introducer gave `addr` (under the
    /// current or the previous secret); compared in constant time.
    fn verified(&self, addr: SocketAddr, cookie: &str) -> bool {
        use hmac::Mac;
        let Some(tag) = crate::units::from_hex(cookie).filter(|t| t.len() == COOKIE_BYTES) else {
            return false;
        };
        self.secrets
            .iter()
            .any(|secret| Self::mac(secret, addr).verify_truncated_left(&tag).is_ok())
    }

    fn rotate(&mut self, now: Instant) {
        match self.rotate_at {
            None => self.rotate_at = Some(now + COOKIE_ROTATION),
            Some(at) if now >= at => {
                self.secrets = [rand::random(), self.secrets[0]];
                self.rotate_at = Some(now + COOKIE_ROTATION);
            }
            Some(_) => {}
        }
    }

    /// Whether the verified sender `from` may register local port `port`
    /// with `key`: no other live host (another key) holds an address it
    /// would take over (the same observed address, or the same IP and
    /// local port, which introductions match on), and there is room, if
    /// need be by evicting the registration that would expire first.
    ///
    /// A claim is only a declaration, except when the sender's observed
    /// address is the very IP and port it claims (no NAT, or one that kept
    /// the port): the cookie proves it receives there, so it owns the claim
    /// and takes it from a sender that merely declared it (a squatter on
    /// the same IP that registered first, or during a restart).
    fn may_register(&mut self, from: SocketAddr, port: u16, key: &str) -> bool {
        if self.hosts.get(&from).is_some_and(|r| r.key != key) {
            return false;
        }
        if let Some((holder, r)) = self.hosts.claim(from.ip(), port) {
            if r.key != key {
                let proven = |addr: SocketAddr| addr.port() == port;
                if !proven(from) || proven(holder) {
                    return false;
                }
                self.hosts.remove(holder);
            }
        }
        if self.hosts.get(&from).is_some() || self.hosts.has_host(key, port) {
            return true;
        }
        if self.hosts.on_ip(from.ip()) >= MAX_REGISTRATIONS_PER_IP {
            return false;
        }
        if self.hosts.len() >= MAX_REGISTRATIONS {
            self.hosts.evict_first_to_expire();
        }
        true
    }

    /// Registers the verified sender `from` (its cookie checked) behind
    /// `nat` as `signed` says, unless the signature does not hold or is
    /// over its rate, or [`Self::may_register`] refuses (each counted).
    /// Returns whether it is registered now.
    fn register(
        &mut self,
        now: Instant,
        from: SocketAddr,
        nat: NatKind,
        signed: SignedRegistration,
    ) -> bool {
        let SignedRegistration {
            port,
            key,
            cookie,
            sig,
        } = signed;
        let repeated = self
            .hosts
            .get(&from)
            .is_some_and(|r| r.key == key && r.cookie == cookie && r.sig == sig && r.port == port);
        if !repeated {
            if !self.signature_checks.take(from.ip(), now) {
                self.stats.rate_limited += 1;
                return false;
            }
            if !signature_holds(&key, &sig, &cookie, port) {
                self.stats.bad_signatures += 1;
                return false;
            }
        }
        if !self.may_register(from, port, &key) {
            self.stats.refused_registrations += 1;
            return false;
        }
        // The same host from a new address (its NAT rebound): the old
        // registration goes (`insert` drops it).
        self.hosts.insert(
            from,
            Registration {
                port,
                nat,
                expires: now + REGISTRATION_TTL,
                key,
                cookie,
                sig,
            },
        );
        true
    }

    /// Whether a live host is registered at the observed address `addr`.
    fn is_registered(hosts: &Registrations, addr: SocketAddr, now: Instant) -> bool {
        hosts.get(&addr).is_some_and(|r| r.expires > now)
    }

    /// The outcome for a caller at `from` (behind `nat`) that needs the
    /// relay toward the registered host at `addr` (behind `peer_nat`,
    /// announced as `peer`): the caller is registered on the spot with the
    /// registration its introduction carries (`signed`) if need be, and a
    /// session is opened. Returns the caller's token and the peer's (16 hex
    /// digits each), or the outcome that says why not.
    fn relay(
        &mut self,
        now: Instant,
        (from, nat): (SocketAddr, NatKind),
        peer: SocketAddr,
        (addr, peer_nat): (SocketAddr, NatKind),
        signed: SignedRegistration,
    ) -> Result<(String, String), Outcome> {
        let registered = Self::is_registered(&self.hosts, from, now)
            || (!signed.key.is_empty() && self.register(now, from, nat, signed));
        if !registered {
            return Err(Outcome::Impossible {
                reason: format!(
                    "no direct path to {peer} ({}) from this host ({}), and the introducer could not register this host for its relay (a bad signature, or its address is claimed by another host); a relay is needed",
                    peer_nat.describe(),
                    nat.describe()
                ),
            });
        }
        let hosts = &self.hosts;
        match self
            .relay
            .open(now, from, addr, |a| Self::is_registered(hosts, a, now))
        {
            Ok((caller, peer)) => Ok((crate::units::hex(&caller), crate::units::hex(&peer))),
            Err(refusal) => Err(Outcome::RelayRefused {
                reason: refusal.describe(),
            }),
        }
    }

    /// A relay frame of `len` bytes from `from` with `token`, for the host
    /// at `to`: the receiver's token if it is to be forwarded (see
    /// [`Relay::forward`]).
    pub fn relay_frame(
        &mut self,
        now: Instant,
        from: SocketAddr,
        token: &Token,
        to: SocketAddr,
        len: usize,
    ) -> Option<Token> {
        let hosts = &self.hosts;
        self.relay.forward(now, from, token, to, len, |a| {
            Self::is_registered(hosts, a, now)
        })
    }

    /// Counts a datagram on the main port that looked like a relay frame
    /// but did not parse.
    pub fn malformed_relay_frame(&mut self) {
        self.relay.malformed();
    }

    /// What the relay did so far.
    pub fn relay_stats(&self) -> RelayStats {
        self.relay.stats()
    }

    /// Forgets expired registrations and ends the relay sessions that are
    /// idle or lost a registered host: for a driver's timer, so what it
    /// reports stays current while no datagram arrives.
    pub fn tick(&mut self, now: Instant) {
        self.hosts.expire(now);
        let hosts = &self.hosts;
        self.relay
            .sweep(now, &|a| Self::is_registered(hosts, a, now));
    }

    /// Handles one message of `received` bytes (the whole datagram) that
    /// arrived on `via` from `from`.
    pub fn on_message(
        &mut self,
        now: Instant,
        via: Port,
        from: SocketAddr,
        message: Message,
        received: usize,
    ) -> Vec<Outgoing> {
        if self.next_sweep.is_none_or(|at| now >= at) {
            self.next_sweep = Some(now + SWEEP_INTERVAL);
            self.hosts.expire(now);
            self.pending.retain(|(_, until, _)| *until > now);
        }
        self.rotate(now);
        let reply = |message| Outgoing {
            via,
            to: from,
            message,
        };
        let cookie = self.cookie(from);
        let observed = |id| Message::Observed {
            id,
            addr: from,
            cookie: cookie.clone(),
        };
        // What an unverified source may be sent: no more than it sent.
        let within = |out: Vec<Outgoing>, stats: &mut IntroducerStats| {
            let bytes: usize = out
                .iter()
                .map(|o| super::wire::encode(&o.message).len())
                .sum();
            if bytes > received {
                stats.unpadded += 1;
                vec![]
            } else {
                out
            }
        };
        match message {
            Message::Probe { id } if via == Port::Main => within(
                vec![
                    // The filter test leaves first, so its answer is in
                    // before the host goes on to probe the other port.
                    Outgoing {
                        via: Port::Fresh,
                        to: from,
                        message: Message::FilterTest { id },
                    },
                    reply(observed(id)),
                ],
                &mut self.stats,
            ),
            Message::Probe { id } => within(vec![reply(observed(id))], &mut self.stats),
            Message::Register { id, cookie, .. } | Message::Introduce { id, cookie, .. }
                if via != Port::Main || !self.verified(from, &cookie) =>
            {
                self.stats.challenged += 1;
                if via != Port::Main {
                    return vec![];
                }
                within(vec![reply(observed(id))], &mut self.stats)
            }
            Message::Register {
                id,
                port,
                nat,
                key,
                cookie,
                sig,
            } => {
                let signed = SignedRegistration {
                    port,
                    key,
                    cookie,
                    sig,
                };
                if !self.register(now, from, nat, signed) {
                    return vec![]; // The host retries at its next registration.
                }
                let mut out = vec![reply(observed(id))];
                out.extend(
                    self.pending
                        .iter()
                        .filter(|(to, until, _)| *to == from && *until > now)
                        .map(|(to, _, m)| Outgoing {
                            via: Port::Main,
                            to: *to,
                            message: m.clone(),
                        }),
                );
                out
            }
            Message::Introduce {
                id,
                peer,
                nat,
                cookie,
                relay,
                port,
                key,
                sig,
            } => {
                if !self.introductions.take(from.ip(), now) {
                    self.stats.rate_limited += 1;
                    return vec![];
                }
                // The DHT knows the peer by its public IP and its *local* RPC
                // port; behind a symmetric NAT the observed port differs.
                let found = self.hosts.find_peer(peer).filter(|(_, r)| r.expires > now);
                let Some((addr, r)) = found else {
                    return vec![reply(Message::Introduced {
                        id,
                        outcome: Outcome::Unknown,
                    })];
                };
                let (peer_nat, peer_cookie) = (r.nat, r.cookie.clone());
                let answer = |outcome| vec![reply(Message::Introduced { id, outcome })];
                // A caller whose punch failed asks for the relay at once.
                let mut method = match relay {
                    true => Method::Relay,
                    false => method(nat, peer_nat),
                };
                let caller_may = self.punch_requests_by_caller.take((addr, from.ip()), now);
                let may = caller_may && self.punch_requests.take(addr, now);
                if matches!(method, Method::Birthday(_))
                    && !(may && self.birthdays.take_many(addr, now, ATTEMPT_COST))
                {
                    // The peer has taken part in as many birthday attempts
                    // as it may for now: the relay carries this caller
                    // instead (a script's fresh calls every second are not
                    // refused), or says why it cannot.
                    self.stats.birthdays_refused += 1;
                    method = Method::Relay;
                }
                let (birthday, relay_token) = match method {
                    Method::Relay => {
                        let signed = SignedRegistration {
                            port,
                            key,
                            cookie,
                            sig,
                        };
                        match self.relay(now, (from, nat), peer, (addr, peer_nat), signed) {
                            Ok(tokens) => (None, Some(tokens)),
                            Err(refused) => return answer(refused),
                        }
                    }
                    Method::Punch => (None, None),
                    Method::Birthday(role) => (Some(role), None),
                };
                let outcome = match (birthday, &relay_token) {
                    (Some(role), _) => Outcome::Birthday {
                        addr,
                        nat: peer_nat,
                        role,
                    },
                    (None, Some(token)) => Outcome::Relay {
                        addr,
                        nat: peer_nat,
                        token: token.0.clone(),
                    },
                    (None, None) => Outcome::Peer {
                        addr,
                        nat: peer_nat,
                    },
                };
                let mut out = answer(outcome);
                let relayed = relay_token.is_some();
                // The caller hears where the peer is; the peer is not
                // bothered beyond its rate, except to learn its token for a
                // relay session (the relay's own quotas bound those).
                if !may && !relayed {
                    self.stats.rate_limited += 1;
                    return out;
                }
                let ask = Message::PunchRequest {
                    peer: from,
                    nat,
                    cookie: peer_cookie,
                    birthday: birthday.map(BirthdayRole::other),
                    relay_token: relay_token.map(|t| t.1).unwrap_or_default(),
                };
                // A birthday attempt lasts seconds: a request re-sent at the
                // peer's next registration would find the caller's half over.
                if birthday.is_none() {
                    self.pending
                        .retain(|(to, _, m)| !(*to == addr && *m == ask));
                    if self.pending.len() < MAX_PENDING {
                        self.pending.push((addr, now + PENDING_TTL, ask.clone()));
                    }
                }
                let ask = Outgoing {
                    via: Port::Main,
                    to: addr,
                    message: ask,
                };
                // Whoever is behind a symmetric NAT punches from a port
                // nobody knows yet, so the other side's NAT must already
                // have sent toward its address: tell the other side first.
                // In a birthday attempt the side with the sockets starts
                // first, so that the probes find its mappings open. A
                // relayed peer must know its token before the caller's first
                // frame arrives.
                let ask_first = match birthday {
                    None => nat == NatKind::Symmetric || relayed,
                    Some(role) => role == BirthdayRole::Probe,
                };
                if ask_first {
                    out.insert(0, ask);
                } else {
                    out.push(ask);
                }
                out
            }
            Message::PunchAck { peer } => {
                self.pending.retain(|(to, _, m)| {
                    !(*to == from
                        && matches!(m, Message::PunchRequest { peer: p, .. } if *p == peer))
                });
                vec![]
            }
            // Messages only an introducer sends: ignore.
            Message::Observed { .. }
            | Message::FilterTest { .. }
            | Message::Introduced { .. }
            | Message::PunchRequest { .. }
            | Message::PathCheck { .. }
            | Message::PathOk { .. } => vec![],
        }
    }
}

/// Whether `sig` (128 hex digits) is `key`'s (64 hex digits, an Ed25519
/// public key) signature over the registration of `port` with `cookie`
/// (strict verification: no small-order keys, no malleable signatures).
fn signature_holds(key: &str, sig: &str, cookie: &str, port: u16) -> bool {
    let key = crate::units::from_hex(key).and_then(|k| <[u8; 32]>::try_from(k).ok());
    let sig = crate::units::from_hex(sig).and_then(|s| <[u8; 64]>::try_from(s).ok());
    let (Some(key), Some(sig)) = (key, sig) else {
        return false;
    };
    let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&key) else {
        return false;
    };
    let signed = super::wire::registration_signed_bytes(cookie, port);
    key.verify_strict(&signed, &ed25519_dalek::Signature::from_bytes(&sig))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    const INTRODUCER: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10));

    /// What a host's driver sends for `message`: its padded size.
    fn padded(message: &Message) -> usize {
        super::super::wire::encode_padded(message, super::super::wire::HOST_DATAGRAM_MIN).len()
    }

    /// Sends `message` from `from` as a host would (padded), on the main port.
    fn send(
        introducer: &mut Introducer,
        now: Instant,
        from: SocketAddr,
        message: Message,
    ) -> Vec<Outgoing> {
        let size = padded(&message);
        introducer.on_message(now, Port::Main, from, message, size)
    }

    /// Sends the message `make` builds with `from`'s own cookie.
    fn verified(
        introducer: &mut Introducer,
        now: Instant,
        from: SocketAddr,
        make: impl FnOnce(String) -> Message,
    ) -> Vec<Outgoing> {
        let cookie = introducer.cookie(from);
        send(introducer, now, from, make(cookie))
    }

    /// The key pair of the host called `name` in a test.
    fn signer(name: &str) -> ed25519_dalek::SigningKey {
        let mut seed = [0u8; 32];
        for (i, b) in name.bytes().enumerate() {
            seed[i % 32] ^= b;
        }
        ed25519_dalek::SigningKey::from_bytes(&seed)
    }

    /// A registration of `port` by the host called `name`, signed by it.
    fn register(cookie: String, name: &str, port: u16) -> Message {
        use ed25519_dalek::Signer;
        let key = signer(name);
        let signed = super::super::wire::registration_signed_bytes(&cookie, port);
        Message::Register {
            id: 1,
            port,
            nat: NatKind::PortRestricted,
            key: crate::units::hex(key.verifying_key().as_bytes()),
            sig: crate::units::hex(&key.sign(&signed).to_bytes()),
            cookie,
        }
    }

    fn introduce(cookie: String, peer: SocketAddr) -> Message {
        Message::Introduce {
            id: 2,
            peer,
            nat: NatKind::PortRestricted,
            cookie,
            relay: false,
            port: 0,
            key: String::new(),
            sig: String::new(),
        }
    }

    #[test]
    fn a_tick_forgets_expired_registrations_without_any_message() {
        let mut introducer = Introducer::new();
        let now = Instant::now();
        let from = SocketAddr::new(ip(10, 0, 0, 1), 9);
        let message = register(introducer.cookie(from), "k", 9);
        send(&mut introducer, now, from, message);
        assert_eq!(introducer.registered(), 1);
        introducer.tick(now + REGISTRATION_TTL / 2);
        assert_eq!(introducer.registered(), 1);
        introducer.tick(now + REGISTRATION_TTL + Duration::from_secs(1));
        assert_eq!(introducer.registered(), 0);
    }

    #[test]
    fn a_flood_of_registrations_is_capped() {
        let mut introducer = Introducer::new();
        let now = Instant::now();
        for i in 0..MAX_REGISTRATIONS + 10 {
            let from = SocketAddr::new(ip(10, (i >> 16) as u8, (i >> 8) as u8, i as u8), 9);
            let message = register(introducer.cookie(from), &format!("k{i}"), 9);
            send(&mut introducer, now, from, message);
        }
        assert_eq!(introducer.registered(), MAX_REGISTRATIONS);
        // They expire, and make room.
        let later = now + REGISTRATION_TTL + Duration::from_secs(1);
        send(
            &mut introducer,
            later,
            SocketAddr::new(INTRODUCER, 1),
            Message::Probe { id: 2 },
        );
        assert_eq!(introducer.registered(), 0);
    }

    #[test]
    fn spoofed_sources_can_neither_register_nor_get_anyone_punched() {
        let mut introducer = Introducer::new();
        let now = Instant::now();
        let host = SocketAddr::new(ip(198, 51, 100, 2), 4000);
        let victim = SocketAddr::new(ip(192, 0, 2, 9), 80);
        // A registration from a spoofed address has no cookie for it: it is
        // answered with a cookie only (to the spoofed address), not stored.
        let out = send(
            &mut introducer,
            now,
            victim,
            register(String::new(), "k", 1),
        );
        assert_eq!(introducer.registered(), 0);
        assert!(
            matches!(&out[..], [Outgoing { to, message: Message::Observed { .. }, .. }] if *to == victim)
        );
        // A cookie made for another address is refused the same way.
        let wrong = introducer.cookie(host);
        send(&mut introducer, now, victim, register(wrong, "k", 1));
        assert_eq!(introducer.registered(), 0);
        assert_eq!(introducer.stats().challenged, 2);
        // The real host registers with its own cookie.
        let host_cookie = introducer.cookie(host);
        send(
            &mut introducer,
            now,
            host,
            register(host_cookie.clone(), "hostkey", 5000),
        );
        assert_eq!(introducer.registered(), 1);
        // A spoofed introduction (from the victim) makes nobody punch.
        let peer = SocketAddr::new(host.ip(), 5000);
        let out = send(&mut introducer, now, victim, introduce(String::new(), peer));
        assert!(
            out.iter()
                .all(|o| !matches!(o.message, Message::PunchRequest { .. })),
            "{out:?}"
        );
        // A verified caller gets its punch request, carrying the cookie of
        // the host's registration.
        let caller = SocketAddr::new(ip(203, 0, 113, 7), 6000);
        let cookie = introducer.cookie(caller);
        let out = send(&mut introducer, now, caller, introduce(cookie, peer));
        assert!(out.iter().any(|o| o.to == host
            && o.message
                == Message::PunchRequest {
                    peer: caller,
                    nat: NatKind::PortRestricted,
                    cookie: host_cookie.clone(),
                    relay_token: String::new(),
                    birthday: None,
                }));
    }

    #[test]
    fn no_unverified_source_gets_more_bytes_than_it_sent() {
        let mut introducer = Introducer::new();
        let now = Instant::now();
        let from: SocketAddr = "[2001:db8::1]:65535".parse().unwrap();
        for message in [
            Message::Probe { id: u64::MAX >> 12 },
            register(String::new(), "k", 1),
            introduce(String::new(), from),
        ] {
            // Padded as our hosts send it: answered, within its size.
            let size = padded(&message);
            let out = introducer.on_message(now, Port::Main, from, message.clone(), size);
            let bytes: usize = out
                .iter()
                .map(|o| super::super::wire::encode(&o.message).len())
                .sum();
            assert!(
                !out.is_empty() && bytes <= size,
                "{bytes} > {size}: {out:?}"
            );
            // Unpadded: nothing, unless the datagram is as long as the
            // answer anyway (a signed registration is).
            let bare = super::super::wire::encode(&message).len();
            let out = introducer.on_message(now, Port::Main, from, message, bare);
            let bytes: usize = out
                .iter()
                .map(|o| super::super::wire::encode(&o.message).len())
                .sum();
            assert!(bytes <= bare, "{bytes} > {bare}: {out:?}");
        }
    }

    #[test]
    fn only_the_holder_of_a_key_registers_under_it_and_only_from_its_address() {
        let mut introducer = Introducer::new();
        let now = Instant::now();
        let host = SocketAddr::new(ip(198, 51, 100, 2), 40001);
        let thief = SocketAddr::new(ip(203, 0, 113, 9), 40009);
        // The host's registration, as sent: replayed from the thief's
        // address (with the thief's own cookie it no longer matches).
        let theirs = register(introducer.cookie(host), "victim", 5000);
        let Message::Register { key, sig, .. } = theirs.clone() else {
            unreachable!()
        };
        let replay = Message::Register {
            id: 7,
            port: 5000,
            nat: NatKind::Open,
            cookie: introducer.cookie(thief),
            key: key.clone(),
            sig: sig.clone(),
        };
        send(&mut introducer, now, thief, replay);
        // The victim's key with the thief's own signature.
        let Message::Register { sig: own, .. } = register(introducer.cookie(thief), "thief", 5000)
        else {
            unreachable!()
        };
        let forged = Message::Register {
            id: 8,
            port: 5000,
            nat: NatKind::Open,
            cookie: introducer.cookie(thief),
            key: key.clone(),
            sig: own,
        };
        send(&mut introducer, now, thief, forged);
        // Not hex, or too short.
        for (key, sig) in [("zz", "zz"), (&key[..10], &sig[..10])] {
            let bad = Message::Register {
                id: 9,
                port: 5000,
                nat: NatKind::Open,
                cookie: introducer.cookie(thief),
                key: key.into(),
                sig: sig.into(),
            };
            send(&mut introducer, now, thief, bad);
        }
        assert_eq!(introducer.registered(), 0);
        assert_eq!(introducer.stats().bad_signatures, 4);
        send(&mut introducer, now, host, theirs);
        assert_eq!(introducer.registered(), 1);
    }

    #[test]
    fn hosts_sharing_an_identity_keep_a_registration_each() {
        // Two hosts of one machine (one state directory, one key), each on
        // its own RPC port, behind two NATs.
        let mut introducer = Introducer::new();
        let now = Instant::now();
        let worker = SocketAddr::new(ip(198, 51, 100, 2), 40001);
        let consumer = SocketAddr::new(ip(198, 51, 100, 3), 40002);
        for _ in 0..3 {
            verified(&mut introducer, now, worker, |c| {
                register(c, "machine", 5000)
            });
            verified(&mut introducer, now, consumer, |c| {
                register(c, "machine", 5001)
            });
        }
        assert_eq!(introducer.registered(), 2);
        // The same host (key and port) from a new address still moves.
        let moved = SocketAddr::new(ip(198, 51, 100, 2), 40009);
        verified(&mut introducer, now, moved, |c| {
            register(c, "machine", 5000)
        });
        assert_eq!(introducer.registered(), 2);
    }

    #[test]
    fn an_impostor_on_the_same_ip_cannot_take_a_live_registration() {
        let mut introducer = Introducer::new();
        let now = Instant::now();
        // Two hosts behind one NAT (or one machine): the impostor claims the
        // victim's local RPC port, which introductions match on.
        let victim = SocketAddr::new(ip(198, 51, 100, 2), 40001);
        let impostor = SocketAddr::new(ip(198, 51, 100, 2), 40002);
        verified(&mut introducer, now, victim, |c| {
            register(c, "victim", 5000)
        });
        verified(&mut introducer, now, impostor, |c| {
            register(c, "evil", 5000)
        });
        assert_eq!(introducer.registered(), 1);
        assert_eq!(introducer.stats().refused_registrations, 1);
        let caller = SocketAddr::new(ip(203, 0, 113, 7), 6000);
        let peer = SocketAddr::new(victim.ip(), 5000);
        let out = verified(&mut introducer, now, caller, |c| introduce(c, peer));
        assert!(out.iter().any(|o| matches!(o.message,
            Message::Introduced { outcome: Outcome::Peer { addr, .. }, .. } if addr == victim)));
        // The victim's NAT rebinds it to a new port: the same key moves its
        // registration there.
        let moved = SocketAddr::new(victim.ip(), 40003);
        verified(&mut introducer, now, moved, |c| register(c, "victim", 5000));
        assert_eq!(introducer.registered(), 1);
        let out = verified(&mut introducer, now, caller, |c| introduce(c, peer));
        assert!(out.iter().any(|o| matches!(o.message,
            Message::Introduced { outcome: Outcome::Peer { addr, .. }, .. } if addr == moved)));
    }

    #[test]
    fn a_host_that_receives_at_the_port_it_claims_takes_it_from_a_squatter() {
        let mut introducer = Introducer::new();
        let now = Instant::now();
        // The squatter registers first (or while the worker restarts),
        // claiming the worker's port 40001 from another port of the IP.
        let squatter = SocketAddr::new(ip(127, 0, 0, 1), 45847);
        verified(&mut introducer, now, squatter, |c| {
            register(c, "evil", 40001)
        });
        assert_eq!(introducer.registered(), 1);
        // The worker proves it receives at 127.0.0.1:40001 itself.
        let worker = SocketAddr::new(ip(127, 0, 0, 1), 40001);
        verified(&mut introducer, now, worker, |c| {
            register(c, "worker", 40001)
        });
        assert_eq!(introducer.registered(), 1, "the squatter is gone");
        let caller = SocketAddr::new(ip(127, 0, 0, 3), 6000);
        let out = verified(&mut introducer, now, caller, |c| introduce(c, worker));
        assert!(out.iter().any(|o| matches!(o.message,
            Message::Introduced { outcome: Outcome::Peer { addr, .. }, .. } if addr == worker)));
        // And the squatter cannot take it back.
        verified(&mut introducer, now, squatter, |c| {
            register(c, "evil", 40001)
        });
        assert_eq!(introducer.stats().refused_registrations, 1);
        let out = verified(&mut introducer, now, caller, |c| introduce(c, worker));
        assert!(out.iter().any(|o| matches!(o.message,
            Message::Introduced { outcome: Outcome::Peer { addr, .. }, .. } if addr == worker)));
    }

    #[test]
    fn introductions_and_punch_requests_are_rate_limited() {
        let mut introducer = Introducer::new();
        let now = Instant::now();
        let host = SocketAddr::new(ip(198, 51, 100, 2), 4000);
        verified(&mut introducer, now, host, |c| register(c, "k", 5000));
        let peer = SocketAddr::new(host.ip(), 5000);
        let mut punch_requests = 0;
        // Many verified callers (from many IPs) at one target in one instant.
        for i in 0..200u32 {
            let caller = SocketAddr::new(ip(203, 0, (i >> 8) as u8, i as u8), 6000);
            let out = verified(&mut introducer, now, caller, |c| introduce(c, peer));
            punch_requests += out
                .iter()
                .filter(|o| matches!(o.message, Message::PunchRequest { .. }))
                .count();
        }
        assert_eq!(punch_requests, PUNCH_REQUEST_BURST as usize);
        // One caller asking again and again.
        let caller = SocketAddr::new(ip(203, 0, 113, 99), 6000);
        let answered = (0..200)
            .filter(|_| !verified(&mut introducer, now, caller, |c| introduce(c, peer)).is_empty())
            .count();
        assert_eq!(answered, INTRODUCTION_BURST as usize);
        // ... and make the host punch it only a few times: one caller IP
        // cannot use up the host's punch budget for everyone.
        let host_punches = |introducer: &mut Introducer, caller: SocketAddr| {
            (0..INTRODUCTION_BURST)
                .flat_map(|_| verified(introducer, now, caller, |c| introduce(c, peer)))
                .filter(|o| matches!(o.message, Message::PunchRequest { .. }))
                .count()
        };
        let mut fresh = Introducer::new();
        verified(&mut fresh, now, host, |c| register(c, "k", 5000));
        let greedy = SocketAddr::new(ip(203, 0, 113, 98), 6000);
        assert_eq!(
            host_punches(&mut fresh, greedy),
            PUNCH_REQUEST_PER_CALLER_BURST as usize
        );
        let other = SocketAddr::new(ip(203, 0, 113, 97), 6000);
        assert!(host_punches(&mut fresh, other) > 0);
        // A second later the rates refill.
        let later = now + Duration::from_secs(1);
        let out = verified(&mut introducer, later, caller, |c| introduce(c, peer));
        assert!(!out.is_empty());
    }

    /// Registers the host called `name` at `from` (local port `port`) behind
    /// `nat`.
    fn register_behind(
        introducer: &mut Introducer,
        now: Instant,
        from: SocketAddr,
        name: &str,
        port: u16,
        nat: NatKind,
    ) {
        verified(introducer, now, from, |c| {
            let Message::Register {
                id,
                port,
                key,
                sig,
                cookie,
                ..
            } = register(c, name, port)
            else {
                unreachable!()
            };
            Message::Register {
                id,
                port,
                nat,
                key,
                sig,
                cookie,
            }
        });
    }

    #[test]
    fn a_symmetric_and_a_port_restricted_nat_are_told_to_birthday_punch_within_a_rate() {
        let now = Instant::now();
        let introduce_from = |nat| {
            move |cookie, peer| Message::Introduce {
                id: 2,
                peer,
                nat,
                cookie,
                relay: false,
                port: 0,
                key: String::new(),
                sig: String::new(),
            }
        };
        for (caller_nat, peer_nat, caller_role) in [
            (
                NatKind::PortRestricted,
                NatKind::Symmetric,
                BirthdayRole::Probe,
            ),
            (
                NatKind::Symmetric,
                NatKind::PortRestricted,
                BirthdayRole::Sockets,
            ),
        ] {
            let mut introducer = Introducer::new();
            let host = SocketAddr::new(ip(198, 51, 100, 2), 4000);
            register_behind(&mut introducer, now, host, "k", 5000, peer_nat);
            let peer = SocketAddr::new(host.ip(), 5000);
            let caller = SocketAddr::new(ip(203, 0, 113, 99), 6000);
            let ask = introduce_from(caller_nat);
            let out = verified(&mut introducer, now, caller, |c| ask(c, peer));
            // Both hear their roles; the side with the sockets first.
            let roles: Vec<(SocketAddr, BirthdayRole)> = out
                .iter()
                .map(|o| match &o.message {
                    Message::Introduced {
                        outcome: Outcome::Birthday { addr, role, .. },
                        ..
                    } => {
                        assert_eq!(*addr, host);
                        (o.to, *role)
                    }
                    Message::PunchRequest {
                        birthday: Some(role),
                        peer: p,
                        ..
                    } => {
                        assert_eq!(*p, caller);
                        (o.to, *role)
                    }
                    other => panic!("{other:?}"),
                })
                .collect();
            let mut expected = vec![(caller, caller_role), (host, caller_role.other())];
            if caller_role == BirthdayRole::Probe {
                expected.reverse();
            }
            assert_eq!(roles, expected);
            // A few more at once pass (a call and a plugin's request); then
            // the next one at that host, even from another caller, is not a
            // birthday attempt: the relay carries it (counted as a refused
            // birthday).
            for k in 1..ATTEMPT_BURST {
                let caller = SocketAddr::new(ip(203, 0, 114, k as u8), 6000);
                assert_eq!(
                    verified(&mut introducer, now, caller, |c| ask(c, peer)).len(),
                    2
                );
            }
            let other = SocketAddr::new(ip(203, 0, 113, 98), 6000);
            register_behind(&mut introducer, now, other, "other", 6000, caller_nat);
            let out = verified(&mut introducer, now, other, |c| ask(c, peer));
            let relayed = out.iter().any(|o| {
                o.to == other
                    && matches!(
                        &o.message,
                        Message::Introduced {
                            outcome: Outcome::Relay { addr, .. },
                            ..
                        } if *addr == host
                    )
            });
            let token_to_host = out.iter().any(|o| {
                o.to == host
                    && matches!(&o.message, Message::PunchRequest { birthday: None, relay_token, .. } if !relay_token.is_empty())
            });
            assert!(relayed && token_to_host, "{out:?}");
            assert_eq!(introducer.stats().birthdays_refused, 1);
            // One per 10 s / ATTEMPTS_PER_10S after that.
            let later = now + Duration::from_millis(10_000 / u64::from(ATTEMPTS_PER_10S) + 1);
            let out = verified(&mut introducer, later, other, |c| ask(c, peer));
            assert_eq!(out.len(), 2, "{out:?}");
        }
        // Two symmetric NATs stay impossible (a relay's business).
        let mut introducer = Introducer::new();
        let host = SocketAddr::new(ip(198, 51, 100, 2), 4000);
        register_behind(&mut introducer, now, host, "k", 5000, NatKind::Symmetric);
        let caller = SocketAddr::new(ip(203, 0, 113, 99), 6000);
        let ask = introduce_from(NatKind::Symmetric);
        let out = verified(&mut introducer, now, caller, |c| {
            ask(c, SocketAddr::new(host.ip(), 5000))
        });
        assert!(matches!(
            &out[..],
            [Outgoing {
                message: Message::Introduced {
                    outcome: Outcome::Impossible { .. },
                    ..
                },
                ..
            }]
        ));
    }

    #[test]
    fn cookies_outlive_one_rotation_and_no_more() {
        let mut introducer = Introducer::new();
        let now = Instant::now();
        let host = SocketAddr::new(ip(198, 51, 100, 2), 4000);
        send(&mut introducer, now, host, Message::Probe { id: 1 });
        let cookie = introducer.cookie(host);
        let after_one = now + COOKIE_ROTATION;
        send(
            &mut introducer,
            after_one,
            host,
            register(cookie.clone(), "k", 1),
        );
        assert_eq!(introducer.registered(), 1);
        let after_two = now + 2 * COOKIE_ROTATION;
        let out = send(
            &mut introducer,
            after_two,
            host,
            register(cookie.clone(), "k", 1),
        );
        assert_eq!(introducer.stats().challenged, 1);
        // The challenge carries a fresh cookie, which works.
        let Some(Message::Observed { cookie: fresh, .. }) = out.first().map(|o| o.message.clone())
        else {
            panic!("{out:?}");
        };
        assert_ne!(fresh, cookie);
        send(&mut introducer, after_two, host, register(fresh, "k", 1));
        assert_eq!(introducer.stats().challenged, 1);
    }
}
