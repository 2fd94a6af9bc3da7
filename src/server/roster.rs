//! The loop's view of the other cluster nodes (`--cluster`): who is on them, what their change
//! events mean to local clients, and when a silent node is taken for gone.
//!
//! Everything arrives through the inbox (see `cluster` for the threads): messages of other
//! nodes are delivered like local chat, their clients' joins, leaves and renames go through
//! the same coalesced presence notices, and `/who` lists every node's clients with their node.
//!
//! A node is gone when it removes its heartbeat (a clean stop), when a sweep removes it, or
//! when 3 of its heartbeat intervals pass without one while this node's own heartbeats keep
//! arriving: if this node's stream stalls, every node would look silent, so silence is judged
//! against our own heartbeat, never against the clock alone.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::presence::Presence;
use super::room::Room;
use crate::cluster::{
    Cluster, ClusterFigures, PresenceUpdate, RemoteClient, RemoteMessage, StreamEvent,
};
use crate::config::CLUSTER_SILENT_INTERVALS;
use crate::persist::ClientRef;
use crate::protocol;

/// How often silent nodes are looked for.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// The other nodes and their clients, and the handle on the cluster threads.
#[derive(Debug)]
pub struct Roster {
    cluster: Cluster,
    nodes: BTreeMap<String, Node>,
    /// When this node's own heartbeat last came through the stream.
    own_heard: Option<Instant>,
    /// Messages of other nodes delivered here.
    remote_in: u64,
    next_check: Instant,
}

#[derive(Debug)]
struct Node {
    interval: Duration,
    last_heard: Instant,
    /// Its clients in the order they joined: presence `_id` and nick.
    clients: Vec<(String, String)>,
}

impl Node {
    fn new(interval: Duration, now: Instant) -> Self {
        Node {
            interval,
            last_heard: now,
            clients: Vec::new(),
        }
    }
}

impl Roster {
    pub fn new(cluster: Cluster, now: Instant) -> Self {
        Roster {
            cluster,
            nodes: BTreeMap::new(),
            own_heard: None,
            remote_in: 0,
            next_check: now + CHECK_EVERY,
        }
    }

    pub fn node_id(&self) -> &str {
        self.cluster.node_id()
    }

    /// A local client joined the chat: the other nodes are told through the database.
    pub fn local_joined(&self, id: u64, nick: &str) {
        let nick = nick.to_string();
        self.cluster.tell(PresenceUpdate::Joined { id, nick });
    }

    pub fn local_left(&self, id: u64) {
        self.cluster.tell(PresenceUpdate::Left { id });
    }

    /// Asks the database for `nick` on behalf of `client`; the answer comes through the inbox.
    pub fn claim(&self, client: ClientRef, nick: &str) {
        let nick = nick.to_string();
        self.cluster.tell(PresenceUpdate::Claim { client, nick });
    }

    /// True if a client of another node is called `name`.
    pub fn name_taken(&self, name: &str) -> bool {
        self.remote_clients()
            .any(|(_, nick)| nick.eq_ignore_ascii_case(name))
    }

    /// The `/who` line: this node's clients, then the others', each with its node.
    pub fn who(&self, room: &Room) -> String {
        let me = self.node_id();
        let local = room.names().map(|name| format!("{name} ({me})"));
        let remote = self
            .remote_clients()
            .map(|(node, nick)| format!("{nick} ({node})"));
        let all: Vec<String> = local.chain(remote).collect();
        protocol::who(all.iter().map(String::as_str))
    }

    /// What `/stats` adds with `--cluster`.
    pub fn stats(&self) -> String {
        let figures = self.cluster.figures();
        let get = ClusterFigures::get;
        format!(
            " nodes={} remote_in={} stream_stalls={} stream_resumes={} backfills={} missed_gaps={}",
            self.nodes.len() + 1,
            self.remote_in,
            get(&figures.stream_stalls),
            get(&figures.stream_resumes),
            get(&figures.backfills),
            get(&figures.missed_gaps),
        )
    }

    /// Acts on a batch of change-stream events, in their order.
    pub fn apply(
        &mut self,
        room: &mut Room,
        presence: &mut Presence,
        events: Vec<StreamEvent>,
        now: Instant,
    ) {
        for event in events {
            match event {
                StreamEvent::Message(message) => self.deliver(room, presence, &message, now),
                StreamEvent::Heartbeat { node, interval } => self.heartbeat(node, interval, now),
                StreamEvent::NodeGone { node } => self.node_gone(room, presence, &node, now),
                StreamEvent::ClientJoined { key, node, nick } => {
                    self.client_joined(room, presence, (key, node, nick), now)
                }
                StreamEvent::ClientLeft { key } => self.client_left(room, presence, &key, now),
                StreamEvent::Snapshot {
                    clients,
                    nodes,
                    announce,
                } => self.replace_all(room, presence, (clients, nodes), announce, now),
                StreamEvent::Missed => {
                    room.notice_all(None, protocol::MISSED_FROM_OTHER_SERVERS);
                }
            }
        }
    }

    /// Takes nodes silent for 3 of their heartbeat intervals for gone, judged against this
    /// node's own heartbeat (see the module docs).
    pub fn check_nodes(&mut self, room: &mut Room, presence: &mut Presence, now: Instant) {
        if now < self.next_check {
            return;
        }
        self.next_check = now + CHECK_EVERY;
        let Some(own) = self.own_heard else { return };
        let silent: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, node)| node.last_heard + node.interval * CLUSTER_SILENT_INTERVALS < own)
            .map(|(id, _)| id.clone())
            .collect();
        for node in silent {
            crate::warn!("cluster: node {node} has gone silent; its users are taken for gone");
            self.node_gone(room, presence, &node, now);
        }
    }

    /// When `check_nodes` wants to run next.
    pub fn next_due(&self) -> Option<Instant> {
        (!self.nodes.is_empty()).then_some(self.next_check)
    }

    /// Stops the cluster threads (see `Cluster::stop`).
    pub fn stop(self, deadline: Instant) {
        self.cluster.stop(deadline);
    }

    fn deliver(
        &mut self,
        room: &mut Room,
        presence: &mut Presence,
        message: &RemoteMessage,
        now: Instant,
    ) {
        // Others hear of a client's join before they hear anything from it.
        presence.announce_remote_join(room, &message.nick, now);
        room.remote_chat(&message.nick, &message.content, message.action);
        self.remote_in += 1;
    }

    fn heartbeat(&mut self, node: String, interval: Duration, now: Instant) {
        if node == self.node_id() {
            self.own_heard = Some(now);
            return;
        }
        let entry = self
            .nodes
            .entry(node)
            .or_insert_with(|| Node::new(interval, now));
        entry.interval = interval;
        entry.last_heard = now;
    }

    fn node_gone(&mut self, room: &mut Room, presence: &mut Presence, node: &str, now: Instant) {
        let Some(gone) = self.nodes.remove(node) else {
            return;
        };
        for (_, nick) in gone.clients {
            presence.remote_left(room, &nick, now);
        }
    }

    fn client_joined(
        &mut self,
        room: &mut Room,
        presence: &mut Presence,
        (key, node, nick): (String, String, String),
        now: Instant,
    ) {
        let interval = self.cluster_interval();
        let entry = self
            .nodes
            .entry(node)
            .or_insert_with(|| Node::new(interval, now));
        match entry.clients.iter_mut().find(|(known, _)| *known == key) {
            Some((_, old)) if *old != nick => {
                let old = std::mem::replace(old, nick.clone());
                presence.announce_remote_join(room, &old, now);
                presence.before_name_taken(room, &nick, now);
                room.notice_all(None, &protocol::renamed(&old, &nick));
            }
            Some(_) => {} // written again with the same nick (a node catching up)
            None => {
                entry.clients.push((key, nick.clone()));
                presence.remote_joined(room, &nick, now);
            }
        }
    }

    fn client_left(&mut self, room: &mut Room, presence: &mut Presence, key: &str, now: Instant) {
        let Some((node, _)) = key.split_once('/') else {
            return;
        };
        let Some(entry) = self.nodes.get_mut(node) else {
            return;
        };
        let Some(at) = entry.clients.iter().position(|(known, _)| known == key) else {
            return;
        };
        let (_, nick) = entry.clients.remove(at);
        presence.remote_left(room, &nick, now);
    }

    /// Replaces what is known of the other nodes with a snapshot; with `announce`, clients
    /// hear of who came and went in between.
    fn replace_all(
        &mut self,
        room: &mut Room,
        presence: &mut Presence,
        (clients, nodes): (Vec<RemoteClient>, Vec<(String, Duration)>),
        announce: bool,
        now: Instant,
    ) {
        let mut fresh: BTreeMap<String, Node> = nodes
            .into_iter()
            .map(|(id, interval)| (id, Node::new(interval, now)))
            .collect();
        for client in clients {
            if let Some(node) = fresh.get_mut(&client.node) {
                node.clients.push((client.key, client.nick));
            }
        }
        let old = std::mem::replace(&mut self.nodes, fresh);
        if !announce {
            return;
        }
        for (_, nick) in old.values().flat_map(|node| &node.clients) {
            if !self.knows(nick) {
                presence.remote_left(room, nick, now);
            }
        }
        let known_before = |key: &str| {
            old.values()
                .any(|node| node.clients.iter().any(|(k, _)| k == key))
        };
        let joined: Vec<String> = self
            .nodes
            .values()
            .flat_map(|node| &node.clients)
            .filter(|(key, _)| !known_before(key))
            .map(|(_, nick)| nick.clone())
            .collect();
        for nick in joined {
            presence.remote_joined(room, &nick, now);
        }
    }

    fn knows(&self, nick: &str) -> bool {
        self.remote_clients().any(|(_, known)| known == nick)
    }

    /// (node, nick) of every client of the other nodes.
    fn remote_clients(&self) -> impl Iterator<Item = (&str, &str)> {
        self.nodes.iter().flat_map(|(id, node)| {
            node.clients
                .iter()
                .map(move |(_, nick)| (id.as_str(), nick.as_str()))
        })
    }

    /// The interval to assume for a node not heard from yet: this node's own.
    fn cluster_interval(&self) -> Duration {
        self.cluster.heartbeat()
    }
}
