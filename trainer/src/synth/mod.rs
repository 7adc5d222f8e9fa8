//! Synthetic task data for the from-scratch demo: a registry of six domains (three general
//! ones the base model is pretrained on, three downstream ones held out for ESFT) plus the
//! auxiliary `repeat` (copying text of the others, pretraining material only), the
//! seeded draw of their train and eval splits, the eval/train dedupe, and the files
//! `esft-train synth` writes (the reference JSONL formats `data.rs` reads, `pretrain.jsonl`,
//! `manifest.json`).
//!
//! Each domain is a sampler `fn(&mut ChaCha8Rng) -> (question, answer)` with its own
//! vocabulary and phrasing, so that a small MoE has a reason to route domains to different
//! experts. All randomness comes from one seed: domain `i` draws from stream `i` of a
//! ChaCha8 generator, so a domain's data does not depend on the other domains' sizes.

mod arithmetic;
mod grammar;
mod intent;
mod law;
mod programs;
mod repeat;
mod translation;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;

/// Whether the base model is pretrained on a domain or it is held out for fine-tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    General,
    Downstream,
    /// Pretraining material that is not a task: in `pretrain.jsonl`, but not scored,
    /// evaluated or plotted as a domain.
    Auxiliary,
}

/// One domain: its name (also its directory), kind, a line of description and its sampler.
pub struct Domain {
    pub name: &'static str,
    pub kind: Kind,
    pub description: &'static str,
    /// Draws one `(question, answer)`; the answer follows from the question alone.
    pub sample: fn(&mut ChaCha8Rng) -> (String, String),
}

/// The registry, in manifest order. The index is the domain's random stream, so appending
/// keeps the existing domains' data unchanged.
pub const DOMAINS: &[Domain] = &[
    Domain {
        name: "grammar",
        kind: Kind::General,
        description: "sentences about animals from a small grammar; answer a what/which/where \
                      question by copying a phrase",
        sample: grammar::sample,
    },
    Domain {
        name: "arithmetic",
        kind: Kind::General,
        description: "word problems with small numbers (add, subtract, two steps); numeric answer",
        sample: arithmetic::sample,
    },
    Domain {
        name: "programs",
        kind: Kind::General,
        description: "tiny straight-line programs (assignments, + and -, swaps); the printed \
                      value",
        sample: programs::sample,
    },
    Domain {
        name: "intent",
        kind: Kind::Downstream,
        description: "home-appliance commands to compact JSON {\"intent\", \"slots\"}",
        sample: intent::sample,
    },
    Domain {
        name: "translation",
        kind: Kind::Downstream,
        description: "english-like sentences into the constructed language velan (SOV, \
                      adjectives after nouns, plural -en, past particle ka)",
        sample: translation::sample,
    },
    Domain {
        name: "law",
        kind: Kind::Downstream,
        description: "case facts with distractors to the applicable article (act category x \
                      aggravating circumstance)",
        sample: law::sample,
    },
    Domain {
        name: "repeat",
        kind: Kind::Auxiliary,
        description: "copy a piece of text from any other domain (the vocabulary of every \
                      domain, none of the downstream tasks)",
        sample: repeat::sample,
    },
];

/// How many samples to draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// Train samples per general domain.
    pub general_train: usize,
    /// Train samples per downstream domain.
    pub task_train: usize,
    /// Eval items per domain (all distinct).
    pub eval: usize,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            general_train: 20000,
            task_train: 3000,
            eval: 200,
        }
    }
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub seed: u64,
    pub domains: Vec<DomainEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainEntry {
    pub name: String,
    pub kind: Kind,
    pub description: String,
    pub train: usize,
    pub eval: usize,
}

/// One drawn sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub question: String,
    pub answer: String,
}

/// Draws without a new item this many times in a row mean the domain is exhausted (or, for
/// train, that eval holds all of it): a clear error instead of a loop that never ends.
const MAX_MISSES: usize = 20_000;

/// Generates every domain into `out` and returns the manifest written there.
pub fn generate(out: &Path, seed: u64, sizes: Sizes) -> Result<Manifest> {
    generate_with(DOMAINS, out, seed, sizes)
}

fn generate_with(domains: &[Domain], out: &Path, seed: u64, sizes: Sizes) -> Result<Manifest> {
    for (n, flag) in [
        (sizes.general_train, "--general-train"),
        (sizes.task_train, "--task-train"),
        (sizes.eval, "--eval"),
    ] {
        if n == 0 {
            bail!("{flag} must be at least 1 (the trainer refuses empty files)");
        }
    }
    let (evals, trains) = draw_all(domains, seed, sizes)?;

    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // The manifest goes last, so a directory with a manifest is complete; an old one is
    // removed first so that an interrupted overwrite does not look complete.
    let manifest_path = out.join("manifest.json");
    if manifest_path.exists() {
        std::fs::remove_file(&manifest_path)
            .with_context(|| format!("removing {}", manifest_path.display()))?;
    }
    let mut entries = Vec::new();
    let mut pretrain = Vec::new();
    for ((d, eval), train) in domains.iter().zip(&evals).zip(&trains) {
        let dir = out.join(d.name);
        write_lines(&dir.join("train.jsonl"), train_lines(d.name, train))?;
        write_lines(&dir.join("eval.jsonl"), eval_lines(eval))?;
        if d.kind != Kind::Downstream {
            pretrain.extend(train.iter().map(|it| (d.name, it)));
        }
        entries.push(DomainEntry {
            name: d.name.to_string(),
            kind: d.kind,
            description: d.description.to_string(),
            train: train.len(),
            eval: eval.len(),
        });
    }
    // Its own stream, past every domain's, so the shuffle does not disturb them.
    let mut rng = stream(seed, u64::MAX);
    pretrain.shuffle(&mut rng);
    let lines = pretrain
        .iter()
        .enumerate()
        .map(|(i, (name, it))| pretrain_line(i, name, it));
    write_lines(&out.join("pretrain.jsonl"), lines)?;

    let manifest = Manifest {
        seed,
        domains: entries,
    };
    let mut text = serde_json::to_string_pretty(&manifest)?;
    text.push('\n');
    esft::util::write_atomic(&manifest_path, text.as_bytes())
        .with_context(|| format!("writing {}", manifest_path.display()))?;
    Ok(manifest)
}

fn stream(seed: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    rng
}

/// Every domain's eval set, then every train set. Eval comes first so that a train draw
/// can be refused when its question is held out in any domain's eval set.
type Splits = (Vec<Vec<Item>>, Vec<Vec<Item>>);

fn draw_all(domains: &[Domain], seed: u64, sizes: Sizes) -> Result<Splits> {
    let mut rngs: Vec<ChaCha8Rng> = (0..domains.len() as u64).map(|i| stream(seed, i)).collect();
    let mut held_out = HashSet::new();
    let mut evals = Vec::new();
    for (d, rng) in domains.iter().zip(&mut rngs) {
        let mut items = Vec::with_capacity(sizes.eval);
        let mut misses = 0;
        while items.len() < sizes.eval {
            let it = draw(d, rng);
            if held_out.insert(it.question.clone()) {
                items.push(it);
                misses = 0;
            } else {
                misses += 1;
                if misses > MAX_MISSES {
                    bail!(
                        "domain {}: found only {} distinct eval questions ({MAX_MISSES} draws in \
                         a row gave nothing new); ask for fewer with --eval",
                        d.name,
                        items.len()
                    );
                }
            }
        }
        evals.push(items);
    }
    let mut trains = Vec::new();
    for (d, rng) in domains.iter().zip(&mut rngs) {
        let n = match d.kind {
            Kind::General | Kind::Auxiliary => sizes.general_train,
            Kind::Downstream => sizes.task_train,
        };
        let mut items = Vec::with_capacity(n);
        let mut misses = 0;
        // Repeats within train are allowed (small domains repeat in pretraining anyway);
        // only eval questions are refused.
        while items.len() < n {
            let it = draw(d, rng);
            if held_out.contains(&it.question) {
                misses += 1;
                if misses > MAX_MISSES {
                    bail!(
                        "domain {}: {MAX_MISSES} train draws in a row were eval questions; the \
                         eval split holds (nearly) the whole domain, ask for fewer with --eval",
                        d.name
                    );
                }
            } else {
                items.push(it);
                misses = 0;
            }
        }
        trains.push(items);
    }
    Ok((evals, trains))
}

fn draw(d: &Domain, rng: &mut ChaCha8Rng) -> Item {
    let (q, a) = (d.sample)(rng);
    // The trainer trims both turns; trimming here keeps eval prompts byte-equal to them.
    Item {
        question: q.trim().to_string(),
        answer: a.trim().to_string(),
    }
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct TrainLine<'a> {
    id: usize,
    dataset: &'a str,
    messages: [Message<'a>; 2],
}

/// A pretraining line: the whole exchange as text, every token learned - a base model
/// learns the questions' language too, not only the answers.
#[derive(Serialize)]
struct PretrainLine<'a> {
    id: usize,
    dataset: &'a str,
    text: String,
}

#[derive(Serialize)]
struct EvalLine<'a> {
    idx: usize,
    prompt: String,
    answers: [&'a str; 1],
}

fn train_line(id: usize, dataset: &str, it: &Item) -> Result<String> {
    to_line(&TrainLine {
        id,
        dataset,
        messages: [
            Message {
                role: "user",
                content: &it.question,
            },
            Message {
                role: "assistant",
                content: &it.answer,
            },
        ],
    })
}

fn pretrain_line(id: usize, dataset: &str, it: &Item) -> Result<String> {
    use crate::data::{assistant_turn, user_turn};
    to_line(&PretrainLine {
        id,
        dataset,
        text: user_turn(&it.question) + &assistant_turn(&it.answer),
    })
}

fn train_lines<'a>(name: &'a str, items: &'a [Item]) -> impl Iterator<Item = Result<String>> + 'a {
    items
        .iter()
        .enumerate()
        .map(move |(i, it)| train_line(i, name, it))
}

fn eval_lines(items: &[Item]) -> impl Iterator<Item = Result<String>> + '_ {
    items.iter().enumerate().map(|(idx, it)| {
        to_line(&EvalLine {
            idx,
            // Exactly the training template of the user turn.
            prompt: crate::data::user_turn(&it.question),
            answers: [&it.answer],
        })
    })
}

fn write_lines(path: &Path, lines: impl Iterator<Item = Result<String>>) -> Result<()> {
    let mut text = String::new();
    for line in lines {
        text.push_str(&line?);
        text.push('\n');
    }
    // write_atomic writes a temporary file beside `path` and renames it.
    esft::util::write_atomic(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// JSON with Python's `json.dumps` separators (`", "`, `": "`), the layout of the reference
/// datasets, so lines and intent answers look like theirs.
struct Spaced;

impl serde_json::ser::Formatter for Spaced {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        comma_unless_first(w, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        comma_unless_first(w, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

fn comma_unless_first<W: ?Sized + std::io::Write>(w: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        w.write_all(b", ")
    }
}

/// One value as one line of spaced JSON.
pub(crate) fn to_line<T: Serialize + ?Sized>(v: &T) -> Result<String> {
    let mut buf = Vec::new();
    v.serialize(&mut serde_json::Serializer::with_formatter(
        &mut buf, Spaced,
    ))?;
    Ok(String::from_utf8(buf)?)
}

/// A uniformly chosen element of a non-empty table.
fn pick<'a, T>(rng: &mut ChaCha8Rng, xs: &'a [T]) -> &'a T {
    &xs[rng.random_range(0..xs.len())]
}

#[cfg(test)]
mod tests;
