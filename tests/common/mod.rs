//! Helpers shared by the end-to-end tests: where the built host and plugins
//! are, and how to run the host the way a user does.
#![allow(dead_code)] // each test binary uses a different subset

pub mod grape;
pub mod grape_node;
pub mod krpc;
pub mod lab;
pub mod scrape;

use std::path::PathBuf;
use std::process::{Command, Output};

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn built(path: PathBuf) -> PathBuf {
    assert!(
        path.is_file(),
        "{} is missing: build the plugins first with `cargo xtask plugins` (or run the suite with `cargo xtask test`)",
        path.display()
    );
    path
}

/// A bundled plugin, e.g. `plugin("fibonacci")` → `plugins/fibonacci.wasm`.
pub fn plugin(name: &str) -> PathBuf {
    built(root().join("plugins").join(format!("{name}.wasm")))
}

/// A purpose-built test plugin from `tests/plugins/`.
pub fn test_plugin(name: &str) -> PathBuf {
    built(
        root()
            .join("target/test-plugins")
            .join(format!("{name}.wasm")),
    )
}

/// The `grenache-host` binary built for this test run.
pub fn host_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_grenache-host"))
}

/// Runs `grenache-host <args>` to completion.
pub fn host(args: &[&str]) -> Output {
    Command::new(host_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("grenache-host runs")
}

/// `grenache-host call <service> <payload> --bootstrap <bootstrap> <extra>`.
pub fn call(bootstrap: &str, service: &str, payload: &str, extra: &[&str]) -> Shown {
    let mut args = vec!["call", service, payload, "--bootstrap", bootstrap];
    args.extend_from_slice(extra);
    shown(host(&args))
}

/// `grenache-host call <service> <payload> --peer <peer> <extra>`: no DHT.
pub fn call_peer(peer: &str, service: &str, payload: &str, extra: &[&str]) -> Shown {
    let mut args = vec!["call", service, payload, "--peer", peer];
    args.extend_from_slice(extra);
    shown(host(&args))
}

/// Writes a policy file (`run --config`) into `dir`; returns its path.
pub fn policy_file(dir: &std::path::Path, text: &str) -> String {
    let path = dir.join("policy.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// `grenache-host invoke <plugin> <service> <payload> <extra>`.
pub fn invoke(plugin: &std::path::Path, service: &str, payload: &str, extra: &[&str]) -> Shown {
    let plugin = plugin.to_str().expect("plugin paths are UTF-8");
    let mut args = vec!["invoke", plugin, service, payload];
    args.extend_from_slice(extra);
    shown(host(&args))
}

/// `grenache-host compile <plugin> -o <dir>/<its name>.cwasm <extra>`;
/// returns the .cwasm's path.
pub fn precompiled(plugin: &std::path::Path, dir: &std::path::Path, extra: &[&str]) -> PathBuf {
    let out = dir.join(plugin.with_extension("cwasm").file_name().unwrap());
    let mut args = vec![
        "compile",
        plugin.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let r = shown(host(&args));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.starts_with(&format!("wrote {}", out.display())),
        "{}",
        r.stdout
    );
    out
}

/// What a finished command showed the user.
pub struct Shown {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn shown(out: Output) -> Shown {
    Shown {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A `grenache-host` process running in the background, its stdout and
/// stderr collected line by line. Killed when dropped, so a failing test
/// leaves nothing behind.
pub struct HostProcess {
    pub name: String,
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl HostProcess {
    /// Starts `grenache-host <args>`.
    pub fn spawn(name: &str, args: &[&str]) -> HostProcess {
        let mut command = Command::new(host_bin());
        command.args(args).env_remove("RUST_LOG");
        Self::spawn_command(name, command)
    }

    /// Starts any command, collecting its output the same way.
    pub fn spawn_command(name: &str, mut command: Command) -> HostProcess {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start {command:?}: {e}"));
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for reader in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(reader)
                    .lines()
                    .map_while(Result::ok)
                {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        HostProcess {
            name: name.to_string(),
            child,
            lines,
        }
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// How many lines so far contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until a line contains `needle` and returns it; fails the test
    /// with the process's output if it does not appear within `timeout`.
    pub fn wait_for(&self, needle: &str, timeout: std::time::Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return line.clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{}: no line containing {needle:?} within {timeout:?}; output:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Resident memory of the process now, in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .expect("VmRSS in /proc status");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends the process a signal by name (e.g. `STOP`, `CONT`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    /// Asks the process to stop (SIGTERM) and returns its exit code.
    pub fn terminate(&mut self, timeout: std::time::Duration) -> Option<i32> {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        self.wait_exit(timeout)
    }

    /// Waits up to `timeout` for the process to exit; its exit code, or
    /// `None` if it still runs (or was killed by a signal).
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `run` flags that log one line per request served (`request for
/// <service> from <peer>`), which tests count; the default `info` does not.
pub const LOG_REQUESTS: [&str; 2] = ["--log-level", "info,requests=debug"];

/// Generous deadline for things that take well under a second here.
pub const SOON: std::time::Duration = std::time::Duration::from_secs(20);

/// Starts a DHT node on a free loopback port; returns it and its address.
/// Its introducer takes the two ports after the one the kernel picked, and
/// another test's socket may hold one of them: then it starts again.
pub fn start_dht() -> (HostProcess, String) {
    start_dht_with(&[])
}

/// [`start_dht`] with `extra` flags (e.g. `--metrics 127.0.0.1:0`).
pub fn start_dht_with(extra: &[&str]) -> (HostProcess, String) {
    let mut args = vec!["dht", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    for _ in 0..3 {
        let mut dht = HostProcess::spawn("dht", &args);
        let deadline = std::time::Instant::now() + SOON;
        while dht.is_running() {
            let listening = dht
                .output()
                .lines()
                .find_map(|l| l.strip_prefix("dht listening on ").map(str::to_string));
            if let Some(addr) = listening {
                return (dht, addr);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "dht: no \"dht listening on\" within {SOON:?}; output:\n{}",
                dht.output()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let output = dht.output();
        assert!(
            output.contains("cannot bind the introducer"),
            "dht exited: {output}"
        );
        eprintln!("dht: the introducer's port was taken; starting again:\n{output}");
    }
    panic!("dht: could not start on free ports (see above)");
}

/// Starts `grenache-host <args>` (a `run`) and waits until it prints
/// `listening on <port>`; returns it and the port.
pub fn spawn_listening(name: &str, args: &[&str]) -> (HostProcess, u16) {
    let host = HostProcess::spawn(name, args);
    let line = host.wait_for("listening on ", SOON);
    let port = line.rsplit(' ').next().unwrap().parse().unwrap();
    (host, port)
}

/// `run <plugin> --listen 127.0.0.1:0 --bootstrap <bootstrap> --control
/// off`, for a launcher of its own (another binary, an emulator, an
/// environment); more flags may follow.
pub fn run_args(plugin: &std::path::Path, bootstrap: &str) -> Vec<String> {
    [
        "run",
        plugin.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--bootstrap",
        bootstrap,
        "--control",
        "off",
    ]
    .map(String::from)
    .to_vec()
}

/// Starts `run` with `plugins` on loopback, joined through `bootstrap`;
/// returns it and its RPC port once it has announced its services.
pub fn start_host(
    name: &str,
    plugins: &[&std::path::Path],
    bootstrap: &str,
    extra: &[&str],
) -> (HostProcess, u16) {
    start_host_on(name, plugins, &["--bootstrap", bootstrap], extra)
}

/// Starts `run` with `plugins` on loopback, finding services as `directory`
/// says (e.g. `["--grape", url]`); returns it and its RPC port once it has
/// announced its services.
pub fn start_host_on(
    name: &str,
    plugins: &[&std::path::Path],
    directory: &[&str],
    extra: &[&str],
) -> (HostProcess, u16) {
    let mut args: Vec<String> = vec!["run".into()];
    args.extend(plugins.iter().map(|p| p.display().to_string()));
    args.extend(["--listen", "127.0.0.1:0"].map(String::from));
    args.extend(directory.iter().map(|s| s.to_string()));
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (host, port) = spawn_listening(name, &args);
    host.wait_for("announced", SOON);
    (host, port)
}

/// `node tests/node/peer.js <args>`: a Grenache-style Node.js peer on
/// utp-native. Its npm packages are installed by `cargo xtask test`.
pub fn node_peer(name: &str, args: &[&str]) -> HostProcess {
    let dir = root().join("tests/node");
    assert!(
        dir.join("node_modules/utp-native").is_dir(),
        "tests/node/node_modules is missing: run the suite with `cargo xtask test`, which installs it with npm"
    );
    let mut command = Command::new("node");
    command
        .arg(dir.join("peer.js"))
        .args(args)
        .current_dir(&dir);
    HostProcess::spawn_command(name, command)
}
