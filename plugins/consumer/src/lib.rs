//! `fibonacci_consumer`: the public side of Grenache's classic hole-punching
//! example.
//!
//! A `fibonacci_worker` behind a NAT punches this host; the host calls
//! [`on_punch`](Guest::on_punch), and the consumer sends `{"length":10}`
//! straight back to the punching peer through the hole it just opened.
//!
//! It also answers requests for `fibonacci_consumer` by forwarding the payload
//! to any `fibonacci_worker` found through discovery, which makes it a small
//! example of a plugin that calls another service.

#![cfg(target_arch = "wasm32")]

wit_bindgen::generate!({ path: "../../wit", world: "plugin" });

use exports::grenache::plugin::service::{Guest, PluginManifest, RequestContext};
use grenache::plugin::host::{log, request, request_peer};
use grenache::plugin::types::{Level, RequestError};

const SERVICE: &str = "fibonacci_consumer";
const WORKER: &str = "fibonacci_worker";
const TIMEOUT_MS: u32 = 10_000;

struct Consumer;

impl Guest for Consumer {
    fn manifest() -> PluginManifest {
        PluginManifest {
            serves: vec![SERVICE.to_string()],
            punch: vec![],
            calls: vec![WORKER.to_string()],
            tick_interval_ms: None,
        }
    }

    fn handle(
        service: String,
        payload: String,
        _context: RequestContext,
    ) -> Result<String, String> {
        if service != SERVICE {
            return Err(format!("this plugin serves {SERVICE}, not {service}"));
        }
        request(WORKER, &payload, TIMEOUT_MS).map_err(|e| describe(&e))
    }

    fn on_tick() -> Result<(), String> {
        Ok(())
    }

    fn on_punch(peer: String) {
        log(Level::Info, &format!("punch from {peer}"));
        match request_peer(&peer, WORKER, r#"{"length":10}"#, TIMEOUT_MS) {
            Ok(reply) => log(
                Level::Info,
                &format!("got data reply, sequence is: {reply}"),
            ),
            Err(e) => log(
                Level::Warn,
                &format!("request to {peer} failed: {}", describe(&e)),
            ),
        }
    }
}

fn describe(error: &RequestError) -> String {
    match error {
        RequestError::NoPeers(m) => format!("no peers: {m}"),
        RequestError::Timeout(m) => format!("timeout: {m}"),
        RequestError::Remote(m) => m.clone(),
        RequestError::Transport(m) => format!("transport: {m}"),
        RequestError::Denied(m) => format!("denied: {m}"),
    }
}

export!(Consumer);
