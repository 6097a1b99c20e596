//! What each plugin may do: the operator's policy per plugin, from a TOML
//! file (`run --config`) with command-line overrides, and the per-call
//! [`Limits`] with their built-in defaults.
//!
//! How it fits: the command line builds [`Policies`] (the file plus its
//! flags); the plugin set asks it for each plugin's [`PluginPolicy`] by name
//! when it loads or swaps one in; the runtime enforces the result on every
//! call (memory, time, reply size, concurrency) and narrows the plugin's
//! outgoing calls with `may_call`. Nothing here touches wasm.
//!
//! ```toml
//! [defaults]                  # every plugin, unless overridden below
//! memory_limit = "64MiB"      # per request
//! time_limit = "5s"           # per request, host calls included
//! max_reply = "1MiB"
//! max_concurrent = 64         # requests running at once in this plugin
//! may_call = ["*"]            # narrows the manifest's `calls`; "*" = what it declared
//! may_be_punched_for = true   # punch its targets, tell it about punches, let it host.punch
//! state_quota = "1MiB"        # its key-value state: bytes of keys plus values
//! tick_interval = "1s"        # calls its on-tick this often ("off": never); default: its manifest's
//! require_encryption = false  # true: plaintext requests (Node peers) get ERR_ENCRYPTION_REQUIRED
//!
//! [plugin.consumer]           # by plugin name (file name without .wasm)
//! may_call = ["fibonacci_worker"]
//!
//! [plugin.sensors.config]     # string values the plugin reads with config.get
//! max_readings = "100"
//!
//! [service.fibonacci_worker]  # by service name: who may answer our plugins' requests
//! keys = ["3b6a27bc…", "ops.pub"]  # host identities (hex or .pub files); others are skipped
//! ```
//!
//! Precedence: built-in defaults, then `[defaults]`, then `[plugin.NAME]`,
//! then command-line flags (which apply to every plugin). The built-in
//! defaults are the safe ones: the limits above, and calls only to what the
//! plugin's manifest declares. A `config` table merges key by key:
//! `[defaults.config]`, then `[plugin.NAME.config]`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::units::{parse_duration, parse_size};

/// Default memory one call may use: 64 MiB.
pub const DEFAULT_MEMORY_LIMIT: u64 = 64 << 20;
/// Default wall time one call may take, host calls included: 5 s.
pub const DEFAULT_TIME_LIMIT: Duration = Duration::from_secs(5);
/// Default largest reply a plugin may return: 1 MiB (the RPC payload cap).
pub const DEFAULT_MAX_REPLY: usize = 1 << 20;
/// Limits on one call into a plugin. Each plugin gets its own through its
/// [`PluginPolicy`]; the runtime's own `Limits` size the engine (no policy may
/// ask for more memory) and are the policy of plugins loaded without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest linear memory a call may grow to, in bytes.
    pub memory_bytes: u64,
    /// Wall time a call may take, including time spent in host calls.
    pub time: Duration,
    /// Largest reply (JSON text) a plugin may return, in bytes.
    pub max_reply_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: DEFAULT_MEMORY_LIMIT,
            time: DEFAULT_TIME_LIMIT,
            max_reply_bytes: DEFAULT_MAX_REPLY,
        }
    }
}

/// Default number of requests one plugin may run at once.
pub const DEFAULT_MAX_CONCURRENT: usize = 64;
/// Largest `state_quota`: a plugin's whole state is held in memory and
/// rewritten to disk by each call that changes it.
pub const MAX_STATE_QUOTA: u64 = 256 << 20;

/// The largest memory limit: 4 GiB, all a wasm32 linear memory can hold
/// (65,536 pages of 64 KiB, WebAssembly core spec), and the address space
/// the engine reserves per memory.
pub const MAX_MEMORY_LIMIT: u64 = 4 << 30;

/// Parses a memory limit (`64MiB`, `1GiB`), refusing one over
/// [`MAX_MEMORY_LIMIT`] with the reason.
pub fn parse_memory_limit(text: &str) -> Result<u64, String> {
    let bytes = parse_size(text)?;
    if bytes > MAX_MEMORY_LIMIT {
        return Err(format!(
            "{text:?} is more than a plugin can use: a wasm32 memory holds at most 4GiB"
        ));
    }
    Ok(bytes)
}
/// Shortest interval between two ticks of a plugin (the WIT's minimum).
pub const MIN_TICK_INTERVAL: Duration = Duration::from_millis(100);
/// Most configuration values one plugin may be given, and the longest key
/// or value, in bytes: the plugin reads them all with `config.get-all`.
pub const MAX_CONFIG_VALUES: usize = 1024;
/// Longest configuration key or value, in bytes.
pub const MAX_CONFIG_BYTES: usize = 64 << 10;

/// When a plugin's `on-tick` runs, as its policy says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TickPolicy {
    /// As its manifest's `tick-interval-ms` says.
    Manifest,
    /// Never.
    Off,
    /// At this interval, whatever the manifest says.
    Every(Duration),
}

/// What one plugin may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginPolicy {
    /// Memory, time and reply size of each call.
    pub limits: Limits,
    /// Requests running at once; more are refused as busy.
    pub max_concurrent: usize,
    /// Narrows the manifest's `calls`; `None` leaves them as declared.
    pub may_call: Option<Vec<String>>,
    /// Whether the host punches this plugin's targets, calls its
    /// `on-punch`, and lets it send punches with `host.punch`.
    pub may_be_punched_for: bool,
    /// Most bytes of keys plus values its state may hold.
    pub state_quota: u64,
    /// When its `on-tick` runs.
    pub tick: TickPolicy,
    /// The values it reads through the WIT `config` interface.
    pub config: Arc<BTreeMap<String, String>>,
    /// Its services answer only requests that came over a secure session
    /// (docs/wire.md §8); plaintext ones get `ERR_ENCRYPTION_REQUIRED`.
    pub require_encryption: bool,
}

impl PluginPolicy {
    /// The built-in policy around the given limits.
    pub fn with_limits(limits: Limits) -> Self {
        PluginPolicy {
            limits,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            may_call: None,
            may_be_punched_for: true,
            state_quota: super::state::DEFAULT_STATE_QUOTA,
            tick: TickPolicy::Manifest,
            config: Arc::default(),
            require_encryption: false,
        }
    }
}

/// One table of the file (or the command line's overrides); every field
/// optional, a missing one leaves the value below it in precedence.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyEntry {
    /// Per-call memory, as a size (`"64MiB"`); see [`crate::units`].
    pub memory_limit: Option<String>,
    /// Per-call wall time, host calls included, as a duration (`"5s"`).
    pub time_limit: Option<String>,
    /// Largest reply, as a size (`"1MiB"`).
    pub max_reply: Option<String>,
    /// Requests running at once in this plugin; at least 1.
    pub max_concurrent: Option<usize>,
    /// Services the plugin may call; narrows its manifest's `calls`.
    pub may_call: Option<Vec<String>>,
    /// Whether the host punches the plugin's targets, calls its `on-punch`
    /// and lets it call `host.punch`.
    pub may_be_punched_for: Option<bool>,
    /// Its state's quota, as a size (`"1MiB"`), at most 256 MiB.
    pub state_quota: Option<String>,
    /// How often its `on-tick` runs, as a duration of at least 100ms
    /// (`"1s"`), or `"off"`; overrides its manifest's `tick-interval-ms`.
    pub tick_interval: Option<String>,
    /// Whether its services refuse plaintext requests (Node peers, or
    /// `call --plaintext`) with `ERR_ENCRYPTION_REQUIRED`.
    pub require_encryption: Option<bool>,
    /// `[....config]`: string values the plugin reads with `config.get`. A
    /// value that is not a string (`n = 5`) is refused with a message saying
    /// to quote it.
    #[serde(default, deserialize_with = "string_values")]
    pub config: Option<BTreeMap<String, String>>,
}

/// A `config` table: every value a string; the error for one that is not
/// names the key and shows it quoted.
fn string_values<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    let table = BTreeMap::<String, toml::Value>::deserialize(deserializer)?;
    let mut values = BTreeMap::new();
    for (key, value) in table {
        match value {
            toml::Value::String(text) => {
                values.insert(key, text);
            }
            other => {
                return Err(serde::de::Error::custom(format!(
                    "config values are strings (the plugin reads text): {key} = {other} is not one ({}); quote it: {key} = \"{}\"",
                    other.type_str(),
                    other.to_string().trim_matches('"'),
                )))
            }
        }
    }
    Ok(Some(values))
}

/// The policy file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// `[defaults]`: applies to every plugin.
    #[serde(default)]
    pub defaults: PolicyEntry,
    /// `[plugin.NAME]`: one plugin, by name (file name without `.wasm`).
    #[serde(default)]
    pub plugin: HashMap<String, PolicyEntry>,
    /// `[service.NAME]`: the services our plugins call, by name.
    #[serde(default)]
    pub service: HashMap<String, ServicePolicy>,
}

/// A `[service.NAME]` table: what a plugin's `request` to that service
/// accepts.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePolicy {
    /// The host identities allowed to answer (Ed25519 public keys, as hex or
    /// the path of a `.pub` file `grenache-host keygen` wrote); a peer that
    /// proves none of them in a secure session is skipped. Empty: any peer.
    #[serde(default)]
    pub keys: Vec<String>,
    /// `keys`, parsed when the file is loaded.
    #[serde(skip)]
    parsed: Vec<ed25519_dalek::VerifyingKey>,
}

impl PolicyFile {
    /// Reads and checks a policy file; every error names the file and the field.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the policy {}: {e}", path.display()))?;
        let file: PolicyFile = toml::from_str(&text)
            .map_err(|e| format!("the policy {} is not valid: {e}", path.display()))?;
        // Check every entry now, not at the first swap that needs it.
        for (name, entry) in std::iter::once(("defaults", &file.defaults))
            .chain(file.plugin.iter().map(|(k, v)| (k.as_str(), v)))
        {
            PluginPolicy::with_limits(Limits::default())
                .apply(entry)
                .map_err(|e| format!("the policy {} is not valid: [{name}] {e}", path.display()))?;
        }
        let mut file = file;
        for (name, service) in &mut file.service {
            service.parsed = service
                .keys
                .iter()
                .map(|k| super::signing::parse_trusted_key(k).map(|k| k.key()))
                .collect::<Result<_, _>>()
                .map_err(|e| {
                    format!(
                        "the policy {} is not valid: [service.{name}] keys: {e}",
                        path.display()
                    )
                })?;
        }
        Ok(file)
    }

    /// Refuses a `[plugin.NAME]` table that names none of `plugins` (the
    /// names of the plugins loaded): a policy named after a service, or
    /// after a file that was renamed, would otherwise be ignored in silence.
    pub fn check_plugin_names(&self, plugins: &[String]) -> Result<(), String> {
        let mut unknown: Vec<&String> = self
            .plugin
            .keys()
            .filter(|name| !plugins.contains(name))
            .collect();
        unknown.sort();
        match unknown.first() {
            None => Ok(()),
            Some(name) => Err(format!(
                "[plugin.{name}] names no plugin loaded here (plugins: {}); a plugin is named \
                 after its file without .wasm or .cwasm, not after the services it serves",
                plugins.join(", ")
            )),
        }
    }

    /// The policy of plugin `name`, with `overrides` (from the command line) last.
    pub fn for_plugin(&self, name: &str, overrides: &PolicyEntry) -> Result<PluginPolicy, String> {
        let mut policy = PluginPolicy::with_limits(Limits::default()).apply(&self.defaults)?;
        if let Some(entry) = self.plugin.get(name) {
            policy = policy.apply(entry)?;
        }
        policy.apply(overrides)
    }
}

impl PluginPolicy {
    fn apply(mut self, entry: &PolicyEntry) -> Result<Self, String> {
        let field = |name: &str, e: String| format!("{name}: {e}");
        if let Some(v) = &entry.memory_limit {
            self.limits.memory_bytes =
                parse_memory_limit(v).map_err(|e| field("memory_limit", e))?;
        }
        if let Some(v) = &entry.time_limit {
            self.limits.time = parse_duration(v).map_err(|e| field("time_limit", e))?;
        }
        if let Some(v) = &entry.max_reply {
            self.limits.max_reply_bytes =
                usize::try_from(parse_size(v).map_err(|e| field("max_reply", e))?)
                    .unwrap_or(usize::MAX);
        }
        if let Some(n) = entry.max_concurrent {
            if n == 0 {
                return Err("max_concurrent: must be at least 1".into());
            }
            self.max_concurrent = n;
        }
        if let Some(list) = &entry.may_call {
            self.may_call = Some(list.clone());
        }
        if let Some(b) = entry.may_be_punched_for {
            self.may_be_punched_for = b;
        }
        if let Some(b) = entry.require_encryption {
            self.require_encryption = b;
        }
        if let Some(v) = &entry.state_quota {
            let quota = parse_size(v).map_err(|e| field("state_quota", e))?;
            if quota > MAX_STATE_QUOTA {
                return Err(format!(
                    "state_quota: {v:?} is more than the most a plugin may keep, 256MiB"
                ));
            }
            self.state_quota = quota;
        }
        if let Some(v) = &entry.tick_interval {
            self.tick = match v.as_str() {
                "off" => TickPolicy::Off,
                v => {
                    let every = parse_duration(v)
                        .map_err(|e| field("tick_interval", format!("{e}, or \"off\"")))?;
                    if every < MIN_TICK_INTERVAL {
                        return Err(format!(
                            "tick_interval: {v:?} is shorter than the minimum of 100ms"
                        ));
                    }
                    TickPolicy::Every(every)
                }
            };
        }
        if let Some(values) = &entry.config {
            let mut config = (*self.config).clone();
            config.extend(values.iter().map(|(k, v)| (k.clone(), v.clone())));
            if config.len() > MAX_CONFIG_VALUES {
                return Err(format!(
                    "config: {} values, more than the {MAX_CONFIG_VALUES} a plugin may be given",
                    config.len()
                ));
            }
            if let Some((key, _)) = config
                .iter()
                .find(|(k, v)| k.len() > MAX_CONFIG_BYTES || v.len() > MAX_CONFIG_BYTES)
            {
                return Err(format!(
                    "config: {key:.40?} or its value is longer than {MAX_CONFIG_BYTES} bytes"
                ));
            }
            self.config = Arc::new(config);
        }
        Ok(self)
    }
}

/// The policy file plus the command line's overrides: what `run` applies to
/// each plugin it loads or swaps in.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    /// The `--config` file, or an empty one.
    pub file: PolicyFile,
    /// The command line's flags, applied last to every plugin.
    pub overrides: PolicyEntry,
}

impl Policies {
    /// The policy of plugin `name`.
    pub fn for_plugin(&self, name: &str) -> Result<PluginPolicy, String> {
        self.file.for_plugin(name, &self.overrides)
    }

    /// The identities allowed to answer our plugins' requests to `service`
    /// (`[service.NAME] keys`); empty: any peer.
    pub fn service_keys(&self, service: &str) -> &[ed25519_dalek::VerifyingKey] {
        self.file
            .service
            .get(service)
            .map_or(&[], |s| s.parsed.as_slice())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_memory_limit_over_what_wasm32_can_hold_is_refused() {
        assert_eq!(parse_memory_limit("4GiB"), Ok(4 << 30));
        let e = parse_memory_limit("8GiB").unwrap_err();
        assert!(e.contains("at most 4GiB"), "{e}");
        let file = PolicyEntry {
            memory_limit: Some("5GiB".into()),
            ..Default::default()
        };
        let e = PluginPolicy::with_limits(Limits::default())
            .apply(&file)
            .unwrap_err();
        assert!(e.starts_with("memory_limit:") && e.contains("4GiB"), "{e}");
    }

    use super::*;

    #[test]
    fn precedence_is_defaults_then_plugin_then_command_line() {
        let file: PolicyFile = toml::from_str(
            r#"
            [defaults]
            memory_limit = "32MiB"
            max_concurrent = 8
            [plugin.consumer]
            may_call = ["fibonacci_worker"]
            time_limit = "2s"
            "#,
        )
        .unwrap();
        let none = PolicyEntry::default();
        let consumer = file.for_plugin("consumer", &none).unwrap();
        assert_eq!(consumer.limits.memory_bytes, 32 << 20);
        assert_eq!(consumer.limits.time, Duration::from_secs(2));
        assert_eq!(consumer.max_concurrent, 8);
        assert_eq!(
            consumer.may_call,
            Some(vec!["fibonacci_worker".to_string()])
        );
        let other = file.for_plugin("fibonacci", &none).unwrap();
        assert_eq!(
            (other.limits.time, other.may_call),
            (Limits::default().time, None)
        );
        let cli = PolicyEntry {
            memory_limit: Some("8MiB".into()),
            ..Default::default()
        };
        assert_eq!(
            file.for_plugin("consumer", &cli)
                .unwrap()
                .limits
                .memory_bytes,
            8 << 20
        );
    }

    #[test]
    fn the_built_in_policy_is_the_documented_safe_one() {
        let p = PolicyFile::default()
            .for_plugin("any", &PolicyEntry::default())
            .unwrap();
        assert_eq!(p, PluginPolicy::with_limits(Limits::default()));
        assert_eq!(
            (p.limits.memory_bytes, p.limits.time),
            (64 << 20, Duration::from_secs(5))
        );
        assert_eq!(
            (p.max_concurrent, p.may_call, p.may_be_punched_for),
            (64, None, true)
        );
        assert_eq!(
            (p.state_quota, p.tick, p.config.len()),
            (1 << 20, TickPolicy::Manifest, 0)
        );
    }

    #[test]
    fn state_quota_tick_interval_and_config_come_from_the_file() {
        let file: PolicyFile = toml::from_str(
            r#"
            [defaults]
            state_quota = "64KiB"
            [defaults.config]
            region = "eu"
            unit = "C"
            [plugin.sensors]
            tick_interval = "250ms"
            [plugin.sensors.config]
            unit = "K"
            max_readings = "10"
            [plugin.quiet]
            tick_interval = "off"
            "#,
        )
        .unwrap();
        let none = PolicyEntry::default();
        let sensors = file.for_plugin("sensors", &none).unwrap();
        assert_eq!(sensors.state_quota, 64 << 10);
        assert_eq!(sensors.tick, TickPolicy::Every(Duration::from_millis(250)));
        let config: Vec<(&str, &str)> = sensors
            .config
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            config,
            [("max_readings", "10"), ("region", "eu"), ("unit", "K")]
        );
        assert_eq!(
            file.for_plugin("quiet", &none).unwrap().tick,
            TickPolicy::Off
        );
        assert_eq!(
            file.for_plugin("other", &none).unwrap().tick,
            TickPolicy::Manifest
        );
    }

    #[test]
    fn a_bad_state_quota_tick_interval_or_config_value_is_refused() {
        for (text, expect) in [
            ("state_quota = \"1GiB\"", "256MiB"),
            ("tick_interval = \"50ms\"", "100ms"),
            ("tick_interval = \"sometimes\"", "\"off\""),
        ] {
            let file: PolicyFile = toml::from_str(&format!("[defaults]\n{text}\n")).unwrap();
            let e = file.for_plugin("p", &PolicyEntry::default()).unwrap_err();
            assert!(e.contains(expect), "{text}: {e}");
        }
        let e = toml::from_str::<PolicyFile>("[plugin.p.config]\nlimit = 5\n").unwrap_err();
        assert!(
            e.to_string().contains("config values are strings")
                && e.to_string().contains(r#"quote it: limit = "5""#),
            "{e}"
        );
    }

    #[test]
    fn a_table_for_a_plugin_not_loaded_is_refused_naming_both() {
        let file: PolicyFile =
            toml::from_str("[plugin.fibonacci]\n[plugin.fibonacci_worker]\nmax_concurrent = 2\n")
                .unwrap();
        let loaded = ["fibonacci".to_string(), "consumer".to_string()];
        let e = file.check_plugin_names(&loaded).unwrap_err();
        assert!(
            e.contains("[plugin.fibonacci_worker]") && e.contains("plugins: fibonacci, consumer"),
            "{e}"
        );
        assert!(file
            .check_plugin_names(&[loaded[0].clone(), "fibonacci_worker".into()])
            .is_ok());
        assert!(PolicyFile::default().check_plugin_names(&[]).is_ok());
    }

    #[test]
    fn mistakes_in_the_file_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, "[defaults]\nmemory_limit = \"lots\"\n").unwrap();
        let e = PolicyFile::load(&path).unwrap_err();
        assert!(
            e.contains("[defaults] memory_limit") && e.contains("64MiB"),
            "{e}"
        );
        std::fs::write(&path, "[defaults]\nmemroy_limit = \"8MiB\"\n").unwrap();
        let e = PolicyFile::load(&path).unwrap_err();
        assert!(
            e.contains("unknown field") && e.contains("memroy_limit"),
            "{e}"
        );
    }

    #[test]
    fn service_keys_are_parsed_at_load_and_a_bad_one_names_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        let hex = crate::units::hex(key.as_bytes());
        std::fs::write(&path, format!("[service.fib]\nkeys = [\"{hex}\"]\n")).unwrap();
        let policies = Policies {
            file: PolicyFile::load(&path).unwrap(),
            overrides: PolicyEntry::default(),
        };
        assert_eq!(policies.service_keys("fib"), &[key]);
        assert!(policies.service_keys("other").is_empty(), "not pinned");

        std::fs::write(&path, "[service.fib]\nkeys = [\"abc\"]\n").unwrap();
        let e = PolicyFile::load(&path).unwrap_err();
        assert!(
            e.contains("[service.fib] keys") && e.contains("not a public key"),
            "{e}"
        );
    }
}
