//! Chat history read back from a real MongoDB-wire server: on join, with `/history N`, `/me`
//! actions, and the answers when history cannot be read.

mod common;

use std::net::SocketAddr;
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use common::{start_server, Chat, TestDb, DEADLINE};
use peerchat::ServerConfig;

/// A server on `db` without flood control (tests send faster than people).
fn server_config(db: &TestDb) -> ServerConfig {
    let mut config = ServerConfig::local(Some(db.store_config()));
    config.limits.flood = None;
    config
}

/// The `<nick> text` (or `* nick text`) part of a history line, checking its time stamp.
fn history_body(line: &str) -> &str {
    let rest = line
        .strip_prefix("* [")
        .unwrap_or_else(|| panic!("not a history line: {line:?}"));
    let (stamp, body) = rest.split_once("] ").expect("time stamp in brackets");
    // 2026-11-24T14:03:05Z: UTC, whole seconds.
    assert_eq!(stamp.len(), 20, "{stamp:?}");
    assert!(
        time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339).is_ok(),
        "{stamp:?}"
    );
    assert!(stamp.ends_with('Z') && !stamp.contains('.'), "{stamp:?}");
    body
}

/// Reads a history block up to its end line; returns the bodies and the count the end line gave.
fn read_history(chat: &mut Chat) -> (Vec<String>, usize) {
    let mut bodies = Vec::new();
    loop {
        let line = chat.line();
        if let Some(count) = line
            .strip_prefix("* end of history (")
            .and_then(|rest| rest.split(' ').next())
        {
            return (bodies, count.parse().expect("a count"));
        }
        if line.starts_with("* [") {
            bodies.push(history_body(&line).to_string());
        } else {
            assert!(
                line.ends_with(" joined") || line.ends_with(" left"),
                "only presence notices may come between history lines: {line:?}"
            );
        }
    }
}

/// Sends `texts` from a fresh client called `nick` and waits until all are stored.
fn say(addr: SocketAddr, db: &TestDb, nick: &str, texts: &[String]) -> Chat {
    let before = db.stored().len();
    let mut chat = Chat::named(addr, nick);
    for text in texts {
        chat.send(text);
    }
    db.wait_for_stored(before + texts.len());
    chat
}

fn numbered(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|n| format!("{prefix} {n}")).collect()
}

#[test]
fn a_joiner_gets_the_last_20_messages_oldest_first_then_live_chat() {
    let db = TestDb::start();
    let server = start_server(server_config(&db));
    let mut alice = say(server.addr, &db, "alice", &numbered("m", 0..25));

    let mut bob = Chat::connect(server.addr);
    let (bodies, count) = read_history(&mut bob);
    assert_eq!(count, 20);
    let expected: Vec<String> = (5..25).map(|n| format!("<alice> m {n}")).collect();
    assert_eq!(bodies, expected);

    alice.send("live");
    assert_eq!(bob.wait_for(|line| line.starts_with('<')), "<alice> live");
}

/// Messages stored long ago (two months before, by an earlier server) are found: the server
/// looks further and further back for them.
#[test]
fn old_messages_are_found_after_a_restart() {
    let db = TestDb::start();
    let day = 24 * 60 * 60 * 1000;
    let long_ago = bson::DateTime::now().timestamp_millis() - 60 * day;
    let old: Vec<bson::Document> = (0..30)
        .map(|n| {
            bson::doc! {
                "content": format!("old {n}"), "ip": "127.0.0.1", "port": 1, "nick": "ann",
                "timestamp": bson::DateTime::from_millis(long_ago + n * 1000),
            }
        })
        .collect();
    db.messages()
        .insert_many(old)
        .run()
        .expect("store old messages");
    let server = start_server(server_config(&db));
    let mut bob = Chat::connect(server.addr);
    let (bodies, count) = read_history(&mut bob);
    assert_eq!(count, 20);
    let expected: Vec<String> = (10..30).map(|n| format!("<ann> old {n}")).collect();
    assert_eq!(bodies, expected);
}

#[test]
fn an_empty_history_sends_nothing_on_join_and_says_so_on_demand() {
    let db = TestDb::start();
    let server = start_server(server_config(&db));
    let mut bob = Chat::connect(server.addr);
    assert_eq!(bob.sync(), Vec::<String>::new(), "no history lines at all");
    bob.send("/history");
    assert_eq!(bob.line(), "* end of history (0 messages)");
}

#[test]
fn history_on_join_can_be_turned_off_or_resized() {
    let db = TestDb::start();
    let mut config = server_config(&db);
    config.history_on_join = 0;
    let server = start_server(config);
    let _alice = say(server.addr, &db, "alice", &numbered("m", 0..3));
    let mut bob = Chat::connect(server.addr);
    assert!(
        bob.sync().iter().all(|line| !line.starts_with("* [")),
        "no history with --history-on-join 0"
    );
    server.stop().unwrap();

    let mut config = server_config(&db);
    config.history_on_join = 2;
    let server = start_server(config);
    let mut carol = Chat::connect(server.addr);
    let (bodies, count) = read_history(&mut carol);
    assert_eq!(
        (bodies, count),
        (
            vec!["<alice> m 1".to_string(), "<alice> m 2".to_string()],
            2
        )
    );
}

#[test]
fn history_command_counts_limits_and_usage() {
    let db = TestDb::start();
    let mut config = server_config(&db);
    config.history_max = 7;
    config.history_on_join = 0;
    let server = start_server(config);
    let mut alice = say(server.addr, &db, "alice", &numbered("m", 0..10));

    alice.send("/history 3");
    let (bodies, count) = read_history(&mut alice);
    assert_eq!(count, 3);
    assert_eq!(bodies, ["<alice> m 7", "<alice> m 8", "<alice> m 9"]);

    alice.send("/history 1");
    assert_eq!(
        read_history(&mut alice),
        (vec!["<alice> m 9".to_string()], 1)
    );
    alice.send("/history 1000");
    let (bodies, count) = read_history(&mut alice);
    assert_eq!(count, 7, "at most --history-max");
    assert_eq!(bodies.first().map(String::as_str), Some("<alice> m 3"));

    alice.send("/history");
    assert_eq!(read_history(&mut alice).1, 7, "the default 20, capped");

    for bad in ["/history 0", "/history x", "/history -1", "/history 2 3"] {
        alice.send(bad);
        assert_eq!(alice.line(), "! usage: /history [N]", "{bad}");
    }
}

#[test]
fn the_end_line_says_one_message() {
    let db = TestDb::start();
    let server = start_server(server_config(&db));
    let mut alice = say(server.addr, &db, "alice", &numbered("only", 0..1));
    alice.send("/history 5");
    assert_eq!(alice.line().split_once("] ").unwrap().1, "<alice> only 0");
    assert_eq!(alice.line(), "* end of history (1 message)");
}

#[test]
fn me_is_broadcast_stored_as_an_action_and_replayed() {
    let db = TestDb::start();
    let server = start_server(server_config(&db));
    let mut alice = Chat::named(server.addr, "alice");
    let mut bob = Chat::named(server.addr, "bob");
    alice.sync();
    alice.send("/me waves");
    alice.send("plain words");
    assert_eq!(bob.line(), "* alice waves");
    assert_eq!(bob.line(), "<alice> plain words");
    alice.send("/me");
    assert_eq!(alice.line(), "! usage: /me ACTION");

    let stored = db.wait_for_stored(2);
    assert_eq!(stored[0].get_str("content").unwrap(), "waves");
    assert_eq!(stored[0].get_str("kind").unwrap(), "action");
    assert!(
        stored[1].get("kind").is_none(),
        "plain messages have no kind"
    );

    let mut carol = Chat::connect(server.addr);
    let (bodies, _) = read_history(&mut carol);
    assert_eq!(bodies, ["* alice waves", "<alice> plain words"]);
}

/// A sender floods numbered lines while a client joins, with inserts slowed so that messages
/// accepted just before the join are still being stored: its history and its live stream
/// together hold every message exactly once, in order.
#[test]
fn history_and_live_stream_meet_exactly_during_traffic() {
    let db = TestDb::start();
    let mut config = server_config(&db);
    config.history_on_join = 500;
    config.history_max = 500;
    let server = start_server(config);
    db.slow_inserts(Some(30));
    let addr = server.addr;

    // The sender sends in rounds of 80 lines; a client joins between rounds, while the
    // inserts of the last lines are still in flight and the next round is already coming.
    let (round_sent, next_round) = (mpsc::channel(), mpsc::channel::<()>());
    let (round_sent_tx, round_sent_rx) = round_sent;
    let (next_round_tx, next_round_rx) = next_round;
    let sender = thread::spawn(move || {
        let mut alice = Chat::named(addr, "alice");
        for round in 0..5 {
            for n in round * 80..(round + 1) * 80 {
                alice.send(&format!("n {n}"));
            }
            if round < 4 {
                round_sent_tx.send(()).unwrap();
                next_round_rx
                    .recv_timeout(DEADLINE)
                    .expect("a client joined");
            }
        }
        alice.sync();
        alice
    });
    let joiners: Vec<Chat> = (0..4)
        .map(|_| {
            round_sent_rx.recv_timeout(DEADLINE).expect("a round sent");
            let joiner = Chat::connect(addr);
            next_round_tx.send(()).unwrap();
            joiner
        })
        .collect();
    let _alice = sender.join().unwrap();

    let mut joined_mid_flood = 0;
    for mut joiner in joiners {
        // History lines up to the end line, then live lines; a client that joined before the
        // first message gets no history lines at all.
        let mut seen = Vec::new();
        let mut count = None;
        let mut live = 0;
        while seen.last() != Some(&399) {
            let line = joiner.line();
            if let Some(end) = line.strip_prefix("* end of history (") {
                assert_eq!(
                    (count, live),
                    (None, 0),
                    "one history block, before live chat"
                );
                let stated: usize = end.split(' ').next().unwrap().parse().unwrap();
                assert_eq!(stated, seen.len(), "the end line counts the lines");
                count = Some(stated);
            } else if line.starts_with("* [") {
                assert_eq!((count, live), (None, 0), "history lines come first");
                seen.push(number_in(history_body(&line)));
            } else if line.starts_with('<') {
                assert!(
                    count.is_some() || seen.len() == live,
                    "live chat before the end of history: {line:?}"
                );
                live += 1;
                seen.push(number_in(&line));
            }
        }
        if count.is_some_and(|count| count > 0 && count < seen.len()) {
            joined_mid_flood += 1;
        }
        let first = seen[0];
        assert!(
            first == 0 || count == Some(500),
            "history starts at the first message unless it is capped: {first}"
        );
        let expected: Vec<usize> = (first..400).collect();
        assert_eq!(
            seen, expected,
            "history then live: each message once, in order"
        );
    }
    assert!(joined_mid_flood > 0, "no client joined during the flood");
    db.slow_inserts(None);
}

fn number_in(line: &str) -> usize {
    line.strip_prefix("<alice> n ")
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
        .parse()
        .unwrap()
}

#[test]
fn without_persistence_history_is_unavailable() {
    let server = common::start_chat_only();
    let mut bob = Chat::connect(server.addr);
    assert_eq!(bob.sync(), Vec::<String>::new(), "no history on join");
    bob.send("/history");
    assert_eq!(bob.line(), "! history unavailable: persistence is off");
}

/// With the database gone, `/history` answers with the reason within 3 × the timeout, and a
/// joiner still gets its welcome and live chat; joiners that leave before their answer cost
/// nothing.
#[test]
fn with_the_database_down_history_fails_and_chat_goes_on() {
    let mut db = TestDb::start_own();
    let config = server_config(&db);
    let timeout = config.store.as_ref().unwrap().timeout;
    let server = start_server(config);
    let mut alice = Chat::named(server.addr, "alice");
    db.kill();

    let asked = Instant::now();
    alice.send("/history 5");
    let answer = alice.wait_for(|line| line.starts_with("! history"));
    assert!(
        answer.starts_with("! history unavailable: database "),
        "{answer:?}"
    );
    let took = asked.elapsed();
    assert!(
        took < timeout * 3,
        "answered after {took:?}, over 3 × {timeout:?}"
    );

    for _ in 0..5 {
        drop(Chat::connect(server.addr)); // gone before any answer
    }
    let mut bob = Chat::connect(server.addr);
    alice.send("still here");
    let live = bob.wait_for(|line| line.starts_with('<'));
    assert_eq!(live, "<alice> still here");
    server.stop().expect("the server stops cleanly");
}

/// The answer to `/history` waits; the asker's live chat does not wait for it.
#[test]
fn a_slow_history_answer_holds_up_no_live_chat() {
    let db = TestDb::start_own();
    let mut config = server_config(&db);
    config.history_on_join = 0;
    let server = start_server(config);
    let mut alice = Chat::named(server.addr, "alice");
    let mut bob = Chat::named(server.addr, "bob");
    alice.sync();
    db.freeze();
    alice.send("/history");
    bob.send("while you wait");
    assert_eq!(alice.line(), "<bob> while you wait", "live chat first");
    let answer = alice.line();
    db.thaw();
    assert!(
        answer.starts_with("! history unavailable: "),
        "then the answer: {answer:?}"
    );
}

/// `/quit` or the end of input right after `/history` (as from a pipe: `printf '/history 2\n/quit\n'`)
/// still gets the answer, before the goodbye and the close.
#[test]
fn a_quit_or_end_of_input_right_after_history_waits_for_the_answer() {
    let db = TestDb::start();
    let mut config = server_config(&db);
    config.history_on_join = 0;
    let server = start_server(config);
    let _alice = say(server.addr, &db, "alice", &numbered("kept", 0..3));

    let mut quitter = Chat::connect(server.addr);
    quitter.send_bytes(b"/history 2\n/quit\nnot read\n");
    let lines = quitter.read_to_end();
    let bodies: Vec<&str> = lines[..2].iter().map(|l| history_body(l)).collect();
    assert_eq!(bodies, ["<alice> kept 1", "<alice> kept 2"], "{lines:?}");
    assert_eq!(lines[2..], ["* end of history (2 messages)", "* bye"]);

    let mut piped = Chat::connect(server.addr);
    piped.send("/history 1");
    piped.shutdown_write();
    let lines = piped.read_to_end();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(history_body(&lines[0]), "<alice> kept 2");
    assert_eq!(lines[1], "* end of history (1 message)");
}
