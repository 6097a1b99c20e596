//! `cargo xtask bench`: the host against Node Grenache, side by side and
//! interleaved, on 127.0.0.1 (issue 11).
//!
//! The stacks, each a server process whose CPU time and memory are read
//! from /proc:
//! - *host*: this build's `grenache-host run plugins/fibonacci.wasm` (release);
//! - *baseline* (with `--baseline PATH`): another grenache-host binary, the
//!   same way, so a change is measured before and after in one run;
//! - *node*: tests/node/peer.js serving the same Grenache envelope over
//!   utp-native, one JSON parse and one stringify per request, as Grenache's
//!   Node server does;
//! - *echo*: a utp-native echo, every chunk written back (the transport floor).
//!
//! The client is always this build's `grenache-host bench --peer` (the
//! echo with `--echo`), with its defaults against our hosts (secure
//! sessions) and `--plaintext` against Node's stack, which has none. A round measures every stack in turn, the order
//! rotating from round to round; the figures are the medians of the rounds.
//! The plugin floor is `plugin_floor` (host/examples): store, instantiate,
//! call, drop with the host's own loader, no network.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{build_plugins, cargo, ensure_node_packages, root, run, Child};

/// What `cargo xtask bench` was asked.
#[derive(Debug, PartialEq)]
pub struct Options {
    /// A short pass: fewer requests and one round.
    pub quick: bool,
    /// Another grenache-host binary to measure the same way.
    pub baseline: Option<String>,
}

/// How much one pass measures.
struct Plan {
    rounds: usize,
    /// Requests per bench run at 1 in flight.
    at_one: u64,
    /// Requests per bench run at 8 and 32 in flight (the CPU figure's run).
    at_many: u64,
    /// Requests per size in the sweep, for sizes up to 16 KB; larger sizes
    /// get fewer.
    sweep: u64,
    /// Calls of the plugin floor per round.
    floor_calls: u64,
    /// Start-ups measured per binary.
    startups: usize,
}

const FULL: Plan = Plan {
    rounds: 3,
    at_one: 3_000,
    at_many: 20_000,
    sweep: 200,
    floor_calls: 20_000,
    startups: 3,
};
const QUICK: Plan = Plan {
    rounds: 1,
    at_one: 1_000,
    at_many: 4_000,
    sweep: 40,
    floor_calls: 3_000,
    startups: 1,
};

/// Request and reply sizes of the sweep, in bytes of payload. The largest
/// leaves room for the envelope in the 1 MiB message cap.
const SWEEP_SIZES: [usize; 12] = [
    1,
    100,
    1_000,
    1_400,
    2_000,
    4_000,
    8_000,
    16_000,
    50_000,
    100_000,
    300_000,
    (1 << 20) - 200,
];

const FIBONACCI: &str = "fibonacci_worker";
const PAYLOAD: &str = r#"{"length":10}"#;
const PAYLOAD_78: &str = r#"{"length":78}"#;
const WARMUP: &str = "200";

/// One bench run's figures.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Server CPU time (user + system) per request, warm-up included.
    cpu_us: f64,
}

/// A server under test.
struct Stack {
    name: String,
    child: Child,
    addr: SocketAddr,
    /// Replies are the requests echoed.
    echo: bool,
    /// One of our hosts (which speak secure sessions by default), not Node.
    host: bool,
    /// Requests it has served (warm-ups included).
    served: u64,
}

impl Stack {
    fn pid(&self) -> u32 {
        self.child.process.id()
    }
}

/// Server CPU time so far (user + system), from /proc/PID/stat.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("malformed /proc stat")?
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 (1-based) of the whole line.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no memory effects.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// Resident memory of `pid`, in bytes (VmRSS).
fn rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The value after `key=` in a bench line, without a unit suffix.
fn field(line: &str, key: &str) -> Result<f64> {
    let value = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .with_context(|| format!("no {key}= in {line:?}"))?;
    Ok(value.trim_end_matches("ms").parse()?)
}

/// Runs this build's `bench` client against `stack`; the server's CPU
/// time is read around it.
fn bench_once(
    client: &Path,
    stack: &mut Stack,
    payload: &str,
    requests: u64,
    in_flight: usize,
) -> Result<Figures> {
    let requests_text = requests.to_string();
    let in_flight_text = in_flight.to_string();
    let peer = stack.addr.to_string();
    let service = if stack.echo { "echo" } else { FIBONACCI };
    let mut args = vec![
        "bench",
        service,
        payload,
        "--peer",
        &peer,
        "--requests",
        &requests_text,
        "--concurrency",
        &in_flight_text,
        "--warmup",
        WARMUP,
        "--timeout-ms",
        "20000",
    ];
    if stack.echo {
        args.push("--echo");
    }
    if !stack.host {
        // Node's stack has no secure sessions: no handshake to offer.
        args.push("--plaintext");
    }
    let cpu_before = cpu_time(stack.pid())?;
    let out = Command::new(client)
        .args(&args)
        .output()
        .with_context(|| format!("cannot run {}", client.display()))?;
    let cpu = cpu_time(stack.pid())? - cpu_before;
    let sent = requests + WARMUP.parse::<u64>().expect("a number");
    stack.served += sent;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("requests "))
        .with_context(|| {
            format!(
                "bench against {} printed no figures: {}",
                stack.name,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    if field(line, "failed")? > 0.0 {
        eprintln!(
            "xtask: {} failed some requests: {line} {}",
            stack.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(Figures {
        rps: field(line, "rps")?,
        p50_ms: field(line, "p50")?,
        p99_ms: field(line, "p99")?,
        cpu_us: cpu.as_secs_f64() * 1e6 / sent as f64,
    })
}

/// `run <plugin>` on 127.0.0.1 (any port), joined to `bootstrap`, no
/// control socket, logging at `level`.
fn run_args<'a>(plugin: &'a str, bootstrap: &'a str, level: &'a str) -> [&'a str; 10] {
    [
        "run",
        plugin,
        "--listen",
        "127.0.0.1:0",
        "--bootstrap",
        bootstrap,
        "--control",
        "off",
        "--log-level",
        level,
    ]
}

/// A host serving `plugin` on 127.0.0.1, joined to `bootstrap`.
fn start_host(name: &'static str, binary: &Path, plugin: &Path, bootstrap: &str) -> Result<Stack> {
    let plugin = plugin.to_str().context("paths are UTF-8")?;
    let child = Child::spawn(name, binary, &run_args(plugin, bootstrap, "warn"))?;
    let line = child.wait_for("listening on ", Duration::from_secs(60))?;
    let port: u16 = line.rsplit(' ').next().unwrap_or_default().parse()?;
    Ok(Stack {
        name: name.into(),
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        echo: plugin.ends_with("faulty.wasm"),
        host: true,
        served: 0,
    })
}

/// tests/node/peer.js in `mode` (`serve` or `echo`).
fn start_node(name: &'static str, mode: &str) -> Result<Stack> {
    let script = root().join("tests/node/peer.js");
    let script = script.to_str().context("paths are UTF-8")?;
    let child = Child::spawn(name, Path::new("node"), &[script, mode, "--quiet", "1"])?;
    let line = child.wait_for("listening on ", Duration::from_secs(30))?;
    let port: u16 = line.rsplit(' ').next().unwrap_or_default().parse()?;
    Ok(Stack {
        name: name.into(),
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        echo: mode == "echo",
        host: false,
        served: 0,
    })
}

/// From starting `run` to its first announce confirmed (its log line) and
/// to the first `call` through the DHT that it answers (calls by the same
/// binary, started one after another from the same moment, each its own
/// process, as a user's; the DHT still names the hosts of earlier rounds,
/// as after a restart).
fn startup(binary: &Path, bootstrap: &str) -> Result<(f64, f64)> {
    let plugin = root().join("plugins/fibonacci.wasm");
    let plugin = plugin.to_str().context("paths are UTF-8")?;
    let started = Instant::now();
    let mut host = Child::spawn("startup host", binary, &run_args(plugin, bootstrap, "info"))?;
    let deadline = started + Duration::from_secs(30);
    let called = loop {
        let out = Command::new(binary)
            .args([
                "call",
                FIBONACCI,
                PAYLOAD,
                "--bootstrap",
                bootstrap,
                "--timeout-ms",
                "2000",
            ])
            .output()?;
        if out.status.success() {
            break started.elapsed();
        }
        if Instant::now() > deadline {
            bail!(
                "no call answered within 30 s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    let (at, _) = host.wait_for_at(&format!("announced {FIBONACCI}"), Duration::from_secs(30))?;
    host.stop();
    Ok((
        (at - started).as_secs_f64() * 1e3,
        called.as_secs_f64() * 1e3,
    ))
}

/// Writes `size` bytes of JSON payload (a string, or `1` for one byte) to a
/// file and returns `@path` for `bench`: large payloads do not fit a
/// command-line argument.
fn payload_file(size: usize) -> Result<String> {
    let dir = root().join("target/tmp");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("bench-payload-{size}.json"));
    let text = if size < 2 {
        "1".to_string()
    } else {
        format!("\"{}\"", "x".repeat(size - 2))
    };
    std::fs::write(&path, text)?;
    Ok(format!("@{}", path.display()))
}

fn format_size(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{:.0} MiB", b as f64 / (1 << 20) as f64),
        b if b >= 1000 => format!("{:.1} KB", b as f64 / 1000.0),
        b => format!("{b} B"),
    }
}

/// A line of the goals table: the figure, the goal, and whether it is met.
fn goal(what: &str, figure: String, goal: &str, met: bool) {
    let mark = if met { "met" } else { "NOT met" };
    println!("  {what:<44} {figure:<28} goal {goal:<12} {mark}");
}

pub fn bench(options: Options) -> Result<()> {
    let plan = if options.quick { &QUICK } else { &FULL };
    let load_before = load_average();
    build_plugins()?;
    ensure_node_packages()?;
    // Two builds: the host exactly as `cargo build --release` makes it (the
    // example's dev-dependencies would change its features), and the floor.
    run(cargo().args(["build", "--release", "--package", "grenache-host"]))?;
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "grenache-host",
        "--example",
        "plugin_floor",
    ]))?;
    let root = root();
    let client = root.join("target/release/grenache-host");
    let floor = root.join("target/release/examples/plugin_floor");
    let fibonacci = root.join("plugins/fibonacci.wasm");
    let echo_plugin = root.join("target/test-plugins/faulty.wasm");
    let baseline = options.baseline.as_ref().map(PathBuf::from);
    if let Some(b) = &baseline {
        if !b.is_file() {
            bail!("--baseline {}: no such file", b.display());
        }
    }
    let binaries: Vec<(&'static str, PathBuf)> = std::iter::once(("host", client.clone()))
        .chain(baseline.clone().map(|b| ("baseline", b)))
        .collect();

    // With its introducer, as users start it: a client looking for one
    // that is not there waits for it before it connects.
    let dht = Child::spawn("dht", &client, &["dht", "--listen", "127.0.0.1:0"])?;
    let line = dht.wait_for("dht listening on ", Duration::from_secs(15))?;
    let bootstrap = line.rsplit(' ').next().unwrap_or_default().to_string();

    // Start-up first, on a quiet machine: binaries taking turns.
    let mut startups: Vec<(Vec<f64>, Vec<f64>)> = vec![Default::default(); binaries.len()];
    for _ in 0..plan.startups {
        for (i, (_, binary)) in binaries.iter().enumerate() {
            let (announced, called) = startup(binary, &bootstrap)?;
            startups[i].0.push(announced);
            startups[i].1.push(called);
        }
    }

    let mut stacks = Vec::new();
    for (name, binary) in &binaries {
        stacks.push(start_host(name, binary, &fibonacci, &bootstrap)?);
    }
    stacks.push(start_node("node", "serve")?);
    let echo_index = stacks.len();
    stacks.push(start_node("echo", "echo")?);
    let hosts = binaries.len();
    let node_index = hosts;

    // Per stack and in-flight count, the figures of each round.
    let in_flights = [1usize, 8, 32];
    let mut runs: Vec<Vec<Vec<Figures>>> = vec![vec![Vec::new(); in_flights.len()]; stacks.len()];
    let mut runs_78: Vec<Vec<Figures>> = vec![Vec::new(); hosts + 1];
    let mut floors: Vec<String> = Vec::new();
    for round in 0..plan.rounds {
        eprintln!("xtask: bench round {} of {}", round + 1, plan.rounds);
        for (c, &in_flight) in in_flights.iter().enumerate() {
            let requests = if in_flight == 1 {
                plan.at_one
            } else {
                plan.at_many
            };
            for k in 0..stacks.len() {
                let s = (k + round) % stacks.len();
                let figures = bench_once(&client, &mut stacks[s], PAYLOAD, requests, in_flight)?;
                runs[s][c].push(figures);
            }
        }
        // {"length":78}: the hosts and the Node peer (the echo would send
        // back the request, not a 78-term reply).
        for k in 0..=hosts {
            let s = (k + round) % (hosts + 1);
            let figures = bench_once(&client, &mut stacks[s], PAYLOAD_78, plan.at_many, 8)?;
            runs_78[s].push(figures);
        }
        let out = Command::new(&floor)
            .args([
                fibonacci.to_str().context("paths are UTF-8")?,
                FIBONACCI,
                PAYLOAD,
                &plan.floor_calls.to_string(),
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "plugin_floor failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        floors.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let rss_after: Vec<(u64, u64)> = stacks
        .iter()
        .map(|s| Ok((rss(s.pid())?, s.served)))
        .collect::<Result<_>>()?;

    // The size sweep: hosts serving the `faulty` test plugin's `echo`
    // (the reply is the request), and the utp-native echo.
    let mut sweepers = Vec::new();
    for (name, binary) in &binaries {
        let name: &'static str = if *name == "host" {
            "host echo"
        } else {
            "baseline echo"
        };
        sweepers.push(start_host(name, binary, &echo_plugin, &bootstrap)?);
    }
    let mut sweep: Vec<Vec<f64>> = vec![Vec::new(); SWEEP_SIZES.len()];
    for (i, &size) in SWEEP_SIZES.iter().enumerate() {
        let payload = payload_file(size)?;
        let requests = match size {
            s if s <= 16_000 => plan.sweep,
            s if s <= 100_000 => (plan.sweep / 2).max(10),
            _ => (plan.sweep / 8).max(5),
        };
        let mut order: Vec<&mut Stack> = sweepers.iter_mut().collect();
        order.push(&mut stacks[echo_index]);
        for stack in order {
            let figures = bench_once(&client, stack, &payload, requests, 1)?;
            sweep[i].push(figures.p50_ms);
        }
    }
    drop(sweepers);
    drop(stacks);
    drop(dht);
    let load_after = load_average();

    // The report.
    let stack_names: Vec<String> = binaries
        .iter()
        .map(|(n, _)| n.to_string())
        .chain(["node".into(), "echo".into()])
        .collect();
    let med = |values: &[Figures], f: fn(&Figures) -> f64| {
        median(&mut values.iter().map(f).collect::<Vec<_>>())
    };
    println!();
    println!(
        "== cargo xtask bench{}: medians of {} round(s), load average {load_before} before, {load_after} after ==",
        if options.quick { " --quick" } else { "" },
        plan.rounds
    );
    println!(
        "host: {}; node: tests/node/peer.js serve (utp-native); echo: utp-native echo; client: grenache-host bench --peer",
        client.display()
    );
    if let Some(b) = &baseline {
        println!("baseline: {}", b.display());
    }
    // One stack's medians: requests/s, p50, p99, server CPU per request.
    let row = |r: &[Figures]| {
        format!(
            "{:>8.0}/s  p50 {:>6.3}  p99 {:>7.3}  cpu {:>6.1}",
            med(r, |f| f.rps),
            med(r, |f| f.p50_ms),
            med(r, |f| f.p99_ms),
            med(r, |f| f.cpu_us),
        )
    };
    println!("\n{{\"length\":10}}, requests/s, p50 and p99 (ms), server CPU per request (us):");
    for (c, in_flight) in in_flights.iter().enumerate() {
        for (s, name) in stack_names.iter().enumerate() {
            println!("  {in_flight:>2} in flight  {name:<9} {}", row(&runs[s][c]));
        }
    }
    println!("\n{{\"length\":78}}, 8 in flight:");
    for (s, name) in stack_names.iter().take(hosts + 1).enumerate() {
        println!("  {name:<9} {}", row(&runs_78[s]));
    }
    println!("\nround trip p50 (ms) by request = reply size, 1 in flight (hosts serve `echo` of target/test-plugins/faulty.wasm):");
    let sweep_names: Vec<&str> = binaries.iter().map(|(n, _)| *n).chain(["echo"]).collect();
    println!(
        "  {:>10}  {}",
        "size",
        sweep_names
            .iter()
            .map(|n| format!("{n:>9}"))
            .collect::<String>()
    );
    for (i, &size) in SWEEP_SIZES.iter().enumerate() {
        println!(
            "  {:>10}  {}",
            format_size(size),
            sweep[i]
                .iter()
                .map(|p| format!("{p:>9.3}"))
                .collect::<String>()
        );
    }
    println!("\nstart-up (ms), medians of {}:", plan.startups);
    for (i, (name, _)) in binaries.iter().enumerate() {
        println!(
            "  {name:<9} to first announce confirmed {:>7.0}   to first answered call {:>7.0}",
            median(&mut startups[i].0),
            median(&mut startups[i].1)
        );
    }
    println!("\nresident memory after the load runs:");
    for (s, name) in stack_names.iter().enumerate() {
        let (bytes, served) = rss_after[s];
        println!(
            "  {name:<9} {:>6.1} MB after {served} requests",
            bytes as f64 / 1e6
        );
    }
    println!(
        "\nplugin floor (plugin_floor: store + instantiate + call + drop, the host's loader):"
    );
    for f in &floors {
        println!("  {f}");
    }

    // The goals of issue 11, for this build's host.
    let at = |s: usize, c: usize, f: fn(&Figures) -> f64| med(&runs[s][c], f);
    let host_cpu = at(0, 1, |f| f.cpu_us);
    let node_cpu = at(node_index, 1, |f| f.cpu_us);
    let p50_ratio = at(0, 0, |f| f.p50_ms) / at(echo_index, 0, |f| f.p50_ms);
    let rps8_ratio = at(0, 1, |f| f.rps) / at(node_index, 1, |f| f.rps);
    let rps32 = at(0, 2, |f| f.rps);
    let rps78 = med(&runs_78[0], |f| f.rps);
    let rps78_ratio = rps78 / med(&runs_78[node_index], |f| f.rps);
    let sweep_at = |size: usize| {
        SWEEP_SIZES
            .iter()
            .position(|&s| s == size)
            .map_or(f64::NAN, |i| sweep[i][0])
    };
    let (announced, called) = (median(&mut startups[0].0), median(&mut startups[0].1));
    let rss_mb = rss_after[0].0 as f64 / 1e6;
    let rss_ratio = rss_after[0].0 as f64 / rss_after[node_index].0 as f64;
    println!("\nissue 11's goals (this build's host; ratios against node or echo):");
    goal(
        "server CPU per request, 8 in flight",
        format!(
            "{host_cpu:.1} us (node {node_cpu:.1}, x{:.2})",
            host_cpu / node_cpu
        ),
        "<= 15 us",
        host_cpu <= 15.0,
    );
    goal(
        "p50 at 1 in flight / echo's",
        format!("x{p50_ratio:.2}"),
        "<= x1.3",
        p50_ratio <= 1.3,
    );
    goal(
        "requests/s at 8 in flight / node's",
        format!("x{rps8_ratio:.2}"),
        ">= x2",
        rps8_ratio >= 2.0,
    );
    goal(
        "requests/s at 32 in flight",
        format!(
            "{rps32:.0}/s (x{:.2} node)",
            rps32 / at(node_index, 2, |f| f.rps)
        ),
        ">= 9000/s",
        rps32 >= 9000.0,
    );
    goal(
        "{\"length\":78} at 8 in flight",
        format!("{rps78:.0}/s (x{rps78_ratio:.2} node)"),
        ">= 8000/s",
        rps78 >= 8000.0,
    );
    let p50_50k = sweep_at(50_000);
    goal(
        "50 KB round trip p50",
        format!("{p50_50k:.2} ms"),
        "<= 2 ms",
        p50_50k <= 2.0,
    );
    let p50_1m = sweep_at((1 << 20) - 200);
    goal(
        "1 MiB round trip p50",
        format!("{p50_1m:.2} ms"),
        "<= 30 ms",
        p50_1m <= 30.0,
    );
    goal(
        "start -> first announce confirmed",
        format!("{announced:.0} ms"),
        "<= 300 ms",
        announced <= 300.0,
    );
    goal(
        "start -> first answered call",
        format!("{called:.0} ms"),
        "<= 400 ms",
        called <= 400.0,
    );
    goal(
        &format!("RSS after {} requests", rss_after[0].1),
        format!("{rss_mb:.1} MB (x{rss_ratio:.2} node)"),
        "<= 40 MB",
        rss_mb <= 40.0,
    );
    if options.quick {
        println!("  (--quick: fewer requests than the goals ask, one round; run without it for the record)");
    }
    Ok(())
}
