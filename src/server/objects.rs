//! OpenAI's objects for the records of `jobs/`: the file, the fine-tuning job (with
//! esft's own fields under `esft`), its events and its checkpoints. The records stay
//! plain data; how the API shows them is decided here alone.

use serde_json::{json, Value};

use crate::jobs::files::FileRecord;
use crate::jobs::queue::{result_file_id, Checkpoint, JobEvent, JobRecord, JobSpec, StepMetrics};

/// OpenAI's `file` object.
pub fn file(record: &FileRecord) -> Value {
    json!({
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
        "status_details": null,
        "expires_at": null,
    })
}

/// OpenAI's `fine_tuning.job` object; `organization` names the owner. A job that started
/// has its result file: its step metrics ([`results_csv`]).
pub fn job(job: &JobRecord, organization: &str) -> Value {
    let result_files: Vec<String> = job
        .started_at
        .map(|_| result_file_id(&job.id))
        .into_iter()
        .collect();
    json!({
        "id": job.id,
        "object": "fine_tuning.job",
        "model": job.model,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "estimated_finish": job.estimated_finish,
        "status": job.status.as_str(),
        "fine_tuned_model": job.fine_tuned_model,
        "organization_id": organization,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "hyperparameters": hyperparameters(&job.spec),
        "method": method(&job.spec),
        "seed": job.seed,
        "suffix": job.suffix,
        "trained_tokens": job.trained_tokens,
        "result_files": result_files,
        "error": job.error,
        "metadata": job.metadata,
        "integrations": [],
        "user_provided_suffix": job.suffix,
        "esft": esft(job),
    })
}

/// The job's `esft` object: its adapter, its start, the selection it made and the
/// choices it was made with.
fn esft(job: &JobRecord) -> Value {
    let mut out = json!({
        "adapter": job.adapter,
        "started_at": job.started_at,
        "selection": job.esft,
    });
    if let (Some(o), Ok(Value::Object(choices))) =
        (out.as_object_mut(), serde_json::to_value(&job.spec.esft))
    {
        o.extend(choices);
    }
    out
}

/// OpenAI's `hyperparameters` object.
fn hyperparameters(spec: &JobSpec) -> Value {
    json!({
        "n_epochs": spec.n_epochs,
        "batch_size": spec.batch_size.map_or(json!("auto"), |b| json!(b)),
        "learning_rate_multiplier": spec.learning_rate_multiplier,
    })
}

/// OpenAI's `method` object, esft's choices under `esft`.
fn method(spec: &JobSpec) -> Value {
    json!({
        "type": "supervised",
        "supervised": {"hyperparameters": hyperparameters(spec)},
        "esft": spec.esft,
    })
}

/// The header of a result file: OpenAI's columns (the accuracies are not measured: left
/// empty).
const RESULTS_HEADER: &str =
    "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n";

/// A job's result file, OpenAI's CSV of its steps.
pub fn results_csv(steps: &[StepMetrics]) -> String {
    let mut csv = String::from(RESULTS_HEADER);
    for s in steps {
        let valid = s.valid_loss.map(|v| v.to_string()).unwrap_or_default();
        csv.push_str(&format!("{},{},,{valid},\n", s.step, s.train_loss));
    }
    csv
}

/// The `file` object of a job's result file of `bytes`.
pub fn result_file(job: &JobRecord, bytes: usize) -> Value {
    json!({
        "id": result_file_id(&job.id),
        "object": "file",
        "bytes": bytes,
        "created_at": job.started_at.unwrap_or(job.created_at),
        "filename": "step_metrics.csv",
        "purpose": "fine-tune-results",
        "status": "processed",
        "status_details": null,
        "expires_at": null,
    })
}

/// OpenAI's `fine_tuning.job.event` object.
pub fn event(e: &JobEvent) -> Value {
    json!({
        "id": e.id,
        "object": "fine_tuning.job.event",
        "created_at": e.created_at,
        "level": e.level.as_str(),
        "message": e.message,
        "type": e.kind.as_str(),
        "data": e.data.clone().unwrap_or_else(|| json!({})),
    })
}

/// OpenAI's `fine_tuning.job.checkpoint` object.
pub fn checkpoint(c: &Checkpoint) -> Value {
    json!({
        "id": c.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": c.created_at,
        "fine_tuned_model_checkpoint": c.model,
        "fine_tuning_job_id": c.job_id,
        "metrics": c.metrics,
        "step_number": c.step,
    })
}
