//! The UDP socket that QUIC and STUN share, and QUIC endpoint set-up used by both binaries.
//!
//! Every packet of a process leaves one UDP socket, so that the NAT mapping the rendezvous
//! observes is the mapping other peers must reach. [`DemuxSocket`] wraps that socket for quinn and
//! takes STUN-shaped datagrams out of the receive path before quinn sees them.

pub mod channel;
mod demux;
mod endpoint;
mod scripted;
pub mod tunnel;

pub use demux::{
    canonical, AliasRefusal, DemuxSocket, DemuxStats, ExtraId, Injector, PathTarget, StunDatagram,
    VirtualPacket, VirtualSink, MAX_ALIASES, MAX_ALIASES_PER_ADDR, MAX_EXTRA_SOCKETS,
};
pub use endpoint::{
    bind_udp, bind_udp_beside, enlarge_buffers, make_endpoint, make_server_endpoint,
    quic_client_config, quic_peer_client_config, remote_certificate, socket_buffers, BoundEndpoint,
    EndpointError, ServerTransport, SocketBuffers, TransportSettings, PEER_CONNECTION_WINDOW,
    PEER_MAX_UDP_PAYLOAD, PEER_SOCKET_BUFFER, PEER_STREAM_WINDOW, SERVER_SOCKET_BUFFER,
};
pub use scripted::{check_channel_script, check_receive_script, ScriptedDatagram, ScriptedSocket};

/// Waits for SIGINT or SIGTERM (how both binaries are asked to stop).
pub async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}
