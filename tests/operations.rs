//! Running a host as a service: stopping gracefully on SIGTERM, telling
//! systemd when it is ready and when it stops, log volume, payloads from
//! files.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{call_peer, host_bin, start_dht, start_host, test_plugin, HostProcess, SOON};

/// A host of the `faulty` test plugin (its `sleep` service is the slow
/// request) logging at debug with `time_limit`, on a DHT of its own;
/// returns the DHT, the host and its RPC address.
fn faulty_host(time_limit: &str) -> (HostProcess, HostProcess, String) {
    let (dht, bootstrap) = start_dht();
    let (host, port) = start_host(
        "faulty host",
        &[&test_plugin("faulty")],
        &bootstrap,
        &[
            "--control",
            "off",
            "--log-level",
            "debug",
            "--time-limit",
            time_limit,
        ],
    );
    (dht, host, format!("127.0.0.1:{port}"))
}

#[test]
fn sigterm_lets_the_request_in_flight_finish_and_refuses_new_ones() {
    let (_dht, mut host, peer) = faulty_host("10s");
    // A healthy request that takes 3 s, in flight when the signal comes.
    let slow = HostProcess::spawn("slow caller", &["call", "sleep", "3000", "--peer", &peer]);
    host.wait_for("request for sleep", SOON);
    let signalled = Instant::now();
    host.signal("TERM");
    host.wait_for("draining 1 requests", SOON);

    // A request arriving during the drain is told so at once, not left to
    // its 10 s timeout.
    let asked = Instant::now();
    let refused = call_peer(&peer, "echo", "1", &["--timeout-ms", "10000"]);
    assert_eq!(refused.code, 1, "{}{}", refused.stdout, refused.stderr);
    assert!(
        refused.stderr.contains("ERR_SHUTTING_DOWN"),
        "{}",
        refused.stderr
    );
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "the refusal took {:?}",
        asked.elapsed()
    );

    // The request in flight gets its reply, then the host exits 0, well
    // within its 10 s time limit plus the grace.
    slow.wait_for(r#"{"slept":3000}"#, SOON);
    let code = host.wait_exit(Duration::from_secs(12).saturating_sub(signalled.elapsed()));
    assert_eq!(code, Some(0), "{}", host.output());
    assert!(host.output().contains("drained in"), "{}", host.output());
}

#[test]
fn readiness_and_stopping_are_notified_on_notify_socket() {
    let (_dht, bootstrap) = start_dht();
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let manager = UnixDatagram::bind(&socket_path).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut command = Command::new(host_bin());
    command
        .args(common::run_args(&test_plugin("faulty"), &bootstrap))
        .env_remove("RUST_LOG")
        .env("NOTIFY_SOCKET", &socket_path);
    let mut host = HostProcess::spawn_command("notifying host", command);

    let next_message = |what: &str| -> String {
        let deadline = Instant::now() + SOON;
        let mut buf = [0u8; 4096];
        loop {
            match manager.recv(&mut buf) {
                Ok(n) => return String::from_utf8_lossy(&buf[..n]).into_owned(),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    assert!(Instant::now() < deadline, "no {what} notification");
                }
                Err(e) => panic!("{e}"),
            }
        }
    };
    let ready = next_message("READY=1");
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=serving on port ")),
        "{ready:?}"
    );
    // Ready means announced: the services are findable from now on. The
    // host logs each announce before it notifies, but the log reaches this
    // test through a pipe and a reader thread, which may lag behind the
    // notification: wait for the line rather than count it at once.
    assert!(!ready.contains("failed"), "{ready:?}");
    host.wait_for("announced echo", SOON);

    host.signal("TERM");
    let stopping = next_message("STOPPING=1");
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert_eq!(host.wait_exit(SOON), Some(0), "{}", host.output());
}

#[test]
fn requests_are_logged_at_debug_not_info() {
    let (_dht, bootstrap) = start_dht();
    let quiet_args = ["--control", "off"];
    let (quiet, port) = start_host(
        "info host",
        &[&test_plugin("faulty")],
        &bootstrap,
        &quiet_args,
    );
    let (verbose, verbose_port) = start_host(
        "debug host",
        &[&test_plugin("faulty")],
        &bootstrap,
        &["--control", "off", "--log-level", "debug"],
    );
    for p in [port, verbose_port] {
        let r = call_peer(&format!("127.0.0.1:{p}"), "log", "1", &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    // The plugin's own line comes after the host's line for the request, in
    // the same stream: once it is there, so would the request's be.
    verbose.wait_for("logged 1", SOON);
    verbose.wait_for("request for log", SOON);
    quiet.wait_for("logged 1", SOON);
    assert_eq!(quiet.count("request for log"), 0, "{}", quiet.output());
}

#[test]
fn call_bench_and_invoke_read_the_payload_from_a_file_or_stdin() {
    let (_dht, bootstrap) = start_dht();
    let (_host, port) = start_host(
        "faulty host",
        &[&test_plugin("faulty")],
        &bootstrap,
        &["--control", "off"],
    );
    let peer = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    // 800 KB: more than an argument may be ("Argument list too long").
    let big = format!("\"{}\"", "x".repeat(800_000));
    let file = dir.path().join("big.json");
    std::fs::write(&file, &big).unwrap();
    let at_file = format!("@{}", file.display());

    let r = call_peer(&peer, "echo", &at_file, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.trim(), big);

    let r = common::shown(common::host(&[
        "bench",
        "echo",
        &at_file,
        "--bootstrap",
        &bootstrap,
        "--requests",
        "3",
        "--warmup",
        "1",
    ]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.starts_with("requests ok=3 failed=0 "),
        "{}",
        r.stdout
    );

    // Standard input, as `-`.
    let mut invoke = Command::new(host_bin())
        .args([
            "invoke",
            test_plugin("faulty").to_str().unwrap(),
            "echo",
            "-",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut invoke.stdin.take().unwrap(), br#"{"from":"stdin"}"#).unwrap();
    let r = common::shown(invoke.wait_with_output().unwrap());
    assert_eq!(
        (r.code, r.stdout.trim()),
        (0, r#"{"from":"stdin"}"#),
        "{}",
        r.stderr
    );

    // Errors name the file.
    let missing = dir.path().join("missing.json");
    let r = common::invoke(
        &test_plugin("faulty"),
        "echo",
        &format!("@{}", missing.display()),
        &[],
    );
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("cannot read the payload file") && r.stderr.contains("missing.json"),
        "{}",
        r.stderr
    );
    std::fs::write(&file, "not json").unwrap();
    let r = common::invoke(&test_plugin("faulty"), "echo", &at_file, &[]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("big.json is not valid JSON"),
        "{}",
        r.stderr
    );
    std::fs::write(&file, format!("\"{}\"", "x".repeat(1 << 20))).unwrap();
    let r = call_peer(&peer, "echo", &at_file, &[]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("larger than 1 MiB"), "{}", r.stderr);
}

/// The example unit's settings, `Key=value` lines of its [Service] table
/// (continuation lines joined).
fn example_unit() -> (String, Vec<(String, String)>) {
    let path = common::root().join("examples/systemd/grenache-host.service");
    let text = std::fs::read_to_string(&path).unwrap();
    let joined = text.replace("\\\n", " ");
    let settings = joined
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    (text, settings)
}

#[test]
fn the_example_systemd_unit_matches_what_the_host_does() {
    let (text, settings) = example_unit();
    let get = |key: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(get("Type"), ["notify"]);
    // The control socket is in the runtime directory systemd makes.
    let runtime = get("RuntimeDirectory");
    let exec = get("ExecStart");
    assert!(
        exec[0].contains(&format!("--control /run/{}/", runtime[0])),
        "{exec:?}"
    );
    // Stopping waits for the drain: the default 5 s time limit plus the
    // 1 s grace and the 1 s linger.
    let stop: u64 = get("TimeoutStopSec")[0]
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!(stop > 5 + 2, "TimeoutStopSec={stop}s");
    // wasmtime maps compiled code executable.
    assert!(get("MemoryDenyWriteExecute").is_empty(), "{text}");
    assert_eq!(get("RestrictAddressFamilies"), ["AF_INET AF_UNIX"]);

    // The flags of its ExecStart are ones `run` takes.
    let args: Vec<&str> = exec[0].split_whitespace().skip(1).collect();
    let mut help_args = args.clone();
    help_args.push("--help");
    let r = common::shown(common::host(&help_args));
    assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);

    // systemd's own check, where systemd is installed; the unit's binary
    // path is this build's.
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        let dir = tempfile::tempdir().unwrap();
        let unit = dir.path().join("grenache-host.service");
        std::fs::write(
            &unit,
            text.replace("/usr/local/bin/grenache-host", host_bin().to_str().unwrap()),
        )
        .unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn ticks_stop_when_the_drain_starts() {
    let (_dht, bootstrap) = start_dht();
    let dir = tempfile::tempdir().unwrap();
    let policy = common::policy_file(dir.path(), "[plugin.stateful]\ntick_interval = \"100ms\"\n");
    let state = dir.path().join("state");
    let (mut host, port) = start_host(
        "ticking host",
        &[&test_plugin("faulty"), &test_plugin("stateful")],
        &bootstrap,
        &[
            "--control",
            "off",
            "--log-level",
            "debug",
            "--config",
            &policy,
            "--state-dir",
            state.to_str().unwrap(),
        ],
    );
    host.wait_for("tick end 2", SOON);
    // A request of 2 s keeps the host draining for 20 tick intervals.
    let peer = format!("127.0.0.1:{port}");
    let slow = HostProcess::spawn("slow caller", &["call", "sleep", "2000", "--peer", &peer]);
    host.wait_for("request for sleep", SOON);
    host.signal("TERM");
    slow.wait_for(r#"{"slept":2000}"#, SOON);
    assert_eq!(host.wait_exit(SOON), Some(0), "{}", host.output());
    let log = host.output();
    let (_, draining) = log
        .split_once("ticks stopped")
        .unwrap_or_else(|| panic!("no \"ticks stopped\":\n{log}"));
    assert!(draining.contains("drained in"), "{log}");
    assert!(
        !draining.contains("tick start"),
        "a tick started during the drain:\n{log}"
    );
}

#[test]
fn a_second_sigterm_during_the_drain_exits_143() {
    let (_dht, mut host, peer) = faulty_host("20s");
    let _slow = HostProcess::spawn("slow caller", &["call", "sleep", "15000", "--peer", &peer]);
    host.wait_for("request for sleep", SOON);
    host.signal("TERM");
    host.wait_for("draining 1 requests", SOON);
    host.signal("TERM");
    // Well before the 15 s request could have finished.
    assert_eq!(
        host.wait_exit(Duration::from_secs(10)),
        Some(143),
        "{}",
        host.output()
    );
    assert!(
        host.output()
            .contains("second signal: stopping without draining"),
        "{}",
        host.output()
    );
}
