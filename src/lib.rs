//! esft: an inference runtime for fine-grained Mixture-of-Experts models (DeepSeek-V2,
//! DeepSeek-V3, Qwen3-MoE, OLMoE) that serves per-task ESFT expert adapters.

pub mod adapter;
pub mod cli;
pub mod engine;
pub mod jobs;
pub mod model;
pub mod server;
pub mod store;
pub mod util;
