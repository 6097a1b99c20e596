//! Introductions: how two hosts behind NATs get a direct path, as sans-IO
//! state machines.
//!
//! A public `dht` node also runs an *introducer* on two UDP ports (its DHT
//! port + 1 and + 2). Hosts talk to it from their RPC socket, so what the
//! introducer observes is exactly the mapping their NAT gives that socket:
//!
//! 1. **Probe.** A host sends `probe` to the main port. The introducer answers
//!    with the address it saw, and first sends a `filter-test` from a fresh
//!    port nobody has sent to (not even an earlier process on the host's
//!    port), which a port-restricted (or symmetric) NAT drops. The host then
//!    probes the other port: a different observed address means a symmetric
//!    NAT. The result is a [`NatKind`].
//! 2. **Register.** A host behind a NAT (`run --behind-nat`) registers its
//!    RPC port and NAT kind every [`REGISTER_INTERVAL`]; that also keeps its
//!    mapping toward the introducer open.
//! 3. **Introduce.** A caller about to connect to a peer it found on the DHT
//!    asks the introducer for an introduction. If the peer is registered, the
//!    introducer answers with the peer's observed address and asks the peer
//!    (over the peer's open mapping) to punch the caller's observed address.
//!    Both sides then punch each other at once, again after
//!    [`HANDSHAKE_PUNCH_INTERVAL`] and at doubling intervals, until each has
//!    heard the other, and the caller's uTP connect goes
//!    through. When theory rules a direct path out (a symmetric NAT facing a
//!    port-restricted or symmetric one), the introducer says so at once.
//! 4. **Keep alive.** Paths made this way are punched every keepalive
//!    interval while they have been used recently, so the NATs keep them.
//!
//! [`Introducer`] is the public side, [`HostIntroductions`] a host's side.
//! Both take the time and the datagrams as arguments and return what to send;
//! [`super::driver`] drives them with sockets and the clock. The tests below
//! run them against simulated NATs in simulated time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Every introduction datagram starts with these bytes; the socket's
/// demultiplexer sorts datagrams by them.
pub use crate::transport::INTRODUCTION_MAGIC as MAGIC;
/// Larger introduction datagrams are dropped unread.
pub use crate::transport::MAX_INTRODUCTION_DATAGRAM as MAX_DATAGRAM;
/// How often a host behind a NAT re-registers with its introducer. It also
/// bounds how long such a host stays unreachable after its router forgets
/// its mappings (rebinding): the next registration re-opens the way.
pub const REGISTER_INTERVAL: Duration = Duration::from_secs(4);
/// A registration not refreshed for this long is forgotten.
const REGISTRATION_TTL: Duration = Duration::from_secs(12);
/// An introduction the peer may not have received is re-sent to it when it
/// next registers, for this long.
const PENDING_TTL: Duration = Duration::from_secs(6);
/// Most hosts an introducer keeps registered; more are refused (a flood of
/// registrations cannot grow it without bound).
const MAX_REGISTRATIONS: usize = 65_536;
/// Most punch requests an introducer keeps for re-sending.
const MAX_PENDING: usize = 4_096;
/// A request to the introducer is re-sent this often until answered.
const RETRY: Duration = Duration::from_millis(250);
/// How long the NAT probe may take before the introducer counts as unreachable.
const PROBE_DEADLINE: Duration = Duration::from_millis(1500);
/// How long after a failed probe the host probes again (the introducer may
/// start later than the host, or restart).
const PROBE_RETRY: Duration = Duration::from_secs(30);
/// Most paths a host keeps alive; the least recently used goes first.
const MAX_PATHS: usize = 4_096;
/// After the main port answers, how long the host waits for the filter test
/// before probing the other port (which opens its NAT to that port).
const FILTER_GRACE: Duration = Duration::from_millis(30);
/// How long an introduction may wait for the introducer's answer.
const INTRODUCE_DEADLINE: Duration = Duration::from_millis(1500);
/// While two hosts open a path, each punches the other at once, then after
/// this long, then at doubling intervals up to [`HANDSHAKE_MAX_INTERVAL`]: a
/// lost punch costs little, and a forged introduction request makes a host
/// send no more than a handful of punches (about ten in [`HANDSHAKE_TIME`]).
pub const HANDSHAKE_PUNCH_INTERVAL: Duration = Duration::from_millis(50);
const HANDSHAKE_MAX_INTERVAL: Duration = Duration::from_secs(1);
/// How long a host punches a peer it was introduced to without hearing it.
const HANDSHAKE_TIME: Duration = Duration::from_secs(5);
/// The default interval of keepalive punches on idle paths.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(15);
/// A path not used for this long is no longer kept alive.
const PATH_TTL: Duration = Duration::from_secs(600);

/// What a NAT does to a host's socket, as far as punching cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatKind {
    /// One mapping for every destination, and anyone the host has sent to
    /// (at least that address) may answer from any port: no NAT, full cone or
    /// address-restricted cone.
    Open,
    /// One mapping for every destination, but only the exact address and port
    /// the host sent to may answer.
    PortRestricted,
    /// A new mapping per destination.
    Symmetric,
    /// Not measured (no introducer answered).
    Unknown,
}

impl NatKind {
    /// How messages name it.
    pub fn describe(self) -> &'static str {
        match self {
            NatKind::Open => "no NAT, or a full-cone or address-restricted NAT",
            NatKind::PortRestricted => "a port-restricted cone NAT",
            NatKind::Symmetric => "a symmetric NAT",
            NatKind::Unknown => "an unknown NAT",
        }
    }
}

/// Whether simultaneous punching can open a direct path between two NATs:
/// a symmetric NAT's new mapping can only be reached by a peer whose NAT
/// accepts packets from any port of an address it punched.
pub fn direct_path_possible(a: NatKind, b: NatKind) -> bool {
    let port_bound = |k| matches!(k, NatKind::PortRestricted | NatKind::Symmetric);
    !((a == NatKind::Symmetric && port_bound(b)) || (b == NatKind::Symmetric && port_bound(a)))
}

/// The introducer's answer to an introduction request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Outcome {
    /// The peer is registered; it has been asked to punch the caller.
    Peer { addr: SocketAddr, nat: NatKind },
    /// The peer is not registered here (not behind a NAT, or not ours).
    Unknown,
    /// Theory rules out a direct path between the two NATs.
    Impossible { reason: String },
}

/// One introduction datagram (after [`MAGIC`], JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Message {
    /// Host → introducer: what address do you see?
    Probe { id: u64 },
    /// Host → introducer: I serve on local RPC port `port` behind `nat`.
    Register { id: u64, port: u16, nat: NatKind },
    /// Host → introducer: introduce me to `peer` (as announced on the DHT).
    Introduce {
        id: u64,
        peer: SocketAddr,
        nat: NatKind,
    },
    /// Introducer → host: the answer to a probe or registration.
    Observed { id: u64, addr: SocketAddr },
    /// Introducer (other port) → host: arrives only through open filtering.
    FilterTest { id: u64 },
    /// Introducer → host: the answer to `introduce`.
    Introduced { id: u64, outcome: Outcome },
    /// Introducer → registered host: punch `peer`, it wants to connect.
    PunchRequest { peer: SocketAddr, nat: NatKind },
    /// Host → introducer: got the punch request for `peer`; do not re-send it.
    PunchAck { peer: SocketAddr },
}

/// Whether a datagram is an introduction message.
pub fn is_introduction(bytes: &[u8]) -> bool {
    bytes.starts_with(&MAGIC)
}

/// The datagram for `message`.
pub fn encode(message: &Message) -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    serde_json::to_writer(&mut bytes, message).expect("messages serialise");
    bytes
}

/// Parses a datagram; `Err` says why it is not a valid message.
pub fn decode(bytes: &[u8]) -> Result<Message, String> {
    if bytes.len() > MAX_DATAGRAM {
        return Err(format!("{} bytes, over {MAX_DATAGRAM}", bytes.len()));
    }
    let body = bytes.strip_prefix(&MAGIC).ok_or("no introduction header")?;
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

/// Which of the introducer's sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Main,
    Alt,
    /// A new socket on an ephemeral port, for this one datagram: the filter
    /// test must come from a port the host's NAT cannot have seen before.
    Fresh,
}

/// A datagram the introducer must send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub via: Port,
    pub to: SocketAddr,
    pub message: Message,
}

#[derive(Debug)]
struct Registration {
    port: u16,
    nat: NatKind,
    expires: Instant,
}

/// The public side: registrations and introductions.
#[derive(Debug, Default)]
pub struct Introducer {
    /// Registered hosts by observed address.
    hosts: HashMap<SocketAddr, Registration>,
    /// Punch requests re-sent when their target next registers.
    pending: Vec<(SocketAddr, Instant, Message)>,
    /// When expired registrations and punch requests are next dropped.
    next_sweep: Option<Instant>,
}

impl Introducer {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many hosts are registered.
    pub fn registered(&self) -> usize {
        self.hosts.len()
    }

    /// Handles one message that arrived on `via` from `from`.
    pub fn on_message(
        &mut self,
        now: Instant,
        via: Port,
        from: SocketAddr,
        message: Message,
    ) -> Vec<Outgoing> {
        if self.next_sweep.is_none_or(|at| now >= at) {
            self.next_sweep = Some(now + Duration::from_secs(1));
            self.hosts.retain(|_, r| r.expires > now);
            self.pending.retain(|(_, until, _)| *until > now);
        }
        let reply = |message| Outgoing {
            via,
            to: from,
            message,
        };
        match message {
            Message::Probe { id } if via == Port::Main => vec![
                // The filter test leaves first, so its answer is in before
                // the host goes on to probe the other port.
                Outgoing {
                    via: Port::Fresh,
                    to: from,
                    message: Message::FilterTest { id },
                },
                reply(Message::Observed { id, addr: from }),
            ],
            Message::Probe { id } => vec![reply(Message::Observed { id, addr: from })],
            Message::Register { id, port, nat } => {
                if self.hosts.len() >= MAX_REGISTRATIONS && !self.hosts.contains_key(&from) {
                    return vec![]; // Full: the host retries at its next registration.
                }
                self.hosts.insert(
                    from,
                    Registration {
                        port,
                        nat,
                        expires: now + REGISTRATION_TTL,
                    },
                );
                let mut out = vec![reply(Message::Observed { id, addr: from })];
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
            Message::Introduce { id, peer, nat } => {
                // The DHT knows the peer by its public IP and its *local* RPC
                // port; behind a symmetric NAT the observed port differs.
                let found = self.hosts.iter().find(|(addr, r)| {
                    r.expires > now
                        && (*addr == &peer || (addr.ip() == peer.ip() && r.port == peer.port()))
                });
                let outcome = match found {
                    None => Outcome::Unknown,
                    Some((_, r)) if !direct_path_possible(nat, r.nat) => Outcome::Impossible {
                        reason: format!(
                            "a direct path is impossible between this host ({}) and {peer} ({}); a relay is needed",
                            nat.describe(),
                            r.nat.describe()
                        ),
                    },
                    Some((&addr, r)) => Outcome::Peer { addr, nat: r.nat },
                };
                let peer_addr = match outcome {
                    Outcome::Peer { addr, .. } => Some(addr),
                    _ => None,
                };
                let mut out = vec![reply(Message::Introduced { id, outcome })];
                if let Some(addr) = peer_addr {
                    let ask = Message::PunchRequest { peer: from, nat };
                    self.pending
                        .retain(|(to, _, m)| !(*to == addr && *m == ask));
                    if self.pending.len() < MAX_PENDING {
                        self.pending.push((addr, now + PENDING_TTL, ask.clone()));
                    }
                    let ask = Outgoing {
                        via: Port::Main,
                        to: addr,
                        message: ask,
                    };
                    // Whoever is behind a symmetric NAT punches from a port
                    // nobody knows yet, so the other side's NAT must already
                    // have sent toward its address: tell the other side first.
                    if nat == NatKind::Symmetric {
                        out.insert(0, ask);
                    } else {
                        out.push(ask);
                    }
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
            | Message::PunchRequest { .. } => vec![],
        }
    }
}

/// What a host's driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this message to this address from the RPC socket.
    Send { to: SocketAddr, message: Message },
    /// Send one punch to this address from the RPC socket.
    Punch(SocketAddr),
    /// The answer to [`HostIntroductions::introduce`] number `id`.
    Introduced { id: u64, result: IntroResult },
    /// The NAT probe finished (or gave up: [`NatKind::Unknown`]).
    NatDetected {
        kind: NatKind,
        observed: Option<SocketAddr>,
    },
    /// The introducer asked us to punch a peer.
    PunchRequested(SocketAddr),
}

/// How to reach a peer found on the DHT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntroResult {
    /// Connect to it as announced (no introducer knows it, or none answers).
    Direct,
    /// Connect to `addr`; both sides are punching. Behind a symmetric NAT the
    /// peer's punches come from another port: follow them.
    Punched { addr: SocketAddr, nat: NatKind },
    /// No direct path can exist.
    Impossible(String),
}

#[derive(Debug)]
enum Probe {
    /// Waiting for the main port's answer.
    Main {
        id: u64,
        next_send: Instant,
    },
    /// The main port answered; the filter test may still arrive.
    Grace {
        main: SocketAddr,
        alt_at: Instant,
    },
    /// Waiting for the other port's answer.
    Alt {
        main: SocketAddr,
        id: u64,
        next_send: Instant,
    },
    Done,
}

#[derive(Debug)]
struct PendingIntro {
    peer: SocketAddr,
    deadline: Instant,
    next_send: Instant,
}

#[derive(Debug)]
struct Handshake {
    nat: NatKind,
    next_punch: Instant,
    interval: Duration,
    until: Instant,
}

#[derive(Debug)]
struct Path {
    last_used: Instant,
    next_keepalive: Instant,
}

/// Where a host's introducer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntroducerAddr {
    pub main: SocketAddr,
    pub alt: SocketAddr,
}

impl IntroducerAddr {
    /// The convention: the introducer listens on the DHT node's port + 1
    /// (main) and + 2 (the probe's other port).
    pub fn beside_dht(dht: SocketAddr) -> Option<Self> {
        let main = dht.port().checked_add(1)?;
        let alt = dht.port().checked_add(2)?;
        Some(IntroducerAddr {
            main: SocketAddr::new(dht.ip(), main),
            alt: SocketAddr::new(dht.ip(), alt),
        })
    }
}

/// A host's side of introductions: its NAT probe, its registration, the
/// introductions it asked for, the handshakes it punches and the paths it
/// keeps alive.
#[derive(Debug)]
pub struct HostIntroductions {
    introducer: Option<IntroducerAddr>,
    /// The local RPC port, registered when `register` is set.
    port: u16,
    register: bool,
    keepalive: Duration,
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
    intros: HashMap<u64, PendingIntro>,
    handshakes: HashMap<SocketAddr, Handshake>,
    paths: HashMap<SocketAddr, Path>,
    next_id: u64,
}

impl HostIntroductions {
    /// A host whose RPC socket has local port `port`. Without an introducer
    /// every introduction answers [`IntroResult::Direct`].
    pub fn new(
        now: Instant,
        introducer: Option<IntroducerAddr>,
        port: u16,
        register: bool,
        keepalive: Duration,
    ) -> Self {
        let probe_id = rand::random::<u64>() >> 12;
        HostIntroductions {
            introducer,
            port,
            register,
            keepalive,
            nat: NatKind::Unknown,
            started: now,
            probe: match introducer {
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
            intros: HashMap::new(),
            handshakes: HashMap::new(),
            paths: HashMap::new(),
            next_id: probe_id + 1,
        }
    }

    /// Whether this host registers with the introducer (serves behind a NAT).
    pub fn registers(&self) -> bool {
        self.register
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
        self.introducer
            .filter(|_| !self.probing() && self.retry_probe_at.is_none())
    }

    /// Asks for an introduction to `peer`; the answer comes back as
    /// [`Action::Introduced`] with the returned id.
    pub fn introduce(&mut self, now: Instant, peer: SocketAddr) -> (u64, Vec<Action>) {
        let id = self.id();
        if self.introducer.is_none() || self.retry_probe_at.is_some() {
            let result = IntroResult::Direct;
            return (id, vec![Action::Introduced { id, result }]);
        }
        self.intros.insert(
            id,
            PendingIntro {
                peer,
                deadline: now + INTRODUCE_DEADLINE,
                next_send: now,
            },
        );
        (id, self.poll(now))
    }

    /// Notes that a path made by an introduction carried a request, so it is
    /// kept alive.
    pub fn used(&mut self, now: Instant, addr: SocketAddr) {
        if let Some(path) = self.paths.get_mut(&addr) {
            path.last_used = now;
        }
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
        let register = (self.register && self.ready().is_some()).then_some(self.next_register);
        let intros = self
            .intros
            .values()
            .map(|i| i.next_send.min(i.deadline))
            .min()
            .filter(|_| !self.probing());
        let handshakes = self.handshakes.values().map(|h| h.next_punch).min();
        let paths = self.paths.values().map(|p| p.next_keepalive).min();
        [probe, register, intros, handshakes, paths]
            .into_iter()
            .flatten()
            .min()
    }

    /// Does whatever is due at `now`.
    pub fn poll(&mut self, now: Instant) -> Vec<Action> {
        let mut out = vec![];
        self.poll_probe(now, &mut out);
        self.poll_punches(now, &mut out);
        // Registering and introducing need our NAT's kind.
        if let Some(introducer) = self.ready() {
            self.poll_introducer(now, introducer, &mut out);
        }
        out
    }

    fn poll_introducer(&mut self, now: Instant, introducer: IntroducerAddr, out: &mut Vec<Action>) {
        if self.register && now >= self.next_register {
            self.next_register = now + REGISTER_INTERVAL;
            let message = Message::Register {
                id: self.id(),
                port: self.port,
                nat: self.nat,
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
                out.push(Action::Send {
                    to: introducer.main,
                    message: Message::Introduce {
                        id,
                        peer: intro.peer,
                        nat: self.nat,
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
        self.paths
            .retain(|_, p| now.duration_since(p.last_used) < PATH_TTL);
        for (&peer, path) in self.paths.iter_mut() {
            if now >= path.next_keepalive {
                path.next_keepalive = now + self.keepalive;
                out.push(Action::Punch(peer));
            }
        }
    }

    fn poll_probe(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(introducer) = self.introducer else {
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
        let Some(introducer) = self.introducer else {
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
            Message::Observed { id, addr } => match self.probe {
                Probe::Main { id: probe, .. } if id == probe && from == introducer.main => {
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
                if self.intros.remove(&id).is_none() {
                    return vec![]; // A late duplicate.
                }
                let result = match outcome {
                    Outcome::Unknown => IntroResult::Direct,
                    Outcome::Impossible { reason } => IntroResult::Impossible(reason),
                    Outcome::Peer { addr, nat } => {
                        self.start_handshake(now, addr, nat);
                        IntroResult::Punched { addr, nat }
                    }
                };
                let mut out = vec![Action::Introduced { id, result }];
                out.extend(self.poll(now));
                out
            }
            Message::PunchRequest { peer, nat } => {
                self.start_handshake(now, peer, nat);
                let mut out = vec![
                    Action::Send {
                        to: introducer.main,
                        message: Message::PunchAck { peer },
                    },
                    Action::PunchRequested(peer),
                ];
                out.extend(self.poll(now));
                out
            }
            _ => vec![],
        }
    }

    fn start_handshake(&mut self, now: Instant, peer: SocketAddr, nat: NatKind) {
        if self.paths.len() >= MAX_PATHS && !self.paths.contains_key(&peer) {
            let oldest = self
                .paths
                .iter()
                .min_by_key(|(_, p)| p.last_used)
                .map(|(a, _)| *a);
            if let Some(oldest) = oldest {
                self.paths.remove(&oldest);
            }
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
        self.paths.insert(
            peer,
            Path {
                last_used: now,
                next_keepalive: now + self.keepalive,
            },
        );
    }

    /// `from` punched us. A handshake with it is done once we answer. A
    /// peer behind a symmetric NAT punches from a port we did not know: from
    /// then on it is punched (and kept alive) there.
    pub fn on_punch(&mut self, now: Instant, from: SocketAddr) -> Vec<Action> {
        let mut out = vec![];
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
        if let Some(path) = self.paths.get_mut(&from) {
            // The peer's punch refreshed our NAT's mapping as well as an own
            // keepalive would (our answer refreshes the peer's).
            path.next_keepalive = now + self.keepalive;
        }
        out
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
