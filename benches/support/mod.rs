//! What the benches share: the servers under test as child processes, the load generator, and
//! figures (latency histogram, CPU from /proc, JSON lines).
//!
//! Each bench binary uses only part of this, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod db;
pub mod idle;
pub mod load;
pub mod servers;
pub mod stats;

/// Stops the bench with a message; exit code 2 means "could not run", 1 means "ran and failed".
pub fn die(message: &str) -> ! {
    eprintln!("bench: {message}");
    std::process::exit(2)
}

/// Raises this process's open-file limit to its hard limit: the generator holds one socket per
/// simulated client, thousands of them.
pub fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    limit.rlim_cur
}
