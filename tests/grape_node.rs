//! `grenache-host grape`, our Grape-compatible node, with the real Node
//! packages: grenache-nodejs-link 1.0.2 and 0.7.13 use it as they use a
//! grenache-grape, Node services and our hosts find each other through two
//! of them, and its HTTP answers match a real grenache-grape 1.0.0's byte for
//! byte, except where docs/wire.md §6 says ours differs on purpose.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::grape_node::{
    link_once, node_link, post, request, start_grape, start_node_grape, wait_for_lookup, Answer,
};
use common::krpc::{bytes_of, error_code, key, loopback, sub, Krpc};
use common::{call, node_peer, start_host, test_plugin, SOON};

const LINKS: [&str; 2] = ["1.0.2", "0.7.13"];

#[test]
fn node_links_announce_look_up_put_and_get_through_our_grape() {
    let grape = start_grape("grape", &[]);
    for version in LINKS {
        let name = format!("svc_{}", version.replace('.', "_"));
        let _service = node_link(
            "node service",
            version,
            &grape.url,
            &["announce", &name, "4444"],
        );
        wait_for_lookup(version, &grape.url, &name, &["127.0.0.1:4444".into()], SOON);
        assert_eq!(
            link_once(version, &grape.url, &["lookup", "nobody_serves_this"]),
            "lookup error ERR_GRAPE_LOOKUP_EMPTY"
        );
        assert_eq!(
            link_once(version, &grape.url, &["put", "hello world"]),
            r#"put "6d33adc2b6b2c14c3036feefb7fedbca1a880527""#
        );
        let got = link_once(
            version,
            &grape.url,
            &["get", "6d33adc2b6b2c14c3036feefb7fedbca1a880527"],
        );
        let value: serde_json::Value = serde_json::from_str(got.strip_prefix("get ").unwrap())
            .unwrap_or_else(|e| panic!("{got}: {e}"));
        assert_eq!(value["v"], "hello world", "{got}");
        assert_eq!(value["token"], serde_json::Value::Null, "{got}");
        assert_eq!(value["id"].as_str().unwrap().len(), 40, "{got}");
    }
}

#[test]
fn node_services_and_our_hosts_find_each_other_through_two_grapes() {
    let a = start_grape("grape A", &[]);
    let b = start_grape("grape B", &["--bn", &a.dht]);

    // A Node worker (uTP, as Grenache's examples) announced through A...
    let worker = node_peer("node worker", &["serve"]);
    let port = worker
        .wait_for("listening on ", SOON)
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string();
    let _announcing = node_link(
        "node worker's link",
        "1.0.2",
        &a.url,
        &["announce", "fibonacci_worker", &port],
    );
    // ...is found through B by a Node link...
    let worker_addr = format!("127.0.0.1:{port}");
    wait_for_lookup("0.7.13", &b.url, "fibonacci_worker", &[worker_addr], SOON);
    // ...and by our host on the DHT, which calls it.
    let r = call(
        &b.dht,
        "fibonacci_worker",
        r#"{"length":10}"#,
        &["--introducer", "off"],
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, worker.output());
    assert_eq!(r.stdout, "[1,1,2,3,5,8,13,21,34,55]\n");
    worker.wait_for(r#"request fibonacci_worker {"length":10}"#, SOON);

    // A service our host announces on the DHT through A is found by a Node
    // link through B.
    let (_host, host_port) = start_host(
        "host",
        &[&test_plugin("rpc-test")],
        &a.dht,
        &["--introducer", "off"],
    );
    let host_addr = format!("127.0.0.1:{host_port}");
    wait_for_lookup("1.0.2", &b.url, "rpc_test", &[host_addr], SOON);

    // A value put through A is got through B, from the DHT; its key is
    // sha1 of its bencoding.
    let key = sha1_hex("13:across grapes");
    assert_eq!(
        link_once("1.0.2", &a.url, &["put", "across grapes"]),
        format!("put \"{key}\"")
    );
    let got = link_once("0.7.13", &b.url, &["get", &key]);
    assert!(got.contains(r#""v":"across grapes""#), "{got}");
}

fn sha1_hex(text: &str) -> String {
    sha1_smol::Sha1::from(text).digest().to_string()
}

/// A `/lookup` body of exactly `len` bytes.
fn padded(len: usize) -> String {
    let body = format!(r#"{{"data":"{}"}}"#, "x".repeat(len - 11));
    assert_eq!(body.len(), len);
    body
}

/// The request cases of grenache-wire.md §1.3–§1.5 on which ours answers
/// exactly what grenache-grape 1.0.0 answers: (method, path, body).
fn same_answer_cases() -> Vec<(&'static str, &'static str, String)> {
    let post = |path: &'static str, body: &str| ("POST", path, body.to_string());
    vec![
        post("/lookup", "not json"),
        post("/lookup", ""),
        post("/nope", "{}"),
        post("/", r#"{"data":"x"}"#),
        post("/lookup", r#"{"data":""}"#),
        post("/lookup", r#"{"data":42}"#),
        post("/lookup", "42"),
        post("/announce", r#"{"data":"x"}"#),
        post("/announce", r#"{"data":{}}"#),
        post("/announce", r#"{"data":["x","5555"]}"#),
        post("/announce", r#"{"data":["x",5555.5]}"#),
        post("/announce", r#"{"data":["x"]}"#),
        post("/put", r#"{"data":{}}"#),
        post("/get", r#"{"data":42}"#),
        post("/get", r#"{"data":{}}"#),
        post("/get", r#"{"data":"zz"}"#),
        post(
            "/get",
            r#"{"data":"0000000000000000000000000000000000000000"}"#,
        ),
        // Routing: only the first letter is case-insensitive; the query
        // string is part of the route; separators vanish; any method.
        post("/Announce", r#"{"data":"x"}"#),
        post("/LOOKUP", r#"{"data":"x"}"#),
        post("/lookup?x=1", r#"{"data":"x"}"#),
        post("/lookup_", r#"{"data":""}"#),
        ("GET", "/lookup", r#"{"data":""}"#.into()),
        ("PUT", "/Get", r#"{"data":42}"#.into()),
        // The limit (8192 on both): one byte over, and exactly at it.
        post("/lookup", &padded(8193)),
        post("/lookup", &padded(8192)),
    ]
}

#[test]
fn our_grape_answers_http_errors_byte_for_byte_as_grenache_grape() {
    let (_node_grape, theirs) =
        start_node_grape("grenache-grape", &["--check_maxPayloadSize", "8192"]);
    let ours = start_grape("grape", &["--check_maxPayloadSize", "8192"]);
    let ask = |url: &str, method: &str, path: &str, body: &str| -> Answer {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        request(method, url, path, body.as_bytes().to_vec())
            .unwrap_or_else(|| panic!("{url} did not answer {path}"))
    };
    for (method, path, body) in same_answer_cases() {
        let shown = format!("{method} {path} {:.60}", body);
        let expected = ask(&theirs, method, path, &body);
        let answer = ask(&ours.url, method, path, &body);
        assert_eq!(answer, expected, "{shown}");
        assert!(!answer.content_type, "{shown}: no Content-Type, as grape");
    }
    // Spot checks of what they agreed on (grenache-wire.md TV-12).
    let answer = ask(&ours.url, "POST", "/lookup", "not json");
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (500, "ERR_GRAPE_PAYLOAD_INVALID")
    );
    let answer = ask(&ours.url, "POST", "/lookup", &padded(8193));
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (413, "ERR_GRAPE_PAYLOAD_SIZE")
    );

    // Where ours differs on purpose (docs/wire.md §6.1): grape throws a
    // JavaScript TypeError (500 with its text), ours answers the endpoint's
    // error string.
    for (path, body, ours_says) in [
        ("/lookup", "null", r#""ERR_GRAPE_LOOKUP""#),
        (
            "/announce",
            r#"{"data":[123,5555]}"#,
            r#""ERR_GRAPE_ANNOUNCE""#,
        ),
        ("/put", r#"{"data":null}"#, r#""opts.v not given""#),
        ("/get", r#"{"data":null}"#, r#""ERR_GRAPE_GENERIC""#),
    ] {
        assert_eq!(
            ask(&theirs, "POST", path, body).status,
            500,
            "grape {path} {body}"
        );
        let answer = ask(&ours.url, "POST", path, body);
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (200, ours_says),
            "{path} {body}"
        );
    }
    // Ports: grape announces port 0 as its DHT port and takes out-of-range
    // ones (a lone grape then says "No nodes to query"); ours refuses them.
    for port in ["0", "-5", "70000"] {
        let body = format!(r#"{{"data":["x",{port}]}}"#);
        let grape_says = ask(&theirs, "POST", "/announce", &body);
        assert_eq!(
            grape_says.body, r#""No nodes to query""#,
            "grape port {port}"
        );
        let answer = ask(&ours.url, "POST", "/announce", &body);
        assert_eq!(answer.body, r#""ERR_GRAPE_SERVICE_PORT""#, "port {port}");
    }
    // A lone grape stores nothing without -b; ours stores the announce on
    // its own DHT node and says so.
    let body = r#"{"data":["lone_svc",5555]}"#;
    assert_eq!(
        ask(&theirs, "POST", "/announce", body).body,
        r#""No nodes to query""#
    );
    assert_eq!(ask(&ours.url, "POST", "/announce", body).body, "1");
}

#[test]
fn an_announce_expires_after_the_peer_max_age() {
    let max_age = Duration::from_millis(3000);
    let a = start_grape("grape A", &["--dpa", "3000"]);
    let b = start_grape("grape B", &["--bn", &a.dht]);
    let lookup = |url: &str| {
        post(url, "/lookup", r#"{"data":"short_lived"}"#)
            .unwrap()
            .body
    };
    let announce = || post(&a.url, "/announce", r#"{"data":["short_lived",5555]}"#).unwrap();

    // Taken before the request: the grape dates the announce after it.
    let announced = Instant::now();
    assert_eq!(announce().body, "1");
    assert_eq!(lookup(&a.url), r#"["127.0.0.1:5555"]"#);
    let deadline = announced + max_age + SOON;
    while lookup(&a.url) != "[]" {
        assert!(
            Instant::now() < deadline,
            "still there after {max_age:?} and more"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        announced.elapsed() >= max_age,
        "expired after {:?}, before the max age",
        announced.elapsed()
    );
    // Another grape still finds it: B's DHT node keeps it for B's own peer
    // age (120 s), and only the grape that received it knows it expired
    // (docs/wire.md §6.1).
    assert_eq!(lookup(&b.url), r#"["127.0.0.1:5555"]"#);
    // Announced again, it is back.
    assert_eq!(announce().body, "1");
    assert_eq!(lookup(&a.url), r#"["127.0.0.1:5555"]"#);
}

#[test]
fn our_grapes_dht_node_speaks_bep_5_with_2_byte_ids_and_forgets_announces() {
    // The grape's DHT port is our own BEP 5 node: a raw client with a
    // 2-byte transaction id (grenache-grape's k-rpc sends those) is
    // answered; announces need this IP's token and a port, and live
    // `--dpa` after the last one.
    let max_age = Duration::from_millis(1500);
    let grape = start_grape("grape", &["--dpa", "1500"]);
    let client = Krpc::new(Ipv4Addr::LOCALHOST, &grape.dht);
    let pong = client
        .ask(b"aa", "ping", vec![])
        .expect("a 2-byte ping is answered");
    assert_eq!(bytes_of(sub(&pong, "r"), "id").len(), 20);
    let service = key("krpc_short_lived");
    let (_, token) = client.get_peers(service);
    let forged = client.announce(service, 4100, b"a token of our own");
    assert_eq!(error_code(&forged), Some(203), "{forged:?}");
    let port0 = client.announce(service, 0, &token);
    assert_eq!(error_code(&port0), Some(203), "{port0:?}");
    let announced = Instant::now();
    let taken = client.announce(service, 4100, &token);
    assert_eq!(error_code(&taken), None, "{taken:?}");
    assert_eq!(client.get_peers(service).0, vec![loopback(4100)]);
    let deadline = announced + max_age + SOON;
    while !client.get_peers(service).0.is_empty() {
        assert!(
            Instant::now() < deadline,
            "still stored after {:?}",
            announced.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        announced.elapsed() >= max_age,
        "gone after {:?}",
        announced.elapsed()
    );

    // A real grenache-grape joins it and announces there what a Node
    // service announces to it (its DHT key is the raw name: 20 bytes).
    let (_node_grape, url) = start_node_grape("grenache-grape", &["--bn", &grape.dht]);
    let name = "svc_via_our_grape_dp";
    let _service = node_link("node service", "1.0.2", &url, &["announce", name, "4444"]);
    let raw_key: [u8; 20] = name.as_bytes().try_into().unwrap();
    let deadline = Instant::now() + SOON;
    while client.get_peers(raw_key).0 != vec![loopback(4444)] {
        assert!(
            Instant::now() < deadline,
            "the Node grape never announced on our grape's DHT port"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_value_put_through_one_grape_is_got_through_another() {
    // Immutable values travel through the DHT: B's query node gets it from
    // A's DHT node, which keeps what A's HTTP clients put.
    let a = start_grape("grape A", &[]);
    let b = start_grape("grape B", &["--bn", &a.dht]);
    let put = post(&a.url, "/put", r#"{"data":{"v":"shared value"}}"#).unwrap();
    let hash = put.body.trim_matches('"').to_string();
    assert_eq!(hash, sha1_hex("12:shared value"));
    let got = post(&b.url, "/get", &format!(r#"{{"data":"{hash}"}}"#)).unwrap();
    let got: serde_json::Value =
        serde_json::from_str(&got.body).unwrap_or_else(|e| panic!("{}: {e}", got.body));
    assert_eq!(got["v"], "shared value");
}

#[test]
fn a_signed_mutable_value_is_checked_and_got_back() {
    use ed25519_dalek::{Signer, SigningKey};
    let grape = start_grape("grape", &[]);
    let key = SigningKey::from_bytes(&[5; 32]);
    let public = hex(key.verifying_key().as_bytes());
    // BEP 44: the signature covers the bencoded salt, seq and v entries.
    let signature = key.sign(b"4:salt6:foobar3:seqi1e1:v12:Hello World!");
    let put = |signature: &str| {
        let body = format!(
            r#"{{"data":{{"v":"Hello World!","k":"{public}","sig":"{signature}","seq":1,"salt":"foobar"}}}}"#
        );
        post(&grape.url, "/put", &body).unwrap().body
    };
    let mut tampered = signature.to_bytes();
    tampered[0] ^= 1;
    assert_eq!(put(&hex(&tampered)), r#""All queries failed""#);

    let mut target = key.verifying_key().to_bytes().to_vec();
    target.extend_from_slice(b"foobar");
    let target = sha1_smol::Sha1::from(&target).digest().to_string();
    assert_eq!(put(&hex(&signature.to_bytes())), format!("\"{target}\""));
    let got = post(&grape.url, "/get", &format!(r#"{{"data":"{target}"}}"#)).unwrap();
    let got: serde_json::Value = serde_json::from_str(&got.body).unwrap();
    assert_eq!(got["v"], "Hello World!");
    assert_eq!(got["seq"], 1);
    assert_eq!(got["k"], public.as_str());
    assert_eq!(got["sig"], hex(&signature.to_bytes()).as_str());
    assert_eq!(got["salt"], "foobar");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_grape_without_b_lists_an_announce_only_under_its_callers_address() {
    // Without -b, the first grape reaches its own DHT node at the address
    // that routes outwards (not loopback, on a machine with a network):
    // what its query node announces there must not become a second,
    // unreachable address of the service.
    let first = common::HostProcess::spawn(
        "grape without -b",
        &[
            "grape",
            "--dp",
            "0",
            "--aph",
            "0",
            "--introducer-port",
            "off",
        ],
    );
    let last_word = |line: String| line.rsplit(' ').next().unwrap().to_string();
    let dht_port = last_word(first.wait_for("grape dht listening on ", SOON))
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let http_port = last_word(first.wait_for("grape http listening on ", SOON))
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let url = format!("http://127.0.0.1:{http_port}");
    let second = start_grape("second grape", &["--bn", &format!("127.0.0.1:{dht_port}")]);
    let announce = || post(&url, "/announce", r#"{"data":["one_address",5555]}"#).unwrap();
    let lookup = |url: &str| {
        post(url, "/lookup", r#"{"data":"one_address"}"#)
            .unwrap()
            .body
    };
    assert_eq!(announce().body, "1");
    let deadline = Instant::now() + SOON;
    while lookup(&second.url) != r#"["127.0.0.1:5555"]"# {
        assert!(Instant::now() < deadline, "{}", lookup(&second.url));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Announced again (a Link does every second): still one address, on
    // both grapes and on the first grape's own DHT node.
    for _ in 0..3 {
        assert_eq!(announce().body, "1");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(lookup(&url), r#"["127.0.0.1:5555"]"#);
        assert_eq!(lookup(&second.url), r#"["127.0.0.1:5555"]"#);
    }
    let client = Krpc::new(Ipv4Addr::LOCALHOST, &format!("127.0.0.1:{dht_port}"));
    assert_eq!(client.get_peers(key("one_address")).0, vec![loopback(5555)]);
}
