//! Project tasks: `cargo xtask <plugins|test|demo>`.
//!
//! Each task installs what it needs (the wasm32-wasip2 target) so the two
//! README commands work on a fresh machine.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};

const WASM_TARGET: &str = "wasm32-wasip2";
/// Cargo profile for plugins (see the workspace Cargo.toml).
const PLUGIN_PROFILE: &str = "plugin";

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  plugins   build every plugin crate (plugins/*, tests/plugins/*) for wasm32-wasip2;
            writes plugins/<name>.wasm and target/test-plugins/<name>.wasm
  test      build the plugins, then run every test in the workspace
  demo      build the plugins and the host, then run the demo";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("plugins") => build_plugins().map(|_| ()),
        Some("test") => test(&args[1..]),
        Some("demo") => demo(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => {
            eprintln!("unknown task {other:?}\n\n{USAGE}");
            return ExitCode::from(2);
        }
        None => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Installs the wasm target if rustup does not have it yet.
fn ensure_wasm_target() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(root())
        .output()
        .context("cannot run rustup; install Rust with rustup (https://rustup.rs)")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == WASM_TARGET)
    {
        return Ok(());
    }
    run(Command::new("rustup")
        .args(["target", "add", WASM_TARGET])
        .current_dir(root()))
}

/// Crate directories (containing Cargo.toml) directly under `dir`.
fn crates_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut crates = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.join("Cargo.toml").is_file() {
            crates.push(path);
        }
    }
    crates.sort();
    Ok(crates)
}

fn package_name(crate_dir: &Path) -> Result<String> {
    let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml"))?;
    manifest
        .lines()
        .find_map(|l| {
            l.strip_prefix("name = ")
                .map(|v| v.trim_matches('"').to_string())
        })
        .with_context(|| format!("no package name in {}/Cargo.toml", crate_dir.display()))
}

/// Builds every plugin crate and copies the components where users and tests
/// look for them. Returns the written paths.
fn build_plugins() -> Result<Vec<PathBuf>> {
    ensure_wasm_target()?;
    let root = root();
    let groups = [
        (root.join("plugins"), root.join("plugins")),
        (root.join("tests/plugins"), root.join("target/test-plugins")),
    ];
    let mut build = cargo();
    build.args([
        "build",
        "--target",
        WASM_TARGET,
        "--profile",
        PLUGIN_PROFILE,
    ]);
    let mut outputs = Vec::new();
    for (source, dest) in &groups {
        for dir in crates_under(source)? {
            let name = package_name(&dir)?;
            build.args(["--package", &name]);
            outputs.push((name, dest.clone()));
        }
    }
    run(&mut build)?;
    let built = root.join("target").join(WASM_TARGET).join(PLUGIN_PROFILE);
    let mut written = Vec::new();
    for (name, dest) in outputs {
        let artifact = built.join(format!("{}.wasm", name.replace('-', "_")));
        std::fs::create_dir_all(&dest)?;
        let out = dest.join(format!("{name}.wasm"));
        std::fs::copy(&artifact, &out)
            .with_context(|| format!("cannot copy {} to {}", artifact.display(), out.display()))?;
        eprintln!(
            "xtask: wrote {} ({} KiB)",
            out.display(),
            std::fs::metadata(&out)?.len() / 1024
        );
        written.push(out);
    }
    Ok(written)
}

fn test(extra: &[String]) -> Result<()> {
    build_plugins()?;
    run(cargo().args(["test", "--workspace"]).args(extra))
}

fn demo(extra: &[String]) -> Result<()> {
    build_plugins()?;
    run(cargo().args(["build", "--package", "grenache-host"]))?;
    let host = root().join("target/debug/grenache-host");
    let fib = root().join("plugins/fibonacci.wasm");
    println!("\n== The fibonacci plugin, inspected ==");
    run(Command::new(&host).arg("inspect").arg(&fib))?;
    println!(
        "\n== grenache-host invoke plugins/fibonacci.wasm fibonacci_worker '{{\"length\":10}}' =="
    );
    run(Command::new(&host)
        .arg("invoke")
        .arg(&fib)
        .args(["fibonacci_worker", r#"{"length":10}"#])
        .args(extra))?;
    Ok(())
}
