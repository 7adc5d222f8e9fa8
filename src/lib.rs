//! esft: an inference runtime for DeepSeek-V2 Mixture-of-Experts models that serves
//! per-task ESFT expert adapters.

pub mod adapter;
pub mod cli;
pub mod engine;
pub mod jobs;
pub mod model;
pub mod server;
pub mod store;
pub mod util;
