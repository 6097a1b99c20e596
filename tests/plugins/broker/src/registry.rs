//! The broker's registry without the host: what one registration does to the
//! cache, the reply's bytes, and how a peer reads that reply. Shared as a
//! source file (`#[path]`) by the broker's two peers, `broker-worker` and
//! `broker-client`, so all three read and write one format.
//!
//! The format is the tutorial's `nat_w_broker` (docs/wire.md TV-7): a
//! registration `{"service":S,"server":B}` is stored, with the caller's
//! observed `address` and `port` added, under the md5 (hex) of its JSON
//! text, in a cache of at most [`MAX_ENTRIES`] entries that each live
//! [`MAX_AGE_MS`] (the tutorial's `lru-cache {max: 500, maxAge: 15000}`);
//! every registration is answered with the whole cache, most recent first.

use std::net::SocketAddr;

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

/// Most entries kept; registering one more forgets the least recently
/// registered (the tutorial's `max: 500`).
pub const MAX_ENTRIES: usize = 500;

/// How long an entry lives after its last registration, in milliseconds (the
/// tutorial's `maxAge: 15000`). Peers re-register every 2 s.
pub const MAX_AGE_MS: u64 = 15_000;

/// Longest service name accepted, in bytes, so that 500 entries stay a
/// bounded amount of state and a reply a bounded message.
pub const MAX_SERVICE_NAME: usize = 128;

/// One registration as the broker keeps it and replies it. The field order
/// is the JSON key order of the tutorial's `JSON.stringify(payload)`
/// (`service`, `server` as the peer sent them, then the broker's `address`,
/// `port`): it decides the md5 key, so it must not change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub service: String,
    /// `true` for a peer that serves `service` (the tutorial's NAT'd
    /// server), `false` for one that wants to call it (a client).
    pub server: bool,
    /// The registering peer's IP as the broker observed it: its NAT's
    /// public address when it is behind one.
    pub address: String,
    /// The registering peer's UDP port as the broker observed it.
    pub port: u16,
}

/// The payload a peer registers with.
#[derive(Deserialize)]
struct Registration {
    service: String,
    server: bool,
}

const USAGE: &str = r#"register with {"service": NAME, "server": true|false}"#;

impl Entry {
    /// The entry for registration `payload` (JSON text) from `caller`
    /// (`ip:port`, the request context's observed address). Errors say what
    /// is wrong with the payload; other keys in it are ignored (the tutorial
    /// would store them too, which lets any caller fill the broker with
    /// data).
    pub fn from_request(payload: &str, caller: &str) -> Result<Entry, String> {
        let registration: Registration = serde_json::from_str(payload)
            .map_err(|e| format!("not a registration ({e}); {USAGE}"))?;
        if registration.service.is_empty() || registration.service.len() > MAX_SERVICE_NAME {
            return Err(format!(
                "the service name must be 1 to {MAX_SERVICE_NAME} bytes; {USAGE}"
            ));
        }
        let caller: SocketAddr = caller
            .parse()
            .map_err(|_| format!("the host gave no caller address ({caller:?})"))?;
        if caller.ip().is_unspecified() || caller.port() == 0 {
            return Err(format!(
                "the caller's address is unknown ({caller}): nobody could reach it \
                 (`grenache-host invoke` needs --caller IP:PORT)"
            ));
        }
        Ok(Entry {
            service: registration.service,
            server: registration.server,
            // A v4 peer on a dual-stack socket shows as ::ffff:a.b.c.d; the
            // tutorial's peers (and their md5 keys) use a.b.c.d.
            address: caller.ip().to_canonical().to_string(),
            port: caller.port(),
        })
    }

    /// The entry's cache key: md5 of its JSON text, in lowercase hex
    /// (`md5(JSON.stringify(payload))` in the tutorial).
    pub fn key(&self) -> String {
        Md5::digest(json(self).as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The peer's address as `ip:port` (`[ip]:port` for IPv6), for
    /// `host.punch` and `host.request-peer`; `None` when `address` is not an
    /// IP (a reply from some other broker).
    pub fn peer(&self) -> Option<String> {
        let ip: std::net::IpAddr = self.address.parse().ok()?;
        Some(SocketAddr::new(ip, self.port).to_string())
    }
}

/// What the broker stores under an entry's key: the entry and when it was
/// last registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub entry: Entry,
}

/// What one registration does to the cache.
#[derive(Debug, PartialEq, Eq)]
pub struct Registered {
    /// The key to store and its value (a [`Stored`], as JSON).
    pub key: String,
    pub value: Vec<u8>,
    /// The cache after the registration, most recent first.
    pub cache: Vec<(String, Stored)>,
    /// Keys to delete: expired, beyond [`MAX_ENTRIES`], or unreadable.
    pub evict: Vec<String>,
}

/// Registers `entry` at `now_ms` in a cache holding `existing` (each key
/// with its stored value, `None` where the value could not be read).
pub fn register(now_ms: u64, existing: Vec<(String, Option<Stored>)>, entry: Entry) -> Registered {
    let key = entry.key();
    let stored = Stored {
        at_ms: now_ms,
        entry,
    };
    let value = serde_json::to_vec(&stored).expect("a stored entry is always JSON");
    let mut evict = Vec::new();
    let mut cache = Vec::with_capacity(existing.len() + 1);
    for (k, v) in existing {
        match v {
            // lru-cache 4 counts an entry stale once its age exceeds maxAge.
            Some(v) if k != key && now_ms.saturating_sub(v.at_ms) <= MAX_AGE_MS => {
                cache.push((k, v))
            }
            // Registering again replaces the old value (the key stays).
            Some(_) if k == key => {}
            _ => evict.push(k),
        }
    }
    // Most recent first; equal times in key order so replies are stable.
    cache.sort_by(|(ka, a), (kb, b)| b.at_ms.cmp(&a.at_ms).then_with(|| ka.cmp(kb)));
    cache.insert(0, (key.clone(), stored));
    if cache.len() > MAX_ENTRIES {
        evict.extend(cache.drain(MAX_ENTRIES..).map(|(k, _)| k));
    }
    Registered {
        key,
        value,
        cache,
        evict,
    }
}

/// The reply to a registration: the whole cache as
/// `{SERVICE: {KEY: ENTRY, …}, …}`, most recent first (services in the order
/// of their most recent entry). With every peer registering for
/// `fibonacci_worker`, as in the tutorial, that is TV-7's
/// `{"fibonacci_worker":{KEY: ENTRY, …}}`.
pub fn reply(cache: &[(String, Stored)]) -> String {
    let mut services: Vec<&str> = Vec::new();
    for (_, stored) in cache {
        if !services.contains(&stored.entry.service.as_str()) {
            services.push(&stored.entry.service);
        }
    }
    // serde_json's maps sort their keys, so the order is written by hand.
    let mut out = String::from("{");
    for (i, service) in services.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&json(*service));
        out.push_str(":{");
        let mut first = true;
        for (key, stored) in cache.iter().filter(|(_, s)| s.entry.service == *service) {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(&json(key));
            out.push(':');
            out.push_str(&json(&stored.entry));
        }
        out.push('}');
    }
    out.push('}');
    out
}

/// `value` as JSON text.
fn json<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).expect("strings and entries are always JSON")
}

/// The peers a broker's `reply` lists for `service` with `server` as given
/// (the tutorial's register.js: a server wants the clients, a client the
/// servers), as `ip:port`, in the reply's order. Entries that are not
/// well-formed are skipped; a reply that is not an object of objects is an
/// error.
pub fn peers(reply: &str, service: &str, server: bool) -> Result<Vec<String>, String> {
    let reply: serde_json::Value =
        serde_json::from_str(reply).map_err(|e| format!("the broker's reply is not JSON: {e}"))?;
    let Some(entries) = reply.get(service) else {
        return Ok(Vec::new());
    };
    let entries = entries
        .as_object()
        .ok_or_else(|| format!("the broker's reply for {service} is not an object"))?;
    // serde_json's map is sorted by key; the reply's order (most recent
    // first) is lost, which no caller here needs.
    Ok(entries
        .values()
        .filter_map(|v| serde_json::from_value::<Entry>(v.clone()).ok())
        .filter(|e| e.service == service && e.server == server)
        .filter_map(|e| e.peer())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORKER: &str = "fibonacci_worker";

    fn entry(server: bool, port: u16) -> Entry {
        Entry::from_request(
            &format!(r#"{{"service":"{WORKER}","server":{server}}}"#),
            &format!("203.0.113.2:{port}"),
        )
        .unwrap()
    }

    fn stored(cache: &[(String, Stored)]) -> Vec<(String, Option<Stored>)> {
        cache
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect()
    }

    #[test]
    fn tv7_registration_is_answered_byte_for_byte() {
        // docs/wire.md TV-7: the request's payload, the caller the
        // tutorial's broker observed, and its reply's result.
        let e = Entry::from_request(
            r#"{"service":"fibonacci_worker","server":false}"#,
            "127.0.0.1:38742",
        )
        .unwrap();
        assert_eq!(e.key(), "69b2f36dd451211e4c8b858103fde1e2");
        let r = register(1_000, vec![], e);
        assert_eq!(
            reply(&r.cache),
            r#"{"fibonacci_worker":{"69b2f36dd451211e4c8b858103fde1e2":{"service":"fibonacci_worker","server":false,"address":"127.0.0.1","port":38742}}}"#
        );
        assert!(r.evict.is_empty());
        assert_eq!(r.key, "69b2f36dd451211e4c8b858103fde1e2");
        let back: Stored = serde_json::from_slice(&r.value).unwrap();
        assert_eq!(back.at_ms, 1_000);
    }

    #[test]
    fn most_recent_first_and_a_repeat_moves_to_the_front() {
        let r1 = register(1_000, vec![], entry(true, 1));
        let r2 = register(2_000, stored(&r1.cache), entry(false, 2));
        let order =
            |r: &Registered| -> Vec<u16> { r.cache.iter().map(|(_, s)| s.entry.port).collect() };
        assert_eq!(order(&r2), [2, 1]);
        let r3 = register(3_000, stored(&r2.cache), entry(true, 1));
        assert_eq!(order(&r3), [1, 2]);
        assert!(r3.evict.is_empty(), "the repeat keeps its key");
        let text = reply(&r3.cache);
        let first = text.find("\"port\":1}").unwrap();
        assert!(first < text.find("\"port\":2}").unwrap(), "{text}");
    }

    #[test]
    fn entries_expire_after_15_seconds() {
        let r1 = register(1_000, vec![], entry(true, 1));
        // Exactly maxAge old is still fresh (lru-cache 4: stale when age > maxAge).
        let r2 = register(1_000 + MAX_AGE_MS, stored(&r1.cache), entry(false, 2));
        assert_eq!(r2.cache.len(), 2);
        let r3 = register(1_001 + MAX_AGE_MS, stored(&r1.cache), entry(false, 2));
        assert_eq!(r3.cache.len(), 1);
        assert_eq!(r3.evict, std::slice::from_ref(&r1.key));
    }

    #[test]
    fn at_most_500_entries_the_oldest_go() {
        let mut cache = vec![];
        for port in 1..=MAX_ENTRIES as u16 {
            cache = register(u64::from(port), stored(&cache), entry(false, port)).cache;
        }
        assert_eq!(cache.len(), MAX_ENTRIES);
        let r = register(1_000, stored(&cache), entry(true, 9_999));
        assert_eq!(r.cache.len(), MAX_ENTRIES);
        assert_eq!(r.evict, [entry(false, 1).key()], "the least recent goes");
        assert_eq!(r.cache[0].1.entry.port, 9_999);
    }

    #[test]
    fn unreadable_values_are_evicted() {
        let r = register(1_000, vec![("junk".into(), None)], entry(true, 1));
        assert_eq!(r.evict, ["junk"]);
        assert_eq!(r.cache.len(), 1);
    }

    #[test]
    fn bad_registrations_say_what_to_send() {
        for (payload, caller, reason) in [
            ("[1]", "1.2.3.4:5", "not a registration"),
            (r#"{"service":"x"}"#, "1.2.3.4:5", "missing field `server`"),
            (
                r#"{"service":"x","server":"yes"}"#,
                "1.2.3.4:5",
                "not a registration",
            ),
            (
                r#"{"service":"","server":true}"#,
                "1.2.3.4:5",
                "1 to 128 bytes",
            ),
            (r#"{"service":"x","server":true}"#, "0.0.0.0:0", "--caller"),
        ] {
            let e = Entry::from_request(payload, caller).unwrap_err();
            assert!(e.contains(reason), "{payload}: {e}");
        }
        let long = format!(r#"{{"service":"{}","server":true}}"#, "x".repeat(129));
        assert!(Entry::from_request(&long, "1.2.3.4:5").is_err());
    }

    #[test]
    fn a_v4_caller_on_a_dual_stack_socket_is_recorded_as_v4() {
        let e = Entry::from_request(r#"{"service":"s","server":true}"#, "[::ffff:203.0.113.2]:7")
            .unwrap();
        assert_eq!(
            (e.address.as_str(), e.peer().unwrap().as_str()),
            ("203.0.113.2", "203.0.113.2:7")
        );
        let e = Entry::from_request(r#"{"service":"s","server":true}"#, "[2001:db8::1]:7").unwrap();
        assert_eq!(e.peer().unwrap(), "[2001:db8::1]:7");
    }

    #[test]
    fn peers_read_the_other_role_from_a_reply() {
        let r1 = register(1_000, vec![], entry(true, 1));
        let r2 = register(2_000, stored(&r1.cache), entry(false, 2));
        let text = reply(&r2.cache);
        assert_eq!(peers(&text, WORKER, true).unwrap(), ["203.0.113.2:1"]);
        assert_eq!(peers(&text, WORKER, false).unwrap(), ["203.0.113.2:2"]);
        assert!(peers(&text, "other", true).unwrap().is_empty());
        assert!(peers("{\"fibonacci_worker\":[]}", WORKER, true).is_err());
        assert!(peers("nope", WORKER, true).is_err());
        // A malformed entry is skipped, not fatal.
        let odd = r#"{"fibonacci_worker":{"a":{"service":"fibonacci_worker","server":true,"address":"x","port":1},"b":7}}"#;
        assert!(peers(odd, WORKER, true).unwrap().is_empty());
    }
}
