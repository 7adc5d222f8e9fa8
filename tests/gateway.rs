//! The inference-gateway protocol in process: vLLM's adapter-placement routes
//! (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) against the adapter's tiers, their
//! refusals, and the gauges an endpoint picker scrapes, under our names and vLLM's.

#[path = "common/app.rs"]
mod app;
mod common;

use app::*;
use axum::http::StatusCode;
use common::*;
use serde_json::{json, Value};

async fn on_device(s: &Srv, name: &str) -> bool {
    let (st, v) = s.get(&format!("/v1/adapters/{name}"), Some(ADMIN)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["tiers"]["device"].as_bool().unwrap()
}

fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
}

#[tokio::test]
async fn placement_routes_move_adapters_in_and_out_of_device_slots() {
    let s = server(true, |_| {});
    let load = |key: &'static str, body: Value| {
        let s = &s;
        async move { s.post("/v1/load_lora_adapter", Some(key), body).await }
    };
    let unload = |key: &'static str, body: Value| {
        let s = &s;
        async move { s.post("/v1/unload_lora_adapter", Some(key), body).await }
    };

    // Place and unplace an installed adapter, as vLLM answers.
    assert!(!on_device(&s, "shared").await);
    let got = load(ADMIN, json!({"lora_name": "shared"})).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1, "Success: LoRA adapter 'shared' added successfully.");
    assert!(on_device(&s, "shared").await);
    let got = unload(ADMIN, json!({"lora_name": "shared", "lora_int_id": 3})).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(
        got.1,
        "Success: LoRA adapter 'shared' removed successfully."
    );
    assert!(!on_device(&s, "shared").await);

    // A tenant places its own adapter, and nobody else's.
    assert_eq!(
        load(ACME, json!({"lora_name": "acme-a"})).await.0,
        StatusCode::OK
    );
    assert!(on_device(&s, "acme/acme-a").await);
    assert_error(
        &load(GLOBEX, json!({"lora_name": "acme-a"})).await,
        StatusCode::NOT_FOUND,
        None,
    );
    assert_error(
        &unload(GLOBEX, json!({"lora_name": "acme/acme-a"})).await,
        StatusCode::NOT_FOUND,
        None,
    );
    assert_error(
        &load(ACME, json!({"lora_name": "shared"})).await,
        StatusCode::FORBIDDEN,
        None,
    );

    // Install from a server path: admins only, validated as an upload, no silent replace.
    let src = tempfile::tempdir().unwrap();
    let dir = src.path().join("placed");
    write_native_adapter(&fixture("lite"), &dir, &spec(5));
    let path = dir.to_str().unwrap();
    assert_error(
        &load(ACME, json!({"lora_name": "placed", "lora_path": path})).await,
        StatusCode::FORBIDDEN,
        None,
    );
    let got = load(ADMIN, json!({"lora_name": "placed", "lora_path": path})).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert!(on_device(&s, "placed").await);
    let (st, v) = s
        .post(
            "/v1/completions",
            Some(GLOBEX),
            json!({"model": "placed", "prompt": [5, 6, 7], "max_tokens": 2}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let again = load(ADMIN, json!({"lora_name": "placed", "lora_path": path})).await;
    assert_error(&again, StatusCode::BAD_REQUEST, None);
    assert_eq!(again.1["error"]["code"], "adapter_exists");
    let version = |v: &Value| v["version"].clone();
    let before = version(&s.get("/v1/adapters/placed", Some(ADMIN)).await.1);
    let body = json!({"lora_name": "placed", "lora_path": path, "load_inplace": true});
    assert_eq!(load(ADMIN, body).await.0, StatusCode::OK);
    let after = version(&s.get("/v1/adapters/placed", Some(ADMIN)).await.1);
    assert_ne!(before, after, "load_inplace installs a new version");

    // Bad requests: OpenAI-shaped, nothing installed.
    let bad_dir = src.path().join("broken");
    std::fs::create_dir(&bad_dir).unwrap();
    std::fs::write(bad_dir.join("adapter.json"), b"{").unwrap();
    for (body, status, param) in [
        (json!({}), StatusCode::BAD_REQUEST, None),
        (json!({"lora_name": 7}), StatusCode::BAD_REQUEST, None),
        (
            json!({"lora_name": "x", "surprise": 1}),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (json!({"lora_name": "nope"}), StatusCode::NOT_FOUND, None),
        (
            json!({"lora_name": "../up", "lora_path": path}),
            StatusCode::BAD_REQUEST,
            Some("lora_name"),
        ),
        (
            json!({"lora_name": "gone", "lora_path": "/no/such/dir"}),
            StatusCode::BAD_REQUEST,
            Some("lora_path"),
        ),
        (
            json!({"lora_name": "broken", "lora_path": bad_dir.to_str().unwrap()}),
            StatusCode::BAD_REQUEST,
            None,
        ),
    ] {
        let got = load(ADMIN, body.clone()).await;
        assert_error(&got, status, param);
        assert!(
            !body["lora_name"]
                .as_str()
                .is_some_and(|n| s.adapters.join(n).exists()),
            "{body} left an adapter"
        );
    }
    assert_error(
        &unload(ADMIN, json!({"lora_name": "nope"})).await,
        StatusCode::NOT_FOUND,
        None,
    );
    assert!(
        leftovers(&s.adapters).is_empty(),
        "{:?}",
        leftovers(&s.adapters)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_installs_of_one_name_have_one_winner() {
    let s = std::sync::Arc::new(server(true, |_| {}));
    let src = tempfile::tempdir().unwrap();
    for round in 0..5 {
        let dirs: Vec<String> = (0..6)
            .map(|i| {
                let dir = src.path().join(format!("r{round}-{i}"));
                write_native_adapter(&fixture("lite"), &dir, &spec(i));
                dir.to_str().unwrap().to_string()
            })
            .collect();
        let name = format!("raced-{round}");
        let calls = dirs.into_iter().map(|path| {
            let s = s.clone();
            let body = json!({"lora_name": name, "lora_path": path});
            tokio::spawn(async move { s.post("/v1/load_lora_adapter", Some(ADMIN), body).await })
        });
        let mut won = 0;
        for call in calls.collect::<Vec<_>>() {
            let got = call.await.unwrap();
            if got.0 == StatusCode::OK {
                won += 1;
            } else {
                assert_error(&got, StatusCode::BAD_REQUEST, None);
                assert_eq!(got.1["error"]["code"], "adapter_exists", "{}", got.1);
            }
        }
        assert_eq!(won, 1, "round {round}");
        assert!(on_device(&s, &name).await);
    }
    assert!(
        leftovers(&s.adapters).is_empty(),
        "{:?}",
        leftovers(&s.adapters)
    );
}

#[tokio::test]
async fn gateway_gauges_under_our_names_and_vllms() {
    let s = server(false, |c| c.metrics.vllm_names = true);
    let (st, v) = s
        .post(
            "/v1/completions",
            None,
            json!({"model": "open-a", "prompt": [5, 6, 7], "max_tokens": 2}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, text) = s.get_text("/metrics", None).await;
    assert_eq!(st, StatusCode::OK);
    for name in [
        "esft_kv_cache_usage_ratio ",
        "vllm:num_requests_waiting ",
        "vllm:num_requests_running ",
        "vllm:gpu_cache_usage_perc ",
        "vllm:kv_cache_usage_perc ",
    ] {
        let v: f64 = line(&text, name)[name.len()..].parse().unwrap();
        assert!(
            (0.0..=1.0).contains(&v) || name.contains("requests"),
            "{name}{v}"
        );
    }
    // max_lora: adapters of a tenth of the experts that fit the default 1 GiB of slots.
    let cfg = esft::model::Config::from_dir(&fixture("lite")).unwrap();
    let expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4;
    let per = cfg.n_routed_experts.div_ceil(10) * cfg.moe_layers().len() * expert;
    let want = format!("max_lora=\"{}\"", (1usize << 30) / per);
    for name in ["esft_lora_requests_info{", "vllm:lora_requests_info{"] {
        let l = line(&text, name);
        assert!(l.contains(&want), "{l} lacks {want}");
        assert!(l.contains("running_lora_adapters=\"\""), "{l}");
    }
    // Off by default: promtool-clean names only.
    let plain = server(false, |_| {});
    let (_, text) = plain.get_text("/metrics", None).await;
    assert!(!text.contains("vllm:"));
    line(&text, "esft_lora_requests_info{");
}
