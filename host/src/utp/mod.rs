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
//! - [`driver`]: the tokio side: the socket behind a mutex, the wakers of
//!   waiting tasks, and the stream types ([`UtpStream`], split into an
//!   `AsyncRead` half and a message-per-write `AsyncWrite` half).
//!
//! Like quinn-proto, the protocol modules read no clock and own no socket:
//! the host's transport (`crate::transport`) owns the UDP socket, feeds
//! datagrams and the time in and sends what comes out; the tests do the
//! same in simulated time.

pub mod connection;
pub mod driver;
pub mod packet;
pub mod socket;
#[cfg(test)]
mod tests;

pub use connection::{
    ConnectionError, RecvError, SendError, State, MAX_PAYLOAD, PEER_SILENCE_LIMIT, SYN_RETRY,
};
pub use driver::{Connecting, Utp, UtpReadHalf, UtpStream, UtpWriteHalf};
pub use socket::{ConnectLimit, ConnectionHandle, Socket, SocketStats, Transmit};
