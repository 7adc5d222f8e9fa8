//! The HTTP layer of a real `esft-serve serve` process, over raw TCP: request heads the
//! server refuses (too large, URI too long, malformed, never finished; on a fresh or a
//! keep-alive connection), bodies that stall, and prompts too long to tokenize. Every
//! refusal must carry an OpenAI-shaped JSON error body, and the server must stay responsive.

mod common;
#[path = "common/http.rs"]
mod http;

use common::fixture;
use http::{request, Server};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_esft-serve");

/// Timeouts in the test configuration (seconds).
const HEAD_TIMEOUT: f64 = 1.0;
const BODY_TIMEOUT: f64 = 1.0;

struct Setup {
    _dir: tempfile::TempDir,
    server: Server,
}

fn start() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let config: PathBuf = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            r#"
model = {model:?}
adapters = {adapters:?}
[fine_tuning]
data_dir = {data:?}
[limits]
max_body_bytes = 8388608
header_read_timeout_seconds = {HEAD_TIMEOUT}
body_read_timeout_seconds = {BODY_TIMEOUT}
"#,
            model = fixture("lite").to_str().unwrap(),
            adapters = dir.path().join("adapters").to_str().unwrap(),
            data = dir.path().join("data").to_str().unwrap(),
        ),
    )
    .unwrap();
    let server = Server::start(std::path::Path::new(BIN), &config, &[]);
    Setup { _dir: dir, server }
}

/// A response read off a raw connection.
#[derive(Debug)]
struct Raw {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Raw {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    /// Checks the OpenAI error shape and returns `error.code`.
    fn error_code(&self) -> String {
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].is_string(), "{v}");
        assert!(e["type"].is_string(), "{v}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
        assert!(
            self.head
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{}",
            self.head
        );
        e["code"].as_str().unwrap_or_default().to_string()
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Writes `bytes` from another thread (the server may stop reading, and answer, before
/// all of them are sent) and returns the stream to read the answer from.
fn send_raw(addr: SocketAddr, bytes: Vec<u8>) -> TcpStream {
    let s = connect(addr);
    let mut w = s.try_clone().unwrap();
    std::thread::spawn(move || {
        let _ = w.write_all(&bytes);
    });
    s
}

/// Reads one response (a head, then a `content-length` body).
fn read_response(s: &mut TcpStream) -> Raw {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).expect("reading a response");
        assert!(
            n > 0,
            "closed before a response: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no content-length in {head:?}"));
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    Raw { status, head, body }
}

/// The server closes the connection (after its answer).
fn assert_closed(s: &mut TcpStream) {
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => assert!(
            rest.is_empty(),
            "more after the answer: {:?}",
            String::from_utf8_lossy(&rest)
        ),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            "{e}"
        ),
    }
}

/// `/health` answers at once.
fn assert_healthy(addr: SocketAddr) {
    let t0 = Instant::now();
    let r = request(addr, "GET", "/health", &[], None).unwrap();
    assert_eq!(r.status, 200);
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "/health took {:?}",
        t0.elapsed()
    );
}

fn refused(addr: SocketAddr, bytes: Vec<u8>) -> (Raw, Duration) {
    let t0 = Instant::now();
    let mut s = send_raw(addr, bytes);
    let r = read_response(&mut s);
    let took = t0.elapsed();
    assert!(
        r.head.to_ascii_lowercase().contains("connection: close"),
        "{}",
        r.head
    );
    assert_closed(&mut s);
    (r, took)
}

#[test]
fn headers_of_200_kib_get_431_with_a_json_body() {
    let s = start();
    let mut head = b"GET /health HTTP/1.1\r\nhost: x\r\n".to_vec();
    for i in 0..50 {
        head.extend_from_slice(format!("x-fill-{i}: {}\r\n", "a".repeat(4096)).as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    assert!(head.len() > 200 << 10);
    let (r, _) = refused(s.server.addr, head);
    assert_eq!(r.status, 431);
    assert_eq!(r.error_code(), "headers_too_large");
    // More fields than hyper takes, each small.
    let mut head = b"GET /health HTTP/1.1\r\n".to_vec();
    for i in 0..150 {
        head.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    let (r, _) = refused(s.server.addr, head);
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (431, "headers_too_large")
    );
    assert_healthy(s.server.addr);
}

#[test]
fn a_100_kib_uri_gets_414_with_a_json_body() {
    let s = start();
    let head = format!(
        "GET /health?{} HTTP/1.1\r\nhost: x\r\n\r\n",
        "a".repeat(100 << 10)
    );
    let (r, _) = refused(s.server.addr, head.into_bytes());
    assert_eq!(r.status, 414);
    assert_eq!(r.error_code(), "uri_too_long");
    assert!(!r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("aaaa"));
    assert_healthy(s.server.addr);
}

#[test]
fn a_garbage_request_line_gets_400_with_a_json_body() {
    let s = start();
    for garbage in [
        b"THIS IS NOT HTTP\r\n\r\n".to_vec(),
        b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n".to_vec(),
        // The start of a TLS handshake, as a client that got the scheme wrong sends it.
        vec![
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ],
        b"POST /v1/completions HTTP/1.1\r\ncontent-length: 12, 13\r\n\r\n".to_vec(),
    ] {
        let (r, _) = refused(s.server.addr, garbage);
        assert_eq!(r.status, 400);
        assert_eq!(r.error_code(), "malformed_request");
    }
    assert_healthy(s.server.addr);
}

#[test]
fn a_head_that_never_completes_gets_408_and_a_silent_connection_is_closed() {
    let s = start();
    let (r, took) = refused(
        s.server.addr,
        b"GET /health HTTP/1.1\r\nhost: x\r\n".to_vec(),
    );
    assert_eq!(r.status, 408);
    assert_eq!(r.error_code(), "header_read_timeout");
    assert!(
        took >= Duration::from_secs_f64(HEAD_TIMEOUT * 0.9) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // Nothing sent at all: closed without an answer.
    let t0 = Instant::now();
    let mut c = connect(s.server.addr);
    assert_closed(&mut c);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_healthy(s.server.addr);
}

#[test]
fn a_json_body_that_stops_midway_gets_408() {
    let s = start();
    let body = br#"{"model": "lite", "prompt": "hello", "max_tok"#;
    let mut c = connect(s.server.addr);
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len() + 20
    );
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(body).unwrap();
    let t0 = Instant::now();
    let r = read_response(&mut c);
    let took = t0.elapsed();
    assert_eq!(r.status, 408);
    assert_eq!(r.error_code(), "body_read_timeout");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_closed(&mut c);
    assert_healthy(s.server.addr);
}

#[test]
fn a_bad_head_on_a_keep_alive_connection_gets_a_json_answer_too() {
    let s = start();
    let addr = s.server.addr;
    let mut c = connect(addr);
    c.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut c).status, 200);
    let big = format!(
        "GET /health HTTP/1.1\r\nx: {}\r\n\r\n",
        "a".repeat(100 << 10)
    );
    let mut w = c.try_clone().unwrap();
    std::thread::spawn(move || {
        let _ = w.write_all(big.as_bytes());
    });
    let r = read_response(&mut c);
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (431, "headers_too_large")
    );
    assert_closed(&mut c);

    // Pipelined: a good request and garbage in one write; the good one is answered first.
    let mut c = connect(addr);
    c.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\nNOT HTTP AT ALL\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut c).status, 200);
    let r = read_response(&mut c);
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "malformed_request")
    );
    assert_closed(&mut c);
    assert_healthy(addr);
}

#[test]
fn requests_with_bodies_keep_their_connection_alive() {
    let s = start();
    let mut c = connect(s.server.addr);
    let body = json!({"model": "lite", "prompt": "hello", "max_tokens": 1}).to_string();
    // A fixed-length body, a chunked one (extension and trailer included), then a GET.
    let fixed = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let (a, b) = body.split_at(10);
    let chunked = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x};x=1\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\nx-trailer: 1\r\n\r\n",
        a.len(),
        b.len()
    );
    for req in [
        fixed,
        chunked,
        "GET /health HTTP/1.1\r\nhost: x\r\n\r\n".to_string(),
    ] {
        c.write_all(req.as_bytes()).unwrap();
        let r = read_response(&mut c);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
}

#[test]
fn a_4_mib_prompt_is_refused_by_its_length_at_once() {
    let s = start();
    let addr = s.server.addr;
    let text = "a".repeat(4 << 20);
    let cases = [
        (
            "/v1/completions",
            json!({"model": "lite", "prompt": text, "max_tokens": 1}),
            "prompt",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "lite", "max_tokens": 1,
                   "messages": [{"role": "user", "content": text}]}),
            "messages",
        ),
    ];
    for (path, body, param) in &cases {
        let body = body.to_string();
        // Three at once, as in the report, while /health must stay fast.
        let t0 = Instant::now();
        let clients: Vec<_> = (0..3)
            .map(|_| {
                let body = body.clone();
                let path = path.to_string();
                std::thread::spawn(move || {
                    request(addr, "POST", &path, &[], Some(body.as_bytes())).unwrap()
                })
            })
            .collect();
        assert_healthy(addr);
        for c in clients {
            let r = c.join().unwrap();
            assert_eq!(r.status, 400, "{}", r.text());
            let v = r.json();
            assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
            assert_eq!(v["error"]["param"], *param, "{v}");
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }
    assert_healthy(addr);
}
