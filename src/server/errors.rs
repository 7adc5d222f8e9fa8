//! OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right
//! status.

use axum::http::StatusCode;

use crate::adapter::AdapterError;
use crate::jobs::adapter_quota::QuotaError;
use crate::jobs::files::FilesError;
use crate::jobs::queue::JobsError;
use axum::response::{IntoResponse, Response};

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 507: storing what the request sends would leave the server's disk fuller than
    /// `limits.min_free_disk_bytes` allows.
    pub fn insufficient_storage(needed: u64, free: u64) -> Self {
        Self::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "server_error",
            format!(
                "the server cannot store {needed} more bytes now: it keeps a reserve of free \
                 disk space ({free} bytes are free); try again later or send less"
            ),
        )
        .code("insufficient_storage")
    }

    /// 429: the server has no room for the request now; try again after `retry_after`.
    pub fn overloaded(message: impl Into<String>, retry_after: std::time::Duration) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "server_overloaded", message)
            .code("server_overloaded");
        e.retry_after = Some(retry_after.as_secs().max(1));
        e
    }

    /// 400 for a request field.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message).param(param)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::not_found(format!(
            "the model `{model}` does not exist or you do not have access to it"
        ))
        .param("model")
        .code("model_not_found")
    }

    pub fn adapter_not_found(name: &str) -> Self {
        Self::not_found(format!(
            "the adapter `{name}` does not exist or you do not have access to it"
        ))
        .code("adapter_not_found")
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict_error", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            message,
        )
    }

    /// 503: the object store holding adapters (or files) did not answer.
    pub fn store_unavailable(message: impl Into<String>) -> Self {
        Self::unavailable(message).code("store_unavailable")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// A 500 whose details (which may name server paths) go to the log, not the client.
    pub fn logged(what: &str, e: &dyn std::fmt::Display) -> Self {
        tracing::error!("{what}: {e}");
        Self::internal(format!(
            "internal error while {what}; the details are in the server's log"
        ))
    }

    pub fn param(mut self, p: &str) -> Self {
        self.param = Some(p.to_string());
        self
    }

    pub fn code(mut self, c: &'static str) -> Self {
        self.code = Some(c);
        self
    }

    /// The JSON body. Never over [`MAX_ERROR_BODY_BYTES`]: a message or `param` that
    /// quotes the client's input at length is cut to an excerpt.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": excerpt(&self.message, MAX_MESSAGE_JSON_BYTES),
                "type": self.kind,
                "param": self.param.as_deref().map(|p| excerpt(p, MAX_PARAM_JSON_BYTES)),
                "code": self.code,
            }
        })
    }
}

/// The largest error body, in bytes of JSON.
pub const MAX_ERROR_BODY_BYTES: usize = 4096;
/// What of it a message and a `param` may take, escaped as JSON; the rest (the keys, the
/// type and the code) fits in what is left.
const MAX_MESSAGE_JSON_BYTES: usize = 3072;
const MAX_PARAM_JSON_BYTES: usize = 512;

/// `text`, cut where its JSON-escaped form would exceed `max` bytes, with a note of how
/// much was left out.
pub fn excerpt(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    let escaped = |c: char| match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    };
    // Room for the note.
    let budget = max.saturating_sub(48);
    let mut used = 0;
    for (i, c) in text.char_indices() {
        used += escaped(c);
        if used > budget {
            if text[i..].chars().map(escaped).sum::<usize>() + used - escaped(c) <= max {
                return std::borrow::Cow::Borrowed(text);
            }
            return std::borrow::Cow::Owned(format!(
                "{}... ({} more bytes)",
                &text[..i],
                text.len() - i
            ));
        }
    }
    std::borrow::Cow::Borrowed(text)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, s.into());
        }
        r
    }
}

/// Runs `f` on the blocking pool (tokenizing, reading the adapters directory), off the
/// async workers.
pub async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("a worker failed: {e}")))?
}

// Domain errors as answers: the one place each room's error becomes an HTTP error.

/// An adapter store or registry error as an answer.
pub fn adapter_error(e: AdapterError) -> ApiError {
    match e {
        AdapterError::InUse(n) => ApiError::conflict(format!(
            "the adapter `{n}` is in use by running or waiting requests"
        ))
        .code("adapter_in_use"),
        AdapterError::NotFound(n) => ApiError::adapter_not_found(&n),
        AdapterError::Exists(n) => ApiError::bad_request(format!(
            "The lora adapter '{n}' has already been loaded; pass load_inplace to replace it"
        ))
        .code("adapter_exists"),
        e @ AdapterError::Reserved { .. } => {
            ApiError::conflict(e.to_string()).code("name_reserved")
        }
        e @ AdapterError::BadName { .. } => ApiError::invalid("name", e.to_string()),
        AdapterError::Io(n, e) => ApiError::logged(&format!("storing the adapter `{n}`"), &e),
        AdapterError::StoreUnavailable(e) => {
            tracing::warn!("{e}");
            ApiError::store_unavailable(
                "the adapter registry (object store) is unavailable; try again shortly",
            )
        }
        other => ApiError::bad_request(other.to_string()).code("invalid_adapter"),
    }
}

/// A refusal of the adapter quota: 429 `quota_exceeded`, as for files and jobs.
pub fn quota_error(e: QuotaError) -> ApiError {
    match e {
        QuotaError::Db(e) => ApiError::logged("reading or writing the adapter quotas", &e),
        e => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            e.to_string(),
        )
        .code("quota_exceeded"),
    }
}

/// A files error as an answer.
pub fn files_error(e: FilesError) -> ApiError {
    match e {
        FilesError::Invalid(e) => {
            ApiError::invalid("file", FilesError::Invalid(e).to_string()).code("invalid_file")
        }
        e @ FilesError::Quota { .. } => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            format!("{e}: delete files you no longer need"),
        )
        .code("quota_exceeded"),
        e @ FilesError::InUse(_) => {
            ApiError::new(StatusCode::CONFLICT, "invalid_request_error", e.to_string())
                .param("id")
                .code("file_in_use")
        }
        FilesError::NoSuchFile(id) => ApiError::invalid(
            "after",
            format!("`after` must be the id of a file in the list; there is no file `{id}`"),
        ),
        FilesError::Io(e) => ApiError::logged("storing files", &e),
        FilesError::Store(e) => {
            tracing::error!("the object store of files: {e}");
            ApiError::unavailable("the file store is unavailable; try again shortly")
                .code("store_unavailable")
        }
        FilesError::Db(e) => ApiError::logged("reading or writing the files database", &e),
    }
}

/// A jobs error as an answer.
pub fn jobs_error(e: JobsError) -> ApiError {
    match e {
        JobsError::NoSuchFile { param, id } => {
            ApiError::not_found(format!("No such File object: {id}"))
                .param(param)
                .code("file_not_found")
        }
        JobsError::NoSuchCursor { what, id } => ApiError::invalid(
            "after",
            format!("`after` must be the id of a {what} in the list; there is no {what} `{id}`"),
        ),
        e @ JobsError::Quota { .. } => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            format!("{e}: wait for one to end or cancel one"),
        )
        .code("quota_exceeded"),
        JobsError::Db(e) => ApiError::logged("reading or writing the jobs database", &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_stay_small_whatever_they_quote() {
        for text in [
            "x".repeat(1 << 20),
            "\u{1}".repeat(100_000),
            "\"".repeat(10_000),
            "é".repeat(5_000),
            // An escape that would cross the limit.
            format!("{}\u{1}", "a".repeat(MAX_MESSAGE_JSON_BYTES - 3)),
        ] {
            let e = ApiError::invalid(&text, text.clone());
            let body = e.body().to_string();
            assert!(body.len() <= MAX_ERROR_BODY_BYTES, "{} bytes", body.len());
            let message = e.body()["error"]["message"].as_str().unwrap().to_string();
            let head: String = text.chars().take(8).collect();
            assert!(message.starts_with(&head), "{message:.40}");
            assert!(
                message.ends_with("more bytes)"),
                "{}",
                &message[message.len() - 40..]
            );
        }
        // What fits is left whole, right up to the limit.
        let fits = "a".repeat(MAX_MESSAGE_JSON_BYTES);
        assert_eq!(excerpt(&fits, MAX_MESSAGE_JSON_BYTES), fits.as_str());
        let over = "a".repeat(MAX_MESSAGE_JSON_BYTES + 1);
        let cut = excerpt(&over, MAX_MESSAGE_JSON_BYTES);
        assert!(
            cut.len() <= MAX_MESSAGE_JSON_BYTES && cut.ends_with("more bytes)"),
            "{cut}"
        );
        assert_eq!(excerpt("short", 100), "short");
    }
}
