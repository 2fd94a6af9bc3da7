//! What a connection's bytes travel through: the TCP socket itself, or TLS over it.
//!
//! TLS follows rustls' own `tlsserver-mio` example: TLS records are read from the socket
//! (`read_tls`), decrypted (`process_new_packets`) and the plaintext taken (`reader`); outgoing
//! plaintext is encrypted into records (`writer`) and those are written (`write_tls`), each
//! until the socket says `WouldBlock`. Both kinds look like a nonblocking stream to
//! `Connection`, which keeps its framing, buffers and limits unchanged inside TLS. Each
//! connection encrypts its own output: TLS keys are per connection.

use std::io::{self, ErrorKind, Read, Write};
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::{ServerConfig, ServerConnection};

/// A client's byte stream, plain or TLS.
#[derive(Debug)]
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

/// A socket and the TLS session over it.
#[derive(Debug)]
pub struct TlsStream {
    socket: TcpStream,
    session: ServerConnection,
}

/// Bytes that crossed the network: TLS records count, not the plaintext inside.
#[derive(Clone, Copy, Debug, Default)]
pub struct WireBytes {
    pub received: u64,
    pub sent: u64,
}

impl WireBytes {
    pub fn add(&mut self, other: WireBytes) {
        self.received += other.received;
        self.sent += other.sent;
    }
}

impl Transport {
    /// A TLS session, handshake not yet started, over an accepted socket.
    pub fn tls(socket: TcpStream, config: &Arc<ServerConfig>) -> io::Result<Transport> {
        let session = ServerConnection::new(Arc::clone(config)).map_err(io::Error::other)?;
        Ok(Transport::Tls(Box::new(TlsStream { socket, session })))
    }

    pub fn socket(&mut self) -> &mut TcpStream {
        match self {
            Transport::Plain(socket) => socket,
            Transport::Tls(tls) => &mut tls.socket,
        }
    }

    /// True while a TLS handshake has not finished; never for plain TCP.
    pub fn is_handshaking(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(tls) => tls.session.is_handshaking(),
        }
    }

    /// True if TLS records (handshake messages, alerts, or encrypted output) wait to be
    /// written: the connection needs a flush even with no plaintext of its own pending.
    pub fn has_records_to_send(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(tls) => tls.session.wants_write(),
        }
    }

    /// Reads plaintext, as `Read::read` on a nonblocking socket: `Ok(0)` at the end of the
    /// stream, `WouldBlock` when nothing more has arrived. `wire` counts what the network
    /// carried.
    pub fn read(&mut self, buf: &mut [u8], wire: &mut WireBytes) -> io::Result<usize> {
        match self {
            Transport::Plain(socket) => {
                let read = socket.read(buf)?;
                wire.received += read as u64;
                Ok(read)
            }
            Transport::Tls(tls) => tls.read(buf, wire),
        }
    }

    /// Takes plaintext to send, as `Write::write` on a nonblocking socket. With TLS, the bytes
    /// taken are encrypted and at least partly written; `send_records` writes the rest.
    pub fn write(&mut self, data: &[u8], wire: &mut WireBytes) -> io::Result<usize> {
        match self {
            Transport::Plain(socket) => {
                let written = socket.write(data)?;
                wire.sent += written as u64;
                Ok(written)
            }
            Transport::Tls(tls) => tls.write(data, wire),
        }
    }

    /// Writes the TLS records still waiting; `WouldBlock` if the socket is full first.
    pub fn send_records(&mut self, wire: &mut WireBytes) -> io::Result<()> {
        match self {
            Transport::Plain(_) => Ok(()),
            Transport::Tls(tls) => tls.send_records(wire),
        }
    }

    /// Ends the stream cleanly before the FIN: a TLS `close_notify` tells the client no data
    /// was cut off.
    pub fn close_notify(&mut self, wire: &mut WireBytes) {
        if let Transport::Tls(tls) = self {
            tls.session.send_close_notify();
            let _ = tls.send_records(wire);
        }
    }
}

impl TlsStream {
    fn read(&mut self, buf: &mut [u8], wire: &mut WireBytes) -> io::Result<usize> {
        loop {
            match self.session.reader().read(buf) {
                Ok(read) => return Ok(read),
                Err(err) if err.kind() == ErrorKind::WouldBlock => {}
                // The TCP stream ended without a `close_notify`: many clients end so, and the
                // lines before it were whole; an end like any other.
                Err(err) if err.kind() == ErrorKind::UnexpectedEof => return Ok(0),
                Err(err) => return Err(err),
            }
            let read = self.session.read_tls(&mut self.socket)?;
            wire.received += read as u64;
            if let Err(err) = self.session.process_new_packets() {
                // Tell the client why (a TLS alert) before the connection is closed.
                let _ = self.send_records(wire);
                return Err(io::Error::new(ErrorKind::InvalidData, err));
            }
            if read == 0 {
                return Ok(0);
            }
            // Handshake replies go out at once; what does not fit waits for the next flush.
            match self.send_records(wire) {
                Err(err) if err.kind() != ErrorKind::WouldBlock => return Err(err),
                _ => {}
            }
        }
    }

    fn write(&mut self, data: &[u8], wire: &mut WireBytes) -> io::Result<usize> {
        // Records already encrypted go first: rustls holds a bounded amount (64 KiB) and
        // takes no more plaintext while it is full.
        self.send_records(wire)?;
        let taken = self.session.writer().write(data)?;
        if taken == 0 {
            // Nothing taken: the handshake is not finished and its buffer is full.
            return Err(ErrorKind::WouldBlock.into());
        }
        match self.send_records(wire) {
            Err(err) if err.kind() != ErrorKind::WouldBlock => Err(err),
            _ => Ok(taken),
        }
    }

    fn send_records(&mut self, wire: &mut WireBytes) -> io::Result<()> {
        while self.session.wants_write() {
            match self.session.write_tls(&mut self.socket) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(written) => wire.sent += written as u64,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
}
