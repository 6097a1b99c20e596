//! Hole punching as a sans-IO state machine.
//!
//! Grenache's behaviour, made explicit: a host behind a NAT looks up every
//! service its plugins want punched, once per round (1 s), and sends one punch
//! (`C3 BF`) from its RPC socket to every address found ([`MAX_PUNCHES_PER_SERVICE`]
//! at most per service). The punch opens (and
//! keeps open) a mapping in its NAT toward that peer. Any host that receives a
//! punch tells its plugins (`on-punch`) and punches back, each at most once per
//! round per peer: the answer cannot turn into a punch storm, and a burst of
//! punches (an introduction's handshake) is one event for the plugins.
//!
//! [`PunchState`] takes the time and events as arguments and returns
//! [`PunchAction`]s; [`super::punch_driver`] does the I/O. The tests run it
//! in simulated time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::config::NatConfig;

/// How often a host behind a NAT punches its targets (Grenache: every 1 s).
pub const DEFAULT_PUNCH_INTERVAL: Duration = Duration::from_secs(1);

/// Most peers of one service punched per round. A directory can lie (a
/// Grape's answer is anyone's announce, up to 100 peers): without a cap one
/// lookup would make the host spray a punch at every address it names,
/// every round. A service rarely has more hosts than this; the directory
/// answers in random order, so others get their turn in later rounds.
pub const MAX_PUNCHES_PER_SERVICE: usize = 16;

/// Forget peers we have not punched for this long.
const FORGET_AFTER: Duration = Duration::from_secs(120);

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PunchAction {
    /// Look this service up and report the peers with [`PunchState::on_lookup`].
    Lookup(String),
    /// Send one punch datagram to this address from the RPC socket.
    SendPunch(SocketAddr),
    /// Tell the plugins that this peer punched us.
    NotifyPlugins(SocketAddr),
}

/// The punching state of one host.
#[derive(Debug)]
pub struct PunchState {
    targets: Vec<String>,
    /// [`NatConfig::behind_nat`]: only a host behind a NAT starts rounds.
    behind_nat: bool,
    interval: Duration,
    next_round: Instant,
    /// When we last sent a punch to each peer.
    last_sent: HashMap<SocketAddr, Instant>,
    /// When the plugins last heard of a punch from each peer.
    last_notified: HashMap<SocketAddr, Instant>,
}

impl PunchState {
    /// `targets` are the services to punch each round (one round every
    /// `interval`) when `config.behind_nat`.
    pub fn new(now: Instant, targets: Vec<String>, config: &NatConfig, interval: Duration) -> Self {
        PunchState {
            targets,
            behind_nat: config.behind_nat,
            interval,
            next_round: now,
            last_sent: HashMap::new(),
            last_notified: HashMap::new(),
        }
    }

    /// Replaces the services punched each round (a swap changed the
    /// plugins' manifests).
    pub fn set_targets(&mut self, targets: Vec<String>) {
        self.targets = targets;
    }

    /// When the driver should call [`poll`](Self::poll) next.
    pub fn next_wakeup(&self) -> Option<Instant> {
        (self.behind_nat && !self.targets.is_empty()).then_some(self.next_round)
    }

    /// Starts a punch round when one is due.
    pub fn poll(&mut self, now: Instant) -> Vec<PunchAction> {
        if !self.behind_nat || now < self.next_round {
            return vec![];
        }
        self.next_round = now + self.interval;
        self.last_sent
            .retain(|_, at| now.duration_since(*at) < FORGET_AFTER);
        self.last_notified
            .retain(|_, at| now.duration_since(*at) < FORGET_AFTER);
        self.targets
            .iter()
            .cloned()
            .map(PunchAction::Lookup)
            .collect()
    }

    /// A lookup for a punch target found these peers: punch each of them,
    /// the first [`MAX_PUNCHES_PER_SERVICE`] at most. `own` is this host's
    /// own address, which is never punched.
    pub fn on_lookup(
        &mut self,
        now: Instant,
        peers: &[SocketAddr],
        own: &[SocketAddr],
    ) -> Vec<PunchAction> {
        peers
            .iter()
            .filter(|p| !own.contains(p))
            .take(MAX_PUNCHES_PER_SERVICE)
            .map(|&peer| {
                self.last_sent.insert(peer, now);
                PunchAction::SendPunch(peer)
            })
            .collect()
    }

    /// `from` punched us: tell the plugins unless they heard of that peer
    /// less than one interval ago, and punch back unless we punched it less
    /// than one interval ago.
    pub fn on_punch(&mut self, now: Instant, from: SocketAddr) -> Vec<PunchAction> {
        let mut actions = vec![];
        let interval = self.interval;
        let once_per_interval = |times: &mut HashMap<SocketAddr, Instant>| {
            let recent = times
                .get(&from)
                .is_some_and(|at| now.duration_since(*at) < interval);
            if !recent {
                times.insert(from, now);
            }
            !recent
        };
        if once_per_interval(&mut self.last_notified) {
            actions.push(PunchAction::NotifyPlugins(from));
        }
        if once_per_interval(&mut self.last_sent) {
            actions.push(PunchAction::SendPunch(from));
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host serving behind a NAT.
    const BEHIND_NAT: NatConfig = NatConfig {
        introducer: None,
        keepalive: crate::nat::DEFAULT_KEEPALIVE,
        behind_nat: true,
    };
    /// A public host.
    const PUBLIC: NatConfig = NatConfig {
        introducer: None,
        keepalive: crate::nat::DEFAULT_KEEPALIVE,
        behind_nat: false,
    };

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn behind_nat_looks_up_every_target_once_per_interval() {
        let t0 = Instant::now();
        let mut s = PunchState::new(
            t0,
            vec!["a".into(), "b".into()],
            &BEHIND_NAT,
            DEFAULT_PUNCH_INTERVAL,
        );
        assert_eq!(
            s.poll(t0),
            vec![
                PunchAction::Lookup("a".into()),
                PunchAction::Lookup("b".into())
            ]
        );
        assert_eq!(s.poll(t0 + Duration::from_millis(999)), vec![]);
        assert_eq!(s.next_wakeup(), Some(t0 + DEFAULT_PUNCH_INTERVAL));
        assert_eq!(s.poll(t0 + Duration::from_millis(1000)).len(), 2);
    }

    #[test]
    fn a_public_host_never_starts_punching() {
        let t0 = Instant::now();
        let mut s = PunchState::new(t0, vec!["a".into()], &PUBLIC, DEFAULT_PUNCH_INTERVAL);
        assert_eq!(s.next_wakeup(), None);
        assert_eq!(s.poll(t0 + Duration::from_secs(10)), vec![]);
    }

    #[test]
    fn lookups_punch_every_peer_but_ourselves() {
        let t0 = Instant::now();
        let mut s = PunchState::new(t0, vec!["a".into()], &BEHIND_NAT, DEFAULT_PUNCH_INTERVAL);
        let actions = s.on_lookup(t0, &[addr(1), addr(2), addr(9)], &[addr(9)]);
        assert_eq!(
            actions,
            vec![
                PunchAction::SendPunch(addr(1)),
                PunchAction::SendPunch(addr(2))
            ]
        );
    }

    #[test]
    fn a_lookup_punches_at_most_the_cap_of_peers() {
        let t0 = Instant::now();
        let mut s = PunchState::new(t0, vec!["a".into()], &BEHIND_NAT, DEFAULT_PUNCH_INTERVAL);
        let lying_answer: Vec<SocketAddr> = (1..=100).map(addr).collect();
        let actions = s.on_lookup(t0, &lying_answer, &[addr(1)]);
        assert_eq!(actions.len(), MAX_PUNCHES_PER_SERVICE);
        assert_eq!(actions[0], PunchAction::SendPunch(addr(2)));
    }

    #[test]
    fn a_punch_is_reported_and_answered_at_most_once_per_interval_per_peer() {
        let t0 = Instant::now();
        let mut s = PunchState::new(t0, vec![], &PUBLIC, DEFAULT_PUNCH_INTERVAL);
        assert_eq!(
            s.on_punch(t0, addr(1)),
            vec![
                PunchAction::NotifyPlugins(addr(1)),
                PunchAction::SendPunch(addr(1))
            ]
        );
        // A burst of punches from the same peer (an introduction's
        // handshake): one event for the plugins, one answer.
        for ms in [1, 10, 500, 999] {
            assert_eq!(s.on_punch(t0 + Duration::from_millis(ms), addr(1)), vec![]);
        }
        // Another peer is answered independently.
        assert_eq!(s.on_punch(t0 + Duration::from_millis(5), addr(2)).len(), 2);
        assert_eq!(
            s.on_punch(t0 + Duration::from_millis(1000), addr(1)).len(),
            2
        );
    }

    #[test]
    fn two_hosts_punching_each_other_do_not_ping_pong() {
        // Simulate a worker behind NAT (w) and a public consumer (c) exchanging
        // datagrams with 1 ms latency for ten seconds; count punches on the wire.
        let t0 = Instant::now();
        let (w_addr, c_addr) = (addr(1), addr(2));
        let mut w = PunchState::new(
            t0,
            vec!["consumer".into()],
            &BEHIND_NAT,
            DEFAULT_PUNCH_INTERVAL,
        );
        let mut c = PunchState::new(t0, vec![], &PUBLIC, DEFAULT_PUNCH_INTERVAL);
        let mut in_flight: Vec<(Instant, SocketAddr, SocketAddr)> = vec![]; // (arrival, from, to)
        let (mut sent, mut notified_c) = (0, 0);
        let latency = Duration::from_millis(1);
        let mut now = t0;
        while now < t0 + Duration::from_secs(10) {
            let mut actions: Vec<(SocketAddr, PunchAction)> = vec![];
            for a in w.poll(now) {
                if let PunchAction::Lookup(_) = a {
                    actions.extend(
                        w.on_lookup(now, &[c_addr], &[w_addr])
                            .into_iter()
                            .map(|x| (w_addr, x)),
                    );
                }
            }
            in_flight.sort_by_key(|p| p.0);
            while in_flight.first().is_some_and(|p| p.0 <= now) {
                let (_, from, to) = in_flight.remove(0);
                let state = if to == w_addr { &mut w } else { &mut c };
                actions.extend(state.on_punch(now, from).into_iter().map(|x| (to, x)));
            }
            for (me, action) in actions {
                match action {
                    PunchAction::SendPunch(to) => {
                        sent += 1;
                        in_flight.push((now + latency, me, to));
                    }
                    PunchAction::NotifyPlugins(_) if me == c_addr => notified_c += 1,
                    _ => {}
                }
            }
            now += Duration::from_millis(1);
        }
        // Each second: the worker's punch and the consumer's answer.
        assert_eq!(notified_c, 10, "the consumer hears one punch per second");
        assert!((19..=21).contains(&sent), "{sent} punches in 10 s");
    }
}
