//! The output head and cross-entropy as one autograd node: from the final hidden rows
//! `h [rows, hidden]` and the head `w [vocab, hidden]` to each row's negative
//! log-likelihood of its target. The logits are made a chunk of rows at a time and thrown
//! away; the backward makes them again. Separate `h @ w^T`, `log_softmax` and `gather`
//! nodes would keep the full `[rows, vocab]` logits and as many intermediates alive until
//! the backward pass, which for a 32k vocabulary is the largest part of a training step's
//! activation memory; here the largest live buffer is one chunk of logits.

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Rows whose logits exist at once: `CHUNK_ROWS x vocab` values (32 MB at 32k vocab, f32).
const CHUNK_ROWS: usize = 256;

/// `-log softmax(h[i] @ w^T)[targets[i]]` for every row `i` of `h`.
pub fn head_nll(h: &Tensor, w: &Tensor, targets: Vec<u32>) -> Result<Tensor> {
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
    let w = w.contiguous()?;
    h.contiguous()?.apply_op2(
        &w,
        HeadNll {
            w: w.detach(),
            targets,
        },
    )
}

struct HeadNll {
    /// The head as a tensor, for the chunk products (the op's second argument arrives as
    /// raw storage).
    w: Tensor,
    targets: Vec<u32>,
}

impl HeadNll {
    /// Logits of rows `start..start + len` of `h` (contiguous `[rows, hidden]`).
    fn chunk_logits(&self, h: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        h.narrow(0, start, len)?.matmul(&self.w.t()?)
    }

    fn forward<T: WithDType>(&self, h: Tensor) -> Result<Vec<T>> {
        let (rows, vocab) = (h.dim(0)?, self.w.dim(0)?);
        let mut out = Vec::with_capacity(rows);
        for start in (0..rows).step_by(CHUNK_ROWS) {
            let len = CHUNK_ROWS.min(rows - start);
            let logits = self.chunk_logits(&h, start, len)?;
            let targets = &self.targets[start..start + len];
            with_slice(&logits, |x: &[T]| {
                out.par_extend(
                    x.par_chunks(vocab)
                        .zip(targets.par_iter())
                        .map(|(row, &t)| T::from_f64(row_lse(row) - row[t as usize].to_f64())),
                )
            })?;
        }
        Ok(out)
    }

    /// Gradients for `h` and, when `want_w`, for the head, given each row's incoming
    /// gradient `g`: per chunk, `d = (softmax - onehot) * g`, then `d @ w` and `d^T @ h`.
    fn backward<T: WithDType>(
        &self,
        h: &Tensor,
        g: &[f64],
        want_w: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (rows, vocab) = (h.dim(0)?, self.w.dim(0)?);
        let mut grad_h = Vec::new();
        let mut grad_w: Option<Tensor> = None;
        for start in (0..rows).step_by(CHUNK_ROWS) {
            let len = CHUNK_ROWS.min(rows - start);
            let logits = self.chunk_logits(h, start, len)?;
            let targets = &self.targets[start..start + len];
            let g = &g[start..start + len];
            let d = with_slice(&logits, |x: &[T]| {
                let mut d = vec![T::zero(); x.len()];
                d.par_chunks_mut(vocab)
                    .zip(x.par_chunks(vocab))
                    .zip(targets.par_iter().zip(g.par_iter()))
                    .for_each(|((d, row), (&t, &g))| {
                        let lse = row_lse(row);
                        for (d, &v) in d.iter_mut().zip(row) {
                            *d = T::from_f64((v.to_f64() - lse).exp() * g);
                        }
                        d[t as usize] = T::from_f64(d[t as usize].to_f64() - g);
                    });
                d
            })?;
            let d = Tensor::from_vec(d, (len, vocab), &Device::Cpu)?;
            grad_h.push(d.matmul(&self.w)?);
            if want_w {
                let part = d.t()?.matmul(&h.narrow(0, start, len)?)?;
                grad_w = Some(match grad_w {
                    Some(acc) => (acc + part)?,
                    None => part,
                });
            }
        }
        Ok((Tensor::cat(&grad_h, 0)?, grad_w))
    }
}

/// `log sum exp` of one row, accumulated in f64.
fn row_lse<T: WithDType>(row: &[T]) -> f64 {
    let max = row
        .iter()
        .map(|v| v.to_f64())
        .fold(f64::NEG_INFINITY, f64::max);
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
        let out = match h {
            CpuStorage::F32(v) => {
                let h = Tensor::from_slice(&v[start..end], (rows, hidden), &Device::Cpu)?;
                CpuStorage::F32(self.forward(h)?)
            }
            CpuStorage::F64(v) => {
                let h = Tensor::from_slice(&v[start..end], (rows, hidden), &Device::Cpu)?;
                CpuStorage::F64(self.forward(h)?)
            }
            _ => candle_core::bail!("head-nll takes f32 or f64"),
        };
        Ok((out, Shape::from(rows)))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g: Vec<f64> = grad.to_dtype(DType::F64)?.to_vec1()?;
        let h = h.detach();
        // A frozen head (ESFT) gets no gradient: nothing would read it.
        let want_w = w.track_op();
        let (gh, gw) = match h.dtype() {
            DType::F32 => self.backward::<f32>(&h, &g, want_w)?,
            DType::F64 => self.backward::<f64>(&h, &g, want_w)?,
            dt => candle_core::bail!("head-nll takes f32 or f64, got {dt:?}"),
        };
        Ok((Some(gh), gw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Var, D};

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The unfused reference: `h @ w^T`, `log_softmax`, `gather`, negate.
    fn reference(h: &Tensor, w: &Tensor, targets: &[u32]) -> Tensor {
        let idx = Tensor::from_vec(targets.to_vec(), (targets.len(), 1), &Device::Cpu).unwrap();
        candle_nn::ops::log_softmax(&h.matmul(&w.t().unwrap()).unwrap(), D::Minus1)
            .unwrap()
            .gather(&idx, 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap()
    }

    fn assert_close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < tol, "{x} vs {y}");
        }
    }

    #[test]
    fn matches_the_unfused_head_values_and_gradients_across_chunks() {
        // More rows than a chunk, so the chunk boundaries are exercised.
        let rows = CHUNK_ROWS + 37;
        let dev = Device::Cpu;
        let h = Var::from_tensor(&Tensor::randn(0f64, 1.0, (rows, 6), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f64, 1.0, (11, 6), &dev).unwrap()).unwrap();
        let targets: Vec<u32> = (0..rows as u32).map(|i| (i * 7) % 11).collect();
        let ours = head_nll(h.as_tensor(), w.as_tensor(), targets.clone()).unwrap();
        let theirs = reference(h.as_tensor(), w.as_tensor(), &targets);
        assert_close(&values(&ours), &values(&theirs), 1e-12);
        // Row weights: the gradient of each row scaled by its weight.
        let weights: Vec<f64> = (0..rows).map(|i| (i % 5) as f64 * 0.5).collect();
        let weights = Tensor::from_vec(weights, rows, &dev).unwrap();
        let ga = (ours * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = (theirs * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
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
        let g = head_nll(h.as_tensor(), &w, vec![0, 4, 2])
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&w).is_none());
        assert_eq!(g.get(h.as_tensor()).unwrap().dims(), &[3, 4]);
    }

    #[test]
    fn hand_case_and_bad_input() {
        // Zero rows against any head: uniform logits over 4 classes give ln 4.
        let dev = Device::Cpu;
        let h = Tensor::zeros((1, 3), DType::F32, &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (4, 3), &dev).unwrap();
        let v: Vec<f32> = head_nll(&h, &w, vec![2]).unwrap().to_vec1().unwrap();
        assert!((v[0] - 4f32.ln()).abs() < 1e-6);
        // Row 0 = [1, 0, 0], head = identity-ish: logits [1, 0, 0] -> nll of class 0 is
        // ln(e + 2) - 1.
        let h = Tensor::new(&[[1f64, 0., 0.]], &dev).unwrap();
        let w = Tensor::new(&[[1f64, 0., 0.], [0., 1., 0.], [0., 0., 1.]], &dev).unwrap();
        let v: Vec<f64> = head_nll(&h, &w, vec![0]).unwrap().to_vec1().unwrap();
        assert!((v[0] - ((1f64.exp() + 2.0).ln() - 1.0)).abs() < 1e-12);
        assert!(head_nll(&h, &w, vec![3]).is_err());
        assert!(head_nll(&h, &w, vec![0, 1]).is_err());
        let w_bad = Tensor::zeros((3, 2), DType::F64, &dev).unwrap();
        assert!(head_nll(&h, &w_bad, vec![0]).is_err());
    }
}
