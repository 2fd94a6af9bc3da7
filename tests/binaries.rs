//! The built binaries, run as a user would: flags, exit codes, piped input.

mod common;

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use common::process::{
    run_bounded, run_with_args, spawn_piped_client, spawn_server, CLIENT, SERVER,
};
use common::{alice_and_bob, free_port, start_chat_only, Chat, TestDb, DEADLINE};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_lists_every_flag_and_version_prints() {
    let help = run_with_args(SERVER, &["--help"]);
    assert!(help.status.success());
    let stdout = text(&help.stdout);
    for flag in [
        "--host",
        "--port",
        "--max-line",
        "--mongo-uri",
        "--no-persist",
        "default",
    ] {
        assert!(stdout.contains(flag), "{flag} missing from server --help");
    }
    let help = run_with_args(CLIENT, &["--help"]);
    assert!(help.status.success());
    for flag in ["--host", "--port", "--nick"] {
        assert!(
            text(&help.stdout).contains(flag),
            "{flag} missing from client --help"
        );
    }
    let version = run_with_args(SERVER, &["--version"]);
    assert!(text(&version.stdout).starts_with("peerchat-server "));
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    for (exe, args, flag) in [
        (SERVER, &["--port", "seventy"][..], "--port"),
        (SERVER, &["--max-line", "0"][..], "--max-line"),
        (SERVER, &["--frobnicate"][..], "--frobnicate"),
        (CLIENT, &["--port"][..], "--port"),
        (CLIENT, &["--colour", "red"][..], "--colour"),
    ] {
        let out = run_with_args(exe, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    }
}

/// The server binary on port 0: its log names the address and backlog, and it serves chat.
#[test]
fn server_binary_logs_its_address_and_serves() {
    let (server, addr) = spawn_server("", "--no-persist");
    assert!(
        server
            .listening
            .ends_with(&format!(" INFO  listening on {addr} (backlog 1024)")),
        "{}",
        server.listening
    );
    let (mut alice, mut bob) = alice_and_bob(addr);
    alice.send("via the binary");
    assert_eq!(bob.line(), "<alice> via the binary");
}

/// `--backlog` sets the listen queue; the system's somaxconn caps it, and the start line says
/// what is in force.
#[test]
fn the_backlog_is_set_and_capped_by_the_system() {
    let (server, addr) = spawn_server("", "--no-persist --backlog 64");
    assert!(server
        .listening
        .ends_with(&format!("listening on {addr} (backlog 64)")));
    // The kernel's own view: for a listening socket, `ss` shows the backlog as Send-Q.
    let ss = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{}", addr.port())])
        .output()
        .expect("run ss (iproute2) to read the listen backlog");
    let listing = text(&ss.stdout);
    let send_q = listing.split_whitespace().nth(2);
    assert_eq!(send_q, Some("64"), "ss: {listing}");
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .expect("read somaxconn")
        .trim()
        .parse()
        .unwrap();
    if somaxconn < 65535 {
        let (server, addr) = spawn_server("", "--no-persist --backlog 65535");
        assert!(
            server
                .listening
                .ends_with(&format!("listening on {addr} (backlog {somaxconn})")),
            "{}",
            server.listening
        );
    }
}

/// Per-connection log lines are debug level, and the log is written by a thread of its own:
/// a stderr pipe nobody reads (a wedged log shipper) must not stop the chat.
#[test]
fn a_log_nobody_reads_never_stops_the_chat() {
    let port = free_port();
    let mut child = Command::new(SERVER)
        .args([
            "--port",
            &port.to_string(),
            "--no-persist",
            "--flood-rate",
            "0",
        ])
        .args(["--log-level", "debug"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start server");
    let stderr = child.stderr.take().unwrap(); // held open, not read: the pipe fills up
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let _server = common::process::ServerProcess::adopt(child);
    let deadline = std::time::Instant::now() + DEADLINE;
    while TcpStream::connect(addr).is_err() {
        assert!(std::time::Instant::now() < deadline, "server did not start");
        thread::sleep(Duration::from_millis(20));
    }
    // Two debug lines of ~100 bytes each per connection: far more than a 64 KiB pipe holds.
    for _ in 0..2000 {
        let mut chat = Chat::connect(addr);
        chat.send("/quit");
        chat.read_to_end();
    }
    let (mut alice, mut bob) = alice_and_bob(addr);
    alice.send("still chatting");
    assert_eq!(bob.line(), "<alice> still chatting");

    // Once someone reads the log again, it says how many lines it had to drop.
    let (found, report) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let lines = std::io::BufReader::new(stderr).lines();
        let dropped = lines
            .map_while(Result::ok)
            .find(|line| line.contains("log lines dropped"));
        let _ = found.send(dropped);
    });
    let dropped = report
        .recv_timeout(DEADLINE)
        .expect("the log reports dropped lines once it is read again")
        .expect("a dropped-lines report");
    assert!(dropped.contains(" WARN  "), "{dropped}");
}

/// `peerchat-client < file` with more lines than flood control lets through at once: every
/// line arrives, in order, and the client waits for the server to finish before it exits.
#[test]
fn client_piping_a_long_file_delivers_every_line_before_exiting() {
    const LINES: usize = 160; // 40 at once, the rest at 20/s: about 6 s
    let server = start_chat_only(); // default flood control
    let mut watcher = Chat::named(server.addr, "watcher");
    let mut client = spawn_piped_client(server.addr.port(), &["--nick", "piper"]);
    let file: String = (1..=LINES).map(|n| format!("{n}\n")).collect();
    let mut stdin = client.stdin.take().unwrap();
    stdin.write_all(file.as_bytes()).unwrap();
    stdin.write_all(b"/who\n").unwrap();
    drop(stdin);
    watcher.wait_for(|line| line.ends_with("is now piper"));
    for n in 1..=LINES {
        assert_eq!(watcher.line(), format!("<piper> {n}"));
    }
    assert_eq!(watcher.line(), "* piper left");
    let out = run_bounded(client);
    assert!(out.status.success(), "exit {:?}", out.status);
    let stdout = text(&out.stdout);
    assert!(
        stdout.lines().any(|line| line.starts_with("* 2 online: ")),
        "the answer to the last line, sent after the server worked through the file: {stdout}"
    );
}

#[test]
fn client_sends_piped_input_prints_what_arrives_and_exits_0() {
    let server = start_chat_only();
    let mut watcher = Chat::named(server.addr, "watcher");
    let mut client = spawn_piped_client(server.addr.port(), &["--nick", "piper"]);
    let mut stdin = client.stdin.take().unwrap();
    stdin
        .write_all(b"first line from a file\nsecond line\r\n/who\n")
        .unwrap();
    drop(stdin); // end of input

    watcher.wait_for(|line| line.ends_with("is now piper"));
    assert_eq!(watcher.line(), "<piper> first line from a file");
    assert_eq!(watcher.line(), "<piper> second line");
    assert_eq!(watcher.line(), "* piper left");

    let out = run_bounded(client);
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("* welcome, you are 127.0.0.1:"),
        "{stdout}"
    );
    assert!(
        lines.iter().any(|l| l.ends_with("is now piper")),
        "{stdout}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("* 2 online: ")),
        "{stdout}"
    );
    assert!(!stdout.contains('\r'), "the client strips CR");
}

#[test]
fn client_quit_exits_0() {
    let server = start_chat_only();
    for quit in ["/quit\n", "/quit see you\n"] {
        let mut client = spawn_piped_client(server.addr.port(), &[]);
        // /quit with stdin still open: the client must exit on the server's close alone.
        let mut stdin = client.stdin.take().unwrap();
        stdin.write_all(quit.as_bytes()).unwrap();
        let out = run_bounded(client);
        drop(stdin);
        assert!(out.status.success(), "{quit:?}: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains("* bye"));
    }
}

#[test]
fn client_fails_when_no_server_listens() {
    let port = free_port().to_string();
    let out = run_with_args(CLIENT, &["--port", &port]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot connect"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn client_fails_when_the_server_goes_away() {
    let server = start_chat_only();
    let mut client = spawn_piped_client(server.addr.port(), &[]); // stdin stays open: still typing
    let mut stdout = client.stdout.take().unwrap();
    let mut first = [0u8; 9];
    stdout.read_exact(&mut first).unwrap(); // "* welcome"
    server.stop().unwrap();
    let out = run_bounded(client);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("closed the connection"), "{stderr}");
}

/// Reads a welcome line within `wait`, if one comes.
fn welcomed(stream: &mut TcpStream, wait: Duration) -> bool {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut first = [0u8; 9];
    stream.read_exact(&mut first).is_ok() && &first == b"* welcome"
}

/// Out of file descriptors, the server stops accepting without spinning; clients waiting in
/// the backlog must be let in once descriptors are free again, without a further connection to
/// prompt it. The limit is lowered under the running server (as other use of descriptors would),
/// because at start the server sizes `--max-clients` to fit its limit.
#[test]
fn clients_waiting_while_descriptors_ran_out_get_in_when_some_are_freed() {
    let (server, addr) = spawn_server("", "--no-persist");
    let open = std::fs::read_dir(format!("/proc/{}/fd", server.id()))
        .expect("list the server's descriptors")
        .count();
    let limit = format!("--nofile={0}:{0}", open + 4);
    let status = Command::new("prlimit")
        .args(["--pid", &server.id().to_string(), &limit])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success(), "prlimit failed");

    let mut clients: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(addr).expect("connect (the kernel queues it)"))
        .collect();
    let mut waiting = Vec::new();
    let mut admitted = Vec::new();
    for mut client in clients.drain(..) {
        if welcomed(&mut client, Duration::from_millis(300)) {
            admitted.push(client);
        } else {
            waiting.push(client);
        }
    }
    assert!(
        !admitted.is_empty() && !waiting.is_empty(),
        "the limit must bite"
    );
    // With clients waiting and no descriptor free, the loop must not retry accept flat out.
    let ticks = server.cpu_ticks();
    std::thread::sleep(Duration::from_secs(2));
    let used = server.cpu_ticks() - ticks;
    assert!(
        used < 100,
        "the server used {used} of 200 CPU ticks in 2 s while out of descriptors"
    );
    // Closing the admitted clients frees as many descriptors; the backlog is first in, first
    // out, so that many of the waiting clients, oldest first, must now get in.
    let freed = admitted.len().min(waiting.len());
    drop(admitted);
    for (n, client) in waiting.iter_mut().take(freed).enumerate() {
        assert!(
            welcomed(client, DEADLINE),
            "waiting client {n} of {freed} was never accepted"
        );
    }
}

/// Started with a soft open-file limit far below `--max-clients`, the server raises it to the
/// hard limit and serves them all; one more is told the server is full and closed, and gets in
/// once someone leaves.
#[test]
fn max_clients_are_served_and_one_more_is_told_the_server_is_full() {
    let (_server, addr) = spawn_server("ulimit -S -n 80 &&", "--no-persist --max-clients 100");
    let mut clients: Vec<TcpStream> = Vec::new();
    for n in 0..100 {
        let mut client = TcpStream::connect(addr).expect("connect");
        assert!(
            welcomed(&mut client, DEADLINE),
            "client {n} of 100 not let in"
        );
        clients.push(client);
    }
    let mut extra = TcpStream::connect(addr).expect("connect");
    extra.write_all(b"let me in\n").unwrap();
    extra.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut answer = String::new();
    extra
        .read_to_string(&mut answer)
        .expect("answer, then end of stream");
    assert_eq!(answer, "! server full (100 clients); try again later\r\n");

    drop(clients.pop());
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let mut again = TcpStream::connect(addr).expect("connect");
        if welcomed(&mut again, DEADLINE) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no one got in after a client left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The talker stays at most `WINDOW` lines ahead of the reader, so only the client that never
/// reads can pile up output.
///
/// Runs the binary to measure its peak memory: 64 MB of chat flows, the stuck client may hold
/// at most 1 MiB of it (plus socket buffers), so the server stays far below 128 MB.
#[test]
fn a_client_that_never_reads_is_disconnected_and_others_keep_receiving() {
    const LINES: usize = 16_000; // 64 MB: far more than socket buffers plus the 1 MiB output limit
    const WINDOW: usize = 100;
    let (server, addr) = spawn_server("", "--no-persist --flood-rate 0");
    let mut stuck = Chat::named(addr, "stuck");
    let mut talker = Chat::named(addr, "talker");
    let mut reader = Chat::named(addr, "reader");
    stuck.sync();
    talker.sync();
    let (progress, received) = std::sync::mpsc::channel();
    let reader_thread = thread::spawn(move || {
        let mut chat_lines = 0;
        let mut saw_left = false;
        while chat_lines < LINES {
            let got = reader.line();
            if got == "* stuck left" {
                saw_left = true;
                continue;
            }
            assert_eq!(got.len(), "<talker> ".len() + 4000);
            chat_lines += 1;
            if chat_lines % WINDOW == 0 {
                progress.send(chat_lines).unwrap();
            }
        }
        saw_left || reader.wait_for(|l| l == "* stuck left") == "* stuck left"
    });
    let line = "x".repeat(4000);
    let mut acknowledged = 0;
    for sent in 0..LINES {
        while sent >= acknowledged + 2 * WINDOW {
            acknowledged = received.recv_timeout(DEADLINE).expect("reader progress");
        }
        talker.send(&line);
    }
    assert!(
        reader_thread.join().expect("reader"),
        "others are told the slow client left"
    );
    let stuck_addr = stuck.local_addr();
    let seen = stuck.read_to_end();
    assert!(
        seen.len() < LINES,
        "the stuck client cannot have received everything"
    );
    let logged = server.wait_for_log(|line| line.contains("slow consumer"));
    assert!(
        logged.contains(&format!("client {stuck_addr} (stuck) disconnected")),
        "{logged}"
    );
    let peak_kib = server.memory_kib("VmHWM");
    assert!(
        peak_kib < 128 * 1024,
        "server peak RSS {peak_kib} KiB while 64 MB of chat flowed"
    );
}

/// SIGTERM right after a burst: clients are told, every accepted message is stored, the log
/// says so, exit 0.
#[test]
fn sigterm_stores_every_accepted_message_and_exits_0() {
    let db = TestDb::start();
    let flags = format!(
        "--mongo-uri '{}' --mongo-db '{}' --flood-rate 0",
        db.uri, db.database
    );
    let (mut server, addr) = spawn_server("", &flags);
    let (mut alice, mut bob) = alice_and_bob(addr);
    let mut burst = Vec::new();
    for n in 0..500 {
        burst.extend_from_slice(format!("burst message {n}\n").as_bytes());
    }
    alice.send_bytes(&burst);
    assert_eq!(
        bob.wait_for(|line| line.ends_with("burst message 499")),
        "<alice> burst message 499"
    );
    server.signal("-TERM");
    assert!(bob
        .read_to_end()
        .contains(&"* server shutting down".to_string()));
    server
        .wait_for_log(|line| line.contains("persistence stopped: 500 messages saved, 0 not saved"));
    assert_eq!(server.wait_exit(), Some(0), "clean exit");
    let stored = db.stored();
    assert_eq!(
        stored.len(),
        500,
        "every accepted message stored before exit"
    );
}

/// A client that was not reading when the server stopped still gets everything queued for it,
/// then the goodbye: the server waits for it (within --shutdown-timeout) rather than writing
/// once and closing. 32 MB is more than loopback socket buffers can hold.
#[test]
fn shutdown_waits_for_a_slow_reader_to_take_its_last_output() {
    const LINES: usize = 8_000;
    let flags = "--no-persist --flood-rate 0 --max-output 67108864";
    let (mut server, addr) = spawn_server("", flags);
    let (mut alice, bob) = alice_and_bob(addr);
    let line = "z".repeat(4000);
    for _ in 0..LINES {
        alice.send(&line);
    }
    alice.sync(); // every line read and queued for bob, who has read none of them
    server.signal("-TERM");
    let mut bob = bob.into_stream();
    bob.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut received = Vec::new();
    bob.read_to_end(&mut received)
        .expect("read until the server closes");
    let text = String::from_utf8(received).unwrap();
    let chat_lines = text
        .lines()
        .filter(|l| l.starts_with("<alice> zzz"))
        .count();
    assert_eq!(chat_lines, LINES, "every queued line delivered");
    assert!(text.ends_with("* server shutting down\r\n"), "goodbye last");
    assert_eq!(server.wait_exit(), Some(0));
}

/// With the database hung, a stop waits --shutdown-timeout for the queue to be stored, logs how
/// many messages are unconfirmed, and exits 0. (The hung batch's own watchdog is 15 s here, so
/// only the shutdown timeout can end the wait this early.)
#[test]
fn shutdown_timeout_bounds_the_wait_for_a_hung_database() {
    let db = TestDb::start_own();
    let flags = format!(
        "--mongo-uri '{}' --mongo-db '{}' --mongo-timeout-ms 5000 --shutdown-timeout 1",
        db.uri, db.database
    );
    let (mut server, addr) = spawn_server("", &flags);
    let (mut alice, mut bob) = alice_and_bob(addr);
    alice.send("stored");
    db.wait_for_stored(1);
    db.freeze();
    for n in 0..5 {
        alice.send(&format!("hung {n}"));
    }
    assert_eq!(bob.wait_for(|l| l.ends_with("hung 4")), "<alice> hung 4");
    let stopping = std::time::Instant::now();
    server.signal("-TERM");
    let line = server.wait_for_log(|line| line.contains("not confirmed stored"));
    assert!(line.contains(" 5 accepted messages"), "{line}");
    assert_eq!(server.wait_exit(), Some(0));
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(8), "stopping took {took:?}");
    db.thaw();
}

/// A client that never reads holds output the server cannot write before --shutdown-timeout;
/// it must not cost persistence its time: what was accepted is stored and counted.
#[test]
fn a_client_that_never_reads_does_not_hold_up_storing_at_shutdown() {
    let db = TestDb::start();
    let flags = format!(
        "--mongo-uri '{}' --mongo-db '{}' --flood-rate 0 --shutdown-timeout 8 --max-output 67108864",
        db.uri, db.database
    );
    let (mut server, addr) = spawn_server("", &flags);
    let (mut alice, mut bob) = alice_and_bob(addr);
    let _stuck = Chat::named(addr, "stuck");
    let line = "s".repeat(4000);
    for _ in 0..4000 {
        alice.send(&line); // 16 MB: far more than the stuck client's socket takes
    }
    bob.wait_for(|l| l.ends_with(" is now stuck"));
    for _ in 0..4000 {
        bob.wait_for(|l| l.starts_with("<alice> sss"));
    }
    server.signal("-TERM");
    let stopped =
        server.wait_for_log(|l| l.contains("persistence stopped") || l.contains("still busy"));
    assert!(
        stopped.contains("persistence stopped: 4000 messages saved, 0 not saved"),
        "{stopped}"
    );
    assert_eq!(server.wait_exit(), Some(0));
}
