//! Plugins' outgoing calls (`host.request`, `host.request-peer`), carried by
//! the node's RPC client: the seam where RPC errors become the plugin
//! contract's request errors.

use std::net::SocketAddr;
use std::time::Duration;

use crate::plugin::{OutboundCall, OutboundError, PluginNetwork};
use crate::rpc::client::RpcClient;
use crate::rpc::RpcError;

/// Plugins' outgoing calls, carried by the node's RPC client.
pub(super) struct NodeNetwork {
    client: RpcClient,
}

impl NodeNetwork {
    pub(super) fn new(client: RpcClient) -> Self {
        NodeNetwork { client }
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
    fn request(&self, service: String, payload: String, timeout: Duration) -> OutboundCall {
        let client = self.client.clone();
        Box::pin(async move {
            client
                .request(&service, &payload, timeout)
                .await
                .map_err(outbound)
        })
    }

    fn request_peer(
        &self,
        peer: String,
        service: String,
        payload: String,
        timeout: Duration,
    ) -> OutboundCall {
        let client = self.client.clone();
        Box::pin(async move {
            let addr: SocketAddr = peer.parse().map_err(|_| {
                OutboundError::Transport(format!("{peer:?} is not an ip:port address"))
            })?;
            client
                .request_peer(addr, &service, &payload, timeout)
                .await
                .map_err(outbound)
        })
    }
}
