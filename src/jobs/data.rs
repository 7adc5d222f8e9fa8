//! Task-data lines: the JSONL formats fine-tuning reads, parsed and checked line by line.
//!
//! Owns the serde types of a training line and the structural check of each one, so that
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

use serde::Deserialize;
use serde_json::Value;
use std::io::BufRead;

/// One message of a chat line.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// `user` or `assistant` (checked by [`parse_train_line`]).
    pub role: String,
    pub content: String,
    /// 1: an assistant turn that is not learned.
    #[serde(default)]
    pub mask: u8,
}

/// One training line, in one of the three formats.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
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

/// Calls `each` with every non-blank line of `reader` as JSON, with its 1-based number;
/// returns how many there were. Refuses a line that is not UTF-8 or not JSON, the first
/// error of `each`, and a file without any line (an error with no line number).
pub fn for_each_json_line<R: BufRead>(
    mut reader: R,
    mut each: impl FnMut(usize, Value) -> Result<(), String>,
) -> Result<usize, LineError> {
    let at = |line: usize, message: String| LineError {
        line: Some(line),
        message,
    };
    let mut buf = Vec::new();
    let mut number = 0usize;
    let mut count = 0usize;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(|e| LineError {
            line: None,
            message: format!("could not read the file: {e}"),
        })?;
        if n == 0 {
            break;
        }
        number += 1;
        let text = std::str::from_utf8(&buf)
            .map_err(|_| at(number, "not UTF-8 text".into()))?
            .trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(text).map_err(|e| at(number, format!("not JSON: {e}")))?;
        each(number, v).map_err(|m| at(number, m))?;
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

/// The structural check of one training line: its format, the roles and masks of its
/// messages, and that it is not empty. The error says what is wrong (no line number).
pub fn parse_train_line(v: &Value) -> Result<TrainLine, String> {
    if !v.is_object() {
        return Err("expected a JSON object".into());
    }
    let parsed: TrainLine = serde_json::from_value(v.clone()).map_err(|_| {
        format!(
            "expected {{\"messages\": [{{\"role\", \"content\"}}, ...]}}, \
             {{\"prompt\": string, \"completion\": string}} or {{\"text\": string}}{}",
            describe_mismatch(v)
        )
    })?;
    match &parsed {
        TrainLine::Chat { messages } => {
            if messages.is_empty() {
                return Err("`messages` is empty".into());
            }
            for (i, m) in messages.iter().enumerate() {
                if m.role != "user" && m.role != "assistant" {
                    return Err(format!(
                        "message {i} has role {:?}; the reference format knows \"user\" and \
                         \"assistant\"",
                        m.role
                    ));
                }
                if m.mask > 1 {
                    return Err(format!("message {i} `mask` must be 0 or 1"));
                }
            }
        }
        TrainLine::Text { text } if text.trim().is_empty() => {
            return Err("`text` is empty".into());
        }
        _ => {}
    }
    Ok(parsed)
}

/// Checks a whole training file as fine-tuning will read it: every line is a training
/// line with something to learn. Returns the number of samples.
pub fn check_train_file<R: BufRead>(reader: R) -> Result<usize, LineError> {
    for_each_json_line(reader, |_, v| {
        let line = parse_train_line(&v)?;
        if !line.has_targets() {
            return Err("the sample has no unmasked assistant turn to learn from".into());
        }
        Ok(())
    })
}

/// A hint at what is wrong with a line that matches none of the training formats.
fn describe_mismatch(v: &Value) -> String {
    let Some(obj) = v.as_object() else {
        return String::new();
    };
    if let Some(m) = obj.get("messages") {
        let Some(list) = m.as_array() else {
            return ": `messages` is not a list".into();
        };
        for (i, msg) in list.iter().enumerate() {
            let Some(o) = msg.as_object() else {
                return format!(": message {i} is not an object");
            };
            for field in ["role", "content"] {
                match o.get(field) {
                    None => return format!(": message {i} has no `{field}`"),
                    Some(f) if !f.is_string() => {
                        return format!(": message {i} `{field}` is not a string")
                    }
                    _ => {}
                }
            }
            if let Some(k) = o
                .keys()
                .find(|k| !["role", "content", "mask"].contains(&k.as_str()))
            {
                return format!(": message {i} has an unknown field `{k}`");
            }
            if o.get("mask")
                .is_some_and(|m| !matches!(m.as_u64(), Some(0 | 1)))
            {
                return format!(": message {i} `mask` must be 0 or 1");
            }
        }
        return String::new();
    }
    if let Some(t) = obj.get("text") {
        return if t.is_string() {
            String::new()
        } else {
            ": `text` is not a string".into()
        };
    }
    for field in ["prompt", "completion"] {
        match obj.get(field) {
            None => return format!(": missing field `{field}`"),
            Some(f) if !f.is_string() => return format!(": `{field}` is not a string"),
            _ => {}
        }
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &[u8]) -> Result<usize, LineError> {
        check_train_file(text)
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
        let line: Value = serde_json::from_str(r#"{"prompt": "p", "completion": "c"}"#).unwrap();
        assert_eq!(
            parse_train_line(&line),
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
}
