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

/// A Qwen3-MoE model of the benchmark's size: 8 query and 4 kv heads of 64 with q/k norm,
/// 64 experts 256 wide, top-8 renormalised, no shared experts.
pub fn qwen3_config(layers: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 0,
        "decoder_sparse_step": 1, "eos_token_id": 1, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 512, "initializer_range": 0.02, "intermediate_size": 1408,
        "max_position_embeddings": 4096, "max_window_layers": layers, "mlp_only_layers": [],
        "moe_intermediate_size": 256, "norm_topk_prob": true, "num_attention_heads": 8,
        "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": layers,
        "num_key_value_heads": 4, "output_router_logits": false, "rms_norm_eps": 1e-6,
        "rope_scaling": null, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "sliding_window": null, "tie_word_embeddings": false, "torch_dtype": "float32",
        "use_cache": true, "use_sliding_window": false, "vocab_size": 32000
    })
}

/// A DeepSeek-V3 model of the benchmark's size: the runtime benchmark's MLA, layer 0
/// dense, `noaux_tc` (8 groups, keep 4), top-8, one shared expert, scaling 2.5.
pub fn deepseek_v3_config(layers: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "attention_bias": false, "bos_token_id": 0, "eos_token_id": 1,
        "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 512,
        "intermediate_size": 1408, "kv_lora_rank": 128, "max_position_embeddings": 4096,
        "moe_intermediate_size": 256, "moe_layer_freq": 1, "n_group": 8,
        "n_routed_experts": 64, "n_shared_experts": 1, "norm_topk_prob": true,
        "num_attention_heads": 8, "num_experts_per_tok": 8, "num_hidden_layers": layers,
        "num_key_value_heads": 8, "num_nextn_predict_layers": 0, "q_lora_rank": null,
        "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "rms_norm_eps": 1e-6,
        "rope_scaling": null, "rope_theta": 10000.0, "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid", "tie_word_embeddings": false, "topk_group": 4,
        "topk_method": "noaux_tc", "torch_dtype": "float32", "v_head_dim": 64,
        "vocab_size": 32000
    })
}

/// An OLMoE model of the benchmark's size: 8 heads of 64 with q/k norm, 64 experts 256
/// wide, top-8 not renormalised, no shared experts.
pub fn olmoe_config(layers: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
        "attention_bias": false, "attention_dropout": 0.0, "clip_qkv": null,
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, "hidden_act": "silu",
        "hidden_size": 512, "initializer_range": 0.02, "intermediate_size": 256,
        "max_position_embeddings": 4096, "norm_topk_prob": false, "num_attention_heads": 8,
        "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": layers,
        "num_key_value_heads": 8, "output_router_logits": false, "rms_norm_eps": 1e-5,
        "rope_scaling": null, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01,
        "tie_word_embeddings": false, "torch_dtype": "float32", "use_cache": true,
        "vocab_size": 32000
    })
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

/// Writes the server benchmarks' model into `dir`: the benchmark model at `layers` layers
/// ([`bench_config`]) with the `lite` fixture's tokenizer (so its vocabulary, 512).
pub fn write_served_bench_model(layers: usize, dir: &std::path::Path) {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lite");
    let mut config = bench_config(layers);
    config["vocab_size"] = 512.into();
    esft::model::init::write_random_checkpoint(&config, 1, dir).expect("bench model");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture.join(f), dir.join(f)).expect("tokenizer");
    }
}
