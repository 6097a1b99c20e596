//! The `grenache-host` command line: the only part of the crate that knows
//! clap. [`args`] defines the arguments; [`main`] parses them, turns each
//! command's arguments into a plain config struct and runs the command:
//!
//! - [`run`]: the serving commands, `run` (a host) and `dht` (a public node);
//! - [`grape`]: `grape`, a Grape-compatible node for Node services' links;
//! - [`client`]: the one-shot network clients, `call` and `bench`;
//! - [`admin`]: `keygen`, `sign`, and `swap`/`rollback`/`status` on a running
//!   host's control socket;
//! - [`local`]: `invoke`, `inspect` and `compile`, a plugin file without
//!   any network;
//! - [`output`]: exit codes and how every command reports results and errors.
//!
//! Exit codes are part of the interface: 0 success, 1 the service answered
//! with an error (or failed while answering), 2 the command could not run as
//! asked (bad arguments, a plugin that does not load, invalid JSON).

pub mod admin;
pub mod args;
pub mod client;
pub mod grape;
pub mod local;
pub mod output;
pub mod run;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use crate::plugin::RequestContext;
use crate::rpc::codec::DEFAULT_MAX_MESSAGE;
use args::{Cli, Command};
use output::usage_error;
pub use output::{EXIT_SERVICE_ERROR, EXIT_USAGE};

/// Sets up `tracing` on stderr: `RUST_LOG` if set, else `--log-level`.
pub fn init_logging(level: &str) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::try_new(&spec)
            .map_err(|e| format!("RUST_LOG={spec:?} is not a valid filter: {e}"))?,
        // The DHT and uTP crates are chatty (mainline reports a lone bootstrap
        // node as an error even when lookups work); their news is ours to tell.
        _ => EnvFilter::try_new(format!("{level},mainline=off")).map_err(|e| {
            format!(
                "--log-level {level:?} is not valid ({e}); use error, warn, info, debug or trace"
            )
        })?,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    Ok(())
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = cli.log_level.clone().unwrap_or_else(|| {
        match cli.command {
            // A one-shot client's output is its answer.
            Command::Call { .. } | Command::Bench { .. } => "warn",
            _ => "info",
        }
        .to_string()
    });
    if let Err(e) = init_logging(&level) {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    runtime.block_on(dispatch(cli.command))
}

/// The policies of `run` and `invoke`: the `--config` file (checked, and
/// checked to name only the plugins `names`) with the limit flags last.
fn policies(
    config: Option<std::path::PathBuf>,
    names: &[String],
    limits: &args::LimitArgs,
) -> Result<crate::plugin::policy::Policies, ExitCode> {
    let file = match config {
        Some(path) => crate::plugin::policy::PolicyFile::load(&path)
            .and_then(|file| {
                file.check_plugin_names(names)
                    .map_err(|e| format!("the policy {}: {e}", path.display()))?;
                Ok(file)
            })
            .map_err(usage_error)?,
        None => Default::default(),
    };
    Ok(crate::plugin::policy::Policies {
        file,
        overrides: limits.overrides(),
    })
}

/// Turns one command's arguments into its config and runs it.
async fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::Invoke {
            plugin,
            service,
            payload,
            tick,
            config,
            caller,
            state_dir,
            limits,
        } => {
            let name = crate::plugin::plugin_name(&plugin);
            let policy = match policies(config, std::slice::from_ref(&name), &limits)
                .and_then(|p| p.for_plugin(&name).map_err(usage_error))
            {
                Ok(p) => p,
                Err(code) => return code,
            };
            let call = match (tick, service, payload) {
                (false, Some(service), Some(payload)) => {
                    match output::read_payload(&payload, DEFAULT_MAX_MESSAGE) {
                        Ok(payload) => local::Call::Handle {
                            service,
                            payload,
                            context: RequestContext::from_caller(caller),
                        },
                        Err(code) => return code,
                    }
                }
                // clap requires a service and a payload without --tick.
                _ => local::Call::Tick,
            };
            local::invoke(&plugin, call, policy, state_dir).await
        }
        Command::Inspect { plugin, limits } => local::inspect(&plugin, limits.limits()).await,
        Command::Run {
            plugins,
            listen,
            dht,
            behind_nat,
            keepalive,
            max_payload,
            trusted_key,
            watch,
            control,
            metrics,
            config,
            state_dir,
            identity,
            max_instances,
            limits,
        } => {
            let state_dir = state_dir.or_else(crate::node::default_state_dir);
            let identity = match run::load_identity(identity.as_deref(), state_dir.as_deref()) {
                Ok(identity) => Arc::new(identity),
                Err(code) => return code,
            };
            let names: Vec<String> = plugins
                .iter()
                .map(|p| crate::plugin::plugin_name(p))
                .collect();
            let policies = match policies(config, &names, &limits) {
                Ok(p) => p,
                Err(code) => return code,
            };
            let introducer = match dht.introducer() {
                Ok(i) => i,
                Err(e) => return usage_error(e),
            };
            let nat = crate::nat::NatConfig {
                introducer,
                keepalive,
                behind_nat,
            };
            let config = crate::node::NodeConfig {
                plugins,
                listen,
                discovery: dht.discovery(),
                nat,
                max_message: usize::try_from(max_payload).unwrap_or(usize::MAX),
                policies: Arc::new(policies),
                identity,
            };
            let options = run::RunOptions {
                trusted_keys: trusted_key,
                watch,
                control: match control.as_deref() {
                    None => run::ControlSocket::Default,
                    Some("off") => run::ControlSocket::Off,
                    Some(path) => run::ControlSocket::At(path.into()),
                },
                metrics,
                state_dir,
                max_instances,
            };
            run::run(config, options).await
        }
        Command::Swap {
            target,
            file,
            control,
        } => {
            // The host runs elsewhere (another working directory, maybe
            // another user): resolve the path here, where the user typed it.
            let file = match std::fs::canonicalize(&file) {
                Ok(f) => f,
                Err(e) => return usage_error(format!("cannot use {}: {e}", file.display())),
            };
            let request = crate::node::control::ControlRequest::Swap { target, file };
            admin::control(control.control, request).await
        }
        Command::Rollback {
            target,
            to,
            control,
        } => {
            let request = crate::node::control::ControlRequest::Rollback { target, steps: to };
            admin::control(control.control, request).await
        }
        Command::Status { control } => {
            admin::control(
                control.control,
                crate::node::control::ControlRequest::Status,
            )
            .await
        }
        Command::Compile {
            plugin,
            out,
            target,
            limits,
        } => {
            let out = out.unwrap_or_else(|| plugin.with_extension("cwasm"));
            local::compile(&plugin, &out, target.as_deref(), limits.limits()).await
        }
        Command::Keygen { out } => admin::keygen(&out),
        Command::Id {
            identity,
            state_dir,
        } => admin::id(identity.as_deref(), state_dir.as_deref()),
        Command::Sign { plugin, key } => admin::sign(&plugin, &key),
        Command::Dht {
            listen,
            bootstrap,
            introducer_port,
            peer_ttl,
            relay,
        } => {
            let config = run::DhtNodeConfig {
                listen,
                bootstrap,
                introducer_port,
                peer_ttl: std::time::Duration::from_secs(peer_ttl),
                relay: relay.limits(),
                metrics: relay.metrics,
            };
            run::dht(config).await
        }
        Command::Grape {
            dht_port,
            api_port,
            bootstrap,
            bind,
            peer_max_age_ms,
            max_payload,
            introducer_port,
            relay,
            dht_concurrency,
            dht_max_tables,
            dht_max_values,
            cache_max_age,
            dht_node_liveness,
        } => {
            let ignored = vec![
                ("--dc", dht_concurrency.is_some()),
                ("--dht_maxTables", dht_max_tables.is_some()),
                ("--dht_maxValues", dht_max_values.is_some()),
                ("--cache_maxAge", cache_max_age.is_some()),
                ("--dnl", dht_node_liveness.is_some()),
            ];
            let config = grape::GrapeNodeConfig {
                node: crate::grape::node::GrapeConfig {
                    dht_port,
                    bind,
                    bootstrap: grape::bootstrap_list(&bootstrap),
                    peer_max_age: (peer_max_age_ms > 0)
                        .then(|| std::time::Duration::from_millis(peer_max_age_ms)),
                },
                api_port,
                max_body: usize::try_from(max_payload).unwrap_or(usize::MAX),
                introducer_port,
                relay: relay.limits(),
                metrics: relay.metrics,
                ignored,
            };
            grape::grape(config).await
        }
        Command::Call {
            request,
            dht,
            client,
            peer,
        } => {
            let (client, payload) = match client_config(dht, client, &request) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let call = client::CallConfig {
                service: request.service,
                payload,
                client,
                peer,
            };
            client::call(call).await
        }
        Command::Bench {
            request,
            dht,
            client,
            requests,
            concurrency,
            warmup,
            peer,
            echo,
        } => {
            let (client, payload) = match client_config(dht, client, &request) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let bench = client::BenchConfig {
                service: request.service,
                payload,
                client,
                plan: client::BenchPlan {
                    requests,
                    concurrency,
                    warmup,
                },
                peer,
                echo,
            };
            client::bench(bench).await
        }
    }
}

/// The one-shot clients' config and payload from their arguments.
fn client_config(
    dht: args::BootstrapArgs,
    client: args::ClientArgs,
    request: &args::ServiceRequest,
) -> Result<(client::ClientConfig, String), ExitCode> {
    let config = client::ClientConfig {
        introducer: dht.introducer().map_err(usage_error)?,
        discovery: dht.discovery(),
        timeout: std::time::Duration::from_millis(client.timeout_ms),
        listen: client.listen,
        pins: crate::rpc::session::PinnedKeys::only(
            client.peer_key.iter().map(|k| k.key()).collect(),
        ),
        plaintext: client.plaintext,
    };
    Ok((
        config,
        output::read_payload(&request.payload, DEFAULT_MAX_MESSAGE)?,
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::args::Cli::command().debug_assert();
    }
}
