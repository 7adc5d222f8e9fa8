//! A servable model directory: weights, config and tokenizer loaded together.

use std::path::{Path, PathBuf};

use std::sync::Arc;

use super::config::Config;
use super::decoder::{Decoder, LoadOptions};
use super::error::Result;
use super::load::WeightStore;
use super::tokenizer::TextTokenizer;

pub struct LoadedModel {
    pub dir: PathBuf,
    pub model: Decoder,
    pub tokenizer: TextTokenizer,
    /// The checkpoint's files stay mapped: adapters are checked against them.
    pub store: Arc<WeightStore>,
}

impl LoadedModel {
    /// Loads a Hugging Face model directory: `config.json`, safetensors weights (single or
    /// sharded), `tokenizer.json` and, if present, `tokenizer_config.json`.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let config = Config::from_dir(dir)?;
        let tokenizer = TextTokenizer::from_dir(dir, &config.eos_token_ids)?;
        let store = Arc::new(WeightStore::open_dir(dir)?);
        let model = Decoder::load(config, &store, opts)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            model,
            tokenizer,
            store,
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
