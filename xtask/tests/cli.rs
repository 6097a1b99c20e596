//! `cargo xtask`'s command line: help, and arguments it does not know.

use std::process::{Command, Output};

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .expect("run xtask")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_after_any_task_prints_the_usage_and_runs_nothing() {
    for args in [
        &["--help"][..],
        &["help"],
        &["demo", "--help"],
        &["demo", "--keep-running", "-h"],
        &["plugins", "--help"],
        &["test", "--help"],
    ] {
        let out = xtask(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            text(&out.stderr)
        );
        let stdout = text(&out.stdout);
        assert!(
            stdout.starts_with("usage: cargo xtask <task>"),
            "{args:?}: {stdout}"
        );
        // Nothing was built or started.
        assert!(
            text(&out.stderr).is_empty(),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn unknown_arguments_are_refused_with_the_usage() {
    for (args, complaint) in [
        (
            &["demo", "--keep-runing"][..],
            "unknown argument \"--keep-runing\" for `cargo xtask demo`",
        ),
        (
            &["plugins", "--release"],
            "unknown argument \"--release\" for `cargo xtask plugins`",
        ),
        (
            &["test", "--nocapture"],
            "unknown argument \"--nocapture\" for `cargo xtask test`",
        ),
        (&["demos"], "unknown task \"demos\""),
        (&[], "no task given"),
    ] {
        let out = xtask(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(complaint), "{args:?}: {stderr}");
        assert!(
            stderr.contains("usage: cargo xtask <task>"),
            "{args:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}
