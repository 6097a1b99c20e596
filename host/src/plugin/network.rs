//! What a plugin's outgoing calls (`host.request`, `host.request-peer`) reach.
//!
//! The plugin runtime does not know about sockets: it hands each outgoing call
//! to a [`PluginNetwork`]. `invoke` uses [`NoNetwork`]; `run` plugs in the
//! node's RPC client.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
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

/// The services one plugin may call: what it declared in its manifest,
/// narrowed by the operator's policy. Calls to anything else are `denied`
/// before they reach the network.
pub struct AllowedCalls {
    plugin: String,
    /// `None`: any service.
    allowed: Option<Vec<String>>,
    inner: Arc<dyn PluginNetwork>,
}

impl AllowedCalls {
    /// `declared` is the manifest's `calls`; `policy`, when set, the
    /// operator's `may_call`. `*` in a list means any service.
    pub fn new(
        plugin: &str,
        declared: &[String],
        policy: Option<&[String]>,
        inner: Arc<dyn PluginNetwork>,
    ) -> Self {
        let any = |list: &[String]| list.iter().any(|s| s == "*");
        let allowed = match policy {
            None if any(declared) => None,
            None => Some(declared.to_vec()),
            Some(policy) if any(declared) && any(policy) => None,
            Some(policy) if any(declared) => Some(policy.to_vec()),
            Some(policy) if any(policy) => Some(declared.to_vec()),
            Some(policy) => Some(
                declared
                    .iter()
                    .filter(|s| policy.contains(s))
                    .cloned()
                    .collect(),
            ),
        };
        AllowedCalls {
            plugin: plugin.to_string(),
            allowed,
            inner,
        }
    }

    /// Whether `service` may be called.
    pub fn allows(&self, service: &str) -> bool {
        self.allowed
            .as_ref()
            .is_none_or(|list| list.iter().any(|s| s == service))
    }

    fn deny(&self, service: &str) -> OutboundCall {
        let message = format!(
            "plugin {} may not call {service:?} (allowed: {}); declare it in the manifest's `calls` and allow it in the policy's `may_call`",
            self.plugin,
            match &self.allowed {
                Some(list) if list.is_empty() => "nothing".to_string(),
                Some(list) => list.join(", "),
                None => "anything".to_string(),
            }
        );
        tracing::warn!("{message}");
        Box::pin(async move { Err(OutboundError::Denied(message)) })
    }
}

impl PluginNetwork for AllowedCalls {
    fn request(&self, service: String, payload: String, timeout: Duration) -> OutboundCall {
        if !self.allows(&service) {
            return self.deny(&service);
        }
        self.inner.request(service, payload, timeout)
    }

    fn request_peer(
        &self,
        peer: String,
        service: String,
        payload: String,
        timeout: Duration,
    ) -> OutboundCall {
        if !self.allows(&service) {
            return self.deny(&service);
        }
        self.inner.request_peer(peer, service, payload, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(declared: &[&str], policy: Option<&[&str]>) -> AllowedCalls {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let policy = policy.map(v);
        AllowedCalls::new("p", &v(declared), policy.as_deref(), Arc::new(NoNetwork))
    }

    #[test]
    fn a_plugin_may_call_what_it_declared_and_the_policy_only_narrows() {
        let a = allowed(&["x", "y"], None);
        assert!(a.allows("x") && a.allows("y") && !a.allows("z"));
        let a = allowed(&["x", "y"], Some(&["y", "z"]));
        assert!(
            !a.allows("x") && a.allows("y") && !a.allows("z"),
            "policy cannot widen"
        );
        let a = allowed(&["*"], Some(&["z"]));
        assert!(a.allows("z") && !a.allows("x"));
        let a = allowed(&["x"], Some(&["*"]));
        assert!(a.allows("x") && !a.allows("z"));
        assert!(allowed(&["*"], None).allows("anything"));
        assert!(
            !allowed(&[], None).allows("x"),
            "nothing declared, nothing allowed"
        );
    }

    #[tokio::test]
    async fn a_denied_call_never_reaches_the_network() {
        let err = allowed(&["x"], None)
            .request("z".into(), "{}".into(), Duration::from_secs(1))
            .await;
        match err {
            Err(OutboundError::Denied(m)) => assert!(
                m.contains("may not call \"z\"") && m.contains("allowed: x"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
    }
}
