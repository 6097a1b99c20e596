//! The serving commands: `run` (a host serving plugins) and `dht` (a public
//! DHT node with an introducer beside it). Both run until Ctrl-C or SIGTERM;
//! `run` then drains (see [`Node::shutdown`]), and a second signal stops it
//! at once. Under systemd (`Type=notify`), `run` says READY=1 once it serves
//! and has announced, and STOPPING=1 when it starts draining.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::output::{print_line, usage_error};
use crate::discovery::server::{DhtServer, ServerConfig};
use crate::discovery::DiscoveryConfig;
use crate::nat::IntroducerAddr;
use crate::node::control::BindError;
use crate::node::identity::{Identity, IdentityError};
use crate::node::{Node, NodeConfig};
use crate::plugin::policy::Limits;
use crate::plugin::signing::TrustedKey;
use crate::plugin::Runtime;

/// Ctrl-C (SIGINT) and SIGTERM, caught from the moment this is made: a
/// long-running command makes it first thing, so a signal during start-up
/// stops it cleanly instead of killing it with the default action.
pub(super) struct Signals {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    /// Starts catching both signals.
    pub(super) fn catch() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let streams = signal(SignalKind::interrupt())
                .and_then(|int| Ok((int, signal(SignalKind::terminate())?)))
                .ok();
            Signals { streams }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// Resolves at the next signal (or one caught since the last call), with
    /// its number (`SIGINT`, 2, or `SIGTERM`, 15).
    pub(super) async fn next(&mut self) -> i32 {
        #[cfg(unix)]
        if let Some((int, term)) = self.streams.as_mut() {
            return tokio::select! {
                _ = int.recv() => libc::SIGINT,
                _ = term.recv() => libc::SIGTERM,
            };
        }
        let _ = tokio::signal::ctrl_c().await;
        2
    }
}

/// Tells the service manager (systemd, `Type=notify`) how the host is
/// doing; nothing happens when `NOTIFY_SOCKET` is unset.
fn notify_service_manager(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("cannot notify the service manager through NOTIFY_SOCKET: {e}");
    }
}

/// `run`'s options beyond the node's own configuration.
pub struct RunOptions {
    /// When not empty, only plugins signed by one of these keys load.
    pub trusted_keys: Vec<TrustedKey>,
    /// Swap a plugin in when its file changes.
    pub watch: bool,
    pub control: ControlSocket,
    /// Where to serve Prometheus metrics; `None`: nowhere. A failure to
    /// bind stops the host.
    pub metrics: Option<std::net::SocketAddr>,
    /// Where plugins keep their state; `None`: nowhere (no default found).
    pub state_dir: Option<PathBuf>,
    /// Plugin instances alive at once across all plugins (the engine's pool).
    pub max_instances: u32,
}

/// The host's identity: `--identity FILE`, else `identity.key` in the
/// state directory, created if missing (see [`Identity`]); without either,
/// a new one for this run only, with a warning. An unusable file stops the
/// host (exit 2) with what to do.
pub fn load_identity(
    explicit: Option<&std::path::Path>,
    state_dir: Option<&std::path::Path>,
) -> Result<Identity, ExitCode> {
    let for_this_run = |why: &str| {
        tracing::warn!(
            "{why}: the host uses a new identity for this run only; pass --identity FILE or --state-dir DIR to keep one"
        );
        Identity::from_key(ed25519_dalek::SigningKey::from_bytes(&rand::random()))
    };
    if let Some(path) = explicit.filter(|path| !path.exists()) {
        return Err(usage_error(format!(
            "--identity {}: no such file; make one with `grenache-host id --identity {}` (or `grenache-host keygen --out NAME`, then pass NAME.secret), or leave --identity out to keep identity.key in the state directory",
            path.display(),
            path.display()
        )));
    }
    let Some(path) = Identity::path(explicit, state_dir) else {
        return Ok(for_this_run("no state directory"));
    };
    match Identity::load_or_create(&path) {
        Ok((identity, created)) => {
            if created {
                tracing::info!("created the host's identity in {}", path.display());
            }
            Ok(identity)
        }
        // The default place cannot be written (a read-only home, say):
        // serving matters more than a lasting identity.
        Err(e @ IdentityError::Unusable { .. }) if explicit.is_none() && !path.exists() => Ok(
            for_this_run(&format!("cannot keep the host's identity: {e}")),
        ),
        Err(e) => Err(usage_error(format!("cannot use the host's identity: {e}"))),
    }
}

/// Where `run` serves its control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlSocket {
    /// [`crate::node::control::default_path`]; a failure to bind is a
    /// warning, except an unsafe path ([`BindError::Unsafe`]).
    Default,
    /// This path; a failure to bind stops the host.
    At(PathBuf),
    /// No control socket.
    Off,
}

/// How often `--watch` looks at the plugin files.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// `grenache-host run`: serves until Ctrl-C or SIGTERM, then stops every
/// task of the node.
///
/// Logs the host's identity (its public key) first.
pub async fn run(config: NodeConfig, options: RunOptions) -> ExitCode {
    let mut signals = Signals::catch();
    tracing::info!("identity {}", config.identity.public_hex());
    let RunOptions {
        trusted_keys,
        watch,
        control,
        metrics,
        state_dir,
        max_instances,
    } = options;
    match &config.discovery {
        DiscoveryConfig::Dht { bootstrap } if bootstrap.is_empty() => tracing::warn!(
            "no --bootstrap given: this host's DHT node is alone and only it can find its services; \
             start a node with `grenache-host dht` and pass --bootstrap <ip:port>, \
             or join Grenache's Grapes with --grape <url>"
        ),
        DiscoveryConfig::Grapes(_) if config.nat.introducer.is_none() => tracing::info!(
            "no introducer: with --grape there is no bootstrap node to find one beside, so peers \
             behind other NATs are reached only by punching; pass --introducer <ip:port> \
             (a `grenache-host dht` node's or `grenache-host grape`'s DHT port + 1) to use one"
        ),
        _ => {}
    }
    if let Some(introducer) = config.nat.introducer {
        tracing::info!("introducer {}", introducer.main);
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
    let mut runtime = match Runtime::with_max_instances(limits, max_instances) {
        Ok(r) => r.require_signatures(trusted_keys),
        Err(e) => return usage_error(e),
    };
    match state_dir {
        // Each plugin's state file is logged when it is opened (see
        // PluginSet::load): nothing is created for plugins without state.
        Some(dir) => runtime = runtime.with_state_dir(dir),
        None => tracing::warn!(
            "no state directory (no --state-dir, $STATE_DIRECTORY, $XDG_STATE_HOME or $HOME): plugins' state calls fail as unavailable"
        ),
    }
    let mut node = match Node::start(config, runtime).await {
        Ok(node) => node,
        Err(e) => return usage_error(format!("{e:#}")),
    };
    let control_path = match control {
        ControlSocket::Off => None,
        ControlSocket::At(path) => Some((path, true)),
        ControlSocket::Default => match crate::node::control::default_path() {
            Some(path) => Some((path, false)),
            None => {
                tracing::warn!("no control socket: no $XDG_RUNTIME_DIR or $HOME to put it in; pass --control <path>");
                None
            }
        },
    };
    if let Some((path, explicit)) = control_path {
        match node.serve_control(&path) {
            Ok(()) => tracing::info!("control socket {}", path.display()),
            // An unsafe path is an error even by default: the operator's
            // swaps could go to another user's socket.
            Err(e @ BindError::Unsafe(_)) => return usage_error(e.to_string()),
            Err(e) if explicit => return usage_error(e.to_string()),
            Err(e) => tracing::warn!("no control socket: {e}"),
        }
    }
    if let Some(addr) = metrics {
        match node.serve_metrics(addr).await {
            Ok(bound) => tracing::info!("metrics on http://{bound}/metrics"),
            Err(e) => return usage_error(format!("{e:#}")),
        }
    }
    if watch {
        node.watch(WATCH_INTERVAL);
        tracing::info!("watching the plugin files for changes");
    }
    // The same line the Grenache examples print, for scripts to wait on.
    print_line(format_args!(
        "listening on {}",
        node.endpoint.local_addr().port()
    ));
    tracing::info!(
        "RPC socket {}, {}",
        node.endpoint.local_addr(),
        node.discovery.describe().await
    );
    // Ready once the plugins are loaded, the socket bound and the services
    // announced (or their announces failed and are being retried: a
    // directory that is down must not keep the host from serving).
    let ready = tokio::select! {
        round = node.first_announce() => round,
        _ = signals.next() => return stop(node, signals).await,
    };
    let status = match ready {
        Some(round) if round.failed > 0 => format!(
            "serving on port {}; {} of {} announces failed, retrying",
            node.endpoint.local_addr().port(),
            round.failed,
            round.failed + round.announced
        ),
        _ => format!("serving on port {}", node.endpoint.local_addr().port()),
    };
    notify_service_manager(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]);
    signals.next().await;
    stop(node, signals).await
}

/// Drains and stops `node`; exits 0. A second Ctrl-C or SIGTERM stops it at
/// once, dropping the requests in flight, and exits 128 + the signal's
/// number (130 for Ctrl-C, 143 for SIGTERM), as a shell reports a process
/// killed by it.
async fn stop(node: Node, mut signals: Signals) -> ExitCode {
    notify_service_manager(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("draining"),
    ]);
    tracing::info!("stopping: {}", node.summary());
    let limit = node.longest_time_limit() + crate::node::DRAIN_GRACE;
    tokio::select! {
        () = node.shutdown(limit) => ExitCode::SUCCESS,
        signal = signals.next() => {
            tracing::warn!("second signal: stopping without draining; requests in flight are dropped");
            ExitCode::from(128 + signal as u8)
        }
    }
}

/// How long after start a grape or `dht` node warns that none of its
/// bootstrap nodes answered.
pub const BOOTSTRAP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Where `dht` runs its introducer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntroducerPort {
    /// No introducer.
    Off,
    /// On this port and the next.
    Port(u16),
}

/// How to run `dht`.
#[derive(Debug, Clone)]
pub struct DhtNodeConfig {
    /// The DHT node's address.
    pub listen: SocketAddrV4,
    /// Other DHT nodes to join; empty: start a new DHT.
    pub bootstrap: Vec<String>,
    /// `None`: the introducer goes beside the DHT node's port.
    pub introducer_port: Option<IntroducerPort>,
    /// How long announced peers are kept after their last announce.
    pub peer_ttl: Duration,
    /// The introducer's relay quotas.
    pub relay: crate::nat::relay::RelayLimits,
    /// Where to serve the relay's metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
}

/// `grenache-host dht`: our BEP 5 server node ([`crate::discovery::server`])
/// and, unless turned off, an introducer beside it. Logs what the node did
/// on exit.
pub async fn dht(config: DhtNodeConfig) -> ExitCode {
    let mut signals = Signals::catch();
    let DhtNodeConfig {
        listen,
        bootstrap,
        introducer_port,
        peer_ttl,
        relay,
        metrics,
    } = config;
    let config = ServerConfig {
        listen,
        bootstrap: bootstrap.clone(),
        peer_ttl,
    };
    let server = match DhtServer::start(config).await {
        Ok(s) => s,
        Err(e @ crate::discovery::DiscoveryError::Bootstrap(_)) => {
            return usage_error(format!("--bootstrap: {e}"))
        }
        Err(e) => return usage_error(format!("{e}; is another node already listening there?")),
    };
    let dht_addr = server.local_addr();
    server.warn_if_alone(&bootstrap, "--bootstrap", BOOTSTRAP_WAIT);
    let introducer =
        match start_introducer((*listen.ip()).into(), dht_addr, introducer_port, relay).await {
            Ok(task) => task,
            Err(code) => return code,
        };
    let metrics = match serve_relay_metrics(metrics, introducer.as_ref()).await {
        Ok(task) => task,
        Err(code) => return code,
    };
    print_line(format_args!("dht listening on {dht_addr}"));
    signals.next().await;
    tracing::info!("stopping the DHT node: {}", server.counters().summary());
    if let Some((task, relay)) = introducer {
        task.abort();
        log_relay(&relay);
    }
    if let Some(task) = metrics {
        task.abort();
    }
    ExitCode::SUCCESS
}

/// Serves the relay's metrics at `addr` (`dht`/`grape --metrics`) and logs
/// where; `Ok(None)` without `--metrics`.
pub(super) async fn serve_relay_metrics(
    addr: Option<SocketAddr>,
    introducer: Option<&(tokio::task::JoinHandle<()>, RelayCounters)>,
) -> Result<Option<tokio::task::JoinHandle<()>>, ExitCode> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let Some((_, relay)) = introducer else {
        return Err(usage_error(
            "--metrics serves the relay's counters, and --introducer-port off runs no introducer (nor relay); leave one of them out",
        ));
    };
    let listener = crate::node::metrics::bind(addr)
        .await
        .map_err(|e| usage_error(format!("{e:#}")))?;
    let bound = listener.local_addr().unwrap_or(addr);
    let registry =
        crate::node::metrics::relay_registry(crate::node::metrics::RelayCollector(relay.clone()));
    tracing::info!("metrics on http://{bound}/metrics");
    Ok(Some(tokio::spawn(crate::node::metrics::serve(
        listener, registry,
    ))))
}

/// The relay's counters and where they live while it runs.
pub(super) type RelayCounters = std::sync::Arc<std::sync::Mutex<crate::nat::relay::RelayStats>>;

/// Logs what the relay did, on exit.
pub(super) fn log_relay(relay: &RelayCounters) {
    let stats = *relay.lock().unwrap_or_else(|p| p.into_inner());
    tracing::info!("relay: {}", stats.summary());
}

/// Starts the introducer on `ip` at `port`, or beside the DHT node at
/// `dht_addr` (its port + 1 and + 2) when `port` is `None`, and prints where
/// it listens; `Ok(None)` when turned off.
pub(super) async fn start_introducer(
    ip: std::net::IpAddr,
    dht_addr: SocketAddrV4,
    port: Option<IntroducerPort>,
    relay: crate::nat::relay::RelayLimits,
) -> Result<Option<(tokio::task::JoinHandle<()>, RelayCounters)>, ExitCode> {
    let port = match port {
        Some(IntroducerPort::Off) => return Ok(None),
        Some(IntroducerPort::Port(port)) => port,
        None => match IntroducerAddr::beside_dht(dht_addr.into()) {
            Some(beside) => beside.main.port(),
            None => {
                return Err(usage_error(format!(
                    "no room for the introducer beside the DHT port {}; pass --introducer-port",
                    dht_addr.port()
                )))
            }
        },
    };
    let sockets = crate::nat::IntroducerSockets::bind(ip, port)
        .await
        .map_err(|e| usage_error(format!("{e:#}")))?;
    let addr = sockets.local_addr();
    print_line(format_args!(
        "introducer listening on {addr} (probe port {})",
        addr.port() + 1
    ));
    let counters = RelayCounters::default();
    let task = tokio::spawn(sockets.serve(relay, counters.clone()));
    Ok(Some((task, counters)))
}
