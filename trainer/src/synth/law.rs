//! `law` (downstream): short case facts to the applicable article, the shape of the ESFT
//! paper's legal classification task.
//!
//! The facts are one sentence with the act (an actor, one of four act categories, an
//! object or victim, and perhaps an aggravating circumstance) among one to three
//! distractor sentences that never bear on the article. The rule is the table `ARTICLES`:
//! act category x circumstance (none, armed, in a group) -> article.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::pick;

/// `ARTICLES[category][circumstance]`; categories in `ACTS` order, circumstances none,
/// armed, group.
pub(crate) const ARTICLES: [[u32; 3]; 4] = [[12, 13, 14], [21, 22, 23], [31, 32, 33], [41, 42, 43]];

const ACTORS: &[&str] = &[
    "the defendant",
    "the accused",
    "a shopkeeper",
    "a tenant",
    "a driver",
    "a clerk",
    "a neighbour",
    "a courier",
    "a cashier",
    "a mechanic",
];

/// Movable goods (theft, fraud): with `a`, and the bare noun.
const GOODS: &[&str] = &[
    "bicycle", "wallet", "laptop", "watch", "phone", "necklace", "camera", "handbag",
];
const VICTIMS: &[&str] = &[
    "a security guard",
    "a passenger",
    "a waiter",
    "a cyclist",
    "a student",
    "a pensioner",
];
const PROPERTY: &[&str] = &[
    "a parked car",
    "a bus shelter",
    "a shop front",
    "a garden fence",
    "a vending machine",
    "a warehouse door",
];

/// Per category: phrases with `{g}` (goods noun), `{v}` (victim) or `{p}` (property).
pub(crate) const ACTS: [(&str, &[&str]); 4] = [
    (
        "theft",
        &[
            "took a {g} from a market stall without paying",
            "stole a {g} from a delivery van",
            "removed a {g} from an office without permission",
            "pocketed a {g} belonging to a coworker",
        ],
    ),
    (
        "fraud",
        &[
            "sold a counterfeit {g} to a buyer",
            "forged a receipt for a {g}",
            "accepted payment for a {g} that was never delivered",
            "used a false identity to lease a {g}",
        ],
    ),
    (
        "assault",
        &[
            "struck {v} in the face",
            "kicked {v} during an argument",
            "pushed {v} down a staircase",
            "punched {v} outside a bar",
        ],
    ),
    (
        "damage",
        &[
            "smashed {p}",
            "set fire to {p}",
            "spray painted {p}",
            "wrecked {p}",
        ],
    ),
];

/// Aggravating circumstances: index 1 armed, index 2 group.
pub(crate) const CIRCUMSTANCES: [&[&str]; 2] = [
    &[
        "while carrying a knife",
        "while armed with a metal bar",
        "while holding a loaded pistol",
        "while carrying a hidden blade",
    ],
    &[
        "together with three accomplices",
        "as part of an organised gang",
        "acting with several associates",
        "with the help of a hired crew",
    ],
];

const DISTRACTORS: &[&str] = &[
    "the weather was cold that evening.",
    "a witness later spoke to the police.",
    "the defendant had moved to the city a year earlier.",
    "the hearing was postponed once.",
    "the defendant works as a part time gardener.",
    "the street was busy at the time.",
    "the prosecutor filed the charges in march.",
    "the defendant apologised in court.",
    "the defendant had no prior convictions.",
    "the lawyer asked for a short delay.",
    "the incident happened on a tuesday.",
    "the victim reported the matter the next morning.",
];

pub fn sample(rng: &mut ChaCha8Rng) -> (String, String) {
    let category = rng.random_range(0..ACTS.len());
    let circumstance = rng.random_range(0..3);
    let act = pick(rng, ACTS[category].1)
        .replace("{g}", pick::<&str>(rng, GOODS))
        .replace("{v}", pick::<&str>(rng, VICTIMS))
        .replace("{p}", pick::<&str>(rng, PROPERTY));
    let mut fact = format!("{} {act}", pick(rng, ACTORS));
    if circumstance > 0 {
        fact.push(' ');
        fact.push_str(pick::<&str>(rng, CIRCUMSTANCES[circumstance - 1]));
    }
    fact.push('.');
    let n_distractors = rng.random_range(1..=3);
    let mut sentences: Vec<String> = Vec::new();
    while sentences.len() < n_distractors {
        let d = pick(rng, DISTRACTORS).to_string();
        if !sentences.contains(&d) {
            sentences.push(d);
        }
    }
    let at = rng.random_range(0..=sentences.len());
    sentences.insert(at, fact);
    let question = format!("case facts: {} which article applies?", sentences.join(" "));
    (
        question,
        format!("article {}", ARTICLES[category][circumstance]),
    )
}
