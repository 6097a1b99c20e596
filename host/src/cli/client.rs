//! The one-shot network clients: `call` and `bench`. Each starts the client
//! side of a host (its socket, a DHT node or a Grape link, introductions)
//! for the length of the command.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::output::{check_payload, print_compact, print_line, usage_error, EXIT_SERVICE_ERROR};
use crate::discovery::DiscoveryConfig;
use crate::nat::{IntroducerAddr, NatConfig};
use crate::node::ClientParts;
use crate::rpc::client::RpcClient;
use crate::rpc::codec::DEFAULT_MAX_MESSAGE;
use crate::rpc::session::{PinnedKeys, SessionKeys};
use crate::rpc::RpcError;
use crate::transport::Endpoint;

/// Where and how a one-shot client reaches the network.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Where services are looked up: the DHT or Grapes.
    pub discovery: DiscoveryConfig,
    /// The introducer, if any (see [`crate::nat`]).
    pub introducer: Option<IntroducerAddr>,
    /// Deadline of each request, lookup and connect included.
    pub timeout: Duration,
    /// Address of the client's socket.
    pub listen: SocketAddr,
    /// The identities allowed to answer (`--peer-key`); empty: any.
    pub pins: PinnedKeys,
    /// No secure sessions (`--plaintext`).
    pub plaintext: bool,
}

impl ClientConfig {
    /// What the client proves itself with: a new identity for this run
    /// (a one-shot client has no stored one); `None` with `--plaintext`.
    fn session_keys(&self) -> Option<Arc<SessionKeys>> {
        (!self.plaintext).then(|| Arc::new(SessionKeys::ephemeral()))
    }
}

/// What `call` sends, and to whom.
#[derive(Debug, Clone)]
pub struct CallConfig {
    pub service: String,
    /// The request payload, JSON text (checked before anything is sent).
    pub payload: String,
    pub client: ClientConfig,
    /// Call this peer directly instead of looking the service up.
    pub peer: Option<SocketAddr>,
}

/// What `bench` sends.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub service: String,
    /// The request payload, JSON text.
    pub payload: String,
    pub client: ClientConfig,
    pub plan: BenchPlan,
    /// Send to this peer directly instead of looking the service up.
    pub peer: Option<SocketAddr>,
    /// The peer echoes requests (a transport floor): a reply that is the
    /// request itself counts as answered.
    pub echo: bool,
}

/// How many requests `bench` sends and how.
#[derive(Debug, Clone, Copy)]
pub struct BenchPlan {
    /// Requests counted in the figures.
    pub requests: u64,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Requests sent first and not counted.
    pub warmup: u64,
}

/// Starts the client side of a host (socket, discovery, introductions).
async fn client(config: &ClientConfig) -> Result<ClientParts, ExitCode> {
    if matches!(&config.discovery, DiscoveryConfig::Dht { bootstrap } if bootstrap.is_empty()) {
        return Err(usage_error("--bootstrap <ip:port> or --grape <url> is required: the address of a DHT node (e.g. one started with `grenache-host dht`), or of a Grape's HTTP API (e.g. http://127.0.0.1:30001)"));
    }
    // A one-shot client serves nothing, so it registers nothing: it is not
    // `behind_nat` even when it is behind one.
    let nat = NatConfig {
        introducer: config.introducer,
        ..NatConfig::default()
    };
    let keys = config.session_keys();
    let parts = ClientParts::start(
        config.listen,
        &config.discovery,
        DEFAULT_MAX_MESSAGE,
        &nat,
        None,
        keys,
    )
    .await
    .map_err(|e| usage_error(format!("{e:#}")))?;
    // No waiting for the join to finish (it lasts until every node found has
    // answered or timed out): a lookup starts from the bootstrap nodes, and
    // waits for the join only if that finds nothing.
    Ok(parts)
}

/// Where a one-shot client's requests go: the service looked up through
/// the network, or one peer (`--peer`).
/// Requests go only to the identities in `pins` (`--peer-key`), if any.
struct Sender {
    to: SendTo,
    pins: PinnedKeys,
}

enum SendTo {
    Lookup(ClientParts),
    Peer(RpcClient, SocketAddr),
}

impl Sender {
    async fn start(config: &ClientConfig, peer: Option<SocketAddr>) -> Result<Sender, ExitCode> {
        let to = match peer {
            Some(peer) => {
                let (endpoint, _introductions) = Endpoint::bind(config.listen)
                    .await
                    .map_err(|e| usage_error(format!("{e:#}")))?;
                let mut client = RpcClient::new(endpoint, None, DEFAULT_MAX_MESSAGE);
                if let Some(keys) = config.session_keys() {
                    client = client.with_session_keys(keys);
                }
                SendTo::Peer(client, peer)
            }
            None => SendTo::Lookup(client(config).await?),
        };
        Ok(Sender {
            to,
            pins: config.pins.clone(),
        })
    }

    async fn request(
        &self,
        service: &str,
        payload: &str,
        timeout: Duration,
    ) -> Result<String, RpcError> {
        let pins = &self.pins;
        match &self.to {
            SendTo::Lookup(parts) => {
                parts
                    .client
                    .request_pinned(service, payload, timeout, pins)
                    .await
            }
            SendTo::Peer(client, peer) => {
                client
                    .request_peer_pinned(*peer, service, payload, timeout, pins)
                    .await
            }
        }
    }
}

/// `grenache-host call`: one request, its reply printed as compact JSON.
pub async fn call(config: CallConfig) -> ExitCode {
    let CallConfig {
        service,
        payload,
        client: client_config,
        peer,
    } = config;
    if let Err(code) = check_payload(&payload) {
        return code;
    }
    let sender = match Sender::start(&client_config, peer).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let reply = sender
        .request(&service, &payload, client_config.timeout)
        .await;
    match reply {
        Ok(reply) => match print_compact(&reply) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => usage_error(format!("the reply is not JSON: {e}")),
        },
        Err(RpcError::Remote(message)) => {
            eprintln!("error from {service}: {message}");
            ExitCode::from(EXIT_SERVICE_ERROR)
        }
        Err(e) => usage_error(format!("{service}: {e}")),
    }
}

/// `grenache-host bench`: `plan.requests` requests, `plan.concurrency` in
/// flight, then one line of figures.
pub async fn bench(config: BenchConfig) -> ExitCode {
    let BenchConfig {
        service,
        payload,
        client: client_config,
        plan,
        peer,
        echo,
    } = config;
    if let Err(code) = check_payload(&payload) {
        return code;
    }
    if plan.requests == 0 || plan.concurrency == 0 {
        return usage_error("--requests and --concurrency must be at least 1");
    }
    let sender = match Sender::start(&client_config, peer).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let timeout = client_config.timeout;
    let (sender, service, payload) = (&sender, service.as_str(), payload.as_str());
    let send_all = |count: u64| {
        futures::stream::iter(0..count)
            .map(move |_| async move {
                let started = Instant::now();
                let result = match sender.request(service, payload, timeout).await {
                    // An echo's reply is the request: its `err` is the
                    // service name, its result the payload.
                    Err(RpcError::Remote(key)) if echo && key == service => Ok(String::new()),
                    other => other,
                };
                (result, started.elapsed())
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
    print_line(format_args!(
        "requests ok={} failed={failed} rps={:.0} p50={:.3}ms p90={:.3}ms p99={:.3}ms elapsed={:.2}s",
        latencies.len(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        percentile(0.50),
        percentile(0.90),
        percentile(0.99),
        elapsed.as_secs_f64(),
    ));
    for (message, count) in &errors {
        eprintln!("bench: {count} failed: {message}");
    }
    if failed > 0 {
        ExitCode::from(EXIT_SERVICE_ERROR)
    } else {
        ExitCode::SUCCESS
    }
}
