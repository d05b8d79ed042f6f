//! Relaying between peers that have no direct path: each peer opens one relay stream on its
//! control connection; frames `{to, packet}` it writes are forwarded to the destination's relay
//! stream as `{from, packet}`. The packets are the peers' own end-to-end encrypted QUIC packets.
//!
//! Everything here is sized for a hostile sender:
//!
//! - **Consent.** Packets go only between two peers one of which asked for an introduction
//!   (`connect`) and the other accepted it (`accept`). Packets that arrive while the
//!   introduction awaits its accept (the dialer starts its QUIC handshake over the relay at
//!   once) are held, at most [`HOLD_PACKETS`] / [`HOLD_BYTES`] per destination for
//!   [`HOLD_TIME`], for at most [`HOLD_PAIRS`] destinations per session, and flushed on accept.
//! - **Cost.** Every frame costs at least [`MIN_FRAME_COST`] bytes, against the sender's token
//!   bucket and quota and against the destination's queue; empty packets are refused (and still
//!   charged).
//! - **Per peer.** The token bucket and the quota belong to the peer id, not to the stream: they
//!   survive re-opened relay streams and reconnections ([`Allowances`], bounded). One relay
//!   stream per connection.
//! - **Bytes.** A destination's queue is bounded by the bytes it holds (real allocation sizes
//!   plus a per-batch overhead), not by packets: see [`Sink`].
//!
//! The decode -> admit -> batch logic is a sans-IO value, [`RelaySession`]: bytes and `now` in,
//! per-destination batches and counters out. The tokio task (`run`) only reads quinn's chunks,
//! feeds them in and hands the batches to the destinations' [`Sink`]s. Memory per relay session
//! is bounded by [`RelaySession::MEMORY_BOUND`] (about 640 KiB: decoder buffer, one read's
//! batches, held packets, permission cache; no read buffer of its own) plus its own destination
//! queue ([`RelayLimits::queue_bytes`], 1 MiB by default); what a sender makes others hold is
//! bounded by their queues. (What quinn buffers towards a destination is bounded by the
//! destination's flow-control window, set by the transport.)
//!
//! Fuzzing: [`run_script`] is the body of the relay hub's fuzz target. It drives a
//! [`RelaySession`] with arbitrary byte chunks (each at most [`READ_CHUNK`]) and frames,
//! permission answers that change, and a clock that moves forward, hands every batch from
//! [`RelaySession::take_batches`] to a [`Sink`] per destination (drained at random with
//! [`Sink::written`]), and asserts after every step that [`RelaySession::memory`] <=
//! [`RelaySession::MEMORY_BOUND`] and that every sink's [`Sink::queued_bytes`] <= its limit:
//!
//! ```ignore
//! #![no_main]
//! libfuzzer_sys::fuzz_target!(|data: &[u8]| rendezvous::relay::run_script(data));
//! ```

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::relay::{self, RelayDecoder, RelayFrameError, MAX_RELAY_PACKET};
use common::PeerId;
use tokio::sync::{mpsc, Notify};

use crate::ratelimit::TokenBucket;

/// Smallest cost of one frame, in bytes: what a frame is charged against the sender's rate and
/// quota and the destination's queue, however small its packet. Covers the 18-byte frame header
/// and the bookkeeping a frame causes.
pub const MIN_FRAME_COST: u64 = 64;
/// Bytes charged to a destination's queue for each batch on top of its frames (the batch's own
/// allocation and its slot in the channel).
pub const BATCH_OVERHEAD: usize = 96;
/// Most bytes the driver reads from a relay stream at once (and hands to
/// [`RelaySession::receive`]).
pub const READ_CHUNK: usize = 64 * 1024;
/// Packets held for one destination while its introduction awaits the accept.
pub const HOLD_PACKETS: usize = 8;
/// Bytes (frame costs) held for one destination while its introduction awaits the accept.
pub const HOLD_BYTES: usize = 16 * 1024;
/// How long packets are held for an accept before they are dropped.
pub const HOLD_TIME: Duration = Duration::from_secs(3);
/// Destinations one session holds packets for at once.
pub const HOLD_PAIRS: usize = 4;
/// How long the byte quota's window is: [`RelayLimits::quota_bytes`] per peer per window.
pub const QUOTA_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Peers whose allowance (token bucket, quota) is remembered; see [`Allowances`].
pub const MAX_ALLOWANCES: usize = 32_768;
/// Header bytes of a relay frame (length and peer id).
const FRAME_HEADER: usize = 2 + 16;

/// Relay limits.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// Sustained bytes per second one peer may send through the relay (frame costs).
    pub rate_bytes_per_s: u64,
    /// Burst, bytes.
    pub burst_bytes: u64,
    /// Bytes one peer may send per [`QUOTA_WINDOW`] (0: no quota).
    pub quota_bytes: u64,
    /// Bytes queued towards one destination before new batches are dropped.
    pub queue_bytes: usize,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            rate_bytes_per_s: 50_000_000,
            burst_bytes: 4_000_000,
            quota_bytes: 50 * 1024 * 1024 * 1024,
            queue_bytes: 1024 * 1024,
        }
    }
}

/// What one relay frame costs: its packet and header, at least [`MIN_FRAME_COST`].
pub fn frame_cost(packet_len: usize) -> u64 {
    ((FRAME_HEADER + packet_len) as u64).max(MIN_FRAME_COST)
}

/// Relay counters for the operator.
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// Relay streams opened.
    pub sessions: AtomicU64,
    /// Packets forwarded.
    pub packets: AtomicU64,
    /// Bytes forwarded.
    pub bytes: AtomicU64,
    /// Dropped: destination queue full.
    pub dropped_queue_full: AtomicU64,
    /// Dropped: destination has no relay stream.
    pub dropped_no_route: AtomicU64,
    /// Refused: the peers were not introduced.
    pub denied_not_introduced: AtomicU64,
    /// Dropped: over the rate limit.
    pub denied_rate: AtomicU64,
    /// Dropped: over the quota.
    pub denied_quota: AtomicU64,
    /// Refused: empty packets.
    pub dropped_empty: AtomicU64,
    /// Dropped: the introduction was not accepted in time, or too much waited for the accept.
    pub dropped_not_accepted: AtomicU64,
    /// Packets held for an accept and forwarded once it came.
    pub held_then_forwarded: AtomicU64,
    /// `relay_open` refused: the connection already has a relay stream.
    pub refused_streams: AtomicU64,
    /// Packets held for an accept right now (a gauge).
    pub held_now: AtomicU64,
}

impl RelayCounters {
    /// One line for logs.
    pub fn summary(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "relay: {} sessions, {} packets, {} bytes forwarded ({} after waiting for an accept); \
             dropped: {} queue full, {} no route, {} not introduced, {} not accepted, {} rate, \
             {} quota, {} empty; {} second relay streams refused",
            get(&self.sessions),
            get(&self.packets),
            get(&self.bytes),
            get(&self.held_then_forwarded),
            get(&self.dropped_queue_full),
            get(&self.dropped_no_route),
            get(&self.denied_not_introduced),
            get(&self.dropped_not_accepted),
            get(&self.denied_rate),
            get(&self.denied_quota),
            get(&self.dropped_empty),
            get(&self.refused_streams),
        )
    }
}

/// Adds `n` to a relay counter (the relay channels' too).
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    if n > 0 {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

fn sub(gauge: &AtomicU64, n: u64) {
    if n > 0 {
        let _ = gauge.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(n))
        });
    }
}

/// May a sender relay to a destination now (the registry's answer)?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Introduced and accepted.
    Allowed,
    /// Introduced; the target has not accepted yet: hold a few packets.
    AwaitingAccept,
    /// Not introduced (or expired, or the destination is unknown).
    Denied,
}

/// Why a relayed packet is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The two peers were not introduced.
    NotIntroduced,
    /// Over the rate limit.
    Rate,
    /// Over the quota.
    Quota,
}

/// One peer's relay allowance: a token bucket of bytes and a byte quota per [`QUOTA_WINDOW`].
/// Shared by every relay session of the peer (see [`Allowances`]).
#[derive(Debug)]
pub struct Allowance {
    limits: RelayLimits,
    bucket: TokenBucket,
    sent: u64,
    window_start: Instant,
}

impl Allowance {
    /// A full allowance.
    pub fn new(limits: RelayLimits, now: Instant) -> Self {
        Allowance {
            limits,
            bucket: TokenBucket::new(
                limits.burst_bytes.max(frame_cost(MAX_RELAY_PACKET)) as f64,
                limits.rate_bytes_per_s as f64,
                now,
            ),
            sent: 0,
            window_start: now,
        }
    }

    /// Charges `cost` bytes if the quota and the bucket allow it.
    pub fn charge(&mut self, cost: u64, now: Instant) -> Result<(), Refusal> {
        if now.saturating_duration_since(self.window_start) >= QUOTA_WINDOW {
            self.window_start = now;
            self.sent = 0;
        }
        if self.limits.quota_bytes > 0 && self.sent + cost > self.limits.quota_bytes {
            return Err(Refusal::Quota);
        }
        if !self.bucket.try_take_n(cost as f64, now) {
            return Err(Refusal::Rate);
        }
        self.sent += cost;
        Ok(())
    }

    fn window_over(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.window_start) >= QUOTA_WINDOW
    }
}

/// Allowances by peer id, so that a peer's limits survive its relay streams and connections.
/// At most [`MAX_ALLOWANCES`] entries: when full, entries no session uses and whose quota window
/// is over are dropped, and if that is not enough every entry no session uses (more than the
/// connection limit's worth of sessions cannot be open). A sweep runs only when the map is full
/// and at least halves it, so its cost is amortized O(1) per new peer.
#[derive(Debug, Default)]
pub struct Allowances {
    map: HashMap<PeerId, Arc<Mutex<Allowance>>>,
}

impl Allowances {
    /// `peer`'s allowance, created full if it has none.
    pub fn get(
        &mut self,
        peer: PeerId,
        limits: RelayLimits,
        now: Instant,
    ) -> Arc<Mutex<Allowance>> {
        if let Some(a) = self.map.get(&peer) {
            return a.clone();
        }
        if self.map.len() >= MAX_ALLOWANCES {
            self.map
                .retain(|_, a| Arc::strong_count(a) > 1 || !lock(a).window_over(now));
            if self.map.len() >= MAX_ALLOWANCES / 2 {
                self.map.retain(|_, a| Arc::strong_count(a) > 1);
            }
        }
        let a = Arc::new(Mutex::new(Allowance::new(limits, now)));
        self.map.insert(peer, a.clone());
        a
    }

    /// Peers remembered.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Locks `m`, poisoned or not (the relay's state stays usable after a panicking thread).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Frames for one destination, already encoded with the sender's id.
#[derive(Debug, Default)]
pub struct Batch {
    /// The encoded frames.
    pub frames: Vec<u8>,
    /// How many.
    pub packets: u64,
    /// Packet bytes (what the peers sent), for the counters.
    pub bytes: u64,
    /// Sum of the frames' costs.
    pub cost: u64,
}

impl Batch {
    /// Appends `packet`'s frame from `from`, costing `cost`.
    pub(crate) fn push(&mut self, from: &PeerId, packet: &[u8], cost: u64) {
        // The decoder capped the packet's size, so encoding cannot fail.
        if relay::encode_into(&mut self.frames, from, packet).is_ok() {
            self.packets += 1;
            self.bytes += packet.len() as u64;
            self.cost += cost;
        }
    }

    fn append(&mut self, other: Batch) {
        self.frames.extend_from_slice(&other.frames);
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.cost += other.cost;
    }

    /// What the batch is charged in a destination's queue: its frames' costs or its allocation,
    /// whichever is more, plus [`BATCH_OVERHEAD`].
    pub fn charge(&self) -> usize {
        (self.cost as usize).max(self.frames.capacity()) + BATCH_OVERHEAD
    }

    fn memory(&self) -> usize {
        self.frames.capacity()
    }
}

/// Packets waiting for the accept of one destination's introduction.
#[derive(Debug)]
struct Held {
    to: PeerId,
    batch: Batch,
    since: Instant,
}

/// One relay stream's logic, without I/O: decodes what the peer sends, admits each frame
/// (consent, rate, quota, size), holds packets awaiting an accept, and batches the rest by
/// destination. Time is passed in.
#[derive(Debug)]
pub struct RelaySession {
    peer: PeerId,
    decoder: RelayDecoder,
    allowance: Arc<Mutex<Allowance>>,
    permissions: HashMap<PeerId, (Instant, Permission)>,
    batches: HashMap<PeerId, Batch>,
    held: Vec<Held>,
}

impl RelaySession {
    /// How long an answer about a destination's permission is reused (answers are forgotten at
    /// once by [`RelaySession::consent_changed`]).
    pub const RECHECK: Duration = Duration::from_secs(5);
    /// Destinations whose permission is remembered before that memory is cleared.
    pub const MAX_CHECKED: usize = 1024;
    /// Distinct destinations one call of [`RelaySession::receive`] batches for; frames to more
    /// in the same read are dropped (counted as `queue_full`).
    pub const MAX_DESTINATIONS: usize = 256;
    /// Most bytes the session holds between two calls of [`RelaySession::take_batches`], when
    /// each call of [`RelaySession::receive`] brings at most [`READ_CHUNK`] bytes, as counted by
    /// [`RelaySession::memory`] (allocation sizes): the decoder's buffer (one read and one
    /// partial frame, twice over for vector growth), the batches of one read (the same, plus
    /// flushed held packets and the map), packets held for accepts, and the permission cache.
    /// About 650 KiB.
    pub const MEMORY_BOUND: usize = 2 * (READ_CHUNK + FRAME_HEADER + MAX_RELAY_PACKET)
        + 2 * (READ_CHUNK + FRAME_HEADER + MAX_RELAY_PACKET)
        + 2 * HOLD_PAIRS * 2 * HOLD_BYTES
        + Self::MAX_DESTINATIONS * 8
        + 2 * Self::MAX_DESTINATIONS * (std::mem::size_of::<(PeerId, Batch)>() + 1)
        + 2 * Self::MAX_CHECKED * (std::mem::size_of::<(PeerId, (Instant, Permission))>() + 1)
        + HOLD_PAIRS * std::mem::size_of::<Held>();

    /// A session of `peer`, charging `allowance`.
    pub fn new(peer: PeerId, allowance: Arc<Mutex<Allowance>>) -> Self {
        RelaySession {
            peer,
            decoder: RelayDecoder::new(),
            allowance,
            permissions: HashMap::new(),
            batches: HashMap::new(),
            held: Vec::new(),
        }
    }

    /// Takes bytes read from the relay stream (at most [`READ_CHUNK`] per call for the memory
    /// bound to hold). `permission` answers whether the peer may relay to a destination (asked
    /// at most every [`RelaySession::RECHECK`] per destination). An error means the stream
    /// cannot be trusted any more: close it.
    pub fn receive(
        &mut self,
        bytes: &[u8],
        now: Instant,
        counters: &RelayCounters,
        mut permission: impl FnMut(PeerId) -> Permission,
    ) -> Result<(), RelayFrameError> {
        if self.batches.is_empty() && self.batches.capacity() > 2 * Self::MAX_DESTINATIONS {
            self.batches = HashMap::new();
        }
        self.poll(now, counters, &mut permission);
        self.decoder.push(bytes);
        let allowance = self.allowance.clone();
        let mut allowance = lock(&allowance);
        loop {
            let (to, packet) = match self.decoder.next_frame_ref() {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            };
            let cost = frame_cost(packet.len());
            if packet.is_empty() {
                // Refused, but still charged: a flood of empty frames runs into the rate limit.
                let _ = allowance.charge(cost, now);
                add(&counters.dropped_empty, 1);
                continue;
            }
            let answer = cached_permission(&mut self.permissions, to, now, &mut permission);
            if answer == Permission::Denied {
                add(&counters.denied_not_introduced, 1);
                continue;
            }
            if answer == Permission::AwaitingAccept && !room_to_hold(&self.held, to, cost) {
                add(&counters.dropped_not_accepted, 1);
                continue;
            }
            match allowance.charge(cost, now) {
                Ok(()) => {}
                Err(Refusal::Quota) => {
                    add(&counters.denied_quota, 1);
                    continue;
                }
                Err(_) => {
                    add(&counters.denied_rate, 1);
                    continue;
                }
            }
            if answer == Permission::Allowed
                && self.batches.len() >= Self::MAX_DESTINATIONS
                && !self.batches.contains_key(&to)
            {
                add(&counters.dropped_queue_full, 1);
                continue;
            }
            let batch = if answer == Permission::Allowed {
                self.batches.entry(to).or_default()
            } else {
                match self.held.iter().position(|h| h.to == to) {
                    Some(i) => &mut self.held[i].batch,
                    None => {
                        self.held.push(Held {
                            to,
                            batch: Batch::default(),
                            since: now,
                        });
                        let last = self.held.len() - 1;
                        &mut self.held[last].batch
                    }
                }
            };
            if answer != Permission::Allowed {
                add(&counters.held_now, 1);
            }
            batch.push(&self.peer, packet, cost);
        }
    }

    /// A destination's consent may have changed (an introduction of this peer was accepted):
    /// forget the remembered answers so that the next look asks again.
    pub fn consent_changed(&mut self) {
        self.permissions.clear();
    }

    /// Moves held packets whose introduction has been accepted to the batches, and drops those
    /// held for longer than [`HOLD_TIME`] or whose introduction is gone.
    pub fn poll(
        &mut self,
        now: Instant,
        counters: &RelayCounters,
        mut permission: impl FnMut(PeerId) -> Permission,
    ) {
        let mut i = 0;
        while i < self.held.len() {
            let to = self.held[i].to;
            let answer = cached_permission(&mut self.permissions, to, now, &mut permission);
            let expired = now.saturating_duration_since(self.held[i].since) >= HOLD_TIME;
            if answer == Permission::Allowed || expired || answer == Permission::Denied {
                sub(&counters.held_now, self.held[i].batch.packets);
            }
            match answer {
                Permission::Allowed => {
                    let held = self.held.swap_remove(i);
                    add(&counters.held_then_forwarded, held.batch.packets);
                    // Held packets go before anything newer to the same destination.
                    let newer = self.batches.remove(&to);
                    let mut batch = held.batch;
                    if let Some(newer) = newer {
                        batch.append(newer);
                    }
                    self.batches.insert(to, batch);
                }
                Permission::AwaitingAccept if !expired => i += 1,
                Permission::AwaitingAccept => {
                    let held = self.held.swap_remove(i);
                    add(&counters.dropped_not_accepted, held.batch.packets);
                }
                Permission::Denied => {
                    let held = self.held.swap_remove(i);
                    add(&counters.denied_not_introduced, held.batch.packets);
                }
            }
        }
    }

    /// When [`RelaySession::poll`] must run next (the oldest held packets' deadline).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.held.iter().map(|h| h.since + HOLD_TIME).min()
    }

    /// The batches gathered since the last call, by destination: forward each to its
    /// destination's [`Sink`].
    pub fn take_batches(&mut self) -> impl Iterator<Item = (PeerId, Batch)> + '_ {
        self.batches.drain()
    }

    /// Bytes the session holds now (allocation sizes): the decoder's buffer, pending batches,
    /// held packets and the permission cache.
    pub fn memory(&self) -> usize {
        self.decoder.capacity()
            + self.batches.values().map(Batch::memory).sum::<usize>()
            + self.batches.capacity() * (std::mem::size_of::<(PeerId, Batch)>() + 1)
            + self.held.iter().map(|h| h.batch.memory()).sum::<usize>()
            + self.held.capacity() * std::mem::size_of::<Held>()
            + self.permissions.capacity()
                * (std::mem::size_of::<(PeerId, (Instant, Permission))>() + 1)
    }

    /// Packets held for accepts now.
    pub fn held_packets(&self) -> u64 {
        self.held.iter().map(|h| h.batch.packets).sum()
    }
}

fn cached_permission(
    cache: &mut HashMap<PeerId, (Instant, Permission)>,
    to: PeerId,
    now: Instant,
    ask: &mut impl FnMut(PeerId) -> Permission,
) -> Permission {
    match cache.get(&to) {
        Some((at, answer)) if now.saturating_duration_since(*at) < RelaySession::RECHECK => *answer,
        _ => {
            let answer = ask(to);
            if cache.len() >= RelaySession::MAX_CHECKED {
                cache.clear();
            }
            cache.insert(to, (now, answer));
            answer
        }
    }
}

fn room_to_hold(held: &[Held], to: PeerId, cost: u64) -> bool {
    match held.iter().find(|h| h.to == to) {
        Some(h) => {
            (h.batch.packets as usize) < HOLD_PACKETS && h.batch.cost + cost <= HOLD_BYTES as u64
        }
        None => held.len() < HOLD_PAIRS,
    }
}

/// A destination's queue: batches in a channel to its writer, bounded by the bytes they are
/// charged ([`Batch::charge`]), counted from the moment they are queued until the writer has
/// handed them to QUIC.
#[derive(Debug, Clone)]
pub struct Sink {
    session: u64,
    tx: mpsc::Sender<Batch>,
    queued: Arc<AtomicUsize>,
    limit: usize,
    consent: Arc<Notify>,
}

/// Why a batch was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The queue is over its byte limit.
    QueueFull,
    /// The destination's relay stream is gone.
    Closed,
}

impl Sink {
    /// A queue of at most `limit_bytes` bytes and the receiving end for its writer.
    pub fn new(limit_bytes: usize) -> (Sink, mpsc::Receiver<Batch>) {
        // Every batch is charged at least this much, so the channel never holds more batches;
        // tokio allocates channel blocks as they are used, not up front.
        let slots = (limit_bytes / (MIN_FRAME_COST as usize + BATCH_OVERHEAD)).max(1);
        let (tx, rx) = mpsc::channel(slots);
        let sink = Sink {
            session: 0,
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
            limit: limit_bytes,
            consent: Arc::new(Notify::new()),
        };
        (sink, rx)
    }

    /// Queues `batch` if it fits under the byte limit.
    pub fn offer(&self, batch: Batch) -> Result<(), (Dropped, Batch)> {
        let charge = batch.charge();
        let limit = self.limit;
        let reserved = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q + charge <= limit).then_some(q + charge)
            });
        if reserved.is_err() {
            return Err((Dropped::QueueFull, batch));
        }
        match self.tx.try_send(batch) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(batch)) => {
                self.queued.fetch_sub(charge, Ordering::AcqRel);
                Err((Dropped::QueueFull, batch))
            }
            Err(mpsc::error::TrySendError::Closed(batch)) => {
                self.queued.fetch_sub(charge, Ordering::AcqRel);
                Err((Dropped::Closed, batch))
            }
        }
    }

    /// The writer has handed `batch` to QUIC (or given up on it): its bytes leave the queue.
    pub fn written(&self, batch: &Batch) {
        self.queued.fetch_sub(batch.charge(), Ordering::AcqRel);
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// The byte limit.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// All open relay streams, by peer, and the peers' allowances.
#[derive(Default)]
pub(crate) struct RelayHub {
    sinks: Mutex<HashMap<PeerId, Sink>>,
    /// Connections that have a relay stream (one each).
    conns: Mutex<HashSet<u64>>,
    allowances: Mutex<Allowances>,
    next_session: AtomicU64,
    pub(crate) counters: RelayCounters,
    trace: Option<Mutex<std::fs::File>>,
    trace_left: AtomicU64,
    /// The node links of a cluster node (`--cluster-link`): where batches for peers on other
    /// nodes go.
    links: std::sync::OnceLock<Arc<crate::nodelink::Links>>,
}

/// Most bytes written to the relay trace file.
const TRACE_CAP: u64 = 16 * 1024 * 1024;

/// A relay stream admitted by [`RelayHub::open`]; closing it (dropping) frees the connection's
/// relay slot and unlinks its queue.
pub(crate) struct Opened {
    hub: Arc<RelayHub>,
    peer: PeerId,
    conn: u64,
    sink: Sink,
    rx: Option<mpsc::Receiver<Batch>>,
    session: RelaySession,
}

impl Drop for Opened {
    fn drop(&mut self) {
        sub(&self.hub.counters.held_now, self.session.held_packets());
        lock(&self.hub.conns).remove(&self.conn);
        let mut sinks = lock(&self.hub.sinks);
        if sinks
            .get(&self.peer)
            .is_some_and(|s| s.session == self.sink.session)
        {
            sinks.remove(&self.peer);
        }
    }
}

impl RelayHub {
    /// A hub; with `trace`, every relayed packet is also appended to that file (capped), so
    /// that an operator or a test can inspect exactly what the server handles.
    pub(crate) fn new(trace: Option<std::fs::File>) -> Self {
        RelayHub {
            trace: trace.map(Mutex::new),
            trace_left: AtomicU64::new(TRACE_CAP),
            ..RelayHub::default()
        }
    }

    /// Opens `peer`'s relay stream on connection `conn`; `None` if that connection already has
    /// one (counted). A newer stream of the same peer (from a newer connection) takes over the
    /// peer's queue.
    pub(crate) fn open(
        self: &Arc<Self>,
        peer: PeerId,
        conn: u64,
        limits: RelayLimits,
    ) -> Option<Opened> {
        if !lock(&self.conns).insert(conn) {
            add(&self.counters.refused_streams, 1);
            return None;
        }
        let allowance = lock(&self.allowances).get(peer, limits, Instant::now());
        let (mut sink, rx) = Sink::new(limits.queue_bytes);
        sink.session = self.next_session.fetch_add(1, Ordering::Relaxed);
        lock(&self.sinks).insert(peer, sink.clone());
        add(&self.counters.sessions, 1);
        Some(Opened {
            hub: self.clone(),
            peer,
            conn,
            sink,
            rx: Some(rx),
            session: RelaySession::new(peer, allowance),
        })
    }

    /// Batches for peers that have no relay stream here go to their node over these links.
    pub(crate) fn set_links(&self, links: Arc<crate::nodelink::Links>) {
        let _ = self.links.set(links);
    }

    /// Relay frames (`{from, packet}`) that came over a node link for `to`, a peer here: each
    /// frame is admitted as a local one would be (`allowed(from)`: the sender is introduced to
    /// `to` with its accept, and on the node the link comes from), charged against the
    /// sender's allowance on this node too, and queued for `to`. Returns the packets and bytes
    /// queued, also added to `counted` (packets, bytes) and the relay's counters before they
    /// are queued (once queued they may reach `to` before this thread goes on).
    pub(crate) fn deliver_from_link(
        &self,
        to: PeerId,
        frames: &[u8],
        limits: RelayLimits,
        counted: [&AtomicU64; 2],
        mut allowed: impl FnMut(PeerId) -> bool,
    ) -> (u64, u64) {
        let now = Instant::now();
        let mut decoder = RelayDecoder::new();
        decoder.push(frames);
        let Some(sink) = self.sink_of(&to) else {
            while let Ok(Some(_)) = decoder.next_frame_ref() {
                add(&self.counters.dropped_no_route, 1);
            }
            return (0, 0);
        };
        let mut answers: HashMap<PeerId, bool> = HashMap::new();
        let mut batch = Batch::default();
        // Nodes encode whole frames; a bad one ends the batch.
        while let Ok(Some((from, packet))) = decoder.next_frame_ref() {
            let cost = frame_cost(packet.len());
            if packet.is_empty() {
                add(&self.counters.dropped_empty, 1);
                continue;
            }
            if !*answers.entry(from).or_insert_with(|| allowed(from)) {
                add(&self.counters.denied_not_introduced, 1);
                continue;
            }
            let allowance = lock(&self.allowances).get(from, limits, now);
            let charged = lock(&allowance).charge(cost, now);
            match charged {
                Ok(()) => batch.push(&from, packet, cost),
                Err(Refusal::Quota) => add(&self.counters.denied_quota, 1),
                Err(_) => add(&self.counters.denied_rate, 1),
            }
        }
        if batch.packets == 0 {
            return (0, 0);
        }
        let (packets, bytes) = (batch.packets, batch.bytes);
        if self.trace.is_some() {
            self.trace(&batch.frames);
        }
        let [counted_packets, counted_bytes] = counted;
        for (counter, n) in [
            (&self.counters.packets, packets),
            (&self.counters.bytes, bytes),
            (counted_packets, packets),
            (counted_bytes, bytes),
        ] {
            add(counter, n);
        }
        let dropped = match sink.offer(batch) {
            Ok(()) => return (packets, bytes),
            Err((Dropped::QueueFull, _)) => &self.counters.dropped_queue_full,
            Err((Dropped::Closed, _)) => &self.counters.dropped_no_route,
        };
        add(dropped, packets);
        for (counter, n) in [
            (&self.counters.packets, packets),
            (&self.counters.bytes, bytes),
            (counted_packets, packets),
            (counted_bytes, bytes),
        ] {
            sub(counter, n);
        }
        (0, 0)
    }

    /// An introduction between `a` and `b` was made or accepted: their relay sessions look at
    /// their permissions again at once (and flush what they held once it is accepted).
    pub(crate) fn permissions_changed(&self, a: PeerId, b: PeerId) {
        let sinks = lock(&self.sinks);
        for peer in [a, b] {
            if let Some(sink) = sinks.get(&peer) {
                sink.consent.notify_one();
            }
        }
    }

    /// Charges `cost` bytes to `peer`'s allowance (a relay channel's packets: the same bucket
    /// and quota as its relay streams).
    pub(crate) fn charge(
        &self,
        peer: PeerId,
        cost: u64,
        limits: RelayLimits,
        now: Instant,
    ) -> Result<(), Refusal> {
        let allowance = lock(&self.allowances).get(peer, limits, now);
        let charged = lock(&allowance).charge(cost, now);
        charged
    }

    /// Queues `batch` on `to`'s relay stream (a channel's packets for a side that has no
    /// channel bound). Never waits.
    pub(crate) fn offer_to(&self, to: &PeerId, batch: Batch) -> Result<(), Dropped> {
        let Some(sink) = self.sink_of(to) else {
            return Err(Dropped::Closed);
        };
        // Traced by the caller (the channel's packets as they came).
        sink.offer(batch).map_err(|(dropped, _)| dropped)
    }

    fn sink_of(&self, peer: &PeerId) -> Option<Sink> {
        lock(&self.sinks).get(peer).cloned()
    }

    fn trace(&self, frames: &[u8]) {
        if self.trace.is_none() {
            return;
        }
        // Only the packets, as before batching: walk the frames.
        let mut decoder = RelayDecoder::new();
        decoder.push(frames);
        while let Ok(Some((_, packet))) = decoder.next_frame_ref() {
            if !self.trace_packet(packet) {
                return;
            }
        }
    }

    /// Whether relayed packets are traced (`--relay-trace`).
    pub(crate) fn tracing(&self) -> bool {
        self.trace.is_some()
    }

    /// Appends one relayed packet to the trace (a relay channel's, or a frame's); false once
    /// the trace is full.
    pub(crate) fn trace_packet(&self, packet: &[u8]) -> bool {
        let Some(file) = &self.trace else {
            return false;
        };
        let len = packet.len() as u64;
        if self.trace_left.load(Ordering::Relaxed) < len {
            return false;
        }
        self.trace_left.fetch_sub(len, Ordering::Relaxed);
        if let Ok(mut file) = file.lock() {
            let _ = file.write_all(packet);
        }
        true
    }
}

/// Runs a relay stream until it ends: reads chunks of at most [`READ_CHUNK`] from quinn into
/// the [`RelaySession`], and forwards its batches. `permission` answers whether the peer may relay
/// to a destination now.
pub(crate) async fn run(
    mut opened: Opened,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    permission: impl Fn(PeerId) -> Permission,
) {
    let hub = opened.hub.clone();
    let peer = opened.peer;
    let Some(mut rx) = opened.rx.take() else {
        return;
    };
    // The writer runs apart so that a peer slow to read what it is sent never stops us reading
    // (and forwarding) what it sends.
    let sink = opened.sink.clone();
    let writer = tokio::spawn(async move {
        while let Some(batch) = rx.recv().await {
            let written = send.write_all(&batch.frames).await;
            sink.written(&batch);
            if written.is_err() {
                break;
            }
        }
        // Whatever is left leaves the queue's account with the stream.
        while let Ok(batch) = rx.try_recv() {
            sink.written(&batch);
        }
    });

    let consent = opened.sink.consent.clone();
    let mut routes: HashMap<PeerId, Sink> = HashMap::new();
    loop {
        let deadline = opened.session.next_deadline();
        tokio::select! {
            // Chunks straight from quinn's buffer: no read buffer of our own per session.
            read = recv.read_chunk(READ_CHUNK, true) => {
                let chunk = match read {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) | Err(_) => break,
                };
                if let Err(e) = opened.session.receive(&chunk.bytes, Instant::now(), &hub.counters, &permission) {
                    tracing::warn!(%peer, error = %e, "bad relay frame; closing the relay stream");
                    break;
                }
            }
            _ = consent.notified() => {
                opened.session.consent_changed();
                opened.session.poll(Instant::now(), &hub.counters, &permission);
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now).into()), if deadline.is_some() => {
                opened.session.poll(Instant::now(), &hub.counters, &permission);
            }
        }
        let batches: Vec<(PeerId, Batch)> = opened.session.take_batches().collect();
        for (to, batch) in batches {
            forward(&hub, &mut routes, to, batch);
        }
    }
    writer.abort();
}

/// Queues `batch` for `to`'s relay stream, counting what is forwarded and what is dropped.
fn forward(hub: &RelayHub, routes: &mut HashMap<PeerId, Sink>, to: PeerId, batch: Batch) {
    let sink = match routes.get(&to) {
        Some(sink) => sink.clone(),
        None => match hub.sink_of(&to) {
            Some(sink) => {
                if routes.len() >= RelaySession::MAX_CHECKED {
                    routes.clear();
                }
                routes.insert(to, sink.clone());
                sink
            }
            None => {
                // Not here: on another node of the cluster, if an introduction taught where.
                // Counted before it is queued (it may arrive before this thread goes on).
                let (packets, bytes) = (batch.packets, batch.bytes);
                add(&hub.counters.packets, packets);
                add(&hub.counters.bytes, bytes);
                let sent = match hub.links.get() {
                    Some(links) => links.forward(to, batch),
                    None => Err(Dropped::Closed),
                };
                if let Err(dropped) = sent {
                    sub(&hub.counters.packets, packets);
                    sub(&hub.counters.bytes, bytes);
                    add(
                        match dropped {
                            Dropped::QueueFull => &hub.counters.dropped_queue_full,
                            Dropped::Closed => &hub.counters.dropped_no_route,
                        },
                        packets,
                    );
                }
                return;
            }
        },
    };
    let (packets, bytes) = (batch.packets, batch.bytes);
    if hub.trace.is_some() {
        hub.trace(&batch.frames);
    }
    match sink.offer(batch) {
        Ok(()) => {
            add(&hub.counters.packets, packets);
            add(&hub.counters.bytes, bytes);
        }
        Err((Dropped::QueueFull, _)) => add(&hub.counters.dropped_queue_full, packets),
        Err((Dropped::Closed, _)) => {
            // The destination's stream went away; look it up again next time.
            routes.remove(&to);
            add(&hub.counters.dropped_no_route, packets);
        }
    }
}

/// Drives a [`RelaySession`] and its destinations' [`Sink`]s from an arbitrary script and
/// panics if a bound breaks: the body of the relay hub's fuzz target (and of a property test).
///
/// The script is read as operations, one byte each and their arguments, until it runs out:
/// `0 len:u16 bytes..` raw bytes from the stream (at most [`READ_CHUNK`]); `1 dest len:u16`
/// a well-formed frame of `len % (MAX_RELAY_PACKET + 1)` bytes to one of 8 destinations;
/// `2 ms` the clock moves `ms * 20` milliseconds; `3 dest answer` a destination's permission
/// changes (allowed, awaiting accept, denied; the session is told); `4 dest` a destination's
/// writer drains its queue; anything else polls the session. After every operation the session
/// holds at most [`RelaySession::MEMORY_BOUND`] and every queue at most its limit.
pub fn run_script(script: &[u8]) {
    const DESTINATIONS: usize = 8;
    let dest = |n: u8| {
        let mut digest = [0u8; 32];
        digest[0] = n % DESTINATIONS as u8 + 1;
        PeerId::from_key_digest(&digest)
    };
    let sender = PeerId::from_key_digest(&[0xee; 32]);
    let t0 = Instant::now();
    let limits = RelayLimits {
        queue_bytes: 32 * 1024,
        ..RelayLimits::default()
    };
    let counters = RelayCounters::default();
    let mut session = RelaySession::new(sender, Arc::new(Mutex::new(Allowance::new(limits, t0))));
    let mut sinks: Vec<(Sink, mpsc::Receiver<Batch>)> = (0..DESTINATIONS)
        .map(|_| Sink::new(limits.queue_bytes))
        .collect();
    let mut answers = [Permission::Allowed; DESTINATIONS];
    let mut now = t0;
    let mut closed = false;
    let mut input = script.iter().copied();
    let mut next = move || input.next();
    while let Some(op) = next() {
        let permission = |to: PeerId| {
            (0..DESTINATIONS as u8)
                .find(|&i| dest(i) == to)
                .map_or(Permission::Denied, |i| answers[i as usize])
        };
        match op % 6 {
            0 | 1 => {
                let mut bytes = Vec::new();
                if op % 6 == 0 {
                    let len = u16::from_be_bytes([next().unwrap_or(0), next().unwrap_or(0)]);
                    for _ in 0..len.min(READ_CHUNK as u16) {
                        bytes.push(next().unwrap_or(0));
                    }
                } else {
                    let to = dest(next().unwrap_or(0));
                    let len = u16::from_be_bytes([next().unwrap_or(0), next().unwrap_or(0)]);
                    let packet = vec![0xab; len as usize % (MAX_RELAY_PACKET + 1)];
                    let _ = relay::encode_into(&mut bytes, &to, &packet);
                }
                if !closed && session.receive(&bytes, now, &counters, permission).is_err() {
                    // The driver closes the stream here; the bounds must still hold.
                    closed = true;
                }
            }
            2 => now += Duration::from_millis(u64::from(next().unwrap_or(0)) * 20),
            3 => {
                let i = next().unwrap_or(0) as usize % DESTINATIONS;
                answers[i] = match next().unwrap_or(0) % 3 {
                    0 => Permission::Allowed,
                    1 => Permission::AwaitingAccept,
                    _ => Permission::Denied,
                };
                session.consent_changed();
            }
            4 => {
                let (sink, rx) = &mut sinks[next().unwrap_or(0) as usize % DESTINATIONS];
                while let Ok(batch) = rx.try_recv() {
                    sink.written(&batch);
                }
            }
            _ => session.poll(now, &counters, permission),
        }
        let batches: Vec<(PeerId, Batch)> = session.take_batches().collect();
        for (to, batch) in batches {
            let i = (0..DESTINATIONS as u8)
                .find(|&i| dest(i) == to)
                .expect("batches only for known destinations");
            let _ = sinks[i as usize].0.offer(batch);
        }
        assert!(
            session.memory() <= RelaySession::MEMORY_BOUND,
            "session memory {} over its bound {}",
            session.memory(),
            RelaySession::MEMORY_BOUND
        );
        for (sink, _) in &sinks {
            assert!(sink.queued_bytes() <= sink.limit(), "queue over its limit");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u8) -> PeerId {
        PeerId::from_key_digest(&[n; 32])
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    fn limits() -> RelayLimits {
        RelayLimits::default()
    }

    fn session(limits: RelayLimits, t0: Instant) -> RelaySession {
        RelaySession::new(id(1), Arc::new(Mutex::new(Allowance::new(limits, t0))))
    }

    fn frames(to: PeerId, sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        for &n in sizes {
            relay::encode_into(&mut out, &to, &vec![7u8; n]).unwrap();
        }
        out
    }

    fn allowed(_: PeerId) -> Permission {
        Permission::Allowed
    }

    #[test]
    fn frames_are_batched_by_destination_and_every_frame_costs_at_least_the_minimum() {
        let t0 = Instant::now();
        let counters = RelayCounters::default();
        let mut s = session(limits(), t0);
        let mut wire = frames(id(2), &[1, 1000]);
        wire.extend(frames(id(3), &[10]));
        s.receive(&wire, t0, &counters, allowed).unwrap();
        let mut batches: Vec<(PeerId, Batch)> = s.take_batches().collect();
        batches.sort_by_key(|(to, _)| *to == id(3));
        assert_eq!(batches.len(), 2);
        let (to, b) = &batches[0];
        assert_eq!(*to, id(2));
        assert_eq!((b.packets, b.bytes), (2, 1001));
        assert_eq!(
            b.cost,
            MIN_FRAME_COST + 1018,
            "a 1-byte packet costs the minimum"
        );
        assert_eq!(batches[1].1.cost, MIN_FRAME_COST);
        // The frames name the sender.
        let mut dec = RelayDecoder::new();
        dec.push(&b.frames);
        assert_eq!(dec.next_frame().unwrap().unwrap().0, id(1));
    }

    #[test]
    fn empty_packets_are_refused_counted_and_charged() {
        let t0 = Instant::now();
        let counters = RelayCounters::default();
        let tight = RelayLimits {
            rate_bytes_per_s: 1,
            burst_bytes: 10 * MIN_FRAME_COST,
            ..limits()
        };
        // The burst is at least one full frame's cost.
        let burst = tight.burst_bytes.max(frame_cost(MAX_RELAY_PACKET));
        let mut s = session(tight, t0);
        let n = (burst / MIN_FRAME_COST) as usize;
        s.receive(&frames(id(2), &vec![0; n]), t0, &counters, allowed)
            .unwrap();
        assert_eq!(get(&counters.dropped_empty), n as u64);
        assert_eq!(s.take_batches().count(), 0);
        // They used up the bucket: a real packet is now over the rate.
        s.receive(&frames(id(2), &[100]), t0, &counters, allowed)
            .unwrap();
        assert_eq!(get(&counters.denied_rate), 1);
    }

    #[test]
    fn rate_limit_and_quota_count_frame_costs() {
        let t0 = Instant::now();
        let tight = RelayLimits {
            rate_bytes_per_s: 10_000,
            burst_bytes: 4_036,
            quota_bytes: 20_180,
            ..limits()
        };
        let mut a = Allowance::new(tight, t0);
        let cost = frame_cost(2000);
        assert_eq!(cost, 2018);
        assert_eq!(a.charge(cost, t0), Ok(()));
        assert_eq!(a.charge(cost, t0), Ok(()));
        assert_eq!(a.charge(cost, t0), Err(Refusal::Rate));
        let mut now = t0 + Duration::from_millis(300);
        assert_eq!(a.charge(cost, now), Ok(()));
        let mut sent = 3 * cost;
        while sent + cost <= tight.quota_bytes {
            now += Duration::from_secs(1);
            assert_eq!(a.charge(cost, now), Ok(()));
            sent += cost;
        }
        now += Duration::from_secs(10);
        assert_eq!(a.charge(cost, now), Err(Refusal::Quota));
        // A new window, a new quota.
        assert_eq!(a.charge(cost, now + QUOTA_WINDOW), Ok(()));
    }

    #[test]
    fn the_bucket_is_per_peer_across_streams_and_connections() {
        let hub = Arc::new(RelayHub::new(None));
        let tight = RelayLimits {
            rate_bytes_per_s: 1,
            burst_bytes: 3 * frame_cost(MAX_RELAY_PACKET),
            ..limits()
        };
        let counters = RelayCounters::default();
        let t0 = Instant::now();
        let wire = frames(id(2), &[MAX_RELAY_PACKET; 2]);
        let mut first = hub.open(id(1), 10, tight).unwrap();
        first
            .session
            .receive(&wire, t0, &counters, allowed)
            .unwrap();
        drop(first);
        // The same peer on a new connection: its bucket did not refill.
        let mut second = hub.open(id(1), 11, tight).unwrap();
        second
            .session
            .receive(&wire, t0, &counters, allowed)
            .unwrap();
        assert_eq!(get(&counters.denied_rate), 1);
        assert_eq!(lock(&hub.allowances).len(), 1);
    }

    #[test]
    fn one_relay_stream_per_connection() {
        let hub = Arc::new(RelayHub::new(None));
        let first = hub.open(id(1), 10, limits()).unwrap();
        assert!(hub.open(id(1), 10, limits()).is_none());
        assert_eq!(get(&hub.counters.refused_streams), 1);
        // Another connection of the same peer may (it replaces the first's queue).
        let other = hub.open(id(1), 11, limits()).unwrap();
        drop(first);
        assert!(
            hub.sink_of(&id(1)).is_some(),
            "the newer stream keeps its queue"
        );
        // Once closed, the connection may open one again.
        assert!(hub.open(id(1), 10, limits()).is_some());
        drop(other);
    }

    #[test]
    fn allowances_are_bounded() {
        let mut all = Allowances::default();
        let t0 = Instant::now();
        let kept = all.get(id(0), limits(), t0);
        for i in 0..(MAX_ALLOWANCES as u32 + 10) {
            let mut bytes = [0u8; 32];
            bytes[..4].copy_from_slice(&i.to_be_bytes());
            bytes[4] = 1;
            all.get(PeerId::from_key_digest(&bytes), limits(), t0);
            assert!(all.len() <= MAX_ALLOWANCES);
        }
        // The one in use survived the sweep.
        assert!(Arc::ptr_eq(&kept, &all.get(id(0), limits(), t0)));
    }

    #[test]
    fn a_destination_queue_is_bounded_in_bytes() {
        let (sink, mut rx) = Sink::new(10_000);
        let t0 = Instant::now();
        let counters = RelayCounters::default();
        let mut s = session(limits(), t0);
        let mut queued = 0;
        let mut dropped = 0;
        for _ in 0..50 {
            s.receive(&frames(id(2), &[1200]), t0, &counters, allowed)
                .unwrap();
            for (_, batch) in s.take_batches().collect::<Vec<_>>() {
                match sink.offer(batch) {
                    Ok(()) => queued += 1,
                    Err((Dropped::QueueFull, _)) => dropped += 1,
                    Err(e) => panic!("{e:?}"),
                }
                assert!(sink.queued_bytes() <= 10_000);
            }
        }
        assert!(queued >= 5 && dropped > 0, "{queued} {dropped}");
        // The writer takes them off: room again.
        while let Ok(b) = rx.try_recv() {
            sink.written(&b);
        }
        assert_eq!(sink.queued_bytes(), 0);
        // Tiny packets are charged the minimum: a queue of N bytes holds far fewer than N/1
        // one-byte packets.
        let (small, _rx) = Sink::new(4096);
        let mut n = 0;
        loop {
            let mut b = Batch::default();
            b.push(&id(1), &[1], frame_cost(1));
            if small.offer(b).is_err() {
                break;
            }
            n += 1;
        }
        assert!(
            n <= 4096 / (MIN_FRAME_COST as usize + BATCH_OVERHEAD),
            "{n}"
        );
    }

    #[test]
    fn no_relay_before_the_accept_held_packets_flushed_after_it() {
        let t0 = Instant::now();
        let counters = RelayCounters::default();
        let mut s = session(limits(), t0);
        let mut answer = Permission::AwaitingAccept;
        s.receive(&frames(id(2), &[1200, 1200]), t0, &counters, |_| answer)
            .unwrap();
        assert_eq!(
            s.take_batches().count(),
            0,
            "nothing forwarded before the accept"
        );
        assert_eq!(s.held_packets(), 2);
        assert_eq!(s.next_deadline(), Some(t0 + HOLD_TIME));
        // The accept comes; the cached "awaiting" answer does not block it.
        answer = Permission::Allowed;
        s.consent_changed();
        s.poll(t0 + Duration::from_millis(100), &counters, |_| answer);
        let batches: Vec<_> = s.take_batches().collect();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].1.packets, 2);
        assert_eq!(get(&counters.held_then_forwarded), 2);
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn a_denied_answer_cached_before_the_accept_does_not_block_after_it() {
        let t0 = Instant::now();
        let counters = RelayCounters::default();
        let mut s = session(limits(), t0);
        s.receive(&frames(id(2), &[100]), t0, &counters, |_| {
            Permission::Denied
        })
        .unwrap();
        assert_eq!(get(&counters.denied_not_introduced), 1);
        s.consent_changed();
        s.receive(&frames(id(2), &[100]), t0, &counters, allowed)
            .unwrap();
        assert_eq!(s.take_batches().count(), 1);
    }

    #[test]
    fn held_packets_are_bounded_and_dropped_after_the_hold_time() {
        let t0 = Instant::now();
        let counters = RelayCounters::default();
        let mut s = session(limits(), t0);
        let waiting = |_| Permission::AwaitingAccept;
        s.receive(&frames(id(2), &[100; 20]), t0, &counters, waiting)
            .unwrap();
        assert_eq!(s.held_packets(), HOLD_PACKETS as u64);
        assert_eq!(
            get(&counters.dropped_not_accepted),
            20 - HOLD_PACKETS as u64
        );
        // Bytes too: 16 KiB holds fewer than 8 packets of 2 KiB... (8 * 2066 > 16384).
        s.receive(
            &frames(id(3), &[MAX_RELAY_PACKET; 8]),
            t0,
            &counters,
            waiting,
        )
        .unwrap();
        assert_eq!(s.held_packets(), HOLD_PACKETS as u64 + 7);
        // A few destinations at most.
        for n in 4..10 {
            s.receive(&frames(id(n), &[100]), t0, &counters, waiting)
                .unwrap();
        }
        assert_eq!(s.held.len(), HOLD_PAIRS);
        // No accept in time: all dropped.
        let dropped = get(&counters.dropped_not_accepted);
        let held = s.held_packets();
        s.poll(t0 + HOLD_TIME, &counters, waiting);
        assert_eq!(s.held_packets(), 0);
        assert_eq!(get(&counters.dropped_not_accepted), dropped + held);
        assert_eq!(s.take_batches().count(), 0);
    }

    #[test]
    fn a_heavy_script_keeps_its_bounds() {
        let mut script = Vec::new();
        // Full-size frames to every destination, some awaiting an accept, nobody draining.
        script.extend([3, 1, 1, 3, 2, 2]);
        for i in 0..400u32 {
            script.extend([1, (i % 8) as u8, 0x08, 0x00]);
            if i % 50 == 0 {
                script.extend([2, 60, 5]);
            }
        }
        // One big raw read of back-to-back frames.
        let mut raw = Vec::new();
        while raw.len() < READ_CHUNK - 2100 {
            let mut digest = [0u8; 32];
            digest[0] = (raw.len() % 8) as u8 + 1;
            relay::encode_into(&mut raw, &PeerId::from_key_digest(&digest), &[1; 2000]).unwrap();
        }
        script.push(0);
        script.extend((raw.len() as u16).to_be_bytes());
        script.extend(raw);
        script.extend([3, 1, 0, 5, 4, 0]);
        run_script(&script);
    }

    #[test]
    fn the_stated_memory_bound_is_what_the_docs_say() {
        let bound = RelaySession::MEMORY_BOUND;
        eprintln!("RelaySession::MEMORY_BOUND = {bound} bytes");
        assert!(bound > 600 * 1024 && bound < 700 * 1024, "{bound}");
    }

    #[test]
    fn bad_frames_end_the_session() {
        let t0 = Instant::now();
        let counters = RelayCounters::default();
        let mut s = session(limits(), t0);
        assert!(s.receive(&[0, 3, 1, 2, 3], t0, &counters, allowed).is_err());
    }

    proptest! {
        /// The fuzz target's body, on random scripts (frames are likely enough here: every
        /// other operation writes one).
        #[test]
        fn the_fuzz_script_keeps_its_bounds(script in proptest::collection::vec(any::<u8>(), 0..4000)) {
            run_script(&script);
        }

        /// Whatever a sender writes and whatever the permissions say, a session holds at most
        /// its stated bound and every destination queue stays under its byte limit.
        #[test]
        fn memory_and_queues_stay_bounded(
            chunks in proptest::collection::vec(
                (proptest::collection::vec((0u8..6, 0usize..=MAX_RELAY_PACKET, any::<bool>()), 0..60),
                 0u8..3, 0u64..2000, any::<bool>()),
                1..40),
            garbage in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let t0 = Instant::now();
            let counters = RelayCounters::default();
            let mut s = session(RelayLimits { queue_bytes: 20_000, ..limits() }, t0);
            let mut sinks: Vec<(Sink, mpsc::Receiver<Batch>)> = (0..6).map(|_| Sink::new(20_000)).collect();
            let mut now = t0;
            for (frames_spec, perm, advance_ms, drain) in chunks {
                now += Duration::from_millis(advance_ms);
                let mut wire = Vec::new();
                for (dest, len, empty) in frames_spec {
                    let len = if empty { 0 } else { len };
                    relay::encode_into(&mut wire, &id(dest + 2), &vec![1u8; len]).unwrap();
                }
                let answer = |to: PeerId| match (perm, to == id(2)) {
                    (0, _) => Permission::Allowed,
                    (1, true) => Permission::Denied,
                    _ => Permission::AwaitingAccept,
                };
                for piece in wire.chunks(READ_CHUNK) {
                    if s.receive(piece, now, &counters, answer).is_err() {
                        return Ok(());
                    }
                    prop_assert!(s.memory() <= RelaySession::MEMORY_BOUND, "{}", s.memory());
                    for (to, batch) in s.take_batches().collect::<Vec<_>>() {
                        let i = (0..6).find(|&i| id(i as u8 + 2) == to).unwrap();
                        let _ = sinks[i].0.offer(batch);
                        prop_assert!(sinks[i].0.queued_bytes() <= sinks[i].0.limit());
                    }
                }
                if perm == 0 { s.consent_changed(); }
                s.poll(now, &counters, answer);
                prop_assert!(s.memory() <= RelaySession::MEMORY_BOUND);
                if drain {
                    for (sink, rx) in sinks.iter_mut() {
                        while let Ok(b) = rx.try_recv() {
                            sink.written(&b);
                        }
                    }
                }
            }
            let _ = s.receive(&garbage, now, &counters, allowed);
            prop_assert!(s.memory() <= RelaySession::MEMORY_BOUND);
        }
    }

    /// Packets that came over a node link are admitted as local ones: only from senders the
    /// node allows (introduced and accepted, on the link's node), never empty, charged against
    /// the sender's allowance here too (its rate), and queued for a destination with a relay
    /// stream here (none: dropped, counted).
    #[test]
    fn link_packets_are_admitted_charged_and_queued_like_local_ones() {
        let hub = Arc::new(RelayHub::new(None));
        // A bucket of one maximal frame, refilled at 1 byte/s: the burst is all there is.
        let limits = RelayLimits {
            rate_bytes_per_s: 1,
            burst_bytes: 0,
            ..RelayLimits::default()
        };
        let mut opened = hub.open(id(2), 1, limits).unwrap();
        let mut rx = opened.rx.take().unwrap();
        let mut wire = Vec::new();
        for _ in 0..30 {
            relay::encode_into(&mut wire, &id(1), &[5u8; 100]).unwrap();
        }
        relay::encode_into(&mut wire, &id(3), &[6u8; 100]).unwrap();
        relay::encode_into(&mut wire, &id(1), &[]).unwrap();
        let received = [AtomicU64::new(0), AtomicU64::new(0)];
        let counted = [&received[0], &received[1]];
        let (packets, bytes) =
            hub.deliver_from_link(id(2), &wire, limits, counted, |from| from == id(1));
        let fit = frame_cost(MAX_RELAY_PACKET) / frame_cost(100);
        assert_eq!((packets, bytes), (fit, fit * 100));
        assert_eq!((get(&received[0]), get(&received[1])), (fit, fit * 100));
        let c = &hub.counters;
        assert_eq!(get(&c.denied_rate), 30 - fit);
        assert_eq!(get(&c.denied_not_introduced), 1);
        assert_eq!(get(&c.dropped_empty), 1);
        let batch = rx.try_recv().unwrap();
        let mut decoder = RelayDecoder::new();
        decoder.push(&batch.frames);
        let mut seen = 0;
        while let Some((from, packet)) = decoder.next_frame().unwrap() {
            assert_eq!((from, packet), (id(1), vec![5u8; 100]));
            seen += 1;
        }
        assert_eq!(seen, fit);
        // No relay stream for the destination here.
        assert_eq!(
            hub.deliver_from_link(id(9), &wire, limits, counted, |_| true),
            (0, 0)
        );
        assert_eq!(get(&received[0]), fit);
        assert_eq!(get(&c.dropped_no_route), 32);
    }
}
