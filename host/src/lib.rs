//! grenache-host runs Grenache microservices as sandboxed WebAssembly
//! plugins. The native host owns the network; plugins only see JSON payloads.
//!
//! # Layout
//!
//! - [`plugin`]: the wasm runtime. One engine, one pre-instantiated component
//!   per plugin, a fresh store per request with memory and time limits; a
//!   plugin that traps, loops or runs out of memory fails one request only.
//! - [`rpc`]: Grenache RPC: the envelope codec, the client (one uTP
//!   connection per peer, deadlines) and the server (routes by key to plugins).
//! - [`transport`]: the host's one UDP socket, shared by uTP, punches and
//!   introductions.
//! - [`punch`]: hole punching as a sans-IO state machine.
//! - [`introduction`]: how two hosts behind NATs get a direct path (NAT
//!   probe, registration, introduction, simultaneous punching, keepalive),
//!   as sans-IO state machines; [`introducer`] runs them on sockets.
//! - [`discovery`]: the embedded DHT node; service key = SHA-1 of its name.
//! - [`swap`]: the plugins a host runs, in slots that can be swapped and
//!   rolled back while requests flow; `--watch` and per-plugin status.
//! - [`policy`]: the operator's per-plugin policy (TOML plus flags).
//! - [`signing`]: Ed25519 signatures on plugin files, checked at load.
//! - [`control`]: the local control socket behind `swap`, `rollback`, `status`.
//! - [`node`]: wires the parts together for `run`.
//! - [`cli`] and [`commands`]: the `grenache-host` command line: argument
//!   parsing, logging set-up and each subcommand.
//!
//! The contract between host and plugins is the WIT package in `wit/`.

pub mod cli;
pub mod commands;
pub mod control;
pub mod discovery;
pub mod introducer;
pub mod introduction;
pub mod node;
pub mod plugin;
pub mod policy;
pub mod punch;
pub mod rpc;
pub mod signing;
pub mod swap;
pub mod transport;
