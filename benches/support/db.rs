//! The database for benches with persistence on: the same SecantusDB the tests use (installed
//! into `.venv/` by `scripts/ensure-secantusdb.sh` on first use), a new process in memory on a
//! free loopback port for each `TestDatabase`, or the MongoDB named by
//! `PEERCHAT_BENCH_MONGO_URI`, which every `TestDatabase` then shares, each with a database
//! name of its own that is dropped at the end.
//!
//! SecantusDB slows down as it fills (past 100 000 documents it prunes its oplog on every
//! write, and its cost per call keeps growing), so a bench that compares measurements starts a
//! new `TestDatabase` for each; otherwise whichever ran later would look slower.

use std::fmt::Display;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use mongodb::bson::{doc, Document};
use mongodb::options::ClientOptions;
use mongodb::sync::{Client, Collection};
use peerchat::config::DEFAULT_MONGO_TIMEOUT_MS;
use peerchat::persist::redact_uri;

use super::{die, end_with_bench, fail};

pub const URI_ENV: &str = "PEERCHAT_BENCH_MONGO_URI";

/// A database call that has not returned after this long is stuck; see `bounded`.
const STALL: Duration = Duration::from_secs(30);

/// A database nothing has been stored in yet. Dropping it stops our SecantusDB (SIGTERM, so it
/// removes its temporary directory) or drops the database on the shared server.
pub struct TestDatabase {
    pub uri: String,
    /// The database name to store in.
    pub name: String,
    client: Client,
    /// Our SecantusDB; `None` on the server named by `PEERCHAT_BENCH_MONGO_URI`.
    process: Option<Child>,
}

impl TestDatabase {
    /// A new SecantusDB, or a new database name on `PEERCHAT_BENCH_MONGO_URI`; checked to
    /// answer. Call it from the main thread: our SecantusDB is stopped when the thread that
    /// started it ends (see `end_with_bench`).
    pub fn start() -> TestDatabase {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "peerchat_bench_{}_{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        );
        let (uri, process) = match std::env::var(URI_ENV) {
            Ok(uri) if !uri.is_empty() => (uri, None),
            _ => {
                let (child, port) = start_secantusdb();
                (format!("mongodb://127.0.0.1:{port}"), Some(child))
            }
        };
        let database = TestDatabase {
            client: client(&options(&uri)),
            uri,
            name,
            process,
        };
        let ping = bounded("ping", || {
            database
                .client
                .database("admin")
                .run_command(doc! { "ping": 1 })
                .run()
        });
        if let Err(err) = ping {
            die(&format!(
                "the database at {} does not answer: {err}\n{HOW_TO}",
                database.described()
            ));
        }
        database
    }

    /// For output and results: no password, no port that changes from run to run.
    pub fn described(&self) -> String {
        match self.process {
            Some(_) => "own SecantusDB (--storage-path :memory:)".to_string(),
            None => format!("{URI_ENV}={}", redact_uri(&self.uri)),
        }
    }

    pub fn is_own_secantusdb(&self) -> bool {
        self.process.is_some()
    }

    /// Our SecantusDB's process id, for its CPU time; `None` on `PEERCHAT_BENCH_MONGO_URI`.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }

    /// Runs `command` against the `admin` database (e.g. `serverStatus`), bounded like every
    /// other call.
    pub fn admin_command(&self, what: &'static str, command: Document) -> Document {
        call(what, || {
            self.client.database("admin").run_command(command).run()
        })
    }

    /// The `peerchat-server` flags that store into this database.
    pub fn server_flags(&self) -> Vec<String> {
        ["--mongo-uri", &self.uri, "--mongo-db", &self.name]
            .map(String::from)
            .to_vec()
    }

    /// The URI's driver options with the benches' timeouts, for a client of one's own (e.g.
    /// with another write concern).
    pub fn client_options(&self) -> ClientOptions {
        options(&self.uri)
    }

    /// `name` in this database, written to with the URI's write concern.
    pub fn collection(&self, name: &str) -> Collection<Document> {
        self.client.database(&self.name).collection(name)
    }

    /// Documents in `collection`.
    pub fn count(&self, collection: &str) -> u64 {
        call("count_documents", || {
            self.collection(collection).count_documents(doc! {}).run()
        })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        match self.process.take() {
            Some(mut child) => stop_secantusdb(&mut child),
            None => {
                let dropped = bounded("dropping the bench database", || {
                    self.client.database(&self.name).drop().run()
                });
                if let Err(err) = dropped {
                    eprintln!("bench: cannot drop database {}: {err}", self.name);
                }
            }
        }
    }
}

/// Runs `call`, a database call, and ends the bench loudly (exit 1) if it has not returned
/// within `STALL`. The driver times out connecting and server selection, and cuts off calls to
/// a database whose heartbeat stops (a stopped process: ~14 s), but it has no socket or
/// operation timeout: a database that answers heartbeats yet never answers the call (a write
/// blocked on a lock) would hang the bench, so a watchdog thread bounds every call. One call
/// at a time: the benches talk to the database from one thread.
fn bounded<T>(what: &'static str, call: impl FnOnce() -> T) -> T {
    static RUNNING: Mutex<Option<(&'static str, Instant)>> = Mutex::new(None);
    static WATCHDOG: Once = Once::new();
    let running = || RUNNING.lock().unwrap_or_else(PoisonError::into_inner);
    WATCHDOG.call_once(|| {
        thread::spawn(move || loop {
            thread::sleep(Duration::from_millis(100));
            if let Some((what, deadline)) = *running() {
                if Instant::now() > deadline {
                    fail(&format!(
                        "{what} got no answer within {STALL:?}: the database is stuck"
                    ));
                }
            }
        });
    });
    *running() = Some((what, Instant::now() + STALL));
    let result = call();
    *running() = None;
    result
}

/// `bounded`, and an error ends the bench (exit 1) too.
pub fn call<T, E: Display>(what: &'static str, call: impl FnOnce() -> Result<T, E>) -> T {
    bounded(what, call).unwrap_or_else(|err| fail(&format!("{what}: {err}")))
}

fn options(uri: &str) -> ClientOptions {
    let mut options = ClientOptions::parse(uri)
        .run()
        .unwrap_or_else(|err| die(&format!("bad database URI {}: {err}", redact_uri(uri))));
    let timeout = Duration::from_millis(DEFAULT_MONGO_TIMEOUT_MS);
    options.server_selection_timeout = Some(timeout);
    options.connect_timeout = Some(timeout);
    options
}

pub fn client(options: &ClientOptions) -> Client {
    Client::with_options(options.clone())
        .unwrap_or_else(|err| die(&format!("cannot make a database client: {err}")))
}

const HOW_TO: &str = "The persistence benches need a MongoDB-compatible server: either let the \
bench install SecantusDB (scripts/ensure-secantusdb.sh needs python3 and python3-venv, and PyPI \
the first time) or set PEERCHAT_BENCH_MONGO_URI=mongodb://host:port to use a running MongoDB \
(the bench makes databases of its own there and drops them).";

/// Starts SecantusDB in memory on a free loopback port; returns it and the port once it
/// listens.
fn start_secantusdb() -> (Child, u16) {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .unwrap_or_else(|err| die(&format!("cannot find a free port: {err}")))
        .port();
    let mut child = end_with_bench(
        Command::new(secantusd_path())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--storage-path",
                &storage_path(port),
                "--log-level",
                "WARNING",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
        libc::SIGTERM,
    )
    .spawn()
    .unwrap_or_else(|err| die(&format!("cannot start SecantusDB: {err}\n{HOW_TO}")));
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            die(&format!("SecantusDB exited at start ({status})\n{HOW_TO}"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            die(&format!("SecantusDB did not start within 30 s\n{HOW_TO}"));
        }
        thread::sleep(Duration::from_millis(50));
    }
    (child, port)
}

/// Stops our SecantusDB and waits for it: SIGTERM, so that it removes its temporary directory
/// (it takes 0.3 to 2 s). Only one: a second SIGTERM during its shutdown can deadlock it, which
/// is why this waits rather than leaving it to stop in the background. Killed if it is still
/// there after 10 s.
fn stop_secantusdb(child: &mut Child) {
    // SAFETY: kill only sends a signal, to a child we have not waited for yet.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    if !exited_within(child, Duration::from_secs(10)) {
        eprintln!("bench: SecantusDB did not stop within 10 s of SIGTERM; killing it");
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// `secantusd-py`: `PEERCHAT_SECANTUSD` if set (as for the tests: a checkout or worktree
/// without a `.venv` of its own can use another's), else installed into the project's `.venv`
/// by the same script the tests use, once per bench run.
/// `:memory:` for secantusd-py. secantusd-rs (`PEERCHAT_SECANTUSD=…/secantusd-rs`) takes the
/// same flags but would make a directory called `:memory:` where the bench runs: it gets a
/// directory of its own under the system's temporary directory instead, emptied first.
fn storage_path(port: u16) -> String {
    let is_rs = Path::new(secantusd_path())
        .file_name()
        .is_some_and(|name| name.to_string_lossy().starts_with("secantusd-rs"));
    if !is_rs {
        return ":memory:".to_string();
    }
    let dir = std::env::temp_dir().join(format!("peerchat-bench-db-{port}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir.to_string_lossy().into_owned()
}

fn secantusd_path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Ok(path) = std::env::var("PEERCHAT_SECANTUSD") {
            if !path.is_empty() {
                return path;
            }
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ensure-secantusdb.sh");
        // It prints only the path on stdout (pip's output goes to stderr), so the pipe never
        // fills while we wait.
        let mut child = Command::new(script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| die(&format!("cannot run {script}: {err}\n{HOW_TO}")));
        if !exited_within(&mut child, Duration::from_secs(600)) {
            let _ = child.kill();
            die(&format!(
                "{script} did not finish within 10 minutes\n{HOW_TO}"
            ));
        }
        let output = child
            .wait_with_output()
            .unwrap_or_else(|err| die(&format!("{script}: {err}")));
        let path = String::from_utf8_lossy(&output.stdout).trim().to_string();
        if !output.status.success() || path.is_empty() {
            die(&format!("{script} failed ({})\n{HOW_TO}", output.status));
        }
        path
    })
}

/// Waits up to `limit` for `child` to exit; false if it is still running.
fn exited_within(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            Ok(None) => return false,
            Ok(Some(_)) | Err(_) => return true,
        }
    }
}
