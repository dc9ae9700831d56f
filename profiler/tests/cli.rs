//! Smoke test of the binary's CLI. Its presence also makes `cargo test --workspace`
//! build `target/<profile>/livemount-profiler`, which the integration tests in
//! `tests/tests/profiler.rs` run.

use std::process::Command;

#[test]
fn help_lists_the_subcommands() {
    let out = Command::new(env!("CARGO_BIN_EXE_livemount-profiler"))
        .arg("--help")
        .output()
        .expect("run livemount-profiler --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["record", "watch", "merge", "show"] {
        assert!(text.contains(cmd), "--help lacks {cmd}: {text}");
    }
}
