//! Several servers sharing one chat through the database (`--cluster`): real `peerchat-server`
//! processes on loopback, on one SecantusDB replica set (its change streams carry every node's
//! messages and presence to the others). What is checked: every client gets every other client's
//! messages exactly once and in per-sender order, `/who` and presence notices span the nodes,
//! nicks are unique across nodes, a dead node's users disappear, a database restart and a lost
//! change-stream history lose and repeat nothing, unsaved messages stay on their node, and
//! without `--cluster` nothing changes. Each test has a database of its own, so they run in
//! parallel; every wait is bounded.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Output;
use std::thread;
use std::time::{Duration, Instant};

use bson::{doc, Document};
use common::process::{run_with_args, spawn_server, ServerProcess, SERVER};
use common::{free_port, Chat, TestDb, DEADLINE};
use mongodb::sync::Collection;

/// How long a killed node's users may take to leave `/who` elsewhere: the spec says 3 heartbeat
/// intervals (1 s here) after its last heartbeat; the rest is room for a loaded test machine.
const GONE_WITHIN: Duration = Duration::from_secs(30);

/// How long a test waits for all its messages to arrive.
const DELIVERY_WITHIN: Duration = Duration::from_secs(40);

/// The notice for a gap in other nodes' messages that could not be closed.
const MISSED: &str = "* some messages from other servers may have been missed";

/// One `peerchat-server --cluster` process.
struct Node {
    id: String,
    addr: SocketAddr,
    process: ServerProcess,
}

/// A failing test shows each node's log, for the reason.
impl Drop for Node {
    fn drop(&mut self) {
        if thread::panicking() {
            let status = self.process.try_exit();
            for line in self.process.log_so_far() {
                eprintln!("[{}] {line}", self.id);
            }
            eprintln!("[{}] exit status now: {status:?}", self.id);
        }
    }
}

/// The flags of every server here: its database, a short saving timeout (outage tests), no
/// flood control and no history on join (tests send fast and count lines), and one presence
/// notice per event.
fn base_flags(db: &TestDb) -> String {
    format!(
        "--mongo-uri '{}' --mongo-db '{}' --mongo-timeout-ms 1000 --flood-rate 0 \
         --history-on-join 0 --presence-interval 0",
        db.uri, db.database
    )
}

/// A cluster node called `id` on `db`, with a 1 s heartbeat.
fn start_node(db: &TestDb, id: &str) -> Node {
    let node = start_node_with(db, &format!("--node-id {id}"));
    assert_eq!(node.id, id, "the node id given is the one logged");
    node
}

/// A cluster node with a 1 s heartbeat and `extra` flags. Checks the start log: the node says
/// which collections it watches before it says it listens (it watches before it accepts).
fn start_node_with(db: &TestDb, extra: &str) -> Node {
    let flags = format!(
        "--cluster --heartbeat-interval 1 {} {extra}",
        base_flags(db)
    );
    let (process, addr) = spawn_server("", &flags);
    let watching = process
        .before_listening
        .iter()
        .find_map(|line| Some(line.split_once("cluster: node ")?.1.to_string()))
        .unwrap_or_else(|| {
            panic!(
                "no `cluster: node` line before `listening on`: {:?}",
                process.before_listening
            )
        });
    let (id, rest) = watching.split_once(' ').expect("`ID watching …`");
    assert_eq!(
        rest,
        format!(
            "watching {0}.messages and {0}.messages_presence",
            db.database
        )
    );
    Node {
        id: id.to_string(),
        addr,
        process,
    }
}

/// The sender and text of a chat line `<NAME> TEXT`.
fn chat_line(line: &str) -> Option<(&str, &str)> {
    line.strip_prefix('<')?.split_once("> ")
}

/// The entries `(name, node)` of a `/who` answer, `* 3 online: alice (n1), bob (n2)`; checks
/// that the count matches the list.
fn who_entries(line: &str) -> Option<Vec<(String, String)>> {
    let (count, list) = line.strip_prefix("* ")?.split_once(" online: ")?;
    let count: usize = count.parse().ok()?;
    let entries: Vec<(String, String)> = list
        .split(", ")
        .map(|entry| {
            let (name, node) = entry
                .rsplit_once(" (")
                .unwrap_or_else(|| panic!("no `(node)` after {entry:?} in {line:?}"));
            let node = node.strip_suffix(')').expect("`(node)`");
            (name.to_string(), node.to_string())
        })
        .collect();
    assert_eq!(
        entries.len(),
        count,
        "the count and the list differ: {line}"
    );
    Some(entries)
}

/// Asks `/who`; lines that arrive before the answer are added to `seen`.
fn who(chat: &mut Chat, seen: &mut Vec<String>) -> Vec<(String, String)> {
    chat.send("/who");
    loop {
        let line = chat.line();
        if let Some(entries) = who_entries(&line) {
            return entries;
        }
        seen.push(line);
    }
}

/// Asks `ask` every 200 ms until its answer is `wanted`, for at most `within`; `what` names
/// what was waited for if it never comes.
fn poll_until<T: std::fmt::Debug>(
    chat: &mut Chat,
    (what, within): (&str, Duration),
    mut ask: impl FnMut(&mut Chat) -> T,
    wanted: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        let answer = ask(chat);
        if wanted(&answer) {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "{}: {what} not reached in {within:?}: {answer:?}",
            chat.name
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// Asks `/who` every 200 ms until the answer is `wanted`, for at most `within`.
fn who_until(
    chat: &mut Chat,
    seen: &mut Vec<String>,
    within: Duration,
    wanted: impl Fn(&[(String, String)]) -> bool,
) -> Vec<(String, String)> {
    let ask = |chat: &mut Chat| who(chat, seen);
    poll_until(chat, ("the /who wanted", within), ask, |e| wanted(e))
}

/// The names in a presence notice with `verb` (`* bob left`, `* bob and carol left`,
/// `* a, b and c left`); `None` for any other line.
fn presence_names(line: &str, verb: &str) -> Option<Vec<String>> {
    let who = line
        .strip_prefix("* ")?
        .strip_suffix(verb)?
        .strip_suffix(' ')?;
    let (head, last) = match who.rsplit_once(" and ") {
        Some((head, last)) => (head, Some(last)),
        None => (who, None),
    };
    let mut names: Vec<String> = head.split(", ").map(str::to_string).collect();
    names.extend(last.map(str::to_string));
    Some(names)
}

/// The `key=value` figures of the answer to `/stats`.
fn stats(chat: &mut Chat) -> HashMap<String, String> {
    chat.send("/stats");
    let line = chat.wait_for(|line| line.starts_with("* stats "));
    line["* stats ".len()..]
        .split(' ')
        .map(|pair| {
            let (key, value) = pair.split_once('=').expect("key=value");
            (key.to_string(), value.to_string())
        })
        .collect()
}

fn figure(stats: &HashMap<String, String>, key: &str) -> u64 {
    stats
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in /stats: {stats:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number: {stats:?}"))
}

/// Asks `/stats` every 200 ms until `wanted`, for at most `DEADLINE`.
fn stats_until(
    chat: &mut Chat,
    what: &str,
    wanted: impl Fn(&HashMap<String, String>) -> bool,
) -> HashMap<String, String> {
    poll_until(chat, (what, DEADLINE), stats, wanted)
}

/// What a client received: the texts of chat lines per sender, in arrival order, and every
/// other line.
#[derive(Default, Debug)]
struct Received {
    chat: HashMap<String, Vec<String>>,
    other: Vec<String>,
}

impl Received {
    fn from(&self, sender: &str) -> &[String] {
        self.chat.get(sender).map_or(&[], Vec::as_slice)
    }

    /// `receiver` got `expected` from `sender`: every line once, in the order sent.
    fn assert_once_in_order(&self, receiver: &str, sender: &str, expected: &[String]) {
        assert_eq!(
            self.from(sender),
            expected,
            "{receiver} from {sender}: every line once, in order"
        );
    }

    /// `receiver` was never told that messages may have been missed.
    fn assert_no_gap(&self, receiver: &str) {
        assert!(
            !self.other.iter().any(|line| line == MISSED),
            "{receiver} was told of a gap: {:?}",
            self.other
        );
    }

    fn add(&mut self, line: String) {
        match chat_line(&line) {
            Some((sender, text)) => self
                .chat
                .entry(sender.to_string())
                .or_default()
                .push(text.to_string()),
            None => self.other.push(line),
        }
    }
}

/// Reads `chat`'s lines until `done` holds (asked after each line), for at most `within`; then
/// whatever else arrives before a quiet half second, so a late duplicate shows too.
fn receive(chat: &mut Chat, within: Duration, done: impl Fn(&Received) -> bool) -> Received {
    let mut received = Received::default();
    let deadline = Instant::now() + within;
    while !done(&received) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{}: not everything arrived within {within:?}; got {} chat lines: {:?}",
            chat.name,
            received.chat.values().map(Vec::len).sum::<usize>(),
            received
                .chat
                .iter()
                .map(|(sender, texts)| (sender, texts.len(), texts.last()))
                .collect::<Vec<_>>()
        );
        if let Some(line) = chat.try_line(left) {
            received.add(line);
        }
    }
    for _ in 0..1000 {
        match chat.try_line(Duration::from_millis(500)) {
            Some(line) => received.add(line),
            None => break,
        }
    }
    received
}

/// `count` lines `PREFIX N` for N from 0.
fn numbered(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|n| format!("{prefix} {n}")).collect()
}

/// Waits up to `within` for a message with this nick and content to be stored.
fn is_stored(messages: &Collection<Document>, nick: &str, content: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let found = messages
            .count_documents(doc! { "nick": nick, "content": content })
            .run()
            .unwrap_or(0);
        if found > 0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The content of a `! not saved: "TEXT" (REASON)` line, and its reason.
fn not_saved(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("! not saved: \"")?;
    let (content, reason) = rest.split_once("\" (")?;
    Some((content, reason.strip_suffix(')')?))
}

// ---------------------------------------------------------------------------------------------

/// Three nodes with two clients each; every client sends 30 numbered lines at once. Each client
/// gets the 30 lines of each of the five others exactly once and in order (its own node's as
/// well as the other nodes'), and none of its own.
#[test]
fn every_client_gets_every_other_clients_messages_once_in_order() {
    const K: usize = 30;
    let db = TestDb::start_own();
    let nodes: Vec<Node> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| start_node(&db, id))
        .collect();
    let mut clients = Vec::new();
    for node in &nodes {
        for letter in ["a", "b"] {
            clients.push(Chat::named(node.addr, &format!("{letter}_{}", node.id)));
        }
    }
    let names: Vec<String> = clients.iter().map(|chat| chat.name.clone()).collect();
    let expected = numbered("seq", K);

    let workers: Vec<_> = clients
        .into_iter()
        .map(|mut chat| {
            let others: Vec<String> = names.iter().filter(|n| **n != chat.name).cloned().collect();
            thread::spawn(move || {
                for text in numbered("seq", K) {
                    chat.send(&text);
                }
                let received = receive(&mut chat, DELIVERY_WITHIN, |got| {
                    others.iter().all(|sender| got.from(sender).len() >= K)
                });
                (chat, received)
            })
        })
        .collect();
    let mut finished = Vec::new();
    for worker in workers {
        finished.push(worker.join().expect("a client's thread failed"));
    }
    for (chat, received) in &finished {
        assert!(
            received.from(&chat.name).is_empty(),
            "{} got its own messages back",
            chat.name
        );
        for sender in names.iter().filter(|n| **n != chat.name) {
            received.assert_once_in_order(&chat.name, sender, &expected);
        }
        received.assert_no_gap(&chat.name);
    }

    // Each node counts the 4 × K messages of the other nodes' clients among those it delivered,
    // and knows of 3 live nodes; the heartbeats kept every stream from looking stalled.
    for (chat, _) in finished.iter_mut().step_by(2) {
        let figures = stats_until(chat, "nodes=3", |f| figure(f, "nodes") == 3);
        // Each of the 4 clients of the other nodes sent K: each message counted once.
        assert_eq!(figure(&figures, "remote_in"), 4 * K as u64, "{figures:?}");
        assert_eq!(figure(&figures, "missed_gaps"), 0, "{figures:?}");
        assert_eq!(figure(&figures, "stream_stalls"), 0, "{figures:?}");
    }
    drop(nodes);
}

/// `/who` on each node lists all clients of all nodes once, with their node, its own first; a
/// nick in use on one node is taken on the others (in any case); a rename crosses nodes and
/// frees the old nick everywhere; two nodes racing for one nick give it to exactly one.
#[test]
fn who_spans_nodes_and_nicks_are_unique_across_them() {
    let db = TestDb::start_own();
    let nodes: Vec<Node> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| start_node(&db, id))
        .collect();
    let mut named: Vec<Vec<Chat>> = nodes
        .iter()
        .map(|node| {
            ["a", "b"]
                .iter()
                .map(|letter| Chat::named(node.addr, &format!("{letter}_{}", node.id)))
                .collect()
        })
        .collect();
    // A client without a nick, listed by its address.
    let mut anon = Chat::connect(nodes[2].addr);
    let mut everyone: HashSet<(String, String)> = HashSet::new();
    for (node, chats) in nodes.iter().zip(&named) {
        for chat in chats {
            everyone.insert((chat.name.clone(), node.id.clone()));
        }
    }
    everyone.insert((anon.name.clone(), "n3".to_string()));

    // In the order they joined, whichever node they are on: one after another above.
    let mut joined_order: Vec<(String, String)> = nodes
        .iter()
        .zip(&named)
        .flat_map(|(node, chats)| chats.iter().map(|c| (c.name.clone(), node.id.clone())))
        .collect();
    joined_order.push((anon.name.clone(), "n3".to_string()));

    let mut seen = Vec::new();
    for (node, chats) in nodes.iter().zip(named.iter_mut()) {
        let asker = &mut chats[0];
        let entries = who_until(asker, &mut seen, DEADLINE, |e| e.len() >= 7);
        let listed: HashSet<(String, String)> = entries.iter().cloned().collect();
        assert_eq!(entries.len(), 7, "each client once: {entries:?}");
        assert_eq!(listed, everyone, "on {}", node.id);
        assert_eq!(
            entries, joined_order,
            "on {}: every node's clients in the order they joined",
            node.id
        );
    }

    check_presence_documents(&db, &everyone);

    // Taken on n1, so taken on n3, whatever the case.
    let anon_renamed = format!("* {} is now ", anon.name);
    for nick in ["a_n1", "A_N1"] {
        anon.send(&format!("/nick {nick}"));
        assert_eq!(
            anon.wait_for(|l| l.starts_with("! ") || l.starts_with(&anon_renamed)),
            format!("! nick {nick} is taken")
        );
    }

    // A rename on n2 is announced on n1 and n3 and frees the old nick for n3.
    let renamed = "* b_n2 is now bee";
    named[1][1].send("/nick bee");
    named[1][1].wait_for(|l| l == renamed);
    named[0][0].wait_for(|l| l == renamed);
    named[2][0].wait_for(|l| l == renamed);
    let old_anon = anon.name.clone();
    anon.send("/nick b_n2");
    let taken = format!("* {old_anon} is now b_n2");
    assert_eq!(
        anon.wait_for(|l| l.starts_with("! ") || l.starts_with(&anon_renamed)),
        taken,
        "the old nick is free after the rename"
    );
    anon.name = "b_n2".to_string();
    named[0][0].wait_for(|l| l == taken);
    let bee = ("bee".to_string(), "n2".to_string());
    let b_n2 = ("b_n2".to_string(), "n3".to_string());
    let entries = who_until(&mut named[0][0], &mut seen, DEADLINE, |e| {
        e.contains(&bee) && e.contains(&b_n2)
    });
    assert_eq!(entries.len(), 7, "{entries:?}");

    // n1 and n3 ask for the same new nick at once: the database gives it to one of them.
    let (left, right) = named.split_at_mut(2);
    let mut racers = [&mut left[0][1], &mut right[0][1]];
    for racer in racers.iter_mut() {
        racer.send("/nick racer");
    }
    let mut winners = 0;
    for racer in racers {
        let mine = format!("* {} is now racer", racer.name);
        let answer = racer.wait_for(|l| l == mine || l == "! nick racer is taken");
        if answer == mine {
            winners += 1;
        }
    }
    assert_eq!(winners, 1, "exactly one node may give out the nick");
    drop(nodes);
}

/// The presence collection as the spec pins it: one `node` document per node (heartbeat interval
/// in ms), one `client` document per client with its node and name (and the lowercase nick key
/// for chosen nicks only), a unique index on the nick key and a TTL index on a date every
/// document carries (`seen` in the spec; the core puts it on `expires`, `seen` plus 3 heartbeat
/// intervals, with `expireAfterSeconds: 0`, which serves the same end).
fn check_presence_documents(db: &TestDb, everyone: &HashSet<(String, String)>) {
    let presence = db
        .client()
        .database(&db.database)
        .collection::<Document>("messages_presence");
    let documents: Vec<Document> = presence
        .find(doc! {})
        .run()
        .expect("read presence")
        .collect::<Result<_, _>>()
        .expect("read presence");
    let mut clients = HashSet::new();
    let dated = |field: &str| documents.iter().all(|d| d.get_datetime(field).is_ok());
    let mut nodes = HashSet::new();
    for document in &documents {
        let node = document.get_str("node").expect("node").to_string();
        assert!(document.get_datetime("seen").is_ok(), "{document:?}");
        match document.get_str("kind").expect("kind") {
            "node" => {
                assert_eq!(document.get_str("_id").ok(), Some(node.as_str()));
                assert_eq!(
                    document
                        .get("interval_ms")
                        .and_then(bson::Bson::as_i64)
                        .or_else(|| document
                            .get("interval_ms")
                            .and_then(|v| v.as_i32().map(i64::from))),
                    Some(1000),
                    "{document:?}"
                );
                nodes.insert(node);
            }
            "client" => {
                let nick = document.get_str("nick").expect("nick").to_string();
                let id = document.get_str("_id").expect("_id");
                assert!(id.starts_with(&format!("{node}/")), "{document:?}");
                let chosen = !nick.starts_with("127.0.0.1:");
                let key = document.get_str("nick_key").ok();
                let expected_key = nick.to_lowercase();
                assert_eq!(key, chosen.then_some(expected_key.as_str()), "{document:?}");
                assert!(clients.insert((nick, node)), "twice: {document:?}");
            }
            other => panic!("unknown kind {other}: {document:?}"),
        }
    }
    assert_eq!(&clients, everyone);
    let all_nodes: HashSet<String> = everyone.iter().map(|(_, node)| node.clone()).collect();
    assert_eq!(nodes, all_nodes);
    let indexes: Vec<mongodb::IndexModel> = presence
        .list_indexes()
        .run()
        .expect("list presence indexes")
        .collect::<Result<_, _>>()
        .expect("read presence indexes");
    let on = |field: &str| {
        indexes
            .iter()
            .find(|index| index.keys.contains_key(field))
            .and_then(|index| index.options.clone())
            .unwrap_or_else(|| panic!("no index on {field}: {indexes:?}"))
    };
    assert_eq!(on("nick_key").unique, Some(true), "{indexes:?}");
    let ttl = indexes
        .iter()
        .find(|index| {
            index
                .options
                .as_ref()
                .is_some_and(|o| o.expire_after.is_some())
        })
        .unwrap_or_else(|| panic!("no TTL index: {indexes:?}"));
    let field = ttl.keys.keys().next().expect("a key");
    assert!(dated(field), "TTL on {field}, a date in every document");
}

/// A client's join, rename and leave on n2 (by /quit and by a closed connection) are announced on
/// n1, each once.
#[test]
fn joins_renames_and_leaves_cross_nodes() {
    let db = TestDb::start_own();
    let n1 = start_node(&db, "n1");
    let n2 = start_node(&db, "n2");
    let mut watcher = Chat::named(n1.addr, "watcher");

    let mut carol = Chat::connect(n2.addr);
    let address = carol.name.clone();
    watcher.wait_for(|l| l == format!("* {address} joined"));
    carol.send("/nick carol");
    carol.wait_for(|l| l == format!("* {address} is now carol"));
    watcher.wait_for(|l| l == format!("* {address} is now carol"));
    carol.send("/quit");
    carol.read_to_end();
    watcher.wait_for(|l| l == "* carol left");

    let dave = Chat::named(n2.addr, "dave");
    watcher.wait_for(|l| l.ends_with(" is now dave"));
    drop(dave);
    watcher.wait_for(|l| l == "* dave left");

    // Nothing about them twice.
    let rest = receive(&mut watcher, DEADLINE, |_| true);
    let repeated: Vec<&String> = rest
        .other
        .iter()
        .filter(|l| l.contains("carol") || l.contains("dave"))
        .collect();
    assert!(repeated.is_empty(), "announced again: {repeated:?}");
    drop((n1, n2));
}

/// A node stopped with SIGTERM takes its users with it at once; one killed with SIGKILL loses
/// them within a few heartbeat intervals: gone from `/who` on the survivor, `* NAME left` said,
/// and the survivor counts one node.
#[test]
fn a_stopped_or_killed_nodes_users_leave_the_other_nodes() {
    let db = TestDb::start_own();
    let n1 = start_node(&db, "n1");
    let mut n2 = start_node(&db, "n2");
    let mut n3 = start_node(&db, "n3");
    let mut watcher = Chat::named(n1.addr, "watcher");
    let _victims = [Chat::named(n2.addr, "v1"), Chat::named(n2.addr, "v2")];
    let _stopped = Chat::named(n3.addr, "t1");
    let mut seen = Vec::new();
    who_until(&mut watcher, &mut seen, DEADLINE, |e| e.len() == 4);

    n3.process.signal("-TERM");
    watcher.wait_for(|l| l == "* t1 left");
    assert_eq!(n3.process.wait_exit(), Some(0), "a clean stop");

    n2.process.signal("-KILL");
    n2.process.wait_exit();
    let entries = who_until(&mut watcher, &mut seen, GONE_WITHIN, |e| e.len() == 1);
    assert_eq!(entries, [("watcher".to_string(), "n1".to_string())]);
    let mut gone: HashSet<String> = HashSet::new();
    let deadline = Instant::now() + DEADLINE;
    let mut lines = seen.into_iter();
    while !(gone.contains("v1") && gone.contains("v2")) {
        let line = match lines.next() {
            Some(line) => line,
            None => {
                let left = deadline.saturating_duration_since(Instant::now());
                assert!(!left.is_zero(), "no `left` for the killed node's users");
                match watcher.try_line(left) {
                    Some(line) => line,
                    None => continue,
                }
            }
        };
        gone.extend(presence_names(&line, "left").unwrap_or_default());
    }
    stats_until(&mut watcher, "nodes=1", |f| figure(f, "nodes") == 1);
}

/// The database is killed and restarted on the same port (data and oplog kept) while two nodes'
/// clients send. Messages from before, during (those the database stored after all) and after
/// reach every client of the other node exactly once, in order; the ones not stored reach none
/// (their senders were told); local clients get every line, as on one node.
#[test]
fn a_database_restart_loses_and_repeats_no_stored_message() {
    let mut db = TestDb::start_own_on_disk();
    let nodes = [start_node(&db, "n1"), start_node(&db, "n2")];
    // A sender and a listener on each node.
    let mut senders = [
        Chat::named(nodes[0].addr, "s1"),
        Chat::named(nodes[1].addr, "s2"),
    ];
    let listeners = [
        Chat::named(nodes[0].addr, "l1"),
        Chat::named(nodes[1].addr, "l2"),
    ];
    let node_of: HashMap<&str, &str> = [("s1", "n1"), ("l1", "n1"), ("s2", "n2"), ("l2", "n2")]
        .into_iter()
        .collect();
    let mut sent: [Vec<String>; 2] = Default::default();
    let mut send_round = |senders: &mut [Chat; 2], round: &str, count: usize, pause: u64| {
        for text in numbered(round, count) {
            for (sender, texts) in senders.iter_mut().zip(sent.iter_mut()) {
                sender.send(&text);
                texts.push(text.clone());
            }
            thread::sleep(Duration::from_millis(pause));
        }
    };
    send_round(&mut senders, "before", 20, 10);
    db.wait_for_stored(40);
    db.kill();
    send_round(&mut senders, "during", 20, 50);
    db.restart();
    send_round(&mut senders, "after", 20, 10);
    // Then one closing line from each sender that is surely stored: sent again until one is.
    let messages = db.messages();
    for (sender, texts) in senders.iter_mut().zip(sent.iter_mut()) {
        let deadline = Instant::now() + DELIVERY_WITHIN;
        for n in 0.. {
            let text = format!("end {n}");
            sender.send(&text);
            texts.push(text.clone());
            if is_stored(&messages, &sender.name, &text, Duration::from_secs(2)) {
                break;
            }
            assert!(Instant::now() < deadline, "saving never resumed");
        }
    }

    let stored = db.stored();
    let mut stored_by: HashMap<String, HashSet<String>> = HashMap::new();
    for document in &stored {
        let nick = document.get_str("nick").unwrap();
        let node = document
            .get_str("node")
            .expect("a `node` in every document");
        assert_eq!(node_of[nick], node, "{document:?}");
        let content = document.get_str("content").unwrap().to_string();
        let first = stored_by
            .entry(nick.to_string())
            .or_default()
            .insert(content);
        assert!(first, "stored twice: {document:?}");
    }
    let sender_names = ["s1", "s2"];
    let mut clients: Vec<Chat> = senders.into_iter().chain(listeners).collect();
    let mut reported = 0;
    for chat in &mut clients {
        let own_node = node_of[chat.name.as_str()];
        let expected = |sender: usize| -> Vec<String> {
            let local = node_of[sender_names[sender]] == own_node;
            let stored = &stored_by[sender_names[sender]];
            sent[sender]
                .iter()
                .filter(|text| local || stored.contains(*text))
                .cloned()
                .collect()
        };
        let wanted: Vec<(usize, String)> = (0..2)
            .filter(|&s| sender_names[s] != chat.name)
            .map(|s| (s, expected(s).last().unwrap().clone()))
            .collect();
        let received = receive(chat, DELIVERY_WITHIN, |got| {
            wanted.iter().all(|(sender, last)| {
                got.from(sender_names[*sender]).last() == Some(last)
                    || got.from(sender_names[*sender]).len() > sent[*sender].len()
            })
        });
        for (sender, _) in &wanted {
            let receiver = format!("{} (on {own_node})", chat.name);
            received.assert_once_in_order(&receiver, sender_names[*sender], &expected(*sender));
        }
        assert!(received.from(&chat.name).is_empty(), "own lines came back");
        received.assert_no_gap(&chat.name);
        // Reports of unsaved lines: only to their sender, saying the line went to no other
        // server, and not about stored ones; unless the database may have stored it after all
        // (no answer), which the report says, and that it may then reach other servers.
        for (content, reason) in received.other.iter().filter_map(|l| not_saved(l)) {
            let mine = stored_by
                .get(chat.name.as_str())
                .unwrap_or_else(|| panic!("{} sent nothing but got: {content}", chat.name));
            reported += 1;
            let unsure = reason.contains("it may still be saved");
            assert!(
                reason.ends_with("; not sent to other servers")
                    || (unsure && reason.ends_with("reach other servers")),
                "{content}: {reason}"
            );
            assert!(
                !mine.contains(content) || unsure,
                "{}: reported not saved but stored: {content} ({reason})",
                chat.name
            );
        }
    }
    // Each node's stream broke with the database and was taken up again.
    for chat in &mut clients[2..] {
        let figures = stats(chat);
        assert!(
            figure(&figures, "stream_resumes") + figure(&figures, "backfills") >= 1,
            "{}: {figures:?}",
            chat.name
        );
        eprintln!("restart: {} {figures:?}", chat.name);
    }
    eprintln!(
        "restart: {} sent, {} stored, {reported} reported not saved",
        sent[0].len() + sent[1].len(),
        stored.len()
    );
}

/// A change stream's history is lost mid-run (the database answers a `getMore` with error 286,
/// ChangeStreamHistoryLost, twice): the node that got it reads what it missed from the
/// collection and opens a new stream; every client still gets every line once, in order.
#[test]
fn a_lost_stream_history_is_backfilled_without_loss_or_repeat() {
    const M: usize = 150;
    let db = TestDb::start_own();
    let nodes: Vec<Node> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| start_node(&db, id))
        .collect();
    let mut senders = [
        Chat::named(nodes[0].addr, "s1"),
        Chat::named(nodes[1].addr, "s2"),
    ];
    let receivers: Vec<Chat> = nodes
        .iter()
        .map(|node| Chat::named(node.addr, &format!("r_{}", node.id)))
        .collect();
    let expected = numbered("m", M);
    let workers: Vec<_> = receivers
        .into_iter()
        .map(|mut chat| {
            thread::spawn(move || {
                let received = receive(&mut chat, DELIVERY_WITHIN, |got| {
                    ["s1", "s2"].iter().all(|s| got.from(s).len() >= M)
                });
                (chat, received)
            })
        })
        .collect();
    for (n, text) in expected.iter().enumerate() {
        // The failing getMore is held for a second while lines keep coming, so the new stream
        // (opened from then) misses some: only the backfill can deliver them.
        if n == M / 3 || n == 2 * M / 3 {
            db.fail_next_after("getMore", 286, 1, 1000);
        }
        for sender in &mut senders {
            sender.send(text);
        }
        thread::sleep(Duration::from_millis(10));
    }
    let mut finished = Vec::new();
    for worker in workers {
        finished.push(worker.join().expect("a receiver's thread failed"));
    }
    for (chat, received) in &finished {
        for sender in ["s1", "s2"] {
            received.assert_once_in_order(&chat.name, sender, &expected);
        }
        received.assert_no_gap(&chat.name);
    }
    // The backfill really delivered what the stream lost (a gap it closed, not an empty one).
    let backfilled = |line: &String| {
        line.split_once("backfill delivered ")
            .and_then(|(_, rest)| rest.split(' ').next()?.parse::<u64>().ok())
            .is_some_and(|count| count > 0)
    };
    assert!(
        nodes
            .iter()
            .any(|node| node.process.log_so_far().iter().any(backfilled)),
        "no node's backfill delivered anything: the test did not make a gap"
    );
    // Some node went through the backfill; none gave up on a gap.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let all: Vec<HashMap<String, String>> =
            finished.iter_mut().map(|(chat, _)| stats(chat)).collect();
        for figures in &all {
            assert_eq!(figure(figures, "missed_gaps"), 0, "{figures:?}");
        }
        let backfills: u64 = all.iter().map(|f| figure(f, "backfills")).sum();
        if backfills >= 1 {
            eprintln!("backfill: {all:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no node counts a backfill: {all:?}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    drop(nodes);
}

/// The server binary run to its exit with `args` (and `--port 0`).
fn run_server(args: &[&str]) -> Output {
    let args: Vec<&str> = ["--port", "0"].iter().chain(args).copied().collect();
    run_with_args(SERVER, &args)
}

/// `--cluster` refuses to start where it cannot work: against a database without change
/// streams (a standalone server: exit 2 naming the replica set), without persistence, with a
/// bad node id or heartbeat (exit 2), or with the database unreachable (exit 1); and the
/// cluster flags are refused without `--cluster` (exit 2).
#[test]
fn cluster_mode_refuses_to_start_where_it_cannot_work() {
    let standalone = TestDb::start_own_standalone();
    let out = run_server(&[
        "--cluster",
        "--mongo-uri",
        &standalone.uri,
        "--mongo-db",
        &standalone.database,
        "--mongo-timeout-ms",
        "3000",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("replica set"), "{stderr}");

    let out = run_server(&["--cluster", "--no-persist"]);
    assert_eq!(out.status.code(), Some(2), "--cluster --no-persist");
    for alone in [["--node-id", "n1"], ["--heartbeat-interval", "2"]] {
        let out = run_server(&[alone[0], alone[1], "--no-persist"]);
        assert_eq!(out.status.code(), Some(2), "{alone:?} without --cluster");
    }
    let nowhere = format!("mongodb://127.0.0.1:{}", free_port());
    for bad in [
        vec!["--node-id", "has space"],
        vec!["--node-id", ""],
        vec!["--node-id", &"x".repeat(33)],
        vec!["--heartbeat-interval", "0.05"],
        vec!["--heartbeat-interval", "soon"],
    ] {
        let mut args = vec!["--cluster", "--mongo-uri", &nowhere];
        args.extend(bad.iter().copied());
        let out = run_server(&args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{bad:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let out = run_server(&[
        "--cluster",
        "--mongo-uri",
        &nowhere,
        "--mongo-timeout-ms",
        "500",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "no database: {stderr}");
    assert!(!stderr.trim().is_empty(), "exit 1 says why");
}

/// A server without `--cluster` on the same database as a cluster node: it opens no stream,
/// stores no node, lists no nodes in `/who`, and its clients hear nothing of the cluster node's
/// (nor the cluster node's of its clients). A cluster node without `--node-id` picks a random
/// 8-hex-digit id.
#[test]
fn without_cluster_nothing_changes() {
    let db = TestDb::start_own();
    let clustered = start_node_with(&db, "");
    assert!(
        clustered.id.len() == 8 && clustered.id.chars().all(|c| c.is_ascii_hexdigit()),
        "a random id of 8 hex digits: {:?}",
        clustered.id
    );
    let (plain, plain_addr) = spawn_server("", &base_flags(&db));
    assert!(
        !plain
            .before_listening
            .iter()
            .any(|line| line.contains("cluster")),
        "{:?}",
        plain.before_listening
    );

    let mut inside = Chat::named(clustered.addr, "inside");
    let mut outside = Chat::named(plain_addr, "outside");
    let mut seen = Vec::new();
    outside.send("/who");
    assert_eq!(
        outside.wait_for(|l| l.contains(" online: ")),
        "* 1 online: outside"
    );
    assert_eq!(
        who(&mut inside, &mut seen),
        [("inside".to_string(), clustered.id.clone())]
    );

    inside.send("from the cluster");
    outside.send("from outside");
    let stored = db.wait_for_stored(2);
    for document in &stored {
        match document.get_str("nick").unwrap() {
            "inside" => assert_eq!(document.get_str("node").ok(), Some(clustered.id.as_str())),
            _ => assert!(document.get("node").is_none(), "{document:?}"),
        }
    }
    let heard = receive(&mut outside, DEADLINE, |_| true);
    assert!(heard.chat.is_empty(), "{heard:?}");
    assert!(
        heard.other.iter().all(|l| !l.contains("inside")),
        "{heard:?}"
    );
    drop(plain);
}

/// A message the database refuses reaches the sender's own node only; the sender is told it was
/// not sent to other servers. The next one, stored, crosses as usual.
#[test]
fn an_unsaved_message_reaches_no_other_node() {
    let db = TestDb::start_own();
    let n1 = start_node(&db, "n1");
    let n2 = start_node(&db, "n2");
    let mut alice = Chat::named(n1.addr, "alice");
    let mut carol = Chat::named(n1.addr, "carol");
    let mut bob = Chat::named(n2.addr, "bob");
    let mut seen = Vec::new();
    who_until(&mut bob, &mut seen, DEADLINE, |e| e.len() == 3);
    carol.sync();

    db.fail_inserts(Some(2));
    alice.send("refused");
    assert_eq!(
        carol.wait_for(|l| l.starts_with('<')),
        "<alice> refused",
        "local clients get it as on one node"
    );
    let report = alice.wait_for(|l| l.starts_with("! "));
    let (content, reason) =
        not_saved(&report).unwrap_or_else(|| panic!("a not-saved report: {report:?}"));
    assert_eq!(content, "refused");
    assert!(reason.ends_with("; not sent to other servers"), "{report}");
    db.fail_inserts(None);

    alice.send("stored");
    assert_eq!(
        bob.wait_for(|l| l.starts_with('<')),
        "<alice> stored",
        "the refused line must not reach n2"
    );
    let contents: Vec<String> = db
        .stored()
        .iter()
        .map(|d| d.get_str("content").unwrap().to_string())
        .collect();
    assert_eq!(contents, ["stored"]);

    alice.send("/me waves");
    assert_eq!(
        bob.wait_for(|l| l.starts_with("* alice")),
        "* alice waves",
        "a remote action reads as a local one"
    );
    drop((n1, n2));
}

/// A backfill after a busy minute: more than 10 000 messages from another node arrived within
/// the last 60 s (about 170 a second), all delivered. Then the stream's history is lost while
/// one more message is stored (the failing `getMore` hangs 2 s first, so the message is in no
/// stream): the backfill must find it, and say nothing of a gap.
#[test]
fn a_backfill_after_a_busy_minute_still_finds_the_missed_message() {
    let bulk = 10_050;
    let db = TestDb::start_own();
    let node = start_node(&db, "n1");
    let mut reader = Chat::named(node.addr, "reader");
    let messages = db.messages();
    let document = |content: String| {
        doc! {
            "_id": bson::oid::ObjectId::new(), "content": content, "ip": "127.0.0.1", "port": 1,
            "nick": "elsewhere", "node": "n9", "timestamp": bson::DateTime::now(),
        }
    };
    messages
        .insert_many((0..bulk).map(|n| document(format!("b {n}"))))
        .run()
        .expect("store the busy minute");
    let got = receive(&mut reader, DELIVERY_WITHIN, |got| {
        got.from("elsewhere").len() >= bulk
    });
    assert_eq!(got.from("elsewhere").len(), bulk);

    db.client()
        .database("admin")
        .run_command(doc! {
            "configureFailPoint": "failCommand", "mode": { "times": 1 },
            "data": {
                "failCommands": ["getMore"], "errorCode": 286,
                "blockConnection": true, "blockTimeMS": 2000,
            },
        })
        .run()
        .unwrap();
    // The `getMore` in flight (it waits up to 0.5 s for events) ends first; the next one hangs.
    thread::sleep(Duration::from_millis(800));
    messages
        .insert_one(document("in the gap".to_string()))
        .run()
        .unwrap();
    let got = receive(&mut reader, DEADLINE, |got| {
        got.from("elsewhere").len() == 1 || got.other.iter().any(|l| l == MISSED)
    });
    let figures = stats(&mut reader);
    assert_eq!(figure(&figures, "backfills"), 1, "{figures:?}");
    assert_eq!(got.from("elsewhere"), ["in the gap"], "{:?}", got.other);
    assert!(!got.other.iter().any(|l| l == MISSED), "{:?}", got.other);
}

/// A killed node started again under its id drops its earlier users at once (not after their
/// expiry): they leave `/who` elsewhere, are announced as gone, and their nicks are free.
#[test]
fn a_node_restarted_under_its_id_replaces_its_old_users() {
    let db = TestDb::start_own();
    let n1 = start_node(&db, "n1");
    let mut n2 = start_node(&db, "n2");
    let mut watcher = Chat::named(n1.addr, "watcher");
    let _victims = [Chat::named(n2.addr, "v1"), Chat::named(n2.addr, "v2")];
    let mut seen = Vec::new();
    who_until(&mut watcher, &mut seen, DEADLINE, |e| e.len() == 3);
    n2.process.signal("-KILL");
    n2.process.wait_exit();

    let again = start_node(&db, "n2");
    let mut back = Chat::connect(again.addr);
    let renamed = format!("* {} is now v1", back.name);
    back.send("/nick v1");
    assert_eq!(
        back.wait_for(|l| l.starts_with("! ") || l == renamed),
        renamed,
        "the old v1 left with its node's restart"
    );
    let v1_again = ("v1".to_string(), "n2".to_string());
    let entries = who_until(&mut watcher, &mut seen, DEADLINE, |e| {
        e.len() == 2 && e.contains(&v1_again)
    });
    assert_eq!(entries[0], ("watcher".to_string(), "n1".to_string()));
    seen.extend(receive(&mut watcher, DEADLINE, |_| true).other);
    let left: Vec<String> = seen
        .iter()
        .filter_map(|l| presence_names(l, "left"))
        .flatten()
        .collect();
    assert!(
        left.contains(&"v1".to_string()) && left.contains(&"v2".to_string()),
        "{seen:?}"
    );
    // In the order they joined: the watcher before the new v1.
    assert_eq!(
        who(&mut back, &mut seen),
        [("watcher".to_string(), "n1".to_string()), v1_again]
    );
}
