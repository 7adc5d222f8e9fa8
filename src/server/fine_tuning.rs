//! OpenAI's fine-tuning API: `POST /v1/fine_tuning/jobs`, `GET /v1/fine_tuning/jobs`,
//! `GET /v1/fine_tuning/jobs/{id}`, `POST /v1/fine_tuning/jobs/{id}/cancel`,
//! `GET /v1/fine_tuning/jobs/{id}/events`, `GET /v1/fine_tuning/jobs/{id}/checkpoints`,
//! and esft's `POST /v1/fine_tuning/expert_selection` (the experts a job would train,
//! without training). HTTP only: the request's checks and defaults, who owns what, and
//! OpenAI's shapes; the records are [`crate::jobs::queue`]'s and the work
//! [`crate::jobs::runner`]'s. A tenant sees only its own jobs (another's answer 404, as an
//! absent one does) and may train only on its own files; the admin sees every job.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Arc;

use super::auth::Caller;
use super::body::ApiJson;
use super::errors::{files_error, jobs_error, ApiError};
use super::files::page_limit;
use super::objects;
use super::AppState;
use crate::jobs::files::PURPOSE_FINE_TUNE;
use crate::jobs::queue::{
    new_job_id, EsftChoices, EventKind, JobEvent, JobRecord, JobSpec, JobsError, Level, NewJob,
    ScoreFunction, Status,
};

/// ESFT's base learning rate (the multiplier scales it): high, as training a few experts
/// needs. With [`DEFAULT_EPOCHS`] and the automatic batch, a job on 3,000 examples of a
/// demo task takes 2.5-3.5 minutes on one core and learns the task (law 40/40, intent
/// 18/40 held-out items, the base 0/40).
pub const BASE_LEARNING_RATE: f64 = 1e-2;
/// Epochs when `n_epochs` is `auto`.
pub const DEFAULT_EPOCHS: u32 = 2;
/// Routed tokens of the training data that score the experts (the demo reproduction's).
pub const DEFAULT_SCORING_TOKENS: u64 = 32_768;
/// The paper's Token Selection Ratio threshold.
pub const DEFAULT_TOP_P: f64 = 0.2;

const MAX_SUFFIX: usize = 64;
const MAX_METADATA: usize = 16;
const MAX_JOBS_LIST: usize = 100;
const MAX_EVENTS_LIST: usize = 10_000;

/// Who a job's records name as its organization.
fn organization(job: &JobRecord) -> &str {
    job.owner.as_deref().unwrap_or("esft")
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("No such fine-tuning job: {id}"))
        .param("fine_tuning_job_id")
        .code("fine_tuning_job_not_found")
}

/// A hyperparameter: a number or `"auto"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Auto {
    Number(f64),
    Word(String),
}

/// Reads `value` as `"auto"` (`None`) or a number in `range`; `whole` numbers only when
/// set. `param` names it in errors.
fn auto_number(
    value: Option<&Value>,
    param: &str,
    whole: bool,
    range: (f64, f64),
) -> Result<Option<f64>, ApiError> {
    let Some(v) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let what = if whole { "a whole number" } else { "a number" };
    let bad = || {
        ApiError::invalid(
            param,
            format!(
                "`{param}` must be \"auto\" or {what} from {} to {}",
                range.0, range.1
            ),
        )
    };
    match serde_json::from_value::<Auto>(v.clone()).map_err(|_| bad())? {
        Auto::Word(w) if w == "auto" => Ok(None),
        Auto::Word(_) => Err(bad()),
        Auto::Number(n) => {
            if !n.is_finite() || n < range.0 || n > range.1 || (whole && n.fract() != 0.0) {
                return Err(bad());
            }
            Ok(Some(n))
        }
    }
}

fn boolean(value: Option<&Value>, param: &str) -> Result<Option<bool>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::invalid(
            param,
            format!("`{param}` must be true or false"),
        )),
    }
}

/// What a job may ask for: the context bounds `seq_len`, the configuration the rest.
struct Caps {
    max_context: usize,
    max_steps: u64,
    max_epochs: u64,
    max_scoring_tokens: u64,
}

impl Caps {
    fn of(state: &AppState, max_context: usize) -> Self {
        let ft = &state.config.fine_tuning;
        Self {
            max_context,
            max_steps: ft.max_steps,
            max_epochs: ft.max_epochs,
            max_scoring_tokens: ft.max_scoring_tokens,
        }
    }
}

/// The hyperparameters and esft choices of a request, resolved. `hyper` is OpenAI's
/// `hyperparameters` object, `esft` esft's own; `max_context` bounds `seq_len`.
fn resolve_spec(
    hyper: Option<&Value>,
    hyper_param: &str,
    esft: Option<&Value>,
    esft_param: &str,
    caps: &Caps,
) -> Result<JobSpec, ApiError> {
    let max_context = caps.max_context;
    let empty = Map::new();
    let object = |v: Option<&Value>, param: &str| -> Result<Map<String, Value>, ApiError> {
        match v {
            None | Some(Value::Null) => Ok(empty.clone()),
            Some(Value::Object(o)) => Ok(o.clone()),
            Some(_) => Err(ApiError::invalid(
                param,
                format!("`{param}` must be an object"),
            )),
        }
    };
    let h = object(hyper, hyper_param)?;
    let known = ["n_epochs", "batch_size", "learning_rate_multiplier"];
    if let Some(k) = h.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(ApiError::invalid(
            &format!("{hyper_param}.{k}"),
            format!("unknown hyperparameter `{k}` (known: {})", known.join(", ")),
        ));
    }
    let p = |k: &str| format!("{hyper_param}.{k}");
    let n_epochs = auto_number(
        h.get("n_epochs"),
        &p("n_epochs"),
        true,
        (1.0, caps.max_epochs as f64),
    )?;
    let batch_size = auto_number(h.get("batch_size"), &p("batch_size"), true, (1.0, 1024.0))?;
    let multiplier = auto_number(
        h.get("learning_rate_multiplier"),
        &p("learning_rate_multiplier"),
        false,
        (1e-6, 1e3),
    )?;

    let e = object(esft, esft_param)?;
    let known = [
        "score_function",
        "top_p",
        "train_shared_experts",
        "train_non_expert_modules",
        "steps",
        "learning_rate",
        "scoring_tokens",
        "seq_len",
    ];
    if let Some(k) = e.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(ApiError::invalid(
            &format!("{esft_param}.{k}"),
            format!("unknown esft choice `{k}` (known: {})", known.join(", ")),
        ));
    }
    let q = |k: &str| format!("{esft_param}.{k}");
    let score_function = match e.get("score_function") {
        None | Some(Value::Null) => ScoreFunction::Token,
        Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
            ApiError::invalid(
                &q("score_function"),
                format!("`{}` must be \"token\" or \"gate\"", q("score_function")),
            )
        })?,
    };
    let top_p = match e.get("top_p") {
        None | Some(Value::Null) => DEFAULT_TOP_P,
        Some(v) => v
            .as_f64()
            .filter(|p| *p > 0.0 && *p <= 1.0)
            .ok_or_else(|| {
                ApiError::invalid(
                    &q("top_p"),
                    format!("`{}` must be a number above 0, at most 1", q("top_p")),
                )
            })?,
    };
    let train_shared_experts =
        boolean(e.get("train_shared_experts"), &q("train_shared_experts"))?.unwrap_or(false);
    let train_non_expert_modules = boolean(
        e.get("train_non_expert_modules"),
        &q("train_non_expert_modules"),
    )?
    .unwrap_or(false);
    let steps = auto_number(
        e.get("steps"),
        &q("steps"),
        true,
        (1.0, caps.max_steps as f64),
    )?;
    let learning_rate = auto_number(
        e.get("learning_rate"),
        &q("learning_rate"),
        false,
        (1e-9, 1e6),
    )?;
    let scoring_tokens = auto_number(
        e.get("scoring_tokens"),
        &q("scoring_tokens"),
        true,
        (1.0, caps.max_scoring_tokens as f64),
    )?;
    let longest = max_context.max(16) as f64;
    let seq_len = auto_number(e.get("seq_len"), &q("seq_len"), true, (16.0, longest))?;
    let multiplier = multiplier.unwrap_or(1.0);
    Ok(JobSpec {
        n_epochs: n_epochs.map_or(DEFAULT_EPOCHS.min(caps.max_epochs as u32), |n| n as u32),
        batch_size: batch_size.map(|b| b as u32),
        learning_rate_multiplier: multiplier,
        esft: EsftChoices {
            score_function,
            top_p,
            train_shared_experts,
            train_non_expert_modules,
            steps: steps.map(|s| s as u64),
            learning_rate: learning_rate.unwrap_or(BASE_LEARNING_RATE * multiplier),
            scoring_tokens: scoring_tokens
                .map_or(DEFAULT_SCORING_TOKENS.min(caps.max_scoring_tokens), |t| {
                    t as u64
                }),
            seq_len: seq_len.map(|s| s as usize),
        },
    })
}

/// The body of `POST /v1/fine_tuning/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    model: String,
    training_file: String,
    #[serde(default)]
    validation_file: Option<String>,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
    /// The older place of the hyperparameters.
    #[serde(default)]
    hyperparameters: Option<Value>,
    #[serde(default)]
    method: Option<Value>,
    #[serde(default)]
    esft: Option<Value>,
    #[serde(default)]
    integrations: Option<Vec<Value>>,
}

/// A JSON object of a request and the name of where it was.
type Located<'a> = (Option<&'a Value>, &'static str);

/// Where the hyperparameters and the esft choices are in a create request: OpenAI's
/// `method.supervised.hyperparameters` (or the older top-level `hyperparameters`), and
/// `method.esft` or a top-level `esft`.
fn located_choices(b: &CreateJob) -> Result<[Located<'_>; 2], ApiError> {
    let mut hyper = (b.hyperparameters.as_ref(), "hyperparameters");
    let mut esft = (b.esft.as_ref(), "esft");
    if let Some(m) = &b.method {
        let m = m
            .as_object()
            .ok_or_else(|| ApiError::invalid("method", "`method` must be an object"))?;
        match m.get("type").and_then(Value::as_str) {
            Some("supervised") => {}
            Some(t @ ("dpo" | "reinforcement")) => {
                return Err(ApiError::invalid(
                    "method.type",
                    format!("the `{t}` method is not supported: esft trains `supervised` jobs"),
                )
                .code("unsupported_method"))
            }
            _ => {
                return Err(ApiError::invalid(
                    "method.type",
                    "`method.type` must be \"supervised\"",
                ))
            }
        }
        if let Some(k) = m
            .keys()
            .find(|k| !["type", "supervised", "esft"].contains(&k.as_str()))
        {
            return Err(ApiError::invalid(
                &format!("method.{k}"),
                format!("`method.{k}` is not supported for supervised jobs"),
            ));
        }
        if let Some(h) = m
            .get("supervised")
            .filter(|s| !s.is_null())
            .map(|s| {
                s.as_object().ok_or_else(|| {
                    ApiError::invalid("method.supervised", "`method.supervised` must be an object")
                })
            })
            .transpose()?
            .and_then(|s| s.get("hyperparameters"))
        {
            if hyper.0.is_some() {
                return Err(ApiError::invalid(
                    "hyperparameters",
                    "give the hyperparameters in `method` or at the top level, not both",
                ));
            }
            hyper = (Some(h), "method.supervised.hyperparameters");
        }
        if let Some(e) = m.get("esft") {
            if esft.0.is_some() {
                return Err(ApiError::invalid(
                    "esft",
                    "give the esft choices in `method.esft` or at the top level, not both",
                ));
            }
            esft = (Some(e), "method.esft");
        }
    }
    Ok([hyper, esft])
}

fn check_suffix(suffix: &str) -> Result<(), ApiError> {
    if suffix.is_empty()
        || suffix.len() > MAX_SUFFIX
        || !suffix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(ApiError::invalid(
            "suffix",
            format!("`suffix` must be 1 to {MAX_SUFFIX} characters of a-z, 0-9 and '-'"),
        ));
    }
    Ok(())
}

fn check_metadata(m: &Map<String, Value>) -> Result<(), ApiError> {
    if m.len() > MAX_METADATA {
        return Err(ApiError::invalid(
            "metadata",
            format!("`metadata` may hold at most {MAX_METADATA} pairs"),
        ));
    }
    for (k, v) in m {
        let ok = k.len() <= 64 && v.as_str().is_some_and(|s| s.len() <= 512);
        if !ok {
            return Err(ApiError::invalid(
                "metadata",
                "`metadata` keys must be at most 64 characters and values strings of at most 512",
            ));
        }
    }
    Ok(())
}

/// The adapter name of a job: `ft:<base>:<suffix>:<the job id's first 8 characters>`
/// (characters an adapter name cannot hold become '-').
pub fn adapter_name(base: &str, suffix: Option<&str>, job_id: &str) -> String {
    let clean: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(48)
        .collect();
    let short: String = job_id
        .trim_start_matches("ftjob-")
        .chars()
        .take(8)
        .collect::<String>()
        .to_ascii_lowercase();
    format!("ft:{clean}:{}:{short}", suffix.unwrap_or(""))
}

/// Checks that `id` is a fine-tuning file of the owner with at least `min` examples
/// (counted off the async workers); `param` names it in errors.
async fn check_file(
    state: &AppState,
    caller: &Caller,
    id: &str,
    param: &'static str,
    min: usize,
) -> Result<(), ApiError> {
    let store = state.files().await?;
    let record = store
        .get(caller.tenant(), id)
        .await
        .map_err(|e| ApiError::logged("reading the files database", &e))?
        .ok_or_else(|| {
            jobs_error(JobsError::NoSuchFile {
                param,
                id: id.to_string(),
            })
        })?;
    if record.purpose != PURPOSE_FINE_TUNE {
        return Err(ApiError::invalid(
            param,
            format!(
                "the file {id} was uploaded for `{}`, not `{PURPOSE_FINE_TUNE}`",
                record.purpose
            ),
        )
        .code("invalid_file_purpose"));
    }
    let count = store
        .samples(&record)
        .await
        .map_err(files_error)?
        .map_err(|e| {
            ApiError::invalid(param, format!("the file is not valid training data: {e}"))
                .code("invalid_training_file")
        })?;
    if count < min {
        return Err(ApiError::invalid(
            param,
            format!("the file {id} holds {count} examples; a job needs at least {min}"),
        )
        .code("invalid_training_file"));
    }
    Ok(())
}

/// The base model a request names (404 for anything else).
fn check_model(state: &AppState, model: &str) -> Result<Arc<super::Served>, ApiError> {
    let served = state.served()?;
    if model != served.base_id {
        return Err(ApiError::not_found(format!(
            "the model `{model}` cannot be fine-tuned here: the base model is `{}`",
            served.base_id
        ))
        .param("model")
        .code("model_not_found"));
    }
    Ok(served)
}

/// `POST /v1/fine_tuning/jobs`.
pub async fn create(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateJob>,
) -> Result<Json<Value>, ApiError> {
    let served = check_model(&state, &body.model)?;
    if let Some(s) = &body.suffix {
        check_suffix(s)?;
    }
    if let Some(m) = &body.metadata {
        check_metadata(m)?;
    }
    if body.integrations.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(ApiError::invalid(
            "integrations",
            "integrations are not supported",
        ));
    }
    let [(hyper, hyper_param), (esft, esft_param)] = located_choices(&body)?;
    let caps = Caps::of(&state, served.max_context);
    let spec = resolve_spec(hyper, hyper_param, esft, esft_param, &caps)?;
    if spec.esft.train_non_expert_modules {
        return Err(ApiError::invalid(
            &format!("{esft_param}.train_non_expert_modules"),
            "an adapter that replaces non-expert modules cannot be served per request: train it with `esft-train` and merge it into a checkpoint",
        )
        .code("unsupported_choice"));
    }
    let ft = &state.config.fine_tuning;
    check_file(
        &state,
        &caller,
        &body.training_file,
        "training_file",
        ft.min_training_examples,
    )
    .await?;
    if let Some(v) = &body.validation_file {
        check_file(&state, &caller, v, "validation_file", 1).await?;
    }
    let runner = state.runner().await?;
    let jobs = state.jobs().await?;
    let id = new_job_id();
    let adapter = adapter_name(&served.base_id, body.suffix.as_deref(), &id);
    crate::adapter::format::validate_name(&adapter)
        .map_err(|e| ApiError::invalid("suffix", e.to_string()))?;
    let job = jobs
        .create(NewJob {
            id,
            adapter,
            owner: caller.tenant().map(str::to_string),
            model: body.model,
            training_file: body.training_file,
            validation_file: body.validation_file,
            suffix: body.suffix,
            seed: body
                .seed
                .unwrap_or_else(|| i64::from(rand::random::<u32>())),
            metadata: body.metadata.map(Value::Object),
            spec,
        })
        .await
        .map_err(jobs_error)?;
    let job_id = job.id.clone();
    let record = |level, message: String| {
        let jobs = jobs.clone();
        let id = job_id.clone();
        async move {
            jobs.event(&id, level, EventKind::Message, &message, None)
                .await
                .map_err(jobs_error)
        }
    };
    record(
        Level::Info,
        format!("Validating training file: {}", job.training_file),
    )
    .await?;
    if let Some(v) = &job.validation_file {
        record(Level::Info, format!("Validating validation file: {v}")).await?;
    }
    let mut job = job;
    if jobs.queue_validated(&job.id).await.map_err(jobs_error)? {
        // The job as it was queued: the runner may claim it before this answer is sent.
        job.status = Status::Queued;
    } else {
        // Cancelled meanwhile: answer what it is now.
        job = jobs
            .get(None, &job.id)
            .await
            .map_err(jobs_error)?
            .ok_or_else(|| not_found(&job.id))?;
    }
    runner.wake();
    tracing::info!(job = %job.id, by = caller.label(), adapter = %job.adapter, "fine-tuning job created");
    Ok(Json(objects::job(&job, organization(&job))))
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    after: Option<String>,
    limit: Option<String>,
    #[serde(flatten)]
    rest: HashMap<String, String>,
}

/// `GET /v1/fine_tuning/jobs`: the caller's jobs, newest first; `metadata[k]=v` filters.
pub async fn list(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = page_limit(q.limit.as_deref(), 20, MAX_JOBS_LIST)?;
    let mut metadata = Vec::new();
    for (k, v) in q.rest {
        match k
            .strip_prefix("metadata[")
            .and_then(|k| k.strip_suffix(']'))
        {
            Some(key) => metadata.push((key.to_string(), v)),
            None => {
                return Err(ApiError::invalid(
                    &k,
                    format!("unknown query parameter `{k}`"),
                ))
            }
        }
    }
    let jobs = state.jobs().await?;
    let page = jobs
        .list(caller.tenant(), q.after.as_deref(), limit, &metadata)
        .await
        .map_err(jobs_error)?;
    let data: Vec<Value> = page
        .items
        .iter()
        .map(|j| objects::job(j, organization(j)))
        .collect();
    Ok(Json(
        json!({"object": "list", "data": data, "has_more": page.has_more}),
    ))
}

async fn visible_job(state: &AppState, caller: &Caller, id: &str) -> Result<JobRecord, ApiError> {
    state
        .jobs()
        .await?
        .get(caller.tenant(), id)
        .await
        .map_err(jobs_error)?
        .ok_or_else(|| not_found(id))
}

/// `GET /v1/fine_tuning/jobs/{id}`.
pub async fn get(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = visible_job(&state, &caller, &id).await?;
    Ok(Json(objects::job(&job, organization(&job))))
}

/// `POST /v1/fine_tuning/jobs/{id}/cancel`: the job's child is killed at once and its work
/// removed; a job that already ended is refused (400).
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let jobs = state.jobs().await?;
    let (job, changed) = jobs
        .cancel(caller.tenant(), &id)
        .await
        .map_err(jobs_error)?
        .ok_or_else(|| not_found(&id))?;
    if !changed {
        return Err(ApiError::invalid(
            "fine_tuning_job_id",
            format!(
                "the job {id} has already ended ({}); only a job that is validating, queued or running can be cancelled",
                job.status.as_str()
            ),
        )
        .code("job_not_cancellable"));
    }
    if let Ok(runner) = state.runner().await {
        runner.cancel(&id);
    }
    tracing::info!(job = %id, by = caller.label(), "fine-tuning job cancelled");
    Ok(Json(objects::job(&job, organization(&job))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    after: Option<String>,
    limit: Option<String>,
}

/// An event as `caller` may see it. A worker is named by its host, process id and claim
/// (for the operator); a tenant sees it by an alias, a digest of that name, so nothing it
/// reads names a machine or a process of the service.
fn event_for(caller: &Caller, e: &JobEvent) -> Value {
    let mut v = objects::event(e);
    if caller.is_admin() {
        return v;
    }
    let worker = e.data.as_ref().and_then(|d| d.get("worker"));
    if let Some(w) = worker.and_then(Value::as_str).filter(|w| !w.is_empty()) {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(w.as_bytes());
        let alias: String = format!("worker-{}", hex::encode(&digest[..6]));
        if let Some(m) = v["message"].as_str() {
            v["message"] = m.replace(w, &alias).into();
        }
        v["data"]["worker"] = alias.into();
    }
    v
}

/// `GET /v1/fine_tuning/jobs/{id}/events`: newest first.
pub async fn events(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = page_limit(q.limit.as_deref(), 20, MAX_EVENTS_LIST)?;
    visible_job(&state, &caller, &id).await?;
    let page = state
        .jobs()
        .await?
        .events(&id, q.after.as_deref(), limit)
        .await
        .map_err(jobs_error)?;
    let data: Vec<Value> = page.items.iter().map(|e| event_for(&caller, e)).collect();
    Ok(Json(
        json!({"object": "list", "data": data, "has_more": page.has_more}),
    ))
}

/// `GET /v1/fine_tuning/jobs/{id}/checkpoints`: newest (highest step) first.
pub async fn checkpoints(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = page_limit(q.limit.as_deref(), 10, MAX_EVENTS_LIST)?;
    visible_job(&state, &caller, &id).await?;
    let page = state
        .jobs()
        .await?
        .checkpoints(&id, q.after.as_deref(), limit)
        .await
        .map_err(jobs_error)?;
    let data: Vec<Value> = page.items.iter().map(objects::checkpoint).collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "has_more": page.has_more,
        "first_id": page.items.first().map(|c| &c.id),
        "last_id": page.items.last().map(|c| &c.id),
    })))
}

/// The body of `POST /v1/fine_tuning/expert_selection`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewBody {
    model: String,
    training_file: String,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    esft: Option<Value>,
}

/// The error codes the trainer reports, as codes of an HTTP error.
fn trainer_code(code: &str) -> &'static str {
    match code {
        "data_too_small" => "data_too_small",
        "invalid_data" => "invalid_data",
        "internal_error" => "internal_error",
        _ => "scoring_failed",
    }
}

/// `POST /v1/fine_tuning/expert_selection`: scores the experts on the training file and
/// answers the selection a job with these choices would train (nothing is trained).
pub async fn expert_selection(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    ApiJson(body): ApiJson<PreviewBody>,
) -> Result<Json<Value>, ApiError> {
    let served = check_model(&state, &body.model)?;
    let spec = resolve_spec(
        None,
        "hyperparameters",
        body.esft.as_ref(),
        "esft",
        &Caps::of(&state, served.max_context),
    )?;
    check_file(&state, &caller, &body.training_file, "training_file", 1).await?;
    let runner = state.runner().await?;
    let selection = runner
        .preview(
            caller.tenant(),
            &body.training_file,
            spec.esft,
            body.seed.unwrap_or(0),
        )
        .await
        .map_err(|e| match e.code.as_str() {
            "preview_in_progress" => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", e.message)
                    .code("preview_in_progress")
            }
            "preview_unavailable" => ApiError::unavailable(e.message).code("preview_unavailable"),
            "preview_timeout" => ApiError::unavailable(e.message).code("preview_timeout"),
            "internal_error" => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.message)
                    .code("internal_error")
            }
            code => ApiError::invalid("training_file", e.message).code(trainer_code(code)),
        })?;
    let mut out = json!({
        "object": "fine_tuning.expert_selection",
        "model": body.model,
        "training_file": body.training_file,
    });
    if let (Some(o), Value::Object(s)) = (out.as_object_mut(), selection) {
        o.extend(s);
    }
    Ok(Json(out))
}
