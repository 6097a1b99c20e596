//! One UDP socket per host, carrying the uTP listener, the uTP dialers and
//! the punches and introductions.
//!
//! Sharing the socket is what makes NAT traversal work: the port the host
//! announces is the port its punches leave from, so the hole a punch opens is
//! the one the peer's uTP connection comes back through. Every received
//! datagram is sorted by [`classify`]: an exact punch goes to every punch
//! subscriber, an introduction message (see [`crate::nat`]) to the
//! introduction channel, a datagram that can be uTP goes to our uTP
//! ([`crate::utp`]), and anything else is dropped and counted (it never
//! reaches the uTP parser).
//!
//! The socket's one task receives, sorts, runs uTP's timers and sends what
//! uTP hands back; streams wake it when they queue data. A peer reached
//! through birthday punching or a relay has a [`Route`] (see [`routes`]):
//! its datagrams leave by that route, and what comes back by it is sorted
//! as if it came straight from the peer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc};

use crate::utp::{Utp, UtpStream};

mod datagram;
mod routes;
mod socket;
pub use datagram::{
    classify, parse_relay_frame, relay_frame, relay_overhead, Datagram, RelayFrame,
    INTRODUCTION_MAGIC, MAX_INTRODUCTION_DATAGRAM, PUNCH, RELAY_MAGIC, RELAY_TOKEN_LEN,
};
use routes::Routes;
pub use routes::{PathKind, Route, MAX_ROUTES};
use socket::{Received, RpcSocket, RECV_AT_ONCE};
use tokio::io::unix::AsyncFdReadyGuard;

/// Receive buffer for the shared socket; uTP throughput suffers badly with
/// the kernel default.
const RECV_BUFFER: usize = 4 << 20;
/// An unanswered SYN is sent again this often until the connect deadline;
/// a refused connect is tried again after as long.
pub const CONNECT_RETRY: Duration = crate::utp::SYN_RETRY;
/// A connection whose peer stops acknowledging data for this long is closed,
/// so requests sent to a host that died fail fast instead of at their deadline.
pub const PEER_SILENCE_LIMIT: Duration = crate::utp::PEER_SILENCE_LIMIT;
/// The largest datagram the socket reads (a UDP payload can be no longer).
const MAX_DATAGRAM: usize = 65_536;
/// Datagrams read in a row before uTP's ACKs and timers get a turn.
const RECV_BATCH: usize = 64;
/// Punches a slow subscriber may fall behind by (it then misses the oldest).
const PUNCH_BACKLOG: usize = 256;
/// Introduction messages waiting for the host's driver; more are dropped.
const INTRODUCTION_BACKLOG: usize = 256;

/// Introduction datagrams received (magic included, at most
/// [`MAX_INTRODUCTION_DATAGRAM`] bytes), with their sender.
pub type Introductions = mpsc::Receiver<(SocketAddr, Vec<u8>)>;

/// Counters a host reports about its socket.
#[derive(Debug, Default)]
pub struct TransportStats {
    /// Exact punches received.
    pub punches_received: AtomicU64,
    /// Punches handed to the kernel (Grenache punching, introduction
    /// handshakes and keepalives alike).
    pub punches_sent: AtomicU64,
    /// Datagrams dropped unread: neither punch, introduction nor uTP.
    pub garbage_datagrams: AtomicU64,
    /// Relay frames dropped: not from the relay of a relayed peer, with
    /// another token, or carrying neither uTP nor a punch.
    pub refused_relay_frames: AtomicU64,
    /// Relay routes cleared because the peer proved a direct path
    /// ([`Endpoint::move_to_direct`]): its traffic moved there.
    pub relay_to_direct: AtomicU64,
}

/// Which socket, or which relay, a datagram came in by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// The host's RPC socket, straight from the sender.
    Main,
    /// An adopted extra socket (birthday punching).
    Extra,
    /// A relay, on behalf of the peer.
    Relay,
}

/// Where the socket's task sends what it sorts out.
struct Demux {
    socket: Arc<RpcSocket>,
    utp: Arc<Utp>,
    punches: broadcast::Sender<SocketAddr>,
    introductions: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    stats: Arc<TransportStats>,
    routes: Routes,
}

impl Demux {
    /// Sends `bytes` to `to` by its route: from the main socket, from an
    /// adopted socket, or in a relay frame to its relay.
    async fn send(&self, to: SocketAddr, bytes: &[u8]) -> std::io::Result<usize> {
        match self.routes.get(to) {
            None => self.socket.send_to(bytes, to).await,
            Some(Route::Socket(socket)) => socket.send_to(bytes, to).await,
            Some(Route::Relay { relay, token }) => {
                let frame = relay_frame(token, to, bytes);
                self.socket.send_to(&frame, relay).await
            }
        }
    }

    /// [`send`](Self::send) without waiting (the endpoint is going away).
    fn try_send(&self, to: SocketAddr, bytes: &[u8]) {
        let _ = match self.routes.get(to) {
            None => self.socket.try_send_to(bytes, to),
            Some(Route::Socket(socket)) => socket.try_send_to(bytes, to),
            Some(Route::Relay { relay, token }) => self
                .socket
                .try_send_to(&relay_frame(token, to, bytes), relay),
        };
    }

    /// Reads an adopted socket until no route sends from it any more (checked
    /// every [`ADOPTED_CHECK`]) and sorts what it reads.
    async fn read_adopted(self: Arc<Self>, socket: Arc<UdpSocket>) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            tokio::select! {
                received = socket.recv_from(&mut buf) => match received {
                    Ok((n, from)) => {
                        self.sort(Instant::now(), Via::Extra, from, &buf[..n]);
                        self.utp.wake();
                    }
                    Err(e) => tracing::debug!("receive error on an adopted socket (ignored): {e}"),
                },
                _ = tokio::time::sleep(ADOPTED_CHECK) => {
                    if !self.routes.uses_socket(&socket) {
                        return;
                    }
                }
            }
        }
    }

    /// Receives, sorts and sends until the task is aborted.
    async fn run(self: Arc<Self>) {
        let mut received = Received::new(MAX_DATAGRAM);
        let mut out = Vec::new();
        // One timer for the task's life, set to uTP's next deadline rounded
        // up to the TIMER_GRID: moving a tokio timer earlier than the
        // runtime's next planned wake-up wakes the runtime's I/O driver (an
        // eventfd write and one more epoll_wait), and every request's
        // delayed ACK would do that once; on the grid, the requests of one
        // 5 ms share one deadline.
        let grid = Instant::now();
        let timer = tokio::time::sleep_until(grid.into());
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        loop {
            tokio::select! {
                ready = self.socket.ready() => {
                    if let Ok(mut ready) = ready {
                        if ready.ready().is_error() {
                            self.receive_errors();
                        }
                        if ready.ready().is_readable() {
                            self.receive_batch(&mut ready, &mut received);
                        }
                    }
                }
                _ = self.utp.wakeup() => {}
                () = &mut timer, if armed.is_some() => armed = None,
            }
            let next = self
                .utp
                .poll(Instant::now(), &mut out)
                .map(|at| on_grid(grid, at));
            if next != armed {
                if let Some(at) = next {
                    timer.as_mut().reset(at.into());
                }
                armed = next;
            }
            for transmit in out.drain(..) {
                if let Err(e) = self.send(transmit.destination, &transmit.contents).await {
                    tracing::debug!(to = %transmit.destination, "uTP packet not sent: {e}");
                }
            }
        }
    }

    /// Reads the socket's error queue (`IP_RECVERR`, set at bind), up to
    /// [`RECV_BATCH`] entries: an ICMP destination unreachable for a
    /// datagram we sent fails the connects waiting on that peer
    /// ([`Utp::peer_unreachable`]); anything else is only logged.
    fn receive_errors(&self) {
        let drained = self.socket.try_read_errors(|socket| {
            for _ in 0..RECV_BATCH {
                if let Some(icmp::Unreachable(peer)) = icmp::next_error(socket)? {
                    tracing::debug!(%peer, "ICMP: destination unreachable");
                    self.utp.peer_unreachable(peer);
                }
            }
            Ok(())
        });
        if let Err(e) = drained {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                tracing::debug!("reading the RPC socket's error queue failed: {e}");
            }
        }
    }

    /// Reads what is waiting, up to [`RECV_BATCH`] datagrams.
    fn receive_batch(
        &self,
        ready: &mut AsyncFdReadyGuard<'_, std::net::UdpSocket>,
        received: &mut Received,
    ) {
        let now = Instant::now();
        for _ in 0..RECV_BATCH / RECV_AT_ONCE {
            match self.socket.recv_many(ready, received) {
                Ok(n) => {
                    for i in 0..n {
                        if let (Some(from), datagram) = received.get(i) {
                            self.sort(now, Via::Main, from, datagram);
                        }
                    }
                    if n < RECV_AT_ONCE {
                        return;
                    }
                }
                // ICMP errors (port unreachable after a peer died) are
                // reported on the next receive: they concern one peer,
                // never the socket.
                Err(e) => tracing::debug!("receive error on the RPC socket (ignored): {e}"),
            }
        }
    }

    fn sort(&self, now: Instant, via: Via, from: SocketAddr, datagram: &[u8]) {
        let n = datagram.len();
        match classify(datagram) {
            Datagram::Utp => self.utp.handle_datagram(now, from, datagram),
            Datagram::Punch => {
                self.stats.punches_received.fetch_add(1, Ordering::Relaxed);
                self.utp.note_punch(now, from);
                let _ = self.punches.send(from);
            }
            Datagram::Relay if via == Via::Main => self.sort_relayed(now, from, datagram),
            Datagram::Introduction if via == Via::Main && n <= MAX_INTRODUCTION_DATAGRAM => {
                let _ = self.introductions.try_send((from, datagram.to_vec()));
            }
            Datagram::Introduction => {
                self.stats.garbage_datagrams.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%from, len = n, ?via, "dropped an oversized or misplaced introduction datagram");
            }
            Datagram::Relay => {
                self.stats
                    .refused_relay_frames
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%from, len = n, ?via, "dropped a relay frame that came in by a relay or an adopted socket");
            }
            Datagram::Garbage => {
                self.stats.garbage_datagrams.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(%from, len = n, "dropped a datagram that is neither uTP nor a punch");
            }
        }
    }
}

impl Demux {
    /// A relay frame from `relay`: its payload is sorted as if it came from
    /// the frame's address if this host has a relay session with that peer
    /// through `relay` with the frame's token (sending through it, or moved
    /// to the direct path while the peer may not have yet), and carries uTP
    /// or a punch; anything else is dropped and counted.
    fn sort_relayed(&self, now: Instant, relay: SocketAddr, datagram: &[u8]) {
        let frame = parse_relay_frame(datagram).filter(|f| {
            self.routes.accept_relayed(f.addr, relay, &f.token, now)
                && matches!(classify(f.payload), Datagram::Utp | Datagram::Punch)
        });
        match frame {
            Some(frame) => self.sort(now, Via::Relay, frame.addr, frame.payload),
            None => {
                self.stats
                    .refused_relay_frames
                    .fetch_add(1, Ordering::Relaxed);
                tracing::trace!(from = %relay, len = datagram.len(), "dropped a relay frame");
            }
        }
    }
}

/// The socket's task runs uTP's timers on this grid: a deadline waits for
/// the next grid point, at most this long. No longer than uTP's shortest
/// timer (the delayed ACK, `utp::ACK_DELAY`, whose STATE thus leaves 5–11 ms
/// after a lone packet) and far below its RTO (at least 200 ms).
pub const TIMER_GRID: Duration = Duration::from_millis(5);

/// `at` rounded up to the next [`TIMER_GRID`] point counted from `grid`.
fn on_grid(grid: Instant, at: Instant) -> Instant {
    let step = TIMER_GRID.as_nanos();
    let steps = at.saturating_duration_since(grid).as_nanos().div_ceil(step);
    grid + Duration::from_nanos(u64::try_from(steps * step).unwrap_or(u64::MAX))
}

/// An adopted socket's reader checks this often whether a route still
/// sends from it, and stops when none does.
const ADOPTED_CHECK: Duration = Duration::from_secs(1);

/// Why a uTP connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No answer to any SYN before the deadline.
    #[error("no uTP answer from {peer} within {waited:?} ({attempts} attempts)")]
    Timeout {
        peer: SocketAddr,
        waited: Duration,
        attempts: u32,
    },
    /// Refused (a RESET answered), or over a connection bound.
    #[error("uTP connect to {peer} failed: {reason}")]
    Failed { peer: SocketAddr, reason: String },
    /// Theory rules out a direct path between the two hosts' NATs.
    #[error("{0}")]
    Impossible(String),
}

/// Stops the socket's task when the last [`Endpoint`] clone goes.
struct Task {
    handle: tokio::task::JoinHandle<()>,
    demux: Arc<Demux>,
}

impl Drop for Task {
    fn drop(&mut self) {
        self.handle.abort();
        self.demux.routes.abort_readers();
        // Tell the peers, as far as the socket takes it without waiting: a
        // `call` that exits ends its connection at once instead of leaving
        // the server to time it out.
        for transmit in self.demux.utp.shutdown_all(Instant::now()) {
            self.demux
                .try_send(transmit.destination, &transmit.contents);
        }
        self.demux.utp.stop();
    }
}

/// The host's socket: uTP in both directions plus punches.
#[derive(Clone)]
pub struct Endpoint {
    socket: Arc<RpcSocket>,
    local: SocketAddr,
    utp: Arc<Utp>,
    punches: broadcast::Sender<SocketAddr>,
    /// What the demultiplexer counted.
    pub stats: Arc<TransportStats>,
    demux: Arc<Demux>,
    _task: Arc<Task>,
}

impl Endpoint {
    /// Binds the socket at `addr` (port 0 for any free port). Introduction
    /// messages arrive on the returned channel; punches through
    /// [`punches`](Self::punches).
    pub async fn bind(addr: SocketAddr) -> anyhow::Result<(Endpoint, Introductions)> {
        let std_socket = std::net::UdpSocket::bind(addr).map_err(|e| {
            anyhow::anyhow!(
                "cannot bind the RPC socket to {addr}: {e}; pick another --listen address or port"
            )
        })?;
        std_socket.set_nonblocking(true)?;
        // ICMP errors for what we send (a closed port) reach us through the
        // error queue; an unconnected socket hears of none without it.
        if let Err(e) = icmp::enable(&std_socket) {
            tracing::debug!("cannot enable IP_RECVERR: {e}");
        }
        if let Err(e) = socket2::SockRef::from(&std_socket).set_recv_buffer_size(RECV_BUFFER) {
            tracing::debug!("cannot raise SO_RCVBUF: {e}");
        }
        let socket = Arc::new(RpcSocket::new(std_socket)?);
        let local = socket.get_ref().local_addr()?;
        let (introductions, introductions_rx) = mpsc::channel(INTRODUCTION_BACKLOG);
        let (punches, _) = broadcast::channel(PUNCH_BACKLOG);
        let stats = Arc::new(TransportStats::default());
        let utp = Utp::new();
        let demux = Arc::new(Demux {
            socket: socket.clone(),
            utp: utp.clone(),
            punches: punches.clone(),
            introductions,
            stats: stats.clone(),
            routes: Routes::default(),
        });
        let task = Task {
            handle: tokio::spawn(demux.clone().run()),
            demux: demux.clone(),
        };
        let endpoint = Endpoint {
            socket,
            local,
            utp,
            punches,
            stats,
            demux,
            _task: Arc::new(task),
        };
        Ok((endpoint, introductions_rx))
    }

    /// Every punch received from now on, as the sender's address.
    pub fn punches(&self) -> broadcast::Receiver<SocketAddr> {
        self.punches.subscribe()
    }

    /// Sends one introduction datagram (encoded by [`crate::nat`]).
    pub async fn send_introduction(&self, to: SocketAddr, datagram: &[u8]) {
        if let Err(e) = self.socket.send_to(datagram, to).await {
            tracing::debug!(%to, "introduction message not sent: {e}");
        }
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// uTP connections open now (both directions, connecting included).
    pub fn open_connections(&self) -> usize {
        self.utp.open_connections()
    }

    /// What the uTP side of the socket counted so far.
    pub fn utp_stats(&self) -> crate::utp::SocketStats {
        self.utp.stats()
    }

    /// Sends one punch to `peer`.
    pub async fn punch(&self, peer: SocketAddr) {
        if let Err(e) = self.try_punch(peer).await {
            tracing::debug!(%peer, "punch not sent: {e}");
        }
    }

    /// Sends one punch to `peer` and counts it, or says why the socket
    /// could not. It leaves from the peer's adopted socket if it has one,
    /// else from the main socket, never through a relay: a punch is how a
    /// direct path is found (again).
    pub async fn try_punch(&self, peer: SocketAddr) -> std::io::Result<()> {
        match self.demux.routes.get(peer) {
            Some(Route::Socket(socket)) => socket.send_to(&PUNCH, peer).await?,
            _ => self.socket.send_to(&PUNCH, peer).await?,
        };
        self.stats.punches_sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// From now on, datagrams to `peer` leave by `route` (uTP always,
    /// punches only by a [`Route::Socket`]); `false` when [`MAX_ROUTES`]
    /// other peers have a route. Use [`adopt`](Self::adopt) for a socket
    /// whose datagrams must be read too.
    pub fn set_route(&self, peer: SocketAddr, route: Route) -> bool {
        self.demux.routes.set(peer, route)
    }

    /// Datagrams to `peer` leave from the main socket again; an adopted
    /// socket no route uses any more stops being read within a second.
    pub fn clear_route(&self, peer: SocketAddr) {
        self.demux.routes.clear(peer);
    }

    /// `peer` proved it hears us directly and we hear it (a nonce sent
    /// directly came back, `crate::nat`): if its path was relayed, its
    /// traffic moves to the direct path now. The address stays, so its uTP
    /// connections do not notice.
    pub fn move_to_direct(&self, peer: SocketAddr) {
        if self.demux.routes.clear_relay(peer) {
            self.stats.relay_to_direct.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, "the path to {peer} is direct now (it was relayed)");
        }
    }

    /// The peers whose relay sessions brought a frame since `since` (for
    /// the host's introductions: a relayed path in use is kept).
    pub fn relayed_heard_since(&self, since: Instant) -> Vec<SocketAddr> {
        self.demux.routes.relayed_heard_since(since)
    }

    /// Every peer with an open uTP connection or a route, by address, and
    /// the kind of path to it (for `status`).
    pub fn peer_paths(&self) -> Vec<(SocketAddr, PathKind)> {
        let mut all = self.paths();
        let routed: std::collections::HashSet<SocketAddr> = all.iter().map(|(a, _)| *a).collect();
        all.extend(
            self.utp
                .remotes()
                .into_iter()
                .filter(|a| !routed.contains(a))
                .map(|a| (a, PathKind::Direct)),
        );
        all.sort_by_key(|(a, _)| *a);
        all
    }

    /// The kind of path to `peer` now.
    pub fn path_kind(&self, peer: SocketAddr) -> PathKind {
        self.demux
            .routes
            .get(peer)
            .map_or(PathKind::Direct, |r| r.kind())
    }

    /// Every peer with a route (birthday or relayed), by address; peers
    /// without one are direct.
    pub fn paths(&self) -> Vec<(SocketAddr, PathKind)> {
        self.demux.routes.list()
    }

    /// Makes `socket` (an extra socket of this host, e.g. birthday
    /// punching's winner) the path to `peer`: datagrams to `peer` leave from
    /// it, and everything it receives is sorted like the main socket's
    /// datagrams (uTP, punches; never introductions or relay frames) until
    /// no route uses it. `false` (and nothing changes) when the route table
    /// is full.
    pub fn adopt(&self, socket: Arc<UdpSocket>, peer: SocketAddr) -> bool {
        if !self.set_route(peer, Route::Socket(socket.clone())) {
            return false;
        }
        let reader = tokio::spawn(self.demux.clone().read_adopted(socket));
        self.demux.routes.add_reader(reader.abort_handle());
        true
    }

    /// Waits for the next incoming uTP connection; fails only once the
    /// socket stopped.
    pub async fn accept(&self) -> std::io::Result<UtpStream> {
        self.utp.accept().await
    }

    /// Connects to `peer`, re-sending the SYN every [`CONNECT_RETRY`] until
    /// `deadline` (a SYN may be lost, or the peer's NAT may not be open yet).
    pub async fn connect(
        &self,
        peer: SocketAddr,
        deadline: Instant,
    ) -> Result<UtpStream, ConnectError> {
        self.connect_inner(peer, deadline, None)
            .await
            .map(|(stream, _)| stream)
    }

    /// Connects to a peer that is punching us (after an introduction): the
    /// SYN is re-sent at once when its first punch arrives, rather than at
    /// the next retry. With `follow_port` (the peer is behind a symmetric
    /// NAT) a punch from the peer's IP but another port moves the target
    /// there. Returns the stream and the address it connected to.
    pub async fn connect_punched(
        &self,
        peer: SocketAddr,
        deadline: Instant,
        follow_port: bool,
    ) -> Result<(UtpStream, SocketAddr), ConnectError> {
        self.connect_inner(peer, deadline, Some((self.punches(), follow_port)))
            .await
    }

    async fn connect_inner(
        &self,
        mut peer: SocketAddr,
        deadline: Instant,
        mut punches: Option<(broadcast::Receiver<SocketAddr>, bool)>,
    ) -> Result<(UtpStream, SocketAddr), ConnectError> {
        let started = Instant::now();
        // SYNs of abandoned attempts (refused, or moved to another port).
        let mut earlier_syns = 0;
        let mut heard = false;
        loop {
            let attempt = self.utp.connect(peer).map_err(|e| ConnectError::Failed {
                peer,
                reason: e.to_string(),
            })?;
            // One attempt: its SYN is re-sent by uTP until it is answered.
            let outcome = loop {
                let (target, was_heard) = (peer, heard);
                let punched = async {
                    match punches.as_mut() {
                        Some((rx, follow_port)) => {
                            punch_from(rx, target, *follow_port, was_heard).await
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    outcome = attempt.established() => break Some(outcome),
                    from = punched => {
                        // The peer's NAT is open now: a SYN at once.
                        tracing::debug!(%peer, %from, "punched by the peer; connecting at once");
                        heard = true;
                        if from == peer {
                            attempt.resend_syn();
                        } else {
                            peer = from;
                            break None;
                        }
                    }
                    _ = tokio::time::sleep_until(deadline.into()) => {
                        return Err(ConnectError::Timeout {
                            peer,
                            waited: started.elapsed(),
                            attempts: earlier_syns + attempt.syn_count(),
                        });
                    }
                }
            };
            earlier_syns += attempt.syn_count();
            match outcome {
                Some(Ok(())) => return Ok((attempt.into_stream(), peer)),
                // Moved to the port the peer's punch came from.
                None => {}
                Some(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                    // An address that punched us and spent its SYN budget
                    // unanswered: no more attempts until it answers.
                    return Err(ConnectError::Failed {
                        peer,
                        reason: e.to_string(),
                    });
                }
                Some(Err(e)) if e.kind() == std::io::ErrorKind::HostUnreachable => {
                    // Nothing listens there (ICMP): the caller has other
                    // candidates to try, or none worth waiting for.
                    return Err(ConnectError::Failed {
                        peer,
                        reason: e.to_string(),
                    });
                }
                Some(Err(e)) => {
                    // Refused: the peer may just be starting; try again
                    // after a while if the deadline allows.
                    tracing::debug!(%peer, "uTP connect refused: {e}");
                    drop(attempt);
                    if Instant::now() + CONNECT_RETRY >= deadline {
                        return Err(ConnectError::Failed {
                            peer,
                            reason: e.to_string(),
                        });
                    }
                    tokio::time::sleep(CONNECT_RETRY).await;
                }
            }
        }
    }
}

/// Waits for a punch from `peer` (or, with `follow_port`, from any port of
/// its IP); once `heard`, only a punch from another port counts.
async fn punch_from(
    rx: &mut broadcast::Receiver<SocketAddr>,
    peer: SocketAddr,
    follow_port: bool,
    heard: bool,
) -> SocketAddr {
    loop {
        match rx.recv().await {
            Ok(from) if from == peer && !heard => return from,
            Ok(from) if follow_port && from.ip() == peer.ip() && from != peer => return from,
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tv1_only_the_exact_punch_is_a_punch() {
        assert_eq!(classify(&[0xC3, 0xBF]), Datagram::Punch);
        assert_eq!(classify(&[0xFF]), Datagram::Garbage);
        assert_eq!(classify(&[0xC3, 0xBF, 0x0A]), Datagram::Garbage);
        assert_eq!(classify(&[]), Datagram::Garbage);
        assert_eq!(
            classify(&[0x41; 19]),
            Datagram::Garbage,
            "shorter than a uTP header"
        );
    }

    use crate::test_vectors::hex;

    #[test]
    fn tv9_libutp_handshake_packets_reach_utp() {
        // The SYN, STATE and first DATA headers captured from a Node peer.
        let syn = hex("41 00 4567 003713ba 00000000 00100000 23c6 0000");
        let state = hex("21 00 4567 00371455 00000000 00100000 4567 23c6");
        let mut data = hex("01 00 4568 00371455 00000000 00100000 23c7 4566");
        data.extend_from_slice(br#"["3f2cf13b-da02-4abf-bb01-9306b37281a3","rpc_test","hello"]"#);
        for packet in [syn, state, data] {
            assert!(packet.len() >= 20);
            assert_eq!(classify(&packet), Datagram::Utp, "{packet:02x?}");
        }
    }

    /// Two hosts' sockets on loopback, B accepting.
    async fn two_endpoints() -> (Endpoint, Endpoint) {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (a, _) = Endpoint::bind(any).await.unwrap();
        let (b, _) = Endpoint::bind(any).await.unwrap();
        (a, b)
    }

    /// A uTP stream from `a` to `b` (accepted by `b`), both split: the
    /// client's halves, then the server's.
    async fn connected(
        a: &Endpoint,
        b: &Endpoint,
    ) -> (
        (crate::utp::UtpReadHalf, crate::utp::UtpWriteHalf),
        (crate::utp::UtpReadHalf, crate::utp::UtpWriteHalf),
    ) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let (client, server) = tokio::join!(a.connect(b.local_addr(), deadline), b.accept());
        let (client, server) = (client.unwrap(), server.unwrap());
        // On every path the peer keeps its own address.
        assert_eq!(server.remote_addr(), a.local_addr());
        (client.split(), server.split())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_carry_messages_and_a_large_transfer_between_two_sockets() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, b) = two_endpoints().await;
        let ((mut client_read, mut client_write), (mut server_read, mut server_write)) =
            connected(&a, &b).await;

        // Eight messages written at once arrive in order.
        let messages: Vec<Vec<u8>> = (0..8u8).map(|i| vec![b'a' + i; 1300]).collect();
        for m in &messages {
            client_write.write_all(m).await.unwrap();
        }
        let mut got = vec![0u8; 8 * 1300];
        tokio::time::timeout(Duration::from_secs(5), server_read.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, messages.concat());

        // 16 MiB the other way, then the end of the stream.
        let big: Vec<u8> = (0..16 << 20).map(|i: usize| (i * 7 % 251) as u8).collect();
        let sent = big.clone();
        let started = Instant::now();
        let writer = tokio::spawn(async move {
            server_write.write_all(&sent).await.unwrap();
            drop(server_write);
        });
        let mut received = Vec::with_capacity(big.len());
        tokio::time::timeout(
            Duration::from_secs(60),
            client_read.read_to_end(&mut received),
        )
        .await
        .unwrap()
        .unwrap();
        let took = started.elapsed();
        writer.await.unwrap();
        assert!(received == big, "16 MiB arrive intact");
        eprintln!(
            "16 MiB over loopback in {took:?}: {:.0} MB/s",
            big.len() as f64 / took.as_secs_f64() / 1e6
        );
    }

    #[tokio::test]
    async fn a_host_that_goes_away_ends_its_connections_with_a_fin() {
        use tokio::io::AsyncReadExt;
        let (a, b) = two_endpoints().await;
        let deadline = Instant::now() + Duration::from_secs(5);
        let (client, server) = tokio::join!(a.connect(b.local_addr(), deadline), b.accept());
        let (_client, mut server) = (client.unwrap(), server.unwrap());
        // The client's host stops (a `call` that exits) while its stream
        // is still held.
        drop(a);
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(1), server.read(&mut buf)).await;
        assert_eq!(read.expect("the end arrives at once").unwrap(), 0);
    }

    #[tokio::test]
    async fn a_connect_to_nobody_times_out_after_retrying_its_syn() {
        let (a, _) = two_endpoints().await;
        // A bound socket that never answers.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let started = Instant::now();
        let deadline = started + Duration::from_millis(1000);
        match a.connect(silent.local_addr().unwrap(), deadline).await {
            Err(ConnectError::Timeout { attempts, .. }) => {
                // At 0, 400 and 800 ms.
                assert_eq!(attempts, 3);
            }
            other => panic!("expected a timeout, got {:?}", other.map(|_| ())),
        }
        assert!(started.elapsed() >= Duration::from_millis(1000));
        assert_eq!(a.open_connections(), 0, "the abandoned attempt is gone");
        let mut buf = [0u8; 64];
        silent.set_nonblocking(true).unwrap();
        let mut syns = 0;
        while let Ok((n, _)) = silent.recv_from(&mut buf) {
            // The header and our capability bits (extension 2).
            assert_eq!((n, buf[0], buf[1]), (30, 0x41, 2), "a SYN with our bits");
            syns += 1;
        }
        assert_eq!(syns, 3);
    }

    /// Waits until `check` holds, for at most 5 s.
    async fn eventually(what: &str, check: impl Fn() -> bool) {
        crate::units::eventually(what, Duration::from_secs(5), check).await
    }

    /// Writes `message` on `from` and reads it whole on `to`.
    async fn carries(
        from: &mut crate::utp::UtpWriteHalf,
        to: &mut crate::utp::UtpReadHalf,
        message: &[u8],
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        from.write_all(message).await.unwrap();
        let mut got = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(5), to.read_exact(&mut got))
            .await
            .expect("the message arrives")
            .unwrap();
        assert_eq!(got, message);
    }

    /// A relay for two endpoints, as the relay frame says one works: a frame
    /// from `a` with `a`'s token goes to `b` with `b`'s token and `a`'s
    /// address, and back. Returns its address and the frames it forwarded.
    fn forwarder(
        a: (SocketAddr, [u8; 8]),
        b: (SocketAddr, [u8; 8]),
    ) -> (SocketAddr, Arc<AtomicU64>) {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let forwarded = Arc::new(AtomicU64::new(0));
        let count = forwarded.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let Some(frame) = parse_relay_frame(&buf[..n]) else {
                    continue;
                };
                let (to, token) = match (from, frame.addr) {
                    (f, t) if f == a.0 && t == b.0 && frame.token == a.1 => (b.0, b.1),
                    (f, t) if f == b.0 && t == a.0 && frame.token == b.1 => (a.0, a.1),
                    _ => continue,
                };
                count.fetch_add(1, Ordering::Relaxed);
                let _ = socket.send_to(&relay_frame(token, from, frame.payload), to);
            }
        });
        (addr, forwarded)
    }

    #[tokio::test]
    async fn a_relayed_session_runs_through_the_relay_and_moves_to_the_direct_path() {
        let (a, b) = two_endpoints().await;
        let (ta, tb) = ([1u8; 8], [2u8; 8]);
        let (relay, forwarded) = forwarder((a.local_addr(), ta), (b.local_addr(), tb));
        assert!(a.set_route(b.local_addr(), Route::Relay { relay, token: ta }));
        assert!(b.set_route(a.local_addr(), Route::Relay { relay, token: tb }));
        assert_eq!(a.path_kind(b.local_addr()), PathKind::Relayed);
        assert_eq!(a.paths(), vec![(b.local_addr(), PathKind::Relayed)]);

        // The relay is invisible to uTP.
        let ((mut client_read, mut client_write), (mut server_read, mut server_write)) =
            connected(&a, &b).await;
        carries(&mut client_write, &mut server_read, &[7u8; 5000]).await;
        carries(&mut server_write, &mut client_read, b"reply").await;
        let relayed = forwarded.load(Ordering::Relaxed);
        assert!(
            relayed >= 6,
            "handshake, data and acks went through the relay: {relayed}"
        );

        // A frame from the relay's address with another token, and one
        // naming a peer without a relay route, are dropped and counted.
        let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let forged = relay_frame([9u8; 8], b.local_addr(), &PUNCH);
        other.send_to(&forged, a.local_addr()).unwrap();
        eventually("the forged frame is counted", || {
            a.stats.refused_relay_frames.load(Ordering::Relaxed) == 1
        })
        .await;

        // A punch straight from B (or forged with B's address) does not move
        // anything: only the host's check (crate::nat) does.
        b.punch(a.local_addr()).await;
        eventually("the punch arrived", || {
            a.stats.punches_received.load(Ordering::Relaxed) == 1
        })
        .await;
        assert_eq!(a.path_kind(b.local_addr()), PathKind::Relayed);
        // Both moved to direct: the session goes on, and the relay carries
        // no more of it.
        a.move_to_direct(b.local_addr());
        b.move_to_direct(a.local_addr());
        assert_eq!(a.path_kind(b.local_addr()), PathKind::Direct);
        assert_eq!(a.stats.relay_to_direct.load(Ordering::Relaxed), 1);
        let before = forwarded.load(Ordering::Relaxed);
        carries(&mut client_write, &mut server_read, &[8u8; 5000]).await;
        carries(&mut server_write, &mut client_read, b"direct").await;
        assert_eq!(
            forwarded.load(Ordering::Relaxed),
            before,
            "nothing more through the relay"
        );
        // A side that moved still takes what its peer sends through the
        // relay (the peer may not have moved yet); a cleared route's session
        // is forgotten.
        a.set_route(b.local_addr(), Route::Relay { relay, token: ta });
        carries(&mut client_write, &mut server_read, b"relayed again").await;
        carries(&mut server_write, &mut client_read, b"direct reply").await;
        assert!(
            forwarded.load(Ordering::Relaxed) > before,
            "A sent through the relay"
        );
        let routes = &b.demux.routes;
        let now = Instant::now();
        assert!(routes.accept_relayed(a.local_addr(), relay, &tb, now));
        assert_eq!(b.relayed_heard_since(now), vec![a.local_addr()]);
        b.clear_route(a.local_addr());
        assert!(!routes.accept_relayed(a.local_addr(), relay, &tb, now));
        assert!(b.relayed_heard_since(now).is_empty());
    }

    #[tokio::test]
    async fn an_adopted_socket_carries_the_peers_session_and_punches() {
        let (a, b) = two_endpoints().await;
        // A's extra socket is A's address as far as B is concerned.
        let extra = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let extra_addr = extra.local_addr().unwrap();
        assert!(a.adopt(extra.clone(), b.local_addr()));
        assert_eq!(a.path_kind(b.local_addr()), PathKind::Birthday);

        let mut punches = b.punches();
        a.punch(b.local_addr()).await;
        let from = tokio::time::timeout(Duration::from_secs(5), punches.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(from, extra_addr, "the punch left from the adopted socket");

        let deadline = Instant::now() + Duration::from_secs(5);
        let (client, server) = tokio::join!(b.connect(extra_addr, deadline), a.accept());
        let (client, server) = (client.unwrap(), server.unwrap());
        assert_eq!(server.remote_addr(), b.local_addr());
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        carries(&mut client_write, &mut server_read, &[3u8; 4000]).await;
        carries(
            &mut server_write,
            &mut client_read,
            b"from the extra socket",
        )
        .await;

        // Without a route the reader lets the socket go: its port is free
        // again.
        a.clear_route(b.local_addr());
        drop(extra);
        eventually("the adopted socket is closed", || {
            std::net::UdpSocket::bind(extra_addr).is_ok()
        })
        .await;
    }

    #[test]
    fn timer_deadlines_move_up_to_the_next_grid_point_never_earlier() {
        let grid = Instant::now();
        for ms in [0u64, 1, 4, 5, 6, 9, 10, 11, 1234] {
            let at = grid + Duration::from_millis(ms) + Duration::from_micros(300);
            let on = on_grid(grid, at);
            assert!(on >= at && on - at <= TIMER_GRID, "{ms} ms");
            assert_eq!(
                on.duration_since(grid).as_nanos() % TIMER_GRID.as_nanos(),
                0
            );
        }
        // Deadlines in one grid step share one wake-up.
        let step = grid + TIMER_GRID * 7;
        assert_eq!(on_grid(grid, step - Duration::from_millis(4)), step);
        assert_eq!(on_grid(grid, step), step);
        // A deadline already past runs at the next point from the start.
        assert_eq!(on_grid(grid + TIMER_GRID, grid), grid + TIMER_GRID);
    }

    #[test]
    fn utp_packets_go_to_utp() {
        for first in [0x01u8, 0x11, 0x21, 0x31, 0x41] {
            let mut packet = [0u8; 20];
            packet[0] = first;
            assert_eq!(classify(&packet), Datagram::Utp, "{first:#x}");
        }
        let mut bad_version = [0u8; 20];
        bad_version[0] = 0x42;
        assert_eq!(classify(&bad_version), Datagram::Garbage);
        let mut bad_type = [0u8; 20];
        bad_type[0] = 0x51;
        assert_eq!(classify(&bad_type), Datagram::Garbage);
    }
}

/// The socket's ICMP error queue (Linux `IP_RECVERR`, ip(7)).
mod icmp {
    use std::net::SocketAddr;
    use std::os::fd::AsRawFd;

    /// A datagram we sent to this address came back as ICMP destination
    /// unreachable (port, host, network or protocol).
    pub struct Unreachable(pub SocketAddr);

    /// Asks the kernel to queue ICMP errors for what `socket` sends.
    pub fn enable(socket: &std::net::UdpSocket) -> std::io::Result<()> {
        let (level, option) = match socket.local_addr()? {
            SocketAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_RECVERR),
            SocketAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_RECVERR),
        };
        let on: libc::c_int = 1;
        // SAFETY: a valid descriptor, and a pointer to an int of the size given.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                level,
                option,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// The address in `name`, if it is IPv4 or IPv6.
    pub(super) fn socket_addr(name: &libc::sockaddr_storage) -> Option<SocketAddr> {
        match libc::c_int::from(name.ss_family) {
            libc::AF_INET => {
                // SAFETY: the family says it is a sockaddr_in, which fits.
                let v4: libc::sockaddr_in = unsafe {
                    std::ptr::read_unaligned((name as *const libc::sockaddr_storage).cast())
                };
                let ip = std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
                Some(SocketAddr::from((ip, u16::from_be(v4.sin_port))))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says it is a sockaddr_in6, which fits.
                let v6: libc::sockaddr_in6 = unsafe {
                    std::ptr::read_unaligned((name as *const libc::sockaddr_storage).cast())
                };
                let ip = std::net::Ipv6Addr::from(v6.sin6_addr.s6_addr);
                Some(SocketAddr::from((ip, u16::from_be(v6.sin6_port))))
            }
            _ => None,
        }
    }

    /// Takes one entry off the error queue: `Some` for a destination
    /// unreachable, `None` for another error; `WouldBlock` when empty.
    pub fn next_error(socket: &impl AsRawFd) -> std::io::Result<Option<Unreachable>> {
        // SAFETY: all-zero is a valid sockaddr_storage and msghdr.
        let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut data = [0u8; 64];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // u64s: aligned for cmsghdr.
        let mut control = [0u64; 64];
        // SAFETY: as above.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: every pointer in msg points at a live buffer of the size
        // it states.
        let n = unsafe {
            libc::recvmsg(
                socket.as_raw_fd(),
                &mut msg,
                libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: msg was filled by recvmsg; the CMSG_* walk stays within
        // msg_controllen.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: non-null and within the control buffer.
            let header = unsafe { &*cmsg };
            let ours = (header.cmsg_level == libc::IPPROTO_IP
                && header.cmsg_type == libc::IP_RECVERR)
                || (header.cmsg_level == libc::IPPROTO_IPV6
                    && header.cmsg_type == libc::IPV6_RECVERR);
            if ours {
                // SAFETY: an IP_RECVERR message carries a sock_extended_err.
                let error: libc::sock_extended_err =
                    unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
                let unreachable = match error.ee_origin {
                    libc::SO_EE_ORIGIN_ICMP => error.ee_type == 3, // RFC 792
                    libc::SO_EE_ORIGIN_ICMP6 => error.ee_type == 1, // RFC 4443
                    _ => false,
                };
                if !unreachable {
                    return Ok(None);
                }
                // The original destination is in msg_name (ip(7)).
                return Ok(socket_addr(&name).map(Unreachable));
            }
            // SAFETY: as above.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
        Ok(None)
    }
}
