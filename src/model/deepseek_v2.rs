//! DeepSeek-V2 (`DeepseekV2ForCausalLM`): multi-head latent attention (optionally with a
//! low-rank query, `q_lora_rank`), interleaved-pair RoPE with DeepSeek's YaRN, dense layers
//! below `first_k_dense_replace`, then MoE layers with shared experts and a softmax router,
//! greedy or limited to the `topk_group` groups with the best single expert. The routed
//! weights are either renormalised (`norm_topk_prob` with more than one expert) or
//! multiplied by `routed_scaling_factor`, never both.
//!
//! The MLA and DeepSeekMoE keys read here are shared with DeepSeek-V3 (`deepseek_v3.rs`).

use super::config::{
    check_experts, groups, rope_scaling, unsupported, Architecture, AttentionConfig, Common,
    Config, FfnPlan, MlaConfig, RawConfig, RouterConfig, ScoringFunc, TopkMethod,
};
use super::error::Result;

pub(super) fn config(r: &RawConfig, c: Common) -> Result<Config> {
    let ffn = deepseek_ffn(r, &c)?;
    let scoring = r.str_or("scoring_func", "softmax")?;
    if scoring != "softmax" {
        return Err(unsupported(
            "scoring_func",
            scoring,
            "DeepSeek-V2 routes with softmax; other scoring functions are not supported",
        ));
    }
    let (n, k) = (ffn.n_routed_experts, ffn.num_experts_per_tok);
    let method = match r.str_or("topk_method", "greedy")? {
        "greedy" => TopkMethod::Greedy,
        "group_limited_greedy" => {
            let (n_group, topk_group) = groups(r, n, k, 1)?;
            TopkMethod::GroupLimitedGreedy {
                n_group,
                topk_group,
            }
        }
        other => {
            return Err(unsupported(
                "topk_method",
                other,
                "supported: greedy, group_limited_greedy",
            ))
        }
    };
    let router = RouterConfig {
        scoring: ScoringFunc::Softmax,
        method,
        norm_topk_prob: r.bool_or("norm_topk_prob", false)?,
        routed_scaling_factor: r.f64_or("routed_scaling_factor", 1.0)?,
        scale_unnormalised_only: true,
    };
    Ok(Config::assemble(
        Architecture::DeepseekV2,
        c,
        AttentionConfig::Mla(mla(r)?),
        ffn,
        router,
        rope_scaling(r, true)?,
    ))
}

/// The values DeepSeek-V2's config fingerprint hashes, as they were hashed before other
/// architectures existed; `None` for other architectures.
pub(super) fn fingerprint_fields(cfg: &Config) -> Option<serde_json::Value> {
    let (Architecture::DeepseekV2, AttentionConfig::Mla(m)) = (cfg.architecture, &cfg.attention)
    else {
        return None;
    };
    Some(serde_json::json!({
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "q_lora_rank": m.q_lora_rank,
        "kv_lora_rank": m.kv_lora_rank,
        "qk_nope_head_dim": m.qk_nope_head_dim,
        "qk_rope_head_dim": m.qk_rope_head_dim,
        "v_head_dim": m.v_head_dim,
        "first_k_dense_replace": cfg.first_k_dense_replace,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "topk_method": cfg.router.method,
        "routed_scaling_factor": cfg.router.routed_scaling_factor,
        "norm_topk_prob": cfg.router.norm_topk_prob,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }))
}

/// The multi-head latent attention keys.
pub(super) fn mla(r: &RawConfig) -> Result<MlaConfig> {
    let heads = r.usize("num_attention_heads")?;
    if let Some(kvh) = r.opt_usize("num_key_value_heads")? {
        if kvh != heads {
            return Err(unsupported(
                "num_key_value_heads",
                kvh,
                "MLA uses one latent for all heads; must equal num_attention_heads",
            ));
        }
    }
    Ok(MlaConfig {
        q_lora_rank: r.opt_usize("q_lora_rank")?,
        kv_lora_rank: r.usize("kv_lora_rank")?,
        qk_nope_head_dim: r.usize("qk_nope_head_dim")?,
        qk_rope_head_dim: r.usize("qk_rope_head_dim")?,
        v_head_dim: r.usize("v_head_dim")?,
    })
}

/// DeepSeekMoE's layer plan: dense below `first_k_dense_replace`, MoE (routed plus
/// `n_shared_experts` shared experts) from there on.
pub(super) fn deepseek_ffn(r: &RawConfig, c: &Common) -> Result<FfnPlan> {
    let freq = r.usize_or("moe_layer_freq", 1)?;
    if freq != 1 {
        return Err(unsupported(
            "moe_layer_freq",
            freq,
            "only every layer after first_k_dense_replace being MoE (1) is supported",
        ));
    }
    let plan = FfnPlan {
        intermediate_size: r.usize("intermediate_size")?,
        moe_intermediate_size: r.usize("moe_intermediate_size")?,
        first_k_dense_replace: r.usize_or("first_k_dense_replace", 0)?,
        mlp_only_layers: vec![],
        decoder_sparse_step: 1,
        n_routed_experts: r.usize_or("n_routed_experts", 0)?,
        n_shared_experts: r.usize_or("n_shared_experts", 0)?,
        num_experts_per_tok: r.usize_or("num_experts_per_tok", 0)?,
    };
    check_experts(
        plan.first_k_dense_replace < c.num_hidden_layers,
        plan.n_routed_experts,
        plan.num_experts_per_tok,
        plan.moe_intermediate_size,
        [
            "n_routed_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
        ],
    )?;
    Ok(plan)
}
