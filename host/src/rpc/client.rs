//! The RPC client: sends Grenache requests to peers and matches replies.
//!
//! One uTP connection per peer is opened on demand and reused; a task per
//! connection reads replies through a [`MessageReader`], wakes the matching
//! request and expires the requests whose deadline passed. A request
//! by service name looks the service up and races connects to its peers,
//! staggered as happy eyeballs does (RFC 8305): those that answered before
//! first, then the others with IPs taking turns in a random order (each
//! IP's in the directory's order), those that failed recently last ([`super::health`]); a dead entry costs
//! [`ATTEMPT_DELAY`], not a timeout. All within the request's deadline.
//!
//! With an introducer (see [`crate::nat`]), every new connection
//! starts with an introduction: a peer behind a NAT is punched open from both
//! sides and connected to at the address its NAT really uses. If such a path
//! goes silent (the NAT forgot it) before a request got any answer, the
//! request is sent once more over a freshly introduced path.
//!
//! With session keys ([`RpcClient::with_session_keys`]), a connection to a
//! peer whose uTP handshake carried our capability bit runs a Noise session
//! ([`super::session`]) within [`session::HANDSHAKE_TIMEOUT`]; toward other
//! peers (Node) it stays plaintext. A request may pin the identities
//! allowed to answer it ([`PinnedKeys`]): a peer that is not ours or proves
//! another key is skipped as a dead one is, with an error naming the key it
//! proved.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::seq::SliceRandom;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

use super::codec::{self, Reply};
use super::connection::{MessageReader, ReadCount, ReadError};
use super::health::{spread_by_ip, PeerHealth};
use super::pending::Pending;
use super::session::{self, PinnedKeys, SessionKeys, SessionReader, SessionStats, SessionWriter};
use super::RpcError;
use crate::discovery::Discovery;
use crate::nat::birthday;
use crate::nat::kind::BirthdayRole;
use crate::nat::{IntroResult, IntroductionHandle, IntroductionStats, NatKind};
use crate::transport::{ConnectError, Endpoint};

/// When several peers serve a service, how long one connect attempt may
/// take (the last candidate's may take all the time left).
const CONNECT_BUDGET_PER_PEER: Duration = Duration::from_millis(1500);
/// When several peers serve a service, how long after one connect attempt
/// the next starts if the first has not connected yet: RFC 8305's
/// recommended minimum "Connection Attempt Delay" (§5). A round trip on a
/// LAN, or an introduction and punch between two NATs in one region, fits;
/// a slower peer still wins if it connects first.
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(100);
/// Most connect attempts of one request running at once: what a directory
/// full of dead entries can make one request send (a SYN each, re-sent on
/// uTP's schedule).
const MAX_ATTEMPTS_AT_ONCE: usize = 8;
/// When every peer of a service failed and time is left, the lookup is
/// made again after this long, doubling up to [`MAX_RELOOKUP_WAIT`]: a
/// restarted host announces its new address within a second or two.
const RELOOKUP_WAIT: Duration = Duration::from_millis(250);
/// See [`RELOOKUP_WAIT`].
const MAX_RELOOKUP_WAIT: Duration = Duration::from_secs(1);
/// Most background connects to untried peers one client runs at once.
const MAX_WARMING: u64 = 2;
/// How long a lookup may take out of a request's deadline.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a connect to a punched path may take (at most half the time
/// left) before it counts as failed and the introducer is asked to relay:
/// punches that can meet do so within milliseconds of the introduction, and
/// a punch request lost on its way is re-sent at the peer's next
/// registration.
pub const PUNCHED_CONNECT_BUDGET: Duration = Duration::from_secs(2);

/// How long a new secure connection holds message 3 of its handshake for
/// a first request to carry; then it is sent alone.
const MESSAGE_3_GRACE: Duration = Duration::from_millis(50);

/// How often requests on an introduced path tell the introductions that it
/// is in use (its keepalive lasts minutes after the last use; telling it at
/// every request would wake its driver at every request).
const USE_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Wakes a request: `Some(reply)`, or `None` when its deadline passed.
type Waiter = oneshot::Sender<Option<Reply>>;
/// A connection just opened or found open, with when the introducer
/// answered if this call opened it through an introduction.
type Opened = (Arc<Connection>, Option<Instant>);
/// The connection to one peer, if open; locked while connecting.
type PeerSlot = Arc<tokio::sync::Mutex<Option<Arc<Connection>>>>;

/// One open connection to a peer.
struct Connection {
    writer: tokio::sync::Mutex<SessionWriter<crate::utp::UtpWriteHalf>>,
    /// The identity the peer proved in a secure session; `None` for a
    /// plaintext one.
    peer_key: Option<ed25519_dalek::VerifyingKey>,
    pending: Mutex<Pending<Waiter>>,
    /// Wakes the connection task to re-arm its timer for a new request.
    deadline_added: tokio::sync::Notify,
    /// The address of a path opened by an introduction.
    introduced: Option<SocketAddr>,
    /// How many times the peer has sent us something on this connection.
    reads: ReadCount,
    opened: Instant,
    /// When use of the path was last reported, in seconds after `opened`.
    use_reported: AtomicU64,
}

impl Connection {
    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Pending<Waiter>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_closed(&self) -> bool {
        self.lock_pending().is_closed()
    }

    fn reads(&self) -> u64 {
        self.reads.get()
    }

    /// The introduced path's address, if its use is due to be reported.
    fn use_to_report(&self) -> Option<SocketAddr> {
        let addr = self.introduced?;
        let now = self.opened.elapsed().as_secs();
        let last = self.use_reported.load(Ordering::Relaxed);
        let due = now >= last + USE_REPORT_INTERVAL.as_secs();
        (due && self
            .use_reported
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok())
        .then_some(addr)
    }
}

/// Sends requests and matches replies; cheap to clone.
#[derive(Clone)]
pub struct RpcClient {
    endpoint: Endpoint,
    discovery: Option<Arc<dyn Discovery>>,
    /// Per peer, a slot holding its connection; the slot's lock serialises
    /// connecting so concurrent requests share one connection.
    connections: Arc<Mutex<HashMap<SocketAddr, PeerSlot>>>,
    max_message: usize,
    introductions: Option<IntroductionHandle>,
    /// Which peers failed recently: they are tried last.
    health: Arc<PeerHealth>,
    /// The paths this client opened, by kind.
    paths: Arc<PathStats>,
    /// Background connects under way ([`Self::warm_up`]).
    warming: Arc<AtomicU64>,
    /// What this client proves itself with; `None`: plaintext only.
    keys: Option<Arc<SessionKeys>>,
    /// Secure and plaintext connections, failed handshakes, rejected frames.
    sessions: Arc<SessionStats>,
    /// Peers that completed a secure session lately ([`SECURE_MEMORY`]):
    /// one of them offering plaintext is refused as a downgrade.
    secure_peers:
        Arc<std::sync::Mutex<HashMap<SocketAddr, (ed25519_dalek::VerifyingKey, Instant)>>>,
}

/// The connections a client opened, by the kind of path they took.
#[derive(Debug, Default)]
pub struct PathStats {
    /// Connected to the peer's address as announced.
    pub direct: AtomicU64,
    /// Connected to the address an introduction named, through the hole
    /// both sides punched.
    pub punched: AtomicU64,
    /// Connected through the introducer's relay.
    pub relayed: AtomicU64,
}

/// How a connection opened through an introduction goes.
#[derive(Clone, Copy)]
struct Introduced {
    /// The peer's address on the path (as its NAT maps it).
    addr: SocketAddr,
    /// When the introducer answered; for a relayed path, when this host
    /// learnt that it needs the relay.
    at: Instant,
    /// Through the introducer's relay.
    relayed: bool,
}

impl RpcClient {
    /// A client on `endpoint`'s socket; `discovery` is needed for requests by
    /// service name.
    pub fn new(
        endpoint: Endpoint,
        discovery: Option<Arc<dyn Discovery>>,
        max_message: usize,
    ) -> Self {
        RpcClient {
            endpoint,
            discovery,
            connections: Arc::default(),
            max_message,
            introductions: None,
            health: Arc::default(),
            paths: Arc::default(),
            warming: Arc::default(),
            keys: None,
            sessions: Arc::default(),
            secure_peers: Arc::default(),
        }
    }

    /// Runs secure sessions toward our hosts, proving `keys` (see the
    /// module documentation).
    pub fn with_session_keys(mut self, keys: Arc<SessionKeys>) -> Self {
        self.keys = Some(keys);
        self
    }

    /// This client's session counters.
    pub fn session_stats(&self) -> Arc<SessionStats> {
        self.sessions.clone()
    }

    /// How the introductions this client asked for ended; zeros without
    /// introductions.
    pub fn introduction_stats(&self) -> Arc<IntroductionStats> {
        self.introductions
            .as_ref()
            .map(|i| i.stats.clone())
            .unwrap_or_default()
    }

    /// The paths this client opened so far, by kind.
    pub fn paths(&self) -> Arc<PathStats> {
        self.paths.clone()
    }

    /// Opens new connections through introductions (see the module doc).
    pub fn with_introductions(mut self, introductions: IntroductionHandle) -> Self {
        self.introductions = Some(introductions);
        self
    }

    /// Looks `service` up and sends `payload` to the first of its peers to
    /// accept a connection: peers that answered recently first, then the
    /// others with IPs taking turns, failed ones last, connects staggered
    /// by [`ATTEMPT_DELAY`] (see the module documentation).
    ///
    /// Errors: [`RpcError::NoPeers`] when the lookup fails or finds nobody;
    /// the last connect error (or a timeout) when no peer accepts before the
    /// deadline; the request's own error once it was sent (it is never sent
    /// to a second peer: it may have reached the first).
    pub async fn request(
        &self,
        service: &str,
        payload: &str,
        timeout: Duration,
    ) -> Result<String, RpcError> {
        self.request_pinned(service, payload, timeout, &PinnedKeys::any())
            .await
    }

    /// [`request`](Self::request), answered only by a peer that proves one
    /// of `pins` in a secure session (any peer when `pins` is empty); the
    /// others are skipped as dead peers are.
    pub async fn request_pinned(
        &self,
        service: &str,
        payload: &str,
        timeout: Duration,
        pins: &PinnedKeys,
    ) -> Result<String, RpcError> {
        let deadline = Instant::now() + timeout;
        let discovery = self
            .discovery
            .as_ref()
            .ok_or_else(|| RpcError::Transport("no discovery configured".into()))?;
        let mut wait = RELOOKUP_WAIT;
        let (peer, opened, peers) = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut peers = discovery
                .lookup(service, LOOKUP_TIMEOUT.min(left))
                .await
                .map_err(|e| RpcError::NoPeers(e.to_string()))?;
            if peers.is_empty() {
                return Err(RpcError::NoPeers(discovery.nobody_announces(service)));
            }
            // IPs take turns in a random order (no one IP takes every early
            // slot; load spreads over machines), each IP's peers in the
            // directory's order (newest first from our DHT nodes); then the
            // peers that answered recently go first, in a random order (the
            // load spreads over every live one), those that failed recently
            // last (still tried: a glitch is not an outage).
            spread_by_ip(&mut peers, |ips| ips.shuffle(&mut rand::rng()));
            let answered = self.health.order(&mut peers);
            peers[..answered].shuffle(&mut rand::rng());
            match self.connect_any(service, &peers, deadline, pins).await {
                Ok((peer, opened)) => break (peer, opened, peers),
                // Every peer the directory named failed before the deadline
                // (a restarted host's successor may not have announced yet):
                // look up again after a pause, while time is left.
                Err((e, Final(false))) if Instant::now() + wait < deadline => {
                    tracing::debug!(
                        "all {} peers of {service} failed ({e}); looking it up again in {wait:?}",
                        peers.len()
                    );
                    // The same dead peers from the cache would fail again.
                    discovery.forget(service);
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(MAX_RELOOKUP_WAIT);
                }
                Err((e, _)) => {
                    return Err(match peers.len() {
                        1 => e,
                        n => e.context(&format!("all {n} peers of {service} failed; the last")),
                    })
                }
            }
        };
        self.warm_up(&peers, peer);
        match self
            .send(peer, service, payload, deadline, Some(opened), pins)
            .await
        {
            Err(SendError::Unreachable(e) | SendError::Lost(e) | SendError::Silent(e)) => {
                self.health.failed(peer);
                Err(e)
            }
            Ok(reply) => {
                self.health.answered(peer);
                reply_result(reply)
            }
        }
    }

    /// Opens, in the background, a connection to one peer of `peers` (not
    /// `chosen`, which this request uses) that was never tried, so that load spreads over every live peer (answered
    /// peers go first, so an untried one would otherwise wait for them all
    /// to fail) and a dead one is found out without a request waiting on
    /// it. At most [`MAX_WARMING`] at once per client; the outcome goes to
    /// the peer health memory.
    fn warm_up(&self, peers: &[SocketAddr], chosen: SocketAddr) {
        let untried = |p: &&SocketAddr| **p != chosen && self.health.unseen(**p);
        let Some(&peer) = peers.iter().find(untried) else {
            return;
        };
        if self.warming.fetch_add(1, Ordering::Relaxed) >= MAX_WARMING {
            self.warming.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let client = self.clone();
        tokio::spawn(async move {
            let by = Instant::now() + CONNECT_BUDGET_PER_PEER;
            match client.connection(peer, by, &PinnedKeys::any()).await {
                Ok(_) => client.health.answered(peer),
                Err(_) => client.health.failed(peer),
            }
            client.warming.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// Connects to one of `peers`, trying them in the given order as happy
    /// eyeballs does (RFC 8305 §5): the first attempt starts at once, each
    /// next one [`ATTEMPT_DELAY`] later or as soon as every running attempt
    /// failed, at most [`MAX_ATTEMPTS_AT_ONCE`] run at once, and the first
    /// connection to open wins (the others are dropped). A dead or planted
    /// entry therefore costs [`ATTEMPT_DELAY`], not a connect timeout.
    /// An attempt may take [`CONNECT_BUDGET_PER_PEER`]; the last candidate
    /// all the time left. Failed attempts mark their peer failed.
    ///
    /// Returns the winner and its connection; or the last connect error (a
    /// timeout when attempts were still running at `deadline`), with
    /// whether looking the service up again could help.
    async fn connect_any(
        &self,
        service: &str,
        peers: &[SocketAddr],
        deadline: Instant,
        pins: &PinnedKeys,
    ) -> Result<(SocketAddr, Opened), (RpcError, Final)> {
        let mut attempts = futures::stream::FuturesUnordered::new();
        let mut untried = peers.iter().copied().enumerate().peekable();
        let mut next_start = Instant::now();
        let mut last_error = None;
        // Whether every failure was one that looking again cannot change
        // (no direct path can exist between the two NATs).
        let mut all_final = true;
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            while attempts.len() < MAX_ATTEMPTS_AT_ONCE
                && (attempts.is_empty() || now >= next_start)
            {
                let Some((i, peer)) = untried.next() else {
                    break;
                };
                let connect_by = if i + 1 == peers.len() {
                    deadline
                } else {
                    deadline.min(now + CONNECT_BUDGET_PER_PEER)
                };
                attempts.push(async move { (peer, self.connection(peer, connect_by, pins).await) });
                next_start = now + ATTEMPT_DELAY;
            }
            if attempts.is_empty() {
                break;
            }
            let more = untried.peek().is_some() && attempts.len() < MAX_ATTEMPTS_AT_ONCE;
            let next_attempt = async {
                match more {
                    true => tokio::time::sleep_until(next_start.into()).await,
                    false => std::future::pending().await,
                }
            };
            tokio::select! {
                Some((peer, result)) = attempts.next() => match result {
                    Ok(opened) => return Ok((peer, opened)),
                    Err(e) => {
                        self.health.failed(peer);
                        all_final &= matches!(
                            e,
                            OpenError::Connect(ConnectError::Impossible(_)) | OpenError::NotPinned(_)
                        );
                        last_error = Some(connect_error(e));
                        // Every running attempt failed: start the next now.
                        next_start = Instant::now();
                    }
                },
                // Every attempt ends by the deadline with its own error,
                // which names the peer: no separate deadline branch.
                _ = next_attempt => {}
            }
        }
        match last_error {
            Some(e) => Err((e, Final(all_final))),
            None => Err((
                RpcError::Timeout(format!(
                    "no peer of {service} accepted a connection in time ({} tried)",
                    peers.len() - untried.count()
                )),
                Final(true),
            )),
        }
    }

    /// Sends `payload` as a request with `key` to `peer` directly.
    pub async fn request_peer(
        &self,
        peer: SocketAddr,
        key: &str,
        payload: &str,
        timeout: Duration,
    ) -> Result<String, RpcError> {
        self.request_peer_pinned(peer, key, payload, timeout, &PinnedKeys::any())
            .await
    }

    /// [`request_peer`](Self::request_peer), sent only if `peer` proves one
    /// of `pins` (any peer when `pins` is empty).
    pub async fn request_peer_pinned(
        &self,
        peer: SocketAddr,
        key: &str,
        payload: &str,
        timeout: Duration,
        pins: &PinnedKeys,
    ) -> Result<String, RpcError> {
        let deadline = Instant::now() + timeout;
        match self.send(peer, key, payload, deadline, None, pins).await {
            Ok(reply) => reply_result(reply),
            Err(SendError::Unreachable(e) | SendError::Lost(e) | SendError::Silent(e)) => Err(e),
        }
    }

    /// Sends one request to `peer`, on `opened` if given (else on a
    /// connection that proves one of `pins`); once more over a new
    /// introduction if the introduced path went silent before anything came
    /// back. Everything by `deadline`.
    async fn send(
        &self,
        peer: SocketAddr,
        key: &str,
        payload: &str,
        deadline: Instant,
        opened: Option<Opened>,
        pins: &PinnedKeys,
    ) -> Result<Reply, SendError> {
        let first = match opened {
            Some(opened) => self.send_on(peer, opened, key, payload, deadline).await,
            None => {
                self.send_once(peer, key, payload, deadline, deadline, pins)
                    .await
            }
        };
        match first {
            Err(SendError::Silent(e)) if Instant::now() < deadline => {
                tracing::info!(%peer, "the introduced path went silent ({e}); introducing again and resending");
                match self
                    .send_once(peer, key, payload, deadline, deadline, pins)
                    .await
                {
                    Err(SendError::Silent(e)) => Err(SendError::Lost(e)),
                    other => other,
                }
            }
            Err(SendError::Silent(e)) => Err(SendError::Lost(e)),
            other => other,
        }
    }

    async fn send_once(
        &self,
        peer: SocketAddr,
        key: &str,
        payload: &str,
        connect_by: Instant,
        deadline: Instant,
        pins: &PinnedKeys,
    ) -> Result<Reply, SendError> {
        let opened = self
            .connection(peer, connect_by, pins)
            .await
            .map_err(|e| SendError::Unreachable(connect_error(e)))?;
        self.send_on(peer, opened, key, payload, deadline).await
    }

    /// Sends one request on an open connection to `peer` and waits for its
    /// reply until `deadline`.
    async fn send_on(
        &self,
        peer: SocketAddr,
        (connection, introduced_at): Opened,
        key: &str,
        payload: &str,
        deadline: Instant,
    ) -> Result<Reply, SendError> {
        if let (Some(introductions), Some(addr)) = (&self.introductions, connection.use_to_report())
        {
            introductions.used(addr);
        }
        let rid = codec::new_rid();
        let message = codec::encode_request(&rid, key, payload);
        if message.len() > self.max_message {
            return Err(SendError::Lost(RpcError::Transport(format!(
                "request of {} bytes is over the {}-byte message limit",
                message.len(),
                self.max_message
            ))));
        }
        let (tx, rx) = oneshot::channel();
        let lost =
            |why: &str| SendError::Lost(RpcError::Transport(format!("connection to {peer} {why}")));
        let inserted = connection.lock_pending().insert(rid.clone(), deadline, tx);
        if inserted.is_err() {
            return Err(lost("closed before the request was sent"));
        }
        // The connection task may be sleeping until a later deadline.
        connection.deadline_added.notify_one();
        let reads_before = connection.reads();
        {
            // One whole message per write: Node peers parse each packet alone
            // (docs/wire.md §3).
            let mut writer = connection.writer.lock().await;
            if let Err(e) = writer.write_message(&message).await {
                connection.lock_pending().complete(&rid);
                return Err(lost(&format!("failed while sending: {e}")));
            }
        }
        // The connection task answers: a reply, an expiry, or a dropped
        // sender when the connection dies.
        match rx.await {
            Ok(Some(reply)) => {
                // This request opened the path: its reply is the first.
                if let Some(at) = introduced_at {
                    tracing::info!(
                        %peer,
                        "first reply over the new path {:.1} ms after the introduction",
                        at.elapsed().as_secs_f64() * 1e3
                    );
                }
                Ok(reply)
            }
            Ok(None) => Err(SendError::Lost(RpcError::Timeout(format!(
                "no reply from {peer} for {key} in time"
            )))),
            Err(_) if connection.introduced.is_some() && connection.reads() == reads_before => {
                Err(SendError::Silent(RpcError::Transport(format!(
                    "connection to {peer} went silent"
                ))))
            }
            Err(_) => Err(lost("was lost before the reply arrived")),
        }
    }

    /// A new uTP stream to `peer`: through an introduction when there is an
    /// introducer (punched, or through the introducer's relay when no
    /// direct path can exist or the punched one failed), returning how.
    async fn open(
        &self,
        peer: SocketAddr,
        connect_by: Instant,
    ) -> Result<(crate::utp::UtpStream, Option<Introduced>), ConnectError> {
        let Some(introductions) = &self.introductions else {
            return Ok((self.endpoint.connect(peer, connect_by).await?, None));
        };
        let started = Instant::now();
        let result = tokio::time::timeout_at(connect_by.into(), introductions.introduce(peer))
            .await
            .unwrap_or(IntroResult::Direct);
        let answered = started.elapsed();
        // Punches meet within milliseconds when they can: past its budget
        // (half the time left at most) a punched connect has failed, and the
        // relay gets the rest.
        let left = connect_by.saturating_duration_since(Instant::now());
        let punch_by = Instant::now() + PUNCHED_CONNECT_BUDGET.min(left / 2);
        let (addr, follow_port, deadline, how) = match result {
            IntroResult::Direct => {
                return Ok((self.endpoint.connect(peer, connect_by).await?, None))
            }
            // A host behind a NAT that does not register cannot be
            // introduced: if it does not answer, say what it needs.
            IntroResult::Unregistered => {
                let connected = self.endpoint.connect(peer, connect_by).await;
                if let Err(ConnectError::Timeout { .. }) = &connected {
                    tracing::warn!(%peer, "no answer from {peer}, which the introducer does not know: if it serves behind a NAT, it must run with --behind-nat (and the same introducer) to be reachable");
                }
                return Ok((connected?, None));
            }
            IntroResult::Impossible(reason) => return Err(ConnectError::Impossible(reason)),
            IntroResult::Relayed { addr, relay, .. } => {
                let why = "the introducer ruled a direct path out";
                return self
                    .open_relayed(peer, addr, relay, Instant::now(), why, connect_by)
                    .await;
            }
            IntroResult::Punched { addr, nat } => {
                (addr, nat == NatKind::Symmetric, punch_by, "an introduction")
            }
            // No path opens once the attempt is over: the connect gives up
            // with it, not at the request's deadline.
            IntroResult::Birthday { addr, role, .. } => (
                addr,
                role == BirthdayRole::Probe,
                connect_by.min(started + answered + birthday::ATTEMPT_TIME),
                "an introduction and birthday punching",
            ),
        };
        let punched = self
            .endpoint
            .connect_punched(addr, deadline, follow_port)
            .await;
        let (stream, at) = match punched {
            Ok(opened) => opened,
            Err(e @ ConnectError::Timeout { .. }) => {
                let failed = Instant::now();
                tracing::info!(%peer, "the punched path to {addr} failed ({e}); asking the introducer to relay");
                let relayed = tokio::time::timeout_at(
                    connect_by.into(),
                    introductions.introduce_relayed(peer),
                )
                .await;
                return match relayed {
                    Ok(IntroResult::Relayed { addr, relay, .. }) => {
                        let why = "the punched path failed";
                        self.open_relayed(peer, addr, relay, failed, why, connect_by)
                            .await
                    }
                    Ok(IntroResult::Impossible(reason)) => Err(ConnectError::Impossible(reason)),
                    _ => Err(e),
                };
            }
            Err(e) => return Err(e),
        };
        tracing::info!(
            %peer,
            "direct path to {at} opened by {how}: introducer answered in {:.1} ms, connected {:.1} ms later",
            answered.as_secs_f64() * 1e3,
            (started.elapsed() - answered).as_secs_f64() * 1e3
        );
        let path = Introduced {
            addr: at,
            at: started + answered,
            relayed: false,
        };
        Ok((stream, Some(path)))
    }

    /// Connects to `addr` (the peer announced as `peer`) through the relay
    /// at `relay`, whose route the introductions set; `learned` is when this
    /// host learnt that it needs the relay (`why`).
    async fn open_relayed(
        &self,
        peer: SocketAddr,
        addr: SocketAddr,
        relay: SocketAddr,
        learned: Instant,
        why: &str,
        connect_by: Instant,
    ) -> Result<(crate::utp::UtpStream, Option<Introduced>), ConnectError> {
        let stream = self.endpoint.connect(addr, connect_by).await?;
        tracing::info!(
            %peer,
            "relayed path to {addr} through {relay} opened {:.1} ms after {why}",
            learned.elapsed().as_secs_f64() * 1e3
        );
        let path = Introduced {
            addr,
            at: learned,
            relayed: true,
        };
        Ok((stream, Some(path)))
    }

    /// The open connection to `peer`, connecting if there is none, if it
    /// proved one of `pins`; when this call opened it through an
    /// introduction, also when the introducer answered.
    async fn connection(
        &self,
        peer: SocketAddr,
        connect_by: Instant,
        pins: &PinnedKeys,
    ) -> Result<Opened, OpenError> {
        let opened = self.connection_to(peer, connect_by).await?;
        pins.check(peer, opened.0.peer_key.as_ref())
            .map_err(OpenError::NotPinned)?;
        Ok(opened)
    }

    /// The open connection to `peer`, secure when it speaks our sessions.
    async fn connection_to(
        &self,
        peer: SocketAddr,
        connect_by: Instant,
    ) -> Result<Opened, OpenError> {
        let slot = self
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(peer)
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok((c.clone(), None));
        }
        let (stream, introduced) = self.open(peer, connect_by).await?;
        let kind = match introduced {
            Some(Introduced { relayed: true, .. }) => &self.paths.relayed,
            Some(_) => &self.paths.punched,
            None => &self.paths.direct,
        };
        kind.fetch_add(1, Ordering::Relaxed);
        let (reader, writer, peer_key) = self.start_session(peer, stream, connect_by).await?;
        let mut reader = MessageReader::new(reader, self.max_message);
        let connection = Arc::new(Connection {
            writer: tokio::sync::Mutex::new(writer),
            peer_key,
            pending: Mutex::default(),
            deadline_added: tokio::sync::Notify::new(),
            introduced: introduced.map(|i| i.addr),
            reads: reader.reads(),
            // The introduction itself counts as use.
            opened: Instant::now(),
            use_reported: AtomicU64::new(0),
        });
        if connection.peer_key.is_some() {
            // Message 3 of the handshake waits to leave with the first
            // request; a connection opened ahead of its request (warm-up, a
            // lost connect race) sends it alone after MESSAGE_3_GRACE, well
            // within the responder's handshake timeout.
            let connection = connection.clone();
            tokio::spawn(async move {
                tokio::time::sleep(MESSAGE_3_GRACE).await;
                if let Err(e) = connection.writer.lock().await.flush().await {
                    tracing::debug!(%peer, "handshake message 3 not sent: {e}");
                }
            });
        }
        let task_connection = connection.clone();
        tokio::spawn(async move {
            let connection = task_connection;
            let why = 'read: loop {
                let next_deadline = connection.lock_pending().next_deadline();
                let expiry = async move {
                    match next_deadline {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                };
                // Reading is cancel-safe: a timer that wins loses no bytes.
                let first = tokio::select! {
                    message = reader.next() => match message {
                        Ok(Some(message)) => message,
                        Ok(None) => break "closed by the peer".to_string(),
                        Err(ReadError::Io(e)) => break format!("failed: {e}"),
                        Err(ReadError::Decode(e)) => break format!("sent garbage: {e}"),
                    },
                    _ = expiry => {
                        for waiter in connection.lock_pending().expire(Instant::now()) {
                            let _ = waiter.send(None);
                        }
                        continue;
                    }
                    _ = connection.deadline_added.notified() => continue,
                };
                // The replies that came in with this one are matched before
                // the timer is looked at again: a reply that is here wins
                // over its deadline.
                let mut message = Some(first);
                while let Some(value) = message {
                    match codec::parse_reply(&value) {
                        Ok(reply) => {
                            if let Some(waiter) = connection.lock_pending().complete(&reply.rid) {
                                let _ = waiter.send(Some(reply));
                            }
                        }
                        Err(e) => break 'read format!("sent a malformed reply: {e}"),
                    }
                    message = match reader.next_buffered() {
                        Ok(next) => next,
                        Err(e) => break 'read format!("sent garbage: {e}"),
                    };
                }
            };
            let failed = connection.lock_pending().close();
            tracing::debug!(%peer, "connection {why}; {} waiting request(s) fail", failed.len());
        });
        *slot = Some(connection.clone());
        Ok((connection, introduced.map(|i| i.at)))
    }

    /// The halves of a new connection: a secure session when the peer's
    /// uTP handshake said it speaks ours (and we have keys), plaintext
    /// otherwise. The handshake gets [`session::HANDSHAKE_TIMEOUT`], and
    /// never past `connect_by`.
    async fn start_session(
        &self,
        peer: SocketAddr,
        stream: crate::utp::UtpStream,
        connect_by: Instant,
    ) -> Result<SessionHalves, OpenError> {
        let secure = stream.peer_speaks_secure();
        if !secure && self.keys.is_some() {
            if let Some(refused) = self.downgrade(peer) {
                self.sessions
                    .failed_handshakes
                    .fetch_add(1, Ordering::Relaxed);
                return Err(OpenError::Handshake(refused));
            }
        }
        let (reader, writer) = stream.split();
        let Some(keys) = self.keys.as_ref().filter(|_| secure) else {
            self.sessions.plaintext.fetch_add(1, Ordering::Relaxed);
            return Ok((
                SessionReader::Plain(reader),
                SessionWriter::Plain(writer),
                None,
            ));
        };
        let handshake = session::initiate(reader, writer, keys, |_| Ok::<(), ()>(()));
        let failed = |why: String| {
            self.sessions
                .failed_handshakes
                .fetch_add(1, Ordering::Relaxed);
            OpenError::Handshake(format!("secure handshake with {peer} failed: {why}"))
        };
        let by = connect_by.min(Instant::now() + session::HANDSHAKE_TIMEOUT);
        let s = match tokio::time::timeout_at(by.into(), handshake).await {
            Ok(Ok(Ok(s))) => s,
            Ok(Ok(Err(()))) => unreachable!("every identity is accepted here"),
            Ok(Err(e)) => return Err(failed(e.to_string())),
            Err(_) => return Err(failed(session::HandshakeError::Timeout.to_string())),
        };
        self.sessions.secure.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, peer_key = %session::hex(s.peer.as_bytes()), "secure session");
        {
            let mut known = self.secure_peers.lock().unwrap_or_else(|p| p.into_inner());
            if !known.contains_key(&peer) {
                crate::units::evict_oldest(&mut known, MAX_SECURE_PEERS, |(_, at)| *at);
            }
            known.insert(peer, (s.peer, Instant::now()));
        }
        let reader = s.reader.counted_in(self.sessions.clone());
        Ok((
            SessionReader::Secure(reader),
            SessionWriter::Secure(s.writer),
            Some(s.peer),
        ))
    }
}

/// How long a peer that completed a secure session is expected to speak
/// ours: within it, the same address offering plaintext (no capability bit
/// in its uTP handshake, which an on-path attacker can strip) is refused.
pub const SECURE_MEMORY: Duration = Duration::from_secs(3600);
/// Most peers remembered for [`SECURE_MEMORY`]; the least recently seen
/// is forgotten first.
const MAX_SECURE_PEERS: usize = 4096;

impl RpcClient {
    /// Why plaintext toward `peer` is refused: it completed a secure
    /// session within [`SECURE_MEMORY`]. `None` otherwise.
    fn downgrade(&self, peer: SocketAddr) -> Option<String> {
        let known = self.secure_peers.lock().unwrap_or_else(|p| p.into_inner());
        let (key, at) = known.get(&peer)?;
        let ago = at.elapsed();
        (ago < SECURE_MEMORY).then(|| {
            format!(
                "{peer} proved identity {} in an encrypted session {}s ago and now offers plaintext: refused as a possible downgrade (its capability bit can be stripped on the path); pin its key with --peer-key, or call with --plaintext if it really changed",
                session::hex(key.as_bytes()),
                ago.as_secs()
            )
        })
    }
}

/// A connection's two halves and the identity its peer proved.
type SessionHalves = (
    SessionReader<crate::utp::UtpReadHalf>,
    SessionWriter<crate::utp::UtpWriteHalf>,
    Option<ed25519_dalek::VerifyingKey>,
);

/// Why no connection to a peer could be used.
enum OpenError {
    /// No uTP connection.
    Connect(ConnectError),
    /// The secure handshake failed.
    Handshake(String),
    /// The peer is not ours or proved a key the request did not pin.
    NotPinned(String),
}

impl From<ConnectError> for OpenError {
    fn from(e: ConnectError) -> Self {
        OpenError::Connect(e)
    }
}

enum SendError {
    /// Nothing was sent: another peer may be tried.
    Unreachable(RpcError),
    /// The request may have reached the peer: do not resend it elsewhere.
    Lost(RpcError),
    /// The introduced path died and nothing came back after the request was
    /// sent: the NATs forgot the path, so it is sent once more.
    Silent(RpcError),
}

/// Whether a failed connect race is final: looking the service up again
/// cannot help (every peer is one no direct path can reach), or the
/// deadline has passed.
struct Final(bool);

/// The request error for a connection that could not be opened.
fn connect_error(e: OpenError) -> RpcError {
    match e {
        OpenError::Connect(e @ ConnectError::Timeout { .. }) => RpcError::Timeout(e.to_string()),
        OpenError::Connect(e) => RpcError::Transport(e.to_string()),
        OpenError::Handshake(why) | OpenError::NotPinned(why) => RpcError::Transport(why),
    }
}

fn reply_result(reply: Reply) -> Result<String, RpcError> {
    match reply.err {
        None => Ok(reply.result),
        Some(message) => Err(RpcError::Remote(message)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_that_was_secure_is_not_taken_in_plaintext_for_an_hour() {
        let (endpoint, _) = Endpoint::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let client = RpcClient::new(endpoint, None, 1 << 20)
            .with_session_keys(Arc::new(SessionKeys::ephemeral()));
        let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert!(
            client.downgrade(peer).is_none(),
            "never seen: plaintext is fine"
        );
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]).verifying_key();
        client
            .secure_peers
            .lock()
            .unwrap()
            .insert(peer, (key, Instant::now()));
        let refused = client.downgrade(peer).expect("refused");
        assert!(refused.contains(&session::hex(key.as_bytes())), "{refused}");
        assert!(refused.contains("--peer-key"), "{refused}");
        // An hour later it may have changed for real.
        let long_ago = Instant::now() - SECURE_MEMORY - Duration::from_secs(1);
        client
            .secure_peers
            .lock()
            .unwrap()
            .insert(peer, (key, long_ago));
        assert!(client.downgrade(peer).is_none());
    }
}
