//! The servers under test, each a child process on a free loopback port, so both are measured
//! the same way: CPU and memory from /proc.

use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{die, end_with_bench};

pub const PEERCHAT: &str = env!("CARGO_BIN_EXE_peerchat-server");

/// Which server, and so which wire protocol the load generator speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Newline-delimited chat lines; the server prefixes `<nick> `.
    Peerchat,
    /// Redis pub/sub over RESP: `SUBSCRIBE chat` / `PUBLISH chat payload`.
    Redis,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Peerchat => "peerchat",
            Kind::Redis => "redis",
        }
    }
}

/// A running server; killed when dropped.
pub struct ServerProcess {
    pub kind: Kind,
    pub addr: SocketAddr,
    child: Child,
}

impl ServerProcess {
    /// Starts `peerchat-server` on a free port with flood control off (the generator sends far
    /// above a person's rate) and room for 10 000 idle clients. `extra` adds flags.
    pub fn peerchat<S: AsRef<OsStr>>(extra: &[S]) -> ServerProcess {
        let mut child = end_with_bench(
            Command::new(PEERCHAT)
                .args([
                    "--port",
                    "0",
                    "--flood-rate",
                    "0",
                    "--max-clients",
                    "100000",
                ])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
            libc::SIGKILL,
        )
        .spawn()
        .unwrap_or_else(|err| die(&format!("cannot start {PEERCHAT}: {err}")));
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .and_then(Result::ok)
                .unwrap_or_else(|| die("peerchat-server exited before listening"));
            // `listening on ADDR`, possibly followed by more (e.g. `(backlog 1024)`).
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                break addr.parse().unwrap_or_else(|_| {
                    die(&format!("no address in the server's log line `{line}`"))
                });
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        thread::spawn(move || lines.for_each(drop));
        ServerProcess {
            kind: Kind::Peerchat,
            addr,
            child,
        }
    }

    /// Starts a `redis-server` configured as the issue asks: no persistence, no output limit
    /// for pub/sub clients (peerchat's own limit is generous too). `None` if it is not installed.
    pub fn redis() -> Option<ServerProcess> {
        let port = free_port();
        let child = end_with_bench(
            Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--client-output-buffer-limit", "pubsub 0 0 0"])
                .args(["--maxclients", "100000", "--protected-mode", "no"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            libc::SIGKILL,
        )
        .spawn()
        .ok()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let server = ServerProcess {
            kind: Kind::Redis,
            addr,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                die("redis-server did not start listening within 10 s");
            }
            thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    /// Starts a server of `kind`; peerchat without persistence.
    pub fn start(kind: Kind) -> ServerProcess {
        match kind {
            Kind::Peerchat => ServerProcess::peerchat(&["--no-persist"]),
            Kind::Redis => ServerProcess::redis().unwrap_or_else(|| die(REDIS_MISSING)),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User + system CPU seconds so far.
    pub fn cpu_seconds(&self) -> f64 {
        super::stats::cpu_seconds(&format!("/proc/{}/stat", self.child.id()))
    }

    /// A `/proc/PID/status` figure in KiB, e.g. `VmRSS` or `VmHWM` (peak).
    pub fn memory_kib(&self, field: &str) -> u64 {
        let status =
            fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const REDIS_MISSING: &str = "redis-server is not installed, so there is no Redis column. \
Install it with `apt-get install redis-server` (Debian/Ubuntu; stop the service it starts with \
`systemctl stop redis-server` if you like: the bench starts its own instance).";

/// True if `redis-server` can be started.
pub fn redis_available() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().unwrap().port()
}
