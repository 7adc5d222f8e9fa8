//! Errors of loading and running a model, each carrying what a user needs to fix it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{what} not found: {path}")]
    MissingFile {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("config.json{}: {message}", path.as_ref().map(|p| format!(" ({})", p.display())).unwrap_or_default())]
    ConfigSyntax {
        path: Option<PathBuf>,
        message: String,
    },
    #[error("unsupported config value {key} = {value}: {reason}")]
    UnsupportedConfig {
        key: String,
        value: String,
        reason: String,
    },
    #[error("no safetensors weights in {0} (expected model.safetensors or model.safetensors.index.json)")]
    NoWeights(PathBuf),
    #[error("invalid safetensors file {path}: {message}")]
    BadSafetensors { path: PathBuf, message: String },
    #[error("invalid weight index {path}: {message}")]
    BadIndex { path: PathBuf, message: String },
    #[error("missing tensor {name}")]
    MissingTensor { name: String },
    #[error("tensor {name} has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tensor {name} has unsupported dtype {dtype}")]
    UnsupportedDtype { name: String, dtype: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
