//! Plugin state, configuration, ticks and punches (grenache:plugin@0.4.0),
//! through real hosts: `run` and `invoke` processes, their state directories
//! on disk, the control socket for swaps, and a real UDP socket counting
//! punches.

mod common;

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{call_peer, host, invoke, plugin, shown, spawn_listening, test_plugin, HostProcess};

/// A `run` of `plugin_file` on loopback with its state in `dir/state`, its
/// control socket in `dir`, and `policy` (TOML) as its `--config`; returns
/// it and its RPC address.
fn state_host(dir: &Path, plugin_file: &Path, policy: &str) -> (HostProcess, String) {
    let policy = common::policy_file(dir, policy);
    let state = dir.join("state");
    let control = dir.join("control.sock");
    let (host, port) = spawn_listening(
        "state host",
        &[
            "run",
            plugin_file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state.to_str().unwrap(),
            "--control",
            control.to_str().unwrap(),
            "--config",
            &policy,
        ],
    );
    (host, format!("127.0.0.1:{port}"))
}

/// Calls `service` at `peer` and returns its reply as JSON; fails the test
/// on an error.
fn ask(peer: &str, service: &str, payload: &str) -> serde_json::Value {
    let r = call_peer(peer, service, payload, &[]);
    assert_eq!(r.code, 0, "{payload}: {}{}", r.stdout, r.stderr);
    serde_json::from_str(&r.stdout).unwrap()
}

fn record(peer: &str, sensor: &str, value: f64) {
    let payload = serde_json::json!({"record": {"sensor": sensor, "value": value}});
    ask(peer, "sensor_gateway", &payload.to_string());
}

/// `grenache-host status` of the host [`state_host`] started in `dir`: its
/// one plugin's entry.
fn status(dir: &Path) -> serde_json::Value {
    let control = dir.join("control.sock");
    let r = shown(host(&["status", "--control", control.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    serde_json::from_str::<serde_json::Value>(&r.stdout).unwrap()["plugins"][0].clone()
}

/// `grenache-host swap <target> <file>` on the host [`state_host`] started
/// in `dir`; fails the test if the host refuses.
fn swap(dir: &Path, target: &str, file: &Path) {
    let control = dir.join("control.sock");
    let r = shown(host(&[
        "swap",
        target,
        file.to_str().unwrap(),
        "--control",
        control.to_str().unwrap(),
    ]));
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
}

fn copy_to(dir: &Path, file: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::copy(file, &to).unwrap();
    to
}

#[test]
fn sensor_readings_survive_a_hot_swap_and_a_host_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sensors = copy_to(dir.path(), &plugin("sensors"), "sensors.wasm");
    // The new version is another file: its state is the slot's, `sensors`.
    let next = copy_to(dir.path(), &plugin("sensors"), "sensors-v2.wasm");
    let policy = "[plugin.sensors.config]\nmax_readings = \"3\"\n";
    let (mut gateway, peer) = state_host(dir.path(), &sensors, policy);
    let opened = gateway.wait_for("sensors: state in", common::SOON);
    assert!(
        opened.contains(&dir.path().join("state/sensors.state").display().to_string()),
        "{opened}"
    );
    for v in [10.0, 21.5, 19.0, 23.0] {
        record(&peer, "t1", v);
    }
    record(&peer, "h2", 40.0);
    let expected = serde_json::json!({
        "sensor": "t1", "count": 3, "min": 19.0, "max": 23.0, "mean": 21.166666666666668, "last": 23.0
    });
    assert_eq!(ask(&peer, "sensor_gateway", r#"{"stats":"t1"}"#), expected);

    swap(dir.path(), "sensors", &next);
    assert_eq!(
        ask(&peer, "sensor_gateway", r#"{"stats":"t1"}"#),
        expected,
        "the new version reads what the old one kept"
    );
    record(&peer, "t1", 25.0);

    assert_eq!(gateway.terminate(common::SOON), Some(0));
    let state_file = dir.path().join("state/sensors.state");
    assert!(state_file.is_file(), "{}", gateway.output());

    let (_gateway, peer) = state_host(dir.path(), &sensors, policy);
    assert_eq!(
        ask(&peer, "sensor_gateway", r#"{"stats":"t1"}"#),
        serde_json::json!({
            "sensor": "t1", "count": 3, "min": 19.0, "max": 25.0, "mean": 22.333333333333332, "last": 25.0
        }),
        "a restarted host reads what the last one kept"
    );
    assert_eq!(
        ask(&peer, "sensor_gateway", r#"{"sensors":{}}"#),
        serde_json::json!(["h2", "t1"])
    );
}

#[test]
fn the_sensor_gateways_tick_drops_readings_past_their_retention() {
    let dir = tempfile::tempdir().unwrap();
    let policy = "[plugin.sensors]\ntick_interval = \"200ms\"\n[plugin.sensors.config]\nretention_s = \"1\"\n";
    let (gateway, peer) = state_host(dir.path(), &plugin("sensors"), policy);
    gateway.wait_for("sensors: ticking every 200ms", common::SOON);
    record(&peer, "t1", 1.0);
    assert_eq!(
        ask(&peer, "sensor_gateway", r#"{"stats":"t1"}"#)["count"],
        1
    );
    gateway.wait_for("t1: every reading expired", common::SOON);
    let r = call_peer(&peer, "sensor_gateway", r#"{"stats":"t1"}"#, &[]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("no readings for sensor \"t1\""),
        "{}",
        r.stderr
    );
}

#[test]
fn concurrent_records_lose_no_reading_and_bad_config_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    // max_readings holds all 200; "many" is no number: the gateway warns
    // and keeps the default retention.
    let policy = "[plugin.sensors.config]\nmax_readings = \"1000\"\nretention_s = \"many\"\n";
    let policy = common::policy_file(dir.path(), policy);
    let state = dir.path().join("state");
    let (_dht, bootstrap) = common::start_dht();
    let (gateway, port) = common::start_host(
        "sensors",
        &[&plugin("sensors")],
        &bootstrap,
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "--control",
            "off",
            "--config",
            &policy,
        ],
    );
    let peer = format!("127.0.0.1:{port}");
    let r = shown(host(&[
        "bench",
        "sensor_gateway",
        r#"{"record":{"sensor":"c1","value":1}}"#,
        "--bootstrap",
        &bootstrap,
        "--requests",
        "200",
        "--concurrency",
        "16",
        "--warmup",
        "0",
    ]));
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let stats = ask(&peer, "sensor_gateway", r#"{"stats":"c1"}"#);
    assert_eq!(stats["count"], 200, "{stats}");
    let line = gateway.wait_for("retention_s", common::SOON);
    assert!(
        line.contains("WARN") && line.contains("\"many\"") && line.contains("default, 86400"),
        "{line}"
    );
}

/// `invoke` of the `stateful` test plugin with its state in `dir`.
fn stateful(dir: &Path, payload: &str) -> common::Shown {
    invoke(
        &test_plugin("stateful"),
        "state",
        payload,
        &["--state-dir", dir.to_str().unwrap()],
    )
}

#[test]
fn a_trapping_handlers_writes_are_discarded_and_an_erroring_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let r = stateful(dir.path(), r#"{"set":["k","kept"]}"#);
    assert_eq!((r.code, r.stdout.as_str()), (0, "\"ok\"\n"), "{}", r.stderr);

    let r = stateful(dir.path(), r#"{"set_then_trap":["k","lost"]}"#);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("crashed"), "{}", r.stderr);
    let r = stateful(dir.path(), r#"{"get":"k"}"#);
    assert_eq!(r.stdout, "\"kept\"\n", "a trap keeps none of its writes");

    // Returning an error is not a trap: the WIT keeps those writes.
    let r = stateful(dir.path(), r#"{"set_then_err":["k","after an error"]}"#);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("an error after setting k"),
        "{}",
        r.stderr
    );
    let r = stateful(dir.path(), r#"{"get":"k"}"#);
    assert_eq!(r.stdout, "\"after an error\"\n");
}

#[test]
fn without_a_state_dir_invoke_gives_a_plugin_no_state() {
    let r = invoke(&test_plugin("stateful"), "state", r#"{"get":"k"}"#, &[]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("unavailable") && r.stderr.contains("--state-dir"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_damaged_state_file_stops_the_host_at_start_naming_the_file_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("state")).unwrap();
    let file = dir.path().join("state/stateful.state");
    std::fs::write(&file, b"not a state file at all, just some words").unwrap();
    let r = shown(host(&[
        "run",
        test_plugin("stateful").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--control",
        "off",
        "--state-dir",
        dir.path().join("state").to_str().unwrap(),
    ]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains(&file.display().to_string())
            && r.stderr.contains("damaged")
            && r.stderr.contains("move it away"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn the_quota_is_enforced_and_config_values_reach_the_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let policy = r#"
        [plugin.stateful]
        state_quota = "1KiB"
        [defaults.config]
        region = "eu"
        [plugin.stateful.config]
        greeting = "hello"
    "#;
    let (_host, peer) = state_host(dir.path(), &test_plugin("stateful"), policy);
    assert_eq!(ask(&peer, "state", r#"{"fill":1000}"#), "ok");
    // 1003 bytes kept ("big" and its value); 35 more would pass 1 KiB.
    let payload = serde_json::json!({"set": ["other", "x".repeat(30)]});
    let r = call_peer(&peer, "state", &payload.to_string(), &[]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.stderr.contains("quota-exceeded:") && r.stderr.contains("quota of 1 KiB"),
        "{}",
        r.stderr
    );
    // A replacement that fits is fine, and a value larger than the whole
    // quota is invalid rather than over it.
    assert_eq!(ask(&peer, "state", r#"{"fill":1020}"#), "ok");
    let too_big = ask(&peer, "state", r#"{"fill":5000}"#);
    assert!(
        too_big["error"].as_str().unwrap().starts_with("invalid:"),
        "{too_big}"
    );

    assert_eq!(ask(&peer, "state", r#"{"config":"greeting"}"#), "hello");
    assert_eq!(
        ask(&peer, "state", r#"{"config":"missing"}"#),
        serde_json::Value::Null
    );
    assert_eq!(
        ask(&peer, "state", r#"{"config_all":true}"#),
        serde_json::json!([["greeting", "hello"], ["region", "eu"]])
    );
}

#[test]
fn ticks_run_repeatedly_and_never_overlap() {
    let dir = tempfile::tempdir().unwrap();
    // Each tick takes 250 ms of a 100 ms interval: the ticks due meanwhile
    // are skipped, not run beside it.
    let policy = r#"
        [plugin.stateful]
        tick_interval = "100ms"
        [plugin.stateful.config]
        tick_busy_ms = "250"
    "#;
    let (host, peer) = state_host(dir.path(), &test_plugin("stateful"), policy);
    host.wait_for("tick end 5", common::SOON);
    let log = host.output();
    let events: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("[stateful] ").nth(1))
        .filter(|e| e.starts_with("tick "))
        .collect();
    for (i, pair) in events.chunks(2).enumerate() {
        let n = i + 1;
        let expected = [format!("tick start {n}"), format!("tick end {n}")];
        assert_eq!(
            pair,
            &expected[..pair.len()],
            "ticks overlapped or lost a write:\n{log}"
        );
    }
    let kept: u64 = ask(&peer, "state", r#"{"get":"ticks"}"#)
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(kept >= 5, "{kept}");

    let plugin = status(dir.path());
    assert_eq!(plugin["tick_interval_ms"], 100, "{plugin}");
    assert_eq!(plugin["contract"], "grenache:plugin@0.4.0");
    assert!(plugin["ticks"].as_u64().unwrap() >= 5, "{plugin}");
    assert!(plugin["skipped_ticks"].as_u64().unwrap() >= 1, "{plugin}");
}

#[test]
fn a_long_tick_takes_no_request_slot() {
    // One request slot, and a tick that spins 1.5 s of every 100 ms: while
    // it runs, requests are still answered, never refused as busy.
    let dir = tempfile::tempdir().unwrap();
    let policy = r#"
        [plugin.stateful]
        max_concurrent = 1
        tick_interval = "100ms"
        [plugin.stateful.config]
        tick_busy_ms = "1500"
    "#;
    let (host, peer) = state_host(dir.path(), &test_plugin("stateful"), policy);
    host.wait_for("tick start 1", common::SOON);
    for _ in 0..3 {
        let r = call_peer(&peer, "state", r#"{"get":"ticks"}"#, &[]);
        assert_eq!(r.code, 0, "busy while a tick ran? {}", r.stderr);
    }
    // The calls overlapped a running tick: the first one had not ended yet.
    assert_eq!(host.count("tick end"), 0, "{}", host.output());
}

#[test]
fn a_failing_tick_is_a_warning_and_a_fault() {
    let dir = tempfile::tempdir().unwrap();
    let policy = r#"
        [plugin.stateful]
        tick_interval = "100ms"
        [plugin.stateful.config]
        tick_fails = "yes"
    "#;
    let (host, _peer) = state_host(dir.path(), &test_plugin("stateful"), policy);
    let line = host.wait_for("tick failed", common::SOON);
    assert!(
        line.contains("WARN") && line.contains("failed on purpose"),
        "{line}"
    );
    let plugin = status(dir.path());
    assert!(plugin["faults"].as_u64().unwrap() >= 1, "{plugin}");
}

/// Receives punches on `socket` until `deadline`; returns how many came,
/// failing the test on any datagram that is not exactly `C3 BF`.
fn punches_received(socket: &UdpSocket, expected: usize, deadline: Instant) -> usize {
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut count = 0;
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        match socket.recv_from(&mut buf) {
            Ok((n, _)) => {
                assert_eq!(&buf[..n], [0xC3, 0xBF], "not a punch");
                count += 1;
            }
            // Past the expected count, keep listening briefly for extras.
            Err(_) if count >= expected => break,
            Err(_) => {}
        }
    }
    count
}

#[test]
fn host_punch_sends_punches_within_the_budget_only() {
    let dir = tempfile::tempdir().unwrap();
    let (_host, peer) = state_host(dir.path(), &test_plugin("stateful"), "");
    let target = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = target.local_addr().unwrap().to_string();

    let asked = 20;
    let payload = serde_json::json!({"punch": {"peer": addr, "times": asked}});
    let reply = ask(&peer, "state", &payload.to_string());
    let sent = reply["sent"].as_u64().unwrap() as usize;
    // A burst of 8, plus what the rate of 4/s refilled during the call.
    assert!((8..=9).contains(&sent), "{reply}");
    let error = reply["error"].as_str().unwrap();
    assert!(error.contains("punch budget exceeded"), "{reply}");
    let received = punches_received(&target, sent, Instant::now() + Duration::from_secs(3));
    assert_eq!(received, sent, "every punch sent arrives, and no more");

    let reply = ask(&peer, "state", r#"{"punch":{"peer":"nonsense"}}"#);
    assert_eq!(reply["sent"], 0);
    assert!(
        reply["error"].as_str().unwrap().contains("not an ip:port"),
        "{reply}"
    );
}

#[test]
fn a_plugin_whose_policy_forbids_punching_cannot_punch() {
    let dir = tempfile::tempdir().unwrap();
    let policy = "[plugin.stateful]\nmay_be_punched_for = false\n";
    let (_host, peer) = state_host(dir.path(), &test_plugin("stateful"), policy);
    let target = UdpSocket::bind("127.0.0.1:0").unwrap();
    let payload = serde_json::json!({"punch": {"peer": target.local_addr().unwrap().to_string()}});
    let reply = ask(&peer, "state", &payload.to_string());
    assert_eq!(reply["sent"], 0);
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("may_be_punched_for = false"),
        "{reply}"
    );
    assert_eq!(
        punches_received(&target, 0, Instant::now() + Duration::from_millis(500)),
        0
    );
}

#[test]
fn a_swap_stops_the_old_versions_ticks_and_starts_the_new_ones_at_its_interval() {
    let dir = tempfile::tempdir().unwrap();
    // `stateful` asks for no ticks; the sensor gateway for one a second.
    let (host, _peer) = state_host(dir.path(), &test_plugin("stateful"), "");
    let status = || status(dir.path());
    assert_eq!(status()["tick_interval_ms"], serde_json::Value::Null);
    swap(dir.path(), "stateful", &plugin("sensors"));
    host.wait_for("stateful: ticking every 1s", common::SOON);
    let deadline = Instant::now() + common::SOON;
    while status()["ticks"].as_u64().unwrap() < 2 {
        assert!(Instant::now() < deadline, "no ticks: {}", host.output());
        std::thread::sleep(Duration::from_millis(100));
    }
    swap(dir.path(), "stateful", &test_plugin("stateful"));
    let stopped = status();
    assert_eq!(stopped["tick_interval_ms"], serde_json::Value::Null);
    // Two and a half of the old version's intervals pass without a tick
    // (an absence has no event to wait for; one in flight may finish).
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        status()["ticks"].as_u64().unwrap() <= stopped["ticks"].as_u64().unwrap() + 1,
        "ticks went on after the swap: {}",
        host.output()
    );
}

#[test]
fn two_hosts_cannot_share_a_plugins_state_and_a_plugin_without_state_creates_none() {
    let dir = tempfile::tempdir().unwrap();
    let (first, _) = state_host(dir.path(), &test_plugin("stateful"), "");
    let second = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let r = shown(host(&[
        "run",
        test_plugin("stateful").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--control",
        "off",
        "--state-dir",
        state.to_str().unwrap(),
    ]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("in use by another running host")
            && r.stderr.contains("give each host its own --state-dir"),
        "{}",
        r.stderr
    );
    // invoke on the running host's directory says what fits invoke.
    let r = stateful(&state, r#"{"get":"k"}"#);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("in use by a running host")
            && r.stderr.contains("stop that host first")
            && r.stderr.contains("copy of the directory")
            && !r.stderr.contains("give each host"),
        "{}",
        r.stderr
    );
    drop(first);

    // fibonacci (0.4.0) never calls the state interface, so it does not
    // import it: no state file, no lock, and any number of such hosts (the
    // directory holds the host's identity only).
    let unused = second.path().join("state");
    let (fib, _) = spawn_listening(
        "fibonacci host",
        &[
            "run",
            plugin("fibonacci").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--control",
            "off",
            "--state-dir",
            unused.to_str().unwrap(),
        ],
    );
    let made: Vec<String> = std::fs::read_dir(&unused)
        .map(|dir| {
            dir.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        made.iter().all(|name| name == "identity.key"),
        "a plugin without state created {made:?} in {unused:?}"
    );
    fib.wait_for("fibonacci: no state", common::SOON);
    assert!(!fib.output().contains("state in"), "{}", fib.output());
}

#[test]
fn invoke_takes_the_policys_config_and_limits_and_ticks_once() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let policy = common::policy_file(
        dir.path(),
        "[plugin.stateful]\nstate_quota = \"1KiB\"\n[plugin.stateful.config]\ngreeting = \"hello\"\n",
    );
    let with = |extra: &[&str]| {
        let mut args = vec!["--config", &policy, "--state-dir", state.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let invoke_with = |payload: &str, extra: &[&str]| {
        let args = with(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        invoke(&test_plugin("stateful"), "state", payload, &args)
    };
    let r = invoke_with(r#"{"config":"greeting"}"#, &[]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "\"hello\"\n"),
        "{}",
        r.stderr
    );
    // The policy's 1 KiB quota: a value of 5000 bytes is larger than all of it.
    let r = invoke_with(r#"{"fill":5000}"#, &[]);
    assert!(r.stdout.contains("invalid:"), "{}{}", r.stdout, r.stderr);

    // --tick: on-tick once, nothing on stdout; stateful counts its ticks.
    let tick = |extra: &[&str]| {
        let mut args = vec![
            "invoke".to_string(),
            test_plugin("stateful").display().to_string(),
            "--tick".into(),
        ];
        args.extend(with(extra));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        shown(host(&args))
    };
    for _ in 0..2 {
        let r = tick(&[]);
        assert_eq!((r.code, r.stdout.as_str()), (0, ""), "{}", r.stderr);
    }
    let r = invoke_with(r#"{"get":"ticks"}"#, &[]);
    assert_eq!(r.stdout, "\"2\"\n", "{}", r.stderr);

    let failing = common::policy_file(
        dir.path(),
        "[plugin.stateful.config]\ntick_fails = \"yes\"\n",
    );
    let r = shown(host(&[
        "invoke",
        test_plugin("stateful").to_str().unwrap(),
        "--tick",
        "--config",
        &failing,
        "--state-dir",
        state.to_str().unwrap(),
    ]));
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.is_empty() && r.stderr.contains("failed on purpose"),
        "{}",
        r.stderr
    );
}
