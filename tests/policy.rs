//! Operator policy (`run --config` plus flags) and the sandbox a plugin runs in.

mod common;

use common::{
    call_peer, host, invoke, plugin, policy_file, shown, start_dht, start_host, test_plugin,
    HostProcess, Shown, LOG_REQUESTS, SOON,
};

/// Calls `service` on the loopback host listening on `port`.
fn call_port(port: u16, service: &str, payload: &str) -> Shown {
    let peer = format!("127.0.0.1:{port}");
    call_peer(&peer, service, payload, &["--timeout-ms", "5000"])
}

#[test]
fn a_plugin_gets_no_files_environment_or_sockets() {
    let r = invoke(&test_plugin("faulty"), "sandbox_probe", "1", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let probe: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_ne!(probe["files"], "readable", "{probe}");
    assert_eq!(probe["env"], 0, "{probe}");
    assert_eq!(probe["tcp"], "PermissionDenied", "{probe}");
    assert_eq!(probe["udp"], "PermissionDenied", "{probe}");
}

#[test]
fn calls_outside_the_policy_are_denied() {
    let (_dht, bootstrap) = start_dht();
    let dir = tempfile::tempdir().unwrap();
    let config = policy_file(dir.path(), "[plugin.consumer]\nmay_call = []\n");
    let (consumer, _) = start_host(
        "consumer",
        &[&plugin("consumer")],
        &bootstrap,
        &["--config", &config],
    );
    let (_worker, _) = start_host(
        "worker",
        &[&plugin("fibonacci")],
        &bootstrap,
        &["--behind-nat"],
    );
    // The consumer is punched and tries to call back: the host refuses.
    consumer.wait_for("[consumer] punch from", SOON);
    let line = consumer.wait_for("[consumer] request to", SOON);
    assert!(
        line.contains("denied: plugin consumer may not call \"fibonacci_worker\""),
        "{line}"
    );
    assert_eq!(consumer.count("got data reply"), 0, "{}", consumer.output());
}

#[test]
fn max_concurrent_refuses_the_excess_and_limits_come_from_the_file() {
    let (_dht, bootstrap) = start_dht();
    let dir = tempfile::tempdir().unwrap();
    let config = policy_file(
        dir.path(),
        "[plugin.faulty]\nmax_concurrent = 1\ntime_limit = \"1500ms\"\n",
    );
    let (faulty, port) = start_host(
        "faulty",
        &[&test_plugin("faulty")],
        &bootstrap,
        &["--config", &config, LOG_REQUESTS[0], LOG_REQUESTS[1]],
    );
    let peer = format!("127.0.0.1:{port}");
    let looping = HostProcess::spawn("looping call", &["call", "loop", "1", "--peer", &peer]);
    faulty.wait_for("request for loop", SOON);
    let r = call_port(port, "echo", "1");
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.stderr.contains("busy: 1 requests already running"),
        "{}",
        r.stderr
    );
    // The loop ends at the file's time limit, and then echo runs again.
    looping.wait_for("time limit of 1.5s", SOON);
    let r = call_port(port, "echo", "1");
    assert_eq!((r.code, r.stdout.as_str()), (0, "1\n"), "{}", r.stderr);
}

#[test]
fn command_line_limits_override_the_file() {
    let (_dht, bootstrap) = start_dht();
    let dir = tempfile::tempdir().unwrap();
    let config = policy_file(dir.path(), "[defaults]\nmemory_limit = \"48MiB\"\n");
    let flags = ["--config", config.as_str(), "--memory-limit", "16MiB"];
    let (_faulty, port) = start_host("faulty", &[&test_plugin("faulty")], &bootstrap, &flags);
    let r = call_port(port, "oom", "1");
    assert!(r.stderr.contains("memory limit of 16 MiB"), "{}", r.stderr);
}

#[test]
fn a_policy_memory_limit_below_the_plugins_own_memory_blames_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let config = policy_file(dir.path(), "[plugin.fibonacci]\nmemory_limit = \"1MiB\"\n");
    let fib = plugin("fibonacci");
    let fib = fib.to_str().unwrap();
    let r = shown(host(&[
        "run",
        fib,
        "--listen",
        "127.0.0.1:0",
        "--config",
        &config,
        "--control",
        "off",
    ]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "error: cannot load {fib}: plugin fibonacci needs at least 1.1 MiB of memory, more than its limit of 1 MiB; raise --memory-limit (or the policy's memory_limit)"
        )),
        "{}",
        r.stderr
    );
}

#[test]
fn a_plugin_not_allowed_to_be_punched_for_never_hears_of_punches() {
    let (_dht, bootstrap) = start_dht();
    let dir = tempfile::tempdir().unwrap();
    let config = policy_file(
        dir.path(),
        "[plugin.consumer]\nmay_be_punched_for = false\n",
    );
    let flags = ["--config", config.as_str(), "--log-level", "debug"];
    let (mut consumer, _) = start_host("consumer", &[&plugin("consumer")], &bootstrap, &flags);
    let (worker, _) = start_host(
        "worker",
        &[&plugin("fibonacci")],
        &bootstrap,
        &["--behind-nat"],
    );
    // The host sees the worker's punches (one a second): once it has seen
    // three, the plugin would long have heard of the first.
    let deadline = std::time::Instant::now() + SOON;
    while consumer.count("punched by") < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "no punches arrived: {}",
            worker.output()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(consumer.terminate(SOON), Some(0));
    let summary = consumer.wait_for("stopping: ", SOON);
    assert!(
        !summary.contains("received 0 punches"),
        "the worker's punches must arrive: {summary}"
    );
    assert_eq!(
        consumer.count("[consumer] punch from"),
        0,
        "{}",
        consumer.output()
    );
}

#[test]
fn a_bad_policy_file_is_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = policy_file(dir.path(), "[plugin.fibonacci]\nmax_concurrent = 0\n");
    let r = shown(host(&[
        "run",
        plugin("fibonacci").to_str().unwrap(),
        "--config",
        &config,
    ]));
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("[fibonacci] max_concurrent"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_policy_table_named_after_a_service_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    // The plugin is `fibonacci` (its file); `fibonacci_worker` is its service.
    let config = policy_file(
        dir.path(),
        "[plugin.fibonacci_worker]\nmax_concurrent = 2\n",
    );
    let fibonacci = plugin("fibonacci");
    let r = shown(host(&[
        "run",
        fibonacci.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--control",
        "off",
        "--config",
        &config,
    ]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("[plugin.fibonacci_worker] names no plugin loaded here (plugins: fibonacci)"),
        "{}",
        r.stderr
    );
}
