//! Soak test: 1000 clients connect, chat and disconnect for 60 s against the real server binary
//! while its database is killed and restarted once.
//!
//! At the end: the server's resident memory is back near its idle level, no client saw a
//! message out of per-sender order, and every message a client sent is stored exactly once or
//! was reported unsaved to its sender.
//!
//! Ignored by default (it takes about 90 s); run it with
//!
//! ```text
//! scripts/test.sh --release --test soak -- --ignored --nocapture
//! ```
//!
//! Four threads drive 250 client "seats" each over nonblocking sockets (mio). A seat repeats
//! sessions: connect, set a nick unique to the session (`s{seat}g{generation}`), send a few
//! numbered messages (`s12g3 4`: short, so a `! not saved: "…"` report quotes it whole), stay
//! `LINGER` after the last one so that any report about it can arrive, leave (`/quit`, or the
//! socket simply closed), and come back a little later. Every received chat line is checked
//! against the per-sender order, and every message sent is looked up in the database at the end.
//!
//! The modules, in the order the test uses them:
//!
//! - `server`: the server binary under test: started, checked for clients left behind, stopped;
//! - `resources`: its memory and CPU time, idle and after the run;
//! - `run`: the client threads through the database outage;
//! - `seats`: one client thread and the sessions of its seats;
//! - `totals`: what the client threads saw and sent;
//! - `accounting`: what the database holds, and what became of each message sent;
//! - `report`: the printed summary and the final checks.

#[path = "../common/mod.rs"]
mod common;

mod accounting;
mod report;
mod resources;
mod run;
mod seats;
mod server;
mod totals;

use std::time::Duration;

use common::TestDb;

use accounting::{account, stored_contents};
use report::Summary;
use resources::{measure_idle, wait_for_memory_back};
use run::run_clients_through_outage;
use server::{check_nobody_left, fd_limit_for_all_seats, start_server, stop_server};

/// Client seats: each is one connection at a time, reconnecting after every session.
const SEATS: usize = 1000;
/// Client threads; each drives `SEATS / WORKERS` seats.
const WORKERS: usize = 4;
/// How long clients keep starting sessions and sending.
const SOAK: Duration = Duration::from_secs(60);
/// What the warm-up client sends, stored before the idle measurement.
const PROBE_TEXT: &str = "soak warm-up probe";

#[test]
#[ignore = "soak test, about 90 s: scripts/test.sh --release --test soak -- --ignored --nocapture"]
fn thousand_clients_churn_through_a_database_restart() {
    let fd_limit = fd_limit_for_all_seats();
    let mut db = TestDb::start_own_on_disk();
    let (server, addr) = start_server(&db);
    let idle = measure_idle(&server, &db, addr);
    let run = run_clients_through_outage(addr, &mut db);
    let peak_rss = server.memory_kib("VmHWM");
    check_nobody_left(addr);
    let resources = wait_for_memory_back(&server, &idle, peak_rss);
    // Stopped, the server has stored or reported every message it accepted: counting now
    // sees the final state of the database.
    let log = stop_server(server);
    let stored = stored_contents(&db);
    let outcome = account(&run.totals, &stored, run.outage.killed_at);
    let summary = Summary {
        fd_limit,
        run,
        resources,
        log,
        outcome,
    };
    summary.print();
    summary.assert_passed();
}
