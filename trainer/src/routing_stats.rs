//! Routing statistics over expert scores: how concentrated each task's routing is (the share
//! of a layer's routing mass its top experts take) and how much two tasks' top experts
//! overlap, layer by layer. Pure functions over [`Scores`], plus the summary that
//! `esft-train plot` writes as `routing_summary.json` and `routing_summary.md`.
//!
//! A task's top experts in a layer are its `k = ceil(fraction * E)` highest-scoring experts,
//! ties going to the lower id (the order `select` uses), so the sets are reproducible.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::score::{LayerScores, Scores};
use crate::select::ScoreFunction;

/// The scores table `function` names.
pub fn table(scores: &Scores, function: ScoreFunction) -> &LayerScores {
    match function {
        ScoreFunction::Token => &scores.token_scores,
        ScoreFunction::Gate => &scores.gate_scores,
    }
}

pub fn function_name(function: ScoreFunction) -> &'static str {
    match function {
        ScoreFunction::Token => "token",
        ScoreFunction::Gate => "gate",
    }
}

/// How many experts the top `fraction` of `n_experts` is: `ceil(fraction * n_experts)`,
/// at least 1 and at most `n_experts`.
pub fn top_count(n_experts: usize, fraction: f64) -> Result<usize> {
    if !(fraction.is_finite() && fraction > 0.0 && fraction <= 1.0) {
        bail!("--top-fraction must be in (0, 1], got {fraction}");
    }
    if n_experts == 0 {
        bail!("a layer with no experts has no top experts");
    }
    // Products that should be whole come out a hair above it in binary floating point
    // (0.1 * 30 = 3.0000000000000004), and a plain ceil would then take one expert too many.
    let k = (fraction * n_experts as f64 - 1e-9).ceil();
    Ok((k.max(1.0) as usize).min(n_experts))
}

/// The `k` highest-scoring experts of a layer, highest first; ties go to the lower id.
pub fn top_experts(layer: &BTreeMap<usize, f64>, k: usize) -> Vec<usize> {
    let mut order: Vec<(usize, f64)> = layer.iter().map(|(&e, &s)| (e, s)).collect();
    // BTreeMap iterates by ascending id and the sort is stable, so ties keep the lower id first.
    order.sort_by(|a, b| b.1.total_cmp(&a.1));
    order.into_iter().take(k).map(|(e, _)| e).collect()
}

/// The share of a layer's total score held by its `k` highest-scoring experts (0 for a layer
/// whose scores sum to 0). Dividing by the total makes gate scores, which sum to less than
/// 1, comparable with token scores; which of several tied experts is taken cannot change it.
pub fn top_share(layer: &BTreeMap<usize, f64>, k: usize) -> f64 {
    let total: f64 = layer.values().sum();
    if total <= 0.0 {
        return 0.0;
    }
    let top: f64 = top_experts(layer, k)
        .iter()
        .filter_map(|e| layer.get(e))
        .sum();
    top / total
}

/// `|A ∩ B| / |A|` (0 for an empty `A`); ids are sets, a repeated id counts once.
pub fn overlap(a: &[usize], b: &[usize]) -> f64 {
    let a: std::collections::BTreeSet<usize> = a.iter().copied().collect();
    if a.is_empty() {
        return 0.0;
    }
    let shared = b
        .iter()
        .copied()
        .collect::<std::collections::BTreeSet<usize>>()
        .intersection(&a)
        .count();
    shared as f64 / a.len() as f64
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

fn id_range(ids: &[usize]) -> String {
    match (ids.first(), ids.last()) {
        (Some(a), Some(b)) => format!("{} ({a}..={b})", ids.len()),
        _ => "none".into(),
    }
}

/// Checks that the tasks can be compared: every task has the layers and, in every layer,
/// the experts of the first task, and every layer scores the same experts. Returns the
/// layers and the expert ids.
pub fn check_same_shape(tasks: &[(&str, &LayerScores)]) -> Result<(Vec<usize>, Vec<usize>)> {
    let Some(&(first, first_table)) = tasks.first() else {
        bail!("no task scores given");
    };
    let layers: Vec<usize> = first_table.keys().copied().collect();
    let Some(experts) = first_table.values().next() else {
        bail!("the scores of {first:?} hold no layers");
    };
    let experts: Vec<usize> = experts.keys().copied().collect();
    if experts.is_empty() {
        bail!("the scores of {first:?} hold a layer with no experts");
    }
    for &(name, t) in tasks {
        let these: Vec<usize> = t.keys().copied().collect();
        if these != layers {
            let extra: Vec<usize> = these
                .iter()
                .filter(|l| !layers.contains(l))
                .copied()
                .collect();
            let missing: Vec<usize> = layers
                .iter()
                .filter(|l| !these.contains(l))
                .copied()
                .collect();
            bail!(
                "the scores of {name:?} and {first:?} cover different layers: {name:?} has \
                 {extra:?} that {first:?} lacks and lacks {missing:?}"
            );
        }
        for (layer, scores) in t {
            let ids: Vec<usize> = scores.keys().copied().collect();
            if ids != experts {
                bail!(
                    "layer {layer} of the scores of {name:?} has experts {}, but {first:?} \
                     has {} in every layer",
                    id_range(&ids),
                    id_range(&experts)
                );
            }
        }
    }
    Ok((layers, experts))
}

/// `routing_summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutingSummary {
    /// `token` or `gate`: the scores the statistics are over.
    pub score_function: String,
    pub top_fraction: f64,
    /// Routed experts per layer.
    pub experts: usize,
    /// `ceil(top_fraction * experts)`: the size of every top set.
    pub top_experts: usize,
    pub layers: Vec<usize>,
    pub tasks: Vec<TaskStats>,
    /// Every pair of tasks, in the order given.
    pub pairs: Vec<PairStats>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStats {
    pub name: String,
    /// Per layer, the share of routing mass on the top experts.
    pub top_share: BTreeMap<usize, f64>,
    /// Its mean over layers.
    pub mean_top_share: f64,
    /// Per layer, the top experts, highest first.
    pub top_experts: BTreeMap<usize, Vec<usize>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairStats {
    pub a: String,
    pub b: String,
    /// Per layer, `|A ∩ B| / |A|` of the two top sets (symmetric: both have `top_experts`).
    pub overlap: BTreeMap<usize, f64>,
    pub mean_overlap: f64,
}

/// The statistics of named tasks' scores.
pub fn summarize(
    tasks: &[(String, Scores)],
    function: ScoreFunction,
    fraction: f64,
) -> Result<RoutingSummary> {
    for (i, (name, _)) in tasks.iter().enumerate() {
        if tasks[..i].iter().any(|(n, _)| n == name) {
            bail!("task name {name:?} is given twice");
        }
        if table(&tasks[i].1, function).is_empty() {
            bail!(
                "the scores of {name:?} hold no {} scores",
                function_name(function)
            );
        }
    }
    let tables: Vec<(&str, &LayerScores)> = tasks
        .iter()
        .map(|(n, s)| (n.as_str(), table(s, function)))
        .collect();
    let (layers, experts) = check_same_shape(&tables)?;
    let k = top_count(experts.len(), fraction)?;

    let stats: Vec<TaskStats> = tables
        .iter()
        .map(|&(name, t)| {
            let top_share: BTreeMap<usize, f64> =
                t.iter().map(|(&l, s)| (l, top_share(s, k))).collect();
            TaskStats {
                name: name.to_string(),
                mean_top_share: mean(top_share.values().copied()),
                top_share,
                top_experts: t.iter().map(|(&l, s)| (l, top_experts(s, k))).collect(),
            }
        })
        .collect();
    let mut pairs = Vec::new();
    for (i, a) in stats.iter().enumerate() {
        for b in &stats[i + 1..] {
            let overlap: BTreeMap<usize, f64> = layers
                .iter()
                .map(|l| {
                    let none = Vec::new();
                    let sa = a.top_experts.get(l).unwrap_or(&none);
                    let sb = b.top_experts.get(l).unwrap_or(&none);
                    (*l, self::overlap(sa, sb))
                })
                .collect();
            pairs.push(PairStats {
                a: a.name.clone(),
                b: b.name.clone(),
                mean_overlap: mean(overlap.values().copied()),
                overlap,
            });
        }
    }
    Ok(RoutingSummary {
        score_function: function_name(function).to_string(),
        top_fraction: fraction,
        experts: experts.len(),
        top_experts: k,
        layers,
        tasks: stats,
        pairs,
    })
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// Markdown table cells must not hold a `|`.
fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

impl RoutingSummary {
    /// The summary as Markdown tables, to paste into a report.
    pub fn to_markdown(&self) -> String {
        let k = self.top_experts;
        let e = self.experts;
        let what = match self.score_function.as_str() {
            "gate" => "Average Gate Score",
            _ => "Token Selection Ratio",
        };
        // Uniform routing puts k/E of the mass on any k experts, and two random k-subsets of
        // E share k/E of their members on average: the baselines for both tables.
        let baseline = pct(k as f64 / e.max(1) as f64);
        let mut md = String::new();
        let _ = writeln!(md, "# Routing statistics\n");
        let _ = writeln!(
            md,
            "Scores: {what} ({}). Top experts: each task's top {} of routed experts per \
             layer, {k} of {e} (ties to the lower id). Uniform routing would put {baseline} \
             of the mass on them, and random sets of {k} would overlap by {baseline}.\n",
            self.score_function,
            pct(self.top_fraction)
        );

        let _ = writeln!(md, "## Summary\n");
        let _ = writeln!(
            md,
            "| task | mean share of routing on its top {k} experts |"
        );
        let _ = writeln!(md, "|---|---:|");
        for t in &self.tasks {
            let _ = writeln!(md, "| {} | {} |", cell(&t.name), pct(t.mean_top_share));
        }
        if !self.pairs.is_empty() {
            let _ = writeln!(md, "\n| tasks | mean overlap of top-{k} sets |");
            let _ = writeln!(md, "|---|---:|");
            for p in &self.pairs {
                let _ = writeln!(
                    md,
                    "| {} / {} | {} |",
                    cell(&p.a),
                    cell(&p.b),
                    pct(p.mean_overlap)
                );
            }
        }

        let _ = writeln!(
            md,
            "\n## Share of routing on the top {k} experts, per layer\n"
        );
        let _ = write!(md, "| layer |");
        for t in &self.tasks {
            let _ = write!(md, " {} |", cell(&t.name));
        }
        let _ = writeln!(md, "\n|---:|{}", "---:|".repeat(self.tasks.len()));
        for l in &self.layers {
            let _ = write!(md, "| {l} |");
            for t in &self.tasks {
                let _ = write!(
                    md,
                    " {} |",
                    t.top_share.get(l).map_or("-".into(), |&v| pct(v))
                );
            }
            md.push('\n');
        }
        let _ = write!(md, "| **mean** |");
        for t in &self.tasks {
            let _ = write!(md, " **{}** |", pct(t.mean_top_share));
        }
        md.push('\n');

        if !self.pairs.is_empty() {
            let _ = writeln!(
                md,
                "\n## Overlap of top-{k} expert sets, per layer (shared experts of {k})\n"
            );
            let _ = write!(md, "| layer |");
            for p in &self.pairs {
                let _ = write!(md, " {} / {} |", cell(&p.a), cell(&p.b));
            }
            let _ = writeln!(md, "\n|---:|{}", "---:|".repeat(self.pairs.len()));
            for l in &self.layers {
                let _ = write!(md, "| {l} |");
                for p in &self.pairs {
                    let v = p.overlap.get(l).copied().unwrap_or(0.0);
                    let _ = write!(md, " {} ({}) |", (v * k as f64).round(), pct(v));
                }
                md.push('\n');
            }
            let _ = write!(md, "| **mean** |");
            for p in &self.pairs {
                let _ = write!(md, " **{}** |", pct(p.mean_overlap));
            }
            md.push('\n');
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(scores: &[f64]) -> BTreeMap<usize, f64> {
        scores.iter().copied().enumerate().collect()
    }

    fn scores(layers: &[(usize, &[f64])]) -> Scores {
        Scores {
            token_scores: layers.iter().map(|&(l, s)| (l, layer(s))).collect(),
            gate_scores: LayerScores::new(),
        }
    }

    #[test]
    fn top_count_is_the_ceiling_of_the_fraction() {
        assert_eq!(top_count(64, 0.1).unwrap(), 7); // 6.4
        assert_eq!(top_count(10, 0.1).unwrap(), 1); // 1.0 exactly
        assert_eq!(top_count(30, 0.1).unwrap(), 3); // 3.0000000000000004 in f64
        assert_eq!(top_count(64, 0.25).unwrap(), 16);
        assert_eq!(top_count(5, 0.01).unwrap(), 1); // never fewer than one
        assert_eq!(top_count(5, 1.0).unwrap(), 5);
        assert!(top_count(64, 0.0).is_err());
        assert!(top_count(64, 1.5).is_err());
        assert!(top_count(64, f64::NAN).is_err());
        assert!(top_count(0, 0.1).is_err());
    }

    #[test]
    fn top_experts_break_ties_to_the_lower_id() {
        let l = layer(&[0.1, 0.3, 0.2, 0.3, 0.1]);
        assert_eq!(top_experts(&l, 1), vec![1]);
        assert_eq!(top_experts(&l, 3), vec![1, 3, 2]);
        assert_eq!(top_experts(&l, 4), vec![1, 3, 2, 0]);
        assert_eq!(top_experts(&l, 9), vec![1, 3, 2, 0, 4]);
    }

    #[test]
    fn top_share_of_hand_computed_layers() {
        let l = layer(&[0.1, 0.3, 0.2, 0.3, 0.1]);
        assert!((top_share(&l, 1) - 0.3).abs() < 1e-12);
        assert!((top_share(&l, 2) - 0.6).abs() < 1e-12);
        // Experts 0 and 4 tie for 4th place: either gives 0.9.
        assert!((top_share(&l, 4) - 0.9).abs() < 1e-12);
        // Gate scores sum to less than 1: the share is of the layer's total.
        let g = layer(&[0.05, 0.15, 0.3]);
        assert!((top_share(&g, 1) - 0.6).abs() < 1e-12);
        assert_eq!(top_share(&layer(&[0.0, 0.0]), 1), 0.0);
    }

    #[test]
    fn overlap_of_identical_disjoint_and_partial_sets() {
        assert_eq!(overlap(&[1, 2, 3], &[3, 2, 1]), 1.0);
        assert_eq!(overlap(&[1, 2, 3], &[4, 5, 6]), 0.0);
        assert!((overlap(&[1, 2, 3], &[2, 3, 9]) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(overlap(&[1, 2, 3, 4], &[4]), 0.25);
        assert_eq!(overlap(&[], &[1]), 0.0);
    }

    #[test]
    fn summarize_hand_computed_tasks() {
        let a = scores(&[(1, &[0.5, 0.3, 0.1, 0.1]), (2, &[0.25, 0.25, 0.25, 0.25])]);
        let b = scores(&[(1, &[0.1, 0.6, 0.2, 0.1]), (2, &[0.0, 0.1, 0.2, 0.7])]);
        let s = summarize(
            &[("a".into(), a), ("b".into(), b)],
            ScoreFunction::Token,
            0.5,
        )
        .unwrap();
        assert_eq!((s.experts, s.top_experts), (4, 2));
        assert_eq!(s.layers, vec![1, 2]);
        let ta = &s.tasks[0];
        assert_eq!(ta.top_experts[&1], vec![0, 1]);
        assert_eq!(ta.top_experts[&2], vec![0, 1]); // all tie: the lowest ids
        assert!((ta.top_share[&1] - 0.8).abs() < 1e-12);
        assert!((ta.top_share[&2] - 0.5).abs() < 1e-12);
        assert!((ta.mean_top_share - 0.65).abs() < 1e-12);
        let tb = &s.tasks[1];
        assert_eq!(tb.top_experts[&1], vec![1, 2]);
        assert_eq!(tb.top_experts[&2], vec![3, 2]);
        assert!((tb.mean_top_share - 0.85).abs() < 1e-12);
        assert_eq!(s.pairs.len(), 1);
        let p = &s.pairs[0];
        assert_eq!((p.a.as_str(), p.b.as_str()), ("a", "b"));
        assert_eq!(p.overlap[&1], 0.5);
        assert_eq!(p.overlap[&2], 0.0);
        assert_eq!(p.mean_overlap, 0.25);

        let md = s.to_markdown();
        assert!(md.contains("| a | 65.0% |"), "{md}");
        assert!(md.contains("| a / b | 25.0% |"), "{md}");
        assert!(md.contains("| 1 | 80.0% | 80.0% |"), "{md}");
        assert!(md.contains("| 1 | 1 (50.0%) |"), "{md}");
    }

    #[test]
    fn summarize_refuses_tasks_that_do_not_match() {
        let a = scores(&[(1, &[0.5, 0.5]), (2, &[0.5, 0.5])]);
        let fewer_layers = scores(&[(1, &[0.5, 0.5])]);
        let e = summarize(
            &[("a".into(), a.clone()), ("b".into(), fewer_layers)],
            ScoreFunction::Token,
            0.1,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("different layers") && e.contains("[2]"), "{e}");

        let more_experts = scores(&[(1, &[0.5, 0.5]), (2, &[0.2, 0.4, 0.4])]);
        let e = summarize(
            &[("a".into(), a.clone()), ("b".into(), more_experts)],
            ScoreFunction::Token,
            0.1,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("layer 2") && e.contains("\"b\""), "{e}");

        let e = summarize(
            &[("a".into(), a.clone()), ("a".into(), a.clone())],
            ScoreFunction::Token,
            0.1,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("given twice"), "{e}");

        let e = summarize(&[("a".into(), a)], ScoreFunction::Gate, 0.1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no gate scores"), "{e}");
    }
}
