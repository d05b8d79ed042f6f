use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{ready, Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::mpsc;

/// A STUN-shaped datagram taken out of the QUIC receive path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StunDatagram {
    /// Who sent it.
    pub from: SocketAddr,
    /// The local address it arrived on, when the OS reports it.
    pub to: Option<IpAddr>,
    /// The datagram.
    pub data: Vec<u8>,
}

/// Counters of the demultiplexer.
#[derive(Debug, Default)]
pub struct DemuxStats {
    /// STUN datagrams handed to the STUN channel.
    pub stun_received: AtomicU64,
    /// STUN datagrams dropped because the STUN channel was full.
    pub stun_dropped: AtomicU64,
    /// Datagrams passed to quinn.
    pub quic_received: AtomicU64,
}

/// Address translation between what quinn believes a peer's address is and where its packets
/// really go now (the magicsock idea): when a NAT rebinds, quinn keeps its address and the
/// socket sends to the new one, so no QUIC connection notices.
#[derive(Debug, Default)]
struct Routes {
    /// quinn's address -> current real address.
    out: HashMap<SocketAddr, SocketAddr>,
    /// real address -> quinn's address.
    back: HashMap<SocketAddr, SocketAddr>,
}

/// A UDP socket for quinn that diverts STUN datagrams to a bounded channel.
///
/// Sending is shared: quinn sends through [`AsyncUdpSocket::try_send`], STUN users through
/// [`DemuxSocket::send_to`]; both go out of the same socket, so they share one NAT mapping.
pub struct DemuxSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    stun_tx: mpsc::Sender<StunDatagram>,
    stats: Arc<DemuxStats>,
    routes: RwLock<Routes>,
    // Lets the hot path skip the lock while no route is set (the common case).
    has_routes: AtomicBool,
}

impl fmt::Debug for DemuxSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DemuxSocket")
            .field("local_addr", &self.inner.local_addr().ok())
            .finish()
    }
}

impl DemuxSocket {
    /// Wraps a bound std socket. STUN datagrams go to the returned receiver, which holds at most
    /// `stun_queue` of them (more are dropped and counted).
    pub fn new(
        socket: std::net::UdpSocket,
        stun_queue: usize,
    ) -> io::Result<(Arc<Self>, mpsc::Receiver<StunDatagram>)> {
        let runtime = quinn::TokioRuntime;
        let inner = quinn::Runtime::wrap_udp_socket(&runtime, socket)?;
        let (stun_tx, stun_rx) = mpsc::channel(stun_queue.max(1));
        Ok((
            Arc::new(DemuxSocket {
                inner,
                stun_tx,
                stats: Arc::new(DemuxStats::default()),
                routes: RwLock::new(Routes::default()),
                has_routes: AtomicBool::new(false),
            }),
            stun_rx,
        ))
    }

    /// Counters.
    pub fn stats(&self) -> Arc<DemuxStats> {
        self.stats.clone()
    }

    /// From now on, packets quinn sends to `quinn_addr` go to `real`, and packets from `real`
    /// are shown to quinn as coming from `quinn_addr`. Setting `real == quinn_addr` removes the
    /// route.
    pub fn set_route(&self, quinn_addr: SocketAddr, real: SocketAddr) {
        let mut routes = self
            .routes
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(old) = routes.out.remove(&quinn_addr) {
            routes.back.remove(&old);
        }
        if real != quinn_addr {
            routes.out.insert(quinn_addr, real);
            routes.back.insert(real, quinn_addr);
        }
        self.has_routes
            .store(!routes.out.is_empty(), Ordering::Release);
    }

    /// Where packets for `quinn_addr` really go.
    pub fn route_of(&self, quinn_addr: SocketAddr) -> SocketAddr {
        if !self.has_routes.load(Ordering::Acquire) {
            return quinn_addr;
        }
        self.routes
            .read()
            .map(|r| r.out.get(&quinn_addr).copied().unwrap_or(quinn_addr))
            .unwrap_or(quinn_addr)
    }

    fn quinn_addr_of(&self, real: SocketAddr) -> SocketAddr {
        if !self.has_routes.load(Ordering::Acquire) {
            return real;
        }
        self.routes
            .read()
            .map(|r| r.back.get(&real).copied().unwrap_or(real))
            .unwrap_or(real)
    }

    /// Sends one datagram (a STUN message, a probe) from the shared socket.
    pub async fn send_to(&self, data: &[u8], destination: SocketAddr) -> io::Result<()> {
        let mut poller = self.inner.clone().create_io_poller();
        loop {
            let transmit = Transmit {
                destination,
                ecn: None,
                contents: data,
                segment_size: None,
                src_ip: None,
            };
            match self.inner.try_send(&transmit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)).await?;
                }
                other => return other,
            }
        }
    }

    fn divert(&self, from: SocketAddr, to: Option<IpAddr>, data: &[u8]) {
        let datagram = StunDatagram {
            from,
            to,
            data: data.to_vec(),
        };
        match self.stun_tx.try_send(datagram) {
            Ok(()) => self.stats.stun_received.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.stats.stun_dropped.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Removes STUN segments from one received buffer (which may hold several GRO segments of
    /// `stride` bytes, the last one shorter) and returns the length left for quinn.
    fn filter_segments(&self, buf: &mut [u8], meta: &RecvMeta) -> usize {
        let len = meta.len.min(buf.len());
        let stride = if meta.stride == 0 { len } else { meta.stride };
        if stride >= len {
            if common::stun::is_stun(&buf[..len]) {
                self.divert(meta.addr, meta.dst_ip, &buf[..len]);
                return 0;
            }
            return len;
        }
        let mut write = 0;
        let mut read = 0;
        while read < len {
            let end = (read + stride).min(len);
            if common::stun::is_stun(&buf[read..end]) {
                self.divert(meta.addr, meta.dst_ip, &buf[read..end]);
            } else {
                if write != read {
                    buf.copy_within(read..end, write);
                }
                write += end - read;
            }
            read = end;
        }
        write
    }
}

impl AsyncUdpSocket for DemuxSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let destination = self.route_of(transmit.destination);
        if destination == transmit.destination {
            return self.inner.try_send(transmit);
        }
        self.inner.try_send(&Transmit {
            destination,
            ecn: transmit.ecn,
            contents: transmit.contents,
            segment_size: transmit.segment_size,
            src_ip: transmit.src_ip,
        })
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let received = ready!(self.inner.poll_recv(cx, bufs, meta))?;
            let mut kept = 0;
            for i in 0..received {
                let left = self.filter_segments(&mut bufs[i], &meta[i]);
                if left == 0 {
                    continue;
                }
                meta[i].len = left;
                meta[i].addr = self.quinn_addr_of(meta[i].addr);
                if kept != i {
                    // Move entry i down to slot `kept` so that quinn sees a dense prefix.
                    let (low, high) = bufs.split_at_mut(i);
                    let (dst, src) = (&mut low[kept], &high[0]);
                    if dst.len() < left {
                        continue;
                    }
                    dst[..left].copy_from_slice(&src[..left]);
                    meta[kept] = meta[i];
                }
                kept += 1;
            }
            self.stats
                .quic_received
                .fetch_add(kept as u64, Ordering::Relaxed);
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
            // Everything was STUN: poll again so that the waker is registered before Pending.
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
