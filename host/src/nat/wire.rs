//! The introduction protocol's wire format (`docs/wire.md §5.1`) and the
//! introducer's ports (`docs/wire.md §5.2`).
//!
//! A datagram is [`MAGIC`] followed by one JSON [`Message`]; the socket's
//! demultiplexer ([`crate::transport`]) hands such datagrams to the host's
//! introduction driver, and the introducer's sockets read nothing else. Both
//! state machines ([`super::introducer`], [`super::host`]) speak [`Message`]s;
//! only the drivers [`encode`] and [`decode`] them.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::kind::{BirthdayRole, NatKind};

/// Every introduction datagram starts with these bytes; the socket's
/// demultiplexer sorts datagrams by them.
pub use crate::transport::INTRODUCTION_MAGIC as MAGIC;
/// Larger introduction datagrams are dropped unread.
pub use crate::transport::MAX_INTRODUCTION_DATAGRAM as MAX_DATAGRAM;

/// The introducer's answer to an introduction request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Outcome {
    /// The peer is registered; it has been asked to punch the caller.
    Peer { addr: SocketAddr, nat: NatKind },
    /// The peer is not registered here (not behind a NAT, or not ours).
    Unknown,
    /// Theory rules out a direct path between the two NATs, and the
    /// introducer cannot relay (see `reason`).
    Impossible { reason: String },
    /// No direct path (theory rules it out, or the caller asked after a
    /// failed punch): the introducer's main port relays between the caller
    /// and the peer at `addr` (`docs/wire.md §5.5`). `token` is the
    /// caller's for this session, 16 hex digits; the peer has been sent its
    /// own.
    Relay {
        addr: SocketAddr,
        nat: NatKind,
        token: String,
    },
    /// A relay was needed and refused: `reason` names the quota.
    RelayRefused { reason: String },
    /// The peer is registered behind a NAT that only birthday punching
    /// meets (`docs/wire.md §5.6`); it has been asked to play the other role.
    Birthday {
        addr: SocketAddr,
        nat: NatKind,
        role: BirthdayRole,
    },
}

impl std::fmt::Display for Outcome {
    /// For logs: the kind, the peer's address, its NAT and the reason;
    /// never a relay token (a session's secret).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Peer { addr, nat } => write!(f, "punch {addr} ({})", nat.describe()),
            Outcome::Unknown => f.write_str("unknown peer (not registered here)"),
            Outcome::Impossible { reason } => write!(f, "impossible: {reason}"),
            Outcome::Relay { addr, nat, .. } => write!(f, "relay to {addr} ({})", nat.describe()),
            Outcome::RelayRefused { reason } => write!(f, "relay refused: {reason}"),
            Outcome::Birthday { addr, nat, role } => write!(
                f,
                "birthday punching with {addr} ({}), the caller in the {} role",
                nat.describe(),
                role.as_str()
            ),
        }
    }
}

/// One introduction datagram (after [`MAGIC`], JSON; trailing spaces pad
/// it, see [`encode_padded`]).
///
/// A `cookie` is the introducer's proof that a host receives at the address
/// it sends from (return routability, as QUIC's Retry token or DTLS's
/// cookie): a keyed hash of that address, handed out in `observed`, which
/// `register` and `introduce` must echo. A registration's `key` is the
/// host's identity (its Ed25519 public key, 64 hex digits) and `sig` its
/// signature over [`registration_signed_bytes`] (the cookie and the port):
/// only that host can register under its key, and no one can replay a
/// registration from another address (the cookie names the address). The
/// introducer's `punch-request`s carry back the cookie of the host's
/// registration, which only the host and the introducer know, so the host
/// can tell them from forgeries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Message {
    /// Host → introducer: what address do you see?
    Probe { id: u64 },
    /// Host → introducer: I serve on local RPC port `port` behind `nat`.
    Register {
        id: u64,
        port: u16,
        nat: NatKind,
        #[serde(default)]
        cookie: String,
        /// The host's Ed25519 public key, 64 hex digits.
        #[serde(default)]
        key: String,
        /// Its signature over [`registration_signed_bytes`], 128 hex digits.
        #[serde(default)]
        sig: String,
    },
    /// Host → introducer: introduce me to `peer` (as announced on the DHT).
    ///
    /// `port`, `key` and `sig` are a registration's (see `register`): a
    /// host that is not registered (a `call`) is registered with them on
    /// the spot when it needs the relay. `relay` asks for the relay at once
    /// (a punched path failed).
    Introduce {
        id: u64,
        peer: SocketAddr,
        nat: NatKind,
        #[serde(default)]
        cookie: String,
        #[serde(default, skip_serializing_if = "is_false")]
        relay: bool,
        #[serde(default)]
        port: u16,
        #[serde(default)]
        key: String,
        #[serde(default)]
        sig: String,
    },
    /// Introducer → host: the answer to a probe or registration, or to a
    /// `register` / `introduce` whose cookie was missing or stale (then the
    /// host sends it again with this cookie).
    Observed {
        id: u64,
        addr: SocketAddr,
        #[serde(default)]
        cookie: String,
    },
    /// Introducer (other port) → host: arrives only through open filtering.
    FilterTest { id: u64 },
    /// Introducer → host: the answer to `introduce`.
    Introduced { id: u64, outcome: Outcome },
    /// Introducer → registered host: punch `peer`, it wants to connect.
    PunchRequest {
        peer: SocketAddr,
        nat: NatKind,
        /// The cookie the host's registration carried.
        #[serde(default)]
        cookie: String,
        /// Set when the introducer relays between the two: the host's
        /// token for the session (16 hex digits); the relay is the
        /// introducer's main port.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        relay_token: String,
        /// Set when the pair needs birthday punching: the role this host
        /// plays (`docs/wire.md §5.6`). Hosts that predate it ignore it and
        /// punch as for any introduction.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        birthday: Option<BirthdayRole>,
    },
    /// Host → introducer: got the punch request for `peer`; do not re-send it.
    PunchAck { peer: SocketAddr },
    /// Host → relayed peer, sent directly (never through the relay): can
    /// you hear me here? Answered by [`Message::PathOk`] with the same
    /// `nonce`, directly. Only that answer moves a relayed path to the
    /// direct one (`docs/wire.md §5.5`): a punch can be forged by anyone
    /// who knows the two addresses, the nonce only by someone who received
    /// the check.
    PathCheck { nonce: u64 },
    /// Relayed peer → host, directly: the answer to [`Message::PathCheck`].
    PathOk { nonce: u64 },
}

impl Message {
    /// The message's `type`, as on the wire (for logs: never the fields,
    /// which may hold a host's key).
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Probe { .. } => "probe",
            Message::Register { .. } => "register",
            Message::Introduce { .. } => "introduce",
            Message::Observed { .. } => "observed",
            Message::FilterTest { .. } => "filter-test",
            Message::Introduced { .. } => "introduced",
            Message::PunchRequest { .. } => "punch-request",
            Message::PunchAck { .. } => "punch-ack",
            Message::PathCheck { .. } => "path-check",
            Message::PathOk { .. } => "path-ok",
        }
    }
}

fn is_false(b: &bool) -> bool {
    !b
}

/// What a registration's signature covers: a fixed context, the cookie
/// (which names the host's observed address) and the local RPC port, big
/// endian.
pub fn registration_signed_bytes(cookie: &str, port: u16) -> Vec<u8> {
    let mut bytes = b"grenache-host register v1\0".to_vec();
    bytes.extend_from_slice(cookie.as_bytes());
    bytes.extend_from_slice(&port.to_be_bytes());
    bytes
}

/// What a host pads each of its datagrams to the introducer to: at least
/// the bytes of any answer the introducer gives a source it has not
/// verified (a probe's `observed` plus its filter test, with an IPv6
/// address), so the introducer never sends such a source more than it
/// received and is useless for reflection.
pub const HOST_DATAGRAM_MIN: usize = 320;

/// Whether a datagram is an introduction message.
pub fn is_introduction(bytes: &[u8]) -> bool {
    bytes.starts_with(&MAGIC)
}

/// The datagram for `message`.
pub fn encode(message: &Message) -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    serde_json::to_writer(&mut bytes, message).expect("messages serialise");
    bytes
}

/// The datagram for `message`, padded with trailing spaces (still valid
/// JSON) to at least `min` bytes.
pub fn encode_padded(message: &Message, min: usize) -> Vec<u8> {
    let mut bytes = encode(message);
    if bytes.len() < min {
        bytes.resize(min, b' ');
    }
    bytes
}

/// Parses a datagram; `Err` says why it is not a valid message.
pub fn decode(bytes: &[u8]) -> Result<Message, String> {
    if bytes.len() > MAX_DATAGRAM {
        return Err(format!("{} bytes, over {MAX_DATAGRAM}", bytes.len()));
    }
    let body = bytes.strip_prefix(&MAGIC).ok_or("no introduction header")?;
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

/// Where a host's introducer is: its two UDP ports (`docs/wire.md §5.2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntroducerAddr {
    /// The main port: probes, registrations, introductions and punch
    /// requests.
    pub main: SocketAddr,
    /// The other port, probed second: a symmetric NAT maps the host's socket
    /// to a different public port toward it.
    pub alt: SocketAddr,
}

impl IntroducerAddr {
    /// The convention: the introducer listens on the DHT node's port + 1
    /// (main) and + 2 (the probe's other port).
    pub fn beside_dht(dht: SocketAddr) -> Option<Self> {
        let main = dht.port().checked_add(1)?;
        let alt = dht.port().checked_add(2)?;
        Some(IntroducerAddr {
            main: SocketAddr::new(dht.ip(), main),
            alt: SocketAddr::new(dht.ip(), alt),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_survive_the_wire_and_garbage_does_not_parse() {
        let message = Message::Introduced {
            id: 7,
            outcome: Outcome::Peer {
                addr: "203.0.113.3:4000".parse().unwrap(),
                nat: NatKind::Symmetric,
            },
        };
        let bytes = encode(&message);
        assert!(is_introduction(&bytes));
        assert_eq!(decode(&bytes), Ok(message));
        // A birthday punch request names its role; an old one (without the
        // field) still parses, and a plain one is encoded as before.
        let ask = Message::PunchRequest {
            peer: "203.0.113.2:4000".parse().unwrap(),
            nat: NatKind::PortRestricted,
            cookie: "c".into(),
            birthday: Some(BirthdayRole::Sockets),
            relay_token: String::new(),
        };
        assert!(String::from_utf8_lossy(&encode(&ask)).contains(r#""birthday":"sockets""#));
        assert_eq!(decode(&encode(&ask)), Ok(ask));
        let old = br#"GRI1{"type":"punch-request","peer":"203.0.113.2:4000","nat":"symmetric","cookie":"c"}"#;
        let Ok(Message::PunchRequest { birthday, .. }) = decode(old) else {
            panic!("an old punch request does not parse");
        };
        assert_eq!(birthday, None);
        let plain = Message::PunchRequest {
            peer: "203.0.113.2:4000".parse().unwrap(),
            nat: NatKind::PortRestricted,
            cookie: "c".into(),
            birthday: None,
            relay_token: String::new(),
        };
        assert!(!String::from_utf8_lossy(&encode(&plain)).contains("birthday"));
        assert!(decode(b"GRI1{\"type\":\"nope\"}").is_err());
        assert!(decode(b"GRI1").is_err());
        let mut huge = MAGIC.to_vec();
        huge.resize(MAX_DATAGRAM + 1, b' ');
        assert!(decode(&huge).is_err());
        let padded = encode_padded(&Message::Probe { id: 1 }, HOST_DATAGRAM_MIN);
        assert_eq!(padded.len(), HOST_DATAGRAM_MIN);
        assert_eq!(decode(&padded), Ok(Message::Probe { id: 1 }));
        assert_eq!(
            crate::transport::classify(&bytes),
            crate::transport::Datagram::Introduction
        );
    }
}
