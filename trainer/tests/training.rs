//! ESFT training on a fixture model: the loss falls, frozen weights stay bit-identical,
//! only the selected experts change, and the written adapter, loaded the way the server
//! loads adapters, reproduces the trained in-memory model.

use candle_core::{DType, Tensor};
use std::collections::BTreeMap;

mod common;

use common::{fixture, small_train_config, task_samples, token_selection, write_task};
use esft::adapter::format::{BaseModel, Provenance};
use esft::engine::{generate_all, SamplingParams, Sequence};
use esft::model::{Decoder, ExpertMap, LoadOptions, LoadedModel, LogitsWanted, SeqInput};
use esft_train::data::{load_train, Limits, Sample, SpecialIds};
use esft_train::train::{write_result, Run, Schedule, TrainConfig, Trainable};

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn logits_all(model: &Decoder, experts: Option<&ExpertMap>, tokens: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache();
    let mut batch = [SeqInput {
        tokens,
        cache: &mut cache,
        experts,
        logits: LogitsWanted::All,
    }];
    let out = model.forward(&mut batch, None).unwrap();
    out.logits
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn greedy(
    loaded: &LoadedModel,
    model: &Decoder,
    experts: Option<std::sync::Arc<ExpertMap>>,
    prompt: &[u32],
) -> Vec<u32> {
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: 12,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let mut seqs = [Sequence::new(
        prompt.to_vec(),
        params,
        model.new_cache(),
        loaded.eos_ids(),
        4096,
    )];
    seqs[0].experts = experts;
    generate_all(model, None, &mut seqs, 64).unwrap();
    seqs[0].generated().to_vec()
}

#[test]
fn esft_training_changes_only_selected_experts_and_the_adapter_reproduces_it() {
    check_esft_training("lite");
}

#[test]
fn esft_training_works_the_same_on_every_architecture() {
    for name in ["deepseek-v3", "qwen3-moe", "qwen3-moe-dense0", "olmoe"] {
        check_esft_training(name);
    }
}

/// Scores the experts on a task, selects by token score, trains the selection and writes
/// the adapter: the loss halves, only the selected experts change, and the adapter loaded
/// as the server loads it reproduces the trained model.
fn check_esft_training(name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture(name);
    let loaded = LoadedModel::load(&dir, &LoadOptions::default()).unwrap();
    let samples = task_samples(&loaded, tmp.path(), 24);
    let cfg = loaded.model.config().clone();
    let experts = token_selection(&loaded.model, &samples, 0.3);
    let selected = experts.expert_count();
    assert!(
        selected >= 2 && selected < cfg.moe_layers().len() * cfg.n_routed_experts / 2,
        "{name}: {selected}"
    );
    let train_cfg = small_train_config(30, 3);
    let what = Trainable::Experts(experts.clone());
    let base_model = Decoder::load_dir(&dir, &LoadOptions::default()).unwrap();
    let mut run = Run::new(base_model, &what, samples.clone(), Vec::new(), train_cfg).unwrap();
    let mut losses = Vec::new();
    while run.step() < 30 {
        losses.push(run.train_step().unwrap().loss);
    }
    let first = losses[..3].iter().sum::<f64>() / 3.0;
    let last = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(
        last < 0.5 * first,
        "{name}: loss {first:.3} -> {last:.3}: {losses:?}"
    );

    // Frozen weights are bit-identical; each selected expert changed.
    let mut base = Decoder::load_dir(&dir, &LoadOptions::default()).unwrap();
    let before: BTreeMap<String, Tensor> = base.checkpoint_tensors().unwrap().into_iter().collect();
    let after: BTreeMap<String, Tensor> = run
        .model
        .checkpoint_tensors()
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(before.len(), after.len());
    let mut changed = 0;
    for (tensor, t) in &before {
        let is_selected = experts.experts.iter().any(|(layer, list)| {
            list.iter()
                .any(|e| tensor.starts_with(&format!("model.layers.{layer}.mlp.experts.{e}.")))
        });
        let same = bits(t) == bits(&after[tensor]);
        if is_selected {
            assert!(!same, "{tensor} was selected but did not change");
            changed += 1;
        } else {
            assert!(same, "{tensor} is frozen but changed");
        }
    }
    assert_eq!(changed, selected * 3);

    // The written adapter, loaded as the server loads adapters, equals the trained model.
    let out = tmp.path().join("adapters/task");
    let base_id = BaseModel::new(loaded.model.config().clone(), loaded.store.clone());
    write_result(&run, &what, &base_id, &dir, &out, Provenance::default()).unwrap();
    let mut served = LoadedModel::load(&dir, &LoadOptions::default()).unwrap();
    let map = esft::adapter::apply_adapter_dir(&mut served, &out, DType::F32).unwrap();
    run.model.set_differentiable(false);
    for s in samples.iter().take(3) {
        let prompt: Vec<u32> = s.tokens[..s.trained.iter().position(|&t| t).unwrap()].to_vec();
        let a = logits_all(&run.model, None, &prompt);
        let b = logits_all(&served.model, Some(&map), &prompt);
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "{name}: logits differ by {diff}");
        let trained = greedy(&loaded, &run.model, None, &prompt);
        assert_eq!(
            trained,
            greedy(&loaded, &served.model, Some(map.clone()), &prompt)
        );
        // Training taught the answer: the base model says something else.
        assert_ne!(trained, greedy(&loaded, &loaded.model, None, &prompt));
    }
}

#[test]
fn an_interrupted_run_resumes_to_the_same_result() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("lite");
    let data = tmp.path().join("task.jsonl");
    write_task(&data, 20);
    let loaded = LoadedModel::load(&dir, &LoadOptions::default()).unwrap();
    let ids = SpecialIds::of(loaded.model.config(), &loaded.tokenizer).unwrap();
    let samples: Vec<Sample> =
        load_train(&data, &loaded.tokenizer, ids, Limits::default()).unwrap();
    let (train, eval) = esft_train::train::split_eval(samples, 0.2, 5);
    let cfg = TrainConfig {
        steps: 8,
        lr: 5e-3,
        batch: 1,
        grad_accum: 2,
        seq_len: 48,
        warmup: 2,
        schedule: Schedule::Cosine,
        beta1: 0.9,
        beta2: 0.95,
        weight_decay: 0.1,
        max_grad_norm: 1.0,
        seed: 9,
        eval_split: 0.2,
        aux_loss_alpha: 0.0,
    };
    let mut ec = esft::adapter::ExpertConfig::default();
    ec.experts.insert(1, vec![3, 7]);
    ec.experts.insert(2, vec![0]);
    ec.shared_experts = true;
    let what = Trainable::Experts(ec);
    let new_run = || {
        let m = Decoder::load_dir(&dir, &LoadOptions::default()).unwrap();
        Run::new(m, &what, train.clone(), eval.clone(), cfg.clone()).unwrap()
    };
    let identity = serde_json::json!({"test": 1});
    let state = tmp.path().join("state");

    let mut straight = new_run();
    let mut first = new_run();
    for step in 1..=8 {
        straight.train_step().unwrap();
        if step % 3 == 0 {
            let l = straight.eval_loss().unwrap().unwrap();
            straight.note_eval(l).unwrap();
        }
        if step <= 5 {
            first.train_step().unwrap();
            if step % 3 == 0 {
                let l = first.eval_loss().unwrap().unwrap();
                first.note_eval(l).unwrap();
            }
        }
    }
    first.save(&state, &identity).unwrap();
    drop(first);
    let mut resumed = new_run();
    assert!(resumed
        .restore(&state, &serde_json::json!({"test": 2}))
        .unwrap_err()
        .to_string()
        .contains("test was 1 now 2"));
    resumed.restore(&state, &identity).unwrap();
    assert_eq!(resumed.step(), 5);
    for step in 6..=8 {
        resumed.train_step().unwrap();
        if step % 3 == 0 {
            let l = resumed.eval_loss().unwrap().unwrap();
            resumed.note_eval(l).unwrap();
        }
    }
    assert_eq!(resumed.best(), straight.best());
    let a = straight.result_tensors().unwrap();
    let b = resumed.result_tensors().unwrap();
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert_eq!(bits(ta), bits(tb), "{na}");
    }
    for (wa, wb) in straight.weights.iter().zip(&resumed.weights) {
        assert_eq!(
            bits(wa.var.as_tensor()),
            bits(wb.var.as_tensor()),
            "{}",
            wa.name
        );
    }
}
