//! The decoder every architecture shares: embeddings, layers (attention + dense MLP or
//! MoE), final norm and LM head, run over a ragged batch of sequences that each bring their
//! own cache. What differs between architectures comes from the [`Config`] their files
//! build: the attention ([`Attention`] = MLA, or [`GqaAttention`]), the router and which
//! layers are MoE.

use candle_core::{DType, Device, Result, Tensor, Var};
use std::ops::Range;
use std::path::Path;

use super::attention::{Attention, LatentCache};
use super::config::{AttentionConfig, Config};
use super::error::ModelError;
use super::gqa::GqaAttention;
use super::load::{Precision, WeightStore};
use super::moe::{ExpertMap, MapSpan, Mlp, Moe, RoutingRecord, SELECTION_BIAS};
use super::ops::Ops;
use super::rope::Rope;

/// How a model is loaded: where it computes and in which dtype.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype; weights stored in any float dtype are converted to it once at load.
    pub dtype: DType,
    /// The dtype the weight matrices are kept in, when not the compute dtype: bf16 or f16
    /// under f32 compute on the CPU (half the memory, and half the bytes a decode step
    /// reads). `None` keeps them in the compute dtype.
    pub matrix_dtype: Option<DType>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            matrix_dtype: None,
        }
    }
}

impl LoadOptions {
    /// The dtype weight matrices are held in, the base's and (so that an adapter's expert
    /// costs what the base's does) every adapter's.
    pub fn matrices(&self) -> DType {
        self.matrix_dtype.unwrap_or(self.dtype)
    }

    /// The options named as the command line and the config file name them: `device`
    /// `cpu` or `cuda[:N]`, `dtype` and `weight_dtype` `f32`, `f16` or `bf16`
    /// (`weight_dtype` `None` or empty: the compute dtype). Checked as
    /// [`Self::precision`] checks them.
    pub fn named(
        device: &str,
        dtype: &str,
        weight_dtype: Option<&str>,
    ) -> super::error::Result<Self> {
        let parse = |flag: &str, name: &str| -> super::error::Result<DType> {
            Ok(match name {
                "f32" => DType::F32,
                "f16" => DType::F16,
                "bf16" => DType::BF16,
                other => {
                    return Err(ModelError::Invalid(format!(
                        "--{flag} {other}: expected f32, f16 or bf16"
                    )))
                }
            })
        };
        let dtype = parse("dtype", dtype)?;
        let matrix_dtype = match weight_dtype {
            None | Some("") => None,
            Some(name) => Some(parse("weight-dtype", name)?),
        };
        let device = match device {
            "cpu" => Device::Cpu,
            d if d == "cuda" || d.starts_with("cuda:") => {
                let ordinal = d.strip_prefix("cuda:").unwrap_or("0");
                let ordinal: usize = ordinal.parse().map_err(|_| {
                    ModelError::Invalid(format!("--device {d}: expected cuda:N, N a number"))
                })?;
                Device::new_cuda(ordinal).map_err(|e| {
                    ModelError::Invalid(format!(
                        "opening CUDA device {ordinal} (needs a build with the `cuda` \
                         feature, the NVIDIA driver and that GPU): {e}"
                    ))
                })?
            }
            other => {
                return Err(ModelError::Invalid(format!(
                    "--device {other}: expected cpu or cuda[:N]"
                )))
            }
        };
        let opts = Self {
            device,
            dtype,
            matrix_dtype,
        };
        opts.precision()?;
        Ok(opts)
    }

    /// The dtypes to load in, or why this combination cannot run.
    pub fn precision(&self) -> super::error::Result<Precision> {
        let (compute, matrices) = (self.dtype, self.matrices());
        if matrices != compute
            && !(compute == DType::F32 && matches!(matrices, DType::BF16 | DType::F16))
        {
            return Err(ModelError::Invalid(format!(
                "weight matrices in {matrices:?} under {compute:?} compute: narrower \
                 matrices run only under f32 compute, in bf16 or f16"
            )));
        }
        Ok(Precision { compute, matrices })
    }
}

pub enum FeedForward {
    Dense(Mlp),
    Moe(Moe),
}

/// A layer's attention, of the kind its architecture uses.
pub enum AttentionBlock {
    Mla(Attention),
    Gqa(GqaAttention),
}

impl AttentionBlock {
    fn load(
        cfg: &Config,
        w: &WeightStore,
        prefix: &str,
        precision: Precision,
        dev: &Device,
    ) -> super::error::Result<Self> {
        Ok(match &cfg.attention {
            AttentionConfig::Mla(m) => {
                Self::Mla(Attention::load(cfg, m, w, prefix, precision, dev)?)
            }
            AttentionConfig::Gqa(g) => {
                Self::Gqa(GqaAttention::load(cfg, g, w, prefix, precision, dev)?)
            }
        })
    }

    fn forward(
        &self,
        ops: &Ops,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        seqs: &mut [(usize, usize, &mut [LatentCache])],
    ) -> Result<Tensor> {
        match self {
            Self::Mla(a) => {
                let mut one: Vec<(usize, usize, &mut LatentCache)> = seqs
                    .iter_mut()
                    .map(|(start, len, caches)| (*start, *len, &mut caches[0]))
                    .collect();
                a.forward(ops, x, cos, sin, &mut one)
            }
            Self::Gqa(a) => a.forward(ops, x, cos, sin, seqs),
        }
    }

    /// Every weight tensor, mutably, under its checkpoint name suffix.
    pub fn named_weights_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        match self {
            Self::Mla(a) => a.named_weights_mut(),
            Self::Gqa(a) => a.named_weights_mut(),
        }
    }

    /// Recomputes what is derived from the weights (MLA's absorbed factors).
    pub fn refresh_derived(&mut self) -> Result<()> {
        match self {
            Self::Mla(a) => a.refresh_absorbed(),
            Self::Gqa(_) => Ok(()),
        }
    }
}

pub struct Layer {
    pub input_norm: Tensor,
    pub attn: AttentionBlock,
    pub post_attn_norm: Tensor,
    pub ffn: FeedForward,
}

/// All per-layer caches of one sequence: per layer, MLA's latent cache, or one key/value
/// cache per kv head of grouped-query attention.
pub struct SeqCache {
    layers: Vec<Vec<LatentCache>>,
}

impl SeqCache {
    pub fn new(cfg: &Config) -> Self {
        let per_layer = match &cfg.attention {
            AttentionConfig::Mla(_) => 1,
            AttentionConfig::Gqa(g) => g.num_key_value_heads,
        };
        Self {
            layers: (0..cfg.num_hidden_layers)
                .map(|_| (0..per_layer).map(|_| LatentCache::default()).collect())
                .collect(),
        }
    }

    /// Tokens already processed (the position of the next token).
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.first())
            .map_or(0, LatentCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity_bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(LatentCache::capacity_bytes)
            .sum()
    }

    pub fn truncate(&mut self, len: usize) {
        for l in self.layers.iter_mut().flatten() {
            l.truncate(len);
        }
    }
}

/// Which logits a sequence wants back from a forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted<'a> {
    /// None (an intermediate prefill chunk).
    None,
    /// The last new token's (generation).
    Last,
    /// Every new token's (tests, evaluation).
    All,
    /// The new tokens at these offsets, ascending (training: only positions with a target).
    Positions(&'a [u32]),
}

/// One sequence's part of a batched forward.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
    /// Expert id -> slot per MoE layer; `None` is the base model.
    pub experts: Option<&'a ExpertMap>,
    pub logits: LogitsWanted<'a>,
}

/// Logits of a batched forward: `[rows, vocab]` f32 (f64 for an f64 model), and each
/// sequence's row range.
pub struct ForwardOutput {
    pub logits: Option<Tensor>,
    pub rows: Vec<Range<usize>>,
    /// The load-balancing loss summed over MoE layers (see [`Decoder::set_balance_alpha`]).
    pub balance_loss: Option<Tensor>,
}

/// [`Decoder::forward_hidden`]'s result: final-normed hidden rows `[rows, hidden]` in
/// the compute dtype where logits were wanted, and each sequence's row range.
pub struct HiddenOutput {
    pub hidden: Option<Tensor>,
    pub rows: Vec<Range<usize>>,
    pub balance_loss: Option<Tensor>,
}

/// What a weight is, for choosing which ones to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightKind {
    RoutedExpert {
        layer: usize,
        expert: usize,
    },
    SharedExperts {
        layer: usize,
    },
    /// Attention, norms, router gates, dense MLPs, embeddings and the LM head.
    Other,
}

/// A weight made trainable by [`Decoder::make_trainable`].
pub struct TrainableWeight {
    /// Checkpoint name (fused SwiGLU weights as `...gate_up_proj.weight`).
    pub name: String,
    pub kind: WeightKind,
    pub var: Var,
}

/// Name suffix of a fused SwiGLU `[gate; up]` weight in [`Decoder::weights_mut`].
pub const FUSED_GATE_UP: &str = "gate_up_proj.weight";

/// An MLP's two weights under their names in [`Decoder::weights_mut`].
fn mlp_weights(
    prefix: String,
    kind: WeightKind,
    mlp: &mut Mlp,
) -> [(String, WeightKind, &mut Tensor); 2] {
    let Mlp { gate_up, down } = mlp;
    [
        (format!("{prefix}{FUSED_GATE_UP}"), kind, gate_up),
        (format!("{prefix}down_proj.weight"), kind, down),
    ]
}

/// A weight under its checkpoint name(s): a fused `gate_up_proj.weight` becomes its
/// `gate_proj.weight` and `up_proj.weight` halves, anything else passes through.
pub fn split_fused(name: &str, t: &Tensor) -> Result<Vec<(String, Tensor)>> {
    match name.strip_suffix(FUSED_GATE_UP) {
        Some(prefix) => {
            let i = t.dim(0)? / 2;
            Ok(vec![
                (format!("{prefix}gate_proj.weight"), t.narrow(0, 0, i)?),
                (format!("{prefix}up_proj.weight"), t.narrow(0, i, i)?),
            ])
        }
        None => Ok(vec![(name.to_string(), t.clone())]),
    }
}

pub struct Decoder {
    cfg: Config,
    embed: Tensor,
    pub layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    rope: Rope,
    base_map: ExpertMap,
    ops: Ops,
    /// Weight of the sequence-level load-balancing loss (0 = not computed).
    balance_alpha: f64,
    dtype: DType,
    device: Device,
}

impl Decoder {
    /// Loads `config.json` and the weights of a Hugging Face model directory.
    pub fn load_dir(dir: &Path, opts: &LoadOptions) -> super::error::Result<Self> {
        let cfg = Config::from_dir(dir)?;
        let weights = WeightStore::open_dir(dir)?;
        Self::load(cfg, &weights, opts)
    }

    pub fn load(cfg: Config, w: &WeightStore, opts: &LoadOptions) -> super::error::Result<Self> {
        skip_extra_layers(&cfg, w);
        let (dt, dev) = (opts.dtype, &opts.device);
        let precision = opts.precision()?;
        if dev.is_cpu() && dt == DType::BF16 {
            return Err(ModelError::Invalid(
                "bf16 compute is not supported on CPU (candle's CPU matmul has no bf16 kernel); \
                 use f32 compute, bf16 weights are converted at load"
                    .into(),
            ));
        }
        let h = cfg.hidden_size;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}.");
                let ffn = if cfg.is_moe_layer(i) {
                    FeedForward::Moe(Moe::load(&cfg, w, &format!("{p}mlp."), precision, dev)?)
                } else {
                    FeedForward::Dense(Mlp::load(
                        w,
                        &format!("{p}mlp."),
                        h,
                        cfg.intermediate_size,
                        precision,
                        dev,
                    )?)
                };
                Ok(Layer {
                    input_norm: w.get(&format!("{p}input_layernorm.weight"), &[h], dt, dev)?,
                    attn: AttentionBlock::load(&cfg, w, &format!("{p}self_attn."), precision, dev)?,
                    post_attn_norm: w.get(
                        &format!("{p}post_attention_layernorm.weight"),
                        &[h],
                        dt,
                        dev,
                    )?,
                    ffn,
                })
            })
            .collect::<super::error::Result<Vec<_>>>()?;
        let embed = w.weight(
            "model.embed_tokens.weight",
            &[cfg.vocab_size, h],
            precision,
            dev,
        )?;
        let lm_head = if cfg.tie_word_embeddings && !w.contains("lm_head.weight") {
            embed.clone()
        } else {
            w.weight("lm_head.weight", &[cfg.vocab_size, h], precision, dev)?
        };
        Ok(Self {
            rope: Rope::new(&cfg),
            base_map: ExpertMap::identity(&cfg),
            embed,
            layers,
            norm: w.get("model.norm.weight", &[h], dt, dev)?,
            lm_head,
            ops: Ops::default(),
            balance_alpha: 0.0,
            dtype: dt,
            device: dev.clone(),
            cfg,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Switches between fused inference kernels and autograd-friendly ops.
    pub fn set_differentiable(&mut self, on: bool) {
        self.ops.differentiable = on;
    }

    /// Makes differentiable forwards also return DeepSeek's sequence-level load-balancing
    /// loss with this weight (`aux_loss_alpha`), summed over MoE layers; 0 turns it off.
    pub fn set_balance_alpha(&mut self, alpha: f64) {
        self.balance_alpha = alpha;
    }

    pub fn new_cache(&self) -> SeqCache {
        SeqCache::new(&self.cfg)
    }

    pub fn moe(&self, layer: usize) -> Option<&Moe> {
        match &self.layers.get(layer)?.ffn {
            FeedForward::Moe(m) => Some(m),
            FeedForward::Dense(_) => None,
        }
    }

    pub fn moe_mut(&mut self, layer: usize) -> Option<&mut Moe> {
        match &mut self.layers.get_mut(layer)?.ffn {
            FeedForward::Moe(m) => Some(m),
            FeedForward::Dense(_) => None,
        }
    }

    /// Every weight, mutably, under its checkpoint name, with its kind. A fused SwiGLU
    /// `gate_up` is listed once, as `...gate_up_proj.weight` (see [`split_fused`]). A tied
    /// LM head is the embedding and is not listed. After changing attention weights call
    /// [`Decoder::refresh_derived`].
    pub fn weights_mut(&mut self) -> Vec<(String, WeightKind, &mut Tensor)> {
        let tied = self.lm_head.id() == self.embed.id();
        let mut out: Vec<(String, WeightKind, &mut Tensor)> = Vec::new();
        out.push((
            "model.embed_tokens.weight".into(),
            WeightKind::Other,
            &mut self.embed,
        ));
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}.");
            out.push((
                format!("{p}input_layernorm.weight"),
                WeightKind::Other,
                &mut layer.input_norm,
            ));
            for (suffix, t) in layer.attn.named_weights_mut() {
                out.push((format!("{p}self_attn.{suffix}"), WeightKind::Other, t));
            }
            out.push((
                format!("{p}post_attention_layernorm.weight"),
                WeightKind::Other,
                &mut layer.post_attn_norm,
            ));
            match &mut layer.ffn {
                FeedForward::Dense(mlp) => {
                    out.extend(mlp_weights(format!("{p}mlp."), WeightKind::Other, mlp));
                }
                FeedForward::Moe(moe) => {
                    let n_routed = self.cfg.n_routed_experts;
                    let (gate, bias, slots, shared) = moe.parts_mut();
                    out.push((format!("{p}mlp.gate.weight"), WeightKind::Other, gate));
                    if let Some(b) = bias {
                        let name = format!("{p}mlp.gate.{SELECTION_BIAS}");
                        out.push((name, WeightKind::Other, b));
                    }
                    for (e, slot) in slots.iter_mut().take(n_routed).enumerate() {
                        if let Some(mlp) = slot {
                            let kind = WeightKind::RoutedExpert {
                                layer: i,
                                expert: e,
                            };
                            out.extend(mlp_weights(format!("{p}mlp.experts.{e}."), kind, mlp));
                        }
                    }
                    if let Some(Some(mlp)) = shared.first_mut() {
                        let kind = WeightKind::SharedExperts { layer: i };
                        out.extend(mlp_weights(format!("{p}mlp.shared_experts."), kind, mlp));
                    }
                }
            }
        }
        out.push((
            "model.norm.weight".into(),
            WeightKind::Other,
            &mut self.norm,
        ));
        if !tied {
            out.push((
                "lm_head.weight".into(),
                WeightKind::Other,
                &mut self.lm_head,
            ));
        }
        out
    }

    /// Turns every weight `pick` selects into a trainable [`Var`] (updated in place by an
    /// optimizer) and returns them. All other weights stay plain tensors, for which autograd
    /// computes no gradient, and so does a router's selection bias, which has none. Leaves
    /// the model in differentiable mode.
    pub fn make_trainable(
        &mut self,
        pick: impl Fn(&WeightKind) -> bool,
    ) -> Result<Vec<TrainableWeight>> {
        let tied = self.lm_head.id() == self.embed.id();
        let compute = self.dtype;
        let mut out = Vec::new();
        for (name, kind, t) in self.weights_mut() {
            if pick(&kind) && !name.ends_with(SELECTION_BIAS) {
                // Trained in the compute dtype, whatever the frozen matrices are kept in.
                let var = Var::from_tensor(&t.to_dtype(compute)?)?;
                *t = var.as_tensor().clone();
                out.push(TrainableWeight { name, kind, var });
            }
        }
        if tied {
            self.lm_head = self.embed.clone();
        }
        self.refresh_derived()?;
        self.set_differentiable(true);
        Ok(out)
    }

    /// Recomputes cached products of weights (MLA's absorbed factors) after weights changed
    /// in place.
    pub fn refresh_derived(&mut self) -> Result<()> {
        for layer in &mut self.layers {
            layer.attn.refresh_derived()?;
        }
        Ok(())
    }

    /// Every weight under its checkpoint name, fused tensors split: what a checkpoint of
    /// this model holds.
    pub fn checkpoint_tensors(&mut self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, _, t) in self.weights_mut() {
            out.extend(split_fused(&name, t)?);
        }
        Ok(out)
    }

    /// The non-layer weights under their checkpoint names.
    pub fn named_globals(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("model.embed_tokens.weight", &self.embed),
            ("model.norm.weight", &self.norm),
            ("lm_head.weight", &self.lm_head),
        ]
    }

    /// One forward over a ragged batch. Each sequence's new tokens are appended to its
    /// cache. With `record`, every MoE layer's routing decisions are appended to it.
    pub fn forward(
        &self,
        batch: &mut [SeqInput<'_>],
        record: Option<&mut RoutingRecord>,
    ) -> Result<ForwardOutput> {
        on_compute_pool(|| self.forward_here(batch, record))
    }

    /// [`forward`](Self::forward) on the calling thread.
    fn forward_here(
        &self,
        batch: &mut [SeqInput<'_>],
        record: Option<&mut RoutingRecord>,
    ) -> Result<ForwardOutput> {
        let out = self.forward_hidden(batch, record)?;
        let logits = match out.hidden {
            Some(h) => {
                let logits = self.ops.linear(&h, &self.lm_head)?;
                // f32 for everyone but f64 models (gradient checks need the precision).
                Some(match logits.dtype() {
                    DType::F64 => logits,
                    _ => logits.to_dtype(DType::F32)?,
                })
            }
            None => None,
        };
        Ok(ForwardOutput {
            logits,
            rows: out.rows,
            balance_loss: out.balance_loss,
        })
    }

    /// The output head `[vocab, hidden]`: logits are `hidden @ lm_head^T`.
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// [`forward`](Self::forward) up to the output head: the final-normed hidden rows
    /// where logits are wanted, for a caller that applies the head itself (the trainer
    /// fuses it into the loss).
    pub fn forward_hidden(
        &self,
        batch: &mut [SeqInput<'_>],
        mut record: Option<&mut RoutingRecord>,
    ) -> Result<HiddenOutput> {
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(batch.len());
        for s in batch.iter() {
            if s.tokens.is_empty() {
                candle_core::bail!("a sequence in the batch has no new tokens");
            }
            let past = s.cache.len();
            spans.push((tokens.len(), s.tokens.len()));
            tokens.extend_from_slice(s.tokens);
            positions.extend(past..past + s.tokens.len());
        }
        let n = tokens.len();
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            candle_core::bail!(
                "token id {bad} is out of range (vocab size {})",
                self.cfg.vocab_size
            );
        }
        let dev = &self.device;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        self.rope.tables_into(&positions, &mut cos, &mut sin);
        let half = self.cfg.rope_dims().0 / 2;
        let cos = Tensor::from_vec(cos, (n, half), dev)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (n, half), dev)?.to_dtype(self.dtype)?;
        let map_spans: Vec<MapSpan<'_>> = batch
            .iter()
            .zip(&spans)
            .map(|(s, &(start, len))| (start, len, s.experts.unwrap_or(&self.base_map)))
            .collect();

        let mut x = self
            .embed
            .index_select(&Tensor::from_slice(&tokens, n, dev)?, 0)?
            .to_dtype(self.dtype)?;
        let eps = self.cfg.rms_norm_eps;
        let mut balance_loss: Option<Tensor> = None;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = self.ops.rms_norm(&x, &layer.input_norm, eps)?;
            let mut seqs: Vec<(usize, usize, &mut [LatentCache])> = batch
                .iter_mut()
                .zip(&spans)
                .map(|(s, &(start, len))| (start, len, s.cache.layers[li].as_mut_slice()))
                .collect();
            x = (x + layer.attn.forward(&self.ops, &h, &cos, &sin, &mut seqs)?)?;
            let h = self.ops.rms_norm(&x, &layer.post_attn_norm, eps)?;
            let y = match &layer.ffn {
                FeedForward::Dense(mlp) => mlp.forward(&self.ops, &h)?,
                FeedForward::Moe(moe) => {
                    let moe_index = self.cfg.moe_index(li).ok_or_else(|| {
                        candle_core::Error::Msg(format!("layer {li} is not a MoE layer"))
                    })?;
                    let mut o =
                        moe.forward(&self.ops, &h, moe_index, &map_spans, self.balance_alpha)?;
                    if let Some(r) = record.as_deref_mut() {
                        o.routing.layer = li;
                        r.layers.push(o.routing);
                    }
                    if let Some(l) = o.balance_loss {
                        balance_loss = Some(match balance_loss {
                            Some(acc) => (acc + l)?,
                            None => l,
                        });
                    }
                    o.out
                }
            };
            x = (x + y)?;
        }

        let mut rows = Vec::with_capacity(batch.len());
        let mut pick: Vec<u32> = Vec::new();
        for (s, &(start, len)) in batch.iter().zip(&spans) {
            let first = pick.len();
            match s.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last => pick.push((start + len - 1) as u32),
                LogitsWanted::All => pick.extend(start as u32..(start + len) as u32),
                LogitsWanted::Positions(p) => {
                    if let Some(&bad) = p.iter().find(|&&i| i as usize >= len) {
                        candle_core::bail!("logits wanted at offset {bad} of {len} new tokens");
                    }
                    pick.extend(p.iter().map(|&i| start as u32 + i));
                }
            }
            rows.push(first..pick.len());
        }
        let hidden = if pick.is_empty() {
            None
        } else {
            let picked = if pick.len() == n {
                x
            } else {
                let len = pick.len();
                x.index_select(&Tensor::from_vec(pick, len, dev)?, 0)?
            };
            Some(self.ops.rms_norm(&picked, &self.norm, eps)?)
        };
        Ok(HiddenOutput {
            hidden,
            rows,
            balance_loss,
        })
    }
}

/// Logs the checkpoint's layers past `num_hidden_layers` (DeepSeek-V3's multi-token
/// prediction modules), which generation does not use and the loader leaves unread.
fn skip_extra_layers(cfg: &Config, w: &WeightStore) {
    let mut extra: Vec<usize> = w
        .names()
        .filter_map(|n| {
            n.strip_prefix("model.layers.")?
                .split('.')
                .next()?
                .parse()
                .ok()
        })
        .filter(|&l: &usize| l >= cfg.num_hidden_layers)
        .collect();
    extra.sort_unstable();
    extra.dedup();
    if !extra.is_empty() {
        tracing::info!(
            layers = ?extra,
            "skipping {} layer(s) past num_hidden_layers = {} (multi-token prediction)",
            extra.len(),
            cfg.num_hidden_layers
        );
    }
}

/// Runs `f` on a thread of the compute pool (rayon's global pool, which the CPU kernels
/// split their work over), or right here when already on one. From a pool thread every
/// parallel section of the forward starts and joins inside the pool; from outside, each
/// one would also hand the caller's thread to the kernel and wake it up afterwards.
fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_moe_layers_route_and_remap_by_model_layer() {
        // Qwen3-MoE, 6 layers, decoder_sparse_step 2 (layers 1, 3, 5) and layer 3 listed
        // in mlp_only_layers: MoE layers 1 and 5, MoE indices 0 and 1.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/qwen3-moe/config.json"
        );
        let mut j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        j["num_hidden_layers"] = 6.into();
        j["decoder_sparse_step"] = 2.into();
        j["mlp_only_layers"] = serde_json::json!([3]);
        let dir = tempfile::tempdir().unwrap();
        super::super::init::write_random_checkpoint(&j, 2, dir.path()).unwrap();
        let mut model = Decoder::load_dir(dir.path(), &LoadOptions::default()).unwrap();
        let cfg = model.config().clone();
        assert_eq!(cfg.moe_layers().collect::<Vec<_>>(), vec![1, 5]);
        assert_eq!((cfg.moe_index(5), cfg.moe_index(3)), (Some(1), None));
        assert!(model.moe(3).is_none() && model.moe(5).is_some());

        let tokens = [0u32, 7, 99, 300, 42];
        let run = |model: &Decoder, map: Option<&ExpertMap>| {
            let mut cache = model.new_cache();
            let mut batch = [SeqInput {
                tokens: &tokens,
                cache: &mut cache,
                experts: map,
                logits: LogitsWanted::All,
            }];
            let mut record = RoutingRecord::default();
            let out = model.forward(&mut batch, Some(&mut record)).unwrap();
            let logits: Vec<Vec<f32>> = out.logits.unwrap().to_vec2().unwrap();
            (logits, record)
        };
        let (base, record) = run(&model, None);
        assert_eq!(
            record.layers.iter().map(|l| l.layer).collect::<Vec<_>>(),
            [1, 5]
        );
        // Layer 5's most used expert served from a new slot holding a scaled copy: the
        // output changes exactly where the map points.
        let layer5 = &record.layers[1];
        let e = layer5.ids[0] as usize;
        let moe = model.moe_mut(5).unwrap();
        let copy = moe.slot(e).unwrap().clone();
        let slot = moe.slot_count();
        let scaled = Mlp {
            gate_up: copy.gate_up.clone(),
            down: (copy.down * 3.0).unwrap(),
        };
        moe.set_slot(slot, Some(scaled));
        let mut map = ExpertMap::identity(&cfg);
        map.set(5, e, slot as u32);
        let (mapped, _) = run(&model, Some(&map));
        assert_ne!(mapped, base);
        let (again, _) = run(&model, None);
        assert_eq!(again, base, "the base map still reads the base expert");
    }

    fn precision(dtype: DType, matrices: Option<DType>) -> super::super::error::Result<Precision> {
        LoadOptions {
            device: Device::Cpu,
            dtype,
            matrix_dtype: matrices,
        }
        .precision()
    }

    #[test]
    fn matrices_may_be_narrower_only_under_f32_compute() {
        let p = precision(DType::F32, Some(DType::BF16)).unwrap();
        assert_eq!((p.compute, p.matrices), (DType::F32, DType::BF16));
        assert_eq!(p.of(&[64, 32]), DType::BF16);
        assert_eq!(
            p.of(&[64]),
            DType::F32,
            "norm weights stay in the compute dtype"
        );
        assert_eq!(
            precision(DType::F16, None).unwrap(),
            Precision::uniform(DType::F16)
        );
        assert!(precision(DType::F32, Some(DType::F16)).is_ok());
        for (compute, matrices) in [
            (DType::F16, DType::BF16),
            (DType::F32, DType::F64),
            (DType::BF16, DType::F32),
        ] {
            let err = precision(compute, Some(matrices)).unwrap_err().to_string();
            assert!(err.contains("f32 compute"), "{err}");
        }
    }

    #[test]
    fn options_are_read_from_their_names() {
        let o = LoadOptions::named("cpu", "f32", Some("bf16")).unwrap();
        assert!(o.device.is_cpu());
        assert_eq!((o.dtype, o.matrices()), (DType::F32, DType::BF16));
        let o = LoadOptions::named("cpu", "bf16", Some("")).unwrap();
        assert_eq!((o.dtype, o.matrix_dtype), (DType::BF16, None));
        let err = |d: &str, t: &str, w: Option<&str>| {
            LoadOptions::named(d, t, w).unwrap_err().to_string()
        };
        assert!(err("cpu", "f64", None).contains("--dtype f64"));
        assert!(err("cpu", "f32", Some("int4")).contains("--weight-dtype int4"));
        assert!(err("tpu", "f32", None).contains("--device tpu"));
        assert!(err("cuda:x", "f32", None).contains("cuda:N"));
        // Narrow matrices only under f32 compute.
        assert!(err("cpu", "f16", Some("bf16")).contains("f32 compute"));
    }
}
