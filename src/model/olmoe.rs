//! OLMoE (`OlmoeForCausalLM`, e.g. OLMoE-1B-7B): grouped-query attention whose queries and
//! keys get ONE RMSNorm over the whole projection (weights `[heads * head_dim]` and
//! `[kv_heads * head_dim]`) before the head split and half-split RoPE; `head_dim =
//! hidden_size / heads`. Every layer is MoE, its experts `intermediate_size` wide, with the
//! softmax router of Qwen3-MoE (`qwen3_moe.rs`), usually without renormalisation. No
//! shared experts. `clip_qkv` must be null.

use super::config::{
    check_experts, rope_scaling, unsupported, Architecture, AttentionConfig, Common, Config,
    FfnPlan, GqaConfig, QkNorm, RawConfig,
};
use super::error::Result;
use super::qwen3_moe::softmax_router;

pub(super) fn config(r: &RawConfig, c: Common) -> Result<Config> {
    r.refuse_present("clip_qkv", "clamping q/k/v is not supported")?;
    if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
        return Err(unsupported(
            "num_attention_heads",
            c.num_attention_heads,
            &format!("must divide hidden_size ({})", c.hidden_size),
        ));
    }
    let width = r.usize("intermediate_size")?;
    let ffn = FfnPlan {
        intermediate_size: width,
        moe_intermediate_size: width,
        first_k_dense_replace: 0,
        mlp_only_layers: vec![],
        decoder_sparse_step: 1,
        n_routed_experts: r.usize_or("num_experts", 0)?,
        n_shared_experts: 0,
        num_experts_per_tok: r.usize_or("num_experts_per_tok", 0)?,
    };
    check_experts(
        true,
        ffn.n_routed_experts,
        ffn.num_experts_per_tok,
        width,
        ["num_experts", "num_experts_per_tok", "intermediate_size"],
    )?;
    let attention = AttentionConfig::Gqa(GqaConfig {
        num_key_value_heads: r.usize_or("num_key_value_heads", c.num_attention_heads)?,
        head_dim: c.hidden_size / c.num_attention_heads,
        qk_norm: QkNorm::Full,
    });
    Ok(Config::assemble(
        Architecture::Olmoe,
        c,
        attention,
        ffn,
        softmax_router(r)?,
        rope_scaling(r, false)?,
    ))
}
