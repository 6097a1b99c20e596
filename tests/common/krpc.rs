//! A raw KRPC (BEP 5) client for the tests: asks a DHT node over real UDP,
//! as any BEP 5 client would, with the transaction ids and node ids the
//! test picks.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use serde_bencode::value::Value;

/// A raw KRPC client on one UDP socket. Its own queries use 4-byte
/// transaction ids, which every BEP 5 node reads (mainline 8 reads no
/// other length); `ask` takes any.
pub struct Krpc {
    pub socket: UdpSocket,
    pub dht: SocketAddr,
    pub id: [u8; 20],
}

pub type Dict = HashMap<Vec<u8>, Value>;

impl Krpc {
    /// A client bound on `ip` (any port), asking the node at `dht`.
    pub fn new(ip: Ipv4Addr, dht: &str) -> Krpc {
        let socket = UdpSocket::bind((ip, 0)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Krpc {
            socket,
            dht: dht.parse().unwrap(),
            id: rand_id(),
        }
    }

    pub fn send(&self, bytes: &[u8]) {
        self.socket.send_to(bytes, self.dht).unwrap();
    }

    /// Sends query `q` with `args` (plus our `id`) and transaction id `t`;
    /// the answer's whole dictionary, or `None` if none came within 5 s.
    pub fn ask(&self, t: &[u8], q: &str, args: Vec<(&str, Value)>) -> Option<Dict> {
        let mut a: Dict = args
            .into_iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v))
            .collect();
        a.insert(b"id".to_vec(), Value::Bytes(self.id.to_vec()));
        let message = dict(vec![
            ("t", Value::Bytes(t.to_vec())),
            ("y", bytes("q")),
            ("q", bytes(q)),
            ("a", Value::Dict(a)),
            ("ro", Value::Int(1)),
        ]);
        self.send(&serde_bencode::to_bytes(&message).unwrap());
        self.answer(t)
    }

    /// The next datagram from the node with transaction id `t`, within 5 s.
    pub fn answer(&self, t: &[u8]) -> Option<Dict> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            let Ok((len, from)) = self.socket.recv_from(&mut buf) else {
                continue;
            };
            if from != self.dht {
                continue;
            }
            if let Ok(Value::Dict(d)) = serde_bencode::from_bytes::<Value>(&buf[..len]) {
                if d.get(&b"t"[..]) == Some(&Value::Bytes(t.to_vec())) {
                    return Some(d);
                }
            }
        }
        None
    }

    /// `get_peers` of `key`: the values (in order) and the token.
    pub fn get_peers(&self, key: [u8; 20]) -> (Vec<SocketAddrV4>, Vec<u8>) {
        let answer = self
            .ask(
                b"gp00",
                "get_peers",
                vec![("info_hash", Value::Bytes(key.to_vec()))],
            )
            .expect("get_peers answered");
        let r = sub(&answer, "r");
        let values = match r.get(&b"values"[..]) {
            Some(Value::List(list)) => list
                .iter()
                .map(|v| match v {
                    Value::Bytes(b) if b.len() == 6 => SocketAddrV4::new(
                        Ipv4Addr::new(b[0], b[1], b[2], b[3]),
                        u16::from_be_bytes([b[4], b[5]]),
                    ),
                    other => panic!("a value that is not compact peer info: {other:?}"),
                })
                .collect(),
            _ => vec![],
        };
        (values, bytes_of(r, "token"))
    }

    /// `find_node` of `target`: the compact node infos answered.
    pub fn find_node(&self, target: [u8; 20]) -> Vec<u8> {
        let found = self
            .ask(
                b"fn00",
                "find_node",
                vec![("target", Value::Bytes(target.to_vec()))],
            )
            .expect("find_node answered");
        bytes_of(sub(&found, "r"), "nodes")
    }

    /// `announce_peer` of `key` on `port` with `token`; the answer.
    pub fn announce(&self, key: [u8; 20], port: i64, token: &[u8]) -> Dict {
        self.ask(
            b"ap00",
            "announce_peer",
            vec![
                ("info_hash", Value::Bytes(key.to_vec())),
                ("port", Value::Int(port)),
                ("token", Value::Bytes(token.to_vec())),
            ],
        )
        .expect("announce_peer answered")
    }
}

pub fn rand_id() -> [u8; 20] {
    // Distinct per call, like mainline's client's fresh id per announce.
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    sha1_smol::Sha1::from(format!("{}-{n}", std::process::id()))
        .digest()
        .bytes()
}

pub fn bytes(s: &str) -> Value {
    Value::Bytes(s.as_bytes().to_vec())
}

pub fn dict(entries: Vec<(&str, Value)>) -> Value {
    Value::Dict(
        entries
            .into_iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v))
            .collect(),
    )
}

pub fn sub<'a>(d: &'a Dict, key: &str) -> &'a Dict {
    match d.get(key.as_bytes()) {
        Some(Value::Dict(inner)) => inner,
        other => panic!("no dictionary {key:?} in the answer ({other:?}); answer: {d:?}"),
    }
}

pub fn bytes_of(d: &Dict, key: &str) -> Vec<u8> {
    match d.get(key.as_bytes()) {
        Some(Value::Bytes(b)) => b.clone(),
        other => panic!("no byte string {key:?} in {d:?} ({other:?})"),
    }
}

/// The KRPC error code of an `e` answer, `None` for any other answer.
pub fn error_code(d: &Dict) -> Option<i64> {
    match d.get(&b"e"[..]) {
        Some(Value::List(list)) => match list.first() {
            Some(Value::Int(code)) => Some(*code),
            _ => None,
        },
        _ => None,
    }
}

/// The DHT key of a service: SHA-1 of its name.
pub fn key(service: &str) -> [u8; 20] {
    sha1_smol::Sha1::from(service).digest().bytes()
}

pub fn loopback(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)
}
