//! The client side of the tutorial's `nat_w_broker` example
//! (`rpc_client.js`): every 2 s it registers with `fibo_broker` as a client
//! and punches every `fibonacci_worker` server the broker lists (the
//! tutorial's client registers once and never punches, so a port-restricted
//! NAT on its side drops the servers' punches). When a
//! server's punch arrives, the path is open: it asks that server for
//! `{"length":10}` and logs `sequence from PEER: REPLY`.
//!
//! Configuration (policy `[plugin.broker-client.config]`): `punch =
//! "false"` makes it register without punching, as the tutorial's client
//! does, so the lab can show that a one-sided punch does not get through.

#![cfg(target_arch = "wasm32")]

wit_bindgen::generate!({ path: "../../../wit", world: "plugin" });

// The broker's own format; these peers only read its replies.
#[allow(dead_code)]
#[path = "../../broker/src/registry.rs"]
mod registry;

#[path = "../../broker-peer.rs"]
mod peer;

use exports::grenache::plugin::service::{Guest, PluginManifest, RequestContext};
use grenache::plugin::config;
use grenache::plugin::host::{log, request_peer};
use grenache::plugin::types::Level;

struct BrokerClient;

impl Guest for BrokerClient {
    fn manifest() -> PluginManifest {
        PluginManifest {
            serves: vec![],
            punch: vec![],
            calls: vec![peer::BROKER.into(), peer::SERVICE.into()],
            tick_interval_ms: Some(peer::REGISTER_INTERVAL_MS),
        }
    }

    fn handle(
        service: String,
        _payload: String,
        _context: RequestContext,
    ) -> Result<String, String> {
        Err(format!("this plugin serves nothing, not {service}"))
    }

    fn on_punch(peer: String) {
        match request_peer(&peer, peer::SERVICE, r#"{"length":10}"#, 10_000) {
            Ok(reply) => log(Level::Info, &format!("sequence from {peer}: {reply}")),
            Err(e) => log(Level::Warn, &format!("request to {peer} failed: {e}")),
        }
    }

    fn on_tick() -> Result<(), String> {
        let punch = config::get("punch").is_none_or(|v| v != "false");
        peer::register_and_punch(false, punch)
    }
}

export!(BrokerClient);
