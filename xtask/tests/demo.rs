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
        Demo::start_with(Command::new(env!("CARGO_BIN_EXE_xtask")), args, runtime_dir)
    }

    fn start_with(mut command: Command, args: &[&str], runtime_dir: &std::path::Path) -> Demo {
        let mut process = command
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

    /// Waits for a line containing `needle`.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("the demo did not print {needle:?} within {timeout:?}"),
            }
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

/// Starts `cargo xtask demo --keep-running` in a process group of its own, as
/// a shell starts a job, and waits until it runs.
fn keep_running(runtime_dir: &std::path::Path, ignore_sigint: bool) -> Demo {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(env!("CARGO_BIN_EXE_xtask"));
    command.process_group(0);
    if ignore_sigint {
        // What a non-interactive shell does for a job started with `&`.
        // SAFETY: signal() is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_IGN);
                Ok(())
            })
        };
    }
    let mut demo = Demo::start_with(command, &["--keep-running"], runtime_dir);
    demo.wait_for("== Running until Ctrl-C ==", BUILD_AND_START);
    demo
}

#[test]
fn ctrl_c_stops_a_demo_that_keeps_running_cleanly() {
    let _turn = DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let runtime_dir = tempfile::tempdir().unwrap();
    // In a terminal, and as a background job of a script.
    for ignore_sigint in [false, true] {
        let demo = keep_running(runtime_dir.path(), ignore_sigint);
        // Ctrl-C: the terminal sends SIGINT to the whole foreground group.
        let group = demo.process.id() as libc::pid_t;
        assert_eq!(unsafe { libc::kill(-group, libc::SIGINT) }, 0);
        let (status, output) = demo.finish(Duration::from_secs(60));
        assert_eq!(
            status.code(),
            Some(0),
            "ignore_sigint {ignore_sigint}:\n{output}"
        );
        assert!(
            output.contains("== Stopped: the DHT node and both hosts are down =="),
            "{output}"
        );
        assert!(!output.contains("exited on its own"), "{output}");
    }
}

#[test]
fn a_demo_process_that_dies_ends_the_demo_with_an_error() {
    let _turn = DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let runtime_dir = tempfile::tempdir().unwrap();
    let demo = keep_running(runtime_dir.path(), false);
    // One of the demo's processes (the DHT node, the consumer host, the
    // worker host) crashes.
    let pid = demo.process.id();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let worker: libc::pid_t = children.split_whitespace().last().unwrap().parse().unwrap();
    assert_eq!(unsafe { libc::kill(worker, libc::SIGKILL) }, 0);
    let (status, output) = demo.finish(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains("host exited on its own (signal: 9 (SIGKILL)); see its output above"),
        "{output}"
    );
}
