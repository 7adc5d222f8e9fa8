//! The routed (and shared) experts of an MoE layer in one call: SwiGLU products for the
//! rows of every expert, grouped by expert; and the moves around it, each split over the
//! threads: gathering the tokens' rows in expert order, and summing the weighted expert
//! outputs back per token.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::{
    activations, cpu_stored, on_stored, simd, with_f32, SharedOut, StoredRows, LINEAR_BLOCK,
};

/// One expert's rows of a grouped MoE product.
pub struct ExpertGroup<'a> {
    /// First row in the sorted inputs, and number of rows.
    pub start: usize,
    pub rows: usize,
    /// `[2 * inter, hidden]` and `[hidden, inter]`, stored in f32, bf16 or f16 (each
    /// expert its own: an adapter's f32 experts beside a bf16 base).
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
    // Every expert's weights as slices, resolved once for all tasks.
    let weights: Vec<(Tensor, Tensor)> = groups
        .iter()
        .map(|g| Ok((g.gate_up.contiguous()?, g.down.contiguous()?)))
        .collect::<Result<_>>()?;
    let guards: Vec<_> = weights
        .iter()
        .map(|(gu, d)| (gu.storage_and_layout(), d.storage_and_layout()))
        .collect();
    let slices: Vec<(StoredRows<'_>, StoredRows<'_>)> = guards
        .iter()
        .zip(&weights)
        .map(|(((gs, gl), (ds, dl)), (gu, d))| {
            Ok((
                cpu_stored(gs, gl, gu.elem_count())?,
                cpu_stored(ds, dl, d.elem_count())?,
            ))
        })
        .collect::<Result<_>>()?;
    let mut act = vec![0f32; act_len];
    let mut out = vec![0f32; total * hidden];
    let (act_dst, out_dst) = (SharedOut(act.as_mut_ptr()), SharedOut(out.as_mut_ptr()));
    with_f32(xs, |xs| {
        // Pass 1: activations.
        let tasks1: Vec<(usize, usize, usize, usize)> = chunks
            .iter()
            .flat_map(|&(gi, first, rows)| {
                (0..layout[gi].0)
                    .step_by(LINEAR_BLOCK)
                    .map(move |c0| (gi, first, rows, c0))
            })
            .collect();
        tasks1
            .into_par_iter()
            .for_each_init(Vec::new, |buf, (gi, first, rows, c0)| {
                let (g, (inter, act_start)) = (&groups[gi], layout[gi]);
                let cols = (inter - c0).min(LINEAR_BLOCK);
                let x = &xs[first * hidden..(first + rows) * hidden];
                buf.clear();
                buf.resize(2 * rows * cols, 0.0);
                let (gate, up) = buf.split_at_mut(rows * cols);
                on_stored!(slices[gi].0, |w| {
                    let gate_w = &w[c0 * hidden..(c0 + cols) * hidden];
                    let up_w = &w[(inter + c0) * hidden..(inter + c0 + cols) * hidden];
                    simd::products(x, rows, gate_w, cols, hidden, gate, cols);
                    simd::products(x, rows, up_w, cols, hidden, up, cols);
                });
                let base = act_start + (first - g.start) * inter + c0;
                for r in 0..rows {
                    // SAFETY: row r, columns c0..c0 + cols of this chunk's activations
                    // belong to this task alone.
                    let act_row = unsafe {
                        std::slice::from_raw_parts_mut(act_dst.at(base + r * inter), cols)
                    };
                    let gu = r * cols..(r + 1) * cols;
                    activations::silu_mul(&gate[gu.clone()], &up[gu], act_row);
                }
            });
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
        tasks2.into_par_iter().for_each(|(gi, first, rows, d0)| {
            let (g, (inter, act_start)) = (&groups[gi], layout[gi]);
            let cols = (hidden - d0).min(LINEAR_BLOCK);
            let a0 = act_start + (first - g.start) * inter;
            let a = &act[a0..a0 + rows * inter];
            let o = out_dst.at(first * hidden + d0);
            on_stored!(slices[gi].1, |w| {
                let down_w = &w[d0 * inter..(d0 + cols) * inter];
                // SAFETY: rows first..first + rows, columns d0..d0 + cols of the output
                // belong to this task alone.
                unsafe { simd::products_to(a, rows, down_w, cols, inter, inter, o, hidden) };
            });
            for r in 0..rows {
                let weight = row_weights[first + r];
                for c in 0..cols {
                    // SAFETY: as above.
                    unsafe { *o.add(r * hidden + c) *= weight };
                }
            }
        });
    })?;
    Tensor::from_vec(out, (total, hidden), &Device::Cpu)
}

/// Rows per parallel task of the row moves (256 KB at hidden 512); fewer rows in all run on
/// the calling thread.
const MOVE_ROWS: usize = 128;

/// The rows of `x` (`[n, hidden]`, f32) at `rows`, in that order (repeats allowed):
/// `[rows.len(), hidden]`.
pub fn gather_rows(x: &Tensor, rows: &[u32]) -> Result<Tensor> {
    let (n, hidden) = x.dims2()?;
    if let Some(&bad) = rows.iter().find(|&&r| r as usize >= n) {
        candle_core::bail!("gather_rows: row {bad} of {n}");
    }
    if hidden == 0 {
        return Tensor::zeros((rows.len(), 0), DType::F32, &Device::Cpu);
    }
    let mut out = vec![0f32; rows.len() * hidden];
    with_f32(x, |xs| {
        let copy = |(chunk, dst): (usize, &mut [f32])| {
            let first = chunk * MOVE_ROWS;
            for (r, d) in rows[first..].iter().zip(dst.chunks_exact_mut(hidden)) {
                let r = *r as usize;
                d.copy_from_slice(&xs[r * hidden..(r + 1) * hidden]);
            }
        };
        by_row_chunks(&mut out, hidden, rows.len(), copy);
    })?;
    Tensor::from_vec(out, (rows.len(), hidden), &Device::Cpu)
}

/// `out[t] = 0 + ys[i_1] + ys[i_2] + ...` over the rows `i_1 < i_2 < ...` of `ys` (`[m,
/// hidden]`, f32) with `rows[i] == t`, for every `t < n`: exactly what
/// `zeros([n, hidden]).index_add(rows, ys, 0)` computes (the same additions in the same
/// order), with the tokens split over the threads.
pub fn scatter_add_rows(ys: &Tensor, rows: &[u32], n: usize) -> Result<Tensor> {
    let (m, hidden) = ys.dims2()?;
    if rows.len() != m {
        candle_core::bail!("scatter_add_rows: {} targets for {m} rows", rows.len());
    }
    if let Some(&bad) = rows.iter().find(|&&r| r as usize >= n) {
        candle_core::bail!("scatter_add_rows: row {bad} of {n}");
    }
    if hidden == 0 {
        return Tensor::zeros((n, 0), DType::F32, &Device::Cpu);
    }
    // Each token's source rows, in increasing order (a counting sort by token).
    let mut start = vec![0usize; n + 1];
    for &r in rows {
        start[r as usize + 1] += 1;
    }
    for t in 0..n {
        start[t + 1] += start[t];
    }
    let mut next = start.clone();
    let mut order = vec![0usize; m];
    for (i, &r) in rows.iter().enumerate() {
        order[next[r as usize]] = i;
        next[r as usize] += 1;
    }
    let mut out = vec![0f32; n * hidden];
    with_f32(ys, |ys| {
        let sum = |(chunk, dst): (usize, &mut [f32])| {
            let first = chunk * MOVE_ROWS;
            for (t, d) in (first..).zip(dst.chunks_exact_mut(hidden)) {
                for &i in &order[start[t]..start[t + 1]] {
                    for (o, v) in d.iter_mut().zip(&ys[i * hidden..(i + 1) * hidden]) {
                        *o += v;
                    }
                }
            }
        };
        by_row_chunks(&mut out, hidden, m, sum);
    })?;
    Tensor::from_vec(out, (n, hidden), &Device::Cpu)
}

/// Runs `task((chunk, rows))` over `out` (rows of `hidden`) in chunks of `MOVE_ROWS`
/// rows across the pool; when `work_rows` rows of input or fewer are moved, once over all
/// of `out` (chunk 0) on the calling thread.
fn by_row_chunks(
    out: &mut [f32],
    hidden: usize,
    work_rows: usize,
    task: impl Fn((usize, &mut [f32])) + Sync + Send,
) {
    if work_rows <= MOVE_ROWS {
        task((0, out));
    } else {
        out.par_chunks_mut(MOVE_ROWS * hidden)
            .enumerate()
            .for_each(task);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{bits, max_diff};
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn row_moves_equal_index_select_and_index_add_bit_for_bit() {
        let dev = Device::Cpu;
        let (n, hidden) = (300, 12);
        let x = Tensor::randn(0f32, 1., (n, hidden), &dev).unwrap();
        // Each token 7 times (6 routed and a shared pass), in expert order; token 5 never.
        let rows: Vec<u32> = (0..7 * n)
            .map(|i| ((i * 37) % n) as u32)
            .filter(|&r| r != 5)
            .collect();
        let idx = Tensor::from_slice(&rows, rows.len(), &dev).unwrap();
        let gathered = gather_rows(&x, &rows).unwrap();
        assert_eq!(bits(&gathered), bits(&x.index_select(&idx, 0).unwrap()));
        // Values with signed zeros and mixed magnitudes, so any other order of the sums
        // or another start than +0 would show.
        let m = rows.len();
        let ys: Vec<f32> = (0..m * hidden)
            .map(|i| match i % 5 {
                0 => -0.0,
                1 => 1e8 * ((i % 7) as f32 - 3.0),
                _ => ((i * 13) % 11) as f32 * 0.37 - 2.0,
            })
            .collect();
        let ys = Tensor::from_vec(ys, (m, hidden), &dev).unwrap();
        let want = Tensor::zeros((n, hidden), candle_core::DType::F32, &dev)
            .unwrap()
            .index_add(&idx, &ys, 0)
            .unwrap();
        assert_eq!(bits(&scatter_add_rows(&ys, &rows, n).unwrap()), bits(&want));
        // A batch under one task's worth of rows takes the calling thread: same rule.
        let few = &rows[..10];
        let few_idx = Tensor::from_slice(few, 10, &dev).unwrap();
        let few_ys = ys.narrow(0, 0, 10).unwrap();
        let want = Tensor::zeros((n, hidden), candle_core::DType::F32, &dev)
            .unwrap()
            .index_add(&few_idx, &few_ys, 0)
            .unwrap();
        assert_eq!(
            bits(&scatter_add_rows(&few_ys, few, n).unwrap()),
            bits(&want)
        );
        // Rows out of range are refused.
        assert!(gather_rows(&x, &[n as u32]).is_err());
        assert!(scatter_add_rows(&few_ys, &[n as u32; 10], n).is_err());
        assert!(scatter_add_rows(&few_ys, &rows[..9], n).is_err());
    }

    #[test]
    fn narrow_experts_give_the_bits_of_their_f32_values() {
        let dev = Device::Cpu;
        let (h, inter, rows) = (48, 40, [3usize, 1, 5]);
        let total: usize = rows.iter().sum();
        let xs = Tensor::randn(0f32, 1., (total, h), &dev).unwrap();
        let weights: Vec<f32> = (0..total).map(|r| 0.25 + r as f32 * 0.05).collect();
        // A bf16 expert, an f16 one and an f32 one (an adapter's) in one call.
        let stored: Vec<(Tensor, Tensor)> = [DType::BF16, DType::F16, DType::F32]
            .iter()
            .map(|&dt| {
                let gu = Tensor::randn(0f32, 0.3, (2 * inter, h), &dev).unwrap();
                let d = Tensor::randn(0f32, 0.3, (h, inter), &dev).unwrap();
                (gu.to_dtype(dt).unwrap(), d.to_dtype(dt).unwrap())
            })
            .collect();
        let wide: Vec<(Tensor, Tensor)> = stored
            .iter()
            .map(|(gu, d)| {
                (
                    gu.to_dtype(DType::F32).unwrap(),
                    d.to_dtype(DType::F32).unwrap(),
                )
            })
            .collect();
        let run = |experts: &[(Tensor, Tensor)]| {
            let mut start = 0;
            let groups: Vec<ExpertGroup<'_>> = rows
                .iter()
                .zip(experts)
                .map(|(&n, (gu, d))| {
                    let g = ExpertGroup {
                        start,
                        rows: n,
                        gate_up: gu,
                        down: d,
                    };
                    start += n;
                    g
                })
                .collect();
            bits(&grouped_swiglu(&xs, &groups, &weights).unwrap())
        };
        assert_eq!(run(&stored), run(&wide));
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
