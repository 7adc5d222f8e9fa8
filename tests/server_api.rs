//! The HTTP API in process: every route, every refused input with its OpenAI-shaped error,
//! tenants and adapter administration, metrics, and cancellation on disconnect.

#[path = "common/app.rs"]
mod app;
mod common;

use app::*;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use common::*;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tower::ServiceExt;

fn prompt_ids(i: usize) -> Vec<u32> {
    u32s(&reference("lite")["prompts"][i]["ids"])
}

fn greedy_ids(i: usize) -> Vec<u32> {
    u32s(&reference("lite")["prompts"][i]["greedy"]["new_ids"])
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8(body.to_vec())
        .unwrap()
        .split("\n\n")
        .filter_map(|ev| {
            ev.lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::to_string)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_openai_errors() {
    let s = server(true, |c| {
        c.limits.max_body_bytes = 8192;
        c.limits.max_n = 4;
        c.engine.max_context = 64;
    });
    let k = Some(ADMIN);
    let ok = json!({"model": "lite", "prompt": [5, 6, 7], "max_tokens": 2});
    // Control: the same body shape is fine.
    assert_eq!(
        s.post("/v1/completions", k, ok.clone()).await.0,
        StatusCode::OK
    );
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = ok.clone();
        f(&mut v);
        v
    };

    // Malformed JSON, wrong top-level type.
    let (st, b) = s
        .raw(
            Method::POST,
            "/v1/completions",
            k,
            Body::from("{\"model\": \"lite\", "),
        )
        .await;
    assert_error(
        &(st, serde_json::from_slice(&b).unwrap()),
        StatusCode::BAD_REQUEST,
        None,
    );
    let (st, b) = s
        .raw(Method::POST, "/v1/completions", k, Body::from("[1, 2]"))
        .await;
    assert_error(
        &(st, serde_json::from_slice(&b).unwrap()),
        StatusCode::BAD_REQUEST,
        None,
    );
    // Invalid UTF-8.
    let (st, b) = s
        .raw(
            Method::POST,
            "/v1/completions",
            k,
            Body::from(b"{\"model\": \"lite\", \"prompt\": \"\xff\xfe\"}".to_vec()),
        )
        .await;
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_error(&(st, v.clone()), StatusCode::BAD_REQUEST, None);
    assert!(v["error"]["message"].as_str().unwrap().contains("UTF-8"));
    // Wrong types, each naming its field.
    for (field, value) in [
        ("temperature", json!("hot")),
        ("max_tokens", json!(-1)),
        ("n", json!(1.5)),
        ("stream", json!("yes")),
        ("stop", json!(5)),
        ("seed", json!("x")),
        ("model", json!(3)),
    ] {
        let body = with(&|v| v[field] = value.clone());
        assert_error(
            &s.post("/v1/completions", k, body).await,
            StatusCode::BAD_REQUEST,
            Some(field),
        );
    }
    assert_error(
        &s.post(
            "/v1/completions",
            k,
            with(&|v| v["prompt"] = json!({"a": 1})),
        )
        .await,
        StatusCode::BAD_REQUEST,
        Some("prompt"),
    );
    assert_error(
        &s.post(
            "/v1/completions",
            k,
            with(&|v| v["prompt"] = json!([1, -2])),
        )
        .await,
        StatusCode::BAD_REQUEST,
        Some("prompt"),
    );
    // Out-of-vocabulary token ids.
    assert_error(
        &s.post(
            "/v1/completions",
            k,
            with(&|v| v["prompt"] = json!([1, 999999])),
        )
        .await,
        StatusCode::BAD_REQUEST,
        Some("prompt"),
    );
    // Out-of-range values.
    for (field, value) in [
        ("temperature", json!(-0.5)),
        ("top_p", json!(0)),
        ("presence_penalty", json!(3)),
        ("repetition_penalty", json!(0)),
        ("top_k", json!(-3)),
        ("logprobs", json!(21)),
        ("stop", json!([""])),
    ] {
        let body = with(&|v| v[field] = value.clone());
        assert_error(
            &s.post("/v1/completions", k, body).await,
            StatusCode::BAD_REQUEST,
            Some(field),
        );
    }
    // Unknown model, unknown adapter.
    for m in ["nope", "lite:nope", "other:open-a", "../etc"] {
        let got = s
            .post("/v1/completions", k, with(&|v| v["model"] = json!(m)))
            .await;
        assert_error(&got, StatusCode::NOT_FOUND, Some("model"));
        assert_eq!(got.1["error"]["code"], "model_not_found");
    }
    // Prompt longer than the context (64 here); max_tokens 0 or past the context.
    let long = with(&|v| v["prompt"] = json!(vec![5; 64]));
    let got = s.post("/v1/completions", k, long).await;
    assert_error(&got, StatusCode::BAD_REQUEST, Some("prompt"));
    assert_eq!(got.1["error"]["code"], "context_length_exceeded");
    assert_error(
        &s.post("/v1/completions", k, with(&|v| v["max_tokens"] = json!(0)))
            .await,
        StatusCode::BAD_REQUEST,
        Some("max_tokens"),
    );
    // 3 prompt tokens + 61 = 64: refused; 60 fits.
    assert_error(
        &s.post("/v1/completions", k, with(&|v| v["max_tokens"] = json!(62)))
            .await,
        StatusCode::BAD_REQUEST,
        Some("max_tokens"),
    );
    let chat = json!({"model": "lite", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 100});
    assert_error(
        &s.post("/v1/chat/completions", k, chat).await,
        StatusCode::BAD_REQUEST,
        Some("max_tokens"),
    );
    // n too large, n zero.
    for n in [5, 0] {
        assert_error(
            &s.post("/v1/completions", k, with(&|v| v["n"] = json!(n)))
                .await,
            StatusCode::BAD_REQUEST,
            Some("n"),
        );
    }
    // Chat: empty messages, unknown role, bad content.
    let chat = |messages: Value| json!({"model": "lite", "messages": messages, "max_tokens": 2});
    assert_error(
        &s.post("/v1/chat/completions", k, chat(json!([]))).await,
        StatusCode::BAD_REQUEST,
        Some("messages"),
    );
    assert_error(
        &s.post(
            "/v1/chat/completions",
            k,
            chat(json!([{"role": "tool", "content": "x"}])),
        )
        .await,
        StatusCode::BAD_REQUEST,
        Some("messages[0].role"),
    );
    assert_error(
        &s.post(
            "/v1/chat/completions",
            k,
            chat(json!([{"role": "user", "content": 7}])),
        )
        .await,
        StatusCode::BAD_REQUEST,
        Some("messages[0].content"),
    );
    assert_error(
        &s.post("/v1/chat/completions", k, json!({"model": "lite"}))
            .await,
        StatusCode::BAD_REQUEST,
        None,
    );
    // Unsupported features are refused, not ignored.
    assert_error(
        &s.post("/v1/completions", k, with(&|v| v["echo"] = json!(true)))
            .await,
        StatusCode::BAD_REQUEST,
        Some("echo"),
    );
    assert_error(
        &s.post(
            "/v1/completions",
            k,
            with(&|v| v["logit_bias"] = json!({"5": 1.0})),
        )
        .await,
        StatusCode::BAD_REQUEST,
        Some("logit_bias"),
    );
    // Body over the limit: 413.
    let big = with(&|v| v["prompt"] = json!("x".repeat(10_000)));
    assert_error(
        &s.post("/v1/completions", k, big).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        None,
    );
    // Unknown route, wrong method.
    assert_error(&s.get("/v2/nothing", k).await, StatusCode::NOT_FOUND, None);
    assert_error(
        &s.get("/v1/completions", k).await,
        StatusCode::METHOD_NOT_ALLOWED,
        None,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_tenants() {
    let s = server(true, |_| {});
    let body = |m: &str| json!({"model": m, "prompt": [5, 6, 7], "max_tokens": 2});
    // Missing, malformed and wrong keys: 401.
    for key in [None, Some("wrong")] {
        let got = s.post("/v1/completions", key, body("lite")).await;
        assert_error(&got, StatusCode::UNAUTHORIZED, None);
        assert_error(
            &s.get("/v1/models", key).await,
            StatusCode::UNAUTHORIZED,
            None,
        );
        assert_error(
            &s.get("/v1/adapters", key).await,
            StatusCode::UNAUTHORIZED,
            None,
        );
    }
    let (st, b) = s.raw(Method::GET, "/v1/models", None, Body::empty()).await;
    assert_eq!(
        st,
        StatusCode::UNAUTHORIZED,
        "{}",
        String::from_utf8_lossy(&b)
    );
    // Health and readiness need no key.
    assert_eq!(s.get("/health", None).await.0, StatusCode::OK);
    assert_eq!(s.get("/ready", None).await.0, StatusCode::OK);

    let ids = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (st, models) = s.get("/v1/models", Some(ACME)).await;
    assert_eq!(st, StatusCode::OK);
    // A tenant sees its own adapters (reserved for it by the config) and public ones by
    // their bare names; the admin sees tenants' adapters as TENANT/NAME.
    assert_eq!(ids(&models), ["lite", "acme-a", "shared"]);
    assert!(models["data"][1]["parent"] == "lite" && models["data"][1]["owned_by"] == "acme");
    assert_eq!(
        ids(&s.get("/v1/models", Some(ADMIN)).await.1),
        ["lite", "acme/acme-a", "globex/globex-a", "open-a", "shared"]
    );
    assert_eq!(
        ids(&s.get("/v1/adapters", Some(GLOBEX)).await.1),
        ["globex-a", "shared"]
    );

    // Own and public adapters work; another tenant's is "not found", as is an unowned one.
    for m in ["lite", "acme-a", "lite:acme-a", "acme/acme-a", "shared"] {
        assert_eq!(
            s.post("/v1/completions", Some(ACME), body(m)).await.0,
            StatusCode::OK,
            "{m}"
        );
    }
    for m in [
        "globex-a",
        "lite:globex-a",
        "globex/globex-a",
        "open-a",
        "x/y/z",
    ] {
        let got = s.post("/v1/completions", Some(ACME), body(m)).await;
        assert_error(&got, StatusCode::NOT_FOUND, Some("model"));
        let missing = s
            .post("/v1/completions", Some(ACME), body("no-such-adapter"))
            .await;
        assert_eq!(
            got.1["error"]["message"].as_str().unwrap().replace(m, "X"),
            missing.1["error"]["message"]
                .as_str()
                .unwrap()
                .replace("no-such-adapter", "X"),
            "existence does not leak"
        );
    }
    assert_error(
        &s.get("/v1/models/globex-a", Some(ACME)).await,
        StatusCode::NOT_FOUND,
        None,
    );
    assert_eq!(
        s.get("/v1/models/acme-a", Some(ACME)).await.0,
        StatusCode::OK
    );
    // Admin endpoints: another tenant's adapter is 404; a public one is 403 to manage.
    for (m, uri) in [
        (Method::GET, "/v1/adapters/globex-a"),
        (Method::DELETE, "/v1/adapters/globex-a"),
        (Method::POST, "/v1/adapters/globex-a/load"),
        (Method::POST, "/v1/adapters/globex-a/unload"),
        (Method::GET, "/v1/adapters/globex/globex-a"),
        (Method::GET, "/v1/adapters/globex%2Fglobex-a"),
        (Method::DELETE, "/v1/adapters/globex/globex-a"),
        (Method::POST, "/v1/adapters/globex/globex-a/load"),
    ] {
        assert_error(
            &s.call(m, uri, Some(ACME), None).await,
            StatusCode::NOT_FOUND,
            None,
        );
    }
    assert_error(
        &s.call(Method::DELETE, "/v1/adapters/shared", Some(ACME), None)
            .await,
        StatusCode::FORBIDDEN,
        None,
    );
    assert_eq!(
        s.get("/v1/adapters/shared", Some(ACME)).await.0,
        StatusCode::OK
    );
    for uri in [
        "/v1/adapters/acme-a/load",
        "/v1/adapters/acme/acme-a/load",
        "/v1/adapters/acme%2Facme-a/unload",
    ] {
        assert_eq!(
            s.call(Method::POST, uri, Some(ACME), None).await.0,
            StatusCode::OK,
            "{uri}"
        );
    }
    assert_eq!(
        s.get("/v1/models/acme/acme-a", Some(ACME)).await.1["id"],
        "acme/acme-a"
    );
    // The admin manages everything, tenants' adapters by TENANT/NAME.
    assert_error(
        &s.call(
            Method::POST,
            "/v1/adapters/globex-a/load",
            Some(ADMIN),
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
        None,
    );
    let (st, v) = s
        .call(
            Method::POST,
            "/v1/adapters/globex/globex-a/load",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        (v["id"].as_str(), v["owner"].as_str()),
        (Some("globex/globex-a"), Some("globex"))
    );
    assert_error(
        &s.call(
            Method::POST,
            "/v1/adapters/globex/globex-a/reload",
            Some(ADMIN),
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
        None,
    );
    assert_eq!(
        s.call(Method::DELETE, "/v1/adapters/open-a", Some(ADMIN), None)
            .await
            .0,
        StatusCode::OK
    );
    assert!(!s.adapters.join("open-a").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_match_the_reference_with_exact_usage() {
    let s = server(false, |_| {});
    for i in 0..3 {
        let ids = prompt_ids(i);
        let want = greedy_ids(i);
        let req = json!({
            "model": "lite", "prompt": ids, "max_tokens": want.len(),
            "temperature": 0, "ignore_eos": true, "logprobs": 3,
        });
        let (st, v) = s.post("/v1/completions", None, req.clone()).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["model"], "lite");
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "length");
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": ids.len(), "completion_tokens": want.len(), "total_tokens": ids.len() + want.len()})
        );
        // The text is the reference tokens decoded; logprobs come one per token.
        let tok = &s.state.served().unwrap().engine.tokenizer;
        assert_eq!(c["text"], tok.decode(&want, true).unwrap());
        let lps = c["logprobs"]["token_logprobs"].as_array().unwrap();
        assert_eq!(lps.len(), want.len());
        let tokens: Vec<String> = want
            .iter()
            .map(|&t| tok.decode(&[t], false).unwrap())
            .collect();
        assert_eq!(c["logprobs"]["tokens"], json!(tokens));
        // Greedy: each token is the most likely, so its logprob is the top one.
        for (j, top) in c["logprobs"]["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let best = top
                .as_object()
                .unwrap()
                .values()
                .map(|x| x.as_f64().unwrap())
                .fold(f64::MIN, f64::max);
            assert!((best - lps[j].as_f64().unwrap()).abs() < 1e-6);
        }
        // The first token's logprob is the log-softmax of the model's last prompt logits.
        let loaded = esft::model::LoadedModel::load(&fixture("lite"), &Default::default()).unwrap();
        let logits = logits_all(&loaded.model, &ids, None);
        let last = logits.last().unwrap();
        let max = last.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = max
            + last
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let expect = last[want[0] as usize] as f64 - lse;
        assert!(
            (lps[0].as_f64().unwrap() - expect).abs() < 1e-4,
            "{} vs {expect}",
            lps[0]
        );

        // Streaming gives the same text, then finish_reason, the usage chunk and [DONE].
        let mut sreq = req.clone();
        sreq["stream"] = json!(true);
        sreq["stream_options"] = json!({"include_usage": true});
        let (st, body) = s
            .raw(
                Method::POST,
                "/v1/completions",
                None,
                Body::from(sreq.to_string()),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let data = sse_data(&body);
        assert_eq!(data.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect();
        assert_eq!(text, c["text"].as_str().unwrap());
        let streamed_lps: usize = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["logprobs"]["token_logprobs"].as_array())
            .map(Vec::len)
            .sum();
        assert_eq!(streamed_lps, want.len());
        let usage = chunks.last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"], v["usage"]);
        assert_eq!(
            chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
            "length"
        );
        assert!(chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c["usage"].is_null()));
    }
    // Text prompts get BOS from the tokenizer, like `generate --prompt`.
    let text = reference("lite")["prompts"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, v) = s
        .post(
            "/v1/completions",
            None,
            json!({"model": "lite", "prompt": text, "max_tokens": 4, "temperature": 0}),
        )
        .await;
    assert_eq!(v["usage"]["prompt_tokens"], prompt_ids(0).len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_matrices_serve_the_base_and_adapters() {
    let s = server_on("lite-bf16", false, |c| c.weight_dtype = "bf16".into());
    let r = reference("lite-bf16");
    let ids = u32s(&r["prompts"][0]["ids"]);
    let want = u32s(&r["prompts"][0]["greedy"]["new_ids"]);
    let tok = &s.state.served().unwrap().engine.tokenizer;
    let req = |model: &str| {
        json!({"model": model, "prompt": ids, "max_tokens": want.len(), "temperature": 0,
               "ignore_eos": true})
    };
    let (st, v) = s.post("/v1/completions", None, req("lite-bf16")).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["text"], tok.decode(&want, true).unwrap());

    // The adapter served in the batch equals the adapter applied directly to a model
    // loaded the same way (its experts held in bf16 like the base's).
    let opts = esft::model::LoadOptions {
        matrix_dtype: Some(candle_core::DType::BF16),
        ..Default::default()
    };
    let mut direct = esft::model::LoadedModel::load(&fixture("lite-bf16"), &opts).unwrap();
    let map =
        esft::adapter::apply_adapter_dir(&mut direct, &s.adapters.join("open-a"), opts.matrices())
            .unwrap();
    let mut seq = [esft::engine::Sequence::new(
        ids.clone(),
        esft::engine::SamplingParams {
            ignore_eos: true,
            ..esft::engine::SamplingParams::greedy(want.len())
        },
        direct.model.new_cache(),
        &direct.model.config().eos_token_ids,
        usize::MAX,
    )];
    seq[0].experts = Some(map);
    esft::engine::generate_all(&direct.model, None, &mut seq, 512).unwrap();
    let (st, v) = s.post("/v1/completions", None, req("open-a")).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(text, tok.decode(seq[0].generated(), true).unwrap());
    assert_ne!(
        seq[0].generated(),
        want.as_slice(),
        "the adapter changes the output"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_seeds_n_and_adapters() {
    let s = server(false, |_| {});
    let ids = prompt_ids(0);
    let base = json!({"model": "lite", "prompt": ids, "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let (_, full) = s.post("/v1/completions", None, base.clone()).await;
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    // Stop on a piece from the middle of the greedy text: cut before it, reason `stop`.
    let cut = text.char_indices().nth(text.chars().count() / 2).unwrap().0;
    let stop: String = text[cut..].chars().take(2).collect();
    let mut req = base.clone();
    req["stop"] = json!(stop);
    let (_, v) = s.post("/v1/completions", None, req).await;
    let got = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert_eq!(got, &text[..text.find(&stop).unwrap()]);
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < 12);

    // n = 3 with a seed: reproducible, three indices, usage summed.
    let seeded = json!({"model": "lite", "prompt": ids, "max_tokens": 8, "temperature": 1.0, "seed": 42, "n": 3, "ignore_eos": true});
    let (_, a) = s.post("/v1/completions", None, seeded.clone()).await;
    let (_, b) = s.post("/v1/completions", None, seeded.clone()).await;
    assert_eq!(a["choices"], b["choices"]);
    let idx: Vec<u64> = a["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, [0, 1, 2]);
    assert_eq!(a["usage"]["completion_tokens"], 24);
    assert_eq!(a["usage"]["prompt_tokens"], ids.len());
    let texts: std::collections::HashSet<&str> = a["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert!(texts.len() > 1, "choices are sampled independently: {a}");

    // Adapters change the output; `<base>:<adapter>` is the same adapter.
    let with_model = |m: &str| {
        let mut r = base.clone();
        r["model"] = json!(m);
        r
    };
    let (_, a1) = s.post("/v1/completions", None, with_model("open-a")).await;
    let (_, a2) = s
        .post("/v1/completions", None, with_model("lite:open-a"))
        .await;
    assert_eq!(a1["choices"][0]["text"], a2["choices"][0]["text"]);
    assert_eq!(a2["model"], "lite:open-a");
    assert_ne!(a1["choices"][0]["text"], full["choices"][0]["text"]);

    // Chat: the template's tokens are the prompt; streamed deltas add up to the message.
    let chat = json!({"model": "shared", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a mixture of experts?"}], "max_tokens": 10, "temperature": 0, "ignore_eos": true, "logprobs": true, "top_logprobs": 2});
    let (st, c) = s.post("/v1/chat/completions", None, chat.clone()).await;
    assert_eq!(st, StatusCode::OK, "{c}");
    assert_eq!(c["object"], "chat.completion");
    let tok = &s.state.served().unwrap().engine.tokenizer;
    let msgs = [
        esft::model::tokenizer::ChatMessage::new("system", "Be brief."),
        esft::model::tokenizer::ChatMessage::new("user", "What is a mixture of experts?"),
    ];
    assert_eq!(
        c["usage"]["prompt_tokens"],
        tok.encode_chat(&msgs, true).unwrap().len()
    );
    assert_eq!(c["usage"]["completion_tokens"], 10);
    assert_eq!(c["choices"][0]["message"]["role"], "assistant");
    let content = c["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 10);
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    let mut sreq = chat.clone();
    sreq["stream"] = json!(true);
    let (_, body) = s
        .raw(
            Method::POST,
            "/v1/chat/completions",
            None,
            Body::from(sreq.to_string()),
        )
        .await;
    let data = sse_data(&body);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c.get("usage").is_none()));
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        streamed,
        c["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_upload_load_unload_delete() {
    let s = server(true, |c| c.limits.max_upload_bytes = 200_000);
    let src = tempfile::tempdir().unwrap();
    write_native_adapter(&fixture("lite"), &src.path().join("fresh"), &spec(7));
    // Another adapter that calls itself `fresh`.
    write_native_adapter(&fixture("lite"), &src.path().join("other/fresh"), &spec(8));
    let package = tar_of(&src.path().join("fresh"), "fresh/");
    let up = |key: &'static str, q: &str, body: Vec<u8>| {
        let uri = format!("/v1/adapters{q}");
        let s = &s;
        async move { s.raw(Method::POST, &uri, Some(key), Body::from(body)).await }
    };
    let json_of = |r: (StatusCode, Vec<u8>)| (r.0, serde_json::from_slice::<Value>(&r.1).unwrap());

    // Refused packages leave nothing behind.
    let mut broken = tar::Builder::new(Vec::new());
    let manifest = std::fs::read(src.path().join("fresh/adapter.json")).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(manifest.len() as u64);
    h.set_cksum();
    broken
        .append_data(&mut h, "adapter.json", &manifest[..])
        .unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(7);
    h.set_cksum();
    broken
        .append_data(&mut h, "adapter.safetensors", &b"garbage"[..])
        .unwrap();
    let got = json_of(up(ACME, "", broken.into_inner().unwrap()).await);
    assert_error(&got, StatusCode::BAD_REQUEST, None);
    assert_eq!(got.1["error"]["code"], "invalid_adapter");
    let got = json_of(up(ACME, "", b"not a tar at all".repeat(100)).await);
    assert_error(&got, StatusCode::BAD_REQUEST, None);
    let mut evil = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    evil.append_link(&mut h, "adapter.safetensors", "/etc/passwd")
        .unwrap();
    let got = json_of(up(ACME, "", evil.into_inner().unwrap()).await);
    assert_error(&got, StatusCode::BAD_REQUEST, None);
    let got = json_of(up(ACME, "?name=fresh", vec![0u8; 300_000]).await);
    assert_error(&got, StatusCode::PAYLOAD_TOO_LARGE, None);
    let got = json_of(up(ACME, "?name=other", package.clone()).await);
    assert_error(&got, StatusCode::BAD_REQUEST, Some("name"));
    let got = json_of(up(ACME, "?owner=globex", package.clone()).await);
    assert_error(&got, StatusCode::FORBIDDEN, None);
    assert!(!s.adapters.join("@acme/fresh").exists());
    assert_eq!(leftovers(&s.adapters), Vec::<String>::new());
    assert_error(
        &s.post(
            "/v1/completions",
            Some(ACME),
            json!({"model": "fresh", "prompt": [5]}),
        )
        .await,
        StatusCode::NOT_FOUND,
        Some("model"),
    );

    // A good upload belongs to the uploading tenant.
    let (st, v) = json_of(up(ACME, "", package.clone()).await);
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["id"], "fresh");
    assert_eq!(v["owner"], "acme");
    assert_eq!(v["expert_count"], 5);
    assert_eq!(v["experts_per_layer"], json!({"1": 3, "2": 2}));
    assert_eq!(
        v["tiers"],
        json!({"disk": true, "host": false, "device": false})
    );
    assert_eq!(v["manifest"]["name"], "fresh");
    assert!(v["size_bytes"].as_u64().unwrap() > 0);
    assert_eq!(leftovers(&s.adapters), Vec::<String>::new());
    // Another tenant cannot see it; the same name in its own namespace is its own adapter
    // (201, nothing said about acme's).
    assert_error(
        &s.get("/v1/adapters/fresh", Some(GLOBEX)).await,
        StatusCode::NOT_FOUND,
        None,
    );
    let (st, g) = json_of(up(GLOBEX, "", tar_of(&src.path().join("other/fresh"), "")).await);
    assert_eq!(st, StatusCode::CREATED, "{g}");
    assert_eq!(
        (g["id"].as_str(), g["owner"].as_str()),
        (Some("fresh"), Some("globex"))
    );
    assert!(s.adapters.join("@acme/fresh").is_dir() && s.adapters.join("@globex/fresh").is_dir());
    // Each serves its own, with the same output as the same adapter on disk from the start.
    let req = |m: &str| json!({"model": m, "prompt": prompt_ids(1), "max_tokens": 6, "temperature": 0, "ignore_eos": true});
    let text = |v: &Value| v["choices"][0]["text"].as_str().unwrap().to_string();
    let (st, a) = s.post("/v1/completions", Some(ACME), req("fresh")).await;
    assert_eq!(st, StatusCode::OK, "{a}");
    write_native_adapter(&fixture("lite"), &s.adapters.join("fresh-copy"), &spec(7));
    write_native_adapter(&fixture("lite"), &s.adapters.join("other-copy"), &spec(8));
    let (_, b) = s
        .post("/v1/completions", Some(ADMIN), req("fresh-copy"))
        .await;
    assert_eq!(text(&a), text(&b));
    let (_, g) = s.post("/v1/completions", Some(GLOBEX), req("fresh")).await;
    let (_, o) = s
        .post("/v1/completions", Some(ADMIN), req("other-copy"))
        .await;
    assert_eq!(text(&g), text(&o));
    assert_ne!(text(&a), text(&g));
    assert_eq!(
        text(
            &s.post("/v1/completions", Some(ADMIN), req("acme/fresh"))
                .await
                .1
        ),
        text(&a)
    );

    // Load, unload, tiers.
    let (st, v) = s
        .call(Method::POST, "/v1/adapters/fresh/load", Some(ACME), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["tiers"]["device"], true);
    let (_, v) = s
        .call(Method::POST, "/v1/adapters/fresh/unload", Some(ACME), None)
        .await;
    assert_eq!(
        v["tiers"],
        json!({"disk": true, "host": false, "device": false})
    );

    // Delete while a request uses the adapter: the request goes on with the version it
    // started on; unloading it is refused meanwhile; the name is free at once.
    let engine = s.state.served().unwrap().engine.clone();
    let mut long = req("fresh");
    long["max_tokens"] = json!(3000);
    long["stream"] = json!(true);
    let app = s.app.clone();
    let running = tokio::spawn(async move {
        let r = Request::post("/v1/completions")
            .header("authorization", format!("Bearer {ACME}"))
            .body(Body::from(long.to_string()))
            .unwrap();
        let resp = app.oneshot(r).await.unwrap();
        let mut body = resp.into_body();
        // Hold the stream open until cancelled.
        let mut bytes = 0;
        while let Some(f) = body.frame().await {
            match f {
                Ok(f) => bytes += f.data_ref().map_or(0, |d| d.len()),
                Err(_) => break,
            }
        }
        bytes
    });
    for _ in 0..200 {
        if engine.stats.running.load(Ordering::Relaxed) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got = s
        .call(Method::POST, "/v1/adapters/fresh/unload", Some(ACME), None)
        .await;
    assert_error(&got, StatusCode::CONFLICT, None);
    assert_eq!(got.1["error"]["code"], "adapter_in_use");
    let (st, v) = s
        .call(Method::DELETE, "/v1/adapters/fresh", Some(ACME), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["deleted"], true);
    assert!(!s.adapters.join("@acme/fresh").exists());
    assert_error(
        &s.get("/v1/adapters/fresh", Some(ACME)).await,
        StatusCode::NOT_FOUND,
        None,
    );
    assert_error(
        &s.post("/v1/completions", Some(ACME), req("fresh")).await,
        StatusCode::NOT_FOUND,
        Some("model"),
    );
    assert_eq!(
        engine.stats.running.load(Ordering::Relaxed),
        1,
        "still running"
    );
    assert_error(
        &s.call(Method::DELETE, "/v1/adapters/fresh", Some(ACME), None)
            .await,
        StatusCode::NOT_FOUND,
        None,
    );
    running.abort();
    let _ = running.await;
    for _ in 0..200 {
        if engine.stats.running.load(Ordering::Relaxed) == 0 && leftovers(&s.adapters).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Its last request gone, the deleted version's files go too.
    assert_eq!(leftovers(&s.adapters), Vec::<String>::new());
    // The reference layout carries no name: `?name=` is needed.
    write_reference_adapter(&fixture("lite"), &src.path().join("ref"), &spec(3));
    let reference = tar_of(&src.path().join("ref"), "");
    assert_error(
        &json_of(up(ACME, "", reference.clone()).await),
        StatusCode::BAD_REQUEST,
        Some("name"),
    );
    let (st, v) = json_of(up(ACME, "?name=ref-a", reference).await);
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(
        (v["layout"].as_str(), v["owner"].as_str()),
        (Some("reference"), Some("acme"))
    );
    assert_eq!(
        s.post("/v1/completions", Some(ACME), req("ref-a")).await.0,
        StatusCode::OK
    );
    // Re-upload by the admin for a tenant, public: replaces globex's, and every tenant
    // may use it under globex's name.
    let (st, v) = json_of(
        up(
            ADMIN,
            "?owner=globex&public=true",
            tar_of(&src.path().join("fresh"), ""),
        )
        .await,
    );
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        (v["id"].as_str(), v["owner"].as_str(), v["public"].as_bool()),
        (Some("globex/fresh"), Some("globex"), Some(true))
    );
    assert_error(
        &s.post("/v1/completions", Some(ACME), req("fresh")).await,
        StatusCode::NOT_FOUND,
        Some("model"),
    );
    let (st, v) = s
        .post("/v1/completions", Some(ACME), req("globex/fresh"))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(text(&v), text(&a));
    assert_error(
        &s.call(
            Method::DELETE,
            "/v1/adapters/globex/fresh",
            Some(ACME),
            None,
        )
        .await,
        StatusCode::FORBIDDEN,
        None,
    );
    assert_eq!(leftovers(&s.adapters), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_traffic() {
    let s = server(false, |c| c.metrics.max_adapter_labels = 2);
    let req = |m: &str| json!({"model": m, "prompt": [5, 6, 7, 8], "max_tokens": 3, "temperature": 0, "ignore_eos": true});
    for m in ["lite", "open-a", "shared", "open-a"] {
        assert_eq!(
            s.post("/v1/completions", None, req(m)).await.0,
            StatusCode::OK
        );
    }
    let _ = s
        .post(
            "/v1/completions",
            None,
            json!({"model": "nope", "prompt": [1]}),
        )
        .await;
    // The engine publishes its gauges after each step, just after answering.
    assert!(wait_running(&s.state.served().unwrap().engine, 0).await);
    let (st, text) = s.raw(Method::GET, "/metrics", None, Body::empty()).await;
    assert_eq!(st, StatusCode::OK);
    let text = String::from_utf8(text).unwrap();
    let value = |line: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line) && l[line.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("{line} missing:\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        value("esft_http_requests_total{code=\"200\",endpoint=\"/v1/completions\"}"),
        4.0
    );
    assert_eq!(
        value("esft_http_requests_total{code=\"404\",endpoint=\"/v1/completions\"}"),
        1.0
    );
    assert_eq!(value("esft_prompt_tokens_total"), 16.0);
    assert_eq!(value("esft_generation_tokens_total"), 12.0);
    assert_eq!(
        value("esft_sequences_finished_total{finish_reason=\"length\"}"),
        4.0
    );
    assert_eq!(
        value("esft_time_to_first_token_seconds_count{endpoint=\"/v1/completions\"}"),
        4.0
    );
    assert_eq!(value("esft_inter_token_latency_seconds_count"), 8.0);
    assert_eq!(
        value("esft_request_duration_seconds_count{endpoint=\"/v1/completions\"}"),
        4.0
    );
    assert_eq!(value("esft_adapter_loads_total{tier=\"device\"}"), 2.0);
    assert_eq!(value("esft_adapter_hits_total{tier=\"device\"}"), 1.0);
    assert_eq!(value("esft_adapter_load_duration_seconds_count"), 2.0);
    assert_eq!(value("esft_adapters_resident{tier=\"device\"}"), 2.0);
    assert!(value("esft_adapter_resident_bytes{tier=\"host\"}") > 0.0);
    assert!(value("esft_device_expert_slots_used") > 0.0);
    assert!(value("esft_device_expert_slots") >= value("esft_device_expert_slots_used"));
    assert_eq!(value("esft_requests_running"), 0.0);
    assert_eq!(value("esft_requests_waiting"), 0.0);
    assert_eq!(
        value("esft_adapter_requests_running{adapter=\"(base)\"}"),
        0.0
    );
    assert!(value("esft_engine_steps_total") >= 12.0);
    // Every sample line belongs to a family with HELP and TYPE, all `esft_`.
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let name = l.split(['{', ' ']).next().unwrap();
        assert!(name.starts_with("esft_"), "{l}");
        let family = ["_bucket", "_sum", "_count"].iter().fold(name, |n, s| {
            if text.contains(&format!("# TYPE {} histogram", n.trim_end_matches(s))) {
                n.trim_end_matches(s)
            } else {
                n
            }
        });
        assert!(text.contains(&format!("# HELP {family} ")), "{l}");
    }
}

/// A loopback server for the tests that need real connections.
async fn serve_tcp(s: &Srv) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = s.app.clone();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

async fn wait_running(engine: &esft::engine::Engine, want: u64) -> bool {
    for _ in 0..300 {
        if engine.stats.running.load(Ordering::Relaxed) == want
            && (want > 0 || engine.stats.waiting.load(Ordering::Relaxed) == 0)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_its_sequence() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = server(false, |_| {});
    let addr = serve_tcp(&s).await;
    let engine = s.state.served().unwrap().engine.clone();
    for stream in [true, false] {
        let body = json!({"model": "lite", "prompt": [5, 6, 7], "max_tokens": 4000, "ignore_eos": true, "stream": stream}).to_string();
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        c.write_all(head.as_bytes()).await.unwrap();
        c.write_all(body.as_bytes()).await.unwrap();
        if stream {
            let mut buf = [0u8; 512];
            let n = c.read(&mut buf).await.unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        }
        assert!(wait_running(&engine, 1).await, "the request runs");
        drop(c);
        assert!(
            wait_running(&engine, 0).await,
            "stream={stream}: the sequence is freed after the client left"
        );
        assert_eq!(engine.stats.kv_cache_bytes.load(Ordering::Relaxed), 0);
    }
    let (_, text) = s.raw(Method::GET, "/metrics", None, Body::empty()).await;
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.contains("esft_sequences_finished_total{finish_reason=\"cancelled\"} 2"),
        "{text}"
    );
}

/// A request through the router: status, headers and body.
async fn exchange(s: &Srv, key: &str, body: Value) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/completions")
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = s.app.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes().to_vec();
    (parts.status, parts.headers, bytes)
}

async fn wait_waiting(engine: &esft::engine::Engine, want: usize) {
    for _ in 0..500 {
        if engine.admission.waiting() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} waiting, want {want}", engine.admission.waiting());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_at_once_per_tenant_and_in_all() {
    let s = std::sync::Arc::new(server(true, |c| {
        c.engine.max_running = 1;
        c.engine.max_batch_tokens = 64;
        c.engine.max_waiting = 2;
        c.engine.max_waiting_per_tenant = 1;
    }));
    let engine = s.state.served().unwrap().engine.clone();
    let long =
        json!({"model": "lite", "prompt": [5, 6, 7], "max_tokens": 3000, "ignore_eos": true});
    // One runs; one of acme's waits.
    let running = tokio::spawn({
        let s = s.clone();
        let body = long.clone();
        async move { exchange(&s, ADMIN, body).await }
    });
    assert!(wait_running(&engine, 1).await);
    let waiting = tokio::spawn({
        let s = s.clone();
        async move {
            exchange(
                &s,
                ACME,
                json!({"model": "lite", "prompt": [5], "max_tokens": 2}),
            )
            .await
        }
    });
    wait_waiting(&engine, 1).await;
    // acme's second: its tenant's limit; answered at once, OpenAI-shaped, with Retry-After.
    let t0 = std::time::Instant::now();
    let (st, headers, body) = exchange(
        &s,
        ACME,
        json!({"model": "lite", "prompt": "hello", "max_tokens": 2}),
    )
    .await;
    assert!(t0.elapsed() < Duration::from_secs(2));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_error(&(st, v.clone()), StatusCode::TOO_MANY_REQUESTS, None);
    assert_eq!(v["error"]["code"], "server_overloaded", "{v}");
    assert_eq!(v["error"]["type"], "server_overloaded", "{v}");
    assert_eq!(headers["retry-after"], "1");
    // globex fits (2 in all), then n = 2 would pass the whole limit: refused whole.
    let globex = tokio::spawn({
        let s = s.clone();
        async move {
            exchange(
                &s,
                GLOBEX,
                json!({"model": "lite", "prompt": [5], "max_tokens": 2}),
            )
            .await
        }
    });
    wait_waiting(&engine, 2).await;
    let (st, _, body) = exchange(
        &s,
        ADMIN,
        json!({"model": "lite", "prompt": [5], "max_tokens": 2, "n": 2}),
    )
    .await;
    assert_eq!(
        st,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let (_, text) = s.get_text("/metrics", Some(ADMIN)).await;
    for line in [
        "esft_requests_rejected_total{reason=\"max_waiting\"} 1",
        "esft_requests_rejected_total{reason=\"max_waiting_per_tenant\"} 1",
    ] {
        assert!(text.contains(line), "{line}\n{text}");
    }
    // The waiting ones run once the long one ends; nothing is left counted.
    running.abort();
    for h in [waiting, globex] {
        let (st, _, body) = h.await.unwrap();
        assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    }
    wait_waiting(&engine, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waits_too_long_gets_429_and_one_that_runs_too_long_ends_as_length() {
    let s = std::sync::Arc::new(server(true, |c| {
        c.engine.max_running = 1;
        c.engine.max_batch_tokens = 64;
        c.limits.max_queue_seconds = 0.1;
        c.limits.max_request_seconds = 0.4;
    }));
    let engine = s.state.served().unwrap().engine.clone();
    let long =
        json!({"model": "lite", "prompt": [5, 6, 7], "max_tokens": 4000, "ignore_eos": true});
    let mut long_requests = 0;
    for stream in [false, true] {
        let mut attempts = 0;
        let (running, st, body) = loop {
            attempts += 1;
            long_requests += 1;
            let sent = std::time::Instant::now();
            let running = tokio::spawn({
                let s = s.clone();
                let mut body = long.clone();
                body["stream"] = json!(stream);
                async move { exchange(&s, ADMIN, body).await }
            });
            assert!(wait_running(&engine, 1).await);
            let late = sent.elapsed() > std::time::Duration::from_millis(250);
            // A second request waits behind it past max_queue_seconds: 429, not a stream.
            let (st, _, body) = exchange(
                &s,
                ACME,
                json!({"model": "lite", "prompt": [5], "max_tokens": 2, "stream": stream}),
            )
            .await;
            if st != StatusCode::TOO_MANY_REQUESTS && late && attempts < 3 {
                // This thread came back too late (a loaded machine) to ask while the first
                // request still had more than the queue's limit to run: try again.
                let _ = running.await;
                continue;
            }
            break (running, st, body);
        };
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_error(&(st, v.clone()), StatusCode::TOO_MANY_REQUESTS, None);
        assert_eq!(v["error"]["code"], "queue_timeout", "{v}");
        // The long one ends at max_request_seconds with what it made, as `length`.
        let (st, _, body) = running.await.unwrap();
        assert_eq!(st, StatusCode::OK);
        let (finish, tokens) = if stream {
            let data = sse_data(&body);
            assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
            let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
            (last["choices"][0]["finish_reason"].clone(), data.len() - 2)
        } else {
            let v: Value = serde_json::from_slice(&body).unwrap();
            let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
            (v["choices"][0]["finish_reason"].clone(), n)
        };
        assert_eq!(finish, "length", "stream={stream}");
        assert!(tokens > 0 && tokens < 4000, "stream={stream}: {tokens}");
    }
    let (_, text) = s.get_text("/metrics", Some(ADMIN)).await;
    let line = "esft_requests_rejected_total{reason=\"queue_timeout\"} 2";
    assert!(text.contains(line), "{line}\n{text}");
    // Every long request ran into max_request_seconds.
    let line =
        format!("esft_requests_rejected_total{{reason=\"request_timeout\"}} {long_requests}");
    assert!(text.contains(&line), "{line}\n{text}");
}
