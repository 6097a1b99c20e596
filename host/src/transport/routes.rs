//! How datagrams to one peer leave the host: the route table.
//!
//! Most peers have no route: their datagrams leave from the host's one RPC
//! socket, straight to their address. Two kinds of path need more
//! (`docs/wire.md §5`):
//!
//! - **Birthday punching** finds a path to a peer behind a symmetric NAT (or
//!   from behind one) through one of many extra sockets: the winner is
//!   *adopted* ([`super::Endpoint::adopt`]), its datagrams are sorted like
//!   the main socket's, and everything to that peer leaves from it.
//! - **A relay** carries a session between two hosts that cannot reach each
//!   other: every uTP datagram to the peer goes to the relay in a relay frame
//!   ([`super::datagram::RelayFrame`]) with this host's session token, and
//!   frames from the relay with that token are sorted as if they came from
//!   the peer. Punches never take a relay route: they go direct, and a
//!   direct punch from a relayed peer moves its traffic to the direct path.
//!
//! The peer keeps its address either way, so a uTP connection (keyed by
//! address) does not notice when its path changes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::net::UdpSocket;

use super::datagram::RELAY_TOKEN_LEN;

/// Most peers with a route at once; more are refused ([`Routes::set`]
/// returns `false`): birthday paths and relay sessions are bounded far
/// below this by their own quotas.
pub const MAX_ROUTES: usize = 4_096;

/// How datagrams to one peer leave the host.
#[derive(Debug, Clone)]
pub enum Route {
    /// From an extra socket of this host (birthday punching's winner),
    /// whose datagrams are read and sorted like the main socket's.
    Socket(Arc<UdpSocket>),
    /// Through the relay at `relay`: each datagram in a relay frame with this
    /// host's session `token`.
    Relay {
        relay: SocketAddr,
        token: [u8; RELAY_TOKEN_LEN],
    },
}

impl Route {
    /// What kind of path the route is.
    pub fn kind(&self) -> PathKind {
        match self {
            Route::Socket(_) => PathKind::Birthday,
            Route::Relay { .. } => PathKind::Relayed,
        }
    }
}

/// What kind of path leads to a peer, for status and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// From the main socket straight to the peer (punched or not).
    Direct,
    /// From an extra socket that birthday punching opened.
    Birthday,
    /// Through a relay.
    Relayed,
}

impl PathKind {
    /// The kind's name in status and metrics: `direct`, `birthday`,
    /// `relayed`.
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Birthday => "birthday",
            PathKind::Relayed => "relayed",
        }
    }
}

/// A relay session whose frames this host accepts.
#[derive(Debug, Clone, Copy)]
struct RelayedIn {
    relay: SocketAddr,
    token: [u8; RELAY_TOKEN_LEN],
    /// When a frame of the session was last accepted.
    heard: Option<std::time::Instant>,
}

/// The route table, shared by the socket's task, the readers of adopted
/// sockets and the endpoint's handles.
#[derive(Debug, Default)]
pub(super) struct Routes {
    /// Whether any route exists: the common case (none) costs no lock.
    any: AtomicBool,
    table: Mutex<HashMap<SocketAddr, Route>>,
    /// The relay sessions whose frames are accepted, by peer: a session's
    /// relay and this host's token. Kept when the peer's traffic moves to
    /// the direct path ([`Routes::clear_relay`]), since the peer may still
    /// send through the relay until it moves too; gone with
    /// [`Routes::clear`]. At most [`MAX_ROUTES`].
    relayed_in: Mutex<HashMap<SocketAddr, RelayedIn>>,
    /// The readers of adopted sockets, aborted when the endpoint stops.
    readers: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Routes {
    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, Route>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The route to `peer`, if it has one.
    pub fn get(&self, peer: SocketAddr) -> Option<Route> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        self.lock().get(&peer).cloned()
    }

    /// Routes `peer`'s datagrams by `route` (replacing its route); `false`
    /// when [`MAX_ROUTES`] other peers have one.
    pub fn set(&self, peer: SocketAddr, route: Route) -> bool {
        let mut table = self.lock();
        if table.len() >= MAX_ROUTES && !table.contains_key(&peer) {
            return false;
        }
        if let Route::Relay { relay, token } = route {
            let mut relayed_in = self.relayed_in();
            if relayed_in.len() >= MAX_ROUTES && !relayed_in.contains_key(&peer) {
                return false;
            }
            relayed_in.insert(
                peer,
                RelayedIn {
                    relay,
                    token,
                    heard: None,
                },
            );
        }
        table.insert(peer, route);
        self.any.store(true, Ordering::Relaxed);
        true
    }

    /// Sends `peer`'s datagrams direct again; returns the route it had.
    pub fn clear(&self, peer: SocketAddr) -> Option<Route> {
        self.relayed_in().remove(&peer);
        let mut table = self.lock();
        let old = table.remove(&peer);
        self.any.store(!table.is_empty(), Ordering::Relaxed);
        old
    }

    fn relayed_in(&self) -> MutexGuard<'_, HashMap<SocketAddr, RelayedIn>> {
        self.relayed_in.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a relay frame from `relay` with `token` may carry `peer`'s
    /// datagrams (its session is this host's, sending through it or not);
    /// if so, notes that the session was heard at `now`.
    pub fn accept_relayed(
        &self,
        peer: SocketAddr,
        relay: SocketAddr,
        token: &[u8; RELAY_TOKEN_LEN],
        now: std::time::Instant,
    ) -> bool {
        match self.relayed_in().get_mut(&peer) {
            Some(s) if s.relay == relay && &s.token == token => {
                s.heard = Some(now);
                true
            }
            _ => false,
        }
    }

    /// The peers whose relay sessions carried a frame since `since`.
    pub fn relayed_heard_since(&self, since: std::time::Instant) -> Vec<SocketAddr> {
        self.relayed_in()
            .iter()
            .filter(|(_, s)| s.heard.is_some_and(|at| at >= since))
            .map(|(peer, _)| *peer)
            .collect()
    }

    /// Clears `peer`'s route if it is a relay route (its frames are still
    /// accepted until [`clear`](Self::clear)); returns whether it was.
    pub fn clear_relay(&self, peer: SocketAddr) -> bool {
        if !self.any.load(Ordering::Relaxed) {
            return false;
        }
        let mut table = self.lock();
        if !matches!(table.get(&peer), Some(Route::Relay { .. })) {
            return false;
        }
        table.remove(&peer);
        self.any.store(!table.is_empty(), Ordering::Relaxed);
        true
    }

    /// Every peer with a route, and its kind of path.
    pub fn list(&self) -> Vec<(SocketAddr, PathKind)> {
        let mut paths: Vec<_> = self.lock().iter().map(|(a, r)| (*a, r.kind())).collect();
        paths.sort_by_key(|(a, _)| *a);
        paths
    }

    /// Whether a route still sends from `socket`.
    pub fn uses_socket(&self, socket: &Arc<UdpSocket>) -> bool {
        self.lock()
            .values()
            .any(|r| matches!(r, Route::Socket(s) if Arc::ptr_eq(s, socket)))
    }

    /// Keeps `reader` to abort when the endpoint stops (finished readers
    /// are forgotten on the way).
    pub fn add_reader(&self, reader: tokio::task::AbortHandle) {
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        readers.retain(|r| !r.is_finished());
        readers.push(reader);
    }

    /// Stops every reader (the endpoint is going away).
    pub fn abort_readers(&self) {
        let readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        readers.iter().for_each(|r| r.abort());
    }
}
