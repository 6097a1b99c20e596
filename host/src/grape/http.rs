//! The Grape HTTP API's server: plain HTTP/1.1 on hyper, a thin shell around
//! [`api::answer`](super::api::answer). It reads the request target and the
//! body (refusing one over the limit with `413 ERR_GRAPE_PAYLOAD_SIZE`, as
//! Grape's raw-body limit does), and writes the status and body with no
//! `Content-Type`.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections at once (more wait in the
//! listen backlog); headers within [`HEADER_TIMEOUT`]; a body within
//! [`BODY_TIMEOUT`] or the connection is closed; an oversized body is read
//! and dropped up to [`MAX_DRAINED`] bytes so that the client reads its 413
//! instead of a reset.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::api::{self, GrapeBackend, HttpReply};

/// Most HTTP connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Time a client has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send a request's body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of an oversized body read (and dropped) before answering 413.
pub const MAX_DRAINED: usize = 1 << 20;

/// Serves the Grape API on `listener` until the task is dropped. Bodies over
/// `max_body` bytes are refused with 413.
pub async fn serve(listener: TcpListener, backend: Arc<dyn GrapeBackend>, max_body: usize) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, for one: wait instead of spinning.
                tracing::warn!("grape HTTP: cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let backend = backend.clone();
        let service = hyper::service::service_fn(move |request| {
            let backend = backend.clone();
            async move { Ok::<_, Infallible>(respond(&*backend, request, peer, max_body).await) }
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, "grape HTTP connection ended: {e}");
            }
            drop(slot);
        });
    }
}

/// Reads one request and answers it.
async fn respond(
    backend: &dyn GrapeBackend,
    request: Request<Incoming>,
    peer: SocketAddr,
    max_body: usize,
) -> Response<Full<Bytes>> {
    // Grape routes on Node's `req.url`: the request target as sent.
    let target = request.uri().to_string();
    let declared = request
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body = request.into_body();
    let reply = if declared.is_some_and(|len| len > max_body as u64) {
        drain(body).await;
        HttpReply::payload_too_large()
    } else {
        match tokio::time::timeout(BODY_TIMEOUT, read_body(body, max_body)).await {
            Ok(BodyRead::Whole(bytes)) => api::answer(backend, &target, &bytes, caller(peer)).await,
            Ok(BodyRead::TooLarge) => HttpReply::payload_too_large(),
            // The client went away or stalled: nobody to answer.
            Ok(BodyRead::Broken(e)) => HttpReply::plain(500, &e),
            Err(_) => HttpReply::plain(500, "request body timed out"),
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
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
