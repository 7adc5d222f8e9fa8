//! One request's generation state: its tokens, latent cache, sampler and stop conditions.

use std::sync::Arc;

use super::sampler::{logprobs, Sampler, SamplingParams, TokenLogprobs};
use super::stop::StopStrings;
use crate::model::tokenizer::{IncrementalDecoder, TextTokenizer};
use crate::model::{ExpertMap, LogitsWanted, SeqCache, SeqInput};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// EOS, a stop token id or a stop string.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
    /// The client went away or the request was cancelled.
    Cancelled,
}

/// What one step produced for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub token: u32,
    /// Newly released text (may be empty while a character or a stop string is pending).
    pub text: String,
    pub finish: Option<FinishReason>,
    /// When the request asked for them: log-probabilities after the penalties, before
    /// temperature, top-k and top-p.
    pub logprobs: Option<TokenLogprobs>,
}

pub struct Sequence {
    prompt: Vec<u32>,
    generated: Vec<u32>,
    pub cache: SeqCache,
    pub experts: Option<Arc<ExpertMap>>,
    sampler: Sampler,
    stops: StopStrings,
    decoder: IncrementalDecoder,
    eos: Vec<u32>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// Most tokens (prompt + output) the sequence may hold.
    max_len: usize,
    text: String,
    finish: Option<FinishReason>,
    /// Out of time: the next token is the last (`length`).
    time_up: bool,
}

impl Sequence {
    /// `eos`: the model's end-of-sequence ids (ignored when `params.ignore_eos`).
    pub fn new(
        prompt: Vec<u32>,
        params: SamplingParams,
        cache: SeqCache,
        eos: &[u32],
        max_len: usize,
    ) -> Self {
        let stops = StopStrings::new(params.stop.clone());
        let mut stop_ids: Vec<u32> = params.stop_token_ids.clone();
        if !params.ignore_eos {
            stop_ids.extend_from_slice(eos);
        }
        Self {
            sampler: Sampler::new(params, &prompt),
            prompt,
            generated: Vec::new(),
            cache,
            experts: None,
            stops,
            decoder: IncrementalDecoder::new(),
            eos: stop_ids,
            prefilled: 0,
            max_len,
            text: String::new(),
            finish: None,
            time_up: false,
        }
    }

    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    /// Text released so far (stop strings and what follows them excluded).
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    pub fn is_prefilling(&self) -> bool {
        self.prefilled < self.prompt.len()
    }

    pub fn params(&self) -> &SamplingParams {
        self.sampler.params()
    }

    /// This sequence's part of the next forward: the tokens to feed (at most `budget`
    /// prompt tokens while prefilling) with its cache and expert map.
    pub fn next_input(&mut self, budget: usize) -> SeqInput<'_> {
        let (tokens, logits) = if self.is_prefilling() {
            let end = (self.prefilled + budget.max(1)).min(self.prompt.len());
            let wanted = if end == self.prompt.len() {
                LogitsWanted::Last
            } else {
                LogitsWanted::None
            };
            (&self.prompt[self.prefilled..end], wanted)
        } else {
            let last = self.generated.len() - 1;
            (&self.generated[last..], LogitsWanted::Last)
        };
        SeqInput {
            tokens,
            cache: &mut self.cache,
            experts: self.experts.as_deref(),
            logits,
        }
    }

    /// Records that `n` tokens of [`Sequence::next_input`] went through the model.
    pub fn advance(&mut self, n: usize) {
        if self.is_prefilling() {
            self.prefilled += n;
        }
    }

    /// Samples from this sequence's logits row and applies the stop conditions.
    pub fn accept(
        &mut self,
        logits: &mut [f32],
        tok: Option<&TextTokenizer>,
    ) -> crate::model::Result<TokenEvent> {
        let token = self.sampler.sample(logits);
        // `sample` left the penalised logits in `logits`.
        let lp = self
            .params()
            .logprobs
            .map(|top| logprobs(logits, token, top));
        self.sampler.observe(token);
        self.generated.push(token);
        let mut finish = None;
        let mut text = String::new();
        if self.eos.contains(&token) {
            finish = Some(FinishReason::Stop);
        } else if let Some(tok) = tok {
            let piece = self.decoder.push(tok, token)?;
            let scan = self.stops.push(&piece);
            text = scan.emit;
            if scan.stopped {
                finish = Some(FinishReason::Stop);
            }
        }
        if finish.is_none()
            && (self.time_up
                || self.generated.len() >= self.params().max_tokens
                || self.prompt.len() + self.generated.len() >= self.max_len)
        {
            finish = Some(FinishReason::Length);
        }
        if finish == Some(FinishReason::Length) {
            if let Some(tok) = tok {
                let tail = self.decoder.flush(tok)?;
                text.push_str(&self.stops.push(&tail).emit);
                text.push_str(&self.stops.finish());
            }
        }
        self.text.push_str(&text);
        self.finish = finish;
        Ok(TokenEvent {
            token,
            text,
            finish,
            logprobs: lp,
        })
    }

    /// Ends the sequence for lack of time, as `length`: at once while it has produced
    /// nothing, else with the next token (which releases any text still held back).
    /// Returns whether this call ended it (false when it had ended or was ending).
    pub fn end_by_time(&mut self) -> bool {
        if self.finish.is_some() || self.time_up {
            return false;
        }
        if self.generated.is_empty() {
            self.finish = Some(FinishReason::Length);
        } else {
            self.time_up = true;
        }
        true
    }

    pub fn cancel(&mut self) {
        if self.finish.is_none() {
            self.finish = Some(FinishReason::Cancelled);
        }
    }
}
