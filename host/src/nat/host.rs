//! A host's side of introductions, as a sans-IO state machine
//! (`docs/wire.md §5.3`): its NAT probe, its registration, the introductions
//! it asks for, the handshakes it punches and the paths it keeps alive.
//!
//! [`HostIntroductions`] takes the time, the introducer's messages and the
//! punches received as arguments, and returns [`Action`]s; it says when it
//! next has work with [`HostIntroductions::next_wakeup`].
//! [`super::host_driver`] runs it with the host's RPC socket and the clock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::birthday::{self, Attempt, ATTEMPTS_PER_10S, ATTEMPT_BURST, ATTEMPT_COST};
use super::config::NatConfig;
use super::kind::{BirthdayRole, NatKind};
use super::relay::Token;
use super::wire::{IntroducerAddr, Message, Outcome};

/// How often a host behind a NAT re-registers with its introducer. It also
/// bounds how long such a host stays unreachable after its router forgets
/// its mappings (rebinding): the next registration re-opens the way.
pub const REGISTER_INTERVAL: Duration = Duration::from_secs(4);
/// A request to the introducer is re-sent this often until answered.
pub(super) const RETRY: Duration = Duration::from_millis(250);
/// How long the NAT probe may take before the introducer counts as unreachable.
pub(super) const PROBE_DEADLINE: Duration = Duration::from_millis(1500);
/// How long after a failed probe the host probes again (the introducer may
/// start later than the host, or restart).
pub(super) const PROBE_RETRY: Duration = Duration::from_secs(30);
/// Most paths a host keeps alive; the least recently used goes first.
const MAX_PATHS: usize = 4_096;
/// Most handshakes (peers being punched until they answer) at once; an
/// introduction beyond that is answered but not punched.
const MAX_HANDSHAKES: usize = 256;
/// Punch requests a host acts on per second, and at once: what even an
/// introducer (or someone answering in its place) can make it punch.
pub const PUNCH_REQUESTS_PER_SECOND: u32 = 20;
/// See [`PUNCH_REQUESTS_PER_SECOND`].
pub const PUNCH_REQUEST_BURST: u32 = 40;
/// After the main port answers, how long the host waits for the filter test
/// before probing the other port (which opens its NAT to that port).
const FILTER_GRACE: Duration = Duration::from_millis(30);
/// How long an introduction may wait for the introducer's answer.
const INTRODUCE_DEADLINE: Duration = Duration::from_millis(1500);
/// While two hosts open a path, each punches the other at once, then after
/// this long, then at doubling intervals up to `HANDSHAKE_MAX_INTERVAL` (1 s):
/// a lost punch costs little, and a forged introduction request makes a host
/// send no more than a handful of punches (about ten in `HANDSHAKE_TIME`,
/// 5 s).
pub const HANDSHAKE_PUNCH_INTERVAL: Duration = Duration::from_millis(50);
/// The longest wait between two punches of a handshake.
const HANDSHAKE_MAX_INTERVAL: Duration = Duration::from_secs(1);
/// How long a host punches a peer it was introduced to without hearing it.
pub(super) const HANDSHAKE_TIME: Duration = Duration::from_secs(5);
/// A path not used for this long is no longer kept alive.
pub(super) const PATH_TTL: Duration = Duration::from_secs(600);
/// While a path is relayed, each side punches the other directly this
/// often (one punch: `docs/wire.md §5.5`), so that the traffic moves to a
/// direct path as soon as one opens (a firewall lifted, a NAT rebooted);
/// it stops [`PATH_TTL`] after the path was last used.
pub const RELAYED_PUNCH_INTERVAL: Duration = Duration::from_secs(5);
/// Most relayed paths a host keeps; the one punched longest ago goes
/// first (its route with it).
const MAX_RELAYED: usize = 256;
/// Most paths that hold an adopted socket (birthday punching's winner, one
/// file descriptor each); the least recently used lets its socket go.
const MAX_ADOPTED: usize = 64;
/// Most such paths to one peer IP: a caller (or many callers behind one
/// address) cannot take the host's whole share.
const MAX_ADOPTED_PER_IP: usize = 4;
/// A relayed path nothing went over for this long (no request of ours,
/// no frame from the peer) is forgotten, its route with it: the relay ends
/// a session idle for as long (`relay::SESSION_IDLE`).
pub const RELAYED_TTL: Duration = Duration::from_secs(60);
/// How long after a relayed path moved to direct the host still answers
/// the peer's `path-check` (two of the peer's punch intervals).
const MOVED_GRACE: Duration = Duration::from_secs(10);

/// What a host's driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this message to this address straight from the RPC socket
    /// (never through a relay or an adopted socket).
    Send { to: SocketAddr, message: Message },
    /// Send one punch to this address from the RPC socket.
    Punch(SocketAddr),
    /// The answer to [`HostIntroductions::introduce`] number `id`, and how
    /// the introduction ended (for the host's counters).
    Introduced {
        id: u64,
        result: IntroResult,
        outcome: IntroOutcome,
    },
    /// The NAT probe finished (or gave up: [`NatKind::Unknown`]).
    NatDetected {
        kind: NatKind,
        observed: Option<SocketAddr>,
    },
    /// The introducer asked us to punch a peer.
    PunchRequested(SocketAddr),
    /// Send what goes to `peer` through the relay at `relay` with `token`
    /// (`crate::transport::Route::Relay`), from now on.
    Relay {
        peer: SocketAddr,
        relay: SocketAddr,
        token: Token,
    },
    /// `peer`'s relayed path ended: `direct` when the peer answered a
    /// direct [`Message::PathCheck`] (the traffic moves to the direct
    /// path), else forgotten; either way its relay route goes.
    Unrelay { peer: SocketAddr, direct: bool },
    /// A birthday attempt (`docs/wire.md §5.6`) toward `peer` started.
    BirthdayStarted {
        peer: SocketAddr,
        role: BirthdayRole,
    },
    /// Open `count` extra UDP sockets (on the RPC socket's local IP, any
    /// port) for the birthday attempt toward `peer`; closed by
    /// [`Action::AdoptSocket`] or [`Action::CloseSockets`].
    OpenSockets { peer: SocketAddr, count: usize },
    /// Send one punch to this address from every extra socket.
    PunchFromSockets(SocketAddr),
    /// Extra socket `index` met `peer`: from now on datagrams to `peer`
    /// leave from it and what it receives is sorted like the RPC socket's
    /// (`Endpoint::adopt`); close the other extra sockets.
    AdoptSocket { index: usize, peer: SocketAddr },
    /// Close every extra socket: the attempt gave up.
    CloseSockets,
    /// The path to `peer` that an adopted socket carried is let go (unused
    /// for [`PATH_TTL`], or evicted): clear its route, which closes the
    /// socket.
    ReleaseSocket(SocketAddr),
    /// A birthday attempt met its peer or gave up.
    BirthdayEnded(birthday::Report),
    /// A birthday attempt the introducer asked for was refused, and why.
    BirthdayRefused { peer: SocketAddr, reason: String },
}

impl From<birthday::Step> for Action {
    fn from(step: birthday::Step) -> Action {
        use birthday::Step;
        match step {
            Step::Started { peer, role } => Action::BirthdayStarted { peer, role },
            Step::OpenSockets { peer, count } => Action::OpenSockets { peer, count },
            Step::PunchFromSockets(to) => Action::PunchFromSockets(to),
            Step::Punch(to) => Action::Punch(to),
            Step::AdoptSocket { index, peer } => Action::AdoptSocket { index, peer },
            Step::CloseSockets => Action::CloseSockets,
            Step::Ended(report) => Action::BirthdayEnded(report),
        }
    }
}

/// Converts an [`Attempt`]'s steps into actions.
fn actions(steps: Vec<birthday::Step>) -> Vec<Action> {
    steps.into_iter().map(Action::from).collect()
}

/// How to reach a peer found on the DHT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntroResult {
    /// Connect to it as announced (no introducer, or none answers).
    Direct,
    /// Connect to it as announced: the introducer does not know it (a
    /// public host, or one serving behind a NAT without registering).
    Unregistered,
    /// Connect to `addr`; both sides are punching. Behind a symmetric NAT the
    /// peer's punches come from another port: follow them.
    Punched { addr: SocketAddr, nat: NatKind },
    /// Connect to `addr` through the relay at `relay`; the route is set
    /// (the action [`Action::Relay`] comes before this answer).
    Relayed {
        addr: SocketAddr,
        relay: SocketAddr,
        nat: NatKind,
    },
    /// Connect to `addr`; both sides take part in a birthday attempt
    /// (`docs/wire.md §5.6`), this host in `role`, for up to
    /// [`birthday::ATTEMPT_TIME`]. In [`BirthdayRole::Probe`] the peer
    /// answers from another port: follow it.
    Birthday {
        addr: SocketAddr,
        nat: NatKind,
        role: BirthdayRole,
    },
    /// No direct path can exist, and no relay (the reason says why).
    Impossible(String),
}

/// How an introduction ended: what the host's counters tell apart, beyond
/// the [`IntroResult`] the caller acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntroOutcome {
    /// The introducer named the peer's address; both sides punch.
    Punched,
    /// The introducer relays between the two.
    Relayed,
    /// The introducer named the peer's address; both sides take part in a
    /// birthday attempt.
    Birthday,
    /// The introducer answered that no direct path can exist (and refused
    /// to relay).
    Impossible,
    /// The introducer does not know the peer (not registered: a public
    /// host, or one that stopped); the caller connects as announced.
    UnknownPeer,
    /// The introducer did not answer in time, or is known to be
    /// unreachable; the caller connects as announced.
    NoAnswer,
    /// No introducer is configured: nothing was asked.
    NoIntroducer,
}

impl IntroOutcome {
    /// The outcome's name in metrics: `punched`, `relayed`, `impossible`,
    /// `unknown_peer`, `no_answer`, `no_introducer`, `birthday`.
    pub fn as_str(self) -> &'static str {
        match self {
            IntroOutcome::Punched => "punched",
            IntroOutcome::Relayed => "relayed",
            IntroOutcome::Impossible => "impossible",
            IntroOutcome::UnknownPeer => "unknown_peer",
            IntroOutcome::NoAnswer => "no_answer",
            IntroOutcome::NoIntroducer => "no_introducer",
            IntroOutcome::Birthday => "birthday",
        }
    }
}

/// Where the NAT probe is (`docs/wire.md §5.3` step 1).
#[derive(Debug)]
enum Probe {
    /// Waiting for the main port's answer.
    Main { id: u64, next_send: Instant },
    /// The main port answered; the filter test may still arrive.
    Grace { main: SocketAddr, alt_at: Instant },
    /// Waiting for the other port's answer.
    Alt {
        main: SocketAddr,
        id: u64,
        next_send: Instant,
    },
    /// Finished, or given up (then `retry_probe_at` is set).
    Done,
}

/// An introduction asked for and not yet answered.
#[derive(Debug)]
struct PendingIntro {
    peer: SocketAddr,
    deadline: Instant,
    next_send: Instant,
    /// Asks for the relay (a punched path failed).
    relay: bool,
}

/// A path through the relay: punched directly every
/// [`RELAYED_PUNCH_INTERVAL`] until `punch_until`.
#[derive(Debug)]
struct RelayedPath {
    next_punch: Instant,
    punch_until: Instant,
    /// The nonce of the last direct [`Message::PathCheck`] sent to the
    /// peer, while its answer may come.
    check: Option<(u64, Instant)>,
    /// When a direct `PathCheck` from the peer was last answered (at most
    /// one answer per [`RELAYED_PUNCH_INTERVAL`]).
    answered_check: Option<Instant>,
}

impl RelayedPath {
    /// A direct [`Message::PathCheck`] to `peer` with a fresh nonce, unless
    /// one went within [`RELAYED_PUNCH_INTERVAL`].
    fn check_again(
        &mut self,
        now: Instant,
        rng: &mut rand::rngs::StdRng,
        peer: SocketAddr,
    ) -> Option<Action> {
        if self
            .check
            .is_some_and(|(_, at)| now < at + RELAYED_PUNCH_INTERVAL)
        {
            return None;
        }
        let nonce = rand::Rng::random(rng);
        self.check = Some((nonce, now));
        Some(Action::Send {
            to: peer,
            message: Message::PathCheck { nonce },
        })
    }
}

/// A peer this host punches until it hears it (`docs/wire.md §5.3` step 4).
#[derive(Debug)]
struct Handshake {
    nat: NatKind,
    next_punch: Instant,
    interval: Duration,
    until: Instant,
}

/// A path opened by an introduction, kept alive while it is used, once
/// the peer has answered on it: a peer that never answers (an address a
/// forged introduction named) gets the handshake's punches and no more.
#[derive(Debug)]
struct Path {
    last_used: Instant,
    next_keepalive: Instant,
    /// Whether the peer punched back or a request used the path.
    answered: bool,
    /// When the handshake that opened it gives up.
    handshake_until: Instant,
}

/// A host's side of introductions: its NAT probe, its registration, the
/// introductions it asked for, the handshakes it punches and the paths it
/// keeps alive.
#[derive(Debug)]
pub struct HostIntroductions {
    config: NatConfig,
    /// The local RPC port, registered when the host is behind a NAT.
    port: u16,
    nat: NatKind,
    started: Instant,
    probe: Probe,
    filter_open: bool,
    probe_id: u64,
    /// Set while the introducer is unreachable: when to probe again.
    retry_probe_at: Option<Instant>,
    /// The NAT kind last reported, so a failed retry is not reported again.
    reported: Option<NatKind>,
    next_register: Instant,
    /// The introducer's latest cookie for our address (`docs/wire.md §5.4`).
    cookie: String,
    /// The cookie the last registration carried, and its id.
    registered_with: (u64, String),
    /// The cookies our last two registrations carried (the latest first):
    /// a punch request must carry one back, and only the introducer and we
    /// know them.
    registered_cookies: [String; 2],
    /// The key our registrations are signed with (the host's identity;
    /// one for this run only unless [`HostIntroductions::with_identity`]).
    identity: ed25519_dalek::SigningKey,
    /// The punch requests acted on ([`PUNCH_REQUESTS_PER_SECOND`]).
    punch_requests: crate::units::TokenBucket,
    intros: HashMap<u64, PendingIntro>,
    handshakes: HashMap<SocketAddr, Handshake>,
    paths: HashMap<SocketAddr, Path>,
    /// Peers reached through the relay.
    relayed: HashMap<SocketAddr, RelayedPath>,
    /// Peers whose relayed path moved to direct within [`MOVED_GRACE`]:
    /// when it moved, and when we last answered its `path-check` (it may
    /// check after we moved, and must hear back to move too).
    moved: HashMap<SocketAddr, (Instant, Option<Instant>)>,
    /// Registers because the introducer registered it for its relay,
    /// though it does not serve behind a NAT (a `call`): the relay serves
    /// registered hosts only.
    registers_for_relay: bool,
    /// The signature of a registration of our port with this cookie, as
    /// introductions carry it (made once per cookie).
    introduce_sig: (String, String),
    next_id: u64,
    /// The birthday attempt under way (one at a time).
    birthday: Option<Attempt>,
    /// Birthday attempts started, in tenths ([`ATTEMPTS_PER_10S`]).
    birthday_budget: crate::units::TokenBucket,
    /// Birthday attempts refused: one was under way, or over the rate.
    birthdays_refused: u64,
    /// Seeds each birthday attempt's random ports.
    rng: rand::rngs::StdRng,
    /// Peers whose path leaves from an adopted socket (at most one per
    /// path): released with their path.
    adopted: std::collections::HashSet<SocketAddr>,
}

impl HostIntroductions {
    /// A host configured by `config` whose RPC socket has local port `port`;
    /// it registers that port if `config.behind_nat`. Without an introducer
    /// every introduction answers [`IntroResult::Direct`].
    pub fn new(now: Instant, config: &NatConfig, port: u16) -> Self {
        // Ids start at a random value below 2^52 (docs/wire.md §5.1).
        let probe_id = rand::random::<u64>() >> 12;
        HostIntroductions {
            config: *config,
            port,
            nat: NatKind::Unknown,
            started: now,
            probe: match config.introducer {
                Some(_) => Probe::Main {
                    id: probe_id,
                    next_send: now,
                },
                None => Probe::Done,
            },
            filter_open: false,
            probe_id,
            retry_probe_at: None,
            reported: None,
            next_register: now,
            cookie: String::new(),
            registered_with: (0, String::new()),
            registered_cookies: Default::default(),
            identity: ed25519_dalek::SigningKey::from_bytes(&rand::random()),
            punch_requests: crate::units::TokenBucket::new(
                now,
                PUNCH_REQUESTS_PER_SECOND,
                PUNCH_REQUEST_BURST,
            ),
            intros: HashMap::new(),
            handshakes: HashMap::new(),
            paths: HashMap::new(),
            relayed: HashMap::new(),
            moved: HashMap::new(),
            registers_for_relay: false,
            introduce_sig: Default::default(),
            next_id: probe_id + 1,
            birthday: None,
            birthday_budget: birthday::attempt_budget(now),
            birthdays_refused: 0,
            rng: rand::SeedableRng::from_os_rng(),
            adopted: std::collections::HashSet::new(),
        }
    }

    /// Registers under `identity` (the host's long-lived key) instead of a
    /// key made for this run.
    pub fn with_identity(mut self, identity: ed25519_dalek::SigningKey) -> Self {
        self.identity = identity;
        self
    }

    /// Draws its birthday attempts' random ports from `seed` (reproducible
    /// simulations) instead of the OS's randomness.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = rand::SeedableRng::seed_from_u64(seed);
        self
    }

    /// The cookie our latest registration carried (empty before the first).
    #[cfg(test)]
    pub fn registration_cookie(&self) -> &str {
        &self.registered_cookies[0]
    }

    /// Whether this host registers with the introducer (serves behind a NAT).
    pub fn registers(&self) -> bool {
        self.config.behind_nat
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn probing(&self) -> bool {
        !matches!(self.probe, Probe::Done)
    }

    /// The introducer to use now: known, probed and answering.
    fn ready(&self) -> Option<IntroducerAddr> {
        self.config
            .introducer
            .filter(|_| !self.probing() && self.retry_probe_at.is_none())
    }

    /// Asks for an introduction to `peer`; the answer comes back as
    /// [`Action::Introduced`] with the returned id.
    pub fn introduce(&mut self, now: Instant, peer: SocketAddr) -> (u64, Vec<Action>) {
        self.ask(now, peer, false)
    }

    /// Asks the introducer to relay to `peer` (a punched path failed: UDP
    /// between the two is blocked); answered as [`Self::introduce`] is.
    pub fn introduce_relayed(&mut self, now: Instant, peer: SocketAddr) -> (u64, Vec<Action>) {
        self.ask(now, peer, true)
    }

    fn ask(&mut self, now: Instant, peer: SocketAddr, relay: bool) -> (u64, Vec<Action>) {
        let id = self.id();
        let unasked = if self.config.introducer.is_none() {
            Some(IntroOutcome::NoIntroducer)
        } else {
            self.retry_probe_at.map(|_| IntroOutcome::NoAnswer)
        };
        if let Some(outcome) = unasked {
            let result = IntroResult::Direct;
            return (
                id,
                vec![Action::Introduced {
                    id,
                    result,
                    outcome,
                }],
            );
        }
        self.intros.insert(
            id,
            PendingIntro {
                peer,
                deadline: now + INTRODUCE_DEADLINE,
                next_send: now,
                relay,
            },
        );
        (id, self.poll(now))
    }

    /// Notes that a path made by an introduction carried a request, so it is
    /// kept alive.
    pub fn used(&mut self, now: Instant, addr: SocketAddr) {
        if let Some(path) = self.paths.get_mut(&addr) {
            path.last_used = now;
            path.answered = true;
        }
        if let Some(path) = self.relayed.get_mut(&addr) {
            path.punch_until = now + RELAYED_TTL;
        }
    }

    /// Whether this host registers now (serving behind a NAT, or for the
    /// relay).
    fn registering(&self) -> bool {
        self.config.behind_nat || self.registers_for_relay
    }

    /// When [`poll`](Self::poll) has work next.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let probe = match &self.probe {
            Probe::Main { next_send, .. } | Probe::Alt { next_send, .. } => {
                Some((*next_send).min(self.started + PROBE_DEADLINE))
            }
            Probe::Grace { alt_at, .. } => Some(*alt_at),
            Probe::Done => self.retry_probe_at,
        };
        let register = (self.registering() && self.ready().is_some()).then_some(self.next_register);
        let intros = self
            .intros
            .values()
            .map(|i| i.next_send.min(i.deadline))
            .min()
            .filter(|_| !self.probing());
        let handshakes = self.handshakes.values().map(|h| h.next_punch).min();
        let paths = self
            .paths
            .values()
            .map(|p| match p.answered {
                true => p.next_keepalive,
                false => p.handshake_until,
            })
            .min();
        let relayed = self
            .relayed
            .values()
            .map(|p| p.next_punch.min(p.punch_until))
            .min();
        let birthday = self.birthday.as_ref().and_then(Attempt::next_wakeup);
        [
            probe, register, intros, handshakes, paths, relayed, birthday,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Does whatever is due at `now`.
    pub fn poll(&mut self, now: Instant) -> Vec<Action> {
        let mut out = vec![];
        self.poll_probe(now, &mut out);
        self.poll_punches(now, &mut out);
        if let Some(attempt) = self.birthday.as_mut() {
            out.extend(actions(attempt.poll(now)));
        }
        self.drop_ended_birthday();
        // Registering and introducing need our NAT's kind.
        if let Some(introducer) = self.ready() {
            self.poll_introducer(now, introducer, &mut out);
        }
        out
    }

    fn poll_introducer(&mut self, now: Instant, introducer: IntroducerAddr, out: &mut Vec<Action>) {
        if self.registering() && now >= self.next_register {
            self.next_register = now + REGISTER_INTERVAL;
            let id = self.id();
            self.registered_with = (id, self.cookie.clone());
            if self.registered_cookies[0] != self.cookie {
                self.registered_cookies[1] =
                    std::mem::replace(&mut self.registered_cookies[0], self.cookie.clone());
            }
            use ed25519_dalek::Signer;
            let signed = super::wire::registration_signed_bytes(&self.cookie, self.port);
            let message = Message::Register {
                id,
                port: self.port,
                nat: self.nat,
                cookie: self.cookie.clone(),
                key: crate::units::hex(self.identity.verifying_key().as_bytes()),
                sig: crate::units::hex(&self.identity.sign(&signed).to_bytes()),
            };
            out.push(Action::Send {
                to: introducer.main,
                message,
            });
        }
        let mut expired = vec![];
        for (&id, intro) in self.intros.iter_mut() {
            if now >= intro.deadline {
                expired.push(id);
            } else if now >= intro.next_send {
                intro.next_send = now + RETRY;
                if self.introduce_sig.0 != self.cookie {
                    use ed25519_dalek::Signer;
                    let signed = super::wire::registration_signed_bytes(&self.cookie, self.port);
                    let sig = crate::units::hex(&self.identity.sign(&signed).to_bytes());
                    self.introduce_sig = (self.cookie.clone(), sig);
                }
                out.push(Action::Send {
                    to: introducer.main,
                    message: Message::Introduce {
                        id,
                        peer: intro.peer,
                        nat: self.nat,
                        cookie: self.cookie.clone(),
                        relay: intro.relay,
                        port: self.port,
                        key: crate::units::hex(self.identity.verifying_key().as_bytes()),
                        sig: self.introduce_sig.1.clone(),
                    },
                });
            }
        }
        for id in expired {
            self.intros.remove(&id);
            // The introducer is gone: try the peer as announced.
            out.push(Action::Introduced {
                id,
                result: IntroResult::Direct,
                outcome: IntroOutcome::NoAnswer,
            });
        }
    }

    fn poll_punches(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.handshakes.retain(|_, h| h.until > now);
        for (&peer, handshake) in self.handshakes.iter_mut() {
            if now >= handshake.next_punch {
                handshake.next_punch = now + handshake.interval;
                handshake.interval = (handshake.interval * 2).min(HANDSHAKE_MAX_INTERVAL);
                out.push(Action::Punch(peer));
            }
        }
        self.paths.retain(|_, p| match p.answered {
            true => now.duration_since(p.last_used) < PATH_TTL,
            false => now < p.handshake_until,
        });
        let paths = &self.paths;
        self.adopted.retain(|peer| {
            let kept = paths.contains_key(peer);
            if !kept {
                out.push(Action::ReleaseSocket(*peer));
            }
            kept
        });
        for (&peer, path) in self.paths.iter_mut() {
            if path.answered && now >= path.next_keepalive {
                path.next_keepalive = now + self.config.keepalive;
                out.push(Action::Punch(peer));
            }
        }
        self.relayed.retain(|&peer, path| {
            let live = now < path.punch_until;
            if !live {
                out.push(Action::Unrelay {
                    peer,
                    direct: false,
                });
            }
            live
        });
        for (&peer, path) in self.relayed.iter_mut() {
            if now >= path.next_punch && now < path.punch_until {
                path.next_punch = now + RELAYED_PUNCH_INTERVAL;
                out.push(Action::Punch(peer));
            }
        }
    }

    /// Stops relaying to `peer`, if it was: the introducer now says the two
    /// punch (a NAT changed), so its route goes.
    fn end_relay(&mut self, peer: SocketAddr, out: &mut Vec<Action>) {
        if self.relayed.remove(&peer).is_some() {
            out.push(Action::Unrelay {
                peer,
                direct: false,
            });
        }
    }

    /// Starts relaying to `peer` through the introducer's main port with
    /// `token` (its first direct punch at once), making room if need be.
    fn start_relay(&mut self, now: Instant, peer: SocketAddr, token: Token, out: &mut Vec<Action>) {
        let Some(introducer) = self.config.introducer else {
            return;
        };
        if !self.relayed.contains_key(&peer) {
            let evicted =
                crate::units::evict_oldest(&mut self.relayed, MAX_RELAYED, |p| p.punch_until);
            out.extend(evicted.into_iter().map(|peer| Action::Unrelay {
                peer,
                direct: false,
            }));
        }
        self.relayed.insert(
            peer,
            RelayedPath {
                next_punch: now,
                punch_until: now + RELAYED_TTL,
                check: None,
                answered_check: None,
            },
        );
        out.push(Action::Relay {
            peer,
            relay: introducer.main,
            token,
        });
    }

    fn poll_probe(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(introducer) = self.config.introducer else {
            return;
        };
        if self.retry_probe_at.is_some_and(|at| now >= at) {
            self.retry_probe_at = None;
            self.probe_id = self.id();
            self.filter_open = false;
            self.started = now;
            self.probe = Probe::Main {
                id: self.probe_id,
                next_send: now,
            };
        }
        if self.probing() && now >= self.started + PROBE_DEADLINE {
            self.probe = Probe::Done;
            self.retry_probe_at = Some(now + PROBE_RETRY);
            if self.reported != Some(NatKind::Unknown) {
                self.reported = Some(NatKind::Unknown);
                out.push(Action::NatDetected {
                    kind: NatKind::Unknown,
                    observed: None,
                });
            }
            // While nobody answers, nobody can introduce anyone.
            for id in self.intros.keys().copied().collect::<Vec<_>>() {
                self.intros.remove(&id);
                out.push(Action::Introduced {
                    id,
                    result: IntroResult::Direct,
                    outcome: IntroOutcome::NoAnswer,
                });
            }
            return;
        }
        match &mut self.probe {
            Probe::Main { id, next_send } if now >= *next_send => {
                *next_send = now + RETRY;
                out.push(Action::Send {
                    to: introducer.main,
                    message: Message::Probe { id: *id },
                });
            }
            Probe::Grace { main, alt_at } if now >= *alt_at => {
                let main = *main;
                self.probe_id += 1;
                self.probe = Probe::Alt {
                    main,
                    id: self.probe_id,
                    next_send: now,
                };
                self.poll_probe(now, out);
            }
            Probe::Alt { id, next_send, .. } if now >= *next_send => {
                *next_send = now + RETRY;
                out.push(Action::Send {
                    to: introducer.alt,
                    message: Message::Probe { id: *id },
                });
            }
            _ => {}
        }
    }

    /// Handles an introduction datagram from `from`.
    pub fn on_message(&mut self, now: Instant, from: SocketAddr, message: Message) -> Vec<Action> {
        if let Message::PathCheck { .. } | Message::PathOk { .. } = message {
            return self.on_path_message(now, from, message);
        }
        let Some(introducer) = self.config.introducer else {
            return vec![];
        };
        // The filter test comes from a fresh port of the introducer's
        // address; everything else from its two known ports.
        let from_introducer = from == introducer.main || from == introducer.alt;
        let filter_test =
            matches!(message, Message::FilterTest { .. }) && from.ip() == introducer.main.ip();
        if !from_introducer && !filter_test {
            return vec![];
        }
        match message {
            Message::FilterTest { id } if id == self.probe_id => {
                if matches!(self.probe, Probe::Main { .. } | Probe::Grace { .. }) {
                    self.filter_open = true;
                }
                vec![]
            }
            // Only the answer to a registration or introduction of ours (ids
            // start at a random value below 2^52; 0 stands for "no
            // registration yet", never an id sent): a forged `observed`
            // must not plant a cookie that a forged punch request could
            // then carry.
            Message::Observed { id, cookie, .. }
                if from == introducer.main
                    && !cookie.is_empty()
                    && !self.probing()
                    && ((id != 0 && id == self.registered_with.0)
                        || self.intros.contains_key(&id)) =>
            {
                // A registration's answer, or a cookie for a registration
                // or introduction whose own was stale: renew it and resend
                // what it answered if that carried another cookie.
                self.cookie = cookie;
                if self.registered_with.0 == id && self.registered_with.1 != self.cookie {
                    self.next_register = now;
                }
                if let Some(intro) = self.intros.get_mut(&id) {
                    intro.next_send = now;
                }
                self.poll(now)
            }
            Message::Observed { id, addr, cookie } => match self.probe {
                Probe::Main { id: probe, .. } if id == probe && from == introducer.main => {
                    self.cookie = cookie;
                    self.probe = Probe::Grace {
                        main: addr,
                        alt_at: now + FILTER_GRACE,
                    };
                    vec![]
                }
                Probe::Alt {
                    main, id: probe, ..
                } if id == probe && from == introducer.alt => {
                    self.nat = if addr != main {
                        NatKind::Symmetric
                    } else if self.filter_open {
                        NatKind::Open
                    } else {
                        NatKind::PortRestricted
                    };
                    self.probe = Probe::Done;
                    self.reported = Some(self.nat);
                    let mut out = vec![Action::NatDetected {
                        kind: self.nat,
                        observed: Some(main),
                    }];
                    out.extend(self.poll(now));
                    out
                }
                _ => vec![],
            },
            Message::Introduced { id, outcome } => {
                let Some(asked) = self.intros.remove(&id) else {
                    return vec![]; // A late duplicate.
                };
                let mut out = vec![];
                let mut birthday_actions = vec![];
                let (result, outcome) = match outcome {
                    Outcome::Unknown => (IntroResult::Unregistered, IntroOutcome::UnknownPeer),
                    Outcome::Impossible { reason } => {
                        (IntroResult::Impossible(reason), IntroOutcome::Impossible)
                    }
                    Outcome::RelayRefused { reason } => (
                        IntroResult::Impossible(format!(
                            "no direct path to {}, and the relay at {} refused: {reason}",
                            asked.peer, introducer.main
                        )),
                        IntroOutcome::Impossible,
                    ),
                    Outcome::Peer { addr, nat } => {
                        self.end_relay(addr, &mut out);
                        self.start_handshake(now, addr, nat);
                        (IntroResult::Punched { addr, nat }, IntroOutcome::Punched)
                    }
                    Outcome::Relay { addr, nat, token } => match parse_token(&token) {
                        Some(token) => {
                            // The introducer registered us for its relay:
                            // keep the registration alive from now on.
                            if !self.registers_for_relay && !self.config.behind_nat {
                                self.registers_for_relay = true;
                                self.next_register = now + REGISTER_INTERVAL;
                            }
                            self.start_relay(now, addr, token, &mut out);
                            let relay = introducer.main;
                            (IntroResult::Relayed { addr, relay, nat }, IntroOutcome::Relayed)
                        }
                        None => (
                            IntroResult::Impossible(format!(
                                "the introducer at {} answered a relay token that is not 16 hex digits",
                                introducer.main
                            )),
                            IntroOutcome::Impossible,
                        ),
                    },
                    Outcome::Birthday { addr, nat, role } => {
                        match self.start_birthday(now, addr, role) {
                            Ok(started) => {
                                birthday_actions = started;
                                self.start_handshake(now, addr, nat);
                                (IntroResult::Birthday { addr, nat, role }, IntroOutcome::Birthday)
                            }
                            Err(why) => (
                                IntroResult::Impossible(format!(
                                    "{addr} ({}) is reachable only by birthday punching, and {why}; try again in a few seconds",
                                    nat.describe()
                                )),
                                IntroOutcome::Impossible,
                            ),
                        }
                    }
                };
                out.push(Action::Introduced {
                    id,
                    result,
                    outcome,
                });
                out.append(&mut birthday_actions);
                out.extend(self.poll(now));
                out
            }
            // Only the introducer and we know our registration's cookie:
            // anything else is forged.
            Message::PunchRequest { cookie, .. }
                if cookie.is_empty() || !self.registered_cookies.contains(&cookie) =>
            {
                vec![]
            }
            // Over the rate: dropped unacknowledged (the introducer re-sends
            // a real one at our next registration, for a while).
            Message::PunchRequest { .. } if !self.punch_requests.take(now) => vec![],
            Message::PunchRequest {
                peer,
                nat,
                relay_token,
                birthday,
                ..
            } => {
                let mut out = vec![Action::Send {
                    to: introducer.main,
                    message: Message::PunchAck { peer },
                }];
                match parse_token(&relay_token) {
                    // Relayed: no handshake (a direct path is ruled out or
                    // failed); the relayed path's own punches look for one.
                    Some(token) => self.start_relay(now, peer, token, &mut out),
                    None => {
                        self.end_relay(peer, &mut out);
                        self.start_handshake(now, peer, nat);
                        out.push(Action::PunchRequested(peer));
                    }
                }
                if let Some(role) = birthday {
                    match self.start_birthday(now, peer, role) {
                        Ok(started) => out.extend(started),
                        Err(reason) => out.push(Action::BirthdayRefused { peer, reason }),
                    }
                }
                out.extend(self.poll(now));
                out
            }
            _ => vec![],
        }
    }

    /// Starts a birthday attempt toward `peer` in `role`, unless one is under
    /// way (a repeated introduction to the same peer and role joins it) or
    /// over [`ATTEMPTS_PER_10S`] (after a burst); `Err` says why not
    /// (and is counted).
    fn start_birthday(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        role: BirthdayRole,
    ) -> Result<Vec<Action>, String> {
        let fits = match role {
            BirthdayRole::Sockets => self.nat == NatKind::Symmetric,
            BirthdayRole::Probe => self.nat == NatKind::PortRestricted,
        };
        let refused = match &self.birthday {
            // Whoever asks, a role that does not fit this host's own NAT is
            // no birthday attempt of ours (a forged or confused request).
            _ if !fits => format!(
                "the {} role does not fit this host's NAT ({})",
                role.as_str(),
                self.nat.describe()
            ),
            Some(a) if a.peer() == peer && a.role() == role => return Ok(vec![]),
            Some(a) => format!(
                "this host takes part in one birthday attempt at a time (one toward {} is under way)",
                a.peer()
            ),
            None if !self.birthday_budget.take_many(now, ATTEMPT_COST) => format!(
                "this host takes part in at most {ATTEMPTS_PER_10S} birthday attempts per 10 s (after {ATTEMPT_BURST} in a row)"
            ),
            None => {
                let seed = rand::Rng::random(&mut self.rng);
                let (attempt, out) = Attempt::with_seed(now, peer, role, seed);
                self.birthday = Some(attempt);
                return Ok(actions(out));
            }
        };
        self.birthdays_refused += 1;
        Err(refused)
    }

    fn drop_ended_birthday(&mut self) {
        if self.birthday.as_ref().is_some_and(Attempt::ended) {
            self.birthday = None;
        }
    }

    /// Birthday attempts refused so far (one was under way, or over
    /// [`ATTEMPTS_PER_10S`]).
    pub fn birthdays_refused(&self) -> u64 {
        self.birthdays_refused
    }

    /// Extra socket `index` of the birthday attempt received a punch from
    /// `from`.
    pub fn on_socket_punch(&mut self, now: Instant, index: usize, from: SocketAddr) -> Vec<Action> {
        let Some(attempt) = self.birthday.as_mut() else {
            return vec![];
        };
        let mut out = actions(attempt.on_socket_punch(now, index, from));
        let adopted: Vec<SocketAddr> = out
            .iter()
            .filter_map(|a| match a {
                Action::AdoptSocket { peer, .. } => Some(*peer),
                _ => None,
            })
            .collect();
        for peer in adopted {
            self.make_room_to_adopt(peer, &mut out);
            self.adopted.insert(peer);
        }
        self.drop_ended_birthday();
        out
    }

    /// Before `peer`'s path takes an adopted socket: at most
    /// [`MAX_ADOPTED_PER_IP`] per peer IP and [`MAX_ADOPTED`] in all (each
    /// holds a file descriptor); the least recently used path (of that IP
    /// first) lets its socket go.
    fn make_room_to_adopt(&mut self, peer: SocketAddr, out: &mut Vec<Action>) {
        for (same_ip, limit) in [(true, MAX_ADOPTED_PER_IP), (false, MAX_ADOPTED)] {
            let held = |a: &&SocketAddr| !same_ip || a.ip() == peer.ip();
            while self.adopted.iter().filter(held).count() >= limit {
                let paths = &self.paths;
                let Some(oldest) = self
                    .adopted
                    .iter()
                    .filter(held)
                    .min_by_key(|a| paths.get(a).map(|p| p.last_used))
                    .copied()
                else {
                    break;
                };
                self.adopted.remove(&oldest);
                self.paths.remove(&oldest);
                out.push(Action::ReleaseSocket(oldest));
            }
        }
    }

    /// Starts punching `peer` until it answers, unless a handshake with it
    /// is under way already (a repeated request does not restart it) or
    /// [`MAX_HANDSHAKES`] are.
    fn start_handshake(&mut self, now: Instant, peer: SocketAddr, nat: NatKind) {
        if self.handshakes.contains_key(&peer) || self.handshakes.len() >= MAX_HANDSHAKES {
            return;
        }
        if !self.paths.contains_key(&peer) {
            crate::units::evict_oldest(&mut self.paths, MAX_PATHS, |p| p.last_used);
        }
        self.handshakes.insert(
            peer,
            Handshake {
                nat,
                next_punch: now,
                interval: HANDSHAKE_PUNCH_INTERVAL,
                until: now + HANDSHAKE_TIME,
            },
        );
        let answered = self.paths.get(&peer).is_some_and(|p| p.answered);
        self.paths.insert(
            peer,
            Path {
                last_used: now,
                next_keepalive: now + self.config.keepalive,
                answered,
                handshake_until: now + HANDSHAKE_TIME,
            },
        );
    }

    /// A direct [`Message::PathCheck`] or [`Message::PathOk`] from `from`:
    /// only a peer whose path is relayed counts. A check is answered
    /// directly (at most once per [`RELAYED_PUNCH_INTERVAL`]: a forged
    /// source gets no more than it sent), and checked back if no check of
    /// ours is waiting; an answer carrying our check's nonce moves the path
    /// to direct.
    fn on_path_message(&mut self, now: Instant, from: SocketAddr, message: Message) -> Vec<Action> {
        self.moved.retain(|_, (at, _)| now < *at + MOVED_GRACE);
        let Some(path) = self.relayed.get_mut(&from) else {
            // Moved already: the peer's check still gets its answer.
            return match (message, self.moved.get_mut(&from)) {
                (Message::PathCheck { nonce }, Some((_, answered)))
                    if answered.is_none_or(|at| now >= at + RELAYED_PUNCH_INTERVAL) =>
                {
                    *answered = Some(now);
                    vec![Action::Send {
                        to: from,
                        message: Message::PathOk { nonce },
                    }]
                }
                _ => vec![],
            };
        };
        match message {
            Message::PathCheck { nonce } => {
                if path
                    .answered_check
                    .is_some_and(|at| now < at + RELAYED_PUNCH_INTERVAL)
                {
                    return vec![];
                }
                path.answered_check = Some(now);
                let mut out = vec![Action::Send {
                    to: from,
                    message: Message::PathOk { nonce },
                }];
                out.extend(path.check_again(now, &mut self.rng, from));
                out
            }
            Message::PathOk { nonce } if path.check.is_some_and(|(n, _)| n == nonce) => {
                let answered = path.answered_check;
                self.relayed.remove(&from);
                crate::units::evict_oldest(&mut self.moved, MAX_RELAYED, |(at, _)| *at);
                self.moved.insert(from, (now, answered));
                self.paths.entry(from).or_insert(Path {
                    last_used: now,
                    next_keepalive: now,
                    answered: true,
                    handshake_until: now,
                });
                vec![
                    Action::Punch(from),
                    Action::Unrelay {
                        peer: from,
                        direct: true,
                    },
                ]
            }
            _ => vec![],
        }
    }

    /// `from` punched us. A handshake with it is done once we answer. A
    /// peer behind a symmetric NAT punches from a port we did not know: from
    /// then on it is punched (and kept alive) there.
    pub fn on_punch(&mut self, now: Instant, from: SocketAddr) -> Vec<Action> {
        let mut out = vec![];
        if let Some(attempt) = self.birthday.as_mut() {
            out.extend(actions(attempt.on_punch(now, from)));
            self.drop_ended_birthday();
        }
        let moved = self
            .handshakes
            .iter()
            .find(|(addr, h)| {
                **addr != from && addr.ip() == from.ip() && h.nat == NatKind::Symmetric
            })
            .map(|(addr, _)| *addr);
        if let Some(old) = moved {
            self.handshakes.remove(&old);
            if let Some(path) = self.paths.remove(&old) {
                self.paths.insert(from, path);
            }
            out.push(Action::Punch(from));
        } else if self.handshakes.remove(&from).is_some() {
            out.push(Action::Punch(from));
        }
        if let Some(path) = self.relayed.get_mut(&from) {
            // A direct punch on a relayed path: the way may be open, or the
            // punch forged. Answer it (the peer checks too) and check the
            // way with a nonce only the peer can send back; the traffic
            // moves when the answer arrives.
            out.push(Action::Punch(from));
            out.extend(path.check_again(now, &mut self.rng, from));
        }
        if let Some(path) = self.paths.get_mut(&from) {
            // The peer's punch refreshed our NAT's mapping as well as an own
            // keepalive would (our answer refreshes the peer's).
            path.next_keepalive = now + self.config.keepalive;
            path.answered = true;
        }
        out
    }
}

/// A relay token from its 16 hex digits; `None` for anything else (an
/// empty field: no relay).
fn parse_token(text: &str) -> Option<Token> {
    crate::units::from_hex(text).and_then(|t| Token::try_from(t).ok())
}
