use clap::Parser;
use esft::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    esft::util::prepare_process();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Generate(args) => esft::cli::generate(args),
        Command::Serve(args) => esft::cli::serve(args),
        Command::HashKey => esft::cli::hash_key(),
        Command::Worker(args) => esft::cli::worker(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
