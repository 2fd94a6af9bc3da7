//! The server binary as a child process: started with flags, found by its log line, measured
//! through `/proc`, and killed when dropped so a failing test leaves no server behind.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::DEADLINE;

pub const SERVER: &str = env!("CARGO_BIN_EXE_peerchat-server");

/// Runs a command to completion within `DEADLINE`, killing it otherwise.
pub fn run_bounded(mut child: Child) -> Output {
    let deadline = Instant::now() + DEADLINE;
    while child.try_wait().expect("wait for child").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {DEADLINE:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect output")
}

/// Reads the server's log until `listening on ADDR`, checking the log line format on the way.
pub fn listening_address(server: &mut Child) -> SocketAddr {
    let stderr = server.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx.recv_timeout(DEADLINE).expect("server log line");
        let (stamp, rest) = line.split_once(' ').expect("timestamp first");
        assert!(
            stamp.ends_with('Z') && stamp.len() == 24,
            "timestamp: {line}"
        );
        assert!(
            rest.starts_with("INFO ") || rest.starts_with("WARN "),
            "level: {line}"
        );
        if let Some(addr) = rest.split("listening on ").nth(1) {
            return addr.trim().parse().expect("address in log");
        }
    }
}

/// Starts the server binary with extra flags under `sh -c` (for `ulimit`), returning it and its
/// address.
pub fn spawn_server(shell_prefix: &str, flags: &str) -> (ServerProcess, SocketAddr) {
    let command = format!("{shell_prefix} exec '{SERVER}' --port 0 {flags}");
    let mut server = Command::new("sh")
        .args(["-c", &command])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start server");
    let addr = listening_address(&mut server);
    (ServerProcess(Some(server)), addr)
}

/// The server binary, killed when dropped so that a failing test leaves no server behind.
pub struct ServerProcess(Option<Child>);

impl ServerProcess {
    pub fn id(&self) -> u32 {
        self.0.as_ref().expect("running").id()
    }

    /// Hands the process over, to wait for its own exit.
    pub fn into_child(mut self) -> Child {
        self.0.take().expect("running")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl ServerProcess {
    /// A figure from `/proc/PID/status` in KiB: `VmRSS` now or `VmHWM`, the peak.
    pub fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.id()))
            .expect("read /proc status of the server");
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    /// User plus system CPU time the server has used, in clock ticks (1/100 s on Linux).
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.id()))
            .expect("read /proc stat of the server");
        // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        let after_name = &stat[stat.rfind(')').expect("command name") + 2..];
        let fields: Vec<&str> = after_name.split(' ').collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }
}
