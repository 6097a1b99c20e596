//! Hole punching through real Linux NATs (network namespaces + nftables).
//! Needs root; see tests/common/lab.rs.

mod common;

use common::lab::{Home, Lab, NatType, PUBLIC_IP};
use common::{HostProcess, LOG_REQUESTS, SOON};

/// `run plugins/consumer.wasm` on the public host, once it has announced.
fn public_consumer(lab: &Lab, bootstrap: &str) -> HostProcess {
    let consumer = lab.run_plugin((&lab.public, PUBLIC_IP), "consumer", bootstrap, &[]);
    consumer.wait_for("announced fibonacci_consumer", SOON);
    consumer
}

/// `run plugins/fibonacci.wasm` in `home`, punching with `--behind-nat` or not.
fn worker_behind_nat(lab: &Lab, home: &Home, bootstrap: &str, punching: bool) -> HostProcess {
    let mut extra = LOG_REQUESTS.to_vec();
    if punching {
        extra.push("--behind-nat");
    }
    lab.run_plugin(home.host_at(), "fibonacci", bootstrap, &extra)
}

#[test]
fn the_classic_example_works_behind_a_port_restricted_nat() {
    let Some(lab) = Lab::build("classic", &[NatType::PortRestricted]) else {
        return;
    };
    let home = &lab.homes[0];
    let (_dht, bootstrap) = lab.public_dht();
    let consumer = public_consumer(&lab, &bootstrap);
    let worker = worker_behind_nat(&lab, home, &bootstrap, true);
    // The punch arrives from the router's public address, not the host's.
    consumer.wait_for(&format!("[consumer] punch from {}:", home.wan_ip), SOON);
    consumer.wait_for(
        "[consumer] got data reply, sequence is: [1,1,2,3,5,8,13,21,34,55]",
        SOON,
    );
    worker.wait_for(
        &format!("request for fibonacci_worker from {PUBLIC_IP}:"),
        SOON,
    );
}

#[test]
fn without_punching_the_nat_keeps_a_caller_out() {
    let Some(lab) = Lab::build("control", &[NatType::PortRestricted]) else {
        return;
    };
    let home = &lab.homes[0];
    let (_dht, bootstrap) = lab.public_dht();
    // Announced, but not punching anyone.
    let worker = worker_behind_nat(&lab, home, &bootstrap, false);
    worker.wait_for("announced fibonacci_worker", SOON);
    // The caller asks the introducer too; the worker has not registered.
    let r = lab.run_host(
        &lab.public,
        &[
            "call",
            "fibonacci_worker",
            r#"{"length":10}"#,
            "--bootstrap",
            &bootstrap,
            "--timeout-ms",
            "3000",
        ],
    );
    // The lookup finds the worker at the router's address, and the router drops the call.
    assert_eq!(
        r.code, 2,
        "the call got through an unpunched NAT: {}\n{}",
        r.stdout, r.stderr
    );
    assert!(
        r.stderr.contains(home.wan_ip)
            && r.stderr.contains("timeout: no uTP answer")
            // The introducer does not know it: the caller says what it needs.
            && r.stderr.contains("must run with --behind-nat"),
        "{}",
        r.stderr
    );
    assert_eq!(
        worker.count("request for fibonacci_worker"),
        0,
        "{}",
        worker.output()
    );
}

/// Runs a public consumer and a punching worker behind `nat`, then calls the
/// worker from a third address on the public host; returns the call's result.
fn call_from_a_stranger_while_punching(test: &str, nat: NatType) -> Option<common::Shown> {
    let lab = Lab::build(test, &[nat])?;
    let home = &lab.homes[0];
    let (_dht, bootstrap) = lab.public_dht();
    let consumer = public_consumer(&lab, &bootstrap);
    let worker = worker_behind_nat(&lab, home, &bootstrap, true);
    // The stranger must find the worker, so that only the NAT can stop it.
    worker.wait_for("announced fibonacci_worker", SOON);
    // The worker's mapping exists once the consumer has been reached.
    consumer.wait_for("got data reply", SOON);
    // Without an introduction: only the NAT's filtering decides.
    Some(lab.run_host(
        &lab.public,
        &[
            "call",
            "fibonacci_worker",
            r#"{"length":3}"#,
            "--bootstrap",
            &bootstrap,
            "--introducer",
            "off",
            "--timeout-ms",
            "3000",
        ],
    ))
}

#[test]
fn a_full_cone_nat_lets_anyone_in_once_the_mapping_exists() {
    let Some(r) = call_from_a_stranger_while_punching("fullcone", NatType::FullCone) else {
        return;
    };
    assert_stranger_admitted(&r);
}

#[test]
fn a_port_restricted_nat_lets_in_only_the_punched_peer() {
    let Some(r) = call_from_a_stranger_while_punching("portrestr", NatType::PortRestricted) else {
        return;
    };
    assert_stranger_kept_out(&r);
}

#[test]
fn an_address_restricted_nat_lets_in_the_punched_address_from_any_port() {
    // The stranger calls from the consumer's own address (another port): allowed.
    let Some(r) = call_from_a_stranger_while_punching("addrrestr", NatType::AddressRestricted)
    else {
        return;
    };
    assert_stranger_admitted(&r);
}

#[test]
fn a_symmetric_nat_lets_in_only_the_punched_peer() {
    let Some(r) = call_from_a_stranger_while_punching("symmetric", NatType::Symmetric) else {
        return;
    };
    assert_stranger_kept_out(&r);
}

/// The stranger's call went through the NAT and was answered.
fn assert_stranger_admitted(r: &common::Shown) {
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "[1,1,2]\n"),
        "{}",
        r.stderr
    );
}

/// The call found the worker and the NAT dropped it: exit code 2 with a uTP
/// connect timeout, not "no peers" or any other failure.
fn assert_stranger_kept_out(r: &common::Shown) {
    assert_eq!(r.code, 2, "a stranger got through the NAT: {}", r.stdout);
    assert!(
        r.stderr.contains("timeout: no uTP answer"),
        "expected the NAT to drop the call: {}",
        r.stderr
    );
}
