//! Grouped-query attention (Qwen3-MoE, OLMoE) over a ragged batch: q/k/v projections, q/k
//! RMSNorm (per head, or over the whole projection), half-split RoPE, causal attention of
//! each sequence's new tokens against its own key/value cache, and the output projection.
//!
//! Query head `h` reads kv head `h / (heads / kv_heads)`. Each kv head of each sequence has
//! its own row cache ([`LatentCache`]) holding `[v | k]` per token (`2 * head_dim` values),
//! the layout of MLA's latent rows, so both attentions share one core. The batched CPU
//! kernel takes every kv head in one call and reads the keys at their offset in the rows;
//! the per-sequence candle path and the training node take one kv head at a time, queried
//! with `[0 | q]`, for which the rows are exactly keys and values.

use candle_core::{Device, Result, Tensor};

use super::attention::{attend, attend_kernel, LatentCache};
use super::config::{Config, GqaConfig, QkNorm};
use super::cpu_kernels;
use super::load::{Precision, WeightStore};
use super::ops::Ops;

pub struct GqaAttention {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    q_norm: Tensor,
    k_norm: Tensor,
    qk_norm: QkNorm,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
    scale: f64,
}

impl GqaAttention {
    pub fn load(
        cfg: &Config,
        gqa: &GqaConfig,
        w: &WeightStore,
        prefix: &str,
        precision: Precision,
        dev: &Device,
    ) -> super::error::Result<Self> {
        let (h, nh, kvh, hd) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            gqa.num_key_value_heads,
            gqa.head_dim,
        );
        let get = |name: &str, shape: &[usize]| {
            w.weight(&format!("{prefix}{name}"), shape, precision, dev)
        };
        let (q_norm, k_norm) = match gqa.qk_norm {
            QkNorm::PerHead => (hd, hd),
            QkNorm::Full => (nh * hd, kvh * hd),
        };
        Ok(Self {
            q: get("q_proj.weight", &[nh * hd, h])?,
            k: get("k_proj.weight", &[kvh * hd, h])?,
            v: get("v_proj.weight", &[kvh * hd, h])?,
            o: get("o_proj.weight", &[h, nh * hd])?,
            q_norm: get("q_norm.weight", &[q_norm])?,
            k_norm: get("k_norm.weight", &[k_norm])?,
            qk_norm: gqa.qk_norm,
            heads: nh,
            kv_heads: kvh,
            head_dim: hd,
            eps: cfg.rms_norm_eps,
            scale: cfg.softmax_scale(),
        })
    }

    /// Every weight tensor of this layer, mutably, under its checkpoint name suffix.
    pub fn named_weights_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![
            ("q_proj.weight", &mut self.q),
            ("k_proj.weight", &mut self.k),
            ("v_proj.weight", &mut self.v),
            ("o_proj.weight", &mut self.o),
            ("q_norm.weight", &mut self.q_norm),
            ("k_norm.weight", &mut self.k_norm),
        ]
    }

    /// Attention for all tokens of a ragged batch. `x`: `[n, hidden]` (normalised input),
    /// `cos`/`sin`: `[n, head_dim/2]` for each token's position, `seqs`: each sequence's
    /// rows of `x` (consecutive, in order) and its per-kv-head caches for this layer, which
    /// gain those tokens.
    pub fn forward(
        &self,
        ops: &Ops,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        seqs: &mut [(usize, usize, &mut [LatentCache])],
    ) -> Result<Tensor> {
        let n = x.dim(0)?;
        let (nh, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        let (q, k) = (ops.linear(x, &self.q)?, ops.linear(x, &self.k)?);
        let (q, k) = match self.qk_norm {
            QkNorm::Full => (
                ops.rms_norm(&q, &self.q_norm, self.eps)?
                    .reshape((n, nh, hd))?,
                ops.rms_norm(&k, &self.k_norm, self.eps)?
                    .reshape((n, kvh, hd))?,
            ),
            QkNorm::PerHead => (
                ops.rms_norm(&q.reshape((n, nh, hd))?, &self.q_norm, self.eps)?,
                ops.rms_norm(&k.reshape((n, kvh, hd))?, &self.k_norm, self.eps)?,
            ),
        };
        let q = ops.rope_half_split(&q, cos, sin)?;
        let k = ops.rope_half_split(&k, cos, sin)?;
        let v = ops.linear(x, &self.v)?.reshape((n, kvh, hd))?;
        let o = if !ops.differentiable && cpu_kernels::takes_linear(x, &self.k, n) {
            // Every kv head in one call; the keys are read in place from the `[v | k]`
            // rows, so the queries need no zero half.
            let rows = Tensor::cat(&[&v, &k], 2)?; // [n, kv_heads, 2 * head_dim]
            let parts = cpu_kernels::RowParts {
                key_offset: hd,
                value_width: hd,
            };
            attend_kernel(&q, &rows, seqs, parts, self.scale)?
        } else {
            // One kv head at a time through the shared core, queried with `[0 | q]`.
            let group = nh / kvh;
            let q = q.reshape((n, kvh, group, hd))?;
            let zeros = Tensor::zeros((n, group, hd), q.dtype(), q.device())?;
            let mut outs = Vec::with_capacity(kvh);
            for j in 0..kvh {
                let qj = Tensor::cat(&[&zeros, &q.narrow(1, j, 1)?.squeeze(1)?], 2)?;
                let rows = Tensor::cat(&[v.narrow(1, j, 1)?, k.narrow(1, j, 1)?], 2)?
                    .reshape((n, 2 * hd))?;
                let mut head_seqs: Vec<(usize, usize, &mut LatentCache)> = seqs
                    .iter_mut()
                    .map(|(start, len, caches)| (*start, *len, &mut caches[j]))
                    .collect();
                let o = attend(ops, &qj, &rows, &mut head_seqs, hd, self.scale, false)?;
                outs.push(o.reshape((n, group, hd))?);
            }
            Tensor::cat(&outs, 1)?
        };
        let o = o.reshape((n, nh * hd))?;
        ops.linear(&o, &self.o)
    }
}
