//! Logits -> next token: penalties, temperature, top-k, top-p, seeded sampling.
//!
//! Order of operations (as in vLLM/transformers): repetition penalty over prompt and output
//! tokens, presence/frequency penalties over output tokens, then temperature, top-k and
//! top-p. Temperature 0 is greedy (the lowest id wins ties). Each sequence owns its RNG, so
//! a seeded request gives the same tokens whatever else shares its batch.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, HashSet};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub top_k: usize,
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1 = off; > 1 discourages tokens already in the prompt or output.
    pub repetition_penalty: f32,
    pub max_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Report each sampled token's log-probability and this many most likely alternatives
    /// (at most [`MAX_TOP_LOGPROBS`]); `None` reports nothing.
    pub logprobs: Option<usize>,
}

/// Most alternatives a token's log-probabilities may list.
pub const MAX_TOP_LOGPROBS: usize = 20;

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            max_tokens: 16,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            max_tokens,
            ..Self::default()
        }
    }

    /// Checks ranges; the error names the offending parameter.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let bad = |p: &'static str, m: String| Err((p, m));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(
                "temperature",
                format!("must be >= 0, got {}", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(name, format!("must be in [-2, 2], got {v}"));
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                format!("must be > 0, got {}", self.repetition_penalty),
            );
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be at least 1".into());
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop", "stop strings must not be empty".into());
        }
        if let Some(n) = self.logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
            return bad(
                "logprobs",
                format!("at most {MAX_TOP_LOGPROBS} alternatives, got {n}"),
            );
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Output token counts (presence/frequency penalties).
    output_counts: HashMap<u32, u32>,
    /// Prompt and output tokens seen (repetition penalty).
    seen: HashSet<u32>,
    /// Scratch (index, value) buffer reused across steps.
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_rng(&mut rand::rng()),
        };
        Self {
            params,
            rng,
            output_counts: HashMap::new(),
            seen: prompt.iter().copied().collect(),
            scratch: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Records an emitted token for the penalties.
    pub fn observe(&mut self, token: u32) {
        *self.output_counts.entry(token).or_default() += 1;
        self.seen.insert(token);
    }

    /// Applies the penalties to `logits` in place (also what logprobs report on).
    pub fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
    }

    /// Picks the next token from raw logits (penalties applied here).
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_penalties(logits);
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        self.scratch.clear();
        self.scratch.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l * inv_t)),
        );
        let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < self.scratch.len() {
            self.scratch.select_nth_unstable_by(p.top_k - 1, desc);
            self.scratch.truncate(p.top_k);
        }
        self.scratch.sort_unstable_by(desc);
        let max = self.scratch[0].1;
        let mut total = 0f64;
        for e in &mut self.scratch {
            e.1 = (e.1 - max).exp();
            total += e.1 as f64;
        }
        if p.top_p < 1.0 {
            let mut cum = 0f64;
            let mut keep = self.scratch.len();
            for (i, e) in self.scratch.iter().enumerate() {
                cum += e.1 as f64 / total;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            self.scratch.truncate(keep);
            total = self.scratch.iter().map(|e| e.1 as f64).sum();
        }
        let mut r = self.rng.random::<f64>() * total;
        for e in &self.scratch {
            r -= e.1 as f64;
            if r < 0.0 {
                return e.0;
            }
        }
        self.scratch.last().map(|e| e.0).unwrap_or(0)
    }
}

/// A sampled token's log-probability and the most likely alternatives, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Log-softmax of `logits` at `token`, and the `top` largest entries (lowest id first on
/// ties). NaN logits count as impossible.
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let max = logits
        .iter()
        .copied()
        .filter(|v| !v.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .filter(|v| !v.is_nan())
        .map(|&v| ((v - max) as f64).exp())
        .sum();
    let lse = max as f64 + sum.ln();
    let lp = |v: f32| {
        if v.is_nan() {
            f32::NEG_INFINITY
        } else {
            (v as f64 - lse) as f32
        }
    };
    let logprob = logits
        .get(token as usize)
        .map_or(f32::NEG_INFINITY, |&v| lp(v));
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
        let desc =
            |a: &(u32, f32), b: &(u32, f32)| key(b.1).total_cmp(&key(a.1)).then(a.0.cmp(&b.0));
        best = logits
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as u32, v))
            .collect();
        let k = top.min(best.len());
        if k > 0 && k < best.len() {
            best.select_nth_unstable_by(k - 1, desc);
        }
        best.truncate(k);
        best.sort_unstable_by(desc);
        for e in &mut best {
            e.1 = lp(e.1);
        }
    }
    TokenLogprobs { logprob, top: best }
}

/// Index of the largest value, lowest index on ties (NaN never wins).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] || values[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    #[test]
    fn greedy_takes_lowest_id_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy(1), &[]);
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, 2.0]), 1);
    }

    #[test]
    fn repetition_penalty_hand_case() {
        // Token 1 (logit 3) is in the prompt: 3 / 2 = 1.5 < token 2's 2.0.
        let p = params(|p| {
            p.temperature = 0.0;
            p.repetition_penalty = 2.0;
        });
        let mut s = Sampler::new(p, &[1, 0]);
        let mut l = [-1.0, 3.0, 2.0];
        assert_eq!(s.sample(&mut l), 2);
        assert_eq!(l, [-2.0, 1.5, 2.0]);
    }

    #[test]
    fn presence_and_frequency_penalties_hand_case() {
        let p = params(|p| {
            p.temperature = 0.0;
            p.presence_penalty = 0.5;
            p.frequency_penalty = 0.25;
        });
        let mut s = Sampler::new(p, &[]);
        s.observe(0);
        s.observe(0);
        let mut l = [2.0, 1.2];
        // token 0: 2 - 0.5 - 2 * 0.25 = 1.0 < 1.2
        assert_eq!(s.sample(&mut l), 1);
        assert_eq!(l, [1.0, 1.2]);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        for p in [params(|p| p.top_k = 1), params(|p| p.top_p = 1e-6)] {
            let mut s = Sampler::new(SamplingParams { seed: Some(3), ..p }, &[]);
            for _ in 0..20 {
                assert_eq!(s.sample(&mut [0.0, 0.5, 0.4]), 1);
            }
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_the_distribution() {
        let p = params(|p| p.seed = Some(7));
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone(), &[]);
            (0..4000)
                .map(|_| s.sample(&mut [0.0, (3f32).ln()]))
                .collect::<Vec<_>>()
        };
        let a = draw(&p);
        assert_eq!(a, draw(&p));
        // P(token 1) = 3/4.
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
        let other = draw(&params(|p| p.seed = Some(8)));
        assert_ne!(a, other);
    }

    #[test]
    fn logprobs_hand_case() {
        // softmax of [ln 1, ln 3, ln 3, ln 1] = [1/8, 3/8, 3/8, 1/8].
        let l = [0.0, (3f32).ln(), (3f32).ln(), 0.0];
        let r = logprobs(&l, 3, 3);
        assert!((r.logprob - (0.125f32).ln()).abs() < 1e-6);
        let ids: Vec<u32> = r.top.iter().map(|e| e.0).collect();
        assert_eq!(ids, [1, 2, 0], "best first, lowest id on ties");
        assert!((r.top[0].1 - (0.375f32).ln()).abs() < 1e-6);
        let total: f32 = (0..4).map(|i| logprobs(&l, i, 0).logprob.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(logprobs(&l, 1, 0).top.is_empty());
        assert_eq!(logprobs(&l, 1, 99).top.len(), 4);
    }

    #[test]
    fn validation_names_the_parameter() {
        assert_eq!(params(|p| p.top_p = 0.0).validate().unwrap_err().0, "top_p");
        assert_eq!(
            params(|p| p.temperature = -1.0).validate().unwrap_err().0,
            "temperature"
        );
        assert_eq!(
            params(|p| p.max_tokens = 0).validate().unwrap_err().0,
            "max_tokens"
        );
        assert_eq!(
            params(|p| p.logprobs = Some(21)).validate().unwrap_err().0,
            "logprobs"
        );
        assert!(SamplingParams::default().validate().is_ok());
    }
}
