//! What the host's two plain HTTP/1.1 servers share, the grape's API
//! ([`crate::grape::http`]) and the metrics endpoint
//! ([`crate::node::metrics`]): a hyper connection builder that bounds the
//! time a client has to send a request's headers, and an accept that
//! survives running out of file descriptors.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use tokio::net::{TcpListener, TcpStream};

/// How long accepting waits after an error before it tries again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// An HTTP/1.1 connection builder whose clients must send each request's
/// headers within `header_timeout`, or the connection is closed.
pub fn builder(header_timeout: Duration) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder
}

/// The next connection on `listener`. An error (out of file descriptors,
/// for one) is logged under `server`'s name and retried after
/// 100 ms instead of spinning.
pub async fn accept(listener: &TcpListener, server: &str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                tracing::warn!("{server}: cannot accept a connection: {e}");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}
