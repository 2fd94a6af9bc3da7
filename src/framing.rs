//! Line framing: turns the byte stream of one connection into lines.
//!
//! Pure (no I/O) so it can be tested with any split of the input. A line ends at `\n`; one `\r`
//! before it is dropped, so both `\n` and `\r\n` clients work. The framer keeps only the unfinished
//! tail of the stream, and never more than `max_line + 1` bytes of it (the `+ 1` is a `\r` waiting
//! for its `\n`): a client that sends forever without a newline costs a bounded amount of memory.
//! The bytes of an overlong line are discarded up to the next newline and reported once.

/// What the framer found in the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A whole line without its terminator (`\n` or `\r\n`).
    Line(&'a [u8]),
    /// A line longer than the limit; its bytes are gone, up to and including its newline.
    TooLong,
}

/// Splits one connection's input into lines, holding the unfinished tail between reads.
#[derive(Debug)]
pub struct LineFramer {
    max_line: usize,
    /// Bytes of a line whose newline has not arrived yet.
    tail: Vec<u8>,
    /// True when `tail` holds the line returned last; it is cleared on the next call.
    tail_returned: bool,
    /// True while skipping the rest of an overlong line (already reported).
    discarding: bool,
}

impl LineFramer {
    /// A framer for lines of at most `max_line` bytes, terminator excluded.
    pub fn new(max_line: usize) -> Self {
        LineFramer {
            max_line,
            tail: Vec::new(),
            tail_returned: false,
            discarding: false,
        }
    }

    /// Returns the next frame, consuming the bytes it used from `input`.
    ///
    /// `None` means "need more bytes": everything left in `input` was kept as the tail (or
    /// discarded, for an overlong line) and `input` is empty. Lines that arrive whole in one read
    /// are returned straight from `input`, without copying.
    pub fn next_frame<'f, 'i: 'f>(&'f mut self, input: &mut &'i [u8]) -> Option<Frame<'f>> {
        if self.tail_returned {
            self.tail.clear();
            self.tail_returned = false;
        }
        if self.discarding {
            self.skip_to_newline(input);
        }
        if input.is_empty() {
            return None;
        }
        let Some(at) = input.iter().position(|&b| b == b'\n') else {
            return self.keep_tail(input);
        };
        let head = &input[..at];
        *input = &input[at + 1..];
        if self.tail.is_empty() {
            return Some(frame_of(head, self.max_line));
        }
        if self.tail.len() + head.len() > self.max_line + 1 {
            self.tail.clear();
            return Some(Frame::TooLong);
        }
        self.tail.extend_from_slice(head);
        self.tail_returned = true;
        Some(frame_of(&self.tail, self.max_line))
    }

    /// Bytes held for an unfinished line; zero when idle.
    pub fn buffered(&self) -> usize {
        self.tail.len()
    }

    /// Gives back the tail's allocation when it holds no unfinished line, so an idle
    /// connection holds no buffer. Returns the bytes freed.
    pub fn shrink_if_idle(&mut self) -> usize {
        if !self.tail.is_empty() && !self.tail_returned {
            return 0;
        }
        let freed = self.tail.capacity();
        self.tail = Vec::new();
        self.tail_returned = false;
        freed
    }

    fn skip_to_newline(&mut self, input: &mut &[u8]) {
        match input.iter().position(|&b| b == b'\n') {
            Some(at) => {
                *input = &input[at + 1..];
                self.discarding = false;
            }
            None => *input = &[],
        }
    }

    /// Keeps a newline-less remainder as the tail, or starts discarding once it is too long.
    fn keep_tail(&mut self, input: &mut &[u8]) -> Option<Frame<'static>> {
        let room = (self.max_line + 1).saturating_sub(self.tail.len());
        let rest = std::mem::take(input);
        if rest.len() > room {
            self.tail.clear();
            self.discarding = true;
            return Some(Frame::TooLong);
        }
        self.tail.extend_from_slice(rest);
        None
    }
}

/// A complete line without its `\r`, or `TooLong`.
fn frame_of(line: &[u8], max_line: usize) -> Frame<'_> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > max_line {
        Frame::TooLong
    } else {
        Frame::Line(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Owned frames, so results of different reads can be compared.
    #[derive(Debug, PartialEq, Eq)]
    enum Owned {
        Line(Vec<u8>),
        TooLong,
    }

    fn feed(framer: &mut LineFramer, mut input: &[u8], out: &mut Vec<Owned>) {
        while let Some(frame) = framer.next_frame(&mut input) {
            out.push(match frame {
                Frame::Line(line) => Owned::Line(line.to_vec()),
                Frame::TooLong => Owned::TooLong,
            });
        }
        assert!(input.is_empty(), "framer must consume all input");
    }

    fn frames_in_chunks(max_line: usize, chunks: &[&[u8]]) -> Vec<Owned> {
        let mut framer = LineFramer::new(max_line);
        let mut out = Vec::new();
        for chunk in chunks {
            feed(&mut framer, chunk, &mut out);
            assert!(framer.buffered() <= max_line + 1);
        }
        out
    }

    fn line(text: &str) -> Owned {
        Owned::Line(text.as_bytes().to_vec())
    }

    #[test]
    fn splits_lf_and_crlf_lines() {
        let got = frames_in_chunks(100, &[b"hello\nworld\r\n\nlast"]);
        assert_eq!(got, vec![line("hello"), line("world"), line("")]);
    }

    #[test]
    fn joins_a_line_split_across_reads() {
        let got = frames_in_chunks(100, &[b"he", b"l", b"lo\r", b"\nnext\n"]);
        assert_eq!(got, vec![line("hello"), line("next")]);
    }

    #[test]
    fn a_lone_cr_inside_a_line_is_kept() {
        let got = frames_in_chunks(100, &[b"a\rb\n"]);
        assert_eq!(got, vec![line("a\rb")]);
    }

    #[test]
    fn line_of_exactly_max_is_accepted_with_either_terminator() {
        let got = frames_in_chunks(5, &[b"12345\n12", b"345\r", b"\n"]);
        assert_eq!(got, vec![line("12345"), line("12345")]);
    }

    #[test]
    fn overlong_line_in_one_read_is_reported_and_the_next_line_survives() {
        let got = frames_in_chunks(5, &[b"123456\nok\n"]);
        assert_eq!(got, vec![Owned::TooLong, line("ok")]);
    }

    #[test]
    fn overlong_line_over_many_reads_is_reported_once_and_discarded() {
        let mut chunks: Vec<&[u8]> = vec![b"1234"; 1000];
        chunks.push(b"5678\nafter\n");
        let got = frames_in_chunks(5, &chunks);
        assert_eq!(got, vec![Owned::TooLong, line("after")]);
    }

    #[test]
    fn overlong_line_completed_by_its_newline_read() {
        let got = frames_in_chunks(5, &[b"1234", b"56\nok\n"]);
        assert_eq!(got, vec![Owned::TooLong, line("ok")]);
    }

    #[test]
    fn memory_stays_bounded_without_newlines() {
        let mut framer = LineFramer::new(16);
        let block = [b'x'; 4096];
        let mut out = Vec::new();
        for _ in 0..256 {
            feed(&mut framer, &block, &mut out);
            assert!(framer.buffered() <= 17);
        }
        assert_eq!(out, vec![Owned::TooLong]);
    }

    #[test]
    fn tail_is_released_when_idle() {
        let mut framer = LineFramer::new(100);
        let mut out = Vec::new();
        feed(&mut framer, b"partial", &mut out);
        feed(&mut framer, b" line\n", &mut out);
        framer.shrink_if_idle();
        assert_eq!(framer.buffered(), 0);
        assert_eq!(out, vec![line("partial line")]);
    }

    /// Every way of cutting the input in two or three gives the same frames as one read.
    #[test]
    fn any_split_gives_the_same_frames_as_one_read() {
        let input: &[u8] = b"a\r\nbb\n\r\n0123456789abc\nx\ry\n\nlong-line-here\nz";
        for max_line in [0, 1, 3, 8, 13, 64] {
            let whole = frames_in_chunks(max_line, &[input]);
            for i in 0..=input.len() {
                for j in i..=input.len() {
                    let parts = [&input[..i], &input[i..j], &input[j..]];
                    assert_eq!(
                        frames_in_chunks(max_line, &parts),
                        whole,
                        "max_line {max_line}, cuts at {i} and {j}"
                    );
                }
            }
        }
    }
}
