//! The `esft-train` commands end to end on a fixture model: score (with reference logs),
//! select, train (ESFT and full fine-tuning), eval, import; bad data refused before any
//! training; a killed run resumes and never exposes a partial adapter.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{esft_train, fixture, ok};

fn write_lines(path: &Path, lines: &[String]) {
    let mut f = std::fs::File::create(path).unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
}

fn task_lines(n: usize) -> Vec<String> {
    let words = ["apple", "river", "stone", "cloud", "tiger", "lemon"];
    (0..n)
        .map(|i| {
            let w = words[i % words.len()];
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("Item {i}: name the {w}.")},
                {"role": "assistant", "content": format!("It is the {w}.")},
            ]})
            .to_string()
        })
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `esft-train args` until it has saved its state in `state` (and a little longer),
/// then kills it.
fn kill_after_a_save(args: &[String], state: &Path) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_esft-train"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !state.join("state.json").exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "no state saved");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(150));
    child.kill().unwrap();
    child.wait().unwrap();
}

fn events(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn score_select_train_eval_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = fixture("lite");
    let data = t.join("train.jsonl");
    write_lines(&data, &task_lines(30));

    // score: JSON-lines progress, reference logs, scores in the summary.json shape.
    let stdout = ok(&[
        "score",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--tokens",
        "400",
        "--batch-tokens",
        "128",
        "--log-dir",
        s(&t.join("logs")),
        "--out",
        s(&t.join("scores.json")),
        "--json",
    ]);
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.last().unwrap()["event"], "done");
    assert_eq!(events.last().unwrap()["tokens"], 400);
    let scores: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.join("scores.json")).unwrap()).unwrap();
    for layer in ["1", "2"] {
        let sum: f64 = scores["token_scores"][layer]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .sum();
        assert!(
            (sum - 1.0).abs() < 1e-3,
            "layer {layer} token scores sum to {sum}"
        );
    }
    // The logs hold one line per sample and give the same scores back.
    ok(&[
        "score",
        "--from-logs",
        s(&t.join("logs")),
        "--top-k",
        "4",
        "--experts",
        "16",
        "--out",
        s(&t.join("from_logs.json")),
    ]);
    let again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.join("from_logs.json")).unwrap()).unwrap();
    for table in ["token_scores", "gate_scores"] {
        for (layer, experts) in scores[table].as_object().unwrap() {
            for (e, v) in experts.as_object().unwrap() {
                let d = (v.as_f64().unwrap() - again[table][layer][e].as_f64().unwrap()).abs();
                assert!(d <= 1.5e-4, "{table} {layer}/{e}: {d}");
            }
        }
    }

    ok(&[
        "select",
        "--scores",
        s(&t.join("scores.json")),
        "--score-function",
        "gate",
        "--top-p",
        "0.2",
        "--out",
        s(&t.join("experts.json")),
    ]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.join("experts.json")).unwrap()).unwrap();
    assert_eq!(cfg["shared_experts"], false);
    assert!(!cfg["experts"]["1"].as_array().unwrap().is_empty());

    let adapter = t.join("adapters/task");
    let stdout = ok(&[
        "train",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--experts",
        s(&t.join("experts.json")),
        "--out",
        s(&adapter),
        "--steps",
        "6",
        "--lr",
        "1e-2",
        "--batch",
        "1",
        "--seq-len",
        "64",
        "--eval-split",
        "0.1",
        "--eval-every",
        "3",
        "--save-every",
        "2",
        "--json",
    ]);
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        events.iter().filter(|e| e["event"] == "progress").count(),
        6
    );
    assert_eq!(events.iter().filter(|e| e["event"] == "eval").count(), 2);
    let done = events.last().unwrap();
    assert_eq!(done["event"], "done");
    assert!(done["best_eval_loss"].as_f64().unwrap() > 0.0);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["name"], "task");
    assert_eq!(manifest["expert_config"], cfg);
    assert!(
        !t.join("adapters/.task.train-state").exists(),
        "the state is removed when done"
    );

    // eval: exact match on the eval format, with and without the adapter.
    let eval = t.join("eval.jsonl");
    write_lines(
        &eval,
        &[
            r#"{"prompt": "User: Item 40: name the apple.\n\nAssistant:", "answers": ["It is the apple."]}"#.into(),
            r#"{"prompt": "User: Item 41: name the river.\n\nAssistant:", "answers": ["It is the river."]}"#.into(),
        ],
    );
    let pred = t.join("pred.jsonl");
    for extra in [vec![], vec!["--adapter", s(&adapter)]] {
        let mut args = vec![
            "eval",
            "--model",
            s(&model),
            "--data",
            s(&eval),
            "--max-tokens",
            "8",
            "--predictions",
            s(&pred),
        ];
        args.extend(extra);
        let summary: serde_json::Value = serde_json::from_str(ok(&args).trim()).unwrap();
        assert_eq!(summary["metric"], "exact-match");
        assert_eq!(summary["total"], 2);
        let preds = std::fs::read_to_string(t.join("pred.jsonl")).unwrap();
        assert_eq!(preds.lines().count(), 2);
    }
    let loss: serde_json::Value = serde_json::from_str(
        ok(&[
            "eval",
            "--model",
            s(&model),
            "--adapter",
            s(&adapter),
            "--data",
            s(&data),
            "--metric",
            "loss",
        ])
        .trim(),
    )
    .unwrap();
    assert!(loss["score"].as_f64().unwrap() > 0.0);

    // import: the adapter in the reference layout comes back as a native adapter.
    let reference = t.join("released");
    std::fs::create_dir(&reference).unwrap();
    std::fs::copy(t.join("experts.json"), reference.join("expert_cfg.json")).unwrap();
    let tensors = candle_core::safetensors::load(
        adapter.join("adapter.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let renamed: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .iter()
        .map(|(n, t)| (n.strip_prefix("model.").unwrap().to_string(), t.clone()))
        .collect();
    candle_core::safetensors::save(&renamed, reference.join("model.safetensors")).unwrap();
    let imported = t.join("adapters/imported");
    ok(&[
        "import",
        "--from",
        s(&reference),
        "--model",
        s(&model),
        "--out",
        s(&imported),
    ]);
    let back = candle_core::safetensors::load(
        imported.join("adapter.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(back.len(), tensors.len());
    for (n, t) in &tensors {
        let d = (t - &back[n])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{n}");
    }
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(imported.join("adapter.json")).unwrap())
            .unwrap();
    assert!(m["base"]["tensors_fingerprint"].is_string());
}

#[test]
fn full_fine_tuning_writes_a_loadable_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let data = t.join("train.jsonl");
    write_lines(&data, &task_lines(8));
    let out = t.join("fft");
    ok(&[
        "train",
        "--model",
        s(&fixture("lite")),
        "--data",
        s(&data),
        "--experts",
        "all",
        "--out",
        s(&out),
        "--steps",
        "2",
        "--lr",
        "1e-3",
        "--batch",
        "1",
        "--seq-len",
        "64",
        "--eval-split",
        "0",
    ]);
    let base = esft::model::Decoder::load_dir(&fixture("lite"), &Default::default()).unwrap();
    let tuned = esft::model::Decoder::load_dir(&out, &Default::default()).unwrap();
    assert!(out.join("tokenizer.json").exists());
    let (mut base, mut tuned) = (base, tuned);
    let a = base.checkpoint_tensors().unwrap();
    let b = tuned.checkpoint_tensors().unwrap();
    let changed = a
        .iter()
        .zip(&b)
        .filter(|((_, x), (_, y))| {
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        })
        .count();
    // Embeddings of unseen tokens still decay, so every tensor moves.
    assert!(
        changed > a.len() / 2,
        "{changed} of {} tensors changed",
        a.len()
    );
}

#[test]
fn bad_data_is_refused_with_its_line_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let good = task_lines(3);
    // (lines, what stderr says, the code of the error line)
    let cases: Vec<(Vec<String>, &str, &str)> = vec![
        (
            vec![good[0].clone(), "{not json".into()],
            "line 2: not JSON",
            "invalid_data",
        ),
        (
            vec![good[0].clone(), r#"{"prompt": "x"}"#.into()],
            "line 2",
            "invalid_data",
        ),
        (vec![], "holds no samples", "data_too_small"),
        (
            vec![
                good[0].clone(),
                good[1].clone(),
                format!(
                    r#"{{"prompt": "{}", "completion": "y"}}"#,
                    "long ".repeat(40)
                ),
            ],
            "line 3: the sample has",
            "invalid_data",
        ),
        (
            vec![r#"{"messages": [{"role": "robot", "content": "x"}]}"#.into()],
            "line 1: message 0 has role \"robot\"",
            "invalid_data",
        ),
        (
            vec![r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "mask": 1}]}"#.into()],
            "line 1: the sample has no unmasked assistant turn",
            "invalid_data",
        ),
        // One sample leaves nothing to hold out for the (default) eval split.
        (vec![good[0].clone()], "too few to hold out", "data_too_small"),
    ];
    std::fs::write(t.join("experts.json"), r#"{"experts": {"1": [0]}}"#).unwrap();
    for (lines, want, code) in cases {
        let data = t.join("bad.jsonl");
        write_lines(&data, &lines);
        let out = t.join("adapters/bad");
        let o = esft_train(&[
            "train",
            "--model",
            s(&fixture("lite")),
            "--data",
            s(&data),
            "--experts",
            s(&t.join("experts.json")),
            "--out",
            s(&out),
            "--seq-len",
            "48",
            "--steps",
            "1",
            "--json",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{want}: {err}");
        // Nothing but the error line: training never started.
        let stdout = String::from_utf8(o.stdout).unwrap();
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 1, "{stdout}");
        let line: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(
            (&line["task"], &line["event"], &line["code"]),
            (&"train".into(), &"error".into(), &code.into()),
            "{want}: {line}"
        );
        // The message names the file, not where it lies.
        let message = line["message"].as_str().unwrap();
        assert!(message.contains(want), "{message}");
        assert!(message.starts_with("bad.jsonl"), "{message}");
        assert!(!message.contains(s(t)), "{message}");
        assert!(!out.exists() && !t.join("adapters/.bad.train-state").exists());
    }
    // A bad expert config is refused too.
    std::fs::write(t.join("experts.json"), r#"{"experts": {"0": [1]}}"#).unwrap();
    let data = t.join("ok.jsonl");
    write_lines(&data, &good);
    let o = esft_train(&[
        "train",
        "--model",
        s(&fixture("lite")),
        "--data",
        s(&data),
        "--experts",
        s(&t.join("experts.json")),
        "--out",
        s(&t.join("adapters/x")),
        "--steps",
        "1",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a MoE layer"));
}

#[test]
fn a_killed_run_resumes_and_never_shows_a_partial_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let data = t.join("train.jsonl");
    write_lines(&data, &task_lines(40));
    std::fs::write(
        t.join("experts.json"),
        r#"{"experts": {"1": [0, 5, 9], "2": [3]}, "shared_experts": true}"#,
    )
    .unwrap();
    let args = |out: &Path| -> Vec<String> {
        [
            "train",
            "--model",
            s(&fixture("lite")),
            "--data",
            s(&data),
            "--experts",
            s(&t.join("experts.json")),
            "--out",
            s(out),
            "--steps",
            "400",
            "--lr",
            "1e-3",
            "--batch",
            "1",
            "--seq-len",
            "64",
            "--eval-split",
            "0.1",
            "--eval-every",
            "50",
            "--save-every",
            "1",
            "--json",
        ]
        .iter()
        .map(|v| v.to_string())
        .collect()
    };
    let out = t.join("adapters/resumed");
    let state = t.join("adapters/.resumed.train-state");
    kill_after_a_save(&args(&out), &state);
    assert!(
        !out.exists(),
        "a partial adapter is visible under the final name"
    );
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("state.json")).unwrap()).unwrap();
    let step = saved["step"].as_u64().unwrap();
    assert!((1..400).contains(&step), "{step}");

    // Without --resume the leftover state is not overwritten.
    let o = esft_train(&args(&out).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    let mut resume = args(&out);
    resume.push("--resume".into());
    let o = esft_train(&resume.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains(&format!("at step {step}")));
    let resumed = events(&String::from_utf8(o.stdout).unwrap());
    assert_eq!(resumed[0]["event"], "start");
    assert_eq!(resumed[0]["step"], step);
    assert_eq!(resumed[1]["resumed_at"], step);

    // The same run uninterrupted writes the same adapter, after the same tokens.
    let straight = t.join("adapters/straight");
    let uninterrupted = events(&ok(&args(&straight)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()));
    let tokens_at = |events: &[serde_json::Value], step: u64| {
        events
            .iter()
            .find(|e| e["event"] == "progress" && e["step"] == step)
            .map(|e| e["trained_tokens"].as_u64().unwrap())
    };
    assert_eq!(
        resumed[1]["trained_tokens"].as_u64(),
        tokens_at(&uninterrupted, step)
    );
    assert_eq!(tokens_at(&resumed, 400), tokens_at(&uninterrupted, 400));
    let (a_done, b_done) = (resumed.last().unwrap(), uninterrupted.last().unwrap());
    assert_eq!(a_done["event"], "done");
    assert_eq!(a_done["trained_tokens"], b_done["trained_tokens"]);
    assert_eq!(a_done["steps"], 400);
    let a = std::fs::read(out.join("adapter.safetensors")).unwrap();
    let b = std::fs::read(straight.join("adapter.safetensors")).unwrap();
    assert!(a == b, "resumed and uninterrupted runs differ");
    assert!(!state.exists());
}

/// The tokens of every sample of `data` as the fixture model reads them.
fn sample_tokens(data: &Path) -> u64 {
    let loaded = esft::model::LoadedModel::load(&fixture("lite"), &Default::default()).unwrap();
    let ids = esft_train::data::SpecialIds::of(loaded.model.config(), &loaded.tokenizer).unwrap();
    esft_train::data::load_train(data, &loaded.tokenizer, ids, Default::default())
        .unwrap()
        .iter()
        .map(|s| s.len() as u64)
        .sum()
}

/// The last line of a failed `--json` command: its `error` event.
fn error_event(o: &std::process::Output) -> serde_json::Value {
    assert!(!o.status.success());
    let stdout = String::from_utf8_lossy(&o.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let e: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(e["event"], "error", "{stdout}");
    e
}

#[test]
fn epochs_train_on_every_sample_that_many_times() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let data = t.join("train.jsonl");
    write_lines(&data, &task_lines(30));
    std::fs::write(
        t.join("experts.json"),
        r#"{"experts": {"1": [0, 5], "2": [3]}}"#,
    )
    .unwrap();
    let tokens = sample_tokens(&data);
    let (model, experts) = (fixture("lite"), t.join("experts.json"));
    let run = |name: &str, extra: &[&str]| {
        let out = t.join("adapters").join(name);
        let mut args = vec![
            "train",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--experts",
            s(&experts),
            "--out",
            s(&out),
            "--lr",
            "1e-3",
            "--batch",
            "4",
            "--seq-len",
            "64",
            "--eval-split",
            "0",
            "--json",
        ];
        args.extend(extra);
        esft_train(&args)
    };
    for (epochs, accum) in [("1", "1"), ("3", "1"), ("2", "3")] {
        let o = run("ep", &["--epochs", epochs, "--grad-accum", accum]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let ev = events(&String::from_utf8(o.stdout).unwrap());
        let steps = ev[0]["steps"].as_u64().unwrap();
        assert_eq!(ev[0]["event"], "start");
        assert_eq!(ev[0]["total"], steps);
        let progress: Vec<_> = ev.iter().filter(|e| e["event"] == "progress").collect();
        assert_eq!(progress.len() as u64, steps);
        assert!(progress.iter().all(|e| e["total_steps"] == steps));
        let done = ev.last().unwrap();
        assert_eq!(
            (&done["event"], &done["steps"]),
            (&"done".into(), &steps.into())
        );
        let trained = done["trained_tokens"].as_u64().unwrap();
        let epochs: u64 = epochs.parse().unwrap();
        if accum == "1" {
            // Every sample exactly `epochs` times.
            assert_eq!(trained, epochs * tokens, "{epochs} epochs");
        } else {
            // Whole steps: less than one step (3 micro-batches of 4 x 64 tokens) more.
            assert!(
                (epochs * tokens..epochs * tokens + 3 * 256).contains(&trained),
                "{trained} tokens for {epochs} epochs of {tokens}"
            );
        }
        // Several samples share a micro-batch of 4 x 64 tokens.
        let micro_per_epoch = steps * accum.parse::<u64>().unwrap() / epochs;
        assert!(
            (tokens / 256..30).contains(&micro_per_epoch),
            "{micro_per_epoch} micro-batches an epoch"
        );
        std::fs::remove_dir_all(t.join("adapters/ep")).unwrap();
    }
    // One of --steps and --epochs; --epochs is at least 1.
    for extra in [&["--epochs", "2", "--steps", "5"][..], &["--epochs", "0"]] {
        let o = run("bad", extra);
        let e = error_event(&o);
        assert_eq!(
            (&e["task"], &e["code"]),
            (&"train".into(), &"internal".into())
        );
        assert!(!t.join("adapters/bad").exists());
    }
}

#[test]
fn eval_data_comes_from_its_own_file_and_belongs_to_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let lines = task_lines(46);
    let (data, eval) = (t.join("train.jsonl"), t.join("held-out.jsonl"));
    write_lines(&data, &lines[..40]);
    write_lines(&eval, &lines[40..]);
    std::fs::write(
        t.join("experts.json"),
        r#"{"experts": {"1": [0, 5], "2": [3]}}"#,
    )
    .unwrap();
    let args = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            "--model",
            s(&fixture("lite")),
            "--data",
            s(&data),
            "--experts",
            s(&t.join("experts.json")),
            "--out",
            s(out),
            "--lr",
            "1e-3",
            "--batch",
            "1",
            "--seq-len",
            "64",
            "--eval-data",
            s(&eval),
            "--json",
        ]
        .iter()
        .map(|v| v.to_string())
        .collect();
        v.extend(extra.iter().map(|v| v.to_string()));
        v
    };
    let run = |out: &Path, extra: &[&str]| {
        esft_train(
            &args(out, extra)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
    };

    let o = run(
        &t.join("adapters/a"),
        &["--steps", "4", "--eval-every", "2"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ev = events(&String::from_utf8(o.stdout).unwrap());
    assert_eq!(
        (&ev[0]["train_samples"], &ev[0]["eval_samples"]),
        (&40.into(), &6.into())
    );
    let evals: Vec<_> = ev.iter().filter(|e| e["event"] == "eval").collect();
    assert_eq!(evals.len(), 2);
    assert!(evals.iter().all(|e| e["eval_loss"].as_f64().unwrap() > 0.0));
    let done = ev.last().unwrap();
    assert!(done["best_step"] == 2 || done["best_step"] == 4, "{done}");
    // --eval-split 0 is what --eval-data means; another share is refused.
    let o = run(
        &t.join("adapters/b"),
        &["--steps", "1", "--eval-split", "0"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(
        &t.join("adapters/c"),
        &["--steps", "1", "--eval-split", "0.1"],
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("--eval-data"));
    assert_eq!(error_event(&o)["code"], "internal");

    // A bad held-out line is bad data, named by its file.
    write_lines(&eval, &[lines[40].clone(), r#"{"prompt": 1}"#.into()]);
    let o = run(&t.join("adapters/d"), &["--steps", "1"]);
    let e = error_event(&o);
    assert_eq!(e["code"], "invalid_data");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .starts_with("held-out.jsonl line 2"),
        "{e}"
    );
    assert!(!t.join("adapters/d").exists());

    // A resume continues only the run made with the same held-out data.
    write_lines(&eval, &lines[40..]);
    let out = t.join("adapters/resumed");
    let state = t.join("adapters/.resumed.train-state");
    let long = ["--steps", "400", "--eval-every", "100", "--save-every", "1"];
    kill_after_a_save(&args(&out, &long), &state);
    write_lines(&eval, &lines[39..]);
    let mut resume = long.to_vec();
    resume.push("--resume");
    let o = run(&out, &resume);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("eval_data was"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    write_lines(&eval, &lines[40..]);
    // A state saved without its token count gets it recomputed.
    let saved = state.join("state.json");
    let mut st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    assert!(st["trained_tokens"].as_u64().unwrap() > 0);
    st.as_object_mut().unwrap().remove("trained_tokens");
    std::fs::write(&saved, st.to_string()).unwrap();
    let o = run(&out, &resume);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let resumed = events(&String::from_utf8(o.stdout).unwrap());
    let straight = events(&ok(&args(&t.join("adapters/straight"), &long)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()));
    let (a, b) = (resumed.last().unwrap(), straight.last().unwrap());
    assert_eq!(a["trained_tokens"], b["trained_tokens"]);
    assert_eq!(a["best_eval_loss"], b["best_eval_loss"]);
    let a = std::fs::read(out.join("adapter.safetensors")).unwrap();
    let b = std::fs::read(t.join("adapters/straight/adapter.safetensors")).unwrap();
    assert!(a == b, "resumed and uninterrupted runs differ");
}

#[test]
fn a_diverging_loss_stops_the_run_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let data = t.join("train.jsonl");
    write_lines(&data, &task_lines(30));
    std::fs::write(
        t.join("experts.json"),
        r#"{"experts": {"1": [0, 5, 9], "2": [3]}}"#,
    )
    .unwrap();
    let out = t.join("adapters/diverged");
    // A learning rate far too high for any model drives the weights out of range.
    let o = esft_train(&[
        "train",
        "--model",
        s(&fixture("lite")),
        "--data",
        s(&data),
        "--experts",
        s(&t.join("experts.json")),
        "--out",
        s(&out),
        "--steps",
        "50",
        "--lr",
        "1e6",
        "--batch",
        "1",
        "--seq-len",
        "64",
        "--eval-split",
        "0.1",
        "--eval-every",
        "1",
        "--save-every",
        "1",
        "--json",
    ]);
    let e = error_event(&o);
    assert_eq!(
        (&e["task"], &e["code"]),
        (&"train".into(), &"nan_loss".into()),
        "{e}"
    );
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("at step"), "{message}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    // It ran for a while, then stopped at once.
    assert!(stdout.contains(r#""event":"save""#), "{stdout}");
    assert!(!stdout.contains(r#""step":50,"#), "{stdout}");
    assert!(String::from_utf8_lossy(&o.stderr).contains(message));
    assert!(!out.exists(), "an adapter was written");
    assert!(!t.join("adapters/.diverged.train-state").exists());
    let left: Vec<_> = std::fs::read_dir(t.join("adapters")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn score_and_select_end_json_runs_with_an_outcome_line() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let score = |data: &Path| {
        esft_train(&[
            "score",
            "--model",
            s(&fixture("lite")),
            "--data",
            s(data),
            "--tokens",
            "200",
            "--out",
            s(&t.join("scores.json")),
            "--json",
        ])
    };
    let empty = t.join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    let e = error_event(&score(&empty));
    assert_eq!(
        (&e["task"], &e["code"]),
        (&"score".into(), &"data_too_small".into())
    );
    assert_eq!(e["message"], "empty.jsonl: the file holds no samples");
    let bad = t.join("bad.jsonl");
    write_lines(&bad, &[task_lines(1)[0].clone(), "[]".into()]);
    assert_eq!(error_event(&score(&bad))["code"], "invalid_data");
    assert!(!t.join("scores.json").exists());

    let data = t.join("train.jsonl");
    write_lines(&data, &task_lines(10));
    let o = score(&data);
    assert!(o.status.success());
    let select = |scores: &Path| {
        esft_train(&[
            "select",
            "--scores",
            s(scores),
            "--score-function",
            "token",
            "--top-p",
            "0.2",
            "--out",
            s(&t.join("experts.json")),
            "--json",
        ])
    };
    let o = select(&t.join("scores.json"));
    assert!(o.status.success());
    let done = events(&String::from_utf8(o.stdout).unwrap());
    assert_eq!(
        (&done[0]["task"], &done[0]["event"]),
        (&"select".into(), &"done".into())
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.join("experts.json")).unwrap()).unwrap();
    let count: usize = cfg["experts"]
        .as_object()
        .unwrap()
        .values()
        .map(|l| l.as_array().unwrap().len())
        .sum();
    assert_eq!(done[0]["experts"], count);
    let e = error_event(&select(&t.join("missing.json")));
    assert_eq!(
        (&e["task"], &e["code"]),
        (&"select".into(), &"internal".into())
    );
}

#[test]
fn score_select_train_eval_merge_on_every_architecture() {
    for name in ["deepseek-v3", "qwen3-moe-dense0", "olmoe"] {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let model = fixture(name);
        let data = t.join("train.jsonl");
        write_lines(&data, &task_lines(20));
        let (scores, experts) = (t.join("scores.json"), t.join("experts.json"));
        ok(&[
            "score",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--tokens",
            "300",
            "--out",
            s(&scores),
        ]);
        ok(&[
            "select",
            "--scores",
            s(&scores),
            "--score-function",
            "token",
            "--top-p",
            "0.3",
            "--out",
            s(&experts),
        ]);
        let adapter = t.join("adapters/task");
        let stdout = ok(&[
            "train",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--experts",
            s(&experts),
            "--out",
            s(&adapter),
            "--steps",
            "12",
            "--lr",
            "1e-2",
            "--batch",
            "2",
            "--seq-len",
            "64",
            "--json",
        ]);
        let losses: Vec<f64> = events(&stdout)
            .iter()
            .filter(|e| e["event"] == "progress")
            .map(|e| e["loss"].as_f64().unwrap())
            .collect();
        assert_eq!(losses.len(), 12, "{name}");
        assert!(
            losses[9..].iter().sum::<f64>() < losses[..3].iter().sum::<f64>(),
            "{name}: the loss does not fall: {losses:?}"
        );
        // The adapter holds exactly the selected experts.
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&experts).unwrap()).unwrap();
        let selected: usize = cfg["experts"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_array().unwrap().len())
            .sum();
        let tensors = candle_core::safetensors::load(
            adapter.join("adapter.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert_eq!(tensors.len(), 3 * selected, "{name}");
        let with: serde_json::Value = serde_json::from_str(
            ok(&[
                "eval",
                "--model",
                s(&model),
                "--adapter",
                s(&adapter),
                "--data",
                s(&data),
                "--metric",
                "loss",
            ])
            .trim(),
        )
        .unwrap();
        let without: serde_json::Value = serde_json::from_str(
            ok(&[
                "eval",
                "--model",
                s(&model),
                "--data",
                s(&data),
                "--metric",
                "loss",
            ])
            .trim(),
        )
        .unwrap();
        assert!(
            with["score"].as_f64().unwrap() < without["score"].as_f64().unwrap(),
            "{name}: {with} vs {without}"
        );
        // The merged checkpoint evaluates as the adapter does.
        let merged = t.join("merged");
        ok(&[
            "merge",
            "--model",
            s(&model),
            "--adapter",
            s(&adapter),
            "--out",
            s(&merged),
        ]);
        let merged_eval: serde_json::Value = serde_json::from_str(
            ok(&[
                "eval",
                "--model",
                s(&merged),
                "--data",
                s(&data),
                "--metric",
                "loss",
            ])
            .trim(),
        )
        .unwrap();
        let d = (merged_eval["score"].as_f64().unwrap() - with["score"].as_f64().unwrap()).abs();
        assert!(
            d < 1e-5,
            "{name}: merged vs adapter eval loss differ by {d}"
        );
    }
}
