//! Runs fine-tuning jobs: claims queued jobs up to the concurrency limit and runs each as a
//! chain of `esft-train` child processes in the job's work directory
//! (`DATA_DIR/jobs/<id>/`):
//!
//! 1. `score`: the experts' routing scores on a sample of the training data (`scores.json`);
//! 2. `select`: the experts to train (`experts.json`), recorded on the job at once;
//! 3. `train`: the selected experts, saving a resumable state every `save_every` steps and
//!    writing the adapter atomically (`<adapter name>/`);
//! 4. install: the adapter is checked as serving would check it and installed in the
//!    owner's namespace of the adapter store, private, in one step.
//!
//! A runner is a worker: it claims a job with a lease ([`Lease`]) that it renews every
//! third of the lease's duration, and every write it makes to the job's record is
//! conditional on still holding it. A renewal that finds the job cancelled, or held by
//! another worker, kills the child at once; so does failing to renew for longer than the
//! lease (the database unreachable): the job is then left to whoever claims it next. Any
//! runner puts jobs whose lease expired back in the queue ([`JobStore::requeue_expired`]),
//! and at its start those its own host's dead processes held (a restarted server).
//!
//! Each phase's output is written atomically and skipped when present, and `train` always
//! runs with `--resume`, so a job continues from its last saved state wherever it runs
//! next. With an object store ([`FileStore::store`]) the work directory is only a cache:
//! the training files come from the store, the scores and selection go up to
//! `jobs/<id>/` there, and every saved state goes up to `jobs/<id>/checkpoints/<step>/`
//! before its checkpoint is recorded; a worker that takes a job over fetches the selection
//! and the latest recorded checkpoint first. Without a store all of it stays under the
//! data directory, which only processes sharing it can resume from.
//!
//! The children read JSON lines on their stdout into the job's events, checkpoints and
//! progress; they run at a lower priority with `training_threads` compute threads, die
//! with the runner's process (`PR_SET_PDEATHSIG`), and are killed at once on cancel. A job
//! that ends (succeeded, failed, cancelled) has its work directory and stored work
//! removed; a job that does not succeed leaves no adapter. The process only ever sees
//! records and adapters: a child that crashes or runs out of memory fails its job and
//! nothing else.

use prometheus::{HistogramOpts, HistogramVec};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::db::now;
use super::files::FileStore;
use super::queue::{
    worker_id, worker_is_gone, EsftChoices, EventKind, JobError, JobRecord, JobStore, JobsError,
    Lease, Level, Renewal, Status, AUTO_BATCH_TOKENS,
};
use crate::adapter::{AdapterError, AdapterKey, AdapterRegistry, ExpertConfig};
use crate::store::Store;

/// The work directories of jobs inside the data directory.
pub const JOBS_DIR: &str = "jobs";

/// How long a job the object store failed waits before it goes back to the queue (at most
/// a lease).
const STORE_BACKOFF: Duration = Duration::from_secs(5);

const SCORES_FILE: &str = "scores.json";
const EXPERTS_FILE: &str = "experts.json";
/// The training and validation files inside a job's work directory (fetched from the
/// object store).
const TRAINING_FILE: &str = "training.jsonl";
const VALIDATION_FILE: &str = "validation.jsonl";

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
    /// How often the queue is looked at without being woken.
    pub poll: Duration,
}

/// Why a job stopped short of success.
#[derive(Debug)]
enum Stop {
    Cancelled,
    Failed(JobError),
    /// The lease is gone (another worker runs the job, or could): nothing more of the job
    /// is this runner's to change.
    Lost,
    /// This runner stops: the job goes back to the queue.
    Released,
    /// The object store could not be reached (what was being done): the job goes back to
    /// the queue, for a later claim, rather than failing.
    StoreUnavailable(String),
}

/// [`Stop::StoreUnavailable`] for `what`, the error logged.
fn unavailable(what: &str, e: impl std::fmt::Display) -> Stop {
    tracing::warn!("fine-tuning job: {what}: {e}");
    Stop::StoreUnavailable(what.to_string())
}

impl From<JobError> for Stop {
    fn from(e: JobError) -> Self {
        Stop::Failed(e)
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> Stop {
    tracing::error!("fine-tuning job: {what}: {e}");
    Stop::Failed(JobError::new(
        "internal_error",
        format!("{what} failed; the server log has the details"),
    ))
}

/// A running claim of a job (keyed by its holder: a job lost and claimed again has two
/// while the first winds down).
struct Active {
    job_id: String,
    /// The child process running now.
    pid: Option<u32>,
    /// Why it must stop, once it must.
    stop: Option<StopReason>,
    /// Training tokens per second of the last step.
    tokens_per_s: f64,
    /// The last renewal that held.
    renewed: Instant,
    /// When the job must have ended (`max_job` from its first start).
    deadline: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Cancelled,
    Lost,
    Released,
    /// The job ran past `max_job` (its limit, for the message).
    TimedOut(Duration),
}

impl Active {
    fn new(job: &JobRecord, max_job: Option<Duration>) -> Self {
        // Counted from the job's first start, whichever worker it was on.
        let deadline = max_job.map(|max| {
            let ran = u64::try_from(now() - job.started_at.unwrap_or_else(now)).unwrap_or(0);
            Instant::now() + max.saturating_sub(Duration::from_secs(ran))
        });
        Self {
            job_id: job.id.clone(),
            pid: None,
            stop: None,
            tokens_per_s: 0.0,
            renewed: Instant::now(),
            deadline,
        }
    }
}

/// Whose trainer child a [`Runner::child`] runs: a job's (by its holder), or a preview's.
#[derive(Clone, Copy)]
enum Owner<'a> {
    Job(&'a str),
    Preview(&'a PreviewControl),
}

/// A running preview's child, to stop from outside.
#[derive(Default)]
struct PreviewControl {
    pid: Mutex<Option<u32>>,
    stopped: AtomicBool,
}

/// Stops a preview's children when dropped (its request ended: answered, timed out, or
/// abandoned by its client).
struct StopOnDrop(Arc<PreviewControl>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::SeqCst);
        if let Some(pid) = self.0.pid.lock().ok().and_then(|p| *p) {
            kill(pid);
        }
    }
}

/// An owner's one preview at a time: taken while its preview runs.
struct PreviewTurn<'a> {
    running: &'a Mutex<std::collections::HashSet<Option<String>>>,
    owner: Option<String>,
}

impl<'a> PreviewTurn<'a> {
    /// `None` while `owner` has a preview running.
    fn take(
        running: &'a Mutex<std::collections::HashSet<Option<String>>>,
        owner: Option<&str>,
    ) -> Option<Self> {
        let owner = owner.map(str::to_string);
        let taken = running.lock().ok()?.insert(owner.clone());
        // (Built only when taken: a turn dropped gives its owner's place back.)
        taken.then(|| Self { running, owner })
    }
}

impl Drop for PreviewTurn<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.running.lock() {
            set.remove(&self.owner);
        }
    }
}

/// The holder of a claimed job (the `worker` its claim wrote).
fn holder(job: &JobRecord) -> &str {
    job.worker.as_deref().unwrap_or_default()
}

pub struct Runner {
    jobs: Arc<JobStore>,
    files: Arc<FileStore>,
    registry: Arc<AdapterRegistry>,
    cfg: RunnerConfig,
    /// This process's worker id; each claim's holder is it and a claim number.
    worker: String,
    claims: std::sync::atomic::AtomicU64,
    active: Mutex<HashMap<String, Active>>,
    wake: tokio::sync::Notify,
    stopping: AtomicBool,
    /// Expert-selection previews at once (`max_previews`).
    previews: tokio::sync::Semaphore,
    /// The owners with a preview running (one each at a time).
    previewing: Mutex<std::collections::HashSet<Option<String>>>,
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
        let runner = Arc::new(Self {
            previews: tokio::sync::Semaphore::new(cfg.max_previews),
            previewing: Mutex::new(std::collections::HashSet::new()),
            jobs,
            files,
            registry,
            cfg,
            worker,
            claims: std::sync::atomic::AtomicU64::new(0),
            active: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
            stopping: AtomicBool::new(false),
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
        Ok(runner)
    }

    /// This runner's worker id (what the jobs it holds record as `worker`).
    pub fn worker(&self) -> &str {
        &self.worker
    }

    /// A lease for a new claim: a holder of its own.
    fn next_lease(&self) -> Lease {
        let n = self.claims.fetch_add(1, Ordering::SeqCst);
        Lease {
            worker: format!("{}/{n}", self.worker),
            duration: self.cfg.lease,
        }
    }

    /// The lease `holder` renews.
    fn lease_of(&self, holder: &str) -> Lease {
        Lease {
            worker: holder.to_string(),
            duration: self.cfg.lease,
        }
    }

    /// Looks at the queue now (after a job is queued).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Jobs running now.
    pub fn running(&self) -> usize {
        self.active.lock().map_or(0, |a| a.len())
    }

    /// Training tokens per second over the running jobs.
    pub fn tokens_per_s(&self) -> f64 {
        self.active
            .lock()
            .map_or(0.0, |a| a.values().map(|j| j.tokens_per_s).sum())
    }

    /// Stops the job `id` if it runs here: its child is killed at once. (Its status is
    /// the caller's to change first.)
    pub fn cancel(&self, id: &str) {
        let holders: Vec<String> = self
            .active
            .lock()
            .map(|a| {
                a.iter()
                    .filter(|(_, j)| j.job_id == id)
                    .map(|(h, _)| h.clone())
                    .collect()
            })
            .unwrap_or_default();
        for h in holders {
            self.stop_job(&h, StopReason::Cancelled);
        }
    }

    /// Marks the claim `holder` as stopping for `why` and kills its child.
    fn stop_job(&self, holder: &str, why: StopReason) {
        let pid = match self.active.lock() {
            Ok(mut a) => a.get_mut(holder).and_then(|j| {
                j.stop.get_or_insert(why);
                j.pid
            }),
            Err(_) => None,
        };
        if let Some(pid) = pid {
            kill(pid);
        }
    }

    /// Stops claiming, kills the children and gives the running jobs back to the queue
    /// (for another worker, or this one's next start), waiting up to `wait` for that.
    pub async fn shutdown(&self, wait: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        let ids: Vec<String> = self
            .active
            .lock()
            .map(|a| a.keys().cloned().collect())
            .unwrap_or_default();
        for id in &ids {
            self.stop_job(id, StopReason::Released);
        }
        let deadline = Instant::now() + wait;
        while self.running() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

    /// Renews the lease of every job running here every third of the lease; stops the
    /// jobs whose renewal says they are cancelled or held elsewhere, those it could not
    /// renew for longer than the lease, and those past their deadline.
    async fn renewals(self: Arc<Self>) {
        let every = (self.cfg.lease / 3).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(every).await;
            let late: Vec<String> = self
                .active
                .lock()
                .map(|a| {
                    a.iter()
                        .filter(|(_, j)| {
                            j.stop.is_none() && j.deadline.is_some_and(|d| Instant::now() >= d)
                        })
                        .map(|(h, _)| h.clone())
                        .collect()
                })
                .unwrap_or_default();
            for holder in late {
                tracing::warn!(%holder, "a fine-tuning job ran past fine_tuning.max_job_seconds: stopping it");
                if let Some(max) = self.cfg.max_job {
                    self.stop_job(&holder, StopReason::TimedOut(max));
                }
            }
            let claims: Vec<(String, String)> = self
                .active
                .lock()
                .map(|a| {
                    a.iter()
                        .filter(|(_, j)| j.stop.is_none())
                        .map(|(h, j)| (h.clone(), j.job_id.clone()))
                        .collect()
                })
                .unwrap_or_default();
            for (holder, id) in claims {
                let lease = self.lease_of(&holder);
                // An unreachable database can hold a query far longer than a lease: a renewal
                // that takes longer than the interval counts as failed.
                let renewed = match tokio::time::timeout(every, self.jobs.renew(&id, &lease)).await
                {
                    Ok(r) => r,
                    Err(_) => Err(JobsError::Db(sqlx::Error::PoolTimedOut)),
                };
                match renewed {
                    Ok(Renewal::Held) => {
                        if let Ok(mut a) = self.active.lock() {
                            if let Some(j) = a.get_mut(&holder) {
                                j.renewed = Instant::now();
                            }
                        }
                    }
                    Ok(Renewal::Cancelled) => {
                        tracing::info!(job = %id, "the job was cancelled: stopping it");
                        self.stop_job(&holder, StopReason::Cancelled);
                    }
                    Ok(Renewal::Lost) => {
                        tracing::warn!(job = %id, "the job's lease is lost: stopping it");
                        self.stop_job(&holder, StopReason::Lost);
                    }
                    Err(e) => {
                        let since = self
                            .active
                            .lock()
                            .ok()
                            .and_then(|a| a.get(&holder).map(|j| j.renewed.elapsed()))
                            .unwrap_or_default();
                        tracing::warn!(job = %id, "renewing the job's lease failed ({:.1} s since the last renewal): {e}", since.as_secs_f64());
                        if since > self.cfg.lease {
                            tracing::error!(job = %id, "the job's lease expired unrenewed: abandoning it here");
                            self.stop_job(&holder, StopReason::Lost);
                        }
                    }
                }
            }
        }
    }

    fn launch(self: &Arc<Self>, job: JobRecord) {
        let key = holder(&job).to_string();
        if let Ok(mut a) = self.active.lock() {
            a.insert(key.clone(), Active::new(&job, self.cfg.max_job));
        }
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
                let earlier = || {
                    runner
                        .active
                        .lock()
                        .is_ok_and(|a| a.iter().any(|(h, j)| j.job_id == job.id && *h != key))
                };
                while earlier() {
                    std::thread::sleep(Duration::from_millis(50));
                }
                runner.run(&job, &rt);
                if let Ok(mut a) = runner.active.lock() {
                    a.remove(&key);
                }
                runner.wake();
            });
        if let Err(e) = spawned {
            if let Ok(mut a) = self.active.lock() {
                a.remove(&key);
            }
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

    /// Why the claim `holder` must stop, if it must.
    fn stopped(&self, holder: &str) -> Option<Stop> {
        let why = self
            .active
            .lock()
            .ok()
            .and_then(|a| a.get(holder).and_then(|j| j.stop))?;
        Some(match why {
            StopReason::Cancelled => Stop::Cancelled,
            StopReason::Lost => Stop::Lost,
            StopReason::Released => Stop::Released,
            StopReason::TimedOut(limit) => Stop::Failed(JobError::new(
                "job_timeout",
                format!(
                    "the job ran longer than this server's limit of {} s \
                     (fine_tuning.max_job_seconds); ask for fewer steps or epochs",
                    limit.as_secs()
                ),
            )),
        })
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

    /// Runs `op` on the records until it succeeds, for up to a lease's duration (the
    /// database may be restarting): the writes a job's end depends on.
    fn persist<T, F, Fut>(
        &self,
        rt: &tokio::runtime::Handle,
        what: &str,
        op: F,
    ) -> Result<T, JobsError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, JobsError>>,
    {
        let deadline = Instant::now() + self.cfg.lease;
        loop {
            match rt.block_on(op()) {
                Ok(v) => return Ok(v),
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!("{what}: {e}; trying again");
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => return Err(e),
            }
        }
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
        let recorded = self.persist(rt, "recording a checkpoint", || {
            self.jobs.checkpoint(id, holder(job), step, &metrics, model)
        });
        if let Err(e) = recorded {
            tracing::error!("recording a checkpoint of job {id}: {e}");
        }
        self.event(
            rt,
            job,
            Level::Info,
            EventKind::Message,
            message,
            Some(metrics),
        );
    }

    /// The object store the job's work goes to, if any.
    fn store(&self) -> Option<&Store> {
        self.files.store()
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
                let message = match stop {
                    Stop::StoreUnavailable(what) => {
                        // Not straight back: the store may be down for a while.
                        std::thread::sleep(self.cfg.lease.min(STORE_BACKOFF));
                        format!("The object store could not be reached ({what})")
                    }
                    _ => format!("Worker {worker} stopped"),
                };
                match self.persist(rt, "releasing a job", || {
                    self.jobs.release(&job.id, worker, &message)
                }) {
                    Ok(_) => "released",
                    Err(e) => {
                        tracing::error!("releasing job {}: {e}", job.id);
                        "lost"
                    }
                }
            }
            Err(Stop::Failed(error)) => {
                match self.persist(rt, "recording a failure", || {
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
        if ended || (status == "released" && self.store().is_some()) {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("removing {}: {e}", dir.display());
                }
            }
        }
        if ended {
            if let Some(store) = self.store() {
                if let Err(e) = rt.block_on(remove_stored(store, &job.id)) {
                    tracing::warn!("removing the stored work of job {}: {e}", job.id);
                }
            }
        }
        self.durations
            .with_label_values(&[status])
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(job = %job.id, status, seconds = started.elapsed().as_secs_f64(), "fine-tuning job ended here");
    }

    /// The training and validation files' local paths: the data directory's copies, or
    /// with an object store, copies fetched into the work directory.
    fn data_files(
        &self,
        job: &JobRecord,
        dir: &Path,
        rt: &tokio::runtime::Handle,
    ) -> Result<(PathBuf, Option<PathBuf>), Stop> {
        let Some(store) = self.store() else {
            return Ok((
                self.files.blob_path(&job.training_file),
                job.validation_file
                    .as_ref()
                    .map(|f| self.files.blob_path(f)),
            ));
        };
        let fetch = |id: &str, name: &str| -> Result<PathBuf, Stop> {
            let dest = dir.join(name);
            if dest.exists() {
                return Ok(dest);
            }
            match rt.block_on(store.download_file(&super::files::object_key(id), &dest)) {
                Ok(Some(_)) => Ok(dest),
                Ok(None) => Err(Stop::Failed(JobError::new(
                    "file_not_found",
                    format!("the bytes of the file {id} are missing from the store"),
                ))),
                Err(e) => Err(unavailable("fetching the job's files from the store", e)),
            }
        };
        let training = fetch(&job.training_file, TRAINING_FILE)?;
        let validation = job
            .validation_file
            .as_ref()
            .map(|v| fetch(v, VALIDATION_FILE))
            .transpose()?;
        Ok((training, validation))
    }

    /// Fills a fresh work directory from the object store: the scores and selection, and
    /// the newest recorded checkpoint whose state is stored. Returns that checkpoint's
    /// step.
    fn restore(
        &self,
        job: &JobRecord,
        dir: &Path,
        rt: &tokio::runtime::Handle,
    ) -> Result<Option<i64>, Stop> {
        let Some(store) = self.store() else {
            return Ok(None);
        };
        for name in [SCORES_FILE, EXPERTS_FILE] {
            rt.block_on(store.download_file(&work_key(&job.id, name), &dir.join(name)))
                .map_err(|e| unavailable("fetching the job's selection from the store", e))?;
        }
        let steps = self
            .persist(rt, "reading the checkpoints", || {
                self.jobs.checkpoint_steps(&job.id)
            })
            .map_err(|e| internal("reading the job's checkpoints", e))?;
        let state = state_dir(dir, &job.adapter);
        for step in steps {
            let prefix = checkpoint_prefix(&job.id, step);
            let entries = rt
                .block_on(store.list(&prefix))
                .map_err(|e| unavailable("listing the job's checkpoints in the store", e))?;
            if !entries.iter().any(|e| e.key.ends_with("/state.json")) {
                // The record of the end of training (no state of its own), or a state
                // already removed.
                continue;
            }
            let staged = tempfile::Builder::new()
                .prefix(".restore-")
                .tempdir_in(dir)
                .map_err(|e| internal("restoring a checkpoint", e))?;
            for entry in &entries {
                let name = entry.key.rsplit('/').next().unwrap_or_default();
                rt.block_on(store.download_file(&entry.key, &staged.path().join(name)))
                    .map_err(|e| unavailable("fetching a checkpoint from the store", e))?;
            }
            let _ = std::fs::remove_dir_all(&state);
            std::fs::rename(staged.keep(), &state)
                .map_err(|e| internal("restoring a checkpoint", e))?;
            return Ok(Some(step));
        }
        Ok(None)
    }

    /// Uploads `file` of the job's work to the store (when there is one); a failure is
    /// logged: a worker that takes the job over redoes that phase.
    fn upload_work(&self, job: &JobRecord, rt: &tokio::runtime::Handle, file: &Path) {
        let (Some(store), Some(name)) = (self.store(), file.file_name().and_then(|n| n.to_str()))
        else {
            return;
        };
        if let Err(e) = rt.block_on(store.upload_file(&work_key(&job.id, name), file)) {
            tracing::warn!(job = %job.id, "uploading {name} to the store: {e}");
        }
    }

    /// Uploads the saved state of `step` to the store: a copy taken while the trainer
    /// goes on (the state directory is replaced whole at each save; a copy whose
    /// `state.json` is not at `step` before and after is discarded). False when no whole
    /// copy went up.
    fn upload_state(
        &self,
        job: &JobRecord,
        rt: &tokio::runtime::Handle,
        dir: &Path,
        step: i64,
    ) -> bool {
        let Some(store) = self.store() else {
            return true;
        };
        let state = state_dir(dir, &job.adapter);
        let at = |d: &Path| -> Option<i64> {
            let text = std::fs::read_to_string(d.join("state.json")).ok()?;
            serde_json::from_str::<Value>(&text)
                .ok()?
                .get("step")?
                .as_i64()
        };
        let copy = (|| -> std::io::Result<Option<tempfile::TempDir>> {
            if at(&state) != Some(step) {
                return Ok(None);
            }
            let snap = tempfile::Builder::new()
                .prefix(".snapshot-")
                .tempdir_in(dir)?;
            for entry in std::fs::read_dir(&state)? {
                let entry = entry?;
                std::fs::copy(entry.path(), snap.path().join(entry.file_name()))?;
            }
            Ok((at(&state) == Some(step) && at(snap.path()) == Some(step)).then_some(snap))
        })();
        let snap = match copy {
            Ok(Some(s)) => s,
            Ok(None) => {
                tracing::warn!(job = %job.id, step, "the saved state changed while it was copied: not uploaded");
                return false;
            }
            Err(e) => {
                tracing::warn!(job = %job.id, step, "copying the saved state: {e}");
                return false;
            }
        };
        let prefix = checkpoint_prefix(&job.id, step);
        let uploaded = (|| -> Result<(), String> {
            let mut files: Vec<PathBuf> = std::fs::read_dir(snap.path())
                .map_err(|e| e.to_string())?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            // `state.json` last: a state is whole in the store once it is there.
            files.sort_by_key(|p| p.file_name().is_some_and(|n| n == "state.json"));
            for f in files {
                let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                rt.block_on(store.upload_file(&format!("{prefix}/{name}"), &f))
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        })();
        match uploaded {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(job = %job.id, step, "uploading the saved state: {e}");
                false
            }
        }
    }

    fn execute(
        &self,
        job: &JobRecord,
        dir: &Path,
        rt: &tokio::runtime::Handle,
    ) -> Result<(), Stop> {
        let resumed = dir.exists();
        std::fs::create_dir_all(dir).map_err(|e| internal("creating the job's directory", e))?;
        let restored = if resumed {
            None
        } else {
            self.restore(job, dir, rt)?
        };
        let worker = holder(job);
        let message = match restored {
            Some(step) => format!(
                "Fine-tuning job resumed by worker {worker} from the checkpoint at step {step}"
            ),
            None if resumed => format!("Fine-tuning job resumed by worker {worker}"),
            None => format!("Fine-tuning job started by worker {worker}"),
        };
        self.event(
            rt,
            job,
            Level::Info,
            EventKind::Message,
            &message,
            Some(json!({"worker": worker, "checkpoint_step": restored})),
        );
        let esft = &job.spec.esft;
        let (training, validation) = self.data_files(job, dir, rt)?;
        let scores = dir.join(SCORES_FILE);
        let experts = dir.join(EXPERTS_FILE);
        self.select(job, rt, &training, esft, &scores, &experts)?;
        let ec = read_expert_config(&experts)?;
        let summary = selection_summary(&ec, &self.registry, esft);
        self.persist(rt, "recording the selection", || {
            self.jobs.set_selection(&job.id, worker, &summary)
        })
        .map_err(|e| internal("recording the selection", e))?;
        if job.esft.is_none() {
            self.event(
                rt,
                job,
                Level::Info,
                EventKind::Message,
                &describe_selection(&summary),
                Some(summary.clone()),
            );
        }

        let out = dir.join(&job.adapter);
        let trained_tokens = if out.exists() {
            job.trained_tokens.unwrap_or(0)
        } else {
            self.train(
                job,
                rt,
                dir,
                &training,
                validation.as_deref(),
                &experts,
                &out,
            )?
        };
        if let Some(stop) = self.stopped(holder(job)) {
            return Err(stop);
        }
        self.install(job, rt, &out, trained_tokens)
    }

    /// Scores and selects the experts (each step skipped when its file is there).
    #[allow(clippy::too_many_arguments)]
    fn select(
        &self,
        job: &JobRecord,
        rt: &tokio::runtime::Handle,
        training: &Path,
        esft: &EsftChoices,
        scores: &Path,
        experts: &Path,
    ) -> Result<(), Stop> {
        if !scores.exists() {
            self.event(
                rt,
                job,
                Level::Info,
                EventKind::Message,
                &format!(
                    "Scoring the experts on up to {} tokens of the training data",
                    esft.scoring_tokens
                ),
                None,
            );
            let mut last = Value::Null;
            self.child(
                Owner::Job(holder(job)),
                &score_args(&self.cfg.model_dir, training, esft, job.seed, scores),
                &|m| self.scrub(job, m),
                |line| {
                    if line.get("event").and_then(Value::as_str) == Some("done") {
                        last = line.clone();
                    }
                },
            )?;
            self.upload_work(job, rt, scores);
            let tokens = last.get("tokens").and_then(Value::as_u64).unwrap_or(0);
            self.event(
                rt,
                job,
                Level::Info,
                EventKind::Message,
                &format!("Scored the experts on {tokens} tokens"),
                Some(json!({"tokens": tokens})),
            );
        }
        if !experts.exists() {
            self.child(
                Owner::Job(holder(job)),
                &select_args(scores, esft, experts),
                &|m| self.scrub(job, m),
                |_| {},
            )?;
            self.upload_work(job, rt, experts);
        }
        Ok(())
    }

    /// Trains the adapter into `out`; returns the tokens trained.
    #[allow(clippy::too_many_arguments)]
    fn train(
        &self,
        job: &JobRecord,
        rt: &tokio::runtime::Handle,
        dir: &Path,
        training: &Path,
        validation: Option<&Path>,
        experts: &Path,
        out: &Path,
    ) -> Result<i64, Stop> {
        let args = train_args(&self.cfg, job, training, validation, experts, out);
        let mut total_steps = job.spec.esft.steps.unwrap_or(0);
        let mut trained_tokens = job.trained_tokens.unwrap_or(0);
        let mut train_loss: Option<f64> = None;
        let mut valid_loss: Option<f64> = None;
        let mut written = Instant::now() - Duration::from_secs(60);
        let mut step_times: Vec<f64> = Vec::new();
        let mut last_step_at = Instant::now();
        let adapter = job.adapter.clone();
        self.child(Owner::Job(holder(job)), &args, &|m| self.scrub(job, m), |line| {
            let event = line.get("event").and_then(Value::as_str).unwrap_or("");
            let num = |k: &str| line.get(k).and_then(Value::as_f64);
            match event {
                "start" => {
                    total_steps = line
                        .get("steps")
                        .and_then(Value::as_u64)
                        .unwrap_or(total_steps);
                    let params = line
                        .get("trainable_params")
                        .and_then(Value::as_u64)
                        .unwrap_or(0);
                    let n = line
                        .get("train_samples")
                        .and_then(Value::as_u64)
                        .unwrap_or(0);
                    let at = line.get("step").and_then(Value::as_u64).unwrap_or(0);
                    let message = if at > 0 {
                        format!("Training resumed at step {at} of {total_steps}")
                    } else {
                        format!(
                            "Training {params} parameters on {n} examples for {total_steps} steps"
                        )
                    };
                    self.event(
                        rt,
                        job,
                        Level::Info,
                        EventKind::Message,
                        &message,
                        Some(line.clone()),
                    );
                    last_step_at = Instant::now();
                }
                "progress" => {
                    let Some(step) = line.get("step").and_then(Value::as_u64) else {
                        return;
                    };
                    let now_at = Instant::now();
                    step_times.push(now_at.duration_since(last_step_at).as_secs_f64());
                    last_step_at = now_at;
                    train_loss = num("loss");
                    if let Some(t) = line.get("trained_tokens").and_then(Value::as_i64) {
                        trained_tokens = t;
                    }
                    total_steps = line
                        .get("total_steps")
                        .and_then(Value::as_u64)
                        .unwrap_or(total_steps);
                    let rate = num("tokens_per_s").unwrap_or(0.0);
                    if let Ok(mut a) = self.active.lock() {
                        if let Some(j) = a.get_mut(holder(job)) {
                            j.tokens_per_s = rate;
                        }
                    }
                    let data = json!({
                        "step": step,
                        "total_steps": total_steps,
                        "train_loss": train_loss,
                        "valid_loss": valid_loss,
                        "learning_rate": num("lr"),
                        "tokens_per_s": rate,
                        "trained_tokens": trained_tokens,
                    });
                    self.event(
                        rt,
                        job,
                        Level::Info,
                        EventKind::Metrics,
                        &format!(
                            "Step {step}/{total_steps}: training loss={}",
                            fmt_loss(train_loss)
                        ),
                        Some(data),
                    );
                    if written.elapsed() >= Duration::from_secs(2) || step == total_steps {
                        written = Instant::now();
                        let recent = &step_times[step_times.len().saturating_sub(20)..];
                        let per_step = recent.iter().sum::<f64>() / recent.len().max(1) as f64;
                        let left = total_steps.saturating_sub(step) as f64 * per_step;
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
                "eval" => {
                    valid_loss = num("eval_loss");
                    let step = line.get("step").and_then(Value::as_u64).unwrap_or(0);
                    self.event(
                        rt,
                        job,
                        Level::Info,
                        EventKind::Message,
                        &format!("Step {step}: validation loss={}", fmt_loss(valid_loss)),
                        Some(json!({"step": step, "valid_loss": valid_loss})),
                    );
                }
                "save" => {
                    let step = line.get("step").and_then(Value::as_i64).unwrap_or(0);
                    let metrics =
                        json!({"step": step, "train_loss": train_loss, "valid_loss": valid_loss});
                    let name = format!("{adapter}:ckpt-step-{step}");
                    // Stored before it is recorded: a recorded checkpoint can be resumed
                    // from anywhere.
                    if self.upload_state(job, rt, dir, step) {
                        let message = format!("Saved the training state at step {step}");
                        self.checkpoint(rt, job, step, metrics, &name, &message);
                    }
                }
                "done" => {
                    if let Some(t) = line.get("trained_tokens").and_then(Value::as_i64) {
                        trained_tokens = t;
                    }
                    let steps = line
                        .get("steps")
                        .and_then(Value::as_i64)
                        .unwrap_or(total_steps as i64);
                    let best = line.get("best_eval_loss").and_then(Value::as_f64);
                    let metrics = json!({
                        "step": steps,
                        "train_loss": train_loss,
                        "valid_loss": valid_loss,
                        "full_valid_loss": best,
                        "best_step": line.get("best_step"),
                    });
                    let message = format!(
                        "Training done: {trained_tokens} tokens trained{}",
                        best.map(|b| format!(", best validation loss {b:.4}"))
                            .unwrap_or_default()
                    );
                    self.checkpoint(rt, job, steps, metrics, &adapter, &message);
                }
                _ => {}
            }
        })?;
        Ok(trained_tokens)
    }

    fn install(
        &self,
        job: &JobRecord,
        rt: &tokio::runtime::Handle,
        out: &Path,
        trained_tokens: i64,
    ) -> Result<(), Stop> {
        let key = AdapterKey {
            tenant: job.owner.clone(),
            name: job.adapter.clone(),
        };
        self.registry
            .check_servable(out, &job.adapter, self.cfg.slot_budget)
            .map_err(|e| Stop::Failed(JobError::new("invalid_adapter", e)))?;
        let staging = self
            .registry
            .store
            .staging()
            .map_err(|e| internal("creating a staging directory", e))?;
        copy_files(out, &staging.dir()).map_err(|e| internal("staging the adapter", e))?;
        // A lease just renewed: no other worker can take the job over while it installs.
        let lease = self.lease_of(holder(job));
        match self.persist(rt, "renewing the lease", || {
            self.jobs.renew(&job.id, &lease)
        }) {
            Ok(Renewal::Held) => {}
            Ok(Renewal::Cancelled) => return Err(Stop::Cancelled),
            Ok(Renewal::Lost) => return Err(Stop::Lost),
            Err(e) => {
                tracing::error!(
                    "renewing the lease of job {} before installing: {e}",
                    job.id
                );
                return Err(Stop::Lost);
            }
        }
        if let Some(stop) = self.stopped(holder(job)) {
            return Err(stop);
        }
        // The adapter's name carries the job's id: a version already there is this job's,
        // from a worker that installed it and died before recording the success.
        let done = self
            .registry
            .install(&key, staging, false)
            .map_err(|e| match e {
                AdapterError::StoreUnavailable(_) => unavailable("publishing the adapter", e),
                e => internal("installing the adapter", e),
            })?;
        let ours = done.version.id();
        let succeeded = self.persist(rt, "recording the job's success", || {
            self.jobs
                .succeed(&job.id, holder(job), &job.adapter, trained_tokens)
        });
        if let Ok(true) = succeeded {
            tracing::info!(job = %job.id, adapter = %key, version = ours, "fine-tuned adapter installed");
            return Ok(());
        }
        // Cancelled or taken over while it installed (or the record could not be written):
        // the adapter goes again, unless another version replaced it meanwhile.
        if let Err(e) = &succeeded {
            tracing::error!("recording the success of job {}: {e}", job.id);
        }
        if self.registry.store.resolve(&key).map(|v| v.id()) == Some(ours) {
            if let Err(e) = self.registry.delete(&key) {
                tracing::error!("removing the adapter of job {}: {e}", job.id);
            }
        }
        match succeeded {
            Ok(_) => match rt.block_on(self.jobs.status(&job.id)) {
                Ok(Some(Status::Cancelled)) => Err(Stop::Cancelled),
                _ => Err(Stop::Lost),
            },
            Err(e) => Err(internal("recording the job's success", e)),
        }
    }

    /// Previews the selection a job would make on `training` (score and select only).
    pub async fn preview(
        self: &Arc<Self>,
        owner: Option<&str>,
        training_file: &str,
        esft: EsftChoices,
        seed: i64,
    ) -> Result<Value, JobError> {
        if self.cfg.max_previews == 0 {
            return Err(JobError::new(
                "preview_unavailable",
                "this server runs no expert-selection previews (fine_tuning.max_concurrent_previews = 0); \
                 ask a server that trains",
            ));
        }
        let _mine = PreviewTurn::take(&self.previewing, owner).ok_or_else(|| {
            JobError::new(
                "preview_in_progress",
                "a preview of yours is running; wait for it to end",
            )
        })?;
        let deadline = tokio::time::Instant::now() + self.cfg.preview_timeout;
        let timed_out = || {
            JobError::new(
                "preview_timeout",
                format!(
                    "the preview took longer than this server's limit of {} s \
                     (fine_tuning.preview_timeout_seconds); ask for fewer scoring_tokens",
                    self.cfg.preview_timeout.as_secs()
                ),
            )
        };
        let _turn = tokio::time::timeout_at(deadline, self.previews.acquire())
            .await
            .map_err(|_| timed_out())?
            .map_err(|_| JobError::new("internal_error", "the server is shutting down"))?;
        // Stops the children when this future is dropped: the client went away, or the
        // time ran out.
        let control = Arc::new(PreviewControl::default());
        let _stop_on_drop = StopOnDrop(control.clone());
        let runner = self.clone();
        let training = self.files.local_path(training_file).await.map_err(|e| {
            tracing::error!("fetching the file {training_file} for a preview: {e}");
            JobError::new(
                "internal_error",
                "the training file could not be read; the server log has the details",
            )
        })?;
        let file_id = training_file.to_string();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("esft-preview".into())
            .spawn(move || {
                let shown = training.display().to_string();
                let scrub = |m: &str| m.replace(&shown, &file_id);
                let result = (|| -> Result<Value, Stop> {
                    let root = runner.cfg.data_dir.join(JOBS_DIR);
                    let dir = std::fs::create_dir_all(&root)
                        .and_then(|()| {
                            tempfile::Builder::new()
                                .prefix(".preview-")
                                .tempdir_in(&root)
                        })
                        .map_err(|e| internal("creating a preview directory", e))?;
                    let scores = dir.path().join(SCORES_FILE);
                    let experts = dir.path().join(EXPERTS_FILE);
                    let mut tokens = 0;
                    let args = score_args(&runner.cfg.model_dir, &training, &esft, seed, &scores);
                    let of = Owner::Preview(&control);
                    runner.child(of, &args, &scrub, |line| {
                        if line.get("event").and_then(Value::as_str) == Some("done") {
                            tokens = line.get("tokens").and_then(Value::as_u64).unwrap_or(0);
                        }
                    })?;
                    runner.child(of, &select_args(&scores, &esft, &experts), &scrub, |_| {})?;
                    let ec = read_expert_config(&experts)?;
                    let mut summary = selection_summary(&ec, &runner.registry, &esft);
                    if let Some(o) = summary.as_object_mut() {
                        o.insert("scored_tokens".into(), tokens.into());
                    }
                    Ok(summary)
                })();
                let _ = tx.send(result);
            });
        if let Err(e) = spawned {
            return Err(JobError::new(
                "internal_error",
                format!("the preview could not start: {e}"),
            ));
        }
        let result = tokio::time::timeout_at(deadline, rx)
            .await
            .map_err(|_| timed_out())?;
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(Stop::Failed(e))) => Err(e),
            Ok(Err(Stop::Cancelled | Stop::Lost | Stop::Released | Stop::StoreUnavailable(_)))
            | Err(_) => Err(JobError::new("internal_error", "the preview stopped")),
        }
    }

    /// Runs `esft-train` with `args`, handing each JSON line of its stdout to `each`.
    /// `job_id` (when running a job) is where the child's pid goes for cancel; `scrub`
    /// turns a trainer message into one a client may see.
    fn child(
        &self,
        owner: Owner<'_>,
        args: &[OsString],
        scrub: &dyn Fn(&str) -> String,
        mut each: impl FnMut(&Value),
    ) -> Result<(), Stop> {
        let job_id = match owner {
            Owner::Job(id) => Some(id),
            Owner::Preview(_) => None,
        };
        if let Some(id) = job_id {
            if let Some(stop) = self.stopped(id) {
                return Err(stop);
            }
        }
        if let Owner::Preview(c) = owner {
            if c.stopped.load(Ordering::SeqCst) {
                return Err(Stop::Cancelled);
            }
        }
        let mut cmd = Command::new(&self.cfg.trainer);
        cmd.args(args)
            .env("RAYON_NUM_THREADS", self.cfg.threads.max(1).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let nice = self.cfg.nice;
        let parent = std::process::id();
        // SAFETY: only async-signal-safe calls (prctl, getppid, setpriority, _exit) run
        // between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                // The server died before the line above: do not run on as an orphan.
                if libc::getppid() != parent as libc::pid_t {
                    libc::_exit(1);
                }
                if nice != 0 {
                    libc::setpriority(libc::PRIO_PROCESS, 0, nice);
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            internal(
                &format!("starting the trainer {}", self.cfg.trainer.display()),
                e,
            )
        })?;
        let pid = child.id();
        if let Some(id) = job_id {
            let stopping = match self.active.lock() {
                Ok(mut a) => a.get_mut(id).is_some_and(|j| {
                    j.pid = Some(pid);
                    j.stop.is_some()
                }),
                Err(_) => false,
            };
            if stopping {
                kill(pid);
            }
        }
        if let Owner::Preview(c) = owner {
            if let Ok(mut p) = c.pid.lock() {
                *p = Some(pid);
            }
            if c.stopped.load(Ordering::SeqCst) {
                kill(pid);
            }
        }
        let stderr = child.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = e.read_to_string(&mut text);
                text
            })
        });
        let mut error_line: Option<Value> = None;
        if let Some(stdout) = child.stdout.take() {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if v.get("event").and_then(Value::as_str) == Some("error") {
                    error_line = Some(v);
                    continue;
                }
                each(&v);
            }
        }
        let status = child.wait();
        let stderr = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
        if let Some(id) = job_id {
            if let Ok(mut a) = self.active.lock() {
                if let Some(j) = a.get_mut(id) {
                    j.pid = None;
                    j.tokens_per_s = 0.0;
                }
            }
            if let Some(stop) = self.stopped(id) {
                return Err(stop);
            }
        }
        if let Owner::Preview(c) = owner {
            if let Ok(mut p) = c.pid.lock() {
                *p = None;
            }
            if c.stopped.load(Ordering::SeqCst) {
                return Err(Stop::Cancelled);
            }
        }
        let status = status.map_err(|e| internal("waiting for the trainer", e))?;
        if status.success() {
            return Ok(());
        }
        let command = args
            .first()
            .and_then(|a| a.to_str())
            .unwrap_or("trainer")
            .to_string();
        tracing::warn!(job = job_id.unwrap_or("preview"), %command, ?status, "esft-train failed: {}", stderr.trim());
        let error = match error_line {
            Some(v) => JobError::new(
                v.get("code")
                    .and_then(Value::as_str)
                    .unwrap_or("training_failed"),
                scrub(
                    v.get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("the trainer failed"),
                ),
            ),
            None => {
                use std::os::unix::process::ExitStatusExt;
                match status.signal() {
                    Some(libc::SIGKILL) => JobError::new(
                        "training_killed",
                        format!("the trainer ({command}) was killed, possibly for lack of memory"),
                    ),
                    Some(sig) => JobError::new(
                        "training_crashed",
                        format!("the trainer ({command}) died of signal {sig}"),
                    ),
                    None => JobError::new(
                        "training_failed",
                        scrub(
                            stderr
                                .lines()
                                .rev()
                                .find(|l| !l.trim().is_empty())
                                .unwrap_or("the trainer failed"),
                        ),
                    ),
                }
            }
        };
        Err(Stop::Failed(error))
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
        swap(
            self.cfg.data_dir.join(JOBS_DIR).join(&job.id),
            "the job's directory",
        );
        swap(self.cfg.data_dir.clone(), "the data directory");
        swap(self.cfg.model_dir.clone(), &job.model);
        m
    }
}

/// The hidden directory beside the adapter's where `esft-train train` keeps its resumable
/// state (`esft-train`'s `state_dir`).
fn state_dir(dir: &Path, adapter: &str) -> PathBuf {
    dir.join(format!(".{adapter}.train-state"))
}

/// The key of a job's work file `name` in the object store.
fn work_key(job_id: &str, name: &str) -> String {
    format!("{JOBS_DIR}/{job_id}/{name}")
}

/// The prefix of a job's saved state at `step` in the object store.
fn checkpoint_prefix(job_id: &str, step: i64) -> String {
    format!("{JOBS_DIR}/{job_id}/checkpoints/{step}")
}

/// Removes everything a job keeps in the object store.
async fn remove_stored(store: &Store, job_id: &str) -> Result<(), crate::store::StoreError> {
    for entry in store.list(&format!("{JOBS_DIR}/{job_id}")).await? {
        store.delete(&entry.key).await?;
    }
    Ok(())
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

fn kill(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: plain syscall on a pid this process spawned and has not reaped.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

fn os(parts: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    parts.iter().map(|p| p.as_ref().to_os_string()).collect()
}

fn score_args(
    model: &Path,
    training: &Path,
    esft: &EsftChoices,
    seed: i64,
    out: &Path,
) -> Vec<OsString> {
    let tokens = esft.scoring_tokens.to_string();
    let seed = seed.to_string();
    os(&[
        &"score",
        &"--model",
        &model,
        &"--data",
        &training,
        &"--tokens",
        &tokens,
        &"--seed",
        &seed,
        &"--out",
        &out,
        &"--json",
    ])
}

fn select_args(scores: &Path, esft: &EsftChoices, out: &Path) -> Vec<OsString> {
    let top_p = esft.top_p.to_string();
    let mut args = os(&[
        &"select",
        &"--scores",
        &scores,
        &"--score-function",
        &esft.score_function.as_str(),
        &"--top-p",
        &top_p,
        &"--out",
        &out,
    ]);
    if esft.train_shared_experts {
        args.push("--train-shared-experts".into());
    }
    if esft.train_non_expert_modules {
        args.push("--train-non-expert-modules".into());
    }
    args
}

fn train_args(
    cfg: &RunnerConfig,
    job: &JobRecord,
    training: &Path,
    validation: Option<&Path>,
    experts: &Path,
    out: &Path,
) -> Vec<OsString> {
    let spec = &job.spec;
    let esft = &spec.esft;
    let (lr, seed) = (esft.learning_rate.to_string(), job.seed.to_string());
    let save = cfg.save_every.max(1).to_string();
    let mut args = os(&[
        &"train",
        &"--model",
        &cfg.model_dir,
        &"--data",
        &training,
        &"--experts",
        &experts,
        &"--out",
        &out,
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
    let seq_len = esft
        .seq_len
        .map_or_else(|| "auto".to_string(), |s| s.to_string());
    args.extend(os(&[&"--seq-len", &seq_len]));
    match spec.batch_size {
        Some(b) => args.extend(os(&[&"--batch", &b.to_string()])),
        None => args.extend(os(&[&"--batch-tokens", &AUTO_BATCH_TOKENS.to_string()])),
    }
    match esft.steps {
        Some(s) => args.extend(os(&[&"--steps", &s.to_string()])),
        None => args.extend(os(&[&"--epochs", &spec.n_epochs.to_string()])),
    }
    match validation {
        Some(v) => args.extend(os(&[&"--eval-data", &v])),
        None => args.extend(os(&[&"--eval-split", &"0.02"])),
    }
    // The manifest names the files by their ids, never by this server's paths.
    args.extend(os(&[&"--data-name", &job.training_file]));
    if let Some(v) = &job.validation_file {
        args.extend(os(&[&"--eval-data-name", v]));
    }
    args
}

fn read_expert_config(path: &Path) -> Result<ExpertConfig, Stop> {
    let text = std::fs::read_to_string(path).map_err(|e| internal("reading the selection", e))?;
    serde_json::from_str(&text).map_err(|e| internal("reading the selection", e))
}

/// What a selection trains: the experts per layer, how many of how many, the trainable
/// parameters and the adapter's size (f32 tensors).
pub fn selection_summary(
    ec: &ExpertConfig,
    registry: &AdapterRegistry,
    esft: &EsftChoices,
) -> Value {
    let cfg = &registry.base.config;
    let layers = cfg.moe_layers().count();
    let total = layers * cfg.n_routed_experts;
    let selected = ec.expert_count();
    let params = ec.trainable_params(&registry.base);
    let per_layer: serde_json::Map<String, Value> = ec
        .experts
        .iter()
        .map(|(l, e)| (l.to_string(), json!(e)))
        .collect();
    json!({
        "score_function": esft.score_function.as_str(),
        "top_p": esft.top_p,
        "experts": per_layer,
        "selected_experts": selected,
        "total_experts": total,
        "share": if total == 0 { 0.0 } else { selected as f64 / total as f64 },
        "train_shared_experts": ec.shared_experts,
        "train_non_expert_modules": ec.non_expert_modules,
        "trainable_params": params,
        "adapter_bytes": params * 4,
    })
}

fn describe_selection(summary: &Value) -> String {
    let n = summary["selected_experts"].as_u64().unwrap_or(0);
    let total = summary["total_experts"].as_u64().unwrap_or(0);
    format!(
        "Selected {n} of {total} routed experts ({:.1}%): {} trainable parameters, an adapter of {} bytes",
        100.0 * summary["share"].as_f64().unwrap_or(0.0),
        summary["trainable_params"].as_u64().unwrap_or(0),
        summary["adapter_bytes"].as_u64().unwrap_or(0),
    )
}

fn fmt_loss(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |l| format!("{l:.4}"))
}

/// Copies the files of the flat directory `from` into `to`, each fsynced.
fn copy_files(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let dest = to.join(entry.file_name());
            std::fs::copy(entry.path(), &dest)?;
            std::fs::File::open(&dest)?.sync_all()?;
        }
    }
    std::fs::File::open(to)?.sync_all()
}
