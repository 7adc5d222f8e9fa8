//! The adapter registry in an object store (moto's S3 on loopback), with two replicas in
//! process sharing it: an adapter installed through one is listed and served by the other
//! without a restart, with the greedy output of the same adapter applied from local disk;
//! a replacement propagates whole; a delete stops both; a tenant's private adapter stays
//! its own on both; while the store does not answer, cached adapters keep being served
//! and new loads fail with 503 `store_unavailable` until it is back; and names with no
//! adapter, or another tenant's private one, cost the store nothing while their miss is
//! cached, yet an install under such a name is found at once through the same replica and
//! within the miss TTL through another.

#[path = "common/app.rs"]
mod app;
mod common;
#[path = "common/s3.rs"]
mod s3;

use app::*;
use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::*;
use esft::adapter::{AdapterKey, AdapterRegistry};
use esft::server::config::ServerConfig;
use esft::store::{Store, Timeouts};
use s3::S3Server;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A replica on the `lite` fixture (with tenants) whose adapters live in the store under
/// `prefix`, looking every adapter up on every request (and caching no misses).
fn replica(s3: &S3Server, prefix: &str, edit: impl FnOnce(&mut ServerConfig)) -> Srv {
    server(true, |c| {
        c.store.url = s3.url(prefix);
        c.store.options = s3.options().into_iter().collect();
        c.engine.adapter_lookup_ttl_seconds = 0.0;
        c.engine.adapter_miss_ttl_seconds = 0.0;
        edit(c);
    })
}

/// Adapter directories of distinct weights (reference layout: uploads say `?name=`).
struct Adapters {
    dir: tempfile::TempDir,
}

impl Adapters {
    fn new(n: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..n {
            write_reference_adapter(
                &fixture("lite"),
                &dir.path().join(format!("v{i}")),
                &spec(30 + i),
            );
        }
        Self { dir }
    }

    fn path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("v{i}"))
    }

    fn tar(&self, i: usize) -> Vec<u8> {
        tar_of(&self.path(i), "")
    }
}

/// Copies an adapter directory into a replica's adapters directory as a local adapter.
fn install_locally(s: &Srv, from: &Path, name: &str) {
    let to = s.adapters.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

async fn greedy(s: &Srv, key: &str, model: &str) -> Result<String, (StatusCode, Value)> {
    let prompt = u32s(&reference("lite")["prompts"][1]["ids"]);
    let body = json!({"model": model, "prompt": prompt, "max_tokens": 8,
                      "temperature": 0, "ignore_eos": true});
    let (st, v) = s.post("/v1/completions", Some(key), body).await;
    if st == StatusCode::OK {
        Ok(v["choices"][0]["text"].as_str().unwrap().to_string())
    } else {
        Err((st, v))
    }
}

async fn upload(s: &Srv, key: &str, query: &str, tar: Vec<u8>) -> (StatusCode, Value) {
    let (st, b) = s
        .raw(
            Method::POST,
            &format!("/v1/adapters{query}"),
            Some(key),
            Body::from(tar),
        )
        .await;
    (st, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

async fn model_ids(s: &Srv, key: &str) -> Vec<String> {
    let (st, v) = s.get("/v1/models", Some(key)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[track_caller]
fn assert_not_found(got: &Result<String, (StatusCode, Value)>) {
    match got {
        Err(e) => assert_error(e, StatusCode::NOT_FOUND, Some("model")),
        Ok(t) => panic!("served {t:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_adapters_through_the_store() {
    let Some(s3) = S3Server::start() else { return };
    let r1 = replica(&s3, "shared", |_| {});
    let r2 = replica(&s3, "shared", |_| {});
    let a = Adapters::new(2);

    // What each adapter gives when applied from local disk (no store in the path).
    install_locally(&r2, &a.path(0), "local-v0");
    install_locally(&r2, &a.path(1), "local-v1");
    let want0 = greedy(&r2, ADMIN, "local-v0").await.unwrap();
    let want1 = greedy(&r2, ADMIN, "local-v1").await.unwrap();
    assert_ne!(want0, want1, "the two adapters must tell themselves apart");

    // Published through replica 1: listed by replica 2 before anything names it there,
    // then pulled and served on the first request that names it.
    let (st, v) = upload(&r1, ADMIN, "?name=remote-a&public=true", a.tar(0)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert!(model_ids(&r2, ACME).await.contains(&"remote-a".to_string()));
    let (st, listed) = r2.get("/v1/adapters", Some(ADMIN)).await;
    assert_eq!(st, StatusCode::OK, "{listed}");
    let entry = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "remote-a")
        .cloned()
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(entry["tiers"]["disk"], false, "{entry}");
    assert!(!r2.adapters.join("remote-a").exists());
    // Many first requests at once: one pull, one version, the same output for each.
    let firsts =
        futures_util::future::join_all((0..6).map(|_| greedy(&r2, ACME, "remote-a"))).await;
    for got in firsts {
        assert_eq!(got.unwrap(), want0);
    }
    assert!(r2.adapters.join("remote-a").is_dir());
    assert_eq!(greedy(&r1, ADMIN, "remote-a").await.unwrap(), want0);
    // Names no adapter has, asked for many times at once: each a 404, and no per-name state
    // stays behind (any client may name anything).
    let unknown = futures_util::future::join_all((0..40).map(|i| {
        let r2 = &r2;
        async move { greedy(r2, ACME, &format!("no-such-{}", i % 20)).await }
    }))
    .await;
    for got in &unknown {
        assert_not_found(got);
    }
    let registry = r2.state.served().unwrap().engine.registry.clone();
    assert_eq!(registry.names_in_lookup(), 0);

    // Replaced through replica 2: both serve the new content, whole.
    let (st, v) = upload(&r2, ADMIN, "?name=remote-a&public=true", a.tar(1)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(greedy(&r1, ADMIN, "remote-a").await.unwrap(), want1);
    assert_eq!(greedy(&r2, ACME, "remote-a").await.unwrap(), want1);
    // And back: a replica that served the newer content follows the store again.
    let (st, v) = upload(&r1, ADMIN, "?name=remote-a&public=true", a.tar(0)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(greedy(&r2, ADMIN, "remote-a").await.unwrap(), want0);

    // Deleted through replica 1: neither serves it any more, and replica 2's copy goes.
    let (st, v) = r1
        .call(Method::DELETE, "/v1/adapters/remote-a", Some(ADMIN), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_not_found(&greedy(&r1, ADMIN, "remote-a").await);
    assert_not_found(&greedy(&r2, ADMIN, "remote-a").await);
    assert!(!model_ids(&r2, ADMIN)
        .await
        .contains(&"remote-a".to_string()));
    assert!(!r2.adapters.join("remote-a").exists());

    // Installed through replica 1's gateway route from a server path: replica 2 serves it.
    let path = a.path(1);
    let got = r1
        .post(
            "/v1/load_lora_adapter",
            Some(ADMIN),
            json!({"lora_name": "placed", "lora_path": path.to_str().unwrap()}),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(greedy(&r2, GLOBEX, "placed").await.unwrap(), want1);
    // A first install of a name the store has is refused on the other replica too.
    let again = r2
        .post(
            "/v1/load_lora_adapter",
            Some(ADMIN),
            json!({"lora_name": "placed", "lora_path": a.path(0).to_str().unwrap()}),
        )
        .await;
    assert_error(&again, StatusCode::BAD_REQUEST, None);
    assert_eq!(greedy(&r1, ADMIN, "placed").await.unwrap(), want1);

    // Published by a process without an engine (a training worker) for a tenant.
    let store = Store::open_with(&s3.url("shared"), &Timeouts::default(), &s3.options()).unwrap();
    let worker_dir = tempfile::tempdir().unwrap();
    let (wd, src) = (worker_dir.path().to_path_buf(), a.path(0));
    let published = tokio::task::spawn_blocking(move || {
        let reg = AdapterRegistry::open_publisher(&wd.join("cache"), &fixture("lite"), &store)?;
        let staging = reg.store.staging().unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, staging.dir().join(p.file_name().unwrap())).unwrap();
        }
        reg.check_servable(&staging.dir(), "trained", 1 << 30)
            .unwrap();
        reg.install_new(&AdapterKey::of_tenant("globex", "trained"), staging, false)
            .map(|d| d.version.id())
    })
    .await
    .unwrap();
    assert!(published.is_ok(), "{published:?}");
    assert_eq!(greedy(&r1, GLOBEX, "trained").await.unwrap(), want0);
    assert_eq!(greedy(&r2, GLOBEX, "trained").await.unwrap(), want0);
    assert_not_found(&greedy(&r2, ACME, "trained").await);

    // A tenant's private adapter: its own on both replicas, nobody else's on either.
    let (st, v) = upload(&r1, ACME, "?name=mine", a.tar(1)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    for r in [&r1, &r2] {
        assert_not_found(&greedy(r, GLOBEX, "mine").await);
        assert_not_found(&greedy(r, GLOBEX, "acme/mine").await);
        let ids = model_ids(r, GLOBEX).await;
        assert!(!ids.iter().any(|i| i.contains("mine")), "{ids:?}");
    }
    // Another tenant's request pulled nothing.
    assert!(!r2.adapters.join("@acme/mine").exists());
    let (st, _) = r2
        .call(Method::DELETE, "/v1/adapters/acme/mine", Some(GLOBEX), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert!(model_ids(&r2, ACME).await.contains(&"mine".to_string()));
    assert_eq!(greedy(&r2, ACME, "mine").await.unwrap(), want1);
    assert_eq!(greedy(&r2, ADMIN, "acme/mine").await.unwrap(), want1);

    // The store holds refs and immutable content-addressed objects only.
    let store = Store::open_with(&s3.url("shared"), &Timeouts::default(), &s3.options()).unwrap();
    let keys: Vec<String> = store
        .list("adapters")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert!(
        keys.iter()
            .any(|k| k.starts_with("adapters/refs/tenant/acme/mine/")),
        "{keys:?}"
    );
    assert!(keys
        .iter()
        .all(|k| k.starts_with("adapters/refs/") || k.starts_with("adapters/objects/")));
    // Nothing is left of the deleted adapter's content.
    assert!(
        !keys
            .iter()
            .any(|k| k.starts_with("adapters/objects/shared/remote-a/")),
        "{keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_keeps_cached_adapters_served_and_fails_new_loads_with_503() {
    let Some(s3) = S3Server::start() else { return };
    let short = |c: &mut ServerConfig| {
        c.store.connect_timeout_seconds = 1.0;
        c.store.request_timeout_seconds = 1.0;
        c.store.retry_timeout_seconds = 1.0;
    };
    let r1 = replica(&s3, "faults", short);
    let r2 = replica(&s3, "faults", short);
    let a = Adapters::new(2);
    for (i, name) in ["resident", "cold"].iter().enumerate() {
        let (st, v) = upload(&r1, ADMIN, &format!("?name={name}"), a.tar(i)).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    let resident = greedy(&r2, ADMIN, "resident").await.unwrap();

    s3.pause();
    let t = Instant::now();
    // Cached: still served.
    assert_eq!(greedy(&r2, ADMIN, "resident").await.unwrap(), resident);
    assert_eq!(greedy(&r2, ADMIN, "resident").await.unwrap(), resident);
    // Never pulled here: a clear 503.
    let cold = greedy(&r2, ADMIN, "cold").await.unwrap_err();
    assert_error(&cold, StatusCode::SERVICE_UNAVAILABLE, None);
    assert_eq!(cold.1["error"]["code"], "store_unavailable", "{}", cold.1);
    // Publishing needs the store.
    let (st, v) = upload(&r1, ADMIN, "?name=late", a.tar(1)).await;
    assert_error(&(st, v.clone()), StatusCode::SERVICE_UNAVAILABLE, None);
    assert_eq!(v["error"]["code"], "store_unavailable", "{v}");
    // Listings fall back to what the replica has.
    assert!(model_ids(&r2, ADMIN)
        .await
        .contains(&"resident".to_string()));
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    s3.resume();

    // Back: the cold adapter loads, and the refused upload goes through when retried.
    let mut got = greedy(&r2, ADMIN, "cold").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.is_err() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        got = greedy(&r2, ADMIN, "cold").await;
    }
    let cold = got.unwrap();
    assert_ne!(cold, resident);
    assert_eq!(greedy(&r1, ADMIN, "cold").await.unwrap(), cold);
    let (st, v) = upload(&r1, ADMIN, "?name=late", a.tar(1)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(greedy(&r2, ADMIN, "late").await.unwrap(), cold);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_cache_keeps_to_its_budget() {
    let Some(s3) = S3Server::start() else { return };
    let a = Adapters::new(2);
    let size: u64 = std::fs::read_dir(a.path(0))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let r1 = replica(&s3, "budget", |_| {});
    // Room for one adapter and a half.
    let r2 = replica(&s3, "budget", |c| c.engine.disk_cache_bytes = size * 3 / 2);
    for (i, name) in ["one", "two"].iter().enumerate() {
        let (st, v) = upload(&r1, ADMIN, &format!("?name={name}"), a.tar(i)).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    let one = greedy(&r2, ADMIN, "one").await.unwrap();
    assert!(r2.adapters.join("one").is_dir());
    // Out of the device slots, nothing holds it.
    let got = r2
        .post(
            "/v1/unload_lora_adapter",
            Some(ADMIN),
            json!({"lora_name": "one"}),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let two = greedy(&r2, ADMIN, "two").await.unwrap();
    // Pulling `two` evicted the least recently used `one` from disk; it comes back.
    assert!(r2.adapters.join("two").is_dir());
    let mut gone = false;
    for _ in 0..50 {
        if !r2.adapters.join("one").exists() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the least recently used adapter stayed on disk");
    assert_eq!(greedy(&r2, ADMIN, "one").await.unwrap(), one);
    assert_ne!(one, two);
    assert!(r2.adapters.join("one").is_dir());
}

/// Requests a replica's adapter registry has sent to the store.
fn store_requests(s: &Srv) -> u64 {
    s.state.served().unwrap().engine.registry.store_requests()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_forbidden_names_cost_the_store_nothing_while_their_miss_is_cached() {
    let Some(s3) = S3Server::start() else { return };
    // Misses trusted for long (nothing here depends on timing), for a second, and not at all.
    let long = replica(&s3, "misses", |c| c.engine.adapter_miss_ttl_seconds = 600.0);
    let short = replica(&s3, "misses", |c| c.engine.adapter_miss_ttl_seconds = 1.0);
    let other = replica(&s3, "misses", |_| {});
    let a = Adapters::new(1);

    // A name nothing has, asked for again and again, one by one and all at once: one
    // look-up of each name it may mean (acme's own, then the shared one), no more.
    let before = store_requests(&long);
    for _ in 0..30 {
        assert_not_found(&greedy(&long, ACME, "no-such").await);
    }
    let at_once =
        futures_util::future::join_all((0..30).map(|_| greedy(&long, ACME, "no-such"))).await;
    for got in &at_once {
        assert_not_found(got);
    }
    let spent = store_requests(&long) - before;
    assert!(
        (1..=2).contains(&spent),
        "{spent} store requests for 60 look-ups of one unknown name"
    );
    // Without the cache, every request asks the store again.
    let before = store_requests(&other);
    for _ in 0..10 {
        assert_not_found(&greedy(&other, ACME, "no-such").await);
    }
    assert!(store_requests(&other) - before >= 10);

    // Another tenant's private adapter: the first request learns from the store that it is
    // private; every later one is refused before any request to the store.
    let (st, v) = upload(&other, ACME, "?name=secret", a.tar(0)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let before = store_requests(&long);
    assert_not_found(&greedy(&long, GLOBEX, "acme/secret").await);
    let first = store_requests(&long) - before;
    assert!(first <= 2, "{first}");
    let before = store_requests(&long);
    for _ in 0..30 {
        assert_not_found(&greedy(&long, GLOBEX, "acme/secret").await);
    }
    assert_eq!(
        store_requests(&long) - before,
        0,
        "forbidden look-ups reached the store"
    );
    assert!(!long.adapters.join("@acme/secret").exists());
    // Its owner is not held back by that.
    let want = greedy(&other, ACME, "secret").await.unwrap();
    assert_eq!(greedy(&long, ACME, "secret").await.unwrap(), want);

    // A name asked for before it existed: installed through the same replica, it is found
    // at once, whatever the miss TTL.
    assert_not_found(&greedy(&long, ACME, "later").await);
    let (st, v) = upload(&long, ACME, "?name=later", a.tar(0)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(greedy(&long, ACME, "later").await.unwrap(), want);
    // Installed through another replica: found within the miss TTL (a second here); the
    // replica that trusts its miss for ten minutes still answers from it.
    assert_not_found(&greedy(&short, ACME, "elsewhere").await);
    assert_not_found(&greedy(&long, ACME, "elsewhere").await);
    let (st, v) = upload(&other, ACME, "?name=elsewhere", a.tar(0)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let installed = Instant::now();
    let mut got = greedy(&short, ACME, "elsewhere").await;
    while got.is_err() && installed.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        got = greedy(&short, ACME, "elsewhere").await;
    }
    assert_eq!(got.unwrap(), want);
    assert!(
        installed.elapsed() < Duration::from_secs(5),
        "{:?}",
        installed.elapsed()
    );
    assert_not_found(&greedy(&long, ACME, "elsewhere").await);
}
