//! Bytes from a terminal in raw mode turned into keys: UTF-8 text, control keys, and the
//! escape sequences of arrows, Home/End and Delete in the forms xterm, the Linux console,
//! tmux and screen send. A sequence or character split across reads is completed by the next.
//!
//! Pure, so every sequence is tested without a terminal.

use crate::protocol;

/// What the line editor acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    Char(char),
    Enter,
    Backspace,
    Delete,
    Left,
    Right,
    WordLeft,
    WordRight,
    Home,
    End,
    Up,
    Down,
    /// Ctrl-U: delete from the start of the line to the cursor.
    KillToStart,
    /// Ctrl-K: delete from the cursor to the end of the line.
    KillToEnd,
    /// Ctrl-W: delete the word before the cursor.
    KillWord,
    /// Ctrl-C: in raw mode it is a byte, not SIGINT.
    Interrupt,
    /// Ctrl-D: end of input on an empty line, else Delete.
    EndOfInput,
    /// Ctrl-L: draw the input line again.
    Redraw,
}

/// Longest escape sequence kept while waiting for its end; longer ones are not keys we know
/// and are dropped, so a stray ESC cannot make the parser hold input for ever.
const MAX_SEQUENCE: usize = 16;

/// Keeps an incomplete sequence between reads.
#[derive(Debug, Default)]
pub struct KeyParser {
    pending: Vec<u8>,
}

/// One step of parsing: a key (or nothing, for bytes that mean nothing to us) and the bytes it
/// took, or a sequence that needs more bytes.
enum Step {
    Key(Option<Key>, usize),
    Incomplete,
}

impl KeyParser {
    /// The keys in `bytes`, plus any sequence the previous read left unfinished.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Key> {
        self.pending.extend_from_slice(bytes);
        let mut keys = Vec::new();
        let mut at = 0;
        while at < self.pending.len() {
            match step(&self.pending[at..]) {
                Step::Key(key, used) => {
                    keys.extend(key);
                    at += used;
                }
                Step::Incomplete => break,
            }
        }
        self.pending.drain(..at);
        keys
    }
}

fn step(bytes: &[u8]) -> Step {
    match bytes[0] {
        0x1b => escape(bytes),
        byte @ (0x00..=0x1f | 0x7f) => Step::Key(control(byte), 1),
        0x20..=0x7e => Step::Key(Some(Key::Char(char::from(bytes[0]))), 1),
        _ => utf8(bytes),
    }
}

fn control(byte: u8) -> Option<Key> {
    Some(match byte {
        0x01 => Key::Home,
        0x02 => Key::Left,
        0x03 => Key::Interrupt,
        0x04 => Key::EndOfInput,
        0x05 => Key::End,
        0x06 => Key::Right,
        0x08 | 0x7f => Key::Backspace,
        // A pasted tab would be one character showing as up to eight columns.
        0x09 => Key::Char(' '),
        0x0b => Key::KillToEnd,
        0x0c => Key::Redraw,
        0x0a | 0x0d => Key::Enter,
        0x0e => Key::Down,
        0x10 => Key::Up,
        0x15 => Key::KillToStart,
        0x17 => Key::KillWord,
        _ => return None,
    })
}

/// A multi-byte character; invalid bytes are skipped one at a time.
fn utf8(bytes: &[u8]) -> Step {
    let len = match bytes[0] {
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => return Step::Key(None, 1),
    };
    if bytes.len() < len {
        // Only wait if what came so far can still become a character.
        return match std::str::from_utf8(bytes) {
            Err(err) if err.error_len().is_none() => Step::Incomplete,
            _ => Step::Key(None, 1),
        };
    }
    match std::str::from_utf8(&bytes[..len]) {
        Ok(text) => {
            let c = text.chars().next().unwrap_or('\u{fffd}');
            // Bidi overrides and C1 controls are not typed on purpose; the server drops them.
            let key = (!protocol::is_forbidden(c)).then_some(Key::Char(c));
            Step::Key(key, len)
        }
        Err(_) => Step::Key(None, 1),
    }
}

/// ESC: `ESC [ …` (CSI), `ESC O x` (SS3, application cursor keys), Alt-b/f/Backspace; any
/// other ESC is dropped alone and what follows is read as usual.
fn escape(bytes: &[u8]) -> Step {
    match bytes.get(1) {
        None => Step::Incomplete,
        Some(b'[') => csi(bytes),
        Some(b'O') => match bytes.get(2) {
            None => Step::Incomplete,
            Some(&last) => Step::Key(final_key(last, &[]), 3),
        },
        Some(b'b') => Step::Key(Some(Key::WordLeft), 2),
        Some(b'f') => Step::Key(Some(Key::WordRight), 2),
        Some(0x7f) => Step::Key(Some(Key::KillWord), 2),
        Some(_) => Step::Key(None, 1),
    }
}

/// `ESC [ params final`, e.g. `ESC [ C`, `ESC [ 3 ~`, `ESC [ 1 ; 5 D`.
fn csi(bytes: &[u8]) -> Step {
    let body = &bytes[2..];
    let Some(end) = body.iter().position(|b| (0x40..=0x7e).contains(b)) else {
        if body.iter().any(|b| !(0x20..=0x3f).contains(b)) {
            return Step::Key(None, 2); // not a sequence: read what follows `ESC [` as usual
        }
        if bytes.len() >= MAX_SEQUENCE {
            return Step::Key(None, bytes.len());
        }
        return Step::Incomplete;
    };
    if body[..end].iter().any(|b| !(0x20..=0x3f).contains(b)) {
        return Step::Key(None, 2 + end + 1);
    }
    let params: Vec<u32> = std::str::from_utf8(&body[..end])
        .unwrap_or_default()
        .split(';')
        .map(|p| p.parse().unwrap_or(0))
        .collect();
    Step::Key(final_key(body[end], &params), 2 + end + 1)
}

/// The key a sequence's final byte names; with a modifier (`1;5` Ctrl, `1;3` Alt) the left and
/// right arrows move by words.
fn final_key(last: u8, params: &[u32]) -> Option<Key> {
    let modified = params.get(1).is_some_and(|&m| m > 1);
    Some(match last {
        b'A' => Key::Up,
        b'B' => Key::Down,
        b'C' if modified => Key::WordRight,
        b'D' if modified => Key::WordLeft,
        b'C' => Key::Right,
        b'D' => Key::Left,
        b'H' => Key::Home,
        b'F' => Key::End,
        b'~' => match params.first() {
            Some(1 | 7) => Key::Home,
            Some(4 | 8) => Key::End,
            Some(3) => Key::Delete,
            _ => return None,
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(bytes: &[u8]) -> Vec<Key> {
        KeyParser::default().feed(bytes)
    }

    #[test]
    fn text_and_control_keys() {
        assert_eq!(
            keys("hé\u{1f600}\r".as_bytes()),
            [
                Key::Char('h'),
                Key::Char('é'),
                Key::Char('\u{1f600}'),
                Key::Enter
            ]
        );
        assert_eq!(
            keys(b"\x01\x05\x15\x17\x0b\x03\x04\x7f\x08\x0c\x10\x0e\x02\x06"),
            [
                Key::Home,
                Key::End,
                Key::KillToStart,
                Key::KillWord,
                Key::KillToEnd,
                Key::Interrupt,
                Key::EndOfInput,
                Key::Backspace,
                Key::Backspace,
                Key::Redraw,
                Key::Up,
                Key::Down,
                Key::Left,
                Key::Right
            ]
        );
        assert_eq!(keys(b"\t\x00\x1a"), [Key::Char(' ')]);
    }

    #[test]
    fn arrows_home_end_and_delete_in_every_form() {
        let cases: [(&[u8], Key); 16] = [
            (b"\x1b[A", Key::Up),
            (b"\x1b[B", Key::Down),
            (b"\x1b[C", Key::Right),
            (b"\x1b[D", Key::Left),
            (b"\x1bOA", Key::Up),
            (b"\x1bOD", Key::Left),
            (b"\x1b[H", Key::Home),
            (b"\x1b[F", Key::End),
            (b"\x1bOH", Key::Home),
            (b"\x1bOF", Key::End),
            (b"\x1b[1~", Key::Home),
            (b"\x1b[7~", Key::Home),
            (b"\x1b[4~", Key::End),
            (b"\x1b[8~", Key::End),
            (b"\x1b[3~", Key::Delete),
            (b"\x1b[1;5D", Key::WordLeft),
        ];
        for (bytes, key) in cases {
            assert_eq!(keys(bytes), [key], "{bytes:?}");
        }
        assert_eq!(
            keys(b"\x1b[1;5C\x1bb\x1bf"),
            [Key::WordRight, Key::WordLeft, Key::WordRight]
        );
    }

    #[test]
    fn sequences_and_characters_split_across_reads() {
        let mut parser = KeyParser::default();
        assert_eq!(parser.feed(b"a\x1b"), [Key::Char('a')]);
        assert_eq!(parser.feed(b"["), []);
        assert_eq!(parser.feed(b"3"), []);
        assert_eq!(parser.feed(b"~b"), [Key::Delete, Key::Char('b')]);
        let snowman = "\u{2603}".as_bytes();
        assert_eq!(parser.feed(&snowman[..1]), []);
        assert_eq!(parser.feed(&snowman[1..2]), []);
        assert_eq!(parser.feed(&snowman[2..]), [Key::Char('\u{2603}')]);
    }

    #[test]
    fn unknown_and_broken_input_is_dropped_without_losing_what_follows() {
        assert_eq!(keys(b"\x1b[99Zx"), [Key::Char('x')]);
        assert_eq!(keys(b"\x1bxy"), [Key::Char('x'), Key::Char('y')]);
        assert_eq!(keys(b"\xff\xc3z"), [Key::Char('z')]);
        assert_eq!(
            keys("a\u{202e}b".as_bytes()),
            [Key::Char('a'), Key::Char('b')]
        );
        let mut parser = KeyParser::default();
        let endless = [b"\x1b[".as_slice(), &[b'1'; 20]].concat();
        assert_eq!(parser.feed(&endless), []);
        assert_eq!(
            parser.feed(b"q"),
            [Key::Char('q')],
            "an endless sequence is given up"
        );
    }
}
