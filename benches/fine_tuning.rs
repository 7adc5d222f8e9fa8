//! Fine-tuning jobs on the shipped demo model (`models/demo`), with the law task of
//! `esft-train synth --seed 1` (3,000 training examples):
//!
//! 1. A job with the default settings (only `seed` and `suffix` given), through the API of
//!    an in-process server (the router driven with `oneshot`, no sockets; its
//!    `fine_tuning.data_dir` a temporary directory): the time from `POST
//!    /v1/fine_tuning/jobs` to the job's end, split into phases by polling the job's
//!    events every ~50 ms and noting when each phase's message first appears. The adapter
//!    is then called once by name.
//! 2. The same work run directly: `esft-train score`, `select` and `train` with the
//!    arguments, compute threads and niceness the job's children had (read from `/proc`
//!    while the job ran, and checked against the runner's rules rebuilt here), each timed.
//!    The API's overhead is its total over the direct total, minus one: in wall time, and
//!    in CPU time (this process's and its children's, from `getrusage`), which the other
//!    work of a shared machine moves far less.
//! 3. Decode tokens/s of a steady load on the base model (clients each asking, one request
//!    after another, for 64 tokens with `ignore_eos`) while the server is idle, while a
//!    default job trains, and idle again (after that job is cancelled); the ratio is the
//!    rate while training over the mean of the idle ones.
//!
//! With more than one round, rounds of 1 and 2 alternate their order (API then direct,
//! then direct then API), so a drift of the machine's speed weighs on both.
//!
//! Needs `esft-train` (`cargo build --release -p esft-train`): beside this bench's target
//! directory, where the server looks for it, or at `ESFT_TRAIN_BIN`. Knobs:
//! `ESFT_FT_ROUNDS` (1), `ESFT_FT_LOAD_SECONDS` (20), `ESFT_FT_CLIENTS` (4),
//! `ESFT_FT_LOAD_TOKENS` (64), `ESFT_FT_EXAMPLES` (3000: the first this many training
//! examples; fewer make a quick run), `ESFT_FT_FEW_EVENTS` (0; 1: one more job per round,
//! its events polled with `limit=20`, which shows what polling every event costs).

mod common;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use common::env_usize;
use esft::jobs::queue::{EsftChoices, AUTO_BATCH_TOKENS};
use esft::server::config::{FineTuningConfig, ServerConfig};
use esft::server::{load, router, AppState};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::ServiceExt;

/// The jobs' seed (the direct runs use it too, through the jobs' arguments).
const SEED: i64 = 1234;
const POLL: Duration = Duration::from_millis(50);
const BOUNDARY: &str = "esft-bench-boundary-Qx7Rk2";
/// The events a poll asks for: every one (what the phases are read from), or the newest
/// few (enough to see each phase's message appear, at a constant cost).
const FULL_EVENTS: usize = 10_000;
const FEW_EVENTS: usize = 20;
/// A job that has not ended after this long has gone wrong.
const JOB_LIMIT: Duration = Duration::from_secs(3600);

/// The phases' first messages, in order (a prefix of the message).
const MARKS: [(&str, &str); 7] = [
    ("started", "Fine-tuning job started"),
    ("scoring", "Scoring the experts"),
    ("scored", "Scored the experts"),
    ("selected", "Selected"),
    ("training", "Training "),
    ("trained", "Training done"),
    ("completed", "The job has successfully completed"),
];

/// The phases of a job as the table shows them.
const LABELS: [(&str, &str); 8] = [
    ("validation", "validation (create request)"),
    ("queue", "queue wait"),
    ("scoring", "scoring"),
    ("selection", "selection"),
    ("training", "training"),
    ("training_start", "  start (to its first line)"),
    ("training_steps", "  steps (first line to done)"),
    ("install", "install"),
];

fn mark_of(message: &str) -> Option<usize> {
    MARKS.iter().position(|(name, prefix)| {
        message.starts_with(prefix)
            && !(*name == "training" && message.starts_with("Training done"))
    })
}

/// The in-process server.
#[derive(Clone)]
struct Server {
    app: Router,
}

impl Server {
    fn start(config: &ServerConfig) -> Self {
        config.validate().expect("a valid server configuration");
        let state = Arc::new(AppState::new(config.clone()).expect("the server's state"));
        state.set_served(Arc::new(load(config).expect("loading the demo model")));
        Self { app: router(state) }
    }

    async fn send(
        &self,
        method: Method,
        uri: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", content_type)
            .body(Body::from(body))
            .expect("a request");
        let response = self.app.clone().oneshot(request).await.expect("the router");
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("a body")
            .to_bytes();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, v)
    }

    async fn get(&self, uri: &str) -> Value {
        let (s, v) = self
            .send(Method::GET, uri, "application/json", Vec::new())
            .await;
        assert_eq!(s, StatusCode::OK, "GET {uri}: {v}");
        v
    }

    async fn post(&self, uri: &str, body: Value) -> Value {
        let (s, v) = self
            .send(
                Method::POST,
                uri,
                "application/json",
                body.to_string().into_bytes(),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "POST {uri}: {v}");
        v
    }

    /// `POST /v1/files` with `bytes` as a fine-tuning file.
    async fn upload(&self, bytes: &[u8]) -> Value {
        let mut b = Vec::new();
        b.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n\
                 fine-tune\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; \
                 filename=\"train.jsonl\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        b.extend_from_slice(bytes);
        b.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
        let ct = format!("multipart/form-data; boundary={BOUNDARY}");
        let (s, v) = self.send(Method::POST, "/v1/files", &ct, b).await;
        assert_eq!(s, StatusCode::OK, "upload: {v}");
        v
    }
}

/// The trainer: `ESFT_TRAIN_BIN`, else where the server looks for it. Stops the bench with
/// a message when it is not there.
fn trainer() -> PathBuf {
    let path = match std::env::var_os("ESFT_TRAIN_BIN") {
        Some(p) => PathBuf::from(p),
        None => FineTuningConfig::default().trainer_path(),
    };
    if !path.is_file() {
        eprintln!(
            "fine_tuning bench: the trainer `esft-train` is missing (looked for {}).\n\
             Build it first: `cargo build --release -p esft-train` (it is found beside this \
             bench's target directory), or set ESFT_TRAIN_BIN to its path.",
            path.display()
        );
        std::process::exit(2);
    }
    path
}

/// A trainer process of this process, as `/proc` shows it.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    argv: Vec<String>,
    threads: Option<String>,
    nice: i64,
}

/// CPU seconds (user and system) of this process and of its children that ended.
#[derive(Clone, Copy, Default)]
struct Cpu {
    own: f64,
    children: f64,
}

impl Cpu {
    fn now() -> Self {
        let of = |who| {
            // SAFETY: getrusage fills the struct it is given.
            let mut u: libc::rusage = unsafe { std::mem::zeroed() };
            unsafe { libc::getrusage(who, &mut u) };
            let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
            t(u.ru_utime) + t(u.ru_stime)
        };
        Self {
            own: of(libc::RUSAGE_SELF),
            children: of(libc::RUSAGE_CHILDREN),
        }
    }

    fn since(self, start: Cpu) -> Cpu {
        Cpu {
            own: self.own - start.own,
            children: self.children - start.children,
        }
    }

    fn total(self) -> f64 {
        self.own + self.children
    }
}

/// The processes this process started (each thread's `children` in `/proc`), else every
/// process (the parent is checked below).
fn child_pids() -> Vec<u32> {
    let numbers = |text: &str| -> Vec<u32> {
        text.split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    let mut pids = Vec::new();
    let mut listed = false;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                listed = true;
                pids.extend(numbers(&text));
            }
        }
    }
    if !listed {
        if let Ok(all) = std::fs::read_dir("/proc") {
            pids.extend(
                all.flatten()
                    .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())),
            );
        }
    }
    pids
}

/// The children of this process that run `trainer` now.
fn trainer_children(trainer: &Path) -> Vec<Seen> {
    let me = std::process::id();
    let want = trainer.display().to_string();
    let mut out = Vec::new();
    for pid in child_pids() {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The fields after the command name (which may hold spaces) start at the state
        // (field 3): the parent is field 4, the niceness field 19.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(1).and_then(|p| p.parse::<u32>().ok()) != Some(me) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = cmdline.strip_suffix(&[0]).unwrap_or(&cmdline);
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        // Between fork and exec the child still shows this program.
        if argv.first() != Some(&want) {
            continue;
        }
        let threads = std::fs::read(format!("/proc/{pid}/environ"))
            .ok()
            .and_then(|env| {
                env.split(|b| *b == 0).find_map(|kv| {
                    kv.strip_prefix(b"RAYON_NUM_THREADS=")
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                })
            });
        let nice = fields.get(16).and_then(|n| n.parse().ok()).unwrap_or(0);
        out.push(Seen {
            argv,
            threads,
            nice,
        });
    }
    out
}

/// What polling a job saw.
struct Watch {
    /// The `limit` of the events requests.
    limit: usize,
    /// Seconds from the create request to the first sight of each of [`MARKS`].
    marks: [Option<f64>; MARKS.len()],
    /// The trainer children seen, by command.
    children: BTreeMap<String, Seen>,
    polls: usize,
    /// Seconds spent in the event requests.
    poll_seconds: f64,
    /// The newest metrics event's `data`.
    metrics: Option<Value>,
}

impl Watch {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            marks: Default::default(),
            children: BTreeMap::new(),
            polls: 0,
            poll_seconds: 0.0,
            metrics: None,
        }
    }

    fn mark(&self, name: &str) -> Option<f64> {
        let i = MARKS.iter().position(|m| m.0 == name).expect("a mark");
        self.marks[i]
    }

    /// One look at the job's events (and, until training starts, at the trainer
    /// children).
    async fn poll(&mut self, srv: &Server, id: &str, t0: Instant, trainer: &Path) {
        if !self.children.contains_key("train") {
            for seen in trainer_children(trainer) {
                let Some(command) = seen.argv.get(1).cloned() else {
                    continue;
                };
                self.children.entry(command).or_insert(seen);
            }
        }
        let asked = Instant::now();
        let page = srv
            .get(&format!(
                "/v1/fine_tuning/jobs/{id}/events?limit={}",
                self.limit
            ))
            .await;
        let at = t0.elapsed().as_secs_f64();
        self.poll_seconds += asked.elapsed().as_secs_f64();
        self.polls += 1;
        let events = page["data"].as_array().expect("events");
        self.metrics = events
            .iter()
            .find(|e| e["type"] == "metrics")
            .map(|e| e["data"].clone());
        for e in events {
            let message = e["message"].as_str().unwrap_or_default();
            if message.starts_with("The job failed") || message == "Job cancelled" {
                panic!("job {id} ended early: {message}");
            }
            if let Some(i) = mark_of(message) {
                self.marks[i].get_or_insert(at);
            }
        }
    }

    /// Polls until the mark `name` is seen.
    async fn until(&mut self, name: &str, srv: &Server, id: &str, t0: Instant, trainer: &Path) {
        while self.mark(name).is_none() {
            assert!(t0.elapsed() < JOB_LIMIT, "job {id} took over {JOB_LIMIT:?}");
            tokio::time::sleep(POLL).await;
            self.poll(srv, id, t0, trainer).await;
        }
    }
}

/// One job through the API.
struct ApiRun {
    /// `(name, seconds)` of each phase (see [`LABELS`]).
    phases: Vec<(&'static str, f64)>,
    total: f64,
    job: Value,
    children: BTreeMap<String, Seen>,
    polls: usize,
    poll_seconds: f64,
    call_seconds: f64,
    reply: String,
    /// CPU from the create request to the job's end.
    cpu: Cpu,
}

fn create_body(file: &str, suffix: &str) -> Value {
    json!({"model": "demo", "training_file": file, "suffix": suffix, "seed": SEED})
}

/// A job with the default settings, its events polled every [`POLL`] with `limit`.
async fn api_job(srv: &Server, file: &str, trainer: &Path, prompt: &str, limit: usize) -> ApiRun {
    let cpu0 = Cpu::now();
    let t0 = Instant::now();
    let created = srv
        .post("/v1/fine_tuning/jobs", create_body(file, "law"))
        .await;
    let validated = t0.elapsed().as_secs_f64();
    let id = created["id"].as_str().expect("a job id").to_string();
    let mut w = Watch::new(limit);
    w.poll(srv, &id, t0, trainer).await;
    w.until("completed", srv, &id, t0, trainer).await;
    let cpu = Cpu::now().since(cpu0);
    let job = srv.get(&format!("/v1/fine_tuning/jobs/{id}")).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let m = |name: &str| w.mark(name).unwrap_or(f64::NAN);
    let total = m("completed");
    let phases = vec![
        ("validation", validated),
        ("queue", m("started") - validated),
        ("scoring", m("scored") - m("started")),
        ("selection", m("selected") - m("scored")),
        ("training", m("trained") - m("selected")),
        ("training_start", m("training") - m("selected")),
        ("training_steps", m("trained") - m("training")),
        ("install", m("completed") - m("trained")),
    ];
    let model = job["fine_tuned_model"]
        .as_str()
        .expect("a fine-tuned model");
    let asked = Instant::now();
    let answer = srv
        .post(
            "/v1/chat/completions",
            json!({"model": model, "temperature": 0, "max_tokens": 16,
                   "messages": [{"role": "user", "content": prompt}]}),
        )
        .await;
    let call_seconds = asked.elapsed().as_secs_f64();
    let reply = answer["choices"][0]["message"]["content"]
        .as_str()
        .expect("a reply")
        .to_string();
    ApiRun {
        cpu,
        phases,
        total,
        job,
        children: w.children,
        polls: w.polls,
        poll_seconds: w.poll_seconds,
        call_seconds,
        reply,
    }
}

/// The arguments the runner gives the trainer for `job`, by its rules, with the job's work
/// directory `dir` (score, select, train).
fn runner_commands(
    model: &Path,
    training: &Path,
    job: &Value,
    dir: &Path,
    save_every: u64,
) -> Vec<Vec<String>> {
    let esft: EsftChoices =
        serde_json::from_value(job["method"]["esft"].clone()).expect("the job's esft choices");
    assert!(job["validation_file"].is_null());
    let seed = job["seed"].as_i64().expect("a seed").to_string();
    let adapter = job["esft"]["adapter"].as_str().expect("an adapter name");
    let s = |p: &Path| p.display().to_string();
    let (scores, experts) = (s(&dir.join("scores.json")), s(&dir.join("experts.json")));
    let strings = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let score = strings(&[
        "score",
        "--model",
        &s(model),
        "--data",
        &s(training),
        "--tokens",
        &esft.scoring_tokens.to_string(),
        "--seed",
        &seed,
        "--out",
        &scores,
        "--json",
    ]);
    let mut select = strings(&[
        "select",
        "--scores",
        &scores,
        "--score-function",
        esft.score_function.as_str(),
        "--top-p",
        &esft.top_p.to_string(),
        "--out",
        &experts,
    ]);
    if esft.train_shared_experts {
        select.push("--train-shared-experts".into());
    }
    let save = save_every.max(1).to_string();
    let mut train = strings(&[
        "train",
        "--model",
        &s(model),
        "--data",
        &s(training),
        "--experts",
        &experts,
        "--out",
        &s(&dir.join(adapter)),
        "--lr",
        &esft.learning_rate.to_string(),
        "--seed",
        &seed,
        "--warmup",
        "10",
        "--schedule",
        "cosine",
        "--save-every",
        &save,
        "--eval-every",
        &save,
        "--resume",
        "--json",
        "--seq-len",
        &esft
            .seq_len
            .map_or_else(|| "auto".to_string(), |l| l.to_string()),
    ]);
    match job["hyperparameters"]["batch_size"].as_u64() {
        Some(b) => train.extend(strings(&["--batch", &b.to_string()])),
        None => train.extend(strings(&["--batch-tokens", &AUTO_BATCH_TOKENS.to_string()])),
    }
    match esft.steps {
        Some(n) => train.extend(strings(&["--steps", &n.to_string()])),
        None => {
            let epochs = job["hyperparameters"]["n_epochs"].as_u64().expect("epochs");
            train.extend(strings(&["--epochs", &epochs.to_string()]));
        }
    }
    train.extend(strings(&["--eval-split", "0.02"]));
    vec![score, select, train]
}

/// One trainer command run directly.
struct Step {
    command: String,
    seconds: f64,
    /// Its `done` line.
    done: Value,
}

/// Runs `args` as the runner runs a child: `threads` compute threads, niceness `nice`,
/// JSON lines read off its stdout, stderr kept.
fn run_direct(trainer: &Path, args: &[String], threads: usize, nice: i32) -> Step {
    let started = Instant::now();
    let mut cmd = Command::new(trainer);
    cmd.args(&args[1..])
        .env("RAYON_NUM_THREADS", threads.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls (prctl, setpriority) run between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if nice != 0 {
                libc::setpriority(libc::PRIO_PROCESS, 0, nice);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("starting the trainer");
    let stderr = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = e.read_to_string(&mut text);
            text
        })
    });
    let mut done = Value::Null;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["event"] == "done" {
                done = v;
            }
        }
    }
    let status = child.wait().expect("waiting for the trainer");
    let seconds = started.elapsed().as_secs_f64();
    let stderr = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    assert!(
        status.success(),
        "esft-train {} failed ({status}): {stderr}",
        args[1]
    );
    Step {
        command: args[1].clone(),
        seconds,
        done,
    }
}

/// The direct commands: the job's children as `/proc` showed them (its work directory
/// swapped for `dir`), else the runner's rules. Also whether both agree where a child was
/// seen, with the differences.
fn direct_commands(
    api: &ApiRun,
    rebuilt_job: &[Vec<String>],
    rebuilt: &[Vec<String>],
    job_dir: &Path,
    dir: &Path,
) -> (Vec<Vec<String>>, bool, Vec<String>) {
    let (from, to) = (job_dir.display().to_string(), dir.display().to_string());
    let mut agree = true;
    let mut notes = Vec::new();
    let commands = rebuilt_job
        .iter()
        .zip(rebuilt)
        .map(
            |(by_rule, direct_rule)| match api.children.get(&by_rule[0]) {
                Some(seen) => {
                    let actual = &seen.argv[1..];
                    if actual != by_rule.as_slice() {
                        agree = false;
                        notes.push(format!(
                            "{}: the job ran {:?}, the runner's rules say {:?}",
                            by_rule[0], actual, by_rule
                        ));
                    }
                    std::iter::once(seen.argv[0].clone())
                        .chain(actual.iter().map(|a| a.replace(&from, &to)))
                        .collect::<Vec<_>>()
                }
                None => {
                    notes.push(format!(
                        "{}: not seen running (too short); rebuilt",
                        by_rule[0]
                    ));
                    std::iter::once(String::new())
                        .chain(direct_rule.iter().cloned())
                        .collect()
                }
            },
        )
        .collect();
    (commands, agree, notes)
}

/// One round of jobs: through the API with its events polled in full (and, when asked,
/// polling the newest few), and run directly.
struct Round {
    full: ApiRun,
    few: Option<ApiRun>,
    direct: Vec<Step>,
    direct_cpu: Cpu,
}

impl Round {
    fn direct_total(&self) -> f64 {
        self.direct.iter().map(|s| s.seconds).sum()
    }
}

/// A steady decode load's outcome.
#[derive(Clone, Copy)]
struct Load {
    tokens: u64,
    requests: u64,
    seconds: f64,
}

impl Load {
    fn rate(&self) -> f64 {
        self.tokens as f64 / self.seconds
    }
}

/// `clients` clients each sending `/v1/completions` requests for `max_tokens` tokens
/// (`ignore_eos`, greedy) on the base model, one after another, for `seconds`.
async fn decode_load(
    srv: &Server,
    seconds: f64,
    clients: usize,
    max_tokens: usize,
    prompts: &[String],
) -> Load {
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let srv = srv.clone();
            let prompts = prompts.to_vec();
            tokio::spawn(async move {
                let (mut tokens, mut requests) = (0u64, 0u64);
                let mut i = c;
                while Instant::now() < end {
                    let v = srv
                        .post(
                            "/v1/completions",
                            json!({"model": "demo", "prompt": prompts[i % prompts.len()],
                                   "max_tokens": max_tokens, "ignore_eos": true,
                                   "temperature": 0}),
                        )
                        .await;
                    tokens += v["usage"]["completion_tokens"].as_u64().expect("usage");
                    requests += 1;
                    i += clients;
                }
                (tokens, requests)
            })
        })
        .collect();
    let mut load = Load {
        tokens: 0,
        requests: 0,
        seconds: 0.0,
    };
    for t in tasks {
        let (tokens, requests) = t.await.expect("a client");
        load.tokens += tokens;
        load.requests += requests;
    }
    load.seconds = t0.elapsed().as_secs_f64();
    load
}

/// The first `n` examples of a task's eval data (`{"prompt": "User: ...\n\nAssistant:",
/// "answers": [...]}`): the prompt as written, the user's message, the first answer.
fn examples(path: &Path, n: usize) -> Vec<(String, String, String)> {
    std::fs::read_to_string(path)
        .expect("the task's eval data")
        .lines()
        .take(n)
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("a JSON line");
            let prompt = v["prompt"].as_str().expect("a prompt").to_string();
            let user = prompt
                .strip_prefix("User: ")
                .and_then(|p| p.strip_suffix("\n\nAssistant:"))
                .unwrap_or(&prompt)
                .to_string();
            let answer = v["answers"][0].as_str().expect("an answer").to_string();
            (prompt, user, answer)
        })
        .collect()
}

fn main() {
    let rounds = env_usize("ESFT_FT_ROUNDS", 1).max(1);
    let examples_wanted = env_usize("ESFT_FT_EXAMPLES", 3000);
    let few_events = env_usize("ESFT_FT_FEW_EVENTS", 0) != 0;
    let load_seconds = env_usize("ESFT_FT_LOAD_SECONDS", 20) as f64;
    let clients = env_usize("ESFT_FT_CLIENTS", 4);
    let load_tokens = env_usize("ESFT_FT_LOAD_TOKENS", 64);
    let trainer = trainer();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/demo");

    let tmp = tempfile::tempdir().expect("a temporary directory");
    let synth = tmp.path().join("synth");
    let synthesized = Command::new(&trainer)
        .arg("synth")
        .arg("--out")
        .arg(&synth)
        .args([
            "--seed",
            "1",
            "--general-train",
            "1",
            "--task-train",
            "3000",
            "--eval",
            "200",
        ])
        .output()
        .expect("running esft-train synth");
    assert!(
        synthesized.status.success(),
        "esft-train synth failed: {}",
        String::from_utf8_lossy(&synthesized.stderr)
    );
    let train_data: Vec<u8> = std::fs::read_to_string(synth.join("law/train.jsonl"))
        .expect("the law task's data")
        .lines()
        .take(examples_wanted)
        .flat_map(|l| l.bytes().chain(std::iter::once(b'\n')))
        .collect();
    let examples_used = train_data.iter().filter(|b| **b == b'\n').count();
    let eval = examples(&synth.join("law/eval.jsonl"), 16);
    let prompts: Vec<String> = eval.iter().map(|e| e.0.clone()).collect();

    let mut config = ServerConfig {
        model: Some(model.clone()),
        adapters: tmp.path().join("adapters"),
        ..ServerConfig::default()
    };
    let data_dir = tmp.path().join("data");
    config.fine_tuning.data_dir = data_dir.clone();
    config.fine_tuning.trainer = trainer.clone();
    let ft = config.fine_tuning.clone();
    let (threads, nice) = (ft.threads(), ft.training_nice);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let srv = rt.block_on(async { Server::start(&config) });
    let t = Instant::now();
    let file = rt.block_on(srv.upload(&train_data));
    let upload_seconds = t.elapsed().as_secs_f64();
    let file_id = file["id"].as_str().expect("a file id").to_string();
    let training = data_dir.join("files").join(&file_id);
    println!(
        "fine-tuning on models/demo, law task ({} examples, {} bytes; uploaded in {upload_seconds:.3} s), \
         trainer {}, RAYON_NUM_THREADS={threads}, nice {nice}, {rounds} round(s)",
        examples_used,
        train_data.len(),
        trainer.display(),
    );

    // 1 and 2: the job through the API (its events polled in full, then the newest few)
    // and the same commands run directly, in between.
    let mut rounds_done: Vec<Round> = Vec::new();
    let mut agree = true;
    let mut notes = Vec::new();
    let mut commands: Option<Vec<Vec<String>>> = None;
    let dir = tmp.path().join("direct");
    for round in 0..rounds {
        let mut order = vec![Some(FULL_EVENTS), None];
        if few_events {
            order.push(Some(FEW_EVENTS));
        }
        if round % 2 == 1 {
            order.reverse();
        }
        let (mut full, mut few, mut direct) = (None, None, None);
        for variant in order {
            match variant {
                Some(limit) => {
                    println!(
                        "round {}: a job through the API (events polled with limit={limit}) ...",
                        round + 1
                    );
                    let api = rt.block_on(api_job(&srv, &file_id, &trainer, &eval[0].1, limit));
                    let job_dir = data_dir
                        .join("jobs")
                        .join(api.job["id"].as_str().expect("an id"));
                    let save = ft.save_every_steps;
                    let by_rule = runner_commands(&model, &training, &api.job, &job_dir, save);
                    let direct_rule = runner_commands(&model, &training, &api.job, &dir, save);
                    if commands.is_none() {
                        let (c, a, n) =
                            direct_commands(&api, &by_rule, &direct_rule, &job_dir, &dir);
                        commands = Some(c);
                        agree = a;
                        notes = n;
                    }
                    for seen in api.children.values() {
                        if seen.threads.as_deref() != Some(&threads.to_string())
                            || seen.nice != i64::from(nice)
                        {
                            agree = false;
                            notes.push(format!(
                                "{}: ran with RAYON_NUM_THREADS={:?}, nice {} (expected {threads}, {nice})",
                                seen.argv[1], seen.threads, seen.nice
                            ));
                        }
                    }
                    if limit == FULL_EVENTS {
                        full = Some(api);
                    } else {
                        few = Some(api);
                    }
                }
                None => {
                    let Some(cmds) = &commands else {
                        unreachable!("every round starts with a job through the API")
                    };
                    println!("round {}: the same commands directly ...", round + 1);
                    let _ = std::fs::remove_dir_all(&dir);
                    std::fs::create_dir_all(&dir).expect("the direct run's directory");
                    let cpu0 = Cpu::now();
                    let steps: Vec<Step> = cmds
                        .iter()
                        .map(|c| run_direct(&trainer, c, threads, nice))
                        .collect();
                    direct = Some((steps, Cpu::now().since(cpu0)));
                }
            }
        }
        let (direct, direct_cpu) = direct.expect("the direct run");
        rounds_done.push(Round {
            full: full.expect("the job polled in full"),
            few,
            direct,
            direct_cpu,
        });
    }

    // 3: serving while idle, while a job trains, idle again.
    println!("serving: {clients} clients x {load_tokens} tokens, {load_seconds} s per load ...");
    let serving = rt.block_on(async {
        decode_load(&srv, 2.0, clients, load_tokens, &prompts).await;
        let idle_before = decode_load(&srv, load_seconds, clients, load_tokens, &prompts).await;
        let t0 = Instant::now();
        let created = srv
            .post("/v1/fine_tuning/jobs", create_body(&file_id, "busy"))
            .await;
        let id = created["id"].as_str().expect("a job id").to_string();
        let mut w = Watch::new(FULL_EVENTS);
        w.until("training", &srv, &id, t0, &trainer).await;
        // The first steps.
        tokio::time::sleep(Duration::from_secs(3)).await;
        w.poll(&srv, &id, t0, &trainer).await;
        let (before, at_before) = (w.metrics.clone(), t0.elapsed().as_secs_f64());
        let busy = decode_load(&srv, load_seconds, clients, load_tokens, &prompts).await;
        w.poll(&srv, &id, t0, &trainer).await;
        let (after, at_after) = (w.metrics.clone(), t0.elapsed().as_secs_f64());
        assert!(
            w.mark("trained").is_none(),
            "the job finished training during the load: make ESFT_FT_LOAD_SECONDS shorter"
        );
        let tokens = |m: &Option<Value>| {
            m.as_ref()
                .and_then(|m| m["trained_tokens"].as_f64())
                .unwrap_or(0.0)
        };
        let step = |m: &Option<Value>| m.as_ref().and_then(|m| m["step"].as_u64()).unwrap_or(0);
        let trained_rate = (tokens(&after) - tokens(&before)) / (at_after - at_before);
        let steps = step(&after) - step(&before);
        srv.post(&format!("/v1/fine_tuning/jobs/{id}/cancel"), json!({}))
            .await;
        while !trainer_children(&trainer).is_empty() {
            tokio::time::sleep(POLL).await;
        }
        let idle_after = decode_load(&srv, load_seconds, clients, load_tokens, &prompts).await;
        (idle_before, busy, idle_after, trained_rate, steps)
    });
    let (idle_before, busy, idle_after, trained_under_load, steps_under_load) = serving;

    // Report.
    println!();
    let direct_phase = |steps: &[Step], name: &str| {
        let command = match name {
            "scoring" => "score",
            "selection" => "select",
            "training" => "train",
            _ => return None,
        };
        steps
            .iter()
            .find(|s| s.command == command)
            .map(|s| s.seconds)
    };
    // The table's columns: each round's jobs through the API, then its direct run.
    let mut cols: Vec<(String, &Round, Option<&ApiRun>)> = Vec::new();
    for (i, r) in rounds_done.iter().enumerate() {
        cols.push((format!("API r{}", i + 1), r, Some(&r.full)));
        if let Some(few) = &r.few {
            cols.push((format!("API-{FEW_EVENTS} r{}", i + 1), r, Some(few)));
        }
        cols.push((format!("direct r{}", i + 1), r, None));
    }
    let row = |label: &str, cell: &dyn Fn(&Round, Option<&ApiRun>) -> String| {
        let mut line = format!("{label:<32}");
        for (_, r, api) in &cols {
            line += &format!(" {:>12}", cell(r, *api));
        }
        println!("{line}");
    };
    let mut head = format!("{:<32}", "seconds");
    for (name, _, _) in &cols {
        head += &format!(" {name:>12}");
    }
    println!("{head}");
    for (i, (name, _)) in rounds_done[0].full.phases.iter().enumerate() {
        let label = LABELS.iter().find(|l| l.0 == *name).map_or(*name, |l| l.1);
        row(label, &|r, api| match api {
            Some(a) => format!("{:.3}", a.phases[i].1),
            None => direct_phase(&r.direct, name).map_or_else(String::new, |s| format!("{s:.3}")),
        });
    }
    row("total", &|r, api| {
        format!("{:.3}", api.map_or_else(|| r.direct_total(), |a| a.total))
    });
    row("overhead (API / direct - 1)", &|r, api| {
        api.map_or_else(String::new, |a| {
            format!("{:+.2}%", 100.0 * (a.total / r.direct_total() - 1.0))
        })
    });
    row("CPU s, this process", &|r, api| {
        format!("{:.2}", api.map_or(r.direct_cpu, |a| a.cpu).own)
    });
    row("CPU s, the trainer children", &|r, api| {
        format!("{:.2}", api.map_or(r.direct_cpu, |a| a.cpu).children)
    });
    row("CPU overhead (API / direct - 1)", &|r, api| {
        api.map_or_else(String::new, |a| {
            format!(
                "{:+.2}%",
                100.0 * (a.cpu.total() / r.direct_cpu.total() - 1.0)
            )
        })
    });
    row("event polls (s inside them)", &|_, api| {
        api.map_or_else(String::new, |a| {
            format!("{} ({:.1})", a.polls, a.poll_seconds)
        })
    });
    let direct_sum: f64 = rounds_done.iter().map(Round::direct_total).sum();
    let direct_cpu: f64 = rounds_done.iter().map(|r| r.direct_cpu.total()).sum();
    let overhead = rounds_done.iter().map(|r| r.full.total).sum::<f64>() / direct_sum - 1.0;
    let cpu_overhead =
        rounds_done.iter().map(|r| r.full.cpu.total()).sum::<f64>() / direct_cpu - 1.0;
    println!(
        "overhead (goal <= 5%): {:+.2}% in wall time, {:+.2}% in CPU time",
        100.0 * overhead,
        100.0 * cpu_overhead
    );
    let few: Vec<&ApiRun> = rounds_done.iter().filter_map(|r| r.few.as_ref()).collect();
    let few_overhead = (!few.is_empty()).then(|| {
        let direct: f64 = rounds_done
            .iter()
            .filter(|r| r.few.is_some())
            .map(Round::direct_total)
            .sum();
        few.iter().map(|a| a.total).sum::<f64>() / direct - 1.0
    });
    if let Some(o) = few_overhead {
        println!(
            "with the events polled with limit={FEW_EVENTS}: {:+.2}% in wall time",
            100.0 * o
        );
    }
    let first = &rounds_done[0].full;
    println!(
        "the adapter's first call: {:.3} s, reply {:?} (expected {:?})",
        first.call_seconds, first.reply, eval[0].2
    );
    println!(
        "selection: {}",
        serde_json::to_string(&first.job["esft"]["selection"]).unwrap_or_default()
    );
    println!(
        "trained_tokens: {} (direct: {})",
        first.job["trained_tokens"], rounds_done[0].direct[2].done["trained_tokens"]
    );
    println!(
        "arguments: the direct commands {} the job's children{}",
        if agree { "equal" } else { "DIFFER FROM" },
        if notes.is_empty() {
            String::new()
        } else {
            format!(" ({})", notes.join("; "))
        }
    );
    let direct_train = &rounds_done[0].direct[2];
    let trained_alone =
        direct_train.done["trained_tokens"].as_f64().unwrap_or(0.0) / direct_train.seconds;
    let idle = (idle_before.rate() + idle_after.rate()) / 2.0;
    let ratio = busy.rate() / idle;
    println!();
    println!(
        "{:<34} {:>10} {:>9} {:>8}",
        "serving (base model)", "tokens/s", "requests", "seconds"
    );
    for (name, l) in [
        ("idle", idle_before),
        ("while a job trains", busy),
        ("idle again", idle_after),
    ] {
        println!(
            "{name:<34} {:>10.1} {:>9} {:>8.1}",
            l.rate(),
            l.requests,
            l.seconds
        );
    }
    println!("training / idle: {ratio:.3} (goal >= 0.5)");
    println!(
        "the job's training meanwhile: {trained_under_load:.0} tokens/s ({steps_under_load} steps), \
         alone {trained_alone:.0} tokens/s"
    );

    let phases = |a: &ApiRun| -> Value {
        a.phases
            .iter()
            .map(|(n, s)| (n.to_string(), json!(s)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let out = json!({
        "bench": "fine_tuning",
        "examples": examples_used,
        "threads": threads,
        "nice": nice,
        "upload_s": upload_seconds,
        "rounds": rounds_done.iter().map(|r| {
            let api = |a: &ApiRun| json!({
                "phases": phases(a),
                "total_s": a.total,
                "overhead": a.total / r.direct_total() - 1.0,
                "cpu_own_s": a.cpu.own,
                "cpu_children_s": a.cpu.children,
                "cpu_overhead": a.cpu.total() / r.direct_cpu.total() - 1.0,
                "polls": a.polls,
                "poll_s": a.poll_seconds,
                "first_call_s": a.call_seconds,
            });
            json!({
                "api": api(&r.full),
                "api_few_events": r.few.as_ref().map(api),
                "direct": r.direct.iter().map(|s| (s.command.clone(), json!(s.seconds)))
                    .collect::<serde_json::Map<_, _>>(),
                "direct_total_s": r.direct_total(),
                "direct_cpu_own_s": r.direct_cpu.own,
                "direct_cpu_children_s": r.direct_cpu.children,
            })
        }).collect::<Vec<_>>(),
        "overhead": overhead,
        "cpu_overhead": cpu_overhead,
        "overhead_few_events": few_overhead,
        "arguments_equal": agree,
        "selection": first.job["esft"]["selection"],
        "trained_tokens": first.job["trained_tokens"],
        "reply": first.reply,
        "expected": eval[0].2,
        "serving": {
            "clients": clients,
            "max_tokens": load_tokens,
            "idle_tok_s": idle_before.rate(),
            "training_tok_s": busy.rate(),
            "idle_again_tok_s": idle_after.rate(),
            "ratio": ratio,
            "job_trained_tok_s_under_load": trained_under_load,
            "job_steps_under_load": steps_under_load,
            "job_trained_tok_s_alone": trained_alone,
        },
    });
    println!("{out}");
}
