//! Why a request failed, as the RPC client reports it.

/// Why a request failed. The `Display` text is what `call` prints and what a
/// plugin's `request` receives (the node maps each variant to the WIT's
/// `request-error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    /// Discovery found no peer announcing the service, or could not be
    /// asked (e.g. no Grape answered); the text says which.
    #[error("no peers: {0}")]
    NoPeers(String),
    /// No reply before the deadline (connect, lookup or the reply itself).
    #[error("timeout: {0}")]
    Timeout(String),
    /// The remote service answered with this Grenache error string.
    #[error("{0}")]
    Remote(String),
    /// Delivery or reading the reply failed.
    #[error("transport: {0}")]
    Transport(String),
}

impl RpcError {
    /// The same error with `context` before its text (`"<context>: <text>"`).
    pub fn context(self, context: &str) -> RpcError {
        match self {
            RpcError::NoPeers(m) => RpcError::NoPeers(format!("{context}: {m}")),
            RpcError::Timeout(m) => RpcError::Timeout(format!("{context}: {m}")),
            RpcError::Remote(m) => RpcError::Remote(m),
            RpcError::Transport(m) => RpcError::Transport(format!("{context}: {m}")),
        }
    }
}
