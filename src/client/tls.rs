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
            .map_err(|err| Error::Tls(format!("TLS setup failed: {err}")))?
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
        let failed = |reason: String| Error::Tls(format!("TLS with {addr} failed: {reason}"));
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
        return Err(Error::Tls(format!(
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
