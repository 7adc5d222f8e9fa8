//! Fine-tuning jobs' records: the `jobs` table (what a job asked for, where it stands, what
//! it produced), its append-only `job_events` and its `job_checkpoints`, and the queue
//! order in which jobs are claimed.
//!
//! Every state change is one conditional `UPDATE` (`... WHERE status IN (...)`), so a
//! cancel racing the runner's own transitions has exactly one winner, and a terminal
//! status is never left again. A running job is held by one claim at a time ([`Lease`]:
//! `worker` and `lease_expires_at` on its row), and what its worker writes is conditional
//! on still holding it; an expired lease puts the job back in the queue. A job names its files by id; while a job is active
//! (`validating_files`, `queued`, `running`) the files it names cannot be deleted (see
//! [`super::files::FileStore::delete`]). Owners and visibility follow the files: `None`
//! is the admin, a viewer `None` sees every job. Knows nothing of HTTP or of how a job
//! runs.

use rand::distr::{Alphanumeric, SampleString};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::Row;

use super::db::{self, now, now_ms, Backend, DbRow, Pool, Sql};
use super::lifecycle::{Actor, Transition};
pub use super::lifecycle::{Level, Status};
use std::time::Duration;

/// How experts are scored for selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreFunction {
    /// Token Selection Ratio.
    Token,
    /// Average Gate Score.
    Gate,
}

impl ScoreFunction {
    pub fn as_str(self) -> &'static str {
        match self {
            ScoreFunction::Token => "token",
            ScoreFunction::Gate => "gate",
        }
    }
}

/// ESFT's choices of a job, resolved (no `auto` left).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EsftChoices {
    pub score_function: ScoreFunction,
    /// Cumulative score each layer's selected experts reach.
    pub top_p: f64,
    pub train_shared_experts: bool,
    pub train_non_expert_modules: bool,
    /// Optimizer steps; `None`: from `n_epochs`.
    pub steps: Option<u64>,
    /// The learning rate (the base rate times the multiplier unless given).
    pub learning_rate: f64,
    /// Tokens of the training data routed to score the experts.
    pub scoring_tokens: u64,
    /// Tokens per packed training row (also the longest sample); `None`: the longest
    /// sample's length, rounded up.
    pub seq_len: Option<usize>,
}

/// Training tokens per step when the batch size is automatic.
pub const AUTO_BATCH_TOKENS: usize = 512;

/// What a job trains with, resolved at creation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub n_epochs: u32,
    /// Packed rows of `esft.seq_len` tokens per optimizer step; `None`: as many as make
    /// about [`AUTO_BATCH_TOKENS`] tokens.
    pub batch_size: Option<u32>,
    pub learning_rate_multiplier: f64,
    pub esft: EsftChoices,
}

/// Why a job failed: OpenAI's job `error` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

impl JobError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_string(),
            message: message.into(),
            param: None,
        }
    }
}

/// A job's record.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// `ftjob-` and 24 letters and digits.
    pub id: String,
    pub owner: Option<String>,
    /// The base model's id.
    pub model: String,
    pub status: Status,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub estimated_finish: Option<i64>,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub suffix: Option<String>,
    pub seed: i64,
    pub metadata: Option<Value>,
    pub spec: JobSpec,
    /// The adapter name the job installs on success.
    pub adapter: String,
    /// `adapter`, once installed.
    pub fine_tuned_model: Option<String>,
    pub trained_tokens: Option<i64>,
    pub error: Option<JobError>,
    /// The expert selection (filled once selection is done).
    pub esft: Option<Value>,
    /// The holder of the job's last claim (see [`Lease`]); kept after it ends.
    pub worker: Option<String>,
}

const COLUMNS: &str = "id, owner, model, status, created_at, started_at, finished_at, \
    estimated_finish, training_file, validation_file, suffix, seed, metadata, spec, adapter, \
    fine_tuned_model, trained_tokens, error, esft, worker";

fn json_column<T: serde::de::DeserializeOwned>(
    row: &DbRow,
    name: &str,
) -> Result<Option<T>, sqlx::Error> {
    let text: Option<String> = row.try_get(name)?;
    text.map(|t| {
        serde_json::from_str(&t).map_err(|e| sqlx::Error::ColumnDecode {
            index: name.to_string(),
            source: Box::new(e),
        })
    })
    .transpose()
}

impl JobRecord {
    fn from_row(row: &DbRow) -> Result<Self, sqlx::Error> {
        let status: String = row.try_get("status")?;
        Ok(Self {
            id: row.try_get("id")?,
            owner: row.try_get("owner")?,
            model: row.try_get("model")?,
            status: Status::parse(&status).ok_or_else(|| sqlx::Error::ColumnDecode {
                index: "status".into(),
                source: format!("unknown job status {status:?}").into(),
            })?,
            created_at: row.try_get("created_at")?,
            started_at: row.try_get("started_at")?,
            finished_at: row.try_get("finished_at")?,
            estimated_finish: row.try_get("estimated_finish")?,
            training_file: row.try_get("training_file")?,
            validation_file: row.try_get("validation_file")?,
            suffix: row.try_get("suffix")?,
            seed: row.try_get("seed")?,
            metadata: json_column(row, "metadata")?,
            spec: json_column(row, "spec")?.ok_or_else(|| sqlx::Error::ColumnDecode {
                index: "spec".into(),
                source: "no spec".into(),
            })?,
            adapter: row.try_get("adapter")?,
            fine_tuned_model: row.try_get("fine_tuned_model")?,
            trained_tokens: row.try_get("trained_tokens")?,
            error: json_column(row, "error")?,
            esft: json_column(row, "esft")?,
            worker: row.try_get("worker")?,
        })
    }

    pub fn visible_to(&self, viewer: Option<&str>) -> bool {
        viewer.is_none() || self.owner.as_deref() == viewer
    }
}

/// One event of a job's log.
#[derive(Debug, Clone, PartialEq)]
pub struct JobEvent {
    /// `ftevent-` and 24 letters and digits.
    pub id: String,
    pub job_id: String,
    /// Order within the job, from 1.
    pub seq: i64,
    pub created_at: i64,
    pub level: Level,
    pub kind: EventKind,
    pub message: String,
    pub data: Option<Value>,
}

/// `message` (prose) or `metrics` (a training step's numbers in `data`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Message,
    Metrics,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Message => "message",
            EventKind::Metrics => "metrics",
        }
    }
}

impl JobEvent {
    fn from_row(row: &DbRow) -> Result<Self, sqlx::Error> {
        let level: String = row.try_get("level")?;
        let kind: String = row.try_get("kind")?;
        Ok(Self {
            id: row.try_get("id")?,
            job_id: row.try_get("job_id")?,
            seq: row.try_get("seq")?,
            created_at: row.try_get("created_at")?,
            level: Level::parse(&level),
            kind: if kind == "metrics" {
                EventKind::Metrics
            } else {
                EventKind::Message
            },
            message: row.try_get("message")?,
            data: json_column(row, "data")?,
        })
    }
}

/// A saved point of a job's training.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// `ftckpt-` and 24 letters and digits.
    pub id: String,
    pub job_id: String,
    pub step: i64,
    pub created_at: i64,
    pub metrics: Value,
    /// The model name of the checkpoint.
    pub model: String,
}

impl Checkpoint {
    fn from_row(row: &DbRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: row.try_get("id")?,
            job_id: row.try_get("job_id")?,
            step: row.try_get("step")?,
            created_at: row.try_get("created_at")?,
            metrics: json_column(row, "metrics")?.unwrap_or_else(|| json!({})),
            model: row.try_get("model")?,
        })
    }
}

/// One optimizer step's numbers (the `job_metrics` table: every step of a job, one
/// narrow row each).
#[derive(Debug, Clone, PartialEq)]
pub struct StepMetrics {
    pub step: i64,
    pub created_at: i64,
    pub train_loss: f64,
    /// The validation loss measured at this step, if one was.
    pub valid_loss: Option<f64>,
    pub learning_rate: f64,
    pub tokens_per_s: f64,
    pub trained_tokens: i64,
}

impl StepMetrics {
    fn from_row(row: &DbRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            step: row.try_get("step")?,
            created_at: row.try_get("created_at")?,
            train_loss: row.try_get("train_loss")?,
            valid_loss: row.try_get("valid_loss")?,
            learning_rate: row.try_get("learning_rate")?,
            tokens_per_s: row.try_get("tokens_per_s")?,
            trained_tokens: row.try_get("trained_tokens")?,
        })
    }
}

/// The prefix of the id of a job's result file (its step metrics), the job's id after it.
const RESULT_FILE_PREFIX: &str = "file-ftresult-";

/// The id of the result file of the job `job_id`.
pub fn result_file_id(job_id: &str) -> String {
    format!(
        "{RESULT_FILE_PREFIX}{}",
        job_id.strip_prefix("ftjob-").unwrap_or(job_id)
    )
}

/// The job whose result file `file_id` is, if it is one.
pub fn job_of_result_file(file_id: &str) -> Option<String> {
    file_id
        .strip_prefix(RESULT_FILE_PREFIX)
        .filter(|rest| !rest.is_empty())
        .map(|rest| format!("ftjob-{rest}"))
}

/// A job as created (everything the caller chose, resolved).
#[derive(Debug, Clone)]
pub struct NewJob {
    pub owner: Option<String>,
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub suffix: Option<String>,
    pub seed: i64,
    pub metadata: Option<Value>,
    pub spec: JobSpec,
    /// From [`new_job_id`].
    pub id: String,
    /// The adapter name the job installs on success.
    pub adapter: String,
}

/// `ftjob-` and 24 random letters and digits.
pub fn new_job_id() -> String {
    format!("ftjob-{}", Alphanumeric.sample_string(&mut rand::rng(), 24))
}

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    /// A file the job names does not exist or belongs to someone else.
    #[error("no file `{id}`")]
    NoSuchFile { param: &'static str, id: String },
    /// `after` names nothing the caller may see.
    #[error("no {what} `{id}`")]
    NoSuchCursor { what: &'static str, id: String },
    /// The owner has as many active jobs as it may.
    #[error("{active} jobs are already queued or running; at most {limit} may be")]
    Quota { active: u64, limit: u64 },
    #[error("{0}")]
    Db(#[from] sqlx::Error),
}

/// A hold on a running job: its holder (written on the job as `worker`) and how long a
/// claim or renewal holds. Every write a worker makes to a job it runs (progress, events,
/// checkpoints, its end) is conditional on the job still naming this holder, so a holder
/// that lost its lease (it stalled, the job was cancelled or taken over) can change
/// nothing of the job any more. A runner takes a holder of its own for every claim
/// ([`worker_id`] and a claim number), so even a job it loses and claims again is fenced
/// from the earlier attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub worker: String,
    pub duration: Duration,
}

impl Lease {
    /// Unix milliseconds at which a claim or renewal made now expires.
    pub fn expiry(&self) -> i64 {
        now_ms().saturating_add(i64::try_from(self.duration.as_millis()).unwrap_or(i64::MAX))
    }
}

/// A new worker id for this process: `host/pid/random` (the random part tells a restarted
/// process with the same pid from its predecessor). A claim's holder is this and
/// `/<claim number>`.
pub fn worker_id() -> String {
    format!(
        "{}/{}/{}",
        hostname(),
        std::process::id(),
        Alphanumeric.sample_string(&mut rand::rng(), 8)
    )
}

use crate::util::hostname;

/// Whether the holder `id` (a [`worker_id`], or one and a claim number) belongs to a
/// process of this host that is gone: an earlier process with this process's pid, or a
/// pid with no process. `this` is this process's worker id. Another host's holder, or a
/// live process's, is not known to be gone.
pub fn worker_is_gone(id: &str, this: &str) -> bool {
    let mut parts = id.split('/');
    let (Some(host), Some(pid), Some(random)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    crate::util::process_is_gone(host, pid, format!("{host}/{pid}/{random}") == this)
}

/// What a lease renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Still held, for another lease duration.
    Held,
    /// The job was cancelled.
    Cancelled,
    /// Another worker holds the job, or it ended.
    Lost,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub has_more: bool,
}

/// The PostgreSQL channel on which a job's move to `queued` is announced.
const QUEUED_CHANNEL: &str = "esft_jobs_queued";

/// Rows read per query by a job listing filtered on metadata.
const LIST_BATCH: usize = 256;

pub struct JobStore {
    pool: Pool,
    /// Most active jobs per owner (0: no limit).
    max_active_per_owner: db::PerOwner,
}

impl JobStore {
    pub fn new(pool: Pool, max_active_per_owner: u64) -> Self {
        Self {
            pool,
            max_active_per_owner: db::PerOwner::all(max_active_per_owner),
        }
    }

    /// Owners whose quota of active jobs is their own, not the default.
    pub fn with_owner_quotas(mut self, owners: std::collections::HashMap<String, u64>) -> Self {
        self.max_active_per_owner.owners = owners;
        self
    }

    /// Records a new job in `validating_files`: refused when a file it names is not the
    /// owner's (or is gone) or when the owner already has its quota of active jobs.
    /// The quota check and the insert are one transaction under the owner's lock
    /// ([`db::lock_owner`]): creations through any number of processes at once never pass
    /// the quota together.
    pub async fn create(&self, new: NewJob) -> Result<JobRecord, JobsError> {
        let mut tx = self.pool.begin().await?;
        db::lock_owner(&mut tx, new.owner.as_deref()).await?;
        let limit = self.max_active_per_owner.of(new.owner.as_deref());
        if limit > 0 {
            let active = Self::active_count(&mut tx, new.owner.as_deref()).await?;
            if active >= limit {
                return Err(JobsError::Quota { active, limit });
            }
        }
        let record = JobRecord {
            id: new.id,
            owner: new.owner,
            model: new.model,
            status: Status::ValidatingFiles,
            created_at: now(),
            started_at: None,
            finished_at: None,
            estimated_finish: None,
            training_file: new.training_file,
            validation_file: new.validation_file,
            suffix: new.suffix,
            seed: new.seed,
            metadata: new.metadata,
            spec: new.spec,
            adapter: new.adapter,
            fine_tuned_model: None,
            trained_tokens: None,
            error: None,
            esft: None,
            worker: None,
        };
        let spec =
            serde_json::to_string(&record.spec).map_err(|e| sqlx::Error::Encode(e.into()))?;
        let metadata = record.metadata.as_ref().map(Value::to_string);
        // One statement: the row goes in only while the files exist and are the owner's,
        // so a concurrent delete of a file either comes first (no job) or sees the job.
        let mut q = Sql::new(format!("INSERT INTO jobs ({COLUMNS}) SELECT "));
        q.push_bind(record.id.clone())
            .push(", ")
            .push_bind(record.owner.clone())
            .push(", ")
            .push_bind(record.model.clone())
            .push(", ")
            .push_bind(record.status.as_str())
            .push(", ")
            .push_bind(record.created_at)
            .push(", NULL, NULL, NULL, ")
            .push_bind(record.training_file.clone())
            .push(", ")
            .push_bind(record.validation_file.clone())
            .push(", ")
            .push_bind(record.suffix.clone())
            .push(", ")
            .push_bind(record.seed)
            .push(", ")
            .push_bind(metadata)
            .push(", ")
            .push_bind(spec)
            .push(", ")
            .push_bind(record.adapter.clone())
            .push(", NULL, NULL, NULL, NULL, NULL");
        let files = [
            ("training_file", Some(&record.training_file)),
            ("validation_file", record.validation_file.as_ref()),
        ];
        let owned = |q: &mut Sql, file: &String| {
            q.push("EXISTS (SELECT 1 FROM files WHERE id = ")
                .push_bind(file.clone());
            match &record.owner {
                Some(o) => q.push(" AND owner = ").push_bind(o.clone()),
                None => &mut *q,
            };
            q.push(")");
        };
        q.push(" WHERE 1 = 1");
        for (_, file) in &files {
            if let Some(file) = file {
                q.push(" AND ");
                owned(&mut q, file);
            }
        }
        if q.build().execute(&mut *tx).await?.rows_affected() == 1 {
            tx.commit().await?;
            return Ok(record);
        }
        drop(tx);
        for (param, file) in files {
            let Some(file) = file else { continue };
            // An integer, not a boolean: SQLite has no boolean type to read back.
            let mut q = Sql::new("SELECT CASE WHEN ");
            owned(&mut q, file);
            q.push(" THEN 1 ELSE 0 END AS found");
            let found: i64 = q.build().fetch_one(&self.pool).await?.try_get("found")?;
            if found == 0 {
                return Err(JobsError::NoSuchFile {
                    param,
                    id: file.clone(),
                });
            }
        }
        Err(JobsError::NoSuchFile {
            param: "training_file",
            id: record.training_file,
        })
    }

    async fn active_count(
        tx: &mut sqlx::Transaction<'_, db::Db>,
        owner: Option<&str>,
    ) -> Result<u64, sqlx::Error> {
        let mut q = Sql::new(format!(
            "SELECT COUNT(*) AS n FROM jobs WHERE status IN {}",
            Status::sql_list(&Status::ACTIVE)
        ));
        match owner {
            Some(o) => q.push(" AND owner = ").push_bind(o.to_string()),
            None => q.push(" AND owner IS NULL"),
        };
        let row = q.build().fetch_one(&mut **tx).await?;
        Ok(u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or(0))
    }

    /// The job `id`, if `viewer` may see it.
    pub async fn get(
        &self,
        viewer: Option<&str>,
        id: &str,
    ) -> Result<Option<JobRecord>, JobsError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM jobs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let record = row.as_ref().map(JobRecord::from_row).transpose()?;
        Ok(record.filter(|r| r.visible_to(viewer)))
    }

    /// The jobs `viewer` may see, newest first, after the job `after`.
    pub async fn list(
        &self,
        viewer: Option<&str>,
        after: Option<&str>,
        limit: usize,
        metadata: &[(String, String)],
    ) -> Result<Page<JobRecord>, JobsError> {
        let cursor = match after {
            Some(a) => Some(
                self.get(viewer, a)
                    .await?
                    .ok_or_else(|| JobsError::NoSuchCursor {
                        what: "fine-tuning job",
                        id: a.to_string(),
                    })?,
            ),
            None => None,
        };
        // Pages of rows in the listing's order, each a bounded SQL query after the last
        // row seen: without metadata filters one page of `limit + 1` rows answers; with
        // them (metadata is a JSON text column, matched here) pages are read until enough
        // match, never the caller's whole history at once.
        let batch = if metadata.is_empty() {
            limit.saturating_add(1)
        } else {
            LIST_BATCH.max(limit.saturating_add(1))
        };
        let mut last: Option<(i64, String)> = cursor.map(|c| (c.created_at, c.id));
        let mut items = Vec::new();
        loop {
            let mut q = Sql::new(format!("SELECT {COLUMNS} FROM jobs WHERE 1 = 1"));
            if let Some(v) = viewer {
                q.push(" AND owner = ").push_bind(v.to_string());
            }
            if let Some((at, id)) = &last {
                q.push(" AND (created_at < ")
                    .push_bind(*at)
                    .push(" OR (created_at = ")
                    .push_bind(*at)
                    .push(" AND id < ")
                    .push_bind(id.clone())
                    .push("))");
            }
            q.push(" ORDER BY created_at DESC, id DESC LIMIT ")
                .push_bind(i64::try_from(batch).unwrap_or(i64::MAX));
            let rows = q.build().fetch_all(&self.pool).await?;
            let full = rows.len() == batch;
            for row in &rows {
                let r = JobRecord::from_row(row)?;
                last = Some((r.created_at, r.id.clone()));
                let matches = metadata.iter().all(|(k, v)| {
                    r.metadata
                        .as_ref()
                        .and_then(|m| m.get(k))
                        .and_then(Value::as_str)
                        == Some(v.as_str())
                });
                if !matches {
                    continue;
                }
                if items.len() == limit {
                    return Ok(Page {
                        items,
                        has_more: true,
                    });
                }
                items.push(r);
            }
            if !full {
                return Ok(Page {
                    items,
                    has_more: false,
                });
            }
        }
    }

    /// Announces that a job may be claimed (PostgreSQL's `NOTIFY`, which
    /// [`Self::watch_queue`] hears in every process); nothing on SQLite, whose other
    /// processes find it when they next poll.
    async fn announce_queued(&self) {
        if Backend::of(&self.pool) == Backend::Postgres {
            let sent = sqlx::query("SELECT pg_notify($1, '')")
                .bind(QUEUED_CHANNEL)
                .execute(&self.pool)
                .await;
            if let Err(e) = sent {
                tracing::warn!("announcing a queued job: {e}");
            }
        }
    }

    /// On PostgreSQL, calls `on_queued` (on the current tokio runtime) whenever any
    /// process moves a job to `queued` (`LISTEN`, on a connection of its own that is made
    /// again whenever it drops); returns false, and does nothing, on SQLite.
    pub fn watch_queue(&self, on_queued: impl Fn() + Send + Sync + 'static) -> bool {
        if Backend::of(&self.pool) != Backend::Postgres {
            return false;
        }
        let url = self.pool.connect_options().database_url.to_string();
        tokio::spawn(async move {
            loop {
                match sqlx::postgres::PgListener::connect(&url).await {
                    Ok(mut listener) => match listener.listen(QUEUED_CHANNEL).await {
                        Ok(()) => {
                            // A job queued while nobody listened is found by the next claim.
                            on_queued();
                            while listener.recv().await.is_ok() {
                                on_queued();
                            }
                        }
                        Err(e) => tracing::warn!("listening for queued jobs: {e}"),
                    },
                    Err(e) => tracing::warn!("connecting to listen for queued jobs: {e}"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        true
    }

    /// Makes the transition `t` of the job `id` (see [`Transition::rule`]): one
    /// conditional `UPDATE` (the status among the rule's `from`, and, for a holder's
    /// transition, `holder` still holding it) and its event, in one transaction. `sets`
    /// are the transition's own columns; `fill` fills the `{names}` of the event's
    /// message. The job as it is after, or `None` (nothing changed) when it was not in a
    /// status the transition leaves from, or `holder` no longer held it.
    async fn apply(
        &self,
        id: &str,
        t: Transition,
        holder: Option<&str>,
        sets: &[(&str, Val)],
        fill: &[(&str, &str)],
        data: Option<Value>,
    ) -> Result<Option<JobRecord>, JobsError> {
        let rule = t.rule();
        let at = now();
        let update = || {
            let mut q = Sql::new("UPDATE jobs SET status = ");
            q.push_bind(rule.to.as_str());
            status_columns(&mut q, rule.to, at);
            for (column, value) in sets {
                q.push(format!(", {column} = "));
                value.bind(&mut q);
            }
            q.push(" WHERE id = ")
                .push_bind(id.to_string())
                .push(format!(" AND status IN {}", Status::sql_list(rule.from)));
            if rule.by == Actor::Holder {
                q.push(" AND worker = ")
                    .push_bind(holder.unwrap_or_default().to_string());
            }
            q.push(format!(" RETURNING {COLUMNS}"));
            q
        };
        let changed = self
            .change_with_event(update, rule.level, &fill_in(rule.message, fill), data)
            .await?;
        if changed.is_some() && rule.to == Status::Queued {
            self.announce_queued().await;
        }
        Ok(changed)
    }

    /// Runs `update` (an `UPDATE ... RETURNING` of at most one job's row) and appends that
    /// job's event in one transaction: whoever sees the change also sees its event.
    /// `None` (nothing changed) when `update` matched no row. An event appended
    /// concurrently can take the event's number; the transaction is then rolled back and
    /// run again.
    async fn change_with_event(
        &self,
        update: impl Fn() -> Sql,
        level: Level,
        message: &str,
        data: Option<Value>,
    ) -> Result<Option<JobRecord>, JobsError> {
        let data = data.map(|d| d.to_string());
        let mut tries = 0;
        loop {
            let mut tx = self.pool.begin().await?;
            let q = update();
            let Some(row) = q.build().fetch_optional(&mut *tx).await? else {
                return Ok(None);
            };
            let record = JobRecord::from_row(&row)?;
            let event = insert_event(
                &mut *tx,
                &record.id,
                level,
                EventKind::Message,
                message,
                data.clone(),
            )
            .await;
            tries += 1;
            match event {
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() && tries < 10 => {}
                Err(e) => return Err(e.into()),
                Ok(()) => {
                    tx.commit().await?;
                    return Ok(Some(record));
                }
            }
        }
    }

    /// [`Transition::Validated`]: puts a job whose files were checked in the queue. False
    /// (nothing changed) when it is no longer validating its files (cancelled).
    pub async fn queue_validated(&self, id: &str) -> Result<bool, JobsError> {
        let done = self
            .apply(id, Transition::Validated, None, &[], &[], None)
            .await?;
        Ok(done.is_some())
    }

    /// [`Transition::Succeed`]: ends a running job as succeeded; false (nothing changed)
    /// when it is no longer running or `worker` no longer holds it.
    pub async fn succeed(
        &self,
        id: &str,
        worker: &str,
        model: &str,
        trained_tokens: i64,
    ) -> Result<bool, JobsError> {
        let sets = [
            ("fine_tuned_model", Val::Text(model.to_string())),
            ("trained_tokens", Val::Int(trained_tokens)),
        ];
        let data = json!({"fine_tuned_model": model});
        let done = self
            .apply(
                id,
                Transition::Succeed,
                Some(worker),
                &sets,
                &[("model", model)],
                Some(data),
            )
            .await?;
        Ok(done.is_some())
    }

    /// [`Transition::Fail`]: ends the running job `id` as failed with `error`, while
    /// `worker` holds it; false when it does not.
    pub async fn fail_held(
        &self,
        id: &str,
        worker: &str,
        error: &JobError,
    ) -> Result<bool, JobsError> {
        let text = serde_json::to_string(error).map_err(|e| sqlx::Error::Encode(e.into()))?;
        let data = json!({"code": error.code});
        let done = self
            .apply(
                id,
                Transition::Fail,
                Some(worker),
                &[("error", Val::Text(text))],
                &[("error", &error.message)],
                Some(data),
            )
            .await?;
        Ok(done.is_some())
    }

    /// [`Transition::Cancel`]: cancels `id` if `viewer` may see it and it is active.
    /// `Ok(None)`: no such job; `Ok(Some((record, false)))`: it had already ended (its
    /// record unchanged).
    pub async fn cancel(
        &self,
        viewer: Option<&str>,
        id: &str,
    ) -> Result<Option<(JobRecord, bool)>, JobsError> {
        let Some(before) = self.get(viewer, id).await? else {
            return Ok(None);
        };
        match self
            .apply(id, Transition::Cancel, None, &[], &[], None)
            .await?
        {
            Some(after) => Ok(Some((after, true))),
            None => Ok(self
                .get(viewer, id)
                .await?
                .or(Some(before))
                .map(|r| (r, false))),
        }
    }

    /// [`Transition::Claim`]: claims the next queued job for `lease.worker`: a job of the
    /// owner with the fewest running jobs, the oldest of those (so one tenant's backlog
    /// never holds another's job back behind all of it). The worker holds it until
    /// `lease.duration` from now unless it renews ([`Self::renew`]): one `UPDATE` of the
    /// row its sub-select picks, safe when several processes share the database (each job
    /// is claimed once; see [`Backend::claim_lock`] for the one part that differs between
    /// backends). Jobs whose holder stopped renewing come back to the queue through
    /// [`Self::requeue_expired`].
    pub async fn claim_next(&self, lease: &Lease) -> Result<Option<JobRecord>, JobsError> {
        let rule = Transition::Claim.rule();
        let (queued, running) = (Status::sql_list(rule.from), Status::Running.as_str());
        let at = now();
        let update = || {
            let mut q = Sql::new("UPDATE jobs SET status = ");
            q.push_bind(rule.to.as_str());
            status_columns(&mut q, rule.to, at);
            q.push(", worker = ")
                .push_bind(lease.worker.clone())
                .push(", lease_expires_at = ")
                .push_bind(lease.expiry())
                .push(format!(
                    " WHERE status IN {queued} AND id = (SELECT id FROM jobs q \
                     WHERE status IN {queued} ORDER BY (SELECT COUNT(*) FROM jobs r \
                     WHERE r.status = '{running}' AND r.owner IS NOT DISTINCT FROM q.owner), \
                     created_at, id LIMIT 1{}) RETURNING {COLUMNS}",
                    Backend::of(&self.pool).claim_lock()
                ));
            q
        };
        let message = fill_in(rule.message, &[("worker", &lease.worker)]);
        let data = json!({"worker": lease.worker});
        self.change_with_event(update, rule.level, &message, Some(data))
            .await
    }

    /// [`Transition::Expire`]: puts back in the queue every running job whose lease has
    /// expired (or that has none: a job a process without leases left running), each
    /// with its event naming the worker that lost it; returns those jobs' ids. One
    /// conditional `UPDATE`: of two processes doing this at once, each job is put back by
    /// one, and a renewal that lands first keeps the job where it is.
    pub async fn requeue_expired(&self) -> Result<Vec<String>, JobsError> {
        let rule = Transition::Expire.rule();
        let mut tx = self.pool.begin().await?;
        let mut q = Sql::new("UPDATE jobs SET status = ");
        q.push_bind(rule.to.as_str());
        status_columns(&mut q, rule.to, now());
        q.push(format!(
            " WHERE status IN {} AND (lease_expires_at IS NULL OR lease_expires_at < ",
            Status::sql_list(rule.from)
        ))
        .push_bind(now_ms())
        .push(") RETURNING id, worker");
        let rows = q.build().fetch_all(&mut *tx).await?;
        let mut ids = Vec::new();
        for row in &rows {
            let id: String = row.try_get("id")?;
            let worker: Option<String> = row.try_get("worker")?;
            let message = fill_in(
                rule.message,
                &[("worker", worker.as_deref().unwrap_or("(none)"))],
            );
            let data = json!({"worker": worker}).to_string();
            insert_event(
                &mut *tx,
                &id,
                rule.level,
                EventKind::Message,
                &message,
                Some(data),
            )
            .await?;
            ids.push(id);
        }
        tx.commit().await?;
        if !ids.is_empty() {
            self.announce_queued().await;
        }
        Ok(ids)
    }

    /// [`Transition::Release`]: puts the running job `id` back in the queue at once if
    /// `worker` still holds it (its holder is known to be gone, or gives it up);
    /// `reason` starts the event's message.
    pub async fn release(&self, id: &str, worker: &str, reason: &str) -> Result<bool, JobsError> {
        let data = json!({"worker": worker});
        let done = self
            .apply(
                id,
                Transition::Release,
                Some(worker),
                &[],
                &[("reason", reason)],
                Some(data),
            )
            .await?;
        Ok(done.is_some())
    }
    /// Extends `lease.worker`'s lease on the running job `id` to `lease.duration` from
    /// now. [`Renewal::Lost`] when the job is no longer running or another worker holds
    /// it: its holder must stop working on it.
    pub async fn renew(&self, id: &str, lease: &Lease) -> Result<Renewal, JobsError> {
        let done = sqlx::query(&format!(
            "UPDATE jobs SET lease_expires_at = $1 \
             WHERE id = $2 AND {} $3",
            held_by()
        ))
        .bind(lease.expiry())
        .bind(id)
        .bind(lease.worker.as_str())
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(Renewal::Held);
        }
        Ok(match self.status(id).await? {
            Some(Status::Cancelled) => Renewal::Cancelled,
            _ => Renewal::Lost,
        })
    }

    /// The running jobs and their holders, oldest first: `(id, worker)`.
    pub async fn running_holders(&self) -> Result<Vec<(String, Option<String>)>, JobsError> {
        let rows = sqlx::query(&format!(
            "SELECT id, worker FROM jobs WHERE status = '{RUNNING}' ORDER BY created_at, id",
            RUNNING = Status::Running.as_str()
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("worker")?)))
            .collect()
    }

    /// Jobs in `status`, oldest first.
    pub async fn with_status(&self, status: Status) -> Result<Vec<JobRecord>, JobsError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM jobs WHERE status = $1 ORDER BY created_at, id"
        ))
        .bind(status.as_str())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(JobRecord::from_row)
            .collect::<Result<_, _>>()?)
    }

    /// The job's current status.
    pub async fn status(&self, id: &str) -> Result<Option<Status>, JobsError> {
        let row = sqlx::query("SELECT status FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row
            .map(|r| r.try_get::<String, _>("status"))
            .transpose()?
            .and_then(|s| Status::parse(&s)))
    }

    /// Records the expert selection of a running job while `worker` holds it; false when
    /// it does not.
    pub async fn set_selection(
        &self,
        id: &str,
        worker: &str,
        esft: &Value,
    ) -> Result<bool, JobsError> {
        let done = sqlx::query(&format!(
            "UPDATE jobs SET esft = $1 WHERE id = $2 AND {HELD} $3",
            HELD = held_by()
        ))
        .bind(esft.to_string())
        .bind(id)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records how far a running job is, while `worker` holds it; false when it does not.
    pub async fn set_progress(
        &self,
        id: &str,
        worker: &str,
        trained_tokens: i64,
        estimated_finish: Option<i64>,
    ) -> Result<bool, JobsError> {
        let done = sqlx::query(&format!(
            "UPDATE jobs SET trained_tokens = $1, estimated_finish = $2 \
             WHERE id = $3 AND {} $4",
            held_by()
        ))
        .bind(trained_tokens)
        .bind(estimated_finish)
        .bind(id)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Appends an event to a job's log. Its `seq` is the job's last plus one, taken in the
    /// insert itself; where two appends to one job race (PostgreSQL runs them at once) the
    /// loser hits the `(job_id, seq)` key and tries again with the next number.
    pub async fn event(
        &self,
        job_id: &str,
        level: Level,
        kind: EventKind,
        message: &str,
        data: Option<&Value>,
    ) -> Result<(), JobsError> {
        let data = data.map(Value::to_string);
        let mut tries = 0;
        loop {
            let inserted =
                insert_event(&self.pool, job_id, level, kind, message, data.clone()).await;
            tries += 1;
            match inserted {
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() && tries < 10 => {}
                other => return other.map_err(JobsError::from),
            }
        }
    }

    /// [`Self::event`] by the worker running the job: appended only while `worker` holds
    /// it (false, nothing appended, when it does not).
    pub async fn held_event(
        &self,
        job_id: &str,
        worker: &str,
        level: Level,
        kind: EventKind,
        message: &str,
        data: Option<&Value>,
    ) -> Result<bool, JobsError> {
        let data = data.map(Value::to_string);
        let mut tries = 0;
        loop {
            let inserted = sqlx::query(&format!(
                "INSERT INTO job_events (id, job_id, seq, created_at, level, kind, message, data) \
                 SELECT $1, $2, (SELECT COALESCE(MAX(seq), 0) + 1 FROM job_events \
                 WHERE job_id = $2), $3, $4, $5, $6, $7 \
                 FROM jobs WHERE id = $2 AND {} $8",
                held_by()
            ))
            .bind(new_event_id())
            .bind(job_id)
            .bind(now())
            .bind(level.as_str())
            .bind(kind.as_str())
            .bind(message)
            .bind(data.clone())
            .bind(worker)
            .execute(&self.pool)
            .await;
            tries += 1;
            match inserted {
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() && tries < 10 => {}
                Err(e) => return Err(e.into()),
                Ok(done) => return Ok(done.rows_affected() == 1),
            }
        }
    }

    /// A job's events, newest first, after the event `after`.
    pub async fn events(
        &self,
        job_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<JobEvent>, JobsError> {
        let rows = self
            .job_rows(
                "job_events",
                "id, job_id, seq, created_at, level, kind, message, data",
                "seq",
                ("event", job_id, after, limit),
            )
            .await?;
        page(rows.iter().map(JobEvent::from_row), limit)
    }

    /// Records a checkpoint of a running job while `worker` holds it (a second one of the
    /// same step replaces nothing); false when the worker does not hold the job.
    pub async fn checkpoint(
        &self,
        job_id: &str,
        worker: &str,
        step: i64,
        metrics: &Value,
        model: &str,
    ) -> Result<bool, JobsError> {
        let held = sqlx::query(&format!(
            "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM jobs \
             WHERE id = $1 AND {} $2",
            held_by()
        ))
        .bind(job_id)
        .bind(worker)
        .fetch_one(&self.pool)
        .await?
        .try_get::<i64, _>("n")?;
        if held == 0 {
            return Ok(false);
        }
        sqlx::query(&format!(
            "INSERT INTO job_checkpoints (id, job_id, step, created_at, metrics, model) \
             SELECT $1, $2, $3, $4, $5, $6 FROM jobs \
             WHERE id = $2 AND {} $7 \
             ON CONFLICT (job_id, step) DO NOTHING",
            held_by()
        ))
        .bind(format!(
            "ftckpt-{}",
            Alphanumeric.sample_string(&mut rand::rng(), 24)
        ))
        .bind(job_id)
        .bind(step)
        .bind(now())
        .bind(metrics.to_string())
        .bind(model)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(true)
    }

    /// The steps of a job's recorded checkpoints, highest first, at most `limit`.
    pub async fn checkpoint_steps(
        &self,
        job_id: &str,
        limit: usize,
    ) -> Result<Vec<i64>, JobsError> {
        let rows = sqlx::query(
            "SELECT step FROM job_checkpoints WHERE job_id = $1 ORDER BY step DESC LIMIT $2",
        )
        .bind(job_id)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| r.try_get::<i64, _>("step"))
            .collect::<Result<_, _>>()?)
    }

    /// A job's checkpoints, newest (highest step) first, after the checkpoint `after`.
    pub async fn checkpoints(
        &self,
        job_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<Checkpoint>, JobsError> {
        let rows = self
            .job_rows(
                "job_checkpoints",
                "id, job_id, step, created_at, metrics, model",
                "step",
                ("checkpoint", job_id, after, limit),
            )
            .await?;
        page(rows.iter().map(Checkpoint::from_row), limit)
    }

    /// Up to `limit + 1` rows (`columns`) of `table` for one job, highest `order` first,
    /// after the row whose id is `after` (a `what` of that job).
    async fn job_rows(
        &self,
        table: &str,
        columns: &str,
        order: &str,
        (what, job_id, after, limit): (&'static str, &str, Option<&str>, usize),
    ) -> Result<Vec<DbRow>, JobsError> {
        let mut q = Sql::new(format!("SELECT {columns} FROM {table} WHERE job_id = "));
        q.push_bind(job_id.to_string());
        if let Some(a) = after {
            let row = sqlx::query(&format!(
                "SELECT {order} FROM {table} WHERE id = $1 AND job_id = $2"
            ))
            .bind(a)
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| JobsError::NoSuchCursor {
                what,
                id: a.to_string(),
            })?;
            q.push(format!(" AND {order} < "))
                .push_bind(row.try_get::<i64, _>(order)?);
        }
        q.push(format!(" ORDER BY {order} DESC LIMIT "))
            .push_bind(i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX));
        Ok(q.build().fetch_all(&self.pool).await?)
    }

    /// Records the numbers of one training step of a running job while `worker` holds
    /// it (a step trained again after a resume replaces its row); false when it does not.
    pub async fn record_step(
        &self,
        job_id: &str,
        worker: &str,
        m: &StepMetrics,
    ) -> Result<bool, JobsError> {
        let done = sqlx::query(&format!(
            "INSERT INTO job_metrics (job_id, step, created_at, train_loss, valid_loss, \
             learning_rate, tokens_per_s, trained_tokens) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8 FROM jobs WHERE id = $1 AND {} $9 \
             ON CONFLICT (job_id, step) DO UPDATE SET created_at = excluded.created_at, \
             train_loss = excluded.train_loss, valid_loss = excluded.valid_loss, \
             learning_rate = excluded.learning_rate, tokens_per_s = excluded.tokens_per_s, \
             trained_tokens = excluded.trained_tokens",
            held_by()
        ))
        .bind(job_id)
        .bind(m.step)
        .bind(m.created_at)
        .bind(m.train_loss)
        .bind(m.valid_loss)
        .bind(m.learning_rate)
        .bind(m.tokens_per_s)
        .bind(m.trained_tokens)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records the validation loss measured at `step` on that step's row, while `worker`
    /// holds the job.
    pub async fn record_valid_loss(
        &self,
        job_id: &str,
        worker: &str,
        step: i64,
        loss: f64,
    ) -> Result<bool, JobsError> {
        let done = sqlx::query(&format!(
            "UPDATE job_metrics SET valid_loss = $1 WHERE job_id = $2 AND step = $3 \
             AND EXISTS (SELECT 1 FROM jobs WHERE id = $2 AND {} $4)",
            held_by()
        ))
        .bind(loss)
        .bind(job_id)
        .bind(step)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Up to `limit` of a job's recorded steps, in order, after step `after`.
    pub async fn steps(
        &self,
        job_id: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StepMetrics>, JobsError> {
        let rows = sqlx::query(
            "SELECT step, created_at, train_loss, valid_loss, learning_rate, tokens_per_s, \
             trained_tokens FROM job_metrics WHERE job_id = $1 AND step > $2 \
             ORDER BY step LIMIT $3",
        )
        .bind(job_id)
        .bind(after)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(StepMetrics::from_row)
            .collect::<Result<_, _>>()?)
    }

    /// Removes the jobs that ended before `before` (Unix seconds), with their events,
    /// checkpoints and step metrics, in one transaction; returns how many went. (Their
    /// work was removed when they ended.)
    pub async fn remove_ended_before(&self, before: i64) -> Result<u64, JobsError> {
        let ended = Status::sql_list(
            &Status::ALL
                .into_iter()
                .filter(|s| !s.is_active())
                .collect::<Vec<_>>(),
        );
        let old = format!(
            "SELECT id FROM jobs WHERE status IN {ended} AND finished_at IS NOT NULL \
             AND finished_at < $1"
        );
        let mut tx = self.pool.begin().await?;
        for table in ["job_events", "job_checkpoints", "job_metrics"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE job_id IN ({old})"))
                .bind(before)
                .execute(&mut *tx)
                .await?;
        }
        let gone = sqlx::query(&format!("DELETE FROM jobs WHERE id IN ({old})"))
            .bind(before)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(gone)
    }

    /// Jobs by status, every status listed.
    pub async fn counts(&self) -> Result<Vec<(Status, u64)>, JobsError> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
            .fetch_all(&self.pool)
            .await?;
        let mut out: Vec<(Status, u64)> = Status::ALL.iter().map(|s| (*s, 0)).collect();
        for row in &rows {
            let s: String = row.try_get("status")?;
            let n: i64 = row.try_get("n")?;
            if let Some(slot) = out.iter_mut().find(|(st, _)| st.as_str() == s) {
                slot.1 = u64::try_from(n).unwrap_or(0);
            }
        }
        Ok(out)
    }
}

/// The condition of a holder's write, the bind of the holder to follow: the job runs
/// and its `worker` is the holder.
fn held_by() -> String {
    format!("status = '{}' AND worker =", Status::Running.as_str())
}

/// A value of a column a transition sets.
enum Val {
    Text(String),
    Int(i64),
}

impl Val {
    fn bind(&self, q: &mut Sql) {
        match self {
            Val::Text(t) => q.push_bind(t.clone()),
            Val::Int(i) => q.push_bind(*i),
        };
    }
}

/// The columns that follow from the status a transition goes `to` at the time `at`:
/// a start time once running, a finish time once ended, no lease or estimate unless
/// running.
fn status_columns(q: &mut Sql, to: Status, at: i64) {
    match to {
        Status::Running => {
            q.push(", started_at = COALESCE(started_at, ")
                .push_bind(at)
                .push(")");
        }
        Status::ValidatingFiles | Status::Queued => {
            q.push(", lease_expires_at = NULL, estimated_finish = NULL");
        }
        Status::Succeeded | Status::Failed | Status::Cancelled => {
            q.push(", finished_at = ")
                .push_bind(at)
                .push(", lease_expires_at = NULL, estimated_finish = NULL");
        }
    }
}

/// `template` with each `{name}` of `fill` replaced by its value.
fn fill_in(template: &str, fill: &[(&str, &str)]) -> String {
    fill.iter().fold(template.to_string(), |m, (name, value)| {
        m.replace(&format!("{{{name}}}"), value)
    })
}

/// A page of at most `limit` items from `limit + 1` decoded rows.
fn page<T>(
    rows: impl Iterator<Item = Result<T, sqlx::Error>>,
    limit: usize,
) -> Result<Page<T>, JobsError> {
    let mut items = rows.collect::<Result<Vec<_>, _>>()?;
    let has_more = items.len() > limit;
    items.truncate(limit);
    Ok(Page { items, has_more })
}

/// `ftevent-` and 24 random letters and digits.
fn new_event_id() -> String {
    format!(
        "ftevent-{}",
        Alphanumeric.sample_string(&mut rand::rng(), 24)
    )
}

/// Appends one event to `job_id`'s log, numbered after its last (a concurrent append can
/// take the same number: the unique `(job_id, seq)` index then refuses this one).
async fn insert_event<'e, E: sqlx::Executor<'e, Database = super::db::Db>>(
    ex: E,
    job_id: &str,
    level: Level,
    kind: EventKind,
    message: &str,
    data: Option<String>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO job_events (id, job_id, seq, created_at, level, kind, message, data) \
         SELECT $1, $2, COALESCE(MAX(seq), 0) + 1, $3, $4, $5, $6, $7 \
         FROM job_events WHERE job_id = $2",
    )
    .bind(new_event_id())
    .bind(job_id)
    .bind(now())
    .bind(level.as_str())
    .bind(kind.as_str())
    .bind(message)
    .bind(data)
    .execute(ex)
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_is_known_gone_only_on_this_host() {
        let this = worker_id();
        let host = hostname();
        assert!(this.starts_with(&format!("{host}/{}/", std::process::id())));
        // This process, under its own id (a claim of it too): alive.
        assert!(!worker_is_gone(&this, &this));
        assert!(!worker_is_gone(&format!("{this}/3"), &this));
        // An earlier process with this pid (another random part): gone.
        let earlier = format!("{host}/{}/zzzzzzzz/0", std::process::id());
        assert!(worker_is_gone(&earlier, &this));
        // A child that exited and was reaped: gone. A live process (this one's parent): not.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(worker_is_gone(&format!("{host}/{pid}/abc/1"), &this));
        // SAFETY: getppid has no preconditions.
        let parent = unsafe { libc::getppid() };
        assert!(!worker_is_gone(&format!("{host}/{parent}/abc/1"), &this));
        // Another host's, or an id of another shape: not known.
        assert!(!worker_is_gone(&format!("{host}-other/{pid}/abc/1"), &this));
        assert!(!worker_is_gone("no-slashes", &this));
        assert!(!worker_is_gone(&format!("{host}/not-a-pid/abc"), &this));
    }

    #[test]
    fn a_lease_expires_its_duration_from_now() {
        let lease = Lease {
            worker: "w".into(),
            duration: Duration::from_millis(2500),
        };
        let before = now_ms();
        let at = lease.expiry();
        assert!(
            (before + 2500..=now_ms() + 2500).contains(&at),
            "{before} {at}"
        );
    }
}
