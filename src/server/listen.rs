//! The accept loop and the HTTP/1.1 connections. This module owns everything between the
//! TCP socket and hyper: every request head of a connection (the first and each later one
//! on a keep-alive connection, pipelined or not) is read and checked here before hyper
//! sees a byte of it, and a head that the server refuses is answered here with a complete
//! response carrying an OpenAI-shaped JSON error body, then the connection is closed:
//!
//! - 431 `headers_too_large`: a head over `limits.max_header_bytes`, or over 100 fields;
//! - 414 `uri_too_long`: a request target over `limits.max_uri_bytes`;
//! - 400 `malformed_request`: a head hyper could not parse or would refuse (bad request
//!   line, header field or target, invalid or conflicting `Content-Length` /
//!   `Transfer-Encoding`);
//! - 408 `header_read_timeout`: a head not complete `limits.header_read_timeout_seconds`
//!   after the connection started waiting for it (a connection that sent nothing by then
//!   is closed without an answer, as an idle keep-alive connection is).
//!
//! To find where the next head starts, request bodies are followed through their framing
//! (`Content-Length`, or chunked with extensions and trailers, byte for byte as hyper
//! decodes them; a body whose framing hyper rejects is passed on for hyper to reject, and
//! the connection ends there). Hyper's own limits are set above these, so hyper never
//! answers a head by itself;
//! [`serve`] keeps `axum::serve`'s graceful shutdown: on the shutdown future it stops
//! accepting and waits for the open connections to finish their requests and close.

use axum::body::{Body, Bytes};
use axum::http::{HeaderName, Method, StatusCode, Uri};
use axum::Router;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use super::config::Limits;
use super::errors::ApiError;

/// Most header fields in one head: hyper's own default, which it keeps.
pub const MAX_HEADERS: usize = 100;
/// Longest request method taken.
const MAX_METHOD_BYTES: usize = 1024;
/// A head this short is parsed whenever bytes arrive; a longer one once per line.
const EARLY_PARSE_BYTES: usize = 256;
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 16 << 10;
/// After refusing a head, how long (and how many bytes) the connection keeps reading and
/// dropping what the client still sends before it closes, so that the close does not reset
/// the connection before the client has read the answer.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// What the request heads of a connection are checked against.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub max_header_bytes: usize,
    pub max_uri_bytes: usize,
    pub header_timeout: Duration,
}

impl HttpLimits {
    pub fn new(limits: &Limits) -> Self {
        Self {
            max_header_bytes: limits.max_header_bytes,
            max_uri_bytes: limits.max_uri_bytes,
            header_timeout: limits.header_read_timeout(),
        }
    }

    /// Hyper's read buffer: far above anything a checked head can need, so that hyper's
    /// own "431 without a body" can never be the answer.
    fn hyper_buffer(&self) -> usize {
        const HYPER_DEFAULT: usize = 8192 + 4096 * 100;
        HYPER_DEFAULT.max(
            self.max_header_bytes
                .saturating_mul(2)
                .saturating_add(4 * READ_CHUNK),
        )
    }
}

/// Serves `app` on `listener` until `shutdown` resolves; then accepts no more connections,
/// tells the open ones to finish the request in progress and close (idle ones close at
/// once), and returns when all are closed.
pub async fn serve<F>(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: F,
) -> io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let limits = Arc::new(limits);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (open_tx, open_rx) = watch::channel(());
    let mut shutdown = pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut shutdown => break,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let conn = connection(
                    stream,
                    app.clone(),
                    limits.clone(),
                    stop_rx.clone(),
                    open_rx.clone(),
                );
                tokio::spawn(conn);
            }
            Err(e) => accept_failed(e).await,
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(open_rx);
    open_tx.closed().await;
    Ok(())
}

/// As `axum::serve` does: a client that gave up before its connection was accepted is
/// nobody's problem; anything else (out of file descriptors, say) is logged, and the loop
/// waits a second rather than spin on it.
async fn accept_failed(e: io::Error) {
    use io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!("accept error: {e}");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Serves one connection; `_open` is held until it is closed.
async fn connection<I>(
    io: I,
    app: Router,
    limits: Arc<HttpLimits>,
    mut stop: watch::Receiver<bool>,
    _open: watch::Receiver<()>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(CheckedIo::new(io, limits.clone(), activity.clone()));
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let in_flight = activity.begin();
        let app = app.clone();
        async move {
            let resp = match app.oneshot(req.map(Body::new)).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            Ok::<_, Infallible>(resp.map(|body| {
                Body::new(Tracked {
                    body,
                    _in_flight: in_flight,
                })
            }))
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    // Hyper's own count of header fields is MAX_HEADERS already (setting it would move
    // hyper's parse to the heap); its own head timeout is replaced by ours.
    http.max_buf_size(limits.hyper_buffer())
        .header_read_timeout(None);
    let mut conn = pin!(http.serve_connection(io, service));
    let mut stopping = false;
    loop {
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::trace!("connection ended: {e}");
                }
                break;
            }
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The requests of one connection being answered, and since when none is.
struct Activity(Mutex<ActivityState>);

struct ActivityState {
    in_flight: usize,
    idle_since: Instant,
    /// The connection's reader, woken when the last request in flight is answered.
    waker: Option<Waker>,
}

impl Activity {
    fn new() -> Self {
        Self(Mutex::new(ActivityState {
            in_flight: 0,
            idle_since: Instant::now(),
            waker: None,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, ActivityState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.lock().in_flight += 1;
        InFlight(self.clone())
    }

    /// How many requests are in flight and since when none is; `waker` is woken when
    /// the last one is answered.
    fn watch(&self, waker: &Waker) -> (usize, Instant) {
        let mut s = self.lock();
        if !s.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            s.waker = Some(waker.clone());
        }
        (s.in_flight, s.idle_since)
    }
}

/// A request in flight: from the moment hyper hands it over until its response body is
/// finished (or dropped).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let waker = {
            let mut s = self.0.lock();
            s.in_flight = s.in_flight.saturating_sub(1);
            if s.in_flight > 0 {
                return;
            }
            s.idle_since = Instant::now();
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// A response body that keeps its request counted as in flight.
struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Where the connection's input is.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Between requests, or inside a request head.
    Head,
    /// Inside a body of this many more bytes.
    Length(u64),
    /// Inside a chunked body.
    Chunked(Chunks),
    /// Inside a body hyper will refuse (bad chunk framing): passed on as it is.
    Opaque,
    /// A head was refused: hyper sees the end of the input once the request in flight (if
    /// any) is answered, and the refusal is written when it shuts the connection down.
    Refused,
    /// The connection waited too long for a head that never started: it is closed.
    Closed,
}

/// The refusal of a head, written at shutdown.
struct Refusal {
    response: Vec<u8>,
    written: usize,
    shut: bool,
    linger: Option<Pin<Box<Sleep>>>,
    drained: usize,
}

/// The socket as hyper reads it: heads are held back until complete and checked; bodies
/// pass through as they come.
struct CheckedIo<I> {
    io: I,
    limits: Arc<HttpLimits>,
    activity: Arc<Activity>,
    /// Read from the socket, not yet handed to hyper.
    buf: Vec<u8>,
    /// `buf[..ready]` is checked and may be handed to hyper.
    ready: usize,
    /// How much of `buf` (a partial head) was looked at for line ends.
    scanned: usize,
    phase: Phase,
    /// When the connection started waiting for the current head.
    head_since: Instant,
    timer: Pin<Box<Sleep>>,
    timer_at: Option<Instant>,
    eof: bool,
    refusal: Option<Refusal>,
}

impl<I: AsyncRead + AsyncWrite + Unpin> CheckedIo<I> {
    fn new(io: I, limits: Arc<HttpLimits>, activity: Arc<Activity>) -> Self {
        let now = Instant::now();
        Self {
            io,
            limits,
            activity,
            buf: Vec::new(),
            ready: 0,
            scanned: 0,
            phase: Phase::Head,
            head_since: now,
            timer: Box::pin(tokio::time::sleep_until(now)),
            timer_at: None,
            eof: false,
            refusal: None,
        }
    }

    fn enter_head(&mut self) {
        self.phase = Phase::Head;
        self.head_since = Instant::now();
        self.scanned = 0;
    }

    fn refuse(&mut self, e: ApiError) {
        tracing::debug!(status = e.status.as_u16(), message = %e.message, "refused a request head");
        self.refusal = Some(Refusal {
            response: response_bytes(&e),
            written: 0,
            shut: false,
            linger: None,
            drained: 0,
        });
        self.phase = Phase::Refused;
        self.buf.clear();
        self.ready = 0;
    }

    /// Classifies unchecked bytes at the front of `buf` (`ready` is 0); true if that
    /// made bytes ready or changed the phase.
    fn classify(&mut self) -> bool {
        match self.phase {
            Phase::Head => {
                // Empty lines before a request line are skipped (hyper skips them too).
                let mut skip = 0;
                while let Some(rest) = self.buf.get(skip..) {
                    if rest.starts_with(b"\r\n") {
                        skip += 2;
                    } else if rest.starts_with(b"\n") {
                        skip += 1;
                    } else {
                        break;
                    }
                }
                if skip > 0 {
                    self.buf.drain(..skip);
                    self.scanned = 0;
                }
                if self.buf.is_empty() {
                    return false;
                }
                // Parse while the head is short (garbage such as a TLS handshake is
                // refused at once), then again only when a line has ended since the last
                // look, or when the head is long enough that the parse must refuse it: a
                // head sent a byte at a time costs a parse per line, not per byte.
                let from = self.scanned.min(self.buf.len());
                let new_line = self.buf[from..].contains(&b'\n');
                self.scanned = self.buf.len();
                let l = &self.limits;
                let too_long = self.buf.len() > l.max_header_bytes
                    || self.buf.len() > l.max_uri_bytes + MAX_METHOD_BYTES + 16;
                if !new_line && !too_long && self.buf.len() > EARLY_PARSE_BYTES {
                    return false;
                }
                match check_head(&self.buf, &self.limits) {
                    HeadCheck::Partial => false,
                    HeadCheck::Complete { len, body } => {
                        self.ready = len;
                        match body {
                            Framing::None => self.enter_head(),
                            Framing::Length(n) => self.phase = Phase::Length(n),
                            Framing::Chunked => self.phase = Phase::Chunked(Chunks::default()),
                        }
                        true
                    }
                    HeadCheck::Refuse(e) => {
                        self.refuse(e);
                        true
                    }
                }
            }
            Phase::Length(left) => {
                let n = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(self.buf.len());
                self.ready = n;
                match left - n as u64 {
                    0 => self.enter_head(),
                    left => self.phase = Phase::Length(left),
                }
                true
            }
            Phase::Chunked(mut chunks) => {
                let (n, state) = chunks.advance(&self.buf);
                self.ready = n;
                match state {
                    ChunkState::More => self.phase = Phase::Chunked(chunks),
                    ChunkState::Done => self.enter_head(),
                    ChunkState::Invalid => {
                        self.phase = Phase::Opaque;
                        self.ready = self.buf.len();
                    }
                }
                true
            }
            Phase::Opaque => {
                self.ready = self.buf.len();
                self.ready > 0
            }
            Phase::Refused | Phase::Closed => false,
        }
    }

    /// Ready once the current head is overdue. No deadline runs while a request is being
    /// answered: the client waits for the answer before it sends the next one.
    fn poll_head_deadline(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let (in_flight, idle_since) = self.activity.watch(cx.waker());
        if in_flight > 0 {
            return Poll::Pending;
        }
        let since = self.head_since.max(idle_since);
        let at = since
            .checked_add(self.limits.header_timeout)
            .unwrap_or(since);
        if self.timer_at != Some(at) {
            self.timer.as_mut().reset(at);
            self.timer_at = Some(at);
        }
        self.timer.as_mut().poll(cx)
    }

    /// Writes the refusal, closes the write side, and drains what the client still sends.
    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(r) = self.refusal.as_mut() else {
            return Pin::new(&mut self.io).poll_shutdown(cx);
        };
        while r.written < r.response.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &r.response[r.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            r.written += n;
        }
        if !r.shut {
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            ready!(Pin::new(&mut self.io).poll_shutdown(cx))?;
            r.shut = true;
        }
        let linger = r
            .linger
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(LINGER)));
        let mut scratch = [0u8; 4096];
        while r.drained < LINGER_BYTES {
            if linger.as_mut().poll(cx).is_ready() {
                break;
            }
            let mut rb = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => r.drained += rb.filled().len(),
                Poll::Ready(_) => break,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for CheckedIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready > 0 {
                let n = this.ready.min(out.remaining());
                out.put_slice(&this.buf[..n]);
                this.buf.drain(..n);
                this.ready -= n;
                return Poll::Ready(Ok(()));
            }
            if !this.buf.is_empty() && this.classify() {
                continue;
            }
            match this.phase {
                Phase::Refused => {
                    let (in_flight, _) = this.activity.watch(cx.waker());
                    if in_flight > 0 {
                        return Poll::Pending;
                    }
                    return Poll::Ready(Ok(()));
                }
                Phase::Closed => return Poll::Ready(Ok(())),
                _ => {}
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if matches!(this.phase, Phase::Head) && this.poll_head_deadline(cx).is_ready() {
                if this.buf.is_empty() {
                    this.phase = Phase::Closed;
                } else {
                    this.refuse(
                        ApiError::new(
                            StatusCode::REQUEST_TIMEOUT,
                            "invalid_request_error",
                            format!(
                                "the request head did not arrive within {} s",
                                this.limits.header_timeout.as_secs_f64()
                            ),
                        )
                        .code("header_read_timeout"),
                    );
                }
                continue;
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                this.eof = true;
            } else {
                this.buf.extend_from_slice(rb.filled());
            }
        }
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for CheckedIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_refusal(cx)
    }
}

/// A refusal as a complete HTTP/1.1 response that closes the connection.
fn response_bytes(e: &ApiError) -> Vec<u8> {
    let body = e.body().to_string();
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        e.status.as_u16(),
        e.status.canonical_reason().unwrap_or(""),
        body.len(),
    )
    .into_bytes()
}

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

#[derive(Debug)]
enum HeadCheck {
    /// More bytes are needed.
    Partial,
    /// A head of `len` bytes that hyper will take.
    Complete {
        len: usize,
        body: Framing,
    },
    Refuse(ApiError),
}

fn malformed(what: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("the request head is malformed: {what}"))
        .code("malformed_request")
}

fn uri_too_long(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::URI_TOO_LONG,
        "invalid_request_error",
        format!("the request target (URI) is longer than the server's limit of {limit} bytes"),
    )
    .code("uri_too_long")
}

fn headers_too_large(what: String) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "invalid_request_error",
        what,
    )
    .code("headers_too_large")
}

/// Checks a request head (`buf` starts at its request line) the way hyper parses it, and
/// against the server's limits.
fn check_head(buf: &[u8], limits: &HttpLimits) -> HeadCheck {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let parsed = req.parse(buf);
    if req.path.is_some_and(|p| p.len() > limits.max_uri_bytes) {
        return HeadCheck::Refuse(uri_too_long(limits.max_uri_bytes));
    }
    let too_large = || {
        headers_too_large(format!(
            "the request head is larger than the server's limit of {} bytes",
            limits.max_header_bytes
        ))
    };
    let len = match parsed {
        Ok(httparse::Status::Partial) => {
            if req.path.is_none() {
                match req.method {
                    Some(m) if buf.len().saturating_sub(m.len() + 1) > limits.max_uri_bytes => {
                        return HeadCheck::Refuse(uri_too_long(limits.max_uri_bytes))
                    }
                    None if buf.len() > MAX_METHOD_BYTES => {
                        return HeadCheck::Refuse(malformed("the request method is too long"))
                    }
                    _ => {}
                }
            }
            if buf.len() > limits.max_header_bytes {
                return HeadCheck::Refuse(too_large());
            }
            return HeadCheck::Partial;
        }
        Ok(httparse::Status::Complete(len)) => len,
        Err(httparse::Error::TooManyHeaders) => {
            return HeadCheck::Refuse(headers_too_large(format!(
                "the request has more than {MAX_HEADERS} header fields"
            )))
        }
        Err(e) => return HeadCheck::Refuse(malformed(e)),
    };
    if len > limits.max_header_bytes {
        return HeadCheck::Refuse(too_large());
    }
    match framing(&req) {
        Ok(body) => HeadCheck::Complete { len, body },
        Err(e) => HeadCheck::Refuse(e),
    }
}

/// What hyper would refuse in a complete head, and the body's framing.
fn framing(req: &httparse::Request<'_, '_>) -> Result<Framing, ApiError> {
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Err(malformed("incomplete request line"));
    };
    Method::from_bytes(method.as_bytes()).map_err(|_| malformed("invalid method"))?;
    Uri::try_from(path.as_bytes())
        .map_err(|_| malformed("the request target is not a valid URI"))?;
    let mut chunked = None;
    let mut length: Option<u64> = None;
    for h in req.headers.iter() {
        HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| malformed("invalid header name"))?;
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if version != 1 {
                return Err(malformed("Transfer-Encoding in an HTTP/1.0 request"));
            }
            // As hyper: chunked must be the last coding of the last field, whose value
            // must be visible ASCII.
            let visible = h
                .value
                .iter()
                .all(|&b| b == b'\t' || (32..127).contains(&b));
            let last = std::str::from_utf8(h.value)
                .ok()
                .filter(|_| visible)
                .and_then(|v| v.rsplit(',').next())
                .map(str::trim);
            chunked = Some(last.is_some_and(|c| c.eq_ignore_ascii_case("chunked")));
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let n = digits(h.value).ok_or_else(|| malformed("invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(malformed("conflicting Content-Length fields"));
            }
            length = Some(n);
        }
    }
    match (chunked, length) {
        (Some(false), _) => Err(malformed(
            "a Transfer-Encoding whose last coding is not chunked",
        )),
        (Some(true), Some(_)) => Err(malformed("both Content-Length and Transfer-Encoding")),
        (Some(true), None) => Ok(Framing::Chunked),
        // hyper's largest length.
        (None, Some(n)) if n >= u64::MAX - 1 => Err(malformed("invalid Content-Length")),
        (None, Some(0)) | (None, None) => Ok(Framing::None),
        (None, Some(n)) => Ok(Framing::Length(n)),
    }
}

/// A `Content-Length` value as hyper reads it: decimal digits only.
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// Follows a chunked body through its framing, byte for byte as hyper's decoder does.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
enum Chunks {
    #[default]
    Start,
    Size(u64),
    SizeLws(u64),
    Extension(u64),
    SizeLf(u64),
    Body(u64),
    BodyCr,
    BodyLf,
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
}

#[derive(Debug, PartialEq)]
enum ChunkState {
    More,
    /// The body ended: the bytes after it are the next head.
    Done,
    /// Framing hyper refuses.
    Invalid,
}

impl Chunks {
    /// Steps over `bytes`; how many belong to the body, and where that leaves it.
    fn advance(&mut self, bytes: &[u8]) -> (usize, ChunkState) {
        use Chunks::*;
        let hex = |b: u8| (b as char).to_digit(16).map(u64::from);
        let mut i = 0;
        while i < bytes.len() {
            if let Body(left) = *self {
                let n = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len() - i);
                i += n;
                let left = left - n as u64;
                *self = if left == 0 { BodyCr } else { Body(left) };
                continue;
            }
            let b = bytes[i];
            i += 1;
            let next = match (*self, b) {
                (Start, _) => hex(b).map(Size),
                (Size(n), _) if hex(b).is_some() => n
                    .checked_mul(16)
                    .and_then(|n| n.checked_add(hex(b).unwrap_or(0)))
                    .map(Size),
                (Size(n) | SizeLws(n), b'\t' | b' ') => Some(SizeLws(n)),
                (Size(n) | SizeLws(n), b';') => Some(Extension(n)),
                (Size(n) | SizeLws(n) | Extension(n), b'\r') => Some(SizeLf(n)),
                (Extension(_), b'\n') => None,
                (Extension(n), _) => Some(Extension(n)),
                (SizeLf(0), b'\n') => Some(EndCr),
                (SizeLf(n), b'\n') => Some(Body(n)),
                (BodyCr, b'\r') => Some(BodyLf),
                (BodyLf, b'\n') => Some(Start),
                (EndCr, b'\r') => Some(EndLf),
                (EndCr, _) => Some(Trailer),
                (Trailer, b'\r') => Some(TrailerLf),
                (Trailer, _) => Some(Trailer),
                (TrailerLf, b'\n') => Some(EndCr),
                (EndLf, b'\n') => return (i, ChunkState::Done),
                _ => None,
            };
            match next {
                Some(s) => *self = s,
                None => return (i, ChunkState::Invalid),
            }
        }
        (i, ChunkState::More)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn limits() -> HttpLimits {
        HttpLimits {
            max_header_bytes: 4096,
            max_uri_bytes: 512,
            header_timeout: Duration::from_millis(300),
        }
    }

    fn head(text: &str) -> HeadCheck {
        check_head(text.as_bytes(), &limits())
    }

    fn refused(c: HeadCheck) -> (u16, &'static str) {
        match c {
            HeadCheck::Refuse(e) => (e.status.as_u16(), e.code.unwrap_or("")),
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn heads_are_checked_as_hyper_parses_them() {
        let ok = "GET /health HTTP/1.1\r\nhost: x\r\n\r\n";
        match head(ok) {
            HeadCheck::Complete { len, body } => {
                assert_eq!((len, body), (ok.len(), Framing::None));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            head("GET /health HTTP/1.1\r\nhost: x\r\n"),
            HeadCheck::Partial
        ));
        let post = |h: &str| head(&format!("POST /v1/completions HTTP/1.1\r\n{h}\r\n"));
        assert!(matches!(
            post("content-length: 12\r\n"),
            HeadCheck::Complete {
                body: Framing::Length(12),
                ..
            }
        ));
        assert!(matches!(
            post("transfer-encoding: gzip, chunked\r\n"),
            HeadCheck::Complete {
                body: Framing::Chunked,
                ..
            }
        ));
        assert_eq!(
            refused(post("content-length: 1x\r\n")),
            (400, "malformed_request")
        );
        assert_eq!(
            refused(post("content-length: +1\r\n")),
            (400, "malformed_request")
        );
        let twice = "content-length: 1\r\ncontent-length: 2\r\n";
        assert_eq!(refused(post(twice)), (400, "malformed_request"));
        let same = "content-length: 2\r\ncontent-length: 2\r\n";
        assert!(matches!(
            post(same),
            HeadCheck::Complete {
                body: Framing::Length(2),
                ..
            }
        ));
        let both = "content-length: 2\r\ntransfer-encoding: chunked\r\n";
        assert_eq!(refused(post(both)), (400, "malformed_request"));
        let not_last = "transfer-encoding: chunked, gzip\r\n";
        assert_eq!(refused(post(not_last)), (400, "malformed_request"));
        let not_ascii = "transfer-encoding: \u{e9}, chunked\r\n";
        assert_eq!(refused(post(not_ascii)), (400, "malformed_request"));
        let te10 = "POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n";
        assert_eq!(refused(head(te10)), (400, "malformed_request"));
        assert_eq!(refused(head("GARBAGE\r\n\r\n")), (400, "malformed_request"));
        assert_eq!(
            refused(head("GET / HTTP/9.9\r\n\r\n")),
            (400, "malformed_request")
        );
        assert_eq!(refused(head("GET / HTTP/1.1\r\nbad header\r\n\r\n")).0, 400);
        // A target httparse takes but `http::Uri` (so hyper) does not.
        assert_eq!(refused(head("GET http://[::1/ HTTP/1.1\r\n\r\n")).0, 400);
    }

    #[test]
    fn limits_are_enforced_before_the_head_is_complete() {
        let long_uri = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(600));
        assert_eq!(refused(head(&long_uri)), (414, "uri_too_long"));
        // The request line is not even finished.
        let partial_uri = format!("GET /{}", "a".repeat(600));
        assert_eq!(refused(head(&partial_uri)), (414, "uri_too_long"));
        let fields = format!("GET / HTTP/1.1\r\nx: {}\r\n", "a".repeat(5000));
        assert_eq!(refused(head(&fields)), (431, "headers_too_large"));
        let mut many = "GET / HTTP/1.1\r\n".to_string();
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("x{i}: y\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(refused(head(&many)), (431, "headers_too_large"));
        assert_eq!(refused(head(&"X".repeat(2000))), (400, "malformed_request"));
    }

    #[test]
    fn chunked_bodies_end_where_hyper_ends_them() {
        let body =
            b"5;ext=1\r\nhello\r\n1A \r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-trailer: 1\r\n\r\n";
        let next = b"GET / HTTP/1.1\r\n\r\n";
        let all = [&body[..], &next[..]].concat();
        // Any split into pieces ends the body at the same byte.
        for cut in 0..all.len() {
            let mut c = Chunks::default();
            let (a, s) = c.advance(&all[..cut]);
            let total = if s == ChunkState::Done {
                a
            } else {
                assert_eq!((a, s), (cut, ChunkState::More), "cut {cut}");
                let (b, s) = c.advance(&all[cut..]);
                assert_eq!(s, ChunkState::Done, "cut {cut}");
                a + b
            };
            assert_eq!(total, body.len(), "cut {cut}");
        }
        let (_, s) = Chunks::default().advance(b"0\r\n\r\n");
        assert_eq!(s, ChunkState::Done);
        for bad in [&b"x\r\n"[..], b"5\nhello", b"2\r\nabX", b"2;a\nb"] {
            assert_eq!(
                Chunks::default().advance(bad).1,
                ChunkState::Invalid,
                "{bad:?}"
            );
        }
        let (_, s) = Chunks::default().advance(b"fffffffffffffffff\r\n");
        assert_eq!(s, ChunkState::Invalid, "overflow");
    }

    /// A connection served over an in-memory pipe; the client end is returned.
    fn connect(limits: HttpLimits) -> (DuplexStream, watch::Sender<bool>) {
        let app = Router::new()
            .route("/", get(|| async { "hi" }))
            .route("/echo", post(|b: Bytes| async move { b }));
        let (client, server) = tokio::io::duplex(1 << 20);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (_open_tx, open_rx) = watch::channel(());
        tokio::spawn(connection(server, app, Arc::new(limits), stop_rx, open_rx));
        (client, stop_tx)
    }

    /// Reads responses until the connection closes.
    async fn read_all(c: &mut DuplexStream) -> String {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    fn json_errors(text: &str) -> Vec<serde_json::Value> {
        text.match_indices("{\"error\"")
            .filter_map(|(i, _)| {
                serde_json::Deserializer::from_str(&text[i..])
                    .into_iter::<serde_json::Value>()
                    .next()?
                    .ok()
            })
            .collect()
    }

    #[tokio::test]
    async fn a_bad_head_after_good_requests_is_answered_in_order_with_json() {
        let (mut c, _stop) = connect(limits());
        // Pipelined: a request with a body, a chunked one, then garbage, in one write.
        let input = "POST /echo HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello\
                     POST /echo HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
                     GARBAGE\r\n\r\n";
        c.write_all(input.as_bytes()).await.unwrap();
        let text = read_all(&mut c).await;
        let statuses: Vec<&str> = text.matches("HTTP/1.1 ").map(|_| "").collect();
        assert_eq!(statuses.len(), 3, "{text}");
        let hello = text.find("hello").unwrap();
        let abc = text.find("abc").unwrap();
        let bad = text.find("HTTP/1.1 400").unwrap();
        assert!(hello < abc && abc < bad, "{text}");
        let e = &json_errors(&text)[0];
        assert_eq!(e["error"]["code"], "malformed_request");
        assert!(text[bad..].contains("connection: close"));
    }

    #[tokio::test]
    async fn a_head_that_stalls_gets_408_and_an_idle_connection_is_closed() {
        let (mut c, _stop) = connect(limits());
        c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        let t0 = Instant::now();
        let text = read_all(&mut c).await;
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert_eq!(
            json_errors(&text)[0]["error"]["code"],
            "header_read_timeout"
        );
        assert!(t0.elapsed() < Duration::from_secs(3));

        // A keep-alive connection that goes quiet after a response: closed, no answer.
        let (mut c, _stop) = connect(limits());
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let text = read_all(&mut c).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert_eq!(text.matches("HTTP/1.1").count(), 1, "{text}");
    }

    #[tokio::test]
    async fn garbage_without_a_line_end_is_refused_at_once() {
        let mut l = limits();
        l.header_timeout = Duration::from_secs(60);
        let (mut c, _stop) = connect(l);
        // The start of a TLS handshake.
        c.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .unwrap();
        let text = read_all(&mut c).await;
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
        assert_eq!(json_errors(&text)[0]["error"]["code"], "malformed_request");
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections_and_lets_requests_finish() {
        let (mut c, stop) = connect(limits());
        c.write_all(b"POST /echo HTTP/1.1\r\ncontent-length: 4\r\n\r\nab")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.send(true).unwrap();
        c.write_all(b"cd").await.unwrap();
        let text = read_all(&mut c).await;
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("abcd"),
            "{text}"
        );
    }
}
