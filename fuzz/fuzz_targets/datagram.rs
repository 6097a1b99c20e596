//! Any datagram on the shared socket, as the demultiplexer sorts it: what
//! it calls uTP decodes as a uTP header (it checked length, version and
//! type), what it calls an introduction decodes or is refused without a
//! panic, a relay frame that parses is rebuilt byte for byte, and what the
//! host sends encodes and decodes back.
#![no_main]

use grenache_host_fuzz::nat::wire;
use grenache_host_fuzz::transport::{classify, parse_relay_frame, relay_frame, Datagram};
use grenache_host_fuzz::utp::packet::{DecodeError, Packet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match classify(data) {
        Datagram::Utp => match Packet::decode(data) {
            Ok(_) | Err(DecodeError::Extension) => {}
            Err(e) => panic!("classified as uTP, yet {e}"),
        },
        Datagram::Introduction => {
            if let Ok(message) = wire::decode(data) {
                // Re-encoding can grow a message (escapes written out), past
                // the size limit: only what fits must come back the same.
                let again = wire::encode_padded(&message, wire::HOST_DATAGRAM_MIN);
                if again.len() <= wire::MAX_DATAGRAM {
                    assert_eq!(wire::decode(&again), Ok(message));
                }
            }
        }
        Datagram::Relay => {
            // A frame that parses is rebuilt byte for byte from its parts.
            if let Some(frame) = parse_relay_frame(data) {
                assert_eq!(relay_frame(frame.token, frame.addr, frame.payload), data);
            }
        }
        Datagram::Punch => assert_eq!(data, [0xC3, 0xBF]),
        Datagram::Garbage => {}
    }
});
