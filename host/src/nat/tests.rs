//! The introduction state machines against simulated NATs, in simulated time.
//!
//! The simulator models the four NAT types of the lab (mapping and
//! filtering, per docs/nat-lab.md), an introducer on a public address and two
//! hosts, each behind its own NAT. Datagrams take [`LATENCY`] per hop and can
//! be dropped or delayed by a test.
//!
//! Time moves as it does for the real driver ([`super::host_driver`]): from
//! one event to the next, where an event is a datagram's arrival or a host's
//! [`HostIntroductions::next_wakeup`], and a host is polled only when its
//! wakeup is due. So a wakeup the state machine forgets to ask for is a
//! wakeup the simulated host never gets, as on a real one.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::config::{NatConfig, DEFAULT_KEEPALIVE};
use super::host::{
    Action, HostIntroductions, IntroOutcome, IntroResult, HANDSHAKE_PUNCH_INTERVAL, HANDSHAKE_TIME,
    PATH_TTL, PROBE_DEADLINE, PROBE_RETRY, REGISTER_INTERVAL, RELAYED_PUNCH_INTERVAL, RETRY,
};
use super::introducer::{Introducer, Port};
use super::kind::{direct_path_possible, NatKind};
use super::wire::{self, IntroducerAddr, Message};

/// One hop's delay.
const LATENCY: Duration = Duration::from_millis(10);
/// Slack in the timing assertions: the clock's step when the simulator
/// advanced 1 ms at a time. Now it jumps to each event, so times are exact
/// and the slack only keeps the assertions as they were written.
const STEP: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    NoNat,
    FullCone,
    AddressRestricted,
    PortRestricted,
    Symmetric,
}

fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

/// One NAT: maps inside sockets to public ports and filters what comes in.
struct Nat {
    kind: Kind,
    public: IpAddr,
    next_port: u16,
    /// A symmetric NAT with this picks each new port at random in
    /// 1024–65535 (as the lab's `fully-random` masquerade does), not in
    /// steps of 7.
    random_ports: Option<rand::rngs::StdRng>,
    /// (inside socket, destination for symmetric NATs) → public port.
    mappings: HashMap<(SocketAddr, Option<SocketAddr>), u16>,
    /// Public port → inside socket.
    inside: HashMap<u16, SocketAddr>,
    /// (public port, destination) pairs that have been sent to.
    sent: HashSet<(u16, SocketAddr)>,
}

impl Nat {
    fn new(kind: Kind, public: IpAddr) -> Self {
        Nat {
            kind,
            public,
            next_port: 40_000,
            random_ports: None,
            mappings: HashMap::new(),
            inside: HashMap::new(),
            sent: HashSet::new(),
        }
    }

    fn outbound(&mut self, src: SocketAddr, dst: SocketAddr) -> SocketAddr {
        let key = (src, (self.kind == Kind::Symmetric).then_some(dst));
        let port = match self.mappings.get(&key) {
            Some(&p) => p,
            None => {
                // Cone NATs keep the port (as Linux SNAT does when it can);
                // symmetric ones pick a new one per destination.
                let p = match (&mut self.random_ports, self.kind) {
                    (Some(rng), Kind::Symmetric) => loop {
                        let p = rand::Rng::random_range(rng, 1024..=u16::MAX);
                        if !self.inside.contains_key(&p) {
                            break p;
                        }
                    },
                    (None, Kind::Symmetric) => {
                        self.next_port += 7;
                        self.next_port
                    }
                    _ => src.port(),
                };
                self.mappings.insert(key, p);
                self.inside.insert(p, src);
                p
            }
        };
        self.sent.insert((port, dst));
        SocketAddr::new(self.public, port)
    }

    /// Where a datagram from `from` to our public `port` goes, if anywhere.
    fn inbound(&self, port: u16, from: SocketAddr) -> Option<SocketAddr> {
        let inside = *self.inside.get(&port)?;
        let admitted = match self.kind {
            Kind::NoNat | Kind::FullCone => true,
            Kind::AddressRestricted => self
                .sent
                .iter()
                .any(|(p, to)| *p == port && to.ip() == from.ip()),
            Kind::PortRestricted | Kind::Symmetric => self.sent.contains(&(port, from)),
        };
        admitted.then_some(inside)
    }
}

#[derive(Debug, Clone)]
enum Payload {
    Punch,
    Message(Message),
}

struct Host {
    state: HostIntroductions,
    local: SocketAddr,
    nat: Nat,
    /// The birthday attempt's extra sockets (their local addresses).
    extra: Vec<SocketAddr>,
    /// Adopted extra sockets: peer → the socket datagrams to it leave from.
    routes: HashMap<SocketAddr, SocketAddr>,
    /// Birthday attempts that ended.
    birthdays: Vec<super::birthday::Report>,
    /// Punches sent (from any socket).
    punches_sent: usize,
    /// Addresses this host received punches from.
    punched_by: Vec<(Instant, SocketAddr)>,
    results: Vec<(Instant, u64, IntroResult)>,
    /// How each introduction ended, by id.
    outcomes: HashMap<u64, IntroOutcome>,
    detected: Option<NatKind>,
    /// Peers whose path goes through the relay (with this host's token),
    /// as the transport's route table would have them.
    relayed: HashMap<SocketAddr, [u8; 8]>,
    /// Relayed paths that moved to a direct one.
    direct_again: Vec<SocketAddr>,
}

const INTRODUCER: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10));

fn introducer_addr() -> IntroducerAddr {
    IntroducerAddr::beside_dht(SocketAddr::new(INTRODUCER, 20001)).unwrap()
}

/// The state of a host serving behind a NAT at `local`, started at `now`.
fn serving_host(now: Instant, local: SocketAddr) -> HostIntroductions {
    let config = NatConfig {
        introducer: Some(introducer_addr()),
        keepalive: DEFAULT_KEEPALIVE,
        behind_nat: true,
    };
    HostIntroductions::new(now, &config, local.port())
}

/// Loses the first datagram that `matches`, and nothing else.
fn lose_first(matches: fn(&Payload) -> bool) -> LossFn {
    let mut lost = false;
    Box::new(move |_, _, p| {
        let lose = !lost && matches(p);
        lost |= lose;
        lose
    })
}

/// Decides whether a datagram is lost: (sender, receiver, payload) → drop?
type LossFn = Box<dyn FnMut(SocketAddr, SocketAddr, &Payload) -> bool>;

struct Sim {
    now: Instant,
    t0: Instant,
    introducer: Introducer,
    hosts: Vec<Host>,
    /// (arrival, from (public), to (public), payload)
    in_flight: Vec<(Instant, SocketAddr, SocketAddr, Payload)>,
    loss: LossFn,
    /// Extra delay for the introducer's answers.
    introducer_delay: Duration,
    /// The last ephemeral port the introducer sent from.
    fresh_port: u16,
}

impl Sim {
    fn new(kinds: [Kind; 2]) -> Sim {
        let t0 = Instant::now();
        let hosts = kinds
            .iter()
            .enumerate()
            .map(|(i, &kind)| {
                let n = i as u8 + 1;
                let local = SocketAddr::new(ip(10, 0, n, 2), 5000 + u16::from(n));
                let public = if kind == Kind::NoNat {
                    local.ip()
                } else {
                    ip(203, 0, 113, n + 1)
                };
                Host {
                    state: serving_host(t0, local),
                    local,
                    nat: Nat::new(kind, public),
                    extra: vec![],
                    routes: HashMap::new(),
                    birthdays: vec![],
                    punches_sent: 0,
                    punched_by: vec![],
                    results: vec![],
                    outcomes: HashMap::new(),
                    detected: None,
                    relayed: HashMap::new(),
                    direct_again: vec![],
                }
            })
            .collect();
        Sim {
            now: t0,
            t0,
            introducer: Introducer::new(),
            hosts,
            in_flight: vec![],
            loss: Box::new(|_, _, _| false),
            introducer_delay: Duration::ZERO,
            fresh_port: 50_000,
        }
    }

    /// The address the DHT would give for host `i`: its public IP and its
    /// local RPC port.
    fn announced(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.hosts[i].nat.public, self.hosts[i].local.port())
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn send(&mut self, from: SocketAddr, to: SocketAddr, payload: Payload, delay: Duration) {
        if !(self.loss)(from, to, &payload) {
            self.in_flight
                .push((self.now + LATENCY + delay, from, to, payload));
        }
    }

    fn apply(&mut self, i: usize, actions: Vec<Action>) {
        for action in actions {
            let host = &mut self.hosts[i];
            let (to, payload) = match action {
                Action::Send { to, message } => (to, Payload::Message(message)),
                Action::Punch(to) => (to, Payload::Punch),
                Action::Introduced {
                    id,
                    result,
                    outcome,
                } => {
                    host.results.push((self.now, id, result));
                    host.outcomes.insert(id, outcome);
                    continue;
                }
                Action::NatDetected { kind, .. } => {
                    host.detected = Some(kind);
                    continue;
                }
                Action::PunchRequested(_)
                | Action::BirthdayStarted { .. }
                | Action::BirthdayRefused { .. } => continue,
                Action::OpenSockets { count, .. } => {
                    host.extra = (0..count)
                        .map(|k| SocketAddr::new(host.local.ip(), 30_000 + k as u16))
                        .collect();
                    continue;
                }
                Action::PunchFromSockets(to) => {
                    for local in host.extra.clone() {
                        let host = &mut self.hosts[i];
                        host.punches_sent += 1;
                        let from = host.nat.outbound(local, to);
                        self.send(from, to, Payload::Punch, Duration::ZERO);
                    }
                    continue;
                }
                Action::AdoptSocket { index, peer } => {
                    host.routes.insert(peer, host.extra[index]);
                    host.extra.clear();
                    continue;
                }
                Action::CloseSockets => {
                    host.extra.clear();
                    continue;
                }
                Action::ReleaseSocket(peer) => {
                    host.routes.remove(&peer);
                    continue;
                }
                Action::BirthdayEnded(report) => {
                    host.birthdays.push(report);
                    continue;
                }
                Action::Relay { peer, relay, token } => {
                    assert_eq!(relay, introducer_addr().main);
                    host.relayed.insert(peer, token);
                    continue;
                }
                Action::Unrelay { peer, direct } => {
                    host.relayed.remove(&peer);
                    if direct {
                        host.direct_again.push(peer);
                    }
                    continue;
                }
            };
            if matches!(payload, Payload::Punch) {
                host.punches_sent += 1;
            }
            // A routed peer's datagrams leave from its adopted socket.
            let local = host.routes.get(&to).copied().unwrap_or(host.local);
            let from = host.nat.outbound(local, to);
            self.send(from, to, payload, Duration::ZERO);
        }
    }

    fn introduce(&mut self, i: usize, peer: SocketAddr) -> u64 {
        let (id, actions) = self.hosts[i].state.introduce(self.now, peer);
        self.apply(i, actions);
        id
    }

    /// [`introduce`](Self::introduce), asking for the relay at once (as a
    /// host does after its punched connect failed).
    fn introduce_relayed(&mut self, i: usize, peer: SocketAddr) -> u64 {
        let (id, actions) = self.hosts[i].state.introduce_relayed(self.now, peer);
        self.apply(i, actions);
        id
    }

    /// Runs until `until_ms` (ms after start), moving time the way the real
    /// driver does: to the earliest of the next datagram's arrival and each
    /// running host's [`HostIntroductions::next_wakeup`]; only hosts whose
    /// wakeup is due are polled. Hosts listed in `asleep` are neither polled
    /// nor reached (not started yet). Events due at `until` itself are left
    /// for the next run.
    fn run_until(&mut self, until_ms: u64, asleep: &[usize]) {
        let until = self.at(until_ms);
        while self.now < until {
            for i in 0..self.hosts.len() {
                if asleep.contains(&i) || !self.due(i) {
                    continue;
                }
                let actions = self.hosts[i].state.poll(self.now);
                self.apply(i, actions);
                // The real driver sleeps until next_wakeup: one that is still
                // due right after a poll would make it spin.
                assert!(
                    !self.due(i),
                    "host {i} is due again at once after poll at {:?}",
                    self.now - self.t0
                );
            }
            self.in_flight.sort_by_key(|d| d.0);
            while self.in_flight.first().is_some_and(|d| d.0 <= self.now) {
                let (_, from, to, payload) = self.in_flight.remove(0);
                self.deliver(from, to, payload, asleep);
            }
            self.now = self.next_event(asleep).map_or(until, |t| t.min(until));
        }
    }

    /// Whether host `i` asked to be polled by now.
    fn due(&self, i: usize) -> bool {
        self.hosts[i]
            .state
            .next_wakeup()
            .is_some_and(|t| t <= self.now)
    }

    /// When something next happens: a datagram arrives, or a running host's
    /// wakeup comes (a handled datagram may have made one due at once). The
    /// introducer has no timers: it sweeps when a message arrives.
    fn next_event(&self, asleep: &[usize]) -> Option<Instant> {
        let arrivals = self.in_flight.iter().map(|d| d.0);
        let wakeups = (0..self.hosts.len())
            .filter(|i| !asleep.contains(i))
            .filter_map(|i| self.hosts[i].state.next_wakeup());
        arrivals.chain(wakeups).min().map(|t| t.max(self.now))
    }

    fn deliver(&mut self, from: SocketAddr, to: SocketAddr, payload: Payload, asleep: &[usize]) {
        if to.ip() == INTRODUCER {
            let Payload::Message(message) = payload else {
                return;
            };
            let via = if to == introducer_addr().main {
                Port::Main
            } else {
                Port::Alt
            };
            // What the host's driver sends: the message, padded.
            let received = wire::encode_padded(&message, wire::HOST_DATAGRAM_MIN).len();
            for out in self
                .introducer
                .on_message(self.now, via, from, message, received)
            {
                let src = match out.via {
                    Port::Main => introducer_addr().main,
                    Port::Alt => introducer_addr().alt,
                    Port::Fresh => {
                        self.fresh_port += 1;
                        SocketAddr::new(INTRODUCER, self.fresh_port)
                    }
                };
                let delay = self.introducer_delay;
                self.send(src, out.to, Payload::Message(out.message), delay);
            }
            return;
        }
        let Some(i) = self.hosts.iter().position(|h| h.nat.public == to.ip()) else {
            return;
        };
        if asleep.contains(&i) {
            return;
        }
        let host = &mut self.hosts[i];
        let Some(inside) = host.nat.inbound(to.port(), from) else {
            return; // The NAT dropped it.
        };
        // An extra socket only passes on punches (to the attempt); an
        // adopted one is read like the main socket; a closed one drops all.
        let extra = host.extra.iter().position(|s| *s == inside);
        let adopted = host.routes.values().any(|s| *s == inside);
        if inside != host.local && extra.is_none() && !adopted {
            return;
        }
        let actions = match (payload, extra) {
            (Payload::Punch, Some(index)) => host.state.on_socket_punch(self.now, index, from),
            (Payload::Message(_), Some(_)) => return,
            (Payload::Punch, None) => {
                host.punched_by.push((self.now, from));
                host.state.on_punch(self.now, from)
            }
            (Payload::Message(m), None) => host.state.on_message(self.now, from, m),
        };
        self.apply(i, actions);
    }

    /// When both hosts had received a punch from the other (the path is
    /// open both ways), if they have.
    fn path_open_at(&self) -> Option<Instant> {
        let first = |i: usize, from_ip: IpAddr| {
            self.hosts[i]
                .punched_by
                .iter()
                .find(|(_, f)| f.ip() == from_ip)
                .map(|(t, _)| *t)
        };
        let a = first(0, self.hosts[1].nat.public)?;
        let b = first(1, self.hosts[0].nat.public)?;
        Some(a.max(b))
    }

    fn result(&self, i: usize, id: u64) -> Option<(Instant, IntroResult)> {
        self.hosts[i]
            .results
            .iter()
            .find(|r| r.1 == id)
            .map(|r| (r.0, r.2.clone()))
    }
}

fn nat_kind(kind: Kind) -> NatKind {
    match kind {
        Kind::NoNat | Kind::FullCone | Kind::AddressRestricted => NatKind::Open,
        Kind::PortRestricted => NatKind::PortRestricted,
        Kind::Symmetric => NatKind::Symmetric,
    }
}

#[test]
fn the_probe_tells_each_nat_type_apart() {
    for kind in [
        Kind::NoNat,
        Kind::FullCone,
        Kind::AddressRestricted,
        Kind::PortRestricted,
        Kind::Symmetric,
    ] {
        let mut sim = Sim::new([kind, Kind::NoNat]);
        sim.run_until(200, &[]);
        assert_eq!(sim.hosts[0].detected, Some(nat_kind(kind)), "{kind:?}");
    }
}

#[test]
fn a_host_restarted_on_the_same_port_is_still_seen_behind_its_port_restricted_nat() {
    // The first process probed both introducer ports, so its NAT now lets
    // both in on that port for a while; its successor must not be fooled.
    let mut sim = Sim::new([Kind::PortRestricted, Kind::NoNat]);
    sim.run_until(200, &[]);
    assert_eq!(sim.hosts[0].detected, Some(NatKind::PortRestricted));
    sim.hosts[0].detected = None;
    sim.hosts[0].state = serving_host(sim.now, sim.hosts[0].local);
    sim.run_until(400, &[]);
    assert_eq!(sim.hosts[0].detected, Some(NatKind::PortRestricted));
}

/// Host 0 asks to be introduced to host 1 once both have registered; returns
/// the simulation and the introduction's id.
fn introduce_after_registration(kinds: [Kind; 2]) -> (Sim, u64) {
    let mut sim = Sim::new(kinds);
    sim.run_until(500, &[]);
    assert_eq!(sim.introducer.registered(), 2);
    let peer = sim.announced(1);
    let id = sim.introduce(0, peer);
    (sim, id)
}

#[test]
fn every_pair_theory_allows_opens_within_two_round_trips_of_the_introduction() {
    let kinds = [
        Kind::NoNat,
        Kind::FullCone,
        Kind::AddressRestricted,
        Kind::PortRestricted,
        Kind::Symmetric,
    ];
    for a in kinds {
        for b in kinds {
            if !direct_path_possible(nat_kind(a), nat_kind(b)) {
                continue;
            }
            let (mut sim, id) = introduce_after_registration([a, b]);
            sim.run_until(2_000, &[]);
            let (answered, result) = sim.result(0, id).expect("an answer");
            assert!(
                matches!(result, IntroResult::Punched { .. }),
                "{a:?}→{b:?}: {result:?}"
            );
            let open = sim
                .path_open_at()
                .unwrap_or_else(|| panic!("{a:?}→{b:?}: no path"));
            // Answer: one round trip. Then punches both ways, plus one more
            // round trip when a symmetric NAT's real port must be learnt.
            let rtt = 2 * LATENCY;
            assert!(
                open.duration_since(answered) <= 2 * rtt + STEP,
                "{a:?}→{b:?}: open {:?} after the answer",
                open.duration_since(answered)
            );
        }
    }
}

#[test]
fn two_symmetric_nats_are_relayed_at_once_with_a_token_each() {
    // (Port-restricted ↔ symmetric gets birthday punching.)
    let (a, b) = (Kind::Symmetric, Kind::Symmetric);
    let (mut sim, id) = introduce_after_registration([a, b]);
    sim.run_until(1_000, &[]);
    let (answered, result) = sim.result(0, id).expect("an answer");
    let IntroResult::Relayed { addr, relay, .. } = result else {
        panic!("{a:?}→{b:?}: {result:?}");
    };
    assert_eq!(relay, introducer_addr().main);
    assert_eq!(sim.hosts[0].outcomes[&id], IntroOutcome::Relayed);
    assert!(answered <= sim.at(500) + 2 * LATENCY + STEP);
    // Each side routes the other's observed address through the relay,
    // with a token of its own.
    let caller_token = sim.hosts[0].relayed[&addr];
    assert_eq!(sim.hosts[1].relayed.len(), 1, "{a:?}→{b:?}");
    let (_, peer_token) = sim.hosts[1].relayed.iter().next().unwrap();
    assert_ne!(caller_token, *peer_token);
    // The relay forwards between the two, and only with their tokens.
    let (&caller_seen, _) = sim.hosts[1].relayed.iter().next().unwrap();
    let now = sim.now;
    assert_eq!(
        sim.introducer
            .relay_frame(now, caller_seen, &caller_token, addr, 1200),
        Some(*peer_token)
    );
    assert_eq!(
        sim.introducer
            .relay_frame(now, caller_seen, peer_token, addr, 1200),
        None
    );
}

#[test]
fn a_caller_that_is_not_registered_is_registered_for_the_relay_and_stays_so() {
    let mut sim = Sim::new([Kind::Symmetric, Kind::Symmetric]);
    // The caller is a one-shot `call`: it does not register.
    let config = NatConfig {
        introducer: Some(introducer_addr()),
        keepalive: DEFAULT_KEEPALIVE,
        behind_nat: false,
    };
    sim.hosts[0].state = HostIntroductions::new(sim.now, &config, sim.hosts[0].local.port());
    sim.run_until(500, &[]);
    assert_eq!(sim.introducer.registered(), 1);
    let peer = sim.announced(1);
    let id = sim.introduce(0, peer);
    sim.run_until(1_000, &[]);
    assert!(matches!(
        sim.result(0, id),
        Some((_, IntroResult::Relayed { .. }))
    ));
    assert_eq!(sim.introducer.registered(), 2, "registered on the spot");
    // Its registration is kept alive past the introducer's TTL.
    sim.run_until(30_000, &[]);
    assert_eq!(sim.introducer.registered(), 2);
    assert_eq!(sim.introducer.relay_stats().sessions, 1);
}

#[test]
fn a_relay_asked_for_after_a_failed_punch_moves_to_a_direct_punch() {
    // A pair that can punch, asking for the relay (its punched connect
    // failed: a firewall between the two, since lifted).
    let mut sim = Sim::new([Kind::PortRestricted, Kind::PortRestricted]);
    sim.run_until(500, &[]);
    let peer = sim.announced(1);
    let id = sim.introduce_relayed(0, peer);
    sim.run_until(1_000, &[]);
    assert!(matches!(
        sim.result(0, id),
        Some((_, IntroResult::Relayed { .. }))
    ));
    // Both sides punch directly on their relayed path at once and every
    // RELAYED_PUNCH_INTERVAL; the punches meet and both paths are direct.
    sim.run_until(1_000 + 2 * RELAYED_PUNCH_INTERVAL.as_millis() as u64, &[]);
    for host in &sim.hosts {
        assert!(host.relayed.is_empty(), "{:?}", host.relayed);
        assert_eq!(host.direct_again.len(), 1);
    }
}

#[test]
fn a_forged_direct_punch_does_not_move_a_relayed_path() {
    let mut sim = Sim::new([Kind::PortRestricted, Kind::PortRestricted]);
    sim.run_until(500, &[]);
    let peer = sim.announced(1);
    let id = sim.introduce_relayed(0, peer);
    // Nothing goes directly between the two (a firewall): relayed it stays.
    let introducer = introducer_addr().main.ip();
    sim.loss = Box::new(move |from, to, _| from.ip() != introducer && to.ip() != introducer);
    sim.run_until(1_000, &[]);
    let Some((_, IntroResult::Relayed { addr, .. })) = sim.result(0, id) else {
        panic!("{:?}", sim.result(0, id));
    };
    // Someone who knows both addresses forges the peer's punch, again and
    // again: host 0 checks the way with a nonce that never comes back, and
    // its path stays relayed.
    for k in 0..20u64 {
        let now = sim.at(1_000 + k * 500);
        let actions = sim.hosts[0].state.on_punch(now, addr);
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Unrelay { .. })),
            "{actions:?}"
        );
        sim.apply(0, actions);
        sim.run_until(1_000 + (k + 1) * 500, &[]);
    }
    assert_eq!(sim.hosts[0].relayed.len(), 1);
    assert!(sim.hosts[0].direct_again.is_empty());
}

#[test]
fn an_introduction_that_says_punch_ends_a_relayed_path() {
    let mut sim = Sim::new([Kind::PortRestricted, Kind::PortRestricted]);
    sim.run_until(500, &[]);
    let peer = sim.announced(1);
    let id = sim.introduce_relayed(0, peer);
    // Every punch is lost (a firewall between the two): relayed it stays.
    sim.loss = Box::new(|_, _, p| matches!(p, Payload::Punch));
    sim.run_until(1_000, &[]);
    assert!(matches!(
        sim.result(0, id),
        Some((_, IntroResult::Relayed { .. }))
    ));
    assert_eq!(
        (sim.hosts[0].relayed.len(), sim.hosts[1].relayed.len()),
        (1, 1)
    );
    // A new introduction (the connection was lost) says punch: the relay
    // routes go on both sides, and the two punch again.
    let again = sim.introduce(0, peer);
    sim.run_until(1_500, &[]);
    assert!(matches!(
        sim.result(0, again),
        Some((_, IntroResult::Punched { .. }))
    ));
    for host in &sim.hosts {
        assert!(host.relayed.is_empty(), "{:?}", host.relayed);
        assert!(host.direct_again.is_empty());
    }
}

#[test]
fn lost_punches_are_made_up_by_the_handshake() {
    let (mut sim, id) =
        introduce_after_registration([Kind::PortRestricted, Kind::AddressRestricted]);
    let mut dropped = 0;
    sim.loss = Box::new(move |_, _, p| {
        let lose = matches!(p, Payload::Punch) && dropped < 6;
        dropped += lose as u32;
        lose
    });
    sim.run_until(3_000, &[]);
    assert!(matches!(
        sim.result(0, id),
        Some((_, IntroResult::Punched { .. }))
    ));
    let open = sim.path_open_at().expect("the path opens");
    // Six punches lost: the fourth round (after 50 + 100 + 200 ms) gets through.
    let fourth_round = HANDSHAKE_PUNCH_INTERVAL * 7;
    assert!(
        open <= sim.at(500) + fourth_round + 3 * LATENCY,
        "{:?}",
        open - sim.t0
    );
}

#[test]
fn an_unanswered_handshake_sends_only_a_handful_of_punches() {
    // Host 1 is asked to punch a peer that never answers (a forged request,
    // or a peer that is gone): host 0 stops listening to introductions. Its
    // full-cone NAT lets every punch in, so they can be counted.
    let (mut sim, _) = introduce_after_registration([Kind::FullCone, Kind::PortRestricted]);
    let deaf = NatConfig {
        introducer: None,
        keepalive: DEFAULT_KEEPALIVE,
        behind_nat: false,
    };
    sim.hosts[0].state = HostIntroductions::new(sim.now, &deaf, 1);
    sim.run_until(500 + HANDSHAKE_TIME.as_millis() as u64 + 1_000, &[]);
    let punches = sim.hosts[0].punched_by.len();
    assert!((5..=12).contains(&punches), "{punches} punches");
    // And nothing after: a path the peer never answered on is not kept
    // alive (it used to get a keepalive every interval for PATH_TTL).
    sim.run_until(PATH_TTL.as_millis() as u64 + 60_000, &[]);
    assert_eq!(sim.hosts[0].punched_by.len(), punches);
}

#[test]
fn a_punch_request_without_the_hosts_registration_cookie_is_ignored() {
    let mut sim = Sim::new([Kind::PortRestricted, Kind::PortRestricted]);
    sim.run_until(500, &[]);
    let victim: SocketAddr = "192.0.2.9:80".parse().unwrap();
    let now = sim.now;
    // Spoofed from the introducer's address, as an off-path attacker can.
    for cookie in ["", "00112233445566778899aabbccddeeff"] {
        let forged = Message::PunchRequest {
            peer: victim,
            nat: NatKind::PortRestricted,
            cookie: cookie.into(),
            relay_token: "0102030405060708".into(),
            birthday: Some(super::kind::BirthdayRole::Sockets),
        };
        let actions = sim.hosts[1]
            .state
            .on_message(now, introducer_addr().main, forged);
        assert!(actions.is_empty(), "{actions:?}");
    }
}

#[test]
fn a_forged_observed_plants_no_cookie_for_a_forged_punch_request() {
    // The attack of the review: an `observed` spoofed from the introducer's
    // address with a cookie of the attacker's, then (after the host's next
    // registration) a punch request carrying that cookie that makes the host
    // probe a victim.
    let mut sim = Sim::new([Kind::PortRestricted, Kind::PortRestricted]);
    sim.run_until(500, &[]);
    let planted = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_string();
    let now = sim.now;
    for id in [0, 1, 12_345, u64::MAX >> 12] {
        let forged = Message::Observed {
            id,
            addr: "198.51.100.7:4000".parse().unwrap(),
            cookie: planted.clone(),
        };
        let actions = sim.hosts[1]
            .state
            .on_message(now, introducer_addr().main, forged);
        sim.apply(1, actions);
    }
    // Two registrations later...
    sim.run_until(500 + 2 * REGISTER_INTERVAL.as_millis() as u64 + 100, &[]);
    let victim: SocketAddr = "192.0.2.9:80".parse().unwrap();
    let forged = Message::PunchRequest {
        peer: victim,
        nat: NatKind::Symmetric,
        cookie: planted,
        relay_token: String::new(),
        birthday: Some(super::kind::BirthdayRole::Probe),
    };
    let actions = sim.hosts[1]
        .state
        .on_message(sim.now, introducer_addr().main, forged);
    assert!(actions.is_empty(), "{actions:?}");
}

#[test]
fn a_birthday_role_that_does_not_fit_the_hosts_nat_is_refused() {
    // A port-restricted host asked (with its real cookie, as a confused or
    // compromised introducer could) to open the symmetric side's sockets.
    let mut sim = Sim::new([Kind::PortRestricted, Kind::PortRestricted]);
    sim.run_until(500, &[]);
    let cookie = sim.hosts[1].state.registration_cookie().to_string();
    assert!(!cookie.is_empty());
    let asked = Message::PunchRequest {
        peer: "192.0.2.9:80".parse().unwrap(),
        nat: NatKind::PortRestricted,
        cookie,
        relay_token: String::new(),
        birthday: Some(super::kind::BirthdayRole::Sockets),
    };
    let actions = sim.hosts[1]
        .state
        .on_message(sim.now, introducer_addr().main, asked);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::OpenSockets { .. })),
        "{actions:?}"
    );
    assert!(actions.iter().any(
        |a| matches!(a, Action::BirthdayRefused { reason, .. } if reason.contains("does not fit"))
    ));
}

#[test]
fn a_lost_introduce_and_a_late_answer_are_retried() {
    let mut sim = Sim::new([Kind::PortRestricted, Kind::PortRestricted]);
    sim.run_until(500, &[]);
    sim.loss = lose_first(|p| matches!(p, Payload::Message(Message::Introduce { .. })));
    // Answers take longer than the retry interval.
    sim.introducer_delay = RETRY + Duration::from_millis(100);
    let peer = sim.announced(1);
    let id = sim.introduce(0, peer);
    sim.run_until(2_500, &[]);
    let (answered, result) = sim.result(0, id).expect("an answer");
    assert!(matches!(result, IntroResult::Punched { .. }), "{result:?}");
    assert!(answered > sim.at(500) + RETRY, "the first request was lost");
    assert_eq!(
        sim.hosts[0].results.iter().filter(|r| r.1 == id).count(),
        1,
        "duplicate answers are ignored"
    );
    assert!(sim.path_open_at().is_some());
}

#[test]
fn a_peer_that_starts_later_is_unknown_until_it_registers() {
    let mut sim = Sim::new([Kind::PortRestricted, Kind::FullCone]);
    // Host 1 is not running yet.
    sim.run_until(500, &[1]);
    let peer = sim.announced(1);
    let early = sim.introduce(0, peer);
    sim.run_until(1_000, &[1]);
    assert_eq!(
        sim.result(0, early).map(|r| r.1),
        Some(IntroResult::Unregistered)
    );
    assert_eq!(sim.hosts[0].outcomes[&early], IntroOutcome::UnknownPeer);
    // It starts at 1 s and registers; the next introduction works.
    sim.hosts[1].state = serving_host(sim.now, sim.hosts[1].local);
    sim.run_until(1_500, &[]);
    let later = sim.introduce(0, peer);
    sim.run_until(2_500, &[]);
    assert!(matches!(
        sim.result(0, later),
        Some((_, IntroResult::Punched { .. }))
    ));
    assert_eq!(sim.hosts[0].outcomes[&later], IntroOutcome::Punched);
    assert!(sim.path_open_at().is_some());
}

#[test]
fn a_punch_request_the_peer_missed_reaches_it_at_its_next_registration() {
    let (mut sim, id) = {
        let mut sim = Sim::new([Kind::PortRestricted, Kind::PortRestricted]);
        sim.run_until(500, &[]);
        sim.loss = lose_first(|p| matches!(p, Payload::Message(Message::PunchRequest { .. })));
        let peer = sim.announced(1);
        let id = sim.introduce(0, peer);
        (sim, id)
    };
    sim.run_until(5_000, &[]);
    assert!(matches!(
        sim.result(0, id),
        Some((_, IntroResult::Punched { .. }))
    ));
    let open = sim.path_open_at().expect("the path opens");
    // The peer re-registers REGISTER_INTERVAL after its first registration.
    assert!(open > sim.at(500) + HANDSHAKE_PUNCH_INTERVAL);
    assert!(
        open <= sim.at(200) + REGISTER_INTERVAL,
        "{:?}",
        open - sim.t0
    );
}

#[test]
fn without_an_introducer_every_peer_is_called_directly() {
    let mut sim = Sim::new([Kind::PortRestricted, Kind::FullCone]);
    // Nothing answers at the introducer's address.
    sim.loss = Box::new(|_, to, _| to.ip() == INTRODUCER);
    let peer = sim.announced(1);
    let id = sim.introduce(0, peer);
    sim.run_until(3_000, &[]);
    let (answered, result) = sim.result(0, id).expect("an answer");
    assert_eq!(result, IntroResult::Direct);
    assert!(answered <= sim.at(0) + PROBE_DEADLINE + STEP);
    assert_eq!(sim.hosts[0].detected, Some(NatKind::Unknown));
    // And later introductions answer at once.
    let again = sim.introduce(0, peer);
    assert_eq!(sim.result(0, again).map(|r| r.1), Some(IntroResult::Direct));
    // Neither is an unknown peer: the introducer never answered.
    assert_eq!(sim.hosts[0].outcomes[&id], IntroOutcome::NoAnswer);
    assert_eq!(sim.hosts[0].outcomes[&again], IntroOutcome::NoAnswer);
}

#[test]
fn an_introducer_that_starts_late_is_found_at_the_next_probe() {
    let mut sim = Sim::new([Kind::PortRestricted, Kind::FullCone]);
    // The introducer is down for the first five seconds.
    sim.loss = Box::new(|_, to, _| to.ip() == INTRODUCER);
    sim.run_until(5_000, &[]);
    assert_eq!(sim.hosts[1].detected, Some(NatKind::Unknown));
    assert_eq!(sim.introducer.registered(), 0);
    sim.loss = Box::new(|_, _, _| false);
    sim.run_until(PROBE_RETRY.as_millis() as u64 + 2_000, &[]);
    assert_eq!(sim.hosts[1].detected, Some(NatKind::Open));
    assert_eq!(sim.introducer.registered(), 2, "both hosts registered");
    let peer = sim.announced(1);
    let id = sim.introduce(0, peer);
    sim.run_until(PROBE_RETRY.as_millis() as u64 + 3_000, &[]);
    assert!(matches!(
        sim.result(0, id),
        Some((_, IntroResult::Punched { .. }))
    ));
}

#[test]
fn paths_in_use_are_kept_alive_and_idle_ones_are_let_go() {
    let (mut sim, id) = introduce_after_registration([Kind::PortRestricted, Kind::PortRestricted]);
    sim.run_until(1_000, &[]);
    let Some((_, IntroResult::Punched { addr, .. })) = sim.result(0, id) else {
        panic!("not introduced");
    };
    let punches_from_0 = |sim: &Sim, since: Instant| {
        sim.hosts[1]
            .punched_by
            .iter()
            .filter(|(t, f)| *t >= since && f.ip() == sim.hosts[0].nat.public)
            .count()
    };
    // Used once a minute for five minutes.
    let start = sim.now;
    for minute in 1..=5u64 {
        sim.run_until(1_000 + minute * 60_000, &[]);
        let now = sim.now;
        sim.hosts[0].state.used(now, addr);
    }
    // Every packet refreshes both NATs' entries for the path: it never goes
    // longer than one keepalive interval without one, and there is no storm.
    let mut on_path: Vec<Instant> = sim
        .hosts
        .iter()
        .flat_map(|h| h.punched_by.iter().map(|(t, _)| *t))
        .filter(|t| *t >= start)
        .collect();
    on_path.sort();
    let longest_gap = on_path.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(
        longest_gap <= DEFAULT_KEEPALIVE + 2 * LATENCY,
        "the path was silent for {longest_gap:?}"
    );
    // At most one keepalive from each side per interval.
    let most = 2 * (300 / DEFAULT_KEEPALIVE.as_secs()) as usize + 2;
    assert!(
        on_path.len() <= most,
        "{} punches in 5 minutes: {:?}",
        on_path.len(),
        on_path
            .iter()
            .map(|t| (*t - sim.t0).as_millis())
            .collect::<Vec<_>>()
    );
    // Not used again: kept for PATH_TTL, then silent.
    let idle_from = sim.now;
    sim.run_until(
        1_000 + 5 * 60_000 + PATH_TTL.as_millis() as u64 + 60_000,
        &[],
    );
    let after_ttl = idle_from + PATH_TTL + Duration::from_secs(1);
    assert_eq!(punches_from_0(&sim, after_ttl), 0);
}

#[test]
fn without_an_introducer_configured_nothing_is_asked() {
    let config = NatConfig {
        introducer: None,
        keepalive: DEFAULT_KEEPALIVE,
        behind_nat: false,
    };
    let now = Instant::now();
    let mut host = HostIntroductions::new(now, &config, 1);
    let (id, actions) = host.introduce(now, "198.51.100.7:1000".parse().unwrap());
    assert_eq!(
        actions,
        vec![Action::Introduced {
            id,
            result: IntroResult::Direct,
            outcome: IntroOutcome::NoIntroducer,
        }]
    );
}

/// Host 0 (behind `a`) asks to be introduced to host 1 (behind `b`), where
/// every symmetric NAT picks random ports from `seed` and each host draws
/// its probes from its own seed. Returns the simulation after the attempt,
/// the introduction's id, and how long after the introducer's answer the
/// path was open both ways, if it opened.
fn birthday_attempt(a: Kind, b: Kind, seed: u64) -> (Sim, u64, Option<Duration>) {
    use rand::SeedableRng;
    let mut sim = Sim::new([a, b]);
    for (k, host) in sim.hosts.iter_mut().enumerate() {
        let seed = seed * 2 + k as u64;
        host.state = serving_host(sim.t0, host.local).with_seed(seed);
        if host.nat.kind == Kind::Symmetric {
            host.nat.random_ports = Some(rand::rngs::StdRng::seed_from_u64(seed));
        }
    }
    sim.run_until(500, &[]);
    assert_eq!(sim.introducer.registered(), 2);
    let peer = sim.announced(1);
    let id = sim.introduce(0, peer);
    sim.run_until(
        500 + super::birthday::ATTEMPT_TIME.as_millis() as u64 + 500,
        &[],
    );
    let (answered, _) = sim.result(0, id).expect("an answer");
    let open = sim.path_open_at().map(|t| t - answered);
    (sim, id, open)
}

#[test]
fn birthday_punching_meets_a_random_port_symmetric_nat_in_both_directions() {
    use super::birthday::{Report, ATTEMPT_TIME, MAX_PROBES, SOCKETS};
    use super::kind::BirthdayRole;
    let goal = Duration::from_secs(3);
    for (a, b) in [
        (Kind::PortRestricted, Kind::Symmetric),
        (Kind::Symmetric, Kind::PortRestricted),
    ] {
        let sym = usize::from(a == Kind::PortRestricted);
        let mut times = vec![];
        for seed in 0..20 {
            let (sim, id, open) = birthday_attempt(a, b, seed);
            let Some((_, IntroResult::Birthday { role, .. })) = sim.result(0, id) else {
                panic!("{a:?}→{b:?}: {:?}", sim.result(0, id));
            };
            let expected = match a {
                Kind::Symmetric => BirthdayRole::Sockets,
                _ => BirthdayRole::Probe,
            };
            assert_eq!(role, expected);
            assert_eq!(sim.hosts[0].outcomes[&id], IntroOutcome::Birthday);
            // Bounded, whatever the outcome: one attempt per side, no more
            // sockets and probes than documented.
            for host in &sim.hosts {
                assert_eq!(host.birthdays.len(), 1, "{a:?}→{b:?}");
                assert!(host.extra.is_empty(), "extra sockets left open");
            }
            let rounds = ATTEMPT_TIME.as_secs() as usize;
            assert!(sim.hosts[sym].punches_sent <= rounds * SOCKETS + 20);
            assert!(sim.hosts[1 - sym].punches_sent <= MAX_PROBES + 20);
            let Some(open) = open else {
                continue;
            };
            // The side behind the symmetric NAT adopted the winning socket
            // (or met on its main socket, one more mapping) for the peer.
            let peer_of_sym = sim.hosts[1 - sym].nat.public;
            let report: &Report = &sim.hosts[sym].birthdays[0];
            assert_eq!(report.met.map(|m| m.ip()), Some(peer_of_sym));
            times.push(open);
        }
        times.sort();
        let within = times.iter().filter(|t| **t <= goal).count();
        eprintln!(
            "{a:?}→{b:?}: {within}/20 within {goal:?}, p50 {:?}, max {:?}",
            times[times.len() / 2],
            times.last().unwrap()
        );
        assert!(
            within >= 19,
            "{a:?}→{b:?}: {within}/20 within {goal:?}: {times:?}"
        );
    }
}

#[test]
fn repeated_birthday_requests_start_one_attempt_at_a_time_and_few_per_10_s() {
    use super::birthday::{ATTEMPTS_PER_10S, ATTEMPT_TIME, SOCKETS};
    use super::kind::BirthdayRole;
    let mut sim = Sim::new([Kind::PortRestricted, Kind::Symmetric]);
    sim.run_until(500, &[]);
    // Punch requests as real as they come: the host's registration cookie,
    // from the introducer's address (a compromised introducer, or someone
    // who learnt the cookie), each naming another victim, ten per second.
    let local = sim.hosts[1].local;
    let observed = sim.hosts[1].nat.outbound(local, introducer_addr().main);
    let cookie = sim.introducer.cookie(observed);
    let (mut opened, mut most_at_once) = (vec![], 0usize);
    for k in 0..100u64 {
        sim.run_until(500 + k * 100, &[]);
        let victim = SocketAddr::new(ip(192, 0, 2, k as u8), 4000);
        let forged = Message::PunchRequest {
            peer: victim,
            nat: NatKind::PortRestricted,
            cookie: cookie.clone(),
            birthday: Some(BirthdayRole::Sockets),
            relay_token: String::new(),
        };
        let now = sim.now;
        let actions = sim.hosts[1]
            .state
            .on_message(now, introducer_addr().main, forged);
        if actions
            .iter()
            .any(|a| matches!(a, Action::OpenSockets { .. }))
        {
            opened.push(now - sim.at(500));
        }
        sim.apply(1, actions);
        most_at_once = most_at_once.max(opened.len() - sim.hosts[1].birthdays.len());
    }
    // Ten seconds of requests: one attempt at a time (each lasts 4 s, so
    // they start 4 s apart) and no more than the rate allows.
    assert!(opened.len() <= ATTEMPTS_PER_10S as usize, "{opened:?}");
    assert!(opened.len() >= 2, "{opened:?}");
    for pair in opened.windows(2) {
        assert!(pair[1] - pair[0] >= ATTEMPT_TIME, "{opened:?}");
    }
    assert_eq!(most_at_once, 1);
    assert_eq!(
        sim.hosts[1].state.birthdays_refused(),
        100 - opened.len() as u64
    );
    // What the host sent in all: a few attempts' punches, plus the
    // handful each punch request's handshake costs (as without birthday).
    let bound = opened.len() * ATTEMPT_TIME.as_secs() as usize * SOCKETS + 100 * 12;
    assert!(
        sim.hosts[1].punches_sent <= bound,
        "{}",
        sim.hosts[1].punches_sent
    );
}

#[test]
fn a_birthday_path_keeps_its_socket_while_used_and_releases_it_after() {
    let (mut sim, _, open) = birthday_attempt(Kind::PortRestricted, Kind::Symmetric, 3);
    assert!(open.is_some(), "the attempt met");
    let prober = sim.hosts[0].nat.public;
    let adopted = |sim: &Sim| {
        let routes = &sim.hosts[1].routes;
        routes.len() == 1 && routes.keys().all(|peer| peer.ip() == prober)
    };
    assert!(adopted(&sim));
    // Kept alive (keepalives go through it) while the path lives...
    let t = 5_000 + PATH_TTL.as_millis() as u64 / 2;
    sim.run_until(t, &[]);
    assert!(adopted(&sim));
    // ... and closed once the path is let go: no socket is kept forever.
    sim.run_until(5_000 + PATH_TTL.as_millis() as u64 + 60_000, &[]);
    assert!(sim.hosts[1].routes.is_empty(), "{:?}", sim.hosts[1].routes);
}
