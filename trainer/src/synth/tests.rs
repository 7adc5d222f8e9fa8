//! Tests of the generator: determinism, answers re-derived by checkers written apart from
//! the samplers, the eval/train separation, the files against the trainer's readers, and
//! the distinctness of the domains' vocabularies.

use super::*;
use crate::data::{self, Limits, SpecialIds};
use esft::model::tokenizer::TextTokenizer;
use std::collections::{BTreeMap, HashMap};

const SMALL: Sizes = Sizes {
    general_train: 60,
    task_train: 40,
    eval: 8,
};

fn domain(name: &str) -> &'static Domain {
    DOMAINS.iter().find(|d| d.name == name).unwrap()
}

fn draws(name: &str, n: usize, seed: u64) -> Vec<Item> {
    let d = domain(name);
    let mut rng = stream(seed, 7);
    (0..n).map(|_| draw(d, &mut rng)).collect()
}

fn words(text: &str) -> Vec<&str> {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect()
}

fn read_dir(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn same_seed_same_bytes_other_seed_other_data() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    generate(&a, 5, SMALL).unwrap();
    generate(&b, 5, SMALL).unwrap();
    generate(&c, 6, SMALL).unwrap();
    let (fa, fb, fc) = (read_dir(&a), read_dir(&b), read_dir(&c));
    let mut names: Vec<&String> = fa.keys().collect();
    names.sort();
    let mut want = vec!["manifest.json".to_string(), "pretrain.jsonl".to_string()];
    for d in DOMAINS {
        want.push(format!("{}/train.jsonl", d.name));
        want.push(format!("{}/eval.jsonl", d.name));
    }
    want.sort();
    // Exactly the final files: no temporary file is left behind.
    assert_eq!(names, want.iter().collect::<Vec<_>>());
    assert_eq!(fa, fb);
    for name in want.iter().filter(|n| n.ends_with(".jsonl")) {
        assert_ne!(fa[name], fc[name], "{name} is the same under another seed");
    }
    // Overwriting an existing output works and gives the same bytes.
    generate(&a, 5, SMALL).unwrap();
    assert_eq!(read_dir(&a), fb);
}

// ---- independent checkers, one per domain ----

/// Parses `DET ADJ* NOUN` at the start of `w`: (phrase, noun, words used).
fn parse_np<'a>(w: &[&'a str]) -> Option<(String, &'a str, usize)> {
    if !grammar::DETS.contains(w.first()?) {
        return None;
    }
    let mut i = 1;
    while grammar::ADJS.contains(w.get(i)?) {
        i += 1;
    }
    let noun = *w.get(i)?;
    grammar::NOUNS
        .contains(&noun)
        .then(|| (w[..=i].join(" "), noun, i + 1))
}

fn check_grammar(q: &str) -> String {
    let parts: Vec<&str> = q.split(". ").collect();
    let (question, statements) = parts.split_last().unwrap();
    // (subject phrase, subject noun, verb third person, object phrase, object noun, place)
    let mut facts = Vec::new();
    for s in statements {
        let w: Vec<&str> = s.split(' ').collect();
        let (subj, sn, i) = parse_np(&w).unwrap();
        let verb = w[i];
        assert!(grammar::VERBS.iter().any(|v| v.0 == verb), "{s}");
        let (obj, on, j) = parse_np(&w[i + 1..]).unwrap();
        let place = w[i + 1 + j..].join(" ");
        facts.push((subj, sn, verb, obj, on, place));
    }
    let q: Vec<&str> = question.trim_end_matches('?').split(' ').collect();
    let third = |base: &str| {
        grammar::VERBS
            .iter()
            .find(|v| v.1 == base)
            .map(|v| v.0)
            .unwrap()
    };
    let hits: Vec<String> = match q.as_slice() {
        ["what", "does", "the", n, base] => facts
            .iter()
            .filter(|f| f.1 == *n && f.2 == third(base))
            .map(|f| f.3.clone())
            .collect(),
        ["which", "animal", verb, "the", n] => facts
            .iter()
            .filter(|f| f.4 == *n && f.2 == *verb)
            .map(|f| f.0.clone())
            .collect(),
        ["where", "does", "the", n, base, "the", m] => facts
            .iter()
            .filter(|f| f.1 == *n && f.4 == *m && f.2 == third(base) && !f.5.is_empty())
            .map(|f| f.5.clone())
            .collect(),
        other => panic!("unknown question {other:?}"),
    };
    assert_eq!(hits.len(), 1, "{q:?}");
    hits[0].clone()
}

fn check_arithmetic(q: &str) -> i64 {
    let w = words(q);
    let mut people: Vec<i64> = Vec::new();
    for i in 1..w.len() {
        let Ok(x) = w[i].parse::<i64>() else { continue };
        assert!((0..=9).contains(&x), "{q}");
        match w[i - 1] {
            "has" => people.push(x),
            v if arithmetic::GAINS.contains(&v) => people[0] += x,
            v if arithmetic::LOSSES.contains(&v) || v == "gives" => people[0] -= x,
            v => panic!("{q}: a number after {v:?}"),
        }
    }
    let r = if q.contains("together") {
        people.iter().sum()
    } else if q.contains("how many more") {
        people[0] - people[1]
    } else {
        people[0]
    };
    assert!((0..=20).contains(&r), "{q}");
    r
}

fn check_program(q: &str) -> i64 {
    let mut env: HashMap<&str, i64> = HashMap::new();
    let lines: Vec<&str> = q.lines().collect();
    assert!((3..=5).contains(&lines.len()), "{q}");
    for line in lines {
        if let Some(v) = line
            .strip_prefix("print(")
            .and_then(|s| s.strip_suffix(')'))
        {
            return env[v];
        }
        let (lhs, rhs) = line.split_once(" = ").unwrap();
        let value = |t: &str| t.parse::<i64>().unwrap_or_else(|_| env[t]);
        if lhs.contains(',') {
            let new: Vec<i64> = rhs.split(", ").map(value).collect();
            for (name, v) in lhs.split(", ").zip(new) {
                assert!(env.contains_key(name), "{q}");
                env.insert(name, v);
            }
        } else {
            let t: Vec<&str> = rhs.split(' ').collect();
            let mut acc = value(t[0]);
            for pair in t[1..].chunks(2) {
                match pair[0] {
                    "+" => acc += value(pair[1]),
                    "-" => acc -= value(pair[1]),
                    op => panic!("{q}: operator {op}"),
                }
            }
            assert!((0..=20).contains(&acc), "{q}");
            env.insert(lhs, acc);
        }
    }
    panic!("{q}: no print")
}

fn check_intent(q: &str, a: &str) {
    let v: serde_json::Value = serde_json::from_str(a).unwrap();
    // Key order and separators: the answer is its own spaced re-serialization (keys come
    // back sorted, and the fixed order is the sorted order).
    assert_eq!(to_line(&v).unwrap(), a);
    assert!(a.starts_with("{\"intent\": \""), "{a}");
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 2, "{a}");
    let intent = obj["intent"].as_str().unwrap();
    assert!(intent::INTENT_NAMES.contains(&intent), "{a}");
    let w = words(q);
    let has = |x: &str| w.contains(&x);
    let want = if has("degrees") || has("temperature") {
        "set_temperature"
    } else if has("percent") || has("brightness") {
        "set_brightness"
    } else if has("mode") {
        "set_mode"
    } else if has("minutes") || has("minute") {
        "set_timer"
    } else if has("am") || has("pm") {
        "schedule_on"
    } else if has("is") || has("check") {
        "check_status"
    } else if has("off") || has("down") {
        "turn_off"
    } else {
        "turn_on"
    };
    assert_eq!(intent, want, "{q}");
    let slots = obj["slots"].as_object().unwrap();
    let device = slots["device"].as_str().unwrap();
    assert!(
        intent::DEVICES
            .iter()
            .any(|(s, c)| *c == device && q.contains(s)),
        "{q} -> {a}"
    );
    for (k, val) in slots {
        let val = val.as_str().unwrap();
        match k.as_str() {
            "device" => {}
            "room" => assert!(
                intent::ROOMS
                    .iter()
                    .any(|(s, c)| *c == val && q.contains(s)),
                "{q} -> {a}"
            ),
            "value" | "time" => {
                assert!(format!(" {q} ").contains(&format!(" {val} ")), "{q} -> {a}")
            }
            other => panic!("unknown slot {other}"),
        }
    }
    assert_eq!(slots.contains_key("time"), want == "schedule_on", "{a}");
    let valued = ["set_temperature", "set_brightness", "set_mode", "set_timer"];
    assert_eq!(slots.contains_key("value"), valued.contains(&want), "{a}");
}

fn check_translation(q: &str, a: &str) {
    use translation::*;
    let mut lexicon: HashSet<String> = [OBJECT, PAST, AND].iter().map(|s| s.to_string()).collect();
    for (_, _, stem) in PEOPLE.iter().chain(THINGS) {
        lexicon.insert(stem.to_string());
        lexicon.insert(format!("{stem}{PLURAL}"));
    }
    lexicon.extend(ADJS.iter().map(|a| a.1.to_string()));
    lexicon.extend(VERBS.iter().map(|v| v.3.to_string()));
    for w in a.split(' ') {
        assert!(lexicon.contains(w), "{a}: {w} is not velan");
    }
    let en = q.strip_prefix("translate into velan: ").unwrap();
    let en_clauses: Vec<&str> = en.split(" and ").collect();
    let ve_clauses: Vec<&str> = a.split(&format!(" {AND} ")).collect();
    assert_eq!(en_clauses.len(), ve_clauses.len(), "{q} -> {a}");
    for (e, v) in en_clauses.iter().zip(&ve_clauses) {
        let e: Vec<&str> = e.split(' ').collect();
        let v: Vec<&str> = v.split(' ').collect();
        let past = e.iter().any(|w| VERBS.iter().any(|x| x.2 == *w));
        let lo = v.iter().position(|w| *w == OBJECT).unwrap();
        // SOV: the verb right after the object marker, then only the past particle.
        assert!(VERBS.iter().any(|x| x.3 == v[lo + 1]), "{a}");
        assert_eq!(
            &v[lo + 2..],
            if past { &[PAST][..] } else { &[][..] },
            "{a}"
        );
        // The english verb is the one translated, in the right form.
        let verb = VERBS.iter().find(|x| x.3 == v[lo + 1]).unwrap();
        assert!(e.contains(&verb.1) || e.contains(&verb.0) || e.contains(&verb.2));
        // Articles dropped, word count: english minus the two `the` = velan minus lo/ka.
        assert_eq!(e.len() - 2, v.len() - 1 - usize::from(past), "{q} -> {a}");
        // The subject's number: plural stem iff plural english subject.
        let plural_subj = PEOPLE.iter().any(|p| e[1..3].contains(&p.1));
        assert_eq!(v[0].ends_with(PLURAL), plural_subj, "{q} -> {a}");
    }
}

fn check_law(q: &str, a: &str) {
    let category = [
        (
            0,
            &["without paying", "stole", "without permission", "pocketed"][..],
        ),
        (
            1,
            &["counterfeit", "forged", "never delivered", "false identity"][..],
        ),
        (2, &["struck", "kicked", "pushed", "punched"][..]),
        (3, &["smashed", "set fire", "spray painted", "wrecked"][..]),
    ];
    let hits: Vec<usize> = category
        .iter()
        .filter(|(_, keys)| keys.iter().any(|k| q.contains(k)))
        .map(|(c, _)| *c)
        .collect();
    assert_eq!(hits.len(), 1, "{q}");
    let armed = ["knife", "armed", "pistol", "blade"]
        .iter()
        .any(|k| q.contains(k));
    let group = ["accomplices", "gang", "associates", "crew"]
        .iter()
        .any(|k| q.contains(k));
    assert!(!(armed && group), "{q}");
    let table = [[12, 13, 14], [21, 22, 23], [31, 32, 33], [41, 42, 43]];
    let want = table[hits[0]][usize::from(armed) + 2 * usize::from(group)];
    assert_eq!(a, format!("article {want}"), "{q}");
    let n: u32 = a.strip_prefix("article ").unwrap().parse().unwrap();
    assert!(law::ARTICLES.iter().flatten().any(|x| *x == n));
    assert!(q.ends_with("which article applies?"));
}

#[test]
fn every_answer_checks_out() {
    for seed in [0, 1] {
        for it in draws("grammar", 2000, seed) {
            assert_eq!(check_grammar(&it.question), it.answer);
        }
        for it in draws("arithmetic", 2000, seed) {
            assert_eq!(check_arithmetic(&it.question).to_string(), it.answer);
        }
        for it in draws("programs", 2000, seed) {
            assert_eq!(check_program(&it.question).to_string(), it.answer);
        }
        for it in draws("intent", 2000, seed) {
            check_intent(&it.question, &it.answer);
        }
        for it in draws("translation", 2000, seed) {
            check_translation(&it.question, &it.answer);
        }
        for it in draws("law", 2000, seed) {
            check_law(&it.question, &it.answer);
        }
    }
}

#[test]
fn samples_are_short_and_varied() {
    for d in DOMAINS {
        let items = draws(d.name, 1000, 3);
        let distinct: HashSet<&str> = items.iter().map(|i| i.question.as_str()).collect();
        // Far more distinct questions than the default eval size.
        assert!(distinct.len() > 600, "{}: {}", d.name, distinct.len());
        for it in &items {
            let q = words(&it.question).len();
            let a = words(&it.answer).len();
            // `repeat: 7` copies one word (or one symbol).
            let shortest = if d.kind == Kind::Auxiliary { 0 } else { 3 };
            assert!((shortest..=60).contains(&q), "{}: {}", d.name, it.question);
            assert!(
                (shortest.min(1)..=25).contains(&a),
                "{}: {}",
                d.name,
                it.answer
            );
            assert!(it.question.is_ascii() && it.answer.is_ascii());
        }
        // Every kind of answer occurs: no domain collapses to one answer.
        let answers: HashSet<&str> = items.iter().map(|i| i.answer.as_str()).collect();
        assert!(answers.len() >= 10, "{}: {answers:?}", d.name);
    }
}

fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn eval_is_held_out_and_counts_match_the_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let m = generate(tmp.path(), 11, SMALL).unwrap();
    let on_disk: Manifest =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(on_disk, m);
    assert_eq!(m.seed, 11);
    assert_eq!(m.domains.len(), DOMAINS.len());
    assert!(m.domains.len() >= 6);
    let mut train_q = HashSet::new();
    let mut eval_q = Vec::new();
    let mut pretrained = 0;
    let mut train_texts = HashSet::new();
    for e in &m.domains {
        let train = read_jsonl(&tmp.path().join(&e.name).join("train.jsonl"));
        let eval = read_jsonl(&tmp.path().join(&e.name).join("eval.jsonl"));
        assert_eq!(train.len(), e.train, "{}", e.name);
        assert_eq!(eval.len(), e.eval, "{}", e.name);
        let want = match e.kind {
            Kind::General | Kind::Auxiliary => SMALL.general_train,
            Kind::Downstream => SMALL.task_train,
        };
        assert_eq!(e.train, want);
        assert_eq!(e.eval, SMALL.eval);
        if e.kind != Kind::Downstream {
            pretrained += e.train;
        }
        for (i, t) in train.iter().enumerate() {
            assert_eq!(t["id"], i);
            assert_eq!(t["dataset"], e.name.as_str());
            assert_eq!(t["messages"][0]["role"], "user");
            assert_eq!(t["messages"][1]["role"], "assistant");
            let (q, a) = (
                t["messages"][0]["content"].as_str().unwrap(),
                t["messages"][1]["content"].as_str().unwrap(),
            );
            train_q.insert(q.to_string());
            if e.kind != Kind::Downstream {
                train_texts.insert(data::user_turn(q) + &data::assistant_turn(a));
            }
        }
        for (i, x) in eval.iter().enumerate() {
            assert_eq!(x["idx"], i);
            let p = x["prompt"].as_str().unwrap();
            let q = p
                .strip_prefix("User: ")
                .and_then(|p| p.strip_suffix("\n\nAssistant:"))
                .unwrap();
            assert_eq!(q, q.trim());
            assert_eq!(x["answers"].as_array().unwrap().len(), 1);
            eval_q.push(q.to_string());
        }
    }
    let distinct: HashSet<&String> = eval_q.iter().collect();
    assert_eq!(distinct.len(), eval_q.len(), "eval questions repeat");
    for q in &eval_q {
        assert!(!train_q.contains(q), "eval question in train: {q}");
    }
    let pretrain = read_jsonl(&tmp.path().join("pretrain.jsonl"));
    assert_eq!(pretrain.len(), pretrained);
    let mut per: HashMap<String, usize> = HashMap::new();
    for (i, t) in pretrain.iter().enumerate() {
        assert_eq!(t["id"], i);
        // The whole exchange of a general or auxiliary train item, as text.
        assert!(train_texts.contains(t["text"].as_str().unwrap()), "{t}");
        *per.entry(t["dataset"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(per.len(), 4, "{per:?}");
    assert!(per.contains_key("repeat"));
    assert!(per.values().all(|n| *n == SMALL.general_train));
    // Shuffled: not the general train files one after another.
    let first: Vec<&str> = pretrain[..SMALL.general_train]
        .iter()
        .map(|t| t["dataset"].as_str().unwrap())
        .collect();
    assert!(first.iter().any(|d| *d != first[0]));
}

#[test]
fn files_load_with_the_trainer_readers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/lite");
    let tok = TextTokenizer::from_dir(&dir, &[1]).unwrap();
    let ids = SpecialIds {
        bos: Some(0),
        eos: 1,
    };
    let limits = Limits {
        max_tokens: Some(512),
        need_targets: true,
    };
    let tmp = tempfile::tempdir().unwrap();
    let m = generate(tmp.path(), 3, SMALL).unwrap();
    for e in &m.domains {
        let train = data::load_train(
            &tmp.path().join(&e.name).join("train.jsonl"),
            &tok,
            ids,
            limits,
        )
        .unwrap();
        assert_eq!(train.len(), e.train);
        let eval = data::load_eval(&tmp.path().join(&e.name).join("eval.jsonl")).unwrap();
        assert_eq!(eval.len(), e.eval);
        // An eval item with its answer is token for token the training sample of the
        // same question: the prompt is the training template.
        let f = tmp.path().join("one.jsonl");
        for item in &eval {
            let q = item
                .prompt
                .strip_prefix("User: ")
                .and_then(|p| p.strip_suffix("\n\nAssistant:"))
                .unwrap();
            let it = Item {
                question: q.to_string(),
                answer: item.answers[0].clone(),
            };
            std::fs::write(&f, train_line(0, &e.name, &it).unwrap()).unwrap();
            let as_train = data::load_train(&f, &tok, ids, limits).unwrap();
            let as_eval = data::eval_as_sample(item, &tok, ids).unwrap();
            assert_eq!(as_train[0].tokens, as_eval.tokens);
            assert_eq!(as_train[0].trained, as_eval.trained);
        }
    }
    let pretrain = data::load_train(&tmp.path().join("pretrain.jsonl"), &tok, ids, limits).unwrap();
    assert_eq!(pretrain.len(), 4 * SMALL.general_train);
    assert!(pretrain.iter().all(|s| s.target_count() == s.len() - 1));
}

#[test]
fn vocabularies_are_distinct() {
    let sets: Vec<(&str, Kind, HashSet<String>)> = DOMAINS
        .iter()
        .map(|d| {
            let mut set = HashSet::new();
            for it in draws(d.name, 3000, 0) {
                for w in words(&it.question).into_iter().chain(words(&it.answer)) {
                    set.insert(w.to_string());
                }
            }
            (d.name, d.kind, set)
        })
        .collect();
    for (a, kind, wa) in &sets {
        // Bounded vocabularies (`repeat` holds them all).
        assert!(
            *kind == Kind::Auxiliary || wa.len() <= 200,
            "{a}: {} words",
            wa.len()
        );
        for (b, kind_b, wb) in &sets {
            // `repeat` copies every other domain's words by design.
            if a == b || *kind_b == Kind::Auxiliary {
                continue;
            }
            let shared = wa.intersection(wb).count() as f64 / wa.len() as f64;
            eprintln!(
                "{a} shares {:.0}% of its {} words with {b}",
                100.0 * shared,
                wa.len()
            );
            // The general domains share numbers (arithmetic, programs), by design; the
            // downstream ones and grammar must stand apart from everything.
            if *kind == Kind::Downstream || *a == "grammar" {
                assert!(shared < 0.3, "{a} shares {:.0}% with {b}", 100.0 * shared);
            }
        }
    }
}

/// A domain with three questions, to exhaust.
fn tiny(rng: &mut ChaCha8Rng) -> (String, String) {
    let i = rng.random_range(0..3);
    (format!("question {i}"), format!("answer {i}"))
}

#[test]
fn impossible_counts_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let domains = [Domain {
        name: "tiny",
        kind: Kind::General,
        description: "three questions",
        sample: tiny,
    }];
    let sizes = |eval| Sizes {
        general_train: 5,
        task_train: 5,
        eval,
    };
    let err = format!(
        "{:#}",
        generate_with(&domains, tmp.path(), 0, sizes(4)).unwrap_err()
    );
    assert!(err.contains("tiny") && err.contains("--eval"), "{err}");
    // All three held out: nothing is left to train on.
    let err = format!(
        "{:#}",
        generate_with(&domains, tmp.path(), 0, sizes(3)).unwrap_err()
    );
    assert!(err.contains("tiny") && err.contains("--eval"), "{err}");
    let ok = generate_with(&domains, tmp.path(), 0, sizes(2)).unwrap();
    assert_eq!(ok.domains[0].train, 5);
    for zero in [
        Sizes {
            general_train: 0,
            ..sizes(1)
        },
        Sizes {
            task_train: 0,
            ..sizes(1)
        },
        sizes(0),
    ] {
        let err = format!("{:#}", generate(tmp.path(), 0, zero).unwrap_err());
        assert!(err.contains("at least 1"), "{err}");
    }
}
