//! A plugin that misbehaves on purpose, one service per fault, so the tests
//! can prove that each fault costs exactly one request and the next request
//! to the same plugin (`echo`) still succeeds.

#![cfg(target_arch = "wasm32")]

wit_bindgen::generate!({ path: "../../../wit", world: "plugin" });

use exports::grenache::plugin::service::{Guest, PluginManifest, RequestContext};
use grenache::plugin::host::{log, request, request_peer};
use grenache::plugin::types::{Level, RequestError};

const SERVICES: &[&str] = &[
    "echo",
    "panic",
    "unreachable",
    "loop",
    "oom",
    "stack_overflow",
    "huge_reply",
    "not_json",
    "network",
    "log",
    "request_loop",
    "slow_host_call",
    "sandbox_probe",
    "sleep",
    "residue",
];

/// Bytes the `residue` service scribbles over: in the module's zeroed data
/// (.bss), so a fresh instance always starts with them all zero.
const RESIDUE_BYTES: usize = 256 << 10;
static mut RESIDUE: [u8; RESIDUE_BYTES] = [0; RESIDUE_BYTES];
static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `residue`: what this instance inherited from earlier requests, as
/// `{"calls":n,"dirty":bytes}` (a fresh instance: 1 and 0); then leaves its
/// own marks (every byte 0xAB) for the next request to find.
fn residue() -> String {
    let calls = CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    // SAFETY: one request runs at a time in an instance (wasm has one
    // thread); no reference to RESIDUE outlives this block.
    let dirty = unsafe {
        let bytes = &mut *std::ptr::addr_of_mut!(RESIDUE);
        let dirty = bytes.iter().filter(|b| **b != 0).count();
        bytes.fill(0xAB);
        std::hint::black_box(&bytes);
        dirty
    };
    format!(r#"{{"calls":{calls},"dirty":{dirty}}}"#)
}

struct Faulty;

impl Guest for Faulty {
    fn manifest() -> PluginManifest {
        PluginManifest {
            serves: SERVICES.iter().map(|s| s.to_string()).collect(),
            punch: vec![],
            calls: vec!["*".to_string()],
            tick_interval_ms: None,
        }
    }

    fn handle(
        service: String,
        payload: String,
        _context: RequestContext,
    ) -> Result<String, String> {
        match service.as_str() {
            "echo" => Ok(payload),
            "residue" => Ok(residue()),
            "panic" => panic!("faulty plugin panicked on purpose"),
            "unreachable" => std::process::abort(),
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "oom" => {
                // Keep every block alive so the memory really grows.
                let mut blocks: Vec<Vec<u8>> = Vec::new();
                loop {
                    blocks.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&blocks);
                }
            }
            "stack_overflow" => Ok(recurse(std::hint::black_box(1)).to_string()),
            "huge_reply" => Ok(format!("\"{}\"", "x".repeat(2 << 20))),
            "not_json" => Ok("this is not json".to_string()),
            "network" => match request("fibonacci_worker", &payload, 1000) {
                Ok(reply) => Ok(reply),
                Err(RequestError::Transport(m)) => Err(format!("transport: {m}")),
                Err(other) => Err(format!("{other:?}")),
            },
            "request_loop" => loop {
                // Hammers the host with outgoing calls until stopped.
                let _ = request("nobody_serves_this", "{}", 10);
            },
            "slow_host_call" => {
                // A host call that would outlast the request's time limit: a
                // peer that never answers (the payload names one, as
                // "ip:port": a socket the caller bound and never reads;
                // a closed port would fail at once), asked with a
                // one-minute timeout.
                let peer = payload.trim().trim_matches('"');
                let peer = if peer.contains(':') {
                    peer
                } else {
                    "127.0.0.1:9"
                };
                let _ = request_peer(peer, "anything", "{}", 60_000);
                // The time limit expired inside the host call: stopped here.
                Ok("\"the host call returned and the plugin went on\"".to_string())
            }
            "sandbox_probe" => {
                // What of the outside world the plugin can reach.
                let files = std::fs::read_dir("/")
                    .map(|_| "readable".to_string())
                    .unwrap_or_else(|e| e.to_string());
                let env = std::env::vars().count();
                let tcp = std::net::TcpStream::connect("127.0.0.1:9")
                    .map(|_| "connected".to_string())
                    .unwrap_or_else(|e| format!("{:?}", e.kind()));
                let udp = std::net::UdpSocket::bind("127.0.0.1:0")
                    .map(|_| "bound".to_string())
                    .unwrap_or_else(|e| format!("{:?}", e.kind()));
                Ok(format!(
                    "{{\"files\":{files:?},\"env\":{env},\"tcp\":{tcp:?},\"udp\":{udp:?}}}"
                ))
            }
            "sleep" => {
                // A slow but healthy request: the payload is the number of
                // milliseconds to wait before answering with it.
                let ms: u64 = payload
                    .trim()
                    .parse()
                    .map_err(|_| format!("sleep takes a number of milliseconds, not {payload}"))?;
                std::thread::sleep(std::time::Duration::from_millis(ms));
                Ok(format!("{{\"slept\":{ms}}}"))
            }
            "log" => {
                log(Level::Info, &format!("logged {payload}"));
                println!("stdout {payload}");
                eprintln!("stderr {payload}");
                Ok(payload)
            }
            other => Err(format!("unknown service {other}")),
        }
    }

    fn on_tick() -> Result<(), String> {
        Ok(())
    }

    fn on_punch(_peer: String) {}
}

#[inline(never)]
#[allow(unconditional_recursion)] // on purpose: the test needs a stack overflow
fn recurse(n: u64) -> u64 {
    let pad = std::hint::black_box([n; 64]);
    recurse(pad[3] + 1) + pad[5]
}

export!(Faulty);
