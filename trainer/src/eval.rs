//! Evaluation: greedy generation on the reference eval format scored by exact match, or
//! the mean target-token loss.

use anyhow::Result;
use std::sync::Arc;

use esft::engine::{generate_all, SamplingParams, Sequence};
use esft::model::{ExpertMap, LoadedModel};

use crate::data::{eval_prompt_tokens, EvalItem, SpecialIds};

/// Whether a generated answer matches an accepted one: equal after trimming whitespace,
/// or, when the accepted answer is JSON, the prediction starts with an equal JSON value
/// (key order and spacing do not matter; text after the value is ignored).
pub fn answer_matches(prediction: &str, answer: &str) -> bool {
    let (p, a) = (prediction.trim(), answer.trim());
    if p == a {
        return true;
    }
    let Ok(want) = serde_json::from_str::<serde_json::Value>(a) else {
        return false;
    };
    if !(want.is_object() || want.is_array()) {
        return false;
    }
    let mut stream = serde_json::Deserializer::from_str(p).into_iter::<serde_json::Value>();
    matches!(stream.next(), Some(Ok(got)) if got == want)
}

/// One prediction.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Prediction {
    pub line: usize,
    pub prediction: String,
    pub answers: Vec<String>,
    pub correct: bool,
}

/// Generates greedily (up to `max_tokens`, stopping at EOS) for every item, `batch` prompts
/// at a time, and scores each against its answers.
pub fn exact_match(
    loaded: &LoadedModel,
    experts: Option<Arc<ExpertMap>>,
    items: &[EvalItem],
    max_tokens: usize,
    batch: usize,
    mut on_done: impl FnMut(usize),
) -> Result<Vec<Prediction>> {
    let ids = SpecialIds::of(loaded.model.config(), &loaded.tokenizer)?;
    let max_len = loaded.max_context();
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(batch.max(1)) {
        let mut seqs = Vec::with_capacity(chunk.len());
        for item in chunk {
            let prompt = eval_prompt_tokens(item, &loaded.tokenizer, ids)?;
            if prompt.len() >= max_len {
                anyhow::bail!(
                    "line {}: the prompt has {} tokens; the model's context is {max_len}",
                    item.line,
                    prompt.len()
                );
            }
            let params = SamplingParams {
                temperature: 0.0,
                max_tokens,
                ..SamplingParams::default()
            };
            let mut s = Sequence::new(
                prompt,
                params,
                loaded.model.new_cache(),
                loaded.eos_ids(),
                max_len,
            );
            s.experts = experts.clone();
            seqs.push(s);
        }
        generate_all(&loaded.model, Some(&loaded.tokenizer), &mut seqs, 4096)?;
        for (item, s) in chunk.iter().zip(&seqs) {
            let prediction = s.text().to_string();
            let correct = item.answers.iter().any(|a| answer_matches(&prediction, a));
            out.push(Prediction {
                line: item.line,
                prediction,
                answers: item.answers.clone(),
                correct,
            });
        }
        on_done(chunk.len());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_json_matching() {
        assert!(answer_matches("  42 ", "42"));
        assert!(
            !answer_matches("42.0", "42"),
            "plain answers compare as text"
        );
        let a = r#"{"intent": "Music-Play", "slots": {"album": "x", "mode": "y"}}"#;
        assert!(answer_matches(
            r#"{"slots":{"mode":"y","album":"x"},"intent":"Music-Play"}"#,
            a
        ));
        assert!(answer_matches(&format!("{a}。 trailing"), a));
        assert!(!answer_matches(
            r#"{"intent": "Music-Play", "slots": {}}"#,
            a
        ));
        assert!(!answer_matches("not json", a));
    }
}
