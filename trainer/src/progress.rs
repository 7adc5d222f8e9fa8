//! Progress of long work: a progress bar on the terminal, or JSON lines on stdout (`--json`)
//! for programs that drive the trainer.
//!
//! With `--json` stdout holds only these lines, one JSON object each; the fields the job
//! runner reads are the structs of `esft::jobs::contract`. Every line but `error`
//! has `task` (the subcommand: `score`, `train`, `eval`, `select`), `event`, `done` and
//! `total` (units done and to do: tokens for `score`, optimizer steps for `train`, items for
//! `eval`), and the event's own fields. Field names are stable.
//!
//! - `score`: `progress` (`tokens_per_s`), then `done` (`tokens`: tokens scored).
//! - `select`: `done` (`experts`: experts selected, `layers`, `out`).
//! - `train`:
//!   - `start`: `steps` (the steps the run makes, from `--steps` or `--epochs`),
//!     `train_samples`, `eval_samples`, `trainable_params`, `step` (where it starts: above
//!     0 when resumed);
//!   - `progress`, once more when resumed (`resumed_at`, `trained_tokens`), then once per
//!     step: `step`, `total_steps`, `loss` (mean target-token cross-entropy), `balance_loss`,
//!     `lr`, `grad_norm`, `tokens_per_s`, `trained_tokens` (tokens of every sample trained
//!     on so far, prompts included, summed over the steps; kept across `--resume`);
//!   - `eval`: `step`, `eval_loss`, `best` (whether it is the best eval loss so far, whose
//!     weights the result keeps);
//!   - `save`: `step`, `dir` (the resumable state);
//!   - `done`: `out`, `steps`, `trained_tokens`, `trainable_params`, `seconds`,
//!     `best_eval_loss` and `best_step` (null without eval data).
//! - `eval`: `progress`, `done` (the summary itself is printed after them).
//! - `error`, the last line of any failed command, then a non-zero exit: `task`, `event`,
//!   `code` and `message` only. `code` is `invalid_data` (a data line is refused: its
//!   format, its tokens, longer than `--seq-len`, nothing to learn), `data_too_small` (no
//!   sample, or too few for the eval split), `nan_loss` (the loss became NaN or infinite;
//!   nothing is written) or `internal` (anything else). A data error's `message` names the
//!   file without its directories.

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{json, Value};

pub struct Progress {
    task: &'static str,
    bar: Option<ProgressBar>,
    json: bool,
    done: u64,
    total: u64,
}

impl Progress {
    pub fn new(task: &'static str, total: u64, unit: &str, json: bool) -> Self {
        let bar = (!json).then(|| {
            let bar = ProgressBar::new(total);
            let template = format!(
                "{task:>6} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {unit} ({{eta}}) {{msg}}"
            );
            if let Ok(style) = ProgressStyle::with_template(&template) {
                bar.set_style(style);
            }
            bar
        });
        Self {
            task,
            bar,
            json,
            done: 0,
            total,
        }
    }

    /// Moves on by `n` units; `fields` (a JSON object) describe the state, e.g. the loss.
    pub fn advance(&mut self, n: u64, fields: impl Serialize) {
        let fields = object(fields);
        self.done += n;
        if self.json {
            self.emit("progress", fields);
        } else if let Some(bar) = &self.bar {
            bar.inc(n);
            let msg = fields
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| format!("{k}={}", short(v)))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            bar.set_message(msg);
        }
    }

    /// A notable event (an evaluation, a save) that is not a unit of progress.
    pub fn event(&self, event: &str, fields: impl Serialize) {
        let fields = object(fields);
        if self.json {
            self.emit(event, fields);
        } else if let Some(bar) = &self.bar {
            bar.println(format!("{event}: {fields}"));
        }
    }

    pub fn finish(self, fields: impl Serialize) {
        let fields = object(fields);
        if self.json {
            self.emit("done", fields);
        } else if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    fn emit(&self, event: &str, fields: Value) {
        let mut line = json!({
            "task": self.task,
            "event": event,
            "done": self.done,
            "total": self.total,
        });
        if let (Some(l), Some(f)) = (line.as_object_mut(), fields.as_object()) {
            l.extend(f.clone());
        }
        println!("{line}");
    }
}

/// A line's fields as a JSON object (the contract's structs always are one).
fn object(fields: impl Serialize) -> Value {
    serde_json::to_value(fields).unwrap_or_else(|_| json!({}))
}

/// The `error` line of a failed `task`.
pub fn error_line(task: &str, code: &str, message: &str) -> String {
    let mut line = json!({"task": task, "event": "error"});
    let fields = object(esft::jobs::contract::ErrorLine {
        code: code.to_string(),
        message: message.to_string(),
    });
    if let (Some(l), Some(f)) = (line.as_object_mut(), fields.as_object()) {
        l.extend(f.clone());
    }
    line.to_string()
}

fn short(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if v.is_f64() => format!("{f:.4}"),
        _ => v.to_string(),
    }
}
