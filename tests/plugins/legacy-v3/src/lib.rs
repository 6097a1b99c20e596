//! A plugin built against the frozen `grenache:plugin@0.3.0` contract
//! (`wit/v0.3/plugin.wit`), as every plugin was before plugin state,
//! configuration and ticks: no `state` or `config` imports, no `on-tick`, no
//! `tick-interval-ms` in its manifest. The tests prove the host still loads
//! it and answers through it, request context included.
//!
//! `legacy_v3` answers `{"legacy":3,"caller":"<ip:port>","payload":<payload>}`.

#![cfg(target_arch = "wasm32")]

wit_bindgen::generate!({ path: "../../../wit/v0.3", world: "plugin" });

use exports::grenache::plugin::service::{Guest, PluginManifest, RequestContext};
use grenache::plugin::host::log;
use grenache::plugin::types::Level;

struct Legacy;

impl Guest for Legacy {
    fn manifest() -> PluginManifest {
        PluginManifest {
            serves: vec!["legacy_v3".into()],
            punch: vec![],
            calls: vec![],
        }
    }

    fn handle(
        _service: String,
        payload: String,
        context: RequestContext,
    ) -> Result<String, String> {
        Ok(format!(
            "{{\"legacy\":3,\"caller\":{:?},\"payload\":{payload}}}",
            context.caller
        ))
    }

    fn on_punch(peer: String) {
        log(Level::Info, &format!("legacy v3 punched by {peer}"));
    }
}

export!(Legacy);
