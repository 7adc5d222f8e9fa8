//! Runs fine-tuning jobs: claims queued jobs up to the concurrency limit and runs each as a
//! chain of `esft-train` child processes in the job's work directory
//! (`DATA_DIR/jobs/<id>/`):
//!
//! 1. `score`: the experts' routing scores on a sample of the training data;
//! 2. `select`: the experts to train, recorded on the job at once;
//! 3. `train`: the selected experts, saving a resumable state every `save_every` steps and
//!    writing the adapter atomically;
//! 4. install: the adapter is checked as serving would check it and installed in the
//!    owner's namespace of the adapter store, private, in one step.
//!
//! Each phase's output is written atomically and skipped when present, and `train` always
//! runs with `--resume`, so a job continues from its last saved state wherever it runs
//! next. A job that ends (succeeded, failed, cancelled) has its work directory and stored
//! work removed; a job that does not succeed leaves no adapter. A child that crashes or
//! runs out of memory fails its job and nothing else.
//!
//! This module drives a job through its phases; each duty is a room of its own:
//! - [`claims`]: the leases this runner holds, their renewal, and why a claim must stop;
//! - [`child`]: a trainer child process and its line protocol (`super::contract`);
//! - [`sync`]: the job's work in the object store;
//! - [`install`]: the adapter a job makes, and its install;
//! - [`preview`]: the expert-selection preview;
//! - [`stop`]: how a run ends short, and the retried writes its end depends on.

mod child;
mod claims;
mod install;
mod preview;
mod stop;
mod sync;

use prometheus::{HistogramOpts, HistogramVec};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use self::child::Trainer;
use self::claims::{renew_round, Claims, StopReason};
pub use self::install::selection_summary;
use self::install::{describe_selection, read_expert_config, Install};
use self::preview::Previews;
use self::stop::{internal, no_room, persist, Stop};
pub use self::sync::JOBS_DIR;
use super::adapter_quota::AdapterQuota;
use super::contract::{
    state_dir, Batch, Length, Line, ScoreRun, SelectRun, TrainRun, EXPERTS_FILE, SCORES_FILE,
    TRAINING_FILE, VALIDATION_FILE,
};
use super::db::now;
use super::files::FileStore;
use super::queue::{
    worker_id, worker_is_gone, EventKind, JobError, JobRecord, JobStore, JobsError, Lease, Level,
    Status, StepMetrics, AUTO_BATCH_TOKENS,
};
use crate::adapter::AdapterRegistry;

/// Saved states of a job kept in the object store (older ones are removed as new ones
/// are recorded; a resume needs only the newest whole one).
const STORED_STATES: usize = 2;

/// At most one metrics event per this long (every step is in the metrics table).
const METRICS_EVENT_EVERY: Duration = Duration::from_secs(5);

/// How often ended jobs past `retain` are looked for.
const RETAIN_SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// How long a job the object store failed waits before it goes back to the queue (at most
/// a lease).
const STORE_BACKOFF: Duration = Duration::from_secs(5);

/// How jobs run.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub data_dir: PathBuf,
    /// The `esft-train` executable.
    pub trainer: PathBuf,
    /// The base model's directory (what the server serves).
    pub model_dir: PathBuf,
    /// Jobs trained at once; 0: none here (this process only accepts jobs, and previews).
    pub max_concurrent: usize,
    /// Compute threads of each child.
    pub threads: usize,
    /// Niceness added to the children (serving keeps the upper hand).
    pub nice: i32,
    /// Training saves a resumable state every this many steps.
    pub save_every: u64,
    /// Bytes of expert slots an adapter may need (the server's budget).
    pub slot_budget: usize,
    /// How long a claim or renewal holds a job.
    pub lease: Duration,
    /// Longest a job may take from its first start; past it the job fails
    /// (`job_timeout`) and its work is removed. `None`: no limit.
    pub max_job: Option<Duration>,
    /// Expert-selection previews run at once (0: previews are off here), and how long
    /// one may take before it is stopped.
    pub max_previews: usize,
    pub preview_timeout: Duration,
    /// How long ended jobs are kept (their records, events, checkpoints and metrics);
    /// `None`: for ever.
    pub retain: Option<Duration>,
    /// Free disk space training and installs must leave (0: no reserve).
    pub min_free_disk_bytes: u64,
    /// How often the queue is looked at without being woken.
    pub poll: Duration,
}

/// The holder of a claimed job (the `worker` its claim wrote).
fn holder(job: &JobRecord) -> &str {
    job.worker.as_deref().unwrap_or_default()
}

pub struct Runner {
    jobs: Arc<JobStore>,
    files: Arc<FileStore>,
    registry: Arc<AdapterRegistry>,
    quota: AdapterQuota,
    cfg: RunnerConfig,
    trainer: Trainer,
    /// This process's worker id; each claim's holder is it and a claim number.
    worker: String,
    claim_numbers: AtomicU64,
    claims: Claims,
    wake: tokio::sync::Notify,
    stopping: AtomicBool,
    previews: Previews,
    /// Seconds from start to end of jobs that ended, by final status.
    pub durations: HistogramVec,
}

impl Runner {
    /// Puts jobs that this host's dead processes held back in the queue, removes work
    /// directories of jobs that ended, and starts claiming jobs (on the current tokio
    /// runtime) as a worker of its own id.
    pub async fn start(
        jobs: Arc<JobStore>,
        files: Arc<FileStore>,
        registry: Arc<AdapterRegistry>,
        quota: AdapterQuota,
        cfg: RunnerConfig,
    ) -> Result<Arc<Self>, JobsError> {
        let worker = worker_id();
        // A job is recorded only after its files were checked: one a crash caught before it
        // was queued goes on to the queue.
        for job in jobs.with_status(Status::ValidatingFiles).await? {
            jobs.queue_validated(&job.id).await?;
        }
        // A job whose holder was a process of this host that is gone need not wait for its
        // lease to expire.
        for (id, holder) in jobs.running_holders().await? {
            if let Some(w) = holder.filter(|w| worker_is_gone(w, &worker)) {
                jobs.release(&id, &w, "The server restarted").await?;
            }
        }
        sweep_work_dirs(&jobs, &cfg.data_dir.join(JOBS_DIR)).await;
        let durations = HistogramVec::new(
            HistogramOpts::new(
                "esft_fine_tuning_job_duration_seconds",
                "Time from a fine-tuning job's start to its end, by final status.",
            )
            .buckets(vec![
                10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
            ]),
            &["status"],
        )
        .map_err(|e| JobsError::Db(sqlx::Error::Protocol(e.to_string())))?;
        tracing::info!(%worker, lease_seconds = cfg.lease.as_secs_f64(), max_concurrent = cfg.max_concurrent, "fine-tuning runner started");
        let trainer = Trainer {
            path: cfg.trainer.clone(),
            threads: cfg.threads,
            nice: cfg.nice,
        };
        let previews = Previews::new(
            cfg.max_previews,
            cfg.preview_timeout,
            trainer.clone(),
            cfg.model_dir.clone(),
            cfg.data_dir.join(JOBS_DIR),
        );
        let runner = Arc::new(Self {
            jobs,
            files,
            registry,
            quota,
            cfg,
            trainer,
            worker,
            claim_numbers: AtomicU64::new(0),
            claims: Claims::default(),
            wake: tokio::sync::Notify::new(),
            stopping: AtomicBool::new(false),
            previews,
            durations,
        });
        if runner.cfg.max_concurrent > 0 {
            // Woken by jobs other processes queue, where the database can say so.
            let weak = Arc::downgrade(&runner);
            runner.jobs.watch_queue(move || {
                if let Some(r) = weak.upgrade() {
                    r.wake();
                }
            });
            tokio::spawn(runner.clone().dispatch());
            tokio::spawn(runner.clone().renewals());
        }
        if let Some(retain) = runner.cfg.retain {
            tokio::spawn(Self::remove_old(Arc::downgrade(&runner), retain));
        }
        Ok(runner)
    }

    /// This runner's worker id (what the jobs it holds record as `worker`).
    pub fn worker(&self) -> &str {
        &self.worker
    }

    /// A lease for a new claim: a holder of its own.
    fn next_lease(&self) -> Lease {
        let n = self.claim_numbers.fetch_add(1, Ordering::SeqCst);
        Lease {
            worker: format!("{}/{n}", self.worker),
            duration: self.cfg.lease,
        }
    }

    /// Looks at the queue now (after a job is queued).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Jobs running now.
    pub fn running(&self) -> usize {
        self.claims.len()
    }

    /// Training tokens per second over the running jobs.
    pub fn tokens_per_s(&self) -> f64 {
        self.claims.tokens_per_s()
    }

    /// Stops the job `id` if it runs here: its child is killed at once. (Its status is
    /// the caller's to change first.)
    pub fn cancel(&self, id: &str) {
        self.claims.stop_job(id, StopReason::Cancelled);
    }

    /// Stops claiming, kills the children and gives the running jobs back to the queue
    /// (for another worker, or this one's next start), waiting up to `wait` for that.
    pub async fn shutdown(&self, wait: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        self.claims.stop_all(StopReason::Released);
        let deadline = Instant::now() + wait;
        while !self.claims.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Previews the selection a job would make on `training_file` (score and select
    /// only).
    pub async fn preview(
        self: &Arc<Self>,
        owner: Option<&str>,
        training_file: &str,
        esft: super::queue::EsftChoices,
        seed: i64,
    ) -> Result<Value, JobError> {
        self.previews
            .run(
                &self.files,
                self.registry.clone(),
                owner,
                training_file,
                esft,
                seed,
            )
            .await
    }

    async fn dispatch(self: Arc<Self>) {
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            match self.jobs.requeue_expired().await {
                Ok(ids) => {
                    for id in ids {
                        tracing::warn!(job = %id, "a fine-tuning job's lease expired: it is back in the queue");
                    }
                }
                Err(e) => tracing::error!("putting back jobs whose lease expired: {e}"),
            }
            while self.running() < self.cfg.max_concurrent && !self.stopping.load(Ordering::SeqCst)
            {
                match self.jobs.claim_next(&self.next_lease()).await {
                    Ok(Some(job)) => self.launch(job),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!("claiming a fine-tuning job: {e}");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.cfg.poll) => {}
            }
        }
    }

    /// Removes the jobs that ended more than `retain` ago, now and every
    /// [`RETAIN_SWEEP_EVERY`], while the runner lives.
    async fn remove_old(runner: std::sync::Weak<Self>, retain: Duration) {
        loop {
            let Some(r) = runner.upgrade() else { return };
            let before = now().saturating_sub(i64::try_from(retain.as_secs()).unwrap_or(i64::MAX));
            match r.jobs.remove_ended_before(before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    jobs = n,
                    "removed fine-tuning jobs past fine_tuning.retain_days"
                ),
                Err(e) => tracing::warn!("removing old fine-tuning jobs: {e}"),
            }
            drop(r);
            tokio::time::sleep(RETAIN_SWEEP_EVERY).await;
        }
    }

    /// Renews the leases every third of a lease ([`renew_round`]).
    async fn renewals(self: Arc<Self>) {
        let every = (self.cfg.lease / 3).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(every).await;
            renew_round(&self.claims, &self.jobs, self.cfg.lease, every).await;
        }
    }

    fn launch(self: &Arc<Self>, job: JobRecord) {
        let key = holder(&job).to_string();
        self.claims.add(&key, &job, self.cfg.max_job);
        let runner = self.clone();
        let rt = tokio::runtime::Handle::current();
        let id = job.id.clone();
        let thread_key = key.clone();
        // A thread of its own per job: it spawns the children and outlives them, which
        // `PR_SET_PDEATHSIG` (tied to the spawning thread) needs.
        let spawned = std::thread::Builder::new()
            .name(format!("job-{}", &id[id.len().saturating_sub(8)..]))
            .spawn(move || {
                let key = thread_key;
                // An earlier claim of this job here (lost, its child killed) ends before this
                // one touches the work directory.
                while runner.claims.other_claim_of(&job.id, &key) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                runner.run(&job, &rt);
                runner.claims.remove(&key);
                runner.wake();
            });
        if let Err(e) = spawned {
            self.claims.remove(&key);
            let jobs = self.jobs.clone();
            tokio::spawn(async move {
                tracing::error!("starting a thread for job {id}: {e}");
                let _ = jobs
                    .fail_held(
                        &id,
                        &key,
                        &JobError::new("internal_error", "the job could not be started"),
                    )
                    .await;
            });
        }
    }

    /// Appends an event to the job's log while this runner holds it.
    fn event(
        &self,
        rt: &tokio::runtime::Handle,
        job: &JobRecord,
        level: Level,
        kind: EventKind,
        message: &str,
        data: Option<Value>,
    ) {
        let id = &job.id;
        if let Err(e) =
            rt.block_on(
                self.jobs
                    .held_event(id, holder(job), level, kind, message, data.as_ref()),
            )
        {
            tracing::error!("recording an event of job {id}: {e}");
        }
    }

    /// An informational event.
    fn info(
        &self,
        rt: &tokio::runtime::Handle,
        job: &JobRecord,
        message: &str,
        data: Option<Value>,
    ) {
        self.event(rt, job, Level::Info, EventKind::Message, message, data);
    }

    /// Records a checkpoint of `id` at `step` (served later as `model`) and the event that
    /// announces it; failures to record are logged, the job goes on.
    fn checkpoint(
        &self,
        rt: &tokio::runtime::Handle,
        job: &JobRecord,
        step: i64,
        metrics: Value,
        model: &str,
        message: &str,
    ) {
        let id = &job.id;
        let recorded = persist(rt, self.cfg.lease, "recording a checkpoint", || {
            self.jobs.checkpoint(id, holder(job), step, &metrics, model)
        });
        if let Err(e) = recorded {
            tracing::error!("recording a checkpoint of job {id}: {e}");
        }
        self.info(rt, job, message, Some(metrics));
    }

    /// Keeps the newest [`STORED_STATES`] saved states of a job in the object store: the
    /// one a new save pushed out goes (one step per save, whatever the job's length; a
    /// failure is logged, and the job's end removes whatever is left).
    fn prune_stored_states(&self, job: &JobRecord, rt: &tokio::runtime::Handle) {
        let Some(store) = self.files.store() else {
            return;
        };
        let pruned = rt
            .block_on(self.jobs.checkpoint_steps(&job.id, STORED_STATES + 1))
            .map_err(|e| e.to_string())
            .and_then(|steps| {
                rt.block_on(sync::prune_states(store, &job.id, &steps, STORED_STATES))
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = pruned {
            tracing::warn!(job = %job.id, "pruning the stored states: {e}");
        }
    }

    /// Runs one claimed job to its end (or until it must stop here).
    fn run(&self, job: &JobRecord, rt: &tokio::runtime::Handle) {
        let started = Instant::now();
        let dir = self.cfg.data_dir.join(JOBS_DIR).join(&job.id);
        let outcome = self.execute(job, &dir, rt);
        let worker = holder(job);
        let status = match outcome {
            Ok(()) => "succeeded",
            Err(Stop::Cancelled) => "cancelled",
            Err(Stop::Lost) => "lost",
            Err(stop @ (Stop::Released | Stop::StoreUnavailable(_))) => {
                let reason = match stop {
                    Stop::StoreUnavailable(what) => {
                        // Not straight back: the store may be down for a while.
                        std::thread::sleep(self.cfg.lease.min(STORE_BACKOFF));
                        format!("The object store could not be reached ({what})")
                    }
                    _ => format!("Worker {worker} stopped"),
                };
                match persist(rt, self.cfg.lease, "releasing a job", || {
                    self.jobs.release(&job.id, worker, &reason)
                }) {
                    Ok(_) => "released",
                    Err(e) => {
                        tracing::error!("releasing job {}: {e}", job.id);
                        "lost"
                    }
                }
            }
            Err(Stop::Failed(error)) => {
                match persist(rt, self.cfg.lease, "recording a failure", || {
                    self.jobs.fail_held(&job.id, worker, &error)
                }) {
                    Ok(true) => {
                        tracing::warn!(job = %job.id, code = %error.code, "fine-tuning job failed: {}", error.message);
                        "failed"
                    }
                    // Cancelled or taken over meanwhile.
                    Ok(false) => "lost",
                    Err(e) => {
                        tracing::error!("recording the failure of job {}: {e}", job.id);
                        "lost"
                    }
                }
            }
        };
        // The job's end: its work goes. A job stopped here keeps it for whoever runs it
        // next (only the local directory without a store: with one, its work is there).
        let ended = matches!(status, "succeeded" | "failed" | "cancelled");
        if ended || (status == "released" && self.files.store().is_some()) {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("removing {}: {e}", dir.display());
                }
            }
        }
        if ended {
            if let Some(store) = self.files.store() {
                if let Err(e) = rt.block_on(sync::remove_stored(store, &job.id)) {
                    tracing::warn!("removing the stored work of job {}: {e}", job.id);
                }
            }
        }
        self.durations
            .with_label_values(&[status])
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(job = %job.id, status, seconds = started.elapsed().as_secs_f64(), "fine-tuning job ended here");
    }

    fn execute(
        &self,
        job: &JobRecord,
        dir: &Path,
        rt: &tokio::runtime::Handle,
    ) -> Result<(), Stop> {
        let resumed = dir.exists();
        std::fs::create_dir_all(dir).map_err(|e| internal("creating the job's directory", e))?;
        let state = state_dir(&dir.join(&job.adapter))
            .ok_or_else(|| internal("naming the job's state", &job.adapter))?;
        let restored = match self.files.store() {
            Some(store) if !resumed => {
                let steps = persist(rt, self.cfg.lease, "reading the checkpoints", || {
                    self.jobs.checkpoint_steps(&job.id, usize::MAX)
                })
                .map_err(|e| internal("reading the job's checkpoints", e))?;
                sync::restore(store, &job.id, &steps, dir, &state, rt)?
            }
            _ => None,
        };
        let worker = holder(job);
        let message = match restored {
            Some(step) => format!(
                "Fine-tuning job resumed by worker {worker} from the checkpoint at step {step}"
            ),
            None if resumed => format!("Fine-tuning job resumed by worker {worker}"),
            None => format!("Fine-tuning job started by worker {worker}"),
        };
        self.info(
            rt,
            job,
            &message,
            Some(json!({"worker": worker, "checkpoint_step": restored})),
        );
        let (training, validation) = sync::data_files(&self.files, job, dir, rt)?;
        let experts = dir.join(EXPERTS_FILE);
        self.select(job, rt, &training, &dir.join(SCORES_FILE), &experts)?;
        let ec = read_expert_config(&experts)?;
        let summary = selection_summary(&ec, &self.registry, &job.spec.esft);
        persist(rt, self.cfg.lease, "recording the selection", || {
            self.jobs.set_selection(&job.id, worker, &summary)
        })
        .map_err(|e| internal("recording the selection", e))?;
        if job.esft.is_none() {
            self.info(
                rt,
                job,
                &describe_selection(&summary),
                Some(summary.clone()),
            );
        }

        let out = dir.join(&job.adapter);
        let trained_tokens = if out.exists() {
            job.trained_tokens.unwrap_or(0)
        } else {
            // The saved state (the trained weights and their two optimizer moments) and
            // the adapter itself: refused up front where they would not leave the disk
            // reserve free.
            let need = summary["adapter_bytes"]
                .as_u64()
                .unwrap_or(0)
                .saturating_mul(4);
            if let Err(free) = crate::util::room_for(dir, need, self.cfg.min_free_disk_bytes) {
                return Err(Stop::Failed(no_room(
                    &format!("training (about {need} bytes of saved state and adapter)"),
                    free,
                )));
            }
            let eval = validation.as_deref().zip(job.validation_file.as_deref());
            let spec = &job.spec;
            let run = TrainRun {
                model: &self.cfg.model_dir,
                data: &training,
                data_name: &job.training_file,
                eval,
                experts: &experts,
                out: &out,
                lr: spec.esft.learning_rate,
                seed: job.seed,
                save_every: self.cfg.save_every,
                seq_len: spec.esft.seq_len,
                batch: spec
                    .batch_size
                    .map_or(Batch::Tokens(AUTO_BATCH_TOKENS), Batch::Rows),
                length: spec
                    .esft
                    .steps
                    .map_or(Length::Epochs(spec.n_epochs), Length::Steps),
            };
            self.train(job, rt, dir, &state, &run)?
        };
        if let Some(stop) = self.claims.stopped(worker) {
            return Err(stop);
        }
        let stopped = || self.claims.stopped(worker);
        Install {
            registry: &self.registry,
            jobs: &self.jobs,
            quota: &self.quota,
            slot_budget: self.cfg.slot_budget,
            min_free_disk_bytes: self.cfg.min_free_disk_bytes,
            lease: Lease {
                worker: worker.to_string(),
                duration: self.cfg.lease,
            },
            stopped: &stopped,
        }
        .run(job, rt, &out, trained_tokens)
    }

    /// Scores and selects the experts (each step skipped when its file is there).
    fn select(
        &self,
        job: &JobRecord,
        rt: &tokio::runtime::Handle,
        training: &Path,
        scores: &Path,
        experts: &Path,
    ) -> Result<(), Stop> {
        let esft = &job.spec.esft;
        let watch = self.claims.watch(holder(job));
        let scrub = |m: &str| self.scrub(job, m);
        if !scores.exists() {
            self.info(
                rt,
                job,
                &format!(
                    "Scoring the experts on up to {} tokens of the training data",
                    esft.scoring_tokens
                ),
                None,
            );
            let mut tokens = 0;
            let run = ScoreRun {
                model: &self.cfg.model_dir,
                data: training,
                tokens: esft.scoring_tokens,
                seed: job.seed,
                out: scores,
            };
            self.trainer
                .run(&job.id, &run.argv(), &watch, &scrub, |line| {
                    if let Line::ScoreDone(d) = line {
                        tokens = d.tokens;
                    }
                })?;
            if let Some(store) = self.files.store() {
                sync::upload_work(store, &job.id, rt, scores);
            }
            self.info(
                rt,
                job,
                &format!("Scored the experts on {tokens} tokens"),
                Some(json!({"tokens": tokens})),
            );
        }
        if !experts.exists() {
            let run = SelectRun {
                scores,
                score_function: esft.score_function.as_str(),
                top_p: esft.top_p,
                train_shared_experts: esft.train_shared_experts,
                train_non_expert_modules: esft.train_non_expert_modules,
                out: experts,
            };
            self.trainer
                .run(&job.id, &run.argv(), &watch, &scrub, |_| {})?;
            if let Some(store) = self.files.store() {
                sync::upload_work(store, &job.id, rt, experts);
            }
        }
        Ok(())
    }

    /// Trains the adapter (`run`); returns the tokens trained.
    fn train(
        &self,
        job: &JobRecord,
        rt: &tokio::runtime::Handle,
        dir: &Path,
        state: &Path,
        run: &TrainRun<'_>,
    ) -> Result<i64, Stop> {
        let mut total_steps = job.spec.esft.steps.unwrap_or(0);
        let mut trained_tokens = job.trained_tokens.unwrap_or(0);
        let mut train_loss: Option<f64> = None;
        let mut valid_loss: Option<f64> = None;
        let mut written = Instant::now() - Duration::from_secs(60);
        let mut step_times: Vec<f64> = Vec::new();
        let mut last_step_at = Instant::now();
        let mut last_event: Option<Instant> = None;
        let adapter = job.adapter.clone();
        let watch = self.claims.watch(holder(job));
        let scrub = |m: &str| self.scrub(job, m);
        self.trainer
            .run(&job.id, &run.argv(), &watch, &scrub, |line| match line {
                Line::TrainStart(start) => {
                    total_steps = start.steps;
                    let message = if start.step > 0 {
                        format!("Training resumed at step {} of {total_steps}", start.step)
                    } else {
                        format!(
                            "Training {} parameters on {} examples for {total_steps} steps",
                            start.trainable_params, start.train_samples
                        )
                    };
                    self.info(rt, job, &message, serde_json::to_value(&start).ok());
                    last_step_at = Instant::now();
                }
                Line::Step(s) => {
                    let now_at = Instant::now();
                    step_times.push(now_at.duration_since(last_step_at).as_secs_f64());
                    last_step_at = now_at;
                    train_loss = Some(s.loss);
                    trained_tokens = s.trained_tokens;
                    total_steps = s.total_steps;
                    self.claims.set_rate(holder(job), s.tokens_per_s);
                    // Every step in the metrics table; an event for the first, the last, and
                    // at most one per `METRICS_EVENT_EVERY` between.
                    let row = StepMetrics {
                        step: i64::try_from(s.step).unwrap_or(i64::MAX),
                        created_at: now(),
                        train_loss: s.loss,
                        valid_loss: None,
                        learning_rate: s.lr,
                        tokens_per_s: s.tokens_per_s,
                        trained_tokens,
                    };
                    if let Err(e) = rt.block_on(self.jobs.record_step(&job.id, holder(job), &row)) {
                        tracing::error!("recording a step of job {}: {e}", job.id);
                    }
                    let due = s.step <= 1
                        || s.step == total_steps
                        || last_event.is_none_or(|t: Instant| t.elapsed() >= METRICS_EVENT_EVERY);
                    if !due {
                        return;
                    }
                    last_event = Some(Instant::now());
                    let data = json!({
                        "step": s.step,
                        "total_steps": total_steps,
                        "train_loss": train_loss,
                        "valid_loss": valid_loss,
                        "learning_rate": s.lr,
                        "tokens_per_s": s.tokens_per_s,
                        "trained_tokens": trained_tokens,
                    });
                    self.event(
                        rt,
                        job,
                        Level::Info,
                        EventKind::Metrics,
                        &format!(
                            "Step {}/{total_steps}: training loss={}",
                            s.step,
                            fmt_loss(train_loss)
                        ),
                        Some(data),
                    );
                    if written.elapsed() >= Duration::from_secs(2) || s.step == total_steps {
                        written = Instant::now();
                        let recent = &step_times[step_times.len().saturating_sub(20)..];
                        let per_step = recent.iter().sum::<f64>() / recent.len().max(1) as f64;
                        let left = total_steps.saturating_sub(s.step) as f64 * per_step;
                        let eta = now() + left.ceil() as i64 + 2;
                        if let Err(e) = rt.block_on(self.jobs.set_progress(
                            &job.id,
                            holder(job),
                            trained_tokens,
                            Some(eta),
                        )) {
                            tracing::error!("recording the progress of job {}: {e}", job.id);
                        }
                    }
                }
                Line::Eval(e) => {
                    valid_loss = Some(e.eval_loss);
                    let step = i64::try_from(e.step).unwrap_or(i64::MAX);
                    if let Err(err) = rt.block_on(self.jobs.record_valid_loss(
                        &job.id,
                        holder(job),
                        step,
                        e.eval_loss,
                    )) {
                        tracing::error!("recording a validation loss of job {}: {err}", job.id);
                    }
                    self.info(
                        rt,
                        job,
                        &format!("Step {}: validation loss={}", e.step, fmt_loss(valid_loss)),
                        Some(json!({"step": e.step, "valid_loss": valid_loss})),
                    );
                }
                Line::Save(save) => {
                    let step = save.step;
                    // A saved state that leaves less than the disk reserve free ends the job
                    // (its work is removed with it).
                    if let Err(free) = crate::util::room_for(dir, 0, self.cfg.min_free_disk_bytes) {
                        self.claims.stop(holder(job), StopReason::NoRoom(free));
                        return;
                    }
                    let metrics =
                        json!({"step": step, "train_loss": train_loss, "valid_loss": valid_loss});
                    let name = format!("{adapter}:ckpt-step-{step}");
                    // Stored before it is recorded: a recorded checkpoint can be resumed
                    // from anywhere.
                    let stored = match self.files.store() {
                        Some(store) => sync::upload_state(store, &job.id, rt, dir, state, step),
                        None => true,
                    };
                    if stored {
                        let message = format!("Saved the training state at step {step}");
                        self.checkpoint(rt, job, step, metrics, &name, &message);
                        self.prune_stored_states(job, rt);
                    }
                }
                Line::TrainDone(done) => {
                    trained_tokens = done.trained_tokens;
                    let metrics = json!({
                        "step": done.steps,
                        "train_loss": train_loss,
                        "valid_loss": valid_loss,
                        "full_valid_loss": done.best_eval_loss,
                        "best_step": done.best_step,
                    });
                    let message = format!(
                        "Training done: {trained_tokens} tokens trained{}",
                        done.best_eval_loss
                            .map(|b| format!(", best validation loss {b:.4}"))
                            .unwrap_or_default()
                    );
                    self.checkpoint(rt, job, done.steps, metrics, &adapter, &message);
                }
                Line::ScoreDone(_) | Line::Error(_) | Line::Other => {}
            })?;
        Ok(trained_tokens)
    }

    /// A trainer message as a tenant may see it: the server's paths become the job's
    /// names for them.
    fn scrub(&self, job: &JobRecord, message: &str) -> String {
        let mut m = message.to_string();
        let mut swap = |path: PathBuf, name: &str| {
            m = m.replace(&path.display().to_string(), name);
        };
        let dir = self.cfg.data_dir.join(JOBS_DIR).join(&job.id);
        swap(dir.join(TRAINING_FILE), &job.training_file);
        if let Some(v) = &job.validation_file {
            swap(dir.join(VALIDATION_FILE), v);
        }
        swap(self.files.blob_path(&job.training_file), &job.training_file);
        if let Some(v) = &job.validation_file {
            swap(self.files.blob_path(v), v);
        }
        swap(dir, "the job's directory");
        swap(self.cfg.data_dir.clone(), "the data directory");
        swap(self.cfg.model_dir.clone(), &job.model);
        m
    }
}

/// Removes the work directories of jobs that ended or are unknown (left by jobs that
/// another worker finished after this one lost them).
async fn sweep_work_dirs(jobs: &JobStore, root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("ftjob-") {
            continue;
        }
        match jobs.status(&name).await {
            Ok(Some(s)) if s.is_active() => {}
            Ok(_) => {
                if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                    tracing::warn!("removing {}: {e}", entry.path().display());
                }
            }
            Err(e) => {
                tracing::warn!("sweeping job directories: {e}");
                return;
            }
        }
    }
}

fn fmt_loss(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |l| format!("{l:.4}"))
}
