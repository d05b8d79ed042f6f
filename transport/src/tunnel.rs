//! A datagram tunnel over a byte stream (TLS over TCP), for networks that block UDP.
//!
//! The peer's QUIC packets to the rendezvous go through it unchanged: each is written as
//! `[u16 length][datagram]`, and the other side injects it into its QUIC endpoint as if it had
//! arrived over UDP from the tunnel's address. QUIC keeps its own encryption and
//! authentication; TLS makes the connection look like ordinary HTTPS to middleboxes.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::demux::{Injector, VirtualPacket};

/// Largest datagram carried.
pub const MAX_TUNNEL_DATAGRAM: usize = 65_535;

/// Moves datagrams both ways until the stream or the outgoing channel ends: frames read from
/// `stream` are injected as coming from `from`; packets from `outgoing` are written as frames.
/// Returns why it stopped.
pub async fn run_tunnel<S>(
    stream: S,
    injector: Injector,
    from: SocketAddr,
    mut outgoing: mpsc::Receiver<VirtualPacket>,
) -> String
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let read = async move {
        let mut len = [0u8; 2];
        loop {
            if let Err(e) = reader.read_exact(&mut len).await {
                return format!("tunnel closed: {e}");
            }
            let mut datagram = vec![0u8; u16::from_be_bytes(len) as usize];
            if let Err(e) = reader.read_exact(&mut datagram).await {
                return format!("tunnel closed inside a datagram: {e}");
            }
            // A full queue drops, as a congested link would; QUIC recovers.
            let _ = injector.inject(from, datagram);
        }
    };
    let write = async move {
        let mut batch = Vec::with_capacity(64 * 1024);
        while let Some(packet) = outgoing.recv().await {
            batch.clear();
            push_frame(&mut batch, &packet.data);
            // Coalesce what is already queued into one write.
            while batch.len() < 60 * 1024 {
                match outgoing.try_recv() {
                    Ok(more) => push_frame(&mut batch, &more.data),
                    Err(_) => break,
                }
            }
            if let Err(e) = writer.write_all(&batch).await {
                return format!("tunnel write failed: {e}");
            }
            if let Err(e) = writer.flush().await {
                return format!("tunnel write failed: {e}");
            }
        }
        "tunnel no longer used".to_owned()
    };
    tokio::select! {
        reason = read => reason,
        reason = write => reason,
    }
}

fn push_frame(batch: &mut Vec<u8>, datagram: &[u8]) {
    let len = datagram.len().min(MAX_TUNNEL_DATAGRAM);
    batch.extend_from_slice(&(len as u16).to_be_bytes());
    batch.extend_from_slice(&datagram[..len]);
}
