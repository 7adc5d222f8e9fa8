//! esft-train: score experts on task data, select them, train only them, write adapters.

use clap::Parser;

fn main() -> std::process::ExitCode {
    esft::util::pin_thread_count();
    match esft_train::cli::run(esft_train::cli::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
