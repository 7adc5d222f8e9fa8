//! Qwen3-MoE (`Qwen3MoeForCausalLM`, e.g. Qwen3-30B-A3B): grouped-query attention whose
//! queries and keys get an RMSNorm over each head (one `[head_dim]` weight shared by the
//! heads) before half-split RoPE; `head_dim` comes from the config, so `heads * head_dim`
//! may differ from `hidden_size`. A softmax router over all experts picks the top k,
//! renormalised when `norm_topk_prob`; no shared experts, no scaling factor. Layer `i` is
//! MoE unless it is in `mlp_only_layers` or `(i + 1) % decoder_sparse_step != 0`; dense
//! layers are `intermediate_size` wide.

use super::config::{
    check_experts, rope_scaling, unsupported, Architecture, AttentionConfig, Common, Config,
    FfnPlan, GqaConfig, QkNorm, RawConfig, RouterConfig, ScoringFunc, TopkMethod,
};
use super::error::Result;

pub(super) fn config(r: &RawConfig, c: Common) -> Result<Config> {
    if r.bool_or("use_sliding_window", false)? {
        return Err(unsupported(
            "use_sliding_window",
            true,
            "sliding-window attention is not supported",
        ));
    }
    let step = r.usize_or("decoder_sparse_step", 1)?;
    if step == 0 {
        return Err(unsupported("decoder_sparse_step", 0, "must be positive"));
    }
    let ffn = FfnPlan {
        intermediate_size: r.usize_or("intermediate_size", 0)?,
        moe_intermediate_size: r.usize("moe_intermediate_size")?,
        first_k_dense_replace: 0,
        mlp_only_layers: r.usize_list("mlp_only_layers")?,
        decoder_sparse_step: step,
        n_routed_experts: r.usize_or("num_experts", 0)?,
        n_shared_experts: 0,
        num_experts_per_tok: r.usize_or("num_experts_per_tok", 0)?,
    };
    check_experts(
        true,
        ffn.n_routed_experts,
        ffn.num_experts_per_tok,
        ffn.moe_intermediate_size,
        [
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
        ],
    )?;
    let attention = AttentionConfig::Gqa(GqaConfig {
        num_key_value_heads: r.usize_or("num_key_value_heads", c.num_attention_heads)?,
        head_dim: r.usize_or("head_dim", c.hidden_size / c.num_attention_heads)?,
        qk_norm: QkNorm::PerHead,
    });
    Ok(Config::assemble(
        Architecture::Qwen3Moe,
        c,
        attention,
        ffn,
        softmax_router(r)?,
        rope_scaling(r, false)?,
    ))
}

/// Softmax over all experts, plain top-k, renormalised when `norm_topk_prob` (Qwen3-MoE
/// and OLMoE).
pub(super) fn softmax_router(r: &RawConfig) -> Result<RouterConfig> {
    Ok(RouterConfig {
        scoring: ScoringFunc::Softmax,
        method: TopkMethod::Greedy,
        norm_topk_prob: r.bool_or("norm_topk_prob", false)?,
        routed_scaling_factor: 1.0,
        scale_unnormalised_only: false,
    })
}
