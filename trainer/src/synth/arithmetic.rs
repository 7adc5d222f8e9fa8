//! `arithmetic` (general): word problems about people and countable things, with operands
//! 1-9 (a starting amount at least 2), results 0-18, one or two steps (add, subtract,
//! compare, total).
//!
//! Every number follows the word that says what it does (`has`, a gain verb, a loss verb),
//! so the answer is determined by the text alone.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::pick;

pub(crate) const NAMES: &[&str] = &[
    "tom", "anna", "ben", "lucy", "sam", "mia", "leo", "zoe", "max", "ella", "omar", "nina",
];
pub(crate) const ITEMS: &[&str] = &[
    "apples", "pears", "coins", "marbles", "stickers", "cookies", "pencils", "stamps", "shells",
    "cards", "plums", "candies",
];
/// Verbs that add the number after them.
pub(crate) const GAINS: &[&str] = &["buys", "gets", "finds", "receives", "wins", "collects"];
/// Verbs that subtract the number after them.
pub(crate) const LOSSES: &[&str] = &["loses", "sells", "drops", "eats"];

pub fn sample(rng: &mut ChaCha8Rng) -> (String, String) {
    let n = *pick(rng, NAMES);
    let m = loop {
        let m = *pick(rng, NAMES);
        if m != n {
            break m;
        }
    };
    let it = *pick(rng, ITEMS);
    let gain = *pick(rng, GAINS);
    let loss = *pick(rng, LOSSES);
    // At least 2, so that nobody "has 1 apples".
    let a: u32 = rng.random_range(2..=9);
    let b: u32 = rng.random_range(2..=9);
    match rng.random_range(0..6) {
        0 => (
            format!("{n} has {a} {it}. then {n} {gain} {b} more. how many {it} does {n} have now?"),
            (a + b).to_string(),
        ),
        1 => {
            let (a, b) = (a.max(b), a.min(b));
            (
                format!(
                    "{n} has {a} {it} and {loss} {b} of them. how many {it} does {n} have left?"
                ),
                (a - b).to_string(),
            )
        }
        2 => {
            let c = rng.random_range(1..=9).min(a + b);
            (
                format!(
                    "{n} has {a} {it}, {gain} {b} more and then {loss} {c}. how many {it} does \
                     {n} have now?"
                ),
                (a + b - c).to_string(),
            )
        }
        3 => (
            format!("{n} has {a} {it} and {m} has {b} {it}. how many {it} do they have together?"),
            (a + b).to_string(),
        ),
        4 => {
            let (a, b) = (a.max(b), a.min(b));
            (
                format!(
                    "{n} has {a} {it} and {m} has {b} {it}. how many more {it} does {n} have \
                     than {m}?"
                ),
                (a - b).to_string(),
            )
        }
        _ => {
            let (a, b) = (a.max(b), a.min(b));
            (
                format!(
                    "{n} has {a} {it} and gives {b} of them to {m}. how many {it} does {n} \
                     have left?"
                ),
                (a - b).to_string(),
            )
        }
    }
}
