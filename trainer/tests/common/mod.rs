//! Running the `esft-train` binary, and requests to the server in process, from
//! integration tests.

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
