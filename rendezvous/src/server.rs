//! The tokio driver: accepts QUIC connections, moves frames between streams and the
//! [`Registry`], writes to the [`Store`], answers STUN. No protocol decisions are made here.
//!
//! What a remote party can make this driver hold is bounded here: connection attempts go
//! through [`admission`] (QUIC Retry under load, per-source caps, handshake slots apart from
//! connection slots), every connection runs under small QUIC windows and bounded queues, and
//! every write has a timeout (see [`Limits`] for the per-connection budget).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::frame_io::{read_frame_max, write_frame, FrameIoError};
use common::{ControlMessage, ErrorCode, FrameError, PeerId};
use quinn::{Connection, RecvStream, SendStream};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::backend::Backend;
use crate::core::{ConnId, Outcome, Registry, RelayRefusal};
use crate::ratelimit::TokenBucket;
use crate::relay::{Permission, RelayHub, RelayLimits};
use crate::sources::{Slot, SlotRefusal, SourceKey, SourceSlots};

/// The cluster side of the driver (`--cluster`): lookups and introductions across nodes.
mod cluster_driver;
/// One peer's control stream, read and written by its connection's task alone.
mod control_stream;

use control_stream::{ControlStream, Pushes, WriteFailure};

/// How long a QUIC handshake may take; it holds a handshake slot meanwhile.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has, once connected, to open its control stream and send `register`.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request stream may take to deliver its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one reply or push may take to be accepted by the peer's flow control: a peer that
/// does not read its streams for this long is disconnected ([`CLOSE_NOT_READING`]).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest frame the server accepts from a peer. The largest legitimate request (`register`
/// with 16 local addresses) is under 1 KiB; a longer frame is answered `too_large` and the
/// connection closed (control stream) or the stream answered and ended (request stream).
pub const MAX_REQUEST_FRAME: usize = 4 * 1024;
/// Replies waiting to be written on a control stream. The control loop takes no frame while the
/// queue is full; a reply that finds it full means the peer is not reading, and it is
/// disconnected.
const REPLY_QUEUE: usize = 8;
/// Pushes (introductions) waiting for a control stream, sent by other connections' tasks; more
/// are dropped.
const PUSH_QUEUE: usize = 32;
/// Registry rows expired per hold of the registry lock (each chunk is then deleted from storage
/// in one durable transaction before the next).
const EXPIRY_CHUNK: usize = 1024;
/// Application close codes.
const CLOSE_SHUTDOWN: u32 = 1;
const CLOSE_PROTOCOL: u32 = 2;
/// The peer did not read its replies within [`WRITE_TIMEOUT`].
pub const CLOSE_NOT_READING: u32 = 3;
/// The connection was refused: too many from this source, or in all.
pub const CLOSE_BUSY: u32 = 4;

/// QUIC flow control of control connections: small, since control frames are small. Together
/// with the queues above they make the per-connection memory budget (see [`Limits`]).
pub const CONTROL_RECEIVE_WINDOW: u32 = 64 * 1024;
/// Bytes of the server's writes on a control connection held until acknowledged.
pub const CONTROL_SEND_WINDOW: u64 = 64 * 1024;
/// Bidirectional streams a client may have open at once: control, relay, and five requests
/// (quinn grants more as they end). quinn keeps an entry for every stream the peer may open
/// in two maps per connection from the start: seven fit their smallest table (8 buckets), 16
/// took 1.2 KiB of every idle peer.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 7;

/// Server limits.
///
/// Per-connection memory budget of a control connection (enforced by the bounds named):
/// QUIC receive buffers 64 KiB ([`CONTROL_RECEIVE_WINDOW`]) + QUIC send buffers 64 KiB
/// ([`CONTROL_SEND_WINDOW`]) + control frames read and queued 5 x 4 KiB (4 queued and
/// the one being read, [`MAX_REQUEST_FRAME`] each) + replies queued 8 x ~4 KiB + pushes queued
/// 32 x ~1 KiB + partial requests on 14 request streams x 4 KiB + quinn's connection state and
/// tasks (~40 KiB): about 350 KiB at most. A connection that opened its relay stream gets
/// `relay_window` for each of its QUIC windows instead (plus the relay's own queues).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Concurrent established connections; more are closed with [`CLOSE_BUSY`] right after
    /// the handshake.
    pub max_connections: usize,
    /// Concurrent connections from one source (IPv4 address or IPv6 /64). Generous because
    /// carrier-grade NAT puts many users behind one IPv4 address.
    pub max_connections_per_source: usize,
    /// QUIC handshakes in progress at once, in all. Separate from `max_connections`, so that a
    /// flood of half-open handshakes cannot take the slots of established peers.
    pub max_handshakes: usize,
    /// QUIC handshakes in progress at once from one source.
    pub max_handshakes_per_source: usize,
    /// Above this many handshakes in progress, a client whose address is not validated is sent a
    /// QUIC Retry (a stateless round trip that proves it receives at its address) first.
    pub retry_above_handshakes: usize,
    /// Likewise when its source already has this many handshakes in progress.
    pub retry_above_source_handshakes: usize,
    /// QUIC receive and send windows of a connection once it opens its relay stream: relay
    /// throughput is at most window / RTT (1 MiB: ~52 MB/s at 20 ms).
    pub relay_window: u32,
    /// Sustained requests per second per connection.
    pub requests_per_second: f64,
    /// Burst of requests per connection.
    pub request_burst: f64,
    /// Relay limits.
    pub relay: RelayLimits,
}

impl Limits {
    /// The QUIC transport bounds these limits imply for the endpoint.
    pub fn server_transport(&self) -> transport::ServerTransport {
        transport::ServerTransport {
            receive_window: CONTROL_RECEIVE_WINDOW,
            // Only the relay stream needs more than a control frame; until it is opened the
            // connection window above caps every stream.
            stream_receive_window: self.relay_window.max(CONTROL_RECEIVE_WINDOW),
            send_window: CONTROL_SEND_WINDOW,
            max_concurrent_bidi_streams: MAX_STREAMS_PER_CONNECTION,
            // The accept loop takes each attempt at once; these only absorb bursts.
            max_incoming: 256,
            incoming_buffer_size: 16 * 1024,
            incoming_buffer_size_total: 1024 * 1024,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 20_000,
            max_connections_per_source: 64,
            max_handshakes: 1024,
            max_handshakes_per_source: 16,
            retry_above_handshakes: 64,
            retry_above_source_handshakes: 4,
            relay_window: 1024 * 1024,
            requests_per_second: 20.0,
            request_burst: 50.0,
            relay: RelayLimits::default(),
        }
    }
}

/// What the driver keeps per registered connection.
struct Online {
    /// Pushes to its control stream (dropped when full).
    pusher: Arc<Pushes>,
    /// The connection, to read its current remote address.
    conn: Connection,
}

pub(crate) struct Shared {
    registry: Mutex<Registry>,
    online: Mutex<HashMap<ConnId, Online>>,
    backend: Backend,
    limits: Limits,
    pub(crate) relay: Arc<RelayHub>,
    pub(crate) stun: Arc<crate::stun::StunCounters>,
    pub(crate) rejections: Rejections,
    pub(crate) conns: ConnCounters,
    /// Established connections, per source and in all.
    connections: SourceSlots,
    /// The node links of the cross-node relay (`--cluster-link`).
    pub(crate) links: Option<Arc<crate::nodelink::Links>>,
    /// The relay channels (the relay's data plane in plain UDP).
    pub(crate) channels: Arc<crate::channel::Channels>,
}

/// Connection-level refusals and disconnects, for the operator.
#[derive(Debug, Default)]
pub(crate) struct ConnCounters {
    /// Connection attempts sent a QUIC Retry (address validation under load).
    pub(crate) retries: AtomicU64,
    /// Attempts refused: the source holds its maximum of connections.
    pub(crate) refused_source_connections: AtomicU64,
    /// Attempts refused: the source holds its maximum of handshakes.
    pub(crate) refused_source_handshakes: AtomicU64,
    /// Attempts refused: all handshake slots taken.
    pub(crate) refused_handshakes: AtomicU64,
    /// Connections closed after the handshake: all connection slots taken.
    pub(crate) refused_connections: AtomicU64,
    /// Handshakes that did not finish in time.
    pub(crate) handshake_timeouts: AtomicU64,
    /// Peers disconnected for not reading their replies.
    pub(crate) not_reading: AtomicU64,
}

impl ConnCounters {
    /// One log line.
    fn summary(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "connections: {} retried; refused: {} source connections, {} source handshakes, {} \
             handshakes, {} connections; {} handshake timeouts, {} not reading",
            get(&self.retries),
            get(&self.refused_source_connections),
            get(&self.refused_source_handshakes),
            get(&self.refused_handshakes),
            get(&self.refused_connections),
            get(&self.handshake_timeouts),
            get(&self.not_reading),
        )
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Error replies sent, by code: what clients got wrong (or were refused), for the operator.
#[derive(Debug, Default)]
pub(crate) struct Rejections {
    counts: [AtomicU64; REJECTION_CODES.len()],
}

/// The codes counted, in the order of [`Rejections::snapshot`].
pub(crate) const REJECTION_CODES: [(ErrorCode, &str); 9] = [
    (ErrorCode::BadRequest, "bad_request"),
    (ErrorCode::UnknownType, "unknown_type"),
    (ErrorCode::TooLarge, "too_large"),
    (ErrorCode::NotRegistered, "not_registered"),
    (ErrorCode::UnsupportedVersion, "unsupported_version"),
    (ErrorCode::RateLimited, "rate_limited"),
    (ErrorCode::NotFound, "not_found"),
    (ErrorCode::PeerOffline, "peer_offline"),
    (ErrorCode::RelayDenied, "relay_denied"),
];

impl Rejections {
    fn count(&self, code: ErrorCode) {
        if let Some(i) = REJECTION_CODES.iter().position(|(c, _)| *c == code) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (reason label, count) for every counted code.
    pub(crate) fn snapshot(&self) -> Vec<(&'static str, u64)> {
        REJECTION_CODES
            .iter()
            .zip(&self.counts)
            .map(|((_, label), n)| (*label, n.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Locks a mutex, recovering the data if another thread panicked while holding it: the registry
/// is updated in single steps, so it is consistent whenever the lock is free.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    pub(crate) fn new(
        registry: Registry,
        backend: Backend,
        limits: Limits,
        relay: RelayHub,
        stun: Arc<crate::stun::StunCounters>,
        links: Option<Arc<crate::nodelink::Links>>,
    ) -> Arc<Self> {
        let relay = Arc::new(relay);
        let channels = Arc::new(crate::channel::Channels::new(relay.clone(), limits.relay));
        Arc::new(Shared {
            registry: Mutex::new(registry),
            online: Mutex::new(HashMap::new()),
            backend,
            limits,
            channels,
            relay,
            stun,
            rejections: Rejections::default(),
            conns: ConnCounters::default(),
            connections: SourceSlots::new(
                limits.max_connections_per_source,
                limits.max_connections,
            ),
            links,
        })
    }

    /// A `relay_channel` request from `me` on `conn`: a channel with `peer` if they were
    /// introduced with its accept and both are registered here over UDP.
    fn relay_channel(
        &self,
        conn: &Connection,
        conn_id: ConnId,
        me: PeerId,
        peer: PeerId,
    ) -> ControlMessage {
        let remote = conn.remote_address();
        let denied = |why: String| {
            self.channels.refused_elsewhere(me, peer);
            ControlMessage::error(ErrorCode::RelayDenied, why)
        };
        {
            let registry = lock(&self.registry);
            if registry.online_conn(&me) != Some(conn_id) {
                return denied(
                    "this connection is not your current registration: ask on the new one".into(),
                );
            }
            // Tunnels are keyed by their (IPv4) virtual address, spelled plain.
            if registry.is_tunnel(transport::canonical(remote)) {
                return denied(
                    "this connection runs over the TCP tunnel: its relayed packets take the \
                     relay stream"
                        .into(),
                );
            }
            if registry.online_conn(&peer).is_none() {
                return denied(format!(
                    "peer {peer} is not online on this server: its relayed packets take the \
                     relay stream"
                ));
            }
            if registry
                .relay_allowed(me, peer, OffsetDateTime::now_utc())
                .is_err()
            {
                return denied(format!(
                    "no relay channel to {peer}: you were not introduced, or it has not \
                     accepted"
                ));
            }
        }
        match self
            .channels
            .bind(me, peer, conn_id, remote, conn.local_ip())
        {
            Ok(id) => ControlMessage::RelayChannelReady {
                peer,
                channel: ControlMessage::channel_hex(id),
                max_packet: crate::channel::max_packet(remote) as u32,
            },
            // Counted by the table (a refused new channel: nothing of ours was bound).
            Err(refusal) => ControlMessage::error(ErrorCode::RelayDenied, refusal.to_string()),
        }
    }

    /// Looks at every relay channel again (see [`crate::channel::Channels::sweep`]). Each lock
    /// is taken on its own, and the connections' addresses are read with none held: reading
    /// one takes quinn's lock of that connection, whose driver may be waiting for the socket,
    /// whose receive path may be waiting for the channel table.
    pub(crate) fn sweep_channels(&self) {
        let (ends, pairs) = self.channels.sweep_inputs();
        if pairs.is_empty() {
            return;
        }
        let handles: Vec<(PeerId, ConnId, Option<Connection>)> = {
            let online = lock(&self.online);
            ends.iter()
                .map(|(peer, conn)| (*peer, *conn, online.get(conn).map(|o| o.conn.clone())))
                .collect()
        };
        // Each answer is keyed by its question: a channel made, or an end bound, since
        // `sweep_inputs` is not among them and is left as it is.
        let now = OffsetDateTime::now_utc();
        let (current, consent) = {
            let registry = lock(&self.registry);
            let current: HashMap<PeerId, Option<ConnId>> = pairs
                .iter()
                .flat_map(|(a, b)| [*a, *b])
                .map(|peer| (peer, registry.online_conn(&peer)))
                .collect();
            let consent: HashMap<(PeerId, PeerId), bool> = pairs
                .iter()
                .map(|&(a, b)| ((a, b), registry.relay_allowed(a, b, now).is_ok()))
                .collect();
            (current, consent)
        };
        // An end counts only on its peer's current registration, open.
        let end_addrs: HashMap<(PeerId, ConnId), Option<crate::channel::EndAddr>> = handles
            .into_iter()
            .map(|(peer, conn, handle)| {
                let current_open = handle.filter(|h| {
                    current.get(&peer) == Some(&Some(conn)) && h.close_reason().is_none()
                });
                let addr = current_open.map(|h| (h.remote_address(), h.local_ip()));
                ((peer, conn), addr)
            })
            .collect();
        self.channels.sweep(
            |a, b| consent.get(&(a, b)).copied(),
            |peer| current.get(&peer).map(Option::is_some),
            |peer, conn| end_addrs.get(&(peer, conn)).copied(),
        );
    }

    /// Runs one input through the registry (lock held only for that), then carries out the
    /// outcome's persistence and pushes. Returns the reply.
    async fn apply(
        &self,
        conn: ConnId,
        id: PeerId,
        observed: SocketAddr,
        msg: ControlMessage,
        durable: bool,
    ) -> Option<ControlMessage> {
        // The socket is dual-stack: IPv4 peers arrive v4-mapped; records and candidates keep
        // them plain IPv4.
        let observed = transport::canonical(observed);
        if let ControlMessage::Connect { id: target, .. } = &msg {
            self.refresh_observed(*target);
        }
        // Introductions and accepts change what the two peers may relay to each other.
        let other_side = match &msg {
            ControlMessage::Accept { peer, .. } | ControlMessage::Connect { id: peer, .. } => {
                Some(*peer)
            }
            _ => None,
        };
        // An accept of a requester on another node: its node learns of it over the link.
        let accept_nonce = match &msg {
            ControlMessage::Accept { nonce, .. } => Some(*nonce),
            _ => None,
        };
        // The other nodes hand it to the other side of this peer's introductions.
        let nat_report = match &msg {
            ControlMessage::Nat { nat } => Some(*nat),
            _ => None,
        };
        let remote = match self.backend.cluster() {
            Some(cluster) => {
                self.cluster_outcome(cluster, conn, id, observed, &msg)
                    .await
            }
            None => None,
        };
        let Outcome {
            reply,
            pushes,
            persist,
        } = match remote {
            Some(outcome) => outcome,
            None => lock(&self.registry).handle(conn, id, observed, msg, OffsetDateTime::now_utc()),
        };
        if let (Some(other), Some(ControlMessage::Ack {} | ControlMessage::Punch { .. })) =
            (other_side, &reply)
        {
            // Their relay sessions forget cached answers about each other (so that an answer
            // from before does not hold up the new one), and flush what they held on accept.
            self.relay.permissions_changed(id, other);
        }
        if let (Some(nonce), Some(ControlMessage::Ack {})) = (accept_nonce, &reply) {
            if let Some(other) = other_side {
                self.consent_to_other_node(other, id, nonce);
            }
        }
        if let (Some(nat), Some(ControlMessage::Ack {}), Some(cluster)) =
            (nat_report, &reply, self.backend.cluster())
        {
            cluster.nat_later(id, nat);
        }
        if let Some((who, record)) = persist {
            if durable {
                if let Err(e) = self.backend.put(who, record).await {
                    tracing::error!(error = %e, "could not persist registration");
                    return Some(ControlMessage::error(
                        ErrorCode::Internal,
                        "registration could not be stored; try again",
                    ));
                }
            } else {
                self.backend.put_later(who, record);
            }
        }
        for (target, push) in pushes {
            self.push(target, push);
        }
        reply
    }

    /// Queues `push` on connection `target`'s control stream (dropped if its queue is full).
    pub(crate) fn push(&self, target: ConnId, push: ControlMessage) -> bool {
        let sender = lock(&self.online).get(&target).map(|o| o.pusher.clone());
        match sender {
            Some(sender) => {
                let queued = sender.try_push(push);
                if !queued {
                    tracing::warn!(conn = target, "push queue full or closed; dropped");
                }
                queued
            }
            None => {
                tracing::warn!(conn = target, "push target has no control stream");
                false
            }
        }
    }
}

impl Shared {
    /// Registered peers, online peers and the registry's counters (lock held only to copy).
    pub(crate) fn registry_view(&self) -> (u64, u64, crate::core::Counters) {
        let registry = lock(&self.registry);
        (
            registry.registered() as u64,
            registry.online() as u64,
            registry.counters(),
        )
    }

    /// The cluster registry, if this node is part of a cluster.
    pub(crate) fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.backend.cluster()
    }

    /// A TCP tunnel from `remote` carries the packets of `virtual_addr` (`Some`), or closed
    /// (`None`): registrations through it count against `remote` (see
    /// [`Registry::tunnel_opened`]).
    pub(crate) fn tunnel_source(&self, virtual_addr: SocketAddr, remote: Option<std::net::IpAddr>) {
        let mut registry = lock(&self.registry);
        match remote {
            Some(remote) => registry.tunnel_opened(virtual_addr, remote),
            None => registry.tunnel_closed(virtual_addr),
        }
    }

    /// Before introducing `target`, take its address from its live connection: after a NAT
    /// rebinding QUIC migrates at once, long before the peer sends another request.
    fn refresh_observed(&self, target: PeerId) {
        let (conn_id, recorded) = {
            let registry = lock(&self.registry);
            (
                registry.connection_of(&target),
                registry.observed_of(&target),
            )
        };
        let Some(conn_id) = conn_id else { return };
        let current = lock(&self.online)
            .get(&conn_id)
            .map(|o| transport::canonical(o.conn.remote_address()));
        let Some(current) = current else { return };
        if Some(current) == recorded {
            return;
        }
        let persist = lock(&self.registry).observe(target, current, OffsetDateTime::now_utc());
        if let Some((who, record)) = persist {
            tracing::info!(peer = %who, observed = %current, "address changed");
            self.backend.put_later(who, record);
        }
    }
}

/// Accepts connections until `shutdown` flips, then closes everything and waits for tasks.
pub(crate) async fn serve(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = shared.limits;
    let handshakes = SourceSlots::new(limits.max_handshakes_per_source, limits.max_handshakes);
    let mut tasks = JoinSet::new();
    tasks.spawn(log_counters(shared.clone(), shutdown.clone()));
    tasks.spawn(expire_rows(shared.clone(), shutdown.clone()));
    if let Some(cluster) = shared.backend.cluster() {
        cluster_driver::spawn(&mut tasks, cluster.clone(), &shared, &shutdown);
    }
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let Some(handshake) = admit(&shared, &handshakes, incoming) else { continue };
                let (incoming, slot) = handshake;
                let shared = shared.clone();
                let shutdown = shutdown.clone();
                // Boxed: a task keeps its arguments for its whole life, and the connection
                // attempt (384 bytes) is only needed until the handshake is done.
                let incoming = Box::new(incoming);
                tasks.spawn(async move {
                    let remote = incoming.remote_address();
                    if let Err(e) = handle_connection(incoming, slot, shared, shutdown).await {
                        tracing::debug!(%remote, error = %e, "connection ended");
                    }
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    endpoint.close(CLOSE_SHUTDOWN.into(), b"server shutting down");
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        tracing::warn!("tasks still running after 5 s; aborting them");
        tasks.shutdown().await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

/// What becomes of a connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// Take a handshake slot and run the handshake.
    Handshake,
    /// Answer with a QUIC Retry: the client must prove it receives at its address first.
    Retry,
    /// Refuse: its source holds its maximum of established connections.
    RefuseSourceConnections,
}

/// Decides what becomes of a connection attempt, given what its source and the server hold: a
/// QUIC Retry when its address is not validated and the server is under load (stateless: a
/// spoofed source gets one small packet and holds nothing), a refusal when its source holds its
/// maximum of connections, otherwise a handshake (if a handshake slot is free).
fn admission(
    limits: &Limits,
    validated: bool,
    source_connections: usize,
    handshakes: usize,
    source_handshakes: usize,
) -> Admission {
    if source_connections >= limits.max_connections_per_source {
        return Admission::RefuseSourceConnections;
    }
    let under_load = handshakes >= limits.retry_above_handshakes
        || source_handshakes >= limits.retry_above_source_handshakes;
    if under_load && !validated {
        return Admission::Retry;
    }
    Admission::Handshake
}

/// Carries out [`admission`] for one attempt; returns it with its handshake slot if it may go on.
fn admit(
    shared: &Shared,
    handshakes: &SourceSlots,
    incoming: quinn::Incoming,
) -> Option<(quinn::Incoming, Slot)> {
    let remote = incoming.remote_address();
    let source = SourceKey::of(remote.ip());
    // quinn: an attempt that is not validated may always be retried.
    let validated = incoming.remote_address_validated() || !incoming.may_retry();
    match admission(
        &shared.limits,
        validated,
        shared.connections.held_by(source),
        handshakes.held(),
        handshakes.held_by(source),
    ) {
        Admission::RefuseSourceConnections => {
            bump(&shared.conns.refused_source_connections);
            tracing::debug!(%remote, "too many connections from this source; refusing");
            incoming.refuse();
            return None;
        }
        Admission::Retry => {
            bump(&shared.conns.retries);
            if let Err(e) = incoming.retry() {
                e.into_incoming().refuse();
            }
            return None;
        }
        Admission::Handshake => {}
    }
    match handshakes.try_acquire(source) {
        Ok(slot) => Some((incoming, slot)),
        Err(refusal) => {
            bump(match refusal {
                SlotRefusal::PerSource(_) => &shared.conns.refused_source_handshakes,
                SlotRefusal::Total(_) => &shared.conns.refused_handshakes,
            });
            tracing::debug!(%remote, %refusal, "handshake refused");
            incoming.refuse();
            None
        }
    }
}

/// Logs the relay counters every minute while they change, and once at shutdown.
async fn log_counters(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut last = String::new();
    let mut last_conns = String::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(60));
    loop {
        let stop = tokio::select! {
            _ = ticker.tick() => false,
            _ = shutdown.changed() => true,
        };
        let summary = shared.relay.counters.summary();
        if summary != last || stop {
            tracing::info!("{summary}");
            last = summary;
        }
        let conns = shared.conns.summary();
        if conns != last_conns {
            tracing::info!("{conns}");
            last_conns = conns;
        }
        if stop {
            return;
        }
    }
}

/// Deletes registry rows whose peers have been offline too long, periodically, in bounded
/// chunks: from memory under the lock, then durably from storage.
async fn expire_rows(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    // Often enough that a row outlives its expiry by a small fraction of it (a minute at most),
    // rarely enough to cost nothing.
    let expire_after = lock(&shared.registry).limits().expire_after;
    let every = (expire_after / 8).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        loop {
            let expired = lock(&shared.registry).expire(OffsetDateTime::now_utc(), EXPIRY_CHUNK);
            let (n, full_chunk) = (expired.len(), expired.len() == EXPIRY_CHUNK);
            if n == 0 {
                break;
            }
            if let Err(e) = shared.backend.delete_expired(expired).await {
                // The rows are gone from memory; storage drops them at the next start.
                tracing::error!(error = %e, rows = n, "could not delete expired rows");
                break;
            }
            tracing::info!(rows = n, "expired registry rows of peers offline too long");
            if !full_chunk {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("handshake: {0}")]
    Handshake(#[from] quinn::ConnectionError),
    #[error("client certificate: {0}")]
    Identity(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("frame: {0}")]
    Frame(#[from] FrameIoError),
    #[error("control stream: {0}")]
    StreamRead(std::io::Error),
    #[error("stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("refused: {0}")]
    Refused(#[from] SlotRefusal),
    #[error("the peer does not read its replies")]
    NotReading,
    #[error("{0}")]
    Protocol(String),
}

fn peer_id_of(conn: &Connection) -> Result<PeerId, ConnError> {
    let cert = transport::remote_certificate(conn).map_err(|e| ConnError::Identity(e.into()))?;
    certs::peer_id_of_cert(&cert).map_err(|e| ConnError::Identity(e.to_string()))
}

/// Sends a reply or push; error replies are counted by code for the operator.
async fn send(
    shared: &Shared,
    stream: &mut SendStream,
    msg: &ControlMessage,
) -> Result<(), ConnError> {
    if let ControlMessage::Error { code, .. } = msg {
        shared.rejections.count(*code);
    }
    write_frame(stream, &msg.encode()).await?;
    Ok(())
}

async fn handle_connection(
    incoming: Box<quinn::Incoming>,
    handshake: Slot,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let source = handshake.source();
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, *incoming).await {
        Ok(conn) => conn?,
        Err(_) => {
            bump(&shared.conns.handshake_timeouts);
            return Err(ConnError::Timeout("handshake"));
        }
    };
    drop(handshake);
    let _slot = match shared.connections.try_acquire(source) {
        Ok(slot) => slot,
        Err(refusal) => {
            bump(match refusal {
                SlotRefusal::PerSource(_) => &shared.conns.refused_source_connections,
                SlotRefusal::Total(_) => &shared.conns.refused_connections,
            });
            conn.close(CLOSE_BUSY.into(), refusal.to_string().as_bytes());
            return Err(refusal.into());
        }
    };
    let id = peer_id_of(&conn)?;
    let conn_id = conn.stable_id() as ConnId;
    let (control_tx, control_rx) = tokio::time::timeout(REGISTER_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| ConnError::Timeout("control stream"))??;

    // The control stream is read and written by this task alone (no reader or writer task,
    // no channels: an idle peer's cost): the control loop polls it in its `select!`, with
    // reads and writes that lose nothing when dropped. Pushes from other connections come
    // through a bounded queue.
    let mut stream = ControlStream::new(control_tx, control_rx);
    let pushes = Arc::new(Pushes::default());
    let control = Control {
        shared: &shared,
        conn: &conn,
        conn_id,
        id,
    };
    let result = control.run(&mut stream, &pushes, shutdown).await;

    lock(&shared.online).remove(&conn_id);
    // No push reaches the queue any more (the online entry is gone): what is queued is
    // delivered (often an error reply), then the stream is finished; a peer that does not take
    // it within a write timeout is disconnected.
    if !matches!(result, Err(ConnError::NotReading)) {
        let drained = async {
            while let Some(push) = pushes.pop() {
                stream.writer.push(&push);
            }
            stream.writer.drain().await
        };
        // A peer that trickles its reads gets no more than one write timeout for all of it.
        match tokio::time::timeout(WRITE_TIMEOUT + Duration::from_secs(1), drained).await {
            Ok(Ok(())) | Ok(Err(WriteFailure::Stream)) => {}
            Ok(Err(WriteFailure::TimedOut)) | Err(_) => disconnect_not_reading(&shared, &conn),
        }
    }
    if matches!(result, Err(ConnError::Frame(_))) {
        // After a bad length the stream cannot be resynchronised.
        conn.close(CLOSE_PROTOCOL.into(), b"bad frame");
    }
    let gone = lock(&shared.registry).disconnected(conn_id, id, OffsetDateTime::now_utc());
    if let Some((who, record)) = gone {
        shared.backend.offline(who, record);
        tracing::info!(peer = %id, "offline");
    }
    result
}

/// One connection's control loop: what it needs to answer requests.
struct Control<'a> {
    shared: &'a Arc<Shared>,
    conn: &'a Connection,
    conn_id: ConnId,
    id: PeerId,
}

impl Control<'_> {
    /// Queues a reply without waiting (error replies are counted by code for the operator).
    /// The control loop only takes a frame when the reply queue has room, so a full queue here
    /// means the peer sent something before registering and did not read: it is disconnected.
    fn reply(&self, stream: &mut ControlStream, msg: ControlMessage) -> Result<(), ConnError> {
        if let ControlMessage::Error { code, .. } = &msg {
            self.shared.rejections.count(*code);
        }
        match stream.writer.queue_reply(&msg) {
            Ok(()) => Ok(()),
            Err(()) => {
                disconnect_not_reading(self.shared, self.conn);
                Err(ConnError::NotReading)
            }
        }
    }

    /// Registration, then requests until the connection ends.
    async fn run(
        &self,
        stream: &mut ControlStream,
        pushes: &Arc<Pushes>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), ConnError> {
        let (shared, conn, conn_id, id) = (self.shared, self.conn, self.conn_id, self.id);
        let first = tokio::time::timeout(REGISTER_TIMEOUT, stream.reader.read_frame())
            .await
            .map_err(|_| ConnError::Timeout("register"))?;
        let first = match first {
            Ok(Some(body)) => body,
            Err(e) => return Err(self.reject_frame(stream, e)),
            Ok(None) => {
                return Err(ConnError::Protocol(
                    "control stream closed before register".into(),
                ))
            }
        };
        let msg = match ControlMessage::decode(&first) {
            Ok(msg @ ControlMessage::Register { .. }) => msg,
            Ok(other) => {
                self.reply(
                    stream,
                    ControlMessage::error(
                        ErrorCode::NotRegistered,
                        format!(
                            "the first message must be `register`, got `{}`",
                            other.kind()
                        ),
                    ),
                )?;
                return Err(ConnError::Protocol("no register".into()));
            }
            Err(e) => {
                self.reply(stream, ControlMessage::error(e.code(), e.to_string()))?;
                return Err(ConnError::Protocol(e.to_string()));
            }
        };
        // Boxed, here and in the loop below: `apply` (the registry, storage and cluster
        // calls) is the largest state of this future, which every idle peer's task holds for
        // as long as it is connected; boxed, only a request in progress pays for it.
        let reply = Box::pin(shared.apply(conn_id, id, conn.remote_address(), msg, true)).await;
        let registered = matches!(reply, Some(ControlMessage::Registered { .. }));
        if let Some(reply) = reply {
            self.reply(stream, reply)?;
        }
        if !registered {
            return Err(ConnError::Protocol("registration refused".into()));
        }
        tracing::info!(peer = %id, observed = %transport::canonical(conn.remote_address()), "registered");

        // Introductions still waiting for our accept are pushed again: the first push may have
        // gone to the connection this registration replaces.
        let waiting = lock(&shared.registry).pending_introductions(id, OffsetDateTime::now_utc());
        for punch in waiting {
            if !pushes.try_push(punch) {
                tracing::warn!(peer = %id, "push queue full; dropped an introduction");
            }
        }
        lock(&shared.online).insert(
            conn_id,
            Online {
                pusher: pushes.clone(),
                conn: conn.clone(),
            },
        );
        let mut limiter = TokenBucket::new(
            shared.limits.request_burst,
            shared.limits.requests_per_second,
            Instant::now(),
        );
        // Made with the first request stream and dropped when its last one ends: an idle
        // peer holds no set.
        let mut requests: Option<JoinSet<()>> = None;
        let outcome = loop {
            // The frames read are answered while the reply queue has room. A peer may send the
            // next requests before it has read the replies to the last ones: while the queue
            // is full, no frame is taken and the stream is not read, so QUIC's flow control
            // holds the peer back. A peer that reads nothing at all is disconnected by the
            // write timeout.
            let mut failed = None;
            while stream.writer.has_room() {
                let body = match stream.reader.next_frame() {
                    Ok(Some(body)) => body,
                    Ok(None) => break,
                    Err(e) => {
                        failed = Some(self.reject_frame(stream, e));
                        break;
                    }
                };
                let reply = if limiter.try_take(Instant::now()) {
                    match ControlMessage::decode(&body) {
                        Ok(msg) => {
                            Box::pin(shared.apply(conn_id, id, conn.remote_address(), msg, false))
                                .await
                        }
                        Err(e) => Some(ControlMessage::error(e.code(), e.to_string())),
                    }
                } else {
                    Some(ControlMessage::error(
                        ErrorCode::RateLimited,
                        "too many requests; slow down",
                    ))
                };
                if let Some(reply) = reply {
                    if let Err(e) = self.reply(stream, reply) {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                break Err(e);
            }
            if stream.reader.ended() {
                // Finished by the peer, every frame answered.
                break Ok(());
            }
            tokio::select! {
                read = stream.reader.read_more(), if stream.writer.has_room() => {
                    if let Err(e) = read {
                        break Err(self.reject_frame(stream, e));
                    }
                }
                wrote = stream.writer.write_some(), if !stream.writer.idle() => match wrote {
                    Ok(()) => {}
                    Err(WriteFailure::TimedOut) => {
                        disconnect_not_reading(shared, conn);
                        break Err(ConnError::NotReading);
                    }
                    // The stream failed (reset, or the connection is gone).
                    Err(WriteFailure::Stream) => break Err(ConnError::NotReading),
                },
                push = pushes.next(), if stream.writer.idle() => stream.writer.push(&push),
                accepted = conn.accept_bi() => match accepted {
                    Ok((tx, rx)) => {
                        let allowed = limiter.try_take(Instant::now());
                        let shared = shared.clone();
                        let conn = conn.clone();
                        requests.get_or_insert_with(JoinSet::new).spawn(async move {
                            if let Err(e) = handle_request(&shared, &conn, conn_id, id, tx, rx, allowed).await {
                                tracing::debug!(peer = %id, error = %e, "request failed");
                            }
                        });
                    }
                    Err(_) => break Ok(()),
                },
                Some(_) = async { requests.as_mut()?.join_next().await }, if requests.is_some() => {
                    if requests.as_ref().is_some_and(JoinSet::is_empty) {
                        requests = None;
                    }
                }
                _ = shutdown.changed() => break Ok(()),
            }
        };
        if let Some(mut requests) = requests {
            requests.shutdown().await;
        }
        outcome
    }

    /// Answers a bad frame on the control stream; the caller closes the connection once the
    /// answer is out. A stream that failed (the connection was lost or reset) is no bad frame:
    /// there is no one to answer, and nothing is counted against the peer.
    fn reject_frame(&self, stream: &mut ControlStream, err: FrameIoError) -> ConnError {
        let code = match err {
            FrameIoError::Io(e) => return ConnError::StreamRead(e),
            FrameIoError::Frame(FrameError::TooLarge { .. }) => ErrorCode::TooLarge,
            FrameIoError::Frame(FrameError::Truncated { .. }) => ErrorCode::BadRequest,
        };
        let _ = self.reply(stream, ControlMessage::error(code, err.to_string()));
        ConnError::Frame(err)
    }
}

/// Closes a connection whose peer does not read what it is sent.
fn disconnect_not_reading(shared: &Shared, conn: &Connection) {
    if conn.close_reason().is_some() {
        return; // already closed (by another of its streams' timeouts, say): counted once
    }
    bump(&shared.conns.not_reading);
    tracing::info!(remote = %conn.remote_address(), "peer does not read its replies; disconnecting");
    conn.close(CLOSE_NOT_READING.into(), b"not reading");
}

/// One request on its own stream: one frame in, one frame out.
async fn handle_request(
    shared: &Shared,
    conn: &Connection,
    conn_id: ConnId,
    id: PeerId,
    mut tx: SendStream,
    mut rx: RecvStream,
    allowed: bool,
) -> Result<(), ConnError> {
    let reply = if !allowed {
        ControlMessage::error(ErrorCode::RateLimited, "too many requests; slow down")
    } else {
        match tokio::time::timeout(REQUEST_TIMEOUT, read_frame_max(&mut rx, MAX_REQUEST_FRAME))
            .await
        {
            Err(_) => return Err(ConnError::Timeout("request")),
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(FrameIoError::Frame(e))) => ControlMessage::error(
                match e {
                    FrameError::TooLarge { .. } => ErrorCode::TooLarge,
                    FrameError::Truncated { .. } => ErrorCode::BadRequest,
                },
                e.to_string(),
            ),
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(Some(body))) => match ControlMessage::decode(&body) {
                Ok(ControlMessage::RelayOpen {}) => 'relay: {
                    let limits = shared.limits.relay;
                    let Some(opened) = shared.relay.open(id, conn_id, limits) else {
                        break 'relay ControlMessage::error(
                            ErrorCode::RelayDenied,
                            "this connection already has a relay stream (one per connection)",
                        );
                    };
                    let ready = ControlMessage::RelayReady {
                        max_packet: common::relay::MAX_RELAY_PACKET as u32,
                        rate_bytes_per_s: limits.rate_bytes_per_s,
                    };
                    send_in_time(shared, conn, &mut tx, &ready).await?;
                    // Relay throughput is bounded by window / RTT: this connection now gets the
                    // relay budget instead of the control windows (only once its flow control
                    // took the answer: a peer that grants no credit never gets them).
                    conn.set_receive_window(limits_window(shared));
                    conn.set_send_window(u64::from(shared.limits.relay_window));
                    tracing::debug!(peer = %id, "relay stream open");
                    let permission = |to: PeerId| {
                        let now = OffsetDateTime::now_utc();
                        let answer = lock(&shared.registry).relay_allowed(id, to, now);
                        // A peer on another node (a cross-node introduction taught where):
                        // the introduction as this node recorded it.
                        let answer = match (answer, &shared.links) {
                            (Err(RelayRefusal::UnknownPeer), Some(links))
                                if links.route(&to).is_some() =>
                            {
                                lock(&shared.registry).relay_allowed_remote(id, to, now)
                            }
                            (answer, _) => answer,
                        };
                        match answer {
                            Ok(()) => Permission::Allowed,
                            Err(RelayRefusal::NotAccepted) => Permission::AwaitingAccept,
                            Err(_) => Permission::Denied,
                        }
                    };
                    crate::relay::run(opened, tx, rx, permission).await;
                    return Ok(());
                }
                Ok(ControlMessage::RelayChannel { peer }) => {
                    shared.relay_channel(conn, conn_id, id, peer)
                }
                Ok(ControlMessage::Register { .. }) => ControlMessage::error(
                    ErrorCode::BadRequest,
                    "`register` belongs on the control stream",
                ),
                Ok(msg) => shared
                    .apply(conn_id, id, conn.remote_address(), msg, false)
                    .await
                    .unwrap_or_else(|| ControlMessage::error(ErrorCode::Internal, "no reply")),
                Err(e) => ControlMessage::error(e.code(), e.to_string()),
            },
        }
    };
    send_in_time(shared, conn, &mut tx, &reply).await?;
    let _ = tx.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), tx.stopped()).await;
    Ok(())
}

/// The relay receive window as a QUIC variable-length integer (a u32 always fits).
fn limits_window(shared: &Shared) -> quinn::VarInt {
    quinn::VarInt::from_u32(shared.limits.relay_window)
}

/// Sends a reply on a request stream within [`WRITE_TIMEOUT`], disconnecting a peer that does
/// not read it.
async fn send_in_time(
    shared: &Shared,
    conn: &Connection,
    stream: &mut SendStream,
    msg: &ControlMessage,
) -> Result<(), ConnError> {
    match tokio::time::timeout(WRITE_TIMEOUT, send(shared, stream, msg)).await {
        Ok(result) => result,
        Err(_) => {
            disconnect_not_reading(shared, conn);
            Err(ConnError::NotReading)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_retries_unvalidated_sources_under_load_and_caps_each_source() {
        let limits = Limits {
            max_connections_per_source: 3,
            retry_above_handshakes: 10,
            retry_above_source_handshakes: 2,
            ..Limits::default()
        };
        // Quiet server: everyone goes straight to the handshake.
        assert_eq!(admission(&limits, false, 0, 0, 0), Admission::Handshake);
        assert_eq!(admission(&limits, false, 2, 9, 1), Admission::Handshake);
        // Many handshakes in progress, or several from this source: unvalidated ones are retried,
        // validated ones (they answered a Retry) go on.
        assert_eq!(admission(&limits, false, 0, 10, 0), Admission::Retry);
        assert_eq!(admission(&limits, false, 0, 0, 2), Admission::Retry);
        assert_eq!(admission(&limits, true, 0, 10, 2), Admission::Handshake);
        // A source at its connection cap is refused, validated or not.
        assert_eq!(
            admission(&limits, true, 3, 0, 0),
            Admission::RefuseSourceConnections
        );
        assert_eq!(
            admission(&limits, false, 3, 50, 5),
            Admission::RefuseSourceConnections
        );
    }

    #[test]
    fn the_server_transport_keeps_control_connections_small_and_lets_the_relay_stream_grow() {
        let limits = Limits::default();
        let t = limits.server_transport();
        assert_eq!(t.receive_window, CONTROL_RECEIVE_WINDOW);
        assert_eq!(t.send_window, CONTROL_SEND_WINDOW);
        assert!(t.stream_receive_window >= limits.relay_window);
        // ~50 MB/s at 20 ms RTT through the relay.
        assert!(f64::from(limits.relay_window) / 0.020 >= 50e6);
        // The largest legitimate request fits the frame cap with room to spare.
        let register = ControlMessage::Register {
            version: common::PROTOCOL_VERSION,
            local_addrs: (0..16u16)
                .map(|i| SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, i], 65535)))
                .collect(),
            mapped_port: None,
        };
        assert!(
            register.encode().len() < 1024,
            "{}",
            register.encode().len()
        );
        assert!(register.encode().len() * 2 < MAX_REQUEST_FRAME);
        // A `connect` with the largest first flight (base64 in the JSON) fits too.
        let connect = ControlMessage::Connect {
            id: common::PeerId::from_key_digest(&[7; 32]),
            first_flight: common::message::FirstFlight::new(vec![
                0xff;
                common::message::MAX_FIRST_FLIGHT
            ]),
        };
        assert!(
            connect.encode().len() + 1024 < MAX_REQUEST_FRAME,
            "{}",
            connect.encode().len()
        );
    }
}
