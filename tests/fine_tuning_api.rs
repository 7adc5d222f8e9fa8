//! The fine-tuning jobs API in process on the `lite` fixture, with real `esft-train`
//! children: a job trains, installs and serves its adapter to its tenant only; every
//! refusal; cancel of a running and of a queued job; a file in use; a loss that turns NaN;
//! the expert-selection preview. A job's whole life and its cancel run on both records
//! databases (SQLite, and a throwaway PostgreSQL: `common/postgres.rs`).

#[path = "common/app.rs"]
mod app;
mod common;
#[path = "common/postgres.rs"]
mod postgres;

use app::*;
use axum::http::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// `n` chat examples the lite tokenizer reads.
fn examples(n: usize) -> String {
    let words = ["apple", "river", "stone", "cloud", "tiger", "lemon"];
    (0..n)
        .map(|i| {
            let w = words[i % words.len()];
            json!({"messages": [
                {"role": "user", "content": format!("Item {i}: name the {w}.")},
                {"role": "assistant", "content": format!("It is the {w}.")},
            ]})
            .to_string()
                + "\n"
        })
        .collect()
}

async fn file(srv: &Srv, key: Option<&str>, n: usize) -> String {
    let (s, v) = srv.upload(key, examples(n).as_bytes()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// A short job: `steps` steps of small batches.
fn job(file: &str, steps: u64) -> Value {
    json!({
        "model": "lite",
        "training_file": file,
        "suffix": "t",
        "seed": 3,
        "method": {
            "type": "supervised",
            "supervised": {"hyperparameters": {"batch_size": 2}},
            "esft": {"steps": steps, "scoring_tokens": 400, "seq_len": 64, "top_p": 0.5},
        },
    })
}

async fn create(srv: &Srv, key: Option<&str>, body: Value) -> Value {
    let (s, v) = srv.post("/v1/fine_tuning/jobs", key, body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "fine_tuning.job");
    v
}

/// Polls the job until `done` holds of it (or panics after `secs`).
async fn wait_for(
    srv: &Srv,
    key: Option<&str>,
    id: &str,
    secs: u64,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        let (s, v) = srv.get(&format!("/v1/fine_tuning/jobs/{id}"), key).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        if done(&v) {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "job {id} did not get there in {secs} s: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the job until it has ended (succeeded, failed or cancelled).
async fn ended(srv: &Srv, key: Option<&str>, id: &str, secs: u64) -> Value {
    wait_for(srv, key, id, secs, |v| {
        ["succeeded", "failed", "cancelled"].contains(&v["status"].as_str().unwrap())
    })
    .await
}

async fn events(srv: &Srv, key: Option<&str>, id: &str) -> Vec<Value> {
    let (s, v) = srv
        .get(
            &format!("/v1/fine_tuning/jobs/{id}/events?limit=10000"),
            key,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["data"].as_array().unwrap().clone()
}

fn messages(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .rev()
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_trains_installs_and_serves_its_tenant_only() {
    for db in postgres::databases() {
        eprintln!("on {}", db.name);
        a_job_trains_installs_and_serves_its_tenant_only_on(&db.url).await;
    }
}

async fn a_job_trains_installs_and_serves_its_tenant_only_on(database: &str) {
    let srv = server(true, |c| c.fine_tuning.database = database.to_string());
    let training = file(&srv, Some(ACME), 40).await;
    let created = create(&srv, Some(ACME), job(&training, 4)).await;
    let id = created["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("ftjob-"));
    assert_eq!(created["status"], "queued");
    assert_eq!(created["organization_id"], "acme");
    assert_eq!(created["fine_tuned_model"], Value::Null);
    assert_eq!(created["hyperparameters"]["batch_size"], 2);
    assert_eq!(created["integrations"], json!([]));
    assert_eq!(created["method"]["esft"]["score_function"], "token");

    let done = wait_for(&srv, Some(ACME), &id, 180, |v| {
        !["validating_files", "queued", "running"].contains(&v["status"].as_str().unwrap())
    })
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let model = done["fine_tuned_model"].as_str().unwrap().to_string();
    let short = id.trim_start_matches("ftjob-")[..8].to_ascii_lowercase();
    assert_eq!(model, format!("ft:lite:t:{short}"));
    // The adapter's manifest names the training file by its id, not by a server path.
    let (s, adapter) = srv.get(&format!("/v1/adapters/{model}"), Some(ACME)).await;
    assert_eq!(s, StatusCode::OK, "{adapter}");
    assert_eq!(
        adapter["manifest"]["training"]["data"],
        training.as_str(),
        "{adapter}"
    );
    let data_dir = srv.state.config.fine_tuning.data_dir.display().to_string();
    assert!(!adapter.to_string().contains(&data_dir), "{adapter}");
    assert!(done["finished_at"].as_i64().unwrap() >= done["created_at"].as_i64().unwrap());
    assert!(done["trained_tokens"].as_i64().unwrap() > 0, "{done}");
    let sel = &done["esft"]["selection"];
    let n = sel["selected_experts"].as_u64().unwrap();
    assert!(n > 0 && n < 32, "{sel}");
    assert_eq!(sel["total_experts"], 32);
    // lite: a routed expert is 3 matrices of 64 x 24.
    assert_eq!(sel["trainable_params"].as_u64().unwrap(), n * 3 * 64 * 24);

    let log = messages(&events(&srv, Some(ACME), &id).await);
    let at = |needle: &str| {
        log.iter()
            .position(|m| m.contains(needle))
            .unwrap_or_else(|| panic!("no event {needle:?} in {log:#?}"))
    };
    let order = [
        at("Validating training file"),
        at("Files validated"),
        at("Fine-tuning job started"),
        at("Scored the experts"),
        at("Selected"),
        at("Training "),
        at("Step 1/4"),
        at("Training done"),
        at("successfully completed"),
    ];
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{log:#?}");
    let all = events(&srv, Some(ACME), &id).await;
    let metric = all.iter().find(|e| e["type"] == "metrics").unwrap();
    assert!(metric["data"]["train_loss"].as_f64().unwrap().is_finite());
    assert!(metric["data"]["step"].as_u64().is_some());
    // Every step is in the job's result file (OpenAI's CSV), visible to its owner only;
    // it goes with its job.
    let results = done["result_files"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{done}");
    let result = results[0].as_str().unwrap();
    let (s, csv) = srv
        .get_text(&format!("/v1/files/{result}/content"), Some(ACME))
        .await;
    assert_eq!(s, StatusCode::OK, "{csv}");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    );
    assert_eq!(lines.len(), 5, "{csv}");
    for (i, line) in lines[1..].iter().enumerate() {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells.len(), 5, "{line}");
        assert_eq!(cells[0], (i + 1).to_string(), "{csv}");
        assert!(cells[1].parse::<f64>().unwrap().is_finite(), "{line}");
    }
    let (s, object) = srv.get(&format!("/v1/files/{result}"), Some(ACME)).await;
    assert_eq!(s, StatusCode::OK, "{object}");
    assert_eq!(object["purpose"], "fine-tune-results");
    assert_eq!(object["bytes"], csv.len());
    let (s, _) = srv.get(&format!("/v1/files/{result}"), Some(GLOBEX)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = srv
        .get_text(&format!("/v1/files/{result}/content"), Some(GLOBEX))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let gone = srv
        .call(
            Method::DELETE,
            &format!("/v1/files/{result}"),
            Some(ACME),
            None,
        )
        .await;
    assert_error(&gone, StatusCode::BAD_REQUEST, Some("id"));
    // Pages of events, newest first, follow the cursor.
    let (_, first) = srv
        .get(
            &format!("/v1/fine_tuning/jobs/{id}/events?limit=2"),
            Some(ACME),
        )
        .await;
    assert_eq!(first["has_more"], true);
    let last = first["data"][1]["id"].as_str().unwrap();
    let (_, next) = srv
        .get(
            &format!("/v1/fine_tuning/jobs/{id}/events?limit=2&after={last}"),
            Some(ACME),
        )
        .await;
    assert_eq!(next["data"][0]["id"], all[2]["id"]);

    let (s, ck) = srv
        .get(
            &format!("/v1/fine_tuning/jobs/{id}/checkpoints"),
            Some(ACME),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{ck}");
    let newest = &ck["data"][0];
    assert_eq!(newest["object"], "fine_tuning.job.checkpoint");
    assert_eq!(newest["step_number"], 4);
    assert_eq!(newest["fine_tuned_model_checkpoint"], model.as_str());
    assert_eq!(newest["fine_tuning_job_id"], id.as_str());

    // Served at once, to its tenant: listed with its parent, and it generates.
    let (_, models) = srv.get("/v1/models", Some(ACME)).await;
    let entry = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == model.as_str())
        .unwrap_or_else(|| panic!("{model} not listed: {models}"))
        .clone();
    assert_eq!(entry["parent"], "lite");
    let ask =
        json!({"model": model, "prompt": "Item 3: name the", "max_tokens": 4, "temperature": 0});
    let (s, v) = srv.post("/v1/completions", Some(ACME), ask.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(srv
        .adapters
        .join("@acme")
        .join(&model)
        .join("adapter.json")
        .is_file());
    // Nothing of the job's work is left.
    let work = srv.state.config.fine_tuning.data_dir.join("jobs").join(&id);
    assert!(!work.exists());

    // Another tenant sees none of it.
    for uri in [
        format!("/v1/fine_tuning/jobs/{id}"),
        format!("/v1/fine_tuning/jobs/{id}/events"),
        format!("/v1/fine_tuning/jobs/{id}/checkpoints"),
        format!("/v1/files/{training}"),
    ] {
        assert_error(
            &srv.get(&uri, Some(GLOBEX)).await,
            StatusCode::NOT_FOUND,
            None,
        );
    }
    assert_error(
        &srv.post(
            &format!("/v1/fine_tuning/jobs/{id}/cancel"),
            Some(GLOBEX),
            json!({}),
        )
        .await,
        StatusCode::NOT_FOUND,
        None,
    );
    let (_, theirs) = srv.get("/v1/fine_tuning/jobs", Some(GLOBEX)).await;
    assert_eq!(theirs["data"], json!([]));
    let (_, models) = srv.get("/v1/models", Some(GLOBEX)).await;
    assert!(!models.to_string().contains(&model));
    assert_error(
        &srv.post("/v1/completions", Some(GLOBEX), ask).await,
        StatusCode::NOT_FOUND,
        Some("model"),
    );
    // The admin sees it; its own list is paginated.
    let (_, all_jobs) = srv.get("/v1/fine_tuning/jobs?limit=1", Some(ADMIN)).await;
    assert_eq!(all_jobs["data"][0]["id"], id.as_str());
    assert_eq!(all_jobs["has_more"], false);
    // A finished job cannot be cancelled; its file is free again.
    let got = srv
        .post(
            &format!("/v1/fine_tuning/jobs/{id}/cancel"),
            Some(ACME),
            json!({}),
        )
        .await;
    assert_error(&got, StatusCode::BAD_REQUEST, None);
    assert_eq!(got.1["error"]["code"], "job_not_cancellable");
    let (s, _) = srv
        .call(
            Method::DELETE,
            &format!("/v1/files/{training}"),
            Some(ACME),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);

    let (_, metrics) = srv.get_text("/metrics", Some(ADMIN)).await;
    assert!(
        metrics.contains("esft_fine_tuning_jobs{status=\"succeeded\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("esft_fine_tuning_job_duration_seconds_count{status=\"succeeded\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_job_at_once_and_a_queued_one_holds_its_file() {
    for db in postgres::databases() {
        eprintln!("on {}", db.name);
        cancel_stops_a_running_job_at_once_and_a_queued_one_holds_its_file_on(&db.url).await;
    }
}

async fn cancel_stops_a_running_job_at_once_and_a_queued_one_holds_its_file_on(database: &str) {
    let srv = server(true, |c| {
        c.fine_tuning.max_concurrent_jobs = 1;
        c.fine_tuning.database = database.to_string();
    });
    let training = file(&srv, Some(ACME), 40).await;
    let long = create(&srv, Some(ACME), job(&training, 100_000)).await;
    let long_id = long["id"].as_str().unwrap().to_string();
    // Running and training.
    let start = Instant::now();
    loop {
        let ev = events(&srv, Some(ACME), &long_id).await;
        if ev.iter().any(|e| e["type"] == "metrics") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{ev:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A second job waits in the queue; its file cannot be deleted meanwhile.
    let other = file(&srv, Some(ACME), 20).await;
    let queued = create(&srv, Some(ACME), job(&other, 2)).await;
    let queued_id = queued["id"].as_str().unwrap().to_string();
    let got = srv
        .call(
            Method::DELETE,
            &format!("/v1/files/{other}"),
            Some(ACME),
            None,
        )
        .await;
    assert_error(&got, StatusCode::CONFLICT, None);
    assert_eq!(got.1["error"]["code"], "file_in_use");
    let (s, v) = srv
        .post(
            &format!("/v1/fine_tuning/jobs/{queued_id}/cancel"),
            Some(ACME),
            json!({}),
        )
        .await;
    assert_eq!(
        (s, v["status"].as_str()),
        (StatusCode::OK, Some("cancelled"))
    );
    let (s, _) = srv
        .call(
            Method::DELETE,
            &format!("/v1/files/{other}"),
            Some(ACME),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);

    // Cancel the running one: its child is gone within 2 s.
    let runner = srv.state.started_runner().unwrap();
    assert_eq!(runner.running(), 1);
    let t = Instant::now();
    let (s, v) = srv
        .post(
            &format!("/v1/fine_tuning/jobs/{long_id}/cancel"),
            Some(ACME),
            json!({}),
        )
        .await;
    assert_eq!(
        (s, v["status"].as_str()),
        (StatusCode::OK, Some("cancelled")),
        "{v}"
    );
    while runner.running() > 0 {
        assert!(t.elapsed() < Duration::from_secs(2), "the job still runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done = wait_for(&srv, Some(ACME), &long_id, 5, |v| {
        v["status"] == "cancelled"
    })
    .await;
    assert_eq!(done["fine_tuned_model"], Value::Null);
    let work = srv
        .state
        .config
        .fine_tuning
        .data_dir
        .join("jobs")
        .join(&long_id);
    let t = Instant::now();
    while work.exists() {
        assert!(t.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!srv
        .adapters
        .join("@acme")
        .join(long["esft"]["adapter"].as_str().unwrap())
        .exists());
    assert!(messages(&events(&srv, Some(ACME), &long_id).await)
        .iter()
        .any(|m| m == "Job cancelled"));
    let got = srv
        .post(
            &format!("/v1/fine_tuning/jobs/{long_id}/cancel"),
            Some(ACME),
            json!({}),
        )
        .await;
    assert_error(&got, StatusCode::BAD_REQUEST, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loss_that_turns_nan_fails_the_job_and_leaves_no_adapter() {
    let srv = server(false, |_| {});
    let training = file(&srv, None, 40).await;
    let mut body = job(&training, 50);
    body["method"]["esft"]["learning_rate"] = json!(1e6);
    let created = create(&srv, None, body).await;
    let id = created["id"].as_str().unwrap();
    let done = ended(&srv, None, id, 180).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "nan_loss", "{done}");
    assert!(done["error"]["message"].as_str().unwrap().contains("step"));
    assert_eq!(done["fine_tuned_model"], Value::Null);
    assert!(!srv
        .adapters
        .join(created["esft"]["adapter"].as_str().unwrap())
        .exists());
    let log = messages(&events(&srv, None, id).await);
    assert!(
        log.iter().any(|m| m.starts_with("The job failed")),
        "{log:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preview_selects_what_a_job_trains() {
    let srv = server(true, |_| {});
    let training = file(&srv, Some(ACME), 40).await;
    let choices = json!({"scoring_tokens": 400, "top_p": 0.5});
    let (s, preview) = srv
        .post(
            "/v1/fine_tuning/expert_selection",
            Some(ACME),
            json!({"model": "lite", "training_file": training, "seed": 3, "esft": choices}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{preview}");
    assert_eq!(preview["object"], "fine_tuning.expert_selection");
    let n = preview["selected_experts"].as_u64().unwrap();
    assert!(n > 0);
    assert_eq!(
        preview["trainable_params"].as_u64().unwrap(),
        n * 3 * 64 * 24
    );
    assert_eq!(
        preview["adapter_bytes"].as_u64().unwrap(),
        n * 3 * 64 * 24 * 4
    );
    assert_eq!(preview["scored_tokens"].as_u64().unwrap(), 400);
    // The same choices in a job select the same experts.
    let created = create(&srv, Some(ACME), job(&training, 1)).await;
    let id = created["id"].as_str().unwrap();
    let done = wait_for(&srv, Some(ACME), id, 180, |v| {
        !v["esft"]["selection"].is_null()
    })
    .await;
    assert_eq!(done["esft"]["selection"]["experts"], preview["experts"]);
    // Another tenant's file is not found.
    let got = srv
        .post(
            "/v1/fine_tuning/expert_selection",
            Some(GLOBEX),
            json!({"model": "lite", "training_file": training}),
        )
        .await;
    assert_error(&got, StatusCode::NOT_FOUND, Some("training_file"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_openai_errors() {
    let srv = server(true, |_| {});
    let training = file(&srv, Some(ACME), 20).await;
    let small = file(&srv, Some(ACME), 3).await;
    let theirs = file(&srv, Some(GLOBEX), 20).await;
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut b = json!({"model": "lite", "training_file": training});
        edit(&mut b);
        b
    };
    let hyper = |k: &str, v: Value| {
        let k = k.to_string();
        with(
            &move |b| b["method"] = json!({"type": "supervised", "supervised": {"hyperparameters": {k.clone(): v.clone()}}}),
        )
    };
    let esft = |k: &str, v: Value| {
        let k = k.to_string();
        with(&move |b| b["esft"] = json!({k.clone(): v.clone()}))
    };
    let hp = "method.supervised.hyperparameters";
    let cases: Vec<(Value, StatusCode, Option<String>)> = vec![
        (
            with(&|b| b["model"] = json!("gpt-4o")),
            StatusCode::NOT_FOUND,
            Some("model".into()),
        ),
        (
            with(&|b| b["suffix"] = json!("Bad_Suffix")),
            StatusCode::BAD_REQUEST,
            Some("suffix".into()),
        ),
        (
            with(&|b| b["suffix"] = json!("a".repeat(65))),
            StatusCode::BAD_REQUEST,
            Some("suffix".into()),
        ),
        (
            hyper("n_epochs", json!(0)),
            StatusCode::BAD_REQUEST,
            Some(format!("{hp}.n_epochs")),
        ),
        (
            hyper("n_epochs", json!("many")),
            StatusCode::BAD_REQUEST,
            Some(format!("{hp}.n_epochs")),
        ),
        (
            hyper("n_epochs", json!(2.5)),
            StatusCode::BAD_REQUEST,
            Some(format!("{hp}.n_epochs")),
        ),
        (
            hyper("batch_size", json!(true)),
            StatusCode::BAD_REQUEST,
            Some(format!("{hp}.batch_size")),
        ),
        (
            hyper("learning_rate_multiplier", json!(-1)),
            StatusCode::BAD_REQUEST,
            Some(format!("{hp}.learning_rate_multiplier")),
        ),
        (
            hyper("warmup", json!(3)),
            StatusCode::BAD_REQUEST,
            Some(format!("{hp}.warmup")),
        ),
        (
            with(&|b| b["hyperparameters"] = json!({"n_epochs": 0})),
            StatusCode::BAD_REQUEST,
            Some("hyperparameters.n_epochs".into()),
        ),
        (
            esft("top_p", json!(1.5)),
            StatusCode::BAD_REQUEST,
            Some("esft.top_p".into()),
        ),
        (
            esft("score_function", json!("random")),
            StatusCode::BAD_REQUEST,
            Some("esft.score_function".into()),
        ),
        (
            esft("steps", json!(0)),
            StatusCode::BAD_REQUEST,
            Some("esft.steps".into()),
        ),
        (
            esft("seq_len", json!(1_000_000)),
            StatusCode::BAD_REQUEST,
            Some("esft.seq_len".into()),
        ),
        (
            esft("train_non_expert_modules", json!(true)),
            StatusCode::BAD_REQUEST,
            Some("esft.train_non_expert_modules".into()),
        ),
        (
            esft("colour", json!(1)),
            StatusCode::BAD_REQUEST,
            Some("esft.colour".into()),
        ),
        (
            with(&|b| b["method"] = json!({"type": "dpo"})),
            StatusCode::BAD_REQUEST,
            Some("method.type".into()),
        ),
        (
            with(&|b| {
                b["metadata"] = (0..17)
                    .map(|i| (format!("k{i}"), json!("v")))
                    .collect::<serde_json::Map<_, _>>()
                    .into()
            }),
            StatusCode::BAD_REQUEST,
            Some("metadata".into()),
        ),
        (
            with(&|b| b["training_file"] = json!(theirs)),
            StatusCode::NOT_FOUND,
            Some("training_file".into()),
        ),
        (
            with(&|b| b["training_file"] = json!("file-nothing")),
            StatusCode::NOT_FOUND,
            Some("training_file".into()),
        ),
        (
            with(&|b| b["validation_file"] = json!(theirs)),
            StatusCode::NOT_FOUND,
            Some("validation_file".into()),
        ),
        (
            with(&|b| b["training_file"] = json!(small)),
            StatusCode::BAD_REQUEST,
            Some("training_file".into()),
        ),
        (
            with(&|b| b["learning_rate"] = json!(1)),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            json!({"training_file": training}),
            StatusCode::BAD_REQUEST,
            None,
        ),
    ];
    for (body, status, param) in cases {
        let got = srv
            .post("/v1/fine_tuning/jobs", Some(ACME), body.clone())
            .await;
        assert_error(&got, status, param.as_deref());
        let _ = body;
    }
    let (_, jobs) = srv.get("/v1/fine_tuning/jobs", Some(ACME)).await;
    assert_eq!(jobs["data"], json!([]), "a refused request left a job");
    for uri in [
        "/v1/fine_tuning/jobs/ftjob-nothing",
        "/v1/fine_tuning/jobs/ftjob-nothing/events",
        "/v1/fine_tuning/jobs/ftjob-nothing/checkpoints",
    ] {
        assert_error(&srv.get(uri, Some(ACME)).await, StatusCode::NOT_FOUND, None);
    }
    assert_error(
        &srv.get("/v1/fine_tuning/jobs?limit=0", Some(ACME)).await,
        StatusCode::BAD_REQUEST,
        Some("limit"),
    );
    assert_error(
        &srv.get("/v1/fine_tuning/jobs?after=ftjob-nothing", Some(ACME))
            .await,
        StatusCode::BAD_REQUEST,
        Some("after"),
    );
    // Too many active jobs: 429.
    let srv = server(true, |c| {
        c.fine_tuning.max_active_jobs_per_tenant = 1;
        c.fine_tuning.max_concurrent_jobs = 1;
    });
    let training = file(&srv, Some(ACME), 20).await;
    create(&srv, Some(ACME), job(&training, 100_000)).await;
    let got = srv
        .post("/v1/fine_tuning/jobs", Some(ACME), job(&training, 1))
        .await;
    assert_error(&got, StatusCode::TOO_MANY_REQUESTS, None);
    assert_eq!(got.1["error"]["code"], "quota_exceeded");
    // Another tenant is not held back by it.
    let theirs = file(&srv, Some(GLOBEX), 20).await;
    let other = create(&srv, Some(GLOBEX), job(&theirs, 100_000)).await;
    for (key, id) in [(ACME, None), (GLOBEX, other["id"].as_str())] {
        let (_, list) = srv.get("/v1/fine_tuning/jobs", Some(key)).await;
        let id = id.map_or_else(
            || list["data"][0]["id"].as_str().unwrap().to_string(),
            str::to_string,
        );
        let (s, _) = srv
            .post(
                &format!("/v1/fine_tuning/jobs/{id}/cancel"),
                Some(key),
                json!({}),
            )
            .await;
        assert_eq!(s, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_max_job_seconds_fails_with_job_timeout_and_leaves_no_work() {
    let srv = server(false, |c| {
        c.fine_tuning.max_job_seconds = 3.0;
        c.fine_tuning.lease_seconds = 1.5;
        c.fine_tuning.save_every_steps = 5;
        c.fine_tuning.max_steps = 1000;
    });
    let training = file(&srv, None, 40).await;
    // Far more steps than three seconds allow.
    let created = create(&srv, None, job(&training, 1000)).await;
    let id = created["id"].as_str().unwrap();
    let done = ended(&srv, None, id, 120).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "job_timeout", "{done}");
    let took = done["finished_at"].as_i64().unwrap() - done["created_at"].as_i64().unwrap();
    assert!(took < 30, "{took} s");
    // Its partial work is gone; no adapter.
    let work = srv.state.config.fine_tuning.data_dir.join("jobs").join(id);
    for _ in 0..100 {
        if !work.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!work.exists(), "{}", work.display());
    assert_eq!(done["fine_tuned_model"], Value::Null);
    // The caps: more steps, epochs or scoring tokens than configured are refused.
    for (path, value, param) in [
        ("/method/esft/steps", json!(1001), "method.esft.steps"),
        (
            "/method/esft/scoring_tokens",
            json!(2_000_000),
            "method.esft.scoring_tokens",
        ),
        (
            "/method/supervised/hyperparameters/n_epochs",
            json!(101),
            "method.supervised.hyperparameters.n_epochs",
        ),
    ] {
        let mut body = job(&training, 10);
        *body.pointer_mut(path).unwrap_or(&mut Value::Null) = value.clone();
        if path.ends_with("n_epochs") {
            body["method"]["supervised"]["hyperparameters"]["n_epochs"] = value;
        }
        let got = srv.post("/v1/fine_tuning/jobs", None, body).await;
        assert_error(&got, StatusCode::BAD_REQUEST, Some(param));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previews_run_one_per_tenant_stop_with_their_client_and_time_out() {
    let srv = std::sync::Arc::new(server(true, |c| {
        c.fine_tuning.max_concurrent_previews = Some(2);
        c.fine_tuning.preview_timeout_seconds = 4.0;
    }));
    // This server's trainer children: those reading a file of its data directory (other
    // tests of this binary run trainers of their own).
    let data_dir = srv.state.config.fine_tuning.data_dir.display().to_string();
    let children = move || {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                String::from_utf8_lossy(&cmdline).contains(&data_dir)
            })
            .count()
    };
    let until = |want: &dyn Fn(usize) -> bool| {
        let children = children.clone();
        (0..500).any(|_| {
            let n = children();
            want(n) || {
                std::thread::sleep(Duration::from_millis(20));
                false
            }
        })
    };
    // A large scoring run: far longer than the timeout.
    let big = file(&srv, Some(ACME), 24_000).await;
    let body = json!({"model": "lite", "training_file": big,
                      "esft": {"scoring_tokens": 1_000_000}});
    let first = tokio::spawn({
        let srv = srv.clone();
        let body = body.clone();
        async move {
            srv.post("/v1/fine_tuning/expert_selection", Some(ACME), body)
                .await
        }
    });
    assert!(
        until(&|n| n > 0),
        "the first preview's trainer never started"
    );
    // acme's second preview: refused while its first runs.
    let got = srv
        .post("/v1/fine_tuning/expert_selection", Some(ACME), body.clone())
        .await;
    assert_error(&got, StatusCode::TOO_MANY_REQUESTS, None);
    assert_eq!(got.1["error"]["code"], "preview_in_progress", "{}", got.1);
    // The first runs out of time: stopped, 503 preview_timeout, its trainer gone.
    let got = first.await.unwrap();
    assert_error(&got, StatusCode::SERVICE_UNAVAILABLE, None);
    assert_eq!(got.1["error"]["code"], "preview_timeout", "{}", got.1);
    assert!(
        until(&|n| n == 0),
        "the timed-out preview's trainer still runs"
    );
    // A preview whose client goes away is stopped: no trainer child is left running.
    let gone = tokio::spawn({
        let srv = srv.clone();
        async move {
            srv.post("/v1/fine_tuning/expert_selection", Some(ACME), body)
                .await
        }
    });
    assert!(until(&|n| n > 0), "the preview's trainer never started");
    gone.abort();
    assert!(
        until(&|n| n == 0),
        "the abandoned preview's trainer still runs"
    );
    // A server that trains nothing runs no previews unless told to.
    let replica = server(true, |c| c.fine_tuning.max_concurrent_jobs = 0);
    let small = file(&replica, Some(ACME), 40).await;
    let got = replica
        .post(
            "/v1/fine_tuning/expert_selection",
            Some(ACME),
            json!({"model": "lite", "training_file": small}),
        )
        .await;
    assert_error(&got, StatusCode::SERVICE_UNAVAILABLE, None);
    assert_eq!(got.1["error"]["code"], "preview_unavailable", "{}", got.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_adapter_passes_the_tenants_quota_fails_and_leaves_no_adapter() {
    // Room for no adapter bytes at all: the finished job's install is refused.
    let srv = server(true, |c| c.limits.max_adapter_bytes_per_tenant = 1);
    let training = file(&srv, Some(ACME), 40).await;
    let created = create(&srv, Some(ACME), job(&training, 2)).await;
    let id = created["id"].as_str().unwrap();
    let done = ended(&srv, Some(ACME), id, 180).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "quota_exceeded", "{done}");
    assert!(
        done["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_adapter_bytes_per_tenant"),
        "{done}"
    );
    assert_eq!(done["fine_tuned_model"], Value::Null);
    let (s, models) = srv.get("/v1/models", Some(ACME)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(!models.to_string().contains("ft:"), "{models}");
}
