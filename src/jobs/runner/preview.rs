//! The expert-selection preview: `score` and `select` on a training file, nothing
//! trained. At most `max` at once and one per owner, each under a time limit, its
//! children killed as soon as its request ends (answered, timed out, or abandoned by its
//! client).

use serde_json::Value;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::child::{kill, Trainer, Watch};
use super::install::{read_expert_config, selection_summary};
use super::stop::{internal, Stop};
use crate::adapter::AdapterRegistry;
use crate::jobs::contract::{Line, ScoreRun, SelectRun, EXPERTS_FILE, SCORES_FILE};
use crate::jobs::files::FileStore;
use crate::jobs::queue::{EsftChoices, JobError};

/// A running preview's child, to stop from outside.
#[derive(Default)]
struct Control {
    pid: Mutex<Option<u32>>,
    stopped: AtomicBool,
}

impl Watch for Control {
    fn stopped(&self) -> Option<Stop> {
        self.stopped
            .load(Ordering::SeqCst)
            .then_some(Stop::Cancelled)
    }

    fn child(&self, pid: Option<u32>) -> bool {
        if let Ok(mut p) = self.pid.lock() {
            *p = pid;
        }
        self.stopped.load(Ordering::SeqCst)
    }
}

/// Stops a preview's children when dropped.
struct StopOnDrop(Arc<Control>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::SeqCst);
        if let Some(pid) = self.0.pid.lock().ok().and_then(|p| *p) {
            kill(pid);
        }
    }
}

/// An owner's one preview at a time: taken while its preview runs.
struct Turn<'a> {
    running: &'a Mutex<HashSet<Option<String>>>,
    owner: Option<String>,
}

impl<'a> Turn<'a> {
    /// `None` while `owner` has a preview running.
    fn take(running: &'a Mutex<HashSet<Option<String>>>, owner: Option<&str>) -> Option<Self> {
        let owner = owner.map(str::to_string);
        let taken = running.lock().ok()?.insert(owner.clone());
        // (Built only when taken: a turn dropped gives its owner's place back.)
        taken.then(|| Self { running, owner })
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.running.lock() {
            set.remove(&self.owner);
        }
    }
}

/// What previews run with.
pub struct Previews {
    /// Previews at once (0: off here), and how long one may take.
    max: usize,
    timeout: Duration,
    slots: tokio::sync::Semaphore,
    /// The owners with a preview running.
    running: Mutex<HashSet<Option<String>>>,
    trainer: Trainer,
    model_dir: PathBuf,
    /// Where previews keep their scratch directories.
    scratch: PathBuf,
}

impl Previews {
    pub fn new(
        max: usize,
        timeout: Duration,
        trainer: Trainer,
        model_dir: PathBuf,
        scratch: PathBuf,
    ) -> Self {
        Self {
            max,
            timeout,
            slots: tokio::sync::Semaphore::new(max),
            running: Mutex::new(HashSet::new()),
            trainer,
            model_dir,
            scratch,
        }
    }

    /// Previews the selection a job would make on `training_file` of `owner`.
    pub async fn run(
        &self,
        files: &FileStore,
        registry: Arc<AdapterRegistry>,
        owner: Option<&str>,
        training_file: &str,
        esft: EsftChoices,
        seed: i64,
    ) -> Result<Value, JobError> {
        if self.max == 0 {
            return Err(JobError::new(
                "preview_unavailable",
                "this server runs no expert-selection previews (fine_tuning.max_concurrent_previews = 0); \
                 ask a server that trains",
            ));
        }
        let _mine = Turn::take(&self.running, owner).ok_or_else(|| {
            JobError::new(
                "preview_in_progress",
                "a preview of yours is running; wait for it to end",
            )
        })?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let timed_out = || {
            JobError::new(
                "preview_timeout",
                format!(
                    "the preview took longer than this server's limit of {} s \
                     (fine_tuning.preview_timeout_seconds); ask for fewer scoring_tokens",
                    self.timeout.as_secs()
                ),
            )
        };
        let _slot = tokio::time::timeout_at(deadline, self.slots.acquire())
            .await
            .map_err(|_| timed_out())?
            .map_err(|_| JobError::new("internal_error", "the server is shutting down"))?;
        // Stops the children when this future is dropped: the client went away, or the
        // time ran out.
        let control = Arc::new(Control::default());
        let _stop_on_drop = StopOnDrop(control.clone());
        let training = files.local_path(training_file).await.map_err(|e| {
            tracing::error!("fetching the file {training_file} for a preview: {e}");
            JobError::new(
                "internal_error",
                "the training file could not be read; the server log has the details",
            )
        })?;
        let file_id = training_file.to_string();
        let (trainer, model_dir, scratch) = (
            self.trainer.clone(),
            self.model_dir.clone(),
            self.scratch.clone(),
        );
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("esft-preview".into())
            .spawn(move || {
                let shown = training.display().to_string();
                let scrub = |m: &str| m.replace(&shown, &file_id);
                let result = (|| -> Result<Value, Stop> {
                    let dir = std::fs::create_dir_all(&scratch)
                        .and_then(|()| {
                            tempfile::Builder::new()
                                .prefix(".preview-")
                                .tempdir_in(&scratch)
                        })
                        .map_err(|e| internal("creating a preview directory", e))?;
                    let scores = dir.path().join(SCORES_FILE);
                    let experts = dir.path().join(EXPERTS_FILE);
                    let mut tokens = 0;
                    let score = ScoreRun {
                        model: &model_dir,
                        data: &training,
                        tokens: esft.scoring_tokens,
                        seed,
                        out: &scores,
                    };
                    let watch: &Control = &control;
                    trainer.run("preview", &score.argv(), watch, &scrub, |line| {
                        if let Line::ScoreDone(d) = line {
                            tokens = d.tokens;
                        }
                    })?;
                    let select = SelectRun {
                        scores: &scores,
                        score_function: esft.score_function.as_str(),
                        top_p: esft.top_p,
                        train_shared_experts: esft.train_shared_experts,
                        train_non_expert_modules: esft.train_non_expert_modules,
                        out: &experts,
                    };
                    trainer.run("preview", &select.argv(), watch, &scrub, |_| {})?;
                    let ec = read_expert_config(&experts)?;
                    let mut summary = selection_summary(&ec, &registry, &esft);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_turn_per_owner_given_back_when_dropped() {
        let running = Mutex::new(HashSet::new());
        let acme = Turn::take(&running, Some("acme")).unwrap();
        assert!(Turn::take(&running, Some("acme")).is_none());
        let admin = Turn::take(&running, None).unwrap();
        assert!(Turn::take(&running, None).is_none());
        assert!(Turn::take(&running, Some("globex")).is_some());
        drop(acme);
        assert!(Turn::take(&running, Some("acme")).is_some());
        drop(admin);
        assert!(running.lock().unwrap().is_empty());
    }

    #[test]
    fn a_dropped_preview_stops_and_kills_its_child() {
        let control = Arc::new(Control::default());
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        assert!(!control.child(Some(child.id())));
        assert!(control.stopped().is_none());
        drop(StopOnDrop(control.clone()));
        assert!(matches!(control.stopped(), Some(Stop::Cancelled)));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
        // A child that starts after the stop is to be killed at once.
        assert!(control.child(Some(1)));
    }
}
