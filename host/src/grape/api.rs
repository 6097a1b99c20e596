//! The Grape HTTP API without I/O: from a request's target and body to the
//! reply's status and body, byte for byte as grenache-grape 1.0.0 answers
//! (`lib/Grape.js` `transportHttp` and `handlePeer*`, `lib/utils.js`; see
//! grenache-wire.md §1.3–§1.5). The DHT work in between is a
//! [`GrapeBackend`]'s; [`answer`] only calls it.
//!
//! The rules:
//! - The body is parsed as JSON first: anything else is `500` with the plain
//!   text `ERR_GRAPE_PAYLOAD_INVALID` (an empty body too). A body over the
//!   limit is `413` `ERR_GRAPE_PAYLOAD_SIZE` (the server's part).
//! - The route is the raw request target minus its first character, turned
//!   into a handler name the way Grape does (`handlePeer` +
//!   `upperFirst(camelCase('-' + route))`): `/announce`, `/Announce` and
//!   `/lookup_` resolve, `/LOOKUP` and `/lookup?x=1` do not
//!   (`ERR_REQ_NOTFOUND`). The method is not looked at.
//! - Only the body's `data` is used. Application errors are `200` with a
//!   JSON string; results are compact JSON; "nothing" is an empty body.
//!
//! Where we answer differently, on purpose:
//! - Where Grape fails with a `500` and a JavaScript exception's text (a
//!   `null` body, `/announce` of a name that is not a string, `/put` or
//!   `/get` of `null`), we answer the endpoint's own error string:
//!   `null` is treated as a body without `data`; `/announce` answers
//!   `ERR_GRAPE_ANNOUNCE`, `/put` `opts.v not given`, `/get`
//!   `ERR_GRAPE_GENERIC`.
//! - `/announce` refuses ports outside 1–65535 with `ERR_GRAPE_SERVICE_PORT`
//!   (Grape announces port 0 as its own DHT port, drops negative ports and
//!   crashes on ports over 65535 when run with `-b`), an empty name and names
//!   over [`MAX_NAME_BYTES`] with `ERR_GRAPE_ANNOUNCE`.
//! - `/put` takes string values only (`opts.v must be a string`); Grape
//!   also bencodes numbers, lists and dictionaries, which `/get` cannot give
//!   back. A mutable put whose signature does not hold answers
//!   `All queries failed`, what a network of verifying nodes answers.
//! - `/get` of a hash that is not 40 hex digits answers the empty body of
//!   "not found" without asking the DHT.

use std::net::{IpAddr, SocketAddrV4};

use rand::seq::SliceRandom;
use serde_json::Value;

use crate::discovery::server::bep44::{self, MAX_SALT_BYTES, MAX_VALUE_BYTES};
use crate::discovery::server::items::{Signed, StoredValue};
use futures::future::BoxFuture;

/// Unknown route (`200` + JSON string).
pub const ERR_REQ_NOTFOUND: &str = "ERR_REQ_NOTFOUND";
/// `/lookup` of something else than a non-empty string.
pub const ERR_GRAPE_LOOKUP: &str = "ERR_GRAPE_LOOKUP";
/// `/announce` of something else than `[name, port]`.
pub const ERR_GRAPE_ANNOUNCE: &str = "ERR_GRAPE_ANNOUNCE";
/// `/announce` with a port that is not an integer (ours: not 1–65535).
pub const ERR_GRAPE_SERVICE_PORT: &str = "ERR_GRAPE_SERVICE_PORT";
/// The body is not JSON (`500`, plain text).
pub const ERR_GRAPE_PAYLOAD_INVALID: &str = "ERR_GRAPE_PAYLOAD_INVALID";
/// The body is over the limit (`413`, plain text).
pub const ERR_GRAPE_PAYLOAD_SIZE: &str = "ERR_GRAPE_PAYLOAD_SIZE";
/// `/get` without a hash to look for.
pub const ERR_GRAPE_GENERIC: &str = "ERR_GRAPE_GENERIC";
/// `/put` without a value.
pub const ERR_PUT_NO_VALUE: &str = "opts.v not given";
/// `/put` of a value whose UTF-8 form has 1000 bytes or more.
pub const ERR_PUT_VALUE_SIZE: &str = "v must be less than 1000 bytes in put()";
/// `/put` of a value that is not a string (ours only).
pub const ERR_PUT_VALUE_TYPE: &str = "opts.v must be a string";
/// Mutable `/put` with a `cas` that is not an integer.
pub const ERR_PUT_CAS: &str = "opts.cas must be an integer if provided";
/// Mutable `/put` whose `k` is not 32 bytes.
pub const ERR_PUT_KEY: &str = "opts.k ed25519 public key must be 32 bytes";
/// Mutable `/put` without a signature.
pub const ERR_PUT_SIGNATURE: &str =
    "opts.sign function or options.sig signature is required for mutable put";
/// Mutable `/put` with a salt over 64 bytes.
pub const ERR_PUT_SALT: &str = "opts.salt is > 64 bytes long";
/// Mutable `/put` without `seq`.
pub const ERR_PUT_NO_SEQ: &str = "opts.seq not provided for a mutable update";
/// Mutable `/put` whose `seq` is not an integer.
pub const ERR_PUT_SEQ: &str = "opts.seq not an integer";

/// Most addresses one `/lookup` answers (grenache-grape's `_mem.get(ih, 100)`).
pub const MAX_LOOKUP_PEERS: usize = 100;
/// Longest service name `/announce` takes, in bytes, so that the table of
/// announces stays small whatever the body limit.
pub const MAX_NAME_BYTES: usize = 1024;
/// The body limit unless configured: grenache-grape's library default
/// `check_maxPayloadSize` (its 1.0.0 command line has none by mistake,
/// grenache-wire.md §1.2).
pub const DEFAULT_MAX_BODY: usize = 8192;

/// Why the DHT did not take an announce or a value, in k-rpc's words (the
/// strings a Grape answers, grenache-wire.md §1.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhtFailure {
    /// No DHT node to ask: `No nodes to query`.
    NoNodes,
    /// Every node asked refused or did not answer: `All queries failed`.
    AllFailed,
}

impl DhtFailure {
    /// The error string a Grape answers.
    pub fn message(self) -> &'static str {
        match self {
            DhtFailure::NoNodes => "No nodes to query",
            DhtFailure::AllFailed => "All queries failed",
        }
    }
}

/// A reply: HTTP status and body (no `Content-Type`, as Grape sends none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    /// 200, 413 or 500.
    pub status: u16,
    /// The body bytes; empty for "nothing".
    pub body: Vec<u8>,
}

impl HttpReply {
    /// `200` with a JSON body.
    fn json(body: String) -> Self {
        HttpReply {
            status: 200,
            body: body.into_bytes(),
        }
    }

    /// `200` with an application error: a JSON string.
    pub fn error(message: &str) -> Self {
        Self::json(Value::from(message).to_string())
    }

    /// A status with a plain-text body.
    pub fn plain(status: u16, text: &str) -> Self {
        HttpReply {
            status,
            body: text.as_bytes().to_vec(),
        }
    }

    /// `413` `ERR_GRAPE_PAYLOAD_SIZE`.
    pub fn payload_too_large() -> Self {
        Self::plain(413, ERR_GRAPE_PAYLOAD_SIZE)
    }

    /// `200` with an empty body (`JSON.stringify(undefined)`).
    fn empty() -> Self {
        HttpReply {
            status: 200,
            body: Vec::new(),
        }
    }
}

/// The four things a Grape does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Announce,
    Lookup,
    Put,
    Get,
}

/// The endpoint a raw request target (`/lookup`, `*`, …) resolves to.
pub fn route(target: &str) -> Option<Endpoint> {
    let mut chars = target.chars();
    chars.next();
    let handler = upper_first(&camel_case(&format!("-{}", chars.as_str())));
    match handler.as_str() {
        "Announce" => Some(Endpoint::Announce),
        "Lookup" => Some(Endpoint::Lookup),
        "Put" => Some(Endpoint::Put),
        "Get" => Some(Endpoint::Get),
        _ => None,
    }
}

/// JavaScript's `\w`.
fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// grenache-grape 1.0.0 `lib/utils.js` `camelCase`: each match of
/// `/(?:^\w|[A-Z]|\b\w|-\w|_\w)/g` is lowercased at offset 0 and uppercased
/// elsewhere, then every run of whitespace, `_` and `-` is removed.
fn camel_case(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    while at < chars.len() {
        let c = chars[at];
        let boundary = at == 0 || !is_word(chars[at - 1]);
        let len = if (at == 0 && is_word(c)) || c.is_ascii_uppercase() || (is_word(c) && boundary) {
            1
        } else if (c == '-' || c == '_') && chars.get(at + 1).is_some_and(|n| is_word(*n)) {
            2
        } else {
            0
        };
        if len == 0 {
            out.push(c);
            at += 1;
            continue;
        }
        for c in &chars[at..at + len] {
            out.push(if at == 0 {
                c.to_ascii_lowercase()
            } else {
                c.to_ascii_uppercase()
            });
        }
        at += len;
    }
    out.retain(|c| !(c.is_whitespace() || c == '\u{feff}' || c == '_' || c == '-'));
    out
}

/// `str.charAt(0).toUpperCase() + str.slice(1)`.
fn upper_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// A mutable value to put: checked, signature included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPut {
    /// The value's bytes.
    pub value: Vec<u8>,
    /// Key, signature, seq and salt.
    pub signed: Signed,
    /// Compare-and-swap: the `seq` the value replaces.
    pub cas: Option<i64>,
}

/// What `/put` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutRequest {
    /// An immutable value, stored under `sha1(bencode(value))`.
    Immutable(Vec<u8>),
    /// A mutable value whose signature holds.
    Mutable(SignedPut),
}

impl PutRequest {
    /// The 20-byte DHT target the value goes to.
    pub fn target(&self) -> [u8; 20] {
        match self {
            PutRequest::Immutable(value) => bep44::immutable_key(value),
            PutRequest::Mutable(put) => {
                bep44::mutable_target(&put.signed.key, put.signed.salt.as_deref())
            }
        }
    }

    /// The value as kept for `/get`.
    pub fn stored(&self) -> StoredValue {
        match self {
            PutRequest::Immutable(value) => StoredValue {
                value: value.clone(),
                signed: None,
            },
            PutRequest::Mutable(put) => StoredValue {
                value: put.value.clone(),
                signed: Some(put.signed.clone()),
            },
        }
    }
}

/// A request, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrapeRequest {
    /// `name` is served on `port` of the announcer's address.
    Announce { name: String, port: u16 },
    /// Who serves `name`.
    Lookup { name: String },
    /// Store a value.
    Put(PutRequest),
    /// Fetch a value by its target; `None`: not a 20-byte hash, so nothing
    /// can be found.
    Get { target: Option<[u8; 20]> },
}

/// Parses a request (target and body) into what to do, or the reply when
/// there is nothing to do but answer.
pub fn parse(target: &str, body: &[u8]) -> Result<GrapeRequest, HttpReply> {
    // Grape reads the body as a string (invalid UTF-8 becomes U+FFFD).
    let text = String::from_utf8_lossy(body);
    let message: Value = serde_json::from_str(&text)
        .map_err(|_| HttpReply::plain(500, ERR_GRAPE_PAYLOAD_INVALID))?;
    let endpoint = route(target).ok_or_else(|| HttpReply::error(ERR_REQ_NOTFOUND))?;
    let data = match &message {
        Value::Object(fields) => fields.get("data"),
        _ => None,
    };
    match endpoint {
        Endpoint::Announce => parse_announce(data),
        Endpoint::Lookup => match data {
            Some(Value::String(name)) if !name.is_empty() => {
                Ok(GrapeRequest::Lookup { name: name.clone() })
            }
            _ => Err(HttpReply::error(ERR_GRAPE_LOOKUP)),
        },
        Endpoint::Put => parse_put(data).map(GrapeRequest::Put),
        Endpoint::Get => parse_get(data),
    }
}

/// A JSON number that JavaScript's `Number.isInteger` accepts (`5555.0` is
/// one), as f64.
fn js_integer(value: &Value) -> Option<f64> {
    let number = value.as_f64()?;
    (number.is_finite() && number.fract() == 0.0).then_some(number)
}

fn parse_announce(data: Option<&Value>) -> Result<GrapeRequest, HttpReply> {
    let Some(Value::Array(items)) = data else {
        return Err(HttpReply::error(ERR_GRAPE_ANNOUNCE));
    };
    // Grape checks the port first, then the name.
    let port = items
        .get(1)
        .and_then(js_integer)
        .filter(|p| (1.0..=65535.0).contains(p))
        .ok_or_else(|| HttpReply::error(ERR_GRAPE_SERVICE_PORT))?;
    match items.first() {
        Some(Value::String(name)) if !name.is_empty() && name.len() <= MAX_NAME_BYTES => {
            Ok(GrapeRequest::Announce {
                name: name.clone(),
                port: port as u16,
            })
        }
        _ => Err(HttpReply::error(ERR_GRAPE_ANNOUNCE)),
    }
}

/// JavaScript truthiness of a JSON value.
fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

/// Bytes from a JSON array of integers 0–255.
fn byte_array(items: &[Value]) -> Option<Vec<u8>> {
    items
        .iter()
        .map(|v| v.as_u64().and_then(|b| u8::try_from(b).ok()))
        .collect()
}

/// Grape's `str2buf(val, 'hex')` for `k` and `sig`, for the forms that make
/// sense: hex, a JSON array of bytes, or a string holding one.
fn key_bytes(value: &Value) -> Option<Vec<u8>> {
    match value {
        Value::Array(items) => byte_array(items),
        Value::String(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Array(items)) => byte_array(&items),
            _ => bep44::from_hex(text),
        },
        _ => None,
    }
}

/// Grape's `str2buf(salt)`: a JSON array of bytes or a JSON string inside
/// the string, else the string's UTF-8 bytes.
fn salt_bytes(value: &Value) -> Option<Vec<u8>> {
    match value {
        Value::Array(items) => byte_array(items),
        Value::String(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Array(items)) => byte_array(&items),
            Ok(Value::String(inner)) => Some(inner.into_bytes()),
            _ => Some(text.as_bytes().to_vec()),
        },
        _ => None,
    }
}

/// `/put`: bittorrent-dht 10.0.0 `put`'s checks, in its order.
fn parse_put(data: Option<&Value>) -> Result<PutRequest, HttpReply> {
    let fail = |message: &str| Err(HttpReply::error(message));
    let opts = match data {
        Some(Value::String(v)) => return immutable_value(v).map(PutRequest::Immutable),
        Some(Value::Object(opts)) => opts,
        _ => return fail(ERR_PUT_NO_VALUE),
    };
    let value = match opts.get("v") {
        None => return fail(ERR_PUT_NO_VALUE),
        Some(Value::String(v)) => immutable_value(v)?,
        Some(_) => return fail(ERR_PUT_VALUE_TYPE),
    };
    if !opts.get("k").is_some_and(truthy) {
        return Ok(PutRequest::Immutable(value));
    }
    let cas = match opts.get("cas") {
        None => None,
        Some(cas) => match js_integer(cas) {
            Some(cas) => Some(cas as i64),
            None => return fail(ERR_PUT_CAS),
        },
    };
    let Some(key) = opts
        .get("k")
        .and_then(key_bytes)
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
    else {
        return fail(ERR_PUT_KEY);
    };
    let signature = match opts.get("sig").filter(|s| truthy(s)) {
        None => return fail(ERR_PUT_SIGNATURE),
        Some(sig) => key_bytes(sig).and_then(|s| <[u8; 64]>::try_from(s).ok()),
    };
    let salt = match opts.get("salt").filter(|s| truthy(s)) {
        None => None,
        Some(salt) => match salt_bytes(salt) {
            Some(salt) if salt.len() > MAX_SALT_BYTES => return fail(ERR_PUT_SALT),
            Some(salt) => Some(salt),
            // Not bytes at all: no signature can cover it.
            None => return fail(DhtFailure::AllFailed.message()),
        },
    };
    let seq = match opts.get("seq") {
        None => return fail(ERR_PUT_NO_SEQ),
        Some(seq) => match js_integer(seq) {
            Some(seq) if seq.abs() < 2f64.powi(63) => seq as i64,
            _ => return fail(ERR_PUT_SEQ),
        },
    };
    let holds = signature.is_some_and(|signature| {
        bep44::signature_holds(&key, &signature, seq, &value, salt.as_deref())
    });
    let (true, Some(signature)) = (holds, signature) else {
        return fail(DhtFailure::AllFailed.message());
    };
    Ok(PutRequest::Mutable(SignedPut {
        value,
        signed: Signed {
            key,
            signature,
            seq,
            salt,
        },
        cas,
    }))
}

fn immutable_value(v: &str) -> Result<Vec<u8>, HttpReply> {
    if v.len() > MAX_VALUE_BYTES {
        return Err(HttpReply::error(ERR_PUT_VALUE_SIZE));
    }
    Ok(v.as_bytes().to_vec())
}

/// `/get`: a hash string, or `{"hash": …}`.
fn parse_get(data: Option<&Value>) -> Result<GrapeRequest, HttpReply> {
    let hash = match data {
        Some(Value::String(hash)) => hash,
        Some(Value::Object(opts)) => match opts.get("hash") {
            Some(Value::String(hash)) => hash,
            _ => return Err(HttpReply::error(ERR_GRAPE_GENERIC)),
        },
        _ => return Err(HttpReply::error(ERR_GRAPE_GENERIC)),
    };
    let target = bep44::from_hex(hash).and_then(|bytes| <[u8; 20]>::try_from(bytes).ok());
    Ok(GrapeRequest::Get { target })
}

/// A value found by `/get`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundValue {
    /// The id of the DHT node answering (ours: this grape's DHT node).
    pub id: [u8; 20],
    /// The value and its signature fields.
    pub value: StoredValue,
}

/// `/announce`'s reply: the number of DHT nodes that took it, or k-rpc's
/// error string.
pub fn announce_reply(outcome: Result<u32, DhtFailure>) -> HttpReply {
    match outcome {
        Ok(count) => HttpReply::json(count.to_string()),
        Err(failure) => HttpReply::error(failure.message()),
    }
}

/// `/lookup`'s reply: the addresses as `"a.b.c.d:port"`, without port 0 or
/// repeats, in random order, at most [`MAX_LOOKUP_PEERS`].
pub fn lookup_reply(peers: Vec<SocketAddrV4>) -> HttpReply {
    let mut unique: Vec<SocketAddrV4> = Vec::with_capacity(peers.len().min(1024));
    for peer in peers {
        if peer.port() != 0 && !unique.contains(&peer) {
            unique.push(peer);
        }
    }
    unique.shuffle(&mut rand::rng());
    unique.truncate(MAX_LOOKUP_PEERS);
    let list: Vec<String> = unique.iter().map(SocketAddrV4::to_string).collect();
    HttpReply::json(Value::from(list).to_string())
}

/// `/put`'s reply: the target as 40 hex digits, or k-rpc's error string.
pub fn put_reply(outcome: Result<[u8; 20], DhtFailure>) -> HttpReply {
    match outcome {
        Ok(target) => HttpReply::json(Value::from(bep44::hex(&target)).to_string()),
        Err(failure) => HttpReply::error(failure.message()),
    }
}

/// `/get`'s reply: bittorrent-dht's `createGetResponse` fields in its order
/// (`id`, `token`, `v`, then `sig`, `k`, `seq` for a mutable value, and
/// Grape's `salt`), or an empty body.
pub fn get_reply(found: Option<FoundValue>) -> HttpReply {
    let Some(FoundValue { id, value }) = found else {
        return HttpReply::empty();
    };
    let text = |bytes: &[u8]| Value::from(String::from_utf8_lossy(bytes)).to_string();
    let mut body = format!(
        r#"{{"id":"{}","token":null,"v":{}"#,
        bep44::hex(&id),
        text(&value.value)
    );
    if let Some(signed) = value.signed {
        body.push_str(&format!(
            r#","sig":"{}","k":"{}","seq":{}"#,
            bep44::hex(&signed.signature),
            bep44::hex(&signed.key),
            signed.seq
        ));
        if let Some(salt) = signed.salt {
            body.push_str(&format!(r#","salt":{}"#, text(&salt)));
        }
    }
    body.push('}');
    HttpReply::json(body)
}

/// What the Grape API needs of the DHT and the grape's tables.
pub trait GrapeBackend: Send + Sync + 'static {
    /// Records that `name` is served on `port` (at an address chosen from
    /// the `caller`'s) and tells the DHT; the number of DHT nodes that took
    /// it, or why none did.
    fn announce<'a>(
        &'a self,
        name: &'a str,
        port: u16,
        caller: IpAddr,
    ) -> BoxFuture<'a, Result<u32, DhtFailure>>;

    /// Who serves `name`: this grape's live announces and the DHT's.
    fn lookup<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Vec<SocketAddrV4>>;

    /// Stores a value here and on the DHT; its target, or why the DHT did
    /// not take it.
    fn put(&self, request: PutRequest) -> BoxFuture<'_, Result<[u8; 20], DhtFailure>>;

    /// The value under `target`, from here or the DHT.
    fn get(&self, target: [u8; 20]) -> BoxFuture<'_, Option<FoundValue>>;
}

/// Answers one request: `target` is the raw request target (`/lookup`),
/// `body` the whole body (already within the limit), `caller` the HTTP
/// client's address.
pub async fn answer(
    backend: &dyn GrapeBackend,
    target: &str,
    body: &[u8],
    caller: IpAddr,
) -> HttpReply {
    let request = match parse(target, body) {
        Ok(request) => request,
        Err(reply) => return reply,
    };
    match request {
        GrapeRequest::Announce { name, port } => {
            announce_reply(backend.announce(&name, port, caller).await)
        }
        GrapeRequest::Lookup { name } => lookup_reply(backend.lookup(&name).await),
        GrapeRequest::Put(put) => put_reply(backend.put(put).await),
        GrapeRequest::Get { target: None } => get_reply(None),
        GrapeRequest::Get {
            target: Some(target),
        } => get_reply(backend.get(target).await),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    #[test]
    fn routes_resolve_as_grape_resolves_them() {
        for (target, endpoint) in [
            ("/announce", Some(Endpoint::Announce)),
            ("/lookup", Some(Endpoint::Lookup)),
            ("/put", Some(Endpoint::Put)),
            ("/get", Some(Endpoint::Get)),
            // Only the first letter is case-insensitive.
            ("/Announce", Some(Endpoint::Announce)),
            ("/Get", Some(Endpoint::Get)),
            ("/LOOKUP", None),
            ("/lookUp", None),
            // Separators vanish after camelCase (measured: `/lookup_` → `[]`).
            ("/lookup_", Some(Endpoint::Lookup)),
            ("/-lookup", Some(Endpoint::Lookup)),
            ("/_lookup", Some(Endpoint::Lookup)),
            ("/look_up", None),
            // The query string is part of the route.
            ("/lookup?x=1", None),
            ("/", None),
            ("*", None),
            ("/nope", None),
            ("/announce/", None),
            ("/pUT", None),
        ] {
            assert_eq!(route(target), endpoint, "{target}");
        }
    }

    #[test]
    fn camel_case_matches_grapes_utils() {
        // Outputs of grenache-grape 1.0.0 lib/utils.js camelCase, run in node.
        assert_eq!(camel_case("-lookup"), "lookup");
        assert_eq!(camel_case("-LOOKUP"), "lOOKUP");
        assert_eq!(camel_case("-foo-bar"), "fooBar");
        assert_eq!(camel_case("-foo bar"), "fooBar");
        assert_eq!(camel_case("-a.b"), "a.B");
        assert_eq!(camel_case("-x_y_z"), "xYZ");
    }

    fn body(reply: &HttpReply) -> &str {
        std::str::from_utf8(&reply.body).unwrap()
    }

    fn parsed(target: &str, body: &str) -> Result<GrapeRequest, HttpReply> {
        parse(target, body.as_bytes())
    }

    fn refused(target: &str, request: &str) -> (u16, String) {
        let reply = parsed(target, request).expect_err("refused");
        (reply.status, body(&reply).to_string())
    }

    #[test]
    fn the_body_must_be_json_before_anything_else() {
        for bad in ["", "not json", "{", "\u{feff}{}"] {
            assert_eq!(
                refused("/nope", bad),
                (500, ERR_GRAPE_PAYLOAD_INVALID.into())
            );
        }
        assert_eq!(
            refused("/nope", "{}"),
            (200, r#""ERR_REQ_NOTFOUND""#.into())
        );
    }

    #[test]
    fn error_cases_of_the_wire_notes() {
        // grenache-wire.md TV-12 and the measured cases of §1.4.
        let grape_error = |s: &str| (200, format!("\"{s}\""));
        assert_eq!(
            refused("/lookup", r#"{"data":""}"#),
            grape_error(ERR_GRAPE_LOOKUP)
        );
        assert_eq!(
            refused("/lookup", r#"{"data":42}"#),
            grape_error(ERR_GRAPE_LOOKUP)
        );
        assert_eq!(refused("/lookup", "42"), grape_error(ERR_GRAPE_LOOKUP));
        assert_eq!(
            refused("/announce", r#"{"data":"x"}"#),
            grape_error(ERR_GRAPE_ANNOUNCE)
        );
        assert_eq!(
            refused("/announce", r#"{"data":{}}"#),
            grape_error(ERR_GRAPE_ANNOUNCE)
        );
        for port in [r#""5555""#, "5555.5", "null", "true"] {
            let request = format!(r#"{{"data":["x",{port}]}}"#);
            assert_eq!(
                refused("/announce", &request),
                grape_error(ERR_GRAPE_SERVICE_PORT)
            );
        }
        assert_eq!(
            refused("/announce", r#"{"data":["x"]}"#),
            grape_error(ERR_GRAPE_SERVICE_PORT)
        );
        assert_eq!(
            refused("/announce", r#"{"data":[]}"#),
            grape_error(ERR_GRAPE_SERVICE_PORT)
        );
        assert_eq!(
            refused("/put", r#"{"data":{}}"#),
            grape_error(ERR_PUT_NO_VALUE)
        );
        assert_eq!(
            refused("/get", r#"{"data":42}"#),
            grape_error(ERR_GRAPE_GENERIC)
        );
        assert_eq!(
            refused("/get", r#"{"data":{}}"#),
            grape_error(ERR_GRAPE_GENERIC)
        );
    }

    #[test]
    fn where_grape_throws_we_answer_the_endpoints_error() {
        let grape_error = |s: &str| (200, format!("\"{s}\""));
        // Grape: 500 "Cannot read properties of null (reading 'data')".
        assert_eq!(refused("/lookup", "null"), grape_error(ERR_GRAPE_LOOKUP));
        // Grape: 500 "The first argument must be of type string …".
        assert_eq!(
            refused("/announce", r#"{"data":[123,5555]}"#),
            grape_error(ERR_GRAPE_ANNOUNCE)
        );
        // Grape: announces its DHT port / drops / crashes.
        for port in ["0", "-5", "70000", "65536"] {
            let request = format!(r#"{{"data":["x",{port}]}}"#);
            assert_eq!(
                refused("/announce", &request),
                grape_error(ERR_GRAPE_SERVICE_PORT)
            );
        }
        assert_eq!(
            refused("/announce", r#"{"data":["",5555]}"#),
            grape_error(ERR_GRAPE_ANNOUNCE)
        );
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        let request = format!(r#"{{"data":["{long}",5555]}}"#);
        assert_eq!(
            refused("/announce", &request),
            grape_error(ERR_GRAPE_ANNOUNCE)
        );
        // Grape: 500 "Cannot read properties of null (reading 'k')" / ('salt').
        assert_eq!(
            refused("/put", r#"{"data":null}"#),
            grape_error(ERR_PUT_NO_VALUE)
        );
        assert_eq!(refused("/put", "{}"), grape_error(ERR_PUT_NO_VALUE));
        assert_eq!(
            refused("/get", r#"{"data":null}"#),
            grape_error(ERR_GRAPE_GENERIC)
        );
        assert_eq!(refused("/get", "{}"), grape_error(ERR_GRAPE_GENERIC));
        // Grape bencodes it; we keep strings only.
        assert_eq!(
            refused("/put", r#"{"data":{"v":42}}"#),
            grape_error(ERR_PUT_VALUE_TYPE)
        );
    }

    #[test]
    fn announces_take_integral_ports_in_range() {
        for (port, expected) in [
            ("5555", 5555),
            ("5555.0", 5555),
            ("1", 1),
            ("65535", 65535),
            ("5.555e3", 5555),
        ] {
            let request = format!(r#"{{"rid":"x","data":["rpc_test",{port}]}}"#);
            assert_eq!(
                parsed("/announce", &request),
                Ok(GrapeRequest::Announce {
                    name: "rpc_test".into(),
                    port: expected
                })
            );
        }
        // Extra elements are ignored, as Grape destructures two.
        assert_eq!(
            parsed("/Announce", r#"{"data":["ünïcødé",7,"more"]}"#),
            Ok(GrapeRequest::Announce {
                name: "ünïcødé".into(),
                port: 7
            })
        );
    }

    #[test]
    fn immutable_puts_take_a_string_under_1000_bytes() {
        assert_eq!(
            parsed("/put", r#"{"data":{"v":"hello world"}}"#),
            Ok(GrapeRequest::Put(PutRequest::Immutable(
                b"hello world".to_vec()
            )))
        );
        assert_eq!(
            parsed("/put", r#"{"data":"bare"}"#),
            Ok(GrapeRequest::Put(PutRequest::Immutable(b"bare".to_vec())))
        );
        assert_eq!(
            parsed("/put", r#"{"data":{"v":""}}"#),
            Ok(GrapeRequest::Put(PutRequest::Immutable(Vec::new())))
        );
        let at_limit = format!(r#"{{"data":{{"v":"{}"}}}}"#, "x".repeat(999));
        assert!(parsed("/put", &at_limit).is_ok());
        let over = format!(r#"{{"data":{{"v":"{}"}}}}"#, "x".repeat(1000));
        assert_eq!(
            refused("/put", &over),
            (200, format!("\"{ERR_PUT_VALUE_SIZE}\""))
        );
        // 500 two-byte characters: 1000 bytes.
        let wide = format!(r#"{{"data":{{"v":"{}"}}}}"#, "é".repeat(500));
        assert_eq!(
            refused("/put", &wide),
            (200, format!("\"{ERR_PUT_VALUE_SIZE}\""))
        );
    }

    fn signed_request(seq: i64, salt: Option<&str>, tamper: bool) -> String {
        use ed25519_dalek::{Signer, SigningKey};
        let key = SigningKey::from_bytes(&[9; 32]);
        let signed = bep44::signed_bytes(seq, b"Hello World!", salt.map(str::as_bytes));
        let mut signature = key.sign(&signed).to_bytes();
        if tamper {
            signature[0] ^= 1;
        }
        let salt = salt
            .map(|s| format!(r#","salt":"{s}""#))
            .unwrap_or_default();
        format!(
            r#"{{"data":{{"v":"Hello World!","k":"{}","sig":"{}","seq":{seq}{salt}}}}}"#,
            bep44::hex(key.verifying_key().as_bytes()),
            bep44::hex(&signature)
        )
    }

    #[test]
    fn mutable_puts_are_checked_in_bittorrent_dhts_order() {
        let request = parsed("/put", &signed_request(1, Some("foobar"), false)).unwrap();
        let GrapeRequest::Put(PutRequest::Mutable(put)) = &request else {
            panic!("{request:?}")
        };
        assert_eq!(put.signed.seq, 1);
        assert_eq!(put.signed.salt.as_deref(), Some(&b"foobar"[..]));
        let GrapeRequest::Put(put) = request else {
            unreachable!()
        };
        let mut joined = put_key().to_vec();
        joined.extend_from_slice(b"foobar");
        assert_eq!(
            put.target(),
            sha1_smol::Sha1::from(&joined).digest().bytes()
        );

        let e = |s: &str| (200, format!("\"{s}\""));
        assert_eq!(
            refused("/put", &signed_request(1, None, true)),
            e("All queries failed")
        );
        let k = bep44::hex(&put_key());
        for (data, error) in [
            (format!(r#"{{"k":"{k}"}}"#), ERR_PUT_NO_VALUE),
            (format!(r#"{{"v":"x","k":"{k}","cas":"1"}}"#), ERR_PUT_CAS),
            (r#"{"v":"x","k":"abcd"}"#.to_string(), ERR_PUT_KEY),
            (format!(r#"{{"v":"x","k":"{k}"}}"#), ERR_PUT_SIGNATURE),
            (
                format!(
                    r#"{{"v":"x","k":"{k}","sig":"00","salt":"{}"}}"#,
                    "s".repeat(65)
                ),
                ERR_PUT_SALT,
            ),
            (
                format!(r#"{{"v":"x","k":"{k}","sig":"00"}}"#),
                ERR_PUT_NO_SEQ,
            ),
            (
                format!(r#"{{"v":"x","k":"{k}","sig":"00","seq":"1"}}"#),
                ERR_PUT_SEQ,
            ),
            (
                format!(r#"{{"v":"x","k":"{k}","sig":"00","seq":1}}"#),
                "All queries failed",
            ),
        ] {
            assert_eq!(
                refused("/put", &format!(r#"{{"data":{data}}}"#)),
                e(error),
                "{data}"
            );
        }
    }

    fn put_key() -> [u8; 32] {
        ed25519_dalek::SigningKey::from_bytes(&[9; 32])
            .verifying_key()
            .to_bytes()
    }

    #[test]
    fn keys_may_be_json_arrays_of_bytes() {
        let k: Vec<String> = put_key().iter().map(u8::to_string).collect();
        let as_array = format!("[{}]", k.join(","));
        assert_eq!(
            key_bytes(&Value::from(as_array.clone())).unwrap(),
            put_key()
        );
        let parsed: Value = serde_json::from_str(&as_array).unwrap();
        assert_eq!(key_bytes(&parsed).unwrap(), put_key());
        assert_eq!(salt_bytes(&Value::from("[1,2]")).unwrap(), [1, 2]);
        assert_eq!(salt_bytes(&Value::from(r#""s""#)).unwrap(), b"s");
        assert_eq!(salt_bytes(&Value::from("123")).unwrap(), b"123");
    }

    #[test]
    fn gets_take_a_hash_or_an_object_with_one() {
        let hash = "6d33adc2b6b2c14c3036feefb7fedbca1a880527";
        let target: [u8; 20] = bep44::from_hex(hash).unwrap().try_into().unwrap();
        for request in [
            format!(r#"{{"data":"{hash}"}}"#),
            format!(r#"{{"data":{{"hash":"{hash}","salt":"s"}}}}"#),
            format!(r#"{{"data":"{}"}}"#, hash.to_uppercase()),
        ] {
            assert_eq!(
                parsed("/get", &request),
                Ok(GrapeRequest::Get {
                    target: Some(target)
                })
            );
        }
        for odd in ["zz", "", "6d33"] {
            let request = format!(r#"{{"data":"{odd}"}}"#);
            assert_eq!(
                parsed("/get", &request),
                Ok(GrapeRequest::Get { target: None })
            );
        }
    }

    #[test]
    fn replies_are_compact_json_as_grape_writes_them() {
        assert_eq!(body(&announce_reply(Ok(1))), "1");
        assert_eq!(
            body(&announce_reply(Err(DhtFailure::NoNodes))),
            r#""No nodes to query""#
        );
        assert_eq!(
            body(&put_reply(Ok(bep44::immutable_key(b"hello world")))),
            r#""6d33adc2b6b2c14c3036feefb7fedbca1a880527""#
        );
        assert_eq!(
            body(&put_reply(Err(DhtFailure::AllFailed))),
            r#""All queries failed""#
        );
        assert_eq!(
            get_reply(None),
            HttpReply {
                status: 200,
                body: vec![]
            }
        );
        let found = FoundValue {
            id: [0x48; 20],
            value: StoredValue {
                value: b"hello \"world\"\n".to_vec(),
                signed: None,
            },
        };
        assert_eq!(
            body(&get_reply(Some(found))),
            format!(
                r#"{{"id":"{}","token":null,"v":"hello \"world\"\n"}}"#,
                "48".repeat(20)
            )
        );
        let found = FoundValue {
            id: [1; 20],
            value: StoredValue {
                value: b"v".to_vec(),
                signed: Some(Signed {
                    key: [2; 32],
                    signature: [3; 64],
                    seq: 4,
                    salt: Some(b"s".to_vec()),
                }),
            },
        };
        assert_eq!(
            body(&get_reply(Some(found))),
            format!(
                r#"{{"id":"{}","token":null,"v":"v","sig":"{}","k":"{}","seq":4,"salt":"s"}}"#,
                "01".repeat(20),
                "03".repeat(64),
                "02".repeat(32)
            )
        );
    }

    #[test]
    fn lookups_answer_at_most_100_distinct_addresses_without_port_0() {
        let peers: Vec<SocketAddrV4> = (0..150u16)
            .flat_map(|p| [SocketAddrV4::new([127, 0, 0, 1].into(), p); 2])
            .collect();
        let reply = lookup_reply(peers);
        let list: Vec<String> = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(list.len(), MAX_LOOKUP_PEERS);
        assert!(!list.contains(&"127.0.0.1:0".to_string()));
        let mut unique = list.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), list.len());
        assert_eq!(body(&lookup_reply(vec![])), "[]");
        let one = lookup_reply(vec![SocketAddrV4::new([127, 0, 0, 1].into(), 5555)]);
        assert_eq!(body(&one), r#"["127.0.0.1:5555"]"#);
    }

    /// A backend in memory: announces by name, values by target.
    #[derive(Default)]
    struct MemoryBackend {
        peers: Mutex<HashMap<String, Vec<SocketAddrV4>>>,
        values: Mutex<HashMap<[u8; 20], StoredValue>>,
    }

    impl GrapeBackend for MemoryBackend {
        fn announce<'a>(
            &'a self,
            name: &'a str,
            port: u16,
            caller: IpAddr,
        ) -> BoxFuture<'a, Result<u32, DhtFailure>> {
            let IpAddr::V4(ip) = caller else {
                panic!("IPv4 callers only")
            };
            self.peers
                .lock()
                .unwrap()
                .entry(name.into())
                .or_default()
                .push(SocketAddrV4::new(ip, port));
            Box::pin(async { Ok(1) })
        }
        fn lookup<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Vec<SocketAddrV4>> {
            let found = self
                .peers
                .lock()
                .unwrap()
                .get(name)
                .cloned()
                .unwrap_or_default();
            Box::pin(async move { found })
        }
        fn put(&self, request: PutRequest) -> BoxFuture<'_, Result<[u8; 20], DhtFailure>> {
            let target = request.target();
            self.values.lock().unwrap().insert(target, request.stored());
            Box::pin(async move { Ok(target) })
        }
        fn get(&self, target: [u8; 20]) -> BoxFuture<'_, Option<FoundValue>> {
            let value = self.values.lock().unwrap().get(&target).cloned();
            Box::pin(async move { value.map(|value| FoundValue { id: [7; 20], value }) })
        }
    }

    fn run(backend: &MemoryBackend, target: &str, request: &str) -> (u16, String) {
        let caller = IpAddr::from([127, 0, 0, 1]);
        let reply =
            futures::executor::block_on(answer(backend, target, request.as_bytes(), caller));
        (reply.status, body(&reply).to_string())
    }

    #[test]
    fn answer_runs_a_links_session() {
        let grape = MemoryBackend::default();
        let ok = |s: &str| (200, s.to_string());
        // grenache-wire.md TV-10, TV-11, TV-13.
        assert_eq!(
            run(
                &grape,
                "/announce",
                r#"{"rid":"f9d4ee83-0589-4c3a-bb9b-cb0326b349e4","data":["rpc_test",49912]}"#
            ),
            ok("1")
        );
        assert_eq!(
            run(
                &grape,
                "/lookup",
                r#"{"rid":"5dc09883-3788-4b8c-a601-c7e728a7271f","data":"rpc_test"}"#
            ),
            ok(r#"["127.0.0.1:49912"]"#)
        );
        assert_eq!(run(&grape, "/lookup", r#"{"data":"other"}"#), ok("[]"));
        assert_eq!(
            run(&grape, "/put", r#"{"data":{"v":"hello world"}}"#),
            ok(r#""6d33adc2b6b2c14c3036feefb7fedbca1a880527""#)
        );
        assert_eq!(
            run(
                &grape,
                "/get",
                r#"{"data":"6d33adc2b6b2c14c3036feefb7fedbca1a880527"}"#
            ),
            ok(&format!(
                r#"{{"id":"{}","token":null,"v":"hello world"}}"#,
                "07".repeat(20)
            ))
        );
        assert_eq!(
            run(
                &grape,
                "/get",
                &format!(r#"{{"data":"{}"}}"#, "00".repeat(20))
            ),
            ok("")
        );
        assert_eq!(run(&grape, "/get", r#"{"data":"zz"}"#), ok(""));
        assert_eq!(
            run(&grape, "/LOOKUP", r#"{"data":"rpc_test"}"#),
            ok(r#""ERR_REQ_NOTFOUND""#)
        );
    }
}
