//! The register handshake with a rendezvous, and the TLS server names both kinds of dial use.
//!
//! Why this exists on its own: the session ([`crate::session`]) is not the only program that
//! registers. The attack tests and the rendezvous load generator register raw clients with
//! identities of their own, and they should speak the exact handshake the peer speaks rather than
//! a copy of it that can drift.

use std::net::SocketAddr;
use std::time::Duration;

use common::frame_io::{read_frame, write_frame, FrameIoError};
use common::message::MessageError;
use common::ControlMessage;

/// TLS server name sent when dialing a rendezvous (the verifiers check the key, not the name).
pub const RENDEZVOUS_SERVER_NAME: &str = "rendezvous";
/// TLS server name sent when dialing a peer (the verifier checks the peer's key, not the name).
pub const PEER_SERVER_NAME: &str = "peer";

/// Why the register exchange failed. Each variant reads as the underlying error does, so a
/// caller can put it after its own context.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The control stream could not be opened.
    #[error("{0}")]
    Open(#[from] quinn::ConnectionError),
    /// Writing the request or reading the reply failed.
    #[error("{0}")]
    Stream(#[from] FrameIoError),
    /// No reply in time.
    #[error("no reply to register within {} s", .0.as_secs())]
    Timeout(Duration),
    /// The server closed the control stream without replying.
    #[error("server closed the control stream")]
    Closed,
    /// The reply is not a control message.
    #[error("{0}")]
    Decode(#[from] MessageError),
}

/// The control stream of a registration and the server's reply to `register`.
pub struct RegisterExchange {
    /// Our half of the control stream: keep it open, the registration lives as long as it does.
    pub send: quinn::SendStream,
    /// The server's half.
    pub recv: quinn::RecvStream,
    /// The reply: `Registered` (check its version and id), or an `Error` refusal.
    pub reply: ControlMessage,
}

/// Opens the control stream on `conn` (a connection to the rendezvous, ALPN
/// [`common::ALPN_RENDEZVOUS`]), sends `register` with protocol `version` and our interface
/// addresses `local_addrs`, and reads the one reply, waiting at most `timeout` for it.
pub async fn register(
    conn: &quinn::Connection,
    version: u32,
    local_addrs: Vec<SocketAddr>,
    timeout: Duration,
) -> Result<RegisterExchange, HandshakeError> {
    register_with(conn, version, local_addrs, None, timeout).await
}

/// As [`register`], announcing `mapped_port`, the external port our router maps to our UDP
/// port.
pub async fn register_with(
    conn: &quinn::Connection,
    version: u32,
    local_addrs: Vec<SocketAddr>,
    mapped_port: Option<u16>,
    timeout: Duration,
) -> Result<RegisterExchange, HandshakeError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let request = ControlMessage::Register {
        version,
        local_addrs,
        mapped_port,
    };
    write_frame(&mut send, &request.encode()).await?;
    let body = tokio::time::timeout(timeout, read_frame(&mut recv))
        .await
        .map_err(|_| HandshakeError::Timeout(timeout))??
        .ok_or(HandshakeError::Closed)?;
    let reply = ControlMessage::decode(&body)?;
    Ok(RegisterExchange { send, recv, reply })
}
