//! NAT kinds: what a NAT does to a host's socket, as far as punching cares,
//! and the theory of which kinds can meet on a direct path.
//!
//! A host measures its own kind with the NAT probe ([`super::host`],
//! `docs/wire.md §5.3` step 1) and sends it with every registration and
//! introduction ([`super::wire`]); the introducer refuses introductions that
//! [`direct_path_possible`] rules out.

use serde::{Deserialize, Serialize};

/// What a NAT does to a host's socket, as far as punching cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatKind {
    /// One mapping for every destination, and anyone the host has sent to
    /// (at least that address) may answer from any port: no NAT, full cone or
    /// address-restricted cone.
    Open,
    /// One mapping for every destination, but only the exact address and port
    /// the host sent to may answer.
    PortRestricted,
    /// A new mapping per destination.
    Symmetric,
    /// Not measured (no introducer answered).
    Unknown,
}

impl NatKind {
    /// How messages name it.
    pub fn describe(self) -> &'static str {
        match self {
            NatKind::Open => "no NAT, or a full-cone or address-restricted NAT",
            NatKind::PortRestricted => "a port-restricted cone NAT",
            NatKind::Symmetric => "a symmetric NAT",
            NatKind::Unknown => "an unknown NAT",
        }
    }
}

/// Whether simultaneous punching can open a direct path between two NATs:
/// a symmetric NAT's new mapping can only be reached by a peer whose NAT
/// accepts packets from any port of an address it punched.
pub fn direct_path_possible(a: NatKind, b: NatKind) -> bool {
    let port_bound = |k| matches!(k, NatKind::PortRestricted | NatKind::Symmetric);
    !((a == NatKind::Symmetric && port_bound(b)) || (b == NatKind::Symmetric && port_bound(a)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_matrix_of_what_theory_allows() {
        use NatKind::*;
        for (a, b, possible) in [
            (Open, Open, true),
            (Open, PortRestricted, true),
            (Open, Symmetric, true),
            (PortRestricted, PortRestricted, true),
            (PortRestricted, Symmetric, false),
            (Symmetric, Symmetric, false),
        ] {
            assert_eq!(direct_path_possible(a, b), possible, "{a:?}/{b:?}");
            assert_eq!(direct_path_possible(b, a), possible, "{b:?}/{a:?}");
        }
    }
}
