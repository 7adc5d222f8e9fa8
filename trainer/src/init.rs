//! `init`: a new model from nothing. Trains a byte-level BPE tokenizer on a corpus of task
//! data (digits split one per token, so numbers are spelled the same way everywhere),
//! writes it with the DeepSeek chat template, and writes a randomly initialised checkpoint
//! of the config's architecture (DeepSeek-V2/V3, Qwen3-MoE, OLMoE) whose vocabulary is the
//! tokenizer's. The result is a Hugging Face model
//! directory that the server and every trainer command load as they are.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

pub const BOS: &str = "<｜begin▁of▁sentence｜>";
pub const EOS: &str = "<｜end▁of▁sentence｜>";

/// The DeepSeek chat template: the reference prompt format the trainer uses
/// (`User: ...\n\nAssistant: ...<eos>`).
pub const CHAT_TEMPLATE: &str = "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";

/// Every `*.jsonl` file in `dir` and its subdirectories, sorted (so a corpus is read in the
/// same order everywhere).
pub fn corpus_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "jsonl") {
                out.push(path);
            }
        }
    }
    out.sort();
    if out.is_empty() {
        bail!("{}: no .jsonl files to train a tokenizer on", dir.display());
    }
    Ok(out)
}

/// The texts of a JSONL file as the model will see them: reference `messages` rendered in
/// the prompt format, pretraining `{"text"}` as it is, `{"prompt", "completion"}` and eval
/// `{"prompt", "answers"}` joined.
pub fn corpus_texts(path: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (line, v) in crate::data::json_lines(path)? {
        let text = if let Some(msgs) = v.get("messages").and_then(Value::as_array) {
            let mut t = String::new();
            for m in msgs {
                let content = m
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .trim();
                match m.get("role").and_then(Value::as_str) {
                    Some("user") => t.push_str(&crate::data::user_turn(content)),
                    Some("assistant") => t.push_str(&crate::data::assistant_turn(content)),
                    _ => t.push_str(content),
                }
            }
            t
        } else if let Some(t) = v.get("text").and_then(Value::as_str) {
            t.to_string()
        } else if let Some(p) = v.get("prompt").and_then(Value::as_str) {
            let rest = v
                .get("completion")
                .and_then(Value::as_str)
                .or_else(|| v.pointer("/answers/0").and_then(Value::as_str))
                .or_else(|| v.get("answers").and_then(Value::as_str))
                .unwrap_or("");
            format!("{p} {}", rest.trim())
        } else {
            bail!(
                "{} line {line}: expected `messages`, `text` or `prompt`",
                path.display()
            );
        };
        out.push(text);
    }
    Ok(out)
}

/// Trains a byte-level BPE tokenizer with `vocab_size` entries (fewer if the corpus has
/// fewer merges to offer). BOS and EOS are ids 0 and 1; encoding with special tokens adds
/// BOS, as DeepSeek's tokenizer does.
pub fn train_tokenizer(texts: &[String], vocab_size: usize) -> Result<Tokenizer> {
    let mut tok = Tokenizer::new(BPE::default());
    let pre = Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ]);
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(pre)));
    tok.with_decoder(Some(ByteLevel::default()));
    let specials = vec![AddedToken::from(BOS, true), AddedToken::from(EOS, true)];
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tok.train(&mut trainer, texts.iter())
        .map_err(|e| anyhow::anyhow!("training the tokenizer: {e}"))?;
    let ids = (tok.token_to_id(BOS), tok.token_to_id(EOS));
    if ids != (Some(0), Some(1)) {
        bail!("the trained tokenizer put BOS and EOS at {ids:?}, expected ids 0 and 1");
    }
    let post = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .and_then(|b| b.try_pair(format!("{BOS} $A {BOS} $B")))
        .map_err(|e| anyhow::anyhow!("tokenizer template: {e}"))?
        .special_tokens(vec![(BOS, 0)])
        .build()
        .map_err(|e| anyhow::anyhow!("tokenizer template: {e}"))?;
    tok.with_post_processor(Some(post));
    Ok(tok)
}

/// `tokenizer_config.json`: special tokens and the chat template.
pub fn tokenizer_config(max_len: usize) -> Value {
    json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": null,
        "clean_up_tokenization_spaces": false,
        "model_max_length": max_len,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    })
}

/// Staging makes private files; a model directory is meant to be shared and served.
fn make_readable(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        for entry in std::fs::read_dir(dir)? {
            std::fs::set_permissions(entry?.path(), std::fs::Permissions::from_mode(0o644))?;
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// What `init` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InitSummary {
    pub vocab_size: usize,
    pub params: usize,
    pub bytes: u64,
    pub corpus_texts: usize,
}

/// Writes a new model directory at `out` (atomically: staged beside it, then renamed):
/// a tokenizer trained on `texts`, and a random checkpoint of `config` (a `config.json` of
/// any supported architecture; `vocab_size`, `bos_token_id` and `eos_token_id` are set from the tokenizer).
pub fn init_model(
    mut config: Value,
    texts: &[String],
    vocab_size: usize,
    seed: u64,
    out: &Path,
) -> Result<InitSummary> {
    if !config.is_object() {
        bail!("the model config must be a JSON object (a model's config.json)");
    }
    let tok = train_tokenizer(texts, vocab_size)?;
    let vocab = tok.get_vocab_size(true);
    config["vocab_size"] = vocab.into();
    config["bos_token_id"] = 0.into();
    config["eos_token_id"] = 1.into();
    let max_len = config
        .get("max_position_embeddings")
        .and_then(Value::as_u64)
        .unwrap_or(4096) as usize;

    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)?;
    let staged = tempfile::Builder::new()
        .prefix(".init-")
        .tempdir_in(&parent)?;
    esft::model::init::write_random_checkpoint(&config, seed, staged.path())?;
    tok.save(staged.path().join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("writing tokenizer.json: {e}"))?;
    std::fs::write(
        staged.path().join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tokenizer_config(max_len))? + "\n",
    )?;
    let weights = std::fs::read(staged.path().join("model.safetensors"))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&weights)?;
    let params = meta
        .tensors()
        .values()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    make_readable(staged.path())?;
    esft::util::replace_dir(staged.keep(), out)?;
    Ok(InitSummary {
        vocab_size: vocab,
        params,
        bytes: weights.len() as u64,
        corpus_texts: texts.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use esft::model::tokenizer::TextTokenizer;
    use esft::model::{LoadOptions, LoadedModel};

    fn corpus() -> Vec<String> {
        let mut texts = Vec::new();
        for i in 0..200 {
            texts.push(format!(
                "User: tom has {} apples and buys {} more. how many apples?\n\nAssistant: {}",
                i % 10,
                (i / 10) % 10,
                i % 10 + (i / 10) % 10
            ));
            texts.push(format!(
                "User: translate: the dog sees cat {i}\n\nAssistant: lo drak"
            ));
        }
        texts
    }

    #[test]
    fn corpus_texts_read_every_format() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.jsonl");
        std::fs::write(
            &f,
            "{\"messages\": [{\"role\": \"user\", \"content\": \"q \"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n\
             {\"text\": \"User: t\\n\\nAssistant: u\"}\n\
             {\"prompt\": \"p\", \"completion\": \" c\"}\n\
             {\"prompt\": \"e\", \"answers\": [\"f\"]}\n",
        )
        .unwrap();
        assert_eq!(
            corpus_texts(&f).unwrap(),
            [
                "User: q\n\nAssistant: a",
                "User: t\n\nAssistant: u",
                "p c",
                "e f"
            ]
        );
        std::fs::write(&f, "{\"other\": 1}\n").unwrap();
        let err = corpus_texts(&f).unwrap_err().to_string();
        assert!(
            err.contains("line 1: expected `messages`, `text` or `prompt`"),
            "{err}"
        );
    }

    fn lite_config() -> Value {
        serde_json::from_str(include_str!("../../tests/fixtures/lite/config.json")).unwrap()
    }

    #[test]
    fn tokenizer_round_trips_splits_digits_and_puts_specials_first() {
        let tok = train_tokenizer(&corpus(), 300).unwrap();
        assert!(tok.get_vocab_size(true) <= 300);
        let text = "User: tom has 12 apples and 7 pears\n\nAssistant: 19";
        let enc = tok.encode(text, true).unwrap();
        assert_eq!(enc.get_ids()[0], 0, "BOS first");
        assert_eq!(tok.decode(&enc.get_ids()[1..], false).unwrap(), text);
        // Every digit is its own token.
        for t in enc.get_tokens() {
            let digits = t.chars().filter(|c| c.is_ascii_digit()).count();
            assert!(digits <= 1 || t == BOS, "token {t:?} holds several digits");
        }
        // Frequent words became single tokens.
        assert_eq!(tok.encode(" apples", false).unwrap().get_ids().len(), 1);
    }

    #[test]
    fn init_makes_every_architecture() {
        for name in ["deepseek-v3", "qwen3-moe-dense0", "olmoe"] {
            let path = format!(
                "{}/../tests/fixtures/{name}/config.json",
                env!("CARGO_MANIFEST_DIR")
            );
            let config: Value =
                serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("m");
            let s = init_model(config.clone(), &corpus(), 300, 5, &out).unwrap();
            let loaded = LoadedModel::load(&out, &LoadOptions::default()).unwrap();
            let cfg = loaded.model.config();
            assert_eq!(cfg.architecture.model_type(), config["model_type"]);
            assert_eq!(cfg.vocab_size, s.vocab_size);
            let ids = loaded.tokenizer.encode("tom has 3 apples", true).unwrap();
            let mut cache = loaded.model.new_cache();
            let mut batch = [esft::model::SeqInput {
                tokens: &ids,
                cache: &mut cache,
                experts: None,
                logits: esft::model::LogitsWanted::Last,
            }];
            let logits: Vec<Vec<f32>> = loaded
                .model
                .forward(&mut batch, None)
                .unwrap()
                .logits
                .unwrap()
                .to_vec2()
                .unwrap();
            assert!(logits[0].iter().all(|v| v.is_finite()), "{name}");
        }
    }

    #[test]
    fn init_writes_a_model_the_server_loads() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m");
        let s = init_model(lite_config(), &corpus(), 400, 3, &out).unwrap();
        assert!(s.vocab_size <= 400 && s.vocab_size > 260);
        let loaded = LoadedModel::load(&out, &LoadOptions::default()).unwrap();
        assert_eq!(loaded.model.config().vocab_size, s.vocab_size);
        assert_eq!(loaded.tokenizer.vocab_size(), s.vocab_size);
        let tok = TextTokenizer::from_dir(&out, &[]).unwrap();
        let chat = tok
            .render_chat(
                &[esft::model::tokenizer::ChatMessage::new("user", "hi")],
                true,
            )
            .unwrap();
        assert_eq!(chat, format!("{BOS}User: hi\n\nAssistant:"));
        // Only the model's files, nothing staged left behind.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["m"]);
    }
}
