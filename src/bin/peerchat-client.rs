//! `peerchat-client`: parses flags and runs the client; everything else is in the library.

use std::process::ExitCode;

use peerchat::client;
use peerchat::config::{self, config_or_exit};

fn main() -> ExitCode {
    let parsed = config::parse_client_args(std::env::args_os().skip(1).collect());
    let config = match config_or_exit("peerchat-client", config::CLIENT_HELP, parsed) {
        Ok(config) => config,
        Err(code) => return code,
    };
    match client::run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("peerchat-client: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
