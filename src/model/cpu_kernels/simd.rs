//! The inner products under every CPU kernel: `out[r][j] = x_r . w_j` for a few rows `x_r`
//! against many rows `w_j`, both stored row-major along the shared dimension `k` (a weight
//! matrix as checkpoints store it, `[out_features, in_features]`; a latent cache, `[tokens,
//! width]`).
//!
//! With AVX-512 the product runs in register tiles of up to 4 x-rows by 4 w-rows: each step
//! along `k` loads 8 vectors and issues 16 fused multiply-adds, so a weight row is read once
//! per 4 rows of `x` instead of once per row. With AVX2 and FMA (16 registers of 8 lanes)
//! the tiles are 4 x-rows by 3 w-rows (12 accumulators). Either way each output is one
//! accumulator summed along `k` in order and reduced in one fixed tree, so its bits do not
//! depend on the tile it falls in or on how many rows are multiplied. Without either,
//! portable dot products. Which path runs is decided per call from the CPU's features (the
//! detection is cached by the standard library).
//!
//! The rows `w` may be stored in f32, bf16 or f16 ([`Stored`]): narrower rows are widened
//! to f32 as they are loaded (exactly: every bf16 and f16 value is an f32 value), so the
//! products are the f32 products of the same numbers while half the bytes cross the
//! memory bus.

/// An element type weight rows can be stored in.
pub trait Stored: Copy + Send + Sync + 'static {
    /// Which one, for the vector loads (a constant per type, so each instantiation keeps
    /// its own load and nothing else).
    const KIND: StoredKind;
    fn to_f32(self) -> f32;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredKind {
    F32,
    Bf16,
    F16,
}

impl Stored for f32 {
    const KIND: StoredKind = StoredKind::F32;
    fn to_f32(self) -> f32 {
        self
    }
}

impl Stored for half::bf16 {
    const KIND: StoredKind = StoredKind::Bf16;
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

impl Stored for half::f16 {
    const KIND: StoredKind = StoredKind::F16;
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

/// `out[r * ldo + j] = x[r*k .. (r+1)*k] . w[j*k .. (j+1)*k]` for `r < m`, `j < n`.
///
/// Panics if a slice is shorter than the sizes say (callers size them from tensor shapes).
pub fn products<W: Stored>(
    x: &[f32],
    m: usize,
    w: &[W],
    n: usize,
    k: usize,
    out: &mut [f32],
    ldo: usize,
) {
    assert!(
        m == 0 || n == 0 || (n <= ldo && out.len() >= (m - 1) * ldo + n),
        "products: output shorter than m x ldo"
    );
    // SAFETY: `out` is exclusively borrowed and holds every position written.
    unsafe { products_to(x, m, w, n, k, k, out.as_mut_ptr(), ldo) }
}

/// [`products`] into a raw output, for parallel tasks that fill disjoint columns of one
/// buffer, with the rows of `w` `ldw >= k` apart (row `j` is `w[j*ldw .. j*ldw + k]`: the
/// first `k` columns of wider rows).
///
/// # Safety
/// `out.add(r * ldo + j)` must be valid for writes for every `r < m`, `j < n`, and nothing
/// else may access those positions during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn products_to<W: Stored>(
    x: &[f32],
    m: usize,
    w: &[W],
    n: usize,
    k: usize,
    ldw: usize,
    out: *mut f32,
    ldo: usize,
) {
    assert!(
        x.len() >= m * k && k <= ldw && (n == 0 || w.len() >= (n - 1) * ldw + k),
        "products: inputs shorter than m, n, k"
    );
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was just detected; the inputs were checked above and the
            // output is the caller's promise.
            unsafe { avx512::products(x, m, w, n, k, ldw, out, ldo) };
            return;
        }
        if avx2::detected() {
            // SAFETY: as above.
            unsafe { avx2::products(x, m, w, n, k, ldw, out, ldo) };
            return;
        }
    }
    // SAFETY: the caller's promise.
    unsafe { products_by_dot(x, m, w, n, k, ldw, out, ldo) }
}

/// Whether the products run in register tiles on this CPU: AVX-512, or AVX2 with FMA
/// (and F16C for f16 rows).
pub fn tiled() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") || avx2::detected()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`products_to`] one dot product per output: the path without register tiles.
///
/// # Safety
/// As for [`products_to`].
#[allow(clippy::too_many_arguments)]
unsafe fn products_by_dot<W: Stored>(
    x: &[f32],
    m: usize,
    w: &[W],
    n: usize,
    k: usize,
    ldw: usize,
    out: *mut f32,
    ldo: usize,
) {
    if let Some(w) = as_f32(w) {
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            for j in 0..n {
                // SAFETY: the caller's promise.
                unsafe { *out.add(r * ldo + j) = dot(xr, &w[j * ldw..j * ldw + k]) };
            }
        }
        return;
    }
    // Narrow rows: widened one row at a time, then the same dot products.
    let mut row = vec![0f32; k];
    for j in 0..n {
        for (d, v) in row.iter_mut().zip(&w[j * ldw..j * ldw + k]) {
            *d = v.to_f32();
        }
        for r in 0..m {
            // SAFETY: the caller's promise.
            unsafe { *out.add(r * ldo + j) = dot(&x[r * k..(r + 1) * k], &row) };
        }
    }
}

/// `w` as f32 values when that is how it is stored.
pub fn as_f32<W: Stored>(w: &[W]) -> Option<&[f32]> {
    match W::KIND {
        // SAFETY: `W` is f32 (the only `Stored` type of this kind), so the slice is
        // reinterpreted as itself.
        StoredKind::F32 => Some(unsafe { std::slice::from_raw_parts(w.as_ptr().cast(), w.len()) }),
        _ => None,
    }
}

/// Dot product: AVX-512 or 8-wide FMA where the CPU has them.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            let mut out = 0f32;
            // SAFETY: the feature was just detected; both slices hold `n` values.
            unsafe { avx512::products::<f32>(a, 1, b, 1, n, n, &mut out, 1) };
            return out;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were just detected.
            return unsafe { dot_avx2(&a[..n], &b[..n]) };
        }
    }
    dot_portable(&a[..n], &b[..n])
}

/// `out[r * width + d] = sum_j p[r * rows + j] * c[j * ldc + d]` for `r < m`, `d < width`:
/// `m` probability rows weighting the first `width` columns of `rows` rows of `c`.
///
/// Panics if a slice is shorter than the sizes say.
pub fn weighted_sum(
    p: &[f32],
    m: usize,
    c: &[f32],
    rows: usize,
    ldc: usize,
    width: usize,
    out: &mut [f32],
) {
    assert!(p.len() >= m * rows && out.len() >= m * width && width <= ldc);
    assert!(rows == 0 || c.len() >= (rows - 1) * ldc + width);
    // SAFETY: the asserts bound every access; `out` is exclusively borrowed.
    unsafe {
        weighted_to(
            p.as_ptr(),
            rows,
            m,
            c.as_ptr(),
            ldc,
            rows,
            width,
            out.as_mut_ptr(),
            width,
            false,
        )
    }
}

/// `out[r * ldo + d] (+)= sum_{j < n} a[r * lda + j] * b[j * ldb + d]` for `r < m`,
/// `d < width`: the product `a @ b` with `b` stored row-major (the layout whose rows are
/// not the dot-product rows of [`products`]). The sum over `j` runs in order; with
/// `accumulate` it continues from the values already in `out`, so splitting `n` into
/// consecutive chunks gives the same bits as one call.
///
/// # Safety
/// `a` must be valid for reads at `r * lda + j`, `b` at `j * ldb + d` and `out` for reads
/// and writes at `r * ldo + d` over those ranges, with nothing else writing them.
#[allow(clippy::too_many_arguments)]
pub unsafe fn weighted_to(
    a: *const f32,
    lda: usize,
    m: usize,
    b: *const f32,
    ldb: usize,
    n: usize,
    width: usize,
    out: *mut f32,
    ldo: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was just detected; the rest is the caller's promise.
            unsafe { avx512::weighted_to(a, lda, m, b, ldb, n, width, out, ldo, accumulate) };
            return;
        }
        if avx2::detected() {
            // SAFETY: as above.
            unsafe { avx2::weighted_to(a, lda, m, b, ldb, n, width, out, ldo, accumulate) };
            return;
        }
    }
    for r in 0..m {
        for d in 0..width {
            // SAFETY: the caller's promise.
            unsafe {
                let o = out.add(r * ldo + d);
                let mut acc = if accumulate { *o } else { 0.0 };
                for j in 0..n {
                    acc += *a.add(r * lda + j) * *b.add(j * ldb + d);
                }
                *o = acc;
            }
        }
    }
}

pub(super) fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
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
pub(super) unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
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

/// The register tiles with 8-lane AVX2 vectors, for CPUs without AVX-512.
///
/// Every output `x_r . w_j` is one accumulator of 8 lanes, lane `l` summing the products
/// at `k = l, l + 8, ...` in order (the tail masked to zeros), then the lanes summed in
/// one fixed tree, `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`. The tile shape
/// only decides how many outputs are computed side by side, so an output has the same
/// bits whatever the number of rows, the tile it falls in, or the thread that runs it.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::{Stored, StoredKind};
    use std::arch::x86_64::*;

    /// How far ahead (in bytes) of each weight row the tiles of the first rows of `x`
    /// prefetch: they stream the weights from memory; the later rows re-read them from
    /// cache, where prefetches would only take load slots.
    const PREFETCH_AHEAD_BYTES: usize = 4096;

    /// `TAIL[8 - len..16 - len]`: the load mask of the first `len` lanes.
    static TAIL: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];

    pub fn detected() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }

    /// The mask of the first `len <= 8` lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(in crate::model::cpu_kernels) unsafe fn tail_mask(len: usize) -> __m256i {
        _mm256_loadu_si256(TAIL.as_ptr().add(8 - len).cast())
    }

    /// See [`super::products_to`]; the caller has checked the features and the input
    /// lengths and guarantees the output.
    ///
    /// Four rows of `x` at a time (they stay in L1) against three weight rows at a time
    /// (twelve accumulators); fewer rows take wider tiles, up to eight weight rows for one
    /// row, so that enough independent sums are in flight.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn products<W: Stored>(
        x: &[f32],
        m: usize,
        w: &[W],
        n: usize,
        k: usize,
        ldw: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        let (xp, wp, op) = (x.as_ptr(), w.as_ptr(), out);
        let mut r = 0;
        while r < m {
            let prefetch = r == 0;
            let rb = (m - r).min(4);
            let widest = match rb {
                1 => 8,
                2 => 4,
                _ => 3,
            };
            let mut j = 0;
            while j < n {
                let jb = (n - j).min(widest);
                let (xt, wt, ot) = (xp.add(r * k), wp.add(j * ldw), op.add(r * ldo + j));
                macro_rules! run {
                    ($($R:literal, $J:literal);*) => {
                        match (rb, jb, prefetch) {
                            $(
                                ($R, $J, true) => tile::<W, $R, $J, true>(xt, wt, k, ldw, ot, ldo),
                                ($R, $J, false) => tile::<W, $R, $J, false>(xt, wt, k, ldw, ot, ldo),
                            )*
                            _ => unreachable!("tile sizes follow the row count"),
                        }
                    };
                }
                run!(4, 3; 4, 2; 4, 1; 3, 3; 3, 2; 3, 1; 2, 4; 2, 3; 2, 2; 2, 1;
                     1, 8; 1, 7; 1, 6; 1, 5; 1, 4; 1, 3; 1, 2; 1, 1);
                j += jb;
            }
            r += rb;
        }
    }

    /// One `R x J` tile: `R` rows of `x` against `J` rows of `w` (`ldw` apart), all `k`
    /// long.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<W: Stored, const R: usize, const J: usize, const PREFETCH: bool>(
        x: *const f32,
        w: *const W,
        k: usize,
        ldw: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); J]; R];
        let ahead = PREFETCH_AHEAD_BYTES / std::mem::size_of::<W>();
        let mut i = 0;
        while i + 8 <= k {
            let mut wv = [_mm256_setzero_ps(); J];
            for (jj, v) in wv.iter_mut().enumerate() {
                *v = load8(w.add(jj * ldw + i));
                if PREFETCH && i % 16 == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(jj * ldw + i + ahead).cast());
                }
            }
            for (rr, row) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(x.add(rr * k + i));
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(xv, *v, *a);
                }
            }
            i += 8;
        }
        if i < k {
            let mask = tail_mask(k - i);
            let mut wv = [_mm256_setzero_ps(); J];
            for (jj, v) in wv.iter_mut().enumerate() {
                *v = load_tail(w.add(jj * ldw + i), k - i);
            }
            for (rr, row) in acc.iter_mut().enumerate() {
                let xv = _mm256_maskload_ps(x.add(rr * k + i), mask);
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(xv, *v, *a);
                }
            }
        }
        let mut sums = [0f32; 16];
        let flat: [__m256; 16] = std::array::from_fn(|i| {
            if i < R * J {
                acc[i / J][i % J]
            } else {
                _mm256_setzero_ps()
            }
        });
        for eighth in 0..(R * J).div_ceil(8) {
            let v: [__m256; 8] = std::array::from_fn(|i| flat[eighth * 8 + i]);
            _mm256_storeu_ps(sums.as_mut_ptr().add(eighth * 8), sums8(v));
        }
        for rr in 0..R {
            for jj in 0..J {
                *out.add(rr * ldo + jj) = sums[rr * J + jj];
            }
        }
    }

    /// 8 stored values from `p`, widened to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8<W: Stored>(p: *const W) -> __m256 {
        match W::KIND {
            StoredKind::F32 => _mm256_loadu_ps(p.cast()),
            StoredKind::Bf16 => {
                // bf16 is the high half of an f32: zero-extend each to 32 bits and shift.
                let h = _mm_loadu_si128(p.cast());
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
            StoredKind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
        }
    }

    /// The first `len < 8` stored values from `p` widened to f32, the other lanes zero.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load_tail<W: Stored>(p: *const W, len: usize) -> __m256 {
        let mut lanes = [0f32; 8];
        for (i, l) in lanes.iter_mut().enumerate().take(len) {
            *l = (*p.add(i)).to_f32();
        }
        _mm256_loadu_ps(lanes.as_ptr())
    }

    /// The lane sums of eight vectors, each in the tree of the module comment, as one
    /// vector.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn sums8(v: [__m256; 8]) -> __m256 {
        // Per 128-bit half: pairs, then pairs of pairs; then the halves added.
        let a01 = _mm256_hadd_ps(v[0], v[1]);
        let a23 = _mm256_hadd_ps(v[2], v[3]);
        let a45 = _mm256_hadd_ps(v[4], v[5]);
        let a67 = _mm256_hadd_ps(v[6], v[7]);
        let b0 = _mm256_hadd_ps(a01, a23);
        let b1 = _mm256_hadd_ps(a45, a67);
        let lo = _mm256_permute2f128_ps::<0x20>(b0, b1);
        let hi = _mm256_permute2f128_ps::<0x31>(b0, b1);
        _mm256_add_ps(lo, hi)
    }

    /// See [`super::weighted_to`]; the caller has checked the features and the ranges.
    /// Four rows of `a` at a time, 16 columns of `b` (two vectors) per pass over its rows.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_to(
        a: *const f32,
        lda: usize,
        m: usize,
        b: *const f32,
        ldb: usize,
        n: usize,
        width: usize,
        out: *mut f32,
        ldo: usize,
        accumulate: bool,
    ) {
        let mut r = 0;
        while r < m {
            let rb = (m - r).min(4);
            let (ar, or) = (a.add(r * lda), out.add(r * ldo));
            match rb {
                4 => weighted_tile::<4>(ar, lda, b, ldb, n, width, or, ldo, accumulate),
                3 => weighted_tile::<3>(ar, lda, b, ldb, n, width, or, ldo, accumulate),
                2 => weighted_tile::<2>(ar, lda, b, ldb, n, width, or, ldo, accumulate),
                _ => weighted_tile::<1>(ar, lda, b, ldb, n, width, or, ldo, accumulate),
            }
            r += rb;
        }
    }

    /// `R` rows of `a` against the rows of `b`, 16 columns at a time (the last ones
    /// masked). Each output sums its `n` products in order, one fused multiply-add each.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn weighted_tile<const R: usize>(
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        n: usize,
        width: usize,
        out: *mut f32,
        ldo: usize,
        accumulate: bool,
    ) {
        let mut d = 0;
        while d < width {
            let lanes = (width - d).min(16);
            let masks = [tail_mask(lanes.min(8)), tail_mask(lanes.saturating_sub(8))];
            let full = lanes == 16;
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            if accumulate {
                for (rr, row) in acc.iter_mut().enumerate() {
                    for (v, av) in row.iter_mut().enumerate() {
                        *av = _mm256_maskload_ps(out.wrapping_add(rr * ldo + d + 8 * v), masks[v]);
                    }
                }
            }
            for j in 0..n {
                let row = b.add(j * ldb + d);
                let bv: [__m256; 2] = if full {
                    [_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8))]
                } else {
                    [
                        _mm256_maskload_ps(row, masks[0]),
                        _mm256_maskload_ps(row.wrapping_add(8), masks[1]),
                    ]
                };
                for (rr, acc_r) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*a.add(rr * lda + j));
                    for (acc_v, b_v) in acc_r.iter_mut().zip(&bv) {
                        *acc_v = _mm256_fmadd_ps(av, *b_v, *acc_v);
                    }
                }
            }
            for (rr, row) in acc.iter().enumerate() {
                for (v, av) in row.iter().enumerate() {
                    _mm256_maskstore_ps(out.wrapping_add(rr * ldo + d + 8 * v), masks[v], *av);
                }
            }
            d += lanes;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Stored, StoredKind};
    use std::arch::x86_64::*;

    /// How far ahead (in bytes) of each weight row the tile prefetches: 8 KB measured best
    /// on the expert products (2.16 -> 1.77 ms per MoE layer of the runtime benchmark at
    /// batch 32; 4 to 16 KB all help).
    const PREFETCH_AHEAD_BYTES: usize = 8192;

    /// See [`super::products_to`]; the caller has checked the feature and the input lengths
    /// and guarantees the output.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn products<W: Stored>(
        x: &[f32],
        m: usize,
        w: &[W],
        n: usize,
        k: usize,
        ldw: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        let (xp, wp, op) = (x.as_ptr(), w.as_ptr(), out);
        let mut j = 0;
        while j < n {
            let jb = (n - j).min(4);
            let mut r = 0;
            while r < m {
                let rb = (m - r).min(4);
                let (xt, wt, ot) = (xp.add(r * k), wp.add(j * ldw), op.add(r * ldo + j));
                macro_rules! run {
                    ($($R:literal, $J:literal);*) => {
                        match (rb, jb) {
                            $(($R, $J) => tile::<W, $R, $J>(xt, wt, k, ldw, ot, ldo),)*
                            _ => unreachable!("tile sizes are 1..=4"),
                        }
                    };
                }
                run!(4, 4; 4, 3; 4, 2; 4, 1; 3, 4; 3, 3; 3, 2; 3, 1;
                     2, 4; 2, 3; 2, 2; 2, 1; 1, 4; 1, 3; 1, 2; 1, 1);
                r += rb;
            }
            j += jb;
        }
    }

    /// See [`super::weighted_to`]; the caller has checked the feature and the ranges.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn weighted_to(
        a: *const f32,
        lda: usize,
        m: usize,
        b: *const f32,
        ldb: usize,
        n: usize,
        width: usize,
        out: *mut f32,
        ldo: usize,
        accumulate: bool,
    ) {
        let mut r = 0;
        while r < m {
            let rb = (m - r).min(4);
            let (ar, or) = (a.add(r * lda), out.add(r * ldo));
            match rb {
                4 => weighted_tile::<4>(ar, lda, b, ldb, n, width, or, ldo, accumulate),
                3 => weighted_tile::<3>(ar, lda, b, ldb, n, width, or, ldo, accumulate),
                2 => weighted_tile::<2>(ar, lda, b, ldb, n, width, or, ldo, accumulate),
                _ => weighted_tile::<1>(ar, lda, b, ldb, n, width, or, ldo, accumulate),
            }
            r += rb;
        }
    }

    /// `R` rows of `a` against the rows of `b`, 64 columns (4 vectors per row) at a time
    /// with the last vector masked.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn weighted_tile<const R: usize>(
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        n: usize,
        width: usize,
        out: *mut f32,
        ldo: usize,
        accumulate: bool,
    ) {
        let mut d = 0;
        while d < width {
            let lanes = (width - d).min(64);
            let masks: [__mmask16; 4] = std::array::from_fn(|v| {
                let have = lanes.saturating_sub(16 * v).min(16);
                ((1u32 << have) - 1) as u16
            });
            let mut acc = [[_mm512_setzero_ps(); 4]; R];
            if accumulate {
                for (rr, row) in acc.iter_mut().enumerate() {
                    for (v, av) in row.iter_mut().enumerate() {
                        *av = _mm512_maskz_loadu_ps(masks[v], out.add(rr * ldo + d + 16 * v));
                    }
                }
            }
            for j in 0..n {
                let row = b.add(j * ldb + d);
                let bv: [__m512; 4] =
                    std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], row.add(16 * v)));
                for (rr, row) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(rr * lda + j));
                    for (acc_v, b_v) in row.iter_mut().zip(&bv) {
                        *acc_v = _mm512_fmadd_ps(av, *b_v, *acc_v);
                    }
                }
            }
            for (rr, row) in acc.iter().enumerate() {
                for (v, av) in row.iter().enumerate() {
                    _mm512_mask_storeu_ps(out.add(rr * ldo + d + 16 * v), masks[v], *av);
                }
            }
            d += lanes;
        }
    }

    /// One `R x J` tile: `R` rows of `x` against `J` rows of `w` (`ldw` apart), all `k`
    /// long. 16 lanes at
    /// a time with the tail masked.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<W: Stored, const R: usize, const J: usize>(
        x: *const f32,
        w: *const W,
        k: usize,
        ldw: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); J]; R];
        let mut i = 0;
        while i + 16 <= k {
            let mut wv = [_mm512_setzero_ps(); J];
            for (jj, v) in wv.iter_mut().enumerate() {
                *v = load16(w.add(jj * ldw + i));
                // Weight rows stream from memory: ask for the line 8 KB ahead of each.
                let ahead = PREFETCH_AHEAD_BYTES / std::mem::size_of::<W>();
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(jj * ldw + i + ahead).cast());
            }
            for (rr, row) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(x.add(rr * k + i));
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xv, *v, *a);
                }
            }
            i += 16;
        }
        if i < k {
            let mask: __mmask16 = ((1u32 << (k - i)) - 1) as u16;
            let mut wv = [_mm512_setzero_ps(); J];
            for (jj, v) in wv.iter_mut().enumerate() {
                *v = load_tail(w.add(jj * ldw + i), k - i);
            }
            for (rr, row) in acc.iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_ps(mask, x.add(rr * k + i));
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xv, *v, *a);
                }
            }
        }
        // Horizontal sums, eight accumulators at a time.
        let mut sums = [0f32; 16];
        let flat: [__m512; 16] = std::array::from_fn(|i| {
            if i < R * J {
                acc[i / J][i % J]
            } else {
                _mm512_setzero_ps()
            }
        });
        for half in 0..(R * J).div_ceil(8) {
            let v: [__m512; 8] = std::array::from_fn(|i| flat[half * 8 + i]);
            _mm256_storeu_ps(sums.as_mut_ptr().add(half * 8), sums8(v));
        }
        for rr in 0..R {
            for jj in 0..J {
                *out.add(rr * ldo + jj) = sums[rr * J + jj];
            }
        }
    }

    /// 16 stored values from `p`, widened to f32.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16<W: Stored>(p: *const W) -> __m512 {
        match W::KIND {
            StoredKind::F32 => _mm512_loadu_ps(p.cast()),
            StoredKind::Bf16 => {
                // bf16 is the high half of an f32: zero-extend each to 32 bits and shift.
                let h = _mm256_loadu_si256(p.cast());
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
            StoredKind::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
        }
    }

    /// The first `len < 16` stored values from `p` widened to f32, the other lanes zero.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_tail<W: Stored>(p: *const W, len: usize) -> __m512 {
        let mut lanes = [0f32; 16];
        for (i, l) in lanes.iter_mut().enumerate().take(len) {
            *l = (*p.add(i)).to_f32();
        }
        _mm512_loadu_ps(lanes.as_ptr())
    }

    /// The horizontal sums of eight vectors, in order, as one 8-lane vector.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn sums8(v: [__m512; 8]) -> __m256 {
        // 16 lanes -> 8 by adding the halves, then a transposing tree of pairwise adds.
        let h: [__m256; 8] = std::array::from_fn(|i| {
            let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v[i])));
            _mm256_add_ps(_mm512_castps512_ps256(v[i]), high)
        });
        let a01 = _mm256_hadd_ps(h[0], h[1]);
        let a23 = _mm256_hadd_ps(h[2], h[3]);
        let a45 = _mm256_hadd_ps(h[4], h[5]);
        let a67 = _mm256_hadd_ps(h[6], h[7]);
        // Per 128-bit lane: [s0 s1 s2 s3] and [s4 s5 s6 s7] (low and high lane halves).
        let b0 = _mm256_hadd_ps(a01, a23);
        let b1 = _mm256_hadd_ps(a45, a67);
        let lo = _mm256_permute2f128_ps::<0x20>(b0, b1);
        let hi = _mm256_permute2f128_ps::<0x31>(b0, b1);
        _mm256_add_ps(lo, hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Products in f64, one pair at a time: the reference.
    fn reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[j * k + i] as f64)
                    .sum();
                out[r * n + j] = s as f32;
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn products_match_reference_on_every_tile_shape_and_tail() {
        // m and n cover every tile size (1..=4 and more), k every tail length mod 16.
        for m in [1, 2, 3, 4, 5, 7, 9] {
            for n in [1, 2, 3, 4, 6, 11] {
                for k in [1, 5, 15, 16, 17, 33, 64, 100] {
                    let (x, w) = (values(m * k, 1), values(n * k, 2));
                    let want = reference(&x, m, &w, n, k);
                    let mut got = vec![f32::NAN; m * n];
                    products(&x, m, &w, n, k, &mut got, n);
                    let mut by_dot = vec![f32::NAN; m * n];
                    // SAFETY: `by_dot` holds m x n values.
                    unsafe { products_by_dot(&x, m, &w, n, k, k, by_dot.as_mut_ptr(), n) };
                    for ((g, d), e) in got.iter().zip(&by_dot).zip(&want) {
                        assert!(
                            (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                            "{m}x{n}x{k}: {g} vs {e}"
                        );
                        assert!(
                            (d - e).abs() <= 1e-4 * (1.0 + e.abs()),
                            "{m}x{n}x{k}: {d} vs {e}"
                        );
                    }
                }
            }
        }
    }

    /// The bits of `products` with rows stored as `W` and with the same values in f32, on
    /// the tiled path and the dot-product path.
    fn narrow_and_wide<W: Stored>(narrow: impl Fn(f32) -> W) {
        for (m, n, k) in [
            (1, 5, 512),
            (4, 4, 64),
            (5, 7, 33),
            (3, 2, 15),
            (9, 11, 100),
        ] {
            let x = values(m * k, 11);
            let w: Vec<W> = values(n * k, 12).into_iter().map(&narrow).collect();
            let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            let (mut got, mut want) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            products(&x, m, &w, n, k, &mut got, n);
            products(&x, m, &wide, n, k, &mut want, n);
            assert_eq!(bits(&got), bits(&want), "{m}x{n}x{k}");
            // SAFETY: both buffers hold m x n values.
            unsafe {
                products_by_dot(&x, m, &w, n, k, k, got.as_mut_ptr(), n);
                products_by_dot(&x, m, &wide, n, k, k, want.as_mut_ptr(), n);
            }
            assert_eq!(bits(&got), bits(&want), "by dot {m}x{n}x{k}");
        }
    }

    /// The AVX2 tiles' sum for one output, lane by lane with fused multiply-adds, then
    /// the lanes in the fixed tree.
    fn avx2_order(x: &[f32], w: &[f32]) -> f32 {
        let mut lanes = [0f32; 8];
        for (i, (a, b)) in x.iter().zip(w).enumerate() {
            lanes[i % 8] = a.mul_add(*b, lanes[i % 8]);
        }
        let l = lanes;
        ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
    }

    #[test]
    fn avx2_tiles_sum_every_output_in_one_order_whatever_the_rows() {
        #[cfg(target_arch = "x86_64")]
        let avx2_path = !std::arch::is_x86_feature_detected!("avx512f") && avx2::detected();
        #[cfg(not(target_arch = "x86_64"))]
        let avx2_path = false;
        if !avx2_path {
            eprintln!("skipped: the AVX2 tiles are not this CPU's path");
            return;
        }
        // Every row count takes different tile shapes (4x3, 3x3, 2x4, 1x8 and their
        // column tails); every output must be the same bits as the one-order reference.
        for k in [1, 7, 8, 9, 31, 64, 100, 513] {
            let n = 23;
            let w = values(n * k, 21);
            let x = values(13 * k, 22);
            for m in [1, 2, 3, 4, 5, 6, 7, 13] {
                let mut got = vec![f32::NAN; m * n];
                products(&x, m, &w, n, k, &mut got, n);
                for r in 0..m {
                    for j in 0..n {
                        let want = avx2_order(&x[r * k..(r + 1) * k], &w[j * k..(j + 1) * k]);
                        assert_eq!(
                            got[r * n + j].to_bits(),
                            want.to_bits(),
                            "{m}x{n}x{k} {r},{j}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn weighted_rows_get_the_same_bits_in_any_row_count() {
        let (n, width, ld) = (29, 37, 40);
        let (a, b) = (values(9 * n, 31), values(n * ld, 32));
        let mut all = vec![0f32; 9 * width];
        weighted_sum(&a, 9, &b, n, ld, width, &mut all);
        for r in 0..9 {
            let mut one = vec![0f32; width];
            weighted_sum(&a[r * n..(r + 1) * n], 1, &b, n, ld, width, &mut one);
            assert_eq!(one, all[r * width..(r + 1) * width], "row {r}");
        }
    }

    #[test]
    fn narrow_rows_give_the_products_of_their_f32_values() {
        narrow_and_wide(half::bf16::from_f32);
        narrow_and_wide(half::f16::from_f32);
        // The widening itself, on values whose f32 form is known.
        assert_eq!(half::bf16::from_bits(0x3fc0).to_f32(), 1.5);
        assert_eq!(half::f16::from_bits(0xc100).to_f32(), -2.5);
    }

    #[test]
    fn products_respect_the_output_stride() {
        let (m, n, k) = (3, 5, 20);
        let (x, w) = (values(m * k, 3), values(n * k, 4));
        let ldo = 8;
        let mut got = vec![-7f32; (m - 1) * ldo + n];
        products(&x, m, &w, n, k, &mut got, ldo);
        let want = reference(&x, m, &w, n, k);
        for r in 0..m {
            for j in 0..ldo {
                if r * ldo + j >= got.len() {
                    break;
                }
                let g = got[r * ldo + j];
                if j < n {
                    assert!((g - want[r * n + j]).abs() < 1e-4);
                } else {
                    assert_eq!(g, -7.0, "wrote outside the tile at {r},{j}");
                }
            }
        }
    }

    #[test]
    fn products_read_the_first_k_columns_of_wider_rows() {
        // Rows of w 29 apart, of which the first 20 (from an offset of 3) are the ones
        // multiplied: the same bits as the packed rows, on every path.
        let (m, n, k, ldw, offset) = (5, 7, 20, 29, 3);
        let x = values(m * k, 5);
        let wide = values(offset + n * ldw, 6);
        let packed: Vec<f32> = (0..n)
            .flat_map(|j| wide[offset + j * ldw..offset + j * ldw + k].to_vec())
            .collect();
        let mut want = vec![0f32; m * n];
        products(&x, m, &packed, n, k, &mut want, n);
        let mut got = vec![0f32; m * n];
        // SAFETY: `got` holds m x n values.
        unsafe { products_to(&x, m, &wide[offset..], n, k, ldw, got.as_mut_ptr(), n) };
        assert_eq!(got, want);
        let mut by_dot = vec![0f32; m * n];
        let mut packed_by_dot = vec![0f32; m * n];
        // SAFETY: as above.
        unsafe {
            products_by_dot(&x, m, &wide[offset..], n, k, ldw, by_dot.as_mut_ptr(), n);
            products_by_dot(&x, m, &packed, n, k, k, packed_by_dot.as_mut_ptr(), n);
        }
        assert_eq!(by_dot, packed_by_dot);
    }

    #[test]
    fn dot_matches_hand_case_and_every_path() {
        let a: Vec<f32> = (0..37).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..37).map(|i| (i % 3) as f32).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert_eq!(dot(&a, &b), want);
        assert_eq!(dot_portable(&a, &b), want);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            assert_eq!(unsafe { dot_avx2(&a, &b) }, want);
        }
    }

    #[test]
    fn weighted_to_in_chunks_equals_one_call_and_strides_hold() {
        let (m, n, width, lda, ldb, ldo) = (6, 37, 70, 40, 75, 72);
        let (a, b) = (values(m * lda, 7), values(n * ldb, 8));
        let mut whole = vec![0f32; m * ldo];
        let mut parts = vec![0f32; m * ldo];
        // SAFETY: the buffers hold every position the calls touch.
        unsafe {
            weighted_to(
                a.as_ptr(),
                lda,
                m,
                b.as_ptr(),
                ldb,
                n,
                width,
                whole.as_mut_ptr(),
                ldo,
                false,
            );
            let mut j0 = 0;
            for chunk in [10, 1, 26] {
                weighted_to(
                    a.as_ptr().add(j0),
                    lda,
                    m,
                    b.as_ptr().add(j0 * ldb),
                    ldb,
                    chunk,
                    width,
                    parts.as_mut_ptr(),
                    ldo,
                    j0 > 0,
                );
                j0 += chunk;
            }
        }
        assert_eq!(whole, parts);
        for r in 0..m {
            for d in 0..ldo {
                let got = whole[r * ldo + d];
                if d >= width {
                    assert_eq!(got, 0.0, "wrote outside the width at {r},{d}");
                    continue;
                }
                let want: f64 = (0..n)
                    .map(|j| a[r * lda + j] as f64 * b[j * ldb + d] as f64)
                    .sum();
                assert!((got as f64 - want).abs() < 1e-4, "{r},{d}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn weighted_sum_matches_reference() {
        for m in [1, 2, 3, 4, 5, 8] {
            for rows in [1, 2, 7, 40] {
                for (ldc, width) in [(1, 1), (20, 17), (160, 128), (80, 70), (64, 64)] {
                    let (p, c) = (values(m * rows, 5), values(rows * ldc, 6));
                    let mut got = vec![f32::NAN; m * width];
                    weighted_sum(&p, m, &c, rows, ldc, width, &mut got);
                    for r in 0..m {
                        for d in 0..width {
                            let e: f64 = (0..rows)
                                .map(|j| p[r * rows + j] as f64 * c[j * ldc + d] as f64)
                                .sum();
                            let g = got[r * width + d];
                            assert!(
                                (g as f64 - e).abs() < 1e-4,
                                "{m} {rows} {width}: {g} vs {e}"
                            );
                        }
                    }
                }
            }
        }
    }
}
