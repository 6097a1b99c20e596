//! The host's network-facing decoders, compiled from the host's own source
//! files (`#[path]`), so the fuzz targets exercise exactly the code the
//! host runs, without building the host (and wasmtime) instrumented.

#![allow(dead_code)]

/// `host/src/rpc/codec.rs`: the Grenache envelope and the stream decoder.
#[path = "../../host/src/rpc/codec.rs"]
pub mod codec;

/// `host/src/utp/packet.rs`: uTP packets (BEP 29) and their extensions.
#[path = "../../host/src/utp/packet.rs"]
pub mod packet;
