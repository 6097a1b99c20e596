//! The host's metrics (`run --metrics IP:PORT`): Prometheus' text format
//! (version 0.0.4) on `GET /metrics`, encoded by the official client,
//! `prometheus-client`. Every metric is listed in the README's "Metrics"
//! section.
//!
//! Two kinds of sources, so that counting costs the hot paths nothing more
//! than an atomic add:
//!
//! - What only the node sees, a request's service, outcome and duration (in
//!   both directions: received, and sent by plugins) and why a plugin
//!   failed, is counted here, in [`NodeMetrics`]: one set of instruments
//!   per service, resolved once per service (not built per request from
//!   label strings).
//! - What the parts already count in atomics of their own (the socket's
//!   punches, uTP, introductions, paths, swaps) is read when a scrape
//!   arrives, by [`PartsCollector`].
//!
//! Label values come only from this host: the services its plugins serve
//! or name in their manifests' `calls`, the plugin names, fixed outcome and
//! reason names. A key a peer sends that no plugin serves is counted under
//! the one service [`UNKNOWN_SERVICE`], a plugin's call to a service no
//! manifest names under [`OTHER_SERVICE`], so random keys cannot grow the
//! registry.
//!
//! The endpoint is plain HTTP/1.1 on hyper ([`crate::http`], as the grape's
//! API), bounded: at most [`MAX_CONNECTIONS`] at once (a new one closes
//! the oldest), headers within [`HEADER_TIMEOUT`], and no connection lives longer
//! than [`CONNECTION_LIFETIME`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;

use crate::nat::IntroductionStats;
use crate::plugin::set::{PluginSet, TICK_OUTCOMES};
use crate::plugin::CallError;
use crate::rpc::client::PathStats;
use crate::rpc::server::ServerStats;
use crate::rpc::RpcError;
use crate::transport::Endpoint;

/// The `service` label of requests for a key no plugin serves.
pub const UNKNOWN_SERVICE: &str = "_unknown";
/// The `service` label of plugins' outgoing requests to a service no
/// loaded plugin names in its manifest's `calls` (one reached through
/// `"*"`, say).
pub const OTHER_SERVICE: &str = "_other";
/// Most metrics connections served at once; a new one closes the oldest.
pub const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest a metrics connection stays open (a scraper reconnects).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// The path metrics are served on.
pub const METRICS_PATH: &str = "/metrics";

/// Upper bounds of the request duration buckets, in seconds: from a cached
/// fibonacci answer (about 100 µs) to the default 5 s time limit and beyond.
const DURATION_BUCKETS: [f64; 15] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0,
];

/// How one request this host received ended (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The plugin answered with a result.
    Ok,
    /// The plugin's handler answered with an error.
    Error,
    /// The plugin failed (trap, time or memory limit, invalid reply, busy):
    /// see `grenache_host_plugin_failures_total`.
    Failed,
    /// No plugin serves the key.
    NotFound,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Failed => "failed",
            Outcome::NotFound => "not_found",
        }
    }
}

/// The outcomes a served service has, created at zero.
const SERVED_OUTCOMES: [&str; 3] = ["ok", "error", "failed"];
/// The outcome of a key no plugin serves.
const UNKNOWN_OUTCOMES: [&str; 1] = ["not_found"];

/// How one request a plugin sent ended (the `outcome` label of outgoing
/// requests): `ok`, or the kind of [`RpcError`].
pub fn outgoing_outcome(result: &Result<String, RpcError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(RpcError::Remote(_)) => "error",
        Err(RpcError::NoPeers(_)) => "no_peers",
        Err(RpcError::Timeout(_)) => "timeout",
        Err(RpcError::Transport(_)) => "transport",
    }
}

/// The outcomes of outgoing requests, created at zero.
const OUTGOING_OUTCOMES: [&str; 5] = ["ok", "error", "no_peers", "timeout", "transport"];

/// The `reason` label of a plugin failure; `None` for a handler's own
/// error, which is an answer, not a failure.
pub fn failure_reason(error: &CallError) -> Option<&'static str> {
    error.failure_reason()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    service: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    plugin: String,
    reason: &'static str,
}

/// One service's instruments, resolved from the families once.
struct ServiceInstruments {
    /// The outcomes the service can have, each with its counter.
    outcomes: Vec<(&'static str, Counter)>,
    duration: Histogram,
}

type DurationFamily = Family<ServiceLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// Requests of one direction (received, or sent by plugins): a counter by
/// service and outcome, a duration histogram by service, and each
/// service's instruments resolved once.
struct RequestTable {
    requests: Family<RequestLabels, Counter>,
    durations: DurationFamily,
    services: RwLock<HashMap<String, Arc<ServiceInstruments>>>,
}

impl Default for RequestTable {
    fn default() -> Self {
        RequestTable {
            requests: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
            services: RwLock::default(),
        }
    }
}

impl RequestTable {
    /// The instruments of `service`, created on first use with a counter
    /// at zero for each of `outcomes`. `service` is a name from this host
    /// (a bounded set), never a key from the wire.
    fn instruments(&self, service: &str, outcomes: &[&'static str]) -> Arc<ServiceInstruments> {
        let known = self
            .services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .cloned();
        if let Some(instruments) = known {
            return instruments;
        }
        let mut services = self.services.write().unwrap_or_else(|p| p.into_inner());
        services
            .entry(service.to_string())
            .or_insert_with(|| {
                Arc::new(ServiceInstruments {
                    outcomes: outcomes
                        .iter()
                        .map(|&outcome| (outcome, self.counter(service, outcome)))
                        .collect(),
                    duration: self.durations.get_or_create_owned(&ServiceLabels {
                        service: service.to_string(),
                    }),
                })
            })
            .clone()
    }

    fn counter(&self, service: &str, outcome: &'static str) -> Counter {
        self.requests.get_or_create_owned(&RequestLabels {
            service: service.to_string(),
            outcome,
        })
    }

    /// Counts one request of `service` that ended with `outcome` after
    /// `took`; `outcomes` are those the service has (see
    /// [`instruments`](Self::instruments)).
    fn record(
        &self,
        service: &str,
        outcomes: &[&'static str],
        outcome: &'static str,
        took: Duration,
    ) {
        let instruments = self.instruments(service, outcomes);
        match instruments.outcomes.iter().find(|(o, _)| *o == outcome) {
            Some((_, counter)) => counter.inc(),
            // An outcome the service should not have: counted all the same.
            None => self.counter(service, outcome).inc(),
        };
        instruments.duration.observe(took.as_secs_f64());
    }
}

/// What the node counts itself: requests received by service and outcome
/// and their durations, the same for plugins' outgoing requests, and
/// plugin failures. Cheap to share behind an `Arc`.
#[derive(Default)]
pub struct NodeMetrics {
    received: RequestTable,
    outgoing: RequestTable,
    failures: Family<FailureLabels, Counter>,
}

impl NodeMetrics {
    /// Creates the series of every service in `services`, and of
    /// [`UNKNOWN_SERVICE`], at zero, so that a scrape shows them before
    /// their first request.
    pub fn declare_services(&self, services: &[String]) {
        self.received
            .instruments(UNKNOWN_SERVICE, &UNKNOWN_OUTCOMES);
        for service in services {
            self.received.instruments(service, &SERVED_OUTCOMES);
        }
    }

    /// Counts one request received that took `took`. `service` must be a
    /// name this host serves, never a key from the wire: a request no
    /// plugin serves is counted with `service = None` under
    /// [`UNKNOWN_SERVICE`].
    pub fn request(&self, service: Option<&str>, outcome: Outcome, took: Duration) {
        let (service, outcomes): (&str, &[&'static str]) = match service {
            Some(service) => (service, &SERVED_OUTCOMES),
            None => (UNKNOWN_SERVICE, &UNKNOWN_OUTCOMES),
        };
        self.received
            .record(service, outcomes, outcome.as_str(), took);
    }

    /// Creates the series of calls to `service` (a name a plugin's
    /// manifest lists in `calls`) at zero.
    pub fn declare_call(&self, service: &str) {
        self.outgoing.instruments(service, &OUTGOING_OUTCOMES);
    }

    /// Counts one request a plugin sent to `service` (a name some loaded
    /// plugin declares in its `calls`, or [`OTHER_SERVICE`]) that ended as
    /// `outcome` ([`outgoing_outcome`]) after `took`.
    pub fn outgoing(&self, service: &str, outcome: &'static str, took: Duration) {
        self.outgoing
            .record(service, &OUTGOING_OUTCOMES, outcome, took);
    }

    /// Counts a failed call into `plugin` (a request or an `on-punch`);
    /// a handler's own error is not a failure and is not counted.
    pub fn plugin_failed(&self, plugin: &str, error: &CallError) {
        if let Some(reason) = failure_reason(error) {
            self.failures
                .get_or_create(&FailureLabels {
                    plugin: plugin.to_string(),
                    reason,
                })
                .inc();
        }
    }
}

/// The parts' own counters, read at each scrape.
pub struct PartsCollector {
    /// The host's socket: punches, stray datagrams, uTP.
    pub endpoint: Endpoint,
    /// The RPC server's counters.
    pub server: Arc<ServerStats>,
    /// Introductions this host asked for, by outcome.
    pub introductions: Arc<IntroductionStats>,
    /// Paths this host's requests opened, by kind.
    pub paths: Arc<PathStats>,
    /// The plugins: swaps and refused swaps.
    pub plugins: Arc<PluginSet>,
}

impl std::fmt::Debug for PartsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartsCollector").finish_non_exhaustive()
    }
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// One counter family: `name` gets `_total` appended; each series is a label
/// set and its value.
fn counters<S: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (S, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One gauge without labels.
fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: i64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?)
}

type NoLabels = [(&'static str, &'static str); 0];

impl Collector for PartsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        let transport = &self.endpoint.stats;
        counters(
            e,
            "grenache_host_punches_received",
            "Punches (the two bytes C3 BF) received on the RPC socket.",
            [(NoLabels::default(), load(&transport.punches_received))],
        )?;
        counters(
            e,
            "grenache_host_punches_sent",
            "Punches sent from the RPC socket: Grenache punching, introduction handshakes and keepalives.",
            [(NoLabels::default(), load(&transport.punches_sent))],
        )?;
        counters(
            e,
            "grenache_host_stray_datagrams",
            "Datagrams dropped unread on the RPC socket: neither a punch, an introduction message nor uTP.",
            [(NoLabels::default(), load(&transport.garbage_datagrams))],
        )?;
        counters(
            e,
            "grenache_host_rpc_bad_connections",
            "Connections closed because they did not speak Grenache or sent a message over --max-payload.",
            [(NoLabels::default(), load(&self.server.bad_connections))],
        )?;
        counters(
            e,
            "grenache_host_rpc_connections_timed_out",
            "Connections closed for bringing no whole request in time: a request not whole 10 s after its first bytes (plus 1 s per 16 KiB), or no request for 60 s with nothing in flight (slowloris).",
            [(NoLabels::default(), load(&self.server.timed_out_connections))],
        )?;
        let sessions = &self.server.sessions;
        counters(
            e,
            "grenache_host_rpc_sessions",
            "Connections this host served, by kind: secure (a Noise session with a grenache-host, its identity checked) or plaintext (Grenache without encryption, e.g. a Node peer).",
            [
                ([("kind", "secure")], load(&sessions.secure)),
                ([("kind", "plaintext")], load(&sessions.plaintext)),
            ],
        )?;
        counters(
            e,
            "grenache_host_rpc_failed_handshakes",
            "Secure handshakes this host's server refused: malformed, timed out (3 s) or an identity proof that does not check.",
            [(NoLabels::default(), load(&sessions.failed_handshakes))],
        )?;
        counters(
            e,
            "grenache_host_rpc_rate_limited_handshakes",
            "Secure handshakes this host's server dropped unanswered: their source IP was over 50 per second (burst 100).",
            [(NoLabels::default(), load(&sessions.rate_limited_handshakes))],
        )?;
        counters(
            e,
            "grenache_host_rpc_rejected_frames",
            "Secure-session frames that did not decrypt (tampered or corrupted); each closed its connection.",
            [(NoLabels::default(), load(&sessions.rejected_frames))],
        )?;
        counters(
            e,
            "grenache_host_introductions",
            "Introductions this host asked for, by outcome.",
            self.introductions
                .counts()
                .map(|(outcome, n)| ([("outcome", outcome.as_str())], n)),
        )?;
        counters(
            e,
            "grenache_host_birthdays_refused",
            "Birthday punching attempts this host refused, its own or asked for by the introducer: one was under way, or over 3 in a row / 3 per 10 s.",
            [(NoLabels::default(), load(&self.introductions.birthdays_refused))],
        )?;
        counters(
            e,
            "grenache_host_paths_opened",
            "Connections this host's requests opened, by path: direct (to the announced address), punched (through an introduction), relayed (through the introducer's relay).",
            [
                ([("kind", "direct")], load(&self.paths.direct)),
                ([("kind", "punched")], load(&self.paths.punched)),
                ([("kind", "relayed")], load(&self.paths.relayed)),
            ],
        )?;
        let utp = self.endpoint.utp_stats();
        gauge(
            e,
            "grenache_host_utp_connections",
            "uTP connections open now, both directions, connecting included.",
            None,
            i64::try_from(self.endpoint.open_connections()).unwrap_or(i64::MAX),
        )?;
        counters(
            e,
            "grenache_host_utp_connections_opened",
            "uTP connections opened, by direction: outgoing (this host connected) or incoming (a peer's SYN was accepted).",
            [
                ([("direction", "outgoing")], utp.connected),
                ([("direction", "incoming")], utp.accepted),
            ],
        )?;
        counters(
            e,
            "grenache_host_utp_connections_refused",
            "Incoming uTP connections refused by a bound (connections in all, per address, accept backlog).",
            [(NoLabels::default(), utp.refused)],
        )?;
        counters(
            e,
            "grenache_host_utp_connections_evicted",
            "uTP connections closed to make room for a new one (half-open, or silent for long).",
            [(NoLabels::default(), utp.evicted)],
        )?;
        counters(
            e,
            "grenache_host_utp_connections_unverified",
            "Incoming uTP connections dropped because the peer never acknowledged our STATE within 5 s (most likely a spoofed SYN).",
            [(NoLabels::default(), utp.unverified)],
        )?;
        counters(
            e,
            "grenache_host_utp_syns_withheld",
            "Connects not sent to an address that punched this host and never answered its SYNs (its SYN budget was spent).",
            [(NoLabels::default(), utp.syns_withheld)],
        )?;
        counters(
            e,
            "grenache_host_utp_packets_dropped",
            "uTP packets dropped, by reason: malformed, or for no connection (answered with a RESET).",
            [
                ([("reason", "malformed")], utp.malformed),
                ([("reason", "unknown_connection")], utp.unknown),
            ],
        )?;
        let swaps = self.plugins.swap_counts();
        counters(
            e,
            "grenache_host_plugin_swaps",
            "Swaps of a plugin that took effect (rollbacks are counted apart).",
            swaps
                .iter()
                .map(|s| ([("plugin", s.plugin.as_str())], s.swaps)),
        )?;
        counters(
            e,
            "grenache_host_plugin_rollbacks",
            "Rollbacks of a plugin that took effect.",
            swaps
                .iter()
                .map(|s| ([("plugin", s.plugin.as_str())], s.rollbacks)),
        )?;
        counters(
            e,
            "grenache_host_plugin_swap_refusals",
            "Swaps of a plugin refused (the new file did not load, or its services collide); the old version kept serving.",
            swaps.iter().map(|s| ([("plugin", s.plugin.as_str())], s.refused)),
        )?;
        let ticks = self.plugins.tick_counts();
        counters(
            e,
            "grenache_host_plugin_ticks",
            "Ticks of a plugin (on-tick), by outcome: ok, error (it returned one), a failure's reason (trap, time_limit, memory_limit, state_not_saved), or skipped (the previous tick still ran, or every request slot was busy).",
            ticks.iter().flat_map(|(plugin, counts)| {
                TICK_OUTCOMES
                    .iter()
                    .zip(counts)
                    .map(|(outcome, n)| ([("plugin", plugin.as_str()), ("outcome", *outcome)], *n))
            }),
        )?;
        Ok(())
    }
}

/// `process_resident_memory_bytes`, as Prometheus' own clients export it.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(bytes) = resident_memory_bytes() {
            gauge(
                &mut encoder,
                "process_resident_memory",
                "Resident memory size in bytes.",
                Some(&Unit::Bytes),
                i64::try_from(bytes).unwrap_or(i64::MAX),
            )?;
        }
        Ok(())
    }
}

/// The process's resident set size in bytes: the second field of
/// `/proc/self/statm` (in pages) times the page size. `None` where there is
/// no procfs.
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let page_size = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    pages.checked_mul(page_size)
}

/// The registry a host's endpoint serves: the node's own families, the
/// parts' counters and the process's memory.
pub fn registry(metrics: &NodeMetrics, parts: PartsCollector) -> Registry {
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    registry.register_collector(Box::new(parts));
    registry.register_collector(Box::new(ProcessCollector));
    registry
}

impl NodeMetrics {
    /// Registers the node's own families with `registry`.
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "grenache_host_requests",
            "Requests received, by service and outcome (ok, error: the service's own error reply, failed: the plugin failed, not_found: no plugin serves the key, counted under service=\"_unknown\")",
            self.received.requests.clone(),
        );
        registry.register_with_unit(
            "grenache_host_request_duration",
            "Time from routing a request received to its reply, by service",
            Unit::Seconds,
            self.received.durations.clone(),
        );
        registry.register(
            "grenache_host_outgoing_requests",
            "Requests plugins sent, by service (one a plugin's manifest names in calls, else \"_other\") and outcome (ok, error: the service's error reply, no_peers, timeout, transport)",
            self.outgoing.requests.clone(),
        );
        registry.register_with_unit(
            "grenache_host_outgoing_request_duration",
            "Time from a plugin's request to its reply or failure, by service",
            Unit::Seconds,
            self.outgoing.durations.clone(),
        );
        registry.register(
            "grenache_host_plugin_failures",
            "Calls into a plugin that failed, by plugin and reason (trap, time_limit, memory_limit, bad_reply, busy)",
            self.failures.clone(),
        );
    }
}

/// The counters of a `dht` or `grape` node's relay (`docs/wire.md §5.5`),
/// read at each scrape.
#[derive(Debug)]
pub struct RelayCollector(pub Arc<std::sync::Mutex<crate::nat::relay::RelayStats>>);

impl Collector for RelayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let r = *self.0.lock().unwrap_or_else(|p| p.into_inner());
        let e = &mut encoder;
        gauge(
            e,
            "grenache_host_relay_sessions",
            "Relay sessions open now.",
            None,
            i64::try_from(r.sessions).unwrap_or(i64::MAX),
        )?;
        counters(
            e,
            "grenache_host_relay_sessions_opened",
            "Relay sessions opened between two registered hosts.",
            [(NoLabels::default(), r.opened)],
        )?;
        counters(
            e,
            "grenache_host_relay_sessions_refused",
            "Relay sessions refused over a quota (sessions per host, in all) or between address families.",
            [(NoLabels::default(), r.refused)],
        )?;
        counters(
            e,
            "grenache_host_relay_frames",
            "Relay frames forwarded.",
            [(NoLabels::default(), r.frames)],
        )?;
        counters(
            e,
            "grenache_host_relay_forwarded_bytes",
            "Bytes of relay frames forwarded (as sent; each as long as the frame received).",
            [(NoLabels::default(), r.bytes)],
        )?;
        counters(
            e,
            "grenache_host_relay_dropped_frames",
            "Relay frames dropped, by reason: malformed, unknown_session (no session between the sender and the address), bad_token, unregistered (a side is no longer registered), over_rate (a host's or the relay's byte rate).",
            [
                ([("reason", "malformed")], r.malformed),
                ([("reason", "unknown_session")], r.unknown_session),
                ([("reason", "bad_token")], r.bad_token),
                ([("reason", "unregistered")], r.unregistered),
                ([("reason", "over_rate")], r.over_rate),
            ],
        )
    }
}

/// The registry a `dht` or `grape` node's endpoint serves: its relay's
/// counters and the process's memory.
pub fn relay_registry(relay: RelayCollector) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(relay));
    registry.register_collector(Box::new(ProcessCollector));
    registry
}

/// Binds the metrics endpoint at `addr`.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot serve metrics on {addr}: {e}; pick another --metrics address or port (or leave --metrics out)"
        )
    })
}

/// Serves `registry` on `listener` until the task is dropped; dropping it
/// also closes every connection it accepted.
pub async fn serve(listener: TcpListener, registry: Registry) {
    let registry = Arc::new(registry);
    let builder = crate::http::builder(HEADER_TIMEOUT);
    let mut connections = tokio::task::JoinSet::new();
    // The live connections' tasks, oldest first.
    let mut open = std::collections::VecDeque::new();
    loop {
        let (stream, peer) = crate::http::accept(&listener, "metrics").await;
        // Reap finished connections so the set holds only the live ones.
        while connections.try_join_next().is_some() {}
        open.retain(|task: &tokio::task::AbortHandle| !task.is_finished());
        // Full: the oldest goes, not the newcomer. Refusing newcomers let
        // 16 clients that reconnect every few seconds keep a scraper out
        // for good; to push a scrape out now, clients would have to open
        // 16 connections while it is served.
        if open.len() >= MAX_CONNECTIONS {
            if let Some(oldest) = open.pop_front() {
                oldest.abort();
                tracing::debug!(%peer, "metrics: {MAX_CONNECTIONS} connections open; closed the oldest");
            }
        }
        let registry = registry.clone();
        let service = hyper::service::service_fn(move |request| {
            let response = respond(&registry, &request);
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        open.push_back(connections.spawn(async move {
            match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                Ok(Err(e)) => tracing::debug!(%peer, "metrics connection ended: {e}"),
                Ok(Ok(())) => {}
                Err(_) => {
                    tracing::debug!(%peer, "metrics connection closed after {CONNECTION_LIFETIME:?}")
                }
            }
        }));
    }
}

/// `GET /metrics`: the registry in the text format; anything else an error
/// that says where the metrics are.
fn respond<B>(registry: &Registry, request: &Request<B>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &'static str, body: String| {
        Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a static status and header make a valid response")
    };
    if request.uri().path() != METRICS_PATH {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            format!("not found; the metrics are at {METRICS_PATH}\n"),
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            format!("use GET {METRICS_PATH}\n"),
        );
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return response;
    }
    let mut body = String::new();
    match prometheus_client::encoding::prometheus_text::encode(&mut body, registry) {
        Ok(()) => reply(
            StatusCode::OK,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            body,
        ),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            format!("cannot encode the metrics: {e}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sample lines of `name` in `text`.
    fn series(text: &str, name: &str) -> usize {
        text.lines().filter(|l| l.starts_with(name)).count()
    }

    fn encoded(metrics: &NodeMetrics) -> String {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn keys_from_the_wire_never_grow_the_registry() {
        let metrics = NodeMetrics::default();
        metrics.declare_services(&["fibonacci_worker".to_string()]);
        let before = encoded(&metrics);
        // What a peer sending random keys causes: the node counts each
        // under the unknown service, without the key.
        for _ in 0..1000 {
            metrics.request(None, Outcome::NotFound, Duration::from_micros(5));
        }
        let text = encoded(&metrics);
        for name in [
            "grenache_host_requests_total",
            "grenache_host_request_duration_seconds_count",
        ] {
            assert_eq!(series(&text, name), series(&before, name), "{name}");
        }
        assert_eq!(
            series(&text, "grenache_host_request_duration_seconds_count"),
            2
        );
        assert!(
            text.contains(
                "grenache_host_requests_total{service=\"_unknown\",outcome=\"not_found\"} 1000\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_service_shows_at_zero_and_counts_each_outcome_with_its_duration() {
        let metrics = NodeMetrics::default();
        metrics.declare_services(&["fib".to_string()]);
        let text = encoded(&metrics);
        for outcome in ["ok", "error", "failed"] {
            let line = format!(
                "grenache_host_requests_total{{service=\"fib\",outcome=\"{outcome}\"}} 0\n"
            );
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(!text.contains("service=\"fib\",outcome=\"not_found\""));

        metrics.request(Some("fib"), Outcome::Ok, Duration::from_millis(2));
        metrics.request(Some("fib"), Outcome::Error, Duration::from_millis(20));
        let text = encoded(&metrics);
        for line in [
            "grenache_host_requests_total{service=\"fib\",outcome=\"ok\"} 1\n",
            "grenache_host_requests_total{service=\"fib\",outcome=\"error\"} 1\n",
            "grenache_host_request_duration_seconds_bucket{service=\"fib\",le=\"0.0025\"} 1\n",
            "grenache_host_request_duration_seconds_bucket{service=\"fib\",le=\"0.025\"} 2\n",
            "grenache_host_request_duration_seconds_count{service=\"fib\"} 2\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    #[test]
    fn a_handler_error_is_an_answer_not_a_plugin_failure() {
        let metrics = NodeMetrics::default();
        metrics.plugin_failed("p", &CallError::Handler("no".into()));
        assert_eq!(
            series(&encoded(&metrics), "grenache_host_plugin_failures"),
            0
        );
        let busy = CallError::Busy {
            plugin: "p".into(),
            max: 1,
        };
        metrics.plugin_failed("p", &busy);
        metrics.plugin_failed("p", &busy);
        assert!(encoded(&metrics)
            .contains("grenache_host_plugin_failures_total{plugin=\"p\",reason=\"busy\"} 2\n"));
    }

    #[test]
    fn resident_memory_is_read_from_procfs() {
        let bytes = resident_memory_bytes().expect("Linux has /proc/self/statm");
        assert!(bytes > 1 << 20, "{bytes}");
    }
}
