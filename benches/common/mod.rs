//! Shared by the bench binaries: the benchmark model and environment knobs.
#![allow(dead_code)]

/// The benchmark model's `config.json` (DeepSeek-V2 shape at hidden 512: 64 routed experts
/// top-6, 2 shared; every key candle-transformers' `deepseek2` needs is present).
pub fn bench_config(layers: usize) -> serde_json::Value {
    let mut config: serde_json::Value =
        serde_json::from_str(include_str!("../bench_model.json")).expect("valid JSON");
    config["num_hidden_layers"] = layers.into();
    config
}

pub fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Writes adapter `task{i}` under `root`: random replacements (normal, std `std`) for ~10%
/// of the routed experts of every MoE layer, picked by a generator seeded with `seed`.
/// Returns the experts replaced per layer.
pub fn write_random_adapter(
    base: &esft::adapter::BaseModel,
    root: &std::path::Path,
    i: usize,
    seed: u64,
    std: f32,
) -> usize {
    use esft::adapter::format::{new_manifest, write_adapter, ExpertConfig, Provenance};
    use rand::{Rng, SeedableRng};
    let cfg = &base.config;
    let per_layer = (cfg.n_routed_experts as f64 * 0.1).round() as usize;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut experts = std::collections::BTreeMap::new();
    let mut tensors = Vec::new();
    for layer in cfg.moe_layers() {
        let mut chosen: Vec<usize> = Vec::new();
        while chosen.len() < per_layer {
            let e = rng.random_range(0..cfg.n_routed_experts);
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        for &e in &chosen {
            for p in ["gate_proj", "up_proj", "down_proj"] {
                let name = format!("model.layers.{layer}.mlp.experts.{e}.{p}.weight");
                let shape = base.store.shape(&name).expect("base tensor").to_vec();
                let t = candle_core::Tensor::randn(0f32, std, shape, &candle_core::Device::Cpu)
                    .expect("randn");
                tensors.push((name, t));
            }
        }
        experts.insert(layer, chosen);
    }
    let names: Vec<String> = tensors.iter().map(|t| t.0.clone()).collect();
    let name = format!("task{i}");
    let ec = ExpertConfig {
        experts,
        shared_experts: false,
        non_expert_modules: false,
    };
    let m = new_manifest(&name, base, ec, Provenance::default(), &names).expect("manifest");
    write_adapter(&root.join(&name), &m, &tensors).expect("write adapter");
    per_layer
}
