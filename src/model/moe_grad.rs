//! The routed experts of a MoE layer when gradients are needed (training).
//!
//! Frozen experts (plain tensors) all run inside one autograd node whose backward computes,
//! group by group, the gradients of its inputs (the routed token rows and their routing
//! weights) and nothing for the weights. Trainable experts (candle `Var`s) run as ordinary
//! differentiable ops on their own rows. Composing the frozen experts from per-expert
//! `narrow`s instead would make every expert's backward materialise a zero-padded gradient
//! the size of all routed rows: quadratic in the number of experts.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Storage, Tensor, D};

use super::cpu_kernels::product;
use super::moe::Mlp;
use super::ops::{swiglu, Ops};

/// One expert's share of the routed pairs: `rows` consecutive pairs from `start` of the
/// slot-sorted pair order.
pub struct Group<'a> {
    pub start: usize,
    pub rows: usize,
    pub mlp: &'a Mlp,
}

fn is_trainable(m: &Mlp) -> bool {
    m.gate_up.track_op() || m.down.track_op()
}

/// `out[t] = sum over t's pairs p of w[p] * expert_p(x[t])`, differentiable in `x`, `w`
/// and any trainable expert. `pair_token[i]` is the token of sorted pair `i`, `pair_w`
/// (`[pairs]`) the routing weight of each sorted pair.
pub fn routed_experts(
    ops: &Ops,
    x: &Tensor,
    pair_token: &[u32],
    pair_w: &Tensor,
    groups: &[Group<'_>],
) -> Result<Tensor> {
    let (n, hidden) = x.dims2()?;
    let dev = x.device();

    // Frozen experts: one node over all their pairs, from `x` to their summed output.
    let frozen: Vec<&Group<'_>> = groups.iter().filter(|g| !is_trainable(g.mlp)).collect();
    let mut out = if frozen.is_empty() {
        Tensor::zeros((n, hidden), x.dtype(), dev)?
    } else {
        let mut pairs = Vec::new();
        let mut layout = Vec::with_capacity(frozen.len());
        for g in &frozen {
            layout.push((pairs.len(), g.rows, g.mlp.clone()));
            pairs.extend(g.start as u32..(g.start + g.rows) as u32);
        }
        let tokens: Vec<u32> = pairs.iter().map(|&p| pair_token[p as usize]).collect();
        let token_idx = Tensor::from_vec(tokens, pairs.len(), dev)?;
        let w = pair_w.index_select(&Tensor::from_vec(pairs, token_idx.dim(0)?, dev)?, 0)?;
        frozen_experts(x, &w, token_idx, layout)?
    };

    // Trainable experts: ordinary ops on their own rows.
    for g in groups.iter().filter(|g| is_trainable(g.mlp)) {
        let pairs: Vec<u32> = (g.start as u32..(g.start + g.rows) as u32).collect();
        let tokens: Vec<u32> = pairs.iter().map(|&p| pair_token[p as usize]).collect();
        let token_idx = Tensor::from_vec(tokens, g.rows, dev)?;
        let w = pair_w
            .index_select(&Tensor::from_vec(pairs, g.rows, dev)?, 0)?
            .unsqueeze(1)?;
        let y = g.mlp.forward(ops, &x.index_select(&token_idx, 0)?)?;
        out = out.index_add(&token_idx, &y.broadcast_mul(&w)?, 0)?;
    }
    Ok(out)
}

/// Runs frozen experts on the rows `tokens` of `x` (grouped per expert as `layout` says:
/// `(first pair, pairs, expert)`), scales each pair by `w` (`[pairs]`) and sums the pairs
/// into their tokens' rows: `[n, hidden]`.
fn frozen_experts(
    x: &Tensor,
    w: &Tensor,
    tokens: Tensor,
    layout: Vec<(usize, usize, Mlp)>,
) -> Result<Tensor> {
    let xs = x.detach().index_select(&tokens, 0)?;
    let mut pre = Vec::with_capacity(layout.len());
    let mut outs = Vec::with_capacity(layout.len());
    for (start, rows, mlp) in &layout {
        let h = weight_product(&xs.narrow(0, *start, *rows)?, &mlp.gate_up.t()?)?;
        outs.push(weight_product(&swiglu(&h)?, &mlp.down.t()?)?);
        pre.push(h);
    }
    drop(xs);
    let expert_out = Tensor::cat(&outs, 0)?;
    drop(outs);
    let y = expert_out.broadcast_mul(&w.detach().unsqueeze(1)?)?;
    let sum = x.detach().zeros_like()?.index_add(&tokens, &y, 0)?;
    let op = FrozenExperts {
        layout,
        tokens,
        gate_up_pre: Tensor::cat(&pre, 0)?,
        expert_out,
        sum,
    };
    x.apply_op2(w, op)
}

/// `a @ w` for a frozen expert matrix `w`, widened first when it is kept narrower than
/// the compute dtype (a bf16 base under f32 training).
fn weight_product(a: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.dtype() == a.dtype() {
        product(a, w)
    } else {
        product(a, &w.to_dtype(a.dtype())?)
    }
}

/// Autograd node of [`frozen_experts`]: its value is the sum computed outside the graph;
/// it keeps only what its backward needs - the pre-activations and the unweighted expert
/// outputs - and none of the per-pair copies of `x` or of the weighted outputs.
struct FrozenExperts {
    layout: Vec<(usize, usize, Mlp)>,
    /// `[pairs]`: the token (row of `x`) of each pair.
    tokens: Tensor,
    /// `[pairs, 2 * inter]`: gate and up projections before the activation.
    gate_up_pre: Tensor,
    /// `[pairs, hidden]`: expert outputs before the routing weight.
    expert_out: Tensor,
    /// `[n, hidden]`: the node's value.
    sum: Tensor,
}

impl CustomOp2 for FrozenExperts {
    fn name(&self) -> &'static str {
        "frozen-experts"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        x_layout: &Layout,
        _w: &CpuStorage,
        _w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if x_layout.shape() != self.sum.shape() {
            candle_core::bail!("frozen-experts: input {:?}", x_layout.shape());
        }
        let (storage, layout) = self.sum.storage_and_layout();
        let Storage::Cpu(s) = &*storage else {
            candle_core::bail!("frozen-experts runs on the CPU");
        };
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("frozen-experts expects a fresh contiguous sum");
        }
        Ok((s.clone(), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _x: &candle_core::CudaStorage,
        x_layout: &Layout,
        _w: &candle_core::CudaStorage,
        _w_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        if x_layout.shape() != self.sum.shape() {
            candle_core::bail!("frozen-experts: input {:?}", x_layout.shape());
        }
        let (storage, layout) = self.sum.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            candle_core::bail!("frozen-experts: the sum is not on the GPU");
        };
        Ok((s.try_clone(layout)?, layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Each pair's output gradient is its token's.
        let grad = grad.index_select(&self.tokens, 0)?;
        // d/dw: each row's output gradient dotted with the expert's unweighted output.
        let grad_w = (&grad * &self.expert_out)?.sum(D::Minus1)?;
        let gh = grad.broadcast_mul(&w.unsqueeze(1)?)?;
        let mut grad_xs = Vec::with_capacity(self.layout.len());
        for (start, rows, mlp) in &self.layout {
            let inter = mlp.inter();
            let g_act = weight_product(&gh.narrow(0, *start, *rows)?, &mlp.down)?;
            let h = self.gate_up_pre.narrow(0, *start, *rows)?;
            let gate = h.narrow(1, 0, inter)?;
            let up = h.narrow(1, inter, inter)?;
            let sig = candle_nn::ops::sigmoid(&gate)?;
            let silu = (&gate * &sig)?;
            // silu'(g) = sig(g) (1 + g (1 - sig(g)))
            let dsilu = (&sig * ((&gate * sig.affine(-1.0, 1.0)?)? + 1.0)?)?;
            let g_gate = ((&g_act * &up)? * dsilu)?;
            let g_up = (&g_act * silu)?;
            grad_xs.push(weight_product(
                &Tensor::cat(&[g_gate, g_up], 1)?,
                &mlp.gate_up,
            )?);
        }
        let grad_xs = Tensor::cat(&grad_xs, 0)?;
        let grad_x = x
            .detach()
            .zeros_like()?
            .index_add(&self.tokens, &grad_xs, 0)?;
        Ok((Some(grad_x), Some(grad_w)))
    }
}
