//! Load test of `esft-serve serve` on loopback: concurrent streaming clients over the base
//! model and 8 adapters, some of which disconnect mid-stream.
//!
//! The model is the runtime benchmark's (`bench_model.json`: hidden 512, 64 routed experts
//! top-6, 2 shared) with the `lite` fixture's tokenizer (so its vocabulary, 512). Each
//! adapter replaces ~10% of the routed experts of every MoE layer.
//!
//! 1. Every request is run alone, one after the other: the reference answers (this also
//!    loads every adapter, so the server is warm), then the server's RSS is the baseline.
//! 2. `ESFT_LOAD_ROUNDS` rounds: all clients start together; client `i` uses the base when
//!    `i % 9 == 0`, else adapter `task{i % 9}`; half greedy, half seeded sampling; every
//!    tenth client hangs up after its 4th chunk. Every other stream must end in
//!    `[DONE]` with exactly the reference text and usage.
//! 3. After the rounds the engine must be empty (metrics) and RSS back near the baseline.
//!
//! Knobs: `ESFT_LOAD_CLIENTS` (64), `ESFT_LOAD_MAX_TOKENS` (32), `ESFT_LOAD_ROUNDS` (2),
//! `ESFT_BENCH_LAYERS` (8). The run is bounded: every request has `max_tokens`, every read
//! a timeout, and the process stops after the last round.

mod common;
#[path = "../tests/common/http.rs"]
mod http;

use common::{env_usize, write_random_adapter, write_served_bench_model};
use esft::adapter::BaseModel;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const ADAPTERS: usize = 8;

#[derive(Clone)]
struct Job {
    body: Value,
    disconnect: bool,
}

#[derive(Debug, Default, Clone, PartialEq)]
struct Outcome {
    text: String,
    finish: Option<String>,
    usage: Option<Value>,
    error: Option<String>,
    done: bool,
    ttft: Option<Duration>,
    hung_up: bool,
}

fn run_job(addr: std::net::SocketAddr, job: &Job) -> Outcome {
    let mut out = Outcome::default();
    let t0 = Instant::now();
    let body = job.body.to_string();
    let mut ex = match http::send(addr, "POST", "/v1/completions", &[], Some(body.as_bytes())) {
        Ok(ex) => ex,
        Err(e) => {
            out.error = Some(format!("connect/send: {e}"));
            return out;
        }
    };
    if ex.status != 200 {
        let r = ex.read_all().map(|r| r.text()).unwrap_or_default();
        out.error = Some(format!("status {r}"));
        return out;
    }
    let mut chunks = 0;
    loop {
        match ex.next_event() {
            Ok(Some(d)) if d == "[DONE]" => {
                out.done = true;
                break;
            }
            Ok(Some(d)) => {
                out.ttft.get_or_insert_with(|| t0.elapsed());
                let v: Value = match serde_json::from_str(&d) {
                    Ok(v) => v,
                    Err(e) => {
                        out.error = Some(format!("bad chunk {d}: {e}"));
                        break;
                    }
                };
                if v.get("error").is_some() {
                    out.error = Some(v["error"].to_string());
                }
                if let Some(c) = v["choices"].get(0) {
                    out.text.push_str(c["text"].as_str().unwrap_or_default());
                    if let Some(f) = c["finish_reason"].as_str() {
                        out.finish = Some(f.to_string());
                    }
                }
                if !v["usage"].is_null() && v.get("usage").is_some() {
                    out.usage = Some(v["usage"].clone());
                }
                chunks += 1;
                if job.disconnect && chunks == 4 {
                    out.hung_up = true;
                    return out; // dropping the connection mid-stream
                }
            }
            Ok(None) => break,
            Err(e) => {
                out.error = Some(format!("read: {e}"));
                break;
            }
        }
    }
    out
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn main() {
    let clients = env_usize("ESFT_LOAD_CLIENTS", 64);
    let max_tokens = env_usize("ESFT_LOAD_MAX_TOKENS", 32);
    let rounds = env_usize("ESFT_LOAD_ROUNDS", 2);
    let layers = env_usize("ESFT_BENCH_LAYERS", 8);

    let tmp = tempfile::tempdir().expect("tempdir");
    let model_dir = tmp.path().join("model");
    write_served_bench_model(layers, &model_dir);
    let adapters = tmp.path().join("adapters");
    let base = BaseModel::open(&model_dir).expect("base");
    for i in 1..=ADAPTERS {
        write_random_adapter(&base, &adapters, i, 300 + i as u64, 0.05);
    }
    drop(base);
    let server_config = tmp.path().join("server.toml");
    std::fs::write(
        &server_config,
        format!(
            "model = {:?}\nadapters = {:?}\nmodel_id = \"bench\"\n[engine]\nmax_running = 64\n\
             [fine_tuning]\ndata_dir = {:?}\n",
            model_dir.to_str().unwrap_or_default(),
            adapters.to_str().unwrap_or_default(),
            tmp.path().join("data").to_str().unwrap_or_default()
        ),
    )
    .expect("config");
    let server = http::Server::start(
        Path::new(env!("CARGO_BIN_EXE_esft-serve")),
        &server_config,
        &[],
    );
    let addr = server.addr;
    println!(
        "server up at {addr}: {layers} layers, {ADAPTERS} adapters, {clients} clients, max_tokens {max_tokens}"
    );

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let jobs: Vec<Job> = (0..clients)
        .map(|i| {
            let model = match i % (ADAPTERS + 1) {
                0 => "bench".to_string(),
                k => format!("task{k}"),
            };
            let len = rng.random_range(8..48);
            let prompt: Vec<u32> = (0..len).map(|_| rng.random_range(2..512)).collect();
            let mut body = json!({
                "model": model, "prompt": prompt, "max_tokens": max_tokens,
                "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
            });
            if i % 2 == 0 {
                body["temperature"] = json!(0);
            } else {
                body["temperature"] = json!(0.8);
                body["top_p"] = json!(0.95);
                body["seed"] = json!(1000 + i);
            }
            Job {
                body,
                disconnect: i % 10 == 3,
            }
        })
        .collect();

    // 1. Alone.
    let t0 = Instant::now();
    let reference: Vec<Outcome> = jobs
        .iter()
        .map(|j| {
            let o = run_job(
                addr,
                &Job {
                    disconnect: false,
                    ..j.clone()
                },
            );
            assert!(o.error.is_none() && o.done, "alone: {o:?}");
            o
        })
        .collect();
    let alone_s = t0.elapsed().as_secs_f64();
    let alone_tokens: u64 = reference
        .iter()
        .filter_map(|o| o.usage.as_ref()?["completion_tokens"].as_u64())
        .sum();
    std::thread::sleep(Duration::from_millis(500));
    let baseline = server.rss_bytes();
    println!(
        "alone: {} requests in {alone_s:.1} s ({:.1} tokens/s), RSS baseline {:.1} MiB",
        jobs.len(),
        alone_tokens as f64 / alone_s,
        baseline as f64 / 1048576.0
    );

    // 2. Together.
    let mut failures = Vec::new();
    let mut peak = baseline;
    for round in 1..=rounds {
        let barrier = Arc::new(Barrier::new(jobs.len()));
        let t0 = Instant::now();
        let threads: Vec<_> = jobs
            .iter()
            .cloned()
            .map(|job| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    let t = Instant::now();
                    let o = run_job(addr, &job);
                    (o, t.elapsed())
                })
            })
            .collect();
        // Sample memory while the round runs.
        while !threads.iter().all(|t| t.is_finished()) {
            peak = peak.max(server.rss_bytes());
            std::thread::sleep(Duration::from_millis(20));
        }
        let results: Vec<(Outcome, Duration)> = threads
            .into_iter()
            .map(|t| t.join().expect("client thread"))
            .collect();
        let wall = t0.elapsed().as_secs_f64();
        let mut ttft = Vec::new();
        let mut completed = 0;
        let mut tokens = 0u64;
        let mut hung_up = 0;
        for (i, (o, _)) in results.iter().enumerate() {
            if let Some(t) = o.ttft {
                ttft.push(t.as_secs_f64());
            }
            if o.hung_up {
                hung_up += 1;
                continue;
            }
            let want = &reference[i];
            if o.error.is_some() || !o.done {
                failures.push(format!("round {round} client {i}: {o:?}"));
            } else if (o.text.as_str(), &o.usage, &o.finish)
                != (want.text.as_str(), &want.usage, &want.finish)
            {
                failures.push(format!(
                    "round {round} client {i}: differs from alone\n  got  {:?} {:?}\n  want {:?} {:?}",
                    o.text, o.usage, want.text, want.usage
                ));
            } else {
                completed += 1;
                tokens += o
                    .usage
                    .as_ref()
                    .and_then(|u| u["completion_tokens"].as_u64())
                    .unwrap_or(0);
            }
        }
        println!(
            "round {round}: {completed} completed + {hung_up} hung up in {wall:.2} s: {:.2} requests/s, {:.1} tokens/s, TTFT p50 {:.0} ms, p99 {:.0} ms",
            completed as f64 / wall,
            tokens as f64 / wall,
            percentile(ttft.clone(), 0.5) * 1000.0,
            percentile(ttft, 0.99) * 1000.0,
        );
    }

    // 3. Drained and back to baseline.
    let mut engine_empty = false;
    let mut scrape = String::new();
    for _ in 0..100 {
        scrape = http::request(addr, "GET", "/metrics", &[], None)
            .map(|r| r.text())
            .unwrap_or_default();
        if metric(&scrape, "esft_requests_running") == 0.0
            && metric(&scrape, "esft_requests_waiting") == 0.0
            && metric(&scrape, "esft_kv_cache_bytes") == 0.0
        {
            engine_empty = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = server.rss_bytes();
    let mib = |b: u64| b as f64 / 1048576.0;
    let cancelled = metric(
        &scrape,
        "esft_sequences_finished_total{finish_reason=\"cancelled\"}",
    );
    println!(
        "after: engine empty {engine_empty}, cancelled sequences {cancelled}, RSS baseline {:.1} MiB, peak {:.1} MiB, after {:.1} MiB ({:+.1} MiB)",
        mib(baseline),
        mib(peak),
        mib(after),
        mib(after) - mib(baseline)
    );
    let memory_ok = after <= baseline + baseline / 10;
    if !failures.is_empty() || !engine_empty || !memory_ok {
        for f in &failures {
            eprintln!("{f}");
        }
        eprintln!(
            "FAILED: {} stream failures, engine empty {engine_empty}, memory back to baseline {memory_ok}",
            failures.len()
        );
        std::process::exit(1);
    }
    println!(
        "OK: no errors, every completed stream equals its request alone, memory back to baseline"
    );
}
