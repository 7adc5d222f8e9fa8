//! The adapter lifecycle under concurrency, tried as a hostile tenant would: installs,
//! replacements and deletes racing with requests for the same name, from one tenant or
//! several. Every request gets exactly the greedy output of the version it was bound to;
//! every answer is a clear 2xx or 4xx; what is left is one whole adapter or none.

#[path = "common/app.rs"]
mod app;
mod common;

use app::*;
use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Rounds of each race; each round takes a few tens of milliseconds.
const ROUNDS: usize = 20;

/// Adapter packages (tars) of distinct weights, in the reference layout (which carries no
/// name: every upload says `?name=`).
struct Packages {
    _dir: tempfile::TempDir,
    tars: Vec<Vec<u8>>,
}

fn packages(n: u64) -> Packages {
    let dir = tempfile::tempdir().unwrap();
    let tars = (0..n)
        .map(|i| {
            let d = dir.path().join(i.to_string()).join("x");
            write_reference_adapter(&fixture("lite"), &d, &spec(20 + i));
            tar_of(&d, "")
        })
        .collect();
    Packages { _dir: dir, tars }
}

fn body(model: &str) -> Value {
    let prompt = u32s(&reference("lite")["prompts"][1]["ids"]);
    json!({"model": model, "prompt": prompt, "max_tokens": 8,
           "temperature": 0, "ignore_eos": true})
}

/// The greedy text `model` gives `key`, or the status of the refusal.
async fn greedy(s: &Srv, key: &str, model: &str) -> Result<String, (StatusCode, Value)> {
    let (st, v) = s.post("/v1/completions", Some(key), body(model)).await;
    if st == StatusCode::OK {
        Ok(v["choices"][0]["text"].as_str().unwrap().to_string())
    } else {
        Err((st, v))
    }
}

async fn upload(s: &Srv, key: &str, query: &str, tar: &[u8]) -> (StatusCode, Value) {
    let (st, b) = s
        .raw(
            Method::POST,
            &format!("/v1/adapters{query}"),
            Some(key),
            Body::from(tar.to_vec()),
        )
        .await;
    (st, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

/// The output of every package, from copies the admin installs under other names.
async fn expected(s: &Srv, p: &Packages) -> Vec<String> {
    let mut out = Vec::new();
    for (i, tar) in p.tars.iter().enumerate() {
        let name = format!("ref-{i}");
        let (st, v) = upload(s, ADMIN, &format!("?name={name}"), tar).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        out.push(greedy(s, ADMIN, &name).await.unwrap());
    }
    for (i, a) in out.iter().enumerate() {
        for b in &out[i + 1..] {
            assert_ne!(a, b, "the packages must give different outputs");
        }
    }
    out
}

fn settled_leftovers(root: &Path) -> Vec<String> {
    for _ in 0..300 {
        if leftovers(root).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    leftovers(root)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleted_weights_are_never_served_to_the_next_owner_of_the_name() {
    let s = Arc::new(server(true, |_| {}));
    let p = packages(3);
    let want = expected(&s, &p).await;
    for round in 0..ROUNDS {
        let (st, v) = upload(&s, ACME, "?name=x", &p.tars[0]).await;
        assert_eq!(st, StatusCode::CREATED, "round {round}: {v}");
        // acme's requests for `x` arrive around its delete.
        let reqs: Vec<_> = (0..3)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move { greedy(&s, ACME, "x").await })
            })
            .collect();
        tokio::time::sleep(Duration::from_micros(300 * (round as u64 % 4))).await;
        let (st, v) = s
            .call(Method::DELETE, "/v1/adapters/x", Some(ACME), None)
            .await;
        assert_eq!(st, StatusCode::OK, "round {round}: {v}");
        for r in reqs {
            match r.await.unwrap() {
                Ok(text) => assert_eq!(text, want[0], "round {round}"),
                Err((st, v)) => assert_eq!(st, StatusCode::NOT_FOUND, "round {round}: {v}"),
            }
        }
        // The name is taken again, by acme itself and by globex in its own namespace.
        let (st, v) = upload(&s, ACME, "?name=x", &p.tars[1]).await;
        assert_eq!(st, StatusCode::CREATED, "round {round}: {v}");
        let (st, v) = upload(&s, GLOBEX, "?name=x", &p.tars[2]).await;
        let first = if round == 0 {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        assert_eq!(st, first, "round {round}: {v}");
        let mut after = Vec::new();
        for (key, w) in [(ACME, 1), (GLOBEX, 2), (ACME, 1), (GLOBEX, 2)] {
            let s = s.clone();
            after.push((w, tokio::spawn(async move { greedy(&s, key, "x").await })));
        }
        for (w, r) in after {
            assert_eq!(r.await.unwrap().unwrap(), want[w], "round {round}");
        }
        let (st, _) = s
            .call(Method::DELETE, "/v1/adapters/x", Some(ACME), None)
            .await;
        assert_eq!(st, StatusCode::OK);
    }
    assert_eq!(settled_leftovers(&s.adapters), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replacement_serves_the_new_weights_to_every_request_after_it() {
    let s = Arc::new(server(true, |_| {}));
    let p = packages(2);
    let want = expected(&s, &p).await;
    let engine = s.state.served().unwrap().engine.clone();
    let (st, v) = upload(&s, ACME, "?name=intent", &p.tars[0]).await;
    assert_eq!(st, StatusCode::CREATED);
    let mut current = 0;
    let mut old = v["version"].as_u64().unwrap();
    for round in 0..ROUNDS {
        let next = 1 - current;
        // Requests keep arriving while the adapter is replaced.
        let reqs: Vec<_> = (0..4)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_micros(200 * i)).await;
                    greedy(&s, ACME, "intent").await
                })
            })
            .collect();
        let (st, v) = upload(&s, ACME, "?name=intent", &p.tars[next]).await;
        assert_eq!(st, StatusCode::OK, "round {round}: {v}");
        let version = v["version"].as_u64().unwrap();
        for r in reqs {
            let text = r.await.unwrap().unwrap();
            assert!(
                text == want[current] || text == want[next],
                "round {round}: neither version's output: {text:?}"
            );
        }
        // After the replacement, with no traffic: the new weights, and only they are
        // described and resident.
        assert_eq!(
            greedy(&s, ACME, "intent").await.unwrap(),
            want[next],
            "round {round}"
        );
        let (_, d) = s.get("/v1/adapters/intent", Some(ACME)).await;
        assert_eq!(d["version"].as_u64(), Some(version), "round {round}");
        assert_eq!(d["tiers"]["device"], true, "round {round}");
        // The replaced version's requests have all ended: its slots are freed.
        let resident = |id| engine.stats.device_versions.lock().unwrap().contains(&id);
        for _ in 0..200 {
            if !resident(old) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            !resident(old),
            "round {round}: the old version keeps its slots"
        );
        assert!(resident(version), "round {round}");
        current = next;
        old = version;
    }
    // Only the refs and the current version hold slots now.
    let resident = engine.stats.device_versions.lock().unwrap().clone();
    assert!(resident.len() <= 3, "{resident:?}");
    assert_eq!(settled_leftovers(&s.adapters), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_uploads_replacements_and_deletes_answer_clearly_and_leave_one_adapter() {
    let s = Arc::new(server(true, |_| {}));
    let p = packages(2);
    let want = expected(&s, &p).await;
    for round in 0..ROUNDS / 2 {
        // Two tenants upload the same new name at once: each gets its own.
        let both: Vec<_> = [(ACME, 0), (GLOBEX, 1)]
            .into_iter()
            .map(|(key, i)| {
                let s = s.clone();
                let tar = p.tars[i].clone();
                tokio::spawn(async move { upload(&s, key, "?name=y", &tar).await })
            })
            .collect();
        for r in both {
            let (st, v) = r.await.unwrap();
            assert_eq!(st, StatusCode::CREATED, "round {round}: {v}");
        }
        assert_eq!(greedy(&s, ACME, "y").await.unwrap(), want[0]);
        assert_eq!(greedy(&s, GLOBEX, "y").await.unwrap(), want[1]);

        // One tenant uploads one name four times at once: one creates, the others replace.
        let four: Vec<_> = (0..4)
            .map(|i| {
                let s = s.clone();
                let tar = p.tars[i % 2].clone();
                tokio::spawn(async move { (i % 2, upload(&s, ACME, "?name=z", &tar).await) })
            })
            .collect();
        let mut versions = Vec::new();
        let mut created = 0;
        for r in four {
            let (which, (st, v)) = r.await.unwrap();
            assert!(
                st == StatusCode::CREATED || st == StatusCode::OK,
                "round {round}: {st} {v}"
            );
            created += usize::from(st == StatusCode::CREATED);
            versions.push((v["version"].as_u64().unwrap(), which));
        }
        assert_eq!(created, 1, "round {round}");
        let (_, d) = s.get("/v1/adapters/z", Some(ACME)).await;
        let now = d["version"].as_u64().unwrap();
        let which = versions.iter().find(|v| v.0 == now).map(|v| v.1);
        let which = which.unwrap_or_else(|| panic!("round {round}: version {now} not installed"));
        assert_eq!(greedy(&s, ACME, "z").await.unwrap(), want[which]);

        // Concurrent deletes: one succeeds, the others find nothing.
        for name in ["y", "z"] {
            let dels: Vec<_> = (0..4)
                .map(|_| {
                    let s = s.clone();
                    let uri = format!("/v1/adapters/{name}");
                    tokio::spawn(
                        async move { s.call(Method::DELETE, &uri, Some(ACME), None).await },
                    )
                })
                .collect();
            let mut ok = 0;
            for r in dels {
                let got = r.await.unwrap();
                if got.0 == StatusCode::OK {
                    ok += 1;
                } else {
                    assert_error(&got, StatusCode::NOT_FOUND, None);
                }
            }
            assert_eq!(ok, 1, "round {round}: {name}");
        }
        assert_eq!(greedy(&s, GLOBEX, "y").await.unwrap(), want[1]);
        let (st, _) = s
            .call(Method::DELETE, "/v1/adapters/y", Some(GLOBEX), None)
            .await;
        assert_eq!(st, StatusCode::OK);
    }
    assert_eq!(settled_leftovers(&s.adapters), Vec::<String>::new());
    for t in ["@acme", "@globex"] {
        assert_eq!(settled_leftovers(&s.adapters.join(t)), Vec::<String>::new());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_and_foreign_names_are_neither_taken_nor_revealed() {
    let s = server(true, |_| {});
    let p = packages(1);
    let before = greedy(&s, ACME, "acme-a").await.unwrap();
    // globex may use the name the config reserves for acme, in its own namespace only.
    let (st, v) = upload(&s, GLOBEX, "?name=acme-a", &p.tars[0]).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["owner"], "globex");
    assert_eq!(greedy(&s, ACME, "acme-a").await.unwrap(), before);
    let theirs = greedy(&s, GLOBEX, "acme-a").await.unwrap();
    assert_ne!(theirs, before);
    let (_, d) = s.get("/v1/adapters/acme-a", Some(ACME)).await;
    assert_eq!(d["owner"], "acme");
    // A name another tenant uses is as free as any other: 201, nothing said about it.
    let (st, v) = upload(&s, ACME, "?name=globex-a", &p.tars[0]).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert!(!v.to_string().contains("globex\""), "{v}");
    // The admin cannot make a shared adapter of a reserved name.
    let got = upload(&s, ADMIN, "?name=acme-a", &p.tars[0]).await;
    assert_error(&got, StatusCode::CONFLICT, None);
    assert_eq!(got.1["error"]["code"], "name_reserved");
    // Errors never show the server's paths.
    let root = s.adapters.to_string_lossy().into_owned();
    let tmp = tempfile::tempdir().unwrap();
    let broken = tmp.path().join("broken");
    write_native_adapter(&fixture("lite"), &broken, &spec(3));
    std::fs::write(broken.join("adapter.safetensors"), b"garbage").unwrap();
    let got = upload(&s, ACME, "", &tar_of(&broken, "")).await;
    assert_error(&got, StatusCode::BAD_REQUEST, None);
    assert!(!got.1.to_string().contains(&root), "{}", got.1);
    assert!(!got.1.to_string().contains("/tmp"), "{}", got.1);
    write_native_adapter(
        &fixture("lite"),
        &s.adapters.join("@acme/by-hand"),
        &spec(3),
    );
    std::fs::write(
        s.adapters.join("@acme/by-hand/adapter.safetensors"),
        b"garbage",
    )
    .unwrap();
    let (st, v) = greedy(&s, ACME, "by-hand").await.unwrap_err();
    assert!(st.is_server_error() || st.is_client_error(), "{st}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("by-hand") && !msg.contains(&root), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_a_key_and_never_name_private_adapters_to_others() {
    let scraper = "scraper-key";
    let s = server(true, |c| {
        c.metrics.key_sha256 = vec![esft::server::auth::hash_key(scraper)]
    });
    let (st, v) = s.get("/metrics", None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    assert_error(
        &s.get("/metrics", Some(ACME)).await,
        StatusCode::FORBIDDEN,
        None,
    );
    for key in [ADMIN, scraper] {
        let (st, b) = s
            .raw(Method::GET, "/metrics", Some(key), Body::empty())
            .await;
        assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    }

    // Turned off: anyone reads them, but acme's adapter is named only to the admin.
    let s = Arc::new(server(true, |c| c.metrics.require_admin = false));
    let engine = s.state.served().unwrap().engine.clone();
    let mut long = body("acme-a");
    long["max_tokens"] = json!(3000);
    let running = {
        let s = s.clone();
        tokio::spawn(async move { s.post("/v1/completions", Some(ACME), long).await })
    };
    for _ in 0..300 {
        if engine
            .stats
            .running
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    let anon = text(s.raw(Method::GET, "/metrics", None, Body::empty()).await.1);
    let tenant = text(
        s.raw(Method::GET, "/metrics", Some(GLOBEX), Body::empty())
            .await
            .1,
    );
    let admin = text(
        s.raw(Method::GET, "/metrics", Some(ADMIN), Body::empty())
            .await
            .1,
    );
    for t in [&anon, &tenant] {
        assert!(!t.contains("acme-a"), "{t}");
        assert!(
            t.contains("esft_adapter_requests_running{adapter=\"(other)\"} 1"),
            "{t}"
        );
    }
    assert!(
        admin.contains("esft_adapter_requests_running{adapter=\"acme/acme-a\"} 1"),
        "{admin}"
    );
    running.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_stops_sending_is_refused_and_leaves_nothing() {
    let s = server(true, |c| c.limits.body_read_timeout_seconds = 0.3);
    let p = packages(1);
    let head = p.tars[0][..1024].to_vec();
    // The first kilobyte, then nothing, ever.
    let stalled = futures_util::stream::once(async move {
        Ok::<_, std::io::Error>(axum::body::Bytes::from(head))
    })
    .chain(futures_util::stream::pending());
    let t0 = std::time::Instant::now();
    let (st, b) = s
        .raw(
            Method::POST,
            "/v1/adapters?name=x",
            Some(ACME),
            Body::from_stream(stalled),
        )
        .await;
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_error(&(st, v.clone()), StatusCode::REQUEST_TIMEOUT, None);
    assert_eq!(v["error"]["code"], "body_read_timeout");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(settled_leftovers(&s.adapters), Vec::<String>::new());
    assert_error(
        &s.get("/v1/adapters/x", Some(ACME)).await,
        StatusCode::NOT_FOUND,
        None,
    );
}

/// Bytes of the adapter files in `dir` (what the quotas count).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// Tenants' adapter quotas through the HTTP API: past its count or its bytes a tenant's
/// install is refused with 429 `quota_exceeded` naming the limit, and leaves nothing behind;
/// replacing one of its adapters under its name still goes through; a delete makes room;
/// an adapter that was on disk before the quotas were first used counts; shared adapters
/// count against no tenant; a tenant's override of the default is honoured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_quotas_refuse_past_the_limit_and_replacements_still_go() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("one");
    write_reference_adapter(&fixture("lite"), &d, &spec(40));
    let tar = tar_of(&d, "");
    let size = dir_bytes(&d);
    let s = server(true, |c| {
        // acme: `acme-a` (which the configuration gives it), and two more.
        c.limits.max_adapters_per_tenant = 3;
        c.limits.max_adapter_bytes_per_tenant = 0;
        // globex: any number of adapters, but room for `globex-a` and one and a half more.
        let globex_a = dir_bytes(&c.adapters.join("globex-a"));
        if let Some(g) = c.auth.tenants.iter_mut().find(|t| t.name == "globex") {
            g.max_adapters = Some(0);
            g.max_adapter_bytes = Some(globex_a + size * 3 / 2);
        }
    });
    // On disk before anything used the quotas: acme's `acme-a` and `pre` count.
    let pre = s.adapters.join("@acme").join("pre");
    std::fs::create_dir_all(s.adapters.join("@acme")).unwrap();
    write_reference_adapter(&fixture("lite"), &pre, &spec(41));
    let want = greedy(&s, ADMIN, "acme/pre").await.unwrap();

    let (st, v) = upload(&s, ACME, "?name=x", &tar).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let refused = upload(&s, ACME, "?name=y", &tar).await;
    assert_error(&refused, StatusCode::TOO_MANY_REQUESTS, None);
    assert_eq!(
        refused.1["error"]["code"], "quota_exceeded",
        "{}",
        refused.1
    );
    assert_eq!(refused.1["error"]["type"], "insufficient_quota");
    let message = refused.1["error"]["message"].as_str().unwrap();
    assert!(message.contains("max_adapters_per_tenant"), "{message}");
    assert!(!message.contains(s.adapters.to_str().unwrap()), "{message}");
    let missing = greedy(&s, ACME, "y").await.unwrap_err();
    assert_error(&missing, StatusCode::NOT_FOUND, Some("model"));
    assert!(settled_leftovers(&s.adapters).is_empty());
    // The admin installing into acme's namespace is held to acme's quota too.
    let (st, v) = upload(&s, ADMIN, "?name=z&owner=acme", &tar).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
    // Replacing an adapter of the tenant's goes through, at its limit.
    for name in ["x", "pre"] {
        let (st, v) = upload(&s, ACME, &format!("?name={name}"), &tar).await;
        assert_eq!(st, StatusCode::OK, "{name}: {v}");
    }
    let one = greedy(&s, ACME, "pre").await.unwrap();
    assert_ne!(one, want, "the replacement is served");
    assert_eq!(greedy(&s, ACME, "x").await.unwrap(), one);
    // A delete makes room.
    let (st, v) = s
        .call(Method::DELETE, "/v1/adapters/x", Some(ACME), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, v) = upload(&s, ACME, "?name=y", &tar).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    // Shared adapters count against nobody.
    for i in 0..3 {
        let (st, v) = upload(&s, ADMIN, &format!("?name=shared-{i}"), &tar).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }

    // globex's own limits: no count limit, bytes for one adapter.
    let (st, v) = upload(&s, GLOBEX, "?name=a", &tar).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let refused = upload(&s, GLOBEX, "?name=b", &tar).await;
    assert_eq!(refused.0, StatusCode::TOO_MANY_REQUESTS, "{}", refused.1);
    let message = refused.1["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("max_adapter_bytes_per_tenant"),
        "{message}"
    );
    let (st, v) = upload(&s, GLOBEX, "?name=a", &tar).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(settled_leftovers(&s.adapters).is_empty());
}
