//! TLS in the tests: the certificates (`certs`, shared with the benches) and a line client
//! over TLS beside `Chat`.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};

pub use super::certs::TestCerts;
use super::DEADLINE;

/// A line client over TLS, verifying the server against the test CA: the TLS twin of `Chat`.
pub struct TlsChat {
    stream: StreamOwned<ClientConnection, TcpStream>,
    /// Bytes read and not yet returned as a line.
    pending: Vec<u8>,
    pub name: String,
}

impl TlsChat {
    /// Connects, completes the handshake and reads the welcome line.
    pub fn connect(addr: SocketAddr, certs: &TestCerts) -> TlsChat {
        TlsChat::over(
            TcpStream::connect(addr).expect("connect to TLS port"),
            certs,
        )
    }

    /// Completes the handshake on a socket already connected to the TLS port, and reads the
    /// welcome line.
    pub fn over(socket: TcpStream, certs: &TestCerts) -> TlsChat {
        let name = ServerName::try_from("localhost").unwrap();
        let session = ClientConnection::new(certs.client_config(), name).expect("TLS session");
        let mut chat = TlsChat {
            stream: StreamOwned::new(session, socket),
            pending: Vec::new(),
            name: String::new(),
        };
        chat.name = super::name_in_welcome(&chat.line());
        chat
    }

    /// Sends one line, adding `\n`.
    pub fn send(&mut self, line: &str) {
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .expect("send over TLS");
        self.stream.flush().expect("flush TLS");
    }

    /// The next line (without `\r\n`); fails the test after `DEADLINE`, or at the end of the
    /// stream.
    pub fn line(&mut self) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                let text = String::from_utf8(line).expect("server sends UTF-8");
                return text.trim_end_matches(['\r', '\n']).to_string();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{}: no line within {DEADLINE:?}",
                self.name
            );
            self.stream.sock.set_read_timeout(Some(left)).unwrap();
            let mut buf = [0u8; 16 * 1024];
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("{}: server closed the connection", self.name),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(err) => panic!("{}: TLS read failed: {err}", self.name),
            }
        }
    }

    /// Reads lines until one matches, returning it.
    pub fn wait_for(&mut self, mut wanted: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            let line = self.line();
            if wanted(&line) {
                return line;
            }
        }
        panic!("{}: expected line did not arrive", self.name);
    }
}

/// Waits up to `limit` for the server to close `socket` (end of stream or reset), reading and
/// dropping what it sends; true if it did.
pub fn closed_within(socket: &mut TcpStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut sink = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        socket.set_read_timeout(Some(left)).unwrap();
        match socket.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
}
