//! Task data: the reference JSONL formats, the reference prompt template and its loss mask.
//!
//! Training lines are the reference chat format
//! `{"messages": [{"role": "user"|"assistant", "content": ..., "mask"?: 0|1}, ...]}`, a
//! plain `{"prompt": ..., "completion": ...}` (only the completion is learned), or
//! pretraining text `{"text": ...}` (every token is learned). Eval lines are the reference eval format
//! `{"prompt": ..., "answers": [...]}`. Every problem is reported with its line number (a
//! [`Failure`]: invalid data, or too little of it), and a whole file is checked before any
//! work starts. Reading the lines and their structural
//! check are shared with the server (`esft::jobs::data`); this module tokenizes.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

use esft::jobs::data::{
    for_each_json_line, for_each_line, parse_train_line, LineError, Message, TrainLine, NO_SAMPLES,
};

use crate::error::{DataProblem, Failure};
use esft::model::tokenizer::TextTokenizer;

/// One tokenized training sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// 1-based line in the source file.
    pub line: usize,
    pub tokens: Vec<u32>,
    /// `trained[i]`: token `i` is a prediction target (counted in the loss).
    pub trained: Vec<bool>,
}

impl Sample {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Positions whose next token is a target, with that token: `(position, target)`.
    pub fn targets(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        (1..self.tokens.len())
            .filter(|&i| self.trained[i])
            .map(|i| (i - 1, self.tokens[i]))
    }

    pub fn target_count(&self) -> usize {
        self.trained.iter().skip(1).filter(|&&t| t).count()
    }
}

/// The special ids the prompt template needs.
#[derive(Debug, Clone, Copy)]
pub struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: u32,
}

impl SpecialIds {
    pub fn of(cfg: &esft::model::Config, tok: &TextTokenizer) -> Result<Self> {
        let eos = cfg
            .eos_token_ids
            .first()
            .or_else(|| tok.eos_ids().first())
            .copied()
            .context("the model defines no EOS token (config.json eos_token_id)")?;
        Ok(Self {
            bos: cfg.bos_token_id,
            eos,
        })
    }
}

/// Raw JSON lines of `path` with their 1-based numbers (blank lines skipped); an empty file
/// is an error. The line reading is the server's too ([`esft::jobs::data`]). A bad line is
/// [`Failure::InvalidData`], a file without lines [`Failure::DataTooSmall`].
pub(crate) fn json_lines(path: &Path) -> Result<Vec<(usize, serde_json::Value)>> {
    let mut out = Vec::new();
    read_lines(path, |reader| {
        for_each_json_line(reader, usize::MAX, |line, v| {
            out.push((line, v));
            Ok(())
        })
    })?;
    Ok(out)
}

/// Runs a line reader of [`esft::jobs::data`] over the file `path`, its errors as
/// [`Failure`]s. Lines have no length limit here: the server checks uploads against its
/// own, and a local file is the operator's.
fn read_lines(
    path: &Path,
    read: impl FnOnce(std::io::BufReader<std::fs::File>) -> Result<usize, LineError>,
) -> Result<usize> {
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    read(std::io::BufReader::new(file)).map_err(|e| -> anyhow::Error {
        let problem = DataProblem::new(path, e.line, e.message.clone());
        match e.line {
            Some(_) => Failure::InvalidData(problem).into(),
            None if e.message == NO_SAMPLES => Failure::DataTooSmall(problem).into(),
            // The file could not be read: not a problem of its content.
            None => anyhow::anyhow!("{problem}"),
        }
    })
}

/// What a training file must satisfy.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// Longest allowed sample in tokens.
    pub max_tokens: Option<usize>,
    /// Refuse samples with nothing to learn (every assistant turn masked).
    pub need_targets: bool,
}

/// Reads and tokenizes a training file in either format.
pub fn load_train(
    path: &Path,
    tok: &TextTokenizer,
    ids: SpecialIds,
    limits: Limits,
) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    read_lines(path, |reader| {
        for_each_line(reader, usize::MAX, |line, text| {
            let sample = match parse_train_line(text)? {
                TrainLine::Chat { messages } => format_chat(&messages, tok, ids, line),
                TrainLine::Plain { prompt, completion } => {
                    format_plain(&prompt, &completion, tok, ids, line)
                }
                TrainLine::Text { text } => format_text(&text, tok, ids, line),
            }
            .map_err(|e| format!("{e:#}"))?;
            if let Some(max) = limits.max_tokens {
                if sample.len() > max {
                    return Err(format!(
                        "the sample has {} tokens, more than --seq-len {max}",
                        sample.len()
                    ));
                }
            }
            if limits.need_targets && sample.target_count() == 0 {
                return Err("the sample has no unmasked assistant turn to learn from".into());
            }
            out.push(sample);
            Ok(())
        })
    })?;
    Ok(out)
}

/// A user turn in the reference template: `User: {content}\n\nAssistant:` (the text after
/// it is the assistant's).
pub fn user_turn(content: &str) -> String {
    format!("User: {}\n\nAssistant:", content.trim())
}

/// An assistant turn in the reference template, after [`user_turn`]: ` {content}` (EOS
/// follows as a token).
pub fn assistant_turn(content: &str) -> String {
    format!(" {}", content.trim())
}

/// The reference template: BOS, then per user turn `User: {content}\n\nAssistant:` (never
/// trained), per assistant turn ` {content}` + EOS (trained unless `"mask": 1`).
fn format_chat(
    messages: &[Message],
    tok: &TextTokenizer,
    ids: SpecialIds,
    line: usize,
) -> Result<Sample> {
    if messages.is_empty() {
        bail!("`messages` is empty");
    }
    let mut s = Sample::begin(line, ids);
    for (i, m) in messages.iter().enumerate() {
        match m.role.as_str() {
            "user" => {
                s.push(&tok.encode(&user_turn(&m.content), false)?, false);
            }
            "assistant" => {
                let mut t = tok.encode(&assistant_turn(&m.content), false)?;
                t.push(ids.eos);
                s.push(&t, m.mask == 0);
            }
            other => bail!(
                "message {i} has role {other:?}; the reference format knows \"user\" and \
                 \"assistant\""
            ),
        }
    }
    Ok(s)
}

/// `{"prompt", "completion"}`: BOS + prompt (never trained) + completion + EOS (trained),
/// the texts used as they are.
fn format_plain(
    prompt: &str,
    completion: &str,
    tok: &TextTokenizer,
    ids: SpecialIds,
    line: usize,
) -> Result<Sample> {
    let mut s = Sample::begin(line, ids);
    s.push(&tok.encode(prompt, false)?, false);
    let mut c = tok.encode(completion, false)?;
    c.push(ids.eos);
    s.push(&c, true);
    Ok(s)
}

/// `{"text"}`: BOS + text + EOS, every token after BOS a target - language-model
/// pretraining, where the whole text is the lesson.
fn format_text(text: &str, tok: &TextTokenizer, ids: SpecialIds, line: usize) -> Result<Sample> {
    // A completion with nothing before it.
    format_plain("", text, tok, ids, line)
}

impl Sample {
    /// An empty sample of `line`: just BOS, if the model has one (never a target).
    fn begin(line: usize, ids: SpecialIds) -> Self {
        let mut s = Sample {
            line,
            tokens: Vec::new(),
            trained: Vec::new(),
        };
        if let Some(bos) = ids.bos {
            s.push(&[bos], false);
        }
        s
    }

    fn push(&mut self, tokens: &[u32], trained: bool) {
        self.tokens.extend_from_slice(tokens);
        self.trained
            .extend(std::iter::repeat_n(trained, tokens.len()));
    }
}

/// Splits items of the given lengths, in order, into consecutive groups whose lengths sum
/// to at most `budget` (an item longer than the budget forms a group of its own).
pub fn token_groups(lens: &[usize], budget: usize) -> Vec<std::ops::Range<usize>> {
    let mut groups = Vec::new();
    let mut start = 0;
    while start < lens.len() {
        let mut end = start;
        let mut tokens = 0;
        while end < lens.len() && (end == start || tokens + lens[end] <= budget) {
            tokens += lens[end];
            end += 1;
        }
        groups.push(start..end);
        start = end;
    }
    groups
}

/// One eval item: a prompt ending where the answer starts, and the accepted answers.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalItem {
    pub line: usize,
    pub prompt: String,
    pub answers: Vec<String>,
}

#[derive(Deserialize)]
struct EvalLine {
    prompt: String,
    answers: Answers,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Answers {
    Many(Vec<String>),
    One(String),
}

/// Reads the reference eval format (`prompt`, `answers`; other fields ignored).
pub fn load_eval(path: &Path) -> Result<Vec<EvalItem>> {
    json_lines(path)?
        .into_iter()
        .map(|(line, v)| {
            let refuse = |message: String| {
                anyhow::Error::from(Failure::InvalidData(DataProblem::new(
                    path,
                    Some(line),
                    message,
                )))
            };
            let e: EvalLine = serde_json::from_value(v).map_err(|e| {
                refuse(format!(
                    "expected {{\"prompt\": string, \"answers\": [string, ...]}} ({e})"
                ))
            })?;
            let answers = match e.answers {
                Answers::Many(a) => a,
                Answers::One(a) => vec![a],
            };
            if answers.is_empty() {
                return Err(refuse("`answers` is empty".into()));
            }
            Ok(EvalItem {
                line,
                prompt: e.prompt,
                answers,
            })
        })
        .collect()
}

/// Tokens of an eval prompt: BOS + the prompt text as given.
pub fn eval_prompt_tokens(
    item: &EvalItem,
    tok: &TextTokenizer,
    ids: SpecialIds,
) -> Result<Vec<u32>> {
    let mut t: Vec<u32> = ids.bos.into_iter().collect();
    t.extend(tok.encode(&item.prompt, false)?);
    Ok(t)
}

/// An eval item as a sample whose first accepted answer (+ EOS) is the target, for loss.
pub fn eval_as_sample(item: &EvalItem, tok: &TextTokenizer, ids: SpecialIds) -> Result<Sample> {
    let mut s = Sample {
        line: item.line,
        tokens: Vec::new(),
        trained: Vec::new(),
    };
    s.push(&eval_prompt_tokens(item, tok, ids)?, false);
    let mut a = tok.encode(&assistant_turn(&item.answers[0]), false)?;
    a.push(ids.eos);
    s.push(&a, true);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tokenizer() -> TextTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/lite");
        TextTokenizer::from_dir(&dir, &[1]).unwrap()
    }

    const IDS: SpecialIds = SpecialIds {
        bos: Some(0),
        eos: 1,
    };

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn load(text: &str, limits: Limits) -> Result<Vec<Sample>> {
        let f = file(text);
        load_train(f.path(), &tokenizer(), IDS, limits)
    }

    #[test]
    fn chat_sample_follows_the_reference_template_and_mask() {
        let tok = tokenizer();
        let line = r#"{"messages": [{"role": "user", "content": " hi there "}, {"role": "assistant", "content": "ok", "mask": 1}, {"role": "user", "content": "again"}, {"role": "assistant", "content": "yes"}], "id": 3}"#;
        // Unknown top-level fields (id, dataset, length) are allowed.
        let s = &load(line, Limits::default()).unwrap()[0];
        let u1 = tok.encode("User: hi there\n\nAssistant:", false).unwrap();
        let a1 = tok.encode(" ok", false).unwrap();
        let u2 = tok.encode("User: again\n\nAssistant:", false).unwrap();
        let a2 = tok.encode(" yes", false).unwrap();
        let mut want = vec![0u32];
        let mut trained = vec![false];
        // (tokens, trained): user turns never, the masked answer not, the last answer yes.
        for (part, t) in [
            (u1, false),
            ([a1, vec![1]].concat(), false),
            (u2, false),
            ([a2.clone(), vec![1]].concat(), true),
        ] {
            trained.extend(std::iter::repeat_n(t, part.len()));
            want.extend(part);
        }
        assert_eq!(s.tokens, want);
        assert_eq!(s.trained, trained);
        assert_eq!(s.target_count(), a2.len() + 1);
        let targets: Vec<(usize, u32)> = s.targets().collect();
        assert_eq!(targets.last(), Some(&(want.len() - 2, 1)));
    }

    #[test]
    fn plain_sample() {
        let tok = tokenizer();
        let s = &load(
            r#"{"prompt": "2+2=", "completion": "4"}"#,
            Limits::default(),
        )
        .unwrap()[0];
        let p = tok.encode("2+2=", false).unwrap();
        let c = tok.encode("4", false).unwrap();
        assert_eq!(s.tokens.len(), 1 + p.len() + c.len() + 1);
        assert_eq!(s.target_count(), c.len() + 1);
    }

    #[test]
    fn text_sample_learns_every_token() {
        let tok = tokenizer();
        let s = &load(
            r#"{"id": 4, "text": "User: a b\n\nAssistant: c"}"#,
            Limits::default(),
        )
        .unwrap()[0];
        let t = tok.encode("User: a b\n\nAssistant: c", false).unwrap();
        assert_eq!(s.tokens, [vec![0], t.clone(), vec![1]].concat());
        assert!(!s.trained[0]);
        assert!(s.trained[1..].iter().all(|&x| x));
        assert_eq!(s.target_count(), t.len() + 1);
        // The first target is the first text token, predicted from BOS.
        assert_eq!(s.targets().next(), Some((0, t[0])));
    }

    #[test]
    fn bad_lines_are_named() {
        let ok = r#"{"prompt": "a", "completion": "b"}"#;
        let cases = [
            (format!("{ok}\nnot json"), "line 2: not JSON"),
            (format!("{ok}\n{{\"prompt\": \"a\"}}"), "line 2: expected"),
            (format!("{ok}\n{{\"prompt\": \"a\"}}"), "missing field `completion`"),
            (
                format!("{ok}\n\n{{\"messages\": [{{\"role\": \"system\", \"content\": \"x\"}}]}}"),
                "line 3: message 0 has role \"system\"",
            ),
            (
                r#"{"messages": [{"role": "user"}]}"#.to_string(),
                "message 0 has no `content`",
            ),
            (r#"{"messages": []}"#.to_string(), "`messages` is empty"),
            (r#"{"text": 3}"#.to_string(), "`text` is not a string"),
            (r#"{"text": " "}"#.to_string(), "`text` is empty"),
            (r#"[1, 2]"#.to_string(), "line 1: expected a JSON object"),
            ("\n \n".to_string(), "holds no samples"),
            (
                r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "mask": 1}]}"#
                    .to_string(),
                "no unmasked assistant turn",
            ),
        ];
        let limits = Limits {
            max_tokens: None,
            need_targets: true,
        };
        for (text, want) in cases {
            let err = format!("{:#}", load(&text, limits).unwrap_err());
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let long = format!(
            "{ok}\n{{\"prompt\": \"{}\", \"completion\": \"b\"}}",
            "word ".repeat(50)
        );
        let err = format!(
            "{:#}",
            load(
                &long,
                Limits {
                    max_tokens: Some(20),
                    need_targets: true
                }
            )
            .unwrap_err()
        );
        assert!(
            err.contains("line 2: the sample has") && err.contains("--seq-len 20"),
            "{err}"
        );
    }

    #[test]
    fn token_groups_fill_the_budget_in_order() {
        assert_eq!(
            token_groups(&[3, 4, 2, 9, 1], 7),
            vec![0..2, 2..3, 3..4, 4..5]
        );
        assert_eq!(token_groups(&[1, 1, 1], 10), vec![0..3]);
        assert!(token_groups(&[], 5).is_empty());
    }

    #[test]
    fn eval_lines() {
        let f = file(
            "{\"idx\": 0, \"prompt\": \"User: q\\n\\nAssistant:\", \"answers\": [\"a\", \"b\"]}\n\
             {\"prompt\": \"p\", \"answers\": \"c\"}\n",
        );
        let items = load_eval(f.path()).unwrap();
        assert_eq!(items[0].answers, vec!["a", "b"]);
        assert_eq!(items[1].answers, vec!["c"]);
        let f = file("{\"prompt\": \"p\"}\n");
        let err = format!("{:#}", load_eval(f.path()).unwrap_err());
        assert!(err.contains("line 1"), "{err}");
    }
}
