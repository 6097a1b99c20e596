//! The plugin runtime: loads service plugins (wasm components written against
//! `wit/plugin.wit`) and calls them, each call in a fresh sandboxed instance
//! with its own memory and time limits.
//!
//! - [`runtime`]: the shared engine, loading and type-checking, per-call
//!   limits and error classification.
//! - [`instance`]: what one call's `Store` holds and how the plugin's imports
//!   are served.
//! - [`network`]: the seam between a plugin's outgoing calls and the host's
//!   network (or its absence, for `invoke`).
//! - [`output`]: capture of a plugin's stdout/stderr.
//! - [`set`]: the plugins a host runs, in slots that can be swapped and
//!   rolled back while requests flow, and the router from service to plugin.
//! - [`policy`]: the operator's per-plugin policy and limits (TOML plus flags).
//! - [`signing`]: Ed25519 signatures on plugin files, checked at load.

pub mod instance;
pub mod network;
pub mod output;
pub mod policy;
pub mod runtime;
pub mod set;
pub mod signing;

pub use network::{NoNetwork, OutboundCall, OutboundError, PluginNetwork};
pub use policy::Limits;
pub use runtime::{check_json, plugin_name, CallError, LoadError, LoadedPlugin, Runtime};
