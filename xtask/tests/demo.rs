//! `cargo xtask demo` as a user runs it: the real task, its real hosts.
//!
//! Each test builds the plugins and the host (quick once they are built) and
//! runs the demo on 127.0.0.1; the demos take turns, since each one rewrites
//! plugins/*.wasm.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One demo at a time.
static DEMO: Mutex<()> = Mutex::new(());

/// Building the host from scratch on a slow machine takes a while.
const BUILD_AND_START: Duration = Duration::from_secs(900);

/// A running `cargo xtask demo`, its stdout and stderr merged line by line.
struct Demo {
    process: std::process::Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Demo {
    fn start(args: &[&str], runtime_dir: &std::path::Path) -> Demo {
        let mut process = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .arg("demo")
            .args(args)
            // Where the hosts' default control socket lives.
            .env("XDG_RUNTIME_DIR", runtime_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cargo xtask demo");
        let (send, lines) = mpsc::channel();
        let out: Box<dyn std::io::Read + Send> = Box::new(process.stdout.take().unwrap());
        let err: Box<dyn std::io::Read + Send> = Box::new(process.stderr.take().unwrap());
        for reader in [out, err] {
            let send = send.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(reader)
                    .lines()
                    .map_while(Result::ok)
                {
                    eprintln!("demo: {line}");
                    let _ = send.send(line);
                }
            });
        }
        Demo {
            process,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for the demo to exit; returns its status and every line it printed.
    fn finish(mut self, timeout: Duration) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.process.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.process.kill();
                panic!("the demo did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // The readers end at the pipes' end of file.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        (status, self.seen.join("\n"))
    }
}

#[test]
fn the_demo_leaves_the_users_control_socket_alone() {
    let _turn = DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let runtime_dir = tempfile::tempdir().unwrap();
    // The user's own host, listening on the default control socket.
    let users_socket = runtime_dir.path().join("grenache-host.sock");
    let _users_host = std::os::unix::net::UnixListener::bind(&users_socket).unwrap();

    let demo = Demo::start(&[], runtime_dir.path());
    let (status, output) = demo.finish(BUILD_AND_START);

    assert!(status.success(), "the demo failed ({status}):\n{output}");
    assert!(
        !output.contains("no control socket"),
        "a demo host wanted the default control socket:\n{output}"
    );
    let sockets: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("INFO control socket "))
        .collect();
    assert_eq!(
        sockets.len(),
        2,
        "each host has a control socket:\n{output}"
    );
    assert!(
        sockets
            .iter()
            .all(|l| !l.contains(runtime_dir.path().to_str().unwrap())),
        "{sockets:?}"
    );
    assert!(users_socket.exists(), "the user's socket is still there");
}
