//! The Grenache RPC envelope on the wire.
//!
//! A request is the JSON array `[rid, key, payload]` and a reply
//! `[rid, err, result]`, with `rid` a lowercase uuid v4 string, `key` the
//! service name (or the target `ip:port` when a Node punch client calls a
//! punched address), `err` `null` or an error string, and `payload`/`result`
//! any JSON value (docs/wire.md §2). There is no framing (docs/wire.md §3):
//! each message is written whole with one write, and a receiver must cope
//! with several messages in one packet and one message over several packets,
//! so [`MessageDecoder`] parses the byte stream as a sequence of JSON values
//! (a connection's [`MessageReader`](super::connection::MessageReader) feeds
//! it).
//!
//! Payloads travel as raw JSON text ([`RawValue`]) end to end: the host
//! validates them but never re-encodes what a plugin produced.

use serde_json::value::RawValue;

/// Default cap on one message (and so on one payload): 1 MiB.
pub const DEFAULT_MAX_MESSAGE: usize = 1 << 20;

/// One decoded message: a request or a reply, told apart by the second
/// element (a string key, or `null`/string error followed by a result). The
/// two shapes overlap (`["rid","x",1]` could be a reply with error "x"), so
/// the receiver's role decides: servers read requests, clients replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request id, echoed verbatim in the reply.
    pub rid: RequestId,
    /// The service name, or the `ip:port` a Node punch client calls.
    pub key: String,
    /// The payload as JSON text.
    pub payload: String,
}

/// A reply: `err` is `None` for success (Grenache treats `""` as success too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The id of the request this answers.
    pub rid: String,
    /// The remote's Grenache error string; `None` on success.
    pub err: Option<String>,
    /// The result as JSON text (`null` when absent).
    pub result: String,
}

/// Why a message could not be decoded. Any of these means the peer is not
/// speaking Grenache: the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a JSON value; the text is serde_json's reason.
    #[error("not JSON: {0}")]
    NotJson(String),
    /// A JSON value that is not a three-element Grenache array of the
    /// expected types; the text says what was wrong.
    #[error("not a Grenache message: {0}")]
    Shape(String),
    /// A message (complete or not) over `limit` bytes, with its request id
    /// when the first 128 bytes show one, so a server can still answer.
    #[error("message of more than {limit} bytes (request id {rid:?})")]
    TooLarge {
        /// The limit in bytes (the decoder's `max_message`; on a host,
        /// `run --max-payload`).
        limit: usize,
        /// The request id at the start of the message, if readable.
        rid: Option<String>,
    },
}

/// A request id as received. Grenache's clients send a uuid string, but a
/// Node server echoes whatever JSON value came as the id (docs/wire.md §2),
/// so we do too rather than drop the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestId {
    /// A string id (the usual case), unescaped.
    Text(String),
    /// Any other JSON value, as its JSON text.
    Json(String),
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestId::Text(s) | RequestId::Json(s) => f.write_str(s),
        }
    }
}

impl PartialEq<&str> for RequestId {
    fn eq(&self, other: &&str) -> bool {
        matches!(self, RequestId::Text(s) if s == other)
    }
}

/// A borrowed request id for the encoders: a string to escape, or JSON
/// text to write as it is.
#[derive(Debug, Clone, Copy)]
pub enum Rid<'a> {
    Text(&'a str),
    Json(&'a str),
}

impl<'a> From<&'a str> for Rid<'a> {
    fn from(s: &'a str) -> Self {
        Rid::Text(s)
    }
}

impl<'a> From<&'a String> for Rid<'a> {
    fn from(s: &'a String) -> Self {
        Rid::Text(s)
    }
}

impl<'a> From<&'a RequestId> for Rid<'a> {
    fn from(id: &'a RequestId) -> Self {
        match id {
            RequestId::Text(s) => Rid::Text(s),
            RequestId::Json(j) => Rid::Json(j),
        }
    }
}

impl Rid<'_> {
    fn json(self) -> std::borrow::Cow<'static, str> {
        match self {
            Rid::Text(s) => json_string(s).into(),
            Rid::Json(j) => j.to_string().into(),
        }
    }
}

/// A fresh request id: a lowercase uuid v4, as Grenache's Node client makes.
pub fn new_rid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("strings always serialise")
}

/// Encodes `[rid, key, payload]`; `payload` must already be JSON text.
pub fn encode_request<'a>(rid: impl Into<Rid<'a>>, key: &str, payload: &str) -> Vec<u8> {
    format!("[{},{},{}]", rid.into().json(), json_string(key), payload).into_bytes()
}

/// Encodes `[rid, null, result]`; `result` must already be JSON text.
pub fn encode_ok<'a>(rid: impl Into<Rid<'a>>, result: &str) -> Vec<u8> {
    format!("[{},null,{}]", rid.into().json(), result).into_bytes()
}

/// Encodes `[rid, "<message>", null]`.
pub fn encode_err<'a>(rid: impl Into<Rid<'a>>, message: &str) -> Vec<u8> {
    format!("[{},{},null]", rid.into().json(), json_string(message)).into_bytes()
}

/// Reads `[a, b, c]` as three raw elements.
fn split3(value: &RawValue) -> Result<[&RawValue; 3], DecodeError> {
    let parts: Vec<&RawValue> = serde_json::from_str(value.get()).map_err(|_| {
        DecodeError::Shape(format!(
            "expected a JSON array, got {}",
            preview(value.get())
        ))
    })?;
    <[&RawValue; 3]>::try_from(parts).map_err(|parts| {
        DecodeError::Shape(format!(
            "expected 3 elements [rid, key, payload], got {}",
            parts.len()
        ))
    })
}

fn string_of(raw: &RawValue, what: &str) -> Result<String, DecodeError> {
    serde_json::from_str::<String>(raw.get()).map_err(|_| {
        DecodeError::Shape(format!(
            "{what} must be a string, got {}",
            preview(raw.get())
        ))
    })
}

fn preview(text: &str) -> String {
    let mut p: String = text.chars().take(40).collect();
    if p.len() < text.len() {
        p.push('…');
    }
    p
}

/// Interprets one JSON value as a request.
pub fn parse_request(value: &RawValue) -> Result<Request, DecodeError> {
    let [rid, key, payload] = split3(value)?;
    let rid = match serde_json::from_str::<String>(rid.get()) {
        Ok(text) => RequestId::Text(text),
        Err(_) => RequestId::Json(rid.get().to_string()),
    };
    Ok(Request {
        rid,
        key: string_of(key, "the key")?,
        payload: payload.get().to_string(),
    })
}

/// Interprets one JSON value as a reply.
pub fn parse_reply(value: &RawValue) -> Result<Reply, DecodeError> {
    let [rid, err, result] = split3(value)?;
    let err = match serde_json::from_str::<Option<String>>(err.get()) {
        Ok(Some(e)) if e.is_empty() => None,
        Ok(e) => e,
        Err(_) => {
            return Err(DecodeError::Shape(format!(
                "err must be null or a string, got {}",
                preview(err.get())
            )))
        }
    };
    Ok(Reply {
        rid: string_of(rid, "the request id")?,
        err,
        result: result.get().to_string(),
    })
}

/// Turns a byte stream into whole JSON values, however the bytes were split
/// into packets (docs/wire.md §3), skipping whitespace between them (the
/// keep-alive spaces of earlier hosts, docs/wire.md#heartbeat).
///
/// Linear in the bytes received, however they are split: a scanner
/// finds where the next value ends by looking at each byte once (string,
/// escape and nesting state carry over from one `push` to the next), and
/// only a complete value is handed to serde_json, once. A message trickled
/// in 100-byte packets therefore costs what it costs in one piece (issue 13:
/// re-parsing the buffer from its start on every packet was quadratic).
/// Whether the bytes are valid JSON is decided by that one parse; until a
/// value ends, what it holds is bounded by `max_message`.
#[derive(Debug)]
pub struct MessageDecoder {
    /// Received bytes from the first one still needed: what comes before
    /// the scanner's position (messages returned, whitespace between them)
    /// is dropped at the next `push`, so many messages in one packet cost
    /// one move.
    buffer: Vec<u8>,
    scanner: Scanner,
    max_message: usize,
}

/// Where the value being received starts and how far the bytes after it
/// have been examined, with the JSON lexical state at that point.
#[derive(Debug, Default, Clone, Copy)]
struct Scanner {
    /// Offset in `buffer` of the value's first byte, once seen.
    start: Option<usize>,
    /// Offset in `buffer` of the first byte not yet examined.
    next: usize,
    /// Open `[` and `{` not yet closed.
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// Bytes examined since the decoder was made (tests check linearity).
    #[cfg(test)]
    examined: usize,
}

/// Bytes that end a bare top-level number or literal (`true`, `12`): JSON's
/// structural characters, the start of a string, and whitespace.
fn ends_a_bare_value(b: u8) -> bool {
    matches!(b, b'[' | b']' | b'{' | b'}' | b',' | b':' | b'"') || is_json_whitespace(b)
}

/// JSON's whitespace (RFC 8259 §2): space, tab, line feed, carriage return.
/// Not Rust's `is_ascii_whitespace`, which also takes form feed, a byte
/// serde_json refuses between values.
fn is_json_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl Scanner {
    /// Starts looking for the next value at offset `next`.
    fn expect_value_at(&mut self, next: usize) {
        self.start = None;
        self.next = next;
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
    }

    /// Examines `buffer[self.next..]` and returns the end (exclusive) of the
    /// value that starts at `self.start`, if it has ended.
    fn find_end(&mut self, buffer: &[u8]) -> Option<usize> {
        while self.next < buffer.len() {
            let i = self.next;
            let b = buffer[i];
            self.next += 1;
            #[cfg(test)]
            {
                self.examined += 1;
            }
            let Some(start) = self.start else {
                if !is_json_whitespace(b) {
                    self.start = Some(i);
                    match b {
                        b'[' | b'{' => self.depth = 1,
                        b'"' => self.in_string = true,
                        b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {}
                        // Not the start of any value: let the parser say so.
                        _ => return Some(i + 1),
                    }
                }
                continue;
            };
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                    if self.depth == 0 {
                        return Some(i + 1);
                    }
                } else {
                    // Most of a message is string contents: jump to the
                    // next quote or backslash (or the end of what arrived).
                    let skip = memchr::memchr2(b'"', b'\\', &buffer[self.next..])
                        .unwrap_or(buffer.len() - self.next);
                    self.next += skip;
                    #[cfg(test)]
                    {
                        self.examined += skip;
                    }
                }
                continue;
            }
            if self.depth == 0 {
                // A bare number or literal: it ends before its first
                // delimiter, and at the first byte no number or literal has.
                if ends_a_bare_value(b) && i > start {
                    self.next = i;
                    return Some(i);
                }
                if !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-')) {
                    return Some(i + 1);
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'[' | b'{' => self.depth += 1,
                b']' | b'}' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        return Some(i + 1);
                    }
                }
                _ => {}
            }
        }
        None
    }
}

impl MessageDecoder {
    /// A decoder that refuses any message longer than `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        MessageDecoder {
            buffer: Vec::new(),
            scanner: Scanner::default(),
            max_message,
        }
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        let done = self.scanner.start.unwrap_or(self.scanner.next);
        if done > 0 {
            self.buffer.drain(..done);
            self.scanner.start = self.scanner.start.map(|s| s - done);
            self.scanner.next -= done;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete value, `Ok(None)` if more bytes are needed, or an
    /// error if the stream is not a sequence of JSON values (after an error
    /// the decoder should be dropped together with its connection).
    pub fn next_message(&mut self) -> Result<Option<Box<RawValue>>, DecodeError> {
        let Some(end) = self.scanner.find_end(&self.buffer) else {
            return match self.scanner.start {
                Some(start) if self.buffer.len() - start > self.max_message => {
                    Err(self.too_large(start))
                }
                _ => Ok(None),
            };
        };
        let start = self.scanner.start.expect("a value that ended has started");
        if end - start > self.max_message {
            return Err(self.too_large(start));
        }
        let value = serde_json::from_slice::<Box<RawValue>>(&self.buffer[start..end])
            .map_err(|e| DecodeError::NotJson(e.to_string()))?;
        self.scanner.expect_value_at(end);
        Ok(Some(value))
    }

    fn too_large(&self, start: usize) -> DecodeError {
        DecodeError::TooLarge {
            limit: self.max_message,
            rid: leading_rid(&self.buffer[start..]),
        }
    }
}

/// The request id at the start of a (possibly incomplete) message, so an
/// oversized request can still get an error reply naming it.
fn leading_rid(buffer: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(&buffer[..buffer.len().min(128)])
        .ok()
        .or_else(|| {
            // Cut at a char boundary if the 128-byte window split one.
            std::str::from_utf8(&buffer[..64.min(buffer.len())]).ok()
        })?;
    let rest = text
        .trim_start()
        .strip_prefix('[')?
        .trim_start()
        .strip_prefix('"')?;
    let end = rest.find('"')?;
    let rid = &rest[..end];
    (rid.len() <= 64 && rid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        .then(|| rid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_vectors::{TV2, TV3, TV4, TV5};

    fn decode_all(bytes: &[u8]) -> Vec<String> {
        let mut d = MessageDecoder::new(DEFAULT_MAX_MESSAGE);
        d.push(bytes);
        let mut out = vec![];
        while let Some(v) = d.next_message().unwrap() {
            out.push(v.get().to_string());
        }
        out
    }

    #[test]
    fn tv1_the_punch_is_not_json_traffic() {
        // TV-1 is tested in `transport` (demux) and TV-9 there too (the
        // handshake headers reach uTP) and end to end against Node's libutp;
        // here: a punch never decodes as a message.
        let mut d = MessageDecoder::new(DEFAULT_MAX_MESSAGE);
        d.push(&[0xC3, 0xBF]);
        assert!(d.next_message().is_err());
    }

    #[test]
    fn tv2_tv3_request_and_reply_by_service_name() {
        assert_eq!(TV2.len(), 59);
        let v = decode_all(TV2.as_bytes());
        let req = parse_request(&RawValue::from_string(v[0].clone()).unwrap()).unwrap();
        assert_eq!(req.rid, "3f2cf13b-da02-4abf-bb01-9306b37281a3");
        assert_eq!(req.key, "rpc_test");
        assert_eq!(req.payload, r#""hello""#);
        let reply = encode_ok(&req.rid, r#""world""#);
        assert_eq!(reply, TV3.as_bytes());
        assert_eq!(reply.len(), 53);
        assert_eq!(
            encode_request(&req.rid, &req.key, &req.payload),
            TV2.as_bytes()
        );
    }

    #[test]
    fn tv4_tv5_request_to_a_punched_address() {
        assert_eq!(TV4.len(), 72);
        let req = parse_request(&RawValue::from_string(TV4.into()).unwrap()).unwrap();
        assert_eq!(req.key, "127.0.0.1:38772");
        assert_eq!(req.payload, r#"{"length":10}"#);
        let reply = encode_ok(&req.rid, "[1,1,2,3,5,8,13,21,34,55]");
        assert_eq!(reply, TV5.as_bytes());
        assert_eq!(reply.len(), 71);
    }

    #[test]
    fn tv6_error_replies() {
        let parse = |s: &str| parse_reply(&RawValue::from_string(s.into()).unwrap()).unwrap();
        let r = parse(r#"["879afcb4-326f-4b24-a6b3-960f8629e164","ERR_SOMETHING",null]"#);
        assert_eq!(
            (r.err.as_deref(), r.result.as_str()),
            (Some("ERR_SOMETHING"), "null")
        );
        let r = parse(r#"["034d102c-2a87-472b-aa35-1c2eaf0b96ed","ERR_X",{"partial":1}]"#);
        assert_eq!(
            (r.err.as_deref(), r.result.as_str()),
            (Some("ERR_X"), r#"{"partial":1}"#)
        );
        let r = parse(r#"["28e6f58d-3a04-465e-9a8f-fa8b8889051c",null,null]"#);
        assert_eq!((r.err, r.result.as_str()), (None, "null"));
        let r = parse(r#"["28e6f58d-3a04-465e-9a8f-fa8b8889051c","",1]"#);
        assert_eq!(r.err, None, "an empty err string means success");
        assert_eq!(
            encode_err("879afcb4-326f-4b24-a6b3-960f8629e164", "ERR_SOMETHING"),
            br#"["879afcb4-326f-4b24-a6b3-960f8629e164","ERR_SOMETHING",null]"#
        );
    }

    #[test]
    fn tv7_broker_messages_round_trip() {
        let req = r#"["28aa1b26-c47c-44b0-a05d-c2963382ffc0","fibo_broker",{"service":"fibonacci_worker","server":false}]"#;
        let r = parse_request(&RawValue::from_string(req.into()).unwrap()).unwrap();
        assert_eq!(encode_request(&r.rid, &r.key, &r.payload), req.as_bytes());
        let reply = r#"["28aa1b26-c47c-44b0-a05d-c2963382ffc0",null,{"fibonacci_worker":{"69b2f36dd451211e4c8b858103fde1e2":{"service":"fibonacci_worker","server":false,"address":"127.0.0.1","port":38742}}}]"#;
        assert_eq!(reply.len(), 184);
        let r = parse_reply(&RawValue::from_string(reply.into()).unwrap()).unwrap();
        assert_eq!(encode_ok(&r.rid, &r.result), reply.as_bytes());
    }

    #[test]
    fn tv8_coalesced_and_split_messages() {
        // Several messages in one packet, as libutp's Nagle makes them.
        let joined = format!("{TV2}{TV4}{TV2}");
        assert_eq!(decode_all(joined.as_bytes()), vec![TV2, TV4, TV2]);
        // One message over several packets, split at every possible point.
        for cut in 1..TV4.len() {
            let mut d = MessageDecoder::new(DEFAULT_MAX_MESSAGE);
            d.push(&TV4.as_bytes()[..cut]);
            assert!(d.next_message().unwrap().is_none(), "cut at {cut}");
            d.push(&TV4.as_bytes()[cut..]);
            assert_eq!(d.next_message().unwrap().unwrap().get(), TV4);
        }
        // The 1382-byte boundary message decodes whole.
        let rid = new_rid();
        let overhead = encode_request(&rid, "k", r#""""#).len();
        let pad = "x".repeat(1382 - overhead);
        let msg = encode_request(&rid, "k", &format!("\"{pad}\""));
        assert_eq!(msg.len(), 1382);
        assert_eq!(decode_all(&msg).len(), 1);
    }

    #[test]
    fn trickled_bytes_are_examined_once() {
        // A 1 MiB request in 100-byte packets: each byte is looked at once,
        // not once per packet as a re-parse from the start would.
        let rid = new_rid();
        let msg = encode_request(&rid, "k", &format!("\"{}\"", "x\\\"".repeat(1 << 18)));
        let mut d = MessageDecoder::new(2 << 20);
        let mut got = vec![];
        for chunk in msg.chunks(100) {
            d.push(chunk);
            while let Some(v) = d.next_message().unwrap() {
                got.push(v);
            }
        }
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].get().as_bytes(), &msg[..]);
        assert_eq!(d.scanner.examined, msg.len());
    }

    #[test]
    fn values_of_every_kind_end_where_json_says() {
        // Strings holding brackets and escaped quotes, nested objects, bare
        // scalars ended by whitespace, whitespace between values.
        let stream = br#"  ["a]\"[", {"b":[1,{"c":"}"}]}] "top\"]" 12 true ["x"]"#;
        assert_eq!(
            decode_all(stream),
            vec![
                r#"["a]\"[", {"b":[1,{"c":"}"}]}]"#,
                r#""top\"]""#,
                "12",
                "true",
                r#"["x"]"#
            ]
        );
        // A bare scalar at the end of what arrived may go on: wait.
        let mut d = MessageDecoder::new(DEFAULT_MAX_MESSAGE);
        d.push(b"12");
        assert!(d.next_message().unwrap().is_none());
        d.push(b"3 ");
        assert_eq!(d.next_message().unwrap().unwrap().get(), "123");
        // Garbage is refused once its value ends, and a stray closer at once.
        // A form feed is not JSON whitespace, before a value or after one.
        for junk in [
            &b"\x0c[1]"[..],
            b"[1]\x0c[2]",
            b"12\x0c ",
            b"[1,}",
            b"]",
            b",",
            b"[tru]",
            br#"{"a" 1}"#,
            b"tr\xC3",
            b"\xC3",
        ] {
            let mut d = MessageDecoder::new(DEFAULT_MAX_MESSAGE);
            d.push(junk);
            assert!(
                std::iter::from_fn(|| Some(d.next_message()))
                    .take(3)
                    .any(|r| r.is_err()),
                "{}",
                String::from_utf8_lossy(junk)
            );
        }
    }

    #[test]
    fn an_unfinished_value_is_refused_past_the_limit() {
        let mut d = MessageDecoder::new(1000);
        d.push(br#"["00000000-0000-4000-8000-000000000001","k",""#);
        for _ in 0..9 {
            d.push(&[b'x'; 100]);
            assert!(d.next_message().unwrap().is_none());
        }
        d.push(&[b'x'; 100]);
        match d.next_message() {
            Err(DecodeError::TooLarge { limit: 1000, rid }) => {
                assert_eq!(rid.as_deref(), Some("00000000-0000-4000-8000-000000000001"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rids_are_lowercase_uuid_v4() {
        let rid = new_rid();
        assert_eq!(rid.len(), 36);
        assert_eq!(rid, rid.to_lowercase());
        assert_eq!(&rid[14..15], "4", "version nibble");
        assert!(matches!(&rid[19..20], "8" | "9" | "a" | "b"), "variant");
    }

    #[test]
    fn an_id_that_is_not_a_string_is_echoed_as_node_does() {
        for (req, reply) in [
            (r#"[1,"svc",2]"#, r#"[1,null,"ok"]"#),
            (r#"[{"n":1},"svc",2]"#, r#"[{"n":1},null,"ok"]"#),
            (r#"[null,"svc",2]"#, r#"[null,null,"ok"]"#),
        ] {
            let r = parse_request(&RawValue::from_string(req.into()).unwrap()).unwrap();
            assert_eq!(encode_ok(&r.rid, r#""ok""#), reply.as_bytes());
        }
    }

    #[test]
    fn garbage_and_wrong_shapes_are_errors() {
        let mut d = MessageDecoder::new(DEFAULT_MAX_MESSAGE);
        d.push(b"GET / HTTP/1.1\r\n");
        assert!(matches!(d.next_message(), Err(DecodeError::NotJson(_))));
        for bad in [r#"{"a":1}"#, r#"["a","b"]"#, r#"["a",2,3]"#] {
            assert!(
                parse_request(&RawValue::from_string(bad.into()).unwrap()).is_err(),
                "{bad}"
            );
        }
        assert!(parse_reply(&RawValue::from_string(r#"["a",5,3]"#.into()).unwrap()).is_err());
    }

    /// What the decoder makes of `bytes` pushed in the pieces `cuts`
    /// marks: the values it returned, then whether it stopped on an error.
    fn decode_split(bytes: &[u8], cuts: &[usize], max: usize) -> (Vec<String>, bool) {
        let mut d = MessageDecoder::new(max);
        let mut out = vec![];
        let mut from = 0;
        for &to in cuts.iter().chain([&bytes.len()]) {
            d.push(&bytes[from..to]);
            from = to;
            loop {
                match d.next_message() {
                    Ok(Some(v)) => out.push(v.get().to_string()),
                    Ok(None) => break,
                    Err(_) => return (out, true),
                }
            }
        }
        (out, false)
    }

    /// serde_json's verdict on the same stream: the values before its
    /// first error, and that error's kind (`None`: the stream ended well).
    fn serde_stream(bytes: &[u8]) -> (Vec<String>, Option<serde_json::error::Category>) {
        let mut out = vec![];
        for v in serde_json::Deserializer::from_slice(bytes).into_iter::<Box<RawValue>>() {
            match v {
                Ok(v) => out.push(v.get().to_string()),
                Err(e) => return (out, Some(e.classify())),
            }
        }
        (out, None)
    }

    fn random_json(rng: &mut impl rand::Rng, depth: usize) -> String {
        const PIECES: &[&str] = &[
            "a",
            "\\\"",
            "\\\\",
            "\\n",
            "\\u00e9",
            "\\ud83d\\ude00",
            "é",
            "😀",
            "]",
            "[",
            "{",
            "}",
            ",",
            ":",
            " ",
            "\\/",
        ];
        match rng.random_range(0..if depth > 4 { 4 } else { 6 }) {
            0 => rng.random_range(-1000i64..1000).to_string(),
            1 => ["true", "false", "null", "1.5e3", "-0.25"][rng.random_range(0..5)].into(),
            2 | 3 => {
                let n = rng.random_range(0..6);
                let body: String = (0..n)
                    .map(|_| PIECES[rng.random_range(0..PIECES.len())])
                    .collect();
                format!("\"{body}\"")
            }
            4 => {
                let n = rng.random_range(0..4);
                let items: Vec<String> = (0..n).map(|_| random_json(rng, depth + 1)).collect();
                format!("[{}]", items.join(if rng.random() { "," } else { " , " }))
            }
            _ => {
                let n = rng.random_range(0..4);
                let items: Vec<String> = (0..n)
                    .map(|i| format!("\"k{i}\":{}", random_json(rng, depth + 1)))
                    .collect();
                format!("{{{}}}", items.join(","))
            }
        }
    }

    #[test]
    fn random_splits_of_random_streams_agree_with_serde_json() {
        // Valid streams of arrays and objects (the values a peer sends),
        // and the same with a byte changed, dropped or doubled, each pushed
        // in random pieces: the decoder returns what serde_json reads from
        // the stream whole, stops with an error where serde_json finds
        // one, and waits only when serde_json ran out of input.
        use rand::{Rng, SeedableRng};
        let seed: u64 = rand::random();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for round in 0..5000 {
            let n = rng.random_range(1..4);
            let mut stream = String::new();
            for _ in 0..n {
                let value = loop {
                    let v = random_json(&mut rng, 0);
                    if v.starts_with(['[', '{']) {
                        break v;
                    }
                };
                stream.push_str(&value);
                // Form feed: Rust's whitespace, not JSON's.
                stream.push_str([" ", "", "\n", "\r\n  ", "\t", "\u{c}"][rng.random_range(0..6)]);
            }
            let mut bytes = stream.into_bytes();
            if round % 2 == 1 {
                let at = rng.random_range(0..bytes.len());
                match rng.random_range(0..3) {
                    0 => bytes[at] = rng.random(),
                    1 => {
                        bytes.remove(at);
                    }
                    _ => bytes.insert(at, bytes[at]),
                }
            }
            // A bare number at the very end may go on (the decoder waits,
            // serde_json takes the end of input as its end): end it.
            bytes.push(b' ');
            let mut cuts: Vec<usize> = (0..rng.random_range(0..8))
                .map(|_| rng.random_range(0..=bytes.len()))
                .collect();
            cuts.sort_unstable();
            let (got, failed) = decode_split(&bytes, &cuts, DEFAULT_MAX_MESSAGE);
            let (want, error) = serde_stream(&bytes);
            let shown = String::from_utf8_lossy(&bytes);
            assert_eq!(got, want, "seed {seed}, stream {shown:?}, cuts {cuts:?}");
            match error {
                None => assert!(!failed, "seed {seed}: {shown:?} is valid JSON"),
                Some(serde_json::error::Category::Eof) => {
                    assert!(!failed, "seed {seed}: {shown:?} may go on")
                }
                Some(_) if failed => {}
                Some(_) => {
                    // The scanner saw no end yet (a stray quote put the
                    // rest in a string): it waits, as for a slow peer,
                    // until the limit refuses the value.
                    let limit = bytes.len() + 64;
                    let mut d = MessageDecoder::new(limit);
                    d.push(&bytes);
                    let padding = vec![b'x'; limit];
                    let refused = std::iter::from_fn(|| Some(d.next_message()))
                        .take(want.len() + 2)
                        .find_map(|r| r.err());
                    let refused = refused.or_else(|| {
                        d.push(&padding);
                        std::iter::from_fn(|| Some(d.next_message()))
                            .take(2)
                            .find_map(|r| r.err())
                    });
                    assert!(refused.is_some(), "seed {seed}: {shown:?} is never refused");
                }
            }
        }
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        // 1 MiB of `[` waits for its end and then is too large; nesting
        // past serde_json's recursion limit inside the limit is not JSON.
        let mut d = MessageDecoder::new(DEFAULT_MAX_MESSAGE);
        d.push(&vec![b'['; DEFAULT_MAX_MESSAGE]);
        assert!(d.next_message().unwrap().is_none());
        d.push(b"[");
        assert!(matches!(
            d.next_message(),
            Err(DecodeError::TooLarge { .. })
        ));
        // serde_json reads a raw value without recursing: 100,000 levels
        // in a request's payload are one message, as it says.
        let deep = format!(
            "[\"r\",\"k\",{}{}]",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let (got, failed) = decode_split(deep.as_bytes(), &[7, 50_000], DEFAULT_MAX_MESSAGE);
        assert_eq!((&got, failed), (&serde_stream(deep.as_bytes()).0, false));
        let request = parse_request(&RawValue::from_string(got[0].clone()).unwrap()).unwrap();
        assert_eq!(request.payload.len(), 200_000);
    }

    #[test]
    fn oversized_messages_are_refused_with_their_rid() {
        let mut d = MessageDecoder::new(100);
        let big = encode_request(
            "3f2cf13b-da02-4abf-bb01-9306b37281a3",
            "k",
            &format!("\"{}\"", "x".repeat(200)),
        );
        d.push(&big[..150]);
        match d.next_message() {
            Err(DecodeError::TooLarge { limit: 100, rid }) => {
                assert_eq!(rid.as_deref(), Some("3f2cf13b-da02-4abf-bb01-9306b37281a3"))
            }
            other => panic!("{other:?}"),
        }
    }
}
