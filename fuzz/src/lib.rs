//! The host's network-facing decoders, compiled from the host's own source
//! files (`#[path]`), so the fuzz targets exercise exactly the code the host
//! runs, without building the host (and wasmtime) instrumented. The
//! modules below give them the paths they use inside the host (`crate::utp`,
//! `crate::transport`, `super::kind`).

#![allow(dead_code)]

/// `host/src/rpc/codec.rs`: the Grenache envelope and the stream decoder.
#[path = "../../host/src/rpc/codec.rs"]
pub mod codec;

/// `host/src/utp/packet.rs`: uTP packets (BEP 29) and their extensions.
#[path = "../../host/src/utp/packet.rs"]
pub mod packet;

/// `host/src/transport/datagram.rs`: the shared socket's demultiplexer.
#[path = "../../host/src/transport/datagram.rs"]
pub mod datagram;

/// `host/src/nat/kind.rs`: NAT kinds (RFC 4787), in introduction messages.
#[path = "../../host/src/nat/kind.rs"]
pub mod kind;

/// `host/src/nat/wire.rs`: the introduction messages (docs/wire.md §5).
#[path = "../../host/src/nat/wire.rs"]
pub mod wire;

pub mod rpc {
    pub use crate::codec;
}

pub mod utp {
    pub use crate::packet;
}

pub mod transport {
    pub use crate::datagram::*;
}

pub mod nat {
    pub use crate::{kind, wire};
}

/// `host/src/discovery/server/krpc.rs`: KRPC (BEP 5) messages as the `dht`
/// node reads them.
#[path = "../../host/src/discovery/server/krpc.rs"]
pub mod krpc;

/// `host/src/units.rs`: hex and the other small units the modules below use.
#[path = "../../host/src/units.rs"]
pub mod units;

/// `host/src/discovery/server/bep44.rs`: BEP 44 keys, targets, signatures.
#[path = "../../host/src/discovery/server/bep44.rs"]
pub mod bep44;

/// `host/src/discovery/server/items.rs`: BEP 44 items as stored.
#[path = "../../host/src/discovery/server/items.rs"]
pub mod items;

pub mod discovery {
    pub mod server {
        pub use crate::{bep44, items, krpc};
    }
}

/// `host/src/grape/api.rs`: the Grape HTTP API's request bodies and
/// replies, as `grenache-host grape` reads and writes them.
#[path = "../../host/src/grape/api.rs"]
pub mod grape_api;
