//! NAT traversal: how a host behind a NAT becomes reachable.
//!
//! - [`punch`]: Grenache's hole punching (a host behind a NAT punches the
//!   peers of the services its plugins name, every second), as a sans-IO
//!   state machine.
//! - [`introduction`]: introductions through a public introducer (NAT probe,
//!   registration, introduction, simultaneous punching, keepalive), as
//!   sans-IO state machines for both sides, with their wire messages and the
//!   theory of which NAT kinds can meet.
//! - [`driver`]: the tokio side: the introducer's sockets, a host's
//!   introduction driver and its punch loop.
//!
//! The wire format is described in `docs/wire.md`.

pub mod driver;
pub mod introduction;
pub mod punch;

pub use driver::{IntroducerSockets, IntroductionHandle};
pub use introduction::{
    HostIntroductions, IntroResult, IntroducerAddr, NatKind, DEFAULT_KEEPALIVE,
};
pub use punch::{PunchAction, PunchState, DEFAULT_PUNCH_INTERVAL};
