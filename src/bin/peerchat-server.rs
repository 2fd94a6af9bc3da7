//! `peerchat-server`: parses flags and runs the server; everything else is in the library.

use std::process::ExitCode;

use peerchat::config::{self, config_or_exit};
use peerchat::{error, Server};

fn main() -> ExitCode {
    let args = std::env::args_os().skip(1).collect();
    let env_uri = std::env::var(config::MONGO_URI_ENV).ok();
    let parsed = config::parse_server_args(args, env_uri);
    let config = match config_or_exit("peerchat-server", config::SERVER_HELP, parsed) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let served = Server::bind(config).and_then(|server| {
        server.handle().shutdown_on_signals()?;
        server.run()
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{err}");
            ExitCode::FAILURE
        }
    }
}
