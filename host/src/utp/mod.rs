//! Our own uTP (BEP 29), written for what Grenache's Node peers read: one
//! message per packet start, up to 1382 bytes in one packet from the first
//! packet of a connection, libutp's handshake conventions (docs/wire.md
//! §3–4).
//!
//! - [`packet`]: the wire format (header, extensions, selective ACK).
//! - [`connection`]: one connection as a sans-IO state machine: handshake,
//!   message-per-packet sending, retransmission, congestion window,
//!   ordered delivery, FIN and RESET, peer silence.
//! - [`socket`]: every connection of one UDP socket, sans-IO: routing by
//!   (address, connection id), SYNs, bounds.
//!
//! Like quinn-proto, nothing here reads a clock or owns a socket: the host's
//! transport (`crate::transport`) feeds datagrams and the time in and sends
//! what comes out; the tests do the same in simulated time.

pub mod connection;
pub mod packet;
pub mod socket;
#[cfg(test)]
mod tests;

pub use connection::{
    ConnectionError, RecvError, SendError, State, MAX_PAYLOAD, PEER_SILENCE_LIMIT, SYN_RETRY,
};
pub use socket::{ConnectLimit, ConnectionHandle, Socket, SocketStats, Transmit};
