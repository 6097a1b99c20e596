//! What one datagram on the shared socket is, from its first bytes alone:
//! a punch, an introduction message or a uTP packet (docs/wire.md §1).
//! Self-contained, so the fuzz targets (fuzz/) compile it as it is.

use crate::utp::packet::HEADER_LEN as UTP_HEADER;

/// The punch datagram: `ÿ` in UTF-8, exactly the two bytes Grenache's
/// boxgloves sends (docs/wire.md §1).
pub const PUNCH: [u8; 2] = [0xC3, 0xBF];
/// Every introduction datagram starts with these bytes (never a uTP header:
/// `G` is not a uTP version-1 type byte, and never the 2-byte punch). What
/// follows is the introduction protocol's business ([`crate::nat`]).
pub const INTRODUCTION_MAGIC: [u8; 4] = *b"GRI1";
/// Larger introduction datagrams are dropped unread and counted.
pub const MAX_INTRODUCTION_DATAGRAM: usize = 1024;

/// What one received datagram is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datagram {
    /// Exactly `C3 BF`.
    Punch,
    /// Starts with [`INTRODUCTION_MAGIC`].
    Introduction,
    /// Long enough, version 1, a known packet type: hand it to uTP.
    Utp,
    /// Neither: drop it.
    Garbage,
}

/// Sorts a datagram (docs/wire.md §1, TV-1: only the exact two bytes are a
/// punch; nothing shorter than a uTP header reaches uTP).
pub fn classify(bytes: &[u8]) -> Datagram {
    if bytes == PUNCH {
        return Datagram::Punch;
    }
    if bytes.starts_with(&INTRODUCTION_MAGIC) {
        return Datagram::Introduction;
    }
    // First byte: packet type (0..=4) in the high nibble, version 1 in the low.
    match bytes.first() {
        Some(&b) if bytes.len() >= UTP_HEADER && b & 0x0F == 1 && b >> 4 <= 4 => Datagram::Utp,
        _ => Datagram::Garbage,
    }
}
