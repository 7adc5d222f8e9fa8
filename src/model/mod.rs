//! The math of a family of fine-grained MoE decoders - DeepSeek-V2, DeepSeek-V3, Qwen3-MoE
//! and OLMoE: configuration, weight loading, attention (MLA or grouped-query), the MoE
//! layer (routers, expert slots) and the one batched decoder, plus the tokenizer and chat
//! template. One file per architecture says what is particular to it. No I/O beyond
//! loading.

pub mod attention;
mod attention_grad;
pub mod bundle;
pub mod config;
pub mod cpu_kernels;
pub mod decoder;
mod deepseek_v2;
mod deepseek_v3;
pub mod error;
pub mod gqa;
pub mod init;
pub mod load;
pub mod moe;
mod moe_grad;
mod olmoe;
pub mod ops;
mod qwen3_moe;
pub mod rope;
pub mod tokenizer;

pub use bundle::LoadedModel;
pub use config::Config;
pub use decoder::{
    Decoder, ForwardOutput, HiddenOutput, LoadOptions, LogitsWanted, SeqCache, SeqInput,
    TrainableWeight, WeightKind,
};
pub use error::{ModelError, Result};
pub use moe::{ExpertMap, LayerRouting, RoutingRecord};
