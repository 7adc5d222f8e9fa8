//! `tokenizer.json` through the tokenizers crate, and the chat template of
//! `tokenizer_config.json` rendered with minijinja the way transformers renders it
//! (jinja2 with `trim_blocks` and `lstrip_blocks`, Python string methods available).
//! Also the most bytes of text one token can stand for ([`TextTokenizer::max_token_bytes`]),
//! which lets the server refuse a text by its length before tokenizing it.

use serde::{Deserialize, Serialize};
use std::path::Path;

use super::error::{ModelError, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
    eos_ids: Vec<u32>,
    max_token_bytes: Option<usize>,
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads `DIR/tokenizer.json` and, when present, `DIR/tokenizer_config.json`.
    /// `extra_eos` are end-of-sequence ids from the model config.
    pub fn from_dir(dir: &Path, extra_eos: &[u32]) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(ModelError::MissingFile {
                path,
                what: "tokenizer",
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", cfg_path.display())))?,
            Err(_) => serde_json::Value::Null,
        };
        let chat_template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: use the default one.
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        let bos_token = token_text(cfg.get("bos_token")).unwrap_or_default();
        let eos_token = token_text(cfg.get("eos_token")).unwrap_or_default();
        let mut eos_ids: Vec<u32> = extra_eos.to_vec();
        if let Some(id) = inner.token_to_id(&eos_token) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        if let Some(t) = &chat_template {
            // Compile once now so a broken template is reported at load, not per request.
            template_env(t)?;
        }
        let max_token_bytes = serde_json::to_value(&inner)
            .ok()
            .and_then(|v| max_token_bytes(&v));
        Ok(Self {
            inner,
            chat_template,
            bos_token,
            eos_token,
            eos_ids,
            max_token_bytes,
        })
    }

    /// The most bytes of input text one token of this tokenizer can stand for, so that a
    /// text of `n` bytes encodes to at least `n / max_token_bytes` tokens. `None` where the
    /// tokenizer gives no such bound (one token may stand for any amount of text, or text
    /// may vanish): then only tokenizing tells how long a text is.
    pub fn max_token_bytes(&self) -> Option<usize> {
        self.max_token_bytes
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Encodes text; `add_special` applies the tokenizer's post-processor (adds BOS here).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Renders the chat template over `messages`.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            ModelError::ChatTemplate(
                "the model has no chat_template in tokenizer_config.json".into(),
            )
        })?;
        let env = template_env(template)?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| ModelError::ChatTemplate(e.to_string()))
    }

    /// Renders the chat template and tokenizes the result (the template adds BOS itself).
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        self.encode(&self.render_chat(messages, add_generation_prompt)?, false)
    }
}

/// The bound of [`TextTokenizer::max_token_bytes`], read off the tokenizer's serialized
/// form. Every token the model produces is a vocabulary entry or an added token, and stands
/// for the text it spells: for a byte-level BPE (a `ByteLevel` pre-tokenizer or normalizer)
/// each character of a vocabulary string is one byte of input, elsewhere a string's UTF-8
/// length is an upper bound (a `▁` for a space, a `<0x41>` for a byte, a `##` prefix only
/// make it larger). That holds only if the text a model sees is no shorter than the input
/// and no run of input can collapse into one token, so the answer is `None` for:
/// - normalizers that can shrink text (Unicode normalization, lowercasing, stripping, a
///   `Replace` by something shorter or by a regex); only `Prepend`, `ByteLevel` and
///   growing `Replace`s are accepted;
/// - pre-tokenizers that drop characters (`Whitespace`, `WhitespaceSplit`, `Bert`,
///   `CharDelimiterSplit`, a `Removed` split), and any this code does not know;
/// - models that map unknown text of any length to one token or to nothing: `WordPiece`,
///   `WordLevel`, `Unigram` without byte fallback, a BPE whose unknown characters are
///   fused into one `unk` or dropped (an unfused `unk` stands for one character, 4 bytes);
/// - added tokens that swallow the whitespace around them (`lstrip` / `rstrip`);
/// - truncation configured in the tokenizer (a long text would fit by being cut).
fn max_token_bytes(t: &serde_json::Value) -> Option<usize> {
    use serde_json::Value;
    let typ = |v: &Value| v.get("type").and_then(Value::as_str).map(str::to_string);
    let list = |v: &Value, key: &str| -> Vec<Value> {
        v.get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    if !t.get("truncation").is_none_or(Value::is_null) {
        return None;
    }
    let mut byte_level = false;

    fn normalizer_ok(n: &Value, byte_level: &mut bool) -> bool {
        let typ = n.get("type").and_then(Value::as_str).unwrap_or("");
        match typ {
            "Sequence" => n
                .get("normalizers")
                .and_then(Value::as_array)
                .is_some_and(|l| l.iter().all(|x| normalizer_ok(x, byte_level))),
            "Prepend" => true,
            "ByteLevel" => {
                *byte_level = true;
                true
            }
            "Replace" => {
                let pattern = n
                    .get("pattern")
                    .and_then(|p| p.get("String"))
                    .and_then(Value::as_str);
                let content = n.get("content").and_then(Value::as_str);
                matches!((pattern, content), (Some(p), Some(c)) if !p.is_empty() && c.len() >= p.len())
            }
            _ => false,
        }
    }
    fn pre_tokenizer_ok(p: &Value, byte_level: &mut bool) -> bool {
        let typ = p.get("type").and_then(Value::as_str).unwrap_or("");
        let kept = || p.get("behavior").and_then(Value::as_str) != Some("Removed");
        match typ {
            "Sequence" => p
                .get("pretokenizers")
                .and_then(Value::as_array)
                .is_some_and(|l| l.iter().all(|x| pre_tokenizer_ok(x, byte_level))),
            "ByteLevel" => {
                *byte_level = true;
                true
            }
            "Metaspace" | "Digits" | "UnicodeScripts" | "FixedLength" => true,
            "Split" | "Punctuation" => kept(),
            _ => false,
        }
    }
    match t.get("normalizer") {
        None | Some(Value::Null) => {}
        Some(n) if normalizer_ok(n, &mut byte_level) => {}
        Some(_) => return None,
    }
    match t.get("pre_tokenizer") {
        None | Some(Value::Null) => {}
        Some(p) if pre_tokenizer_ok(p, &mut byte_level) => {}
        Some(_) => return None,
    }
    let span = |s: &str| {
        if byte_level {
            s.chars().count()
        } else {
            s.len()
        }
    };

    let model = t.get("model")?;
    let mut longest = 1usize;
    let byte_tokens =
        |has: &dyn Fn(&str) -> bool| (0..=255u8).all(|b| has(&format!("<0x{b:02X}>")));
    match typ(model).as_deref() {
        Some("BPE") => {
            let vocab = model.get("vocab")?.as_object()?;
            for k in vocab.keys() {
                longest = longest.max(span(k));
            }
            let flag = |k: &str| model.get(k).and_then(Value::as_bool).unwrap_or(false);
            let affixes = ["continuing_subword_prefix", "end_of_word_suffix"]
                .iter()
                .any(|k| {
                    model
                        .get(*k)
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.is_empty())
                });
            // Can a character of the model's input be missing from the vocabulary?
            let complete = byte_level
                && !affixes
                && (0..=255u8).all(|b| vocab.contains_key(&byte_level_char(b).to_string()));
            let fallback = flag("byte_fallback") && byte_tokens(&|s| vocab.contains_key(s));
            if !complete && !fallback {
                let unk = model
                    .get("unk_token")
                    .and_then(Value::as_str)
                    .is_some_and(|u| vocab.contains_key(u));
                if !unk || flag("fuse_unk") {
                    return None;
                }
                longest = longest.max(4);
            }
        }
        Some("Unigram") => {
            let vocab = model.get("vocab")?.as_array()?;
            let mut pieces = std::collections::HashSet::new();
            for p in vocab {
                let s = p.get(0)?.as_str()?;
                longest = longest.max(span(s));
                pieces.insert(s.to_string());
            }
            let fallback = model.get("byte_fallback").and_then(Value::as_bool) == Some(true);
            if !(fallback && byte_tokens(&|s| pieces.contains(s))) {
                return None;
            }
        }
        _ => return None,
    }
    for a in list(t, "added_tokens") {
        let flag = |k: &str| a.get(k).and_then(Value::as_bool).unwrap_or(false);
        if flag("lstrip") || flag("rstrip") {
            return None;
        }
        longest = longest.max(a.get("content").and_then(Value::as_str)?.len());
    }
    Some(longest)
}

/// The character GPT-2's byte-level alphabet writes for byte `b`.
fn byte_level_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    // The others, in byte order, become U+0100, U+0101, ...
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).unwrap_or(char::REPLACEMENT_CHARACTER)
}

fn template_env(template: &str) -> Result<minijinja::Environment<'static>> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template_owned("chat", template.to_string())
        .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
    Ok(env)
}

/// Turns generated ids into text piece by piece without splitting multi-byte characters:
/// text is only released once the bytes decoded so far form complete characters.
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Default for IncrementalDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds a token; returns the new text it completes (possibly empty).
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let new = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back (e.g. an incomplete character at the end).
    pub fn flush(&mut self, tok: &TextTokenizer) -> Result<String> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], true)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::collections::HashMap;

    fn lite() -> TextTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lite");
        TextTokenizer::from_dir(&dir, &[]).unwrap()
    }

    #[test]
    fn the_byte_level_alphabet_is_gpt2s() {
        assert_eq!(byte_level_char(b'a'), 'a');
        assert_eq!(byte_level_char(b' '), '\u{120}'); // Ġ
        assert_eq!(byte_level_char(b'\n'), '\u{10A}'); // Ċ
        assert_eq!(byte_level_char(0), '\u{100}');
        assert_eq!(byte_level_char(0xAD), '\u{143}');
        let all: std::collections::HashSet<char> = (0..=255u8).map(byte_level_char).collect();
        assert_eq!(all.len(), 256);
    }

    #[test]
    fn the_byte_bound_covers_every_token_of_the_fixture_vocabulary() {
        let tok = lite();
        let bound = tok.max_token_bytes().expect("a byte-level BPE has a bound");
        let to_byte: HashMap<char, u8> = (0..=255u8).map(|b| (byte_level_char(b), b)).collect();
        let added = tok.inner.get_added_tokens_decoder();
        let mut longest = 0;
        for (s, id) in tok.inner.get_vocab(true) {
            // The bytes of input text this token stands for.
            let bytes: Vec<u8> = match added.get(&id) {
                Some(a) => a.content.as_bytes().to_vec(),
                None => s
                    .chars()
                    .map(|c| *to_byte.get(&c).expect("a byte-level vocabulary"))
                    .collect(),
            };
            assert!(
                bytes.len() <= bound,
                "{s:?} stands for {} bytes, bound {bound}",
                bytes.len()
            );
            longest = longest.max(bytes.len());
            let text = tok.decode(&[id], false).unwrap();
            if !text.contains('\u{FFFD}') {
                assert!(text.len() <= bound, "{s:?} decodes to {text:?}");
            }
        }
        assert_eq!(longest, bound, "the bound is the longest token, no larger");
    }

    /// A small byte-level BPE in serialized form: every byte, plus `hello`.
    fn bpe() -> Value {
        let mut vocab = serde_json::Map::new();
        for b in 0..=255u8 {
            vocab.insert(byte_level_char(b).to_string(), json!(b));
        }
        vocab.insert("hello".into(), json!(256));
        json!({
            "truncation": null,
            "added_tokens": [{"id": 257, "content": "<s>", "lstrip": false, "rstrip": false}],
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "behavior": "Isolated"}, {"type": "ByteLevel"}]},
            "model": {"type": "BPE", "vocab": vocab, "unk_token": null,
                      "fuse_unk": false, "byte_fallback": false},
        })
    }

    #[test]
    fn the_byte_bound_is_refused_where_text_can_shrink_or_vanish() {
        let t = bpe();
        assert_eq!(max_token_bytes(&t), Some(5));
        let with = |path: &[&str], v: Value| {
            let mut t = bpe();
            let mut at = &mut t;
            for p in &path[..path.len() - 1] {
                at = &mut at[*p];
            }
            at[path[path.len() - 1]] = v;
            max_token_bytes(&t)
        };
        // Text that may shrink before the model sees it.
        assert_eq!(with(&["normalizer"], json!({"type": "NFC"})), None);
        assert_eq!(with(&["normalizer"], json!({"type": "Lowercase"})), None);
        let replace =
            |p: &str, c: &str| json!({"type": "Replace", "pattern": {"String": p}, "content": c});
        assert_eq!(with(&["normalizer"], replace(" ", "\u{2581}")), Some(5));
        assert_eq!(with(&["normalizer"], replace("  ", " ")), None);
        assert_eq!(
            with(&["pre_tokenizer"], json!({"type": "Whitespace"})),
            None
        );
        let removed = json!({"type": "Split", "behavior": "Removed"});
        assert_eq!(with(&["pre_tokenizer"], removed), None);
        // One token for any run of text.
        assert_eq!(with(&["model", "type"], json!("WordPiece")), None);
        let lstrip = json!([{"id": 257, "content": "<s>", "lstrip": true}]);
        assert_eq!(with(&["added_tokens"], lstrip), None);
        let long = json!([{"id": 257, "content": "<|a long added token|>"}]);
        assert_eq!(with(&["added_tokens"], long), Some(22));
        assert_eq!(with(&["truncation"], json!({"max_length": 8})), None);

        // Not byte-level: unknown characters are dropped, fused, or one `unk` each.
        let mut t = bpe();
        t["pre_tokenizer"] = json!({"type": "Metaspace"});
        assert_eq!(max_token_bytes(&t), None, "unknown characters would vanish");
        t["model"]["vocab"]["<unk>"] = json!(300);
        t["model"]["unk_token"] = json!("<unk>");
        assert_eq!(max_token_bytes(&t), Some(5), "a char (4 bytes) per unk");
        t["model"]["fuse_unk"] = json!(true);
        assert_eq!(max_token_bytes(&t), None);
        for b in 0..=255u8 {
            t["model"]["vocab"][format!("<0x{b:02X}>")] = json!(400 + u32::from(b));
        }
        t["model"]["byte_fallback"] = json!(true);
        assert_eq!(max_token_bytes(&t), Some(6));
    }
}
