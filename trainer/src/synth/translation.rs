//! `translation` (downstream): simple english-like sentences into velan, a constructed
//! language with a fixed lexicon and word-order rules (the shape of the ESFT paper's
//! translation task, on a language no base model has seen).
//!
//! A clause is `the [ADJ] SUBJ VERB the [ADJ] OBJ`, present or past, subjects singular or
//! plural; two clauses may be joined by `and`. Velan:
//! - drops `the`; word order subject, object, verb (SOV);
//! - puts an adjective after its noun;
//! - marks a plural noun with the suffix `-en`;
//! - ends the object phrase with the particle `lo`;
//! - follows a past verb with the particle `ka` (present: nothing);
//! - joins clauses with `su`.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::pick;

/// (english singular, english plural, velan stem). Subjects are people.
pub(crate) const PEOPLE: &[(&str, &str, &str)] = &[
    ("farmer", "farmers", "dovak"),
    ("teacher", "teachers", "mirel"),
    ("king", "kings", "tarun"),
    ("queen", "queens", "ramesa"),
    ("sailor", "sailors", "kelo"),
    ("baker", "bakers", "pumar"),
    ("doctor", "doctors", "selin"),
    ("girl", "girls", "nava"),
    ("boy", "boys", "tiko"),
    ("soldier", "soldiers", "garu"),
    ("poet", "poets", "lirin"),
    ("painter", "painters", "oskel"),
];

/// Objects are things or people.
pub(crate) const THINGS: &[(&str, &str, &str)] = &[
    ("letter", "letters", "vesk"),
    ("boat", "boats", "nilo"),
    ("book", "books", "pardu"),
    ("cup", "cups", "kima"),
    ("door", "doors", "hanta"),
    ("garden", "gardens", "ulmi"),
    ("basket", "baskets", "sorri"),
    ("cake", "cakes", "bemo"),
    ("ring", "rings", "zefa"),
    ("wall", "walls", "doru"),
    ("bridge", "bridges", "kantel"),
    ("ship", "ships", "vorra"),
    ("window", "windows", "fessi"),
    ("table", "tables", "motta"),
];

/// (english, velan).
pub(crate) const ADJS: &[(&str, &str)] = &[
    ("happy", "lume"),
    ("sad", "toro"),
    ("rich", "vani"),
    ("poor", "dessa"),
    ("clever", "iska"),
    ("tired", "mobu"),
    ("new", "fenn"),
    ("heavy", "gorr"),
    ("tiny", "pipa"),
    ("huge", "brakka"),
    ("pretty", "silla"),
    ("strange", "quor"),
    ("brave", "dalen"),
];

/// (base, third person singular, past, velan).
pub(crate) const VERBS: &[(&str, &str, &str, &str)] = &[
    ("paint", "paints", "painted", "reko"),
    ("wash", "washes", "washed", "lunda"),
    ("build", "builds", "built", "kastra"),
    ("write", "writes", "wrote", "skiv"),
    ("carry", "carries", "carried", "bora"),
    ("open", "opens", "opened", "apa"),
    ("love", "loves", "loved", "amu"),
    ("hold", "holds", "held", "tena"),
    ("pull", "pulls", "pulled", "drak"),
    ("visit", "visits", "visited", "vizo"),
    ("bake", "bakes", "baked", "pekka"),
    ("fix", "fixes", "fixed", "melo"),
    ("throw", "throws", "threw", "jask"),
    ("cook", "cooks", "cooked", "kuvi"),
];

pub(crate) const PLURAL: &str = "en";
pub(crate) const OBJECT: &str = "lo";
pub(crate) const PAST: &str = "ka";
pub(crate) const AND: &str = "su";

/// A noun phrase in both languages.
fn noun_phrase(
    rng: &mut ChaCha8Rng,
    nouns: &[(&'static str, &'static str, &'static str)],
) -> (String, String, bool) {
    let (sing, plur, stem) = *pick(rng, nouns);
    let plural = rng.random_bool(0.35);
    let (en_noun, ve_noun) = if plural {
        (plur.to_string(), format!("{stem}{PLURAL}"))
    } else {
        (sing.to_string(), stem.to_string())
    };
    if rng.random_bool(0.5) {
        let (en_adj, ve_adj) = *pick(rng, ADJS);
        (
            format!("the {en_adj} {en_noun}"),
            format!("{ve_noun} {ve_adj}"),
            plural,
        )
    } else {
        (format!("the {en_noun}"), ve_noun, plural)
    }
}

fn clause(rng: &mut ChaCha8Rng) -> (String, String) {
    let (en_s, ve_s, plural) = noun_phrase(rng, PEOPLE);
    let objects = if rng.random_bool(0.2) { PEOPLE } else { THINGS };
    let (en_o, ve_o, _) = noun_phrase(rng, objects);
    let (base, third, past, ve_v) = *pick(rng, VERBS);
    let is_past = rng.random_bool(0.4);
    let en_v = match (is_past, plural) {
        (true, _) => past,
        (false, true) => base,
        (false, false) => third,
    };
    let mut ve = format!("{ve_s} {ve_o} {OBJECT} {ve_v}");
    if is_past {
        ve.push(' ');
        ve.push_str(PAST);
    }
    (format!("{en_s} {en_v} {en_o}"), ve)
}

pub fn sample(rng: &mut ChaCha8Rng) -> (String, String) {
    let (mut en, mut ve) = clause(rng);
    if rng.random_bool(0.3) {
        let (en2, ve2) = clause(rng);
        en = format!("{en} and {en2}");
        ve = format!("{ve} {AND} {ve2}");
    }
    (format!("translate into velan: {en}"), ve)
}
