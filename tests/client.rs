//! The client binary as a user runs it: piped (plain mode, what scripts see) and under a real
//! pseudo-terminal (terminal mode, what a person sees, read back through a terminal emulator).
//! Servers are the real one (in-process or the binary) or, to misbehave on purpose, a plain
//! `TcpListener` in the test. Every wait has a deadline.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::process::{run_bounded, spawn_piped_client, spawn_server_on, ServerProcess, CLIENT};
use common::pty::{screen_rows, Pty};
use common::{free_port, start_chat_only, Chat, DEADLINE};

/// What a fake server says first, as the real one does.
const WELCOME: &[u8] =
    "* welcome, you are 127.0.0.1:40000 \u{2014} /help for commands\r\n".as_bytes();

/// The client process, killed if the test fails before it exits.
struct Client(Child);

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The client in terminal mode on `pty`.
fn client_on(pty: &Pty, port: u16, flags: &[&str]) -> Client {
    let child = pty
        .command(CLIENT)
        .args(["--port", &port.to_string()])
        .args(flags)
        .spawn()
        .expect("start client");
    Client(child)
}

/// A 24 × 80 terminal.
fn terminal() -> Pty {
    Pty::open(24, 80)
}

fn fake_server() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake server");
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

/// The next connection to `listener`, within `DEADLINE`.
/// bob on the line, and alice in a pty (`--nick alice` among `flags`), once bob has seen her
/// take her nick.
fn alice_in_a_terminal_with_bob(addr: SocketAddr, flags: &[&str]) -> (Chat, Pty, Client) {
    let mut bob = Chat::named(addr, "bob");
    let mut pty = terminal();
    let client = client_on(&pty, addr.port(), flags);
    pty.wait_for_text("is now alice");
    bob.wait_for(|line| line.ends_with(" is now alice"));
    (bob, pty, client)
}

/// A client in a pty (`--no-time`) connected to a fake server that has sent the welcome.
fn terminal_with_fake_server() -> (Pty, Client, TcpStream) {
    let (listener, port) = fake_server();
    let pty = terminal();
    let client = client_on(&pty, port, &["--no-time"]);
    let mut stream = accept(&listener);
    stream.write_all(WELCOME).unwrap();
    (pty, client, stream)
}

fn accept(listener: &TcpListener) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + DEADLINE;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                stream.set_read_timeout(Some(DEADLINE)).unwrap();
                return stream;
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "the client never connected");
                thread::sleep(Duration::from_millis(10));
            }
            Err(err) => panic!("accept: {err}"),
        }
    }
}

/// As a server answering `/quit`: reads the client's lines up to `/quit`, says bye, closes its
/// sending side, then reads on until the client has gone. Returns every line received, so
/// anything sent after `/quit` shows up.
fn serve_until_quit(stream: TcpStream) -> Vec<String> {
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        let read = reader.read_line(&mut line).expect("read from the client");
        assert!(read > 0, "the client closed before /quit: {lines:?}");
        lines.push(line.trim_end().to_string());
        if line.trim_end() == "/quit" {
            break;
        }
    }
    writer.write_all(b"* bye\r\n").unwrap();
    writer.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = String::new();
    match reader.read_to_string(&mut rest) {
        Ok(_) => {}
        Err(err) if err.kind() == ErrorKind::ConnectionReset => {}
        Err(err) => panic!("waiting for the client to close: {err}"),
    }
    lines.extend(rest.lines().map(str::to_string));
    lines
}

/// The server binary on `port` (a fixed one, so it can be started again on it).
fn server_on(port: u16) -> ServerProcess {
    spawn_server_on(port, &["--port", &port.to_string(), "--no-persist"])
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// True for `HH:MM ` followed by `rest`.
fn stamped(row: &str, rest: &str) -> bool {
    let bytes = row.as_bytes();
    row.len() == 6 + rest.len()
        && bytes[..5].iter().enumerate().all(|(i, b)| {
            if i == 2 {
                *b == b':'
            } else {
                b.is_ascii_digit()
            }
        })
        && bytes[5] == b' '
        && &row[6..] == rest
}

// ---------------------------------------------------------------------------------------------
// Plain mode

// `peerchat-client < file` sending every line through the server's default flood control is
// tests/binaries.rs' `client_piping_a_long_file_delivers_every_line_before_exiting`.

/// `/quit` is final: lines after it in the input are never sent, and the client exits 0 on
/// the server's close even though its input is still open.
#[test]
fn plain_mode_sends_nothing_after_quit() {
    let (listener, port) = fake_server();
    let mut client = spawn_piped_client(port, &[]);
    let mut stdin = client.stdin.take().unwrap();
    stdin
        .write_all(b"before\n/quit\nafter one\nafter two\n")
        .unwrap();
    let mut stream = accept(&listener);
    stream.write_all(WELCOME).unwrap();
    assert_eq!(serve_until_quit(stream), ["before", "/quit"]);
    let out = run_bounded(client);
    drop(stdin);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("* bye"));
}

/// Lines from a hostile server, each with a different way to take over a terminal.
const HOSTILE: &[&[u8]] = &[
    b"<eve> title \x1b]0;pwned\x07set\r\n",
    b"<eve> clear\x1b[2J screen\r\n",
    b"<eve> \x1b[31mred\x1b[0m text\r\n",
    b"<eve> carriage\rreturn\r\n",
    b"<eve> back\x08\x08space\r\n",
    b"<eve> c1 \xc2\x9b31mcsi and \x9b raw\r\n",
    b"<eve> bidi \xe2\x80\xaecba\r\n",
    b"* bell\x07 and del\x7f\r\n",
    b"<eve> tab\there\t\tand there\r\n",
    b"<eve> end of part one\r\n",
];

/// What the hostile lines must look like once cleaned.
const HOSTILE_SHOWN: &[&str] = &[
    "<eve> title set",
    "<eve> clear screen",
    "<eve> red text",
    "<eve> carriagereturn",
    "<eve> backspace",
    "<eve> c1 csi and \u{fffd} raw",
    "<eve> bidi cba",
    "* bell and del",
    "<eve> tab here  and there",
    "<eve> end of part one",
];

/// A 1 MB line with escape sequences in it, before and after where the client cuts it.
fn overlong_line() -> Vec<u8> {
    let mut line = b"<eve> \x1b[2J".to_vec();
    line.extend(std::iter::repeat_n(b'A', 500_000));
    line.extend_from_slice(b"\x1b]0;pwned\x07\x1b[2J");
    line.extend(std::iter::repeat_n(b'B', 500_000));
    line.extend_from_slice(b"\r\n");
    line
}

/// Sequences that must never reach the terminal. The client's own colours are fine, so this
/// lists the hostile ones, not every escape.
fn assert_nothing_hostile(output: &[u8]) {
    let forbidden: [(&[u8], &str); 8] = [
        (b"pwned", "the OSC title text"),
        (b"\x1b]", "an OSC sequence"),
        (b"\x1b[2J", "clear screen"),
        (b"\x1b[31m", "the server's colour"),
        (b"\x08", "backspace"),
        (b"\x07", "bell / OSC end"),
        (b"\x9b", "a C1 CSI byte"),
        (b"\t", "a TAB (shown as a space)"),
    ];
    for (bytes, what) in forbidden {
        assert!(
            !output.windows(bytes.len()).any(|w| w == bytes),
            "{what} ({bytes:?}) reached the output"
        );
    }
}

/// Plain mode cleans and bounds what it prints as well: its stdout may be a terminal.
#[test]
fn plain_mode_prints_server_text_cleaned_and_bounded() {
    let (listener, port) = fake_server();
    let mut client = spawn_piped_client(port, &[]);
    let mut stdin = client.stdin.take().unwrap();
    stdin.write_all(b"/quit\n").unwrap();
    let mut stream = accept(&listener);
    stream.write_all(WELCOME).unwrap();
    for line in HOSTILE {
        stream.write_all(line).unwrap();
    }
    stream.write_all(&overlong_line()).unwrap();
    stream.write_all(b"<eve> still here\r\n").unwrap();
    serve_until_quit(stream);
    let out = run_bounded(client);
    drop(stdin);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_nothing_hostile(&out.stdout);
    assert!(
        !out.stdout.contains(&0x1b),
        "no escape at all in plain mode"
    );
    assert!(!out.stdout.contains(&b'\r'));
    let stdout = String::from_utf8(out.stdout).expect("UTF-8");
    let lines: Vec<&str> = stdout.lines().collect();
    for shown in HOSTILE_SHOWN {
        assert!(lines.contains(shown), "{shown:?} missing from {lines:?}");
    }
    let cut = lines
        .iter()
        .find(|line| line.starts_with("<eve> AAAA"))
        .expect("the overlong line, cut");
    assert!(
        cut.len() <= 8192 && cut.ends_with('\u{2026}'),
        "{}",
        cut.len()
    );
    assert!(lines.contains(&"<eve> still here"), "the line after it");
}

/// A listener on which a connect hangs: its accept queue is full (never accepted), so it drops
/// new SYNs, as a black hole would. Keep it (and the connections filling it) alive while the
/// connect should hang.
struct HangingListener {
    port: u16,
    _socket: socket2::Socket,
    _fillers: Vec<TcpStream>,
}

fn hanging_listener() -> HangingListener {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.bind(&addr(0).into()).unwrap();
    socket.listen(0).unwrap();
    let port = socket.local_addr().unwrap().as_socket().unwrap().port();
    // Fill the accept queue until a connect hangs.
    let mut fillers = Vec::new();
    let full =
        (0..8).any(
            |_| match TcpStream::connect_timeout(&addr(port), Duration::from_millis(300)) {
                Ok(stream) => {
                    fillers.push(stream);
                    false
                }
                Err(_) => true,
            },
        );
    assert!(full, "the listen queue never filled");
    HangingListener {
        port,
        _socket: socket,
        _fillers: fillers,
    }
}

/// `--connect-timeout` bounds a connect that would otherwise wait for the system's SYN
/// retries (minutes).
#[test]
fn connect_timeout_bounds_a_connect_that_hangs() {
    let listener = hanging_listener();
    let port = listener.port;
    let client = Command::new(CLIENT)
        .args(["--port", &port.to_string(), "--connect-timeout", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start client");
    let out = run_bounded(client);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot connect"), "{stderr}");
    assert!(stderr.contains("timed out"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// Terminal mode

/// Text typed but not sent survives a burst of incoming lines: each line is shown whole on a
/// row of its own above the input line, no copy of the prompt is left between them, and the
/// input line (with the cursor after the text) is at the bottom. Enter then sends it, and it
/// shows as `<you> …` (the server does not echo).
#[test]
fn terminal_incoming_burst_does_not_garble_typed_input() {
    let server = start_chat_only();
    let mut bob = Chat::named(server.addr, "bob");
    let mut pty = terminal();
    let mut client = client_on(&pty, server.addr.port(), &["--no-time"]);
    pty.wait_for_text("welcome, you are");
    bob.wait_for(|line| line.ends_with(" joined"));
    pty.type_keys(b"hello wor");
    pty.wait_for_row("> hello wor");
    bob.send_bytes(b"burst 1\nburst 2\nburst 3\nburst 4\nburst 5\n");
    // The whole batch: the last line and the input line drawn again after it.
    pty.wait_for("the burst, then the input line", |screen| {
        let rows = screen_rows(screen);
        let cursor_row = usize::from(screen.cursor_position().0);
        rows.iter().any(|r| r == "<bob> burst 5") && rows[cursor_row] == "> hello wor"
    });

    let rows = pty.rows();
    let at = |text: &str| {
        let found: Vec<usize> = (0..rows.len()).filter(|&i| rows[i] == text).collect();
        assert_eq!(found.len(), 1, "{text:?} once:\n{}", pty.contents());
        found[0]
    };
    let first = at("<bob> burst 1");
    for n in 2..=5 {
        assert_eq!(
            at(&format!("<bob> burst {n}")),
            first + n - 1,
            "rows in order"
        );
    }
    let (row, col) = pty.screen().cursor_position();
    assert_eq!(
        usize::from(row),
        first + 5,
        "input line right below the burst"
    );
    assert_eq!(rows[usize::from(row)], "> hello wor");
    assert_eq!(col, 11, "cursor after the typed text");
    let prompts = rows.iter().filter(|r| r.starts_with('>')).count();
    assert_eq!(prompts, 1, "one prompt on screen:\n{}", pty.contents());

    pty.type_keys(b"\r");
    let received = bob.wait_for(|line| line.ends_with("> hello wor"));
    assert!(received.starts_with("<127.0.0.1:"), "{received}");
    pty.wait_for("own line, then an empty input line", |screen| {
        let rows = screen_rows(screen);
        let cursor_row = usize::from(screen.cursor_position().0);
        rows.iter().any(|r| r == "<you> hello wor") && rows[cursor_row] == ">"
    });
    pty.type_keys(b"/quit\r");
    assert!(pty.wait_exit(&mut client.0).success());
}

/// A history replay (`/history`, or on joining) is a burst of notices in one write: all of it
/// shows in order, one line per row, with the draft still on the input line below.
#[test]
fn terminal_history_replay_burst_keeps_the_input_line() {
    const REPLAYED: usize = 20;
    let (mut pty, mut client, mut stream) = terminal_with_fake_server();
    pty.wait_for_text("welcome, you are");
    pty.type_keys(b"draft");
    pty.wait_for_row("> draft");
    let mut replay = Vec::new();
    for n in 1..=REPLAYED {
        let line = format!("* [2026-11-24T14:03:{n:02}Z] <alice> message {n}\r\n");
        replay.extend_from_slice(line.as_bytes());
    }
    replay.extend_from_slice(format!("* end of history ({REPLAYED} messages)\r\n").as_bytes());
    stream.write_all(&replay).unwrap();
    let end = format!("* end of history ({REPLAYED} messages)");
    pty.wait_for("the replay, then the input line", |screen| {
        let rows = screen_rows(screen);
        let cursor_row = usize::from(screen.cursor_position().0);
        rows.contains(&end) && rows[cursor_row] == "> draft"
    });
    let rows = pty.rows();
    let first = rows
        .iter()
        .position(|r| r.ends_with("<alice> message 1"))
        .expect("first replayed line");
    for n in 1..=REPLAYED {
        let expected = format!("* [2026-11-24T14:03:{n:02}Z] <alice> message {n}");
        assert_eq!(rows[first + n - 1], expected, "{}", pty.contents());
    }
    assert_eq!(rows[first + REPLAYED], end);
    assert_eq!(rows[first + REPLAYED + 1], "> draft");
    assert_eq!(rows.iter().filter(|r| r.starts_with('>')).count(), 1);
    pty.type_keys(b"\x15/quit\r");
    assert_eq!(serve_until_quit(stream), ["/quit"]);
    assert!(pty.wait_exit(&mut client.0).success());
}

/// Arrows, Home/End, Ctrl-A/E/U/W, Backspace, Delete and the input history edit what is sent;
/// a line longer than the terminal scrolls on one row and is sent whole.
#[test]
fn terminal_line_editing_keys_edit_what_is_sent() {
    let server = start_chat_only();
    let (mut bob, mut pty, mut client) =
        alice_in_a_terminal_with_bob(server.addr, &["--nick", "alice", "--no-time"]);

    // Left, Ctrl-A, Ctrl-E.
    pty.type_keys(b"helo\x1b[Dl\x01[\x05]\r");
    assert_eq!(bob.line(), "<alice> [hello]");
    // Ctrl-U, Ctrl-W, Home (SS3 form), End (CSI form), Backspace.
    pty.type_keys(b"scratch this\x15one two\x17three\x1bOH>\x1b[F\x7fE\r");
    assert_eq!(bob.line(), "<alice> >one threE");
    // Up twice recalls the line before last; Delete (ESC [ 3 ~) and Home (ESC [ 1 ~).
    pty.type_keys(b"\x1b[A\x1b[A\r");
    assert_eq!(bob.line(), "<alice> [hello]");
    pty.type_keys(b"xabc\x1b[1~\x1b[3~\r");
    assert_eq!(bob.line(), "<alice> abc");

    // 150 characters on an 80-column terminal: one row, cursor on it, all of it sent.
    let long: String = (0..150)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    pty.type_keys(long.as_bytes());
    pty.type_keys(b"END");
    pty.wait_for("the end of the long line, the cursor after it", |screen| {
        let rows = screen_rows(screen);
        let (row, col) = screen.cursor_position();
        let row = &rows[usize::from(row)];
        row.starts_with("> ") && row.ends_with("END") && usize::from(col) == row.chars().count()
    });
    let (row, col) = pty.screen().cursor_position();
    let rows = pty.rows();
    assert!(
        rows[usize::from(row)].ends_with("END"),
        "{}",
        pty.contents()
    );
    assert!(rows[usize::from(row)].chars().count() < 80);
    assert!(col < 80);
    assert_eq!(rows.iter().filter(|r| r.starts_with("> ")).count(), 1);
    pty.type_keys(b"\r");
    assert_eq!(bob.line(), format!("<alice> {long}END"));
    pty.type_keys(b"\x03");
    assert!(pty.wait_exit(&mut client.0).success());
}

/// The time on each line, names in colour, notices dim, errors red, our nick highlighted when
/// someone mentions it, our own messages and actions as `<you> …` and `* you …` even with a
/// nick (the others see them under the nick).
#[test]
fn terminal_shows_time_colours_mentions_and_own_lines() {
    let server = start_chat_only();
    let (mut bob, mut pty, mut client) =
        alice_in_a_terminal_with_bob(server.addr, &["--nick", "alice"]);
    bob.send("hi alice!");
    pty.wait_for("bob's line", |screen| {
        screen_rows(screen)
            .iter()
            .any(|row| stamped(row, "<bob> hi alice!"))
    });
    let rows = pty.rows();
    let row = rows
        .iter()
        .position(|r| r.ends_with("<bob> hi alice!"))
        .unwrap();
    let cell = |col: usize| pty.screen().cell(row as u16, col as u16).unwrap().clone();
    let name = rows[row].find("<bob>").unwrap();
    let mention = rows[row].find("alice").unwrap();
    assert_ne!(
        cell(name).fgcolor(),
        vt100::Color::Default,
        "bob's name in colour"
    );
    assert!(
        cell(mention).inverse() && cell(mention).bold(),
        "mention highlighted"
    );
    assert!(!cell(mention - 2).inverse(), "only the mention");
    assert!(cell(0).dim(), "the time is dim");

    pty.type_keys(b"hey bob\r");
    assert_eq!(bob.line(), "<alice> hey bob");
    pty.type_keys(b"/me waves\r/bogus\r");
    pty.wait_for_text("unknown command");
    assert_eq!(bob.line(), "* alice waves");
    let rows = pty.rows();
    assert!(rows.iter().any(|r| stamped(r, "<you> hey bob")), "{rows:?}");
    assert!(rows.iter().any(|r| stamped(r, "* you waves")), "{rows:?}");
    assert!(
        !rows
            .iter()
            .any(|r| r.ends_with("<alice> hey bob") || r.ends_with("* alice waves")),
        "{rows:?}"
    );
    let notice = rows
        .iter()
        .position(|r| r.ends_with("is now alice"))
        .unwrap();
    assert!(
        pty.screen().cell(notice as u16, 6).unwrap().dim(),
        "notices dim"
    );
    let error = rows
        .iter()
        .position(|r| r.ends_with("! unknown command"))
        .unwrap();
    let error_cell = pty.screen().cell(error as u16, 6).unwrap();
    assert_eq!(error_cell.fgcolor(), vt100::Color::Idx(1), "errors red");
    pty.type_keys(b"/quit\r");
    assert!(pty.wait_exit(&mut client.0).success());
}

/// True if the client wrote any SGR (colour or attribute) sequence.
fn has_sgr(raw: &[u8]) -> bool {
    raw.windows(2)
        .enumerate()
        .filter(|(_, w)| w == b"\x1b[")
        .any(|(at, _)| {
            let rest = &raw[at + 2..];
            let end = rest.iter().position(|b| (0x40..=0x7e).contains(b));
            end.is_some_and(|end| rest[end] == b'm')
        })
}

/// `--no-color` and a non-empty `NO_COLOR` leave out every colour; line editing still works.
#[test]
fn terminal_no_color_flag_and_variable_turn_colours_off() {
    let server = start_chat_only();
    let mut bob = Chat::named(server.addr, "bob");
    for (flags, no_color) in [(&["--no-color"][..], None), (&[][..], Some("1"))] {
        let mut pty = terminal();
        let mut command = pty.command(CLIENT);
        command.args(["--port", &server.addr.port().to_string(), "--nick", "carol"]);
        command.args(flags);
        if let Some(value) = no_color {
            command.env("NO_COLOR", value);
        }
        let mut client = Client(command.spawn().expect("start client"));
        pty.wait_for_text("is now carol");
        bob.wait_for(|line| line.ends_with(" is now carol"));
        bob.send("carol: ping");
        pty.wait_for_text("<bob> carol: ping");
        pty.type_keys(b"pong\x1b[Dg\r");
        assert_eq!(bob.wait_for(|l| l.starts_with("<carol>")), "<carol> pongg");
        pty.wait_for_text("<you> pongg");
        assert!(
            !has_sgr(pty.raw()),
            "{flags:?} {no_color:?}: colour written"
        );
        pty.type_keys(b"/quit\r");
        assert!(pty.wait_exit(&mut client.0).success());
    }
    // With colours on, the same exchange writes some (so the check above can fail).
    let mut pty = terminal();
    let mut client = client_on(&pty, server.addr.port(), &["--nick", "dave"]);
    pty.wait_for_text("is now dave");
    assert!(has_sgr(pty.raw()));
    pty.type_keys(b"\x03");
    assert!(pty.wait_exit(&mut client.0).success());
}

/// A hostile server's escape sequences and control characters never reach the terminal, the
/// text around them does, and a 1 MB line is cut (with `…`) without stopping the client.
#[test]
fn terminal_hostile_server_escapes_never_reach_the_terminal() {
    let (mut pty, mut client, mut stream) = terminal_with_fake_server();
    for line in HOSTILE {
        stream.write_all(line).unwrap();
    }
    pty.wait_for_row("<eve> end of part one");
    let rows = pty.rows();
    let written = String::from_utf8_lossy(pty.raw()).into_owned();
    for shown in HOSTILE_SHOWN {
        // The name is coloured: the text after it is written in one piece.
        let text = shown.split_once("> ").map_or(*shown, |(_, text)| text);
        assert!(written.contains(text), "{text:?} not written");
        // The emulator draws nothing for U+FFFD.
        let row = shown.replace('\u{fffd}', "");
        assert!(rows.contains(&row), "{row:?} missing:\n{}", pty.contents());
    }

    stream.write_all(&overlong_line()).unwrap();
    stream.write_all(b"<eve> still here\r\n").unwrap();
    pty.wait_for_row("<eve> still here");
    let rows = pty.rows();
    let after = rows.iter().position(|r| r == "<eve> still here").unwrap();
    assert!(
        rows[after - 1].ends_with("A\u{2026}"),
        "cut: {:?}",
        rows[after - 1]
    );
    assert_nothing_hostile(pty.raw());
    assert!(
        pty.raw().len() < 100_000,
        "{} bytes written",
        pty.raw().len()
    );
    assert!(!pty.screen().contents().contains("pwned"));

    // Still working: what is typed reaches the server.
    pty.type_keys(b"still typing\r/quit\r");
    let received = serve_until_quit(stream);
    assert_eq!(received, ["still typing", "/quit"]);
    assert!(pty.wait_exit(&mut client.0).success());
}

/// `/quit` is final in terminal mode too: what is typed after it is not sent, the client exits
/// 0 on the server's close, and the terminal is back in line mode with echo.
#[test]
fn terminal_quit_is_final_exits_0_and_restores_the_terminal() {
    let (mut pty, mut client, stream) = terminal_with_fake_server();
    pty.wait_for_text("welcome, you are");
    assert!(!pty.is_canonical(), "raw mode while running");
    pty.type_keys(b"first\r/quit\rafter quit\r");
    assert_eq!(serve_until_quit(stream), ["first", "/quit"]);
    let status = pty.wait_exit(&mut client.0);
    assert!(status.success(), "{status:?}\n{}", pty.contents());
    assert!(pty.is_canonical(), "terminal restored");
    pty.wait_for_row("<you> first");
    pty.wait_for_row("* bye");
}

/// Ctrl-C (a byte in raw mode) and SIGTERM both end the client with status 0, the terminal
/// restored, and the server told (`/quit`), so the others see a normal leave.
#[test]
fn terminal_ctrl_c_and_sigterm_exit_0_and_restore_the_terminal() {
    let server = start_chat_only();
    let mut bob = Chat::named(server.addr, "bob");
    for (nick, how) in [("erin", "ctrl-c"), ("frank", "sigterm")] {
        let mut pty = terminal();
        let mut client = client_on(&pty, server.addr.port(), &["--nick", nick]);
        pty.wait_for_text(&format!("is now {nick}"));
        assert!(!pty.is_canonical());
        if how == "ctrl-c" {
            pty.type_keys(b"\x03");
        } else {
            let status = Command::new("kill")
                .args(["-TERM", &client.0.id().to_string()])
                .status()
                .expect("run kill");
            assert!(status.success());
        }
        let status = pty.wait_exit(&mut client.0);
        assert!(status.success(), "{how}: {status:?}");
        assert!(pty.is_canonical(), "{how}: terminal restored");
        bob.wait_for(|line| line == format!("* {nick} left"));
    }
}

/// SIGTERM, SIGHUP, Ctrl-C or `/quit` while the *first* connect still hangs (here it would
/// for minutes) end the client at once with status 0 and the terminal back in line mode: the
/// signals are caught and keys read before the connect, not after it.
#[test]
fn terminal_signals_and_ctrl_c_during_the_first_connect_restore_the_terminal() {
    let listener = hanging_listener();
    let port = listener.port;
    for how in ["sigterm", "sighup", "ctrl-c", "/quit"] {
        let mut pty = terminal();
        let mut client = client_on(&pty, port, &["--connect-timeout", "3600"]);
        // Raw mode is on from the start, while the connect hangs.
        pty.wait_for_raw_mode();
        assert!(
            client.0.try_wait().unwrap().is_none(),
            "{how}: the client should still be connecting:\n{}",
            pty.contents()
        );
        match how {
            "ctrl-c" => pty.type_keys(b"\x03"),
            "/quit" => pty.type_keys(b"/quit\r"),
            signal => {
                let flag = format!("-{}", &signal[3..].to_uppercase());
                let status = Command::new("kill")
                    .args([flag.as_str(), &client.0.id().to_string()])
                    .status()
                    .expect("run kill");
                assert!(status.success());
            }
        }
        let status = pty.wait_exit(&mut client.0);
        assert!(status.success(), "{how}: {status:?}\n{}", pty.contents());
        assert!(pty.is_canonical(), "{how}: terminal restored");
    }
}

/// After a server restart the client says it lost the connection, refuses to pretend lines
/// typed meanwhile were sent, reconnects by itself, says so, and has its nick back.
#[test]
fn terminal_reconnects_after_a_server_restart_and_restores_the_nick() {
    let port = free_port();
    let server = server_on(port);
    let mut pty = terminal();
    let _client = client_on(&pty, port, &["--nick", "alice", "--no-time"]);
    pty.wait_for_text("is now alice");

    drop(server); // killed
    pty.wait_for_text("reconnecting in");
    assert!(pty.contents().contains("connection lost"));
    pty.type_keys(b"while away\r");
    pty.wait_for_text("! not connected; line not sent");

    let _server = server_on(port);
    pty.wait_for_text(&format!("reconnected to 127.0.0.1:{port}"));
    pty.wait_for_output("is now alice", 2);
    let mut bob = Chat::connect(addr(port));
    bob.send("/who");
    let who = bob.wait_for(|line| line.contains(" online: "));
    assert!(who.contains("alice"), "{who}");
    pty.type_keys(b"back again\r");
    bob.wait_for(|line| line == "<alice> back again");
    pty.wait_for_row("<you> back again");
}

/// With `--no-reconnect` terminal mode exits 1 like plain mode, says why, and restores the
/// terminal.
#[test]
fn terminal_no_reconnect_exits_1_when_the_server_goes_away() {
    let server = start_chat_only();
    let mut pty = terminal();
    let mut client = client_on(&pty, server.addr.port(), &["--no-reconnect", "--no-time"]);
    pty.wait_for_text("welcome, you are");
    server.stop().unwrap();
    let status = pty.wait_exit(&mut client.0);
    assert_eq!(status.code(), Some(1), "{}", pty.contents());
    assert!(pty.is_canonical(), "terminal restored");
    pty.wait_for_text("peerchat-client: the server closed the connection");
}

/// A first connection that fails is an error in terminal mode too: exit 1 with the reason,
/// the terminal untouched.
#[test]
fn terminal_mode_exits_1_when_it_cannot_connect() {
    let mut pty = terminal();
    let mut client = client_on(&pty, free_port(), &[]);
    let status = pty.wait_exit(&mut client.0);
    assert_eq!(status.code(), Some(1));
    pty.wait_for_text("cannot connect");
    assert!(pty.is_canonical());
}
