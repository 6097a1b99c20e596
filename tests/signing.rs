//! Signed plugins, as an operator uses them: keygen, sign, run --trusted-key.

mod common;

use std::path::Path;

use common::{call_peer, host, plugin, shown, spawn_listening, HostProcess};

/// Runs `keygen --out <dir>/<name>`; returns the public key's hex.
fn keygen(dir: &Path, name: &str) -> String {
    let out = dir.join(name);
    let r = shown(host(&["keygen", "--out", out.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    r.stdout.trim().to_string()
}

fn sign(plugin: &Path, secret: &Path) {
    let r = shown(host(&[
        "sign",
        plugin.to_str().unwrap(),
        "--key",
        secret.to_str().unwrap(),
    ]));
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// `run <plugin> --listen 127.0.0.1:0 --trusted-key <key>` to its end.
fn run_trusting(plugin: &Path, key: &str) -> common::Shown {
    shown(host(&[
        "run",
        plugin.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--trusted-key",
        key,
    ]))
}

/// `run <plugin> --trusted-key <key>` for a plugin that must be refused:
/// returns the one line it printed.
fn refused(plugin: &Path, key: &Path) -> String {
    let r = run_trusting(plugin, key.to_str().unwrap());
    assert_eq!(r.code, 2, "{}", r.stderr);
    let line = r
        .stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .expect("an error line")
        .to_string();
    assert!(
        line.contains(&plugin.display().to_string()),
        "names the file: {line}"
    );
    line
}

/// `run <plugin> --trusted-key <key> <extra>` on loopback; returns it and its address.
fn signed_worker(plugin: &Path, key: &str, extra: &[&str]) -> (HostProcess, String) {
    let mut args = vec![
        "run",
        plugin.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--trusted-key",
        key,
    ];
    args.extend_from_slice(extra);
    let (worker, port) = spawn_listening("signed worker", &args);
    (worker, format!("127.0.0.1:{port}"))
}

#[test]
fn only_plugins_signed_by_a_trusted_key_run() {
    let dir = tempfile::tempdir().unwrap();
    let ops = keygen(dir.path(), "ops");
    let other = keygen(dir.path(), "other");
    let (ops_secret, ops_pub) = (dir.path().join("ops.secret"), dir.path().join("ops.pub"));
    let fib = dir.path().join("fibonacci.wasm");
    std::fs::copy(plugin("fibonacci"), &fib).unwrap();

    // Unsigned: refused, and the message names the key it expected.
    // Trusted keys are named by their first 16 hex digits: a secret seed
    // given by mistake as bare hex is never printed whole.
    let line = refused(&fib, &ops_pub);
    assert!(
        line.contains("not signed") && line.contains(&format!("{}…", &ops[..16])),
        "{line}"
    );

    // Signed by a key the host does not trust.
    sign(&fib, &dir.path().join("other.secret"));
    let line = refused(&fib, &ops_pub);
    assert!(
        line.contains(&format!("signed by key {other}")) && line.contains(&ops[..16]),
        "{line}"
    );

    // Signed by the trusted key: it serves.
    sign(&fib, &ops_secret);
    let (_worker, peer) = signed_worker(&fib, &ops, &[]);
    let r = call_peer(&peer, "fibonacci_worker", r#"{"length":5}"#, &[]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "[1,1,2,3,5]\n"),
        "{}",
        r.stderr
    );

    // Changed after signing: refused.
    let mut bytes = std::fs::read(&fib).unwrap();
    bytes.push(0);
    std::fs::write(&fib, bytes).unwrap();
    let line = refused(&fib, &ops_pub);
    assert!(line.contains("does not match"), "{line}");
}

#[test]
fn a_signed_cwasm_runs_and_a_tampered_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ops = keygen(dir.path(), "ops");
    let cwasm = common::precompiled(&plugin("fibonacci"), dir.path(), &[]);
    sign(&cwasm, &dir.path().join("ops.secret"));
    let (worker, peer) = signed_worker(&cwasm, &ops, &[]);
    let r = call_peer(&peer, "fibonacci_worker", r#"{"length":5}"#, &[]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "[1,1,2,3,5]\n"),
        "{}",
        r.stderr
    );
    // Signed: no warning about unchecked machine code.
    assert_eq!(worker.count("is precompiled machine code"), 0);
    drop(worker);

    // One byte of machine code changed after signing: refused before
    // wasmtime sees it.
    let mut bytes = std::fs::read(&cwasm).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&cwasm, bytes).unwrap();
    let line = refused(&cwasm, &dir.path().join("ops.pub"));
    assert!(line.contains("does not match"), "{line}");
}

#[test]
fn a_swap_to_an_unsigned_file_is_refused_and_the_signed_version_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let ops = keygen(dir.path(), "ops");
    let fib = dir.path().join("fibonacci.wasm");
    std::fs::copy(plugin("fibonacci"), &fib).unwrap();
    sign(&fib, &dir.path().join("ops.secret"));
    let sock = dir.path().join("control.sock");
    let sock = sock.to_str().unwrap();
    let (_worker, peer) = signed_worker(&fib, &ops, &["--control", sock]);

    let unsigned = dir.path().join("unsigned.wasm");
    std::fs::copy(plugin("fibonacci"), &unsigned).unwrap();
    let r = shown(host(&[
        "swap",
        "fibonacci",
        unsigned.to_str().unwrap(),
        "--control",
        sock,
    ]));
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.stderr.contains("not signed") && r.stderr.contains(&ops[..16]),
        "{}",
        r.stderr
    );
    let r = call_peer(&peer, "fibonacci_worker", r#"{"length":3}"#, &[]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "[1,1,2]\n"),
        "{}",
        r.stderr
    );
}

#[test]
fn keygen_protects_the_secret_and_never_overwrites_a_key() {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path(), "k");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("k.secret"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let r = shown(host(&[
        "keygen",
        "--out",
        dir.path().join("k").to_str().unwrap(),
    ]));
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("refusing to overwrite"), "{}", r.stderr);
}

#[test]
fn a_bad_trusted_key_is_a_usage_error() {
    let r = shown(host(&[
        "run",
        plugin("fibonacci").to_str().unwrap(),
        "--trusted-key",
        "not-a-key",
    ]));
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("keygen"), "{}", r.stderr);
}

#[test]
fn keys_cannot_be_swapped_and_a_secret_is_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path(), "ops");
    let (secret, public) = (dir.path().join("ops.secret"), dir.path().join("ops.pub"));
    let secret_hex = std::fs::read_to_string(&secret).unwrap();
    let secret_hex = secret_hex.split_whitespace().last().unwrap();
    let fib = dir.path().join("fibonacci.wasm");
    std::fs::copy(plugin("fibonacci"), &fib).unwrap();

    // The secret key as a trusted key: refused at start, by file name only.
    let r = run_trusting(&fib, secret.to_str().unwrap());
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("is a secret key"), "{}", r.stderr);
    assert!(!r.stderr.contains(secret_hex) && !r.stdout.contains(secret_hex));

    // The secret key's text pasted inline, labelled or with a typo: refused
    // without quoting it (clap's own error would quote the value).
    let labelled = format!("ed25519-secret {secret_hex}");
    let typo = format!("{secret_hex}0");
    for inline in [labelled.as_str(), typo.as_str()] {
        let r = run_trusting(&fib, inline);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains("--trusted-key"), "{}", r.stderr);
        assert!(
            !r.stderr.contains(secret_hex) && !r.stdout.contains(secret_hex),
            "{}",
            r.stderr
        );
    }

    // Signing with the public key: refused, and nothing written.
    let r = shown(host(&[
        "sign",
        fib.to_str().unwrap(),
        "--key",
        public.to_str().unwrap(),
    ]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("is a public key"), "{}", r.stderr);
    assert!(!dir.path().join("fibonacci.wasm.sig").exists());
}

#[test]
fn watch_loads_a_plugin_written_before_its_signature_once_the_signature_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let ops = keygen(dir.path(), "ops");
    let secret = dir.path().join("ops.secret");
    let file = dir.path().join("versioned.wasm");
    std::fs::copy(common::test_plugin("version-1"), &file).unwrap();
    sign(&file, &secret);
    let (worker, peer) = signed_worker(&file, &ops, &["--watch", "--control", "off"]);
    let version = || {
        let r = call_peer(&peer, "versioned", "{}", &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        r.stdout.trim().to_string()
    };
    assert_eq!(version(), r#"{"version":1}"#);

    // The new plugin lands first (renamed over); its signature is still
    // the old one's, so it is refused and version 1 keeps serving.
    let staged = dir.path().join("versioned.wasm.new");
    std::fs::copy(common::test_plugin("version-2"), &staged).unwrap();
    std::fs::rename(&staged, &file).unwrap();
    worker.wait_for("refused, the current version keeps serving", common::SOON);
    assert_eq!(version(), r#"{"version":1}"#);

    // The signature arrives: loaded, without touching the plugin again.
    sign(&file, &secret);
    worker.wait_for("swapped versioned", common::SOON);
    assert_eq!(version(), r#"{"version":2}"#);
}
