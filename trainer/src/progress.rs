//! Progress of long work: a progress bar on the terminal, or JSON lines on stdout (`--json`)
//! for programs that drive the trainer.
//!
//! A failed `--json` command ends with one `error` line, `{"task", "event": "error", "code",
//! "message"}`, then exits non-zero; `code` is one of [`crate::error::Failure::code`]'s or
//! `internal`.

use indicatif::{ProgressBar, ProgressStyle};
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
    pub fn advance(&mut self, n: u64, fields: Value) {
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
    pub fn event(&self, event: &str, fields: Value) {
        if self.json {
            self.emit(event, fields);
        } else if let Some(bar) = &self.bar {
            bar.println(format!("{event}: {fields}"));
        }
    }

    pub fn finish(self, fields: Value) {
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

/// The `error` line of a failed `task`.
pub fn error_line(task: &str, code: &str, message: &str) -> String {
    json!({"task": task, "event": "error", "code": code, "message": message}).to_string()
}

fn short(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if v.is_f64() => format!("{f:.4}"),
        _ => v.to_string(),
    }
}
