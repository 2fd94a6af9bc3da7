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
pub const CLIENT: &str = env!("CARGO_BIN_EXE_peerchat-client");

/// Starts the client binary in plain mode against `port` on loopback, its standard streams
/// piped.
pub fn spawn_piped_client(port: u16, flags: &[&str]) -> Child {
    spawn_client(port, flags, Stdio::piped())
}

/// Starts the client binary against `port` on loopback with `stdin`, its output piped.
pub fn spawn_client(port: u16, flags: &[&str], stdin: Stdio) -> Child {
    Command::new(CLIENT)
        .args(["--port", &port.to_string()])
        .args(flags)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start client")
}

/// Starts the server binary with `args` (fixed ports, so a test can start it again on them)
/// and waits until `port` accepts connections.
pub fn spawn_server_on<S: AsRef<std::ffi::OsStr>>(port: u16, args: &[S]) -> ServerProcess {
    let child = Command::new(SERVER)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start server");
    let server = ServerProcess::adopt(child);
    let deadline = Instant::now() + DEADLINE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "server did not start on {port}");
        thread::sleep(Duration::from_millis(20));
    }
    server
}

/// Runs binary `exe` with `args` to its exit (within `DEADLINE`), its output captured.
pub fn run_with_args(exe: &str, args: &[&str]) -> Output {
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start binary");
    run_bounded(child)
}

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

/// Forwards the server's log lines to a channel, from a thread of their own, so the pipe never
/// fills up and tests can look for lines.
fn forward_log(server: &mut Child) -> mpsc::Receiver<String> {
    let stderr = server.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Starts the server binary with extra flags under `sh -c` (for `ulimit`), returning it and its
/// address, read from its `listening on ADDR` log line.
pub fn spawn_server(shell_prefix: &str, flags: &str) -> (ServerProcess, SocketAddr) {
    spawn_server_with_ports(shell_prefix, &format!("--port 0 {flags}"))
}

/// Starts the server binary with `flags` (ports included) under `sh -c`, returning it and the
/// address in its first `listening on ADDR (backlog N)` log line: the plain listener's, or with
/// `--no-plain` the TLS one's (`listening on ADDR (TLS, backlog N)`).
pub fn spawn_server_with_ports(shell_prefix: &str, flags: &str) -> (ServerProcess, SocketAddr) {
    let marker = "listening on ";
    let command = format!("{shell_prefix} exec '{SERVER}' {flags}");
    let mut child = Command::new("sh")
        .args(["-c", &command])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start server");
    let log = forward_log(&mut child);
    let mut server = ServerProcess {
        child: Some(child),
        log,
        listening: String::new(),
        before_listening: Vec::new(),
    };
    let mut before = Vec::new();
    let line = server.wait_for_log(|line| {
        before.push(line.to_string());
        line.contains(marker)
    });
    before.pop();
    server.before_listening = before;
    server.listening = line.clone();
    // `listening on 127.0.0.1:PORT (backlog 1024)`
    let addr = line.split(marker).nth(1).unwrap();
    let addr = addr.split_whitespace().next().expect("address in log");
    (server, addr.parse().expect("address in log"))
}

/// The server binary, killed when dropped so that a failing test leaves no server behind.
pub struct ServerProcess {
    child: Option<Child>,
    log: mpsc::Receiver<String>,
    /// The start line, `… INFO  listening on ADDR (backlog N)`.
    pub listening: String,
    /// The log lines before that one, without their time stamps (`INFO  …`).
    pub before_listening: Vec<String>,
}

impl ServerProcess {
    /// Takes charge of a server started some other way (its log stays with the caller), so it
    /// is killed when the test ends.
    pub fn adopt(child: Child) -> ServerProcess {
        ServerProcess {
            child: Some(child),
            log: mpsc::channel().1,
            listening: String::new(),
            before_listening: Vec::new(),
        }
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Hands the process over, to wait for its own exit.
    pub fn into_child(mut self) -> Child {
        self.child.take().expect("running")
    }

    /// Reads the log until a line matches, checking the line format on the way.
    pub fn wait_for_log(&self, mut wanted: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.log.recv_timeout(left) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("expected log line did not come within {DEADLINE:?}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("the server's log ended before the expected line")
                }
            };
            let (stamp, rest) = line.split_once(' ').expect("timestamp first");
            assert!(
                stamp.ends_with('Z') && stamp.len() == 24,
                "timestamp: {line}"
            );
            assert!(
                ["DEBUG ", "INFO ", "WARN ", "ERROR "]
                    .iter()
                    .any(|level| rest.starts_with(level)),
                "level: {line}"
            );
            if wanted(rest) {
                return line;
            }
        }
    }

    /// Every log line not read yet.
    pub fn log_so_far(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    /// Sends a signal (`-TERM`, `-INT`, …) with `kill`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// The exit status if the server has exited (it is then reaped), `None` while it runs.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().expect("wait for server")?;
        self.child = None;
        Some(status)
    }

    /// Waits up to `DEADLINE` for the server to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().expect("wait for server") {
                self.child = None;
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit within {DEADLINE:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
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
