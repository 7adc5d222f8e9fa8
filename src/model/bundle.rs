//! A servable model directory: weights, config and tokenizer loaded together.

use std::path::{Path, PathBuf};

use super::deepseek_v2::{DeepSeekV2, LoadOptions};
use super::error::Result;
use super::tokenizer::TextTokenizer;

pub struct LoadedModel {
    pub dir: PathBuf,
    pub model: DeepSeekV2,
    pub tokenizer: TextTokenizer,
}

impl LoadedModel {
    /// Loads a Hugging Face model directory: `config.json`, safetensors weights (single or
    /// sharded), `tokenizer.json` and, if present, `tokenizer_config.json`.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let model = DeepSeekV2::load_dir(dir, opts)?;
        let tokenizer = TextTokenizer::from_dir(dir, &model.config().eos_token_ids)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            model,
            tokenizer,
        })
    }

    /// End-of-sequence ids from the config and the tokenizer.
    pub fn eos_ids(&self) -> &[u32] {
        self.tokenizer.eos_ids()
    }

    /// The longest sequence (prompt + output) the model may run.
    pub fn max_context(&self) -> usize {
        self.model.config().max_position_embeddings
    }
}
