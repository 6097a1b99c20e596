//! `sensor_gateway`: a sensor gateway that keeps readings in its plugin
//! state (grenache:plugin@0.4.0) and answers statistics about them.
//!
//! Requests (JSON):
//! - `{"record":{"sensor":"t1","value":21.5}}` keeps a reading, stamped with
//!   the time it arrived; answers `{"sensor":"t1","count":N}` (the readings
//!   this call saw, its own included; concurrent calls may add more).
//! - `{"stats":"t1"}` answers `{"sensor":"t1","count":N,"min":…,"max":…,
//!   "mean":…,"last":…}` over the readings kept; an error when there are none.
//! - `{"sensors":{}}` answers the names of the sensors with readings.
//!
//! Each reading is a state key of its own,
//! `reading/<sensor>/<unix_ns, 20 digits>-<random, 16 hex digits>`, holding
//! the value as JSON text. Concurrent requests run in instances of their own
//! and the state is last-writer-wins per key, so a read-modify-write of one
//! key per sensor would lose readings; a key per reading never does, and the
//! keys' byte order is the readings' time order. The operator's
//! configuration (`[plugin.sensors.config]` in the policy) bounds them:
//! `max_readings` per sensor (default 100; each `record` deletes the oldest
//! beyond it) and `retention_s` (default 86400): every tick (each second,
//! unless the policy's `tick_interval` says otherwise) deletes the readings
//! older than that. A value that is not a number in range is logged as a
//! warning naming the key, and the default is used.
//!
//! The state outlives the plugin's versions and the host's restarts: a swap
//! to a new version of this plugin keeps every reading.

/// The Grenache service name this plugin answers.
pub const SERVICE: &str = "sensor_gateway";
/// How often the plugin asks to be ticked, in milliseconds.
pub const TICK_INTERVAL_MS: u32 = 1000;
/// Readings kept per sensor unless `max_readings` says otherwise.
pub const DEFAULT_MAX_READINGS: u64 = 100;
/// The most `max_readings` may be (the host keeps at most 65536 keys).
pub const MAX_READINGS_LIMIT: u64 = 10_000;
/// Seconds a reading is kept unless `retention_s` says otherwise: a day.
pub const DEFAULT_RETENTION_S: u64 = 86_400;
/// Longest sensor name, in bytes.
pub const MAX_SENSOR_NAME: usize = 64;
/// The state key prefix of every reading.
pub const KEY_PREFIX: &str = "reading/";

use serde_json::{json, Value};

/// The state key prefix of `sensor`'s readings: `reading/<sensor>/`.
pub fn sensor_prefix(sensor: &str) -> String {
    format!("{KEY_PREFIX}{sensor}/")
}

/// The state key of a reading of `sensor` taken at `unix_ns`; `nonce` (a
/// random number) keeps two readings of the same nanosecond apart.
pub fn reading_key(sensor: &str, unix_ns: u64, nonce: u64) -> String {
    format!("{}{unix_ns:020}-{nonce:016x}", sensor_prefix(sensor))
}

/// When the reading under `key` was taken, in Unix nanoseconds; `None` for
/// a key that is not a reading's.
pub fn reading_time(key: &str) -> Option<u64> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (_sensor, stamp) = rest.split_once('/')?;
    stamp.split_once('-')?.0.parse().ok()
}

/// The sensor a reading's key belongs to.
pub fn reading_sensor(key: &str) -> Option<&str> {
    key.strip_prefix(KEY_PREFIX)?
        .split_once('/')
        .map(|(s, _)| s)
}

/// The keys among `keys` (one sensor's, in byte order, so oldest first)
/// to delete so that at most `max` remain.
pub fn beyond(keys: &[String], max: u64) -> &[String] {
    let keep = max.max(1) as usize;
    &keys[..keys.len().saturating_sub(keep)]
}

/// Count, min, max, mean and last of `values` (oldest first), as the answer
/// to `stats`.
pub fn stats(sensor: &str, values: &[f64]) -> Result<Value, String> {
    let last = *values
        .last()
        .ok_or_else(|| format!("no readings for sensor {sensor:?}"))?;
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    Ok(json!({
        "sensor": sensor,
        "count": values.len(),
        "min": min,
        "max": max,
        "mean": mean,
        "last": last,
    }))
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Keep `value` for `sensor`.
    Record { sensor: String, value: f64 },
    /// Statistics of `sensor`.
    Stats(String),
    /// The sensors with readings.
    Sensors,
}

/// Parses a request payload; the error says what a valid one looks like.
pub fn parse(payload: &str) -> Result<Request, String> {
    const USAGE: &str =
        r#"expected {"record":{"sensor":"t1","value":21.5}}, {"stats":"t1"} or {"sensors":{}}"#;
    let v: Value = serde_json::from_str(payload).map_err(|e| format!("{e}; {USAGE}"))?;
    let request = if let Some(r) = v.get("record") {
        let sensor = r["sensor"].as_str().ok_or(USAGE)?;
        let value = r["value"].as_f64().ok_or(USAGE)?;
        Request::Record {
            sensor: sensor_name(sensor)?,
            value,
        }
    } else if let Some(s) = v.get("stats") {
        Request::Stats(sensor_name(s.as_str().ok_or(USAGE)?)?)
    } else if v.get("sensors").is_some() {
        Request::Sensors
    } else {
        return Err(USAGE.to_string());
    };
    Ok(request)
}

/// A sensor name: 1 to 64 letters, digits, `_`, `-` or `.`.
fn sensor_name(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SENSOR_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    if ok {
        Ok(name.to_string())
    } else {
        Err(format!(
            "sensor name {name:?}: use 1 to {MAX_SENSOR_NAME} letters, digits, '_', '-' or '.'"
        ))
    }
}

/// A configuration value as a number within `1..=limit`; `default` when
/// it is absent, and when it is not such a number `Err` with the warning to
/// log (naming `key`, the value and the default used) beside the default.
pub fn configured(
    key: &str,
    value: Option<String>,
    default: u64,
    limit: u64,
) -> Result<u64, (u64, String)> {
    let Some(text) = value else {
        return Ok(default);
    };
    match text.trim().parse::<u64>() {
        Ok(n) if (1..=limit).contains(&n) => Ok(n),
        _ => Err((
            default,
            format!(
                "config {key} = {text:?} is not a whole number from 1 to {limit}; using the default, {default}"
            ),
        )),
    }
}

#[cfg(target_arch = "wasm32")]
mod bindings {
    wit_bindgen::generate!({ path: "../../wit", world: "plugin" });

    use super::{
        beyond, parse, reading_key, reading_sensor, reading_time, sensor_prefix, stats, Request,
        KEY_PREFIX,
    };
    use exports::grenache::plugin::service::{Guest, PluginManifest, RequestContext};
    use grenache::plugin::config;
    use grenache::plugin::host::log;
    use grenache::plugin::state::{self, StateError};
    use grenache::plugin::types::Level;
    use std::hash::{BuildHasher, Hasher};

    struct Sensors;

    fn describe(e: StateError) -> String {
        match e {
            StateError::QuotaExceeded(m) => format!("the gateway's storage is full: {m}"),
            StateError::Invalid(m) => format!("cannot store that: {m}"),
            StateError::Unavailable(m) => format!("the gateway has no storage: {m}"),
        }
    }

    fn now_ns() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    }

    /// A random number: std seeds each `RandomState` from WASI's
    /// `random` (wasm32-wasip2).
    fn nonce() -> u64 {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    }

    /// The configuration value `key` as a number (see `super::configured`),
    /// logging a warning when it is not one.
    fn configured(key: &str, default: u64, limit: u64) -> u64 {
        super::configured(key, config::get(key), default, limit).unwrap_or_else(|(n, warning)| {
            log(Level::Warn, &warning);
            n
        })
    }

    /// `sensor`'s values, oldest first. A reading deleted by a concurrent
    /// call between the listing and the read is skipped.
    fn values(sensor: &str) -> Result<Vec<f64>, String> {
        let mut values = Vec::new();
        for key in state::list_keys(&sensor_prefix(sensor)).map_err(describe)? {
            if let Some(bytes) = state::get(&key).map_err(describe)? {
                let value = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("stored reading {key} is not valid: {e}"))?;
                values.push(value);
            }
        }
        Ok(values)
    }

    impl Guest for Sensors {
        fn manifest() -> PluginManifest {
            PluginManifest {
                serves: vec![super::SERVICE.to_string()],
                punch: vec![],
                calls: vec![],
                tick_interval_ms: Some(super::TICK_INTERVAL_MS),
            }
        }

        fn handle(
            _service: String,
            payload: String,
            _context: RequestContext,
        ) -> Result<String, String> {
            match parse(&payload)? {
                Request::Record { sensor, value } => {
                    let max = configured(
                        "max_readings",
                        super::DEFAULT_MAX_READINGS,
                        super::MAX_READINGS_LIMIT,
                    );
                    let key = reading_key(&sensor, now_ns(), nonce());
                    let text = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
                    state::set(&key, &text).map_err(describe)?;
                    let keys = state::list_keys(&sensor_prefix(&sensor)).map_err(describe)?;
                    let excess = beyond(&keys, max);
                    for old in excess {
                        state::delete(old).map_err(describe)?;
                    }
                    let count = keys.len() - excess.len();
                    Ok(serde_json::json!({"sensor": sensor, "count": count}).to_string())
                }
                Request::Stats(sensor) => stats(&sensor, &values(&sensor)?).map(|v| v.to_string()),
                Request::Sensors => {
                    let keys = state::list_keys(KEY_PREFIX).map_err(describe)?;
                    let mut names: Vec<&str> =
                        keys.iter().filter_map(|k| reading_sensor(k)).collect();
                    names.dedup();
                    Ok(serde_json::json!(names).to_string())
                }
            }
        }

        fn on_tick() -> Result<(), String> {
            let retention_s = configured(
                "retention_s",
                super::DEFAULT_RETENTION_S,
                u64::MAX / 1_000_000_000,
            );
            let oldest = now_ns().saturating_sub(retention_s * 1_000_000_000);
            let mut expired: Vec<String> = Vec::new();
            for key in state::list_keys(KEY_PREFIX).map_err(describe)? {
                if reading_time(&key).is_some_and(|at| at < oldest) {
                    state::delete(&key).map_err(describe)?;
                    let sensor = reading_sensor(&key).unwrap_or_default().to_string();
                    if expired.last() != Some(&sensor) {
                        expired.push(sensor);
                    }
                }
            }
            for sensor in expired {
                if state::list_keys(&sensor_prefix(&sensor))
                    .map_err(describe)?
                    .is_empty()
                {
                    log(Level::Info, &format!("{sensor}: every reading expired"));
                }
            }
            Ok(())
        }

        fn on_punch(_peer: String) {}
    }

    export!(Sensors);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_keys_sort_by_time_and_name_their_sensor() {
        let early = reading_key("t1", 999, u64::MAX);
        let late = reading_key("t1", 1_000, 0);
        assert!(early < late, "{early} {late}");
        assert_eq!(reading_time(&late), Some(1_000));
        assert_eq!(reading_sensor(&late), Some("t1"));
        assert!(late.starts_with(&sensor_prefix("t1")));
        // One sensor's prefix is not another's whose name it starts.
        assert!(!reading_key("t10", 1, 1).starts_with(&sensor_prefix("t1")));
        assert_eq!(reading_time("other"), None);
    }

    #[test]
    fn the_oldest_keys_beyond_the_maximum_go() {
        let keys: Vec<String> = (0..5).map(|i| reading_key("t1", i, 0)).collect();
        assert_eq!(beyond(&keys, 3), &keys[..2]);
        assert!(beyond(&keys, 5).is_empty());
        assert_eq!(beyond(&keys, 0).len(), 4, "at least one reading is kept");
    }

    #[test]
    fn stats_are_count_min_max_mean_last() {
        assert_eq!(
            stats("t1", &[21.5, 19.0, 23.0, 20.5]).unwrap(),
            json!({"sensor":"t1","count":4,"min":19.0,"max":23.0,"mean":21.0,"last":20.5})
        );
        assert!(stats("t1", &[]).unwrap_err().contains("no readings"));
    }

    #[test]
    fn requests_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(
            parse(r#"{"record":{"sensor":"t1","value":21.5}}"#),
            Ok(Request::Record {
                sensor: "t1".into(),
                value: 21.5
            })
        );
        assert_eq!(parse(r#"{"stats":"t1"}"#), Ok(Request::Stats("t1".into())));
        assert_eq!(parse(r#"{"sensors":{}}"#), Ok(Request::Sensors));
        for bad in [
            "nonsense",
            "{}",
            r#"{"record":{"sensor":"t1"}}"#,
            r#"{"stats":"../x"}"#,
            r#"{"stats":"a/b"}"#,
            r#"{"stats":""}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_configured_numbers_fall_back_to_the_default_with_a_warning() {
        assert_eq!(configured("n", Some("7".into()), 100, 1000), Ok(7));
        assert_eq!(configured("n", None, 100, 1000), Ok(100));
        for bad in ["0", "many", "5000", "-1"] {
            let (n, warning) = configured("max_readings", Some(bad.into()), 100, 1000).unwrap_err();
            assert_eq!(n, 100);
            assert!(
                warning.contains("max_readings")
                    && warning.contains(&format!("{bad:?}"))
                    && warning.contains("default, 100"),
                "{warning}"
            );
        }
    }
}
