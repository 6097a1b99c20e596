//! `grenache-host grape`: a Grape-compatible node (see [`crate::grape`]):
//! its DHT node and HTTP API, with an introducer beside the DHT port as
//! `dht` runs one. Runs until Ctrl-C or SIGTERM.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;

use super::output::{print_line, usage_error};
use super::run::{start_introducer, IntroducerPort, Signals};
use crate::grape::api::GrapeBackend;
use crate::grape::node::{GrapeConfig, GrapeNode};

/// How to run `grape`.
#[derive(Debug, Clone)]
pub struct GrapeNodeConfig {
    /// The DHT side: port, `-b`, bootstrap nodes, peer max age.
    pub node: GrapeConfig,
    /// The HTTP API's TCP port (0: any free port).
    pub api_port: u16,
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// `None`: the introducer goes beside the DHT port.
    pub introducer_port: Option<IntroducerPort>,
    /// The introducer's relay quotas.
    pub relay: crate::nat::relay::RelayLimits,
    /// Where to serve the relay's metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// grenache-grape's flags taken and ignored (`--dc`, …), and whether
    /// each was given: a warning names those given.
    pub ignored: Vec<(&'static str, bool)>,
}

/// Splits grape's `--bn` (`host:port,host:port`), dropping empty entries
/// as grenache-grape's `bin/grape.js` does.
pub fn bootstrap_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// The shortest `--dpa` that keeps our hosts (re-announcing every 30 s)
/// in lookups through a lost announce: `dht`'s default peer TTL.
const MIN_HOST_FRIENDLY_AGE: std::time::Duration = std::time::Duration::from_secs(75);

/// `grenache-host grape`.
pub async fn grape(config: GrapeNodeConfig) -> ExitCode {
    let mut signals = Signals::catch();
    let GrapeNodeConfig {
        node,
        api_port,
        max_body,
        introducer_port,
        relay,
        metrics,
        ignored,
    } = config;
    // The query node binds -b first; a failure there is -b's, not --dp's.
    if let Some(ip) = node.bind.filter(|ip| !ip.is_unspecified()) {
        if let Err(e) = std::net::UdpSocket::bind((ip, 0)) {
            return usage_error(format!(
                "cannot use -b {ip}: {e}; give an address of this machine's interfaces"
            ));
        }
    }
    let grape = match GrapeNode::start(&node).await {
        Ok(grape) => grape,
        Err(e @ crate::discovery::DiscoveryError::Bootstrap(_)) => {
            return usage_error(format!("--bn: {e}"))
        }
        Err(e) => {
            return usage_error(format!(
                "{e}; is another grape or DHT node using --dp {}?",
                node.dht_port
            ))
        }
    };
    let http_ip = node.bind.unwrap_or(Ipv4Addr::UNSPECIFIED);
    let listener = match tokio::net::TcpListener::bind((http_ip, api_port)).await {
        Ok(listener) => listener,
        Err(e) => {
            return usage_error(format!(
                "cannot listen for the HTTP API on {http_ip}:{api_port}: {e}; pick another --aph"
            ))
        }
    };
    let http_addr = listener
        .local_addr()
        .unwrap_or(SocketAddr::from((http_ip, api_port)));
    let dht_addr = grape.dht_addr();
    let introducer = match start_introducer(
        Ipv4Addr::UNSPECIFIED.into(),
        dht_addr,
        introducer_port,
        relay,
    )
    .await
    {
        Ok(task) => task,
        Err(code) => return code,
    };
    let metrics = match super::run::serve_relay_metrics(metrics, introducer.as_ref()).await {
        Ok(task) => task,
        Err(code) => return code,
    };
    let backend: Arc<dyn GrapeBackend> = grape.clone();
    let http = tokio::spawn(crate::grape::http::serve(listener, backend, max_body));
    grape
        .server()
        .warn_if_alone(&node.bootstrap, "--bn", super::run::BOOTSTRAP_WAIT);
    if let Some(age) = node.peer_max_age.filter(|age| *age < MIN_HOST_FRIENDLY_AGE) {
        tracing::warn!(
            "--dpa {} ms is shorter than our hosts' re-announce interval (30 s) and its slack: hosts that announce on this grape's DHT port (run --bootstrap) drop out of lookups between their announces; use --dpa {} or more (Node services announcing through the HTTP API every second are not affected)",
            age.as_millis(),
            MIN_HOST_FRIENDLY_AGE.as_millis()
        );
    }
    for (flag, given) in ignored {
        if given {
            tracing::warn!("{flag} is accepted for grenache-grape's command lines and has no effect here (see --help)");
        }
    }
    print_line(format_args!("grape dht listening on {dht_addr}"));
    print_line(format_args!("grape http listening on {http_addr}"));
    tracing::info!(
        "announces live {}; this grape's DHT node is reached at {}:{}",
        match node.peer_max_age {
            Some(age) => format!("{age:?} after the last one"),
            None => "until the table needs the room".into(),
        },
        grape.own_ip(),
        dht_addr.port()
    );
    signals.next().await;
    tracing::info!(
        "stopping the grape; its DHT node: {}",
        grape.server().counters().summary()
    );
    http.abort();
    if let Some((task, relay)) = introducer {
        task.abort();
        super::run::log_relay(&relay);
    }
    if let Some(task) = metrics {
        task.abort();
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bn_is_split_on_commas_without_empty_entries() {
        assert_eq!(bootstrap_list(""), Vec::<String>::new());
        assert_eq!(
            bootstrap_list("127.0.0.1:20001,,host:20002, "),
            ["127.0.0.1:20001", "host:20002"]
        );
    }
}
