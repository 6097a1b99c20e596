//! The server of Grenache's `simple_connection` example: `rpc_test` answers
//! `"world"` to anything, so the wire test vectors TV-2/TV-3 (docs/wire.md §7) can be checked
//! byte for byte.

#![cfg(target_arch = "wasm32")]

wit_bindgen::generate!({ path: "../../../wit", world: "plugin" });

use exports::grenache::plugin::service::{Guest, PluginManifest, RequestContext};

struct RpcTest;

impl Guest for RpcTest {
    fn manifest() -> PluginManifest {
        PluginManifest {
            serves: vec!["rpc_test".into()],
            punch: vec![],
            calls: vec![],
            tick_interval_ms: None,
        }
    }

    fn handle(
        _service: String,
        _payload: String,
        _context: RequestContext,
    ) -> Result<String, String> {
        Ok("\"world\"".into())
    }

    fn on_tick() -> Result<(), String> {
        Ok(())
    }

    fn on_punch(_peer: String) {}
}

export!(RpcTest);
