//! Persistence: one thread that stores chat messages in MongoDB, in batches.
//!
//! The event loop never calls the driver. It hands each message to this thread through a
//! bounded queue (`try_send`, so a full queue fails the message at once instead of stalling the
//! chat). The thread takes everything queued, inserts it with one unordered `insert_many`, and
//! sends the messages that could not be stored back to the loop through its inbox.
//!
//! Each message gets its `_id` when it is accepted, so a batch sent again after a lost reply
//! cannot store anything twice: the duplicate key error (11000) it gets means "already saved".

use std::net::SocketAddr;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use mongodb::error::{Error as DbError, ErrorKind, WriteFailure};
use mongodb::options::ClientOptions;
use mongodb::sync::{Client, Collection};
use mongodb::IndexModel;
use time::OffsetDateTime;

use crate::config::StoreConfig;
use crate::server::inbox::{ClientRef, LoopInput, LoopSender, SaveFailure};
use crate::{info, warn};

/// Most documents in one `insert_many`: large enough to amortise a round trip, small enough
/// that one batch stays far below MongoDB's 48 MB message limit at the longest lines.
pub const MAX_BATCH: usize = 1000;

/// MongoDB's duplicate key error: the document with this `_id` is already stored.
const DUPLICATE_KEY: i32 = 11000;

/// A chat message on its way to the database, with everything its document needs.
#[derive(Debug)]
pub struct Record {
    /// Chosen at acceptance and kept across retries, which makes inserts idempotent.
    pub id: ObjectId,
    /// Who to tell if it cannot be stored.
    pub sender: ClientRef,
    pub content: String,
    pub nick: String,
    pub addr: SocketAddr,
    pub accepted_at: OffsetDateTime,
}

impl Record {
    /// The stored document; the README's schema section describes it.
    pub fn to_document(&self) -> Document {
        let millis = self.accepted_at.unix_timestamp_nanos() / 1_000_000;
        doc! {
            "_id": self.id,
            "content": &self.content,
            "ip": self.addr.ip().to_string(),
            "port": i32::from(self.addr.port()),
            "nick": &self.nick,
            "timestamp": DateTime::from_millis(millis as i64),
        }
    }
}

/// A message the queue would not take: its text and the reason, for its sender.
#[derive(Debug)]
pub struct SubmitError {
    pub content: String,
    pub reason: &'static str,
}

/// The loop's handle on the persistence thread.
#[derive(Debug)]
pub struct Persister {
    queue: SyncSender<Record>,
    thread: JoinHandle<PersistStats>,
}

/// What the persistence thread did, reported when it ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PersistStats {
    pub saved: u64,
    pub failed: u64,
}

impl Persister {
    /// Starts the persistence thread. It connects in the background: an unreachable database
    /// is logged, not fatal, and the thread keeps trying with every batch.
    pub fn start(config: StoreConfig, results: LoopSender) -> std::io::Result<Persister> {
        let (queue, incoming) = mpsc::sync_channel(config.queue_capacity);
        let thread = thread::Builder::new()
            .name("peerchat-persist".to_string())
            .spawn(move || run(config, incoming, results))?;
        Ok(Persister { queue, thread })
    }

    /// Queues a message without blocking.
    pub fn submit(&self, record: Record) -> Result<(), SubmitError> {
        self.queue.try_send(record).map_err(|err| match err {
            TrySendError::Full(record) => SubmitError {
                content: record.content,
                reason: "server busy: save queue full",
            },
            TrySendError::Disconnected(record) => SubmitError {
                content: record.content,
                reason: "storage stopped",
            },
        })
    }

    /// Closes the queue and waits up to `timeout` for what is queued to be stored. Returns the
    /// thread's counts, or `None` if it was still busy when the time ran out.
    pub fn finish(self, timeout: Duration) -> Option<PersistStats> {
        drop(self.queue);
        let deadline = Instant::now() + timeout;
        while !self.thread.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        if self.thread.is_finished() {
            self.thread.join().ok()
        } else {
            None
        }
    }
}

/// The persistence thread: batch, insert, report, until the queue is closed and empty.
fn run(config: StoreConfig, incoming: Receiver<Record>, results: LoopSender) -> PersistStats {
    let mut store = Store::new(config);
    store.prepare();
    let mut stats = PersistStats::default();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = incoming.recv() {
        batch.push(first);
        batch.extend(incoming.try_iter().take(MAX_BATCH - 1));
        let failures = store.save(&batch);
        stats.failed += failures.len() as u64;
        stats.saved += (batch.len() - failures.len()) as u64;
        if !failures.is_empty() {
            let reports = failures
                .into_iter()
                .map(|(index, reason)| SaveFailure {
                    sender: batch[index].sender,
                    content: std::mem::take(&mut batch[index].content),
                    reason,
                })
                .collect();
            // If the loop is gone the server is stopping; keep storing what is queued.
            let _ = results.send(LoopInput::NotSaved(reports));
        }
        batch.clear();
    }
    stats
}

/// The database side of persistence: a lazily created driver client, and whether the last
/// attempt worked (so the log says when saving stops and resumes, not once per failed batch).
/// Used by the persistence thread; public so tests and benches can drive it directly.
pub struct Store {
    config: StoreConfig,
    collection: Option<Collection<Document>>,
    index_ready: bool,
    healthy: bool,
}

impl Store {
    /// A store for `config`; nothing connects until the first call that needs the database.
    pub fn new(config: StoreConfig) -> Self {
        Store {
            config,
            collection: None,
            index_ready: false,
            healthy: true,
        }
    }

    /// Connects and creates the `timestamp` index, logging one warning if the database is not
    /// there; saving then keeps trying with each batch.
    pub fn prepare(&mut self) {
        match self.ensure_index() {
            Ok(()) => info!(
                "storing messages in {}.{} at {}",
                self.config.database,
                self.config.collection,
                redact_uri(&self.config.uri)
            ),
            Err(err) => {
                self.healthy = false;
                warn!(
                    "MongoDB at {} is not available ({}); chat runs, messages are reported unsaved until it is",
                    redact_uri(&self.config.uri),
                    describe(&err)
                );
            }
        }
    }

    /// Stores a batch. Returns the index of each message that could not be stored, with the
    /// reason to give its sender.
    pub fn save(&mut self, batch: &[Record]) -> Vec<(usize, String)> {
        let documents: Vec<Document> = batch.iter().map(Record::to_document).collect();
        let mut result = self.insert(&documents);
        if let Err(err) = &result {
            if is_transient(err) {
                // Same `_id`s: anything the first attempt stored comes back as a duplicate.
                result = self.insert(&documents);
            }
        }
        let failures = match result {
            Ok(()) => Vec::new(),
            Err(err) => failed_indexes(&err, batch.len()),
        };
        self.note_health(failures.len() < batch.len() || batch.is_empty(), &failures);
        if failures.is_empty() && !self.index_ready {
            let _ = self.ensure_index();
        }
        failures
    }

    fn insert(&mut self, documents: &[Document]) -> Result<(), DbError> {
        let collection = self.collection()?;
        collection.insert_many(documents).ordered(false).run()?;
        Ok(())
    }

    fn collection(&mut self) -> Result<&Collection<Document>, DbError> {
        if self.collection.is_none() {
            let mut options = ClientOptions::parse(&self.config.uri).run()?;
            options.server_selection_timeout = Some(self.config.timeout);
            options.connect_timeout = Some(self.config.timeout);
            options.app_name = Some("peerchat".to_string());
            let client = Client::with_options(options)?;
            let collection = client
                .database(&self.config.database)
                .collection(&self.config.collection);
            self.collection = Some(collection);
        }
        Ok(self
            .collection
            .as_ref()
            .expect("collection was just created"))
    }

    fn ensure_index(&mut self) -> Result<(), DbError> {
        let index = IndexModel::builder().keys(doc! { "timestamp": 1 }).build();
        self.collection()?.create_index(index).run()?;
        self.index_ready = true;
        Ok(())
    }

    /// Logs the moment saving starts failing and the moment it works again.
    fn note_health(&mut self, worked: bool, failures: &[(usize, String)]) {
        if worked && !self.healthy {
            info!("MongoDB is back: saving resumed");
        } else if !worked && self.healthy {
            let reason = failures
                .first()
                .map(|(_, reason)| reason.as_str())
                .unwrap_or("");
            warn!("saving to MongoDB failed ({reason}); senders are told, will keep trying");
        }
        self.healthy = worked;
    }
}

/// Errors worth one immediate retry: the connection broke, or the server says so.
fn is_transient(err: &DbError) -> bool {
    matches!(
        *err.kind,
        ErrorKind::Io(_) | ErrorKind::ConnectionPoolCleared { .. }
    ) || err.contains_label("RetryableWriteError")
}

/// Which documents of a failed `insert_many` were not stored, and why. With an unordered
/// insert every document was tried and write errors name the failed ones by index; any other
/// error leaves the whole batch unsaved. A duplicate key means the document is already there.
fn failed_indexes(err: &DbError, batch_len: usize) -> Vec<(usize, String)> {
    if let ErrorKind::InsertMany(failure) = &*err.kind {
        let mut failed: Vec<(usize, String)> = failure
            .write_errors
            .iter()
            .flatten()
            .filter(|write| write.code != DUPLICATE_KEY)
            .map(|write| (write.index, format!("database error {}", write.code)))
            .collect();
        if failure.write_concern_error.is_some() {
            let reported: Vec<usize> = failed.iter().map(|(index, _)| *index).collect();
            let duplicates: Vec<usize> = failure
                .write_errors
                .iter()
                .flatten()
                .map(|write| write.index)
                .collect();
            failed.extend(
                (0..batch_len)
                    .filter(|index| !reported.contains(index) && !duplicates.contains(index))
                    .map(|index| (index, "database did not confirm the write".to_string())),
            );
        }
        return failed;
    }
    let reason = describe(err);
    (0..batch_len)
        .map(|index| (index, reason.clone()))
        .collect()
}

/// A short reason for a sender or the log.
fn describe(err: &DbError) -> String {
    match &*err.kind {
        ErrorKind::ServerSelection { .. } => "database unreachable".to_string(),
        ErrorKind::Io(_) | ErrorKind::ConnectionPoolCleared { .. } => {
            "database connection lost".to_string()
        }
        ErrorKind::Command(command) => {
            format!("database error {} {}", command.code, command.code_name)
        }
        ErrorKind::Write(WriteFailure::WriteError(write)) => {
            format!("database error {}", write.code)
        }
        ErrorKind::Write(WriteFailure::WriteConcernError(_)) => {
            "database did not confirm the write".to_string()
        }
        ErrorKind::Authentication { .. } => "database authentication failed".to_string(),
        ErrorKind::DnsResolve { .. } => "database address not found (DNS)".to_string(),
        ErrorKind::InvalidArgument { .. } => "invalid database URI".to_string(),
        _ => "database error".to_string(),
    }
}

/// The URI without its password, for logs.
pub fn redact_uri(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{}", &rest[at + 1..])
        }
        None => uri.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_uri("mongodb+srv://app:s3cret@cluster0.example.net/?retryWrites=true"),
            "mongodb+srv://app:***@cluster0.example.net/?retryWrites=true"
        );
        assert_eq!(
            redact_uri("mongodb://127.0.0.1:27017"),
            "mongodb://127.0.0.1:27017"
        );
    }

    #[test]
    fn document_has_the_documented_fields() {
        let record = Record {
            id: ObjectId::new(),
            sender: ClientRef { slot: 0, id: 1 },
            content: "hi".to_string(),
            nick: "alice".to_string(),
            addr: "127.0.0.1:5000".parse().unwrap(),
            accepted_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
        };
        let doc = record.to_document();
        assert_eq!(doc.get_object_id("_id").unwrap(), record.id);
        assert_eq!(doc.get_str("content").unwrap(), "hi");
        assert_eq!(doc.get_str("ip").unwrap(), "127.0.0.1");
        assert_eq!(doc.get_i32("port").unwrap(), 5000);
        assert_eq!(doc.get_str("nick").unwrap(), "alice");
        assert_eq!(
            doc.get_datetime("timestamp").unwrap().timestamp_millis(),
            1_700_000_000_000
        );
    }
}
