//! What a plugin's outgoing calls (`host.request`, `host.request-peer`) and
//! punches (`host.punch`) reach.
//!
//! The plugin runtime does not know about sockets: it hands each outgoing call
//! to a [`PluginNetwork`]. `invoke` uses [`NoNetwork`]; `run` plugs in the
//! node's RPC client and socket. [`AllowedCalls`] stands in front of either
//! with what the plugin may do: the services it may call, and whether and how
//! often it may punch ([`PunchBudget`]).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

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

/// The future of one punch sent: done, or why not.
pub type PunchCall = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Carries a plugin's outgoing calls and punches. Implementations must
/// honour `timeout`.
pub trait PluginNetwork: Send + Sync + 'static {
    /// Sends one UDP hole punch (`C3 BF`) from the host's RPC socket to `peer`.
    fn punch(&self, peer: SocketAddr) -> PunchCall;
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
    fn punch(&self, peer: SocketAddr) -> PunchCall {
        Box::pin(async move {
            Err(format!(
                "no network in this mode: a punch to {peer} needs a running host (`grenache-host run`)"
            ))
        })
    }

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

/// Punches one plugin may send per second, on average (`host.punch`).
pub const PUNCHES_PER_SECOND: u32 = 4;
/// Punches one plugin may send at once before the rate applies.
pub const PUNCH_BURST: u32 = 8;
/// Distinct peers one plugin may punch within [`PUNCH_PEER_WINDOW`].
pub const MAX_PUNCH_PEERS: usize = 64;
/// The window over which distinct punched peers are counted.
pub const PUNCH_PEER_WINDOW: Duration = Duration::from_secs(60);

/// How many punches a plugin may still send: a token bucket of
/// [`PUNCH_BURST`] filling at [`PUNCHES_PER_SECOND`], and at most
/// [`MAX_PUNCH_PEERS`] distinct peers per [`PUNCH_PEER_WINDOW`], so that a
/// plugin cannot turn its host into a UDP flood source, nor into a scanner.
/// A state machine over the time it is given; bounded by construction.
#[derive(Debug)]
pub struct PunchBudget {
    tokens: crate::units::TokenBucket,
    /// Peers punched within the window, each with its latest punch, oldest
    /// first; at most [`MAX_PUNCH_PEERS`].
    peers: VecDeque<(SocketAddr, Instant)>,
}

impl PunchBudget {
    /// A full budget at `now`.
    pub fn new(now: Instant) -> Self {
        PunchBudget {
            tokens: crate::units::TokenBucket::new(now, PUNCHES_PER_SECOND, PUNCH_BURST),
            peers: VecDeque::new(),
        }
    }

    /// Spends one punch to `peer` at `now`, or says which limit refuses it.
    pub fn spend(&mut self, now: Instant, peer: SocketAddr) -> Result<(), String> {
        while self
            .peers
            .front()
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) >= PUNCH_PEER_WINDOW)
        {
            self.peers.pop_front();
        }
        let known = self.peers.iter().position(|(p, _)| *p == peer);
        if known.is_none() && self.peers.len() >= MAX_PUNCH_PEERS {
            return Err(format!(
                "punch budget exceeded: at most {MAX_PUNCH_PEERS} distinct peers per {}s",
                PUNCH_PEER_WINDOW.as_secs()
            ));
        }
        if !self.tokens.take(now) {
            return Err(format!(
                "punch budget exceeded: at most {PUNCHES_PER_SECOND} punches per second (bursts of {PUNCH_BURST})"
            ));
        }
        if let Some(i) = known {
            self.peers.remove(i);
        }
        self.peers.push_back((peer, now));
        Ok(())
    }
}

/// The punch budget of each plugin by name, shared by its versions while
/// one is loaded: swapping a plugin (or rolling it back) does not give it a
/// fresh burst and a fresh set of distinct peers.
#[derive(Default)]
pub struct PunchBudgets(Mutex<HashMap<String, Weak<Mutex<PunchBudget>>>>);

impl PunchBudgets {
    /// The budget of plugin `name`: the one a loaded version of it uses,
    /// or a full one.
    pub fn of(&self, name: &str) -> Arc<Mutex<PunchBudget>> {
        let mut budgets = self.0.lock().unwrap_or_else(|p| p.into_inner());
        budgets.retain(|_, budget| budget.strong_count() > 0);
        if let Some(budget) = budgets.get(name).and_then(Weak::upgrade) {
            return budget;
        }
        let budget = Arc::new(Mutex::new(PunchBudget::new(Instant::now())));
        budgets.insert(name.to_string(), Arc::downgrade(&budget));
        budget
    }
}

/// The address a plugin asked to punch, if it is one a punch may go to: a
/// unicast `ip:port` with a port.
pub fn punch_target(peer: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = peer
        .parse()
        .map_err(|_| format!("{peer:?} is not an ip:port address"))?;
    // An IPv4-mapped IPv6 address (`[::ffff:224.0.0.1]:9`) is the IPv4
    // address it maps: judge (and punch) that one.
    let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
    let unicast = match addr.ip() {
        IpAddr::V4(ip) => !(ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast()),
        IpAddr::V6(_) => {
            return Err(format!(
                "{peer} is IPv6; the host's RPC socket speaks IPv4 only"
            ))
        }
    };
    if !unicast || addr.port() == 0 {
        return Err(format!(
            "{peer} is not a peer's address (unspecified, multicast, broadcast or port 0)"
        ));
    }
    Ok(addr)
}

/// What one plugin may do on the network: call the services it declared in
/// its manifest, narrowed by the operator's policy (calls to anything else
/// are `denied` before they reach the network), and punch within its
/// [`PunchBudget`] when the policy lets it (`may_be_punched_for`).
pub struct AllowedCalls {
    plugin: String,
    /// `None`: any service.
    allowed: Option<Vec<String>>,
    /// `None`: the policy does not let it punch.
    punches: Option<Arc<Mutex<PunchBudget>>>,
    inner: Arc<dyn PluginNetwork>,
}

impl AllowedCalls {
    /// `declared` is the manifest's `calls`; `policy`, when set, the
    /// operator's `may_call`. `*` in a list means any service. The plugin
    /// may not punch until [`may_punch`](Self::may_punch).
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
            punches: None,
            inner,
        }
    }

    /// Lets the plugin punch, within `budget`: the one every version of
    /// the plugin shares (see [`PunchBudgets`]), so that a swap does not
    /// refill it.
    pub fn may_punch(mut self, budget: Arc<Mutex<PunchBudget>>) -> Self {
        self.punches = Some(budget);
        self
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
    fn punch(&self, peer: SocketAddr) -> PunchCall {
        let Some(budget) = &self.punches else {
            let message = format!(
                "plugin {} may not punch: its policy has may_be_punched_for = false",
                self.plugin
            );
            return Box::pin(async move { Err(message) });
        };
        let spent = budget
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .spend(Instant::now(), peer);
        if let Err(e) = spent {
            tracing::debug!(plugin = %self.plugin, %peer, "{e}");
            return Box::pin(async move { Err(e) });
        }
        self.inner.punch(peer)
    }

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

    #[test]
    fn the_punch_budget_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut budget = PunchBudget::new(start);
        let peer: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        for _ in 0..PUNCH_BURST {
            budget.spend(start, peer).unwrap();
        }
        let e = budget.spend(start, peer).unwrap_err();
        assert!(e.contains("per second"), "{e}");
        // A quarter second refills one punch at 4 per second.
        let later = start + Duration::from_millis(250);
        budget.spend(later, peer).unwrap();
        assert!(budget.spend(later, peer).is_err());
    }

    #[test]
    fn the_punch_budget_bounds_distinct_peers_per_window() {
        let start = Instant::now();
        let mut budget = PunchBudget::new(start);
        let peer = |i: usize| SocketAddr::from(([192, 0, 2, 1], 1000 + i as u16));
        // Slowly enough that the rate never refuses.
        let at = |i: usize| start + Duration::from_millis(250 * i as u64);
        for i in 0..MAX_PUNCH_PEERS {
            budget.spend(at(i), peer(i)).unwrap();
        }
        let now = at(MAX_PUNCH_PEERS);
        let e = budget.spend(now, peer(MAX_PUNCH_PEERS)).unwrap_err();
        assert!(e.contains("distinct peers"), "{e}");
        budget
            .spend(now, peer(3))
            .expect("a peer already punched is fine");
        // Once the first peer's punch is a window old, a new peer fits.
        budget
            .spend(start + PUNCH_PEER_WINDOW, peer(MAX_PUNCH_PEERS))
            .unwrap();
    }

    #[test]
    fn only_unicast_addresses_with_a_port_are_punched() {
        assert!(punch_target("203.0.113.7:40123").is_ok());
        let e = punch_target("[2001:db8::1]:40123").unwrap_err();
        assert!(e.contains("IPv4 only"), "{e}");
        // IPv4-mapped: the IPv4 address it maps, which the socket can send to.
        assert_eq!(
            punch_target("[::ffff:203.0.113.7]:40123").unwrap(),
            "203.0.113.7:40123".parse().unwrap()
        );
        for bad in [
            "nonsense",
            "203.0.113.7",
            "0.0.0.0:1",
            "255.255.255.255:1",
            "224.0.0.1:1",
            "[ff02::1]:1",
            "203.0.113.7:0",
            // IPv4-mapped forms of the above.
            "[::ffff:255.255.255.255]:1",
            "[::ffff:224.0.0.1]:1",
            "[::ffff:0.0.0.0]:1",
        ] {
            assert!(punch_target(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_new_version_of_a_plugin_punches_within_the_budget_its_old_one_spent() {
        // A swap loads the new version while the old one serves: both take
        // the plugin's budget from the runtime's PunchBudgets by name.
        let budgets = PunchBudgets::default();
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let old = allowed(&[], None).may_punch(budgets.of("p"));
        for _ in 0..PUNCH_BURST {
            let e = old.punch(peer).await.unwrap_err();
            assert!(e.contains("no network in this mode"), "{e}");
        }
        let new = allowed(&[], None).may_punch(budgets.of("p"));
        let e = new.punch(peer).await.unwrap_err();
        assert!(e.contains("punch budget exceeded"), "{e}");
        // Another plugin has its own budget.
        let other = allowed(&[], None).may_punch(budgets.of("q"));
        let e = other.punch(peer).await.unwrap_err();
        assert!(e.contains("no network in this mode"), "{e}");
        // Once no version holds it, the table forgets it.
        drop((old, new, other));
        budgets.of("r");
        assert_eq!(budgets.0.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_plugin_without_may_be_punched_for_cannot_punch() {
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let e = allowed(&[], None).punch(peer).await.unwrap_err();
        assert!(e.contains("may_be_punched_for = false"), "{e}");
        let e = allowed(&[], None)
            .may_punch(PunchBudgets::default().of("p"))
            .punch(peer)
            .await
            .unwrap_err();
        assert!(e.contains("no network in this mode"), "{e}");
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
