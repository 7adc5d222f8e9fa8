//! ESFT training with the frozen matrices kept in bf16 (`--weight-dtype bf16`) against the
//! same training with every matrix widened to f32 at load: the bf16 fixture's values are
//! the same either way, so the losses, the gradient norms and the trained experts agree,
//! and the frozen bf16 matrices are untouched.

mod common;

use candle_core::{DType, Tensor};
use std::collections::BTreeMap;

use common::{fixture, small_train_config, task_samples, values};
use esft::adapter::format::ExpertConfig;
use esft::model::{Decoder, LoadOptions, LoadedModel};
use esft_train::train::{Run, Trainable};

#[test]
fn bf16_frozen_matrices_train_as_their_f32_values() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("lite-bf16");
    let loaded = LoadedModel::load(&dir, &LoadOptions::default()).unwrap();
    let samples = task_samples(&loaded, tmp.path(), 12);
    let experts: ExpertConfig = serde_json::from_value(serde_json::json!({
        "experts": {"1": [0, 3, 7], "2": [5]},
        "shared_experts": false,
        "non_expert_modules": false,
    }))
    .unwrap();
    let what = Trainable::Experts(experts);
    let cfg = small_train_config(3, 5);
    let mut runs = [None, Some(DType::BF16)].map(|matrices| {
        let opts = LoadOptions {
            matrix_dtype: matrices,
            ..LoadOptions::default()
        };
        let model = Decoder::load_dir(&dir, &opts).unwrap();
        Run::new(model, &what, samples.clone(), Vec::new(), cfg.clone()).unwrap()
    });
    let frozen_before: BTreeMap<String, Tensor> = runs[1]
        .model
        .checkpoint_tensors()
        .unwrap()
        .into_iter()
        .collect();
    for step in 0..3 {
        let wide = runs[0].train_step().unwrap();
        let narrow = runs[1].train_step().unwrap();
        assert!(
            (wide.loss - narrow.loss).abs() < 1e-5 * wide.loss.abs(),
            "step {step}: {} vs {}",
            wide.loss,
            narrow.loss
        );
        assert!((wide.grad_norm - narrow.grad_norm).abs() < 1e-4 * wide.grad_norm);
    }
    let [wide, narrow] = runs.each_ref().map(|r| {
        r.result_tensors()
            .unwrap()
            .into_iter()
            .collect::<BTreeMap<_, _>>()
    });
    assert_eq!(wide.len(), 12, "3 + 1 experts x gate, up, down");
    for (name, t) in &wide {
        assert_eq!(narrow[name].dtype(), DType::F32, "{name} trains in f32");
        let d = values(t)
            .iter()
            .zip(values(&narrow[name]))
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-5, "{name}: {d}");
    }
    let after: BTreeMap<String, Tensor> = runs[1]
        .model
        .checkpoint_tensors()
        .unwrap()
        .into_iter()
        .collect();
    for (name, t) in &frozen_before {
        if !wide.contains_key(name) {
            assert_eq!(after[name].dtype(), t.dtype(), "{name}");
            assert_eq!(values(&after[name]), values(t), "{name} is frozen");
        }
    }
    assert_eq!(
        after["model.layers.1.mlp.experts.1.up_proj.weight"].dtype(),
        DType::BF16
    );
}
