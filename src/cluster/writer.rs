//! This node's side of the presence collection, on a thread of its own: its heartbeat, a
//! document per connected client, `/nick` claims, and sweeping out nodes that went silent.
//!
//! Updates from the loop are applied in the order they happened, runs of joins and leaves in
//! one request each. A write that fails marks the collection out of date; the next heartbeat
//! writes every local client again, so the other nodes catch up once the database is back.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::time::Duration;

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use mongodb::error::{Error as DbError, ErrorKind, WriteFailure};
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::time::Instant;

use super::documents::{self, client_document, client_key, node_document, refresh, LocalClient};
use super::{database_clock, describe, within, NotResponding};
use super::{ClaimRefused, ClusterInput, ClusterSink, PresenceUpdate};
use crate::config::{ClusterConfig, StoreConfig};
use crate::persist::{connect_client, is_connectivity, ClientRef, DUPLICATE_KEY};
use crate::{info, warn};

/// Updates taken from the queue at once: one request per run of joins or leaves among them.
const MAX_UPDATES_AT_ONCE: usize = 1000;

/// Starts the thread; it ends (removing this node's documents) when every sender is dropped.
pub(super) fn start(
    store: StoreConfig,
    cluster: ClusterConfig,
    run: ObjectId,
    sink: impl ClusterSink,
) -> std::io::Result<(UnboundedSender<PresenceUpdate>, std::thread::JoinHandle<()>)> {
    let (updates, incoming) = tokio::sync::mpsc::unbounded_channel();
    let thread = std::thread::Builder::new()
        .name("peerchat-cluster-presence".to_string())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match runtime {
                Ok(runtime) => {
                    runtime.block_on(Writer::new(store, cluster, run, sink).run(incoming))
                }
                Err(err) => warn!("cluster: presence thread could not start: {err}"),
            }
        })?;
    Ok((updates, thread))
}

struct Writer<S> {
    store: StoreConfig,
    node: String,
    interval: Duration,
    /// Connected on first use, and again after a failed attempt.
    presence: Option<Collection<Document>>,
    indexes_made: bool,
    /// This process, told apart from another started with the same `--node-id`.
    run: ObjectId,
    /// This node's clients, by connection id.
    local: BTreeMap<u64, LocalClient>,
    /// The database's clock less this node's, in milliseconds, as of the last heartbeat: every
    /// presence time is on the database's clock.
    clock_offset_ms: i64,
    /// When the next heartbeat is due.
    next_beat: Instant,
    /// A write failed: the next heartbeat writes every local client again.
    out_of_date: bool,
    /// Writes are failing: logged once, until a heartbeat gets through again.
    failing: bool,
    sink: S,
}

impl<S: ClusterSink> Writer<S> {
    fn new(store: StoreConfig, cluster: ClusterConfig, run: ObjectId, sink: S) -> Self {
        Writer {
            store,
            node: cluster.node_id,
            interval: cluster.heartbeat,
            presence: None,
            indexes_made: false,
            run,
            local: BTreeMap::new(),
            clock_offset_ms: 0,
            next_beat: Instant::now(),
            out_of_date: false,
            failing: false,
            sink,
        }
    }

    async fn run(mut self, mut incoming: UnboundedReceiver<PresenceUpdate>) {
        // A previous run under this node id may have left documents behind (a crash).
        self.write("remove this node's old documents", |presence, node| async move {
            presence.delete_many(doc! { "node": node }).await.map(drop)
        })
        .await;
        self.heartbeat().await;
        let mut updates = Vec::new();
        loop {
            tokio::select! {
                received = incoming.recv_many(&mut updates, MAX_UPDATES_AT_ONCE) => {
                    if received == 0 {
                        break;
                    }
                    self.apply(std::mem::take(&mut updates)).await;
                }
                _ = tokio::time::sleep_until(self.next_beat) => self.heartbeat().await,
            }
        }
        self.write("remove this node's documents", |presence, node| async move {
            presence.delete_many(doc! { "node": node }).await.map(drop)
        })
        .await;
        info!("cluster: node {} left the cluster", self.node);
    }

    /// Applies updates in order; consecutive joins (or leaves) go in one request.
    async fn apply(&mut self, updates: Vec<PresenceUpdate>) {
        let mut joins = Vec::new();
        let mut leaves = Vec::new();
        for update in updates {
            // Claims wait up to a deadline each: the heartbeat must not wait behind a queue of
            // them, or the other nodes take this one for gone.
            if Instant::now() >= self.next_beat {
                self.insert_joins(&mut joins).await;
                self.insert_leaves(&mut leaves).await;
                self.heartbeat().await;
            }
            match update {
                PresenceUpdate::Joined { id, nick, joined } => {
                    self.insert_leaves(&mut leaves).await;
                    let joined = self.on_database_clock(joined);
                    let client = LocalClient {
                        nick,
                        chosen: false,
                        joined,
                    };
                    joins.push(self.client_document(id, &client));
                    self.local.insert(id, client);
                }
                PresenceUpdate::Left { id } => {
                    self.insert_joins(&mut joins).await;
                    self.local.remove(&id);
                    leaves.push(client_key(&self.node, id));
                }
                PresenceUpdate::Claim { client, nick } => {
                    self.insert_joins(&mut joins).await;
                    self.insert_leaves(&mut leaves).await;
                    self.claim(client, nick).await;
                }
            }
        }
        self.insert_joins(&mut joins).await;
        self.insert_leaves(&mut leaves).await;
    }

    async fn insert_joins(&mut self, joins: &mut Vec<Document>) {
        if joins.is_empty() {
            return;
        }
        let documents = std::mem::take(joins);
        self.write("record joins", |presence, _| async move {
            match presence.insert_many(documents).ordered(false).await {
                Err(err) if only_duplicates(&err) => Ok(()),
                result => result.map(drop),
            }
        })
        .await;
    }

    async fn insert_leaves(&mut self, leaves: &mut Vec<String>) {
        if leaves.is_empty() {
            return;
        }
        let keys = std::mem::take(leaves);
        self.write("record leaves", |presence, _| async move {
            let filter = doc! { "_id": { "$in": keys } };
            presence.delete_many(filter).await.map(drop)
        })
        .await;
    }

    /// Writes the client's document with its new nick; the unique index refuses a nick held
    /// on any node. The loop is told either way.
    async fn claim(&mut self, client: ClientRef, nick: String) {
        let joined = self.local.get(&client.id).map_or_else(
            || self.on_database_clock(DateTime::now()),
            |known| known.joined,
        );
        let claimed = LocalClient {
            nick: nick.clone(),
            chosen: true,
            joined,
        };
        let document = self.client_document(client.id, &claimed);
        let key = client_key(&self.node, client.id);
        let written = self
            .attempt(|presence, _| async move {
                let filter = doc! { "_id": key };
                presence.replace_one(filter, document).upsert(true).await
            })
            .await;
        let result = match written {
            Ok(_) => {
                self.local.insert(client.id, claimed);
                Ok(())
            }
            Err(err) if is_duplicate(&err) => Err(ClaimRefused::Taken),
            Err(err) => {
                self.failed("claim a nick", &err);
                Err(ClaimRefused::Unsettled(describe(&err)))
            }
        };
        let answer = ClusterInput::NickClaimed {
            client,
            nick,
            result,
        };
        let _ = self.sink.send(answer);
    }

    /// The node's heartbeat, its clients' refresh, and the sweep of nodes gone silent. Every
    /// local client is written again if a write failed since the last heartbeat, or if the
    /// refresh found fewer documents than clients (another node swept them out while the
    /// database was slow for this one).
    async fn heartbeat(&mut self) {
        self.next_beat = Instant::now() + self.interval;
        let clock = self
            .write("read the database's clock", |presence, _| async move {
                database_clock(presence.client()).await
            })
            .await;
        if let Some(database_now) = clock {
            let offset = database_now.timestamp_millis() - DateTime::now().timestamp_millis();
            self.clock_offset_ms = offset;
        }
        let now = self.on_database_clock(DateTime::now());
        let node = node_document(&self.node, self.run, self.interval, now);
        let interval = self.interval;
        let refreshed = self
            .write("write the heartbeat", |presence, node_id| async move {
                presence
                    .replace_one(doc! { "_id": &node_id }, node)
                    .upsert(true)
                    .await?;
                let mine = doc! { "kind": "client", "node": node_id };
                let result = presence.update_many(mine, refresh(interval, now)).await?;
                Ok(result.matched_count)
            })
            .await;
        let Some(refreshed) = refreshed else { return };
        if std::mem::take(&mut self.out_of_date) || refreshed < self.local.len() as u64 {
            self.write_all_clients().await;
        }
        // Nodes that stopped without a word (their documents are past `expires`).
        self.write("sweep out silent nodes", |presence, _| async move {
            let stale = doc! { "expires": { "$lt": now } };
            presence.delete_many(stale).await.map(drop)
        })
        .await;
        if !self.out_of_date && std::mem::take(&mut self.failing) {
            info!("cluster: presence writes work again");
        }
    }

    /// Brings this node's client documents in line with its clients: removes those of clients
    /// gone, inserts those missing (without the nick claim if another node took the nick
    /// meanwhile, so the client stays visible).
    async fn write_all_clients(&mut self) {
        let Some(stored) = self.stored_clients().await else {
            return;
        };
        let missing: Vec<Document> = self
            .local
            .iter()
            .filter(|(id, _)| !stored.contains(&client_key(&self.node, **id)))
            .map(|(id, client)| self.client_document(*id, client))
            .collect();
        if missing.is_empty() {
            return;
        }
        info!(
            "cluster: writing {} of this node's clients to the presence collection again",
            missing.len()
        );
        let unclaimed: Vec<Document> = missing
            .iter()
            .filter(|document| document.contains_key("nick_key"))
            .map(|document| {
                let mut document = document.clone();
                document.remove("nick_key");
                document
            })
            .collect();
        self.write("write clients again", |presence, _| async move {
            match presence.insert_many(missing).ordered(false).await {
                Ok(_) => Ok(()),
                // Some nicks were taken meanwhile (or documents are there already): write
                // those clients without their claim; the rest went in.
                Err(err) if only_duplicates(&err) => {
                    match presence.insert_many(unclaimed).ordered(false).await {
                        Err(err) if !only_duplicates(&err) => Err(err),
                        _ => Ok(()),
                    }
                }
                Err(err) => Err(err),
            }
        })
        .await;
    }

    /// Removes this node's documents of clients no longer here, and returns the `_id`s of
    /// those still stored.
    async fn stored_clients(&mut self) -> Option<HashSet<String>> {
        let keys: Vec<String> = self
            .local
            .keys()
            .map(|id| client_key(&self.node, *id))
            .collect();
        self.write("read this node's clients", |presence, node| async move {
            let gone = doc! { "kind": "client", "node": &node, "_id": { "$nin": &keys } };
            presence.delete_many(gone).await?;
            let mine = doc! { "kind": "client", "node": node };
            let mut cursor = presence.find(mine).projection(doc! { "_id": 1 }).await?;
            let mut stored = HashSet::new();
            while cursor.advance().await? {
                if let Ok(key) = cursor.current().get_str("_id") {
                    stored.insert(key.to_string());
                }
            }
            Ok(stored)
        })
        .await
    }

    fn client_document(&self, id: u64, client: &LocalClient) -> Document {
        let now = self.on_database_clock(DateTime::now());
        client_document(&self.node, id, client, self.interval, now)
    }

    /// `time` on this node's clock, moved to the database's.
    fn on_database_clock(&self, time: DateTime) -> DateTime {
        DateTime::from_millis(time.timestamp_millis() + self.clock_offset_ms)
    }

    /// Runs `write` on the presence collection; a failure is logged and marks it out of date.
    async fn write<T, F, Fut>(&mut self, what: &str, write: F) -> Option<T>
    where
        F: FnOnce(Collection<Document>, String) -> Fut,
        Fut: Future<Output = Result<T, DbError>>,
    {
        match self.attempt(write).await {
            Ok(value) => Some(value),
            Err(err) => {
                self.failed(what, &err);
                None
            }
        }
    }

    /// Runs `write` on the presence collection, giving up after 3 × `--mongo-timeout-ms` (the
    /// driver cannot time out a database that stopped answering); then the next write gets a
    /// new driver client.
    async fn attempt<T, F, Fut>(&mut self, write: F) -> Result<T, DbError>
    where
        F: FnOnce(Collection<Document>, String) -> Fut,
        Fut: Future<Output = Result<T, DbError>>,
    {
        let deadline = self.store.timeout * 3;
        let node = self.node.clone();
        let attempt = async {
            let presence = self.collection().await?.clone();
            write(presence, node).await
        };
        let result = within(deadline, attempt).await;
        if result
            .as_ref()
            .is_err_and(|err| err.get_custom::<NotResponding>().is_some())
        {
            self.presence = None;
        }
        result
    }

    fn failed(&mut self, what: &str, err: &DbError) {
        if !self.failing {
            warn!(
                "cluster: could not {what} in the presence collection ({}); retrying with the next heartbeat",
                describe(err)
            );
        }
        self.failing = true;
        self.out_of_date = true;
        if is_connectivity(err) {
            self.presence = None;
        }
    }

    /// The presence collection, connecting (and making its indexes) on first use.
    async fn collection(&mut self) -> Result<&Collection<Document>, DbError> {
        if self.presence.is_none() {
            let client = connect_client(&self.store).await?;
            let name = documents::presence_collection(&self.store.collection);
            self.presence = Some(client.database(&self.store.database).collection(&name));
        }
        let presence = self.presence.as_ref().expect("just connected");
        if !self.indexes_made {
            make_indexes(presence).await?;
            self.indexes_made = true;
        }
        Ok(self.presence.as_ref().expect("just connected"))
    }
}

/// A unique index on chosen nicks (sparse: default names are not claimed), a TTL index on
/// `expires` (a backstop; nodes sweep themselves, since MongoDB's TTL monitor runs only once a
/// minute), and one on `node` for the heartbeat's refresh.
async fn make_indexes(presence: &Collection<Document>) -> Result<(), DbError> {
    let unique = IndexOptions::builder().unique(true).sparse(true).build();
    let ttl = IndexOptions::builder().expire_after(Duration::ZERO).build();
    let indexes = [
        IndexModel::builder()
            .keys(doc! { "nick_key": 1 })
            .options(unique)
            .build(),
        IndexModel::builder()
            .keys(doc! { "expires": 1 })
            .options(ttl)
            .build(),
        IndexModel::builder().keys(doc! { "node": 1 }).build(),
    ];
    presence.create_indexes(indexes).await.map(drop)
}

fn is_duplicate(err: &DbError) -> bool {
    match &*err.kind {
        ErrorKind::Write(WriteFailure::WriteError(write)) => write.code == DUPLICATE_KEY,
        ErrorKind::Command(command) => command.code == DUPLICATE_KEY,
        _ => false,
    }
}

/// An unordered insert whose only failures are documents already there (a retried batch).
fn only_duplicates(err: &DbError) -> bool {
    match &*err.kind {
        ErrorKind::InsertMany(failure) => {
            failure.write_concern_error.is_none()
                && failure
                    .write_errors
                    .iter()
                    .flatten()
                    .all(|write| write.code == DUPLICATE_KEY)
        }
        _ => false,
    }
}
