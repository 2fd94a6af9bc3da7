//! Persistence: one thread that stores chat messages in MongoDB, in batches.
//!
//! The event loop never calls the driver. It hands each message to this thread through a
//! bounded queue (`try_send`, so a full queue fails the message at once instead of stalling the
//! chat). The thread takes everything queued, inserts it with one unordered `insert_many`, and
//! sends the messages that could not be stored back to the loop through its inbox.
//!
//! Each message gets its `_id` when it is accepted, so a batch sent again after a lost reply
//! cannot store anything twice: the duplicate key error (11000) it gets means "already saved".

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
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
use crate::{error, info, warn};

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
    /// Messages taken into the queue (counted on the loop's side).
    accepted: Cell<u64>,
    /// Messages the persistence thread has finished with, saved or reported.
    settled: Arc<AtomicU64>,
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
        let settled = Arc::new(AtomicU64::new(0));
        let thread_settled = settled.clone();
        let thread = thread::Builder::new()
            .name("peerchat-persist".to_string())
            .spawn(move || run(config, incoming, results, &thread_settled))?;
        Ok(Persister {
            queue,
            thread,
            accepted: Cell::new(0),
            settled,
        })
    }

    /// Queues a message without blocking.
    pub fn submit(&self, record: Record) -> Result<(), SubmitError> {
        let sent = self.queue.try_send(record);
        if sent.is_ok() {
            self.accepted.set(self.accepted.get() + 1);
        }
        sent.map_err(|err| match err {
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

    /// Closes the queue and waits up to `timeout` for what is queued to be stored, calling
    /// `meanwhile` every few milliseconds (the loop drains its inbox there, so the thread never
    /// waits on a full inbox nobody reads). Returns the thread's counts, or, if it was still
    /// busy when the time ran out, how many accepted messages it had not finished with.
    pub fn finish(
        self,
        timeout: Duration,
        mut meanwhile: impl FnMut(),
    ) -> Result<PersistStats, u64> {
        drop(self.queue);
        let deadline = Instant::now() + timeout;
        while !self.thread.is_finished() && Instant::now() < deadline {
            meanwhile();
            thread::sleep(Duration::from_millis(10));
        }
        let unsettled = self.accepted.get() - self.settled.load(Ordering::Acquire);
        if self.thread.is_finished() {
            self.thread.join().map_err(|_| unsettled)
        } else {
            Err(unsettled)
        }
    }
}

/// The persistence thread: batch, insert (through the watchdog), report, until the queue is
/// closed and empty.
fn run(
    config: StoreConfig,
    incoming: Receiver<Record>,
    results: LoopSender,
    settled: &AtomicU64,
) -> PersistStats {
    let deadline = config.timeout * BATCH_DEADLINE_FACTOR;
    let mut inserter = match Inserter::start(Store::new(config)) {
        Ok(inserter) => inserter,
        Err(err) => {
            error!("cannot start the database thread: {err}; no message will be stored");
            return report_all_unsaved(incoming, &results, settled);
        }
    };
    let mut health = Health::default();
    let mut stats = PersistStats::default();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = incoming.recv() {
        batch.push(first);
        batch.extend(incoming.try_iter().take(MAX_BATCH - 1));
        let documents = batch.iter().map(Record::to_document).collect();
        let failures = inserter.save(documents, deadline);
        health.note(batch.len(), &failures);
        stats.failed += failures.len() as u64;
        stats.saved += (batch.len() - failures.len()) as u64;
        report(&results, &mut batch, failures);
        settled.fetch_add(batch.len() as u64, Ordering::Release);
        batch.clear();
    }
    stats
}

/// Sends the failed messages of `batch` back to the loop for their senders.
fn report(results: &LoopSender, batch: &mut [Record], failures: Vec<(usize, String)>) {
    if failures.is_empty() {
        return;
    }
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

/// Without a database thread nothing can be stored: say so for every message.
fn report_all_unsaved(
    incoming: Receiver<Record>,
    results: &LoopSender,
    settled: &AtomicU64,
) -> PersistStats {
    let mut stats = PersistStats::default();
    while let Ok(record) = incoming.recv() {
        stats.failed += 1;
        let mut batch = [record];
        report(
            results,
            &mut batch,
            vec![(0, "storage stopped".to_string())],
        );
        settled.fetch_add(1, Ordering::Release);
    }
    stats
}

/// A whole batch (server selection, insert, one retry) may take this many `--mongo-timeout-ms`
/// before it is reported as not saved. The driver cannot time out an operation on a connection
/// that is open but silent (a hung or stopped database), so the watchdog does.
const BATCH_DEADLINE_FACTOR: u32 = 3;

/// Why a batch was given up on by the watchdog. The insert may still complete if the database
/// wakes up, and the sender should know that.
const NOT_RESPONDING: &str = "database not responding; it may still be saved";

/// Runs the blocking driver calls on a thread of their own, so the persistence thread can stop
/// waiting for a database that does not answer. At most one batch is in the driver at a time;
/// once one has overrun its deadline, later batches fail at once until it comes back, so
/// senders hear promptly and the queue does not pile up behind a hung database.
struct Inserter {
    jobs: SyncSender<Vec<Document>>,
    done: Receiver<Vec<(usize, String)>>,
    /// A batch (or the start-up index creation) is still in the driver.
    busy: bool,
    /// The batch in the driver overran its deadline.
    stuck: bool,
    /// Messages in the batch given up on, to log what became of them if it finishes late.
    given_up: usize,
}

impl Inserter {
    fn start(mut store: Store) -> std::io::Result<Inserter> {
        let (jobs, job_rx) = mpsc::sync_channel::<Vec<Document>>(1);
        let (done_tx, done) = mpsc::sync_channel(1);
        thread::Builder::new()
            .name("peerchat-db".to_string())
            .spawn(move || {
                store.prepare();
                if done_tx.send(Vec::new()).is_err() {
                    return;
                }
                for documents in job_rx {
                    if done_tx.send(store.save(&documents)).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Inserter {
            jobs,
            done,
            busy: true, // until start-up (connect, index) reports
            stuck: false,
            given_up: 0,
        })
    }

    /// Stores `documents`, or gives up after `deadline`. Returns the failed indexes and reasons.
    fn save(&mut self, documents: Vec<Document>, deadline: Duration) -> Vec<(usize, String)> {
        let count = documents.len();
        if self.busy {
            let wait_for_previous = if self.stuck { Duration::ZERO } else { deadline };
            match self.wait(wait_for_previous) {
                Some(late) => self.note_late(&late),
                None => return all_failed(count, NOT_RESPONDING),
            }
        }
        if self.jobs.send(documents).is_err() {
            return all_failed(count, "storage stopped");
        }
        self.busy = true;
        self.wait(deadline).unwrap_or_else(|| {
            self.given_up = count;
            all_failed(count, NOT_RESPONDING)
        })
    }

    /// A batch already reported unsaved has finished after all: say how much of it was stored.
    fn note_late(&mut self, failures: &[(usize, String)]) {
        let given_up = std::mem::take(&mut self.given_up);
        if given_up > 0 {
            info!(
                "MongoDB answered late: {} of {given_up} messages reported \"not responding\" were stored after all",
                given_up - failures.len()
            );
        }
    }

    /// The result of the batch in the driver, if it comes within `deadline`.
    fn wait(&mut self, deadline: Duration) -> Option<Vec<(usize, String)>> {
        match self.done.recv_timeout(deadline) {
            Ok(result) => {
                self.busy = false;
                self.stuck = false;
                Some(result)
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                self.stuck = true;
                None
            }
        }
    }
}

fn all_failed(count: usize, reason: &str) -> Vec<(usize, String)> {
    (0..count)
        .map(|index| (index, reason.to_string()))
        .collect()
}

/// Logs when saving starts failing and when it works again, not once per failed batch.
#[derive(Default)]
struct Health {
    failing: bool,
}

impl Health {
    fn note(&mut self, batch_len: usize, failures: &[(usize, String)]) {
        let worked = failures.len() < batch_len;
        if worked && self.failing {
            info!("MongoDB is back: saving resumed");
        } else if !worked && !self.failing {
            let reason = failures
                .first()
                .map(|(_, reason)| reason.as_str())
                .unwrap_or("");
            warn!("saving to MongoDB failed ({reason}); senders are told, will keep trying");
        }
        self.failing = !worked;
    }
}

/// The database side of persistence: a lazily created driver client and the `timestamp`
/// index. Its calls block for as long as the driver does; the persistence thread runs them
/// behind a watchdog. Public so tests and benches can drive it directly.
pub struct Store {
    config: StoreConfig,
    collection: Option<Collection<Document>>,
    /// The index exists, or could not be made for a reason retrying will not fix.
    index_settled: bool,
}

impl Store {
    /// A store for `config`; nothing connects until the first call that needs the database.
    pub fn new(config: StoreConfig) -> Self {
        Store {
            config,
            collection: None,
            index_settled: false,
        }
    }

    /// Connects and creates the `timestamp` index, logging one line either way. An unreachable
    /// database is a warning, not an error: saving keeps trying with each batch.
    pub fn prepare(&mut self) {
        let target = format!(
            "{}.{} at {}",
            self.config.database,
            self.config.collection,
            redact_uri(&self.config.uri)
        );
        match self.settle_index() {
            Ok(()) => info!("storing messages in {target}"),
            Err(err) => warn!(
                "MongoDB for {target} is not available ({}); chat runs, messages are reported unsaved until it is",
                describe(&err)
            ),
        }
    }

    /// Stores a batch. Returns the index of each document that could not be stored, with the
    /// reason to give its sender.
    pub fn save(&mut self, documents: &[Document]) -> Vec<(usize, String)> {
        let mut result = self.insert(documents);
        if let Err(err) = &result {
            if is_transient(err) {
                // Same `_id`s: anything the first attempt stored comes back as a duplicate.
                result = self.insert(documents);
            }
        }
        let failures = match result {
            Ok(()) => Vec::new(),
            Err(err) => failed_indexes(&err, documents.len()),
        };
        if failures.is_empty() && !self.index_settled {
            let _ = self.settle_index();
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

    /// Creates the `timestamp` index. Returns an error only when the database could not be
    /// reached (try again later); any other failure is logged once and not retried.
    fn settle_index(&mut self) -> Result<(), DbError> {
        let index = IndexModel::builder().keys(doc! { "timestamp": 1 }).build();
        let result = self
            .collection()
            .and_then(|collection| collection.create_index(index).run().map(drop));
        match result {
            Ok(()) => self.index_settled = true,
            Err(err) if is_connectivity(&err) => return Err(err),
            Err(err) => {
                self.index_settled = true;
                warn!(
                    "could not create the timestamp index ({}); messages are still stored",
                    describe(&err)
                );
            }
        }
        Ok(())
    }
}

/// The database could not be reached at all (as opposed to refusing the operation).
fn is_connectivity(err: &DbError) -> bool {
    matches!(
        *err.kind,
        ErrorKind::ServerSelection { .. }
            | ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. }
            | ErrorKind::DnsResolve { .. }
    )
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
