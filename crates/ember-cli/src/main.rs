//! `ember`: the command line. Thin: every command parses its flags, calls the library crates and
//! prints. Errors print one clear message and exit with code 1.

mod commands;
mod inspect;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = commands::Cli::parse();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}
