//! TLS-over-TCP tunnels for peers whose network blocks UDP: each tunnel gets a virtual address,
//! its datagrams are injected into the QUIC endpoint as if they came from that address, and
//! QUIC packets to it are written back into the tunnel. Everything above (registration, relay)
//! runs unchanged.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use transport::{DemuxSocket, PathTarget, VirtualSink};

/// Datagrams queued towards one tunnel.
const TUNNEL_QUEUE: usize = 1024;

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
    max_tunnels: usize,
    shared: Arc<crate::server::Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let permits = Arc::new(Semaphore::new(max_tunnels));
    let counter = AtomicU32::new(1);
    let mut tunnels = JoinSet::new();
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = tunnels.join_next(), if !tunnels.is_empty() => continue,
            _ = shutdown.changed() => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%remote, "tunnel limit reached; refusing");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let demux = demux.clone();
        let shared = shared.clone();
        let addr = virtual_addr(counter.fetch_add(1, Ordering::Relaxed));
        let mut stop = shutdown.clone();
        tunnels.spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "tunnel TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            tracing::info!(%remote, virtual_addr = %addr, "TCP tunnel open");
            let (tx, rx) = mpsc::channel(TUNNEL_QUEUE);
            demux.set_route(addr, PathTarget::Virtual(VirtualSink::new([0; 16], tx)));
            // Registrations through the tunnel count against its real source.
            shared.tunnel_source(addr, Some(remote.ip()));
            let reason = tokio::select! {
                r = transport::tunnel::run_tunnel(tls, demux.injector(), addr, rx) => r,
                _ = stop.changed() => "server shutting down".to_owned(),
            };
            demux.remove_routes(addr);
            shared.tunnel_source(addr, None);
            tracing::info!(%remote, %reason, "TCP tunnel closed");
            drop(permit);
        });
    }
    tunnels.shutdown().await;
}
