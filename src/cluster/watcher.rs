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

use std::collections::{HashSet, VecDeque};
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
use super::{
    ClusterFigures, ClusterInput, ClusterSink, StartError, StreamEvent, MAX_EVENTS_PER_BATCH,
};
use crate::config::{ClusterConfig, StoreConfig, CLUSTER_SILENT_INTERVALS};
use crate::persist::{connect_client, describe};
use crate::{info, warn};

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

/// Most messages one backfill delivers; past this the gap is reported instead.
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

/// Opens the stream and starts reading it; returns once it is open (or could not be).
pub(super) fn start(
    store: &StoreConfig,
    cluster: &ClusterConfig,
    sink: impl ClusterSink,
    figures: Arc<ClusterFigures>,
    stop: Arc<AtomicBool>,
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
                    Watcher::open_first(store, cluster, events, figures, stop, ready).await
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
        figures: Arc<ClusterFigures>,
        stop: Arc<AtomicBool>,
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
            events,
            figures,
            stop,
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
        if let Ok(StreamEvent::Snapshot { clients, nodes, .. }) = watcher.snapshot().await {
            let initial = StreamEvent::Snapshot {
                clients,
                nodes,
                announce: false,
            };
            watcher.send(initial).ok()?;
        }
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
                Ok(None) => {}
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
        match documents::read_event(event, &self.messages, &self.me) {
            Read::Message(message) => self.deliver(message)?,
            Read::Event(event) => self.send(event)?,
            Read::Nothing => {}
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
        let mut pause = Duration::from_millis(100);
        loop {
            self.check_stop()?;
            match self.open().await {
                Ok(stream) => {
                    ClusterFigures::add(&self.figures.stream_resumes);
                    info!("cluster: change stream resumed");
                    return Ok(Ok(stream));
                }
                Err(err) if resume_impossible(&err) => return Ok(Err(describe_full(&err))),
                Err(err) => {
                    warn!(
                        "cluster: cannot reopen the change stream yet ({})",
                        describe_full(&err)
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Resuming is impossible: a new stream from now, then everyone on the other nodes and
    /// every message since the last one delivered, read from the collections.
    async fn replace(&mut self, why: &str) -> Result<Stream, Stopped> {
        ClusterFigures::add(&self.figures.backfills);
        warn!("cluster: the change stream cannot be resumed ({why}); opening a new one and reading missed messages from the collection");
        self.token = None;
        let mut pause = Duration::from_millis(100);
        let stream = loop {
            self.check_stop()?;
            match self.open().await {
                Ok(stream) => break stream,
                Err(err) => {
                    warn!(
                        "cluster: cannot open a change stream yet ({})",
                        describe_full(&err)
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        };
        // Opened before reading back, so nothing stored in between is missed: what both see
        // is delivered once, by `_id`.
        self.token = stream.resume_token();
        self.last_heard = Instant::now();
        match self.snapshot().await {
            Ok(snapshot) => self.send(snapshot)?,
            Err(err) => warn!(
                "cluster: could not read who is on the other nodes ({}); their next heartbeats and joins fill it in",
                describe(&err)
            ),
        }
        self.backfill().await?;
        Ok(stream)
    }

    /// Delivers every message from other nodes since the newest delivered (with the margin),
    /// skipping those already delivered. Tells clients of a gap if it cannot.
    async fn backfill(&mut self) -> Result<(), Stopped> {
        let from = self
            .delivered
            .newest_millis
            .map_or(self.started_millis, |newest| newest - BACKFILL_MARGIN_MS)
            .max(self.started_millis);
        let mut attempts = 0;
        let found = loop {
            match self.stored_since(from).await {
                Ok(found) => break Some(found),
                Err(err) if attempts < 3 => {
                    attempts += 1;
                    warn!("cluster: backfill failed ({}); retrying", describe(&err));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(err) => {
                    warn!("cluster: backfill failed ({})", describe(&err));
                    break None;
                }
            }
        };
        let complete = found.as_ref().is_some_and(|f| f.len() <= MAX_BACKFILL);
        let mut delivered = 0;
        for message in found.into_iter().flatten().take(MAX_BACKFILL) {
            if self.delivered.is_new(&message) {
                delivered += 1;
            }
            self.deliver(message)?;
        }
        info!("cluster: backfill delivered {delivered} messages from other nodes");
        if !complete {
            ClusterFigures::add(&self.figures.missed_gaps);
            warn!("cluster: messages from other nodes may have been missed; clients are told");
            self.send(StreamEvent::Missed)?;
        }
        Ok(())
    }

    /// Messages of other nodes stamped at `from` or later, in `(timestamp, _id)` order, one
    /// more than a backfill delivers (to see whether there are more).
    async fn stored_since(&self, from: i64) -> Result<Vec<StoredMessage>, DbError> {
        let filter = doc! {
            "node": { "$exists": true, "$ne": &self.me },
            "timestamp": { "$gte": DateTime::from_millis(from) },
        };
        let mut cursor = self
            .database
            .collection::<Document>(&self.messages)
            .find(filter)
            .sort(doc! { "timestamp": 1, "_id": 1 })
            .limit(MAX_BACKFILL as i64 + 1)
            .max_time(self.timeout * 3)
            .await?;
        let mut found = Vec::new();
        while cursor.advance().await? {
            let document: Document = cursor.deserialize_current()?;
            found.extend(documents::stored_message(&document));
        }
        Ok(found)
    }

    /// Everyone on the other nodes now.
    async fn snapshot(&self) -> Result<StreamEvent, DbError> {
        let mut cursor = self
            .database
            .collection::<Document>(&self.presence)
            .find(doc! {})
            .max_time(self.timeout * 3)
            .await?;
        let mut found = Vec::new();
        while cursor.advance().await? {
            found.push(cursor.deserialize_current()?);
        }
        Ok(documents::snapshot(&found, &self.me, DateTime::now()))
    }

    async fn open(&self) -> Result<Stream, DbError> {
        let pipeline = documents::pipeline(&self.messages, &self.presence, &self.me);
        let watch = self
            .database
            .watch()
            .pipeline(pipeline)
            .max_await_time(AWAIT)
            .batch_size(MAX_EVENTS_PER_BATCH as u32);
        match &self.token {
            Some(token) => watch.start_after(token.clone()).await,
            None => watch.await,
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

/// `_id`s of messages delivered lately, and the newest timestamp delivered.
#[derive(Default)]
struct Delivered {
    ids: HashSet<ObjectId>,
    order: VecDeque<(i64, ObjectId)>,
    newest_millis: Option<i64>,
}

impl Delivered {
    fn is_new(&self, message: &StoredMessage) -> bool {
        !self.ids.contains(&message.id)
    }

    /// Notes a message as delivered; false if it already was.
    fn remember(&mut self, message: &StoredMessage) -> bool {
        if !self.ids.insert(message.id) {
            return false;
        }
        self.order.push_back((message.millis, message.id));
        let newest = self
            .newest_millis
            .map_or(message.millis, |n| n.max(message.millis));
        self.newest_millis = Some(newest);
        while let Some(&(millis, id)) = self.order.front() {
            let too_old = millis < newest - 2 * BACKFILL_MARGIN_MS;
            if !too_old && self.order.len() <= MAX_REMEMBERED {
                break;
            }
            self.order.pop_front();
            self.ids.remove(&id);
        }
        true
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
