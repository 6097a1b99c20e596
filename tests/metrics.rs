//! `run --metrics`: a host's Prometheus endpoint, scraped with a real HTTP
//! client after real traffic, and its counts checked one by one.

mod common;

use std::path::Path;
use std::time::Duration;

use common::scrape::Scrape;
use common::{
    call_peer, host, plugin, policy_file, shown, spawn_listening, start_dht, start_host,
    test_plugin, HostProcess, Shown, LOG_REQUESTS, SOON,
};

impl Scrape {
    /// The value of `grenache_host_requests_total` for a service and outcome.
    fn requests(&self, service: &str, outcome: &str) -> f64 {
        self.value(&format!(
            "grenache_host_requests_total{{service=\"{service}\",outcome=\"{outcome}\"}}"
        ))
    }

    /// Sum of a service's requests over every outcome it has.
    fn all_requests(&self, service: &str) -> f64 {
        let prefix = format!("grenache_host_requests_total{{service=\"{service}\",");
        self.samples
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v)
            .sum()
    }

    fn duration_count(&self, service: &str) -> f64 {
        self.value(&format!(
            "grenache_host_request_duration_seconds_count{{service=\"{service}\"}}"
        ))
    }
}

/// Starts `run <plugins> --metrics 127.0.0.1:0` (no DHT: callers use
/// `--peer`); returns it, its RPC address and its metrics address.
fn metrics_host(plugins: &[&Path], extra: &[&str]) -> (HostProcess, String, String) {
    let mut args: Vec<String> = vec!["run".into()];
    args.extend(plugins.iter().map(|p| p.display().to_string()));
    args.extend(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (host, port) = spawn_listening("metrics host", &args);
    let line = host.wait_for("metrics on http://", SOON);
    let addr = line
        .split("metrics on http://")
        .nth(1)
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    (host, format!("127.0.0.1:{port}"), addr)
}

fn control(args: &[&str], control: &Path) -> Shown {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--control", control.to_str().unwrap()]);
    shown(host(&all))
}

#[test]
fn a_scrape_after_traffic_counts_every_request_failure_swap_and_punch() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let config = policy_file(dir.path(), "[plugin.faulty]\nmax_concurrent = 1\n");
    let (host, peer, metrics) = metrics_host(
        &[&plugin("fibonacci"), &test_plugin("faulty")],
        &[
            "--control",
            sock.to_str().unwrap(),
            "--config",
            &config,
            "--time-limit",
            "1s",
            LOG_REQUESTS[0],
            LOG_REQUESTS[1],
        ],
    );

    // Before any traffic every served service shows, at zero.
    let before = Scrape::of(&metrics);
    assert_eq!(before.requests("fibonacci_worker", "ok"), 0.0);
    assert_eq!(before.requests("echo", "failed"), 0.0);
    assert_eq!(before.value("grenache_host_punches_received_total"), 0.0);

    const OK: usize = 5;
    for _ in 0..OK {
        let r = call_peer(&peer, "fibonacci_worker", r#"{"length":10}"#, &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    // The plugin's own error replies.
    for payload in [r#"{"length":"ten"}"#, r#"{"length":1000}"#] {
        let r = call_peer(&peer, "fibonacci_worker", payload, &[]);
        assert_eq!(r.code, 1, "{}", r.stderr);
    }
    // Keys nobody serves: never a label of their own.
    let strangers = ["no_such_service", "a1b2c3d4e5", "\u{1F4A3}"];
    for key in strangers {
        let r = call_peer(&peer, key, "{}", &[]);
        assert!(r.stderr.contains("ERR_SERVICE_NOT_FOUND"), "{}", r.stderr);
    }
    // A trap, then a time limit while a second request finds the plugin busy.
    assert_eq!(call_peer(&peer, "panic", "1", &[]).code, 1);
    let looping = HostProcess::spawn("looping call", &["call", "loop", "1", "--peer", &peer]);
    host.wait_for("request for loop", SOON);
    let busy = call_peer(&peer, "echo", "1", &[]);
    assert!(busy.stderr.contains("busy"), "{}", busy.stderr);
    let mut looping = looping;
    let deadline = std::time::Instant::now() + SOON;
    while looping.is_running() {
        assert!(std::time::Instant::now() < deadline, "the loop call ends");
        std::thread::sleep(Duration::from_millis(20));
    }

    // A swap that is refused, then one that takes.
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not a plugin").unwrap();
    let refused = control(&["swap", "fibonacci", junk.to_str().unwrap()], &sock);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    let swapped = control(
        &["swap", "fibonacci", plugin("fibonacci").to_str().unwrap()],
        &sock,
    );
    assert_eq!(swapped.code, 0, "{}", swapped.stderr);
    // Swapped again and rolled back once: counted apart.
    for args in [
        &["swap", "fibonacci", plugin("fibonacci").to_str().unwrap()][..],
        &["rollback", "fibonacci"],
    ] {
        let r = control(args, &sock);
        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
    }

    // A punch from a plain UDP socket; the host punches back.
    let puncher = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    puncher.set_read_timeout(Some(SOON)).unwrap();
    puncher.send_to(&[0xC3, 0xBF], &peer).unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = puncher.recv_from(&mut buf).expect("a punch back");
    assert_eq!(&buf[..n], &[0xC3, 0xBF]);

    // The punch back left the socket just before the host counted it.
    let scrape = Scrape::until(&metrics, "a punch sent", |s| {
        s.value("grenache_host_punches_sent_total") >= 1.0
    });
    assert_eq!(scrape.requests("fibonacci_worker", "ok"), OK as f64);
    assert_eq!(scrape.requests("fibonacci_worker", "error"), 2.0);
    assert_eq!(scrape.requests("fibonacci_worker", "failed"), 0.0);
    assert_eq!(scrape.requests("_unknown", "not_found"), 3.0);
    assert_eq!(scrape.requests("panic", "failed"), 1.0);
    assert_eq!(scrape.requests("loop", "failed"), 1.0);
    assert_eq!(scrape.requests("echo", "failed"), 1.0);
    for key in strangers {
        assert!(!scrape.text.contains(key), "{key} became a label");
    }
    // Every request is in its service's histogram, and in no other.
    for service in ["fibonacci_worker", "_unknown", "panic", "loop", "echo"] {
        assert_eq!(
            scrape.duration_count(service),
            scrape.all_requests(service),
            "{service}"
        );
    }
    let loop_seconds = scrape.value("grenache_host_request_duration_seconds_sum{service=\"loop\"}");
    assert!(
        (1.0..3.0).contains(&loop_seconds),
        "the loop ran to its 1 s limit: {loop_seconds}"
    );
    let failures = |reason: &str| {
        scrape.value(&format!(
            "grenache_host_plugin_failures_total{{plugin=\"faulty\",reason=\"{reason}\"}}"
        ))
    };
    assert_eq!(failures("trap"), 1.0);
    assert_eq!(failures("time_limit"), 1.0);
    assert_eq!(failures("busy"), 1.0);
    assert_eq!(
        scrape.value("grenache_host_plugin_swaps_total{plugin=\"fibonacci\"}"),
        2.0
    );
    assert_eq!(
        scrape.value("grenache_host_plugin_rollbacks_total{plugin=\"fibonacci\"}"),
        1.0
    );
    assert_eq!(
        scrape.value("grenache_host_plugin_swap_refusals_total{plugin=\"fibonacci\"}"),
        1.0
    );
    assert_eq!(
        scrape.value("grenache_host_plugin_swaps_total{plugin=\"faulty\"}"),
        0.0
    );
    assert_eq!(scrape.value("grenache_host_punches_received_total"), 1.0);
    // Each `call` process opened one uTP connection to the host.
    let calls = (OK + 2 + strangers.len() + 3) as f64;
    assert_eq!(
        scrape.value("grenache_host_utp_connections_opened_total{direction=\"incoming\"}"),
        calls
    );
    let open = scrape.value("grenache_host_utp_connections");
    assert!(
        (0.0..=calls).contains(&open),
        "open uTP connections: {open}"
    );
    assert_eq!(
        scrape.value("grenache_host_paths_opened_total{kind=\"relayed\"}"),
        0.0
    );
    let rss = scrape.value("process_resident_memory_bytes");
    assert!(rss > 1e6, "resident memory: {rss} bytes");

    // Only /metrics is served.
    let other = reqwest::blocking::get(format!("http://{metrics}/nope")).unwrap();
    assert_eq!(other.status(), 404);
    assert!(other.text().unwrap().contains("/metrics"));
    let post = reqwest::blocking::Client::new()
        .post(format!("http://{metrics}/metrics"))
        .send()
        .unwrap();
    assert_eq!(post.status(), 405);
}

#[test]
fn plugins_calls_through_an_introduction_count_by_service_with_the_punched_path() {
    let (_dht, bootstrap) = start_dht();
    let dir = tempfile::tempdir().unwrap();
    // A worker that registers with the introducer beside the DHT node (and
    // does not punch the consumer, whose punch-back would add calls).
    let config = policy_file(
        dir.path(),
        "[plugin.fibonacci]\nmay_be_punched_for = false\n",
    );
    let (worker, _) = start_host(
        "worker",
        &[&plugin("fibonacci")],
        &bootstrap,
        &["--behind-nat", "--control", "off", "--config", &config],
    );
    worker.wait_for("the introducer sees this host", SOON);
    // Nor does the consumer hear of the handshake's punches: it would call
    // the worker back.
    let caller_dir = tempfile::tempdir().unwrap();
    let caller_config = policy_file(
        caller_dir.path(),
        "[plugin.consumer]\nmay_be_punched_for = false\n[plugin.faulty]\ntime_limit = \"300ms\"\n",
    );
    let (_caller, peer, metrics) = metrics_host(
        &[&plugin("consumer"), &test_plugin("faulty")],
        &[
            "--bootstrap",
            &bootstrap,
            "--control",
            "off",
            "--config",
            &caller_config,
        ],
    );
    let outgoing = |scrape: &Scrape, service: &str, outcome: &str| {
        scrape.value(&format!(
            "grenache_host_outgoing_requests_total{{service=\"{service}\",outcome=\"{outcome}\"}}"
        ))
    };
    let before = Scrape::of(&metrics);
    assert_eq!(
        before.value("grenache_host_introductions_total{outcome=\"punched\"}"),
        0.0
    );
    // The consumer's manifest names the service it calls: it shows at zero.
    assert_eq!(outgoing(&before, "fibonacci_worker", "ok"), 0.0);

    // The consumer plugin asks the worker: the host is introduced to it,
    // both punch, and the request takes the punched path.
    let r = call_peer(&peer, "fibonacci_consumer", r#"{"length":3}"#, &[]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "[1,1,2]\n"),
        "{}",
        r.stderr
    );
    // Another plugin calling the same service counts under its name too.
    let r = call_peer(&peer, "network", r#"{"length":4}"#, &[]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "[1,1,2,3]\n"),
        "{}",
        r.stderr
    );
    // A name no manifest lists (the faulty plugin may call anything, "*")
    // is never a label: it calls `nobody_serves_this` until its time limit.
    assert_eq!(call_peer(&peer, "request_loop", "1", &[]).code, 1);

    let scrape = Scrape::of(&metrics);
    assert_eq!(outgoing(&scrape, "fibonacci_worker", "ok"), 2.0);
    let count = "grenache_host_outgoing_request_duration_seconds_count";
    assert_eq!(
        scrape.value(&format!("{count}{{service=\"fibonacci_worker\"}}")),
        2.0
    );
    let others = scrape.value(&format!("{count}{{service=\"_other\"}}"));
    assert!(others >= 1.0, "{others} calls of request_loop");
    assert!(!scrape.text.contains("nobody_serves_this"));
    let introductions = |outcome: &str| {
        scrape.value(&format!(
            "grenache_host_introductions_total{{outcome=\"{outcome}\"}}"
        ))
    };
    assert_eq!(introductions("punched"), 1.0);
    for outcome in ["impossible", "unknown_peer", "no_answer"] {
        assert_eq!(introductions(outcome), 0.0, "{outcome}");
    }
    let paths = |kind: &str| {
        scrape.value(&format!(
            "grenache_host_paths_opened_total{{kind=\"{kind}\"}}"
        ))
    };
    assert_eq!(
        (paths("direct"), paths("punched"), paths("relayed")),
        (0.0, 1.0, 0.0)
    );
    assert_eq!(
        scrape.value("grenache_host_utp_connections_opened_total{direction=\"outgoing\"}"),
        1.0
    );
    Scrape::until(&metrics, "a punch sent", |s| {
        s.value("grenache_host_punches_sent_total") >= 1.0
    });
}

#[test]
fn idle_connections_cannot_lock_the_endpoint() {
    let (_host, _, metrics) = metrics_host(&[&plugin("fibonacci")], &["--control", "off"]);
    // The endpoint's MAX_CONNECTIONS, held open without a request (as
    // clients that reconnect before the 3 s header timeout could, for good).
    let idle: Vec<std::net::TcpStream> = (0..16)
        .map(|_| std::net::TcpStream::connect(&metrics).unwrap())
        .collect();
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    // A scrape gets through at once: the oldest idle connection makes room.
    let response = client
        .get(format!("http://{metrics}/metrics"))
        .send()
        .expect("a scrape is served while 16 idle connections are open");
    assert_eq!(response.status(), 200);
    let mut oldest = &idle[0];
    oldest.set_read_timeout(Some(SOON)).unwrap();
    let mut byte = [0u8; 1];
    match std::io::Read::read(&mut oldest, &mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the oldest idle connection stays open: {other:?}"),
    }
    drop(idle);
}

#[test]
fn a_taken_metrics_port_stops_the_host_with_what_to_do() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let r = shown(host(&[
        "run",
        plugin("fibonacci").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--control",
        "off",
        "--metrics",
        &addr,
    ]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("cannot serve metrics on {addr}")),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("pick another --metrics"), "{}", r.stderr);
}

#[test]
fn ticks_are_counted_by_outcome() {
    let dir = tempfile::tempdir().unwrap();
    // Each tick fails on purpose, 100 ms apart.
    let policy = common::policy_file(
        dir.path(),
        "[plugin.stateful]\ntick_interval = \"100ms\"\n[plugin.stateful.config]\ntick_fails = \"yes\"\n",
    );
    let state = dir.path().join("state");
    let (_host, _peer, metrics) = metrics_host(
        &[&common::test_plugin("stateful")],
        &[
            "--control",
            "off",
            "--config",
            &policy,
            "--state-dir",
            state.to_str().unwrap(),
        ],
    );
    let ticks = |s: &Scrape, outcome: &str| {
        s.value(&format!(
            "grenache_host_plugin_ticks_total{{plugin=\"stateful\",outcome=\"{outcome}\"}}"
        ))
    };
    let scrape = Scrape::until(&metrics, "two failed ticks", |s| ticks(s, "error") >= 2.0);
    for outcome in [
        "ok",
        "trap",
        "time_limit",
        "memory_limit",
        "state_not_saved",
    ] {
        assert_eq!(ticks(&scrape, outcome), 0.0, "{outcome}");
    }
    ticks(&scrape, "skipped");
}
