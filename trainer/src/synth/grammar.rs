//! `grammar` (general): one or two sentences about animals from a small grammar, then a
//! question whose answer is a phrase copied from them.
//!
//! Sentence: `NP VERB NP [PLACE]`, NP = determiner, up to two adjectives, noun. Every noun
//! in a sample is distinct, so a question naming a noun points at one sentence and one
//! role:
//! - `what does the N VERB?` -> the object phrase (N the subject);
//! - `which animal VERBS the N?` -> the subject phrase (N the object);
//! - `where does the N VERB the M?` -> the place phrase.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::pick;

pub(crate) const DETS: &[&str] = &["the", "a", "this", "that"];
pub(crate) const ADJS: &[&str] = &[
    "small", "big", "red", "brown", "quick", "lazy", "young", "grey", "tall", "wild", "shy",
    "green", "sleepy", "proud", "spotted", "hungry",
];
pub(crate) const NOUNS: &[&str] = &[
    "fox", "bird", "wolf", "deer", "frog", "hare", "crow", "bear", "mouse", "snake", "goat",
    "duck", "badger", "beetle", "rabbit", "lizard",
];
/// (third person singular, base form).
pub(crate) const VERBS: &[(&str, &str)] = &[
    ("chases", "chase"),
    ("sees", "see"),
    ("follows", "follow"),
    ("watches", "watch"),
    ("bites", "bite"),
    ("hunts", "hunt"),
    ("hears", "hear"),
    ("meets", "meet"),
    ("scares", "scare"),
    ("greets", "greet"),
];
pub(crate) const PLACES: &[&str] = &[
    "near the river",
    "under the pine",
    "behind the hill",
    "beside the pond",
    "in the forest",
    "on the meadow",
    "by the lake",
    "across the field",
    "inside the cave",
    "over the stream",
];

struct Sentence {
    subj: String,
    subj_noun: &'static str,
    verb: (&'static str, &'static str),
    obj: String,
    obj_noun: &'static str,
    place: Option<&'static str>,
}

fn noun_phrase(rng: &mut ChaCha8Rng, noun: &'static str) -> String {
    let mut words = vec![*pick(rng, DETS)];
    let n_adj = rng.random_range(0..=2);
    while words.len() < 1 + n_adj {
        let adj = *pick(rng, ADJS);
        if !words.contains(&adj) {
            words.push(adj);
        }
    }
    words.push(noun);
    words.join(" ")
}

pub fn sample(rng: &mut ChaCha8Rng) -> (String, String) {
    let n_sent = rng.random_range(1..=2);
    let mut nouns: Vec<&'static str> = Vec::new();
    while nouns.len() < 2 * n_sent {
        let n = *pick(rng, NOUNS);
        if !nouns.contains(&n) {
            nouns.push(n);
        }
    }
    let sentences: Vec<Sentence> = nouns
        .chunks(2)
        .map(|pair| Sentence {
            subj: noun_phrase(rng, pair[0]),
            subj_noun: pair[0],
            verb: *pick(rng, VERBS),
            obj: noun_phrase(rng, pair[1]),
            obj_noun: pair[1],
            place: rng.random_bool(0.7).then(|| *pick(rng, PLACES)),
        })
        .collect();
    let s = &sentences[rng.random_range(0..sentences.len())];
    let kinds = if s.place.is_some() { 3 } else { 2 };
    let (question, answer) = match (rng.random_range(0..kinds), s.place) {
        (0, _) => (
            format!("what does the {} {}?", s.subj_noun, s.verb.1),
            s.obj.clone(),
        ),
        (1, _) => (
            format!("which animal {} the {}?", s.verb.0, s.obj_noun),
            s.subj.clone(),
        ),
        (_, place) => (
            format!(
                "where does the {} {} the {}?",
                s.subj_noun, s.verb.1, s.obj_noun
            ),
            place.unwrap_or_default().to_string(),
        ),
    };
    let mut text = String::new();
    for s in &sentences {
        text.push_str(&format!("{} {} {}", s.subj, s.verb.0, s.obj));
        if let Some(p) = s.place {
            text.push(' ');
            text.push_str(p);
        }
        text.push_str(". ");
    }
    text.push_str(&question);
    (text, answer)
}
