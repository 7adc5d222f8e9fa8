//! The element-wise math of the CPU kernels: the SwiGLU gate `silu(g) * u` of the grouped
//! experts and the softmax rows of attention, eight lanes at a time with AVX2 and FMA.
//!
//! The vector `exp` is the classic range reduction `x = n ln 2 + r` (`|r| <= ln 2 / 2`,
//! `ln 2` split in two parts) with a degree-6 polynomial for `e^r` and `2^n` built in the
//! exponent bits: within 2 ulp of `exp` over the clamped range `[-87.3, 88]` (checked
//! against f64 below). Every value goes through the same vector code, a row's tail padded
//! to a full vector, so a value's bits do not depend on where in a row it falls or how
//! long the row is. Without AVX2 and FMA, the scalar formulas with the standard `exp`.

/// `out[i] = gate[i] / (1 + exp(-gate[i])) * up[i]` over `out.len()` values.
///
/// Panics if `gate` or `up` is shorter than `out`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = out.len();
    let (gate, up) = (&gate[..n], &up[..n]);
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::detected() {
            // SAFETY: the features were just detected; the slices are all `n` long.
            unsafe { avx2::silu_mul(gate, up, out) };
            return;
        }
    }
    for ((o, &a), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = a / (1.0 + (-a).exp()) * u;
    }
}

/// `row[j] = exp(scale * row[j] - m) / sum_i exp(scale * row[i] - m)` with `m` the
/// largest `scale * row[j]`; an empty row stays empty.
pub fn softmax_scaled(row: &mut [f32], scale: f32) {
    if row.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::detected() {
            // SAFETY: the features were just detected.
            unsafe { avx2::softmax_scaled(row, scale) };
            return;
        }
    }
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = (*v * scale - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::simd::avx2::tail_mask as mask;
    use std::arch::x86_64::*;

    pub fn detected() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }

    /// `e^x` per lane; inputs are clamped to `[-87.3, 88]`, where `2^n` stays a normal
    /// float (below, the result is about `1e-38` instead of smaller).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp8(x: __m256) -> __m256 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        // ln 2 = LN2_HI + LN2_LO, LN2_HI with few enough bits that n * LN2_HI is exact.
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        // e^r - 1 - r = r^2 * P(r) on |r| <= ln 2 / 2.
        const P: [f32; 6] = [
            1.987_569_1e-4,
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ];
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
            _mm256_set1_ps(88.0),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(P[0]);
        for &c in &P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(two_n))
    }

    /// See [`super::silu_mul`]; the slices are equally long.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = out.len();
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let m = mask((n - i).min(8));
            let (gp, up_, op) = (gate.as_ptr().add(i), up.as_ptr().add(i), out.as_mut_ptr());
            let a = _mm256_maskload_ps(gp, m);
            let u = _mm256_maskload_ps(up_, m);
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), a));
            let y = _mm256_mul_ps(_mm256_div_ps(a, _mm256_add_ps(one, e)), u);
            _mm256_maskstore_ps(op.add(i), m, y);
            i += 8;
        }
    }

    /// The lane sum in the tree `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn lane_sum(v: __m256) -> f32 {
        let pairs = _mm256_hadd_ps(v, v); // [l01 l23 l01 l23 | l45 l67 l45 l67]
        let quads = _mm256_hadd_ps(pairs, pairs); // [l0123 .. | l4567 ..]
        let lo = _mm256_castps256_ps128(quads);
        let hi = _mm256_extractf128_ps::<1>(quads);
        _mm_cvtss_f32(_mm_add_ss(lo, hi))
    }

    /// See [`super::softmax_scaled`]; `row` is not empty.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax_scaled(row: &mut [f32], scale: f32) {
        let n = row.len();
        let p = row.as_mut_ptr();
        let s = _mm256_set1_ps(scale);
        let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
        // The largest scaled value (the tail lanes padded with -inf).
        let mut mx = neg_inf;
        let mut i = 0;
        while i < n {
            let m = mask((n - i).min(8));
            let v = _mm256_mul_ps(_mm256_maskload_ps(p.add(i), m), s);
            mx = _mm256_max_ps(mx, _mm256_blendv_ps(neg_inf, v, _mm256_castsi256_ps(m)));
            i += 8;
        }
        let half = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps::<1>(mx));
        let half = _mm_max_ps(half, _mm_movehl_ps(half, half));
        let max = _mm_cvtss_f32(_mm_max_ss(half, _mm_shuffle_ps::<1>(half, half)));
        // The exponentials, summed per lane (the tail lanes zeroed).
        let max_v = _mm256_set1_ps(max);
        let mut sum = _mm256_setzero_ps();
        let mut i = 0;
        while i < n {
            let m = mask((n - i).min(8));
            let v = _mm256_mul_ps(_mm256_maskload_ps(p.add(i), m), s);
            let e = _mm256_and_ps(exp8(_mm256_sub_ps(v, max_v)), _mm256_castsi256_ps(m));
            _mm256_maskstore_ps(p.add(i), m, e);
            sum = _mm256_add_ps(sum, e);
            i += 8;
        }
        let inv = _mm256_set1_ps(1.0 / lane_sum(sum));
        let mut i = 0;
        while i < n {
            let m = mask((n - i).min(8));
            let e = _mm256_maskload_ps(p.add(i), m);
            _mm256_maskstore_ps(p.add(i), m, _mm256_mul_ps(e, inv));
            i += 8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Units in the last place between `got` and the f32 nearest `want`.
    fn ulps(got: f32, want: f64) -> u32 {
        (got.to_bits() as i64 - (want as f32).to_bits() as i64).unsigned_abs() as u32
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_is_within_2_ulp_of_exp() {
        use std::arch::x86_64::*;
        if !avx2::detected() {
            return;
        }
        // A dense sweep of the clamped range, and the values around the clamps.
        let xs: Vec<f32> = (0..200_000)
            .map(|i| -87.3 + i as f32 * (175.3 / 200_000.0))
            .chain([-87.3, -20.0, -1e-7, 0.0, 1e-7, 0.5, 1.0, 88.0])
            .collect();
        for chunk in xs.chunks(8) {
            let mut lanes = [0f32; 8];
            lanes[..chunk.len()].copy_from_slice(chunk);
            let mut got = [0f32; 8];
            // SAFETY: the features were detected above.
            unsafe {
                _mm256_storeu_ps(
                    got.as_mut_ptr(),
                    avx2::exp8(_mm256_loadu_ps(lanes.as_ptr())),
                )
            };
            for (&x, &g) in chunk.iter().zip(&got) {
                let u = ulps(g, (x as f64).exp());
                assert!(u <= 2, "exp({x}) = {g}, {u} ulp from {}", (x as f64).exp());
            }
        }
        // Below the clamp the result stays tiny and positive.
        let mut low = [0f32; 8];
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(low.as_mut_ptr(), avx2::exp8(_mm256_set1_ps(-1000.0))) };
        assert!(low[0] > 0.0 && low[0] < 1e-37);
    }

    #[test]
    fn silu_mul_matches_f64_and_ignores_position() {
        let gate: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.7).collect();
        let up: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.05).collect();
        let mut out = vec![0f32; 37];
        silu_mul(&gate, &up, &mut out);
        for i in 0..37 {
            let (a, u) = (gate[i] as f64, up[i] as f64);
            let want = a / (1.0 + (-a).exp()) * u;
            assert!((out[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3));
        }
        // Each value alone, at another offset, or in the tail: the same bits.
        for i in 0..37 {
            let mut one = [0f32; 1];
            silu_mul(&gate[i..], &up[i..], &mut one);
            assert_eq!(one[0].to_bits(), out[i].to_bits(), "value {i}");
        }
        // A hand case: silu(0) = 0, silu(x) * 1 -> x for large x.
        let mut o = [0f32; 2];
        silu_mul(&[0.0, 40.0], &[3.0, 1.0], &mut o);
        assert_eq!(o, [0.0, 40.0]);
    }

    #[test]
    fn softmax_rows_match_f64_for_every_length() {
        for len in [1usize, 3, 8, 9, 16, 17, 130] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) * 1.3)
                .collect();
            let scale = 0.37;
            let mut got = row.clone();
            softmax_scaled(&mut got, scale);
            let m = row
                .iter()
                .map(|&v| v as f64 * scale as f64)
                .fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = row
                .iter()
                .map(|&v| (v as f64 * scale as f64 - m).exp())
                .collect();
            let z: f64 = e.iter().sum();
            for (g, w) in got.iter().zip(&e) {
                assert!(
                    (*g as f64 - w / z).abs() < 1e-6,
                    "len {len}: {g} vs {}",
                    w / z
                );
            }
            let total: f32 = got.iter().sum();
            assert!((total - 1.0).abs() < 1e-5);
        }
        // One value: probability 1; a very negative neighbour: probability ~0.
        let mut one = [5.0f32];
        softmax_scaled(&mut one, 2.0);
        assert_eq!(one, [1.0]);
        let mut two = [0.0f32, -1e30];
        softmax_scaled(&mut two, 1.0);
        assert_eq!(two[0], 1.0);
        assert!(two[1] < 1e-37);
        let mut empty: [f32; 0] = [];
        softmax_scaled(&mut empty, 1.0);
    }
}
