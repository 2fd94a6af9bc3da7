//! Reaching the server and reading from it, for every mode: a connect (and TLS handshake)
//! bounded by `--connect-timeout`, lines read with a bound (the server is not trusted to end
//! its lines), and the backoff between reconnect attempts.
//!
//! Its own file because these are the only parts of the client that know where the server is;
//! the reader and the backoff are written over `Read` and a seed so they are tested without
//! sockets. TLS itself is `tls` (trust, handshake) and `stream` (the shared session).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::stream::ServerStream;
use super::tls::Tls;
use crate::config::ClientConfig;
use crate::error::Error;

/// TCP keepalive idle time on the client's socket: after its input ends the client waits for the
/// server to close, however long the server takes to work through a flood-delayed file, and
/// keepalive is what tells it the server's host is gone. In terminal mode it is also what
/// notices a server host that vanished while nobody was talking.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);

/// Where the server is and how to speak to it: what every connect (the first, each reconnect)
/// needs, made once at start so a bad `--tls-ca` file is reported before anything else.
#[derive(Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// Bound on one connect (per address) and on the TLS handshake after it.
    timeout: Duration,
    tls: Option<Tls>,
}

impl Endpoint {
    pub fn new(config: &ClientConfig) -> Result<Self, Error> {
        let tls = match &config.tls {
            Some(trust) => Some(Tls::new(trust, &config.host)?),
            None => None,
        };
        Ok(Endpoint {
            host: config.host.clone(),
            port: config.port,
            timeout: config.connect_timeout,
            tls,
        })
    }

    /// Connects and, with TLS, completes the handshake, each within the timeout: a server
    /// that accepts and then never answers the handshake fails as fast as a dead route.
    pub fn connect(&self) -> Result<ServerStream, Error> {
        let mut tcp = connect(&self.host, self.port, self.timeout)?;
        let Some(tls) = &self.tls else {
            return Ok(ServerStream::plain(tcp));
        };
        let addr = format!("{}:{}", self.host, self.port);
        let session = tls.handshake(&mut tcp, self.timeout, &addr)?;
        Ok(ServerStream::tls(tcp, session))
    }
}

/// Connects to `host:port`, trying each address the name resolves to for at most `timeout`,
/// so a dead route fails in seconds instead of after the system's minutes of SYN retries.
fn connect(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, Error> {
    let addrs = (host, port)
        .to_socket_addrs()
        .map_err(|source| Error::Resolve {
            host: host.to_string(),
            source,
        })?;
    let mut last_error = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => {
                set_keepalive(&stream)?;
                return Ok(stream);
            }
            Err(err) => last_error = Some(err),
        }
    }
    Err(Error::Connect {
        addr: format!("{host}:{port}"),
        source: last_error
            .unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the name has no address")),
    })
}

fn set_keepalive(stream: &TcpStream) -> io::Result<()> {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_IDLE / 3)
        .with_retries(3);
    socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)
}

/// Sends one line with the `\n` the server expects, in one write so it is never interleaved.
pub fn send_line(stream: &mut impl Write, line: &[u8]) -> io::Result<()> {
    let mut framed = Vec::with_capacity(line.len() + 1);
    framed.extend_from_slice(line);
    framed.push(b'\n');
    stream.write_all(&framed)
}

/// One line from the server, without its `\r\n`.
#[derive(Debug, PartialEq, Eq)]
pub struct ServerLine {
    /// At most the reader's bound.
    pub bytes: Vec<u8>,
    /// The line was longer than the bound; the rest of it was read and dropped.
    pub cut: bool,
}

/// Reads lines holding at most `max` bytes of any one: a server that never sends `\n` costs
/// the client `max` bytes of memory, not everything it sends.
pub struct LineReader<R> {
    inner: BufReader<R>,
    max: usize,
}

impl<R: Read> LineReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        LineReader {
            inner: BufReader::new(inner),
            max,
        }
    }

    /// The next line; `None` once the server has closed. A last line without `\n` is still
    /// returned, as the server wrote it.
    pub fn next_line(&mut self) -> io::Result<Option<ServerLine>> {
        let mut line = ServerLine {
            bytes: Vec::new(),
            cut: false,
        };
        loop {
            let available = match self.inner.fill_buf() {
                Ok(available) => available,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            };
            if available.is_empty() {
                let empty = line.bytes.is_empty() && !line.cut;
                return Ok((!empty).then_some(line));
            }
            let newline = available.iter().position(|&b| b == b'\n');
            let mut content = &available[..newline.unwrap_or(available.len())];
            if newline.is_some() {
                content = content.strip_suffix(b"\r").unwrap_or(content);
            }
            let room = self.max - line.bytes.len();
            line.bytes
                .extend_from_slice(&content[..content.len().min(room)]);
            line.cut |= content.len() > room;
            let used = newline.map_or(available.len(), |at| at + 1);
            let nothing_before_newline = content.is_empty();
            self.inner.consume(used);
            if newline.is_some() {
                // A `\r` that came in the read before its `\n`.
                if nothing_before_newline && !line.cut && line.bytes.last() == Some(&b'\r') {
                    line.bytes.pop();
                }
                return Ok(Some(line));
            }
        }
    }
}

/// Wait before the first reconnect attempt; it doubles after each failed one.
const FIRST_DELAY: Duration = Duration::from_secs(1);
/// Longest wait between attempts: a server down for an hour is retried twice a minute.
const MAX_DELAY: Duration = Duration::from_secs(30);
/// Each wait is moved by up to this fraction either way, so clients dropped together by one
/// server restart do not all come back in the same instant.
const JITTER: f64 = 0.2;

/// Delays between reconnect attempts: 1 s doubling to 30 s, each ±20%, back to 1 s once a
/// connection has worked (the server welcomed us).
#[derive(Debug)]
pub struct Backoff {
    step: Duration,
    random: u64,
}

impl Backoff {
    /// A backoff whose jitter comes from `seed`. The seed is mixed first (splitmix64), so
    /// seeds that differ in one bit still start far apart; xorshift's state must not be zero.
    pub fn new(seed: u64) -> Self {
        let mut mixed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Backoff {
            step: FIRST_DELAY,
            random: (mixed ^ (mixed >> 31)).max(1),
        }
    }

    /// A backoff seeded from the clock and the process's hash keys: no two clients alike, and
    /// no random-number crate for one number per attempt.
    pub fn unpredictable() -> Self {
        let mut hasher = RandomState::new().build_hasher();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos());
        hasher.write_u128(nanos);
        hasher.write_u32(std::process::id());
        Backoff::new(hasher.finish())
    }

    /// The wait before the next attempt; the step after it is twice as long.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(MAX_DELAY);
        let unit = self.next_unit();
        step.mul_f64(1.0 + JITTER * (2.0 * unit - 1.0))
            .min(MAX_DELAY)
    }

    /// Back to the first delay: the last connection worked.
    pub fn reset(&mut self) {
        self.step = FIRST_DELAY;
    }

    /// A number in `[0, 1)` (xorshift64*; plenty for spreading reconnects).
    fn next_unit(&mut self) -> f64 {
        self.random ^= self.random >> 12;
        self.random ^= self.random << 25;
        self.random ^= self.random >> 27;
        let mixed = self.random.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (mixed >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<ServerLine> {
        let mut reader = LineReader::new(input, max);
        let mut out = Vec::new();
        while let Some(line) = reader.next_line().expect("reading a slice") {
            out.push(line);
        }
        out
    }

    fn line(text: &str, cut: bool) -> ServerLine {
        ServerLine {
            bytes: text.as_bytes().to_vec(),
            cut,
        }
    }

    #[test]
    fn lines_lose_their_crlf_and_a_last_partial_line_is_kept() {
        assert_eq!(
            lines(b"* one\r\n<a> two\n\r\nlast", 100),
            [
                line("* one", false),
                line("<a> two", false),
                line("", false),
                line("last", false)
            ]
        );
        assert!(lines(b"", 100).is_empty());
    }

    #[test]
    fn an_overlong_line_is_cut_and_its_rest_dropped() {
        let mut input = vec![b'x'; 100_000];
        input.extend_from_slice(b"\r\nnext\r\n");
        assert_eq!(
            lines(&input, 10),
            [line("xxxxxxxxxx", true), line("next", false)]
        );
        // Exactly at the bound is not cut.
        assert_eq!(lines(b"0123456789\r\n", 10), [line("0123456789", false)]);
        assert_eq!(lines(b"0123456789x", 10), [line("0123456789", true)]);
    }

    /// Lines split over many small reads come out the same as from one read.
    #[test]
    fn lines_survive_any_read_size() {
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(3).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let input = b"<alice> hello there\r\n* a notice\r\n";
        let mut reader = LineReader::new(Trickle(input), 12);
        let first = reader.next_line().unwrap().unwrap();
        assert_eq!(first, line("<alice> hell", true));
        let second = reader.next_line().unwrap().unwrap();
        assert_eq!(second, line("* a notice", false));
        assert_eq!(reader.next_line().unwrap(), None);
    }

    #[test]
    fn backoff_doubles_to_thirty_seconds_with_jitter_and_resets() {
        let mut backoff = Backoff::new(42);
        let steps = [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0];
        for step in steps {
            let delay = backoff.next_delay().as_secs_f64();
            assert!(
                delay >= step * 0.8 && delay <= (step * 1.2).min(30.0),
                "{delay} for a step of {step}"
            );
        }
        backoff.reset();
        let delay = backoff.next_delay().as_secs_f64();
        assert!((0.8..=1.2).contains(&delay), "{delay}");
    }

    #[test]
    fn jitter_spreads_clients_apart() {
        let firsts: Vec<Duration> = (1..=20)
            .map(|seed| Backoff::new(seed).next_delay())
            .collect();
        let distinct: std::collections::HashSet<_> = firsts.iter().collect();
        assert!(distinct.len() > 15, "{firsts:?}");
        let below = firsts.iter().filter(|d| d.as_secs_f64() < 1.0).count();
        assert!(below > 0 && below < 20, "both sides of 1 s: {firsts:?}");
    }
}
