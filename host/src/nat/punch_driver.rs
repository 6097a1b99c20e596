//! The punch driver: runs a host's [`PunchState`] with the real clock, its
//! RPC socket and discovery (`docs/wire.md §1`).
//!
//! Each round it looks the punch targets up and punches the peers found (at
//! most [`super::punch::MAX_PUNCHES_PER_SERVICE`] per target);
//! each punch received goes to the state machine, which may punch back and
//! have the plugins told. Telling the plugins is the node's business: the
//! driver calls the `notify` function it was given and runs the futures it
//! returns in its own [`JoinSet`], so none outlives the driver and a slow
//! plugin does not hold punching up.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use tokio::task::JoinSet;

use super::punch::{PunchAction, PunchState};
use futures::future::BoxFuture;

use crate::discovery::Discovery;
use crate::transport::Endpoint;

/// How long the lookup of one punch target may take; the round goes on
/// without the peers it did not find in time.
const LOOKUP_TIMEOUT: Duration = Duration::from_millis(800);
/// How long the driver sleeps when the state machine has nothing scheduled
/// (a public host, or no plugin wants anything punched): then it looks at
/// the plugins' targets again (a swap may have added some).
const IDLE: Duration = Duration::from_secs(1);

/// Drives `state` with the real clock: lookups through `discovery`, punches
/// from `endpoint`'s socket, and the punches it received from `punches` (a
/// subscription to [`Endpoint::punches`], taken as early as the caller
/// likes so that none is missed). When a peer punched us and the plugins
/// are to hear of it, `notify(peer)` returns one future per plugin to tell;
/// they run in the driver's own task set. Returns when the socket's punch
/// channel closes; dropping the future stops it and those notifications.
pub async fn drive<F, T>(
    mut state: PunchState,
    mut punches: broadcast::Receiver<SocketAddr>,
    endpoint: Endpoint,
    discovery: Arc<dyn Discovery>,
    notify: F,
    targets: T,
) where
    F: Fn(SocketAddr) -> Vec<BoxFuture<'static, ()>> + Send + 'static,
    T: Fn() -> Vec<String> + Send + 'static,
{
    let local = endpoint.local_addr();
    let own = [local, SocketAddr::from((Ipv4Addr::LOCALHOST, local.port()))];
    let mut actions: Vec<PunchAction> = Vec::new();
    // Plugins' `on-punch` calls in flight; stopped with the loop.
    let mut notifications = JoinSet::new();
    loop {
        while notifications.try_join_next().is_some() {}
        // What the plugins want punched now: a swap may have changed it.
        state.set_targets(targets());
        actions.extend(state.poll(Instant::now()));
        while let Some(action) = actions.pop() {
            match action {
                PunchAction::Lookup(service) => {
                    let peers = discovery
                        .lookup(&service, LOOKUP_TIMEOUT)
                        .await
                        .unwrap_or_else(|e| {
                            // Asked again at the next punch interval.
                            tracing::debug!("cannot look up {service} to punch it: {e}");
                            Vec::new()
                        });
                    actions.extend(state.on_lookup(Instant::now(), &peers, &own));
                }
                PunchAction::SendPunch(peer) => {
                    tracing::debug!(%peer, "punch");
                    endpoint.punch(peer).await;
                }
                PunchAction::NotifyPlugins(peer) => {
                    tracing::debug!(%peer, "punched by");
                    for notification in notify(peer) {
                        notifications.spawn(notification);
                    }
                }
            }
        }
        let wake = state.next_wakeup().unwrap_or_else(|| Instant::now() + IDLE);
        tokio::select! {
            punched = punches.recv() => match punched {
                Ok(from) => actions.extend(state.on_punch(Instant::now(), from)),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!("{missed} punches arrived faster than they were handled");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}
