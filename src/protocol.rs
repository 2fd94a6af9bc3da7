//! The wire protocol: what a client line means and every line the server sends.
//!
//! Pure text handling, no I/O, so all of it is testable without sockets and all wire text lives
//! in one place. Clients send newline-terminated UTF-8; the server answers with lines ending in
//! `\r\n` (so telnet shows them) of three kinds:
//!
//! - chat: `<NAME> TEXT`
//! - notices: `* TEXT` (joins, leaves, renames, command replies)
//! - errors: `! TEXT` (to the one client concerned)

use std::borrow::Cow;

use crate::config::FloodLimit;

/// Longest nick, in characters (ASCII, so also bytes).
pub const MAX_NICK_CHARS: usize = 32;

/// How much of a message an error line quotes back, in characters.
const QUOTE_CHARS: usize = 40;

/// What a client line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// Text for everyone else (a leading `//` already turned into `/`).
    Chat(&'a str),
    /// `/nick NAME`; the name is not validated yet.
    Nick(&'a str),
    /// `/me ACTION`: an action, shown to the others as `* NAME ACTION`.
    Me(&'a str),
    /// `/history [N]`: the last N stored messages (`None`: the default count). Never zero.
    History(Option<usize>),
    /// `/who`: list the connected names.
    Who,
    /// `/help`: list the commands.
    Help,
    /// `/stats`: the server's figures on one line.
    Stats,
    /// `/quit`: say goodbye and close.
    Quit,
    /// A blank line: ignored.
    Empty,
    /// A known command used wrongly; the text is the usage line.
    Usage(&'static str),
    /// A `/word` that is no command.
    Unknown,
}

/// Reads one line (already sanitised) as a command.
pub fn parse(line: &str) -> Command<'_> {
    if line.trim().is_empty() {
        return Command::Empty;
    }
    let Some(rest) = line.strip_prefix('/') else {
        return Command::Chat(line);
    };
    if rest.starts_with('/') {
        return Command::Chat(rest);
    }
    let (word, arg) = match rest.split_once(char::is_whitespace) {
        Some((word, arg)) => (word, arg.trim()),
        None => (rest, ""),
    };
    match word {
        "nick" if arg.is_empty() => Command::Usage("usage: /nick NAME"),
        "nick" => Command::Nick(arg),
        "me" if arg.is_empty() => Command::Usage(ME_USAGE),
        "me" => Command::Me(arg),
        "history" => parse_history(arg),
        "who" => Command::Who,
        "help" => Command::Help,
        "stats" => Command::Stats,
        "quit" => Command::Quit,
        _ => Command::Unknown,
    }
}

const ME_USAGE: &str = "usage: /me ACTION";
const HISTORY_USAGE: &str = "usage: /history [N]";

/// `/history`, `/history N` (N ≥ 1; a count too large for memory still means "as many as
/// allowed"), anything else is a usage error.
fn parse_history(arg: &str) -> Command<'_> {
    if arg.is_empty() {
        return Command::History(None);
    }
    if !arg.bytes().all(|b| b.is_ascii_digit()) {
        return Command::Usage(HISTORY_USAGE);
    }
    match arg.parse::<usize>() {
        Ok(0) => Command::Usage(HISTORY_USAGE),
        Ok(count) => Command::History(Some(count)),
        // Only digits, so too many of them: more than anyone may ask for.
        Err(_) => Command::History(Some(usize::MAX)),
    }
}

/// Makes client bytes safe to show on other people's terminals and to store.
///
/// Invalid UTF-8 becomes U+FFFD. Terminal escape sequences (`ESC [ … m`, `ESC ] … BEL`, their
/// 8-bit C1 forms) are removed whole, so no half of one is left to act on or to clutter the line,
/// and every other control character except TAB (C0, DEL, C1) is dropped, as are the
/// bidirectional embedding, override and isolate controls that make text display in another
/// order than it is stored ("Trojan Source"). The common case, clean UTF-8, is returned
/// borrowed without copying.
pub fn sanitize(bytes: &[u8]) -> Cow<'_, str> {
    // Printable ASCII needs no decoding and no search for controls: one pass over the bytes.
    if bytes
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        if let Ok(text) = std::str::from_utf8(bytes) {
            return Cow::Borrowed(text);
        }
    }
    let text = String::from_utf8_lossy(bytes);
    if !text.chars().any(is_forbidden) {
        return text;
    }
    Cow::Owned(strip_controls(&text))
}

/// True for the characters that must not reach a terminal: controls except TAB, and the bidi
/// embeddings, overrides and isolates (U+202A–U+202E, U+2066–U+2069), which could make one
/// user's line show as something else. Zero-width joiners stay: emoji sequences need them.
pub fn is_forbidden(c: char) -> bool {
    (c.is_control() && c != '\t')
        || ('\u{80}'..='\u{9f}').contains(&c)
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

type Chars<'a> = std::iter::Peekable<std::str::Chars<'a>>;

fn strip_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => skip_escape(&mut chars),
            '\u{9b}' => skip_control_sequence(&mut chars),
            '\u{90}' | '\u{98}' | '\u{9d}' | '\u{9e}' | '\u{9f}' => skip_string(&mut chars),
            c if is_forbidden(c) => {}
            c => out.push(c),
        }
    }
    out
}

/// Skips what follows an ESC (ECMA-48): a control sequence after `[`, a string after `]`, `P`,
/// `X`, `^` or `_`, else intermediate bytes and one final byte (`ESC c`, `ESC ( B`).
fn skip_escape(chars: &mut Chars<'_>) {
    match chars.peek() {
        Some('[') => {
            chars.next();
            skip_control_sequence(chars);
        }
        Some(']' | 'P' | 'X' | '^' | '_') => {
            chars.next();
            skip_string(chars);
        }
        _ => {
            while chars.next_if(|c| ('\x20'..='\x2f').contains(c)).is_some() {}
            chars.next_if(|c| ('\x30'..='\x7e').contains(c));
        }
    }
}

/// Skips the parameter and intermediate bytes of a control sequence and its final byte.
fn skip_control_sequence(chars: &mut Chars<'_>) {
    while chars.next_if(|c| ('\x20'..='\x3f').contains(c)).is_some() {}
    chars.next_if(|c| ('\x40'..='\x7e').contains(c));
}

/// Skips a string command (OSC, DCS, …) up to its terminator: BEL, ST or the end of the line.
fn skip_string(chars: &mut Chars<'_>) {
    while let Some(c) = chars.next() {
        match c {
            '\u{7}' | '\u{9c}' => return,
            '\u{1b}' => {
                chars.next_if_eq(&'\\');
                return;
            }
            _ => {}
        }
    }
}

/// Why a name cannot be used as a nick.
#[derive(Debug, PartialEq, Eq)]
pub enum NickError {
    /// Empty, too long, or a character outside ASCII letters, digits, `-`, `_`, `.`.
    Invalid,
}

/// Nicks are ASCII letters, digits, `-`, `_` and `.`, up to 32 characters, as on IRC. No `:`
/// means no nick can pass for the `IP:PORT` default name of another client; no spaces or symbols
/// keeps `<NAME>` parseable; ASCII only means no look-alike letters from other scripts (a
/// Cyrillic `а` in `аlice`), since uniqueness is checked ASCII case-insensitively.
pub fn validate_nick(name: &str) -> Result<(), NickError> {
    let count = name.len();
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if count == 0 || count > MAX_NICK_CHARS || !name.chars().all(allowed) {
        return Err(NickError::Invalid);
    }
    Ok(())
}

/// Appends `<NAME> TEXT\r\n`.
pub fn write_chat(out: &mut Vec<u8>, name: &str, text: &str) {
    out.reserve(name.len() + text.len() + 5);
    out.push(b'<');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"> ");
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends `* TEXT\r\n`.
pub fn write_notice(out: &mut Vec<u8>, text: &str) {
    write_prefixed(out, b"* ", text);
}

/// Appends `! TEXT\r\n`.
pub fn write_error(out: &mut Vec<u8>, text: &str) {
    write_prefixed(out, b"! ", text);
}

fn write_prefixed(out: &mut Vec<u8>, prefix: &[u8], text: &str) {
    out.reserve(prefix.len() + text.len() + 2);
    out.extend_from_slice(prefix);
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Notice to a new client.
pub fn welcome(name: &str) -> String {
    format!("welcome, you are {name} \u{2014} /help for commands")
}

/// Notice for one join or leave, or several at once (`verb` is `joined` or `left`): the names listed,
/// then how many `others` there are: `alice, bob and carol joined`, `a, b, c, d, e and 37
/// others left`.
pub fn presence(listed: &[&str], others: usize, verb: &str) -> String {
    let who = match (listed, others) {
        ([], _) => String::new(),
        ([one], 0) => (*one).to_string(),
        ([first @ .., last], 0) => format!("{} and {last}", first.join(", ")),
        (_, 1) => format!("{} and 1 other", listed.join(", ")),
        (_, others) => format!("{} and {others} others", listed.join(", ")),
    };
    format!("{who} {verb}")
}

/// Notice to everyone after `/nick`.
pub fn renamed(old: &str, new: &str) -> String {
    format!("{old} is now {new}")
}

/// Reply to `/who`.
pub fn who<'a>(names: impl ExactSizeIterator<Item = &'a str>) -> String {
    let count = names.len();
    let list: Vec<&str> = names.collect();
    format!("{count} online: {}", list.join(", "))
}

/// Reply to `/help`, one notice per line.
pub const HELP_LINES: [&str; 8] = [
    "commands:",
    "  /nick NAME   change your name (ASCII letters, digits, - _ . up to 32)",
    "  /me ACTION   tell the others what you do: * NAME ACTION",
    "  /history [N] the last N stored messages (default 20)",
    "  /who         list who is online (/stats: the server's figures)",
    "  /help        this text",
    "  /quit        leave",
    "anything else is chat; start a line with // to send one beginning with /",
];

/// Reply to `/quit` before the connection closes.
pub const BYE: &str = "bye";

/// `--cluster`: a gap in the change stream that reading back from the database could not close.
pub const MISSED_FROM_OTHER_SERVERS: &str = "some messages from other servers may have been missed";

/// `--cluster`: what a `! not saved` reason adds. A message that was not stored is not in the
/// change stream, so no other server delivers it.
pub const NOT_SENT_TO_OTHERS: &str = "not sent to other servers";

/// `--cluster`: `/nick` could not be checked against the other servers.
pub fn nick_unsettled(reason: &str) -> String {
    format!("nick not changed: {reason}")
}

/// Notice to the others for `/me ACTION`.
pub fn action(name: &str, text: &str) -> String {
    format!("{name} {text}")
}

/// One stored message as a history notice: `[2026-11-24T14:03:05Z] <alice> hi`, or
/// `[…] * alice waves` for an action. Time in UTC, to the second.
pub fn history_line(at_millis: i64, nick: &str, text: &str, action: bool) -> String {
    let at = utc_seconds(at_millis);
    if action {
        format!("[{at}] * {nick} {text}")
    } else {
        format!("[{at}] <{nick}> {text}")
    }
}

/// The notice that ends a history reply.
pub fn end_of_history(count: usize) -> String {
    let noun = if count == 1 { "message" } else { "messages" };
    format!("end of history ({count} {noun})")
}

/// Error when history cannot be read.
pub fn history_unavailable(reason: &str) -> String {
    format!("history unavailable: {reason}")
}

/// Why history is unavailable with `--no-persist`.
pub const PERSISTENCE_OFF: &str = "persistence is off";

/// `YYYY-MM-DDTHH:MM:SSZ`, the fraction of a second cut off.
fn utc_seconds(millis: i64) -> String {
    const FORMAT: &[time::format_description::FormatItem<'_>] =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time::OffsetDateTime::from_unix_timestamp(millis.div_euclid(1000))
        .ok()
        .and_then(|at| at.format(FORMAT).ok())
        .unwrap_or_else(|| "?".to_string())
}

/// Error for a line over the limit.
pub fn line_too_long(max_line: usize) -> String {
    format!("line too long (max {max_line} bytes)")
}

/// Error to a client refused because the server is at `--max-clients`.
pub fn server_full(max_clients: usize) -> String {
    format!("server full ({max_clients} clients); try again later")
}

/// Refusal when the client's IP address already holds `--max-per-ip` connections.
pub fn too_many_from_address(limit: usize) -> String {
    format!("too many connections from your address ({limit})")
}

/// Error before a client is disconnected for sending overlong lines again and again.
pub fn too_many_overlong(max_line: usize) -> String {
    format!("too many lines over {max_line} bytes; disconnecting")
}

/// Error once per burst to a client over its flood limit: its lines wait, none is lost.
pub fn slow_down(limit: FloodLimit) -> String {
    format!(
        "slow down: more than {} lines/s (bursts of {}); your lines are delayed, not dropped",
        limit.lines_per_sec, limit.burst
    )
}

/// Error for a `/word` that is no command (the welcome line already points to `/help`).
pub const UNKNOWN_COMMAND: &str = "unknown command";

/// Error for a nick that is not allowed.
pub fn invalid_nick() -> String {
    format!("invalid nick: use ASCII letters, digits, - _ . (up to {MAX_NICK_CHARS})")
}

/// Error for a nick someone else has.
pub fn nick_taken(name: &str) -> String {
    format!("nick {name} is taken")
}

/// Error to the sender of a chat message that could not be stored.
pub fn not_saved(content: &str, reason: &str) -> String {
    format!("not saved: \"{}\" ({reason})", quote(content))
}

/// The first `QUOTE_CHARS` characters, with `…` when something was cut.
fn quote(content: &str) -> Cow<'_, str> {
    match content.char_indices().nth(QUOTE_CHARS) {
        Some((cut, _)) => Cow::Owned(format!("{}\u{2026}", &content[..cut])),
        None => Cow::Borrowed(content),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chat_and_commands() {
        assert_eq!(parse("hello"), Command::Chat("hello"));
        assert_eq!(parse("  spaced  "), Command::Chat("  spaced  "));
        assert_eq!(parse("//etc/passwd"), Command::Chat("/etc/passwd"));
        assert_eq!(parse("/nick alice"), Command::Nick("alice"));
        assert_eq!(parse("/nick   bob  "), Command::Nick("bob"));
        assert_eq!(parse("/nick"), Command::Usage("usage: /nick NAME"));
        assert_eq!(parse("/who"), Command::Who);
        assert_eq!(parse("/me waves  "), Command::Me("waves"));
        assert_eq!(parse("/me"), Command::Usage("usage: /me ACTION"));
        assert_eq!(parse("/history"), Command::History(None));
        assert_eq!(parse("/history 5"), Command::History(Some(5)));
        assert_eq!(
            parse("/history 99999999999999999999999"),
            Command::History(Some(usize::MAX))
        );
        for bad in [
            "/history 0",
            "/history x",
            "/history -1",
            "/history 5 6",
            "/history 1.5",
        ] {
            assert_eq!(parse(bad), Command::Usage("usage: /history [N]"), "{bad}");
        }
        assert_eq!(parse("/help"), Command::Help);
        assert_eq!(parse("/quit"), Command::Quit);
        assert_eq!(parse("/dance now"), Command::Unknown);
        assert_eq!(parse(""), Command::Empty);
        assert_eq!(parse(" \t "), Command::Empty);
    }

    #[test]
    fn sanitize_keeps_clean_text_borrowed() {
        assert!(matches!(
            sanitize("héllo\tworld".as_bytes()),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn sanitize_passes_every_printable_ascii_byte_and_only_those() {
        // The printable-ASCII shortcut must agree with the full path byte by byte.
        for byte in 0..=0x7f_u8 {
            let line = [b'a', byte, b'z'];
            let expected = if byte == b'\t' || (b' '..=b'~').contains(&byte) {
                format!("a{}z", byte as char)
            } else if byte == 0x1b {
                "a".to_string() // `ESC z` is a whole escape sequence
            } else {
                "az".to_string()
            };
            assert_eq!(sanitize(&line), expected, "byte {byte:#04x}");
        }
    }

    #[test]
    fn sanitize_removes_escapes_and_controls() {
        assert_eq!(sanitize(b"\x1b[2Jclear"), "clear");
        assert_eq!(sanitize(b"\x1b[1;31mred\x1b[0m"), "red");
        assert_eq!(sanitize(b"\x1b]0;title\x07x"), "x");
        assert_eq!(
            sanitize(b"\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\"),
            "link"
        );
        assert_eq!(sanitize(b"\x1bcreset \x1b(Bcharset"), "reset charset");
        assert_eq!(sanitize(b"a\x00b\x08c\x7fd\re\x07f"), "abcdef");
        assert_eq!(sanitize("x\u{9b}31my".as_bytes()), "xy");
        assert_eq!(sanitize("x\u{9d}0;t\u{9c}y\u{85}z".as_bytes()), "xyz");
        assert_eq!(sanitize(b"cut off \x1b]0;never ends"), "cut off ");
        assert_eq!(sanitize(b"lone escape\x1b"), "lone escape");
    }

    #[test]
    fn sanitize_removes_bidi_controls_but_keeps_zero_width_joiners() {
        // "Trojan Source": a right-to-left override makes `abc` display as `cba`.
        assert_eq!(sanitize("x\u{202e}cba\u{202c}y".as_bytes()), "xcbay");
        for c in ('\u{202a}'..='\u{202e}').chain('\u{2066}'..='\u{2069}') {
            assert_eq!(
                sanitize(format!("a{c}b").as_bytes()),
                "ab",
                "U+{:04X}",
                c as u32
            );
        }
        let family = "\u{1f469}\u{200d}\u{1f467}";
        assert_eq!(sanitize(family.as_bytes()), family);
    }

    #[test]
    fn presence_lists_up_to_five_names_then_counts() {
        let names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace"];
        let line = |n: usize| presence(&names[..n.min(5)], n.saturating_sub(5), "joined");
        assert_eq!(line(1), "alice joined");
        assert_eq!(line(2), "alice and bob joined");
        assert_eq!(line(3), "alice, bob and carol joined");
        assert_eq!(line(5), "alice, bob, carol, dave and erin joined");
        assert_eq!(line(6), "alice, bob, carol, dave, erin and 1 other joined");
        assert_eq!(line(7), "alice, bob, carol, dave, erin and 2 others joined");
        assert_eq!(presence(&names[..2], 0, "left"), "alice and bob left");
    }

    #[test]
    fn sanitize_replaces_invalid_utf8() {
        assert_eq!(sanitize(b"bad \xff\xfe byte"), "bad \u{fffd}\u{fffd} byte");
    }

    #[test]
    fn formats_lines_with_crlf() {
        let mut out = Vec::new();
        write_chat(&mut out, "alice", "hi there");
        write_notice(&mut out, &presence(&["bob"], 0, "joined"));
        write_error(&mut out, &line_too_long(4096));
        assert_eq!(
            out,
            b"<alice> hi there\r\n* bob joined\r\n! line too long (max 4096 bytes)\r\n"
        );
    }

    #[test]
    fn validates_nicks() {
        assert_eq!(validate_nick("alice_1.x-y"), Ok(()));
        assert_eq!(validate_nick("zoë"), Err(NickError::Invalid));
        assert_eq!(
            validate_nick("\u{430}lice"),
            Err(NickError::Invalid),
            "Cyrillic а"
        );
        assert_eq!(validate_nick("alice"), Ok(()));
        assert_eq!(validate_nick(""), Err(NickError::Invalid));
        assert_eq!(validate_nick("127.0.0.1:5000"), Err(NickError::Invalid));
        assert_eq!(validate_nick("a b"), Err(NickError::Invalid));
        assert_eq!(validate_nick(&"x".repeat(33)), Err(NickError::Invalid));
        assert_eq!(validate_nick(&"x".repeat(32)), Ok(()));
    }

    #[test]
    fn not_saved_quotes_at_most_forty_characters() {
        assert_eq!(
            not_saved("short", "db down"),
            "not saved: \"short\" (db down)"
        );
        let long = "é".repeat(50);
        let expected = format!("not saved: \"{}\u{2026}\" (x)", "é".repeat(40));
        assert_eq!(not_saved(&long, "x"), expected);
    }

    #[test]
    fn history_lines_show_utc_seconds() {
        // 2025-11-24T16:00:00.999Z: the fraction is cut, not rounded.
        let at = 1_764_000_000_999;
        let expected_time = "2025-11-24T16:00:00Z";
        assert_eq!(
            history_line(at, "alice", "hi", false),
            format!("[{expected_time}] <alice> hi")
        );
        assert_eq!(
            history_line(at, "alice", "waves", true),
            format!("[{expected_time}] * alice waves")
        );
        assert_eq!(end_of_history(1), "end of history (1 message)");
        assert_eq!(end_of_history(0), "end of history (0 messages)");
        assert_eq!(end_of_history(20), "end of history (20 messages)");
    }

    #[test]
    fn who_counts_and_lists() {
        assert_eq!(who(["a", "b"].into_iter()), "2 online: a, b");
    }
}
