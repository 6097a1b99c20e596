//! grenache-host runs Grenache microservices as sandboxed WebAssembly
//! plugins. The native host owns the network; plugins only see JSON payloads.
//!
//! # Layout
//!
//! - [`plugin`]: the wasm runtime. One engine, one pre-instantiated component
//!   per plugin, a fresh store per request with memory and time limits; a
//!   plugin that traps, loops or runs out of memory fails one request only.
//! - [`cli`]: the `grenache-host` command line: argument parsing, logging
//!   set-up and each subcommand.
//!
//! The contract between host and plugins is the WIT package in `wit/`.

pub mod cli;
pub mod plugin;
