//! Plugins' outgoing calls (`host.request`, `host.request-peer`), carried by
//! the node's RPC client: the seam where RPC errors become the plugin
//! contract's request errors; and their punches (`host.punch`), sent from
//! the node's RPC socket (the plugin layer has checked the budget).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use super::metrics::{outgoing_outcome, NodeMetrics, OTHER_SERVICE};
use crate::plugin::policy::Policies;
use crate::plugin::set::PluginSet;
use crate::plugin::{OutboundCall, OutboundError, PluginNetwork, PunchCall};
use crate::rpc::client::RpcClient;
use crate::rpc::session::PinnedKeys;
use crate::rpc::RpcError;
use crate::transport::Endpoint;

/// Plugins' outgoing calls, carried by the node's RPC client and counted,
/// and their punches, sent from its socket.
pub(super) struct NodeNetwork {
    client: RpcClient,
    endpoint: Endpoint,
    metrics: Arc<NodeMetrics>,
    /// Which identities may answer which service (`[service.NAME] keys`).
    policies: Arc<Policies>,
    /// The plugins making the calls, once loaded (they hold this network,
    /// hence weak): a service their manifests' `calls` name is counted
    /// under its name, any other under [`OTHER_SERVICE`].
    plugins: OnceLock<Weak<PluginSet>>,
}

impl NodeNetwork {
    pub(super) fn new(
        client: RpcClient,
        endpoint: Endpoint,
        metrics: Arc<NodeMetrics>,
        policies: Arc<Policies>,
    ) -> Self {
        NodeNetwork {
            client,
            endpoint,
            metrics,
            policies,
            plugins: OnceLock::new(),
        }
    }

    /// Names the plugins whose manifests say which services are counted
    /// by name, and shows those services at zero.
    pub(super) fn set_plugins(&self, plugins: &Arc<PluginSet>) {
        let _ = self.plugins.set(Arc::downgrade(plugins));
        for plugin in plugins.current() {
            for service in plugin.calls().iter().filter(|c| *c != "*") {
                self.metrics.declare_call(service);
            }
        }
    }

    /// The `service` label of a call to `service`: never a name a plugin
    /// made up (or took from a peer's payload) unless a manifest names it.
    fn label(&self, service: &str) -> String {
        let declared = self
            .plugins
            .get()
            .and_then(Weak::upgrade)
            .is_some_and(|plugins| {
                plugins
                    .current()
                    .iter()
                    .any(|p| p.calls().iter().any(|c| c == service))
            });
        if declared { service } else { OTHER_SERVICE }.to_string()
    }

    /// The identities the policy lets answer `service`.
    fn pins(&self, service: &str) -> PinnedKeys {
        PinnedKeys::only(self.policies.service_keys(service).to_vec())
    }

    /// Runs one outgoing call and counts it.
    async fn counted(
        metrics: Arc<NodeMetrics>,
        label: String,
        call: impl std::future::Future<Output = Result<String, RpcError>>,
    ) -> Result<String, OutboundError> {
        let started = Instant::now();
        let result = call.await;
        metrics.outgoing(&label, outgoing_outcome(&result), started.elapsed());
        result.map_err(outbound)
    }
}

/// The plugin contract's error for an RPC failure (same variant, same text).
fn outbound(error: RpcError) -> OutboundError {
    match error {
        RpcError::NoPeers(m) => OutboundError::NoPeers(m),
        RpcError::Timeout(m) => OutboundError::Timeout(m),
        RpcError::Remote(m) => OutboundError::Remote(m),
        RpcError::Transport(m) => OutboundError::Transport(m),
    }
}

impl PluginNetwork for NodeNetwork {
    fn punch(&self, peer: SocketAddr) -> PunchCall {
        let endpoint = self.endpoint.clone();
        Box::pin(async move {
            tracing::debug!(%peer, "punch for a plugin");
            endpoint
                .try_punch(peer)
                .await
                .map_err(|e| format!("cannot send a punch to {peer}: {e}"))
        })
    }

    fn request(&self, service: String, payload: String, timeout: Duration) -> OutboundCall {
        let (client, metrics, label) = (
            self.client.clone(),
            self.metrics.clone(),
            self.label(&service),
        );
        let pins = self.pins(&service);
        Box::pin(async move {
            let call = client.request_pinned(&service, &payload, timeout, &pins);
            Self::counted(metrics, label, call).await
        })
    }

    fn request_peer(
        &self,
        peer: String,
        service: String,
        payload: String,
        timeout: Duration,
    ) -> OutboundCall {
        let (client, metrics, label) = (
            self.client.clone(),
            self.metrics.clone(),
            self.label(&service),
        );
        let pins = self.pins(&service);
        Box::pin(async move {
            let addr: SocketAddr = peer.parse().map_err(|_| {
                OutboundError::Transport(format!("{peer:?} is not an ip:port address"))
            })?;
            let call = client.request_peer_pinned(addr, &service, &payload, timeout, &pins);
            Self::counted(metrics, label, call).await
        })
    }
}
