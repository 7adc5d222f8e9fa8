//! The output head and cross-entropy as one autograd node: from the final hidden rows
//! `h [rows, hidden]` and the head `w [vocab, hidden]` to the summed negative
//! log-likelihood of the rows' targets. The logits are made a chunk of rows at a time and
//! thrown away; since the loss is a sum, its gradients are linear in the one incoming
//! scalar, so the forward computes them for a unit gradient while each chunk's logits
//! exist (`(softmax - onehot) @ w` for the rows, and `(softmax - onehot)^T @ h` for the
//! head when it is trained), and the backward only scales them. Separate `h @ w^T`,
//! `log_softmax` and `gather` nodes would keep the full `[rows, vocab]` logits and as many
//! intermediates alive until the backward pass, the largest part of a training step's
//! activation memory at a 32k vocabulary; here the largest live buffer is one chunk of
//! logits, and no product is computed twice.

use std::sync::Mutex;

use candle_core::{
    CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, WithDType, D,
};
use esft::model::cpu_kernels::product;
use rayon::prelude::*;

/// Rows whose logits exist at once: `CHUNK_ROWS x vocab` values (32 MB at 32k vocab, f32).
const CHUNK_ROWS: usize = 256;

/// `sum_i -log softmax(h[i] @ w^T)[targets[i]]`, a scalar.
pub fn head_nll_sum(h: &Tensor, w: &Tensor, targets: Vec<u32>) -> Result<Tensor> {
    let (rows, hidden) = h.dims2()?;
    let (vocab, w_hidden) = w.dims2()?;
    if w_hidden != hidden {
        candle_core::bail!("head_nll: hidden rows of {hidden} against a head of {w_hidden}");
    }
    if targets.len() != rows {
        candle_core::bail!("{} targets for {rows} rows", targets.len());
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("target {t} is out of range (vocab {vocab})");
    }
    if !matches!(h.dtype(), DType::F32 | DType::F64) || w.dtype() != h.dtype() {
        candle_core::bail!(
            "head_nll takes f32 or f64 (got {:?} rows, {:?} head)",
            h.dtype(),
            w.dtype()
        );
    }
    if !h.device().is_cpu() {
        return head_nll_unfused(h, w, &targets);
    }
    let w = w.contiguous()?;
    h.contiguous()?.apply_op2(
        &w,
        HeadNll {
            // A frozen head (ESFT) gets no gradient: nothing would read it.
            want_w: w.track_op(),
            want_h: h.track_op(),
            w: w.detach(),
            targets,
            unit_grads: Mutex::new(None),
        },
    )
}

/// The same sum as separate autograd nodes (`h @ w^T`, `log_softmax`, `gather`, negate,
/// sum), on any device: the path off the CPU, where the whole `[rows, vocab]` logits live
/// in device memory until the backward pass.
pub fn head_nll_unfused(h: &Tensor, w: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let idx = Tensor::from_vec(targets.to_vec(), (targets.len(), 1), h.device())?;
    candle_nn::ops::log_softmax(&h.matmul(&w.t()?)?, D::Minus1)?
        .gather(&idx, 1)?
        .neg()?
        .sum_all()
}

/// The gradients of the summed loss for an incoming gradient of 1: `[rows, hidden]` for
/// `h` and, when the head trains, `[vocab, hidden]` for it.
type UnitGrads = (Tensor, Option<Tensor>);

struct HeadNll {
    /// The head as a tensor, for the chunk products (the op's second argument arrives as
    /// raw storage).
    w: Tensor,
    want_w: bool,
    /// False when nothing below the head trains (no backward will come for `h`).
    want_h: bool,
    targets: Vec<u32>,
    /// Made by the forward, taken by the backward.
    unit_grads: Mutex<Option<UnitGrads>>,
}

impl HeadNll {
    /// The summed loss, and the unit gradients.
    fn forward<T: WithDType>(&self, h: Tensor) -> Result<(f64, UnitGrads)> {
        let (rows, vocab) = (h.dim(0)?, self.w.dim(0)?);
        let mut loss = 0.0;
        let mut grad_h = Vec::new();
        let mut grad_w: Option<Tensor> = None;
        for start in (0..rows).step_by(CHUNK_ROWS) {
            let len = CHUNK_ROWS.min(rows - start);
            let hc = h.narrow(0, start, len)?;
            let logits = product(&hc, &self.w.t()?)?;
            let targets = &self.targets[start..start + len];
            if !self.want_h && !self.want_w {
                // Evaluation: the loss alone.
                loss += with_slice(&logits, |x: &[T]| {
                    x.par_chunks(vocab)
                        .zip(targets.par_iter())
                        .map(|(row, &t)| row_lse(row) - row[t as usize].to_f64())
                        .sum::<f64>()
                })?;
                continue;
            }
            // Per row: its loss, and `softmax - onehot` beside its logits.
            let (part, d) = with_slice(&logits, |x: &[T]| {
                let mut d = vec![T::zero(); x.len()];
                let part: f64 = d
                    .par_chunks_mut(vocab)
                    .zip(x.par_chunks(vocab))
                    .zip(targets.par_iter())
                    .map(|((d, row), &t)| {
                        // One exponential per logit: exp(v - max) is kept and normalised.
                        let max = row_max(row);
                        let mut sum = 0f64;
                        for (d, &v) in d.iter_mut().zip(row) {
                            let e = (v.to_f64() - max).exp();
                            sum += e;
                            *d = T::from_f64(e);
                        }
                        let inv = 1.0 / sum;
                        for d in d.iter_mut() {
                            *d = T::from_f64(d.to_f64() * inv);
                        }
                        d[t as usize] = T::from_f64(d[t as usize].to_f64() - 1.0);
                        max + sum.ln() - row[t as usize].to_f64()
                    })
                    .sum();
                (part, d)
            })?;
            drop(logits);
            loss += part;
            let d = Tensor::from_vec(d, (len, vocab), &Device::Cpu)?;
            grad_h.push(product(&d, &self.w)?);
            if self.want_w {
                let part = d.t()?.matmul(&hc)?;
                grad_w = Some(match grad_w {
                    Some(acc) => (acc + part)?,
                    None => part,
                });
            }
        }
        let grad_h = if grad_h.is_empty() {
            h.zeros_like()?
        } else {
            Tensor::cat(&grad_h, 0)?
        };
        Ok((loss, (grad_h, grad_w)))
    }
}

/// The largest value of one row.
fn row_max<T: WithDType>(row: &[T]) -> f64 {
    row.iter()
        .map(|v| v.to_f64())
        .fold(f64::NEG_INFINITY, f64::max)
}

/// `log sum exp` of one row, accumulated in f64.
fn row_lse<T: WithDType>(row: &[T]) -> f64 {
    let max = row_max(row);
    let sum: f64 = row.iter().map(|v| (v.to_f64() - max).exp()).sum();
    max + sum.ln()
}

/// Runs `f` on the values of a contiguous CPU tensor.
fn with_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*storage else {
        candle_core::bail!("head_nll runs on the CPU");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("head_nll: a strided chunk".into()))?;
    Ok(f(&s.as_slice::<T>()?[start..end]))
}

impl CustomOp2 for HeadNll {
    fn name(&self) -> &'static str {
        "head-nll"
    }

    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        h_layout: &Layout,
        _w: &CpuStorage,
        _w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (start, end) = h_layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("head-nll needs contiguous rows".into()))?;
        let (rows, hidden) = h_layout.shape().dims2()?;
        let (out, grads) = match h {
            CpuStorage::F32(v) => {
                let h = Tensor::from_slice(&v[start..end], (rows, hidden), &Device::Cpu)?;
                let (loss, grads) = self.forward::<f32>(h)?;
                (CpuStorage::F32(vec![loss as f32]), grads)
            }
            CpuStorage::F64(v) => {
                let h = Tensor::from_slice(&v[start..end], (rows, hidden), &Device::Cpu)?;
                let (loss, grads) = self.forward::<f64>(h)?;
                (CpuStorage::F64(vec![loss]), grads)
            }
            _ => candle_core::bail!("head-nll takes f32 or f64"),
        };
        *self.unit_grads.lock().map_err(|_| poisoned())? = Some(grads);
        Ok((out, Shape::from(())))
    }

    fn bwd(
        &self,
        _h: &Tensor,
        _w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let (gh, gw) = self
            .unit_grads
            .lock()
            .map_err(|_| poisoned())?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("head-nll: backward ran twice".into()))?;
        let gw = match gw {
            Some(gw) => Some((gw * g)?),
            None => None,
        };
        Ok((Some((gh * g)?), gw))
    }
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("head-nll: a panic left its gradients unreadable".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn scalar(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().to_scalar().unwrap()
    }

    fn reference(h: &Tensor, w: &Tensor, targets: &[u32]) -> Tensor {
        head_nll_unfused(h, w, targets).unwrap()
    }

    fn assert_close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < tol, "{x} vs {y}");
        }
    }

    #[test]
    fn matches_the_unfused_head_value_and_gradients_across_chunks() {
        // More rows than a chunk, so the chunk boundaries are exercised.
        let rows = CHUNK_ROWS + 37;
        let dev = Device::Cpu;
        let h = Var::from_tensor(&Tensor::randn(0f64, 1.0, (rows, 6), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f64, 1.0, (11, 6), &dev).unwrap()).unwrap();
        let targets: Vec<u32> = (0..rows as u32).map(|i| (i * 7) % 11).collect();
        let ours = head_nll_sum(h.as_tensor(), w.as_tensor(), targets.clone()).unwrap();
        let theirs = reference(h.as_tensor(), w.as_tensor(), &targets);
        assert!((scalar(&ours) - scalar(&theirs)).abs() < 1e-9);
        // Nothing to differentiate (evaluation): the same value, without the gradients.
        let eval = head_nll_sum(
            &h.as_tensor().detach(),
            &w.as_tensor().detach(),
            targets.clone(),
        );
        assert!((scalar(&eval.unwrap()) - scalar(&theirs)).abs() < 1e-9);
        // A scaled loss (as the trainer's mean over tokens is) scales every gradient.
        let ga = (ours * 0.37).unwrap().backward().unwrap();
        let gb = (theirs * 0.37).unwrap().backward().unwrap();
        for v in [h.as_tensor(), w.as_tensor()] {
            assert_close(
                &values(ga.get(v).unwrap()),
                &values(gb.get(v).unwrap()),
                1e-10,
            );
        }
    }

    #[test]
    fn a_frozen_head_gets_no_gradient() {
        let dev = Device::Cpu;
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap();
        let g = head_nll_sum(h.as_tensor(), &w, vec![0, 4, 2])
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&w).is_none());
        assert_eq!(g.get(h.as_tensor()).unwrap().dims(), &[3, 4]);
    }

    #[test]
    fn hand_case_and_bad_input() {
        // Zero rows against any head: uniform logits over 4 classes give ln 4 per row.
        let dev = Device::Cpu;
        let h = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (4, 3), &dev).unwrap();
        let v = scalar(&head_nll_sum(&h, &w, vec![2, 0]).unwrap());
        assert!((v - 2.0 * 4f64.ln()).abs() < 1e-6);
        // Row [1, 0, 0] against the identity head: logits [1, 0, 0], the nll of class 0 is
        // ln(e + 2) - 1; its gradient for the row is softmax - onehot = [p0 - 1, p1, p1].
        let h = Var::from_tensor(&Tensor::new(&[[1f64, 0., 0.]], &dev).unwrap()).unwrap();
        let w = Tensor::new(&[[1f64, 0., 0.], [0., 1., 0.], [0., 0., 1.]], &dev).unwrap();
        let loss = head_nll_sum(h.as_tensor(), &w, vec![0]).unwrap();
        let e = 1f64.exp();
        assert!((scalar(&loss) - ((e + 2.0).ln() - 1.0)).abs() < 1e-12);
        let g = values(loss.backward().unwrap().get(h.as_tensor()).unwrap());
        assert_close(
            &g,
            &[e / (e + 2.0) - 1.0, 1.0 / (e + 2.0), 1.0 / (e + 2.0)],
            1e-12,
        );
        assert!(head_nll_sum(h.as_tensor(), &w, vec![3]).is_err());
        assert!(head_nll_sum(h.as_tensor(), &w, vec![0, 1]).is_err());
        let w_bad = Tensor::zeros((3, 2), DType::F64, &dev).unwrap();
        assert!(head_nll_sum(h.as_tensor(), &w_bad, vec![0]).is_err());
    }
}
