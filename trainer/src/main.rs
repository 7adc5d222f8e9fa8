//! esft-train: score experts on task data, select them, train only them, write adapters.

use clap::Parser;

use esft_train::cli::Cli;
use esft_train::error;
use esft_train::progress::error_line;

fn main() -> std::process::ExitCode {
    esft::util::prepare_process();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Usage errors fail a --json command too (help and version are no failures).
            if e.use_stderr() && std::env::args().any(|a| a == "--json") {
                let task = std::env::args().nth(1).unwrap_or_default();
                let text = e.render().to_string();
                let first = text.lines().next().unwrap_or_default();
                let message = first.strip_prefix("error: ").unwrap_or(first);
                println!("{}", error_line(&task, "internal", message));
            }
            e.exit()
        }
    };
    let json_task = cli.command.json_task();
    match esft_train::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(task) = json_task {
                println!(
                    "{}",
                    error_line(task, error::code(&e), &error::public_message(&e))
                );
            }
            std::process::ExitCode::FAILURE
        }
    }
}
