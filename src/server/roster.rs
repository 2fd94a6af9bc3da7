//! The loop's view of the other cluster nodes (`--cluster`): who is on them, what their change
//! events mean to local clients, and when a silent node is taken for gone.
//!
//! Everything arrives through the inbox (see `cluster` for the threads): messages of other
//! nodes are delivered like local chat, their clients' joins, leaves and renames go through
//! the same coalesced presence notices, and `/who` lists every node's clients with their node.
//!
//! A node is gone when it removes its heartbeat (a clean stop) or a sweep removes it. When 3
//! of its heartbeat intervals pass without one (while this node's own heartbeats keep
//! arriving: if this node's stream stalls, every node would look silent), it is taken for
//! silent: its users are announced as gone and left out of `/who`, but remembered, and if
//! its heartbeat comes back (the database was slow for it, not the node dead), they are
//! announced again.

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
    /// Taken for gone after 3 intervals without a heartbeat; its clients are not shown.
    silent: bool,
    /// Its clients by connection id: nick, and when it joined (milliseconds, the database's
    /// clock).
    clients: BTreeMap<u64, (String, i64)>,
}

impl Node {
    fn new(interval: Duration, now: Instant) -> Self {
        Node {
            interval,
            last_heard: now,
            silent: false,
            clients: BTreeMap::new(),
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

    /// A local client joined the chat (at `joined_millis`, wall clock): the other nodes are
    /// told through the database.
    pub fn local_joined(&self, id: u64, nick: &str, joined_millis: i64) {
        let nick = nick.to_string();
        let joined = bson::DateTime::from_millis(joined_millis);
        self.cluster
            .tell(PresenceUpdate::Joined { id, nick, joined });
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

    /// The `/who` line: every node's clients in the order they joined, each with its node:
    /// `* 3 online: alice (n1), bob (n2), 127.0.0.1:50312 (n1)`.
    pub fn who(&self, room: &Room) -> String {
        let me = self.node_id();
        let local = room
            .names_and_join_times()
            .map(|(name, joined)| (joined, name, me));
        let remote = self.nodes.iter().filter(|(_, node)| !node.silent);
        let remote = remote.flat_map(|(id, node)| {
            node.clients
                .values()
                .map(move |(nick, joined)| (*joined, nick.as_str(), id.as_str()))
        });
        let mut all: Vec<(i64, &str, &str)> = local.chain(remote).collect();
        all.sort_by_key(|(joined, _, _)| *joined);
        let entries: Vec<String> = all
            .iter()
            .map(|(_, name, node)| format!("{name} ({node})"))
            .collect();
        protocol::who(entries.iter().map(String::as_str))
    }

    /// What `/stats` adds with `--cluster`.
    pub fn stats(&self) -> String {
        let figures = self.cluster.figures();
        let get = ClusterFigures::get;
        format!(
            " nodes={} remote_in={} stream_stalls={} stream_resumes={} backfills={} missed_gaps={}",
            self.nodes.values().filter(|node| !node.silent).count() + 1,
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
                StreamEvent::Heartbeat { node, interval } => {
                    self.heartbeat(room, presence, (node, interval), now)
                }
                StreamEvent::NodeGone { node } => self.node_gone(room, presence, &node, now),
                StreamEvent::ClientJoined(client) => {
                    self.client_joined(room, presence, client, now)
                }
                StreamEvent::ClientLeft { node, id } => {
                    self.client_left(room, presence, (&node, id), now)
                }
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

    /// Takes nodes silent for 3 of their heartbeat intervals for gone, while this node's own
    /// heartbeats come through (see the module docs).
    pub fn check_nodes(&mut self, room: &mut Room, presence: &mut Presence, now: Instant) {
        if now < self.next_check {
            return;
        }
        self.next_check = now + CHECK_EVERY;
        let own_stream_flows = self
            .own_heard
            .is_some_and(|heard| now <= heard + self.cluster.heartbeat() * 2);
        if !own_stream_flows {
            return;
        }
        for (id, node) in &mut self.nodes {
            let overdue = now > node.last_heard + node.interval * CLUSTER_SILENT_INTERVALS;
            if overdue && !node.silent {
                crate::warn!("cluster: node {id} has gone silent; its users are taken for gone");
                node.silent = true;
                for (nick, _) in node.clients.values() {
                    presence.remote_left(room, nick, now);
                }
            }
        }
    }

    /// When `check_nodes` wants to run next.
    pub fn next_due(&self) -> Option<Instant> {
        (!self.nodes.is_empty()).then_some(self.next_check)
    }

    /// Stops the cluster threads (see `Cluster::stop`).
    pub fn stop(self, deadline: Instant, meanwhile: impl FnMut()) {
        self.cluster.stop(deadline, meanwhile);
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

    fn heartbeat(
        &mut self,
        room: &mut Room,
        presence: &mut Presence,
        (node, interval): (String, Duration),
        now: Instant,
    ) {
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
        if std::mem::take(&mut entry.silent) {
            crate::info!("cluster: a silent node is back; its users are shown again");
            for (nick, _) in entry.clients.values() {
                presence.remote_joined(room, nick, now);
            }
        }
    }

    fn node_gone(&mut self, room: &mut Room, presence: &mut Presence, node: &str, now: Instant) {
        let Some(gone) = self.nodes.remove(node).filter(|gone| !gone.silent) else {
            return;
        };
        for (nick, _) in gone.clients.values() {
            presence.remote_left(room, nick, now);
        }
    }

    fn client_joined(
        &mut self,
        room: &mut Room,
        presence: &mut Presence,
        client: RemoteClient,
        now: Instant,
    ) {
        let interval = self.cluster.heartbeat();
        let entry = self
            .nodes
            .entry(client.node)
            .or_insert_with(|| Node::new(interval, now));
        let nick = client.nick;
        match entry.clients.get_mut(&client.id) {
            Some((old, _)) if entry.silent => *old = nick,
            Some((old, _)) if *old != nick => {
                let old = std::mem::replace(old, nick.clone());
                presence.announce_remote_join(room, &old, now);
                presence.before_name_taken(room, &nick, now);
                room.notice_all(None, &protocol::renamed(&old, &nick));
            }
            Some(_) => {} // written again with the same nick (a node catching up)
            None => {
                let joined = (nick.clone(), client.joined_millis);
                entry.clients.insert(client.id, joined);
                if !entry.silent {
                    presence.remote_joined(room, &nick, now);
                }
            }
        }
    }

    fn client_left(
        &mut self,
        room: &mut Room,
        presence: &mut Presence,
        (node, id): (&str, u64),
        now: Instant,
    ) {
        let Some(entry) = self.nodes.get_mut(node) else {
            return;
        };
        if let Some((nick, _)) = entry.clients.remove(&id).filter(|_| !entry.silent) {
            presence.remote_left(room, &nick, now);
        }
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
                node.clients
                    .insert(client.id, (client.nick, client.joined_millis));
            }
        }
        let old = std::mem::replace(&mut self.nodes, fresh);
        if !announce {
            return;
        }
        // Shown: held by a node that is not silent (a silent node's users were announced gone).
        let shown = |nodes: &BTreeMap<String, Node>, node: &str, id: &u64| {
            nodes
                .get(node)
                .is_some_and(|n| !n.silent && n.clients.contains_key(id))
        };
        for (node, was) in old.iter().filter(|(_, was)| !was.silent) {
            for (id, (nick, _)) in &was.clients {
                if !shown(&self.nodes, node, id) {
                    presence.remote_left(room, nick, now);
                }
            }
        }
        for (node, is) in &self.nodes {
            for (id, (nick, _)) in &is.clients {
                if !shown(&old, node, id) {
                    presence.remote_joined(room, nick, now);
                }
            }
        }
    }

    /// (node, nick) of every client of the other nodes, leaving out silent ones.
    fn remote_clients(&self) -> impl Iterator<Item = (&str, &str)> {
        let shown = self.nodes.iter().filter(|(_, node)| !node.silent);
        shown.flat_map(|(id, node)| {
            node.clients
                .values()
                .map(move |(nick, _)| (id.as_str(), nick.as_str()))
        })
    }
}
