//! Job-claim latency: the time from a job row becoming claimable (the commit of its move to
//! `queued`) to a waiting worker in another process claiming it, on SQLite (the data
//! directory's file) and on a throwaway PostgreSQL (`tests/common/postgres.rs`; skipped
//! where none can be had). The worker side has a pool of its own, as another process
//! would, and waits as the runner's dispatch loop does: put back expired leases, claim,
//! sleep `poll_seconds` or until woken: on PostgreSQL the runner is woken by `NOTIFY` when
//! any process queues a job (`JobStore::watch_queue`), measured last; SQLite has no such
//! signal between processes.
//!
//! Printed per backend: the round trip of `SELECT 1` (the reference), one claim of a queued
//! job (the claim's own cost: the least latency any waiting scheme could have), and the
//! latency of a waiting worker at each poll interval, median and 90th percentile.
//!
//! Knobs: `ESFT_CLAIM_ROUNDS` (30 jobs per poll interval), `ESFT_CLAIM_QUERIES` (300
//! reference queries and claims), `ESFT_CLAIM_POLLS_MS` (`50,200,1000`).

#[path = "../tests/common/postgres.rs"]
mod postgres;

use esft::jobs::files::{FileStore, PURPOSE_FINE_TUNE};
use esft::jobs::queue::{new_job_id, EsftChoices, JobSpec, JobStore, Lease, NewJob, ScoreFunction};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn spec() -> JobSpec {
    JobSpec {
        n_epochs: 1,
        batch_size: None,
        learning_rate_multiplier: 1.0,
        esft: EsftChoices {
            score_function: ScoreFunction::Token,
            top_p: 0.2,
            train_shared_experts: false,
            train_non_expert_modules: false,
            steps: Some(1),
            learning_rate: 1e-5,
            scoring_tokens: 100,
            seq_len: None,
        },
    }
}

fn new_job(file: &str) -> NewJob {
    let id = new_job_id();
    NewJob {
        owner: None,
        model: "bench".into(),
        training_file: file.into(),
        validation_file: None,
        suffix: None,
        seed: 1,
        metadata: None,
        spec: spec(),
        adapter: format!("{id}-adapter"),
        id,
    }
}

/// Median and 90th percentile of `v`, in milliseconds.
fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] * 1e3;
    (at(0.5), at(0.9))
}

async fn bench(name: &str, database: &str, rounds: usize, queries: usize, polls: &[u64]) {
    let dir = tempfile::tempdir().unwrap();
    let files = FileStore::open(dir.path(), database, 1 << 30)
        .await
        .unwrap();
    let jobs = JobStore::new(files.pool(), 0);
    let mut staged = files.staging().await.unwrap();
    let line = b"{\"prompt\": \"a\", \"completion\": \"b\"}\n";
    staged.write_all(line).unwrap();
    let file = files
        .add(
            staged,
            line.len() as u64,
            None,
            "t.jsonl",
            PURPOSE_FINE_TUNE,
            None,
        )
        .await
        .unwrap();
    // The worker's own pool, as another process would have.
    let worker_pool = FileStore::open(dir.path(), database, 1 << 30)
        .await
        .unwrap()
        .pool();
    let worker = Arc::new(JobStore::new(worker_pool.clone(), 0));
    let lease = Lease {
        worker: "bench/1/worker".into(),
        duration: Duration::from_secs(3600),
    };

    let mut trivial = Vec::new();
    for _ in 0..queries {
        let t = Instant::now();
        sqlx::query("SELECT 1").execute(&worker_pool).await.unwrap();
        trivial.push(t.elapsed().as_secs_f64());
    }
    let mut claims = Vec::new();
    for _ in 0..queries {
        let job = jobs.create(new_job(&file.id)).await.unwrap();
        assert!(jobs.queue_validated(&job.id).await.unwrap());
        let t = Instant::now();
        let got = worker.claim_next(&lease).await.unwrap().unwrap();
        claims.push(t.elapsed().as_secs_f64());
        assert_eq!(got.id, job.id);
    }
    let (t50, t90) = stats(trivial);
    let (c50, c90) = stats(claims);
    println!("{name}: SELECT 1 round trip        median {t50:8.3} ms  p90 {t90:8.3} ms");
    println!("{name}: one claim (job queued)     median {c50:8.3} ms  p90 {c90:8.3} ms");

    // Polling alone at each interval, then (PostgreSQL) woken by LISTEN/NOTIFY as the
    // runner is, with the longest interval as the fallback.
    let runs: Vec<(u64, bool)> = polls
        .iter()
        .map(|&p| (p, false))
        .chain(polls.iter().max().map(|&p| (p, true)))
        .collect();
    for (poll_ms, notify) in runs {
        let poll = Duration::from_millis(poll_ms);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let wake = Arc::new(tokio::sync::Notify::new());
        let listening = notify && {
            let wake = wake.clone();
            worker.watch_queue(move || wake.notify_one())
        };
        if notify && !listening {
            continue;
        }
        let waiter = {
            let (worker, lease, stop) = (worker.clone(), lease.clone(), stop.clone());
            let wake = wake.clone();
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    worker.requeue_expired().await.unwrap();
                    while let Some(job) = worker.claim_next(&lease).await.unwrap() {
                        let _ = tx.send((job.id, Instant::now()));
                    }
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = tokio::time::sleep(poll) => {}
                    }
                }
            })
        };
        // The listener's connection is up before the first job.
        tokio::time::sleep(Duration::from_millis(if listening { 300 } else { 0 })).await;
        let mut latencies = Vec::new();
        for i in 0..rounds {
            let job = jobs.create(new_job(&file.id)).await.unwrap();
            // Jobs arrive at no particular point of the worker's poll.
            let offset = poll.mul_f64((i as f64 * 0.618_034) % 1.0);
            tokio::time::sleep(offset).await;
            assert!(jobs.queue_validated(&job.id).await.unwrap());
            let queued = Instant::now();
            let (id, claimed) = rx.recv().await.unwrap();
            assert_eq!(id, job.id);
            latencies.push(claimed.saturating_duration_since(queued).as_secs_f64());
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        waiter.await.unwrap();
        let (l50, l90) = stats(latencies);
        let how = if notify {
            format!("LISTEN/NOTIFY + poll {poll_ms} ms")
        } else {
            format!("poll {poll_ms:>5} ms")
        };
        println!(
            "{name}: waiting worker, {how}  median {l50:8.3} ms  p90 {l90:8.3} ms  ({rounds} jobs)"
        );
    }
}

fn main() {
    let rounds = env_usize("ESFT_CLAIM_ROUNDS", 30);
    let queries = env_usize("ESFT_CLAIM_QUERIES", 300);
    let polls: Vec<u64> = std::env::var("ESFT_CLAIM_POLLS_MS")
        .unwrap_or_else(|_| "50,200,1000".into())
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for db in postgres::databases() {
        rt.block_on(bench(db.name, &db.url, rounds, queries, &polls));
    }
}
