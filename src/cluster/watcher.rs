//! The change stream: one per node, on a thread of its own, and the forwarder that hands its
//! events to the loop in bounded batches.
//!
//! The stream is read with `next_if_any`, one request at a time, and the resume token is kept
//! after every event and every empty batch: the post-batch token moves with the oplog even when
//! nothing matches, so a quiet stream's token never ages out (Meteor shipped that bug). After
//! an error the driver resumes on its own once; if the error still reaches us, the stream is
//! reopened from the kept token. When resuming is impossible (error 286: the oplog no longer
//! holds the token; or the stream was invalidated), a new stream is opened and every message
//! from other nodes since the last one delivered is read back from the collection, skipping
//! those already delivered. Only if that fails are clients told that messages may be missing.
//!
//! Events go to the forwarder through a bounded channel: when the loop is behind, the
//! forwarder waits on the inbox, this thread waits on the channel, and the stream (the
//! database) holds the rest. Nothing is dropped.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use mongodb::change_stream::event::{ChangeStreamEvent, ResumeToken};
use mongodb::change_stream::ChangeStream;
use mongodb::error::{Error as DbError, ErrorKind};
use mongodb::Database;

use super::documents::{self, Read, StoredMessage};
use super::{database_clock, describe, within};
use super::{
    ClusterFigures, ClusterInput, ClusterSink, StartError, StreamEvent, MAX_EVENTS_PER_BATCH,
};
use crate::config::{ClusterConfig, StoreConfig, CLUSTER_SILENT_INTERVALS};
use crate::persist::connect_client;
use crate::{error, info, warn};

type Stream = ChangeStream<ChangeStreamEvent<Document>>;

/// How long one `getMore` waits for events before answering with an empty batch: how soon a
/// stop request or a silent stream is noticed.
const AWAIT: Duration = Duration::from_millis(500);

/// Events between the watcher and the forwarder.
const STREAM_BUFFER: usize = 4 * MAX_EVENTS_PER_BATCH;

/// A backfill starts this long before the newest message delivered: messages are stamped when
/// a node accepts them and stored up to a few seconds later, so the stream's order is not the
/// timestamps' order. Those already delivered are recognised by `_id`.
const BACKFILL_MARGIN_MS: i64 = 60_000;

/// Most missed messages one backfill delivers; past this the gap is reported.
const MAX_BACKFILL: usize = 10_000;

/// Delivered `_id`s remembered to keep a backfill from repeating them: those within the margin
/// of the newest, and never more than this many.
const MAX_REMEMBERED: usize = 1_000_000;

/// MongoDB's "change stream history lost": the token is no longer in the oplog.
const HISTORY_LOST: i32 = 286;
/// Other codes that mean the token cannot be used: InvalidResumeToken, ChangeStreamFatalError,
/// FailedToParse (a token the server does not understand).
const BAD_TOKEN: [i32; 3] = [260, 280, 9];
/// "The $changeStream stage is only supported on replica sets."
const NOT_A_REPLICA_SET: i32 = 40573;

/// What the watcher shares with the cluster's handle, and this process's mark.
pub(super) struct Watching {
    pub figures: Arc<ClusterFigures>,
    /// Set when the server stops.
    pub stop: Arc<AtomicBool>,
    /// This process's mark in its heartbeat document.
    pub run: ObjectId,
}

/// Opens the stream and starts reading it; returns once it is open (or could not be).
pub(super) fn start(
    store: &StoreConfig,
    cluster: &ClusterConfig,
    sink: impl ClusterSink,
    watching: Watching,
) -> Result<(), StartError> {
    let unavailable = |err: std::io::Error| StartError::Unavailable(err.to_string());
    let (events, to_forward) = mpsc::sync_channel(STREAM_BUFFER);
    thread::Builder::new()
        .name("peerchat-cluster-fwd".to_string())
        .spawn(move || forward(to_forward, sink))
        .map_err(unavailable)?;
    let (ready, opened) = mpsc::channel();
    let (store, cluster) = (store.clone(), cluster.clone());
    let timeout = store.timeout;
    thread::Builder::new()
        .name("peerchat-cluster-watch".to_string())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    let _ = ready.send(Err(StartError::Unavailable(err.to_string())));
                    return;
                }
            };
            runtime.block_on(async move {
                let Some((watcher, stream)) =
                    Watcher::open_first(store, cluster, events, watching, ready).await
                else {
                    return;
                };
                watcher.run(stream).await;
            });
        })
        .map_err(unavailable)?;
    // Server selection and connecting each take up to the timeout; the first answer may too.
    match opened.recv_timeout(timeout * 4 + Duration::from_secs(1)) {
        Ok(result) => result,
        Err(_) => Err(StartError::Unavailable(
            "the database did not answer".to_string(),
        )),
    }
}

/// Hands events to the loop: everything waiting, up to a batch, in one inbox item.
fn forward(events: Receiver<StreamEvent>, sink: impl ClusterSink) {
    while let Ok(first) = events.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_EVENTS_PER_BATCH {
            match events.try_recv() {
                Ok(event) => batch.push(event),
                Err(_) => break,
            }
        }
        if sink.send(ClusterInput::Events(batch)).is_err() {
            return;
        }
    }
}

/// The server is stopping: the loop or the forwarder is gone, or a stop was asked for.
struct Stopped;

struct Watcher {
    database: Database,
    messages: String,
    presence: String,
    me: String,
    interval: Duration,
    /// `--mongo-timeout-ms`: a request that takes longer than `AWAIT` plus 3 of these has hung.
    timeout: Duration,
    token: Option<ResumeToken>,
    delivered: Delivered,
    /// When this node began watching (its clock): a backfill never reaches further back.
    started_millis: i64,
    /// When the stream last said anything (any event; this node's heartbeat included).
    last_heard: Instant,
    /// A stall was logged and nothing has been heard since.
    stalled: bool,
    /// Who is on the other nodes must be read (again): `Some(announce)`. Retried with every
    /// empty batch until it works, since joins before it are in no later event.
    snapshot_due: Option<bool>,
    /// The last snapshot read failed (logged once).
    snapshot_failing: bool,
    /// When the stream last answered (this node's clock): a backfill reaches back no further
    /// than that (less the margin) for nodes not heard from.
    last_answer_millis: i64,
    /// Another process runs under this `--node-id` (logged once).
    same_id_logged: bool,
    run: ObjectId,
    events: SyncSender<StreamEvent>,
    figures: Arc<ClusterFigures>,
    stop: Arc<AtomicBool>,
}

impl Watcher {
    /// Connects and opens the first stream, telling `ready` how that went.
    async fn open_first(
        store: StoreConfig,
        cluster: ClusterConfig,
        events: SyncSender<StreamEvent>,
        watching: Watching,
        ready: mpsc::Sender<Result<(), StartError>>,
    ) -> Option<(Watcher, Stream)> {
        let client = match connect_client(&store).await {
            Ok(client) => client,
            Err(err) => {
                let _ = ready.send(Err(StartError::Unavailable(describe(&err))));
                return None;
            }
        };
        let mut watcher = Watcher {
            database: client.database(&store.database),
            presence: documents::presence_collection(&store.collection),
            messages: store.collection,
            me: cluster.node_id,
            interval: cluster.heartbeat,
            timeout: store.timeout,
            token: None,
            delivered: Delivered::default(),
            started_millis: DateTime::now().timestamp_millis(),
            last_heard: Instant::now(),
            stalled: false,
            snapshot_due: Some(false),
            snapshot_failing: false,
            last_answer_millis: DateTime::now().timestamp_millis(),
            same_id_logged: false,
            run: watching.run,
            events,
            figures: watching.figures,
            stop: watching.stop,
        };
        let stream = match watcher.open().await {
            Ok(stream) => stream,
            Err(err) => {
                let _ = ready.send(Err(start_error(&err)));
                return None;
            }
        };
        watcher.token = stream.resume_token();
        let _ = ready.send(Ok(()));
        // Who is already on the other nodes; their later joins and leaves come as events.
        watcher.read_snapshot_if_due().await.ok()?;
        Some((watcher, stream))
    }

    /// Reads the stream until the server stops, reopening or replacing it as needed.
    async fn run(mut self, mut stream: Stream) {
        while !self.stop.load(Ordering::Acquire) {
            let next = tokio::time::timeout(AWAIT + self.timeout * 3, stream.next_if_any()).await;
            let outcome = match next {
                Ok(Ok(Some(event))) => self.on_event(&event, &stream),
                Ok(Ok(None)) => self.on_quiet(&stream),
                Ok(Err(err)) => self.on_error(err),
                Err(_) => self.on_silence("a request to the database did not return"),
            };
            match outcome {
                Ok(None) => {
                    if self.read_snapshot_if_due().await.is_err() {
                        return;
                    }
                }
                Ok(Some(next)) => match self.recover(next).await {
                    Ok(replaced) => stream = replaced,
                    Err(Stopped) => return,
                },
                Err(Stopped) => return,
            }
        }
    }

    fn on_event(
        &mut self,
        event: &ChangeStreamEvent<Document>,
        stream: &Stream,
    ) -> Result<Option<Recovery>, Stopped> {
        self.heard();
        match documents::read_event(event, &self.messages, (&self.me, self.run)) {
            Read::Message(message) => self.deliver(message)?,
            Read::Event(event) => self.send(event)?,
            Read::Nothing => {}
            Read::SameNodeId => {
                if !std::mem::replace(&mut self.same_id_logged, true) {
                    error!(
                        "cluster: another server runs with --node-id {}: each takes the other's messages for its own and they do not see them; give every server its own id",
                        self.me
                    );
                }
            }
            Read::Invalidated => {
                return Ok(Some(Recovery::Replace(
                    "the change stream was invalidated".to_string(),
                )))
            }
        }
        self.token = stream.resume_token();
        Ok(None)
    }

    /// An empty batch: keep its post-batch token, and look for a stream that went silent.
    fn on_quiet(&mut self, stream: &Stream) -> Result<Option<Recovery>, Stopped> {
        self.token = stream.resume_token();
        self.last_answer_millis = DateTime::now().timestamp_millis();
        if !stream.is_alive() {
            return Ok(Some(Recovery::Replace(
                "the change stream was closed".to_string(),
            )));
        }
        if self.last_heard.elapsed() > self.interval * CLUSTER_SILENT_INTERVALS {
            return self.on_silence("no heartbeat, not even this node's");
        }
        Ok(None)
    }

    fn on_error(&mut self, err: DbError) -> Result<Option<Recovery>, Stopped> {
        if resume_impossible(&err) {
            return Ok(Some(Recovery::Replace(describe_full(&err))));
        }
        warn!(
            "cluster: change stream error ({}); resuming it",
            describe_full(&err)
        );
        Ok(Some(Recovery::Resume))
    }

    /// The stream said nothing for 3 heartbeat intervals, or a request hung: logged once per
    /// episode, counted, and reopened from the kept token.
    fn on_silence(&mut self, why: &str) -> Result<Option<Recovery>, Stopped> {
        if !self.stalled {
            self.stalled = true;
            ClusterFigures::add(&self.figures.stream_stalls);
            warn!(
                "cluster: the change stream has stalled ({why} for {:.0?}); reopening it",
                self.last_heard.elapsed()
            );
        }
        self.last_heard = Instant::now();
        Ok(Some(Recovery::Resume))
    }

    fn heard(&mut self) {
        self.last_heard = Instant::now();
        self.last_answer_millis = DateTime::now().timestamp_millis();
        if std::mem::take(&mut self.stalled) {
            info!("cluster: the change stream is flowing again");
        }
    }

    /// A new stream, from the kept token or (if that cannot be) from now with a backfill.
    async fn recover(&mut self, how: Recovery) -> Result<Stream, Stopped> {
        let why = match how {
            Recovery::Replace(why) => why,
            Recovery::Resume => match self.reopen().await? {
                Ok(stream) => return Ok(stream),
                Err(why) => why,
            },
        };
        self.replace(&why).await
    }

    /// Reopens from the kept token, retrying while the database is away. Err: the token
    /// cannot be used.
    async fn reopen(&mut self) -> Result<Result<Stream, String>, Stopped> {
        let reopened = self.open_retrying().await?;
        if reopened.is_ok() {
            ClusterFigures::add(&self.figures.stream_resumes);
            info!("cluster: change stream resumed");
            self.last_heard = Instant::now();
        }
        Ok(reopened)
    }

    /// Resuming is impossible: a new stream from now, then everyone on the other nodes and
    /// every message since the last one delivered, read from the collections.
    async fn replace(&mut self, why: &str) -> Result<Stream, Stopped> {
        ClusterFigures::add(&self.figures.backfills);
        warn!("cluster: the change stream cannot be resumed ({why}); opening a new one and reading missed messages from the collection");
        self.token = None;
        // Without a token, nothing can be refused: this loop runs once.
        let stream = loop {
            if let Ok(stream) = self.open_retrying().await? {
                break stream;
            }
        };
        // Opened before reading back, so nothing stored in between is missed: what both see
        // is delivered once, by `_id`.
        self.token = stream.resume_token();
        self.snapshot_due = Some(true);
        self.read_snapshot_if_due().await?;
        self.backfill().await?;
        self.last_heard = Instant::now();
        Ok(stream)
    }

    /// Reads who is on the other nodes if that is due; if the database cannot answer, it stays
    /// due (and is logged once).
    async fn read_snapshot_if_due(&mut self) -> Result<(), Stopped> {
        let Some(announce) = self.snapshot_due else {
            return Ok(());
        };
        match self.snapshot(announce).await {
            Ok(snapshot) => {
                self.snapshot_due = None;
                self.snapshot_failing = false;
                self.send(snapshot)
            }
            Err(err) => {
                if !std::mem::replace(&mut self.snapshot_failing, true) {
                    warn!(
                        "cluster: could not read who is on the other nodes ({}); trying again",
                        describe(&err)
                    );
                }
                Ok(())
            }
        }
    }

    /// Delivers every message from other nodes missed since the last one delivered from each
    /// (see `Delivered::since`), skipping those already delivered. Tells clients of a gap if
    /// it cannot: the database failed three times, or more than `MAX_BACKFILL` were missed.
    async fn backfill(&mut self) -> Result<(), Stopped> {
        let not_heard_since =
            (self.last_answer_millis - BACKFILL_MARGIN_MS).max(self.started_millis);
        let filter = self.delivered.since(&self.me, not_heard_since);
        let mut complete = false;
        let mut found = 0;
        for attempt in 1..=3 {
            match self.deliver_stored(filter.clone(), &mut found).await? {
                Ok(all) => {
                    complete = all;
                    break;
                }
                Err(err) => {
                    warn!(
                        "cluster: backfill failed ({}), attempt {attempt} of 3",
                        describe(&err)
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        info!("cluster: backfill delivered {found} messages from other nodes");
        if !complete {
            ClusterFigures::add(&self.figures.missed_gaps);
            warn!("cluster: messages from other nodes may have been missed; clients are told");
            self.send(StreamEvent::Missed)?;
        }
        Ok(())
    }

    /// Reads the messages `filter` selects in `(timestamp, _id)` order (per sender, the order
    /// they were sent in) and delivers those not delivered yet, counting them in `found`. The
    /// whole window is read (those already delivered are most of it under load); Ok(false) if
    /// more than `MAX_BACKFILL` were missing. A retry after an error skips what this one
    /// delivered.
    async fn deliver_stored(
        &mut self,
        filter: Document,
        found: &mut usize,
    ) -> Result<Result<bool, DbError>, Stopped> {
        let deadline = self.timeout * 3;
        let messages = self.database.collection::<Document>(&self.messages);
        let find = messages
            .find(filter)
            .sort(doc! { "timestamp": 1, "_id": 1 })
            .batch_size(MAX_EVENTS_PER_BATCH as u32)
            .max_time(deadline);
        let mut cursor = match within(deadline, find.into_future()).await {
            Ok(cursor) => cursor,
            Err(err) => return Ok(Err(err)),
        };
        loop {
            match within(deadline, cursor.advance()).await {
                Ok(true) => {}
                Ok(false) => return Ok(Ok(true)),
                Err(err) => return Ok(Err(err)),
            }
            let Ok(document) = cursor.deserialize_current() else {
                continue;
            };
            let Some(message) = documents::stored_message(&document) else {
                continue;
            };
            if !self.delivered.is_new(&message) {
                continue;
            }
            if *found == MAX_BACKFILL {
                return Ok(Ok(false));
            }
            *found += 1;
            self.deliver(message)?;
        }
    }

    /// Everyone on the other nodes now.
    async fn snapshot(&self, announce: bool) -> Result<StreamEvent, DbError> {
        let read = async {
            let now = database_clock(self.database.client()).await?;
            let presence = self.database.collection::<Document>(&self.presence);
            let mut cursor = presence.find(doc! {}).max_time(self.timeout * 3).await?;
            let mut found = Vec::new();
            while cursor.advance().await? {
                found.push(cursor.deserialize_current()?);
            }
            Ok(documents::snapshot(&found, &self.me, now, announce))
        };
        within(self.timeout * 3, read).await
    }

    /// Opens a stream (from the kept token, if any), retrying while the database is away; the
    /// first failure is logged. Err: the server refused the token (only ever with one).
    async fn open_retrying(&mut self) -> Result<Result<Stream, String>, Stopped> {
        let mut pause = Duration::from_millis(100);
        let mut logged = false;
        loop {
            self.check_stop()?;
            match self.open().await {
                Ok(stream) => return Ok(Ok(stream)),
                Err(err) if self.token.is_some() && resume_impossible(&err) => {
                    return Ok(Err(describe_full(&err)))
                }
                Err(err) => {
                    if !std::mem::replace(&mut logged, true) {
                        warn!(
                            "cluster: cannot open the change stream yet ({}); retrying",
                            describe_full(&err)
                        );
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn open(&self) -> Result<Stream, DbError> {
        let pipeline = documents::pipeline(&self.messages, &self.presence, &self.me);
        let watch = self
            .database
            .watch()
            .pipeline(pipeline)
            .max_await_time(AWAIT)
            .batch_size(MAX_EVENTS_PER_BATCH as u32);
        let deadline = self.timeout * 3;
        match &self.token {
            Some(token) => within(deadline, watch.start_after(token.clone()).into_future()).await,
            None => within(deadline, watch.into_future()).await,
        }
    }

    /// Passes a message on unless it was delivered already.
    fn deliver(&mut self, message: StoredMessage) -> Result<(), Stopped> {
        if !self.delivered.remember(&message) {
            return Ok(());
        }
        self.send(StreamEvent::Message(message.message))
    }

    fn send(&self, event: StreamEvent) -> Result<(), Stopped> {
        self.events.send(event).map_err(|_| Stopped)
    }

    fn check_stop(&self) -> Result<(), Stopped> {
        match self.stop.load(Ordering::Acquire) {
            true => Err(Stopped),
            false => Ok(()),
        }
    }
}

/// How to go on after the stream broke off.
enum Recovery {
    /// Reopen from the kept token.
    Resume,
    /// The token cannot be used (the reason): a new stream and a backfill.
    Replace(String),
}

/// `_id`s of messages delivered lately, per sending node, with the first and newest
/// timestamps delivered from it. Per node, because each node stamps with its own clock: one
/// node's clock running ahead must not move another node's backfill window.
#[derive(Default)]
struct Delivered {
    nodes: HashMap<String, FromNode>,
}

#[derive(Default)]
struct FromNode {
    ids: HashSet<ObjectId>,
    order: VecDeque<(i64, ObjectId)>,
    first_millis: i64,
    newest_millis: i64,
}

impl Delivered {
    fn is_new(&self, message: &StoredMessage) -> bool {
        self.nodes
            .get(&message.message.node)
            .is_none_or(|node| !node.ids.contains(&message.id))
    }

    /// Notes a message as delivered; false if it already was.
    fn remember(&mut self, message: &StoredMessage) -> bool {
        let node = match self.nodes.get_mut(&message.message.node) {
            Some(node) => node,
            None => self
                .nodes
                .entry(message.message.node.clone())
                .or_insert(FromNode {
                    first_millis: message.millis,
                    newest_millis: message.millis,
                    ..FromNode::default()
                }),
        };
        if !node.ids.insert(message.id) {
            return false;
        }
        // Nodes not heard from for ten backfill margins have stopped: forget them, so servers
        // that come and go (a random --node-id each start) do not pile up here.
        let stopped_before = message.millis - 10 * BACKFILL_MARGIN_MS;
        let sender = &message.message.node;
        self.nodes
            .retain(|id, from| id == sender || from.newest_millis >= stopped_before);
        let Some(node) = self.nodes.get_mut(sender) else {
            return true;
        };
        node.order.push_back((message.millis, message.id));
        node.newest_millis = node.newest_millis.max(message.millis);
        let forget_below = node.newest_millis - 2 * BACKFILL_MARGIN_MS;
        while let Some(&(millis, id)) = node.order.front() {
            if millis >= forget_below && node.order.len() <= MAX_REMEMBERED {
                break;
            }
            node.order.pop_front();
            node.ids.remove(&id);
        }
        true
    }

    /// What a backfill reads: from each node heard from, its messages since `BACKFILL_MARGIN_MS`
    /// before the newest delivered (a node stores its messages in the order it stamps them, so
    /// the margin is only for safety), but none from before the first delivered; from nodes not
    /// heard from, everything since `started` (this node's clock: it began watching then).
    fn since(&self, me: &str, started: i64) -> Document {
        let mut clauses: Vec<Document> = self
            .nodes
            .iter()
            .map(|(node, from)| {
                let since = (from.newest_millis - BACKFILL_MARGIN_MS).max(from.first_millis);
                doc! { "node": node, "timestamp": { "$gte": DateTime::from_millis(since) } }
            })
            .collect();
        let mut heard: Vec<&str> = self.nodes.keys().map(String::as_str).collect();
        heard.push(me);
        clauses.push(doc! {
            "node": { "$exists": true, "$nin": heard },
            "timestamp": { "$gte": DateTime::from_millis(started) },
        });
        doc! { "$or": clauses }
    }
}

/// The stream cannot go on from its token.
fn resume_impossible(err: &DbError) -> bool {
    let code = match &*err.kind {
        ErrorKind::Command(command) => Some(command.code),
        _ => None,
    };
    code.is_some_and(|code| code == HISTORY_LOST || BAD_TOKEN.contains(&code))
        || err.contains_label("NonResumableChangeStreamError")
}

/// Why the first stream could not be opened, as `--cluster` reports it at start.
fn start_error(err: &DbError) -> StartError {
    match &*err.kind {
        ErrorKind::Command(command) if command.code == NOT_A_REPLICA_SET => {
            StartError::NoChangeStreams(command.message.clone())
        }
        _ => StartError::Unavailable(describe_full(err)),
    }
}

/// The short reason, with the server's message for command errors.
fn describe_full(err: &DbError) -> String {
    match &*err.kind {
        ErrorKind::Command(command) => format!("{}: {}", describe(err), command.message),
        _ => describe(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::RemoteMessage;

    fn message(node: &str, millis: i64) -> StoredMessage {
        StoredMessage {
            id: ObjectId::new(),
            millis,
            message: RemoteMessage {
                node: node.to_string(),
                nick: "bob".to_string(),
                content: "hi".to_string(),
                action: false,
            },
        }
    }

    #[test]
    fn a_message_is_delivered_once_and_remembered_within_the_backfill_window() {
        let mut delivered = Delivered::default();
        let first = message("n2", 1_000);
        assert!(delivered.remember(&first));
        assert!(!delivered.remember(&first), "delivered twice");
        // A backfill reaches BACKFILL_MARGIN_MS behind the newest: still remembered there.
        let later = message("n2", 1_000 + BACKFILL_MARGIN_MS);
        assert!(delivered.remember(&later));
        assert!(!delivered.is_new(&first));
        // Far older than any backfill reaches: forgotten, so memory stays bounded.
        let much_later = message("n2", 1_000 + 3 * BACKFILL_MARGIN_MS);
        assert!(delivered.remember(&much_later));
        assert!(delivered.is_new(&first));
        assert!(!delivered.is_new(&much_later));
    }

    #[test]
    fn each_node_has_its_own_backfill_window() {
        let mut delivered = Delivered::default();
        // n3's clock runs ten minutes ahead; n2's window must not move with it.
        delivered.remember(&message("n2", 100_000));
        delivered.remember(&message("n2", 200_000));
        delivered.remember(&message("n3", 800_000));
        let since = delivered.since("n1", 50_000);
        let clauses = since.get_array("$or").unwrap();
        let from = |node: &str| {
            clauses
                .iter()
                .filter_map(|clause| clause.as_document())
                .find(|clause| clause.get_str("node").ok() == Some(node))
                .map(|clause| {
                    let range = clause.get_document("timestamp").unwrap();
                    range.get_datetime("$gte").unwrap().timestamp_millis()
                })
        };
        // Within the margin of n2's newest, but not before its first.
        assert_eq!(from("n2"), Some(200_000 - BACKFILL_MARGIN_MS));
        assert_eq!(from("n3"), Some(800_000));
        // Nodes not heard from: since this node began watching.
        let others = clauses.last().unwrap().as_document().unwrap();
        assert_eq!(
            others
                .get_document("node")
                .unwrap()
                .get_array("$nin")
                .unwrap()
                .len(),
            3
        );
    }
}
