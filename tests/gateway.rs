//! The gateway build on a 64-bit ARM device, emulated: the `grenache-host`
//! without the compiler that `cargo xtask test` cross-compiles for
//! aarch64-unknown-linux-gnu (its path in GRENACHE_AARCH64_HOST) runs under
//! qemu-aarch64, as an operator runs it on a Raspberry Pi. It invokes and
//! serves a plugin the x86 host precompiled for it, refuses a `.wasm` with
//! the `compile` command to run instead, and calls and answers x86 hosts on
//! loopback.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{call, plugin, precompiled, shown, spawn_listening, start_dht, HostProcess, Shown};

const FIBONACCI_10: &str = "[1,1,2,3,5,8,13,21,34,55]";
const AARCH64: &str = "aarch64-unknown-linux-gnu";
/// Where Debian's libc6-dev-arm64-cross puts the aarch64 loader and libc.
const AARCH64_SYSROOT: &str = "/usr/aarch64-linux-gnu";
/// Emulation makes the host's start (wasmtime, the DHT) many times slower
/// than native; a deadline, not a wait.
const EMULATED: Duration = Duration::from_secs(120);

/// The aarch64 gateway build, run under qemu-aarch64.
struct Gateway {
    bin: PathBuf,
}

impl Gateway {
    /// The build `cargo xtask test` made, or `None` (after saying why on
    /// stderr) when there is none; with GRENACHE_REQUIRE_AARCH64=1 (set by
    /// CI) that is a failure instead.
    fn built(test: &str) -> Option<Gateway> {
        let why = match std::env::var_os("GRENACHE_AARCH64_HOST") {
            None => "GRENACHE_AARCH64_HOST is not set (`cargo xtask test` builds the aarch64 gateway host and sets it)".to_string(),
            Some(bin) if !Path::new(&bin).is_file() => {
                format!("GRENACHE_AARCH64_HOST={} is not a file", bin.to_string_lossy())
            }
            Some(bin) => return Some(Gateway { bin: bin.into() }),
        };
        if std::env::var("GRENACHE_REQUIRE_AARCH64").as_deref() == Ok("1") {
            panic!("{test}: the aarch64 gateway host is required here but {why}");
        }
        eprintln!("SKIPPED {test}: {why}");
        None
    }

    /// `qemu-aarch64 <gateway host> <args>`, as `common::host` runs the x86 one.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("qemu-aarch64");
        command
            .arg("-L")
            .arg(AARCH64_SYSROOT)
            .arg(&self.bin)
            .args(args)
            .env_remove("RUST_LOG");
        command
    }

    /// Runs the gateway host to completion.
    fn run(&self, args: &[&str]) -> Shown {
        shown(
            self.command(args)
                .output()
                .expect("qemu-aarch64 runs (apt-get install qemu-user)"),
        )
    }

    /// Starts the gateway host in the background.
    fn spawn(&self, name: &str, args: &[&str]) -> HostProcess {
        HostProcess::spawn_command(name, self.command(args))
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("paths are UTF-8")
}

#[test]
fn the_gateway_build_runs_a_plugin_precompiled_for_it_and_refuses_a_wasm() {
    let Some(gateway) = Gateway::built("gateway_invoke") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let wasm = plugin("fibonacci");
    let cwasm = precompiled(&wasm, dir.path(), &["--target", AARCH64]);

    let r = gateway.run(&[
        "invoke",
        path(&cwasm),
        "fibonacci_worker",
        r#"{"length":10}"#,
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.trim(), FIBONACCI_10);

    // No compiler: the .wasm is refused, naming the command that makes
    // what it can run; so is `compile`.
    let fix = format!(
        "grenache-host compile {} --target {AARCH64}",
        wasm.display()
    );
    for args in [
        vec![
            "invoke",
            path(&wasm),
            "fibonacci_worker",
            r#"{"length":10}"#,
        ],
        vec![
            "compile",
            path(&wasm),
            "-o",
            path(&dir.path().join("x.cwasm")),
        ],
    ] {
        let r = gateway.run(&args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stdout);
        let line = r.stderr.trim();
        assert!(line.contains("has no compiler"), "{args:?}: {line}");
        assert!(line.contains(&fix), "{args:?}: {line}");
        assert_eq!(line.lines().count(), 1, "{line}");
    }
    assert!(!dir.path().join("x.cwasm").exists());

    // A .cwasm for this (x86) machine is not for the gateway.
    let native = dir.path().join("native");
    std::fs::create_dir(&native).unwrap();
    let x86 = precompiled(&wasm, &native, &[]);
    let r = gateway.run(&["inspect", path(&x86)]);
    assert_eq!(r.code, 2, "{}", r.stdout);
    assert!(
        r.stderr
            .contains("recompile it with `grenache-host compile`"),
        "{}",
        r.stderr
    );
}

#[test]
fn an_x86_host_and_the_aarch64_gateway_call_each_other_on_loopback() {
    let Some(gateway) = Gateway::built("gateway_calls") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cwasm = precompiled(&plugin("fibonacci"), dir.path(), &["--target", AARCH64]);

    // x86 → aarch64, found through a DHT node as on a real network.
    let (_dht, bootstrap) = start_dht();
    let mut args = common::run_args(&cwasm, &bootstrap);
    // Debian 12's qemu-user (7.2) tracks every page of the guest's address
    // space: the default pool's 2 TiB reservation would cost it a minute
    // and 12 GB. A real gateway has no such cost.
    args.extend(["--max-instances", "4"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let served = gateway.spawn("aarch64 host", &args);
    served.wait_for("announced fibonacci_worker", EMULATED);
    let r = call(
        &bootstrap,
        "fibonacci_worker",
        r#"{"length":10}"#,
        &["--timeout-ms", "60000"],
    );
    assert_eq!(
        r.code,
        0,
        "{}\naarch64 host:\n{}",
        r.stderr,
        served.output()
    );
    // Only the aarch64 host serves it on this DHT.
    assert_eq!(r.stdout.trim(), FIBONACCI_10);

    // aarch64 → x86: the gateway's `call` to a given peer.
    let (_x86, port) = spawn_listening(
        "x86 host",
        &[
            "run",
            path(&plugin("fibonacci")),
            "--listen",
            "127.0.0.1:0",
            "--control",
            "off",
        ],
    );
    let peer = format!("127.0.0.1:{port}");
    let r = gateway.run(&[
        "call",
        "fibonacci_worker",
        r#"{"length":10}"#,
        "--peer",
        &peer,
        "--timeout-ms",
        "60000",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.trim(), FIBONACCI_10);
}
