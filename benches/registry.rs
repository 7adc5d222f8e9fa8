//! Cold adapter time-to-first-token from the object-store registry vs from local disk, on
//! the runtime benchmark model (`bench_model.json`) with an S3-compatible server (moto) on
//! loopback, in process:
//!
//! 1. local: a server whose adapters directory holds the adapters; each adapter's first
//!    request (1 token) reads, validates and places it;
//! 2. store: a server with an empty adapters directory and the adapters published to the
//!    registry; each adapter's first request looks it up, downloads and verifies it into the
//!    disk cache, then does what (1) does;
//! 3. reference: a plain download of the same files from the same store (the store's
//!    bandwidth on loopback).
//!
//! Also the warm time-to-first-token (adapter already in device slots) and a warm request
//! on the store server (one look-up in the store per request). Reports medians and ratios.
//!
//! Knobs: `ESFT_BENCH_LAYERS` (8), `ESFT_REGISTRY_ADAPTERS` (8). Needs `moto_server`
//! (`ESFT_MOTO_SERVER`, `venv/bin/moto_server` or `PATH`).

mod common;
#[path = "../tests/common/s3.rs"]
mod s3;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{env_usize, median, write_random_adapter, write_served_bench_model};
use esft::adapter::remote::Remote;
use esft::adapter::{AdapterKey, BaseModel};
use esft::server::config::ServerConfig;
use esft::server::{load, router, AppState};
use esft::store::{Store, Timeouts};
use http_body_util::BodyExt;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tower::ServiceExt;

/// Seconds one request for 1 token of `model` takes.
async fn ttft(app: &axum::Router, model: &str) -> f64 {
    let body = json!({"model": model, "prompt": [5, 6, 7, 8, 9, 10, 11, 12], "max_tokens": 1,
                      "temperature": 0, "ignore_eos": true});
    let req = Request::post("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    let t = Instant::now();
    let resp = app.clone().oneshot(req).await.expect("response");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(
        status,
        StatusCode::OK,
        "{model}: {}",
        String::from_utf8_lossy(&bytes)
    );
    t.elapsed().as_secs_f64()
}

fn serve(config: &ServerConfig) -> axum::Router {
    let state = Arc::new(AppState::new(config.clone()).expect("state"));
    state.set_served(Arc::new(load(config).expect("load")));
    router(state)
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").metadata().expect("metadata").len())
        .sum()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let layers = env_usize("ESFT_BENCH_LAYERS", 8);
    let n = env_usize("ESFT_REGISTRY_ADAPTERS", 8);
    let Some(s3) = s3::S3Server::start() else {
        eprintln!("no moto_server: nothing measured");
        return;
    };

    let tmp = tempfile::tempdir().expect("tempdir");
    let model_dir = tmp.path().join("model");
    write_served_bench_model(layers, &model_dir);
    let local = tmp.path().join("local");
    let base = BaseModel::open(&model_dir).expect("base");
    for i in 0..n {
        write_random_adapter(&base, &local, i, 900 + i as u64, 0.05);
    }
    drop(base);
    let bytes = dir_bytes(&local.join("task0"));

    // The registry, filled by a publisher that is not a server.
    let shared =
        Store::open_with(&s3.url("bench"), &Timeouts::default(), &s3.options()).expect("store");
    let remote = Remote::open(&shared).expect("registry");
    for i in 0..n {
        let name = format!("task{i}");
        remote
            .publish_blocking(&AdapterKey::shared(&name), &local.join(&name), false, false)
            .expect("publish");
    }

    // The reference: the same files, plainly downloaded from the same store.
    let plain = tmp.path().join("plain");
    let mut download = Vec::new();
    for i in 0..n {
        let name = format!("task{i}");
        let objects: Vec<String> = shared
            .list(&format!("adapters/objects/shared/{name}"))
            .await
            .expect("list")
            .into_iter()
            .map(|e| e.key)
            .collect();
        let t = Instant::now();
        for (j, key) in objects.iter().enumerate() {
            shared
                .download_file(key, &plain.join(format!("{i}-{j}")))
                .await
                .expect("download");
        }
        download.push(t.elapsed().as_secs_f64());
    }
    // The registry's part of a pull: look-up, download and verification.
    let mut fetch = Vec::new();
    for i in 0..n {
        let key = AdapterKey::shared(&format!("task{i}"));
        let dest = tmp.path().join("fetched").join(i.to_string());
        let t = Instant::now();
        let head = remote.head(&key).await.expect("head").expect("published");
        remote.fetch(&head, &dest).await.expect("fetch");
        fetch.push(t.elapsed().as_secs_f64());
    }

    let mut cfg = ServerConfig {
        model: Some(model_dir.clone()),
        adapters: local.clone(),
        ..ServerConfig::default()
    };
    cfg.fine_tuning.data_dir = tmp.path().join("data");
    cfg.validate().expect("config");
    let app = serve(&cfg);
    ttft(&app, "model").await;
    let base_ttft: Vec<f64> = {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(ttft(&app, "model").await);
        }
        v
    };
    let mut cold_local = Vec::new();
    for i in 0..n {
        cold_local.push(ttft(&app, &format!("task{i}")).await);
    }
    let mut warm_local = Vec::new();
    for i in 0..n {
        warm_local.push(ttft(&app, &format!("task{i}")).await);
    }
    drop(app);

    let mut cfg_store = cfg.clone();
    cfg_store.adapters = tmp.path().join("cache");
    cfg_store.store.url = s3.url("bench");
    cfg_store.store.options = s3.options().into_iter().collect();
    cfg_store.engine.adapter_lookup_ttl_seconds = 0.0;
    let app = serve(&cfg_store);
    ttft(&app, "model").await;
    let mut cold_store = Vec::new();
    for i in 0..n {
        cold_store.push(ttft(&app, &format!("task{i}")).await);
    }
    let mut warm_store = Vec::new();
    for i in 0..n {
        warm_store.push(ttft(&app, &format!("task{i}")).await);
    }

    let mb = bytes as f64 / 1e6;
    let (dl, cl, cs) = (median(download), median(cold_local), median(cold_store));
    let fe = median(fetch);
    let (wl, ws, b) = (median(warm_local), median(warm_store), median(base_ttft));
    println!(
        "{n} adapters of {mb:.1} MB ({layers} layers), moto S3 on loopback; medians:\n\
         | what | ms | vs local cold |\n|---|---|---|\n\
         | base model, 1 token | {:.1} | |\n\
         | warm adapter (on device), local | {:.1} | |\n\
         | warm adapter (on device), store (one look-up) | {:.1} | |\n\
         | cold adapter from local disk | {:.1} | 1.00 |\n\
         | cold adapter from the object store | {:.1} | {:.2} |\n\
         | plain download of the same bytes | {:.1} ({:.0} MB/s) | {:.2} |\n\
         | registry look-up + download + SHA-256 check | {:.1} | {:.2} |\n\
         store cold - local cold = {:.1} ms = {:.2} x the plain download",
        b * 1e3,
        wl * 1e3,
        ws * 1e3,
        cl * 1e3,
        cs * 1e3,
        cs / cl,
        dl * 1e3,
        mb / dl,
        dl / cl,
        fe * 1e3,
        fe / cl,
        (cs - cl) * 1e3,
        (cs - cl) / dl,
    );
}
