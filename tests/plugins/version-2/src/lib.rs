//! Version 2 of the `versioned` test plugin: answers `{"version":2}` and also
//! serves `versioned_v2_only`, so a swap changes the services announced.
#![cfg(target_arch = "wasm32")]

const VERSION: u32 = 2;
const SERVES: &[&str] = &["versioned", "versioned_v2_only"];

include!("../../versioned.rs");
