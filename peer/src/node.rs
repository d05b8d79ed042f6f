//! The peer's QUIC endpoint: one UDP socket, our identity, dialing with the peer's key pinned,
//! and the id of whoever connected to us.
//!
//! Why it is a module of its own: every dial must pin the peer's key and refuse an older
//! protocol, and every accepted connection must be named by the key it proved; one place does
//! both so no caller can forget.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use certs::Identity;
use common::PeerId;
use tokio::sync::mpsc;
use transport::{DemuxSocket, StunDatagram, TransportSettings};

use crate::register::PEER_SERVER_NAME;

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// Something answered at that address, but with another key.
    #[error("{0}")]
    KeyMismatch(String),
    /// Nothing answered.
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout {
        /// The address dialed.
        addr: SocketAddr,
        /// How long we waited.
        timeout: Duration,
    },
    /// The peer runs an older peer protocol (it chose an older ALPN): the connection was
    /// closed at once, since the two cannot chat without losing lines.
    #[error(
        "the peer at {addr} speaks {found}, but this peer needs p2p-peer/{}: upgrade the other peer",
        common::PEER_PROTOCOL_VERSION
    )]
    OldProtocol {
        /// The address dialed.
        addr: SocketAddr,
        /// The ALPN it chose.
        found: String,
    },
    /// The handshake failed otherwise.
    #[error("connection to {addr} failed: {reason}")]
    Failed {
        /// The address dialed.
        addr: SocketAddr,
        /// What quinn said.
        reason: String,
    },
}

/// Why [`Node::bind`] failed.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The TLS configuration could not be built from the identity.
    #[error(transparent)]
    Tls(#[from] certs::TlsConfigError),
    /// The socket or the QUIC endpoint could not be set up.
    #[error(transparent)]
    Endpoint(#[from] transport::EndpointError),
}

/// Our endpoint and identity.
#[derive(Clone)]
pub struct Node {
    /// The QUIC endpoint (dials and accepts).
    pub endpoint: quinn::Endpoint,
    /// The socket under it (for STUN and probes).
    pub socket: Arc<DemuxSocket>,
    /// Who we are.
    pub identity: Arc<Identity>,
    /// QUIC timers.
    pub transport: TransportSettings,
}

impl Node {
    /// Binds `bind` and starts an endpoint that accepts peer connections.
    pub fn bind(
        bind: SocketAddr,
        identity: Arc<Identity>,
        transport: TransportSettings,
    ) -> Result<(Node, mpsc::Receiver<StunDatagram>), BindError> {
        let tls = certs::server_config(&identity, &[common::ALPN_PEER])?;
        let (endpoint, socket, stun_rx) =
            transport::make_endpoint(bind, Some(tls), transport, 256, None)?;
        Ok((
            Node {
                endpoint,
                socket,
                identity,
                transport,
            },
            stun_rx,
        ))
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Dials `addr`, accepting only the key of `peer`.
    pub async fn dial(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<quinn::Connection, DialError> {
        let failed = |reason: String| DialError::Failed { addr, reason };
        let mut tls = certs::client_config_for_peer(&self.identity, peer, common::ALPN_PEER)
            .map_err(|e| failed(e.to_string()))?;
        // Offered so that an older peer completes the handshake and can be named in the error
        // below; never accepted by our own listener.
        tls.alpn_protocols
            .extend(common::ALPN_PEER_OLDER.iter().map(|a| a.to_vec()));
        let client = transport::quic_client_config(tls, self.transport)
            .map_err(|e| failed(e.to_string()))?;
        let connecting = self
            .endpoint
            .connect_with(client, addr, PEER_SERVER_NAME)
            .map_err(|e| failed(e.to_string()))?;
        match tokio::time::timeout(timeout, connecting).await {
            Err(_) => Err(DialError::Timeout { addr, timeout }),
            Ok(Ok(conn)) => match negotiated_protocol(&conn) {
                Some(alpn) if alpn == common::ALPN_PEER => Ok(conn),
                other => {
                    let found = other.map_or_else(
                        || "no protocol".to_owned(),
                        |a| String::from_utf8_lossy(&a).into_owned(),
                    );
                    conn.close(3u32.into(), b"peer protocol version mismatch");
                    Err(DialError::OldProtocol { addr, found })
                }
            },
            Ok(Err(e)) => {
                let text = e.to_string();
                match text.find("peer key mismatch") {
                    Some(start) => Err(DialError::KeyMismatch(
                        text[start..].trim_end_matches(')').to_owned(),
                    )),
                    None => Err(failed(text)),
                }
            }
        }
    }
}

/// The ALPN a connection's handshake settled on.
fn negotiated_protocol(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// The authenticated id of the other side of a connection.
pub fn remote_id(conn: &quinn::Connection) -> Option<PeerId> {
    let cert = transport::remote_certificate(conn).ok()?;
    certs::peer_id_of_cert(&cert).ok()
}

/// Our addresses as other hosts on the same network would reach them: the interface address the
/// OS would use towards `server` (found without sending anything) with our bound port.
pub fn local_addrs(bound: SocketAddr, server: SocketAddr) -> Vec<SocketAddr> {
    if !bound.ip().is_unspecified() {
        return vec![bound];
    }
    let probe_bind: SocketAddr = match server.ip() {
        IpAddr::V4(_) => (IpAddr::from([0u8, 0, 0, 0]), 0).into(),
        IpAddr::V6(_) => (IpAddr::from([0u16; 8]), 0).into(),
    };
    let ip = UdpSocket::bind(probe_bind)
        .and_then(|s| s.connect(server).and_then(|_| s.local_addr()))
        .map(|a| a.ip());
    match ip {
        Ok(ip) if !ip.is_unspecified() => vec![SocketAddr::new(ip, bound.port())],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer of an older protocol (it accepts only `p2p-peer/2`) is named in the error and the
    /// connection is not used.
    #[tokio::test]
    async fn an_older_peer_is_refused_with_its_version_named() {
        let old = Identity::generate().unwrap();
        let old_id = old.id();
        let tls = certs::server_config(&old, &[common::ALPN_PEER_OLDER[0]]).unwrap();
        let (server, _, _) = transport::make_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            Some(tls),
            TransportSettings::default(),
            8,
            None,
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            if let Some(incoming) = server.accept().await {
                if let Ok(conn) = incoming.await {
                    let _ = closed_tx.send(conn.closed().await);
                }
            }
        });
        let identity = Arc::new(Identity::generate().unwrap());
        let (node, _stun) = Node::bind(
            "127.0.0.1:0".parse().unwrap(),
            identity,
            TransportSettings::default(),
        )
        .unwrap();
        let err = node
            .dial(old_id, addr, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, DialError::OldProtocol { found, .. } if found == "p2p-peer/2"),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade the other peer"), "{err}");
        // The old peer sees the connection closed with the reason.
        let reason = tokio::time::timeout(Duration::from_secs(10), closed_rx)
            .await
            .unwrap()
            .unwrap();
        assert!(
            reason
                .to_string()
                .contains("peer protocol version mismatch"),
            "{reason}"
        );
    }
}
