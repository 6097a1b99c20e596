//! Birthday punching (`docs/wire.md §5.6`): how a host behind a symmetric
//! NAT and one behind a port-restricted NAT meet, as a sans-IO state machine
//! that [`super::host::HostIntroductions`] runs for one attempt at a time.
//!
//! A symmetric NAT gives each destination a new public port, in the lab (and
//! on many carrier NATs) a random one, and admits only the destination's
//! exact address there; a port-restricted NAT admits only the exact address
//! and port its host sent to. So neither side can know where to punch. The
//! birthday paradox helps: the side behind the symmetric NAT
//! ([`BirthdayRole::Sockets`]) opens [`SOCKETS`] extra sockets and punches
//! the peer's one address from each (one new random mapping each), and the
//! side behind the port-restricted NAT ([`BirthdayRole::Probe`]) punches
//! the peer's IP at distinct random ports. A probe that hits one of the
//! mappings is admitted by both NATs (the port-restricted side sent to that
//! port, the mapping was made toward the prober's address): that socket
//! hears the prober, answers, and is the path from then on.
//!
//! # The numbers
//!
//! With `m` = [`SOCKETS`] = 256 mappings among the 64,512 ports 1024–65535,
//! each probe hits with p = 256 / 64,512 ≈ 1/252, so `n` distinct probes
//! all miss with probability (1 − 1/252)^n: 1/e² ≈ 0.14 after 500, 0.0026
//! after [`MAX_PROBES`] = 1,500. At [`PROBES_PER_SECOND`] = 500 the median
//! attempt meets after ≈ 175 probes (0.35 s) and 99.7 % meet within 3 s;
//! `nat-lab.md` measured 10/10 at 50 probes/s but a mean of 4.7 s, too slow.
//!
//! Per attempt, at most:
//! - the sockets side: [`SOCKETS`] sockets for up to [`ATTEMPT_TIME`] (4 s),
//!   each sending one punch per [`SOCKET_ROUND`] (1 s): 4 × 256 = 1,024
//!   punches, 30 bytes each on the wire (2 bytes of UDP payload), ≈ 31 KB;
//! - the probe side: [`MAX_PROBES`] = 1,500 punches at up to 500 per second
//!   (3 s), ≈ 45 KB on the wire, all to the one IP the introducer named.
//!
//! A host takes part in one attempt at a time and in at most
//! [`ATTEMPTS_PER_10S`] per 10 s (after a burst of [`ATTEMPT_BURST`]),
//! whoever asks (its own calls or punch requests), and its introducer asks
//! no more of it: a forged or repeated introduction cannot make it open
//! sockets or spray probes at will.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use super::kind::BirthdayRole;

/// What an [`Attempt`] asks of its host; the host's state machine passes
/// each on as its own action (`super::host::Action`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The attempt toward `peer` started, this host in `role`.
    Started {
        peer: SocketAddr,
        role: BirthdayRole,
    },
    /// Open `count` extra UDP sockets for the attempt toward `peer`.
    OpenSockets { peer: SocketAddr, count: usize },
    /// Send one punch to this address from every extra socket.
    PunchFromSockets(SocketAddr),
    /// Send one punch to this address from the RPC socket.
    Punch(SocketAddr),
    /// Extra socket `index` met `peer`: adopt it, close the others.
    AdoptSocket { index: usize, peer: SocketAddr },
    /// Close every extra socket: the attempt gave up.
    CloseSockets,
    /// The attempt met its peer or gave up.
    Ended(Report),
}
/// Extra sockets the side behind the symmetric NAT opens per attempt.
pub const SOCKETS: usize = 256;
/// Each extra socket punches the peer this often while the attempt lasts:
/// the first punches open the mappings, the later ones keep them open (and
/// make up for lost ones).
pub const SOCKET_ROUND: Duration = Duration::from_secs(1);
/// Probes (punches to random ports of the peer's IP) per second.
pub const PROBES_PER_SECOND: u32 = 500;
/// Most probes per attempt: three seconds' worth (see the module doc for
/// the odds).
pub const MAX_PROBES: usize = 1_500;
/// Probes leave in small batches this often (5 per 10 ms at 500/s).
pub const PROBE_TICK: Duration = Duration::from_millis(10);
/// How long an attempt lasts before it gives up and closes its sockets.
pub const ATTEMPT_TIME: Duration = Duration::from_secs(4);
/// Birthday attempts a host takes part in, and a registered host is asked
/// to take part in by its introducer, per 10 s on average...
pub const ATTEMPTS_PER_10S: u32 = 3;
/// ... and in a quick series (a call, then a plugin's request): a few
/// attempts cost a few seconds of sockets or probes; the host still takes
/// part in one at a time.
pub const ATTEMPT_BURST: u32 = 3;
/// Rate limits count attempts in tenths: a bucket refilling
/// [`ATTEMPTS_PER_10S`] tokens per second and holding [`ATTEMPT_BURST`]
/// attempts' worth, of which an attempt takes this many.
pub const ATTEMPT_COST: u32 = 10;
/// The token bucket that enforces [`ATTEMPTS_PER_10S`] and
/// [`ATTEMPT_BURST`] (in tenths of an attempt, [`ATTEMPT_COST`]).
pub fn attempt_budget(now: Instant) -> crate::units::TokenBucket {
    crate::units::TokenBucket::new(now, ATTEMPTS_PER_10S, ATTEMPT_BURST * ATTEMPT_COST)
}
/// The lowest port probed: below it lie the privileged ports, which NATs
/// do not hand out.
pub const FIRST_PORT: u16 = 1024;

const PROBES_PER_TICK: usize = (PROBES_PER_SECOND as u128 * PROBE_TICK.as_millis() / 1000) as usize;

/// How an attempt ended, for the host's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The peer (as the introducer named it).
    pub peer: SocketAddr,
    pub role: BirthdayRole,
    /// Where the peer's punch came from when it met, `None` if it gave up.
    pub met: Option<SocketAddr>,
    /// From the start to meeting or giving up.
    pub took: Duration,
    /// Punches sent: from each socket per round, or probes.
    pub punches: usize,
}

/// One birthday attempt toward one peer.
#[derive(Debug)]
pub(super) struct Attempt {
    peer: SocketAddr,
    role: BirthdayRole,
    started: Instant,
    next: Instant,
    punches: usize,
    /// The ports probed so far (probe side; at most [`MAX_PROBES`]).
    probed: HashSet<u16>,
    rng: rand::rngs::StdRng,
    ended: bool,
}

impl Attempt {
    /// Starts an attempt toward `peer` in `role`, its probes' ports drawn
    /// from `seed`; returns what to do now.
    pub fn with_seed(
        now: Instant,
        peer: SocketAddr,
        role: BirthdayRole,
        seed: u64,
    ) -> (Self, Vec<Step>) {
        let mut attempt = Attempt {
            peer,
            role,
            started: now,
            next: now,
            punches: 0,
            probed: HashSet::new(),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            ended: false,
        };
        let mut out = vec![Step::Started { peer, role }];
        if role == BirthdayRole::Sockets {
            out.push(Step::OpenSockets {
                peer,
                count: SOCKETS,
            });
        }
        out.extend(attempt.poll(now));
        (attempt, out)
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub fn role(&self) -> BirthdayRole {
        self.role
    }

    /// Whether it met or gave up.
    pub fn ended(&self) -> bool {
        self.ended
    }

    fn until(&self) -> Instant {
        self.started + ATTEMPT_TIME
    }

    /// When [`poll`](Self::poll) has work next.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let probing = self.role == BirthdayRole::Sockets || self.probed.len() < MAX_PROBES;
        match self.ended {
            true => None,
            false if probing => Some(self.next.min(self.until())),
            false => Some(self.until()),
        }
    }

    /// Punches what is due; gives up at the attempt's end.
    pub fn poll(&mut self, now: Instant) -> Vec<Step> {
        if self.ended {
            return vec![];
        }
        if now >= self.until() {
            return self.end(now, None);
        }
        if now < self.next {
            return vec![];
        }
        match self.role {
            BirthdayRole::Sockets => {
                self.next = now + SOCKET_ROUND;
                self.punches += SOCKETS;
                vec![Step::PunchFromSockets(self.peer)]
            }
            BirthdayRole::Probe => {
                // A late wakeup does not make a burst: the rate holds.
                self.next = now + PROBE_TICK;
                let batch = PROBES_PER_TICK.min(MAX_PROBES - self.probed.len());
                (0..batch)
                    .map(|_| {
                        let port = self.fresh_port();
                        self.punches += 1;
                        Step::Punch(SocketAddr::new(self.peer.ip(), port))
                    })
                    .collect()
            }
        }
    }

    /// A port of 1024–65535 not probed yet in this attempt.
    fn fresh_port(&mut self) -> u16 {
        loop {
            let port = self.rng.random_range(FIRST_PORT..=u16::MAX);
            if self.probed.insert(port) {
                return port;
            }
        }
    }

    /// Extra socket `index` received a punch from `from`: the peer's exact
    /// address makes it the winner.
    pub fn on_socket_punch(&mut self, now: Instant, index: usize, from: SocketAddr) -> Vec<Step> {
        if self.ended || self.role != BirthdayRole::Sockets || from != self.peer {
            return vec![];
        }
        let mut out = vec![
            Step::AdoptSocket {
                index,
                peer: self.peer,
            },
            // From the adopted socket (its route) at once: the prober is
            // waiting for it.
            Step::Punch(self.peer),
        ];
        out.extend(self.end(now, Some(from)));
        out
    }

    /// The main socket received a punch from `from`: on the probe side, one
    /// from the peer's IP (any port: the mapping one of its sockets got)
    /// ends the attempt. Following the peer to that port is the
    /// introduction handshake's business (a symmetric peer "moves"). On the
    /// sockets side the main socket is one more mapping the peer may probe:
    /// a punch from the peer's exact address there ends the attempt too,
    /// with the main socket as the path.
    pub fn on_punch(&mut self, now: Instant, from: SocketAddr) -> Vec<Step> {
        let met = match self.role {
            BirthdayRole::Probe => from.ip() == self.peer.ip(),
            BirthdayRole::Sockets => from == self.peer,
        };
        if self.ended || !met {
            return vec![];
        }
        let mut out = vec![];
        if self.role == BirthdayRole::Sockets {
            out.push(Step::CloseSockets);
        }
        out.extend(self.end(now, Some(from)));
        out
    }

    fn end(&mut self, now: Instant, met: Option<SocketAddr>) -> Vec<Step> {
        self.ended = true;
        let report = Report {
            peer: self.peer,
            role: self.role,
            met,
            took: now.duration_since(self.started),
            punches: self.punches,
        };
        let mut out = vec![];
        if self.role == BirthdayRole::Sockets && met.is_none() {
            out.push(Step::CloseSockets);
        }
        out.push(Step::Ended(report));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "198.51.100.7:40000".parse().unwrap()
    }

    /// Polls `attempt` at each wakeup until it has none; returns the
    /// actions with their times.
    fn run(mut attempt: Attempt, first: Vec<Step>, t0: Instant) -> Vec<(Duration, Step)> {
        let mut all: Vec<_> = first.into_iter().map(|a| (Duration::ZERO, a)).collect();
        while let Some(at) = attempt.next_wakeup() {
            let actions = attempt.poll(at);
            all.extend(actions.into_iter().map(|a| (at - t0, a)));
        }
        all
    }

    #[test]
    fn the_probe_side_sends_distinct_ports_at_its_rate_and_no_more() {
        let t0 = Instant::now();
        let (attempt, first) = Attempt::with_seed(t0, peer(), BirthdayRole::Probe, 7);
        let all = run(attempt, first, t0);
        let probes: Vec<(Duration, SocketAddr)> = all
            .iter()
            .filter_map(|(t, a)| match a {
                Step::Punch(to) => Some((*t, *to)),
                _ => None,
            })
            .collect();
        assert_eq!(probes.len(), MAX_PROBES);
        let ports: HashSet<u16> = probes.iter().map(|(_, to)| to.port()).collect();
        assert_eq!(ports.len(), MAX_PROBES, "distinct ports");
        assert!(probes.iter().all(|(_, to)| to.ip() == peer().ip()));
        assert!(ports.iter().all(|p| *p >= FIRST_PORT));
        // Never more than the rate allows in any second.
        for (t, _) in &probes {
            let in_second = probes
                .iter()
                .filter(|(u, _)| *u >= *t && *u < *t + Duration::from_secs(1))
                .count();
            assert!(in_second <= PROBES_PER_SECOND as usize, "{in_second}");
        }
        // The last probe leaves within 3 s; the attempt gives up at its end.
        assert!(probes.last().unwrap().0 < Duration::from_secs(3));
        let Some((at, Step::Ended(report))) = all.last() else {
            panic!("{:?}", all.last());
        };
        assert_eq!(*at, ATTEMPT_TIME);
        assert_eq!(report.met, None);
        assert_eq!(report.punches, MAX_PROBES);
    }

    #[test]
    fn the_sockets_side_punches_each_round_and_closes_them_when_it_gives_up() {
        let t0 = Instant::now();
        let (attempt, first) = Attempt::with_seed(t0, peer(), BirthdayRole::Sockets, 1);
        assert_eq!(
            first[..3],
            [
                Step::Started {
                    peer: peer(),
                    role: BirthdayRole::Sockets
                },
                Step::OpenSockets {
                    peer: peer(),
                    count: SOCKETS
                },
                Step::PunchFromSockets(peer()),
            ]
        );
        let all = run(attempt, first, t0);
        let rounds: Vec<Duration> = all
            .iter()
            .filter(|(_, a)| matches!(a, Step::PunchFromSockets(_)))
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(rounds, (0..4).map(|s| SOCKET_ROUND * s).collect::<Vec<_>>());
        let ends: Vec<&Step> = all
            .iter()
            .filter(|(t, _)| *t == ATTEMPT_TIME)
            .map(|(_, a)| a)
            .collect();
        assert!(matches!(ends[..], [Step::CloseSockets, Step::Ended(_)]));
    }

    #[test]
    fn only_the_peers_exact_address_wins_a_socket() {
        let t0 = Instant::now();
        let (mut attempt, _) = Attempt::with_seed(t0, peer(), BirthdayRole::Sockets, 1);
        let later = t0 + Duration::from_millis(300);
        let stranger: SocketAddr = "198.51.100.7:40001".parse().unwrap();
        assert!(attempt.on_socket_punch(later, 3, stranger).is_empty());
        assert!(attempt.on_punch(later, stranger).is_empty());
        let out = attempt.on_socket_punch(later, 3, peer());
        assert_eq!(
            out[..2],
            [
                Step::AdoptSocket {
                    index: 3,
                    peer: peer()
                },
                Step::Punch(peer())
            ]
        );
        let Some(Step::Ended(report)) = out.last() else {
            panic!("{out:?}");
        };
        assert_eq!(report.took, Duration::from_millis(300));
        assert_eq!(report.met, Some(peer()));
        assert!(attempt.ended() && attempt.next_wakeup().is_none());
        assert!(attempt.on_socket_punch(later, 4, peer()).is_empty());
    }

    #[test]
    fn the_probe_side_stops_at_a_punch_from_the_peers_ip_only() {
        let t0 = Instant::now();
        let (mut attempt, _) = Attempt::with_seed(t0, peer(), BirthdayRole::Probe, 1);
        let later = t0 + Duration::from_millis(120);
        let other_ip: SocketAddr = "198.51.100.8:40000".parse().unwrap();
        assert!(attempt.on_punch(later, other_ip).is_empty());
        let mapping: SocketAddr = "198.51.100.7:51234".parse().unwrap();
        let out = attempt.on_punch(later, mapping);
        assert!(matches!(&out[..], [Step::Ended(r)] if r.met == Some(mapping)));
        assert!(attempt.poll(later + PROBE_TICK).is_empty());
    }
}
