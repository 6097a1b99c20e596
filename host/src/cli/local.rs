//! The local commands: `invoke` and `inspect` load a plugin file and call it
//! in this process, without any network.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use super::output::{check_payload, print_compact, print_line, usage_error, EXIT_SERVICE_ERROR};
use crate::plugin::policy::Limits;
use crate::plugin::{LoadedPlugin, NoNetwork, RequestContext, Runtime};

async fn load(path: &Path, limits: Limits) -> Result<LoadedPlugin, ExitCode> {
    let runtime = Runtime::new(limits).map_err(usage_error)?;
    runtime
        .load(path, Arc::new(NoNetwork))
        .await
        .map_err(usage_error)
}

/// `grenache-host invoke`: one call of `service` with `payload` (JSON text)
/// as if from `context`'s caller, under `limits`; prints the reply as compact
/// JSON.
pub async fn invoke(
    path: &Path,
    service: &str,
    payload: &str,
    context: &RequestContext,
    limits: Limits,
) -> ExitCode {
    if let Err(code) = check_payload(payload) {
        return code;
    }
    let plugin = match load(path, limits).await {
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
/// manifest (serves, punch, calls) as one JSON line.
pub async fn inspect(path: &Path, limits: Limits) -> ExitCode {
    let plugin = match load(path, limits).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    let manifest = serde_json::json!({
        "plugin": plugin.name(),
        "contract": plugin.contract().to_string(),
        "serves": plugin.serves(),
        "punch": plugin.punch_targets(),
        "calls": plugin.calls(),
    });
    print_line(manifest);
    ExitCode::SUCCESS
}
