//! How the commands report: exit codes, one-line errors and compact JSON
//! replies on stdout. Exit codes are part of the interface: 0 success, 1 the
//! service answered with an error (or failed while answering), 2 the command
//! could not run as asked (bad arguments, a plugin that does not load,
//! invalid JSON).

use std::process::ExitCode;

/// Exit code for "the service answered with an error".
pub const EXIT_SERVICE_ERROR: u8 = 1;
/// Exit code for "the command could not run as asked".
pub const EXIT_USAGE: u8 = 2;

/// Refuses a payload that is not JSON before anything runs (usage exit code).
pub fn check_payload(payload: &str) -> Result<(), ExitCode> {
    crate::plugin::check_json(payload).map_err(|e| {
        usage_error(format!(
            "the payload is not valid JSON ({e}); quote it for the shell, e.g. '{{\"length\":10}}'"
        ))
    })
}

/// Prints a JSON reply compactly on one line of stdout.
pub fn print_compact(reply: &str) -> Result<(), serde_json::Error> {
    let value: serde_json::Value = serde_json::from_str(reply)?;
    println!("{value}");
    Ok(())
}

/// Prints `error: <message>` and returns the usage exit code.
pub fn usage_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_USAGE)
}
