//! This node's side of the presence collection, on a thread of its own: its heartbeat, a
//! document per connected client, `/nick` claims, and sweeping out nodes that went silent.
//!
//! Updates from the loop are applied in the order they happened, runs of joins and leaves in
//! one request each. A write that fails marks the collection out of date; the next heartbeat
//! writes every local client again, so the other nodes catch up once the database is back.

use std::collections::BTreeMap;
use std::time::Duration;

use bson::{doc, DateTime, Document};
use mongodb::error::{Error as DbError, ErrorKind, WriteFailure};
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::time::Instant;

use super::documents::{self, client_document, client_key, node_document, refresh};
use super::{ClaimRefused, ClusterInput, ClusterSink, PresenceUpdate};
use crate::config::{ClusterConfig, StoreConfig};
use crate::persist::{connect_client, describe, is_connectivity, ClientRef, DUPLICATE_KEY};
use crate::{info, warn};

/// Updates taken from the queue at once: one request per run of joins or leaves among them.
const MAX_UPDATES_AT_ONCE: usize = 1000;

/// Starts the thread; it ends (removing this node's documents) when every sender is dropped.
pub(super) fn start(
    store: StoreConfig,
    cluster: ClusterConfig,
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
                Ok(runtime) => runtime.block_on(Writer::new(store, cluster, sink).run(incoming)),
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
    /// This node's clients: nick, and whether it was chosen (claimed) with `/nick`.
    local: BTreeMap<u64, (String, bool)>,
    /// A write failed: the next heartbeat writes every local client again.
    out_of_date: bool,
    sink: S,
}

impl<S: ClusterSink> Writer<S> {
    fn new(store: StoreConfig, cluster: ClusterConfig, sink: S) -> Self {
        Writer {
            store,
            node: cluster.node_id,
            interval: cluster.heartbeat,
            presence: None,
            indexes_made: false,
            local: BTreeMap::new(),
            out_of_date: false,
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
        let mut next_beat = Instant::now() + self.interval;
        let mut updates = Vec::new();
        loop {
            tokio::select! {
                received = incoming.recv_many(&mut updates, MAX_UPDATES_AT_ONCE) => {
                    if received == 0 {
                        break;
                    }
                    self.apply(std::mem::take(&mut updates)).await;
                }
                _ = tokio::time::sleep_until(next_beat) => {
                    self.heartbeat().await;
                    next_beat = Instant::now() + self.interval;
                }
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
            match update {
                PresenceUpdate::Joined { id, nick } => {
                    self.insert_leaves(&mut leaves).await;
                    self.local.insert(id, (nick.clone(), false));
                    joins.push(self.client_document(id, &nick, false));
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
        let document = self.client_document(client.id, &nick, true);
        let key = client_key(&self.node, client.id);
        let result = match self.collection().await {
            Ok(presence) => presence
                .replace_one(doc! { "_id": key }, document)
                .upsert(true)
                .await
                .map(drop),
            Err(err) => Err(err),
        };
        let result = match result {
            Ok(()) => {
                self.local.insert(client.id, (nick.clone(), true));
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

    /// The node's heartbeat, its clients' refresh, and the sweep of nodes gone silent; first
    /// every local client again if a write failed since the last one.
    async fn heartbeat(&mut self) {
        if std::mem::take(&mut self.out_of_date) {
            self.write_all_clients().await;
        }
        let now = DateTime::now();
        let node = node_document(&self.node, self.interval, now);
        let interval = self.interval;
        self.write("write the heartbeat", |presence, node_id| async move {
            presence
                .replace_one(doc! { "_id": &node_id }, node)
                .upsert(true)
                .await?;
            let mine = doc! { "kind": "client", "node": node_id };
            presence
                .update_many(mine, refresh(interval, now))
                .await
                .map(drop)
        })
        .await;
        // Nodes that stopped without a word (their documents are past `expires`).
        self.write("sweep out silent nodes", |presence, _| async move {
            let stale = doc! { "expires": { "$lt": now } };
            presence.delete_many(stale).await.map(drop)
        })
        .await;
    }

    /// Writes every local client's document (after the database was away) and removes this
    /// node's documents of clients that left meanwhile.
    async fn write_all_clients(&mut self) {
        info!(
            "cluster: writing this node's {} clients to the presence collection again",
            self.local.len()
        );
        let keys: Vec<String> = self
            .local
            .keys()
            .map(|id| client_key(&self.node, *id))
            .collect();
        let documents: Vec<(String, Document)> = self
            .local
            .iter()
            .map(|(id, (nick, chosen))| {
                (
                    client_key(&self.node, *id),
                    self.client_document(*id, nick, *chosen),
                )
            })
            .collect();
        self.write("write clients again", |presence, node| async move {
            let gone = doc! { "kind": "client", "node": node, "_id": { "$nin": keys } };
            presence.delete_many(gone).await?;
            for (key, document) in documents {
                let written = presence
                    .replace_one(doc! { "_id": key }, document)
                    .upsert(true)
                    .await;
                match written {
                    Err(err) if is_duplicate(&err) => {} // its nick was taken meanwhile
                    other => drop(other?),
                }
            }
            Ok(())
        })
        .await;
    }

    fn client_document(&self, id: u64, nick: &str, chosen: bool) -> Document {
        client_document(&self.node, id, nick, chosen, self.interval, DateTime::now())
    }

    /// Runs `write` on the presence collection; a failure is logged and marks it out of date.
    async fn write<F, Fut>(&mut self, what: &str, write: F)
    where
        F: FnOnce(Collection<Document>, String) -> Fut,
        Fut: std::future::Future<Output = Result<(), DbError>>,
    {
        let result = match self.collection().await {
            Ok(presence) => write(presence.clone(), self.node.clone()).await,
            Err(err) => Err(err),
        };
        if let Err(err) = result {
            self.failed(what, &err);
        }
    }

    fn failed(&mut self, what: &str, err: &DbError) {
        if !self.out_of_date {
            warn!(
                "cluster: could not {what} in the presence collection ({}); retrying with the next heartbeat",
                describe(err)
            );
        }
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
