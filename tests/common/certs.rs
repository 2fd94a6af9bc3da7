//! Certificates made at run time, for the tests and the benches alike (the benches include
//! this file by path): a throwaway CA and a server certificate it signed for `localhost` and
//! `127.0.0.1`, written as PEM files the way certbot writes them (`fullchain.pem` with the
//! chain, `privkey.pem` with the key), so servers load them through their real start-up path
//! and clients verify against the CA as they would in use. Needs nothing but rcgen and rustls.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

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
