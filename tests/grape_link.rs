//! Joining an existing Grenache network: our hosts announce and look up
//! through real Grapes (npm grenache-grape 1.0.0, two bootstrapped to each
//! other), and Node peers using the real grenache-nodejs-link (1.0.2 and
//! 0.7.13) find them there, and the other way round.

mod common;

use std::time::Duration;

use common::grape::{free_tcp_port, start_grapes};
use common::{host, node_peer, plugin, shown, start_host_on, HostProcess, LOG_REQUESTS};

/// Grapes run a DHT traversal per lookup and Node starts slowly on a busy
/// machine: wait generously.
const GRAPE_SOON: Duration = Duration::from_secs(40);

const SEQUENCE: &str = "[1,1,2,3,5,8,13,21,34,55]";

#[test]
fn a_node_client_on_the_other_grape_calls_our_host() {
    let grapes = start_grapes();
    let (host, port) = start_host_on(
        "fibonacci host",
        &[&plugin("fibonacci")],
        &["--grape", &grapes.url(0), "--control", "off"],
        &LOG_REQUESTS,
    );
    host.wait_for(&format!("Grape {}", grapes.url(0)), GRAPE_SOON);
    for link in ["1.0", "0.7"] {
        let node = node_peer(
            &format!("node client (link {link})"),
            &[
                "link-call",
                &grapes.url(1),
                "fibonacci_worker",
                r#"{"length":10}"#,
                "--link",
                link,
            ],
        );
        // The raw name is the key on both sides: the Node link finds our port.
        node.wait_for(
            &format!("found fibonacci_worker at 127.0.0.1:{port}"),
            GRAPE_SOON,
        );
        let reply = node.wait_for("reply ", GRAPE_SOON);
        assert_eq!(reply, format!("reply {SEQUENCE}"));
    }
    // Both requests were answered by our plugin (the log line may trail the reply).
    let deadline = std::time::Instant::now() + GRAPE_SOON;
    while host.count("request for fibonacci_worker") < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", host.output());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn our_call_reaches_a_node_service_announced_through_a_grape() {
    let grapes = start_grapes();
    // The tutorial's server: announces every second through a Link (0.7.13,
    // what grenache-nodejs-utp installs).
    let node = node_peer(
        "node worker",
        &["serve", "--grape", &grapes.url(0), "--link", "0.7"],
    );
    let line = node.wait_for("listening on ", GRAPE_SOON);
    let node_port = line.rsplit(' ').next().unwrap().to_string();
    node.wait_for(
        &format!("announced fibonacci_worker {node_port}: 1"),
        GRAPE_SOON,
    );
    let r = shown(host(&[
        "call",
        "fibonacci_worker",
        r#"{"length":10}"#,
        "--grape",
        &grapes.url(1),
    ]));
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, node.output());
    assert_eq!(r.stdout, format!("{SEQUENCE}\n"));
    node.wait_for(r#"request fibonacci_worker {"length":10}"#, GRAPE_SOON);
}

#[test]
fn a_grape_that_is_not_running_is_named_in_the_error() {
    let port = free_tcp_port();
    let url = format!("http://127.0.0.1:{port}");
    let r = shown(host(&[
        "call",
        "fibonacci_worker",
        r#"{"length":10}"#,
        "--grape",
        &url,
    ]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "cannot reach the Grape at {url} (connection refused); is a grape running with --aph {port}?"
        )),
        "{}",
        r.stderr
    );
}

#[test]
fn grape_and_bootstrap_do_not_mix() {
    let r = shown(host(&[
        "call",
        "fibonacci_worker",
        "{}",
        "--grape",
        "http://127.0.0.1:30001",
        "--bootstrap",
        "127.0.0.1:20001",
    ]));
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("'--grape <URL>' cannot be used with '--bootstrap <HOST:PORT>'"),
        "{}",
        r.stderr
    );
    let r = shown(host(&[
        "call",
        "x",
        "{}",
        "--grape",
        "https://127.0.0.1:30001",
    ]));
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("Grapes speak plain HTTP"), "{}", r.stderr);
}

#[test]
fn a_node_worker_found_through_a_grape_punches_our_consumer() {
    // The tutorial's punch_simple_servers, mixed: our consumer plugin,
    // and a Node worker that looks the consumer up through a Grape and
    // punches it every second.
    let grapes = start_grapes();
    let consumer = start_consumer(&grapes.url(0));
    let node = node_peer(
        "node worker",
        &[
            "serve",
            "--grape",
            &grapes.url(1),
            "--punch",
            "fibonacci_consumer",
            "--link",
            "0.7",
        ],
    );
    consumer_is_punched_and_gets_the_sequence(&consumer);
    node.wait_for("request fibonacci_worker", GRAPE_SOON);
}

#[test]
fn our_worker_behind_nat_punches_a_consumer_it_finds_through_a_grape() {
    // The classic example with both sides ours, meeting through Grapes: the
    // worker's punch loop looks the consumer up through its Grape.
    let grapes = start_grapes();
    let consumer = start_consumer(&grapes.url(0));
    let (worker, _) = start_host_on(
        "worker host",
        &[&plugin("fibonacci")],
        &["--grape", &grapes.url(1), "--control", "off"],
        &["--behind-nat", LOG_REQUESTS[0], LOG_REQUESTS[1]],
    );
    worker.wait_for("no introducer: with --grape", GRAPE_SOON);
    consumer_is_punched_and_gets_the_sequence(&consumer);
    worker.wait_for("request for fibonacci_worker", GRAPE_SOON);
}

#[test]
fn our_worker_behind_nat_punches_a_node_consumer() {
    // The tutorial's punch_simple_servers, mixed the other way: a Node
    // consumer (rpc_server_public.js) announced through one Grape, and our
    // fibonacci host --behind-nat finding it through the other and punching
    // it every second; the consumer punches back and requests through the
    // hole, addressing the request to the puncher as the tutorial does.
    let grapes = start_grapes();
    let node = node_peer(
        "node consumer",
        &["consume", "--grape", &grapes.url(0), "--link", "0.7"],
    );
    let (worker, port) = start_host_on(
        "worker host",
        &[&plugin("fibonacci")],
        &["--grape", &grapes.url(1), "--control", "off"],
        &["--behind-nat", LOG_REQUESTS[0], LOG_REQUESTS[1]],
    );
    // The punch comes from our RPC socket, the one the request then reaches.
    node.wait_for(&format!("punch from 127.0.0.1:{port}"), GRAPE_SOON);
    let reply = node.wait_for("sequence ", GRAPE_SOON);
    assert_eq!(reply, format!("sequence {SEQUENCE}"));
    worker.wait_for("request for fibonacci_worker", GRAPE_SOON);
}

/// Our consumer plugin's host, announced through the Grape at `grape`.
fn start_consumer(grape: &str) -> HostProcess {
    let (consumer, _) = start_host_on(
        "consumer host",
        &[&plugin("consumer")],
        &["--grape", grape, "--control", "off"],
        &[],
    );
    consumer
}

/// Waits until the consumer plugin was punched and got the worker's reply
/// through the hole.
fn consumer_is_punched_and_gets_the_sequence(consumer: &HostProcess) {
    consumer.wait_for("[consumer] punch from 127.0.0.1:", GRAPE_SOON);
    consumer.wait_for(
        &format!("[consumer] got data reply, sequence is: {SEQUENCE}"),
        GRAPE_SOON,
    );
}
