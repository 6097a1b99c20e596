//! The generated bindings of each contract version the host speaks, one
//! `wasmtime::component::bindgen!` module per WIT minor version.
//!
//! How it fits: generated types only, no code of ours. `contract.rs` (which
//! versions exist, how a plugin is detected and called) and `instance.rs`
//! (the host side of each version's imports) both build on these, so
//! neither needs the other's types to name the WIT's.

/// Bindings of `grenache:plugin@0.4.0` (`wit/plugin.wit`), the current
/// contract.
pub mod v0_4 {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "plugin",
        imports: { default: async },
        exports: { default: async },
    });
}

/// Bindings of `grenache:plugin@0.3.0` (`wit/v0.3/plugin.wit`), kept so that
/// plugins built against it still load; they get no state, configuration
/// or ticks.
pub mod v0_3 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.3",
        world: "plugin",
        imports: { default: async },
        exports: { default: async },
    });
}

/// Bindings of `grenache:plugin@0.2.0` (`wit/v0.2/plugin.wit`), kept so that
/// plugins built against it still load; their `handle` gets no context.
pub mod v0_2 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.2",
        world: "plugin",
        imports: { default: async },
        exports: { default: async },
    });
}
