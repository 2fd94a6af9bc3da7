//! TLS for the load generator: certificates made at bench time (a CA + server certificate,
//! written as PEM files both servers load) and rustls client connections that verify the
//! server against that CA, as a real client given `--tls-ca` would.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};

#[path = "../../tests/common/certs.rs"]
mod certs;
pub use certs::TestCerts;

/// The name the generator asks for and verifies; the certificate holds it.
const SERVER_NAME: &str = "localhost";

/// A TLS session over a connected blocking socket, handshake done. Shared behind a mutex
/// because a sender's session is written by the sending thread and read by a receiving thread
/// (one TLS session carries both directions); a receiver's is only ever locked by its thread.
pub type Session = Arc<Mutex<ClientConnection>>;

/// Runs the handshake on `socket` (blocking) and returns the session. Fails loudly: the bench
/// cannot measure anything without it.
pub fn handshake(config: &Arc<ClientConfig>, socket: &mut TcpStream) -> Session {
    let name = ServerName::try_from(SERVER_NAME).expect("a valid server name");
    let mut conn = ClientConnection::new(config.clone(), name).expect("a TLS client session");
    // Senders may encrypt a whole window at once; the default 64 KiB cap would make
    // `write_all` fail instead of buffering.
    conn.set_buffer_limit(None);
    while conn.is_handshaking() {
        conn.complete_io(socket)
            .unwrap_or_else(|err| super::die(&format!("TLS handshake with the server: {err}")));
    }
    Arc::new(Mutex::new(conn))
}

/// Encrypts `plain` into `out` (cleared first): the TLS records to write to the socket. Also
/// carries whatever the session had queued (e.g. an answer to a key update).
pub fn seal(session: &Session, plain: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut conn = session.lock().unwrap();
    conn.writer().write_all(plain).expect("buffer plaintext");
    while conn.wants_write() {
        conn.write_tls(out).expect("write TLS records to memory");
    }
}

/// Feeds `ciphertext` (bytes just read from the socket) to the session. `plain` gets the
/// session's plaintext reader whenever there may be decrypted text, and must read it until it
/// would block. The session's plaintext buffer is small (16 KiB), so the ciphertext goes in a
/// few KiB at a time, which keeps the socket reads themselves large: one `read` per 256 KiB
/// rather than one per 4 KiB as `read_tls` on the socket would do.
pub fn open(session: &Session, mut ciphertext: &[u8], mut plain: impl FnMut(&mut dyn Read)) {
    let mut conn = session.lock().unwrap();
    loop {
        plain(&mut conn.reader());
        if ciphertext.is_empty() {
            return;
        }
        conn.read_tls(&mut ciphertext)
            .expect("the plaintext buffer was just drained");
        if let Err(err) = conn.process_new_packets() {
            panic!("receiver: TLS error from the server: {err}");
        }
    }
}

/// The cipher suite the session agreed on, e.g. `TLS13_AES_256_GCM_SHA384`.
pub fn cipher_suite(session: &Session) -> String {
    let conn = session.lock().unwrap();
    conn.negotiated_cipher_suite()
        .map_or("-".to_string(), |suite| format!("{:?}", suite.suite()))
}
