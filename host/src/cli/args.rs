//! The command line's arguments: clap definitions only. Each command's
//! arguments become a plain config struct (see [`super`]) before any work
//! starts, so nothing below the command line knows clap.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use super::run::IntroducerPort;
use crate::discovery::grape::GrapeUrl;
use crate::discovery::DiscoveryConfig;
use crate::nat::IntroducerAddr;
use crate::plugin::Limits;
use crate::units::{parse_duration, parse_size};

/// Run Grenache microservices as sandboxed WebAssembly plugins.
///
/// A plugin is a wasm component built for wasm32-wasip2 against wit/plugin.wit.
/// Each request runs in a fresh sandboxed instance with its own memory and
/// time limits: a plugin that crashes fails that request only.
#[derive(Debug, Parser)]
#[command(name = "grenache-host", version, propagate_version = true)]
pub struct Cli {
    /// Log level: error, warn, info, debug or trace, or per target as in
    /// RUST_LOG, e.g. info,requests=debug (one line per request served).
    /// Default: warn for call and bench (their output is the answer), info
    /// for the rest. RUST_LOG, when set, wins.
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Call a plugin's handler once, locally, without any network.
    ///
    /// Prints the reply as compact JSON on one line and exits 0. A handler
    /// error is printed on stderr with exit code 1. A payload that is not JSON
    /// is refused before the plugin runs (exit code 2). Outgoing requests the
    /// plugin makes fail with "no network in this mode".
    ///
    /// Example: grenache-host invoke plugins/fibonacci.wasm fibonacci_worker '{"length":10}'
    ///
    /// Testing a tick: grenache-host invoke plugins/sensors.wasm --tick --config policy.toml --state-dir state
    Invoke {
        /// The plugin file (a wasm component, or a .cwasm from `compile`).
        plugin: PathBuf,
        /// The service to call, one the plugin serves (see `inspect`).
        #[arg(required_unless_present = "tick")]
        service: Option<String>,
        /// The request payload, as JSON; `@FILE` reads it from FILE, `-` from
        /// standard input (at most 1 MiB).
        #[arg(required_unless_present = "tick")]
        payload: Option<String>,
        /// Call the plugin's `on-tick` once instead of a handler (no service
        /// or payload then): prints nothing and exits 0, or prints its error
        /// and exits 1.
        #[arg(long, conflicts_with_all = ["service", "payload", "caller"])]
        tick: bool,
        /// The policy file `run --config` takes: the plugin's
        /// `[plugin.NAME.config]` values (and `[defaults.config]`) reach it,
        /// and its limits and state_quota apply (the flags below override
        /// them).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The caller's address the plugin sees in its request context, as if
        /// the request had come from there. Plugins built against
        /// grenache:plugin@0.2.0 do not see it.
        #[arg(long, value_name = "IP:PORT", default_value = "0.0.0.0:0")]
        caller: SocketAddr,
        /// Keep the plugin's state (grenache:plugin@0.4.0's `state`) in this
        /// directory, as `run --state-dir` does: the call reads it and, if it
        /// returns without trapping, writes it back. Without it the plugin's
        /// state calls fail as `unavailable`.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Load a plugin and print its manifest as one JSON line: its name, the
    /// contract version it was built against, the services it serves, those
    /// it wants punched when its host is behind a NAT, those it may call, and
    /// how often it asks to be ticked (milliseconds, null: never).
    ///
    /// Example: grenache-host inspect plugins/consumer.wasm prints
    ///
    /// {"calls":["fibonacci_worker"],"contract":"grenache:plugin@0.4.0","plugin":"consumer","punch":[],"serves":["fibonacci_consumer"],"tick_interval_ms":null}
    Inspect {
        /// The plugin file (a wasm component, or a .cwasm from `compile`).
        plugin: PathBuf,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Serve plugins: announce their services on the DHT (or through Grapes,
    /// with --grape) and answer Grenache requests over uTP on one UDP socket,
    /// punching through NATs.
    ///
    /// Prints `listening on <port>` once the socket is bound. On Ctrl-C or
    /// SIGTERM it drains: new requests get ERR_SHUTTING_DOWN at once, those in
    /// flight finish up to their time limit, then it exits 0 (a second signal
    /// stops it at once, dropping those, and it exits 130 after Ctrl-C, 143
    /// after SIGTERM). Under systemd (Type=notify, NOTIFY_SOCKET) it sends
    /// READY=1 once serving and announced, STOPPING=1 when draining; see
    /// examples/systemd/grenache-host.service.
    ///
    /// Example: grenache-host run plugins/fibonacci.wasm --bootstrap 127.0.0.1:20001 --behind-nat
    ///
    /// Joining Node services: grenache-host run plugins/fibonacci.wasm --grape http://127.0.0.1:30001
    Run {
        /// Plugin files (wasm components, or .cwasm files from `compile`);
        /// each serves the services in its manifest.
        #[arg(required = true)]
        plugins: Vec<PathBuf>,
        /// Address of the RPC socket (uTP and punches); port 0 picks a free
        /// port. IPv4 only, like the DHT that announces it.
        #[arg(long, default_value = "0.0.0.0:0", value_name = "IP:PORT", value_parser = ipv4_only)]
        listen: SocketAddr,
        #[command(flatten)]
        dht: BootstrapArgs,
        /// This host is behind a NAT: every second, look up each service the
        /// plugins want punched and punch every peer found, so they can reach
        /// us; and register with the introducer so that callers behind other
        /// NATs are introduced to us.
        #[arg(long)]
        behind_nat: bool,
        /// Interval of keepalive punches on paths opened through NATs, so the
        /// routers keep them while they are in use, e.g. 15s, 5s.
        #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
        keepalive: Duration,
        /// Largest RPC message (and so payload) accepted or sent.
        #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = parse_size)]
        max_payload: u64,
        /// Load only plugins signed (see `sign`) by this public key: a .pub
        /// file from `keygen` or its hex (repeatable). Without it, plugins
        /// need no signature.
        #[arg(long, value_name = "KEY", value_parser = TrustedKeyParser)]
        trusted_key: Vec<crate::plugin::signing::TrustedKey>,
        /// Swap a plugin in when its file changes (written in place or renamed
        /// over); requests in flight finish on the old version.
        #[arg(long)]
        watch: bool,
        /// Control socket for `swap`, `rollback` and `status` (owner-only);
        /// `off` for none. Default: $XDG_RUNTIME_DIR/grenache-host.sock, for
        /// root /run/grenache-host.sock, else control.sock in the state
        /// directory. Refused in a directory others can write (like /tmp).
        #[arg(long, value_name = "PATH")]
        control: Option<String>,
        /// Serve Prometheus metrics on GET http://IP:PORT/metrics (requests,
        /// errors and latency per service, plugin failures, swaps, punches,
        /// introductions, paths, uTP, memory; listed in the README), e.g.
        /// 127.0.0.1:9100. Plain HTTP, no authentication: bind a local or
        /// private address. Default: no metrics.
        #[arg(long, value_name = "IP:PORT")]
        metrics: Option<SocketAddr>,
        /// Per-plugin policy (TOML): limits, max_concurrent, may_call,
        /// may_be_punched_for, state_quota, tick_interval and each plugin's
        /// configuration values. See the README; flags below override it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Where plugins keep their state: one file per plugin, NAME.state,
        /// written atomically; it survives swaps and restarts. A host locks
        /// the files of the plugins it runs (NAME.state.lock): a second host
        /// on the same directory with the same plugin stops at start.
        /// Default: $STATE_DIRECTORY (systemd's StateDirectory=), else
        /// $XDG_STATE_HOME/grenache-host, else ~/.local/state/grenache-host.
        /// Created (owner-only) at start: it also keeps the host's identity
        /// (identity.key, see --identity); state files only for plugins that
        /// use state.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// The host's identity: an existing Ed25519 secret key file
        /// (owner-only, in a directory only its owner may write; `grenache-host
        /// id --identity FILE` or `keygen` makes one). Its public key names the
        /// host in the log, `status` and `grenache-host id`. Default:
        /// identity.key in the state directory, created at the first start.
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
        /// Plugin instances alive at once across all plugins: each request
        /// runs in one, and a request beyond them fails. The host reserves
        /// about 8 GiB of address space (not memory) per instance when it
        /// starts: lower this on a kernel with 39-bit addresses (512 GiB for
        /// a process, as on some ARM boards), e.g. 32.
        #[arg(
            long,
            value_name = "N",
            default_value_t = crate::plugin::runtime::DEFAULT_MAX_INSTANCES,
            value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::plugin::runtime::MAX_INSTANCES_LIMIT))
        )]
        max_instances: u32,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Replace a running host's plugin with a new file, without dropping requests.
    ///
    /// The host loads and checks the file first; if it fails, the old version
    /// keeps serving and the reason is printed (exit code 1).
    ///
    /// Example: grenache-host swap fibonacci plugins/fibonacci-v2.wasm
    Swap {
        /// The plugin's name (its first file name without .wasm) or a service it serves.
        target: String,
        /// The new plugin file (a wasm component or a .cwasm); a relative
        /// path is taken from this command's working directory.
        file: PathBuf,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Put back an earlier version of a plugin: by default the one that
    /// served before the current one.
    ///
    /// The host keeps the last 5 versions of each plugin (`status` lists them
    /// under "history", the most recent first). A rollback drops the versions
    /// it goes past, so a second rollback goes further back; a swap that was
    /// refused changes nothing.
    ///
    /// Example: grenache-host rollback fibonacci --to 2
    Rollback {
        /// The plugin's name or a service it serves.
        target: String,
        /// Which earlier version: entry N of `status`'s "history" (1, the
        /// default, is the version before the current one).
        #[arg(long, value_name = "N", default_value_t = 1)]
        to: usize,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Show a running host's plugins as JSON: the file and content hash
    /// serving now, services, the earlier versions kept for rollback,
    /// request and fault counts, swaps and rollbacks.
    Status {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Precompile a plugin for this host's engine (or another machine's,
    /// with --target), so that `run`, `swap` and `invoke` load it without
    /// compiling: a .cwasm file.
    ///
    /// The plugin is checked first as `run` would (a component, a contract
    /// version this host speaks, its manifest), so a bad plugin never
    /// becomes a .cwasm. A .cwasm only loads in the same grenache-host
    /// version, on the target it was made for. Sign the .cwasm (not only the
    /// .wasm) for hosts run with --trusted-key.
    ///
    /// Example: grenache-host compile plugins/fibonacci.wasm --target aarch64-unknown-linux-gnu
    Compile {
        /// The plugin component (.wasm).
        plugin: PathBuf,
        /// Where to write the precompiled plugin. Default: the plugin's path
        /// with the extension .cwasm.
        #[arg(short, long, value_name = "OUT.cwasm")]
        out: Option<PathBuf>,
        /// Compile for another machine, e.g. aarch64-unknown-linux-gnu
        /// (a Raspberry Pi 4 on 64-bit Linux). Default: this machine.
        #[arg(long, value_name = "TRIPLE")]
        target: Option<String>,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Create a key pair for signing plugins: PREFIX.secret (owner-only) and PREFIX.pub.
    ///
    /// Example: grenache-host keygen --out ops
    Keygen {
        /// Path prefix of the two key files.
        #[arg(long, default_value = "grenache-plugin-key", value_name = "PREFIX")]
        out: PathBuf,
    },
    /// Print the host's identity: the public key (64 hex digits) that names
    /// it in `run`'s log and `status`. Creates the identity if there is none
    /// yet, as `run` would.
    ///
    /// Example: grenache-host id
    Id {
        /// The identity file, as `run --identity` takes it.
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
        /// The state directory, as `run --state-dir` takes it (the identity
        /// is identity.key there).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Sign a plugin: writes the detached signature PLUGIN.sig next to it,
    /// which `run --trusted-key` checks at load.
    ///
    /// Example: grenache-host sign plugins/fibonacci.wasm --key ops.secret
    Sign {
        /// The plugin file to sign.
        plugin: PathBuf,
        /// The secret key file written by `keygen`.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// Run a DHT node that hosts bootstrap from and announce to (a BEP 5
    /// server node), with an introducer beside it for hosts behind NATs.
    ///
    /// Prints `dht listening on <ip:port>` and runs until Ctrl-C. The
    /// introducer uses the next two UDP ports (e.g. 20002 and 20003).
    /// Announced peers are kept per (service, IP, port), --peer-ttl seconds
    /// after their last announce (hosts re-announce every 30 s).
    ///
    /// Example: grenache-host dht --listen 127.0.0.1:20001
    Dht {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:20001", value_name = "IP:PORT", value_parser = ipv4_socket)]
        listen: SocketAddrV4,
        /// Other DHT nodes to join (repeatable). Without it, this node starts a new DHT.
        #[arg(long, value_name = "IP:PORT")]
        bootstrap: Vec<String>,
        /// The introducer's main port (it uses the next one too), or `off`.
        /// Default: the DHT port + 1.
        #[arg(long, value_name = "PORT|off", value_parser = parse_introducer_port)]
        introducer_port: Option<IntroducerPort>,
        /// How long an announced peer is kept after its last announce, in
        /// seconds (1 to 86400). The default keeps a host through two lost
        /// 30 s re-announces, with 15 s to spare.
        #[arg(long, value_name = "SECONDS", default_value_t = crate::discovery::server::PEER_TTL.as_secs(), value_parser = clap::value_parser!(u64).range(1..=86_400))]
        peer_ttl: u64,
        #[command(flatten)]
        relay: RelayArgs,
    },
    /// Run a Grape-compatible node: grenache-grape's HTTP API (`/announce`,
    /// `/lookup`, `/put`, `/get`) for Node services' links, on our DHT, with an
    /// introducer beside the DHT port. Node services announced through it and
    /// hosts run with `--bootstrap <its DHT port>` find each other.
    ///
    /// Prints `grape dht listening on <ip:port>` and `grape http listening on
    /// <ip:port>`, then runs until Ctrl-C. The flags are grape's own.
    ///
    /// Example: grenache-host grape --dp 20001 --aph 30001 --bn 127.0.0.1:20002
    Grape {
        /// The DHT node's UDP port (0: any free port), on all interfaces: our BEP 5 /
        /// BEP 44 node, as `dht` runs (any BEP 5 client, Node grapes included, may join).
        #[arg(long = "dp", visible_alias = "dht_port", value_name = "PORT")]
        dht_port: u16,
        /// The HTTP API's TCP port (0: any free port).
        #[arg(long = "aph", visible_alias = "api_port", value_name = "PORT")]
        api_port: u16,
        /// DHT nodes to join, comma-separated `host:port` (grapes or `grenache-host
        /// dht` nodes); empty for the first node.
        #[arg(
            long = "bn",
            visible_alias = "bootstrap",
            value_name = "HOST:PORT,…",
            default_value = "",
            hide_default_value = true
        )]
        bootstrap: String,
        /// The address the HTTP API listens on, and under which announces made
        /// through it are kept. Default: all interfaces, and each announce under
        /// its HTTP client's address.
        #[arg(short = 'b', long = "bind", value_name = "IP")]
        bind: Option<std::net::Ipv4Addr>,
        /// How long an announce lives after the last one, in milliseconds, in this
        /// grape's answers and on its DHT node (the default is grape's library
        /// default); 0: until the bounded stores need the room.
        #[arg(
            long = "dpa",
            visible_alias = "dht_peer_maxAge",
            value_name = "MS",
            default_value_t = 120_000
        )]
        peer_max_age_ms: u64,
        /// Largest request body, in bytes, at most 1 MiB (the default is grape's
        /// library default); larger ones get 413 ERR_GRAPE_PAYLOAD_SIZE.
        #[arg(long = "check_maxPayloadSize", value_name = "BYTES", default_value_t = 8192,
              value_parser = parse_max_payload)]
        max_payload: u64,
        /// The introducer's main port (it uses the next one too), or `off`.
        /// Default: the DHT port + 1.
        #[arg(long, value_name = "PORT|off", value_parser = parse_introducer_port)]
        introducer_port: Option<IntroducerPort>,
        #[command(flatten)]
        relay: RelayArgs,
        /// grenache-grape's DHT concurrency: accepted so its command lines
        /// run as written; no effect here (a warning says so).
        #[arg(long = "dc", visible_alias = "dht_concurrency", value_name = "N")]
        dht_concurrency: Option<u64>,
        /// grenache-grape's routing-table limit: accepted, no effect here (our
        /// DHT node's bounds are fixed, see the README's Security section).
        #[arg(long = "dht_maxTables", value_name = "N")]
        dht_max_tables: Option<u64>,
        /// grenache-grape's BEP 44 value limit: accepted, no effect here (our
        /// DHT node keeps 16,384 items, 1,024 per putting IP).
        #[arg(long = "dht_maxValues", value_name = "N")]
        dht_max_values: Option<u64>,
        /// grenache-grape's lookup cache age: accepted, no effect here (lookups
        /// are answered fresh).
        #[arg(long = "cache_maxAge", value_name = "MS")]
        cache_max_age: Option<u64>,
        /// grenache-grape's dead-node check interval: accepted, no effect here
        /// (silent nodes leave our DHT node's table after 15 minutes).
        #[arg(long = "dnl", visible_alias = "dht_nodeLiveness", value_name = "MS")]
        dht_node_liveness: Option<u64>,
    },
    /// Call a service once, found through the DHT or Grapes (or at --peer),
    /// and print its reply.
    ///
    /// Prints the reply as compact JSON and exits 0. A remote error prints the
    /// message and exits 1. No peers, a Grape that does not answer, a timeout
    /// or bad arguments exit 2.
    ///
    /// Example: grenache-host call fibonacci_worker '{"length":10}' --bootstrap 127.0.0.1:20001
    ///
    /// Through a Grape: grenache-host call fibonacci_worker '{"length":10}' --grape http://127.0.0.1:30001
    Call {
        #[command(flatten)]
        request: ServiceRequest,
        #[command(flatten)]
        dht: BootstrapArgs,
        #[command(flatten)]
        client: ClientArgs,
        /// Call this peer directly instead of looking the service up (no
        /// --bootstrap or --grape needed), as Grenache's request to
        /// {address, port} does. IPv4 only.
        #[arg(long, value_name = "IP:PORT", value_parser = ipv4_only)]
        peer: Option<SocketAddr>,
    },
    /// Load-test a service: N requests, C in flight, then one line of figures.
    ///
    /// Prints requests ok, failed, requests/s and p50/p90/p99 latency after a
    /// warm-up. Exits 1 if any request of the run failed, 2 if the warm-up
    /// failed (nothing to measure).
    ///
    /// Example: grenache-host bench fibonacci_worker '{"length":10}' --bootstrap 127.0.0.1:20001 --requests 10000 --concurrency 32
    Bench {
        #[command(flatten)]
        request: ServiceRequest,
        #[command(flatten)]
        dht: BootstrapArgs,
        #[command(flatten)]
        client: ClientArgs,
        /// Requests to send (after the warm-up).
        #[arg(long, default_value_t = 1000)]
        requests: u64,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Warm-up requests, not counted.
        #[arg(long, default_value_t = 20)]
        warmup: u64,
        /// Send to this peer directly instead of looking the service up (no
        /// --bootstrap or --grape needed), as `call --peer` does. IPv4 only.
        #[arg(long, value_name = "IP:PORT", value_parser = ipv4_only)]
        peer: Option<SocketAddr>,
        /// The peer echoes each request back unchanged (a transport floor,
        /// e.g. `node tests/node/peer.js echo`): count a reply that is the
        /// request itself as answered. Needs --peer.
        #[arg(long, requires = "peer")]
        echo: bool,
    },
}

/// Where to reach a running host's control socket.
#[derive(Debug, Clone, Args)]
pub struct ControlArgs {
    /// The host's control socket (as given to `run --control`).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

/// The request a client sends.
#[derive(Debug, Clone, Args)]
pub struct ServiceRequest {
    /// The service name.
    pub service: String,
    /// The request payload, as JSON; `@FILE` reads it from FILE, `-` from
    /// standard input (at most 1 MiB), e.g. @request.json.
    pub payload: String,
}

/// Where services are announced and looked up: the embedded DHT (joined
/// through --bootstrap) or Grapes (--grape), and the introducer.
#[derive(Debug, Clone, Args)]
pub struct BootstrapArgs {
    /// A DHT node to join through, e.g. one started with `grenache-host dht`
    /// (repeatable; a host name is resolved at start). The public
    /// BitTorrent network is never contacted.
    #[arg(long, value_name = "HOST:PORT")]
    pub bootstrap: Vec<String>,
    /// A Grape's HTTP API, e.g. http://127.0.0.1:30001 for `grape --aph
    /// 30001` (repeatable): announce and look up through Grapes as
    /// Grenache's Node services do (grenache-nodejs-link), instead of the
    /// embedded DHT, so this host and Node services find each other.
    /// `run` announces to every Grape; a lookup takes the first Grape's
    /// answer with peers. Use a Grape on this host's machine: a Grape records its
    /// own IP with the announced port. Not with --bootstrap; introductions
    /// then need --introducer.
    #[arg(long, value_name = "URL", conflicts_with = "bootstrap")]
    pub grape: Vec<GrapeUrl>,
    /// The introducer that puts this host in touch with peers behind NATs
    /// (its main port; the probe uses the next one too), or `off`. Default:
    /// beside the first --bootstrap node (its port + 1), where `grenache-host
    /// dht` runs one. With --grape there is no bootstrap node to find one
    /// beside: without this flag there are no introductions.
    #[arg(long, value_name = "IP:PORT|off")]
    pub introducer: Option<String>,
}

impl BootstrapArgs {
    /// The directory these flags name: Grapes if any was given, else the
    /// DHT (clap has made sure not both).
    pub fn discovery(&self) -> DiscoveryConfig {
        if self.grape.is_empty() {
            DiscoveryConfig::Dht {
                bootstrap: self.bootstrap.clone(),
            }
        } else {
            DiscoveryConfig::Grapes(self.grape.clone())
        }
    }

    /// Where the introducer is, if anywhere.
    pub fn introducer(&self) -> Result<Option<IntroducerAddr>, String> {
        match self.introducer.as_deref() {
            Some("off") => Ok(None),
            Some(addr) => {
                let main: SocketAddr = addr.parse().map_err(|_| {
                    format!("--introducer {addr:?} is not an IP:PORT address (or `off`)")
                })?;
                let alt = main.port().checked_add(1).ok_or_else(|| {
                    format!("--introducer {addr}: the probe needs the next port too")
                })?;
                Ok(Some(IntroducerAddr {
                    main,
                    alt: SocketAddr::new(main.ip(), alt),
                }))
            }
            None => {
                use std::net::ToSocketAddrs;
                let Some(first) = self.bootstrap.first() else {
                    return Ok(None);
                };
                let dht = first
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.find(SocketAddr::is_ipv4));
                Ok(dht.and_then(IntroducerAddr::beside_dht))
            }
        }
    }
}

/// Options of the one-shot clients.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Deadline of each request, lookup and connect included.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// Address of the client's socket. IPv4 only.
    #[arg(long, default_value = "0.0.0.0:0", value_name = "IP:PORT", value_parser = ipv4_only)]
    pub listen: SocketAddr,
    /// Only a host proving this identity may answer (repeatable: any of
    /// them): 64 hex digits as `grenache-host id` prints them, or a .pub
    /// file as `keygen` writes. Peers that are not grenache-hosts (plaintext
    /// Grenache, e.g. Node) or prove another key are skipped, and the error
    /// names the key they proved. Without it any peer may answer.
    #[arg(long = "peer-key", value_name = "KEY", value_parser = TrustedKeyParser)]
    pub peer_key: Vec<crate::plugin::signing::TrustedKey>,
    /// Speak plaintext Grenache to every peer, as a Node client does, even
    /// to grenache-hosts (which otherwise get an encrypted session); for
    /// comparing figures. Not with --peer-key.
    #[arg(long, conflicts_with = "peer_key")]
    pub plaintext: bool,
}

/// Per-request sandbox limits.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Memory one request may use, e.g. 64MiB, 512KiB, 1GiB; at most 4GiB
    /// [default: 64MiB, or the policy's]. Overrides the policy file for
    /// every plugin.
    #[arg(long, value_name = "SIZE", value_parser = checked(crate::plugin::policy::parse_memory_limit))]
    pub memory_limit: Option<String>,
    /// Wall time one request may take, host calls included, e.g. 5s, 250ms
    /// [default: 5s, or the policy's]. Overrides the policy file.
    #[arg(long, value_name = "DURATION", value_parser = checked(parse_duration))]
    pub time_limit: Option<String>,
    /// Largest reply a plugin may return, e.g. 1MiB [default: 1MiB, or the
    /// policy's]. Overrides the policy file.
    #[arg(long, value_name = "SIZE", value_parser = checked(parse_size))]
    pub max_reply: Option<String>,
}

/// A value parser that checks the text with `parse` but keeps it as given,
/// so the policy file and the command line go through one code path.
fn checked<T>(
    parse: fn(&str) -> Result<T, String>,
) -> impl Fn(&str) -> Result<String, String> + Clone {
    move |text| parse(text).map(|_| text.to_string())
}

impl LimitArgs {
    /// The limits as policy overrides.
    pub(crate) fn overrides(&self) -> crate::plugin::policy::PolicyEntry {
        crate::plugin::policy::PolicyEntry {
            memory_limit: self.memory_limit.clone(),
            time_limit: self.time_limit.clone(),
            max_reply: self.max_reply.clone(),
            ..Default::default()
        }
    }

    /// The limits with no policy file: the defaults and these flags.
    pub(crate) fn limits(&self) -> Limits {
        crate::plugin::policy::Policies {
            file: Default::default(),
            overrides: self.overrides(),
        }
        .for_plugin("")
        .expect("flags were checked by the parser")
        .limits
    }
}

/// The introducer's relay quotas (`dht`, `grape`): the relay carries uTP
/// sessions between two registered hosts behind NATs that no direct path
/// joins (docs/wire.md §5.5).
#[derive(Debug, Clone, clap::Args)]
pub struct RelayArgs {
    /// Most relayed sessions one host may take part in (at least 1; turn
    /// the relay off with --relay-sessions 0). A caller over it, or over
    /// the worker's, is told which quota refused it.
    #[arg(long, value_name = "N", default_value_t = crate::nat::relay::SESSIONS_PER_HOST,
          value_parser = parse_sessions_per_host)]
    pub relay_sessions_per_host: usize,
    /// Most relayed sessions at once in all; 0 turns the relay off.
    #[arg(long, value_name = "N", default_value_t = crate::nat::relay::SESSIONS)]
    pub relay_sessions: usize,
    /// Bytes per second one host may send through the relay (bursts of 4×
    /// that; units as for --relay-rate); frames over it are dropped and
    /// uTP backs off.
    #[arg(long, value_name = "BYTES", default_value = "256KiB", value_parser = parse_rate)]
    pub relay_host_rate: u32,
    /// Bytes per second the relay forwards in all, with bursts of one
    /// second's worth, e.g. 8MiB (a bare number is bytes; K, M, G are
    /// powers of 1024, with or without iB/B, any case).
    #[arg(long, value_name = "BYTES", default_value = "8MiB", value_parser = parse_rate)]
    pub relay_rate: u32,
    /// Serve the relay's Prometheus metrics on GET http://IP:PORT/metrics
    /// (sessions, frames and bytes forwarded, frames dropped by reason;
    /// listed in the README), e.g. 127.0.0.1:9101. Plain HTTP, no
    /// authentication: bind a local or private address. Default: none.
    #[arg(long, value_name = "IP:PORT")]
    pub metrics: Option<SocketAddr>,
}

impl RelayArgs {
    /// The quotas these flags give.
    pub fn limits(&self) -> crate::nat::relay::RelayLimits {
        crate::nat::relay::RelayLimits {
            sessions_per_host: self.relay_sessions_per_host,
            sessions: self.relay_sessions,
            host_bytes_per_second: self.relay_host_rate,
            host_burst_bytes: self.relay_host_rate.saturating_mul(4),
            ..crate::nat::relay::RelayLimits::default()
        }
        .with_total_rate(self.relay_rate, self.relay_rate)
    }
}

/// Parses `--relay-sessions-per-host`: at least 1.
fn parse_sessions_per_host(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("0 would refuse every relayed session; give at least 1, or turn the relay off with --relay-sessions 0".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{text}` is not a number of sessions")),
    }
}

/// Parses a byte rate such as `256KiB` (per second), at most 4 GiB.
fn parse_rate(text: &str) -> Result<u32, String> {
    let bytes = crate::units::parse_size(text)?;
    u32::try_from(bytes).map_err(|_| format!("{text:?} is over the most, 4095MiB"))
}

/// Parses `dht --introducer-port`: a port number or `off`.
/// Most `--check_maxPayloadSize` allows.
const MAX_PAYLOAD_LIMIT: u64 = 1 << 20;

fn parse_max_payload(text: &str) -> Result<u64, String> {
    let bytes: u64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number of bytes"))?;
    match bytes {
        0 => Err("0 would refuse every request with 413; give at least 1 (default 8192)".into()),
        _ if bytes > MAX_PAYLOAD_LIMIT => Err(format!(
            "{bytes} is over the limit of {MAX_PAYLOAD_LIMIT} (1 MiB)"
        )),
        _ => Ok(bytes),
    }
}

fn parse_introducer_port(text: &str) -> Result<IntroducerPort, String> {
    match text {
        "off" => Ok(IntroducerPort::Off),
        _ => match text.parse::<u16>() {
            Ok(p) if p > 0 && p < u16::MAX => Ok(IntroducerPort::Port(p)),
            _ => Err(format!("{text:?} is not a port number (1-65534) or `off`")),
        },
    }
}

/// Parses an `IP:PORT` that must be IPv4, with the reason when it is not.
///
/// The host's peers are found through the DHT (BEP 5, IPv4 in the mainline
/// crate) and the introducer, which carry IPv4 addresses only: a host bound
/// to an IPv6 address would be announced at an IPv4 address where nothing
/// listens (issue 12). Refusing at start says so instead.
pub fn ipv4_socket(text: &str) -> Result<SocketAddrV4, String> {
    match text.parse::<SocketAddr>() {
        Ok(SocketAddr::V4(addr)) => Ok(addr),
        Ok(SocketAddr::V6(addr)) => Err(format!(
            "{text} is IPv6; grenache-host speaks IPv4 only for now: its DHT (BEP 5 as the mainline crate implements it) and introducer carry IPv4 addresses only, so a host on IPv6 would be announced where nothing listens; use an IPv4 address, e.g. 127.0.0.1:{}",
            addr.port()
        )),
        Err(_) => Err(format!("{text:?} is not IP:PORT, e.g. 127.0.0.1:20001")),
    }
}

/// [`ipv4_socket`], as a [`SocketAddr`].
pub fn ipv4_only(text: &str) -> Result<SocketAddr, String> {
    ipv4_socket(text).map(SocketAddr::V4)
}

/// `--trusted-key`'s parser. clap's error for a value its parser refuses
/// quotes the value, which may be a secret key pasted by mistake; this one
/// names the option and says what is wrong, never what was given.
#[derive(Clone)]
struct TrustedKeyParser;

impl clap::builder::TypedValueParser for TrustedKeyParser {
    type Value = crate::plugin::signing::TrustedKey;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Self::Value, clap::Error> {
        let fail = |why: String| {
            let option = arg.map_or_else(|| "--trusted-key".to_string(), ToString::to_string);
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for '{option}': {why}\n"),
            )
            .with_cmd(cmd)
        };
        let text = value
            .to_str()
            .ok_or_else(|| fail("not UTF-8 text".to_string()))?;
        crate::plugin::signing::parse_trusted_key(text).map_err(fail)
    }
}
