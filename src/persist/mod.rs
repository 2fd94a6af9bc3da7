//! Persistence: one thread that stores chat messages in MongoDB, in batches.
//!
//! The event loop never calls the driver. It encodes each message once, as the raw BSON document
//! that will be stored, and hands it to this thread through a queue bounded in count and in
//! bytes (`try_send`, so a full queue fails the message at once instead of stalling the chat).
//! The thread takes everything queued, inserts it with one unordered `insert_many`, and sends the
//! messages that could not be stored back to the loop through its inbox.
//!
//! Each message gets its `_id` when it is accepted, so a batch sent again after a lost reply
//! cannot store anything twice: the duplicate key error (11000) it gets means "already saved".
//!
//! If the thread itself fails (a panic), every message it still holds and every later one is
//! reported `storage stopped`, and that is logged once (ERROR): a message is never left
//! unreported.
//!
//! The same thread answers history requests, in queue order between batches (see `history`
//! for why there).
//!
//! Four parts, one file each: this one (the queue, the batching thread, reporting back),
//! `history` (requests, answers, where a query's index range starts), `watchdog` (a deadline on every batch, and a new driver client when one hangs, since the
//! driver cannot time out a silent connection), and `store` (the driver calls and what their
//! errors mean).

mod history;
mod store;
mod watchdog;

use std::cell::Cell;
use std::net::SocketAddr;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use bson::raw::cstr;
use bson::{DateTime, RawDocumentBuf};

use crate::config::StoreConfig;
use crate::{error, info, warn};
use history::Newest;
pub use history::{HistoryReply, HistoryRequest, StoredLine, ACTION_KIND};
pub(crate) use store::{connect_client, describe, is_connectivity, DUPLICATE_KEY};
pub use store::{redact_uri, write_concern, Store, MAY_STILL_BE_SAVED};
use store::{CONNECTION_LOST, UNREACHABLE};
use watchdog::{Inserter, BATCH_DEADLINE_FACTOR, NOT_RESPONDING};

/// Most documents in one `insert_many`: large enough to amortise a round trip, small enough
/// that one batch stays far below MongoDB's 48 MB message limit at the longest lines.
pub const MAX_BATCH: usize = 1000;

/// A batch also ends once it holds this many bytes of documents, so that what is taken out of
/// the byte-bounded queue (and what a hung driver call may hold on to) stays bounded too.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// The reason given when the queue is full (by count or by bytes).
pub const QUEUE_FULL: &str = "server busy: save queue full";

/// The reason given once the persistence thread has stopped, for shutdown or because it failed.
pub const STORAGE_STOPPED: &str = "storage stopped";

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

/// What the persistence thread tells the loop.
#[derive(Debug)]
pub enum Report {
    /// Messages that could not be stored, for their senders.
    NotSaved(Vec<SaveFailure>),
    /// The answer to history requests.
    History(HistoryReply),
}

/// Where the persistence thread sends what the loop must hear. The server's event loop
/// implements it with its inbox; persistence knows nothing of the loop.
pub trait Reporter: Send + 'static {
    /// Hands over one report; may block while the receiver is full (this runs on the
    /// persistence thread, never on the loop). Reports for a receiver that is gone are dropped:
    /// the server is stopping.
    fn report(&self, report: Report);
}

/// A plain channel as a reporter, for programs that drive a `Persister` without a server.
impl Reporter for SyncSender<Report> {
    fn report(&self, report: Report) {
        let _ = self.send(report);
    }
}

/// The BSON of `{}`: its length (5, little-endian) and the terminating zero.
const EMPTY_DOCUMENT: [u8; 5] = [5, 0, 0, 0, 0];

/// A chat message on its way to the database: who sent it, and the document to store, encoded
/// once when the message was accepted. The persistence thread and the driver only pass the
/// encoded bytes on; nothing is built or converted again per message.
#[derive(Clone, Debug)]
pub struct Record {
    /// Who to tell if it cannot be stored.
    pub sender: ClientRef,
    /// The `timestamp` field, kept at hand for the history's index bounds.
    accepted_millis: i64,
    document: RawDocumentBuf,
}

impl Record {
    /// The message as its stored document (the README's schema section describes it), with a new
    /// `_id`: chosen at acceptance and kept across retries, which makes inserts idempotent.
    pub fn new(
        sender: ClientRef,
        nick: &str,
        addr: SocketAddr,
        content: &str,
        accepted_at: DateTime,
    ) -> Record {
        let ip = addr.ip().to_string();
        // One allocation of the right size, and the strings borrowed, not copied first (as
        // `rawdoc!` would): 85 bytes of field names, types, lengths and fixed-size values.
        let mut bytes = Vec::with_capacity(85 + content.len() + ip.len() + nick.len());
        bytes.extend_from_slice(&EMPTY_DOCUMENT);
        let mut document = RawDocumentBuf::from_bytes(bytes).expect("an empty document");
        document.append(cstr!("_id"), ObjectId::new());
        document.append(cstr!("content"), content);
        document.append(cstr!("ip"), ip.as_str());
        document.append(cstr!("port"), i32::from(addr.port()));
        document.append(cstr!("nick"), nick);
        document.append(cstr!("timestamp"), accepted_at);
        Record {
            sender,
            accepted_millis: accepted_at.timestamp_millis(),
            document,
        }
    }

    /// Names the cluster node that accepted the message (`node`, only with `--cluster`): other
    /// nodes deliver it, this one does not again.
    pub fn node(mut self, node: &str) -> Record {
        self.document.append(cstr!("node"), node);
        self
    }

    /// Marks the message as a `/me` action (`kind: "action"`); plain messages have no `kind`.
    pub fn action(mut self) -> Record {
        self.document.append(cstr!("kind"), ACTION_KIND);
        self
    }

    /// The document as it is stored.
    pub fn document(&self) -> &RawDocumentBuf {
        &self.document
    }

    /// The message text, read back from the document (only needed to report a failure).
    pub fn content(&self) -> &str {
        self.document.get_str("content").unwrap_or_default()
    }

    /// The document's `_id`.
    pub fn id(&self) -> Option<ObjectId> {
        self.document.get_object_id("_id").ok()
    }

    /// What the record costs the save queue: the size of its encoded document.
    pub fn size(&self) -> usize {
        self.document.as_bytes().len()
    }
}

impl AsRef<RawDocumentBuf> for Record {
    fn as_ref(&self) -> &RawDocumentBuf {
        &self.document
    }
}

/// What the loop hands the persistence thread, in the order it happened.
#[derive(Debug)]
enum Queued {
    Save(Record),
    History(HistoryRequest),
}

/// A message the queue would not take: its text and the reason, for its sender.
#[derive(Debug)]
pub struct SubmitError {
    pub content: String,
    pub reason: &'static str,
}

/// What the loop's handle and the persistence thread share.
#[derive(Debug, Default)]
struct Shared {
    /// Messages the persistence thread has finished with, saved or reported.
    settled: AtomicU64,
    /// Bytes of documents in the queue: added by `submit`, taken off when the thread takes them.
    queued_bytes: AtomicUsize,
    /// The thread failed: it reports what it still gets as not saved, and `submit` refuses.
    failed: AtomicBool,
    /// History requests in the queue: while there are any, the thread does not wait to gather
    /// a batch, so a request is answered without the batching delay.
    history_queued: AtomicUsize,
    /// The failure has been logged, by whichever side saw it first.
    failure_logged: AtomicBool,
    /// Messages stored: the rest of `settled` was reported not saved.
    saved: AtomicU64,
    /// How long the last inserts took, for `/stats`.
    batch_times: Mutex<BatchTimes>,
}

/// The durations of the last `BatchTimes::KEPT` inserts, oldest overwritten first: a p99 of
/// recent batches, so `/stats` shows how the database does now, not since the start.
#[derive(Debug, Default)]
struct BatchTimes {
    micros: Vec<u32>,
    next: usize,
}

impl BatchTimes {
    const KEPT: usize = 1000;

    fn note(&mut self, took: Duration) {
        let micros = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
        if self.micros.len() < Self::KEPT {
            self.micros.push(micros);
        } else {
            self.micros[self.next] = micros;
        }
        self.next = (self.next + 1) % Self::KEPT;
    }

    /// The 99th percentile in milliseconds; 0 before any insert.
    fn p99_millis(&self) -> f64 {
        let mut sorted = self.micros.clone();
        sorted.sort_unstable();
        let Some(last) = sorted.len().checked_sub(1) else {
            return 0.0;
        };
        f64::from(sorted[last * 99 / 100]) / 1000.0
    }
}

/// What `/stats` shows of persistence.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PersistFigures {
    /// Messages stored.
    pub saved: u64,
    /// Messages the queue refused (full, or storage stopped); the loop counts the failures it
    /// is told of itself, as their senders are told.
    pub refused: u64,
    /// Messages accepted and not yet stored or reported.
    pub queued: u64,
    /// 99th percentile of the last 1000 inserts' durations, in milliseconds.
    pub batch_ms_p99: f64,
}

impl Shared {
    /// Says once that the persistence thread has failed and nothing is stored any more. The
    /// thread says it as it fails; the loop says it if the thread vanished without a word.
    fn log_failure(&self) {
        if !self.failure_logged.swap(true, Ordering::AcqRel) {
            error!(
                "the persistence thread has stopped after a failure: messages are no longer stored, and each sender is told \"{STORAGE_STOPPED}\""
            );
        }
    }
}

/// The loop's handle on the persistence thread.
#[derive(Debug)]
pub struct Persister {
    /// `None` once closed for shutdown.
    queue: Option<SyncSender<Queued>>,
    thread: JoinHandle<PersistStats>,
    /// Messages taken into the queue (counted on the loop's side).
    accepted: Cell<u64>,
    /// Messages the queue refused (counted on the loop's side).
    refused: Cell<u64>,
    shared: Arc<Shared>,
    /// The queue's bound in bytes (`--persist-queue-bytes`).
    max_bytes: usize,
}

/// What the persistence thread did, reported when it ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PersistStats {
    pub saved: u64,
    pub failed: u64,
}

/// A batch taken from the queue, shared with the driver's thread while it is being inserted.
type Batch = Arc<Vec<Record>>;

/// The work of the persistence thread, given the queue, what it shares with the loop, the
/// batch in hand and the counts. If it panics, what it left in the batch and everything queued
/// later is reported as not saved.
type Work = Box<
    dyn FnOnce(&Receiver<Queued>, &Shared, &dyn Reporter, &mut Batch, &mut PersistStats) + Send,
>;

impl Persister {
    /// Starts the persistence thread. It connects in the background: an unreachable database
    /// is logged, not fatal, and the thread keeps trying with every batch.
    pub fn start(config: StoreConfig, results: impl Reporter) -> std::io::Result<Persister> {
        let capacity = config.queue_capacity;
        let max_bytes = config.queue_bytes;
        let work: Work = Box::new(move |incoming, shared, results, batch, stats| {
            run(config, incoming, results, shared, batch, stats)
        });
        Persister::spawn(capacity, max_bytes, results, work)
    }

    /// Starts a thread that runs `work` on the queue, and reports what it leaves unsaved if it
    /// fails.
    fn spawn(
        capacity: usize,
        max_bytes: usize,
        results: impl Reporter,
        work: Work,
    ) -> std::io::Result<Persister> {
        let (queue, incoming) = mpsc::sync_channel(capacity);
        let shared = Arc::new(Shared::default());
        let thread_shared = shared.clone();
        let thread = thread::Builder::new()
            .name("peerchat-persist".to_string())
            .spawn(move || {
                let shared = &*thread_shared;
                let mut batch = Batch::default();
                let mut stats = PersistStats::default();
                let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
                    work(&incoming, shared, &results, &mut batch, &mut stats)
                }));
                if outcome.is_err() {
                    // The panic message is already on stderr; this says what it means.
                    shared.failed.store(true, Ordering::Release);
                    shared.log_failure();
                    report_unsaved(&batch, &results, shared, &mut stats);
                    while let Ok(queued) = incoming.recv() {
                        match queued {
                            Queued::Save(record) => {
                                take_bytes(shared, record.size());
                                report_unsaved(&[record], &results, shared, &mut stats);
                            }
                            Queued::History(request) => {
                                shared.history_queued.fetch_sub(1, Ordering::AcqRel);
                                let lines = Err(STORAGE_STOPPED.to_string());
                                let requests = vec![request];
                                results.report(Report::History(HistoryReply { requests, lines }));
                            }
                        }
                    }
                }
                stats
            })?;
        Ok(Persister {
            queue: Some(queue),
            thread,
            accepted: Cell::new(0),
            refused: Cell::new(0),
            shared,
            max_bytes,
        })
    }

    /// Queues a message without blocking. Refused when the queue is full, by count or by bytes,
    /// or when storage has stopped.
    pub fn submit(&self, record: Record) -> Result<(), SubmitError> {
        let refuse = |record: Record, reason| {
            self.refused.set(self.refused.get() + 1);
            Err(SubmitError {
                content: record.content().to_string(),
                reason,
            })
        };
        let Some(queue) = &self.queue else {
            return refuse(record, STORAGE_STOPPED);
        };
        if self.shared.failed.load(Ordering::Acquire) {
            self.shared.log_failure();
            return refuse(record, STORAGE_STOPPED);
        }
        // Only this thread adds, so the bound holds: the persistence thread only takes off.
        let size = record.size();
        let queued = self.shared.queued_bytes.load(Ordering::Acquire);
        if queued.saturating_add(size) > self.max_bytes {
            return refuse(record, QUEUE_FULL);
        }
        self.shared.queued_bytes.fetch_add(size, Ordering::AcqRel);
        match queue.try_send(Queued::Save(record)) {
            Ok(()) => {
                self.accepted.set(self.accepted.get() + 1);
                Ok(())
            }
            Err(err) => {
                take_bytes(&self.shared, size);
                let (queued, reason) = match err {
                    TrySendError::Full(queued) => (queued, QUEUE_FULL),
                    TrySendError::Disconnected(queued) => {
                        self.shared.log_failure();
                        (queued, STORAGE_STOPPED)
                    }
                };
                match queued {
                    Queued::Save(record) => refuse(record, reason),
                    Queued::History(_) => unreachable!("a record was sent"),
                }
            }
        }
    }

    /// Queues a history request behind the messages already queued, without blocking, and
    /// wakes the thread if it is gathering a batch. Refused (with the reason) when the queue is
    /// full or storage has stopped.
    pub fn request_history(&self, request: HistoryRequest) -> Result<(), &'static str> {
        let Some(queue) = &self.queue else {
            return Err(STORAGE_STOPPED);
        };
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(STORAGE_STOPPED);
        }
        self.shared.history_queued.fetch_add(1, Ordering::AcqRel);
        match queue.try_send(Queued::History(request)) {
            Ok(()) => {
                self.thread.thread().unpark();
                Ok(())
            }
            Err(err) => {
                self.shared.history_queued.fetch_sub(1, Ordering::AcqRel);
                Err(match err {
                    TrySendError::Full(_) => QUEUE_FULL,
                    TrySendError::Disconnected(_) => STORAGE_STOPPED,
                })
            }
        }
    }

    /// Takes no more messages: the thread stores what is queued, reports what it cannot, and
    /// ends.
    pub fn close(&mut self) {
        self.queue = None;
    }

    /// How many accepted messages the thread has finished with (saved or reported), in order.
    pub fn settled(&self) -> u64 {
        self.shared.settled.load(Ordering::Acquire)
    }

    /// Counts for `/stats`.
    pub fn figures(&self) -> PersistFigures {
        let settled = self.settled();
        let saved = self.shared.saved.load(Ordering::Acquire).min(settled);
        let batch_ms_p99 = match self.shared.batch_times.lock() {
            Ok(times) => times.p99_millis(),
            Err(poisoned) => poisoned.into_inner().p99_millis(),
        };
        PersistFigures {
            saved,
            refused: self.refused.get(),
            queued: self.accepted.get().saturating_sub(settled),
            batch_ms_p99,
        }
    }

    /// Bytes of documents waiting in the queue.
    pub fn queued_bytes(&self) -> usize {
        self.shared.queued_bytes.load(Ordering::Acquire)
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
        let unsettled = self.accepted.get() - self.settled();
        if self.thread.is_finished() {
            self.thread.join().map_err(|_| unsettled)
        } else {
            Err(unsettled)
        }
    }
}

/// Takes `size` bytes off the queue's count.
fn take_bytes(shared: &Shared, size: usize) {
    shared.queued_bytes.fetch_sub(size, Ordering::AcqRel);
}

/// Under sustained load, the least time between the starts of two inserts. Each `insert_many`
/// costs 300–500 µs of CPU whatever its size (the loopback round trip's kernel work, the thread
/// hand-offs, the driver's per-operation machinery), while a document adds about 1.5 µs: at
/// 2 000 messages/s, inserting whatever had arrived cost 34 µs per message, gathering for 50 ms
/// 5.6 µs. The thread sleeps instead of waking for each message, which alone cost ~5 µs each. A
/// message after a quiet spell is inserted at once; under load it waits at most this long more
/// to be stored (delivery to the other clients never waits).
pub const MIN_INSERT_INTERVAL: Duration = Duration::from_millis(50);

/// The persistence thread: batch, insert (through the watchdog), report, and answer history
/// requests in their place in the queue, until the queue is closed and empty. The batch in hand
/// is in `batch` until it is reported, so that a failure of this thread cannot lose it.
fn run(
    config: StoreConfig,
    incoming: &Receiver<Queued>,
    results: &dyn Reporter,
    shared: &Shared,
    batch: &mut Batch,
    stats: &mut PersistStats,
) {
    let mut thread = PersistThread {
        deadline: config.timeout * BATCH_DEADLINE_FACTOR,
        reader: Inserter::for_reads(config.clone()),
        history_paused_until: None,
        inserter: Inserter::new(config),
        health: Health::default(),
        newest: Newest::new(0),
        last_insert: None,
        last_was_full: false,
        last_failure: None,
        incoming,
        results,
        shared,
    };
    let mut next = None;
    loop {
        let Some(queued) = next.take().or_else(|| incoming.recv().ok()) else {
            return;
        };
        next = match queued {
            Queued::Save(first) => thread.save_batch(first, batch, stats),
            Queued::History(request) => thread.answer_history(request),
        };
    }
}

/// The persistence thread's state between batches.
struct PersistThread<'a> {
    /// How long one batch or query may take before its driver client is given up on.
    deadline: Duration,
    inserter: Inserter,
    /// History queries run on clients of their own (see `Inserter::for_reads`).
    reader: Inserter,
    /// After a query the database did not answer in time, history is refused at once until
    /// then: each such query holds up saving for its whole deadline.
    history_paused_until: Option<Instant>,
    health: Health,
    /// Where history queries start their index range.
    newest: Newest,
    last_insert: Option<Instant>,
    last_was_full: bool,
    /// Why the last batch failed as a whole, if it did: a history request right behind it gets
    /// that answer instead of waiting for the same unreachable database again.
    last_failure: Option<String>,
    incoming: &'a Receiver<Queued>,
    results: &'a dyn Reporter,
    shared: &'a Shared,
}

impl PersistThread<'_> {
    /// Gathers a batch starting with `first`, stores it and reports its failures. Returns a
    /// history request met while gathering: it waits for this batch, and nothing after it
    /// joins the batch.
    fn save_batch(
        &mut self,
        first: Record,
        batch: &mut Batch,
        stats: &mut PersistStats,
    ) -> Option<Queued> {
        let mut bytes = first.size();
        let mut records = vec![first];
        // Under load, inserts start at most every `MIN_INSERT_INTERVAL`: what arrives meanwhile
        // joins the batch. A message after a quiet spell is inserted at once, and so is the next
        // batch after a full one (the interval must not cap what a fast database stores), and
        // one with a history request waiting behind it.
        if let Some(at) = self.last_insert.filter(|_| !self.last_was_full) {
            self.wait_unless_history(at + MIN_INSERT_INTERVAL);
        }
        let mut next = None;
        while records.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match self.incoming.try_recv() {
                Ok(Queued::Save(record)) => {
                    bytes += record.size();
                    records.push(record);
                }
                Ok(history) => {
                    next = Some(history);
                    break;
                }
                Err(_) => break,
            }
        }
        self.last_insert = Some(Instant::now());
        self.last_was_full = records.len() >= MAX_BATCH || bytes >= MAX_BATCH_BYTES;
        *batch = Arc::new(records);
        take_bytes(self.shared, bytes);
        let started = Instant::now();
        let failures = self.inserter.save(batch, self.deadline);
        if let Ok(mut times) = self.shared.batch_times.lock() {
            times.note(started.elapsed());
        }
        self.health.note(batch.len(), &failures);
        let count = batch.len();
        // Only for requests already waiting (a later one asks the database again), and only
        // when the database could not be reached: a refused insert says nothing about reads.
        let asked = self.shared.history_queued.load(Ordering::Acquire) > 0;
        self.last_failure = failures
            .first()
            .filter(|_| asked && failures.len() == count)
            .and_then(|(_, reason)| unreachable_reason(reason));
        for record in saved(batch, &failures) {
            self.newest.note(record.accepted_millis);
        }
        let reports = failure_reports(batch, failures);
        *batch = Batch::default();
        stats.failed += reports.len() as u64;
        stats.saved += (count - reports.len()) as u64;
        self.shared
            .saved
            .fetch_add((count - reports.len()) as u64, Ordering::Release);
        if !reports.is_empty() {
            self.results.report(Report::NotSaved(reports));
        }
        self.shared
            .settled
            .fetch_add(count as u64, Ordering::Release);
        next
    }

    /// Sleeps until `until`, or until a history request is queued.
    fn wait_unless_history(&self, until: Instant) {
        loop {
            let now = Instant::now();
            if now >= until || self.shared.history_queued.load(Ordering::Acquire) > 0 {
                return;
            }
            thread::park_timeout(until - now);
        }
    }

    /// Answers `first` and the history requests right behind it with one query (they ask the
    /// same question: nothing was stored between them). Returns the record that ended the run.
    fn answer_history(&mut self, first: HistoryRequest) -> Option<Queued> {
        let mut requests = vec![first];
        let mut next = None;
        while let Ok(queued) = self.incoming.try_recv() {
            match queued {
                Queued::History(request) => requests.push(request),
                record => {
                    next = Some(record);
                    break;
                }
            }
        }
        let count = requests
            .iter()
            .map(|request| request.count)
            .max()
            .unwrap_or(0);
        let paused = self
            .history_paused_until
            .is_some_and(|until| Instant::now() < until);
        let lines = match self.last_failure.take() {
            Some(reason) => Err(reason),
            None if paused => Err(NOT_RESPONDING.to_string()),
            None => self.read_last(count),
        };
        self.shared
            .history_queued
            .fetch_sub(requests.len(), Ordering::AcqRel);
        self.results
            .report(Report::History(HistoryReply { requests, lines }));
        next
    }

    /// The last `count` stored messages, oldest first.
    fn read_last(&mut self, count: usize) -> Result<Arc<[StoredLine]>, String> {
        self.newest.keep_at_least(count);
        let plan = self.newest.plan(count, DateTime::now().timestamp_millis());
        let lines = self
            .reader
            .last_messages(count, plan, self.deadline)
            .inspect_err(|reason| {
                if reason.as_str() == NOT_RESPONDING {
                    self.history_paused_until = Some(Instant::now() + HISTORY_PAUSE);
                    warn!(
                        "a history query took over {:?}; history is refused for {HISTORY_PAUSE:?} so that saving goes on",
                        self.deadline
                    );
                }
            })?;
        self.newest.note_found(&lines, count);
        Ok(lines.into())
    }
}

/// How long history is refused after a query the database did not answer in time.
const HISTORY_PAUSE: Duration = Duration::from_secs(30);

/// The reason a whole batch failed, if it means the database could not be reached (without
/// the "it may still be saved" part, which is about the batch): a history request queued
/// behind it would only wait for the same answer.
fn unreachable_reason(reason: &str) -> Option<String> {
    let reason = reason.strip_suffix(MAY_STILL_BE_SAVED).unwrap_or(reason);
    [UNREACHABLE, CONNECTION_LOST, NOT_RESPONDING]
        .contains(&reason)
        .then(|| reason.to_string())
}

/// The records of `batch` stored, given the (unchecked) indexes of those that failed.
fn saved<'a>(
    batch: &'a [Record],
    failures: &[(usize, String)],
) -> impl Iterator<Item = &'a Record> {
    let mut failed: Vec<usize> = failures.iter().map(|(index, _)| *index).collect();
    failed.sort_unstable();
    batch
        .iter()
        .enumerate()
        .filter(move |(index, _)| failed.binary_search(index).is_err())
        .map(|(_, record)| record)
}

/// Reports every message of `batch` as not saved because storage stopped.
fn report_unsaved(
    batch: &[Record],
    results: &impl Reporter,
    shared: &Shared,
    stats: &mut PersistStats,
) {
    if batch.is_empty() {
        return;
    }
    let count = batch.len();
    let failures = (0..count).map(|index| (index, STORAGE_STOPPED.to_string()));
    let reports = failure_reports(batch, failures.collect());
    stats.failed += count as u64;
    results.report(Report::NotSaved(reports));
    shared.settled.fetch_add(count as u64, Ordering::Release);
}

/// The reports for the failed messages of `batch`. The indexes come from the database's
/// answer, so each is checked: one outside the batch is logged (once) and ignored, and a
/// message named twice is reported once.
fn failure_reports(batch: &[Record], mut failures: Vec<(usize, String)>) -> Vec<SaveFailure> {
    static OUT_OF_RANGE_LOGGED: AtomicBool = AtomicBool::new(false);
    failures.sort_by_key(|(index, _)| *index);
    failures.dedup_by_key(|(index, _)| *index);
    failures
        .into_iter()
        .filter_map(|(index, reason)| match batch.get(index) {
            Some(record) => Some(SaveFailure {
                sender: record.sender,
                content: record.content().to_string(),
                reason,
            }),
            None => {
                if !OUT_OF_RANGE_LOGGED.swap(true, Ordering::Relaxed) {
                    error!(
                        "MongoDB named message {index} of a batch of {} as failed ({reason}); ignored (logged once)",
                        batch.len()
                    );
                }
                None
            }
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use bson::Document;

    fn record(content: &str) -> Record {
        Record::new(
            ClientRef { slot: 3, id: 7 },
            "alice",
            "127.0.0.1:5000".parse().unwrap(),
            content,
            DateTime::from_millis(1_700_000_000_000),
        )
    }

    #[test]
    fn document_has_the_documented_fields() {
        let record = record("hi");
        let doc = Document::try_from(record.document()).unwrap();
        let keys: Vec<&str> = doc.keys().map(String::as_str).collect();
        assert_eq!(keys, ["_id", "content", "ip", "port", "nick", "timestamp"]);
        assert_eq!(Some(doc.get_object_id("_id").unwrap()), record.id());
        assert_eq!(doc.get_str("content").unwrap(), "hi");
        assert_eq!(doc.get_str("ip").unwrap(), "127.0.0.1");
        assert_eq!(doc.get_i32("port").unwrap(), 5000);
        assert_eq!(doc.get_str("nick").unwrap(), "alice");
        assert_eq!(
            doc.get_datetime("timestamp").unwrap().timestamp_millis(),
            1_700_000_000_000
        );
        assert_eq!(record.content(), "hi");
        assert_eq!(record.size(), record.document().as_bytes().len());
        assert_eq!(
            record.size(),
            85 + "hi".len() + "127.0.0.1".len() + "alice".len()
        );
    }

    /// Write error indexes come from the server: one outside the batch must not panic the
    /// thread, and the real ones are still reported, once each.
    #[test]
    fn failure_indexes_from_the_server_are_checked() {
        let batch = vec![record("zero"), record("one")];
        let failures = vec![
            (7, "database error 2".to_string()),
            (1, "database error 2".to_string()),
            (1, "database error 2".to_string()),
            (usize::MAX, "database error 2".to_string()),
        ];
        let reports = failure_reports(&batch, failures);
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert_eq!(reports[0].content, "one");
        assert_eq!(reports[0].sender, ClientRef { slot: 3, id: 7 });
        assert_eq!(reports[0].reason, "database error 2");
    }

    /// The persistence thread fails with a message in hand and one queued behind it: both are
    /// reported `storage stopped`, later messages are refused at once with that reason, and
    /// nothing is left unsettled.
    #[test]
    fn a_failed_persistence_thread_reports_storage_stopped() {
        let (reports, inbox) = mpsc::sync_channel(16);
        let (go, wait) = mpsc::channel::<()>();
        let work: Work = Box::new(move |incoming, shared, _results, batch, _stats| {
            let Ok(Queued::Save(record)) = incoming.recv() else {
                panic!("expected a record first");
            };
            take_bytes(shared, record.size());
            *batch = Arc::new(vec![record]);
            wait.recv().unwrap(); // until the test has queued another message
            panic!("test: the persistence thread fails");
        });
        let persister = Persister::spawn(4, 1 << 20, reports, work).unwrap();
        persister.submit(record("in hand")).unwrap();
        persister.submit(record("queued")).unwrap();
        let asker = ClientRef { slot: 1, id: 2 };
        let request = HistoryRequest {
            client: asker,
            ticket: 9,
            count: 20,
        };
        persister.request_history(request).unwrap();
        go.send(()).unwrap();
        let mut reported = Vec::new();
        let mut history = None;
        while reported.len() < 2 || history.is_none() {
            match inbox
                .recv_timeout(Duration::from_secs(10))
                .expect("reports")
            {
                Report::NotSaved(failures) => reported.extend(failures),
                Report::History(reply) => history = Some(reply),
            }
        }
        let history = history.unwrap();
        assert_eq!(history.requests, [request]);
        assert_eq!(history.lines.unwrap_err(), STORAGE_STOPPED);
        let texts: Vec<(&str, &str)> = reported
            .iter()
            .map(|f| (f.content.as_str(), f.reason.as_str()))
            .collect();
        assert_eq!(
            texts,
            [("in hand", STORAGE_STOPPED), ("queued", STORAGE_STOPPED)]
        );
        let refused = persister.submit(record("later")).unwrap_err();
        assert_eq!(
            (refused.content.as_str(), refused.reason),
            ("later", STORAGE_STOPPED)
        );
        assert!(persister.shared.failure_logged.load(Ordering::Acquire));
        assert_eq!(persister.queued_bytes(), 0);
        let stats = persister
            .finish(Duration::from_secs(10), || {})
            .expect("the thread ends once closed");
        assert_eq!(stats.failed, 2);
    }

    /// The queue refuses a message that would take it past its byte bound, and takes messages
    /// again once the thread has taken the queued ones off.
    #[test]
    fn the_queue_is_bounded_in_bytes() {
        let (reports, _inbox) = mpsc::sync_channel(16);
        let (go, wait) = mpsc::channel::<()>();
        let size = record("x".repeat(100).as_str()).size();
        let work: Work = Box::new(move |incoming, shared, _results, _batch, _stats| {
            wait.recv().unwrap();
            while let Ok(Queued::Save(record)) = incoming.recv() {
                take_bytes(shared, record.size());
                shared.settled.fetch_add(1, Ordering::Release);
            }
        });
        let persister = Persister::spawn(100, 2 * size, reports, work).unwrap();
        let long = "x".repeat(100);
        persister.submit(record(&long)).unwrap();
        persister.submit(record(&long)).unwrap();
        let refused = persister.submit(record(&long)).unwrap_err();
        assert_eq!(refused.reason, QUEUE_FULL);
        assert_eq!(persister.queued_bytes(), 2 * size);
        go.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while persister.settled() < 2 {
            assert!(Instant::now() < deadline, "the thread took nothing");
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(persister.queued_bytes(), 0);
        persister.submit(record(&long)).unwrap();
    }
}
