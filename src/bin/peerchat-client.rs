//! `peerchat-client`: parses flags and runs the client; everything else is in the library.

use std::process::ExitCode;

use peerchat::client;
use peerchat::config::{self, Parsed};

fn main() -> ExitCode {
    let args = std::env::args_os().skip(1).collect();
    let config = match config::parse_client_args(args) {
        Ok(Parsed::Run(config)) => config,
        Ok(Parsed::Help) => {
            print!("{}", config::CLIENT_HELP);
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            println!("peerchat-client {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("peerchat-client: error: {err}");
            return ExitCode::from(2);
        }
    };
    match client::run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("peerchat-client: {err}");
            ExitCode::FAILURE
        }
    }
}
