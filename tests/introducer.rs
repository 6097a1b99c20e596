//! The introducer against spoofed and hostile senders, end to end on
//! loopback (docs/wire.md §5.4): real `dht` and `run` processes, and raw UDP
//! sockets playing the attacker.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::scrape::Scrape;
use common::{call, plugin, start_dht, start_dht_with, start_host, LOG_REQUESTS, SOON};

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

/// A raw socket that registered with the introducer as a host behind a
/// symmetric NAT would (probe, cookie, signed registration).
struct RawHost {
    socket: UdpSocket,
    cookie: String,
}

impl RawHost {
    fn register(introducer: SocketAddr, seed: u8) -> RawHost {
        use ed25519_dalek::Signer;
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(introducer).unwrap();
        socket
            .send(&datagram(
                &serde_json::json!({"type": "probe", "id": 1}),
                320,
            ))
            .unwrap();
        let got = received(&socket, Duration::from_millis(300));
        let cookie = got
            .iter()
            .find(|(_, m)| m["type"] == "observed")
            .map(|(_, m)| m["cookie"].as_str().unwrap().to_string())
            .expect("an observed answer");
        let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let port = socket.local_addr().unwrap().port();
        let signed = grenache_host::nat::wire::registration_signed_bytes(&cookie, port);
        let register = serde_json::json!({
            "type": "register", "id": 2, "port": port, "nat": "symmetric",
            "cookie": cookie,
            "key": grenache_host::units::hex(key.verifying_key().as_bytes()),
            "sig": grenache_host::units::hex(&key.sign(&signed).to_bytes()),
        });
        socket.send(&datagram(&register, 320)).unwrap();
        let got = received(&socket, Duration::from_millis(300));
        assert!(got.iter().any(|(_, m)| m["type"] == "observed"), "{got:?}");
        RawHost { socket, cookie }
    }

    fn addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap()
    }

    /// Asks for the relay to `peer`; returns this host's token.
    fn relay_to(&self, peer: SocketAddr) -> [u8; 8] {
        let introduce = serde_json::json!({
            "type": "introduce", "id": 3, "peer": peer.to_string(), "nat": "symmetric",
            "cookie": self.cookie, "relay": true,
        });
        self.socket.send(&datagram(&introduce, 320)).unwrap();
        let got = received(&self.socket, Duration::from_millis(300));
        let outcome = got
            .iter()
            .find(|(_, m)| m["type"] == "introduced")
            .map(|(_, m)| m["outcome"].clone())
            .unwrap_or_else(|| panic!("no answer: {got:?}"));
        assert_eq!(outcome["kind"], "relay", "{outcome}");
        token(outcome["token"].as_str().unwrap())
    }

    /// The relay frames received within `wait`: (length, token, address,
    /// payload).
    fn frames(&self, wait: Duration) -> Vec<(usize, [u8; 8], SocketAddr, Vec<u8>)> {
        let deadline = Instant::now() + wait;
        let mut out = vec![];
        let mut buf = [0u8; 4096];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            self.socket
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let Ok(n) = self.socket.recv(&mut buf) else {
                break;
            };
            if let Some(f) = grenache_host::transport::parse_relay_frame(&buf[..n]) {
                out.push((n, f.token, f.addr, f.payload.to_vec()));
            }
        }
        out
    }
}

fn token(hex: &str) -> [u8; 8] {
    grenache_host::units::from_hex(hex)
        .unwrap()
        .try_into()
        .unwrap()
}

#[test]
fn the_relay_forwards_only_between_its_session_s_hosts_and_keeps_serving_under_a_flood() {
    use grenache_host::transport::relay_frame;
    let (dht, bootstrap) = start_dht_with(&["--metrics", "127.0.0.1:0"]);
    let metrics = dht.wait_for("metrics on http://", SOON);
    let metrics = metrics.split("http://").nth(1).unwrap();
    let metrics = metrics.strip_suffix("/metrics").unwrap().to_string();
    let introducer = introducer_of(&bootstrap);
    let (a, b) = (
        RawHost::register(introducer, 1),
        RawHost::register(introducer, 2),
    );
    let ta = a.relay_to(b.addr());
    // B hears of the session in a punch request carrying its own token.
    let got = received(&b.socket, Duration::from_millis(300));
    let request = got
        .iter()
        .find(|(_, m)| m["type"] == "punch-request")
        .map(|(_, m)| m.clone())
        .unwrap_or_else(|| panic!("{got:?}"));
    assert_eq!(request["peer"], a.addr().to_string());
    let tb = token(request["relay_token"].as_str().unwrap());
    assert_ne!(ta, tb);

    // A → B: the same payload, with B's token and A's address, exactly as
    // long as the frame A sent.
    let payload = vec![0x41u8; 1200];
    let frame = relay_frame(ta, b.addr(), &payload);
    a.socket.send(&frame).unwrap();
    let got = b.frames(Duration::from_millis(300));
    assert_eq!(got, vec![(frame.len(), tb, a.addr(), payload.clone())]);

    // Never to anyone else: an unregistered address, a wrong token, B's
    // token from A, or a stranger spoofing nothing but using A's token.
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    stranger.connect(introducer).unwrap();
    let stranger_addr = stranger.local_addr().unwrap();
    a.socket
        .send(&relay_frame(ta, stranger_addr, &payload))
        .unwrap();
    a.socket
        .send(&relay_frame([0; 8], b.addr(), &payload))
        .unwrap();
    a.socket.send(&relay_frame(tb, b.addr(), &payload)).unwrap();
    stranger.send(&relay_frame(ta, b.addr(), &payload)).unwrap();
    stranger.send(&relay_frame(ta, a.addr(), &payload)).unwrap();
    assert!(b.frames(Duration::from_millis(300)).is_empty());
    assert!(a.frames(Duration::from_millis(10)).is_empty());
    stranger
        .set_read_timeout(Some(Duration::from_millis(10)))
        .unwrap();
    assert!(stranger.recv(&mut [0u8; 64]).is_err());
    // The relay's metrics count each by reason.
    let scrape = Scrape::of(&metrics);
    let dropped = |reason: &str| {
        scrape.value(&format!(
            "grenache_host_relay_dropped_frames_total{{reason=\"{reason}\"}}"
        ))
    };
    assert_eq!(scrape.value("grenache_host_relay_sessions"), 1.0);
    assert_eq!(scrape.value("grenache_host_relay_frames_total"), 1.0);
    assert_eq!(
        scrape.value("grenache_host_relay_forwarded_bytes_total"),
        frame.len() as f64
    );
    // To the stranger, and the stranger's own two: no session; a guessed
    // token and B's: bad tokens.
    assert_eq!(dropped("unknown_session"), 3.0);
    assert_eq!(dropped("bad_token"), 2.0);

    // A flood of forged frames (guessed tokens) from the stranger: nothing
    // reaches B, and a probe from a new host is still answered at once.
    let flooding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flood = {
        let (flooding, b) = (flooding.clone(), b.addr());
        std::thread::spawn(move || {
            let mut sent = 0u64;
            while flooding.load(std::sync::atomic::Ordering::Relaxed) && sent < 200_000 {
                let guess = sent.to_be_bytes();
                let _ = stranger.send(&relay_frame(guess, b, &[0x41; 1200]));
                sent += 1;
            }
            sent
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let newcomer = UdpSocket::bind("127.0.0.1:0").unwrap();
    newcomer.connect(introducer).unwrap();
    // It probes as a host does: again every 250 ms until answered (a
    // flooded socket's buffer may drop a datagram). Its filter test comes
    // from a fresh port; the observed from main.
    let probe = datagram(&serde_json::json!({"type": "probe", "id": 9}), 320);
    newcomer
        .set_read_timeout(Some(Duration::from_millis(250)))
        .unwrap();
    let mut buf = [0u8; 2048];
    let asked = Instant::now();
    let n = loop {
        newcomer.send(&probe).unwrap();
        if let Ok(n) = newcomer.recv(&mut buf) {
            break n;
        }
        assert!(asked.elapsed() < Duration::from_secs(2), "no answer");
    };
    let answered = asked.elapsed();
    flooding.store(false, std::sync::atomic::Ordering::Relaxed);
    let sent = flood.join().unwrap();
    let observed: serde_json::Value = serde_json::from_slice(&buf[4..n]).unwrap();
    assert_eq!(observed["type"], "observed", "{observed}");
    eprintln!("a probe answered in {answered:?} during a flood of {sent} forged frames");
    assert!(answered < Duration::from_secs(2), "{answered:?}");
    assert!(b.frames(Duration::from_millis(300)).is_empty());
    // The session still works.
    a.socket.send(&frame).unwrap();
    assert_eq!(b.frames(Duration::from_millis(300)).len(), 1);
}
