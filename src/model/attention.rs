//! Multi-head Latent Attention (MLA) over a ragged batch, with a per-sequence cache that
//! stores only the latent: the normalised `c_kv` and the rotated shared `k_pe`
//! (`kv_lora_rank + qk_rope_head_dim` values per token and layer).
//!
//! Keys and values are never expanded. The up-projection `kv_b_proj` is split into its key
//! part `W_uk` and value part `W_uv` and absorbed into the query and the output:
//! `q_nope . (W_uk c) = (W_uk^T q_nope) . c` and `o = W_uv (sum_j a_j c_j)`, so attention
//! runs directly against the cached latent.
//!
//! The causal core over per-sequence row caches ([`attend`]: the batched CPU kernel, the
//! per-sequence candle path, the training node) is shared with grouped-query attention
//! (`gqa.rs`), which stores each kv head as `[v | k]` rows.

use candle_core::{DType, Device, Result, Tensor, D};

use super::config::{Config, MlaConfig};
use super::cpu_kernels;
use super::load::{Precision, WeightStore};
use super::ops::{causal_mask, Ops};

/// The weights of one attention layer.
pub struct Attention {
    q: QueryProj,
    kv_a: Tensor,
    kv_a_norm: Tensor,
    kv_b: Tensor,
    /// `[heads, nope, kv_lora_rank]` slice of `kv_b` (derived).
    w_uk: Tensor,
    /// `[heads, kv_lora_rank, v_head_dim]`: `W_uv` transposed per head (derived).
    w_uv_t: Tensor,
    /// `[heads, kv_lora_rank, nope]`: `W_uk` transposed per head, the row layout of the CPU
    /// kernels (derived, f32 CPU models only).
    w_uk_rows: Option<Tensor>,
    o: Tensor,
    heads: usize,
    nope: usize,
    rope: usize,
    v_dim: usize,
    kv_rank: usize,
    scale: f64,
}

enum QueryProj {
    Full(Tensor),
    LoRA { a: Tensor, norm: Tensor, b: Tensor },
}

/// The two MLA sub-layer norms use eps 1e-6 whatever `rms_norm_eps` says (both the original
/// code and transformers hard-code it).
const LATENT_NORM_EPS: f64 = 1e-6;

impl Attention {
    pub fn load(
        cfg: &Config,
        mla: &MlaConfig,
        w: &WeightStore,
        prefix: &str,
        precision: Precision,
        dev: &Device,
    ) -> super::error::Result<Self> {
        let h = cfg.hidden_size;
        let nh = cfg.num_attention_heads;
        let (nope, rope, v_dim) = (mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim);
        let qk = nope + rope;
        let get = |name: &str, shape: &[usize]| {
            w.weight(&format!("{prefix}{name}"), shape, precision, dev)
        };
        let q = match mla.q_lora_rank {
            None => QueryProj::Full(get("q_proj.weight", &[nh * qk, h])?),
            Some(r) => QueryProj::LoRA {
                a: get("q_a_proj.weight", &[r, h])?,
                norm: get("q_a_layernorm.weight", &[r])?,
                b: get("q_b_proj.weight", &[nh * qk, r])?,
            },
        };
        let kvr = mla.kv_lora_rank;
        let kv_b = get("kv_b_proj.weight", &[nh * (nope + v_dim), kvr])?;
        let (w_uk, w_uv_t) = absorb(&kv_b, nh, nope, v_dim)?;
        let w_uk_rows = kernel_rows(&w_uk, precision.compute)?;
        Ok(Self {
            q,
            kv_a: get("kv_a_proj_with_mqa.weight", &[kvr + rope, h])?,
            kv_a_norm: get("kv_a_layernorm.weight", &[kvr])?,
            kv_b,
            w_uk,
            w_uv_t,
            w_uk_rows,
            o: get("o_proj.weight", &[h, nh * v_dim])?,
            heads: nh,
            nope,
            rope,
            v_dim,
            kv_rank: kvr,
            scale: cfg.softmax_scale(),
        })
    }

    /// Every weight tensor of this layer under its checkpoint name suffix.
    pub fn named_weights(&self) -> Vec<(&'static str, &Tensor)> {
        let mut v = match &self.q {
            QueryProj::Full(q) => vec![("q_proj.weight", q)],
            QueryProj::LoRA { a, norm, b } => vec![
                ("q_a_proj.weight", a),
                ("q_a_layernorm.weight", norm),
                ("q_b_proj.weight", b),
            ],
        };
        v.extend([
            ("kv_a_proj_with_mqa.weight", &self.kv_a),
            ("kv_a_layernorm.weight", &self.kv_a_norm),
            ("kv_b_proj.weight", &self.kv_b),
            ("o_proj.weight", &self.o),
        ]);
        v
    }

    /// Replaces one weight (by checkpoint name suffix), re-deriving the absorbed factors.
    pub fn set_weight(&mut self, suffix: &str, t: Tensor) -> Result<bool> {
        let slot = match (suffix, &mut self.q) {
            ("q_proj.weight", QueryProj::Full(q)) => q,
            ("q_a_proj.weight", QueryProj::LoRA { a, .. }) => a,
            ("q_a_layernorm.weight", QueryProj::LoRA { norm, .. }) => norm,
            ("q_b_proj.weight", QueryProj::LoRA { b, .. }) => b,
            ("kv_a_proj_with_mqa.weight", _) => &mut self.kv_a,
            ("kv_a_layernorm.weight", _) => &mut self.kv_a_norm,
            ("kv_b_proj.weight", _) => &mut self.kv_b,
            ("o_proj.weight", _) => &mut self.o,
            _ => return Ok(false),
        };
        if slot.shape() != t.shape() {
            candle_core::bail!(
                "{suffix}: shape {:?}, expected {:?}",
                t.shape(),
                slot.shape()
            );
        }
        *slot = t;
        self.refresh_absorbed()?;
        Ok(true)
    }

    /// Every weight tensor of this layer, mutably, under its checkpoint name suffix. Call
    /// [`Attention::refresh_absorbed`] after changing `kv_b_proj`.
    pub fn named_weights_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        let mut v = match &mut self.q {
            QueryProj::Full(q) => vec![("q_proj.weight", q)],
            QueryProj::LoRA { a, norm, b } => vec![
                ("q_a_proj.weight", a),
                ("q_a_layernorm.weight", norm),
                ("q_b_proj.weight", b),
            ],
        };
        v.extend([
            ("kv_a_proj_with_mqa.weight", &mut self.kv_a),
            ("kv_a_layernorm.weight", &mut self.kv_a_norm),
            ("kv_b_proj.weight", &mut self.kv_b),
            ("o_proj.weight", &mut self.o),
        ]);
        v
    }

    /// Re-derives `W_uk` and `W_uv^T` from `kv_b_proj` (they are copies, so an in-place
    /// update of `kv_b_proj` does not reach them; derived from a trainable `kv_b_proj`
    /// they stay on its gradient path).
    pub fn refresh_absorbed(&mut self) -> Result<()> {
        let (uk, uv) = absorb(&self.kv_b, self.heads, self.nope, self.v_dim)?;
        // The norm weights are in the compute dtype.
        self.w_uk_rows = kernel_rows(&uk, self.kv_a_norm.dtype())?;
        self.w_uk = uk;
        self.w_uv_t = uv;
        Ok(())
    }

    /// Attention for all tokens of a ragged batch. `x`: `[n, hidden]` (normalised input),
    /// `cos`/`sin`: `[n, rope/2]` for each token's position, `seqs`: each sequence's rows of
    /// `x` (consecutive, in order) and its cache for this layer, which gains those tokens.
    pub fn forward(
        &self,
        ops: &Ops,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        seqs: &mut [(usize, usize, &mut LatentCache)],
    ) -> Result<Tensor> {
        let n = x.dim(0)?;
        let (nh, nope, rope, kvr) = (self.heads, self.nope, self.rope, self.kv_rank);
        let q = match &self.q {
            QueryProj::Full(w) => ops.linear(x, w)?,
            QueryProj::LoRA { a, norm, b } => {
                let qa = ops.rms_norm(&ops.linear(x, a)?, norm, LATENT_NORM_EPS)?;
                ops.linear(&qa, b)?
            }
        }
        .reshape((n, nh, nope + rope))?;
        let q_nope = q.narrow(D::Minus1, 0, nope)?;
        let q_pe = ops.rope_interleaved(&q.narrow(D::Minus1, nope, rope)?, cos, sin)?;
        // The CPU kernels where they are the faster path or the only one (and the per-head
        // row layout exists), on the same terms as the projections.
        let kernel_rows = self
            .w_uk_rows
            .as_ref()
            .filter(|_| !ops.differentiable && cpu_kernels::takes_linear(x, &self.kv_b, n));
        // Absorb W_uk into the query: [nh, n, nope] x [nh, nope, kvr] -> [n, nh, kvr].
        let q_nope_heads = q_nope.transpose(0, 1)?.contiguous()?;
        let q_lat = match kernel_rows {
            Some(rows) => cpu_kernels::heads_linear(&q_nope_heads, rows, 0..kvr)?,
            None => ops
                .matmul_weight(&q_nope_heads, &self.w_uk)?
                .transpose(0, 1)?,
        };
        let q_full = Tensor::cat(&[&q_lat, &q_pe], D::Minus1)?; // [n, nh, kvr + rope]

        let ckv = ops.linear(x, &self.kv_a)?; // [n, kvr + rope]
        let c_kv = ops.rms_norm(&ckv.narrow(1, 0, kvr)?, &self.kv_a_norm, LATENT_NORM_EPS)?;
        let k_pe = ops
            .rope_interleaved(&ckv.narrow(1, kvr, rope)?.reshape((n, 1, rope))?, cos, sin)?
            .reshape((n, rope))?;
        let latent = Tensor::cat(&[&c_kv, &k_pe], 1)?; // [n, kvr + rope]

        let o_lat = attend(
            ops,
            &q_full,
            &latent,
            seqs,
            kvr,
            self.scale,
            kernel_rows.is_some(),
        )?
        .reshape((n, nh, kvr))?;
        // Absorb W_uv into the output: [nh, n, kvr] x [nh, kvr, v] -> [n, nh, v].
        let o_heads = o_lat.transpose(0, 1)?.contiguous()?;
        let o = match kernel_rows {
            Some(_) => {
                let kv_b = self.kv_b.reshape((nh, nope + self.v_dim, kvr))?;
                cpu_kernels::heads_linear(&o_heads, &kv_b, nope..nope + self.v_dim)?
            }
            None => ops.matmul_weight(&o_heads, &self.w_uv_t)?.transpose(0, 1)?,
        }
        .reshape((n, nh * self.v_dim))?;
        ops.linear(&o, &self.o)
    }
}

/// Causal attention of a ragged batch against per-sequence row caches whose rows are both
/// the keys (all `width` columns) and the values (the first `v_width` columns): MLA's
/// latent, or one kv head of grouped-query attention stored as `[v | k]` rows and queried
/// with `[0 | q]`. `q`: `[n, heads, width]`; `rows`: `[n, width]`, appended to each
/// sequence's cache first. Returns `[n * heads, v_width]`. `kernel`: every sequence in one
/// parallel CPU call (f32 inference).
pub(super) fn attend(
    ops: &Ops,
    q: &Tensor,
    rows: &Tensor,
    seqs: &mut [(usize, usize, &mut LatentCache)],
    v_width: usize,
    scale: f64,
    kernel: bool,
) -> Result<Tensor> {
    if kernel {
        let (n, width) = rows.dims2()?;
        let mut one: Vec<(usize, usize, &mut [LatentCache])> = seqs
            .iter_mut()
            .map(|(start, len, cache)| (*start, *len, std::slice::from_mut(&mut **cache)))
            .collect();
        let parts = cpu_kernels::RowParts {
            key_offset: 0,
            value_width: v_width,
        };
        return attend_kernel(q, &rows.reshape((n, 1, width))?, &mut one, parts, scale);
    }
    attend_per_sequence(ops, q, rows, seqs, v_width, scale)
}

/// Every sequence and cache in one call of the batched CPU kernel (f32 inference). `rows`:
/// `[n, caches, width]`, appended first to each sequence's caches (one per key/value head;
/// MLA: one); `q`: `[n, heads, q width]`, head `h` reading cache `h / (heads / caches)`.
/// Returns `[n * heads, parts.value_width]`.
pub(super) fn attend_kernel(
    q: &Tensor,
    rows: &Tensor,
    seqs: &mut [(usize, usize, &mut [LatentCache])],
    parts: cpu_kernels::RowParts,
    scale: f64,
) -> Result<Tensor> {
    for (start, len, caches) in seqs.iter_mut() {
        let mine = rows.narrow(0, *start, *len)?;
        for (j, cache) in caches.iter_mut().enumerate() {
            cache.append(&mine.narrow(1, j, 1)?.squeeze(1)?, false)?;
        }
    }
    let views = seqs
        .iter()
        .map(|(_, _, caches)| caches.iter().map(|c| c.view()).collect())
        .collect::<Result<Vec<Vec<Tensor>>>>()?;
    let batch: Vec<cpu_kernels::LatentSeq<'_>> = seqs
        .iter()
        .zip(&views)
        .map(|((start, len, _), kv)| cpu_kernels::LatentSeq {
            start: *start,
            len: *len,
            kv,
        })
        .collect();
    cpu_kernels::latent_attention(q, &batch, parts, scale)
}

/// [`attend`] one sequence at a time with candle ops (and autograd nodes when
/// differentiable).
fn attend_per_sequence(
    ops: &Ops,
    q: &Tensor,
    rows: &Tensor,
    seqs: &mut [(usize, usize, &mut LatentCache)],
    v_width: usize,
    scale: f64,
) -> Result<Tensor> {
    let (_, nh, width) = q.dims3()?;
    let mut outs = Vec::with_capacity(seqs.len());
    for (start, len, cache) in seqs.iter_mut() {
        let past = cache.len();
        cache.append(&rows.narrow(0, *start, *len)?, ops.differentiable)?;
        let kv = cache.view()?; // [past + len, width]
        let total = past + *len;
        let qs = q.narrow(0, *start, *len)?.reshape((*len * nh, width))?;
        if ops.differentiable && kv.device().is_cpu() {
            // One autograd node that keeps no score-sized intermediates.
            outs.push(super::attention_grad::latent_attention(
                &qs, &kv, v_width, nh, past, scale,
            )?);
            continue;
        }
        let mut scores = (qs.matmul(&kv.t()?)? * scale)?;
        if *len > 1 {
            let mask = causal_mask(*len, past, &scores)?;
            scores = scores
                .reshape((*len, nh, total))?
                .broadcast_add(&mask)?
                .reshape((*len * nh, total))?;
        }
        let probs = ops.softmax_last_dim(&scores)?;
        outs.push(probs.matmul(&kv.narrow(1, 0, v_width)?)?); // [len * nh, v_width]
    }
    Tensor::cat(&outs, 0)
}

/// Splits `kv_b_proj` `[nh * (nope + v), kvr]` into `W_uk` `[nh, nope, kvr]` and `W_uv^T`
/// `[nh, kvr, v]`, both contiguous.
fn absorb(kv_b: &Tensor, nh: usize, nope: usize, v: usize) -> Result<(Tensor, Tensor)> {
    let kvr = kv_b.dim(1)?;
    let per_head = kv_b.reshape((nh, nope + v, kvr))?;
    let w_uk = per_head.narrow(1, 0, nope)?.contiguous()?;
    let w_uv_t = per_head.narrow(1, nope, v)?.transpose(1, 2)?.contiguous()?;
    Ok((w_uk, w_uv_t))
}

/// `W_uk` `[nh, nope, kvr]` as rows `[nh, kvr, nope]` for the CPU kernels, where they apply
/// (f32 compute, weights on the CPU).
fn kernel_rows(w_uk: &Tensor, compute: DType) -> Result<Option<Tensor>> {
    if compute == DType::F32 && cpu_kernels::holds_rows(w_uk) {
        Ok(Some(w_uk.transpose(1, 2)?.contiguous()?.detach()))
    } else {
        Ok(None)
    }
}

/// One layer's latent cache of one sequence: rows `[c_kv | k_pe]`, grown in place with
/// amortised doubling (or by concatenation when gradients must flow through it).
#[derive(Default)]
pub struct LatentCache {
    buf: Option<Tensor>,
    len: usize,
}

impl LatentCache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by this cache (its capacity, not just the used rows).
    pub fn capacity_bytes(&self) -> usize {
        self.buf
            .as_ref()
            .map(|b| b.elem_count() * b.dtype().size_in_bytes())
            .unwrap_or(0)
    }

    fn append(&mut self, rows: &Tensor, differentiable: bool) -> Result<()> {
        let (add, width) = rows.dims2()?;
        if differentiable {
            // In-place writes are invisible to autograd: build the cache by concatenation.
            self.buf = Some(if self.len > 0 {
                Tensor::cat(&[&self.view()?, rows], 0)?
            } else {
                rows.clone()
            });
            self.len += add;
            return Ok(());
        }
        let needed = self.len + add;
        let capacity = self
            .buf
            .as_ref()
            .map(|b| b.dim(0))
            .transpose()?
            .unwrap_or(0);
        if needed > capacity {
            let new_cap = needed.max(capacity * 2).max(16);
            let fresh = Tensor::zeros((new_cap, width), rows.dtype(), rows.device())?;
            if let Some(old) = &self.buf {
                fresh.slice_set(&old.narrow(0, 0, self.len)?, 0, 0)?;
            }
            self.buf = Some(fresh);
        }
        if let Some(b) = &self.buf {
            b.slice_set(&rows.contiguous()?, 0, self.len)?;
        }
        self.len = needed;
        Ok(())
    }

    fn view(&self) -> Result<Tensor> {
        match &self.buf {
            Some(b) => b.narrow(0, 0, self.len),
            None => candle_core::bail!("empty latent cache"),
        }
    }

    /// Forgets the last `n` tokens (used to roll back speculative or cancelled work).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}
