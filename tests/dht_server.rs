//! `grenache-host dht`'s own BEP 5 server node, asked over real UDP on
//! loopback by real hosts and by a raw KRPC client written here.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use common::grape_node::{node_link, start_node_grape};
use common::krpc::*;
use common::{call, plugin, start_dht, start_host, HostProcess, SOON};

/// `MAX_PEERS_PER_IP_PER_KEY` of the server's storage.
const MAX_PEERS_PER_IP_PER_KEY: usize = 16;

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
    assert!(
        summary.contains("; 1 stored, 0 items, 1 expired"),
        "{summary}"
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mainline_clients_put_and_get_bep_44_items_through_our_dht_node() {
    use mainline::{MutableItem, SigningKey};
    let (mut dht, bootstrap) = start_dht();
    let client = || {
        mainline::Dht::builder()
            .bootstrap(std::slice::from_ref(&bootstrap))
            .bind_address(Ipv4Addr::LOCALHOST)
            .build()
            .expect("a mainline client")
            .as_async()
    };
    let (writer, reader) = (client(), client());

    let target = writer
        .put_immutable(b"hello world")
        .await
        .expect("our node takes an immutable put");
    assert_eq!(
        reader.get_immutable(target).await.as_deref(),
        Some(&b"hello world"[..])
    );

    let signer = SigningKey::from_bytes(&[3; 32]);
    let key = signer.verifying_key().to_bytes();
    let salt = Some(&b"salt"[..]);
    let put = |value: &'static [u8], seq: i64, cas: Option<i64>| {
        let item = MutableItem::new(signer.clone(), value, seq, salt);
        let writer = writer.clone();
        async move { writer.put_mutable(item, cas).await }
    };
    put(b"v1", 1, None)
        .await
        .expect("our node takes a mutable put");
    let got = reader
        .get_mutable_most_recent(&key, salt)
        .await
        .expect("v1");
    assert_eq!((got.value(), got.seq()), (&b"v1"[..], 1));
    put(b"v2", 2, Some(1))
        .await
        .expect("a newer seq with the right cas");
    assert!(
        put(b"v0", 0, None).await.is_err(),
        "an older seq is refused"
    );
    assert!(
        put(b"v3", 3, Some(1)).await.is_err(),
        "a stale cas is refused"
    );
    let got = reader
        .get_mutable_most_recent(&key, salt)
        .await
        .expect("v2");
    assert_eq!((got.value(), got.seq()), (&b"v2"[..], 2));

    assert_eq!(dht.terminate(SOON), Some(0));
    let summary = dht.wait_for("stopping the DHT node", SOON);
    assert!(summary.contains(", 2 items,"), "{summary}");
}

/// Plants `count` entries for `service` on the DHT node at `bootstrap`,
/// announced from `ip` with the ports `ports` gives (real KRPC announces,
/// each with the token the node gave `ip`).
fn plant(bootstrap: &str, ip: Ipv4Addr, service: &str, ports: impl Iterator<Item = u16>) {
    let mut planter = Krpc::new(ip, bootstrap);
    let (_, token) = planter.get_peers(key(service));
    for port in ports {
        // A fresh node id each, as mainline's client announces: a node that
        // keys peers by node id keeps every one.
        planter.id = rand_id();
        let answer = planter.announce(key(service), i64::from(port), &token);
        assert_eq!(error_code(&answer), None, "{answer:?}");
    }
}

/// Runs `n` fresh `call` processes to fibonacci_worker; their wall times,
/// sorted, and the errors of those that failed.
fn fresh_calls(bootstrap: &str, n: usize) -> (Vec<Duration>, Vec<String>) {
    fresh_calls_with(&common::host_bin(), bootstrap, n)
}

/// [`fresh_calls`] with the `grenache-host` binary at `bin`.
fn fresh_calls_with(
    bin: &std::path::Path,
    bootstrap: &str,
    n: usize,
) -> (Vec<Duration>, Vec<String>) {
    let mut took = Vec::new();
    let mut failed = Vec::new();
    for _ in 0..n {
        let started = Instant::now();
        let out = std::process::Command::new(bin)
            .args(["call", "fibonacci_worker", r#"{"length":3}"#])
            .args(["--bootstrap", bootstrap, "--timeout-ms", "5000"])
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let r = common::shown(out);
        took.push(started.elapsed());
        if (r.code, r.stdout.as_str()) != (0, "[1,1,2]\n") {
            failed.push(r.stderr);
        }
    }
    took.sort();
    (took, failed)
}

/// The `q` quantile (0..=1) of sorted `took`.
fn quantile(took: &[Duration], q: f64) -> Duration {
    took[((took.len() - 1) as f64 * q).round() as usize]
}

#[test]
fn a_poisoned_directory_still_leads_fresh_callers_to_the_live_host() {
    // Issue 12: 500 planted entries, half at closed ports (ICMP answers
    // them), half at sockets that take datagrams and never answer, all
    // announced after the live host, so they are the newest.
    let (_dht, bootstrap) = start_dht();
    let (_worker, _) = start_host("worker", &[&plugin("fibonacci")], &bootstrap, &[]);
    let closed_ip = Ipv4Addr::new(127, 0, 0, 66);
    plant(&bootstrap, closed_ip, "fibonacci_worker", 20_001..=20_250);
    let silent_ip = Ipv4Addr::new(127, 0, 0, 67);
    let silent: Vec<std::net::UdpSocket> = (0..250)
        .map(|_| std::net::UdpSocket::bind((silent_ip, 0)).unwrap())
        .collect();
    let silent_ports = silent.iter().map(|s| s.local_addr().unwrap().port());
    plant(&bootstrap, silent_ip, "fibonacci_worker", silent_ports);
    // Fresh `call` processes: no memory of which peers answered before.
    let (took, failed) = fresh_calls(&bootstrap, 100);
    let (p50, p99) = (quantile(&took, 0.5), quantile(&took, 0.99));
    eprintln!(
        "100 fresh calls through 500 planted entries: p50 {p50:?}, p99 {p99:?}, {} failed",
        failed.len()
    );
    assert!(failed.len() <= 1, "{failed:?}");
    assert!(p99 <= Duration::from_secs(1), "p99 {p99:?}, p50 {p50:?}");
}

/// Issue 12's figures, side by side: fresh `call`s after a host restarted
/// (its successor on another port; 0, 20 or 200 stale entries of dead
/// hosts on the same IP) and through 500 planted entries, for this build
/// and, with `GRENACHE_BASELINE_HOST=<path to another grenache-host>`, for
/// that one too (its own `dht` node and `call`), taking turns. Run it with
/// `cargo xtask bench-discovery [--baseline PATH]`.
#[test]
#[ignore = "a benchmark: cargo xtask bench-discovery"]
fn bench_calls_after_a_restart_and_through_a_poisoned_directory() {
    let mut builds = vec![("this build", common::host_bin())];
    if let Some(baseline) = std::env::var_os("GRENACHE_BASELINE_HOST") {
        builds.push(("baseline", baseline.into()));
    }
    let calls: usize = std::env::var("GRENACHE_BENCH_CALLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(30);
    let scenarios: [(&str, usize, bool); 4] = [
        ("restart, 0 stale", 0, false),
        ("restart, 20 stale", 20, false),
        ("restart, 200 stale", 200, false),
        ("500 planted", 0, true),
    ];
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "fresh `call`s, {calls} per row, load average {}",
        load.trim()
    );
    println!("| scenario | build | ok | p50 | p99 |");
    println!("|---|---|---|---|---|");
    for (name, stale, poisoned) in scenarios {
        for (build, bin) in &builds {
            let spawn = |what: &str, args: &[&str]| {
                let mut command = std::process::Command::new(bin);
                command.args(args).env_remove("RUST_LOG");
                HostProcess::spawn_command(what, command)
            };
            let dht = spawn("dht", &["dht", "--listen", "127.0.0.1:0"]);
            let line = dht.wait_for("dht listening on ", SOON);
            let bootstrap = line.rsplit(' ').next().unwrap().to_string();
            // The dead predecessors announced first, from the live host's IP,
            // at ports where nothing listens any more.
            plant(
                &bootstrap,
                Ipv4Addr::LOCALHOST,
                "fibonacci_worker",
                (0..stale as u16).map(|i| 30_001 + i),
            );
            let args = common::run_args(&plugin("fibonacci"), &bootstrap);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let worker = spawn("worker", &args);
            worker.wait_for("announced fibonacci_worker", SOON);
            let silent: Vec<std::net::UdpSocket> = match poisoned {
                true => (0..250)
                    .map(|_| std::net::UdpSocket::bind((Ipv4Addr::new(127, 0, 0, 67), 0)).unwrap())
                    .collect(),
                false => vec![],
            };
            if poisoned {
                plant(
                    &bootstrap,
                    Ipv4Addr::new(127, 0, 0, 66),
                    "fibonacci_worker",
                    20_001..=20_250,
                );
                let ports = silent.iter().map(|s| s.local_addr().unwrap().port());
                plant(
                    &bootstrap,
                    Ipv4Addr::new(127, 0, 0, 67),
                    "fibonacci_worker",
                    ports,
                );
            }
            let (took, failed) = fresh_calls_with(bin, &bootstrap, calls);
            println!(
                "| {name} | {build} | {}/{calls} | {:.0} ms | {:.0} ms |",
                calls - failed.len(),
                quantile(&took, 0.5).as_secs_f64() * 1e3,
                quantile(&took, 0.99).as_secs_f64() * 1e3,
            );
        }
    }
}
