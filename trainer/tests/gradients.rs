//! The training forward's gradients against central finite differences, in f64 on a
//! fixture model: routed experts (through frozen later layers), shared experts and
//! non-expert weights (attention with its absorbed factors, norms, the LM head), and no
//! gradient at all for frozen weights.

use candle_core::{DType, Device, Tensor, Var};
use std::path::PathBuf;

use esft::model::{Decoder, LoadOptions, LogitsWanted, RoutingRecord, SeqInput, WeightKind};
use esft_train::data::Sample;
use esft_train::train::group_loss;

fn model_f64() -> Decoder {
    fixture_f64("lite")
}

fn fixture_f64(name: &str) -> Decoder {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name);
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype: DType::F64,
        matrix_dtype: None,
    };
    let mut m = Decoder::load_dir(&dir, &opts).unwrap();
    // candle's fused kernels have no f64 version.
    m.set_differentiable(true);
    m
}

fn samples() -> Vec<Sample> {
    let a: Vec<u32> = vec![0, 17, 230, 5, 99, 412, 8, 8, 301, 77, 150, 1];
    let b: Vec<u32> = vec![0, 3, 44, 500, 12, 1];
    [a, b]
        .into_iter()
        .enumerate()
        .map(|(i, tokens)| {
            let trained = (0..tokens.len()).map(|j| j >= 3).collect();
            Sample {
                line: i + 1,
                tokens,
                trained,
            }
        })
        .collect()
}

fn loss(model: &Decoder, s: &[Sample]) -> Tensor {
    let refs: Vec<&Sample> = s.iter().collect();
    let l = group_loss(model, None, &refs, true).unwrap();
    let mean = (l.nll / l.targets as f64).unwrap();
    match l.balance {
        Some(b) => (mean + b).unwrap(),
        None => mean,
    }
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

/// The most used routed expert of `layer` on the samples.
fn busiest_expert(model: &Decoder, s: &[Sample], layer: usize) -> usize {
    let mut caches: Vec<_> = s.iter().map(|_| model.new_cache()).collect();
    let mut batch: Vec<SeqInput<'_>> = s
        .iter()
        .zip(caches.iter_mut())
        .map(|(x, cache)| SeqInput {
            tokens: &x.tokens,
            cache,
            experts: None,
            logits: LogitsWanted::None,
        })
        .collect();
    let mut rec = RoutingRecord::default();
    model.forward(&mut batch, Some(&mut rec)).unwrap();
    let r = rec.layers.iter().find(|r| r.layer == layer).unwrap();
    let mut counts = vec![0; 64];
    for &e in &r.ids {
        counts[e as usize] += 1;
    }
    (0..counts.len())
        .max_by_key(|&e| (counts[e], usize::MAX - e))
        .unwrap()
}

/// Checks `count` spread-out elements of `var` against central differences.
fn check(model: &mut Decoder, s: &[Sample], name: &str, var: &Var, grad: &Tensor, count: usize) {
    let original = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let analytic = grad.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let n = original.len();
    let eps = 1e-5;
    let mut checked_nonzero = 0;
    for k in 0..count {
        let i = (k * 7919 + 13) % n;
        let mut at = |delta: f64| {
            let mut v = original.clone();
            v[i] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            model.refresh_derived().unwrap();
            scalar(&loss(model, s))
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        at(0.0);
        let a = analytic[i];
        let tol = 1e-6 + 1e-4 * a.abs().max(numeric.abs());
        assert!(
            (a - numeric).abs() <= tol,
            "{name}[{i}]: analytic {a:e}, numeric {numeric:e}"
        );
        if a.abs() > 1e-9 {
            checked_nonzero += 1;
        }
    }
    assert!(
        checked_nonzero > 0,
        "{name}: every checked gradient was zero"
    );
}

#[test]
fn selected_expert_gradients_match_finite_differences() {
    let s = samples();
    let mut model = model_f64();
    // Layer 1's busiest expert: its gradient flows back through all of layer 2, frozen.
    let e1 = busiest_expert(&model, &s, 1);
    let e2 = busiest_expert(&model, &s, 2);
    let frozen_head = model
        .checkpoint_tensors()
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == "lm_head.weight")
        .unwrap()
        .1;
    let weights = model
        .make_trainable(|k| {
            matches!(*k, WeightKind::RoutedExpert { layer: 1, expert } if expert == e1)
                || matches!(*k, WeightKind::RoutedExpert { layer: 2, expert } if expert == e2)
                || matches!(*k, WeightKind::SharedExperts { layer: 2 })
        })
        .unwrap();
    assert_eq!(weights.len(), 6);
    let grads = loss(&model, &s).backward().unwrap();
    assert!(
        grads.get(&frozen_head).is_none(),
        "a frozen weight got a gradient"
    );
    for w in &weights {
        let g = grads
            .get(w.var.as_tensor())
            .unwrap_or_else(|| panic!("{}: no gradient", w.name));
        check(&mut model, &s, &w.name, &w.var, g, 6);
    }
}

#[test]
fn non_expert_gradients_match_finite_differences() {
    let s = samples();
    let mut model = model_f64();
    let weights = model.make_trainable(|k| *k == WeightKind::Other).unwrap();
    let grads = loss(&model, &s).backward().unwrap();
    for name in [
        "model.layers.2.self_attn.kv_b_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.2.mlp.gate.weight",
        "model.layers.0.mlp.gate_up_proj.weight",
        "model.embed_tokens.weight",
        "lm_head.weight",
    ] {
        let w = weights
            .iter()
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("{name}"));
        let g = grads
            .get(w.var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        check(&mut model, &s, name, &w.var, g, 4);
    }
}

#[test]
fn load_balancing_loss_gradients_match_finite_differences() {
    let s = samples();
    let mut model = model_f64();
    // A large alpha so the balance term dominates the router's gradient.
    model.set_balance_alpha(0.5);
    let weights = model.make_trainable(|k| *k == WeightKind::Other).unwrap();
    let refs: Vec<&Sample> = s.iter().collect();
    let balance = group_loss(&model, None, &refs, true)
        .unwrap()
        .balance
        .unwrap();
    // Two MoE layers, each at least alpha (the loss is minimal, alpha, when balanced).
    let b = scalar(&balance);
    assert!(b >= 2.0 * 0.5 - 1e-9, "balance loss {b}");
    let grads = loss(&model, &s).backward().unwrap();
    for name in [
        "model.layers.1.mlp.gate.weight",
        "model.layers.2.mlp.gate.weight",
        "model.layers.1.self_attn.o_proj.weight",
    ] {
        let w = weights.iter().find(|w| w.name == name).unwrap();
        let g = grads.get(w.var.as_tensor()).unwrap();
        check(&mut model, &s, name, &w.var, g, 4);
    }
}

#[test]
fn every_architecture_gets_gradients_that_match_finite_differences() {
    let s = samples();
    let cases: [(&str, &[&str]); 3] = [
        // Grouped-query attention with per-head q/k norm, half-split RoPE, a dense layer 0.
        (
            "qwen3-moe-dense0",
            &[
                "model.layers.1.self_attn.q_norm.weight",
                "model.layers.1.self_attn.k_proj.weight",
                "model.layers.2.self_attn.v_proj.weight",
                "model.layers.2.mlp.gate.weight",
                "model.layers.0.mlp.gate_up_proj.weight",
            ],
        ),
        // q/k norm over the whole projection.
        (
            "olmoe",
            &[
                "model.layers.0.self_attn.q_norm.weight",
                "model.layers.1.self_attn.k_norm.weight",
                "model.layers.1.self_attn.q_proj.weight",
                "model.layers.2.mlp.gate.weight",
            ],
        ),
        // The sigmoid router with its selection bias, q LoRA.
        (
            "deepseek-v3",
            &[
                "model.layers.1.mlp.gate.weight",
                "model.layers.2.mlp.gate.weight",
                "model.layers.1.self_attn.q_a_layernorm.weight",
                "model.layers.2.mlp.shared_experts.gate_up_proj.weight",
            ],
        ),
    ];
    for (fixture, names) in cases {
        let mut model = fixture_f64(fixture);
        let weights = model.make_trainable(|_| true).unwrap();
        // DeepSeek-V3's selection bias has no gradient and is never trained.
        assert!(weights
            .iter()
            .all(|w| !w.name.ends_with("e_score_correction_bias")));
        let grads = loss(&model, &s).backward().unwrap();
        for &name in names {
            let w = weights
                .iter()
                .find(|w| w.name == name)
                .unwrap_or_else(|| panic!("{fixture}: {name}"));
            let g = grads
                .get(w.var.as_tensor())
                .unwrap_or_else(|| panic!("{fixture} {name}: no gradient"));
            check(&mut model, &s, &format!("{fixture} {name}"), &w.var, g, 4);
        }
    }
}

#[test]
fn sigmoid_router_balance_loss_gradients_match_finite_differences() {
    // DeepSeek-V3: the balance loss over each token's sigmoid scores divided by their sum.
    let s = samples();
    let mut model = fixture_f64("deepseek-v3");
    model.set_balance_alpha(0.5);
    let weights = model.make_trainable(|k| *k == WeightKind::Other).unwrap();
    let refs: Vec<&Sample> = s.iter().collect();
    let balance = group_loss(&model, None, &refs, true)
        .unwrap()
        .balance
        .unwrap();
    // Two MoE layers, each at least alpha (the loss is minimal, alpha, when balanced).
    let b = scalar(&balance);
    assert!(b >= 2.0 * 0.5 - 1e-9, "balance loss {b}");
    let grads = loss(&model, &s).backward().unwrap();
    for name in [
        "model.layers.1.mlp.gate.weight",
        "model.layers.2.mlp.gate.weight",
    ] {
        let w = weights.iter().find(|w| w.name == name).unwrap();
        let g = grads.get(w.var.as_tensor()).unwrap();
        check(&mut model, &s, name, &w.var, g, 4);
    }
}
