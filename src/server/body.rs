//! Reading request bodies: the one place the server takes bytes of a body, with a size
//! limit (413) and an idle timeout (408, code `body_read_timeout`: no byte for that long),
//! so that a body that stops mid-way cannot hold its connection and handler forever.
//! [`read_body`] buffers a whole body (the JSON endpoints); [`next_chunk`] hands out one
//! piece at a time (adapter uploads, which are streamed to disk); [`ApiJson`] is the JSON
//! body extractor that reports bad input OpenAI-style.

use axum::body::HttpBody as _;
use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::{FromRef, FromRequest, Request};
use axum::http::StatusCode;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;

use super::errors::ApiError;
use super::AppState;

/// The limits a JSON body is read under (`limits.max_body_bytes`,
/// `limits.body_read_timeout_seconds`).
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub idle: Duration,
}

impl FromRef<Arc<AppState>> for BodyLimits {
    fn from_ref(state: &Arc<AppState>) -> Self {
        Self {
            max_bytes: state.config.limits.max_body_bytes,
            idle: state.config.limits.body_read_timeout(),
        }
    }
}

pub fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        "the request body is larger than the server's limit",
    )
}

/// The whole body, refused with 413 beyond `limit` bytes (at once when its
/// `Content-Length` says so) and with 408 when no byte arrives for `idle`.
pub async fn read_body(body: Body, limit: usize, idle: Duration) -> Result<Bytes, ApiError> {
    if body.size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
    let mut stream = body.into_data_stream();
    let mut first: Option<Bytes> = None;
    let mut rest: Vec<u8> = Vec::new();
    while let Some(chunk) = next_chunk(&mut stream, idle).await? {
        let have = first.as_ref().map_or(0, Bytes::len) + rest.len();
        if have + chunk.len() > limit {
            return Err(too_large());
        }
        match &first {
            // A body that comes in one piece is not copied.
            None if rest.is_empty() => first = Some(chunk),
            _ => {
                if let Some(f) = first.take() {
                    rest.extend_from_slice(&f);
                }
                rest.extend_from_slice(&chunk);
            }
        }
    }
    Ok(first.unwrap_or_else(|| Bytes::from(rest)))
}

/// The next piece of a body (`None` at its end); 408 when none arrives for `idle`, 400
/// when the connection fails mid-body.
pub async fn next_chunk(
    stream: &mut BodyDataStream,
    idle: Duration,
) -> Result<Option<Bytes>, ApiError> {
    match tokio::time::timeout(idle, stream.next()).await {
        Err(_) => Err(timeout(idle)),
        Ok(None) => Ok(None),
        Ok(Some(Ok(b))) => Ok(Some(b)),
        Ok(Some(Err(e))) => Err(ApiError::bad_request(format!(
            "could not read the request body: {e}"
        ))),
    }
}

fn timeout(idle: Duration) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "invalid_request_error",
        format!(
            "no byte of the request body arrived for {} s: the request was abandoned",
            idle.as_secs_f64()
        ),
    )
    .code("body_read_timeout")
}

/// A JSON request body. Refuses, OpenAI-style: bodies over the size limit (413) or that
/// stall mid-way (408, see [`super::body`]), bytes that are not UTF-8, malformed JSON, and
/// fields of the wrong type (naming the field).
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    BodyLimits: FromRef<S>,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limits = BodyLimits::from_ref(state);
        let bytes = read_body(req.into_body(), limits.max_bytes, limits.idle).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid UTF-8: {e}")))?;
    // Syntax first, so a malformed body is not reported as a type error.
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." || path.is_empty() {
            ApiError::bad_request(inner)
        } else {
            ApiError::invalid(&path, format!("{path}: {inner}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;

    fn chunks(parts: Vec<&'static [u8]>, then_hang: bool) -> Body {
        let items = stream::iter(
            parts
                .into_iter()
                .map(|p| Ok::<_, std::io::Error>(Bytes::from_static(p))),
        );
        if then_hang {
            Body::from_stream(items.chain(stream::pending()))
        } else {
            Body::from_stream(items)
        }
    }

    #[tokio::test]
    async fn reads_whole_bodies_and_refuses_big_or_stalled_ones() {
        let idle = Duration::from_millis(200);
        let b = read_body(chunks(vec![b"ab", b"cd", b"e"], false), 5, idle).await;
        assert_eq!(b.unwrap().as_ref(), b"abcde");
        let b = read_body(Body::from("abcdef"), 5, idle).await;
        assert_eq!(b.unwrap_err().status, StatusCode::PAYLOAD_TOO_LARGE);
        let b = read_body(chunks(vec![b"abc", b"def"], false), 5, idle).await;
        assert_eq!(b.unwrap_err().status, StatusCode::PAYLOAD_TOO_LARGE);
        let t0 = std::time::Instant::now();
        let e = read_body(chunks(vec![b"{\"a\":"], true), 100, idle)
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::REQUEST_TIMEOUT);
        assert_eq!(e.code, Some("body_read_timeout"));
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(read_body(Body::empty(), 5, idle).await.unwrap().is_empty());
    }

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct T {
        a: u32,
        b: Option<Vec<String>>,
    }

    #[test]
    fn names_the_field_of_a_type_error() {
        let e = parse_json::<T>(br#"{"a": "x"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("a"));
        let e = parse_json::<T>(br#"{"a": 1, "b": [1]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("b[0]"));
        let e = parse_json::<T>(br#"{"a": 1"#).unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse_json::<T>(b"{\"a\": 1, \"c\": \"\xff\"}").unwrap_err();
        assert!(e.message.contains("UTF-8"), "{}", e.message);
        let e = parse_json::<T>(br#"{}"#).unwrap_err();
        assert!(e.message.contains("missing field `a`"), "{}", e.message);
        assert!(parse_json::<T>(br#"{"a": 1}"#).is_ok());
    }
}
