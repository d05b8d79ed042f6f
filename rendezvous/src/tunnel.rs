//! TLS-over-TCP tunnels for peers whose network blocks UDP: each tunnel gets a virtual address,
//! its datagrams are injected into the QUIC endpoint as if they came from that address, and
//! QUIC packets to it are written back into the tunnel. Everything above (registration, relay)
//! runs unchanged.
//!
//! The port is open to the internet, so what one remote party can hold is bounded
//! ([`TunnelLimits`]): new connections per second per source, tunnels per source and in all,
//! TLS handshakes in progress per source and in all (in a [`Lobby`]: a newcomer closes the
//! oldest handshake, so handshakes that never finish cannot keep an honest peer out), a
//! deadline on the handshake, an idle timeout once TLS is up, a write timeout when the client
//! stops reading, datagrams no larger than QUIC sends, and a queue towards each tunnel bounded
//! in packets of bounded size. Refusals close the TCP connection at once and are counted
//! ([`TunnelCounters`]), not logged per connection (that would be a log flood).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use transport::tunnel::{TunnelEnd, TunnelTimeouts, MAX_TUNNEL_DATAGRAM};
use transport::{DemuxSocket, PathTarget, VirtualSink};

use crate::sources::{SlotRefusal, SourceBuckets, SourceKey, SourceSlots};
use crate::waiting::{Eviction, Lobby};

/// Sources whose connection rate is remembered (least recently seen forgotten first).
const RATE_SOURCES: usize = 4096;

/// Datagrams queued towards one tunnel (from the QUIC endpoint to the TCP writer); more are
/// dropped, as a congested link would. Each is at most one QUIC packet (at most
/// [`MAX_TUNNEL_DATAGRAM`] bytes), so the queue holds at most [`TUNNEL_QUEUE_BYTES`].
pub const TUNNEL_QUEUE: usize = 128;

/// Bound in bytes of the queue towards one tunnel.
pub const TUNNEL_QUEUE_BYTES: usize = TUNNEL_QUEUE * MAX_TUNNEL_DATAGRAM;

/// What the tunnel port lets remote parties hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TunnelLimits {
    /// Tunnels (TCP connections, in handshake or open) in all.
    pub max_tunnels: usize,
    /// Tunnels per source (IPv4 address or IPv6 /64): a few peers behind one NAT.
    pub tunnels_per_source: usize,
    /// TLS handshakes in progress in all (a newer one closes the oldest).
    pub max_handshakes: usize,
    /// TLS handshakes in progress per source (a newer one closes the source's oldest).
    pub handshakes_per_source: usize,
    /// New connections per second per source, sustained (more are closed at once).
    pub connections_per_second: f64,
    /// Burst of new connections per source.
    pub connection_burst: f64,
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
            connections_per_second: 10.0,
            connection_burst: 20.0,
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
    /// Connections refused: the source opens them faster than its rate.
    pub refused_rate: AtomicU64,
    /// Handshakes closed to admit a newer one from the same source.
    pub evicted_per_source: AtomicU64,
    /// Handshakes closed to admit a newer one when all handshake places were taken.
    pub evicted_total: AtomicU64,
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
    fn refused(&self, refusal: SlotRefusal) {
        let counter = match refusal {
            SlotRefusal::PerSource(_) => &self.refused_per_source,
            SlotRefusal::Total(_) => &self.refused_total,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn evicted(&self, why: Eviction) {
        let counter = match why {
            Eviction::PerSource => &self.evicted_per_source,
            Eviction::Total => &self.evicted_total,
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

/// The next virtual address not held by a live tunnel: after 2^24 tunnels the numbering wraps,
/// and a newcomer must not take over (and, on closing, remove) a long-lived tunnel's route.
/// At most `max_tunnels` addresses are held, so this skips at most that many.
fn free_virtual_addr(demux: &DemuxSocket, counter: &AtomicU32) -> SocketAddr {
    loop {
        let addr = virtual_addr(counter.fetch_add(1, Ordering::Relaxed));
        if !matches!(demux.route_of(addr), PathTarget::Virtual(_)) {
            return addr;
        }
    }
}

/// Accepts tunnels until `shutdown` flips.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    demux: Arc<DemuxSocket>,
    limits: TunnelLimits,
    counters: Arc<TunnelCounters>,
    shared: Arc<crate::server::Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let tunnel_slots = SourceSlots::new(limits.tunnels_per_source, limits.max_tunnels);
    let handshakes = Lobby::new(limits.handshakes_per_source, limits.max_handshakes);
    let mut rates = SourceBuckets::new(
        limits.connection_burst,
        limits.connections_per_second,
        RATE_SOURCES,
    );
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
        if !rates.try_take(source, 1.0, Instant::now()) {
            counters.refused_rate.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let tunnel_slot = match tunnel_slots.try_acquire(source) {
            Ok(slot) => slot,
            Err(refusal) => {
                counters.refused(refusal);
                tracing::debug!(%remote, %refusal, "tunnel refused");
                continue;
            }
        };
        let (mut handshake, eviction) = handshakes.enter(source);
        if let Some(why) = eviction {
            counters.evicted(why);
        }
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let demux = demux.clone();
        let shared = shared.clone();
        let counters = counters.clone();
        let addr = free_virtual_addr(&demux, &counter);
        let mut stop = shutdown.clone();
        tunnels.spawn(async move {
            let accept = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp));
            let tls = tokio::select! {
                done = handshake.unless_evicted(accept) => match done {
                    Some(Ok(Ok(tls))) => tls,
                    Some(Ok(Err(e))) => {
                        counters.handshake_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%remote, error = %e, "tunnel TLS handshake failed");
                        return;
                    }
                    Some(Err(_)) => {
                        counters.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%remote, "tunnel TLS handshake timed out");
                        return;
                    }
                    // A newer connection took this one's place (counted when it did).
                    None => return,
                },
                _ = stop.changed() => return,
            };
            drop(handshake);
            tracing::debug!(%remote, virtual_addr = %addr, "TCP tunnel open");
            counters.open.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = mpsc::channel(TUNNEL_QUEUE);
            demux.set_route(addr, PathTarget::Virtual(VirtualSink::new([0; 16], tx)));
            let injector = demux.injector();
            // Registrations through the tunnel count against its real source.
            shared.tunnel_source(addr, Some(remote.ip()));
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
            shared.tunnel_source(addr, None);
            drop(tunnel_slot);
        });
    }
    tunnels.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wrapped_numbering_skips_addresses_of_live_tunnels() {
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (demux, _stun) = DemuxSocket::new(std_socket, 4).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        // A long-lived tunnel holds the address numbers 5 and 5 + 2^24 both map to.
        demux.set_route(
            virtual_addr(5),
            PathTarget::Virtual(VirtualSink::new([0; 16], tx)),
        );
        let counter = AtomicU32::new(5 + (1 << 24));
        assert_eq!(virtual_addr(5 + (1 << 24)), virtual_addr(5));
        assert_eq!(free_virtual_addr(&demux, &counter), virtual_addr(6));
    }
}
