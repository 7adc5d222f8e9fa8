//! The MoE layer of every architecture: the router (softmax or sigmoid scores with an
//! optional selection bias; plain, group-limited or `noaux_tc` top-k; renormalised or not;
//! scaled), routed experts held in *slots*, and the always-on shared experts (DeepSeek).
//!
//! Slots 0..n_routed hold the base experts; further slots hold adapter copies. Every token
//! carries an [`ExpertMap`] row (expert id -> slot), so one forward serves a batch that mixes
//! the base and any number of adapters. Tokens are grouped per slot: each slot's rows run
//! through its expert in one matmul, with no padding and no per-token loop.

use candle_core::{DType, Device, Result, Tensor};

use super::config::{Config, ScoringFunc, TopkMethod};
use super::cpu_kernels;
use super::load::{Precision, WeightStore};
use super::moe_grad;
use super::ops::{swiglu, Ops};

/// Name (after `mlp.gate.`) of a sigmoid router's selection bias. It steers the choice of
/// experts only and has no gradient: it is never trained.
pub const SELECTION_BIAS: &str = "e_score_correction_bias";

/// A SwiGLU feed-forward block: `down(silu(gate x) * up x)`, with gate and up fused.
#[derive(Clone)]
pub struct Mlp {
    /// `[2 * inter, hidden]`: gate rows then up rows.
    pub gate_up: Tensor,
    /// `[hidden, inter]`
    pub down: Tensor,
}

impl Mlp {
    pub fn load(
        w: &WeightStore,
        prefix: &str,
        hidden: usize,
        inter: usize,
        precision: Precision,
        dev: &Device,
    ) -> super::error::Result<Self> {
        let get = |n: &str, s: &[usize]| w.weight(&format!("{prefix}{n}"), s, precision, dev);
        let gate = get("gate_proj.weight", &[inter, hidden])?;
        let up = get("up_proj.weight", &[inter, hidden])?;
        let down = get("down_proj.weight", &[hidden, inter])?;
        Ok(Self::from_parts(&gate, &up, down)?)
    }

    pub fn from_parts(gate: &Tensor, up: &Tensor, down: Tensor) -> Result<Self> {
        Ok(Self {
            gate_up: Tensor::cat(&[gate, up], 0)?,
            down,
        })
    }

    pub fn inter(&self) -> usize {
        self.down.dims()[1]
    }

    /// `(gate_proj, up_proj, down_proj)` weights as the checkpoint names them.
    pub fn parts(&self) -> Result<[(&'static str, Tensor); 3]> {
        let i = self.inter();
        Ok([
            ("gate_proj.weight", self.gate_up.narrow(0, 0, i)?),
            ("up_proj.weight", self.gate_up.narrow(0, i, i)?),
            ("down_proj.weight", self.down.clone()),
        ])
    }

    pub fn size_bytes(&self) -> usize {
        (self.gate_up.elem_count() + self.down.elem_count()) * self.down.dtype().size_in_bytes()
    }

    pub fn forward(&self, ops: &Ops, x: &Tensor) -> Result<Tensor> {
        ops.linear(&swiglu(&ops.linear(x, &self.gate_up)?)?, &self.down)
    }
}

/// Per MoE layer, the slot serving each routed expert id, and the slot serving the shared
/// experts. Shared by every token of the sequences that use it (identity for the base).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertMap {
    /// `tables[moe_layer_index][expert_id] = slot`
    tables: Vec<Vec<u32>>,
    /// `shared[moe_layer_index]` = shared-expert slot (0 = the base's).
    shared: Vec<u32>,
    /// `layers[moe_layer_index]` = model layer index.
    layers: Vec<usize>,
}

impl ExpertMap {
    pub fn identity(cfg: &Config) -> Self {
        let row: Vec<u32> = (0..cfg.n_routed_experts as u32).collect();
        let layers: Vec<usize> = cfg.moe_layers().collect();
        Self {
            tables: layers.iter().map(|_| row.clone()).collect(),
            shared: layers.iter().map(|_| 0).collect(),
            layers,
        }
    }

    /// The MoE index of model layer `layer`. Panics if it is not a MoE layer (callers
    /// validate layers against the config first).
    fn index(&self, layer: usize) -> usize {
        match self.layers.iter().position(|&l| l == layer) {
            Some(i) => i,
            None => panic!("layer {layer} is not a MoE layer"),
        }
    }

    /// Points routed `expert` of model layer `layer` (a MoE layer) at `slot`.
    pub fn set(&mut self, layer: usize, expert: usize, slot: u32) {
        let i = self.index(layer);
        self.tables[i][expert] = slot;
    }

    /// Points the shared experts of model layer `layer` at shared slot `slot`.
    pub fn set_shared(&mut self, layer: usize, slot: u32) {
        let i = self.index(layer);
        self.shared[i] = slot;
    }

    pub fn table(&self, moe_index: usize) -> &[u32] {
        &self.tables[moe_index]
    }

    pub fn shared_slot(&self, moe_index: usize) -> u32 {
        self.shared[moe_index]
    }

    pub fn is_identity(&self) -> bool {
        self.shared.iter().all(|&s| s == 0)
            && self
                .tables
                .iter()
                .all(|t| t.iter().enumerate().all(|(i, &s)| s as usize == i))
    }
}

/// What the router decided for the tokens of one MoE layer, token-major (`k` per token,
/// sorted by descending weight, ties to the lower id).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerRouting {
    /// Model layer index.
    pub layer: usize,
    pub top_k: usize,
    pub ids: Vec<u32>,
    /// Gate probability of each chosen expert (ESFT's gate score input): its softmax
    /// probability, or for sigmoid routers its share of the token's affinity, the sigmoid
    /// score over the sum of all experts' (without the selection bias). A token's values
    /// sum to at most 1 either way.
    pub probs: Vec<f32>,
    /// The multiplier applied to each expert's output (after normalisation or scaling).
    pub weights: Vec<f32>,
}

impl LayerRouting {
    pub fn tokens(&self) -> usize {
        self.ids.len() / self.top_k.max(1)
    }
}

/// Router decisions of every MoE layer of one forward, in the forward's token order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoutingRecord {
    pub layers: Vec<LayerRouting>,
}

#[derive(Debug, Clone)]
pub struct Router {
    n_experts: usize,
    top_k: usize,
    scoring: ScoringFunc,
    method: TopkMethod,
    scaling: f32,
    normalise: bool,
}

impl Router {
    pub fn new(cfg: &Config) -> Self {
        Self {
            n_experts: cfg.n_routed_experts,
            top_k: cfg.num_experts_per_tok,
            scoring: cfg.router.scoring,
            method: cfg.router.method,
            scaling: cfg.router.scale(cfg.num_experts_per_tok) as f32,
            normalise: cfg.router.renormalise(cfg.num_experts_per_tok),
        }
    }

    /// Routes every row of `logits` (`[n, E]`, host f32); `bias` (`[E]`) is added to the
    /// scores for choosing experts only. Returns ids, gate probabilities (see
    /// [`LayerRouting::probs`]) and output multipliers, `k` per token, sorted by descending
    /// multiplier (ties to the lower id).
    pub fn route(&self, logits: &[f32], bias: Option<&[f32]>) -> (Vec<u32>, Vec<f32>, Vec<f32>) {
        let (e, k) = (self.n_experts, self.top_k);
        let n = logits.len() / e;
        let mut ids = Vec::with_capacity(n * k);
        let mut probs = Vec::with_capacity(n * k);
        let mut weights = Vec::with_capacity(n * k);
        let mut p = vec![0f32; e];
        let mut choice = vec![0f32; e];
        let mut order: Vec<u32> = Vec::with_capacity(e);
        for row in logits.chunks_exact(e) {
            match self.scoring {
                ScoringFunc::Softmax => softmax_into(row, &mut p),
                ScoringFunc::Sigmoid => {
                    for (o, &x) in p.iter_mut().zip(row) {
                        *o = 1.0 / (1.0 + (-x).exp());
                    }
                }
            }
            let choice: &[f32] = match bias {
                Some(b) => {
                    for ((c, &s), &b) in choice.iter_mut().zip(&p).zip(b) {
                        *c = s + b;
                    }
                    &choice
                }
                None => &p,
            };
            order.clear();
            match self.method {
                TopkMethod::Greedy => order.extend(0..e as u32),
                TopkMethod::GroupLimitedGreedy {
                    n_group,
                    topk_group,
                } => keep_groups(&mut order, choice, n_group, topk_group, |g| {
                    g.iter().copied().fold(f32::NEG_INFINITY, f32::max)
                }),
                TopkMethod::NoauxTc {
                    n_group,
                    topk_group,
                } => keep_groups(&mut order, choice, n_group, topk_group, |g| {
                    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                    for &v in g {
                        if v > a {
                            (a, b) = (v, a);
                        } else if v > b {
                            b = v;
                        }
                    }
                    a + b
                }),
            }
            // What a sigmoid score is a share of (softmax probabilities already are shares).
            let total = match self.scoring {
                ScoringFunc::Softmax => 1.0,
                ScoringFunc::Sigmoid => p.iter().sum::<f32>(),
            };
            sort_desc_by_score(&mut order, choice);
            let chosen = &mut order[..k];
            // With a selection bias the choice order is not the weight order.
            sort_desc_by_score(chosen, &p);
            let sum: f32 = chosen.iter().map(|&i| p[i as usize]).sum();
            for &i in chosen.iter() {
                let prob = p[i as usize];
                ids.push(i);
                probs.push(prob / total);
                let w = if self.normalise {
                    prob / (sum + 1e-20)
                } else {
                    prob
                };
                weights.push(w * self.scaling);
            }
        }
        (ids, probs, weights)
    }

    /// Output multipliers as a differentiable tensor `[n, k]`: gathered from the scores of
    /// `logits` at the chosen `ids`, then normalised and scaled like [`Router::route`].
    /// Returns each token's distribution over all experts `[n, E]` too (the softmax, or the
    /// sigmoid scores divided by their sum), for the load-balancing loss.
    fn weights_tensor(&self, ops: &Ops, logits: &Tensor, ids: &[u32]) -> Result<(Tensor, Tensor)> {
        let n = logits.dim(0)?;
        // f32 at least (f64 stays f64: gradient checks run the model in f64).
        let logits = match logits.dtype() {
            DType::F64 => logits.clone(),
            _ => logits.to_dtype(DType::F32)?,
        };
        let (scores, probs) = match self.scoring {
            ScoringFunc::Softmax => {
                let p = ops.softmax_last_dim(&logits)?;
                (p.clone(), p)
            }
            ScoringFunc::Sigmoid => {
                let s = candle_nn::ops::sigmoid(&logits)?;
                let p = s.broadcast_div(&s.sum_keepdim(1)?)?;
                (s, p)
            }
        };
        let idx = Tensor::from_slice(ids, (n, self.top_k), logits.device())?;
        let w = scores.gather(&idx, 1)?;
        let w = if self.normalise {
            w.broadcast_div(&(w.sum_keepdim(1)? + 1e-20)?)?
        } else {
            w
        };
        let w = if self.scaling == 1.0 {
            w
        } else {
            (w * self.scaling as f64)?
        };
        Ok((w, probs))
    }

    /// DeepSeek's sequence-level load-balancing loss for one layer, as a differentiable
    /// scalar: `alpha * mean_s sum_i f_si * P_si`, where for sequence `s` of `T` tokens
    /// `f_si = E / (k T) * (times expert i is in a token's top-k)` and `P_si` is the mean
    /// softmax probability of expert `i` over its tokens. `f` is a constant (no gradient
    /// flows through the top-k choice), so the loss is `sum(probs * c)` with
    /// `c[t, i] = alpha * f_si / (T * S)` for token `t` of sequence `s` among `S`.
    fn balance_loss(
        &self,
        probs: &Tensor,
        ids: &[u32],
        seq_lens: &[usize],
        alpha: f64,
    ) -> Result<Tensor> {
        let (e, k) = (self.n_experts, self.top_k);
        let n: usize = seq_lens.iter().sum();
        let seqs = seq_lens.iter().filter(|&&t| t > 0).count().max(1) as f64;
        let mut coef = vec![0f64; n * e];
        let mut start = 0;
        for &t in seq_lens {
            if t == 0 {
                continue;
            }
            let mut counts = vec![0usize; e];
            for &id in &ids[start * k..(start + t) * k] {
                counts[id as usize] += 1;
            }
            let tf = t as f64;
            for row in coef[start * e..(start + t) * e].chunks_exact_mut(e) {
                for (c, &count) in row.iter_mut().zip(&counts) {
                    let f = e as f64 / (k as f64 * tf) * count as f64;
                    *c = alpha * f / (tf * seqs);
                }
            }
            start += t;
        }
        let coef = Tensor::from_vec(coef, (n, e), probs.device())?.to_dtype(probs.dtype())?;
        (probs * coef)?.sum_all()
    }
}

/// Softmax in f64 accumulation, rounded to f32.
fn softmax_into(row: &[f32], out: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    for (o, &x) in out.iter_mut().zip(row) {
        *o = ((x as f64 - max).exp() / sum) as f32;
    }
}

/// Orders candidate ids by descending score, ties to the lower id.
fn sort_desc_by_score(ids: &mut [u32], score: &[f32]) {
    ids.sort_by(|&a, &b| {
        score[b as usize]
            .total_cmp(&score[a as usize])
            .then(a.cmp(&b))
    });
}

/// Puts into `order` the experts of the `keep` groups (of `n_group` consecutive experts)
/// that `group_score` ranks highest.
fn keep_groups(
    order: &mut Vec<u32>,
    choice: &[f32],
    n_group: usize,
    keep: usize,
    group_score: impl Fn(&[f32]) -> f32,
) {
    let size = choice.len() / n_group;
    let scores: Vec<f32> = choice.chunks_exact(size).map(group_score).collect();
    for g in top_indices(&scores, keep) {
        order.extend((g * size) as u32..((g + 1) * size) as u32);
    }
}

/// Indices of the `k` largest values (ties to the lower index).
fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    sort_desc_by_score(&mut idx, values);
    idx[..k].iter().map(|&i| i as usize).collect()
}

fn put_slot(table: &mut Vec<Option<Mlp>>, slot: usize, mlp: Option<Mlp>) {
    if slot >= table.len() {
        table.resize(slot + 1, None);
    }
    table[slot] = mlp;
}

/// One MoE layer.
pub struct Moe {
    pub gate: Tensor,
    /// `e_score_correction_bias` `[E]` in f32 (sigmoid routers): selection only.
    pub gate_bias: Option<Tensor>,
    /// Slot-indexed routed experts: the base experts first, adapter copies after (`None`
    /// marks a free slot).
    slots: Vec<Option<Mlp>>,
    /// Slot-indexed shared experts: the base's at 0, adapter copies after.
    shared: Vec<Option<Mlp>>,
    router: Router,
}

/// The rows of the batch that use one expert map: `(first_row, rows, map)`, one per
/// sequence.
pub type MapSpan<'a> = (usize, usize, &'a ExpertMap);

/// What one MoE layer's forward produced.
pub struct MoeOutput {
    /// `[n, hidden]`
    pub out: Tensor,
    pub routing: LayerRouting,
    /// The load-balancing loss (differentiable forwards with a positive alpha only).
    pub balance_loss: Option<Tensor>,
}

impl Moe {
    pub fn load(
        cfg: &Config,
        w: &WeightStore,
        prefix: &str,
        precision: Precision,
        dev: &Device,
    ) -> super::error::Result<Self> {
        let h = cfg.hidden_size;
        let gate = w.weight(
            &format!("{prefix}gate.weight"),
            &[cfg.n_routed_experts, h],
            precision,
            dev,
        )?;
        let slots = (0..cfg.n_routed_experts)
            .map(|e| {
                let p = format!("{prefix}experts.{e}.");
                Mlp::load(w, &p, h, cfg.moe_intermediate_size, precision, dev)
            })
            .collect::<super::error::Result<Vec<_>>>()?;
        let shared = match cfg.n_shared_experts {
            0 => vec![],
            s => vec![Some(Mlp::load(
                w,
                &format!("{prefix}shared_experts."),
                h,
                cfg.moe_intermediate_size * s,
                precision,
                dev,
            )?)],
        };
        let gate_bias = match cfg.router.scoring {
            ScoringFunc::Sigmoid => Some(w.get(
                &format!("{prefix}gate.{SELECTION_BIAS}"),
                &[cfg.n_routed_experts],
                DType::F32,
                dev,
            )?),
            ScoringFunc::Softmax => None,
        };
        Ok(Self {
            gate,
            gate_bias,
            slots: slots.into_iter().map(Some).collect(),
            shared,
            router: Router::new(cfg),
        })
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    pub fn slot(&self, slot: usize) -> Option<&Mlp> {
        self.slots.get(slot)?.as_ref()
    }

    /// The gate, its selection bias (sigmoid routers), the routed-expert slots and the
    /// shared-expert slots, mutably at once.
    #[allow(clippy::type_complexity)]
    pub fn parts_mut(
        &mut self,
    ) -> (
        &mut Tensor,
        Option<&mut Tensor>,
        &mut [Option<Mlp>],
        &mut [Option<Mlp>],
    ) {
        (
            &mut self.gate,
            self.gate_bias.as_mut(),
            &mut self.slots,
            &mut self.shared,
        )
    }

    pub fn slot_mut(&mut self, slot: usize) -> Option<&mut Mlp> {
        self.slots.get_mut(slot)?.as_mut()
    }

    pub fn shared_slot_mut(&mut self, slot: usize) -> Option<&mut Mlp> {
        self.shared.get_mut(slot)?.as_mut()
    }

    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Fills (or, with `None`, frees) a routed-expert slot, growing the table as needed.
    pub fn set_slot(&mut self, slot: usize, mlp: Option<Mlp>) {
        put_slot(&mut self.slots, slot, mlp);
    }

    pub fn shared_slot(&self, slot: usize) -> Option<&Mlp> {
        self.shared.get(slot)?.as_ref()
    }

    pub fn shared_slot_count(&self) -> usize {
        self.shared.len()
    }

    /// Fills (or frees) a shared-expert slot; slot 0 is the base's.
    pub fn set_shared_slot(&mut self, slot: usize, mlp: Option<Mlp>) {
        put_slot(&mut self.shared, slot, mlp);
    }

    /// `x`: `[n, hidden]`; `spans` cover all rows in order, one per sequence, each with its
    /// expert map row set for this layer (`moe_index`). Returns the layer output and the
    /// routing decisions and, when differentiable with `balance_alpha > 0`, the
    /// load-balancing loss.
    pub fn forward(
        &self,
        ops: &Ops,
        x: &Tensor,
        moe_index: usize,
        spans: &[MapSpan<'_>],
        balance_alpha: f64,
    ) -> Result<MoeOutput> {
        let (n, hidden) = x.dims2()?;
        let k = self.router.top_k;
        let logits = ops.linear(x, &self.gate)?;
        let host_logits = logits
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let bias = match &self.gate_bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        let (ids, probs, weights) = self.router.route(&host_logits, bias.as_deref());

        // Slot of every (token, choice) pair, then a counting sort of the pairs by slot.
        let mut pair_slot = Vec::with_capacity(n * k);
        for &(start, len, map) in spans {
            let table = map.table(moe_index);
            for t in start..start + len {
                pair_slot.extend(ids[t * k..(t + 1) * k].iter().map(|&e| table[e as usize]));
            }
        }
        if pair_slot.len() != n * k {
            candle_core::bail!("expert map spans cover {} of {n} rows", pair_slot.len() / k);
        }
        let mut counts = vec![0usize; self.slots.len()];
        for &s in &pair_slot {
            match (counts.get_mut(s as usize), self.slot(s as usize)) {
                (Some(c), Some(_)) => *c += 1,
                _ => candle_core::bail!("expert map points at slot {s}, which holds no expert"),
            }
        }
        let mut next: Vec<usize> = counts
            .iter()
            .scan(0, |acc, &c| {
                let start = *acc;
                *acc += c;
                Some(start)
            })
            .collect();
        let mut pair_order = vec![0u32; n * k];
        for (pair, &s) in pair_slot.iter().enumerate() {
            pair_order[next[s as usize]] = pair as u32;
            next[s as usize] += 1;
        }
        let token_order: Vec<u32> = pair_order.iter().map(|&p| p / k as u32).collect();

        let dev = x.device();
        // (slot, first sorted row, rows) of every slot with work.
        let mut used = Vec::new();
        let mut offset = 0;
        for (slot, &count) in counts.iter().enumerate() {
            if count > 0 {
                used.push((slot, offset, count));
                offset += count;
            }
        }
        let expert = |slot: usize| {
            self.slot(slot)
                .ok_or_else(|| candle_core::Error::Msg(format!("empty slot {slot}")))
        };
        let mut balance_loss = None;
        let mut shared_done = false;
        let mut out = if ops.differentiable {
            let (w, probs) = self.router.weights_tensor(ops, &logits, &ids)?;
            if balance_alpha > 0.0 {
                let lens: Vec<usize> = spans.iter().map(|s| s.1).collect();
                let loss = self
                    .router
                    .balance_loss(&probs, &ids, &lens, balance_alpha)?;
                balance_loss = Some(loss);
            }
            let w = w
                .flatten_all()?
                .index_select(&Tensor::from_slice(&pair_order, n * k, dev)?, 0)?
                .to_dtype(x.dtype())?;
            let groups = used
                .iter()
                .map(|&(slot, start, rows)| {
                    Ok(moe_grad::Group {
                        start,
                        rows,
                        mlp: expert(slot)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            moe_grad::routed_experts(ops, x, &token_order, &w, &groups)?
        } else if cpu_kernels::applies(x)
            && (cpu_kernels::grouped_wins(used.iter().map(|u| u.2).max().unwrap_or(0).max(n))
                || self.gate.dtype() != x.dtype())
        {
            // One parallel call for the routed pairs and every token once more through its
            // shared experts (weight 1): the index_add then sums both in the order the
            // separate paths would. Always taken for experts stored narrower than `x`.
            let mut rows = token_order;
            let mut w: Vec<f32> = pair_order.iter().map(|&p| weights[p as usize]).collect();
            let mut groups = used
                .iter()
                .map(|&(slot, start, rows)| {
                    let e = expert(slot)?;
                    Ok(cpu_kernels::ExpertGroup {
                        start,
                        rows,
                        gate_up: &e.gate_up,
                        down: &e.down,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            if !self.shared.is_empty() {
                for (mlp, start, len) in self.shared_runs(moe_index, spans)? {
                    groups.push(cpu_kernels::ExpertGroup {
                        start: n * k + start,
                        rows: len,
                        gate_up: &mlp.gate_up,
                        down: &mlp.down,
                    });
                }
                rows.extend(0..n as u32);
                w.resize(n * k + n, 1.0);
                shared_done = true;
            }
            let xs = cpu_kernels::gather_rows(x, &rows)?;
            let ys = cpu_kernels::grouped_swiglu(&xs, &groups, &w)?;
            cpu_kernels::scatter_add_rows(&ys, &rows, n)?
        } else {
            let token_idx = Tensor::from_slice(&token_order, n * k, dev)?;
            let xs = x.index_select(&token_idx, 0)?;
            let w: Vec<f32> = pair_order.iter().map(|&p| weights[p as usize]).collect();
            let w_sorted = Tensor::from_vec(w, (n * k, 1), dev)?.to_dtype(x.dtype())?;
            let mut gate_up = Vec::with_capacity(used.len());
            for &(slot, start, rows) in &used {
                gate_up.push(ops.linear(&xs.narrow(0, start, rows)?, &expert(slot)?.gate_up)?);
            }
            let act = swiglu(&Tensor::cat(&gate_up, 0)?)?;
            let mut down = Vec::with_capacity(used.len());
            for &(slot, start, rows) in &used {
                down.push(ops.linear(&act.narrow(0, start, rows)?, &expert(slot)?.down)?);
            }
            let ys = Tensor::cat(&down, 0)?.broadcast_mul(&w_sorted)?;
            Tensor::zeros((n, hidden), x.dtype(), dev)?.index_add(&token_idx, &ys, 0)?
        };
        if !self.shared.is_empty() && !shared_done {
            out = (out + self.shared_forward(ops, x, moe_index, spans)?)?;
        }
        let routing = LayerRouting {
            layer: 0,
            top_k: k,
            ids,
            probs,
            weights,
        };
        Ok(MoeOutput {
            out,
            routing,
            balance_loss,
        })
    }
}

impl Moe {
    /// Shared experts: one product over all rows when every span uses the same slot (the
    /// usual case), else one per run of consecutive spans sharing a slot.
    fn shared_forward(
        &self,
        ops: &Ops,
        x: &Tensor,
        moe_index: usize,
        spans: &[MapSpan<'_>],
    ) -> Result<Tensor> {
        let runs = self.shared_runs(moe_index, spans)?;
        if let [(mlp, _, _)] = runs[..] {
            return mlp.forward(ops, x);
        }
        let parts = runs
            .into_iter()
            .map(|(mlp, start, rows)| mlp.forward(ops, &x.narrow(0, start, rows)?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }

    /// The runs of consecutive spans that share a shared-expert slot: `(experts, first
    /// row, rows)`, covering all rows in order.
    fn shared_runs(
        &self,
        moe_index: usize,
        spans: &[MapSpan<'_>],
    ) -> Result<Vec<(&Mlp, usize, usize)>> {
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for &(start, len, map) in spans {
            let slot = map.shared_slot(moe_index) as usize;
            match runs.last_mut() {
                Some((s, _, rows)) if *s == slot => *rows += len,
                _ => runs.push((slot, start, len)),
            }
        }
        runs.into_iter()
            .map(|(slot, start, rows)| {
                let mlp = self.shared_slot(slot).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "expert map points at shared slot {slot}, which holds no expert"
                    ))
                })?;
                Ok((mlp, start, rows))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(method: TopkMethod, k: usize, scaling: f32, normalise: bool) -> Router {
        Router {
            n_experts: 4,
            top_k: k,
            scoring: ScoringFunc::Softmax,
            method,
            scaling,
            normalise,
        }
    }

    #[test]
    fn greedy_picks_top_k_sorted_with_scaling() {
        // logits ln([1, 4, 2, 3]) -> probs [0.1, 0.4, 0.2, 0.3]
        let logits: Vec<f32> = [1f32, 4., 2., 3.].iter().map(|v| v.ln()).collect();
        let (ids, probs, w) = router(TopkMethod::Greedy, 2, 2.0, false).route(&logits, None);
        assert_eq!(ids, vec![1, 3]);
        assert!((probs[0] - 0.4).abs() < 1e-6 && (probs[1] - 0.3).abs() < 1e-6);
        assert!((w[0] - 0.8).abs() < 1e-6 && (w[1] - 0.6).abs() < 1e-6);
        let (_, _, w) = router(TopkMethod::Greedy, 2, 1.0, true).route(&logits, None);
        assert!((w[0] - 4. / 7.).abs() < 1e-6 && (w[1] - 3. / 7.).abs() < 1e-6);
    }

    #[test]
    fn balance_loss_matches_a_hand_computed_case() {
        // Sequence A (2 tokens) picks {0,1} and {1,2}: counts [1,2,1,0], f = 4/(2*2)*count
        // = [1,2,1,0]; P = mean probs = [.25,.4,.25,.1]; sum f*P = 1.3.
        // Sequence B (1 token) picks {3,0}: f = 4/(2*1)*[1,0,0,1] = [2,0,0,2]; P = probs;
        // sum f*P = 2*.3 + 2*.5 = 1.6. Loss = alpha * (1.3 + 1.6) / 2.
        let r = router(TopkMethod::Greedy, 2, 1.0, false);
        let probs = [
            [0.4f64, 0.3, 0.2, 0.1],
            [0.1, 0.5, 0.3, 0.1],
            [0.3, 0.1, 0.1, 0.5],
        ];
        let var = candle_core::Var::new(&probs, &Device::Cpu).unwrap();
        let ids = [0u32, 1, 1, 2, 3, 0];
        let loss = r.balance_loss(var.as_tensor(), &ids, &[2, 1], 0.1).unwrap();
        let v = loss.to_scalar::<f64>().unwrap();
        assert!((v - 0.145).abs() < 1e-12, "{v}");
        // d loss / d probs[t, i] = alpha * f_si / (T_s * S).
        let g: Vec<Vec<f64>> = loss
            .backward()
            .unwrap()
            .get(var.as_tensor())
            .unwrap()
            .to_vec2()
            .unwrap();
        let want = [
            [0.1 * 1.0 / 4.0, 0.1 * 2.0 / 4.0, 0.1 * 1.0 / 4.0, 0.0],
            [0.1 * 1.0 / 4.0, 0.1 * 2.0 / 4.0, 0.1 * 1.0 / 4.0, 0.0],
            [0.1 * 2.0 / 2.0, 0.0, 0.0, 0.1 * 2.0 / 2.0],
        ];
        for (gr, wr) in g.iter().zip(want) {
            for (a, b) in gr.iter().zip(wr) {
                assert!((a - b).abs() < 1e-12, "{g:?}");
            }
        }
    }

    #[test]
    fn ties_go_to_lower_id() {
        let (ids, _, _) = router(TopkMethod::Greedy, 2, 1.0, false).route(&[0., 1., 1., 1.], None);
        assert_eq!(ids, vec![1, 2]);
    }

    #[test]
    fn group_limited_keeps_best_groups_only() {
        // Groups {0,1} and {2,3}; group max decides: group 0 has 0.35, group 1 has 0.3.
        // Greedy would pick 0 and 3 (0.35, 0.3); limited to one group it picks 0 and 1.
        let probs = [0.35f32, 0.05, 0.3, 0.3];
        let logits: Vec<f32> = probs.iter().map(|v| v.ln()).collect();
        let m = TopkMethod::GroupLimitedGreedy {
            n_group: 2,
            topk_group: 1,
        };
        let (ids, p, _) = router(m, 2, 1.0, false).route(&logits, None);
        assert_eq!(ids, vec![0, 1]);
        assert!(
            (p[1] - 0.05).abs() < 1e-6,
            "probabilities are not renormalised"
        );
        let (ids, _, _) = router(TopkMethod::Greedy, 2, 1.0, false).route(&logits, None);
        assert_eq!(ids, vec![0, 2]);
    }

    #[test]
    fn noaux_tc_chooses_with_the_bias_and_weighs_without_it() {
        // Sigmoid scores s, bias b, 8 experts in 4 groups of 2, keep 2 groups, top 2.
        let s = [0.9f32, 0.1, 0.5, 0.45, 0.6, 0.55, 0.2, 0.3];
        let logits: Vec<f32> = s.iter().map(|p| (p / (1.0 - p)).ln()).collect();
        let bias = [0f32, 0., 0., 0., 0., 0., 0.5, 0.5];
        let r = Router {
            n_experts: 8,
            top_k: 2,
            scoring: ScoringFunc::Sigmoid,
            method: TopkMethod::NoauxTc {
                n_group: 4,
                topk_group: 2,
            },
            scaling: 2.5,
            normalise: true,
        };
        // Biased group scores (sum of the two best): 1.0, 0.95, 1.15, 1.5 -> keep groups
        // 3 and 2; the best biased experts there: 7 (0.8) and 6 (0.7). A max-based group
        // rule would keep group 0 (0.9) instead.
        let (ids, probs, w) = r.route(&logits, Some(&bias));
        assert_eq!(ids, vec![7, 6], "sorted by unbiased weight");
        // Gate probabilities: shares of the token's total score, 3.6.
        assert!((probs[0] - 0.3 / 3.6).abs() < 1e-6 && (probs[1] - 0.2 / 3.6).abs() < 1e-6);
        assert!((w[0] - 2.5 * 0.6).abs() < 1e-5 && (w[1] - 2.5 * 0.4).abs() < 1e-5);
        // Without the bias: groups 0 (1.0) and 2 (1.15); experts 0 and 4.
        let (ids, _, _) = r.route(&logits, None);
        assert_eq!(ids, vec![0, 4]);
    }

    #[test]
    fn differentiable_weights_match_the_host_router() {
        let logits = Tensor::new(
            &[[0.3f32, -1.2, 2.0, 0.7, -0.1, 1.1, 0.0, -0.4]],
            &Device::Cpu,
        )
        .unwrap();
        let host: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
        for (scoring, normalise, scaling) in [
            (ScoringFunc::Sigmoid, true, 2.5),
            (ScoringFunc::Softmax, true, 1.0),
            (ScoringFunc::Softmax, false, 16.0),
        ] {
            let r = Router {
                n_experts: 8,
                top_k: 3,
                scoring,
                method: TopkMethod::Greedy,
                scaling,
                normalise,
            };
            let (ids, _, want) = r.route(&host, None);
            let ops = Ops {
                differentiable: true,
            };
            let (w, _) = r.weights_tensor(&ops, &logits, &ids).unwrap();
            let got: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-6, "{scoring:?}: {got:?} vs {want:?}");
            }
        }
    }
}
