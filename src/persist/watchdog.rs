//! A deadline on every batch, and a new driver client when one hangs. The driver times out
//! server selection and connecting, but not an operation on a connection that is open and
//! silent (a hung database, or a dead host that sends no reset), so the driver calls run on a
//! worker thread of their own, and the persistence thread stops waiting for them when the
//! deadline passes.
//!
//! Each worker runs a single-threaded Tokio runtime with its own driver client, always inside
//! `block_on`: between batches it waits there for the next one, so the client's monitors keep
//! running, and a batch's network I/O wakes no other thread.
//!
//! A call that overran its deadline may not return for a quarter of an hour (until TCP gives
//! up), and every batch sent to the same client would wait behind it. So that client is
//! abandoned: its thread is left to finish whenever it does, and the next batch goes to a new
//! client on a new thread, which saves as soon as the database answers new connections. At most
//! `MAX_ABANDONED` abandoned clients may still be waiting (each holds sockets and driver
//! tasks); beyond that, batches fail at once until one of them finishes.

use std::future::Future;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::thread;
use std::time::Duration;

use tokio::sync::mpsc as job_channel;

use super::history::{Slice, StoredLine};
use super::store::{Store, MAY_STILL_BE_SAVED};
use super::{Batch, Record};
use crate::config::StoreConfig;
use crate::{error, info, warn};

/// A whole batch (server selection, insert, one retry) may take this many `--mongo-timeout-ms`
/// before it is reported as not saved. The driver cannot time out an operation on a connection
/// that is open but silent (a hung or stopped database), so the watchdog does.
pub const BATCH_DEADLINE_FACTOR: u32 = 3;

/// Abandoned driver clients that may still be waiting for an answer. Each one holds its
/// connections, its driver tasks and a thread; a database that keeps hanging new connections
/// must not make the server pile them up.
pub const MAX_ABANDONED: usize = 4;

/// Why a batch was given up on by the watchdog, or never sent because every client allowed is
/// waiting for a database that does not answer.
pub(super) const NOT_RESPONDING: &str = "database not responding";

/// Why a batch failed when the thread running its driver calls died (a panic).
const WORKER_FAILED: &str = "storage error";

/// What runs the driver calls on a worker thread: the real `Store`, or a stand-in in the unit
/// tests of this module.
pub trait Saver: Send + 'static {
    /// Connects and prepares the collection; runs once, on the first worker only.
    fn prepare(&mut self) -> impl Future<Output = ()>;
    /// Stores a batch; returns the index of each record not stored, with the reason.
    fn save(&mut self, batch: &[Record]) -> impl Future<Output = Vec<(usize, String)>>;
    /// The last `count` stored messages, oldest first, looking in the ranges of `plan`.
    fn last_messages(
        &mut self,
        count: usize,
        plan: &[Slice],
    ) -> impl Future<Output = Result<Vec<StoredLine>, String>>;
}

impl Saver for Store {
    fn prepare(&mut self) -> impl Future<Output = ()> {
        Store::prepare(self)
    }

    fn save(&mut self, batch: &[Record]) -> impl Future<Output = Vec<(usize, String)>> {
        Store::save(self, batch)
    }

    fn last_messages(
        &mut self,
        count: usize,
        plan: &[Slice],
    ) -> impl Future<Output = Result<Vec<StoredLine>, String>> {
        Store::last_messages(self, count, plan)
    }
}

/// A driver call for a worker.
enum Job {
    Save(Batch),
    History { count: usize, plan: Vec<Slice> },
}

/// What a worker hands back.
enum Done {
    /// The collection is prepared (the first worker's first answer).
    Prepared,
    /// A batch's failed indexes and reasons.
    Saved(Vec<(usize, String)>),
    History(Result<Vec<StoredLine>, String>),
}

/// Why a call got no answer from its worker.
struct NoAnswer {
    reason: &'static str,
    /// The call was handed over before it failed, so it may have done its work.
    sent: bool,
}

/// Makes the saver for each new worker.
type MakeSaver<S> = Box<dyn FnMut() -> S + Send>;

/// Runs each batch on a worker thread and gives up on it after its deadline; replaces a worker
/// that hangs or dies.
pub struct Inserter<S: Saver = Store> {
    make_saver: MakeSaver<S>,
    /// The worker for the next batch; `None` until one is needed.
    current: Option<Worker>,
    /// Workers given up on, whose driver call has not returned yet.
    abandoned: Vec<Worker>,
    /// Workers started so far; only the first prepares the collection.
    started: u64,
    /// The cap on abandoned workers was hit and logged; logged again only after it was left.
    at_cap: bool,
}

/// One worker thread, with its own saver (its own driver client).
struct Worker {
    /// `None` once abandoned: the thread ends after its call returns.
    jobs: Option<job_channel::Sender<Job>>,
    done: Receiver<Done>,
    /// Start-up (connect, index) has not reported yet.
    starting: bool,
    /// Messages in the batch given up on, to log what became of them if it finishes late.
    given_up: usize,
}

/// A worker thread found dead; with the job back if it never took it.
struct Dead(Option<Job>);

impl Inserter {
    /// An inserter storing with `config`; each worker gets a new `Store`, so a new client. Its
    /// first worker connects and prepares the collection at once.
    pub fn new(config: StoreConfig) -> Inserter {
        Inserter::with_savers(Box::new(move || Store::new(config.clone())))
    }

    /// The same for history queries only, with clients of its own: a query the watchdog gives
    /// up on then never costs saving a client (or, at the cap, saving itself). It leaves the
    /// collection to the saving side and connects on its first query.
    pub fn for_reads(config: StoreConfig) -> Inserter {
        let make_saver: MakeSaver<Store> = Box::new(move || Store::new(config.clone()));
        Inserter {
            make_saver,
            current: None,
            abandoned: Vec::new(),
            started: 1, // so no worker of this one prepares the collection
            at_cap: false,
        }
    }
}

impl<S: Saver> Inserter<S> {
    /// Starts the first worker at once: it connects and creates the index before any message.
    fn with_savers(make_saver: MakeSaver<S>) -> Inserter<S> {
        let mut inserter = Inserter {
            make_saver,
            current: None,
            abandoned: Vec::new(),
            started: 0,
            at_cap: false,
        };
        inserter.current = inserter.start_worker().ok();
        inserter
    }

    /// Stores `batch`, or gives up after `deadline`. Returns the failed indexes and reasons.
    pub fn save(&mut self, batch: &Batch, deadline: Duration) -> Vec<(usize, String)> {
        let count = batch.len();
        match self.call(Job::Save(batch.clone()), deadline) {
            Ok(Done::Saved(failures)) => failures,
            Ok(_) => all_failed(count, WORKER_FAILED),
            Err(NoAnswer { reason, sent: true }) => {
                all_failed(count, &format!("{reason}{MAY_STILL_BE_SAVED}"))
            }
            Err(NoAnswer {
                reason,
                sent: false,
            }) => all_failed(count, reason),
        }
    }

    /// Reads the last `count` messages, or gives up after `deadline`.
    pub fn last_messages(
        &mut self,
        count: usize,
        plan: Vec<Slice>,
        deadline: Duration,
    ) -> Result<Vec<StoredLine>, String> {
        match self.call(Job::History { count, plan }, deadline) {
            Ok(Done::History(result)) => result,
            Ok(_) => Err(WORKER_FAILED.to_string()),
            Err(NoAnswer { reason, .. }) => Err(reason.to_string()),
        }
    }

    /// Runs `job` on the current worker (starting one if needed) and waits up to `deadline`
    /// for its answer; a worker that overruns is abandoned, one found dead is replaced.
    fn call(&mut self, job: Job, deadline: Duration) -> Result<Done, NoAnswer> {
        self.collect_late();
        let mut job = Some(job);
        // A worker found dead before it took the job gets one replacement.
        for _ in 0..2 {
            let mut worker = match self.current.take() {
                Some(worker) => worker,
                None => self.start_worker().map_err(|reason| NoAnswer {
                    reason,
                    sent: false,
                })?,
            };
            if worker.starting {
                match worker.done.recv_timeout(deadline) {
                    Ok(_) => worker.starting = false,
                    Err(RecvTimeoutError::Timeout) => {
                        // This job was never sent: it certainly did nothing.
                        self.abandon(worker, 0, deadline);
                        return Err(NoAnswer {
                            reason: NOT_RESPONDING,
                            sent: false,
                        });
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        died();
                        continue;
                    }
                }
            }
            let Some(this_job) = job.take() else { break };
            let saving = match &this_job {
                Job::Save(batch) => batch.len(),
                Job::History { .. } => 0,
            };
            match worker.run(this_job, deadline) {
                Ok(Some(done)) => {
                    self.current = Some(worker);
                    return Ok(done);
                }
                Ok(None) => {
                    self.abandon(worker, saving, deadline);
                    return Err(NoAnswer {
                        reason: NOT_RESPONDING,
                        sent: true,
                    });
                }
                Err(Dead(Some(returned))) => {
                    died();
                    job = Some(returned);
                }
                Err(Dead(None)) => {
                    died();
                    return Err(NoAnswer {
                        reason: WORKER_FAILED,
                        sent: true,
                    });
                }
            }
        }
        Err(NoAnswer {
            reason: WORKER_FAILED,
            sent: false,
        })
    }

    /// A new worker with a new saver, unless the abandoned ones already fill the cap.
    fn start_worker(&mut self) -> Result<Worker, &'static str> {
        if self.abandoned.len() >= MAX_ABANDONED {
            if !self.at_cap {
                self.at_cap = true;
                warn!(
                    "{MAX_ABANDONED} MongoDB clients given up on are still waiting for answers; \
                     batches fail at once until one of them finishes"
                );
            }
            return Err(NOT_RESPONDING);
        }
        let prepare = self.started == 0;
        self.started += 1;
        let mut saver = (self.make_saver)();
        let (jobs, mut job_rx) = job_channel::channel::<Job>(1);
        // Room for one answer: the worker never waits to hand it over.
        let (done_tx, done) = mpsc::sync_channel(1);
        let spawned = thread::Builder::new()
            .name(format!("peerchat-db-{}", self.started))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => return error!("cannot start the database runtime: {err}"),
                };
                runtime.block_on(async move {
                    if prepare {
                        saver.prepare().await;
                        if done_tx.send(Done::Prepared).is_err() {
                            return;
                        }
                    }
                    while let Some(job) = job_rx.recv().await {
                        let done = match job {
                            Job::Save(batch) => Done::Saved(saver.save(&batch).await),
                            Job::History { count, plan } => {
                                Done::History(saver.last_messages(count, &plan).await)
                            }
                        };
                        if done_tx.send(done).is_err() {
                            return;
                        }
                    }
                });
            });
        match spawned {
            Ok(_) => Ok(Worker {
                jobs: Some(jobs),
                done,
                starting: prepare,
                given_up: 0,
            }),
            Err(err) => {
                error!("cannot start a database thread: {err}");
                Err(WORKER_FAILED)
            }
        }
    }

    /// Leaves `worker` to finish its call on its own; the next batch gets a new one.
    fn abandon(&mut self, mut worker: Worker, given_up: usize, deadline: Duration) {
        worker.jobs = None;
        worker.given_up = given_up;
        self.abandoned.push(worker);
        warn!(
            "MongoDB did not answer within {deadline:?}: giving up on that client (left to finish \
             on its own, {} of at most {MAX_ABANDONED} waiting); the next batch uses a new one",
            self.abandoned.len()
        );
    }

    /// Takes the answers of abandoned workers that have finished, without waiting, and says how
    /// much of their batches was stored after all.
    fn collect_late(&mut self) {
        self.abandoned.retain(|worker| match worker.done.try_recv() {
            Ok(done) => {
                let failures = match done {
                    Done::Saved(failures) => failures,
                    _ => Vec::new(),
                };
                if worker.given_up > 0 {
                    info!(
                        "MongoDB answered late: {} of {} messages reported \"not responding\" were stored after all",
                        worker.given_up.saturating_sub(failures.len()),
                        worker.given_up
                    );
                }
                false
            }
            Err(TryRecvError::Empty) => true,
            Err(TryRecvError::Disconnected) => false,
        });
        if self.abandoned.len() < MAX_ABANDONED {
            self.at_cap = false;
        }
    }

    /// Abandoned workers still waiting.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.abandoned.len()
    }
}

impl Worker {
    /// Gives the worker `job` and waits up to `deadline` for its answer: `Ok(None)` if it did
    /// not come in time.
    fn run(&mut self, job: Job, deadline: Duration) -> Result<Option<Done>, Dead> {
        let Some(jobs) = self.jobs.as_ref() else {
            return Err(Dead(Some(job)));
        };
        // Never waits: the worker has finished its last job, so the channel is empty.
        if let Err(returned) = jobs.blocking_send(job) {
            self.jobs = None;
            return Err(Dead(Some(returned.0)));
        }
        match self.done.recv_timeout(deadline) {
            Ok(done) => Ok(Some(done)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(Dead(None)),
        }
    }
}

/// A worker thread died (a panic, already printed): say what happens next.
fn died() {
    error!("the database thread failed; a new one with a new MongoDB client takes the next batch");
}

fn all_failed(count: usize, reason: &str) -> Vec<(usize, String)> {
    (0..count)
        .map(|index| (index, reason.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    //! The watchdog's bookkeeping, with stand-in savers that hang or panic on demand (the tests
    //! in tests/persistence.rs drive the real driver through a proxy that hangs connections).

    use super::*;
    use crate::persist::ClientRef;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    /// What a stand-in saver does with each batch.
    enum Behaviour {
        Store,
        /// Blocks until its channel gets a message (or is dropped), then stores.
        Hang(Receiver<()>),
        Panic,
    }

    struct StandIn(Behaviour);

    impl Saver for StandIn {
        async fn prepare(&mut self) {}

        async fn save(&mut self, _batch: &[Record]) -> Vec<(usize, String)> {
            match &self.0 {
                Behaviour::Store => Vec::new(),
                // Blocks the worker's runtime, as a hung driver call keeps it waiting.
                Behaviour::Hang(release) => {
                    let _ = release.recv();
                    Vec::new()
                }
                Behaviour::Panic => panic!("test: the database thread fails"),
            }
        }

        async fn last_messages(
            &mut self,
            count: usize,
            _plan: &[Slice],
        ) -> Result<Vec<StoredLine>, String> {
            self.save(&[]).await;
            let line = |at_millis| StoredLine {
                at_millis,
                nick: "t".to_string(),
                text: "t".to_string(),
                action: false,
            };
            Ok((0..count as i64).map(line).collect())
        }
    }

    /// An inserter whose n-th worker behaves as the n-th of `behaviours` (then stores), and a
    /// count of the workers started.
    fn inserter(behaviours: Vec<Behaviour>) -> (Inserter<StandIn>, Arc<Mutex<usize>>) {
        let started = Arc::new(Mutex::new(0));
        let count = started.clone();
        let mut behaviours = behaviours.into_iter();
        let make: MakeSaver<StandIn> = Box::new(move || {
            *count.lock().unwrap() += 1;
            StandIn(behaviours.next().unwrap_or(Behaviour::Store))
        });
        (Inserter::with_savers(make), started)
    }

    fn batch(len: usize) -> Batch {
        let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let sender = ClientRef { slot: 0, id: 1 };
        Arc::new(
            (0..len)
                .map(|n| Record::new(sender, "t", addr, &n.to_string(), bson::DateTime::now()))
                .collect(),
        )
    }

    /// Long enough for a stand-in that stores at once on a loaded machine; a hanging one never
    /// answers, so it overruns any deadline.
    const DEADLINE: Duration = Duration::from_secs(5);
    const SHORT: Duration = Duration::from_millis(20);

    fn reasons(failures: &[(usize, String)]) -> Vec<&str> {
        failures.iter().map(|(_, reason)| reason.as_str()).collect()
    }

    #[test]
    fn a_hung_call_is_abandoned_and_the_next_batch_goes_to_a_new_worker() {
        let (release, hang) = mpsc::channel();
        let (mut inserter, started) = inserter(vec![Behaviour::Hang(hang)]);
        let failures = inserter.save(&batch(2), SHORT);
        assert_eq!(
            reasons(&failures),
            ["database not responding; it may still be saved"; 2]
        );
        assert!(inserter.save(&batch(3), DEADLINE).is_empty(), "new worker");
        assert_eq!(*started.lock().unwrap(), 2);
        assert_eq!(inserter.waiting(), 1);

        release.send(()).unwrap(); // the hung call returns at last
        let deadline = Instant::now() + DEADLINE;
        while inserter.waiting() > 0 {
            assert!(
                Instant::now() < deadline,
                "the late answer was not collected"
            );
            thread::sleep(Duration::from_millis(5));
            inserter.collect_late();
        }
        assert!(inserter.save(&batch(1), DEADLINE).is_empty());
        assert_eq!(*started.lock().unwrap(), 2, "the working worker is kept");
    }

    #[test]
    fn at_most_four_abandoned_workers_then_batches_fail_at_once() {
        let mut releases = Vec::new();
        let hangs = (0..MAX_ABANDONED)
            .map(|_| {
                let (release, hang) = mpsc::channel();
                releases.push(release);
                Behaviour::Hang(hang)
            })
            .collect();
        let (mut inserter, started) = inserter(hangs);
        for _ in 0..MAX_ABANDONED {
            let failures = inserter.save(&batch(1), SHORT);
            assert_eq!(
                reasons(&failures),
                ["database not responding; it may still be saved"]
            );
        }
        // At the cap: never sent, so certainly not saved, and no fifth client is made.
        let failures = inserter.save(&batch(2), DEADLINE);
        assert_eq!(reasons(&failures), ["database not responding"; 2]);
        assert_eq!(*started.lock().unwrap(), MAX_ABANDONED);

        drop(releases.remove(0)); // one hung call returns
        let deadline = Instant::now() + DEADLINE;
        loop {
            let failures = inserter.save(&batch(1), DEADLINE);
            if failures.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "still failing: {failures:?}");
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(*started.lock().unwrap(), MAX_ABANDONED + 1);
    }

    #[test]
    fn a_hung_history_query_is_given_up_on_and_the_next_goes_to_a_new_worker() {
        let (release, hang) = mpsc::channel();
        let (mut inserter, started) = inserter(vec![Behaviour::Hang(hang)]);
        let hung = inserter.last_messages(3, Vec::new(), SHORT);
        assert_eq!(hung.unwrap_err(), "database not responding");
        let answered = inserter.last_messages(3, Vec::new(), DEADLINE);
        assert_eq!(answered.unwrap().len(), 3, "new worker");
        assert_eq!(*started.lock().unwrap(), 2);
        assert_eq!(inserter.waiting(), 1);
        drop(release);
    }

    #[test]
    fn a_dead_worker_is_replaced_and_its_batch_reported() {
        let (mut inserter, started) = inserter(vec![Behaviour::Panic]);
        let failures = inserter.save(&batch(2), DEADLINE);
        assert_eq!(
            reasons(&failures),
            ["storage error; it may still be saved"; 2]
        );
        assert!(inserter.save(&batch(2), DEADLINE).is_empty(), "new worker");
        assert_eq!(*started.lock().unwrap(), 2);
    }
}
