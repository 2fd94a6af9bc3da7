//! What the cluster stores and watches: presence documents, the change stream's pipeline, and
//! change events read back as `StreamEvent`s. Pure: no database calls here.
//!
//! The presence collection holds one document per node (its heartbeat) and one per connected
//! client:
//!
//! ```text
//! { _id: "n1",    kind: "node",   node: "n1", run: ObjectId, seen: Date, expires: Date,
//!   interval_ms: 10000 }
//! { _id: "n1/17", kind: "client", node: "n1", nick: "alice", nick_key: "alice",
//!   joined: Date, seen: Date, expires: Date }
//! ```
//!
//! `expires` is `seen` plus 3 of the writing node's heartbeat intervals: every node sweeps out
//! documents past it (and a TTL index does too, as a backstop), so a node that stopped without
//! a word loses its users within 3 intervals whatever interval the sweeper itself uses. All
//! these times are the database's clock (each writer asks it with every heartbeat), so nodes
//! whose clocks differ still agree on what has expired. `run` tells two processes started with
//! the same `--node-id` apart; `joined` orders `/who` across nodes.
//! `nick_key` (the nick in lower case) is there only for nicks a client chose with `/nick`; a
//! unique sparse index on it settles two nodes claiming one nick at the same moment. The
//! default names (`IP:PORT`) are never valid nicks, so they need no claim.

use std::time::Duration;

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType};

use super::{RemoteClient, RemoteMessage, StreamEvent};
use crate::config::CLUSTER_SILENT_INTERVALS;
use crate::persist::ACTION_KIND;

/// The presence collection beside the messages collection `messages`.
pub fn presence_collection(messages: &str) -> String {
    format!("{messages}_presence")
}

/// The `_id` of a client's presence document: its node and its connection id (never reused
/// while the node runs; a restarted node removes its old documents first).
pub fn client_key(node: &str, id: u64) -> String {
    format!("{node}/{id}")
}

/// The node and connection id in a client's presence `_id`; `None` for a node's own document
/// (no `/`).
fn parse_client_key(key: &str) -> Option<(&str, u64)> {
    let (node, id) = key.split_once('/')?;
    Some((node, id.parse().ok()?))
}

/// When a document written at `now` by a node with this heartbeat interval goes stale.
fn expires(now: DateTime, interval: Duration) -> DateTime {
    let silent = interval * CLUSTER_SILENT_INTERVALS;
    DateTime::from_millis(now.timestamp_millis() + silent.as_millis() as i64)
}

/// The node's heartbeat document; `now` is the database's clock.
pub fn node_document(node: &str, run: ObjectId, interval: Duration, now: DateTime) -> Document {
    doc! {
        "_id": node,
        "kind": "node",
        "node": node,
        "run": run,
        "seen": now,
        "expires": expires(now, interval),
        "interval_ms": interval.as_millis() as i64,
    }
}

/// A client of this node, as its presence document says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalClient {
    pub nick: String,
    /// The nick was claimed with `/nick` (a default name is not).
    pub chosen: bool,
    /// When it joined (the database's clock, as near as this node knows it).
    pub joined: DateTime,
}

/// A client's presence document, written at `now` (the database's clock).
pub fn client_document(
    node: &str,
    id: u64,
    client: &LocalClient,
    interval: Duration,
    now: DateTime,
) -> Document {
    let mut document = doc! {
        "_id": client_key(node, id),
        "kind": "client",
        "node": node,
        "nick": &client.nick,
        "joined": client.joined,
        "seen": now,
        "expires": expires(now, interval),
    };
    if client.chosen {
        document.insert("nick_key", client.nick.to_ascii_lowercase());
    }
    document
}

/// What a heartbeat sets on this node's client documents.
pub fn refresh(interval: Duration, now: DateTime) -> Document {
    doc! { "$set": { "seen": now, "expires": expires(now, interval) } }
}

/// The one change stream a node opens, on the whole database: inserts into `messages` by
/// other cluster nodes, and every insert, replacement and deletion in `presence` (refreshes
/// are updates and are left out, or every heartbeat would send each node one event per client
/// of every node).
pub fn pipeline(messages: &str, presence: &str, me: &str) -> Vec<Document> {
    vec![doc! { "$match": { "$or": [
        {
            "ns.coll": messages,
            "operationType": "insert",
            "fullDocument.node": { "$exists": true, "$ne": me },
        },
        {
            "ns.coll": presence,
            "operationType": { "$in": ["insert", "replace", "delete"] },
        },
    ] } }]
}

/// A stored message of another node: its `_id`, its `timestamp` in milliseconds (for the
/// backfill's starting point) and what clients are shown.
pub struct StoredMessage {
    pub id: ObjectId,
    pub millis: i64,
    pub message: RemoteMessage,
}

/// A message document read back; `None` if it lacks what a chat line needs.
pub fn stored_message(document: &Document) -> Option<StoredMessage> {
    Some(StoredMessage {
        id: document.get_object_id("_id").ok()?,
        millis: document.get_datetime("timestamp").ok()?.timestamp_millis(),
        message: RemoteMessage {
            node: document.get_str("node").ok()?.to_string(),
            nick: document.get_str("nick").ok()?.to_string(),
            content: document.get_str("content").ok()?.to_string(),
            action: document.get_str("kind").ok() == Some(ACTION_KIND),
        },
    })
}

/// What one change event means.
pub enum Read {
    Message(StoredMessage),
    Event(StreamEvent),
    /// A heartbeat under this node's id from another process: two servers share a
    /// `--node-id`, and each takes the other's messages for its own.
    SameNodeId,
    /// This node's own client documents, or something not for us.
    Nothing,
    /// The stream has ended (its collection or database was dropped or renamed).
    Invalidated,
}

/// Reads one change event of the stream `pipeline` describes, as node `me` in its run `run`.
pub fn read_event(
    event: &ChangeStreamEvent<Document>,
    messages: &str,
    (me, run): (&str, ObjectId),
) -> Read {
    let coll = event.ns.as_ref().and_then(|ns| ns.coll.as_deref());
    match (&event.operation_type, coll) {
        (OperationType::Invalidate, _) => Read::Invalidated,
        (OperationType::Insert, Some(coll)) if coll == messages => event
            .full_document
            .as_ref()
            .and_then(stored_message)
            .map_or(Read::Nothing, Read::Message),
        (OperationType::Insert | OperationType::Replace, Some(_)) => event
            .full_document
            .as_ref()
            .map_or(Read::Nothing, |document| {
                presence_written(document, (me, run))
            }),
        (OperationType::Delete, Some(_)) => event
            .document_key
            .as_ref()
            .and_then(|key| key.get_str("_id").ok())
            .map_or(Read::Nothing, |key| presence_deleted(key, me)),
        _ => Read::Nothing,
    }
}

/// A presence document was inserted or replaced.
fn presence_written(document: &Document, (me, run): (&str, ObjectId)) -> Read {
    let (Ok(kind), Ok(node)) = (document.get_str("kind"), document.get_str("node")) else {
        return Read::Nothing;
    };
    match kind {
        "node" if node == me && document.get_object_id("run").is_ok_and(|r| r != run) => {
            Read::SameNodeId
        }
        "node" => Read::Event(StreamEvent::Heartbeat {
            node: node.to_string(),
            interval: interval_of(document),
        }),
        "client" if node != me => remote_client(document).map_or(Read::Nothing, |client| {
            Read::Event(StreamEvent::ClientJoined(client))
        }),
        _ => Read::Nothing,
    }
}

/// Another node's client, from its presence document.
fn remote_client(document: &Document) -> Option<RemoteClient> {
    let (node, id) = parse_client_key(document.get_str("_id").ok()?)?;
    let joined = document
        .get_datetime("joined")
        .or_else(|_| document.get_datetime("seen"))
        .ok()?;
    Some(RemoteClient {
        node: node.to_string(),
        id,
        nick: document.get_str("nick").ok()?.to_string(),
        joined_millis: joined.timestamp_millis(),
    })
}

/// A presence document was deleted: a node's (no `/`) or a client's (`node/id`).
fn presence_deleted(key: &str, me: &str) -> Read {
    match parse_client_key(key) {
        None if key != me && !key.contains('/') => Read::Event(StreamEvent::NodeGone {
            node: key.to_string(),
        }),
        Some((node, id)) if node != me => Read::Event(StreamEvent::ClientLeft {
            node: node.to_string(),
            id,
        }),
        _ => Read::Nothing,
    }
}

fn interval_of(document: &Document) -> Duration {
    let millis = document.get_i64("interval_ms").unwrap_or(10_000);
    Duration::from_millis(u64::try_from(millis).unwrap_or(10_000))
}

/// Everyone on the other nodes, from the presence collection's documents, leaving out those
/// past `expires` at `now` (the database's clock): a node that stopped without a word and was
/// not swept out yet.
pub fn snapshot(documents: &[Document], me: &str, now: DateTime, announce: bool) -> StreamEvent {
    let fresh = |document: &&Document| {
        document
            .get_datetime("expires")
            .is_ok_and(|expires| *expires > now)
            && document.get_str("node").is_ok_and(|node| node != me)
    };
    let mut clients = Vec::new();
    let mut nodes = Vec::new();
    for document in documents.iter().filter(fresh) {
        match document.get_str("kind") {
            Ok("node") => nodes.extend(
                document
                    .get_str("node")
                    .map(|node| (node.to_string(), interval_of(document))),
            ),
            Ok("client") => clients.extend(remote_client(document)),
            _ => {}
        }
    }
    // Clients of nodes with a live heartbeat only.
    clients.retain(|client| nodes.iter().any(|(node, _)| *node == client.node));
    StreamEvent::Snapshot {
        clients,
        nodes,
        announce,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletions_name_a_node_or_one_of_its_clients() {
        assert!(matches!(
            presence_deleted("n2", "n1"),
            Read::Event(StreamEvent::NodeGone { node }) if node == "n2"
        ));
        assert!(matches!(
            presence_deleted("n2/7", "n1"),
            Read::Event(StreamEvent::ClientLeft { node, id: 7 }) if node == "n2"
        ));
        assert!(matches!(presence_deleted("n1/7", "n1"), Read::Nothing));
        assert!(matches!(presence_deleted("n1", "n1"), Read::Nothing));
        assert!(matches!(presence_deleted("n2/x", "n1"), Read::Nothing));
    }

    fn client(nick: &str, chosen: bool) -> LocalClient {
        LocalClient {
            nick: nick.to_string(),
            chosen,
            joined: DateTime::from_millis(500),
        }
    }

    #[test]
    fn only_chosen_nicks_are_claimed_in_the_unique_index() {
        let now = DateTime::from_millis(1_000);
        let interval = Duration::from_secs(10);
        let chosen = client_document("n1", 3, &client("Alice", true), interval, now);
        assert_eq!(chosen.get_str("nick_key").ok(), Some("alice"));
        assert_eq!(chosen.get_str("_id").ok(), Some("n1/3"));
        let default = client_document("n1", 4, &client("127.0.0.1:5000", false), interval, now);
        assert!(default.get("nick_key").is_none());
        assert_eq!(
            default.get_datetime("expires").unwrap().timestamp_millis(),
            31_000
        );
    }

    #[test]
    fn a_heartbeat_of_another_process_under_our_id_is_noticed() {
        let (mine, other) = (ObjectId::new(), ObjectId::new());
        let interval = Duration::from_secs(10);
        let heartbeat = node_document("n1", other, interval, DateTime::from_millis(0));
        assert!(matches!(
            presence_written(&heartbeat, ("n1", mine)),
            Read::SameNodeId
        ));
        assert!(matches!(
            presence_written(&heartbeat, ("n1", other)),
            Read::Event(StreamEvent::Heartbeat { .. })
        ));
    }

    #[test]
    fn a_snapshot_leaves_out_expired_nodes_and_their_clients() {
        let interval = Duration::from_secs(10);
        let then = DateTime::from_millis(0);
        let now = DateTime::from_millis(20_000);
        let run = ObjectId::new();
        let documents = vec![
            node_document("n2", run, interval, then),
            client_document("n2", 1, &client("bob", true), interval, then),
            node_document("n3", run, interval, DateTime::from_millis(-20_000)),
            client_document("n3", 1, &client("carol", true), interval, then),
            node_document("n1", run, interval, then),
            client_document("n1", 1, &client("me", true), interval, then),
        ];
        let StreamEvent::Snapshot { clients, nodes, .. } = snapshot(&documents, "n1", now, true)
        else {
            panic!("a snapshot");
        };
        assert_eq!(nodes, vec![("n2".to_string(), interval)]);
        assert_eq!(
            clients,
            vec![RemoteClient {
                node: "n2".to_string(),
                id: 1,
                nick: "bob".to_string(),
                joined_millis: 500,
            }]
        );
    }
}
