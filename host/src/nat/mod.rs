//! NAT traversal: how a host behind a NAT becomes reachable.
//!
//! Two mechanisms, each a sans-IO state machine (it takes the time and the
//! datagrams as arguments and returns what to send) beside the tokio driver
//! that runs it with the socket and the clock:
//!
//! - **Punching**, as Grenache does it (`docs/wire.md §1`): a host behind a
//!   NAT punches the peers of the services its plugins name, every second;
//!   whoever is punched punches back and tells its plugins.
//! - **Introductions**, our own protocol (`docs/wire.md §5`), for two hosts
//!   that are both behind NATs.
//!
//! # Introductions
//!
//! A public `dht` node also runs an *introducer* on two UDP ports (its DHT
//! port + 1 and + 2). Hosts talk to it from their RPC socket, so what the
//! introducer observes is exactly the mapping their NAT gives that socket:
//!
//! 1. **Probe.** A host sends `probe` to the main port. The introducer answers
//!    with the address it saw, and first sends a `filter-test` from a fresh
//!    port nobody has sent to (not even an earlier process on the host's
//!    port), which a port-restricted (or symmetric) NAT drops. The host then
//!    probes the other port: a different observed address means a symmetric
//!    NAT. The result is a [`NatKind`].
//! 2. **Register.** A host behind a NAT (`run --behind-nat`) registers its
//!    RPC port and NAT kind every
//!    [`REGISTER_INTERVAL`](host::REGISTER_INTERVAL); that also keeps its
//!    mapping toward the introducer open.
//! 3. **Introduce.** A caller about to connect to a peer it found on the DHT
//!    asks the introducer for an introduction. If the peer is registered, the
//!    introducer answers with the peer's observed address and asks the peer
//!    (over the peer's open mapping) to punch the caller's observed address.
//!    Both sides then punch each other at once, again after
//!    [`HANDSHAKE_PUNCH_INTERVAL`](host::HANDSHAKE_PUNCH_INTERVAL) and at
//!    doubling intervals, until each has heard the other, and the caller's
//!    uTP connect goes through. A symmetric NAT facing a port-restricted
//!    one needs birthday punching ([`birthday`]): the introducer tells both
//!    sides their roles. When theory rules a direct path out (two symmetric
//!    NATs), the introducer says so at once.
//! 4. **Keep alive.** Paths made this way are punched every keepalive
//!    interval while they have been used recently, so the NATs keep them.
//!
//! The exact messages, ports and timings are in `docs/wire.md §5`.
//!
//! # Files
//!
//! - [`config`]: how a host takes part ([`NatConfig`]), said once for the
//!   node and both state machines.
//! - [`punch`]: Grenache-style punching, [`PunchState`].
//! - [`punch_driver`]: runs [`PunchState`] with the socket, discovery and
//!   the clock; the node says how plugins hear of a punch.
//! - [`wire`]: the introduction datagrams ([`wire::Message`]) and the
//!   introducer's ports ([`IntroducerAddr`]).
//! - [`kind`]: [`NatKind`] and how two kinds can meet ([`kind::method`]).
//! - [`birthday`]: birthday punching, for a symmetric NAT facing a
//!   port-restricted one.
//! - [`introducer`]: the public side, [`introducer::Introducer`].
//! - [`relay`]: the introducer's relay for hosts no direct path joins,
//!   [`relay::Relay`].
//! - [`host`]: a host's side, [`HostIntroductions`].
//! - [`introducer_driver`]: the introducer's sockets, [`IntroducerSockets`].
//! - [`host_driver`]: a host's introduction driver and its
//!   [`IntroductionHandle`].
//!
//! The state machines are tested against simulated NATs in simulated time
//! (`nat/tests.rs`); the NAT lab (`tests/nat*.rs`) proves the real thing.

pub mod birthday;
pub mod config;
pub mod host;
pub mod host_driver;
pub mod introducer;
pub mod introducer_driver;
pub mod kind;
pub mod punch;
pub mod punch_driver;
pub mod relay;
pub mod wire;

pub use config::{NatConfig, DEFAULT_KEEPALIVE};
pub use host::{HostIntroductions, IntroOutcome, IntroResult};
pub use host_driver::{IntroductionHandle, IntroductionStats};
pub use introducer_driver::IntroducerSockets;
pub use kind::NatKind;
pub use punch::{PunchAction, PunchState, DEFAULT_PUNCH_INTERVAL};
pub use wire::IntroducerAddr;

#[cfg(test)]
mod tests;
