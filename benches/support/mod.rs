//! What the benches share: the servers under test as child processes, the load generator, the
//! database for persistence, the cluster run (several nodes on one database), TLS for the
//! generator's clients, and figures (latency histogram, CPU from /proc, JSON lines).
//!
//! Each bench binary uses only part of this, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::process::Command;

pub mod cluster;
pub mod db;
pub mod idle;
pub mod load;
pub mod servers;
pub mod stats;
pub mod storm;
pub mod tls;

/// Stops the bench with a message; exit code 2 means "could not run", 1 means "ran and failed".
pub fn die(message: &str) -> ! {
    eprintln!("bench: {message}");
    std::process::exit(2)
}

/// Stops the bench loudly with exit code 1: it ran, and something failed or got stuck.
pub fn fail(message: &str) -> ! {
    eprintln!("\n!!! BENCH FAILED: {message} !!!");
    std::process::exit(1)
}

/// Has the child started by `command` get `signal` when the bench ends, however it ends:
/// `die`, `fail` and a watchdog end the process without running `Drop`, which would leave
/// servers and databases running. The signal comes when the thread that started the child
/// ends, so start children from the main thread.
pub fn end_with_bench(command: &mut Command, signal: libc::c_int) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and changes only the child's own settings.
    unsafe {
        command.pre_exec(move || match libc::prctl(libc::PR_SET_PDEATHSIG, signal) {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        })
    }
}

/// Raises this process's open-file limit to its hard limit: the generator holds one socket per
/// simulated client, thousands of them. Returns the limit now in force.
pub fn raise_open_file_limit() -> u64 {
    peerchat::fd_limit::raise_open_file_limit().unwrap_or(1024)
}
