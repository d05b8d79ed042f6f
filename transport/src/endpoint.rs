use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::sync::mpsc;

use crate::demux::{DemuxSocket, StunDatagram};

/// Errors setting up a QUIC endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// Binding or wrapping the UDP socket failed.
    #[error("UDP socket on {addr}: {source}")]
    Socket {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS configuration is not usable for QUIC.
    #[error("TLS configuration unusable for QUIC: {0}")]
    Crypto(String),
    /// rustls refused the configuration.
    #[error(transparent)]
    Tls(#[from] certs::TlsConfigError),
}

/// Streams the other side of a connection may have open at once (see `transport_config`).
const MAX_CONCURRENT_BIDI_STREAMS: u32 = 32;
/// Bytes one stream may have in flight (received and not yet read, or sent and not yet
/// acknowledged), peer to peer: the bandwidth-delay product of the paths a file transfer should
/// fill, 8 MiB (670 Mbit/s at 100 ms RTT, 2.7 Gbit/s at 25 ms). quinn's default, 1.25 MB, caps
/// one stream at 100 Mbit/s at 100 ms.
pub const PEER_STREAM_WINDOW: u32 = 8 * 1024 * 1024;

/// Largest UDP payload MTU discovery gives a peer-to-peer connection: a relay channel datagram
/// of it fits 1,500 bytes over IPv6 ([`crate::channel::MAX_CHANNEL_DATAGRAM_V6`]).
pub const PEER_MAX_UDP_PAYLOAD: u16 =
    (crate::channel::MAX_CHANNEL_DATAGRAM_V6 - crate::channel::CHANNEL_HEADER) as u16;
/// Bytes one peer connection may have in flight across all its streams (quinn's default
/// receive window is unbounded).
pub const PEER_CONNECTION_WINDOW: u32 = 2 * PEER_STREAM_WINDOW;

/// QUIC transport timers.
#[derive(Debug, Clone, Copy)]
pub struct TransportSettings {
    /// Keep-alive interval: below the shortest NAT UDP timeout (30 s in the wild).
    pub keep_alive: Duration,
    /// Idle timeout: a connection silent this long is dead.
    pub idle_timeout: Duration,
}

impl Default for TransportSettings {
    fn default() -> Self {
        TransportSettings {
            keep_alive: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

impl TransportSettings {
    fn transport_config(&self) -> Arc<quinn::TransportConfig> {
        Arc::new(self.base_config())
    }

    /// For connections between peers: windows for the bandwidth-delay product of a file
    /// transfer (see [`PEER_STREAM_WINDOW`]). Connections to the rendezvous keep quinn's
    /// defaults on our side (the server sets its own, small ones).
    fn peer_transport_config(&self) -> Arc<quinn::TransportConfig> {
        let mut transport = self.base_config();
        transport.stream_receive_window(PEER_STREAM_WINDOW.into());
        transport.receive_window(PEER_CONNECTION_WINDOW.into());
        transport.send_window(u64::from(PEER_CONNECTION_WINDOW));
        // A relayed packet takes a relay channel's header on top: MTU discovery stops where
        // the packet still fits a channel datagram to a rendezvous reached over IPv6, so that
        // full-size packets are not pushed back onto the relay stream (9 bytes of 1,452, 0.6 %
        // of a direct path's payload, which quinn's own 1,452 default wastes anyway on IPv4).
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(PEER_MAX_UDP_PAYLOAD);
        transport.mtu_discovery_config(Some(mtu));
        Arc::new(transport)
    }

    /// What every endpoint of ours sets, peers and servers alike.
    fn base_config(&self) -> quinn::TransportConfig {
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(self.keep_alive));
        // Idle timeouts beyond 2^62 ms are refused by quinn; ours are seconds.
        if let Ok(idle) = quinn::IdleTimeout::try_from(self.idle_timeout) {
            transport.max_idle_timeout(Some(idle));
        }
        // quinn's default first RTT guess (333 ms) makes a lost Initial wait ~1 s, then 2 s more:
        // on a lossy link the handshake to the rendezvous could miss the 3 s UDP window and fall
        // back to the TCP tunnel for nothing. Guessing 100 ms retransmits at about 0.3, 0.9 and
        // 2.1 s; a real RTT replaces the guess with the first answer.
        transport.initial_rtt(Duration::from_millis(100));
        // quinn reserves a map entry for every stream the other side may open, at once: with
        // its defaults (100 bidirectional, 100 unidirectional) that is 6 KiB of stream maps per
        // connection, an eighth of the rendezvous's memory per idle peer. Nothing opens
        // unidirectional streams, and no side needs more than a few bidirectional ones at a
        // time (control, relay, one per request or application); quinn grants more as they
        // close.
        transport.max_concurrent_uni_streams(0u32.into());
        transport.max_concurrent_bidi_streams(MAX_CONCURRENT_BIDI_STREAMS.into());
        transport
    }
}

/// Flow-control and handshake bounds of a server that any host on the internet may connect to
/// (the rendezvous). Peer-to-peer connections keep quinn's large windows ([`make_endpoint`]):
/// file transfers need them, and a peer only talks to peers it chose.
///
/// What one connection can make the server hold is bounded by these windows: quinn buffers at
/// most `receive_window` bytes received and not yet read (all streams together) and
/// `send_window` bytes written and not yet acknowledged.
#[derive(Debug, Clone, Copy)]
pub struct ServerTransport {
    /// Bytes the client may send, across all streams, before the server has read them.
    pub receive_window: u32,
    /// Bytes the client may send on one stream before the server has read them (the
    /// connection window above caps the sum).
    pub stream_receive_window: u32,
    /// Bytes of the server's writes held until acknowledged, across all streams.
    pub send_window: u64,
    /// Bidirectional streams the client may have open at once.
    pub max_concurrent_bidi_streams: u32,
    /// Connection attempts (quinn `Incoming`) waiting for the application at once; more are
    /// refused by quinn.
    pub max_incoming: usize,
    /// Bytes buffered for one waiting connection attempt beyond its first packet.
    pub incoming_buffer_size: u64,
    /// Bytes buffered for all waiting connection attempts together.
    pub incoming_buffer_size_total: u64,
}

impl TransportSettings {
    /// The server's keep-alive interval: halfway between the peers' and the idle timeout.
    ///
    /// The peers ping every `keep_alive` (their NAT mappings need traffic from their side). A
    /// server pinging at the same interval doubled the packets of every idle peer: quinn
    /// restarts a keep-alive timer on every packet received, so each side's timer fired just
    /// before the other's ping arrived, and both pinged. Longer than the peers' interval, the
    /// server's timer never fires for a peer that pings; a peer that does not is still pinged
    /// before the idle timeout.
    fn server_keep_alive(&self) -> Duration {
        self.keep_alive + self.idle_timeout.saturating_sub(self.keep_alive) / 2
    }

    fn server_transport_config(&self, limits: &ServerTransport) -> Arc<quinn::TransportConfig> {
        let mut transport = self.base_config();
        transport.keep_alive_interval(Some(self.server_keep_alive()));
        transport.max_concurrent_bidi_streams(limits.max_concurrent_bidi_streams.into());
        transport.receive_window(limits.receive_window.into());
        transport.stream_receive_window(limits.stream_receive_window.into());
        transport.send_window(limits.send_window);
        // Nothing uses QUIC datagrams: quinn's default would let every client fill 1.25 MB of
        // datagrams the server never reads.
        transport.datagram_receive_buffer_size(None);
        Arc::new(transport)
    }
}

/// A bound endpoint: quinn's endpoint, the one UDP socket under it (for STUN and routes), and the
/// STUN datagrams the socket takes out of quinn's receive path.
pub type BoundEndpoint = (
    quinn::Endpoint,
    Arc<DemuxSocket>,
    mpsc::Receiver<StunDatagram>,
);

/// Binds `addr`, wraps it in a [`DemuxSocket`] and builds a quinn endpoint over it that accepts
/// connections with `server` (if given) and can dial with per-connection client configs. The
/// socket gets [`PEER_SOCKET_BUFFER`] of kernel buffers (as far as the kernel allows).
/// `reset_secret` makes stateless resets recognisable across restarts (servers); `None` picks a
/// random key.
pub fn make_endpoint(
    addr: SocketAddr,
    server: Option<rustls::ServerConfig>,
    settings: TransportSettings,
    stun_queue: usize,
    reset_secret: Option<[u8; 32]>,
) -> Result<BoundEndpoint, EndpointError> {
    let server_config = match server {
        Some(tls) => {
            // Only peers accept connections on such an endpoint (the rendezvous uses
            // make_server_endpoint): peer windows.
            let mut config = quic_server_config(tls)?;
            config.transport_config(settings.peer_transport_config());
            Some(config)
        }
        None => None,
    };
    bind_endpoint(
        addr,
        false,
        Some(PEER_SOCKET_BUFFER),
        server_config,
        stun_queue,
        reset_secret,
    )
}

/// As [`make_endpoint`] for a public server: accepts connections with `tls` under the
/// flow-control and handshake bounds of `limits` (see [`ServerTransport`]). `share_port`: a
/// socket on another IP of this host will bind the same port beside this one (see
/// [`bind_udp`]).
pub fn make_server_endpoint(
    addr: SocketAddr,
    share_port: bool,
    tls: rustls::ServerConfig,
    settings: TransportSettings,
    limits: ServerTransport,
    stun_queue: usize,
    reset_secret: Option<[u8; 32]>,
) -> Result<BoundEndpoint, EndpointError> {
    let mut config = quic_server_config(tls)?;
    config
        .transport_config(settings.server_transport_config(&limits))
        .max_incoming(limits.max_incoming)
        .incoming_buffer_size(limits.incoming_buffer_size)
        .incoming_buffer_size_total(limits.incoming_buffer_size_total);
    bind_endpoint(
        addr,
        share_port,
        Some(SERVER_SOCKET_BUFFER),
        Some(config),
        stun_queue,
        reset_secret,
    )
}

/// A quinn server config over our rustls config (which must speak TLS 1.3 only).
fn quic_server_config(tls: rustls::ServerConfig) -> Result<quinn::ServerConfig, EndpointError> {
    let crypto =
        QuicServerConfig::try_from(tls).map_err(|e| EndpointError::Crypto(e.to_string()))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}

/// Kernel receive and send buffer asked for a server's UDP socket (the kernel caps it at
/// `net.core.rmem_max` / `wmem_max`).
///
/// The default (`rmem_default`, 208 KiB on Linux: about 150 full-size packets) is what every
/// packet waits in while the server is busy. With 100,000 idle peers (6,700 keep-alives a
/// second) and handshakes in progress, a pause of a few tens of milliseconds overflowed it:
/// the drops cost retransmissions, the retransmissions load the server more, and in
/// `scripts/bench.sh --rv-peers 100000` the server stopped hearing most peers long enough for
/// their connections to time out (docs/benchmarks.md, "Idle peer memory").
pub const SERVER_SOCKET_BUFFER: usize = 8 * 1024 * 1024;

/// Kernel receive and send buffer asked for a peer's UDP socket (and for the extra socket a
/// birthday punch pins a path to).
///
/// The default (`rmem_default`, 208 KiB on Linux) holds about 150 full-size packets: at
/// 400 MB/s that is 0.5 ms of a transfer, and a receiver whose runtime thread waits that long
/// for a core (a file thread, another process) drops the rest. Each drop is a loss to QUIC's
/// congestion control, which halves its window. Measured on the lab link (docs/benchmarks.md,
/// round nine): 35-200 receive-buffer drops per 100 MB `peer send` with the default, none with
/// this buffer. quic-go asks for 7 MiB, Tailscale 7 MiB; the kernel allocates it only as packets
/// wait, so an idle peer spends nothing on it.
pub const PEER_SOCKET_BUFFER: usize = 8 * 1024 * 1024;

/// The kernel buffers a socket has, in bytes of room (not as Linux reports them, twice that:
/// see [`socket_buffers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketBuffers {
    /// From `SO_RCVBUF`.
    pub receive: usize,
    /// From `SO_SNDBUF`.
    pub send: usize,
}

/// The kernel buffers of `socket`. Linux reports twice the size it grants (its bookkeeping
/// counted in); this is the one place that undoes it.
pub fn socket_buffers(socket: &impl std::os::fd::AsFd) -> std::io::Result<SocketBuffers> {
    let sock = socket2::SockRef::from(socket);
    let granted = |reported: usize| {
        if cfg!(any(target_os = "linux", target_os = "android")) {
            reported / 2
        } else {
            reported
        }
    };
    Ok(SocketBuffers {
        receive: granted(sock.recv_buffer_size()?),
        send: granted(sock.send_buffer_size()?),
    })
}

/// Asks for `bytes` of kernel receive and send buffer on `socket`. Best effort: with
/// `CAP_NET_ADMIN` (Linux: `SO_RCVBUFFORCE`, as Tailscale does) past `net.core.rmem_max` /
/// `wmem_max`, else up to them; a smaller buffer still works, only with less room. Returns
/// what the kernel granted.
pub fn enlarge_buffers(socket: &impl std::os::fd::AsFd, bytes: usize) -> SocketBuffers {
    let sock = socket2::SockRef::from(socket);
    if !force_buffer(socket, libc_force::RECEIVE, bytes) {
        if let Err(e) = sock.set_recv_buffer_size(bytes) {
            tracing::warn!(error = %e, "could not enlarge the UDP receive buffer");
        }
    }
    if !force_buffer(socket, libc_force::SEND, bytes) {
        if let Err(e) = sock.set_send_buffer_size(bytes) {
            tracing::warn!(error = %e, "could not enlarge the UDP send buffer");
        }
    }
    let granted = socket_buffers(socket).unwrap_or(SocketBuffers {
        receive: 0,
        send: 0,
    });
    if granted.receive < bytes {
        tracing::info!(
            asked = bytes,
            granted = granted.receive,
            "UDP receive buffer capped by net.core.rmem_max (raise it, or give the process \
             CAP_NET_ADMIN, for fewer drops at high rates)"
        );
    }
    granted
}

/// The forcing socket options (Linux only; elsewhere nothing is forced).
mod libc_force {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    pub const RECEIVE: Option<libc::c_int> = Some(libc::SO_RCVBUFFORCE);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    pub const SEND: Option<libc::c_int> = Some(libc::SO_SNDBUFFORCE);
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    pub const RECEIVE: Option<libc::c_int> = None;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    pub const SEND: Option<libc::c_int> = None;
}

/// Sets buffer option `option` (a `*FORCE` one) to `bytes`; false where it does not exist, the
/// process may not (no `CAP_NET_ADMIN`), or `bytes` does not fit the option.
fn force_buffer(
    socket: &impl std::os::fd::AsFd,
    option: Option<libc::c_int>,
    bytes: usize,
) -> bool {
    use std::os::fd::AsRawFd;
    let (Some(option), Ok(value)) = (option, libc::c_int::try_from(bytes)) else {
        return false;
    };
    // SAFETY: the descriptor is borrowed for the call; the value is a c_int that lives across
    // it and whose size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

fn bind_endpoint(
    addr: SocketAddr,
    share_port: bool,
    socket_buffer: Option<usize>,
    server_config: Option<quinn::ServerConfig>,
    stun_queue: usize,
    reset_secret: Option<[u8; 32]>,
) -> Result<BoundEndpoint, EndpointError> {
    let socket_err = |source| EndpointError::Socket { addr, source };
    let socket = bind_udp(addr, share_port).map_err(socket_err)?;
    if let Some(bytes) = socket_buffer {
        let granted = enlarge_buffers(&socket, bytes);
        tracing::debug!(%addr, ?granted, "UDP socket buffers");
    }
    let (demux, stun_rx) = DemuxSocket::new(socket, stun_queue).map_err(socket_err)?;
    let mut endpoint_config = match reset_secret {
        Some(secret) => {
            let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                &secret,
            )));
            // Connection ids must also validate after a restart, or packets of old connections
            // are dropped as invalid instead of answered with a stateless reset.
            let mut cid_key = [0u8; 8];
            cid_key.copy_from_slice(&secret[..8]);
            let cid_key = u64::from_le_bytes(cid_key);
            config.cid_generator(move || {
                Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
            });
            config
        }
        None => quinn::EndpointConfig::default(),
    };
    // STUN and QUIC share the socket: QUIC packets must keep the fixed bit so they never look
    // like STUN.
    endpoint_config.grease_quic_bit(false);
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        endpoint_config,
        server_config,
        demux.clone(),
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(socket_err)?;
    Ok((endpoint, demux, stun_rx))
}

/// Binds `addr`. An IPv6 wildcard (`[::]:port`) is bound dual-stack (IPV6_V6ONLY off, whatever
/// the host's `net.ipv6.bindv6only` says), so that one socket carries both families: the
/// one-socket design (QUIC, STUN and punch probes share it, see [`DemuxSocket`]) keeps working,
/// and IPv4 peers show up as v4-mapped addresses that the demultiplexer normalises.
/// `share_port` (the rendezvous) sets SO_REUSEPORT on it, so that the server's STUN sockets on
/// a second IPv4 address with the same port ([`bind_udp_beside`]) can bind beside the wildcard;
/// only processes of the same user can share the port.
pub fn bind_udp(addr: SocketAddr, share_port: bool) -> std::io::Result<std::net::UdpSocket> {
    if !(addr.is_ipv6() && addr.ip().is_unspecified()) {
        return std::net::UdpSocket::bind(addr);
    }
    let socket = match socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    ) {
        Ok(socket) => socket,
        // A host without IPv6 (disabled in the kernel): the IPv4 wildcard on the same port.
        Err(e) if e.raw_os_error() == Some(97) /* EAFNOSUPPORT */ => {
            tracing::debug!("no IPv6 on this host: binding IPv4 only");
            return std::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], addr.port())));
        }
        Err(e) => return Err(e),
    };
    socket.set_only_v6(false)?;
    if share_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Binds `addr` with SO_REUSEPORT, beside a dual-stack wildcard socket bound by [`bind_udp`]
/// with `share_port` on the same port, or as such a wildcard (dual-stack too) that a specific
/// address binds beside. Non-blocking, for tokio.
pub fn bind_udp_beside(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Wraps a rustls client config for quinn with our transport timers.
pub fn quic_client_config(
    tls: rustls::ClientConfig,
    settings: TransportSettings,
) -> Result<quinn::ClientConfig, EndpointError> {
    client_config_with(tls, settings.transport_config())
}

/// As [`quic_client_config`], for dialing another peer: with the peer windows (see
/// [`PEER_STREAM_WINDOW`]).
pub fn quic_peer_client_config(
    tls: rustls::ClientConfig,
    settings: TransportSettings,
) -> Result<quinn::ClientConfig, EndpointError> {
    client_config_with(tls, settings.peer_transport_config())
}

fn client_config_with(
    tls: rustls::ClientConfig,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, EndpointError> {
    let crypto =
        QuicClientConfig::try_from(tls).map_err(|e| EndpointError::Crypto(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport);
    Ok(config)
}

/// The end-entity certificate the other side of `conn` presented (our TLS configs always
/// require one), or why there is none.
pub fn remote_certificate(
    conn: &quinn::Connection,
) -> Result<rustls::pki_types::CertificateDer<'static>, &'static str> {
    let identity = conn.peer_identity().ok_or("no certificate presented")?;
    let chain = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| "unexpected identity type")?;
    chain.first().cloned().ok_or("empty certificate chain")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn the_server_pings_only_peers_silent_past_their_own_keep_alive() {
        let peers = TransportSettings::default();
        let server = peers.server_keep_alive();
        // Longer than the peers' interval (their pings reset it), shorter than the idle
        // timeout (a silent peer is still pinged before its connection would die).
        assert!(server > peers.keep_alive, "{server:?}");
        assert!(server < peers.idle_timeout, "{server:?}");
        // A configuration whose idle timeout does not exceed its keep-alive keeps the latter.
        let odd = TransportSettings {
            keep_alive: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(5),
        };
        assert_eq!(odd.server_keep_alive(), Duration::from_secs(10));
    }

    /// The receive buffer a socket must have once [`enlarge_buffers`] asked for `bytes` here:
    /// all of it where this process may force it (`CAP_NET_ADMIN`), else up to
    /// `net.core.rmem_max`, and never below the default.
    pub(crate) fn granted_buffer(bytes: usize) -> usize {
        let scratch = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let default = socket_buffers(&scratch).unwrap().receive;
        if force_buffer(&scratch, libc_force::RECEIVE, bytes) {
            return bytes;
        }
        let cap = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok());
        match cap {
            Some(cap) => cap.min(bytes).max(default),
            None => default,
        }
    }

    #[test]
    fn sockets_get_the_larger_buffers_the_kernel_allows() {
        for bytes in [SERVER_SOCKET_BUFFER, PEER_SOCKET_BUFFER] {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let granted = enlarge_buffers(&socket, bytes);
            let sock = socket2::SockRef::from(&socket);
            assert_eq!(granted, socket_buffers(&socket).unwrap());
            // What Linux reports (twice the room it grants) is shown as the room.
            if cfg!(target_os = "linux") {
                assert_eq!(2 * granted.receive, sock.recv_buffer_size().unwrap());
                assert_eq!(2 * granted.send, sock.send_buffer_size().unwrap());
            }
            assert!(
                granted.receive >= granted_buffer(bytes),
                "{bytes}: {granted:?}"
            );
        }
    }

    #[test]
    fn a_peer_endpoint_socket_gets_the_peer_buffer() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (_endpoint, socket, _stun) = make_endpoint(
                "127.0.0.1:0".parse().unwrap(),
                None,
                TransportSettings::default(),
                4,
                None,
            )
            .unwrap();
            let receive = socket.socket_buffers().unwrap().receive;
            assert!(receive >= granted_buffer(PEER_SOCKET_BUFFER), "{receive}");
        });
    }
}
