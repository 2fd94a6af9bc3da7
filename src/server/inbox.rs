//! The event loop's one way in from other threads: a bounded channel plus a `mio::Waker`.
//!
//! Sockets wake the loop through the poll; everything else (persistence results, a shutdown
//! request, and later history replies or other nodes' messages) arrives here, so the loop has a
//! single place to look when it is woken. Wakes coalesce, so the loop drains the channel until
//! it is empty each time.

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;

use mio::Waker;

use crate::cluster::{ClusterInput, ClusterSink};
use crate::persist::{HistoryReply, Report, Reporter, SaveFailure};

/// Items in flight to the loop before senders wait. Each item is a whole batch of results, so
/// this is small; a sender that waits is another thread, never the loop.
const INBOX_CAPACITY: usize = 256;

/// What other threads tell the loop.
#[derive(Debug)]
pub enum LoopInput {
    /// Messages the persistence thread could not store.
    NotSaved(Vec<SaveFailure>),
    /// Stored messages some clients asked for.
    History(HistoryReply),
    /// Other cluster nodes' messages and presence, and answers to `/nick` claims.
    Cluster(ClusterInput),
    /// Stop the server.
    Shutdown,
}

impl LoopInput {
    /// How much of the loop's per-turn inbox budget this takes: one per event for other
    /// nodes' events (each may be a message to fan out), one for anything else.
    pub fn weight(&self) -> usize {
        match self {
            LoopInput::Cluster(ClusterInput::Events(events)) => events.len().max(1),
            _ => 1,
        }
    }
}

/// The sending side, cloned into every thread that talks to the loop.
#[derive(Clone, Debug)]
pub struct LoopSender {
    tx: SyncSender<LoopInput>,
    waker: Arc<Waker>,
}

/// The loop has stopped; nothing will read this input.
#[derive(Debug)]
pub struct LoopGone;

impl LoopSender {
    /// Sends `input` and wakes the loop. Blocks while the inbox is full.
    pub fn send(&self, input: LoopInput) -> Result<(), LoopGone> {
        self.tx.send(input).map_err(|_| LoopGone)?;
        // A wake only fails if the eventfd cannot be written, which cannot happen while the
        // poll exists; the loop also drains the inbox at the end of every turn.
        let _ = self.waker.wake();
        Ok(())
    }
}

/// Save failures and history answers come to the loop like everything else from other threads.
impl Reporter for LoopSender {
    fn report(&self, report: Report) {
        let input = match report {
            Report::NotSaved(failures) => LoopInput::NotSaved(failures),
            Report::History(reply) => LoopInput::History(reply),
        };
        // If the loop is gone the server is stopping; the thread keeps storing what is queued.
        let _ = self.send(input);
    }
}

/// Other nodes' events come to the loop like everything else; the watcher waits while the
/// inbox is full (the change stream holds the rest).
impl ClusterSink for LoopSender {
    fn send(&self, input: ClusterInput) -> Result<(), LoopGone> {
        LoopSender::send(self, LoopInput::Cluster(input))
    }
}

/// The loop's receiving side.
#[derive(Debug)]
pub struct Inbox {
    rx: Receiver<LoopInput>,
}

impl Inbox {
    /// Creates the channel; `waker` must be registered with the loop's poll.
    pub fn new(waker: Waker) -> (LoopSender, Inbox) {
        let (tx, rx) = mpsc::sync_channel(INBOX_CAPACITY);
        let sender = LoopSender {
            tx,
            waker: Arc::new(waker),
        };
        (sender, Inbox { rx })
    }

    /// The next waiting input, without blocking.
    pub fn next(&self) -> Option<LoopInput> {
        // Empty or disconnected (every sender gone): either way nothing more to read now.
        self.rx.try_recv().ok()
    }
}
