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

/// The `write_task` samples (`n` of them, written under `tmp`) as `loaded`'s tokenizer
/// encodes them for training: at most 64 tokens, each with targets.
pub fn task_samples(
    loaded: &esft::model::LoadedModel,
    tmp: &Path,
    n: usize,
) -> Vec<esft_train::data::Sample> {
    use esft_train::data::{load_train, Limits, SpecialIds};
    let data = tmp.join("task.jsonl");
    write_task(&data, n);
    let ids = SpecialIds::of(loaded.model.config(), &loaded.tokenizer).unwrap();
    let limits = Limits {
        max_tokens: Some(64),
        need_targets: true,
    };
    load_train(&data, &loaded.tokenizer, ids, limits).unwrap()
}

/// The experts `score` + `select` pick on `samples` by token score at `top_p`.
pub fn token_selection(
    model: &esft::model::Decoder,
    samples: &[esft_train::data::Sample],
    top_p: f64,
) -> esft::adapter::format::ExpertConfig {
    use esft_train::score::{score_samples, ScoreAccumulator};
    use esft_train::select::{select, ScoreFunction, Selection};
    let cfg = model.config();
    let mut acc = ScoreAccumulator::new(cfg.n_routed_experts, cfg.num_experts_per_tok);
    let tokens: Vec<Vec<u32>> = samples.iter().map(|s| s.tokens.clone()).collect();
    score_samples(model, &tokens, 4096, &mut acc, None, |_| {}).unwrap();
    let selection = Selection {
        function: ScoreFunction::Token,
        top_p,
        shared_experts: false,
        non_expert_modules: false,
    };
    select(&acc.scores(), &selection).unwrap()
}

/// A tensor's values as f32, in row-major order.
pub fn values(t: &candle_core::Tensor) -> Vec<f32> {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// A small run: `steps` constant-rate steps of 2 samples of at most 64 tokens, lr 1e-2,
/// no weight decay, no evaluation split, no balance loss.
pub fn small_train_config(steps: u64, seed: u64) -> esft_train::train::TrainConfig {
    esft_train::train::TrainConfig {
        steps,
        lr: 1e-2,
        batch: 2,
        grad_accum: 1,
        seq_len: 64,
        warmup: 0,
        schedule: esft_train::train::Schedule::Constant,
        beta1: 0.9,
        beta2: 0.95,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        seed,
        eval_split: 0.0,
        aux_loss_alpha: 0.0,
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
