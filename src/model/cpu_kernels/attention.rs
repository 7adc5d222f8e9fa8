//! Attention of a whole ragged batch in one parallel call: every new token of every
//! sequence against its own sequence's caches, causal within a chunk. The cache rows hold
//! both the keys and the values: MLA's latent rows `[c_kv | k_pe]` (keys: the whole row;
//! values: the `c_kv` part), or grouped-query attention's `[v | k]` rows, one cache per
//! key/value head.
//!
//! Per token and group of heads: scores `q_h . key_j` (the cache rows are the "weight
//! rows" of [`products_to`], so up to 4 heads share each cache row read), softmax, then the
//! probability-weighted sum of the value parts. Nothing score-sized outlives a task, so a
//! long prompt needs no `[tokens * heads, tokens]` buffer.

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

use super::activations::softmax_scaled;
use super::cpu_f32;
use super::simd::{products_to, weighted_sum};

/// One sequence of the batch: its new tokens are rows `start .. start + len` of the
/// queries, and `kv` its caches, one per key/value head (MLA: one for every head), each
/// `[past + len, width]` with the new tokens' rows already appended.
pub struct LatentSeq<'a> {
    pub start: usize,
    pub len: usize,
    pub kv: &'a [Tensor],
}

/// Most heads per task: the query rows that share one pass over the cache.
const HEAD_GROUP: usize = 4;

/// Where the keys and values are in a cache row.
#[derive(Debug, Clone, Copy)]
pub struct RowParts {
    /// The keys are columns `key_offset .. key_offset + q width` of a row.
    pub key_offset: usize,
    /// The values are columns `0 .. value_width`.
    pub value_width: usize,
}

/// `q`: `[n, heads, q width]`, f32 on the CPU; head `h` reads cache `h / (heads / caches)`
/// of its sequence. Returns `[n * heads, value_width]`: for each token and head,
/// `sum_j softmax_j(scale * q . key_j) * value_j` over the cache rows the token may see
/// (all of the past, and the new tokens up to itself). MLA: keys at offset 0 over the
/// whole row, values the first `kv_rank` columns.
pub fn latent_attention(
    q: &Tensor,
    seqs: &[LatentSeq<'_>],
    parts: RowParts,
    scale: f64,
) -> Result<Tensor> {
    let (n, heads, qw) = q.dims3()?;
    let (key_offset, v_width) = (parts.key_offset, parts.value_width);
    let kv_heads = seqs.first().map_or(1, |s| s.kv.len());
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        candle_core::bail!("attention: {heads} query heads over {kv_heads} caches");
    }
    let q = q.contiguous()?;
    let (q_storage, q_layout) = q.storage_and_layout();
    let q_all = cpu_f32(&q_storage, q_layout, n * heads * qw)?;

    // Each sequence's cache rows, and the token -> sequence table.
    let kvs: Vec<Vec<Tensor>> = seqs
        .iter()
        .map(|s| s.kv.iter().map(|t| t.contiguous()).collect())
        .collect::<Result<_>>()?;
    let guards: Vec<Vec<_>> = kvs
        .iter()
        .map(|ts| ts.iter().map(|t| t.storage_and_layout()).collect())
        .collect();
    let mut width = None;
    let mut caches: Vec<Vec<&[f32]>> = Vec::with_capacity(seqs.len());
    let mut owner = vec![usize::MAX; n];
    for (si, (s, guards)) in seqs.iter().zip(&guards).enumerate() {
        if s.kv.len() != kv_heads || s.start + s.len > n {
            candle_core::bail!(
                "attention: sequence {si} has {} caches (others {kv_heads}) for {} new rows \
                 at {} of {n}",
                s.kv.len(),
                s.len,
                s.start
            );
        }
        let mut mine = Vec::with_capacity(kv_heads);
        for (t, (storage, layout)) in kvs[si].iter().zip(guards) {
            let (rows, w) = t.dims2()?;
            let w0 = *width.get_or_insert(w);
            if w != w0 || rows < s.len || key_offset + qw > w || v_width > w {
                candle_core::bail!(
                    "attention: sequence {si} has a cache [{rows}, {w}] for {} new rows \
                     (keys at {key_offset} of width {qw}, values {v_width} wide)",
                    s.len
                );
            }
            mine.push(cpu_f32(storage, layout, rows * w)?);
        }
        caches.push(mine);
        owner[s.start..s.start + s.len].fill(si);
    }
    if owner.contains(&usize::MAX) {
        candle_core::bail!("attention: sequences do not cover all {n} query rows");
    }
    let width = width.unwrap_or(qw);

    // Heads per task: the largest divisor of the heads per cache up to HEAD_GROUP, so that
    // every task reads one cache and fills one contiguous chunk of the output.
    let per_cache = heads / kv_heads;
    let g = (1..=HEAD_GROUP.min(per_cache))
        .rev()
        .find(|g| per_cache.is_multiple_of(*g))
        .unwrap_or(1);
    let groups = heads / g;
    let mut out = vec![0f32; n * heads * v_width];
    let scale = scale as f32;
    out.par_chunks_mut(g * v_width)
        .enumerate()
        .for_each_init(Vec::new, |scores, (task, o)| {
            let (token, h0) = (task / groups, (task % groups) * g);
            let si = owner[token];
            let (s, cache) = (&seqs[si], caches[si][h0 / per_cache]);
            // The token's position is past + (token - start); it sees keys up to itself.
            let past = cache.len() / width - s.len;
            let visible = past + token - s.start + 1;
            let qs = &q_all[(token * heads + h0) * qw..(token * heads + h0 + g) * qw];
            scores.clear();
            scores.resize(g * visible, 0.0);
            // SAFETY: `scores` holds g rows of `visible`; the key columns of every visible
            // row lie inside the cache (checked above).
            unsafe {
                products_to(
                    qs,
                    g,
                    &cache[key_offset..],
                    visible,
                    qw,
                    width,
                    scores.as_mut_ptr(),
                    visible,
                )
            };
            for row in scores.chunks_exact_mut(visible) {
                softmax_scaled(row, scale);
            }
            weighted_sum(scores, g, cache, visible, width, v_width, o);
        });
    Tensor::from_vec(out, (n * heads, v_width), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One sequence for the reference: first query row, new rows, and per cache its rows.
    type PlainSeq = (usize, usize, Vec<Vec<f32>>);

    /// Causal softmax attention in f64, one (token, head) at a time: head `h` reads cache
    /// `h / (heads / caches)`, keys at `parts.key_offset`, values the first columns.
    fn reference(
        q: &[f32],
        (heads, qw): (usize, usize),
        width: usize,
        parts: RowParts,
        seqs: &[PlainSeq],
        scale: f64,
    ) -> Vec<f32> {
        let n: usize = seqs.iter().map(|s| s.1).sum();
        let vw = parts.value_width;
        let mut out = vec![0f32; n * heads * vw];
        for (start, len, caches) in seqs {
            let per_cache = heads / caches.len();
            let past = caches[0].len() / width - len;
            for i in 0..*len {
                let t = start + i;
                for h in 0..heads {
                    let cache = &caches[h / per_cache];
                    let qv = &q[(t * heads + h) * qw..][..qw];
                    let scores: Vec<f64> = (0..=past + i)
                        .map(|j| {
                            let key = &cache[j * width + parts.key_offset..][..qw];
                            scale
                                * qv.iter()
                                    .zip(key)
                                    .map(|(a, b)| *a as f64 * *b as f64)
                                    .sum::<f64>()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..vw {
                        let v: f64 = e
                            .iter()
                            .enumerate()
                            .map(|(j, p)| p / z * cache[j * width + d] as f64)
                            .sum();
                        out[(t * heads + h) * vw + d] = v as f32;
                    }
                }
            }
        }
        out
    }

    /// A ragged batch (decode tokens with long and empty pasts, a prefill chunk, a chunk on
    /// a past) against the reference.
    fn check(heads: usize, caches: usize, qw: usize, width: usize, parts: RowParts) {
        let dev = Device::Cpu;
        let scale = 0.3;
        let shapes = [(5usize, 1usize), (0, 4), (0, 1), (7, 3)];
        let mut seqs = Vec::new();
        let mut start = 0;
        for (past, len) in shapes {
            let kv: Vec<Tensor> = (0..caches)
                .map(|_| Tensor::randn(0f32, 1., (past + len, width), &dev).unwrap())
                .collect();
            seqs.push((start, len, kv));
            start += len;
        }
        let n = start;
        let q = Tensor::randn(0f32, 1., (n, heads, qw), &dev).unwrap();
        let batch: Vec<LatentSeq<'_>> = seqs
            .iter()
            .map(|(start, len, kv)| LatentSeq {
                start: *start,
                len: *len,
                kv,
            })
            .collect();
        let got: Vec<f32> = latent_attention(&q, &batch, parts, scale)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let plain: Vec<PlainSeq> = seqs
            .iter()
            .map(|(s, l, kv)| {
                let rows = kv
                    .iter()
                    .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
                    .collect();
                (*s, *l, rows)
            })
            .collect();
        let q_host: Vec<f32> = q.flatten_all().unwrap().to_vec1().unwrap();
        let want = reference(&q_host, (heads, qw), width, parts, &plain, scale);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() < 1e-5,
                "heads {heads}, caches {caches}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn latent_rows_match_causal_reference() {
        let parts = RowParts {
            key_offset: 0,
            value_width: 16,
        };
        for heads in [1, 3, 6, 8] {
            check(heads, 1, 24, 24, parts);
        }
    }

    #[test]
    fn grouped_query_rows_match_causal_reference() {
        // `[v | k]` rows of 2 x 12, one cache per kv head; 1, 2 and 4 query heads per kv
        // head (the last in groups of 4 and of 2 per task).
        let parts = RowParts {
            key_offset: 12,
            value_width: 12,
        };
        for (heads, caches) in [(4, 4), (8, 4), (8, 2), (6, 1)] {
            check(heads, caches, 12, 24, parts);
        }
    }

    #[test]
    fn single_key_returns_its_values_and_bad_batches_are_refused() {
        let dev = Device::Cpu;
        let parts = RowParts {
            key_offset: 0,
            value_width: 3,
        };
        // One token, nothing in the past: the softmax is 1 on its own row.
        let kv = [Tensor::new(&[[1f32, 2., 3., 4.]], &dev).unwrap()];
        let q = Tensor::new(&[[[0.5f32, -1., 2., 0.]]], &dev).unwrap();
        let seqs = [LatentSeq {
            start: 0,
            len: 1,
            kv: &kv,
        }];
        let got: Vec<f32> = latent_attention(&q, &seqs, parts, 1.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got, vec![1., 2., 3.]);
        // Sequences that leave a query row uncovered, or a cache of the wrong width.
        let q2 = Tensor::zeros((2, 1, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(latent_attention(&q2, &seqs, parts, 1.0).is_err());
        let narrow = [Tensor::zeros((1, 3), candle_core::DType::F32, &dev).unwrap()];
        let bad = [LatentSeq {
            start: 0,
            len: 1,
            kv: &narrow,
        }];
        assert!(latent_attention(&q, &bad, parts, 1.0).is_err());
        // Keys past the end of the row, heads that do not split over the caches, and
        // sequences with different numbers of caches.
        let offset = RowParts {
            key_offset: 1,
            value_width: 3,
        };
        assert!(latent_attention(&q, &seqs, offset, 1.0).is_err());
        let two = [kv[0].clone(), kv[0].clone()];
        let q3 = Tensor::zeros((1, 3, 4), candle_core::DType::F32, &dev).unwrap();
        let split = [LatentSeq {
            start: 0,
            len: 1,
            kv: &two,
        }];
        assert!(latent_attention(&q3, &split, parts, 1.0).is_err());
        let q4 = Tensor::zeros((2, 2, 4), candle_core::DType::F32, &dev).unwrap();
        let mixed = [
            LatentSeq {
                start: 0,
                len: 1,
                kv: &two,
            },
            LatentSeq {
                start: 1,
                len: 1,
                kv: &kv,
            },
        ];
        assert!(latent_attention(&q4, &mixed, parts, 1.0).is_err());
    }
}
