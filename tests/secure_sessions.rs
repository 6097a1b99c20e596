//! Issue 14: between our hosts every request runs in a Noise session.
//! A UDP forwarder of the test's own on loopback sits between `call` and a
//! `run` host and records every datagram both ways: a distinctive payload
//! never appears in clear (while with `--plaintext` it does, so the
//! capture is real); a flipped byte in a DATA packet is rejected and
//! counted, and the host keeps serving. Pinning: an impostor announcing
//! the same service under another identity gets none of the pinned calls.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    call, call_peer, host, plugin, spawn_listening, start_dht, start_host, test_plugin,
    HostProcess, LOG_REQUESTS, SOON,
};

/// Which way a datagram went through the forwarder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    ToHost,
    ToCaller,
}

/// Every datagram the forwarder passed, in order, and which way.
type Capture = Arc<Mutex<Vec<(Way, Vec<u8>)>>>;

/// A UDP forwarder on loopback: datagrams to `addr` go to the host from a
/// socket of its own, the host's answers go back to the last caller. It
/// records every datagram, and can flip one byte of the first
/// caller-to-host uTP DATA packet longer than `tamper_over` bytes.
struct Forwarder {
    addr: SocketAddr,
    log: Capture,
    tamper_over: Arc<Mutex<Option<usize>>>,
    tampered: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    fn start(host: SocketAddr) -> Forwarder {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        back.connect(host).unwrap();
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        }
        let addr = front.local_addr().unwrap();
        let log: Capture = Arc::default();
        let tamper_over = Arc::new(Mutex::new(None));
        let tampered = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let caller = Arc::new(Mutex::new(None::<SocketAddr>));
        let (front, back) = (Arc::new(front), Arc::new(back));
        let to_host = {
            let (front, back, log, caller, stop) = (
                front.clone(),
                back.clone(),
                log.clone(),
                caller.clone(),
                stop.clone(),
            );
            let (tamper_over, tampered) = (tamper_over.clone(), tampered.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = front.recv_from(&mut buf) else {
                        continue;
                    };
                    *caller.lock().unwrap() = Some(from);
                    let mut datagram = buf[..n].to_vec();
                    // A uTP DATA packet (type 0, version 1): flip its last
                    // byte, which is payload.
                    let over = *tamper_over.lock().unwrap();
                    if datagram[0] == 0x01
                        && over.is_some_and(|over| n > over)
                        && !tampered.swap(true, Ordering::Relaxed)
                    {
                        *datagram.last_mut().unwrap() ^= 0x01;
                    }
                    log.lock().unwrap().push((Way::ToHost, datagram.clone()));
                    let _ = back.send(&datagram);
                }
            })
        };
        let to_caller = {
            let (front, back, log, caller, stop) = (front, back, log.clone(), caller, stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = back.recv(&mut buf) else {
                        continue;
                    };
                    log.lock().unwrap().push((Way::ToCaller, buf[..n].to_vec()));
                    if let Some(to) = *caller.lock().unwrap() {
                        let _ = front.send_to(&buf[..n], to);
                    }
                }
            })
        };
        Forwarder {
            addr,
            log,
            tamper_over,
            tampered,
            stop,
            threads: vec![to_host, to_caller],
        }
    }

    /// How many uTP DATA packets (type 0, version 1) went `way` so far.
    fn data_packets(&self, way: Way) -> usize {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|(w, d)| *w == way && d[0] == 0x01)
            .count()
    }

    /// How many recorded datagrams contain `needle`, and how many there
    /// were in all; the log is cleared.
    fn take_count(&self, needle: &[u8]) -> (usize, usize) {
        let log = std::mem::take(&mut *self.log.lock().unwrap());
        let hits = log
            .iter()
            .filter(|(_, d)| d.windows(needle.len()).any(|w| w == needle))
            .count();
        (hits, log.len())
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A scrape of `run --metrics`: the value of one sample line.
fn metric(metrics: &str, series: &str) -> f64 {
    let text = reqwest::blocking::get(format!("http://{metrics}/metrics"))
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// Waits until `metrics`' `series` reaches `at_least`.
fn wait_metric(metrics: &str, series: &str, at_least: f64) -> f64 {
    let deadline = Instant::now() + SOON;
    loop {
        let value = metric(metrics, series);
        if value >= at_least || Instant::now() > deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `run <plugin> --metrics` on loopback without a DHT (callers use
/// `--peer`); returns it, its RPC address and its metrics address.
fn metrics_host(plugin: &Path) -> (HostProcess, SocketAddr, String) {
    let args = [
        "run",
        plugin.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--control",
        "off",
        "--log-level",
        "info,grenache_host::rpc=debug",
    ];
    let (host, port) = spawn_listening("host", &args);
    let line = host.wait_for("metrics on http://", SOON);
    let metrics = line
        .split("metrics on http://")
        .nth(1)
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap()
        .to_string();
    (host, SocketAddr::from(([127, 0, 0, 1], port)), metrics)
}

const SECRET: &str = "TOP-SECRET-7f3a9c51";

#[test]
fn a_request_and_its_reply_never_cross_the_network_in_clear() {
    let (host, rpc, metrics) = metrics_host(&test_plugin("faulty"));
    let forwarder = Forwarder::start(rpc);
    let peer = forwarder.addr.to_string();
    let payload = format!("{{\"note\":\"{SECRET}\"}}");

    let secure = call_peer(&peer, "echo", &payload, &[]);
    assert_eq!(secure.code, 0, "{}", secure.stderr);
    assert!(
        secure.stdout.contains(SECRET),
        "the echo came back: {}",
        secure.stdout
    );
    // The caller's data: message 1, then message 3 with the request in one
    // write (one packet: they fit).
    assert_eq!(forwarder.data_packets(Way::ToHost), 2);
    let (hits, datagrams) = forwarder.take_count(SECRET.as_bytes());
    assert!(datagrams >= 6, "the capture saw the exchange ({datagrams})");
    assert_eq!(hits, 0, "the payload or reply crossed in clear");
    let (json, _) = {
        // Neither does any Grenache framing: no `"echo"` key, no JSON array.
        forwarder.take_count(b"\"echo\"")
    };
    assert_eq!(json, 0);
    assert_eq!(
        wait_metric(
            &metrics,
            "grenache_host_rpc_sessions_total{kind=\"secure\"}",
            1.0
        ),
        1.0
    );
    let debug = host.wait_for("secure session", SOON);
    assert!(debug.contains("peer_key="), "{debug}");

    // The same call in plaintext does show it: the capture is real.
    let plain = call_peer(&peer, "echo", &payload, &["--plaintext"]);
    assert_eq!(plain.code, 0, "{}", plain.stderr);
    let (hits, _) = forwarder.take_count(SECRET.as_bytes());
    assert!(
        hits >= 2,
        "request and reply in clear with --plaintext ({hits})"
    );
    assert_eq!(
        wait_metric(
            &metrics,
            "grenache_host_rpc_sessions_total{kind=\"plaintext\"}",
            1.0
        ),
        1.0
    );
}

#[test]
fn a_tampered_datagram_is_rejected_counted_and_the_host_keeps_serving() {
    let (host, rpc, metrics) = metrics_host(&test_plugin("faulty"));
    let forwarder = Forwarder::start(rpc);
    let peer = forwarder.addr.to_string();
    // Message 3 of the handshake (162 bytes) and the request's frame leave
    // in one packet, the caller's only DATA over 300 bytes (message 1 is
    // 38); its last byte is the request frame's.
    let payload = format!("{{\"note\":\"{}\"}}", "x".repeat(400));
    *forwarder.tamper_over.lock().unwrap() = Some(300);
    let tampered = call_peer(&peer, "echo", &payload, &["--timeout-ms", "3000"]);
    assert!(
        forwarder.tampered.load(Ordering::Relaxed),
        "a packet was flipped"
    );
    assert_ne!(
        tampered.code, 0,
        "a tampered request is not answered: {}",
        tampered.stdout
    );
    assert_eq!(
        wait_metric(&metrics, "grenache_host_rpc_rejected_frames_total", 1.0),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "grenache_host_requests_total{service=\"echo\",outcome=\"ok\"}"
        ),
        0.0,
        "the tampered request never reached the plugin"
    );
    // The host keeps serving.
    let again = call_peer(&peer, "echo", &payload, &[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    drop(host);
}

/// `grenache-host keygen --out DIR/NAME`: the secret key file and the public key hex.
fn keygen(dir: &Path, name: &str) -> (String, String) {
    let prefix = dir.join(name);
    let out = host(&["keygen", "--out", prefix.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let secret = format!("{}.secret", prefix.display());
    let id = common::shown(host(&["id", "--identity", &secret]));
    assert_eq!(id.code, 0, "{}", id.stderr);
    (secret, id.stdout.trim().to_string())
}

#[test]
fn pinned_calls_never_reach_an_impostor_and_a_key_nobody_has_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (worker_key, worker_id) = keygen(dir.path(), "worker");
    let (impostor_key, impostor_id) = keygen(dir.path(), "impostor");
    assert_ne!(worker_id, impostor_id);
    let (_dht, bootstrap) = start_dht();
    let fib = plugin("fibonacci");
    let serve = |name: &str, key: &str| {
        let mut extra = vec!["--identity", key, "--control", "off"];
        extra.extend_from_slice(&LOG_REQUESTS);
        start_host(name, &[&fib], &bootstrap, &extra).0
    };
    let worker = serve("worker", &worker_key);
    let impostor = serve("impostor", &impostor_key);
    let served = |h: &HostProcess| h.count("request for fibonacci_worker");

    // Pinned to the impostor first: it is reachable and found.
    let to_impostor = call(
        &bootstrap,
        "fibonacci_worker",
        r#"{"length":5}"#,
        &["--peer-key", &impostor_id],
    );
    assert_eq!(to_impostor.code, 0, "{}", to_impostor.stderr);
    assert_eq!(served(&impostor), 1);

    let before = (served(&worker), served(&impostor));
    for i in 0..100 {
        let shown = call(
            &bootstrap,
            "fibonacci_worker",
            r#"{"length":10}"#,
            &["--peer-key", &worker_id],
        );
        assert_eq!(shown.code, 0, "call {i}: {}", shown.stderr);
        assert_eq!(shown.stdout.trim(), "[1,1,2,3,5,8,13,21,34,55]");
    }
    let deadline = Instant::now() + SOON;
    while served(&worker) < before.0 + 100 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        served(&worker) - before.0,
        100,
        "every pinned call reached the worker"
    );
    assert_eq!(served(&impostor) - before.1, 0, "none reached the impostor");

    // A key nobody has: a clear error naming the keys the peers proved.
    let nobody = "11".repeat(32);
    let refused = call(
        &bootstrap,
        "fibonacci_worker",
        r#"{"length":3}"#,
        &["--peer-key", &nobody],
    );
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("not a pinned key"),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains(&worker_id) || refused.stderr.contains(&impostor_id),
        "names a key it proved: {}",
        refused.stderr
    );
    // The pinned key by its first 16 hex digits only (it might be a secret
    // seed pasted by mistake).
    assert!(
        refused.stderr.contains(&format!("{}…", &nobody[..16])),
        "{}",
        refused.stderr
    );
    assert!(!refused.stderr.contains(&nobody), "{}", refused.stderr);

    // A plugin's `request` obeys `[service.NAME] keys` in the policy: the
    // faulty plugin's `network` service asks fibonacci_worker.
    let before = (served(&worker), served(&impostor));
    let policy = common::policy_file(
        dir.path(),
        &format!("[service.fibonacci_worker]\nkeys = [\"{worker_id}\"]\n"),
    );
    let faulty = test_plugin("faulty");
    let (_caller, _) = start_host(
        "caller",
        &[&faulty],
        &bootstrap,
        &["--config", &policy, "--control", "off"],
    );
    for i in 0..20 {
        let shown = call(&bootstrap, "network", r#"{"length":4}"#, &[]);
        assert_eq!(
            (shown.code, shown.stdout.trim()),
            (0, "[1,1,2,3]"),
            "call {i}: {}",
            shown.stderr
        );
    }
    let deadline = Instant::now() + SOON;
    while served(&worker) < before.0 + 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(served(&worker) - before.0, 20);
    assert_eq!(
        served(&impostor) - before.1,
        0,
        "the plugin's pinned requests never reached the impostor"
    );
}

#[test]
fn a_service_that_requires_encryption_refuses_plaintext_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::policy_file(dir.path(), "[plugin.faulty]\nrequire_encryption = true\n");
    let sock = dir.path().join("control.sock");
    let fib = plugin("fibonacci");
    let faulty = test_plugin("faulty");
    let args = [
        "run",
        fib.to_str().unwrap(),
        faulty.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--config",
        &config,
        "--control",
        sock.to_str().unwrap(),
    ];
    let (_host, port) = spawn_listening("host", &args);
    let peer = format!("127.0.0.1:{port}");

    let plain = call_peer(&peer, "echo", r#"{"a":1}"#, &["--plaintext"]);
    assert_eq!(plain.code, 1, "a service error: {}", plain.stderr);
    assert!(
        plain.stderr.contains("ERR_ENCRYPTION_REQUIRED"),
        "{}",
        plain.stderr
    );
    assert!(
        plain.stderr.contains("encrypted session"),
        "says what to do: {}",
        plain.stderr
    );
    let secure = call_peer(&peer, "echo", r#"{"a":1}"#, &[]);
    assert_eq!(
        (secure.code, secure.stdout.trim()),
        (0, r#"{"a":1}"#),
        "{}",
        secure.stderr
    );
    // Another plugin's services keep taking plaintext.
    let other = call_peer(
        &peer,
        "fibonacci_worker",
        r#"{"length":3}"#,
        &["--plaintext"],
    );
    assert_eq!(
        (other.code, other.stdout.trim()),
        (0, "[1,1,2]"),
        "{}",
        other.stderr
    );
    // `status` counts the sessions the host served.
    let status = common::shown(host(&["status", "--control", sock.to_str().unwrap()]));
    assert_eq!(status.code, 0, "{}", status.stderr);
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    let served = &status["host"]["sessions"]["served"];
    assert_eq!(
        (served["secure"].as_u64(), served["plaintext"].as_u64()),
        (Some(1), Some(2)),
        "{status}"
    );
    assert_eq!(served["rejected_frames"].as_u64(), Some(0), "{status}");
}

/// The first request on a new connection, `rounds` times, each from a new
/// client (a new socket, so a new uTP connection): the sorted wall times,
/// secure (a Noise handshake first) or plaintext. The clients live until
/// the end: a client dropped at once leaves its last packets unacknowledged,
/// and the host's retransmissions to its closed port (ICMP unreachable)
/// made about half of the next first requests wait for a SYN retry
/// (400 ms), on main too.
fn first_request_times(host: SocketAddr, secure: bool, rounds: usize) -> Vec<Duration> {
    use grenache_host::rpc::client::RpcClient;
    use grenache_host::rpc::session::SessionKeys;
    use grenache_host::transport::Endpoint;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let keys = Arc::new(SessionKeys::ephemeral());
    let mut kept = Vec::new();
    let mut times: Vec<Duration> = rt.block_on(async {
        let mut times = Vec::new();
        for _ in 0..rounds {
            let (ep, _) = Endpoint::bind("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
            let mut client = RpcClient::new(ep, None, 1 << 20);
            if secure {
                client = client.with_session_keys(keys.clone());
            }
            let started = Instant::now();
            let reply = client
                .request_peer(host, "fibonacci_worker", r#"{"length":10}"#, SOON)
                .await
                .unwrap();
            times.push(started.elapsed());
            assert_eq!(reply, "[1,1,2,3,5,8,13,21,34,55]");
            kept.push(client);
        }
        times
    });
    times.sort();
    times
}

/// `p10 / p50 / p90` of sorted times, in ms.
fn percentiles(times: &[Duration]) -> String {
    let at = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    format!("{:.3} / {:.3} / {:.3} ms", at(0.1), at(0.5), at(0.9))
}

/// `bench` against the DHT's fibonacci host: (requests/s, p50 ms).
fn bench_once(bootstrap: &str, concurrency: usize, plaintext: bool) -> (f64, f64) {
    let concurrency = concurrency.to_string();
    let mut args = vec![
        "bench",
        "fibonacci_worker",
        r#"{"length":10}"#,
        "--bootstrap",
        bootstrap,
        "--requests",
        "3000",
        "--warmup",
        "200",
        "--concurrency",
        &concurrency,
    ];
    if plaintext {
        args.push("--plaintext");
    }
    let shown = common::shown(host(&args));
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    let field = |name: &str| -> f64 {
        shown
            .stdout
            .split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .map(|v| v.trim_end_matches("ms").parse().unwrap())
            .unwrap_or_else(|| panic!("no {name} in {}", shown.stdout))
    };
    (field("rps="), field("p50="))
}

/// Issue 14 item 5: what a secure session costs. Prints the first request
/// on a new connection (handshake included) and requests/s at 1 and 8 in
/// flight, encrypted and plaintext side by side, rounds taking turns.
/// `cargo xtask bench-sessions` runs it; figures in BENCHMARKS.md.
#[test]
#[ignore = "a benchmark: cargo xtask bench-sessions"]
fn bench_secure_sessions_against_plaintext() {
    let (_dht, bootstrap) = start_dht();
    let fib = plugin("fibonacci");
    let (_host, port) = start_host("host", &[&fib], &bootstrap, &["--control", "off"]);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));

    let secure = first_request_times(addr, true, 200);
    let plain = first_request_times(addr, false, 200);
    println!("first request on a new connection (200, a new socket each), p10 / p50 / p90:");
    println!("  secure    {}", percentiles(&secure));
    println!("  plaintext {}", percentiles(&plain));
    println!("| in flight | round | encrypted rps | plaintext rps | ratio | encrypted p50 | plaintext p50 |");
    println!("|---|---|---|---|---|---|---|");
    for concurrency in [1, 8] {
        for round in 1..=3 {
            // Taking turns: which goes first alternates.
            let (enc, pla) = if round % 2 == 1 {
                let e = bench_once(&bootstrap, concurrency, false);
                (e, bench_once(&bootstrap, concurrency, true))
            } else {
                let p = bench_once(&bootstrap, concurrency, true);
                (bench_once(&bootstrap, concurrency, false), p)
            };
            println!(
                "| {concurrency} | {round} | {:.0} | {:.0} | {:.2} | {:.2} ms | {:.2} ms |",
                enc.0,
                pla.0,
                enc.0 / pla.0,
                enc.1,
                pla.1
            );
        }
    }
}

#[test]
fn node_peers_call_and_are_called_in_plaintext() {
    // Node (utp-native) calls our host: it sends no capability bit and no
    // magic, so it is served in plaintext, and counted so.
    let (_host, rpc, metrics) = metrics_host(&test_plugin("rpc-test"));
    let node = common::node_peer("node client", &["vectors", &rpc.port().to_string()]);
    let tv3 = node.wait_for("TV-2 reply ", SOON);
    assert!(tv3.contains(r#"null,"world"]"#), "{tv3}");
    assert!(
        wait_metric(
            &metrics,
            "grenache_host_rpc_sessions_total{kind=\"plaintext\"}",
            1.0
        ) >= 1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "grenache_host_rpc_sessions_total{kind=\"secure\"}"
        ),
        0.0
    );

    // Our call to a Node server: its STATE carries no bit, so plaintext.
    let server = common::node_peer("node server", &["serve"]);
    let line = server.wait_for("listening on ", SOON);
    let peer = format!("127.0.0.1:{}", line.rsplit(' ').next().unwrap());
    let r = call_peer(&peer, "fibonacci_worker", r#"{"length":10}"#, &[]);
    assert_eq!(
        (r.code, r.stdout.trim()),
        (0, "[1,1,2,3,5,8,13,21,34,55]"),
        "{}",
        r.stderr
    );
    // Pinned, the Node server is skipped: it cannot prove a key.
    let pinned = call_peer(
        &peer,
        "fibonacci_worker",
        r#"{"length":10}"#,
        &["--peer-key", &"22".repeat(32)],
    );
    assert_eq!(pinned.code, 2, "{}", pinned.stdout);
    assert!(
        pinned.stderr.contains("speaks plaintext Grenache"),
        "{}",
        pinned.stderr
    );
}
