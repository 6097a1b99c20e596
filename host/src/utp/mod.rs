//! Our own uTP (BEP 29), written for what Grenache's Node peers read: one
//! message per packet start, up to 1382 bytes in one packet from the first
//! packet of a connection, libutp's handshake conventions (docs/wire.md
//! §3–4).
//!
//! - [`packet`]: the wire format (header, extensions, selective ACK).

pub mod packet;
