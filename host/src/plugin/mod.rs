//! Plugins: Grenache services written as wasm components against
//! `wit/plugin.wit`, the set of them a host runs, and the operator's rules for
//! them. Each call into a plugin runs in a fresh sandboxed instance with its
//! own memory and time limits.
//!
//! This layer sits under `node`, which wires it to the network, and beside
//! `rpc`, `nat` and `discovery`; it imports none of them (nor `cli`), only the
//! leaf [`units`](crate::units). The one seam upward is [`PluginNetwork`]: the
//! node implements it to carry a plugin's outgoing calls. From the top down:
//!
//! - [`set`]: the plugins a host runs, one slot per file, the router from a
//!   service key to the plugin version that answers it, and swap, rollback
//!   and file watching while requests flow.
//! - [`runtime`]: the shared engine, loading and type-checking a file, and
//!   calling a plugin: per-call limits, the wall-clock cap, and turning
//!   whatever went wrong into a [`CallError`].
//! - [`compiler`]: compiling components with Cranelift, which a gateway
//!   build (without the `compiler` feature) leaves out; the one place that
//!   decides what happens then.
//! - [`contract`]: the WIT contract versions the host speaks (0.4.0 and the
//!   frozen 0.3.0 and 0.2.0), detecting which one a component was built
//!   against, and calling its exports the way that version defines them; the
//!   [`RequestContext`] that `handle` receives since 0.3.0.
//! - [`instance`]: what one call's `Store` holds and how the plugin's imports
//!   are served.
//! - [`state`]: each plugin's key-value state on disk, and the transaction
//!   each call reads and writes it through.
//! - [`network`]: the seam between a plugin's outgoing calls and punches and
//!   the host's network (or its absence, for `invoke`), and the punch budget.
//! - [`output`]: capture of a plugin's stdout/stderr.
//! - [`policy`]: the operator's per-plugin policy (TOML plus flags), the
//!   per-call [`Limits`] and their defaults.
//! - [`signing`]: Ed25519 signatures on plugin files, checked at load.

pub mod bindings;
pub mod compiler;
pub mod contract;
pub mod instance;
pub mod network;
pub mod output;
pub mod policy;
pub mod runtime;
pub mod set;
pub mod signing;
pub mod state;

pub use contract::{ContractVersion, RequestContext};
pub use network::{NoNetwork, OutboundCall, OutboundError, PluginNetwork, PunchCall};
pub use policy::Limits;
pub use runtime::{check_json, plugin_name, CallError, LoadError, LoadedPlugin, Runtime};
