//! esft-train: score experts on task data, select them, train only them, write adapters.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "esft-train",
    version,
    about = "Expert-Specialized Fine-Tuning for DeepSeek-V2 MoE models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Score routed experts on task data (Token Selection Ratio, Average Gate Score).
    Score,
    /// Select experts per layer from scores (top-p rule).
    Select,
    /// Train the selected experts and write an adapter.
    Train,
    /// Evaluate a model or adapter on an eval set.
    Eval,
    /// Write a full checkpoint with an adapter's tensors merged in.
    Merge,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    eprintln!(
        "error: `esft-train {}` is not implemented yet (see README: Status)",
        format!("{:?}", cli.command).to_lowercase()
    );
    std::process::ExitCode::FAILURE
}
