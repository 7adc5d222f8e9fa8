//! OpenAI's files API: `POST /v1/files` (multipart: `file`, `purpose` = `fine-tune`),
//! `GET /v1/files`, `GET /v1/files/{id}`, `GET /v1/files/{id}/content`,
//! `DELETE /v1/files/{id}`. HTTP only: reading the multipart body (under the body read
//! timeout and `fine_tuning.max_file_bytes`), who the owner is, and OpenAI's shapes; the
//! records, the bytes and the checks of the data are [`crate::jobs::files`]'s. A tenant
//! sees only its own files (another's answer 404, as an absent one does); the admin sees
//! all of them and owns what it uploads.

use axum::body::{Body, Bytes};
use axum::extract::multipart::MultipartError;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::auth::Caller;
use super::body::next_chunk;
use super::errors::{files_error, ApiError};
use super::objects;
use super::AppState;
use crate::jobs::files::{FilesError, Order, PURPOSE_FINE_TUNE};
use crate::jobs::queue::{job_of_result_file, JobRecord, JobsError, StepMetrics};

/// Room for the multipart envelope (boundaries, part headers, `purpose`) beyond the file.
const ENVELOPE_BYTES: u64 = 64 << 10;

/// Most bytes of the body received but not yet handed out as field data: what the
/// multipart reader may hold while it looks for a boundary or the end of a part's
/// headers (a few chunks of the connection, plus the envelope).
const MAX_UNREAD_BYTES: u64 = (1 << 20) + ENVELOPE_BYTES;

/// Longest value of a form field other than the file (`purpose`).
const MAX_FIELD_BYTES: usize = 256;

/// Largest `limit` of a listing.
const MAX_LIST: usize = 10_000;

impl Caller {
    /// Who owns what this caller uploads: its tenant, or `None` (the admin).
    fn owner(&self) -> Option<&str> {
        self.tenant()
    }

    /// Whose files this caller sees: its tenant's, or every file (`None`, the admin).
    fn viewer(&self) -> Option<&str> {
        self.tenant()
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("No such File object: {id}"))
        .param("id")
        .code("file_not_found")
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        format!("the file is larger than the server's limit of {limit} bytes"),
    )
    .param("file")
    .code("file_too_large")
}

fn envelope_too_large() -> ApiError {
    ApiError::bad_request(format!(
        "the multipart form has more than {MAX_UNREAD_BYTES} bytes outside its fields' values \
         (boundaries and part headers)"
    ))
    .code("invalid_multipart")
}

/// The request body as a stream that gives up, recording why in `failure`, when no byte
/// arrives for `idle`, more than `limit` bytes come, or more than [`MAX_UNREAD_BYTES`] of
/// what came have not been handed out as field data (`delivered` counts those): so the
/// multipart reader never buffers more than that looking for a boundary or the end of a
/// part's headers.
fn guarded(
    body: Body,
    idle: Duration,
    limit: u64,
    delivered: Arc<AtomicU64>,
    failure: Arc<Mutex<Option<ApiError>>>,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let start = Some((body.into_data_stream(), 0u64));
    futures_util::stream::unfold(start, move |state| {
        let failure = failure.clone();
        let delivered = delivered.clone();
        async move {
            let (mut stream, total) = state?;
            let fail = |e: ApiError| {
                if let Ok(mut f) = failure.lock() {
                    *f = Some(e);
                }
                Some((Err(std::io::Error::other("the upload was refused")), None))
            };
            match next_chunk(&mut stream, idle).await {
                Ok(Some(b)) => {
                    // Checked before this chunk is added: the reader holds at most the
                    // limit and one chunk of the connection.
                    if total.saturating_sub(delivered.load(Ordering::Relaxed)) > MAX_UNREAD_BYTES {
                        return fail(envelope_too_large());
                    }
                    let total = total + b.len() as u64;
                    if total > limit {
                        return fail(too_large(limit.saturating_sub(ENVELOPE_BYTES)));
                    }
                    Some((Ok(b), Some((stream, total))))
                }
                Ok(None) => None,
                Err(e) => fail(e),
            }
        }
    })
}

/// The last component of a client's file name.
fn base_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default().trim();
    if base.is_empty() {
        "file.jsonl".into()
    } else {
        base.chars().take(255).collect()
    }
}

/// `POST /v1/files`: the file is streamed to the data directory, checked line by line as
/// training data, and kept only when every line is good and the owner's quota allows it.
pub async fn upload(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    req: Request,
) -> Result<Json<Value>, ApiError> {
    let store = state.files().await?;
    let max = state.config.fine_tuning.max_file_bytes;
    let idle = state.config.limits.body_read_timeout();
    // Before any byte is read: the disk keeps its reserve, and the quota holds the bytes
    // the upload says it sends (the whole limit when it does not say).
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .map(|n| n.min(max));
    let declared = length.unwrap_or(max);
    let need = length.unwrap_or(0);
    let data_dir = &state.config.fine_tuning.data_dir;
    crate::util::room_for(data_dir, need, state.config.limits.min_free_disk_bytes)
        .map_err(|free| ApiError::insufficient_storage(need, free))?;
    let reservation = store
        .reserve(caller.owner(), declared)
        .await
        .map_err(files_error)?;
    let quota = state.config.fine_tuning.max_stored_bytes_per_tenant;
    let failure = Arc::new(Mutex::new(None::<ApiError>));
    let delivered = Arc::new(AtomicU64::new(0));
    let (parts, body) = req.into_parts();
    let body = Body::from_stream(guarded(
        body,
        idle,
        max.saturating_add(ENVELOPE_BYTES),
        delivered.clone(),
        failure.clone(),
    ));
    let deliver = |chunk: Option<Bytes>| {
        if let Some(c) = &chunk {
            delivered.fetch_add(c.len() as u64, Ordering::Relaxed);
        }
        chunk
    };
    let mut form = Multipart::from_request(Request::from_parts(parts, body), &())
        .await
        .map_err(|e| {
            ApiError::bad_request(format!(
                "send the file as multipart/form-data with the fields `file` and `purpose`: {}",
                e.body_text()
            ))
        })?;
    // Why reading the form failed: a refusal recorded by `guarded`, else a malformed form.
    let why = |e: MultipartError| {
        failure
            .lock()
            .ok()
            .and_then(|mut f| f.take())
            .unwrap_or_else(|| {
                ApiError::bad_request(format!(
                    "could not read the multipart form: {}",
                    e.body_text()
                ))
            })
    };
    let io = |e: std::io::Error| ApiError::logged("storing an uploaded file", &e);
    let mut purpose: Option<String> = None;
    let mut staged = None;
    while let Some(mut field) = form.next_field().await.map_err(why)? {
        match field.name() {
            Some("purpose") => {
                let mut value = Vec::new();
                while let Some(chunk) = deliver(field.chunk().await.map_err(why)?) {
                    if value.len() + chunk.len() > MAX_FIELD_BYTES {
                        return Err(ApiError::invalid(
                            "purpose",
                            format!("`purpose` is longer than {MAX_FIELD_BYTES} bytes: send `fine-tune`"),
                        ));
                    }
                    value.extend_from_slice(&chunk);
                }
                purpose = Some(String::from_utf8_lossy(&value).into_owned());
            }
            Some("file") => {
                if staged.is_some() {
                    return Err(ApiError::invalid("file", "send one `file` per request"));
                }
                let filename = base_name(field.file_name().unwrap_or_default());
                let tmp = store.staging().await.map_err(files_error)?;
                let mut out = tokio::fs::File::from_std(tmp.reopen().map_err(io)?);
                let mut bytes = 0u64;
                while let Some(chunk) = deliver(field.chunk().await.map_err(why)?) {
                    bytes += chunk.len() as u64;
                    if bytes > max {
                        return Err(too_large(max));
                    }
                    if bytes > reservation.bytes() {
                        return Err(files_error(FilesError::Quota {
                            used: quota.saturating_sub(reservation.bytes()),
                            size: bytes,
                            limit: quota,
                        }));
                    }
                    out.write_all(&chunk).await.map_err(io)?;
                }
                out.flush().await.map_err(io)?;
                drop(out);
                staged = Some((tmp, bytes, filename));
            }
            // Other fields are read and ignored.
            _ => while deliver(field.chunk().await.map_err(why)?).is_some() {},
        }
    }
    let purpose = purpose.ok_or_else(|| {
        ApiError::invalid("purpose", "missing the `purpose` field: send `fine-tune`")
    })?;
    if purpose != PURPOSE_FINE_TUNE {
        return Err(ApiError::invalid(
            "purpose",
            format!(
                "the purpose {purpose:?} is not supported: this server takes files for `fine-tune`"
            ),
        ));
    }
    let (tmp, bytes, filename) = staged.ok_or_else(|| {
        ApiError::invalid(
            "file",
            "missing the `file` field: send the training data as a file",
        )
    })?;
    let record = store
        .add(
            tmp,
            bytes,
            caller.owner(),
            &filename,
            &purpose,
            Some(reservation),
        )
        .await
        .map_err(files_error)?;
    tracing::info!(file = %record.id, bytes, by = caller.label(), "file uploaded");
    Ok(Json(objects::file(&record)))
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    pub purpose: Option<String>,
    pub limit: Option<String>,
    pub after: Option<String>,
    pub order: Option<String>,
}

/// A listing's `limit` query parameter: `default` when absent, else a whole number from 1
/// to `max`.
pub fn page_limit(limit: Option<&str>, default: usize, max: usize) -> Result<usize, ApiError> {
    match limit {
        None => Ok(default),
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                ApiError::invalid(
                    "limit",
                    format!("`limit` must be a whole number from 1 to {max}"),
                )
            }),
    }
}

/// `GET /v1/files`: the caller's files (every file for the admin), newest first unless
/// `order=asc`, `limit` (1-10000, default 10000) after the file `after`.
pub async fn list(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = page_limit(q.limit.as_deref(), MAX_LIST, MAX_LIST)?;
    let order = match q.order.as_deref() {
        None | Some("desc") => Order::Desc,
        Some("asc") => Order::Asc,
        Some(o) => {
            return Err(ApiError::invalid(
                "order",
                format!("`order` must be `asc` or `desc`, not {o:?}"),
            ))
        }
    };
    let store = state.files().await?;
    let page = store
        .list(
            caller.viewer(),
            q.purpose.as_deref(),
            q.after.as_deref(),
            limit,
            order,
        )
        .await
        .map_err(files_error)?;
    let data: Vec<Value> = page.files.iter().map(objects::file).collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "has_more": page.has_more,
        "first_id": page.files.first().map(|f| &f.id),
        "last_id": page.files.last().map(|f| &f.id),
    })))
}

/// The job whose result file `id` is, if the caller may see it (404 if not); `None`
/// when `id` names no result file.
async fn result_job(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<Option<JobRecord>, ApiError> {
    let Some(job_id) = job_of_result_file(id) else {
        return Ok(None);
    };
    state
        .jobs()
        .await?
        .get(caller.viewer(), &job_id)
        .await
        .map_err(|e| ApiError::logged("reading a job", &e))?
        .filter(|j| j.started_at.is_some())
        .map(Some)
        .ok_or_else(|| not_found(id))
}

/// The CSV of the result file `id` of a job the caller may see (its step metrics, read
/// in pages), and the job; `None` when `id` names no result file.
async fn result_file(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<Option<(JobRecord, String)>, ApiError> {
    let Some(job) = result_job(state, caller, id).await? else {
        return Ok(None);
    };
    let jobs = state.jobs().await?;
    let logged = |e: JobsError| ApiError::logged("reading a job's step metrics", &e);
    let job_id = job.id.clone();
    // A job's steps are at most `fine_tuning.max_steps` (checked at its creation).
    const PAGE: usize = 4096;
    let mut steps = Vec::new();
    loop {
        let after = steps.last().map_or(0, |s: &StepMetrics| s.step);
        let page = jobs.steps(&job_id, after, PAGE).await.map_err(logged)?;
        let more = page.len() == PAGE;
        steps.extend(page);
        if !more {
            break;
        }
    }
    Ok(Some((job, objects::results_csv(&steps))))
}

/// `GET /v1/files/{id}`.
pub async fn get(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if let Some((job, csv)) = result_file(&state, &caller, &id).await? {
        return Ok(Json(objects::result_file(&job, csv.len())));
    }
    let store = state.files().await?;
    match store.get(caller.viewer(), &id).await.map_err(files_error)? {
        Some(f) => Ok(Json(objects::file(&f))),
        None => Err(not_found(&id)),
    }
}

/// `GET /v1/files/{id}/content`: the bytes as uploaded, streamed from the data directory
/// (fetched from the object store first where this replica lacks them).
pub async fn content(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if let Some((_, csv)) = result_file(&state, &caller, &id).await? {
        return Ok(([(header::CONTENT_TYPE, "text/csv")], csv).into_response());
    }
    let store = state.files().await?;
    let record = store
        .get(caller.viewer(), &id)
        .await
        .map_err(files_error)?
        .ok_or_else(|| not_found(&id))?;
    let path = store.local_path(&record.id).await.map_err(files_error)?;
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| ApiError::logged(&format!("reading the bytes of {}", record.id), &e))?;
    let stream = futures_util::stream::unfold(Some(file), |state| async move {
        let mut file = state?;
        let mut buf = vec![0u8; 64 << 10];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), Some(file)))
            }
            Err(e) => {
                tracing::error!("reading an uploaded file: {e}");
                Some((Err(e), None))
            }
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, record.bytes.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// `DELETE /v1/files/{id}`. A job's result file goes with its job (400).
pub async fn delete(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if result_job(&state, &caller, &id).await?.is_some() {
        return Err(ApiError::invalid(
            "id",
            format!("{id} is a fine-tuning job's result file: it goes with its job"),
        )
        .code("result_file_not_deletable"));
    }
    let store = state.files().await?;
    match store
        .delete(caller.viewer(), &id)
        .await
        .map_err(files_error)?
    {
        Some(f) => {
            tracing::info!(file = %f.id, by = caller.label(), "file deleted");
            Ok(Json(json!({"id": f.id, "object": "file", "deleted": true})))
        }
        None => Err(not_found(&id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_lose_their_directories() {
        assert_eq!(base_name("/tmp/x/train.jsonl"), "train.jsonl");
        assert_eq!(base_name("C:\\data\\t.jsonl"), "t.jsonl");
        assert_eq!(base_name(""), "file.jsonl");
        assert_eq!(base_name("dir/"), "file.jsonl");
    }
}
