//! The servers under test, each a child process on a free loopback port, so both are measured
//! the same way: CPU and memory from /proc.

use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use rustls::ClientConfig;

use super::tls::TestCerts;
use super::{die, end_with_bench};

pub const PEERCHAT: &str = env!("CARGO_BIN_EXE_peerchat-server");
/// How long a server may take to say where it listens (with persistence it may first wait
/// for the database).
const LISTENING_DEADLINE: Duration = Duration::from_secs(30);

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
    /// Where clients connect: the plain port, or the TLS port for a server started over TLS
    /// (it then serves TLS only).
    pub addr: SocketAddr,
    /// For a server started over TLS: how clients connect (trusting the bench's CA).
    pub tls: Option<Arc<ClientConfig>>,
    child: Child,
    /// The certificate files the server loaded; removed after the server is killed.
    _certs: Option<TestCerts>,
    /// peerchat's WARN and ERROR log lines so far (the first `MAX_WARNINGS`).
    warnings: Arc<Mutex<Vec<String>>>,
}

/// Warning lines kept per server: enough to say what went wrong, bounded if it repeats.
const MAX_WARNINGS: usize = 50;

impl ServerProcess {
    /// Starts `peerchat-server` on a free port with flood control off (the generator sends far
    /// above a person's rate) and room for 10 000 idle clients. `extra` adds flags.
    pub fn peerchat<S: AsRef<OsStr>>(extra: &[S]) -> ServerProcess {
        ServerProcess::peerchat_over(extra, false)
    }

    /// Like `peerchat`, but serving TLS only (`--tls-port 0 --no-plain`) with a certificate made
    /// for this run.
    pub fn peerchat_tls<S: AsRef<OsStr>>(extra: &[S]) -> ServerProcess {
        ServerProcess::peerchat_over(extra, true)
    }

    fn peerchat_over<S: AsRef<OsStr>>(extra: &[S], over_tls: bool) -> ServerProcess {
        let certs = over_tls.then(TestCerts::new);
        let mut command = Command::new(PEERCHAT);
        command.args([
            "--port",
            "0",
            "--flood-rate",
            "0",
            "--max-clients",
            "100000",
        ]);
        if let Some(certs) = &certs {
            command
                .args(["--tls-port", "0", "--no-plain", "--tls-cert"])
                .arg(&certs.chain)
                .arg("--tls-key")
                .arg(&certs.key);
        }
        let mut child = end_with_bench(
            command
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
            libc::SIGKILL,
        )
        .spawn()
        .unwrap_or_else(|err| die(&format!("cannot start {PEERCHAT}: {err}")));
        // `listening on ADDR (backlog 1024)`, or `listening on ADDR (TLS, backlog 1024)`.
        let wanted = "listening on ";
        // The log is read on a thread of its own, which keeps draining it so the server never
        // blocks on a full pipe, and hands its lines over here until the address is found.
        // Warnings and errors are kept for the bench to show (`warnings`).
        let (lines, log) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let warnings = Arc::new(Mutex::new(Vec::new()));
        let kept = warnings.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains(" WARN ") || line.contains(" ERROR ") {
                    let mut kept = kept.lock().unwrap_or_else(PoisonError::into_inner);
                    if kept.len() < MAX_WARNINGS {
                        kept.push(line.clone());
                    }
                }
                let _ = lines.send(line);
            }
        });
        let deadline = Instant::now() + LISTENING_DEADLINE;
        // What it logged before, to show if it never says where it listens.
        let mut before = Vec::new();
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match log.recv_timeout(left) {
                Ok(line) => line,
                Err(err) => {
                    let why = match err {
                        RecvTimeoutError::Timeout => "did not log",
                        RecvTimeoutError::Disconnected => "exited before logging",
                    };
                    let hint = if over_tls {
                        " (does this build have the TLS listener?)"
                    } else {
                        ""
                    };
                    let logged: String = before.iter().map(|l| format!("\n  {l}")).collect();
                    die(&format!(
                        "peerchat-server {why} `{wanted}ADDR` within {} s{hint}; it logged:{logged}",
                        LISTENING_DEADLINE.as_secs()
                    ));
                }
            };
            if let Some(rest) = line.split(wanted).nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                break addr.parse().unwrap_or_else(|_| {
                    die(&format!("no address in the server's log line `{line}`"))
                });
            }
            before.push(line);
        };
        ServerProcess {
            kind: Kind::Peerchat,
            addr,
            tls: certs.as_ref().map(TestCerts::client_config),
            child,
            _certs: certs,
            warnings,
        }
    }

    /// Starts a `redis-server` configured as the issue asks: no persistence, no output limit
    /// for pub/sub clients (peerchat's own limit is generous too). Over TLS it serves TLS only
    /// (`--port 0 --tls-port P`), with the bench's certificate and no client certificates
    /// asked for. `None` if it is not installed.
    pub fn redis(over_tls: bool) -> Option<ServerProcess> {
        let port = free_port().to_string();
        let certs = over_tls.then(TestCerts::new);
        let mut command = Command::new("redis-server");
        match &certs {
            None => command.args(["--port", &port]),
            Some(certs) => command
                .args(["--port", "0", "--tls-port", &port, "--tls-cert-file"])
                .arg(&certs.chain)
                .arg("--tls-key-file")
                .arg(&certs.key)
                .arg("--tls-ca-cert-file")
                .arg(&certs.ca)
                .args(["--tls-auth-clients", "no"]),
        };
        let mut child = end_with_bench(
            command
                .args(["--bind", "127.0.0.1"])
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
        let addr: SocketAddr = ([127, 0, 0, 1], port.parse().unwrap()).into();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                die(&format!(
                    "redis-server exited at start ({status}){}",
                    if over_tls {
                        "; was it built without TLS? (Debian's and Ubuntu's have it)"
                    } else {
                        ""
                    }
                ));
            }
            if Instant::now() > deadline {
                die("redis-server did not start listening within 10 s");
            }
            thread::sleep(Duration::from_millis(20));
        }
        Some(ServerProcess {
            kind: Kind::Redis,
            addr,
            tls: certs.as_ref().map(TestCerts::client_config),
            child,
            _certs: certs,
            warnings: Arc::default(),
        })
    }

    /// Starts a server of `kind`; peerchat without persistence.
    pub fn start(kind: Kind) -> ServerProcess {
        ServerProcess::start_over(kind, false)
    }

    /// Starts a server of `kind` serving plain TCP, or TLS only; peerchat without persistence.
    pub fn start_over(kind: Kind, over_tls: bool) -> ServerProcess {
        match kind {
            Kind::Peerchat => ServerProcess::peerchat_over(&["--no-persist"], over_tls),
            Kind::Redis => ServerProcess::redis(over_tls).unwrap_or_else(|| die(REDIS_MISSING)),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The WARN and ERROR lines peerchat has logged so far (none for Redis).
    pub fn warnings(&self) -> Vec<String> {
        self.warnings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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
