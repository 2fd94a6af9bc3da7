//! Persistence against a real MongoDB-wire server (SecantusDB, or `PEERCHAT_TEST_MONGO_URI`),
//! through the real driver: what is stored, and what happens when the database fails.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bson::oid::ObjectId;
use common::proxy::Proxy;
use common::{alice_and_bob, start_server, Chat, TestDb};
use peerchat::persist::ClientRef;
use peerchat::persist::{Record, Store};
use peerchat::ServerConfig;
use time::OffsetDateTime;

#[test]
fn each_message_is_stored_once_with_its_metadata() {
    let db = TestDb::start();
    let server = start_server(ServerConfig::local(Some(db.store_config())));
    let mut alice = Chat::named(server.addr, "alice");
    let mut anon = Chat::connect(server.addr);
    alice.sync();
    let started = OffsetDateTime::now_utc();

    for n in 0..20 {
        alice.send(&format!("alice says {n}"));
    }
    anon.send("anonymous words");
    anon.send("/who"); // commands are not stored
    anon.sync();

    db.wait_for_stored(21);
    // Stopping the server waits for its persistence thread to finish: whatever it would ever
    // store (a duplicate included) is stored by then.
    server.stop().unwrap();
    let stored = db.stored();
    assert_eq!(stored.len(), 21, "each message stored exactly once");
    let ids: HashSet<ObjectId> = stored
        .iter()
        .map(|d| d.get_object_id("_id").unwrap())
        .collect();
    assert_eq!(ids.len(), 21);

    let alice_port = i32::from(alice.local_addr().port());
    let alice_docs: Vec<_> = stored
        .iter()
        .filter(|d| d.get_str("nick").ok() == Some("alice"))
        .collect();
    assert_eq!(alice_docs.len(), 20);
    for (n, doc) in alice_docs.iter().enumerate() {
        assert_eq!(doc.get_str("content").unwrap(), format!("alice says {n}"));
        assert_eq!(doc.get_str("ip").unwrap(), "127.0.0.1");
        assert_eq!(doc.get_i32("port").unwrap(), alice_port);
        let millis = doc.get_datetime("timestamp").unwrap().timestamp_millis();
        let started_ms = (started.unix_timestamp_nanos() / 1_000_000) as i64;
        let now_ms = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        assert!(
            (started_ms..=now_ms).contains(&millis),
            "timestamp {millis} outside the test's run {started_ms}..={now_ms}"
        );
    }
    let anon_doc = stored
        .iter()
        .find(|d| d.get_str("content").ok() == Some("anonymous words"))
        .expect("anonymous message stored");
    assert_eq!(anon_doc.get_str("nick").unwrap(), anon.name);
    assert_eq!(
        anon_doc.get_i32("port").unwrap(),
        i32::from(anon.local_addr().port())
    );
}

/// The stored content is the same sanitised text the other clients saw.
#[test]
fn the_stored_content_is_the_sanitised_text() {
    let db = TestDb::start();
    let server = start_server(ServerConfig::local(Some(db.store_config())));
    let (mut alice, mut bob) = alice_and_bob(server.addr);
    alice.send_bytes(b"\x1b[31mred\x1b[0m\x07 \xff text\n");
    assert_eq!(bob.line(), "<alice> red \u{fffd} text");
    let stored = db.wait_for_stored(1);
    assert_eq!(stored[0].get_str("content").unwrap(), "red \u{fffd} text");
}

#[test]
fn a_timestamp_index_is_created_at_start() {
    let db = TestDb::start();
    let server = start_server(ServerConfig::local(Some(db.store_config())));
    let deadline = Instant::now() + common::DEADLINE;
    loop {
        let names = db.messages().list_index_names().run().unwrap_or_default();
        if names.iter().any(|name| name.starts_with("timestamp")) {
            break;
        }
        assert!(Instant::now() < deadline, "no timestamp index: {names:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(server);
}

/// Uses its own database: a failpoint is server-wide and would break other tests sharing an
/// external server.
#[test]
fn a_refused_insert_is_reported_to_the_sender_only() {
    let db = TestDb::start_own();
    let server = start_server(ServerConfig::local(Some(db.store_config())));
    let (mut alice, mut bob) = alice_and_bob(server.addr);
    db.fail_inserts(Some(2));

    let long = "this message is refused by the database and it is rather long";
    alice.send(long);
    assert_eq!(bob.line(), format!("<alice> {long}"));
    let report = alice.line();
    assert_eq!(
        report,
        "! not saved: \"this message is refused by the database \u{2026}\" (database error 2 BadValue)"
    );
    assert!(bob.sync().is_empty(), "the error went to someone else");

    db.fail_inserts(None);
    alice.send("this one is stored");
    let stored = db.wait_for_stored(1);
    let contents: Vec<&str> = stored
        .iter()
        .map(|d| d.get_str("content").unwrap())
        .collect();
    assert_eq!(contents, vec!["this one is stored"]);
    assert!(alice.sync().is_empty(), "no error for a stored message");
}

/// The sender leaves before its failure comes back, and a newcomer takes its connection slot:
/// the report must not reach the newcomer.
#[test]
fn a_failure_report_never_reaches_a_later_client_in_the_same_slot() {
    let db = TestDb::reserve_own(); // unreachable: each batch fails only after the timeout
    let server = start_server(ServerConfig::local(Some(db.store_config())));
    let mut witness = Chat::named(server.addr, "witness");
    let mut leaver = Chat::named(server.addr, "leaver");
    witness.sync();
    leaver.send("doomed message");
    assert_eq!(witness.line(), "<leaver> doomed message");
    leaver.send("/quit");
    leaver.read_to_end();
    assert_eq!(witness.line(), "* leaver left");
    let mut newcomer = Chat::connect(server.addr); // takes the leaver's free slot
    witness.sync();
    // The witness's message is queued after the leaver's, so once its failure is back, the
    // leaver's has been handled too.
    witness.send("witness message");
    let report = witness.wait_for(|line| line.starts_with("! not saved"));
    assert!(report.contains("witness message"), "{report}");
    let lines = newcomer.sync();
    assert!(
        lines.iter().all(|line| !line.starts_with("! not saved")),
        "a report reached the wrong client: {lines:?}"
    );
}

#[test]
fn chat_goes_on_while_the_database_is_down_and_saving_resumes_after() {
    let mut db = TestDb::start_own();
    let server = start_server(ServerConfig::local(Some(db.store_config())));
    let (mut alice, mut bob) = alice_and_bob(server.addr);
    alice.send("before the outage");
    assert_eq!(bob.line(), "<alice> before the outage");
    db.wait_for_stored(1);

    db.kill();
    let sent_at = Instant::now();
    alice.send("during the outage");
    assert_eq!(bob.line(), "<alice> during the outage");
    bob.send("bob can still talk");
    assert_eq!(alice.line(), "<bob> bob can still talk");
    let alice_error = alice.wait_for(|line| line.starts_with("! not saved"));
    assert!(
        alice_error.starts_with("! not saved: \"during the outage\" (database"),
        "{alice_error}"
    );
    let bob_error = bob.wait_for(|line| line.starts_with("! not saved"));
    assert!(
        bob_error.starts_with("! not saved: \"bob can still talk\""),
        "{bob_error}"
    );
    assert!(
        sent_at.elapsed() < Duration::from_secs(10),
        "failures must be timely"
    );

    db.restart(); // an empty in-memory database on the same port
    send_until_one_is_stored(
        &mut alice,
        &db,
        "after the outage",
        "saving did not resume after the database returned",
    );
}

/// The driver cannot time out a call on an open connection to a server that never answers;
/// the persistence thread's watchdog must still report the message, and saving must resume
/// when the database wakes up.
#[test]
fn a_hung_database_is_reported_and_saving_resumes_when_it_answers_again() {
    let db = TestDb::start_own();
    let server = start_server(ServerConfig::local(Some(db.store_config())));
    let (mut alice, mut bob) = alice_and_bob(server.addr);
    alice.send("while it answers");
    db.wait_for_stored(1);

    db.freeze();
    let frozen_at = Instant::now();
    alice.send("while it hangs");
    assert_eq!(bob.line(), "<alice> while it answers");
    assert_eq!(bob.line(), "<alice> while it hangs");
    let report = alice.wait_for(|line| line.starts_with("! not saved"));
    assert!(
        report.starts_with("! not saved: \"while it hangs\" (database"),
        "{report}"
    );
    // The promise is a report within 3 x --mongo-timeout-ms (1 s here), not whenever the
    // driver's 10 s heartbeat notices; the bound leaves seconds of slack for a slow machine.
    let waited = frozen_at.elapsed();
    assert!(
        waited < Duration::from_secs(7),
        "reported only after {waited:?}"
    );
    bob.send("chat still flows");
    assert_eq!(alice.line(), "<bob> chat still flows");

    db.thaw();
    send_until_one_is_stored(
        &mut alice,
        &db,
        "awake",
        "saving did not resume after the database woke up",
    );
    drop(db); // kill before the server's shutdown waits on it
}

/// The connection carrying an insert goes silent without closing (a dead host that sends no
/// reset, a dropped route), while the driver's monitor connection keeps working, so the driver
/// never gives up on the insert by itself. The watchdog reports the message, leaves that client
/// behind, and saves with a new client as soon as new connections are answered, although the
/// old connection is still hung.
#[test]
fn a_hung_connection_is_left_behind_and_saving_resumes_with_a_new_client() {
    let db = TestDb::start_own();
    let upstream = db.uri.strip_prefix("mongodb://").unwrap().parse().unwrap();
    let proxy = Proxy::start(upstream);
    let mut store = db.store_config();
    // Direct: SecantusDB is a one-member replica set, and the driver would otherwise go around
    // the proxy to the member's own address.
    store.uri = format!("mongodb://{}/?directConnection=true", proxy.addr);
    let server = start_server(ServerConfig::local(Some(store)));
    let (mut alice, mut bob) = alice_and_bob(server.addr);
    alice.send("before the silence");
    db.wait_for_stored(1);

    proxy.blackhole_inserts();
    alice.send("into the silence");
    assert_eq!(bob.line(), "<alice> before the silence");
    assert_eq!(bob.line(), "<alice> into the silence");
    let report = alice.wait_for(|line| line.starts_with("! not saved"));
    assert_eq!(
        report,
        "! not saved: \"into the silence\" (database not responding; it may still be saved)"
    );

    proxy.heal();
    send_until_one_is_stored(
        &mut alice,
        &db,
        "healed",
        "saving did not resume on new connections",
    );
    assert!(
        proxy.hung_connections() >= 1,
        "the hung connection must still be open: the driver did not unstick itself"
    );
    let contents: Vec<String> = db
        .stored()
        .iter()
        .map(|d| d.get_str("content").unwrap().to_string())
        .collect();
    assert_eq!(contents[0], "before the silence");
    assert!(!contents.contains(&"into the silence".to_string()));
}

/// Long lines fill the save queue's byte bound long before its count bound. While the database
/// is slow, the lines past the bound are refused at once, and each message is still stored or
/// reported exactly once.
#[test]
fn long_lines_past_the_queue_byte_bound_are_refused_at_once() {
    const LINES: usize = 6;
    let db = TestDb::start_own();
    let mut store = db.store_config();
    store.queue_bytes = 3000; // two of the lines below; the count bound (10 000) is far away
    let server = start_server(ServerConfig::local(Some(store)));
    let (mut alice, mut bob) = alice_and_bob(server.addr);
    db.slow_inserts(Some(2000));
    let lines: Vec<String> = (0..LINES)
        .map(|n| format!("line {n} {}", "x".repeat(1000)))
        .collect();
    // One write: the server takes all of them in one turn, while the first insert is slow.
    alice.send_bytes(format!("{}\n", lines.join("\n")).as_bytes());
    for line in &lines {
        assert_eq!(bob.line(), format!("<alice> {line}"));
    }
    let mut reported = Vec::new();
    reported.push(alice.wait_for(|line| line.starts_with("! not saved")));
    assert!(
        reported[0].ends_with("(server busy: save queue full)"),
        "{reported:?}"
    );

    let deadline = Instant::now() + 2 * common::DEADLINE;
    loop {
        while let Some(line) = alice.try_line(Duration::from_millis(200)) {
            reported.push(line);
        }
        let stored = db.stored();
        let settled = (0..LINES).all(|n| {
            let prefix = format!("line {n} ");
            let stored = stored
                .iter()
                .filter(|d| d.get_str("content").unwrap().starts_with(&prefix))
                .count();
            let quoted = format!("\"line {n} ");
            let reports = reported.iter().filter(|l| l.contains(&quoted)).count();
            assert!(
                stored + reports <= 1,
                "line {n}: stored {stored}, reported {reports}"
            );
            stored + reports == 1
        });
        if settled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every line stored or reported: {reported:?}"
        );
    }
    assert!(
        reported
            .iter()
            .all(|l| l.ends_with("(server busy: save queue full)")),
        "{reported:?}"
    );
    db.slow_inserts(None);
}

/// Inserts that take 1.5 s each (under the 3 s a batch is given) slow saving down, never the
/// chat, and nothing is reported lost.
#[test]
fn a_slow_database_delays_saving_but_never_the_chat() {
    let db = TestDb::start_own();
    let server = start_server(ServerConfig::local(Some(db.store_config())));
    let (mut alice, mut bob) = alice_and_bob(server.addr);
    db.slow_inserts(Some(1500));
    for n in 0..10 {
        alice.send(&format!("slowly stored {n}"));
        assert_eq!(bob.line(), format!("<alice> slowly stored {n}"));
        bob.send(&format!("answer {n}"));
        assert_eq!(alice.line(), format!("<bob> answer {n}"));
    }
    let stored = db.wait_for_stored(20);
    assert_eq!(stored.len(), 20, "ten messages each from alice and bob");
    db.slow_inserts(None);
    assert!(
        alice.sync().is_empty(),
        "a slow database is no failure: nothing may be reported"
    );
}

/// The database is killed with messages in flight and restarted on the same port with its data.
/// Every message must end up stored exactly once or reported to its sender; no third outcome.
#[test]
fn killed_mid_run_every_message_is_stored_once_or_reported() {
    const TOTAL: usize = 300;
    let mut db = TestDb::start_own_on_disk();
    let mut config = ServerConfig::local(Some(db.store_config()));
    config.limits.flood = None;
    let server = start_server(config);
    let (mut alice, mut bob) = alice_and_bob(server.addr);
    for n in 0..TOTAL {
        match n {
            100 => {
                // The first 90 are acknowledged before the crash: they must survive it.
                db.wait_for_stored(90);
                db.kill();
            }
            200 => db.restart(),
            _ => {}
        }
        alice.send(&format!("m{n}"));
        // Down for 3 s, well past the 1 s timeout, so the outage costs messages for sure.
        let outage = (100..200).contains(&n);
        std::thread::sleep(Duration::from_millis(if outage { 30 } else { 10 }));
    }
    assert_eq!(bob.wait_for(|l| l == "<alice> m299"), "<alice> m299");

    let mut reported = HashSet::new();
    let deadline = Instant::now() + 2 * common::DEADLINE;
    let stored_counts = loop {
        while let Some(line) = alice.try_line(Duration::from_millis(200)) {
            let quoted = line.strip_prefix("! not saved: \"").expect("only reports");
            let (content, _) = quoted.split_once('"').unwrap();
            assert!(
                reported.insert(content.to_string()),
                "reported twice: {line}"
            );
        }
        let mut counts: HashMap<String, usize> = HashMap::new();
        for doc in db.stored() {
            *counts
                .entry(doc.get_str("content").unwrap().to_string())
                .or_default() += 1;
        }
        let unsettled: Vec<String> = (0..TOTAL)
            .map(|n| format!("m{n}"))
            .filter(|m| !counts.contains_key(m) && !reported.contains(m))
            .collect();
        if unsettled.is_empty() {
            break counts;
        }
        assert!(
            Instant::now() < deadline,
            "neither stored nor reported: {unsettled:?}"
        );
    };
    let twice: Vec<_> = stored_counts.iter().filter(|(_, &c)| c > 1).collect();
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
    assert!(
        !reported.is_empty(),
        "the outage must have cost some messages"
    );
    assert!(
        (0..90).all(|n| stored_counts.contains_key(&format!("m{n}"))),
        "what was stored before the crash survives it"
    );
    eprintln!(
        "kill mid-run: {} stored once, {} reported not saved",
        stored_counts.len(),
        reported.len()
    );
}

#[test]
fn the_server_starts_without_a_database_and_saves_once_it_appears() {
    let mut db = TestDb::reserve_own();
    let server = start_server(ServerConfig::local(Some(db.store_config())));
    let (mut alice, mut bob) = alice_and_bob(server.addr);
    alice.send("nobody stores this");
    assert_eq!(bob.line(), "<alice> nobody stores this");
    let error = alice.wait_for(|line| line.starts_with("! not saved"));
    assert!(error.contains("(database unreachable)"), "{error}");

    db.restart();
    send_until_one_is_stored(
        &mut alice,
        &db,
        "stored at last",
        "saving did not start when the database appeared",
    );
}

#[test]
fn a_full_queue_fails_messages_at_once_and_each_gets_one_report() {
    let db = TestDb::reserve_own(); // nothing listening: every batch waits for the timeout
    let mut store = db.store_config();
    store.queue_capacity = 1;
    let server = start_server(ServerConfig::local(Some(store)));
    let (mut alice, mut bob) = alice_and_bob(server.addr);
    for n in 0..4 {
        alice.send(&format!("queued {n}"));
    }
    for n in 0..4 {
        assert_eq!(bob.line(), format!("<alice> queued {n}"));
    }
    let mut reports = Vec::new();
    while reports.len() < 4 {
        reports.push(alice.wait_for(|line| line.starts_with("! not saved")));
    }
    assert!(
        reports.iter().any(|line| line.contains("save queue full")),
        "{reports:?}"
    );
    for n in 0..4 {
        let quoted = format!("\"queued {n}\"");
        let count = reports.iter().filter(|line| line.contains(&quoted)).count();
        assert_eq!(count, 1, "message {n} reported {count} times: {reports:?}");
    }
    // A stopping server delivers every report still to come before it closes: after its close,
    // nothing more can be reported.
    server.handle.shutdown();
    let rest = alice.read_to_end();
    assert_eq!(rest, ["* server shutting down"], "a report came twice");
}

/// A batch sent again after its first attempt stored part of it: the duplicates count as
/// saved, and nothing is stored twice.
#[test]
fn resending_a_batch_stores_nothing_twice() {
    let db = TestDb::start();
    let mut store = Store::new(db.store_config());
    let records: Vec<_> = (0..10).map(record).collect();
    // The store uses the async driver, on a runtime of the caller's, as the server's worker does.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (first, again) = runtime.block_on(async {
        let first = store.save(&records[..4]).await;
        (first, store.save(&records).await)
    });
    assert!(first.is_empty(), "first part stored: {first:?}");
    assert!(
        again.is_empty(),
        "duplicates must count as saved: {again:?}"
    );
    let stored = db.stored();
    assert_eq!(stored.len(), 10);
}

fn record(n: usize) -> Record {
    Record::new(
        ClientRef { slot: 0, id: 1 },
        "tester",
        "127.0.0.1:4000".parse().unwrap(),
        &format!("message {n}"),
        bson::DateTime::now(),
    )
}

/// Sends `PREFIX 0`, `PREFIX 1`, … every 300 ms until one of them is stored, failing with
/// `failure` after 30 s: while saving has not resumed each message is reported instead, so a
/// new one is needed until one gets through.
fn send_until_one_is_stored(sender: &mut Chat, db: &TestDb, prefix: &str, failure: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in 0.. {
        let stored = db.stored();
        if stored.iter().any(|doc| {
            doc.get_str("content")
                .is_ok_and(|text| text.starts_with(prefix))
        }) {
            return;
        }
        assert!(Instant::now() < deadline, "{failure}");
        sender.send(&format!("{prefix} {n}"));
        std::thread::sleep(Duration::from_millis(300));
    }
}
