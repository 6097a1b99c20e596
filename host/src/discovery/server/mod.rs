//! Our own BitTorrent DHT server node (KRPC, BEP 5): what `grenache-host
//! dht` runs for hosts to bootstrap from and announce to. Hosts keep using
//! mainline's client ([`super::dht`]); any BEP 5 client works.
//!
//! One UDP socket, IPv4. It answers `ping`, `find_node`, `get_peers` and
//! `announce_peer` (with `implied_port`), and BEP 44's `get` and `put`
//! (mainline's client also uses `get` to find where to announce); bad
//! queries get BEP 5 errors (203 protocol error, 204 method unknown, 201
//! storage full) and BEP 44's (205 value too big, 206 invalid signature,
//! 207 salt too big, 301 CAS mismatch, 302 sequence number too low);
//! datagrams over
//! 1500 bytes or that are not KRPC are counted and dropped. Any transaction
//! id of 1..=16 bytes is echoed as-is (mainline sends 4, Node's
//! bittorrent-dht 2). Answers carry BEP 42's `ip` (the querier's address as
//! seen here).
//!
//! **Storage.** An announce stores the peer (source IP, announced port, or
//! the source port with `implied_port`) under the info hash, keyed by
//! (info hash, IP, port), never by the announcer's node id, so a host's
//! re-announce refreshes its one entry. Entries live [`PEER_TTL`] after
//! their last announce. Port 0 is refused. Bounds ([`peers`]): 16 entries
//! per (info hash, source IP), the IP's least-recently-refreshed giving way;
//! 1024 per info hash, likewise; 4096 per source IP over all info hashes,
//! likewise; 262,144 entries in all, the IP holding the most giving up its
//! oldest when full. Expired entries are swept a bounded amount per tick.
//!
//! **BEP 44 items** ([`items`]): immutable and mutable items whose `v` is a
//! byte string of at most 999 bytes (what mainline and a Grape put), salts
//! of at most 64 bytes, signatures checked (ed25519, strict); kept 2 hours
//! after their last put, at most 1,024 per putting IP (its oldest giving
//! way) and 16,384 in all (the IP holding the most giving way), with the
//! `seq` of mutable items that left remembered against roll-backs; at most
//! [`node::PUTS_PER_SECOND_PER_IP`] puts per second per IP. The same store
//! answers a grape's `/get`.
//!
//! **Order.** `get_peers` answers at most 64 `values`: source IPs take turns
//! (the IP with fewer entries first), newest first within an IP; see
//! [`peers::PeerStore::peers`], which callers rely on.
//!
//! **Tokens** (BEP 5): SHA-1 of a random 16-byte secret and the querier's
//! IP; the secret changes every 5 minutes and the previous one still counts.
//!
//! **Routing table.** Nodes that query us without BEP 43's `ro` flag enter
//! it once they answer a ping of ours (a spoofed source never does); at most
//! 256, the longest-silent evicted; silent 15 minutes, forgotten.
//! `find_node` and `get_peers` name the 8 closest (XOR). With bootstrap
//! nodes, the node joins them (`find_node` of its own id, every minute) and
//! checks the nodes they name, so several `dht` nodes form one DHT.
//! Read-only queriers (our hosts) are answered but never enter the table.
//!
//! The protocol logic is [`node::KrpcNode`] (no I/O); [`DhtServer`] drives
//! it with a tokio UDP socket.

pub mod bep44;
pub mod items;
pub mod krpc;
pub mod node;
pub mod peers;

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use super::DiscoveryError;

/// How long an announced peer is kept after its last announce: hosts
/// re-announce every [`super::REANNOUNCE_INTERVAL`] (30 s), so two lost
/// announces in a row (2 × 30 s) plus 15 s for a slow round still keep a
/// live host, while a host that is gone leaves answers within 75 s.
pub const PEER_TTL: Duration = Duration::from_secs(2 * 30 + 15);

/// How often the node does its periodic work ([`node::KrpcNode::tick`]).
const TICK: Duration = Duration::from_secs(1);

/// What the server node did since it started. Gauges (`stored`, `nodes`)
/// are the current values; the rest count up.
#[derive(Debug, Default)]
pub struct ServerCounters {
    pub ping: AtomicU64,
    pub find_node: AtomicU64,
    pub get_peers: AtomicU64,
    pub announce_peer: AtomicU64,
    /// BEP 44 `get`.
    pub get: AtomicU64,
    /// BEP 44 `put`.
    pub put: AtomicU64,
    /// Queries of a method we do not know (answered 204).
    pub unknown_method: AtomicU64,
    /// Datagrams that were not KRPC or were oversized, and queries with bad
    /// arguments (answered 203).
    pub malformed: AtomicU64,
    /// Puts refused for their item (too big, bad signature, old `seq`, CAS
    /// mismatch, storage full).
    pub refused_item: AtomicU64,
    /// BEP 44 items stored now.
    pub items: AtomicU64,
    /// Announces and puts refused for a token that is not this IP's.
    pub refused_token: AtomicU64,
    /// Announces refused for port 0.
    pub refused_port: AtomicU64,
    /// Puts refused because the store is full (no room without forgetting
    /// a mutable item's seq mark early).
    pub refused_full: AtomicU64,
    /// Entries stored now.
    pub stored: AtomicU64,
    /// Entries and items dropped because they were not refreshed in time.
    pub expired: AtomicU64,
    /// Nodes in the routing table now.
    pub nodes: AtomicU64,
    /// Answers not sent: their destination IP was over
    /// [`BYTES_PER_SECOND_PER_IP`], or the node over
    /// [`BYTES_PER_SECOND_TOTAL`]; and puts over
    /// [`node::PUTS_PER_SECOND_PER_IP`].
    pub rate_limited: AtomicU64,
}

/// Bytes the node sends one IP per second, and at once. KRPC answers are
/// larger than the queries (a `get_peers` with 64 values: about 8×) and a
/// query's source address can be forged, so this bounds what the node can
/// be made to send any one address, whoever asks. A host re-announcing its
/// services, or a test planting 500 entries, stays well within it.
pub const BYTES_PER_SECOND_PER_IP: u32 = 20_000;
/// See [`BYTES_PER_SECOND_PER_IP`].
pub const BYTE_BURST_PER_IP: u32 = 64_000;
/// Most destination IPs whose rate is tracked; the least recently used is
/// forgotten first. A forgotten IP's budget starts full again, so there
/// are many: to reset one victim's budget, a spoofer must first make the
/// node answer this many other addresses (and [`BYTES_PER_SECOND_TOTAL`]
/// bounds that).
const MAX_RATED_IPS: usize = 65_536;
/// Bytes the node sends per second in all, and at once: the per-IP budget
/// bounds what one address receives; this bounds what many forged ones
/// together can make the node send (about 3,000–6,000 answers a second,
/// far beyond a private Grenache network's DHT traffic).
pub const BYTES_PER_SECOND_TOTAL: u32 = 2_000_000;
/// See [`BYTES_PER_SECOND_TOTAL`].
pub const BYTE_BURST_TOTAL: u32 = 4_000_000;

impl ServerCounters {
    /// One line for the log, e.g. `queries: 3 ping, 0 find_node, 10
    /// get_peers, 10 get, 2 put, 10 announce_peer, 0 unknown; 0 malformed;
    /// refused: 1 bad token, 0 port 0, 0 full, 0 items; 0 rate-limited; 1
    /// stored, 2 items, 0 expired; 0 nodes`.
    pub fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Relaxed);
        format!(
            "queries: {} ping, {} find_node, {} get_peers, {} get, {} put, {} announce_peer, {} unknown; \
             {} malformed; refused: {} bad token, {} port 0, {} full, {} items; {} rate-limited; \
             {} stored, {} items, {} expired; {} nodes",
            g(&self.ping),
            g(&self.find_node),
            g(&self.get_peers),
            g(&self.get),
            g(&self.put),
            g(&self.announce_peer),
            g(&self.unknown_method),
            g(&self.malformed),
            g(&self.refused_token),
            g(&self.refused_port),
            g(&self.refused_full),
            g(&self.refused_item),
            g(&self.rate_limited),
            g(&self.stored),
            g(&self.items),
            g(&self.expired),
            g(&self.nodes),
        )
    }
}

/// How to start a [`DhtServer`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to bind; port 0 for any free port.
    pub listen: SocketAddrV4,
    /// Nodes to join (`ip:port` or `host:port`); empty: a new DHT.
    pub bootstrap: Vec<String>,
    /// How long announced peers are kept ([`PEER_TTL`] by default;
    /// `Duration::MAX`: until the store needs the room).
    pub peer_ttl: Duration,
}

/// A running server node; stops when dropped.
pub struct DhtServer {
    local_addr: SocketAddrV4,
    id: krpc::Id,
    stores: Arc<node::Stores>,
    counters: Arc<ServerCounters>,
    task: tokio::task::JoinHandle<()>,
}

impl DhtServer {
    /// Binds the socket and starts serving, with a random node id.
    ///
    /// Errors: a bootstrap node that does not resolve to IPv4, or an
    /// address that cannot be bound (taken, not ours).
    pub async fn start(config: ServerConfig) -> Result<Self, DiscoveryError> {
        let bootstrap = super::dht::resolve_bootstrap(&config.bootstrap)?
            .iter()
            .filter_map(|a| a.parse::<SocketAddrV4>().ok())
            .collect();
        let socket = tokio::net::UdpSocket::bind(config.listen)
            .await
            .map_err(|e| DiscoveryError::Start(format!("{e} (binding {})", config.listen)))?;
        let local_addr = match socket.local_addr() {
            Ok(SocketAddr::V4(a)) => a,
            Ok(other) => return Err(DiscoveryError::Start(format!("bound {other}, not IPv4"))),
            Err(e) => return Err(DiscoveryError::Start(e.to_string())),
        };
        let counters = Arc::new(ServerCounters::default());
        let id = rand::random();
        let stores = Arc::new(node::Stores::new(config.peer_ttl));
        let node = node::KrpcNode::new(
            id,
            stores.clone(),
            bootstrap,
            counters.clone(),
            std::time::Instant::now(),
        );
        let task = tokio::spawn(serve(socket, node, counters.clone()));
        Ok(DhtServer {
            local_addr,
            id,
            stores,
            counters,
            task,
        })
    }

    /// The address the node listens on.
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local_addr
    }

    /// The node's id.
    pub fn id(&self) -> krpc::Id {
        self.id
    }

    /// What the node stores (announced peers, BEP 44 items): what its
    /// `get_peers` and `get` answer.
    pub fn stores(&self) -> &node::Stores {
        &self.stores
    }

    /// What the node did so far (shared: it keeps counting).
    pub fn counters(&self) -> &Arc<ServerCounters> {
        &self.counters
    }

    /// Waits `wait`, then warns if none of the `bootstrap` nodes (the
    /// node's `flag`, e.g. `--bn`) has answered: the node is then on a DHT
    /// of its own, which a mistyped address otherwise leaves unsaid.
    pub fn warn_if_alone(&self, bootstrap: &[String], flag: &'static str, wait: Duration) {
        if bootstrap.is_empty() {
            return;
        }
        let counters = self.counters.clone();
        let named = bootstrap.join(", ");
        // Detached: it ends on its own after `wait`.
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if counters.nodes.load(Relaxed) == 0 {
                tracing::warn!(
                    "no DHT node answered at {flag} {named} within {wait:?}: this node is on a DHT of its own until one does; check the address (a grape's --dp port or a `grenache-host dht` node's --listen)"
                );
            }
        });
    }
}

impl Drop for DhtServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads datagrams and ticks the node until aborted.
async fn serve(
    socket: tokio::net::UdpSocket,
    mut node: node::KrpcNode,
    counters: Arc<ServerCounters>,
) {
    let mut rates =
        crate::units::TokenBuckets::new(BYTES_PER_SECOND_PER_IP, BYTE_BURST_PER_IP, MAX_RATED_IPS);
    let mut total = crate::units::TokenBucket::new(
        std::time::Instant::now(),
        BYTES_PER_SECOND_TOTAL,
        BYTE_BURST_TOTAL,
    );
    // One byte more than the largest datagram, so an oversized one shows.
    let mut buf = vec![0u8; krpc::MAX_DATAGRAM + 1];
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::new();
    loop {
        tokio::select! {
            received = socket.recv_from(&mut buf) => match received {
                Ok((len, SocketAddr::V4(from))) => {
                    node.handle(std::time::Instant::now(), from, &buf[..len], &mut out);
                }
                Ok((_, SocketAddr::V6(_))) => {}
                // ICMP errors of earlier sends and the like: the socket
                // stays usable.
                Err(e) => tracing::debug!("DHT server socket: {e}"),
            },
            _ = tick.tick() => node.tick(std::time::Instant::now(), &mut out),
        }
        let now = std::time::Instant::now();
        for datagram in out.drain(..) {
            let size = datagram.bytes.len() as u32;
            if !rates.take_many(*datagram.to.ip(), now, size) || !total.take_many(now, size) {
                counters.rate_limited.fetch_add(1, Relaxed);
                continue;
            }
            if let Err(e) = socket.send_to(&datagram.bytes, datagram.to).await {
                tracing::debug!("DHT server: cannot send to {}: {e}", datagram.to);
            }
        }
    }
}
