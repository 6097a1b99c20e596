//! The per-request side of the runtime: what lives in each `Store` and how
//! the plugin's imports (`host.request`, `host.request-peer`, `host.punch`,
//! `host.log`, and since 0.4.0 `state` and `config`) are served, for every
//! contract version in [`contract`](super::contract): each version's `Host`
//! trait is a thin translation to the same methods.
//!
//! A fresh [`RequestState`] is built for every call into a plugin, so nothing
//! a plugin does survives its request but the writes of its state
//! [`Transaction`], which the runtime commits when the call returned without
//! trapping; a trap poisons only that store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{v0_2, v0_3, v0_4};
use super::network::{punch_target, OutboundError, PluginNetwork};
use super::output::CapturedOutput;
use super::state::{StateError, Transaction};

use v0_4::grenache::plugin::types::Level;

/// Tables in a component are small; this is far above what a Rust plugin
/// uses and only stops a runaway `table.grow`.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// Everything one request's `Store` holds.
pub struct RequestState {
    wasi: WasiCtx,
    table: ResourceTable,
    /// Name of the plugin, for log lines.
    pub(crate) plugin: Arc<str>,
    network: Arc<dyn PluginNetwork>,
    /// Wall-clock instant at which the request must have finished.
    pub(crate) deadline: Instant,
    /// Set when the epoch callback stopped the plugin for running too long.
    pub(crate) timed_out: bool,
    memory_limit: usize,
    /// Set to the size asked for when the plugin tried to grow past its limit.
    pub(crate) memory_refused: Option<usize>,
    pub(crate) output: CapturedOutput,
    /// This call's reads and writes of the plugin's state.
    pub(crate) state: Transaction,
    /// The plugin's configuration values (the policy's `config`).
    config: Arc<BTreeMap<String, String>>,
}

impl RequestState {
    pub(crate) fn new(
        plugin: Arc<str>,
        network: Arc<dyn PluginNetwork>,
        deadline: Instant,
        memory_limit: usize,
        state: Transaction,
        config: Arc<BTreeMap<String, String>>,
    ) -> Self {
        let output = CapturedOutput::default();
        // No preopened directories, no environment, no arguments, no sockets:
        // the plugin reaches the world only through the `host` interface.
        let wasi = WasiCtx::builder()
            .stdout(output.clone())
            .stderr(output.clone())
            .build();
        RequestState {
            wasi,
            table: ResourceTable::new(),
            plugin,
            network,
            deadline,
            timed_out: false,
            memory_limit,
            memory_refused: None,
            output,
            state,
            config,
        }
    }

    /// The time a host call may take: the plugin's own timeout, cut to what
    /// is left of this request's budget.
    fn host_call_timeout(&self, timeout_ms: u32) -> Duration {
        let asked = Duration::from_millis(u64::from(timeout_ms));
        asked.min(self.deadline.saturating_duration_since(Instant::now()))
    }
}

impl WasiView for RequestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl ResourceLimiter for RequestState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.memory_refused = Some(desired);
            wasmtime::bail!("memory limit of {} bytes exceeded", self.memory_limit);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

impl RequestState {
    /// `host.request`, whatever the contract version.
    async fn request(
        &mut self,
        service: String,
        payload: String,
        timeout_ms: u32,
    ) -> Result<String, OutboundError> {
        let timeout = self.host_call_timeout(timeout_ms);
        self.network.request(service, payload, timeout).await
    }

    /// `host.request-peer`, whatever the contract version.
    async fn request_peer(
        &mut self,
        peer: String,
        service: String,
        payload: String,
        timeout_ms: u32,
    ) -> Result<String, OutboundError> {
        let timeout = self.host_call_timeout(timeout_ms);
        self.network
            .request_peer(peer, service, payload, timeout)
            .await
    }

    /// `host.punch`, whatever the contract version.
    async fn punch(&mut self, peer: String) -> Result<(), String> {
        let addr = punch_target(&peer)?;
        self.network.punch(addr).await
    }

    /// `host.log`, whatever the contract version.
    fn log(&self, level: Level, message: &str) {
        let plugin = &*self.plugin;
        match level {
            Level::Trace => tracing::trace!(target: "plugin", "[{plugin}] {message}"),
            Level::Debug => tracing::debug!(target: "plugin", "[{plugin}] {message}"),
            Level::Info => tracing::info!(target: "plugin", "[{plugin}] {message}"),
            Level::Warn => tracing::warn!(target: "plugin", "[{plugin}] {message}"),
            Level::Error => tracing::error!(target: "plugin", "[{plugin}] {message}"),
        }
    }
}

/// Serves one contract version's imports with the methods above: its `host`
/// interface, and its `types` interface, which has no functions. Each version
/// has its own generated types, so each gets its own impls; the logic is one.
/// `$added` are the `host` functions of versions that have more.
macro_rules! host_imports {
    ($version:ident $(, $($added:tt)*)?) => {
        impl From<OutboundError> for $version::grenache::plugin::types::RequestError {
            fn from(e: OutboundError) -> Self {
                use $version::grenache::plugin::types::RequestError;
                match e {
                    OutboundError::NoPeers(m) => RequestError::NoPeers(m),
                    OutboundError::Timeout(m) => RequestError::Timeout(m),
                    OutboundError::Remote(m) => RequestError::Remote(m),
                    OutboundError::Transport(m) => RequestError::Transport(m),
                    OutboundError::Denied(m) => RequestError::Denied(m),
                }
            }
        }

        impl $version::grenache::plugin::types::Host for RequestState {}

        impl $version::grenache::plugin::host::Host for RequestState {
            async fn request(
                &mut self,
                service: String,
                payload: String,
                timeout_ms: u32,
            ) -> Result<String, $version::grenache::plugin::types::RequestError> {
                RequestState::request(self, service, payload, timeout_ms)
                    .await
                    .map_err(Into::into)
            }

            async fn request_peer(
                &mut self,
                peer: String,
                service: String,
                payload: String,
                timeout_ms: u32,
            ) -> Result<String, $version::grenache::plugin::types::RequestError> {
                RequestState::request_peer(self, peer, service, payload, timeout_ms)
                    .await
                    .map_err(Into::into)
            }

            async fn log(
                &mut self,
                level: $version::grenache::plugin::types::Level,
                message: String,
            ) {
                RequestState::log(self, level.into(), &message);
            }

            $($($added)*)?
        }
    };
}

host_imports!(
    v0_4,
    async fn punch(&mut self, peer: String) -> Result<(), String> {
        RequestState::punch(self, peer).await
    }
);
host_imports!(v0_3);
host_imports!(v0_2);

/// An older version's log level as the current one.
macro_rules! level_from {
    ($version:ident) => {
        impl From<$version::grenache::plugin::types::Level> for Level {
            fn from(level: $version::grenache::plugin::types::Level) -> Self {
                use $version::grenache::plugin::types::Level as Old;
                match level {
                    Old::Trace => Level::Trace,
                    Old::Debug => Level::Debug,
                    Old::Info => Level::Info,
                    Old::Warn => Level::Warn,
                    Old::Error => Level::Error,
                }
            }
        }
    };
}
level_from!(v0_3);
level_from!(v0_2);

// What 0.4.0 added: `host.punch`, `state` and `config`.

impl From<StateError> for v0_4::grenache::plugin::state::StateError {
    fn from(e: StateError) -> Self {
        use v0_4::grenache::plugin::state::StateError as Wit;
        match e {
            StateError::QuotaExceeded(m) => Wit::QuotaExceeded(m),
            StateError::Invalid(m) => Wit::Invalid(m),
            StateError::Unavailable(m) => Wit::Unavailable(m),
        }
    }
}

impl v0_4::grenache::plugin::state::Host for RequestState {
    async fn get(
        &mut self,
        key: String,
    ) -> Result<Option<Vec<u8>>, v0_4::grenache::plugin::state::StateError> {
        self.state.get(&key).map_err(Into::into)
    }

    async fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), v0_4::grenache::plugin::state::StateError> {
        self.state.set(&key, value).map_err(Into::into)
    }

    async fn delete(
        &mut self,
        key: String,
    ) -> Result<(), v0_4::grenache::plugin::state::StateError> {
        self.state.delete(&key).map_err(Into::into)
    }

    async fn list_keys(
        &mut self,
        prefix: String,
    ) -> Result<Vec<String>, v0_4::grenache::plugin::state::StateError> {
        self.state.list_keys(&prefix).map_err(Into::into)
    }
}

impl v0_4::grenache::plugin::config::Host for RequestState {
    async fn get(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }

    async fn get_all(&mut self) -> Vec<(String, String)> {
        self.config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}
