//! The RPC stream decoder: arbitrary bytes, cut into arbitrary pieces, must
//! decode to the same messages as in one piece (or fail the same way), never
//! panic, and every message must parse as a request or reply or be refused.
#![no_main]

use grenache_host_fuzz::rpc::codec::{self, MessageDecoder};
use libfuzzer_sys::fuzz_target;

/// Small enough that the fuzzer reaches the size limit.
const MAX_MESSAGE: usize = 4096;

fn decode(pieces: &[&[u8]]) -> (Vec<String>, bool) {
    let mut decoder = MessageDecoder::new(MAX_MESSAGE);
    let mut messages = vec![];
    for piece in pieces {
        decoder.push(piece);
        loop {
            match decoder.next_message() {
                Ok(Some(value)) => {
                    let _ = codec::parse_request(&value);
                    let _ = codec::parse_reply(&value);
                    messages.push(value.get().to_string());
                }
                Ok(None) => break,
                Err(_) => return (messages, true),
            }
        }
    }
    (messages, false)
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks where to cut: every `step` bytes.
    let Some((&step, bytes)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let whole = decode(&[bytes]);
    let pieces: Vec<&[u8]> = bytes.chunks(step).collect();
    let cut = decode(&pieces);
    // In pieces a value can only end later, never differently.
    assert_eq!(whole.0, cut.0[..whole.0.len().min(cut.0.len())]);
    assert_eq!(whole, cut, "pieces of {step} bytes decode differently");
});
