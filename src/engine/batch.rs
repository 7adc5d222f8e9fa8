//! One model step over a set of sequences, and a synchronous generation loop built on it.
//!
//! A step feeds every participating sequence its next input (a prompt chunk or its last
//! token) in one ragged forward, then samples for the sequences that produced logits.

use super::sequence::{Sequence, TokenEvent};
use crate::model::tokenizer::TextTokenizer;
use crate::model::{Decoder, SeqInput};

/// Runs one forward over `seqs`. `budgets[i]` bounds the prompt tokens taken from sequence
/// `i` while it prefills; a budget of 0 (or a finished sequence) sits this step out.
/// Returns, per sequence, the token it produced (none while its prefill is in progress).
pub fn step(
    model: &Decoder,
    tok: Option<&TextTokenizer>,
    seqs: &mut [&mut Sequence],
    budgets: &[usize],
) -> crate::model::Result<Vec<Option<TokenEvent>>> {
    let mut events = vec![None; seqs.len()];
    let takes_part = |s: &Sequence, b: usize| !s.is_finished() && b > 0;
    let active: Vec<usize> = (0..seqs.len())
        .filter(|&i| takes_part(seqs[i], budgets[i]))
        .collect();
    if active.is_empty() {
        return Ok(events);
    }
    let (output, fed) = {
        let mut batch: Vec<SeqInput<'_>> = seqs
            .iter_mut()
            .zip(budgets)
            .filter(|(s, &b)| takes_part(s, b))
            .map(|(s, &b)| s.next_input(b))
            .collect();
        let fed: Vec<usize> = batch.iter().map(|b| b.tokens.len()).collect();
        (model.forward(&mut batch, None)?, fed)
    };
    let mut logits: Vec<Vec<f32>> = match &output.logits {
        Some(t) => t.to_vec2()?,
        None => Vec::new(),
    };
    for (k, &i) in active.iter().enumerate() {
        seqs[i].advance(fed[k]);
        let rows = &output.rows[k];
        if rows.is_empty() {
            continue;
        }
        if let Some(row) = logits.get_mut(rows.start) {
            events[i] = Some(seqs[i].accept(row, tok)?);
        }
    }
    Ok(events)
}

/// Generates every sequence to completion, all sharing each step's batch.
pub fn generate_all(
    model: &Decoder,
    tok: Option<&TextTokenizer>,
    seqs: &mut [Sequence],
    prefill_budget: usize,
) -> crate::model::Result<()> {
    let budgets = vec![prefill_budget.max(1); seqs.len()];
    let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
    while refs.iter().any(|s| !s.is_finished()) {
        step(model, tok, &mut refs, &budgets)?;
    }
    Ok(())
}
