//! DeepSeek-V3 (`DeepseekV3ForCausalLM`; also R1, Kimi K2, Moonlight): DeepSeek-V2's
//! attention and layer plan (`deepseek_v2.rs`) with another router, `noaux_tc`:
//! - scores are sigmoids of the gate logits;
//! - a per-expert `e_score_correction_bias` is added for the choice only;
//! - experts are chosen among the `topk_group` groups whose two best biased scores sum
//!   highest;
//! - the chosen experts' unbiased scores are renormalised (`norm_topk_prob`), then
//!   multiplied by `routed_scaling_factor`.
//!
//! The published checkpoints carry `num_nextn_predict_layers` multi-token-prediction layers
//! after the last decoder layer (`model.layers.{num_hidden_layers}.*`); generation does not
//! use them and the loader skips them.

use super::config::{
    groups, rope_scaling, unsupported, Architecture, AttentionConfig, Common, Config, RawConfig,
    RouterConfig, ScoringFunc, TopkMethod,
};
use super::deepseek_v2::{deepseek_ffn, mla};
use super::error::Result;

pub(super) fn config(r: &RawConfig, c: Common) -> Result<Config> {
    let ffn = deepseek_ffn(r, &c)?;
    let scoring = r.str_or("scoring_func", "sigmoid")?;
    if scoring != "sigmoid" {
        return Err(unsupported(
            "scoring_func",
            scoring,
            "DeepSeek-V3 routes with sigmoid scores",
        ));
    }
    let method = r.str_or("topk_method", "noaux_tc")?;
    if method != "noaux_tc" {
        return Err(unsupported(
            "topk_method",
            method,
            "DeepSeek-V3 routes with noaux_tc",
        ));
    }
    // Groups are ranked by their two best experts: a group must hold two.
    let (n_group, topk_group) = groups(r, ffn.n_routed_experts, ffn.num_experts_per_tok, 2)?;
    r.refuse_unless(
        "rope_interleave",
        true.into(),
        "only the interleaved RoPE of the published checkpoints is supported",
    )?;
    let router = RouterConfig {
        scoring: ScoringFunc::Sigmoid,
        method: TopkMethod::NoauxTc {
            n_group,
            topk_group,
        },
        norm_topk_prob: r.bool_or("norm_topk_prob", true)?,
        routed_scaling_factor: r.f64_or("routed_scaling_factor", 1.0)?,
        scale_unnormalised_only: false,
    };
    Ok(Config::assemble(
        Architecture::DeepseekV3,
        c,
        AttentionConfig::Mla(mla(r)?),
        ffn,
        router,
        rope_scaling(r, true)?,
    ))
}
