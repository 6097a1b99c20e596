//! What a plugin's outgoing calls (`host.request`, `host.request-peer`) reach.
//!
//! The plugin runtime does not know about sockets: it hands each outgoing call
//! to a [`PluginNetwork`]. `invoke` uses [`NoNetwork`]; `run` plugs in the
//! node's RPC client.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// Why an outgoing call failed; mirrors the WIT `request-error` variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboundError {
    /// Discovery found no peer announcing the service.
    #[error("no peers: {0}")]
    NoPeers(String),
    /// No reply before the deadline.
    #[error("timeout: {0}")]
    Timeout(String),
    /// The remote service answered with this Grenache error string.
    #[error("{0}")]
    Remote(String),
    /// Delivery or reading the reply failed.
    #[error("transport: {0}")]
    Transport(String),
    /// Policy forbids the call.
    #[error("denied: {0}")]
    Denied(String),
}

/// The future of one outgoing call: the reply's JSON text or why it failed.
pub type OutboundCall = Pin<Box<dyn Future<Output = Result<String, OutboundError>> + Send>>;

/// Carries a plugin's outgoing calls. Implementations must honour `timeout`.
pub trait PluginNetwork: Send + Sync + 'static {
    /// Look `service` up and call one of its peers.
    fn request(&self, service: String, payload: String, timeout: Duration) -> OutboundCall;
    /// Call `service` on the peer at `peer` (`ip:port`) directly.
    fn request_peer(
        &self,
        peer: String,
        service: String,
        payload: String,
        timeout: Duration,
    ) -> OutboundCall;
}

/// The network of `grenache-host invoke`: there is none, and every outgoing
/// call says so.
pub struct NoNetwork;

impl NoNetwork {
    fn refuse(what: String) -> OutboundCall {
        Box::pin(async move {
            Err(OutboundError::Transport(format!(
                "no network in this mode: {what} needs a running host (`grenache-host run`)"
            )))
        })
    }
}

impl PluginNetwork for NoNetwork {
    fn request(&self, service: String, _payload: String, _timeout: Duration) -> OutboundCall {
        Self::refuse(format!("a request to {service}"))
    }

    fn request_peer(
        &self,
        peer: String,
        service: String,
        _payload: String,
        _timeout: Duration,
    ) -> OutboundCall {
        Self::refuse(format!("a request to {service} at {peer}"))
    }
}
