//! CPU kernels for the small-row products of decoding: `x W^T` for a handful of rows, and
//! the grouped SwiGLU experts of an MoE layer in one call.
//!
//! candle's general matmul packs the weight matrix on every call, which dominates when only
//! a few tokens multiply it (a decode step: every expert sees a few rows). These kernels read
//! each weight row once, straight from the tensor, and split the work across threads by
//! output rows (linear) or by expert (MoE). They are used only for f32 inference on CPU;
//! everything else goes through candle.

use candle_core::{DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

/// Most rows a plain product may have to take the small-row path (measured on the runtime
/// benchmark: beyond ~16 rows candle's packed gemm wins).
pub const SMALL_ROWS: usize = 16;

/// Most rows one expert may have for the grouped kernel (which parallelises across experts
/// and wins over per-expert gemm calls up to prefill-sized groups).
pub const GROUPED_MAX_ROWS: usize = 128;

/// Whether `x` (and weights like it) can use these kernels.
pub fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// Runs `f` on the contiguous f32 data of `t`.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => {
            let data = cpu.as_slice::<f32>()?;
            let start = layout.start_offset();
            Ok(f(&data[start..start + t.elem_count()]))
        }
        _ => candle_core::bail!("cpu kernel on a non-CPU tensor"),
    }
}

/// `x [m, k] @ w[n, k]^T -> [m, n]`, threads splitting the `n` output columns.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (n, k2) = w.dims2()?;
    if k != k2 {
        candle_core::bail!("linear: x has {k} columns, weight has {k2}");
    }
    let out = with_f32(x, |xs| {
        with_f32(w, |ws| {
            let mut out = vec![0f32; m * n];
            // Column blocks of the output (rows of w) per task; transposed into place below.
            let block = 64;
            let cols: Vec<Vec<f32>> = ws
                .par_chunks(block * k)
                .map(|wb| {
                    let rows = wb.len() / k;
                    let mut part = vec![0f32; rows * m];
                    for (j, wrow) in wb.chunks_exact(k).enumerate() {
                        for (r, xrow) in xs.chunks_exact(k).enumerate() {
                            part[j * m + r] = dot(xrow, wrow);
                        }
                    }
                    part
                })
                .collect();
            for (b, part) in cols.iter().enumerate() {
                for (j, col) in part.chunks_exact(m).enumerate() {
                    for (r, v) in col.iter().enumerate() {
                        out[r * n + b * block + j] = *v;
                    }
                }
            }
            out
        })
    })??;
    Tensor::from_vec(out, (m, n), &Device::Cpu)
}

/// One expert's rows of a grouped MoE product.
pub struct ExpertGroup<'a> {
    /// First row in the sorted inputs, and number of rows.
    pub start: usize,
    pub rows: usize,
    /// `[2 * inter, hidden]` and `[hidden, inter]`.
    pub gate_up: &'a Tensor,
    pub down: &'a Tensor,
}

/// For the rows `xs [total, hidden]` sorted by expert: `y_r = weight_r * down(silu(gate x_r)
/// * up x_r)`, every expert's rows computed on one thread, experts spread over threads.
pub fn grouped_swiglu(
    xs: &Tensor,
    groups: &[ExpertGroup<'_>],
    row_weights: &[f32],
) -> Result<Tensor> {
    let (total, hidden) = xs.dims2()?;
    let mut out = vec![0f32; total * hidden];
    with_f32(xs, |xs| -> Result<()> {
        // Split the output into one disjoint slice per group.
        let mut slices = Vec::with_capacity(groups.len());
        let mut rest: &mut [f32] = &mut out;
        let mut at = 0;
        for g in groups {
            let (_, tail) = rest.split_at_mut((g.start - at) * hidden);
            let (mine, tail) = tail.split_at_mut(g.rows * hidden);
            slices.push(mine);
            rest = tail;
            at = g.start + g.rows;
        }
        groups
            .par_iter()
            .zip(slices)
            .try_for_each(|(g, y)| -> Result<()> {
                let inter = g.down.dims2()?.1;
                let x = &xs[g.start * hidden..(g.start + g.rows) * hidden];
                with_f32(g.gate_up, |gu_w| {
                    with_f32(g.down, |down_w| {
                        let mut gu = vec![0f32; g.rows * 2 * inter];
                        for (j, wrow) in gu_w.chunks_exact(hidden).enumerate() {
                            for (r, xrow) in x.chunks_exact(hidden).enumerate() {
                                gu[r * 2 * inter + j] = dot(xrow, wrow);
                            }
                        }
                        let mut act = vec![0f32; g.rows * inter];
                        for r in 0..g.rows {
                            let row = &gu[r * 2 * inter..(r + 1) * 2 * inter];
                            for j in 0..inter {
                                let a = row[j];
                                act[r * inter + j] = a / (1.0 + (-a).exp()) * row[inter + j];
                            }
                        }
                        for (d, wrow) in down_w.chunks_exact(inter).enumerate() {
                            for r in 0..g.rows {
                                let w = row_weights[g.start + r];
                                y[r * hidden + d] = w * dot(&act[r * inter..(r + 1) * inter], wrow);
                            }
                        }
                    })
                })??;
                Ok(())
            })
    })??;
    Tensor::from_vec(out, (total, hidden), &Device::Cpu)
}

/// Dot product, 8-wide FMA where the CPU has AVX2.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were just detected.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (l, a_l) in acc.iter_mut().enumerate() {
            let o = i + 8 * l;
            *a_l = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o)), *a_l);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i)),
            _mm256_loadu_ps(pb.add(i)),
            acc[0],
        );
        i += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let hi = _mm256_extractf128_ps(sum, 1);
    let lo = _mm256_castps256_ps128(sum);
    let s4 = _mm_add_ps(hi, lo);
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    let mut s = _mm_cvtss_f32(s1);
    while i < n {
        s += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn dot_matches_hand_case_and_portable_path() {
        let a: Vec<f32> = (0..37).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..37).map(|i| (i % 3) as f32).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert_eq!(dot(&a, &b), want);
        assert_eq!(dot_portable(&a, &b), want);
    }

    #[test]
    fn linear_equals_candle_matmul() {
        let dev = Device::Cpu;
        for (m, k, n) in [(1, 64, 200), (3, 48, 65), (16, 512, 130)] {
            let x = Tensor::randn(0f32, 1., (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1., (n, k), &dev).unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap();
            assert!(
                max_diff(&linear(&x, &w).unwrap(), &want) < 1e-4,
                "{m}x{k}x{n}"
            );
        }
    }

    #[test]
    fn grouped_swiglu_equals_per_expert_candle() {
        let dev = Device::Cpu;
        let (h, i) = (40, 24);
        let experts: Vec<(Tensor, Tensor)> = (0..3)
            .map(|_| {
                (
                    Tensor::randn(0f32, 0.3, (2 * i, h), &dev).unwrap(),
                    Tensor::randn(0f32, 0.3, (h, i), &dev).unwrap(),
                )
            })
            .collect();
        let rows = [2usize, 0, 3];
        let total: usize = rows.iter().sum();
        let xs = Tensor::randn(0f32, 1., (total, h), &dev).unwrap();
        let weights: Vec<f32> = (0..total).map(|r| 0.5 + r as f32 * 0.1).collect();
        let mut groups = Vec::new();
        let mut want = Vec::new();
        let mut start = 0;
        for (e, &n) in rows.iter().enumerate() {
            if n > 0 {
                groups.push(ExpertGroup {
                    start,
                    rows: n,
                    gate_up: &experts[e].0,
                    down: &experts[e].1,
                });
                let x = xs.narrow(0, start, n).unwrap();
                let gu = x.matmul(&experts[e].0.t().unwrap()).unwrap();
                let act = crate::model::ops::swiglu(&gu).unwrap();
                let y = act.matmul(&experts[e].1.t().unwrap()).unwrap();
                let w = Tensor::new(&weights[start..start + n], &dev)
                    .unwrap()
                    .reshape((n, 1))
                    .unwrap();
                want.push(y.broadcast_mul(&w).unwrap());
            }
            start += n;
        }
        let want = Tensor::cat(&want, 0).unwrap();
        let got = grouped_swiglu(&xs, &groups, &weights).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
    }
}
