//! Backpressure of `esft-serve serve` on loopback: goodput, time to first token and
//! `/health` latency at the engine's capacity and at four times it, with the waiting
//! limits on and off.
//!
//! The model is the runtime benchmark's (`bench_model.json`: hidden 512, 64 routed experts
//! top-6, 2 shared) with the `lite` fixture's tokenizer (vocabulary 512), no adapters.
//! Every request is the same streaming completion: a fixed text prompt, `max_tokens`
//! tokens, greedy, `ignore_eos` (so each generates exactly `max_tokens` unless a deadline
//! ends it).
//!
//! Two configurations, each its own server process with `[engine] max_running = R`:
//! - `backpressure`: `max_waiting = W` (`ESFT_OVERLOAD_WAITING`, default R),
//!   `max_waiting_per_tenant = 0`, `max_queue_seconds = Q` (`ESFT_OVERLOAD_QUEUE_SECONDS`,
//!   default 5), `max_request_seconds = 0` (a short queue);
//! - `unbounded`: every limit 0 (no waiting limit, no queue or request deadline).
//!
//! Each runs two phases of `D` seconds, after a warm-up of R requests:
//! - `1x`: R closed-loop streaming clients (one request at a time each);
//! - `4x`: 4R closed-loop clients. A client answered 429 waits its `Retry-After` (1 s
//!   when absent), at most 1 s, and sends again.
//!
//! Clients send until the phase's `D` seconds are up; requests already sent then run to
//! their end. Goodput is the completion tokens, streamed within the `D` seconds, of
//! requests that ended with 200 and `[DONE]`, per second (a request's tokens are counted
//! by its chunks' arrival times). TTFT is from sending a request to its first data chunk,
//! over every such request. 429s are counted by `code` (`server_overloaded`,
//! `queue_timeout`); anything else (another status, a stream without `[DONE]`, an error
//! event, a connection error) is an error, expected to be 0. Throughout each phase a
//! separate thread sends `GET /health` every 100 ms on a new connection and records how
//! long each takes.
//!
//! The table has one row per configuration and phase, then for each configuration the
//! ratios the backpressure goals are stated in: goodput(4x) / goodput(1x) >= 0.90,
//! p99 TTFT(4x) / p99 TTFT(1x) <= 2.0 and the largest `/health` latency of both phases
//! < 100 ms, each marked PASS or FAIL. It is a measurement: the process exits 0 either way
//! (non-zero only if the server cannot be started).
//!
//! Knobs: `ESFT_OVERLOAD_RUNNING` (R, 8), `ESFT_OVERLOAD_SECONDS` (D, 20),
//! `ESFT_OVERLOAD_MAX_TOKENS` (32), `ESFT_OVERLOAD_WAITING` (W, R),
//! `ESFT_OVERLOAD_QUEUE_SECONDS` (Q, 5), `ESFT_BENCH_LAYERS` (4). The run is bounded: every
//! request has `max_tokens`, every read a timeout, and the process stops after the second
//! configuration.

mod common;
#[path = "../tests/common/http.rs"]
mod http;

use common::{env_usize, write_served_bench_model};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const PROMPT: &str = "The quick brown fox jumps over the lazy dog, and then it runs back.";
/// The longest a client answered 429 waits before sending again.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
const HEALTH_EVERY: Duration = Duration::from_millis(100);

/// The limits under test, as written to the server's config.
struct Limits {
    name: &'static str,
    max_waiting: usize,
    max_waiting_per_tenant: usize,
    max_queue_seconds: f64,
    max_request_seconds: f64,
}

/// What one request came to.
enum Outcome {
    /// 200 and `[DONE]`: completion tokens, TTFT, and when (since the phase began) each
    /// data chunk carrying text arrived.
    Completed {
        tokens: u64,
        ttft: Duration,
        chunk_times: Vec<Duration>,
    },
    /// 429 with this `code`, and the `Retry-After` header's seconds if any.
    Rejected {
        code: String,
        retry_after: Option<u64>,
    },
    Error(String),
}

fn run_request(addr: SocketAddr, body: &str, phase_start: Instant) -> Outcome {
    let t0 = Instant::now();
    let mut ex = match http::send(addr, "POST", "/v1/completions", &[], Some(body.as_bytes())) {
        Ok(ex) => ex,
        Err(e) => return Outcome::Error(format!("connect/send: {e}")),
    };
    if ex.status == 429 {
        let retry_after = ex
            .headers
            .iter()
            .find(|(k, _)| k == "retry-after")
            .and_then(|(_, v)| v.trim().parse().ok());
        let code = match ex.read_all() {
            Ok(r) => serde_json::from_slice::<Value>(&r.body)
                .ok()
                .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
                .unwrap_or_else(|| format!("(no code: {})", r.text())),
            Err(e) => format!("(unread body: {e})"),
        };
        return Outcome::Rejected { code, retry_after };
    }
    if ex.status != 200 {
        let status = ex.status;
        let r = ex.read_all().map(|r| r.text()).unwrap_or_default();
        return Outcome::Error(format!("status {status}: {r}"));
    }
    let mut ttft = None;
    let mut chunk_times = Vec::new();
    let mut tokens = None;
    loop {
        match ex.next_event() {
            Ok(Some(d)) if d == "[DONE]" => break,
            Ok(Some(d)) => {
                ttft.get_or_insert_with(|| t0.elapsed());
                let v: Value = match serde_json::from_str(&d) {
                    Ok(v) => v,
                    Err(e) => return Outcome::Error(format!("bad chunk {d}: {e}")),
                };
                if let Some(e) = v.get("error") {
                    // A queue timeout may come as the stream's error event.
                    if e["code"] == "queue_timeout" {
                        return Outcome::Rejected {
                            code: "queue_timeout".into(),
                            retry_after: None,
                        };
                    }
                    return Outcome::Error(format!("error event: {e}"));
                }
                let text = v["choices"]
                    .get(0)
                    .and_then(|c| c["text"].as_str())
                    .unwrap_or_default();
                if !text.is_empty() {
                    chunk_times.push(phase_start.elapsed());
                }
                if let Some(n) = v.get("usage").and_then(|u| u["completion_tokens"].as_u64()) {
                    tokens = Some(n);
                }
            }
            Ok(None) => return Outcome::Error("stream ended without [DONE]".into()),
            Err(e) => return Outcome::Error(format!("read: {e}")),
        }
    }
    match (ttft, tokens) {
        (Some(ttft), Some(tokens)) => Outcome::Completed {
            tokens,
            ttft,
            chunk_times,
        },
        _ => Outcome::Error("[DONE] without data or usage".into()),
    }
}

#[derive(Default)]
struct ClientTally {
    completed: usize,
    /// Completed with fewer than `max_tokens` tokens (a request deadline).
    short: usize,
    tokens_in_window: f64,
    ttft: Vec<f64>,
    overloaded: usize,
    queue_timeout: usize,
    other_429: usize,
    errors: Vec<String>,
}

/// One closed-loop client: sends until `window` has passed since `start`.
fn client(
    addr: SocketAddr,
    body: &str,
    max_tokens: u64,
    start: Instant,
    window: Duration,
) -> ClientTally {
    let mut t = ClientTally::default();
    while start.elapsed() < window {
        match run_request(addr, body, start) {
            Outcome::Completed {
                tokens,
                ttft,
                chunk_times,
            } => {
                t.completed += 1;
                if tokens < max_tokens {
                    t.short += 1;
                }
                t.ttft.push(ttft.as_secs_f64());
                // The request's tokens, pro rata of its text chunks that came in the window.
                if !chunk_times.is_empty() {
                    let inside = chunk_times.iter().filter(|&&c| c <= window).count();
                    t.tokens_in_window += tokens as f64 * inside as f64 / chunk_times.len() as f64;
                }
            }
            Outcome::Rejected { code, retry_after } => {
                match code.as_str() {
                    "server_overloaded" => t.overloaded += 1,
                    "queue_timeout" => t.queue_timeout += 1,
                    _ => {
                        t.other_429 += 1;
                        t.errors.push(format!("429 {code}"));
                    }
                }
                let wait = retry_after.map_or(MAX_BACKOFF, Duration::from_secs);
                let left = window.saturating_sub(start.elapsed());
                std::thread::sleep(wait.min(MAX_BACKOFF).min(left));
            }
            Outcome::Error(e) => {
                t.errors.push(e);
                // Do not spin on a server that refuses connections.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    t
}

struct PhaseResult {
    clients: usize,
    tally: ClientTally,
    /// From the end of the window until the last request ended.
    drain_s: f64,
    health_ms: Vec<f64>,
    health_errors: usize,
}

impl PhaseResult {
    fn goodput(&self, window: Duration) -> f64 {
        self.tally.tokens_in_window / window.as_secs_f64()
    }
}

/// Polls `GET /health` every `HEALTH_EVERY` until `stop`; latencies in ms and failures.
fn poll_health(addr: SocketAddr, stop: Arc<AtomicBool>) -> (Vec<f64>, usize) {
    let mut lat = Vec::new();
    let mut errors = 0;
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        match http::request(addr, "GET", "/health", &[], None) {
            Ok(r) if r.status == 200 => lat.push(t0.elapsed().as_secs_f64() * 1000.0),
            _ => errors += 1,
        }
        std::thread::sleep(HEALTH_EVERY.saturating_sub(t0.elapsed()));
    }
    (lat, errors)
}

fn run_phase(
    addr: SocketAddr,
    body: &str,
    max_tokens: u64,
    clients: usize,
    window: Duration,
) -> PhaseResult {
    let stop = Arc::new(AtomicBool::new(false));
    let health = {
        let stop = stop.clone();
        std::thread::spawn(move || poll_health(addr, stop))
    };
    let barrier = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let barrier = barrier.clone();
            let body = body.to_string();
            std::thread::spawn(move || {
                barrier.wait();
                let start = Instant::now();
                client(addr, &body, max_tokens, start, window)
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut tally = ClientTally::default();
    for t in threads {
        let c = t.join().expect("client thread");
        tally.completed += c.completed;
        tally.short += c.short;
        tally.tokens_in_window += c.tokens_in_window;
        tally.ttft.extend(c.ttft);
        tally.overloaded += c.overloaded;
        tally.queue_timeout += c.queue_timeout;
        tally.other_429 += c.other_429;
        tally.errors.extend(c.errors);
    }
    let drain_s = (start.elapsed().as_secs_f64() - window.as_secs_f64()).max(0.0);
    stop.store(true, Ordering::Relaxed);
    let (health_ms, health_errors) = health.join().expect("health thread");
    PhaseResult {
        clients,
        tally,
        drain_s,
        health_ms,
        health_errors,
    }
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

struct ConfigResult {
    limits: Limits,
    phases: Vec<(&'static str, PhaseResult)>,
}

#[allow(clippy::too_many_arguments)]
fn run_config(
    limits: Limits,
    dir: &Path,
    model_dir: &Path,
    running: usize,
    body: &str,
    max_tokens: u64,
    window: Duration,
) -> ConfigResult {
    let root = dir.join(limits.name);
    std::fs::create_dir_all(&root).expect("config dir");
    let server_config = root.join("server.toml");
    std::fs::write(
        &server_config,
        format!(
            "model = {:?}\nadapters = {:?}\nmodel_id = \"bench\"\n\
             [engine]\nmax_running = {running}\nmax_waiting = {}\nmax_waiting_per_tenant = {}\n\
             [limits]\nmax_queue_seconds = {:?}\nmax_request_seconds = {:?}\n\
             [fine_tuning]\ndata_dir = {:?}\n",
            model_dir.to_str().unwrap_or_default(),
            root.join("adapters").to_str().unwrap_or_default(),
            limits.max_waiting,
            limits.max_waiting_per_tenant,
            limits.max_queue_seconds,
            limits.max_request_seconds,
            root.join("data").to_str().unwrap_or_default()
        ),
    )
    .expect("server config");
    let server = http::Server::start(
        Path::new(env!("CARGO_BIN_EXE_esft-serve")),
        &server_config,
        &[],
    );
    let addr = server.addr;
    println!(
        "[{}] server up at {addr}: max_running {running}, max_waiting {}, \
         max_waiting_per_tenant {}, max_queue_seconds {}, max_request_seconds {}",
        limits.name,
        limits.max_waiting,
        limits.max_waiting_per_tenant,
        limits.max_queue_seconds,
        limits.max_request_seconds
    );

    // Warm-up: one request per running slot, together.
    let warm: Vec<_> = (0..running)
        .map(|_| {
            let body = body.to_string();
            std::thread::spawn(move || run_request(addr, &body, Instant::now()))
        })
        .collect();
    for w in warm {
        if let Outcome::Error(e) = w.join().expect("warm-up thread") {
            eprintln!("[{}] warm-up request failed: {e}", limits.name);
        }
    }

    let mut phases = Vec::new();
    for (label, clients) in [("1x", running), ("4x", 4 * running)] {
        let r = run_phase(addr, body, max_tokens, clients, window);
        println!(
            "[{}] {label}: {clients} clients, {} completed, {:.1} tok/s, TTFT p50 {:.0} ms p99 {:.0} ms, \
             429 overloaded {} queue_timeout {}, errors {}, drain {:.1} s, /health p99 {:.1} ms max {:.1} ms",
            limits.name,
            r.tally.completed,
            r.goodput(window),
            percentile(&r.tally.ttft, 0.5) * 1000.0,
            percentile(&r.tally.ttft, 0.99) * 1000.0,
            r.tally.overloaded,
            r.tally.queue_timeout,
            r.tally.errors.len(),
            r.drain_s,
            percentile(&r.health_ms, 0.99),
            max(&r.health_ms),
        );
        for e in r.tally.errors.iter().take(5) {
            eprintln!("[{}] {label} error: {e}", limits.name);
        }
        phases.push((label, r));
        // Let the server settle between phases.
        std::thread::sleep(Duration::from_secs(1));
    }
    drop(server);
    ConfigResult { limits, phases }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

fn main() {
    let running = env_usize("ESFT_OVERLOAD_RUNNING", 8).max(1);
    let seconds = env_usize("ESFT_OVERLOAD_SECONDS", 20).max(1);
    let max_tokens = env_usize("ESFT_OVERLOAD_MAX_TOKENS", 32).max(1);
    let layers = env_usize("ESFT_BENCH_LAYERS", 4);
    let window = Duration::from_secs(seconds as u64);

    let tmp = tempfile::tempdir().expect("tempdir");
    let model_dir: PathBuf = tmp.path().join("model");
    write_served_bench_model(layers, &model_dir);
    let body = json!({
        "model": "bench", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
    })
    .to_string();
    println!(
        "overload: {layers} layers, max_running {running}, {seconds} s per phase, \
         max_tokens {max_tokens}, 1x = {running} clients, 4x = {} clients",
        4 * running
    );

    let configs = [
        Limits {
            name: "backpressure",
            max_waiting: env_usize("ESFT_OVERLOAD_WAITING", running).max(1),
            max_waiting_per_tenant: 0,
            max_queue_seconds: std::env::var("ESFT_OVERLOAD_QUEUE_SECONDS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(5.0),
            max_request_seconds: 0.0,
        },
        Limits {
            name: "unbounded",
            max_waiting: 0,
            max_waiting_per_tenant: 0,
            max_queue_seconds: 0.0,
            max_request_seconds: 0.0,
        },
    ];
    let results: Vec<ConfigResult> = configs
        .into_iter()
        .map(|l| {
            run_config(
                l,
                tmp.path(),
                &model_dir,
                running,
                &body,
                max_tokens as u64,
                window,
            )
        })
        .collect();

    println!();
    println!(
        "{:<13} {:<5} {:>7} {:>10} {:>9} {:>6} {:>9} {:>9} {:>9} {:>8} {:>6} {:>7} {:>8} {:>8}",
        "config",
        "phase",
        "clients",
        "goodput",
        "completed",
        "short",
        "TTFT p50",
        "TTFT p99",
        "429 over",
        "429 q-to",
        "errors",
        "drain",
        "hlth p99",
        "hlth max"
    );
    println!(
        "{:<13} {:<5} {:>7} {:>10} {:>9} {:>6} {:>9} {:>9} {:>9} {:>8} {:>6} {:>7} {:>8} {:>8}",
        "", "", "", "tok/s", "", "", "ms", "ms", "", "", "", "s", "ms", "ms"
    );
    for c in &results {
        for (label, r) in &c.phases {
            let t = &r.tally;
            println!(
                "{:<13} {:<5} {:>7} {:>10.1} {:>9} {:>6} {:>9.0} {:>9.0} {:>9} {:>8} {:>6} {:>7.1} {:>8.1} {:>8.1}",
                c.limits.name,
                label,
                r.clients,
                r.goodput(window),
                t.completed,
                t.short,
                percentile(&t.ttft, 0.5) * 1000.0,
                percentile(&t.ttft, 0.99) * 1000.0,
                t.overloaded,
                t.queue_timeout,
                t.errors.len() + r.health_errors,
                r.drain_s,
                percentile(&r.health_ms, 0.99),
                max(&r.health_ms),
            );
        }
    }
    println!();
    for c in &results {
        let (one, four) = (&c.phases[0].1, &c.phases[1].1);
        let goodput = four.goodput(window) / one.goodput(window);
        let ttft = percentile(&four.tally.ttft, 0.99) / percentile(&one.tally.ttft, 0.99);
        let health = max(&one.health_ms).max(max(&four.health_ms));
        let errors = one.tally.errors.len()
            + four.tally.errors.len()
            + one.health_errors
            + four.health_errors;
        let role = if c.limits.name == "backpressure" {
            "goals"
        } else {
            "for comparison"
        };
        println!("{} ({role}):", c.limits.name);
        println!(
            "  goodput 4x/1x      {goodput:>7.3}   (goal >= 0.90)  {}",
            verdict(goodput >= 0.90)
        );
        println!(
            "  p99 TTFT 4x/1x     {ttft:>7.3}   (goal <= 2.0)   {}",
            verdict(ttft <= 2.0)
        );
        println!(
            "  /health max     {health:>7.1} ms (goal < 100 ms) {}",
            verdict(health < 100.0)
        );
        println!(
            "  other errors       {errors:>7}   (goal 0)        {}",
            verdict(errors == 0)
        );
    }
}
