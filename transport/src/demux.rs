use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::mpsc;

use crate::channel::{self, ChannelForwarder, ForwardVerdict, CHANNEL_HEADER, CHANNEL_MARKER};

/// A STUN-shaped datagram taken out of the QUIC receive path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StunDatagram {
    /// Who sent it.
    pub from: SocketAddr,
    /// The local address it arrived on, when the OS reports it.
    pub to: Option<IpAddr>,
    /// The extra socket it arrived on ([`DemuxSocket::open_extras`]), or `None` for the
    /// primary socket.
    pub via: Option<ExtraId>,
    /// The datagram.
    pub data: Vec<u8>,
}

/// An extra socket of a [`DemuxSocket`] (birthday punching): a number never reused.
pub type ExtraId = u32;

/// Most extra sockets open at once (all birthday punches together, and the winning sockets
/// that carry paths): one hard-side punch opens `punch::birthday::DEFAULT_SOCKETS` (256), so a
/// second one at the same time gets what is left (and punches without them if nothing is).
pub const MAX_EXTRA_SOCKETS: usize = 320;

struct Extra {
    id: ExtraId,
    socket: Arc<dyn AsyncUdpSocket>,
    // The same socket for sendmsg with a per-datagram TTL (a short fan-out round).
    os: std::net::UdpSocket,
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
    /// Relay channel datagrams sent (a peer's relayed packets that left as plain UDP).
    pub channel_sent: AtomicU64,
    /// Relay channel datagrams received from the rendezvous and shown to quinn.
    pub channel_received: AtomicU64,
    /// Relay channel datagrams the rendezvous sent on to the other side (its forwarder said
    /// where).
    pub channel_forwarded: AtomicU64,
    /// Relay channel datagrams the rendezvous could not send on (its socket's buffer full).
    pub channel_send_failed: AtomicU64,
}

/// A relay channel a peer sends on: packets for a relayed peer leave as channel datagrams to
/// the rendezvous ([`crate::channel`]).
#[derive(Debug, Clone, Copy)]
struct ChannelOut {
    id: u64,
    header: [u8; CHANNEL_HEADER],
    server: SocketAddr,
    max_datagram: usize,
}

/// A relay channel a peer receives on.
#[derive(Clone)]
struct ChannelIn {
    /// The rendezvous (canonical): only its datagrams count.
    server: SocketAddr,
    /// Shown to quinn as the source.
    quinn_addr: SocketAddr,
    /// Told of every batch received (the relay's waiters: a punch waiting for the peer's
    /// first relayed packet).
    on_packet: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl fmt::Debug for ChannelIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelIn")
            .field("server", &self.server)
            .field("quinn_addr", &self.quinn_addr)
            .finish()
    }
}

/// A datagram leaving on a virtual path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualPacket {
    /// The label of the sink it was sent to (which peer, which tunnel).
    pub label: [u8; 16],
    /// One datagram.
    pub data: Vec<u8>,
}

/// The sending end of a virtual path: datagrams go into a bounded channel (to the relay, or a TCP
/// tunnel) instead of out of the UDP socket. A full channel drops, as a congested link would.
#[derive(Debug, Clone)]
pub struct VirtualSink {
    label: [u8; 16],
    tx: mpsc::Sender<VirtualPacket>,
}

impl VirtualSink {
    /// A sink that tags its datagrams with `label`.
    pub fn new(label: [u8; 16], tx: mpsc::Sender<VirtualPacket>) -> Self {
        VirtualSink { label, tx }
    }

    /// Whether `other` is this sink: the same label into the same channel.
    pub fn is(&self, other: &VirtualSink) -> bool {
        self.label == other.label && self.tx.same_channel(&other.tx)
    }
}

/// Where the packets quinn sends to one address really go.
#[derive(Debug, Clone)]
pub enum PathTarget {
    /// Out of the UDP socket, to this address.
    Udp(SocketAddr),
    /// Into a channel.
    Virtual(VirtualSink),
}

impl PathTarget {
    /// The UDP address, for a direct path.
    pub fn udp(&self) -> Option<SocketAddr> {
        match self {
            PathTarget::Udp(addr) => Some(*addr),
            PathTarget::Virtual(_) => None,
        }
    }
}

/// A cheap hasher for route keys (socket addresses), looked up for every packet in both
/// directions: a multiply-rotate mix (as in FxHash) instead of SipHash. Only our own code inserts
/// keys (routes and aliases of peers we talk to), so there is no hash flooding to defend against:
/// a lookup of an attacker-chosen address costs a probe of a small table at worst.
#[derive(Debug, Default, Clone, Copy)]
struct AddrHasher(u64);

impl AddrHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for AddrHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

type AddrMap<V> = HashMap<SocketAddr, V, BuildHasherDefault<AddrHasher>>;

/// Address translation between what quinn believes a peer's address is and where its packets
/// really go now (the magicsock idea): quinn keeps one address per peer while the socket sends on
/// the current path (direct UDP to wherever the NAT now maps, or a relay), so no QUIC connection
/// notices a path change.
#[derive(Debug, Default)]
struct Routes {
    /// quinn's address -> current path.
    out: AddrMap<PathTarget>,
    /// real source address -> quinn's address.
    back: AddrMap<SocketAddr>,
    /// Real addresses quinn itself uses for a live connection (one accepted from, or dialed
    /// to, the peer's real address): never aliased to another address.
    claimed: AddrMap<()>,
    /// Real addresses reached through an extra socket (a birthday path): every datagram to
    /// them leaves from that socket, whoever sends it (quinn, heartbeats, probes); with the
    /// quinn address (the peer) whose routes they go with.
    pinned: AddrMap<(ExtraId, SocketAddr)>,
    /// Extra sockets a punching session still holds: their pins stay until it releases them
    /// (its route or alias may not be in place yet).
    held: std::collections::HashSet<ExtraId>,
    /// Relay channels by the label of the relay's virtual sink (the peer): what quinn sends on
    /// that virtual path leaves as channel datagrams instead (when it fits).
    channel_out: HashMap<[u8; 16], ChannelOut>,
    /// Relay channels by id, for receiving.
    channel_in: HashMap<u64, ChannelIn>,
}

impl Routes {
    fn any(&self) -> bool {
        !self.out.is_empty()
            || !self.back.is_empty()
            || !self.pinned.is_empty()
            || !self.channel_in.is_empty()
    }

    /// Forgets the relay channel of the sink `label`, both ways.
    fn remove_channel(&mut self, label: &[u8; 16]) {
        if let Some(old) = self.channel_out.remove(label) {
            self.channel_in.remove(&old.id);
        }
    }

    /// Whether a route or an alias refers to `real`.
    fn refers_to(&self, real: &SocketAddr) -> bool {
        self.back.contains_key(real)
            || self
                .out
                .values()
                .any(|t| matches!(t, PathTarget::Udp(r) if r == real))
    }

    /// Whether extra socket `id` carries a pinned address.
    fn carries(&self, id: ExtraId) -> bool {
        self.pinned.values().any(|(p, _)| *p == id)
    }
}

/// Maps IPv4-mapped IPv6 addresses to plain IPv4, so that route keys match whatever family the
/// endpoint uses. A dual-stack socket reports IPv4 peers as `::ffff:a.b.c.d`; everything above
/// the socket (candidates, path lines, the rendezvous's records) compares and shows them plain.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// `addr` in the family of `like` (quinn on a dual-stack socket sees IPv4 peers as mapped IPv6).
pub(crate) fn same_family(addr: SocketAddr, like: SocketAddr) -> SocketAddr {
    match (addr, like) {
        (SocketAddr::V4(v4), SocketAddr::V6(_)) => {
            SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        _ => addr,
    }
}

/// Injects datagrams into quinn's receive path as if they had arrived from a given address
/// (relayed packets, packets from a TCP tunnel).
#[derive(Debug, Clone)]
pub struct Injector {
    tx: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    // Datagrams in the queue: lets the receive path skip the queue (and its lock) while it is
    // empty, which it is for every packet of a direct path.
    queued: Arc<AtomicUsize>,
    waker: Arc<std::sync::Mutex<Option<std::task::Waker>>>,
}

impl Injector {
    /// Queues `data` as a datagram from `from`; false if the queue is full (the datagram is
    /// dropped, as a congested link would).
    pub fn inject(&self, from: SocketAddr, data: Vec<u8>) -> bool {
        let queued = self.tx.try_send((from, data)).is_ok();
        if queued {
            // Counted after the send, so a receiver that sees the count finds the datagram;
            // SeqCst pairs with the receiver's store-waker-then-check (see poll_injected).
            self.queued.fetch_add(1, Ordering::SeqCst);
            if let Some(waker) = self
                .waker
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take()
            {
                waker.wake();
            }
        }
        queued
    }
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
    injected_rx: std::sync::Mutex<mpsc::Receiver<(SocketAddr, Vec<u8>)>>,
    injector: Injector,
    // Alternates which source poll_recv serves first, so neither starves the other.
    injected_first: AtomicBool,
    /// The rendezvous's relay channels (set once by the server).
    forwarder: std::sync::OnceLock<Arc<dyn ChannelForwarder>>,
    virtual_dropped: AtomicU64,
    // The socket is IPv6 (dual-stack): IPv4 destinations must be written v4-mapped.
    ipv6: bool,
    // A second handle on the socket quinn owns (same file description), for the few
    // datagrams sent with their own TTL; `None` for sockets that are not OS sockets.
    os_socket: Option<std::net::UdpSocket>,
    /// Extra sockets (birthday punching), polled with the primary one.
    extras: RwLock<Vec<Extra>>,
    has_extras: AtomicBool,
    next_extra: std::sync::atomic::AtomicU32,
}

/// Datagrams waiting to be injected into quinn.
const INJECT_QUEUE: usize = 4096;
/// Most aliases (real addresses shown as one quinn address) per quinn address: a peer's
/// candidates and the addresses its probes came from, for one peer.
pub const MAX_ALIASES_PER_ADDR: usize = 16;
/// Most aliases in all.
pub const MAX_ALIASES: usize = 4096;

/// Why [`DemuxSocket::add_alias`] refused an alias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AliasRefusal {
    /// The real address is already shown as another quinn address that has a route (a live
    /// connection's, or one being set up): it is not taken away from it.
    OwnedByAnother(SocketAddr),
    /// The quinn address has [`MAX_ALIASES_PER_ADDR`] aliases, or the socket [`MAX_ALIASES`].
    Full,
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
        let os_socket = socket.try_clone()?;
        let inner = quinn::Runtime::wrap_udp_socket(&runtime, socket)?;
        let (demux, stun_rx) = Self::build(inner, stun_queue, Some(os_socket));
        Ok((demux, stun_rx))
    }

    /// Wraps any socket quinn can use (a [`crate::ScriptedSocket`] in tests and fuzzing).
    pub fn from_socket(
        inner: Arc<dyn AsyncUdpSocket>,
        stun_queue: usize,
    ) -> (Arc<Self>, mpsc::Receiver<StunDatagram>) {
        Self::build(inner, stun_queue, None)
    }

    fn build(
        inner: Arc<dyn AsyncUdpSocket>,
        stun_queue: usize,
        os_socket: Option<std::net::UdpSocket>,
    ) -> (Arc<Self>, mpsc::Receiver<StunDatagram>) {
        let ipv6 = inner.local_addr().is_ok_and(|a| a.is_ipv6());
        let (stun_tx, stun_rx) = mpsc::channel(stun_queue.max(1));
        let (injected_tx, injected_rx) = mpsc::channel(INJECT_QUEUE);
        let injector = Injector {
            tx: injected_tx,
            queued: Arc::default(),
            waker: Arc::default(),
        };
        (
            Arc::new(DemuxSocket {
                inner,
                stun_tx,
                stats: Arc::new(DemuxStats::default()),
                routes: RwLock::new(Routes::default()),
                has_routes: AtomicBool::new(false),
                injected_rx: std::sync::Mutex::new(injected_rx),
                injector,
                injected_first: AtomicBool::new(false),
                forwarder: std::sync::OnceLock::new(),
                virtual_dropped: AtomicU64::new(0),
                ipv6,
                os_socket,
                extras: RwLock::new(Vec::new()),
                has_extras: AtomicBool::new(false),
                next_extra: std::sync::atomic::AtomicU32::new(1),
            }),
            stun_rx,
        )
    }

    /// Counters.
    pub fn stats(&self) -> Arc<DemuxStats> {
        self.stats.clone()
    }

    /// A handle to inject datagrams into quinn's receive path.
    pub fn injector(&self) -> Injector {
        self.injector.clone()
    }

    /// Datagrams dropped because a virtual path's channel was full.
    pub fn virtual_dropped(&self) -> u64 {
        self.virtual_dropped.load(Ordering::Relaxed)
    }

    fn write_routes(&self) -> std::sync::RwLockWriteGuard<'_, Routes> {
        self.routes
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// From now on, packets quinn sends to `quinn_addr` take `target`; for a UDP target, packets
    /// from it are shown to quinn as coming from `quinn_addr`. `Udp(quinn_addr)` removes the
    /// route.
    pub fn set_route(&self, quinn_addr: SocketAddr, target: PathTarget) {
        let quinn_addr = canonical(quinn_addr);
        let mut routes = self.write_routes();
        if let Some(PathTarget::Udp(old)) = routes.out.remove(&quinn_addr) {
            if routes.back.get(&old) == Some(&quinn_addr) {
                routes.back.remove(&old);
            }
        }
        match target {
            PathTarget::Udp(real) if canonical(real) == quinn_addr => {}
            PathTarget::Udp(real) => {
                let real = canonical(real);
                routes.back.insert(real, quinn_addr);
                routes.out.insert(quinn_addr, PathTarget::Udp(real));
            }
            virtual_target => {
                routes.out.insert(quinn_addr, virtual_target);
            }
        }
        // Pins stay: a path left for the relay is still tested by heartbeats through its
        // socket, and taken back when they are answered. They go with the connection's routes
        // (remove_routes).
        self.has_routes.store(routes.any(), Ordering::Release);
    }

    /// As [`DemuxSocket::set_route`], only if `quinn_addr` has no route now (checked and set
    /// under one lock); whether it was set.
    pub fn set_route_if_none(&self, quinn_addr: SocketAddr, sink: VirtualSink) -> bool {
        let quinn_addr = canonical(quinn_addr);
        let mut routes = self.write_routes();
        if routes.out.contains_key(&quinn_addr) {
            return false;
        }
        routes.out.insert(quinn_addr, PathTarget::Virtual(sink));
        self.has_routes.store(true, Ordering::Release);
        true
    }

    /// Removes the route of `quinn_addr` if it still leads into `sink` (one set with
    /// [`DemuxSocket::set_route_if_none`] that nobody has replaced since).
    pub fn remove_route_into(&self, quinn_addr: SocketAddr, sink: &VirtualSink) {
        let quinn_addr = canonical(quinn_addr);
        let mut routes = self.write_routes();
        if matches!(routes.out.get(&quinn_addr), Some(PathTarget::Virtual(s)) if s.is(sink)) {
            routes.out.remove(&quinn_addr);
            self.has_routes.store(routes.any(), Ordering::Release);
        }
    }

    /// Shows packets from `real` to quinn as coming from `quinn_addr` (another address of the
    /// same peer, proven by an authenticated probe). Never takes `real` away from another quinn
    /// address that has a route (a live connection's), and bounded
    /// ([`MAX_ALIASES_PER_ADDR`], [`MAX_ALIASES`]); aliases go with
    /// [`DemuxSocket::remove_routes`] of their quinn address.
    pub fn add_alias(&self, real: SocketAddr, quinn_addr: SocketAddr) -> Result<(), AliasRefusal> {
        let (real, quinn_addr) = (canonical(real), canonical(quinn_addr));
        if real == quinn_addr {
            return Ok(());
        }
        let mut routes = self.write_routes();
        if routes.claimed.contains_key(&real) {
            return Err(AliasRefusal::OwnedByAnother(real));
        }
        match routes.back.get(&real) {
            Some(owner) if *owner == quinn_addr => return Ok(()),
            Some(owner) if routes.out.contains_key(owner) => {
                return Err(AliasRefusal::OwnedByAnother(*owner));
            }
            _ => {}
        }
        let replacing = routes.back.contains_key(&real);
        if !replacing
            && (routes.back.len() >= MAX_ALIASES
                || routes.back.values().filter(|q| **q == quinn_addr).count()
                    >= MAX_ALIASES_PER_ADDR)
        {
            return Err(AliasRefusal::Full);
        }
        routes.back.insert(real, quinn_addr);
        self.has_routes.store(true, Ordering::Release);
        Ok(())
    }

    /// Undoes [`DemuxSocket::add_alias`]: packets from `real` are no longer shown as coming from
    /// `quinn_addr`, unless `real` is where `quinn_addr` is routed now (the route keeps it).
    pub fn remove_alias(&self, real: SocketAddr, quinn_addr: SocketAddr) {
        let (real, quinn_addr) = (canonical(real), canonical(quinn_addr));
        let mut routes = self.write_routes();
        let routed_there =
            matches!(routes.out.get(&quinn_addr), Some(PathTarget::Udp(r)) if *r == real);
        if routes.back.get(&real) == Some(&quinn_addr) && !routed_there {
            routes.back.remove(&real);
            self.has_routes.store(routes.any(), Ordering::Release);
        }
    }

    /// Marks `quinn_addr` as the address of a live connection: if it is a real address, it is
    /// never aliased to another (see [`DemuxSocket::add_alias`]) until
    /// [`DemuxSocket::remove_routes`] or [`DemuxSocket::release`].
    pub fn claim(&self, quinn_addr: SocketAddr) {
        let quinn_addr = canonical(quinn_addr);
        let mut routes = self.write_routes();
        if routes.claimed.len() < MAX_ALIASES {
            routes.claimed.insert(quinn_addr, ());
        }
    }

    /// `quinn_addr` is no longer a live connection's (its routes stay).
    pub fn release(&self, quinn_addr: SocketAddr) {
        self.write_routes().claimed.remove(&canonical(quinn_addr));
    }

    /// Forgets every route and alias of `quinn_addr`, and its claim.
    pub fn remove_routes(&self, quinn_addr: SocketAddr) {
        let quinn_addr = canonical(quinn_addr);
        let mut routes = self.write_routes();
        routes.claimed.remove(&quinn_addr);
        routes.out.remove(&quinn_addr);
        routes.back.retain(|_, q| *q != quinn_addr);
        // The peer's birthday sockets go with its routes (unless a punch still holds them).
        let mut freed: Vec<ExtraId> = Vec::new();
        routes.pinned.retain(|_, (id, owner)| {
            let gone = *owner == quinn_addr;
            if gone {
                freed.push(*id);
            }
            !gone
        });
        freed.retain(|id| !routes.held.contains(id) && !routes.carries(*id));
        self.has_routes.store(routes.any(), Ordering::Release);
        drop(routes);
        self.close_extras(&freed);
    }

    /// A relay channel to the peer whose relay sink has `label` (a peer's side, see
    /// [`crate::channel`]): from now on what quinn sends on that virtual path leaves as
    /// datagrams on channel `id` to `server` (those too large for it still take the sink), and
    /// channel `id`'s datagrams from `server` are shown to quinn as coming from `quinn_addr`,
    /// with `on_packet` called for each batch. Replaces the label's earlier channel.
    pub fn bind_channel(
        &self,
        label: [u8; 16],
        id: u64,
        server: SocketAddr,
        quinn_addr: SocketAddr,
        on_packet: Option<Arc<dyn Fn() + Send + Sync>>,
    ) {
        let server = canonical(server);
        let mut routes = self.write_routes();
        routes.remove_channel(&label);
        routes.channel_out.insert(
            label,
            ChannelOut {
                id,
                header: channel::header(id),
                server,
                max_datagram: channel::max_channel_datagram(server),
            },
        );
        routes.channel_in.insert(
            id,
            ChannelIn {
                server,
                quinn_addr: canonical(quinn_addr),
                on_packet,
            },
        );
        self.has_routes.store(true, Ordering::Release);
    }

    /// Undoes [`DemuxSocket::bind_channel`] for `label`: its packets take the relay sink
    /// again, and its channel's datagrams go to quinn (which discards them).
    pub fn unbind_channel(&self, label: [u8; 16]) {
        let mut routes = self.write_routes();
        routes.remove_channel(&label);
        self.has_routes.store(routes.any(), Ordering::Release);
    }

    /// The id of the channel bound for `label`, if any.
    pub fn channel_of(&self, label: [u8; 16]) -> Option<u64> {
        Some(self.read_routes()?.channel_out.get(&label)?.id)
    }

    /// Makes this the rendezvous's socket: channel datagrams (the shape of
    /// [`crate::channel`]) are offered to `forwarder` before quinn sees them. Only the first
    /// call counts.
    pub fn set_forwarder(&self, forwarder: Arc<dyn ChannelForwarder>) {
        let _ = self.forwarder.set(forwarder);
    }

    /// Opens up to `count` extra UDP sockets (birthday punching: each gets its own NAT
    /// mapping), bound like the primary socket but to port 0, at most [`MAX_EXTRA_SOCKETS`] in
    /// all. They are polled with the primary socket (QUIC packets go to quinn, STUN ones to the
    /// STUN channel tagged with [`StunDatagram::via`]) and held until
    /// [`DemuxSocket::release_extras`]. Returns their ids (fewer than asked when over the cap
    /// or when the system refuses sockets).
    pub fn open_extras(&self, count: usize) -> Vec<ExtraId> {
        let Ok(local) = self.inner.local_addr() else {
            return Vec::new();
        };
        let bind = SocketAddr::new(
            if local.is_ipv4() {
                IpAddr::from([0, 0, 0, 0])
            } else {
                IpAddr::from([0u16; 8])
            },
            0,
        );
        let mut opened = Vec::new();
        let mut extras = self
            .extras
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let room = MAX_EXTRA_SOCKETS.saturating_sub(extras.len());
        for _ in 0..count.min(room) {
            let socket = match std::net::UdpSocket::bind(bind) {
                Ok(socket) => socket,
                Err(_) => break,
            };
            let Ok(os) = socket.try_clone() else {
                break;
            };
            let Ok(socket) = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, socket) else {
                break;
            };
            let id = self.next_extra.fetch_add(1, Ordering::Relaxed);
            extras.push(Extra { id, socket, os });
            opened.push(id);
        }
        self.has_extras.store(!extras.is_empty(), Ordering::Release);
        drop(extras);
        self.write_routes().held.extend(opened.iter().copied());
        opened
    }

    /// Datagrams to `real` leave from extra socket `id` from now on (the birthday path found
    /// through it to the peer quinn knows as `quinn_addr`, whose
    /// [`DemuxSocket::remove_routes`] ends it). A later pin of the same address replaces it.
    pub fn pin(&self, real: SocketAddr, id: ExtraId, quinn_addr: SocketAddr) {
        let mut routes = self.write_routes();
        let old = routes
            .pinned
            .insert(canonical(real), (id, canonical(quinn_addr)));
        self.has_routes.store(true, Ordering::Release);
        // The socket it replaces closes unless a punch still holds it or it carries another
        // address.
        let freed = old
            .map(|(old, _)| old)
            .filter(|old| *old != id && !routes.held.contains(old) && !routes.carries(*old));
        drop(routes);
        if let Some(old) = freed {
            self.close_extras(&[old]);
        }
        // It carries a connection now: the room of the primary socket (the others, probes
        // only, keep the default and the kernel memory it bounds).
        let extras = self
            .extras
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(extra) = extras.iter().find(|e| e.id == id) {
            crate::endpoint::enlarge_buffers(&extra.os, crate::endpoint::PEER_SOCKET_BUFFER);
        }
    }

    /// The extra socket `real` is pinned to, if any.
    pub fn pinned(&self, real: SocketAddr) -> Option<ExtraId> {
        self.read_routes()
            .and_then(|r| r.pinned.get(&canonical(real)).map(|(id, _)| *id))
    }

    /// A punching session is done with its extra sockets `ids`: all but `keep` are closed at
    /// once; `keep` (the winner) stays open if a route or alias uses the address pinned to it
    /// (the peer's connection took the path), until that peer's routes go
    /// ([`DemuxSocket::remove_routes`]).
    pub fn release_extras(&self, ids: &[ExtraId], keep: Option<ExtraId>) {
        let mut routes = self.write_routes();
        for id in ids {
            routes.held.remove(id);
        }
        let unused: Vec<SocketAddr> = routes
            .pinned
            .iter()
            .filter(|(real, (id, _))| {
                ids.contains(id) && (Some(*id) != keep || !routes.refers_to(real))
            })
            .map(|(real, _)| *real)
            .collect();
        for real in unused {
            routes.pinned.remove(&real);
        }
        self.has_routes.store(routes.any(), Ordering::Release);
        let freed: Vec<ExtraId> = ids
            .iter()
            .copied()
            .filter(|id| !routes.carries(*id))
            .collect();
        drop(routes);
        self.close_extras(&freed);
    }

    /// The local address of extra socket `id`, while it is open.
    pub fn extra_local_addr(&self, id: ExtraId) -> Option<SocketAddr> {
        self.extra(id).and_then(|s| s.local_addr().ok())
    }

    /// The kernel buffers of the primary socket (`None` for a socket that is not an OS
    /// socket).
    pub fn socket_buffers(&self) -> Option<crate::endpoint::SocketBuffers> {
        crate::endpoint::socket_buffers(self.os_socket.as_ref()?).ok()
    }

    /// Extra sockets open now.
    pub fn extras_open(&self) -> usize {
        self.extras
            .read()
            .map(|e| e.len())
            .unwrap_or_else(|poisoned| poisoned.into_inner().len())
    }

    fn close_extras(&self, ids: &[ExtraId]) {
        if ids.is_empty() || !self.has_extras.load(Ordering::Acquire) {
            return;
        }
        let mut extras = self
            .extras
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        extras.retain(|e| !ids.contains(&e.id));
        self.has_extras.store(!extras.is_empty(), Ordering::Release);
    }

    fn extra(&self, id: ExtraId) -> Option<Arc<dyn AsyncUdpSocket>> {
        self.extras
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .find(|e| e.id == id)
            .map(|e| e.socket.clone())
    }

    /// Sends one datagram from extra socket `id` with IP TTL `ttl` for that datagram only (a
    /// fan-out probe of a short round, which opens our NAT and dies before the peer's). Best
    /// effort, never waits, as [`DemuxSocket::send_with_ttl`]; an IPv4 `destination` is
    /// written v4-mapped on a dual-stack socket.
    pub fn send_from_with_ttl(
        &self,
        id: ExtraId,
        data: &[u8],
        destination: SocketAddr,
        ttl: u8,
    ) -> io::Result<()> {
        let destination = self.native(destination)?;
        let extras = self
            .extras
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let extra = extras
            .iter()
            .find(|e| e.id == id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the extra socket is closed"))?;
        send_with_ttl(&extra.os, data, destination, ttl)
    }

    /// Sends one datagram from extra socket `id` (a fan-out probe of birthday punching).
    pub async fn send_from(
        &self,
        id: ExtraId,
        data: &[u8],
        destination: SocketAddr,
    ) -> io::Result<()> {
        let socket = self
            .extra(id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the extra socket is closed"))?;
        send_on(&socket, data, destination).await
    }

    /// Where packets for `quinn_addr` go now.
    pub fn route_of(&self, quinn_addr: SocketAddr) -> PathTarget {
        self.read_routes()
            .and_then(|r| r.out.get(&canonical(quinn_addr)).cloned())
            .unwrap_or(PathTarget::Udp(quinn_addr))
    }

    /// The routes, read-locked, or None while there are none (the lock is then skipped).
    fn read_routes(&self) -> Option<std::sync::RwLockReadGuard<'_, Routes>> {
        if !self.has_routes.load(Ordering::Acquire) {
            return None;
        }
        Some(
            self.routes
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    fn send_virtual(&self, sink: &VirtualSink, transmit: &Transmit) {
        let segment = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        for datagram in transmit.contents.chunks(segment) {
            let packet = VirtualPacket {
                label: sink.label,
                data: datagram.to_vec(),
            };
            if sink.tx.try_send(packet).is_err() {
                self.virtual_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Sends what quinn gave for a relayed peer as channel datagrams (each segment behind
    /// the channel header, in one `sendmsg` with GSO where the socket has it); segments too
    /// large for a channel datagram take the relay sink.
    fn send_channel(
        &self,
        channel: &ChannelOut,
        sink: &VirtualSink,
        transmit: &Transmit,
    ) -> io::Result<()> {
        let len = transmit.contents.len();
        let segment = transmit.segment_size.unwrap_or(len).max(1);
        if segment + CHANNEL_HEADER > channel.max_datagram {
            self.send_virtual(sink, transmit);
            return Ok(());
        }
        let Ok(destination) = self.native(channel.server) else {
            self.send_virtual(sink, transmit);
            return Ok(());
        };
        let count = len.div_ceil(segment);
        let mut wrapped = Vec::with_capacity(len + count * CHANNEL_HEADER);
        for datagram in transmit.contents.chunks(segment) {
            wrapped.extend_from_slice(&channel.header);
            wrapped.extend_from_slice(datagram);
        }
        let stride = segment + CHANNEL_HEADER;
        let per_send = self.inner.max_transmit_segments().max(1);
        for (i, group) in wrapped.chunks(stride * per_send).enumerate() {
            let n = group.len().div_ceil(stride);
            let sent = self.inner.try_send(&Transmit {
                destination,
                ecn: None,
                contents: group,
                segment_size: (n > 1).then_some(stride),
                src_ip: None,
            });
            match sent {
                // quinn waits for the socket and gives the whole transmit again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && i == 0 => return Err(e),
                // The rest is dropped, as a congested link would.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    // Any other error is the channel's, not the connection's (quinn would end
                    // the connection on it): what is left takes the relay stream.
                    let done = i * per_send * segment;
                    let rest = &transmit.contents[done.min(len)..];
                    if !rest.is_empty() {
                        self.send_virtual(
                            sink,
                            &Transmit {
                                destination: transmit.destination,
                                ecn: transmit.ecn,
                                contents: rest,
                                segment_size: transmit.segment_size,
                                src_ip: transmit.src_ip,
                            },
                        );
                    }
                    break;
                }
                Ok(()) => {
                    self.stats
                        .channel_sent
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// Takes relay channel datagrams out of one received buffer (GRO segments of `stride`,
    /// the last one possibly shorter): a peer's are shown to quinn as coming from the relayed
    /// peer (in place when the whole buffer is one channel's, the common case), the
    /// rendezvous's are handed to its forwarder and sent on. Returns the length left for
    /// quinn; `meta` is rewritten when the buffer became one channel's packets.
    fn filter_channels(
        &self,
        buf: &mut [u8],
        meta: &mut RecvMeta,
        len: usize,
        routes: Option<&Routes>,
    ) -> usize {
        let forwarder = self.forwarder.get();
        let receiving = routes.filter(|r| !r.channel_in.is_empty());
        if len == 0 || (forwarder.is_none() && receiving.is_none()) {
            return len;
        }
        let stride = if meta.stride == 0 || meta.stride > len {
            len
        } else {
            meta.stride
        };
        // Cheap test first: most buffers are plain QUIC.
        if (0..len).step_by(stride).all(|at| buf[at] != CHANNEL_MARKER) {
            return len;
        }
        let from = canonical(meta.addr);
        if let Some(routes) = receiving {
            if let Some(kept) = self.receive_whole_channel(buf, meta, len, stride, from, routes) {
                return kept;
            }
        }
        let (mut write, mut read) = (0, 0);
        while read < len {
            let end = (read + stride).min(len);
            let Some(id) = channel::channel_id(&buf[read..end]) else {
                buf.copy_within(read..end, write);
                write += end - read;
                read = end;
                continue;
            };
            // The run of segments on the same channel.
            let (mut run_end, mut count) = (end, 1);
            while run_end < len {
                let next = (run_end + stride).min(len);
                if channel::channel_id(&buf[run_end..next]) != Some(id) {
                    break;
                }
                run_end = next;
                count += 1;
            }
            let run = &buf[read..run_end];
            let taken = match receiving.and_then(|r| r.channel_in.get(&id)) {
                Some(channel) if channel.server == from => {
                    let mut injected = 0u64;
                    for datagram in run.chunks(stride) {
                        // A full queue drops it, as a congested link would.
                        if self
                            .injector
                            .inject(channel.quinn_addr, datagram[CHANNEL_HEADER..].to_vec())
                        {
                            injected += 1;
                        }
                    }
                    self.stats
                        .channel_received
                        .fetch_add(injected, Ordering::Relaxed);
                    if let Some(on_packet) = &channel.on_packet {
                        on_packet();
                    }
                    true
                }
                _ => match forwarder.map(|f| f.forward(id, from, run, stride, count)) {
                    Some(ForwardVerdict::Send { to, src_ip }) => {
                        self.send_run(to, src_ip, run, stride, count);
                        true
                    }
                    Some(ForwardVerdict::Done) => true,
                    Some(ForwardVerdict::NotChannel) | None => false,
                },
            };
            if !taken {
                buf.copy_within(read..run_end, write);
                write += run_end - read;
            }
            read = run_end;
        }
        write
    }

    /// The peer's fast path: every segment of the buffer is on one channel bound here and came
    /// from its server. The headers are cut out in place and quinn sees the relayed peer's
    /// packets as one GRO buffer. `None` when the buffer is not like that.
    fn receive_whole_channel(
        &self,
        buf: &mut [u8],
        meta: &mut RecvMeta,
        len: usize,
        stride: usize,
        from: SocketAddr,
        routes: &Routes,
    ) -> Option<usize> {
        let id = channel::channel_id(&buf[..stride])?;
        let channel = routes.channel_in.get(&id).filter(|c| c.server == from)?;
        if stride <= CHANNEL_HEADER
            || !(stride..len)
                .step_by(stride)
                .all(|at| channel::channel_id(&buf[at..(at + stride).min(len)]) == Some(id))
        {
            return None;
        }
        let (mut write, mut read, mut count) = (0, 0, 0u64);
        while read < len {
            let end = (read + stride).min(len);
            buf.copy_within(read + CHANNEL_HEADER..end, write);
            write += end - read - CHANNEL_HEADER;
            read = end;
            count += 1;
        }
        meta.addr = self.quinn_spelling(channel.quinn_addr);
        meta.stride = stride - CHANNEL_HEADER;
        self.stats
            .channel_received
            .fetch_add(count, Ordering::Relaxed);
        if let Some(on_packet) = &channel.on_packet {
            on_packet();
        }
        Some(write)
    }

    /// The rendezvous sends a run of channel datagrams on, unchanged (GSO where it can). Never
    /// waits: what the socket cannot take now is dropped and counted, as a congested link would.
    fn send_run(
        &self,
        to: SocketAddr,
        src_ip: Option<IpAddr>,
        run: &[u8],
        stride: usize,
        count: usize,
    ) {
        let Ok(destination) = self.native(to) else {
            self.stats
                .channel_send_failed
                .fetch_add(count as u64, Ordering::Relaxed);
            return;
        };
        let src_ip = source_for(src_ip.map(|ip| self.native_ip(ip)), destination);
        let per_send = self.inner.max_transmit_segments().max(1);
        for group in run.chunks(stride * per_send) {
            let n = group.len().div_ceil(stride) as u64;
            let sent = self.inner.try_send(&Transmit {
                destination,
                ecn: None,
                contents: group,
                segment_size: (n > 1).then_some(stride),
                src_ip,
            });
            let counter = match sent {
                Ok(()) => &self.stats.channel_forwarded,
                Err(_) => &self.stats.channel_send_failed,
            };
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// `addr` as quinn must see a source that is not the socket's own report (an injected
    /// datagram, a relay channel's): quinn on a dual-stack socket knows IPv4 peers only
    /// v4-mapped, so a relayed packet must show the same spelling as a direct one from that
    /// peer, or quinn drops it as coming from an unexpected remote.
    fn quinn_spelling(&self, addr: SocketAddr) -> SocketAddr {
        match addr {
            SocketAddr::V4(v4) if self.ipv6 => {
                SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            other => other,
        }
    }

    /// `ip` as the socket's family spells it.
    fn native_ip(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) if self.ipv6 => IpAddr::V6(v4.to_ipv6_mapped()),
            other => other.to_canonical(),
        }
    }

    fn poll_injected(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> usize {
        let queued = &self.injector.queued;
        for attempt in 0..2 {
            if queued.load(Ordering::SeqCst) > 0 {
                let n = self.take_injected(bufs, meta);
                if n > 0 {
                    return n;
                }
            }
            if attempt == 0 {
                // Nothing queued: Injector::inject wakes this task. Store the waker first, then
                // look at the count again, so that a datagram counted in between is not missed
                // (inject counts, then takes the waker). Cloned only when it changed.
                let mut slot = self
                    .injector
                    .waker
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *slot = Some(cx.waker().clone());
                }
            }
        }
        0
    }

    /// Moves queued injected datagrams into quinn's buffers.
    fn take_injected(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> usize {
        let mut rx = self
            .injected_rx
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let Ok((from, data)) = rx.try_recv() else {
                break;
            };
            let len = data.len().min(bufs[n].len());
            bufs[n][..len].copy_from_slice(&data[..len]);
            meta[n] = RecvMeta {
                addr: self.quinn_spelling(from),
                len,
                stride: len,
                ..RecvMeta::default()
            };
            n += 1;
        }
        self.injector.queued.fetch_sub(n, Ordering::SeqCst);
        n
    }

    /// Sends one datagram (a STUN message, a probe) from the shared socket, or from the extra
    /// socket its destination is pinned to. An IPv4 `destination` is written v4-mapped on a
    /// dual-stack socket (extra sockets have the primary's family); one of a family the socket
    /// cannot reach (IPv6 from an IPv4 socket) is an error, never a panic.
    pub async fn send_to(&self, data: &[u8], destination: SocketAddr) -> io::Result<()> {
        let pinned = self.pinned(destination);
        let destination = self.native(destination)?;
        if let Some(socket) = pinned.and_then(|id| self.extra(id)) {
            return send_on(&socket, data, destination).await;
        }
        send_on(&self.inner, data, destination).await
    }

    /// `addr` as the socket's family needs it.
    fn native(&self, addr: SocketAddr) -> io::Result<SocketAddr> {
        match addr {
            SocketAddr::V4(v4) if self.ipv6 => Ok(SocketAddr::new(
                IpAddr::V6(v4.ip().to_ipv6_mapped()),
                v4.port(),
            )),
            SocketAddr::V6(v6) if !self.ipv6 => match v6.ip().to_ipv4_mapped() {
                Some(v4) => Ok(SocketAddr::new(IpAddr::V4(v4), v6.port())),
                None => Err(io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    format!("cannot send to {addr} from an IPv4-only socket"),
                )),
            },
            _ => Ok(addr),
        }
    }

    /// Whether the socket can send to IPv6 addresses (it is bound to an IPv6 address).
    pub fn is_ipv6(&self) -> bool {
        self.ipv6
    }

    /// Sends one datagram from the shared socket with IP TTL (IPv6 hop limit) `ttl`, for this
    /// datagram only (a control message of `sendmsg`: quinn's datagrams sent at the same time
    /// keep the default). Best effort, never waits: a full send buffer is an error
    /// (`WouldBlock`), and so is a platform or socket that cannot set it (`Unsupported`).
    pub fn send_with_ttl(&self, data: &[u8], destination: SocketAddr, ttl: u8) -> io::Result<()> {
        let Some(socket) = &self.os_socket else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "not an OS socket: no per-datagram TTL",
            ));
        };
        send_with_ttl(socket, data, destination, ttl)
    }

    fn divert(&self, from: SocketAddr, to: Option<IpAddr>, via: Option<ExtraId>, data: &[u8]) {
        // Plain IPv4 for IPv4 senders on a dual-stack socket: the STUN and punching code
        // compares these with candidates and observed addresses.
        let datagram = StunDatagram {
            from: canonical(from),
            to: to.map(|ip| ip.to_canonical()),
            via,
            data: data.to_vec(),
        };
        match self.stun_tx.try_send(datagram) {
            Ok(()) => self.stats.stun_received.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.stats.stun_dropped.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Removes STUN segments from one received buffer (which may hold several GRO segments of
    /// `stride` bytes, the last one shorter) and returns the length left for quinn.
    fn filter_segments(&self, buf: &mut [u8], meta: &RecvMeta, via: Option<ExtraId>) -> usize {
        let len = meta.len.min(buf.len());
        let stride = if meta.stride == 0 { len } else { meta.stride };
        if stride >= len {
            if common::stun::is_stun(&buf[..len]) {
                self.divert(meta.addr, meta.dst_ip, via, &buf[..len]);
                return 0;
            }
            return len;
        }
        let mut write = 0;
        let mut read = 0;
        while read < len {
            let end = (read + stride).min(len);
            if common::stun::is_stun(&buf[read..end]) {
                self.divert(meta.addr, meta.dst_ip, via, &buf[read..end]);
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

impl DemuxSocket {
    /// Receives from the first extra socket that has datagrams (registering the task's waker
    /// with every one that has none). The extras' lock is released before the caller takes the
    /// routes' lock.
    fn poll_extras(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Option<(usize, ExtraId)> {
        if !self.has_extras.load(Ordering::Acquire) {
            return None;
        }
        let extras = self
            .extras
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for extra in extras.iter() {
            match extra.socket.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) if n > 0 => return Some((n, extra.id)),
                // An error on one extra socket (an ICMP error for a probe) is not the
                // connection's: that socket is skipped this time.
                _ => {}
            }
        }
        None
    }
}

/// The source address quinn asked for (the local address the peer's packets arrive at), kept
/// only if it is of the family of `destination`: a path of the other family (the peer's IPv6
/// address for a connection that came in over IPv4, or the reverse) leaves from the address
/// the OS picks, since sendmsg refuses an IPv6 source for an IPv4 destination.
fn source_for(src_ip: Option<IpAddr>, destination: SocketAddr) -> Option<IpAddr> {
    src_ip.filter(|ip| ip.to_canonical().is_ipv4() == destination.ip().to_canonical().is_ipv4())
}

/// Sends one datagram on `socket`, waiting while its buffer is full.
async fn send_on(
    socket: &Arc<dyn AsyncUdpSocket>,
    data: &[u8],
    destination: SocketAddr,
) -> io::Result<()> {
    let mut poller = socket.clone().create_io_poller();
    loop {
        let transmit = Transmit {
            destination,
            ecn: None,
            contents: data,
            segment_size: None,
            src_ip: None,
        };
        match socket.try_send(&transmit) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)).await?;
            }
            other => return other,
        }
    }
}

impl AsyncUdpSocket for DemuxSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        // Looked up under the read lock, without cloning the target (a virtual sink's clone
        // would touch its channel's reference counts for every packet).
        let mut destination = transmit.destination;
        let mut pinned = None;
        if let Some(routes) = self.read_routes() {
            match routes.out.get(&canonical(transmit.destination)) {
                Some(PathTarget::Virtual(sink)) => {
                    if let Some(channel) = routes.channel_out.get(&sink.label) {
                        return self.send_channel(channel, sink, transmit);
                    }
                    self.send_virtual(sink, transmit);
                    return Ok(());
                }
                Some(PathTarget::Udp(real)) => {
                    destination = same_family(*real, transmit.destination);
                }
                None => {}
            }
            pinned = routes
                .pinned
                .get(&canonical(destination))
                .map(|(id, _)| *id);
        }
        if let Some(socket) = pinned.and_then(|id| self.extra(id)) {
            // A birthday path: out of the socket whose NAT mapping the peer reaches. A full
            // buffer there drops the datagram (quinn only waits for the primary socket).
            let sent = socket.try_send(&Transmit {
                destination,
                ecn: transmit.ecn,
                contents: transmit.contents,
                segment_size: transmit.segment_size,
                src_ip: None,
            });
            return match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                other => other,
            };
        }
        if destination == transmit.destination {
            return self.inner.try_send(transmit);
        }
        self.inner.try_send(&Transmit {
            destination,
            ecn: transmit.ecn,
            contents: transmit.contents,
            segment_size: transmit.segment_size,
            src_ip: source_for(transmit.src_ip, destination),
        })
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let injected_first = self.injected_first.fetch_xor(true, Ordering::Relaxed);
        if injected_first {
            let n = self.poll_injected(cx, bufs, meta);
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
        }
        loop {
            let (received, via) = match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(result) => (result?, None),
                Poll::Pending => match self.poll_extras(cx, bufs, meta) {
                    Some((n, id)) => (n, Some(id)),
                    None => {
                        // Also when it was looked at first: this poll may have injected
                        // datagrams since (a relay channel's, out of a mixed GRO buffer).
                        let n = self.poll_injected(cx, bufs, meta);
                        if n > 0 {
                            return Poll::Ready(Ok(n));
                        }
                        return Poll::Pending;
                    }
                },
            };
            let mut kept = 0;
            // One read lock for the whole batch.
            let routes = self.read_routes();
            for i in 0..received {
                let left = self.filter_segments(&mut bufs[i], &meta[i], via);
                // Channels run on the primary socket only.
                let left = if via.is_none() {
                    self.filter_channels(&mut bufs[i], &mut meta[i], left, routes.as_deref())
                } else {
                    left
                };
                if left == 0 {
                    continue;
                }
                meta[i].len = left;
                if let Some(routes) = &routes {
                    let real = meta[i].addr;
                    if let Some(quinn_addr) = routes.back.get(&canonical(real)) {
                        meta[i].addr = same_family(*quinn_addr, real);
                    }
                }
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

/// `sendmsg` with an `IP_TTL` (IPv4 destination, also from a dual-stack socket) or
/// `IPV6_HOPLIMIT` (IPv6 destination) control message.
#[cfg(target_os = "linux")]
fn send_with_ttl(
    socket: &std::net::UdpSocket,
    data: &[u8],
    destination: SocketAddr,
    ttl: u8,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let local = socket.local_addr()?;
    // The address and control message in the C layout sendmsg reads.
    let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let name_len = match (local, destination) {
        (SocketAddr::V4(_), SocketAddr::V4(d)) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: d.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(d.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut name as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        (SocketAddr::V6(_), d) => {
            let (ip, port, flowinfo, scope) = match d {
                SocketAddr::V6(d) => (d.ip().octets(), d.port(), d.flowinfo(), d.scope_id()),
                SocketAddr::V4(d) => (d.ip().to_ipv6_mapped().octets(), d.port(), 0, 0),
            };
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: port.to_be(),
                sin6_flowinfo: flowinfo,
                sin6_addr: libc::in6_addr { s6_addr: ip },
                sin6_scope_id: scope,
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut name as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
        (SocketAddr::V4(_), SocketAddr::V6(_)) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an IPv6 destination from an IPv4 socket",
            ))
        }
    };
    let (level, kind) = match (local, destination) {
        (SocketAddr::V4(_), _) => (libc::IPPROTO_IP, libc::IP_TTL),
        // A dual-stack socket sends to an IPv4 peer through the IPv4 stack, which reads IP_TTL
        // and ignores an IPV6_HOPLIMIT control message.
        (SocketAddr::V6(_), d) if d.ip().to_canonical().is_ipv4() => {
            (libc::IPPROTO_IP, libc::IP_TTL)
        }
        (SocketAddr::V6(_), _) => (libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT),
    };
    // Room for one cmsghdr and an int, aligned as cmsghdr.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the sendmsg call, the
    // control buffer is aligned for cmsghdr and holds CMSG_SPACE(sizeof(int)) bytes, and
    // CMSG_FIRSTHDR of a msghdr whose controllen covers one header is not null.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = name_len as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        let space = libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) as usize;
        debug_assert!(space <= std::mem::size_of_val(&control));
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(io::Error::other("no room for the TTL control message"));
        }
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(
            libc::CMSG_DATA(cmsg).cast::<libc::c_int>(),
            libc::c_int::from(ttl),
        );
        let sent = libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_DONTWAIT);
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// No per-datagram TTL off Linux: opening probes are not sent there.
#[cfg(not(target_os = "linux"))]
fn send_with_ttl(
    _socket: &std::net::UdpSocket,
    _data: &[u8],
    _destination: SocketAddr,
    _ttl: u8,
) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "per-datagram TTL is only implemented on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Receives one datagram on a blocking socket with IP_RECVTTL set; returns it and its TTL.
    #[cfg(target_os = "linux")]
    fn recv_with_ttl(socket: &std::net::UdpSocket) -> (Vec<u8>, Option<i32>) {
        use std::os::fd::AsRawFd;
        let mut data = vec![0u8; 2048];
        let mut control = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: every pointer in msg outlives recvmsg; the control buffer is aligned for
        // cmsghdr, and the CMSG_ macros walk only what the kernel wrote (msg_controllen).
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            let n = libc::recvmsg(socket.as_raw_fd(), &mut msg, 0);
            assert!(n >= 0, "recvmsg: {}", io::Error::last_os_error());
            data.truncate(n as usize);
            let mut ttl = None;
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_TTL {
                    ttl = Some(std::ptr::read_unaligned(
                        libc::CMSG_DATA(cmsg).cast::<libc::c_int>(),
                    ));
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
            (data, ttl)
        }
    }

    /// A blocking socket on 127.0.0.1 (port 0) with IP_RECVTTL set and a 5 s read timeout:
    /// [`recv_with_ttl`] on it tells the TTL each datagram arrived with.
    #[cfg(target_os = "linux")]
    fn ttl_receiver() -> std::net::UdpSocket {
        use std::os::fd::AsRawFd;
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let on: libc::c_int = 1;
        // SAFETY: a valid fd and a c_int option value of the size given.
        let rc = unsafe {
            libc::setsockopt(
                receiver.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_RECVTTL,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "IP_RECVTTL: {}", io::Error::last_os_error());
        receiver
    }

    /// An opening probe leaves with the TTL it asked for; the datagrams sent before and after
    /// it (STUN's `send_to`, and so quinn's) keep the socket's default.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn send_with_ttl_sets_the_ttl_of_that_datagram_only() {
        let receiver = ttl_receiver();
        let to = receiver.local_addr().unwrap();
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let default_ttl = std_socket.ttl().unwrap() as i32;
        let (socket, _stun) = DemuxSocket::new(std_socket, 4).unwrap();
        socket.send_to(b"before", to).await.unwrap();
        socket.send_with_ttl(b"opening", to, 2).unwrap();
        socket.send_to(b"after", to).await.unwrap();
        let got: Vec<_> = (0..3).map(|_| recv_with_ttl(&receiver)).collect();
        assert_eq!(
            got,
            vec![
                (b"before".to_vec(), Some(default_ttl)),
                (b"opening".to_vec(), Some(2)),
                (b"after".to_vec(), Some(default_ttl)),
            ]
        );
        assert_ne!(default_ttl, 2);
    }

    /// From a dual-stack socket to an IPv4 peer the opening probe still leaves with its TTL
    /// (the IPv4 stack takes IP_TTL; an IPV6_HOPLIMIT control message would be ignored there).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn send_with_ttl_from_a_dual_stack_socket_to_an_ipv4_peer() {
        let std_socket = crate::endpoint::bind_udp("[::]:0".parse().unwrap(), false).unwrap();
        if std_socket.local_addr().is_ok_and(|a| a.is_ipv4()) {
            eprintln!("skipped: this host has no IPv6");
            return;
        }
        let receiver = ttl_receiver();
        let to = receiver.local_addr().unwrap();
        let (socket, _stun) = DemuxSocket::new(std_socket, 4).unwrap();
        socket.send_with_ttl(b"opening", to, 2).unwrap();
        assert_eq!(recv_with_ttl(&receiver), (b"opening".to_vec(), Some(2)));
    }

    /// A short fan-out round's probe leaves its extra socket with the TTL asked for; the extra
    /// socket's ordinary sends keep the default.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn send_from_with_ttl_sets_the_ttl_of_that_datagram_from_the_extra_socket() {
        use std::os::fd::AsRawFd;
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let on: libc::c_int = 1;
        // SAFETY: a valid fd and a c_int option value of the size given.
        let rc = unsafe {
            libc::setsockopt(
                receiver.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_RECVTTL,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        let to = receiver.local_addr().unwrap();
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let default_ttl = std_socket.ttl().unwrap() as i32;
        let (socket, _stun) = DemuxSocket::new(std_socket, 4).unwrap();
        let ids = socket.open_extras(2);
        assert_eq!(ids.len(), 2);
        socket.send_from_with_ttl(ids[1], b"short", to, 2).unwrap();
        socket.send_from(ids[1], b"full", to).await.unwrap();
        let got: Vec<_> = (0..2).map(|_| recv_with_ttl(&receiver)).collect();
        assert_eq!(
            got,
            vec![
                (b"short".to_vec(), Some(2)),
                (b"full".to_vec(), Some(default_ttl)),
            ]
        );
        // From the extra socket, not the primary.
        let probe_from = {
            socket.send_from_with_ttl(ids[0], b"which", to, 3).unwrap();
            let mut buf = [0u8; 16];
            receiver.recv_from(&mut buf).unwrap().1
        };
        assert_eq!(
            Some(probe_from),
            socket
                .extra_local_addr(ids[0])
                .map(|a| { SocketAddr::new(to.ip(), a.port()) })
        );
        socket.release_extras(&ids, None);
        let closed = socket.send_from_with_ttl(ids[0], b"gone", to, 2);
        assert_eq!(closed.map_err(|e| e.kind()), Err(io::ErrorKind::NotFound));
    }

    /// A path of the other family than the one a connection came in on leaves without the
    /// source address quinn pinned (sendmsg would refuse an IPv6 source for an IPv4
    /// destination, and the reverse).
    #[test]
    fn a_source_of_the_other_family_is_dropped() {
        let v6: IpAddr = "2001:db8:1::2".parse().unwrap();
        let v4: IpAddr = "10.0.1.2".parse().unwrap();
        let to4: SocketAddr = "[::ffff:203.0.113.22]:3143".parse().unwrap();
        let to6: SocketAddr = "[2001:db8:2::2]:3143".parse().unwrap();
        assert_eq!(source_for(Some(v6), to4), None);
        assert_eq!(source_for(Some(v4), to6), None);
        assert_eq!(source_for(Some(v6), to6), Some(v6));
        assert_eq!(source_for(Some(v4), to4), Some(v4));
        assert_eq!(source_for(None, to6), None);
    }

    /// A socket that is not an OS socket (tests, fuzzing) says it cannot, and sends nothing.
    #[tokio::test]
    async fn send_with_ttl_needs_an_os_socket() {
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let inner = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, std_socket).unwrap();
        let (socket, _stun) = DemuxSocket::from_socket(inner, 4);
        let err = socket
            .send_with_ttl(b"x", "127.0.0.1:9".parse().unwrap(), 2)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
    }

    async fn recv_one(socket: &DemuxSocket) -> (SocketAddr, Vec<u8>) {
        let mut storage = vec![0u8; 2048];
        let mut meta = [RecvMeta::default()];
        let n = std::future::poll_fn(|cx| {
            let mut bufs = [IoSliceMut::new(&mut storage)];
            socket.poll_recv(cx, &mut bufs, &mut meta)
        });
        let n = tokio::time::timeout(Duration::from_secs(5), n)
            .await
            .expect("a datagram within 5 s")
            .expect("recv");
        assert_eq!(n, 1);
        (meta[0].addr, storage[..meta[0].len].to_vec())
    }

    /// try_send, waiting for writability first (a fresh tokio socket reports WouldBlock until
    /// its readiness is known).
    async fn send(socket: &Arc<DemuxSocket>, transmit: &Transmit<'_>) {
        let mut poller = socket.clone().create_io_poller();
        loop {
            match socket.try_send(transmit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx))
                        .await
                        .unwrap();
                }
                other => return other.unwrap(),
            }
        }
    }

    fn transmit(destination: SocketAddr, contents: &[u8]) -> Transmit<'_> {
        Transmit {
            destination,
            ecn: None,
            contents,
            segment_size: None,
            src_ip: None,
        }
    }

    #[tokio::test]
    async fn a_capture_route_is_set_only_where_none_is_and_removed_only_while_it_is_its_own() {
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (socket, _stun) = DemuxSocket::new(std_socket, 4).unwrap();
        let stable: SocketAddr = "240.1.2.3:4567".parse().unwrap();
        let (tx, mut captured) = mpsc::channel(8);
        let capture = VirtualSink::new([1; 16], tx.clone());
        assert!(capture.is(&capture.clone()));
        assert!(!capture.is(&VirtualSink::new([2; 16], tx)));

        assert!(socket.set_route_if_none(stable, capture.clone()));
        send(&socket, &transmit(stable, b"initial")).await;
        assert_eq!(captured.recv().await.unwrap().data, b"initial");
        // Taken: a second capture (another dial to the same peer) is refused.
        let (tx2, _rx2) = mpsc::channel(8);
        assert!(!socket.set_route_if_none(stable, VirtualSink::new([1; 16], tx2.clone())));
        // Replaced by the relay (the introduction came): not removed by the capture's owner.
        let relay = VirtualSink::new([1; 16], tx2);
        socket.set_route(stable, PathTarget::Virtual(relay.clone()));
        socket.remove_route_into(stable, &capture);
        assert!(matches!(socket.route_of(stable), PathTarget::Virtual(s) if s.is(&relay)));
        // Still its own: removed.
        socket.set_route(stable, PathTarget::Udp(stable));
        assert!(socket.set_route_if_none(stable, capture.clone()));
        socket.remove_route_into(stable, &capture);
        assert!(matches!(socket.route_of(stable), PathTarget::Udp(a) if a == stable));
        assert!(!socket.has_routes.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn routes_translate_both_ways_and_injection_wakes_a_pending_receive() {
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (socket, _stun) = DemuxSocket::new(std_socket, 4).unwrap();
        let local = socket.local_addr().unwrap();
        let other = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let other_addr = other.local_addr().unwrap();
        let stable: SocketAddr = "240.1.2.3:4567".parse().unwrap();

        // Out: quinn's packets to the stable address leave for the real one.
        socket.set_route(stable, PathTarget::Udp(other_addr));
        send(&socket, &transmit(stable, b"out")).await;
        let mut buf = [0u8; 64];
        let (n, from) = other.recv_from(&mut buf).await.unwrap();
        assert_eq!((&buf[..n], from), (&b"out"[..], local));

        // Back: packets from the real address are shown as coming from the stable one.
        other.send_to(b"back", local).await.unwrap();
        assert_eq!(recv_one(&socket).await, (stable, b"back".to_vec()));

        // Injected while a receive is pending: the receive is woken.
        let injector = socket.injector();
        let from: SocketAddr = "240.9.9.9:9".parse().unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(injector.inject(from, b"relayed".to_vec()));
        });
        assert_eq!(recv_one(&socket).await, (from, b"relayed".to_vec()));
        assert_eq!(socket.injector.queued.load(Ordering::SeqCst), 0);

        // Virtual: packets go into the sink's channel, split at the segment size.
        let (tx, mut rx) = mpsc::channel(8);
        socket.set_route(stable, PathTarget::Virtual(VirtualSink::new([7; 16], tx)));
        let segmented = Transmit {
            segment_size: Some(2),
            ..transmit(stable, b"abc")
        };
        send(&socket, &segmented).await;
        assert_eq!(rx.recv().await.unwrap().data, b"ab");
        assert_eq!(rx.recv().await.unwrap().data, b"c");

        // Removing the routes restores plain addressing.
        socket.remove_routes(stable);
        assert!(matches!(socket.route_of(stable), PathTarget::Udp(a) if a == stable));
    }

    #[tokio::test]
    async fn extra_sockets_carry_a_pinned_address_both_ways_and_close_when_released() {
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (socket, mut stun) = DemuxSocket::new(std_socket, 8).unwrap();
        let primary = socket.local_addr().unwrap();
        let other = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let other_addr = other.local_addr().unwrap();
        let ids = socket.open_extras(3);
        assert_eq!((ids.len(), socket.extras_open()), (3, 3));
        let winner = ids[1];
        let winner_addr = socket.extra_local_addr(winner).unwrap();
        assert_ne!(winner_addr.port(), primary.port());
        let mut buf = [0u8; 256];

        // A fan-out probe from one extra socket.
        socket.send_from(ids[0], b"open", other_addr).await.unwrap();
        let (n, from) = other.recv_from(&mut buf).await.unwrap();
        assert_eq!(
            (&buf[..n], from.port()),
            (
                &b"open"[..],
                socket.extra_local_addr(ids[0]).unwrap().port()
            )
        );

        // STUN arriving on the winner reaches the STUN channel, tagged with it.
        let probe = common::stun::binding_request([9; 12]);
        other.send_to(&probe, winner_addr).await.unwrap();
        let stable: SocketAddr = "240.1.2.3:4567".parse().unwrap();
        socket.set_route(stable, PathTarget::Udp(other_addr));
        // (a packet for quinn makes poll_recv run, which polls the extra sockets too)
        other.send_to(b"quic", winner_addr).await.unwrap();
        assert_eq!(recv_one(&socket).await, (stable, b"quic".to_vec()));
        let datagram = stun.recv().await.unwrap();
        assert_eq!((datagram.from, datagram.via), (other_addr, Some(winner)));

        // Pinned: quinn's packets to the stable address, and STUN sends, leave from the winner,
        // which gets the primary socket's buffers (the others keep the kernel's default).
        let buffer_of = |id: ExtraId| {
            let extras = socket.extras.read().unwrap();
            let extra = extras.iter().find(|e| e.id == id).unwrap();
            crate::endpoint::socket_buffers(&extra.os).unwrap().receive
        };
        let default = buffer_of(ids[0]);
        socket.pin(other_addr, winner, stable);
        assert_eq!(buffer_of(ids[0]), default);
        let expected = crate::endpoint::tests::granted_buffer(crate::endpoint::PEER_SOCKET_BUFFER);
        assert!(
            buffer_of(winner) >= expected,
            "{default} -> {}",
            buffer_of(winner)
        );
        send(&socket, &transmit(stable, b"out")).await;
        let (n, from) = other.recv_from(&mut buf).await.unwrap();
        assert_eq!((&buf[..n], from.port()), (&b"out"[..], winner_addr.port()));
        socket.send_to(b"beat", other_addr).await.unwrap();
        let (_, from) = other.recv_from(&mut buf).await.unwrap();
        assert_eq!(from.port(), winner_addr.port());

        // Released: the losers close at once; the winner stays while the route uses its
        // address, and closes with the route.
        socket.release_extras(&ids, Some(winner));
        assert_eq!(socket.extras_open(), 1);
        assert_eq!(socket.pinned(other_addr), Some(winner));
        // A fallback to the relay keeps it (heartbeats still test the path through it).
        let (tx, _rx) = mpsc::channel(1);
        socket.set_route(stable, PathTarget::Virtual(VirtualSink::new([1; 16], tx)));
        assert_eq!(socket.pinned(other_addr), Some(winner));
        assert_eq!(socket.extras_open(), 1);
        socket.remove_routes(stable);
        assert_eq!(socket.extras_open(), 0);
        assert_eq!(socket.pinned(other_addr), None);
        socket.send_to(b"plain", other_addr).await.unwrap();
        let (_, from) = other.recv_from(&mut buf).await.unwrap();
        assert_eq!(from, primary);

        // A session that found nothing releases everything.
        let ids = socket.open_extras(4);
        socket.release_extras(&ids, None);
        assert_eq!(socket.extras_open(), 0);
    }

    #[tokio::test]
    async fn extra_sockets_are_capped() {
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (socket, _stun) = DemuxSocket::new(std_socket, 8).unwrap();
        let first = socket.open_extras(MAX_EXTRA_SOCKETS - 10);
        let second = socket.open_extras(256);
        assert_eq!(first.len() + second.len(), MAX_EXTRA_SOCKETS);
        assert!(socket.open_extras(1).is_empty());
        socket.release_extras(&first, None);
        assert_eq!(socket.extras_open(), second.len());
        socket.release_extras(&second, None);
        assert_eq!(socket.extras_open(), 0);
    }

    #[test]
    fn remove_alias_undoes_only_that_alias_and_never_a_route() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (socket, _stun) = DemuxSocket::new(std_socket, 4).unwrap();
        let stable: SocketAddr = "240.1.1.1:1".parse().unwrap();
        let other: SocketAddr = "240.2.2.2:2".parse().unwrap();
        let (a, b) = (
            "203.0.113.5:4000".parse().unwrap(),
            "203.0.113.5:4001".parse().unwrap(),
        );
        let back = |real: SocketAddr| {
            socket
                .read_routes()
                .and_then(|r| r.back.get(&real).copied())
        };
        socket.set_route(stable, PathTarget::Udp(a));
        assert_eq!(socket.add_alias(b, stable), Ok(()));
        // The routed address stays; another quinn address's removal touches nothing.
        socket.remove_alias(a, stable);
        socket.remove_alias(b, other);
        assert_eq!((back(a), back(b)), (Some(stable), Some(stable)));
        socket.remove_alias(b, stable);
        assert_eq!((back(a), back(b)), (Some(stable), None));
        // The last entry gone, the fast path without routes is back.
        socket.remove_routes(stable);
        assert_eq!(socket.add_alias(b, stable), Ok(()));
        socket.remove_alias(b, stable);
        assert!(socket.read_routes().is_none());
    }

    #[test]
    fn aliases_never_steal_a_live_connections_address_and_are_bounded() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (socket, _stun) = DemuxSocket::new(std_socket, 4).unwrap();
        let victim: SocketAddr = "240.1.1.1:1".parse().unwrap();
        let attacker: SocketAddr = "240.2.2.2:2".parse().unwrap();
        let victims_addr: SocketAddr = "203.0.113.5:4000".parse().unwrap();
        // The victim's connection runs on its address.
        socket.set_route(victim, PathTarget::Udp(victims_addr));
        // Another peer (whose introduction has routes too) cannot take that address.
        socket.set_route(attacker, PathTarget::Udp("198.51.100.9:9".parse().unwrap()));
        assert_eq!(
            socket.add_alias(victims_addr, attacker),
            Err(AliasRefusal::OwnedByAnother(victim))
        );
        let back = |real: SocketAddr| {
            socket
                .read_routes()
                .and_then(|r| r.back.get(&real).copied())
        };
        assert_eq!(back(victims_addr), Some(victim));
        // Nor an alias of the victim (an address its probes came from).
        let victims_other: SocketAddr = "203.0.113.5:4001".parse().unwrap();
        assert_eq!(socket.add_alias(victims_other, victim), Ok(()));
        assert_eq!(
            socket.add_alias(victims_other, attacker),
            Err(AliasRefusal::OwnedByAnother(victim))
        );
        assert_eq!(back(victims_other), Some(victim));
        // A connection quinn runs on a real address (accepted from it before any introduction)
        // keeps it too.
        let direct_conn: SocketAddr = "203.0.113.7:7000".parse().unwrap();
        socket.claim(direct_conn);
        assert_eq!(
            socket.add_alias(direct_conn, attacker),
            Err(AliasRefusal::OwnedByAnother(direct_conn))
        );
        socket.release(direct_conn);
        assert_eq!(socket.add_alias(direct_conn, attacker), Ok(()));
        // Once the victim's connection is gone, its addresses are free again.
        socket.remove_routes(victim);
        assert_eq!(back(victims_other), None);
        assert_eq!(socket.add_alias(victims_other, attacker), Ok(()));
        // Bounded per quinn address...
        let mut refused = 0;
        for port in 1..=100u16 {
            let real = SocketAddr::from(([192, 0, 2, 1], port));
            if socket.add_alias(real, attacker) == Err(AliasRefusal::Full) {
                refused += 1;
            }
        }
        let of_attacker = socket
            .read_routes()
            .map(|r| r.back.values().filter(|q| **q == attacker).count());
        assert_eq!(of_attacker, Some(MAX_ALIASES_PER_ADDR));
        assert!(refused > 0);
        // ...and in all.
        for n in 0..(MAX_ALIASES as u32 + 100) {
            let quinn = SocketAddr::from(([240, 9, (n >> 8) as u8, n as u8], 1));
            let real = SocketAddr::from(([192, 0, 3, 1], 1 + n as u16));
            let _ = socket.add_alias(real, quinn);
        }
        assert!(socket.read_routes().map(|r| r.back.len()) <= Some(MAX_ALIASES));
    }

    /// On a dual-stack socket, IPv4 peers arrive v4-mapped: the STUN path sees them plain
    /// (as candidates and observed addresses are spelled), `send_to` takes plain IPv4, quinn
    /// sees relayed packets v4-mapped like direct ones, and routes keyed by the plain address
    /// translate packets from the mapped one.
    #[tokio::test]
    async fn a_dual_stack_socket_shows_ipv4_peers_plain_above_and_mapped_to_quinn() {
        let std_socket = crate::endpoint::bind_udp("[::]:0".parse().unwrap(), false).unwrap();
        let (socket, mut stun) = DemuxSocket::new(std_socket, 4).unwrap();
        if !socket.is_ipv6() {
            eprintln!("skipped: this host has no IPv6 (the socket fell back to IPv4)");
            return;
        }
        let port = socket.local_addr().unwrap().port();
        let v4_local = SocketAddr::from(([127, 0, 0, 1], port));
        let other = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let other_addr = other.local_addr().unwrap();

        // STUN from an IPv4 peer: its source is plain IPv4.
        let request = common::stun::binding_request([7; 12]);
        other.send_to(&request, v4_local).await.unwrap();
        // quinn's receive (which diverts STUN) runs until the STUN channel has it.
        let mut storage = [0u8; 64];
        let mut bufs = [IoSliceMut::new(&mut storage)];
        let mut meta = [RecvMeta::default()];
        let datagram = tokio::select! {
            d = stun.recv() => d.unwrap(),
            r = std::future::poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut meta)) => {
                panic!("STUN reached quinn: {r:?}")
            }
        };
        assert_eq!(
            datagram.from, other_addr,
            "plain IPv4, not ::ffff:127.0.0.1"
        );
        assert_eq!(datagram.to, Some(IpAddr::from([127, 0, 0, 1])));

        // send_to a plain IPv4 address works from the IPv6 socket.
        socket.send_to(b"plain", other_addr).await.unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = other.recv_from(&mut buf).await.unwrap();
        assert_eq!((&buf[..n], from), (&b"plain"[..], v4_local));

        // A route keyed by the plain address translates the mapped source for quinn.
        let stable: SocketAddr = "240.1.2.3:4567".parse().unwrap();
        let mapped_stable = same_family(stable, "[::1]:1".parse().unwrap());
        socket.set_route(stable, PathTarget::Udp(other_addr));
        other.send_to(b"back", v4_local).await.unwrap();
        assert_eq!(recv_one(&socket).await, (mapped_stable, b"back".to_vec()));

        // Relayed packets from a stable address reach quinn v4-mapped, as direct ones do.
        assert!(socket.injector().inject(stable, b"relayed".to_vec()));
        assert_eq!(
            recv_one(&socket).await,
            (mapped_stable, b"relayed".to_vec())
        );
    }

    /// An IPv4 socket cannot reach an IPv6 address: an error, not a panic; a v4-mapped
    /// destination is sent as plain IPv4.
    #[tokio::test]
    async fn an_ipv4_socket_refuses_ipv6_destinations_and_unmaps_mapped_ones() {
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (socket, _stun) = DemuxSocket::new(std_socket, 4).unwrap();
        assert!(!socket.is_ipv6());
        let err = socket
            .send_to(b"x", "[2001:db8::1]:9".parse().unwrap())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrNotAvailable);
        let other = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let other_addr = other.local_addr().unwrap();
        let mapped = same_family(other_addr, "[::1]:1".parse().unwrap());
        socket.send_to(b"unmapped", mapped).await.unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = other.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"unmapped");
    }

    fn label(n: u8) -> [u8; 16] {
        [n; 16]
    }

    /// A peer's relayed packets leave as channel datagrams to the server (header + packet,
    /// each GSO segment wrapped), the server's channel datagrams reach quinn as the relayed
    /// peer's, the same id from anyone else reaches quinn untouched, and a packet too large
    /// for a channel datagram takes the relay sink.
    #[tokio::test]
    async fn a_bound_channel_carries_relayed_packets_as_plain_udp_both_ways() {
        let (socket, _stun) =
            DemuxSocket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap(), 4).unwrap();
        let local = socket.local_addr().unwrap();
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let stranger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let stable: SocketAddr = "240.1.2.3:4567".parse().unwrap();
        let (tx, mut sink_rx) = mpsc::channel(8);
        socket.set_route(stable, PathTarget::Virtual(VirtualSink::new(label(7), tx)));
        let heard = Arc::new(AtomicUsize::new(0));
        let counter = heard.clone();
        socket.bind_channel(
            label(7),
            0xAABB,
            server.local_addr().unwrap(),
            stable,
            Some(Arc::new(move || {
                counter.fetch_add(1, Ordering::Relaxed);
            })),
        );
        assert_eq!(socket.channel_of(label(7)), Some(0xAABB));

        // Two segments of 100 bytes in one transmit.
        let contents: Vec<u8> = (0..200u32).map(|i| 0x40 | (i as u8 & 0x3f)).collect();
        send(
            &socket,
            &Transmit {
                destination: stable,
                ecn: None,
                contents: &contents,
                segment_size: Some(100),
                src_ip: None,
            },
        )
        .await;
        let mut buf = [0u8; 2048];
        for half in contents.chunks(100) {
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            assert_eq!(from, local);
            assert_eq!(&buf[..CHANNEL_HEADER], &channel::header(0xAABB));
            assert_eq!(&buf[CHANNEL_HEADER..n], half);
        }
        assert_eq!(socket.stats().channel_sent.load(Ordering::Relaxed), 2);

        // Back: shown to quinn as the relayed peer's packet.
        let mut datagram = channel::header(0xAABB).to_vec();
        datagram.extend_from_slice(b"\x41relayed");
        server.send_to(&datagram, local).await.unwrap();
        assert_eq!(recv_one(&socket).await, (stable, b"\x41relayed".to_vec()));
        assert_eq!(heard.load(Ordering::Relaxed), 1);
        // The same datagram from anyone else is not the channel's: quinn gets it as it is.
        stranger.send_to(&datagram, local).await.unwrap();
        assert_eq!(
            recv_one(&socket).await,
            (stranger.local_addr().unwrap(), datagram.clone())
        );

        // Too large for a channel datagram: the relay sink takes it.
        let big = vec![0x40u8; channel::MAX_CHANNEL_DATAGRAM_V4];
        send(
            &socket,
            &Transmit {
                destination: stable,
                ecn: None,
                contents: &big,
                segment_size: None,
                src_ip: None,
            },
        )
        .await;
        let packet = sink_rx.recv().await.unwrap();
        assert_eq!(packet.data.len(), channel::MAX_CHANNEL_DATAGRAM_V4);

        // Unbound: the sink again, and the channel's datagrams are nobody's.
        socket.unbind_channel(label(7));
        assert_eq!(socket.channel_of(label(7)), None);
        send(
            &socket,
            &Transmit {
                destination: stable,
                ecn: None,
                contents: b"\x40small",
                segment_size: None,
                src_ip: None,
            },
        )
        .await;
        assert_eq!(sink_rx.recv().await.unwrap().data, b"\x40small");
        server.send_to(&datagram, local).await.unwrap();
        assert_eq!(
            recv_one(&socket).await,
            (server.local_addr().unwrap(), datagram)
        );
    }

    /// GRO buffers: one channel's segments are unwrapped in place (quinn sees one buffer from
    /// the relayed peer, the stride less the header); a buffer that mixes channel and other
    /// segments keeps the others for quinn and injects the channel's.
    #[tokio::test]
    async fn gro_buffers_of_channel_datagrams_are_unwrapped_whole_or_split() {
        let (socket, _stun) =
            DemuxSocket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap(), 4).unwrap();
        let server: SocketAddr = "192.0.2.1:443".parse().unwrap();
        let stable: SocketAddr = "240.9.9.9:9".parse().unwrap();
        socket.bind_channel(label(1), 5, server, stable, None);
        let segment = |id: Option<u64>, fill: u8, len: usize| {
            let mut d = match id {
                Some(id) => channel::header(id).to_vec(),
                None => Vec::new(),
            };
            d.resize(len, fill);
            d
        };
        // Three segments of 30 bytes, the last 20, all on channel 5.
        let mut buf = [
            segment(Some(5), 1, 30),
            segment(Some(5), 2, 30),
            segment(Some(5), 3, 20),
        ]
        .concat();
        let mut meta = RecvMeta {
            addr: server,
            len: 80,
            stride: 30,
            ..RecvMeta::default()
        };
        let routes = socket.read_routes();
        let left = socket.filter_channels(&mut buf, &mut meta, 80, routes.as_deref());
        assert_eq!(left, 80 - 3 * CHANNEL_HEADER);
        assert_eq!((meta.addr, meta.stride), (stable, 30 - CHANNEL_HEADER));
        assert_eq!(&buf[..21], &[1u8; 21]);
        assert_eq!(&buf[21..42], &[2u8; 21]);
        assert_eq!(&buf[42..left], &[3u8; 11]);

        // Mixed: QUIC, channel 5, unknown channel 6, channel 5 (last, shorter).
        let mut buf = [
            segment(None, 0x41, 30),
            segment(Some(5), 2, 30),
            segment(Some(6), 3, 30),
            segment(Some(5), 4, 15),
        ]
        .concat();
        let mut meta = RecvMeta {
            addr: server,
            len: 105,
            stride: 30,
            ..RecvMeta::default()
        };
        let left = socket.filter_channels(&mut buf, &mut meta, 105, routes.as_deref());
        drop(routes);
        assert_eq!(left, 60, "the QUIC segment and the unknown channel's stay");
        assert_eq!((meta.addr, meta.stride), (server, 30));
        assert_eq!(&buf[..30], &segment(None, 0x41, 30)[..]);
        assert_eq!(&buf[30..60], &segment(Some(6), 3, 30)[..]);
        assert_eq!(recv_one(&socket).await, (stable, vec![2u8; 21]));
        assert_eq!(recv_one(&socket).await, (stable, vec![4u8; 6]));
        assert_eq!(socket.stats().channel_received.load(Ordering::Relaxed), 5);
    }

    /// The rendezvous's side: a forwarder decides; what it sends on leaves unchanged to the
    /// address it names, what it does not know reaches quinn.
    #[tokio::test]
    async fn the_forwarder_sends_channel_datagrams_on_unchanged_or_leaves_them_to_quinn() {
        struct To(SocketAddr);
        impl ChannelForwarder for To {
            fn forward(
                &self,
                id: u64,
                _from: SocketAddr,
                run: &[u8],
                _stride: usize,
                _count: usize,
            ) -> ForwardVerdict {
                match id {
                    1 => ForwardVerdict::Send {
                        to: self.0,
                        src_ip: None,
                    },
                    2 => {
                        assert!(!run.is_empty());
                        ForwardVerdict::Done
                    }
                    _ => ForwardVerdict::NotChannel,
                }
            }
        }
        let (socket, _stun) =
            DemuxSocket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap(), 4).unwrap();
        let local = socket.local_addr().unwrap();
        let a = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.set_forwarder(Arc::new(To(b.local_addr().unwrap())));
        let on = |id: u64, body: &[u8]| [&channel::header(id)[..], body].concat();
        a.send_to(&on(2, b"\x40taken"), local).await.unwrap();
        a.send_to(&on(1, b"\x40forwarded"), local).await.unwrap();
        a.send_to(&on(3, b"\x40unknown"), local).await.unwrap();
        // quinn sees only the unknown one; the forwarded one reaches b as it was sent.
        assert_eq!(
            recv_one(&socket).await,
            (a.local_addr().unwrap(), on(3, b"\x40unknown"))
        );
        let mut buf = [0u8; 64];
        let (n, from) = b.recv_from(&mut buf).await.unwrap();
        assert_eq!((&buf[..n], from), (&on(1, b"\x40forwarded")[..], local));
        assert_eq!(socket.stats().channel_forwarded.load(Ordering::Relaxed), 1);
    }
}
