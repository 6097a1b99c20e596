//! The RPC socket under attack, on loopback, with bounded floods: spoofed
//! SYNs, slowloris connections, a blind request from a forged address, and a
//! punch from an address that never answers. What the host sends back is
//! counted on the attackers' own sockets.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{plugin, start_dht, start_host, HostProcess, SOON};
use grenache_host::rpc::server::REQUEST_TIMEOUT;
use grenache_host::transport::Endpoint;
use grenache_host::utp::connection::HANDSHAKE_TIMEOUT;
use grenache_host::utp::socket::PUNCHER_SYN_BUDGET;

/// SYNs per second of the flood, and how long it lasts.
const SYN_RATE: u64 = 1000;
const FLOOD: Duration = Duration::from_secs(5);
/// Slowloris connections held at once.
const SLOWLORIS: usize = 128;

/// A uTP header (docs/wire.md §4): type and version, extension, connection
/// id, timestamp, timestamp difference, window, seq, ack.
fn utp_header(kind: u8, id: u16, seq: u16, ack: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(20);
    h.push(kind << 4 | 1);
    h.push(0);
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes());
    h.extend_from_slice(&(1u32 << 20).to_be_bytes());
    h.extend_from_slice(&seq.to_be_bytes());
    h.extend_from_slice(&ack.to_be_bytes());
    h
}
const SYN: u8 = 4;
const DATA: u8 = 0;

/// Everything `socket` receives until `until`: (datagrams, bytes).
fn received_until(socket: &UdpSocket, until: Instant) -> (u64, u64) {
    let (mut datagrams, mut bytes) = (0, 0);
    let mut buf = [0u8; 2048];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (datagrams, bytes);
        }
        socket.set_read_timeout(Some(left)).unwrap();
        if let Ok(n) = socket.recv(&mut buf) {
            datagrams += 1;
            bytes += n as u64;
        }
    }
}

fn figure(line: &str, name: &str) -> f64 {
    let key = format!("{name}=");
    let start = line
        .find(&key)
        .unwrap_or_else(|| panic!("{name} in {line}"))
        + key.len();
    let rest = &line[start..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().unwrap()
}

/// Spoofed-looking SYNs from many ports of 127.0.0.2–17, [`SYN_RATE`] a
/// second for [`FLOOD`] (`flooding` is cleared then); each socket keeps
/// counting what the host sends it for `listen_after` more. Returns (SYNs
/// sent, bytes sent, datagrams received, bytes received).
fn syn_flood(
    target: SocketAddr,
    flooding: Arc<AtomicBool>,
    listen_after: Duration,
) -> std::thread::JoinHandle<(u64, u64, u64, u64)> {
    std::thread::spawn(move || {
        let sockets: Vec<UdpSocket> = (2..18u8)
            .flat_map(|host| (0..4).map(move |_| host))
            .map(|host| UdpSocket::bind(SocketAddr::from(([127, 0, 0, host], 0))).unwrap())
            .collect();
        let received = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let done = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = sockets
            .iter()
            .map(|s| {
                let s = s.try_clone().unwrap();
                let (received, done) = (received.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 2048];
                    s.set_read_timeout(Some(Duration::from_millis(100)))
                        .unwrap();
                    while !done.load(Ordering::Relaxed) {
                        if let Ok(n) = s.recv(&mut buf) {
                            received.0.fetch_add(1, Ordering::Relaxed);
                            received.1.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        let started = Instant::now();
        let (mut sent, mut sent_bytes) = (0u64, 0u64);
        while started.elapsed() < FLOOD {
            // Catch up to the rate in 10 ms steps.
            let due = started.elapsed().as_millis() as u64 * SYN_RATE / 1000;
            while sent < due {
                let socket = &sockets[sent as usize % sockets.len()];
                let syn = utp_header(SYN, rand::random(), rand::random(), 0);
                if socket.send_to(&syn, target).is_ok() {
                    sent_bytes += syn.len() as u64;
                }
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        flooding.store(false, Ordering::Relaxed);
        // Whatever the host still sends these sources.
        std::thread::sleep(listen_after);
        done.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
        let (datagrams, bytes) = (
            received.0.load(Ordering::Relaxed),
            received.1.load(Ordering::Relaxed),
        );
        (sent, sent_bytes, datagrams, bytes)
    })
}

/// [`SLOWLORIS`] real uTP connections that each send one byte of a request
/// per second and never finish it. Returns, per connection, how long the
/// host let it live (`None`: still open after `limit`).
async fn slowloris(
    target: SocketAddr,
    limit: Duration,
    connected: Arc<AtomicU64>,
) -> Vec<Option<Duration>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (endpoint, _) = Endpoint::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..SLOWLORIS {
        let (endpoint, connected) = (endpoint.clone(), connected.clone());
        tasks.spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            let stream = endpoint
                .connect(target, deadline)
                .await
                .expect("slowloris connects");
            connected.fetch_add(1, Ordering::Relaxed);
            let opened = Instant::now();
            let (mut read, mut write) = stream.split();
            let request =
                br#"["a1000000-0000-4000-8000-000000000001","fibonacci_worker",{"length":10}]"#;
            let mut buf = [0u8; 64];
            for byte in request.iter().cycle() {
                if opened.elapsed() > limit {
                    return None;
                }
                if write.write_all(&[*byte]).await.is_err() {
                    return Some(opened.elapsed());
                }
                // One byte a second; the host's end (EOF or error) cuts
                // the wait short.
                match tokio::time::timeout(Duration::from_secs(1), read.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return Some(opened.elapsed()),
                    Ok(Ok(_)) => panic!("the host answered half a request"),
                    Err(_) => {}
                }
            }
            unreachable!()
        });
    }
    tasks.join_all().await
}

#[test]
fn legitimate_calls_are_served_through_a_syn_flood_and_slowloris_connections() {
    let (_dht, bootstrap) = start_dht();
    let (_worker, port) = start_host("worker", &[&plugin("fibonacci")], &bootstrap, &[]);
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let connected = Arc::new(AtomicU64::new(0));
    let lifetime_limit = REQUEST_TIMEOUT + Duration::from_secs(10);
    let loris = rt.spawn(slowloris(target, lifetime_limit, connected.clone()));
    let deadline = Instant::now() + SOON;
    while connected.load(Ordering::Relaxed) < SLOWLORIS as u64 {
        assert!(
            Instant::now() < deadline,
            "slowloris connections did not open"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let flooding = Arc::new(AtomicBool::new(true));
    let flood = syn_flood(
        target,
        flooding.clone(),
        HANDSHAKE_TIMEOUT + Duration::from_secs(2),
    );
    // Let the flood fill what it can.
    std::thread::sleep(Duration::from_secs(1));

    // Legitimate traffic while the flood lasts: benches (each its own
    // process, its own new connection) and calls that each open a new
    // connection, in turn.
    let (mut ok, mut failed, mut p99) = (0.0, 0.0, 0.0f64);
    let (mut calls, mut calls_ok) = (0, 0);
    while flooding.load(Ordering::Relaxed) {
        let bench = HostProcess::spawn(
            "bench",
            &[
                "bench",
                "fibonacci_worker",
                r#"{"length":10}"#,
                "--bootstrap",
                &bootstrap,
                "--requests",
                "500",
                "--concurrency",
                "8",
                "--warmup",
                "5",
                "--timeout-ms",
                "5000",
            ],
        );
        let line = bench.wait_for("requests ok=", Duration::from_secs(60));
        eprintln!("bench under attack: {line}");
        ok += figure(&line, "ok");
        failed += figure(&line, "failed");
        p99 = p99.max(figure(&line, "p99"));
        let r = common::call(
            &bootstrap,
            "fibonacci_worker",
            r#"{"length":3}"#,
            &["--timeout-ms", "5000"],
        );
        calls += 1;
        if r.code == 0 && r.stdout == "[1,1,2]\n" {
            calls_ok += 1;
        } else {
            eprintln!("a call failed: {}", r.stderr);
        }
    }
    let (syns, syn_bytes, replies, reply_bytes) = flood.join().unwrap();
    let lifetimes = rt.block_on(loris).unwrap();

    eprintln!("benches under attack: ok={ok} failed={failed} worst p99={p99} ms");
    eprintln!("calls under attack: {calls_ok} of {calls} ok");
    eprintln!(
        "SYN flood: {syns} SYNs ({syn_bytes} B) drew {replies} datagrams ({reply_bytes} B) back: ×{:.2}",
        reply_bytes as f64 / syn_bytes as f64
    );
    let held: Vec<f64> = lifetimes
        .iter()
        .map(|l| l.map_or(f64::INFINITY, |d| d.as_secs_f64()))
        .collect();
    let longest = held.iter().cloned().fold(0.0, f64::max);
    eprintln!("slowloris: the longest connection lived {longest:.1} s");

    let legitimate = ok + failed + calls as f64;
    let succeeded = ok + calls_ok as f64;
    assert!(
        syns >= SYN_RATE * FLOOD.as_secs() * 9 / 10,
        "the flood ran: {syns} SYNs"
    );
    assert!(
        succeeded >= 0.99 * legitimate,
        "{succeeded} of {legitimate} legitimate calls succeeded"
    );
    assert!(p99 <= 500.0, "p99 {p99} ms under attack");
    assert!(
        reply_bytes <= 2 * syn_bytes,
        "{reply_bytes} B sent back for {syn_bytes} B of SYNs"
    );
    assert!(
        lifetimes
            .iter()
            .all(|l| l.is_some_and(|d| d <= REQUEST_TIMEOUT + Duration::from_secs(3))),
        "every slowloris connection is closed soon after {REQUEST_TIMEOUT:?}: {held:?}"
    );
}

#[test]
fn a_source_that_never_answers_gets_back_at_most_twice_what_it_sent() {
    let (_dht, bootstrap) = start_dht();
    let (_worker, port) = start_host("worker", &[&plugin("fibonacci")], &bootstrap, &[]);
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The "victim": a socket whose address a blind attacker forges. It
    // never answers; we count what reaches it.
    let victim = UdpSocket::bind("127.0.0.9:0").unwrap();
    let mut sent = 0u64;
    let mut send = |bytes: &[u8]| {
        victim.send_to(bytes, target).unwrap();
        sent += bytes.len() as u64;
    };
    // A SYN, then the request a blind attacker sends after it, with the
    // ids right and the ACK guessed (it never saw our STATE), a few times.
    let (id, seq) = (0x4567u16, 0x23c6u16);
    send(&utp_header(SYN, id, seq, 0));
    let request = br#"["a1000000-0000-4000-8000-000000000009","fibonacci_worker",{"length":80}]"#;
    for guess in [1u16, 0x8000, 0xfff0] {
        let mut data = utp_header(DATA, id.wrapping_add(1), seq.wrapping_add(1), guess);
        data.extend_from_slice(request);
        send(&data);
    }
    // Everything the host sends it until well after it gave up on the
    // handshake.
    let (datagrams, bytes) = received_until(
        &victim,
        Instant::now() + HANDSHAKE_TIMEOUT + Duration::from_secs(3),
    );
    eprintln!(
        "a forged source sent {sent} B and got {datagrams} datagrams, {bytes} B back: ×{:.2}",
        bytes as f64 / sent as f64
    );
    assert!(bytes <= 2 * sent, "{bytes} B back for {sent} B");
    assert!(datagrams <= 1, "one STATE at most: {datagrams} datagrams");
}

#[test]
fn one_punch_from_an_address_that_never_answers_draws_one_bounded_burst() {
    let (_dht, bootstrap) = start_dht();
    let (consumer, port) = start_host("consumer", &[&plugin("consumer")], &bootstrap, &[]);
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let me = silent.local_addr().unwrap();
    silent.send_to(&[0xC3, 0xBF], target).unwrap();
    // The plugin hears of it and calls back; the call gives up.
    consumer.wait_for(&format!("[consumer] punch from {me}"), SOON);
    consumer.wait_for(&format!("request to {me} failed"), SOON);
    // A second punch one interval later: heard again, but no new SYNs.
    std::thread::sleep(Duration::from_millis(1100));
    silent.send_to(&[0xC3, 0xBF], target).unwrap();
    let deadline = Instant::now() + SOON;
    while consumer.count(&format!("request to {me} failed")) < 2 {
        assert!(Instant::now() < deadline, "{}", consumer.output());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(consumer.count(&format!("[consumer] punch from {me}")), 2);
    let (datagrams, bytes) = received_until(&silent, Instant::now() + Duration::from_secs(1));
    // Per punch at most one punch back; SYNs at most the budget in all,
    // each a 20-byte header and the 10-byte capability extension (BEP 29
    // extension 2, docs/wire.md §8).
    let bound = 2 * 2 + PUNCHER_SYN_BUDGET as u64 * 30;
    eprintln!("two punches (4 B) drew {datagrams} datagrams, {bytes} B back (bound {bound} B)");
    assert!(bytes <= bound, "{bytes} B back; bound {bound}");
    assert!(
        datagrams <= 2 + PUNCHER_SYN_BUDGET as u64,
        "{datagrams} datagrams"
    );
}

#[test]
fn a_connection_opened_ahead_of_its_first_request_is_still_served() {
    // Callers open connections before they need them (the client warms up
    // untried peers): ours acknowledges the handshake, so the host keeps
    // the connection past HANDSHAKE_TIMEOUT though nothing else was sent.
    let (_dht, bootstrap) = start_dht();
    let (_worker, port) = start_host("worker", &[&plugin("fibonacci")], &bootstrap, &[]);
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (endpoint, _) = Endpoint::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut stream = endpoint.connect(target, deadline).await.unwrap();
        // Idle for longer than an unverified connection may live.
        tokio::time::sleep(HANDSHAKE_TIMEOUT + Duration::from_secs(2)).await;
        stream
            .write_all(
                br#"["a1000000-0000-4000-8000-000000000002","fibonacci_worker",{"length":3}]"#,
            )
            .await
            .unwrap();
        let mut got = String::new();
        let mut buf = [0u8; 256];
        while !got.ends_with(']') || !got.contains("[1,1,2]") {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("a reply in time")
                .unwrap();
            assert!(n > 0, "closed instead of answered: {got}");
            got.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        }
        assert_eq!(
            got,
            r#"["a1000000-0000-4000-8000-000000000002",null,[1,1,2]]"#
        );
    });
}
