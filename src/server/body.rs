//! Reading request bodies: the one place the server takes bytes of a body, with a size
//! limit (413) and an idle timeout (408, code `body_read_timeout`: no byte for that long),
//! so that a body that stops mid-way cannot hold its connection and handler forever.
//! [`read_body`] buffers a whole body (the JSON endpoints); [`next_chunk`] hands out one
//! piece at a time (adapter uploads, which are streamed to disk).

use axum::body::HttpBody as _;
use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::FromRef;
use axum::http::StatusCode;
use futures_util::StreamExt;
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
}
