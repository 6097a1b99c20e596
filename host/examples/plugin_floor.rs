//! The plugin floor of `cargo xtask bench`: what one request costs in the
//! plugin runtime alone, with no network. Loads a plugin with the host's own
//! loader ([`Runtime::load`], the default limits) and calls `handle` N times
//! one after another, each in a fresh store and instance as `run` does
//! (store, instantiate, call, drop), then prints one line:
//!
//! ```text
//! plugin-floor calls=20000 p50=21.3us p99=40.2us cpu_per_call=24.1us
//! ```
//!
//! `cpu_per_call` is this process's user + system CPU time (getrusage)
//! over the timed calls, divided by their number.
//!
//! Usage: plugin_floor <plugin.wasm> <service> <payload> [calls]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use grenache_host::plugin::{Limits, NoNetwork, Runtime};

/// Calls made first and not counted (code paths, the pool's warm slots).
const WARMUP: usize = 200;

fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the struct we pass and nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [plugin, service, payload, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: plugin_floor <plugin.wasm> <service> <payload> [calls]");
    };
    let calls: usize = match rest.first() {
        Some(n) => n.parse()?,
        None => 20_000,
    };
    let runtime = Runtime::new(Limits::default())?;
    let plugin = runtime
        .load(&PathBuf::from(plugin), Arc::new(NoNetwork))
        .await?;
    for _ in 0..WARMUP {
        plugin.handle(service, payload).await?;
    }
    let mut latencies = Vec::with_capacity(calls);
    let cpu = cpu_time();
    for _ in 0..calls {
        let started = Instant::now();
        plugin.handle(service, payload).await?;
        latencies.push(started.elapsed());
    }
    let cpu = cpu_time() - cpu;
    latencies.sort();
    let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "plugin-floor calls={calls} p50={:.1}us p99={:.1}us cpu_per_call={:.1}us",
        micros(at(0.5)),
        micros(at(0.99)),
        micros(cpu) / calls as f64
    );
    Ok(())
}
