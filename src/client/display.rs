//! What a line looks like on the user's screen: server text made safe and bounded (both modes),
//! and in terminal mode the time, colours per nick, notices and errors set apart, mentions of
//! our nick highlighted, and our own messages echoed as `<you> …` (the server does not echo
//! them).
//!
//! Pure: no terminal, no clock except in `Painter::stamp`, so every rule is unit-tested.

use std::borrow::Cow;

use time::{OffsetDateTime, UtcOffset};

use super::connection::ServerLine;
use crate::protocol::{self, Command};

/// Longest line shown, in bytes: a hostile or broken server cannot make one line fill the
/// scrollback or the client's memory. Far above the server's default `--max-line` (4096) plus
/// a name, so no real chat line is ever cut.
pub const MAX_SHOWN: usize = 8 * 1024;

/// The name our own lines show under, whatever our nick: `<you> text`, `* you waves`.
pub const OWN_NAME: &str = "you";

/// Marks a line that was cut.
const ELLIPSIS: char = '\u{2026}';

const RESET: &str = "\x1b[0m";
/// Notices and the time: present but quieter than chat.
const DIM: &str = "\x1b[2m";
/// Errors: the one thing that must not be missed.
const ERROR: &str = "\x1b[1;31m";
/// Our nick inside someone else's message.
const MENTION: &str = "\x1b[1;7m";
/// Readable on dark and light backgrounds alike; red is left out (errors use it), and so are
/// black, white and plain blue (invisible or hard to read on one background or the other).
const NICK_COLORS: [&str; 9] = [
    "\x1b[32m", "\x1b[33m", "\x1b[35m", "\x1b[36m", "\x1b[92m", "\x1b[93m", "\x1b[94m", "\x1b[95m",
    "\x1b[96m",
];

/// A server line made safe to print: escape sequences and control characters removed
/// (`protocol::sanitize`, the same rules the server applies to what clients send), TAB shown
/// as a space, at most `MAX_SHOWN` bytes, `…` where it was cut.
pub fn clean(line: &ServerLine) -> String {
    let mut bytes = line.bytes.as_slice();
    if line.cut {
        bytes = without_partial_char(bytes);
    }
    bound(safe(bytes).into_owned(), line.cut)
}

/// `protocol::sanitize`, plus TAB (the one control it keeps) as a space: no control character
/// from the server reaches the terminal, and a TAB would move the cursor to a tab stop the
/// client does not know about. Same length, so bounds still hold.
fn safe(bytes: &[u8]) -> Cow<'_, str> {
    match protocol::sanitize(bytes) {
        text if text.contains('\t') => Cow::Owned(text.replace('\t', " ")),
        text => text,
    }
}

/// Drops a UTF-8 sequence that the cut split, which would otherwise show as U+FFFD.
fn without_partial_char(bytes: &[u8]) -> &[u8] {
    match std::str::from_utf8(bytes) {
        Err(err) if err.error_len().is_none() => &bytes[..err.valid_up_to()],
        _ => bytes,
    }
}

/// At most `MAX_SHOWN` bytes, ending in `…` if anything was cut (here or by the reader).
fn bound(mut text: String, cut: bool) -> String {
    if !cut && text.len() <= MAX_SHOWN {
        return text;
    }
    let mut end = text.len().min(MAX_SHOWN - ELLIPSIS.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push(ELLIPSIS);
    text
}

/// The kinds of line the protocol has (`protocol` module docs).
#[derive(Debug, PartialEq, Eq)]
pub enum Shown<'a> {
    /// `<NAME> TEXT`.
    Chat { name: &'a str, text: &'a str },
    /// `* TEXT`, the whole line.
    Notice(&'a str),
    /// `! TEXT`, the whole line.
    Error(&'a str),
    /// Anything else, shown as it is.
    Other(&'a str),
}

/// Tells what kind of line the server sent.
pub fn classify(line: &str) -> Shown<'_> {
    let chat = line
        .strip_prefix('<')
        .and_then(|rest| rest.split_once("> "))
        .filter(|(name, _)| !name.is_empty() && !name.contains([' ', '<', '>']));
    if let Some((name, text)) = chat {
        Shown::Chat { name, text }
    } else if line.starts_with("* ") {
        Shown::Notice(line)
    } else if line.starts_with("! ") {
        Shown::Error(line)
    } else {
        Shown::Other(line)
    }
}

/// What we show for a line we sent; the server sends it to everyone but us.
#[derive(Debug, PartialEq, Eq)]
pub enum Echo {
    /// Chat text (a leading `//` already turned into `/`).
    Chat(String),
    /// `/me ACTION`: the others see `* NICK ACTION`.
    Action(String),
}

/// The echo of a typed line, or `None` for commands other than `/me` (their answers come from
/// the server) and blank lines.
pub fn echo(typed: &str) -> Option<Echo> {
    if let Some(rest) = typed.strip_prefix("/me") {
        if rest.is_empty() || rest.starts_with(char::is_whitespace) {
            let action = rest.trim();
            return (!action.is_empty()).then(|| Echo::Action(action.to_string()));
        }
    }
    match protocol::parse(typed) {
        Command::Chat(text) => Some(Echo::Chat(text.to_string())),
        _ => None,
    }
}

/// Byte ranges of `nick` in `text` as a whole word, ignoring ASCII case (nicks are ASCII and
/// unique regardless of case): `alice` in `hi Alice!` and `@alice`, not in `malice`.
pub fn mentions(text: &str, nick: &str) -> Vec<std::ops::Range<usize>> {
    let is_word = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
    let mut found = Vec::new();
    if nick.is_empty() {
        return found;
    }
    // ASCII lowercasing keeps every byte offset, so ranges in `lower` are ranges in `text`.
    let lower = text.to_ascii_lowercase();
    let wanted = nick.to_ascii_lowercase();
    let mut from = 0;
    while let Some(at) = lower[from..].find(&wanted) {
        let start = from + at;
        let end = start + wanted.len();
        let before = lower[..start].chars().next_back();
        let after = lower[end..].chars().next();
        if !before.is_some_and(is_word) && !after.is_some_and(is_word) {
            found.push(start..end);
        }
        from = end;
    }
    found
}

/// The colour of a name: a stable hash (FNV-1a of the lowercased name) picks from the palette,
/// so a nick has the same colour on every line, in every client, in every run.
pub fn nick_color(name: &str) -> &'static str {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in name.bytes() {
        hash ^= u32::from(byte.to_ascii_lowercase());
        hash = hash.wrapping_mul(0x0100_0193);
    }
    NICK_COLORS[hash as usize % NICK_COLORS.len()]
}

/// Formats terminal-mode lines: optional time stamp and colours.
#[derive(Clone, Copy, Debug)]
pub struct Painter {
    color: bool,
    /// `None` with `--no-time`.
    clock: Option<UtcOffset>,
}

impl Painter {
    /// `clock` is the local offset found at start-up (see `client::local_offset`).
    pub fn new(color: bool, clock: Option<UtcOffset>) -> Self {
        Painter { color, clock }
    }

    /// A line from the server; `nick` is ours, highlighted where someone mentions it.
    pub fn server_line(&self, line: &str, nick: Option<&str>) -> String {
        paint(&classify(line), nick, self.color, self.stamp().as_deref())
    }

    /// A line we sent, shown under `you` (`OWN_NAME`) whatever our nick.
    pub fn own_line(&self, echo: &Echo) -> String {
        let name = OWN_NAME;
        let stamp = self.stamp();
        match echo {
            Echo::Chat(text) => paint(
                &Shown::Chat { name, text },
                None,
                self.color,
                stamp.as_deref(),
            ),
            Echo::Action(action) => {
                let line = format!("* {name} {action}");
                paint(&Shown::Notice(&line), None, self.color, stamp.as_deref())
            }
        }
    }

    /// A notice of the client's own (`* connection lost …`), styled like the server's.
    pub fn notice(&self, text: &str) -> String {
        let line = format!("* {text}");
        paint(
            &Shown::Notice(&line),
            None,
            self.color,
            self.stamp().as_deref(),
        )
    }

    /// An error of the client's own (`! not connected …`).
    pub fn error(&self, text: &str) -> String {
        let line = format!("! {text}");
        paint(
            &Shown::Error(&line),
            None,
            self.color,
            self.stamp().as_deref(),
        )
    }

    /// Local `HH:MM` now, or `None` with `--no-time`.
    fn stamp(&self) -> Option<String> {
        let now = OffsetDateTime::now_utc().to_offset(self.clock?);
        Some(format!("{:02}:{:02}", now.hour(), now.minute()))
    }
}

/// One line for the terminal: `stamp` first, then the line, with colours if `color`.
pub fn paint(shown: &Shown<'_>, nick: Option<&str>, color: bool, stamp: Option<&str>) -> String {
    let mut out = String::new();
    if let Some(stamp) = stamp {
        push_styled(&mut out, color.then_some(DIM), stamp);
        out.push(' ');
    }
    match *shown {
        Shown::Chat { name, text } => {
            push_styled(
                &mut out,
                color.then(|| nick_color(name)),
                &format!("<{name}>"),
            );
            out.push(' ');
            push_text(&mut out, text, nick.filter(|_| color));
        }
        Shown::Notice(line) => push_styled(&mut out, color.then_some(DIM), line),
        Shown::Error(line) => push_styled(&mut out, color.then_some(ERROR), line),
        Shown::Other(line) => out.push_str(line),
    }
    out
}

fn push_styled(out: &mut String, style: Option<&str>, text: &str) {
    match style {
        Some(style) => {
            out.push_str(style);
            out.push_str(text);
            out.push_str(RESET);
        }
        None => out.push_str(text),
    }
}

/// Chat text with each mention of `nick` highlighted.
fn push_text(out: &mut String, text: &str, nick: Option<&str>) {
    let mut shown = 0;
    for range in nick.map(|nick| mentions(text, nick)).unwrap_or_default() {
        out.push_str(&text[shown..range.start]);
        push_styled(out, Some(MENTION), &text[range.clone()]);
        shown = range.end;
    }
    out.push_str(&text[shown..]);
}

/// True when colours are wanted: no `--no-color`, and `NO_COLOR` unset or empty
/// (no-color.org: "when present and not an empty string").
pub fn color_wanted(flag: bool, no_color_env: Option<&std::ffi::OsStr>) -> bool {
    flag && no_color_env.is_none_or(|value| value.is_empty())
}

/// What plain mode prints: `clean`'s text, borrowed from the line when it needs no change (the
/// common case: plain mode prints every answer to a long piped file).
pub fn plain(line: &ServerLine) -> Cow<'_, str> {
    if line.cut {
        return Cow::Owned(clean(line));
    }
    match safe(&line.bytes) {
        Cow::Borrowed(text) if text.len() <= MAX_SHOWN => Cow::Borrowed(text),
        text => Cow::Owned(bound(text.into_owned(), false)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_line(bytes: &[u8], cut: bool) -> ServerLine {
        ServerLine {
            bytes: bytes.to_vec(),
            cut,
        }
    }

    #[test]
    fn clean_removes_escapes_and_bounds_the_length() {
        let hostile = server_line(
            b"<eve> \x1b]0;pwned\x07hi \x1b[2J\x1b[31mred\rx\x08y",
            false,
        );
        assert_eq!(clean(&hostile), "<eve> hi redxy");
        let c1 = server_line("<eve> a\u{9b}31mb \u{9d}0;t\u{9c}c".as_bytes(), false);
        assert_eq!(clean(&c1), "<eve> ab c");
        let long = server_line(&[b'a'; MAX_SHOWN + 1], false);
        let shown = clean(&long);
        assert_eq!(shown.len(), MAX_SHOWN);
        assert!(shown.ends_with("a\u{2026}"));
        assert_eq!(
            clean(&server_line(&[b'a'; MAX_SHOWN], false)).len(),
            MAX_SHOWN
        );
    }

    #[test]
    fn a_cut_line_ends_in_an_ellipsis_without_a_broken_character() {
        // `é` is two bytes; the reader cut between them.
        let cut = server_line(b"<bob> caf\xc3", true);
        assert_eq!(clean(&cut), "<bob> caf\u{2026}");
        // Invalid bytes become U+FFFD (3 bytes each): the bound still holds after that.
        let invalid = server_line(&[0xff; MAX_SHOWN], true);
        let shown = clean(&invalid);
        assert!(shown.len() <= MAX_SHOWN, "{}", shown.len());
        assert!(shown.ends_with('\u{2026}'));
    }

    #[test]
    fn tabs_from_the_server_show_as_spaces() {
        let line = server_line(b"<eve> a\tb\t\tc\x1b[2J\t", false);
        assert_eq!(clean(&line), "<eve> a b  c ");
        assert_eq!(plain(&line), "<eve> a b  c ");
        let cut = server_line(b"<eve>\tx", true);
        assert_eq!(clean(&cut), "<eve> x\u{2026}");
        assert!(!plain(&server_line(b"\t\t", false)).contains('\t'));
    }

    #[test]
    fn plain_borrows_clean_lines() {
        let line = server_line(b"* welcome", false);
        assert!(matches!(plain(&line), Cow::Borrowed("* welcome")));
        assert_eq!(plain(&server_line(b"a\x1b[2Jb", false)), "ab");
        assert!(plain(&server_line(b"abc", true)).ends_with('\u{2026}'));
    }

    #[test]
    fn classifies_chat_notices_and_errors() {
        assert_eq!(
            classify("<alice> hi > there"),
            Shown::Chat {
                name: "alice",
                text: "hi > there"
            }
        );
        assert_eq!(
            classify("<127.0.0.1:5000> x"),
            Shown::Chat {
                name: "127.0.0.1:5000",
                text: "x"
            }
        );
        assert_eq!(classify("* bob joined"), Shown::Notice("* bob joined"));
        assert_eq!(
            classify("! unknown command"),
            Shown::Error("! unknown command")
        );
        assert_eq!(classify("<no close"), Shown::Other("<no close"));
        assert_eq!(classify("<a b> x"), Shown::Other("<a b> x"));
        assert_eq!(classify("*bold*"), Shown::Other("*bold*"));
    }

    #[test]
    fn echoes_chat_and_actions_but_not_commands() {
        assert_eq!(echo("hello"), Some(Echo::Chat("hello".into())));
        assert_eq!(echo("//etc/motd"), Some(Echo::Chat("/etc/motd".into())));
        assert_eq!(echo("/me waves"), Some(Echo::Action("waves".into())));
        assert_eq!(
            echo("/me  waves back "),
            Some(Echo::Action("waves back".into()))
        );
        for command in [
            "/me",
            "/me   ",
            "/meow",
            "/nick bob",
            "/who",
            "/history 5",
            "/quit",
            "",
        ] {
            assert_eq!(echo(command), None, "{command:?}");
        }
    }

    #[test]
    fn mentions_are_whole_words_in_any_case() {
        let spans = |text: &str, nick: &str| -> Vec<(usize, usize)> {
            mentions(text, nick)
                .into_iter()
                .map(|r| (r.start, r.end))
                .collect()
        };
        assert_eq!(spans("hi alice", "alice"), [(3, 8)]);
        assert_eq!(
            spans("Alice, ALICE: @alice.", "alice"),
            [(0, 5), (7, 12), (15, 20)]
        );
        assert!(spans("malice alice_2 alice-x", "alice").is_empty());
        assert_eq!(spans("é alice é", "alice"), [(3, 8)]);
        assert_eq!(spans("j.doe, hi", "j.doe"), [(0, 5)]);
        assert!(spans("anything", "").is_empty());
    }

    #[test]
    fn nick_colours_are_stable_and_ignore_case() {
        assert_eq!(nick_color("alice"), nick_color("ALICE"));
        assert_eq!(nick_color("alice"), nick_color("alice"));
        let names = [
            "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
        ];
        let colours: std::collections::HashSet<_> = names.iter().map(|n| nick_color(n)).collect();
        assert!(colours.len() >= 4, "names spread over the palette");
        assert!(!NICK_COLORS.contains(&"\x1b[31m"), "red is for errors");
    }

    #[test]
    fn paints_without_colour_exactly_as_received_after_the_time() {
        let shown = classify("<bob> hi alice");
        assert_eq!(paint(&shown, Some("alice"), false, None), "<bob> hi alice");
        assert_eq!(
            paint(&shown, Some("alice"), false, Some("09:05")),
            "09:05 <bob> hi alice"
        );
        let notice = classify("* bob joined");
        assert_eq!(
            paint(&notice, None, false, Some("23:59")),
            "23:59 * bob joined"
        );
    }

    #[test]
    fn paints_names_notices_errors_and_mentions_in_colour() {
        let line = paint(
            &classify("<bob> hi alice"),
            Some("alice"),
            true,
            Some("09:05"),
        );
        let bob = nick_color("bob");
        assert_eq!(
            line,
            format!("{DIM}09:05{RESET} {bob}<bob>{RESET} hi {MENTION}alice{RESET}")
        );
        assert_eq!(
            paint(&classify("* bob left"), None, true, None),
            format!("{DIM}* bob left{RESET}")
        );
        assert_eq!(
            paint(&classify("! nick bob is taken"), None, true, None),
            format!("{ERROR}! nick bob is taken{RESET}")
        );
        assert_eq!(
            paint(&classify("<bob> hi there"), Some("alice"), true, None),
            format!("{bob}<bob>{RESET} hi there"),
            "no mention, no highlight"
        );
    }

    #[test]
    fn own_lines_show_under_you() {
        let painter = Painter::new(false, None);
        assert_eq!(painter.own_line(&Echo::Chat("hi".into())), "<you> hi");
        assert_eq!(
            painter.own_line(&Echo::Action("waves".into())),
            "* you waves"
        );
        assert_eq!(painter.notice("reconnected"), "* reconnected");
        assert_eq!(painter.error("not connected"), "! not connected");
    }

    #[test]
    fn the_time_is_local_hours_and_minutes() {
        let painter = Painter::new(false, Some(UtcOffset::UTC));
        let line = painter.notice("x");
        let (stamp, rest) = line.split_once(' ').unwrap();
        assert_eq!(rest, "* x");
        assert_eq!(stamp.len(), 5);
        assert!(stamp.chars().enumerate().all(|(i, c)| if i == 2 {
            c == ':'
        } else {
            c.is_ascii_digit()
        }));
    }

    #[test]
    fn no_color_honours_the_flag_and_a_non_empty_variable() {
        use std::ffi::OsStr;
        assert!(color_wanted(true, None));
        assert!(color_wanted(true, Some(OsStr::new(""))));
        assert!(!color_wanted(true, Some(OsStr::new("1"))));
        assert!(!color_wanted(false, None));
    }
}
