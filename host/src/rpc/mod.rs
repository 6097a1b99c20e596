//! Grenache RPC over uTP: the envelope ([`codec`]), the reader that turns a
//! connection's byte stream into messages ([`connection`]), the table of
//! requests waiting for replies ([`pending`]), the client that reuses one uTP
//! connection per peer ([`client`]) and the server that routes requests to
//! plugins ([`server`]).

pub mod client;
pub mod codec;
pub mod connection;
mod error;
pub mod health;
pub mod pending;
pub mod server;
pub mod session;

pub use error::RpcError;

/// Default deadline of one request: 10 s.
pub const DEFAULT_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
