//! The client's memory of how peers did: the order in which a request tries
//! the peers a lookup returned.
//!
//! Three classes, in this order: peers that answered recently (the best
//! bet, and an open connection to them costs nothing), peers never tried,
//! and peers that failed recently. A failed peer is tried last, never
//! dropped, so a glitch towards the only peer of a service costs one retry
//! instead of an outage. Within a class the given order is kept: the caller
//! first orders the directory's answer with [`spread_by_ip`], which keeps
//! one address from taking every early slot and spreads load over machines.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a failure pushes a peer to the back of the line.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(30);
/// How long an answer puts a peer at the front of the line: a few
/// re-announce intervals ([`crate::discovery::REANNOUNCE_INTERVAL`]).
pub const ANSWER_MEMORY: Duration = Duration::from_secs(300);
/// Most peers remembered; the oldest memory is forgotten first.
const MAX_REMEMBERED: usize = 4096;

/// What was last seen of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Answered,
    Failed,
}

/// Peers that answered or failed recently, with when.
#[derive(Debug, Default)]
pub struct PeerHealth {
    seen: Mutex<HashMap<SocketAddr, (Seen, Instant)>>,
}

impl PeerHealth {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, (Seen, Instant)>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, peer: SocketAddr, seen: Seen) {
        let mut memory = self.lock();
        if memory.len() >= MAX_REMEMBERED && !memory.contains_key(&peer) {
            memory.retain(|_, (seen, at)| at.elapsed() < memory_of(*seen));
            crate::units::evict_oldest(&mut memory, MAX_REMEMBERED, |(_, at)| *at);
        }
        memory.insert(peer, (seen, Instant::now()));
    }

    /// Remembers that `peer` failed (for [`FAILURE_MEMORY`]).
    pub fn failed(&self, peer: SocketAddr) {
        tracing::debug!(%peer, "peer failed; trying it last for {FAILURE_MEMORY:?}");
        self.remember(peer, Seen::Failed);
    }

    /// Remembers that `peer` answered (for [`ANSWER_MEMORY`]); forgets a
    /// failure.
    pub fn answered(&self, peer: SocketAddr) {
        self.remember(peer, Seen::Answered);
    }

    /// Whether nothing is remembered of `peer` (never tried, or long ago).
    pub fn unseen(&self, peer: SocketAddr) -> bool {
        self.lock()
            .get(&peer)
            .is_none_or(|(seen, at)| at.elapsed() >= memory_of(*seen))
    }

    /// Reorders `peers` in place, keeping the given order within a class:
    /// those that answered recently, then those not seen recently, then those
    /// that failed recently, least recently failed first. Returns how many
    /// answered recently (they lead).
    pub fn order(&self, peers: &mut [SocketAddr]) -> usize {
        let memory = self.lock();
        let class = |p: &SocketAddr| match memory.get(p) {
            Some((seen, at)) if at.elapsed() < memory_of(*seen) => match seen {
                Seen::Answered => (0, None),
                Seen::Failed => (2, Some(*at)),
            },
            _ => (1, None),
        };
        // The sort is stable.
        peers.sort_by_key(class);
        peers.iter().take_while(|p| class(p).0 == 0).count()
    }
}

fn memory_of(seen: Seen) -> Duration {
    match seen {
        Seen::Answered => ANSWER_MEMORY,
        Seen::Failed => FAILURE_MEMORY,
    }
}

/// Reorders `peers` so that the IP addresses take turns, in an order that
/// `shuffle` picks: the first peer of each IP, then the second of each, and
/// so on; within one IP the given order is kept.
///
/// One machine that announces hundreds of addresses (a host that restarted
/// on many ports, or someone planting dead entries) then takes at most
/// every other early slot, and a live host on another machine is among the
/// first tries. Within an IP, the directory's order stands: our DHT nodes
/// answer newest first, so a restarted host's successor comes before its
/// dead predecessors. Shuffling the IPs spreads one-shot callers' load over
/// machines.
pub fn spread_by_ip(peers: &mut Vec<SocketAddr>, shuffle: impl FnOnce(&mut [IpAddr])) {
    let mut by_ip: Vec<(IpAddr, std::collections::VecDeque<SocketAddr>)> = Vec::new();
    for peer in peers.drain(..) {
        match by_ip.iter_mut().find(|(ip, _)| *ip == peer.ip()) {
            Some((_, queue)) => queue.push_back(peer),
            None => by_ip.push((peer.ip(), [peer].into())),
        }
    }
    let mut order: Vec<IpAddr> = by_ip.iter().map(|(ip, _)| *ip).collect();
    shuffle(&mut order);
    by_ip.sort_by_key(|(ip, _)| order.iter().position(|o| o == ip));
    while !by_ip.is_empty() {
        by_ip.retain_mut(|(_, queue)| match queue.pop_front() {
            Some(peer) => {
                peers.push(peer);
                true
            }
            None => false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn answered_peers_go_first_failed_ones_last_and_none_is_dropped() {
        let health = PeerHealth::default();
        health.failed(addr(1));
        health.failed(addr(3));
        let mut peers = vec![addr(1), addr(2), addr(3), addr(4)];
        health.order(&mut peers);
        assert_eq!(peers, vec![addr(2), addr(4), addr(1), addr(3)]);
        health.answered(addr(1));
        health.order(&mut peers);
        assert_eq!(peers, vec![addr(1), addr(2), addr(4), addr(3)]);
        health.answered(addr(4));
        let mut peers = vec![addr(3), addr(2), addr(4), addr(1)];
        health.order(&mut peers);
        assert_eq!(peers, vec![addr(4), addr(1), addr(2), addr(3)]);
        let mut only = vec![addr(3)];
        health.order(&mut only);
        assert_eq!(only, vec![addr(3)], "the only peer is still tried");
    }

    #[test]
    fn the_memory_is_bounded() {
        let health = PeerHealth::default();
        for port in 0..(MAX_REMEMBERED as u16 + 10) {
            health.failed(addr(port));
        }
        assert!(health.lock().len() <= MAX_REMEMBERED);
    }

    #[test]
    fn addresses_take_turns_in_the_shuffled_order_each_in_its_own() {
        let on = |ip: u8, port: u16| SocketAddr::from(([127, 0, 0, ip], port));
        let given = vec![
            on(66, 1),
            on(66, 2),
            on(66, 3),
            on(1, 9),
            on(2, 7),
            on(1, 8),
        ];
        let mut unshuffled = given.clone();
        spread_by_ip(&mut unshuffled, |_| {});
        assert_eq!(
            unshuffled,
            vec![
                on(66, 1),
                on(1, 9),
                on(2, 7),
                on(66, 2),
                on(1, 8),
                on(66, 3)
            ]
        );
        let mut reversed = given;
        spread_by_ip(&mut reversed, |ips| ips.reverse());
        assert_eq!(
            reversed,
            vec![
                on(2, 7),
                on(1, 9),
                on(66, 1),
                on(1, 8),
                on(66, 2),
                on(66, 3)
            ]
        );
        let mut none: Vec<SocketAddr> = vec![];
        spread_by_ip(&mut none, |_| {});
        assert!(none.is_empty());
    }
}
