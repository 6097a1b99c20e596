//! The I/O side of introductions ([`super::introduction`]): the introducer a
//! `dht` node runs on two UDP ports, and the driver that runs each host's
//! [`HostIntroductions`] with its RPC socket and the clock.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

use super::introduction::{
    self, Action, HostIntroductions, IntroResult, Introducer, NatKind, Port, MAX_DATAGRAM,
};
use crate::transport::{Endpoint, Introductions};

/// The introducer's two sockets.
pub struct IntroducerSockets {
    main: UdpSocket,
    alt: UdpSocket,
}

impl IntroducerSockets {
    /// Binds the main port and the one after it on `ip`.
    pub async fn bind(ip: IpAddr, port: u16) -> anyhow::Result<Self> {
        let alt_port = port
            .checked_add(1)
            .ok_or_else(|| anyhow::anyhow!("the introducer needs two ports; {port} is the last"))?;
        let bind = |port| async move {
            UdpSocket::bind((ip, port)).await.map_err(|e| {
                anyhow::anyhow!(
                    "cannot bind the introducer to {ip}:{port}: {e}; pick free ports with --introducer-port"
                )
            })
        };
        Ok(IntroducerSockets {
            main: bind(port).await?,
            alt: bind(alt_port).await?,
        })
    }

    /// The main port's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.main
            .local_addr()
            .expect("a bound socket has an address")
    }

    /// Answers probes, registrations and introductions forever.
    pub async fn serve(self) {
        let mut state = Introducer::new();
        let (mut main_buf, mut alt_buf) = ([0u8; MAX_DATAGRAM + 1], [0u8; MAX_DATAGRAM + 1]);
        loop {
            let (via, received) = tokio::select! {
                r = self.main.recv_from(&mut main_buf) => (Port::Main, r),
                r = self.alt.recv_from(&mut alt_buf) => (Port::Alt, r),
            };
            let (n, from) = match received {
                Ok(r) => r,
                Err(e) => {
                    // ICMP errors from hosts that went away: not ours to fix.
                    tracing::debug!("introducer receive error (ignored): {e}");
                    continue;
                }
            };
            let bytes = if via == Port::Main {
                &main_buf[..n]
            } else {
                &alt_buf[..n]
            };
            let message = match introduction::decode(bytes) {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(%from, "introducer dropped a bad datagram: {e}");
                    continue;
                }
            };
            tracing::debug!(%from, ?message, "introducer received");
            for out in state.on_message(Instant::now(), via, from, message) {
                let fresh;
                let socket = match out.via {
                    Port::Main => &self.main,
                    Port::Alt => &self.alt,
                    Port::Fresh => {
                        let ip = self.main.local_addr().map(|a| a.ip());
                        fresh = match ip.map(|ip| std::net::UdpSocket::bind((ip, 0))) {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) | Err(e) => {
                                tracing::debug!("no socket for a filter test: {e}");
                                continue;
                            }
                        };
                        if let Err(e) = fresh.send_to(&introduction::encode(&out.message), out.to) {
                            tracing::debug!(to = %out.to, "introducer send failed: {e}");
                        }
                        continue;
                    }
                };
                if let introduction::Message::Introduced { outcome, .. } = &out.message {
                    tracing::info!(%from, ?outcome, "introduction");
                }
                if let Err(e) = socket
                    .send_to(&introduction::encode(&out.message), out.to)
                    .await
                {
                    tracing::debug!(to = %out.to, "introducer send failed: {e}");
                }
            }
        }
    }
}

enum Command {
    Introduce(SocketAddr, oneshot::Sender<IntroResult>),
    Used(SocketAddr),
}

/// A host's handle on its introduction driver; cheap to clone.
#[derive(Clone)]
pub struct IntroductionHandle {
    commands: mpsc::UnboundedSender<Command>,
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
    tasks.spawn(drive(endpoint, incoming, rx, state));
    IntroductionHandle { commands }
}

async fn drive(
    endpoint: Endpoint,
    mut incoming: Introductions,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut state: HostIntroductions,
) {
    let mut punches = endpoint.punches();
    let mut waiting: HashMap<u64, oneshot::Sender<IntroResult>> = HashMap::new();
    let mut actions = state.poll(Instant::now());
    // A serving host reports its NAT in its log; a one-shot `call` keeps quiet.
    let loud = state.registers();
    loop {
        for action in actions.drain(..) {
            execute(&endpoint, &mut waiting, action, loud).await;
        }
        let wake = state
            .next_wakeup()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
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
                Some((from, bytes)) => match introduction::decode(&bytes) {
                    Ok(message) => actions = state.on_message(Instant::now(), from, message),
                    Err(e) => {
                        endpoint.stats.garbage_datagrams.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
                .send_introduction(to, &introduction::encode(&message))
                .await
        }
        Action::Punch(to) => endpoint.punch(to).await,
        Action::Introduced { id, result } => {
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
