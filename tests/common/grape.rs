//! Real Grapes (npm grenache-grape 1.0.0, installed in tests/node by
//! `cargo xtask test`) on free loopback ports, for the tests of the Grape
//! link.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{root, HostProcess, SOON};

/// A TCP port nobody listens on right now (bound, noted, closed).
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A UDP port free on every interface right now (a Grape binds its DHT
/// port on 0.0.0.0).
fn free_udp_port() -> u16 {
    UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `POST http://127.0.0.1:<port>/<path>` with `body`; the status and the
/// body, or `None` if nothing answered within a few seconds.
pub fn http_post(port: u16, path: &str, body: &str) -> Option<(u16, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "POST /{path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let status = answer.split(' ').nth(1)?.parse().ok()?;
    let body = answer.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// Two Grapes bootstrapped to each other, as Grenache's tutorial runs
/// them; killed when dropped.
pub struct Grapes {
    /// The two `grape` processes.
    pub processes: Vec<HostProcess>,
    /// Their HTTP API ports (`--aph`).
    pub api_ports: [u16; 2],
}

impl Grapes {
    /// The HTTP API URL of Grape `i` (0 or 1), e.g. `http://127.0.0.1:30001`.
    pub fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.api_ports[i])
    }
}

/// The `grape` command of the installed grenache-grape.
fn grape_command() -> Command {
    let bin = root().join("tests/node/node_modules/.bin/grape");
    assert!(
        bin.exists(),
        "{} is missing: run the suite with `cargo xtask test`, which installs tests/node's npm packages",
        bin.display()
    );
    Command::new(bin)
}

/// Starts two Grapes on free ports and waits until each has its HTTP API up
/// and takes an announce to the other (its answer is the number of nodes
/// that took it, not "No nodes to query").
pub fn start_grapes() -> Grapes {
    // A port picked free can be taken before the Grape binds it (other
    // tests run beside this one): start again on new ports then.
    for _ in 0..3 {
        let dht = [free_udp_port(), free_udp_port()];
        let api = [free_tcp_port(), free_tcp_port()];
        let mut processes: Vec<HostProcess> = (0..2)
            .map(|i| {
                let mut grape = grape_command();
                grape.args([
                    "--dp",
                    &dht[i].to_string(),
                    "--aph",
                    &api[i].to_string(),
                    "--bn",
                    &format!("127.0.0.1:{}", dht[1 - i]),
                ]);
                HostProcess::spawn_command(&format!("grape {}", i + 1), grape)
            })
            .collect();
        if wait_until_joined(&mut processes, api) {
            return Grapes {
                processes,
                api_ports: api,
            };
        }
    }
    panic!("could not start two Grapes on free ports (see the output above)");
}

/// Whether both Grapes answer and take announces before the deadline;
/// `false` if one exited (its port was taken).
fn wait_until_joined(processes: &mut [HostProcess], api: [u16; 2]) -> bool {
    let deadline = Instant::now() + SOON;
    let probe =
        r#"{"rid":"5dc09883-3788-4b8c-a601-c7e728a7271f","data":["grape-link-test-probe",1]}"#;
    let mut joined = [false, false];
    while joined != [true, true] {
        for (i, process) in processes.iter_mut().enumerate() {
            if !process.is_running() {
                eprintln!("{} exited:\n{}", process.name, process.output());
                return false;
            }
            if !joined[i] {
                let answer = http_post(api[i], "announce", probe);
                joined[i] =
                    matches!(answer, Some((200, body)) if body.parse::<u32>().is_ok_and(|n| n > 0));
            }
        }
        assert!(
            Instant::now() < deadline,
            "the two Grapes did not take announces within {SOON:?}; output:\n{}\n{}",
            processes[0].output(),
            processes[1].output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}
