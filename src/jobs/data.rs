//! Task-data lines: the JSONL formats fine-tuning reads, parsed and checked line by line.
//!
//! Owns the bounded line reader, a training line's types and the structural check of
//! each one (read straight from the line's text, storing only what the format uses), so that
//! the server (refusing a bad upload to `/v1/files`) and `esft-train` (before any work
//! starts) accept and refuse exactly the same files. A training line is one of
//!
//! - the reference chat format
//!   `{"messages": [{"role": "user"|"assistant", "content": ..., "mask"?: 0|1}, ...]}`,
//! - `{"prompt": ..., "completion": ...}` (only the completion is learned),
//! - `{"text": ...}` (pretraining text: every token is learned);
//!
//! other top-level fields (`id`, `dataset`, ...) are allowed. Tokenization, the prompt
//! template and the loss mask are the trainer's (`trainer/src/data.rs`); nothing here reads
//! a model or touches the filesystem beyond the reader it is handed.

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use std::io::BufRead;

/// One message of a chat line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `user` or `assistant` (checked by [`parse_train_line`]).
    pub role: String,
    pub content: String,
    /// 1: an assistant turn that is not learned.
    pub mask: u8,
}

/// One training line, in one of the three formats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrainLine {
    Chat { messages: Vec<Message> },
    Plain { prompt: String, completion: String },
    Text { text: String },
}

impl TrainLine {
    /// Whether the line has anything to learn: an unmasked assistant turn (chat), or any
    /// completion or text.
    pub fn has_targets(&self) -> bool {
        match self {
            TrainLine::Chat { messages } => messages
                .iter()
                .any(|m| m.role == "assistant" && m.mask == 0),
            TrainLine::Plain { .. } | TrainLine::Text { .. } => true,
        }
    }
}

/// A problem with a file: the 1-based line it is on (none for the file as a whole) and
/// what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub line: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(n) => write!(f, "line {n}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for LineError {}

/// The message for a file with no line of data.
pub const NO_SAMPLES: &str = "the file holds no samples";

/// The longest line the server's readers take unless configured otherwise (4 MiB).
pub const DEFAULT_MAX_LINE_BYTES: usize = 4 << 20;

/// Reads the next line of `reader` into `buf` (cleared first, without its `\n`; a `\r`
/// before it is kept and counted), taking at most `max` bytes of it: `Ok(false)` at the end of the input, an error (`TooLong`) as
/// soon as the line is longer, so no more than `max` bytes of one line are ever held.
fn read_bounded_line<R: BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<bool, LineRead> {
    buf.clear();
    let mut any = false;
    loop {
        let chunk = reader.fill_buf().map_err(LineRead::Io)?;
        if chunk.is_empty() {
            return Ok(any);
        }
        any = true;
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (chunk.len(), false),
        };
        if buf.len() + take > max {
            return Err(LineRead::TooLong);
        }
        buf.extend_from_slice(&chunk[..take]);
        reader.consume(if done { take + 1 } else { take });
        if done {
            return Ok(true);
        }
    }
}

enum LineRead {
    Io(std::io::Error),
    TooLong,
}

/// Calls `each` with every non-blank line of `reader` (without its line ending) and its
/// 1-based number; returns how many there were. Refuses a line longer than
/// `max_line_bytes` (without reading the rest of it), a line that is not UTF-8, the first
/// error of `each`, and a file without any line (an error with no line number). Holds one
/// line at a time.
pub fn for_each_line<R: BufRead>(
    mut reader: R,
    max_line_bytes: usize,
    mut each: impl FnMut(usize, &str) -> Result<(), String>,
) -> Result<usize, LineError> {
    let at = |line: usize, message: String| LineError {
        line: Some(line),
        message,
    };
    let mut buf = Vec::new();
    let mut number = 0usize;
    let mut count = 0usize;
    loop {
        number += 1;
        match read_bounded_line(&mut reader, &mut buf, max_line_bytes) {
            Ok(true) => {}
            Ok(false) => break,
            Err(LineRead::TooLong) => {
                return Err(at(
                    number,
                    format!("the line is longer than the limit of {max_line_bytes} bytes"),
                ))
            }
            Err(LineRead::Io(e)) => {
                return Err(LineError {
                    line: None,
                    message: format!("could not read the file: {e}"),
                })
            }
        }
        let text = std::str::from_utf8(&buf)
            .map_err(|_| at(number, "not UTF-8 text".into()))?
            .trim_end_matches('\r');
        if text.trim().is_empty() {
            continue;
        }
        each(number, text).map_err(|m| at(number, m))?;
        count += 1;
    }
    if count == 0 {
        return Err(LineError {
            line: None,
            message: NO_SAMPLES.into(),
        });
    }
    Ok(count)
}

/// [`for_each_line`] with each line parsed as JSON (for formats other than training lines,
/// which [`parse_train_line`] reads without building a JSON tree).
pub fn for_each_json_line<R: BufRead>(
    reader: R,
    max_line_bytes: usize,
    mut each: impl FnMut(usize, Value) -> Result<(), String>,
) -> Result<usize, LineError> {
    for_each_line(reader, max_line_bytes, |number, text| {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        each(number, v)
    })
}

/// A field of a training line as far as the checks need it: a string or a whole number
/// is kept; any other value is only named by its kind, and skipped without being stored
/// (so a line of a million numbers costs no memory beyond its text).
#[derive(Debug)]
enum Field {
    Str(String),
    Int(u64),
    Other,
}

impl Field {
    fn into_string(self) -> Option<String> {
        match self {
            Field::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Skips the rest of a list without storing it.
fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

/// Skips the rest of an object without storing it.
fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

/// Implements the scalar `visit_*` methods of a visitor that maps every non-string,
/// non-collection JSON value to `$other`.
macro_rules! visit_scalars_as {
    ($other:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($other)
        }
    };
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Field;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Field, E> {
                Ok(Field::Str(s.to_string()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Field, E> {
                Ok(Field::Str(s))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Field, E> {
                Ok(Field::Int(n))
            }
            visit_scalars_as!(Field::Other);
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Field, A::Error> {
                skip_seq(seq).map(|_| Field::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Field, A::Error> {
                skip_map(map).map(|_| Field::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// Sets `slot` to the next value of `map`, refusing a key seen before.
fn once<'de, A: MapAccess<'de>, T: Deserialize<'de>>(
    map: &mut A,
    slot: &mut Option<T>,
    key: &str,
) -> Result<(), A::Error> {
    if slot.is_some() {
        return Err(de::Error::custom(format_args!(
            "the field `{key}` appears twice"
        )));
    }
    *slot = Some(map.next_value()?);
    Ok(())
}

/// A field name, shortened for an error message.
fn short_name(key: &str) -> String {
    const MAX: usize = 64;
    match key.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &key[..i]),
        None => key.to_string(),
    }
}

/// `messages` as read: the well-formed messages, or the first problem with the list
/// (after which the rest of it is skipped, not stored).
enum Messages {
    Good(Vec<Message>),
    Bad(String),
}

impl<'de> Deserialize<'de> for Messages {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        fn not_list() -> Messages {
            Messages::Bad("`messages` is not a list".into())
        }
        impl<'de> Visitor<'de> for V {
            type Value = Messages;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of messages")
            }
            visit_scalars_as!(not_list());
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Messages, E> {
                Ok(not_list())
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Messages, E> {
                Ok(not_list())
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Messages, A::Error> {
                skip_map(map).map(|_| not_list())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Messages, A::Error> {
                let mut good = Vec::new();
                while let Some(m) = seq.next_element::<RawMessage>()? {
                    match m.check(good.len()) {
                        Ok(m) => good.push(m),
                        Err(e) => {
                            skip_seq(seq)?;
                            return Ok(Messages::Bad(e));
                        }
                    }
                }
                Ok(Messages::Good(good))
            }
        }
        d.deserialize_any(V)
    }
}

/// One element of `messages` as read.
enum RawMessage {
    NotObject,
    Object {
        role: Option<Field>,
        content: Option<Field>,
        mask: Option<Field>,
        /// The first field that is none of the three.
        unknown: Option<String>,
    },
}

impl RawMessage {
    /// The message `i`, or what is wrong with its shape.
    fn check(self, i: usize) -> Result<Message, String> {
        let RawMessage::Object {
            role,
            content,
            mask,
            unknown,
        } = self
        else {
            return Err(format!("message {i} is not an object"));
        };
        let text = |f: Option<Field>, name: &str| match f {
            None => Err(format!("message {i} has no `{name}`")),
            Some(f) => f
                .into_string()
                .ok_or_else(|| format!("message {i} `{name}` is not a string")),
        };
        let role = text(role, "role")?;
        let content = text(content, "content")?;
        if let Some(k) = unknown {
            return Err(format!("message {i} has an unknown field `{k}`"));
        }
        let mask = match mask {
            None => 0,
            Some(Field::Int(m @ (0 | 1))) => m as u8,
            Some(_) => return Err(format!("message {i} `mask` must be 0 or 1")),
        };
        Ok(Message {
            role,
            content,
            mask,
        })
    }
}

impl<'de> Deserialize<'de> for RawMessage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawMessage;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a message")
            }
            visit_scalars_as!(RawMessage::NotObject);
            fn visit_str<E: de::Error>(self, _: &str) -> Result<RawMessage, E> {
                Ok(RawMessage::NotObject)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<RawMessage, E> {
                Ok(RawMessage::NotObject)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<RawMessage, A::Error> {
                skip_seq(seq).map(|_| RawMessage::NotObject)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawMessage, A::Error> {
                let (mut role, mut content, mut mask, mut unknown) = (None, None, None, None);
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match key.as_ref() {
                        "role" => once(&mut map, &mut role, "role")?,
                        "content" => once(&mut map, &mut content, "content")?,
                        "mask" => once(&mut map, &mut mask, "mask")?,
                        other => {
                            unknown.get_or_insert_with(|| short_name(other));
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(RawMessage::Object {
                    role,
                    content,
                    mask,
                    unknown,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// A training line as read: the fields the three formats use (others are skipped), or
/// not an object at all.
enum RawLine {
    NotObject,
    Object {
        messages: Option<Messages>,
        prompt: Option<Field>,
        completion: Option<Field>,
        text: Option<Field>,
    },
}

impl<'de> Deserialize<'de> for RawLine {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawLine;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            visit_scalars_as!(RawLine::NotObject);
            fn visit_str<E: de::Error>(self, _: &str) -> Result<RawLine, E> {
                Ok(RawLine::NotObject)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<RawLine, E> {
                Ok(RawLine::NotObject)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<RawLine, A::Error> {
                skip_seq(seq).map(|_| RawLine::NotObject)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawLine, A::Error> {
                let (mut messages, mut prompt, mut completion, mut text) = (None, None, None, None);
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match key.as_ref() {
                        "messages" => once(&mut map, &mut messages, "messages")?,
                        "prompt" => once(&mut map, &mut prompt, "prompt")?,
                        "completion" => once(&mut map, &mut completion, "completion")?,
                        "text" => once(&mut map, &mut text, "text")?,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(RawLine::Object {
                    messages,
                    prompt,
                    completion,
                    text,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// The structural check of one training line (its text, without the line ending): its
/// format, the roles and masks of its messages, and that it is not empty. The error says
/// what is wrong (no line number). Reads the text once, keeping only the strings the
/// format uses: fields of other names, and values of the wrong type, are skipped unstored.
pub fn parse_train_line(text: &str) -> Result<TrainLine, String> {
    let raw: RawLine = serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => e.to_string(),
        _ => format!("not JSON: {e}"),
    })?;
    let RawLine::Object {
        messages,
        prompt,
        completion,
        text,
    } = raw
    else {
        return Err("expected a JSON object".into());
    };
    let parsed = match (messages, prompt, completion, text) {
        (Some(Messages::Good(messages)), ..) => TrainLine::Chat { messages },
        (_, Some(Field::Str(prompt)), Some(Field::Str(completion)), _) => {
            TrainLine::Plain { prompt, completion }
        }
        (_, _, _, Some(Field::Str(text))) => TrainLine::Text { text },
        (messages, prompt, completion, text) => {
            let hint = match (messages, text) {
                (Some(Messages::Bad(why)), _) => format!(": {why}"),
                (None, Some(_)) => ": `text` is not a string".into(),
                _ => match (prompt, completion) {
                    (None, _) => ": missing field `prompt`".into(),
                    (Some(Field::Str(_)), None) => ": missing field `completion`".into(),
                    (Some(Field::Str(_)), Some(_)) => ": `completion` is not a string".into(),
                    (Some(_), _) => ": `prompt` is not a string".into(),
                },
            };
            return Err(format!(
                "expected {{\"messages\": [{{\"role\", \"content\"}}, ...]}}, \
                 {{\"prompt\": string, \"completion\": string}} or {{\"text\": string}}{hint}"
            ));
        }
    };
    match &parsed {
        TrainLine::Chat { messages } => {
            if messages.is_empty() {
                return Err("`messages` is empty".into());
            }
            if let Some((i, m)) = messages
                .iter()
                .enumerate()
                .find(|(_, m)| m.role != "user" && m.role != "assistant")
            {
                return Err(format!(
                    "message {i} has role {:?}; the reference format knows \"user\" and \
                     \"assistant\"",
                    short_name(&m.role)
                ));
            }
        }
        TrainLine::Text { text } if text.trim().is_empty() => {
            return Err("`text` is empty".into());
        }
        _ => {}
    }
    Ok(parsed)
}

/// Checks a whole training file as fine-tuning will read it: every line (at most
/// `max_line_bytes` long) is a training line with something to learn. Returns the number
/// of samples.
pub fn check_train_file<R: BufRead>(reader: R, max_line_bytes: usize) -> Result<usize, LineError> {
    for_each_line(reader, max_line_bytes, |_, text| {
        let line = parse_train_line(text)?;
        if !line.has_targets() {
            return Err("the sample has no unmasked assistant turn to learn from".into());
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &[u8]) -> Result<usize, LineError> {
        check_train_file(text, DEFAULT_MAX_LINE_BYTES)
    }

    #[test]
    fn good_files_in_every_format_are_counted() {
        let text = concat!(
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "mask": 0}], "id": 1}"#,
            "\n\n",
            r#"{"prompt": "p", "completion": "c"}"#,
            "\r\n",
            r#"{"text": "hello"}"#,
        );
        assert_eq!(check(text.as_bytes()), Ok(3));
        assert_eq!(
            parse_train_line(r#"{"prompt": "p", "completion": "c"}"#),
            Ok(TrainLine::Plain {
                prompt: "p".into(),
                completion: "c".into()
            })
        );
    }

    #[test]
    fn each_kind_of_bad_line_is_named_with_its_number() {
        let ok = r#"{"prompt": "a", "completion": "b"}"#;
        let cases: Vec<(Vec<u8>, Option<usize>, &str)> = vec![
            (format!("{ok}\nnot json").into(), Some(2), "not JSON"),
            (format!("{ok}\n[1, 2]").into(), Some(2), "expected a JSON object"),
            (format!("{ok}\n{{\"prompt\": \"a\"}}").into(), Some(2), "missing field `completion`"),
            (format!("{ok}\n{{\"prompt\": 1, \"completion\": \"b\"}}").into(), Some(2), "`prompt` is not a string"),
            (
                format!("{ok}\n\n{{\"messages\": [{{\"role\": \"system\", \"content\": \"x\"}}]}}").into(),
                Some(3),
                "message 0 has role \"system\"",
            ),
            (br#"{"messages": [{"role": "user"}]}"#.to_vec(), Some(1), "message 0 has no `content`"),
            (br#"{"messages": "hi"}"#.to_vec(), Some(1), "`messages` is not a list"),
            (br#"{"messages": [3]}"#.to_vec(), Some(1), "message 0 is not an object"),
            (
                br#"{"messages": [{"role": "user", "content": "x", "name": "n"}]}"#.to_vec(),
                Some(1),
                "unknown field `name`",
            ),
            (
                br#"{"messages": [{"role": "assistant", "content": "x", "mask": 2}]}"#.to_vec(),
                Some(1),
                "`mask` must be 0 or 1",
            ),
            (br#"{"messages": []}"#.to_vec(), Some(1), "`messages` is empty"),
            (br#"{"text": 3}"#.to_vec(), Some(1), "`text` is not a string"),
            (br#"{"text": " "}"#.to_vec(), Some(1), "`text` is empty"),
            (
                br#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "mask": 1}]}"#.to_vec(),
                Some(1),
                "no unmasked assistant turn",
            ),
            ([ok.as_bytes(), b"\n{\"text\": \"\xff\xfe\"}\n"].concat(), Some(2), "not UTF-8"),
            (b"\n \n".to_vec(), None, NO_SAMPLES),
            (Vec::new(), None, NO_SAMPLES),
        ];
        for (text, line, want) in cases {
            let e = check(&text).unwrap_err();
            assert_eq!(e.line, line, "{:?}: {e}", String::from_utf8_lossy(&text));
            assert!(
                e.message.contains(want),
                "{:?}: {e}",
                String::from_utf8_lossy(&text)
            );
        }
        let e = check(b"{\"text\": \"a\"}\n{").unwrap_err();
        assert_eq!(e.to_string().split(':').next(), Some("line 2"));
    }

    #[test]
    fn a_line_longer_than_the_limit_is_refused_with_its_number_as_soon_as_it_is_read() {
        let ok = "{\"text\": \"a\"}";
        let long = format!("{{\"text\": \"{}\"}}", "b".repeat(100));
        // Right at the limit (the `\n` not counted, a `\r` before it counted): taken.
        let text = format!("{ok}\n{long}\n");
        assert_eq!(check_train_file(text.as_bytes(), long.len()), Ok(2));
        let crlf = format!("{ok}\r\n{long}\r\n");
        assert_eq!(check_train_file(crlf.as_bytes(), long.len() + 1), Ok(2));
        assert_eq!(
            check_train_file(crlf.as_bytes(), long.len())
                .unwrap_err()
                .line,
            Some(2)
        );
        let e = check_train_file(text.as_bytes(), long.len() - 1).unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("longer than the limit"), "{e}");
        // A reader that never ends is read no further than the limit.
        let endless = std::io::BufReader::with_capacity(16, std::io::repeat(b'x'));
        let e = check_train_file(endless, 1000).unwrap_err();
        assert_eq!(e.line, Some(1));
        // The last line may lack its line ending.
        assert_eq!(
            check_train_file(format!("{ok}\n{ok}").as_bytes(), ok.len()),
            Ok(2)
        );
    }

    #[test]
    fn hostile_lines_are_read_without_storing_what_the_format_does_not_use() {
        let zeros = vec!["0"; 100_000].join(",");
        let cases: Vec<(String, Result<(), &str>)> = vec![
            // Unknown fields of any size and shape are skipped.
            (format!("{{\"text\": \"a\", \"x\": [{zeros}]}}"), Ok(())),
            (format!("{{\"x\": {{\"y\": [{zeros}]}}, \"prompt\": \"p\", \"completion\": \"c\"}}"), Ok(())),
            // Wrong types, even huge ones, are named, not quoted.
            (format!("{{\"text\": [{zeros}]}}"), Err("`text` is not a string")),
            (format!("{{\"messages\": [{zeros}]}}"), Err("message 0 is not an object")),
            (
                format!("{{\"messages\": [{{\"role\": \"user\", \"content\": [{zeros}]}}]}}"),
                Err("message 0 `content` is not a string"),
            ),
            (format!("{{\"prompt\": {{\"a\": [{zeros}]}}, \"completion\": \"c\"}}"), Err("`prompt` is not a string")),
            ("{\"prompt\": \"p\", \"completion\": 3}".to_string(), Err("`completion` is not a string")),
            (format!("[{zeros}]"), Err("expected a JSON object")),
            // A field given twice is refused rather than one of them silently used.
            ("{\"text\": \"a\", \"text\": \"b\"}".into(), Err("the field `text` appears twice")),
            (
                "{\"messages\": [{\"role\": \"user\", \"role\": \"assistant\", \"content\": \"x\"}]}".into(),
                Err("the field `role` appears twice"),
            ),
            // Long names and roles are quoted only in part.
            (
                format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"x\", \"{}\": 1}}]}}", "k".repeat(10_000)),
                Err("unknown field `kkkk"),
            ),
            (
                format!("{{\"messages\": [{{\"role\": \"{}\", \"content\": \"x\"}}]}}", "r".repeat(10_000)),
                Err("has role \"rrrr"),
            ),
            // Deep nesting is skipped without recursion (no stack overflow).
            (format!("{{\"x\": {}{}, \"text\": \"a\"}}", "[".repeat(100_000), "]".repeat(100_000)), Ok(())),
            (format!("{{\"text\": {}{}}}", "[".repeat(100_000), "]".repeat(100_000)), Err("`text` is not a string")),
            // The first bad message ends the check of the list; later ones are not kept.
            (
                format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"x\"}}, 7, {zeros}]}}"),
                Err("message 1 is not an object"),
            ),
        ];
        for (line, want) in cases {
            let got = parse_train_line(&line).map(|_| ());
            match (got, want) {
                (Ok(()), Ok(())) => {}
                (Err(e), Err(w)) => {
                    assert!(e.contains(w), "{:.80}: {e:.300}", line);
                    assert!(
                        e.len() < 400,
                        "{:.80}: the error is {} bytes",
                        line,
                        e.len()
                    );
                }
                (got, want) => panic!("{:.80}: {got:?}, want {want:?}", line),
            }
        }
        // A chat line keeps its messages in order, masks read.
        let line = r#"{"messages": [{"role": "user", "content": "q"}, {"mask": 1, "content": "a", "role": "assistant"}, {"role": "assistant", "content": "b"}], "id": [1, 2]}"#;
        assert_eq!(
            parse_train_line(line),
            Ok(TrainLine::Chat {
                messages: vec![
                    Message {
                        role: "user".into(),
                        content: "q".into(),
                        mask: 0
                    },
                    Message {
                        role: "assistant".into(),
                        content: "a".into(),
                        mask: 1
                    },
                    Message {
                        role: "assistant".into(),
                        content: "b".into(),
                        mask: 0
                    },
                ]
            })
        );
        // Chat wins over the other formats, then prompt/completion, then text, as the
        // formats are listed.
        let both = r#"{"text": "t", "prompt": "p", "completion": "c"}"#;
        assert!(matches!(
            parse_train_line(both),
            Ok(TrainLine::Plain { .. })
        ));
        let bad_chat = r#"{"messages": 3, "text": "t"}"#;
        assert!(matches!(
            parse_train_line(bad_chat),
            Ok(TrainLine::Text { .. })
        ));
    }
}
