//! Training workers on several processes sharing one PostgreSQL database and one S3 store
//! (moto on loopback), with real `esft-serve` and `esft-train` binaries on the `lite`
//! fixture:
//!
//! - a replica with no local workers (`max_concurrent_jobs = 0`) accepts a tenant's file
//!   and job;
//!   a worker (`esft-serve worker`) trains it, checkpointing to the store; the worker is
//!   killed with SIGKILL after its first recorded checkpoint, and a second worker, once the
//!   lease expired, resumes from that checkpoint (not from scratch) and the job succeeds
//!   exactly once, with every earlier event kept and no adapter left by the first worker;
//!   the adapter, published to the registry in the store, is served by the replica and by
//!   one started afterwards, greedy-equal to the adapter applied locally, and to no other
//!   tenant on either; deleted through one replica, it is served by neither;
//! - PostgreSQL restarted mid-job: the worker reconnects and the job succeeds once;
//! - a worker stopped with SIGTERM gives its job back to the queue at once (its lease far
//!   from expiring), and another resumes it from its checkpoint.
//!
//! Both skip where PostgreSQL's server or moto is missing (and fail where
//! `ESFT_E2E_REQUIRED=1`).
// Both the PostgreSQL and the S3 helper include `common/tools.rs` as a module of their own.
#![allow(clippy::duplicate_mod)]

#[path = "common/http.rs"]
mod http;
#[path = "common/postgres.rs"]
mod postgres;
#[path = "common/s3.rs"]
mod s3;

use esft::server::auth::hash_key;
use http::{request, upload_for_fine_tuning, Server};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_esft-serve");
/// Training steps of the test job, a state saved every `SAVE_EVERY`.
const STEPS: u64 = 14;
const SAVE_EVERY: u64 = 2;
/// The lease of the test workers.
const LEASE_SECONDS: f64 = 2.0;
const ADMIN: &str = "workers-admin-key";
const ACME: &str = "workers-acme-key";
const GLOBEX: &str = "workers-globex-key";

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lite")
}

/// `n` chat examples the lite tokenizer reads.
fn examples(n: usize) -> String {
    let words = ["apple", "river", "stone", "cloud", "tiger", "lemon"];
    (0..n)
        .map(|i| {
            let w = words[i % words.len()];
            json!({"messages": [
                {"role": "user", "content": format!("Item {i}: name the {w}.")},
                {"role": "assistant", "content": format!("It is the {w}.")},
            ]})
            .to_string()
                + "\n"
        })
        .collect()
}

/// The shared services, and a directory for each process's own files.
struct Cluster {
    pg: postgres::Postgres,
    database: String,
    s3: s3::S3Server,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Option<Self> {
        let pg = postgres::Postgres::start()?;
        let s3 = s3::S3Server::start()?;
        let database = pg.database();
        Some(Self {
            pg,
            database,
            s3,
            dir: tempfile::tempdir().unwrap(),
        })
    }

    /// A config file for the process `name` (its own data and adapters directories), the
    /// database and the store shared; `max_concurrent_jobs` 0 for a replica that runs none.
    fn config(&self, name: &str, max_concurrent_jobs: usize) -> PathBuf {
        self.config_with_lease(name, max_concurrent_jobs, LEASE_SECONDS)
    }

    /// [`Self::config`] with a lease of `lease_seconds`.
    fn config_with_lease(
        &self,
        name: &str,
        max_concurrent_jobs: usize,
        lease_seconds: f64,
    ) -> PathBuf {
        let own = self.dir.path().join(name);
        std::fs::create_dir_all(&own).unwrap();
        let options: Vec<String> = self
            .s3
            .options()
            .into_iter()
            .map(|(k, v)| format!("{k} = {v:?}"))
            .collect();
        let path = own.join("config.toml");
        std::fs::write(
            &path,
            format!(
                r#"
model = {model:?}
adapters = {adapters:?}
[fine_tuning]
data_dir = {data:?}
database = {database:?}
max_concurrent_jobs = {max_concurrent_jobs}
save_every_steps = {SAVE_EVERY}
lease_seconds = {lease_seconds}
poll_seconds = 0.2
training_threads = 1
[auth]
admin_key_sha256 = ["{admin}"]
[[auth.tenants]]
name = "acme"
key_sha256 = ["{acme}"]
[[auth.tenants]]
name = "globex"
key_sha256 = ["{globex}"]
[store]
url = {url:?}
options = {{ {options} }}
retry_timeout_seconds = 2.0
"#,
                model = fixture().to_str().unwrap(),
                adapters = own.join("adapters").to_str().unwrap(),
                data = own.join("data").to_str().unwrap(),
                database = self.database,
                url = self.s3.url("esft"),
                options = options.join(", "),
                admin = hash_key(ADMIN),
                acme = hash_key(ACME),
                globex = hash_key(GLOBEX),
            ),
        )
        .unwrap();
        path
    }

    fn store(&self) -> esft::store::Store {
        esft::store::Store::open_with(
            &self.s3.url("esft"),
            &esft::store::Timeouts::default(),
            &self.s3.options(),
        )
        .unwrap()
    }
}

/// An `esft-serve worker` process, its stderr kept.
struct Worker {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Worker {
    /// A worker as if on the machine `host` (its worker ids name it; a worker knows the
    /// processes of its own host only).
    fn start(config: &Path, host: &str) -> Self {
        let mut child = Command::new(BIN)
            .arg("worker")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .env("HOSTNAME", host)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting esft-serve worker");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = l.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Self { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A request as the tenant `acme`, whose files and jobs these are.
fn call(s: &Server, method: &str, path: &str, body: Option<&Value>) -> Option<(u16, Value)> {
    call_as(ACME, s, method, path, body)
}

fn call_as(
    key: &str,
    s: &Server,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Option<(u16, Value)> {
    let bytes = body.map(|b| b.to_string().into_bytes());
    let auth = format!("Bearer {key}");
    let r = request(
        s.addr,
        method,
        path,
        &[
            ("content-type", "application/json"),
            ("authorization", &auth),
        ],
        bytes.as_deref(),
    )
    .ok()?;
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    Some((r.status, v))
}

/// The job's record, retried while the replica cannot answer (its database restarting).
fn job(s: &Server, id: &str) -> Value {
    let t = Instant::now();
    loop {
        if let Some((200, v)) = call(s, "GET", &format!("/v1/fine_tuning/jobs/{id}"), None) {
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the job cannot be read"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The job's events, oldest first: (id, message, data).
/// The job's events as the admin reads them (workers named by host and process), oldest
/// first.
fn events(s: &Server, id: &str) -> Vec<(String, String, Value)> {
    events_as(ADMIN, s, id)
}

/// The job's events as the bearer of `key` reads them, oldest first.
fn events_as(key: &str, s: &Server, id: &str) -> Vec<(String, String, Value)> {
    let t = Instant::now();
    loop {
        let path = format!("/v1/fine_tuning/jobs/{id}/events?limit=10000");
        if let Some((200, v)) = call_as(key, s, "GET", &path, None) {
            return v["data"]
                .as_array()
                .unwrap()
                .iter()
                .rev()
                .map(|e| {
                    (
                        e["id"].as_str().unwrap().to_string(),
                        e["message"].as_str().unwrap().to_string(),
                        e["data"].clone(),
                    )
                })
                .collect();
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no events");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn checkpoint_steps(s: &Server, id: &str) -> Vec<i64> {
    let path = format!("/v1/fine_tuning/jobs/{id}/checkpoints?limit=100");
    match call(s, "GET", &path, None) {
        Some((200, v)) => v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["step_number"].as_i64().unwrap())
            .collect(),
        _ => Vec::new(),
    }
}

/// Waits for the job's first recorded checkpoint; its step.
fn first_checkpoint(s: &Server, id: &str, log: &dyn Fn() -> String) -> i64 {
    let t = Instant::now();
    loop {
        if let Some(step) = checkpoint_steps(s, id).into_iter().max() {
            return step;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no checkpoint was recorded\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Uploads the training file through the replica and creates the job; its id and the file's.
fn submit(replica: &Server, steps: u64) -> (String, String) {
    let up =
        upload_for_fine_tuning(replica.addr, ACME, "t.jsonl", examples(40).as_bytes()).unwrap();
    assert_eq!(up.status, 200, "{}", up.text());
    let file = up.json()["id"].as_str().unwrap().to_string();
    let (status, v) = call(
        replica,
        "POST",
        "/v1/fine_tuning/jobs",
        Some(&json!({
            "model": "lite",
            "training_file": file,
            "suffix": "w",
            "seed": 3,
            "method": {
                "type": "supervised",
                "supervised": {"hyperparameters": {"batch_size": 2}},
                "esft": {"steps": steps, "scoring_tokens": 400, "seq_len": 64, "top_p": 0.5},
            },
        })),
    )
    .unwrap();
    assert_eq!(status, 200, "{v}");
    (v["id"].as_str().unwrap().to_string(), file)
}

/// Waits for the job to end; its record.
fn finished(s: &Server, id: &str, limit: Duration, logs: &dyn Fn() -> String) -> Value {
    let t = Instant::now();
    loop {
        let v = job(s, id);
        if ["succeeded", "failed", "cancelled"].contains(&v["status"].as_str().unwrap()) {
            return v;
        }
        assert!(t.elapsed() < limit, "{v}\n{}", logs());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The adapters (whole or not) in an adapters directory, by entry name (leftover staging
/// and hidden directories included).
fn adapter_entries(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut walk = vec![dir.to_path_buf()];
    while let Some(d) = walk.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('@') {
                walk.push(e.path());
            } else {
                out.push(name);
            }
        }
    }
    out
}

const PROMPT: &str = "The experts of a mixture";
const NEW_TOKENS: usize = 8;

/// Greedy text of `model` for [`PROMPT`] from a replica, and its tokens' log-probabilities.
fn complete(s: &Server, model: &str) -> (String, Vec<f64>) {
    complete_as(ACME, s, model)
}

fn complete_as(key: &str, s: &Server, model: &str) -> (String, Vec<f64>) {
    let body = json!({
        "model": model, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0,
        "logprobs": 0,
    });
    let (status, v) = call_as(key, s, "POST", "/v1/completions", Some(&body)).unwrap();
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    let logprobs = choice["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    (choice["text"].as_str().unwrap().to_string(), logprobs)
}

/// Greedy text for [`PROMPT`] with the adapter in `dir` applied by `esft-serve generate`.
fn generate_locally(dir: &Path) -> String {
    let out = Command::new(BIN)
        .arg("generate")
        .arg("--model")
        .arg(fixture())
        .arg("--adapter")
        .arg(dir)
        .args([
            "--prompt",
            PROMPT,
            "--max-tokens",
            &NEW_TOKENS.to_string(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();
    line["text"].as_str().unwrap().to_string()
}

fn count(events: &[(String, String, Value)], needle: &str) -> usize {
    events.iter().filter(|(_, m, _)| m.contains(needle)).count()
}

#[test]
fn a_worker_killed_mid_job_is_replaced_by_another_that_resumes_from_its_checkpoint() {
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let replica = Server::start(Path::new(BIN), &cluster.config("replica", 0), &[]);
    let (id, file) = submit(&replica, STEPS);
    // The replica accepts the job and runs none: it stays queued.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(job(&replica, &id)["status"], "queued");
    // The file's bytes are in the store.
    let store = cluster.store();
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert!(rt
        .block_on(store.size(&format!("files/{file}")))
        .unwrap()
        .is_some());

    let first_config = cluster.config("worker-1", 1);
    let mut first = Worker::start(&first_config, "machine-1");
    let step = first_checkpoint(&replica, &id, &|| first.log());
    assert!(step > 0);
    // A recorded checkpoint (this one, or a newer one) is in the store, and only the
    // newest few are kept there (two, and one on its way up).
    let stored: Vec<i64> = rt
        .block_on(store.list(&format!("jobs/{id}/checkpoints")))
        .unwrap()
        .iter()
        .filter(|e| e.key.ends_with("/state.json"))
        .filter_map(|e| e.key.rsplit('/').nth(1)?.parse().ok())
        .collect();
    assert!(stored.iter().any(|&s| s >= step), "{stored:?}");
    assert!(stored.len() <= 3, "{stored:?}");
    first.kill9();
    let before = events(&replica, &id);
    assert_eq!(job(&replica, &id)["status"], "running");
    let worker_one = before
        .iter()
        .find_map(|(_, m, d)| {
            m.starts_with("Fine-tuning job started by worker")
                .then(|| d["worker"].as_str().unwrap().to_string())
        })
        .unwrap_or_else(|| panic!("{before:#?}"));
    assert!(worker_one.starts_with(&format!("machine-1/{}/", first.child.id())));
    // The tenant sees the worker by an alias: no host name, no process id.
    let pid = format!("/{}/", first.child.id());
    for (_, message, data) in events_as(ACME, &replica, &id) {
        let text = format!("{message} {data}");
        assert!(
            !text.contains("machine-1") && !text.contains(&pid),
            "{text}"
        );
        if message.starts_with("Fine-tuning job started by worker") {
            assert!(
                data["worker"].as_str().unwrap().starts_with("worker-"),
                "{data}"
            );
        }
    }
    assert!(adapter_entries(&cluster.dir.path().join("worker-1/adapters")).is_empty());
    // No adapter of the job is visible anywhere before it succeeds.
    let (status, models) = call(&replica, "GET", "/v1/models", None).unwrap();
    assert_eq!(status, 200, "{models}");
    assert!(!models.to_string().contains("ft:"), "{models}");

    let second = Worker::start(&cluster.config("worker-2", 1), "machine-2");
    let logs = || format!("worker 2:\n{}\nreplica:\n{}", second.log(), replica.log());
    let done = finished(&replica, &id, Duration::from_secs(180), &logs);
    assert_eq!(done["status"], "succeeded", "{done}\n{}", logs());
    let adapter = done["fine_tuned_model"].as_str().unwrap().to_string();
    let after = events(&replica, &id);
    // Nothing recorded before the kill is lost.
    for (event, message, _) in &before {
        assert!(after.iter().any(|(e, _, _)| e == event), "lost {message:?}");
    }
    // The lease expired, and the second worker resumed from the checkpoint.
    let lost = after
        .iter()
        .find(|(_, m, _)| m.contains("stopped renewing its lease"))
        .unwrap_or_else(|| panic!("{after:#?}"));
    assert_eq!(lost.2["worker"], worker_one.as_str());
    let resumed = after
        .iter()
        .find_map(|(_, m, d)| {
            m.contains("resumed by worker")
                .then(|| (d["worker"].clone(), d["checkpoint_step"].as_i64()))
        })
        .unwrap_or_else(|| panic!("no resume: {after:#?}"));
    assert_ne!(resumed.0, worker_one.as_str());
    let from = resumed
        .1
        .unwrap_or_else(|| panic!("resumed from scratch: {after:#?}"));
    assert!(from >= step, "resumed at {from}, checkpoint {step}");
    let trained_from = after
        .iter()
        .find_map(|(_, m, _)| m.strip_prefix("Training resumed at step "))
        .unwrap_or_else(|| panic!("{after:#?}"));
    assert!(
        trained_from.starts_with(&format!("{from} ")),
        "{trained_from}"
    );
    // Scoring and selection ran once: the second worker took them from the store.
    assert_eq!(count(&after, "Scored the experts"), 1, "{after:#?}");
    assert_eq!(count(&after, "successfully completed"), 1, "{after:#?}");
    assert_eq!(count(&after, "Training done"), 1, "{after:#?}");
    // The adapter is the second worker's, whole; the first left none.
    assert!(adapter_entries(&cluster.dir.path().join("worker-1/adapters")).is_empty());
    let installed = adapter_entries(&cluster.dir.path().join("worker-2/adapters"));
    assert_eq!(installed, vec![adapter.clone()], "{installed:?}");
    let whole = cluster
        .dir
        .path()
        .join("worker-2/adapters/@acme")
        .join(&adapter)
        .join("adapter.json");
    assert!(whole.is_file(), "{}", whole.display());
    // Published to the registry in the store: served by the replica that accepted the job
    // and by a replica started only now, both greedy-equal to the adapter applied locally.
    let local = generate_locally(&whole.with_file_name(""));
    let later = Server::start(Path::new(BIN), &cluster.config("replica-2", 0), &[]);
    let served: Vec<_> = [&replica, &later]
        .into_iter()
        .map(|r| complete(r, &adapter))
        .collect();
    for (r, (text, _)) in [&replica, &later].into_iter().zip(&served) {
        assert_eq!(text, &local, "{}", r.log());
    }
    assert_eq!(served[0].1, served[1].1);
    // The trained experts change the model's probabilities (the greedy text of this tiny
    // model may stay the base's).
    assert_ne!(complete(&later, "lite").1, served[1].1);
    // The adapter is acme's: another tenant finds it on neither replica.
    for r in [&replica, &later] {
        let body = json!({"model": adapter, "prompt": PROMPT, "max_tokens": 1});
        let (status, v) = call_as(GLOBEX, r, "POST", "/v1/completions", Some(&body)).unwrap();
        assert_eq!(status, 404, "{v}");
        let (_, models) = call_as(GLOBEX, r, "GET", "/v1/models", None).unwrap();
        assert!(!models.to_string().contains(&adapter), "{models}");
    }
    // Deleted through the later replica (globex may not): served by neither any more.
    let path = format!("/v1/adapters/{adapter}");
    let (status, v) = call_as(GLOBEX, &later, "DELETE", &path, None).unwrap();
    assert_eq!(status, 404, "{v}");
    let (status, v) = call(&later, "DELETE", &path, None).unwrap();
    assert_eq!(status, 200, "{v}");
    // (Each replica looks a name up again once its last look-up is older than
    // `engine.adapter_lookup_ttl_seconds`, 1 s by default.)
    for r in [&replica, &later] {
        let body = json!({"model": adapter, "prompt": PROMPT, "max_tokens": 1});
        let t = Instant::now();
        loop {
            let (status, v) = call(r, "POST", "/v1/completions", Some(&body)).unwrap();
            if status == 404 {
                break;
            }
            assert_eq!(status, 200, "{v}");
            assert!(t.elapsed() < Duration::from_secs(5), "still served: {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // A replica without the file's local copy serves it from the store; deleting the file
    // removes it there.
    let local = cluster.dir.path().join("replica/data/files").join(&file);
    std::fs::remove_file(&local).unwrap();
    let auth = format!("Bearer {ACME}");
    let content = request(
        replica.addr,
        "GET",
        &format!("/v1/files/{file}/content"),
        &[("authorization", &auth)],
        None,
    )
    .unwrap();
    assert_eq!(content.status, 200);
    assert_eq!(content.body, examples(40).into_bytes());
    // The job's work goes from the store once it ended (just after its success is
    // recorded); the file stays until it is deleted.
    let t = Instant::now();
    loop {
        let left = rt.block_on(store.list(&format!("jobs/{id}"))).unwrap();
        if left.is_empty() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(rt
        .block_on(store.size(&format!("files/{file}")))
        .unwrap()
        .is_some());
    let (status, v) = call(&replica, "DELETE", &format!("/v1/files/{file}"), None).unwrap();
    assert_eq!((status, &v["deleted"]), (200, &json!(true)), "{v}");
    assert!(rt
        .block_on(store.size(&format!("files/{file}")))
        .unwrap()
        .is_none());
}

#[test]
fn a_worker_rides_out_a_database_restart_and_the_job_succeeds_once() {
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let replica = Server::start(Path::new(BIN), &cluster.config("replica", 0), &[]);
    // A lease longer than the restart: the worker keeps the job through it.
    let worker = Worker::start(&cluster.config_with_lease("worker", 1, 10.0), "machine-1");
    let (id, _) = submit(&replica, 4 * STEPS);
    first_checkpoint(&replica, &id, &|| worker.log());
    cluster.pg.restart(Duration::from_secs(3));
    let logs = || format!("worker:\n{}\nreplica:\n{}", worker.log(), replica.log());
    let done = finished(&replica, &id, Duration::from_secs(180), &logs);
    assert_eq!(done["status"], "succeeded", "{done}\n{}", logs());
    let after = events(&replica, &id);
    let once = |needle: &str| {
        assert_eq!(count(&after, needle), 1, "{needle}: {after:#?}\n{}", logs());
    };
    once("Fine-tuning job started by worker");
    once("Training done");
    once("successfully completed");
    assert_eq!(count(&after, "stopped renewing its lease"), 0, "{after:#?}");
    // The worker lost its connections and made new ones.
    assert!(
        worker.log().contains("trying again")
            || worker.log().contains("renewing the job's lease failed"),
        "{}",
        worker.log()
    );
    let steps = checkpoint_steps(&replica, &id);
    assert!(steps.contains(&(4 * STEPS as i64)), "{steps:?}");
}

#[test]
fn a_worker_stopped_with_sigterm_gives_its_job_back_at_once() {
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let replica = Server::start(Path::new(BIN), &cluster.config("replica", 0), &[]);
    // A lease far longer than the test: only the release can give the job back in time.
    let mut first = Worker::start(
        &cluster.config_with_lease("worker-1", 1, 600.0),
        "machine-1",
    );
    let (id, _) = submit(&replica, 4 * STEPS);
    first_checkpoint(&replica, &id, &|| first.log());
    let term = Command::new("kill")
        .args(["-TERM", &first.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let t = Instant::now();
    let exit = loop {
        if let Some(status) = first.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the worker did not stop\n{}",
            first.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}\n{}", first.log());
    let record = job(&replica, &id);
    assert_eq!(record["status"], "queued", "{record}\n{}", first.log());
    let released = events(&replica, &id);
    assert_eq!(count(&released, "stopped; the job is back in the queue"), 1);

    let second = Worker::start(
        &cluster.config_with_lease("worker-2", 1, 600.0),
        "machine-2",
    );
    let logs = || format!("worker 2:\n{}\nreplica:\n{}", second.log(), replica.log());
    let done = finished(&replica, &id, Duration::from_secs(180), &logs);
    assert_eq!(done["status"], "succeeded", "{done}\n{}", logs());
    let after = events(&replica, &id);
    let from = after
        .iter()
        .find_map(|(_, m, d)| {
            m.contains("resumed by worker machine-2")
                .then(|| d["checkpoint_step"].as_i64())
        })
        .flatten()
        .unwrap_or_else(|| panic!("no resume from a checkpoint: {after:#?}"));
    assert!(from > 0);
    assert_eq!(count(&after, "successfully completed"), 1, "{after:#?}");
}

#[test]
fn a_file_uploaded_through_one_replica_serves_jobs_and_previews_through_another() {
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let one = Server::start(Path::new(BIN), &cluster.config("replica-1", 0), &[]);
    let two = Server::start(Path::new(BIN), &cluster.config("replica-2", 1), &[]);
    let up = upload_for_fine_tuning(one.addr, ACME, "t.jsonl", examples(40).as_bytes()).unwrap();
    assert_eq!(up.status, 200, "{}", up.text());
    let file = up.json()["id"].as_str().unwrap().to_string();
    // Replica 2 never saw the bytes: it reads them from the store.
    let (status, preview) = call_as(
        ACME,
        &two,
        "POST",
        "/v1/fine_tuning/expert_selection",
        Some(&json!({"model": "lite", "training_file": file, "seed": 1,
                     "esft": {"scoring_tokens": 400, "top_p": 0.5}})),
    )
    .unwrap();
    assert_eq!(status, 200, "{preview}\n{}", two.log());
    assert!(
        preview["selected_experts"].as_u64().unwrap() > 0,
        "{preview}"
    );
    let (status, created) = call(
        &two,
        "POST",
        "/v1/fine_tuning/jobs",
        Some(&json!({
            "model": "lite",
            "training_file": file,
            "suffix": "x",
            "method": {"type": "supervised",
                       "esft": {"steps": 2, "scoring_tokens": 400, "seq_len": 64}},
        })),
    )
    .unwrap();
    assert_eq!(status, 200, "{created}\n{}", two.log());
    let id = created["id"].as_str().unwrap().to_string();
    let logs = || format!("replica 2:\n{}\nreplica 1:\n{}", two.log(), one.log());
    let done = finished(&one, &id, Duration::from_secs(180), &logs);
    assert_eq!(done["status"], "succeeded", "{done}\n{}", logs());
    let (status, _) = call_as(
        ACME,
        &two,
        "GET",
        &format!("/v1/files/{file}/content"),
        None,
    )
    .unwrap_or((0, Value::Null));
    assert_eq!(status, 200);
}
