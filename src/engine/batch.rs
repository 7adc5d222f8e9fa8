//! One model step over a set of sequences, and a synchronous generation loop built on it.
//!
//! A step feeds every unfinished sequence its next input (a prompt chunk or its last
//! token) in one ragged forward, then samples for the sequences that produced logits.

use candle_core::Tensor;

use super::sequence::{Sequence, TokenEvent};
use crate::model::tokenizer::TextTokenizer;
use crate::model::{DeepSeekV2, SeqInput};

/// Runs one forward over `seqs` (finished ones are skipped). `prefill_budget` bounds the
/// prompt tokens taken from each prefilling sequence in this step. Returns, per sequence,
/// the token it produced (none while its prefill is still in progress).
pub fn step(
    model: &DeepSeekV2,
    tok: Option<&TextTokenizer>,
    seqs: &mut [&mut Sequence],
    prefill_budget: usize,
) -> crate::model::Result<Vec<Option<TokenEvent>>> {
    let mut events = vec![None; seqs.len()];
    let active: Vec<usize> = (0..seqs.len())
        .filter(|&i| !seqs[i].is_finished())
        .collect();
    if active.is_empty() {
        return Ok(events);
    }
    let (output, fed) = {
        let mut batch: Vec<SeqInput<'_>> = seqs
            .iter_mut()
            .filter(|s| !s.is_finished())
            .map(|s| s.next_input(prefill_budget))
            .collect();
        let fed: Vec<usize> = batch.iter().map(|b| b.tokens.len()).collect();
        (model.forward(&mut batch, None)?, fed)
    };
    let logits: Option<Vec<Vec<f32>>> = output.logits.as_ref().map(Tensor::to_vec2).transpose()?;
    for (k, &i) in active.iter().enumerate() {
        seqs[i].advance(fed[k]);
        let rows = &output.rows[k];
        if let (Some(all), false) = (&logits, rows.is_empty()) {
            let mut row = all[rows.start].clone();
            events[i] = Some(seqs[i].accept(&mut row, tok)?);
        }
    }
    Ok(events)
}

/// Generates every sequence to completion, all sharing each step's batch.
pub fn generate_all(
    model: &DeepSeekV2,
    tok: Option<&TextTokenizer>,
    seqs: &mut [Sequence],
    prefill_budget: usize,
) -> crate::model::Result<()> {
    let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
    while refs.iter().any(|s| !s.is_finished()) {
        step(model, tok, &mut refs, prefill_budget)?;
    }
    Ok(())
}
