//! The OpenAI request bodies, and turning one into what the engine runs: prompt ids,
//! sampling parameters, the number of choices and how to answer.

use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;

use super::errors::ApiError;
use crate::engine::{SamplingParams, MAX_TOP_LOGPROBS};
use crate::model::tokenizer::{ChatMessage, TextTokenizer};

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// `stop`: one string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Fields both endpoints take, sampling and output shape.
#[derive(Debug, Default)]
pub struct Common {
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub top_k: Option<i64>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    pub stop_token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Value,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<u64>,
    pub echo: Option<bool>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub best_of: Option<u64>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub suffix: Option<String>,
    pub user: Option<String>,
    pub top_k: Option<i64>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    pub stop_token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Value,
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessageIn>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u64>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub user: Option<String>,
    pub tools: Option<Vec<Value>>,
    pub response_format: Option<Value>,
    pub top_k: Option<i64>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    pub stop_token_ids: Option<Vec<u32>>,
}

/// What a request asks the engine for.
#[derive(Debug, Clone)]
pub struct Plan {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
}

/// Server-side bounds a request is checked against.
pub struct Bounds {
    pub max_context: usize,
    pub max_n: usize,
    pub max_stop: usize,
}

impl CompletionRequest {
    pub fn common(&mut self) -> Common {
        Common {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            n: self.n,
            stream: self.stream,
            stream_options: self.stream_options.take(),
            stop: self.stop.take(),
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.take(),
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            ignore_eos: self.ignore_eos,
            stop_token_ids: self.stop_token_ids.take(),
        }
    }

    /// The prompt, taken out of the request: text (to tokenize) or token ids (verbatim).
    pub fn take_prompt(&mut self) -> Result<Prompt, ApiError> {
        let bad = || {
            ApiError::invalid(
                "prompt",
                "prompt must be a string or an array of token ids (one prompt per request)",
            )
        };
        match std::mem::take(&mut self.prompt) {
            Value::String(s) => Ok(Prompt::Text(s)),
            Value::Array(mut items) if items.len() == 1 && items[0].is_string() => {
                match items.pop() {
                    Some(Value::String(s)) => Ok(Prompt::Text(s)),
                    _ => Err(bad()),
                }
            }
            Value::Array(items) => {
                let ids: Option<Vec<u32>> = items
                    .iter()
                    .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
                    .collect();
                let ids = ids.ok_or_else(bad)?;
                if ids.is_empty() {
                    return Err(ApiError::invalid("prompt", "the prompt is empty"));
                }
                Ok(Prompt::Ids(ids))
            }
            _ => Err(bad()),
        }
    }

    /// Refuses the OpenAI fields this server does not implement, rather than ignoring them.
    pub fn refuse_unsupported(&self) -> Result<(), ApiError> {
        if self.echo == Some(true) {
            return Err(ApiError::invalid("echo", "echo is not supported"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid("suffix", "suffix is not supported"));
        }
        if let Some(b) = self.best_of {
            if b != self.n.unwrap_or(1) {
                return Err(ApiError::invalid(
                    "best_of",
                    "best_of is not supported (other than equal to n)",
                ));
            }
        }
        Ok(())
    }

    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        match self.logprobs {
            None => Ok(None),
            Some(n) if n as usize <= MAX_TOP_LOGPROBS => Ok(Some(n as usize)),
            Some(n) => Err(ApiError::invalid(
                "logprobs",
                format!("logprobs must be at most {MAX_TOP_LOGPROBS}, got {n}"),
            )),
        }
    }
}

/// A completion prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Text: tokenized, BOS added as the tokenizer does.
    Text(String),
    /// Token ids, used verbatim.
    Ids(Vec<u32>),
}

/// Refuses, by its length alone, a text that cannot fit the context: no token stands for
/// more than `tok.max_token_bytes()` bytes, so a text longer than that times `max_context`
/// encodes to more tokens than the context holds (whatever the tokenizer adds, BOS or the
/// chat template's text, only adds tokens). Never refuses a text that would fit; without a
/// bound (see [`TextTokenizer::max_token_bytes`]) it refuses nothing.
pub fn refuse_by_length(
    tok: &TextTokenizer,
    text_bytes: usize,
    max_context: usize,
    param: &str,
    what: &str,
) -> Result<(), ApiError> {
    let Some(per_token) = tok.max_token_bytes() else {
        return Ok(());
    };
    let most = per_token.saturating_mul(max_context);
    if text_bytes <= most {
        return Ok(());
    }
    Err(ApiError::invalid(
        param,
        format!(
            "{what} is {text_bytes} bytes long; the model's context is {max_context} tokens of at most {per_token} bytes each ({most} bytes), so it cannot fit"
        ),
    )
    .code("context_length_exceeded"))
}

/// Tokenizes a completion prompt (blocking: run it off the async threads).
pub fn encode_prompt(tok: &TextTokenizer, text: &str) -> Result<Vec<u32>, ApiError> {
    let ids = tok
        .encode(text, true)
        .map_err(|e| ApiError::invalid("prompt", format!("could not tokenize the prompt: {e}")))?;
    if ids.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    Ok(ids)
}

impl ChatRequest {
    pub fn common(&mut self) -> Result<Common, ApiError> {
        if self.max_tokens.is_some() && self.max_completion_tokens.is_some() {
            return Err(ApiError::invalid(
                "max_completion_tokens",
                "set max_tokens or max_completion_tokens, not both",
            ));
        }
        Ok(Common {
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            n: self.n,
            stream: self.stream,
            stream_options: self.stream_options.take(),
            stop: self.stop.take(),
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.take(),
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            ignore_eos: self.ignore_eos,
            stop_token_ids: self.stop_token_ids.take(),
        })
    }

    pub fn refuse_unsupported(&self) -> Result<(), ApiError> {
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::invalid("tools", "tools are not supported"));
        }
        if let Some(f) = &self.response_format {
            if f.get("type").and_then(Value::as_str) != Some("text") {
                return Err(ApiError::invalid(
                    "response_format",
                    "only response_format {\"type\": \"text\"} is supported",
                ));
            }
        }
        Ok(())
    }

    /// `None`: no logprobs; `Some(k)`: the sampled token's and `k` alternatives.
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        let top = self.top_logprobs.unwrap_or(0);
        if top as usize > MAX_TOP_LOGPROBS {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {top}"),
            ));
        }
        match self.logprobs {
            Some(true) => Ok(Some(top as usize)),
            _ if self.top_logprobs.is_some_and(|t| t > 0) => Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            )),
            _ => Ok(None),
        }
    }

    /// The messages as the chat template takes them.
    pub fn messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "messages",
                "messages must hold at least one message",
            ));
        }
        let mut out = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].role"),
                        format!(
                            "role {other:?} is not supported (system, developer, user, assistant)"
                        ),
                    ))
                }
            };
            let param = format!("messages[{i}].content");
            let content = match &m.content {
                Value::String(s) => s.clone(),
                Value::Null if role == "assistant" => String::new(),
                Value::Array(parts) => {
                    let mut text = String::new();
                    for p in parts {
                        match (
                            p.get("type").and_then(Value::as_str),
                            p.get("text").and_then(Value::as_str),
                        ) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::invalid(
                                    &param,
                                    "only text content parts are supported",
                                ))
                            }
                        }
                    }
                    text
                }
                _ => {
                    return Err(ApiError::invalid(
                        &param,
                        "content must be a string or an array of text parts",
                    ))
                }
            };
            out.push(ChatMessage::new(role, &content));
        }
        Ok(out)
    }
}

/// Renders the chat template over `messages` and tokenizes the result, refusing by length
/// ([`refuse_by_length`], param `messages`) a conversation that cannot fit before
/// tokenizing it (blocking: run it off the async threads).
pub fn encode_chat(
    tok: &TextTokenizer,
    messages: &[ChatMessage],
    max_context: usize,
) -> Result<Vec<u32>, ApiError> {
    let failed = |e| ApiError::invalid("messages", format!("the chat template failed: {e}"));
    let text = tok.render_chat(messages, true).map_err(failed)?;
    refuse_by_length(
        tok,
        text.len(),
        max_context,
        "messages",
        "the conversation (rendered with the chat template)",
    )?;
    tok.encode(&text, false).map_err(failed)
}

impl Common {
    /// Checks everything against the bounds and builds the plan. `default_max_tokens`:
    /// `None` = the rest of the context.
    pub fn plan(
        self,
        prompt: Vec<u32>,
        logprobs: Option<usize>,
        default_max_tokens: Option<usize>,
        b: &Bounds,
    ) -> Result<Plan, ApiError> {
        let context_left = b.max_context.saturating_sub(prompt.len());
        if prompt.len() >= b.max_context {
            return Err(ApiError::invalid(
                "prompt",
                format!(
                    "the prompt has {} tokens; the model's context is {} tokens, which leaves no room to generate",
                    prompt.len(),
                    b.max_context
                ),
            )
            .code("context_length_exceeded"));
        }
        let max_tokens = match self.max_tokens {
            Some(0) => {
                return Err(ApiError::invalid("max_tokens", "max_tokens must be at least 1"))
            }
            Some(m) if m > context_left as u64 => {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!(
                        "max_tokens is {m}, but the context is {} tokens and the prompt takes {}: at most {context_left} tokens can be generated",
                        b.max_context,
                        prompt.len()
                    ),
                )
                .code("context_length_exceeded"))
            }
            Some(m) => m as usize,
            None => default_max_tokens.unwrap_or(context_left).min(context_left),
        };
        let n = self.n.unwrap_or(1);
        if n == 0 || n > b.max_n as u64 {
            return Err(ApiError::invalid(
                "n",
                format!("n must be between 1 and {}, got {n}", b.max_n),
            ));
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(ApiError::invalid(
                "logit_bias",
                "logit_bias is not supported",
            ));
        }
        let stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        if stop.len() > b.max_stop {
            return Err(ApiError::invalid(
                "stop",
                format!("at most {} stop strings, got {}", b.max_stop, stop.len()),
            ));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("top_k must be positive, or 0 or -1 for no limit; got {k}"),
                ))
            }
        };
        let d = SamplingParams::default();
        let params = SamplingParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_p: self.top_p.unwrap_or(d.top_p),
            top_k,
            seed: self.seed.map(|s| s as u64),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            max_tokens,
            stop_token_ids: self.stop_token_ids.unwrap_or_default(),
            stop,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            logprobs,
        };
        params
            .validate()
            .map_err(|(p, m)| ApiError::invalid(p, format!("{p}: {m}")))?;
        let stream = self.stream.unwrap_or(false);
        let include_usage = self
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        Ok(Plan {
            prompt,
            params,
            n: n as usize,
            stream,
            include_usage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    fn lite() -> TextTokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lite");
        TextTokenizer::from_dir(&dir, &[1]).unwrap()
    }

    fn bounds(max_context: usize) -> Bounds {
        Bounds {
            max_context,
            max_n: 1,
            max_stop: 1,
        }
    }

    /// Texts made of the vocabulary's longest tokens, the densest text there is.
    fn dense_texts(tok: &TextTokenizer) -> Vec<String> {
        let per = tok.max_token_bytes().unwrap();
        let longest: Vec<String> = (0..tok.vocab_size() as u32)
            .filter_map(|id| tok.decode(&[id], false).ok())
            .filter(|t| t.len() == per && !t.contains('\u{FFFD}'))
            .collect();
        assert!(!longest.is_empty());
        let mut texts: Vec<String> = longest.iter().map(|t| t.repeat(40)).collect();
        texts.push(longest.concat());
        texts.push("the quick brown fox jumps over the lazy dog. ".repeat(30));
        texts.push("日本語のテキスト、émigré naïve — ✓ 🎉".repeat(20));
        texts
    }

    #[test]
    fn no_text_is_shorter_in_tokens_than_the_length_bound_says() {
        let tok = lite();
        let per = tok.max_token_bytes().unwrap();
        for text in dense_texts(&tok) {
            let n = tok.encode(&text, false).unwrap().len();
            assert!(
                text.len() <= per * n,
                "{} bytes in {n} tokens of at most {per} bytes",
                text.len()
            );
        }
    }

    #[test]
    fn a_prompt_right_at_the_length_bound_is_tokenized_not_refused() {
        let tok = lite();
        let per = tok.max_token_bytes().unwrap();
        let ctx = 64;
        let text = "a".repeat(per * ctx);
        refuse_by_length(&tok, text.len(), ctx, "prompt", "the prompt").unwrap();
        let ids = encode_prompt(&tok, &text).unwrap();
        // Refused, but by its token count, with the message that always had.
        let e = Common::default()
            .plan(ids.clone(), None, Some(16), &bounds(ctx))
            .unwrap_err();
        let expected = format!(
            "the prompt has {} tokens; the model's context is {ctx} tokens, which leaves no room to generate",
            ids.len()
        );
        assert_eq!(e.message, expected);
        assert_eq!(e.code, Some("context_length_exceeded"));

        let e = refuse_by_length(&tok, text.len() + 1, ctx, "prompt", "the prompt").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert_eq!(e.param.as_deref(), Some("prompt"));
        assert!(e.message.contains("bytes"), "{}", e.message);
    }

    #[test]
    fn a_conversation_is_refused_by_its_rendered_length() {
        let tok = lite();
        let per = tok.max_token_bytes().unwrap();
        let ctx = 64;
        let frame = tok
            .render_chat(&[ChatMessage::new("user", "")], true)
            .unwrap()
            .len();
        // Rendered right at the bound: tokenized.
        let fits = ChatMessage::new("user", &"a".repeat(per * ctx - frame));
        let ids = encode_chat(&tok, &[fits], ctx).unwrap();
        assert!(ids.len() > 1);
        // One byte over: refused without tokenizing.
        let over = ChatMessage::new("user", &"a".repeat(per * ctx - frame + 1));
        let e = encode_chat(&tok, &[over], ctx).unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert_eq!(e.param.as_deref(), Some("messages"));
    }

    #[test]
    fn the_prompt_is_taken_as_text_or_ids() {
        let req = |p: Value| -> CompletionRequest {
            serde_json::from_value(serde_json::json!({"model": "m", "prompt": p})).unwrap()
        };
        let take = |p: Value| req(p).take_prompt();
        assert_eq!(take("hi".into()).unwrap(), Prompt::Text("hi".into()));
        assert_eq!(
            take(serde_json::json!(["hi"])).unwrap(),
            Prompt::Text("hi".into())
        );
        assert_eq!(
            take(serde_json::json!([1, 2])).unwrap(),
            Prompt::Ids(vec![1, 2])
        );
        assert_eq!(
            take(serde_json::json!([])).unwrap_err().param.as_deref(),
            Some("prompt")
        );
        assert!(take(serde_json::json!(["a", "b"])).is_err());
        assert!(take(serde_json::json!({"a": 1})).is_err());
    }
}
