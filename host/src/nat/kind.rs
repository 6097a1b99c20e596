//! NAT kinds: what a NAT does to a host's socket, as far as punching cares,
//! and the theory of which kinds can meet on a direct path.
//!
//! A host measures its own kind with the NAT probe ([`super::host`],
//! `docs/wire.md §5.3` step 1) and sends it with every registration and
//! introduction ([`super::wire`]); the introducer answers each introduction
//! with the [`Method`] that [`method`] names for the pair.

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

/// Which side of a birthday attempt a host plays (`docs/wire.md §5.6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BirthdayRole {
    /// Behind the symmetric NAT: many extra sockets, each punching the
    /// peer's one address (each makes a new mapping at its NAT).
    Sockets,
    /// Behind the port-restricted NAT: punches the peer's IP at random ports
    /// from the main socket until one of those mappings answers.
    Probe,
}

impl BirthdayRole {
    /// The role's name, as on the wire: `sockets` or `probe`.
    pub fn as_str(self) -> &'static str {
        match self {
            BirthdayRole::Sockets => "sockets",
            BirthdayRole::Probe => "probe",
        }
    }

    /// The role of the other side.
    pub fn other(self) -> Self {
        match self {
            BirthdayRole::Sockets => BirthdayRole::Probe,
            BirthdayRole::Probe => BirthdayRole::Sockets,
        }
    }
}

/// How two hosts behind NATs can meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Simultaneous punching from the main sockets (a symmetric side's new
    /// port is followed by the other side).
    Punch,
    /// Birthday punching (a symmetric NAT facing a port-restricted one):
    /// the first host (the caller) plays this role, the other the other.
    Birthday(BirthdayRole),
    /// No direct path: both NATs symmetric, each mapping random and bound to
    /// one destination port, so neither side can guess where to punch.
    Relay,
}

/// How `caller` (behind a NAT of that kind) and `peer` can meet. A symmetric
/// NAT gives each destination a fresh (in the lab: random) port that only
/// the destination's exact address may answer. A peer behind a cone NAT
/// that accepts any port of an address it punched meets it by plain
/// punching; a port-restricted one must guess the port: birthday punching
/// (one side opens many mappings, the other probes many ports, and they
/// meet with high probability, `docs/wire.md §5.6`); two symmetric NATs
/// cannot meet at all.
pub fn method(caller: NatKind, peer: NatKind) -> Method {
    use NatKind::{PortRestricted, Symmetric};
    match (caller, peer) {
        (Symmetric, Symmetric) => Method::Relay,
        (Symmetric, PortRestricted) => Method::Birthday(BirthdayRole::Sockets),
        (PortRestricted, Symmetric) => Method::Birthday(BirthdayRole::Probe),
        _ if direct_path_possible(caller, peer) => Method::Punch,
        // Unreachable with today's kinds; kept total for new ones.
        _ => Method::Relay,
    }
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

    #[test]
    fn the_method_of_each_pair() {
        use NatKind::*;
        for (caller, peer, expected) in [
            (Open, Open, Method::Punch),
            (Open, Symmetric, Method::Punch),
            (Symmetric, Open, Method::Punch),
            (PortRestricted, PortRestricted, Method::Punch),
            (Unknown, Symmetric, Method::Punch),
            (
                PortRestricted,
                Symmetric,
                Method::Birthday(BirthdayRole::Probe),
            ),
            (
                Symmetric,
                PortRestricted,
                Method::Birthday(BirthdayRole::Sockets),
            ),
            (Symmetric, Symmetric, Method::Relay),
        ] {
            assert_eq!(method(caller, peer), expected, "{caller:?} → {peer:?}");
        }
        // The two sides of a birthday always play opposite roles.
        let Method::Birthday(a) = method(Symmetric, PortRestricted) else {
            unreachable!()
        };
        let Method::Birthday(b) = method(PortRestricted, Symmetric) else {
            unreachable!()
        };
        assert_eq!(a.other(), b);
    }
}
