//! Certificates for TLS tests: a CA of the test's own, server certificates for 127.0.0.1 and
//! localhost, and client certificates named by their subject CN, written as PEM files.

use std::{os::unix::fs::PermissionsExt, path::Path};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use time::OffsetDateTime;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, in PEM.
#[derive(Clone)]
pub struct Pair {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca");
        Self { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn sign(&self, mut params: CertificateParams, cn: &str) -> Pair {
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A server certificate for 127.0.0.1 and localhost.
    pub fn server(&self) -> Pair {
        let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("params");
        self.sign(params, "chargegate test server")
    }

    /// A client certificate whose subject CN is `name`.
    pub fn client(&self, name: &str) -> Pair {
        self.sign(
            CertificateParams::new(Vec::<String>::new()).expect("params"),
            name,
        )
    }

    /// A client certificate that expired yesterday.
    pub fn expired_client(&self, name: &str) -> Pair {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.not_before = OffsetDateTime::now_utc() - time::Duration::days(30);
        params.not_after = OffsetDateTime::now_utc() - time::Duration::days(1);
        self.sign(params, name)
    }
}

/// Writes `text` to `path` with `mode`, by a rename into place (as deployment tooling does).
pub fn write(path: &Path, text: &str, mode: u32) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).expect("write");
    std::fs::set_permissions(&next, std::fs::Permissions::from_mode(mode)).expect("chmod");
    std::fs::rename(&next, path).expect("rename");
}

/// A TLS channel to `addr` that trusts `ca`, presenting `identity` when given; the error when
/// the connection or its handshake fails.
pub async fn channel(
    addr: std::net::SocketAddr,
    ca: &str,
    identity: Option<&Pair>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(pair) = identity {
        tls = tls.identity(Identity::from_pem(&pair.cert, &pair.key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .expect("url")
        .tls_config(tls)?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
}
