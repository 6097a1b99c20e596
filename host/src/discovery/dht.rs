//! The DHT backend of [`Discovery`]: an embedded BitTorrent DHT node (crate
//! `mainline`).
//!
//! A service's DHT key is the SHA-1 of its name (`fibonacci_worker` →
//! `9fb29a11…`). A host announces each service with the port of its RPC
//! socket (never the DHT socket's, which is a different mapping behind a
//! NAT) and re-announces periodically. This node starts as a read-only
//! client (BEP 43): the storage is on the `grenache-host dht` nodes
//! ([`super::server`]), which keep an announce [`super::server::PEER_TTL`]
//! and answer the newest first; a lookup can still return a host that went
//! within that time, so callers try peers that failed recently last
//! (`rpc::health`).
//!
//! The embedded node never contacts the public BitTorrent network: it joins
//! only the bootstrap nodes it is given, or stays alone.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use futures::StreamExt;
use mainline::{Dht, Id};

use super::{usable_peers, BoxFuture, Discovery, DiscoveryError, LookupCache};

/// Per-query DHT timeout (mainline's default). Lookups take the first batch
/// of peers, so a slow or dead node does not hold them up; a shorter timeout
/// made busy machines miss bootstrap answers.
const DHT_REQUEST_TIMEOUT: Duration = Duration::from_millis(2000);

/// The DHT key of a service: SHA-1 of its name.
pub fn service_key(service: &str) -> Id {
    Id::from_bytes(sha1_smol::Sha1::from(service).digest().bytes()).expect("SHA-1 is 20 bytes")
}

/// How to start the embedded DHT node.
#[derive(Debug, Clone, Default)]
pub struct DhtConfig {
    /// Address to bind; port 0 for any free port. Default: all interfaces.
    pub listen: Option<SocketAddrV4>,
    /// Nodes to join through (`ip:port` or `host:port`). Empty: a lone node.
    pub bootstrap: Vec<String>,
}

/// Resolves each `--bootstrap` node (`ip:port` or `host:port`) to the IPv4
/// addresses the DHT can use (mainline, BEP 5, speaks IPv4 only).
///
/// Errors: a node that is not `host:port`, a name that does not resolve, or
/// one with no IPv4 address, each named with the fix.
pub fn resolve_bootstrap(nodes: &[String]) -> Result<Vec<String>, DiscoveryError> {
    use std::net::ToSocketAddrs;
    let mut resolved = Vec::new();
    for node in nodes {
        let bad = |why: String| {
            DiscoveryError::Bootstrap(format!(
                "bootstrap node {node}: {why}; give the DHT node as IP:PORT or HOST:PORT, e.g. 127.0.0.1:20001"
            ))
        };
        if node
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            return Err(bad("no port".into()));
        }
        let addrs: Vec<SocketAddr> = node
            .to_socket_addrs()
            .map_err(|e| bad(format!("cannot resolve it ({e})")))?
            .collect();
        let v4: Vec<String> = addrs
            .iter()
            .filter(|a| a.is_ipv4())
            .map(ToString::to_string)
            .collect();
        if v4.is_empty() {
            return Err(bad(format!(
                "it has no IPv4 address (found {}), and the DHT speaks IPv4 only",
                addrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        resolved.extend(v4);
    }
    Ok(resolved)
}

/// A running DHT node.
pub struct DhtDiscovery {
    dht: mainline::async_dht::AsyncDht,
    cache: LookupCache,
    /// The `--bootstrap` nodes as given, for errors.
    bootstrap: Vec<String>,
}

impl DhtDiscovery {
    /// Starts the node (its own OS thread, its own UDP socket).
    pub fn start(config: &DhtConfig) -> Result<Self, DiscoveryError> {
        let mut builder = Dht::builder();
        let listen = config
            .listen
            .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        builder
            .bind_address(*listen.ip())
            .port(listen.port())
            .request_timeout(DHT_REQUEST_TIMEOUT);
        if config.bootstrap.is_empty() {
            // Never fall back to mainline's public routers.
            builder.no_bootstrap();
        } else {
            // mainline resolves names itself and silently drops those that
            // fail: resolve here so a wrong name is named in an error.
            builder.bootstrap(&resolve_bootstrap(&config.bootstrap)?);
        }
        let failed = |reason: String| DiscoveryError::Start(format!("{reason} (binding {listen})"));
        // mainline binds on its actor thread and, when that fails, reports it
        // by a race: sometimes an error, sometimes a panic ("actor thread
        // unexpectedly shutdown"). Binding the address here first turns every
        // usual failure (port taken, address not ours) into the error; the
        // check socket closes at once, before mainline binds.
        std::net::UdpSocket::bind(listen).map_err(|e| failed(e.to_string()))?;
        // The address can still be taken between that check and mainline's
        // bind: never let that panic escape either.
        let dht = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| builder.build()))
            .map_err(|_| {
                let reason = match std::net::UdpSocket::bind(listen) {
                    Err(e) => e.to_string(),
                    Ok(_) => "its thread stopped as it started".into(),
                };
                failed(reason)
            })?
            .map_err(|e| failed(e.to_string()))?;
        Ok(DhtDiscovery {
            dht: dht.as_async(),
            cache: LookupCache::default(),
            bootstrap: config.bootstrap.clone(),
        })
    }

    /// The address the DHT node listens on.
    pub async fn local_addr(&self) -> SocketAddrV4 {
        self.dht.info().await.local_addr()
    }

    /// Waits until the node has joined through its bootstrap nodes.
    pub async fn bootstrapped(&self) -> bool {
        self.dht.bootstrapped().await
    }

    async fn announce_service(&self, service: &str, port: u16) -> Result<(), DiscoveryError> {
        self.dht
            .announce_peer(service_key(service), Some(port))
            .await
            .map(|_| ())
            .map_err(|e| DiscoveryError::Announce {
                service: service.to_string(),
                reason: e.to_string(),
            })
    }

    /// Takes the first batch the DHT returns rather than waiting for the
    /// whole query to finish. A node that has not finished joining the DHT
    /// asks again once it has, if the first query found nothing.
    ///
    /// Errors: nothing found and no `--bootstrap` node answered (the DHT is
    /// unreachable, which "nobody announces it" would hide).
    async fn lookup_peers(
        &self,
        service: &str,
        timeout: Duration,
    ) -> Result<Vec<SocketAddr>, DiscoveryError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut peers = self.lookup_once(service, timeout).await;
        if peers.is_empty() {
            let joined = tokio::time::timeout_at(deadline, self.dht.bootstrapped()).await;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if joined == Ok(true) && !left.is_zero() {
                peers = self.lookup_once(service, left).await;
            }
            // Nobody in the routing table: no node ever answered.
            let alone = joined == Ok(false) || self.dht.info().await.dht_size_estimate().0 == 0;
            if alone && !self.bootstrap.is_empty() {
                return Err(DiscoveryError::Lookup {
                    service: service.to_string(),
                    reason: format!(
                        "no DHT node answered at {}; is `grenache-host dht` running there, or is it a grape's DHT port (--dp, not its HTTP port --aph)?",
                        self.bootstrap.join(", ")
                    ),
                });
            }
        }
        Ok(peers)
    }

    async fn lookup_once(&self, service: &str, timeout: Duration) -> Vec<SocketAddr> {
        if let Some(peers) = self.cache.get(service) {
            return peers;
        }
        let mut stream = self.dht.get_peers(service_key(service));
        let found = match tokio::time::timeout(timeout, stream.next()).await {
            Ok(Some(batch)) => usable_peers(batch.into_iter().map(SocketAddr::V4)),
            _ => vec![],
        };
        self.cache.put(service, &found);
        found
    }
}

impl Discovery for DhtDiscovery {
    fn announce<'a>(
        &'a self,
        service: &'a str,
        port: u16,
    ) -> BoxFuture<'a, Result<(), DiscoveryError>> {
        Box::pin(self.announce_service(service, port))
    }

    fn lookup<'a>(
        &'a self,
        service: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<SocketAddr>, DiscoveryError>> {
        Box::pin(self.lookup_peers(service, timeout))
    }

    fn describe(&self) -> BoxFuture<'_, String> {
        Box::pin(async move { format!("DHT node {}", self.local_addr().await) })
    }

    fn forget(&self, service: &str) {
        self.cache.forget(service);
    }

    fn nobody_announces(&self, service: &str) -> String {
        format!(
            "no host announces {service:?} on the DHT (is one running and bootstrapped from the same node?)"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_nodes_resolve_or_are_named_in_the_error() {
        let ok = resolve_bootstrap(&["127.0.0.1:20001".into(), "localhost:20002".into()]).unwrap();
        assert_eq!(ok[0], "127.0.0.1:20001");
        assert!(ok[1..].contains(&"127.0.0.1:20002".to_string()), "{ok:?}");
        for (node, why) in [
            ("nosuchhost.invalid:20001", "cannot resolve"),
            ("127.0.0.1", "no port"),
            ("[::1]:20001", "IPv4 only"),
        ] {
            let err = resolve_bootstrap(&[node.into()]).unwrap_err().to_string();
            assert!(err.contains(node) && err.contains(why), "{err}");
        }
    }

    #[test]
    fn the_key_of_a_service_is_the_sha1_of_its_name() {
        assert_eq!(
            service_key("fibonacci_worker").to_string(),
            "9fb29a114994929e3a2aecfc69eb453aa58d5b66"
        );
    }
}
