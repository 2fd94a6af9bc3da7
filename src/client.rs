//! The terminal client: prints what the server sends, sends what the user types.
//!
//! Plain blocking sockets and two helper threads (server reader, stdin reader) that report to
//! the main thread over one channel, so the main thread can react to whichever ends first:
//! the user's input (exit 0 once the server has closed our side) or the server (exit 1).

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::Duration;

use crate::config::ClientConfig;
use crate::error::Error;
use crate::protocol::{self, Command};

/// TCP keepalive idle time on the client's socket: after its input ends the client waits for the
/// server to close, however long the server takes to work through a flood-delayed file, and
/// keepalive is what tells it the server's host is gone.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);

/// What the helper threads report.
enum Event {
    /// A line typed by the user, without its line ending.
    Typed(Vec<u8>),
    /// Standard input reached its end.
    InputEnded,
    /// The server closed the connection, or reading from it failed.
    ServerGone(Option<io::Error>),
    /// Printing what the server sent failed (e.g. stdout is a closed pipe).
    OutputFailed(io::Error),
}

/// Connects and runs until input ends, the user quits, or the server goes away.
pub fn run(config: &ClientConfig) -> Result<(), Error> {
    let addr = format!("{}:{}", config.host, config.port);
    let stream = TcpStream::connect(&addr).map_err(|source| Error::Connect {
        addr: addr.clone(),
        source,
    })?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_IDLE / 3)
        .with_retries(3);
    socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
    let (events, inbox) = mpsc::channel();
    spawn_server_reader(stream.try_clone()?, events.clone())?;
    spawn_input_reader(events)?;
    let mut writer = stream;
    if let Some(nick) = &config.nick {
        send_line(&mut writer, format!("/nick {nick}").as_bytes())?;
    }
    converse(&mut writer, &inbox)
}

fn converse(writer: &mut TcpStream, inbox: &Receiver<Event>) -> Result<(), Error> {
    let mut quitting = false;
    loop {
        let event = inbox.recv().map_err(|_| lost(None))?;
        match event {
            Event::Typed(line) => {
                // The server's own parser decides what counts as /quit (e.g. "/quit now").
                quitting = protocol::parse(&protocol::sanitize(&line)) == Command::Quit;
                if let Err(err) = send_line(writer, &line) {
                    return Err(lost(Some(err)));
                }
            }
            Event::InputEnded => {
                // Half-close: the server sees the end, answers what it still has, and closes.
                let _ = writer.shutdown(Shutdown::Write);
                return wait_for_close(inbox);
            }
            Event::ServerGone(_) if quitting => return Ok(()),
            Event::ServerGone(err) => return Err(lost(err)),
            Event::OutputFailed(err) => return Err(Error::Output(err)),
        }
    }
}

/// After our side is closed, waits for the server's last lines and its close. The server closes
/// once it has handled every line we sent, which under flood control can take a while (lines are
/// delayed, not dropped), so there is no fixed bound: keepalive ends the wait if the server's
/// host disappears.
fn wait_for_close(inbox: &Receiver<Event>) -> Result<(), Error> {
    loop {
        match inbox.recv() {
            Ok(Event::ServerGone(_)) | Err(_) => return Ok(()),
            Ok(Event::OutputFailed(err)) => return Err(Error::Output(err)),
            Ok(_) => continue,
        }
    }
}

fn send_line(writer: &mut TcpStream, line: &[u8]) -> io::Result<()> {
    let mut framed = Vec::with_capacity(line.len() + 1);
    framed.extend_from_slice(line);
    framed.push(b'\n');
    writer.write_all(&framed)
}

fn lost(err: Option<io::Error>) -> Error {
    Error::Disconnected(match err {
        Some(err) => format!("connection lost: {err}"),
        None => "the server closed the connection".to_string(),
    })
}

/// Prints each server line as it arrives (without the `\r` telnet needs).
fn spawn_server_reader(stream: TcpStream, events: Sender<Event>) -> io::Result<()> {
    thread::Builder::new()
        .name("server-reader".to_string())
        .spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            let outcome = loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) => break Event::ServerGone(None),
                    Ok(_) => {
                        if let Err(err) = print_line(&line) {
                            break Event::OutputFailed(err);
                        }
                    }
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    Err(err) => break Event::ServerGone(Some(err)),
                }
            };
            let _ = events.send(outcome);
        })?;
    Ok(())
}

/// Prints one server line without its `\r\n`, flushed so it shows at once.
fn print_line(line: &[u8]) -> io::Result<()> {
    let text = line.strip_suffix(b"\n").unwrap_or(line);
    let text = text.strip_suffix(b"\r").unwrap_or(text);
    let mut out = io::stdout().lock();
    out.write_all(text)?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Forwards each line of standard input.
fn spawn_input_reader(events: Sender<Event>) -> io::Result<()> {
    thread::Builder::new()
        .name("input-reader".to_string())
        .spawn(move || {
            let mut stdin = io::stdin().lock();
            let mut line = Vec::new();
            loop {
                line.clear();
                match stdin.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = line.strip_suffix(b"\n").unwrap_or(&line);
                        let text = text.strip_suffix(b"\r").unwrap_or(text);
                        if events.send(Event::Typed(text.to_vec())).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = events.send(Event::InputEnded);
        })?;
    Ok(())
}
