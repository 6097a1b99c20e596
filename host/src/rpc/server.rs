//! The RPC server: accepts uTP connections on the host's socket, decodes
//! requests through a [`MessageReader`], hands each to the host's
//! [`Services`] (the node routes them to plugins) and writes the reply on the
//! same connection, however long the answer takes (no keep-alive bytes,
//! docs/wire.md#heartbeat).
//!
//! A connection that sends something that is not a Grenache request is
//! closed and counted; everyone else keeps being served. The server owns the
//! tasks of its connections and their requests: stopping it stops them all.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::io::AsyncWriteExt;

use super::codec::{self, DecodeError, Request};
use super::connection::{MessageReader, ReadError};
use crate::transport::Endpoint;

/// What answers the requests a server receives.
pub trait Services: Send + Sync + 'static {
    /// Answers one request from `peer` for `key` (a service name, or the
    /// `ip:port` a Node punch client calls): the result as JSON text, or
    /// the Grenache error string the caller receives.
    fn answer<'a>(
        &'a self,
        key: &'a str,
        payload: &'a str,
        peer: SocketAddr,
    ) -> BoxFuture<'a, Result<String, String>>;
}

/// Server counters.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Requests decoded and handed to the services.
    pub requests: AtomicU64,
    /// Requests the services answered with an error string.
    pub errors: AtomicU64,
    /// Connections closed because they did not speak Grenache or sent a
    /// message over the size limit.
    pub bad_connections: AtomicU64,
}

/// Accepts connections until dropped; dropping the future stops every
/// connection it accepted.
pub async fn serve(
    endpoint: Endpoint,
    services: Arc<dyn Services>,
    max_message: usize,
    stats: Arc<ServerStats>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        // Reap finished connections so the set stays as small as the live ones.
        while connections.try_join_next().is_some() {}
        match endpoint.accept().await {
            Ok(stream) => {
                let services = services.clone();
                let stats = stats.clone();
                connections.spawn(async move {
                    serve_connection(stream, services, max_message, stats).await
                });
            }
            Err(e) => {
                tracing::warn!("accepting a uTP connection failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(
    stream: crate::utp::UtpStream,
    services: Arc<dyn Services>,
    max_message: usize,
    stats: Arc<ServerStats>,
) {
    let peer = stream.remote_addr();
    let (reader, writer) = stream.split();
    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    let mut reader = MessageReader::new(reader, max_message);
    // Requests in flight on this connection; they finish even after the
    // peer stops sending.
    let mut requests = tokio::task::JoinSet::new();
    let problem = loop {
        while requests.try_join_next().is_some() {}
        let request = match reader.next().await {
            Ok(Some(value)) => match codec::parse_request(&value) {
                Ok(request) => request,
                Err(e) => break e,
            },
            Ok(None) | Err(ReadError::Io(_)) => {
                requests.join_all().await;
                return;
            }
            Err(ReadError::Decode(e)) => break e,
        };
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let (services, writer, stats) = (services.clone(), writer.clone(), stats.clone());
        requests.spawn(async move {
            // However long the answer takes, the connection waits: our uTP
            // gives up on a silent peer only while our own data is
            // unacknowledged (docs/wire.md §4.1).
            let reply = answer(&*services, &request, peer, &stats).await;
            // One whole message per write (docs/wire.md §3).
            if let Err(e) = writer.lock().await.write_all(&reply).await {
                tracing::debug!(%peer, "reply to {} not sent: {e}", request.rid);
            }
        });
    };
    stats.bad_connections.fetch_add(1, Ordering::Relaxed);
    if let DecodeError::TooLarge {
        limit,
        rid: Some(rid),
    } = &problem
    {
        let reply = codec::encode_err(
            rid.as_str(),
            &format!("request too large: more than {limit} bytes"),
        );
        let _ = writer.lock().await.write_all(&reply).await;
    }
    tracing::warn!(%peer, "closing a connection that {problem}", problem = describe(&problem));
    requests.join_all().await;
}

fn describe(e: &DecodeError) -> String {
    match e {
        DecodeError::TooLarge { limit, .. } => {
            format!("sent a message over the {limit}-byte limit")
        }
        other => format!("does not speak Grenache ({other})"),
    }
}

/// The reply to one request, encoded.
async fn answer(
    services: &dyn Services,
    request: &Request,
    peer: SocketAddr,
    stats: &ServerStats,
) -> Vec<u8> {
    match services.answer(&request.key, &request.payload, peer).await {
        Ok(result) => codec::encode_ok(&request.rid, &result),
        Err(message) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            codec::encode_err(&request.rid, &message)
        }
    }
}
