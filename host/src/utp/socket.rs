//! Every uTP connection of one UDP socket, sans-IO: received datagrams are
//! routed by (remote address, connection id) to their [`Connection`], SYNs
//! open new ones (within bounds), and packets for no connection are
//! answered with a RESET. The driver feeds it datagrams and the time and
//! sends what [`Socket::poll_transmit`] hands back.
//!
//! # Bounds
//!
//! Incoming and outgoing connections have separate budgets, so junk from
//! the network can never take the slots this host's own calls need:
//! [`MAX_INCOMING_CONNECTIONS`] and [`MAX_OUTGOING_CONNECTIONS`] in total,
//! [`MAX_CONNECTIONS_PER_IP`] with one remote IP address in each
//! direction. A full incoming budget makes room by dropping the oldest
//! unverified (half-open) connection, or else one silent for
//! [`EVICTABLE_SILENCE`]. An unverified connection sends no more than it
//! received and is gone after [`super::connection::HANDSHAKE_TIMEOUT`]
//! (see [`super::connection`]).
//!
//! A punch costs its sender 2 bytes and makes a host call back (a plugin's
//! `on-punch` may connect to the puncher). An address that punched us and
//! has not yet answered anything ([`note_punch`](Socket::note_punch)) gets
//! at most [`PUNCHER_SYN_BUDGET`] SYNs until it answers, however many
//! connects are made to it; it is forgotten after [`PUNCHER_MEMORY`].
//!
//! Applications name a connection by its [`ConnectionHandle`]. A handle
//! stays valid until the application [releases](Socket::release) it; the
//! connection stops receiving (is unrouted) when it is done, and its memory
//! goes when both have happened.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::connection::{Connection, ConnectionError, RecvError, SendError, State};
use super::packet::{Header, Packet, PacketType};

/// Connections peers opened, at most, on one socket (open, half-open or
/// lingering).
pub const MAX_INCOMING_CONNECTIONS: usize = 3072;
/// Connections this host opened, at most, on one socket: a budget of their
/// own, which incoming connections cannot use up.
pub const MAX_OUTGOING_CONNECTIONS: usize = 1024;
/// Connections at most on one socket, both directions.
pub const MAX_CONNECTIONS: usize = MAX_INCOMING_CONNECTIONS + MAX_OUTGOING_CONNECTIONS;
/// Connections at most with one remote IP address in each direction (a
/// NAT may hide many hosts behind one; Node opens at most 3 per peer,
/// docs/wire.md §3).
pub const MAX_CONNECTIONS_PER_IP: usize = 256;
/// SYNs at most toward an address that punched us and has not answered
/// anything yet, over all connects to it: one reply burst, not a SYN every
/// [`super::connection::SYN_RETRY`] until a caller's deadline.
pub const PUNCHER_SYN_BUDGET: u32 = 2;
/// Addresses that punched us remembered at most (the oldest is forgotten
/// first).
pub const MAX_PUNCHERS: usize = 4096;
/// How long a punch from an address that never answered limits our SYNs to
/// it; a later punch then grants a new [`PUNCHER_SYN_BUDGET`].
pub const PUNCHER_MEMORY: Duration = Duration::from_secs(120);
/// Accepted connections the application has not taken yet; further SYNs
/// are refused with a RESET.
pub const ACCEPT_BACKLOG: usize = 256;
/// RESETs waiting to be sent; more are not sent.
pub const MAX_PENDING_RESETS: usize = 256;
/// A connection that heard nothing for this long may be dropped to make
/// room for a new one: a live peer sends at least every 29 s (libutp's
/// keep-alive, [`super::connection::KEEPALIVE`], and ours).
pub const EVICTABLE_SILENCE: Duration = Duration::from_secs(30);

/// Names one connection of a [`Socket`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionHandle(u64);

/// One datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to.
    pub destination: SocketAddr,
    /// The uTP packet.
    pub contents: Vec<u8>,
}

/// Why [`Socket::connect`] opened nothing (or a SYN was refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectLimit {
    /// The direction's budget ([`MAX_OUTGOING_CONNECTIONS`] or
    /// [`MAX_INCOMING_CONNECTIONS`]) is used up.
    #[error("too many uTP connections open ({MAX_OUTGOING_CONNECTIONS} outgoing, {MAX_INCOMING_CONNECTIONS} incoming at most)")]
    Total,
    /// [`MAX_CONNECTIONS_PER_IP`] are open with that address.
    #[error("too many uTP connections with this address ({MAX_CONNECTIONS_PER_IP})")]
    PerAddress,
}

/// Counters of what the socket saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SocketStats {
    /// Datagrams that did not decode as uTP.
    pub malformed: u64,
    /// Packets for no connection (answered with a RESET unless a RESET).
    pub unknown: u64,
    /// SYNs refused by a bound.
    pub refused: u64,
    /// Half-open or long-silent connections closed to make room.
    pub evicted: u64,
    /// Connections this side began to open ([`Socket::connect`]).
    pub connected: u64,
    /// Connections peers opened (a SYN admitted to the accept queue).
    pub accepted: u64,
    /// Connects failed at once because the kernel reported the peer
    /// unreachable (ICMP).
    pub unreachable: u64,
    /// Connects to an address that punched us that sent no SYN: its
    /// [`PUNCHER_SYN_BUDGET`] was spent.
    pub syns_withheld: u64,
    /// Incoming connections dropped because the peer never acknowledged
    /// our STATE ([`super::connection::HANDSHAKE_TIMEOUT`]).
    pub unverified: u64,
}

/// One connection and the socket's book-keeping about it.
#[derive(Debug)]
struct Slot {
    connection: Connection,
    remote: SocketAddr,
    /// In the routing table (and counted against the bounds).
    routed: bool,
    /// The peer opened it (counted against the incoming budget).
    incoming: bool,
    /// The application let go of its handle.
    released: bool,
    /// Waiting in the accept queue.
    in_backlog: bool,
    /// The instant it is filed under in the timer set.
    timer: Option<Instant>,
    /// In the transmit queue.
    queued: bool,
    /// In the woken list.
    woken: bool,
    opened: Instant,
}

/// The uTP side of one UDP socket; see the module documentation.
#[derive(Debug)]
pub struct Socket {
    epoch: Instant,
    rng: StdRng,
    next_handle: u64,
    slots: HashMap<ConnectionHandle, Slot>,
    /// (remote, our receive id) → connection.
    routes: HashMap<(SocketAddr, u16), ConnectionHandle>,
    /// Routed connections per (remote IP, incoming).
    per_ip: HashMap<(IpAddr, bool), usize>,
    /// Routed connections: [outgoing, incoming].
    per_direction: [usize; 2],
    /// Addresses that punched us and have not answered since: SYNs they
    /// may still get, and when the entry goes.
    punchers: HashMap<SocketAddr, (u32, Instant)>,
    /// `punchers` in the order they came, oldest first (with the instant,
    /// so a re-added address is not dropped by its old entry).
    puncher_order: VecDeque<(Instant, SocketAddr)>,
    backlog: VecDeque<ConnectionHandle>,
    timers: BTreeSet<(Instant, ConnectionHandle)>,
    /// Connections that may have something to send, served in turn.
    transmit_queue: VecDeque<ConnectionHandle>,
    resets: VecDeque<Transmit>,
    /// Connections whose application side may have something new to see.
    woken: Vec<ConnectionHandle>,
    stats: SocketStats,
    scratch: Vec<u8>,
}

impl Socket {
    /// A socket whose clock starts at `now`; `seed` seeds the connection
    /// ids and initial sequence numbers (any value; tests fix it).
    pub fn new(now: Instant, seed: u64) -> Self {
        Socket {
            epoch: now,
            rng: StdRng::seed_from_u64(seed),
            next_handle: 0,
            slots: HashMap::new(),
            routes: HashMap::new(),
            per_ip: HashMap::new(),
            per_direction: [0; 2],
            punchers: HashMap::new(),
            puncher_order: VecDeque::new(),
            backlog: VecDeque::new(),
            timers: BTreeSet::new(),
            transmit_queue: VecDeque::new(),
            resets: VecDeque::new(),
            woken: Vec::new(),
            stats: SocketStats::default(),
            scratch: Vec::new(),
        }
    }

    /// What the socket saw so far.
    pub fn stats(&self) -> SocketStats {
        self.stats
    }

    /// Connections routed now (open, connecting or lingering).
    pub fn open_connections(&self) -> usize {
        self.routes.len()
    }

    /// The remote addresses of the open connections, each once.
    pub fn remotes(&self) -> Vec<SocketAddr> {
        let mut remotes: Vec<SocketAddr> = self.routes.keys().map(|(addr, _)| *addr).collect();
        remotes.sort();
        remotes.dedup();
        remotes
    }

    /// Connections held in memory, including closed ones whose handle the
    /// application still holds.
    pub fn held_connections(&self) -> usize {
        self.slots.len()
    }

    // ---- The application's side. ----

    /// Opens a connection to `remote`: the SYN leaves at the next
    /// [`poll_transmit`](Self::poll_transmit) and again every
    /// [`super::connection::SYN_RETRY`] until the handshake completes or the
    /// application [releases](Self::release) the handle.
    pub fn connect(
        &mut self,
        now: Instant,
        remote: SocketAddr,
    ) -> Result<ConnectionHandle, ConnectLimit> {
        self.check_limits(remote, false)?;
        // A receive id no connection with `remote` uses (the responder
        // side of an incoming SYN uses the SYN's id + 1).
        let recv_id = loop {
            let id: u16 = self.rng.random();
            if !self.routes.contains_key(&(remote, id)) {
                break id;
            }
        };
        let syn_seq = self.rng.random();
        let mut connection = Connection::connect(now, self.epoch, recv_id, syn_seq);
        if let Some((left, _)) = self.punchers.get_mut(&remote) {
            // The whole budget goes to this attempt: a parallel or later
            // one sends nothing until the address answers.
            if *left == 0 {
                self.stats.syns_withheld += 1;
            }
            connection.limit_syns(*left);
            *left = 0;
        }
        let handle = self.insert(now, remote, connection, false, false);
        self.stats.connected += 1;
        tracing::debug!(%remote, id = recv_id, ?handle, "uTP: connecting");
        Ok(handle)
    }

    /// The kernel reported `peer` unreachable (an ICMP port or host
    /// unreachable for a datagram sent there): connections to it still
    /// waiting for the answer to their SYN fail at once with
    /// [`ConnectionError::Unreachable`], so a caller moves on to the next
    /// candidate instead of re-sending SYNs until its deadline. Established
    /// connections are left alone: for them it is a soft error (RFC 1122
    /// §4.2.3.9), and it can be forged. Returns how many failed.
    pub fn peer_unreachable(&mut self, peer: SocketAddr) -> usize {
        let connecting: Vec<ConnectionHandle> = self
            .slots
            .iter()
            .filter(|(_, s)| {
                s.remote == peer && !s.incoming && s.connection.state() == State::SynSent
            })
            .map(|(h, _)| *h)
            .collect();
        for &handle in &connecting {
            if let Some(slot) = self.slots.get_mut(&handle) {
                slot.connection.abort(ConnectionError::Unreachable);
            }
            self.wake(handle);
        }
        self.stats.unreachable += connecting.len() as u64;
        connecting.len()
    }

    /// `from` punched us. Until it answers (a packet on a verified
    /// connection), connects to it send at most [`PUNCHER_SYN_BUDGET`]
    /// SYNs in all; the entry is forgotten after [`PUNCHER_MEMORY`].
    pub fn note_punch(&mut self, now: Instant, from: SocketAddr) {
        while let Some(&(at, addr)) = self.puncher_order.front() {
            let full = self.punchers.len() >= MAX_PUNCHERS;
            if !full && now.saturating_duration_since(at) < PUNCHER_MEMORY {
                break;
            }
            self.puncher_order.pop_front();
            if self
                .punchers
                .get(&addr)
                .is_some_and(|&(_, since)| since == at)
            {
                self.punchers.remove(&addr);
            }
        }
        if self.punchers.contains_key(&from) || self.has_verified_connection(from) {
            return;
        }
        if self.puncher_order.len() >= 2 * MAX_PUNCHERS {
            // Entries of addresses that answered since are left behind;
            // drop them so the order stays as bounded as the table.
            let punchers = &self.punchers;
            self.puncher_order
                .retain(|(at, addr)| punchers.get(addr).is_some_and(|&(_, since)| since == *at));
        }
        self.punchers.insert(from, (PUNCHER_SYN_BUDGET, now));
        self.puncher_order.push_back((now, from));
    }

    /// Whether `remote` is a peer of a routed, verified connection.
    fn has_verified_connection(&self, remote: SocketAddr) -> bool {
        let ip = remote.ip();
        (self.per_ip.contains_key(&(ip, false)) || self.per_ip.contains_key(&(ip, true)))
            && self
                .slots
                .values()
                .any(|s| s.routed && s.remote == remote && s.connection.is_verified())
    }

    /// Sends the SYN again at once (the peer's punch arrived).
    pub fn resend_syn(&mut self, handle: ConnectionHandle) {
        if let Some(slot) = self.slots.get_mut(&handle) {
            slot.connection.resend_syn();
            self.touch(handle);
        }
    }

    /// The next connection a peer opened, if any.
    pub fn accept(&mut self) -> Option<ConnectionHandle> {
        while let Some(handle) = self.backlog.pop_front() {
            if let Some(slot) = self.slots.get_mut(&handle) {
                slot.in_backlog = false;
                return Some(handle);
            }
        }
        None
    }

    /// Whether [`accept`](Self::accept) has something.
    pub fn can_accept(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// The handshake's state, `None` for an unknown handle.
    pub fn state(&self, handle: ConnectionHandle) -> Option<State> {
        self.slots.get(&handle).map(|s| s.connection.state())
    }

    /// The peer's address.
    pub fn remote(&self, handle: ConnectionHandle) -> Option<SocketAddr> {
        self.slots.get(&handle).map(|s| s.remote)
    }

    /// How many SYNs a connection sent.
    pub fn syn_count(&self, handle: ConnectionHandle) -> u32 {
        self.slots
            .get(&handle)
            .map_or(0, |s| s.connection.syn_count())
    }

    /// The peer set our capability bit ([`super::packet::CAP_SECURE_SESSION_V1`]):
    /// known once the handshake completed; `false` for an unknown handle.
    pub fn peer_speaks_secure(&self, handle: ConnectionHandle) -> bool {
        self.slots
            .get(&handle)
            .is_some_and(|s| s.connection.peer_speaks_secure())
    }

    /// The smoothed round-trip time of a connection, once measured.
    pub fn rtt(&self, handle: ConnectionHandle) -> Option<Duration> {
        self.slots.get(&handle)?.connection.rtt()
    }

    /// Queues one message on a connection (see [`Connection::send`]).
    pub fn send(&mut self, handle: ConnectionHandle, message: &[u8]) -> Result<usize, SendError> {
        let slot = self
            .slots
            .get_mut(&handle)
            .ok_or(SendError::Closed(ConnectionError::Aborted))?;
        let taken = slot.connection.send(message)?;
        self.touch(handle);
        Ok(taken)
    }

    /// Whether a send would take bytes now, or fail for good.
    pub fn is_writable(&self, handle: ConnectionHandle) -> bool {
        self.slots
            .get(&handle)
            .is_none_or(|s| s.connection.is_writable())
    }

    /// Reads received bytes (see [`Connection::recv`]).
    pub fn recv(&mut self, handle: ConnectionHandle, buf: &mut [u8]) -> Result<usize, RecvError> {
        let slot = self
            .slots
            .get_mut(&handle)
            .ok_or(RecvError::Closed(ConnectionError::Aborted))?;
        let (n, window_update) = slot.connection.recv(buf)?;
        if window_update {
            self.touch(handle);
        }
        Ok(n)
    }

    /// The application finished writing: a FIN follows the queued data.
    pub fn shutdown(&mut self, handle: ConnectionHandle) {
        if let Some(slot) = self.slots.get_mut(&handle) {
            slot.connection.shutdown();
            self.touch(handle);
        }
    }

    /// The application reads no more on this connection.
    pub fn close_read(&mut self, now: Instant, handle: ConnectionHandle) {
        if let Some(slot) = self.slots.get_mut(&handle) {
            slot.connection.close_read(now);
            self.touch(handle);
        }
    }

    /// The application lets go of `handle`: a connecting one is dropped, an
    /// open one finishes gracefully (FIN after the queued data, received
    /// data dropped) and is freed when done.
    pub fn release(&mut self, now: Instant, handle: ConnectionHandle) {
        let Some(slot) = self.slots.get_mut(&handle) else {
            return;
        };
        slot.released = true;
        if slot.connection.state() == State::SynSent {
            slot.connection.abort(ConnectionError::Aborted);
        } else {
            slot.connection.shutdown();
            slot.connection.close_read(now);
        }
        self.touch(handle);
        self.collect(now, handle);
    }

    /// The host is going away: every open connection finishes writing (a
    /// FIN after its queued data). What can leave at once comes out of
    /// [`poll_transmit`](Self::poll_transmit).
    pub fn shutdown_all(&mut self) {
        let handles: Vec<ConnectionHandle> = self.routes.values().copied().collect();
        for handle in handles {
            if let Some(slot) = self.slots.get_mut(&handle) {
                slot.connection.shutdown();
                self.touch(handle);
            }
        }
    }

    /// Ends a connection at once, with a RESET to the peer if it was open.
    pub fn abort(&mut self, now: Instant, handle: ConnectionHandle) {
        if let Some(slot) = self.slots.get_mut(&handle) {
            slot.connection.abort(ConnectionError::Aborted);
            self.touch(handle);
            self.collect(now, handle);
        }
    }

    // ---- The network's side. ----

    /// Handles one datagram from `from` (the demultiplexer already judged
    /// it uTP-shaped; anything that does not decode is counted and dropped).
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let Ok(packet) = Packet::decode(datagram) else {
            self.stats.malformed += 1;
            return;
        };
        let h = packet.header;
        let handle = match h.packet_type {
            PacketType::Syn => return self.handle_syn(now, from, &packet),
            PacketType::Reset => self.route_reset(from, h.connection_id),
            _ => self.routes.get(&(from, h.connection_id)).copied(),
        };
        let Some(handle) = handle else {
            tracing::debug!(%from, id = h.connection_id, kind = ?h.packet_type, "uTP: a packet for no connection");
            self.stats.unknown += 1;
            if h.packet_type != PacketType::Reset {
                self.queue_reset(now, from, &h);
            }
            return;
        };
        if let Some(slot) = self.slots.get_mut(&handle) {
            let before = slot.connection.state();
            slot.connection.handle_packet(now, &packet);
            if slot.connection.is_verified() && !self.punchers.is_empty() {
                // It answered: no longer a puncher on a budget.
                self.punchers.remove(&from);
            }
            let after = slot.connection.state();
            if after != before {
                tracing::debug!(%from, ?handle, "uTP: {before:?} → {after:?} on a {:?}", h.packet_type);
            }
            self.wake(handle);
            self.touch(handle);
            self.collect(now, handle);
        }
    }

    /// A RESET may carry the id we receive on or the one we send with
    /// (libutp sends it with either, depending on who opened the
    /// connection).
    fn route_reset(&self, from: SocketAddr, id: u16) -> Option<ConnectionHandle> {
        if let Some(&handle) = self.routes.get(&(from, id)) {
            return Some(handle);
        }
        [id.wrapping_add(1), id.wrapping_sub(1)]
            .into_iter()
            .filter_map(|recv_id| self.routes.get(&(from, recv_id)))
            .copied()
            .find(|handle| {
                self.slots
                    .get(handle)
                    .is_some_and(|s| s.connection.send_id() == id)
            })
    }

    fn handle_syn(&mut self, now: Instant, from: SocketAddr, syn_packet: &Packet<'_>) {
        let syn = &syn_packet.header;
        let recv_id = syn.connection_id.wrapping_add(1);
        if let Some(&handle) = self.routes.get(&(from, recv_id)) {
            let slot = self.slots.get_mut(&handle).expect("routed slots exist");
            if slot.connection.is_repeated_syn(syn) {
                tracing::debug!(%from, id = syn.connection_id, "uTP: a repeated SYN, answered again");
                slot.connection
                    .handle_packet(now, &Packet::without_payload(*syn));
                self.touch(handle);
                return;
            }
            tracing::debug!(%from, id = syn.connection_id, "uTP: a SYN with the ids of an open connection replaces it");
            // The same ids for a new connection: the peer restarted, or
            // this one is long finished on its side.
            slot.connection.abort(ConnectionError::Reset);
            self.wake(handle);
            self.touch(handle);
            self.unroute(handle);
            self.collect(now, handle);
        }
        let mut limits = self.check_limits(from, true);
        if let Err(limit) = limits {
            let only = (limit == ConnectLimit::PerAddress).then(|| from.ip());
            if self.evict(now, only) {
                limits = self.check_limits(from, true);
            }
        }
        let refused = limits.is_err();
        if refused || self.backlog.len() >= ACCEPT_BACKLOG {
            tracing::debug!(%from, "uTP: SYN refused ({limits:?}, backlog {})", self.backlog.len());
            self.stats.refused += 1;
            self.queue_reset(now, from, syn);
            return;
        }
        let initial_seq = self.rng.random();
        let connection = Connection::accept(now, self.epoch, syn_packet, initial_seq);
        let handle = self.insert(now, from, connection, true, true);
        self.stats.accepted += 1;
        tracing::debug!(%from, id = syn.connection_id, ?handle, "uTP: connection from a SYN");
        self.backlog.push_back(handle);
    }

    /// Makes room for a new incoming connection (with `only` that address;
    /// outgoing connections are never dropped for it): closes the oldest
    /// half-open one (a SYN and nothing since), or else the one
    /// silent longest if it has been silent for [`EVICTABLE_SILENCE`] (its
    /// peer is most likely gone: a `call` process that exited, a host that
    /// died). `false` if there is none.
    fn evict(&mut self, now: Instant, only: Option<IpAddr>) -> bool {
        let candidates = || {
            self.slots.iter().filter(move |(_, s)| {
                s.routed && s.incoming && only.is_none_or(|ip| s.remote.ip() == ip)
            })
        };
        let victim = candidates()
            .filter(|(_, s)| s.connection.is_half_open())
            .min_by_key(|(_, s)| s.opened)
            .or_else(|| {
                candidates()
                    .filter(|(_, s)| s.connection.silent_for(now) >= EVICTABLE_SILENCE)
                    .max_by_key(|(_, s)| s.connection.silent_for(now))
            })
            .map(|(&h, _)| h);
        let Some(handle) = victim else {
            return false;
        };
        self.stats.evicted += 1;
        if let Some(slot) = self.slots.get_mut(&handle) {
            slot.connection.abort(ConnectionError::Aborted);
        }
        self.wake(handle);
        self.unroute(handle);
        self.touch(handle);
        self.collect(now, handle);
        true
    }

    /// Whether one more connection with `remote` fits the budget of its
    /// direction.
    fn check_limits(&self, remote: SocketAddr, incoming: bool) -> Result<(), ConnectLimit> {
        let total = if incoming {
            MAX_INCOMING_CONNECTIONS
        } else {
            MAX_OUTGOING_CONNECTIONS
        };
        if self.per_direction[usize::from(incoming)] >= total {
            return Err(ConnectLimit::Total);
        }
        let per_ip = self.per_ip.get(&(remote.ip(), incoming)).copied();
        if per_ip.unwrap_or(0) >= MAX_CONNECTIONS_PER_IP {
            return Err(ConnectLimit::PerAddress);
        }
        Ok(())
    }

    /// A RESET for a packet that reached no connection, sent with the id
    /// the packet carried (BEP 29 leaves the answer open; libutp looks a
    /// RESET up by either of its ids).
    fn queue_reset(&mut self, now: Instant, to: SocketAddr, about: &Header) {
        if self.resets.len() >= MAX_PENDING_RESETS {
            return;
        }
        let header = Header {
            packet_type: PacketType::Reset,
            extension: 0,
            connection_id: about.connection_id,
            timestamp_us: now.saturating_duration_since(self.epoch).as_micros() as u32,
            timestamp_difference_us: 0,
            wnd_size: 0,
            seq_nr: self.rng.random(),
            ack_nr: about.seq_nr,
        };
        self.resets.push_back(Transmit {
            destination: to,
            contents: Packet::without_payload(header).to_vec(),
        });
    }

    fn insert(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        connection: Connection,
        incoming: bool,
        in_backlog: bool,
    ) -> ConnectionHandle {
        let handle = ConnectionHandle(self.next_handle);
        self.next_handle += 1;
        self.routes.insert((remote, connection.recv_id()), handle);
        *self.per_ip.entry((remote.ip(), incoming)).or_default() += 1;
        self.per_direction[usize::from(incoming)] += 1;
        self.slots.insert(
            handle,
            Slot {
                connection,
                remote,
                routed: true,
                incoming,
                released: false,
                in_backlog,
                timer: None,
                queued: false,
                woken: false,
                opened: now,
            },
        );
        self.touch(handle);
        handle
    }

    fn unroute(&mut self, handle: ConnectionHandle) {
        let Some(slot) = self.slots.get_mut(&handle) else {
            return;
        };
        if !slot.routed {
            return;
        }
        slot.routed = false;
        let key = (slot.remote, slot.connection.recv_id());
        if self.routes.get(&key) == Some(&handle) {
            self.routes.remove(&key);
        }
        let key = (slot.remote.ip(), slot.incoming);
        self.per_direction[usize::from(slot.incoming)] -= 1;
        if let Some(count) = self.per_ip.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                self.per_ip.remove(&key);
            }
        }
    }

    /// Unroutes a done connection and frees one nobody holds.
    fn collect(&mut self, now: Instant, handle: ConnectionHandle) {
        let Some(slot) = self.slots.get(&handle) else {
            return;
        };
        // A done connection has nothing left to send (a pending RESET
        // keeps it from being done).
        if !slot.connection.is_done(now) {
            return;
        }
        self.unroute(handle);
        let slot = &self.slots[&handle];
        // A closed connection nobody will accept is freed too.
        if slot.released || slot.in_backlog {
            if slot.in_backlog {
                self.backlog.retain(|&h| h != handle);
            }
            if let Some(at) = slot.timer {
                self.timers.remove(&(at, handle));
            }
            self.slots.remove(&handle);
        }
    }

    /// Files the connection's next timer and queues it for transmitting.
    fn touch(&mut self, handle: ConnectionHandle) {
        self.refile_timer(handle);
        let Some(slot) = self.slots.get_mut(&handle) else {
            return;
        };
        if !slot.queued {
            slot.queued = true;
            self.transmit_queue.push_back(handle);
        }
    }

    fn wake(&mut self, handle: ConnectionHandle) {
        if let Some(slot) = self.slots.get_mut(&handle) {
            if !slot.woken {
                slot.woken = true;
                self.woken.push(handle);
            }
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) is next needed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.first().map(|&(at, _)| at)
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<ConnectionHandle> = self
            .timers
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|&(_, h)| h)
            .collect();
        for handle in due {
            if let Some(slot) = self.slots.get_mut(&handle) {
                let before = slot.connection.state();
                slot.connection.handle_timeout(now);
                let after = slot.connection.state();
                if after != before {
                    tracing::debug!(remote = %slot.remote, ?handle, "uTP: {before:?} → {after:?} on a timer");
                    if after == State::Closed(Some(ConnectionError::Unverified)) {
                        self.stats.unverified += 1;
                    }
                    self.wake(handle);
                }
                self.touch(handle);
                self.collect(now, handle);
            }
        }
    }

    /// The next datagram to send, if any. Connections take turns, one
    /// packet each.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if let Some(reset) = self.resets.pop_front() {
            return Some(reset);
        }
        while let Some(handle) = self.transmit_queue.pop_front() {
            let Some(slot) = self.slots.get_mut(&handle) else {
                continue;
            };
            let mut out = std::mem::take(&mut self.scratch);
            if slot.connection.poll_transmit(now, &mut out) {
                let transmit = Transmit {
                    destination: slot.remote,
                    contents: out.clone(),
                };
                self.scratch = out;
                // More may follow (it goes to the back of the queue); its
                // timers moved.
                slot.queued = false;
                self.touch(handle);
                return Some(transmit);
            }
            self.scratch = out;
            slot.queued = false;
            self.refile_timer(handle);
            self.collect(now, handle);
        }
        None
    }

    /// Files the connection's next timer (and unfiles its old one).
    fn refile_timer(&mut self, handle: ConnectionHandle) {
        let Some(slot) = self.slots.get_mut(&handle) else {
            return;
        };
        let next = slot.connection.poll_timeout();
        if next != slot.timer {
            if let Some(at) = slot.timer {
                self.timers.remove(&(at, handle));
            }
            if let Some(at) = next {
                self.timers.insert((at, handle));
            }
            slot.timer = next;
        }
    }

    /// Whether [`poll_transmit`](Self::poll_transmit) may have something.
    pub fn wants_transmit(&self) -> bool {
        !self.resets.is_empty() || !self.transmit_queue.is_empty()
    }

    /// Connections whose application side may see something new (data,
    /// space to write, a finished handshake, an error), each once.
    pub fn drain_woken(&mut self) -> impl Iterator<Item = ConnectionHandle> + '_ {
        for handle in &self.woken {
            if let Some(slot) = self.slots.get_mut(handle) {
                slot.woken = false;
            }
        }
        self.woken.drain(..)
    }
}
