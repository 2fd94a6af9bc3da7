//! End-to-end chat behaviour over real loopback sockets, persistence off.

mod common;

use std::collections::HashMap;
use std::thread;
use std::time::Duration;

use common::{alice_and_bob, start_chat_only, start_server, start_without_flood_limit, Chat};
use peerchat::ServerConfig;

#[test]
fn chat_reaches_every_other_client_and_not_the_sender() {
    let server = start_chat_only();
    let mut alice = Chat::named(server.addr, "alice");
    let mut bob = Chat::named(server.addr, "bob");
    let mut carol = Chat::named(server.addr, "carol");
    alice.sync();
    bob.sync();

    alice.send("hello everyone");
    assert_eq!(bob.line(), "<alice> hello everyone");
    assert_eq!(carol.line(), "<alice> hello everyone");
    let before_who = alice.sync();
    assert!(
        before_who.is_empty(),
        "the sender got something back: {before_who:?}"
    );
}

#[test]
fn default_name_is_ip_and_port_and_crlf_input_is_accepted() {
    let server = start_chat_only();
    let mut anon = Chat::connect(server.addr);
    let mut listener = Chat::connect(server.addr);
    anon.sync();
    anon.send_bytes(b"from telnet\r\n");
    assert_eq!(
        listener.line(),
        format!("<{}> from telnet", anon.local_addr())
    );
}

#[test]
fn join_nick_and_leave_notices() {
    let server = start_chat_only();
    let mut alice = Chat::named(server.addr, "alice");
    let mut bob = Chat::connect(server.addr);
    let bob_addr = bob.name.clone();
    assert_eq!(alice.line(), format!("* {bob_addr} joined"));

    bob.send("/nick bob");
    assert_eq!(alice.line(), format!("* {bob_addr} is now bob"));
    assert_eq!(bob.line(), format!("* {bob_addr} is now bob"));

    bob.send("/quit");
    assert_eq!(bob.read_to_end(), vec!["* bye".to_string()]);
    assert_eq!(alice.line(), "* bob left");

    let mut carol = Chat::connect(server.addr);
    let carol_addr = carol.name.clone();
    assert_eq!(alice.line(), format!("* {carol_addr} joined"));
    drop(carol.sync());
    drop(carol); // an abrupt close, not /quit
    assert_eq!(alice.line(), format!("* {carol_addr} left"));
}

#[test]
fn who_lists_everyone_online() {
    let server = start_chat_only();
    let _alice = Chat::named(server.addr, "alice");
    let mut bob = Chat::named(server.addr, "bob");
    let anon = Chat::connect(server.addr);
    bob.sync();
    bob.send("/who");
    let reply = bob.wait_for(|line| line.contains(" online: "));
    assert!(reply.starts_with("* 3 online: "), "{reply}");
    for name in ["alice", "bob", anon.name.as_str()] {
        assert!(reply.contains(name), "{name} missing from {reply}");
    }
}

#[test]
fn nick_rules() {
    let server = start_chat_only();
    let mut alice = Chat::named(server.addr, "alice");
    let mut other = Chat::connect(server.addr);
    alice.sync();
    other.send("/nick ALICE");
    assert_eq!(other.line(), "! nick ALICE is taken");
    other.send("/nick 10.0.0.1:80");
    assert!(other.line().starts_with("! invalid nick"));
    other.send("/nick");
    assert_eq!(other.line(), "! usage: /nick NAME");
    assert_eq!(
        alice.sync(),
        Vec::<String>::new(),
        "refused nicks are nobody else's business"
    );
}

#[test]
fn commands_help_unknown_slash_escape_and_empty_lines() {
    let server = start_chat_only();
    let (mut alice, mut bob) = alice_and_bob(server.addr);

    alice.send("/help");
    let help: Vec<String> = (0..8).map(|_| alice.line()).collect();
    assert!(help.iter().all(|line| line.starts_with("* ")), "{help:?}");
    for command in [
        "/nick", "/me", "/history", "/who", "/stats", "/help", "/quit", "//",
    ] {
        assert!(
            help.iter().any(|line| line.contains(command)),
            "{command} not in /help"
        );
    }

    alice.send("/dance");
    assert_eq!(alice.line(), "! unknown command");

    alice.send("");
    alice.send("   ");
    alice.send_bytes(b"\r\n");
    alice.send("//shrug");
    assert_eq!(bob.line(), "<alice> /shrug");
    assert!(alice.sync().is_empty());
}

#[test]
fn overlong_line_is_refused_and_the_connection_keeps_working() {
    let mut config = ServerConfig::local(None);
    config.limits.max_line = 100;
    let server = start_server(config);
    let (mut alice, mut bob) = alice_and_bob(server.addr);

    alice.send(&"x".repeat(101));
    assert_eq!(alice.line(), "! line too long (max 100 bytes)");
    // The excess arrives over many writes, without a newline for a long time.
    for _ in 0..50 {
        alice.send_bytes(&[b'y'; 1000]);
    }
    alice.send_bytes(b"\nafter\n");
    assert_eq!(alice.line(), "! line too long (max 100 bytes)");
    alice.send(&"z".repeat(100));
    assert_eq!(bob.line(), "<alice> after");
    assert_eq!(bob.line(), format!("<alice> {}", "z".repeat(100)));
    assert!(
        bob.sync().is_empty(),
        "no part of a long line may be delivered"
    );
}

/// A client that sends nothing but overlong lines is told each time, then disconnected.
#[test]
fn a_client_that_keeps_sending_overlong_lines_is_disconnected() {
    let mut config = ServerConfig::local(None);
    config.limits.max_line = 100;
    let server = start_server(config);
    let (mut alice, mut bob) = alice_and_bob(server.addr);
    let too_long = "! line too long (max 100 bytes)";
    for _ in 0..3 {
        alice.send(&"x".repeat(200));
    }
    alice.send("a line that fits starts the count again");
    for _ in 0..3 {
        assert_eq!(alice.line(), too_long);
    }
    for _ in 0..4 {
        alice.send(&"x".repeat(200));
    }
    let lines = alice.read_to_end();
    assert_eq!(
        lines,
        [
            too_long,
            too_long,
            too_long,
            "! too many lines over 100 bytes; disconnecting",
        ]
    );
    assert_eq!(
        bob.line(),
        "<alice> a line that fits starts the count again"
    );
    assert_eq!(bob.line(), "* alice left");
}

/// What reaches another client never holds a byte a terminal would act on: escape sequences
/// are removed whole, other controls dropped, invalid UTF-8 replaced, and a line with nothing
/// left is not sent at all.
#[test]
fn control_bytes_and_invalid_utf8_do_not_reach_other_terminals() {
    let server = start_chat_only();
    let (mut alice, mut bob) = alice_and_bob(server.addr);
    let hostile: [(&[u8], &str); 6] = [
        (b"\x1b[2J\x1b[1;31mred\x1b[0m alert", "red alert"),
        (b"\x1b]0;pwned\x07title", "title"),
        (b"\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\", "link"),
        (
            b"bell\x07 back\x08space nul\x00 cr\rend\x7f",
            "bell backspace nul crend",
        ),
        ("c1\u{9b}31m \u{85}csi".as_bytes(), "c1 csi"),
        (b"\xff bad \xc3 utf8", "\u{fffd} bad \u{fffd} utf8"),
    ];
    for (bytes, _) in &hostile {
        alice.send_bytes(bytes);
        alice.send_bytes(b"\n");
    }
    alice.send_bytes(b"\x1b[2J\x07\x1b]0;only an escape\x07\n"); // nothing left: not sent
    for (_, expected) in &hostile {
        assert_eq!(bob.line(), format!("<alice> {expected}"));
    }
    assert!(bob.sync().is_empty(), "an empty line was delivered");
}

/// Look-alike letters from other scripts cannot make a second `alice`, and bidirectional
/// controls cannot make a line display as something other than what was sent.
#[test]
fn look_alike_nicks_and_bidi_controls_are_refused() {
    let server = start_chat_only();
    let (mut alice, mut bob) = alice_and_bob(server.addr);
    for spoof in ["\u{430}lice", "zo\u{eb}", "\u{391}lice"] {
        bob.send(&format!("/nick {spoof}"));
        assert!(
            bob.line().starts_with("! invalid nick: use ASCII letters"),
            "{spoof}"
        );
    }
    bob.send("pay \u{202e}0001\u{202c} now \u{2066}x\u{2069} \u{1f469}\u{200d}\u{1f467}");
    assert_eq!(
        alice.line(),
        "<bob> pay 0001 now x \u{1f469}\u{200d}\u{1f467}",
        "bidi controls removed, the zero-width joiner of the emoji kept"
    );
}

/// Negotiation commands a real telnet client sends (here split across two writes) are removed
/// before the line is read, not passed on to others.
#[test]
fn telnet_commands_are_removed() {
    let server = start_chat_only();
    let (mut alice, mut bob) = alice_and_bob(server.addr);
    alice.send_bytes(b"\xff\xfd\x03\xff\xfb\x18\xff\xfa\x18\x00XTE");
    thread::sleep(Duration::from_millis(50));
    alice.send_bytes(b"RM\xff\xf0hello\xff\xf4 there\r\n");
    assert_eq!(bob.line(), "<alice> hello there");
}

/// A client that half-closes still gets its last output; one that resets in the middle of a
/// large write and some that vanish at once are all cleaned up, and the rest chat on.
#[test]
fn half_closed_reset_and_vanished_clients_are_cleaned_up() {
    let server = start_without_flood_limit();
    let (mut alice, mut bob) = alice_and_bob(server.addr);

    let mut carol = Chat::named(server.addr, "carol");
    carol.send("last words");
    carol.send("/who");
    carol.shutdown_write();
    let carol_saw = carol.read_to_end();
    assert!(
        carol_saw.iter().any(|l| l.contains(" online: ")),
        "a half-closed client still gets its answers: {carol_saw:?}"
    );
    let carol_said = bob.wait_for(|l| l.starts_with("<carol>"));
    assert_eq!(carol_said, "<carol> last words");
    assert_eq!(bob.line(), "* carol left");

    let dave = Chat::named(server.addr, "dave");
    let big = "y".repeat(4000);
    for _ in 0..100 {
        alice.send(&big); // 400 KB dave never reads: the server is mid-write to him
    }
    dave.reset();
    for _ in 0..20 {
        let mut ghost = std::net::TcpStream::connect(server.addr).unwrap();
        std::io::Write::write_all(&mut ghost, b"half a li").unwrap();
    }
    alice.send("still here");
    assert_eq!(
        bob.wait_for(|l| l.ends_with("still here")),
        "<alice> still here"
    );
    let deadline = std::time::Instant::now() + common::DEADLINE;
    loop {
        alice.send("/who");
        let online = alice.wait_for(|l| l.contains(" online: "));
        if online == "* 2 online: alice, bob" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still listed: {online}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// 60 clients send 10 messages each; every client receives every other client's messages, in
/// the order each sender sent them.
#[test]
fn many_clients_receive_every_message_in_per_sender_order() {
    const CLIENTS: usize = 60;
    const MESSAGES: usize = 10;
    let server = start_chat_only();
    let mut chats: Vec<Chat> = (0..CLIENTS)
        .map(|i| Chat::named(server.addr, &format!("c{i}")))
        .collect();
    for chat in &mut chats {
        chat.sync(); // every join and rename notice read
    }
    let handles: Vec<_> = chats
        .into_iter()
        .map(|mut chat| {
            thread::spawn(move || {
                for n in 0..MESSAGES {
                    chat.send(&format!("msg {n}"));
                }
                let mut next_from: HashMap<String, usize> = HashMap::new();
                let expected = (CLIENTS - 1) * MESSAGES;
                for _ in 0..expected {
                    let line = chat.line();
                    let (sender, n) = parse_numbered(&line);
                    assert_ne!(sender, chat.name, "a client got its own message back");
                    let next = next_from.entry(sender.to_string()).or_default();
                    assert_eq!(n, *next, "{}: out of order from {sender}", chat.name);
                    *next += 1;
                }
                assert!(chat.sync().is_empty(), "{}: extra lines", chat.name);
                (next_from.len(), chat) // kept connected until all are done: no `left` notices
            })
        })
        .collect();
    let results: Vec<(usize, Chat)> = handles
        .into_iter()
        .map(|handle| handle.join().expect("client thread"))
        .collect();
    for (senders_heard, _) in &results {
        assert_eq!(*senders_heard, CLIENTS - 1);
    }
}

fn parse_numbered(line: &str) -> (&str, usize) {
    let rest = line
        .strip_prefix('<')
        .unwrap_or_else(|| panic!("not chat: {line}"));
    let (sender, text) = rest
        .split_once("> msg ")
        .unwrap_or_else(|| panic!("not chat: {line}"));
    (sender, text.parse().expect("message number"))
}

/// One client pours short lines in as fast as it can. Each line grows about tenfold on its way
/// out (the sender's `IP:PORT` name), so a single turn's worth of input once queued more than
/// the output limit for every recipient before any of it could be written, and cut off readers
/// that were keeping up perfectly well.
#[test]
fn a_flood_does_not_cut_off_clients_that_keep_reading() {
    const LINES: usize = 100_000;
    let server = start_without_flood_limit();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let mut chat = Chat::connect(server.addr);
            chat.sync();
            chat
        })
        .collect();
    let mut flooder = Chat::connect(server.addr);
    let expected = format!("<{}> a\r\n", flooder.name);
    let handles: Vec<_> = readers
        .into_iter()
        .map(|chat| {
            let expected = expected.clone();
            thread::spawn(move || count_lines_until(chat, &expected, LINES))
        })
        .collect();
    flooder.sync();
    flooder.send_bytes(&b"a\n".repeat(LINES));
    for handle in handles {
        assert_eq!(handle.join().expect("reader"), LINES);
    }
}

/// Reads raw bytes as fast as possible until `count` copies of `line` arrived; other lines
/// (join notices) are allowed, a disconnect is not.
fn count_lines_until(chat: Chat, line: &str, count: usize) -> usize {
    let mut stream = chat.into_stream();
    stream.set_read_timeout(Some(common::DEADLINE)).unwrap();
    let mut buffer = vec![0u8; 1 << 20];
    let mut pending = Vec::new();
    let mut seen = 0;
    while seen < count {
        let n = std::io::Read::read(&mut stream, &mut buffer).expect("read");
        assert!(n > 0, "disconnected after {seen} of {count} lines");
        pending.extend_from_slice(&buffer[..n]);
        let mut start = 0;
        while let Some(end) = pending[start..].iter().position(|&b| b == b'\n') {
            let got = &pending[start..start + end + 1];
            assert!(!got.starts_with(b"! "), "{}", String::from_utf8_lossy(got));
            if got == line.as_bytes() {
                seen += 1;
            }
            start += end + 1;
        }
        pending.drain(..start);
    }
    seen
}

#[test]
fn lines_sent_in_one_write_keep_their_order_around_notices() {
    // The server gathers a sender's chat lines and copies them to the others in one piece;
    // a rename in between must still arrive between them.
    let server = start_chat_only();
    let (mut alice, mut bob) = alice_and_bob(server.addr);
    alice.send_bytes(b"one\ntwo\n/nick alicia\nthree\n/who\nfour\n");
    assert_eq!(bob.line(), "<alice> one");
    assert_eq!(bob.line(), "<alice> two");
    assert_eq!(bob.line(), "* alice is now alicia");
    assert_eq!(bob.line(), "<alicia> three");
    assert_eq!(bob.line(), "<alicia> four");
    assert_eq!(alice.line(), "* alice is now alicia");
    assert!(alice.line().starts_with("* 2 online"), "the /who answer");
    assert_eq!(alice.sync(), Vec::<String>::new());

    // Gathered lines are sent on when the sender's input is handled, not held for more.
    alice.send("five");
    assert_eq!(bob.line(), "<alicia> five");
}
