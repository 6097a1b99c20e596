//! Finding services: where a host announces the services it serves and
//! looks up the peers of the services it calls.
//!
//! [`Discovery`] is what the rest of the host needs of a directory. It has
//! two backends, chosen by [`DiscoveryConfig`]:
//!
//! - [`dht`]: an embedded BitTorrent DHT node (the service key is the SHA-1
//!   of the service name); our hosts find each other this way, through the
//!   BEP 5 server nodes of [`server`] (`grenache-host dht`) that store the
//!   announces;
//! - [`grape`]: a link to Grapes, the DHT nodes of Bitfinex's Grenache, over
//!   their HTTP API as grenache-nodejs-link uses it (the key is the raw
//!   name); this is how a host joins an existing Grenache network.
//!
//! A directory reports what is announced, live or not: which peers answer
//! is the caller's memory (`rpc::health`). Both backends reuse recent
//! answers from a [`LookupCache`].

pub mod dht;
pub mod grape;
pub mod server;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A boxed future, for the object-safe [`Discovery`] trait.
pub use futures::future::BoxFuture;

/// Why discovery failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The directory could not start (e.g. the DHT node's port is taken).
    #[error("cannot start the DHT node: {0}")]
    Start(String),
    /// A bootstrap node is not `host:port`, does not resolve, or has no
    /// IPv4 address; the message names it and the fix.
    #[error("{0}")]
    Bootstrap(String),
    /// No directory took the announce; `reason` says why and what to do.
    #[error("cannot announce {service}: {reason}")]
    Announce { service: String, reason: String },
    /// The directory could not be asked at all (a lookup that simply finds
    /// nothing is not an error); `reason` names the directory, the cause and
    /// the fix, e.g. `cannot reach the Grape at http://127.0.0.1:30001
    /// (connection refused); is a grape running with --aph 30001?`.
    #[error("{reason}")]
    Lookup { service: String, reason: String },
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
    /// was found in time. An error means the directory could not be asked
    /// (e.g. no Grape answered).
    fn lookup<'a>(
        &'a self,
        service: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<SocketAddr>, DiscoveryError>>;

    /// Says where this directory is, for the host's log (e.g. `DHT node
    /// 0.0.0.0:41234`).
    fn describe(&self) -> BoxFuture<'_, String>;

    /// The sentence to show when a lookup of `service` found no peer: what
    /// was asked and what to check, e.g. `no host announces "x" on the DHT
    /// (is one running and bootstrapped from the same node?)`.
    fn nobody_announces(&self, service: &str) -> String;

    /// Drops the cached answer for `service`, if any: every peer in it
    /// failed, so the next lookup asks the directory again instead of
    /// handing back the same dead peers until the cache expires (a
    /// restarted host's successor would stay hidden that long).
    fn forget(&self, service: &str);
}

/// Which directory a host uses.
#[derive(Debug, Clone)]
pub enum DiscoveryConfig {
    /// The embedded DHT, joined through these nodes (`ip:port` or
    /// `host:port`; none: a lone node).
    Dht { bootstrap: Vec<String> },
    /// Grapes' HTTP API (at least one).
    Grapes(Vec<grape::GrapeUrl>),
}

impl DiscoveryConfig {
    /// Starts the directory; a DHT node binds a free UDP port on `ip`.
    pub fn start(&self, ip: std::net::Ipv4Addr) -> Result<Arc<dyn Discovery>, DiscoveryError> {
        match self {
            DiscoveryConfig::Dht { bootstrap } => {
                let config = dht::DhtConfig {
                    listen: Some(std::net::SocketAddrV4::new(ip, 0)),
                    bootstrap: bootstrap.clone(),
                };
                Ok(Arc::new(dht::DhtDiscovery::start(&config)?))
            }
            DiscoveryConfig::Grapes(grapes) => {
                Ok(Arc::new(grape::GrapeDiscovery::new(grapes.clone())?))
            }
        }
    }
}

/// How often a host re-announces its services. A Grape run with the
/// library's default peer age (120 s) keeps an announce 80-160 s after its
/// last refresh (record-cache 1.2.0's two generations, docs/wire.md §6.1),
/// so 30 s leaves room for two lost announces in a row.
pub const REANNOUNCE_INTERVAL: Duration = Duration::from_secs(30);

/// How long a lookup's answer is reused. Short on purpose: it only folds
/// bursts of requests (a bench, a plugin calling on every request) into one
/// query per service, while a service that starts or moves to a new port is
/// seen within this long. grenache-nodejs-link keeps answers 10 s, empty
/// ones too, which hides a newly announced service for up to 10 s
/// (docs/wire.md §6.2); empty answers are never cached here.
pub const LOOKUP_CACHE_TTL: Duration = Duration::from_secs(2);
/// Most services whose answers are cached at once (a plugin may look up any
/// name); beyond it the oldest answer is dropped first.
pub const MAX_CACHED_LOOKUPS: usize = 1024;

/// Recent non-empty lookup answers, per service, for [`LOOKUP_CACHE_TTL`].
#[derive(Debug, Default)]
pub struct LookupCache {
    answers: Mutex<HashMap<String, (Instant, Vec<SocketAddr>)>>,
}

impl LookupCache {
    /// The answer for `service` if it is recent.
    pub fn get(&self, service: &str) -> Option<Vec<SocketAddr>> {
        self.lock()
            .get(service)
            .filter(|(at, _)| at.elapsed() < LOOKUP_CACHE_TTL)
            .map(|(_, peers)| peers.clone())
    }

    /// Keeps `peers` as the answer for `service`; an empty answer is not
    /// kept, so the next lookup asks again.
    pub fn put(&self, service: &str, peers: &[SocketAddr]) {
        if peers.is_empty() {
            return;
        }
        let mut answers = self.lock();
        if answers.len() >= MAX_CACHED_LOOKUPS && !answers.contains_key(service) {
            answers.retain(|_, (at, _)| at.elapsed() < LOOKUP_CACHE_TTL);
            crate::units::evict_oldest(&mut answers, MAX_CACHED_LOOKUPS, |(at, _)| *at);
        }
        answers.insert(service.to_string(), (Instant::now(), peers.to_vec()));
    }

    /// Drops the answer for `service`, if any.
    pub fn forget(&self, service: &str) {
        self.lock().remove(service);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Vec<SocketAddr>)>> {
        self.answers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `peers` without repeats, first occurrences kept in order.
pub fn without_repeats(peers: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let mut seen = std::collections::HashSet::new();
    peers.into_iter().filter(|p| seen.insert(*p)).collect()
}

/// Whether a directory's answer names a peer we can send to: an IPv4 or
/// IPv6 unicast address with a port. A directory can lie (a Grape's answer
/// is anyone's announce), so unspecified (`0.0.0.0`), broadcast, multicast
/// and port-0 addresses are dropped: sending to them reaches nobody, or
/// everybody on the segment.
pub fn is_usable_peer(peer: &SocketAddr) -> bool {
    let unicast = match peer.ip() {
        std::net::IpAddr::V4(ip) => {
            !ip.is_unspecified() && !ip.is_broadcast() && !ip.is_multicast()
        }
        std::net::IpAddr::V6(ip) => !ip.is_unspecified() && !ip.is_multicast(),
    };
    unicast && peer.port() != 0
}

/// `peers` that [`is_usable_peer`], without repeats, first occurrences kept
/// in order: what both backends hand on from a directory's answer.
pub fn usable_peers(peers: impl IntoIterator<Item = SocketAddr>) -> Vec<SocketAddr> {
    without_repeats(peers.into_iter().filter(is_usable_peer).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn the_lookup_cache_keeps_non_empty_answers_and_is_bounded() {
        let cache = LookupCache::default();
        cache.put("empty", &[]);
        assert_eq!(cache.get("empty"), None);
        cache.put("svc", &[peer(1)]);
        assert_eq!(cache.get("svc"), Some(vec![peer(1)]));
        for i in 0..MAX_CACHED_LOOKUPS + 5 {
            cache.put(&format!("s{i}"), &[peer(1)]);
        }
        assert_eq!(cache.lock().len(), MAX_CACHED_LOOKUPS);
        assert!(cache.get(&format!("s{}", MAX_CACHED_LOOKUPS + 4)).is_some());
    }

    #[test]
    fn only_unicast_addresses_with_a_port_are_usable_peers() {
        let addrs = |list: &[&str]| -> Vec<SocketAddr> {
            list.iter().map(|a| a.parse().unwrap()).collect()
        };
        let answer = addrs(&[
            "127.0.0.1:5555",
            "0.0.0.0:5555",
            "255.255.255.255:5555",
            "224.0.0.1:5555",
            "239.255.255.250:1900",
            "10.0.0.1:0",
            "[::]:5555",
            "[ff02::1]:5555",
            "127.0.0.1:5555",
            "10.0.0.2:7",
            "[::1]:8",
        ]);
        assert_eq!(
            usable_peers(answer),
            addrs(&["127.0.0.1:5555", "10.0.0.2:7", "[::1]:8"])
        );
    }
}
