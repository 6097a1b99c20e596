//! Sizes and durations as people write them (`64MiB`, `250ms`): one parser
//! each, shared by the command line and the policy file, and how messages
//! show a size.

use std::time::Duration;

/// Splits `64 MiB` into 64 and `MiB`; `None` without a leading number.
fn number_and_unit(text: &str) -> Option<(u64, &str)> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    Some((digits.parse().ok()?, unit.trim()))
}

/// Parses `123`, `64KiB`, `64MiB`, `1GiB` (also `KB`/`MB`/`GB`, read as the
/// binary units) into bytes.
///
/// Errors: no leading number, an unknown unit, zero, or more than `u64::MAX`
/// bytes; each message shows a valid example.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let (n, unit) = number_and_unit(text)
        .ok_or_else(|| format!("{text:?} is not a size; write e.g. 64MiB, 512KiB or 1GiB"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?}; use KiB, MiB or GiB"
            ))
        }
    };
    let bytes = n
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    if bytes == 0 {
        return Err(format!("{text:?}: a size must be more than zero"));
    }
    Ok(bytes)
}

/// Shows a size in the largest binary unit it reaches, with at most one
/// decimal: `64 KiB`, `1.1 MiB`, `512 bytes`. Rounded up, so a size shown is
/// never less than the real one ("needs at least 1.1 MiB" is true).
pub fn format_size(bytes: u64) -> String {
    let (shift, unit) = match bytes {
        b if b >= 1 << 30 => (30, "GiB"),
        b if b >= 1 << 20 => (20, "MiB"),
        b if b >= 1 << 10 => (10, "KiB"),
        b => return format!("{b} bytes"),
    };
    let tenths = (u128::from(bytes) * 10).div_ceil(1 << shift);
    match tenths % 10 {
        0 => format!("{} {unit}", tenths / 10),
        tenth => format!("{}.{tenth} {unit}", tenths / 10),
    }
}

/// Parses `250ms`, `5s`, `2m` (a bare number is seconds) into a duration.
///
/// Errors: no leading number, an unknown unit, or zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (n, unit) = number_and_unit(text)
        .ok_or_else(|| format!("{text:?} is not a duration; write e.g. 250ms, 5s or 2m"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" | "min" => Duration::from_secs(n.saturating_mul(60)),
        other => {
            return Err(format!(
                "unknown duration unit {other:?} in {text:?}; use ms, s or m"
            ))
        }
    };
    if d.is_zero() {
        return Err(format!("{text:?}: a duration must be more than zero"));
    }
    Ok(d)
}

/// Waits until `check` holds, polling every 10 ms, and fails the test
/// naming `what` if it does not within `within` (tests wait for conditions,
/// never a bare sleep).
#[cfg(test)]
pub async fn eventually(what: &str, within: Duration, check: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "never within {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_shown_in_messages() {
        assert_eq!(format_size(512), "512 bytes");
        assert_eq!(format_size(64 << 10), "64 KiB");
        assert_eq!(format_size(64 << 20), "64 MiB");
        assert_eq!(format_size(3 << 30), "3 GiB");
        // The fibonacci plugin's own memory: 1.0625 MiB, shown rounded up.
        assert_eq!(format_size(1_114_112), "1.1 MiB");
        assert_eq!(format_size((1 << 20) + 1), "1.1 MiB");
        assert_eq!(format_size((3 << 20) / 2), "1.5 MiB");
        assert_eq!(format_size(u64::MAX), "17179869184 GiB");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1gib"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("lots").unwrap_err().contains("64MiB"));
        assert!(parse_size("5TiB").unwrap_err().contains("unit"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }
}

/// A token bucket: at most `burst` events at once, refilled at `rate` per
/// second; a state machine over the time it is given. Shared by the
/// introducer's and the plugins' rate limits.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    refilled: std::time::Instant,
    rate: f64,
    burst: f64,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(now: std::time::Instant, rate: u32, burst: u32) -> Self {
        TokenBucket {
            tokens: f64::from(burst),
            refilled: now,
            rate: f64::from(rate),
            burst: f64::from(burst),
        }
    }

    fn refill(&mut self, now: std::time::Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.refilled = now;
    }

    /// Whether a token is there at `now` (without taking it).
    pub fn has(&mut self, now: std::time::Instant) -> bool {
        self.has_many(now, 1)
    }

    /// Whether `n` tokens are there at `now` (without taking them).
    pub fn has_many(&mut self, now: std::time::Instant, n: u32) -> bool {
        self.refill(now);
        self.tokens >= f64::from(n)
    }

    /// Takes a token at `now`; `false` (and nothing taken) when empty.
    pub fn take(&mut self, now: std::time::Instant) -> bool {
        self.take_many(now, 1)
    }

    /// Takes `n` tokens at `now` (a bucket counting bytes, say); `false`
    /// (and nothing taken) when fewer are there.
    pub fn take_many(&mut self, now: std::time::Instant, n: u32) -> bool {
        self.refill(now);
        if self.tokens < f64::from(n) {
            return false;
        }
        self.tokens -= f64::from(n);
        true
    }

    /// When the bucket was last used.
    pub fn last_used(&self) -> std::time::Instant {
        self.refilled
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decodes hex (either case); `None` for odd lengths or other characters.
pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Removes the entry with the oldest time while `map` has `limit` entries
/// or more, so one more fits; returns the keys removed. Shared by the
/// bounded tables of discovery, the RPC client's peer health, a host's
/// introduced and relayed paths and [`TokenBuckets`].
pub fn evict_oldest<K: Clone + Eq + std::hash::Hash, V>(
    map: &mut std::collections::HashMap<K, V>,
    limit: usize,
    time: impl Fn(&V) -> std::time::Instant,
) -> Vec<K> {
    let mut removed = vec![];
    while map.len() >= limit {
        let Some(oldest) = map
            .iter()
            .min_by_key(|(_, v)| time(v))
            .map(|(k, _)| k.clone())
        else {
            break;
        };
        map.remove(&oldest);
        removed.push(oldest);
    }
    removed
}

/// A [`TokenBucket`] per key (a source IP, a target), all with one rate and
/// burst, at most `max` keys: the least recently used is forgotten first
/// (O(log n): the keys are also kept in order of last use). A new key's
/// bucket starts full. Shared by the introducer's and the DHT node's rate
/// limits.
#[derive(Debug)]
pub struct TokenBuckets<K> {
    buckets: std::collections::HashMap<K, TokenBucket>,
    /// Every key by its bucket's last use, least recent first.
    order: std::collections::BTreeSet<(std::time::Instant, K)>,
    rate: u32,
    burst: u32,
    max: usize,
}

impl<K: Clone + Eq + Ord + std::hash::Hash> TokenBuckets<K> {
    /// No buckets yet.
    pub fn new(rate: u32, burst: u32, max: usize) -> Self {
        TokenBuckets {
            buckets: std::collections::HashMap::new(),
            order: std::collections::BTreeSet::new(),
            rate,
            burst,
            max,
        }
    }

    /// Takes `n` tokens from `key`'s bucket at `now` (see
    /// [`TokenBucket::take_many`]).
    pub fn take_many(&mut self, key: K, now: std::time::Instant, n: u32) -> bool {
        let bucket = match self.buckets.get_mut(&key) {
            Some(bucket) => {
                self.order.remove(&(bucket.last_used(), key.clone()));
                bucket
            }
            None => {
                while self.buckets.len() >= self.max.max(1) {
                    let Some((_, oldest)) = self.order.pop_first() else {
                        break;
                    };
                    self.buckets.remove(&oldest);
                }
                let bucket = TokenBucket::new(now, self.rate, self.burst);
                self.buckets.entry(key.clone()).or_insert(bucket)
            }
        };
        let taken = bucket.take_many(now, n);
        let used = bucket.last_used();
        self.order.insert((used, key));
        taken
    }

    /// Takes one token from `key`'s bucket at `now`.
    pub fn take(&mut self, key: K, now: std::time::Instant) -> bool {
        self.take_many(key, now, 1)
    }

    /// Keys tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod bucket_tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn buckets_forget_the_least_recently_used_first() {
        let t0 = Instant::now();
        let mut buckets = TokenBuckets::new(10, 40, 2);
        assert!((0..40).all(|_| buckets.take(1u32, t0)));
        assert!(!buckets.take(1, t0));
        assert!(buckets.take(2, t0));
        // Key 2 was used last: key 1 goes for key 3.
        assert!(buckets.take(3, t0 + Duration::from_millis(1)));
        assert_eq!(buckets.len(), 2);
        // Key 1 was forgotten: it starts again.
        let t1 = t0 + Duration::from_millis(2);
        assert!(buckets.take(1, t1));
        assert_eq!(buckets.len(), 2);
        assert!(buckets.take(3, t1), "key 3 was kept");
    }
}
