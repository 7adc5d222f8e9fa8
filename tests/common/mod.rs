//! Helpers shared by the integration tests: fixture paths and the reference outputs that
//! transformers recorded for each fixture (`reference.json`).
#![allow(dead_code)]

use std::path::PathBuf;

pub const FIXTURES: [&str; 10] = [
    "lite",
    "lite-yarn",
    "v2-grouped",
    "lite-bf16",
    "lite-yarn-sharded",
    "deepseek-v3",
    "deepseek-v3-noq",
    "qwen3-moe",
    "qwen3-moe-dense0",
    "olmoe",
];

/// How the model tests load a model: f32 compute on the device `ESFT_TEST_DEVICE` names
/// (`cpu`, the default, or `cuda:N` in a build with the `cuda` feature), opened once per
/// test binary. `scripts/gpu-check.sh` runs the parity, batch, adapter and scheduler tests
/// on a GPU this way.
pub fn load_options() -> esft::model::LoadOptions {
    static DEVICE: std::sync::OnceLock<candle_core::Device> = std::sync::OnceLock::new();
    let device = DEVICE.get_or_init(|| {
        let name = std::env::var("ESFT_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
        esft::cli::DeviceArgs {
            device: name,
            dtype: "f32".into(),
            weight_dtype: None,
        }
        .load_options()
        .unwrap()
        .device
    });
    esft::model::LoadOptions {
        device: device.clone(),
        ..esft::model::LoadOptions::default()
    }
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn reference(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The token ids of every reference prompt.
pub fn prompt_ids(r: &serde_json::Value) -> Vec<Vec<u32>> {
    r["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| u32s(&p["ids"]))
        .collect()
}

pub fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Copies a fixture into a fresh temporary directory (for tests that break it).
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    dir
}

use candle_core::{DType, Device, Tensor};
use esft::adapter::format::{new_manifest, write_adapter, ExpertConfig, Provenance};
use esft::adapter::BaseModel;

/// Which tensors a test adapter replaces.
pub struct AdapterSpec {
    pub experts: Vec<(usize, Vec<usize>)>,
    pub shared: bool,
    pub seed: u64,
}

/// New values for `name`: the base tensor plus noise as large as the tensor itself, so
/// outputs change clearly but stay in range.
pub fn perturbed(base: &BaseModel, name: &str, seed: u64) -> Tensor {
    let shape = base.store.shape(name).unwrap().to_vec();
    let t = base
        .store
        .get(name, &shape, DType::F32, &Device::Cpu)
        .unwrap();
    let n = t.elem_count();
    let mut state = seed.wrapping_mul(0x9E3779B97F4A7C15) ^ name.len() as u64;
    let noise: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect();
    (t + Tensor::from_vec(noise, shape, &Device::Cpu).unwrap()).unwrap()
}

pub fn spec_tensors(base: &BaseModel, spec: &AdapterSpec) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    let parts = ["gate_proj.weight", "up_proj.weight", "down_proj.weight"];
    for (layer, experts) in &spec.experts {
        for e in experts {
            for p in parts {
                let n = format!("model.layers.{layer}.mlp.experts.{e}.{p}");
                out.push((n.clone(), perturbed(base, &n, spec.seed)));
            }
        }
    }
    if spec.shared {
        for layer in base.config.moe_layers() {
            for p in parts {
                let n = format!("model.layers.{layer}.mlp.shared_experts.{p}");
                out.push((n.clone(), perturbed(base, &n, spec.seed)));
            }
        }
    }
    out
}

pub fn expert_config(spec: &AdapterSpec) -> ExpertConfig {
    ExpertConfig {
        experts: spec.experts.iter().cloned().collect(),
        shared_experts: spec.shared,
        non_expert_modules: false,
    }
}

/// Writes an adapter in our layout (`adapter.json` + `adapter.safetensors`).
pub fn write_native_adapter(base_dir: &std::path::Path, dir: &std::path::Path, spec: &AdapterSpec) {
    let base = BaseModel::open(base_dir).unwrap();
    let tensors = spec_tensors(&base, spec);
    let names: Vec<String> = tensors.iter().map(|t| t.0.clone()).collect();
    let name = dir.file_name().unwrap().to_str().unwrap();
    let m = new_manifest(
        name,
        &base,
        expert_config(spec),
        Provenance::default(),
        &names,
    )
    .unwrap();
    write_adapter(dir, &m, &tensors).unwrap();
}

/// Writes an adapter as the ESFT reference releases it (`expert_cfg.json`, keys without
/// the `model.` prefix).
pub fn write_reference_adapter(
    base_dir: &std::path::Path,
    dir: &std::path::Path,
    spec: &AdapterSpec,
) {
    let base = BaseModel::open(base_dir).unwrap();
    let tensors: std::collections::HashMap<String, Tensor> = spec_tensors(&base, spec)
        .into_iter()
        .map(|(n, t)| (n.strip_prefix("model.").unwrap().to_string(), t))
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("expert_cfg.json"),
        serde_json::to_string(&expert_config(spec)).unwrap(),
    )
    .unwrap();
}

/// Logits of every position of one sequence run alone through `model`.
pub fn logits_all(
    model: &esft::model::Decoder,
    ids: &[u32],
    map: Option<&esft::model::ExpertMap>,
) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    let mut batch = [esft::model::SeqInput {
        tokens: ids,
        cache: &mut cache,
        experts: map,
        logits: esft::model::LogitsWanted::All,
    }];
    model
        .forward(&mut batch, None)
        .unwrap()
        .logits
        .unwrap()
        .to_vec2()
        .unwrap()
}
