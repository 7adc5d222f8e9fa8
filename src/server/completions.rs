//! `POST /v1/completions` and `POST /v1/chat/completions`. Prompts are refused by length
//! first (bounded work, see [`refuse_by_length`]), then tokenized (and chat templates
//! rendered) on the blocking pool, never on the async workers that serve every connection.

use axum::extract::State;
use axum::response::Response;
use std::sync::Arc;
use std::time::Instant;

use super::auth::Caller;
use super::body::ApiJson;
use super::errors::{off_thread, ApiError};
use super::generate::{merged, reserve, respond_stream, respond_whole, submit, Kind, Reply};
use super::openai::{
    encode_chat, encode_prompt, refuse_by_length, Bounds, ChatRequest, CompletionRequest, Plan,
    Prompt,
};
use super::{AppState, Served};
use crate::adapter::Version;
use crate::engine::WaitSlot;

/// Completions default to 16 tokens, as OpenAI's do.
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

fn bounds(state: &AppState, max_context: usize) -> Bounds {
    Bounds {
        max_context,
        max_n: state.config.limits.max_n,
        max_stop: state.config.limits.max_stop,
    }
}

/// A request's arrival and its places in the engine's waiting count, taken first: an
/// overloaded engine refuses it before any work is spent on it.
struct Ticket {
    arrival: Instant,
    slots: Vec<WaitSlot>,
}

impl Ticket {
    fn take(
        state: &AppState,
        served: &Served,
        caller: &Caller,
        n: Option<u64>,
    ) -> Result<Self, ApiError> {
        let arrival = Instant::now();
        let max_n = state.config.limits.max_n;
        let slots = reserve(&served.engine, caller.tenant(), n, max_n)?;
        Ok(Self { arrival, slots })
    }
}

/// The adapter version `model` names (off the async workers: a name not known yet makes
/// the store rescan the adapters directory).
async fn resolve(
    served: &Arc<Served>,
    caller: &Caller,
    model: &str,
) -> Result<Option<Arc<Version>>, ApiError> {
    served.refresh(caller, model).await?;
    let (s, c, m) = (served.clone(), caller.clone(), model.to_string());
    off_thread(move || s.resolve(&c, &m)).await
}

async fn run(
    state: Arc<AppState>,
    kind: Kind,
    model: String,
    caller: Caller,
    adapter: Option<Arc<Version>>,
    plan: Plan,
    ticket: Ticket,
) -> Result<Response, ApiError> {
    let served = state.served()?;
    let arrival = ticket.arrival;
    let handles = submit(
        &served.engine,
        &plan,
        adapter.as_ref(),
        caller.tenant(),
        ticket.slots,
        arrival,
    )?;
    let reply = Reply::new(kind, model, arrival, plan.params.logprobs);
    let tok = served.engine.tokenizer.clone();
    if plan.stream {
        respond_stream(state, tok, reply, &plan, merged(handles)).await
    } else {
        respond_whole(state, tok, reply, &plan, merged(handles)).await
    }
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    ApiJson(mut req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let served = state.served()?;
    let ticket = Ticket::take(&state, &served, &caller, req.n)?;
    let adapter = resolve(&served, &caller, &req.model).await?;
    req.refuse_unsupported()?;
    let logprobs = req.logprobs()?;
    let prompt = match req.take_prompt()? {
        Prompt::Ids(ids) => ids,
        Prompt::Text(text) => {
            let tok = served.engine.tokenizer.clone();
            refuse_by_length(&tok, text.len(), served.max_context, "prompt", "the prompt")?;
            off_thread(move || encode_prompt(&tok, &text)).await?
        }
    };
    let plan = req.common().plan(
        prompt,
        logprobs,
        Some(COMPLETIONS_DEFAULT_MAX_TOKENS),
        &bounds(&state, served.max_context),
    )?;
    run(
        state,
        Kind::Completion,
        req.model,
        caller,
        adapter,
        plan,
        ticket,
    )
    .await
}

pub async fn chat(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    ApiJson(mut req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let served = state.served()?;
    let ticket = Ticket::take(&state, &served, &caller, req.n)?;
    let adapter = resolve(&served, &caller, &req.model).await?;
    req.refuse_unsupported()?;
    let logprobs = req.logprobs()?;
    let messages = req.messages()?;
    let tok = served.engine.tokenizer.clone();
    if !tok.has_chat_template() {
        return Err(ApiError::bad_request(
            "the model has no chat template (tokenizer_config.json): use /v1/completions",
        ));
    }
    let max_context = served.max_context;
    let prompt = off_thread(move || encode_chat(&tok, &messages, max_context)).await?;
    let plan = req
        .common()?
        .plan(prompt, logprobs, None, &bounds(&state, served.max_context))?;
    run(state, Kind::Chat, req.model, caller, adapter, plan, ticket).await
}
