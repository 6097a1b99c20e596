//! Hosts on 127.0.0.1 finding each other through a real DHT node and talking
//! Grenache RPC over real uTP sockets, as a user runs them.

mod common;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::{
    call, host, plugin, shown, start_dht, start_host, test_plugin, HostProcess, LOG_REQUESTS, SOON,
};

#[test]
fn call_reaches_a_fibonacci_host_through_the_dht() {
    let (_dht, bootstrap) = start_dht();
    let (_worker, _) = start_host("worker", &[&plugin("fibonacci")], &bootstrap, &[]);
    let r = call(&bootstrap, "fibonacci_worker", r#"{"length":10}"#, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "[1,1,2,3,5,8,13,21,34,55]\n");

    // A remote (handler) error: its message, exit code 1.
    let r = call(&bootstrap, "fibonacci_worker", r#"{"length":-1}"#, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("length -1 is negative"), "{}", r.stderr);

    // Nobody serves it: exit code 2 with a clear message.
    let r = call(
        &bootstrap,
        "no_such_service",
        "{}",
        &["--timeout-ms", "3000"],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("no peers"), "{}", r.stderr);

    // Bad arguments: exit code 2 before any network work.
    let r = call(&bootstrap, "fibonacci_worker", "{length:10}", &[]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("not valid JSON"), "{}", r.stderr);
    let r = shown(host(&["call", "fibonacci_worker", "{}"]));
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("--bootstrap"), "{}", r.stderr);
}

#[test]
fn a_plugin_sees_the_address_the_callers_socket_used() {
    let (_dht, bootstrap) = start_dht();
    let (_host, _) = start_host("host", &[&test_plugin("echo-caller")], &bootstrap, &[]);
    // A port nobody uses now, for the caller's socket.
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let r = call(&bootstrap, "echo_caller", "{}", &["--listen", &listen]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, format!("\"{listen}\"\n"));
}

#[test]
fn a_host_serves_a_plugin_built_against_the_0_2_contract() {
    let (_dht, bootstrap) = start_dht();
    let (host, _) = start_host("host", &[&test_plugin("legacy-v2")], &bootstrap, &[]);
    host.wait_for("grenache:plugin@0.2.0", SOON);
    let r = call(&bootstrap, "legacy", r#"{"n":2}"#, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "{\"legacy\":{\"n\":2}}\n");
}

#[test]
fn the_classic_example_runs_on_one_machine() {
    let (_dht, bootstrap) = start_dht();
    let (consumer, _) = start_host("consumer host", &[&plugin("consumer")], &bootstrap, &[]);
    let (worker, worker_port) = start_host(
        "worker host",
        &[&plugin("fibonacci")],
        &bootstrap,
        &["--behind-nat", LOG_REQUESTS[0], LOG_REQUESTS[1]],
    );
    let punch = consumer.wait_for("[consumer] punch from ", SOON);
    assert!(
        punch.ends_with(&format!("127.0.0.1:{worker_port}")),
        "{punch}"
    );
    consumer.wait_for(
        "[consumer] got data reply, sequence is: [1,1,2,3,5,8,13,21,34,55]",
        SOON,
    );
    worker.wait_for("request for fibonacci_worker from 127.0.0.1:", SOON);
    // It keeps going: one punch and one request per second, like Grenache.
    let deadline = Instant::now() + SOON;
    while consumer.count("got data reply") < 3 {
        assert!(Instant::now() < deadline, "{}", consumer.output());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_consumer_plugin_can_request_by_service_name() {
    let (_dht, bootstrap) = start_dht();
    let (_worker, _) = start_host("worker", &[&plugin("fibonacci")], &bootstrap, &[]);
    let (_consumer, _) = start_host("consumer", &[&plugin("consumer")], &bootstrap, &[]);
    // call → consumer host → (plugin's host.request) → worker host.
    let r = call(&bootstrap, "fibonacci_consumer", r#"{"length":5}"#, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "[1,1,2,3,5]\n");
}

fn bench(bootstrap: &str, requests: u32, concurrency: u32) -> HostProcess {
    HostProcess::spawn(
        "bench",
        &[
            "bench",
            "fibonacci_worker",
            r#"{"length":10}"#,
            "--bootstrap",
            bootstrap,
            "--requests",
            &requests.to_string(),
            "--concurrency",
            &concurrency.to_string(),
            "--timeout-ms",
            "5000",
        ],
    )
}

fn figure(line: &str, name: &str) -> f64 {
    let key = format!("{name}=");
    let start = line
        .find(&key)
        .unwrap_or_else(|| panic!("{name} in {line}"))
        + key.len();
    line[start..]
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn two_fibonacci_hosts_share_the_load() {
    for concurrency in [8, 1] {
        share_the_load(concurrency);
    }
}

/// Two hosts serve one service; `bench` at `concurrency` spreads over both.
/// At 1 in flight the client has one peer that answered before any other
/// is tried: its background connect to the untried peer brings that one in.
fn share_the_load(concurrency: u32) {
    let (_dht, bootstrap) = start_dht();
    let (a, _) = start_host(
        "worker a",
        &[&plugin("fibonacci")],
        &bootstrap,
        &LOG_REQUESTS,
    );
    let (b, _) = start_host(
        "worker b",
        &[&plugin("fibonacci")],
        &bootstrap,
        &LOG_REQUESTS,
    );
    let mut run = bench(&bootstrap, 400, concurrency);
    let line = run.wait_for("requests ok=", SOON * 3);
    assert_eq!(figure(&line, "failed"), 0.0, "{}", run.output());
    assert!(run.terminate(SOON).is_some());
    // The hosts' logs reach us through pipes: wait for the lines.
    let deadline = Instant::now() + SOON;
    let served = || {
        (
            a.count("request for fibonacci_worker"),
            b.count("request for fibonacci_worker"),
        )
    };
    while served().0 + served().1 < 400 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (served_a, served_b) = served();
    assert!(
        served_a >= 80 && served_b >= 80,
        "uneven split at {concurrency} in flight: a={served_a} b={served_b}"
    );
}

#[test]
fn bench_fails_over_when_a_host_dies_losing_at_most_the_requests_in_flight() {
    let (_dht, bootstrap) = start_dht();
    let (mut a, _) = start_host(
        "worker a",
        &[&plugin("fibonacci")],
        &bootstrap,
        &LOG_REQUESTS,
    );
    let (_b, _) = start_host("worker b", &[&plugin("fibonacci")], &bootstrap, &[]);
    let concurrency = 8;
    let mut run = bench(&bootstrap, 6000, concurrency);
    // Kill a once the load is flowing through it.
    a.wait_for("request for fibonacci_worker", SOON);
    let deadline = Instant::now() + SOON;
    while a.count("request for fibonacci_worker") < 300 {
        assert!(Instant::now() < deadline, "{}", a.output());
        std::thread::sleep(Duration::from_millis(5));
    }
    a.kill();
    let line = run.wait_for("requests ok=", SOON * 3);
    eprintln!("bench across the kill: {line}");
    let (ok, failed) = (figure(&line, "ok"), figure(&line, "failed"));
    assert!(
        failed <= concurrency as f64,
        "lost {failed} > {concurrency} in flight: {}",
        run.output()
    );
    assert_eq!(ok + failed, 6000.0, "{line}");
    assert!(run.terminate(SOON).is_some() || !run.is_running());
}

#[test]
fn garbage_does_not_crash_or_wedge_a_host() {
    let (_dht, bootstrap) = start_dht();
    let (mut worker, port) = start_host("worker", &[&plugin("fibonacci")], &bootstrap, &[]);
    let target = format!("127.0.0.1:{port}");
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Stray datagrams: short, long, almost-punches, fake uTP headers.
    let mut junk: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xFF],
        vec![0xC3, 0xBF, 0x0A],
        vec![0xC3],
        vec![0u8; 1400],
        vec![0x41; 19],
    ];
    for first in [0x01u8, 0x11, 0x21, 0x31, 0x41, 0x42] {
        let mut packet = vec![first; 64];
        packet[1] = 0;
        junk.push(packet);
    }
    let mut seed = 0x9E37_79B9u32;
    for len in [20usize, 21, 100, 1500, 9000] {
        let bytes = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as u8
            })
            .collect();
        junk.push(bytes);
    }
    for _ in 0..20 {
        for j in &junk {
            sock.send_to(j, &target).unwrap();
        }
    }
    assert!(worker.is_running(), "{}", worker.output());
    let r = call(&bootstrap, "fibonacci_worker", r#"{"length":3}"#, &[]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "[1,1,2]\n"),
        "{}\n{}",
        r.stderr,
        worker.output()
    );
}

#[test]
fn malformed_messages_close_that_connection_only() {
    let (_dht, bootstrap) = start_dht();
    let (worker, port) = start_host(
        "worker",
        &[&plugin("fibonacci"), &test_plugin("faulty")],
        &bootstrap,
        &[],
    );
    // Real uTP connections from a client of this crate send malformed
    // messages; the host answers with errors or closes, and keeps serving.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use grenache_host::transport::Endpoint;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (ep, _) = Endpoint::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let peer = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);

        // 1. Two requests in one write (coalesced), one split over two writes.
        let mut s = ep.connect(peer, deadline).await.unwrap();
        s.write_all(br#"["a1000000-0000-4000-8000-000000000001","fibonacci_worker",{"length":2}]["a1000000-0000-4000-8000-000000000002","echo",7]"#).await.unwrap();
        let mut got = String::new();
        let mut buf = [0u8; 4096];
        while !(got.contains("000000000001") && got.contains("000000000002")) {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "closed early: {got}");
            got.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        }
        assert!(got.contains(r#"["a1000000-0000-4000-8000-000000000001",null,[1,1]]"#), "{got}");
        assert!(got.contains(r#"["a1000000-0000-4000-8000-000000000002",null,7]"#), "{got}");

        // 2. An unknown service: an error reply that says so.
        s.write_all(br#"["a1000000-0000-4000-8000-000000000003","nope",1]"#).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        let reply = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(reply.contains("ERR_SERVICE_NOT_FOUND") && reply.contains("nope"), "{reply}");

        // 3. A plugin crash: a Grenache error string, not a dropped request.
        s.write_all(br#"["a1000000-0000-4000-8000-000000000004","panic",1]"#).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        let reply = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(reply.contains("crashed") && reply.contains("panicked on purpose"), "{reply}");

        // 4. Garbage: the host closes this connection.
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    });
    worker.wait_for("does not speak Grenache", SOON);
    // Everyone else is still served.
    let r = call(&bootstrap, "fibonacci_worker", r#"{"length":4}"#, &[]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "[1,1,2,3]\n"),
        "{}",
        r.stderr
    );
}

#[test]
fn an_oversized_request_gets_an_error_reply() {
    let (_dht, bootstrap) = start_dht();
    let (_worker, _) = start_host(
        "worker",
        &[&test_plugin("faulty")],
        &bootstrap,
        &["--max-payload", "4KiB"],
    );
    let big = format!("\"{}\"", "x".repeat(8 << 10));
    let r = call(&bootstrap, "echo", &big, &["--timeout-ms", "5000"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("too large"), "{}", r.stderr);
    let r = call(&bootstrap, "echo", "\"small\"", &[]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "\"small\"\n"),
        "{}",
        r.stderr
    );
}

#[test]
fn dht_and_run_stop_cleanly_on_a_signal() {
    let (mut dht, bootstrap) = start_dht();
    let (mut worker, _) = start_host("worker", &[&plugin("fibonacci")], &bootstrap, &[]);
    assert_eq!(worker.terminate(SOON), Some(0), "{}", worker.output());
    worker.wait_for("stopping", SOON);
    assert_eq!(dht.terminate(SOON), Some(0), "{}", dht.output());
}

#[test]
fn a_second_dht_node_on_a_taken_port_is_refused_cleanly_every_time() {
    let (_dht, address) = start_dht();
    // mainline reported a taken port by panicking in some of the runs.
    for attempt in 1..=20 {
        let r = shown(host(&["dht", "--listen", &address]));
        assert_eq!(r.code, 2, "attempt {attempt}: {}", r.stderr);
        assert!(
            r.stderr.starts_with("error: cannot start the DHT node: "),
            "attempt {attempt}: {}",
            r.stderr
        );
        assert!(
            r.stderr.contains("Address already in use")
                && r.stderr.contains(&format!("(binding {address})"))
                && r.stderr
                    .contains("is another node already listening there?"),
            "attempt {attempt}: {}",
            r.stderr
        );
        assert!(
            !r.stderr.contains("panicked"),
            "attempt {attempt}: {}",
            r.stderr
        );
    }
}

/// An RPC client on its own loopback socket, with no discovery (it calls
/// peers by address), and its endpoint.
async fn lone_client() -> (
    grenache_host::transport::Endpoint,
    grenache_host::rpc::client::RpcClient,
) {
    let (ep, _) = grenache_host::transport::Endpoint::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let client = grenache_host::rpc::client::RpcClient::new(ep.clone(), None, 1 << 20);
    (ep, client)
}

#[test]
fn a_request_to_a_closed_port_fails_without_waiting_for_its_deadline() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use grenache_host::rpc::RpcError;
        let (ep, client) = lone_client().await;
        // A port nothing listens on: the kernel answers our SYN with ICMP
        // port unreachable, which the socket's error queue hands to uTP.
        let closed = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = client
            .request_peer(closed, "fibonacci_worker", "{}", Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(matches!(err, RpcError::Transport(_)), "{err:?}");
        assert!(err.to_string().contains("nothing listens there"), "{err}");
        assert_eq!(ep.utp_stats().unreachable, 1);
    });
}

#[test]
fn a_request_to_a_dead_address_times_out_with_a_clear_error() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use grenache_host::rpc::RpcError;
        let (_, client) = lone_client().await;
        // A bound socket that never answers.
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let started = Instant::now();
        let err = client
            .request_peer(
                silent.local_addr().unwrap(),
                "fibonacci_worker",
                "{}",
                Duration::from_millis(1500),
            )
            .await
            .unwrap_err();
        let waited = started.elapsed();
        assert!(matches!(err, RpcError::Timeout(_)), "{err:?}");
        assert!(err.to_string().contains("attempts"), "{err}");
        assert!(
            waited >= Duration::from_millis(1400) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
    });
}

#[test]
fn a_glitch_towards_the_only_peer_is_not_an_outage() {
    let (_dht, bootstrap) = start_dht();
    let (worker, _) = start_host("worker", &[&plugin("fibonacci")], &bootstrap, &[]);
    // The gateway's `network` service asks fibonacci_worker, 1 s deadline,
    // through one long-lived RPC client.
    let (_gateway, _) = start_host("gateway", &[&test_plugin("faulty")], &bootstrap, &[]);
    let r = call(&bootstrap, "network", r#"{"length":3}"#, &[]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "[1,1,2]\n"),
        "{}",
        r.stderr
    );

    // The only worker stops answering for a moment: that request fails...
    worker.signal("STOP");
    let r = call(&bootstrap, "network", r#"{"length":3}"#, &[]);
    worker.signal("CONT");
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("Timeout"), "{}", r.stderr);

    // ...and the next one reaches it again, instead of being told for 30 s
    // that nobody announces the service.
    let r = call(&bootstrap, "network", r#"{"length":3}"#, &[]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "[1,1,2]\n"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_node_that_shuts_down_stops_serving() {
    use grenache_host::nat::NatConfig;
    use grenache_host::node::{Node, NodeConfig};
    use grenache_host::plugin::{Limits, Runtime};
    use grenache_host::rpc::client::RpcClient;
    use grenache_host::transport::Endpoint;

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let config = NodeConfig {
            plugins: vec![plugin("fibonacci")],
            listen: "127.0.0.1:0".parse().unwrap(),
            discovery: grenache_host::discovery::DiscoveryConfig::Dht { bootstrap: vec![] },
            max_message: 1 << 20,
            nat: NatConfig::default(),
            policies: Default::default(),
            identity: std::sync::Arc::new(grenache_host::node::identity::Identity::from_key(
                ed25519_dalek::SigningKey::from_bytes(&[1; 32]),
            )),
        };
        let node = Node::start(config, Runtime::new(Limits::default()).unwrap())
            .await
            .unwrap();
        let served = node.endpoint.local_addr();
        let (ep, _) = Endpoint::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let client = RpcClient::new(ep, None, 1 << 20);
        let ask = |timeout| {
            let client = client.clone();
            async move {
                client
                    .request_peer(served, "fibonacci_worker", r#"{"length":3}"#, timeout)
                    .await
            }
        };
        assert_eq!(ask(Duration::from_secs(5)).await.unwrap(), "[1,1,2]");

        // Every task of the node stops with it: nothing answers any more,
        // not even on the connection the client already has.
        node.shutdown(Duration::ZERO).await;
        let after = ask(Duration::from_millis(1500)).await;
        assert!(after.is_err(), "a stopped node answered: {after:?}");
    });
}

#[test]
fn a_request_whose_id_is_not_a_string_gets_it_echoed() {
    let (_dht, bootstrap) = start_dht();
    let (_worker, port) = start_host("worker", &[&plugin("fibonacci")], &bootstrap, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use grenache_host::transport::Endpoint;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (ep, _) = Endpoint::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let peer = format!("127.0.0.1:{port}").parse().unwrap();
        let mut s = ep
            .connect(peer, Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
        // A Node server echoes any JSON id; so do we, and the connection stays.
        for (request, reply) in [
            (r#"[7,"fibonacci_worker",{"length":2}]"#, "[7,null,[1,1]]"),
            (
                r#"["a","fibonacci_worker",{"length":1}]"#,
                r#"["a",null,[1]]"#,
            ),
        ] {
            s.write_all(request.as_bytes()).await.unwrap();
            let mut buf = [0u8; 256];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), reply);
        }
    });
}

/// A fibonacci worker is killed and `successor` (its plugin file) starts
/// on another port; a `call` with `call_args` starts at once, while the DHT
/// still names only the dead predecessor, and must reach the successor.
fn call_as_the_worker_restarts(successor: &std::path::Path, call_args: &[&str]) {
    let (_dht, bootstrap) = start_dht();
    let (mut old, _) = start_host("old worker", &[&plugin("fibonacci")], &bootstrap, &[]);
    old.kill();
    let args = common::run_args(successor, &bootstrap);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _new = HostProcess::spawn("new worker", &args);
    let r = call(&bootstrap, "fibonacci_worker", r#"{"length":3}"#, call_args);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "[1,1,2]\n"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_call_made_as_a_worker_restarts_on_another_port_finds_the_new_one() {
    call_as_the_worker_restarts(&plugin("fibonacci"), &[]);
}

/// As above with a deadline shorter than a lookup answer is cached
/// (`LOOKUP_CACHE_TTL`, 2 s): the call's first lookup names only the dead
/// predecessor, and the lookups after every peer failed must ask the DHT
/// again, not take that answer back from the cache until the deadline. The
/// successor runs a precompiled plugin, so it announces well before the
/// call's last lookup (1.75 s in) even on a busy machine.
#[test]
fn a_call_as_a_worker_restarts_asks_the_dht_again_rather_than_its_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cwasm = common::precompiled(&plugin("fibonacci"), dir.path(), &[]);
    call_as_the_worker_restarts(&cwasm, &["--timeout-ms", "1900"]);
}

#[test]
fn a_call_through_a_dht_node_that_is_down_says_so() {
    let closed = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let r = call(&closed.to_string(), "fibonacci_worker", "{}", &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("no DHT node answered at {closed}")),
        "{}",
        r.stderr
    );
}
