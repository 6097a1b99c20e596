//! Project tasks: `cargo xtask <plugins|test|demo|gateway|fuzz>`.
//!
//! Each task installs what it needs (the wasm32-wasip2 target; as root, the
//! aarch64 cross toolchain and qemu from Debian's packages) so the two README
//! commands work on a fresh machine.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};

mod bench;

const WASM_TARGET: &str = "wasm32-wasip2";
/// Cargo profile for plugins (see the workspace Cargo.toml).
const PLUGIN_PROFILE: &str = "plugin";
/// The gateway the suite emulates: 64-bit ARM Linux (a Raspberry Pi 4/5).
const AARCH64_TARGET: &str = "aarch64-unknown-linux-gnu";
/// Cargo profile for the smallest host (see the workspace Cargo.toml).
const GATEWAY_PROFILE: &str = "gateway";
/// Cargo arguments of the gateway build: grenache-host without the compiler.
const GATEWAY_BUILD: [&str; 4] = [
    "build",
    "--package",
    "grenache-host",
    "--no-default-features",
];
/// Debian's packages that cross-link and emulate aarch64, each with a shell
/// check that it is there.
const AARCH64_TOOLS: [(&str, &str); 3] = [
    ("command -v aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    // The aarch64 libc to link against, and its loader for qemu.
    (
        "test -e /usr/aarch64-linux-gnu/lib/crt1.o",
        "libc6-dev-arm64-cross",
    ),
    ("command -v qemu-aarch64", "qemu-user"),
];

const USAGE: &str = "\
usage: cargo xtask <task> [options]

tasks:
  plugins   build every plugin crate (plugins/*, tests/plugins/*) for wasm32-wasip2;
            writes plugins/<name>.wasm and target/test-plugins/<name>.wasm
  test      build the plugins, then run every test in the workspace;
            arguments after `--` go to `cargo test` (cargo xtask test -- --test cli)
  demo      build the plugins and the host, then run Grenache's classic hole-punching
            example on 127.0.0.1 (a DHT node, a consumer, a worker --behind-nat);
            --keep-running keeps it going until Ctrl-C
  gateway   build the smallest host, without the compiler (it runs .cwasm plugins only),
            with the gateway profile, and print its size; --target TRIPLE cross-compiles
            (aarch64-unknown-linux-gnu: a Raspberry Pi 4/5)
  fuzz      run the fuzz targets (fuzz/: the decoders that face the network) with
            cargo-fuzz, installing it if missing; `fuzz [TARGET] [--seconds N]`, default
            every target for 60 s each; a crash stops it and names the input saved
  bench-discovery
            fresh `call`s after a host restarted (0, 20, 200 stale DHT entries) and through
            500 planted ones: p50/p99 per case; --baseline PATH runs another grenache-host
            binary the same way, taking turns (figures in BENCHMARKS.md)
  bench-sessions
            what encrypted sessions cost: the first request on a new connection, and
            requests/s at 1 and 8 in flight, encrypted and plaintext side by side
  bench     the host against Node Grenache on 127.0.0.1, side by side and interleaved:
            this build's host serving plugins/fibonacci.wasm (release), the Node peer
            (tests/node/peer.js, utp-native, the same envelope), a utp-native echo (the
            transport floor) and store + instantiate + call + drop alone (the plugin floor);
            prints requests/s, p50/p99 at 1, 8, 32 in flight, server CPU per request, a
            size sweep 1 B..1 MiB, start-up, memory, issue 11's goals and the load average;
            --quick: a short pass; --baseline PATH: another grenache-host binary measured
            the same way, taking turns (figures in BENCHMARKS.md)
  help      print this text (so does --help after any task)

`test` also cross-compiles the gateway host for aarch64 and runs it under qemu-aarch64
(tests/gateway.rs); it needs gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user,
installed when run as root, else those tests skip (GRENACHE_REQUIRE_AARCH64=1: fail).
With GRENACHE_FUZZ_SECONDS=N (`.ci/run` sets it), `test` first fuzzes each target N s.";

/// What the command line asks for.
#[derive(Debug, PartialEq)]
enum Task {
    Help,
    Plugins,
    /// `cargo test --workspace` with these extra arguments.
    Test(Vec<String>),
    Demo {
        keep_running: bool,
    },
    /// The gateway build, for this machine or the given target triple.
    Gateway {
        target: Option<String>,
    },
    /// The discovery benchmark, against another binary too if given.
    BenchDiscovery {
        baseline: Option<String>,
    },
    /// The secure-session benchmark.
    BenchSessions,
    /// The comparison with Node Grenache.
    Bench(bench::Options),
    /// Fuzz one target (or every one) for this many seconds each.
    Fuzz {
        target: Option<String>,
        seconds: u64,
    },
}

/// The fuzz targets (fuzz/fuzz_targets/<name>.rs).
const FUZZ_TARGETS: [&str; 5] = [
    "rpc_stream",
    "utp_packet",
    "datagram",
    "krpc_message",
    "grape_body",
];
/// How long `cargo xtask fuzz` runs each target by default.
const FUZZ_SECONDS: u64 = 60;

/// Parses `cargo xtask`'s arguments; an error names what was not understood.
fn parse_args(args: &[String]) -> std::result::Result<Task, String> {
    let Some((task, options)) = args.split_first() else {
        return Err("no task given".into());
    };
    let is_help = |arg: &str| matches!(arg, "-h" | "--help");
    let unknown = |arg: &str| Err(format!("unknown argument {arg:?} for `cargo xtask {task}`"));
    match task.as_str() {
        "help" | "-h" | "--help" => Ok(Task::Help),
        "plugins" => match options.first() {
            None => Ok(Task::Plugins),
            Some(arg) if is_help(arg) => Ok(Task::Help),
            Some(arg) => unknown(arg),
        },
        "test" => match options.split_first() {
            None => Ok(Task::Test(Vec::new())),
            Some((arg, cargo_args)) if arg == "--" => Ok(Task::Test(cargo_args.to_vec())),
            Some((arg, _)) if is_help(arg) => Ok(Task::Help),
            Some((arg, _)) => unknown(arg),
        },
        "demo" => {
            let mut keep_running = false;
            for arg in options {
                match arg.as_str() {
                    "--keep-running" => keep_running = true,
                    arg if is_help(arg) => return Ok(Task::Help),
                    arg => return unknown(arg),
                }
            }
            Ok(Task::Demo { keep_running })
        }
        "gateway" => match options {
            [] => Ok(Task::Gateway { target: None }),
            [flag, triple] if flag == "--target" => Ok(Task::Gateway {
                target: Some(triple.clone()),
            }),
            [arg, ..] if is_help(arg) => Ok(Task::Help),
            [arg, ..] => unknown(arg),
        },
        "bench-discovery" => match options {
            [] => Ok(Task::BenchDiscovery { baseline: None }),
            [flag, path] if flag == "--baseline" => Ok(Task::BenchDiscovery {
                baseline: Some(path.clone()),
            }),
            [arg, ..] if is_help(arg) => Ok(Task::Help),
            [arg, ..] => unknown(arg),
        },
        "bench-sessions" => match options {
            [] => Ok(Task::BenchSessions),
            [arg, ..] if is_help(arg) => Ok(Task::Help),
            [arg, ..] => unknown(arg),
        },
        "bench" => {
            let mut bench = bench::Options {
                quick: false,
                baseline: None,
            };
            let mut options = options.iter();
            while let Some(arg) = options.next() {
                match arg.as_str() {
                    "--quick" => bench.quick = true,
                    "--baseline" => {
                        bench.baseline = Some(
                            options
                                .next()
                                .ok_or("--baseline takes a grenache-host binary, e.g. --baseline /tmp/grenache-host-main")?
                                .clone(),
                        );
                    }
                    arg if is_help(arg) => return Ok(Task::Help),
                    arg => return unknown(arg),
                }
            }
            Ok(Task::Bench(bench))
        }
        "fuzz" => {
            let (mut target, mut seconds) = (None, FUZZ_SECONDS);
            let mut options = options.iter();
            while let Some(arg) = options.next() {
                match arg.as_str() {
                    "--seconds" => {
                        seconds = options
                            .next()
                            .and_then(|n| n.parse().ok())
                            .filter(|n| *n > 0)
                            .ok_or("--seconds takes a number of seconds, e.g. --seconds 600")?;
                    }
                    arg if is_help(arg) => return Ok(Task::Help),
                    name if target.is_none() && FUZZ_TARGETS.contains(&name) => {
                        target = Some(name.to_string());
                    }
                    other => {
                        return Err(format!(
                            "unknown fuzz target or option {other:?}; targets: {}",
                            FUZZ_TARGETS.join(", ")
                        ))
                    }
                }
            }
            Ok(Task::Fuzz { target, seconds })
        }
        other => Err(format!("unknown task {other:?}")),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match parse_args(&args) {
        Ok(Task::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Task::Plugins) => build_plugins().map(|_| ()),
        Ok(Task::Test(cargo_args)) => test(&cargo_args),
        Ok(Task::Demo { keep_running }) => demo(keep_running),
        Ok(Task::Gateway { target }) => gateway(target.as_deref()),
        Ok(Task::Fuzz { target, seconds }) => fuzz(target.as_deref(), seconds),
        Ok(Task::BenchDiscovery { baseline }) => bench_discovery(baseline.as_deref()),
        Ok(Task::BenchSessions) => build_plugins().and_then(|_| {
            ignored_bench(
                &mut cargo(),
                "secure_sessions",
                "bench_secure_sessions_against_plaintext",
            )
        }),
        Ok(Task::Bench(options)) => bench::bench(options),
        Err(e) => {
            eprintln!("xtask: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Installs the standard library for `target` if rustup does not have it yet.
fn ensure_rust_target(target: &str) -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(root())
        .output()
        .context("cannot run rustup; install Rust with rustup (https://rustup.rs)")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == target)
    {
        return Ok(());
    }
    run(Command::new("rustup")
        .args(["target", "add", target])
        .current_dir(root()))
}

/// Crate directories (containing Cargo.toml) directly under `dir`.
fn crates_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut crates = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.join("Cargo.toml").is_file() {
            crates.push(path);
        }
    }
    crates.sort();
    Ok(crates)
}

fn package_name(crate_dir: &Path) -> Result<String> {
    let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml"))?;
    manifest
        .lines()
        .find_map(|l| {
            l.strip_prefix("name = ")
                .map(|v| v.trim_matches('"').to_string())
        })
        .with_context(|| format!("no package name in {}/Cargo.toml", crate_dir.display()))
}

/// Builds every plugin crate and copies the components where users and tests
/// look for them. Returns the written paths.
fn build_plugins() -> Result<Vec<PathBuf>> {
    ensure_rust_target(WASM_TARGET)?;
    let root = root();
    let groups = [
        (root.join("plugins"), root.join("plugins")),
        (root.join("tests/plugins"), root.join("target/test-plugins")),
    ];
    let mut build = cargo();
    build.args([
        "build",
        "--target",
        WASM_TARGET,
        "--profile",
        PLUGIN_PROFILE,
    ]);
    let mut outputs = Vec::new();
    for (source, dest) in &groups {
        for dir in crates_under(source)? {
            let name = package_name(&dir)?;
            build.args(["--package", &name]);
            outputs.push((name, dest.clone()));
        }
    }
    run(&mut build)?;
    let built = root.join("target").join(WASM_TARGET).join(PLUGIN_PROFILE);
    let mut written = Vec::new();
    for (name, dest) in outputs {
        let artifact = built.join(format!("{}.wasm", name.replace('-', "_")));
        std::fs::create_dir_all(&dest)?;
        let out = dest.join(format!("{name}.wasm"));
        std::fs::copy(&artifact, &out)
            .with_context(|| format!("cannot copy {} to {}", artifact.display(), out.display()))?;
        eprintln!(
            "xtask: wrote {} ({} KiB)",
            out.display(),
            std::fs::metadata(&out)?.len() / 1024
        );
        written.push(out);
    }
    Ok(written)
}

/// Installs the npm packages of the Node.js interop peers (tests/node) when
/// any that tests/node/package.json lists is missing or at another version
/// (e.g. after a pull added one), so a fresh clone and an old checkout both
/// end up with exactly what the lockfile pins.
fn ensure_node_packages() -> Result<()> {
    let dir = root().join("tests/node");
    let stale = stale_node_packages(&dir)?;
    if stale.is_empty() {
        return Ok(());
    }
    eprintln!(
        "xtask: npm packages to install in tests/node: {}",
        stale.join(", ")
    );
    run(Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir))
    .context(
        "the Node.js interop tests need Node.js 20 and npm (e.g. `apt-get install -y nodejs npm`)",
    )
}

/// The dependencies of `dir/package.json` that `dir/node_modules` lacks or
/// has at another version, as `name@version`. Versions are exact in that
/// file; an alias `npm:real-name@version` is installed under its own name.
fn stale_node_packages(dir: &Path) -> Result<Vec<String>> {
    let manifest = dir.join("package.json");
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("cannot read {}", manifest.display()))?;
    let manifest: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", dir.join("package.json").display()))?;
    let mut stale = Vec::new();
    let dependencies = manifest["dependencies"].as_object().into_iter().flatten();
    for (name, spec) in dependencies {
        let spec = spec.as_str().unwrap_or_default();
        let wanted = match spec.strip_prefix("npm:") {
            Some(alias) => alias.rsplit_once('@').map_or(alias, |(_, v)| v),
            None => spec,
        };
        let installed =
            std::fs::read_to_string(dir.join("node_modules").join(name).join("package.json"))
                .ok()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                .and_then(|p| p["version"].as_str().map(String::from));
        if installed.as_deref() != Some(wanted) {
            stale.push(format!("{name}@{wanted}"));
        }
    }
    Ok(stale)
}

/// Makes sure each `(shell check, Debian package)` pair's package is there
/// (its check succeeds), installing the missing ones with apt-get as root.
/// Returns whether they all are; without root, says on stderr what
/// `without` then means.
fn ensure_debian_tools(tools: &[(&str, &str)], without: &str) -> Result<bool> {
    let have = |check: &str| {
        Command::new("sh")
            .args(["-c", check])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(check, _)| !have(check))
        .map(|&(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(true);
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if !root {
        eprintln!(
            "xtask: not root and {} missing: {without}",
            missing.join(", ")
        );
        return Ok(false);
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(true)
}

/// The NAT lab tests need root, `ip` and `nft`; as root, install what is
/// missing from Debian's packages. Without root those tests say they skipped.
fn ensure_nat_lab_tools() -> Result<()> {
    ensure_debian_tools(
        &[
            ("command -v ip", "iproute2"),
            ("command -v nft", "nftables"),
            ("command -v conntrack", "conntrack"),
        ],
        "the NAT lab tests will be skipped",
    )
    .map(|_| ())
}

/// Whether GRENACHE_REQUIRE_AARCH64=1 (set by CI): the aarch64 gateway tests
/// must run, not skip.
fn aarch64_required() -> bool {
    std::env::var("GRENACHE_REQUIRE_AARCH64").as_deref() == Ok("1")
}

/// Cross-compiles the gateway host (no compiler) for aarch64 with the dev
/// profile, which builds fastest (dependencies are still optimised), for
/// tests/gateway.rs to run under qemu. Returns its path, or `None` where the
/// cross toolchain cannot be had (not root): those tests then skip.
fn build_aarch64_gateway() -> Result<Option<PathBuf>> {
    if !ensure_debian_tools(&AARCH64_TOOLS, "the aarch64 gateway tests will be skipped")? {
        if aarch64_required() {
            bail!("GRENACHE_REQUIRE_AARCH64=1 but the aarch64 cross toolchain and qemu cannot be installed (not root)");
        }
        return Ok(None);
    }
    ensure_rust_target(AARCH64_TARGET)?;
    let started = std::time::Instant::now();
    run(cargo()
        .args(GATEWAY_BUILD)
        .args(["--target", AARCH64_TARGET]))?;
    eprintln!(
        "xtask: built the aarch64 gateway host in {:.0?}",
        started.elapsed()
    );
    Ok(Some(
        root()
            .join("target")
            .join(AARCH64_TARGET)
            .join("debug/grenache-host"),
    ))
}

/// `cargo xtask gateway`: the gateway build with its size-optimised profile,
/// for this machine or `target`; prints where it is and its size.
fn gateway(target: Option<&str>) -> Result<()> {
    let mut build = cargo();
    build
        .args(GATEWAY_BUILD)
        .args(["--profile", GATEWAY_PROFILE]);
    let mut dir = root().join("target");
    if let Some(target) = target {
        // The cross gcc and libc; qemu is for tests only.
        if target == AARCH64_TARGET
            && !ensure_debian_tools(&AARCH64_TOOLS[..2], "the cross build cannot link")?
        {
            bail!("cross-compiling for {AARCH64_TARGET} needs gcc-aarch64-linux-gnu and libc6-dev-arm64-cross (apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross)");
        }
        ensure_rust_target(target)?;
        build.args(["--target", target]);
        dir.push(target);
    }
    run(&mut build)?;
    let bin = dir.join(GATEWAY_PROFILE).join("grenache-host");
    let size = std::fs::metadata(&bin)
        .with_context(|| format!("cannot read {}", bin.display()))?
        .len();
    println!(
        "{}: {:.1} MiB ({size} bytes, stripped)",
        bin.display(),
        size as f64 / (1 << 20) as f64
    );
    Ok(())
}

/// Runs the discovery benchmark (an ignored test of tests/dht_server.rs,
/// which prints its table), against `baseline` too if given.
fn bench_discovery(baseline: Option<&str>) -> Result<()> {
    build_plugins()?;
    let mut bench = cargo();
    if let Some(path) = baseline {
        let path = std::fs::canonicalize(path)
            .with_context(|| format!("--baseline {path}: no such binary"))?;
        bench.env("GRENACHE_BASELINE_HOST", path);
    }
    ignored_bench(&mut bench, "dht_server", "bench_calls_after_a_restart")
}

/// Runs `bench`, an ignored test of tests/<file>.rs that prints its figures.
fn ignored_bench(cargo: &mut Command, file: &str, bench: &str) -> Result<()> {
    run(cargo.args([
        "test",
        "-p",
        "grenache-host",
        "--test",
        file,
        "--",
        "--ignored",
        "--nocapture",
        bench,
    ]))
}

/// Installs cargo-fuzz if `cargo fuzz` is missing (from crates.io).
fn ensure_cargo_fuzz() -> Result<()> {
    let present = cargo()
        .args(["fuzz", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        eprintln!("xtask: installing cargo-fuzz (once; a few minutes)");
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

/// Runs `target` (or every fuzz target) for `seconds` each. libFuzzer runs
/// on stable Rust without a sanitizer (`-s none`): coverage-guided, and a
/// panic or failed assertion is a crash, saved under fuzz/artifacts.
fn fuzz(target: Option<&str>, seconds: u64) -> Result<()> {
    ensure_cargo_fuzz()?;
    let fuzz_dir = root().join("fuzz");
    let targets: Vec<&str> = match target {
        Some(t) => vec![t],
        None => FUZZ_TARGETS.to_vec(),
    };
    for target in targets {
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        // The corpus it grows first, then the committed seeds (read only).
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let seeds = fuzz_dir.join("seeds").join(target);
        // libFuzzer prints a line per new input: into a log file, of which
        // the summary (or, on a crash, the end) is shown.
        let log_path = fuzz_dir.join("logs").join(format!("{target}.log"));
        std::fs::create_dir_all(fuzz_dir.join("logs"))?;
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot write {}", log_path.display()))?;
        let status = cargo()
            .current_dir(&fuzz_dir)
            .args([
                "fuzz",
                "run",
                "-s",
                "none",
                target,
                corpus.to_str().context("paths are UTF-8")?,
                seeds.to_str().context("paths are UTF-8")?,
                "--",
                &format!("-max_total_time={seconds}"),
                "-max_len=16384",
                "-print_final_stats=1",
            ])
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .context("cannot run cargo fuzz")?;
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        if !status.success() {
            for line in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{line}");
            }
            bail!(
                "fuzz target {target} failed ({status}); the input is saved under fuzz/artifacts/{target}/, the whole log in {}",
                log_path.display()
            );
        }
        for line in lines
            .iter()
            .filter(|l| l.starts_with("Done ") || l.starts_with("stat::number_of_executed_units"))
        {
            eprintln!("xtask: {target}: {line}");
        }
    }
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    if let Some(seconds) = std::env::var("GRENACHE_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        fuzz(None, seconds)?;
    }
    build_plugins()?;
    ensure_node_packages()?;
    ensure_nat_lab_tools()?;
    let mut test = cargo();
    if let Some(gateway) = build_aarch64_gateway()? {
        test.env("GRENACHE_AARCH64_HOST", gateway);
    }
    run(test.args(["test", "--workspace"]).args(extra))
}

/// A child process whose output lines are echoed with a prefix and kept for
/// [`Child::wait_for`].
struct Child {
    name: &'static str,
    process: std::process::Child,
    /// Each line with the time it was read.
    lines: std::sync::Arc<std::sync::Mutex<Vec<(std::time::Instant, String)>>>,
}

impl Child {
    fn spawn(name: &'static str, program: &Path, args: &[&str]) -> Result<Child> {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut process = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let out: Box<dyn std::io::Read + Send> = Box::new(process.stdout.take().unwrap());
        let err: Box<dyn std::io::Read + Send> = Box::new(process.stderr.take().unwrap());
        for reader in [out, err] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(reader)
                    .lines()
                    .map_while(Result::ok)
                {
                    println!("{name:>14} | {line}");
                    lines
                        .lock()
                        .unwrap()
                        .push((std::time::Instant::now(), line));
                }
            });
        }
        Ok(Child {
            name,
            process,
            lines,
        })
    }

    /// Waits for a line containing `needle`; returns it.
    fn wait_for(&self, needle: &str, timeout: std::time::Duration) -> Result<String> {
        self.wait_for_at(needle, timeout).map(|(_, line)| line)
    }

    /// Waits for a line containing `needle`; returns it with the time it
    /// was read.
    fn wait_for_at(
        &self,
        needle: &str,
        timeout: std::time::Duration,
    ) -> Result<(std::time::Instant, String)> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|(_, l)| l.contains(needle))
            {
                return Ok(l.clone());
            }
            if std::time::Instant::now() > deadline {
                bail!("{} did not print {needle:?} within {timeout:?}", self.name);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Stops the process with SIGTERM, as Ctrl-C would, unless it has exited.
    fn stop(&mut self) {
        if matches!(self.process.try_wait(), Ok(None)) {
            let pid = self.process.id() as libc::pid_t;
            // SAFETY: kill has no memory effects; the pid is our unreaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let _ = self.process.wait();
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Set by SIGINT or SIGTERM while the demo keeps running.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_signal: libc::c_int) {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

/// Catches SIGINT and SIGTERM from now on (they set [`STOP_REQUESTED`]):
/// our own handler, whatever we inherited, since a shell starts a background
/// job with SIGINT ignored and by default SIGINT would kill us silently.
/// Called before the demo says it runs until Ctrl-C, so a Ctrl-C that follows
/// that line is always ours to handle.
fn catch_stop_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, request_stop as *const () as libc::sighandler_t) };
    }
}

/// Keeps the demo's processes running until Ctrl-C (or SIGTERM), then stops
/// them: that ends the demo as asked (Ok). A process that exits before that
/// ended it on its own: an error.
fn keep_running_until_stopped(mut children: [Child; 3]) -> Result<()> {
    let stop = |children: &mut [Child; 3]| {
        for child in children.iter_mut() {
            child.stop();
        }
        println!("\n== Stopped: the DHT node and both hosts are down ==");
        Ok(())
    };
    loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if STOP_REQUESTED.load(Ordering::SeqCst) {
            return stop(&mut children);
        }
        let exited = children
            .iter_mut()
            .find_map(|child| match child.process.try_wait() {
                Ok(None) => None,
                Ok(Some(status)) => Some((child.name, status.to_string())),
                Err(e) => Some((child.name, e.to_string())),
            });
        if let Some((name, status)) = exited {
            // Ctrl-C reaches the hosts too (the terminal signals the whole
            // process group), and one may stop before our handler has run.
            std::thread::sleep(std::time::Duration::from_secs(1));
            if STOP_REQUESTED.load(Ordering::SeqCst) {
                return stop(&mut children);
            }
            bail!("the {name} exited on its own ({status}); see its output above");
        }
    }
}

/// A private directory for the demo hosts' control sockets, removed when
/// the demo ends.
struct DemoDir(PathBuf);

impl DemoDir {
    fn create() -> Result<DemoDir> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = std::env::temp_dir().join(format!("grenache-demo-{}", std::process::id()));
        // Left over by an earlier demo that had this process id and was killed.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(DemoDir(dir))
    }

    /// The control socket of the host serving `plugin`.
    fn socket(&self, plugin: &str) -> String {
        let path = self.0.join(format!("{plugin}.sock"));
        path.to_str().expect("paths are UTF-8").to_string()
    }

    /// The state directory (identity, plugin state) of the host serving
    /// `plugin`.
    fn state(&self, plugin: &str) -> String {
        let path = self.0.join(format!("{plugin}-state"));
        path.to_str().expect("paths are UTF-8").to_string()
    }
}

impl Drop for DemoDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The classic example on loopback: a DHT node, a public consumer host and
/// a worker host behind a (pretend) NAT that punches the consumer.
fn demo(keep_running: bool) -> Result<()> {
    build_plugins()?;
    run(cargo().args(["build", "--package", "grenache-host"]))?;
    let root = root();
    let host = root.join("target/debug/grenache-host");
    let secs = std::time::Duration::from_secs;
    // The demo's hosts get control sockets and state directories of their
    // own: the defaults are the user's (their own host may be using them),
    // two hosts on one socket would fight over it, and two hosts sharing
    // one state directory would share one identity.
    let control_dir = DemoDir::create()?;

    println!("\n== 1. A DHT node for the hosts to find each other (grenache-host dht) ==");
    let dht = Child::spawn("dht", &host, &["dht", "--listen", "127.0.0.1:0"])?;
    let line = dht.wait_for("dht listening on ", secs(15))?;
    let bootstrap = line.rsplit(' ').next().unwrap_or_default().to_string();

    println!("\n== 2. The public consumer (fibonacci_consumer) ==");
    // `grenache-host run plugins/<plugin>.wasm` on loopback, joined to the DHT node.
    let run_host = |name: &'static str, plugin: &str, extra: &[&str]| {
        let wasm = root.join("plugins").join(format!("{plugin}.wasm"));
        let wasm = wasm.to_str().expect("paths are UTF-8").to_string();
        let (control, state) = (control_dir.socket(plugin), control_dir.state(plugin));
        let mut args = vec![
            "run",
            &wasm,
            "--listen",
            "127.0.0.1:0",
            "--bootstrap",
            &bootstrap,
            "--control",
            &control,
            "--state-dir",
            &state,
        ];
        args.extend_from_slice(extra);
        Child::spawn(name, &host, &args)
    };
    let consumer = run_host("consumer host", "consumer", &[])?;
    consumer.wait_for("announced fibonacci_consumer", secs(15))?;

    println!(
        "\n== 3. The worker behind NAT (fibonacci_worker --behind-nat) punches the consumer =="
    );
    // One log line per request it serves, as the story shows.
    let worker = run_host(
        "worker host",
        "fibonacci",
        &["--behind-nat", "--log-level", "info,requests=debug"],
    )?;
    consumer.wait_for("punch from", secs(15))?;
    consumer.wait_for(
        "got data reply, sequence is: [1,1,2,3,5,8,13,21,34,55]",
        secs(15),
    )?;
    worker.wait_for("request for fibonacci_worker", secs(15))?;

    if keep_running {
        let status = |plugin| {
            format!(
                "target/debug/grenache-host status --control {}",
                control_dir.socket(plugin)
            )
        };
        catch_stop_signals();
        println!("\n== Running until Ctrl-C ==");
        println!("Each host's plugins: {}", status("consumer"));
        println!("                     {}", status("fibonacci"));
        return keep_running_until_stopped([dht, consumer, worker]);
    }
    println!(
        "\n== The consumer got [1,1,2,3,5,8,13,21,34,55] through the punched path; stopping =="
    );
    for mut child in [worker, consumer, dht] {
        child.stop();
    }
    println!("Done. Run `cargo xtask demo --keep-running` to watch it longer.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_other_versions_of_node_packages_are_found() {
        let dir = std::env::temp_dir().join(format!("xtask-node-{}", std::process::id()));
        let package = |name: &str, version: &str| {
            let at = dir.join("node_modules").join(name);
            std::fs::create_dir_all(&at).unwrap();
            std::fs::write(
                at.join("package.json"),
                format!(r#"{{"version":"{version}"}}"#),
            )
            .unwrap();
        };
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("package.json"),
            r#"{"dependencies":{"a":"1.0.0","b":"2.0.0","c-old":"npm:c@0.7.13","d":"1.0.0"}}"#,
        )
        .unwrap();
        package("a", "1.0.0");
        package("b", "1.9.0");
        package("c-old", "0.7.13");
        let stale = stale_node_packages(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(stale.unwrap(), ["b@2.0.0", "d@1.0.0"]);
    }

    fn parse(args: &[&str]) -> std::result::Result<Task, String> {
        parse_args(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn test_passes_what_follows_the_double_dash_to_cargo_test() {
        assert_eq!(parse(&["test"]), Ok(Task::Test(vec![])));
        assert_eq!(
            parse(&["test", "--", "--test", "cli", "--", "--nocapture"]),
            Ok(Task::Test(
                ["--test", "cli", "--", "--nocapture"]
                    .map(String::from)
                    .to_vec()
            ))
        );
    }

    #[test]
    fn gateway_takes_a_target() {
        assert_eq!(parse(&["gateway"]), Ok(Task::Gateway { target: None }));
        assert_eq!(
            parse(&["gateway", "--target", "aarch64-unknown-linux-gnu"]),
            Ok(Task::Gateway {
                target: Some("aarch64-unknown-linux-gnu".into())
            })
        );
        assert!(parse(&["gateway", "--target"]).is_err());
    }

    #[test]
    fn fuzz_takes_a_target_and_seconds() {
        assert_eq!(
            parse(&["fuzz"]),
            Ok(Task::Fuzz {
                target: None,
                seconds: FUZZ_SECONDS
            })
        );
        assert_eq!(
            parse(&["fuzz", "rpc_stream", "--seconds", "600"]),
            Ok(Task::Fuzz {
                target: Some("rpc_stream".into()),
                seconds: 600
            })
        );
        assert!(parse(&["fuzz", "nope"]).is_err());
        assert!(parse(&["fuzz", "--seconds", "0"]).is_err());
    }

    #[test]
    fn bench_takes_quick_and_a_baseline() {
        assert_eq!(
            parse(&["bench", "--quick", "--baseline", "/tmp/old"]),
            Ok(Task::Bench(bench::Options {
                quick: true,
                baseline: Some("/tmp/old".into())
            }))
        );
        assert!(parse(&["bench", "--baseline"]).is_err());
        assert!(parse(&["bench", "--fast"]).is_err());
    }

    #[test]
    fn demo_takes_keep_running() {
        assert_eq!(
            parse(&["demo"]),
            Ok(Task::Demo {
                keep_running: false
            })
        );
        assert_eq!(
            parse(&["demo", "--keep-running"]),
            Ok(Task::Demo { keep_running: true })
        );
    }

    #[test]
    fn bench_sessions_takes_no_options() {
        assert_eq!(parse(&["bench-sessions"]), Ok(Task::BenchSessions));
        assert!(parse(&["bench-sessions", "--fast"]).is_err());
    }
}
