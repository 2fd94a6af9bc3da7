//! Persistence: one thread that stores chat messages in MongoDB, in batches.
//!
//! The event loop never calls the driver. It hands each message to this thread through a
//! bounded queue (`try_send`, so a full queue fails the message at once instead of stalling the
//! chat). The thread takes everything queued, inserts it with one unordered `insert_many`, and
//! sends the messages that could not be stored back to the loop through its inbox.
//!
//! Each message gets its `_id` when it is accepted, so a batch sent again after a lost reply
//! cannot store anything twice: the duplicate key error (11000) it gets means "already saved".
//!
//! Three parts, one file each: this one (the queue, the batching thread, reporting back),
//! `watchdog` (a deadline on every batch, since the driver cannot time out a silent
//! connection), and `store` (the driver calls and what their errors mean).

mod store;
mod watchdog;

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use time::OffsetDateTime;

use crate::config::StoreConfig;
use crate::{error, info, warn};
pub use store::{redact_uri, write_concern, Store};
use watchdog::{Inserter, BATCH_DEADLINE_FACTOR};

/// Most documents in one `insert_many`: large enough to amortise a round trip, small enough
/// that one batch stays far below MongoDB's 48 MB message limit at the longest lines.
pub const MAX_BATCH: usize = 1000;

/// Names one connection for the lifetime of the server: its slot and its never-reused id. The
/// persistence thread hands it back with each failure, so a late report can never reach a
/// different client that got the same slot later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientRef {
    pub slot: usize,
    pub id: u64,
}

/// A chat message that could not be stored, to be reported to its sender.
#[derive(Debug)]
pub struct SaveFailure {
    pub sender: ClientRef,
    pub content: String,
    pub reason: String,
}

/// Where the persistence thread sends the failures its senders must hear about. The server's
/// event loop implements it with its inbox; persistence knows nothing of the loop.
pub trait Reporter: Send + 'static {
    /// Hands over one batch's failures; may block while the receiver is full (this runs on the
    /// persistence thread, never on the loop). Failures for a receiver that is gone are dropped:
    /// the server is stopping.
    fn not_saved(&self, failures: Vec<SaveFailure>);
}

/// A plain channel as a reporter, for programs that drive a `Persister` without a server.
impl Reporter for SyncSender<Vec<SaveFailure>> {
    fn not_saved(&self, failures: Vec<SaveFailure>) {
        let _ = self.send(failures);
    }
}

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
    /// `None` once closed for shutdown.
    queue: Option<SyncSender<Record>>,
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
    pub fn start(config: StoreConfig, results: impl Reporter) -> std::io::Result<Persister> {
        let (queue, incoming) = mpsc::sync_channel(config.queue_capacity);
        let settled = Arc::new(AtomicU64::new(0));
        let thread_settled = settled.clone();
        let thread = thread::Builder::new()
            .name("peerchat-persist".to_string())
            .spawn(move || run(config, incoming, results, &thread_settled))?;
        Ok(Persister {
            queue: Some(queue),
            thread,
            accepted: Cell::new(0),
            settled,
        })
    }

    /// Queues a message without blocking.
    pub fn submit(&self, record: Record) -> Result<(), SubmitError> {
        let Some(queue) = &self.queue else {
            return Err(SubmitError {
                content: record.content,
                reason: "storage stopped",
            });
        };
        let sent = queue.try_send(record);
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

    /// Takes no more messages: the thread stores what is queued, reports what it cannot, and
    /// ends.
    pub fn close(&mut self) {
        self.queue = None;
    }

    /// How many accepted messages the thread has finished with (saved or reported), in order.
    pub fn settled(&self) -> u64 {
        self.settled.load(Ordering::Acquire)
    }

    /// True once the thread has finished with everything it was given (after `close`).
    pub fn is_done(&self) -> bool {
        self.thread.is_finished()
    }

    /// Closes the queue and waits up to `timeout` for what is queued to be stored, calling
    /// `meanwhile` every few milliseconds (the loop drains its inbox there, so the thread never
    /// waits on a full inbox nobody reads). Returns the thread's counts, or, if it was still
    /// busy when the time ran out, how many accepted messages it had not finished with.
    pub fn finish(
        mut self,
        timeout: Duration,
        mut meanwhile: impl FnMut(),
    ) -> Result<PersistStats, u64> {
        self.close();
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
    results: impl Reporter,
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
fn report(results: &impl Reporter, batch: &mut [Record], failures: Vec<(usize, String)>) {
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
    results.not_saved(reports);
}

/// Without a database thread nothing can be stored: say so for every message.
fn report_all_unsaved(
    incoming: Receiver<Record>,
    results: &impl Reporter,
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

#[cfg(test)]
mod tests {
    use super::*;

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
