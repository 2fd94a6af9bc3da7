//! The database for benches with persistence on: the same SecantusDB the tests use, started on
//! a free loopback port (installed by `scripts/ensure-secantusdb.sh` on first use), or the
//! MongoDB named by `PEERCHAT_BENCH_MONGO_URI`.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use mongodb::bson::{doc, Document};
use mongodb::options::ClientOptions;
use mongodb::sync::{Client, Collection};

use super::die;

pub const URI_ENV: &str = "PEERCHAT_BENCH_MONGO_URI";

/// A database for one bench run; an owned SecantusDB is killed when dropped.
pub struct TestDatabase {
    pub uri: String,
    /// A fresh database name, so runs never see each other's documents.
    pub name: String,
    process: Option<Child>,
}

impl TestDatabase {
    pub fn start() -> TestDatabase {
        let name = format!("peerchat_bench_{}", std::process::id());
        if let Ok(uri) = std::env::var(URI_ENV) {
            return TestDatabase {
                uri,
                name,
                process: None,
            };
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(secantusd_path())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--storage-path", ":memory:", "--log-level", "WARNING"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| die(&format!("cannot start SecantusDB: {err}\n{HOW_TO}")));
        let database = TestDatabase {
            uri: format!("mongodb://127.0.0.1:{port}"),
            name,
            process: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                die(&format!("SecantusDB did not start within 30 s\n{HOW_TO}"));
            }
            thread::sleep(Duration::from_millis(50));
        }
        database
    }

    /// The `peerchat-server` flags that store into this database.
    pub fn server_flags(&self) -> Vec<String> {
        ["--mongo-uri", &self.uri, "--mongo-db", &self.name]
            .map(String::from)
            .to_vec()
    }

    pub fn client(&self) -> Client {
        let mut options = ClientOptions::parse(&self.uri)
            .run()
            .unwrap_or_else(|err| die(&format!("bad database URI {}: {err}", self.uri)));
        options.server_selection_timeout = Some(Duration::from_secs(10));
        Client::with_options(options).expect("database client")
    }

    pub fn collection(&self, name: &str) -> Collection<Document> {
        self.client().database(&self.name).collection(name)
    }

    /// Documents in `collection`.
    pub fn count(&self, collection: &str) -> u64 {
        self.collection(collection)
            .count_documents(doc! {})
            .run()
            .unwrap_or_else(|err| die(&format!("cannot count stored documents: {err}")))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        match &mut self.process {
            Some(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            None => {
                let _ = self.client().database(&self.name).drop().run();
            }
        }
    }
}

const HOW_TO: &str = "The persistence benches need a MongoDB-compatible server: either let the \
bench install SecantusDB (scripts/ensure-secantusdb.sh needs python3 and python3-venv) or set \
PEERCHAT_BENCH_MONGO_URI=mongodb://host:port to use a running MongoDB.";

/// `secantusd-py`, installed into the project's `.venv` by the same script the tests use.
fn secantusd_path() -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ensure-secantusdb.sh");
    let output = Command::new(script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|err| die(&format!("cannot run {script}: {err}\n{HOW_TO}")));
    if !output.status.success() {
        die(&format!("{script} failed\n{HOW_TO}"));
    }
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}
