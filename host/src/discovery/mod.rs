//! Finding services: where a host announces the services it serves and
//! looks up the peers of the services it calls.
//!
//! [`Discovery`] is what the rest of the host needs of a directory; [`dht`]
//! is its backend on an embedded BitTorrent DHT node (the service key is the
//! SHA-1 of the service name). A directory reports what is announced, live
//! or not: which peers answer is the caller's memory (`rpc::health`).

pub mod dht;

use std::net::SocketAddr;
use std::time::Duration;

/// A boxed future, for the object-safe [`Discovery`] trait.
pub use futures::future::BoxFuture;

/// Why discovery failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot start the DHT node: {0}")]
    Start(String),
    #[error("cannot announce {service}: {reason}")]
    Announce { service: String, reason: String },
}

/// A directory of services: announce and look up.
pub trait Discovery: Send + Sync + 'static {
    /// Announces that `service` is served on `port` of this host's address
    /// as the directory sees it.
    fn announce<'a>(
        &'a self,
        service: &'a str,
        port: u16,
    ) -> BoxFuture<'a, Result<(), DiscoveryError>>;

    /// Peers announcing `service`, waiting at most `timeout`; empty if none
    /// was found in time.
    fn lookup<'a>(&'a self, service: &'a str, timeout: Duration) -> BoxFuture<'a, Vec<SocketAddr>>;

    /// Says where this directory is, for the host's log (e.g. `DHT node
    /// 0.0.0.0:41234`).
    fn describe(&self) -> BoxFuture<'_, String>;
}
