//! uTP packets as the socket's demultiplexer hands them over: decoding never
//! panics, and what decodes encodes to bytes that decode to the same packet,
//! up to what `encode` documents it normalises (the header's `extension`
//! byte is written from the selective ACK; a mask over 252 bytes is cut).
#![no_main]

use grenache_host_fuzz::utp::packet::Packet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut packet) = Packet::decode(data) else {
        return;
    };
    let mut encoded = Vec::new();
    packet.encode(&mut encoded);
    let again = Packet::decode(&encoded).expect("what we encode decodes");
    packet.header.extension = encoded[1];
    if let Some(sack) = packet.selective_ack.as_mut() {
        sack.mask.truncate(252);
    }
    assert_eq!(format!("{again:?}"), format!("{packet:?}"));
});
