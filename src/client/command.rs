//! `--command CMD`: connect, send one line, print the server's reply, exit; for scripts and
//! health checks. Exit 0, or 1 when the client cannot connect, the reply has an error line
//! (`! …`), or no complete reply comes within `REPLY_DEADLINE`. Never terminal mode.
//!
//! The reply must be told apart from everything else the server sends: the welcome, the join
//! history (`* [time] <nick> text` … `* end of history (N messages)`, the same shape as a
//! `/history` reply), and lines from other users. The server answers one client's lines in
//! order and holds a joiner's later output behind its join history, so the client sends
//! `/who` first: everything up to and including the `/who` reply (`protocol::who`) comes
//! before the reply, everything after it is the reply, up to the goodbye (`* bye`) for the
//! `/quit` sent last. Chat and presence notices from others that arrive in that short window
//! are recognised by their exact formats and left out (another user's `/me` cannot be told
//! from a notice, so it would be printed).
//!
//! One exception: the server places a `/history` answer when the database gives it, not in
//! line, and a `/quit` handled before it arrives drops it. So for `/history` the `/quit` is
//! sent only after the answer's end line (or its error) has arrived.
//!
//! [`Reply`] decides what each line is (pure, unit-tested); [`run`] does the I/O.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::connection::{self, Endpoint, LineReader};
use super::display::{self, MAX_SHOWN};
use super::identity::{Change, Identity};
use super::plain::{self, print_line};
use super::stream::ServerStream;
use crate::config::ClientConfig;
use crate::error::Error;
use crate::protocol::{self, Command};

/// How long the reply may take once connected: long enough for the join history and a
/// `/history` answer, each of which the server gives up on after 2 × `--mongo-timeout-ms`
/// (4 s by default), short enough that a health check does not hang.
pub const REPLY_DEADLINE: Duration = Duration::from_secs(10);

/// Connects, sends `command` (after `/nick` if `--nick` was given), prints the reply.
pub fn run(config: &ClientConfig, endpoint: &Endpoint, command: &str) -> Result<(), Error> {
    let mut stream = endpoint.connect()?;
    let deadline = Instant::now() + REPLY_DEADLINE;
    stream.set_write_timeout(Some(REPLY_DEADLINE))?;
    let mut lines = LineReader::new(stream.try_clone()?, MAX_SHOWN);
    let mut reply = Reply::new(command);
    send(&mut stream, &reply.opening(config.nick.as_deref()))?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match next_line(&mut lines, &stream, left)? {
            Ok(Some(line)) => line,
            Ok(None) => return Err(reply.closed(None)),
            Err(err) => return Err(reply.closed(Some(err))),
        };
        let text = display::plain(&line);
        match reply.feed(&text) {
            Step::Skip => {}
            Step::Print => print_line(&text).map_err(Error::Output)?,
            Step::Warn => eprintln!("peerchat-client: {text}"),
            Step::End => return reply.outcome(),
        }
        if reply.quit_due() {
            send(&mut stream, b"/quit\n")?;
        }
    }
}

/// The next line within `left`: `None` when the server closed the connection, an inner error
/// when it broke (a server that refuses a client closes without reading what it sent, so the
/// client may see a reset); the outer error is the deadline.
fn next_line(
    lines: &mut LineReader<ServerStream>,
    stream: &ServerStream,
    left: Duration,
) -> Result<io::Result<Option<connection::ServerLine>>, Error> {
    let timed_out = || {
        Error::Reply(format!(
            "no complete reply within {} s",
            REPLY_DEADLINE.as_secs()
        ))
    };
    if left.is_zero() {
        return Err(timed_out());
    }
    stream.set_read_timeout(Some(left))?;
    match lines.next_line() {
        Err(err)
            if matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(timed_out())
        }
        other => Ok(other),
    }
}

/// Sends lines already framed, in one write.
fn send(stream: &mut ServerStream, lines: &[u8]) -> Result<(), Error> {
    stream
        .write_all(lines)
        .map_err(|err| plain::lost(Some(err)))
}

/// What one server line is to `--command`.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Not part of the reply (welcome, join history, the `/who` reply, others' chat).
    Skip,
    /// A line of the reply: printed.
    Print,
    /// An error before the reply (e.g. `! nick bob is taken` for `--nick`): to stderr.
    Warn,
    /// The goodbye: the reply is complete.
    End,
}

/// When the closing `/quit` is sent.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Quit {
    /// With the command: its reply is queued in line, before the goodbye.
    WithCommand,
    /// After the reply's end line (`/history`, whose answer a `/quit` would drop).
    AfterReply,
    /// Sent already, or the command is `/quit` itself.
    Sent,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Phase {
    /// Up to and including the `/who` reply.
    Before,
    Reply,
    Done,
}

/// Follows the server's lines for one command: which belong to the reply, when to send
/// `/quit`, and whether it all went well.
#[derive(Debug)]
pub struct Reply {
    command: String,
    quit: Quit,
    /// `quit` just became due: the caller sends `/quit` now.
    quit_now: bool,
    phase: Phase,
    /// Our name, so our own rename (`/nick` as the command) is told from others'.
    me: Identity,
    /// An error line came in the reply, or before it in answer to `--nick`.
    failed: bool,
}

impl Reply {
    pub fn new(command: &str) -> Self {
        let quit = match protocol::parse(&protocol::sanitize(command.as_bytes())) {
            Command::Quit => Quit::Sent,
            Command::History(_) => Quit::AfterReply,
            _ => Quit::WithCommand,
        };
        Reply {
            command: command.to_string(),
            quit,
            quit_now: false,
            phase: Phase::Before,
            me: Identity::new(None),
            failed: false,
        }
    }

    /// The first write: `/nick NAME` if asked, `/who`, the command, and `/quit` unless it
    /// must wait for the reply.
    pub fn opening(&mut self, nick: Option<&str>) -> Vec<u8> {
        let mut lines = String::new();
        if let Some(nick) = nick {
            lines.push_str(&format!("/nick {nick}\n"));
        }
        lines.push_str("/who\n");
        lines.push_str(&self.command);
        lines.push('\n');
        if self.quit == Quit::WithCommand {
            lines.push_str("/quit\n");
            self.quit = Quit::Sent;
        }
        lines.into_bytes()
    }

    /// Takes one (clean) server line.
    pub fn feed(&mut self, line: &str) -> Step {
        let our_rename = self.me.observe(line) == Some(Change::Renamed);
        match self.phase {
            Phase::Before => self.before_reply(line),
            Phase::Reply => self.in_reply(line, our_rename),
            Phase::Done => Step::Skip,
        }
    }

    fn before_reply(&mut self, line: &str) -> Step {
        if is_who_reply(line) {
            self.phase = Phase::Reply;
            return Step::Skip;
        }
        if !line.starts_with("! ") {
            return Step::Skip;
        }
        // History on joining failed: not what was asked, and the command may still work.
        if line.starts_with(&format!("! {}", protocol::history_unavailable(""))) {
            return Step::Skip;
        }
        self.failed = true;
        Step::Warn
    }

    /// A line after the `/who` reply; `our_rename` if it renamed us (the command was `/nick`).
    fn in_reply(&mut self, line: &str, our_rename: bool) -> Step {
        if line == format!("* {}", protocol::BYE) {
            self.phase = Phase::Done;
            return Step::End;
        }
        let others_rename = !our_rename && rename(line).is_some();
        if line.starts_with('<') || is_presence(line) || others_rename {
            return Step::Skip;
        }
        let error = line.starts_with("! ");
        self.failed |= error;
        if self.quit == Quit::AfterReply && (error || is_end_of_history(line)) {
            self.quit = Quit::Sent;
            self.quit_now = true;
        }
        Step::Print
    }

    /// True once, when `/quit` is to be sent now.
    pub fn quit_due(&mut self) -> bool {
        std::mem::take(&mut self.quit_now)
    }

    /// The exit after the goodbye.
    pub fn outcome(&self) -> Result<(), Error> {
        if self.failed {
            return Err(Error::Reply(
                "the server answered with an error".to_string(),
            ));
        }
        Ok(())
    }

    /// Why it failed when the connection ended (closed, or broken with `error`) before the
    /// goodbye.
    pub fn closed(&self, error: Option<io::Error>) -> Error {
        let before = match self.phase {
            Phase::Before => "answering",
            _ => "the reply was complete",
        };
        let how = error.map_or_else(String::new, |err| format!(" ({err})"));
        Error::Reply(format!(
            "the server closed the connection before {before}{how}"
        ))
    }
}

/// `* N online: …`, the `/who` reply (`protocol::who`).
fn is_who_reply(line: &str) -> bool {
    let Some((count, _)) = line
        .strip_prefix("* ")
        .and_then(|rest| rest.split_once(" online: "))
    else {
        return false;
    };
    !count.is_empty() && count.bytes().all(|b| b.is_ascii_digit())
}

/// `* end of history (N messages)` (`protocol::end_of_history`).
fn is_end_of_history(line: &str) -> bool {
    let end = protocol::end_of_history(0);
    let prefix = &end[..end.find('(').unwrap_or(end.len())];
    line.strip_prefix("* ")
        .is_some_and(|rest| rest.starts_with(prefix))
}

/// A join or leave notice, one name or many (`protocol::presence`):
/// `* alice joined`, `* a, b and c left`, `* a, b, c, d, e and 37 others joined`.
fn is_presence(line: &str) -> bool {
    let Some(body) = line.strip_prefix("* ") else {
        return false;
    };
    body.strip_suffix(" joined")
        .or_else(|| body.strip_suffix(" left"))
        .is_some_and(is_name_list)
}

/// `a`, `a and b`, `a, b and c`, `a, …, e and 1 other`, `a, …, e and N others`.
fn is_name_list(list: &str) -> bool {
    let Some((listed, last)) = list.rsplit_once(" and ") else {
        return is_name(list);
    };
    let others = last
        .strip_suffix(" others")
        .or_else(|| last.strip_suffix(" other"))
        .is_some_and(|count| !count.is_empty() && count.bytes().all(|b| b.is_ascii_digit()));
    listed.split(", ").all(is_name) && (others || is_name(last))
}

/// `* OLD is now NEW` (`protocol::renamed`): the two names.
fn rename(line: &str) -> Option<(&str, &str)> {
    let (old, new) = line.strip_prefix("* ")?.split_once(" is now ")?;
    (is_name(old) && protocol::validate_nick(new).is_ok()).then_some((old, new))
}

/// A name the server gives someone: a nick, or `IP:PORT` before one is set.
fn is_name(name: &str) -> bool {
    protocol::validate_nick(name).is_ok() || name.parse::<SocketAddr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const WELCOME: &str = "* welcome, you are 127.0.0.1:5000 \u{2014} /help for commands";

    /// Feeds `lines`, returning those printed and the first `End`'s index.
    fn follow(reply: &mut Reply, lines: &[&str]) -> (Vec<String>, Option<usize>) {
        let mut printed = Vec::new();
        for (at, line) in lines.iter().enumerate() {
            match reply.feed(line) {
                Step::Print => printed.push(line.to_string()),
                Step::End => return (printed, Some(at)),
                Step::Skip | Step::Warn => {}
            }
        }
        (printed, None)
    }

    #[test]
    fn the_reply_is_what_follows_the_who_reply_up_to_the_goodbye() {
        let mut reply = Reply::new("/who");
        assert_eq!(reply.opening(None), b"/who\n/who\n/quit\n");
        let (printed, end) = follow(
            &mut reply,
            &[
                WELCOME,
                "* [2026-01-01T00:00:00Z] <bob> 3 online: fake",
                "* end of history (1 message)",
                "* 2 online: bob, 127.0.0.1:5000",
                "* 2 online: bob, 127.0.0.1:5000",
                "* bye",
                "after",
            ],
        );
        assert_eq!(printed, ["* 2 online: bob, 127.0.0.1:5000"]);
        assert_eq!(end, Some(5));
        assert!(reply.outcome().is_ok());
        assert!(!reply.quit_due(), "/quit went with the command");
    }

    #[test]
    fn others_chat_joins_leaves_and_renames_are_left_out_but_ours_is_not() {
        let mut reply = Reply::new("/nick alice");
        assert_eq!(
            reply.opening(Some("al")),
            b"/nick al\n/who\n/nick alice\n/quit\n"
        );
        let others = format!(
            "* {}",
            protocol::presence(&["a", "b", "c", "d", "e"], 37, "joined")
        );
        let lines = [
            WELCOME,
            "* 127.0.0.1:5000 is now al",
            "* 1 online: al",
            "<bob> hi",
            "* bob joined",
            "* 127.0.0.1:6000 left",
            "* bob and carol left",
            "* bob, carol and 127.0.0.1:6000 joined",
            others.as_str(),
            "* a, b, c, d, e and 1 other left",
            "* bob is now robert",
            "* al is now alice",
            "* bob waves",
            "* bye",
        ];
        let (printed, end) = follow(&mut reply, &lines);
        assert_eq!(printed, ["* al is now alice", "* bob waves"]);
        assert_eq!(end, Some(lines.len() - 1));
    }

    #[test]
    fn notices_that_only_look_like_presence_are_printed() {
        for line in [
            "* [2026-01-01T00:00:00Z] <bob> carol joined",
            "* end of history (2 messages) joined",
            "* bob and  joined",
            "* 1 online: bob joined",
            "* bob, carol and 3 otherz left",
        ] {
            assert!(!is_presence(line), "{line}");
        }
        assert!(rename("* [x] <bob> a is now b").is_none());
    }

    #[test]
    fn an_error_line_fails_the_command_but_a_join_history_failure_does_not() {
        let mut reply = Reply::new("/nick");
        reply.opening(None);
        let join_failed = format!(
            "! {}",
            protocol::history_unavailable("database unreachable")
        );
        assert_eq!(reply.feed(WELCOME), Step::Skip);
        assert_eq!(reply.feed(&join_failed), Step::Skip);
        assert_eq!(reply.feed("* 1 online: 127.0.0.1:5000"), Step::Skip);
        assert!(reply.outcome().is_ok());
        assert_eq!(reply.feed("! usage: /nick NAME"), Step::Print);
        assert_eq!(reply.feed("* bye"), Step::End);
        assert!(reply.outcome().is_err());
    }

    #[test]
    fn a_refused_nick_is_warned_and_fails_the_command() {
        let mut reply = Reply::new("/who");
        reply.opening(Some("bob"));
        reply.feed(WELCOME);
        assert_eq!(reply.feed("! nick bob is taken"), Step::Warn);
        assert_eq!(reply.feed("* 2 online: bob, 127.0.0.1:5000"), Step::Skip);
        assert_eq!(reply.feed("* 2 online: bob, 127.0.0.1:5000"), Step::Print);
        assert_eq!(reply.feed("* bye"), Step::End);
        assert!(reply.outcome().is_err());
    }

    /// `/history`'s `/quit` waits for its end line: sent with it, it would drop the answer.
    #[test]
    fn history_sends_quit_after_its_end_line() {
        let mut reply = Reply::new("/history 2");
        assert_eq!(reply.opening(None), b"/who\n/history 2\n");
        let lines = [
            WELCOME,
            "* [2026-01-01T00:00:00Z] <bob> old",
            "* end of history (1 message)",
            "* 1 online: 127.0.0.1:5000",
            "<bob> live",
            "* [2026-01-01T00:00:00Z] <bob> one",
            "* [2026-01-01T00:00:01Z] * bob waves",
        ];
        let (printed, end) = follow(&mut reply, &lines);
        assert_eq!(printed.len(), 2);
        assert_eq!(end, None);
        assert!(!reply.quit_due());
        assert_eq!(reply.feed("* end of history (2 messages)"), Step::Print);
        assert!(reply.quit_due());
        assert!(!reply.quit_due(), "once");
        assert_eq!(reply.feed("* bye"), Step::End);
        assert!(reply.outcome().is_ok());

        let mut reply = Reply::new("/history");
        assert_eq!(reply.opening(None), b"/who\n/history\n");
        reply.feed("* 1 online: 127.0.0.1:5000");
        let unavailable = format!("! {}", protocol::history_unavailable("persistence is off"));
        assert_eq!(reply.feed(&unavailable), Step::Print);
        assert!(reply.quit_due());
    }

    #[test]
    fn quit_as_the_command_is_not_sent_twice() {
        let mut reply = Reply::new("/quit");
        assert_eq!(reply.opening(None), b"/who\n/quit\n");
        reply.feed("* 1 online: 127.0.0.1:5000");
        assert_eq!(reply.feed("* bye"), Step::End);
        assert!(!reply.quit_due());
    }

    #[test]
    fn closing_early_says_how_far_the_reply_got() {
        let mut reply = Reply::new("/who");
        reply.opening(None);
        assert!(reply.closed(None).to_string().contains("before answering"));
        reply.feed("* 1 online: 127.0.0.1:5000");
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        let why = reply.closed(Some(reset)).to_string();
        assert!(
            why.contains("before the reply was complete (connection reset"),
            "{why}"
        );
    }

    /// A server that says nothing ends the wait at the deadline (the whole `REPLY_DEADLINE`
    /// is too long for a test; the same read is bounded by whatever is left).
    #[test]
    fn a_silent_server_is_given_up_on_at_the_deadline() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _server_side = listener.accept().unwrap();
        let stream = ServerStream::plain(tcp);
        let mut lines = LineReader::new(stream.try_clone().unwrap(), MAX_SHOWN);
        let left = Duration::from_millis(20);
        let err = next_line(&mut lines, &stream, left).unwrap_err();
        assert!(
            err.to_string().starts_with("no complete reply within"),
            "{err}"
        );
        let err = next_line(&mut lines, &stream, Duration::ZERO).unwrap_err();
        assert!(
            err.to_string().starts_with("no complete reply within"),
            "{err}"
        );
    }

    /// The matchers follow the server's own formats, so a change there shows up here.
    #[test]
    fn matchers_recognise_the_servers_own_lines() {
        let notice = |text: String| format!("* {text}");
        assert!(is_who_reply(&notice(protocol::who(
            ["a", "127.0.0.1:1"].into_iter()
        ))));
        assert!(is_end_of_history(&notice(protocol::end_of_history(7))));
        assert!(is_end_of_history(&notice(protocol::end_of_history(1))));
        let one = |name, verb| notice(protocol::presence(&[name], 0, verb));
        assert!(is_presence(&one("[::1]:5000", "joined")));
        assert!(is_presence(&one("bob", "left")));
        for n in 1..=7 {
            let names = ["a", "b", "c", "d", "e", "f", "g"];
            let listed = &names[..n.min(5)];
            let text = protocol::presence(listed, n.saturating_sub(5), "left");
            assert!(is_presence(&notice(text)), "{n}");
        }
        let renamed = notice(protocol::renamed("127.0.0.1:1", "bob"));
        assert_eq!(rename(&renamed), Some(("127.0.0.1:1", "bob")));
    }
}
