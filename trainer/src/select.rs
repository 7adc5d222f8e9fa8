//! Expert selection, the reference rule: per layer, sort experts by score (descending;
//! ties keep ascending id order) and take them one by one while the running sum is below
//! `p`. The expert that crosses `p` is taken, at least one expert is always taken, and
//! there is no maximum (a layer whose scores sum to less than `p` gives all its experts).

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

use esft::adapter::ExpertConfig;

use crate::score::Scores;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScoreFunction {
    /// Token Selection Ratio.
    Token,
    /// Average Gate Score.
    Gate,
}

/// Writes an expert configuration (the selection) to `path`, atomically.
pub fn write_expert_config(cfg: &ExpertConfig, path: &Path) -> Result<()> {
    let mut text = serde_json::to_string_pretty(cfg)?;
    text.push('\n');
    esft::util::write_atomic(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Reads an expert configuration written by `select`.
pub fn read_expert_config(path: &Path) -> Result<ExpertConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected {{\"experts\": {{layer: [ids]}}, \"shared_experts\": bool, \
             \"non_expert_modules\": bool}}",
            path.display()
        )
    })
}

/// The selected experts of one layer, in descending-score order.
pub fn select_layer(scores: &BTreeMap<usize, f64>, p: f64) -> Vec<usize> {
    let mut order: Vec<(usize, f64)> = scores.iter().map(|(&e, &s)| (e, s)).collect();
    // BTreeMap iteration is ascending by id and the sort is stable: ties keep that order.
    order.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut taken = Vec::new();
    let mut sum = 0.0;
    for (e, s) in order {
        if !taken.is_empty() && sum >= p {
            break;
        }
        taken.push(e);
        sum += s;
    }
    taken
}

pub struct Selection {
    pub function: ScoreFunction,
    pub top_p: f64,
    pub shared_experts: bool,
    pub non_expert_modules: bool,
}

pub fn select(scores: &Scores, sel: &Selection) -> Result<ExpertConfig> {
    if !(sel.top_p.is_finite() && sel.top_p >= 0.0) {
        bail!("--top-p must be a number >= 0, got {}", sel.top_p);
    }
    let table = match sel.function {
        ScoreFunction::Token => &scores.token_scores,
        ScoreFunction::Gate => &scores.gate_scores,
    };
    if table.is_empty() {
        bail!("the scores hold no layers");
    }
    Ok(ExpertConfig {
        experts: table
            .iter()
            .map(|(&layer, s)| (layer, select_layer(s, sel.top_p)))
            .collect(),
        shared_experts: sel.shared_experts,
        non_expert_modules: sel.non_expert_modules,
    })
}

/// The control of the paper's ablation: per layer, as many experts as `like` selects
/// there, drawn uniformly at random (seeded) from the layer's experts in `scores`, listed in
/// ascending id order. Shared-expert and non-expert flags are kept from `like`.
pub fn random_like(scores: &Scores, like: &ExpertConfig, seed: u64) -> Result<ExpertConfig> {
    use rand::seq::index::sample;
    use rand::SeedableRng;
    let mut experts = BTreeMap::new();
    for (&layer, chosen) in &like.experts {
        let Some(layer_scores) = scores.token_scores.get(&layer) else {
            bail!("layer {layer} of the expert config has no scores");
        };
        let ids: Vec<usize> = layer_scores.keys().copied().collect();
        if chosen.len() > ids.len() {
            bail!(
                "layer {layer}: {} experts selected of {} scored",
                chosen.len(),
                ids.len()
            );
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(layer as u64);
        let mut picked: Vec<usize> = sample(&mut rng, ids.len(), chosen.len())
            .into_iter()
            .map(|i| ids[i])
            .collect();
        picked.sort_unstable();
        experts.insert(layer, picked);
    }
    Ok(ExpertConfig {
        experts,
        shared_experts: like.shared_experts,
        non_expert_modules: like.non_expert_modules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_like_keeps_counts_and_flags_and_follows_the_seed() {
        let mut layers = BTreeMap::new();
        for l in 1..=3usize {
            layers.insert(l, (0..16).map(|e| (e, 1.0 / 16.0)).collect());
        }
        let scores = Scores {
            token_scores: layers.clone(),
            gate_scores: layers,
        };
        let like = ExpertConfig {
            experts: [(1, vec![3]), (2, vec![5, 1, 9]), (3, (0..16).collect())].into(),
            shared_experts: true,
            non_expert_modules: false,
        };
        let a = random_like(&scores, &like, 7).unwrap();
        assert!(a.shared_experts && !a.non_expert_modules);
        for (l, ids) in &a.experts {
            assert_eq!(ids.len(), like.experts[l].len());
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
            assert!(ids.iter().all(|&e| e < 16));
        }
        assert_eq!(a.experts[&3], (0..16).collect::<Vec<_>>());
        assert_eq!(a, random_like(&scores, &like, 7).unwrap());
        let differs =
            (0..10).any(|s| random_like(&scores, &like, s).unwrap().experts[&2] != a.experts[&2]);
        assert!(differs, "other seeds draw other experts");
        let bad = ExpertConfig {
            experts: [(9, vec![0])].into(),
            ..like.clone()
        };
        assert!(random_like(&scores, &bad, 0)
            .unwrap_err()
            .to_string()
            .contains("layer 9"));
    }

    fn layer(scores: &[f64]) -> BTreeMap<usize, f64> {
        scores.iter().copied().enumerate().collect()
    }

    #[test]
    fn takes_until_the_running_sum_reaches_p_including_the_crossing_expert() {
        let s = layer(&[0.1, 0.4, 0.2, 0.3]);
        assert_eq!(select_layer(&s, 0.5), vec![1, 3]); // 0.4 < 0.5, then 0.7 >= 0.5
        assert_eq!(select_layer(&s, 0.4), vec![1]); // 0.4 reaches p exactly: stop
        assert_eq!(select_layer(&s, 0.41), vec![1, 3]);
        assert_eq!(select_layer(&s, 0.95), vec![1, 3, 2, 0]);
    }

    #[test]
    fn ties_keep_ascending_id_order() {
        let s = layer(&[0.2, 0.3, 0.2, 0.3]);
        assert_eq!(select_layer(&s, 0.5), vec![1, 3]);
        assert_eq!(select_layer(&s, 0.7), vec![1, 3, 0]);
    }

    #[test]
    fn edge_values_of_p() {
        let s = layer(&[0.1, 0.4, 0.2, 0.3]);
        // p = 0: at least one expert.
        assert_eq!(select_layer(&s, 0.0), vec![1]);
        // p >= 1 on scores summing to 1: everything.
        assert_eq!(select_layer(&s, 1.0).len(), 4);
        assert_eq!(select_layer(&s, 3.0).len(), 4);
        // Gate scores need not sum to 1: a layer whose total is below p gives all experts,
        // zeros included.
        let g = layer(&[0.05, 0.1, 0.0, 0.02]);
        assert_eq!(select_layer(&g, 0.2), vec![1, 0, 3, 2]);
        assert_eq!(select_layer(&g, 0.12), vec![1, 0]);
    }

    #[test]
    fn refuses_bad_p() {
        let scores = Scores {
            token_scores: BTreeMap::from([(1, layer(&[0.5, 0.5]))]),
            gate_scores: BTreeMap::new(),
        };
        for p in [-0.1, f64::NAN] {
            let sel = Selection {
                function: ScoreFunction::Token,
                top_p: p,
                shared_experts: false,
                non_expert_modules: false,
            };
            assert!(select(&scores, &sel).is_err());
        }
        let sel = Selection {
            function: ScoreFunction::Gate,
            top_p: 0.2,
            shared_experts: true,
            non_expert_modules: false,
        };
        assert!(select(&scores, &sel).is_err(), "no gate scores");
        let sel = Selection {
            function: ScoreFunction::Token,
            ..sel
        };
        let cfg = select(&scores, &sel).unwrap();
        assert_eq!(cfg.experts[&1], vec![0]);
        assert!(cfg.shared_experts);
    }
}
