//! The peer's end of the relay: one relay stream on the rendezvous connection (re-opened after
//! every re-registration). Packets quinn sends to a relayed peer arrive here through the
//! socket's virtual path and leave as `{to, packet}` frames; frames `{from, packet}` from the
//! server are injected into quinn as if they came from that peer's address.
//!
//! Relay channels (protocol version 9): once a peer's packets come to us through the relay
//! stream (so its introduction was accepted), we ask the rendezvous for a channel with that
//! peer (`relay_channel`) and bind it in the socket; from then on quinn's packets to the peer
//! leave as plain UDP datagrams with a 9-byte header, which the rendezvous forwards without
//! decrypting (`transport::channel`), and the peer's come back the same way. Packets too large
//! for a channel datagram, and everything over the TCP tunnel, keep the relay stream. A refused
//! channel is asked for again after [`CHANNEL_RETRY`], doubled after each refusal; a bound one
//! in use every [`CHANNEL_REFRESH`] (a new one first after [`CHANNEL_CONFIRM`]). Channels are
//! per registration: a new one (another server, or the same after a reconnect) unbinds them
//! all and they are asked for again as packets flow.
//!
//! Why it is a module of its own: the relay is a path like any other for quinn (a virtual
//! route in the socket), so the framing and the per-peer stable addresses live apart from the
//! decision of when to use it.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::frame_io::{read_frame, write_frame};
use common::relay::{self, RelayDecoder};
use common::{ControlMessage, ErrorCode, PeerId};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use transport::{DemuxSocket, Injector, VirtualPacket, VirtualSink};

use crate::session::{Registration, Session, SessionState};

/// Packets waiting for the relay stream.
const RELAY_QUEUE: usize = 1024;

/// How long after a first refused `relay_channel` we ask again (the introduction may not have
/// been accepted yet: a dialer's first relayed packets leave before the target's accept), doubled
/// after each refusal up to [`CHANNEL_RETRY_MAX`].
pub const CHANNEL_RETRY: Duration = Duration::from_millis(500);

/// The longest wait between two `relay_channel` requests for one peer.
pub const CHANNEL_RETRY_MAX: Duration = Duration::from_secs(30);

/// How often a bound channel is asked for again: the server binds our end to the address our
/// connection comes from now, and answers with the channel it holds (the same, or a new one
/// after it dropped the old: consent lapsed, both sides were away), or refuses (then the relay
/// stream carries the packets again). What heals a channel the server no longer forwards.
pub const CHANNEL_REFRESH: Duration = Duration::from_secs(10);

/// When a channel just granted (not a refresh of the same one) is asked for again. It was
/// granted while the pair may still be (re)making its channel: after a failover both peers
/// register with the new server, are introduced again and ask within the same second, and an
/// end the server unbound or a channel it replaced meanwhile would leave our datagrams dropped
/// until the next refresh. Asking again soon bounds that to this long, not [`CHANNEL_REFRESH`]
/// (a chat's end waits 10 s for its acknowledgement); it costs one request per new channel.
pub const CHANNEL_CONFIRM: Duration = Duration::from_secs(2);

/// How often the relay task looks for channels due for [`CHANNEL_REFRESH`].
const CHANNEL_REFRESH_TICK: Duration = Duration::from_secs(1);

/// Most `relay_channel` requests waiting for their turn (one is under way at a time).
const MAX_CHANNEL_ASKS: usize = 8;

/// A `relay_channel` request under way.
type AskFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The address quinn uses for `peer` when it is reached through [`crate::paths`]: in 240.0.0.0/4,
/// which is reserved and never routed, so a packet to it can only leave through a route.
pub fn stable_addr(peer: &PeerId) -> SocketAddr {
    let b = peer.as_bytes();
    let ip = Ipv4Addr::new(240 | (b[0] & 0x0f), b[1], b[2], b[3]);
    let port = u16::from_be_bytes([b[4], b[5]]).max(1);
    SocketAddr::from((ip, port))
}

/// Whether `addr` is a stable per-peer address (in 240.0.0.0/4, see [`stable_addr`]), in
/// either spelling (a dual-stack socket shows it v4-mapped).
pub fn is_stable_addr(addr: SocketAddr) -> bool {
    // A dual-stack socket shows it v4-mapped (`::ffff:240.x.y.z`).
    matches!(transport::canonical(addr), SocketAddr::V4(v4) if v4.ip().octets()[0] >= 240)
}

/// Handle to the relay.
#[derive(Clone)]
pub struct Relay {
    tx: mpsc::Sender<VirtualPacket>,
    ready: watch::Receiver<bool>,
    addrs: Arc<Mutex<HashMap<PeerId, SocketAddr>>>,
    waiters: Arc<Waiters>,
    channels: Arc<Channels>,
}

/// The relay channels of the current registration, by peer.
struct Channels {
    socket: Arc<DemuxSocket>,
    /// Off: never asked for (`--no-relay-channel`).
    enabled: bool,
    map: Mutex<HashMap<PeerId, ChannelState>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChannelState {
    /// Asked for (after this many refusals); no answer yet.
    Asking(u32),
    /// Bound in the socket: the id, the server it runs to, and when to ask again (`None`: not
    /// while the peer has no connection, see [`Relay::forget`]).
    Bound(u64, SocketAddr, Option<Instant>),
    /// Refused (or failed) this many times; asked again after the instant.
    RetryAt(Instant, u32),
}

impl Channels {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, ChannelState>> {
        self.map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether to ask for a channel to `peer` now (marks it asked if so).
    fn should_ask(&self, peer: PeerId, now: Instant) -> bool {
        let mut map = self.lock();
        match map.get(&peer) {
            Some(ChannelState::Asking(_) | ChannelState::Bound(..)) => false,
            Some(ChannelState::RetryAt(at, _)) if *at > now => false,
            previous => {
                let refusals = match previous {
                    Some(ChannelState::RetryAt(_, n)) => *n,
                    _ => 0,
                };
                map.insert(peer, ChannelState::Asking(refusals));
                true
            }
        }
    }

    /// Binds `peer`'s channel `id` to `server` in the socket, its datagrams shown to quinn as
    /// from `quinn_addr`; asked for again at `refresh`.
    fn bind(
        &self,
        peer: PeerId,
        id: u64,
        server: SocketAddr,
        quinn_addr: SocketAddr,
        refresh: Option<Instant>,
        waiters: &Arc<Waiters>,
    ) {
        let waiters = waiters.clone();
        let heard: Arc<dyn Fn() + Send + Sync> = Arc::new(move || waiters.heard(&peer));
        self.socket
            .bind_channel(*peer.as_bytes(), id, server, quinn_addr, Some(heard));
        self.lock()
            .insert(peer, ChannelState::Bound(id, server, refresh));
    }

    /// At most `room` bound channels due to be asked for again, marked as asked (the next
    /// refresh after [`CHANNEL_REFRESH`], sooner if the answer does not come).
    fn due_refresh(&self, now: Instant, room: usize) -> Vec<PeerId> {
        let mut due = Vec::new();
        for (peer, state) in self.lock().iter_mut() {
            if due.len() >= room {
                break;
            }
            if let ChannelState::Bound(id, server, Some(at)) = *state {
                if at <= now {
                    *state = ChannelState::Bound(id, server, Some(now + CHANNEL_REFRESH));
                    due.push(*peer);
                }
            }
        }
        due
    }

    /// A request for `peer`'s channel got no usable answer (no reply in time, the request
    /// rate limit): a bound channel stays bound (the server may well still forward it) and is
    /// asked for again soon; one being asked for is asked again later.
    fn unanswered(&self, peer: PeerId, now: Instant) {
        let mut map = self.lock();
        if let Some(ChannelState::Bound(id, server, Some(_))) = map.get(&peer).copied() {
            map.insert(
                peer,
                ChannelState::Bound(id, server, Some(now + CHANNEL_RETRY * 4)),
            );
            return;
        }
        drop(map);
        self.refused(peer, now);
    }

    /// The server refused a request for `peer`'s channel (`relay_denied`; it unbinds our end
    /// then, so the peer's packets come through our relay stream again): asked again later,
    /// and a bound one is unbound.
    fn refused(&self, peer: PeerId, now: Instant) {
        let mut map = self.lock();
        if let Some(ChannelState::Bound(..)) = map.get(&peer) {
            map.insert(peer, ChannelState::RetryAt(now + CHANNEL_RETRY, 1));
            drop(map);
            self.socket.unbind_channel(*peer.as_bytes());
            return;
        }
        if let Some(ChannelState::Asking(refusals)) = map.get(&peer).copied() {
            let wait = CHANNEL_RETRY
                .saturating_mul(1 << refusals.min(16))
                .min(CHANNEL_RETRY_MAX);
            map.insert(
                peer,
                ChannelState::RetryAt(now + wait, refusals.saturating_add(1)),
            );
        }
    }

    /// Requests that will not be answered any more (their relay stream is gone): asked again
    /// as soon as packets of the peer come through the next one.
    fn asks_cancelled(&self, now: Instant) {
        for state in self.lock().values_mut() {
            if let ChannelState::Asking(n) = *state {
                *state = ChannelState::RetryAt(now, n);
            }
        }
    }

    /// Unbinds every channel (a new registration: the server's are gone or elsewhere).
    fn clear(&self) {
        let peers: Vec<PeerId> = self.lock().drain().map(|(peer, _)| peer).collect();
        for peer in peers {
            self.socket.unbind_channel(*peer.as_bytes());
        }
    }

    fn bound(&self, peer: &PeerId) -> Option<(u64, SocketAddr)> {
        match self.lock().get(peer) {
            Some(ChannelState::Bound(id, server, _)) => Some((*id, *server)),
            _ => None,
        }
    }
}

/// Who waits for the next relayed packet of a peer: a responder's punching session, whose
/// probes wait until the initiator has opened its NAT (see [`punch::PunchConfig::responder_hold`]).
/// The initiator dials over the relay after it started punching, and the rendezvous forwards
/// that handshake only once we accepted the introduction, so its first packet tells us the
/// initiator is under way. One waiter per peer at most; waiters whose session ended are pruned
/// whenever one is added.
#[derive(Default)]
struct Waiters {
    // Lets the reader skip the lock while nobody waits (the common case).
    count: AtomicUsize,
    map: Mutex<HashMap<PeerId, oneshot::Sender<()>>>,
}

impl Waiters {
    fn add(&self, peer: PeerId) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut map) = self.map.lock() {
            map.retain(|_, w| !w.is_closed());
            map.insert(peer, tx);
            self.count.store(map.len(), Ordering::Release);
        }
        rx
    }

    fn heard(&self, peer: &PeerId) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Ok(mut map) = self.map.lock() {
            if let Some(waiter) = map.remove(peer) {
                let _ = waiter.send(());
            }
            self.count.store(map.len(), Ordering::Release);
        }
    }
}

impl Relay {
    /// Starts the relay task.
    pub fn start(
        session: Session,
        socket: Arc<DemuxSocket>,
        use_channels: bool,
        shutdown: watch::Receiver<bool>,
    ) -> (Relay, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(RELAY_QUEUE);
        let (ready_tx, ready) = watch::channel(false);
        let addrs: Arc<Mutex<HashMap<PeerId, SocketAddr>>> = Arc::default();
        let waiters: Arc<Waiters> = Arc::default();
        let injector = socket.injector();
        let channels = Arc::new(Channels {
            socket,
            enabled: use_channels,
            map: Mutex::default(),
        });
        let relay = Relay {
            tx,
            ready,
            addrs,
            waiters,
            channels,
        };
        let task = tokio::spawn(run(
            session,
            injector,
            rx,
            ready_tx,
            relay.clone(),
            shutdown,
        ));
        (relay, task)
    }

    /// The id of `peer`'s relay channel, if one is bound (see the module's doc).
    pub fn channel_of(&self, peer: &PeerId) -> Option<u64> {
        self.channels.bound(peer).map(|(id, _)| id)
    }

    /// Where relayed packets from `peer` are shown to quinn.
    fn quinn_addr(&self, peer: &PeerId) -> SocketAddr {
        quinn_addr_of(&self.addrs, peer)
    }

    /// Fires at the next packet relayed to us from `peer` (see [`Waiters`]). A later call for
    /// the same peer replaces this one.
    pub fn next_packet_from(&self, peer: PeerId) -> oneshot::Receiver<()> {
        self.waiters.add(peer)
    }

    /// True while a relay stream is open.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits up to `timeout` for the relay stream.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut ready = self.ready.clone();
        tokio::time::timeout(timeout, ready.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The virtual path to `peer` through the relay.
    pub fn sink(&self, peer: &PeerId) -> VirtualSink {
        VirtualSink::new(*peer.as_bytes(), self.tx.clone())
    }

    /// Relayed packets from `peer` are shown to quinn as coming from `addr`.
    pub fn set_quinn_addr(&self, peer: PeerId, addr: SocketAddr) {
        if let Ok(mut addrs) = self.addrs.lock() {
            addrs.insert(peer, addr);
        }
        if let Some((id, server)) = self.channels.bound(&peer) {
            // A connection again: refreshed at once (the server may have dropped the channel
            // while nothing used it).
            self.channels
                .bind(peer, id, server, addr, Some(Instant::now()), &self.waiters);
        }
    }

    /// Hands quinn `peer`'s first QUIC datagram, which came with its introduction rather than
    /// over the relay, as if relayed. Unlike a relayed packet it says nothing about the peer's
    /// progress (it left before the peer heard of the introduction), so it wakes none of the
    /// waiters of [`Relay::next_packet_from`]. False when the queue was full (dropped; the
    /// dialer sends it over the relay too).
    pub fn inject_first_flight(&self, peer: &PeerId, datagram: Vec<u8>) -> bool {
        self.channels
            .socket
            .injector()
            .inject(self.quinn_addr(peer), datagram)
    }

    /// Forgets `peer`'s quinn address: its relayed packets are shown as from its stable
    /// address again, those of its relay channel too. The channel itself stays bound for the
    /// registration (the server sends the peer's packets on it whatever we do here: unbinding
    /// it would lose them).
    pub fn forget(&self, peer: &PeerId) {
        if let Ok(mut addrs) = self.addrs.lock() {
            addrs.remove(peer);
        }
        if let Some((id, server)) = self.channels.bound(peer) {
            // Not refreshed while no connection uses it (the server drops it when consent
            // lapses, or when the other side and we are gone).
            self.channels
                .bind(*peer, id, server, stable_addr(peer), None, &self.waiters);
        }
    }

    /// Asks for a relay channel to `peer` on registration `reg` and binds it; what the server
    /// refuses is asked again after [`CHANNEL_RETRY`].
    async fn ask_channel(self, session: Session, reg: Registration, peer: PeerId) {
        let reply = session
            .request(&ControlMessage::RelayChannel { peer })
            .await;
        // `Err(true)`: the server refused (it does not forward a channel of ours to this peer);
        // `Err(false)`: no answer we can use (a bound channel stays as it is then).
        let granted = match reply {
            Ok(ControlMessage::RelayChannelReady {
                peer: p, channel, ..
            }) if p == peer => ControlMessage::parse_channel(&channel).ok_or(false),
            Ok(ControlMessage::Error {
                code: ErrorCode::RelayDenied,
                message,
            }) => {
                tracing::debug!(%peer, %message, "relay channel refused");
                Err(true)
            }
            Ok(ControlMessage::Error { code, message }) => {
                tracing::debug!(%peer, ?code, %message, "relay channel not answered");
                Err(false)
            }
            Ok(other) => {
                tracing::debug!(%peer, kind = other.kind(), "unexpected answer to relay_channel");
                Err(false)
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "relay_channel failed");
                Err(false)
            }
        };
        // Still the registration it was asked on (a newer one cleared the channels).
        let current = matches!(&session.state(), SessionState::Registered(r) if r.generation == reg.generation);
        if !current {
            return;
        }
        match granted {
            Ok(id) => {
                let server = reg.conn.remote_address();
                let again = match self.channels.bound(&peer) {
                    Some((bound, _)) if bound == id => CHANNEL_REFRESH,
                    _ => CHANNEL_CONFIRM,
                };
                let refresh = Some(Instant::now() + again);
                self.channels.bind(
                    peer,
                    id,
                    server,
                    self.quinn_addr(&peer),
                    refresh,
                    &self.waiters,
                );
                tracing::debug!(%peer, channel = %format!("{id:016x}"), "relay channel bound");
            }
            Err(true) => self.channels.refused(peer, Instant::now()),
            Err(false) => self.channels.unanswered(peer, Instant::now()),
        }
    }
}

async fn run(
    session: Session,
    injector: Injector,
    mut rx: mpsc::Receiver<VirtualPacket>,
    ready: watch::Sender<bool>,
    relay: Relay,
    mut shutdown: watch::Receiver<bool>,
) {
    let (addrs, waiters) = (relay.addrs.clone(), relay.waiters.clone());
    let mut state = session.watch();
    let mut last_generation = None;
    loop {
        // Wait for a registration, dropping what quinn sends meanwhile (as a dead link would).
        let reg = loop {
            let current = state.borrow_and_update().clone();
            match current {
                SessionState::Registered(reg) => break reg,
                SessionState::Fatal(_) => return,
                SessionState::Connecting { .. } => {}
            }
            tokio::select! {
                r = state.changed() => if r.is_err() { return },
                _ = rx.recv() => {}
                _ = shutdown.changed() => return,
            }
        };
        // A new registration: channels of the last one are gone (or on another server). The
        // same one with its relay stream opened again keeps them (the server still sends on
        // them).
        if last_generation != Some(reg.generation) {
            last_generation = Some(reg.generation);
            relay.channels.clear();
        }
        // Channel requests of this relay stream: one at a time, a future of this task (no task
        // of its own: nothing outlives the relay), the others queued; dropped with the stream.
        let mut asking: Option<AskFuture> = None;
        let mut queued: VecDeque<PeerId> = VecDeque::new();
        let mut refresh = tokio::time::interval(CHANNEL_REFRESH_TICK);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        match open(&reg.conn).await {
            Ok((mut send, recv)) => {
                ready.send_replace(true);
                tracing::debug!("relay stream open");
                // A task of its own (not a future of this one) so that reading and writing the
                // relay stream run in parallel: relayed throughput. Aborted and awaited on every
                // way out below, so it ends with this task (which the endpoint's close awaits).
                // The reader names the peers relayed to us: their packets came through, so their
                // introduction was accepted, and a channel is worth asking for (not over the TCP
                // tunnel: there the stream is the only way).
                let (ask_tx, mut ask_rx) = mpsc::channel::<PeerId>(MAX_CHANNEL_ASKS);
                let asker = (!reg.over_tcp && relay.channels.enabled)
                    .then(|| (relay.channels.clone(), ask_tx));
                let reader = tokio::spawn(read_relayed(
                    recv,
                    injector.clone(),
                    addrs.clone(),
                    waiters.clone(),
                    asker,
                ));
                let mut batch =
                    Vec::with_capacity(relay::RELAY_WRITE_BATCH + 2 * relay::MAX_RELAY_PACKET);
                // `true`: the relay stops; `false`: the stream is opened again.
                let writing = async {
                    loop {
                        tokio::select! {
                            packet = rx.recv() => {
                                let Some(packet) = packet else { return true };
                                // Everything quinn has queued meanwhile goes out in the same write.
                                batch.clear();
                                encode_packet(&mut batch, &packet);
                                while batch.len() < relay::RELAY_WRITE_BATCH {
                                    let Ok(packet) = rx.try_recv() else { break };
                                    encode_packet(&mut batch, &packet);
                                }
                                if batch.is_empty() {
                                    continue;
                                }
                                if send.write_all(&batch).await.is_err() {
                                    break false;
                                }
                                session.note_relayed();
                            }
                            r = state.changed() => {
                                if r.is_err() {
                                    return true;
                                }
                                let same = matches!(&*state.borrow(), SessionState::Registered(r) if r.generation == reg.generation);
                                if !same {
                                    break false;
                                }
                            }
                            _ = refresh.tick(), if relay.channels.enabled => {
                                let room = MAX_CHANNEL_ASKS.saturating_sub(queued.len());
                                queued.extend(relay.channels.due_refresh(Instant::now(), room));
                            }
                            Some(peer) = ask_rx.recv() => {
                                if queued.len() < MAX_CHANNEL_ASKS {
                                    queued.push_back(peer);
                                } else {
                                    relay.channels.refused(peer, Instant::now());
                                }
                            }
                            // The request under way (the future stays in `asking` when another
                            // branch wins: it is only not polled meanwhile).
                            _ = async {
                                match asking.as_mut() {
                                    Some(ask) => ask.await,
                                    None => std::future::pending().await,
                                }
                            }, if asking.is_some() => {
                                asking = None;
                            }
                            _ = shutdown.changed() => return true,
                        }
                        if asking.is_none() {
                            if let Some(peer) = queued.pop_front() {
                                asking = Some(Box::pin(relay.clone().ask_channel(
                                    session.clone(),
                                    reg.clone(),
                                    peer,
                                )));
                            }
                        }
                    }
                };
                let stop = writing.await;
                reader.abort();
                let _ = reader.await;
                // No request of this stream binds anything once we go on (a new registration
                // clears the channels next); those it cancelled or queued are asked again.
                drop(asking.take());
                queued.clear();
                relay.channels.asks_cancelled(Instant::now());
                if stop {
                    return;
                }
                ready.send_replace(false);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the relay stream");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}

/// Appends `packet`'s relay frame to `batch` (a packet with a bad label or size is dropped, as
/// a lossy link would).
fn encode_packet(batch: &mut Vec<u8>, packet: &VirtualPacket) {
    if let Ok(to) = PeerId::from_bytes(packet.label) {
        let _ = relay::encode_into(batch, &to, &packet.data);
    }
}

async fn open(conn: &quinn::Connection) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_frame(&mut send, &ControlMessage::RelayOpen {}.encode())
        .await
        .map_err(|e| e.to_string())?;
    let reply = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut recv))
        .await
        .map_err(|_| "no answer to relay_open".to_owned())?
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "relay stream closed".to_owned())?;
    match ControlMessage::decode(&reply) {
        Ok(ControlMessage::RelayReady { .. }) => Ok((send, recv)),
        Ok(ControlMessage::Error { code, message }) => {
            Err(format!("refused ({code:?}): {message}"))
        }
        Ok(other) => Err(format!("unexpected `{}`", other.kind())),
        Err(e) => Err(e.to_string()),
    }
}

/// Where quinn sees `peer`'s relayed packets come from: the address its connection was made
/// on ([`Relay::set_quinn_addr`]), else its stable address.
fn quinn_addr_of(addrs: &Mutex<HashMap<PeerId, SocketAddr>>, peer: &PeerId) -> SocketAddr {
    addrs
        .lock()
        .ok()
        .and_then(|a| a.get(peer).copied())
        .unwrap_or_else(|| stable_addr(peer))
}

async fn read_relayed(
    mut recv: quinn::RecvStream,
    injector: Injector,
    addrs: Arc<Mutex<HashMap<PeerId, SocketAddr>>>,
    waiters: Arc<Waiters>,
    asker: Option<(Arc<Channels>, mpsc::Sender<PeerId>)>,
) {
    // Whether to ask for a channel is looked at when the source changes and every so many
    // frames (a refused one is asked again later: Channels::should_ask says when).
    let mut last_from = None;
    let mut frames = 0u32;
    let mut decoder = RelayDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match recv.read(&mut buf).await {
            Ok(Some(n)) => n,
            _ => return,
        };
        decoder.push(&buf[..n]);
        loop {
            match decoder.next_frame() {
                Ok(Some((from, packet))) => {
                    let addr = quinn_addr_of(&addrs, &from);
                    // A full queue drops the packet; QUIC recovers.
                    let _ = injector.inject(addr, packet);
                    waiters.heard(&from);
                    frames = frames.wrapping_add(1);
                    if let Some((channels, ask)) = &asker {
                        if last_from != Some(from) || frames.is_multiple_of(64) {
                            last_from = Some(from);
                            let now = Instant::now();
                            if channels.should_ask(from, now) && ask.try_send(from).is_err() {
                                channels.refused(from, now);
                            }
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "bad frame from the relay");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The peer's channel states: asked once, refusals retried later and later, a bound
    /// channel refreshed on time (not while no connection uses it), kept over a request that
    /// got no answer and asked again soon, unbound when the server refuses it, cancelled
    /// requests asked again, all unbound by a new registration.
    #[tokio::test]
    async fn channel_states_retry_refresh_and_unbind_as_the_server_says() {
        let (socket, _stun) =
            DemuxSocket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap(), 4).unwrap();
        let channels = Channels {
            socket: socket.clone(),
            enabled: true,
            map: Mutex::default(),
        };
        let waiters: Arc<Waiters> = Arc::default();
        let peer = PeerId::from_key_digest(&[5; 32]);
        let server: SocketAddr = "192.0.2.1:7000".parse().unwrap();
        let t0 = Instant::now();
        // Asked once; not again while the request runs.
        assert!(channels.should_ask(peer, t0));
        assert!(!channels.should_ask(peer, t0));
        // Refused: asked again after 0.5 s, then after 1 s.
        channels.refused(peer, t0);
        assert!(!channels.should_ask(peer, t0 + Duration::from_millis(400)));
        assert!(channels.should_ask(peer, t0 + Duration::from_millis(500)));
        channels.refused(peer, t0 + Duration::from_millis(500));
        assert!(!channels.should_ask(peer, t0 + Duration::from_millis(1400)));
        assert!(channels.should_ask(peer, t0 + Duration::from_millis(1500)));
        // Its relay stream went away with the request: asked again at once.
        channels.asks_cancelled(t0 + Duration::from_millis(1600));
        assert!(channels.should_ask(peer, t0 + Duration::from_millis(1600)));
        // Granted: bound in the socket, not asked for again until the refresh is due.
        let refresh = t0 + CHANNEL_REFRESH;
        channels.bind(
            peer,
            42,
            server,
            stable_addr(&peer),
            Some(refresh),
            &waiters,
        );
        assert_eq!(socket.channel_of(*peer.as_bytes()), Some(42));
        assert!(!channels.should_ask(peer, t0));
        assert!(channels.due_refresh(t0, 8).is_empty());
        assert!(
            channels.due_refresh(refresh, 0).is_empty(),
            "no room: not marked"
        );
        assert_eq!(channels.due_refresh(refresh, 8), vec![peer]);
        assert!(
            channels.due_refresh(refresh, 8).is_empty(),
            "marked as asked"
        );
        // No usable answer: stays bound, asked again within 2 s.
        channels.unanswered(peer, refresh);
        assert_eq!(socket.channel_of(*peer.as_bytes()), Some(42));
        assert_eq!(
            channels.due_refresh(refresh + CHANNEL_RETRY * 4, 8),
            vec![peer]
        );
        // Not refreshed while no connection uses it.
        channels.bind(peer, 42, server, stable_addr(&peer), None, &waiters);
        assert!(channels
            .due_refresh(refresh + CHANNEL_REFRESH * 10, 8)
            .is_empty());
        // Refused: unbound, the relay stream again; asked again later.
        channels.refused(peer, refresh);
        assert_eq!(socket.channel_of(*peer.as_bytes()), None);
        assert!(!channels.should_ask(peer, refresh));
        assert!(channels.should_ask(peer, refresh + CHANNEL_RETRY));
        // A new registration unbinds every channel.
        channels.bind(peer, 43, server, stable_addr(&peer), None, &waiters);
        channels.clear();
        assert_eq!(socket.channel_of(*peer.as_bytes()), None);
        assert!(channels.should_ask(peer, Instant::now()));
    }

    /// quinn on a dual-stack socket shows a stable address v4-mapped: it is still one, and the
    /// same peer's.
    #[test]
    fn a_v4_mapped_stable_address_is_a_stable_address() {
        let peer = PeerId::from_key_digest(&[3; 32]);
        let stable = stable_addr(&peer);
        assert!(is_stable_addr(stable));
        let SocketAddr::V4(v4) = stable else {
            panic!("stable addresses are IPv4")
        };
        let mapped = SocketAddr::new(std::net::IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port());
        assert!(is_stable_addr(mapped));
        assert_eq!(transport::canonical(mapped), stable);
        assert!(!is_stable_addr("[2001:db8::1]:1".parse().unwrap()));
        assert!(!is_stable_addr("[::ffff:203.0.113.5]:1".parse().unwrap()));
    }
}
