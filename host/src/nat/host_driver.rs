//! A host's introduction driver: runs its [`HostIntroductions`] with the RPC
//! socket and the clock, and gives the rest of the host an
//! [`IntroductionHandle`] to ask for introductions with.
//!
//! The driver sleeps until [`HostIntroductions::next_wakeup`], or until a
//! command, an introduction datagram or a punch arrives; each event's
//! [`Action`]s are carried out before it waits again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::host::{Action, HostIntroductions, IntroOutcome, IntroResult};
use super::kind::NatKind;
use super::wire;
use crate::transport::{Endpoint, Introductions};

/// How long the driver sleeps when the state machine has nothing scheduled
/// (no introducer, no paths): only a command, a datagram or a punch wakes it.
const IDLE: Duration = Duration::from_secs(3600);

/// What an [`IntroductionHandle`] asks of the driver.
enum Command {
    Introduce(SocketAddr, oneshot::Sender<IntroResult>),
    Used(SocketAddr),
}

/// A host's handle on its introduction driver; cheap to clone.
#[derive(Clone)]
pub struct IntroductionHandle {
    commands: mpsc::UnboundedSender<Command>,
    /// What the driver counted.
    pub stats: Arc<IntroductionStats>,
}

/// How the introductions this host asked for ended; introductions without
/// an introducer ([`IntroOutcome::NoIntroducer`]) are not counted.
#[derive(Debug, Default)]
pub struct IntroductionStats {
    /// [`IntroOutcome::Punched`].
    pub punched: AtomicU64,
    /// [`IntroOutcome::Impossible`].
    pub impossible: AtomicU64,
    /// [`IntroOutcome::UnknownPeer`].
    pub unknown_peer: AtomicU64,
    /// [`IntroOutcome::NoAnswer`].
    pub no_answer: AtomicU64,
}

impl IntroductionStats {
    fn count(&self, outcome: IntroOutcome) {
        let counter = match outcome {
            IntroOutcome::Punched => &self.punched,
            IntroOutcome::Impossible => &self.impossible,
            IntroOutcome::UnknownPeer => &self.unknown_peer,
            IntroOutcome::NoAnswer => &self.no_answer,
            IntroOutcome::NoIntroducer => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Every counted outcome with its count.
    pub fn counts(&self) -> [(IntroOutcome, u64); 4] {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            (IntroOutcome::Punched, load(&self.punched)),
            (IntroOutcome::Impossible, load(&self.impossible)),
            (IntroOutcome::UnknownPeer, load(&self.unknown_peer)),
            (IntroOutcome::NoAnswer, load(&self.no_answer)),
        ]
    }
}

impl IntroductionHandle {
    /// Asks the introducer to introduce this host to `peer` (as found on the
    /// DHT) and starts punching it if it is behind a NAT.
    pub async fn introduce(&self, peer: SocketAddr) -> IntroResult {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Introduce(peer, tx)).is_err() {
            return IntroResult::Direct;
        }
        rx.await.unwrap_or(IntroResult::Direct)
    }

    /// A request went over the introduced path to `addr`: keep it alive.
    pub fn used(&self, addr: SocketAddr) {
        let _ = self.commands.send(Command::Used(addr));
    }
}

/// Starts the driver of `state` on `endpoint`'s socket as a task of
/// `tasks`; it stops when the last handle is dropped or `tasks` stops it.
pub fn spawn(
    endpoint: Endpoint,
    incoming: Introductions,
    state: HostIntroductions,
    tasks: &mut tokio::task::JoinSet<()>,
) -> IntroductionHandle {
    let (commands, rx) = mpsc::unbounded_channel();
    let stats = Arc::new(IntroductionStats::default());
    tasks.spawn(drive(endpoint, incoming, rx, state, stats.clone()));
    IntroductionHandle { commands, stats }
}

async fn drive(
    endpoint: Endpoint,
    mut incoming: Introductions,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut state: HostIntroductions,
    stats: Arc<IntroductionStats>,
) {
    let mut punches = endpoint.punches();
    let mut waiting: HashMap<u64, oneshot::Sender<IntroResult>> = HashMap::new();
    let mut actions = state.poll(Instant::now());
    // A serving host reports its NAT in its log; a one-shot `call` keeps quiet.
    let loud = state.registers();
    loop {
        for action in actions.drain(..) {
            if let Action::Introduced { outcome, .. } = &action {
                stats.count(*outcome);
            }
            execute(&endpoint, &mut waiting, action, loud).await;
        }
        let wake = state.next_wakeup().unwrap_or_else(|| Instant::now() + IDLE);
        tokio::select! {
            command = commands.recv() => match command {
                Some(Command::Introduce(peer, reply)) => {
                    let (id, more) = state.introduce(Instant::now(), peer);
                    waiting.insert(id, reply);
                    actions = more;
                }
                Some(Command::Used(addr)) => state.used(Instant::now(), addr),
                None => return,
            },
            datagram = incoming.recv() => match datagram {
                Some((from, bytes)) => match wire::decode(&bytes) {
                    Ok(message) => actions = state.on_message(Instant::now(), from, message),
                    Err(e) => {
                        endpoint.stats.garbage_datagrams.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%from, "dropped a bad introduction message: {e}");
                    }
                },
                None => return,
            },
            punch = punches.recv() => {
                if let Ok(from) = punch {
                    actions = state.on_punch(Instant::now(), from);
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => actions = state.poll(Instant::now()),
        }
    }
}

async fn execute(
    endpoint: &Endpoint,
    waiting: &mut HashMap<u64, oneshot::Sender<IntroResult>>,
    action: Action,
    loud: bool,
) {
    match action {
        Action::Send { to, message } => {
            endpoint
                .send_introduction(to, &wire::encode_padded(&message, wire::HOST_DATAGRAM_MIN))
                .await
        }
        Action::Punch(to) => endpoint.punch(to).await,
        Action::Introduced { id, result, .. } => {
            if let Some(reply) = waiting.remove(&id) {
                let _ = reply.send(result);
            }
        }
        Action::NatDetected { kind, observed } => {
            let message = match (kind, observed) {
                (NatKind::Unknown, _) | (_, None) => "no introducer answered; peers behind NATs are reachable only if they punch this host (start `grenache-host dht`, or pass --introducer)".to_string(),
                (kind, Some(observed)) => format!(
                    "the introducer sees this host at {observed}, behind {}",
                    kind.describe()
                ),
            };
            if loud {
                tracing::info!("{message}");
            } else {
                tracing::debug!("{message}");
            }
        }
        Action::PunchRequested(peer) => {
            tracing::info!(%peer, "introduced to a peer that wants to connect; punching it")
        }
    }
}
