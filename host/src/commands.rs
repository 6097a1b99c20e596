//! The network subcommands of the CLI: `run`, `dht`, `call` and `bench`.
//! Argument parsing and exit codes are in [`crate::cli`].

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::cli::{
    check_payload, print_compact, usage_error, ClientArgs, ServiceRequest, EXIT_SERVICE_ERROR,
};
use crate::cli::{BootstrapArgs, ControlArgs, IntroducerPort};
use crate::control::ControlRequest;
use crate::discovery::{DhtConfig, Discovery};
use crate::introduction::{IntroducerAddr, DEFAULT_KEEPALIVE};
use crate::node::{ClientParts, IntroOptions, Node, NodeConfig};
use crate::plugin::{Limits, OutboundError, Runtime};
use crate::rpc::client::RpcClient;
use crate::rpc::codec::DEFAULT_MAX_MESSAGE;
use crate::signing::{self, TrustedKey};
use crate::transport::Endpoint;

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// `run`'s options beyond the node's own configuration.
pub struct RunOptions {
    pub trusted_keys: Vec<TrustedKey>,
    pub watch: bool,
    /// `None`: the default path; `Some("off")`: no control socket.
    pub control: Option<String>,
}

/// How often `--watch` looks at the plugin files.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// `grenache-host run`.
pub async fn run(config: NodeConfig, options: RunOptions) -> ExitCode {
    let RunOptions {
        trusted_keys,
        watch,
        control,
    } = options;
    if config.bootstrap.is_empty() {
        tracing::warn!(
            "no --bootstrap given: this host's DHT node is alone and only it can find its services; \
             start a node with `grenache-host dht` and pass --bootstrap <ip:port>"
        );
    }
    // The engine's memory pool must fit the largest limit any plugin gets.
    let mut limits = Limits::default();
    for path in &config.plugins {
        match config
            .policies
            .for_plugin(&crate::plugin::plugin_name(path))
        {
            Ok(policy) => limits.memory_bytes = limits.memory_bytes.max(policy.limits.memory_bytes),
            Err(e) => return usage_error(e),
        }
    }
    let runtime = match Runtime::new(limits) {
        Ok(r) => r.require_signatures(trusted_keys),
        Err(e) => return usage_error(e),
    };
    let node = match Node::start(config, runtime).await {
        Ok(node) => node,
        Err(e) => return usage_error(format!("{e:#}")),
    };
    let control_path = match control.as_deref() {
        Some("off") => None,
        Some(path) => Some((PathBuf::from(path), true)),
        None => Some((crate::control::default_path(), false)),
    };
    let mut bound_control = None;
    if let Some((path, explicit)) = control_path {
        match crate::control::bind(&path) {
            Ok(listener) => {
                tracing::info!("control socket {}", path.display());
                tokio::spawn(crate::control::serve(listener, node.plugins.clone()));
                bound_control = Some(path);
            }
            Err(e) if explicit => return usage_error(format!("{e:#}")),
            Err(e) => tracing::warn!("no control socket: {e:#}"),
        }
    }
    if watch {
        tokio::spawn(node.plugins.clone().watch(WATCH_INTERVAL));
        tracing::info!("watching the plugin files for changes");
    }
    // The same line the Grenache examples print, for scripts to wait on.
    println!("listening on {}", node.endpoint.local_addr().port());
    tracing::info!(
        "RPC socket {}, DHT node {}",
        node.endpoint.local_addr(),
        node.discovery.local_addr().await
    );
    shutdown_signal().await;
    tracing::info!("stopping: {}", node.summary());
    if let Some(path) = bound_control {
        let _ = std::fs::remove_file(path);
    }
    ExitCode::SUCCESS
}

/// `grenache-host swap | rollback | status`: one request on the control socket.
pub async fn control(args: ControlArgs, request: ControlRequest) -> ExitCode {
    let path = args.control.unwrap_or_else(crate::control::default_path);
    let reply = match crate::control::request(&path, &request).await {
        Ok(reply) => reply,
        Err(e) => return usage_error(e),
    };
    if let Some(status) = reply.status {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).expect("status serialises")
        );
    }
    if let Some(message) = reply.message {
        println!("{message}");
    }
    match reply.error {
        Some(error) => {
            eprintln!("error: {error}");
            ExitCode::from(EXIT_SERVICE_ERROR)
        }
        None => ExitCode::SUCCESS,
    }
}

/// `grenache-host keygen`.
pub fn keygen(out: &Path) -> ExitCode {
    let (secret, public) = signing::generate();
    let with_ext = |ext: &str| {
        let mut name = out.as_os_str().to_owned();
        name.push(ext);
        PathBuf::from(name)
    };
    let (secret_path, public_path) = (with_ext(".secret"), with_ext(".pub"));
    for path in [&secret_path, &public_path] {
        if path.exists() {
            return usage_error(format!(
                "{} exists; refusing to overwrite a key (pick another --out)",
                path.display()
            ));
        }
    }
    let write_secret = || -> std::io::Result<()> {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options
            .open(&secret_path)?
            .write_all(format!("{secret}\n").as_bytes())
    };
    if let Err(e) = write_secret().and_then(|_| std::fs::write(&public_path, format!("{public}\n")))
    {
        return usage_error(format!("cannot write the key files: {e}"));
    }
    eprintln!(
        "wrote {} (keep it secret) and {}",
        secret_path.display(),
        public_path.display()
    );
    println!("{public}");
    ExitCode::SUCCESS
}

/// `grenache-host sign`.
pub fn sign(plugin: &Path, key: &Path) -> ExitCode {
    let secret = match std::fs::read_to_string(key) {
        Ok(s) => s,
        Err(e) => return usage_error(format!("cannot read the secret key {}: {e}", key.display())),
    };
    let content = match std::fs::read(plugin) {
        Ok(c) => c,
        Err(e) => return usage_error(format!("cannot read {}: {e}", plugin.display())),
    };
    let signature = match signing::sign(&content, &secret) {
        Ok(s) => s,
        Err(e) => {
            return usage_error(format!(
                "{}: {e}; pass the .secret file `grenache-host keygen` wrote",
                key.display()
            ))
        }
    };
    let path = signing::signature_path(plugin);
    if let Err(e) = std::fs::write(&path, signature) {
        return usage_error(format!("cannot write {}: {e}", path.display()));
    }
    println!("wrote {}", path.display());
    ExitCode::SUCCESS
}

/// `grenache-host dht`; without `introducer_port`, the introducer goes
/// beside the DHT node's port.
pub async fn dht(
    listen: SocketAddrV4,
    bootstrap: Vec<String>,
    introducer_port: Option<IntroducerPort>,
) -> ExitCode {
    let config = DhtConfig {
        listen: Some(listen),
        bootstrap,
        server_mode: true,
    };
    let discovery = match Discovery::start(&config) {
        Ok(d) => d,
        Err(e) => return usage_error(format!("{e}; is another node already listening there?")),
    };
    let dht_addr = discovery.local_addr().await;
    let port = match introducer_port {
        Some(IntroducerPort::Off) => None,
        Some(IntroducerPort::Port(port)) => Some(port),
        None => match IntroducerAddr::beside_dht(dht_addr.into()) {
            Some(beside) => Some(beside.main.port()),
            None => {
                return usage_error(format!(
                    "no room for the introducer beside the DHT port {}; pass --introducer-port",
                    dht_addr.port()
                ))
            }
        },
    };
    if let Some(port) = port {
        match crate::introducer::IntroducerSockets::bind((*listen.ip()).into(), port).await {
            Ok(sockets) => {
                let addr = sockets.local_addr();
                tokio::spawn(sockets.serve());
                println!(
                    "introducer listening on {addr} (probe port {})",
                    addr.port() + 1
                );
            }
            Err(e) => return usage_error(format!("{e:#}")),
        }
    }
    println!("dht listening on {dht_addr}");
    shutdown_signal().await;
    tracing::info!("stopping the DHT node");
    ExitCode::SUCCESS
}

async fn client(dht: &BootstrapArgs, args: &ClientArgs) -> Result<ClientParts, ExitCode> {
    let bootstrap = &dht.bootstrap;
    if bootstrap.is_empty() {
        return Err(usage_error("--bootstrap <ip:port> is required: the address of a DHT node, e.g. one started with `grenache-host dht`"));
    }
    let intro = IntroOptions {
        introducer: dht.introducer().map_err(usage_error)?,
        keepalive: DEFAULT_KEEPALIVE,
    };
    let parts = ClientParts::start(args.listen, bootstrap, DEFAULT_MAX_MESSAGE, &intro, false)
        .await
        .map_err(|e| usage_error(format!("{e:#}")))?;
    // No waiting for the join to finish (it lasts until every node found has
    // answered or timed out): a lookup starts from the bootstrap nodes, and
    // waits for the join only if that finds nothing.
    Ok(parts)
}

/// `grenache-host call`.
pub async fn call(
    ServiceRequest { service, payload }: ServiceRequest,
    dht: BootstrapArgs,
    args: ClientArgs,
    peer: Option<std::net::SocketAddr>,
) -> ExitCode {
    if let Err(code) = check_payload(&payload) {
        return code;
    }
    let timeout = Duration::from_millis(args.timeout_ms);
    let reply = if let Some(peer) = peer {
        let (endpoint, _introductions) = match Endpoint::bind(args.listen).await {
            Ok(e) => e,
            Err(e) => return usage_error(format!("{e:#}")),
        };
        let client = RpcClient::new(endpoint, None, DEFAULT_MAX_MESSAGE);
        client.request_peer(peer, &service, &payload, timeout).await
    } else {
        let parts = match client(&dht, &args).await {
            Ok(p) => p,
            Err(code) => return code,
        };
        parts.client.request(&service, &payload, timeout).await
    };
    match reply {
        Ok(reply) => match print_compact(&reply) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => usage_error(format!("the reply is not JSON: {e}")),
        },
        Err(OutboundError::Remote(message)) => {
            eprintln!("error from {service}: {message}");
            ExitCode::from(EXIT_SERVICE_ERROR)
        }
        Err(e) => usage_error(format!("{service}: {e}")),
    }
}

/// What `bench` sends.
#[derive(Debug, Clone, Copy)]
pub struct BenchPlan {
    pub requests: u64,
    pub concurrency: usize,
    pub warmup: u64,
}

/// `grenache-host bench`.
pub async fn bench(
    ServiceRequest { service, payload }: ServiceRequest,
    dht: BootstrapArgs,
    args: ClientArgs,
    plan: BenchPlan,
) -> ExitCode {
    if let Err(code) = check_payload(&payload) {
        return code;
    }
    if plan.requests == 0 || plan.concurrency == 0 {
        return usage_error("--requests and --concurrency must be at least 1");
    }
    let parts = match client(&dht, &args).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let send_all = |count: u64| {
        let client = parts.client.clone();
        let (service, payload) = (service.clone(), payload.clone());
        futures::stream::iter(0..count)
            .map(move |_| {
                let (client, service, payload) = (client.clone(), service.clone(), payload.clone());
                async move {
                    let started = Instant::now();
                    let result = client.request(&service, &payload, timeout).await;
                    (result, started.elapsed())
                }
            })
            .buffer_unordered(plan.concurrency)
            .collect::<Vec<_>>()
    };
    // Warm-up: connections, lookups and the plugin's code paths.
    let warm = send_all(plan.warmup).await;
    if let Some((Err(e), _)) = warm.iter().find(|(r, _)| r.is_err()) {
        if warm.iter().all(|(r, _)| r.is_err()) {
            return usage_error(format!("{service}: every warm-up request failed: {e}"));
        }
    }
    eprintln!(
        "bench: {} requests to {service}, {} in flight",
        plan.requests, plan.concurrency
    );
    let started = Instant::now();
    let results = send_all(plan.requests).await;
    let elapsed = started.elapsed();

    let mut latencies: Vec<Duration> = Vec::with_capacity(results.len());
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for (result, latency) in results {
        match result {
            Ok(_) => latencies.push(latency),
            Err(e) => *errors.entry(e.to_string()).or_default() += 1,
        }
    }
    latencies.sort();
    let failed: u64 = errors.values().sum();
    let percentile = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies[i].as_secs_f64() * 1e3
    };
    println!(
        "requests ok={} failed={failed} rps={:.0} p50={:.2}ms p90={:.2}ms p99={:.2}ms elapsed={:.2}s",
        latencies.len(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        percentile(0.50),
        percentile(0.90),
        percentile(0.99),
        elapsed.as_secs_f64(),
    );
    for (message, count) in &errors {
        eprintln!("bench: {count} failed: {message}");
    }
    if failed > 0 {
        ExitCode::from(EXIT_SERVICE_ERROR)
    } else {
        ExitCode::SUCCESS
    }
}
