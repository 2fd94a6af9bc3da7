//! Removing telnet protocol commands from a client's byte stream.
//!
//! Real telnet clients send negotiation commands (RFC 854: `IAC` = 0xFF followed by a command,
//! an option, or a whole subnegotiation `IAC SB … IAC SE`), for example when the user presses
//! Ctrl-C (`IAC IP`) or when the client offers its terminal type. They are not chat text and
//! must not reach other clients, so they are cut out before framing. 0xFF never occurs in UTF-8,
//! so plain text passes untouched; an 0xFF that starts no telnet command is kept, and becomes
//! U+FFFD like any invalid byte. The filter keeps its state between reads: a command split
//! across two reads is removed just the same.

/// Interpret As Command: starts every telnet command.
const IAC: u8 = 0xFF;
/// Subnegotiation begin and end.
const SB: u8 = 0xFA;
const SE: u8 = 0xF0;
/// WILL, WONT, DO, DONT: each takes one option byte.
const WILL: u8 = 0xFB;
const DONT: u8 = 0xFE;
/// Longest subnegotiation skipped. Real ones (terminal type, window size) are a few bytes; a
/// stray `IAC SB` in garbage must not swallow the rest of the connection's input.
const MAX_SUBNEGOTIATION: u16 = 256;

/// Where in a telnet command the stream is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum State {
    /// Ordinary data.
    #[default]
    Data,
    /// After IAC.
    Command,
    /// After IAC WILL/WONT/DO/DONT: the option byte comes next.
    Option,
    /// Inside IAC SB …, with the bytes skipped so far.
    Subnegotiation(u16),
    /// After IAC inside a subnegotiation: SE ends it.
    SubnegotiationCommand(u16),
}

/// Telnet command bytes are 240 (SE) to 255 (IAC); after IAC anything lower is data.
const FIRST_COMMAND: u8 = 0xF0;

/// Bytes `filter` needs in front of the input: room to put back an IAC held over from the
/// previous read that turned out to be data.
pub const HEADROOM: usize = 1;

/// Strips telnet commands from one connection's input, across reads.
#[derive(Clone, Copy, Debug, Default)]
pub struct TelnetFilter {
    state: State,
}

/// What one input byte leaves in the data.
enum Keep {
    Nothing,
    Byte(u8),
    /// An IAC that starts no command, and the byte after it.
    IacAnd(u8),
}

impl TelnetFilter {
    /// Removes telnet commands from `buf[HEADROOM..]`, the bytes just read, and returns the
    /// data left. `buf[..HEADROOM]` is scratch space. `IAC IAC`, telnet's escaped 0xFF data
    /// byte, is kept as one 0xFF.
    pub fn filter<'b>(&mut self, buf: &'b mut [u8]) -> &'b [u8] {
        // The common case: no command in progress and none in this read.
        if self.state == State::Data && !buf[HEADROOM..].contains(&IAC) {
            return &buf[HEADROOM..];
        }
        // Writes never overtake reads: each input byte yields at most one output byte, except
        // an `IacAnd`, whose IAC yielded nothing before (in this read, or in the previous one,
        // for which the headroom is kept).
        let mut kept = 0;
        for read in HEADROOM..buf.len() {
            match self.keep(buf[read]) {
                Keep::Nothing => {}
                Keep::Byte(byte) => {
                    buf[kept] = byte;
                    kept += 1;
                }
                Keep::IacAnd(byte) => {
                    buf[kept] = IAC;
                    buf[kept + 1] = byte;
                    kept += 2;
                }
            }
        }
        &buf[..kept]
    }

    /// Advances the state by one byte and says what it leaves in the data.
    fn keep(&mut self, byte: u8) -> Keep {
        let (next, keep) = match (self.state, byte) {
            (State::Data, IAC) => (State::Command, Keep::Nothing),
            (State::Data, _) => (State::Data, Keep::Byte(byte)),
            (State::Command, IAC) => (State::Data, Keep::Byte(IAC)),
            (State::Command, SB) => (State::Subnegotiation(0), Keep::Nothing),
            (State::Command, WILL..=DONT) => (State::Option, Keep::Nothing),
            (State::Command, FIRST_COMMAND..) | (State::Option, _) => (State::Data, Keep::Nothing),
            (State::Command, _) => (State::Data, Keep::IacAnd(byte)),
            (State::Subnegotiation(n), _) if n >= MAX_SUBNEGOTIATION => {
                (State::Data, Keep::Byte(byte))
            }
            (State::Subnegotiation(n), IAC) => (State::SubnegotiationCommand(n + 1), Keep::Nothing),
            (State::Subnegotiation(n), _) => (State::Subnegotiation(n + 1), Keep::Nothing),
            (State::SubnegotiationCommand(_), SE) => (State::Data, Keep::Nothing),
            (State::SubnegotiationCommand(n), _) => (State::Subnegotiation(n + 1), Keep::Nothing),
        };
        self.state = next;
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filtered(chunks: &[&[u8]]) -> Vec<u8> {
        let mut filter = TelnetFilter::default();
        let mut out = Vec::new();
        for chunk in chunks {
            let mut buf = vec![0; HEADROOM];
            buf.extend_from_slice(chunk);
            out.extend_from_slice(filter.filter(&mut buf));
        }
        out
    }

    #[test]
    fn plain_text_and_utf8_pass_untouched() {
        assert_eq!(filtered(&[b"hello \xc3\xa9\r\n"]), b"hello \xc3\xa9\r\n");
    }

    #[test]
    fn negotiation_commands_and_subnegotiations_are_removed() {
        // What Linux telnet sends: DO SUPPRESS-GO-AHEAD, WILL TERMINAL-TYPE, then the type.
        let input = b"\xff\xfd\x03\xff\xfb\x18\xff\xfa\x18\x00XTERM\xff\xf0hi\r\n";
        assert_eq!(filtered(&[input]), b"hi\r\n");
        // Interrupt Process (Ctrl-C), Are You There, No Operation: two bytes each.
        assert_eq!(filtered(&[b"a\xff\xf4b\xff\xf6c\xff\xf1\n"]), b"abc\n");
    }

    #[test]
    fn commands_split_across_reads_are_removed() {
        let input: &[u8] = b"x\xff\xfb\x18y\xff\xfa\x18\x00VT100\xff\xf0z";
        for split in 0..=input.len() {
            let (a, b) = input.split_at(split);
            assert_eq!(filtered(&[a, b]), b"xyz", "split at {split}");
        }
    }

    #[test]
    fn escaped_ff_is_kept_as_one_byte() {
        assert_eq!(filtered(&[b"a\xff\xffb"]), b"a\xffb");
    }

    #[test]
    fn an_ff_that_starts_no_command_is_data_even_across_reads() {
        assert_eq!(filtered(&[b"\xff bad"]), b"\xff bad");
        assert_eq!(filtered(&[b"x\xff", b"yz"]), b"x\xffyz");
        assert_eq!(filtered(&[b"\xff", b"\xff", b"\xff", b"a"]), b"\xff\xffa");
    }

    #[test]
    fn an_unterminated_subnegotiation_gives_up_after_a_bound() {
        let mut input = b"\xff\xfa".to_vec();
        input.extend(std::iter::repeat_n(b'q', MAX_SUBNEGOTIATION as usize));
        input.extend_from_slice(b"after\n");
        let out = filtered(&[&input]);
        assert!(
            out.ends_with(b"after\n"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
        assert!(out.len() <= b"after\n".len() + 1);
    }
}
