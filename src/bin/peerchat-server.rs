//! `peerchat-server`: parses flags and runs the server; everything else is in the library.

use std::process::ExitCode;

use peerchat::config::{self, Parsed};
use peerchat::{error, Server};

fn main() -> ExitCode {
    let args = std::env::args_os().skip(1).collect();
    let env_uri = std::env::var(config::MONGO_URI_ENV).ok();
    let config = match config::parse_server_args(args, env_uri) {
        Ok(Parsed::Run(config)) => config,
        Ok(Parsed::Help) => {
            print!("{}", config::SERVER_HELP);
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            println!("peerchat-server {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("peerchat-server: error: {err}");
            return ExitCode::from(2);
        }
    };
    let started = Server::bind(config).and_then(|server| {
        server.handle().shutdown_on_signals()?;
        server.run()
    });
    match started {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{err}");
            ExitCode::FAILURE
        }
    }
}
