//! Running a plan on the engine and answering: one JSON body, or SSE chunks ending in
//! `data: [DONE]`. Both endpoints share this; they differ only in the shape of a choice
//! ([`Kind`]). Dropping the response (a client that went away) drops the engine handles,
//! which cancels the sequences at the engine's next step.

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, BoxStream, StreamExt};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::errors::ApiError;
use super::openai::Plan;
use super::AppState;
use crate::adapter::Version;
use crate::engine::{
    Engine, Event, FinishReason, GenerateRequest, Overload, RequestHandle, SubmitError,
    TokenLogprobs, WaitSlot,
};
use crate::model::tokenizer::TextTokenizer;

/// The events of a request's choices, tagged with the choice index.
pub type Events = BoxStream<'static, (usize, Event)>;

/// Which API is answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Completion,
    Chat,
}

impl Kind {
    fn endpoint(self) -> &'static str {
        match self {
            Kind::Completion => "/v1/completions",
            Kind::Chat => "/v1/chat/completions",
        }
    }

    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Completion => "cmpl-",
            Kind::Chat => "chatcmpl-",
        }
    }

    fn object(self, stream: bool) -> &'static str {
        match (self, stream) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }
}

/// What the response needs besides the tokens.
pub struct Reply {
    pub kind: Kind,
    pub id: String,
    pub model: String,
    pub created: u64,
    pub arrival: Instant,
    /// `Some(k)` when logprobs were asked for (with `k` alternatives).
    pub logprobs: Option<usize>,
}

impl Reply {
    pub fn new(kind: Kind, model: String, arrival: Instant, logprobs: Option<usize>) -> Self {
        Self {
            kind,
            id: format!("{}{:032x}", kind.id_prefix(), rand::random::<u128>()),
            model,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            arrival,
            logprobs,
        }
    }
}

/// 429 for a request refused by the engine's waiting limits.
pub fn overloaded(o: Overload) -> ApiError {
    ApiError::overloaded(o.to_string(), o.retry_after)
}

/// Places in the engine's waiting count for a request of `n` choices (`n` as asked,
/// within 1..=`max_n`: an `n` out of range is refused later, by the plan), taken before
/// any work is spent on the request.
pub fn reserve(
    engine: &Engine,
    tenant: Option<&str>,
    n: Option<u64>,
    max_n: usize,
) -> Result<Vec<WaitSlot>, ApiError> {
    let n = usize::try_from(n.unwrap_or(1))
        .unwrap_or(usize::MAX)
        .clamp(1, max_n.max(1));
    engine.reserve(tenant, n).map_err(overloaded)
}

/// Submits the plan's `n` sequences (choice `i` is seeded with `seed + i`), each with one
/// of the places `slots` took for it.
pub fn submit(
    engine: &Engine,
    plan: &Plan,
    adapter: Option<&Arc<Version>>,
    tenant: Option<&str>,
    slots: Vec<WaitSlot>,
    arrival: Instant,
) -> Result<Vec<RequestHandle>, ApiError> {
    let mut handles = Vec::with_capacity(plan.n);
    let mut slots = slots.into_iter();
    for i in 0..plan.n {
        let mut params = plan.params.clone();
        params.seed = params.seed.map(|s| s.wrapping_add(i as u64));
        let req = GenerateRequest {
            prompt: plan.prompt.clone(),
            params,
            adapter: adapter.cloned(),
            tenant: tenant.map(str::to_string),
            arrival: Some(arrival),
        };
        let slot = match slots.next() {
            Some(slot) => slot,
            None => engine
                .reserve(tenant, 1)
                .map_err(overloaded)?
                .pop()
                .unwrap_or_else(WaitSlot::none),
        };
        let h = engine.submit_reserved(req, slot).map_err(|e| match e {
            SubmitError::Invalid(p, m) => ApiError::invalid(p, m),
            SubmitError::Overloaded(o) => overloaded(o),
            SubmitError::Stopped => ApiError::unavailable(e.to_string()),
        })?;
        handles.push(h);
    }
    Ok(handles)
}

/// 429 for a request that waited `limits.max_queue_seconds` without starting.
fn queue_timeout(waited: Duration) -> ApiError {
    ApiError::overloaded(
        format!(
            "the request waited {:.1} s without starting and was dropped: the server is overloaded",
            waited.as_secs_f64()
        ),
        Duration::from_secs(1),
    )
    .code("queue_timeout")
}

/// The events of every choice, tagged with the choice index; each choice's stream ends
/// after its `Finished`, `Error` or `QueueTimeout`.
pub fn merged(handles: Vec<RequestHandle>) -> Events {
    let streams = handles.into_iter().enumerate().map(|(i, h)| {
        stream::unfold(Some(h), move |h| async move {
            let mut h = h?;
            let ev = h.events.recv().await?;
            let terminal = matches!(
                ev,
                Event::Finished { .. } | Event::Error(_) | Event::QueueTimeout(_)
            );
            Some(((i, ev), if terminal { None } else { Some(h) }))
        })
        .boxed()
    });
    stream::select_all(streams).boxed()
}

/// A token as text (for logprobs).
fn token_text(tok: &TextTokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

/// JSON cannot carry -inf: report it as -9999 (as other OpenAI-compatible servers do).
fn finite(lp: f32) -> f64 {
    if lp.is_finite() {
        lp as f64
    } else {
        -9999.0
    }
}

/// Per-choice state while answering.
#[derive(Default)]
struct Choice {
    text: String,
    /// Completions logprobs: tokens, their logprobs, top alternatives, text offsets.
    lp_tokens: Vec<Value>,
    lp_values: Vec<Value>,
    lp_top: Vec<Value>,
    lp_offsets: Vec<Value>,
    /// Chat logprobs: one entry per token.
    lp_content: Vec<Value>,
    /// Characters of token text so far (completions `text_offset`).
    offset: usize,
    finish: Option<FinishReason>,
    completion_tokens: usize,
    last_token: Option<Instant>,
    done: bool,
}

struct Run {
    state: Arc<AppState>,
    tok: Arc<TextTokenizer>,
    reply: Reply,
    prompt_tokens: usize,
    choices: Vec<Choice>,
    left: usize,
}

impl Run {
    fn new(state: Arc<AppState>, tok: Arc<TextTokenizer>, reply: Reply, plan: &Plan) -> Self {
        Self {
            state,
            tok,
            reply,
            prompt_tokens: plan.prompt.len(),
            choices: (0..plan.n).map(|_| Choice::default()).collect(),
            left: plan.n,
        }
    }

    /// Logprob entries of one token, in this API's shape; appended to the choice.
    fn record_logprobs(&mut self, i: usize, token: u32, lp: &TokenLogprobs) {
        let tok = &self.tok;
        let text = token_text(tok, token);
        let c = &mut self.choices[i];
        match self.reply.kind {
            Kind::Completion => {
                let mut top = serde_json::Map::new();
                for &(id, v) in &lp.top {
                    top.entry(token_text(tok, id)).or_insert(json!(finite(v)));
                }
                top.entry(text.clone()).or_insert(json!(finite(lp.logprob)));
                c.lp_offsets.push(json!(c.offset));
                c.offset += text.chars().count();
                c.lp_tokens.push(json!(text));
                c.lp_values.push(json!(finite(lp.logprob)));
                c.lp_top.push(Value::Object(top));
            }
            Kind::Chat => {
                let top: Vec<Value> = lp
                    .top
                    .iter()
                    .map(|&(id, v)| {
                        let t = token_text(tok, id);
                        json!({"token": t, "logprob": finite(v), "bytes": t.as_bytes()})
                    })
                    .collect();
                c.lp_content.push(json!({
                    "token": text,
                    "logprob": finite(lp.logprob),
                    "bytes": text.as_bytes(),
                    "top_logprobs": top,
                }));
            }
        }
    }

    /// The logprobs object of choice `i` for what was recorded since the last call.
    fn take_logprobs(&mut self, i: usize) -> Value {
        if self.reply.logprobs.is_none() {
            return Value::Null;
        }
        let c = &mut self.choices[i];
        match self.reply.kind {
            Kind::Completion => json!({
                "tokens": std::mem::take(&mut c.lp_tokens),
                "token_logprobs": std::mem::take(&mut c.lp_values),
                "top_logprobs": std::mem::take(&mut c.lp_top),
                "text_offset": std::mem::take(&mut c.lp_offsets),
            }),
            Kind::Chat => json!({"content": std::mem::take(&mut c.lp_content)}),
        }
    }

    /// Applies one engine event. Returns the text released by a token, or an error.
    fn apply(&mut self, i: usize, ev: Event) -> Result<Step, ApiError> {
        let now = Instant::now();
        let m = &self.state.metrics;
        match ev {
            Event::Token(t) => {
                let c = &mut self.choices[i];
                match c.last_token {
                    None => m
                        .ttft
                        .with_label_values(&[self.reply.kind.endpoint()])
                        .observe((now - self.reply.arrival).as_secs_f64()),
                    Some(prev) => m.inter_token.observe((now - prev).as_secs_f64()),
                }
                c.last_token = Some(now);
                c.text.push_str(&t.text);
                if let Some(lp) = &t.logprobs {
                    self.record_logprobs(i, t.token, lp);
                }
                Ok(Step::Token(t.text, t.logprobs.is_some()))
            }
            Event::Finished {
                reason,
                completion_tokens,
                ..
            } => {
                let c = &mut self.choices[i];
                c.finish = Some(reason);
                c.completion_tokens = completion_tokens;
                c.done = true;
                self.left -= 1;
                m.generation_tokens.inc_by(completion_tokens as u64);
                m.finished.with_label_values(&[reason_label(reason)]).inc();
                if self.left == 0 {
                    self.all_done();
                }
                if reason == FinishReason::Cancelled {
                    return Err(cancelled());
                }
                Ok(Step::Finished(reason))
            }
            Event::Error(msg) => {
                self.choices[i].done = true;
                self.left -= 1;
                m.finished.with_label_values(&["error"]).inc();
                Err(ApiError::internal(msg))
            }
            Event::QueueTimeout(waited) => {
                self.choices[i].done = true;
                self.left -= 1;
                m.finished.with_label_values(&["queue_timeout"]).inc();
                Err(queue_timeout(waited))
            }
        }
    }

    fn all_done(&self) {
        let m = &self.state.metrics;
        m.prompt_tokens.inc_by(self.prompt_tokens as u64);
        m.request_duration
            .with_label_values(&[self.reply.kind.endpoint()])
            .observe(self.reply.arrival.elapsed().as_secs_f64());
    }

    fn usage(&self) -> Value {
        let completion: usize = self.choices.iter().map(|c| c.completion_tokens).sum();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    fn envelope(&self, stream: bool, choices: Vec<Value>) -> serde_json::Map<String, Value> {
        let mut o = serde_json::Map::new();
        o.insert("id".into(), json!(self.reply.id));
        o.insert("object".into(), json!(self.reply.kind.object(stream)));
        o.insert("created".into(), json!(self.reply.created));
        o.insert("model".into(), json!(self.reply.model));
        o.insert("system_fingerprint".into(), Value::Null);
        o.insert("choices".into(), Value::Array(choices));
        o
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        // Choices still running when the response is dropped: the client went away.
        if self.left > 0 {
            self.state
                .metrics
                .finished
                .with_label_values(&["cancelled"])
                .inc_by(self.left as u64);
        }
    }
}

enum Step {
    /// Released text, and whether the token carried logprobs.
    Token(String, bool),
    Finished(FinishReason),
}

fn reason_label(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
    }
}

fn cancelled() -> ApiError {
    ApiError::unavailable("the request was cancelled: the server is shutting down")
        .code("cancelled")
}

/// Runs the plan and answers in one JSON body.
pub async fn respond_whole(
    state: Arc<AppState>,
    tok: Arc<TextTokenizer>,
    reply: Reply,
    plan: &Plan,
    mut events: Events,
) -> Result<Response, ApiError> {
    let mut run = Run::new(state, tok, reply, plan);
    while run.left > 0 {
        let Some((i, ev)) = events.next().await else {
            return Err(ApiError::unavailable("the engine stopped"));
        };
        run.apply(i, ev)?;
    }
    let kind = run.reply.kind;
    let choices: Vec<Value> = (0..run.choices.len())
        .map(|i| {
            let logprobs = run.take_logprobs(i);
            let c = &run.choices[i];
            let finish = c.finish.map(reason_label);
            match kind {
                Kind::Completion => json!({
                    "index": i,
                    "text": c.text,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }),
                Kind::Chat => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }),
            }
        })
        .collect();
    let mut body = run.envelope(false, choices);
    body.insert("usage".into(), run.usage());
    Ok(axum::Json(Value::Object(body)).into_response())
}

/// The SSE state machine: engine events in, `data:` chunks out.
struct Streamer {
    run: Run,
    events: Events,
    include_usage: bool,
    queue: VecDeque<SseEvent>,
    done: bool,
}

impl Streamer {
    fn data(v: Value) -> SseEvent {
        SseEvent::default().data(v.to_string())
    }

    fn chunk(&mut self, i: usize, text: &str, finish: Option<FinishReason>) {
        let logprobs = self.run.take_logprobs(i);
        let finish = finish.map(reason_label);
        let choice = match self.run.reply.kind {
            Kind::Completion => json!({
                "index": i, "text": text, "logprobs": logprobs, "finish_reason": finish,
            }),
            Kind::Chat => {
                let delta = if finish.is_some() && text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        let mut o = self.run.envelope(true, vec![choice]);
        if self.include_usage {
            o.insert("usage".into(), Value::Null);
        }
        self.queue.push_back(Self::data(Value::Object(o)));
    }

    fn start(&mut self) {
        if self.run.reply.kind == Kind::Chat {
            for i in 0..self.run.choices.len() {
                let choice = json!({
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": Value::Null,
                    "finish_reason": Value::Null,
                });
                let mut o = self.run.envelope(true, vec![choice]);
                if self.include_usage {
                    o.insert("usage".into(), Value::Null);
                }
                self.queue.push_back(Self::data(Value::Object(o)));
            }
        }
    }

    fn end(&mut self) {
        if self.include_usage {
            let mut o = self.run.envelope(true, vec![]);
            o.insert("usage".into(), self.run.usage());
            self.queue.push_back(Self::data(Value::Object(o)));
        }
        self.queue.push_back(SseEvent::default().data("[DONE]"));
        self.done = true;
    }

    fn fail(&mut self, e: ApiError) {
        self.queue.push_back(Self::data(e.body()));
        self.queue.push_back(SseEvent::default().data("[DONE]"));
        self.done = true;
    }

    fn handle(&mut self, i: usize, ev: Event) {
        match self.run.apply(i, ev) {
            Ok(Step::Token(text, has_lp)) => {
                if !text.is_empty() || has_lp {
                    self.chunk(i, &text, None);
                }
            }
            Ok(Step::Finished(reason)) => {
                self.chunk(i, "", Some(reason));
                if self.run.left == 0 {
                    self.end();
                }
            }
            Err(e) => self.fail(e),
        }
    }

    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(ev) = self.queue.pop_front() {
                return Some(ev);
            }
            if self.done {
                return None;
            }
            match self.events.next().await {
                Some((i, ev)) => self.handle(i, ev),
                None => self.fail(ApiError::unavailable("the engine stopped")),
            }
        }
    }
}

/// Runs the plan and answers as server-sent events, once the first event has come: a
/// request dropped before it started (it waited too long) is answered 429 rather than
/// with a stream.
pub async fn respond_stream(
    state: Arc<AppState>,
    tok: Arc<TextTokenizer>,
    reply: Reply,
    plan: &Plan,
    mut events: Events,
) -> Result<Response, ApiError> {
    let first = events.next().await;
    if let Some((_, Event::QueueTimeout(waited))) = first {
        // That choice timed out; the others (still waiting) go with the answer.
        let finished = &state.metrics.finished;
        finished.with_label_values(&["queue_timeout"]).inc();
        finished
            .with_label_values(&["cancelled"])
            .inc_by(plan.n.saturating_sub(1) as u64);
        return Err(queue_timeout(waited));
    }
    let events = stream::iter(first).chain(events).boxed();
    let mut s = Streamer {
        run: Run::new(state, tok, reply, plan),
        events,
        include_usage: plan.include_usage,
        queue: VecDeque::new(),
        done: false,
    };
    s.start();
    let body = stream::unfold(s, |mut s| async move {
        let ev = s.next().await?;
        Some((Ok::<_, Infallible>(ev), s))
    });
    Ok(Sse::new(body)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}
