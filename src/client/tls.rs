//! TLS for the client: whom to trust (`--tls`: the system's root certificates, `--tls-ca FILE`:
//! only that CA, for a self-signed server) and the handshake, bounded like the connect before it.
//!
//! Its own file because it is the only part of the client that knows rustls' configuration;
//! what the modes read and write once the handshake is done is `stream::ServerStream`.

use std::io;
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use crate::config::TlsTrust;
use crate::error::Error;

/// What every TLS connection of this client is made with: built once at start, so a bad
/// `--tls-ca` file is reported before anything else happens, and reconnects reuse it.
#[derive(Clone)]
pub struct Tls {
    config: Arc<ClientConfig>,
    /// `--host`: the name (or IP address) the server's certificate must be for.
    name: ServerName<'static>,
}

impl Tls {
    /// Loads the roots `trust` names and checks that `host` can be checked against a
    /// certificate.
    pub fn new(trust: &TlsTrust, host: &str) -> Result<Tls, Error> {
        let roots = match trust {
            TlsTrust::SystemRoots => system_roots()?,
            TlsTrust::CaFile(path) => ca_file(path)?,
        };
        let name = ServerName::try_from(host.to_string()).map_err(|_| {
            Error::Usage(format!(
                "--host {host}: not a DNS name or IP address a TLS certificate can be checked against"
            ))
        })?;
        // The provider is named, not taken from the process default: the build has rustls
        // through the MongoDB driver too, and which default wins must not depend on that.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|err| Error::TlsConnect(format!("TLS setup failed: {err}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Tls {
            config: Arc::new(config),
            name,
        })
    }

    /// Runs the handshake on a connected socket, within `timeout` in all (a server that
    /// accepts and then says nothing must not hold the client longer than a dead route would).
    /// `addr` names the server in the error.
    pub fn handshake(
        &self,
        tcp: &mut TcpStream,
        timeout: Duration,
        addr: &str,
    ) -> Result<ClientConnection, Error> {
        let failed =
            |reason: String| Error::TlsConnect(format!("TLS with {addr} failed: {reason}"));
        let mut session = ClientConnection::new(self.config.clone(), self.name.clone())
            .map_err(|err| failed(err.to_string()))?;
        let deadline = Instant::now() + timeout;
        while session.is_handshaking() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(failed(timed_out(timeout)));
            }
            set_timeouts(tcp, Some(left)).map_err(|err| failed(err.to_string()))?;
            if let Err(err) = session.complete_io(tcp) {
                return Err(failed(match err.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timed_out(timeout),
                    _ => handshake_failure(&err),
                }));
            }
        }
        set_timeouts(tcp, None).map_err(|err| failed(err.to_string()))?;
        Ok(session)
    }
}

/// The system's root certificates (the files or directories `SSL_CERT_FILE` / `SSL_CERT_DIR`
/// name, else the platform's store). Certificates that do not parse are skipped, as browsers
/// do; none at all is an error, since no server could then be trusted.
fn system_roots() -> Result<RootCertStore, Error> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none found".to_string(), ToString::to_string);
        return Err(Error::TlsConnect(format!(
            "no system root certificates to trust ({why}); name a CA with --tls-ca FILE"
        )));
    }
    Ok(roots)
}

/// Every certificate in the PEM file at `path`, each a CA to trust. A file that cannot be read
/// or holds no usable certificate is a command-line mistake (exit 2), named with its path.
fn ca_file(path: &Path) -> Result<RootCertStore, Error> {
    let bad = |why: String| Error::Usage(format!("--tls-ca {}: {why}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| bad(pem_failure(err)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| bad(pem_failure(err)))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".to_string()));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|err| bad(format!("not a usable CA certificate: {err}")))?;
    }
    Ok(roots)
}

/// A PEM error as a reason: the I/O error alone when the file could not be read.
fn pem_failure(err: rustls::pki_types::pem::Error) -> String {
    match err {
        rustls::pki_types::pem::Error::Io(err) => format!("cannot read it: {err}"),
        other => format!("not a PEM file: {other}"),
    }
}

fn set_timeouts(tcp: &TcpStream, timeout: Option<Duration>) -> io::Result<()> {
    tcp.set_read_timeout(timeout)?;
    tcp.set_write_timeout(timeout)
}

fn timed_out(timeout: Duration) -> String {
    format!(
        "the handshake did not finish within {:.1} s",
        timeout.as_secs_f64()
    )
}

/// Why a handshake failed, with a hint for the two usual mistakes: a self-signed certificate
/// checked against the system's roots, and `--tls` against the plain port.
fn handshake_failure(err: &io::Error) -> String {
    if err.kind() == io::ErrorKind::UnexpectedEof {
        return "the server closed the connection during the handshake".to_string();
    }
    let tls_error = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls_error {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {
            format!(
                "{err} (the certificate is not signed by a CA this client trusts; for a \
                 self-signed server, name its CA with --tls-ca FILE)"
            )
        }
        Some(rustls::Error::InvalidMessage(_)) => {
            format!("{err} (the server did not answer in TLS; is this its TLS port?)")
        }
        _ => err.to_string(),
    }
}

/// A CA and a server certificate it signed (for `localhost` and `127.0.0.1`), and a TLS
/// server thread for one connection: what the TLS unit tests talk to.
#[cfg(test)]
pub mod fixture {
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use std::thread::{self, JoinHandle};
    use std::time::Duration;

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::{ServerConfig, ServerConnection, StreamOwned};

    use super::Tls;
    use crate::client::stream::ServerStream;
    use crate::config::TlsTrust;

    /// Bound on every wait of the test server.
    pub const WAIT: Duration = Duration::from_secs(15);

    /// The server's side of one connection, its handshake done.
    pub type ServerSide = StreamOwned<ServerConnection, TcpStream>;

    pub struct TestCa {
        dir: PathBuf,
        /// The CA certificate alone, PEM: what `--tls-ca` names.
        pub ca_pem: PathBuf,
        server: Arc<ServerConfig>,
    }

    impl TestCa {
        pub fn new() -> TestCa {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "peerchat-client-tls-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let ca_key = KeyPair::generate().unwrap();
            let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            // A name of its own: two test CAs must not pass for each other's issuer.
            let name = format!("peerchat client test CA {}", dir.display());
            ca_params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let ca_cert = ca_params.self_signed(&ca_key).unwrap();
            let issuer = Issuer::new(ca_params, ca_key);
            let key = KeyPair::generate().unwrap();
            let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
            let cert = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            let ca_pem = dir.join("ca.pem");
            std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
            let chain: Vec<CertificateDer<'static>> =
                vec![cert.der().clone(), ca_cert.der().clone()];
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let server = ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap();
            TestCa {
                dir,
                ca_pem,
                server: Arc::new(server),
            }
        }

        /// A client set up as `--tls-ca CA --host host` would be.
        pub fn client(&self, host: &str) -> Tls {
            Tls::new(&TlsTrust::CaFile(self.ca_pem.clone()), host).unwrap()
        }

        /// Serves one connection on loopback: `serve` gets it once the handshake is done, on a
        /// thread of its own.
        pub fn serve<F>(&self, serve: F) -> (SocketAddr, JoinHandle<()>)
        where
            F: FnOnce(ServerSide) + Send + 'static,
        {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let config = self.server.clone();
            let server = thread::spawn(move || {
                let (mut tcp, _) = listener.accept().unwrap();
                tcp.set_read_timeout(Some(WAIT)).unwrap();
                tcp.set_write_timeout(Some(WAIT)).unwrap();
                let mut session = ServerConnection::new(config).unwrap();
                while session.is_handshaking() {
                    if session.complete_io(&mut tcp).is_err() {
                        return; // the client gave up on us: what some tests want
                    }
                }
                serve(StreamOwned::new(session, tcp));
            });
            (addr, server)
        }

        /// A client stream to `addr` through `Tls::handshake`.
        pub fn connect(&self, addr: SocketAddr) -> ServerStream {
            let mut tcp = TcpStream::connect(addr).unwrap();
            let session = self
                .client("127.0.0.1")
                .handshake(&mut tcp, WAIT, &addr.to_string())
                .unwrap();
            ServerStream::tls(tcp, session)
        }
    }

    impl Drop for TestCa {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpStream;

    use super::fixture::{TestCa, WAIT};
    use super::*;

    fn usage_error(trust: TlsTrust, host: &str) -> String {
        match Tls::new(&trust, host) {
            Err(err @ Error::Usage(_)) => {
                assert_eq!(err.exit_code(), 2);
                err.to_string()
            }
            Err(other) => panic!("expected a usage error, got {other}"),
            Ok(_) => panic!("expected a usage error"),
        }
    }

    #[test]
    fn a_ca_file_that_cannot_be_used_is_a_usage_error_naming_it() {
        let ca = TestCa::new();
        let missing = ca.ca_pem.with_file_name("missing.pem");
        let err = usage_error(TlsTrust::CaFile(missing), "localhost");
        assert!(
            err.contains("--tls-ca ") && err.contains("missing.pem: cannot read it"),
            "{err}"
        );
        let not_pem = ca.ca_pem.with_file_name("notes.txt");
        std::fs::write(&not_pem, "no certificate here\n").unwrap();
        let err = usage_error(TlsTrust::CaFile(not_pem), "localhost");
        assert!(err.contains("notes.txt: no PEM certificate in it"), "{err}");
        let err = usage_error(TlsTrust::CaFile(ca.ca_pem.clone()), "bad_host!");
        assert!(err.starts_with("error: --host bad_host!: "), "{err}");
    }

    #[test]
    fn the_handshake_checks_the_ca_and_the_name() {
        let ca = TestCa::new();
        let other = TestCa::new();
        for (trusted, host, expected) in [
            (&other, "127.0.0.1", "UnknownIssuer"),
            (&other, "127.0.0.1", "--tls-ca FILE"),
            (&ca, "localhost", ""),
            (&ca, "127.0.0.2", "not valid for name"),
        ] {
            let (addr, server) = ca.serve(|_| {});
            let mut tcp = TcpStream::connect(addr).unwrap();
            let done = trusted.client(host).handshake(&mut tcp, WAIT, "the server");
            drop(tcp);
            server.join().unwrap();
            match done {
                Ok(_) => assert_eq!(expected, "", "{host}"),
                Err(err) => {
                    let err = err.to_string();
                    assert!(err.starts_with("TLS with the server failed: "), "{err}");
                    assert!(!expected.is_empty() && err.contains(expected), "{err}");
                }
            }
        }
    }

    #[test]
    fn a_server_that_never_answers_the_handshake_is_given_up_on() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tcp = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _accepted = listener.accept().unwrap();
        let ca = TestCa::new();
        let timeout = Duration::from_millis(50);
        let err = ca.client("localhost").handshake(&mut tcp, timeout, "x");
        let err = err.expect_err("no handshake").to_string();
        assert!(err.contains("did not finish within"), "{err}");
    }

    #[test]
    fn a_plain_server_on_the_port_gets_a_hint() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tcp = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut plain, _) = listener.accept().unwrap();
        plain.write_all(b"* welcome, you are x\r\n").unwrap();
        let ca = TestCa::new();
        let err = ca.client("localhost").handshake(&mut tcp, WAIT, "x");
        let err = err.expect_err("no handshake").to_string();
        assert!(err.contains("is this its TLS port?"), "{err}");
    }
}
