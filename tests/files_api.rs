//! The files API in process: every route, every refusal, tenancy, pagination, the quota,
//! and files that outlive the server (tenancy and restarts on both records databases:
//! SQLite, and a throwaway PostgreSQL, `common/postgres.rs`).

#[path = "common/app.rs"]
mod app;
mod common;
#[path = "common/postgres.rs"]
mod postgres;

use app::*;
use axum::body::Body;
use axum::http::{Method, StatusCode};
use serde_json::Value;
use std::path::Path;

const TRAIN: &str = concat!(
    r#"{"messages": [{"role": "user", "content": "turn on the light"}, {"role": "assistant", "content": "{\"intent\": \"on\"}"}]}"#,
    "\n",
    r#"{"prompt": "2+2=", "completion": "4"}"#,
    "\n",
    r#"{"text": "plain text to learn"}"#,
    "\n",
);

async fn send(
    srv: &Srv,
    method: Method,
    uri: &str,
    key: Option<&str>,
    ct: Option<&str>,
    body: Body,
) -> (StatusCode, Vec<u8>) {
    srv.send(method, uri, key, ct, body).await
}

async fn upload(srv: &Srv, key: Option<&str>, bytes: &[u8]) -> (StatusCode, Value) {
    srv.upload(key, bytes).await
}

async fn ok_upload(srv: &Srv, key: Option<&str>) -> String {
    let (s, v) = upload(srv, key, TRAIN.as_bytes()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["id"].as_str().unwrap().to_string()
}

async fn get(srv: &Srv, uri: &str, key: Option<&str>) -> (StatusCode, Value) {
    json(send(srv, Method::GET, uri, key, None, Body::empty()).await)
}

/// `GET /v1/files/{id}/content`: the status and the bytes.
async fn content(srv: &Srv, id: &str, key: Option<&str>) -> (StatusCode, Vec<u8>) {
    let uri = format!("/v1/files/{id}/content");
    send(srv, Method::GET, &uri, key, None, Body::empty()).await
}

async fn delete(srv: &Srv, uri: &str, key: Option<&str>) -> (StatusCode, Value) {
    json(send(srv, Method::DELETE, uri, key, None, Body::empty()).await)
}

fn ids(v: &Value) -> Vec<String> {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_string())
        .collect()
}

/// What is in the files directory (blobs and anything unfinished).
fn stored(srv: &Srv) -> Vec<String> {
    let dir = srv.state.config.fine_tuning.data_dir.join("files");
    match std::fs::read_dir(&dir) {
        Ok(r) => r
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[tokio::test]
async fn every_route_in_openai_shapes() {
    let srv = server(true, |_| {});
    let (s, f) = upload(&srv, Some(ACME), TRAIN.as_bytes()).await;
    assert_eq!(s, StatusCode::OK, "{f}");
    let id = f["id"].as_str().unwrap().to_string();
    assert!(
        id.starts_with("file-")
            && id.len() == 29
            && id[5..].bytes().all(|b| b.is_ascii_alphanumeric()),
        "{id}"
    );
    let mut keys: Vec<&str> = f.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "bytes",
            "created_at",
            "expires_at",
            "filename",
            "id",
            "object",
            "purpose",
            "status",
            "status_details"
        ]
    );
    assert_eq!(f["object"], "file");
    assert_eq!(f["bytes"], TRAIN.len());
    assert_eq!(f["filename"], "train.jsonl");
    assert_eq!(f["purpose"], "fine-tune");
    assert_eq!(f["status"], "processed");
    assert!(f["status_details"].is_null() && f["expires_at"].is_null());
    assert!(f["created_at"].as_i64().unwrap() > 1_600_000_000);

    assert_eq!(
        get(&srv, &format!("/v1/files/{id}"), Some(ACME)).await,
        (StatusCode::OK, f.clone())
    );
    let (s, list) = get(&srv, "/v1/files", Some(ACME)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"], serde_json::json!([f.clone()]));
    assert_eq!(list["has_more"], false);
    assert_eq!(
        (list["first_id"].as_str(), list["last_id"].as_str()),
        (Some(id.as_str()), Some(id.as_str()))
    );
    let (s, bytes) = content(&srv, id.as_ref(), Some(ACME)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(bytes, TRAIN.as_bytes());

    let (s, d) = delete(&srv, &format!("/v1/files/{id}"), Some(ACME)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        d,
        serde_json::json!({"id": id, "object": "file", "deleted": true})
    );
    assert_error(
        &get(&srv, &format!("/v1/files/{id}"), Some(ACME)).await,
        StatusCode::NOT_FOUND,
        Some("id"),
    );
    assert_error(
        &delete(&srv, &format!("/v1/files/{id}"), Some(ACME)).await,
        StatusCode::NOT_FOUND,
        Some("id"),
    );
    let (_, list) = get(&srv, "/v1/files", Some(ACME)).await;
    assert_eq!(list["data"], serde_json::json!([]));
    assert!(list["first_id"].is_null() && list["last_id"].is_null());
    assert!(stored(&srv).is_empty(), "{:?}", stored(&srv));

    // Keys are needed as everywhere else.
    assert_error(
        &get(&srv, "/v1/files", None).await,
        StatusCode::UNAUTHORIZED,
        None,
    );
    assert_error(
        &upload(&srv, Some("wrong"), TRAIN.as_bytes()).await,
        StatusCode::UNAUTHORIZED,
        None,
    );
}

#[tokio::test]
async fn bad_uploads_are_refused_and_leave_nothing() {
    let srv = server(true, |c| c.fine_tuning.max_file_bytes = 4096);
    let good = TRAIN.as_bytes();
    // Purpose: wrong or missing.
    for parts in [
        vec![
            ("purpose", None, b"assistants".as_slice()),
            ("file", Some("t.jsonl"), good),
        ],
        vec![("file", Some("t.jsonl"), good)],
        vec![
            ("file", Some("t.jsonl"), good),
            ("purpose", None, b"batch".as_slice()),
        ],
    ] {
        assert_error(
            &srv.upload_parts(Some(ACME), &parts).await,
            StatusCode::BAD_REQUEST,
            Some("purpose"),
        );
    }
    // No file, two files.
    assert_error(
        &srv.upload_parts(Some(ACME), &[("purpose", None, b"fine-tune")])
            .await,
        StatusCode::BAD_REQUEST,
        Some("file"),
    );
    assert_error(
        &srv.upload_parts(
            Some(ACME),
            &[
                ("purpose", None, b"fine-tune"),
                ("file", Some("a"), good),
                ("file", Some("b"), good),
            ],
        )
        .await,
        StatusCode::BAD_REQUEST,
        Some("file"),
    );
    // Bad data: the first bad line is named.
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (Vec::new(), "empty"),
        (b"\n\n  \n".to_vec(), "no samples"),
        ([good, b"this is not json\n"].concat(), "line 4: not JSON"),
        (
            [good, b"\xff\xfe\x00binary\n"].concat(),
            "line 4: not UTF-8",
        ),
        (
            [
                good,
                b"{\"messages\": [{\"role\": \"system\", \"content\": \"x\"}]}\n{\"x\": 1}\n",
            ]
            .concat(),
            "line 4: message 0 has role \"system\"",
        ),
        (b"{\"prompt\": \"a\"}\n".to_vec(), "line 1: expected"),
        (b"[1, 2, 3]\n".to_vec(), "line 1: expected a JSON object"),
        (b"{\"messages\": []}\n".to_vec(), "`messages` is empty"),
    ];
    for (bytes, want) in bad {
        let got = upload(&srv, Some(ACME), &bytes).await;
        assert_error(&got, StatusCode::BAD_REQUEST, Some("file"));
        assert_eq!(got.1["error"]["code"], "invalid_file", "{}", got.1);
        let msg = got.1["error"]["message"].as_str().unwrap();
        assert!(msg.contains(want), "{want}: {msg}");
        assert!(
            !msg.contains(srv.state.config.fine_tuning.data_dir.to_str().unwrap()),
            "{msg}"
        );
    }
    // Over the size limit: 413.
    let big = TRAIN.repeat(4096 / TRAIN.len() + 1);
    let got = upload(&srv, Some(ACME), big.as_bytes()).await;
    assert_error(&got, StatusCode::PAYLOAD_TOO_LARGE, Some("file"));
    // Not a multipart form at all.
    let (s, v) = json(
        send(
            &srv,
            Method::POST,
            "/v1/files",
            Some(ACME),
            Some("application/json"),
            Body::from("{}"),
        )
        .await,
    );
    assert_error(&(s, v), StatusCode::BAD_REQUEST, None);
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    let (s, v) = json(
        send(
            &srv,
            Method::POST,
            "/v1/files",
            Some(ACME),
            Some(&ct),
            Body::from("--nonsense"),
        )
        .await,
    );
    assert_error(&(s, v), StatusCode::BAD_REQUEST, None);
    // Nothing of any of that was kept.
    assert!(stored(&srv).is_empty(), "{:?}", stored(&srv));
    let (_, list) = get(&srv, "/v1/files", Some(ADMIN)).await;
    assert_eq!(list["data"], serde_json::json!([]));
    // A good file still goes in.
    ok_upload(&srv, Some(ACME)).await;
}

#[tokio::test]
async fn hostile_uploads_are_refused_early_with_small_answers() {
    let srv = server(true, |c| {
        c.limits.max_line_bytes = 64 << 10;
        c.fine_tuning.max_file_bytes = 32 << 20;
    });
    let small = |got: &(StatusCode, Value)| {
        let len = got.1.to_string().len();
        assert!(len <= 4096, "an error body of {len} bytes");
    };
    // A huge `purpose`: refused, quoted at most in part.
    let purpose = vec![b'p'; 16 << 20];
    let got = srv
        .upload_parts(
            Some(ACME),
            &[
                ("purpose", None, &purpose),
                ("file", Some("t.jsonl"), TRAIN.as_bytes()),
            ],
        )
        .await;
    assert_error(&got, StatusCode::BAD_REQUEST, Some("purpose"));
    small(&got);
    // A line over the limit, named by its number (the long line holds a million numbers).
    let zeros = vec!["0"; 1 << 20].join(",");
    let long = format!("{TRAIN}{{\"text\": \"a\", \"x\": [{zeros}]}}\n");
    let got = upload(&srv, Some(ACME), long.as_bytes()).await;
    assert_error(&got, StatusCode::BAD_REQUEST, Some("file"));
    small(&got);
    let msg = got.1["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("line 4: the line is longer than the limit of 65536 bytes"),
        "{msg}"
    );
    // Just under the limit, the same shape is training data (unknown fields are allowed).
    let fits = format!(
        "{{\"text\": \"a\", \"x\": [{}]}}\n",
        vec!["0"; 30_000].join(",")
    );
    assert_eq!(
        upload(&srv, Some(ACME), fits.as_bytes()).await.0,
        StatusCode::OK
    );
    // A part whose headers never end, and a preamble with no boundary: the multipart
    // reader is not left to buffer them.
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    let endless_headers = [
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; x=\"").into_bytes(),
        vec![b'h'; 8 << 20],
    ]
    .concat();
    for body in [endless_headers, vec![b'-'; 8 << 20]] {
        // In chunks, as a connection delivers them.
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            body.chunks(64 << 10).map(|c| Ok(c.to_vec())).collect();
        let body = Body::from_stream(futures_util::stream::iter(chunks));
        let got = json(send(&srv, Method::POST, "/v1/files", Some(ACME), Some(&ct), body).await);
        assert_error(&got, StatusCode::BAD_REQUEST, None);
        small(&got);
        assert_eq!(got.1["error"]["code"], "invalid_multipart", "{}", got.1);
    }
    // A huge unknown field name in a JSON body is quoted in part too.
    let key = "k".repeat(1 << 20);
    let got = srv
        .post(
            "/v1/fine_tuning/jobs",
            Some(ACME),
            serde_json::json!({ key: 1 }),
        )
        .await;
    assert_eq!(got.0, StatusCode::BAD_REQUEST, "{:.200}", got.1);
    small(&got);
    assert_eq!(stored(&srv).len(), 1, "{:?}", stored(&srv));
}

#[tokio::test]
async fn a_stalled_upload_is_refused_with_408() {
    let srv = server(true, |c| c.limits.body_read_timeout_seconds = 0.3);
    let head = form(&[
        ("purpose", None, b"fine-tune"),
        ("file", Some("t.jsonl"), TRAIN.as_bytes()),
    ]);
    let half = head[..head.len() - 40].to_vec();
    let stream =
        futures_util::stream::iter([Ok::<_, std::io::Error>(axum::body::Bytes::from(half))])
            .chain(futures_util::stream::pending());
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    let t0 = std::time::Instant::now();
    let got = json(
        send(
            &srv,
            Method::POST,
            "/v1/files",
            Some(ACME),
            Some(&ct),
            Body::from_stream(stream),
        )
        .await,
    );
    assert_error(&got, StatusCode::REQUEST_TIMEOUT, None);
    assert_eq!(got.1["error"]["code"], "body_read_timeout");
    assert!(t0.elapsed() < std::time::Duration::from_secs(10));
    assert!(stored(&srv).is_empty(), "{:?}", stored(&srv));
}

use futures_util::StreamExt as _;

#[tokio::test]
async fn tenants_see_only_their_files_and_the_admin_sees_all() {
    for db in postgres::databases() {
        eprintln!("on {}", db.name);
        tenants_see_only_their_files_and_the_admin_sees_all_on(&db.url).await;
    }
}

async fn tenants_see_only_their_files_and_the_admin_sees_all_on(database: &str) {
    let srv = server(true, |c| c.fine_tuning.database = database.to_string());
    let a = ok_upload(&srv, Some(ACME)).await;
    let g = ok_upload(&srv, Some(GLOBEX)).await;
    let admins = ok_upload(&srv, Some(ADMIN)).await;
    let absent = "file-AAAAAAAAAAAAAAAAAAAAAAAA";
    // Another tenant's file answers exactly like one that does not exist.
    for (method, suffix) in [
        (Method::GET, ""),
        (Method::GET, "/content"),
        (Method::DELETE, ""),
    ] {
        let theirs = json(
            send(
                &srv,
                method.clone(),
                &format!("/v1/files/{a}{suffix}"),
                Some(GLOBEX),
                None,
                Body::empty(),
            )
            .await,
        );
        let nothing = json(
            send(
                &srv,
                method.clone(),
                &format!("/v1/files/{absent}{suffix}"),
                Some(GLOBEX),
                None,
                Body::empty(),
            )
            .await,
        );
        assert_error(&theirs, StatusCode::NOT_FOUND, Some("id"));
        let text = theirs.1.to_string().replace(&a, absent);
        assert_eq!(text, nothing.1.to_string(), "{method} {suffix}");
    }
    // The admin's file is not a tenant's either.
    assert_error(
        &get(&srv, &format!("/v1/files/{admins}"), Some(ACME)).await,
        StatusCode::NOT_FOUND,
        Some("id"),
    );
    assert_eq!(
        ids(&get(&srv, "/v1/files", Some(ACME)).await.1),
        vec![a.clone()]
    );
    assert_eq!(
        ids(&get(&srv, "/v1/files", Some(GLOBEX)).await.1),
        vec![g.clone()]
    );
    // `after` naming another tenant's file is refused as an unknown one.
    assert_error(
        &get(&srv, &format!("/v1/files?after={a}"), Some(GLOBEX)).await,
        StatusCode::BAD_REQUEST,
        Some("after"),
    );
    // The admin sees, reads and deletes every file.
    let mut all = ids(&get(&srv, "/v1/files", Some(ADMIN)).await.1);
    all.sort();
    let mut want = vec![a.clone(), g.clone(), admins.clone()];
    want.sort();
    assert_eq!(all, want);
    let (s, bytes) = content(&srv, a.as_ref(), Some(ADMIN)).await;
    assert_eq!((s, bytes.as_slice()), (StatusCode::OK, TRAIN.as_bytes()));
    assert_eq!(
        delete(&srv, &format!("/v1/files/{g}"), Some(ADMIN)).await.0,
        StatusCode::OK
    );
    assert!(ids(&get(&srv, "/v1/files", Some(GLOBEX)).await.1).is_empty());
    // And acme's file survived globex's attempts.
    assert_eq!(
        get(&srv, &format!("/v1/files/{a}"), Some(ACME)).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn an_open_server_keeps_files_too() {
    let srv = server(false, |_| {});
    let id = ok_upload(&srv, None).await;
    assert_eq!(ids(&get(&srv, "/v1/files", None).await.1), vec![id]);
}

#[tokio::test]
async fn listings_page_with_after_limit_and_order() {
    let srv = server(true, |_| {});
    let mut made = Vec::new();
    for _ in 0..5 {
        made.push(ok_upload(&srv, Some(ACME)).await);
    }
    ok_upload(&srv, Some(GLOBEX)).await;
    // Ascending, two at a time.
    let (_, all_asc) = get(&srv, "/v1/files?order=asc", Some(ACME)).await;
    let asc = ids(&all_asc);
    assert_eq!(asc.len(), 5);
    let mut sorted = made.clone();
    sorted.sort();
    let mut got = asc.clone();
    got.sort();
    assert_eq!(got, sorted);
    let mut walked = Vec::new();
    let mut uri = "/v1/files?order=asc&limit=2".to_string();
    let mut pages = 0;
    loop {
        let (s, page) = get(&srv, &uri, Some(ACME)).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        let these = ids(&page);
        assert!(these.len() <= 2);
        assert_eq!(page["first_id"].as_str(), these.first().map(String::as_str));
        assert_eq!(page["last_id"].as_str(), these.last().map(String::as_str));
        walked.extend(these.clone());
        pages += 1;
        if !page["has_more"].as_bool().unwrap() {
            break;
        }
        uri = format!(
            "/v1/files?order=asc&limit=2&after={}",
            page["last_id"].as_str().unwrap()
        );
    }
    assert_eq!(walked, asc);
    assert_eq!(pages, 3);
    // Newest first by default: the same, reversed.
    let mut desc = ids(&get(&srv, "/v1/files", Some(ACME)).await.1);
    desc.reverse();
    assert_eq!(desc, asc);
    let (_, first) = get(&srv, "/v1/files?limit=1", Some(ACME)).await;
    assert_eq!(first["has_more"], true);
    let (_, rest) = get(
        &srv,
        &format!("/v1/files?after={}", first["last_id"].as_str().unwrap()),
        Some(ACME),
    )
    .await;
    assert_eq!(ids(&rest).len(), 4);
    assert_eq!(rest["has_more"], false);
    // By purpose.
    assert_eq!(
        ids(&get(&srv, "/v1/files?purpose=fine-tune", Some(ACME)).await.1).len(),
        5
    );
    assert!(ids(&get(&srv, "/v1/files?purpose=batch", Some(ACME)).await.1).is_empty());
    // Bad parameters.
    for (q, param) in [
        ("limit=0", "limit"),
        ("limit=10001", "limit"),
        ("limit=two", "limit"),
        ("limit=-1", "limit"),
        ("order=sideways", "order"),
        ("after=file-nope", "after"),
    ] {
        assert_error(
            &get(&srv, &format!("/v1/files?{q}"), Some(ACME)).await,
            StatusCode::BAD_REQUEST,
            Some(param),
        );
    }
    assert_eq!(
        get(&srv, "/v1/files?limit=10000", Some(ACME)).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn the_quota_is_per_tenant_and_answers_429() {
    let quota = 2 * TRAIN.len() as u64 + 10;
    let srv = server(true, |c| c.fine_tuning.max_stored_bytes_per_tenant = quota);
    let first = ok_upload(&srv, Some(ACME)).await;
    ok_upload(&srv, Some(ACME)).await;
    let got = upload(&srv, Some(ACME), TRAIN.as_bytes()).await;
    assert_error(&got, StatusCode::TOO_MANY_REQUESTS, None);
    assert_eq!(got.1["error"]["code"], "quota_exceeded");
    assert_eq!(stored(&srv).len(), 2);
    // Another tenant has its own quota; deleting frees room.
    ok_upload(&srv, Some(GLOBEX)).await;
    assert_eq!(
        delete(&srv, &format!("/v1/files/{first}"), Some(ACME))
            .await
            .0,
        StatusCode::OK
    );
    ok_upload(&srv, Some(ACME)).await;
}

#[tokio::test]
async fn files_outlive_a_restart() {
    for db in postgres::databases() {
        eprintln!("on {}", db.name);
        files_outlive_a_restart_on(&db.url).await;
    }
}

async fn files_outlive_a_restart_on(database: &str) {
    let config = |c: &mut esft::server::config::ServerConfig, dir: &std::path::Path| {
        c.fine_tuning.data_dir = dir.to_path_buf();
        c.fine_tuning.database = database.to_string();
    };
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_path_buf();
    let (id, admins) = {
        let srv = server(true, |c| config(c, &dir));
        let id = ok_upload(&srv, Some(ACME)).await;
        let admins = ok_upload(&srv, Some(ADMIN)).await;
        let gone = ok_upload(&srv, Some(ACME)).await;
        assert_eq!(
            delete(&srv, &format!("/v1/files/{gone}"), Some(ACME))
                .await
                .0,
            StatusCode::OK
        );
        (id, admins)
    };
    // What a crash mid-upload leaves behind is cleaned up when the store opens again.
    std::fs::write(dir.join("files/.upload-crashed"), b"half").unwrap();
    // (Bytes without a record are removed once they are an hour old: another process
    // sharing the directory may be about to record fresher ones.)
    let orphan = dir.join("files/file-orphanorphanorphanorphan");
    std::fs::write(&orphan, TRAIN).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&orphan)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200))
        .unwrap();
    let srv = server(true, |c| config(c, &dir));
    let (s, f) = get(&srv, &format!("/v1/files/{id}"), Some(ACME)).await;
    assert_eq!(s, StatusCode::OK, "{f}");
    assert_eq!(f["bytes"], TRAIN.len());
    let (_, bytes) = content(&srv, id.as_ref(), Some(ACME)).await;
    assert_eq!(bytes, TRAIN.as_bytes());
    assert_eq!(
        ids(&get(&srv, "/v1/files", Some(ACME)).await.1),
        vec![id.clone()]
    );
    let mut left = stored(&srv);
    left.sort();
    let mut want = vec![id, admins];
    want.sort();
    assert_eq!(left, want);
    // The records are in the database named, SQLite's file only where that is SQLite.
    assert_eq!(
        Path::new(&dir).join("esft.db").is_file(),
        database.is_empty()
    );
}

#[tokio::test]
async fn files_beyond_the_json_body_limit_are_taken_up_to_max_file_bytes() {
    let srv = server(true, |c| {
        c.limits.max_body_bytes = 1 << 16;
        c.fine_tuning.max_file_bytes = 1 << 20;
    });
    let big = TRAIN.repeat((1 << 19) / TRAIN.len());
    assert!(big.len() > 1 << 16);
    let (s, f) = upload(&srv, Some(ACME), big.as_bytes()).await;
    assert_eq!(s, StatusCode::OK, "{f}");
    assert_eq!(f["bytes"], big.len());
    let id = f["id"].as_str().unwrap();
    let (_, bytes) = content(&srv, id, Some(ACME)).await;
    assert_eq!(bytes, big.as_bytes());
    let bigger = TRAIN.repeat((1 << 20) / TRAIN.len() + 1);
    assert_error(
        &upload(&srv, Some(ACME), bigger.as_bytes()).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        Some("file"),
    );
    assert_eq!(stored(&srv), vec![id.to_string()]);
}

#[tokio::test]
async fn uploads_that_would_eat_the_disk_reserve_get_507_and_leave_nothing() {
    // A reserve larger than any disk: every upload would eat into it.
    let srv = server(true, |c| c.limits.min_free_disk_bytes = u64::MAX / 4);
    let got = upload(&srv, Some(ACME), TRAIN.as_bytes()).await;
    assert_error(&got, StatusCode::INSUFFICIENT_STORAGE, None);
    assert_eq!(got.1["error"]["code"], "insufficient_storage", "{}", got.1);
    assert!(stored(&srv).is_empty(), "{:?}", stored(&srv));
    // An adapter package too, before a byte of it is read.
    let (s, body) = srv
        .send(
            Method::POST,
            "/v1/adapters?name=big",
            Some(ACME),
            Some("application/x-tar"),
            Body::from(vec![0u8; 1024]),
        )
        .await;
    let got = json((s, body));
    assert_error(&got, StatusCode::INSUFFICIENT_STORAGE, None);
    assert!(!srv.adapters.join("@acme/big").exists());
    // With the reserve available, the same file goes in; the quota reservation it took
    // was given back for the refused one.
    let srv = server(true, |c| c.limits.min_free_disk_bytes = 1);
    ok_upload(&srv, Some(ACME)).await;
}
