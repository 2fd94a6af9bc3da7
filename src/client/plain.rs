//! Plain mode, when standard input or output is not a terminal: a line pipe for scripts and
//! tests. Every input line is sent as it is (nothing after `/quit`), every server line printed
//! as it came minus its `\r\n`, cleaned and bounded (stdout may still be a terminal), with no
//! time and no colour. When the server goes away the client exits 1; at the end of its input
//! it half-closes and waits for the server to close, then exits 0.
//!
//! Two helper threads (server reader, stdin reader) report to the main thread over one bounded
//! channel, so the main thread reacts to whichever ends first.

use std::io::{self, BufRead, Write};
use std::net::Shutdown;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread;

use super::connection::{self, Endpoint, LineReader};
use super::display::{self, MAX_SHOWN};
use super::stream::ServerStream;
use crate::config::ClientConfig;
use crate::error::Error;
use crate::protocol::{self, Command};

/// Input lines read ahead of the socket. The socket is what paces a long file (the server
/// reads a flooding client slowly); without a bound the reader would hold all of it.
const READ_AHEAD: usize = 64;

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
pub fn run(config: &ClientConfig, endpoint: &Endpoint) -> Result<(), Error> {
    let stream = endpoint.connect()?;
    let (events, inbox) = mpsc::sync_channel(READ_AHEAD);
    spawn_server_reader(stream.try_clone()?, events.clone())?;
    spawn_input_reader(events)?;
    let mut writer = stream;
    if let Some(nick) = &config.nick {
        connection::send_line(&mut writer, format!("/nick {nick}").as_bytes())?;
    }
    converse(&mut writer, &inbox)
}

fn converse(writer: &mut ServerStream, inbox: &Receiver<Event>) -> Result<(), Error> {
    let mut quitting = false;
    loop {
        let event = inbox.recv().map_err(|_| lost(None))?;
        match event {
            // `/quit` is final: whatever follows it in the input is not the user's to send.
            Event::Typed(_) | Event::InputEnded if quitting => {}
            Event::Typed(line) => {
                // The server's own parser decides what counts as /quit (e.g. "/quit now").
                quitting = protocol::parse(&protocol::sanitize(&line)) == Command::Quit;
                if let Err(err) = connection::send_line(writer, &line) {
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

/// Why the client stops when the server goes away.
pub fn lost(err: Option<io::Error>) -> Error {
    Error::Disconnected(match err {
        Some(err) => format!("connection lost: {err}"),
        None => "the server closed the connection".to_string(),
    })
}

/// Prints each server line as it arrives.
fn spawn_server_reader(stream: ServerStream, events: SyncSender<Event>) -> io::Result<()> {
    thread::Builder::new()
        .name("server-reader".to_string())
        .spawn(move || {
            let mut reader = LineReader::new(stream, MAX_SHOWN);
            let outcome = loop {
                match reader.next_line() {
                    Ok(None) => break Event::ServerGone(None),
                    Ok(Some(line)) => {
                        if let Err(err) = print_line(&display::plain(&line)) {
                            break Event::OutputFailed(err);
                        }
                    }
                    Err(err) => break Event::ServerGone(Some(err)),
                }
            };
            let _ = events.send(outcome);
        })?;
    Ok(())
}

/// Prints one line, flushed so it shows at once.
pub fn print_line(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Forwards each line of standard input.
fn spawn_input_reader(events: SyncSender<Event>) -> io::Result<()> {
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
