//! Certificates made at test time: a throwaway CA and a server certificate it signed for
//! `localhost` and `127.0.0.1`, written as PEM files the way certbot writes them
//! (`fullchain.pem` with the chain, `privkey.pem` with the key), so the server loads them
//! through its real start-up path and clients verify against the CA as they would in use.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use super::DEADLINE;

/// A CA and a server certificate, in a directory of their own that is removed on drop.
pub struct TestCerts {
    pub dir: PathBuf,
    /// The server's certificate followed by the CA's: what `--tls-cert` takes.
    pub chain: PathBuf,
    /// The server's private key: what `--tls-key` takes.
    pub key: PathBuf,
    /// The CA's certificate alone: what a client trusts (`--tls-ca`).
    pub ca: PathBuf,
    /// The CA's certificate in DER, for a rustls root store in the tests.
    pub ca_der: Vec<u8>,
}

impl TestCerts {
    pub fn new() -> TestCerts {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "peerchat-certs-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create certificate directory");

        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        // A name of its own: a test CA must not pass for another one's issuer (a client that
        // trusts the other would report a bad signature instead of an unknown issuer).
        ca_params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("peerchat test CA {}", dir.display()),
        );
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().expect("server key");
        let server_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        let server_cert = server_params
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
        std::fs::write(&certs.chain, chain).expect("write chain");
        std::fs::write(&certs.key, server_key.serialize_pem()).expect("write key");
        std::fs::write(&certs.ca, ca_cert.pem()).expect("write CA");
        certs
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TestCerts {
    /// A rustls client configuration that trusts only this CA.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.ca_der.clone()))
            .expect("CA certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}

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
