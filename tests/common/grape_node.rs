//! Helpers for `grenache-host grape`: ours, a real grenache-grape 1.0.0
//! (`tests/node/node_modules/.bin/grape`), Node links (`tests/node/link.js`)
//! and plain HTTP requests to a grape's API.

use std::process::Command;
use std::time::{Duration, Instant};

use super::{root, HostProcess, SOON};

/// A grape process and where to reach it.
pub struct GrapeProcess {
    pub process: HostProcess,
    /// Its DHT node, `127.0.0.1:port` (for `--bootstrap` and `--bn`).
    pub dht: String,
    /// Its HTTP API, `http://127.0.0.1:port`.
    pub url: String,
}

/// Starts `grenache-host grape` on free loopback ports (`-b 127.0.0.1`, no
/// introducer) with `extra` flags, and waits until it listens.
pub fn start_grape(name: &str, extra: &[&str]) -> GrapeProcess {
    let mut args = vec![
        "grape",
        "--dp",
        "0",
        "--aph",
        "0",
        "-b",
        "127.0.0.1",
        "--introducer-port",
        "off",
    ];
    args.extend_from_slice(extra);
    let process = HostProcess::spawn(name, &args);
    let last_word = |line: String| line.rsplit(' ').next().unwrap().to_string();
    let dht = last_word(process.wait_for("grape dht listening on ", SOON));
    let http = last_word(process.wait_for("grape http listening on ", SOON));
    let port = dht.rsplit(':').next().unwrap();
    GrapeProcess {
        dht: format!("127.0.0.1:{port}"),
        url: format!("http://{http}"),
        process,
    }
}

/// The npm packages of `tests/node`, installed by `cargo xtask test`.
fn node_dir() -> std::path::PathBuf {
    let dir = root().join("tests/node");
    for package in [
        "grenache-grape",
        "grenache-nodejs-link",
        "grenache-nodejs-link-0.7",
    ] {
        assert!(
            dir.join("node_modules").join(package).is_dir(),
            "tests/node/node_modules/{package} is missing: run the suite with `cargo xtask test`, which installs it with npm"
        );
    }
    dir
}

/// A port no one listens on right now, for TCP and UDP alike (the kernel
/// picks it; another process may still take it before we do).
pub fn free_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
}

/// Starts a real grenache-grape 1.0.0 (its own command line) with `args`
/// after `--dp --aph` (and `--bn ''`, a new DHT, unless `args` give `--bn`);
/// returns it and its API's URL once it answers.
/// Ports are picked free, and another test may take one first: then it
/// starts again on new ones.
pub fn start_node_grape(name: &str, args: &[&str]) -> (HostProcess, String) {
    let dir = node_dir();
    for _ in 0..3 {
        let (dp, aph) = (free_port().to_string(), free_port().to_string());
        let mut command = Command::new(dir.join("node_modules/.bin/grape"));
        command
            .args(["--dp", &dp, "--aph", &aph])
            .args(if args.contains(&"--bn") {
                &[][..]
            } else {
                &["--bn", ""][..]
            })
            .args(args)
            .current_dir(&dir);
        let mut grape = HostProcess::spawn_command(name, command);
        let url = format!("http://127.0.0.1:{aph}");
        let deadline = Instant::now() + SOON;
        while grape.is_running() {
            if post(&url, "/lookup", "{}").is_some() {
                return (grape, url);
            }
            assert!(
                Instant::now() < deadline,
                "{name}: its API does not answer at {url}; output:\n{}",
                grape.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{name} exited (a port taken?):\n{}", grape.output());
    }
    panic!("{name}: could not start on free ports (see above)");
}

/// `node tests/node/link.js <version> <url> <args>`: a Node service's Link
/// (1.0.2 or 0.7.13) using the grape at `url`.
pub fn node_link(name: &str, version: &str, url: &str, args: &[&str]) -> HostProcess {
    let dir = node_dir();
    let mut command = Command::new("node");
    command
        .arg(dir.join("link.js"))
        .args([version, url])
        .args(args)
        .current_dir(&dir);
    HostProcess::spawn_command(name, command)
}

/// Runs a one-shot `link.js` command (`lookup`, `put`, `get`) and returns
/// the line it printed (`lookup ["127.0.0.1:5555"]`, `put error …`).
pub fn link_once(version: &str, url: &str, args: &[&str]) -> String {
    let link = node_link(&format!("link {version} {}", args[0]), version, url, args);
    let line = link.wait_for(&format!("{} ", args[0]), SOON);
    line
}

/// Asks a Link to look `name` up until it finds exactly `expected` (as
/// `"ip:port"` strings, any order), within `timeout`.
pub fn wait_for_lookup(
    version: &str,
    url: &str,
    name: &str,
    expected: &[String],
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    let mut wanted: Vec<String> = expected.to_vec();
    wanted.sort();
    loop {
        let line = link_once(version, url, &["lookup", name]);
        let found = line
            .strip_prefix("lookup ")
            .and_then(|json| serde_json::from_str::<Vec<String>>(json).ok())
            .map(|mut list| {
                list.sort();
                list
            });
        if found.as_ref() == Some(&wanted) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "link {version} lookup of {name} at {url}: still {line:?}, want {wanted:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A grape API's answer: status, body, and whether it had a Content-Type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub content_type: bool,
}

/// `POST <url><path>` with `body`; `None` if the grape cannot be reached.
pub fn post(url: &str, path: &str, body: &str) -> Option<Answer> {
    request(reqwest::Method::POST, url, path, body.as_bytes().to_vec())
}

/// Any request to a grape's API; `None` if it cannot be reached.
pub fn request(method: reqwest::Method, url: &str, path: &str, body: Vec<u8>) -> Option<Answer> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let reply = client
        .request(method, format!("{url}{path}"))
        .body(body)
        .send()
        .ok()?;
    let status = reply.status().as_u16();
    let content_type = reply.headers().contains_key(reqwest::header::CONTENT_TYPE);
    let body = reply.text().ok()?;
    Some(Answer {
        status,
        body,
        content_type,
    })
}
