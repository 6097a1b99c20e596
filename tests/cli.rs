//! The `grenache-host` binary on the built plugins, used the way the README
//! tells a user to use it.

mod common;

use common::{host, host_bin, invoke, plugin, shown, test_plugin, HostProcess, SOON};

#[test]
fn invoke_answers_the_classic_fibonacci_request() {
    let fib = plugin("fibonacci");
    let r = invoke(&fib, "fibonacci_worker", r#"{"length":10}"#, &[]);
    assert_eq!(r.code, 0, "stderr: {}", r.stderr);
    assert_eq!(r.stdout, "[1,1,2,3,5,8,13,21,34,55]\n");
}

#[test]
fn invoke_prints_the_reply_as_compact_json() {
    let faulty = test_plugin("faulty");
    let r = invoke(&faulty, "echo", "{ \"a\" : [ 1 , 2 ] }", &[]);
    assert_eq!(r.code, 0, "stderr: {}", r.stderr);
    assert_eq!(r.stdout, "{\"a\":[1,2]}\n");
}

#[test]
fn handler_errors_go_to_stderr_with_exit_code_1() {
    let fib = plugin("fibonacci");
    for (payload, reason) in [
        (r#"{"length":79}"#, "too large"),
        (r#"{"length":-3}"#, "negative"),
        (r#"{"length":1.5}"#, "not a whole number"),
        (r#"{"size":10}"#, "missing"),
    ] {
        let r = invoke(&fib, "fibonacci_worker", payload, &[]);
        assert_eq!(r.code, 1, "{payload}: {}", r.stderr);
        assert_eq!(r.stdout, "", "{payload}");
        assert!(r.stderr.contains(reason), "{payload}: {}", r.stderr);
    }
}

#[test]
fn the_longest_exact_sequence_is_answered_and_one_more_is_refused() {
    let fib = plugin("fibonacci");
    let r = invoke(&fib, "fibonacci_worker", r#"{"length":78}"#, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let terms: Vec<u64> = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(terms.len(), 78);
    assert_eq!(terms[77], 8_944_394_323_791_464);
    let r = invoke(&fib, "fibonacci_worker", r#"{"length":79}"#, &[]);
    assert_eq!(r.code, 1);
}

#[test]
fn a_payload_that_is_not_json_is_refused_before_the_plugin_runs() {
    let faulty = test_plugin("faulty");
    // The `log` service would print "logged ..." if it ran.
    let r = invoke(&faulty, "log", "{not json", &[]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("not valid JSON"), "{}", r.stderr);
    assert!(!r.stderr.contains("logged"), "the plugin ran: {}", r.stderr);
}

#[test]
fn a_service_the_plugin_does_not_serve_is_a_usage_error() {
    let fib = plugin("fibonacci");
    let r = invoke(&fib, "fibonacci_consumer", "{}", &[]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("serves: fibonacci_worker"),
        "{}",
        r.stderr
    );
}

#[test]
fn plugin_logs_and_output_reach_the_host_log_prefixed_with_the_plugin_name() {
    let faulty = test_plugin("faulty");
    let r = invoke(&faulty, "log", "42", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout, "42\n",
        "plugin stdout must not leak into the reply"
    );
    for line in [
        "[faulty] logged 42",
        "[faulty] stdout 42",
        "[faulty] stderr 42",
    ] {
        assert!(r.stderr.contains(line), "missing {line:?} in {}", r.stderr);
    }
}

#[test]
fn outgoing_requests_say_there_is_no_network_in_invoke_mode() {
    let consumer = plugin("consumer");
    let r = invoke(&consumer, "fibonacci_consumer", r#"{"length":3}"#, &[]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("no network in this mode"), "{}", r.stderr);
}

#[test]
fn inspect_reports_each_plugins_manifest() {
    let r = shown(host(&["inspect", plugin("consumer").to_str().unwrap()]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let consumer = r.stdout.trim().to_string();
    let m: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(m["serves"], serde_json::json!(["fibonacci_consumer"]));
    assert_eq!(m["punch"], serde_json::json!([]));
    assert_eq!(m["calls"], serde_json::json!(["fibonacci_worker"]));

    let r = shown(host(&["inspect", plugin("fibonacci").to_str().unwrap()]));
    let m: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(m["serves"], serde_json::json!(["fibonacci_worker"]));
    assert_eq!(m["punch"], serde_json::json!(["fibonacci_consumer"]));
    assert_eq!(m["calls"], serde_json::json!([]));

    let r = shown(host(&["inspect", test_plugin("faulty").to_str().unwrap()]));
    let m: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(m["calls"], serde_json::json!(["*"]));

    // Its help says what it prints, with the consumer's real output.
    let r = shown(host(&["inspect", "--help"]));
    for needle in ["contract", "serves", "punched", "may call", &consumer] {
        assert!(r.stdout.contains(needle), "{needle}: {}", r.stdout);
    }
}

/// Runs `invoke` on `path` and checks the load error: exit code 2, one line
/// naming the file, then the expected cause and fix.
fn assert_load_error(path: &std::path::Path, cause: &str, fix: &str) {
    let r = invoke(path, "fibonacci_worker", "{}", &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {}", r.stderr);
    let line = lines[0];
    assert!(
        line.contains(&path.display().to_string()),
        "names the file: {line}"
    );
    assert!(line.contains(cause), "cause {cause:?}: {line}");
    assert!(line.contains(fix), "fix {fix:?}: {line}");
}

#[test]
fn loading_errors_are_one_clear_line_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.wasm");
    assert_load_error(&missing, "file not found", "check the path");
    let r = invoke(&missing, "fibonacci_worker", "{}", &[]);
    assert!(!r.stderr.contains("xtask"), "{}", r.stderr);
    // A bundled plugin not built yet: the fix is to build them.
    assert_load_error(
        &common::root().join("plugins/not-built-yet.wasm"),
        "file not found",
        "build the bundled plugins with `cargo xtask plugins`",
    );
    // A plugin's source crate instead of its .wasm.
    assert_load_error(
        &common::root().join("plugins/fibonacci"),
        "is a directory, not a plugin file",
        "pass the plugin's .wasm file",
    );

    let text = dir.path().join("notes.wasm");
    std::fs::write(&text, "just some text\n").unwrap();
    assert_load_error(&text, "not a WebAssembly file", "wasm32-wasip2");

    // The smallest valid core module: magic + version 1.
    let module = dir.path().join("core.wasm");
    std::fs::write(&module, b"\0asm\x01\0\0\0").unwrap();
    assert_load_error(
        &module,
        "core wasm module, not a component",
        "--target wasm32-wasip2",
    );

    let truncated = dir.path().join("truncated.wasm");
    let mut bytes = std::fs::read(plugin("fibonacci")).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&truncated, bytes).unwrap();
    assert_load_error(&truncated, "invalid component", "rebuild");

    assert_load_error(
        &test_plugin("other-world"),
        "not a grenache plugin",
        "world: \"plugin\"",
    );
}

#[test]
fn help_explains_each_command() {
    let r = shown(host(&["--help"]));
    assert_eq!(r.code, 0);
    assert!(
        r.stdout.contains("invoke") && r.stdout.contains("inspect"),
        "{}",
        r.stdout
    );
    let r = shown(host(&["invoke", "--help"]));
    assert_eq!(r.code, 0);
    for needle in [
        "--memory-limit",
        "--time-limit",
        "exit code 1",
        "fibonacci_worker",
    ] {
        assert!(r.stdout.contains(needle), "{needle}: {}", r.stdout);
    }
}

#[test]
fn wrong_arguments_are_refused_with_exit_code_2() {
    let fib = plugin("fibonacci");
    let r = shown(host(&["invoke", fib.to_str().unwrap()]));
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("required"), "{}", r.stderr);
    let r = invoke(&fib, "fibonacci_worker", "{}", &["--memory-limit", "lots"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("64MiB"), "{}", r.stderr);
}

#[test]
fn grape_refuses_a_zero_payload_limit_and_names_a_bad_bind_address() {
    let r = shown(host(&[
        "grape",
        "--dp",
        "0",
        "--aph",
        "0",
        "--check_maxPayloadSize",
        "0",
    ]));
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("--check_maxPayloadSize"), "{}", r.stderr);
    assert!(r.stderr.contains("every request"), "{}", r.stderr);
    // TEST-NET-1: no interface of this machine has it.
    let r = shown(host(&[
        "grape",
        "--dp",
        "0",
        "--aph",
        "0",
        "-b",
        "192.0.2.77",
    ]));
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("-b 192.0.2.77"), "{}", r.stderr);
    assert!(!r.stderr.contains("--dp"), "{}", r.stderr);
}

#[test]
fn memory_and_time_limits_are_settable() {
    let faulty = test_plugin("faulty");
    let r = invoke(&faulty, "oom", "1", &["--memory-limit", "8MiB"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("memory limit of 8 MiB"), "{}", r.stderr);
    let started = std::time::Instant::now();
    let r = invoke(&faulty, "loop", "1", &["--time-limit", "300ms"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("time limit of 300ms"), "{}", r.stderr);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "the loop was stopped"
    );
}

#[test]
fn a_memory_limit_below_the_plugins_own_memory_blames_the_limit() {
    let fib = plugin("fibonacci");
    // The fibonacci plugin's module declares 1.0625 MiB of memory.
    for (limit, shown) in [("64KiB", "64 KiB"), ("1MiB", "1 MiB")] {
        let r = invoke(
            &fib,
            "fibonacci_worker",
            r#"{"length":78}"#,
            &["--memory-limit", limit],
        );
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert_eq!(
            r.stderr.trim_end(),
            format!(
                "error: cannot load {}: plugin fibonacci needs at least 1.1 MiB of memory, more than its limit of {shown}; raise --memory-limit (or the policy's memory_limit)",
                fib.display()
            )
        );
    }
    let r = invoke(
        &fib,
        "fibonacci_worker",
        r#"{"length":78}"#,
        &["--memory-limit", "2MiB"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn a_plugin_built_against_the_0_2_contract_still_loads_and_answers() {
    let legacy = test_plugin("legacy-v2");
    let r = shown(host(&["inspect", legacy.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(m["contract"], "grenache:plugin@0.2.0");
    assert_eq!(m["serves"], serde_json::json!(["legacy"]));

    // Its handle gets no context, so --caller changes nothing for it.
    for extra in [&[][..], &["--caller", "192.0.2.1:7"]] {
        let r = invoke(&legacy, "legacy", r#"{"n":1}"#, extra);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(r.stdout, "{\"legacy\":{\"n\":1}}\n");
    }

    let r = shown(host(&["inspect", plugin("fibonacci").to_str().unwrap()]));
    let m: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(m["contract"], "grenache:plugin@0.4.0");
}

#[test]
fn a_plugin_built_against_the_0_3_contract_still_loads_and_answers() {
    let legacy = test_plugin("legacy-v3");
    let r = shown(host(&["inspect", legacy.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(m["contract"], "grenache:plugin@0.3.0");
    assert_eq!(m["serves"], serde_json::json!(["legacy_v3"]));
    assert_eq!(m["tick_interval_ms"], serde_json::Value::Null);
    let r = invoke(&legacy, "legacy_v3", "[2]", &["--caller", "192.0.2.1:7"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout, "{\"caller\":\"192.0.2.1:7\",\"legacy\":3,\"payload\":[2]}\n",
        "invoke prints compact JSON with sorted keys"
    );
}

#[test]
fn invoke_tells_the_plugin_no_caller_unless_given_one() {
    let echo = test_plugin("echo-caller");
    let r = invoke(&echo, "echo_caller", "{}", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "\"0.0.0.0:0\"\n");

    for caller in ["203.0.113.7:40123", "[2001:db8::1]:40123"] {
        let r = invoke(&echo, "echo_caller", "{}", &["--caller", caller]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(r.stdout, format!("\"{caller}\"\n"));
    }

    let r = invoke(&echo, "echo_caller", "{}", &["--caller", "somewhere"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("--caller"), "{}", r.stderr);
}

/// Runs `grenache-host <args>` with stdout a pipe whose reader has gone, as
/// in `grenache-host status | head -1` once head has exited.
fn with_stdout_closed(args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    std::process::Command::new(host_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(writer)
        .output()
        .unwrap()
}

#[test]
fn a_reader_that_goes_away_ends_the_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let fib = plugin("fibonacci");
    let fib = fib.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let control = control.to_str().unwrap();
    let serving = HostProcess::spawn(
        "host",
        &["run", fib, "--listen", "127.0.0.1:0", "--control", control],
    );
    serving.wait_for("control socket", SOON);

    for args in [
        &["status", "--control", control][..],
        &["inspect", fib],
        &["invoke", fib, "fibonacci_worker", r#"{"length":10}"#],
    ] {
        let out = with_stdout_closed(args);
        // Ended by SIGPIPE like a Unix tool: no panic, nothing on stderr.
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "{args:?}: {:?}",
            out.status
        );
        assert_eq!(String::from_utf8_lossy(&out.stderr), "", "{args:?}");
    }
}

#[test]
fn ipv6_addresses_and_unresolvable_bootstrap_names_are_refused_with_the_reason() {
    // Never an announced address where nothing listens: IPv6 is refused at
    // start, for the host's socket, a client's and a direct peer alike.
    let fib = plugin("fibonacci");
    for args in [
        vec!["run", fib.to_str().unwrap(), "--listen", "[::1]:0"],
        vec!["call", "fibonacci_worker", "{}", "--peer", "[::1]:40000"],
        vec!["dht", "--listen", "[::1]:20001"],
    ] {
        let r = shown(host(&args));
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("is IPv6") && r.stderr.contains("use an IPv4 address"),
            "{args:?}: {}",
            r.stderr
        );
    }
    // A --bootstrap name that does not resolve is named, with the fix.
    let r = shown(host(&[
        "call",
        "fibonacci_worker",
        "{}",
        "--bootstrap",
        "nosuchhost.invalid:20001",
    ]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("bootstrap node nosuchhost.invalid:20001: cannot resolve it")
            && r.stderr.contains("HOST:PORT"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_host_keeps_one_identity_and_shows_it_in_its_log_status_and_id() {
    use std::os::unix::fs::PermissionsExt;
    let fib = plugin("fibonacci");
    let fib = fib.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let control = dir.path().join("control.sock");
    let control = control.to_str().unwrap();

    // `id` creates the identity, owner-only, and prints its public key.
    let id = shown(host(&["id", "--state-dir", state]));
    assert_eq!(id.code, 0, "{}", id.stderr);
    let key = id.stdout.trim().to_string();
    assert_eq!(key.len(), 64, "{key}");
    assert!(
        id.stderr.contains("created a new identity"),
        "{}",
        id.stderr
    );
    let file = dir.path().join("state/identity.key");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // `run` on the same state directory is that host, twice.
    let run = |name| {
        let args = [
            "run",
            fib,
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state,
            "--control",
            control,
        ];
        let serving = HostProcess::spawn(name, &args);
        serving.wait_for(&format!("identity {key}"), SOON);
        serving.wait_for("control socket", SOON);
        serving
    };
    let mut first = run("host");
    let status = shown(host(&["status", "--control", control]));
    assert_eq!(status.code, 0, "{}", status.stderr);
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(status["host"]["identity"], key.as_str(), "{status}");
    assert_eq!(first.terminate(SOON), Some(0));
    let mut again = run("restarted host");
    assert_eq!(again.terminate(SOON), Some(0));
    assert_eq!(
        shown(host(&["id", "--state-dir", state])).stdout.trim(),
        key
    );

    // --identity takes a key from `keygen`: its public key names the host.
    let prefix = dir.path().join("ops");
    assert_eq!(
        host(&["keygen", "--out", prefix.to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    let secret = dir.path().join("ops.secret");
    let public = std::fs::read_to_string(dir.path().join("ops.pub")).unwrap();
    let shown_key = shown(host(&["id", "--identity", secret.to_str().unwrap()]));
    assert_eq!(
        public.trim().strip_prefix("ed25519-public ").unwrap(),
        shown_key.stdout.trim()
    );

    // A key file others can read is refused, naming the fix, never the key.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = shown(host(&[
        "run",
        fib,
        "--listen",
        "127.0.0.1:0",
        "--control",
        "off",
        "--identity",
        secret.to_str().unwrap(),
    ]));
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(refused.stderr.contains("chmod 600"), "{}", refused.stderr);
    let seed = std::fs::read_to_string(&secret).unwrap();
    let seed = seed.trim().rsplit(' ').next().unwrap();
    assert!(!refused.stderr.contains(seed), "{}", refused.stderr);
}
