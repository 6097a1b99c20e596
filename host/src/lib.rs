//! grenache-host runs Grenache microservices as sandboxed WebAssembly
//! plugins. The native host owns the network; plugins only see JSON payloads.
//!
//! # Layout
//!
//! Dependencies run one way, down this list: the command line wires a node,
//! the node wires the parts, and the parts sit on the transport.
//!
//! - [`cli`]: the `grenache-host` command line, the only part that knows
//!   clap: arguments, then one module per kind of command (serving, clients,
//!   admin, local), each taking a plain config struct.
//! - [`grape`]: `grenache-host grape`, a node serving grenache-grape's HTTP
//!   API (for Node services' links) from the embedded DHT.
//! - [`node`]: a running host: wires the transport, discovery, NAT traversal,
//!   RPC and plugins together, owns every task it starts, adapts the network
//!   for plugins, and serves the local control socket and the Prometheus
//!   metrics of `run --metrics`.
//! - [`rpc`]: Grenache RPC: the envelope codec, the table of pending
//!   requests, the client (one uTP connection per peer, deadlines) and the
//!   server (hands each request to the node's services).
//! - [`nat`]: NAT traversal: Grenache's punching and our introductions, one
//!   file per concept (wire messages, NAT kinds, the introducer's side, a
//!   host's side), each sans-IO state machine beside the tokio driver that
//!   runs it.
//! - [`discovery`]: finding services behind one trait; the embedded DHT
//!   backend (service key = SHA-1 of its name) and the Grape link (Grenache
//!   Grapes' HTTP API, key = the raw name), with the lookup cache they
//!   share; and `dht`'s own BEP 5 storage node (`discovery::server`, a
//!   sans-IO state machine and its tokio driver).
//! - [`plugin`]: the wasm runtime (one engine, a fresh sandboxed instance per
//!   request, every contract version bound), the plugin set and its router with swap, rollback
//!   and ticks, each plugin's key-value state on disk, the operator's policy and limits, and
//!   plugin signatures.
//! - [`transport`]: the host's one UDP socket and its demultiplexer (uTP,
//!   punches, introduction datagrams); its task feeds [`utp`] and sends
//!   what it returns.
//! - [`utp`]: our own uTP (BEP 29 with libutp's conventions): the packet
//!   codec, a sans-IO connection and socket (routing, bounds, timers), and
//!   the stream types; each message starts a new packet, up to 1382 bytes in
//!   one (what Node's Grenache reads).
//! - [`http`]: what the two plain HTTP servers (the grape's API, the
//!   metrics endpoint) share: the hyper connection builder and accepting.
//! - [`units`]: sizes and durations as people write them.
//!
//! The contract between host and plugins is the WIT package in `wit/`
//! (`grenache:plugin@0.4.0`, with the frozen 0.3.0 and 0.2.0 in `wit/v0.3/` and
//! `wit/v0.2/`, which the host still speaks); the wire formats are described in
//! `docs/wire.md`.

// Every command's stdout goes through `cli::output::print_line`, which ends
// quietly when the reader has gone; `println!` would panic there.
#![warn(clippy::print_stdout)]

pub mod cli;
pub mod discovery;
pub mod grape;
pub mod http;
pub mod nat;
pub mod node;
pub mod plugin;
pub mod rpc;
#[cfg(test)]
mod test_vectors;
pub mod transport;
pub mod units;
pub mod utp;
