//! Several servers sharing one chat through MongoDB (`--cluster`).
//!
//! Every message is already inserted into MongoDB, and a replica set publishes every insert as
//! a change-stream event: each node watches the database and delivers other nodes' messages to
//! its own clients. There are no links between servers. Two threads per node talk to the
//! database, never the event loop:
//!
//! ```text
//!  event loop ── PresenceUpdate (joins, leaves, /nick claims) ──> writer thread ──> presence
//!      ▲                                                          (heartbeat)     collection
//!      │ ClusterInput (inbox + waker, bounded batches)
//!  forwarder thread <── StreamEvent (bounded) ── watcher thread <── change stream (one per node)
//! ```
//!
//! - `watcher`: one change stream on the database, matching inserts into the messages
//!   collection by other nodes and every change of the presence collection. It keeps the
//!   resume token after every event and every empty batch (the post-batch token, so a quiet
//!   stream's token never ages out of the oplog), resumes from it after an error, and when
//!   resuming is impossible (error 286, an invalidated stream) backfills from the collection.
//!   A stream silent for 3 heartbeat intervals is logged as stalled and reopened.
//! - `writer`: this node's heartbeat (every `--heartbeat-interval`), one presence document per
//!   connected client, nick claims settled by a unique index, and sweeping out nodes that
//!   stopped without a word.
//! - `documents`: the stored shapes and how change events are read back.
//!
//! The loop side (who is on the other nodes, what their events mean to local clients) is the
//! server's `roster`.

mod documents;
mod watcher;
mod writer;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bson::DateTime;

use crate::config::{ClusterConfig, StoreConfig};
use crate::persist::ClientRef;
pub use crate::server::inbox::LoopGone;
use crate::{info, warn};
pub use documents::presence_collection;

/// What the cluster threads tell the event loop.
#[derive(Debug)]
pub enum ClusterInput {
    /// Change-stream events, in stream order; at most `MAX_EVENTS_PER_BATCH`.
    Events(Vec<StreamEvent>),
    /// The answer to a `/nick` claim.
    NickClaimed {
        client: ClientRef,
        nick: String,
        result: Result<(), ClaimRefused>,
    },
}

/// Most events in one `ClusterInput::Events`: the loop handles a batch in one go, so this
/// bounds how long one batch holds it up.
pub const MAX_EVENTS_PER_BATCH: usize = 1000;

/// One thing another node did, as the change stream (or a backfill) told it.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamEvent {
    /// A chat message or `/me` action stored by another node.
    Message(RemoteMessage),
    /// A node is alive (this one too: how the loop knows its own stream is flowing).
    Heartbeat { node: String, interval: Duration },
    /// A node stopped cleanly, or was swept out after going silent.
    NodeGone { node: String },
    /// A client of another node joined, or (one already known) was written again, with a new
    /// nick or the same.
    ClientJoined(RemoteClient),
    /// A client of another node left: its node and connection id there.
    ClientLeft { node: String, id: u64 },
    /// Everyone on the other nodes, read from the presence collection: at start, and after a
    /// stream had to be replaced (its events in between are lost). `announce`: tell clients
    /// of the differences (false at start, when there is nobody to tell).
    Snapshot {
        clients: Vec<RemoteClient>,
        nodes: Vec<(String, Duration)>,
        announce: bool,
    },
    /// Messages from other nodes may have been lost and could not be read back.
    Missed,
}

/// A message from another node, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteMessage {
    pub node: String,
    pub nick: String,
    pub content: String,
    pub action: bool,
}

/// A client of another node, from its presence document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteClient {
    pub node: String,
    /// Its connection id on its node.
    pub id: u64,
    pub nick: String,
    /// When it joined, by the database's clock: `/who` lists every node's clients in order.
    pub joined_millis: i64,
}

/// Why a nick claim was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimRefused {
    /// Someone on some node has it (the unique index said so).
    Taken,
    /// The database could not settle it; the reason, for the client.
    Unsettled(String),
}

/// What the loop tells the writer, in the order it happened.
#[derive(Debug)]
pub enum PresenceUpdate {
    /// `joined`: this node's clock; the writer moves it to the database's.
    Joined {
        id: u64,
        nick: String,
        joined: DateTime,
    },
    /// `/nick`: claim `nick` for `client`; answered with `ClusterInput::NickClaimed`.
    Claim {
        client: ClientRef,
        nick: String,
    },
    Left {
        id: u64,
    },
}

/// Where the cluster threads send what the loop must hear. The server implements it with its
/// inbox; sending blocks while the loop is behind (the change stream is the buffer then).
pub trait ClusterSink: Send + 'static {
    /// Err once the loop is gone: the server is stopping.
    fn send(&self, input: ClusterInput) -> Result<(), LoopGone>;
}

/// Figures of the cluster threads, for `/stats`.
#[derive(Debug, Default)]
pub struct ClusterFigures {
    /// Streams found silent for 3 heartbeat intervals (each episode once).
    pub stream_stalls: AtomicU64,
    /// Streams reopened from their resume token after an error or a stall.
    pub stream_resumes: AtomicU64,
    /// Times the stream could not be resumed and messages were read back from the collection.
    pub backfills: AtomicU64,
    /// Gaps that even a backfill could not close (clients were told).
    pub missed_gaps: AtomicU64,
}

impl ClusterFigures {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A database call that did not return within its deadline (3 × `--mongo-timeout-ms`): the
/// driver cannot time out a database that stopped answering, so the cluster threads do.
#[derive(Debug)]
struct NotResponding;

impl fmt::Display for NotResponding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("database not responding")
    }
}

impl std::error::Error for NotResponding {}

/// `call`, given up on after `deadline`.
async fn within<T>(
    deadline: Duration,
    call: impl std::future::Future<Output = Result<T, mongodb::error::Error>>,
) -> Result<T, mongodb::error::Error> {
    match tokio::time::timeout(deadline, call).await {
        Ok(result) => result,
        Err(_) => Err(mongodb::error::Error::custom(NotResponding)),
    }
}

/// The database's clock: `hello` answers with it (`localTime`). Every presence time is on it,
/// so servers whose clocks differ still agree on what has expired.
async fn database_clock(client: &mongodb::Client) -> Result<bson::DateTime, mongodb::error::Error> {
    let hello = client
        .database("admin")
        .run_command(bson::doc! { "hello": 1 })
        .await?;
    Ok(hello
        .get_datetime("localTime")
        .copied()
        .unwrap_or_else(|_| bson::DateTime::now()))
}

/// A short reason for the log or a client, the deadline's own error included.
fn describe(err: &mongodb::error::Error) -> String {
    match err.get_custom::<NotResponding>() {
        Some(not_responding) => not_responding.to_string(),
        None => crate::persist::describe(err),
    }
}

/// Why `--cluster` could not start.
#[derive(Debug)]
pub enum StartError {
    /// The database cannot serve change streams (a standalone server): a setup mistake.
    NoChangeStreams(String),
    /// The database could not be reached, or refused the stream for another reason.
    Unavailable(String),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::NoChangeStreams(why) => write!(
                f,
                "--cluster needs MongoDB change streams, which only a replica set serves (a one-member replica set is enough; Atlas clusters are replica sets): {why}"
            ),
            StartError::Unavailable(why) => write!(
                f,
                "--cluster: could not open the change stream at start: {why}"
            ),
        }
    }
}

/// The loop's handle on the cluster threads.
pub struct Cluster {
    node_id: String,
    heartbeat: Duration,
    updates: tokio::sync::mpsc::UnboundedSender<PresenceUpdate>,
    writer: Option<JoinHandle<()>>,
    figures: Arc<ClusterFigures>,
    stop: Arc<AtomicBool>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.node_id)
            .finish()
    }
}

impl Cluster {
    /// Opens the change stream (waiting for it: a node that serves clients must already see
    /// the others), then starts the writer. Fails if the database serves no change streams or
    /// cannot be reached within its timeout.
    pub fn start(
        store: &StoreConfig,
        cluster: &ClusterConfig,
        sink: impl ClusterSink + Clone,
    ) -> Result<Cluster, StartError> {
        let figures = Arc::new(ClusterFigures::default());
        let stop = Arc::new(AtomicBool::new(false));
        // This process's mark in its heartbeat: another one under the same --node-id is noticed.
        let run = bson::oid::ObjectId::new();
        let watching = watcher::Watching {
            figures: figures.clone(),
            stop: stop.clone(),
            run,
        };
        watcher::start(store, cluster, sink.clone(), watching)?;
        let (updates, writer) = writer::start(store.clone(), cluster.clone(), run, sink)
            .map_err(|err| StartError::Unavailable(err.to_string()))?;
        info!(
            "cluster: node {} watching {db}.{coll} and {db}.{presence}",
            cluster.node_id,
            db = store.database,
            coll = store.collection,
            presence = presence_collection(&store.collection),
        );
        Ok(Cluster {
            node_id: cluster.node_id.clone(),
            heartbeat: cluster.heartbeat,
            updates,
            writer: Some(writer),
            figures,
            stop,
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// `--heartbeat-interval`.
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    pub fn figures(&self) -> &ClusterFigures {
        &self.figures
    }

    /// Hands a presence change to the writer (never blocks).
    pub fn tell(&self, update: PresenceUpdate) {
        // The writer only ends when this handle stops it.
        let _ = self.updates.send(update);
    }

    /// Stops both threads. The writer first removes this node's presence documents, so the
    /// other nodes see its users leave at once; it is given until `deadline` for that, while
    /// `meanwhile` runs every few milliseconds (the loop empties its inbox there, so a thread
    /// waiting to hand something over is never stuck behind a loop that no longer reads).
    pub fn stop(mut self, deadline: Instant, mut meanwhile: impl FnMut()) {
        self.stop.store(true, Ordering::Release);
        drop(self.updates);
        let Some(writer) = self.writer.take() else {
            return;
        };
        while !writer.is_finished() && Instant::now() < deadline {
            meanwhile();
            thread::sleep(Duration::from_millis(10));
        }
        if writer.is_finished() {
            let _ = writer.join();
        } else {
            warn!("cluster: this node's presence was not removed in time; the other nodes drop its users when its heartbeat stops");
        }
    }
}
