//! Terminal mode: a session with an input line, own messages echoed, and reconnects.
//!
//! One thread owns the terminal and the session state; helper threads only report, over one
//! bounded channel: keys (raw bytes from stdin), server lines (already cleaned and bounded),
//! connection outcomes, and signals. The session handles whatever is queued (a burst of server
//! lines at once) before it draws the input line again, so the terminal gets one write per
//! batch, and nothing else ever writes to it.
//!
//! Connections are numbered: events from one the session has given up on are ignored, so a
//! late line or loss report can never be taken for the current connection's.

use std::io::{self, Read};
use std::net::Shutdown;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::thread;
use std::time::Instant;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGWINCH};
use signal_hook::iterator::Signals;

use super::connection::{self, Backoff, Endpoint, LineReader};
use super::display::{self, Painter, MAX_SHOWN};
use super::editor::{Action, Editor};
use super::identity::{Change, Identity};
use super::keys::{Key, KeyParser};
use super::plain;
use super::screen::Screen;
use super::stream::ServerStream;
use super::terminal::{self, RawMode};
use crate::config::ClientConfig;
use crate::error::Error;
use crate::protocol::{self, Command};

/// Events waiting for the session; a full queue makes the server reader wait, so a flooding
/// server is slowed by TCP instead of growing the client's memory.
const EVENT_QUEUE: usize = 256;
/// Output drawn before the terminal is written to, at most: a long burst still shows as it
/// comes instead of all at its end.
const MAX_BATCH_BYTES: usize = 64 * 1024;
/// What is shown for a line typed while there is no connection. Typed lines are not queued:
/// sent minutes later they could answer a conversation that has moved on. The line stays in
/// the input history (Up) to send again.
const NOT_CONNECTED: &str = "not connected; line not sent";

/// What the helper threads report.
enum Event {
    /// Bytes typed (raw mode: keys, not lines).
    Keys(Vec<u8>),
    /// Standard input ended or failed: the terminal is gone.
    InputEnded,
    /// A clean, bounded line from connection `link`.
    Line {
        link: u64,
        text: String,
    },
    /// Connection `link` was closed (`None`) or failed.
    Lost {
        link: u64,
        error: Option<io::Error>,
    },
    Connected {
        link: u64,
        stream: ServerStream,
    },
    ConnectFailed {
        link: u64,
        error: Error,
    },
    /// SIGWINCH.
    Resized,
    /// SIGINT, SIGTERM or SIGHUP: leave, restoring the terminal.
    Stop,
}

/// The state of the connection to the server.
enum Link {
    Up {
        id: u64,
        stream: ServerStream,
    },
    Connecting {
        id: u64,
    },
    /// Lost; the next attempt starts at `retry_at`.
    Waiting {
        retry_at: Instant,
    },
}

/// Whether the session goes on after an event.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    /// Leave with status 0.
    Stop,
}

/// Runs the session in raw mode until the user leaves or (with `--no-reconnect`) the server
/// goes away. A first connect that fails is an error (exit 1): only a connection that once
/// worked is worth retrying.
///
/// Signals are caught before raw mode starts, and keys are read as soon as it has: the first
/// connect runs on a thread like every reconnect, so SIGTERM, Ctrl-C or `/quit` while it waits
/// (up to `--connect-timeout`) end the session normally, with the terminal restored, instead of
/// killing the client in raw mode or being ignored until the connect returns. Keys typed
/// meanwhile are edited on the input line, not echoed by the terminal.
pub fn run(config: &ClientConfig, endpoint: Endpoint, painter: Painter) -> Result<(), Error> {
    let (events, inbox) = mpsc::sync_channel(EVENT_QUEUE);
    spawn_signal_listener(events.clone())?;
    let raw_mode = RawMode::enter()?;
    spawn_key_reader(events.clone())?;
    let mut session = Session::new(config, endpoint, painter, terminal::width(), events);
    let result = session
        .start_connecting()
        .and_then(|()| session.run(&inbox));
    drop(raw_mode);
    result
}

struct Session<'a> {
    config: &'a ClientConfig,
    /// Where to (re)connect, and with TLS or not.
    endpoint: Endpoint,
    painter: Painter,
    screen: Screen,
    editor: Editor,
    keys: KeyParser,
    me: Identity,
    link: Link,
    next_id: u64,
    backoff: Backoff,
    /// We said goodbye (`/quit` or end of input): the server's close ends the session.
    quitting: bool,
    /// A connection has worked: until then a failed connect ends the session (exit 1) instead
    /// of being retried.
    connected_once: bool,
    /// For the threads the session starts (server readers, connectors).
    events: SyncSender<Event>,
}

impl<'a> Session<'a> {
    fn new(
        config: &'a ClientConfig,
        endpoint: Endpoint,
        painter: Painter,
        width: usize,
        events: SyncSender<Event>,
    ) -> Self {
        Session {
            config,
            endpoint,
            painter,
            screen: Screen::new(width),
            editor: Editor::default(),
            keys: KeyParser::default(),
            me: Identity::new(config.nick.clone()),
            // Until `start_connecting` starts the first connect.
            link: Link::Waiting {
                retry_at: Instant::now(),
            },
            next_id: 0,
            backoff: Backoff::unpredictable(),
            quitting: false,
            connected_once: false,
            events,
        }
    }

    /// Runs until the end, then takes the input line off the screen so the shell's prompt
    /// starts on a clean row.
    fn run(&mut self, inbox: &Receiver<Event>) -> Result<(), Error> {
        let result = self.converse(inbox);
        self.screen.clear_input();
        let flushed = self.screen.flush(&mut io::stdout().lock());
        result.and(flushed.map_err(Error::Output))
    }

    fn converse(&mut self, inbox: &Receiver<Event>) -> Result<(), Error> {
        self.draw()?;
        loop {
            let first = self.next_event(inbox)?;
            if self.handle(first)? == Flow::Stop {
                return Ok(());
            }
            while self.screen.pending() < MAX_BATCH_BYTES {
                let Ok(event) = inbox.try_recv() else {
                    break;
                };
                if self.handle(event)? == Flow::Stop {
                    return Ok(());
                }
            }
            self.draw()?;
        }
    }

    /// The next event; while waiting to reconnect, starts the attempt when its time comes.
    fn next_event(&mut self, inbox: &Receiver<Event>) -> Result<Event, Error> {
        loop {
            let received = match self.link {
                Link::Waiting { retry_at } => {
                    match inbox.recv_timeout(retry_at.saturating_duration_since(Instant::now())) {
                        Err(RecvTimeoutError::Timeout) => {
                            self.start_connecting()?;
                            continue;
                        }
                        other => other.ok(),
                    }
                }
                _ => inbox.recv().ok(),
            };
            // The session holds a sender itself, so the channel cannot close under it.
            return received.ok_or_else(|| Error::Io(io::Error::other("event channel closed")));
        }
    }

    fn handle(&mut self, event: Event) -> Result<Flow, Error> {
        match event {
            Event::Keys(bytes) => {
                for key in self.keys.feed(&bytes) {
                    if self.key(key)? == Flow::Stop {
                        return Ok(Flow::Stop);
                    }
                }
            }
            Event::InputEnded => return Ok(Flow::Stop),
            Event::Stop => {
                self.say_goodbye();
                return Ok(Flow::Stop);
            }
            Event::Resized => self.screen.set_width(terminal::width()),
            Event::Line { link, text } if self.is_current(link) => self.server_line(&text),
            Event::Lost { link, error } if self.is_current(link) => return self.lost(error),
            Event::Connected { link, stream } if self.is_current(link) => {
                self.attach(link, stream)?;
                if self.connected_once {
                    let (host, port) = (&self.endpoint.host, self.endpoint.port);
                    self.notice(&format!("reconnected to {host}:{port}"));
                }
                self.connected_once = true;
            }
            Event::ConnectFailed { link, error } if self.is_current(link) => {
                if !self.connected_once {
                    return Err(error);
                }
                let reason = connect_failure(error);
                self.wait_to_reconnect(&format!("cannot reconnect ({reason})"), "retrying");
            }
            // From a connection given up on.
            Event::Line { .. }
            | Event::Lost { .. }
            | Event::Connected { .. }
            | Event::ConnectFailed { .. } => {}
        }
        Ok(Flow::Continue)
    }

    fn is_current(&self, link: u64) -> bool {
        match self.link {
            Link::Up { id, .. } | Link::Connecting { id } => id == link,
            Link::Waiting { .. } => false,
        }
    }

    fn key(&mut self, key: Key) -> Result<Flow, Error> {
        // After `/quit` nothing more is sent, however much is typed; Ctrl-C still leaves.
        if self.quitting && key != Key::Interrupt {
            return Ok(Flow::Continue);
        }
        match self.editor.apply(key) {
            Action::Edit => Ok(Flow::Continue),
            Action::Submit(line) => self.submit(&line),
            Action::EndOfInput => Ok(self.end_input()),
            Action::Interrupt => {
                self.say_goodbye();
                Ok(Flow::Stop)
            }
        }
    }

    /// Sends a typed line and shows it as the others will see it.
    fn submit(&mut self, line: &str) -> Result<Flow, Error> {
        if line.trim().is_empty() {
            return Ok(Flow::Continue);
        }
        let quit = matches!(protocol::parse(line), Command::Quit);
        let Link::Up { stream, .. } = &mut self.link else {
            if quit {
                return Ok(Flow::Stop);
            }
            self.error(NOT_CONNECTED);
            return Ok(Flow::Continue);
        };
        if let Err(err) = connection::send_line(stream, line.as_bytes()) {
            if quit {
                // The user asked to leave: a goodbye the server cannot get changes nothing.
                return Ok(Flow::Stop);
            }
            self.error(NOT_CONNECTED);
            return self.lost(Some(err));
        }
        self.quitting = quit;
        if let Some(echo) = display::echo(line) {
            let shown = self.painter.own_line(&echo);
            self.screen.print_line(&shown);
        }
        Ok(Flow::Continue)
    }

    /// Ctrl-D on an empty line: like the end of a piped file, the server answers what it has
    /// and closes.
    fn end_input(&mut self) -> Flow {
        match &self.link {
            Link::Up { stream, .. } => {
                let _ = stream.shutdown(Shutdown::Write);
                self.quitting = true;
                Flow::Continue
            }
            _ => Flow::Stop,
        }
    }

    /// Leaving at once (Ctrl-C, a signal): a `/quit` so the others see a normal leave.
    fn say_goodbye(&mut self) {
        if let Link::Up { stream, .. } = &mut self.link {
            let _ = connection::send_line(stream, b"/quit");
        }
    }

    fn server_line(&mut self, text: &str) {
        if self.me.observe(text) == Some(Change::Welcomed) {
            // The server took us in: the next loss starts the backoff from 1 s again.
            self.backoff.reset();
        }
        let shown = self.painter.server_line(text, self.me.nick());
        self.screen.print_line(&shown);
    }

    /// The server went away: the end after a goodbye, an error with `--no-reconnect`, else
    /// a reconnect after the backoff.
    fn lost(&mut self, error: Option<io::Error>) -> Result<Flow, Error> {
        if self.quitting {
            return Ok(Flow::Stop);
        }
        if let Link::Up { stream, .. } = &self.link {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let reason = match &error {
            Some(err) => err.to_string(),
            None => "closed by the server".to_string(),
        };
        if !self.config.reconnect {
            return Err(plain::lost(error));
        }
        self.wait_to_reconnect(&format!("connection lost ({reason})"), "reconnecting");
        Ok(Flow::Continue)
    }

    fn wait_to_reconnect(&mut self, what: &str, next: &str) {
        let delay = self.backoff.next_delay();
        self.link = Link::Waiting {
            retry_at: Instant::now() + delay,
        };
        self.notice(&format!("{what}; {next} in {:.1} s", delay.as_secs_f64()));
    }

    /// Starts a connect (the first one or a reconnect) on a thread of its own, so keys, `/quit`
    /// and signals work while it waits.
    fn start_connecting(&mut self) -> Result<(), Error> {
        let id = self.next_id;
        self.next_id += 1;
        self.link = Link::Connecting { id };
        let endpoint = self.endpoint.clone();
        let events = self.events.clone();
        thread::Builder::new()
            .name("connector".to_string())
            .spawn(move || {
                let event = match endpoint.connect() {
                    Ok(stream) => Event::Connected { link: id, stream },
                    Err(error) => Event::ConnectFailed { link: id, error },
                };
                let _ = events.send(event);
            })?;
        Ok(())
    }

    /// Starts reading connection `id` and asks for our nick on it.
    fn attach(&mut self, id: u64, mut stream: ServerStream) -> Result<(), Error> {
        spawn_server_reader(id, stream.try_clone()?, self.events.clone())?;
        if let Some(nick) = self.me.wanted() {
            // A failure shows up as the reader's loss report.
            let _ = connection::send_line(&mut stream, format!("/nick {nick}").as_bytes());
        }
        self.link = Link::Up { id, stream };
        Ok(())
    }

    fn notice(&mut self, text: &str) {
        let line = self.painter.notice(text);
        self.screen.print_line(&line);
    }

    fn error(&mut self, text: &str) {
        let line = self.painter.error(text);
        self.screen.print_line(&line);
    }

    fn draw(&mut self) -> Result<(), Error> {
        self.screen.draw_input(&self.editor);
        self.screen
            .flush(&mut io::stdout().lock())
            .map_err(Error::Output)
    }
}

/// Why a reconnect attempt failed, without repeating the address the notice already names.
fn connect_failure(err: Error) -> String {
    match err {
        Error::Connect { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// Reads connection `link` until it ends, sending each line cleaned and bounded.
fn spawn_server_reader(
    link: u64,
    stream: ServerStream,
    events: SyncSender<Event>,
) -> io::Result<()> {
    thread::Builder::new()
        .name("server-reader".to_string())
        .spawn(move || {
            let mut reader = LineReader::new(stream, MAX_SHOWN);
            let error = loop {
                match reader.next_line() {
                    Ok(Some(line)) => {
                        let text = display::clean(&line);
                        if events.send(Event::Line { link, text }).is_err() {
                            return;
                        }
                    }
                    Ok(None) => break None,
                    Err(err) => break Some(err),
                }
            };
            let _ = events.send(Event::Lost { link, error });
        })?;
    Ok(())
}

/// Forwards raw key bytes as they come.
fn spawn_key_reader(events: SyncSender<Event>) -> io::Result<()> {
    thread::Builder::new()
        .name("key-reader".to_string())
        .spawn(move || {
            let mut stdin = io::stdin().lock();
            let mut buffer = [0u8; 4096];
            loop {
                match stdin.read(&mut buffer) {
                    Ok(0) => break,
                    Ok(n) => {
                        if events.send(Event::Keys(buffer[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            let _ = events.send(Event::InputEnded);
        })?;
    Ok(())
}

/// Turns SIGINT/SIGTERM/SIGHUP into a normal end (the terminal is restored on the way out)
/// and SIGWINCH into a redraw at the new width.
fn spawn_signal_listener(events: SyncSender<Event>) -> io::Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP, SIGWINCH])?;
    thread::Builder::new()
        .name("signals".to_string())
        .spawn(move || {
            for signal in signals.forever() {
                let event = if signal == SIGWINCH {
                    Event::Resized
                } else {
                    Event::Stop
                };
                if events.send(event).is_err() {
                    return;
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::net::{TcpListener, TcpStream};

    use super::*;
    use crate::config::{parse_client_args, Parsed};

    fn config() -> ClientConfig {
        match parse_client_args(Vec::<OsString>::new()) {
            Ok(Parsed::Run(config)) => config,
            other => panic!("expected a config, got {other:?}"),
        }
    }

    /// A connection on which every send fails at once (our own side is shut for writing, so
    /// the write is refused with EPIPE, as after the server's reset).
    fn broken_link() -> (Link, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (peer, _) = listener.accept().unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let stream = ServerStream::plain(stream);
        (Link::Up { id: 0, stream }, peer)
    }

    fn connected_session(config: &ClientConfig, link: Link) -> Session<'_> {
        let (events, _inbox) = mpsc::sync_channel(EVENT_QUEUE);
        let endpoint = Endpoint::new(config).unwrap();
        let painter = Painter::new(false, None);
        let mut session = Session::new(config, endpoint, painter, 80, events);
        session.link = link;
        session.connected_once = true;
        session
    }

    /// `/quit` ends the session even when it cannot be sent: the user asked to leave, so the
    /// client must not go on to reconnect.
    #[test]
    fn quit_is_final_even_when_sending_it_fails() {
        let config = config();
        assert!(config.reconnect);
        for quit in ["/quit", "/quit now"] {
            let (link, _peer) = broken_link();
            let mut session = connected_session(&config, link);
            assert_eq!(session.submit(quit).unwrap(), Flow::Stop, "{quit:?}");
        }
        // Any other line that cannot be sent is a lost connection: wait, then reconnect.
        let (link, _peer) = broken_link();
        let mut session = connected_session(&config, link);
        assert_eq!(session.submit("hello").unwrap(), Flow::Continue);
        assert!(matches!(session.link, Link::Waiting { .. }));
    }
}
