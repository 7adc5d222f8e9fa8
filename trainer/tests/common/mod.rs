//! Running the `esft-train` binary from integration tests.

#![allow(dead_code)] // each test file uses its own subset

use std::process::{Command, Output};

/// Runs `esft-train` with `args`, whatever the outcome.
pub fn esft_train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_esft-train"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs `esft-train` with `args`, fails the test (with its stderr) unless it succeeds, and
/// returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let o = esft_train(args);
    assert!(
        o.status.success(),
        "esft-train {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}
