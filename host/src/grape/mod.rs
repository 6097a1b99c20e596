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
//!   peer max age, as a state machine.
//! - [`node`]: the backend on two DHT nodes: our own server node on the DHT
//!   port ([`crate::discovery::server`], whose BEP 44 store also keeps the
//!   values put here) and a mainline client node for the grape's queries.
//! - [`http`]: the hyper server around [`api::answer`].
//!
//! What a Node grape does and this one does not:
//! - Share a Node grapes' namespace: their keys are the raw names, ours the
//!   SHA-1 of the name (a DHT key is 20 bytes), so a Node grape may
//!   bootstrap from ours (BEP 5 with 2-byte transaction ids works both
//!   ways) but their services and ours do not meet on the DHT; they meet
//!   through the HTTP API.
//! - Get mutable values from the DHT: mainline fetches them by public key
//!   and salt, a `/get` has only the target. Those put through this grape
//!   are answered from its own store.

pub mod api;
pub mod http;
pub mod node;
pub mod table;
