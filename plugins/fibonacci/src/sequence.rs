//! The Fibonacci sequence as `fibonacci_worker` answers it, without the
//! host: also compiled into the `broker-worker` test plugin (by `#[path]`),
//! which serves the same service through a broker.

/// Largest integer every JSON consumer reads exactly (JavaScript's
/// `Number.MAX_SAFE_INTEGER`).
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Longest sequence whose terms all stay within [`MAX_SAFE_INTEGER`].
pub const MAX_LENGTH: u64 = 78;

/// Answers one request: parses `{"length": n}` and returns the sequence as
/// JSON text, or a message saying what is wrong with the request.
pub fn answer(payload: &str) -> Result<String, String> {
    let length = parse_length(payload)?;
    let terms = sequence(length)?;
    Ok(serde_json::Value::from(terms).to_string())
}

fn parse_length(payload: &str) -> Result<u64, String> {
    const USAGE: &str = r#"send {"length": n} with n a whole number from 0 to 78"#;
    let value: serde_json::Value =
        serde_json::from_str(payload).map_err(|e| format!("payload is not JSON ({e}); {USAGE}"))?;
    let length = value
        .get("length")
        .ok_or_else(|| format!("missing \"length\"; {USAGE}"))?;
    match length.as_u64() {
        Some(n) => Ok(n),
        None if length.as_i64().is_some() => Err(format!("length {length} is negative; {USAGE}")),
        None => Err(format!("length {length} is not a whole number; {USAGE}")),
    }
}

/// The first `length` terms of the sequence with `f(0) = f(1) = 1`.
///
/// Refuses lengths whose terms would exceed [`MAX_SAFE_INTEGER`].
pub fn sequence(length: u64) -> Result<Vec<u64>, String> {
    if length > MAX_LENGTH {
        return Err(format!(
            "length {length} is too large: term {length} would exceed 2^53-1, the largest integer \
             every JSON consumer reads exactly; the largest length is {MAX_LENGTH}"
        ));
    }
    let mut terms = Vec::with_capacity(length as usize);
    let (mut a, mut b) = (1u64, 1u64);
    for _ in 0..length {
        terms.push(a);
        (a, b) = (b, a + b);
    }
    Ok(terms)
}
