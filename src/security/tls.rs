//! TLS on the gRPC listener (CONTRACT §12): TLS 1.2 and 1.3 with rustls, ALPN `h2`, and with
//! `tls_client_ca` mutual TLS, where a client certificate is optional at the handshake (health
//! probes carry none) and names its client by its subject CN.
//!
//! tonic reloads nothing, so the handshake is done by the listener of ours
//! ([`super::listener`], which bounds handshakes in number and time) and tonic gets the finished
//! streams, whose `TlsConnectInfo` keeps `remote_addr()` and `peer_certs()` working. Each
//! handshake uses the
//! configuration in force when it starts: the certificate, key and CA files are re-read when
//! they change and on SIGHUP, and a set that does not load (bad PEM, a key that is not the
//! certificate's, a key readable by group or others) keeps the previous one, says why, and is
//! counted in `chargegate_tls_reloads_total{outcome}`. Open connections are not touched.

use std::{
    path::Path,
    sync::{Arc, RwLock},
};

use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::sync::CancellationToken;

use super::listener::Handshake;
use crate::config::TlsConfig;

/// Why a certificate, key or CA file could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(String);

/// The TLS configuration in force, replaced whole when its files change.
pub struct TlsFiles {
    files: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsFiles {
    /// Loads the certificate, the key and the client CA.
    pub fn load(files: &TlsConfig) -> Result<Self, TlsError> {
        Ok(Self {
            current: RwLock::new(Arc::new(server_config(files)?)),
            files: files.clone(),
        })
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().expect("tls lock").clone())
    }

    /// Re-reads the files when one changes and on SIGHUP, until `shutdown`.
    pub fn watch(self: Arc<Self>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let mut paths = vec![self.files.cert.clone(), self.files.key.clone()];
        paths.extend(self.files.client_ca.clone());
        let files = self.files.clone();
        crate::reload::watch_and_apply(
            "TLS certificate, key and client CA",
            "chargegate_tls_reloads_total",
            paths,
            shutdown,
            move || server_config(&files),
            move |config| {
                *self.current.write().expect("tls lock") = Arc::new(config);
                1
            },
        )
    }
}

/// The TLS handshake, with the configuration in force when it starts.
#[derive(Clone)]
pub struct TlsHandshake(pub Arc<TlsFiles>);

impl Handshake for TlsHandshake {
    type Stream = TlsStream<TcpStream>;

    async fn handshake(&self, tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        self.0.acceptor().accept(tcp).await
    }
}

fn server_config(files: &TlsConfig) -> Result<ServerConfig, TlsError> {
    crate::reload::check_private(&files.key, true).map_err(TlsError)?;
    let certs = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        TlsError(format!(
            "{}: no private key in PEM form ({e})",
            files.key.display()
        ))
    })?;
    // ring, which the tree already carries (reqwest, tonic); rustls 0.23.48 deprecates it for
    // having no post-quantum key exchange, which needs aws-lc-rs and its C build.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError(e.to_string()))?;
    let verifier = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| TlsError(format!("{}: {e}", ca.display())))?;
            }
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError(format!("{}: {e}", ca.display())))?
        }
        None => WebPkiClientVerifier::no_client_auth(),
    };
    let mut config = builder
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| {
            TlsError(format!(
                "{} and {}: {e}",
                files.cert.display(),
                files.key.display()
            ))
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{}: no certificate in PEM form",
            path.display()
        )));
    }
    Ok(certs)
}

/// The subject CN of a DER certificate.
pub fn common_name(cert: &[u8]) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}
