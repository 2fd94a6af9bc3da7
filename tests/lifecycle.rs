//! The edges of a connection's life, end to end over loopback: crowds joining and leaving
//! (gathered presence notices), flood control that delays instead of dropping, fairness to
//! other clients during a flood, closes that finish writing, and TCP keepalive on every
//! accepted socket.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{alice_and_bob, start_server, Chat, DEADLINE};
use peerchat::{FloodLimit, ServerConfig};

fn config_with(change: impl FnOnce(&mut ServerConfig)) -> ServerConfig {
    let mut config = ServerConfig::local(None);
    change(&mut config);
    config
}

// ---------------------------------------------------------------------------------------------
// Presence

/// One at once, then one line per interval for the rest; each client hears only of those who
/// came after it, never of itself.
#[test]
fn joins_and_leaves_in_a_crowd_are_gathered_into_one_notice_per_interval() {
    let server = start_server(config_with(|c| {
        c.presence_interval = Duration::from_secs(3)
    }));
    let mut alice = Chat::connect(server.addr);
    let mut first = Chat::connect(server.addr);
    assert_eq!(alice.line(), format!("* {} joined", first.name));

    let mut crowd: Vec<Chat> = (0..7).map(|_| Chat::connect(server.addr)).collect();
    let names: Vec<String> = crowd.iter().map(|chat| chat.name.clone()).collect();
    let everyone = format!(
        "* {}, {}, {}, {}, {} and 2 others joined",
        names[0], names[1], names[2], names[3], names[4]
    );
    assert_eq!(alice.line(), everyone);
    assert_eq!(first.line(), everyone);
    assert_eq!(
        crowd[0].line(),
        format!(
            "* {}, {}, {}, {}, {} and 1 other joined",
            names[1], names[2], names[3], names[4], names[5]
        )
    );
    assert_eq!(
        crowd[4].line(),
        format!("* {} and {} joined", names[5], names[6])
    );
    assert_eq!(crowd[5].line(), format!("* {} joined", names[6]));
    assert_eq!(
        crowd[6].sync(),
        Vec::<String>::new(),
        "nothing about itself"
    );

    for chat in &mut crowd {
        chat.send("/quit");
        chat.read_to_end();
    }
    assert_eq!(alice.line(), format!("* {} left", names[0]));
    assert_eq!(
        alice.line(),
        format!(
            "* {}, {}, {}, {}, {} and 1 other left",
            names[1], names[2], names[3], names[4], names[5]
        )
    );
    assert_eq!(alice.sync(), Vec::<String>::new(), "one line per kind");
}

/// A join still waiting to be announced goes out before anything from the joiner, so nobody
/// sees a client speak or leave before it joined.
#[test]
fn a_gathered_join_is_announced_before_the_joiner_speaks_or_leaves() {
    let server = start_server(config_with(|c| {
        c.presence_interval = Duration::from_secs(60)
    }));
    let mut alice = Chat::connect(server.addr);
    let first = Chat::connect(server.addr);
    assert_eq!(alice.line(), format!("* {} joined", first.name));

    let mut bob = Chat::connect(server.addr);
    let dave = Chat::connect(server.addr);
    bob.send("hello");
    assert_eq!(alice.line(), format!("* {} joined", bob.name));
    assert_eq!(alice.line(), format!("<{}> hello", bob.name));
    bob.send("/nick bob");
    assert_eq!(alice.line(), format!("* {} is now bob", bob.name));
    assert_eq!(
        alice.sync(),
        Vec::<String>::new(),
        "dave's join still waits"
    );

    let carol = Chat::connect(server.addr);
    let carol_name = carol.name.clone();
    drop(carol);
    assert_eq!(alice.line(), format!("* {carol_name} joined"));
    assert_eq!(alice.line(), format!("* {carol_name} left"));
    drop(dave);
}

/// A leave still waiting to be announced goes out before its name is taken again, so the room
/// never hears `* bob left` after the new bob has spoken.
#[test]
fn a_waiting_leave_goes_out_before_its_name_is_taken_again() {
    let server = start_server(config_with(|c| {
        c.presence_interval = Duration::from_secs(60)
    }));
    let mut watcher = Chat::named(server.addr, "watcher");
    let mut alice = Chat::named(server.addr, "alice");
    let mut bob = Chat::named(server.addr, "bob");
    watcher.sync();
    alice.send("/quit");
    alice.read_to_end();
    assert_eq!(watcher.line(), "* alice left");
    bob.send("/quit"); // within the interval: waits
    bob.read_to_end();
    let mut again = Chat::connect(server.addr);
    again.send("/nick bob");
    again.send("I am back");
    let mut seen = Vec::new();
    while seen.last().is_none_or(|line| line != "<bob> I am back") {
        seen.push(watcher.line());
    }
    let at = |line: &str| seen.iter().position(|l| l == line);
    let left = at("* bob left").expect("bob's leave");
    let spoke = at("<bob> I am back").expect("the new bob");
    assert!(left < spoke, "{seen:?}");
}

// ---------------------------------------------------------------------------------------------
// Flood control

const SLOW_DOWN_100: &str =
    "! slow down: more than 100 lines/s (bursts of 20); your lines are delayed, not dropped";

/// Over its rate a client is read more slowly: every line arrives, in order, at the rate.
#[test]
fn a_flood_is_delayed_never_dropped_and_keeps_its_order() {
    let server = start_server(config_with(|c| {
        c.limits.flood = Some(FloodLimit {
            lines_per_sec: 100,
            burst: 20,
        })
    }));
    let (mut alice, mut bob) = alice_and_bob(server.addr);
    let lines: String = (0..300).map(|n| format!("line {n}\n")).collect();
    alice.send_bytes(lines.as_bytes());
    assert_eq!(alice.line(), SLOW_DOWN_100);
    assert_eq!(bob.line(), "<alice> line 0");
    let first_arrived = Instant::now();
    for n in 1..300 {
        assert_eq!(bob.line(), format!("<alice> line {n}"));
    }
    // alice spent two tokens joining (/nick, /who): 18 lines at once, 282 at 100 a second.
    let spread = first_arrived.elapsed();
    assert!(
        spread >= Duration::from_millis(2600),
        "300 lines at 100/s arrived within {spread:?}"
    );
    assert_eq!(
        alice.sync(),
        Vec::<String>::new(),
        "one notice for the burst"
    );
}

/// The notice comes once per burst and again after the client rested; `/quit` behind a flood
/// is answered in turn, after every line before it.
#[test]
fn a_flooder_is_told_once_per_burst_and_its_quit_comes_in_turn() {
    let server = start_server(ServerConfig::local(None)); // 20 lines/s, bursts of 40
    let (mut alice, mut bob) = alice_and_bob(server.addr);
    let burst = |tag: &str| -> String { (0..60).map(|n| format!("{tag} {n}\n")).collect() };
    alice.send_bytes(burst("first").as_bytes());
    for n in 0..60 {
        assert_eq!(bob.line(), format!("<alice> first {n}"));
    }
    assert!(alice
        .line()
        .starts_with("! slow down: more than 20 lines/s (bursts of 40)"));

    thread::sleep(Duration::from_millis(2100)); // a person pausing: the bucket refills
    alice.send_bytes(format!("{}/quit\n", burst("second")).as_bytes());
    for n in 0..60 {
        assert_eq!(bob.line(), format!("<alice> second {n}"));
    }
    let last = alice.read_to_end();
    assert_eq!(last.len(), 2, "{last:?}");
    assert!(last[0].starts_with("! slow down"), "{last:?}");
    assert_eq!(last[1], "* bye");
}

/// Blank lines cost nothing: many of them, or a paste with blank lines between its lines,
/// never make a client look like a flooder.
#[test]
fn blank_lines_are_free_and_never_slow_a_client_down() {
    let server = start_server(ServerConfig::local(None)); // 20 lines/s, bursts of 40
    let (mut alice, mut bob) = alice_and_bob(server.addr);
    let paste: String = (0..30).map(|n| format!("line {n}\n\n  \n")).collect();
    alice.send_bytes(format!("{}{paste}", "\n".repeat(400)).as_bytes());
    for n in 0..30 {
        assert_eq!(bob.line(), format!("<alice> line {n}"));
    }
    assert_eq!(alice.sync(), Vec::<String>::new(), "no slow-down notice");
}

// ---------------------------------------------------------------------------------------------
// Fairness

/// A client sending as fast as loopback allows (flood control off) gets one read share per
/// turn; another client's lines keep getting through while it floods.
#[test]
fn a_flooding_client_does_not_hold_up_another_clients_lines() {
    const FLOOD_LINES: usize = 40_000;
    let server = start_server(config_with(|c| c.limits.flood = None));
    let mut flooder = Chat::connect(server.addr);
    let mut talker = Chat::connect(server.addr);
    let mut listener = Chat::connect(server.addr);
    flooder.sync();
    talker.sync();
    listener.sync();
    // The talker reads everything too, so it is never cut off as a slow consumer.
    let mut talker_in = talker.into_stream();
    let talker_out = talker_in.try_clone().unwrap();
    let talker_name = format!("{}", talker_out.local_addr().unwrap());
    thread::spawn(move || std::io::copy(&mut talker_in, &mut std::io::sink()));
    let mut talker = talker_out;
    let flood_line = format!("<{}> {}", flooder.name, "f".repeat(200));
    let talker_prefix = format!("<{talker_name}> ");
    let (seen_tx, seen_rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        let (mut flood_seen, mut talk_seen) = (0, Vec::new());
        while flood_seen < FLOOD_LINES {
            let line = listener.line();
            if line == flood_line {
                flood_seen += 1;
            } else if let Some(text) = line.strip_prefix(&talker_prefix) {
                talk_seen.push((text.to_string(), flood_seen));
                let _ = seen_tx.send(());
            }
        }
        talk_seen
    });
    let flood: String = format!("{}\n", "f".repeat(200)).repeat(FLOOD_LINES);
    let writer = thread::spawn(move || {
        flooder.send_bytes(flood.as_bytes());
        flooder // kept open until the end: closing with unread input would reset the connection
    });
    let mut sent = 0;
    while sent < 20 {
        talker
            .write_all(format!("talk {sent}\n").as_bytes())
            .expect("talker sends");
        sent += 1;
        if seen_rx.recv_timeout(DEADLINE).is_err() {
            break; // the reader ended: the flood is over
        }
    }
    let _flooder = writer.join().expect("flooder");
    let talk_seen = reader.join().expect("listener");
    assert!(
        !talk_seen.is_empty(),
        "no line of the talker arrived during the flood"
    );
    for (n, (text, _)) in talk_seen.iter().enumerate() {
        assert_eq!(text, &format!("talk {n}"));
    }
    let (_, flood_before_last_talk) = talk_seen.last().unwrap();
    assert!(
        *flood_before_last_talk < FLOOD_LINES,
        "the talker's lines came only after the whole flood"
    );
}

// ---------------------------------------------------------------------------------------------
// Closes that finish

/// How a client ends its session.
#[derive(Clone, Copy, Debug)]
enum Ending {
    Quit,
    EndOfInput,
    Overlong,
}

/// A socket that takes little at a time, so the server's output for it piles up in the
/// server's buffers.
fn slow_reader(addr: SocketAddr) -> Chat {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).expect("connect");
    Chat::over(socket.into())
}

/// `/quit`, end of input and the overlong-line disconnect leave with everything queued before
/// them delivered, however much is still waiting in the server, then a FIN.
#[test]
fn closes_deliver_everything_queued_before_them() {
    const LINES: usize = 4000;
    for ending in [Ending::Quit, Ending::EndOfInput, Ending::Overlong] {
        let server = start_server(config_with(|c| {
            c.limits.flood = None;
            c.limits.max_output = 64 << 20;
            c.limits.max_overlong = 0;
        }));
        let mut leaver = slow_reader(server.addr);
        let mut sender = Chat::connect(server.addr);
        leaver.sync();
        let line = "s".repeat(4000);
        let lines: String = format!("{line}\n").repeat(LINES);
        sender.send_bytes(lines.as_bytes()); // 16 MB for the leaver: far more than sockets hold
        sender.sync();
        let last = match ending {
            Ending::Quit => {
                leaver.send("/quit");
                Some("* bye".to_string())
            }
            Ending::EndOfInput => {
                leaver.shutdown_write();
                None
            }
            Ending::Overlong => {
                leaver.send(&"x".repeat(5000));
                Some("! too many lines over 4096 bytes; disconnecting".to_string())
            }
        };
        let received = leaver.read_to_end();
        let expected = format!("<{}> {line}", sender.name);
        let chat = received.iter().filter(|got| **got == expected).count();
        assert_eq!(chat, LINES, "{ending:?}: chat lines before the close");
        assert_eq!(
            received.last().cloned().filter(|_| last.is_some()),
            last,
            "{ending:?}"
        );
    }
}

/// A closing client that never takes its last output gives its slot back after a bounded time.
#[test]
fn a_closing_client_that_never_reads_is_closed_after_a_deadline() {
    let server = start_server(config_with(|c| {
        c.limits.flood = None;
        c.limits.max_output = 64 << 20;
        c.max_clients = 2;
    }));
    let mut leaver = slow_reader(server.addr);
    let mut sender = Chat::connect(server.addr);
    leaver.sync();
    let lines: String = format!("{}\n", "s".repeat(4000)).repeat(4000);
    sender.send_bytes(lines.as_bytes());
    sender.sync();
    leaver.send("/quit"); // and never reads again: its slot is still taken while it drains
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut stream = TcpStream::connect(server.addr).expect("connect");
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut first = [0u8; 9];
        stream.read_exact(&mut first).expect("first line");
        if &first == b"* welcome" {
            break;
        }
        assert_eq!(&first, b"! server ", "refused while the leaver drains");
        assert!(
            Instant::now() < deadline,
            "the leaver's slot was never given back"
        );
        thread::sleep(Duration::from_millis(200));
    }
    drop(leaver);
}

// ---------------------------------------------------------------------------------------------
// Dead peers

/// The kernel's view of the server's end of a connection from `client`: the timer column of
/// `/proc/net/tcp` (`02:` is the keepalive timer, followed by the time left in 1/100 s).
fn server_side_timer(server: SocketAddr, client: SocketAddr) -> String {
    let hex = |addr: SocketAddr| format!(":{:04X}", addr.port());
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields[1].ends_with(&hex(server)) && fields[2].ends_with(&hex(client)))
        .map(|fields| fields[5].to_string())
        .expect("the server's socket in /proc/net/tcp")
}

/// The timer of the server's end of a connection once no data is in flight (`01:` is the
/// retransmission timer, armed for a moment after each line).
fn settled_timer(server: SocketAddr, client: SocketAddr) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let timer = server_side_timer(server, client);
        if !timer.starts_with("01:") || Instant::now() > deadline {
            return timer;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The server's socket for `client`: the test runs the server in its own process, so the
/// descriptor is one of ours. Returns its `TCP_USER_TIMEOUT` in milliseconds.
fn server_side_user_timeout(client: SocketAddr) -> u32 {
    use std::os::fd::{AsRawFd, BorrowedFd};
    for entry in std::fs::read_dir("/proc/self/fd").expect("list descriptors") {
        let Ok(fd) = entry.unwrap().file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: the descriptor is open in this process for the duration of the call; a
        // descriptor that is not a socket just fails `peer_addr`.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&borrowed);
        let peer = socket.peer_addr().ok().and_then(|addr| addr.as_socket());
        if peer == Some(client)
            && socket.local_addr().ok().and_then(|a| a.as_socket()) != Some(client)
        {
            let mut value: u32 = 0;
            let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into `value`.
            let status = unsafe {
                libc::getsockopt(
                    borrowed.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_USER_TIMEOUT,
                    (&mut value as *mut u32).cast(),
                    &mut len,
                )
            };
            assert_eq!(status, 0, "getsockopt TCP_USER_TIMEOUT");
            return value;
        }
    }
    panic!("no server socket for {client}");
}

/// Accepted sockets carry TCP keepalive with `--keepalive` as the idle time, so a client whose
/// host vanished without a FIN is found and removed; `--keepalive 0` turns it off.
#[test]
fn accepted_sockets_carry_tcp_keepalive() {
    let server = start_server(config_with(|c| c.keepalive = Some(Duration::from_secs(45))));
    let mut chat = Chat::connect(server.addr);
    chat.sync();
    let timer = settled_timer(server.addr, chat.local_addr());
    let (kind, left) = timer.split_once(':').unwrap();
    let left = u64::from_str_radix(left, 16).unwrap();
    assert_eq!(kind, "02", "keepalive timer armed: {timer}");
    assert!((4000..=4500).contains(&left), "45 s idle time: {timer}");
    // Probes only go out on an idle connection; with output in flight to a vanished host the
    // connection ends after as long as keepalive would take: 45 s + 3 × 15 s.
    assert_eq!(server_side_user_timeout(chat.local_addr()), 90_000);

    let server = start_server(config_with(|c| c.keepalive = None));
    let mut chat = Chat::connect(server.addr);
    chat.sync();
    let timer = settled_timer(server.addr, chat.local_addr());
    assert!(
        timer.starts_with("00:"),
        "no timer without keepalive: {timer}"
    );
}

/// Guards the helper above: `alice_and_bob` is shared with other files.
#[test]
fn lifecycle_defaults_keep_plain_chat_working() {
    let server = start_server(ServerConfig::local(None));
    let (mut alice, mut bob) = alice_and_bob(server.addr);
    alice.send("hi");
    assert_eq!(bob.line(), "<alice> hi");
}
