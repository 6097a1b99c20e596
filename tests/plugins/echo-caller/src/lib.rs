//! `echo_caller` answers the caller's address from its request context, as a
//! JSON string (`"127.0.0.1:40123"`), so the tests can check that a plugin
//! sees the address the caller's own socket used.

#![cfg(target_arch = "wasm32")]

wit_bindgen::generate!({ path: "../../../wit", world: "plugin" });

use exports::grenache::plugin::service::{Guest, PluginManifest, RequestContext};

struct EchoCaller;

impl Guest for EchoCaller {
    fn manifest() -> PluginManifest {
        PluginManifest {
            serves: vec!["echo_caller".into()],
            punch: vec![],
            calls: vec![],
            tick_interval_ms: None,
        }
    }

    fn handle(
        _service: String,
        _payload: String,
        context: RequestContext,
    ) -> Result<String, String> {
        // An address has no characters JSON must escape.
        Ok(format!("\"{}\"", context.caller))
    }

    fn on_tick() -> Result<(), String> {
        Ok(())
    }

    fn on_punch(_peer: String) {}
}

export!(EchoCaller);
