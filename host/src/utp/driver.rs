//! The tokio side of our uTP: the sans-IO [`Socket`] behind a mutex, the
//! wakers of the tasks waiting on it, and the stream types the RPC layer
//! reads and writes.
//!
//! The host's transport (`crate::transport`) owns the UDP socket: it hands
//! each uTP datagram to [`Utp::handle_datagram`], calls [`Utp::poll`] after
//! every batch, timer or [wake-up](Utp::wakeup) and sends what comes out.
//! Streams queue data and read it under the same mutex and wake the
//! transport when they leave something to send.
//!
//! A [`UtpWriteHalf`] is message-oriented: one `poll_write` queues the whole
//! buffer as one message (see [`super::connection`]), so one
//! `write_all(message)` starts a new packet and is never packed with
//! another message.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use super::connection::{ConnectionError, RecvError, SendError, State};
use super::socket::{ConnectLimit, ConnectionHandle, Socket, Transmit};

/// The tasks waiting on one connection.
#[derive(Default)]
struct Wakers {
    read: Option<Waker>,
    /// A blocked writer, or the task waiting for the handshake.
    write: Option<Waker>,
}

/// Everything behind the mutex. Wakers are not woken or dropped while it is
/// held: a waker's code is not ours, and dropping the last reference to a
/// task may drop a stream, whose drop takes the mutex again.
struct Inner {
    socket: Socket,
    wakers: HashMap<ConnectionHandle, Wakers>,
    acceptors: Vec<Waker>,
    /// The transport stopped: every operation fails.
    stopped: bool,
}

/// One socket's uTP, shared by the transport's task and every stream.
pub struct Utp {
    inner: Mutex<Inner>,
    wakeup: Notify,
}

impl std::fmt::Debug for Utp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Utp").finish_non_exhaustive()
    }
}

fn io_error(e: ConnectionError) -> io::Error {
    let kind = match e {
        ConnectionError::Reset => io::ErrorKind::ConnectionReset,
        ConnectionError::Refused => io::ErrorKind::ConnectionRefused,
        ConnectionError::PeerSilent
        | ConnectionError::Idle
        | ConnectionError::Unverified
        | ConnectionError::Unanswered => io::ErrorKind::TimedOut,
        ConnectionError::Aborted => io::ErrorKind::ConnectionAborted,
        ConnectionError::Unreachable => io::ErrorKind::HostUnreachable,
    };
    io::Error::new(kind, e)
}

/// Which task of a connection waits.
enum Side {
    Read,
    /// A writer, or the task waiting for the handshake.
    Write,
}

/// Files the task's waker for `handle` and returns `Pending`; the waker it
/// replaces is dropped after the mutex is released.
fn park<T>(
    mut inner: MutexGuard<'_, Inner>,
    handle: ConnectionHandle,
    side: Side,
    cx: &Context<'_>,
) -> Poll<T> {
    let wakers = inner.wakers.entry(handle).or_default();
    let slot = match side {
        Side::Read => &mut wakers.read,
        Side::Write => &mut wakers.write,
    };
    let old = slot.replace(cx.waker().clone());
    drop(inner);
    drop(old);
    Poll::Pending
}

fn stopped_error() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the host's socket stopped")
}

impl Utp {
    /// A uTP socket with no connections yet.
    pub fn new() -> Arc<Utp> {
        Arc::new(Utp {
            inner: Mutex::new(Inner {
                socket: Socket::new(Instant::now(), rand::random()),
                wakers: HashMap::new(),
                acceptors: Vec::new(),
                stopped: false,
            }),
            wakeup: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- The transport's side. ----

    /// Handles one received uTP datagram.
    pub fn handle_datagram(&self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        self.lock().socket.handle_datagram(now, from, datagram);
    }

    /// The kernel reported `peer` unreachable: see
    /// [`Socket::peer_unreachable`].
    pub fn peer_unreachable(&self, peer: SocketAddr) {
        let failed = self.lock().socket.peer_unreachable(peer);
        if failed > 0 {
            self.wakeup.notify_one();
        }
    }

    /// `from` punched us: connects to it are on a SYN budget until it
    /// answers (see [`Socket::note_punch`]).
    pub fn note_punch(&self, now: Instant, from: SocketAddr) {
        self.lock().socket.note_punch(now, from);
    }

    /// Runs due timers, moves every datagram to send into `out`, wakes the
    /// tasks that have something new to see, and returns when to call
    /// again at the latest.
    pub fn poll(&self, now: Instant, out: &mut Vec<Transmit>) -> Option<Instant> {
        let mut to_wake = Vec::new();
        let next = {
            let mut inner = self.lock();
            let inner = &mut *inner;
            inner.socket.handle_timeout(now);
            while let Some(transmit) = inner.socket.poll_transmit(now) {
                out.push(transmit);
            }
            for handle in inner.socket.drain_woken() {
                if let Some(w) = inner.wakers.get_mut(&handle) {
                    to_wake.extend(w.read.take());
                    to_wake.extend(w.write.take());
                }
            }
            if inner.socket.can_accept() {
                to_wake.append(&mut inner.acceptors);
            }
            inner.socket.poll_timeout()
        };
        to_wake.into_iter().for_each(Waker::wake);
        next
    }

    /// Wakes the socket's task to [`poll`](Self::poll) (a datagram was
    /// handled outside it, e.g. from an adopted socket).
    pub fn wake(&self) {
        self.wakeup.notify_one();
    }

    /// Resolves when a stream left something to send.
    pub async fn wakeup(&self) {
        self.wakeup.notified().await
    }

    /// The host is going away: every open connection sends its FIN after
    /// its queued data; returns the packets that can leave now (the caller
    /// sends them without waiting, then [`stop`](Self::stop)s).
    pub fn shutdown_all(&self, now: Instant) -> Vec<Transmit> {
        let mut inner = self.lock();
        inner.socket.shutdown_all();
        std::iter::from_fn(|| inner.socket.poll_transmit(now)).collect()
    }

    /// The transport is gone: every stream and waiting task fails from now
    /// on.
    pub fn stop(&self) {
        let (wakers, acceptors) = {
            let mut inner = self.lock();
            inner.stopped = true;
            (
                std::mem::take(&mut inner.wakers),
                std::mem::take(&mut inner.acceptors),
            )
        };
        for (_, w) in wakers {
            w.read.into_iter().chain(w.write).for_each(Waker::wake);
        }
        acceptors.into_iter().for_each(Waker::wake);
    }

    /// Counters and sizes, for status reports and tests.
    pub fn open_connections(&self) -> usize {
        self.lock().socket.open_connections()
    }

    /// The remote addresses of the open connections, each once.
    pub fn remotes(&self) -> Vec<SocketAddr> {
        self.lock().socket.remotes()
    }

    /// What the socket counted so far.
    pub fn stats(&self) -> super::SocketStats {
        self.lock().socket.stats()
    }

    // ---- The application's side. ----

    /// Starts opening a connection to `peer`; the SYN is re-sent every
    /// [`super::SYN_RETRY`] while the returned [`Connecting`] lives.
    pub fn connect(self: &Arc<Self>, peer: SocketAddr) -> Result<Connecting, ConnectLimit> {
        let handle = self.lock().socket.connect(Instant::now(), peer)?;
        self.wakeup.notify_one();
        Ok(Connecting {
            utp: Some(self.clone()),
            handle,
            peer,
        })
    }

    /// Waits for the next connection a peer opened.
    pub async fn accept(self: &Arc<Self>) -> io::Result<UtpStream> {
        std::future::poll_fn(|cx| {
            let mut inner = self.lock();
            if inner.stopped {
                return Poll::Ready(Err(stopped_error()));
            }
            if let Some(handle) = inner.socket.accept() {
                let remote = inner.socket.remote(handle).expect("accepted handles exist");
                return Poll::Ready(Ok(UtpStream::new(self.clone(), handle, remote)));
            }
            if !inner.acceptors.iter().any(|w| w.will_wake(cx.waker())) {
                inner.acceptors.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}

/// A connection being opened; dropping it abandons the attempt.
pub struct Connecting {
    utp: Option<Arc<Utp>>,
    handle: ConnectionHandle,
    peer: SocketAddr,
}

impl Connecting {
    fn utp(&self) -> &Arc<Utp> {
        self.utp.as_ref().expect("present until taken")
    }

    /// Resolves when the handshake completed, or failed (a RESET answered
    /// the SYN).
    pub async fn established(&self) -> Result<(), io::Error> {
        std::future::poll_fn(|cx| {
            let inner = self.utp().lock();
            if inner.stopped {
                return Poll::Ready(Err(stopped_error()));
            }
            match inner.socket.state(self.handle) {
                Some(State::Connected) => Poll::Ready(Ok(())),
                Some(State::Closed(e)) => {
                    Poll::Ready(Err(io_error(e.unwrap_or(ConnectionError::Aborted))))
                }
                None => Poll::Ready(Err(io_error(ConnectionError::Aborted))),
                Some(State::SynSent) => park(inner, self.handle, Side::Write, cx),
            }
        })
        .await
    }

    /// Sends the SYN again at once (the peer's punch says its NAT is open).
    pub fn resend_syn(&self) {
        self.utp().lock().socket.resend_syn(self.handle);
        self.utp().wakeup.notify_one();
    }

    /// How many SYNs this attempt sent.
    pub fn syn_count(&self) -> u32 {
        self.utp().lock().socket.syn_count(self.handle)
    }

    /// The peer's STATE carried our capability bit: it is a grenache-host
    /// and speaks the Noise sessions (docs/wire.md §8). Meaningful once
    /// [established](Self::established).
    pub fn peer_speaks_secure(&self) -> bool {
        self.utp().lock().socket.peer_speaks_secure(self.handle)
    }

    /// The stream of an [established](Self::established) connection.
    pub fn into_stream(mut self) -> UtpStream {
        let utp = self.utp.take().expect("present until taken");
        UtpStream::new(utp, self.handle, self.peer)
    }
}

impl Drop for Connecting {
    fn drop(&mut self) {
        if let Some(utp) = self.utp.take() {
            let mut inner = utp.lock();
            let wakers = inner.wakers.remove(&self.handle);
            inner.socket.release(Instant::now(), self.handle);
            drop(inner);
            drop(wakers);
        }
    }
}

/// What both halves of a stream share; the last one gone lets go of the
/// connection.
struct StreamShared {
    utp: Arc<Utp>,
    handle: ConnectionHandle,
    remote: SocketAddr,
}

impl Drop for StreamShared {
    fn drop(&mut self) {
        let mut inner = self.utp.lock();
        let wakers = inner.wakers.remove(&self.handle);
        inner.socket.release(Instant::now(), self.handle);
        drop(inner);
        drop(wakers);
        self.utp.wakeup.notify_one();
    }
}

impl StreamShared {
    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut inner = self.utp.lock();
        if inner.stopped {
            return Poll::Ready(Err(stopped_error()));
        }
        match inner.socket.recv(self.handle, buf.initialize_unfilled()) {
            Ok(n) => {
                buf.advance(n);
                let wake = inner.socket.wants_transmit();
                drop(inner);
                if wake {
                    self.utp.wakeup.notify_one();
                }
                Poll::Ready(Ok(()))
            }
            Err(RecvError::WouldBlock) => park(inner, self.handle, Side::Read, cx),
            Err(RecvError::Closed(e)) => Poll::Ready(Err(io_error(e))),
        }
    }

    fn poll_write(&self, cx: &mut Context<'_>, message: &[u8]) -> Poll<io::Result<usize>> {
        let mut inner = self.utp.lock();
        if inner.stopped {
            return Poll::Ready(Err(stopped_error()));
        }
        match inner.socket.send(self.handle, message) {
            Ok(n) => {
                drop(inner);
                self.utp.wakeup.notify_one();
                Poll::Ready(Ok(n))
            }
            Err(SendError::Full) => park(inner, self.handle, Side::Write, cx),
            Err(SendError::Finished) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "this side of the uTP connection finished writing",
            ))),
            Err(SendError::Closed(e)) => Poll::Ready(Err(io_error(e))),
        }
    }

    fn shutdown(&self) {
        self.utp.lock().socket.shutdown(self.handle);
        self.utp.wakeup.notify_one();
    }
}

/// One uTP connection: an [`AsyncRead`] byte stream in, and messages out
/// (one `poll_write` = one message, see the module documentation).
pub struct UtpStream {
    shared: Arc<StreamShared>,
}

impl UtpStream {
    fn new(utp: Arc<Utp>, handle: ConnectionHandle, remote: SocketAddr) -> UtpStream {
        UtpStream {
            shared: Arc::new(StreamShared {
                utp,
                handle,
                remote,
            }),
        }
    }

    /// The peer's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.shared.remote
    }

    /// The peer's SYN (or STATE, on a stream we opened) carried our
    /// capability bit: it is a grenache-host and speaks the Noise sessions
    /// (docs/wire.md §8); `false` for Node peers.
    pub fn peer_speaks_secure(&self) -> bool {
        let shared = &self.shared;
        shared.utp.lock().socket.peer_speaks_secure(shared.handle)
    }

    /// The read and write halves, usable from different tasks. Dropping
    /// the write half sends a FIN after the queued messages; dropping both
    /// lets go of the connection.
    pub fn split(self) -> (UtpReadHalf, UtpWriteHalf) {
        (
            UtpReadHalf {
                shared: self.shared.clone(),
            },
            UtpWriteHalf {
                shared: self.shared,
            },
        )
    }
}

/// The reading half of a [`UtpStream`].
pub struct UtpReadHalf {
    shared: Arc<StreamShared>,
}

/// The writing half of a [`UtpStream`]: one `poll_write` is one message.
pub struct UtpWriteHalf {
    shared: Arc<StreamShared>,
}

impl Drop for UtpReadHalf {
    fn drop(&mut self) {
        let shared = &self.shared;
        shared
            .utp
            .lock()
            .socket
            .close_read(Instant::now(), shared.handle);
        // Its timers may have moved (a finished connection starts to linger).
        shared.utp.wakeup.notify_one();
    }
}

impl Drop for UtpWriteHalf {
    fn drop(&mut self) {
        self.shared.shutdown();
    }
}

impl AsyncRead for UtpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.shared.poll_read(cx, buf)
    }
}

impl AsyncRead for UtpReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.shared.poll_read(cx, buf)
    }
}

impl AsyncWrite for UtpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        message: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.shared.poll_write(cx, message)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shared.shutdown();
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for UtpWriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        message: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.shared.poll_write(cx, message)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shared.shutdown();
        Poll::Ready(Ok(()))
    }
}

/// The stream types are used from several tasks of the RPC layer.
#[allow(dead_code)]
fn assert_send_sync() {
    fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<UtpStream>();
    is_send_sync::<UtpReadHalf>();
    is_send_sync::<UtpWriteHalf>();
    is_send_sync::<Connecting>();
}
