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

pub mod instance;
pub mod network;
pub mod output;
pub mod runtime;

pub use network::{NoNetwork, OutboundCall, OutboundError, PluginNetwork};
pub use runtime::{plugin_name, CallError, Limits, LoadError, LoadedPlugin, Runtime};
