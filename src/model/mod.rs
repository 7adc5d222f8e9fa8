//! The math of DeepSeek-V2: configuration, weight loading, MLA attention, DeepSeekMoE and
//! the batched decoder, plus the tokenizer and chat template. No I/O beyond loading.

pub mod attention;
mod attention_grad;
pub mod bundle;
pub mod config;
pub mod cpu_kernels;
pub mod deepseek_v2;
pub mod error;
pub mod init;
pub mod load;
pub mod moe;
mod moe_grad;
pub mod ops;
pub mod rope;
pub mod tokenizer;

pub use bundle::LoadedModel;
pub use config::Config;
pub use deepseek_v2::{
    DeepSeekV2, ForwardOutput, HiddenOutput, LoadOptions, LogitsWanted, SeqCache, SeqInput,
    TrainableWeight, WeightKind,
};
pub use error::{ModelError, Result};
pub use moe::{ExpertMap, LayerRouting, RoutingRecord};
