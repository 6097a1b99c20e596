//! A Grape-compatible node (`grenache-host grape`): the HTTP API that
//! Grenache's Node services use through grenache-nodejs-link (`/announce`,
//! `/lookup`, `/put`, `/get`, as grenache-grape 1.0.0 serves it), backed by
//! our embedded DHT, where a service's key is the SHA-1 of its name. Node
//! services announced through it and our hosts (`run --bootstrap <its DHT
//! port>`) find each other in one namespace.
//!
//! - [`api`]: the API without I/O: request target and body in, status and
//!   body out, with the DHT work behind the [`api::GrapeBackend`] trait.
//! - [`table`]: the grape's own table of announces, which expire after the
//!   peer max age (the DHT's never do), as a state machine.
//! - [`values`]: values put through this grape, for `/get`.
//! - [`bep44`]: keys, targets and signatures of BEP 44 values.
//! - [`node`]: the backend on two mainline nodes (the DHT port's server
//!   node and a client node for the grape's own queries).
//! - [`http`]: the hyper server around [`api::answer`].
//!
//! What a Node grape does and this one does not:
//! - Join a Node grapes' DHT: their keys are the raw names, their KRPC
//!   transaction ids 2 bytes, which mainline 8.0.1 cannot decode (it reads
//!   `t` as exactly 4 bytes, `common/messages/internal.rs`, and offers no
//!   hook before decoding: the socket is private to its actor thread, and
//!   `RequestFilter` sees decoded requests only). A UDP relay in front of it
//!   would rewrite `t` but hide every sender's address, which mainline needs
//!   for tokens and announced peers. So only the HTTP API is compatible.
//! - Get mutable values from the DHT: mainline fetches them by public key
//!   and salt, a `/get` has only the target. Those put through this grape
//!   are answered from its own store.

pub mod api;
pub mod bep44;
pub mod http;
pub mod node;
pub mod table;
pub mod values;
