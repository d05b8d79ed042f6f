//! A datagram tunnel over a byte stream (TLS over TCP), for networks that block UDP.
//!
//! The peer's QUIC packets to the rendezvous go through it unchanged: each is written as
//! `[u16 length][datagram]`, and the other side injects it into its QUIC endpoint as if it had
//! arrived over UDP from the tunnel's address. QUIC keeps its own encryption and
//! authentication; TLS makes the connection look like ordinary HTTPS to middleboxes.
//!
//! The far end may be hostile (the rendezvous runs this against anyone on the internet), so
//! both directions are bounded: a datagram larger than QUIC ever sends closes the tunnel before
//! anything is allocated for it, a tunnel that carries no datagram for [`TunnelTimeouts::idle`]
//! closes, and a write the far end does not take off our hands within
//! [`TunnelTimeouts::write`] (it stopped reading: TCP backpressure) closes it too.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::demux::{Injector, VirtualPacket};

/// Largest datagram carried. QUIC never sends more than its maximum UDP payload (1452 bytes
/// with quinn's path MTU discovery bound, 1472 on a 1500-byte link); 2048 leaves room and
/// bounds what one announced length can make the reader allocate.
pub const MAX_TUNNEL_DATAGRAM: usize = 2048;

/// Bytes of outgoing frames gathered into one write.
const WRITE_BATCH: usize = 60 * 1024;

/// How long a tunnel may go quiet and how long one write may block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelTimeouts {
    /// No complete datagram from the far end for this long closes the tunnel. QUIC sends a
    /// keep-alive every 15 s on a live connection, so a live tunnel is never this quiet.
    pub idle: Duration,
    /// One write (a batch of frames, at most 60 KiB) not accepted by the stream within this
    /// long closes the tunnel: the far end is not reading.
    pub write: Duration,
}

impl Default for TunnelTimeouts {
    fn default() -> Self {
        TunnelTimeouts {
            idle: Duration::from_secs(60),
            write: Duration::from_secs(10),
        }
    }
}

/// Why a tunnel stopped.
#[derive(Debug, thiserror::Error)]
pub enum TunnelEnd {
    /// The stream ended or failed while waiting for the next datagram.
    #[error("tunnel closed: {0}")]
    Closed(std::io::Error),
    /// The stream ended or failed in the middle of a datagram.
    #[error("tunnel closed inside a datagram: {0}")]
    Truncated(std::io::Error),
    /// The far end announced a datagram larger than [`MAX_TUNNEL_DATAGRAM`].
    #[error("datagram of {0} bytes announced (at most {MAX_TUNNEL_DATAGRAM})")]
    Oversized(usize),
    /// No datagram for [`TunnelTimeouts::idle`].
    #[error("no datagram for {0:?}")]
    Idle(Duration),
    /// Writing to the stream failed.
    #[error("tunnel write failed: {0}")]
    WriteFailed(std::io::Error),
    /// A write was not accepted within [`TunnelTimeouts::write`].
    #[error("write blocked for {0:?}: the far end is not reading")]
    WriteTimeout(Duration),
    /// The outgoing channel closed (the route was removed).
    #[error("tunnel no longer used")]
    Unused,
}

/// [`run_tunnel_with`] with the default timeouts.
pub async fn run_tunnel<S>(
    stream: S,
    injector: Injector,
    from: SocketAddr,
    outgoing: mpsc::Receiver<VirtualPacket>,
) -> TunnelEnd
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    run_tunnel_with(stream, injector, from, outgoing, TunnelTimeouts::default()).await
}

/// Moves datagrams both ways until the stream or the outgoing channel ends, or a bound is hit:
/// frames read from `stream` are injected as coming from `from`; packets from `outgoing` are
/// written as frames. Returns why it stopped.
pub async fn run_tunnel_with<S>(
    stream: S,
    injector: Injector,
    from: SocketAddr,
    mut outgoing: mpsc::Receiver<VirtualPacket>,
    timeouts: TunnelTimeouts,
) -> TunnelEnd
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let read = async move {
        loop {
            let datagram =
                match tokio::time::timeout(timeouts.idle, read_datagram(&mut reader)).await {
                    Ok(Ok(datagram)) => datagram,
                    Ok(Err(end)) => return end,
                    Err(_) => return TunnelEnd::Idle(timeouts.idle),
                };
            // A full queue drops, as a congested link would; QUIC recovers.
            let _ = injector.inject(from, datagram);
        }
    };
    let write = async move {
        // Grows to at most WRITE_BATCH + one frame, only on a tunnel that carries that much.
        let mut batch = Vec::new();
        while let Some(packet) = outgoing.recv().await {
            batch.clear();
            push_frame(&mut batch, &packet.data);
            // Coalesce what is already queued into one write.
            while batch.len() < WRITE_BATCH {
                match outgoing.try_recv() {
                    Ok(more) => push_frame(&mut batch, &more.data),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                continue;
            }
            let written = async {
                writer.write_all(&batch).await?;
                writer.flush().await
            };
            match tokio::time::timeout(timeouts.write, written).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return TunnelEnd::WriteFailed(e),
                Err(_) => return TunnelEnd::WriteTimeout(timeouts.write),
            }
        }
        TunnelEnd::Unused
    };
    tokio::select! {
        end = read => end,
        end = write => end,
    }
}

/// Reads one `[u16 length][datagram]` frame, refusing lengths above [`MAX_TUNNEL_DATAGRAM`]
/// before allocating.
async fn read_datagram<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Vec<u8>, TunnelEnd> {
    let mut len = [0u8; 2];
    reader
        .read_exact(&mut len)
        .await
        .map_err(TunnelEnd::Closed)?;
    let len = usize::from(u16::from_be_bytes(len));
    if len > MAX_TUNNEL_DATAGRAM {
        return Err(TunnelEnd::Oversized(len));
    }
    let mut datagram = vec![0u8; len];
    reader
        .read_exact(&mut datagram)
        .await
        .map_err(TunnelEnd::Truncated)?;
    Ok(datagram)
}

/// Appends `datagram` as a frame; one larger than the tunnel carries is dropped (the far end
/// would close the tunnel over it), as a link drops what exceeds its MTU.
fn push_frame(batch: &mut Vec<u8>, datagram: &[u8]) {
    let Ok(len) = u16::try_from(datagram.len()) else {
        return;
    };
    if datagram.len() > MAX_TUNNEL_DATAGRAM {
        return;
    }
    batch.extend_from_slice(&len.to_be_bytes());
    batch.extend_from_slice(datagram);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_frames_and_refuses_oversized_lengths_before_allocating() {
        let mut input: &[u8] = &[0, 3, 1, 2, 3, 0, 0];
        assert_eq!(read_datagram(&mut input).await.unwrap(), vec![1, 2, 3]);
        assert_eq!(read_datagram(&mut input).await.unwrap(), Vec::<u8>::new());
        let mut huge: &[u8] = &[0xff, 0xff];
        assert!(matches!(
            read_datagram(&mut huge).await,
            Err(TunnelEnd::Oversized(65_535))
        ));
        let edge = (MAX_TUNNEL_DATAGRAM as u16 + 1).to_be_bytes();
        let mut over: &[u8] = &edge;
        assert!(matches!(
            read_datagram(&mut over).await,
            Err(TunnelEnd::Oversized(n)) if n == MAX_TUNNEL_DATAGRAM + 1
        ));
        let mut cut: &[u8] = &[0, 5, 1];
        assert!(matches!(
            read_datagram(&mut cut).await,
            Err(TunnelEnd::Truncated(_))
        ));
    }

    #[test]
    fn oversized_outgoing_datagrams_are_dropped_not_truncated() {
        let mut batch = Vec::new();
        push_frame(&mut batch, &[9; MAX_TUNNEL_DATAGRAM + 1]);
        assert!(batch.is_empty());
        push_frame(&mut batch, &[9; 4]);
        assert_eq!(batch, [0, 4, 9, 9, 9, 9]);
    }

    fn injector() -> (std::sync::Arc<crate::DemuxSocket>, Injector) {
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (socket, _stun) = crate::DemuxSocket::new(std_socket, 4).unwrap();
        let injector = socket.injector();
        (socket, injector)
    }

    fn from() -> SocketAddr {
        "241.0.0.1:443".parse().unwrap()
    }

    #[tokio::test]
    async fn a_quiet_tunnel_closes_after_the_idle_timeout() {
        let (_socket, injector) = injector();
        let (ours, _theirs) = tokio::io::duplex(4096);
        let (_tx, rx) = mpsc::channel(4);
        let timeouts = TunnelTimeouts {
            idle: Duration::from_millis(200),
            write: Duration::from_secs(60),
        };
        let end = tokio::time::timeout(
            Duration::from_secs(30),
            run_tunnel_with(ours, injector, from(), rx, timeouts),
        )
        .await
        .expect("tunnel ends by itself");
        assert!(matches!(end, TunnelEnd::Idle(_)), "{end}");
    }

    #[tokio::test]
    async fn a_far_end_that_does_not_read_closes_the_tunnel() {
        let (_socket, injector) = injector();
        // 64 bytes of buffer between the two ends: the first batch cannot be written.
        let (ours, _theirs) = tokio::io::duplex(64);
        let (tx, rx) = mpsc::channel(4);
        tx.send(VirtualPacket {
            label: [0; 16],
            data: vec![1; 1200],
        })
        .await
        .unwrap();
        let timeouts = TunnelTimeouts {
            idle: Duration::from_secs(60),
            write: Duration::from_millis(200),
        };
        let end = tokio::time::timeout(
            Duration::from_secs(30),
            run_tunnel_with(ours, injector, from(), rx, timeouts),
        )
        .await
        .expect("tunnel ends by itself");
        assert!(matches!(end, TunnelEnd::WriteTimeout(_)), "{end}");
    }

    #[tokio::test]
    async fn an_oversized_announcement_closes_the_tunnel() {
        let (_socket, injector) = injector();
        let (ours, mut theirs) = tokio::io::duplex(4096);
        let (_tx, rx) = mpsc::channel(4);
        theirs.write_all(&[0xff, 0xff]).await.unwrap();
        let end = tokio::time::timeout(
            Duration::from_secs(30),
            run_tunnel_with(ours, injector, from(), rx, TunnelTimeouts::default()),
        )
        .await
        .expect("tunnel ends by itself");
        assert!(matches!(end, TunnelEnd::Oversized(65_535)), "{end}");
    }
}
