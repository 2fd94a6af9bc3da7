//! Property tests of the input path (telnet filter, line framing, sanitising) on random bytes,
//! and random bytes through a real server. Deterministic: a fixed-seed generator, so a failure
//! names the case that reproduces it.

mod common;

use std::io::Read;

use common::{alice_and_bob, start_without_flood_limit};
use peerchat::framing::{Frame, LineFramer};
use peerchat::protocol::{is_forbidden, sanitize};
use peerchat::telnet::{TelnetFilter, HEADROOM};

/// xorshift64*: small, fast, and good enough to spread test inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Bytes weighted towards the ones the input path treats specially.
    fn byte(&mut self) -> u8 {
        const SPECIAL: &[u8] = &[
            b'\n', b'\r', 0x1b, b'[', b']', b';', b'm', 0x07, 0x00, 0x08, 0x7f, b'\\', 0xff, 0xfb,
            0xfd, 0xfa, 0xf0, 0xf4, 0xc2, 0x9b, 0x9d, 0x85, 0xc3, 0xa9, 0xe2, 0x80,
        ];
        match self.below(4) {
            0 => SPECIAL[self.below(SPECIAL.len())],
            1 => self.next() as u8,
            _ => b' ' + self.below(95) as u8,
        }
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.byte()).collect()
    }
}

/// What the server makes of one connection's input: each line sanitised, or `None` for a line
/// over the limit. Checks the framer's bounds on the way.
fn lines_of(chunks: &[&[u8]], max_line: usize) -> Vec<Option<String>> {
    let mut telnet = TelnetFilter::default();
    let mut framer = LineFramer::new(max_line);
    let mut out = Vec::new();
    for chunk in chunks {
        let mut buf = vec![0; HEADROOM];
        buf.extend_from_slice(chunk);
        let mut input = telnet.filter(&mut buf);
        while let Some(frame) = framer.next_frame(&mut input) {
            out.push(match frame {
                Frame::Line(line) => {
                    assert!(line.len() <= max_line, "line over the limit");
                    Some(sanitize(line).into_owned())
                }
                Frame::TooLong => None,
            });
        }
        assert!(input.is_empty(), "framer left input unconsumed");
        assert!(framer.buffered() <= max_line + 1, "tail over the bound");
    }
    out
}

/// Cuts `input` at random points into 1 to 8 reads.
fn random_split<'a>(rng: &mut Rng, input: &'a [u8]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = (0..rng.below(8))
        .map(|_| rng.below(input.len() + 1))
        .collect();
    cuts.sort_unstable();
    let mut chunks = Vec::new();
    let mut start = 0;
    for cut in cuts {
        chunks.push(&input[start..cut]);
        start = cut;
    }
    chunks.push(&input[start..]);
    chunks
}

#[test]
fn any_split_of_any_input_gives_the_same_safe_lines() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for case in 0..5_000 {
        let max_line = 8 + rng.below(120);
        let len = rng.below(1_000);
        let input = rng.bytes(len);
        let whole = lines_of(&[&input], max_line);
        let chunks = random_split(&mut rng, &input);
        let split = lines_of(&chunks, max_line);
        let sizes: Vec<usize> = chunks.iter().map(|chunk| chunk.len()).collect();
        assert_eq!(
            whole, split,
            "case {case}: reads of {sizes:?} bytes changed the lines"
        );
        for line in whole.iter().flatten() {
            assert!(
                !line.chars().any(is_forbidden),
                "case {case}: forbidden character in {line:?}"
            );
            assert_eq!(
                sanitize(line.as_bytes()),
                line.as_str(),
                "case {case}: not stable"
            );
        }
    }
}

/// Random bytes from one client through the real server: nothing another client receives is a
/// control byte other than the CRLF line ends, and the server keeps serving.
#[test]
fn random_bytes_through_the_server_never_reach_another_terminal_unsafe() {
    let server = start_without_flood_limit();
    let (mut alice, bob) = alice_and_bob(server.addr);
    let mut rng = Rng(42);
    let mut sent = 0;
    while sent < 200_000 {
        // Short lines, so the sender is never cut off for overlong ones.
        let len = rng.below(200);
        let mut line = rng.bytes(len);
        line.retain(|&b| b != b'\n');
        line.push(b'\n');
        sent += line.len();
        alice.send_bytes(&line);
    }
    alice.send("the end");
    let mut bob = bob.into_stream();
    bob.set_read_timeout(Some(common::DEADLINE)).unwrap();
    let mut received = Vec::new();
    let mut buf = vec![0; 1 << 16];
    while !received.ends_with(b"<alice> the end\r\n") {
        let n = bob.read(&mut buf).expect("bob keeps receiving");
        assert!(n > 0, "bob was disconnected");
        received.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8(received).expect("only UTF-8 is delivered");
    for line in text.split_terminator("\r\n") {
        assert!(
            !line.chars().any(is_forbidden),
            "forbidden character delivered: {line:?}"
        );
    }
    assert!(text.lines().count() > 1000, "the lines were delivered");
}
