//! Terminal output in terminal mode: incoming lines above, the input line below.
//!
//! The input line always fits one row (it scrolls sideways when longer), so `\r` + erase-line
//! takes all of it away: each incoming line is written as `\r ESC[K line \r\n` over the input
//! line, and the input line is drawn again once after a whole batch. A burst of lines therefore
//! leaves no prompt copies between them, and one write per batch means no flicker. Everything
//! goes to a buffer first, so only the session's thread ever writes to the terminal.
//!
//! Pure apart from `flush`, which takes any writer, so the drawing is tested on bytes.

use std::io::{self, Write};

use unicode_width::UnicodeWidthChar;

use super::editor::Editor;

/// Shown before the line being typed.
pub const PROMPT: &str = "> ";

/// Erases from the cursor to the end of the row.
const ERASE_LINE: &str = "\x1b[K";

#[derive(Debug)]
pub struct Screen {
    pending: Vec<u8>,
    /// Terminal width in columns.
    width: usize,
    /// First character of the line shown, when it is too long to show whole.
    first: usize,
}

impl Screen {
    pub fn new(width: usize) -> Self {
        Screen {
            pending: Vec::new(),
            width,
            first: 0,
        }
    }

    pub fn set_width(&mut self, width: usize) {
        self.width = width;
    }

    /// Puts one finished line above the input line, taking the input line's place.
    pub fn print_line(&mut self, line: &str) {
        self.pending.extend_from_slice(b"\r");
        self.pending.extend_from_slice(ERASE_LINE.as_bytes());
        self.pending.extend_from_slice(line.as_bytes());
        self.pending.extend_from_slice(b"\r\n");
    }

    /// Draws the prompt and the visible part of the line, and puts the cursor in place.
    pub fn draw_input(&mut self, editor: &Editor) {
        let line = input_line(editor.line(), editor.cursor(), &mut self.first, self.width);
        self.pending.extend_from_slice(line.as_bytes());
    }

    /// Takes the input line away, leaving the cursor at the start of an empty row (on exit).
    pub fn clear_input(&mut self) {
        self.pending.extend_from_slice(b"\r");
        self.pending.extend_from_slice(ERASE_LINE.as_bytes());
    }

    /// Bytes waiting to be written.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Writes everything drawn since the last flush, in one write.
    pub fn flush(&mut self, out: &mut impl Write) -> io::Result<()> {
        out.write_all(&self.pending)?;
        out.flush()?;
        self.pending.clear();
        Ok(())
    }
}

fn width_of(c: char) -> usize {
    c.width().unwrap_or(0)
}

fn columns(chars: &[char]) -> usize {
    chars.iter().map(|&c| width_of(c)).sum()
}

/// The input row: `\r`, prompt, the slice of `line` that fits, erase the rest, then the cursor
/// moved back to its column. The last column is never written, so the terminal never wraps
/// (or holds a pending wrap) on the input row. `first` is kept between calls so the view moves
/// only when the cursor would leave it.
fn input_line(line: &[char], cursor: usize, first: &mut usize, width: usize) -> String {
    let prompt_width = PROMPT.chars().map(width_of).sum::<usize>();
    // Columns for text: the row less the prompt and the last column.
    let room = width.saturating_sub(1 + prompt_width).max(1);
    *first = (*first).min(cursor);
    while columns(&line[*first..cursor]) >= room {
        *first += 1;
    }
    let mut out = format!("\r{PROMPT}");
    let mut used = 0;
    for &c in &line[*first..] {
        used += width_of(c);
        if used > room {
            break;
        }
        out.push(c);
    }
    out.push_str(ERASE_LINE);
    out.push('\r');
    let column = prompt_width + columns(&line[*first..cursor]);
    if column > 0 {
        out.push_str(&format!("\x1b[{column}C"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::keys::Key;

    fn editor(text: &str, left: usize) -> Editor {
        let mut editor = Editor::default();
        for c in text.chars() {
            editor.apply(Key::Char(c));
        }
        for _ in 0..left {
            editor.apply(Key::Left);
        }
        editor
    }

    fn drawn(screen: &mut Screen) -> String {
        let mut out = Vec::new();
        screen.flush(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_burst_is_printed_above_and_the_input_line_drawn_once() {
        let mut screen = Screen::new(80);
        for n in 1..=3 {
            screen.print_line(&format!("<bob> line {n}"));
        }
        screen.draw_input(&editor("hello wor", 0));
        assert_eq!(
            drawn(&mut screen),
            "\r\x1b[K<bob> line 1\r\n\r\x1b[K<bob> line 2\r\n\r\x1b[K<bob> line 3\r\n\
             \r> hello wor\x1b[K\r\x1b[11C"
        );
        assert_eq!(screen.pending(), 0);
    }

    #[test]
    fn the_cursor_column_follows_the_cursor() {
        let mut screen = Screen::new(80);
        screen.draw_input(&editor("hello", 2));
        assert_eq!(drawn(&mut screen), "\r> hello\x1b[K\r\x1b[5C");
        screen.draw_input(&editor("", 0));
        assert_eq!(drawn(&mut screen), "\r> \x1b[K\r\x1b[2C");
        // Wide characters take two columns each.
        screen.draw_input(&editor("日本", 1));
        assert_eq!(drawn(&mut screen), "\r> 日本\x1b[K\r\x1b[4C");
    }

    /// A line longer than the terminal scrolls sideways: the row never wraps, the cursor stays
    /// on it, and the view moves only when the cursor would leave it.
    #[test]
    fn a_long_line_scrolls_sideways_within_one_row() {
        let mut first = 0;
        let line: Vec<char> = "abcdefghijklmnopqrstuvwxyz".chars().collect();
        // Width 12: prompt 2, 9 columns of text, the last column unused.
        let row = input_line(&line, line.len(), &mut first, 12);
        assert_eq!(row, "\r> stuvwxyz\x1b[K\r\x1b[10C");
        assert_eq!(first, 18);
        let row = input_line(&line, 20, &mut first, 12);
        assert_eq!(
            row, "\r> stuvwxyz\x1b[K\r\x1b[4C",
            "moving left within the view"
        );
        let row = input_line(&line, 10, &mut first, 12);
        assert_eq!(
            row, "\r> klmnopqrs\x1b[K\r\x1b[2C",
            "the view follows to the left"
        );
        let row = input_line(&line, 0, &mut first, 12);
        assert_eq!(row, "\r> abcdefghi\x1b[K\r\x1b[2C");
    }

    #[test]
    fn every_row_fits_the_width() {
        let text: Vec<char> = "日本語のテキストと english words 混在".chars().collect();
        for width in [4, 8, 13, 40] {
            let mut first = 0;
            for cursor in 0..=text.len() {
                let row = input_line(&text, cursor, &mut first, width);
                let shown = row
                    .strip_prefix('\r')
                    .and_then(|r| r.split(ERASE_LINE).next())
                    .unwrap();
                let columns: usize = shown.chars().map(width_of).sum();
                assert!(columns < width.max(4), "{width}: {shown:?}");
                let column: usize = row
                    .rsplit("\x1b[")
                    .next()
                    .and_then(|c| c.strip_suffix('C'))
                    .map_or(0, |c| c.parse().unwrap());
                assert!(column < width.max(4), "cursor at {column} of {width}");
                let before: usize = text[first..cursor].iter().map(|&c| width_of(c)).sum();
                assert_eq!(column, 2 + before, "{width} {cursor}: {row:?}");
            }
        }
    }
}
