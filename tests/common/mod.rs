//! Shared test fixtures: a real MongoDB-wire server, an in-process peerchat server, and a line
//! client with bounded waits. Every wait here has a deadline, so a broken server fails a test
//! instead of hanging it.

#![allow(dead_code)] // each test file uses a different part of this module

pub mod certs;
pub mod process;
pub mod proxy;
pub mod pty;
pub mod tls;

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bson::{doc, Document};
use mongodb::options::ClientOptions;
use mongodb::sync::{Client, Collection};
use peerchat::{RunningServer, Server, ServerConfig, StoreConfig};

/// How long any single expected event may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// Environment variable naming an external MongoDB for the tests.
pub const TEST_URI_ENV: &str = "PEERCHAT_TEST_MONGO_URI";

/// Starts a server on a free loopback port, on its own thread. Its INFO lines (one per
/// connection) are silenced; warnings still show.
pub fn start_server(config: ServerConfig) -> RunningServer {
    peerchat::log::set_min_level(peerchat::log::Level::Warn);
    Server::bind(config)
        .expect("bind test server")
        .spawn()
        .expect("spawn test server")
}

/// A server without persistence.
pub fn start_chat_only() -> RunningServer {
    start_server(ServerConfig::local(None))
}

/// A server without persistence or flood control, for tests that send faster than a person.
pub fn start_without_flood_limit() -> RunningServer {
    let mut config = ServerConfig::local(None);
    config.limits.flood = None;
    start_server(config)
}

// ---------------------------------------------------------------------------------------------
// Line client

/// A test client speaking the line protocol over a real socket.
pub struct Chat {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The name the server gave this client (`IP:PORT`, or the nick once set).
    pub name: String,
}

impl Chat {
    /// Connects and reads the welcome line.
    pub fn connect(addr: SocketAddr) -> Chat {
        Chat::over(TcpStream::connect(addr).expect("connect to server"))
    }

    /// A client on a socket already connected to the server; reads the welcome line.
    pub fn over(writer: TcpStream) -> Chat {
        let reader = BufReader::new(writer.try_clone().expect("clone socket"));
        let mut chat = Chat {
            reader,
            writer,
            name: String::new(),
        };
        chat.name = name_in_welcome(&chat.line());
        assert_eq!(chat.name, chat.local_addr().to_string());
        chat
    }

    /// Connects and sets a nick, waiting for the server to confirm it.
    pub fn named(addr: SocketAddr, nick: &str) -> Chat {
        let mut chat = Chat::connect(addr);
        chat.send(&format!("/nick {nick}"));
        let confirmation = format!("* {} is now {nick}", chat.name);
        chat.wait_for(|line| line == confirmation);
        chat.name = nick.to_string();
        chat
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.writer.local_addr().unwrap()
    }

    /// Sends one line, adding `\n`.
    pub fn send(&mut self, line: &str) {
        self.send_bytes(format!("{line}\n").as_bytes());
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send to server");
    }

    /// The next line (without `\r\n`); fails the test after `DEADLINE`.
    pub fn line(&mut self) -> String {
        self.try_line(DEADLINE)
            .unwrap_or_else(|| panic!("{}: no line from the server within {DEADLINE:?}", self.name))
    }

    /// The next line if one arrives within `wait`; `None` on timeout. Panics on EOF.
    pub fn try_line(&mut self, wait: Duration) -> Option<String> {
        self.reader.get_ref().set_read_timeout(Some(wait)).unwrap();
        let mut raw = Vec::new();
        match self.reader.read_until(b'\n', &mut raw) {
            Ok(0) => panic!("{}: server closed the connection", self.name),
            Ok(_) => {
                assert!(
                    raw.ends_with(b"\r\n"),
                    "server lines end with CRLF: {raw:?}"
                );
                raw.truncate(raw.len() - 2);
                Some(String::from_utf8(raw).expect("server sends UTF-8"))
            }
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                assert!(raw.is_empty(), "partial line {raw:?} after {wait:?}");
                None
            }
            Err(err) => panic!("{}: read failed: {err}", self.name),
        }
    }

    /// Reads lines until one matches, returning it; lines before it are skipped.
    pub fn wait_for(&mut self, mut wanted: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if let Some(line) = self.try_line(deadline - Instant::now()) {
                if wanted(&line) {
                    return line;
                }
            }
        }
        panic!(
            "{}: expected line did not arrive within {DEADLINE:?}",
            self.name
        );
    }

    /// Round trip through the server: returns every line that arrived before the `/who` reply.
    /// Lines are delivered in order per connection, so afterwards everything the server queued
    /// for this client before the `/who` has been read.
    pub fn sync(&mut self) -> Vec<String> {
        self.send("/who");
        let mut before = Vec::new();
        loop {
            let line = self.line();
            if line.starts_with("* ") && line.contains(" online: ") {
                return before;
            }
            before.push(line);
        }
    }

    /// Closes the sending half: the server sees end of input, the client can still read.
    pub fn shutdown_write(&self) {
        self.writer
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown write");
    }

    /// Closes the connection with a reset (SO_LINGER 0) instead of a FIN, as a crashed client
    /// or a middlebox would.
    pub fn reset(self) {
        use std::os::fd::AsRawFd;
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt reads `linger` only, and the descriptor is this open socket.
        let status = unsafe {
            libc::setsockopt(
                self.writer.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(status, 0, "setsockopt SO_LINGER");
    }

    /// The socket, for tests that read raw bytes. Nothing may be left in the line buffer.
    pub fn into_stream(self) -> TcpStream {
        assert!(self.reader.buffer().is_empty(), "unread lines left");
        self.writer
    }

    /// Reads until the server closes the connection, returning the lines seen.
    pub fn read_to_end(&mut self) -> Vec<String> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(DEADLINE))
            .unwrap();
        let mut lines = Vec::new();
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match self.reader.read_until(b'\n', &mut raw) {
                Ok(0) => return lines,
                Ok(_) => lines.push(String::from_utf8_lossy(&raw).trim_end().to_string()),
                Err(err) if err.kind() == ErrorKind::ConnectionReset => return lines,
                Err(err) => panic!("{}: waiting for close: {err}", self.name),
            }
        }
    }
}

/// The name the server gave a new client, from its welcome line.
pub fn name_in_welcome(welcome: &str) -> String {
    let rest = welcome
        .strip_prefix("* welcome, you are ")
        .unwrap_or_else(|| panic!("expected a welcome line, got {welcome:?}"));
    rest.split(' ').next().unwrap().to_string()
}

/// Two clients named alice and bob, connected in that order, with every join and rename
/// notice already read.
pub fn alice_and_bob(addr: SocketAddr) -> (Chat, Chat) {
    let mut alice = Chat::named(addr, "alice");
    let bob = Chat::named(addr, "bob");
    alice.sync();
    (alice, bob)
}

// ---------------------------------------------------------------------------------------------
// MongoDB-wire test server

/// A database for one test: a SecantusDB process this test owns, or the external server named
/// by `PEERCHAT_TEST_MONGO_URI`. Each test gets its own database name, so tests can share one
/// external server.
pub struct TestDb {
    pub uri: String,
    pub database: String,
    port: u16,
    process: Option<Child>,
    owned: bool,
    /// Data directory of an on-disk database, which keeps its data across `restart`; `None`
    /// for an in-memory one, which starts empty each time.
    data_dir: Option<PathBuf>,
    /// Started with `--standalone`: no replica set, so no change streams.
    standalone: bool,
}

static DB_COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique_db_name() -> String {
    format!(
        "peerchat_test_{}_{}",
        std::process::id(),
        DB_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl TestDb {
    /// The external database if one is given, else a fresh SecantusDB.
    pub fn start() -> TestDb {
        match std::env::var(TEST_URI_ENV) {
            Ok(uri) if !uri.is_empty() => TestDb {
                uri,
                database: unique_db_name(),
                port: 0,
                process: None,
                owned: false,
                data_dir: None,
                standalone: false,
            },
            _ => TestDb::start_own(),
        }
    }

    /// A SecantusDB process of this test's own, for tests that stop and restart the database
    /// (an external server cannot be stopped from here).
    pub fn start_own() -> TestDb {
        let mut db = TestDb::reserve_own();
        db.restart();
        db
    }

    /// A database address on a free port with nothing listening yet; `restart` starts it.
    pub fn reserve_own() -> TestDb {
        let port = free_port();
        TestDb {
            uri: format!("mongodb://127.0.0.1:{port}"),
            database: unique_db_name(),
            port,
            process: None,
            owned: true,
            data_dir: None,
            standalone: false,
        }
    }

    /// A SecantusDB of this test's own that presents itself as a standalone server instead of
    /// a one-member replica set, as a plain `mongod` would: it serves no change streams.
    pub fn start_own_standalone() -> TestDb {
        let mut db = TestDb::reserve_own();
        db.standalone = true;
        db.restart();
        db
    }

    /// Like `start_own`, but the data is kept on disk, so what was stored before a `kill`
    /// is still there after `restart`: for checking that nothing is lost or stored twice.
    pub fn start_own_on_disk() -> TestDb {
        let mut db = TestDb::reserve_own();
        let dir = std::env::temp_dir().join(format!("peerchat-{}", db.database));
        std::fs::create_dir_all(&dir).expect("create database directory");
        db.data_dir = Some(dir);
        db.restart();
        db
    }

    /// Store settings for a peerchat server using this database. The timeout is shorter than
    /// the default so outage tests finish quickly.
    pub fn store_config(&self) -> StoreConfig {
        let mut config = StoreConfig::new(&self.uri);
        config.database = self.database.clone();
        config.timeout = Duration::from_millis(1000);
        config
    }

    /// Kills the database process at once (no clean shutdown), as a crash would.
    pub fn kill(&mut self) {
        assert!(
            self.owned,
            "only a database this test started can be killed"
        );
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the database process (SIGSTOP): connections stay open but nothing answers, like
    /// a hung server.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen database run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.process.as_ref().expect("an owned, running database");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Starts (or starts again) the owned database on its port and waits until it answers.
    pub fn restart(&mut self) {
        assert!(self.owned && self.process.is_none());
        let exe = secantusd_path();
        let storage = match &self.data_dir {
            Some(dir) => dir.to_str().expect("UTF-8 temp path").to_string(),
            None => ":memory:".to_string(),
        };
        let mut child = Command::new(&exe)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--storage-path", &storage, "--enable-test-commands"])
            .args(["--log-level", "WARNING"])
            .args(self.standalone.then_some("--standalone"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|err| {
                panic!("cannot start {}: {err}\n{}", exe.display(), HOW_TO_GET_A_DB)
            });
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("SecantusDB exited at start ({status})\n{HOW_TO_GET_A_DB}");
            }
            assert!(
                Instant::now() < deadline,
                "SecantusDB did not start within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.process = Some(child);
    }

    /// A driver client for checking what was stored.
    pub fn client(&self) -> Client {
        let mut options = ClientOptions::parse(&self.uri)
            .run()
            .expect("parse test URI");
        options.server_selection_timeout = Some(Duration::from_secs(10));
        Client::with_options(options).expect("test database client")
    }

    pub fn messages(&self) -> Collection<Document> {
        self.client()
            .database(&self.database)
            .collection("messages")
    }

    /// Every stored message, oldest first.
    pub fn stored(&self) -> Vec<Document> {
        self.messages()
            .find(doc! {})
            .sort(doc! { "timestamp": 1, "_id": 1 })
            .run()
            .expect("query stored messages")
            .collect::<Result<Vec<_>, _>>()
            .expect("read stored messages")
    }

    /// Waits until at least `count` messages are stored and returns them all.
    pub fn wait_for_stored(&self, count: usize) -> Vec<Document> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let stored = self.stored();
            if stored.len() >= count {
                return stored;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {count} messages stored after {DEADLINE:?}",
                stored.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Makes every `insert` fail with `code` until turned off (needs test commands enabled).
    pub fn fail_inserts(&self, code: Option<i32>) {
        self.insert_failpoint(code.map(|code| doc! { "errorCode": code }));
    }

    /// Makes every `insert` wait `millis` before it runs, like a database under heavy load,
    /// until turned off with `None`.
    pub fn slow_inserts(&self, millis: Option<i32>) {
        self.insert_failpoint(
            millis.map(|millis| doc! { "blockConnection": true, "blockTimeMS": millis }),
        );
    }

    /// Makes the next `times` `command`s (any client's) fail with `code`, then turns itself off.
    pub fn fail_next(&self, command: &str, code: i32, times: i32) {
        self.fail_next_after(command, code, times, 0);
    }

    /// As `fail_next`, each failing call first held for `block_ms` (0: none).
    pub fn fail_next_after(&self, command: &str, code: i32, times: i32, block_ms: i32) {
        let mut data = doc! { "failCommands": [command], "errorCode": code };
        if block_ms > 0 {
            data.insert("blockConnection", true);
            data.insert("blockTimeMS", block_ms);
        }
        self.client()
            .database("admin")
            .run_command(doc! {
                "configureFailPoint": "failCommand", "mode": { "times": times }, "data": data,
            })
            .run()
            .expect("configureFailPoint (is the server started with --enable-test-commands?)");
    }

    /// Turns the `failCommand` failpoint on for inserts with `behaviour`, or off with `None`.
    fn insert_failpoint(&self, behaviour: Option<Document>) {
        let command = match behaviour {
            Some(mut data) => {
                data.insert("failCommands", vec!["insert"]);
                doc! { "configureFailPoint": "failCommand", "mode": "alwaysOn", "data": data }
            }
            None => doc! { "configureFailPoint": "failCommand", "mode": "off" },
        };
        self.client()
            .database("admin")
            .run_command(command)
            .run()
            .expect("configureFailPoint (is the server started with --enable-test-commands?)");
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.owned {
            self.kill();
            if let Some(dir) = &self.data_dir {
                let _ = std::fs::remove_dir_all(dir);
            }
        } else {
            let _ = self.client().database(&self.database).drop().run();
        }
    }
}

const HOW_TO_GET_A_DB: &str = "\
The database tests need a MongoDB-wire server. Either:
  - run the README's test command (scripts/test.sh), which installs SecantusDB into .venv/, or
  - pip install secantusdb==0.7.0b3 and set PEERCHAT_SECANTUSD=/path/to/secantusd-py, or
  - set PEERCHAT_TEST_MONGO_URI=mongodb://host:port to use a running mongod (tests that stop
    the database still start their own SecantusDB).";

/// Where `secantusd-py` is: `PEERCHAT_SECANTUSD`, the project's `.venv`, or `PATH`.
fn secantusd_path() -> PathBuf {
    if let Ok(path) = std::env::var("PEERCHAT_SECANTUSD") {
        return PathBuf::from(path);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/secantusd-py");
    if venv.exists() {
        return venv;
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("secantusd-py"))
            .find(|candidate| candidate.exists())
    });
    on_path.unwrap_or_else(|| panic!("secantusd-py not found.\n{HOW_TO_GET_A_DB}"))
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("find a free port")
}
