//! The introducer against spoofed and hostile senders, end to end on
//! loopback (docs/wire.md §5.4): real `dht` and `run` processes, and raw UDP
//! sockets playing the attacker.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::{call, plugin, start_dht, start_host, LOG_REQUESTS, SOON};

/// The introducer's main port: beside the DHT node's (its port + 1).
fn introducer_of(bootstrap: &str) -> SocketAddr {
    let dht: SocketAddr = bootstrap.parse().unwrap();
    SocketAddr::new(dht.ip(), dht.port() + 1)
}

/// `GRI1` + `json`, padded with spaces to `len` bytes.
fn datagram(json: &serde_json::Value, len: usize) -> Vec<u8> {
    let mut bytes = b"GRI1".to_vec();
    bytes.extend(json.to_string().as_bytes());
    if bytes.len() < len {
        bytes.resize(len, b' ');
    }
    bytes
}

/// Every datagram `socket` receives within `wait`, as JSON (after `GRI1`).
fn received(socket: &UdpSocket, wait: Duration) -> Vec<(usize, serde_json::Value)> {
    let deadline = Instant::now() + wait;
    let mut out = vec![];
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return out;
        }
        socket.set_read_timeout(Some(left)).unwrap();
        match socket.recv(&mut buf) {
            Ok(n) => {
                let json = serde_json::from_slice(&buf[4..n]).unwrap_or_default();
                out.push((n, json));
            }
            Err(_) => return out,
        }
    }
}

#[test]
fn the_introducer_reflects_nothing_larger_and_ignores_unproven_senders() {
    let (_dht, bootstrap) = start_dht();
    let introducer = introducer_of(&bootstrap);
    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    attacker.connect(introducer).unwrap();
    let probe = serde_json::json!({"type": "probe", "id": 1});
    // A bare probe (as a spoofer would send to reflect): no answer at all.
    let bare = datagram(&probe, 0);
    attacker.send(&bare).unwrap();
    let got = received(&attacker, Duration::from_millis(500));
    assert!(got.is_empty(), "{got:?}");
    // A padded one is answered with no more bytes than it had.
    attacker.send(&datagram(&probe, 320)).unwrap();
    let got = received(&attacker, Duration::from_millis(500));
    assert!(!got.is_empty(), "a padded probe is answered");
    let bytes: usize = got.iter().map(|(n, _)| n).sum();
    assert!(bytes <= 320, "{bytes} bytes back for 320: {got:?}");
    // Registering without the cookie gets a cookie, nothing else; with a
    // forged one, the same.
    for cookie in ["", "00112233445566778899aabbccddeeff"] {
        let register = serde_json::json!({
            "type": "register", "id": 2, "port": 9, "nat": "open",
            "cookie": cookie, "key": "k"
        });
        attacker.send(&datagram(&register, 320)).unwrap();
        let got = received(&attacker, Duration::from_millis(500));
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].1["type"], "observed", "{got:?}");
    }
}

#[test]
fn an_impostor_on_the_same_machine_cannot_take_a_hosts_introductions() {
    let (_dht, bootstrap) = start_dht();
    let introducer = introducer_of(&bootstrap);
    let (worker, worker_port) = start_host(
        "worker behind a NAT",
        &[&plugin("fibonacci")],
        &bootstrap,
        &["--behind-nat", LOG_REQUESTS[0], LOG_REQUESTS[1]],
    );
    worker.wait_for("the introducer sees this host at", SOON);
    let worker_key = worker.wait_for("identity ", SOON);
    let worker_key = worker_key.rsplit(' ').next().unwrap().to_string();
    // The impostor, on the same IP, proves its own address and then claims
    // the worker's RPC port, which the DHT announces and introductions
    // match on: under a key of its own, and under the worker's key, which
    // it cannot sign for.
    let impostor = UdpSocket::bind("127.0.0.1:0").unwrap();
    impostor.connect(introducer).unwrap();
    impostor
        .send(&datagram(
            &serde_json::json!({"type": "probe", "id": 1}),
            320,
        ))
        .unwrap();
    let cookie = received(&impostor, Duration::from_millis(500))
        .into_iter()
        .find(|(_, j)| j["type"] == "observed")
        .map(|(_, j)| j["cookie"].as_str().unwrap().to_string())
        .expect("the probe is answered with a cookie");
    let own_key = "ab".repeat(32);
    let claim = |id: u64| {
        let key = if id.is_multiple_of(2) {
            &own_key
        } else {
            &worker_key
        };
        let register = serde_json::json!({
            "type": "register", "id": id, "port": worker_port,
            "nat": "open", "cookie": cookie, "key": key, "sig": "cd".repeat(64)
        });
        impostor.send(&datagram(&register, 320)).unwrap();
    };
    claim(2);
    let answers = received(&impostor, Duration::from_millis(300));
    assert!(answers.is_empty(), "the claim was accepted: {answers:?}");
    // Callers are introduced to the worker, never to the impostor, however
    // often it claims.
    for i in 0..10 {
        claim(3 + i);
        let r = call(&bootstrap, "fibonacci_worker", r#"{"length":3}"#, &[]);
        assert_eq!(
            (r.code, r.stdout.as_str()),
            (0, "[1,1,2]\n"),
            "{}",
            r.stderr
        );
    }
    let to_impostor = received(&impostor, Duration::from_millis(300));
    assert!(
        to_impostor
            .iter()
            .all(|(_, j)| j["type"] != "punch-request"),
        "{to_impostor:?}"
    );
    // Its log reaches us through a pipe: wait for the lines, not count now.
    let deadline = Instant::now() + SOON;
    while worker.count("request for fibonacci_worker") < 10 {
        assert!(Instant::now() < deadline, "{}", worker.output());
        std::thread::sleep(Duration::from_millis(20));
    }
}
