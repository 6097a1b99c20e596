//! The RPC server: accepts uTP connections on the host's socket, decodes
//! requests through a [`MessageReader`], hands each to the host's
//! [`Services`] (the node routes them to plugins) and writes the reply on the
//! same connection, however long the answer takes (no keep-alive bytes,
//! docs/wire.md#heartbeat).
//!
//! A connection that sends something that is not a Grenache request is
//! closed and counted; everyone else keeps being served. A request must
//! arrive whole within [`REQUEST_TIMEOUT`] of its first bytes (plus time
//! for its size at [`MIN_REQUEST_RATE`]), and a
//! connection with nothing in flight that brings no new request for
//! [`IDLE_CONNECTION_TIMEOUT`] (its first one included) is closed: bytes
//! trickled in (slowloris) hold no slot for long. The server owns the
//! tasks of its connections and their requests: stopping it stops them all.
//!
//! Each connection is one task, and its requests run concurrently inside it
//! (up to [`MAX_IN_FLIGHT_PER_CONNECTION`]) rather than as tasks of their
//! own: no hand-off between tasks or threads per request (at 8 in flight
//! the host's CPU per request fell from 24–27 to 20–22 µs, BENCHMARKS.md).
//! Connections run in parallel on the runtime's threads; one connection's
//! requests share one thread, and a plugin computing for long yields at
//! every epoch tick so that the others move on.
//!
//! The first byte of a connection tells a secure session (`0x00`, the
//! magic of [`super::session`]) from a plaintext Grenache peer (a Node
//! peer: JSON); the first is answered with the Noise handshake (within
//! [`session::HANDSHAKE_TIMEOUT`]), the second read as before. A service
//! whose policy requires encryption answers plaintext requests with
//! [`ERR_ENCRYPTION_REQUIRED`].
//!
//! Stopping gracefully goes through its [`Drain`]: once draining, every new
//! request is answered at once with [`ERR_SHUTTING_DOWN`] while the requests
//! in flight run on; once closed, those still running are answered with the
//! same error instead of their result. The node decides when (see
//! `Node::shutdown`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use super::codec::{self, DecodeError, Request};
use super::connection::{MessageReader, ReadError};
use super::session::{self, SessionKeys, SessionReader, SessionStats, SessionWriter};
use crate::transport::Endpoint;

/// What answers the requests a server receives.
pub trait Services: Send + Sync + 'static {
    /// Answers one request from `peer` for `key` (a service name, or the
    /// `ip:port` a Node punch client calls): the result as JSON text, or
    /// the Grenache error string the caller receives.
    fn answer<'a>(
        &'a self,
        key: &'a str,
        payload: &'a str,
        peer: SocketAddr,
    ) -> BoxFuture<'a, Result<String, String>>;

    /// Whether `key`'s service takes requests only over a secure session
    /// (the policy's `require_encryption`); plaintext requests for it are
    /// answered with [`ERR_ENCRYPTION_REQUIRED`]. No service by default.
    fn requires_encryption(&self, key: &str) -> bool {
        let _ = key;
        false
    }
}

/// The error string of a plaintext request to a service whose policy
/// requires encryption.
pub const ERR_ENCRYPTION_REQUIRED: &str = "ERR_ENCRYPTION_REQUIRED";

/// Server counters.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Requests decoded and handed to the services.
    pub requests: AtomicU64,
    /// Requests the services answered with an error string.
    pub errors: AtomicU64,
    /// Connections closed because they did not speak Grenache or sent a
    /// message over the size limit.
    pub bad_connections: AtomicU64,
    /// Connections closed for sending no whole request in time
    /// ([`REQUEST_TIMEOUT`], [`IDLE_CONNECTION_TIMEOUT`]).
    pub timed_out_connections: AtomicU64,
    /// Secure and plaintext connections, failed handshakes, rejected
    /// frames.
    pub sessions: Arc<SessionStats>,
}

/// The error string of a request the host will not answer because it is
/// stopping; a caller should ask another peer.
pub const ERR_SHUTTING_DOWN: &str = "ERR_SHUTTING_DOWN";

/// Where a server is in stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Answering every request.
    Serving,
    /// New requests get [`ERR_SHUTTING_DOWN`]; those in flight run on.
    Draining,
    /// Requests still running are answered with [`ERR_SHUTTING_DOWN`] now.
    Closed,
}

/// The server's way to stop gracefully, shared between the server and
/// whoever stops it: the phase, and how many requests are in flight (decoded
/// and not yet answered).
#[derive(Debug)]
pub struct Drain {
    phase: watch::Sender<Phase>,
    /// A counter, not a channel: every request passes here twice, and only
    /// [`settled`](Drain::settled) waits on it (woken when it reaches 0).
    in_flight: AtomicUsize,
    settled: tokio::sync::Notify,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            phase: watch::Sender::new(Phase::Serving),
            in_flight: AtomicUsize::new(0),
            settled: tokio::sync::Notify::new(),
        }
    }
}

impl Drain {
    /// Requests decoded and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// The phase now.
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Moves on to `phase` (never back); returns the requests in flight then.
    pub fn enter(&self, phase: Phase) -> usize {
        self.phase.send_if_modified(|now| {
            let later = phase > *now;
            if later {
                *now = phase;
            }
            later
        });
        self.in_flight()
    }

    /// Waits until no request is in flight or `limit` has passed; returns
    /// how many are still in flight.
    pub async fn settled(&self, limit: std::time::Duration) -> usize {
        let none_left = async {
            loop {
                let settled = self.settled.notified();
                tokio::pin!(settled);
                // Registered before the check: a last request that ends
                // between the two still wakes us.
                settled.as_mut().enable();
                if self.in_flight() == 0 {
                    return;
                }
                settled.await;
            }
        };
        let _ = tokio::time::timeout(limit, none_left).await;
        self.in_flight()
    }

    /// Counts a request in flight until the returned guard is dropped.
    fn track(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Resolves once the phase is at least `phase`.
    async fn reached(&self, phase: Phase) {
        let mut rx = self.phase.subscribe();
        // The sender lives in `self`, so the wait ends only by the phase.
        let _ = rx.wait_for(|now| *now >= phase).await;
    }
}

/// One request in flight; dropping it counts it done.
struct InFlight(Arc<Drain>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.settled.notify_waiters();
        }
    }
}

/// Requests one connection may have in flight at once; the next is not
/// read until one of them is answered. A Grenache client multiplexes its
/// requests to a peer over one connection, so this is generous: four times
/// a plugin's default `max_concurrent`.
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 256;

/// A request must arrive whole within this long of its first bytes (the
/// first read after the previous request, whitespace included), plus the
/// time its bytes so far take at [`MIN_REQUEST_RATE`], or the connection
/// is closed: a peer trickling bytes (slowloris) loses its slot. A
/// Grenache client writes each request at once, in one message.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes per second a large request is given on top of
/// [`REQUEST_TIMEOUT`]: a 1 MiB request may take 10 s + 64 s.
pub const MIN_REQUEST_RATE: u64 = 16 * 1024;

/// A connection with no request in flight and no bytes of a new one is
/// closed after this long, counted from its opening or its last request.
/// Longer than [`REQUEST_TIMEOUT`] because callers open connections ahead
/// of their first request (`rpc::client` warms up untried peers) and keep
/// them for the next; such a connection is closed with a FIN, and the
/// caller opens a new one on its next request.
pub const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Secure handshakes one source IP may start with this server per second,
/// and at once. A handshake costs the server two X25519 operations and an
/// Ed25519 signature and check (0.43 ms of CPU each in a debug build,
/// measured with a flood from 14 IPs): without a rate, a few IPs sending SYN
/// and Noise message 1 could keep the host busy. A caller opens one
/// connection per peer and keeps it, so honest traffic stays far below;
/// over the rate, the connection is dropped unanswered and counted
/// (`rate_limited_handshakes`), and the caller's next attempt may pass.
pub const HANDSHAKES_PER_IP_PER_SECOND: u32 = 50;
/// See [`HANDSHAKES_PER_IP_PER_SECOND`].
pub const HANDSHAKE_BURST_PER_IP: u32 = 100;
/// Source IPs whose handshake rate is remembered; the least recently seen
/// is forgotten first.
const HANDSHAKE_RATE_IPS: usize = 4_096;

/// The per-IP handshake budgets of one server.
type HandshakeRates = std::sync::Mutex<crate::units::TokenBuckets<std::net::IpAddr>>;

/// Accepts connections until dropped; dropping the future stops every
/// connection it accepted. `drain` stops it gracefully (see [`Drain`]).
/// `keys` are what this host proves itself with in secure sessions.
pub async fn serve(
    endpoint: Endpoint,
    services: Arc<dyn Services>,
    max_message: usize,
    stats: Arc<ServerStats>,
    drain: Arc<Drain>,
    keys: Arc<SessionKeys>,
) {
    let mut connections = tokio::task::JoinSet::new();
    let rates: Arc<HandshakeRates> =
        Arc::new(std::sync::Mutex::new(crate::units::TokenBuckets::new(
            HANDSHAKES_PER_IP_PER_SECOND,
            HANDSHAKE_BURST_PER_IP,
            HANDSHAKE_RATE_IPS,
        )));
    loop {
        // Reap finished connections so the set stays as small as the live ones.
        while connections.try_join_next().is_some() {}
        match endpoint.accept().await {
            Ok(stream) => {
                let services = services.clone();
                let (stats, drain, keys) = (stats.clone(), drain.clone(), keys.clone());
                let rates = rates.clone();
                connections.spawn(async move {
                    let limits = (max_message, &*rates);
                    serve_connection(stream, services, limits, stats, drain, &keys).await
                });
            }
            Err(e) => {
                tracing::warn!("accepting a uTP connection failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(
    stream: crate::utp::UtpStream,
    services: Arc<dyn Services>,
    (max_message, rates): (usize, &HandshakeRates),
    stats: Arc<ServerStats>,
    drain: Arc<Drain>,
    keys: &SessionKeys,
) {
    let peer = stream.remote_addr();
    let (mut reader, writer) = stream.split();
    // The first byte says which protocol: a secure session's magic, or
    // the JSON of a plaintext peer. It must come within the idle limit.
    let mut first = [0u8; 1];
    match tokio::time::timeout(IDLE_CONNECTION_TIMEOUT, reader.read(&mut first)).await {
        Ok(Ok(1)) => {}
        Ok(_) => return,
        Err(_) => {
            stats.timed_out_connections.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    let secure = first[0] == session::MAGIC[0];
    let (reader, writer) = if secure {
        let allowed = rates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(peer.ip(), std::time::Instant::now());
        if !allowed {
            stats
                .sessions
                .rate_limited_handshakes
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "secure handshake refused: its IP is over {HANDSHAKES_PER_IP_PER_SECOND}/s");
            return;
        }
        let handshake = session::respond(reader, &first, writer, keys);
        match tokio::time::timeout(session::HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(s)) => {
                stats.sessions.secure.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, peer_key = %session::hex(s.peer.as_bytes()), "secure session");
                let reader = s.reader.counted_in(stats.sessions.clone());
                (
                    SessionReader::Secure(reader),
                    SessionWriter::Secure(s.writer),
                )
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e,
                    _ => session::HandshakeError::Timeout,
                };
                stats
                    .sessions
                    .failed_handshakes
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, "secure handshake failed: {why}");
                return;
            }
        }
    } else {
        stats.sessions.plaintext.fetch_add(1, Ordering::Relaxed);
        (SessionReader::Plain(reader), SessionWriter::Plain(writer))
    };
    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    let mut reader = MessageReader::new(reader, max_message);
    if !secure {
        reader.push_received(&first);
    }
    // Requests in flight on this connection; they finish even after the
    // peer stops sending.
    let mut requests = FuturesUnordered::new();
    // When the connection last had something to do: opened, a request
    // read or answered. With nothing in flight and no bytes of a new
    // request it must bring one within IDLE_CONNECTION_TIMEOUT from then.
    let mut active_since = tokio::time::Instant::now();
    // When the first bytes after the last whole request arrived, and how
    // many have arrived since.
    let mut partial_since: Option<tokio::time::Instant> = None;
    let mut partial_bytes: u64 = 0;
    let problem = loop {
        while let Some(Some(())) = requests.next().now_or_never() {
            active_since = tokio::time::Instant::now();
        }
        // A peer that pipelines requests faster than they are answered (or
        // never reads its replies, so that each waits for the writer) is
        // not read further until one finishes: its bytes wait in uTP's
        // window instead of as tasks in our memory.
        while requests.len() >= MAX_IN_FLIGHT_PER_CONNECTION {
            requests.next().await;
            active_since = tokio::time::Instant::now();
        }
        let next = match reader.next_buffered() {
            Ok(Some(message)) => Ok(Some(message)),
            Err(e) => Err(ReadError::Decode(e)),
            Ok(None) => {
                let (deadline, limit) = match partial_since {
                    Some(since) => {
                        let limit = REQUEST_TIMEOUT
                            + Duration::from_secs_f64(
                                partial_bytes as f64 / MIN_REQUEST_RATE as f64,
                            );
                        (Some(since + limit), limit)
                    }
                    None => (
                        requests
                            .is_empty()
                            .then(|| active_since + IDLE_CONNECTION_TIMEOUT),
                        IDLE_CONNECTION_TIMEOUT,
                    ),
                };
                tokio::select! {
                    // Cancel-safe: one read, whose bytes reach the decoder.
                    more = reader.read_more() => match more {
                        Ok(0) => Ok(None),
                        Ok(n) => {
                            partial_since.get_or_insert_with(tokio::time::Instant::now);
                            partial_bytes += n as u64;
                            continue;
                        }
                        Err(e) => Err(ReadError::Io(e)),
                    },
                    Some(()) = requests.next(), if !requests.is_empty() => {
                        active_since = tokio::time::Instant::now();
                        continue;
                    }
                    () = sleep_until_some(deadline) => {
                        stats.timed_out_connections.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "closing a connection that brought no whole request for {limit:?}");
                        while requests.next().await.is_some() {}
                        return;
                    }
                }
            }
        };
        active_since = tokio::time::Instant::now();
        partial_since = None;
        partial_bytes = 0;
        let request = match next {
            Ok(Some(value)) => match codec::parse_request(&value) {
                Ok(request) => request,
                Err(e) => break e,
            },
            Ok(None) | Err(ReadError::Io(_)) => {
                while requests.next().await.is_some() {}
                return;
            }
            Err(ReadError::Decode(e)) => break e,
        };
        stats.requests.fetch_add(1, Ordering::Relaxed);
        if !secure && services.requires_encryption(&request.key) {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            let reply = codec::encode_err(&request.rid, &encryption_required(&request.key));
            if let Err(e) = writer.lock().await.write_message(&reply).await {
                tracing::debug!(%peer, "reply to {} not sent: {e}", request.rid);
            }
            continue;
        }
        if drain.phase() != Phase::Serving {
            // Stopping: say so at once rather than leave the caller to time out.
            stats.errors.fetch_add(1, Ordering::Relaxed);
            let reply = codec::encode_err(&request.rid, &shutting_down("takes no new requests"));
            if let Err(e) = writer.lock().await.write_message(&reply).await {
                tracing::debug!(%peer, "reply to {} not sent: {e}", request.rid);
            }
            continue;
        }
        let in_flight = drain.track();
        let (services, writer, stats) = (services.clone(), writer.clone(), stats.clone());
        let drain = drain.clone();
        requests.push(async move {
            // However long the answer takes, the connection waits: our uTP
            // gives up on a silent peer only while our own data is
            // unacknowledged (docs/wire.md §4.1). Only closing the server
            // cuts it short.
            let reply = tokio::select! {
                reply = answer(&*services, &request, peer, &stats) => reply,
                () = drain.reached(Phase::Closed) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    codec::encode_err(&request.rid, &shutting_down("stopped before this request finished"))
                }
            };
            // One whole message per write (docs/wire.md §3).
            if let Err(e) = writer.lock().await.write_message(&reply).await {
                tracing::debug!(%peer, "reply to {} not sent: {e}", request.rid);
            }
            drop(in_flight);
        });
    };
    stats.bad_connections.fetch_add(1, Ordering::Relaxed);
    if let DecodeError::TooLarge {
        limit,
        rid: Some(rid),
    } = &problem
    {
        let reply = codec::encode_err(
            rid.as_str(),
            &format!("request too large: more than {limit} bytes"),
        );
        let _ = writer.lock().await.write_message(&reply).await;
    }
    tracing::warn!(%peer, "closing a connection that {problem}", problem = describe(&problem));
    while requests.next().await.is_some() {}
}

/// Sleeps until `deadline`, forever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The error string of a plaintext request to a service that requires
/// encryption.
fn encryption_required(service: &str) -> String {
    format!(
        "{ERR_ENCRYPTION_REQUIRED}: {service} takes requests only over an encrypted session; \
         call it from a grenache-host (which encrypts toward our hosts), not over plaintext Grenache"
    )
}

/// The error string of a request refused or cut short by stopping.
fn shutting_down(what: &str) -> String {
    format!("{ERR_SHUTTING_DOWN}: this host is stopping and {what}; ask another peer")
}

fn describe(e: &DecodeError) -> String {
    match e {
        DecodeError::TooLarge { limit, .. } => {
            format!("sent a message over the {limit}-byte limit")
        }
        other => format!("does not speak Grenache ({other})"),
    }
}

/// The reply to one request, encoded.
async fn answer(
    services: &dyn Services,
    request: &Request,
    peer: SocketAddr,
    stats: &ServerStats,
) -> Vec<u8> {
    match services.answer(&request.key, &request.payload, peer).await {
        Ok(result) => codec::encode_ok(&request.rid, &result),
        Err(message) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            codec::encode_err(&request.rid, &message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::client::RpcClient;
    use crate::rpc::RpcError;
    use tokio::io::AsyncWriteExt;

    /// Answers `slow` only when told to, anything else at once.
    struct Gate(tokio::sync::Notify);

    impl Services for Gate {
        fn answer<'a>(
            &'a self,
            key: &'a str,
            payload: &'a str,
            _peer: SocketAddr,
        ) -> BoxFuture<'a, Result<String, String>> {
            Box::pin(async move {
                if key == "slow" {
                    self.0.notified().await;
                }
                Ok(payload.to_string())
            })
        }
    }

    /// `serve` on loopback answering through a [`Gate`], with its drain.
    struct GatedServer {
        addr: SocketAddr,
        drain: Arc<Drain>,
        gate: Arc<Gate>,
        serving: tokio::task::JoinHandle<()>,
    }

    impl GatedServer {
        async fn start() -> Self {
            let (server, _) = Endpoint::bind("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
            let addr = server.local_addr();
            let drain = Arc::new(Drain::default());
            let gate = Arc::new(Gate(tokio::sync::Notify::new()));
            let serving = tokio::spawn(serve(
                server,
                gate.clone(),
                1 << 20,
                Arc::default(),
                drain.clone(),
                Arc::new(SessionKeys::ephemeral()),
            ));
            GatedServer {
                addr,
                drain,
                gate,
                serving,
            }
        }
    }

    /// Waits (10 s at most) until the requests in flight satisfy `enough`.
    async fn in_flight_reaches(drain: &Drain, enough: impl Fn(usize) -> bool) {
        let what = "the requests in flight reach the count";
        crate::units::eventually(what, Duration::from_secs(10), || enough(drain.in_flight())).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_ip_over_its_handshake_rate_is_dropped_and_another_ip_is_not() {
        let (server, _) = Endpoint::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = server.local_addr();
        let stats: Arc<ServerStats> = Arc::default();
        let serving = tokio::spawn(serve(
            server,
            Arc::new(Gate(tokio::sync::Notify::new())),
            1 << 20,
            stats.clone(),
            Arc::default(),
            Arc::new(SessionKeys::ephemeral()),
        ));
        let client_keys = SessionKeys::ephemeral();
        // One handshake from `from`: whether it completed.
        let handshake = |from: Endpoint| {
            let keys = &client_keys;
            async move {
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                let stream = from.connect(addr, deadline).await.unwrap();
                let (reader, writer) = stream.split();
                let done = session::initiate(reader, writer, keys, |_| Ok::<(), ()>(()));
                matches!(
                    tokio::time::timeout(Duration::from_secs(5), done).await,
                    Ok(Ok(Ok(_)))
                )
            }
        };
        let (flooder, _) = Endpoint::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let attempts = HANDSHAKE_BURST_PER_IP as usize + 30;
        let mut completed = 0;
        for _ in 0..attempts {
            completed += usize::from(handshake(flooder.clone()).await);
        }
        let allowed = HANDSHAKE_BURST_PER_IP as f64
            + HANDSHAKES_PER_IP_PER_SECOND as f64 * started.elapsed().as_secs_f64();
        assert!(
            completed as f64 <= allowed + 1.0,
            "{completed} of {attempts}, {allowed:.0} allowed"
        );
        let refused = stats
            .sessions
            .rate_limited_handshakes
            .load(Ordering::Relaxed);
        assert!(refused >= 1, "some were refused");
        assert_eq!(completed as u64 + refused, attempts as u64);
        // Another source IP has its own budget.
        let (other, _) = Endpoint::bind("127.0.0.2:0".parse().unwrap())
            .await
            .unwrap();
        assert!(handshake(other).await, "another IP still gets a session");
        serving.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_connection_cannot_pile_up_requests_without_bound() {
        // 1000 requests pipelined on one uTP connection to a service that
        // does not answer: the server reads only as many as it may hold in
        // flight, and still answers other connections.
        let any = "127.0.0.1:0".parse().unwrap();
        let GatedServer {
            addr,
            drain,
            gate: _,
            serving,
        } = GatedServer::start().await;
        let (flooder, _) = Endpoint::bind(any).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let stream = flooder.connect(addr, deadline.into_std()).await.unwrap();
        let (_read, mut write) = stream.split();
        let mut burst = Vec::new();
        for _ in 0..1000 {
            burst.extend(codec::encode_request(&codec::new_rid(), "slow", "1"));
        }
        write.write_all(&burst).await.unwrap();
        in_flight_reaches(&drain, |n| n >= MAX_IN_FLIGHT_PER_CONNECTION).await;
        // Another caller is served meanwhile; by then the flood's bytes
        // have long arrived, and the server still holds only the cap.
        let (client, _) = Endpoint::bind(any).await.unwrap();
        let client = RpcClient::new(client, None, 1 << 20);
        for _ in 0..3 {
            let reply = client
                .request_peer(addr, "fast", "7", Duration::from_secs(10))
                .await;
            assert_eq!(reply.unwrap(), "7");
        }
        assert_eq!(drain.in_flight(), MAX_IN_FLIGHT_PER_CONNECTION);
        serving.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn draining_refuses_new_requests_and_closing_answers_those_in_flight() {
        let any = "127.0.0.1:0".parse().unwrap();
        let GatedServer {
            addr,
            drain,
            gate,
            serving,
        } = GatedServer::start().await;
        let (client, _) = Endpoint::bind(any).await.unwrap();
        let client = RpcClient::new(client, None, 1 << 20);
        let ask = |key: &'static str| {
            let client = client.clone();
            async move {
                client
                    .request_peer(addr, key, "7", Duration::from_secs(10))
                    .await
            }
        };
        assert_eq!(ask("fast").await.unwrap(), "7");

        // Two requests in flight, then draining: a new one is refused at once.
        let first = tokio::spawn(ask("slow"));
        let second = tokio::spawn(ask("slow"));
        in_flight_reaches(&drain, |n| n == 2).await;
        assert_eq!(drain.enter(Phase::Draining), 2);
        match ask("fast").await {
            Err(RpcError::Remote(m)) => assert!(m.starts_with(ERR_SHUTTING_DOWN), "{m}"),
            other => panic!("{other:?}"),
        }
        // One finishes within the drain and gets its answer; the other is
        // still running when the server closes and gets the error.
        gate.0.notify_one();
        in_flight_reaches(&drain, |n| n == 1).await;
        drain.enter(Phase::Closed);
        let mut replies = [first.await.unwrap(), second.await.unwrap()];
        replies.sort_by_key(|r| r.is_err());
        assert_eq!(replies[0].as_deref().unwrap(), "7");
        match &replies[1] {
            Err(RpcError::Remote(m)) => {
                assert!(m.contains("stopped before this request finished"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(drain.settled(Duration::from_secs(5)).await, 0);
        // Phases never go back.
        assert_eq!(
            (drain.enter(Phase::Serving), drain.phase()),
            (0, Phase::Closed)
        );
        serving.abort();
    }
}
