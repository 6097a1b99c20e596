//! KRPC datagrams as the `dht` node reads them: decoding never panics, and
//! what decodes as a response survives our own encoder: the same `t`, node
//! id and compact nodes come back.
#![no_main]

use grenache_host_fuzz::krpc::{self, Body, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(Message::Response { t, id, nodes }) = krpc::decode(data) else {
        return;
    };
    let requester = std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 1);
    let body = Body {
        id,
        nodes: Some(krpc::compact_nodes(&nodes)),
        ..Body::default()
    };
    let again = krpc::decode(&krpc::response(&t, requester, body));
    assert_eq!(again, Ok(Message::Response { t, id, nodes }));
});
