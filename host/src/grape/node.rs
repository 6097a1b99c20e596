//! The grape's DHT side: the [`GrapeBackend`] behind the HTTP API, on two
//! DHT nodes.
//!
//! - The **server node** listens on the grape's DHT port (`--dp`): our own
//!   BEP 5 / BEP 44 node ([`crate::discovery::server`], what `dht` runs).
//!   Other grapes, our hosts and any BEP 5 client (2- or 4-byte transaction
//!   ids) bootstrap from it; it stores what they announce (for `--dpa`
//!   after the last announce) and put, with keyed tokens.
//! - The **query node** (a free port, mainline's client, read-only) makes
//!   this grape's own queries: announces, lookups, puts and gets. It joins
//!   through the server node and the `--bn` nodes. A separate node is
//!   needed because a DHT node never asks itself: what a grape's HTTP
//!   clients announce must land on its own server node too, so that every
//!   grape (this one included) finds it, as with one Node grape per machine.
//!
//! A service's DHT key is the SHA-1 of its name, as our hosts use
//! ([`service_key`]), so Node links and our hosts share one namespace.
//!
//! Where an announce is stored:
//! - in this grape's table (see [`super::table`]), under the `-b` address
//!   if one was given, else the HTTP client's address: the service is on the
//!   caller's machine, usually this one;
//! - on the DHT nodes, under this grape's IP as each node sees the query
//!   node (mainline's `announce_peer`), like grenache-grape, which stores
//!   the announcing grape's IP. Each keeps it for its own peer age (ours:
//!   their `--dpa` or `--peer-ttl`); [`super::table`] forgets it here
//!   at this grape's age whatever other nodes keep.
//!
//! A `/put` is checked and kept in the server node's BEP 44 store first
//! (so `/get` finds it at once, mutable ones included), then put on the
//! DHT; a `/get` reads that store before asking the DHT.
//!
//! An `/announce` waits at most [`ANNOUNCE_WAIT`] for the DHT (a Link gives
//! up after 2.5 s): an announce still running then answers `1` and finishes
//! in the background (a failure is logged, and the next announce tries
//! again). A node in a routing table that does not answer makes every
//! query that visits it wait for the query timeout (one that stopped);
//! our server node lists only nodes that answered its ping, and never
//! read-only ones.
//!
//! The query node reaches the server node at [`own_address`], so that what
//! the server stores for this grape's announces is reachable from other
//! machines: `-b`, else the local address that routes to the first `--bn`
//! node, else the one that routes to the internet, else 127.0.0.1.
//!
//! Bounds: at most [`MAX_DHT_OPERATIONS`] DHT operations at once (more
//! wait, at most [`MAX_PENDING_PUBLISHES`] announces among them); lookups
//! wait at most [`LOOKUP_WAIT`] for the DHT and keep at most
//! [`MAX_DHT_PEERS`] addresses; gets wait at most [`GET_WAIT`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mainline::errors::{PutMutableError, PutQueryError};
use mainline::{Dht, Id, MutableItem};
use tokio::sync::Semaphore;

use super::api::{DhtFailure, FoundValue, GrapeBackend, PutRequest};
use super::table::AnnounceTable;
use crate::discovery::dht::service_key;
use crate::discovery::server::{DhtServer, ServerConfig};
use crate::discovery::DiscoveryError;
use futures::future::BoxFuture;

/// Most DHT operations publishing or fetching (announce, put, get) in
/// flight at once.
pub const MAX_DHT_OPERATIONS: usize = 64;
/// Most lookups querying the DHT at once: their own slots, so that a queue
/// of publishes, puts or gets never delays a lookup.
pub const MAX_DHT_LOOKUPS: usize = 32;
/// How long an `/announce` waits for the DHT before answering.
pub const ANNOUNCE_WAIT: Duration = Duration::from_secs(2);
/// Most announces being published at once, those waiting for one of the
/// [`MAX_DHT_OPERATIONS`] included; past that, an announce is kept in the
/// table only, answered `All queries failed`, and published at the next one.
pub const MAX_PENDING_PUBLISHES: usize = 1024;
/// How long a lookup waits for DHT answers (a Link gives up after 2.5 s).
pub const LOOKUP_WAIT: Duration = Duration::from_millis(1500);
/// Most addresses a lookup takes from the DHT.
pub const MAX_DHT_PEERS: usize = 1000;
/// How long a get waits for the DHT.
pub const GET_WAIT: Duration = Duration::from_secs(2);
/// How long a put waits for the DHT: for a slot (past it, `All queries
/// failed`, the value kept here for `/get` all the same), then for the put
/// (past it, answered as done; it goes on in the background).
pub const PUT_WAIT: Duration = Duration::from_secs(2);

// Every wait above runs from when the request reaches the backend, the
// wait for a slot included: a queue cannot stretch a request past it.
/// Per-query DHT timeout (mainline's default, k-rpc's too).
const DHT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How to run a grape's DHT side.
#[derive(Debug, Clone)]
pub struct GrapeConfig {
    /// The server node's UDP port (`--dp`); 0 for any free port.
    pub dht_port: u16,
    /// `-b`: the address HTTP listens on, and under which announces are
    /// stored in the table. `None`: all interfaces, the caller's address.
    pub bind: Option<Ipv4Addr>,
    /// Other DHT nodes to join (`host:port`); empty: a new DHT.
    pub bootstrap: Vec<String>,
    /// How long an announce lives after the last one (`--dpa`), in this
    /// grape's table and on its server node; `None`: until evicted from
    /// the bounded stores.
    pub peer_max_age: Option<Duration>,
}

/// A grape's DHT side: the server and query nodes, the table of announces.
pub struct GrapeNode {
    /// Our BEP 5 / BEP 44 node on `--dp`; its item store keeps the values
    /// put here.
    server: DhtServer,
    publisher: Publisher,
    bind: Option<Ipv4Addr>,
    own_ip: Ipv4Addr,
}

/// What publishes announces on the DHT, shared with the tasks
/// that finish announces in the background.
#[derive(Clone)]
struct Publisher {
    /// The query node.
    client: mainline::async_dht::AsyncDht,
    table: Arc<Mutex<AnnounceTable>>,
    /// At most [`MAX_DHT_OPERATIONS`] DHT operations at once.
    operations: Arc<Semaphore>,
    /// At most [`MAX_DHT_LOOKUPS`] lookups at once.
    lookups: Arc<Semaphore>,
    /// At most [`MAX_PENDING_PUBLISHES`] announces being published.
    pending: Arc<Semaphore>,
}

impl GrapeNode {
    /// Starts both DHT nodes. Fails if the DHT port is taken or a
    /// bootstrap node does not resolve.
    pub async fn start(config: &GrapeConfig) -> Result<Arc<GrapeNode>, DiscoveryError> {
        // Like a Node grape, the DHT socket takes every interface whatever -b says.
        let server = DhtServer::start(ServerConfig {
            listen: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, config.dht_port),
            bootstrap: config.bootstrap.clone(),
            peer_ttl: config.peer_max_age.unwrap_or(Duration::MAX),
        })
        .await?;
        let dht_port = server.local_addr().port();
        let own_ip = own_address(config.bind, &config.bootstrap);
        let mut joins = vec![SocketAddrV4::new(own_ip, dht_port).to_string()];
        joins.extend(config.bootstrap.iter().cloned());
        let client = Dht::builder()
            .bind_address(config.bind.unwrap_or(Ipv4Addr::UNSPECIFIED))
            .port(0)
            .request_timeout(DHT_REQUEST_TIMEOUT)
            .bootstrap(&joins)
            .build()
            .map_err(|e| DiscoveryError::Start(format!("{e} (binding the grape's query node)")))?
            .as_async();
        // What the query node announces to this grape's own DHT node would
        // be stored under the address it is seen from there: the grape
        // stores its announces there itself instead (`announce_service`).
        let query_port = client.info().await.local_addr().port();
        server
            .stores()
            .add_local_announcer(SocketAddrV4::new(own_ip, query_port));
        // Every value put through the HTTP API is kept as this grape's own:
        // never given up for another IP's newcomers.
        server.stores().items().protect(own_ip);
        Ok(Arc::new(GrapeNode {
            server,
            publisher: Publisher {
                client,
                table: Arc::new(Mutex::new(AnnounceTable::new(config.peer_max_age, own_ip))),
                operations: Arc::new(Semaphore::new(MAX_DHT_OPERATIONS)),
                lookups: Arc::new(Semaphore::new(MAX_DHT_LOOKUPS)),
                pending: Arc::new(Semaphore::new(MAX_PENDING_PUBLISHES)),
            },
            bind: config.bind.filter(|ip| !ip.is_unspecified()),
            own_ip,
        }))
    }

    /// The server node's address (the DHT port).
    pub fn dht_addr(&self) -> SocketAddrV4 {
        self.server.local_addr()
    }

    /// The server node (the DHT port).
    pub fn server(&self) -> &DhtServer {
        &self.server
    }

    /// The address the client node reaches the server node at.
    pub fn own_ip(&self) -> Ipv4Addr {
        self.own_ip
    }

    /// Addresses the DHT has for `name`, until the query ends, [`LOOKUP_WAIT`]
    /// passes (waiting for a slot included) or [`MAX_DHT_PEERS`] are found.
    async fn dht_peers(&self, name: &str) -> Vec<SocketAddrV4> {
        let deadline = tokio::time::Instant::now() + LOOKUP_WAIT;
        let Ok(_slot) = tokio::time::timeout_at(deadline, self.publisher.lookups.acquire()).await
        else {
            tracing::debug!(
                name,
                "every lookup slot busy until the deadline; table only"
            );
            return Vec::new();
        };
        let mut stream = self.publisher.client.get_peers(service_key(name));
        let mut found = Vec::new();
        while let Ok(Some(batch)) = tokio::time::timeout_at(deadline, stream.next()).await {
            found.extend(batch.into_iter().filter(|p| p.port() != 0));
            if found.len() >= MAX_DHT_PEERS {
                found.truncate(MAX_DHT_PEERS);
                break;
            }
        }
        found
    }

    fn lock_table(&self) -> std::sync::MutexGuard<'_, AnnounceTable> {
        self.publisher.lock_table()
    }

    async fn announce_service(
        &self,
        name: &str,
        port: u16,
        caller: IpAddr,
    ) -> Result<u32, DhtFailure> {
        let ip = match (self.bind, caller) {
            (Some(ip), _) => ip,
            (None, IpAddr::V4(ip)) => ip,
            (None, IpAddr::V6(_)) => self.own_ip,
        };
        let publish = {
            let now = Instant::now();
            let mut table = self.lock_table();
            log_expired(table.expire(now));
            table.announce(now, name, SocketAddrV4::new(ip, port))
        };
        // This grape's own DHT node keeps it under the address this grape
        // answers lookups with; other nodes get it from the query node.
        self.server.stores().peers().announce(
            Instant::now(),
            *service_key(name).as_bytes(),
            SocketAddrV4::new(ip, port),
        );
        let Some(port) = publish else {
            // Published moments ago; the DHT has it.
            return Ok(1);
        };
        let Ok(pending) = self.publisher.pending.clone().try_acquire_owned() else {
            tracing::warn!(
                name,
                port,
                "too many announces waiting for the DHT; kept here only"
            );
            self.lock_table().publish_failed(name, port);
            return Err(DhtFailure::AllFailed);
        };
        let publisher = self.publisher.clone();
        let name = name.to_string();
        let announce = tokio::spawn(async move {
            let outcome = publisher.announce(&name, port).await;
            drop(pending);
            outcome
        });
        match tokio::time::timeout(ANNOUNCE_WAIT, announce).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(DhtFailure::AllFailed),
            // Still running: it finishes on its own.
            Err(_) => Ok(1),
        }
    }

    async fn lookup_service(&self, name: &str) -> Vec<SocketAddrV4> {
        let found = self.dht_peers(name).await;
        let now = Instant::now();
        let mut table = self.lock_table();
        log_expired(table.expire(now));
        table.lookup(now, name, found)
    }

    /// Keeps a put in the server node's store, then puts it on the DHT
    /// within [`PUT_WAIT`] from
    /// the request: no free slot by then is `All queries failed`; a put
    /// still running then is answered as done (it is kept here, and goes on
    /// in the background in its slot, as an announce does).
    async fn put_value(&self, request: PutRequest) -> Result<[u8; 20], DhtFailure> {
        let deadline = tokio::time::Instant::now() + PUT_WAIT;
        let target = request.target();
        let cas = match &request {
            PutRequest::Mutable(put) => put.cas,
            PutRequest::Immutable(_) => None,
        };
        let kept = self.server.stores().items().put(
            Instant::now(),
            target,
            request.stored(),
            cas,
            self.own_ip,
        );
        if let Err(refused) = kept {
            // Kept as it was; the DHT's nodes would refuse it too. A Grape
            // answers every failed put alike, so the reason is logged.
            tracing::info!(target = %crate::units::hex(&target), "put refused: {refused}");
            return Err(DhtFailure::AllFailed);
        }
        let slot = self.publisher.operations.clone().acquire_owned();
        let Ok(Ok(slot)) = tokio::time::timeout_at(deadline, slot).await else {
            tracing::debug!("every DHT slot busy for {PUT_WAIT:?}; the put is kept here only");
            return Err(DhtFailure::AllFailed);
        };
        let client = self.publisher.client.clone();
        let put = tokio::spawn(async move {
            let outcome = put_on_dht(&client, request).await;
            drop(slot);
            outcome
        });
        match tokio::time::timeout_at(deadline, put).await {
            Ok(Ok(outcome)) => outcome.map(|()| target),
            Ok(Err(_)) => Err(DhtFailure::AllFailed),
            // Still running: it finishes on its own.
            Err(_) => Ok(target),
        }
    }

    async fn get_value(&self, target: [u8; 20]) -> Option<FoundValue> {
        let id = self.server.id();
        let local = self
            .server
            .stores()
            .items()
            .get(Instant::now(), &target)
            .cloned();
        if let Some(value) = local {
            return Some(FoundValue { id, value });
        }
        let target = Id::from_bytes(target).ok()?;
        let get = async {
            let _slot = self.publisher.operations.acquire().await;
            self.publisher.client.get_immutable(target).await
        };
        let value = tokio::time::timeout(GET_WAIT, get).await.ok()??;
        Some(FoundValue {
            id,
            value: crate::discovery::server::items::StoredValue {
                value: value.to_vec(),
                signed: None,
            },
        })
    }
}

impl Publisher {
    fn lock_table(&self) -> std::sync::MutexGuard<'_, AnnounceTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Announces `name` with `port` from the query node; the number of
    /// nodes that took it, as far as mainline says (it reports success only).
    async fn publish(&self, name: &str, port: u16) -> Result<u32, DhtFailure> {
        let _slot = self.operations.acquire().await;
        match self
            .client
            .announce_peer(service_key(name), Some(port))
            .await
        {
            Ok(_) => Ok(1),
            Err(e) => Err(query_failure(&e)),
        }
    }

    /// Publishes an announce; a failure is forgotten by the table, so that
    /// the next announce tries again.
    async fn announce(&self, name: &str, port: u16) -> Result<u32, DhtFailure> {
        let outcome = self.publish(name, port).await;
        match outcome {
            Ok(_) => tracing::debug!(name, port, "published on the DHT"),
            Err(failure) => {
                tracing::warn!(
                    name,
                    port,
                    "the DHT did not take the announce ({}); the next announce tries again",
                    failure.message()
                );
                self.lock_table().publish_failed(name, port);
            }
        }
        outcome
    }
}

/// Puts a value on the DHT from the query node.
async fn put_on_dht(
    client: &mainline::async_dht::AsyncDht,
    request: PutRequest,
) -> Result<(), DhtFailure> {
    match request {
        PutRequest::Immutable(value) => client
            .put_immutable(&value)
            .await
            .map(|_| ())
            .map_err(|e| query_failure(&e)),
        PutRequest::Mutable(put) => {
            let item = MutableItem::new_signed_unchecked(
                put.signed.key,
                put.signed.signature,
                &put.value,
                put.signed.seq,
                put.signed.salt.as_deref(),
            );
            // No `cas` on the DHT: it was checked against this grape's own
            // store, which now holds the new version, so this grape's DHT
            // node would refuse it (301); the others still refuse an older
            // `seq`.
            match client.put_mutable(item, None).await {
                Ok(_) => Ok(()),
                Err(PutMutableError::Query(e)) => Err(query_failure(&e)),
                Err(e) => {
                    tracing::debug!("DHT mutable put refused: {e}");
                    Err(DhtFailure::AllFailed)
                }
            }
        }
    }
}

fn log_expired(expired: Vec<(String, SocketAddrV4)>) {
    for (name, addr) in expired {
        tracing::info!("{name} at {addr}: not announced again within the peer max age; expired");
    }
}

/// k-rpc's words for why a DHT put did not land.
fn query_failure(error: &PutQueryError) -> DhtFailure {
    match error {
        PutQueryError::NoClosestNodes => DhtFailure::NoNodes,
        _ => DhtFailure::AllFailed,
    }
}

/// The address at which this machine's own DHT node is reached: `bind` if
/// it names one, else the local address that routes to the first bootstrap
/// node, else the one that routes to the internet, else 127.0.0.1. No packet
/// is sent: connecting a UDP socket only picks a route.
pub fn own_address(bind: Option<Ipv4Addr>, bootstrap: &[String]) -> Ipv4Addr {
    if let Some(ip) = bind.filter(|ip| !ip.is_unspecified()) {
        return ip;
    }
    use std::net::ToSocketAddrs;
    let first = bootstrap
        .iter()
        .filter_map(|b| b.to_socket_addrs().ok())
        .flatten()
        .find(SocketAddr::is_ipv4);
    // TEST-NET-1 (RFC 5737): never answers, but has a route if any does.
    let somewhere = SocketAddr::from(([192, 0, 2, 1], 9));
    for target in first.into_iter().chain([somewhere]) {
        let local = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .and_then(|socket| socket.connect(target).and_then(|()| socket.local_addr()));
        if let Ok(SocketAddr::V4(local)) = local {
            if !local.ip().is_unspecified() {
                return *local.ip();
            }
        }
    }
    Ipv4Addr::LOCALHOST
}

impl GrapeBackend for GrapeNode {
    fn announce<'a>(
        &'a self,
        name: &'a str,
        port: u16,
        caller: IpAddr,
    ) -> BoxFuture<'a, Result<u32, DhtFailure>> {
        Box::pin(self.announce_service(name, port, caller))
    }

    fn lookup<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Vec<SocketAddrV4>> {
        Box::pin(self.lookup_service(name))
    }

    fn put(&self, request: PutRequest) -> BoxFuture<'_, Result<[u8; 20], DhtFailure>> {
        Box::pin(self.put_value(request))
    }

    fn get(&self, target: [u8; 20]) -> BoxFuture<'_, Option<FoundValue>> {
        Box::pin(self.get_value(target))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_address_is_bind_when_given() {
        let ip = Ipv4Addr::new(10, 1, 2, 3);
        assert_eq!(own_address(Some(ip), &["127.0.0.1:1".into()]), ip);
    }

    #[test]
    fn the_own_address_routes_to_the_first_bootstrap_node() {
        assert_eq!(
            own_address(None, &["127.0.0.1:20001".into()]),
            Ipv4Addr::LOCALHOST
        );
        assert_eq!(
            own_address(Some(Ipv4Addr::UNSPECIFIED), &["127.0.0.1:20001".into()]),
            Ipv4Addr::LOCALHOST
        );
    }

    async fn local_grape() -> Arc<GrapeNode> {
        let config = GrapeConfig {
            dht_port: 0,
            bind: Some(Ipv4Addr::LOCALHOST),
            bootstrap: Vec::new(),
            peer_max_age: Some(Duration::from_secs(120)),
        };
        GrapeNode::start(&config)
            .await
            .expect("a grape on 127.0.0.1")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lookup_answers_in_time_behind_a_queue_of_announces() {
        let grape = local_grape().await;
        // Every publish slot busy (a slow DHT), 500 distinct-name announces
        // queued behind them.
        let busy = grape
            .publisher
            .operations
            .clone()
            .acquire_many_owned(MAX_DHT_OPERATIONS as u32)
            .await
            .unwrap();
        let caller = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut announces = Vec::new();
        for i in 0..500u16 {
            let grape = grape.clone();
            announces.push(tokio::spawn(async move {
                grape
                    .announce_service(&format!("queued-{i}"), 10_000 + i, caller)
                    .await
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        grape.announce_service("svc", 5555, caller).await.ok();
        let started = std::time::Instant::now();
        let found = grape.lookup_service("svc").await;
        let took = started.elapsed();
        assert!(found.contains(&SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5555)));
        assert!(
            took < LOOKUP_WAIT + Duration::from_millis(500),
            "the lookup took {took:?} behind queued announces"
        );
        // Gets and puts keep their deadlines while the slots are busy too.
        let started = std::time::Instant::now();
        assert!(grape.get_value([7; 20]).await.is_none());
        assert!(started.elapsed() < GET_WAIT + Duration::from_millis(500));
        let started = std::time::Instant::now();
        let put = PutRequest::Immutable(b"v".to_vec());
        assert!(grape.put_value(put).await.is_err());
        assert!(started.elapsed() < PUT_WAIT + Duration::from_millis(500));
        drop(busy);
        for announce in announces {
            announce.abort();
        }
    }
}
