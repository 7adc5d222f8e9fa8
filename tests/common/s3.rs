//! A throwaway S3-compatible server for the tests that keep bytes in an object store: the
//! `moto` server (PyPI's `moto[server]`, installed by `.ci/run` into `venv/`) on a free
//! loopback port, with one bucket, killed on drop. Its contents live in its memory.
//!
//! The server is found through `ESFT_MOTO_SERVER` (a path), then `venv/bin/moto_server`,
//! then `PATH`. Where there is none the test skips the S3 part, and fails where
//! `ESFT_E2E_REQUIRED=1` (CI sets it; see `tools.rs`).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "tools.rs"]
mod tools;

/// The credentials the server is given (moto accepts any).
pub const ACCESS_KEY: &str = "esft-test";
pub const SECRET_KEY: &str = "esft-test-secret";
pub const REGION: &str = "us-east-1";

pub struct S3Server {
    child: Child,
    port: u16,
    bucket: String,
}

fn moto_server() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join("moto_server"));
    std::env::var_os("ESFT_MOTO_SERVER")
        .map(PathBuf::from)
        .into_iter()
        .chain([root.join("venv/bin/moto_server")])
        .chain(on_path)
        .find(|p| p.is_file())
}

/// One plain HTTP/1.1 request to the server; the response's status code.
fn request(port: u16, method: &str, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {out:?}")))
}

impl S3Server {
    /// A running server with an empty bucket, or `None` (the test skips S3) where none can
    /// be had; a failure where `ESFT_E2E_REQUIRED=1`.
    pub fn start() -> Option<Self> {
        let bin = tools::tool(
            "an S3-compatible server (moto_server)",
            moto_server(),
            "venv/bin/pip install 'moto[server]', or set ESFT_MOTO_SERVER",
        )?;
        match Self::start_with(&bin) {
            Ok(s) => Some(s),
            Err(e) => {
                assert!(
                    !tools::required(),
                    "moto_server is required (ESFT_E2E_REQUIRED=1) but did not start: {e}"
                );
                eprintln!("SKIPPED S3: moto_server did not start: {e}");
                None
            }
        }
    }

    fn start_with(bin: &PathBuf) -> Result<Self, String> {
        let port = TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("a free port: {e}"))?
            .port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let mut server = Self {
            child,
            port,
            bucket: "esft-test".to_string(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while request(port, "GET", "/").is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("moto_server exited: {status}"));
            }
            if Instant::now() > deadline {
                return Err("moto_server did not answer within 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let bucket = server.bucket.clone();
        server.create_bucket(&bucket)?;
        Ok(server)
    }

    /// Creates another bucket.
    pub fn create_bucket(&mut self, name: &str) -> Result<(), String> {
        match request(self.port, "PUT", &format!("/{name}")) {
            Ok(200) => Ok(()),
            other => Err(format!("creating bucket {name}: {other:?}")),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `s3://BUCKET/PREFIX`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{}", self.bucket, prefix.trim_matches('/'))
    }

    /// The environment a process needs to reach the server through `object_store`.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The same settings as `object_store` configuration keys (for [`esft::store::Store`]
    /// options in this process, where setting the environment would race other tests).
    pub fn options(&self) -> Vec<(String, String)> {
        [
            ("aws_access_key_id", ACCESS_KEY.to_string()),
            ("aws_secret_access_key", SECRET_KEY.to_string()),
            ("aws_region", REGION.to_string()),
            ("aws_endpoint", self.endpoint()),
            ("aws_allow_http", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Freezes the server (SIGSTOP): connections are accepted by the kernel but never
    /// answered, as with a store that stopped responding.
    pub fn pause(&self) {
        let _ = Command::new("kill")
            .args(["-STOP", &self.child.id().to_string()])
            .status();
    }

    /// Undoes [`pause`](Self::pause).
    pub fn resume(&self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.resume();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
