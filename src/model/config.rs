//! DeepSeek-V2 `config.json`: every key that changes the math, parsed and validated once.
//!
//! Unknown keys are ignored (the hub configs carry many that do not matter here); a key
//! whose value the runtime cannot honour is refused by name rather than silently ignored.

use serde::{Deserialize, Serialize};
use std::path::Path;

use super::error::{ModelError, Result};

/// How the router turns gate scores into the top-k experts of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TopkMethod {
    /// Plain top-k over all routed experts.
    Greedy,
    /// Keep the `topk_group` groups with the highest max score, then top-k inside them.
    GroupLimitedGreedy { n_group: usize, topk_group: usize },
}

/// YaRN context extension as DeepSeek-V2 publishes it in `rope_scaling`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub first_k_dense_replace: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub topk_method: TopkMethod,
    pub routed_scaling_factor: f64,
    pub norm_topk_prob: bool,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Yarn>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// The file as written on the hub; converted into [`Config`] by [`Config::from_raw`].
#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    moe_intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    q_lora_rank: Option<usize>,
    kv_lora_rank: usize,
    qk_nope_head_dim: usize,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
    #[serde(default)]
    first_k_dense_replace: usize,
    #[serde(default)]
    n_routed_experts: Option<usize>,
    #[serde(default)]
    n_shared_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    #[serde(default = "default_moe_layer_freq")]
    moe_layer_freq: usize,
    #[serde(default = "default_topk_method")]
    topk_method: String,
    #[serde(default)]
    n_group: Option<usize>,
    #[serde(default)]
    topk_group: Option<usize>,
    #[serde(default = "one")]
    routed_scaling_factor: f64,
    #[serde(default)]
    norm_topk_prob: bool,
    #[serde(default = "default_scoring_func")]
    scoring_func: String,
    #[serde(default = "default_hidden_act")]
    hidden_act: String,
    rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    bos_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
}

fn default_moe_layer_freq() -> usize {
    1
}
fn default_topk_method() -> String {
    "greedy".into()
}
fn one() -> f64 {
    1.0
}
fn default_scoring_func() -> String {
    "softmax".into()
}
fn default_hidden_act() -> String {
    "silu".into()
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> usize {
    4096
}

fn unsupported(key: &str, value: impl std::fmt::Display, why: &str) -> ModelError {
    ModelError::UnsupportedConfig {
        key: key.to_string(),
        value: value.to_string(),
        reason: why.to_string(),
    }
}

impl Config {
    /// Reads and validates `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::MissingFile {
            path: path.clone(),
            what: "model config",
            source: e,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::ConfigSyntax { message, .. } => ModelError::ConfigSyntax {
                path: Some(path),
                message,
            },
            other => other,
        })
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| ModelError::ConfigSyntax {
            path: None,
            message: e.to_string(),
        })?;
        Self::from_raw(raw)
    }

    fn from_raw(r: RawConfig) -> Result<Self> {
        if let Some(arch) = r.architectures.first() {
            if arch != "DeepseekV2ForCausalLM" {
                return Err(unsupported(
                    "architectures",
                    arch,
                    "only DeepseekV2ForCausalLM is supported",
                ));
            }
        }
        if let Some(mt) = &r.model_type {
            if mt != "deepseek_v2" {
                return Err(unsupported("model_type", mt, "expected deepseek_v2"));
            }
        }
        if r.hidden_act != "silu" {
            return Err(unsupported(
                "hidden_act",
                &r.hidden_act,
                "only silu is supported",
            ));
        }
        if r.scoring_func != "softmax" {
            return Err(unsupported(
                "scoring_func",
                &r.scoring_func,
                "DeepSeek-V2 routes with softmax; other scoring functions are not supported",
            ));
        }
        if r.attention_bias {
            return Err(unsupported(
                "attention_bias",
                true,
                "attention biases are not supported",
            ));
        }
        if r.moe_layer_freq != 1 {
            return Err(unsupported(
                "moe_layer_freq",
                r.moe_layer_freq,
                "only every layer after first_k_dense_replace being MoE (1) is supported",
            ));
        }
        if let Some(kvh) = r.num_key_value_heads {
            if kvh != r.num_attention_heads {
                return Err(unsupported(
                    "num_key_value_heads",
                    kvh,
                    "MLA uses one latent for all heads; must equal num_attention_heads",
                ));
            }
        }
        let nonzero = [
            ("vocab_size", r.vocab_size),
            ("hidden_size", r.hidden_size),
            ("num_hidden_layers", r.num_hidden_layers),
            ("num_attention_heads", r.num_attention_heads),
            ("kv_lora_rank", r.kv_lora_rank),
            ("qk_rope_head_dim", r.qk_rope_head_dim),
            ("v_head_dim", r.v_head_dim),
        ];
        for (key, v) in nonzero {
            if v == 0 {
                return Err(unsupported(key, 0, "must be positive"));
            }
        }
        if !r.qk_rope_head_dim.is_multiple_of(2) {
            return Err(unsupported(
                "qk_rope_head_dim",
                r.qk_rope_head_dim,
                "must be even",
            ));
        }
        if r.q_lora_rank == Some(0) {
            return Err(unsupported("q_lora_rank", 0, "must be null or positive"));
        }
        let has_moe = r.first_k_dense_replace < r.num_hidden_layers;
        let n_routed = r.n_routed_experts.unwrap_or(0);
        let top_k = r.num_experts_per_tok.unwrap_or(0);
        if has_moe {
            if n_routed == 0 {
                return Err(unsupported(
                    "n_routed_experts",
                    n_routed,
                    "MoE layers need experts",
                ));
            }
            if top_k == 0 || top_k > n_routed {
                return Err(unsupported(
                    "num_experts_per_tok",
                    top_k,
                    &format!("must be in 1..={n_routed} (n_routed_experts)"),
                ));
            }
            if r.moe_intermediate_size == 0 {
                return Err(unsupported("moe_intermediate_size", 0, "must be positive"));
            }
        }
        let topk_method = match r.topk_method.as_str() {
            "greedy" => TopkMethod::Greedy,
            "group_limited_greedy" => {
                let n_group = r.n_group.unwrap_or(0);
                let topk_group = r.topk_group.unwrap_or(0);
                if n_group == 0 || !n_routed.is_multiple_of(n_group) {
                    return Err(unsupported(
                        "n_group",
                        n_group,
                        &format!("must be positive and divide n_routed_experts ({n_routed})"),
                    ));
                }
                if topk_group == 0 || topk_group > n_group {
                    return Err(unsupported(
                        "topk_group",
                        topk_group,
                        &format!("must be in 1..={n_group} (n_group)"),
                    ));
                }
                if topk_group * (n_routed / n_group) < top_k {
                    return Err(unsupported(
                        "topk_group",
                        topk_group,
                        "the kept groups hold fewer experts than num_experts_per_tok",
                    ));
                }
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
        let rope_scaling = match r.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(parse_yarn(&v)?),
        };
        let eos_token_ids = match r.eos_token_id {
            None | Some(serde_json::Value::Null) => vec![],
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|v| vec![v as u32]).ok_or_else(|| {
                    unsupported("eos_token_id", &n, "must be a token id or a list of ids")
                })?
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|v| v as u32)
                        .ok_or_else(|| unsupported("eos_token_id", v, "must be a token id"))
                })
                .collect::<Result<_>>()?,
            Some(v) => {
                return Err(unsupported(
                    "eos_token_id",
                    v,
                    "must be a token id or a list",
                ))
            }
        };
        Ok(Config {
            vocab_size: r.vocab_size,
            hidden_size: r.hidden_size,
            intermediate_size: r.intermediate_size,
            moe_intermediate_size: r.moe_intermediate_size,
            num_hidden_layers: r.num_hidden_layers,
            num_attention_heads: r.num_attention_heads,
            q_lora_rank: r.q_lora_rank,
            kv_lora_rank: r.kv_lora_rank,
            qk_nope_head_dim: r.qk_nope_head_dim,
            qk_rope_head_dim: r.qk_rope_head_dim,
            v_head_dim: r.v_head_dim,
            first_k_dense_replace: r.first_k_dense_replace.min(r.num_hidden_layers),
            n_routed_experts: n_routed,
            n_shared_experts: r.n_shared_experts.unwrap_or(0),
            num_experts_per_tok: top_k,
            topk_method,
            routed_scaling_factor: r.routed_scaling_factor,
            norm_topk_prob: r.norm_topk_prob,
            rms_norm_eps: r.rms_norm_eps,
            rope_theta: r.rope_theta,
            rope_scaling,
            max_position_embeddings: r.max_position_embeddings,
            tie_word_embeddings: r.tie_word_embeddings,
            bos_token_id: r.bos_token_id,
            eos_token_ids,
        })
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        layer >= self.first_k_dense_replace && layer < self.num_hidden_layers
    }

    /// Indices of the MoE layers, in order.
    pub fn moe_layers(&self) -> std::ops::Range<usize> {
        self.first_k_dense_replace..self.num_hidden_layers
    }

    /// A hash of every value that shapes the weights or the math (not token ids or the
    /// context limit): adapters record it to refuse a different base.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            for k in ["bos_token_id", "eos_token_ids", "max_position_embeddings"] {
                o.remove(k);
            }
        }
        hex::encode(Sha256::digest(v.to_string().as_bytes()))
    }

    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Attention softmax scale: `qk_head_dim^-0.5`, times `mscale(factor, mscale_all_dim)^2`
    /// under YaRN (DeepSeek folds the attention temperature into the scale).
    pub fn softmax_scale(&self) -> f64 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        match &self.rope_scaling {
            Some(y) if y.mscale_all_dim != 0.0 => {
                let m = yarn_mscale(y.factor, y.mscale_all_dim);
                base * m * m
            }
            _ => base,
        }
    }
}

/// YaRN's magnitude correction `0.1 * m * ln(scale) + 1` (1 when not extending).
pub fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

fn parse_yarn(v: &serde_json::Value) -> Result<Yarn> {
    let kind = v
        .get("type")
        .or_else(|| v.get("rope_type"))
        .and_then(|t| t.as_str())
        .unwrap_or("");
    if kind != "yarn" {
        return Err(unsupported(
            "rope_scaling.type",
            if kind.is_empty() { "(missing)" } else { kind },
            "only yarn rope scaling is supported",
        ));
    }
    let num = |key: &str, default: Option<f64>| -> Result<f64> {
        match v.get(key) {
            Some(x) => x
                .as_f64()
                .ok_or_else(|| unsupported(&format!("rope_scaling.{key}"), x, "must be a number")),
            None => default.ok_or_else(|| {
                unsupported(
                    &format!("rope_scaling.{key}"),
                    "(missing)",
                    "required for yarn",
                )
            }),
        }
    };
    let factor = num("factor", None)?;
    if factor <= 0.0 {
        return Err(unsupported(
            "rope_scaling.factor",
            factor,
            "must be positive",
        ));
    }
    let original = num("original_max_position_embeddings", None)?;
    Ok(Yarn {
        factor,
        original_max_position_embeddings: original as usize,
        beta_fast: num("beta_fast", Some(32.0))?,
        beta_slow: num("beta_slow", Some(1.0))?,
        mscale: num("mscale", Some(1.0))?,
        mscale_all_dim: num("mscale_all_dim", Some(0.0))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lite_json() -> serde_json::Value {
        serde_json::from_str(include_str!("../../tests/fixtures/lite-yarn/config.json")).unwrap()
    }

    #[test]
    fn parses_lite_yarn() {
        let c = Config::from_json(&lite_json().to_string()).unwrap();
        assert_eq!(c.topk_method, TopkMethod::Greedy);
        assert_eq!(c.q_lora_rank, None);
        let y = c.rope_scaling.clone().unwrap();
        assert_eq!(y.factor, 40.0);
        assert_eq!(y.original_max_position_embeddings, 4096);
        // (48^-0.5) * (0.1 * 0.707 * ln 40 + 1)^2, computed by hand.
        let m = 0.1 * 0.707 * 40f64.ln() + 1.0;
        assert!((c.softmax_scale() - m * m / 48f64.sqrt()).abs() < 1e-12);
        assert_eq!(c.eos_token_ids, vec![1]);
    }

    #[test]
    fn refuses_unsupported_values_by_name() {
        let cases: &[(&str, serde_json::Value, &str)] = &[
            ("scoring_func", "sigmoid".into(), "scoring_func"),
            ("topk_method", "noaux_tc".into(), "topk_method"),
            ("hidden_act", "gelu".into(), "hidden_act"),
            ("n_group", 3.into(), "n_group"),
            ("num_experts_per_tok", 99.into(), "num_experts_per_tok"),
        ];
        for (key, value, named) in cases {
            let mut j = lite_json();
            j[*key] = value.clone();
            if *key == "n_group" {
                j["topk_method"] = "group_limited_greedy".into();
                j["topk_group"] = 1.into();
            }
            let err = Config::from_json(&j.to_string()).unwrap_err().to_string();
            assert!(err.contains(named), "{key}: {err}");
        }
        let mut j = lite_json();
        j["rope_scaling"]["type"] = "linear".into();
        let err = Config::from_json(&j.to_string()).unwrap_err().to_string();
        assert!(
            err.contains("rope_scaling.type") && err.contains("linear"),
            "{err}"
        );
    }
}
