//! The Grape HTTP API's server: plain HTTP/1.1 on hyper, a thin shell around
//! [`super::api::answer`]. It reads the request target and the
//! body (refusing one over the limit with `413 ERR_GRAPE_PAYLOAD_SIZE`, as
//! Grape's raw-body limit does), and writes the status and body with no
//! `Content-Type`.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections at once, and
//! [`MAX_CONNECTIONS_PER_IP`] from one address (more are closed at once);
//! when all are taken, a new connection closes the one that has waited
//! longest for a request (idle or trickling it in), since a slow client must
//! not lock out the rest; only when every connection is being answered is
//! the new one closed. Headers within [`HEADER_TIMEOUT`]; a body within
//! [`BODY_TIMEOUT`] or the connection is closed; an oversized body is read
//! and dropped up to [`MAX_DRAINED`] bytes so that the client reads its 413
//! instead of a reset.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::api::{self, GrapeBackend, HttpReply};

/// Most HTTP connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Most HTTP connections from one IP address at once (a Link keeps one or
/// two; a host's services a few each).
pub const MAX_CONNECTIONS_PER_IP: usize = 32;
/// Time a client has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// Time a client has to send a request's body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(3);
/// Most bytes of an oversized body read (and dropped) before answering 413.
pub const MAX_DRAINED: usize = 1 << 20;

/// Serves the Grape API on `listener` until the task is dropped. Bodies over
/// `max_body` bytes are refused with 413.
pub async fn serve(listener: TcpListener, backend: Arc<dyn GrapeBackend>, max_body: usize) {
    let connections = Arc::new(Mutex::new(ConnectionTable::default()));
    let builder = crate::http::builder(HEADER_TIMEOUT);
    loop {
        let (stream, peer) = crate::http::accept(&listener, "grape HTTP").await;
        // The table holds the sender; dropping it ends `closed`.
        let (close, closed) = oneshot::channel();
        let admitted = lock(&connections).admit(Instant::now(), peer.ip(), close);
        let id = match admitted {
            Ok(id) => id,
            Err(refusal) => {
                tracing::debug!(%peer, "grape HTTP: connection closed: {refusal}");
                continue;
            }
        };
        let service_connections = connections.clone();
        let backend = backend.clone();
        let service = hyper::service::service_fn(move |request| {
            let backend = backend.clone();
            let connections = service_connections.clone();
            async move {
                Ok::<_, Infallible>(
                    respond(&*backend, request, peer, max_body, &connections, id).await,
                )
            }
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connections = connections.clone();
        tokio::spawn(async move {
            tokio::select! {
                outcome = connection => {
                    if let Err(e) = outcome {
                        tracing::debug!(%peer, "grape HTTP connection ended: {e}");
                    }
                }
                // Dropped from the table for a newer connection.
                _ = closed => tracing::debug!(%peer, "grape HTTP: slowest connection closed for a new one"),
            }
            lock(&connections).remove(id);
        });
    }
}

fn lock(connections: &Mutex<ConnectionTable>) -> std::sync::MutexGuard<'_, ConnectionTable> {
    connections.lock().unwrap_or_else(|p| p.into_inner())
}

/// The open connections, without I/O: who may connect, and whom a new
/// connection pushes out when all slots are taken.
#[derive(Default)]
struct ConnectionTable {
    next_id: u64,
    open: HashMap<u64, OpenConnection>,
    per_ip: HashMap<IpAddr, usize>,
}

struct OpenConnection {
    ip: IpAddr,
    /// Since when it has been waiting for (or reading) a request; `None`
    /// while one is being answered.
    waiting_since: Option<Instant>,
    /// Dropping it closes the connection.
    _close: oneshot::Sender<()>,
}

impl ConnectionTable {
    /// Admits a connection from `ip`, closing the longest-waiting one if
    /// the table is full; `close` is dropped when this one is pushed out.
    /// Err: why it is refused.
    fn admit(
        &mut self,
        now: Instant,
        ip: IpAddr,
        close: oneshot::Sender<()>,
    ) -> Result<u64, &'static str> {
        if self.per_ip.get(&ip).copied().unwrap_or(0) >= MAX_CONNECTIONS_PER_IP {
            return Err("too many connections from this address");
        }
        if self.open.len() >= MAX_CONNECTIONS {
            let slowest = self
                .open
                .iter()
                .filter_map(|(id, c)| c.waiting_since.map(|since| (since, *id)))
                .min();
            let Some((_, victim)) = slowest else {
                return Err("every connection is being answered");
            };
            self.remove(victim);
        }
        self.next_id += 1;
        let id = self.next_id;
        *self.per_ip.entry(ip).or_default() += 1;
        self.open.insert(
            id,
            OpenConnection {
                ip,
                waiting_since: Some(now),
                _close: close,
            },
        );
        Ok(id)
    }

    /// Marks connection `id` answering a request (`true`) or waiting for
    /// the next one since `now`.
    fn set_answering(&mut self, id: u64, answering: bool, now: Instant) {
        if let Some(connection) = self.open.get_mut(&id) {
            connection.waiting_since = (!answering).then_some(now);
        }
    }

    /// Forgets connection `id` (closing it, if it is still open).
    fn remove(&mut self, id: u64) {
        if let Some(connection) = self.open.remove(&id) {
            if let Some(count) = self.per_ip.get_mut(&connection.ip) {
                *count -= 1;
                if *count == 0 {
                    self.per_ip.remove(&connection.ip);
                }
            }
        }
    }
}

/// Reads one request and answers it.
async fn respond(
    backend: &dyn GrapeBackend,
    request: Request<Incoming>,
    peer: SocketAddr,
    max_body: usize,
    connections: &Mutex<ConnectionTable>,
    id: u64,
) -> Response<Full<Bytes>> {
    // Grape routes on Node's `req.url`: the request target as sent.
    let target = request.uri().to_string();
    let declared = request
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let expects_continue = request
        .headers()
        .get(hyper::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let body = request.into_body();
    let oversized = declared.is_some_and(|len| len > max_body as u64);
    // The client waits for `100 Continue` before sending the body: refuse
    // at once (reading the body would send the 100) and close, as the body
    // is never read.
    let refuse_unread = oversized && expects_continue;
    let reply = if refuse_unread {
        HttpReply::payload_too_large()
    } else if oversized {
        drain(body).await;
        HttpReply::payload_too_large()
    } else {
        match tokio::time::timeout(BODY_TIMEOUT, read_body(body, max_body)).await {
            Ok(BodyRead::Whole(bytes)) => {
                lock(connections).set_answering(id, true, Instant::now());
                let reply = api::answer(backend, &target, &bytes, caller(peer)).await;
                lock(connections).set_answering(id, false, Instant::now());
                reply
            }
            Ok(BodyRead::TooLarge) => HttpReply::payload_too_large(),
            // The client went away or stalled: nobody to answer.
            Ok(BodyRead::Broken(e)) => HttpReply::plain(500, &e),
            Err(_) => HttpReply::plain(500, "request body timed out"),
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if refuse_unread {
        response.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
    }
    response
}

/// The caller's IPv4 address as the announce rule wants it (an IPv4-mapped
/// IPv6 address is IPv4).
fn caller(peer: SocketAddr) -> IpAddr {
    match peer.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        ip => ip,
    }
}

enum BodyRead {
    Whole(Vec<u8>),
    TooLarge,
    Broken(String),
}

/// Reads the body up to `max_body` bytes; past that, drains up to
/// [`MAX_DRAINED`] and reports it too large.
async fn read_body(mut body: Incoming, max_body: usize) -> BodyRead {
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    if bytes.len() + data.len() > max_body {
                        drain(body).await;
                        return BodyRead::TooLarge;
                    }
                    bytes.extend_from_slice(&data);
                }
            }
            Err(e) => return BodyRead::Broken(e.to_string()),
        }
    }
    BodyRead::Whole(bytes)
}

/// Reads and drops up to [`MAX_DRAINED`] bytes of a refused body, within
/// [`BODY_TIMEOUT`].
async fn drain(mut body: Incoming) {
    let _ = tokio::time::timeout(BODY_TIMEOUT, async {
        let mut drained = 0;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                drained += data.len();
                if drained > MAX_DRAINED {
                    return;
                }
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grape::api::{DhtFailure, FoundValue, PutRequest};
    use futures::future::BoxFuture;
    use std::net::{Ipv4Addr, SocketAddrV4};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpSocket, TcpStream};

    fn admit(table: &mut ConnectionTable, now: Instant, ip: [u8; 4]) -> Result<u64, &'static str> {
        let (close, _closed) = oneshot::channel();
        table.admit(now, IpAddr::from(ip), close)
    }

    #[test]
    fn one_address_gets_a_bounded_share() {
        let now = Instant::now();
        let mut table = ConnectionTable::default();
        for _ in 0..MAX_CONNECTIONS_PER_IP {
            admit(&mut table, now, [10, 0, 0, 1]).unwrap();
        }
        assert!(admit(&mut table, now, [10, 0, 0, 1]).is_err());
        assert!(admit(&mut table, now, [10, 0, 0, 2]).is_ok());
        // A closed connection frees its address's share.
        table.remove(1);
        assert!(admit(&mut table, now, [10, 0, 0, 1]).is_ok());
    }

    #[test]
    fn a_full_table_closes_the_longest_waiting_connection() {
        let t0 = Instant::now();
        let mut table = ConnectionTable::default();
        let mut ids = Vec::new();
        for i in 0..MAX_CONNECTIONS {
            let ip = [10, 1, (i / 200) as u8, (i % 200) as u8];
            ids.push(admit(&mut table, t0 + Duration::from_millis(i as u64), ip).unwrap());
        }
        // The oldest is answering a request: the next oldest goes.
        table.set_answering(ids[0], true, t0);
        let later = t0 + Duration::from_secs(1);
        admit(&mut table, later, [10, 2, 0, 1]).unwrap();
        assert_eq!(table.open.len(), MAX_CONNECTIONS);
        assert!(table.open.contains_key(&ids[0]));
        assert!(!table.open.contains_key(&ids[1]));
        // Every one answering: the new one is refused instead.
        for connection in table.open.values_mut() {
            connection.waiting_since = None;
        }
        assert!(admit(&mut table, later, [10, 2, 0, 2]).is_err());
    }

    /// Answers every lookup with one address.
    struct OneAddress;

    impl GrapeBackend for OneAddress {
        fn announce<'a>(
            &'a self,
            _: &'a str,
            _: u16,
            _: IpAddr,
        ) -> BoxFuture<'a, Result<u32, DhtFailure>> {
            Box::pin(async { Ok(1) })
        }
        fn lookup<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Vec<SocketAddrV4>> {
            Box::pin(async { vec![SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5555)] })
        }
        fn put(&self, _: PutRequest) -> BoxFuture<'_, Result<[u8; 20], DhtFailure>> {
            Box::pin(async { Err(DhtFailure::AllFailed) })
        }
        fn get(&self, _: [u8; 20]) -> BoxFuture<'_, Option<FoundValue>> {
            Box::pin(async { None })
        }
    }

    async fn start() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, Arc::new(OneAddress), 1024));
        addr
    }

    async fn lookup(addr: SocketAddr) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let body = r#"{"data":"svc"}"#;
        let request = format!(
            "POST /lookup HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn slow_connections_do_not_lock_out_a_lookup() {
        let addr = start().await;
        // 300 connections trickling their headers, from a few addresses.
        let mut slow = Vec::new();
        for i in 0..300u32 {
            let socket = TcpSocket::new_v4().unwrap();
            let from = Ipv4Addr::new(127, 0, 1, (i % 10) as u8 + 1);
            if socket.bind(SocketAddr::from((from, 0))).is_err() {
                continue;
            }
            let Ok(mut stream) = socket.connect(addr).await else {
                continue;
            };
            let _ = stream.write_all(b"POST /lookup HTTP/1.1\r\nHo").await;
            slow.push(stream);
        }
        assert!(slow.len() >= 200, "only {} slow connections", slow.len());
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(5), lookup(addr))
            .await
            .expect("the lookup was locked out");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with(r#"["127.0.0.1:5555"]"#), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn an_oversized_body_announced_with_expect_100_is_refused_at_once() {
        let addr = start().await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                b"POST /lookup HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\
                  Content-Length: 100000000\r\n\r\n",
            )
            .await
            .unwrap();
        let mut answer = vec![0; 1024];
        let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut answer))
            .await
            .expect("no answer without the body")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }
}
