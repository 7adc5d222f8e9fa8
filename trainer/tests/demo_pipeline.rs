//! The demo pipeline end to end on a micro configuration: synthetic data, a new model
//! (tokenizer + random weights), a few pretraining steps with the load-balancing loss,
//! expert scores, selection, ESFT training, and one request to the server for the adapter.
//! The full-size runs (trainer/scripts/*.sh) are not part of the test suite.

use axum::http::StatusCode;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;

use esft::server::config::ServerConfig;
use esft::server::{load, router, AppState};

mod common;
use common::ok as esft_train;

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The demo model's config (config/demo-model.json), shrunk.
fn micro_config(path: &Path) {
    let text = include_str!("../../config/demo-model.json");
    let mut c: Value = serde_json::from_str(text).unwrap();
    for (k, v) in [
        ("hidden_size", 32),
        ("intermediate_size", 64),
        ("moe_intermediate_size", 16),
        ("num_hidden_layers", 2),
        ("n_routed_experts", 8),
        ("num_experts_per_tok", 2),
        ("num_attention_heads", 2),
        ("num_key_value_heads", 2),
        ("kv_lora_rank", 16),
        ("qk_nope_head_dim", 8),
        ("qk_rope_head_dim", 8),
        ("v_head_dim", 8),
        ("vocab_size", 400),
    ] {
        c[k] = v.into();
    }
    std::fs::write(path, c.to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synth_init_pretrain_score_select_train_serve() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).to_string_lossy().into_owned();

    esft_train(&[
        "synth",
        "--out",
        &p("data"),
        "--seed",
        "3",
        "--general-train",
        "80",
        "--task-train",
        "40",
        "--eval",
        "4",
    ]);
    micro_config(&dir.path().join("micro.json"));
    let init = esft_train(&[
        "init",
        "--config",
        &p("micro.json"),
        "--corpus",
        &p("data"),
        "--out",
        &p("init"),
    ]);
    let init: Value = serde_json::from_str(init.trim()).unwrap();
    assert!(init["vocab_size"].as_u64().unwrap() <= 400);

    // Pretraining: every weight, with the load-balancing loss reported per step.
    let log = json_lines(&esft_train(&[
        "train",
        "--model",
        &p("init"),
        "--data",
        &p("data/pretrain.jsonl"),
        "--experts",
        "all",
        "--out",
        &p("base"),
        "--steps",
        "3",
        "--lr",
        "2e-3",
        "--batch",
        "4",
        "--seq-len",
        "128",
        "--aux-loss-alpha",
        "0.01",
        "--eval-split",
        "0",
        "--json",
    ]));
    let steps: Vec<&Value> = log.iter().filter(|e| e["event"] == "progress").collect();
    assert_eq!(steps.len(), 3);
    for s in &steps {
        // One MoE layer: the loss is at least alpha (its value when perfectly balanced).
        let b = s["balance_loss"].as_f64().unwrap();
        assert!((0.01 - 1e-6..0.1).contains(&b), "balance loss {b}");
    }

    esft_train(&[
        "score",
        "--model",
        &p("base"),
        "--data",
        &p("data/intent/train.jsonl"),
        "--tokens",
        "2000",
        "--out",
        &p("scores.json"),
    ]);
    esft_train(&[
        "select",
        "--scores",
        &p("scores.json"),
        "--score-function",
        "token",
        "--top-p",
        "0.2",
        "--out",
        &p("experts.json"),
    ]);
    std::fs::create_dir_all(dir.path().join("adapters")).unwrap();
    esft_train(&[
        "train",
        "--model",
        &p("base"),
        "--data",
        &p("data/intent/train.jsonl"),
        "--experts",
        &p("experts.json"),
        "--out",
        &p("adapters/intent"),
        "--steps",
        "2",
        "--lr",
        "1e-3",
        "--batch",
        "4",
        "--seq-len",
        "128",
        "--eval-split",
        "0",
    ]);

    // The server on the new base, with the adapter: one chat request for it.
    let config = ServerConfig {
        model: Some(dir.path().join("base")),
        adapters: dir.path().join("adapters"),
        ..ServerConfig::default()
    };
    config.validate().unwrap();
    let state = Arc::new(AppState::new(config.clone()).unwrap());
    state.set_served(Arc::new(load(&config).unwrap()));
    let body = json!({
        "model": "intent",
        "messages": [{"role": "user", "content": "please turn on the kitchen light"}],
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": true,
    });
    let (status, v) = common::chat_completion(&router(state), body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["model"], "intent");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert!(v["choices"][0]["message"]["content"].is_string());
}
