//! `config.json` of every supported architecture, parsed and validated once into one
//! [`Config`]: what the decoder builds (attention kind, router, dense/MoE layer plan) and
//! every value that changes the math.
//!
//! Each architecture's file (`deepseek_v2.rs`, `deepseek_v3.rs`, `qwen3_moe.rs`,
//! `olmoe.rs`) reads its own keys; this file holds what they share. Unknown keys are
//! ignored (the hub configs carry many that do not matter here); a key whose value the
//! runtime cannot honour is refused by name rather than silently ignored.

use serde::Serialize;
use std::path::Path;

use super::error::{ModelError, Result};

/// The model families this runtime implements, by their `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    DeepseekV2,
    DeepseekV3,
    Qwen3Moe,
    Olmoe,
}

impl Architecture {
    /// Every supported architecture: `(model_type, architectures[0])` as the hub writes them.
    pub const ALL: [(Architecture, &'static str, &'static str); 4] = [
        (
            Architecture::DeepseekV2,
            "deepseek_v2",
            "DeepseekV2ForCausalLM",
        ),
        (
            Architecture::DeepseekV3,
            "deepseek_v3",
            "DeepseekV3ForCausalLM",
        ),
        (Architecture::Qwen3Moe, "qwen3_moe", "Qwen3MoeForCausalLM"),
        (Architecture::Olmoe, "olmoe", "OlmoeForCausalLM"),
    ];

    pub fn model_type(self) -> &'static str {
        Self::ALL.iter().find(|a| a.0 == self).map_or("", |a| a.1)
    }

    /// The hub's class name (`architectures[0]`), e.g. `DeepseekV3ForCausalLM`.
    pub fn class_name(self) -> &'static str {
        Self::ALL.iter().find(|a| a.0 == self).map_or("", |a| a.2)
    }

    fn from_names(model_type: Option<&str>, class: Option<&str>) -> Result<Self> {
        let by_type = model_type.map(|t| Self::ALL.iter().find(|a| a.1 == t));
        let by_class = class.map(|c| Self::ALL.iter().find(|a| a.2 == c));
        let supported = || Self::ALL.iter().map(|a| a.2).collect::<Vec<_>>().join(", ");
        match (by_type, by_class) {
            (Some(None), _) => Err(unsupported(
                "model_type",
                model_type.unwrap_or_default(),
                &format!("supported architectures: {}", supported()),
            )),
            (_, Some(None)) => Err(unsupported(
                "architectures",
                class.unwrap_or_default(),
                &format!("supported: {}", supported()),
            )),
            (Some(Some(a)), Some(Some(b))) if a.0 != b.0 => Err(unsupported(
                "architectures",
                class.unwrap_or_default(),
                &format!("does not match model_type {}", a.1),
            )),
            (Some(Some(a)), _) | (None, Some(Some(a))) => Ok(a.0),
            // Configs written before model_type existed: DeepSeek-V2.
            (None, None) => Ok(Architecture::DeepseekV2),
        }
    }
}

/// Multi-head latent attention (DeepSeek-V2/V3).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MlaConfig {
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

/// Where grouped-query attention normalises its queries and keys (before RoPE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum QkNorm {
    /// One RMSNorm over each head's `head_dim`, its weight shared by all heads (Qwen3).
    PerHead,
    /// One RMSNorm over the whole q (and k) projection, before the head split (OLMoE).
    Full,
}

/// Grouped-query attention with q/k RMSNorm and half-split RoPE (Qwen3-MoE, OLMoE).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GqaConfig {
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub qk_norm: QkNorm,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum AttentionConfig {
    Mla(MlaConfig),
    Gqa(GqaConfig),
}

/// How gate logits become scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ScoringFunc {
    /// Softmax over all routed experts.
    Softmax,
    /// Independent sigmoids, with a per-expert selection bias (`e_score_correction_bias`).
    Sigmoid,
}

/// How the router turns scores into the top-k experts of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TopkMethod {
    /// Plain top-k over all routed experts.
    Greedy,
    /// Keep the `topk_group` groups with the highest max score, then top-k inside them.
    GroupLimitedGreedy { n_group: usize, topk_group: usize },
    /// DeepSeek-V3: on biased scores, keep the `topk_group` groups whose two best experts
    /// score highest together, then top-k inside them.
    NoauxTc { n_group: usize, topk_group: usize },
}

/// The router of every MoE layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouterConfig {
    pub scoring: ScoringFunc,
    pub method: TopkMethod,
    /// `norm_topk_prob` as the config says it.
    pub norm_topk_prob: bool,
    /// `routed_scaling_factor` as the config says it (1 where the architecture has none).
    pub routed_scaling_factor: f64,
    /// DeepSeek-V2's rule: renormalise only with more than one expert per token, and
    /// multiply by `routed_scaling_factor` only the weights not renormalised. Otherwise
    /// renormalise whenever `norm_topk_prob`, then always multiply.
    pub scale_unnormalised_only: bool,
}

impl RouterConfig {
    /// Whether the chosen experts' scores are divided by their sum, for `top_k` experts.
    pub fn renormalise(&self, top_k: usize) -> bool {
        self.norm_topk_prob && !(self.scale_unnormalised_only && top_k <= 1)
    }

    /// The multiplier of the (renormalised or not) weights.
    pub fn scale(&self, top_k: usize) -> f64 {
        if self.scale_unnormalised_only && self.renormalise(top_k) {
            1.0
        } else {
            self.routed_scaling_factor
        }
    }
}

/// YaRN context extension as DeepSeek publishes it in `rope_scaling`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
}

/// Which pairs of a head's dimensions RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)` (DeepSeek).
    Interleaved,
    /// Dimension `i` with `i + d/2` (`rotate_half`: Qwen3, OLMoE).
    HalfSplit,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense MLP layers.
    pub intermediate_size: usize,
    /// Width of one routed expert.
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub attention: AttentionConfig,
    /// Layers below this are dense (DeepSeek).
    pub first_k_dense_replace: usize,
    /// Layers that are dense whatever else says (Qwen3).
    pub mlp_only_layers: Vec<usize>,
    /// Layer `i` can be MoE only if `(i + 1) % decoder_sparse_step == 0` (Qwen3; 1 elsewhere).
    pub decoder_sparse_step: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub router: RouterConfig,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Yarn>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// A `config.json` object with typed lookups that name the key in their errors.
pub(super) struct RawConfig {
    map: serde_json::Map<String, serde_json::Value>,
}

impl RawConfig {
    fn get(&self, key: &str) -> Option<&serde_json::Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| unsupported(key, v, "must be a non-negative integer")),
        }
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| unsupported(key, "(missing)", "required"))
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| unsupported(key, v, "must be a number")),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| unsupported(key, v, "must be true or false")),
        }
    }

    pub fn str_or<'a>(&'a self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| unsupported(key, v, "must be a string")),
        }
    }

    pub fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
        match self.get(key) {
            None => Ok(vec![]),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|n| n as usize)
                        .ok_or_else(|| unsupported(key, v, "must list layer indices"))
                })
                .collect(),
            Some(v) => Err(unsupported(key, v, "must be a list of layer indices")),
        }
    }

    /// Refuses `key` unless it is absent, null or equal to `allowed`.
    pub fn refuse_unless(&self, key: &str, allowed: serde_json::Value, why: &str) -> Result<()> {
        match self.get(key) {
            Some(v) if *v != allowed => Err(unsupported(key, v, why)),
            _ => Ok(()),
        }
    }

    /// Refuses `key` unless it is absent or null.
    pub fn refuse_present(&self, key: &str, why: &str) -> Result<()> {
        match self.get(key) {
            Some(v) => Err(unsupported(key, v, why)),
            None => Ok(()),
        }
    }
}

pub(super) fn unsupported(key: &str, value: impl std::fmt::Display, why: &str) -> ModelError {
    ModelError::UnsupportedConfig {
        key: key.to_string(),
        value: value.to_string(),
        reason: why.to_string(),
    }
}

/// What every architecture's parser fills in before its own keys: sizes, norms, RoPE base,
/// token ids, and the checks that hold for all of them.
pub(super) struct Common {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl Common {
    fn read(r: &RawConfig) -> Result<Self> {
        let hidden_act = r.str_or("hidden_act", "silu")?;
        if hidden_act != "silu" {
            return Err(unsupported(
                "hidden_act",
                hidden_act,
                "only silu is supported",
            ));
        }
        if r.bool_or("attention_bias", false)? {
            return Err(unsupported(
                "attention_bias",
                true,
                "attention biases are not supported",
            ));
        }
        let c = Common {
            vocab_size: r.usize("vocab_size")?,
            hidden_size: r.usize("hidden_size")?,
            num_hidden_layers: r.usize("num_hidden_layers")?,
            num_attention_heads: r.usize("num_attention_heads")?,
            rms_norm_eps: r.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta: r.f64_or("rope_theta", 10000.0)?,
            max_position_embeddings: r.usize_or("max_position_embeddings", 4096)?,
            tie_word_embeddings: r.bool_or("tie_word_embeddings", false)?,
            bos_token_id: r.opt_usize("bos_token_id")?.map(|v| v as u32),
            eos_token_ids: eos_ids(r.get("eos_token_id"))?,
        };
        for (key, v) in [
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads),
        ] {
            if v == 0 {
                return Err(unsupported(key, 0, "must be positive"));
            }
        }
        Ok(c)
    }
}

fn eos_ids(v: Option<&serde_json::Value>) -> Result<Vec<u32>> {
    match v {
        None => Ok(vec![]),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .map(|v| vec![v as u32])
            .ok_or_else(|| unsupported("eos_token_id", n, "must be a token id or a list of ids")),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_u64()
                    .map(|v| v as u32)
                    .ok_or_else(|| unsupported("eos_token_id", v, "must be a token id"))
            })
            .collect(),
        Some(v) => Err(unsupported(
            "eos_token_id",
            v,
            "must be a token id or a list",
        )),
    }
}

/// The MoE part every architecture shares: expert count, top-k and expert width, checked.
pub(super) fn check_experts(
    has_moe: bool,
    n_routed: usize,
    top_k: usize,
    width: usize,
    keys: [&str; 3],
) -> Result<()> {
    if !has_moe {
        return Ok(());
    }
    let [experts_key, topk_key, width_key] = keys;
    if n_routed == 0 {
        return Err(unsupported(
            experts_key,
            n_routed,
            "MoE layers need experts",
        ));
    }
    if top_k == 0 || top_k > n_routed {
        return Err(unsupported(
            topk_key,
            top_k,
            &format!("must be in 1..={n_routed} ({experts_key})"),
        ));
    }
    if width == 0 {
        return Err(unsupported(width_key, 0, "must be positive"));
    }
    Ok(())
}

/// `n_group` / `topk_group` of a group-limited router, checked against the expert count.
/// `min_group` is the fewest experts a group may hold.
pub(super) fn groups(
    r: &RawConfig,
    n_routed: usize,
    top_k: usize,
    min_group: usize,
) -> Result<(usize, usize)> {
    let n_group = r.usize_or("n_group", 0)?;
    let topk_group = r.usize_or("topk_group", 0)?;
    if n_group == 0 || !n_routed.is_multiple_of(n_group) || n_routed / n_group < min_group {
        return Err(unsupported(
            "n_group",
            n_group,
            &format!(
                "must be positive and divide n_routed_experts ({n_routed}) into groups of at \
                 least {min_group}"
            ),
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
    Ok((n_group, topk_group))
}

/// `rope_scaling`: absent, null, or DeepSeek's YaRN block.
pub(super) fn rope_scaling(r: &RawConfig, yarn_allowed: bool) -> Result<Option<Yarn>> {
    match r.get("rope_scaling") {
        None => Ok(None),
        Some(v) if yarn_allowed => Ok(Some(parse_yarn(v)?)),
        Some(v) => Err(unsupported(
            "rope_scaling",
            v,
            "rope scaling is not supported for this architecture",
        )),
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
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ModelError::ConfigSyntax {
                path: None,
                message: e.to_string(),
            })?;
        let serde_json::Value::Object(map) = value else {
            return Err(ModelError::ConfigSyntax {
                path: None,
                message: "config.json must hold a JSON object".into(),
            });
        };
        let r = RawConfig { map };
        let class = match r.get("architectures") {
            None => None,
            Some(serde_json::Value::Array(a)) => match a.first() {
                None => None,
                Some(v) => Some(
                    v.as_str()
                        .ok_or_else(|| unsupported("architectures", v, "must list class names"))?,
                ),
            },
            Some(v) => return Err(unsupported("architectures", v, "must be a list")),
        };
        let model_type = match r.get("model_type") {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .ok_or_else(|| unsupported("model_type", v, "must be a string"))?,
            ),
        };
        let arch = Architecture::from_names(model_type, class)?;
        let common = Common::read(&r)?;
        let cfg = match arch {
            Architecture::DeepseekV2 => super::deepseek_v2::config(&r, common)?,
            Architecture::DeepseekV3 => super::deepseek_v3::config(&r, common)?,
            Architecture::Qwen3Moe => super::qwen3_moe::config(&r, common)?,
            Architecture::Olmoe => super::olmoe::config(&r, common)?,
        };
        cfg.check_attention()?;
        Ok(cfg)
    }

    /// The parts of [`Config`] every architecture builds the same way.
    pub(super) fn assemble(
        architecture: Architecture,
        c: Common,
        attention: AttentionConfig,
        ffn: FfnPlan,
        router: RouterConfig,
        rope_scaling: Option<Yarn>,
    ) -> Self {
        Config {
            architecture,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: ffn.intermediate_size,
            moe_intermediate_size: ffn.moe_intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            attention,
            first_k_dense_replace: ffn.first_k_dense_replace.min(c.num_hidden_layers),
            mlp_only_layers: ffn.mlp_only_layers,
            decoder_sparse_step: ffn.decoder_sparse_step,
            n_routed_experts: ffn.n_routed_experts,
            n_shared_experts: ffn.n_shared_experts,
            num_experts_per_tok: ffn.num_experts_per_tok,
            router,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta,
            rope_scaling,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
            bos_token_id: c.bos_token_id,
            eos_token_ids: c.eos_token_ids,
        }
    }

    fn check_attention(&self) -> Result<()> {
        match &self.attention {
            AttentionConfig::Mla(m) => {
                for (key, v) in [
                    ("kv_lora_rank", m.kv_lora_rank),
                    ("qk_rope_head_dim", m.qk_rope_head_dim),
                    ("v_head_dim", m.v_head_dim),
                ] {
                    if v == 0 {
                        return Err(unsupported(key, 0, "must be positive"));
                    }
                }
                if !m.qk_rope_head_dim.is_multiple_of(2) {
                    return Err(unsupported(
                        "qk_rope_head_dim",
                        m.qk_rope_head_dim,
                        "must be even",
                    ));
                }
                if m.q_lora_rank == Some(0) {
                    return Err(unsupported("q_lora_rank", 0, "must be null or positive"));
                }
            }
            AttentionConfig::Gqa(g) => {
                if g.head_dim == 0 || !g.head_dim.is_multiple_of(2) {
                    return Err(unsupported(
                        "head_dim",
                        g.head_dim,
                        "must be even and positive",
                    ));
                }
                let kvh = g.num_key_value_heads;
                if kvh == 0 || !self.num_attention_heads.is_multiple_of(kvh) {
                    return Err(unsupported(
                        "num_key_value_heads",
                        kvh,
                        &format!(
                            "must divide num_attention_heads ({})",
                            self.num_attention_heads
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        layer >= self.first_k_dense_replace
            && layer < self.num_hidden_layers
            && !self.mlp_only_layers.contains(&layer)
            && (layer + 1).is_multiple_of(self.decoder_sparse_step.max(1))
    }

    /// Indices of the MoE layers, in order.
    pub fn moe_layers(&self) -> std::vec::IntoIter<usize> {
        (0..self.num_hidden_layers)
            .filter(|&l| self.is_moe_layer(l))
            .collect::<Vec<_>>()
            .into_iter()
    }

    /// The position of model layer `layer` among the MoE layers.
    pub fn moe_index(&self, layer: usize) -> Option<usize> {
        self.is_moe_layer(layer)
            .then(|| (0..layer).filter(|&l| self.is_moe_layer(l)).count())
    }

    /// A hash of every value that shapes the weights or the math (not token ids or the
    /// context limit): adapters record it to refuse a different base. It starts with the
    /// architecture's `model_type`, except DeepSeek-V2's, which stays the hash it was
    /// before other architectures existed (so adapters written then still load).
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let hash = |v: serde_json::Value| hex::encode(Sha256::digest(v.to_string().as_bytes()));
        if let Some(v) = super::deepseek_v2::fingerprint_fields(self) {
            return hash(v);
        }
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            for k in ["bos_token_id", "eos_token_ids", "max_position_embeddings"] {
                o.remove(k);
            }
        }
        format!("{}-{}", self.architecture.model_type(), hash(v))
    }

    /// The MLA settings, for an MLA architecture.
    pub fn mla(&self) -> Option<&MlaConfig> {
        match &self.attention {
            AttentionConfig::Mla(m) => Some(m),
            AttentionConfig::Gqa(_) => None,
        }
    }

    /// Dimensions of a head that RoPE rotates, and how it pairs them.
    pub fn rope_dims(&self) -> (usize, RopeStyle) {
        match &self.attention {
            AttentionConfig::Mla(m) => (m.qk_rope_head_dim, RopeStyle::Interleaved),
            AttentionConfig::Gqa(g) => (g.head_dim, RopeStyle::HalfSplit),
        }
    }

    /// Attention softmax scale: `head_dim^-0.5` (MLA: `qk_head_dim`), times
    /// `mscale(factor, mscale_all_dim)^2` under YaRN (DeepSeek folds the attention
    /// temperature into the scale).
    pub fn softmax_scale(&self) -> f64 {
        let dim = match &self.attention {
            AttentionConfig::Mla(m) => m.qk_nope_head_dim + m.qk_rope_head_dim,
            AttentionConfig::Gqa(g) => g.head_dim,
        };
        let base = (dim as f64).powf(-0.5);
        match &self.rope_scaling {
            Some(y) if y.mscale_all_dim != 0.0 => {
                let m = yarn_mscale(y.factor, y.mscale_all_dim);
                base * m * m
            }
            _ => base,
        }
    }
}

/// The feed-forward plan an architecture reads from its keys.
pub(super) struct FfnPlan {
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub first_k_dense_replace: usize,
    pub mlp_only_layers: Vec<usize>,
    pub decoder_sparse_step: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
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

    fn fixture_json(name: &str) -> serde_json::Value {
        let path = format!(
            "{}/tests/fixtures/{name}/config.json",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn lite_json() -> serde_json::Value {
        fixture_json("lite-yarn")
    }

    #[test]
    fn parses_lite_yarn() {
        let c = Config::from_json(&lite_json().to_string()).unwrap();
        assert_eq!(c.architecture, Architecture::DeepseekV2);
        assert_eq!(c.router.method, TopkMethod::Greedy);
        assert_eq!(c.mla().unwrap().q_lora_rank, None);
        let y = c.rope_scaling.clone().unwrap();
        assert_eq!(y.factor, 40.0);
        assert_eq!(y.original_max_position_embeddings, 4096);
        // (48^-0.5) * (0.1 * 0.707 * ln 40 + 1)^2, computed by hand.
        let m = 0.1 * 0.707 * 40f64.ln() + 1.0;
        assert!((c.softmax_scale() - m * m / 48f64.sqrt()).abs() < 1e-12);
        assert_eq!(c.eos_token_ids, vec![1]);
        assert_eq!(
            c.fingerprint().len(),
            64,
            "DeepSeek-V2 keeps its plain hash"
        );
    }

    #[test]
    fn each_architecture_gets_its_plan() {
        let q = Config::from_json(&fixture_json("qwen3-moe-dense0").to_string()).unwrap();
        assert_eq!(q.architecture, Architecture::Qwen3Moe);
        assert_eq!(q.moe_layers().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(q.moe_index(2), Some(1));
        assert_eq!(q.moe_index(0), None);
        let AttentionConfig::Gqa(g) = &q.attention else {
            panic!("qwen3 is GQA")
        };
        assert_eq!(
            (g.num_key_value_heads, g.head_dim, g.qk_norm),
            (2, 32, QkNorm::PerHead)
        );
        assert_eq!(q.rope_dims(), (32, RopeStyle::HalfSplit));
        assert!(!q.router.renormalise(4) && q.router.scale(4) == 1.0 && q.n_shared_experts == 0);
        assert!((q.softmax_scale() - 32f64.powf(-0.5)).abs() < 1e-15);

        let o = Config::from_json(&fixture_json("olmoe").to_string()).unwrap();
        assert_eq!(o.moe_layers().len(), 3);
        assert_eq!(o.moe_intermediate_size, 24);
        let AttentionConfig::Gqa(g) = &o.attention else {
            panic!("olmoe is GQA")
        };
        assert_eq!((g.head_dim, g.qk_norm), (16, QkNorm::Full));

        let v3 = Config::from_json(&fixture_json("deepseek-v3").to_string()).unwrap();
        assert_eq!(v3.router.scoring, ScoringFunc::Sigmoid);
        assert_eq!(
            v3.router.method,
            TopkMethod::NoauxTc {
                n_group: 4,
                topk_group: 2
            }
        );
        assert!(v3.router.renormalise(4) && v3.router.scale(4) == 2.5);
        assert_eq!(v3.moe_layers().collect::<Vec<_>>(), vec![1, 2]);

        // DeepSeek-V2 scales only weights it does not renormalise.
        let mut j = lite_json();
        j["norm_topk_prob"] = true.into();
        j["routed_scaling_factor"] = 16.0.into();
        let v2 = Config::from_json(&j.to_string()).unwrap();
        assert!(v2.router.renormalise(4) && v2.router.scale(4) == 1.0);
        // With one expert per token DeepSeek-V2 scales instead.
        assert!(!v2.router.renormalise(1) && v2.router.scale(1) == 16.0);

        let fps: Vec<String> = [&q, &o, &v3].iter().map(|c| c.fingerprint()).collect();
        for (f, arch) in fps.iter().zip(["qwen3_moe-", "olmoe-", "deepseek_v3-"]) {
            assert!(f.starts_with(arch), "{f}");
        }
    }

    fn refused(mut j: serde_json::Value, edits: &[(&str, serde_json::Value)], named: &str) {
        for (k, v) in edits {
            j[*k] = v.clone();
        }
        let err = Config::from_json(&j.to_string()).unwrap_err().to_string();
        assert!(err.contains(named), "{edits:?}: {err}");
    }

    #[test]
    fn refuses_unsupported_values_by_name() {
        let cases: &[(&str, serde_json::Value, &str)] = &[
            ("scoring_func", "sigmoid".into(), "scoring_func"),
            ("topk_method", "noaux_tc".into(), "topk_method"),
            ("hidden_act", "gelu".into(), "hidden_act"),
            ("num_experts_per_tok", 99.into(), "num_experts_per_tok"),
            ("model_type", "llama".into(), "model_type"),
        ];
        for (key, value, named) in cases {
            refused(lite_json(), &[(key, value.clone())], named);
        }
        refused(
            lite_json(),
            &[
                ("topk_method", "group_limited_greedy".into()),
                ("topk_group", 1.into()),
                ("n_group", 3.into()),
            ],
            "n_group",
        );
        let mut j = lite_json();
        j["rope_scaling"]["type"] = "linear".into();
        let err = Config::from_json(&j.to_string()).unwrap_err().to_string();
        assert!(
            err.contains("rope_scaling.type") && err.contains("linear"),
            "{err}"
        );
        let qwen = fixture_json("qwen3-moe");
        refused(
            qwen.clone(),
            &[("use_sliding_window", true.into())],
            "use_sliding_window",
        );
        refused(
            qwen.clone(),
            &[("num_key_value_heads", 3.into())],
            "num_key_value_heads",
        );
        refused(
            qwen.clone(),
            &[("rope_scaling", serde_json::json!({"type": "yarn"}))],
            "rope_scaling",
        );
        refused(
            qwen,
            &[("architectures", serde_json::json!(["OlmoeForCausalLM"]))],
            "architectures",
        );
        let olmoe = fixture_json("olmoe");
        refused(olmoe, &[("clip_qkv", 8.0.into())], "clip_qkv");
        let v3 = fixture_json("deepseek-v3");
        refused(
            v3.clone(),
            &[("scoring_func", "softmax".into())],
            "scoring_func",
        );
        refused(
            v3.clone(),
            &[("topk_method", "greedy".into())],
            "topk_method",
        );
        refused(v3.clone(), &[("n_group", 16.into())], "n_group");
        refused(v3, &[("rope_interleave", false.into())], "rope_interleave");
    }
}
