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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::kind::{direct_path_possible, NatKind};
use super::wire::{Message, Outcome};

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
    /// An introducer that knows nobody yet.
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
            self.next_sweep = Some(now + SWEEP_INTERVAL);
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

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    const INTRODUCER: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10));

    #[test]
    fn a_flood_of_registrations_is_capped() {
        let mut introducer = Introducer::new();
        let now = Instant::now();
        for i in 0..MAX_REGISTRATIONS + 10 {
            let from = SocketAddr::new(ip(10, (i >> 16) as u8, (i >> 8) as u8, i as u8), 9);
            let message = Message::Register {
                id: 1,
                port: 9,
                nat: NatKind::Open,
            };
            introducer.on_message(now, Port::Main, from, message);
        }
        assert_eq!(introducer.registered(), MAX_REGISTRATIONS);
        // They expire, and make room.
        let later = now + REGISTRATION_TTL + Duration::from_secs(1);
        let probe = Message::Probe { id: 2 };
        introducer.on_message(later, Port::Main, SocketAddr::new(INTRODUCER, 1), probe);
        assert_eq!(introducer.registered(), 0);
    }
}
