//! Pure data and parsing shared by the rendezvous and the peer: peer ids, the control protocol, chat
//! messages, the length-prefixed frame codec and STUN helpers.
//!
//! Nothing here opens a socket or spawns a task, so every decoder can be tested (and fuzzed) on
//! arbitrary bytes. The optional `tokio` feature adds [`frame_io`], thin async wrappers over
//! [`frame`].

pub mod chat;
pub mod frame;
#[cfg(feature = "tokio")]
pub mod frame_io;
pub mod id;
pub mod message;
pub mod nat;
pub mod relay;
pub mod stun;
pub mod stun5780;

pub use chat::{ChatError, ChatFrame, ChatMessage};
pub use frame::{FrameDecoder, FrameError, MAX_FRAME_LEN};
pub use id::{ParsePeerIdError, PeerId};
pub use message::{
    ControlMessage, ErrorCode, MessageError, PeerMessage, PEER_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

/// ALPN of the control protocol between a peer and the rendezvous.
pub const ALPN_RENDEZVOUS: &[u8] = b"p2p-rendezvous/1";
/// ALPN of the protocol between two peers: `p2p-peer/` and
/// [`PEER_PROTOCOL_VERSION`](message::PEER_PROTOCOL_VERSION). A peer accepts only this one, so a
/// peer of another version fails in the handshake; it dials offering the older ones too
/// ([`ALPN_PEER_OLDER`]) so that it can name an older peer's version in its error.
pub const ALPN_PEER: &[u8] = b"p2p-peer/4";
/// ALPNs of earlier peer protocol versions, newest first (offered when dialing, never accepted).
pub const ALPN_PEER_OLDER: &[&[u8]] = &[b"p2p-peer/3", b"p2p-peer/2", b"p2p-peer/1"];

/// ALPN of the TLS-over-TCP tunnel that carries a peer's QUIC packets to the rendezvous when UDP
/// is blocked.
pub const ALPN_TUNNEL: &[u8] = b"p2p-tunnel/1";
