//! The UDP socket that QUIC and STUN share, and QUIC endpoint set-up used by both binaries.
//!
//! Every packet of a process leaves one UDP socket, so that the NAT mapping the rendezvous
//! observes is the mapping other peers must reach. [`DemuxSocket`] wraps that socket for quinn and
//! takes STUN-shaped datagrams out of the receive path before quinn sees them.

mod demux;
mod endpoint;
pub mod tunnel;

pub use demux::{
    DemuxSocket, DemuxStats, Injector, PathTarget, StunDatagram, VirtualPacket, VirtualSink,
};
pub use endpoint::{make_endpoint, quic_client_config, EndpointError, TransportSettings};
