//! The contract between the job runner and `esft-train`, in one place both sides use:
//!
//! - the work directory of a job: the names of its files and where `train` keeps its
//!   resumable state ([`state_dir`]);
//! - the command lines of `score`, `select` and `train` as the runner gives them
//!   ([`ScoreRun`], [`SelectRun`], [`TrainRun`]; the trainer's own tests parse them back);
//! - the JSON lines the trainer prints with `--json` and the runner reads ([`Line`]).
//!
//! Nothing here runs a process or touches a file.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The expert scores `score` writes.
pub const SCORES_FILE: &str = "scores.json";
/// The expert selection `select` writes (an `ExpertConfig`).
pub const EXPERTS_FILE: &str = "experts.json";
/// The training and validation files in a job's work directory, where they are fetched
/// from the object store.
pub const TRAINING_FILE: &str = "training.jsonl";
pub const VALIDATION_FILE: &str = "validation.jsonl";
/// The file of a saved state that is written last: a state is whole once it is there.
pub const STATE_FILE: &str = "state.json";

/// The hidden directory beside `out` where `train` keeps its resumable state; `None`
/// when `out` has no directory name.
pub fn state_dir(out: &Path) -> Option<PathBuf> {
    let name = out.file_name()?.to_str()?;
    Some(out.with_file_name(format!(".{name}.train-state")))
}

/// The step a saved state in `dir` is at, from its [`STATE_FILE`].
pub fn state_step(dir: &Path) -> Option<i64> {
    let text = std::fs::read_to_string(dir.join(STATE_FILE)).ok()?;
    serde_json::from_str::<Value>(&text)
        .ok()?
        .get("step")?
        .as_i64()
}

fn os(parts: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    parts.iter().map(|p| p.as_ref().to_os_string()).collect()
}

/// `esft-train score`: routing scores of the experts on up to `tokens` of `data`.
#[derive(Debug, Clone)]
pub struct ScoreRun<'a> {
    pub model: &'a Path,
    pub data: &'a Path,
    pub tokens: u64,
    pub seed: i64,
    pub out: &'a Path,
}

impl ScoreRun<'_> {
    pub fn argv(&self) -> Vec<OsString> {
        let (tokens, seed) = (self.tokens.to_string(), self.seed.to_string());
        os(&[
            &"score",
            &"--model",
            &self.model,
            &"--data",
            &self.data,
            &"--tokens",
            &tokens,
            &"--seed",
            &seed,
            &"--out",
            &self.out,
            &"--json",
        ])
    }
}

/// `esft-train select`: the experts to train from the scores.
#[derive(Debug, Clone)]
pub struct SelectRun<'a> {
    pub scores: &'a Path,
    /// `token` or `gate`.
    pub score_function: &'a str,
    pub top_p: f64,
    pub train_shared_experts: bool,
    pub train_non_expert_modules: bool,
    pub out: &'a Path,
}

impl SelectRun<'_> {
    pub fn argv(&self) -> Vec<OsString> {
        let top_p = self.top_p.to_string();
        let mut args = os(&[
            &"select",
            &"--scores",
            &self.scores,
            &"--score-function",
            &self.score_function,
            &"--top-p",
            &top_p,
            &"--out",
            &self.out,
            &"--json",
        ]);
        if self.train_shared_experts {
            args.push("--train-shared-experts".into());
        }
        if self.train_non_expert_modules {
            args.push("--train-non-expert-modules".into());
        }
        args
    }
}

/// How many rows a training step takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    Rows(u32),
    /// As many rows as make about this many tokens.
    Tokens(usize),
}

/// How long training runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    Steps(u64),
    Epochs(u32),
}

/// `esft-train train`: the selected experts, resumable, every save also an evaluation.
#[derive(Debug, Clone)]
pub struct TrainRun<'a> {
    pub model: &'a Path,
    pub data: &'a Path,
    /// What the adapter's manifest calls the data (never a server path).
    pub data_name: &'a str,
    /// Validation data and its name; `None`: 2% of the training data is held out.
    pub eval: Option<(&'a Path, &'a str)>,
    pub experts: &'a Path,
    pub out: &'a Path,
    pub lr: f64,
    pub seed: i64,
    pub save_every: u64,
    /// `None`: `auto`.
    pub seq_len: Option<usize>,
    pub batch: Batch,
    pub length: Length,
}

/// The share of the training data held out without validation data.
pub const EVAL_SPLIT: f64 = 0.02;

impl TrainRun<'_> {
    pub fn argv(&self) -> Vec<OsString> {
        let (lr, seed) = (self.lr.to_string(), self.seed.to_string());
        let save = self.save_every.max(1).to_string();
        let mut args = os(&[
            &"train",
            &"--model",
            &self.model,
            &"--data",
            &self.data,
            &"--experts",
            &self.experts,
            &"--out",
            &self.out,
            &"--lr",
            &lr,
            &"--seed",
            &seed,
            &"--warmup",
            &"10",
            &"--schedule",
            &"cosine",
            &"--save-every",
            &save,
            &"--eval-every",
            &save,
            &"--resume",
            &"--json",
        ]);
        let seq_len = self
            .seq_len
            .map_or_else(|| "auto".to_string(), |s| s.to_string());
        args.extend(os(&[&"--seq-len", &seq_len]));
        match self.batch {
            Batch::Rows(b) => args.extend(os(&[&"--batch", &b.to_string()])),
            Batch::Tokens(t) => args.extend(os(&[&"--batch-tokens", &t.to_string()])),
        }
        match self.length {
            Length::Steps(s) => args.extend(os(&[&"--steps", &s.to_string()])),
            Length::Epochs(e) => args.extend(os(&[&"--epochs", &e.to_string()])),
        }
        match self.eval {
            Some((path, name)) => {
                args.extend(os(&[&"--eval-data", &path, &"--eval-data-name", &name]))
            }
            None => args.extend(os(&[&"--eval-split", &EVAL_SPLIT.to_string()])),
        }
        args.extend(os(&[&"--data-name", &self.data_name]));
        args
    }
}

/// `train`'s `start` line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainStart {
    /// The steps the run makes.
    pub steps: u64,
    pub train_samples: u64,
    pub eval_samples: u64,
    pub trainable_params: u64,
    /// Where it starts: above 0 when resumed.
    pub step: u64,
    pub seq_len: u64,
    pub batch: u64,
}

/// `train`'s `progress` line of one optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub step: u64,
    pub total_steps: u64,
    /// Mean target-token cross-entropy.
    pub loss: f64,
    pub balance_loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    /// Tokens of every sample trained on so far, summed over the steps (kept across
    /// `--resume`).
    pub trained_tokens: i64,
}

/// `train`'s `eval` line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Eval {
    pub step: u64,
    pub eval_loss: f64,
    /// Whether it is the best eval loss so far (whose weights the result keeps).
    pub best: bool,
}

/// `train`'s `save` line: a resumable state at `step`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Save {
    pub step: i64,
    pub dir: String,
}

/// `train`'s `done` line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainDone {
    pub out: String,
    pub steps: i64,
    pub trained_tokens: i64,
    pub trainable_params: u64,
    pub seconds: f64,
    pub best_eval_loss: Option<f64>,
    pub best_step: Option<u64>,
}

/// `score`'s `done` line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreDone {
    /// Tokens scored.
    pub tokens: u64,
}

/// The `error` line, the last of a failed command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorLine {
    pub code: String,
    pub message: String,
}

/// A line of `--json` output, as the runner reads it (by its `task` and `event`).
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    TrainStart(TrainStart),
    Step(Step),
    Eval(Eval),
    Save(Save),
    TrainDone(TrainDone),
    ScoreDone(ScoreDone),
    Error(ErrorLine),
    /// A line the runner has no use for (score's progress, a resumed run's first
    /// progress, select's done).
    Other,
}

impl Line {
    /// The line `text`; `None` when it is not a JSON object of this contract.
    pub fn parse(text: &str) -> Option<Line> {
        let v: Value = serde_json::from_str(text).ok()?;
        let event = v.get("event")?.as_str()?.to_string();
        let task = v.get("task").and_then(Value::as_str).unwrap_or_default();
        Some(match (task, event.as_str()) {
            (_, "error") => Line::Error(serde_json::from_value(v).ok()?),
            ("train", "start") => Line::TrainStart(serde_json::from_value(v).ok()?),
            ("train", "progress") if v.get("loss").is_some() => {
                Line::Step(serde_json::from_value(v).ok()?)
            }
            ("train", "eval") => Line::Eval(serde_json::from_value(v).ok()?),
            ("train", "save") => Line::Save(serde_json::from_value(v).ok()?),
            ("train", "done") => Line::TrainDone(serde_json::from_value(v).ok()?),
            ("score", "done") => Line::ScoreDone(serde_json::from_value(v).ok()?),
            _ => Line::Other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_state_sits_hidden_beside_the_adapter() {
        assert_eq!(
            state_dir(Path::new("/w/ftjob-1/acme-x")),
            Some(PathBuf::from("/w/ftjob-1/.acme-x.train-state"))
        );
        assert_eq!(state_dir(Path::new("/")), None);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(state_step(dir.path()), None);
        std::fs::write(dir.path().join(STATE_FILE), r#"{"step": 40, "x": 1}"#).unwrap();
        assert_eq!(state_step(dir.path()), Some(40));
    }

    #[test]
    fn lines_are_read_by_task_and_event() {
        let with = |task: &str, event: &str, fields: Value| {
            let mut v = json!({"task": task, "event": event, "done": 3, "total": 9});
            v.as_object_mut()
                .unwrap()
                .extend(fields.as_object().unwrap().clone());
            Line::parse(&v.to_string())
        };
        let step = Step {
            step: 3,
            total_steps: 9,
            loss: 1.5,
            balance_loss: 0.01,
            lr: 1e-5,
            grad_norm: 0.5,
            tokens_per_s: 900.0,
            trained_tokens: 4096,
        };
        assert_eq!(
            with("train", "progress", serde_json::to_value(&step).unwrap()),
            Some(Line::Step(step))
        );
        // A resumed run's first progress line and score's progress are of no use.
        assert_eq!(
            with(
                "train",
                "progress",
                json!({"resumed_at": 4, "trained_tokens": 9})
            ),
            Some(Line::Other)
        );
        assert_eq!(
            with("score", "progress", json!({"tokens_per_s": 5.0})),
            Some(Line::Other)
        );
        assert_eq!(
            with("score", "done", json!({"tokens": 77})),
            Some(Line::ScoreDone(ScoreDone { tokens: 77 }))
        );
        assert_eq!(
            with(
                "select",
                "error",
                json!({"code": "invalid_data", "message": "m"})
            ),
            Some(Line::Error(ErrorLine {
                code: "invalid_data".into(),
                message: "m".into()
            }))
        );
        // A line of the contract missing a field, or not JSON: not a line.
        assert_eq!(with("train", "save", json!({"dir": "d"})), None);
        assert_eq!(Line::parse("loading weights..."), None);
        assert_eq!(Line::parse("[1, 2]"), None);
    }

    #[test]
    fn argv_names_files_by_their_ids() {
        let run = TrainRun {
            model: Path::new("/m"),
            data: Path::new("/d/training.jsonl"),
            data_name: "file-abc",
            eval: Some((Path::new("/d/validation.jsonl"), "file-def")),
            experts: Path::new("/d/experts.json"),
            out: Path::new("/d/acme-x"),
            lr: 1e-4,
            seed: 3,
            save_every: 0,
            seq_len: None,
            batch: Batch::Tokens(512),
            length: Length::Epochs(2),
        };
        let argv: Vec<String> = run
            .argv()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let after = |flag: &str| {
            let i = argv.iter().position(|a| a == flag).unwrap();
            argv[i + 1].as_str()
        };
        assert_eq!(argv[0], "train");
        assert_eq!(after("--data-name"), "file-abc");
        assert_eq!(after("--eval-data-name"), "file-def");
        assert_eq!(after("--seq-len"), "auto");
        assert_eq!(after("--save-every"), "1");
        assert_eq!(after("--seed"), "3");
        assert!(!argv.iter().any(|a| a == "--eval-split"));
    }
}
