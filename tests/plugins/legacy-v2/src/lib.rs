//! A plugin built against the frozen `grenache:plugin@0.2.0` contract
//! (`wit/v0.2/plugin.wit`), as every plugin was before the request context:
//! `handle(service, payload)` with no context. The tests prove the host still
//! loads it, reads its manifest, answers through it and tells it of punches.
//!
//! `legacy` answers `{"legacy":<payload>}`; a punch is logged as
//! `legacy punched by <peer>`.

#![cfg(target_arch = "wasm32")]

wit_bindgen::generate!({ path: "../../../wit/v0.2", world: "plugin" });

use exports::grenache::plugin::service::{Guest, PluginManifest};
use grenache::plugin::host::log;
use grenache::plugin::types::Level;

struct Legacy;

impl Guest for Legacy {
    fn manifest() -> PluginManifest {
        PluginManifest {
            serves: vec!["legacy".into()],
            punch: vec![],
            calls: vec![],
        }
    }

    fn handle(_service: String, payload: String) -> Result<String, String> {
        Ok(format!("{{\"legacy\":{payload}}}"))
    }

    fn on_punch(peer: String) {
        log(Level::Info, &format!("legacy punched by {peer}"));
    }
}

export!(Legacy);
