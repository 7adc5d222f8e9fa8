//! AdamW (decoupled weight decay, bias-corrected moments, as in PyTorch) over the trainable
//! weights only, with its moments in host memory so a run can save and resume them
//! exactly. One fused pass per tensor reads the weight, gradient and moments once.

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// First and second moments of one weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

pub struct AdamW {
    cfg: AdamWConfig,
    /// Updates done so far.
    pub step: u64,
    pub moments: Vec<Moments>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, vars: &[&Var]) -> Self {
        Self {
            cfg,
            step: 0,
            moments: vars
                .iter()
                .map(|v| Moments {
                    m: vec![0.0; v.elem_count()],
                    v: vec![0.0; v.elem_count()],
                })
                .collect(),
        }
    }

    /// One update of every var with its gradient (same order as at construction); a var
    /// without a gradient (`None`: it took no part in the loss) only decays.
    pub fn update(&mut self, vars: &[&Var], grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if vars.len() != self.moments.len() || grads.len() != vars.len() {
            bail!(
                "optimizer built for {} weights, given {}",
                self.moments.len(),
                vars.len()
            );
        }
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
        let decay = (1.0 - lr * c.weight_decay) as f32;
        let step_size = (lr / bc1) as f32;
        let (eps, sqrt_bc2) = (c.eps as f32, bc2.sqrt() as f32);
        for ((var, grad), mom) in vars.iter().zip(grads).zip(&mut self.moments) {
            let mut p = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let g = match grad {
                Some(g) => g.flatten_all()?.to_vec1::<f32>()?,
                None => vec![0.0; p.len()],
            };
            const CHUNK: usize = 1 << 14;
            p.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(mom.m.par_chunks_mut(CHUNK))
                .zip(mom.v.par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| {
                    for i in 0..p.len() {
                        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                        let denom = v[i].sqrt() / sqrt_bc2 + eps;
                        p[i] = p[i] * decay - step_size * m[i] / denom;
                    }
                });
            var.set(&Tensor::from_vec(p, var.shape(), var.device())?)?;
        }
        Ok(())
    }
}

/// Scales `grads` so their joint L2 norm is at most `max_norm` (0 disables); returns the
/// norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter().flatten() {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut().flatten() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_hand_computed_adamw_steps() {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &dev).unwrap()).unwrap();
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(cfg, &[&var]);
        let lr = 0.01;
        // Reference in f64, straight from the PyTorch AdamW formula.
        let mut p = [1.0f64, -2.0];
        let mut m = [0.0f64; 2];
        let mut v = [0.0f64; 2];
        let grads = [[0.5f64, -1.0], [0.25, 2.0], [-0.1, 0.0]];
        for (t, g) in grads.iter().enumerate() {
            let gt = Tensor::new(&[g[0] as f32, g[1] as f32], &dev).unwrap();
            opt.update(&[&var], &[Some(gt)], lr).unwrap();
            let t = (t + 1) as i32;
            for i in 0..2 {
                p[i] *= 1.0 - lr * 0.1;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.95 * v[i] + 0.05 * g[i] * g[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.95f64.powi(t));
                p[i] -= lr * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..2 {
            assert!((got[i] as f64 - p[i]).abs() < 1e-6, "{got:?} vs {p:?}");
        }
        assert_eq!(opt.step, 3);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let dev = Device::Cpu;
        let mut g = vec![
            Some(Tensor::new(&[3.0f32], &dev).unwrap()),
            None,
            Some(Tensor::new(&[4.0f32], &dev).unwrap()),
        ];
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        let a = g[0].as_ref().unwrap().to_vec1::<f32>().unwrap()[0];
        assert!((a - 0.6).abs() < 1e-5, "{a}");
        let n = clip_grad_norm(&mut g, 0.0).unwrap();
        assert!((n - 1.0).abs() < 1e-4);
    }
}
