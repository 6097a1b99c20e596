//! `fibo_broker`: the broker of the tutorial's `nat_w_broker` example
//! (docs/wire.md TV-7), as a plugin of contract 0.4.0.
//!
//! Two peers behind NATs cannot find each other's public addresses through
//! discovery: each announces its local port. Each registers with this
//! broker instead, on a public host; the broker records the address it
//! observed the registration come from (`request-context.caller`, the
//! peer's NAT mapping) and answers with every peer registered in the last
//! 15 s, so each side can punch the other (see [`registry`]).
//!
//! Registrations are kept in the plugin's state (`state` interface), one key
//! per entry, since each request runs in a fresh instance.

pub mod registry;

/// The service this plugin serves.
pub const SERVICE: &str = "fibo_broker";

#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({ path: "../../../wit", world: "plugin" });

    use super::registry::{self, Entry, Stored};
    use exports::grenache::plugin::service::{Guest, PluginManifest, RequestContext};
    use grenache::plugin::state::{self, StateError};

    struct Broker;

    impl Guest for Broker {
        fn manifest() -> PluginManifest {
            PluginManifest {
                serves: vec![super::SERVICE.into()],
                punch: vec![],
                calls: vec![],
                tick_interval_ms: None,
            }
        }

        fn handle(
            _service: String,
            payload: String,
            context: RequestContext,
        ) -> Result<String, String> {
            let entry = Entry::from_request(&payload, &context.caller)?;
            let mut existing = Vec::new();
            for key in state::list_keys("").map_err(describe)? {
                let value = state::get(&key).map_err(describe)?;
                let stored = value.and_then(|v| serde_json::from_slice::<Stored>(&v).ok());
                existing.push((key, stored));
            }
            let registered = registry::register(now_ms(), existing, entry);
            for key in &registered.evict {
                state::delete(key).map_err(describe)?;
            }
            state::set(&registered.key, &registered.value).map_err(describe)?;
            Ok(registry::reply(&registered.cache))
        }

        fn on_punch(_peer: String) {}

        fn on_tick() -> Result<(), String> {
            Ok(())
        }
    }

    /// Milliseconds since the Unix epoch (the host's wall clock): entries
    /// outlive an instance, and a restart of the host.
    fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    fn describe(e: StateError) -> String {
        match e {
            StateError::QuotaExceeded(m) => format!("the broker's state is full: {m}"),
            StateError::Invalid(m) => format!("the broker's state refused a key or value: {m}"),
            StateError::Unavailable(m) => format!("the broker has no state: {m}"),
        }
    }

    export!(Broker);
}
