//! The server side of the tutorial's `nat_w_broker` example
//! (`nat_server.js`): serves `fibonacci_worker` (the same sequence as the
//! `fibonacci` plugin) and, every 2 s, registers with `fibo_broker` as a
//! server and punches every client the broker lists, so that a client behind
//! another NAT can connect in.

#![cfg(target_arch = "wasm32")]

wit_bindgen::generate!({ path: "../../../wit", world: "plugin" });

#[allow(dead_code)] // only `answer` is needed here
#[path = "../../../../plugins/fibonacci/src/sequence.rs"]
mod sequence;

// The broker's own format; these peers only read its replies.
#[allow(dead_code)]
#[path = "../../broker/src/registry.rs"]
mod registry;

#[path = "../../broker-peer.rs"]
mod peer;

use exports::grenache::plugin::service::{Guest, PluginManifest, RequestContext};

struct BrokerWorker;

impl Guest for BrokerWorker {
    fn manifest() -> PluginManifest {
        PluginManifest {
            serves: vec![peer::SERVICE.into()],
            punch: vec![],
            calls: vec![peer::BROKER.into()],
            tick_interval_ms: Some(peer::REGISTER_INTERVAL_MS),
        }
    }

    fn handle(
        service: String,
        payload: String,
        _context: RequestContext,
    ) -> Result<String, String> {
        if service != peer::SERVICE {
            return Err(format!(
                "this plugin serves {}, not {service}",
                peer::SERVICE
            ));
        }
        sequence::answer(&payload)
    }

    /// A client's punch: the host punches back; nothing else to do.
    fn on_punch(_peer: String) {}

    fn on_tick() -> Result<(), String> {
        peer::register_and_punch(true, true)
    }
}

export!(BrokerWorker);
