//! Grape HTTP API requests as `grenache-host grape` reads them: any route
//! and body parse without panicking into a request or the reply a Grape
//! gives, and a value put comes back whole in `/get`'s reply, under the
//! target `/put` answers.
#![no_main]

use grenache_host_fuzz::grape_api::{self, FoundValue, GrapeRequest};
use libfuzzer_sys::fuzz_target;

const ROUTES: [&str; 6] = ["/announce", "/lookup", "/put", "/get", "/", "/put?x=1"];

fuzz_target!(|data: &[u8]| {
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    let route = ROUTES[route as usize % ROUTES.len()];
    let put = match grape_api::parse(route, body) {
        Err(reply) => {
            assert!(matches!(reply.status, 200 | 413 | 500), "{reply:?}");
            return;
        }
        Ok(GrapeRequest::Put(put)) => put,
        Ok(GrapeRequest::Announce { name, port }) => {
            assert!(!name.is_empty() && port != 0);
            return;
        }
        Ok(_) => return,
    };
    let target = put.target();
    let hash = grape_api::put_reply(Ok(target));
    let hash: serde_json::Value = serde_json::from_slice(&hash.body).expect("/put's reply is JSON");
    assert_eq!(hash.as_str().map(str::len), Some(40));
    let stored = put.stored();
    let reply = grape_api::get_reply(Some(FoundValue {
        id: target,
        value: stored.clone(),
    }));
    let got: serde_json::Value = serde_json::from_slice(&reply.body).expect("/get's reply is JSON");
    // A put's value is a JSON string, so UTF-8: it comes back unchanged.
    let v = std::str::from_utf8(&stored.value).expect("a put value is UTF-8");
    assert_eq!(got["v"].as_str(), Some(v));
    if let Some(signed) = stored.signed {
        assert_eq!(got["seq"].as_i64(), Some(signed.seq));
        assert_eq!(got["k"].as_str().map(str::len), Some(64));
    }
});
