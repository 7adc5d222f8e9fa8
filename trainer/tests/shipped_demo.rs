//! The shipped demo: `models/demo` and `adapters/` load in the server exactly as `esft-serve
//! serve` with no flags loads them, and every adapter answers its held-out task far better
//! than the base does, through the HTTP API. The held-out items are drawn again with the
//! synthetic generator and the seed the reproduction used (0).

use axum::http::StatusCode;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;

use esft::server::config::ServerConfig;
use esft::server::{load, router, AppState};
use esft_train::eval::answer_matches;
use esft_train::synth::{generate, Sizes};

mod common;

/// Held-out items asked per task.
const ITEMS: usize = 40;

async fn chat(app: &axum::Router, model: &str, question: &str) -> String {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 48,
        "temperature": 0,
    });
    let (status, v) = common::chat_completion(app, body).await;
    assert_eq!(status, StatusCode::OK, "{model}: {v}");
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_adapters_beat_the_base_on_their_tasks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // What `serve` does with no flags, from the repository root.
    let defaults = ServerConfig::default();
    let config = ServerConfig {
        model: defaults.model.as_ref().map(|m| root.join(m)),
        adapters: root.join(&defaults.adapters),
        ..defaults
    };
    config.validate().unwrap();
    let state = Arc::new(AppState::new(config.clone()).unwrap());
    state.set_served(Arc::new(load(&config).unwrap()));
    let app = router(state);

    let data = tempfile::tempdir().unwrap();
    let sizes = Sizes {
        general_train: 1,
        task_train: 1,
        ..Sizes::default()
    };
    generate(data.path(), 0, sizes).unwrap();
    for task in ["intent", "translation", "law"] {
        let items =
            esft_train::data::load_eval(&data.path().join(task).join("eval.jsonl")).unwrap();
        let (mut base, mut adapter) = (0, 0);
        for item in &items[..ITEMS] {
            let question = item
                .prompt
                .strip_prefix("User: ")
                .and_then(|p| p.strip_suffix("\n\nAssistant:"))
                .unwrap();
            let right = |out: &str| item.answers.iter().any(|a| answer_matches(out, a)) as usize;
            base += right(&chat(&app, "demo", question).await);
            adapter += right(&chat(&app, task, question).await);
        }
        eprintln!("{task}: base {base}/{ITEMS}, adapter {adapter}/{ITEMS}");
        // At least 10 points of exact match above the base on every task.
        assert!(
            adapter >= base + ITEMS / 10,
            "{task}: adapter {adapter}/{ITEMS}, base {base}/{ITEMS}"
        );
    }
}
