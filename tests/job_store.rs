//! The fine-tuning records (files, jobs, events, checkpoints) on both databases, each test
//! body run once on SQLite and once on a throwaway PostgreSQL: creation and its refusals,
//! listings and their pages, state transitions and their races, the claim of queued jobs
//! by several processes at once, and the refusal to delete a file an active job uses.

#[path = "common/postgres.rs"]
mod postgres;

use esft::jobs::files::{FileRecord, FileStore, FilesError, Order, PURPOSE_FINE_TUNE};
use esft::jobs::queue::{
    EsftChoices, EventKind, JobError, JobEvent, JobSpec, JobStore, JobsError, Lease, Level, NewJob,
    Page, ScoreFunction, Status,
};
use serde_json::json;
use sqlx::Row;
use std::collections::HashSet;
use std::io::Write;
use std::sync::Arc;

const LINE: &str = "{\"prompt\": \"a\", \"completion\": \"b\"}\n";

/// A worker's lease that outlives any test.
fn lease() -> Lease {
    Lease {
        worker: "test-host/1/worker".into(),
        duration: std::time::Duration::from_secs(600),
    }
}

/// One database to run a test body on, and a data directory.
struct Backend {
    name: &'static str,
    database: String,
    data_dir: tempfile::TempDir,
    _db: postgres::TestDatabase,
}

impl Backend {
    /// A store on this database (a pool of its own, as another process would have).
    async fn files(&self, max_bytes: u64) -> FileStore {
        FileStore::open(self.data_dir.path(), &self.database, max_bytes)
            .await
            .unwrap_or_else(|e| panic!("{}: opening the store: {e}", self.name))
    }
}

/// SQLite, then PostgreSQL where a server can be had (see `common/postgres.rs`).
fn backends() -> Vec<Backend> {
    postgres::databases()
        .into_iter()
        .map(|db| Backend {
            name: db.name,
            database: db.url.clone(),
            data_dir: tempfile::tempdir().unwrap(),
            _db: db,
        })
        .collect()
}

async fn add(store: &FileStore, owner: Option<&str>) -> Result<FileRecord, FilesError> {
    let mut t = store.staging().await.unwrap();
    t.write_all(LINE.as_bytes()).unwrap();
    store
        .add(
            t,
            LINE.len() as u64,
            owner,
            "train.jsonl",
            PURPOSE_FINE_TUNE,
            None,
        )
        .await
}

fn spec() -> JobSpec {
    JobSpec {
        n_epochs: 3,
        batch_size: None,
        learning_rate_multiplier: 1.5,
        esft: EsftChoices {
            score_function: ScoreFunction::Gate,
            top_p: 0.2,
            train_shared_experts: false,
            train_non_expert_modules: true,
            steps: Some(7),
            learning_rate: 1e-5,
            scoring_tokens: 4096,
            seq_len: None,
        },
    }
}

fn new_job(owner: Option<&str>, training_file: &str, validation_file: Option<&str>) -> NewJob {
    let id = esft::jobs::queue::new_job_id();
    NewJob {
        owner: owner.map(str::to_string),
        model: "lite".into(),
        training_file: training_file.into(),
        validation_file: validation_file.map(str::to_string),
        suffix: Some("s".into()),
        // Beyond 32 bits, and negative: BIGINT round trips on both backends.
        seed: -(1i64 << 40) - 3,
        metadata: Some(json!({"team": "blue"})),
        spec: spec(),
        adapter: format!("{id}-adapter"),
        id,
    }
}

/// A job of `owner` on a new file of theirs, moved to `queued`.
async fn queued(files: &FileStore, jobs: &JobStore, owner: Option<&str>) -> String {
    let file = add(files, owner).await.unwrap();
    let job = jobs.create(new_job(owner, &file.id, None)).await.unwrap();
    assert!(jobs.queue_validated(&job.id).await.unwrap());
    job.id
}

#[tokio::test]
async fn files_are_kept_listed_paged_owned_and_deleted() {
    for b in backends() {
        let store = b.files(3 * LINE.len() as u64).await;
        let a = add(&store, Some("acme")).await.unwrap();
        let admin = add(&store, None).await.unwrap();
        assert_eq!(
            store.get(Some("acme"), &a.id).await.unwrap(),
            Some(a.clone())
        );
        assert_eq!(store.get(Some("globex"), &a.id).await.unwrap(), None);
        assert_eq!(
            store.get(None, &admin.id).await.unwrap(),
            Some(admin.clone())
        );
        assert_eq!(store.used_bytes(Some("acme")).await.unwrap(), a.bytes);
        assert_eq!(store.used_bytes(None).await.unwrap(), admin.bytes);
        let mut ids = vec![a.id.clone()];
        for _ in 0..2 {
            ids.push(add(&store, Some("acme")).await.unwrap().id);
        }
        // The quota is per owner: acme is full, globex is not.
        assert!(
            matches!(
                add(&store, Some("acme")).await,
                Err(FilesError::Quota { .. })
            ),
            "{}",
            b.name
        );
        add(&store, Some("globex")).await.unwrap();
        let mut by_owner = store.bytes_by_owner().await.unwrap();
        by_owner.sort();
        assert_eq!(
            by_owner,
            vec![
                (None, LINE.len() as u64),
                (Some("acme".into()), 3 * LINE.len() as u64),
                (Some("globex".into()), LINE.len() as u64),
            ],
            "{}",
            b.name
        );
        // Pages of one, both orders, walk the same files.
        for order in [Order::Asc, Order::Desc] {
            let all = store
                .list(Some("acme"), None, None, 100, order)
                .await
                .unwrap();
            assert_eq!(all.files.len(), 3);
            let mut walked = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let page = store
                    .list(
                        Some("acme"),
                        Some(PURPOSE_FINE_TUNE),
                        after.as_deref(),
                        1,
                        order,
                    )
                    .await
                    .unwrap();
                walked.extend(page.files.iter().map(|f| f.id.clone()));
                after = page.files.last().map(|f| f.id.clone());
                if !page.has_more {
                    break;
                }
            }
            let all: Vec<String> = all.files.into_iter().map(|f| f.id).collect();
            assert_eq!(walked, all, "{}", b.name);
        }
        let mut sorted = ids.clone();
        sorted.sort();
        let mut listed: Vec<String> = store
            .list(Some("acme"), None, None, 100, Order::Asc)
            .await
            .unwrap()
            .files
            .into_iter()
            .map(|f| f.id)
            .collect();
        listed.sort();
        assert_eq!(listed, sorted);
        assert_eq!(
            store
                .list(None, None, None, 100, Order::Asc)
                .await
                .unwrap()
                .files
                .len(),
            5
        );
        assert!(matches!(
            store
                .list(Some("globex"), None, Some(&a.id), 10, Order::Asc)
                .await,
            Err(FilesError::NoSuchFile(_))
        ));
        // Another tenant cannot delete it; its owner can, and its bytes go too.
        assert_eq!(store.delete(Some("globex"), &a.id).await.unwrap(), None);
        assert_eq!(
            store.delete(Some("acme"), &a.id).await.unwrap(),
            Some(a.clone())
        );
        assert!(!store.blob_path(&a.id).exists());
        assert_eq!(store.get(None, &a.id).await.unwrap(), None);
        // The records outlive the store (a restart): a second store sees the same.
        drop(store);
        let again = b.files(1 << 20).await;
        assert_eq!(
            again
                .list(None, None, None, 100, Order::Asc)
                .await
                .unwrap()
                .files
                .len(),
            4,
            "{}",
            b.name
        );
    }
}

#[tokio::test]
async fn jobs_round_trip_list_page_and_refuse_what_they_must() {
    for b in backends() {
        let files = b.files(1 << 20).await;
        let jobs = JobStore::new(files.pool(), 2);
        let train = add(&files, Some("acme")).await.unwrap();
        let valid = add(&files, Some("acme")).await.unwrap();
        let theirs = add(&files, Some("globex")).await.unwrap();

        let job = jobs
            .create(new_job(Some("acme"), &train.id, Some(&valid.id)))
            .await
            .unwrap();
        // Every column comes back as it went in.
        let got = jobs.get(Some("acme"), &job.id).await.unwrap();
        assert_eq!(got.as_ref(), Some(&job), "{}", b.name);
        assert_eq!(jobs.get(Some("globex"), &job.id).await.unwrap(), None);
        assert_eq!(jobs.get(None, &job.id).await.unwrap(), Some(job.clone()));
        assert_eq!(
            jobs.status(&job.id).await.unwrap(),
            Some(Status::ValidatingFiles)
        );
        assert_eq!(jobs.status("ftjob-none").await.unwrap(), None);

        // Files that are not the owner's (or do not exist) are refused, by their param.
        for (t, v, param) in [
            (theirs.id.as_str(), None, "training_file"),
            ("file-missing", None, "training_file"),
            (
                train.id.as_str(),
                Some(theirs.id.as_str()),
                "validation_file",
            ),
        ] {
            match jobs.create(new_job(Some("acme"), t, v)).await {
                Err(JobsError::NoSuchFile { param: p, .. }) => assert_eq!(p, param, "{}", b.name),
                other => panic!("{}: {other:?}", b.name),
            }
        }
        // The admin may name anyone's file.
        let by_admin = jobs.create(new_job(None, &theirs.id, None)).await.unwrap();
        // Quota: two active jobs per owner; an ended one frees its place.
        let second = jobs
            .create(new_job(Some("acme"), &train.id, None))
            .await
            .unwrap();
        assert!(matches!(
            jobs.create(new_job(Some("acme"), &train.id, None)).await,
            Err(JobsError::Quota {
                active: 2,
                limit: 2
            })
        ));
        assert!(
            jobs.cancel(Some("acme"), &second.id)
                .await
                .unwrap()
                .unwrap()
                .1
        );
        let third = jobs
            .create(new_job(Some("acme"), &train.id, None))
            .await
            .unwrap();

        // Listings: newest first (created_at, then id), pages that walk them all, tenancy,
        // and metadata filters.
        let all = jobs.list(None, None, 100, &[]).await.unwrap();
        let mut expected = vec![job.clone(), by_admin.clone(), second.clone(), third.clone()];
        expected.sort_by(|x, y| (y.created_at, &y.id).cmp(&(x.created_at, &x.id)));
        let ids = |v: &[esft::jobs::queue::JobRecord]| -> Vec<String> {
            v.iter().map(|j| j.id.clone()).collect()
        };
        assert_eq!(ids(&all.items), ids(&expected), "{}", b.name);
        let mut walked = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = jobs.list(None, after.as_deref(), 1, &[]).await.unwrap();
            walked.extend(ids(&page.items));
            after = page.items.last().map(|j| j.id.clone());
            if !page.has_more {
                break;
            }
        }
        assert_eq!(walked, ids(&expected), "{}", b.name);
        let acme = jobs.list(Some("acme"), None, 100, &[]).await.unwrap();
        assert_eq!(acme.items.len(), 3);
        assert!(matches!(
            jobs.list(Some("globex"), Some(&job.id), 10, &[]).await,
            Err(JobsError::NoSuchCursor { .. })
        ));
        let blue = [("team".to_string(), "blue".to_string())];
        let red = [("team".to_string(), "red".to_string())];
        assert_eq!(
            jobs.list(None, None, 100, &blue).await.unwrap().items.len(),
            4
        );
        assert!(jobs
            .list(None, None, 100, &red)
            .await
            .unwrap()
            .items
            .is_empty());

        // Progress, selection, success: the record carries them.
        assert!(jobs.queue_validated(&job.id).await.unwrap());
        let claimed = jobs.claim_next(&lease()).await.unwrap().unwrap();
        assert_eq!(
            claimed.id, job.id,
            "{}: the oldest queued job first",
            b.name
        );
        assert_eq!(claimed.status, Status::Running);
        assert!(claimed.started_at.is_some());
        assert!(jobs
            .set_progress(&job.id, &lease().worker, 1234, Some(1 << 33))
            .await
            .unwrap());
        assert!(jobs
            .set_selection(&job.id, &lease().worker, &json!({"layers": {"1": [3, 5]}}))
            .await
            .unwrap());
        // Another worker's writes change nothing.
        assert!(!jobs.set_progress(&job.id, "other", 1, None).await.unwrap());
        assert!(!jobs
            .succeed(&job.id, "other", "lite:acme", 1)
            .await
            .unwrap());
        let running = jobs.get(None, &job.id).await.unwrap().unwrap();
        assert_eq!(running.trained_tokens, Some(1234));
        assert_eq!(running.estimated_finish, Some(1 << 33));
        assert_eq!(running.esft, Some(json!({"layers": {"1": [3, 5]}})));
        assert!(jobs
            .succeed(&job.id, &lease().worker, "lite:acme", 4321)
            .await
            .unwrap());
        let done = jobs.get(None, &job.id).await.unwrap().unwrap();
        assert_eq!(done.status, Status::Succeeded);
        assert_eq!(done.fine_tuned_model.as_deref(), Some("lite:acme"));
        assert_eq!(done.trained_tokens, Some(4321));
        assert_eq!(done.estimated_finish, None);
        assert!(done.finished_at.is_some());
        // A terminal status is never left.
        let w = lease().worker;
        assert!(!jobs.queue_validated(&job.id).await.unwrap());
        assert!(!jobs.cancel(None, &job.id).await.unwrap().unwrap().1);
        assert!(!jobs.release(&job.id, &w, "x").await.unwrap());
        assert!(!jobs
            .fail_held(&job.id, &w, &JobError::new("x", "y"))
            .await
            .unwrap());
        assert!(!jobs.succeed(&job.id, &w, "again", 1).await.unwrap());
        assert_eq!(jobs.status(&job.id).await.unwrap(), Some(Status::Succeeded));
        // A failure carries its error object, and only the holder makes it.
        assert!(jobs.queue_validated(&by_admin.id).await.unwrap());
        let claimed = jobs.claim_next(&lease()).await.unwrap().unwrap();
        assert_eq!(claimed.id, by_admin.id);
        let error = JobError::new("invalid_training_file", "bad line 3");
        assert!(!jobs.fail_held(&by_admin.id, "other", &error).await.unwrap());
        assert!(jobs.fail_held(&by_admin.id, &w, &error).await.unwrap());
        let failed = jobs.get(None, &by_admin.id).await.unwrap().unwrap();
        assert_eq!(failed.status, Status::Failed);
        assert_eq!(
            failed.error,
            Some(JobError::new("invalid_training_file", "bad line 3"))
        );
        let counts = jobs.counts().await.unwrap();
        let count = |s: Status| counts.iter().find(|(st, _)| *st == s).map(|(_, n)| *n);
        assert_eq!(count(Status::Succeeded), Some(1));
        assert_eq!(count(Status::Failed), Some(1));
        assert_eq!(count(Status::Cancelled), Some(1));
        assert_eq!(count(Status::ValidatingFiles), Some(1));
        assert_eq!(count(Status::Running), Some(0));
        assert_eq!(
            jobs.with_status(Status::ValidatingFiles).await.unwrap(),
            vec![jobs.get(None, &third.id).await.unwrap().unwrap()]
        );
    }
}

#[tokio::test]
async fn a_validated_job_is_queued_with_its_event_in_one_step() {
    for b in backends() {
        let files = b.files(1 << 20).await;
        let jobs = JobStore::new(files.pool(), 0);
        let file = add(&files, Some("acme")).await.unwrap();
        let job = jobs
            .create(new_job(Some("acme"), &file.id, None))
            .await
            .unwrap();
        assert!(jobs.queue_validated(&job.id).await.unwrap(), "{}", b.name);
        let now = jobs.get(None, &job.id).await.unwrap().unwrap();
        assert_eq!(now.status, Status::Queued, "{}", b.name);
        let messages = |page: &Page<JobEvent>| -> Vec<String> {
            page.items.iter().map(|e| e.message.clone()).collect()
        };
        let events = jobs.events(&job.id, None, 100).await.unwrap();
        assert_eq!(
            messages(&events),
            ["Files validated, moving job to queued state"],
            "{}",
            b.name
        );
        // Only a job still validating its files moves: no second move, no second event.
        assert!(!jobs.queue_validated(&job.id).await.unwrap());
        assert_eq!(
            jobs.events(&job.id, None, 100).await.unwrap().items.len(),
            1
        );
        // A job cancelled while its files were checked stays cancelled, without the event.
        let other = jobs
            .create(new_job(Some("acme"), &file.id, None))
            .await
            .unwrap();
        jobs.cancel(Some("acme"), &other.id).await.unwrap();
        assert!(!jobs.queue_validated(&other.id).await.unwrap());
        let after = jobs.get(None, &other.id).await.unwrap().unwrap();
        assert_eq!(after.status, Status::Cancelled, "{}", b.name);
        let logged = messages(&jobs.events(&other.id, None, 100).await.unwrap());
        assert!(
            !logged.iter().any(|m| m.starts_with("Files validated")),
            "{logged:?}"
        );

        // A claimer racing the moves logs its start the moment it claims: on every job the
        // queue event comes first.
        let jobs = Arc::new(jobs);
        // The first job is still queued: out of the way first.
        assert_eq!(jobs.claim_next(&lease()).await.unwrap().unwrap().id, job.id);
        let mut ids = Vec::new();
        for _ in 0..24 {
            let job = jobs.create(new_job(None, &file.id, None)).await.unwrap();
            ids.push(job.id);
        }
        let claimer = {
            let jobs = jobs.clone();
            tokio::spawn(async move {
                let mut claimed = 0;
                while claimed < 24 {
                    match jobs.claim_next(&lease()).await.unwrap() {
                        Some(job) => {
                            jobs.event(&job.id, Level::Info, EventKind::Message, "started", None)
                                .await
                                .unwrap();
                            claimed += 1;
                        }
                        None => tokio::task::yield_now().await,
                    }
                }
            })
        };
        for id in &ids {
            assert!(jobs.queue_validated(id).await.unwrap());
        }
        claimer.await.unwrap();
        for id in &ids {
            // Newest first.
            let logged = messages(&jobs.events(id, None, 100).await.unwrap());
            let claimed = format!("Claimed by worker {}", lease().worker);
            assert_eq!(
                logged,
                [
                    "started",
                    claimed.as_str(),
                    "Files validated, moving job to queued state"
                ],
                "{}",
                b.name
            );
        }
    }
}

#[tokio::test]
async fn events_and_checkpoints_keep_their_order_and_pages() {
    for b in backends() {
        let files = b.files(1 << 20).await;
        let jobs = Arc::new(JobStore::new(files.pool(), 0));
        let id = queued(&files, &jobs, Some("acme")).await;
        let other = queued(&files, &jobs, Some("acme")).await;
        jobs.event(&id, Level::Info, EventKind::Message, "first", None)
            .await
            .unwrap();
        jobs.event(&other, Level::Info, EventKind::Message, "elsewhere", None)
            .await
            .unwrap();
        // Appends racing on one job (the runner and a cancel at once) all land, numbered
        // 1..=n without a gap.
        let mut racing = Vec::new();
        for i in 0..16 {
            let jobs = jobs.clone();
            let id = id.clone();
            racing.push(tokio::spawn(async move {
                jobs.event(
                    &id,
                    Level::Warn,
                    EventKind::Metrics,
                    &format!("step {i}"),
                    Some(&json!({"step": i, "train_loss": 0.5})),
                )
                .await
            }));
        }
        for r in racing {
            r.await.unwrap().unwrap();
        }
        let all = jobs.events(&id, None, 100).await.unwrap();
        assert!(!all.has_more);
        let seqs: Vec<i64> = all.items.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=18).rev().collect::<Vec<_>>(), "{}", b.name);
        // The transition to `queued` wrote the first event.
        let queued_event = all.items.last().unwrap();
        assert_eq!(
            queued_event.message,
            "Files validated, moving job to queued state"
        );
        let first = &all.items[all.items.len() - 2];
        assert_eq!(
            (first.message.as_str(), first.level, first.data.clone()),
            ("first", Level::Info, None)
        );
        assert_eq!(all.items[0].kind, EventKind::Metrics);
        assert_eq!(
            all.items[0].data.as_ref().unwrap()["train_loss"],
            json!(0.5)
        );
        let mut walked = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = jobs.events(&id, after.as_deref(), 5).await.unwrap();
            walked.extend(page.items.iter().map(|e| e.seq));
            after = page.items.last().map(|e| e.id.clone());
            if !page.has_more {
                break;
            }
        }
        assert_eq!(walked, seqs, "{}", b.name);
        // An event of another job is no cursor here.
        let theirs = jobs.events(&other, None, 10).await.unwrap().items[0]
            .id
            .clone();
        assert!(matches!(
            jobs.events(&id, Some(&theirs), 10).await,
            Err(JobsError::NoSuchCursor { .. })
        ));

        // Checkpoints: recorded by the worker holding the job, one per step (a repeat
        // changes nothing), newest step first.
        assert!(!jobs
            .checkpoint(&id, &lease().worker, 5, &json!({}), "m:5")
            .await
            .unwrap());
        while jobs.claim_next(&lease()).await.unwrap().is_some() {}
        assert!(!jobs
            .checkpoint(&id, "another worker", 5, &json!({}), "m:5")
            .await
            .unwrap());
        for step in [10, 20, 30] {
            assert!(jobs
                .checkpoint(
                    &id,
                    &lease().worker,
                    step,
                    &json!({"step": step, "train_loss": 1.0}),
                    &format!("m:{step}"),
                )
                .await
                .unwrap());
        }
        jobs.checkpoint(
            &id,
            &lease().worker,
            20,
            &json!({"replaced": true}),
            "other",
        )
        .await
        .unwrap();
        assert_eq!(
            jobs.checkpoint_steps(&id, 10).await.unwrap(),
            vec![30, 20, 10]
        );
        assert_eq!(jobs.checkpoint_steps(&id, 2).await.unwrap(), vec![30, 20]);
        let ckpts = jobs.checkpoints(&id, None, 2).await.unwrap();
        assert!(ckpts.has_more);
        assert_eq!(
            ckpts.items.iter().map(|c| c.step).collect::<Vec<_>>(),
            vec![30, 20]
        );
        assert_eq!(ckpts.items[1].model, "m:20", "{}", b.name);
        assert_eq!(ckpts.items[1].metrics["step"], json!(20));
        let rest = jobs
            .checkpoints(&id, Some(&ckpts.items[1].id), 2)
            .await
            .unwrap();
        assert!(!rest.has_more);
        assert_eq!(
            rest.items.iter().map(|c| c.step).collect::<Vec<_>>(),
            vec![10]
        );
        assert!(jobs
            .checkpoints(&other, None, 10)
            .await
            .unwrap()
            .items
            .is_empty());
    }
}

#[tokio::test]
async fn a_cancel_racing_the_runner_has_one_winner_and_files_in_use_stay() {
    for b in backends() {
        let files = b.files(1 << 20).await;
        let jobs = Arc::new(JobStore::new(files.pool(), 0));
        let file = add(&files, Some("acme")).await.unwrap();
        let job = jobs
            .create(new_job(Some("acme"), &file.id, None))
            .await
            .unwrap();
        // While the job is active its file cannot be deleted; the refusal names the job.
        for step in [Some(Status::Queued), Some(Status::Running), None] {
            match files.delete(Some("acme"), &file.id).await {
                Err(FilesError::InUse(j)) => assert_eq!(j, job.id, "{}", b.name),
                other => panic!("{}: {other:?}", b.name),
            }
            if let Some(to) = step {
                let from = if to == Status::Queued {
                    Status::ValidatingFiles
                } else {
                    Status::Queued
                };
                if to == Status::Running {
                    let claimed = jobs.claim_next(&lease()).await.unwrap().unwrap();
                    assert_eq!(claimed.id, job.id);
                } else {
                    assert_eq!(from, Status::ValidatingFiles);
                    assert!(jobs.queue_validated(&job.id).await.unwrap());
                }
            }
        }
        // The runner's success and a cancel, many times at once: exactly one wins, and the
        // record says which.
        let mut racers = Vec::new();
        for i in 0..8 {
            let jobs = jobs.clone();
            let id = job.id.clone();
            racers.push(tokio::spawn(async move {
                if i % 2 == 0 {
                    jobs.cancel(Some("acme"), &id).await.map(|r| {
                        r.is_some_and(|(_, changed)| changed)
                            .then_some(Status::Cancelled)
                    })
                } else {
                    jobs.succeed(&id, &lease().worker, "lite:x", 10)
                        .await
                        .map(|won| won.then_some(Status::Succeeded))
                }
            }));
        }
        let mut winners = Vec::new();
        for r in racers {
            winners.extend(r.await.unwrap().unwrap());
        }
        assert_eq!(winners.len(), 1, "{}: {winners:?}", b.name);
        assert_eq!(jobs.status(&job.id).await.unwrap(), Some(winners[0]));
        // Another tenant's cancel finds nothing; a cancel of an ended job changes nothing.
        assert_eq!(jobs.cancel(Some("globex"), &job.id).await.unwrap(), None);
        let (record, changed) = jobs.cancel(Some("acme"), &job.id).await.unwrap().unwrap();
        assert!(!changed);
        assert_eq!(record.status, winners[0]);
        // Ended, the job no longer holds its file.
        assert_eq!(
            files
                .delete(Some("acme"), &file.id)
                .await
                .unwrap()
                .map(|f| f.id),
            Some(file.id.clone()),
            "{}",
            b.name
        );
        // And a job cannot be created on a deleted file.
        assert!(matches!(
            jobs.create(new_job(Some("acme"), &file.id, None)).await,
            Err(JobsError::NoSuchFile { .. })
        ));
    }
}

/// Claimers with pools of their own (as separate processes would have) race for the queue:
/// every job is claimed exactly once, and none is left queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claimers_in_separate_processes_claim_each_job_once() {
    const JOBS: usize = 40;
    const CLAIMERS: usize = 6;
    for b in backends() {
        let files = b.files(1 << 30).await;
        let jobs = JobStore::new(files.pool(), 0);
        let mut queued_ids = HashSet::new();
        for _ in 0..JOBS {
            queued_ids.insert(queued(&files, &jobs, None).await);
        }
        let mut stores = Vec::new();
        for _ in 0..CLAIMERS {
            let f = b.files(1 << 30).await;
            stores.push(Arc::new(JobStore::new(f.pool(), 0)));
        }
        let start = Arc::new(tokio::sync::Barrier::new(CLAIMERS));
        let mut claimers = Vec::new();
        for store in stores {
            let start = start.clone();
            claimers.push(tokio::spawn(async move {
                start.wait().await;
                let mut mine = Vec::new();
                while let Some(job) = store.claim_next(&lease()).await? {
                    assert_eq!(job.status, Status::Running);
                    mine.push(job.id);
                }
                Ok::<_, JobsError>(mine)
            }));
        }
        let mut claimed = Vec::new();
        let mut busy = 0;
        for c in claimers {
            let mine = c.await.unwrap().unwrap();
            busy += usize::from(!mine.is_empty());
            claimed.extend(mine);
        }
        let unique: HashSet<String> = claimed.iter().cloned().collect();
        assert_eq!(
            claimed.len(),
            JOBS,
            "{}: a job was claimed twice or not at all",
            b.name
        );
        assert_eq!(unique, queued_ids, "{}", b.name);
        assert!(jobs.with_status(Status::Queued).await.unwrap().is_empty());
        assert_eq!(jobs.with_status(Status::Running).await.unwrap().len(), JOBS);
        assert!(jobs.claim_next(&lease()).await.unwrap().is_none());
        eprintln!(
            "{}: {JOBS} jobs claimed by {busy} of {CLAIMERS} claimers",
            b.name
        );
    }
}

/// Processes that start at once on a new database all bring its schema up without error
/// (PostgreSQL's concurrent `CREATE TABLE IF NOT EXISTS` would fail without the schema
/// lock), and all see the same tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processes_opening_a_new_database_at_once_all_succeed() {
    for b in backends() {
        let b = Arc::new(b);
        let mut opening = Vec::new();
        for _ in 0..8 {
            let b = b.clone();
            opening.push(tokio::spawn(async move {
                FileStore::open(b.data_dir.path(), &b.database, 1 << 20)
                    .await
                    .map(|s| s.pool())
            }));
        }
        let mut pools = Vec::new();
        for o in opening {
            pools.push(
                o.await
                    .unwrap()
                    .unwrap_or_else(|e| panic!("{}: {e}", b.name)),
            );
        }
        let first = b.files(1 << 20).await;
        let file = add(&first, None).await.unwrap();
        for pool in pools {
            let jobs = JobStore::new(pool, 0);
            jobs.create(new_job(None, &file.id, None)).await.unwrap();
        }
        assert_eq!(
            JobStore::new(first.pool(), 0)
                .with_status(Status::ValidatingFiles)
                .await
                .unwrap()
                .len(),
            8,
            "{}",
            b.name
        );
    }
}

/// On PostgreSQL a claimer passes over a job another claimer holds locked (mid-claim, its
/// transaction open) and takes the next one at once, instead of waiting for that one or
/// coming back empty (`FOR UPDATE SKIP LOCKED`). SQLite has one writer and no row locks.
#[tokio::test]
async fn the_next_claim_goes_to_the_tenant_with_the_fewest_running_jobs() {
    for b in backends() {
        let files = b.files(1 << 20).await;
        let jobs = JobStore::new(files.pool(), 0);
        // a queues three, b one a moment later, the admin one after that.
        let mut a = Vec::new();
        for _ in 0..3 {
            a.push(queued(&files, &jobs, Some("a")).await);
        }
        let b_job = queued(&files, &jobs, Some("b")).await;
        let admin = queued(&files, &jobs, None).await;
        // Creation times a second apart, in that order (records keep whole seconds).
        let all = [&a[0], &a[1], &a[2], &b_job, &admin];
        for (i, id) in all.iter().enumerate() {
            sqlx::query("UPDATE jobs SET created_at = $1 WHERE id = $2")
                .bind(1_000_000 + i as i64)
                .bind(id.as_str())
                .execute(&files.pool())
                .await
                .unwrap();
        }
        let mut order = Vec::new();
        while let Some(j) = jobs.claim_next(&lease()).await.unwrap() {
            order.push(j.id);
        }
        // Nobody runs: the oldest (a's). Then b and the admin (no running job) before a's
        // second, and a's others once every owner runs one.
        assert_eq!(
            order,
            vec![a[0].clone(), b_job, admin, a[1].clone(), a[2].clone()],
            "{}",
            b.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimer_skips_a_job_another_holds_locked() {
    use sqlx::Row;
    for b in backends().into_iter().filter(|b| b.name == "postgres") {
        let files = b.files(1 << 20).await;
        let jobs = JobStore::new(files.pool(), 0);
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(queued(&files, &jobs, None).await);
        }
        let order = jobs.with_status(Status::Queued).await.unwrap();
        let mut tx = files.pool().begin().await.unwrap();
        let held: String = sqlx::query(
            "SELECT id FROM jobs WHERE status = 'queued' ORDER BY created_at, id LIMIT 1 \
             FOR UPDATE",
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap()
        .get("id");
        assert_eq!(held, order[0].id);
        let other = JobStore::new(b.files(1 << 20).await.pool(), 0);
        let next = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            other.claim_next(&lease()),
        )
        .await
        .expect("the claim waited on the locked job")
        .unwrap()
        .expect("the claim came back empty with jobs queued");
        assert_eq!(next.id, order[1].id);
        tx.rollback().await.unwrap();
        // Released, the held job is the next claimed.
        assert_eq!(
            other.claim_next(&lease()).await.unwrap().unwrap().id,
            order[0].id
        );
        assert_eq!(
            other.claim_next(&lease()).await.unwrap().unwrap().id,
            order[2].id
        );
        assert!(other.claim_next(&lease()).await.unwrap().is_none());
    }
}

/// Leases: a claim holds a running job while its worker renews it; once it expires the job
/// goes back to the queue once (however many processes look), with an event naming the
/// worker that lost it; the next worker's claim takes it, and every write of the old
/// worker (progress, events, checkpoints, success, failure, release) then changes nothing.
/// A release gives a job back at once; a cancel is what the next renewal finds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_hold_expire_and_fence_the_worker_that_lost_them() {
    use esft::jobs::queue::Renewal;
    use std::time::Duration;
    for b in backends() {
        let files = b.files(1 << 20).await;
        let jobs = Arc::new(JobStore::new(files.pool(), 0));
        let id = queued(&files, &jobs, Some("acme")).await;
        let a = Lease {
            worker: "host-a/11/aaaa".into(),
            duration: Duration::from_millis(1500),
        };
        let bw = Lease {
            worker: "host-b/22/bbbb".into(),
            duration: Duration::from_secs(600),
        };
        assert_eq!(jobs.claim_next(&a).await.unwrap().unwrap().id, id);
        assert!(jobs.claim_next(&bw).await.unwrap().is_none(), "{}", b.name);
        // Renewed, it stays held past its first expiry.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            assert_eq!(jobs.renew(&id, &a).await.unwrap(), Renewal::Held);
            assert!(jobs.requeue_expired().await.unwrap().is_empty());
        }
        assert!(jobs
            .checkpoint(&id, &a.worker, 5, &json!({"step": 5}), "m:5")
            .await
            .unwrap());
        // Unrenewed, it expires, and processes looking at once put it back exactly once.
        tokio::time::sleep(Duration::from_millis(1700)).await;
        let mut lookers = Vec::new();
        for _ in 0..4 {
            let other = JobStore::new(b.files(1 << 20).await.pool(), 0);
            lookers.push(tokio::spawn(async move { other.requeue_expired().await }));
        }
        let mut requeued = Vec::new();
        for l in lookers {
            requeued.extend(l.await.unwrap().unwrap());
        }
        assert_eq!(requeued, vec![id.clone()], "{}", b.name);
        assert_eq!(jobs.status(&id).await.unwrap(), Some(Status::Queued));
        let events = jobs.events(&id, None, 10).await.unwrap().items;
        let lost: Vec<_> = events
            .iter()
            .filter(|e| e.message.contains("stopped renewing its lease"))
            .collect();
        assert_eq!(lost.len(), 1, "{}: {events:?}", b.name);
        assert!(lost[0].message.contains("host-a/11/aaaa"));
        assert_eq!(lost[0].data, Some(json!({"worker": "host-a/11/aaaa"})));

        // Another worker takes it over; the old one can change nothing any more.
        let taken = jobs.claim_next(&bw).await.unwrap().unwrap();
        assert_eq!(
            (taken.id.as_str(), taken.status),
            (id.as_str(), Status::Running)
        );
        assert_eq!(jobs.renew(&id, &a).await.unwrap(), Renewal::Lost);
        assert!(!jobs.set_progress(&id, &a.worker, 9, None).await.unwrap());
        assert!(!jobs
            .set_selection(&id, &a.worker, &json!({"x": 1}))
            .await
            .unwrap());
        assert!(!jobs
            .checkpoint(&id, &a.worker, 10, &json!({}), "m:10")
            .await
            .unwrap());
        assert!(!jobs
            .held_event(
                &id,
                &a.worker,
                Level::Info,
                EventKind::Message,
                "stale",
                None
            )
            .await
            .unwrap());
        assert!(!jobs
            .fail_held(&id, &a.worker, &JobError::new("x", "y"))
            .await
            .unwrap());
        assert!(!jobs.succeed(&id, &a.worker, "m", 1).await.unwrap());
        assert!(!jobs.release(&id, &a.worker, "stale").await.unwrap());
        assert_eq!(jobs.checkpoint_steps(&id, 10).await.unwrap(), vec![5]);
        let record = jobs.get(None, &id).await.unwrap().unwrap();
        assert_eq!(record.status, Status::Running);
        assert_eq!(record.trained_tokens, None);
        assert!(jobs
            .held_event(
                &id,
                &bw.worker,
                Level::Info,
                EventKind::Message,
                "resumed",
                None
            )
            .await
            .unwrap());
        assert!(!jobs
            .events(&id, None, 100)
            .await
            .unwrap()
            .items
            .iter()
            .any(|e| e.message == "stale"));

        // A release puts it back at once, claimable again.
        assert!(jobs
            .release(&id, &bw.worker, "worker b stopped")
            .await
            .unwrap());
        assert_eq!(jobs.status(&id).await.unwrap(), Some(Status::Queued));
        assert_eq!(jobs.claim_next(&bw).await.unwrap().unwrap().id, id);
        // A cancel is what the holder's next renewal finds.
        assert!(jobs.cancel(None, &id).await.unwrap().unwrap().1);
        assert_eq!(jobs.renew(&id, &bw).await.unwrap(), Renewal::Cancelled);
        assert!(!jobs.succeed(&id, &bw.worker, "m", 1).await.unwrap());
        assert_eq!(jobs.status(&id).await.unwrap(), Some(Status::Cancelled));

        // A running job without a lease (left by a process that took none) goes back too.
        let legacy = queued(&files, &jobs, None).await;
        sqlx::query("UPDATE jobs SET status = 'running' WHERE id = $1")
            .bind(&legacy)
            .execute(&files.pool())
            .await
            .unwrap();
        assert_eq!(jobs.requeue_expired().await.unwrap(), vec![legacy.clone()]);
        assert_eq!(jobs.status(&legacy).await.unwrap(), Some(Status::Queued));
    }
}

/// A database made before leases existed gets their columns when it is opened, keeping
/// its rows; opening it again changes nothing.
#[tokio::test]
async fn an_older_database_gains_the_lease_columns() {
    use sqlx::Row;
    for b in backends() {
        sqlx::any::install_default_drivers();
        let url = if b.database.is_empty() {
            format!(
                "sqlite://{}?mode=rwc",
                b.data_dir.path().join("esft.db").display()
            )
        } else {
            b.database.clone()
        };
        let old = sqlx::AnyPool::connect(&url).await.unwrap();
        sqlx::query(
            "CREATE TABLE jobs (id TEXT PRIMARY KEY, owner TEXT, model TEXT NOT NULL, \
             status TEXT NOT NULL, created_at BIGINT NOT NULL, started_at BIGINT, \
             finished_at BIGINT, estimated_finish BIGINT, training_file TEXT NOT NULL, \
             validation_file TEXT, suffix TEXT, seed BIGINT NOT NULL, metadata TEXT, \
             spec TEXT NOT NULL, adapter TEXT NOT NULL, fine_tuned_model TEXT, \
             trained_tokens BIGINT, error TEXT, esft TEXT)",
        )
        .execute(&old)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO jobs (id, model, status, created_at, training_file, seed, spec, \
             adapter) VALUES ('ftjob-old', 'm', 'running', 1, 'file-x', 1, $1, 'a')",
        )
        .bind(serde_json::to_string(&spec()).unwrap())
        .execute(&old)
        .await
        .unwrap();
        old.close().await;
        for _ in 0..2 {
            let files = b.files(1 << 20).await;
            let row = sqlx::query("SELECT worker, lease_expires_at FROM jobs WHERE id = $1")
                .bind("ftjob-old")
                .fetch_one(&files.pool())
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", b.name));
            assert_eq!(row.get::<Option<String>, _>("worker"), None);
            assert_eq!(row.get::<Option<i64>, _>("lease_expires_at"), None);
            files.pool().close().await;
        }
        // Its running job, held by nobody, goes back to the queue.
        let files = b.files(1 << 20).await;
        let jobs = JobStore::new(files.pool(), 0);
        assert_eq!(jobs.requeue_expired().await.unwrap(), vec!["ftjob-old"]);
    }
}

/// Quotas hold across processes: each store below has a pool of its own, as another
/// process would, and they add files and create jobs for one owner at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quotas_hold_when_processes_race_and_reservations_count() {
    for b in backends() {
        let limit = 10 * LINE.len() as u64;
        let stores = [
            Arc::new(b.files(limit).await),
            Arc::new(b.files(limit).await),
        ];
        let tasks: Vec<_> = (0..24)
            .map(|i| {
                let s = stores[i % 2].clone();
                tokio::spawn(async move { add(&s, Some("acme")).await })
            })
            .collect();
        let mut kept = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => kept += 1,
                Err(FilesError::Quota { .. }) => {}
                Err(e) => panic!("{}: {e}", b.name),
            }
        }
        assert_eq!(kept, 10, "{}: files kept past the quota", b.name);
        assert_eq!(stores[0].used_bytes(Some("acme")).await.unwrap(), limit);
        // An upload in flight holds its bytes: only what is left can be added meanwhile,
        // and what it gives back is free again.
        let held = stores[0]
            .reserve(Some("globex"), 6 * LINE.len() as u64)
            .await
            .unwrap();
        assert_eq!(held.bytes(), 6 * LINE.len() as u64);
        // A second upload gets only what is left.
        let rest = stores[1]
            .reserve(Some("globex"), 5 * LINE.len() as u64)
            .await
            .unwrap();
        assert_eq!(rest.bytes(), 4 * LINE.len() as u64, "{}", b.name);
        drop(rest);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let mut globex = 0;
        for i in 0..6 {
            if add(&stores[i % 2], Some("globex")).await.is_ok() {
                globex += 1;
            }
        }
        assert_eq!(globex, 4, "{}", b.name);
        drop(held);
        let mut freed = false;
        for _ in 0..100 {
            if add(&stores[1], Some("globex")).await.is_ok() {
                freed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(
            freed,
            "{}: a dropped reservation was not given back",
            b.name
        );

        // Jobs: at most three active per owner, however many processes create them.
        let files = stores[0].clone();
        let file = add(&files, Some("globex")).await;
        let file = match file {
            Ok(f) => f.id,
            // globex is at its quota: its last file serves.
            Err(_) => files
                .list(Some("globex"), None, None, 1, Order::Desc)
                .await
                .unwrap()
                .files[0]
                .id
                .clone(),
        };
        let job_stores = [
            Arc::new(JobStore::new(stores[0].pool(), 3)),
            Arc::new(JobStore::new(stores[1].pool(), 3)),
        ];
        let tasks: Vec<_> = (0..12)
            .map(|i| {
                let jobs = job_stores[i % 2].clone();
                let file = file.clone();
                tokio::spawn(async move { jobs.create(new_job(Some("globex"), &file, None)).await })
            })
            .collect();
        let mut created = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => created += 1,
                Err(JobsError::Quota { .. }) => {}
                Err(e) => panic!("{}: {e}", b.name),
            }
        }
        assert_eq!(created, 3, "{}: jobs created past the quota", b.name);
    }
}

/// A listing filtered on metadata reads the rows in bounded pages and still pages right
/// across them.
#[tokio::test]
async fn listings_filtered_on_metadata_page_across_many_jobs() {
    for b in backends() {
        let files = b.files(1 << 20).await;
        let jobs = JobStore::new(files.pool(), 0);
        let file = add(&files, Some("acme")).await.unwrap();
        let mut red = Vec::new();
        for i in 0..300 {
            let mut job = new_job(Some("acme"), &file.id, None);
            let team = if i % 2 == 0 { "red" } else { "blue" };
            job.metadata = Some(json!({ "team": team }));
            let id = jobs.create(job).await.unwrap().id;
            if team == "red" {
                red.push(id);
            }
        }
        let filter = [("team".to_string(), "red".to_string())];
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = jobs
                .list(Some("acme"), after.as_deref(), 40, &filter)
                .await
                .unwrap();
            assert!(page
                .items
                .iter()
                .all(|j| j.metadata == Some(json!({"team": "red"}))));
            seen.extend(page.items.iter().map(|j| j.id.clone()));
            after = seen.last().cloned();
            if !page.has_more {
                break;
            }
        }
        let mut want = red.clone();
        want.sort();
        let mut got = seen.clone();
        got.sort();
        assert_eq!(got, want, "{}", b.name);
        assert_eq!(seen.len(), 150, "{}: no job twice", b.name);
    }
}

#[tokio::test]
async fn every_step_is_kept_compactly_and_ended_jobs_go_after_their_retention() {
    use esft::jobs::queue::{job_of_result_file, result_file_id, StepMetrics};
    for b in backends() {
        let files = b.files(1 << 20).await;
        let jobs = Arc::new(JobStore::new(files.pool(), 0));
        let id = queued(&files, &jobs, Some("acme")).await;
        let row = |step: i64, loss: f64| StepMetrics {
            step,
            created_at: 1_700_000_000 + step,
            train_loss: loss,
            valid_loss: None,
            learning_rate: 1e-4,
            tokens_per_s: 512.0,
            trained_tokens: 100 * step,
        };
        // Only the holder of a running job records steps.
        assert!(!jobs
            .record_step(&id, &lease().worker, &row(1, 3.0))
            .await
            .unwrap());
        assert_eq!(jobs.claim_next(&lease()).await.unwrap().unwrap().id, id);
        assert!(!jobs.record_step(&id, "other", &row(1, 3.0)).await.unwrap());
        for step in 1..=300 {
            let loss = 3.0 - step as f64 / 100.0;
            assert!(jobs
                .record_step(&id, &lease().worker, &row(step, loss))
                .await
                .unwrap());
        }
        // A step trained again after a resume replaces its row; a validation loss lands
        // on its step.
        assert!(jobs
            .record_step(&id, &lease().worker, &row(7, 9.5))
            .await
            .unwrap());
        assert!(jobs
            .record_valid_loss(&id, &lease().worker, 10, 2.25)
            .await
            .unwrap());
        assert!(!jobs.record_valid_loss(&id, "other", 20, 1.0).await.unwrap());
        let first = jobs.steps(&id, 0, 10).await.unwrap();
        assert_eq!(
            first.iter().map(|s| s.step).collect::<Vec<_>>(),
            (1..=10).collect::<Vec<_>>(),
            "{}",
            b.name
        );
        assert_eq!(first[6].train_loss, 9.5);
        assert_eq!(first[9].valid_loss, Some(2.25));
        assert_eq!(first[8].valid_loss, None);
        assert_eq!(first[9].trained_tokens, 1000);
        let rest = jobs.steps(&id, 10, 1000).await.unwrap();
        assert_eq!(rest.len(), 290);
        assert_eq!(rest.last().unwrap().step, 300);
        // The job's result file names it.
        assert_eq!(job_of_result_file(&result_file_id(&id)), Some(id.clone()));
        assert_eq!(job_of_result_file("file-abc"), None);

        // Retention: an ended job older than the cutoff goes with all its rows; an active
        // one, and one ended after the cutoff, stay.
        let active = queued(&files, &jobs, Some("acme")).await;
        let recent = queued(&files, &jobs, Some("acme")).await;
        assert!(jobs.cancel(None, &recent).await.unwrap().unwrap().1);
        assert!(jobs
            .fail_held(&id, &lease().worker, &JobError::new("x", "y"))
            .await
            .unwrap());
        sqlx::query("UPDATE jobs SET finished_at = 1000 WHERE id = $1")
            .bind(&id)
            .execute(&files.pool())
            .await
            .unwrap();
        assert_eq!(
            jobs.remove_ended_before(5000).await.unwrap(),
            1,
            "{}",
            b.name
        );
        assert!(jobs.get(None, &id).await.unwrap().is_none());
        assert!(jobs.steps(&id, 0, 10).await.unwrap().is_empty());
        for table in ["job_events", "job_checkpoints", "job_metrics"] {
            let n: i64 = sqlx::query(&format!(
                "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM {table} WHERE job_id = $1"
            ))
            .bind(&id)
            .fetch_one(&files.pool())
            .await
            .unwrap()
            .try_get("n")
            .unwrap();
            assert_eq!(n, 0, "{}: {table}", b.name);
        }
        for kept in [&active, &recent] {
            assert!(jobs.get(None, kept).await.unwrap().is_some());
            assert!(!jobs.events(kept, None, 10).await.unwrap().items.is_empty());
        }
        assert_eq!(jobs.remove_ended_before(5000).await.unwrap(), 0);
    }
}

#[tokio::test]
async fn a_tenants_own_quotas_replace_the_defaults() {
    for b in backends() {
        let size = LINE.len() as u64;
        let owners = |acme: u64| {
            [("acme".to_string(), acme)]
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>()
        };
        // Files: two files' worth by default, one for acme.
        let files = b.files(2 * size).await.with_owner_quotas(owners(size));
        let acme = add(&files, Some("acme")).await.unwrap();
        assert!(matches!(
            add(&files, Some("acme")).await,
            Err(FilesError::Quota { limit, .. }) if limit == size
        ));
        add(&files, Some("globex")).await.unwrap();
        add(&files, Some("globex")).await.unwrap();
        assert!(matches!(
            add(&files, Some("globex")).await,
            Err(FilesError::Quota { limit, .. }) if limit == 2 * size
        ));
        // Jobs: one active by default, three for acme.
        let jobs = JobStore::new(files.pool(), 1).with_owner_quotas(owners(3));
        for _ in 0..3 {
            jobs.create(new_job(Some("acme"), &acme.id, None))
                .await
                .unwrap();
        }
        assert!(matches!(
            jobs.create(new_job(Some("acme"), &acme.id, None)).await,
            Err(JobsError::Quota {
                active: 3,
                limit: 3
            })
        ));
        let theirs = add(&files, None).await.unwrap();
        jobs.create(new_job(None, &theirs.id, None)).await.unwrap();
        assert!(matches!(
            jobs.create(new_job(None, &theirs.id, None)).await,
            Err(JobsError::Quota { limit: 1, .. })
        ));
    }
}
