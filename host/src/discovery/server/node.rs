//! The server node's protocol logic without I/O: datagrams and the time come
//! in, datagrams to send go out. [`super::DhtServer`] drives it with a UDP
//! socket and tokio's clock; the unit tests drive it directly.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::bep44;
use super::items::{ItemStore, PutRefused, Signed, StoredValue};
use super::krpc::{self, Body, DecodeError, Id, Message, Put, Query};
use super::peers::{PeerStore, MAX_VALUES};
use super::ServerCounters;

/// What the node stores, shared with whoever else stores or reads locally
/// (a grape's HTTP API announces, puts and gets through them).
#[derive(Debug)]
pub struct Stores {
    /// Announced peers (BEP 5).
    pub peers: Mutex<PeerStore>,
    /// BEP 44 items.
    pub items: Mutex<ItemStore>,
    /// Addresses whose `announce_peer`s and `put`s are answered but not
    /// stored: a grape's own query node, whose announces and values the
    /// grape stores here itself (announces under the address it answers
    /// lookups with).
    local_announcers: Mutex<std::collections::HashSet<SocketAddrV4>>,
}

impl Stores {
    /// Empty stores whose announced peers live `peer_ttl`.
    pub fn new(peer_ttl: Duration) -> Self {
        Stores {
            peers: Mutex::new(PeerStore::new(peer_ttl)),
            items: Mutex::new(ItemStore::default()),
            local_announcers: Mutex::default(),
        }
    }

    /// The peer store, whatever a panicking holder left (each of its
    /// operations leaves it consistent).
    pub fn peers(&self) -> std::sync::MutexGuard<'_, PeerStore> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The item store (see [`Stores::peers`]).
    pub fn items(&self) -> std::sync::MutexGuard<'_, ItemStore> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn local_announcers(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashSet<SocketAddrV4>> {
        self.local_announcers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Answers `announce_peer`s and `put`s from `addr` without storing
    /// them (see the field of that name).
    pub fn add_local_announcer(&self, addr: SocketAddrV4) {
        self.local_announcers().insert(addr);
    }

    fn is_local_announcer(&self, addr: SocketAddrV4) -> bool {
        self.local_announcers().contains(&addr)
    }
}

/// How often the token secret changes (BEP 5: "every five minutes"); a
/// token stays good until the next change after that, 5-10 minutes.
pub const TOKEN_ROTATION: Duration = Duration::from_secs(300);
/// Most nodes in the routing table; beyond it the longest-silent goes.
pub const MAX_NODES: usize = 256;
/// A node silent (no query, no answer) this long leaves the table.
pub const NODE_SILENCE: Duration = Duration::from_secs(15 * 60);
/// Nodes given in a `find_node` / `get_peers` answer (BEP 5's K).
pub const CLOSEST: usize = 8;
/// Most of our own queries (pings, joins) awaiting an answer at once; a
/// flood of new node ids cannot make us send more.
pub const MAX_PENDING: usize = 256;
/// How long we wait for an answer to one of our queries.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a node started with bootstrap nodes asks them again
/// (`find_node` of its own id), so nodes that restarted are found again.
pub const REJOIN_INTERVAL: Duration = Duration::from_secs(60);
/// BEP 44 puts taken from one IP per second, and at once: a put may cost a
/// signature verification (15–60 µs, measured), so one IP can take at most
/// about 1% of a core this way. Another grape's query node puts what its
/// HTTP clients put; this grape's own is answered without storing (the
/// grape stored the value already).
pub const PUTS_PER_SECOND_PER_IP: u32 = 200;
/// See [`PUTS_PER_SECOND_PER_IP`].
pub const PUT_BURST_PER_IP: u32 = 1000;
/// Most expired entries looked at per tick (see [`PeerStore::sweep`]).
pub const SWEEP_BUDGET: usize = 4096;

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub to: SocketAddrV4,
    pub bytes: Vec<u8>,
}

/// BEP 5 tokens: SHA-1 of a random 16-byte secret followed by the querier's
/// IPv4 address; the secret changes every [`TOKEN_ROTATION`] and the
/// previous one is still accepted.
#[derive(Debug)]
struct Tokens {
    current: [u8; 16],
    previous: [u8; 16],
    rotated: Instant,
}

impl Tokens {
    fn new(now: Instant) -> Self {
        Tokens {
            current: rand::random(),
            previous: rand::random(),
            rotated: now,
        }
    }

    fn make(secret: &[u8; 16], ip: Ipv4Addr) -> [u8; 20] {
        let mut sha = sha1_smol::Sha1::new();
        sha.update(secret);
        sha.update(&ip.octets());
        sha.digest().bytes()
    }

    fn issue(&self, ip: Ipv4Addr) -> [u8; 20] {
        Self::make(&self.current, ip)
    }

    fn accepts(&self, ip: Ipv4Addr, token: &[u8]) -> bool {
        token == Self::make(&self.current, ip) || token == Self::make(&self.previous, ip)
    }

    fn rotate_if_due(&mut self, now: Instant) {
        if now.saturating_duration_since(self.rotated) >= TOKEN_ROTATION {
            self.previous = self.current;
            self.current = rand::random();
            self.rotated = now;
        }
    }
}

/// A query of ours awaiting its answer.
#[derive(Debug, Clone, Copy)]
struct Pending {
    to: SocketAddrV4,
    sent: Instant,
    /// `Some(id)`: a ping checking that node `id` really is at `to`;
    /// `None`: a `find_node` joining through a bootstrap node.
    verifies: Option<Id>,
}

/// The KRPC server node's state: identity, tokens, peer storage, routing
/// table and our own queries in flight.
pub struct KrpcNode {
    id: Id,
    tokens: Tokens,
    stores: Arc<Stores>,
    /// Puts taken per source IP ([`PUTS_PER_SECOND_PER_IP`]).
    puts: crate::units::TokenBuckets<Ipv4Addr>,
    /// Verified nodes: id → (address, last heard from).
    table: HashMap<Id, (SocketAddrV4, Instant)>,
    pending: HashMap<u16, Pending>,
    next_tid: u16,
    bootstrap: Vec<SocketAddrV4>,
    last_join: Option<Instant>,
    counters: Arc<ServerCounters>,
}

impl KrpcNode {
    /// A node with id `id` keeping what it is told in `stores`, joining
    /// through `bootstrap` (none: a new DHT).
    pub fn new(
        id: Id,
        stores: Arc<Stores>,
        bootstrap: Vec<SocketAddrV4>,
        counters: Arc<ServerCounters>,
        now: Instant,
    ) -> Self {
        KrpcNode {
            id,
            tokens: Tokens::new(now),
            stores,
            puts: crate::units::TokenBuckets::new(PUTS_PER_SECOND_PER_IP, PUT_BURST_PER_IP, 4096),
            table: HashMap::new(),
            pending: HashMap::new(),
            next_tid: rand::random(),
            bootstrap,
            last_join: None,
            counters,
        }
    }

    /// Nodes in the routing table.
    pub fn nodes(&self) -> usize {
        self.table.len()
    }

    /// Handles one datagram from `from`, pushing what to send to `out`.
    pub fn handle(
        &mut self,
        now: Instant,
        from: SocketAddrV4,
        bytes: &[u8],
        out: &mut Vec<Outgoing>,
    ) {
        let c = &self.counters;
        match krpc::decode(bytes) {
            Err(DecodeError::Malformed) => {
                c.malformed.fetch_add(1, Relaxed);
            }
            Err(DecodeError::Refused { t, code, message }) => {
                if code == krpc::METHOD_UNKNOWN {
                    c.unknown_method.fetch_add(1, Relaxed);
                } else {
                    c.malformed.fetch_add(1, Relaxed);
                }
                out.push(Outgoing {
                    to: from,
                    bytes: krpc::error(&t, code, &message),
                });
            }
            Ok(Message::Query {
                t,
                id,
                read_only,
                query,
            }) => {
                if !read_only {
                    self.heard_from(now, id, from, out);
                }
                let bytes = self.answer(now, from, &t, query);
                out.push(Outgoing { to: from, bytes });
            }
            Ok(Message::Response { t, id, nodes }) => {
                self.answered(now, from, &t, Some((id, nodes)), out)
            }
            Ok(Message::Error { t }) => self.answered(now, from, &t, None, out),
        }
    }

    /// The answer to `query` from `from`.
    fn answer(&mut self, now: Instant, from: SocketAddrV4, t: &[u8], query: Query) -> Vec<u8> {
        let c = self.counters.clone();
        let body = Body {
            id: self.id,
            ..Body::default()
        };
        let body = match query {
            Query::Ping => {
                c.ping.fetch_add(1, Relaxed);
                body
            }
            Query::FindNode { target } => {
                c.find_node.fetch_add(1, Relaxed);
                Body {
                    nodes: Some(krpc::compact_nodes(&self.closest(&target))),
                    ..body
                }
            }
            Query::GetPeers { info_hash } => {
                c.get_peers.fetch_add(1, Relaxed);
                let values = self.stores.peers().peers(now, &info_hash, MAX_VALUES);
                Body {
                    nodes: Some(krpc::compact_nodes(&self.closest(&info_hash))),
                    values: (!values.is_empty()).then_some(values),
                    token: Some(self.tokens.issue(*from.ip()).to_vec()),
                    ..body
                }
            }
            Query::Get { target, seq } => {
                c.get.fetch_add(1, Relaxed);
                let body = Body {
                    nodes: Some(krpc::compact_nodes(&self.closest(&target))),
                    token: Some(self.tokens.issue(*from.ip()).to_vec()),
                    ..body
                };
                match self.stores.items().get(now, &target) {
                    None => body,
                    Some(StoredValue {
                        value,
                        signed: None,
                    }) => Body {
                        v: Some(value.clone()),
                        ..body
                    },
                    // BEP 44: no newer than the asker's: its seq only.
                    Some(StoredValue {
                        signed: Some(signed),
                        ..
                    }) if seq.is_some_and(|seq| signed.seq <= seq) => Body {
                        seq: Some(signed.seq),
                        ..body
                    },
                    Some(StoredValue {
                        value,
                        signed: Some(signed),
                    }) => Body {
                        v: Some(value.clone()),
                        k: Some(signed.key),
                        sig: Some(signed.signature),
                        seq: Some(signed.seq),
                        ..body
                    },
                }
            }
            Query::Put(put) => {
                c.put.fetch_add(1, Relaxed);
                // A grape's own query node: the grape put it here already.
                if self.stores.is_local_announcer(from) {
                    return krpc::response(t, from, body);
                }
                if !self.tokens.accepts(*from.ip(), &put.token) {
                    c.refused_token.fetch_add(1, Relaxed);
                    return krpc::error(
                        t,
                        krpc::PROTOCOL_ERROR,
                        "bad token; get a fresh one with get",
                    );
                }
                if let Err((code, message)) = self.store(now, *from.ip(), put) {
                    c.refused_item.fetch_add(1, Relaxed);
                    return krpc::error(t, code, &message);
                }
                body
            }
            Query::AnnouncePeer {
                info_hash,
                port,
                implied_port,
                token,
            } => {
                c.announce_peer.fetch_add(1, Relaxed);
                if !self.tokens.accepts(*from.ip(), &token) {
                    c.refused_token.fetch_add(1, Relaxed);
                    return krpc::error(
                        t,
                        krpc::PROTOCOL_ERROR,
                        "bad token; get a fresh one with get_peers",
                    );
                }
                let port = if implied_port { from.port() } else { port };
                if port == 0 {
                    c.refused_port.fetch_add(1, Relaxed);
                    return krpc::error(t, krpc::PROTOCOL_ERROR, "port 0");
                }
                if self.stores.is_local_announcer(from) {
                    return krpc::response(t, from, body);
                }
                let mut peers = self.stores.peers();
                let (_, expired) =
                    peers.announce(now, info_hash, SocketAddrV4::new(*from.ip(), port));
                c.expired.fetch_add(expired as u64, Relaxed);
                c.stored.store(peers.len() as u64, Relaxed);
                drop(peers);
                body
            }
        };
        krpc::response(t, from, body)
    }

    /// Checks a `put` (BEP 44: sizes, signature, `seq` and `cas`) and keeps
    /// its item; the KRPC error code and message when refused.
    fn store(&mut self, now: Instant, from: Ipv4Addr, put: Put) -> Result<(), (i64, String)> {
        let Put {
            v,
            mutable,
            cas,
            salt,
            ..
        } = put;
        if v.len() > bep44::MAX_VALUE_BYTES {
            return Err((205, "message (v field) too big".into()));
        }
        if salt
            .as_ref()
            .is_some_and(|s| s.len() > bep44::MAX_SALT_BYTES)
        {
            return Err((207, "salt (salt field) too big".into()));
        }
        if !self.puts.take(from, now) {
            self.counters.rate_limited.fetch_add(1, Relaxed);
            return Err((krpc::GENERIC_ERROR, "too many puts; slow down".into()));
        }
        // BEP 44 puts salt into the target and signature only when it is
        // not empty.
        let salt = salt.filter(|s| !s.is_empty());
        let (target, value) = match mutable {
            None => (
                bep44::immutable_key(&v),
                StoredValue {
                    value: v,
                    signed: None,
                },
            ),
            Some(m) => (
                bep44::mutable_target(&m.k, salt.as_deref()),
                StoredValue {
                    value: v,
                    signed: Some(Signed {
                        key: m.k,
                        signature: m.sig,
                        seq: m.seq,
                        salt,
                    }),
                },
            ),
        };
        // What the store would refuse anyway is refused before the
        // signature costs a verification.
        let counters = &self.counters;
        let refused = |r: PutRefused| {
            if r == PutRefused::Full {
                counters.refused_full.fetch_add(1, Relaxed);
            }
            (r.code(), r.to_string())
        };
        self.stores
            .items()
            .check(now, &target, &value, cas)
            .map_err(refused)?;
        if let Some(signed) = &value.signed {
            let salt = signed.salt.as_deref();
            let holds = bep44::signature_holds(
                &signed.key,
                &signed.signature,
                signed.seq,
                &value.value,
                salt,
            );
            if !holds {
                return Err((206, "invalid signature".into()));
            }
        }
        let mut items = self.stores.items();
        let stored = items.put(now, target, value, cas, from);
        self.counters.items.store(items.len() as u64, Relaxed);
        stored.map_err(refused)
    }

    /// The [`CLOSEST`] table nodes closest to `target` (XOR distance).
    fn closest(&self, target: &Id) -> Vec<(Id, SocketAddrV4)> {
        let mut nodes: Vec<(Id, SocketAddrV4)> = self
            .table
            .iter()
            .map(|(id, (addr, _))| (*id, *addr))
            .collect();
        nodes.sort_by_key(|(id, _)| xor(id, target));
        nodes.truncate(CLOSEST);
        nodes
    }

    /// A non-read-only query from node `id` at `from`: refresh it if the
    /// table has it there, else ping it (spoofed sources never answer).
    fn heard_from(&mut self, now: Instant, id: Id, from: SocketAddrV4, out: &mut Vec<Outgoing>) {
        match self.table.get_mut(&id) {
            Some(entry) if entry.0 == from => entry.1 = now,
            _ => self.verify(now, id, from, out),
        }
    }

    /// Pings `addr` to check that node `id` is there, unless already asked.
    fn verify(&mut self, now: Instant, id: Id, addr: SocketAddrV4, out: &mut Vec<Outgoing>) {
        if id == self.id || self.pending.values().any(|p| p.to == addr) {
            return;
        }
        self.send_query(now, addr, Some(id), "ping", None, out);
    }

    fn send_query(
        &mut self,
        now: Instant,
        to: SocketAddrV4,
        verifies: Option<Id>,
        method: &'static str,
        target: Option<Id>,
        out: &mut Vec<Outgoing>,
    ) {
        if self.pending.len() >= MAX_PENDING {
            return;
        }
        let tid = self.next_tid;
        self.next_tid = self.next_tid.wrapping_add(1);
        self.pending.insert(
            tid,
            Pending {
                to,
                sent: now,
                verifies,
            },
        );
        let body = Body {
            id: self.id,
            target,
            ..Body::default()
        };
        out.push(Outgoing {
            to,
            bytes: krpc::query(&tid.to_be_bytes(), method, body),
        });
    }

    /// An answer (`Some((id, nodes))`) or error (`None`) to one of our
    /// queries.
    fn answered(
        &mut self,
        now: Instant,
        from: SocketAddrV4,
        t: &[u8],
        answer: Option<(Id, Vec<(Id, SocketAddrV4)>)>,
        out: &mut Vec<Outgoing>,
    ) {
        let Ok(tid) = <[u8; 2]>::try_from(t).map(u16::from_be_bytes) else {
            return;
        };
        // Only from the address asked: anyone can guess a 2-byte id.
        if self.pending.get(&tid).is_none_or(|p| p.to != from) {
            return;
        }
        let Some(pending) = self.pending.remove(&tid) else {
            return;
        };
        let Some((id, nodes)) = answer else {
            return;
        };
        if id == self.id || pending.verifies.is_some_and(|claimed| claimed != id) {
            return;
        }
        self.insert(now, id, from);
        if pending.verifies.is_none() {
            // A bootstrap node's find_node answer: check each node it names.
            for (id, addr) in nodes {
                if !self.table.contains_key(&id) {
                    self.verify(now, id, addr, out);
                }
            }
        }
    }

    /// Adds verified node `id` at `addr`: one id per address, the
    /// longest-silent node evicted when full.
    fn insert(&mut self, now: Instant, id: Id, addr: SocketAddrV4) {
        self.table
            .retain(|other, (a, _)| *a != addr || *other == id);
        if !self.table.contains_key(&id) && self.table.len() >= MAX_NODES {
            if let Some(silent) = self
                .table
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(id, _)| *id)
            {
                self.table.remove(&silent);
            }
        }
        self.table.insert(id, (addr, now));
        self.counters.nodes.store(self.table.len() as u64, Relaxed);
    }

    /// Periodic work: token rotation, expiry, forgetting silent nodes and
    /// unanswered queries, (re)joining through the bootstrap nodes.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Outgoing>) {
        self.tokens.rotate_if_due(now);
        let mut peers = self.stores.peers();
        let expired = peers.sweep(now, SWEEP_BUDGET);
        self.counters.expired.fetch_add(expired as u64, Relaxed);
        self.counters.stored.store(peers.len() as u64, Relaxed);
        drop(peers);
        let mut items = self.stores.items();
        let expired = items.sweep(now, SWEEP_BUDGET);
        self.counters.expired.fetch_add(expired as u64, Relaxed);
        self.counters.items.store(items.len() as u64, Relaxed);
        drop(items);
        self.pending
            .retain(|_, p| now.saturating_duration_since(p.sent) < QUERY_TIMEOUT);
        self.table
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < NODE_SILENCE);
        self.counters.nodes.store(self.table.len() as u64, Relaxed);
        let join_due = self
            .last_join
            .is_none_or(|at| now.saturating_duration_since(at) >= REJOIN_INTERVAL);
        if join_due && !self.bootstrap.is_empty() {
            self.last_join = Some(now);
            for addr in self.bootstrap.clone() {
                self.send_query(now, addr, None, "find_node", Some(self.id), out);
            }
        }
    }
}

fn xor(a: &Id, b: &Id) -> Id {
    std::array::from_fn(|i| a[i] ^ b[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: Id = [9; 20];

    fn node(now: Instant) -> KrpcNode {
        KrpcNode::new(
            [1; 20],
            Arc::new(Stores::new(Duration::from_secs(75))),
            vec![],
            Arc::default(),
            now,
        )
    }

    fn addr(ip: [u8; 4], port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(ip.into(), port)
    }

    /// Sends `query` (method, arguments as bencoded dict content) from
    /// `from` and returns the single datagram answered.
    fn ask(
        n: &mut KrpcNode,
        now: Instant,
        from: SocketAddrV4,
        query: &str,
        args: &[u8],
        ro: bool,
    ) -> (Vec<u8>, Vec<Outgoing>) {
        let mut msg = format!("d1:ad2:id20:{}", "q".repeat(20)).into_bytes();
        msg.extend_from_slice(args);
        msg.extend_from_slice(format!("e1:q{}:{query}", query.len()).as_bytes());
        if ro {
            msg.extend_from_slice(b"2:roi1e");
        }
        msg.extend_from_slice(b"1:t2:tt1:y1:qe");
        let mut out = Vec::new();
        n.handle(now, from, &msg, &mut out);
        let answer = out
            .iter()
            .position(|o| o.bytes.windows(8).any(|w| w == b"1:t2:tt1"))
            .expect("an answer");
        let answer = out.remove(answer);
        assert_eq!(answer.to, from);
        (answer.bytes, out)
    }

    fn token_of(answer: &[u8]) -> Vec<u8> {
        let at = answer
            .windows(9)
            .position(|w| w == b"5:token20")
            .expect("a token")
            + 10;
        answer[at..at + 20].to_vec()
    }

    fn announce_args(port: u16, token: &[u8]) -> Vec<u8> {
        let mut a = format!(
            "9:info_hash20:{}4:porti{port}e5:token{}:",
            "\x09".repeat(20),
            token.len()
        )
        .into_bytes();
        a.extend_from_slice(token);
        a
    }

    /// Announces `port` from `from` with `token` and checks it was taken.
    fn announce_ok(n: &mut KrpcNode, now: Instant, from: SocketAddrV4, port: u16, token: &[u8]) {
        let (ok, _) = ask(
            n,
            now,
            from,
            "announce_peer",
            &announce_args(port, token),
            true,
        );
        assert!(
            ok.starts_with(b"d2:ip6:"),
            "{}",
            String::from_utf8_lossy(&ok)
        );
    }

    #[test]
    fn tokens_are_per_ip_and_outlive_one_rotation_only() {
        let t0 = Instant::now();
        let mut tokens = Tokens::new(t0);
        let ip = Ipv4Addr::new(127, 0, 0, 1);
        let token = tokens.issue(ip);
        assert!(tokens.accepts(ip, &token));
        assert!(!tokens.accepts(Ipv4Addr::new(127, 0, 0, 2), &token));
        tokens.rotate_if_due(t0 + TOKEN_ROTATION - Duration::from_secs(1));
        assert!(tokens.accepts(ip, &token));
        tokens.rotate_if_due(t0 + TOKEN_ROTATION);
        assert!(
            tokens.accepts(ip, &token),
            "the previous secret still counts"
        );
        tokens.rotate_if_due(t0 + 2 * TOKEN_ROTATION);
        assert!(!tokens.accepts(ip, &token));
    }

    /// Bencoded `key` + byte string `value`.
    fn bstr(key: &str, value: &[u8]) -> Vec<u8> {
        let mut out = format!("{}:{key}{}:", key.len(), value.len()).into_bytes();
        out.extend_from_slice(value);
        out
    }

    /// The decoded answer's `r` dictionary.
    fn answer_body(answer: &[u8]) -> serde_bencode::value::Value {
        use serde_bencode::value::Value;
        let Ok(Value::Dict(top)) = serde_bencode::from_bytes::<Value>(answer) else {
            panic!("not a dictionary: {}", String::from_utf8_lossy(answer));
        };
        top.get(&b"r"[..])
            .cloned()
            .unwrap_or_else(|| panic!("no r: {}", String::from_utf8_lossy(answer)))
    }

    fn field<'a>(
        body: &'a serde_bencode::value::Value,
        key: &str,
    ) -> Option<&'a serde_bencode::value::Value> {
        match body {
            serde_bencode::value::Value::Dict(d) => d.get(key.as_bytes()),
            _ => None,
        }
    }

    fn bytes_field(body: &serde_bencode::value::Value, key: &str) -> Option<Vec<u8>> {
        match field(body, key) {
            Some(serde_bencode::value::Value::Bytes(b)) => Some(b.clone()),
            _ => None,
        }
    }

    fn get_token(n: &mut KrpcNode, now: Instant, from: SocketAddrV4, target: &Id) -> Vec<u8> {
        let (answer, _) = ask(n, now, from, "get", &bstr("target", target), true);
        token_of(&answer)
    }

    #[test]
    fn an_immutable_item_is_put_with_a_token_and_got_back_by_its_hash() {
        let now = Instant::now();
        let mut n = node(now);
        let host = addr([127, 0, 0, 1], 40000);
        let target = bep44::immutable_key(b"hello world");
        let token = get_token(&mut n, now, host, &target);
        let put = |n: &mut KrpcNode, token: &[u8], v: &[u8]| {
            let args = [bstr("token", token), bstr("v", v)].concat();
            ask(n, now, host, "put", &args, true).0
        };
        let refused = put(&mut n, b"nope", b"hello world");
        assert!(refused.starts_with(b"d1:eli203e"), "{refused:?}");
        let too_big = put(&mut n, &token, &[b'x'; bep44::MAX_VALUE_BYTES + 1]);
        assert!(too_big.starts_with(b"d1:eli205e"), "{too_big:?}");
        let ok = put(&mut n, &token, b"hello world");
        assert!(
            ok.starts_with(b"d2:ip6:"),
            "{}",
            String::from_utf8_lossy(&ok)
        );

        let (answer, _) = ask(&mut n, now, host, "get", &bstr("target", &target), true);
        let body = answer_body(&answer);
        assert_eq!(
            bytes_field(&body, "v").as_deref(),
            Some(&b"hello world"[..])
        );
        assert!(bytes_field(&body, "k").is_none());
        // Another target: token and nodes, no value.
        let (answer, _) = ask(&mut n, now, host, "get", &bstr("target", &[3; 20]), true);
        let body = answer_body(&answer);
        assert!(bytes_field(&body, "v").is_none());
        assert!(bytes_field(&body, "token").is_some());
    }

    #[test]
    fn a_mutable_item_needs_its_signature_and_a_newer_seq() {
        use ed25519_dalek::{Signer, SigningKey};
        let now = Instant::now();
        let mut n = node(now);
        let host = addr([127, 0, 0, 1], 40000);
        let key = SigningKey::from_bytes(&[5; 32]);
        let k = key.verifying_key().to_bytes();
        let target = bep44::mutable_target(&k, Some(b"salt"));
        let token = get_token(&mut n, now, host, &target);
        let put = |n: &mut KrpcNode, v: &[u8], seq: i64, sig: [u8; 64], cas: Option<i64>| {
            let mut args = cas
                .map(|cas| format!("3:casi{cas}e").into_bytes())
                .unwrap_or_default();
            args.extend([bstr("k", &k), bstr("salt", b"salt")].concat());
            args.extend(format!("3:seqi{seq}e").into_bytes());
            args.extend([bstr("sig", &sig), bstr("token", &token), bstr("v", v)].concat());
            let (answer, _) = ask(n, now, host, "put", &args, true);
            String::from_utf8_lossy(&answer).into_owned()
        };
        let sign = |v: &[u8], seq| {
            key.sign(&bep44::signed_bytes(seq, v, Some(b"salt")))
                .to_bytes()
        };

        let mut forged = sign(b"v2", 2);
        forged[0] ^= 1;
        assert!(put(&mut n, b"v2", 2, forged, None).starts_with("d1:eli206e"));
        assert!(put(&mut n, b"v2", 2, sign(b"v2", 2), None).starts_with("d2:ip"));
        let older = put(&mut n, b"v1", 1, sign(b"v1", 1), None);
        assert!(older.starts_with("d1:eli302e"), "{older}");
        let cas = put(&mut n, b"v3", 3, sign(b"v3", 3), Some(1));
        assert!(cas.starts_with("d1:eli301e"), "{cas}");

        let (answer, _) = ask(&mut n, now, host, "get", &bstr("target", &target), true);
        let body = answer_body(&answer);
        assert_eq!(bytes_field(&body, "v").as_deref(), Some(&b"v2"[..]));
        assert_eq!(bytes_field(&body, "k").as_deref(), Some(&k[..]));
        assert_eq!(
            bytes_field(&body, "sig").as_deref(),
            Some(&sign(b"v2", 2)[..])
        );
        assert_eq!(
            field(&body, "seq"),
            Some(&serde_bencode::value::Value::Int(2))
        );
        // The asker already has seq 2: the seq only.
        let args = [b"3:seqi2e".to_vec(), bstr("target", &target)].concat();
        let (answer, _) = ask(&mut n, now, host, "get", &args, true);
        let body = answer_body(&answer);
        assert!(bytes_field(&body, "v").is_none());
        assert_eq!(
            field(&body, "seq"),
            Some(&serde_bencode::value::Value::Int(2))
        );
        assert_eq!(n.counters.refused_item.load(Relaxed), 3);
        assert_eq!(n.counters.items.load(Relaxed), 1);
    }

    #[test]
    fn announce_needs_a_token_for_its_ip_and_a_port() {
        let now = Instant::now();
        let mut n = node(now);
        let host = addr([127, 0, 0, 1], 40000);
        let (answer, _) = ask(
            &mut n,
            now,
            host,
            "get_peers",
            format!("9:info_hash20:{}", "\x09".repeat(20)).as_bytes(),
            true,
        );
        let token = token_of(&answer);

        let (refused, _) = ask(
            &mut n,
            now,
            host,
            "announce_peer",
            &announce_args(5000, b"nope"),
            true,
        );
        assert!(
            refused.starts_with(b"d1:eli203e41:bad token"),
            "{}",
            String::from_utf8_lossy(&refused)
        );
        let other_ip = addr([127, 0, 0, 2], 40000);
        let (refused, _) = ask(
            &mut n,
            now,
            other_ip,
            "announce_peer",
            &announce_args(5000, &token),
            true,
        );
        assert!(refused.starts_with(b"d1:eli203e"));
        let (refused, _) = ask(
            &mut n,
            now,
            host,
            "announce_peer",
            &announce_args(0, &token),
            true,
        );
        assert!(refused.starts_with(b"d1:eli203e6:port 0"));
        assert_eq!(n.counters.refused_token.load(Relaxed), 2);
        assert_eq!(n.counters.refused_port.load(Relaxed), 1);
        assert!(n.stores.peers().is_empty());

        announce_ok(&mut n, now, host, 5000, &token);
        // implied_port: the source port.
        let mut implied = announce_args(0, &token);
        implied.extend_from_slice(b"12:implied_porti1e");
        ask(
            &mut n,
            now + Duration::from_millis(1),
            host,
            "announce_peer",
            &implied,
            true,
        );
        assert_eq!(
            n.stores
                .peers()
                .peers(now + Duration::from_millis(1), &KEY, 64),
            vec![addr([127, 0, 0, 1], 40000), addr([127, 0, 0, 1], 5000)]
        );
        assert_eq!(n.counters.stored.load(Relaxed), 2);
        assert_eq!(n.counters.announce_peer.load(Relaxed), 5);
    }

    #[test]
    fn a_full_store_still_takes_a_new_service() {
        let now = Instant::now();
        let mut n = node(now);
        // Every entry taken, each info hash announced from two IPs.
        use super::super::peers::{MAX_ENTRIES, MAX_ENTRIES_PER_IP};
        for k in 0..(MAX_ENTRIES / 2) as u32 {
            let mut key = [0xee; 20];
            key[..4].copy_from_slice(&k.to_be_bytes());
            let share = (k / MAX_ENTRIES_PER_IP as u32) as u8;
            n.stores
                .peers()
                .announce(now, key, addr([10, 0, share, 1], 1));
            n.stores
                .peers()
                .announce(now, key, addr([10, 1, share, 1], 1));
        }
        assert_eq!(n.stores.peers().len(), MAX_ENTRIES);
        let host = addr([127, 0, 0, 1], 40000);
        let (answer, _) = ask(
            &mut n,
            now,
            host,
            "get",
            format!("6:target20:{}", "\x09".repeat(20)).as_bytes(),
            true,
        );
        let (taken, _) = ask(
            &mut n,
            now,
            host,
            "announce_peer",
            &announce_args(5000, &token_of(&answer)),
            true,
        );
        assert!(
            taken.starts_with(b"d2:ip6:"),
            "{}",
            String::from_utf8_lossy(&taken)
        );
        assert_eq!(
            n.stores.peers().peers(now, &KEY, 64),
            vec![SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5000)]
        );
    }

    #[test]
    fn get_peers_answers_values_token_and_nodes() {
        let now = Instant::now();
        let mut n = node(now);
        n.stores.peers().announce(now, KEY, addr([10, 0, 0, 1], 7));
        let (answer, _) = ask(
            &mut n,
            now,
            addr([127, 0, 0, 1], 1),
            "get_peers",
            format!("9:info_hash20:{}", "\x09".repeat(20)).as_bytes(),
            true,
        );
        let text = String::from_utf8_lossy(&answer);
        assert!(
            answer.windows(13).any(|w| w == b"6:valuesl6:\x0a\x00"),
            "{text}"
        );
        assert!(text.contains("5:nodes0:"), "{text}");
        assert!(text.contains("5:token20:"), "{text}");
    }

    #[test]
    fn bep44_get_answers_a_token_that_announce_peer_takes() {
        // mainline's client finds where to announce with `get`, then
        // announces with the token of its answer.
        let now = Instant::now();
        let mut n = node(now);
        let host = addr([127, 0, 0, 1], 40000);
        let target = format!("6:target20:{}", "\x09".repeat(20));
        let (answer, _) = ask(&mut n, now, host, "get", target.as_bytes(), true);
        assert!(
            !answer.windows(2).any(|w| w == b"1:v"),
            "no value stored here"
        );
        let token = token_of(&answer);
        announce_ok(&mut n, now, host, 5000, &token);
        assert_eq!(n.counters.get.load(Relaxed), 1);
        assert_eq!(
            n.stores.peers().peers(now, &KEY, 64),
            vec![addr([127, 0, 0, 1], 5000)]
        );
    }

    #[test]
    fn only_nodes_that_answer_our_ping_enter_the_table_and_ro_ones_never() {
        let now = Instant::now();
        let mut n = node(now);
        let reader = addr([127, 0, 0, 5], 5);
        let (_, extra) = ask(&mut n, now, reader, "ping", b"", true);
        assert!(extra.is_empty(), "read-only queriers are not pinged");

        let server = addr([127, 0, 0, 6], 6);
        let (_, extra) = ask(&mut n, now, server, "ping", b"", false);
        assert_eq!(extra.len(), 1, "one verification ping");
        let ping = &extra[0];
        assert_eq!(ping.to, server);
        let Ok(Message::Query {
            t,
            query: Query::Ping,
            ..
        }) = krpc::decode(&ping.bytes)
        else {
            panic!("{:?}", String::from_utf8_lossy(&ping.bytes));
        };
        assert_eq!(n.nodes(), 0);
        // An answer from elsewhere does not count, nor one with another id.
        let claimed = [b'q'; 20];
        let answer = |t: &[u8], id: Id| {
            krpc::response(
                t,
                server,
                Body {
                    id,
                    ..Body::default()
                },
            )
        };
        let mut out = Vec::new();
        n.handle(now, addr([127, 0, 0, 7], 6), &answer(&t, claimed), &mut out);
        let (_, again) = ask(&mut n, now, server, "ping", b"", false);
        assert!(again.is_empty(), "one ping in flight per address");
        n.handle(now, server, &answer(&t, [3; 20]), &mut out);
        assert_eq!(n.nodes(), 0);
        // Asked again, it answers with the id it claimed.
        let (_, extra) = ask(&mut n, now, server, "ping", b"", false);
        let Ok(Message::Query { t, .. }) = krpc::decode(&extra[0].bytes) else {
            panic!()
        };
        n.handle(now, server, &answer(&t, claimed), &mut out);
        assert_eq!(n.nodes(), 1);
        assert!(out.is_empty());
        let (answer, _) = ask(
            &mut n,
            now,
            reader,
            "find_node",
            format!("6:target20:{}", "q".repeat(20)).as_bytes(),
            true,
        );
        let mut compact = claimed.to_vec();
        compact.extend_from_slice(&krpc::compact_peer(server));
        assert!(
            answer.windows(26).any(|w| w == compact),
            "find_node names the verified node"
        );
    }

    #[test]
    fn the_table_is_bounded_and_forgets_silent_nodes() {
        let t0 = Instant::now();
        let mut n = node(t0);
        for i in 0..(MAX_NODES as u32 + 10) {
            let mut id = [0u8; 20];
            id[..4].copy_from_slice(&i.to_be_bytes());
            let b = i.to_be_bytes();
            n.insert(
                t0 + Duration::from_millis(i.into()),
                id,
                addr([10, b[1], b[2], b[3]], 1),
            );
        }
        assert_eq!(n.nodes(), MAX_NODES);
        assert!(!n.table.contains_key(&[0; 20]), "the longest-silent went");
        let mut out = Vec::new();
        n.tick(t0 + NODE_SILENCE + Duration::from_secs(1), &mut out);
        assert_eq!(n.nodes(), 0);
        assert!(out.is_empty(), "no bootstrap: nothing to send");
    }

    #[test]
    fn joining_asks_the_bootstrap_nodes_and_checks_the_nodes_they_name() {
        let t0 = Instant::now();
        let boot = addr([127, 0, 0, 9], 9);
        let mut n = KrpcNode::new(
            [1; 20],
            Arc::new(Stores::new(Duration::from_secs(75))),
            vec![boot],
            Arc::default(),
            t0,
        );
        let mut out = Vec::new();
        n.tick(t0, &mut out);
        assert_eq!(out.len(), 1);
        let Ok(Message::Query {
            t,
            query: Query::FindNode { target },
            ..
        }) = krpc::decode(&out[0].bytes)
        else {
            panic!()
        };
        assert_eq!(target, [1; 20]);
        let named = addr([127, 0, 0, 10], 10);
        let nodes = krpc::compact_nodes(&[([5; 20], named), ([1; 20], addr([1, 1, 1, 1], 1))]);
        out.clear();
        n.handle(
            t0,
            boot,
            &krpc::response(
                &t,
                boot,
                Body {
                    id: [4; 20],
                    nodes: Some(nodes),
                    ..Body::default()
                },
            ),
            &mut out,
        );
        assert_eq!(n.nodes(), 1, "the bootstrap node answered");
        assert_eq!(out.len(), 1, "the named node is pinged, our own id is not");
        assert_eq!(out[0].to, named);
        out.clear();
        n.tick(t0 + Duration::from_secs(1), &mut out);
        assert!(out.is_empty());
        n.tick(t0 + REJOIN_INTERVAL, &mut out);
        assert_eq!(out.len(), 1, "rejoined");
    }

    #[test]
    fn mutated_and_random_datagrams_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let now = Instant::now();
        let mut n = node(now);
        let valid: [&[u8]; 3] = [
            b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping1:t2:aa1:y1:qe",
            b"d1:ad2:id20:abcdefghij01234567899:info_hash20:mnopqrstuvwxyz1234564:porti6881e5:token2:zze1:q13:announce_peer1:t2:bb1:y1:qe",
            b"d1:rd2:id20:abcdefghij01234567895:nodes26:abcdefghij0123456789\x7f\x00\x00\x01\x00\x01e1:t2:cc1:y1:re",
        ];
        let mut out = Vec::new();
        for round in 0..20_000u32 {
            let mut bytes = valid[round as usize % valid.len()].to_vec();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..bytes.len());
                match rng.random_range(0..3) {
                    0 => bytes[at] = rng.random(),
                    1 => drop(bytes.remove(at)),
                    _ => bytes.insert(at, rng.random()),
                }
            }
            if round % 10 == 0 {
                let len = rng.random_range(0..200);
                bytes = (0..len).map(|_| rng.random()).collect();
            }
            n.handle(now, addr([127, 0, 0, 1], 1), &bytes, &mut out);
            out.clear();
        }
        let c = &n.counters;
        let answered = c.ping.load(Relaxed)
            + c.announce_peer.load(Relaxed)
            + c.find_node.load(Relaxed)
            + c.get_peers.load(Relaxed)
            + c.get.load(Relaxed);
        assert!(c.malformed.load(Relaxed) > 10_000, "{}", c.summary());
        assert!(answered > 0, "some mutations stay valid: {}", c.summary());
    }

    #[test]
    fn noise_and_unknown_methods_are_counted() {
        let now = Instant::now();
        let mut n = node(now);
        let mut out = Vec::new();
        n.handle(now, addr([127, 0, 0, 1], 1), b"not bencode", &mut out);
        assert!(out.is_empty());
        assert_eq!(n.counters.malformed.load(Relaxed), 1);
        let (answer, _) = ask(&mut n, now, addr([127, 0, 0, 1], 1), "vote", b"", true);
        assert!(answer.starts_with(b"d1:eli204e"));
        assert_eq!(n.counters.unknown_method.load(Relaxed), 1);
    }
}
