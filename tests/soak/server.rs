//! The server binary under test: started on the test database, checked for clients left
//! behind, stopped, and what its log shows.

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::process::{spawn_server, ServerProcess};
use crate::common::{Chat, TestDb, DEADLINE};
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

/// Starts the server binary on `db`, with a mongo timeout short enough for the outage to show,
/// logging each connection (debug level) so the summary can count them.
pub fn start_server(db: &TestDb) -> (ServerProcess, SocketAddr) {
    let flags = format!(
        "--mongo-uri '{}' --mongo-db '{}' --mongo-timeout-ms {MONGO_TIMEOUT_MS} --log-level debug",
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

/// Stops the server as an operator would (SIGTERM) and waits for it to exit. A clean stop
/// first lets the persistence thread store or report every message the server accepted (the
/// log then says `persistence stopped: N messages saved, M not saved`, or that it was still
/// busy at `--shutdown-timeout`), so from here on the database's contents are final: the
/// settled state the accounting counts, where waiting for the count to stop changing could
/// count too early. Returns what the summary shows of the whole log.
pub fn stop_server(mut server: ServerProcess) -> ServerLog {
    let mut log = server.log_so_far();
    server.signal("-TERM");
    let exit_code = server.wait_exit();
    assert_eq!(
        exit_code,
        Some(0),
        "the server did not stop cleanly on SIGTERM; the stored messages may not be final"
    );
    // The log arrives through a forwarding thread: read up to the server's last line.
    let deadline = Instant::now() + DEADLINE;
    while !log
        .last()
        .is_some_and(|line| line.ends_with(" server stopped"))
    {
        assert!(
            Instant::now() < deadline,
            "no `server stopped` line within {DEADLINE:?} after the server exited"
        );
        thread::sleep(Duration::from_millis(20));
        log.extend(server.log_so_far());
    }
    ServerLog::from_lines(log)
}

/// What the summary shows of the server's log.
pub struct ServerLog {
    /// Client connections the server logged.
    pub connections: usize,
    /// Warnings, errors and the lines about the database.
    pub lines: Vec<String>,
}

impl ServerLog {
    fn from_lines(all: Vec<String>) -> ServerLog {
        let connections = all
            .iter()
            .filter(|line| line.contains(" connected ("))
            .count();
        let lines = all
            .into_iter()
            .filter(|line| {
                [" WARN ", " ERROR "]
                    .iter()
                    .any(|level| line.contains(level))
                    || ["MongoDB", "persist", "saving", "storing"]
                        .iter()
                        .any(|word| line.contains(word))
            })
            .collect();
        ServerLog { connections, lines }
    }
}
