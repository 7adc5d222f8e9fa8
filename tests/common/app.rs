//! The HTTP API in process: a server on a fixture model with tenants, driven through the
//! router without sockets, and helpers for its answers.
#![allow(dead_code)]

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use esft::server::auth::hash_key;
use esft::server::config::{ServerConfig, TenantConfig};
use esft::server::{load, router, AppState};
use http_body_util::BodyExt;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tower::ServiceExt;

use crate::common::*;

pub const ADMIN: &str = "admin-key";
pub const ACME: &str = "acme-key";
pub const GLOBEX: &str = "globex-key";

pub fn spec(i: u64) -> AdapterSpec {
    let e = |k: u64| ((i * 5 + k * 3) % 16) as usize;
    AdapterSpec {
        experts: vec![(1, vec![e(0), e(1), e(2)]), (2, vec![e(3), e(4)])],
        shared: false,
        seed: 10 + i,
    }
}

pub struct Srv {
    pub app: Router,
    pub state: Arc<AppState>,
    pub adapters: PathBuf,
    pub _dir: tempfile::TempDir,
}

/// A server on the `lite` fixture with adapters `open-a`, `acme-a` (acme's), `globex-a`
/// (globex's) and `shared` (public), and keys when `keyed`.
pub fn server(keyed: bool, edit: impl FnOnce(&mut ServerConfig)) -> Srv {
    server_on("lite", keyed, edit)
}

/// [`server`] on the fixture `model`.
pub fn server_on(model: &str, keyed: bool, edit: impl FnOnce(&mut ServerConfig)) -> Srv {
    let dir = tempfile::tempdir().unwrap();
    let adapters = dir.path().join("adapters");
    for (i, name) in ["open-a", "acme-a", "globex-a", "shared"]
        .iter()
        .enumerate()
    {
        write_native_adapter(&fixture(model), &adapters.join(name), &spec(i as u64));
    }
    let mut config = ServerConfig {
        model: Some(fixture(model)),
        adapters: adapters.clone(),
        ..ServerConfig::default()
    };
    config.fine_tuning.data_dir = dir.path().join("data");
    if keyed {
        config.auth.admin_key_sha256 = vec![hash_key(ADMIN)];
        config.auth.public_adapters = vec!["shared".into()];
        config.auth.tenants = vec![
            TenantConfig {
                name: "acme".into(),
                key_sha256: vec![hash_key(ACME)],
                adapters: vec!["acme-a".into()],
                ..TenantConfig::default()
            },
            TenantConfig {
                name: "globex".into(),
                key_sha256: vec![hash_key(GLOBEX)],
                adapters: vec!["globex-a".into()],
                ..TenantConfig::default()
            },
        ];
    }
    edit(&mut config);
    config.validate().unwrap();
    let state = Arc::new(AppState::new(config.clone()).unwrap());
    state.set_served(Arc::new(load(&config).unwrap()));
    Srv {
        app: router(state.clone()),
        state,
        adapters,
        _dir: dir,
    }
}

impl Srv {
    pub async fn raw(
        &self,
        method: Method,
        uri: &str,
        key: Option<&str>,
        body: Body,
    ) -> (StatusCode, Vec<u8>) {
        self.send(method, uri, key, None, body).await
    }

    /// A request with an optional key and content type: its status and body bytes.
    pub async fn send(
        &self,
        method: Method,
        uri: &str,
        key: Option<&str>,
        content_type: Option<&str>,
        body: Body,
    ) -> (StatusCode, Vec<u8>) {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        if let Some(c) = content_type {
            b = b.header("content-type", c);
        }
        let resp = self
            .app
            .clone()
            .oneshot(b.body(body).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (status, bytes)
    }

    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let body = body.map_or_else(Body::empty, |v| Body::from(v.to_string()));
        let (s, bytes) = self.raw(method, uri, key, body).await;
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (s, v)
    }

    pub async fn post(&self, uri: &str, key: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, uri, key, Some(body)).await
    }

    pub async fn get(&self, uri: &str, key: Option<&str>) -> (StatusCode, Value) {
        self.call(Method::GET, uri, key, None).await
    }

    /// A GET whose body is text (e.g. `/metrics`).
    pub async fn get_text(&self, uri: &str, key: Option<&str>) -> (StatusCode, String) {
        let (s, bytes) = self.raw(Method::GET, uri, key, Body::empty()).await;
        (s, String::from_utf8_lossy(&bytes).into_owned())
    }
}

pub const BOUNDARY: &str = "esft-test-boundary-7MA4YWxkTrZu0gW";

/// A multipart/form-data body: `(name, file name, bytes)` per part.
pub fn form(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, file, bytes) in parts {
        b.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match file {
            Some(f) => b.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => b.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        b.extend_from_slice(bytes);
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    b
}

/// A status and a body read as JSON (a string when it is not).
pub fn json(r: (StatusCode, Vec<u8>)) -> (StatusCode, Value) {
    let v = serde_json::from_slice(&r.1)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&r.1).into_owned()));
    (r.0, v)
}

impl Srv {
    /// `POST /v1/files` with these multipart parts.
    pub async fn upload_parts(
        &self,
        key: Option<&str>,
        parts: &[(&str, Option<&str>, &[u8])],
    ) -> (StatusCode, Value) {
        let ct = format!("multipart/form-data; boundary={BOUNDARY}");
        json(
            self.send(
                Method::POST,
                "/v1/files",
                key,
                Some(&ct),
                Body::from(form(parts)),
            )
            .await,
        )
    }

    /// Uploads `bytes` as a fine-tuning file.
    pub async fn upload(&self, key: Option<&str>, bytes: &[u8]) -> (StatusCode, Value) {
        self.upload_parts(
            key,
            &[
                ("purpose", None, b"fine-tune"),
                ("file", Some("train.jsonl"), bytes),
            ],
        )
        .await
    }
}

/// Asserts an OpenAI-shaped error body with this status (and param, when given).
#[track_caller]
pub fn assert_error(got: &(StatusCode, Value), status: StatusCode, param: Option<&str>) {
    let (s, v) = got;
    assert_eq!(*s, status, "{v}");
    let e = v["error"]
        .as_object()
        .unwrap_or_else(|| panic!("not an error body: {v}"));
    let mut keys: Vec<&str> = e.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["code", "message", "param", "type"], "{v}");
    assert!(!e["message"].as_str().unwrap().is_empty());
    assert!(e["type"].is_string());
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{v}");
    }
}

/// A tar of an adapter directory's files.
pub fn tar_of(dir: &Path, prefix: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = format!("{prefix}{}", p.file_name().unwrap().to_str().unwrap());
        b.append_path_with_name(&p, name).unwrap();
    }
    b.into_inner().unwrap()
}

pub fn leftovers(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}
