//! One UDP socket per host, carrying the uTP listener, the uTP dialers and
//! the punches and introductions.
//!
//! Sharing the socket is what makes NAT traversal work: the port the host
//! announces is the port its punches leave from, so the hole a punch opens is
//! the one the peer's uTP connection comes back through. Every received
//! datagram is sorted by [`classify`]: an exact punch goes to every punch
//! subscriber, an introduction message (see [`crate::nat`]) to the
//! introduction channel, a datagram that can be uTP goes to `librqbit-utp`,
//! and anything else is dropped and counted (it never reaches the uTP parser).

use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use librqbit_dualstack_sockets::PollSendToVectored;
use librqbit_utp::{SocketOpts, Transport, UtpSocket, UtpSocketUdp, UtpStream};
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc};

/// The punch datagram: `ÿ` in UTF-8, exactly the two bytes Grenache's
/// boxgloves sends (docs/wire.md §1).
pub const PUNCH: [u8; 2] = [0xC3, 0xBF];
/// Every introduction datagram starts with these bytes (never a uTP header:
/// `G` is not a uTP version-1 type byte, and never the 2-byte punch). What
/// follows is the introduction protocol's business ([`crate::nat`]).
pub const INTRODUCTION_MAGIC: [u8; 4] = *b"GRI1";
/// Larger introduction datagrams are dropped unread and counted.
pub const MAX_INTRODUCTION_DATAGRAM: usize = 1024;

/// Receive buffer for the shared socket; uTP throughput suffers badly with
/// the kernel default.
const RECV_BUFFER: usize = 4 << 20;
/// librqbit-utp sends a single SYN; a connect is re-issued this often until
/// the request's deadline.
pub const CONNECT_RETRY: Duration = Duration::from_millis(400);
/// A connection whose peer stops acknowledging data for this long is closed,
/// so requests sent to a host that died fail fast instead of at their deadline.
pub const PEER_SILENCE_LIMIT: Duration = Duration::from_secs(2);
/// The uTP header is 20 bytes.
const UTP_HEADER: usize = 20;
/// Punches a slow subscriber may fall behind by (it then misses the oldest).
const PUNCH_BACKLOG: usize = 256;
/// Introduction messages waiting for the host's driver; more are dropped.
const INTRODUCTION_BACKLOG: usize = 256;

/// Introduction datagrams received (magic included, at most
/// [`MAX_INTRODUCTION_DATAGRAM`] bytes), with their sender.
pub type Introductions = mpsc::Receiver<(SocketAddr, Vec<u8>)>;

/// What one received datagram is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datagram {
    /// Exactly `C3 BF`.
    Punch,
    /// Starts with [`INTRODUCTION_MAGIC`].
    Introduction,
    /// Long enough, version 1, a known packet type: hand it to uTP.
    Utp,
    /// Neither: drop it.
    Garbage,
}

/// Sorts a datagram (docs/wire.md §1, TV-1: only the exact two bytes are a
/// punch; nothing shorter than a uTP header reaches uTP).
pub fn classify(bytes: &[u8]) -> Datagram {
    if bytes == PUNCH {
        return Datagram::Punch;
    }
    if bytes.starts_with(&INTRODUCTION_MAGIC) {
        return Datagram::Introduction;
    }
    // First byte: packet type (0..=4) in the high nibble, version 1 in the low.
    match bytes.first() {
        Some(&b) if bytes.len() >= UTP_HEADER && b & 0x0F == 1 && b >> 4 <= 4 => Datagram::Utp,
        _ => Datagram::Garbage,
    }
}

/// Counters a host reports about its socket.
#[derive(Debug, Default)]
pub struct TransportStats {
    pub punches_received: AtomicU64,
    pub garbage_datagrams: AtomicU64,
}

/// The demultiplexing transport handed to librqbit-utp.
struct DemuxTransport {
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    punches: broadcast::Sender<SocketAddr>,
    introductions: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    stats: Arc<TransportStats>,
}

impl PollSendToVectored for DemuxTransport {
    fn poll_send_to_vectored(
        &self,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
        target: SocketAddr,
    ) -> Poll<std::io::Result<usize>> {
        // uTP hands every DATA packet over as header + payload slices; send
        // them with one sendmsg instead of copying them together first.
        let target = socket2::SockAddr::from(target);
        loop {
            if let Err(e) = std::task::ready!(self.socket.poll_send_ready(cx)) {
                return Poll::Ready(Err(e));
            }
            let sent = self.socket.try_io(tokio::io::Interest::WRITABLE, || {
                socket2::SockRef::from(&*self.socket).send_to_vectored(bufs, &target)
            });
            match sent {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }
}

impl Transport for DemuxTransport {
    // The trait asks for a future that is also Sync, which `async fn` cannot promise.
    #[allow(clippy::manual_async_fn)]
    fn recv_from<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = std::io::Result<(usize, SocketAddr)>> + Send + Sync + 'a {
        async move {
            loop {
                match self.socket.recv_from(buf).await {
                    Ok((n, from)) => match classify(&buf[..n]) {
                        Datagram::Utp => return Ok((n, from)),
                        Datagram::Punch => {
                            self.stats.punches_received.fetch_add(1, Ordering::Relaxed);
                            let _ = self.punches.send(from);
                        }
                        Datagram::Introduction if n <= MAX_INTRODUCTION_DATAGRAM => {
                            let _ = self.introductions.try_send((from, buf[..n].to_vec()));
                        }
                        Datagram::Introduction => {
                            self.stats.garbage_datagrams.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%from, len = n, "dropped an oversized introduction datagram");
                        }
                        Datagram::Garbage => {
                            self.stats.garbage_datagrams.fetch_add(1, Ordering::Relaxed);
                            tracing::trace!(%from, len = n, "dropped a datagram that is neither uTP nor a punch");
                        }
                    },
                    // An error returned here would stop the uTP dispatcher and
                    // every stream on the socket. ICMP errors (port
                    // unreachable after a peer died) are reported on the next
                    // receive: they concern one peer, never the socket.
                    Err(e) => {
                        tracing::debug!("receive error on the RPC socket (ignored): {e}");
                        tokio::task::yield_now().await;
                    }
                }
            }
        }
    }

    fn send_to<'a>(
        &'a self,
        buf: &'a [u8],
        target: SocketAddr,
    ) -> impl Future<Output = std::io::Result<usize>> + Send + Sync + 'a {
        self.socket.send_to(buf, target)
    }

    fn poll_send_to(
        &self,
        cx: &mut Context<'_>,
        buf: &[u8],
        target: SocketAddr,
    ) -> Poll<std::io::Result<usize>> {
        self.socket.poll_send_to(cx, buf, target)
    }

    fn bind_addr(&self) -> SocketAddr {
        self.local
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type ConnectFn = dyn Fn(SocketAddr) -> BoxFuture<librqbit_utp::Result<UtpStream>> + Send + Sync;
type AcceptFn = dyn Fn() -> BoxFuture<librqbit_utp::Result<UtpStream>> + Send + Sync;

/// Why a uTP connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no uTP answer from {peer} within {waited:?} ({attempts} attempts)")]
    Timeout {
        peer: SocketAddr,
        waited: Duration,
        attempts: u32,
    },
    #[error("uTP connect to {peer} failed: {reason}")]
    Failed { peer: SocketAddr, reason: String },
    /// Theory rules out a direct path between the two hosts' NATs.
    #[error("{0}")]
    Impossible(String),
}

/// The host's socket: uTP in both directions plus punches.
#[derive(Clone)]
pub struct Endpoint {
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    connect: Arc<ConnectFn>,
    accept: Arc<AcceptFn>,
    punches: broadcast::Sender<SocketAddr>,
    pub stats: Arc<TransportStats>,
}

/// librqbit-utp does not export its default environment type; obtain a value
/// of it through the public alias.
fn default_env<T, E: Default>(_: PhantomData<UtpSocket<T, E>>) -> E {
    E::default()
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
        if let Err(e) = socket2::SockRef::from(&std_socket).set_recv_buffer_size(RECV_BUFFER) {
            tracing::debug!("cannot raise SO_RCVBUF: {e}");
        }
        let socket = Arc::new(UdpSocket::from_std(std_socket)?);
        let local = socket.local_addr()?;
        let (introductions, introductions_rx) = mpsc::channel(INTRODUCTION_BACKLOG);
        let (punches, _) = broadcast::channel(PUNCH_BACKLOG);
        let stats = Arc::new(TransportStats::default());
        let transport = DemuxTransport {
            socket: socket.clone(),
            local,
            punches: punches.clone(),
            introductions,
            stats: stats.clone(),
        };
        let env = default_env(PhantomData::<UtpSocketUdp>);
        let utp = UtpSocket::new_with_opts(
            transport,
            env,
            SocketOpts {
                remote_inactivity_timeout: Some(PEER_SILENCE_LIMIT),
                ..SocketOpts::default()
            },
        )
        .map_err(|e| anyhow::anyhow!("cannot start uTP on {local}: {e}"))?;
        let for_connect = utp.clone();
        let endpoint = Endpoint {
            socket,
            local,
            connect: Arc::new(move |peer| {
                let utp = for_connect.clone();
                Box::pin(async move { utp.connect(peer).await })
            }),
            accept: Arc::new(move || {
                let utp = utp.clone();
                Box::pin(async move { utp.accept().await })
            }),
            punches,
            stats,
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

    /// Sends one punch to `peer`.
    pub async fn punch(&self, peer: SocketAddr) {
        if let Err(e) = self.socket.send_to(&PUNCH, peer).await {
            tracing::debug!(%peer, "punch not sent: {e}");
        }
    }

    /// Waits for the next incoming uTP connection.
    pub async fn accept(&self) -> librqbit_utp::Result<UtpStream> {
        (self.accept)().await
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
        let mut attempts = 0;
        let mut heard = false;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(ConnectError::Timeout {
                    peer,
                    waited: started.elapsed(),
                    attempts,
                });
            }
            attempts += 1;
            let wait = CONNECT_RETRY.min(deadline - now);
            let attempt = tokio::time::timeout(wait, (self.connect)(peer));
            let punched = async {
                match punches.as_mut() {
                    Some((rx, follow_port)) => punch_from(rx, peer, *follow_port, heard).await,
                    None => std::future::pending().await,
                }
            };
            let outcome = tokio::select! {
                outcome = attempt => outcome,
                from = punched => {
                    // The peer's NAT is open now: send a fresh SYN at once.
                    tracing::debug!(%peer, %from, "punched by the peer; connecting at once");
                    heard = true;
                    peer = from;
                    continue;
                }
            };
            match outcome {
                Ok(Ok(stream)) => return Ok((stream, peer)),
                Ok(Err(e)) => {
                    // Refused or reset: wait out the rest of this attempt,
                    // the peer may just be starting.
                    tracing::debug!(%peer, "uTP connect attempt {attempts} failed: {e}");
                    let rest = wait.saturating_sub(now.elapsed());
                    if Instant::now() + rest >= deadline {
                        return Err(ConnectError::Failed {
                            peer,
                            reason: e.to_string(),
                        });
                    }
                    tokio::time::sleep(rest).await;
                }
                Err(_) => {}
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

    fn hex(text: &str) -> Vec<u8> {
        let digits: String = text.split_whitespace().collect();
        (0..digits.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
            .collect()
    }

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
