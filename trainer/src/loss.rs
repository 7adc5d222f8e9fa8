//! Cross-entropy as one autograd node: the per-row negative log-likelihood of each row's
//! target, computed straight from the logits. candle's `log_softmax` + `gather` keeps four
//! `[rows, vocab]` intermediates alive until the backward pass, which for a 32k vocabulary
//! is most of a training step's activation memory; this node keeps none and its backward
//! writes `softmax - onehot` in one pass.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct TargetNll {
    targets: Vec<u32>,
}

/// `-log softmax(logits[i])[targets[i]]` for every row `i` of `[rows, vocab]` logits.
pub fn target_nll(logits: &Tensor, targets: Vec<u32>) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    if targets.len() != rows {
        candle_core::bail!("{} targets for {rows} rows", targets.len());
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("target {t} is out of range (vocab {vocab})");
    }
    logits.contiguous()?.apply_op1(TargetNll { targets })
}

trait Float: Copy + Send + Sync + Into<f64> {
    fn from_f64(v: f64) -> Self;
}

impl Float for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Float for f64 {
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// `(max, log-sum-exp)` of one row, accumulated in f64.
fn row_lse<T: Float>(row: &[T]) -> (f64, f64) {
    let max = row
        .iter()
        .map(|&v| v.into())
        .fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = row.iter().map(|&v| (v.into() - max).exp()).sum();
    (max, max + sum.ln())
}

fn forward<T: Float>(x: &[T], vocab: usize, targets: &[u32]) -> Vec<T> {
    x.par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| T::from_f64(row_lse(row).1 - row[t as usize].into()))
        .collect()
}

fn backward<T: Float>(x: &[T], vocab: usize, targets: &[u32], grad: &[f64]) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); x.len()];
    out.par_chunks_mut(vocab)
        .zip(x.par_chunks(vocab))
        .zip(targets.par_iter().zip(grad.par_iter()))
        .for_each(|((o, row), (&t, &g))| {
            let (_, lse) = row_lse(row);
            for (o, &v) in o.iter_mut().zip(row) {
                *o = T::from_f64((v.into() - lse).exp() * g);
            }
            o[t as usize] = T::from_f64(o[t as usize].into() - g);
        });
    out
}

impl CustomOp1 for TargetNll {
    fn name(&self) -> &'static str {
        "target-nll"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = l.shape().dims2()?;
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("target-nll needs contiguous logits".into()))?;
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(forward(&v[start..end], vocab, &self.targets)),
            CpuStorage::F64(v) => CpuStorage::F64(forward(&v[start..end], vocab, &self.targets)),
            _ => candle_core::bail!("target-nll takes f32 or f64 logits"),
        };
        Ok((out, Shape::from(rows)))
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let vocab = logits.dim(1)?;
        let g: Vec<f64> = grad.to_dtype(candle_core::DType::F64)?.to_vec1()?;
        let logits = logits.contiguous()?;
        let (storage, layout) = logits.storage_and_layout();
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("target-nll needs contiguous logits".into()))?;
        let out = match &*storage {
            candle_core::Storage::Cpu(CpuStorage::F32(v)) => Tensor::from_vec(
                backward(&v[start..end], vocab, &self.targets, &g),
                logits.shape(),
                logits.device(),
            )?,
            candle_core::Storage::Cpu(CpuStorage::F64(v)) => Tensor::from_vec(
                backward(&v[start..end], vocab, &self.targets, &g),
                logits.shape(),
                logits.device(),
            )?,
            _ => candle_core::bail!("target-nll takes f32 or f64 logits on the CPU"),
        };
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn matches_log_softmax_and_gather_values_and_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 2.0, (5, 11), &dev).unwrap()).unwrap();
        let targets = vec![0u32, 10, 3, 3, 7];
        let ours = target_nll(x.as_tensor(), targets.clone()).unwrap();
        let idx = Tensor::from_vec(targets.clone(), (5, 1), &dev).unwrap();
        let theirs = candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1)
            .unwrap()
            .gather(&idx, 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap();
        let a: Vec<f64> = ours.to_vec1().unwrap();
        let b: Vec<f64> = theirs.to_vec1().unwrap();
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        // Weighted sums give the gradient of each row scaled by its weight.
        let w = Tensor::new(&[1.0f64, 0.5, 2.0, 0.0, 1.0], &dev).unwrap();
        let ga = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (theirs * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let ga: Vec<f64> = ga
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let gb: Vec<f64> = gb
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in ga.iter().zip(&gb) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        // Hand case: uniform logits over 4 classes give ln 4.
        let u = Tensor::zeros((1, 4), candle_core::DType::F32, &dev).unwrap();
        let v: Vec<f32> = target_nll(&u, vec![2]).unwrap().to_vec1().unwrap();
        assert!((v[0] - 4f32.ln()).abs() < 1e-6);
        assert!(target_nll(&u, vec![4]).is_err());
    }
}
