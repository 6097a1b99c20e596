//! The plugin set: the plugins one host runs, the router that picks the
//! plugin version answering a request, and replacing a plugin (swap,
//! rollback, file watching) while requests flow.
//!
//! A [`PluginSet`] keeps one slot per plugin file: the version serving now
//! and the [`HISTORY_LEN`] versions that served before it, most recent
//! first, for [`rollback`](PluginSet::rollback): a rollback goes back one
//! step (or several) and drops the versions it leaves, so rolling back
//! twice goes two versions back, never back and forth; a refused swap
//! changes nothing.
//! [`route`](PluginSet::route) reads an immutable routing snapshot (a key is
//! a service name, or an `ip:port` that goes to the primary service, the
//! first service of the first plugin that serves one: `docs/wire.md §2`) and
//! hands back a [`Route`] holding its own `Arc` of the version it picked, so a
//! [`swap`](PluginSet::swap) never touches a running request: it finishes on
//! the old version while new requests see the new one. A swap loads and
//! type-checks the new file off the request path first, under the policy of
//! the plugin it replaces; a file that fails to load, or whose services would
//! collide with another plugin's, leaves the old version serving.
//!
//! How it fits: plugins load through the [`Runtime`] under the policy
//! [`Policies`] gives each name. Above this layer, the node routes RPC
//! requests through [`route`](PluginSet::route), announces what
//! [`watch_services`](PluginSet::watch_services) reports, and its control
//! socket calls [`swap_and_log`](PluginSet::swap_and_log),
//! [`rollback_and_log`](PluginSet::rollback_and_log) and
//! [`status`](PluginSet::status); `run --watch` starts
//! [`watch`](PluginSet::watch).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::policy::Policies;
use super::{plugin_name, CallError, LoadedPlugin, PluginNetwork, Runtime};

/// How many earlier versions of a plugin a host keeps to roll back to.
pub const HISTORY_LEN: usize = 5;

/// One plugin file's versions.
struct Slot {
    /// The file the operator named at start; it names the plugin, and
    /// `--watch` watches it.
    path: PathBuf,
    current: Arc<LoadedPlugin>,
    /// The versions that served before `current`, most recent first, at
    /// most [`HISTORY_LEN`].
    history: VecDeque<Arc<LoadedPlugin>>,
    swaps: u64,
    rollbacks: u64,
    stats: Arc<SlotStats>,
    ticks: Arc<SlotTicks>,
}

/// The ticking of one plugin, across its versions.
#[derive(Default)]
struct SlotTicks {
    /// Which ticker may tick: each version that becomes current gets a new
    /// one, and the ticker of a version swapped out stops at its next tick.
    ticker: AtomicU64,
    /// Held while a tick runs, whatever the version: a tick due while
    /// another runs is skipped, so ticks of one plugin never overlap.
    running: Arc<tokio::sync::Mutex<()>>,
}

impl Slot {
    /// The plugin's name: the first version's file name without `.wasm`.
    fn name(&self) -> String {
        plugin_name(&self.path)
    }
}

/// What `status` reports about one plugin, across its versions.
#[derive(Debug, Default)]
pub struct SlotStats {
    requests: AtomicU64,
    faults: AtomicU64,
    ticks: AtomicU64,
    skipped_ticks: AtomicU64,
    /// Ticks by outcome, in the order of [`TICK_OUTCOMES`].
    tick_outcomes: [AtomicU64; TICK_OUTCOMES.len()],
    refused_swaps: AtomicU64,
    /// The latest fault or refusal, with its reason.
    last_problem: Mutex<Option<String>>,
}

/// How a tick ended, the `outcome` label of
/// `grenache_host_plugin_ticks_total`: `ok`, `error` (on-tick returned an
/// error), a failure's reason ([`CallError::failure_reason`]) or `skipped`.
pub const TICK_OUTCOMES: [&str; 7] = [
    "ok",
    "error",
    "trap",
    "time_limit",
    "memory_limit",
    "state_not_saved",
    "skipped",
];

impl SlotStats {
    /// Counts a tick that ended as `outcome`, one of [`TICK_OUTCOMES`].
    fn count_tick(&self, outcome: &str) {
        if let Some(i) = TICK_OUTCOMES.iter().position(|o| *o == outcome) {
            self.tick_outcomes[i].fetch_add(1, Ordering::Relaxed);
        }
        if outcome == "skipped" {
            self.skipped_ticks.fetch_add(1, Ordering::Relaxed);
        } else {
            self.ticks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a request that failed in the plugin (trap, limit, bad reply,
    /// busy), not one its handler answered with an error.
    pub fn record_fault(&self, reason: String) {
        self.record(&self.faults, reason);
    }

    fn record(&self, counter: &AtomicU64, reason: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        *self.last_problem.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    }
}

/// One plugin's swap counters, for the host's metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapCounts {
    /// The plugin's name.
    pub plugin: String,
    /// Swaps that took effect.
    pub swaps: u64,
    /// Rollbacks that took effect.
    pub rollbacks: u64,
    /// Swaps refused (the file did not load or its services collide); the
    /// version before kept serving.
    pub refused: u64,
}

/// Where one request goes.
pub struct Route {
    /// The service asked for (the primary one for an `ip:port` key).
    pub service: String,
    /// The version that answers it; held until the request ends.
    pub plugin: Arc<LoadedPlugin>,
    /// The counters of the plugin's slot, for recording a fault.
    pub stats: Arc<SlotStats>,
}

/// Which plugin version answers which service: a snapshot, replaced whole.
#[derive(Default)]
struct Routes {
    by_name: HashMap<String, (Arc<LoadedPlugin>, Arc<SlotStats>)>,
    /// Answers `ip:port` keys: the first plugin's first service.
    primary: Option<String>,
}

impl Routes {
    /// The service a request key names: itself if served, the primary one
    /// for an `ip:port` key (a Node punch client's call).
    fn service_for<'a>(&'a self, key: &'a str) -> Option<&'a str> {
        if self.by_name.contains_key(key) {
            Some(key)
        } else if key.parse::<SocketAddr>().is_ok() {
            self.primary.as_deref()
        } else {
            None
        }
    }
}

/// What a swap or rollback did, for logs and the control channel.
#[derive(Debug, Clone)]
pub struct SwapReport {
    /// The plugin's name: its slot's file name without `.wasm`.
    pub plugin: String,
    /// The services the version now serving answers.
    pub services: Vec<String>,
    /// SHA-1 (hex) of the version that served before.
    pub old_hash: String,
    /// SHA-1 (hex) of the version serving now.
    pub new_hash: String,
    /// How long loading the new file took; zero for a rollback.
    pub load_time: Duration,
}

impl std::fmt::Display for SwapReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: serving {:?} with {} (was {}), loaded in {:?}",
            self.plugin,
            self.services,
            short(&self.new_hash),
            short(&self.old_hash),
            self.load_time
        )
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// The plugins of a host, their routes and their counters; the node's tasks
/// share it behind an `Arc`.
pub struct PluginSet {
    runtime: Runtime,
    policies: Arc<Policies>,
    network: Arc<dyn PluginNetwork>,
    slots: Mutex<Vec<Slot>>,
    routes: RwLock<Arc<Routes>>,
    /// The services served now, for the announce loop.
    services: tokio::sync::watch::Sender<Vec<String>>,
    /// Bumped by every swap and rollback, for the tick driver.
    generation: tokio::sync::watch::Sender<u64>,
    /// Set by [`PluginSet::stop_ticks`]: no tick starts after it.
    ticks_stopped: tokio::sync::watch::Sender<bool>,
}

fn build_routes(slots: &[Slot]) -> Result<Routes, String> {
    let mut routes = Routes::default();
    for slot in slots {
        for service in slot.current.serves() {
            let entry = (slot.current.clone(), slot.stats.clone());
            if let Some((other, _)) = routes.by_name.insert(service.clone(), entry) {
                return Err(format!(
                    "{} and {} both serve {service:?}; run them on different hosts",
                    other.path().display(),
                    slot.current.path().display()
                ));
            }
        }
    }
    routes.primary = slots
        .iter()
        .find_map(|s| s.current.serves().first().cloned());
    Ok(routes)
}

impl PluginSet {
    /// Loads every file; fails on the first that does not load or on two
    /// plugins serving the same service.
    pub async fn load(
        runtime: Runtime,
        network: Arc<dyn PluginNetwork>,
        policies: Arc<Policies>,
        paths: &[PathBuf],
    ) -> anyhow::Result<Self> {
        let mut slots = Vec::new();
        for path in paths {
            let policy = policies
                .for_plugin(&plugin_name(path))
                .map_err(anyhow::Error::msg)?;
            let plugin = runtime.load_with(path, network.clone(), policy).await?;
            tracing::info!(
                "loaded {} from {} ({}, {}): serves {:?}, punches {:?}",
                plugin.name(),
                path.display(),
                short(plugin.hash()),
                plugin.contract(),
                plugin.serves(),
                plugin.punch_targets()
            );
            match plugin.state_file() {
                Some(file) => tracing::info!("{}: state in {}", plugin.name(), file.display()),
                None => tracing::info!("{}: no state", plugin.name()),
            }
            slots.push(Slot {
                path: path.clone(),
                current: Arc::new(plugin),
                history: VecDeque::new(),
                swaps: 0,
                rollbacks: 0,
                stats: Arc::default(),
                ticks: Arc::default(),
            });
        }
        let routes = build_routes(&slots).map_err(anyhow::Error::msg)?;
        let (services, _) = tokio::sync::watch::channel(routes_services(&routes));
        Ok(PluginSet {
            runtime,
            policies,
            network,
            slots: Mutex::new(slots),
            routes: RwLock::new(Arc::new(routes)),
            services,
            ticks_stopped: tokio::sync::watch::channel(false).0,
            generation: tokio::sync::watch::channel(0).0,
        })
    }

    /// Whether the plugin answering `key` (as [`route`](Self::route) finds
    /// it) requires encryption: its policy's `require_encryption`.
    pub fn requires_encryption(&self, key: &str) -> bool {
        let routes = self.routes();
        routes
            .service_for(key)
            .and_then(|service| routes.by_name.get(service))
            .is_some_and(|(plugin, _)| plugin.policy().require_encryption)
    }

    fn routes(&self) -> Arc<Routes> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The plugin version that answers `key` now, and the service name it is
    /// asked for; counts the request.
    pub fn route(&self, key: &str) -> Option<Route> {
        let routes = self.routes();
        let service = routes.service_for(key)?.to_string();
        let (plugin, stats) = routes.by_name.get(&service)?;
        stats.requests.fetch_add(1, Ordering::Relaxed);
        Some(Route {
            service,
            plugin: plugin.clone(),
            stats: stats.clone(),
        })
    }

    /// The services served now, sorted.
    pub fn service_names(&self) -> Vec<String> {
        self.services.borrow().clone()
    }

    /// Follows the set of services served (it changes with swaps).
    pub fn watch_services(&self) -> tokio::sync::watch::Receiver<Vec<String>> {
        self.services.subscribe()
    }

    /// The current version of every plugin.
    pub fn current(&self) -> Vec<Arc<LoadedPlugin>> {
        self.lock_slots()
            .iter()
            .map(|s| s.current.clone())
            .collect()
    }

    /// Every plugin's name and the file it is loaded from.
    pub fn files(&self) -> Vec<(String, PathBuf)> {
        self.lock_slots()
            .iter()
            .map(|s| (s.name(), s.path.clone()))
            .collect()
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The slot named by `target`: a plugin name or a service it serves.
    fn find(slots: &[Slot], target: &str) -> Result<usize, String> {
        slots
            .iter()
            .position(|s| s.name() == target || s.current.serves().iter().any(|x| x == target))
            .ok_or_else(|| {
                let names: Vec<String> = slots.iter().map(Slot::name).collect();
                format!(
                    "no plugin or service {target:?} here (plugins: {})",
                    names.join(", ")
                )
            })
    }

    /// Replaces the plugin `target` (a plugin or service name) with `file`.
    /// Loads and checks first; on any error the old version keeps serving.
    pub async fn swap(&self, target: &str, file: &Path) -> Result<SwapReport, String> {
        // The new version runs under the policy of the plugin it replaces.
        let name = {
            let slots = self.lock_slots();
            slots[Self::find(&slots, target)?].name()
        };
        let policy = self.policies.for_plugin(&name)?;
        let started = Instant::now();
        // ... and under its name, which its state belongs to.
        let plugin = self
            .runtime
            .load_as(&name, file, self.network.clone(), policy)
            .await
            .map_err(|e| e.to_string())?;
        let load_time = started.elapsed();
        self.publish(target, |slot| {
            let old = std::mem::replace(&mut slot.current, Arc::new(plugin));
            slot.history.push_front(old);
            slot.history.truncate(HISTORY_LEN);
            slot.swaps += 1;
            Ok(())
        })
        .map(|mut report| {
            report.load_time = load_time;
            report
        })
    }

    /// Puts back an earlier version of `target`: `steps` back in its
    /// history (1: the version that served before the current one; see
    /// `status`), dropping the current version and those in between, so the
    /// next rollback goes further back.
    pub fn rollback(&self, target: &str, steps: usize) -> Result<SwapReport, String> {
        self.publish(target, |slot| {
            let kept = slot.history.len();
            if kept == 0 {
                return Err(format!(
                    "{} has no previous version (nothing was swapped in, or every earlier version was rolled back to)",
                    slot.name()
                ));
            }
            if steps == 0 || steps > kept {
                return Err(format!(
                    "{} has {kept} earlier versions; roll back 1 to {kept} steps (see `status`)",
                    slot.name()
                ));
            }
            slot.current = slot.history.drain(..steps).next_back().expect("steps <= kept");
            slot.rollbacks += 1;
            Ok(())
        })
    }

    /// Applies `change` to the slot of `target` and publishes new routes;
    /// undoes it if the routes would conflict.
    fn publish(
        &self,
        target: &str,
        change: impl FnOnce(&mut Slot) -> Result<(), String>,
    ) -> Result<SwapReport, String> {
        let mut slots = self.lock_slots();
        let i = Self::find(&slots, target)?;
        let before = (
            slots[i].current.clone(),
            slots[i].history.clone(),
            slots[i].swaps,
            slots[i].rollbacks,
        );
        change(&mut slots[i])?;
        let routes = match build_routes(&slots) {
            Ok(r) => r,
            Err(e) => {
                let slot = &mut slots[i];
                (slot.current, slot.history, slot.swaps, slot.rollbacks) = before;
                return Err(e);
            }
        };
        let old_current = before.0;
        let services = routes_services(&routes);
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(routes);
        self.services.send_replace(services);
        self.generation.send_modify(|g| *g += 1);
        let slot = &slots[i];
        Ok(SwapReport {
            plugin: slot.name(),
            services: slot.current.serves().to_vec(),
            old_hash: old_current.hash().to_string(),
            new_hash: slot.current.hash().to_string(),
            load_time: Duration::ZERO,
        })
    }

    /// [`swap`](Self::swap), logging the outcome either way.
    pub async fn swap_and_log(&self, target: &str, file: &Path) -> Result<String, String> {
        let result = self
            .swap(target, file)
            .await
            .map(|r| format!("swapped {r}"));
        log_outcome("swap", target, &result);
        if let Err(e) = &result {
            let slots = self.lock_slots();
            if let Ok(i) = Self::find(&slots, target) {
                slots[i].stats.record(
                    &slots[i].stats.refused_swaps,
                    format!("swap to {} refused: {e}", file.display()),
                );
            }
        }
        result
    }

    /// [`rollback`](Self::rollback), logging the outcome either way.
    pub fn rollback_and_log(&self, target: &str, steps: usize) -> Result<String, String> {
        let result = self
            .rollback(target, steps)
            .map(|r| format!("rolled back {r}"));
        log_outcome("rollback", target, &result);
        result
    }

    /// Watches every plugin's file and swaps it in when it changes (written in
    /// place or renamed over). A change is taken once the file has looked the
    /// same for one more `interval`, so a file still being written is not
    /// loaded half-done (and if it is, loading fails and the old version stays).
    ///
    /// When signatures are required, the file's `.sig` is watched too: a
    /// plugin written before its signature is refused, then tried again when
    /// the signature arrives. A refused file is also tried again
    /// [`WATCH_RETRIES`] times, 1 s, 2 s and 4 s later, in case what it
    /// needed arrived unseen; then it waits for the next change.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        let files = self.files();
        let signed = self.runtime.requires_signatures();
        let state = |path: &Path| WatchedFiles {
            plugin: file_state(path),
            signature: signed
                .then(|| file_state(&super::signing::signature_path(path)))
                .flatten(),
        };
        let mut seen: Vec<WatchedFiles> = files.iter().map(|(_, p)| state(p)).collect();
        let mut retries: Vec<Option<Retry>> = vec![None; files.len()];
        // Whether the file as it is now was refused: only then does a new
        // signature alone call for another load (an update agent that writes
        // the signature first must not see the old file refused under it).
        let mut refused = vec![false; files.len()];
        loop {
            tokio::time::sleep(interval).await;
            for (i, (name, path)) in files.iter().enumerate() {
                let now = state(path);
                if now.plugin.is_none() {
                    continue;
                }
                let mut retry = retries[i].filter(|r| r.at <= Instant::now());
                if now != seen[i] {
                    tokio::time::sleep(interval).await;
                    if state(path) != now {
                        continue; // still changing; look again next round
                    }
                    let signature_only = now.plugin == seen[i].plugin;
                    seen[i] = now;
                    if signature_only && !refused[i] {
                        continue;
                    }
                    retry = None; // a new file starts a new series of tries
                    tracing::info!("{} changed; loading it", path.display());
                } else if let Some(retry) = retry {
                    tracing::info!(
                        "{} was refused; loading it again (retry {} of {WATCH_RETRIES})",
                        path.display(),
                        retry.attempt
                    );
                } else {
                    continue;
                }
                let result = self.swap_and_log(name, path).await;
                refused[i] = result.is_err();
                retries[i] = match result {
                    Ok(_) => None,
                    Err(_) => Retry::after(retry),
                };
            }
        }
    }

    /// Every plugin's swap counters.
    pub fn swap_counts(&self) -> Vec<SwapCounts> {
        self.lock_slots()
            .iter()
            .map(|s| SwapCounts {
                plugin: s.name(),
                swaps: s.swaps,
                rollbacks: s.rollbacks,
                refused: s.stats.refused_swaps.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Every plugin's ticks by outcome, in the order of [`TICK_OUTCOMES`].
    pub fn tick_counts(&self) -> Vec<(String, [u64; TICK_OUTCOMES.len()])> {
        self.lock_slots()
            .iter()
            .map(|s| {
                let counts =
                    std::array::from_fn(|i| s.stats.tick_outcomes[i].load(Ordering::Relaxed));
                (s.name(), counts)
            })
            .collect()
    }

    /// Calls every plugin's `on-tick` at its interval
    /// ([`LoadedPlugin::tick_interval`]) until [`stop_ticks`](Self::stop_ticks)
    /// (a tick running then finishes) or until dropped (which stops the
    /// ticks running too). A swap or rollback stops the ticks of
    /// the version it replaces and starts those of the new one at its own
    /// interval. A tick runs under the limits of a request, beside its
    /// request slots (it takes none); a tick due while the plugin's previous
    /// one (of any version) still runs is skipped. A failed tick is logged as a warning, counted as a fault,
    /// and handed to `failed` with the plugin's name (the node counts it in
    /// its metrics).
    pub async fn run_ticks(self: Arc<Self>, failed: Arc<TickFailed>) {
        let mut changes = self.generation.subscribe();
        let mut stopped = self.ticks_stopped.subscribe();
        let mut tickers = tokio::task::JoinSet::new();
        // The version each plugin's ticker was started for.
        let mut ticking: HashMap<String, Arc<LoadedPlugin>> = HashMap::new();
        loop {
            changes.borrow_and_update();
            let current: Vec<Tick> = self
                .lock_slots()
                .iter()
                .map(|s| Tick {
                    name: s.name(),
                    plugin: s.current.clone(),
                    stats: s.stats.clone(),
                    ticks: s.ticks.clone(),
                    ticker: 0,
                    failed: failed.clone(),
                })
                .collect();
            for mut tick in current {
                let known = ticking.insert(tick.name.clone(), tick.plugin.clone());
                if known.is_some_and(|known| Arc::ptr_eq(&known, &tick.plugin)) {
                    continue;
                }
                // A new ticker for a new version; the old one stops.
                tick.ticker = tick.ticks.ticker.fetch_add(1, Ordering::SeqCst) + 1;
                let Some(every) = tick.plugin.tick_interval() else {
                    continue;
                };
                match tick.plugin.asked_tick_interval() {
                    Some(asked) if asked < every => tracing::warn!(
                        "{}: its manifest asks for a tick every {asked:?}; ticking every {every:?}, the minimum",
                        tick.name
                    ),
                    _ => tracing::info!("{}: ticking every {every:?}", tick.name),
                }
                tickers.spawn(tick.run(
                    every,
                    self.generation.subscribe(),
                    self.ticks_stopped.subscribe(),
                ));
            }
            while tickers.try_join_next().is_some() {}
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = stopped.wait_for(|stopped| *stopped) => break,
            }
        }
        // Stopped: the tickers stop too; a tick running finishes.
        while tickers.join_next().await.is_some() {}
    }

    /// Stops every plugin's ticks for good (the node does this when it
    /// starts draining, so no tick writes state while it stops); a tick
    /// running finishes. Idempotent.
    pub fn stop_ticks(&self) {
        if !self.ticks_stopped.send_replace(true) {
            tracing::info!("ticks stopped");
        }
    }

    /// What `grenache-host status` shows.
    pub fn status(&self) -> serde_json::Value {
        let slots = self.lock_slots();
        let plugins: Vec<serde_json::Value> = slots
            .iter()
            .map(|s| {
                // `history[n - 1]` is what `rollback --to n` puts back.
                let history: Vec<serde_json::Value> = s
                    .history
                    .iter()
                    .map(|p| serde_json::json!({ "file": p.path().display().to_string(), "hash": p.hash() }))
                    .collect();
                serde_json::json!({
                    "plugin": s.name(),
                    "file": s.current.path().display().to_string(),
                    "services": s.current.serves(),
                    "hash": s.current.hash(),
                    "history": history,
                    "requests": s.stats.requests.load(Ordering::Relaxed),
                    "faults": s.stats.faults.load(Ordering::Relaxed),
                    "swaps": s.swaps,
                    "rollbacks": s.rollbacks,
                    "contract": s.current.contract().to_string(),
                    "tick_interval_ms": s.current.tick_interval().map(|d| d.as_millis() as u64),
                    "ticks": s.stats.ticks.load(Ordering::Relaxed),
                    "skipped_ticks": s.stats.skipped_ticks.load(Ordering::Relaxed),
                    "state_file": s.current.state_file().map(|p| p.display().to_string()),
                    "refused_swaps": s.stats.refused_swaps.load(Ordering::Relaxed),
                    "last_problem": s.stats.last_problem.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                })
            })
            .collect();
        serde_json::json!({ "plugins": plugins })
    }
}

/// What [`PluginSet::run_ticks`] does with a failed tick besides logging
/// and counting it: called with the plugin's name and the failure.
pub type TickFailed = dyn Fn(&str, &CallError) + Send + Sync;

/// The ticker of one version of a plugin.
struct Tick {
    name: String,
    plugin: Arc<LoadedPlugin>,
    stats: Arc<SlotStats>,
    ticks: Arc<SlotTicks>,
    /// Its number: it ticks while its slot's ticker is this one.
    ticker: u64,
    failed: Arc<TickFailed>,
}

impl Tick {
    fn is_current(&self) -> bool {
        self.ticks.ticker.load(Ordering::SeqCst) == self.ticker
    }

    /// Ticks every `every` until a swap (seen through `changes`) gives the
    /// slot another ticker or the ticks are stopped (`stopped` turns true);
    /// a tick running then finishes.
    async fn run(
        self,
        every: Duration,
        mut changes: tokio::sync::watch::Receiver<u64>,
        mut stopped: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut in_flight = tokio::task::JoinSet::new();
        while self.is_current() {
            tokio::select! {
                _ = interval.tick() => {}
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    continue;
                }
                _ = stopped.wait_for(|stopped| *stopped) => break,
            }
            while in_flight.try_join_next().is_some() {}
            if !self.is_current() || *stopped.borrow() {
                break;
            }
            let Ok(running) = self.ticks.running.clone().try_lock_owned() else {
                self.stats.count_tick("skipped");
                tracing::debug!("{}: tick skipped, the previous one still runs", self.name);
                continue;
            };
            let (name, plugin, stats, failed) = (
                self.name.clone(),
                self.plugin.clone(),
                self.stats.clone(),
                self.failed.clone(),
            );
            in_flight.spawn(async move {
                let _running = running;
                match plugin.on_tick().await {
                    Ok(()) => stats.count_tick("ok"),
                    Err(e) => {
                        stats.count_tick(e.failure_reason().unwrap_or("error"));
                        tracing::warn!("{name}: tick failed: {e}");
                        stats.record_fault(format!("tick: {e}"));
                        failed(&name, &e);
                    }
                }
            });
        }
        // Swapped out or stopped: the tick running finishes (its writes are kept).
        while in_flight.join_next().await.is_some() {}
    }
}

fn routes_services(routes: &Routes) -> Vec<String> {
    let mut names: Vec<String> = routes.by_name.keys().cloned().collect();
    names.sort();
    names
}

fn log_outcome(what: &str, target: &str, result: &Result<String, String>) {
    match result {
        Ok(message) => tracing::info!("{message}"),
        Err(e) => {
            tracing::warn!("{what} of {target} refused, the current version keeps serving: {e}")
        }
    }
}

/// How many times `--watch` tries a refused file again before it waits for
/// the file (or its signature) to change.
pub const WATCH_RETRIES: u32 = 3;

/// The next try of a file `--watch` saw refused.
#[derive(Debug, Clone, Copy)]
struct Retry {
    at: Instant,
    /// 1 for the first retry.
    attempt: u32,
}

impl Retry {
    /// The retry after a refusal at `previous` (`None`: the first load),
    /// 1 s, 2 s, 4 s later; `None` once [`WATCH_RETRIES`] are spent.
    fn after(previous: Option<Retry>) -> Option<Retry> {
        let attempt = previous.map_or(1, |r| r.attempt + 1);
        (attempt <= WATCH_RETRIES).then(|| Retry {
            at: Instant::now() + Duration::from_secs(1 << (attempt - 1)),
            attempt,
        })
    }
}

/// What `--watch` looks at for one plugin: its file and, when signatures
/// are required, its `.sig`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WatchedFiles {
    plugin: Option<FileState>,
    signature: Option<FileState>,
}

/// What identifies one version of a file on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileState {
    len: u64,
    modified: Option<std::time::SystemTime>,
    inode: u64,
}

fn file_state(path: &Path) -> Option<FileState> {
    let meta = std::fs::metadata(path).ok()?;
    Some(FileState {
        len: meta.len(),
        modified: meta.modified().ok(),
        inode: std::os::unix::fs::MetadataExt::ino(&meta),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_file_is_retried_three_times_after_1_2_and_4_seconds() {
        let mut waits = Vec::new();
        let mut retry = None;
        while let Some(next) = Retry::after(retry) {
            let wait = next.at.saturating_duration_since(Instant::now());
            waits.push((next.attempt, wait.as_secs_f64().round() as u64));
            retry = Some(next);
        }
        assert_eq!(waits, [(1, 1), (2, 2), (3, 4)]);
    }
}
