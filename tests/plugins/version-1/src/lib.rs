//! Version 1 of the `versioned` test plugin: answers `{"version":1}`.
#![cfg(target_arch = "wasm32")]

const VERSION: u32 = 1;
const SERVES: &[&str] = &["versioned"];

include!("../../versioned.rs");
