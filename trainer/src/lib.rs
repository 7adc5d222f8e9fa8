//! esft-train: Expert-Specialized Fine-Tuning. Scores routed experts on task data, selects
//! them with the reference rule, trains only them (or everything, for comparison) and
//! writes adapters the server loads as they are.

pub mod cli;
pub mod data;
pub mod error;
pub mod eval;
pub mod import;
pub mod init;
pub mod loss;
pub mod optim;
pub mod plot;
pub mod progress;
pub mod routing_stats;
pub mod score;
pub mod select;
pub mod synth;
pub mod train;
