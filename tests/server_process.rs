//! `esft-serve serve` as a process: the official `openai` Python client end to end,
//! `promtool check metrics` on a scrape after that traffic, SIGTERM draining, `hash-key`.
//!
//! The Python client and promtool come from `.ci/run` (a venv with `openai`, Debian's
//! `prometheus`). Where `ESFT_E2E_REQUIRED=1` (CI sets it) their absence fails the test;
//! elsewhere the test says what is missing and skips that part.

mod common;
#[path = "common/http.rs"]
mod http;
#[path = "common/tools.rs"]
mod tools;

use common::*;
use esft::server::auth::hash_key;
use http::{request, send, Server};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tools::{promtool, python_with_openai, tool};

const BIN: &str = env!("CARGO_BIN_EXE_esft-serve");
const ADMIN: &str = "e2e-admin-key";
const ACME: &str = "e2e-acme-key";
const GLOBEX: &str = "e2e-globex-key";

fn spec(i: u64) -> AdapterSpec {
    let e = |k: u64| ((i * 7 + k * 3) % 16) as usize;
    AdapterSpec {
        experts: vec![(1, vec![e(0), e(1)]), (2, vec![e(2), e(3), e(4)])],
        shared: false,
        seed: 50 + i,
    }
}

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    fn adapters(&self) -> PathBuf {
        self.dir.path().join("adapters")
    }
}

fn setup(extra: &str) -> Setup {
    setup_for("lite", extra)
}

/// A server config for the fixture `model`, with three adapters of it.
fn setup_for(model: &str, extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    for (i, n) in ["acme-a", "globex-a", "shared"].iter().enumerate() {
        write_native_adapter(
            &fixture(model),
            &dir.path().join("adapters").join(n),
            &spec(i as u64),
        );
    }
    let config = dir.path().join("server.toml");
    let text = format!(
        r#"
model = {model:?}
adapters = {adapters:?}
[fine_tuning]
data_dir = {data:?}
[auth]
admin_key_sha256 = ["{admin}"]
public_adapters = ["shared"]
[[auth.tenants]]
name = "acme"
key_sha256 = ["{acme}"]
adapters = ["acme-a"]
[[auth.tenants]]
name = "globex"
key_sha256 = ["{globex}"]
adapters = ["globex-a"]
{extra}
"#,
        model = fixture(model).to_str().unwrap(),
        adapters = dir.path().join("adapters").to_str().unwrap(),
        data = dir.path().join("data").to_str().unwrap(),
        admin = hash_key(ADMIN),
        acme = hash_key(ACME),
        globex = hash_key(GLOBEX),
    );
    std::fs::write(&config, text).unwrap();
    Setup { dir, config }
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

fn post(s: &Server, path: &str, key: &str, body: &Value) -> http::Response {
    let auth = bearer(key);
    request(
        s.addr,
        "POST",
        path,
        &[("authorization", &auth)],
        Some(body.to_string().as_bytes()),
    )
    .unwrap()
}

/// Runs `tests/e2e/openai_client.py` against `server` serving the fixture `model`.
fn openai_client_checks(python: &Path, server: &Server, setup: &Setup, model: &str) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/openai_client.py");
    let out = Command::new(python)
        .arg(&script)
        .env("ESFT_URL", server.url())
        .env("ESFT_BIN", BIN)
        .env("ESFT_MODEL_DIR", fixture(model))
        .env("ESFT_ADAPTERS_DIR", setup.adapters())
        .env("ESFT_BASE_ID", model)
        .env("ESFT_ADMIN_KEY", ADMIN)
        .env("ESFT_TENANT_KEY", ACME)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "{model}: the openai client checks failed:\n{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    assert!(stdout.contains("checks passed"), "{stdout}");
}

#[test]
fn openai_python_client_on_every_architecture() {
    let Some(python) = tool(
        "a Python with the `openai` package",
        python_with_openai(),
        "`python3 -m venv venv && venv/bin/pip install openai`, or set ESFT_PYTHON",
    ) else {
        return;
    };
    for model in ["deepseek-v3", "qwen3-moe", "olmoe"] {
        let setup = setup_for(model, "");
        let server = Server::start(Path::new(BIN), &setup.config, &[]);
        openai_client_checks(&python, &server, &setup, model);
    }
}

#[test]
fn openai_python_client_end_to_end_then_promtool() {
    let setup = setup("");
    let mut server = Server::start(Path::new(BIN), &setup.config, &[]);
    if let Some(python) = tool(
        "a Python with the `openai` package",
        python_with_openai(),
        "`python3 -m venv venv && venv/bin/pip install openai`, or set ESFT_PYTHON",
    ) {
        openai_client_checks(&python, &server, &setup, "lite");
    }
    // Traffic of our own too, so every family has samples whether or not Python ran:
    // base, an adapter, streamed, refused.
    for (model, stream) in [("lite", false), ("acme-a", true), ("nope", false)] {
        let r = post(
            &server,
            "/v1/completions",
            ACME,
            &json!({"model": model, "prompt": "hello", "max_tokens": 4, "stream": stream}),
        );
        assert_eq!(
            r.status,
            if model == "nope" { 404 } else { 200 },
            "{}",
            r.text()
        );
    }
    // With keys configured the metrics need the admin key.
    let anonymous = request(server.addr, "GET", "/metrics", &[], None).unwrap();
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
    let admin = bearer(ADMIN);
    let scrape = request(
        server.addr,
        "GET",
        "/metrics",
        &[("authorization", admin.as_str())],
        None,
    )
    .unwrap();
    assert_eq!(scrape.status, 200);
    let text = scrape.text();
    for name in [
        "esft_http_requests_total",
        "esft_prompt_tokens_total",
        "esft_generation_tokens_total",
        "esft_time_to_first_token_seconds_bucket",
        "esft_inter_token_latency_seconds_bucket",
        "esft_request_duration_seconds_bucket",
        "esft_requests_waiting",
        "esft_requests_running",
        "esft_batch_sequences",
        "esft_kv_cache_bytes",
        "esft_adapter_lookups_total",
        "esft_adapter_hits_total",
        "esft_adapter_misses_total",
        "esft_adapter_loads_total",
        "esft_adapter_evictions_total",
        "esft_adapter_load_duration_seconds_bucket",
        "esft_adapters_resident",
        "esft_adapter_resident_bytes",
        "esft_device_expert_slots_used",
        "esft_device_expert_slots",
        "esft_adapter_requests_running",
        "esft_adapter_requests_waiting",
    ] {
        assert!(
            text.contains(&format!("\n{name}")),
            "{name} missing:\n{text}"
        );
    }
    if let Some(promtool) = tool(
        "promtool",
        promtool(),
        "`apt-get install prometheus` (Debian)",
    ) {
        let path = setup.dir.path().join("scrape.txt");
        std::fs::write(&path, &text).unwrap();
        let out = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::fs::File::open(&path).unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    server.sigterm();
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}\n{}", server.log());
}

/// Starts a streamed request and reads until its first token.
fn start_stream(s: &Server, max_tokens: usize) -> http::Exchange {
    let body = json!({"model": "lite", "prompt": [5, 6, 7], "max_tokens": max_tokens,
                      "ignore_eos": true, "stream": true,
                      "stream_options": {"include_usage": true}})
    .to_string();
    let auth = bearer(ADMIN);
    let mut ex = send(
        s.addr,
        "POST",
        "/v1/completions",
        &[("authorization", &auth)],
        Some(body.as_bytes()),
    )
    .unwrap();
    assert_eq!(ex.status, 200);
    let first = ex.next_event().unwrap().expect("a first chunk");
    assert!(first.contains("\"text\""), "{first}");
    ex
}

/// Every remaining event of a stream, parsed (`[DONE]` as a string).
fn rest(mut ex: http::Exchange) -> Vec<Value> {
    let mut out = Vec::new();
    while let Some(d) = ex.next_event().unwrap() {
        out.push(serde_json::from_str(&d).unwrap_or(Value::String(d)));
    }
    out
}

#[test]
fn sigterm_lets_in_flight_requests_finish_and_refuses_new_ones() {
    let setup = setup("[shutdown]\ndrain_seconds = 60.0\n");
    let mut server = Server::start(Path::new(BIN), &setup.config, &[]);
    let ex = start_stream(&server, 400);
    let reader = std::thread::spawn(move || rest(ex));
    server.sigterm();
    // New connections are refused once the server drains.
    let t0 = Instant::now();
    let mut refused = false;
    while t0.elapsed() < Duration::from_secs(5) {
        if std::net::TcpStream::connect(server.addr).is_err() {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(refused, "the listener still accepts after SIGTERM");
    let events = reader.join().unwrap();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let usage = &events[events.len() - 2]["usage"];
    assert_eq!(usage["completion_tokens"], 400, "{events:?}");
    let finish: Vec<&Value> = events
        .iter()
        .filter_map(|e| e["choices"][0].get("finish_reason"))
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, [&json!("length")]);
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("exits after draining");
    assert!(status.success(), "{status:?}\n{}", server.log());
}

#[test]
fn sigterm_cancels_what_outlives_the_drain_deadline() {
    let setup = setup("[shutdown]\ndrain_seconds = 0.3\n");
    let mut server = Server::start(Path::new(BIN), &setup.config, &[]);
    let ex = start_stream(&server, 4000);
    let t0 = Instant::now();
    server.sigterm();
    let events = rest(ex);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let err = &events[events.len() - 2]["error"];
    assert_eq!(err["code"], "cancelled", "{events:?}");
    let status = server
        .wait_exit(Duration::from_secs(20))
        .expect("exits after the deadline");
    assert!(status.success(), "{status:?}\n{}", server.log());
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    assert!(server.log().contains("drain deadline reached"));
}

/// Hidden entries (staging, retired versions) of a directory.
fn hidden(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn an_install_killed_at_any_moment_leaves_the_old_or_the_new_adapter_whole() {
    let setup = setup("");
    let src = tempfile::tempdir().unwrap();
    let tars: Vec<Vec<u8>> = (0..2)
        .map(|i| {
            let d = src.path().join(i.to_string());
            write_reference_adapter(&fixture("lite"), &d, &spec(10 + i));
            let mut b = tar::Builder::new(Vec::new());
            b.append_dir_all(".", &d).unwrap();
            b.into_inner().unwrap()
        })
        .collect();
    let acme = bearer(ACME);
    let auth = [("authorization", acme.as_str())];
    let upload = |addr, name: &str, tar: &[u8]| {
        request(
            addr,
            "POST",
            &format!("/v1/adapters?name={name}"),
            &auth,
            Some(tar),
        )
    };
    let greedy = |s: &Server, model: &str| -> Option<String> {
        let r = post(
            s,
            "/v1/completions",
            ACME,
            &json!({"model": model, "prompt": [5, 9, 13, 2, 7, 11], "max_tokens": 8,
                    "temperature": 0, "ignore_eos": true}),
        );
        (r.status == 200).then(|| r.json()["choices"][0]["text"].as_str().unwrap().to_string())
    };
    let mut server = Server::start(Path::new(BIN), &setup.config, &[]);
    let mut want = Vec::new();
    for (i, tar) in tars.iter().enumerate() {
        let name = format!("ref-{i}");
        assert_eq!(upload(server.addr, &name, tar).unwrap().status, 201);
        want.push(greedy(&server, &name).unwrap());
    }
    assert_ne!(want[0], want[1]);
    assert_eq!(upload(server.addr, "x", &tars[0]).unwrap().status, 201);
    for round in 0..6u64 {
        // Replace `x` and kill the server (SIGKILL) somewhere along the way.
        let addr = server.addr;
        let tar = tars[(round as usize + 1) % 2].clone();
        let auth = acme.clone();
        let up = std::thread::spawn(move || {
            let _ = request(
                addr,
                "POST",
                "/v1/adapters?name=x",
                &[("authorization", auth.as_str())],
                Some(&tar),
            );
        });
        std::thread::sleep(Duration::from_millis(3 * round));
        drop(server);
        up.join().unwrap();
        server = Server::start(Path::new(BIN), &setup.config, &[]);
        let got = greedy(&server, "x").unwrap_or_else(|| panic!("round {round}: x is gone"));
        assert!(
            got == want[0] || got == want[1],
            "round {round}: neither version: {got:?}"
        );
        let root = setup.adapters();
        assert_eq!(hidden(&root), Vec::<String>::new(), "round {round}");
        assert_eq!(
            hidden(&root.join("@acme")),
            Vec::<String>::new(),
            "round {round}"
        );
    }
}

#[test]
fn open_mode_warns_and_hash_key_prints_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "model = {:?}\nadapters = {:?}\n[fine_tuning]\ndata_dir = {:?}\n",
            fixture("lite").to_str().unwrap(),
            dir.path().join("adapters").to_str().unwrap(),
            dir.path().join("data").to_str().unwrap()
        ),
    )
    .unwrap();
    let server = Server::start(Path::new(BIN), &config, &[]);
    assert!(
        server.log().contains("no API keys are configured"),
        "{}",
        server.log()
    );
    let r = request(server.addr, "GET", "/v1/models", &[], None).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["data"][0]["id"], "lite");
    drop(server);

    let mut child = Command::new(BIN)
        .arg("hash-key")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"my secret\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        hash_key("my secret")
    );
    // A config with a plain key instead of a digest is refused at start.
    std::fs::write(&config, "[auth]\nadmin_key_sha256 = [\"plain\"]\n").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config", config.to_str().unwrap(), "--model"])
        .arg(fixture("lite"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SHA-256"));
}

#[test]
fn serve_stops_with_a_message_when_the_files_database_cannot_open() {
    let dir = tempfile::tempdir().unwrap();
    // The data directory would have to be inside a regular file.
    let blocker = dir.path().join("not-a-directory");
    std::fs::write(&blocker, b"x").unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "model = {:?}\nadapters = {:?}\n[fine_tuning]\ndata_dir = {:?}\n",
            fixture("lite").to_str().unwrap(),
            dir.path().join("adapters").to_str().unwrap(),
            blocker.join("data").to_str().unwrap(),
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--host", "127.0.0.1", "--port", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("opening the fine-tuning data directory"),
        "{stderr}"
    );
}

/// `(name, file bytes)` of a hostile upload of about `total` bytes in lines of about
/// `line` bytes: every line holds what the training format does not use, in bulk.
fn hostile_files(total: usize, line: usize) -> Vec<(&'static str, Vec<u8>)> {
    let lines = |make: &dyn Fn(usize) -> String| -> Vec<u8> {
        let one = make(line);
        one.repeat((total / one.len()).max(1)).into_bytes()
    };
    let numbers = |len: usize| {
        let zeros = "0,".repeat((len - 40) / 2);
        format!("{{\"text\": \"a\", \"x\": [{}0]}}\n", zeros)
    };
    let messages = |len: usize| {
        let m = r#"{"role": "user", "content": ""},"#;
        format!(
            "{{\"messages\": [{}{{\"role\": \"assistant\", \"content\": \"x\"}}]}}\n",
            m.repeat((len - 80) / m.len())
        )
    };
    let nested = |len: usize| {
        let depth = (len - 40) / 2;
        format!(
            "{{\"text\": \"a\", \"x\": {}{}}}\n",
            "[".repeat(depth),
            "]".repeat(depth)
        )
    };
    vec![
        // The issue's shape: one line far over the line limit.
        ("one long line", numbers(total).into_bytes()),
        ("lines of numbers", lines(&numbers)),
        ("lines of tiny messages", lines(&messages)),
        ("lines of nested lists", lines(&nested)),
    ]
}

#[test]
fn hostile_uploads_raise_the_peak_rss_by_a_bounded_amount() {
    const LINE: usize = 4 << 20;
    const TOTAL: usize = 96 << 20;
    let s = setup(&format!("[limits]\nmax_line_bytes = {LINE}\n"));
    let server = Server::start(Path::new(BIN), &s.config, &[]);
    // 64 MiB plus a small multiple of the line limit.
    let bound = (64 << 20) + 4 * LINE as u64;
    for (name, bytes) in hostile_files(TOTAL, LINE - 64) {
        let before = server.rss_bytes();
        server.reset_peak_rss();
        let r = http::upload_for_fine_tuning(server.addr, ACME, "hostile.jsonl", &bytes).unwrap();
        let peak = server.peak_rss_bytes();
        let rise = peak.saturating_sub(before);
        eprintln!(
            "{name}: {} MiB uploaded, answered {}, peak RSS {} MiB, {:.1} MiB over the {} MiB before",
            bytes.len() >> 20,
            r.status,
            peak >> 20,
            rise as f64 / (1 << 20) as f64,
            before >> 20
        );
        let text = r.text();
        assert!(text.len() <= 4096, "{name}: {} bytes of answer", text.len());
        if name == "one long line" {
            assert_eq!(r.status, 400, "{name}: {text}");
            assert!(
                text.contains("line 1: the line is longer than the limit"),
                "{text}"
            );
        } else {
            assert_eq!(r.status, 200, "{name}: {text:.300}");
        }
        assert!(
            rise <= bound,
            "{name}: the peak RSS rose by {} MiB, more than {} MiB",
            rise >> 20,
            bound >> 20
        );
    }
}
