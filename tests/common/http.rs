//! A real `esft-serve serve` process on loopback, and a small blocking HTTP/1.1 client
//! (fixed-length and chunked bodies, server-sent events read as they arrive).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// Everything the server wrote to stderr so far.
    pub log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `bin serve --config CONFIG --port 0 ARGS...` and waits until it is ready.
    pub fn start(bin: &Path, config: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting esft-serve");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        let _ = tx.send(rest.trim().to_string());
                    }
                    log.lock().unwrap().push_str(&line);
                    log.lock().unwrap().push('\n');
                }
            });
        }
        let addr: SocketAddr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => strip_ansi(&a).parse().expect("listening address"),
            Err(_) => {
                let _ = child.kill();
                panic!("the server did not start:\n{}", log.lock().unwrap());
            }
        };
        let s = Server { child, addr, log };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            if let Ok(r) = request(s.addr, "GET", "/ready", &[], None) {
                if r.status == 200 {
                    return s;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the server never became ready:\n{}", s.log.lock().unwrap());
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -TERM failed");
    }

    /// Waits for the process to exit; `None` if it is still running after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Resident memory of the server process, in bytes (Linux).
    pub fn rss_bytes(&self) -> u64 {
        self.status_bytes("VmRSS:")
    }

    /// The most resident memory the server process has had since it started, or since
    /// [`Server::reset_peak_rss`] (Linux).
    pub fn peak_rss_bytes(&self) -> u64 {
        self.status_bytes("VmHWM:")
    }

    /// Starts counting the peak resident memory afresh from now (Linux 4.0 and later).
    pub fn reset_peak_rss(&self) {
        std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5")
            .expect("resetting the peak RSS through /proc/PID/clear_refs");
    }

    fn status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An HTTP/1.1 exchange on a new connection that is open until the body is read.
pub struct Exchange {
    reader: BufReader<TcpStream>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    chunked: bool,
    length: Option<usize>,
    /// Bytes of the current chunk not read yet.
    chunk_left: usize,
    finished: bool,
    /// SSE bytes received but not yet split into events.
    pending: Vec<u8>,
}

pub fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<Exchange> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "content-type: application/json\r\ncontent-length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    if let Some(b) = body {
        s.write_all(b)?;
    }
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut hs = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            hs.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let chunked = hs
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let length = hs
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok());
    Ok(Exchange {
        reader,
        status,
        headers: hs,
        chunked,
        length,
        chunk_left: 0,
        finished: false,
        pending: Vec::new(),
    })
}

impl Exchange {
    /// The next piece of the body (`None` at its end).
    pub fn next_bytes(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        if self.finished {
            return Ok(None);
        }
        if self.chunked {
            if self.chunk_left == 0 {
                let mut line = String::new();
                self.reader.read_line(&mut line)?;
                if line.trim().is_empty() {
                    // The CRLF after the previous chunk.
                    line.clear();
                    self.reader.read_line(&mut line)?;
                }
                let size =
                    usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                        .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
                if size == 0 {
                    self.finished = true;
                    return Ok(None);
                }
                self.chunk_left = size;
            }
            let mut buf = vec![0u8; self.chunk_left];
            self.reader.read_exact(&mut buf)?;
            self.chunk_left = 0;
            return Ok(Some(buf));
        }
        let mut buf = Vec::new();
        match self.length {
            Some(n) => {
                buf.resize(n, 0);
                self.reader.read_exact(&mut buf)?;
            }
            None => {
                self.reader.read_to_end(&mut buf)?;
            }
        }
        self.finished = true;
        Ok(Some(buf))
    }

    pub fn read_all(mut self) -> std::io::Result<Response> {
        let mut body = Vec::new();
        while let Some(b) = self.next_bytes()? {
            body.extend_from_slice(&b);
        }
        Ok(Response {
            status: self.status,
            headers: self.headers,
            body,
        })
    }

    /// The next server-sent event's `data:` payload; `None` at the end of the body.
    pub fn next_event(&mut self) -> std::io::Result<Option<String>> {
        loop {
            if let Some(at) = self.pending.windows(2).position(|w| w == b"\n\n") {
                let ev: Vec<u8> = self.pending.drain(..at + 2).collect();
                let ev = String::from_utf8_lossy(&ev);
                let data: Vec<&str> = ev
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                if data.is_empty() {
                    continue; // a comment (keep-alive)
                }
                return Ok(Some(data.join("\n")));
            }
            match self.next_bytes()? {
                Some(b) => self.pending.extend_from_slice(&b),
                None => return Ok(None),
            }
        }
    }
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<Response> {
    send(addr, method, path, headers, body)?.read_all()
}

/// `POST /v1/files` of `bytes` as `filename` with purpose `fine-tune`, as the bearer of
/// `key` (a multipart form, as the `openai` client sends it).
pub fn upload_for_fine_tuning(
    addr: SocketAddr,
    key: &str,
    filename: &str,
    bytes: &[u8],
) -> std::io::Result<Response> {
    let boundary = "esft-test-upload-boundary";
    let mut form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\r\n"
    )
    .into_bytes();
    form.extend_from_slice(bytes);
    form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let auth = format!("Bearer {key}");
    let ct = format!("multipart/form-data; boundary={boundary}");
    request(
        addr,
        "POST",
        "/v1/files",
        &[("authorization", &auth), ("content-type", &ct)],
        Some(&form),
    )
}
