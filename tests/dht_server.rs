//! `grenache-host dht`'s own BEP 5 server node, asked over real UDP on
//! loopback by real hosts and by a raw KRPC client written here.

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use common::grape_node::{node_link, start_node_grape};
use common::{call, plugin, start_dht, start_host, HostProcess, SOON};
use serde_bencode::value::Value;

/// `MAX_PEERS_PER_IP_PER_KEY` of the server's storage.
const MAX_PEERS_PER_IP_PER_KEY: usize = 16;

/// A raw KRPC client on one UDP socket.
struct Krpc {
    socket: UdpSocket,
    dht: SocketAddr,
    id: [u8; 20],
}

type Dict = HashMap<Vec<u8>, Value>;

impl Krpc {
    /// A client bound on `ip` (any port), asking the node at `dht`.
    fn new(ip: Ipv4Addr, dht: &str) -> Krpc {
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

    fn send(&self, bytes: &[u8]) {
        self.socket.send_to(bytes, self.dht).unwrap();
    }

    /// Sends query `q` with `args` (plus our `id`) and transaction id `t`;
    /// the answer's whole dictionary, or `None` if none came within 5 s.
    fn ask(&self, t: &[u8], q: &str, args: Vec<(&str, Value)>) -> Option<Dict> {
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
    fn answer(&self, t: &[u8]) -> Option<Dict> {
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
    fn get_peers(&self, key: [u8; 20]) -> (Vec<SocketAddrV4>, Vec<u8>) {
        let answer = self
            .ask(
                b"gp",
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
    fn find_node(&self, target: [u8; 20]) -> Vec<u8> {
        let found = self
            .ask(
                b"fn",
                "find_node",
                vec![("target", Value::Bytes(target.to_vec()))],
            )
            .expect("find_node answered");
        bytes_of(sub(&found, "r"), "nodes")
    }

    /// `announce_peer` of `key` on `port` with `token`; the answer.
    fn announce(&self, key: [u8; 20], port: i64, token: &[u8]) -> Dict {
        self.ask(
            b"ap",
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

fn rand_id() -> [u8; 20] {
    // Distinct per call, like mainline's client's fresh id per announce.
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    sha1_smol::Sha1::from(format!("{}-{n}", std::process::id()))
        .digest()
        .bytes()
}

fn bytes(s: &str) -> Value {
    Value::Bytes(s.as_bytes().to_vec())
}

fn dict(entries: Vec<(&str, Value)>) -> Value {
    Value::Dict(
        entries
            .into_iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v))
            .collect(),
    )
}

fn sub<'a>(d: &'a Dict, key: &str) -> &'a Dict {
    match d.get(key.as_bytes()) {
        Some(Value::Dict(inner)) => inner,
        other => panic!("no dictionary {key:?} in the answer ({other:?}); answer: {d:?}"),
    }
}

fn bytes_of(d: &Dict, key: &str) -> Vec<u8> {
    match d.get(key.as_bytes()) {
        Some(Value::Bytes(b)) => b.clone(),
        other => panic!("no byte string {key:?} in {d:?} ({other:?})"),
    }
}

/// The KRPC error code of an `e` answer, `None` for any other answer.
fn error_code(d: &Dict) -> Option<i64> {
    match d.get(&b"e"[..]) {
        Some(Value::List(list)) => match list.first() {
            Some(Value::Int(code)) => Some(*code),
            _ => None,
        },
        _ => None,
    }
}

/// The DHT key of a service: SHA-1 of its name.
fn key(service: &str) -> [u8; 20] {
    sha1_smol::Sha1::from(service).digest().bytes()
}

fn loopback(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)
}

#[test]
fn a_host_re_announcing_under_fresh_node_ids_keeps_one_entry() {
    let (_dht, bootstrap) = start_dht();
    let (_worker, port) = start_host("worker", &[&plugin("fibonacci")], &bootstrap, &[]);
    let fib = key("fibonacci_worker");
    // Re-announces of the host's port from its IP, each under a fresh node
    // id as mainline's client sends them.
    for _ in 0..20 {
        let client = Krpc::new(Ipv4Addr::LOCALHOST, &bootstrap);
        let (_, token) = client.get_peers(fib);
        let answer = client.announce(fib, port.into(), &token);
        assert_eq!(error_code(&answer), None, "{answer:?}");
    }
    let (values, _) = Krpc::new(Ipv4Addr::LOCALHOST, &bootstrap).get_peers(fib);
    assert_eq!(values, vec![loopback(port)]);
    let r = call(&bootstrap, "fibonacci_worker", r#"{"length":5}"#, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "[1,1,2,3,5]\n");
}

#[test]
fn a_raw_client_with_a_2_byte_transaction_id_is_answered_and_bad_announces_refused() {
    let (mut dht, bootstrap) = start_dht();
    let client = Krpc::new(Ipv4Addr::LOCALHOST, &bootstrap);
    let pong = client.ask(b"aa", "ping", vec![]).expect("ping answered");
    assert_eq!(pong.get(&b"y"[..]), Some(&bytes("r")));
    assert_eq!(bytes_of(sub(&pong, "r"), "id").len(), 20);
    // BEP 42: the address we are seen from.
    let ip = bytes_of(&pong, "ip");
    let local = client.socket.local_addr().unwrap().port();
    assert_eq!(ip, [&[127, 0, 0, 1][..], &local.to_be_bytes()].concat());

    // Alone: no node to name, but an answer.
    assert!(client.find_node([7; 20]).is_empty());

    let service = key("refusals");
    let (values, token) = client.get_peers(service);
    assert!(values.is_empty());
    let port0 = client.announce(service, 0, &token);
    assert_eq!(error_code(&port0), Some(203), "{port0:?}");
    let forged = client.announce(service, 4000, b"not our token");
    assert_eq!(error_code(&forged), Some(203), "{forged:?}");
    // Another IP cannot use this IP's token.
    let elsewhere = Krpc::new(Ipv4Addr::new(127, 0, 0, 67), &bootstrap);
    let stolen = elsewhere.announce(service, 4000, &token);
    assert_eq!(error_code(&stolen), Some(203), "{stolen:?}");
    let unknown = client
        .ask(b"uk", "vote", vec![])
        .expect("an unknown method is answered");
    assert_eq!(error_code(&unknown), Some(204), "{unknown:?}");
    assert!(client.get_peers(service).0.is_empty());

    // Oversized and non-KRPC datagrams get no answer and are counted.
    client.send(&vec![b'x'; 1600]);
    client.send(b"d1:t2:zz1:y1:q");
    assert!(client.answer(b"zz").is_none());
    let accepted = client.announce(service, 4000, &token);
    assert_eq!(error_code(&accepted), None, "{accepted:?}");
    assert_eq!(client.get_peers(service).0, vec![loopback(4000)]);

    assert_eq!(dht.terminate(SOON), Some(0));
    let summary = dht.wait_for("stopping the DHT node", SOON);
    for counted in [
        "; 2 malformed",
        "refused: 2 bad token",
        ", 1 port 0",
        ", 1 unknown",
        "; 1 stored",
    ] {
        assert!(summary.contains(counted), "{counted:?} in {summary}");
    }
}

#[test]
fn hundreds_of_announces_from_one_ip_keep_16_and_the_live_host_comes_first() {
    let (_dht, bootstrap) = start_dht();
    let (_worker, port) = start_host("worker", &[&plugin("fibonacci")], &bootstrap, &[]);
    let fib = key("fibonacci_worker");
    let planter = Krpc::new(Ipv4Addr::new(127, 0, 0, 66), &bootstrap);
    let (_, token) = planter.get_peers(fib);
    for port in 1..=500 {
        let answer = planter.announce(fib, port, &token);
        assert_eq!(error_code(&answer), None, "{answer:?}");
    }
    let (values, _) = Krpc::new(Ipv4Addr::LOCALHOST, &bootstrap).get_peers(fib);
    let planted: Vec<_> = values
        .iter()
        .filter(|v| *v.ip() == Ipv4Addr::new(127, 0, 0, 66))
        .collect();
    assert_eq!(planted.len(), MAX_PEERS_PER_IP_PER_KEY, "{values:?}");
    // Newest first within the IP.
    assert_eq!(planted[0].port(), 500, "{values:?}");
    assert!(
        values[..2].contains(&loopback(port)),
        "the live host is among the first two: {values:?}"
    );
    let r = call(&bootstrap, "fibonacci_worker", r#"{"length":3}"#, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "[1,1,2]\n");
}

#[test]
fn an_entry_not_refreshed_within_the_peer_ttl_expires() {
    let mut dht = HostProcess::spawn(
        "dht",
        &[
            "dht",
            "--listen",
            "127.0.0.1:0",
            "--introducer-port",
            "off",
            "--peer-ttl",
            "1",
        ],
    );
    let line = dht.wait_for("dht listening on ", SOON);
    let bootstrap = line.rsplit(' ').next().unwrap().to_string();
    let client = Krpc::new(Ipv4Addr::LOCALHOST, &bootstrap);
    let service = key("short-lived");
    let (_, token) = client.get_peers(service);
    client.announce(service, 4100, &token);
    assert_eq!(client.get_peers(service).0, vec![loopback(4100)]);
    let deadline = Instant::now() + SOON;
    while !client.get_peers(service).0.is_empty() {
        assert!(Instant::now() < deadline, "still stored after {SOON:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Gone from storage too: swept, or dropped by the next announce of
    // the key at the latest.
    client.announce(service, 4101, &token);
    assert_eq!(client.get_peers(service).0, vec![loopback(4101)]);
    assert_eq!(dht.terminate(SOON), Some(0));
    let summary = dht.wait_for("stopping the DHT node", SOON);
    assert!(summary.contains("; 1 stored, 1 expired"), "{summary}");
}

#[test]
fn two_dht_nodes_form_one_dht() {
    let (_first, first) = start_dht();
    let second = HostProcess::spawn(
        "second dht",
        &[
            "dht",
            "--listen",
            "127.0.0.1:0",
            "--introducer-port",
            "off",
            "--bootstrap",
            &first,
        ],
    );
    let line = second.wait_for("dht listening on ", SOON);
    let second_addr: SocketAddrV4 = line.rsplit(' ').next().unwrap().parse().unwrap();
    // The first node pings the second back and names it in find_node.
    let client = Krpc::new(Ipv4Addr::LOCALHOST, &first);
    let deadline = Instant::now() + SOON;
    loop {
        let nodes = client.find_node([1; 20]);
        let named = nodes.chunks_exact(26).any(|n| {
            SocketAddrV4::new(
                Ipv4Addr::new(n[20], n[21], n[22], n[23]),
                u16::from_be_bytes([n[24], n[25]]),
            ) == second_addr
        });
        if named {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first node never named the second"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_node_grape_announces_through_our_dht_node_with_2_byte_transaction_ids() {
    // grenache-grape 1.0.0's bittorrent-dht (k-rpc, 2-byte `t`) joins our
    // node and announces there what a Node service announces to the grape.
    let (_dht, bootstrap) = start_dht();
    let (_grape, url) = start_node_grape("grenache-grape", &["--bn", &bootstrap]);
    // The grape's DHT key is the name's bytes, so a 20-byte name.
    let name = "svc_via_our_dht_node";
    let service = node_link("node service", "1.0.2", &url, &["announce", name, "4444"]);
    let client = Krpc::new(Ipv4Addr::LOCALHOST, &bootstrap);
    let key: [u8; 20] = name.as_bytes().try_into().unwrap();
    let deadline = Instant::now() + SOON;
    while client.get_peers(key).0.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the grape never announced on our node"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The link re-announces every second (each answered once the grape's
    // DHT announce is done): still one entry.
    let deadline = Instant::now() + SOON;
    while service.count("announce ") < 4 {
        assert!(Instant::now() < deadline, "{}", service.output());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(client.get_peers(key).0, vec![loopback(4444)]);
}
