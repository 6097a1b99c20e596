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
