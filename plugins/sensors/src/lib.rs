//! `sensor_gateway`: a sensor gateway that keeps readings in its plugin
//! state (grenache:plugin@0.4.0) and answers statistics about them.
//!
//! Requests (JSON):
//! - `{"record":{"sensor":"t1","value":21.5}}` keeps a reading, stamped with
//!   the time it arrived; answers `{"sensor":"t1","count":N}`.
//! - `{"stats":"t1"}` answers `{"sensor":"t1","count":N,"min":…,"max":…,
//!   "mean":…,"last":…}` over the readings kept; an error when there are none.
//! - `{"sensors":{}}` answers the names of the sensors with readings.
//!
//! Each sensor's readings are one state key, `sensor/<name>`, holding
//! `[[unix_ms, value], …]`, oldest first. The operator's configuration
//! (`[plugin.sensors.config]` in the policy) bounds them: `max_readings`
//! per sensor (default 100; the oldest go first) and `retention_s`
//! (default 86400): every tick (each second, unless the policy's
//! `tick_interval` says otherwise) drops the readings older than that.
//!
//! The state outlives the plugin's versions and the host's restarts: a swap
//! to a new version of this plugin keeps every reading.

/// The Grenache service name this plugin answers.
pub const SERVICE: &str = "sensor_gateway";
/// How often the plugin asks to be ticked, in milliseconds.
pub const TICK_INTERVAL_MS: u32 = 1000;
/// Readings kept per sensor unless `max_readings` says otherwise.
pub const DEFAULT_MAX_READINGS: usize = 100;
/// The most `max_readings` may be: a sensor's readings are one state value.
pub const MAX_READINGS_LIMIT: usize = 10_000;
/// Seconds a reading is kept unless `retention_s` says otherwise: a day.
pub const DEFAULT_RETENTION_S: u64 = 86_400;
/// Longest sensor name, in bytes.
pub const MAX_SENSOR_NAME: usize = 64;
/// The state key prefix of every sensor's readings.
pub const KEY_PREFIX: &str = "sensor/";

use serde_json::{json, Value};

/// One sensor's readings, oldest first: `(unix_ms, value)`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Readings(pub Vec<(u64, f64)>);

impl Readings {
    /// Reads the state value of a sensor (`[[unix_ms, value], …]`).
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let list: Vec<(u64, f64)> = serde_json::from_slice(bytes)
            .map_err(|e| format!("stored readings are not valid: {e}"))?;
        Ok(Readings(list))
    }

    /// The state value of these readings.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&self.0).expect("numbers serialize")
    }

    /// Adds a reading at `now_ms`, dropping the oldest beyond `max`.
    pub fn record(&mut self, now_ms: u64, value: f64, max: usize) {
        self.0.push((now_ms, value));
        let excess = self.0.len().saturating_sub(max.max(1));
        self.0.drain(..excess);
    }

    /// Drops the readings taken before `oldest_ms`; whether any was dropped.
    pub fn prune(&mut self, oldest_ms: u64) -> bool {
        let before = self.0.len();
        self.0.retain(|(at, _)| *at >= oldest_ms);
        self.0.len() != before
    }

    /// Count, min, max, mean and last value, as the answer to `stats`.
    pub fn stats(&self, sensor: &str) -> Result<Value, String> {
        let values: Vec<f64> = self.0.iter().map(|(_, v)| *v).collect();
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

/// A configuration value as a number within `1..=limit`, or `default`.
pub fn configured(value: Option<String>, default: u64, limit: u64) -> u64 {
    value
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|n| (1..=limit).contains(n))
        .unwrap_or(default)
}

#[cfg(target_arch = "wasm32")]
mod bindings {
    wit_bindgen::generate!({ path: "../../wit", world: "plugin" });

    use super::{configured, parse, Readings, Request, KEY_PREFIX};
    use exports::grenache::plugin::service::{Guest, PluginManifest, RequestContext};
    use grenache::plugin::config;
    use grenache::plugin::host::log;
    use grenache::plugin::state::{self, StateError};
    use grenache::plugin::types::Level;

    struct Sensors;

    fn describe(e: StateError) -> String {
        match e {
            StateError::QuotaExceeded(m) => format!("the gateway's storage is full: {m}"),
            StateError::Invalid(m) => format!("cannot store that: {m}"),
            StateError::Unavailable(m) => format!("the gateway has no storage: {m}"),
        }
    }

    fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    fn load(key: &str) -> Result<Readings, String> {
        match state::get(key).map_err(describe)? {
            Some(bytes) => Readings::decode(&bytes),
            None => Ok(Readings::default()),
        }
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
                        config::get("max_readings"),
                        super::DEFAULT_MAX_READINGS as u64,
                        super::MAX_READINGS_LIMIT as u64,
                    ) as usize;
                    let key = format!("{KEY_PREFIX}{sensor}");
                    let mut readings = load(&key)?;
                    readings.record(now_ms(), value, max);
                    state::set(&key, &readings.encode()).map_err(describe)?;
                    Ok(
                        serde_json::json!({"sensor": sensor, "count": readings.0.len()})
                            .to_string(),
                    )
                }
                Request::Stats(sensor) => {
                    let readings = load(&format!("{KEY_PREFIX}{sensor}"))?;
                    readings.stats(&sensor).map(|v| v.to_string())
                }
                Request::Sensors => {
                    let keys = state::list_keys(KEY_PREFIX).map_err(describe)?;
                    let names: Vec<&str> = keys
                        .iter()
                        .filter_map(|k| k.strip_prefix(KEY_PREFIX))
                        .collect();
                    Ok(serde_json::json!(names).to_string())
                }
            }
        }

        fn on_tick() -> Result<(), String> {
            let retention_s = configured(
                config::get("retention_s"),
                super::DEFAULT_RETENTION_S,
                u64::MAX / 1000,
            );
            let oldest = now_ms().saturating_sub(retention_s * 1000);
            for key in state::list_keys(KEY_PREFIX).map_err(describe)? {
                let mut readings = load(&key)?;
                if !readings.prune(oldest) {
                    continue;
                }
                if readings.0.is_empty() {
                    state::delete(&key).map_err(describe)?;
                    log(Level::Info, &format!("{key}: every reading expired"));
                } else {
                    state::set(&key, &readings.encode()).map_err(describe)?;
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
    fn readings_are_bounded_and_the_oldest_go_first() {
        let mut r = Readings::default();
        for (i, v) in [1.0, 2.0, 3.0, 4.0].into_iter().enumerate() {
            r.record(i as u64, v, 3);
        }
        assert_eq!(r.0, [(1, 2.0), (2, 3.0), (3, 4.0)]);
        assert_eq!(Readings::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn stats_are_count_min_max_mean_last() {
        let r = Readings(vec![(0, 21.5), (1, 19.0), (2, 23.0), (3, 20.5)]);
        assert_eq!(
            r.stats("t1").unwrap(),
            json!({"sensor":"t1","count":4,"min":19.0,"max":23.0,"mean":21.0,"last":20.5})
        );
        assert!(Readings::default()
            .stats("t1")
            .unwrap_err()
            .contains("no readings"));
    }

    #[test]
    fn pruning_drops_what_is_older_than_the_retention() {
        let mut r = Readings(vec![(10, 1.0), (20, 2.0), (30, 3.0)]);
        assert!(r.prune(20));
        assert_eq!(r.0, [(20, 2.0), (30, 3.0)]);
        assert!(!r.prune(20));
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
            r#"{"stats":""}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn configured_numbers_fall_back_to_the_default() {
        assert_eq!(configured(Some("7".into()), 100, 1000), 7);
        assert_eq!(configured(Some("0".into()), 100, 1000), 100);
        assert_eq!(configured(Some("many".into()), 100, 1000), 100);
        assert_eq!(configured(Some("5000".into()), 100, 1000), 100);
        assert_eq!(configured(None, 100, 1000), 100);
    }
}
