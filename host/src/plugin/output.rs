//! Captures what a plugin writes to stdout and stderr.
//!
//! A plugin has no terminal of its own: its stdout must never mix with the
//! host's (for `invoke`, stdout is the reply), and a panic message on stderr
//! is the best explanation of a trap there is. Each request gets a fresh
//! bounded buffer; the host turns it into log lines prefixed with the
//! plugin's name, and quotes its last line in trap errors.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Most bytes of plugin output kept per request; the rest is dropped (and
/// counted) rather than trapping the plugin, so chatty plugins still work.
pub const MAX_CAPTURED_OUTPUT: usize = 64 * 1024;

/// One request's stdout+stderr, shared between the WASI streams and the host.
#[derive(Clone, Default)]
pub struct CapturedOutput {
    inner: Arc<Mutex<Captured>>,
}

#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    dropped: usize,
}

impl CapturedOutput {
    fn append(&self, data: &[u8]) {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let room = MAX_CAPTURED_OUTPUT.saturating_sub(c.bytes.len());
        let take = room.min(data.len());
        c.bytes.extend_from_slice(&data[..take]);
        c.dropped += data.len() - take;
    }

    /// The captured text as lines, plus how many bytes were dropped.
    pub fn lines(&self) -> (Vec<String>, usize) {
        let c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let text = String::from_utf8_lossy(&c.bytes);
        let lines = text
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        (lines, c.dropped)
    }

    /// The most telling line for a trap: Rust's panic message if there is one,
    /// else the last line written.
    pub fn panic_message(&self) -> Option<String> {
        let (lines, _) = self.lines();
        let panic_at = lines.iter().rposition(|l| l.contains("panicked at"))?;
        // Rust prints `thread '…' panicked at file:line:col:` then the message.
        let message = lines.get(panic_at + 1).map(String::as_str).unwrap_or("");
        Some(format!("{} {message}", lines[panic_at]).trim().to_string())
    }
}

impl IsTerminal for CapturedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CapturedOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for CapturedOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always accept: excess is dropped in `append`, never a trap.
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for CapturedOutput {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.append(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_lines_and_drops_the_excess_without_failing() {
        let out = CapturedOutput::default();
        out.append(b"first\nsecond\n");
        out.append(&vec![b'x'; MAX_CAPTURED_OUTPUT]);
        let (lines, dropped) = out.lines();
        assert_eq!(&lines[..2], ["first", "second"]);
        assert_eq!(dropped, 13);
    }

    #[test]
    fn finds_the_panic_message() {
        let out = CapturedOutput::default();
        out.append(b"working\nthread '<unnamed>' panicked at src/lib.rs:3:5:\nboom\nnote: run with RUST_BACKTRACE\n");
        assert_eq!(
            out.panic_message().unwrap(),
            "thread '<unnamed>' panicked at src/lib.rs:3:5: boom"
        );
    }
}
