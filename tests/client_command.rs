//! `peerchat-client --command CMD` as a script or health check runs it: against the real
//! server (with and without stored history) and, to script exactly what arrives around the
//! reply, a fake server in the test. Every wait has a deadline.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::process::{run_bounded, spawn_client};
use common::{free_port, start_chat_only, start_server, Chat, TestDb, DEADLINE};
use peerchat::ServerConfig;

/// Starts `peerchat-client --port PORT FLAGS`, standard input closed: `--command` never
/// reads it.
fn spawn_command(port: u16, flags: &[&str]) -> Child {
    spawn_client(port, flags, Stdio::null())
}

fn run_command(port: u16, flags: &[&str]) -> Output {
    run_bounded(spawn_command(port, flags))
}

fn stdout_lines(out: &Output) -> Vec<String> {
    String::from_utf8(out.stdout.clone())
        .expect("UTF-8 output")
        .lines()
        .map(str::to_string)
        .collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The names in a `* N online: a, b` line, sorted, after checking N.
fn who_names(line: &str) -> Vec<String> {
    let rest = line
        .strip_prefix("* ")
        .unwrap_or_else(|| panic!("not a notice: {line:?}"));
    let (count, names) = rest.split_once(" online: ").expect("a /who reply");
    let mut names: Vec<String> = names.split(", ").map(str::to_string).collect();
    assert_eq!(count.parse::<usize>().unwrap(), names.len(), "{line}");
    names.sort();
    names
}

#[test]
fn who_prints_exactly_the_who_line_and_exits_0() {
    let server = start_chat_only();
    let mut alice = Chat::named(server.addr, "alice");
    let out = run_command(
        server.addr.port(),
        &["--nick", "probe", "--command", "/who"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(who_names(&lines[0]), ["alice", "probe"]);
    assert_eq!(stderr(&out), "");
    // It left the way a person does.
    alice.wait_for(|line| line == "* probe left");
}

#[test]
fn an_error_reply_is_printed_and_exits_1() {
    let server = start_chat_only();
    for (command, reply) in [
        ("/nick", "! usage: /nick NAME"),
        ("/dance", "! unknown command"),
        ("/history 2", "! history unavailable: persistence is off"),
    ] {
        let out = run_command(server.addr.port(), &["--command", command]);
        assert_eq!(out.status.code(), Some(1), "{command}: {}", stderr(&out));
        assert_eq!(stdout_lines(&out), [reply], "{command}");
        assert!(stderr(&out).contains("answered with an error"), "{command}");
    }
}

#[test]
fn a_taken_nick_is_reported_and_exits_1() {
    let server = start_chat_only();
    let _bob = Chat::named(server.addr, "bob");
    let out = run_command(server.addr.port(), &["--nick", "bob", "--command", "/who"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("! nick bob is taken"),
        "{}",
        stderr(&out)
    );
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 1, "the command still ran: {lines:?}");
    assert!(lines[0].starts_with("* 2 online: "), "{lines:?}");
}

#[test]
fn a_closed_port_exits_1() {
    let out = run_command(free_port(), &["--command", "/who"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot connect"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
}

// ---------------------------------------------------------------------------------------------
// With stored history: the join history is not the reply, `/history`'s answer is.

fn server_with_history(db: &TestDb) -> peerchat::RunningServer {
    let mut config = ServerConfig::local(Some(db.store_config()));
    config.limits.flood = None;
    start_server(config)
}

/// alice says `m 0` … `m {count - 1}`; returns once all are stored.
fn store_messages(addr: SocketAddr, db: &TestDb, count: usize) -> Chat {
    let mut alice = Chat::named(addr, "alice");
    for n in 0..count {
        alice.send(&format!("m {n}"));
    }
    db.wait_for_stored(count);
    alice
}

#[test]
fn join_history_is_not_printed_and_history_prints_exactly_its_answer() {
    let db = TestDb::start();
    let server = server_with_history(&db);
    let _alice = store_messages(server.addr, &db, 5);
    let port = server.addr.port();

    let out = run_command(port, &["--nick", "probe", "--command", "/who"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 1, "no join history: {lines:?}");
    assert_eq!(who_names(&lines[0]), ["alice", "probe"]);

    let out = run_command(port, &["--command", "/history 3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 4, "{lines:?}");
    for (line, n) in lines.iter().zip(2..5) {
        let body = line
            .strip_prefix("* [")
            .and_then(|rest| rest.split_once("] "))
            .map(|(_, body)| body);
        assert_eq!(body, Some(format!("<alice> m {n}").as_str()), "{line}");
    }
    assert_eq!(lines[3], "* end of history (3 messages)");
}

// ---------------------------------------------------------------------------------------------
// A fake server: exactly what arrives around the reply.

const WELCOME: &str = "* welcome, you are 127.0.0.1:40000 \u{2014} /help for commands\r\n";

fn fake_server() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake server");
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

/// The client's connection within `DEADLINE`: a reader of its lines (each read bounded by
/// `DEADLINE` too) and the socket to answer on.
fn accept(listener: &TcpListener) -> (BufReader<TcpStream>, TcpStream) {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + DEADLINE;
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(err) if err.kind() == ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "the client never connected");
                thread::sleep(Duration::from_millis(10));
            }
            Err(err) => panic!("accept: {err}"),
        }
    };
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    (BufReader::new(stream.try_clone().unwrap()), stream)
}

/// Reads `count` lines from the client.
fn read_lines(reader: &mut BufReader<TcpStream>, count: usize) -> Vec<String> {
    (0..count)
        .map(|_| {
            let mut line = String::new();
            let read = reader.read_line(&mut line).expect("a line from the client");
            assert!(read > 0, "the client closed early");
            line.trim_end().to_string()
        })
        .collect()
}

/// Chat, joins, leaves and renames from others in the window between the `/who` reply and the
/// goodbye are not part of the reply; join history before it is not either.
#[test]
fn others_lines_around_the_reply_are_left_out() {
    let (listener, port) = fake_server();
    let client = spawn_command(port, &["--command", "/who"]);
    let (mut reader, mut stream) = accept(&listener);
    assert_eq!(read_lines(&mut reader, 3), ["/who", "/who", "/quit"]);
    let script = [
        WELCOME,
        "* [2026-01-01T10:00:00Z] <bob> 1 online: not the reply\r\n",
        "* end of history (1 message)\r\n",
        "* 2 online: bob, 127.0.0.1:40000\r\n",
        "<bob> live chat\r\n",
        "* carol joined\r\n",
        "* bob is now robert\r\n",
        "* dave, erin and 127.0.0.1:40001 joined\r\n",
        "* 3 online: robert, carol, 127.0.0.1:40000\r\n",
        "* carol left\r\n",
        "* bye\r\n",
    ];
    stream.write_all(script.concat().as_bytes()).unwrap();
    let out = run_bounded(client);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout_lines(&out),
        ["* 3 online: robert, carol, 127.0.0.1:40000"]
    );
}

/// `/history`'s `/quit` is sent only after its end line: the server drops an answer that
/// arrives after it has handled `/quit`.
#[test]
fn history_waits_for_its_answer_before_quitting() {
    let (listener, port) = fake_server();
    let client = spawn_command(port, &["--command", "/history 1"]);
    let (mut reader, mut stream) = accept(&listener);
    assert_eq!(read_lines(&mut reader, 2), ["/who", "/history 1"]);
    let answer = [
        WELCOME,
        "* 1 online: 127.0.0.1:40000\r\n",
        "* [2026-01-01T10:00:00Z] <bob> hello\r\n",
        "* end of history (1 message)\r\n",
    ];
    stream.write_all(answer.concat().as_bytes()).unwrap();
    assert_eq!(read_lines(&mut reader, 1), ["/quit"]);
    stream.write_all(b"* bye\r\n").unwrap();
    let out = run_bounded(client);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout_lines(&out),
        [
            "* [2026-01-01T10:00:00Z] <bob> hello",
            "* end of history (1 message)"
        ]
    );
}

/// A server that refuses the connection (full, too many from this address) says why and
/// closes: exit 1 with its reason on stderr, nothing on stdout.
#[test]
fn a_refusal_before_the_reply_exits_1_with_the_reason() {
    let (listener, port) = fake_server();
    let client = spawn_command(port, &["--command", "/who"]);
    let (reader, mut stream) = accept(&listener);
    stream
        .write_all(b"! server full (10 clients); try again later\r\n")
        .unwrap();
    drop((reader, stream));
    let out = run_bounded(client);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = stderr(&out);
    assert!(stderr.contains("! server full"), "{stderr}");
    assert!(stderr.contains("before answering"), "{stderr}");
}
