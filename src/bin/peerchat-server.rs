//! `peerchat-server`: parses flags and runs the server; everything else is in the library.

use std::process::ExitCode;
use std::time::Duration;

use peerchat::config::{self, config_or_exit};
use peerchat::{error, fd_limit, log, Server};

/// How long the last log lines may take to reach stderr before the process exits anyway (a
/// stderr nobody reads must not keep a stopped server alive).
const LOG_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let args = std::env::args_os().skip(1).collect();
    let env_uri = std::env::var(config::MONGO_URI_ENV).ok();
    let parsed = config::parse_server_args(args, env_uri);
    let mut config = match config_or_exit("peerchat-server", config::SERVER_HELP, parsed) {
        Ok(config) => config,
        Err(code) => return code,
    };
    log::set_min_level(config.log_level);
    // Every client is a descriptor: take what the system allows, and serve no more clients
    // than fit. The binary does this, not `Server::bind`, which tests and embedders call.
    let open_files = fd_limit::raise_open_file_limit();
    config.max_clients = fd_limit::max_clients(config.max_clients, open_files);
    let served = Server::bind(config).and_then(|server| {
        server.handle().shutdown_on_signals()?;
        server.run()
    });
    let code = match served {
        Ok(()) => ExitCode::SUCCESS,
        // 2 like a bad flag for a certificate or key file that cannot serve, else 1.
        Err(err) => {
            error!("{err}");
            ExitCode::from(err.exit_code())
        }
    };
    log::flush(LOG_FLUSH_TIMEOUT);
    code
}
