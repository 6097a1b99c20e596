//! Brokers (issue 10 item 5): a plugin on a public host that records the
//! address each peer's request came from (`request-context.caller`) in its
//! state, and two hosts behind two NATs that find each other through it, as
//! in Grenache's `nat_w_broker` example (docs/wire.md TV-7). The
//! plugins are `tests/plugins/broker*`; the lab needs root (see
//! tests/common/lab.rs).

mod common;

use std::time::Duration;

use common::lab::{Lab, NatType, PUBLIC_IP};
use common::{
    node_peer, policy_file, start_dht, start_host, test_plugin, HostProcess, LOG_REQUESTS, SOON,
};

/// TV-7's registration payload and its reply's result, byte for byte.
const TV7_PAYLOAD: &str = r#"{"service":"fibonacci_worker","server":false}"#;
const TV7_RESULT: &str = r#"{"fibonacci_worker":{"69b2f36dd451211e4c8b858103fde1e2":{"service":"fibonacci_worker","server":false,"address":"127.0.0.1","port":38742}}}"#;
/// The port TV-7's client registered from (part of the md5 key).
const TV7_CALLER_PORT: u16 = 38742;

const SEQUENCE: &str = "[1,1,2,3,5,8,13,21,34,55]";

/// The broker over real uTP: a peer at TV-7's address gets TV-7's result
/// byte for byte, and a second peer gets both entries, its own first, from
/// the broker's state (each request runs in a fresh instance).
#[test]
fn the_broker_answers_tv7_over_the_wire_and_remembers_peers() {
    let state = tempfile::tempdir().unwrap();
    let (_dht, broker, port) = loopback_broker(state.path());
    let broker_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let register = |from: &str, payload: &str| -> String {
        rt.block_on(async {
            use grenache_host::rpc::client::RpcClient;
            use grenache_host::transport::Endpoint;
            let (endpoint, _) = Endpoint::bind(from.parse().unwrap())
                .await
                .unwrap_or_else(|e| panic!("cannot bind {from} (TV-7's client port): {e}"));
            let client = RpcClient::new(endpoint, None, 1 << 20);
            client
                .request_peer(broker_addr, "fibo_broker", payload, Duration::from_secs(10))
                .await
                .unwrap_or_else(|e| panic!("registration failed: {e}\n{}", broker.output()))
        })
    };
    let first = register(&format!("127.0.0.1:{TV7_CALLER_PORT}"), TV7_PAYLOAD);
    assert_eq!(first, TV7_RESULT);

    let second = register(
        "127.0.0.1:0",
        r#"{"service":"fibonacci_worker","server":true}"#,
    );
    let reply: serde_json::Value = serde_json::from_str(&second).unwrap();
    let entries = reply["fibonacci_worker"].as_object().unwrap();
    assert_eq!(entries.len(), 2, "{second}");
    // Most recent first: the new server's entry, then TV-7's, unchanged.
    let tv7_entry = &TV7_RESULT[r#"{"fibonacci_worker":{"#.len()..TV7_RESULT.len() - 2];
    let at = second.find(tv7_entry).unwrap_or_else(|| panic!("{second}"));
    assert!(
        second[..at].contains(r#""server":true,"address":"127.0.0.1""#),
        "{second}"
    );
}

/// A DHT node and a broker host on loopback, the broker keeping its state
/// in `state`; returns both and the broker's port.
fn loopback_broker(state: &std::path::Path) -> (HostProcess, HostProcess, u16) {
    let (dht, bootstrap) = start_dht();
    let (broker, port) = start_host(
        "broker",
        &[&test_plugin("broker")],
        &bootstrap,
        &["--state-dir", state.to_str().unwrap(), "--control", "off"],
    );
    (dht, broker, port)
}

/// Node's side of the tutorial: a utp-native peer registers as a client,
/// then another as a server; the server reads the client back the way
/// `register.js` does, at the address the broker observed, and every key
/// in both replies is what `broker.js` computes with Node's own
/// `JSON.stringify` and md5.
#[test]
fn node_peers_register_as_the_tutorials_register_js_does() {
    let state = tempfile::tempdir().unwrap();
    let (_dht, _broker, port) = loopback_broker(state.path());
    let port = port.to_string();
    let keyed = "every key is md5(JSON.stringify(entry)): true";

    let client = node_peer("node client", &["broker", &port, "false"]);
    let line = client.wait_for("registered from port ", SOON);
    assert!(line.ends_with(keyed), "{}", client.output());
    let client_port: u16 = line["registered from port ".len()..line.find(';').unwrap()]
        .parse()
        .unwrap();
    // No server has registered yet.
    client.wait_for("peers []", SOON);

    let server = node_peer("node server", &["broker", &port, "true"]);
    let line = server.wait_for("registered from port ", SOON);
    assert!(line.ends_with(keyed), "{}", server.output());
    server.wait_for(
        &format!(
            r#"peers [{{"service":"fibonacci_worker","server":false,"address":"127.0.0.1","port":{client_port}}}]"#
        ),
        SOON,
    );
}

/// The broker lab: two port-restricted homes (A: the worker, B: the
/// client), the public DHT node without an introducer, the broker on the
/// public host, and the worker and client hosts, none using an introducer
/// and each keeping its plugins' state in the lab's scratch directory; the
/// client host gets `client_policy`, if any, as its policy file (`run
/// --config`). Returns the lab and the DHT, broker, worker and client processes.
fn broker_lab(test: &str, client_policy: Option<&str>) -> Option<(Lab, [HostProcess; 4])> {
    let lab = Lab::build(test, &[NatType::PortRestricted, NatType::PortRestricted])?;
    let (worker_home, client_home) = (&lab.homes[0], &lab.homes[1]);
    let (dht, bootstrap) = lab.public_dht_with(&["--introducer-port", "off"]);
    // No host uses an introducer; each keeps its plugins' state in the
    // lab's scratch directory.
    let state_dirs: Vec<String> = ["broker", "worker", "client"]
        .iter()
        .map(|host| {
            let dir = lab.scratch.path().join(format!("{host}-state"));
            std::fs::create_dir_all(&dir).unwrap();
            dir.to_str().unwrap().to_string()
        })
        .collect();
    let flags = |state: &str| -> Vec<String> {
        [
            "--introducer",
            "off",
            "--control",
            "off",
            "--state-dir",
            state,
            // The checks below read the per-request lines (at debug).
            LOG_REQUESTS[0],
            LOG_REQUESTS[1],
        ]
        .map(String::from)
        .to_vec()
    };
    fn as_strs(flags: &[String]) -> Vec<&str> {
        flags.iter().map(String::as_str).collect()
    }
    let broker = lab.run_plugin_file(
        (&lab.public, PUBLIC_IP),
        &test_plugin("broker"),
        &bootstrap,
        &as_strs(&flags(&state_dirs[0])),
    );
    broker.wait_for("announced fibo_broker", SOON);
    let worker = lab.run_plugin_file(
        worker_home.host_at(),
        &test_plugin("broker-worker"),
        &bootstrap,
        &as_strs(&flags(&state_dirs[1])),
    );
    let mut client_flags = flags(&state_dirs[2]);
    if let Some(text) = client_policy {
        client_flags.extend(["--config".into(), policy_file(lab.scratch.path(), text)]);
    }
    let client = lab.run_plugin_file(
        client_home.host_at(),
        &test_plugin("broker-client"),
        &bootstrap,
        &as_strs(&client_flags),
    );
    Some((lab, [dht, broker, worker, client]))
}

/// Two hosts behind two port-restricted NATs (plain SNAT; the routers drop
/// what nobody inside asked for) meet only through the broker on the public
/// host: the worker and the client each register every 2 s, the broker
/// records each one's NAT mapping, and each punches the other's mapping. The
/// second punch gets through the NAT the first one opened; the client, told
/// of the worker's punch, calls it back through the hole.
///
/// Why this proves the broker path: there is no introducer anywhere in the
/// lab (`dht --introducer-port off`, and each host `--introducer off`), so
/// no host is introduced to another; the hosts run without `--behind-nat`
/// and their plugins name nothing to punch, so the host punches nobody on
/// its own; and the client never looks the worker up, it only answers
/// punches with `request-peer`. The only place either side can learn the
/// other's public address is the broker's reply.
#[test]
fn two_hosts_behind_two_nats_meet_through_a_broker() {
    let Some((lab, [_dht, broker, worker, client])) = broker_lab("broker", None) else {
        return;
    };
    let (worker_home, client_home) = (&lab.homes[0], &lab.homes[1]);

    // Several 2 s registration rounds, DHT lookups of the broker included.
    let deadline = Duration::from_secs(40);
    let line = client.wait_for(
        &format!("[broker-client] sequence from {}:", worker_home.wan_ip),
        deadline,
    );
    assert!(
        line.ends_with(&format!(": {SEQUENCE}")),
        "{line}\nclient:\n{}\nworker:\n{}",
        client.output(),
        worker.output()
    );
    // The request reached the worker from the client's router: a direct path.
    worker.wait_for(
        &format!("request for fibonacci_worker from {}:", client_home.wan_ip),
        SOON,
    );
    // The broker saw each side at its NAT's public address, never its LAN
    // address, and that is what it handed the other side.
    for home in [worker_home, client_home] {
        broker.wait_for(
            &format!("request for fibo_broker from {}:", home.wan_ip),
            SOON,
        );
    }
    assert_eq!(broker.count("from 10.0."), 0, "{}", broker.output());
    client.wait_for(
        &format!("the broker lists a server at {}:", worker_home.wan_ip),
        SOON,
    );
    worker.wait_for(
        &format!("the broker lists a client at {}:", client_home.wan_ip),
        SOON,
    );
    for host in [&worker, &client] {
        assert_eq!(host.count("cannot punch"), 0, "{}", host.output());
        assert_eq!(
            host.count("opened by an introduction"),
            0,
            "{}",
            host.output()
        );
    }
}

/// The control: the same lab with the client registering but not punching,
/// as the tutorial's `rpc_client.js` does. The worker punches the client's
/// mapping round after round, and the client's router drops every punch
/// (port-restricted: the client never sent anything to the worker), so no
/// request is ever made: the tutorial's example cannot work with such a NAT
/// on the client's side. It also shows that the routers in the test above
/// really filter.
#[test]
fn a_one_sided_punch_does_not_get_through_two_nats() {
    let Some((lab, [_dht, _broker, worker, client])) = broker_lab(
        "onesided",
        Some("[plugin.broker-client.config]\npunch = \"false\"\n"),
    ) else {
        return;
    };
    let client_home = &lab.homes[1];
    let listed = format!("the broker lists a client at {}:", client_home.wan_ip);
    // Four rounds of the worker punching the client (2 s apart).
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while worker.count(&listed) < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never saw the client at the broker:\n{}",
            worker.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    client.wait_for("the broker lists a server at ", SOON);
    // The worker's punches went out; the client's router dropped them.
    assert_eq!(worker.count("cannot punch"), 0, "{}", worker.output());
    assert_eq!(client.count("punching it"), 0, "{}", client.output());
    assert_eq!(client.count("sequence from"), 0, "{}", client.output());
    assert_eq!(
        worker.count("request for fibonacci_worker"),
        0,
        "{}",
        worker.output()
    );
}
