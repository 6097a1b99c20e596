//! Replacing plugins in a running host: through the control socket and
//! `--watch`, with requests flowing and none lost.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{call, host, shown, start_dht, test_plugin, HostProcess, SOON};

/// A host serving a copy of `version-1.wasm` named `versioned.wasm` in `dir`,
/// with its control socket in `dir`; returns it, its control path and its port.
fn versioned_host(dir: &Path, bootstrap: &str, extra: &[&str]) -> (HostProcess, PathBuf) {
    let file = dir.join("versioned.wasm");
    std::fs::copy(test_plugin("version-1"), &file).unwrap();
    let control = dir.join("control.sock");
    let mut args = vec![
        "run",
        file.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--bootstrap",
        bootstrap,
        "--control",
        control.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let host = HostProcess::spawn("versioned host", &args);
    host.wait_for("announced versioned", SOON);
    (host, control)
}

fn control(args: &[&str], control: &Path) -> common::Shown {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--control", control.to_str().unwrap()]);
    shown(host(&all))
}

fn version(bootstrap: &str) -> String {
    let r = call(bootstrap, "versioned", "{}", &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    r.stdout.trim().to_string()
}

#[test]
fn swapping_ten_times_under_load_loses_no_request() {
    let (_dht, bootstrap) = start_dht();
    let dir = tempfile::tempdir().unwrap();
    let (versioned, sock) = versioned_host(dir.path(), &bootstrap, &[]);
    let (v1, v2) = (test_plugin("version-1"), test_plugin("version-2"));
    let mut bench = HostProcess::spawn(
        "bench",
        &[
            "bench",
            "versioned",
            "{}",
            "--bootstrap",
            &bootstrap,
            "--requests",
            "30000",
            "--concurrency",
            "32",
        ],
    );
    bench.wait_for("bench: 30000 requests", SOON);
    // Eleven swaps, alternating, ending on version 2, while the bench runs.
    for i in 0..11 {
        let file = if i % 2 == 0 { &v2 } else { &v1 };
        let r = control(&["swap", "versioned", file.to_str().unwrap()], &sock);
        assert_eq!(r.code, 0, "swap {i}: {}{}", r.stdout, r.stderr);
        assert!(r.stdout.contains("swapped versioned"), "{}", r.stdout);
    }
    assert!(
        bench.is_running(),
        "the bench ended before the swaps did; give it more requests\n{}",
        bench.output()
    );
    let line = bench.wait_for("requests ok=", SOON * 6);
    assert!(
        line.starts_with("requests ok=30000 failed=0 "),
        "{line}\n{}",
        bench.output()
    );
    assert_eq!(version(&bootstrap), r#"{"version":2}"#);

    let r = control(&["status"], &sock);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let status: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let plugin = &status["plugins"][0];
    assert_eq!(plugin["swaps"], 11);
    // Only the last 5 earlier versions are kept to roll back to.
    assert_eq!(
        plugin["history"].as_array().map(Vec::len),
        Some(5),
        "{plugin}"
    );
    assert!(plugin["requests"].as_u64().unwrap() >= 30000, "{plugin}");
    drop(versioned);
}

#[test]
fn a_swap_to_a_precompiled_plugin_under_load_loses_no_request() {
    let (_dht, bootstrap) = start_dht();
    let dir = tempfile::tempdir().unwrap();
    let (_versioned, sock) = versioned_host(dir.path(), &bootstrap, &[]);
    let v2 = common::precompiled(&test_plugin("version-2"), dir.path(), &[]);
    let mut bench = HostProcess::spawn(
        "bench",
        &[
            "bench",
            "versioned",
            "{}",
            "--bootstrap",
            &bootstrap,
            "--requests",
            "10000",
            "--concurrency",
            "16",
        ],
    );
    bench.wait_for("bench: 10000 requests", SOON);
    let r = control(&["swap", "versioned", v2.to_str().unwrap()], &sock);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("swapped versioned"), "{}", r.stdout);
    assert!(
        bench.is_running(),
        "the bench ended before the swap; give it more requests\n{}",
        bench.output()
    );
    let line = bench.wait_for("requests ok=", SOON * 6);
    assert!(
        line.starts_with("requests ok=10000 failed=0 "),
        "{line}\n{}",
        bench.output()
    );
    assert_eq!(version(&bootstrap), r#"{"version":2}"#);
}

#[test]
fn a_swap_changes_what_is_announced_and_rollback_restores_it() {
    let (_dht, bootstrap) = start_dht();
    let dir = tempfile::tempdir().unwrap();
    let (host, sock) = versioned_host(dir.path(), &bootstrap, &[]);
    let v2 = test_plugin("version-2");
    let r = control(&["swap", "versioned", v2.to_str().unwrap()], &sock);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The log line names the services and both content hashes.
    let swapped = host.wait_for("swapped versioned", SOON);
    assert!(
        swapped.contains("versioned_v2_only")
            && swapped.contains("was ")
            && swapped.contains("loaded in"),
        "{swapped}"
    );
    host.wait_for("announced versioned_v2_only", SOON);
    let r = call(&bootstrap, "versioned_v2_only", "{}", &[]);
    assert_eq!(
        (r.code, r.stdout.trim()),
        (0, r#"{"version":2}"#),
        "{}",
        r.stderr
    );

    let r = control(&["rollback", "versioned"], &sock);
    assert_eq!(r.code, 0, "{}", r.stderr);
    host.wait_for("stopped announcing versioned_v2_only", SOON);
    assert_eq!(version(&bootstrap), r#"{"version":1}"#);
}

#[test]
fn a_file_that_does_not_load_leaves_the_old_version_serving() {
    let (_dht, bootstrap) = start_dht();
    let dir = tempfile::tempdir().unwrap();
    let (host, sock) = versioned_host(dir.path(), &bootstrap, &[]);
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, "not wasm").unwrap();
    let r = control(&["swap", "versioned", junk.to_str().unwrap()], &sock);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("not a WebAssembly file"), "{}", r.stderr);
    host.wait_for("refused, the current version keeps serving", SOON);
    let r = control(&["status"], &sock);
    let status: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let plugin = &status["plugins"][0];
    assert_eq!(
        (plugin["refused_swaps"].as_u64(), plugin["swaps"].as_u64()),
        (Some(1), Some(0)),
        "{plugin}"
    );
    assert!(
        plugin["last_problem"]
            .as_str()
            .unwrap()
            .contains("not a WebAssembly file"),
        "{plugin}"
    );
    // A rollback with nothing to roll back to, and an unknown target.
    let r = control(&["rollback", "versioned"], &sock);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("no previous version"), "{}", r.stderr);
    let r = control(&["swap", "nope", junk.to_str().unwrap()], &sock);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("no plugin or service \"nope\""),
        "{}",
        r.stderr
    );
    assert_eq!(version(&bootstrap), r#"{"version":1}"#);
}

#[test]
fn watch_swaps_in_a_file_renamed_over_and_ignores_a_broken_one() {
    let (_dht, bootstrap) = start_dht();
    let dir = tempfile::tempdir().unwrap();
    let (host, _sock) = versioned_host(dir.path(), &bootstrap, &["--watch"]);
    assert_eq!(version(&bootstrap), r#"{"version":1}"#);
    let file = dir.path().join("versioned.wasm");

    // Renamed over, as a package manager or an update agent does.
    let staged = dir.path().join("versioned.wasm.new");
    std::fs::copy(test_plugin("version-2"), &staged).unwrap();
    std::fs::rename(&staged, &file).unwrap();
    host.wait_for("swapped versioned", SOON);
    assert_eq!(version(&bootstrap), r#"{"version":2}"#);

    // Broken in place: refused, version 2 keeps serving.
    std::fs::write(&file, "garbage").unwrap();
    host.wait_for("refused, the current version keeps serving", SOON);
    assert_eq!(version(&bootstrap), r#"{"version":2}"#);

    // Fixed in place: swapped again.
    let started = Instant::now();
    std::fs::copy(test_plugin("version-1"), &file).unwrap();
    while version(&bootstrap) != r#"{"version":1}"# {
        assert!(started.elapsed() < SOON, "{}", host.output());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn watch_swaps_in_a_cwasm_that_compile_writes_over_the_served_one() {
    let (_dht, bootstrap) = start_dht();
    let dir = tempfile::tempdir().unwrap();
    // Served from a .cwasm: compile version 1 to versioned.cwasm.
    let v1 = dir.path().join("versioned.wasm");
    std::fs::copy(test_plugin("version-1"), &v1).unwrap();
    let file = common::precompiled(&v1, dir.path(), &[]);
    let mut args = common::run_args(&file, &bootstrap);
    args.push("--watch".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let watcher = HostProcess::spawn("precompiled host", &args);
    watcher.wait_for("announced versioned", SOON);
    assert_eq!(version(&bootstrap), r#"{"version":1}"#);

    // `compile` writes beside and renames over: the host swaps in the new
    // .cwasm whole.
    let r = shown(host(&[
        "compile",
        test_plugin("version-2").to_str().unwrap(),
        "-o",
        file.to_str().unwrap(),
    ]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    watcher.wait_for("swapped versioned", SOON);
    assert_eq!(version(&bootstrap), r#"{"version":2}"#);
}

#[test]
fn the_control_socket_is_owner_only_and_tools_say_when_no_host_listens() {
    let (_dht, bootstrap) = start_dht();
    let dir = tempfile::tempdir().unwrap();
    let (mut host, sock) = versioned_host(dir.path(), &bootstrap, &[]);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(host.terminate(SOON), Some(0));
    assert!(!sock.exists(), "the socket is removed on a clean stop");
    let r = control(&["status"], &sock);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("no host answers on the control socket"),
        "{}",
        r.stderr
    );
}

/// `grenache-host <args> --control <control>`, run from `cwd`.
fn control_in(cwd: &Path, args: &[&str], control: &Path) -> common::Shown {
    let out = std::process::Command::new(common::host_bin())
        .args(args)
        .args(["--control", control.to_str().unwrap()])
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    shown(out)
}

fn status_of(sock: &Path) -> serde_json::Value {
    let r = control(&["status"], sock);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let status: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    status["plugins"][0].clone()
}

#[test]
fn rollback_walks_back_through_the_history_and_a_refused_swap_changes_nothing() {
    let (_dht, bootstrap) = start_dht();
    let dir = tempfile::tempdir().unwrap();
    let (_host, sock) = versioned_host(dir.path(), &bootstrap, &[]);
    // Staged versions in a folder of their own, swapped in by relative
    // paths from there: the caller's working directory is not the host's.
    let staged = dir.path().join("staged");
    std::fs::create_dir(&staged).unwrap();
    for (name, from) in [
        ("b.wasm", "version-2"),
        ("c.wasm", "version-1"),
        ("d.wasm", "version-2"),
    ] {
        std::fs::copy(test_plugin(from), staged.join(name)).unwrap();
    }
    std::fs::write(staged.join("junk.wasm"), "not wasm").unwrap();
    for name in ["b.wasm", "c.wasm", "d.wasm"] {
        let r = control_in(&staged, &["swap", "versioned", name], &sock);
        assert_eq!(r.code, 0, "{name}: {}", r.stderr);
    }
    let plugin = status_of(&sock);
    // The file serving now, not the one the host started with.
    assert!(
        plugin["file"].as_str().unwrap().ends_with("staged/d.wasm"),
        "{plugin}"
    );
    let history: Vec<&str> = plugin["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["file"].as_str().unwrap().rsplit('/').next().unwrap())
        .collect();
    assert_eq!(history, ["c.wasm", "b.wasm", "versioned.wasm"], "{plugin}");
    assert_eq!(
        (plugin["swaps"].as_u64(), plugin["rollbacks"].as_u64()),
        (Some(3), Some(0))
    );

    // A refused swap leaves the history as it was.
    let r = control_in(&staged, &["swap", "versioned", "junk.wasm"], &sock);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(status_of(&sock)["history"], plugin["history"]);

    // Back two steps, to b.wasm; then back one, to versioned.wasm: never
    // forth again to what was rolled back from.
    let r = control(&["rollback", "versioned", "--to", "2"], &sock);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(version(&bootstrap), r#"{"version":2}"#);
    assert!(status_of(&sock)["file"]
        .as_str()
        .unwrap()
        .ends_with("staged/b.wasm"));
    let r = control(&["rollback", "versioned"], &sock);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(version(&bootstrap), r#"{"version":1}"#);
    let plugin = status_of(&sock);
    assert!(
        plugin["file"]
            .as_str()
            .unwrap()
            .ends_with("/versioned.wasm"),
        "{plugin}"
    );
    assert_eq!(
        (
            plugin["swaps"].as_u64(),
            plugin["rollbacks"].as_u64(),
            plugin["history"].as_array().map(Vec::len)
        ),
        (Some(3), Some(2), Some(0)),
        "{plugin}"
    );
    // Nothing further back: the rollback "to be safe" after a refused swap
    // refuses instead of bringing a newer version back.
    let r = control_in(&staged, &["swap", "versioned", "junk.wasm"], &sock);
    assert_eq!(r.code, 1);
    let r = control(&["rollback", "versioned"], &sock);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("no previous version"), "{}", r.stderr);
    assert_eq!(version(&bootstrap), r#"{"version":1}"#);

    // A relative path that does not exist where the caller is: named, exit 2.
    let r = control(&["swap", "versioned", "nowhere/e.wasm"], &sock);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("cannot use nowhere/e.wasm"),
        "{}",
        r.stderr
    );
}

#[test]
fn the_control_socket_refuses_unsafe_places_and_bad_files_and_names_its_host() {
    use std::os::unix::fs::PermissionsExt;
    let (_dht, bootstrap) = start_dht();
    let dir = tempfile::tempdir().unwrap();
    // A directory everyone can write, like /tmp: another user could listen
    // there first. Refused with an error, for --control and by default.
    let open_dir = dir.path().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let plugin = test_plugin("version-1");
    let base = [
        "run",
        plugin.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--bootstrap",
        &bootstrap,
    ];
    let in_open_dir = open_dir.join("c.sock");
    let mut explicit = base.to_vec();
    explicit.extend(["--control", in_open_dir.to_str().unwrap()]);
    let r = shown(host(&explicit));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("writable by other users"), "{}", r.stderr);
    let by_default = std::process::Command::new(common::host_bin())
        .args(base)
        .env("XDG_RUNTIME_DIR", &open_dir)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let r = shown(by_default);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--control"), "{}", r.stderr);
    // Something that is not a socket is never deleted to make room.
    let precious = dir.path().join("precious");
    std::fs::write(&precious, "keep me").unwrap();
    let mut on_file = base.to_vec();
    on_file.extend(["--control", precious.to_str().unwrap()]);
    let r = shown(host(&on_file));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("not a socket"), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");

    // A path through a symlink is used as the directory it names then: the
    // host binds, and at exit removes, the socket there, even if the link
    // is pointed elsewhere meanwhile.
    let (real, other) = (dir.path().join("real"), dir.path().join("other"));
    std::fs::create_dir(&real).unwrap();
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("c.sock"), "not the host's").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let through_link = link.join("c.sock");
    let mut linked = base.to_vec();
    linked.extend(["--control", through_link.to_str().unwrap()]);
    let mut host_behind_link = HostProcess::spawn("host behind a link", &linked);
    host_behind_link.wait_for("control socket", SOON);
    assert!(real.join("c.sock").exists());
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&other, &link).unwrap();
    assert_eq!(
        host_behind_link.terminate(SOON),
        Some(0),
        "{}",
        host_behind_link.output()
    );
    assert!(!real.join("c.sock").exists(), "its own socket is removed");
    assert_eq!(
        std::fs::read_to_string(other.join("c.sock")).unwrap(),
        "not the host's"
    );

    // `status` names the host that answers.
    let (versioned, sock) = versioned_host(dir.path(), &bootstrap, &[]);
    let r = control(&["status"], &sock);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let status: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(status["host"]["pid"], versioned.pid(), "{status}");
    assert!(status["host"]["rpc"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));

    // A swap names a regular file of bounded size; anything else is refused
    // at once, and the host goes on serving.
    let fifo = dir.path().join("fifo.wasm");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    for file in [fifo.as_path(), Path::new("/dev/zero")] {
        let started = Instant::now();
        let r = control(&["swap", "versioned", file.to_str().unwrap()], &sock);
        assert_eq!(r.code, 1, "{file:?}: {}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains("not a regular file"), "{}", r.stderr);
        assert!(
            started.elapsed() < SOON,
            "{file:?} took {:?}",
            started.elapsed()
        );
    }
    assert_eq!(version(&bootstrap), r#"{"version":1}"#);
}

#[test]
fn the_tools_refuse_a_control_socket_served_by_another_user() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: serving a socket as another user needs root");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.path().join("impostor.sock");
    // Someone else's listener (uid 65534, nobody) on the path the operator
    // names: it would answer every request "ok".
    let script = format!(
        "import os, socket\n\
         s = socket.socket(socket.AF_UNIX)\n\
         s.bind({path:?})\n\
         os.chmod({path:?}, 0o777)\n\
         os.setuid(65534)\n\
         s.listen()\n\
         print('listening', flush=True)\n\
         while True:\n\
         \x20   c, _ = s.accept()\n\
         \x20   c.recv(65536)\n\
         \x20   c.sendall(b'{{\"ok\":true,\"message\":\"swapped\"}}\\n')\n\
         \x20   c.close()\n",
        path = sock.to_str().unwrap()
    );
    let mut command = std::process::Command::new("python3");
    command.args(["-c", &script]);
    let impostor = HostProcess::spawn_command("impostor", command);
    impostor.wait_for("listening", SOON);
    let plugin = test_plugin("version-2");
    let r = control(&["swap", "versioned", plugin.to_str().unwrap()], &sock);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("served by uid 65534"), "{}", r.stderr);
    assert!(!r.stdout.contains("swapped"), "{}", r.stdout);
}

#[test]
fn a_swap_changes_whom_the_host_punches() {
    let (_dht, bootstrap) = start_dht();
    let (consumer, _) = common::start_host(
        "consumer host",
        &[&common::plugin("consumer")],
        &bootstrap,
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("worker.sock");
    let (_worker, _) = common::start_host(
        "worker host",
        &[&common::plugin("fibonacci")],
        &bootstrap,
        &["--behind-nat", "--control", sock.to_str().unwrap()],
    );
    consumer.wait_for("[consumer] punch from ", SOON);
    // version-1 serves `versioned` and punches nothing.
    let version_1 = test_plugin("version-1");
    let r = control(&["swap", "fibonacci", version_1.to_str().unwrap()], &sock);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    // A punch already on its way may still land; after that, none. The
    // worker punched every second before the swap: a silent 3 s says
    // it stopped.
    std::thread::sleep(Duration::from_secs(2));
    let settled = consumer.count("[consumer] punch from ");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        consumer.count("[consumer] punch from "),
        settled,
        "{}",
        consumer.output()
    );
}
