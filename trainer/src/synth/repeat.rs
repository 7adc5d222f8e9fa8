//! `repeat`: copy a piece of text drawn from any other domain. Not a task of its own: it is
//! how the base model sees the words, numbers and punctuation of every domain (the
//! downstream tasks' JSON, velan words and article numbers included) without ever seeing a
//! downstream task, as a pretrained language model has seen the vocabulary of tasks it was
//! never trained on.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{Kind, DOMAINS};

/// Shortest and longest span copied from a question, in words.
const MIN_WORDS: usize = 3;
const MAX_WORDS: usize = 12;

pub fn sample(rng: &mut ChaCha8Rng) -> (String, String) {
    let sources: Vec<_> = DOMAINS
        .iter()
        .filter(|d| d.kind != Kind::Auxiliary)
        .collect();
    let source = sources[rng.random_range(0..sources.len())];
    let (question, answer) = (source.sample)(rng);
    let text = if rng.random_bool(0.5) {
        answer
    } else {
        let words: Vec<&str> = question.split_whitespace().collect();
        let len = rng.random_range(MIN_WORDS.min(words.len())..=MAX_WORDS.min(words.len()));
        let start = rng.random_range(0..=words.len() - len);
        words[start..start + len].join(" ")
    };
    (format!("repeat: {text}"), text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn answers_repeat_the_question_and_cover_the_downstream_vocabulary() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut seen = String::new();
        for _ in 0..2000 {
            let (q, a) = sample(&mut rng);
            assert_eq!(q, format!("repeat: {a}"));
            assert!(!a.trim().is_empty());
            seen.push_str(&a);
            seen.push(' ');
        }
        for needle in ["{\"intent\": ", "article ", " lo ", "print("] {
            assert!(seen.contains(needle), "{needle:?} never copied");
        }
    }
}
