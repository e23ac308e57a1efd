use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = bootstrap::cli::Cli::parse();
    bootstrap::logging::init(cli.verbose, cli.quiet);
    match bootstrap::cli::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", bootstrap::secrets::redact(&format!("{e:#}")));
            ExitCode::from(bootstrap::error::exit_code_for(&e))
        }
    }
}
