//! KRPC messages (BEP 5) as the server node reads and writes them: bencoded
//! dictionaries, decoded strictly and bounded (`serde_bencode`), never
//! panicking on input.
//!
//! A datagram is at most [`MAX_DATAGRAM`] bytes, nested at most
//! [`MAX_NESTING`] lists/dictionaries deep, and carries a transaction id
//! `t` of 1..=[`MAX_TRANSACTION_ID`] bytes, echoed as-is in the answer.

use std::net::{Ipv4Addr, SocketAddrV4};

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// Largest datagram read (bytes); larger ones are malformed. BEP 5 messages
/// fit one Ethernet MTU.
pub const MAX_DATAGRAM: usize = 1500;
/// Longest transaction id echoed (bytes). BEP 5 clients send 2 (Node's
/// bittorrent-dht) or 4 (mainline).
pub const MAX_TRANSACTION_ID: usize = 16;
/// Deepest nesting of lists and dictionaries accepted: a KRPC message needs
/// 3 (message, `a`/`r`, `values`); the bound keeps the recursive decoder's
/// stack small whatever the input.
pub const MAX_NESTING: usize = 4;
/// Most compact node infos read from a response's `nodes`.
pub const MAX_NODES_READ: usize = 16;

/// A 160-bit node id or info hash (BEP 5).
pub type Id = [u8; 20];

/// BEP 5 error codes.
pub const GENERIC_ERROR: i64 = 201;
/// BEP 5: "Protocol Error, such as a malformed packet, invalid arguments, or bad token".
pub const PROTOCOL_ERROR: i64 = 203;
/// BEP 5: "Method Unknown".
pub const METHOD_UNKNOWN: i64 = 204;

/// A query we answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    Ping,
    FindNode {
        target: Id,
    },
    GetPeers {
        info_hash: Id,
    },
    /// BEP 44 `get`: the item under `target`, if stored, with a token and
    /// the closest nodes. mainline's client also sends it to find where to
    /// `announce_peer` (and takes the token from its answer).
    Get {
        target: Id,
        /// `seq`: the asker has this version of a mutable item; a stored
        /// one no newer is answered with its `seq` only.
        seq: Option<i64>,
    },
    /// BEP 44 `put`.
    Put(Put),
    AnnouncePeer {
        info_hash: Id,
        /// The `port` argument (0 when absent).
        port: u16,
        /// `implied_port` set: the peer's port is the datagram's source port.
        implied_port: bool,
        token: Vec<u8>,
    },
}

/// A BEP 44 `put`'s arguments, as sent; [`super::node`] checks them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    pub token: Vec<u8>,
    /// `v`: a byte string (what mainline and bittorrent-dht put; any other
    /// bencoded type is refused as malformed).
    pub v: Vec<u8>,
    /// `k`, `sig` and `seq` of a mutable item; `None` for an immutable one.
    pub mutable: Option<MutableArgs>,
    /// `cas`: replace only the stored item of this `seq`.
    pub cas: Option<i64>,
    pub salt: Option<Vec<u8>>,
}

/// A mutable `put`'s key, signature and sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MutableArgs {
    pub k: [u8; 32],
    pub sig: [u8; 64],
    pub seq: i64,
}

/// A decoded datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `y: q`: a query from node `id`; `read_only` is BEP 43's `ro: 1`.
    Query {
        t: Vec<u8>,
        id: Id,
        read_only: bool,
        query: Query,
    },
    /// `y: r`: an answer to one of our queries.
    Response {
        t: Vec<u8>,
        id: Id,
        /// Compact node infos from `nodes` (at most [`MAX_NODES_READ`]).
        nodes: Vec<(Id, SocketAddrV4)>,
    },
    /// `y: e`: an error answering one of our queries.
    Error { t: Vec<u8> },
}

/// Why a datagram was not decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Not KRPC, oversized, too deep, or no usable `t`: dropped unanswered.
    Malformed,
    /// A query we can answer with a KRPC error (`code` 203 or 204).
    Refused {
        t: Vec<u8>,
        code: i64,
        message: String,
    },
}

#[derive(Deserialize)]
struct RawMessage {
    t: ByteBuf,
    y: ByteBuf,
    q: Option<ByteBuf>,
    a: Option<RawBody>,
    r: Option<RawBody>,
    ro: Option<i64>,
}

/// Only `t` and `y`: read when the full message does not decode, to tell
/// a query with bad arguments (answered 203) from noise (dropped).
#[derive(Deserialize)]
struct RawEnvelope {
    t: ByteBuf,
    y: ByteBuf,
}

#[derive(Deserialize, Serialize, Default)]
struct RawBody {
    id: Option<ByteBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<ByteBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    info_hash: Option<ByteBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    implied_port: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<ByteBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nodes: Option<ByteBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    values: Option<Vec<ByteBuf>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    v: Option<ByteBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    k: Option<ByteBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sig: Option<ByteBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cas: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    salt: Option<ByteBuf>,
}

/// Decodes one datagram.
///
/// Errors: [`DecodeError::Malformed`] for anything that is not a KRPC
/// message with a 1..=16-byte `t` (oversized, nested deeper than
/// [`MAX_NESTING`], bad bencode); [`DecodeError::Refused`] for a query with
/// missing or ill-typed arguments (203) or an unknown method (204).
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    if bytes.len() > MAX_DATAGRAM || !nesting_within(bytes, MAX_NESTING) {
        return Err(DecodeError::Malformed);
    }
    let raw: RawMessage = match serde_bencode::from_bytes(bytes) {
        Ok(raw) => raw,
        Err(_) => {
            let envelope: RawEnvelope =
                serde_bencode::from_bytes(bytes).map_err(|_| DecodeError::Malformed)?;
            let t = transaction_id(envelope.t)?;
            return match envelope.y.as_slice() {
                b"q" => Err(refused(t, PROTOCOL_ERROR, "malformed query arguments")),
                _ => Err(DecodeError::Malformed),
            };
        }
    };
    let t = transaction_id(raw.t)?;
    match raw.y.as_slice() {
        b"q" => {
            let method = raw
                .q
                .ok_or_else(|| refused(t.clone(), PROTOCOL_ERROR, "no method (q)"))?;
            let args = raw
                .a
                .ok_or_else(|| refused(t.clone(), PROTOCOL_ERROR, "no arguments (a)"))?;
            let bad = |what: &str| refused(t.clone(), PROTOCOL_ERROR, what);
            let id = id20(args.id.as_ref()).ok_or_else(|| bad("id is not 20 bytes"))?;
            let query = match method.as_slice() {
                b"ping" => Query::Ping,
                b"find_node" => Query::FindNode {
                    target: id20(args.target.as_ref())
                        .ok_or_else(|| bad("target is not 20 bytes"))?,
                },
                b"get_peers" => Query::GetPeers {
                    info_hash: id20(args.info_hash.as_ref())
                        .ok_or_else(|| bad("info_hash is not 20 bytes"))?,
                },
                b"get" => Query::Get {
                    target: id20(args.target.as_ref())
                        .ok_or_else(|| bad("target is not 20 bytes"))?,
                    seq: args.seq,
                },
                b"put" => Query::Put(put_args(args).map_err(bad)?),
                b"announce_peer" => Query::AnnouncePeer {
                    info_hash: id20(args.info_hash.as_ref())
                        .ok_or_else(|| bad("info_hash is not 20 bytes"))?,
                    port: u16::try_from(args.port.unwrap_or(0))
                        .map_err(|_| bad("port is not 0..=65535"))?,
                    implied_port: args.implied_port.unwrap_or(0) != 0,
                    token: args.token.ok_or_else(|| bad("no token"))?.into_vec(),
                },
                _ => return Err(refused(t, METHOD_UNKNOWN, "method unknown")),
            };
            Ok(Message::Query {
                t,
                id,
                read_only: raw.ro.unwrap_or(0) != 0,
                query,
            })
        }
        b"r" => {
            let body = raw.r.ok_or(DecodeError::Malformed)?;
            let id = id20(body.id.as_ref()).ok_or(DecodeError::Malformed)?;
            let nodes = body
                .nodes
                .map(|n| read_compact_nodes(&n))
                .unwrap_or_default();
            Ok(Message::Response { t, id, nodes })
        }
        b"e" => Ok(Message::Error { t }),
        _ => Err(DecodeError::Malformed),
    }
}

/// A `put`'s arguments: a `v` byte string and a token; `k` (32 bytes),
/// `sig` (64 bytes) and `seq` all or none.
fn put_args(args: RawBody) -> Result<Put, &'static str> {
    let token = args.token.ok_or("no token")?.into_vec();
    let v = args.v.ok_or("no v")?.into_vec();
    let mutable = match (args.k, args.sig, args.seq) {
        (None, None, None) => None,
        (Some(k), Some(sig), Some(seq)) => Some(MutableArgs {
            k: k.as_slice().try_into().map_err(|_| "k is not 32 bytes")?,
            sig: sig
                .as_slice()
                .try_into()
                .map_err(|_| "sig is not 64 bytes")?,
            seq,
        }),
        _ => return Err("a mutable put needs k, sig and seq"),
    };
    Ok(Put {
        token,
        v,
        mutable,
        cas: args.cas,
        salt: args.salt.map(ByteBuf::into_vec),
    })
}

fn refused(t: Vec<u8>, code: i64, message: &str) -> DecodeError {
    DecodeError::Refused {
        t,
        code,
        message: message.to_string(),
    }
}

fn transaction_id(t: ByteBuf) -> Result<Vec<u8>, DecodeError> {
    if (1..=MAX_TRANSACTION_ID).contains(&t.len()) {
        Ok(t.into_vec())
    } else {
        Err(DecodeError::Malformed)
    }
}

fn id20(bytes: Option<&ByteBuf>) -> Option<Id> {
    bytes.and_then(|b| Id::try_from(b.as_slice()).ok())
}

/// Whether `bytes` nests lists and dictionaries at most `limit` deep. A
/// linear scan without recursion; it skips byte strings by their length
/// and gives up (false) on anything that is not bencode.
fn nesting_within(bytes: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0usize;
    while i < bytes.len() {
        match bytes[i] {
            b'd' | b'l' => {
                depth += 1;
                if depth > limit {
                    return false;
                }
                i += 1;
            }
            b'e' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'i' => match bytes[i..].iter().position(|&b| b == b'e') {
                Some(end) => i += end + 1,
                None => return false,
            },
            b'0'..=b'9' => {
                let Some(colon) = bytes[i..].iter().position(|&b| b == b':') else {
                    return false;
                };
                let Some(len) = std::str::from_utf8(&bytes[i..i + colon])
                    .ok()
                    .and_then(|s| s.parse::<usize>().ok())
                else {
                    return false;
                };
                i = match (i + colon + 1).checked_add(len) {
                    Some(next) => next,
                    None => return false,
                };
            }
            _ => return false,
        }
    }
    true
}

/// Compact node info (BEP 5): 20-byte id, 4-byte IPv4, 2-byte port, big-endian.
pub const COMPACT_NODE_LEN: usize = 26;
/// Compact peer info (BEP 5): 4-byte IPv4, 2-byte port, big-endian.
pub const COMPACT_PEER_LEN: usize = 6;

/// `addr` as compact peer info.
pub fn compact_peer(addr: SocketAddrV4) -> [u8; COMPACT_PEER_LEN] {
    let mut out = [0u8; COMPACT_PEER_LEN];
    out[..4].copy_from_slice(&addr.ip().octets());
    out[4..].copy_from_slice(&addr.port().to_be_bytes());
    out
}

/// Reads compact peer info; `None` unless exactly 6 bytes.
pub fn read_compact_peer(bytes: &[u8]) -> Option<SocketAddrV4> {
    let b: [u8; COMPACT_PEER_LEN] = bytes.try_into().ok()?;
    Some(SocketAddrV4::new(
        Ipv4Addr::new(b[0], b[1], b[2], b[3]),
        u16::from_be_bytes([b[4], b[5]]),
    ))
}

/// `nodes` as a compact node info string.
pub fn compact_nodes(nodes: &[(Id, SocketAddrV4)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(nodes.len() * COMPACT_NODE_LEN);
    for (id, addr) in nodes {
        out.extend_from_slice(id);
        out.extend_from_slice(&compact_peer(*addr));
    }
    out
}

/// Reads a compact node info string: whole 26-byte records only, at most
/// [`MAX_NODES_READ`] of them, port-0 ones skipped.
pub fn read_compact_nodes(bytes: &[u8]) -> Vec<(Id, SocketAddrV4)> {
    bytes
        .chunks_exact(COMPACT_NODE_LEN)
        .take(MAX_NODES_READ)
        .filter_map(|c| {
            let id = Id::try_from(&c[..20]).ok()?;
            let addr = read_compact_peer(&c[20..])?;
            (addr.port() != 0).then_some((id, addr))
        })
        .collect()
}

/// The body of an answer (`r`) or of a query we send (`a`).
#[derive(Debug, Clone, Default)]
pub struct Body {
    pub id: Id,
    pub target: Option<Id>,
    pub nodes: Option<Vec<u8>>,
    pub values: Option<Vec<SocketAddrV4>>,
    pub token: Option<Vec<u8>>,
    /// A BEP 44 item's value (`v`), key (`k`) and signature (`sig`).
    pub v: Option<Vec<u8>>,
    pub k: Option<[u8; 32]>,
    pub sig: Option<[u8; 64]>,
    /// A mutable item's `seq` (also alone: the asker has the newest).
    pub seq: Option<i64>,
}

impl Body {
    fn raw(self) -> RawBody {
        RawBody {
            id: Some(ByteBuf::from(self.id.to_vec())),
            target: self.target.map(|t| ByteBuf::from(t.to_vec())),
            nodes: self.nodes.map(ByteBuf::from),
            values: self.values.map(|peers| {
                peers
                    .into_iter()
                    .map(|p| ByteBuf::from(compact_peer(p).to_vec()))
                    .collect()
            }),
            token: self.token.map(ByteBuf::from),
            v: self.v.map(ByteBuf::from),
            k: self.k.map(|k| ByteBuf::from(k.to_vec())),
            sig: self.sig.map(|sig| ByteBuf::from(sig.to_vec())),
            seq: self.seq,
            ..RawBody::default()
        }
    }
}

#[derive(Serialize)]
struct OutMessage<'a> {
    #[serde(with = "serde_bytes")]
    t: &'a [u8],
    y: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    q: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    a: Option<RawBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    r: Option<RawBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    e: Option<(i64, &'a str)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ip: Option<ByteBuf>,
}

fn encode(message: &OutMessage<'_>) -> Vec<u8> {
    // Serializing these plain structs cannot fail (no maps with non-string
    // keys, no floats); an empty datagram would only be dropped.
    serde_bencode::to_bytes(message).unwrap_or_default()
}

/// An answer to query `t` from `requester`, with BEP 42's `ip` (the address
/// the requester is seen from).
pub fn response(t: &[u8], requester: SocketAddrV4, body: Body) -> Vec<u8> {
    encode(&OutMessage {
        t,
        y: "r",
        q: None,
        a: None,
        r: Some(body.raw()),
        e: None,
        ip: Some(ByteBuf::from(compact_peer(requester).to_vec())),
    })
}

/// A KRPC error answering query `t` (BEP 5 codes 201..=204).
pub fn error(t: &[u8], code: i64, message: &str) -> Vec<u8> {
    encode(&OutMessage {
        t,
        y: "e",
        q: None,
        a: None,
        r: None,
        e: Some((code, message)),
        ip: None,
    })
}

/// A query of ours (`ping`, `find_node`).
pub fn query(t: &[u8], method: &'static str, body: Body) -> Vec<u8> {
    encode(&OutMessage {
        t,
        y: "q",
        q: Some(method),
        a: Some(body.raw()),
        r: None,
        e: None,
        ip: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &[u8; 20] = b"abcdefghij0123456789";

    #[test]
    fn queries_decode_with_any_transaction_id_of_1_to_16_bytes() {
        let ping = b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping1:t2:aa1:y1:qe";
        assert_eq!(
            decode(ping),
            Ok(Message::Query {
                t: b"aa".to_vec(),
                id: *ID,
                read_only: false,
                query: Query::Ping
            })
        );
        let t16 = b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping2:roi1e1:t16:0123456789abcdef1:y1:qe";
        match decode(t16) {
            Ok(Message::Query { t, read_only, .. }) => {
                assert_eq!(t.len(), 16);
                assert!(read_only);
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            &b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping1:t0:1:y1:qe"[..],
            b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping1:t17:0123456789abcdefg1:y1:qe",
        ] {
            assert_eq!(decode(bad), Err(DecodeError::Malformed));
        }
    }

    #[test]
    fn announce_peer_reads_port_implied_port_and_token() {
        let m = b"d1:ad2:id20:abcdefghij012345678912:implied_porti1e9:info_hash20:mnopqrstuvwxyz1234564:porti6881e5:token2:zze1:q13:announce_peer1:t2:bb1:y1:qe";
        assert_eq!(
            decode(m),
            Ok(Message::Query {
                t: b"bb".to_vec(),
                id: *ID,
                read_only: false,
                query: Query::AnnouncePeer {
                    info_hash: *b"mnopqrstuvwxyz123456",
                    port: 6881,
                    implied_port: true,
                    token: b"zz".to_vec()
                }
            })
        );
    }

    #[test]
    fn bad_queries_get_203_or_204_and_noise_is_dropped() {
        let code = |bytes: &[u8]| match decode(bytes) {
            Err(DecodeError::Refused { code, t, .. }) => {
                assert_eq!(t, b"aa");
                Some(code)
            }
            Err(DecodeError::Malformed) => None,
            Ok(m) => panic!("decoded {m:?}"),
        };
        // Unknown method.
        assert_eq!(
            code(b"d1:ad2:id20:abcdefghij0123456789e1:q4:vote1:t2:aa1:y1:qe"),
            Some(METHOD_UNKNOWN)
        );
        // Short id, missing target, port out of range, ill-typed arguments.
        for bad in [
            &b"d1:ad2:id3:abce1:q4:ping1:t2:aa1:y1:qe"[..],
            b"d1:ad2:id20:abcdefghij0123456789e1:q9:find_node1:t2:aa1:y1:qe",
            b"d1:ad2:id20:abcdefghij01234567899:info_hash20:mnopqrstuvwxyz1234564:porti70000e5:token2:zze1:q13:announce_peer1:t2:aa1:y1:qe",
            b"d1:ali1ee1:q4:ping1:t2:aa1:y1:qe",
        ] {
            assert_eq!(code(bad), Some(PROTOCOL_ERROR), "{}", String::from_utf8_lossy(bad));
        }
        // Not bencode, truncated, too deep, oversized, no t.
        let deep = format!("d1:t2:aa1:y1:q1:a{}{}e", "l".repeat(20), "e".repeat(20));
        let oversized = format!(
            "d1:ad2:id20:abcdefghij0123456789e1:q4:ping1:t2:aa1:y1:q1:z{}:{}e",
            MAX_DATAGRAM,
            "x".repeat(MAX_DATAGRAM)
        );
        for noise in [
            &b"hello"[..],
            b"d1:t2:aa1:y1:q",
            deep.as_bytes(),
            oversized.as_bytes(),
            b"d1:y1:qe",
            b"d1:t2:aa1:y1:xe",
            b"99999999999999999999:",
            b"",
        ] {
            assert_eq!(code(noise), None, "{}", String::from_utf8_lossy(noise));
        }
    }

    #[test]
    fn answers_round_trip_through_the_decoder() {
        let peer = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 7), 4242);
        let nodes = compact_nodes(&[(*ID, peer)]);
        let bytes = response(
            b"xy",
            peer,
            Body {
                id: *ID,
                nodes: Some(nodes),
                values: Some(vec![peer]),
                token: Some(vec![1, 2]),
                ..Body::default()
            },
        );
        assert_eq!(
            decode(&bytes),
            Ok(Message::Response {
                t: b"xy".to_vec(),
                id: *ID,
                nodes: vec![(*ID, peer)]
            })
        );
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            text.contains("2:ip6:") && text.contains("6:valuesl6:"),
            "{text}"
        );
        assert_eq!(
            decode(&error(b"xy", PROTOCOL_ERROR, "bad token")),
            Ok(Message::Error { t: b"xy".to_vec() })
        );
        assert_eq!(
            error(b"xy", 203, "bad token"),
            b"d1:eli203e9:bad tokene1:t2:xy1:y1:ee".to_vec()
        );
    }
}
