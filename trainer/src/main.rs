//! esft-train: score experts on task data, select them, train only them, write adapters.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

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
    Merge(MergeArgs),
}

#[derive(Args, Debug)]
struct MergeArgs {
    /// The base model directory.
    #[arg(long)]
    model: PathBuf,
    /// The adapter directory (ours or the ESFT reference layout).
    #[arg(long)]
    adapter: PathBuf,
    /// Where to write the merged checkpoint (created atomically).
    #[arg(long)]
    out: PathBuf,
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Merge(a) => {
            esft::adapter::merge::merge_checkpoint(&a.model, &a.adapter, &a.out)?;
            eprintln!("wrote {}", a.out.display());
            Ok(())
        }
        other => anyhow::bail!(
            "`esft-train {}` is not implemented yet (see README: Status)",
            format!("{other:?}").to_lowercase()
        ),
    }
}

fn main() -> std::process::ExitCode {
    esft::util::pin_thread_count();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
