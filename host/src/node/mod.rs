//! A running host: the parts wired together for `grenache-host run`.
//!
//! [`Node::start`] binds the RPC socket, starts discovery (the DHT node or
//! the Grape link), loads the plugins (their outgoing calls go through this node's RPC client), serves
//! requests, ticks the plugins that ask for it, announces every service and re-announces it, and runs the punch
//! driver ([`crate::nat::punch_driver`]), telling the plugins who punched.
//! The node owns every task it starts: [`Node::shutdown`] stops them
//! gracefully (it stops announcing, lets the requests in flight finish up to
//! their plugins' time limit, answers the rest with `ERR_SHUTTING_DOWN`),
//! dropping the node stops them at once.
//!
//! - `network`: plugins' outgoing calls, carried by the node's RPC client.
//! - [`control`]: the local control socket behind `swap`, `rollback`, `status`.
//! - [`metrics`]: the Prometheus endpoint of `run --metrics`.

pub mod control;
pub mod identity;
pub mod metrics;
mod network;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::task::JoinSet;

use crate::discovery::{Discovery, DiscoveryConfig, REANNOUNCE_INTERVAL};
use crate::nat::{
    punch_driver, HostIntroductions, IntroductionStats, NatConfig, PunchState,
    DEFAULT_PUNCH_INTERVAL,
};
use crate::plugin::set::{PluginSet, Route};
use crate::plugin::{CallError, PluginNetwork, RequestContext, Runtime};
use crate::rpc::client::{PathStats, RpcClient};
use crate::rpc::server::{self, Drain, Phase, ServerStats, Services};
use crate::rpc::session::{SessionKeys, SessionStats};
use crate::transport::Endpoint;
use metrics::{NodeMetrics, Outcome};

/// How to run a host.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Plugin files; each serves the services in its manifest.
    pub plugins: Vec<PathBuf>,
    /// The RPC socket's address (port 0: any free port).
    pub listen: SocketAddr,
    /// Where services are announced and looked up: the embedded DHT or
    /// Grapes.
    pub discovery: DiscoveryConfig,
    /// Largest RPC message accepted or sent, in bytes.
    pub max_message: usize,
    /// How the host takes part in NAT traversal: its introducer, and whether
    /// it serves behind a NAT (then it punches its plugins' targets and
    /// registers with the introducer).
    pub nat: NatConfig,
    /// Per-plugin policy (`--config` and command-line overrides).
    pub policies: Arc<crate::plugin::policy::Policies>,
    /// The host's long-lived key pair ([`identity`]).
    pub identity: Arc<identity::Identity>,
}

/// The client side shared by `run`, `call` and `bench`: the socket,
/// discovery (a DHT node or a Grape link), the introductions and the RPC
/// client. Dropping it stops its introduction driver.
pub struct ClientParts {
    /// The host's one UDP socket.
    pub endpoint: Endpoint,
    /// Where services are announced and looked up.
    pub discovery: Arc<dyn Discovery>,
    pub client: RpcClient,
    /// The introduction driver.
    tasks: JoinSet<()>,
}

impl ClientParts {
    /// Binds the socket at `listen`, starts discovery (a DHT node binds the
    /// same IP), and starts introductions as `nat` says (a host behind a NAT
    /// registers with the introducer so that callers can be introduced to
    /// it, under `identity` if given, else a key made for this run). With
    /// `keys`, the RPC client runs secure sessions toward our hosts (see
    /// [`crate::rpc::session`]).
    pub async fn start(
        listen: SocketAddr,
        discovery: &DiscoveryConfig,
        max_message: usize,
        nat: &NatConfig,
        identity: Option<&identity::Identity>,
        keys: Option<Arc<SessionKeys>>,
    ) -> anyhow::Result<Self> {
        let (endpoint, introductions) = Endpoint::bind(listen).await?;
        let dht_ip = match listen.ip() {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
        };
        let discovery = discovery.start(dht_ip)?;
        let mut state = HostIntroductions::new(Instant::now(), nat, endpoint.local_addr().port());
        if let Some(identity) = identity {
            state = state.with_identity(identity.signing_key().clone());
        }
        let mut tasks = JoinSet::new();
        let handle =
            crate::nat::host_driver::spawn(endpoint.clone(), introductions, state, &mut tasks);
        let mut client = RpcClient::new(endpoint.clone(), Some(discovery.clone()), max_message)
            .with_introductions(handle);
        if let Some(keys) = keys {
            client = client.with_session_keys(keys);
        }
        Ok(ClientParts {
            endpoint,
            discovery,
            client,
            tasks,
        })
    }
}

/// Requests routed to the plugins, the first loaded answering `ip:port`
/// keys (what a Node punch client sends when it calls a punched address).
struct PluginServices {
    plugins: Arc<PluginSet>,
    metrics: Arc<NodeMetrics>,
}

impl Services for PluginServices {
    fn requires_encryption(&self, key: &str) -> bool {
        self.plugins.requires_encryption(key)
    }

    fn answer<'a>(
        &'a self,
        key: &'a str,
        payload: &'a str,
        peer: SocketAddr,
    ) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let started = Instant::now();
            let Some(Route {
                service,
                plugin,
                stats,
            }) = self.plugins.route(key)
            else {
                // Never the key itself as a label: peers choose it.
                self.metrics
                    .request(None, Outcome::NotFound, started.elapsed());
                return Err(format!(
                    "ERR_SERVICE_NOT_FOUND: no service {key:?} on this host (it serves: {})",
                    self.plugins.service_names().join(", ")
                ));
            };
            // Debug, not info: a loaded host serves thousands a second. Its
            // own target, so `--log-level info,requests=debug` shows them
            // without every other debug line.
            tracing::debug!(target: "requests", "request for {service} from {peer}");
            // The plugin sees the address we observed: a broker records it to
            // call the peer back through the path this request opened.
            let context = RequestContext::from_caller(peer);
            let reply = plugin.handle_with(&service, payload, &context).await;
            let outcome = match &reply {
                Ok(_) => Outcome::Ok,
                Err(CallError::Handler(_)) => Outcome::Error,
                Err(_) => Outcome::Failed,
            };
            self.metrics
                .request(Some(&service), outcome, started.elapsed());
            reply.map_err(|e| {
                if outcome == Outcome::Failed {
                    stats.record_fault(e.to_string());
                    self.metrics.plugin_failed(plugin.name(), &e);
                    tracing::warn!(%peer, %service, "request failed: {e}");
                }
                e.to_string()
            })
        })
    }
}

/// A running host. Dropping it stops every task it started.
pub struct Node {
    pub endpoint: Endpoint,
    pub discovery: Arc<dyn Discovery>,
    pub plugins: Arc<PluginSet>,
    pub stats: Arc<ServerStats>,
    /// How the RPC server stops gracefully.
    drain: Arc<Drain>,
    /// What the node counts for `--metrics`.
    pub metrics: Arc<NodeMetrics>,
    /// Introductions and paths of the node's RPC client, for `--metrics`.
    client_stats: (Arc<IntroductionStats>, Arc<PathStats>),
    tasks: JoinSet<()>,
    /// The announce loop, stopped first when the node shuts down.
    announcing: tokio::task::AbortHandle,
    /// Resolves when the first round of announces is done.
    first_announce: Option<tokio::sync::oneshot::Receiver<AnnounceRound>>,
    /// The control socket's file, removed when the node stops.
    control_file: Option<control::SocketFile>,
    /// The host's key pair.
    pub identity: Arc<identity::Identity>,
    /// The node's RPC client's secure and plaintext sessions (the server's
    /// are in `stats.sessions`).
    pub client_sessions: Arc<SessionStats>,
}

/// How a round of announces went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnounceRound {
    /// Services announced.
    pub announced: usize,
    /// Services whose announce failed (retried in the background).
    pub failed: usize,
}

/// How long a stopping node waits, beyond its plugins' longest time limit,
/// for the requests in flight (the runtime stops a plugin a few epoch ticks
/// after its limit; the reply still has to be written).
pub const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// How long a stopped node waits for its last replies and FINs to be
/// acknowledged before it closes its socket.
const LINGER: Duration = Duration::from_secs(1);

impl Node {
    /// Starts everything; returns once the socket is bound and the plugins
    /// are loaded (announcing and punching carry on in the background).
    pub async fn start(config: NodeConfig, runtime: Runtime) -> anyhow::Result<Node> {
        let identity = config.identity.clone();
        // One Noise static key per process, signed by the identity.
        let keys = Arc::new(SessionKeys::new(identity.signing_key()));
        let ClientParts {
            endpoint,
            discovery,
            client,
            mut tasks,
        } = ClientParts::start(
            config.listen,
            &config.discovery,
            config.max_message,
            &config.nat,
            Some(&identity),
            Some(keys.clone()),
        )
        .await?;
        let punches = endpoint.punches();
        let client_stats = (client.introduction_stats(), client.paths());
        let client_sessions = client.session_stats();
        let metrics = Arc::new(NodeMetrics::default());
        let network = Arc::new(network::NodeNetwork::new(
            client,
            endpoint.clone(),
            metrics.clone(),
            config.policies.clone(),
        ));
        let plugins = Arc::new(
            PluginSet::load(
                runtime,
                network.clone() as Arc<dyn PluginNetwork>,
                config.policies.clone(),
                &config.plugins,
            )
            .await?,
        );
        network.set_plugins(&plugins);
        let stats = Arc::new(ServerStats::default());
        let drain = Arc::new(Drain::default());
        metrics.declare_services(&plugins.service_names());
        tasks.spawn(server::serve(
            endpoint.clone(),
            Arc::new(PluginServices {
                plugins: plugins.clone(),
                metrics: metrics.clone(),
            }),
            config.max_message,
            stats.clone(),
            drain.clone(),
            keys,
        ));
        let tick_failed = metrics.clone();
        tasks.spawn(plugins.clone().run_ticks(Arc::new(move |plugin, e| {
            tick_failed.plugin_failed(plugin, e)
        })));
        let (first_round, first_announce) = tokio::sync::oneshot::channel();
        let announcing = tasks.spawn(announce_loop(
            discovery.clone(),
            plugins.watch_services(),
            endpoint.local_addr().port(),
            first_round,
        ));

        // The services the plugins serving now want punched: read at every
        // round, so a swap changes whom the host punches.
        let punched_by = plugins.clone();
        let targets = move || -> Vec<String> {
            punched_by
                .current()
                .iter()
                .filter(|p| p.policy().may_be_punched_for)
                .flat_map(|p| p.punch_targets().iter().cloned())
                .collect()
        };
        let punch = PunchState::new(
            Instant::now(),
            targets(),
            &config.nat,
            DEFAULT_PUNCH_INTERVAL,
        );
        // A peer punched us: each plugin that may be punched for hears of it
        // through its `on-punch`, in the punch driver's own task set.
        let (told, counted) = (plugins.clone(), metrics.clone());
        let notify_plugins = move |peer: SocketAddr| -> Vec<BoxFuture<'static, ()>> {
            told.current()
                .into_iter()
                .filter(|p| p.policy().may_be_punched_for)
                .map(|plugin| -> BoxFuture<'static, ()> {
                    let metrics = counted.clone();
                    Box::pin(async move {
                        if let Err(e) = plugin.on_punch(&peer.to_string()).await {
                            metrics.plugin_failed(plugin.name(), &e);
                            tracing::warn!("on-punch failed: {e}");
                        }
                    })
                })
                .collect()
        };
        tasks.spawn(punch_driver::drive(
            punch,
            punches,
            endpoint.clone(),
            discovery.clone(),
            notify_plugins,
            targets,
        ));

        Ok(Node {
            endpoint,
            discovery,
            plugins,
            stats,
            drain,
            metrics,
            client_stats,
            tasks,
            announcing,
            first_announce: Some(first_announce),
            control_file: None,
            identity,
            client_sessions,
        })
    }

    /// Waits until the first round of announces is done (each service
    /// announced, or its announce failed and is being retried); `None` if it
    /// was already asked.
    pub async fn first_announce(&mut self) -> Option<AnnounceRound> {
        self.first_announce.take()?.await.ok()
    }

    /// Serves `swap`, `rollback` and `status` on a Unix socket at `path`
    /// (owner-only); the file is removed when the node stops.
    ///
    /// Errors: see [`control::bind`].
    pub fn serve_control(&mut self, path: &Path) -> Result<(), control::BindError> {
        let (listener, file) = control::bind(path)?;
        let (rpc, identity) = (self.endpoint.local_addr(), self.identity.public_hex());
        let (server, client) = (self.stats.sessions.clone(), self.client_sessions.clone());
        let endpoint = self.endpoint.clone();
        let host: control::HostStatus = Arc::new(move || {
            // Every peer with an open connection or a route: `direct`,
            // `birthday` (an extra socket birthday punching opened) or
            // `relayed`.
            let paths: Vec<serde_json::Value> = endpoint
                .peer_paths()
                .into_iter()
                .map(|(peer, kind)| serde_json::json!({"peer": peer.to_string(), "path": kind.as_str()}))
                .collect();
            serde_json::json!({
                "pid": std::process::id(),
                "rpc": rpc.to_string(),
                "identity": identity,
                "version": env!("CARGO_PKG_VERSION"),
                "sessions": {"served": session_counts(&server), "opened": session_counts(&client)},
                "paths": paths,
            })
        });
        self.tasks
            .spawn(control::serve(listener, self.plugins.clone(), host));
        self.control_file = Some(file);
        Ok(())
    }

    /// Serves the Prometheus metrics on `GET /metrics` at `addr`
    /// ([`metrics`]); returns the address bound (port 0: any free port).
    /// Errors: the address cannot be bound (taken, not local).
    pub async fn serve_metrics(&mut self, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
        let listener = metrics::bind(addr).await?;
        let bound = listener.local_addr()?;
        let (introductions, paths) = self.client_stats.clone();
        let parts = metrics::PartsCollector {
            endpoint: self.endpoint.clone(),
            server: self.stats.clone(),
            introductions,
            paths,
            plugins: self.plugins.clone(),
        };
        let registry = metrics::registry(&self.metrics, parts);
        self.tasks.spawn(metrics::serve(listener, registry));
        Ok(bound)
    }

    /// Swaps a plugin in when its file changes, checking every `interval`.
    pub fn watch(&mut self, interval: Duration) {
        self.tasks.spawn(self.plugins.clone().watch(interval));
    }

    /// The longest time limit of the plugins serving now: how long a
    /// request in flight can still take.
    pub fn longest_time_limit(&self) -> Duration {
        self.plugins
            .current()
            .iter()
            .map(|p| p.policy().limits.time)
            .max()
            .unwrap_or_default()
    }

    /// Stops gracefully, then stops every task of the node and waits until
    /// they have stopped: no more announces or ticks (a tick running
    /// finishes); new requests are answered with
    /// `ERR_SHUTTING_DOWN` at once; the requests in flight get `limit` to
    /// finish (pass [`longest_time_limit`](Self::longest_time_limit) plus
    /// [`DRAIN_GRACE`] to let each run to its own time limit), and those
    /// still running then are answered with `ERR_SHUTTING_DOWN`. Each step
    /// is logged.
    pub async fn shutdown(mut self, limit: Duration) {
        self.announcing.abort();
        self.plugins.stop_ticks();
        let in_flight = self.drain.enter(Phase::Draining);
        tracing::info!(
            "draining {in_flight} requests (waiting up to {limit:?}); new ones get {}",
            server::ERR_SHUTTING_DOWN
        );
        let started = Instant::now();
        let left = self.drain.settled(limit).await;
        if left > 0 {
            tracing::warn!(
                "{left} requests still running after {limit:?}; answering them with {}",
                server::ERR_SHUTTING_DOWN
            );
        } else {
            tracing::info!("drained in {:?}", started.elapsed());
        }
        self.drain.enter(Phase::Closed);
        // Writing those error replies takes no plugin time; bounded all the same.
        self.drain.settled(DRAIN_GRACE).await;
        self.tasks.shutdown().await;
        // The connections' tasks are gone, so each has queued its FIN after
        // its last reply; give the socket a moment to deliver them.
        let lingering = Instant::now();
        while self.endpoint.open_connections() > 0 && lingering.elapsed() < LINGER {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One line of what the node has seen, for its log.
    pub fn summary(&self) -> String {
        let load = |counter: &std::sync::atomic::AtomicU64| {
            counter.load(std::sync::atomic::Ordering::Relaxed)
        };
        format!(
            "served {} requests ({} errors), {} secure and {} plaintext connections, rejected {} frames, closed {} bad connections, received {} punches, dropped {} stray datagrams",
            load(&self.stats.requests),
            load(&self.stats.errors),
            load(&self.stats.sessions.secure),
            load(&self.stats.sessions.plaintext),
            load(&self.stats.sessions.rejected_frames),
            load(&self.stats.bad_connections),
            load(&self.endpoint.stats.punches_received),
            load(&self.endpoint.stats.garbage_datagrams),
        )
    }
}

/// A status's session counters (docs/wire.md §8).
fn session_counts(stats: &SessionStats) -> serde_json::Value {
    let load =
        |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed);
    serde_json::json!({
        "secure": load(&stats.secure),
        "plaintext": load(&stats.plaintext),
        "failed_handshakes": load(&stats.failed_handshakes),
        "rejected_frames": load(&stats.rejected_frames),
        "rate_limited_handshakes": load(&stats.rate_limited_handshakes),
    })
}

/// Where `run` keeps plugin state without --state-dir: the first directory
/// of `$STATE_DIRECTORY` (systemd sets it for a unit with `StateDirectory=`),
/// else `$XDG_STATE_HOME/grenache-host`, else `$HOME/.local/state/grenache-host`
/// (the XDG base directory specification's default); `None` without any.
pub fn default_state_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dirs) = var("STATE_DIRECTORY") {
        // systemd lists several directories separated by colons.
        let first = dirs.to_string_lossy().split(':').next()?.to_string();
        return Some(PathBuf::from(first));
    }
    if let Some(state_home) = var("XDG_STATE_HOME") {
        return Some(PathBuf::from(state_home).join("grenache-host"));
    }
    var("HOME").map(|home| PathBuf::from(home).join(".local/state/grenache-host"))
}

/// Announces every service now, again every [`REANNOUNCE_INTERVAL`], and at
/// once when a swap changes the set; while announces fail (the DHT has no
/// one to announce to, no Grape answers) it retries every second at first,
/// then less and less often ([`announce_retry_wait`]). A service a swap
/// removed is no longer re-announced (DHT nodes cannot be told to forget
/// it; callers try it last once it fails).
///
/// `first_round` hears how the first round went (for the readiness signal).
async fn announce_loop(
    discovery: Arc<dyn Discovery>,
    mut services: tokio::sync::watch::Receiver<Vec<String>>,
    port: u16,
    first_round: tokio::sync::oneshot::Sender<AnnounceRound>,
) {
    let mut first_round = Some(first_round);
    let mut announced: Vec<String> = Vec::new();
    let mut failed_rounds = 0u32;
    loop {
        let current = services.borrow_and_update().clone();
        for gone in announced.iter().filter(|s| !current.contains(s)) {
            tracing::info!("stopped announcing {gone}");
        }
        announced.retain(|s| current.contains(s));
        // All at once: each announce lasts until its DHT query is done
        // (seconds), and a host may serve many services.
        let discovery = &discovery;
        let results = futures::future::join_all(
            current
                .iter()
                .map(|service| async move { (service, discovery.announce(service, port).await) }),
        )
        .await;
        let errors: Vec<_> = results
            .into_iter()
            .filter_map(|(service, result)| match result {
                Ok(()) if !announced.contains(service) => {
                    tracing::info!("announced {service} on port {port}");
                    announced.push(service.clone());
                    None
                }
                Ok(()) => {
                    tracing::debug!("re-announced {service}");
                    None
                }
                Err(e) => Some(e),
            })
            .collect();
        if let Some(tell) = first_round.take() {
            let _ = tell.send(AnnounceRound {
                announced: current.len() - errors.len(),
                failed: errors.len(),
            });
        }
        failed_rounds = if errors.is_empty() {
            0
        } else {
            failed_rounds.saturating_add(1)
        };
        let wait = announce_retry_wait(failed_rounds);
        for e in errors {
            tracing::warn!("{e}; retrying in {wait:?}");
        }
        // Wake early when the set of services changes.
        if let Ok(Err(_)) = tokio::time::timeout(wait, services.changed()).await {
            // The plugin set is gone (shutting down): keep the pace.
            tokio::time::sleep(wait).await;
        }
    }
}

/// How long the announce loop waits after `failed_rounds` rounds in a row
/// had a failed announce (0: all went well, so the next re-announce): 1 s
/// after the first, doubling with each further one up to
/// [`REANNOUNCE_INTERVAL`] (1, 2, 4, 8, 16, 30 s), so a directory that is
/// starting up is soon retried while one that never answers is neither
/// flooded nor floods the log.
fn announce_retry_wait(failed_rounds: u32) -> Duration {
    match failed_rounds {
        0 => REANNOUNCE_INTERVAL,
        n => Duration::from_secs(1)
            .saturating_mul(1 << (n - 1).min(16))
            .min(REANNOUNCE_INTERVAL),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_announces_back_off_from_1s_doubling_to_30s() {
        let waits: Vec<u64> = (0..9).map(|n| announce_retry_wait(n).as_secs()).collect();
        assert_eq!(waits, [30, 1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(announce_retry_wait(u32::MAX), REANNOUNCE_INTERVAL);
    }
}
