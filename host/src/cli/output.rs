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
            "the payload is not valid JSON ({e}); quote it for the shell, e.g. '{{\"key\":1}}' or '\"text\"'"
        ))
    })
}

/// The payload argument of `call`, `bench` and `invoke`: JSON text as given,
/// `@FILE` for the contents of FILE, or `-` for standard input (as curl's
/// `--data`), at most `limit` bytes. A payload read from a file or stdin is
/// checked to be JSON here, so the error names where it came from; errors
/// return the usage exit code.
pub fn read_payload(arg: &str, limit: usize) -> Result<String, ExitCode> {
    use std::io::Read;
    let (source, reader): (String, Box<dyn Read>) = if arg == "-" {
        ("standard input".into(), Box::new(std::io::stdin()))
    } else if let Some(path) = arg.strip_prefix('@') {
        let file = std::fs::File::open(path)
            .map_err(|e| usage_error(format!("cannot read the payload file {path}: {e}")))?;
        (path.to_string(), Box::new(file))
    } else {
        return Ok(arg.to_string());
    };
    let mut bytes = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| usage_error(format!("cannot read the payload from {source}: {e}")))?;
    if bytes.len() > limit {
        return Err(usage_error(format!(
            "the payload in {source} is larger than {} (the largest Grenache message)",
            crate::units::format_size(limit as u64)
        )));
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| usage_error(format!("the payload in {source} is not UTF-8 text")))?;
    crate::plugin::check_json(&text)
        .map_err(|e| usage_error(format!("the payload in {source} is not valid JSON ({e})")))?;
    Ok(text)
}

/// Prints a JSON reply compactly on one line of stdout.
pub fn print_compact(reply: &str) -> Result<(), serde_json::Error> {
    let value: serde_json::Value = serde_json::from_str(reply)?;
    print_line(value);
    Ok(())
}

/// Prints a line on stdout; every command's stdout goes through here. When
/// the reader has gone (`grenache-host status | head -1`), the process ends
/// quietly, killed by SIGPIPE as Unix tools are, where `println!` would panic
/// with "failed printing to stdout: Broken pipe".
///
/// Why not simply restore SIGPIPE's default action at the start of main:
/// Rust ignores SIGPIPE so that a write to a socket whose peer has gone
/// returns an error; with the default action a vectored write (`writev`) to
/// such a socket kills the process, and a serving host must not die because
/// one peer left.
#[allow(clippy::print_stdout)]
pub fn print_line(line: impl std::fmt::Display) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => end_by_sigpipe(),
        Err(e) => {
            eprintln!("error: cannot write to stdout: {e}");
            std::process::exit(EXIT_USAGE.into());
        }
    }
}

/// Ends the process as SIGPIPE's default action does.
fn end_by_sigpipe() -> ! {
    // SAFETY: these change only how this process handles SIGPIPE, then send
    // it to the calling thread, which does not block it.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::raise(libc::SIGPIPE);
    }
    // Not reached: the signal ends the process.
    std::process::exit(EXIT_USAGE.into())
}

/// Prints `error: <message>` and returns the usage exit code.
pub fn usage_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_USAGE)
}
