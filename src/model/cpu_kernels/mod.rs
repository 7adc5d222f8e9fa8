//! CPU kernels for the small-row products of decoding: `x W^T` for a few dozen rows, the
//! grouped SwiGLU experts of an MoE layer in one call, and attention against the latent
//! caches of a whole batch in one call.
//!
//! candle's general matmul packs the weight matrix on every call and, on stable Rust, runs
//! 8-wide AVX2 microkernels. These kernels read each weight row once, straight from the
//! tensor, multiply it with up to 4 rows at a time in AVX-512 registers ([`simd`]), and
//! split the work across threads by output columns (linear), by expert (MoE) or by query
//! token (attention). They are used only for f32 inference on CPU; everything else goes
//! through candle.

mod attention;
mod simd;

pub use attention::{latent_attention, LatentSeq};
pub use simd::dot;

use candle_core::{DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

/// Without AVX-512: most rows for which [`linear`] beats candle's gemm (measured on the
/// runtime benchmark's shapes), and most rows per expert for which [`grouped_swiglu`]
/// beats per-expert gemm calls. With AVX-512 the register tiles win at every size
/// (numbers in the README), so these kernels take every product.
const DOT_LINEAR_ROWS: usize = 16;
const DOT_GROUPED_ROWS: usize = 128;

/// Whether `x` (and weights like it) can use these kernels.
pub fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// Whether the products run in AVX-512 register tiles on this CPU.
pub fn tiled() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether [`linear`] is the faster product for `rows` rows on this CPU.
pub fn linear_wins(rows: usize) -> bool {
    tiled() || rows <= DOT_LINEAR_ROWS
}

/// Whether [`grouped_swiglu`] is the faster expert product when no expert has more than
/// `largest` rows.
pub fn grouped_wins(largest: usize) -> bool {
    tiled() || largest <= DOT_GROUPED_ROWS
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

/// An output buffer that parallel tasks fill at disjoint positions.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: every user writes a set of positions no other task touches, and the buffer
// outlives the parallel section (rayon joins it before the buffer is read).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The position `i` of the buffer (a method, so closures capture the whole wrapper).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// Weight rows per parallel task of [`linear`]: a block of `w` stays in L2 while the rows
/// of `x` pass over it.
const LINEAR_BLOCK: usize = 64;

/// Multiply-adds below which a product runs on the calling thread: waking the pool costs
/// more than the work (a decode token's `kv_a_proj` is 82k).
const INLINE_WORK: usize = 1 << 18;

/// Rows of `x` per parallel task of [`linear`] (512 KB at hidden 512: fits L2 beside the
/// weight block).
const LINEAR_ROWS: usize = 256;

/// `x [m, k] @ w[n, k]^T -> [m, n]`, threads splitting the output into tiles of
/// `LINEAR_ROWS` rows by `LINEAR_BLOCK` columns. Every output is the same sum in the same
/// order whatever `m` is, so a row's result does not depend on what else is in the batch.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (n, k2) = w.dims2()?;
    if k != k2 {
        candle_core::bail!("linear: x has {k} columns, weight has {k2}");
    }
    let mut out = vec![0f32; m * n];
    let dst = SharedOut(out.as_mut_ptr());
    let (row_tiles, col_tiles) = (m.div_ceil(LINEAR_ROWS), n.div_ceil(LINEAR_BLOCK));
    with_f32(x, |xs| {
        with_f32(w, |ws| {
            let task = |tile: usize| {
                // Column-major over tiles: consecutive tasks share a block of `w`.
                let (rt, ct) = (tile % row_tiles, tile / row_tiles);
                let (r0, c0) = (rt * LINEAR_ROWS, ct * LINEAR_BLOCK);
                let (rows, cols) = ((m - r0).min(LINEAR_ROWS), (n - c0).min(LINEAR_BLOCK));
                let xt = &xs[r0 * k..(r0 + rows) * k];
                let wt = &ws[c0 * k..(c0 + cols) * k];
                // SAFETY: this task writes rows r0..r0 + rows, columns c0..c0 + cols of the
                // m x n buffer, which no other task writes.
                unsafe { simd::products_to(xt, rows, wt, cols, k, dst.at(r0 * n + c0), n) };
            };
            if m * n * k <= INLINE_WORK {
                (0..row_tiles * col_tiles).for_each(task);
            } else {
                (0..row_tiles * col_tiles).into_par_iter().for_each(task);
            }
        })
    })??;
    Tensor::from_vec(out, (m, n), &Device::Cpu)
}

/// Per head `h`: `x[h] [n, k] @ w[h][rows]^T`, written token-major: `x [heads, n, k]`,
/// `w [heads, o, k]` -> `[n, heads, rows.len()]`. MLA's absorbed projections: the query
/// into the latent space (`W_uk`) and the attention output out of it (`W_uv`, read in place
/// from `kv_b_proj` through `rows`).
pub fn heads_linear(x: &Tensor, w: &Tensor, rows: std::ops::Range<usize>) -> Result<Tensor> {
    let (heads, n, k) = x.dims3()?;
    let (wh, o, k2) = w.dims3()?;
    if wh != heads || k2 != k || rows.end > o || rows.start > rows.end {
        candle_core::bail!(
            "heads_linear: x {:?}, w {:?}, rows {rows:?}",
            x.dims(),
            w.dims()
        );
    }
    let width = rows.len();
    let mut out = vec![0f32; n * heads * width];
    let dst = SharedOut(out.as_mut_ptr());
    let col_tiles = width.div_ceil(LINEAR_BLOCK);
    with_f32(x, |xs| {
        with_f32(w, |ws| {
            let task = |tile: usize| {
                let (h, ct) = (tile / col_tiles, tile % col_tiles);
                let c0 = ct * LINEAR_BLOCK;
                let cols = (width - c0).min(LINEAR_BLOCK);
                let xh = &xs[h * n * k..(h + 1) * n * k];
                let first = h * o + rows.start + c0;
                let wt = &ws[first * k..(first + cols) * k];
                // SAFETY: this task writes columns h * width + c0 .. + cols of every token
                // row of the n x (heads * width) buffer, which no other task writes.
                unsafe {
                    simd::products_to(xh, n, wt, cols, k, dst.at(h * width + c0), heads * width)
                };
            };
            if n * heads * width * k <= INLINE_WORK {
                (0..heads * col_tiles).for_each(task);
            } else {
                (0..heads * col_tiles).into_par_iter().for_each(task);
            }
        })
    })??;
    Tensor::from_vec(out, (n, heads, width), &Device::Cpu)
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

/// Rows per task of [`grouped_swiglu`]: a larger expert group is split, so that one busy
/// expert (a long prompt) still spreads over the threads and its rows stay in L2.
const GROUP_TASK_ROWS: usize = 128;

/// For the rows `xs [total, hidden]` sorted by expert:
/// `y_r = weight_r * down(silu(gate x_r) * up x_r)`.
///
/// Two parallel passes, each split into small tasks so that the threads stay balanced
/// even when one expert is larger than the others (the shared experts, a long prompt):
/// the activations per (expert, up to `GROUP_TASK_ROWS` rows, `LINEAR_BLOCK` intermediate
/// columns), then the down projection per (expert, rows, `LINEAR_BLOCK` output columns).
/// Every output is the same sum whatever the split, so a row's result does not depend on
/// how many rows its expert has.
pub fn grouped_swiglu(
    xs: &Tensor,
    groups: &[ExpertGroup<'_>],
    row_weights: &[f32],
) -> Result<Tensor> {
    let (total, hidden) = xs.dims2()?;
    if row_weights.len() < total {
        candle_core::bail!(
            "grouped_swiglu: {} weights for {total} rows",
            row_weights.len()
        );
    }
    // Per group: its intermediate size and where its activations start.
    let mut at = 0;
    let mut act_len = 0;
    let mut layout = Vec::with_capacity(groups.len());
    for g in groups {
        if g.start < at || g.start + g.rows > total {
            candle_core::bail!("grouped_swiglu: groups overlap or run past {total} rows");
        }
        let (h2, inter) = g.down.dims2()?;
        if h2 != hidden || g.gate_up.dims2()? != (2 * inter, hidden) {
            candle_core::bail!("grouped_swiglu: expert shapes do not match hidden {hidden}");
        }
        layout.push((inter, act_len));
        act_len += g.rows * inter;
        at = g.start + g.rows;
    }
    // (group, first row, rows) chunks.
    let chunks: Vec<(usize, usize, usize)> = groups
        .iter()
        .enumerate()
        .flat_map(|(gi, g)| {
            (g.start..g.start + g.rows)
                .step_by(GROUP_TASK_ROWS)
                .map(move |first| (gi, first, (g.start + g.rows - first).min(GROUP_TASK_ROWS)))
        })
        .collect();
    let mut act = vec![0f32; act_len];
    let mut out = vec![0f32; total * hidden];
    let (act_dst, out_dst) = (SharedOut(act.as_mut_ptr()), SharedOut(out.as_mut_ptr()));
    with_f32(xs, |xs| -> Result<()> {
        // Pass 1: activations.
        let tasks1: Vec<(usize, usize, usize, usize)> = chunks
            .iter()
            .flat_map(|&(gi, first, rows)| {
                (0..layout[gi].0)
                    .step_by(LINEAR_BLOCK)
                    .map(move |c0| (gi, first, rows, c0))
            })
            .collect();
        tasks1.into_par_iter().try_for_each_init(
            Vec::new,
            |buf, (gi, first, rows, c0)| -> Result<()> {
                let (g, (inter, act_start)) = (&groups[gi], layout[gi]);
                let cols = (inter - c0).min(LINEAR_BLOCK);
                let x = &xs[first * hidden..(first + rows) * hidden];
                with_f32(g.gate_up, |w| {
                    buf.clear();
                    buf.resize(2 * rows * cols, 0.0);
                    let (gate, up) = buf.split_at_mut(rows * cols);
                    let gate_w = &w[c0 * hidden..(c0 + cols) * hidden];
                    let up_w = &w[(inter + c0) * hidden..(inter + c0 + cols) * hidden];
                    simd::products(x, rows, gate_w, cols, hidden, gate, cols);
                    simd::products(x, rows, up_w, cols, hidden, up, cols);
                    let base = act_start + (first - g.start) * inter + c0;
                    for r in 0..rows {
                        for c in 0..cols {
                            let (a, u) = (gate[r * cols + c], up[r * cols + c]);
                            // SAFETY: row r, columns c0..c0 + cols of this chunk's
                            // activations belong to this task alone.
                            unsafe {
                                *act_dst.at(base + r * inter + c) = a / (1.0 + (-a).exp()) * u
                            };
                        }
                    }
                })
            },
        )?;
        // Pass 2: down projection and routing weight.
        let act = &act;
        let tasks2: Vec<(usize, usize, usize, usize)> = chunks
            .iter()
            .flat_map(|&(gi, first, rows)| {
                (0..hidden)
                    .step_by(LINEAR_BLOCK)
                    .map(move |d0| (gi, first, rows, d0))
            })
            .collect();
        tasks2
            .into_par_iter()
            .try_for_each(|(gi, first, rows, d0)| -> Result<()> {
                let (g, (inter, act_start)) = (&groups[gi], layout[gi]);
                let cols = (hidden - d0).min(LINEAR_BLOCK);
                let a0 = act_start + (first - g.start) * inter;
                let a = &act[a0..a0 + rows * inter];
                with_f32(g.down, |w| {
                    let down_w = &w[d0 * inter..(d0 + cols) * inter];
                    let o = out_dst.at(first * hidden + d0);
                    // SAFETY: rows first..first + rows, columns d0..d0 + cols of the output
                    // belong to this task alone.
                    unsafe { simd::products_to(a, rows, down_w, cols, inter, o, hidden) };
                    for r in 0..rows {
                        let weight = row_weights[first + r];
                        for c in 0..cols {
                            // SAFETY: as above.
                            unsafe { *o.add(r * hidden + c) *= weight };
                        }
                    }
                })
            })
    })??;
    Tensor::from_vec(out, (total, hidden), &Device::Cpu)
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
    fn linear_equals_candle_matmul() {
        let dev = Device::Cpu;
        for (m, k, n) in [
            (1, 64, 200),
            (3, 48, 65),
            (16, 512, 130),
            (37, 100, 131),
            (64, 512, 70),
        ] {
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
    fn heads_linear_equals_candle_batched_matmul() {
        let dev = Device::Cpu;
        let (heads, n, k, o) = (3, 5, 40, 70);
        let x = Tensor::randn(0f32, 1., (heads, n, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (heads, o, k), &dev).unwrap();
        for rows in [0..o, 10..30, 65..70] {
            let want = x
                .matmul(
                    &w.narrow(1, rows.start, rows.len())
                        .unwrap()
                        .transpose(1, 2)
                        .unwrap(),
                )
                .unwrap()
                .transpose(0, 1)
                .unwrap();
            let got = heads_linear(&x, &w, rows.clone()).unwrap();
            assert_eq!(got.dims(), &[n, heads, rows.len()]);
            assert!(max_diff(&got, &want) < 1e-4, "{rows:?}");
        }
        assert!(heads_linear(&x, &w, 60..71).is_err());
    }

    #[test]
    fn grouped_swiglu_equals_per_expert_candle() {
        let dev = Device::Cpu;
        // Intermediate sizes of routed experts and of a wider shared expert; one group
        // longer than a task and one intermediate size longer than a column block.
        let (h, inters) = (40, [24usize, 24, 24, 48, 70]);
        let experts: Vec<(Tensor, Tensor)> = inters
            .iter()
            .map(|&i| {
                (
                    Tensor::randn(0f32, 0.3, (2 * i, h), &dev).unwrap(),
                    Tensor::randn(0f32, 0.3, (h, i), &dev).unwrap(),
                )
            })
            .collect();
        let rows = [2usize, 0, 3, GROUP_TASK_ROWS + 5, 1];
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
        let scale = want
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            max_diff(&got, &want) < 1e-5 * scale.max(1.0),
            "{} vs scale {scale}",
            max_diff(&got, &want)
        );
        // A row of the long group (in its second task) computes the same bits alone.
        let last = 2 + 3 + GROUP_TASK_ROWS + 2;
        let alone = grouped_swiglu(
            &xs.narrow(0, last, 1).unwrap(),
            &[ExpertGroup {
                start: 0,
                rows: 1,
                gate_up: &experts[3].0,
                down: &experts[3].1,
            }],
            &weights[last..],
        )
        .unwrap();
        let in_group: Vec<f32> = got
            .narrow(0, last, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let alone: Vec<f32> = alone.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(in_group, alone);
        // Overlapping groups are refused.
        let overlap = [
            ExpertGroup {
                start: 0,
                rows: 3,
                gate_up: &experts[0].0,
                down: &experts[0].1,
            },
            ExpertGroup {
                start: 2,
                rows: 1,
                gate_up: &experts[0].0,
                down: &experts[0].1,
            },
        ];
        assert!(grouped_swiglu(&xs, &overlap, &weights).is_err());
    }
}
