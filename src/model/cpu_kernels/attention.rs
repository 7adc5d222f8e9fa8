//! Multi-head latent attention of a whole ragged batch in one parallel call: every new token
//! of every sequence against its own sequence's latent cache, causal within a chunk.
//!
//! Per token and group of heads: scores `q_h . [c_kv | k_pe]_j` (the rows of the cache are
//! the "weight rows" of [`products`], so up to 4 heads share each cache row read), softmax,
//! then the probability-weighted sum of the `c_kv` parts. Nothing score-sized outlives a
//! task, so a long prompt needs no `[tokens * heads, tokens]` buffer.

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

use super::cpu_f32;
use super::simd::{products, weighted_sum};

/// One sequence of the batch: its new tokens are rows `start .. start + len` of the
/// queries, and `kv` (`[past + len, width]`, the new tokens' rows already appended) is its
/// latent cache.
pub struct LatentSeq<'a> {
    pub start: usize,
    pub len: usize,
    pub kv: &'a Tensor,
}

/// Most heads per task: the query rows that share one pass over the cache.
const HEAD_GROUP: usize = 4;

/// `q`: `[n, heads, width]` (latent-absorbed queries `[q_lat | q_pe]`, `width = kv_rank +
/// rope`), f32 on the CPU. Returns `[n * heads, kv_rank]`: for each token and head,
/// `sum_j softmax_j(scale * q . kv_j) * c_kv_j` over the cache rows the token may see
/// (all of the past, and the new tokens up to itself).
pub fn latent_attention(
    q: &Tensor,
    seqs: &[LatentSeq<'_>],
    kv_rank: usize,
    scale: f64,
) -> Result<Tensor> {
    let (n, heads, width) = q.dims3()?;
    if kv_rank > width {
        candle_core::bail!("latent attention: kv rank {kv_rank} exceeds width {width}");
    }
    let q = q.contiguous()?;
    let (q_storage, q_layout) = q.storage_and_layout();
    let q_all = cpu_f32(&q_storage, q_layout, n * heads * width)?;

    // Each sequence's cache rows, and the token -> sequence table.
    let kvs: Vec<Tensor> = seqs
        .iter()
        .map(|s| s.kv.contiguous())
        .collect::<Result<_>>()?;
    let guards: Vec<_> = kvs.iter().map(|t| t.storage_and_layout()).collect();
    let mut caches: Vec<&[f32]> = Vec::with_capacity(seqs.len());
    let mut owner = vec![usize::MAX; n];
    for (si, (s, (storage, layout))) in seqs.iter().zip(&guards).enumerate() {
        let (rows, w) = kvs[si].dims2()?;
        if w != width || rows < s.len || s.start + s.len > n {
            candle_core::bail!(
                "latent attention: sequence {si} has cache [{rows}, {w}] for {} new rows at {} \
                 of {n} (width {width})",
                s.len,
                s.start
            );
        }
        caches.push(cpu_f32(storage, layout, rows * width)?);
        owner[s.start..s.start + s.len].fill(si);
    }
    if owner.contains(&usize::MAX) {
        candle_core::bail!("latent attention: sequences do not cover all {n} query rows");
    }

    // Heads per task: the largest divisor of `heads` up to HEAD_GROUP, so that every task
    // fills one contiguous chunk of the output.
    let g = (1..=HEAD_GROUP.min(heads))
        .rev()
        .find(|g| heads % g == 0)
        .unwrap_or(1);
    let groups = heads / g;
    let mut out = vec![0f32; n * heads * kv_rank];
    let scale = scale as f32;
    out.par_chunks_mut(g * kv_rank)
        .enumerate()
        .for_each_init(Vec::new, |scores, (task, o)| {
            let (token, h0) = (task / groups, (task % groups) * g);
            let si = owner[token];
            let (s, cache) = (&seqs[si], caches[si]);
            // The token's position is past + (token - start); it sees keys up to itself.
            let past = cache.len() / width - s.len;
            let visible = past + token - s.start + 1;
            let qs = &q_all[(token * heads + h0) * width..(token * heads + h0 + g) * width];
            scores.clear();
            scores.resize(g * visible, 0.0);
            products(qs, g, cache, visible, width, scores, visible);
            for row in scores.chunks_exact_mut(visible) {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
                let mut sum = 0f32;
                for v in row.iter_mut() {
                    *v = (*v * scale - max).exp();
                    sum += *v;
                }
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|v| *v *= inv);
            }
            weighted_sum(scores, g, cache, visible, width, kv_rank, o);
        });
    Tensor::from_vec(out, (n * heads, kv_rank), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Causal softmax attention in f64, one (token, head) at a time.
    fn reference(
        q: &[f32],
        heads: usize,
        width: usize,
        kv_rank: usize,
        seqs: &[(usize, usize, Vec<f32>)],
        scale: f64,
    ) -> Vec<f32> {
        let n: usize = seqs.iter().map(|s| s.1).sum();
        let mut out = vec![0f32; n * heads * kv_rank];
        for (start, len, cache) in seqs {
            let past = cache.len() / width - len;
            for i in 0..*len {
                let t = start + i;
                for h in 0..heads {
                    let qv = &q[(t * heads + h) * width..][..width];
                    let scores: Vec<f64> = (0..=past + i)
                        .map(|j| {
                            let kv = &cache[j * width..][..width];
                            scale
                                * qv.iter()
                                    .zip(kv)
                                    .map(|(a, b)| *a as f64 * *b as f64)
                                    .sum::<f64>()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..kv_rank {
                        let v: f64 = e
                            .iter()
                            .enumerate()
                            .map(|(j, p)| p / z * cache[j * width + d] as f64)
                            .sum();
                        out[(t * heads + h) * kv_rank + d] = v as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn ragged_batch_matches_causal_reference() {
        let dev = Device::Cpu;
        let (width, kv_rank, scale) = (24, 16, 0.3);
        // Decode tokens with long and empty pasts, a prefill chunk, a chunk on a past.
        for heads in [1, 3, 6, 8] {
            let shapes = [(5usize, 1usize), (0, 4), (0, 1), (7, 3)];
            let mut seqs = Vec::new();
            let mut start = 0;
            for (si, (past, len)) in shapes.iter().enumerate() {
                let cache = Tensor::randn(0f32, 1., (past + len, width), &dev).unwrap();
                seqs.push((start, *len, cache, si));
                start += len;
            }
            let n = start;
            let q = Tensor::randn(0f32, 1., (n, heads, width), &dev).unwrap();
            let batch: Vec<LatentSeq<'_>> = seqs
                .iter()
                .map(|(start, len, kv, _)| LatentSeq {
                    start: *start,
                    len: *len,
                    kv,
                })
                .collect();
            let got: Vec<f32> = latent_attention(&q, &batch, kv_rank, scale)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let plain: Vec<(usize, usize, Vec<f32>)> = seqs
                .iter()
                .map(|(s, l, kv, _)| (*s, *l, kv.flatten_all().unwrap().to_vec1().unwrap()))
                .collect();
            let q_host: Vec<f32> = q.flatten_all().unwrap().to_vec1().unwrap();
            let want = reference(&q_host, heads, width, kv_rank, &plain, scale);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "heads {heads}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn single_key_returns_its_latent_and_bad_batches_are_refused() {
        let dev = Device::Cpu;
        // One token, nothing in the past: the softmax is 1 on its own row.
        let kv = Tensor::new(&[[1f32, 2., 3., 4.]], &dev).unwrap();
        let q = Tensor::new(&[[[0.5f32, -1., 2., 0.]]], &dev).unwrap();
        let seqs = [LatentSeq {
            start: 0,
            len: 1,
            kv: &kv,
        }];
        let got: Vec<f32> = latent_attention(&q, &seqs, 3, 1.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got, vec![1., 2., 3.]);
        // Sequences that leave a query row uncovered, or a cache of the wrong width.
        let q2 = Tensor::zeros((2, 1, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(latent_attention(&q2, &seqs, 3, 1.0).is_err());
        let narrow = Tensor::zeros((1, 3), candle_core::DType::F32, &dev).unwrap();
        let bad = [LatentSeq {
            start: 0,
            len: 1,
            kv: &narrow,
        }];
        assert!(latent_attention(&q, &bad, 3, 1.0).is_err());
    }
}
