//! The client's memory of which peers failed: candidates that failed recently
//! are tried last, never dropped, so a glitch towards the only peer of a
//! service costs one retry instead of an outage.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a failure pushes a peer to the back of the line.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(30);
/// Most failed peers remembered; the oldest failure is forgotten first.
const MAX_REMEMBERED: usize = 4096;

/// Peers that failed recently, with when they failed.
#[derive(Debug, Default)]
pub struct PeerHealth {
    failed: Mutex<HashMap<SocketAddr, Instant>>,
}

impl PeerHealth {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Instant>> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers that `peer` failed (for [`FAILURE_MEMORY`]).
    pub fn failed(&self, peer: SocketAddr) {
        tracing::debug!(%peer, "peer failed; trying it last for {FAILURE_MEMORY:?}");
        let mut failed = self.lock();
        if failed.len() >= MAX_REMEMBERED && !failed.contains_key(&peer) {
            failed.retain(|_, at| at.elapsed() < FAILURE_MEMORY);
            crate::discovery::evict_oldest(&mut failed, MAX_REMEMBERED, |at| *at);
        }
        failed.insert(peer, Instant::now());
    }

    /// Forgets a failure: the peer answered.
    pub fn answered(&self, peer: SocketAddr) {
        self.lock().remove(&peer);
    }

    /// Reorders `peers` in place: those without a recent failure first (in
    /// their given order), then the failed ones, least recently failed first.
    pub fn order(&self, peers: &mut [SocketAddr]) {
        let failed = self.lock();
        let failed_at = |p: &SocketAddr| {
            failed
                .get(p)
                .filter(|at| at.elapsed() < FAILURE_MEMORY)
                .copied()
        };
        // `None` (healthy) sorts before any `Some(instant)`; the sort is stable.
        peers.sort_by_key(failed_at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn failed_peers_go_last_and_are_never_dropped() {
        let health = PeerHealth::default();
        health.failed(addr(1));
        health.failed(addr(3));
        let mut peers = vec![addr(1), addr(2), addr(3), addr(4)];
        health.order(&mut peers);
        assert_eq!(peers, vec![addr(2), addr(4), addr(1), addr(3)]);
        health.answered(addr(1));
        health.order(&mut peers);
        assert_eq!(peers, vec![addr(2), addr(4), addr(1), addr(3)]);
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
}
