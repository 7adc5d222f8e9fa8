//! Running the `esft-train` binary, and requests to the server in process, from
//! integration tests.

#![allow(dead_code)] // each test file uses its own subset

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A fixture of the repository's `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// A small task: a fixed-form answer that names the asked-for item.
pub fn write_task(path: &Path, n: usize) {
    let words = [
        "apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "ocean",
    ];
    let mut f = std::fs::File::create(path).unwrap();
    for i in 0..n {
        let w = words[i % words.len()];
        let line = serde_json::json!({"messages": [
            {"role": "user", "content": format!("Item {i}: name the {w}.")},
            {"role": "assistant", "content": format!("It is the {w}.")},
        ]});
        writeln!(f, "{line}").unwrap();
    }
}

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

/// Posts `body` to the server's `/v1/chat/completions` in process; the status and the
/// JSON reply.
pub async fn chat_completion(
    app: &axum::Router,
    body: serde_json::Value,
) -> (axum::http::StatusCode, serde_json::Value) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let resp = app
        .clone()
        .oneshot(
            axum::http::Request::post("/v1/chat/completions")
                .header("content-type", "application/json")
                .body(axum::body::Body::from(body.to_string()))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}
