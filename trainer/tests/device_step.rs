//! ESFT training on a GPU against the same run on the CPU (builds with the `cuda` feature;
//! run on a machine with a GPU, `ESFT_TEST_DEVICE=cuda:0`, by `scripts/gpu-check.sh`):
//! the same selection, the same samples, three optimizer steps each. The losses and
//! gradient norms agree, the trained experts agree, and every frozen weight on the GPU is
//! bit-identical to what was loaded, with the frozen matrices kept in f32 and in bf16.
#![cfg(feature = "cuda")]

mod common;

use candle_core::Tensor;
use std::collections::BTreeMap;

use common::{fixture, small_train_config, task_samples, token_selection, values};
use esft::model::{Decoder, LoadOptions, LoadedModel};
use esft_train::train::{Run, Trainable};

fn options(device: &str, weight_dtype: Option<&str>) -> LoadOptions {
    esft::cli::DeviceArgs {
        device: device.into(),
        dtype: "f32".into(),
        weight_dtype: weight_dtype.map(str::to_string),
    }
    .load_options()
    .unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-12)
}

#[test]
fn three_esft_steps_on_the_gpu_match_the_cpu() {
    let device = std::env::var("ESFT_TEST_DEVICE").unwrap_or_else(|_| "cuda:0".into());
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("lite");
    let loaded = LoadedModel::load(&dir, &LoadOptions::default()).unwrap();
    let samples = task_samples(&loaded, tmp.path(), 24);
    let experts = token_selection(&loaded.model, &samples, 0.3);

    // Scoring on the GPU selects what scoring on the CPU selects.
    let gpu = Decoder::load_dir(&dir, &options(&device, None)).unwrap();
    assert_eq!(token_selection(&gpu, &samples, 0.3), experts);
    drop(gpu);

    let what = Trainable::Experts(experts.clone());
    let train_cfg = small_train_config(3, 3);
    for weights in [None, Some("bf16")] {
        let runs: Vec<(Run, BTreeMap<String, Tensor>)> = [("cpu", weights), (&device, weights)]
            .into_iter()
            .map(|(dev, w)| {
                let mut model = Decoder::load_dir(&dir, &options(dev, w)).unwrap();
                let before = model.checkpoint_tensors().unwrap().into_iter().collect();
                let run =
                    Run::new(model, &what, samples.clone(), Vec::new(), train_cfg.clone()).unwrap();
                (run, before)
            })
            .collect();
        let [(mut cpu, _), (mut gpu, gpu_before)] = <[_; 2]>::try_from(runs).ok().unwrap();
        for step in 0..3 {
            let (a, b) = (cpu.train_step().unwrap(), gpu.train_step().unwrap());
            eprintln!(
                "weights {weights:?} step {step}: loss cpu {:.6} gpu {:.6}, grad norm cpu {:.6} gpu {:.6}",
                a.loss, b.loss, a.grad_norm, b.grad_norm
            );
            assert!(
                rel(a.loss, b.loss) < 1e-4,
                "step {step}: {} vs {}",
                a.loss,
                b.loss
            );
            assert!(
                rel(a.grad_norm, b.grad_norm) < 1e-3,
                "step {step} grad norm"
            );
        }
        let trained_cpu: BTreeMap<String, Tensor> =
            cpu.result_tensors().unwrap().into_iter().collect();
        let trained_gpu: BTreeMap<String, Tensor> =
            gpu.result_tensors().unwrap().into_iter().collect();
        assert_eq!(trained_cpu.len(), trained_gpu.len());
        for (name, t) in &trained_cpu {
            let (a, b) = (values(t), values(&trained_gpu[name]));
            let diff = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-4, "{name}: trained weights differ by {diff}");
        }
        let after: BTreeMap<String, Tensor> = gpu
            .model
            .checkpoint_tensors()
            .unwrap()
            .into_iter()
            .collect();
        for (name, t) in &gpu_before {
            if !trained_gpu.contains_key(name) {
                let same = values(t)
                    .iter()
                    .map(|v| v.to_bits())
                    .eq(values(&after[name]).iter().map(|v| v.to_bits()));
                assert!(same, "{name} is frozen but changed on the GPU");
                assert_eq!(t.dtype(), after[name].dtype(), "{name} changed dtype");
            }
        }
    }
}
