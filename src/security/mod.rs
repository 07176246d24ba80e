//! What keeps callers to what they may do: a listener that hands over only finished handshakes
//! ([`listener`]), TLS ([`tls`]), who they are and what their roles allow ([`auth`],
//! [`clients`]), how large a request may be ([`message_size`]), and how many a caller may make
//! ([`rate`]).

pub mod auth;
pub mod clients;
pub mod listener;
pub mod message_size;
pub mod rate;
pub mod tls;

use std::net::SocketAddr;

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// The peer of a request, over TCP or TLS.
pub fn peer_addr(extensions: &http::Extensions) -> Option<SocketAddr> {
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
}

/// The subject CN of the client certificate the TLS handshake verified, if one was presented.
pub fn peer_certificate_name(extensions: &http::Extensions) -> Option<String> {
    let info = extensions.get::<TlsConnectInfo<TcpConnectInfo>>()?;
    let certs = info.peer_certs()?;
    tls::common_name(certs.first()?)
}
