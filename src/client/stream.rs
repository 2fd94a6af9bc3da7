//! The connection to the server as the modes use it: plain TCP or TLS, read by one thread
//! while another writes, as both modes do (a reader thread for server lines, the main thread
//! sending).
//!
//! A plain `TcpStream` is simply cloned. A TLS session cannot be: both directions go through
//! one `rustls::ClientConnection`. So each handle has its own clone of the socket, and the
//! session is shared behind a mutex that is held only while bytes move in or out of it, never
//! while waiting on the socket:
//!
//! - The reader waits in a plain blocking read of the socket (so `shutdown`, read timeouts and
//!   keepalive end the wait as on plain TCP), then locks the session to decrypt what came.
//! - The writer locks the session to encrypt a line, takes the records out, unlocks, and only
//!   then writes them to the socket. A writer blocked on a full socket (a long file under the
//!   server's flood control) therefore never stops the reader taking the server's lines.
//! - A second mutex, `sending`, is held by a writer from before it encrypts until its records
//!   are written, so records reach the socket in the order they were made (TLS numbers them),
//!   and the reader never finds a writer's records waiting and blocks writing them itself.
//!   Records the reader makes (alerts, key updates) are sent by the reader if no write is
//!   under way, else by the writer, which looks again after it lets go.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::ClientConnection;

/// Bytes read from the socket at once; the session decrypts them when the reader wants more.
const READ_CHUNK: usize = 16 * 1024;
/// Why a TLS connection ended early: its TCP stream closed without TLS saying it was done
/// (the server's host or process died, or something in between cut it).
const CUT: &str = "connection cut without a TLS close_notify";

/// One handle on the connection to the server: each thread has its own (`try_clone`).
pub struct ServerStream {
    tcp: TcpStream,
    tls: Option<TlsHandle>,
}

impl ServerStream {
    pub fn plain(tcp: TcpStream) -> Self {
        ServerStream { tcp, tls: None }
    }

    /// A stream over `tcp` whose handshake (`session`) is done.
    pub fn tls(tcp: TcpStream, session: ClientConnection) -> Self {
        let shared = Arc::new(Shared {
            session: Mutex::new(session),
            sending: Mutex::new(()),
        });
        ServerStream {
            tcp,
            tls: Some(TlsHandle::new(shared)),
        }
    }

    /// Another handle on the same connection, for another thread.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(ServerStream {
            tcp: self.tcp.try_clone()?,
            tls: self
                .tls
                .as_ref()
                .map(|tls| TlsHandle::new(tls.shared.clone())),
        })
    }

    /// Closes one or both directions. Closing our sending side over TLS first says so inside
    /// TLS (close_notify), so the server reads a clean end of input, not a truncation.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if let (Some(tls), Shutdown::Write) = (&self.tls, how) {
            tls.shared.encrypt_and_send(&self.tcp, |session| {
                session.send_close_notify();
                Ok(0)
            })?;
        }
        self.tcp.shutdown(how)
    }

    /// Bounds each wait for the server (`None`: no bound). It is the socket's, so it holds
    /// for every handle.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.tcp.set_read_timeout(timeout)
    }

    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.tcp.set_write_timeout(timeout)
    }
}

impl Read for ServerStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.tls {
            None => self.tcp.read(buf),
            Some(tls) => tls.read(&self.tcp, buf),
        }
    }
}

impl Write for ServerStream {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match &self.tls {
            None => self.tcp.write(data),
            Some(tls) => tls
                .shared
                .encrypt_and_send(&self.tcp, |session| session.writer().write(data)),
        }
    }

    /// Every write is sent before it returns.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The TLS state all handles of one connection share.
struct Shared {
    session: Mutex<ClientConnection>,
    /// Held from taking records out of the session to writing them to the socket.
    sending: Mutex<()>,
}

impl Shared {
    fn lock_session(&self) -> io::Result<MutexGuard<'_, ClientConnection>> {
        self.session.lock().map_err(|_| poisoned())
    }

    /// Makes records with `encrypt` and sends them, and any the reader made meanwhile.
    /// `sending` is taken before the records exist, so the reader never sees them unsent
    /// with `sending` free (it would write them itself, and block on a full socket).
    fn encrypt_and_send(
        &self,
        tcp: &TcpStream,
        encrypt: impl FnOnce(&mut ClientConnection) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let mut encrypt = Some(encrypt);
        let mut written = 0;
        loop {
            {
                let _sending = self.sending.lock().map_err(|_| poisoned())?;
                if let Some(encrypt) = encrypt.take() {
                    written = encrypt(&mut *self.lock_session()?)?;
                }
                self.send_records(tcp)?;
            }
            // The reader may have made records while we held `sending` and left them to us.
            if !self.lock_session()?.wants_write() {
                return Ok(written);
            }
        }
    }

    /// Sends the records the reader made, unless a write is under way: that writer sends them
    /// when it is done (`send`), and the reader must not wait for a full socket.
    fn send_if_idle(&self, tcp: &TcpStream) -> io::Result<()> {
        match self.sending.try_lock() {
            Ok(_sending) => self.send_records(tcp),
            Err(_) => Ok(()),
        }
    }

    /// With `sending` held: takes the records out and writes them, without the session lock.
    fn send_records(&self, mut tcp: &TcpStream) -> io::Result<()> {
        loop {
            let mut records = Vec::new();
            {
                let mut session = self.lock_session()?;
                while session.wants_write() {
                    session.write_tls(&mut records)?;
                }
            }
            if records.is_empty() {
                return Ok(());
            }
            tcp.write_all(&records)?;
        }
    }
}

/// One thread's view of the shared session: what it read from the socket and has not yet
/// given to the session (it takes only what fits its plaintext buffer).
struct TlsHandle {
    shared: Arc<Shared>,
    unread: Vec<u8>,
    /// The socket reached its end; the session is told once `unread` is in.
    eof: bool,
}

impl TlsHandle {
    fn new(shared: Arc<Shared>) -> Self {
        TlsHandle {
            shared,
            unread: Vec::new(),
            eof: false,
        }
    }

    /// Plaintext from the server: what the session has, else what the socket brings next.
    /// `Ok(0)` after the server's close_notify; an `UnexpectedEof` error if the socket ended
    /// without one (rustls' rule: a cut connection must not pass for the end of the data).
    fn read(&mut self, tcp: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let mut session = self.shared.lock_session()?;
            match session.reader().read(buf) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                // rustls' own message is a paragraph with a link; a person needs one line.
                Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(io::Error::new(err.kind(), CUT));
                }
                done => return done,
            }
            if self.unread.is_empty() && !self.eof {
                drop(session);
                self.fill(tcp)?;
                continue;
            }
            let processed = decrypt(&mut self.unread, &mut session);
            let reply = session.wants_write();
            drop(session);
            let sent = if reply {
                self.shared.send_if_idle(tcp)
            } else {
                Ok(())
            };
            // After a decryption error the alert is best effort: that error is the one to tell.
            processed?;
            sent?;
        }
    }

    /// Blocks for the next bytes from the socket, without holding the session.
    fn fill(&mut self, mut tcp: &TcpStream) -> io::Result<()> {
        let mut chunk = [0u8; READ_CHUNK];
        let read = loop {
            match tcp.read(&mut chunk) {
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        self.eof = read == 0;
        self.unread.extend_from_slice(&chunk[..read]);
        Ok(())
    }
}

/// Gives the session what was read (or, once it is empty after the socket's end, that end)
/// and decrypts it; what the session had no room for stays in `unread`.
fn decrypt(unread: &mut Vec<u8>, session: &mut ClientConnection) -> io::Result<()> {
    let mut rest = &unread[..];
    session.read_tls(&mut rest)?;
    let used = unread.len() - rest.len();
    if used == 0 && !rest.is_empty() {
        // rustls takes what it has room for and decrypting frees the room, so this means the
        // session is stuck; report it rather than loop.
        return Err(io::Error::other("the TLS session takes no more input"));
    }
    unread.drain(..used);
    session
        .process_new_packets()
        .map(drop)
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))
}

fn poisoned() -> io::Error {
    io::Error::other("a thread using the TLS session panicked")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::thread;
    use std::time::Instant;

    use super::*;
    use crate::client::connection::{send_line, LineReader};
    use crate::client::tls::fixture::{ServerSide, TestCa, WAIT};

    fn lines_of(stream: &ServerStream) -> LineReader<ServerStream> {
        stream.set_read_timeout(Some(WAIT)).unwrap();
        LineReader::new(stream.try_clone().unwrap(), 1024)
    }

    fn next(lines: &mut LineReader<ServerStream>) -> io::Result<Option<String>> {
        let line = lines.next_line()?;
        Ok(line.map(|line| String::from_utf8(line.bytes).unwrap()))
    }

    /// The point of the design: a writer blocked on a full socket (a server that reads nothing,
    /// as a flood-controlled one reads slowly) holds no lock the reader needs, so the
    /// server's lines keep arriving.
    #[test]
    fn the_reader_takes_lines_while_the_writer_is_blocked() {
        let ca = TestCa::new();
        let (go, wait_for_go) = mpsc::channel::<()>();
        let (addr, server) = ca.serve(move |mut side: ServerSide| {
            wait_for_go.recv_timeout(WAIT).unwrap();
            for n in 0..100 {
                side.write_all(format!("line {n}\r\n").as_bytes()).unwrap();
            }
            side.flush().unwrap();
            // Keep the connection open (and unread) until the client has read.
            let _ = wait_for_go.recv_timeout(WAIT);
        });
        let stream = ca.connect(addr);
        stream.set_write_timeout(Some(WAIT)).unwrap();
        let written = Arc::new(AtomicUsize::new(0));
        let mut writer = stream.try_clone().unwrap();
        let progress = written.clone();
        // 64 MiB: far more than the socket buffers on both sides hold.
        let flood = thread::spawn(move || {
            let chunk = [b'x'; 64 * 1024];
            for _ in 0..1024 {
                if writer.write_all(&chunk).is_err() {
                    return;
                }
                progress.fetch_add(chunk.len(), Ordering::Relaxed);
            }
        });
        let deadline = Instant::now() + WAIT;
        while written.load(Ordering::Relaxed) < 1024 * 1024 {
            assert!(Instant::now() < deadline, "the writer made no progress");
            thread::sleep(Duration::from_millis(5));
        }
        go.send(()).unwrap();
        let mut lines = lines_of(&stream);
        for n in 0..100 {
            assert_eq!(next(&mut lines).unwrap(), Some(format!("line {n}")));
        }
        assert!(
            !flood.is_finished(),
            "the server read nothing, so the writer is still at it"
        );
        stream.shutdown(Shutdown::Both).unwrap();
        flood.join().unwrap();
        go.send(()).unwrap();
        server.join().unwrap();
    }

    /// End of input over TLS: close_notify, so the server reads a clean end (not a cut) and
    /// can still answer before it closes.
    #[test]
    fn a_half_close_ends_the_servers_input_cleanly_and_its_answer_arrives() {
        let ca = TestCa::new();
        let (addr, server) = ca.serve(|mut side: ServerSide| {
            let mut input = Vec::new();
            side.read_to_end(&mut input).expect("a clean end of input");
            assert_eq!(input, b"hello\n/who\n");
            side.write_all(b"* 1 online: me\r\n").unwrap();
            side.conn.send_close_notify();
            side.flush().unwrap();
        });
        let mut stream = ca.connect(addr);
        let mut lines = lines_of(&stream);
        send_line(&mut stream, b"hello").unwrap();
        send_line(&mut stream, b"/who").unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        assert_eq!(next(&mut lines).unwrap().as_deref(), Some("* 1 online: me"));
        assert_eq!(next(&mut lines).unwrap(), None, "a clean end");
        server.join().unwrap();
    }

    /// A connection cut without close_notify is an error once what came before it is read:
    /// a cut must not pass for the server's end.
    #[test]
    fn a_cut_connection_is_an_error_after_the_lines_before_it() {
        let ca = TestCa::new();
        let (addr, server) = ca.serve(|mut side: ServerSide| {
            side.write_all(b"last words\r\n").unwrap();
            side.flush().unwrap();
            side.sock.shutdown(Shutdown::Both).unwrap();
        });
        let stream = ca.connect(addr);
        let mut lines = lines_of(&stream);
        assert_eq!(next(&mut lines).unwrap().as_deref(), Some("last words"));
        let err = next(&mut lines).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        assert_eq!(err.to_string(), CUT);
        server.join().unwrap();
    }

    /// Lines both ways at once, many more than one TLS record's worth, all arrive in order.
    #[test]
    fn lines_cross_both_ways_at_once() {
        let ca = TestCa::new();
        let (addr, server) = ca.serve(|mut side: ServerSide| {
            for n in 0..2000 {
                side.write_all(format!("to client {n}\r\n").as_bytes())
                    .unwrap();
            }
            side.flush().unwrap();
            let mut input = Vec::new();
            side.read_to_end(&mut input).expect("a clean end of input");
            let expected: String = (0..2000).map(|n| format!("to server {n}\n")).collect();
            assert_eq!(String::from_utf8(input).unwrap(), expected);
            side.conn.send_close_notify();
            side.flush().unwrap();
        });
        let stream = ca.connect(addr);
        let mut writer = stream.try_clone().unwrap();
        let sending = thread::spawn(move || {
            for n in 0..2000 {
                send_line(&mut writer, format!("to server {n}").as_bytes()).unwrap();
            }
            writer.shutdown(Shutdown::Write).unwrap();
        });
        let mut lines = lines_of(&stream);
        for n in 0..2000 {
            assert_eq!(next(&mut lines).unwrap(), Some(format!("to client {n}")));
        }
        assert_eq!(next(&mut lines).unwrap(), None);
        sending.join().unwrap();
        server.join().unwrap();
    }
}
