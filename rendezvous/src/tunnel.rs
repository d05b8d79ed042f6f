//! TLS-over-TCP tunnels for peers whose network blocks UDP: each tunnel gets a virtual address,
//! its datagrams are injected into the QUIC endpoint as if they came from that address, and
//! QUIC packets to it are written back into the tunnel. Everything above (registration, relay)
//! runs unchanged.
//!
//! The port is open to the internet, so what one remote party can hold is bounded
//! ([`TunnelLimits`]): tunnels per source and in all, TLS handshakes in progress per source and
//! in all, a deadline on the handshake, an idle timeout once TLS is up, a write timeout when the
//! client stops reading, datagrams no larger than QUIC sends, and a queue towards each tunnel
//! bounded in packets of bounded size. Refusals close the TCP connection at once and are
//! counted ([`TunnelCounters`]), not logged per connection (that would be a log flood).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use transport::tunnel::{TunnelEnd, TunnelTimeouts, MAX_TUNNEL_DATAGRAM};
use transport::{DemuxSocket, PathTarget, VirtualSink};

use crate::sources::{SlotRefusal, SourceKey, SourceSlots};

/// Datagrams queued towards one tunnel (from the QUIC endpoint to the TCP writer); more are
/// dropped, as a congested link would. Each is at most one QUIC packet (at most
/// [`MAX_TUNNEL_DATAGRAM`] bytes), so the queue holds at most [`TUNNEL_QUEUE_BYTES`].
pub const TUNNEL_QUEUE: usize = 128;

/// Bound in bytes of the queue towards one tunnel.
pub const TUNNEL_QUEUE_BYTES: usize = TUNNEL_QUEUE * MAX_TUNNEL_DATAGRAM;

/// What the tunnel port lets remote parties hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelLimits {
    /// Tunnels (TCP connections, in handshake or open) in all.
    pub max_tunnels: usize,
    /// Tunnels per source (IPv4 address or IPv6 /64): a few peers behind one NAT.
    pub tunnels_per_source: usize,
    /// TLS handshakes in progress in all.
    pub max_handshakes: usize,
    /// TLS handshakes in progress per source.
    pub handshakes_per_source: usize,
    /// Time from TCP accept to a completed TLS handshake.
    pub handshake_timeout: Duration,
    /// A tunnel that carries no datagram from the client for this long is closed (QUIC's
    /// keep-alive every 15 s keeps a live one busy).
    pub idle_timeout: Duration,
    /// A write towards a client that is not accepted within this long (the client is not
    /// reading) closes the tunnel.
    pub write_timeout: Duration,
}

impl Default for TunnelLimits {
    fn default() -> Self {
        TunnelLimits {
            max_tunnels: 1024,
            tunnels_per_source: 8,
            max_handshakes: 128,
            handshakes_per_source: 4,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// What happened on the tunnel port, for `/metrics`.
#[derive(Debug, Default)]
pub struct TunnelCounters {
    /// Tunnels open now (TLS up).
    pub open: AtomicU64,
    /// Connections refused: the source holds its tunnels.
    pub refused_per_source: AtomicU64,
    /// Connections refused: all tunnels taken.
    pub refused_total: AtomicU64,
    /// Connections refused: the source has its handshakes in progress.
    pub refused_handshakes_per_source: AtomicU64,
    /// Connections refused: all handshake slots taken.
    pub refused_handshakes_total: AtomicU64,
    /// Handshakes not finished within the deadline.
    pub handshake_timeouts: AtomicU64,
    /// Handshakes that failed (bad TLS, wrong ALPN, connection closed).
    pub handshake_failures: AtomicU64,
    /// Tunnels closed after the idle timeout.
    pub closed_idle: AtomicU64,
    /// Tunnels closed because the client did not read.
    pub closed_write_timeout: AtomicU64,
    /// Tunnels closed over a datagram larger than QUIC sends.
    pub closed_oversized: AtomicU64,
    /// Tunnels closed by the client or a network error.
    pub closed_by_client: AtomicU64,
}

impl TunnelCounters {
    fn refused(&self, handshake: bool, refusal: SlotRefusal) {
        let counter = match (handshake, refusal) {
            (false, SlotRefusal::PerSource(_)) => &self.refused_per_source,
            (false, SlotRefusal::Total(_)) => &self.refused_total,
            (true, SlotRefusal::PerSource(_)) => &self.refused_handshakes_per_source,
            (true, SlotRefusal::Total(_)) => &self.refused_handshakes_total,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn closed(&self, end: &TunnelEnd) {
        let counter = match end {
            TunnelEnd::Idle(_) => &self.closed_idle,
            TunnelEnd::WriteTimeout(_) => &self.closed_write_timeout,
            TunnelEnd::Oversized(_) => &self.closed_oversized,
            _ => &self.closed_by_client,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The virtual address of the n-th tunnel: in 241.0.0.0/8, reserved and never routed.
fn virtual_addr(n: u32) -> SocketAddr {
    let b = n.to_be_bytes();
    SocketAddr::from(([241, b[1], b[2], b[3]], 443))
}

/// Accepts tunnels until `shutdown` flips.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    demux: Arc<DemuxSocket>,
    limits: TunnelLimits,
    counters: Arc<TunnelCounters>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let tunnel_slots = SourceSlots::new(limits.tunnels_per_source, limits.max_tunnels);
    let handshake_slots = SourceSlots::new(limits.handshakes_per_source, limits.max_handshakes);
    let timeouts = TunnelTimeouts {
        idle: limits.idle_timeout,
        write: limits.write_timeout,
    };
    let counter = AtomicU32::new(1);
    let mut tunnels = JoinSet::new();
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: give the tasks time to end.
                    tracing::warn!(error = %e, "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = tunnels.join_next(), if !tunnels.is_empty() => continue,
            _ = shutdown.changed() => break,
        };
        let source = SourceKey::of(remote.ip());
        // Dropping `tcp` on refusal closes the connection at once.
        let tunnel_slot = match tunnel_slots.try_acquire(source) {
            Ok(slot) => slot,
            Err(refusal) => {
                counters.refused(false, refusal);
                tracing::debug!(%remote, %refusal, "tunnel refused");
                continue;
            }
        };
        let handshake_slot = match handshake_slots.try_acquire(source) {
            Ok(slot) => slot,
            Err(refusal) => {
                counters.refused(true, refusal);
                tracing::debug!(%remote, %refusal, "tunnel handshake refused");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let demux = demux.clone();
        let counters = counters.clone();
        let addr = virtual_addr(counter.fetch_add(1, Ordering::Relaxed));
        let mut stop = shutdown.clone();
        tunnels.spawn(async move {
            let handshake = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp));
            let tls = tokio::select! {
                done = handshake => match done {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        counters.handshake_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%remote, error = %e, "tunnel TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        counters.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%remote, "tunnel TLS handshake timed out");
                        return;
                    }
                },
                _ = stop.changed() => return,
            };
            drop(handshake_slot);
            tracing::debug!(%remote, virtual_addr = %addr, "TCP tunnel open");
            counters.open.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = mpsc::channel(TUNNEL_QUEUE);
            demux.set_route(addr, PathTarget::Virtual(VirtualSink::new([0; 16], tx)));
            let injector = demux.injector();
            let reason = tokio::select! {
                end = transport::tunnel::run_tunnel_with(tls, injector, addr, rx, timeouts) => {
                    counters.closed(&end);
                    end.to_string()
                }
                _ = stop.changed() => "server shutting down".to_owned(),
            };
            demux.remove_routes(addr);
            counters.open.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(%remote, %reason, "TCP tunnel closed");
            drop(tunnel_slot);
        });
    }
    tunnels.shutdown().await;
}
