//! Relaying between peers that have no direct path: each peer opens one relay stream on its
//! control connection; frames `{to, packet}` it writes are forwarded to the destination's relay
//! stream as `{from, packet}`. The packets are the peers' own end-to-end encrypted QUIC packets.
//!
//! Limits: only between peers introduced to each other; a token bucket (bytes per second) and a
//! byte quota per relay session; one bounded queue per destination that drops when full, so a
//! slow receiver cannot make the server buffer without bound or slow down other peers.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::relay::{self, RelayDecoder, MAX_RELAY_PACKET};
use common::PeerId;
use tokio::sync::mpsc;

use crate::ratelimit::TokenBucket;

/// Relay limits.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// Sustained bytes per second one peer may send through the relay.
    pub rate_bytes_per_s: u64,
    /// Burst, bytes.
    pub burst_bytes: u64,
    /// Bytes one relay session may send in all (0: no quota).
    pub quota_bytes: u64,
    /// Packets queued towards one destination before new ones are dropped.
    pub queue_packets: usize,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            rate_bytes_per_s: 50_000_000,
            burst_bytes: 4_000_000,
            quota_bytes: 50 * 1024 * 1024 * 1024,
            queue_packets: 1024,
        }
    }
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
}

impl RelayCounters {
    /// One line for logs.
    pub fn summary(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "relay: {} sessions, {} packets, {} bytes forwarded; dropped: {} queue full, {} no route, \
             {} not introduced, {} rate, {} quota",
            get(&self.sessions),
            get(&self.packets),
            get(&self.bytes),
            get(&self.dropped_queue_full),
            get(&self.dropped_no_route),
            get(&self.denied_not_introduced),
            get(&self.denied_rate),
            get(&self.denied_quota),
        )
    }
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

/// The per-session admission rules, with time passed in: introduced destinations only (asked
/// again every [`RelayPolicy::RECHECK`]), a token bucket of bytes, a byte quota.
#[derive(Debug)]
pub struct RelayPolicy {
    limits: RelayLimits,
    bucket: TokenBucket,
    sent: u64,
    checked: HashMap<PeerId, (Instant, bool)>,
}

impl RelayPolicy {
    /// How long an answer about a destination's permission is reused.
    pub const RECHECK: Duration = Duration::from_secs(5);
    /// Destinations remembered before the memory is cleared.
    const MAX_CHECKED: usize = 1024;

    /// A fresh session's policy.
    pub fn new(limits: RelayLimits, now: Instant) -> Self {
        RelayPolicy {
            limits,
            bucket: TokenBucket::new(
                limits.burst_bytes.max(MAX_RELAY_PACKET as u64) as f64,
                limits.rate_bytes_per_s as f64,
                now,
            ),
            sent: 0,
            checked: HashMap::new(),
        }
    }

    /// Whether a packet of `len` bytes to `to` may go now; `allowed` answers the permission
    /// question when the remembered answer is stale. Counts the bytes when admitted.
    pub fn admit(
        &mut self,
        to: PeerId,
        len: usize,
        now: Instant,
        allowed: impl FnOnce(PeerId) -> bool,
    ) -> Result<(), Refusal> {
        let permitted = match self.checked.get(&to) {
            Some((at, ok)) if now.saturating_duration_since(*at) < Self::RECHECK => *ok,
            _ => {
                let ok = allowed(to);
                if self.checked.len() >= Self::MAX_CHECKED {
                    self.checked.clear();
                }
                self.checked.insert(to, (now, ok));
                ok
            }
        };
        if !permitted {
            return Err(Refusal::NotIntroduced);
        }
        let len = len as u64;
        if self.limits.quota_bytes > 0 && self.sent + len > self.limits.quota_bytes {
            return Err(Refusal::Quota);
        }
        if !self.bucket.try_take_n(len as f64, now) {
            return Err(Refusal::Rate);
        }
        self.sent += len;
        Ok(())
    }
}

/// Frames for one destination, already encoded with the sender's id, and how many.
struct Batch {
    frames: Vec<u8>,
    packets: u64,
    bytes: u64,
}

/// A destination's queue: batches, bounded by the packets they hold.
#[derive(Clone)]
pub(crate) struct Sink {
    session: u64,
    tx: mpsc::Sender<Batch>,
    queued: Arc<AtomicU64>,
    limit: u64,
}

/// All open relay streams, by peer.
#[derive(Default)]
pub(crate) struct RelayHub {
    sinks: Mutex<HashMap<PeerId, Sink>>,
    next_session: AtomicU64,
    pub(crate) counters: RelayCounters,
    trace: Option<Mutex<std::fs::File>>,
    trace_left: AtomicU64,
}

/// Most bytes written to the relay trace file.
const TRACE_CAP: u64 = 16 * 1024 * 1024;

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

    fn sinks(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Sink>> {
        self.sinks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn sink_of(&self, peer: &PeerId) -> Option<Sink> {
        self.sinks().get(peer).cloned()
    }

    fn trace(&self, packet: &[u8]) {
        let Some(file) = &self.trace else { return };
        let len = packet.len() as u64;
        if self.trace_left.load(Ordering::Relaxed) < len {
            return;
        }
        self.trace_left.fetch_sub(len, Ordering::Relaxed);
        if let Ok(mut file) = file.lock() {
            let _ = file.write_all(packet);
        }
    }
}

/// Runs `peer`'s relay stream until it ends. `allowed` answers whether `peer` may relay to a
/// destination now (asked at most every few seconds per destination).
pub(crate) async fn run(
    hub: Arc<RelayHub>,
    peer: PeerId,
    limits: RelayLimits,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    allowed: impl Fn(PeerId) -> bool,
) {
    // A batch holds at least one packet, so the channel never holds more batches than the
    // packet limit; the count of queued packets is what bounds the queue.
    let limit = limits.queue_packets.max(1);
    let (tx, mut rx) = mpsc::channel::<Batch>(limit);
    let queued = Arc::new(AtomicU64::new(0));
    let session = hub.next_session.fetch_add(1, Ordering::Relaxed);
    hub.sinks().insert(
        peer,
        Sink {
            session,
            tx,
            queued: queued.clone(),
            limit: limit as u64,
        },
    );
    hub.counters.sessions.fetch_add(1, Ordering::Relaxed);

    // The writer runs apart so that a peer slow to read what it is sent never stops us reading
    // (and forwarding) what it sends.
    let writer = tokio::spawn(async move {
        while let Some(batch) = rx.recv().await {
            let written = send.write_all(&batch.frames).await;
            queued.fetch_sub(batch.packets, Ordering::Relaxed);
            if written.is_err() {
                break;
            }
        }
    });

    let mut decoder = RelayDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut policy = RelayPolicy::new(limits, Instant::now());
    let mut routes: HashMap<PeerId, Sink> = HashMap::new();
    // What one read brought, by destination: one queue operation (and at most one wake-up of
    // the destination's writer) per destination and read instead of one per packet.
    let mut batches: HashMap<PeerId, Batch> = HashMap::new();
    'stream: loop {
        let n = match recv.read(&mut buf).await {
            Ok(Some(n)) => n,
            Ok(None) | Err(_) => break,
        };
        decoder.push(&buf[..n]);
        loop {
            let (to, packet) = match decoder.next_frame_ref() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "bad relay frame; closing the relay stream");
                    break 'stream;
                }
            };
            match policy.admit(to, packet.len(), Instant::now(), &allowed) {
                Ok(()) => {}
                Err(Refusal::NotIntroduced) => {
                    hub.counters
                        .denied_not_introduced
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(Refusal::Quota) => {
                    hub.counters.denied_quota.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(Refusal::Rate) => {
                    hub.counters.denied_rate.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            hub.trace(packet);
            let batch = batches.entry(to).or_insert_with(|| Batch {
                frames: Vec::with_capacity(n + 64),
                packets: 0,
                bytes: 0,
            });
            // The decoder capped the packet's size, so encoding cannot fail.
            if relay::encode_into(&mut batch.frames, &peer, packet).is_ok() {
                batch.packets += 1;
                batch.bytes += packet.len() as u64;
            }
        }
        for (to, batch) in batches.drain() {
            forward(&hub, &mut routes, to, batch);
        }
    }
    writer.abort();
    let mut sinks = hub.sinks();
    if sinks.get(&peer).is_some_and(|s| s.session == session) {
        sinks.remove(&peer);
    }
}

/// Queues `batch` for `to`'s relay stream, counting what is forwarded and what is dropped.
fn forward(hub: &RelayHub, routes: &mut HashMap<PeerId, Sink>, to: PeerId, batch: Batch) {
    let (packets, bytes) = (batch.packets, batch.bytes);
    let sink = match routes.get(&to) {
        Some(sink) => sink.clone(),
        None => match hub.sink_of(&to) {
            Some(sink) => {
                routes.insert(to, sink.clone());
                sink
            }
            None => {
                hub.counters
                    .dropped_no_route
                    .fetch_add(packets, Ordering::Relaxed);
                return;
            }
        },
    };
    if sink.queued.load(Ordering::Relaxed) + packets > sink.limit {
        hub.counters
            .dropped_queue_full
            .fetch_add(packets, Ordering::Relaxed);
        return;
    }
    sink.queued.fetch_add(packets, Ordering::Relaxed);
    match sink.tx.try_send(batch) {
        Ok(()) => {
            hub.counters.packets.fetch_add(packets, Ordering::Relaxed);
            hub.counters.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        Err(mpsc::error::TrySendError::Full(_)) => {
            sink.queued.fetch_sub(packets, Ordering::Relaxed);
            hub.counters
                .dropped_queue_full
                .fetch_add(packets, Ordering::Relaxed);
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            sink.queued.fetch_sub(packets, Ordering::Relaxed);
            // The destination's stream went away; look it up again next time.
            routes.remove(&to);
            hub.counters
                .dropped_no_route
                .fetch_add(packets, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> PeerId {
        PeerId::from_key_digest(&[n; 32])
    }

    #[test]
    fn only_introduced_destinations_and_the_answer_is_rechecked() {
        let t0 = Instant::now();
        let mut policy = RelayPolicy::new(RelayLimits::default(), t0);
        let mut asked = 0;
        let mut ask = |ok: bool| {
            asked += 1;
            move |_| ok
        };
        assert_eq!(
            policy.admit(id(2), 100, t0, ask(false)),
            Err(Refusal::NotIntroduced)
        );
        // The answer is reused for a while...
        assert_eq!(
            policy.admit(id(2), 100, t0 + Duration::from_secs(1), |_| true),
            Err(Refusal::NotIntroduced)
        );
        // ...then asked again.
        let later = t0 + RelayPolicy::RECHECK + Duration::from_millis(1);
        assert_eq!(policy.admit(id(2), 100, later, ask(true)), Ok(()));
        assert_eq!(asked, 2);
    }

    #[test]
    fn rate_limit_and_quota() {
        let t0 = Instant::now();
        let limits = RelayLimits {
            rate_bytes_per_s: 10_000,
            burst_bytes: 4_000,
            quota_bytes: 20_000,
            queue_packets: 8,
        };
        let mut policy = RelayPolicy::new(limits, t0);
        // The burst is at least one full packet (2048): 4000 bytes at once.
        assert_eq!(policy.admit(id(2), 2000, t0, |_| true), Ok(()));
        assert_eq!(policy.admit(id(2), 2000, t0, |_| true), Ok(()));
        assert_eq!(policy.admit(id(2), 2000, t0, |_| true), Err(Refusal::Rate));
        // 0.2 s later, 2000 more bytes of budget.
        let t1 = t0 + Duration::from_millis(200);
        assert_eq!(policy.admit(id(2), 2000, t1, |_| true), Ok(()));
        // The quota counts only what was forwarded: 6000 so far; run it out.
        let mut now = t1;
        let mut sent = 6000;
        while sent + 2000 <= 20_000 {
            now += Duration::from_secs(1);
            assert_eq!(policy.admit(id(2), 2000, now, |_| true), Ok(()));
            sent += 2000;
        }
        now += Duration::from_secs(10);
        assert_eq!(
            policy.admit(id(2), 2000, now, |_| true),
            Err(Refusal::Quota)
        );
    }

    #[test]
    fn a_destination_queue_is_bounded_by_packets_not_batches() {
        let hub = RelayHub::new(None);
        let (tx, mut rx) = mpsc::channel(8);
        let queued = Arc::new(AtomicU64::new(0));
        hub.sinks().insert(
            id(2),
            Sink {
                session: 1,
                tx,
                queued: queued.clone(),
                limit: 4,
            },
        );
        let batch = |packets: u64| Batch {
            frames: vec![0; 10],
            packets,
            bytes: 10 * packets,
        };
        let mut routes = HashMap::new();
        forward(&hub, &mut routes, id(2), batch(3));
        // One more packet fits, two do not: the whole batch is dropped and counted.
        forward(&hub, &mut routes, id(2), batch(2));
        forward(&hub, &mut routes, id(2), batch(1));
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(get(&hub.counters.packets), 4);
        assert_eq!(get(&hub.counters.dropped_queue_full), 2);
        assert_eq!(get(&queued), 4);
        // The writer takes them off: room again.
        while let Ok(b) = rx.try_recv() {
            queued.fetch_sub(b.packets, Ordering::Relaxed);
        }
        forward(&hub, &mut routes, id(2), batch(4));
        assert_eq!(get(&hub.counters.packets), 8);
        // No relay stream for a destination: dropped as no route.
        forward(&hub, &mut routes, id(3), batch(5));
        assert_eq!(get(&hub.counters.dropped_no_route), 5);
    }
}
