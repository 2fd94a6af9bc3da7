//! The TLS listener's certificate: read once at start from the PEM files certbot writes.
//!
//! Anything wrong with them (missing, unreadable, not PEM, no certificate, no key, a key that
//! does not match) stops the server at start with the file named, rather than failing every
//! handshake later.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::ring;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsListen;
use crate::error::Error;

/// The rustls configuration for `listen`'s certificate chain and key.
pub fn server_config(listen: &TlsListen) -> Result<Arc<ServerConfig>, Error> {
    let chain = read_chain(&listen.cert)?;
    let key = PrivateKeyDer::from_pem_file(&listen.key)
        .map_err(|err| bad_file(&listen.key, format!("no usable private key ({err})")))?;
    let config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|err| bad_file(&listen.cert, err.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|err| {
            bad_file(
                &listen.key,
                format!("does not go with {}: {err}", listen.cert.display()),
            )
        })?;
    Ok(Arc::new(config))
}

/// Every certificate in the file, the server's own first.
fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| bad_file(path, format!("cannot read certificates ({err})")))?;
    if chain.is_empty() {
        return Err(bad_file(path, "no certificate in it".to_string()));
    }
    Ok(chain)
}

fn bad_file(path: &Path, reason: String) -> Error {
    Error::TlsFile {
        path: path.to_path_buf(),
        reason,
    }
}
