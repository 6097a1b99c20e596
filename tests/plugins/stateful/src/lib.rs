//! A plugin that does with its state, configuration, ticks and punches
//! whatever its request says, so the tests can check what the host keeps.
//!
//! `state` takes one command per request (JSON), e.g. `{"get":"k"}`:
//! - `get: k` → the value (text) or `null`; `set: [k, v]` → `"ok"`;
//!   `delete: k`; `list: prefix` → the keys;
//! - `set_then_trap: [k, v]`: sets, then panics (the write must not be kept);
//! - `set_then_err: [k, v]`: sets, then returns an error (kept, as the WIT says);
//! - `fill: n`: sets `big` to n bytes; answers the error text if refused;
//! - `config: k` → `config.get(k)`; `config_all: true` → `config.get-all()`;
//! - `punch: {peer, times}` → punches `times` times; answers how many were
//!   sent and the first error.
//!
//! Every tick increments the key `ticks`, and logs `tick start N` and
//! `tick end N` around a busy wait of `tick_busy_ms` (config, default 0).
//! The manifest asks for no ticks; the tests set `tick_interval`.

#![cfg(target_arch = "wasm32")]

wit_bindgen::generate!({ path: "../../../wit", world: "plugin" });

use exports::grenache::plugin::service::{Guest, PluginManifest, RequestContext};
use grenache::plugin::config;
use grenache::plugin::host::{log, punch};
use grenache::plugin::state::{self, StateError};
use grenache::plugin::types::Level;
use serde_json::{json, Value};

struct Stateful;

fn describe(e: StateError) -> String {
    match e {
        StateError::QuotaExceeded(m) => format!("quota-exceeded: {m}"),
        StateError::Invalid(m) => format!("invalid: {m}"),
        StateError::Unavailable(m) => format!("unavailable: {m}"),
    }
}

fn pair(v: &Value) -> Result<(String, String), String> {
    match v.as_array().map(Vec::as_slice) {
        Some([Value::String(k), Value::String(v)]) => Ok((k.clone(), v.clone())),
        _ => Err("expected [key, value]".into()),
    }
}

fn text(v: &Value) -> Result<&str, String> {
    v.as_str().ok_or_else(|| "expected a string".to_string())
}

fn run(command: &Value) -> Result<Value, String> {
    let (name, arg) = command
        .as_object()
        .and_then(|o| o.iter().next())
        .ok_or("expected {command: argument}")?;
    Ok(match name.as_str() {
        "get" => match state::get(text(arg)?).map_err(describe)? {
            Some(bytes) => json!(String::from_utf8_lossy(&bytes)),
            None => Value::Null,
        },
        "set" => {
            let (k, v) = pair(arg)?;
            state::set(&k, v.as_bytes()).map_err(describe)?;
            json!("ok")
        }
        "delete" => {
            state::delete(text(arg)?).map_err(describe)?;
            json!("ok")
        }
        "list" => json!(state::list_keys(text(arg)?).map_err(describe)?),
        "set_then_trap" => {
            let (k, v) = pair(arg)?;
            state::set(&k, v.as_bytes()).map_err(describe)?;
            panic!("trapping after setting {k}");
        }
        "set_then_err" => {
            let (k, v) = pair(arg)?;
            state::set(&k, v.as_bytes()).map_err(describe)?;
            return Err(format!("an error after setting {k}"));
        }
        "fill" => {
            let n = arg.as_u64().ok_or("expected a size")? as usize;
            match state::set("big", &vec![b'x'; n]) {
                Ok(()) => json!("ok"),
                Err(e) => json!({ "error": describe(e) }),
            }
        }
        "config" => json!(config::get(text(arg)?)),
        "config_all" => json!(config::get_all()),
        "punch" => {
            let peer = text(&arg["peer"])?;
            let times = arg["times"].as_u64().unwrap_or(1);
            let mut sent = 0;
            let mut error = None;
            for _ in 0..times {
                match punch(peer) {
                    Ok(()) => sent += 1,
                    Err(e) => {
                        error.get_or_insert(e);
                    }
                }
            }
            json!({ "sent": sent, "error": error })
        }
        other => return Err(format!("unknown command {other}")),
    })
}

impl Guest for Stateful {
    fn manifest() -> PluginManifest {
        PluginManifest {
            serves: vec!["state".into()],
            punch: vec![],
            calls: vec![],
            tick_interval_ms: None,
        }
    }

    fn handle(
        _service: String,
        payload: String,
        _context: RequestContext,
    ) -> Result<String, String> {
        let command: Value = serde_json::from_str(&payload).map_err(|e| e.to_string())?;
        run(&command).map(|v| v.to_string())
    }

    fn on_tick() -> Result<(), String> {
        let n: u64 = state::get("ticks")
            .map_err(describe)?
            .and_then(|b| String::from_utf8(b).ok()?.parse().ok())
            .unwrap_or(0)
            + 1;
        log(Level::Info, &format!("tick start {n}"));
        let busy: u64 = config::get("tick_busy_ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let until = std::time::Instant::now() + std::time::Duration::from_millis(busy);
        while std::time::Instant::now() < until {
            std::hint::spin_loop();
        }
        state::set("ticks", n.to_string().as_bytes()).map_err(describe)?;
        log(Level::Info, &format!("tick end {n}"));
        if config::get("tick_fails").is_some() {
            return Err(format!("tick {n} failed on purpose"));
        }
        Ok(())
    }

    fn on_punch(_peer: String) {}
}

export!(Stateful);
