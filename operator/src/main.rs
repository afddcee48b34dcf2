//! The `hangar` binary: argument parsing and error reporting around the
//! `hangar` library. Everything that decides or acts lives in the library.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("hangar: {err:#}");
            ExitCode::from(2)
        }
    }
}
