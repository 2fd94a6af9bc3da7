//! The line being typed: its characters, the cursor, and the lines typed before (Up/Down).
//!
//! Pure state changed by keys, tested without a terminal; drawing it is `screen`'s job.

use super::keys::Key;

/// Earlier lines kept for Up/Down; older ones are forgotten.
const MAX_HISTORY: usize = 500;

/// What a key asks of the session, beyond changing the line.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Only the line changed (or nothing did).
    Edit,
    /// Enter: this line is to be sent; the editor is empty again.
    Submit(String),
    /// Ctrl-D on an empty line.
    EndOfInput,
    /// Ctrl-C.
    Interrupt,
}

#[derive(Debug, Default)]
pub struct Editor {
    line: Vec<char>,
    /// Index into `line`: the cursor stands before `line[cursor]`.
    cursor: usize,
    history: Vec<String>,
    /// Which history entry Up/Down has shown, if any.
    browsing: Option<usize>,
    /// The line being typed before Up was pressed, given back by Down.
    draft: Vec<char>,
}

impl Editor {
    pub fn line(&self) -> &[char] {
        &self.line
    }

    pub fn cursor(&self) -> usize {
        self.cursor
    }

    pub fn apply(&mut self, key: Key) -> Action {
        match key {
            Key::Enter => return Action::Submit(self.submit()),
            Key::Interrupt => return Action::Interrupt,
            Key::EndOfInput if self.line.is_empty() => return Action::EndOfInput,
            Key::EndOfInput | Key::Delete => self.delete(self.cursor..self.cursor + 1),
            Key::Char(c) => self.insert(c),
            Key::Backspace if self.cursor > 0 => self.delete(self.cursor - 1..self.cursor),
            Key::Backspace | Key::Redraw => {}
            Key::Left => self.cursor = self.cursor.saturating_sub(1),
            Key::Right => self.cursor = (self.cursor + 1).min(self.line.len()),
            Key::WordLeft => self.cursor = self.word_start(),
            Key::WordRight => self.cursor = self.word_end(),
            Key::Home => self.cursor = 0,
            Key::End => self.cursor = self.line.len(),
            Key::KillToStart => self.delete(0..self.cursor),
            Key::KillToEnd => self.delete(self.cursor..self.line.len()),
            Key::KillWord => self.delete(self.rubout_start()..self.cursor),
            Key::Up => self.older(),
            Key::Down => self.newer(),
        }
        Action::Edit
    }

    fn insert(&mut self, c: char) {
        self.line.insert(self.cursor, c);
        self.cursor += 1;
    }

    fn delete(&mut self, range: std::ops::Range<usize>) {
        let end = range.end.min(self.line.len());
        if range.start >= end {
            return;
        }
        self.line.drain(range.start..end);
        self.cursor = range.start;
    }

    /// Takes the line, remembering it unless it is blank or the same as the last one.
    fn submit(&mut self) -> String {
        let text: String = self.line.drain(..).collect();
        self.cursor = 0;
        self.browsing = None;
        self.draft.clear();
        let repeat = self.history.last() == Some(&text);
        if !text.trim().is_empty() && !repeat {
            if self.history.len() == MAX_HISTORY {
                self.history.remove(0);
            }
            self.history.push(text.clone());
        }
        text
    }

    fn older(&mut self) {
        let index = match self.browsing {
            None if self.history.is_empty() => return,
            None => {
                self.draft = std::mem::take(&mut self.line);
                self.history.len() - 1
            }
            Some(0) => return,
            Some(index) => index - 1,
        };
        self.show(index);
    }

    fn newer(&mut self) {
        let Some(index) = self.browsing else {
            return;
        };
        if index + 1 < self.history.len() {
            self.show(index + 1);
        } else {
            self.browsing = None;
            self.line = std::mem::take(&mut self.draft);
            self.cursor = self.line.len();
        }
    }

    fn show(&mut self, index: usize) {
        self.browsing = Some(index);
        self.line = self.history[index].chars().collect();
        self.cursor = self.line.len();
    }

    /// Start of the word before the cursor, as Alt-b and Ctrl-Left go (letters and digits).
    fn word_start(&self) -> usize {
        let mut at = self.cursor;
        while at > 0 && !self.line[at - 1].is_alphanumeric() {
            at -= 1;
        }
        while at > 0 && self.line[at - 1].is_alphanumeric() {
            at -= 1;
        }
        at
    }

    fn word_end(&self) -> usize {
        let mut at = self.cursor;
        while at < self.line.len() && !self.line[at].is_alphanumeric() {
            at += 1;
        }
        while at < self.line.len() && self.line[at].is_alphanumeric() {
            at += 1;
        }
        at
    }

    /// Where Ctrl-W deletes from: back over spaces, then over the word (up to a space), as in
    /// a shell.
    fn rubout_start(&self) -> usize {
        let mut at = self.cursor;
        while at > 0 && self.line[at - 1].is_whitespace() {
            at -= 1;
        }
        while at > 0 && !self.line[at - 1].is_whitespace() {
            at -= 1;
        }
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(editor: &mut Editor, text: &str) {
        for c in text.chars() {
            editor.apply(Key::Char(c));
        }
    }

    fn state(editor: &Editor) -> (String, usize) {
        (editor.line().iter().collect(), editor.cursor())
    }

    #[test]
    fn typing_moving_and_deleting() {
        let mut editor = Editor::default();
        typed(&mut editor, "helo wrld");
        editor.apply(Key::Home);
        for _ in 0..3 {
            editor.apply(Key::Right);
        }
        typed(&mut editor, "l");
        assert_eq!(state(&editor), ("hello wrld".into(), 4));
        editor.apply(Key::End);
        editor.apply(Key::Left);
        editor.apply(Key::Left);
        editor.apply(Key::Left);
        typed(&mut editor, "o");
        assert_eq!(state(&editor), ("hello world".into(), 8));
        editor.apply(Key::Backspace);
        editor.apply(Key::Delete);
        assert_eq!(state(&editor), ("hello wld".into(), 7));
        editor.apply(Key::End);
        editor.apply(Key::Right);
        editor.apply(Key::Delete);
        assert_eq!(
            state(&editor),
            ("hello wld".into(), 9),
            "nothing past the end"
        );
        editor.apply(Key::Home);
        editor.apply(Key::Left);
        editor.apply(Key::Backspace);
        assert_eq!(
            state(&editor),
            ("hello wld".into(), 0),
            "nothing before the start"
        );
    }

    #[test]
    fn control_keys_kill_parts_of_the_line() {
        let mut editor = Editor::default();
        typed(&mut editor, "say hello  there");
        editor.apply(Key::KillWord);
        assert_eq!(state(&editor), ("say hello  ".into(), 11));
        editor.apply(Key::KillWord);
        assert_eq!(state(&editor), ("say ".into(), 4));
        typed(&mut editor, "bye now");
        editor.apply(Key::WordLeft);
        assert_eq!(editor.cursor(), 8);
        editor.apply(Key::KillToEnd);
        assert_eq!(state(&editor), ("say bye ".into(), 8));
        editor.apply(Key::WordLeft);
        editor.apply(Key::KillToStart);
        assert_eq!(state(&editor), ("bye ".into(), 0));
        editor.apply(Key::WordRight);
        assert_eq!(editor.cursor(), 3);
    }

    #[test]
    fn enter_submits_and_ctrl_d_ends_input_only_on_an_empty_line() {
        let mut editor = Editor::default();
        typed(&mut editor, "ab");
        editor.apply(Key::Left);
        assert_eq!(
            editor.apply(Key::EndOfInput),
            Action::Edit,
            "deletes instead"
        );
        assert_eq!(editor.apply(Key::Enter), Action::Submit("a".into()));
        assert_eq!(state(&editor), (String::new(), 0));
        assert_eq!(editor.apply(Key::EndOfInput), Action::EndOfInput);
        assert_eq!(editor.apply(Key::Interrupt), Action::Interrupt);
    }

    #[test]
    fn up_and_down_walk_the_history_and_give_the_draft_back() {
        let mut editor = Editor::default();
        for line in ["first", "second", "second", "   "] {
            typed(&mut editor, line);
            editor.apply(Key::Enter);
        }
        typed(&mut editor, "draft");
        editor.apply(Key::Up);
        assert_eq!(
            state(&editor),
            ("second".into(), 6),
            "no repeats, no blanks"
        );
        editor.apply(Key::Up);
        assert_eq!(state(&editor), ("first".into(), 5));
        editor.apply(Key::Up);
        assert_eq!(state(&editor), ("first".into(), 5), "stays at the oldest");
        editor.apply(Key::Down);
        assert_eq!(state(&editor), ("second".into(), 6));
        editor.apply(Key::Down);
        assert_eq!(state(&editor), ("draft".into(), 5));
        editor.apply(Key::Down);
        assert_eq!(state(&editor), ("draft".into(), 5));
        editor.apply(Key::Up);
        typed(&mut editor, "!");
        assert_eq!(editor.apply(Key::Enter), Action::Submit("second!".into()));
    }

    #[test]
    fn history_is_bounded() {
        let mut editor = Editor::default();
        for n in 0..MAX_HISTORY + 10 {
            typed(&mut editor, &n.to_string());
            editor.apply(Key::Enter);
        }
        for _ in 0..MAX_HISTORY + 10 {
            editor.apply(Key::Up);
        }
        assert_eq!(state(&editor).0, "10");
    }
}
