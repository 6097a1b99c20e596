//! Precompiled plugins, as an operator uses them: `compile` once, then run,
//! invoke and inspect the .cwasm without compiling on the device.

mod common;

use common::{
    call_peer, host, invoke, plugin, precompiled, shown, spawn_listening, test_plugin, SOON,
};

const FIBONACCI_10: &str = "[1,1,2,3,5,8,13,21,34,55]";

#[test]
fn a_compiled_plugin_invokes_like_its_component() {
    let dir = tempfile::tempdir().unwrap();
    let cwasm = precompiled(&plugin("fibonacci"), dir.path(), &[]);
    let r = invoke(&cwasm, "fibonacci_worker", r#"{"length":10}"#, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.trim(), FIBONACCI_10);

    // Told apart by content, not by name: a .cwasm called .wasm still loads.
    let renamed = dir.path().join("renamed.wasm");
    std::fs::copy(&cwasm, &renamed).unwrap();
    let r = shown(host(&["inspect", renamed.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains(r#""serves":["fibonacci_worker"]"#),
        "{}",
        r.stdout
    );
}

#[test]
fn compile_writes_beside_the_plugin_by_default_and_refuses_what_run_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("fibonacci.wasm");
    std::fs::copy(plugin("fibonacci"), &wasm).unwrap();
    let r = shown(host(&["compile", wasm.to_str().unwrap()]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(dir.path().join("fibonacci.cwasm").is_file());

    // A component of another world, a core module: refused as `run`
    // refuses them, and no .cwasm made.
    let module = dir.path().join("module.wasm");
    std::fs::write(&module, b"\0asm\x01\0\0\0").unwrap();
    for (bad, why) in [
        (test_plugin("other-world"), "not a grenache plugin"),
        (module, "a core wasm module, not a component"),
    ] {
        let out = dir.path().join("bad.cwasm");
        let r = shown(host(&[
            "compile",
            bad.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]));
        assert_eq!(r.code, 2, "{}", r.stdout);
        assert!(r.stderr.contains(why), "{}", r.stderr);
        assert!(!out.exists());
    }

    // A .cwasm is not compiled again.
    let cwasm = dir.path().join("fibonacci.cwasm");
    let r = shown(host(&[
        "compile",
        cwasm.to_str().unwrap(),
        "-o",
        "/dev/null",
    ]));
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("already precompiled"), "{}", r.stderr);
}

#[test]
fn a_host_runs_from_a_cwasm_and_answers_calls() {
    let dir = tempfile::tempdir().unwrap();
    let cwasm = precompiled(&plugin("fibonacci"), dir.path(), &[]);
    let (host, port) = spawn_listening(
        "precompiled host",
        &[
            "run",
            cwasm.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--control",
            "off",
        ],
    );
    let r = call_peer(
        &format!("127.0.0.1:{port}"),
        "fibonacci_worker",
        r#"{"length":10}"#,
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.trim(), FIBONACCI_10);
    // Unsigned native code: loaded, with a warning saying what that means.
    host.wait_for("is precompiled machine code", SOON);
}

#[test]
fn a_cwasm_for_another_target_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let arm = precompiled(
        &plugin("fibonacci"),
        dir.path(),
        &["--target", "aarch64-unknown-linux-gnu"],
    );
    let r = invoke(&arm, "fibonacci_worker", r#"{"length":10}"#, &[]);
    assert_eq!(r.code, 2, "{}", r.stdout);
    // Besides the warning that an unsigned .cwasm is unchecked machine
    // code, one error line.
    let errors: Vec<&str> = r.stderr.lines().filter(|l| !l.contains(" WARN ")).collect();
    let line = errors.join("\n");
    assert!(
        line.starts_with(&format!("error: cannot load {}: ", arm.display())),
        "{line}"
    );
    assert!(line.contains("aarch64"), "{line}");
    assert!(
        line.contains("recompile it with `grenache-host compile`"),
        "{line}"
    );
    assert_eq!(line.lines().count(), 1, "{line}");
}

#[test]
fn a_damaged_cwasm_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let cwasm = precompiled(&plugin("fibonacci"), dir.path(), &[]);
    let bytes = std::fs::read(&cwasm).unwrap();

    let truncated = dir.path().join("truncated.cwasm");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let r = invoke(&truncated, "fibonacci_worker", "{}", &[]);
    assert_eq!(r.code, 2, "{}", r.stdout);
    assert!(
        r.stderr
            .contains("a precompiled plugin this host cannot use"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("recompile it with `grenache-host compile`"),
        "{}",
        r.stderr
    );

    let garbage = dir.path().join("garbage.cwasm");
    std::fs::write(&garbage, b"not a plugin at all").unwrap();
    let r = invoke(&garbage, "fibonacci_worker", "{}", &[]);
    assert_eq!(r.code, 2, "{}", r.stdout);
    assert!(r.stderr.contains("not a WebAssembly file"), "{}", r.stderr);
    assert!(r.stderr.contains("grenache-host compile"), "{}", r.stderr);
}
