//! The attention core of one sequence when gradients are needed (training): scores,
//! causal mask, softmax and the weighted sum of values as one autograd node.
//!
//! Composed from candle ops, the core keeps the scores, the scaled and the masked scores
//! and the softmax's own intermediates - several `[len * heads, total]` buffers per
//! sequence and layer - alive until the backward pass, which for 256-token sequences is
//! most of a training step's attention memory. This node keeps only its inputs and its
//! output; its backward makes the probabilities again (one score product) and derives the
//! gradients of the queries and of the latent keys/values from them, as memory-efficient
//! attention does.

use candle_core::{CpuStorage, CustomOp2, Device, Layout, Result, Shape, Storage, Tensor};

/// `softmax(q kv^T * scale + causal mask) @ kv[:, ..v_dim]` for the rows of one sequence.
///
/// `q`: `[len * heads, d]`, row `i * heads + h` the query of head `h` at new position `i`
/// (absolute position `past + i`); `kv`: `[past + len, d]`, the latent keys, whose first
/// `v_dim` columns are also the values. Returns `[len * heads, v_dim]`.
pub fn latent_attention(
    q: &Tensor,
    kv: &Tensor,
    v_dim: usize,
    heads: usize,
    past: usize,
    scale: f64,
) -> Result<Tensor> {
    let (rows, d) = q.dims2()?;
    let (total, kv_d) = kv.dims2()?;
    if kv_d != d || v_dim > d || heads == 0 || rows % heads != 0 || past + rows / heads != total {
        candle_core::bail!(
            "latent attention: queries {:?} ({heads} heads, {past} past) against keys {:?}, \
             {v_dim} value columns",
            q.dims(),
            kv.dims()
        );
    }
    q.contiguous()?.apply_op2(
        &kv.contiguous()?,
        LatentAttention {
            v_dim,
            heads,
            past,
            scale,
        },
    )
}

struct LatentAttention {
    v_dim: usize,
    heads: usize,
    past: usize,
    scale: f64,
}

impl LatentAttention {
    /// The attention probabilities `[rows, total]` (no autograd: the inputs are detached).
    fn probs(&self, q: &Tensor, kv: &Tensor) -> Result<Tensor> {
        let rows = q.dim(0)?;
        let total = kv.dim(0)?;
        let len = rows / self.heads;
        let mut scores = (super::cpu_kernels::product(q, &kv.t()?)? * self.scale)?;
        if len > 1 {
            let mask = super::ops::causal_mask(len, self.past, &scores)?;
            scores = scores
                .reshape((len, self.heads, total))?
                .broadcast_add(&mask)?
                .reshape((rows, total))?;
        }
        candle_nn::ops::softmax_last_dim(&scores)
    }
}

/// A CPU tensor of `shape` holding a contiguous view of `s`.
fn cpu_tensor(s: &CpuStorage, layout: &Layout) -> Result<Tensor> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("latent attention: strided input".into()))?;
    let shape = layout.shape().clone();
    match s {
        CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], shape, &Device::Cpu),
        CpuStorage::F64(v) => Tensor::from_slice(&v[start..end], shape, &Device::Cpu),
        _ => candle_core::bail!("latent attention trains in f32 or f64"),
    }
}

impl CustomOp2 for LatentAttention {
    fn name(&self) -> &'static str {
        "latent-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        kv: &CpuStorage,
        kv_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = cpu_tensor(q, q_layout)?;
        let kv = cpu_tensor(kv, kv_layout)?;
        let out = self.probs(&q, &kv)?.matmul(&kv.narrow(1, 0, self.v_dim)?)?;
        let shape = out.shape().clone();
        let (storage, _) = out.storage_and_layout();
        let Storage::Cpu(s) = &*storage else {
            candle_core::bail!("latent attention: the product left the CPU");
        };
        Ok((s.clone(), shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        kv: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (q, kv, out, grad) = (q.detach(), kv.detach(), out.detach(), grad.detach());
        let (total, d) = kv.dims2()?;
        let p = self.probs(&q, &kv)?;
        // out = P V, P = softmax(S): dP = dO V^T, dS = P * (dP - rowsum(dO * O)).
        let dp = grad.matmul(&kv.narrow(1, 0, self.v_dim)?.t()?)?;
        let row_dot = (&grad * &out)?.sum_keepdim(1)?;
        let ds = (&p * dp.broadcast_sub(&row_dot)?)?;
        let dq = (super::cpu_kernels::product(&ds, &kv)? * self.scale)?;
        let dk = (ds.t()?.matmul(&q)? * self.scale)?;
        let dv = p.t()?.matmul(&grad)?;
        let dv = if self.v_dim < d {
            Tensor::cat(
                &[
                    &dv,
                    &Tensor::zeros((total, d - self.v_dim), dv.dtype(), dv.device())?,
                ],
                1,
            )?
        } else {
            dv
        };
        Ok((Some(dq), Some((dk + dv)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Var, D};

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The composition this node replaces, with candle's differentiable ops.
    fn reference(q: &Tensor, kv: &Tensor, v_dim: usize, heads: usize, past: usize) -> Tensor {
        let (rows, total) = (q.dim(0).unwrap(), kv.dim(0).unwrap());
        let len = rows / heads;
        let mut s = (q.matmul(&kv.t().unwrap()).unwrap() * 0.3).unwrap();
        let mut mask = vec![0f64; len * total];
        for i in 0..len {
            for j in past + i + 1..total {
                mask[i * total + j] = f64::NEG_INFINITY;
            }
        }
        let mask = Tensor::from_vec(mask, (len, 1, total), &Device::Cpu).unwrap();
        s = s
            .reshape((len, heads, total))
            .unwrap()
            .broadcast_add(&mask)
            .unwrap()
            .reshape((rows, total))
            .unwrap();
        candle_nn::ops::softmax(&s, D::Minus1)
            .unwrap()
            .matmul(&kv.narrow(1, 0, v_dim).unwrap())
            .unwrap()
    }

    #[test]
    fn matches_the_composed_core_values_and_gradients() {
        let dev = Device::Cpu;
        // (new tokens, past, heads, d, v_dim): a prefill, a chunk after a cache, a decode
        // step, and values spanning every column.
        for (len, past, heads, d, v_dim) in [
            (5, 0, 3, 7, 4),
            (3, 4, 2, 6, 5),
            (1, 6, 4, 5, 3),
            (4, 0, 1, 3, 3),
        ] {
            let q = Var::from_tensor(&Tensor::randn(0f64, 1.0, (len * heads, d), &dev).unwrap())
                .unwrap();
            let kv = Var::from_tensor(&Tensor::randn(0f64, 1.0, (past + len, d), &dev).unwrap())
                .unwrap();
            let ours =
                latent_attention(q.as_tensor(), kv.as_tensor(), v_dim, heads, past, 0.3).unwrap();
            let theirs = reference(q.as_tensor(), kv.as_tensor(), v_dim, heads, past);
            for (a, b) in values(&ours).iter().zip(values(&theirs)) {
                assert!((a - b).abs() < 1e-12, "{a} vs {b}");
            }
            // A fixed random projection of the output as the loss.
            let r = Tensor::randn(0f64, 1.0, (len * heads, v_dim), &dev).unwrap();
            let ga = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [q.as_tensor(), kv.as_tensor()] {
                let (a, b) = (values(ga.get(v).unwrap()), values(gb.get(v).unwrap()));
                for (a, b) in a.iter().zip(&b) {
                    assert!((a - b).abs() < 1e-10, "{a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn hand_case_and_bad_shapes() {
        // One head, two positions, d = v_dim = 1: position 0 sees only key 0 (output
        // kv[0]); position 1 averages kv[0] and kv[1] with weights softmax(q*k*scale).
        let dev = Device::Cpu;
        let q = Tensor::new(&[[1f64], [2.]], &dev).unwrap();
        let kv = Tensor::new(&[[1f64], [3.]], &dev).unwrap();
        let o = values(&latent_attention(&q, &kv, 1, 1, 0, 0.5).unwrap());
        let (s0, s1): (f64, f64) = (2.0 * 1.0 * 0.5, 2.0 * 3.0 * 0.5);
        let p1 = s1.exp() / (s0.exp() + s1.exp());
        assert!((o[0] - 1.0).abs() < 1e-12);
        assert!((o[1] - ((1.0 - p1) * 1.0 + p1 * 3.0)).abs() < 1e-12);
        // Rows that are not whole positions, keys that do not match past + len.
        assert!(latent_attention(&q, &kv, 1, 3, 0, 0.5).is_err());
        assert!(latent_attention(&q, &kv, 1, 1, 1, 0.5).is_err());
        assert!(latent_attention(&q, &kv, 2, 1, 0, 0.5).is_err());
    }
}
