//! Plain products on the CPU: `x W^T` with a weight as checkpoints store it (`linear`),
//! `a @ b` for either layout of `b` (`matmul`, the training products), and MLA's per-head
//! absorbed projections (`heads_linear`).

use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::{on_stored, simd, with_f32, with_stored, SharedOut, LINEAR_BLOCK};

/// Multiply-adds below which a product runs on the calling thread: sharing it costs more
/// than the work. With the forward on the compute pool, sharing is cheap enough that a
/// decode token's 1 MB `o_proj` (262k) and 330 KB `kv_a_proj` (82k) gain from both
/// threads: batch-1 decode was faster than with 1 << 18 in 6 of 7 alternating runs.
const INLINE_WORK: usize = 1 << 16;

/// Rows of `x` per parallel task of [`linear`] (512 KB at hidden 512: fits L2 beside the
/// weight block).
const LINEAR_ROWS: usize = 256;

/// `k` values of the sum per pass over a chunk of `b` in the row-major layout: the chunk
/// (`K_CHUNK` rows by `LINEAR_BLOCK` columns, 64 KB) stays in L2 while every row block of
/// `a` passes over it.
const K_CHUNK: usize = 256;

/// How the right operand `b` (`[k, n]`) of `a @ b` is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RhsRows {
    /// `b` row-major: `k` rows of `n` (an activation, or a weight used as `x @ W`).
    Plain,
    /// `b^T` row-major: `n` rows of `k` (a weight as checkpoints store it, used as
    /// `x @ W^T`), the layout of the dot-product tiles.
    Transposed,
}

/// `a [batch, m, k] @ b [batch, k, n] -> [batch, m, n]`, `a` row-major and `b` stored as
/// `rows` says (see [`output_tiles`] for the split and the batch invariance).
///
/// Panics if a slice is shorter than the sizes say.
pub fn matmul_slices(
    a: &[f32],
    (batch, m, k): (usize, usize, usize),
    b: &[f32],
    n: usize,
    rows: RhsRows,
) -> Vec<f32> {
    assert!(
        a.len() >= batch * m * k && b.len() >= batch * k * n,
        "matmul: short operands"
    );
    output_tiles((batch, m, k, n), |t: Tile| {
        let ab = &a[t.batch * m * k..(t.batch + 1) * m * k];
        let bb = &b[t.batch * k * n..(t.batch + 1) * k * n];
        match rows {
            // SAFETY: the tile's output positions are its own (`output_tiles`).
            RhsRows::Transposed => unsafe { transposed_tile(ab, bb, k, n, &t) },
            RhsRows::Plain => {
                for j0 in (0..k).step_by(K_CHUNK) {
                    let kc = (k - j0).min(K_CHUNK);
                    // SAFETY: as above; the reads stay inside `ab` and `bb`.
                    unsafe {
                        simd::weighted_to(
                            ab.as_ptr().add(t.r0 * k + j0),
                            k,
                            t.rows,
                            bb.as_ptr().add(j0 * n + t.c0),
                            n,
                            kc,
                            t.cols,
                            t.out,
                            n,
                            j0 > 0,
                        )
                    }
                }
            }
        }
    })
}

/// One output tile of a product: rows `r0..r0 + rows`, columns `c0..c0 + cols` of batch
/// entry `batch`, written at `out` with the output's row stride.
struct Tile {
    batch: usize,
    r0: usize,
    rows: usize,
    c0: usize,
    cols: usize,
    out: *mut f32,
}

/// Runs `task` on every tile of a `[batch, m, n]` product with inner size `k` and returns
/// the output. Threads split it into tiles of `LINEAR_ROWS` rows by `LINEAR_BLOCK` columns
/// of one batch entry; each task writes its own tile alone. Every output is the same sum in
/// the same order whatever `m` is, so a row's result does not depend on what else is in
/// the batch.
fn output_tiles(
    (batch, m, k, n): (usize, usize, usize, usize),
    task: impl Fn(Tile) + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; batch * m * n];
    let dst = SharedOut(out.as_mut_ptr());
    let (row_tiles, col_tiles) = (m.div_ceil(LINEAR_ROWS), n.div_ceil(LINEAR_BLOCK));
    let run = |t: usize| {
        // Column-major over tiles: consecutive tasks share a block of `b`.
        let (bi, rest) = (t / (row_tiles * col_tiles), t % (row_tiles * col_tiles));
        let (rt, ct) = (rest % row_tiles, rest / row_tiles);
        let (r0, c0) = (rt * LINEAR_ROWS, ct * LINEAR_BLOCK);
        task(Tile {
            batch: bi,
            r0,
            rows: (m - r0).min(LINEAR_ROWS),
            c0,
            cols: (n - c0).min(LINEAR_BLOCK),
            out: dst.at(bi * m * n + r0 * n + c0),
        })
    };
    run_tasks(batch * row_tiles * col_tiles, batch * m * n * k, run);
    out
}

/// Runs `task(0..tasks)`: on the calling thread when the whole product is `work`
/// multiply-adds or fewer, else across the pool.
fn run_tasks(tasks: usize, work: usize, task: impl Fn(usize) + Sync + Send) {
    if work <= INLINE_WORK {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// One tile of `a @ b^T` with `b` stored as `n` rows of `k` (any stored dtype).
///
/// # Safety
/// The tile's output positions must be valid and written by nothing else meanwhile.
unsafe fn transposed_tile<W: simd::Stored>(a: &[f32], b: &[W], k: usize, n: usize, t: &Tile) {
    // SAFETY: the caller's promise; the slices are bounded by the tile.
    unsafe {
        simd::products_to(
            &a[t.r0 * k..(t.r0 + t.rows) * k],
            t.rows,
            &b[t.c0 * k..(t.c0 + t.cols) * k],
            t.cols,
            k,
            k,
            t.out,
            n,
        )
    }
}

/// `x [m, k] @ w[n, k]^T -> [m, n]` for an f32 `x` and a weight stored in f32, bf16 or
/// f16 (see [`output_tiles`]).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (n, k2) = w.dims2()?;
    if k != k2 {
        candle_core::bail!("linear: x has {k} columns, weight has {k2}");
    }
    let out = with_f32(x, |xs| {
        with_stored(w, |ws| {
            on_stored!(ws, |ws| output_tiles((1, m, k, n), |t: Tile| {
                // SAFETY: the tile's output positions are its own (`output_tiles`).
                unsafe { transposed_tile(xs, ws, k, n, &t) }
            }))
        })
    })??;
    Tensor::from_vec(out, (m, n), &Device::Cpu)
}

/// The sizes of `a @ b` for shapes `[.., m, k]` and `[.., k, n]` with equal batch
/// dimensions: `(batch, m, k, n)` and the output shape.
pub fn product_dims(ad: &[usize], bd: &[usize]) -> Result<((usize, usize, usize, usize), Shape)> {
    let r = ad.len();
    if r < 2 || bd.len() != r || ad[..r - 2] != bd[..r - 2] || ad[r - 1] != bd[r - 2] {
        candle_core::bail!("matmul: cannot multiply {ad:?} by {bd:?}");
    }
    let mut shape = ad[..r - 2].to_vec();
    shape.extend([ad[r - 2], bd[r - 1]]);
    let batch = ad[..r - 2].iter().product();
    Ok(((batch, ad[r - 2], ad[r - 1], bd[r - 1]), Shape::from(shape)))
}

/// `a @ b` for f32 CPU tensors of rank 2 or more with equal batch dimensions, where `b` is
/// contiguous or the transpose of a contiguous tensor ([`RhsRows`]); `None` for any other
/// layout (the caller multiplies with candle).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let a = a.contiguous()?;
    let (a_storage, a_layout) = a.storage_and_layout();
    let (b_storage, b_layout) = b.storage_and_layout();
    let (Storage::Cpu(av), Storage::Cpu(bv)) = (&*a_storage, &*b_storage) else {
        return Ok(None);
    };
    match matmul_storage(av, a_layout, bv, b_layout)? {
        Some((CpuStorage::F32(out), shape)) => {
            Ok(Some(Tensor::from_vec(out, shape, &Device::Cpu)?))
        }
        _ => Ok(None),
    }
}

/// `a @ b` with the tiled kernels where they are the faster product (f32 on a CPU with
/// AVX-512, `b` in one of the [`RhsRows`] layouts), else candle's matmul.
pub fn product(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if super::tiled() && super::applies(a) && b.dtype() == DType::F32 {
        if let Some(y) = matmul(a, b)? {
            return Ok(y);
        }
    }
    a.matmul(b)
}

/// [`matmul`] on raw CPU storage (inside a custom op's forward): `a` must be contiguous,
/// `b` in one of the [`RhsRows`] layouts; `None` otherwise.
pub fn matmul_storage(
    a: &CpuStorage,
    a_layout: &Layout,
    b: &CpuStorage,
    b_layout: &Layout,
) -> Result<Option<(CpuStorage, Shape)>> {
    let ((batch, m, k, n), shape) = product_dims(a_layout.dims(), b_layout.dims())?;
    let (CpuStorage::F32(av), CpuStorage::F32(bv)) = (a, b) else {
        return Ok(None);
    };
    let Some((a0, a1)) = a_layout.contiguous_offsets() else {
        return Ok(None);
    };
    let r = shape.rank();
    let rows = if b_layout.is_contiguous() {
        RhsRows::Plain
    } else if b_layout.transpose(r - 2, r - 1)?.is_contiguous() {
        RhsRows::Transposed
    } else {
        return Ok(None);
    };
    let b0 = b_layout.start_offset();
    let out = matmul_slices(
        &av[a0..a1],
        (batch, m, k),
        &bv[b0..b0 + batch * k * n],
        n,
        rows,
    );
    Ok(Some((CpuStorage::F32(out), shape)))
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
        with_stored(w, |ws| {
            on_stored!(ws, |ws| {
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
                        simd::products_to(
                            xh,
                            n,
                            wt,
                            cols,
                            k,
                            k,
                            dst.at(h * width + c0),
                            heads * width,
                        )
                    };
                };
                run_tasks(heads * col_tiles, n * heads * width * k, task);
            })
        })
    })??;
    Tensor::from_vec(out, (n, heads, width), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::super::{bits, max_diff};
    use super::*;
    use candle_core::Device;

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
            // Two summation orders of k products of unit normals round differently, by an
            // amount that grows with k (past 1e-4 at k = 512 now and then).
            let d = max_diff(&linear(&x, &w).unwrap(), &want);
            assert!(d < 2e-5 * k as f32 / 8.0, "{m}x{k}x{n}: {d}");
        }
    }

    #[test]
    fn matmul_equals_candle_for_both_layouts_and_chunked_sums() {
        let dev = Device::Cpu;
        // k beyond one chunk of the row-major path; batch of 2; odd sizes.
        for (batch, m, k, n) in [(1, 3, 5, 7), (2, 9, K_CHUNK + 40, 70), (1, 300, 64, 130)] {
            let a = Tensor::randn(0f32, 1., (batch, m, k), &dev).unwrap();
            let plain = Tensor::randn(0f32, 1., (batch, k, n), &dev).unwrap();
            let stored_t = Tensor::randn(0f32, 1., (batch, n, k), &dev).unwrap();
            let transposed = stored_t.transpose(1, 2).unwrap();
            for b in [&plain, &transposed] {
                let want = a.matmul(b).unwrap();
                let got = matmul(&a, b).unwrap().expect("a supported layout");
                let scale = (k as f32).sqrt();
                assert!(
                    max_diff(&got, &want) < 1e-5 * scale * 4.0,
                    "{batch} {m} {k} {n}"
                );
            }
        }
        // A rhs that is neither layout (a narrowed column range) is left to the caller.
        let a = Tensor::randn(0f32, 1., (4, 6), &dev).unwrap();
        let wide = Tensor::randn(0f32, 1., (6, 10), &dev).unwrap();
        assert!(matmul(&a, &wide.narrow(1, 2, 5).unwrap())
            .unwrap()
            .is_none());
        assert!(matmul(&a, &wide.t().unwrap()).is_err());
    }

    #[test]
    fn a_row_gets_the_same_bits_in_any_batch() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (LINEAR_ROWS + 9, 100), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (77, 100), &dev).unwrap();
        let wt = Tensor::randn(0f32, 1., (100, 77), &dev).unwrap();
        let all = linear(&x, &w).unwrap();
        let all_plain = matmul(&x, &wt).unwrap().unwrap();
        for row in [0, 5, LINEAR_ROWS + 3] {
            let one = x.narrow(0, row, 1).unwrap();
            assert_eq!(
                bits(&linear(&one, &w).unwrap()),
                bits(&all.narrow(0, row, 1).unwrap())
            );
            assert_eq!(
                bits(&matmul(&one, &wt).unwrap().unwrap()),
                bits(&all_plain.narrow(0, row, 1).unwrap())
            );
        }
    }

    #[test]
    fn narrow_weights_give_the_bits_of_their_f32_values() {
        let dev = Device::Cpu;
        for dtype in [DType::BF16, DType::F16] {
            for (m, k, n) in [(1, 512, 70), (37, 100, 131)] {
                let x = Tensor::randn(0f32, 1., (m, k), &dev).unwrap();
                let w = Tensor::randn(0f32, 1., (n, k), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let wide = w.to_dtype(DType::F32).unwrap();
                assert_eq!(
                    bits(&linear(&x, &w).unwrap()),
                    bits(&linear(&x, &wide).unwrap()),
                    "{dtype:?} {m}x{k}x{n}"
                );
            }
            let x = Tensor::randn(0f32, 1., (3, 5, 40), &dev).unwrap();
            let w = Tensor::randn(0f32, 1., (3, 70, 40), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let wide = w.to_dtype(DType::F32).unwrap();
            assert_eq!(
                bits(&heads_linear(&x, &w, 10..30).unwrap()),
                bits(&heads_linear(&x, &wide, 10..30).unwrap())
            );
        }
        // Weights in a dtype the kernels do not read are refused, not misread.
        let x = Tensor::randn(0f32, 1., (2, 8), &dev).unwrap();
        let w = Tensor::zeros((3, 8), DType::F64, &dev).unwrap();
        assert!(linear(&x, &w).is_err());
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
}
