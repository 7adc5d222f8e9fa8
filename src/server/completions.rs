//! `POST /v1/completions` and `POST /v1/chat/completions`.

use axum::extract::State;
use axum::response::Response;
use std::sync::Arc;
use std::time::Instant;

use super::auth::Caller;
use super::errors::{ApiError, ApiJson};
use super::generate::{respond_stream, respond_whole, submit, Kind, Reply};
use super::openai::{Bounds, ChatRequest, CompletionRequest, Plan};
use super::AppState;
use crate::adapter::Version;

/// Completions default to 16 tokens, as OpenAI's do.
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

fn bounds(state: &AppState, max_context: usize) -> Bounds {
    Bounds {
        max_context,
        max_n: state.config.limits.max_n,
        max_stop: state.config.limits.max_stop,
    }
}

async fn run(
    state: Arc<AppState>,
    kind: Kind,
    model: String,
    caller: Caller,
    adapter: Option<Arc<Version>>,
    plan: Plan,
    arrival: Instant,
) -> Result<Response, ApiError> {
    let served = state.served()?;
    let handles = submit(&served.engine, &plan, adapter.as_ref(), caller.tenant())?;
    let reply = Reply::new(kind, model, arrival, plan.params.logprobs);
    let tok = served.engine.tokenizer.clone();
    if plan.stream {
        Ok(respond_stream(state, tok, reply, &plan, handles))
    } else {
        respond_whole(state, tok, reply, &plan, handles).await
    }
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    ApiJson(mut req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let served = state.served()?;
    let adapter = served.resolve(&caller, &req.model)?;
    req.refuse_unsupported()?;
    let logprobs = req.logprobs()?;
    let prompt = req.prompt_ids(&served.engine.tokenizer)?;
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
        arrival,
    )
    .await
}

pub async fn chat(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    ApiJson(mut req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let served = state.served()?;
    let adapter = served.resolve(&caller, &req.model)?;
    req.refuse_unsupported()?;
    let logprobs = req.logprobs()?;
    let messages = req.messages()?;
    let tok = &served.engine.tokenizer;
    if !tok.has_chat_template() {
        return Err(ApiError::bad_request(
            "the model has no chat template (tokenizer_config.json): use /v1/completions",
        ));
    }
    let prompt = tok
        .encode_chat(&messages, true)
        .map_err(|e| ApiError::invalid("messages", format!("the chat template failed: {e}")))?;
    let plan = req
        .common()?
        .plan(prompt, logprobs, None, &bounds(&state, served.max_context))?;
    run(state, Kind::Chat, req.model, caller, adapter, plan, arrival).await
}
