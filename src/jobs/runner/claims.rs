//! The claims this runner holds, one per job it runs here, keyed by its holder (a job
//! lost and claimed again has two while the first winds down): the child each runs, why
//! it must stop once it must, its training rate and its deadline; and the renewal of
//! their leases ([`renew_round`]), which stops the claims whose job was cancelled, taken
//! over, unrenewable for longer than a lease, or past its deadline.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::child::{kill, Watch};
use super::stop::{no_room, Stop};
use crate::jobs::db::now;
use crate::jobs::queue::{JobError, JobRecord, JobStore, JobsError, Lease, Renewal};

/// Why a claim must stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Cancelled,
    Lost,
    Released,
    /// The job ran past its limit (the limit, for the message).
    TimedOut(Duration),
    /// What it wrote left less free disk space than the reserve (the bytes free).
    NoRoom(u64),
}

impl StopReason {
    fn stop(self) -> Stop {
        match self {
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
            StopReason::NoRoom(free) => Stop::Failed(no_room("saving the training state", free)),
        }
    }
}

/// One claim.
struct Active {
    job_id: String,
    /// The child process running now.
    pid: Option<u32>,
    stop: Option<StopReason>,
    /// Training tokens per second of the last step.
    tokens_per_s: f64,
    /// The last renewal that held.
    renewed: Instant,
    /// When the job must have ended, and the limit that says so.
    deadline: Option<(Instant, Duration)>,
}

#[derive(Default)]
pub struct Claims {
    active: Mutex<HashMap<String, Active>>,
}

impl Claims {
    /// Adds the claim `holder` of `job`, which may run `max_job` from its first start
    /// (whichever worker that was on).
    pub fn add(&self, holder: &str, job: &JobRecord, max_job: Option<Duration>) {
        let deadline = max_job.map(|max| {
            let ran = u64::try_from(now() - job.started_at.unwrap_or_else(now)).unwrap_or(0);
            (
                Instant::now() + max.saturating_sub(Duration::from_secs(ran)),
                max,
            )
        });
        let claim = Active {
            job_id: job.id.clone(),
            pid: None,
            stop: None,
            tokens_per_s: 0.0,
            renewed: Instant::now(),
            deadline,
        };
        if let Ok(mut a) = self.active.lock() {
            a.insert(holder.to_string(), claim);
        }
    }

    pub fn remove(&self, holder: &str) {
        if let Ok(mut a) = self.active.lock() {
            a.remove(holder);
        }
    }

    /// Claims held now.
    pub fn len(&self) -> usize {
        self.active.lock().map_or(0, |a| a.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Training tokens per second over the claims.
    pub fn tokens_per_s(&self) -> f64 {
        self.active
            .lock()
            .map_or(0.0, |a| a.values().map(|j| j.tokens_per_s).sum())
    }

    pub fn set_rate(&self, holder: &str, tokens_per_s: f64) {
        self.with(holder, |j| j.tokens_per_s = tokens_per_s);
    }

    /// The holders of the claims matching `pick`.
    fn holders(&self, pick: impl Fn(&str, &Active) -> bool) -> Vec<String> {
        self.active
            .lock()
            .map(|a| {
                a.iter()
                    .filter(|(h, j)| pick(h, j))
                    .map(|(h, _)| h.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether a claim of `job_id` other than `holder` is still here (an earlier one,
    /// lost, winding down).
    pub fn other_claim_of(&self, job_id: &str, holder: &str) -> bool {
        !self
            .holders(|h, j| j.job_id == job_id && h != holder)
            .is_empty()
    }

    /// Stops every claim of `job_id`.
    pub fn stop_job(&self, job_id: &str, why: StopReason) {
        for h in self.holders(|_, j| j.job_id == job_id) {
            self.stop(&h, why);
        }
    }

    /// Stops every claim.
    pub fn stop_all(&self, why: StopReason) {
        for h in self.holders(|_, _| true) {
            self.stop(&h, why);
        }
    }

    /// Marks the claim `holder` as stopping for `why` (the first reason stays) and kills
    /// its child.
    pub fn stop(&self, holder: &str, why: StopReason) {
        let pid = self
            .with(holder, |j| {
                j.stop.get_or_insert(why);
                j.pid
            })
            .flatten();
        if let Some(pid) = pid {
            kill(pid);
        }
    }

    /// Why the claim `holder` must stop, if it must.
    pub fn stopped(&self, holder: &str) -> Option<Stop> {
        self.with(holder, |j| j.stop)
            .flatten()
            .map(StopReason::stop)
    }

    /// The claim `holder` as its children's [`Watch`].
    pub fn watch<'a>(&'a self, holder: &'a str) -> impl Watch + 'a {
        ClaimWatch {
            claims: self,
            holder,
        }
    }

    fn with<T>(&self, holder: &str, f: impl FnOnce(&mut Active) -> T) -> Option<T> {
        self.active.lock().ok()?.get_mut(holder).map(f)
    }
}

struct ClaimWatch<'a> {
    claims: &'a Claims,
    holder: &'a str,
}

impl Watch for ClaimWatch<'_> {
    fn stopped(&self) -> Option<Stop> {
        self.claims.stopped(self.holder)
    }

    fn child(&self, pid: Option<u32>) -> bool {
        self.claims
            .with(self.holder, |j| {
                j.pid = pid;
                if pid.is_none() {
                    j.tokens_per_s = 0.0;
                }
                j.stop.is_some()
            })
            .unwrap_or(false)
    }
}

/// One round of renewals: stops the claims past their deadline, renews the lease of the
/// others (`lease` from now), and stops those whose renewal says the job is cancelled or
/// held elsewhere, or that could not be renewed for longer than `lease`. A renewal that
/// takes longer than `every` counts as failed (an unreachable database can hold a query
/// far longer than a lease).
pub async fn renew_round(claims: &Claims, jobs: &JobStore, lease: Duration, every: Duration) {
    let now_at = Instant::now();
    for holder in
        claims.holders(|_, j| j.stop.is_none() && j.deadline.is_some_and(|d| now_at >= d.0))
    {
        tracing::warn!(%holder, "a fine-tuning job ran past fine_tuning.max_job_seconds: stopping it");
        if let Some(max) = claims.with(&holder, |j| j.deadline.map(|d| d.1)).flatten() {
            claims.stop(&holder, StopReason::TimedOut(max));
        }
    }
    for holder in claims.holders(|_, j| j.stop.is_none()) {
        let Some(id) = claims.with(&holder, |j| j.job_id.clone()) else {
            continue;
        };
        let held = Lease {
            worker: holder.clone(),
            duration: lease,
        };
        let renewed = match tokio::time::timeout(every, jobs.renew(&id, &held)).await {
            Ok(r) => r,
            Err(_) => Err(JobsError::Db(sqlx::Error::PoolTimedOut)),
        };
        match renewed {
            Ok(Renewal::Held) => {
                claims.with(&holder, |j| j.renewed = Instant::now());
            }
            Ok(Renewal::Cancelled) => {
                tracing::info!(job = %id, "the job was cancelled: stopping it");
                claims.stop(&holder, StopReason::Cancelled);
            }
            Ok(Renewal::Lost) => {
                tracing::warn!(job = %id, "the job's lease is lost: stopping it");
                claims.stop(&holder, StopReason::Lost);
            }
            Err(e) => {
                let since = claims
                    .with(&holder, |j| j.renewed.elapsed())
                    .unwrap_or_default();
                tracing::warn!(job = %id, "renewing the job's lease failed ({:.1} s since the last renewal): {e}", since.as_secs_f64());
                if since > lease {
                    tracing::error!(job = %id, "the job's lease expired unrenewed: abandoning it here");
                    claims.stop(&holder, StopReason::Lost);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::queue::{EsftChoices, JobSpec, ScoreFunction, Status};

    fn job(id: &str, started_at: Option<i64>) -> JobRecord {
        JobRecord {
            id: id.into(),
            owner: None,
            model: "m".into(),
            status: Status::Running,
            created_at: 0,
            started_at,
            finished_at: None,
            estimated_finish: None,
            training_file: "file-1".into(),
            validation_file: None,
            suffix: None,
            seed: 0,
            metadata: None,
            spec: JobSpec {
                n_epochs: 1,
                batch_size: None,
                learning_rate_multiplier: 1.0,
                esft: EsftChoices {
                    score_function: ScoreFunction::Token,
                    top_p: 0.2,
                    train_shared_experts: false,
                    train_non_expert_modules: false,
                    steps: None,
                    learning_rate: 1e-5,
                    scoring_tokens: 10,
                    seq_len: None,
                },
            },
            adapter: "a".into(),
            fine_tuned_model: None,
            trained_tokens: None,
            error: None,
            esft: None,
            worker: None,
        }
    }

    #[test]
    fn the_first_reason_to_stop_stays_and_reaches_the_child_watch() {
        let claims = Claims::default();
        claims.add("w/1", &job("j1", None), None);
        claims.add("w/2", &job("j1", None), None);
        claims.add("w/3", &job("j2", None), None);
        assert_eq!(claims.len(), 3);
        assert!(claims.other_claim_of("j1", "w/2"));
        assert!(!claims.other_claim_of("j2", "w/3"));
        let watch = claims.watch("w/1");
        assert!(!watch.child(Some(u32::MAX)));
        claims.set_rate("w/1", 100.0);
        claims.set_rate("w/3", 50.0);
        assert_eq!(claims.tokens_per_s(), 150.0);
        // A stop of the job stops both its claims, not the other job's; a later reason
        // does not replace the first.
        claims.stop_job("j1", StopReason::Cancelled);
        claims.stop("w/1", StopReason::Lost);
        assert!(matches!(claims.stopped("w/1"), Some(Stop::Cancelled)));
        assert!(matches!(watch.stopped(), Some(Stop::Cancelled)));
        assert!(matches!(claims.stopped("w/2"), Some(Stop::Cancelled)));
        assert!(claims.stopped("w/3").is_none());
        // A child that ends takes its rate with it; one started on a stopped claim is
        // to be killed.
        assert!(watch.child(None));
        assert_eq!(claims.tokens_per_s(), 50.0);
        claims.remove("w/1");
        claims.remove("w/2");
        assert!(!claims.other_claim_of("j1", "nobody"));
        assert!(claims.stopped("w/1").is_none());
    }

    #[test]
    fn the_deadline_counts_from_the_jobs_first_start() {
        let claims = Claims::default();
        let max = Duration::from_secs(3600);
        claims.add("fresh", &job("j1", None), Some(max));
        claims.add("old", &job("j2", Some(now() - 3000)), Some(max));
        let left = |h: &str| {
            claims
                .with(h, |j| j.deadline.map(|d| d.0 - Instant::now()))
                .flatten()
                .unwrap()
        };
        assert!(left("fresh") > Duration::from_secs(3590));
        assert!(left("old") < Duration::from_secs(601));
        assert!(left("old") > Duration::from_secs(590));
        let Some(Stop::Failed(e)) = Some(StopReason::TimedOut(max).stop()) else {
            panic!()
        };
        assert_eq!(e.code, "job_timeout");
        assert!(e.message.contains("3600 s"), "{}", e.message);
        let Stop::Failed(e) = StopReason::NoRoom(1234).stop() else {
            panic!()
        };
        assert_eq!(e.code, "insufficient_storage");
        assert!(e.message.contains("1234 bytes are free"), "{}", e.message);
    }
}
