//! The introducer's I/O: the two UDP sockets a public `dht` node serves
//! introductions on (`docs/wire.md §5.2`), driving [`Introducer`].
//!
//! Each datagram is decoded ([`wire::decode`]), handed to the state machine
//! with the current time, and its answers are encoded and sent from the
//! socket they name (a filter test from a fresh one).

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use tokio::net::UdpSocket;

use super::introducer::{Introducer, Port};
use super::wire::{self, MAX_DATAGRAM};

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
                    tracing::info!(%from, ?outcome, "introduction");
                }
                if let Err(e) = socket.send_to(&wire::encode(&out.message), out.to).await {
                    tracing::debug!(to = %out.to, "introducer send failed: {e}");
                }
            }
        }
    }
}
