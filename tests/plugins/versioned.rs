// Shared source of the `version-1` and `version-2` test plugins, which the
// hot-swap tests swap between while requests flow. Each crate defines
// `VERSION` and `SERVES` and includes this file.

wit_bindgen::generate!({ path: "../../../wit", world: "plugin" });

use exports::grenache::plugin::service::{Guest, PluginManifest, RequestContext};

struct Versioned;

impl Guest for Versioned {
    fn manifest() -> PluginManifest {
        PluginManifest { serves: SERVES.iter().map(|s| s.to_string()).collect(), punch: vec![], calls: vec![], tick_interval_ms: None }
    }

    fn handle(
        _service: String,
        _payload: String,
        _context: RequestContext,
    ) -> Result<String, String> {
        Ok(format!("{{\"version\":{VERSION}}}"))
    }

    fn on_punch(_peer: String) {}

    fn on_tick() -> Result<(), String> {
        Ok(())
    }
}

export!(Versioned);
