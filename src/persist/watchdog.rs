//! A deadline on every batch. The driver times out server selection and connecting, but not
//! an operation on a connection that is open and silent (a hung or stopped database), so the
//! blocking driver calls run on a thread of their own and the persistence thread stops waiting
//! for them when the deadline passes.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::thread;
use std::time::Duration;

use bson::Document;

use super::store::{Store, MAY_STILL_BE_SAVED};
use crate::info;

/// A whole batch (server selection, insert, one retry) may take this many `--mongo-timeout-ms`
/// before it is reported as not saved. The driver cannot time out an operation on a connection
/// that is open but silent (a hung or stopped database), so the watchdog does.
pub const BATCH_DEADLINE_FACTOR: u32 = 3;

/// Why a batch was given up on by the watchdog. The insert may still complete if the database
/// wakes up, and the sender should know that.
const NOT_RESPONDING: &str = "database not responding";

/// Runs the blocking driver calls on a thread of their own, so the persistence thread can stop
/// waiting for a database that does not answer. At most one batch is in the driver at a time;
/// once one has overrun its deadline, later batches fail at once until it comes back, so
/// senders hear promptly and the queue does not pile up behind a hung database.
pub struct Inserter {
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
    pub fn start(mut store: Store) -> std::io::Result<Inserter> {
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
    pub fn save(&mut self, documents: Vec<Document>, deadline: Duration) -> Vec<(usize, String)> {
        let count = documents.len();
        if self.busy {
            let wait_for_previous = if self.stuck { Duration::ZERO } else { deadline };
            match self.wait(wait_for_previous) {
                Some(late) => self.note_late(&late),
                // This batch was never sent: it is certainly not saved.
                None => return all_failed(count, NOT_RESPONDING),
            }
        }
        if self.jobs.send(documents).is_err() {
            return all_failed(count, "storage stopped");
        }
        self.busy = true;
        self.wait(deadline).unwrap_or_else(|| {
            self.given_up = count;
            all_failed(count, &format!("{NOT_RESPONDING}{MAY_STILL_BE_SAVED}"))
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
