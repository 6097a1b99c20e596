//! The plugin runtime: one wasmtime [`Engine`] shared by every plugin, and a
//! [`LoadedPlugin`] per component file, pre-instantiated once and
//! instantiated afresh in its own `Store` for every call.
//!
//! Loading reads the file once, checks its signature when the runtime
//! requires one ([`signing`](super::signing)), compiles it ([`compiler`],
//! absent from a gateway build) or, for a `.cwasm` from `grenache-host
//! compile`, told apart by its header, deserializes it
//! ([`Runtime::precompile`] makes those with the same engine configuration,
//! for this machine or another target), type-checks it against the `plugin`
//! world of each contract version the host speaks ([`contract`]: 0.4.0,
//! 0.3.0, then 0.2.0), and reads its manifest; each way that fails is a
//! [`LoadError`].
//!
//! Every call (`manifest`, `handle`, `on-punch`, `on-tick`) goes the same
//! way, whatever the plugin's contract version: a new store with the limits
//! of the plugin's [`PluginPolicy`] and a state [`Transaction`],
//! instantiation, the export, all under a wall-clock cap; then the plugin's
//! output is logged, and the transaction committed if the call returned
//! without trapping. A plugin built against 0.4.0 or later gets its state
//! from the runtime's [`StateDir`] (`run --state-dir`), opened at load.
//! Memory is bounded by a [`wasmtime::ResourceLimiter`] on the store, wall
//! time by epoch interruption (an OS thread ticks the engine's epoch; the
//! store's deadline callback yields to tokio on each tick and stops the
//! plugin once the deadline has passed). Whatever goes wrong in a call (trap,
//! panic, timeout, memory) becomes a [`CallError`] for that call only: its
//! store is dropped and the next call starts clean.
//!
//! How it fits: the plugin set loads and swaps through a [`Runtime`]; the
//! node calls [`LoadedPlugin::handle_with`] for each request routed to it,
//! with the caller's address in its [`RequestContext`], and
//! [`LoadedPlugin::on_punch`] when a peer punches this host. A plugin's
//! outgoing calls leave through the [`PluginNetwork`] it was loaded with,
//! narrowed to what its manifest and policy allow.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, Linker};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Precompiled,
    Store, Trap, UpdateDeadline,
};

use super::compiler::{self, NoCompiler};
use super::contract::{
    self, ContractInstance, ContractPre, ContractVersion, Manifest, RequestContext,
};
use super::instance::RequestState;
use super::network::{AllowedCalls, PluginNetwork, PunchBudgets};
use super::policy::{Limits, PluginPolicy, TickPolicy, MIN_TICK_INTERVAL};
use super::signing::TrustedKey;
use super::state::{OpenError, PluginState, StateDir, Transaction};
use crate::units::format_size;

/// How often the engine's epoch advances; the granularity of time limits.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Component instances that may be alive at once across all plugins, by
/// default (`run --max-instances`): each request runs in one. The engine
/// reserves the address space of all of them when it starts, about 8 GiB
/// each (two 4 GiB memory slots with their guard pages; wasmtime 48's
/// defaults on 64-bit targets), so 256 take about 2 TiB: a small part of the
/// 128 TiB that Linux gives a process with 48-bit addresses, too much for a
/// kernel built with 39-bit ones (512 GiB), as on some ARM boards.
pub const DEFAULT_MAX_INSTANCES: u32 = 256;
/// The most `--max-instances` accepts (about 32 TiB of address space).
pub const MAX_INSTANCES_LIMIT: u32 = 4096;
/// Instances for a one-shot command (`invoke`, `inspect`, `compile`), which
/// runs one call at a time.
pub const ONE_SHOT_INSTANCES: u32 = 1;
/// A Rust wasip2 component uses three core instances; leave headroom.
const CORE_INSTANCES_PER_COMPONENT: u32 = 4;
/// Bytes of each linear memory the pool resets in place (copying back the
/// original contents of the pages a request dirtied) instead of handing
/// them back to the kernel, when Linux's `PAGEMAP_SCAN` (6.7+) can tell
/// which pages those are. Small requests dirty far less (the top of the
/// stack, a little heap); what a request dirties beyond this is released
/// with `madvise` as before.
/// Without it each request paid page faults on the next use and a
/// cross-CPU TLB flush per `madvise`: 36 µs of host CPU per request at 8
/// in flight, 2.1× Node's (`cargo xtask bench`, BENCHMARKS.md).
const KEEP_RESIDENT_MEMORY: usize = 1 << 20;
/// The same for each table (a few KiB for a Rust component).
const KEEP_RESIDENT_TABLE: usize = 64 << 10;

/// Why a plugin file could not be loaded. Each message is one line naming the
/// file, the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file does not exist.
    #[error(
        "cannot load {path}: file not found; {}",
        if *bundled { "build the bundled plugins with `cargo xtask plugins`" } else { "check the path" }
    )]
    NotFound {
        path: PathBuf,
        /// The path is in this repository's `plugins/`, where `cargo xtask
        /// plugins` writes the bundled plugins.
        bundled: bool,
    },
    /// The path is a directory (a plugin's source crate, say).
    #[error("cannot load {path}: is a directory, not a plugin file; pass the plugin's .wasm file")]
    Directory { path: PathBuf },
    /// The file could not be read, or the policy asks for more memory than
    /// the engine was built for.
    #[error("cannot load {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    /// The file is neither wasm (its magic number) nor precompiled.
    #[error("cannot load {path}: not a WebAssembly file (it does not start with `\\0asm`) nor a precompiled plugin; pass a component built with `cargo build --target wasm32-wasip2`, or a .cwasm from `grenache-host compile`")]
    NotWasm { path: PathBuf },
    /// A core module (binary layer 0), not a component.
    #[error("cannot load {path}: a core wasm module, not a component (built for wasm32-unknown-unknown or wasm32-wasip1?); build it with `cargo build --target wasm32-wasip2`")]
    CoreModule { path: PathBuf },
    /// The plugin's memory needs more than its memory limit: the memory its
    /// module declares, or what its `manifest()` grew to. The plugin is fine;
    /// the limit is too low.
    #[error(
        "cannot load {path}: plugin {plugin} needs at least {} of memory, more than its limit of {}; raise --memory-limit (or the policy's memory_limit)",
        format_size(*needs),
        format_size(*limit)
    )]
    MemoryLimitTooLow {
        path: PathBuf,
        /// The plugin's name.
        plugin: String,
        /// Bytes of memory the plugin needs at least.
        needs: u64,
        /// Its memory limit, in bytes.
        limit: u64,
    },
    /// A `.wasm` component given to a build without the compiler (a gateway
    /// build), which runs only precompiled plugins.
    #[error("cannot load {}: {reason}", reason.path.display())]
    NoCompiler { reason: NoCompiler },
    /// A component that does not compile, or an unknown wasm binary layer.
    #[error("cannot load {path}: invalid component ({reason}); rebuild it with `cargo build --target wasm32-wasip2`")]
    Invalid { path: PathBuf, reason: String },
    /// A precompiled file (`.cwasm`) this engine cannot use: made by another
    /// wasmtime version, engine configuration or target, or damaged.
    #[error("cannot load {path}: a precompiled plugin this host cannot use ({reason}); recompile it with `grenache-host compile` from its .wasm, with this grenache-host (and --target for another machine)")]
    Precompiled { path: PathBuf, reason: String },
    /// A component of another world: its imports or exports do not match
    /// `wit/plugin.wit` (nor any older contract version the host speaks).
    #[error("cannot load {path}: not a grenache plugin ({reason}); build it against wit/ with `wit_bindgen::generate!({{ path: \"wit\", world: \"plugin\" }})`")]
    WrongWorld { path: PathBuf, reason: String },
    /// Built against a version of `grenache:plugin` this host does not speak,
    /// e.g. a newer one.
    #[error("cannot load {path}: built against {package}@{versions}, which this host does not speak (it speaks {known}); rebuild the plugin against this host's wit/plugin.wit, or upgrade grenache-host")]
    UnknownContract {
        path: PathBuf,
        /// The WIT package, `grenache:plugin`.
        package: &'static str,
        /// The unknown versions the component names, e.g. `0.4.0`.
        versions: String,
        /// The versions this host speaks, e.g. `0.4.0, 0.3.0, 0.2.0`.
        known: String,
    },
    /// The runtime requires signatures and this file's does not verify.
    #[error("cannot load {path}: {reason}")]
    Signature {
        path: PathBuf,
        reason: super::signing::SignatureError,
    },
    /// Its state file could not be read: damaged, larger than its quota, or
    /// unreadable. The reason names the file and the fix.
    #[error("cannot load {path}: {reason}")]
    State { path: PathBuf, reason: String },
    /// Its state is in use: another running process holds `lock`, the lock
    /// of `name`'s state in `dir`.
    #[error(
        "cannot load {path}: the state of {name} in {dir} is in use by another running host (it holds {lock}); give each host its own --state-dir",
        dir = dir.display(),
        lock = lock.display()
    )]
    StateLocked {
        path: PathBuf,
        name: String,
        dir: PathBuf,
        lock: PathBuf,
    },
    /// Its `manifest` export failed, or named an unusable service.
    #[error(
        "cannot load {path}: its manifest() failed ({reason}); fix the plugin's manifest function"
    )]
    Manifest { path: PathBuf, reason: String },
}

impl CallError {
    /// The failure's reason, as the `reason` label of
    /// `grenache_host_plugin_failures_total`: `trap`, `time_limit`,
    /// `memory_limit`, `bad_reply`, `busy` or `state_not_saved`; `None` for
    /// a handler's own error, which is an answer, not a failure.
    pub fn failure_reason(&self) -> Option<&'static str> {
        match self {
            CallError::Handler(_) => None,
            CallError::Trap { .. } => Some("trap"),
            CallError::TimeLimit { .. } => Some("time_limit"),
            CallError::MemoryLimit { .. } => Some("memory_limit"),
            CallError::BadReply { .. } => Some("bad_reply"),
            CallError::Busy { .. } => Some("busy"),
            CallError::StateNotSaved { .. } => Some("state_not_saved"),
        }
    }
}

/// Why one call into a plugin failed. The `Display` text is what a Grenache
/// caller receives as the `err` string (`docs/wire.md §2.1`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The plugin's handler returned an error message.
    #[error("{0}")]
    Handler(String),
    /// The plugin ran past its time limit and was stopped.
    #[error("plugin {plugin} exceeded its time limit of {limit:?} and was stopped")]
    TimeLimit {
        /// The plugin's name.
        plugin: String,
        /// The plugin's time limit (its policy's `time_limit`).
        limit: Duration,
    },
    /// The plugin tried to grow its memory past its limit and was stopped.
    #[error(
        "plugin {plugin} exceeded its memory limit of {} (asked for {}) and was stopped",
        format_size(*limit),
        format_size(*asked)
    )]
    MemoryLimit {
        /// The plugin's name.
        plugin: String,
        /// The plugin's memory limit, in bytes.
        limit: u64,
        /// The size the plugin tried to grow to, in bytes.
        asked: u64,
    },
    /// The plugin trapped (a Rust panic shows up here with its message).
    #[error("plugin {plugin} crashed: {detail}")]
    Trap {
        /// The plugin's name.
        plugin: String,
        /// The trap, with the plugin's panic message in front when it left one.
        detail: String,
    },
    /// The plugin answered, but with something the host must not pass on.
    #[error("plugin {plugin} returned an invalid reply: {detail}")]
    BadReply {
        /// The plugin's name.
        plugin: String,
        /// What is wrong with the reply (too large, not JSON).
        detail: String,
    },
    /// The call returned, but its state writes could not be kept (the disk,
    /// or calls running at once passed the quota together): none was kept.
    #[error("plugin {plugin}'s state changes were not saved: {reason}")]
    StateNotSaved {
        /// The plugin's name.
        plugin: String,
        /// Why, naming the file or the quota.
        reason: String,
    },
    /// The plugin already runs as many requests as its policy allows.
    #[error(
        "plugin {plugin} is busy: {max} requests already running (its max_concurrent); retry later"
    )]
    Busy {
        /// The plugin's name.
        plugin: String,
        /// The plugin's `max_concurrent`.
        max: usize,
    },
}

/// The shared runtime: the engine, the linker with the host's imports, and
/// the runtime's own [`Limits`]: the ceiling for every plugin's memory (the
/// engine's memory slots are that size) and the limits of plugins loaded
/// with [`load`](Self::load). Cheap to clone; clones share the engine.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<RequestState>>,
    limits: Limits,
    /// Component instances alive at once, the size of the engine's pool.
    max_instances: u32,
    /// When not empty, only plugins signed by one of these keys load.
    trusted_keys: Arc<[TrustedKey]>,
    /// Where plugins' state lives; `None`: they have none.
    state_dir: Option<Arc<StateDir>>,
    /// Each plugin's punch budget, shared by its versions.
    punch_budgets: Arc<PunchBudgets>,
}

impl Runtime {
    /// [`with_max_instances`](Self::with_max_instances) the default
    /// [`DEFAULT_MAX_INSTANCES`].
    pub fn new(limits: Limits) -> anyhow::Result<Self> {
        Self::with_max_instances(limits, DEFAULT_MAX_INSTANCES)
    }

    /// Builds the engine (pooling allocator for `max_instances` component
    /// instances alive at once, memory slots sized for `limits`, epoch
    /// interruption) and starts its epoch ticker thread. Fails when the
    /// address space for the pool cannot be reserved.
    pub fn with_max_instances(limits: Limits, max_instances: u32) -> anyhow::Result<Self> {
        let config = engine_config(limits, max_instances)?;
        let engine = Engine::new(&config)
            .map_err(|e| anyhow::anyhow!("cannot start the wasm engine: {e:#}"))?;

        // The ticker is an OS thread, not a tokio task: a plugin spinning on
        // a runtime worker must not be able to starve it.
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| anyhow::anyhow!("cannot link WASI: {e:#}"))?;
        contract::add_to_linker(&mut linker)
            .map_err(|e| anyhow::anyhow!("cannot link the host interface: {e:#}"))?;
        Ok(Runtime {
            engine,
            linker: Arc::new(linker),
            limits,
            max_instances,
            trusted_keys: Arc::new([]),
            state_dir: None,
            punch_budgets: Arc::default(),
        })
    }

    /// Keeps plugins' state under `dir` (`run --state-dir`); without it a
    /// plugin's state calls fail as `unavailable`.
    pub fn with_state_dir(mut self, dir: PathBuf) -> Self {
        self.state_dir = Some(Arc::new(StateDir::new(dir)));
        self
    }

    /// Loads only plugins whose signature verifies under one of `keys`.
    pub fn require_signatures(mut self, keys: Vec<TrustedKey>) -> Self {
        self.trusted_keys = keys.into();
        self
    }

    /// Whether plugins must be signed (see [`require_signatures`](Self::require_signatures)).
    pub fn requires_signatures(&self) -> bool {
        !self.trusted_keys.is_empty()
    }

    /// [`load_with`](Self::load_with) the built-in policy around this
    /// runtime's limits.
    pub async fn load(
        &self,
        path: &Path,
        network: Arc<dyn PluginNetwork>,
    ) -> Result<LoadedPlugin, LoadError> {
        self.load_with(path, network, PluginPolicy::with_limits(self.limits))
            .await
    }

    /// [`load_as`](Self::load_as) under the file's own name.
    pub async fn load_with(
        &self,
        path: &Path,
        network: Arc<dyn PluginNetwork>,
        policy: PluginPolicy,
    ) -> Result<LoadedPlugin, LoadError> {
        self.load_as(&plugin_name(path), path, network, policy)
            .await
    }

    /// Reads, compiles and type-checks a plugin file, opens its state, then
    /// reads its manifest; the plugin then runs as `name` (its logs, its
    /// state: a swap loads the new file under the name of the plugin it
    /// replaces) under `policy`. Everything that can go wrong with the file
    /// is a [`LoadError`].
    pub async fn load_as(
        &self,
        name: &str,
        path: &Path,
        network: Arc<dyn PluginNetwork>,
        policy: PluginPolicy,
    ) -> Result<LoadedPlugin, LoadError> {
        let path_buf = path.to_path_buf();
        if policy.limits.memory_bytes > self.limits.memory_bytes {
            return Err(LoadError::Unreadable {
                path: path_buf,
                reason: format!(
                    "its memory limit ({} MiB) is above the engine's ({} MiB); start the host with that --memory-limit or lower the policy's",
                    policy.limits.memory_bytes >> 20,
                    self.limits.memory_bytes >> 20
                ),
            });
        }
        let bytes = read_plugin_file(path).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => LoadError::NotFound {
                path: path_buf.clone(),
                bundled: in_repository_plugins(path),
            },
            std::io::ErrorKind::IsADirectory => LoadError::Directory {
                path: path_buf.clone(),
            },
            std::io::ErrorKind::InvalidData => LoadError::NotWasm {
                path: path_buf.clone(),
            },
            _ => LoadError::Unreadable {
                path: path_buf.clone(),
                reason: e.to_string(),
            },
        })?;
        if !self.trusted_keys.is_empty() {
            // Verify the very bytes that get compiled.
            super::signing::verify(path, &bytes, &self.trusted_keys).map_err(|reason| {
                LoadError::Signature {
                    path: path_buf.clone(),
                    reason,
                }
            })?;
        }
        let hash = sha1_smol::Sha1::from(&bytes).digest().to_string();
        let component = self.component_from(bytes, path).await?;

        let unknown = contract::unknown_versions(&self.engine, &component);
        if !unknown.is_empty() {
            return Err(LoadError::UnknownContract {
                path: path_buf,
                package: contract::PACKAGE,
                versions: unknown.join(", "),
                known: contract::VERSIONS
                    .iter()
                    .map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let wrong_world = |e: wasmtime::Error| LoadError::WrongWorld {
            path: path_buf.clone(),
            reason: one_line(&e),
        };
        let uses_state = contract::imports_state(&self.engine, &component);
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(wrong_world)?;
        let pre = ContractPre::detect(pre).map_err(wrong_world)?;

        let name: Arc<str> = name.into();
        let state = match (&self.state_dir, pre.version()) {
            // Older contracts have no state interface to use it through.
            (_, ContractVersion::V0_3 | ContractVersion::V0_2) => {
                Err(format!("{} has no state", pre.version()))
            }
            // Nothing to open, create or lock for a plugin that keeps none.
            _ if !uses_state => Err("it does not use the state interface".to_string()),
            (None, _) => {
                Err("this host has no state directory; give it one with --state-dir".to_string())
            }
            (Some(dir), _) => match dir.open(&name, policy.state_quota) {
                Ok(state) => Ok(state),
                Err(OpenError::NoDirectory(reason)) => {
                    tracing::warn!("{name} runs without state: {reason}");
                    Err(reason)
                }
                Err(OpenError::File(reason)) => {
                    return Err(LoadError::State {
                        path: path_buf,
                        reason,
                    })
                }
                Err(OpenError::Locked { name, dir, lock }) => {
                    return Err(LoadError::StateLocked {
                        path: path_buf,
                        name,
                        dir,
                        lock,
                    })
                }
            },
        };
        // Until the manifest says what the plugin may call, it may call nothing.
        let no_calls: Arc<dyn PluginNetwork> =
            Arc::new(AllowedCalls::new(&name, &[], None, network.clone()));
        let mut plugin = LoadedPlugin {
            name: name.clone(),
            path: path_buf.clone(),
            pre,
            runtime: self.clone(),
            network: no_calls,
            hash,
            manifest: Manifest {
                serves: vec![],
                punch: vec![],
                calls: vec![],
                tick_interval_ms: None,
            },
            concurrency: Arc::new(tokio::sync::Semaphore::new(policy.max_concurrent)),
            policy,
            state,
        };
        plugin.manifest = plugin.read_manifest().await.map_err(|e| match e {
            CallError::MemoryLimit {
                plugin,
                limit,
                asked,
            } => LoadError::MemoryLimitTooLow {
                path: path_buf.clone(),
                plugin,
                needs: asked,
                limit,
            },
            e => LoadError::Manifest {
                path: path_buf.clone(),
                reason: e.to_string(),
            },
        })?;
        if let Err(reason) = check_manifest(&plugin.manifest) {
            return Err(LoadError::Manifest {
                path: path_buf,
                reason,
            });
        }
        let allowed = AllowedCalls::new(
            &name,
            &plugin.manifest.calls,
            plugin.policy.may_call.as_deref(),
            network,
        );
        plugin.network = Arc::new(if plugin.policy.may_be_punched_for {
            allowed.may_punch(self.punch_budgets.of(&name))
        } else {
            allowed
        });
        Ok(plugin)
    }
    /// The component in `bytes`, told apart by content, not by the file's
    /// extension: a wasm component is compiled with Cranelift (refused by a
    /// build without the compiler), a precompiled one (`grenache-host
    /// compile`) deserialized.
    async fn component_from(&self, bytes: Vec<u8>, path: &Path) -> Result<Component, LoadError> {
        let path_buf = path.to_path_buf();
        if !bytes.starts_with(WASM_MAGIC) {
            return self.deserialize(&bytes, path);
        }
        check_component_header(&bytes, path)?;
        // Compiling takes a while (Cranelift); keep it off the async workers.
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || compiler::component(&engine, &bytes, path_buf))
            .await
            .map_err(|e| LoadError::Invalid {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?
            .map_err(|reason| LoadError::NoCompiler { reason })?
            .map_err(|e| self.compile_error(&e, path))
    }

    /// A component that does not fit this engine: its memory is larger
    /// than the memory limit allows, or it is invalid.
    fn compile_error(&self, e: &wasmtime::Error, path: &Path) -> LoadError {
        match memory_minimum_over_limit(e) {
            Some(needs) => LoadError::MemoryLimitTooLow {
                path: path.to_path_buf(),
                plugin: plugin_name(path),
                needs,
                limit: self.limits.memory_bytes,
            },
            None => LoadError::Invalid {
                path: path.to_path_buf(),
                reason: one_line(e),
            },
        }
    }

    /// Loads a precompiled component (a `.cwasm` from `grenache-host
    /// compile`) without compiling it.
    fn deserialize(&self, bytes: &[u8], path: &Path) -> Result<Component, LoadError> {
        let path_buf = path.to_path_buf();
        match Engine::detect_precompiled(bytes) {
            Some(Precompiled::Component) => {}
            Some(Precompiled::Module) => {
                return Err(LoadError::Precompiled {
                    path: path_buf,
                    reason: "a precompiled core module, not a component".into(),
                })
            }
            None if bytes.starts_with(ELF_MAGIC) => {
                return Err(LoadError::Precompiled {
                    path: path_buf,
                    reason: "damaged or not made by wasmtime".into(),
                })
            }
            None => return Err(LoadError::NotWasm { path: path_buf }),
        }
        // SAFETY: `Component::deserialize` trusts its input to be machine
        // code that wasmtime itself wrote; a crafted file could run
        // arbitrary code in the host, outside the sandbox. It is sound here
        // because:
        // - a `.cwasm` is meant to come from `grenache-host compile`, which
        //   writes `Engine::precompile_component`'s output for a component
        //   it has fully checked (header, contract version, world, manifest);
        // - wasmtime checks the artifact before using it: the ELF flags
        //   (above, and again inside), then the wasmtime version, target,
        //   compiler flags and engine settings recorded in it, so a file made
        //   by another version, configuration or target is refused, not run
        //   (this catches mistakes, not malice: the check reads the file);
        // - with --trusted-key, the detached signature was verified over
        //   these exact bytes (`load_with` reads the file once, verifies,
        //   then hands the same buffer here; nothing re-reads the path), so
        //   what runs is exactly what the signer compiled.
        // The remaining trust assumption: without --trusted-key, whoever can
        // write the plugin file can run native code as the host (as they
        // could by replacing the host binary: keep plugins where only the
        // operator writes); with it, the signer's key and build machine.
        if !self.requires_signatures() {
            tracing::warn!(
                "{} is precompiled machine code that runs outside the checks wasmtime makes \
                 on a .wasm: load only .cwasm files you compiled yourself, or sign them and \
                 run with --trusted-key",
                path.display()
            );
        }
        unsafe { Component::deserialize(&self.engine, bytes) }.map_err(|e| {
            if memory_minimum_over_limit(&e).is_some() {
                return self.compile_error(&e, path);
            }
            LoadError::Precompiled {
                path: path_buf,
                reason: one_line(&e),
            }
        })
    }

    /// Precompiles the component at `path` for this runtime's engine, or,
    /// with `target` (a triple such as `aarch64-unknown-linux-gnu`), for the
    /// same engine configuration on that target. The file is first loaded
    /// here as `run` would load it (header, contract version, world,
    /// manifest), so that a bad plugin never becomes a `.cwasm`. Returns the
    /// artifact's bytes; every error is one line naming the fix, the first
    /// of them for a build without the compiler.
    pub async fn precompile(&self, path: &Path, target: Option<&str>) -> Result<Vec<u8>, String> {
        compiler::available(path.to_path_buf())
            .map_err(|e| format!("cannot compile {}: {e}", path.display()))?;
        let bytes = read_plugin_file(path)
            .await
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if Engine::detect_precompiled(&bytes).is_some() {
            return Err(format!(
                "{} is already precompiled; compile the .wasm component it was made from",
                path.display()
            ));
        }
        self.load(path, Arc::new(super::NoNetwork))
            .await
            .map_err(|e| e.to_string())?;
        let engine = match target {
            None => self.engine.clone(),
            Some(triple) => {
                let mut config =
                    engine_config(self.limits, self.max_instances).map_err(|e| e.to_string())?;
                config.target(triple).map_err(|e| {
                    format!("--target {triple}: {e:#}; pass a target triple such as aarch64-unknown-linux-gnu")
                })?;
                Engine::new(&config)
                    .map_err(|e| format!("cannot compile for {triple}: {}", one_line(&e)))?
            }
        };
        let path_buf = path.to_path_buf();
        tokio::task::spawn_blocking(move || compiler::precompile(&engine, &bytes, path_buf))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot compile {}: {e}", path.display()))?
            .map_err(|e| format!("cannot compile {}: {}", path.display(), one_line(&e)))
    }
}

/// The first bytes of a wasm binary, module or component.
const WASM_MAGIC: &[u8] = b"\0asm";
/// The first bytes of an ELF file, which a `.cwasm` is.
const ELF_MAGIC: &[u8] = b"\x7fELF";

/// The engine configuration for `limits`: the one place it is written, so
/// that `compile` makes artifacts for exactly the engine `run` builds
/// (wasmtime refuses a precompiled component whose engine settings differ),
/// with or without the compiler. The pool's size (`max_instances`) changes
/// no compiled code, so a `.cwasm` fits a host with any `--max-instances`.
fn engine_config(limits: Limits, max_instances: u32) -> anyhow::Result<Config> {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(max_instances)
        .total_core_instances(max_instances * CORE_INSTANCES_PER_COMPONENT)
        .total_memories(max_instances * 2)
        .total_tables(max_instances * CORE_INSTANCES_PER_COMPONENT)
        .total_stacks(max_instances)
        .max_memory_size(usize::try_from(limits.memory_bytes)?)
        .max_unused_warm_slots(32);
    // Every request still gets memory exactly as a fresh instance has it
    // (tests/runtime.rs, nothing_a_request_leaves_in_memory_reaches_the_next):
    // the pool resets a slot before reuse either way. Keeping pages resident
    // without PAGEMAP_SCAN would mean resetting the first bytes of every
    // slot blindly, dirty or not: slower than releasing them.
    if PoolingAllocationConfig::is_pagemap_scan_available() {
        pool.pagemap_scan(Enabled::Yes)
            .linear_memory_keep_resident(KEEP_RESIDENT_MEMORY)
            .table_keep_resident(KEEP_RESIDENT_TABLE);
    }
    let mut config = Config::new();
    config
        .epoch_interruption(true)
        // Plugins use the WASIp2 (sync ABI) contract only; calls are ~3x
        // cheaper without component-model concurrency.
        .concurrency_support(false)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Ok(config)
}

/// Whether `path` is in the `plugins/` folder of a grenache-host repository
/// (a folder `plugins` beside `xtask/` and `wit/`), wherever it is checked
/// out: only there does `cargo xtask plugins` write missing plugins.
fn in_repository_plugins(path: &Path) -> bool {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    dir.file_name() == Some("plugins".as_ref())
        && dir
            .parent()
            .is_some_and(|repo| repo.join("xtask").is_dir() && repo.join("wit").is_dir())
}

/// The minimum memory size, in bytes, of a module memory the engine refused
/// to compile because its slots are smaller (the runtime's memory limit).
///
/// Reads wasmtime's pooling-allocator message ("memory has a minimum byte
/// size of N which exceeds the limit of …"): it is the only sign of this
/// case, and wasmtime is pinned; the unit test below keeps the two in step.
fn memory_minimum_over_limit(err: &wasmtime::Error) -> Option<u64> {
    err.chain().find_map(|cause| {
        cause
            .to_string()
            .strip_prefix("memory has a minimum byte size of ")?
            .split_once(" which exceeds the limit of ")?
            .0
            .parse()
            .ok()
    })
}

/// Checks that `text` is exactly one JSON value, without building it:
/// payloads and replies travel as JSON text and are never re-encoded
/// (`docs/wire.md §2`).
pub fn check_json(text: &str) -> Result<(), serde_json::Error> {
    serde_json::from_str::<serde::de::IgnoredAny>(text).map(|_| ())
}

/// A plugin's name: its file name without `.wasm`. Logs, errors, `status`
/// and the policy file's `[plugin.NAME]` all use it.
pub fn plugin_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".to_string())
}

/// Most names one list of a manifest (`serves`, `punch`, `calls`) may
/// hold: each service served is announced on the DHT (or to each Grape)
/// every few minutes and has its own metrics series, so a plugin listing a
/// million would make its host flood the DHT and grow its registry.
pub const MAX_MANIFEST_NAMES: usize = 256;

/// What a manifest must be for its plugin to load: at most
/// [`MAX_MANIFEST_NAMES`] names a list, and service names usable as keys.
fn check_manifest(manifest: &Manifest) -> Result<(), String> {
    for (list, names) in [
        ("serves", &manifest.serves),
        ("punch", &manifest.punch),
        ("calls", &manifest.calls),
    ] {
        if names.len() > MAX_MANIFEST_NAMES {
            return Err(format!(
                "its manifest's `{list}` has {} names, more than the {MAX_MANIFEST_NAMES} a plugin may list",
                names.len()
            ));
        }
    }
    if let Some(bad) = manifest
        .serves
        .iter()
        .chain(&manifest.punch)
        .find(|s| !valid_service_name(s))
    {
        return Err(format!(
            "service name {bad:?} is empty, too long or has control characters"
        ));
    }
    Ok(())
}

/// A service name must be usable as a DHT key and an RPC key.
fn valid_service_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 256 && !name.chars().any(char::is_control)
}

/// Tells a core module, a component and something else apart from the
/// header, so the error can say which of them the user passed.
fn check_component_header(bytes: &[u8], path: &Path) -> Result<(), LoadError> {
    if bytes.len() < 8 || !bytes.starts_with(WASM_MAGIC) {
        return Err(LoadError::NotWasm {
            path: path.to_path_buf(),
        });
    }
    // Bytes 4..8: version (u16 LE) then layer (u16 LE); layer 0 is a core
    // module, layer 1 a component.
    let layer = u16::from_le_bytes([bytes[6], bytes[7]]);
    match layer {
        0 => Err(LoadError::CoreModule {
            path: path.to_path_buf(),
        }),
        1 => Ok(()),
        other => Err(LoadError::Invalid {
            path: path.to_path_buf(),
            reason: format!("unknown wasm binary layer {other}"),
        }),
    }
}

/// wasmtime errors carry a chain of causes, sometimes over several lines;
/// user-facing messages are one line.
fn one_line(e: &wasmtime::Error) -> String {
    format!("{e:#}")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// One plugin file, compiled and type-checked, ready to be instantiated for
/// each call.
pub struct LoadedPlugin {
    name: Arc<str>,
    path: PathBuf,
    /// The component, bound to the contract version it was built against.
    pre: ContractPre,
    runtime: Runtime,
    network: Arc<dyn PluginNetwork>,
    manifest: Manifest,
    /// SHA-1 of the file's content, to tell versions apart.
    hash: String,
    policy: PluginPolicy,
    /// One permit per request allowed to run at once.
    concurrency: Arc<tokio::sync::Semaphore>,
    /// Its state, shared with its other versions; or why it has none.
    state: Result<Arc<PluginState>, String>,
}

impl LoadedPlugin {
    /// The policy it runs under.
    pub fn policy(&self) -> &PluginPolicy {
        &self.policy
    }

    /// SHA-1 of the component's bytes, in hex.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The plugin's name: its file name without `.wasm`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The version of `grenache:plugin` it was built against.
    pub fn contract(&self) -> ContractVersion {
        self.pre.version()
    }

    /// The services it serves.
    pub fn serves(&self) -> &[String] {
        &self.manifest.serves
    }

    /// The services it wants punched when its host is behind a NAT.
    pub fn punch_targets(&self) -> &[String] {
        &self.manifest.punch
    }

    /// The services its manifest says it may call (`"*"`: any); the
    /// operator's policy may narrow them further.
    pub fn calls(&self) -> &[String] {
        &self.manifest.calls
    }

    /// How often the host calls its `on-tick`: its policy's
    /// `tick_interval`, else its manifest's `tick-interval-ms`, never more
    /// often than [`MIN_TICK_INTERVAL`]; `None`: never (also for plugins
    /// built against a contract without `on-tick`).
    pub fn tick_interval(&self) -> Option<Duration> {
        if self.contract() != ContractVersion::V0_4 {
            return None;
        }
        let every = match self.policy.tick {
            TickPolicy::Off => return None,
            TickPolicy::Every(every) => every,
            TickPolicy::Manifest => self.asked_tick_interval()?,
        };
        Some(every.max(MIN_TICK_INTERVAL))
    }

    /// The tick interval its manifest asks for, before the policy and the
    /// minimum apply.
    pub fn asked_tick_interval(&self) -> Option<Duration> {
        self.manifest
            .tick_interval_ms
            .map(|ms| Duration::from_millis(u64::from(ms)))
    }

    /// Its state file, when it has state.
    pub fn state_file(&self) -> Option<&Path> {
        self.state.as_ref().ok().map(|s| s.file())
    }

    /// A fresh store with this call's limits and state transaction.
    fn new_store(&self, transaction: Transaction) -> Store<RequestState> {
        let limits = self.policy.limits;
        let deadline = Instant::now() + limits.time;
        let state = RequestState::new(
            self.name.clone(),
            self.network.clone(),
            deadline,
            usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX),
            transaction,
            self.policy.config.clone(),
        );
        let mut store = Store::new(&self.runtime.engine, state);
        store.limiter(|s| s);
        // Check the clock on every tick: yield to tokio so other tasks run
        // while a plugin computes, and stop the plugin once its time is up.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|mut cx| {
            if Instant::now() >= cx.data().deadline {
                cx.data_mut().timed_out = true;
                return Ok(UpdateDeadline::Interrupt);
            }
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(tokio::task::yield_now()),
            ))
        });
        store
    }

    /// Logs what the plugin printed during the call, then turns a failed
    /// call into the reason the caller sees.
    fn finish<T>(
        &self,
        store: &Store<RequestState>,
        result: wasmtime::Result<T>,
    ) -> Result<T, CallError> {
        let state = store.data();
        self.log_output(state);
        let err = match result {
            Ok(value) => return Ok(value),
            Err(err) => err,
        };
        let plugin = self.name.to_string();
        let error = if state.timed_out {
            CallError::TimeLimit {
                plugin,
                limit: self.policy.limits.time,
            }
        } else if let Some(asked) = state.memory_refused {
            CallError::MemoryLimit {
                plugin,
                limit: self.policy.limits.memory_bytes,
                asked: asked as u64,
            }
        } else {
            let mut detail = match err.downcast_ref::<Trap>() {
                // Rust keeps its stack in linear memory, so a stack overflow
                // surfaces as an access below address zero.
                Some(Trap::MemoryOutOfBounds) => {
                    format!(
                        "{} (a stack overflow in the plugin looks like this)",
                        Trap::MemoryOutOfBounds
                    )
                }
                Some(trap) => trap.to_string(),
                None => one_line(&err),
            };
            if let Some(panic) = state.output.panic_message() {
                detail = format!("{panic} ({detail})");
            }
            CallError::Trap { plugin, detail }
        };
        // Callers decide how loudly to report a failed call.
        tracing::debug!("{error}");
        Err(error)
    }

    fn log_output(&self, state: &RequestState) {
        let (lines, dropped) = state.output.lines();
        for line in lines {
            tracing::info!(target: "plugin", "[{}] {line}", self.name);
        }
        if dropped > 0 {
            tracing::warn!(target: "plugin", "[{}] {dropped} bytes of output dropped", self.name);
        }
    }

    /// Runs `call` with a hard wall-clock cap slightly above the time limit,
    /// in case the plugin is stuck somewhere epochs cannot reach.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = wasmtime::Result<T>>,
    ) -> wasmtime::Result<T> {
        let cap = self.policy.limits.time + Duration::from_secs(1);
        match tokio::time::timeout(cap, call).await {
            Ok(result) => result,
            Err(_) => Err(wasmtime::format_err!("stopped after {cap:?}")),
        }
    }

    /// Runs one export of the plugin in a fresh store and instance: the
    /// per-call limits of [`new_store`](Self::new_store), the wall-clock cap
    /// of [`bounded`](Self::bounded), then [`finish`](Self::finish) (the
    /// plugin's output logged, a failure classified); when the call returned
    /// without trapping, its state writes are committed. Instantiating counts
    /// against the same limits as the call itself.
    async fn call<T>(
        &self,
        export: impl AsyncFnOnce(&ContractInstance, &mut Store<RequestState>) -> wasmtime::Result<T>,
    ) -> Result<T, CallError> {
        let transaction = match &self.state {
            Ok(state) => Transaction::new(state.clone()),
            Err(reason) => Transaction::Unavailable(reason.clone()),
        };
        self.call_in(transaction, export).await
    }

    async fn call_in<T>(
        &self,
        transaction: Transaction,
        export: impl AsyncFnOnce(&ContractInstance, &mut Store<RequestState>) -> wasmtime::Result<T>,
    ) -> Result<T, CallError> {
        let mut store = self.new_store(transaction);
        let result = self
            .bounded(async {
                let instance = self.pre.instantiate(&mut store).await?;
                export(&instance, &mut store).await
            })
            .await;
        let value = self.finish(&store, result)?;
        let done = Transaction::Unavailable("the call has returned".into());
        let transaction = std::mem::replace(&mut store.data_mut().state, done);
        drop(store);
        transaction.commit().await.map_err(|reason| {
            let e = CallError::StateNotSaved {
                plugin: self.name.to_string(),
                reason,
            };
            tracing::warn!("{e}");
            e
        })?;
        Ok(value)
    }

    async fn read_manifest(&self) -> Result<Manifest, CallError> {
        // Nothing the manifest does is kept: the version may never serve.
        let no_state = Transaction::Unavailable("not during manifest()".into());
        self.call_in(no_state, async |plugin, store| plugin.manifest(store).await)
            .await
    }

    /// [`handle_with`](Self::handle_with) a request made in this process, with
    /// no network caller ([`RequestContext::local`]).
    pub async fn handle(&self, service: &str, payload: &str) -> Result<String, CallError> {
        self.handle_with(service, payload, &RequestContext::local())
            .await
    }

    /// Calls the plugin's `handle(service, payload, context)` in a fresh
    /// instance (a 0.2.0 plugin is called without `context`). On success the
    /// reply is JSON text no larger than the reply limit.
    pub async fn handle_with(
        &self,
        service: &str,
        payload: &str,
        context: &RequestContext,
    ) -> Result<String, CallError> {
        let _permit = self.request_slot()?;
        let reply = self
            .call(async |plugin, store| plugin.handle(store, service, payload, context).await)
            .await?
            .map_err(CallError::Handler)?;
        self.check_reply(reply)
    }

    /// One of the plugin's `max_concurrent` request slots, held until
    /// dropped; `Busy` when all are taken.
    fn request_slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, CallError> {
        self.concurrency.try_acquire().map_err(|_| CallError::Busy {
            plugin: self.name.to_string(),
            max: self.policy.max_concurrent,
        })
    }

    fn check_reply(&self, reply: String) -> Result<String, CallError> {
        let bad = |detail: String| {
            let e = CallError::BadReply {
                plugin: self.name.to_string(),
                detail,
            };
            tracing::debug!("{e}");
            e
        };
        let limit = self.policy.limits.max_reply_bytes;
        if reply.len() > limit {
            return Err(bad(format!(
                "{} bytes, more than the {limit}-byte limit",
                reply.len()
            )));
        }
        if let Err(e) = check_json(&reply) {
            return Err(bad(format!("not JSON ({e})")));
        }
        Ok(reply)
    }

    /// Tells the plugin that `peer` punched this host.
    pub async fn on_punch(&self, peer: &str) -> Result<(), CallError> {
        self.call(async |plugin, store| plugin.on_punch(store, peer).await)
            .await
    }

    /// Calls the plugin's `on-tick` in a fresh instance, under the limits of
    /// a request. A tick takes none of the plugin's request slots: the
    /// plugin set runs at most one tick of a plugin at a time, so it is one
    /// instance beside them, and a long tick never makes requests busy (with
    /// `max_concurrent = 1` it would have refused every request while it
    /// ran). Its `err` is [`CallError::Handler`].
    pub async fn on_tick(&self) -> Result<(), CallError> {
        self.call(async |plugin, store| plugin.on_tick(store).await)
            .await?
            .map_err(CallError::Handler)
    }
}

/// Largest plugin file read (a `.wasm` component or a precompiled
/// `.cwasm`): our plugins are 0.1–3 MiB, their `.cwasm` up to ~10 MiB;
/// the cap keeps a wrong path (`/dev/zero`, a disk image) from filling
/// memory.
pub const MAX_PLUGIN_FILE: u64 = 256 << 20;

/// Reads a plugin file off the async workers: only a regular file of at
/// most [`MAX_PLUGIN_FILE`] bytes that starts as WebAssembly or a
/// precompiled plugin does. Opened non-blocking, so a FIFO is refused
/// instead of waiting for a writer.
///
/// Errors: the open's (`NotFound`, …); `IsADirectory` for a directory;
/// `InvalidInput` for anything else that is not a regular file, or a file
/// over the cap; `InvalidData` for a file with neither magic number (read
/// no further).
pub async fn read_plugin_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let path = path.to_path_buf();
    let read = move || -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)?;
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(std::io::ErrorKind::IsADirectory.into());
        }
        let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, why);
        if !meta.is_file() {
            return Err(invalid(
                "not a regular file (a plugin is a .wasm or .cwasm file)".into(),
            ));
        }
        let too_big = || {
            invalid(format!(
                "over the {} MiB plugin file limit",
                MAX_PLUGIN_FILE >> 20
            ))
        };
        if meta.len() > MAX_PLUGIN_FILE {
            return Err(too_big());
        }
        // The magic first: a wrong file is refused before it is read whole.
        let mut file = file.take(MAX_PLUGIN_FILE + 1);
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        (&mut file).take(4).read_to_end(&mut bytes)?;
        if bytes.as_slice() != WASM_MAGIC && bytes.as_slice() != ELF_MAGIC {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        file.read_to_end(&mut bytes)?;
        if bytes.len() as u64 > MAX_PLUGIN_FILE {
            return Err(too_big());
        }
        Ok(bytes)
    };
    tokio::task::spawn_blocking(read)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_tells_module_component_and_garbage_apart() {
        let p = Path::new("x.wasm");
        assert!(matches!(
            check_component_header(b"hello world", p),
            Err(LoadError::NotWasm { .. })
        ));
        assert!(matches!(
            check_component_header(b"\0asm", p),
            Err(LoadError::NotWasm { .. })
        ));
        assert!(matches!(
            check_component_header(b"\0asm\x01\0\0\0", p),
            Err(LoadError::CoreModule { .. })
        ));
        assert!(check_component_header(b"\0asm\x0d\0\x01\0", p).is_ok());
    }

    #[test]
    fn load_errors_are_one_line_and_name_the_file() {
        let e = LoadError::CoreModule {
            path: "plugins/x.wasm".into(),
        };
        let text = e.to_string();
        assert!(!text.contains('\n'));
        assert!(text.starts_with("cannot load plugins/x.wasm: "));
        assert!(text.contains("wasm32-wasip2"));
    }

    #[test]
    fn an_unknown_contract_names_the_version_and_the_fix() {
        let e = LoadError::UnknownContract {
            path: "plugins/new.wasm".into(),
            package: contract::PACKAGE,
            versions: "0.5.0".into(),
            known: "0.4.0, 0.3.0, 0.2.0".into(),
        };
        let text = e.to_string();
        assert!(!text.contains('\n'));
        assert!(text.starts_with("cannot load plugins/new.wasm: "));
        assert!(text.contains("grenache:plugin@0.5.0"), "{text}");
        assert!(text.contains("it speaks 0.4.0, 0.3.0, 0.2.0"), "{text}");
        assert!(text.contains("rebuild the plugin against"), "{text}");
    }

    #[test]
    #[cfg(feature = "compiler")]
    fn a_memory_larger_than_the_engine_allows_is_told_apart_from_an_invalid_component() {
        let runtime = Runtime::new(Limits {
            memory_bytes: 64 << 10,
            ..Limits::default()
        })
        .unwrap();
        let compile = |text: &str| Component::new(&runtime.engine, wat::parse_str(text).unwrap());
        // 17 pages of 64 KiB: what wasmtime refuses with a 64 KiB limit.
        let big = compile("(component (core module (memory 17)))");
        assert_eq!(
            memory_minimum_over_limit(&big.err().unwrap()),
            Some(17 << 16)
        );
        let fits = compile("(component (core module (memory 1)))");
        assert!(fits.is_ok());
        let broken = compile("(component (core module (func (result i32))))");
        assert_eq!(memory_minimum_over_limit(&broken.err().unwrap()), None);
    }

    #[test]
    fn a_manifest_may_list_only_so_many_names() {
        let names = |n: usize| (0..n).map(|i| format!("svc{i}")).collect::<Vec<_>>();
        let manifest = |serves, calls| Manifest {
            serves,
            punch: vec![],
            calls,
            tick_interval_ms: None,
        };
        assert!(check_manifest(&manifest(names(MAX_MANIFEST_NAMES), names(1))).is_ok());
        let e = check_manifest(&manifest(names(1_000_000), vec![])).unwrap_err();
        assert!(e.contains("`serves` has 1000000 names"), "{e}");
        let e = check_manifest(&manifest(vec![], names(MAX_MANIFEST_NAMES + 1))).unwrap_err();
        assert!(e.contains("`calls`"), "{e}");
        let e = check_manifest(&manifest(vec!["a\nb".into()], vec![])).unwrap_err();
        assert!(e.contains("control characters"), "{e}");
    }

    #[test]
    fn service_names() {
        assert!(valid_service_name("fibonacci_worker"));
        assert!(!valid_service_name(""));
        assert!(!valid_service_name("a\nb"));
        assert!(!valid_service_name(&"x".repeat(300)));
    }
}
