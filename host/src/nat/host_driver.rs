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

use super::birthday::{self, Report};
use super::host::{Action, HostIntroductions, IntroOutcome, IntroResult, RELAYED_PUNCH_INTERVAL};
use super::kind::{BirthdayRole, NatKind};
use super::wire;
use crate::transport::{Endpoint, Introductions, PathKind, Route, PUNCH};

/// How long the driver sleeps when the state machine has nothing scheduled
/// (no introducer, no paths): only a command, a datagram or a punch wakes it.
const IDLE: Duration = Duration::from_secs(3600);

/// What an [`IntroductionHandle`] asks of the driver.
enum Command {
    /// Introduce us to the peer; `true`: ask for the relay at once.
    Introduce(SocketAddr, bool, oneshot::Sender<IntroResult>),
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
    /// [`IntroOutcome::Relayed`].
    pub relayed: AtomicU64,
    /// [`IntroOutcome::Impossible`].
    pub impossible: AtomicU64,
    /// [`IntroOutcome::UnknownPeer`].
    pub unknown_peer: AtomicU64,
    /// [`IntroOutcome::NoAnswer`].
    pub no_answer: AtomicU64,
    /// [`IntroOutcome::Birthday`].
    pub birthday: AtomicU64,
    /// Birthday attempts this host refused (its own or asked for by the
    /// introducer): one was under way, or over the rate.
    pub birthdays_refused: AtomicU64,
}

impl IntroductionStats {
    fn count(&self, outcome: IntroOutcome) {
        let counter = match outcome {
            IntroOutcome::Punched => &self.punched,
            IntroOutcome::Relayed => &self.relayed,
            IntroOutcome::Impossible => &self.impossible,
            IntroOutcome::UnknownPeer => &self.unknown_peer,
            IntroOutcome::NoAnswer => &self.no_answer,
            IntroOutcome::Birthday => &self.birthday,
            IntroOutcome::NoIntroducer => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Every counted outcome with its count.
    pub fn counts(&self) -> [(IntroOutcome, u64); 6] {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            (IntroOutcome::Punched, load(&self.punched)),
            (IntroOutcome::Relayed, load(&self.relayed)),
            (IntroOutcome::Birthday, load(&self.birthday)),
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
        self.ask(peer, false).await
    }

    /// Asks the introducer to relay between this host and `peer` (a
    /// punched connect failed); [`IntroResult::Relayed`] when it does, with
    /// the route set.
    pub async fn introduce_relayed(&self, peer: SocketAddr) -> IntroResult {
        self.ask(peer, true).await
    }

    async fn ask(&self, peer: SocketAddr, relay: bool) -> IntroResult {
        let (tx, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::Introduce(peer, relay, tx))
            .is_err()
        {
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
    let (socket_punches, mut socket_punched) = mpsc::channel(SOCKET_PUNCH_BACKLOG);
    let mut extra = ExtraSockets::new(socket_punches);
    let mut actions = state.poll(Instant::now());
    // A serving host reports its NAT in its log; a one-shot `call` keeps quiet.
    let loud = state.registers();
    loop {
        for action in actions.drain(..) {
            if let Action::Introduced { outcome, .. } = &action {
                stats.count(*outcome);
            }
            execute(&endpoint, &mut waiting, &mut extra, action, loud).await;
        }
        stats
            .birthdays_refused
            .store(state.birthdays_refused(), Ordering::Relaxed);
        let wake = state.next_wakeup().unwrap_or_else(|| Instant::now() + IDLE);
        tokio::select! {
            command = commands.recv() => match command {
                Some(Command::Introduce(peer, relay, reply)) => {
                    let (id, more) = match relay {
                        true => state.introduce_relayed(Instant::now(), peer),
                        false => state.introduce(Instant::now(), peer),
                    };
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
            Some((generation, index, from)) = socket_punched.recv() => {
                if generation == extra.generation {
                    actions = state.on_socket_punch(Instant::now(), index, from);
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {
                // Relayed paths the peer sends on are in use (a serving
                // host sees no other sign of it); the rest expire.
                let now = Instant::now();
                let since = now.checked_sub(RELAYED_PUNCH_INTERVAL * 2).unwrap_or(now);
                for peer in endpoint.relayed_heard_since(since) {
                    state.used(now, peer);
                }
                actions = state.poll(now);
            }
        }
    }
}

/// Punches the extra sockets received, waiting for the driver; more are
/// dropped (the peer punches again).
const SOCKET_PUNCH_BACKLOG: usize = 64;

/// The extra sockets of the birthday attempt under way
/// ([`Action::OpenSockets`]), each read by a task that passes on the
/// punches it receives, tagged with the attempt's generation and the
/// socket's index.
struct ExtraSockets {
    sockets: Vec<Arc<tokio::net::UdpSocket>>,
    readers: tokio::task::JoinSet<()>,
    generation: u64,
    punched: mpsc::Sender<(u64, usize, SocketAddr)>,
}

impl ExtraSockets {
    fn new(punched: mpsc::Sender<(u64, usize, SocketAddr)>) -> Self {
        ExtraSockets {
            sockets: vec![],
            readers: tokio::task::JoinSet::new(),
            generation: 0,
            punched,
        }
    }

    /// Opens up to `count` sockets on `ip`, any port; returns how many
    /// opened and the first error, if any stopped it.
    fn open(&mut self, ip: std::net::IpAddr, count: usize) -> (usize, Option<std::io::Error>) {
        self.close();
        self.generation += 1;
        let mut error = None;
        for index in 0..count {
            let socket = std::net::UdpSocket::bind((ip, 0))
                .and_then(|s| s.set_nonblocking(true).map(|_| s))
                .and_then(tokio::net::UdpSocket::from_std);
            let socket = match socket {
                Ok(socket) => Arc::new(socket),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            };
            let (reader, punched, generation) =
                (socket.clone(), self.punched.clone(), self.generation);
            self.readers.spawn(async move {
                let mut buf = [0u8; 64];
                loop {
                    match reader.recv_from(&mut buf).await {
                        Ok((n, from)) if buf[..n] == PUNCH => {
                            let _ = punched.try_send((generation, index, from));
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::debug!(
                                "birthday socket {index}: receive error (ignored): {e}"
                            );
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            });
            self.sockets.push(socket);
        }
        (self.sockets.len(), error)
    }

    /// One punch to `peer` from every socket; returns how many left.
    /// Straight to the kernel: tokio's `try_send_to` answers `WouldBlock`
    /// on a socket the reactor has not yet seen writable (every new one),
    /// which silently lost the whole first round.
    fn punch_all(&self, peer: SocketAddr) -> u64 {
        let peer = socket2::SockAddr::from(peer);
        let sent = self.sockets.iter().filter(|s| {
            socket2::SockRef::from(s.as_ref())
                .send_to(&PUNCH, &peer)
                .is_ok()
        });
        sent.count() as u64
    }

    /// Takes socket `index` out and closes the others.
    fn take(&mut self, index: usize) -> Option<Arc<tokio::net::UdpSocket>> {
        let socket = self.sockets.get(index).cloned();
        self.close();
        socket
    }

    fn close(&mut self) {
        // Dropping the set aborts the readers, and with them the sockets.
        self.readers = tokio::task::JoinSet::new();
        self.sockets.clear();
    }
}

async fn execute(
    endpoint: &Endpoint,
    waiting: &mut HashMap<u64, oneshot::Sender<IntroResult>>,
    extra: &mut ExtraSockets,
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
            match (kind, observed) {
                // Worth a warning for a one-shot `call` too: its calls to
                // hosts behind NATs will time out.
                (NatKind::Unknown, _) | (_, None) => tracing::warn!(
                    "no introducer answered (the one given by --introducer, or beside the first --bootstrap node: is `grenache-host dht` or `grape` running there?); peers behind NATs are reachable only if they punch this host"
                ),
                (kind, Some(observed)) => {
                    let message = format!(
                        "the introducer sees this host at {observed}, behind {}",
                        kind.describe()
                    );
                    if loud {
                        tracing::info!("{message}");
                    } else {
                        tracing::debug!("{message}");
                    }
                }
            }
        }
        Action::PunchRequested(peer) => {
            tracing::info!(%peer, "introduced to a peer that wants to connect; punching it")
        }
        Action::Relay { peer, relay, token } => {
            if endpoint.set_route(peer, Route::Relay { relay, token }) {
                tracing::info!(%peer, "the path to {peer} is relayed by {relay} (no direct path)");
            } else {
                tracing::warn!(%peer, "no room for a relayed path to {peer}: {} peers have routes already", crate::transport::MAX_ROUTES);
            }
        }
        Action::Unrelay { peer, direct: true } => endpoint.move_to_direct(peer),
        Action::Unrelay {
            peer,
            direct: false,
        } => {
            if endpoint.path_kind(peer) == PathKind::Relayed {
                endpoint.clear_route(peer);
                tracing::debug!(%peer, "forgot the relayed path to {peer}");
            }
        }
        Action::BirthdayStarted { peer, role } => match role {
            BirthdayRole::Sockets => tracing::info!(
                %peer,
                "birthday punching started: {} extra sockets punch it every {:?} for up to {:?}",
                birthday::SOCKETS,
                birthday::SOCKET_ROUND,
                birthday::ATTEMPT_TIME
            ),
            BirthdayRole::Probe => tracing::info!(
                %peer,
                "birthday punching started: probing random ports of its IP, {}/s, at most {}, for up to {:?}",
                birthday::PROBES_PER_SECOND,
                birthday::MAX_PROBES,
                birthday::ATTEMPT_TIME
            ),
        },
        Action::OpenSockets { peer, count } => {
            let (opened, error) = extra.open(endpoint.local_addr().ip(), count);
            if let Some(e) = error {
                tracing::warn!(%peer, "birthday punching opened only {opened} of {count} sockets: {e} (raise the open-files limit, `ulimit -n`)");
            }
        }
        Action::PunchFromSockets(peer) => {
            let sent = extra.punch_all(peer);
            endpoint
                .stats
                .punches_sent
                .fetch_add(sent, Ordering::Relaxed);
        }
        Action::AdoptSocket { index, peer } => {
            if let Some(socket) = extra.take(index) {
                if !endpoint.adopt(socket, peer) {
                    tracing::warn!(%peer, "birthday punching met the peer, but the route table is full; the path is not used");
                }
            }
        }
        Action::CloseSockets => extra.close(),
        Action::ReleaseSocket(peer) => {
            if endpoint.path_kind(peer) == crate::transport::PathKind::Birthday {
                tracing::info!(%peer, "the birthday path is no longer used; its socket is closed");
                endpoint.clear_route(peer);
            }
        }
        Action::BirthdayEnded(report) => log_birthday(&report),
        Action::BirthdayRefused { peer, reason } => {
            tracing::info!(%peer, "birthday punching refused: {reason}")
        }
    }
}

/// Says how a birthday attempt ended.
fn log_birthday(report: &Report) {
    let Report {
        peer,
        role,
        met,
        took,
        punches,
    } = report;
    let sent = match role {
        BirthdayRole::Sockets => format!("{punches} punches from {} sockets", birthday::SOCKETS),
        BirthdayRole::Probe => format!("{punches} probes"),
    };
    let took = took.as_secs_f64() * 1e3;
    match met {
        Some(at) => {
            tracing::info!(%peer, "birthday punching met the peer at {at} after {took:.0} ms ({sent})")
        }
        None => {
            tracing::info!(%peer, "birthday punching gave up after {took:.0} ms: no punch came back ({sent}); the extra sockets are closed")
        }
    }
}
