//! Wire compatibility with Grenache's Node.js world at the uTP level: a Node
//! peer on utp-native (the libutp binding Grenache uses) talks to our hosts.

mod common;

use common::{call_peer, node_peer, plugin, start_dht, start_host, test_plugin, SOON};

#[test]
fn node_sends_the_test_vectors_and_gets_byte_exact_replies() {
    let (_dht, bootstrap) = start_dht();
    // fibonacci first: it is the primary plugin that `ip:port` keys (docs/wire.md §7, TV-4) reach.
    let (_host, port) = start_host(
        "host",
        &[&plugin("fibonacci"), &test_plugin("rpc-test")],
        &bootstrap,
        &[],
    );
    let node = node_peer("node client", &["vectors", &port.to_string()]);
    let tv3 = node.wait_for("TV-2 reply ", SOON);
    assert_eq!(
        tv3,
        r#"TV-2 reply ["3f2cf13b-da02-4abf-bb01-9306b37281a3",null,"world"]"#
    );
    let tv5 = node.wait_for("TV-4 reply ", SOON);
    assert_eq!(
        tv5,
        r#"TV-4 reply ["f5e82789-41d0-450f-88ed-cd320deb8fac",null,[1,1,2,3,5,8,13,21,34,55]]"#
    );
}

#[test]
fn a_node_punch_is_punched_back() {
    let (_dht, bootstrap) = start_dht();
    let (host, port) = start_host("host", &[&plugin("consumer")], &bootstrap, &[]);
    let node = node_peer("node puncher", &["punch", &port.to_string()]);
    node.wait_for(&format!("punched back by 127.0.0.1:{port}"), SOON);
    // The plugin heard it too.
    host.wait_for("[consumer] punch from 127.0.0.1:", SOON);
}

#[test]
fn a_node_server_answers_our_call() {
    let node = node_peer("node server", &["serve"]);
    let line = node.wait_for("listening on ", SOON);
    let port = line.rsplit(' ').next().unwrap();
    let peer = format!("127.0.0.1:{port}");
    let r = call_peer(&peer, "fibonacci_worker", r#"{"length":10}"#, &[]);
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, node.output());
    assert_eq!(r.stdout, "[1,1,2,3,5,8,13,21,34,55]\n");
    node.wait_for(r#"request fibonacci_worker {"length":10}"#, SOON);
}

#[test]
fn a_node_worker_punching_our_consumer_gets_its_request() {
    // The tutorial's punch_simple_servers, with the worker in Node.
    let (_dht, bootstrap) = start_dht();
    let (consumer, port) = start_host("consumer host", &[&plugin("consumer")], &bootstrap, &[]);
    let node = node_peer("node worker", &["serve", &port.to_string()]);
    consumer.wait_for("[consumer] punch from 127.0.0.1:", SOON);
    consumer.wait_for(
        "[consumer] got data reply, sequence is: [1,1,2,3,5,8,13,21,34,55]",
        SOON,
    );
    node.wait_for("request fibonacci_worker", SOON);
}

/// A fibonacci payload padded so the whole request envelope
/// `["<36-char rid>","fibonacci_worker",<payload>]` is `bytes` long.
fn request_of(bytes: usize) -> String {
    let envelope = r#"["","fibonacci_worker",]"#.len() + 36;
    let bare = r#"{"length":10,"pad":""}"#.len();
    format!(
        r#"{{"length":10,"pad":"{}"}}"#,
        "x".repeat(bytes - envelope - bare)
    )
}

#[test]
fn a_request_of_up_to_1382_bytes_reaches_a_node_server_in_one_packet() {
    // Node parses each packet as one message (docs/wire.md §3): it answers
    // only if the whole request came in one packet, from the first packet
    // of the connection on.
    let node = node_peer("node server", &["serve"]);
    let line = node.wait_for("listening on ", SOON);
    let peer = format!("127.0.0.1:{}", line.rsplit(' ').next().unwrap());
    for bytes in [1300, 1382] {
        let r = call_peer(&peer, "fibonacci_worker", &request_of(bytes), &[]);
        assert_eq!(r.code, 0, "{bytes} B: {}\n{}", r.stderr, node.output());
        assert_eq!(r.stdout, "[1,1,2,3,5,8,13,21,34,55]\n");
        node.wait_for(&format!("in {bytes} bytes"), SOON);
    }
    assert_eq!(node.count("ERR_REQUEST_PARSE"), 0, "{}", node.output());
}

#[test]
fn a_node_client_with_8_requests_in_flight_on_one_connection_gets_8_answers() {
    // Our replies of 100 B and of 1300 B, each in its own packet: Node
    // parses every one.
    let (_dht, bootstrap) = start_dht();
    let (_host, port) = start_host("host", &[&test_plugin("faulty")], &bootstrap, &[]);
    for bytes in [100, 1300] {
        let node = node_peer(
            "node client",
            &["flight", &port.to_string(), "8", &bytes.to_string()],
        );
        let packets = vec![bytes.to_string(); 8].join(",");
        node.wait_for(
            &format!("answers 8 of 8, packets {packets}, parse errors 0"),
            SOON,
        );
    }
}

#[test]
fn replies_of_100_and_1300_bytes_from_a_node_server_reach_our_call() {
    let node = node_peer("node server", &["serve"]);
    let line = node.wait_for("listening on ", SOON);
    let peer = format!("127.0.0.1:{}", line.rsplit(' ').next().unwrap());
    for bytes in [100, 1300] {
        let payload = format!(r#"{{"replyBytes":{bytes}}}"#);
        let r = call_peer(&peer, "fibonacci_worker", &payload, &[]);
        assert_eq!(r.code, 0, "{bytes} B: {}\n{}", r.stderr, node.output());
        // The reply is [rid,null,"xx…x"]: 36 + 10 bytes around the string.
        let result = r.stdout.trim_end();
        assert_eq!(result.len(), bytes - 36 - 10, "{result}");
        assert!(result.starts_with("\"xxx") && result.ends_with("xx\""));
    }
}
