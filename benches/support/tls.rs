//! TLS for the load generator: certificates made at bench time (a CA + server certificate,
//! written as PEM files both servers load) and rustls client connections that verify the
//! server against that CA, as a real client given `--tls-ca` would.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

/// A throwaway CA and a server certificate it signed for `localhost` and `127.0.0.1`, written
/// as PEM files the way certbot writes them (as the TLS tests make theirs, in
/// `tests/common/tls.rs`), in a directory of their own that is removed on drop.
pub struct TestCerts {
    dir: PathBuf,
    /// The server's certificate followed by the CA's: what `--tls-cert` (peerchat) and
    /// `--tls-cert-file` (Redis) take.
    pub chain: PathBuf,
    /// The server's private key (ECDSA P-256, rcgen's default).
    pub key: PathBuf,
    /// The CA's certificate alone (Redis wants one even when clients show no certificate).
    pub ca: PathBuf,
    ca_der: Vec<u8>,
}

impl TestCerts {
    pub fn new() -> TestCerts {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "peerchat-bench-certs-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).expect("create certificate directory");

        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "peerchat bench CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate().expect("server key");
        let server_cert = CertificateParams::new(vec![SERVER_NAME.into(), "127.0.0.1".into()])
            .expect("server params")
            .signed_by(&server_key, &issuer)
            .expect("server certificate");

        let certs = TestCerts {
            chain: dir.join("fullchain.pem"),
            key: dir.join("privkey.pem"),
            ca: dir.join("ca.pem"),
            ca_der: ca_cert.der().to_vec(),
            dir,
        };
        let chain = format!("{}{}", server_cert.pem(), ca_cert.pem());
        fs::write(&certs.chain, chain).expect("write chain");
        fs::write(&certs.key, server_key.serialize_pem()).expect("write key");
        fs::write(&certs.ca, ca_cert.pem()).expect("write CA");
        certs
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The name the generator asks for and verifies; the certificate holds it.
const SERVER_NAME: &str = "localhost";

/// A client configuration that trusts only `certs`' CA. ring is the one crypto provider in the
/// build, named explicitly so another dependency enabling a second cannot make this ambiguous.
pub fn client_config(certs: &TestCerts) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(certs.ca_der.clone()))
        .expect("the bench CA is a valid root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

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
