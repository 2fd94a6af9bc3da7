//! What the cluster stores and watches: presence documents, the change stream's pipeline, and
//! change events read back as `StreamEvent`s. Pure: no database calls here.
//!
//! The presence collection holds one document per node (its heartbeat) and one per connected
//! client:
//!
//! ```text
//! { _id: "n1",    kind: "node",   node: "n1", seen: Date, expires: Date, interval_ms: 10000 }
//! { _id: "n1/17", kind: "client", node: "n1", nick: "alice", nick_key: "alice",
//!   seen: Date, expires: Date }
//! ```
//!
//! `expires` is `seen` plus 3 of the writing node's heartbeat intervals: every node sweeps out
//! documents past it (and a TTL index does too, as a backstop), so a node that stopped without
//! a word loses its users within 3 intervals whatever interval the sweeper itself uses.
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

/// When a document written at `now` by a node with this heartbeat interval goes stale.
fn expires(now: DateTime, interval: Duration) -> DateTime {
    let silent = interval * CLUSTER_SILENT_INTERVALS;
    DateTime::from_millis(now.timestamp_millis() + silent.as_millis() as i64)
}

/// The node's heartbeat document.
pub fn node_document(node: &str, interval: Duration, now: DateTime) -> Document {
    doc! {
        "_id": node,
        "kind": "node",
        "node": node,
        "seen": now,
        "expires": expires(now, interval),
        "interval_ms": interval.as_millis() as i64,
    }
}

/// A client's presence document; `chosen`: the nick was claimed with `/nick`.
pub fn client_document(
    node: &str,
    id: u64,
    nick: &str,
    chosen: bool,
    interval: Duration,
    now: DateTime,
) -> Document {
    let mut document = doc! {
        "_id": client_key(node, id),
        "kind": "client",
        "node": node,
        "nick": nick,
        "seen": now,
        "expires": expires(now, interval),
    };
    if chosen {
        document.insert("nick_key", nick.to_ascii_lowercase());
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
    /// This node's own client documents, or something not for us.
    Nothing,
    /// The stream has ended (its collection or database was dropped or renamed).
    Invalidated,
}

/// Reads one change event of the stream `pipeline` describes, as node `me`.
pub fn read_event(event: &ChangeStreamEvent<Document>, messages: &str, me: &str) -> Read {
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
            .map_or(Read::Nothing, |document| presence_written(document, me)),
        (OperationType::Delete, Some(_)) => event
            .document_key
            .as_ref()
            .and_then(|key| key.get_str("_id").ok())
            .map_or(Read::Nothing, |key| presence_deleted(key, me)),
        _ => Read::Nothing,
    }
}

/// A presence document was inserted or replaced.
fn presence_written(document: &Document, me: &str) -> Read {
    let (Ok(kind), Ok(node), Ok(key)) = (
        document.get_str("kind"),
        document.get_str("node"),
        document.get_str("_id"),
    ) else {
        return Read::Nothing;
    };
    match kind {
        "node" => Read::Event(StreamEvent::Heartbeat {
            node: node.to_string(),
            interval: interval_of(document),
        }),
        "client" if node != me => {
            let Ok(nick) = document.get_str("nick") else {
                return Read::Nothing;
            };
            Read::Event(StreamEvent::ClientJoined {
                key: key.to_string(),
                node: node.to_string(),
                nick: nick.to_string(),
            })
        }
        _ => Read::Nothing,
    }
}

/// A presence document was deleted: a node's (no `/`) or a client's (`node/id`).
fn presence_deleted(key: &str, me: &str) -> Read {
    match key.split_once('/') {
        None if key != me => Read::Event(StreamEvent::NodeGone {
            node: key.to_string(),
        }),
        Some((node, _)) if node != me => Read::Event(StreamEvent::ClientLeft {
            key: key.to_string(),
        }),
        _ => Read::Nothing,
    }
}

fn interval_of(document: &Document) -> Duration {
    let millis = document.get_i64("interval_ms").unwrap_or(10_000);
    Duration::from_millis(u64::try_from(millis).unwrap_or(10_000))
}

/// Everyone on the other nodes, from the presence collection's documents, leaving out those
/// past `expires` at `now` (a node that stopped without a word and was not swept out yet).
pub fn snapshot(documents: &[Document], me: &str, now: DateTime) -> StreamEvent {
    let fresh = |document: &&Document| {
        document
            .get_datetime("expires")
            .is_ok_and(|expires| *expires > now)
    };
    let mut clients = Vec::new();
    let mut nodes = Vec::new();
    for document in documents.iter().filter(fresh) {
        let (Ok(kind), Ok(node), Ok(key)) = (
            document.get_str("kind"),
            document.get_str("node"),
            document.get_str("_id"),
        ) else {
            continue;
        };
        if node == me {
            continue;
        }
        match (kind, document.get_str("nick")) {
            ("node", _) => nodes.push((node.to_string(), interval_of(document))),
            ("client", Ok(nick)) => clients.push(RemoteClient {
                key: key.to_string(),
                node: node.to_string(),
                nick: nick.to_string(),
            }),
            _ => {}
        }
    }
    // Clients of nodes with a live heartbeat only.
    clients.retain(|client| nodes.iter().any(|(node, _)| *node == client.node));
    StreamEvent::Snapshot {
        clients,
        nodes,
        announce: true,
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
            Read::Event(StreamEvent::ClientLeft { key }) if key == "n2/7"
        ));
        assert!(matches!(presence_deleted("n1/7", "n1"), Read::Nothing));
        assert!(matches!(presence_deleted("n1", "n1"), Read::Nothing));
    }

    #[test]
    fn only_chosen_nicks_are_claimed_in_the_unique_index() {
        let now = DateTime::from_millis(1_000);
        let interval = Duration::from_secs(10);
        let chosen = client_document("n1", 3, "Alice", true, interval, now);
        assert_eq!(chosen.get_str("nick_key").ok(), Some("alice"));
        assert_eq!(chosen.get_str("_id").ok(), Some("n1/3"));
        let default = client_document("n1", 4, "127.0.0.1:5000", false, interval, now);
        assert!(default.get("nick_key").is_none());
        assert_eq!(
            default.get_datetime("expires").unwrap().timestamp_millis(),
            31_000
        );
    }

    #[test]
    fn a_snapshot_leaves_out_expired_nodes_and_their_clients() {
        let interval = Duration::from_secs(10);
        let then = DateTime::from_millis(0);
        let now = DateTime::from_millis(20_000);
        let documents = vec![
            node_document("n2", interval, then),
            client_document("n2", 1, "bob", true, interval, then),
            node_document("n3", interval, DateTime::from_millis(-20_000)),
            client_document("n3", 1, "carol", true, interval, then),
            node_document("n1", interval, then),
            client_document("n1", 1, "me", true, interval, then),
        ];
        let StreamEvent::Snapshot { clients, nodes, .. } = snapshot(&documents, "n1", now) else {
            panic!("a snapshot");
        };
        assert_eq!(nodes, vec![("n2".to_string(), interval)]);
        assert_eq!(
            clients,
            vec![RemoteClient {
                key: "n2/1".to_string(),
                node: "n2".to_string(),
                nick: "bob".to_string(),
            }]
        );
    }
}
