//! The outside tools the end-to-end tests drive: a Python with the official `openai`
//! client and `promtool`. Where `ESFT_E2E_REQUIRED=1` (CI sets it) a missing tool fails
//! the test; elsewhere the test says what is missing and skips that part.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

pub fn required() -> bool {
    std::env::var("ESFT_E2E_REQUIRED").is_ok_and(|v| v == "1")
}

/// A tool the test needs: its path, or a skip (a failure where it is required).
pub fn tool(what: &str, found: Option<PathBuf>, install: &str) -> Option<PathBuf> {
    if found.is_none() {
        assert!(
            !required(),
            "{what} is required (ESFT_E2E_REQUIRED=1) but missing: {install}"
        );
        eprintln!("SKIPPED part of this test: {what} is missing ({install})");
    }
    found
}

pub fn python_with_openai() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let candidates = [
        std::env::var_os("ESFT_PYTHON").map(PathBuf::from),
        Some(root.join("venv/bin/python")),
    ];
    candidates.into_iter().flatten().find(|p| {
        Command::new(p)
            .args(["-c", "import openai"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

pub fn promtool() -> Option<PathBuf> {
    Command::new("promtool")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| PathBuf::from("promtool"))
}
