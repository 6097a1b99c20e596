//! The Grape backend of [`Discovery`]: a link to one or more Grapes, the DHT
//! nodes of Bitfinex's Grenache, through their HTTP API, as
//! grenache-nodejs-link does (0.7.13 and 1.0.2 `index.js`; docs/wire.md §6).
//!
//! - **Announce:** `POST {grape}/announce` with `{"rid":"<uuid v4>","data":[name,port]}`
//!   to every Grape given. A Grape answers the number of DHT nodes that took
//!   it (`1`), or an error as a JSON string with status 200 (`"No nodes to
//!   query"` when it knows no other Grape). The announce succeeds when one
//!   Grape took it; the others are named in a warning.
//! - **Look up:** `POST {grape}/lookup` with `{"rid":"<uuid>","data":name}`;
//!   the answer is a JSON array of `"a.b.c.d:port"` (at most 100, random
//!   order). All Grapes are asked at once and **the first non-empty answer
//!   wins**: each Grape runs a full DHT traversal for a lookup, so one
//!   answer is the network's view, and waiting for every Grape would only
//!   add the slowest one's delay. A lookup fails only when no Grape answered.
//! - **Keys:** the raw service name, no hashing (a Grape turns the name's
//!   UTF-8 bytes into the info-hash itself), so Node services and our hosts
//!   find each other.
//! - **Which address:** a Grape stores the announcing Grape's IP with the
//!   port given, so a host must announce through a Grape on its own machine
//!   (or behind its own NAT), as Node services do.
//! - **Failures:** every HTTP request has a deadline
//!   ([`GRAPE_REQUEST_TIMEOUT`], the link's), transport errors, timeouts
//!   and non-2xx answers are retried ([`GRAPE_ATTEMPTS`] tries, as the link
//!   does) after a growing pause, and answers are read up to
//!   [`MAX_GRAPE_ANSWER`] bytes. A Grape that failed every try rests: it gets
//!   one try per request, and lookups skip it while another Grape is awake,
//!   for a pause that doubles with each failure from [`GRAPE_REST_MIN`] to
//!   [`GRAPE_REST_MAX`]. Errors name the Grape, the cause and the fix.
//! - **Caching:** answers are reused for [`LOOKUP_CACHE_TTL`](super::LOOKUP_CACHE_TTL)
//!   (2 s, not the link's 10 s; empty answers are not kept). Which peers
//!   answer is the caller's memory, as with the DHT backend.

use std::fmt;
use std::net::{SocketAddr, SocketAddrV4};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;

use super::{is_usable_peer, without_repeats, BoxFuture, Discovery, DiscoveryError, LookupCache};

/// Deadline of one HTTP request to a Grape, connect included:
/// grenache-nodejs-link's `requestTimeout` (2500 ms).
pub const GRAPE_REQUEST_TIMEOUT: Duration = Duration::from_millis(2500);
/// Tries per request when a Grape cannot be reached, times out or answers
/// with a non-2xx status: grenache-nodejs-link's `retry: 3` for lookups and
/// announces. A Grape's own answer (a 200 with an error string) is final.
pub const GRAPE_ATTEMPTS: u32 = 3;
/// Pause before the second try; it doubles before each further one.
pub const GRAPE_RETRY_PAUSE: Duration = Duration::from_millis(250);
/// Largest Grape answer read, in bytes. A lookup answer is at most 100
/// `"a.b.c.d:port"` strings (about 2.4 KB); anything much larger is not a
/// Grape's and is refused before it is parsed.
pub const MAX_GRAPE_ANSWER: usize = 64 * 1024;
/// Most peers taken from one lookup answer (a Grape sends at most 100).
pub const MAX_LOOKUP_PEERS: usize = 100;
/// Longest service name sent to a Grape, in bytes. The name travels as the
/// info-hash of DHT datagrams, so a longer one cannot work anyway.
pub const MAX_SERVICE_NAME: usize = 512;
/// How long an announce may take through all its tries.
pub const ANNOUNCE_DEADLINE: Duration = Duration::from_secs(10);
/// First rest of a Grape that failed every try of a request.
pub const GRAPE_REST_MIN: Duration = Duration::from_secs(1);
/// Longest rest of a Grape that keeps failing.
pub const GRAPE_REST_MAX: Duration = Duration::from_secs(30);
/// How long an idle connection to a Grape is kept for reuse: under Node's
/// HTTP keep-alive of 5 s, so we never send on a connection the Grape is
/// closing.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(4);
/// Most characters of an error body quoted in a message.
const QUOTED_BODY_CHARS: usize = 200;

/// A Grape's HTTP API address, e.g. `http://127.0.0.1:30001` (the port is
/// the Grape's `--aph`). Plain `http` only: Grapes do not speak TLS. A path
/// is kept as a prefix (`http://proxy/grape` → `http://proxy/grape/lookup`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrapeUrl {
    /// Without a trailing slash.
    base: String,
    /// The port, given or 80.
    port: u16,
}

impl GrapeUrl {
    /// The URL of one endpoint, e.g. `lookup`.
    fn endpoint(&self, path: &str) -> String {
        format!("{}/{path}", self.base)
    }

    /// The API port, as a grape's `--aph`.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for GrapeUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

impl FromStr for GrapeUrl {
    type Err = String;

    /// Parses `http://HOST[:PORT][/PATH]`; the error says how to write it.
    fn from_str(text: &str) -> Result<Self, String> {
        let example = "give a Grape's HTTP API as http://HOST:PORT with its --aph port, e.g. http://127.0.0.1:30001";
        let url = reqwest::Url::parse(text)
            .map_err(|e| format!("{text:?} is not a URL ({e}); {example}"))?;
        match url.scheme() {
            "http" => {}
            "https" => {
                return Err(format!(
                    "{text:?}: Grapes speak plain HTTP, not HTTPS; {example}"
                ))
            }
            other => {
                return Err(format!(
                    "{text:?} is not an http:// URL (scheme {other:?}); {example}"
                ))
            }
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(format!("{text:?} names no host; {example}"));
        }
        if !url.username().is_empty()
            || url.password().is_some()
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(format!(
                "{text:?}: a Grape URL has no user, query or fragment; {example}"
            ));
        }
        let port = url.port_or_known_default().unwrap_or(80);
        let base = url.as_str().trim_end_matches('/').to_string();
        Ok(GrapeUrl { base, port })
    }
}

/// Why one request to one Grape failed. The text names the Grape, the cause
/// and, where there is one, the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum GrapeError {
    #[error("cannot reach the Grape at {url} ({cause}); is a grape running with --aph {}?", url.port())]
    Unreachable { url: GrapeUrl, cause: String },
    /// The connection was made, but the exchange broke off or the answer's
    /// head could not be read (e.g. headers too large): the Grape was
    /// reached, so the hint is not "is a grape running".
    #[error("the Grape at {url} was reached, but the exchange failed ({cause}); is {url} a grape's --aph port?")]
    Broken { url: GrapeUrl, cause: String },
    /// `after` is the whole wait, every try and pause included.
    #[error("the Grape at {url} did not answer within {after:?} ({tries} {}); is it overloaded, or is {url} another kind of server?", if *tries == 1 { "try" } else { "tries" })]
    Timeout {
        url: GrapeUrl,
        after: Duration,
        tries: u32,
    },
    #[error("the Grape at {url} answered HTTP {status}: {body}")]
    Status {
        url: GrapeUrl,
        status: u16,
        body: String,
    },
    /// `message` has been through [`quoted`], so it is shown as it is.
    #[error("the Grape at {url} answered \"{message}\"{}", hint(message, url))]
    Refused { url: GrapeUrl, message: String },
    #[error("what {url} answered is not a Grape's ({reason}); is {url} a grape's --aph port?")]
    NotAGrape { url: GrapeUrl, reason: String },
}

impl GrapeError {
    /// Whether grenache-nodejs-link would try again: transport errors,
    /// timeouts and non-2xx statuses. A Grape's own answer is final.
    fn is_retried(&self) -> bool {
        matches!(
            self,
            GrapeError::Unreachable { .. }
                | GrapeError::Broken { .. }
                | GrapeError::Timeout { .. }
                | GrapeError::Status { .. }
        )
    }
}

/// What to do about a Grape's error string (grenache-grape 1.0.0
/// `lib/Grape.js` and k-rpc's `queryAll`; docs/wire.md §6.1).
fn hint(message: &str, url: &GrapeUrl) -> String {
    match message {
        "No nodes to query" => {
            " (it knows no other Grape to store it at: is its --bn the --dp of a running grape?)"
                .into()
        }
        "All queries failed" => {
            " (no other Grape of its DHT acknowledged: are they running?)".into()
        }
        "ERR_REQ_NOTFOUND" => {
            format!(" (no such endpoint: is {url} a grape's --aph port, with no path?)")
        }
        _ => String::new(),
    }
}

/// Why an HTTP exchange failed, in a few words: `connection refused` rather
/// than reqwest's chain of wrappers.
fn transport_cause(error: &reqwest::Error) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    let mut innermost = error.to_string();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
                std::io::ErrorKind::ConnectionReset => "connection reset".into(),
                _ => io.to_string(),
            };
        }
        innermost = e.to_string();
        source = e.source();
    }
    innermost
}

/// `text` cut to [`QUOTED_BODY_CHARS`], with control characters escaped
/// (`\u{1b}`, `\n`), for a message: everything a Grape sends reaches the
/// log or a terminal through here, and an escape sequence or a newline in
/// it could repaint the terminal or forge a log line.
fn quoted(text: &str) -> String {
    let text = text.trim();
    let (kept, cut) = match text.char_indices().nth(QUOTED_BODY_CHARS) {
        Some((end, _)) => (&text[..end], "…"),
        None => (text, ""),
    };
    let mut escaped = String::with_capacity(kept.len());
    for c in kept.chars() {
        if c.is_control() {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    escaped + cut
}

/// What a Grape answered to a lookup.
#[derive(Debug, PartialEq, Eq)]
struct LookupAnswer {
    /// How many entries its array had, usable or not.
    entries: usize,
    /// The usable peers among them.
    peers: Vec<SocketAddr>,
}

/// A lookup answer's peers: the `"a.b.c.d:port"` strings of a JSON array,
/// at most [`MAX_LOOKUP_PEERS`], without repeats; entries that are not one,
/// or not a [usable peer](is_usable_peer), are left out. A JSON
/// string is the Grape's error.
fn lookup_answer(url: &GrapeUrl, answer: serde_json::Value) -> Result<LookupAnswer, GrapeError> {
    match answer {
        serde_json::Value::Array(entries) => Ok(LookupAnswer {
            entries: entries.len(),
            // Filtered before the cap, so junk cannot crowd real peers out.
            peers: without_repeats(
                entries
                    .iter()
                    .filter_map(|entry| entry.as_str()?.parse::<SocketAddrV4>().ok())
                    .map(SocketAddr::V4)
                    .filter(is_usable_peer)
                    .take(MAX_LOOKUP_PEERS)
                    .collect(),
            ),
        }),
        serde_json::Value::String(message) => Err(GrapeError::Refused {
            url: url.clone(),
            message: quoted(&message),
        }),
        other => Err(GrapeError::NotAGrape {
            url: url.clone(),
            reason: format!("a lookup answered {}", quoted(&other.to_string())),
        }),
    }
}

/// An announce answer: the number of DHT nodes that took it, a positive
/// integer, or the Grape's error string. Any other answer (`0`, `-5`, `1.5`,
/// an object) is a failure that quotes it: a Grape that stored the announce
/// nowhere answers an error string, never 0.
fn announce_answer(url: &GrapeUrl, answer: serde_json::Value) -> Result<u64, GrapeError> {
    match answer {
        serde_json::Value::Number(n) if n.as_u64().is_some_and(|n| n > 0) => {
            Ok(n.as_u64().unwrap_or_default())
        }
        serde_json::Value::String(message) => Err(GrapeError::Refused {
            url: url.clone(),
            message: quoted(&message),
        }),
        other => Err(GrapeError::NotAGrape {
            url: url.clone(),
            reason: format!("an announce answered {}", quoted(&other.to_string())),
        }),
    }
}

/// One Grape and how it has been answering.
struct Grape {
    url: GrapeUrl,
    health: Mutex<GrapeHealth>,
}

/// A Grape's recent failures.
#[derive(Debug, Default)]
struct GrapeHealth {
    /// Requests in a row that failed every try.
    failures: u32,
    /// Until when it rests (see the module doc).
    rests_until: Option<Instant>,
}

impl Grape {
    fn lock(&self) -> std::sync::MutexGuard<'_, GrapeHealth> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_resting(&self) -> bool {
        self.lock()
            .rests_until
            .is_some_and(|until| Instant::now() < until)
    }

    /// Tries a request gets: one while the Grape rests.
    fn attempts(&self) -> u32 {
        if self.is_resting() {
            1
        } else {
            GRAPE_ATTEMPTS
        }
    }

    /// Records how a request ended: a Grape that answered anything is awake;
    /// one that failed every try rests, longer each time in a row.
    fn record<T>(&self, result: &Result<T, GrapeError>) {
        let mut health = self.lock();
        match result {
            Err(e) if e.is_retried() => {
                health.failures = health.failures.saturating_add(1);
                let rest = GRAPE_REST_MIN
                    .saturating_mul(1 << (health.failures - 1).min(16))
                    .min(GRAPE_REST_MAX);
                health.rests_until = Some(Instant::now() + rest);
            }
            _ => *health = GrapeHealth::default(),
        }
    }
}

/// A link to Grapes; see the module doc.
pub struct GrapeDiscovery {
    grapes: Vec<Grape>,
    http: reqwest::Client,
    cache: LookupCache,
    /// The last lookup that Grapes answered with entries but no usable
    /// peer: its service and what was answered, for
    /// [`Discovery::nobody_announces`]. One only, so it stays bounded.
    unusable: Mutex<Option<(String, String)>>,
}

impl GrapeDiscovery {
    /// A link to `grapes` (at least one). Nothing is sent until the first
    /// announce or lookup.
    pub fn new(grapes: Vec<GrapeUrl>) -> Result<Self, DiscoveryError> {
        if grapes.is_empty() {
            return Err(DiscoveryError::Start(
                "a Grape link needs at least one Grape URL (--grape http://HOST:PORT)".into(),
            ));
        }
        let http = reqwest::Client::builder()
            // Grapes are found by address, never through a proxy that the
            // environment may name for other traffic.
            .no_proxy()
            // A Grape never redirects; following one would send our
            // announces wherever an impostor points.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(GRAPE_REQUEST_TIMEOUT)
            .pool_idle_timeout(IDLE_CONNECTION_TIMEOUT)
            .user_agent(concat!("grenache-host/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| DiscoveryError::Start(format!("cannot set up the HTTP client: {e}")))?;
        let mut unique: Vec<GrapeUrl> = Vec::new();
        for url in grapes {
            if !unique.contains(&url) {
                unique.push(url);
            }
        }
        Ok(GrapeDiscovery {
            grapes: unique
                .into_iter()
                .map(|url| Grape {
                    url,
                    health: Mutex::default(),
                })
                .collect(),
            http,
            cache: LookupCache::default(),
            unusable: Mutex::default(),
        })
    }

    /// The Grapes, as a list for messages.
    fn names(&self) -> String {
        let urls: Vec<String> = self.grapes.iter().map(|g| g.url.to_string()).collect();
        urls.join(", ")
    }

    /// `POST {grape}/{path}` with `{"rid":…,"data":data}`, tried up to
    /// `grape.attempts()` times before `deadline`; the answer as JSON.
    async fn post(
        &self,
        grape: &Grape,
        path: &str,
        data: serde_json::Value,
        deadline: Instant,
    ) -> Result<serde_json::Value, GrapeError> {
        let body = serde_json::json!({ "rid": uuid::Uuid::new_v4().to_string(), "data": data })
            .to_string();
        let started = Instant::now();
        let mut pause = GRAPE_RETRY_PAUSE;
        let attempts = grape.attempts();
        let mut attempt = 1;
        let result = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let limit = GRAPE_REQUEST_TIMEOUT.min(left);
            let result =
                match tokio::time::timeout(limit, self.post_once(&grape.url, path, &body)).await {
                    Ok(result) => result,
                    Err(_) => Err(GrapeError::Timeout {
                        url: grape.url.clone(),
                        // Whole milliseconds: the total waited so far, not
                        // what this try had left.
                        after: Duration::from_millis(started.elapsed().as_millis() as u64),
                        tries: attempt,
                    }),
                };
            match result {
                Err(e) if e.is_retried() && attempt < attempts => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left <= pause {
                        break Err(e);
                    }
                    tracing::debug!("{e}; trying again in {pause:?}");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    attempt += 1;
                }
                result => break result,
            }
        };
        grape.record(&result);
        result
    }

    /// One HTTP exchange; the answer read up to [`MAX_GRAPE_ANSWER`] bytes.
    async fn post_once(
        &self,
        url: &GrapeUrl,
        path: &str,
        body: &str,
    ) -> Result<serde_json::Value, GrapeError> {
        // Only a failed connect means nothing is there; an error after it
        // (a reset, a head too large) comes from whoever answered.
        let failed = |e: reqwest::Error| {
            if e.is_connect() {
                GrapeError::Unreachable {
                    url: url.clone(),
                    cause: transport_cause(&e),
                }
            } else {
                GrapeError::Broken {
                    url: url.clone(),
                    cause: transport_cause(&e),
                }
            }
        };
        let mut response = self
            .http
            .post(url.endpoint(path))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(failed)?;
        let status = response.status();
        let too_large = || GrapeError::NotAGrape {
            url: url.clone(),
            reason: if status.is_success() {
                format!("an answer over {MAX_GRAPE_ANSWER} bytes")
            } else {
                format!(
                    "an HTTP {} answer over {MAX_GRAPE_ANSWER} bytes",
                    status.as_u16()
                )
            },
        };
        if response
            .content_length()
            .is_some_and(|n| n > MAX_GRAPE_ANSWER as u64)
        {
            return Err(too_large());
        }
        if status.is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned())
                .unwrap_or_default();
            return Err(GrapeError::Status {
                url: url.clone(),
                status: status.as_u16(),
                body: format!(
                    "a redirect to \"{}\", not followed (a Grape never redirects)",
                    quoted(&location)
                ),
            });
        }
        let mut answer = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(failed)? {
            if answer.len() + chunk.len() > MAX_GRAPE_ANSWER {
                return Err(too_large());
            }
            answer.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            // A Grape's non-2xx answers are plain text, e.g. 500
            // ERR_GRAPE_PAYLOAD_INVALID or 413 ERR_GRAPE_PAYLOAD_SIZE.
            return Err(GrapeError::Status {
                url: url.clone(),
                status: status.as_u16(),
                body: quoted(&String::from_utf8_lossy(&answer)),
            });
        }
        serde_json::from_slice(&answer).map_err(|e| GrapeError::NotAGrape {
            url: url.clone(),
            reason: if answer.is_empty() {
                "an empty answer".into()
            } else {
                format!("not JSON: {e}")
            },
        })
    }

    /// Refuses names a Grape cannot take, before anything is sent.
    fn check_name(service: &str) -> Result<(), String> {
        if service.is_empty() {
            return Err("an empty service name cannot be announced or looked up".into());
        }
        if service.len() > MAX_SERVICE_NAME {
            return Err(format!(
                "the service name is {} bytes long; Grapes take at most {MAX_SERVICE_NAME}",
                service.len()
            ));
        }
        Ok(())
    }

    async fn announce_service(&self, service: &str, port: u16) -> Result<(), DiscoveryError> {
        let failed = |reason: String| DiscoveryError::Announce {
            service: service.to_string(),
            reason,
        };
        Self::check_name(service).map_err(failed)?;
        if port == 0 {
            // A Grape would announce its own DHT port instead.
            return Err(failed("port 0 cannot be announced".into()));
        }
        let deadline = Instant::now() + ANNOUNCE_DEADLINE;
        let results = futures::future::join_all(self.grapes.iter().map(|grape| async move {
            let answer = self
                .post(
                    grape,
                    "announce",
                    serde_json::json!([service, port]),
                    deadline,
                )
                .await;
            answer.and_then(|a| announce_answer(&grape.url, a))
        }))
        .await;
        let errors: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err().map(ToString::to_string))
            .collect();
        if errors.len() == results.len() {
            return Err(failed(errors.join("; and ")));
        }
        if !errors.is_empty() {
            tracing::warn!(
                "announced {service} through {} of {} Grapes; {}",
                results.len() - errors.len(),
                results.len(),
                errors.join("; and ")
            );
        }
        Ok(())
    }

    async fn lookup_peers(
        &self,
        service: &str,
        timeout: Duration,
    ) -> Result<Vec<SocketAddr>, DiscoveryError> {
        let failed = |reason: String| DiscoveryError::Lookup {
            service: service.to_string(),
            reason,
        };
        Self::check_name(service).map_err(failed)?;
        if let Some(peers) = self.cache.get(service) {
            return Ok(peers);
        }
        let deadline = Instant::now() + timeout;
        // Resting Grapes are asked only when all rest.
        let awake: Vec<&Grape> = self.grapes.iter().filter(|g| !g.is_resting()).collect();
        let asked = if awake.is_empty() {
            self.grapes.iter().collect()
        } else {
            awake
        };
        let mut answers: futures::stream::FuturesUnordered<_> = asked
            .into_iter()
            .map(|grape| async move {
                let answer = self
                    .post(grape, "lookup", serde_json::json!(service), deadline)
                    .await;
                (
                    &grape.url,
                    answer.and_then(|a| lookup_answer(&grape.url, a)),
                )
            })
            .collect();
        let mut errors = Vec::new();
        let mut answered = false;
        let mut unusable = Vec::new();
        while let Some((url, answer)) = answers.next().await {
            match answer {
                Ok(answer) if !answer.peers.is_empty() => {
                    self.cache.put(service, &answer.peers);
                    return Ok(answer.peers);
                }
                Ok(answer) => {
                    answered = true;
                    if answer.entries > 0 {
                        unusable.push(format!(
                            "the Grape at {url} answered {} {}, none a usable ip:port",
                            answer.entries,
                            if answer.entries == 1 {
                                "entry"
                            } else {
                                "entries"
                            }
                        ));
                    }
                }
                Err(e) => {
                    tracing::debug!("lookup of {service}: {e}");
                    errors.push(e.to_string());
                }
            }
        }
        if answered {
            *self.unusable.lock().unwrap_or_else(|p| p.into_inner()) =
                (!unusable.is_empty()).then(|| (service.to_string(), unusable.join("; and ")));
            Ok(Vec::new())
        } else {
            Err(failed(errors.join("; and ")))
        }
    }
}

impl Discovery for GrapeDiscovery {
    fn announce<'a>(
        &'a self,
        service: &'a str,
        port: u16,
    ) -> BoxFuture<'a, Result<(), DiscoveryError>> {
        Box::pin(self.announce_service(service, port))
    }

    fn lookup<'a>(
        &'a self,
        service: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<SocketAddr>, DiscoveryError>> {
        Box::pin(self.lookup_peers(service, timeout))
    }

    fn describe(&self) -> BoxFuture<'_, String> {
        let noun = if self.grapes.len() == 1 {
            "Grape"
        } else {
            "Grapes"
        };
        Box::pin(async move { format!("{noun} {}", self.names()) })
    }

    fn forget(&self, service: &str) {
        self.cache.forget(service);
    }

    fn nobody_announces(&self, service: &str) -> String {
        if let Some((_, answered)) = self
            .unusable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|(asked, _)| asked == service)
        {
            return format!("no usable host announces {service:?}: {answered}");
        }
        let through = if self.grapes.len() == 1 {
            "the Grape at"
        } else {
            "the Grapes at"
        };
        format!(
            "no host announces {service:?} through {through} {} (is one running, announcing to a Grape of the same network?)",
            self.names()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn url(text: &str) -> GrapeUrl {
        text.parse().unwrap()
    }

    #[test]
    fn grape_urls_are_plain_http_with_a_host() {
        let grape = url("http://127.0.0.1:30001/");
        assert_eq!(grape.to_string(), "http://127.0.0.1:30001");
        assert_eq!(grape.endpoint("lookup"), "http://127.0.0.1:30001/lookup");
        assert_eq!(grape.port(), 30001);
        assert_eq!(url("http://grape.lan").port(), 80);
        assert_eq!(
            url("http://proxy:8080/grape").endpoint("announce"),
            "http://proxy:8080/grape/announce"
        );
        for (bad, says) in [
            ("https://127.0.0.1:30001", "plain HTTP"),
            ("127.0.0.1:30001", "is not a URL"),
            ("localhost:30001", "not an http:// URL"),
            ("http://127.0.0.1:30001/?x=1", "no user, query or fragment"),
        ] {
            let e = bad.parse::<GrapeUrl>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(e.contains("e.g. http://127.0.0.1:30001"), "{bad}: {e}");
        }
    }

    #[test]
    fn lookup_answers_are_peers_or_the_grapes_error() {
        let grape = url("http://127.0.0.1:30001");
        let answer = serde_json::json!([
            "127.0.0.1:5555",
            "10.0.0.1:0",
            "nonsense",
            3,
            "0.0.0.0:9",
            "255.255.255.255:9",
            "224.0.0.1:9",
            "10.0.0.2:7"
        ]);
        assert_eq!(
            lookup_answer(&grape, answer).unwrap().peers,
            [
                "127.0.0.1:5555".parse::<SocketAddr>().unwrap(),
                "10.0.0.2:7".parse().unwrap()
            ]
        );
        let many: Vec<String> = (1..=150).map(|p| format!("127.0.0.1:{p}")).collect();
        assert_eq!(
            lookup_answer(&grape, serde_json::json!(many))
                .unwrap()
                .peers
                .len(),
            MAX_LOOKUP_PEERS
        );
        let mut junk_first = vec!["0.0.0.0:1".to_string(); MAX_LOOKUP_PEERS];
        junk_first.push("127.0.0.1:5".into());
        assert_eq!(
            lookup_answer(&grape, serde_json::json!(junk_first)).unwrap(),
            LookupAnswer {
                entries: MAX_LOOKUP_PEERS + 1,
                peers: vec!["127.0.0.1:5".parse().unwrap()]
            }
        );
        let e = lookup_answer(&grape, serde_json::json!("ERR_GRAPE_LOOKUP")).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"the Grape at http://127.0.0.1:30001 answered "ERR_GRAPE_LOOKUP""#
        );
        assert!(!e.is_retried());
        let e = lookup_answer(&grape, serde_json::json!({"v": 1})).unwrap_err();
        assert!(matches!(e, GrapeError::NotAGrape { .. }), "{e}");
    }

    #[test]
    fn quoted_text_has_its_control_characters_escaped() {
        assert_eq!(quoted(" ok \n"), "ok");
        assert_eq!(
            quoted("\u{1b}[31mred\nforged line\r\u{7}"),
            "\\u{1b}[31mred\\nforged line\\r\\u{7}"
        );
        let long = "é".repeat(QUOTED_BODY_CHARS + 1);
        assert_eq!(quoted(&long), format!("{}…", "é".repeat(QUOTED_BODY_CHARS)));
    }

    #[test]
    fn announce_errors_say_what_to_check() {
        let grape = url("http://127.0.0.1:30001");
        assert_eq!(announce_answer(&grape, serde_json::json!(1)).unwrap(), 1);
        assert_eq!(announce_answer(&grape, serde_json::json!(3)).unwrap(), 3);
        for (bad, quoted) in [
            (serde_json::json!(0), "answered 0"),
            (serde_json::json!(-5), "answered -5"),
            (serde_json::json!(1.5), "answered 1.5"),
            (serde_json::json!({"ok": true}), r#"answered {"ok":true}"#),
        ] {
            let e = announce_answer(&grape, bad.clone()).unwrap_err();
            assert!(matches!(e, GrapeError::NotAGrape { .. }), "{bad}: {e}");
            assert!(e.to_string().contains(quoted), "{bad}: {e}");
        }
        let e = announce_answer(&grape, serde_json::json!("1")).unwrap_err();
        assert!(e.to_string().contains(r#"answered "1""#), "{e}");
        let e = announce_answer(&grape, serde_json::json!("No nodes to query")).unwrap_err();
        assert!(
            e.to_string()
                .contains("is its --bn the --dp of a running grape?"),
            "{e}"
        );
    }

    /// A fake Grape on a free loopback port: every connection gets the next
    /// of `answers` (raw HTTP responses, or `None` to hang); returns its URL
    /// and the request bodies it received.
    async fn fake_grape(
        answers: Vec<Option<String>>,
    ) -> (GrapeUrl, std::sync::Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let requests = seen.clone();
        tokio::spawn(async move {
            for answer in answers {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut request = vec![0; 4096];
                let n = stream.read(&mut request).await.unwrap();
                let text = String::from_utf8_lossy(&request[..n]).into_owned();
                let body = text
                    .split("\r\n\r\n")
                    .nth(1)
                    .unwrap_or_default()
                    .to_string();
                requests.lock().unwrap().push(body);
                match answer {
                    Some(response) => {
                        let _ = stream.write_all(response.as_bytes()).await;
                    }
                    None => {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                }
            }
        });
        (url(&format!("http://127.0.0.1:{port}")), seen)
    }

    fn http(status: &str, body: &str) -> Option<String> {
        Some(format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ))
    }

    #[tokio::test]
    async fn a_lookup_sends_the_links_body_and_retries_a_500() {
        let (grape, seen) = fake_grape(vec![
            http("500 Internal Server Error", "ERR_GRAPE_PAYLOAD_INVALID"),
            http("200 OK", r#"["127.0.0.1:5555"]"#),
        ])
        .await;
        let link = GrapeDiscovery::new(vec![grape]).unwrap();
        let peers = link
            .lookup("fibonacci_worker", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(peers, ["127.0.0.1:5555".parse::<SocketAddr>().unwrap()]);
        let bodies = seen.lock().unwrap().clone();
        assert_eq!(bodies.len(), 2);
        let body: serde_json::Value = serde_json::from_str(&bodies[0]).unwrap();
        assert_eq!(body["data"], "fibonacci_worker");
        let rid = uuid::Uuid::parse_str(body["rid"].as_str().unwrap()).unwrap();
        assert_eq!(rid.get_version_num(), 4);
        // Cached: no third request.
        link.lookup("fibonacci_worker", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn an_announce_sends_name_and_port_and_a_grape_error_is_final() {
        let (grape, seen) = fake_grape(vec![http("200 OK", r#""No nodes to query""#)]).await;
        let link = GrapeDiscovery::new(vec![grape.clone()]).unwrap();
        let e = link.announce("rpc_test", 49912).await.unwrap_err();
        assert!(
            e.to_string().starts_with(&format!(
                r#"cannot announce rpc_test: the Grape at {grape} answered "No nodes to query""#
            )),
            "{e}"
        );
        let bodies = seen.lock().unwrap().clone();
        assert_eq!(bodies.len(), 1, "a Grape's answer is not retried");
        let body: serde_json::Value = serde_json::from_str(&bodies[0]).unwrap();
        assert_eq!(body["data"], serde_json::json!(["rpc_test", 49912]));
    }

    #[tokio::test]
    async fn a_grapes_error_body_reaches_the_log_escaped() {
        let evil = http("500 Internal Server Error", "\u{1b}[31mboom\nWARN forged");
        let (grape, _) = fake_grape(vec![evil.clone(), evil.clone(), evil]).await;
        let link = GrapeDiscovery::new(vec![grape]).unwrap();
        let e = link.announce("svc", 5555).await.unwrap_err().to_string();
        assert!(!e.chars().any(char::is_control), "{e:?}");
        assert!(e.contains(r"\u{1b}[31mboom\nWARN forged"), "{e}");
        let (grape, _) = fake_grape(vec![http("200 OK", r#""bad\u001b[2J""#)]).await;
        let link = GrapeDiscovery::new(vec![grape]).unwrap();
        let e = link.announce("svc", 5555).await.unwrap_err().to_string();
        assert!(e.contains(r#"answered "bad\u{1b}[2J""#), "{e}");
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed() {
        let redirect = Some(
            "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:9/announce\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                .to_string(),
        );
        let (grape, seen) = fake_grape(vec![redirect.clone(), redirect.clone(), redirect]).await;
        let link = GrapeDiscovery::new(vec![grape]).unwrap();
        let e = link.announce("svc", 5555).await.unwrap_err();
        assert!(
            e.to_string().contains(
                r#"answered HTTP 302: a redirect to "http://127.0.0.1:9/announce", not followed"#
            ),
            "{e}"
        );
        assert_eq!(seen.lock().unwrap().len(), GRAPE_ATTEMPTS as usize);
    }

    #[tokio::test]
    async fn an_oversized_answer_is_refused() {
        let huge = format!("[{}]", vec!["\"127.0.0.1:1\""; 10_000].join(","));
        let (grape, _) = fake_grape(vec![http("200 OK", &huge)]).await;
        let link = GrapeDiscovery::new(vec![grape]).unwrap();
        let e = link
            .lookup("svc", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("an answer over 65536 bytes"), "{e}");
    }

    #[tokio::test]
    async fn an_oversized_error_answer_keeps_its_status() {
        let huge = "x".repeat(MAX_GRAPE_ANSWER + 1);
        let (grape, _) = fake_grape(vec![http("500 Internal Server Error", &huge)]).await;
        let link = GrapeDiscovery::new(vec![grape]).unwrap();
        let e = link
            .lookup("svc", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("an HTTP 500 answer over 65536 bytes"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_head_too_large_is_not_called_unreachable() {
        let head = Some(format!(
            "HTTP/1.1 200 OK\r\nX-Junk: {}\r\nContent-Length: 2\r\n\r\n[]",
            "a".repeat(2 << 20)
        ));
        let (grape, _) = fake_grape(vec![head.clone(), head.clone(), head]).await;
        let link = GrapeDiscovery::new(vec![grape.clone()]).unwrap();
        let e = link
            .lookup("svc", Duration::from_secs(5))
            .await
            .unwrap_err()
            .to_string();
        assert!(!e.contains("cannot reach"), "{e}");
        assert!(!e.contains("is a grape running"), "{e}");
        assert!(
            e.starts_with(&format!("the Grape at {grape} was reached, but")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn entries_that_are_none_of_them_usable_are_said_so() {
        let (grape, _) = fake_grape(vec![http(
            "200 OK",
            r#"["0.0.0.0:5555", "127.0.0.1:0", "[::1]:1", "127.0.0.1:99999"]"#,
        )])
        .await;
        let link = GrapeDiscovery::new(vec![grape.clone()]).unwrap();
        let peers = link.lookup("svc", Duration::from_secs(5)).await.unwrap();
        assert!(peers.is_empty());
        assert_eq!(
            link.nobody_announces("svc"),
            format!(
                r#"no usable host announces "svc": the Grape at {grape} answered 4 entries, none a usable ip:port"#
            )
        );
        assert!(link
            .nobody_announces("other")
            .starts_with("no host announces"));
    }

    #[tokio::test]
    async fn a_timeout_says_the_whole_wait() {
        let (grape, _) = fake_grape(vec![None, None, None]).await;
        let link = GrapeDiscovery::new(vec![grape]).unwrap();
        // Two tries fit: 2.5 s, a 250 ms pause, then what is left.
        let wait = GRAPE_REQUEST_TIMEOUT + Duration::from_millis(500);
        let e = link
            .post(
                &link.grapes[0],
                "lookup",
                serde_json::json!("svc"),
                Instant::now() + wait,
            )
            .await
            .unwrap_err();
        match &e {
            GrapeError::Timeout { after, tries, .. } => {
                assert_eq!(*tries, 2, "{e}");
                assert!(*after >= wait - Duration::from_millis(50), "{e}");
            }
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("(2 tries)"), "{e}");
    }

    #[tokio::test]
    async fn a_silent_grape_times_out_within_the_callers_deadline() {
        let (grape, _) = fake_grape(vec![None, None, None]).await;
        let link = GrapeDiscovery::new(vec![grape]).unwrap();
        let started = Instant::now();
        let e = link
            .lookup("svc", Duration::from_millis(600))
            .await
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(e.to_string().contains("did not answer within"), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_grape_is_named_and_rests() {
        // A port nobody listens on: bind, note it, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let grape = url(&format!("http://127.0.0.1:{port}"));
        let link = GrapeDiscovery::new(vec![grape.clone()]).unwrap();
        let e = link
            .lookup("svc", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("cannot reach the Grape at {grape} (connection refused); is a grape running with --aph {port}?")
        );
        assert!(link.grapes[0].is_resting());
        assert_eq!(link.grapes[0].attempts(), 1);
    }

    #[tokio::test]
    async fn the_first_grape_with_peers_answers_a_lookup() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (empty, _) = fake_grape(vec![http("200 OK", "[]")]).await;
        let (full, _) = fake_grape(vec![http("200 OK", r#"["127.0.0.1:7"]"#)]).await;
        let link = GrapeDiscovery::new(vec![url(&format!("http://127.0.0.1:{dead}")), empty, full])
            .unwrap();
        let peers = link.lookup("svc", Duration::from_secs(5)).await.unwrap();
        assert_eq!(peers, ["127.0.0.1:7".parse::<SocketAddr>().unwrap()]);
    }
}
