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
