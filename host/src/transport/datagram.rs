//! What one datagram on the shared socket is, from its first bytes alone:
//! a punch, an introduction message, a relay frame or a uTP packet
//! (docs/wire.md §1), and the relay frame's layout (docs/wire.md §5).
//! Self-contained, so the fuzz targets (fuzz/) compile it as it is.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

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

/// Every relay frame starts with these bytes (never a uTP header, a punch
/// or an introduction).
pub const RELAY_MAGIC: [u8; 4] = *b"GRR1";
/// Bytes of a relay session token.
pub const RELAY_TOKEN_LEN: usize = 8;

/// One relay frame: [`RELAY_MAGIC`], the session `token`
/// ([`RELAY_TOKEN_LEN`] bytes), an address (1 byte: 4 or 6; the IP, 4 or 16
/// bytes; the port, 2 bytes big endian), then the payload (a uTP packet or
/// a punch). Host → relay: `addr` is the destination peer as the relay knows
/// it and `token` the sender's token for that session. Relay → host: `addr`
/// is the source peer and `token` the receiver's token, which only the relay
/// and the receiver know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayFrame<'a> {
    pub token: [u8; RELAY_TOKEN_LEN],
    pub addr: SocketAddr,
    pub payload: &'a [u8],
}

/// The bytes a relay frame adds to its payload for `addr`: 19 (IPv4) or 31
/// (IPv6).
pub fn relay_overhead(addr: SocketAddr) -> usize {
    let ip = match addr {
        SocketAddr::V4(_) => 4,
        SocketAddr::V6(_) => 16,
    };
    RELAY_MAGIC.len() + RELAY_TOKEN_LEN + 1 + ip + 2
}

/// The relay frame carrying `payload` (see [`RelayFrame`]).
pub fn relay_frame(token: [u8; RELAY_TOKEN_LEN], addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(relay_overhead(addr) + payload.len());
    out.extend_from_slice(&RELAY_MAGIC);
    out.extend_from_slice(&token);
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads a relay frame; `None` when `bytes` is not one (wrong magic, short,
/// an unknown address family).
pub fn parse_relay_frame(bytes: &[u8]) -> Option<RelayFrame<'_>> {
    let rest = bytes.strip_prefix(&RELAY_MAGIC)?;
    let (token, rest) = rest.split_first_chunk::<RELAY_TOKEN_LEN>()?;
    let (&family, rest) = rest.split_first()?;
    let (ip, rest) = match family {
        4 => {
            let (ip, rest) = rest.split_first_chunk::<4>()?;
            (IpAddr::V4(Ipv4Addr::from(*ip)), rest)
        }
        6 => {
            let (ip, rest) = rest.split_first_chunk::<16>()?;
            (IpAddr::V6(Ipv6Addr::from(*ip)), rest)
        }
        _ => return None,
    };
    let (port, payload) = rest.split_first_chunk::<2>()?;
    Some(RelayFrame {
        token: *token,
        addr: SocketAddr::new(ip, u16::from_be_bytes(*port)),
        payload,
    })
}

/// What one received datagram is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datagram {
    /// Exactly `C3 BF`.
    Punch,
    /// Starts with [`INTRODUCTION_MAGIC`].
    Introduction,
    /// Starts with [`RELAY_MAGIC`]: a relay frame (or garbage that says it
    /// is one; [`parse_relay_frame`] tells).
    Relay,
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
    if bytes.starts_with(&RELAY_MAGIC) {
        return Datagram::Relay;
    }
    // First byte: packet type (0..=4) in the high nibble, version 1 in the low.
    match bytes.first() {
        Some(&b) if bytes.len() >= UTP_HEADER && b & 0x0F == 1 && b >> 4 <= 4 => Datagram::Utp,
        _ => Datagram::Garbage,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_frames_carry_their_parts_and_garbage_is_none() {
        for addr in ["203.0.113.3:4000", "[2001:db8::7]:65535"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let frame = relay_frame([5; RELAY_TOKEN_LEN], addr, &PUNCH);
            assert_eq!(frame.len(), relay_overhead(addr) + 2);
            assert_eq!(classify(&frame), Datagram::Relay);
            assert_eq!(
                parse_relay_frame(&frame),
                Some(RelayFrame {
                    token: [5; RELAY_TOKEN_LEN],
                    addr,
                    payload: &PUNCH
                })
            );
            // Every truncation short of the address is refused.
            for n in 0..relay_overhead(addr) {
                assert_eq!(parse_relay_frame(&frame[..n]), None, "{n} bytes");
            }
        }
        let mut bad_family = relay_frame([0; RELAY_TOKEN_LEN], "10.0.0.1:1".parse().unwrap(), b"");
        bad_family[RELAY_MAGIC.len() + RELAY_TOKEN_LEN] = 5;
        assert_eq!(parse_relay_frame(&bad_family), None);
        assert_eq!(parse_relay_frame(b"GRI1{}"), None);
    }
}
