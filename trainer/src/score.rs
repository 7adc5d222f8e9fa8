//! Expert scores: the Token Selection Ratio and the Average Gate Score of every routed
//! expert per MoE layer, from the model's routing on task data or from the reference's
//! routing logs (`expert_weights_{L}.txt`).
//!
//! With `N` tokens routed through layer `L` and top-`k` routing:
//! `token_score[L][e] = (times e is in a token's top-k) / (k N)` (a layer sums to 1) and
//! `gate_score[L][e] = (sum of e's gate probabilities) / N` (a layer sums to less than 1).
//! Both average per token, as the reference's shipped summaries do.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use esft::model::{LayerRouting, LogitsWanted, SeqInput};

/// `layer -> expert -> score`.
pub type LayerScores = BTreeMap<usize, BTreeMap<usize, f64>>;

/// The reference `summary.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub token_scores: LayerScores,
    pub gate_scores: LayerScores,
}

impl Scores {
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: expected {{\"token_scores\": {{layer: {{expert: score}}}}, \"gate_scores\": ...}}",
                path.display()
            )
        })
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        esft::util::write_atomic(path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// Running totals of one layer.
#[derive(Debug, Clone)]
struct LayerTotals {
    selected: Vec<u64>,
    gate_sum: Vec<f64>,
    tokens: u64,
}

/// Accumulates routing decisions into scores.
#[derive(Debug, Clone)]
pub struct ScoreAccumulator {
    n_experts: usize,
    top_k: usize,
    layers: BTreeMap<usize, LayerTotals>,
}

impl ScoreAccumulator {
    pub fn new(n_experts: usize, top_k: usize) -> Self {
        Self {
            n_experts,
            top_k,
            layers: BTreeMap::new(),
        }
    }

    /// Adds tokens of `layer`: `ids` and `probs` hold `top_k` entries per token.
    pub fn add(&mut self, layer: usize, ids: &[u32], probs: &[f32]) -> Result<()> {
        if ids.len() != probs.len() || !ids.len().is_multiple_of(self.top_k.max(1)) {
            bail!(
                "layer {layer}: {} expert ids and {} gate weights do not make whole tokens of \
                 top-{}",
                ids.len(),
                probs.len(),
                self.top_k
            );
        }
        let n = self.n_experts;
        let t = self.layers.entry(layer).or_insert_with(|| LayerTotals {
            selected: vec![0; n],
            gate_sum: vec![0.0; n],
            tokens: 0,
        });
        for (&e, &p) in ids.iter().zip(probs) {
            let e = e as usize;
            if e >= n {
                bail!("layer {layer}: expert id {e} is out of range ({n} experts)");
            }
            t.selected[e] += 1;
            t.gate_sum[e] += p as f64;
        }
        t.tokens += (ids.len() / self.top_k) as u64;
        Ok(())
    }

    pub fn tokens(&self, layer: usize) -> u64 {
        self.layers.get(&layer).map_or(0, |t| t.tokens)
    }

    /// The scores, rounded to 4 decimals as the reference's summaries are.
    pub fn scores(&self) -> Scores {
        let mut s = Scores::default();
        for (&layer, t) in &self.layers {
            let n = t.tokens.max(1) as f64;
            let k = self.top_k as f64;
            s.token_scores.insert(
                layer,
                (0..self.n_experts)
                    .map(|e| (e, round4(t.selected[e] as f64 / (k * n))))
                    .collect(),
            );
            s.gate_scores.insert(
                layer,
                (0..self.n_experts)
                    .map(|e| (e, round4(t.gate_sum[e] / n)))
                    .collect(),
            );
        }
        s
    }
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// Parses one reference log line: the top-k ids of every token, `\t\t`, their weights.
fn parse_log_line(line: &str) -> Result<(Vec<u32>, Vec<f32>)> {
    let (ids, weights) = line
        .split_once("\t\t")
        .context("expected expert ids, two tabs, then gate weights")?;
    let ids = ids
        .split('\t')
        .map(|v| {
            v.trim()
                .parse::<u32>()
                .with_context(|| format!("bad expert id {v:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let weights = weights
        .split('\t')
        .map(|v| {
            v.trim()
                .parse::<f32>()
                .with_context(|| format!("bad gate weight {v:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    if ids.len() != weights.len() {
        bail!(
            "{} expert ids but {} gate weights",
            ids.len(),
            weights.len()
        );
    }
    Ok((ids, weights))
}

/// Scores from a directory of reference routing logs (`expert_weights_{L}.txt`).
pub fn from_logs(dir: &Path, n_experts: usize, top_k: usize) -> Result<Scores> {
    let mut acc = ScoreAccumulator::new(n_experts, top_k);
    let mut files = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let Some(layer) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("expert_weights_")?.strip_suffix(".txt"))
            .and_then(|l| l.parse::<usize>().ok())
        else {
            continue;
        };
        files += 1;
        let file = std::fs::File::open(&path)?;
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let (ids, w) = parse_log_line(&line)
                .with_context(|| format!("{} line {}", path.display(), i + 1))?;
            acc.add(layer, &ids, &w)
                .with_context(|| format!("{} line {}", path.display(), i + 1))?;
        }
    }
    if files == 0 {
        bail!("{} holds no expert_weights_{{L}}.txt logs", dir.display());
    }
    Ok(acc.scores())
}

/// Writes routing logs in the reference format, one line per sample and MoE layer.
pub struct LogWriter {
    files: BTreeMap<usize, std::io::BufWriter<std::fs::File>>,
    dir: PathBuf,
}

impl LogWriter {
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            files: BTreeMap::new(),
            dir: dir.to_path_buf(),
        })
    }

    /// Logs tokens `rows` of one layer's routing as one line.
    pub fn line(&mut self, r: &LayerRouting, rows: std::ops::Range<usize>) -> Result<()> {
        let k = r.top_k;
        let f = match self.files.entry(r.layer) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let path = self.dir.join(format!("expert_weights_{}.txt", r.layer));
                e.insert(std::io::BufWriter::new(std::fs::File::create(&path)?))
            }
        };
        let ids = &r.ids[rows.start * k..rows.end * k];
        let probs = &r.probs[rows.start * k..rows.end * k];
        let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
        let probs: Vec<String> = probs.iter().map(|p| format!("{p:.4}")).collect();
        writeln!(f, "{}\t\t{}", ids.join("\t"), probs.join("\t"))?;
        Ok(())
    }

    pub fn finish(self) -> Result<()> {
        for (_, mut f) in self.files {
            f.flush()?;
        }
        Ok(())
    }
}

/// A seeded random sample of `samples`' tokens: whole samples in shuffled order until
/// `tokens` are reached, the last one cut to hit it exactly (all of them if the data holds
/// fewer).
pub fn sample_tokens(samples: Vec<crate::data::Sample>, tokens: usize, seed: u64) -> Vec<Vec<u32>> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let mut out = Vec::new();
    let mut left = tokens;
    for i in order {
        if left == 0 {
            break;
        }
        let t = &samples[i].tokens;
        let take = t.len().min(left);
        out.push(t[..take].to_vec());
        left -= take;
    }
    out
}

/// Runs the frozen model over `samples` (each a token list) in batches of about
/// `batch_tokens`, adding every MoE layer's routing to `acc` and, optionally, the logs.
/// `on_batch` hears the tokens of each finished batch.
pub fn score_samples(
    model: &esft::model::Decoder,
    samples: &[Vec<u32>],
    batch_tokens: usize,
    acc: &mut ScoreAccumulator,
    mut log: Option<&mut LogWriter>,
    mut on_batch: impl FnMut(usize),
) -> Result<()> {
    let lens: Vec<usize> = samples.iter().map(Vec::len).collect();
    for range in crate::data::token_groups(&lens, batch_tokens) {
        let tokens: usize = lens[range.clone()].iter().sum();
        let group = &samples[range];
        let mut caches: Vec<_> = group.iter().map(|_| model.new_cache()).collect();
        let mut batch: Vec<SeqInput<'_>> = group
            .iter()
            .zip(caches.iter_mut())
            .map(|(t, cache)| SeqInput {
                tokens: t,
                cache,
                experts: None,
                logits: LogitsWanted::None,
            })
            .collect();
        let mut record = esft::model::RoutingRecord::default();
        model.forward(&mut batch, Some(&mut record))?;
        for r in &record.layers {
            acc.add(r.layer, &r.ids, &r.probs)?;
            if let Some(log) = log.as_deref_mut() {
                let mut row = 0;
                for t in group {
                    log.line(r, row..row + t.len())?;
                    row += t.len();
                }
            }
        }
        on_batch(tokens);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_scores() {
        // 3 experts, top-2, 2 tokens: token 0 picks {0: .5, 1: .3}, token 1 picks {0: .4, 2: .4}.
        let mut acc = ScoreAccumulator::new(3, 2);
        acc.add(1, &[0, 1, 0, 2], &[0.5, 0.3, 0.4, 0.4]).unwrap();
        let s = acc.scores();
        // token: expert 0 chosen 2 of 4 times, 1 and 2 once each.
        assert_eq!(
            s.token_scores[&1],
            BTreeMap::from([(0, 0.5), (1, 0.25), (2, 0.25)])
        );
        // gate: sums / 2 tokens; the layer sums to 0.8, not 1.
        assert_eq!(
            s.gate_scores[&1],
            BTreeMap::from([(0, 0.45), (1, 0.15), (2, 0.2)])
        );
        assert_eq!(acc.tokens(1), 2);
        // Misshapen input is refused.
        assert!(acc.add(1, &[0, 1, 2], &[0.1, 0.1, 0.1]).is_err());
        assert!(acc.add(1, &[0, 3], &[0.1, 0.1]).is_err());
    }

    #[test]
    fn log_lines_round_trip() {
        let (ids, w) = parse_log_line("3\t1\t4\t1\t\t0.5000\t0.2500\t0.1250\t0.0625").unwrap();
        assert_eq!(ids, vec![3, 1, 4, 1]);
        assert_eq!(w, vec![0.5, 0.25, 0.125, 0.0625]);
        assert!(parse_log_line("1\t2\t\t0.5").is_err());
        assert!(parse_log_line("1\t2").is_err());

        let dir = tempfile::tempdir().unwrap();
        let mut log = LogWriter::create(dir.path()).unwrap();
        let r = LayerRouting {
            layer: 2,
            top_k: 2,
            ids: vec![0, 1, 2, 0],
            probs: vec![0.5, 0.25, 0.75, 0.125],
            weights: vec![],
        };
        log.line(&r, 0..1).unwrap();
        log.line(&r, 1..2).unwrap();
        log.finish().unwrap();
        let text = std::fs::read_to_string(dir.path().join("expert_weights_2.txt")).unwrap();
        assert_eq!(text, "0\t1\t\t0.5000\t0.2500\n2\t0\t\t0.7500\t0.1250\n");
        let s = from_logs(dir.path(), 3, 2).unwrap();
        assert_eq!(
            s.token_scores[&2],
            BTreeMap::from([(0, 0.5), (1, 0.25), (2, 0.25)])
        );
        assert_eq!(
            s.gate_scores[&2],
            BTreeMap::from([(0, 0.3125), (1, 0.125), (2, 0.375)])
        );
    }
}
