//! The local commands: `invoke` and `inspect` load a plugin file and call it
//! in this process, without any network; `compile` precompiles one.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use super::output::{check_payload, print_compact, print_line, usage_error, EXIT_SERVICE_ERROR};
use crate::plugin::policy::{Limits, PluginPolicy};
use crate::plugin::runtime::ONE_SHOT_INSTANCES;
use crate::plugin::{LoadError, LoadedPlugin, NoNetwork, RequestContext, Runtime};

/// Loads the plugin at `path` under `policy` (the engine sized to its
/// limits), with its state in `state_dir` (`None`: it has none).
async fn load(
    path: &Path,
    policy: PluginPolicy,
    state_dir: Option<PathBuf>,
) -> Result<LoadedPlugin, ExitCode> {
    let mut runtime =
        Runtime::with_max_instances(policy.limits, ONE_SHOT_INSTANCES).map_err(usage_error)?;
    if let Some(dir) = state_dir {
        runtime = runtime.with_state_dir(dir);
    }
    runtime
        .load_with(path, Arc::new(NoNetwork), policy)
        .await
        .map_err(|e| match e {
            LoadError::StateLocked {
                path,
                name,
                dir,
                lock,
            } => usage_error(format!(
                "cannot load {path}: the state of {name} in {dir} is in use by a running host (it holds {lock}); \
                 stop that host first, or invoke on a copy of the directory (cp -r {dir} COPY, then --state-dir COPY)",
                path = path.display(),
                dir = dir.display(),
                lock = lock.display()
            )),
            e => usage_error(e),
        })
}

/// The one call `invoke` makes.
pub enum Call {
    /// The handler of `service` with `payload` (JSON text), as if from
    /// `context`'s caller.
    Handle {
        service: String,
        payload: String,
        context: RequestContext,
    },
    /// `on-tick`, once.
    Tick,
}

/// `grenache-host invoke`: one call under `policy`, with the plugin's state
/// in `state_dir`; prints a handler's reply as compact JSON, nothing for a
/// tick that succeeds, and an error on stderr (exit 1) for a call that fails.
pub async fn invoke(
    path: &Path,
    call: Call,
    policy: PluginPolicy,
    state_dir: Option<PathBuf>,
) -> ExitCode {
    let (service, payload, context) = match call {
        Call::Handle {
            service,
            payload,
            context,
        } => (service, payload, context),
        Call::Tick => {
            let plugin = match load(path, policy, state_dir).await {
                Ok(p) => p,
                Err(code) => return code,
            };
            return match plugin.on_tick().await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: tick failed: {e}");
                    ExitCode::from(EXIT_SERVICE_ERROR)
                }
            };
        }
    };
    let (service, payload, context) = (service.as_str(), payload.as_str(), &context);
    if let Err(code) = check_payload(payload) {
        return code;
    }
    let plugin = match load(path, policy, state_dir).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    if !plugin.serves().iter().any(|s| s == service) {
        return usage_error(format!(
            "{} does not serve {service:?}; it serves: {}",
            path.display(),
            plugin.serves().join(", ")
        ));
    }
    match plugin.handle_with(service, payload, context).await {
        // The runtime has checked the reply is JSON.
        Ok(reply) => match print_compact(&reply) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: reply is not JSON: {e}");
                ExitCode::from(EXIT_SERVICE_ERROR)
            }
        },
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_SERVICE_ERROR)
        }
    }
}

/// `grenache-host inspect`: prints the plugin's name, contract version and
/// manifest (serves, punch, calls, tick interval) as one JSON line.
pub async fn inspect(path: &Path, limits: Limits) -> ExitCode {
    let plugin = match load(path, PluginPolicy::with_limits(limits), None).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    let manifest = serde_json::json!({
        "plugin": plugin.name(),
        "contract": plugin.contract().to_string(),
        "serves": plugin.serves(),
        "punch": plugin.punch_targets(),
        "calls": plugin.calls(),
        "tick_interval_ms": plugin.tick_interval().map(|d| d.as_millis() as u64),
    });
    print_line(manifest);
    ExitCode::SUCCESS
}

/// `grenache-host compile`: checks the plugin as `run` would, precompiles it
/// for this host's engine under `limits` (or for `target`) and writes it to
/// `out`, whole or not at all.
pub async fn compile(path: &Path, out: &Path, target: Option<&str>, limits: Limits) -> ExitCode {
    let runtime = match Runtime::with_max_instances(limits, ONE_SHOT_INSTANCES) {
        Ok(r) => r,
        Err(e) => return usage_error(e),
    };
    let artifact = match runtime.precompile(path, target).await {
        Ok(a) => a,
        Err(e) => return usage_error(e),
    };
    // Write beside, then rename: a host watching `out` (run --watch) never
    // sees half a file.
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    if let Err(e) =
        std::fs::write(&partial, &artifact).and_then(|()| std::fs::rename(&partial, out))
    {
        let _ = std::fs::remove_file(&partial);
        return usage_error(format!("cannot write {}: {e}", out.display()));
    }
    print_line(format_args!(
        "wrote {} ({}, for {})",
        out.display(),
        crate::units::format_size(artifact.len() as u64),
        target.unwrap_or("this machine")
    ));
    ExitCode::SUCCESS
}
