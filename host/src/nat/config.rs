//! How a host takes part in NAT traversal, said once: the command line
//! builds one [`NatConfig`], and the node and both of a host's state machines
//! ([`super::PunchState`], [`super::HostIntroductions`]) read it.

use std::time::Duration;

use super::wire::IntroducerAddr;

/// The default interval of keepalive punches on introduced paths
/// (`docs/wire.md §5.3` step 5); `run --keepalive` overrides it.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(15);

/// How a host takes part in NAT traversal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatConfig {
    /// The introducer; `None` for none (peers are connected to as announced).
    pub introducer: Option<IntroducerAddr>,
    /// Interval of keepalive punches on introduced paths.
    pub keepalive: Duration,
    /// The host serves behind a NAT (`run --behind-nat`): each round it
    /// punches the peers of the services its plugins name
    /// ([`super::PunchState`]), and it registers with the introducer so that
    /// callers behind other NATs can be introduced to it
    /// ([`super::HostIntroductions`]). A public host, or a one-shot client
    /// (`call`, `bench`), does neither.
    pub behind_nat: bool,
}

impl Default for NatConfig {
    /// No introducer, the default keepalive, not behind a NAT.
    fn default() -> Self {
        NatConfig {
            introducer: None,
            keepalive: DEFAULT_KEEPALIVE,
            behind_nat: false,
        }
    }
}
