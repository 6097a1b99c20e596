//! Helpers shared by the end-to-end tests: where the built host and plugins
//! are, and how to run the host the way a user does.
#![allow(dead_code)] // each test binary uses a different subset

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
