//! Numeric building blocks with two implementations each: the fused candle kernels used for
//! inference, and compositions of basic ops that autograd differentiates (the fused ones
//! silently produce no gradient). [`Ops::differentiable`] picks one for the whole model, so
//! the trainer and the server run the same model code.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor, D,
};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ops {
    pub differentiable: bool,
}

impl Ops {
    /// `x [m, k] @ w[n, k]^T`: the CPU kernel where it is the faster product (every size
    /// with AVX-512, decode-sized inputs without) or the only one (a bf16 or f16 `w` under
    /// f32 compute), candle's matmul otherwise (and always when gradients are needed).
    pub fn linear(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        if !self.differentiable && super::cpu_kernels::takes_linear(x, w, x.dim(0)?) {
            super::cpu_kernels::linear(x, w)
        } else {
            self.matmul_weight(x, &w.t()?)
        }
    }

    /// `x @ w` where `w` is a weight (any batch dims). When training on the CPU it is one
    /// autograd node whose forward and backward products run in the CPU kernels; a frozen
    /// `w` gets a gradient path to `x` only (candle's own matmul backward would also
    /// compute, and allocate, a gradient for the frozen weight: a third of the backward
    /// work and a full copy of the model in gradient memory).
    pub fn matmul_weight(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        if w.dtype() != x.dtype() && (self.differentiable || !x.device().is_cpu()) {
            // A matrix kept narrower than the compute dtype (a frozen bf16 base under f32
            // training, or any product off the CPU, whose kernels take equal dtypes only):
            // widened for this product, so the result is what the CPU's inference kernels
            // give, which widen each value as they read it.
            return self.matmul_weight(x, &w.to_dtype(x.dtype())?);
        }
        if self.differentiable && x.device().is_cpu() {
            if w.track_op() {
                return x.apply_op2(w, WeightProduct);
            }
            if x.track_op() {
                return x.apply_op1(FrozenRhs { w: w.clone() });
            }
            return super::cpu_kernels::product(x, w);
        }
        x.matmul(w)
    }

    /// `w * x / sqrt(mean(x^2) + eps)` over the last dimension.
    pub fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        if self.differentiable {
            candle_nn::ops::rms_norm_slow(x, w, eps as f32)
        } else {
            candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)
        }
    }

    pub fn softmax_last_dim(&self, x: &Tensor) -> Result<Tensor> {
        if self.differentiable {
            candle_nn::ops::softmax(x, D::Minus1)
        } else {
            candle_nn::ops::softmax_last_dim(x)
        }
    }

    /// Rotates adjacent pairs `(x[2i], x[2i+1])` of the last dimension by the angles whose
    /// (pre-scaled) cosines and sines are given. `x`: `[n, h, d]` with one position per row
    /// `n`; `cos`, `sin`: `[n, d/2]`.
    pub fn rope_interleaved(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (n, h, d) = x.dims3()?;
        if self.differentiable {
            let pairs = x.reshape((n, h, d / 2, 2))?;
            let x0 = pairs.narrow(3, 0, 1)?;
            let x1 = pairs.narrow(3, 1, 1)?;
            let c = cos.reshape((n, 1, d / 2, 1))?;
            let s = sin.reshape((n, 1, d / 2, 1))?;
            let r0 = (x0.broadcast_mul(&c)? - x1.broadcast_mul(&s)?)?;
            let r1 = (x0.broadcast_mul(&s)? + x1.broadcast_mul(&c)?)?;
            Tensor::cat(&[r0, r1], 3)?.reshape((n, h, d))
        } else {
            // candle's kernel takes [b, h, t, d] with per-batch tables [b, t, d/2]: one token
            // per batch row lets every token carry its own position.
            let x4 = x.contiguous()?.reshape((n, h, 1, d))?;
            let c = cos.reshape((n, 1, d / 2))?;
            let s = sin.reshape((n, 1, d / 2))?;
            candle_nn::rotary_emb::rope_i(&x4, &c, &s)?.reshape((n, h, d))
        }
    }

    /// Rotates dimension `i` of the last dimension with dimension `i + d/2` (`rotate_half`)
    /// by the angles whose cosines and sines are given. Shapes as for
    /// [`Ops::rope_interleaved`].
    pub fn rope_half_split(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (n, h, d) = x.dims3()?;
        if self.differentiable {
            let x0 = x.narrow(2, 0, d / 2)?;
            let x1 = x.narrow(2, d / 2, d / 2)?;
            let c = cos.reshape((n, 1, d / 2))?;
            let s = sin.reshape((n, 1, d / 2))?;
            let r0 = (x0.broadcast_mul(&c)? - x1.broadcast_mul(&s)?)?;
            let r1 = (x1.broadcast_mul(&c)? + x0.broadcast_mul(&s)?)?;
            Tensor::cat(&[r0, r1], 2)
        } else {
            let x4 = x.contiguous()?.reshape((n, h, 1, d))?;
            let c = cos.reshape((n, 1, d / 2))?;
            let s = sin.reshape((n, 1, d / 2))?;
            candle_nn::rotary_emb::rope(&x4, &c, &s)?.reshape((n, h, d))
        }
    }
}

/// Autograd node for `x @ w` with a frozen `w`: the forward is the product itself (one
/// output buffer, nothing else kept), the backward sends `grad @ w^T` to `x` and nothing to
/// `w`.
struct FrozenRhs {
    w: Tensor,
}

impl CustomOp1 for FrozenRhs {
    fn name(&self) -> &'static str {
        "frozen-rhs-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (w, w_layout) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*w else {
            candle_core::bail!("frozen-rhs-matmul: the weight is not on the CPU");
        };
        cpu_product(x, x_layout, w, w_layout)
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(super::cpu_kernels::product(grad, &self.w.t()?)?))
    }
}

/// Autograd node for `x @ w` with a trainable `w`: products in the CPU kernels, gradients
/// `grad @ w^T` for `x` (when something below trains) and `x^T @ grad` for `w`.
struct WeightProduct;

impl CustomOp2 for WeightProduct {
    fn name(&self) -> &'static str {
        "weight-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_product(x, x_layout, w, w_layout)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        use super::cpu_kernels::product;
        let r = x.rank();
        let grad_x = match x.track_op() {
            true => Some(product(grad, &w.t()?)?),
            false => None,
        };
        let x_t = x.transpose(r - 2, r - 1)?.contiguous()?;
        Ok((grad_x, Some(product(&x_t, grad)?)))
    }
}

/// `x @ w` on CPU storage: the tiled kernels where the layouts and the CPU allow, candle's
/// matmul otherwise.
fn cpu_product(
    x: &CpuStorage,
    x_layout: &Layout,
    w: &CpuStorage,
    w_layout: &Layout,
) -> Result<(CpuStorage, Shape)> {
    use super::cpu_kernels::{matmul_storage, product_dims, tiled};
    if tiled() {
        if let Some(out) = matmul_storage(x, x_layout, w, w_layout)? {
            return Ok(out);
        }
    }
    let ((batch, m, k, n), shape) = product_dims(x_layout.dims(), w_layout.dims())?;
    Ok((x.matmul(w, (batch, m, n, k), x_layout, w_layout)?, shape))
}

/// `silu(gate) * up` where `gate_up` holds both halves side by side: `[n, 2i]` -> `[n, i]`.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    let i = gate_up.dim(D::Minus1)? / 2;
    let gate = gate_up.narrow(D::Minus1, 0, i)?;
    let up = gate_up.narrow(D::Minus1, i, i)?;
    candle_nn::ops::silu(&gate)? * up
}

/// A tensor from host `f32`s in the dtype and device of `like`.
pub fn tensor_like(values: Vec<f32>, shape: &[usize], like: &Tensor) -> Result<Tensor> {
    let t = Tensor::from_vec(values, shape, like.device())?;
    if like.dtype() == DType::F32 {
        Ok(t)
    } else {
        t.to_dtype(like.dtype())
    }
}

/// Additive mask `[len, 1, past + len]`: query `i` (position `past + i`) sees keys `<= past + i`.
pub fn causal_mask(len: usize, past: usize, like: &Tensor) -> Result<Tensor> {
    let total = past + len;
    let mut m = vec![0f32; len * total];
    for i in 0..len {
        for v in &mut m[i * total + past + i + 1..(i + 1) * total] {
            *v = f32::NEG_INFINITY;
        }
    }
    tensor_like(m, &[len, 1, total], like)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= tol, "max abs diff {d}");
    }

    #[test]
    fn rope_paths_agree_with_hand_rotation() {
        let dev = Device::Cpu;
        // One token, one head, d = 4: pairs (1,2) and (3,4) rotated by 90 and 180 degrees.
        let x = Tensor::new(&[[[1f32, 2., 3., 4.]]], &dev).unwrap();
        let cos = Tensor::new(&[[0f32, -1.]], &dev).unwrap();
        let sin = Tensor::new(&[[1f32, 0.]], &dev).unwrap();
        let want = Tensor::new(&[[[-2f32, 1., -3., -4.]]], &dev).unwrap();
        for differentiable in [false, true] {
            let got = Ops { differentiable }
                .rope_interleaved(&x, &cos, &sin)
                .unwrap();
            close(&got, &want, 1e-6);
        }
        // Random sizes: both paths equal.
        let x = Tensor::randn(0f32, 1., (5, 3, 8), &dev).unwrap();
        let cos = Tensor::randn(0f32, 1., (5, 4), &dev).unwrap();
        let sin = Tensor::randn(0f32, 1., (5, 4), &dev).unwrap();
        let a = Ops {
            differentiable: false,
        }
        .rope_interleaved(&x, &cos, &sin)
        .unwrap();
        let b = Ops {
            differentiable: true,
        }
        .rope_interleaved(&x, &cos, &sin)
        .unwrap();
        close(&a, &b, 1e-6);
    }

    #[test]
    fn half_split_rope_paths_agree_with_hand_rotation() {
        let dev = Device::Cpu;
        // d = 4: pairs (x0, x2) and (x1, x3), rotated by 90 and 180 degrees.
        let x = Tensor::new(&[[[1f32, 2., 3., 4.]]], &dev).unwrap();
        let cos = Tensor::new(&[[0f32, -1.]], &dev).unwrap();
        let sin = Tensor::new(&[[1f32, 0.]], &dev).unwrap();
        let want = Tensor::new(&[[[-3f32, -2., 1., -4.]]], &dev).unwrap();
        for differentiable in [false, true] {
            let got = Ops { differentiable }
                .rope_half_split(&x, &cos, &sin)
                .unwrap();
            close(&got, &want, 1e-6);
        }
        let x = Tensor::randn(0f32, 1., (5, 3, 8), &dev).unwrap();
        let cos = Tensor::randn(0f32, 1., (5, 4), &dev).unwrap();
        let sin = Tensor::randn(0f32, 1., (5, 4), &dev).unwrap();
        let [a, b] = [false, true].map(|differentiable| {
            Ops { differentiable }
                .rope_half_split(&x, &cos, &sin)
                .unwrap()
        });
        close(&a, &b, 1e-6);
    }

    #[test]
    fn norm_and_softmax_paths_agree() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (4, 16), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., 16, &dev).unwrap();
        let fast = Ops {
            differentiable: false,
        };
        let slow = Ops {
            differentiable: true,
        };
        close(
            &fast.rms_norm(&x, &w, 1e-6).unwrap(),
            &slow.rms_norm(&x, &w, 1e-6).unwrap(),
            1e-5,
        );
        close(
            &fast.softmax_last_dim(&x).unwrap(),
            &slow.softmax_last_dim(&x).unwrap(),
            1e-6,
        );
        // Hand case: rms of [3, 4] is sqrt(12.5).
        let x = Tensor::new(&[[3f32, 4.]], &dev).unwrap();
        let w = Tensor::new(&[1f32, 2.], &dev).unwrap();
        let r = 12.5f32.sqrt();
        let want = Tensor::new(&[[3. / r, 8. / r]], &dev).unwrap();
        close(&fast.rms_norm(&x, &w, 0.).unwrap(), &want, 1e-6);
    }

    #[test]
    fn weight_products_give_candle_values_and_gradients() {
        use candle_core::Var;
        let dev = Device::Cpu;
        let ops = Ops {
            differentiable: true,
        };
        // Batched and plain shapes; weights stored as given and as transposed views.
        for (xs, ws, transposed) in [
            (vec![37usize, 48], vec![48usize, 70], false),
            (vec![37, 48], vec![70, 48], true),
            (vec![3, 20, 16], vec![3, 16, 24], false),
        ] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1., xs.as_slice(), &dev).unwrap()).unwrap();
            let stored = Tensor::randn(0f32, 1., ws.as_slice(), &dev).unwrap();
            let r = ws.len();
            let view = |t: &Tensor| {
                if transposed {
                    t.transpose(r - 2, r - 1).unwrap()
                } else {
                    t.clone()
                }
            };
            for trainable in [false, true] {
                let w = Var::from_tensor(&stored).unwrap();
                let wt = if trainable {
                    view(w.as_tensor())
                } else {
                    view(&stored)
                };
                let got = ops.matmul_weight(x.as_tensor(), &wt).unwrap();
                let want = x.as_tensor().matmul(&wt).unwrap();
                close(&got, &want, 1e-4);
                // A loss that weights every output differently.
                let mix = Tensor::randn(0f32, 1., got.shape(), &dev).unwrap();
                let g_got = (&got * &mix)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let g_want = (&want * &mix)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                close(g_got.get(&x).unwrap(), g_want.get(&x).unwrap(), 1e-4);
                if trainable {
                    close(g_got.get(&w).unwrap(), g_want.get(&w).unwrap(), 1e-4);
                } else {
                    assert!(g_got.get(&w).is_none());
                }
            }
        }
    }

    #[test]
    fn swiglu_hand_case() {
        let dev = Device::Cpu;
        let gu = Tensor::new(&[[0f32, 1., 2., 3.]], &dev).unwrap();
        let silu = |v: f32| v / (1. + (-v).exp());
        let want = Tensor::new(&[[silu(0.) * 2., silu(1.) * 3.]], &dev).unwrap();
        close(&swiglu(&gu).unwrap(), &want, 1e-6);
    }
}
