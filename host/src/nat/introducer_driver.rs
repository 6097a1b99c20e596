//! The introducer's I/O: the two UDP sockets a public `dht` node serves
//! introductions on (`docs/wire.md §5.2`), driving [`Introducer`].
//!
//! Each datagram is decoded ([`wire::decode`]), handed to the state machine
//! with the current time, and its answers are encoded and sent from the
//! socket they name (a filter test from a fresh one). A relay frame on the
//! main port takes the fast path: parsed in place, decided by
//! [`Introducer::relay_frame`] and sent on rewritten, with no allocation but
//! the frame out.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::net::UdpSocket;

use super::introducer::{Introducer, Port};
use super::relay::{RelayLimits, RelayStats};
use super::wire::{self, MAX_DATAGRAM};
use crate::transport::{parse_relay_frame, relay_frame, RELAY_MAGIC};

/// The largest datagram the main port reads: a relay frame carries a whole
/// uTP packet (about 1.4 KB); anything longer is cut and then dropped.
const MAX_MAIN_DATAGRAM: usize = 2048;
/// How often the relay's counters are logged while they change.
const RELAY_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
/// How often the introducer forgets expired registrations and ends idle
/// relay sessions while no datagram arrives (so its metrics stay current).
const TICK: std::time::Duration = std::time::Duration::from_secs(5);

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

    /// Answers probes, registrations and introductions and relays between
    /// registered hosts within `limits`, forever; `stats` gets the relay's
    /// counters after every relay frame and introduction.
    pub async fn serve(self, limits: RelayLimits, stats: Arc<Mutex<RelayStats>>) {
        let mut state = Introducer::with_relay(limits);
        let (mut main_buf, mut alt_buf) = ([0u8; MAX_MAIN_DATAGRAM], [0u8; MAX_DATAGRAM + 1]);
        let mut next_log = Instant::now() + RELAY_LOG_INTERVAL;
        let mut logged = RelayStats::default();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let now = Instant::now();
            if now >= next_log {
                next_log = now + RELAY_LOG_INTERVAL;
                let current = state.relay_stats();
                if current != logged {
                    tracing::info!("relay: {}", current.summary());
                    logged = current;
                }
            }
            let (via, received) = tokio::select! {
                r = self.main.recv_from(&mut main_buf) => (Port::Main, r),
                r = self.alt.recv_from(&mut alt_buf) => (Port::Alt, r),
                _ = tick.tick() => {
                    state.tick(Instant::now());
                    *stats.lock().unwrap_or_else(|p| p.into_inner()) = state.relay_stats();
                    continue;
                }
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
            if via == Port::Main && bytes.starts_with(&RELAY_MAGIC) {
                match parse_relay_frame(bytes).filter(|_| n < MAX_MAIN_DATAGRAM) {
                    Some(frame) => {
                        let to = frame.addr;
                        if let Some(token) =
                            state.relay_frame(Instant::now(), from, &frame.token, to, n)
                        {
                            // Same family both ways: exactly as long as
                            // the frame in.
                            let out = relay_frame(token, from, frame.payload);
                            debug_assert_eq!(out.len(), n);
                            if let Err(e) = self.main.send_to(&out, to).await {
                                tracing::debug!(%to, "relay send failed: {e}");
                            }
                        }
                    }
                    None => state.malformed_relay_frame(),
                }
                *stats.lock().unwrap_or_else(|p| p.into_inner()) = state.relay_stats();
                continue;
            }
            let message = match wire::decode(bytes) {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(%from, "introducer dropped a bad datagram: {e}");
                    continue;
                }
            };
            // The message's type only: a registration carries its host's key.
            tracing::debug!(%from, kind = message.kind(), "introducer received");
            let refused = state.stats().refused_registrations;
            let out = state.on_message(Instant::now(), via, from, message, n);
            if state.stats().refused_registrations > refused {
                tracing::debug!(%from, "refused a registration: its address or claimed port belongs to another live host, or its IP's share of the table is full");
            }
            *stats.lock().unwrap_or_else(|p| p.into_inner()) = state.relay_stats();
            for out in out {
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
                        if let Err(e) = fresh.send_to(&wire::encode(&out.message), out.to) {
                            tracing::debug!(to = %out.to, "introducer send failed: {e}");
                        }
                        continue;
                    }
                };
                if let wire::Message::Introduced { outcome, .. } = &out.message {
                    tracing::debug!(%from, "introduction: {outcome}");
                }
                if let Err(e) = socket.send_to(&wire::encode(&out.message), out.to).await {
                    tracing::debug!(to = %out.to, "introducer send failed: {e}");
                }
            }
        }
    }
}
