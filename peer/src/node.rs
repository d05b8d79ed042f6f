//! The peer's QUIC endpoint: one UDP socket, our identity, dialing with the peer's key pinned,
//! and the id of whoever connected to us.
//!
//! Why it is a module of its own: every dial must pin the peer's key and refuse an older
//! protocol, and every accepted connection must be named by the key it proved; one place does
//! both so no caller can forget.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
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
    /// Our IPv6 address was proven to the rendezvous (see [`crate::observe`]): punching
    /// prefers IPv6 paths (see [`punch::PunchConfig::prefer_ipv6`]).
    pub ipv6_proven: Arc<std::sync::atomic::AtomicBool>,
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
                ipv6_proven: Arc::default(),
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
        let connecting = self.start_dial(peer, addr)?;
        Self::finish_dial(connecting, addr, timeout).await
    }

    /// Starts a handshake with `addr` that accepts only the key of `peer`: its first datagram
    /// is on its way (into the socket's route for `addr`) when this returns. Finished by
    /// [`Node::finish_dial`].
    pub fn start_dial(
        &self,
        peer: PeerId,
        addr: SocketAddr,
    ) -> Result<quinn::Connecting, DialError> {
        let failed = |reason: String| DialError::Failed { addr, reason };
        let mut tls = certs::client_config_for_peer(&self.identity, peer, common::ALPN_PEER)
            .map_err(|e| failed(e.to_string()))?;
        // Offered so that an older peer completes the handshake and can be named in the error
        // below; never accepted by our own listener.
        tls.alpn_protocols
            .extend(common::ALPN_PEER_OLDER.iter().map(|a| a.to_vec()));
        let client = transport::quic_peer_client_config(tls, self.transport)
            .map_err(|e| failed(e.to_string()))?;
        self.endpoint
            .connect_with(client, addr, PEER_SERVER_NAME)
            .map_err(|e| failed(e.to_string()))
    }

    /// Waits up to `timeout` for a handshake [`Node::start_dial`] started with `addr`, and
    /// checks the protocol it settled on.
    pub async fn finish_dial(
        connecting: quinn::Connecting,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<quinn::Connection, DialError> {
        let failed = |reason: String| DialError::Failed { addr, reason };
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

/// Where the OS would send from towards `target` (found by connecting a UDP socket, which sends
/// nothing), if it has a route there.
fn source_towards(target: SocketAddr) -> Option<IpAddr> {
    let probe_bind: SocketAddr = match target.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let ip = UdpSocket::bind(probe_bind)
        .and_then(|s| s.connect(target).and_then(|_| s.local_addr()))
        .ok()?
        .ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// A global IPv6 address, used only to ask the routing table which source address we would use
/// for the IPv6 internet (nothing is sent to it).
const IPV6_ROUTE_PROBE: SocketAddr = SocketAddr::new(
    IpAddr::V6(Ipv6Addr::new(0x2001, 0x4860, 0x4860, 0, 0, 0, 0, 0x8888)),
    443,
);

/// A global IPv4 address, as [`IPV6_ROUTE_PROBE`] for IPv4.
const IPV4_ROUTE_PROBE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)), 443);

/// Whether `ip` is worth announcing as a candidate of another family than the rendezvous's:
/// an IPv6 address others can route to (not link-local, which needs a scope, nor loopback).
fn announceable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => {
            !v6.is_loopback()
                && !v6.is_unspecified()
                && (v6.segments()[0] & 0xffc0) != 0xfe80
                && v6.to_ipv4_mapped().is_none()
        }
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_unspecified() && !v4.is_link_local(),
    }
}

/// Our addresses as other hosts would reach them, with our bound port: the interface address the
/// OS would use towards `server`, and on a dual-stack socket also the one it would use for the
/// other family (our IPv6 address when we reach the rendezvous over IPv4: with no NAT in IPv6,
/// other peers can reach it through our firewall once we have sent to them). Found without
/// sending anything.
pub fn local_addrs(bound: SocketAddr, server: SocketAddr) -> Vec<SocketAddr> {
    if !bound.ip().is_unspecified() {
        return vec![bound];
    }
    let mut out = Vec::new();
    if let Some(ip) = source_towards(server) {
        out.push(SocketAddr::new(ip, bound.port()));
    }
    // A rendezvous on loopback is a test or a demo on one host: its peers reach each other over
    // loopback, and announcing the host's other addresses would take them off it.
    if bound.is_ipv6() && !server.ip().is_loopback() {
        let other = if server.is_ipv4() {
            IPV6_ROUTE_PROBE
        } else {
            IPV4_ROUTE_PROBE
        };
        if let Some(ip) = source_towards(other).filter(|ip| announceable(*ip)) {
            let addr = SocketAddr::new(ip, bound.port());
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
    }
    out
}

/// Our global IPv6 address: the one the routing table would send from to the IPv6 internet, if
/// it is routable (see [`local_addrs`]). `None` on an IPv4-only host.
pub fn global_ipv6() -> Option<IpAddr> {
    source_towards(IPV6_ROUTE_PROBE).filter(|ip| ip.is_ipv6() && announceable(*ip))
}

/// Which of the rendezvous's resolved addresses to register with, for a socket bound to `bind`.
/// A dual-stack socket prefers IPv4 when we have an IPv4 route: the rendezvous records the
/// address it sees, and only over IPv4 is that our NAT's public mapping, which IPv4 punching
/// needs; our IPv6 address (no NAT) is announced beside it (see [`local_addrs`]). An IPv6-only
/// host registers over IPv6. A socket of one family uses that family only.
pub fn pick_server_addr(resolved: &[SocketAddr], bind: SocketAddr) -> Option<SocketAddr> {
    let dual = bind.is_ipv6() && bind.ip().is_unspecified();
    if !dual {
        return resolved
            .iter()
            .find(|a| a.is_ipv4() == bind.is_ipv4())
            .copied();
    }
    resolved
        .iter()
        .find(|a| a.is_ipv4() && source_towards(**a).is_some())
        .or_else(|| resolved.iter().find(|a| a.is_ipv6()))
        .or_else(|| resolved.first())
        .copied()
}

/// Every address of the rendezvous's name to register with: those of the family
/// [`pick_server_addr`] chooses, in the resolver's order from its choice on, without
/// duplicates. A name with several addresses of that family names several servers (the nodes of
/// one cluster); its addresses of the other family are the same nodes again and are left out.
pub fn pick_server_addrs(resolved: &[SocketAddr], bind: SocketAddr) -> Vec<SocketAddr> {
    let Some(first) = pick_server_addr(resolved, bind) else {
        return Vec::new();
    };
    let mut out = vec![first];
    for addr in resolved {
        if addr.is_ipv4() == first.is_ipv4() && !out.contains(addr) {
            out.push(*addr);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_with_several_addresses_of_the_chosen_family_names_several_servers() {
        let a: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let b: SocketAddr = "127.0.0.2:7000".parse().unwrap();
        let v6: SocketAddr = "[::1]:7000".parse().unwrap();
        let v4_only: SocketAddr = "0.0.0.0:0".parse().unwrap();
        assert_eq!(pick_server_addrs(&[a, v6, b, a], v4_only), vec![a, b]);
        assert_eq!(pick_server_addrs(&[v6], v4_only), Vec::<SocketAddr>::new());
        let v6_only: SocketAddr = "[::1]:0".parse().unwrap();
        assert_eq!(pick_server_addrs(&[a, v6, b], v6_only), vec![v6]);
    }

    /// A dual-stack socket registers over IPv4 when there is a route (the rendezvous must see
    /// our NAT's IPv4 mapping), whatever order the resolver returned; a socket of one family
    /// only uses that family.
    #[test]
    fn the_rendezvous_address_prefers_ipv4_on_a_dual_stack_socket() {
        let v4: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let v6: SocketAddr = "[::1]:7000".parse().unwrap();
        let dual: SocketAddr = "[::]:0".parse().unwrap();
        assert_eq!(pick_server_addr(&[v6, v4], dual), Some(v4));
        assert_eq!(pick_server_addr(&[v6], dual), Some(v6));
        assert_eq!(
            pick_server_addr(&[v6, v4], "0.0.0.0:0".parse().unwrap()),
            Some(v4)
        );
        assert_eq!(pick_server_addr(&[v6], "0.0.0.0:0".parse().unwrap()), None);
        assert_eq!(
            pick_server_addr(&[v4, v6], "[::1]:0".parse().unwrap()),
            Some(v6)
        );
        assert_eq!(pick_server_addr(&[], dual), None);
    }

    /// Only addresses another host can route to are announced for the other family.
    #[test]
    fn a_rendezvous_on_loopback_gets_only_loopback_candidates() {
        for server in ["127.0.0.1:7000", "[::1]:7000"] {
            let server: SocketAddr = server.parse().unwrap();
            let addrs = local_addrs("[::]:4000".parse().unwrap(), server);
            assert!(
                addrs
                    .iter()
                    .all(|a| a.ip().is_loopback() && a.port() == 4000),
                "{server}: {addrs:?}"
            );
        }
    }

    #[test]
    fn only_routable_addresses_of_the_other_family_are_announced() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(announceable(ip("2001:db8:1::2")));
        assert!(
            announceable(ip("fd00::2")),
            "unique-local: a LAN address, as 10/8 is"
        );
        assert!(!announceable(ip("fe80::1")), "link-local needs a scope id");
        assert!(!announceable(ip("::1")));
        assert!(!announceable(ip("::")));
        assert!(!announceable(ip("::ffff:10.0.0.2")));
        assert!(announceable(ip("10.0.0.2")));
        assert!(!announceable(ip("127.0.0.1")));
        assert!(!announceable(ip("169.254.1.1")));
    }

    /// A socket bound to one address announces that; a wildcard announces at least the address
    /// towards the rendezvous, with the bound port, and never twice.
    #[test]
    fn local_addrs_carry_the_bound_port_without_duplicates() {
        let server: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let bound: SocketAddr = "127.0.0.1:4242".parse().unwrap();
        assert_eq!(local_addrs(bound, server), vec![bound]);
        let addrs = local_addrs("[::]:4242".parse().unwrap(), server);
        assert_eq!(addrs.first(), Some(&bound));
        assert!(addrs.iter().all(|a| a.port() == 4242));
        let mut unique = addrs.clone();
        unique.dedup();
        assert_eq!(unique, addrs);
    }

    /// A peer of an older protocol (it accepts only `p2p-peer/3`) is named in the error and the
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
            matches!(&err, DialError::OldProtocol { found, .. } if found == "p2p-peer/3"),
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
