//! The server binary under test: started on the test database, checked for clients left
//! behind, and what its log shows.

use std::net::SocketAddr;

use crate::common::process::{spawn_server, ServerProcess};
use crate::common::{Chat, TestDb};
use crate::SEATS;

/// The server's `--mongo-timeout-ms` here.
const MONGO_TIMEOUT_MS: u64 = 1000;

/// Raises the open-file limit and checks that it leaves a socket for every seat.
pub fn fd_limit_for_all_seats() -> u64 {
    let fd_limit = peerchat::fd_limit::raise_open_file_limit().expect("getrlimit");
    assert!(
        fd_limit >= SEATS as u64 + 200,
        "the test needs more than {SEATS} descriptors; the limit is {fd_limit}"
    );
    fd_limit
}

/// Starts the server binary on `db`, with a mongo timeout short enough for the outage to show.
pub fn start_server(db: &TestDb) -> (ServerProcess, SocketAddr) {
    let flags = format!(
        "--mongo-uri '{}' --mongo-db '{}' --mongo-timeout-ms {MONGO_TIMEOUT_MS}",
        db.uri, db.database
    );
    spawn_server("", &flags)
}

/// Every client has gone: the server must be alive, answer, and count nobody else.
pub fn check_nobody_left(addr: SocketAddr) {
    let mut last = Chat::connect(addr);
    last.send("/who");
    let who = last.wait_for(|line| line.contains(" online: "));
    assert!(
        who.starts_with("* 1 online: "),
        "clients left behind: {who}"
    );
    last.send("/quit");
    last.read_to_end();
}

/// What the summary shows of the server's log.
pub struct ServerLog {
    /// Client connections the server logged.
    pub connections: usize,
    /// Warnings, errors and the lines about the database.
    pub lines: Vec<String>,
}

impl ServerLog {
    pub fn collect(server: &ServerProcess) -> ServerLog {
        let all = server.log_so_far();
        let connections = all
            .iter()
            .filter(|line| line.contains(" connected ("))
            .count();
        let lines = all
            .into_iter()
            .filter(|line| {
                !line.contains(" INFO ")
                    || ["MongoDB", "persist", "saving", "storing"]
                        .iter()
                        .any(|word| line.contains(word))
            })
            .collect();
        ServerLog { connections, lines }
    }
}
