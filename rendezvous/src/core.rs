//! The rendezvous's protocol logic as a state machine: no sockets, no clocks, no tasks.
//!
//! The driver feeds it who sent what (the id comes from the client certificate, the observed
//! address from the packets) and the time, and carries out what it returns: a reply, pushes to
//! other connections, and records to persist. Tests drive it directly.
//!
//! The registry bounds its own growth, because identities cost a client nothing (a fresh key
//! pair): registrations are rate-limited per source address (new identities tightly, all
//! registrations loosely), the number of rows is capped, and rows of peers that stay offline
//! longer than [`RegistryLimits::expire_after`] expire. Those decisions live here rather than in
//! the driver because they depend on the registry's state (whether an id is new, how many rows
//! there are) and must be taken atomically with the registration itself. Time comes in as
//! `OffsetDateTime` like everywhere else in the core; the token buckets get a monotonic
//! reading derived from it ([`Registry`] keeps the mapping), so tests simulate time with one
//! clock.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::message::{
    usable_candidate, Candidate, CandidateKind, FirstFlight, PeerInfo, MAX_CANDIDATES,
    MAX_LOCAL_ADDRS,
};
use common::stun::PunchKey;
use common::{ControlMessage, ErrorCode, PeerId, PROTOCOL_VERSION};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::sources::{SourceBuckets, SourceKey};

mod remote;
pub use remote::{ForwardRefusal, ForwardedIntroduction, RemotePeer};

/// Identifies one QUIC connection in the driver.
pub type ConnId = u64;

/// Keep-alive interval the server asks peers to use (seconds), below common NAT UDP timeouts.
pub const KEEPALIVE_S: u32 = 15;

/// How long an accepted introduction allows relaying between the two peers (from the accept).
pub const INTRODUCTION_TTL: time::Duration = time::Duration::hours(1);

/// How long an introduction waits for its target's `accept` (and for punch reports). The target
/// accepts as soon as it gets the push, so this only needs to cover slow links.
pub const ACCEPT_WINDOW: time::Duration = time::Duration::minutes(2);

/// Introductions remembered in all; a `connect` beyond that is answered `rate_limited`.
pub const MAX_INTRODUCTIONS: usize = 65_536;

/// Introductions one peer may have waiting for an accept at once; a `connect` beyond that is
/// answered `rate_limited`. (Accepted ones need the other side's consent, so they are bounded
/// only in all.)
pub const MAX_INTRODUCTIONS_PER_REQUESTER: u32 = 32;

/// The source key registrations from a TCP tunnel's virtual address count against when the
/// tunnel is not known (it closed meanwhile): one shared key, never a fresh one per tunnel.
const UNKNOWN_TUNNEL_SOURCE: Ipv4Addr = Ipv4Addr::new(240, 0, 0, 0);

/// Limits on the registry's growth (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RegistryLimits {
    /// Most registered rows (online or not); a new identity is refused while the registry holds
    /// this many (known identities still re-register).
    pub max_registered: usize,
    /// A row whose peer has been offline this long is deleted (from memory and storage). Online
    /// peers never expire; a peer's clock starts when it goes offline.
    pub expire_after: Duration,
    /// New identities one source (IPv4 address, IPv6 /64) may register at once...
    pub new_ids_burst: f64,
    /// ...and per second sustained after that.
    pub new_ids_per_s: f64,
    /// Registrations of any identity (re-registrations included) one source may make at once...
    pub registrations_burst: f64,
    /// ...and per second sustained after that.
    pub registrations_per_s: f64,
    /// Sources whose registration buckets are remembered (least recently used forgotten).
    pub sources_remembered: usize,
    /// Introductions (`connect`s) one peer may ask for at once...
    pub introductions_burst: f64,
    /// ...and per second sustained after that.
    pub introductions_per_s: f64,
    /// Introductions to one peer (from anyone) at once...
    pub introductions_to_target_burst: f64,
    /// ...and per second sustained after that. Each introduction makes the target probe the
    /// requester's candidates, so this bounds how often anyone can make a peer do that.
    pub introductions_to_target_per_s: f64,
    /// Peers whose introduction buckets are remembered (least recently used forgotten).
    pub introduction_peers_remembered: usize,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        RegistryLimits {
            max_registered: 1_000_000,
            expire_after: Duration::from_secs(30 * 86_400),
            // A person installs a few peers from one address; a laptop lab perhaps twenty.
            new_ids_burst: 20.0,
            new_ids_per_s: 1.0 / 60.0,
            // Re-registrations are loose: a peer behind a flaky NAT re-registers often, and many
            // peers behind one carrier-grade NAT share an IPv4 address. A known id costs no
            // memory; this bounds the durable writes and work one source causes.
            registrations_burst: 200.0,
            registrations_per_s: 10.0,
            sources_remembered: 65_536,
            // A peer connects to a few peers, and re-punches each with backoff; a burst covers
            // starting many chats or transfers at once (as many as may wait for an accept,
            // MAX_INTRODUCTIONS_PER_REQUESTER).
            introductions_burst: 32.0,
            introductions_per_s: 5.0,
            introductions_to_target_burst: 40.0,
            introductions_to_target_per_s: 10.0,
            introduction_peers_remembered: 65_536,
        }
    }
}

/// Why a relayed packet is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayRefusal {
    /// The two peers were not introduced (no `connect` between them), or too long ago.
    NotIntroduced,
    /// Introduced, but the target has not accepted the introduction (yet).
    NotAccepted,
    /// The destination is not registered.
    UnknownPeer,
}

/// One introduction between two peers (either way round).
#[derive(Debug, Clone)]
struct Introduction {
    /// Who sent the latest `connect`.
    requester: PeerId,
    /// Who was asked (and must `accept`).
    target: PeerId,
    /// The latest introduction's nonce.
    nonce: u64,
    /// The latest introduction's secret key (pushed again with the nonce if the target
    /// re-registers before accepting).
    key: PunchKey,
    /// Until when the latest introduction can be accepted or reported on.
    open_until: OffsetDateTime,
    /// The latest introduction waits for its accept (and counts against its requester).
    pending: bool,
    /// Until when relaying is allowed (an accept was given).
    consent_until: Option<OffsetDateTime>,
    /// Stamps of the entry's latest records in the two expiry queues.
    open_stamp: u64,
    consent_stamp: u64,
}

impl Introduction {
    /// When the entry can be forgotten.
    fn expires(&self) -> OffsetDateTime {
        match self.consent_until {
            Some(consent) if consent > self.open_until => consent,
            _ => self.open_until,
        }
    }
}

/// One expiry queue: (when, pair, stamp) records in the order they were made, which is time
/// order because its TTL is constant.
type ExpiryQueue = VecDeque<(OffsetDateTime, (PeerId, PeerId), u64)>;

/// Introductions, expiring without sweeps. Each of the two lifetimes ([`ACCEPT_WINDOW`],
/// [`INTRODUCTION_TTL`]) is constant, so each has a queue of records in time order: expired
/// records are popped from the front, and a record whose stamp is not its entry's latest is stale
/// and skipped (lazy deletion). A queue is compacted when stale records outnumber live entries,
/// so every operation is amortized O(1). Bounded in all ([`MAX_INTRODUCTIONS`]) and in waiting
/// introductions per requester ([`MAX_INTRODUCTIONS_PER_REQUESTER`]).
#[derive(Debug, Default)]
struct Introductions {
    entries: HashMap<(PeerId, PeerId), Introduction>,
    open_queue: ExpiryQueue,
    consent_queue: ExpiryQueue,
    pending_per_requester: HashMap<PeerId, u32>,
    /// The pairs whose introduction waits for each target's accept: what is pushed again when
    /// the target registers (its push may have been lost with its previous connection).
    pending_per_target: HashMap<PeerId, HashSet<(PeerId, PeerId)>>,
    next_stamp: u64,
}

/// Why an introduction cannot be made now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IntroductionRefusal {
    /// [`MAX_INTRODUCTIONS`] are live.
    Full,
    /// The requester has [`MAX_INTRODUCTIONS_PER_REQUESTER`] waiting.
    RequesterFull,
}

impl Introductions {
    /// Ends what expired by `now`: pops expired records from the queues' fronts.
    fn expire(&mut self, now: OffsetDateTime) {
        while let Some(&(at, key, stamp)) = self.open_queue.front() {
            if at > now {
                break;
            }
            self.open_queue.pop_front();
            let Some(entry) = self.entries.get_mut(&key) else {
                continue;
            };
            if entry.open_stamp != stamp {
                continue;
            }
            if entry.pending {
                entry.pending = false;
                let (requester, target) = (entry.requester, entry.target);
                self.uncount(requester, target);
            }
            if self.entries.get(&key).is_some_and(|e| e.expires() <= now) {
                self.entries.remove(&key);
            }
        }
        while let Some(&(at, key, stamp)) = self.consent_queue.front() {
            if at > now {
                break;
            }
            self.consent_queue.pop_front();
            if self
                .entries
                .get(&key)
                .is_some_and(|e| e.consent_stamp == stamp && e.expires() <= now)
            {
                // Its open record expired earlier (the accept came after the connect), so it is
                // no longer pending: nothing to uncount.
                self.entries.remove(&key);
            }
        }
    }

    /// The introduction of `target` by `requester` no longer waits for an accept.
    fn uncount(&mut self, requester: PeerId, target: PeerId) {
        if let Some(n) = self.pending_per_requester.get_mut(&requester) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.pending_per_requester.remove(&requester);
            }
        }
        if let Some(keys) = self.pending_per_target.get_mut(&target) {
            keys.remove(&pair(requester, target));
            if keys.is_empty() {
                self.pending_per_target.remove(&target);
            }
        }
    }

    /// The introductions waiting for `target`'s accept at `now`: (requester, nonce, key).
    fn pending_for(&self, target: PeerId, now: OffsetDateTime) -> Vec<(PeerId, u64, PunchKey)> {
        let Some(keys) = self.pending_per_target.get(&target) else {
            return Vec::new();
        };
        keys.iter()
            .filter_map(|key| self.entries.get(key))
            .filter(|e| e.pending && e.target == target && e.open_until > now)
            .map(|e| (e.requester, e.nonce, e.key.clone()))
            .collect()
    }

    fn stamp(&mut self) -> u64 {
        self.next_stamp += 1;
        self.next_stamp
    }

    /// Drops stale records once they outnumber the entries (amortized O(1)).
    fn compact(&mut self) {
        let entries = &self.entries;
        if self.open_queue.len() > 2 * entries.len() + 64 {
            self.open_queue
                .retain(|(_, key, stamp)| entries.get(key).is_some_and(|e| e.open_stamp == *stamp));
        }
        if self.consent_queue.len() > 2 * entries.len() + 64 {
            self.consent_queue.retain(|(_, key, stamp)| {
                entries.get(key).is_some_and(|e| e.consent_stamp == *stamp)
            });
        }
    }

    /// A new introduction of `target` by `requester`, waiting for the target's accept; the
    /// pair's earlier consent (if any) stays as it was.
    fn introduce(
        &mut self,
        requester: PeerId,
        target: PeerId,
        nonce: u64,
        secret: PunchKey,
        now: OffsetDateTime,
    ) -> Result<(), IntroductionRefusal> {
        self.expire(now);
        let key = pair(requester, target);
        let existing = self.entries.get(&key).cloned();
        // Renewing one's own waiting introduction does not count again.
        let counted_already = existing
            .as_ref()
            .is_some_and(|e| e.pending && e.requester == requester);
        if !counted_already
            && self
                .pending_per_requester
                .get(&requester)
                .copied()
                .unwrap_or(0)
                >= MAX_INTRODUCTIONS_PER_REQUESTER
        {
            return Err(IntroductionRefusal::RequesterFull);
        }
        if existing.is_none() && self.entries.len() >= MAX_INTRODUCTIONS {
            return Err(IntroductionRefusal::Full);
        }
        if !counted_already {
            if let Some(old) = existing.as_ref().filter(|e| e.pending) {
                self.uncount(old.requester, old.target);
            }
            *self.pending_per_requester.entry(requester).or_default() += 1;
        }
        let open_stamp = self.stamp();
        let open_until = now + ACCEPT_WINDOW;
        self.entries.insert(
            key,
            Introduction {
                requester,
                target,
                nonce,
                key: secret,
                open_until,
                pending: true,
                consent_until: existing.as_ref().and_then(|e| e.consent_until),
                open_stamp,
                consent_stamp: existing.as_ref().map_or(0, |e| e.consent_stamp),
            },
        );
        self.open_queue.push_back((open_until, key, open_stamp));
        self.pending_per_target
            .entry(target)
            .or_default()
            .insert(key);
        self.compact();
        Ok(())
    }

    /// `target` accepts the introduction `requester` asked for with `nonce`.
    fn accept(
        &mut self,
        target: PeerId,
        requester: PeerId,
        nonce: u64,
        now: OffsetDateTime,
    ) -> bool {
        self.expire(now);
        let key = pair(requester, target);
        let consent_stamp = self.stamp();
        let Some(entry) = self.entries.get_mut(&key) else {
            return false;
        };
        if !entry.pending
            || entry.target != target
            || entry.requester != requester
            || entry.nonce != nonce
            || entry.open_until <= now
        {
            return false;
        }
        entry.pending = false;
        let consent_until = now + INTRODUCTION_TTL;
        entry.consent_until = Some(consent_until);
        entry.consent_stamp = consent_stamp;
        self.uncount(requester, target);
        self.consent_queue
            .push_back((consent_until, key, consent_stamp));
        self.compact();
        true
    }

    fn get(&self, a: PeerId, b: PeerId, now: OffsetDateTime) -> Option<&Introduction> {
        self.entries.get(&pair(a, b)).filter(|e| e.expires() > now)
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// What is stored for each registered peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Public address last observed.
    pub observed: SocketAddr,
    /// Interface addresses the peer announced.
    pub local_addrs: Vec<SocketAddr>,
    /// The external port the peer's router maps to it (`register` / `mapped_port`), handed out
    /// on the observed address. Records stored before version 4 have none.
    #[serde(default)]
    pub mapped_port: Option<u16>,
    /// The peer's address in the other IP family than `observed`, proven by the peer
    /// (`confirm_address`, see [`crate::observe`]); cleared by every registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_other: Option<SocketAddr>,
    /// Last time the server heard from the peer.
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
    /// First registration.
    #[serde(with = "time::serde::rfc3339")]
    pub registered_at: OffsetDateTime,
}

/// What the driver must do after an input.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Reply on the stream the request came on.
    pub reply: Option<ControlMessage>,
    /// Messages to push on other peers' control streams.
    pub pushes: Vec<(ConnId, ControlMessage)>,
    /// A record to write to storage (before the reply is sent, for registrations).
    pub persist: Option<(PeerId, Record)>,
}

impl Outcome {
    fn reply(msg: ControlMessage) -> Self {
        Outcome {
            reply: Some(msg),
            ..Outcome::default()
        }
    }

    fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::reply(ControlMessage::error(code, message))
    }
}

/// Counters for the operator.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Successful registrations.
    pub registrations: u64,
    /// Queries answered (found or not).
    pub queries: u64,
    /// Introductions made (`punch` sent to both sides).
    pub punches: u64,
    /// Introductions whose `punch` to the target carried the requester's first flight.
    pub first_flights: u64,
    /// Introductions whose requester reported a direct path.
    pub punches_succeeded: u64,
    /// Introductions whose requester reported that punching found no direct path.
    pub punches_failed: u64,
    /// Requests refused as invalid.
    pub rejected: u64,
    /// Registrations refused: the source made too many registrations.
    pub refused_source_rate: u64,
    /// Registrations of new identities refused: the source registered too many new identities.
    pub refused_new_ids_rate: u64,
    /// Registrations of new identities refused: the registry is full.
    pub refused_full: u64,
    /// Introductions refused: their requester asked for too many, or their target was asked
    /// for too often.
    pub refused_introduction_rate: u64,
    /// Rows deleted because their peer was offline longer than the expiry time.
    pub expired: u64,
}

/// Maps the core's wall-clock `now` to a monotonic [`Instant`] for the token buckets: the first
/// reading anchors the mapping, and readings never go backwards (a wall clock stepped back
/// makes the buckets' time stand still instead of refilling them twice).
#[derive(Debug, Default)]
struct MonotonicClock {
    anchor: Option<(OffsetDateTime, Instant)>,
    last: Option<Instant>,
}

impl MonotonicClock {
    fn at(&mut self, now: OffsetDateTime) -> Instant {
        let (t0, i0) = *self.anchor.get_or_insert_with(|| (now, Instant::now()));
        let since = Duration::try_from(now - t0).unwrap_or_default();
        let reading = i0.checked_add(since).unwrap_or(i0);
        let reading = self.last.map_or(reading, |last| last.max(reading));
        self.last = Some(reading);
        reading
    }
}

/// The registry and punch coordinator.
#[derive(Debug)]
pub struct Registry {
    peers: HashMap<PeerId, Record>,
    online: HashMap<PeerId, ConnId>,
    /// The NAT profile each online peer reported (`nat`): one per online peer at most, dropped
    /// when it goes offline or registers again (its network may have changed).
    nat_profiles: HashMap<PeerId, common::nat::NatProfile>,
    introductions: Introductions,
    /// Exactly the offline peers, keyed by `(last_seen, id)`, oldest first: the expiry order.
    /// An offline peer's `last_seen` does not change until it registers again, which removes
    /// its entry, so the key is always known and no entry goes stale.
    expiry: BTreeSet<(OffsetDateTime, PeerId)>,
    /// Draws the introductions' nonces and secret keys: a CSPRNG (ChaCha) seeded from the
    /// operating system's by the driver, from a fixed seed in tests.
    rng: StdRng,
    /// The server's own addresses: never handed out as a peer's candidate.
    own_addrs: Vec<SocketAddr>,
    /// Keys the address proofs (see [`crate::observe`]).
    observe_secret: [u8; 32],
    /// Where the server answers address-proof requests (`registered.server_addrs`): its
    /// addresses of both families when dual-stack, else none.
    proof_addrs: Vec<SocketAddr>,
    /// Introductions asked for, per requester.
    introductions_by_requester: SourceBuckets<PeerId>,
    /// Introductions asked for, per target.
    introductions_by_target: SourceBuckets<PeerId>,
    counters: Counters,
    limits: RegistryLimits,
    /// Registrations of any identity, per source.
    registrations_by_source: SourceBuckets,
    /// Registrations of new identities, per source.
    new_ids_by_source: SourceBuckets,
    clock: MonotonicClock,
    /// The real source of each open TCP tunnel, by the tunnel's virtual address (what the
    /// registry observes for peers registering through it): a fresh virtual address per
    /// tunnel must not be a fresh source for the rate limits. At most one per open tunnel.
    tunnel_sources: HashMap<SocketAddr, SourceKey>,
}

impl Registry {
    /// A registry holding `records` loaded from storage, with the default [`RegistryLimits`];
    /// nobody online. The introductions' nonces and secret keys are drawn from a CSPRNG seeded
    /// with `seed`, which must come from the operating system's CSPRNG (a fixed one in tests
    /// only): anyone who knows it can forge every probe.
    pub fn new(records: impl IntoIterator<Item = (PeerId, Record)>, seed: [u8; 32]) -> Self {
        Self::with_limits(records, seed, RegistryLimits::default())
    }

    /// A registry holding `records` loaded from storage, bounded by `limits`; nobody online.
    /// Records already past their expiry are deleted by the first [`Registry::expire`].
    pub fn with_limits(
        records: impl IntoIterator<Item = (PeerId, Record)>,
        seed: [u8; 32],
        limits: RegistryLimits,
    ) -> Self {
        let peers: HashMap<PeerId, Record> = records.into_iter().collect();
        let expiry = peers.iter().map(|(id, r)| (r.last_seen, *id)).collect();
        Registry {
            peers,
            online: HashMap::new(),
            nat_profiles: HashMap::new(),
            expiry,
            introductions: Introductions::default(),
            rng: StdRng::from_seed(seed),
            own_addrs: Vec::new(),
            observe_secret: [0; 32],
            proof_addrs: Vec::new(),
            introductions_by_requester: SourceBuckets::new(
                limits.introductions_burst,
                limits.introductions_per_s,
                limits.introduction_peers_remembered,
            ),
            introductions_by_target: SourceBuckets::new(
                limits.introductions_to_target_burst,
                limits.introductions_to_target_per_s,
                limits.introduction_peers_remembered,
            ),
            counters: Counters::default(),
            limits,
            registrations_by_source: SourceBuckets::new(
                limits.registrations_burst,
                limits.registrations_per_s,
                limits.sources_remembered,
            ),
            new_ids_by_source: SourceBuckets::new(
                limits.new_ids_burst,
                limits.new_ids_per_s,
                limits.sources_remembered,
            ),
            clock: MonotonicClock::default(),
            tunnel_sources: HashMap::new(),
        }
    }

    /// The server listens on `addrs`: they are never handed out as a peer's candidate (a peer
    /// announcing them would aim the other peer's probes at the server).
    pub fn set_own_addrs(&mut self, addrs: Vec<SocketAddr>) {
        self.own_addrs = addrs;
    }

    /// Address proofs: keyed by `secret` (the STUN side answers with the same one), requested
    /// at `addrs` (told to peers in `registered`; empty: the server is not dual-stack).
    pub fn set_address_proofs(&mut self, secret: [u8; 32], addrs: Vec<SocketAddr>) {
        self.observe_secret = secret;
        self.proof_addrs = addrs;
    }

    /// A TCP tunnel from `remote` now carries the packets of `virtual_addr`: registrations
    /// through it count against `remote`'s source.
    pub fn tunnel_opened(&mut self, virtual_addr: SocketAddr, remote: IpAddr) {
        self.tunnel_sources
            .insert(virtual_addr, SourceKey::of(remote));
    }

    /// The tunnel of `virtual_addr` closed.
    pub fn tunnel_closed(&mut self, virtual_addr: SocketAddr) {
        self.tunnel_sources.remove(&virtual_addr);
    }

    /// The source a registration from `observed` counts against: its IP (or /64), or for a
    /// TCP tunnel's virtual address the tunnel's real source. A virtual address without a
    /// known tunnel (it closed meanwhile) counts against one shared key, never a fresh one.
    fn source_of(&self, observed: SocketAddr) -> SourceKey {
        match self.tunnel_sources.get(&observed) {
            Some(source) => *source,
            None if is_virtual(&observed) => SourceKey::of(IpAddr::V4(UNKNOWN_TUNNEL_SOURCE)),
            None => SourceKey::of(observed.ip()),
        }
    }

    /// The limits this registry enforces.
    pub fn limits(&self) -> &RegistryLimits {
        &self.limits
    }

    /// Deletes the rows of peers offline for longer than [`RegistryLimits::expire_after`] at
    /// `now`, oldest first, at most `max` per call (the caller holds the registry's lock for
    /// the call: bounded chunks keep that short). Returns each deleted id with the `last_seen`
    /// it had, so that storage deletes the row only if it was not written again since.
    pub fn expire(&mut self, now: OffsetDateTime, max: usize) -> Vec<(PeerId, OffsetDateTime)> {
        let mut expired = Vec::new();
        let Ok(expire_after) = time::Duration::try_from(self.limits.expire_after) else {
            return expired; // longer than time can count: never
        };
        let Some(cutoff) = now.checked_sub(expire_after) else {
            return expired;
        };
        while expired.len() < max {
            let Some(&(last_seen, id)) = self.expiry.first() else {
                break;
            };
            if last_seen > cutoff {
                break;
            }
            self.expiry.pop_first();
            // The queue holds exactly the offline peers at their `last_seen` (see the field);
            // anything else would be a bug, and is dropped rather than acted on.
            let stale = self.peers.get(&id).map(|r| r.last_seen) != Some(last_seen)
                || self.online.contains_key(&id);
            debug_assert!(!stale, "stale expiry entry for {id}");
            if stale {
                continue;
            }
            self.peers.remove(&id);
            self.counters.expired += 1;
            expired.push((id, last_seen));
        }
        expired
    }

    /// Checks the registry's internal consistency (for tests and fuzzing): every online peer
    /// is registered, and the expiry queue holds exactly the offline peers at their
    /// `last_seen`.
    pub fn check_invariants(&self) -> Result<(), String> {
        if let Some(id) = self.online.keys().find(|id| !self.peers.contains_key(id)) {
            return Err(format!("{id} is online but not registered"));
        }
        let offline = self.peers.len() - self.online.len();
        if self.expiry.len() != offline {
            return Err(format!(
                "{} expiry entries for {offline} offline peers",
                self.expiry.len()
            ));
        }
        for (id, record) in &self.peers {
            let queued = self.expiry.contains(&(record.last_seen, *id));
            if queued == self.online.contains_key(id) {
                return Err(format!("{id}: online and queued for expiry disagree"));
            }
        }
        Ok(())
    }

    /// Registered peers (online or not).
    pub fn registered(&self) -> usize {
        self.peers.len()
    }

    /// Peers with a live control connection.
    pub fn online(&self) -> usize {
        self.online.len()
    }

    /// The control connection `peer` is online with here, if it is.
    pub fn online_conn(&self, peer: &PeerId) -> Option<ConnId> {
        self.online.get(peer).copied()
    }

    /// Whether `addr` is a TCP tunnel's virtual address (a peer that reaches us over TCP 443).
    pub fn is_tunnel(&self, addr: SocketAddr) -> bool {
        self.tunnel_sources.contains_key(&addr)
    }

    /// Counters so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The connection currently registered for `id`.
    pub fn connection_of(&self, id: &PeerId) -> Option<ConnId> {
        self.online.get(id).copied()
    }

    /// Handles a message from the authenticated peer `id` on connection `conn`, whose packets
    /// currently come from `observed`.
    pub fn handle(
        &mut self,
        conn: ConnId,
        id: PeerId,
        observed: SocketAddr,
        msg: ControlMessage,
        now: OffsetDateTime,
    ) -> Outcome {
        let registered_here = self.online.get(&id) == Some(&conn);
        match msg {
            ControlMessage::Register {
                version,
                local_addrs,
                mapped_port,
            } => self.register(conn, id, observed, version, local_addrs, mapped_port, now),
            _ if !registered_here => {
                self.counters.rejected += 1;
                Outcome::error(
                    ErrorCode::NotRegistered,
                    "send `register` on the control stream first",
                )
            }
            ControlMessage::Query { id: target } => {
                let mut outcome = self.touch(id, observed, now);
                self.counters.queries += 1;
                outcome.reply = Some(match self.peers.get(&target) {
                    Some(record) => ControlMessage::PeerInfo(PeerInfo {
                        id: target,
                        observed: record.observed,
                        local_addrs: record.local_addrs.clone(),
                        mapped_port: record.mapped_port,
                        online: self.online.contains_key(&target),
                        last_seen: if self.online.contains_key(&target) {
                            now
                        } else {
                            record.last_seen
                        },
                    }),
                    None => ControlMessage::error(
                        ErrorCode::NotFound,
                        format!("peer {target} is not registered"),
                    ),
                });
                outcome
            }
            ControlMessage::Connect {
                id: target,
                first_flight,
            } => {
                let mut outcome = self.touch(id, observed, now);
                let (reply, pushes) = self.introduce(id, target, first_flight, now);
                outcome.reply = Some(reply);
                outcome.pushes = pushes;
                outcome
            }
            ControlMessage::Ping { seq } => {
                let mut outcome = self.touch(id, observed, now);
                outcome.reply = Some(ControlMessage::Pong { seq });
                outcome
            }
            ControlMessage::PunchResult { peer, direct } => {
                let introduced = self
                    .introductions
                    .get(id, peer, now)
                    .is_some_and(|e| e.open_until > now);
                if !introduced {
                    self.counters.rejected += 1;
                    return Outcome::error(
                        ErrorCode::BadRequest,
                        format!("no recent introduction to {peer} to report on"),
                    );
                }
                if direct {
                    self.counters.punches_succeeded += 1;
                } else {
                    self.counters.punches_failed += 1;
                }
                let mut outcome = self.touch(id, observed, now);
                outcome.reply = Some(ControlMessage::Ack {});
                outcome
            }
            ControlMessage::MappedPort { port } => {
                let mut outcome = self.touch(id, observed, now);
                if let Some(record) = self.peers.get_mut(&id) {
                    let port = port.filter(|&p| p != 0);
                    if record.mapped_port != port {
                        record.mapped_port = port;
                        outcome.persist = Some((id, record.clone()));
                    }
                }
                outcome.reply = Some(ControlMessage::Ack {});
                outcome
            }
            ControlMessage::ConfirmAddress {
                addr,
                transaction,
                proof,
            } => self.confirm_address(id, observed, addr, transaction, &proof, now),
            ControlMessage::Nat { nat } => {
                // Registered here, so online: the map holds at most one entry per online peer.
                self.nat_profiles.insert(id, nat);
                let mut outcome = self.touch(id, observed, now);
                outcome.reply = Some(ControlMessage::Ack {});
                outcome
            }
            ControlMessage::Accept { peer, nonce } => {
                if !self.introductions.accept(id, peer, nonce, now) {
                    self.counters.rejected += 1;
                    return Outcome::error(
                        ErrorCode::BadRequest,
                        format!("no introduction from {peer} with that nonce is waiting for you"),
                    );
                }
                let mut outcome = self.touch(id, observed, now);
                outcome.reply = Some(ControlMessage::Ack {});
                outcome
            }
            other => {
                self.counters.rejected += 1;
                Outcome::error(
                    ErrorCode::BadRequest,
                    format!("`{}` is sent by the server, not to it", other.kind()),
                )
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn register(
        &mut self,
        conn: ConnId,
        id: PeerId,
        observed: SocketAddr,
        version: u32,
        mut local_addrs: Vec<SocketAddr>,
        mapped_port: Option<u16>,
        now: OffsetDateTime,
    ) -> Outcome {
        if version != PROTOCOL_VERSION {
            self.counters.rejected += 1;
            return Outcome::error(
                ErrorCode::UnsupportedVersion,
                format!(
                    "this rendezvous speaks protocol version {PROTOCOL_VERSION} and your peer \
                     speaks version {version}: upgrade the peer program"
                ),
            );
        }
        if local_addrs.len() > MAX_LOCAL_ADDRS {
            self.counters.rejected += 1;
            return Outcome::error(
                ErrorCode::BadRequest,
                format!(
                    "{} local addresses announced, at most {MAX_LOCAL_ADDRS} are accepted",
                    local_addrs.len()
                ),
            );
        }
        if let Some(refusal) = self.refuse_registration(id, observed, now) {
            return refusal;
        }
        local_addrs.retain(|a| a.port() != 0 && !a.ip().is_unspecified());
        // One spelling per address: `::ffff:a.b.c.d` is a.b.c.d.
        for addr in local_addrs.iter_mut() {
            *addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        }
        local_addrs.dedup();
        let registered_at = self.peers.get(&id).map_or(now, |r| r.registered_at);
        if !self.online.contains_key(&id) {
            // Offline until now: it leaves the expiry queue (its key is its last_seen).
            if let Some(old) = self.peers.get(&id) {
                self.expiry.remove(&(old.last_seen, id));
            }
        }
        let record = Record {
            observed,
            local_addrs,
            mapped_port: mapped_port.filter(|&p| p != 0),
            observed_other: None,
            last_seen: now,
            registered_at,
        };
        self.peers.insert(id, record.clone());
        // A new registration may come from another network: its profile is reported again.
        self.nat_profiles.remove(&id);
        // A newer connection replaces an older one (a peer that re-registers after a network
        // change while the server has not yet noticed the old connection died).
        self.online.insert(id, conn);
        self.counters.registrations += 1;
        Outcome {
            reply: Some(ControlMessage::Registered {
                id,
                observed,
                keepalive_s: KEEPALIVE_S,
                version: PROTOCOL_VERSION,
                server_addrs: self.proof_addrs.clone(),
            }),
            pushes: Vec::new(),
            persist: Some((id, record)),
        }
    }

    /// `id` proves `addr` (its address in the other family than its connection's) with `proof`,
    /// the MESSAGE-INTEGRITY of the server's answer to its request `transaction`: recorded
    /// only if the proof checks (see [`crate::observe`]) and the address is usable.
    fn confirm_address(
        &mut self,
        id: PeerId,
        observed: SocketAddr,
        addr: SocketAddr,
        transaction: [u8; 12],
        proof: &[u8; 20],
        now: OffsetDateTime,
    ) -> Outcome {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        let refuse = |reg: &mut Self, why: &str| {
            reg.counters.rejected += 1;
            Outcome::error(ErrorCode::BadRequest, why.to_owned())
        };
        if addr.is_ipv4() == observed.is_ipv4() || !usable_candidate(addr, false) {
            return refuse(
                self,
                "confirm_address takes a usable address of the other IP family than this connection's",
            );
        }
        if self.proof_addrs.is_empty()
            || !crate::observe::verify(&self.observe_secret, transaction, addr, proof, now)
        {
            return refuse(
                self,
                "the address proof does not check (not the server's answer to that address, or                  older than two minutes)",
            );
        }
        let mut outcome = self.touch(id, observed, now);
        if let Some(record) = self.peers.get_mut(&id) {
            if record.observed_other != Some(addr) {
                record.observed_other = Some(addr);
                outcome.persist = Some((id, record.clone()));
            }
        }
        outcome.reply = Some(ControlMessage::Ack {});
        outcome
    }

    /// The refusal of a registration of `id` from `observed`, if a limit refuses it: the
    /// source's registration bucket, and for a new identity the row cap and the source's
    /// new-identity bucket. Refused with `rate_limited` and a message saying which limit.
    fn refuse_registration(
        &mut self,
        id: PeerId,
        observed: SocketAddr,
        now: OffsetDateTime,
    ) -> Option<Outcome> {
        let source = self.source_of(observed);
        let mono = self.clock.at(now);
        let limits = self.limits;
        if !self.registrations_by_source.try_take(source, 1.0, mono) {
            self.counters.refused_source_rate += 1;
            return Some(Outcome::error(
                ErrorCode::RateLimited,
                format!(
                    "too many registrations from {source} (at most {} at once, then {}/s); \
                     try again later",
                    limits.registrations_burst, limits.registrations_per_s
                ),
            ));
        }
        if self.peers.contains_key(&id) {
            return None;
        }
        // The cap is checked before the new-identity bucket so that a full registry does not
        // also use up the sources' allowance.
        if self.peers.len() >= limits.max_registered {
            self.counters.refused_full += 1;
            return Some(Outcome::error(
                ErrorCode::RateLimited,
                format!(
                    "the registry is full ({} peers); new identities are refused until rows \
                     expire; try again later",
                    limits.max_registered
                ),
            ));
        }
        if !self.new_ids_by_source.try_take(source, 1.0, mono) {
            self.counters.refused_new_ids_rate += 1;
            return Some(Outcome::error(
                ErrorCode::RateLimited,
                format!(
                    "too many new identities from {source} (at most {} at once, then one every \
                     {:.0} s); try again later",
                    limits.new_ids_burst,
                    1.0 / limits.new_ids_per_s.max(f64::MIN_POSITIVE)
                ),
            ));
        }
        None
    }

    /// Refreshes `last_seen` in memory, and the observed address if the peer's packets now come
    /// from elsewhere (NAT rebinding, migration); only the latter needs persisting. Only for
    /// online peers: an offline peer's `last_seen` is its key in the expiry queue.
    fn touch(&mut self, id: PeerId, observed: SocketAddr, now: OffsetDateTime) -> Outcome {
        if !self.online.contains_key(&id) {
            return Outcome::default();
        }
        let Some(record) = self.peers.get_mut(&id) else {
            return Outcome::default();
        };
        record.last_seen = now;
        if record.observed != observed {
            record.observed = observed;
            return Outcome {
                persist: Some((id, record.clone())),
                ..Outcome::default()
            };
        }
        Outcome::default()
    }

    fn introduce(
        &mut self,
        from: PeerId,
        target: PeerId,
        first_flight: Option<FirstFlight>,
        now: OffsetDateTime,
    ) -> (ControlMessage, Vec<(ConnId, ControlMessage)>) {
        if target == from {
            self.counters.rejected += 1;
            return (
                ControlMessage::error(ErrorCode::BadRequest, "cannot connect to yourself"),
                Vec::new(),
            );
        }
        // Cloned (a few addresses): the rate limits below need the registry mutably.
        let Some(target_record) = self.peers.get(&target).cloned() else {
            return (
                ControlMessage::error(
                    ErrorCode::NotFound,
                    format!("peer {target} is not registered"),
                ),
                Vec::new(),
            );
        };
        let Some(&target_conn) = self.online.get(&target) else {
            let last_seen = target_record
                .last_seen
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            return (
                ControlMessage::error(
                    ErrorCode::PeerOffline,
                    format!("peer {target} is registered but not online (last seen {last_seen})"),
                ),
                Vec::new(),
            );
        };
        let Some(from_record) = self.peers.get(&from).cloned() else {
            return (
                ControlMessage::error(ErrorCode::NotRegistered, "register first"),
                Vec::new(),
            );
        };
        let (nonce, key) = match self.admit_introduction(from, target, now) {
            Ok(admitted) => admitted,
            Err(refusal) => return (refusal, Vec::new()),
        };
        let to_requester = ControlMessage::Punch {
            peer: target,
            candidates: candidates(&target_record, &from_record, &self.own_addrs),
            nonce,
            key: key.clone(),
            nat: self.nat_profiles.get(&target).copied(),
            no_relay: None,
            first_flight: None,
        };
        // The requester's first QUIC datagram rides with the push (the target takes it once it
        // accepts), so the handshake starts a round trip to the rendezvous earlier than over
        // the relay, which holds packets until the accept has come back. One per introduction:
        // the introduction's own limits bound it.
        self.counters.first_flights += u64::from(first_flight.is_some());
        let to_target = ControlMessage::Punch {
            peer: from,
            candidates: candidates(&from_record, &target_record, &self.own_addrs),
            nonce,
            key,
            nat: self.nat_profiles.get(&from).copied(),
            no_relay: None,
            first_flight,
        };
        (to_requester, vec![(target_conn, to_target)])
    }

    /// Admits an introduction of `from` to `target`, for a local target and for one on another
    /// cluster node alike: the refusals of [`Registry::refuse_introduction`], then the
    /// introductions' own bounds (`introductions.introduce`); draws its nonce and key and counts
    /// it. A refusal comes back as the reply to send.
    fn admit_introduction(
        &mut self,
        from: PeerId,
        target: PeerId,
        now: OffsetDateTime,
    ) -> Result<(u64, PunchKey), ControlMessage> {
        if let Some(refusal) = self.refuse_introduction(from, target, now) {
            return Err(refusal);
        }
        let nonce: u64 = self.rng.random();
        let key = PunchKey::from_bytes(self.rng.random());
        if let Err(refusal) = self
            .introductions
            .introduce(from, target, nonce, key.clone(), now)
        {
            self.counters.rejected += 1;
            return Err(ControlMessage::error(
                ErrorCode::RateLimited,
                introduction_refusal_message(refusal),
            ));
        }
        self.counters.punches += 1;
        Ok((nonce, key))
    }

    /// The refusal of an introduction of `target` by `from`, if its requester or its target
    /// is over its rate (answered `rate_limited`, saying which).
    fn refuse_introduction(
        &mut self,
        from: PeerId,
        target: PeerId,
        now: OffsetDateTime,
    ) -> Option<ControlMessage> {
        let mono = self.clock.at(now);
        let limits = self.limits;
        let message = if !self.introductions_by_requester.try_take(from, 1.0, mono) {
            format!(
                "you asked for too many introductions (at most {} at once, then {}/s); try \
                 again in a moment",
                limits.introductions_burst, limits.introductions_per_s
            )
        } else if !self.introductions_by_target.try_take(target, 1.0, mono) {
            format!(
                "peer {target} was asked for too many introductions (at most {} at once, then \
                 {}/s); try again in a moment",
                limits.introductions_to_target_burst, limits.introductions_to_target_per_s
            )
        } else {
            return None;
        };
        self.counters.refused_introduction_rate += 1;
        Some(ControlMessage::error(ErrorCode::RateLimited, message))
    }

    /// The driver saw `id`'s packets come from `observed` (QUIC migration after a NAT rebinding):
    /// update the record so that introductions hand out the address that works now.
    pub fn observe(
        &mut self,
        id: PeerId,
        observed: SocketAddr,
        now: OffsetDateTime,
    ) -> Option<(PeerId, Record)> {
        self.touch(id, observed, now).persist
    }

    /// The `punch` pushes of the introductions still waiting for `id`'s accept, to push again
    /// once `id` has (re-)registered: the first push may have gone to a connection that was
    /// closing (a peer leaving the TCP tunnel, a NAT rebinding), and without the target's accept
    /// the requester could not be relayed to it.
    pub fn pending_introductions(&self, id: PeerId, now: OffsetDateTime) -> Vec<ControlMessage> {
        self.introductions
            .pending_for(id, now)
            .into_iter()
            .filter_map(|(requester, nonce, key)| {
                let record = self.peers.get(&requester)?;
                let target = self.peers.get(&id)?;
                Some(ControlMessage::Punch {
                    peer: requester,
                    candidates: candidates(record, target, &self.own_addrs),
                    nonce,
                    key,
                    nat: self.nat_profiles.get(&requester).copied(),
                    no_relay: None,
                    // The first push had it; a datagram this old is retransmitted by now.
                    first_flight: None,
                })
            })
            .collect()
    }

    /// The recorded public address of `id`.
    pub fn observed_of(&self, id: &PeerId) -> Option<SocketAddr> {
        self.peers.get(id).map(|r| r.observed)
    }

    /// Whether `from` may relay packets to `to` now: only between registered peers that were
    /// introduced (one asked to connect to the other) and whose introduction the target
    /// accepted, within [`INTRODUCTION_TTL`] of the accept; either way round once accepted.
    /// `NotAccepted` while an introduction waits for its accept (within [`ACCEPT_WINDOW`]).
    pub fn relay_allowed(
        &self,
        from: PeerId,
        to: PeerId,
        now: OffsetDateTime,
    ) -> Result<(), RelayRefusal> {
        if !self.peers.contains_key(&to) {
            return Err(RelayRefusal::UnknownPeer);
        }
        self.relay_consent(from, to, now)
    }

    /// As [`Registry::relay_allowed`] for a destination on another node of a cluster (not
    /// registered here): the introduction as this node recorded it decides.
    pub fn relay_allowed_remote(
        &self,
        from: PeerId,
        to: PeerId,
        now: OffsetDateTime,
    ) -> Result<(), RelayRefusal> {
        self.relay_consent(from, to, now)
    }

    /// `target`, on another node, accepted the introduction `nonce` that `requester` (here)
    /// asked for (its node says so over the node link): recorded as a local accept would be,
    /// with the same checks (the introduction waits, the nonce is its latest, in time).
    pub fn remote_accepted(
        &mut self,
        requester: PeerId,
        target: PeerId,
        nonce: u64,
        now: OffsetDateTime,
    ) -> bool {
        if !self.online.contains_key(&requester) {
            return false;
        }
        self.introductions.accept(target, requester, nonce, now)
    }

    fn relay_consent(
        &self,
        from: PeerId,
        to: PeerId,
        now: OffsetDateTime,
    ) -> Result<(), RelayRefusal> {
        match self.introductions.get(from, to, now) {
            Some(e) if e.consent_until.is_some_and(|until| until > now) => Ok(()),
            Some(e) if e.pending && e.open_until > now => Err(RelayRefusal::NotAccepted),
            _ => Err(RelayRefusal::NotIntroduced),
        }
    }

    /// Introductions remembered now (live or not yet popped from the expiry queue).
    pub fn introductions(&self) -> usize {
        self.introductions.len()
    }

    /// The connection `conn` of `id` closed.
    pub fn disconnected(
        &mut self,
        conn: ConnId,
        id: PeerId,
        now: OffsetDateTime,
    ) -> Option<(PeerId, Record)> {
        if self.online.get(&id) != Some(&conn) {
            // An older connection of a peer that has since re-registered.
            return None;
        }
        self.online.remove(&id);
        self.nat_profiles.remove(&id);
        let record = self.peers.get_mut(&id)?;
        // Never move last_seen backwards (a wall clock stepped back): the row would expire
        // early.
        record.last_seen = record.last_seen.max(now);
        self.expiry.insert((record.last_seen, id));
        Some((id, record.clone()))
    }
}

/// What a peer is told when its introduction cannot be made now.
fn introduction_refusal_message(refusal: IntroductionRefusal) -> String {
    match refusal {
        IntroductionRefusal::RequesterFull => format!(
            "you have {MAX_INTRODUCTIONS_PER_REQUESTER} introductions waiting for an accept; try \
             again in a minute"
        ),
        IntroductionRefusal::Full => {
            "the server has too many introductions open; try again later".to_owned()
        }
    }
}

/// The unordered pair, as a map key.
fn pair(a: PeerId, b: PeerId) -> (PeerId, PeerId) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

/// Addresses in 240.0.0.0/4 are reserved and never routed: the server uses them for TCP
/// tunnels, peers for stable per-peer addresses. They are never worth probing.
fn is_virtual(addr: &SocketAddr) -> bool {
    matches!(addr, SocketAddr::V4(v4) if v4.ip().octets()[0] >= 240)
}

/// The candidates of `record`'s peer to hand to `recipient`'s: its observed address first,
/// then its router's port mapping (the mapped port on the observed IP: never another IP),
/// then its announced interface addresses, only usable ones ([`usable_candidate`]; loopback
/// only when the server sees both peers on loopback, i.e. all three run on one host), never the
/// server's own addresses, at most [`MAX_CANDIDATES`].
fn candidates(record: &Record, recipient: &Record, own_addrs: &[SocketAddr]) -> Vec<Candidate> {
    let allow_loopback =
        record.observed.ip().is_loopback() && recipient.observed.ip().is_loopback();
    let usable = |addr: &SocketAddr| {
        !is_virtual(addr) && usable_candidate(*addr, allow_loopback) && !own_addrs.contains(addr)
    };
    let mut out = Vec::new();
    if usable(&record.observed) {
        out.push(Candidate {
            addr: record.observed,
            kind: CandidateKind::Observed,
        });
    }
    // The proven address of the other family (IPv6 beside an IPv4 mapping, usually): a public
    // address too, and the one that goes direct where IPv4 NATs do not.
    if let Some(other) = record.observed_other {
        if other != record.observed && usable(&other) {
            out.push(Candidate {
                addr: other,
                kind: CandidateKind::Observed,
            });
        }
    }
    if let Some(port) = record.mapped_port {
        let mapped = SocketAddr::new(record.observed.ip(), port);
        if mapped != record.observed && usable(&mapped) {
            out.push(Candidate {
                addr: mapped,
                kind: CandidateKind::Mapped,
            });
        }
    }
    for addr in &record.local_addrs {
        if out.len() >= MAX_CANDIDATES {
            break;
        }
        if *addr != record.observed && usable(addr) && !out.iter().any(|c| c.addr == *addr) {
            out.push(Candidate {
                addr: *addr,
                kind: CandidateKind::Local,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn id(n: u8) -> PeerId {
        PeerId::from_key_digest(&[n; 32])
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([203, 0, 113, 5], port))
    }

    const T0: OffsetDateTime = datetime!(2026-11-25 08:00 UTC);

    fn register(reg: &mut Registry, conn: ConnId, peer: PeerId, port: u16) -> Outcome {
        reg.handle(
            conn,
            peer,
            addr(port),
            ControlMessage::Register {
                version: PROTOCOL_VERSION,
                local_addrs: vec![SocketAddr::from(([10, 0, 0, 2], port))],
                mapped_port: None,
            },
            T0,
        )
    }

    #[test]
    fn register_reports_the_observed_address_and_persists() {
        let mut reg = Registry::new([], [1; 32]);
        let out = register(&mut reg, 1, id(1), 4000);
        assert_eq!(
            out.reply,
            Some(ControlMessage::Registered {
                id: id(1),
                observed: addr(4000),
                keepalive_s: KEEPALIVE_S,
                version: PROTOCOL_VERSION,
                server_addrs: vec![],
            })
        );
        let (who, record) = out.persist.unwrap();
        assert_eq!(who, id(1));
        assert_eq!(record.observed, addr(4000));
        assert_eq!(reg.online(), 1);
    }

    #[test]
    fn requests_before_register_are_refused() {
        let mut reg = Registry::new([], [1; 32]);
        let out = reg.handle(1, id(1), addr(1), ControlMessage::Query { id: id(2) }, T0);
        assert!(matches!(
            out.reply,
            Some(ControlMessage::Error {
                code: ErrorCode::NotRegistered,
                ..
            })
        ));
    }

    #[test]
    fn query_found_not_found_and_offline() {
        let mut reg = Registry::new([], [1; 32]);
        register(&mut reg, 1, id(1), 4000);
        register(&mut reg, 2, id(2), 5000);
        let out = reg.handle(
            1,
            id(1),
            addr(4000),
            ControlMessage::Query { id: id(2) },
            T0,
        );
        match out.reply {
            Some(ControlMessage::PeerInfo(info)) => {
                assert_eq!(info.observed, addr(5000));
                assert!(info.online);
            }
            other => panic!("{other:?}"),
        }
        let out = reg.handle(
            1,
            id(1),
            addr(4000),
            ControlMessage::Query { id: id(9) },
            T0,
        );
        assert!(matches!(
            out.reply,
            Some(ControlMessage::Error {
                code: ErrorCode::NotFound,
                ..
            })
        ));
        let later = T0 + time::Duration::minutes(5);
        assert!(reg.disconnected(2, id(2), later).is_some());
        let out = reg.handle(
            1,
            id(1),
            addr(4000),
            ControlMessage::Query { id: id(2) },
            T0,
        );
        match out.reply {
            Some(ControlMessage::PeerInfo(info)) => {
                assert!(!info.online);
                assert_eq!(info.last_seen, later);
            }
            other => panic!("{other:?}"),
        }
    }

    /// The candidates a `connect` from peer 1 gets for peer 2.
    fn candidates_of_2(reg: &mut Registry) -> Vec<Candidate> {
        let out = reg.handle(1, id(1), addr(4000), ControlMessage::connect(id(2)), T0);
        match out.reply {
            Some(ControlMessage::Punch { candidates, .. }) => candidates,
            other => panic!("{other:?}"),
        }
    }

    /// A dual-stack peer registered over IPv4 announces its IPv6 address: the other peer gets
    /// it after the observed IPv4 mapping; a v4-mapped spelling of an announced address is
    /// stored plain, so that it is one candidate, not two.
    #[test]
    fn an_announced_ipv6_address_is_a_candidate_and_mapped_ipv4_is_stored_plain() {
        let mut reg = Registry::new([], [7; 32]);
        register(&mut reg, 1, id(1), 4000);
        let v6: SocketAddr = "[2001:db8:2::2]:5000".parse().unwrap();
        let lan = SocketAddr::from(([10, 0, 0, 2], 5000));
        let lan_mapped = SocketAddr::new(
            IpAddr::V6(Ipv4Addr::new(10, 0, 0, 2).to_ipv6_mapped()),
            5000,
        );
        let out = reg.handle(
            2,
            id(2),
            addr(5000),
            ControlMessage::Register {
                version: PROTOCOL_VERSION,
                local_addrs: vec![lan, lan_mapped, v6],
                mapped_port: None,
            },
            T0,
        );
        assert_eq!(
            out.persist.map(|(_, r)| r.local_addrs),
            Some(vec![lan, v6]),
            "the mapped spelling is the same address"
        );
        let candidates = candidates_of_2(&mut reg);
        let addrs: Vec<SocketAddr> = candidates.iter().map(|c| c.addr).collect();
        assert_eq!(addrs, vec![addr(5000), lan, v6]);
        assert_eq!(candidates[2].kind, CandidateKind::Local);
        assert_eq!(candidates[2].describe(), "public IPv6 address");
    }

    /// A peer's address of the other family is recorded only with a proof the server made for
    /// that very address: claims without one, with a proof of another address or an old one,
    /// or of the connection's own family are refused and change nothing; a proven one is the
    /// second observed candidate, and the next registration forgets it.
    #[test]
    fn an_address_of_the_other_family_is_recorded_only_when_proven() {
        let secret = [3u8; 32];
        let mut reg = Registry::new([], [7; 32]);
        reg.set_address_proofs(
            secret,
            vec![addr(7000), "[2001:db8::10]:7000".parse().unwrap()],
        );
        let out = register(&mut reg, 1, id(1), 4000);
        match out.reply {
            Some(ControlMessage::Registered { server_addrs, .. }) => {
                assert_eq!(server_addrs.len(), 2, "told where to ask for a proof")
            }
            other => panic!("{other:?}"),
        }
        register(&mut reg, 2, id(2), 5000);
        let mine: SocketAddr = "[2001:db8:2::2]:5000".parse().unwrap();
        let victim: SocketAddr = "[2001:db8:9::9]:80".parse().unwrap();
        let tx = [4u8; 12];
        let proof_for = |a: SocketAddr, at: OffsetDateTime| {
            common::stun::integrity_of(&crate::observe::answer(&secret, tx, a, at)).unwrap()
        };
        let confirm = |reg: &mut Registry, a: SocketAddr, proof: [u8; 20], at| {
            reg.handle(
                2,
                id(2),
                addr(5000),
                ControlMessage::ConfirmAddress {
                    addr: a,
                    transaction: tx,
                    proof,
                },
                at,
            )
        };
        let refused = |out: &Outcome| {
            matches!(
                out.reply,
                Some(ControlMessage::Error {
                    code: ErrorCode::BadRequest,
                    ..
                })
            ) && out.persist.is_none()
        };
        // No proof of the victim's address: a proof of ours does not cover it, nor zeros.
        assert!(refused(&confirm(&mut reg, victim, proof_for(mine, T0), T0)));
        assert!(refused(&confirm(&mut reg, victim, [0; 20], T0)));
        // Ours, but stale.
        let stale = T0 - time::Duration::minutes(5);
        assert!(refused(&confirm(
            &mut reg,
            mine,
            proof_for(mine, stale),
            T0
        )));
        // The connection's own family: that is what the connection itself shows.
        let v4 = SocketAddr::from(([198, 51, 100, 9], 5000));
        assert!(refused(&confirm(&mut reg, v4, proof_for(v4, T0), T0)));
        assert!(candidates_of_2(&mut reg)
            .iter()
            .all(|c| c.addr != victim && c.addr != mine));

        let out = confirm(&mut reg, mine, proof_for(mine, T0), T0);
        assert_eq!(out.reply, Some(ControlMessage::Ack {}));
        assert_eq!(out.persist.map(|(_, r)| r.observed_other), Some(Some(mine)));
        let candidates = candidates_of_2(&mut reg);
        assert_eq!(candidates[0].addr, addr(5000));
        assert_eq!(
            candidates[1],
            Candidate {
                addr: mine,
                kind: CandidateKind::Observed
            }
        );
        register(&mut reg, 3, id(2), 5001);
        assert!(candidates_of_2(&mut reg).iter().all(|c| c.addr != mine));
    }

    /// Without address proofs (a server of one family), every claim is refused.
    #[test]
    fn a_server_of_one_family_refuses_address_proofs() {
        let mut reg = Registry::new([], [7; 32]);
        register(&mut reg, 1, id(1), 4000);
        let mine: SocketAddr = "[2001:db8:1::2]:4000".parse().unwrap();
        let proof =
            common::stun::integrity_of(&crate::observe::answer(&[0; 32], [1; 12], mine, T0))
                .unwrap();
        let out = reg.handle(
            1,
            id(1),
            addr(4000),
            ControlMessage::ConfirmAddress {
                addr: mine,
                transaction: [1; 12],
                proof,
            },
            T0,
        );
        assert!(
            matches!(out.reply, Some(ControlMessage::Error { .. })),
            "{:?}",
            out.reply
        );
    }

    #[test]
    fn a_mapped_port_is_a_candidate_on_the_observed_address_only() {
        let mut reg = Registry::new([], [7; 32]);
        register(&mut reg, 1, id(1), 4000);
        // Peer 2 registers with a router mapping of external port 41000.
        let out = reg.handle(
            2,
            id(2),
            addr(5000),
            ControlMessage::Register {
                version: PROTOCOL_VERSION,
                local_addrs: vec![SocketAddr::from(([10, 0, 0, 2], 5000))],
                mapped_port: Some(41000),
            },
            T0,
        );
        assert_eq!(out.persist.map(|(_, r)| r.mapped_port), Some(Some(41000)));
        let candidates = candidates_of_2(&mut reg);
        assert_eq!(candidates[0].kind, CandidateKind::Observed);
        assert_eq!(
            candidates[1],
            Candidate {
                addr: SocketAddr::new(addr(5000).ip(), 41000),
                kind: CandidateKind::Mapped
            },
            "second, on the observed IP"
        );
        assert_eq!(candidates[2].kind, CandidateKind::Local);
        // A query (`peer lookup`) says so too.
        let out = reg.handle(
            1,
            id(1),
            addr(4000),
            ControlMessage::Query { id: id(2) },
            T0,
        );
        match out.reply {
            Some(ControlMessage::PeerInfo(info)) => assert_eq!(info.mapped_port, Some(41000)),
            other => panic!("{other:?}"),
        }
        // The mapping changes, then goes: later introductions follow.
        let out = reg.handle(
            2,
            id(2),
            addr(5000),
            ControlMessage::MappedPort { port: Some(42000) },
            T0,
        );
        assert_eq!(out.reply, Some(ControlMessage::Ack {}));
        assert!(out.persist.is_some());
        assert_eq!(candidates_of_2(&mut reg)[1].addr.port(), 42000);
        reg.handle(
            2,
            id(2),
            addr(5000),
            ControlMessage::MappedPort { port: None },
            T0,
        );
        let candidates = candidates_of_2(&mut reg);
        assert!(candidates.iter().all(|c| c.kind != CandidateKind::Mapped));
        // Port 0, or the observed port itself, is no extra candidate.
        for port in [0, 5000] {
            reg.handle(
                2,
                id(2),
                addr(5000),
                ControlMessage::MappedPort { port: Some(port) },
                T0,
            );
            let candidates = candidates_of_2(&mut reg);
            assert!(candidates.iter().all(|c| c.kind != CandidateKind::Mapped));
        }
        // Only a registered peer may announce one.
        let out = reg.handle(
            9,
            id(9),
            addr(9),
            ControlMessage::MappedPort { port: Some(1) },
            T0,
        );
        assert!(matches!(
            out.reply,
            Some(ControlMessage::Error {
                code: ErrorCode::NotRegistered,
                ..
            })
        ));
        reg.check_invariants().unwrap();
    }

    #[test]
    fn connect_pushes_punch_to_both_with_the_same_nonce() {
        let mut reg = Registry::new([], [7; 32]);
        register(&mut reg, 1, id(1), 4000);
        register(&mut reg, 2, id(2), 5000);
        // The target reported its NAT; the requester did not.
        let sym = common::nat::NatProfile {
            udp: true,
            no_nat: false,
            mapping: common::nat::Behaviour::AddressAndPortDependent,
            filtering: common::nat::Behaviour::AddressAndPortDependent,
            inbound_takes_port: false,
        };
        let ack = reg.handle(2, id(2), addr(5000), ControlMessage::Nat { nat: sym }, T0);
        assert_eq!(ack.reply, Some(ControlMessage::Ack {}));
        let flight = FirstFlight::new(vec![0xc3; 1200]).unwrap();
        let out = reg.handle(
            1,
            id(1),
            addr(4000),
            ControlMessage::Connect {
                id: id(2),
                first_flight: Some(flight.clone()),
            },
            T0,
        );
        let Some(ControlMessage::Punch {
            peer,
            candidates,
            nonce,
            key,
            nat,
            no_relay,
            first_flight,
        }) = out.reply
        else {
            panic!("{:?}", out.reply)
        };
        assert_eq!(peer, id(2));
        // On one node the relay always joins the two sides.
        assert_eq!(no_relay, None);
        // The requester's first flight goes to the target only, and is counted.
        assert_eq!(first_flight, None);
        assert_eq!(reg.counters().first_flights, 1);
        assert_eq!(candidates[0].addr, addr(5000));
        assert_eq!(candidates[0].kind, CandidateKind::Observed);
        assert_eq!(candidates[1].kind, CandidateKind::Local);
        assert_eq!(out.pushes.len(), 1);
        let (
            conn,
            ControlMessage::Punch {
                peer: pushed_peer,
                nonce: pushed_nonce,
                candidates: pushed,
                key: pushed_key,
                nat: pushed_nat,
                no_relay: pushed_no_relay,
                first_flight: pushed_flight,
            },
        ) = &out.pushes[0]
        else {
            panic!()
        };
        assert_eq!(pushed_flight.as_ref(), Some(&flight));
        // Each side learns the other's profile, as reported.
        assert_eq!(nat, Some(sym));
        assert_eq!(*pushed_nat, None);
        assert_eq!(*pushed_no_relay, None);
        // Gone with the peer's connection (or a new registration).
        reg.disconnected(2, id(2), T0);
        register(&mut reg, 2, id(2), 5000);
        let again = reg.handle(1, id(1), addr(4000), ControlMessage::connect(id(2)), T0);
        assert!(
            matches!(again.reply, Some(ControlMessage::Punch { nat: None, .. })),
            "{again:?}"
        );
        assert_eq!(*conn, 2);
        assert_eq!(*pushed_peer, id(1));
        assert_eq!(*pushed_nonce, nonce);
        assert_eq!(*pushed_key, key, "both sides get the same secret");
        assert_eq!(pushed[0].addr, addr(4000));
        // Two introductions: the one above and the one after the reconnection.
        assert_eq!(reg.counters().punches, 2);
    }

    #[test]
    fn every_introduction_gets_a_fresh_random_nonce_and_key() {
        let limits = RegistryLimits {
            introductions_burst: 1e9,
            introductions_to_target_burst: 1e9,
            ..RegistryLimits::default()
        };
        let mut reg = Registry::with_limits([], [7; 32], limits);
        register(&mut reg, 1, id(1), 4000);
        register(&mut reg, 2, id(2), 5000);
        let mut seen = Vec::new();
        for i in 0..50 {
            let out = connect(&mut reg, 1, id(1), id(2), T0 + time::Duration::seconds(i));
            let Some(ControlMessage::Punch { nonce, key, .. }) = out.reply else {
                panic!("{:?}", out.reply)
            };
            seen.push((nonce, key));
        }
        let nonces: HashSet<u64> = seen.iter().map(|(n, _)| *n).collect();
        let keys: HashSet<[u8; 16]> = seen.iter().map(|(_, k)| *k.as_bytes()).collect();
        assert_eq!((nonces.len(), keys.len()), (50, 50));
        // Not an arithmetic sequence (as the nonces once were): the steps differ.
        let steps: HashSet<u64> = seen
            .windows(2)
            .map(|w| w[1].0.wrapping_sub(w[0].0))
            .collect();
        assert!(steps.len() > 40, "{steps:?}");
        // The key is not derived from the nonce.
        assert!(seen
            .iter()
            .all(|(n, k)| k.as_bytes()[..8] != n.to_be_bytes()[..]
                && k.as_bytes()[..8] != n.to_le_bytes()[..]));
        // Another seed, other secrets.
        let mut other = Registry::with_limits([], [8; 32], limits);
        register(&mut other, 1, id(1), 4000);
        register(&mut other, 2, id(2), 5000);
        let Some(ControlMessage::Punch { key, .. }) =
            connect(&mut other, 1, id(1), id(2), T0).reply
        else {
            panic!()
        };
        assert!(!keys.contains(key.as_bytes()));
    }

    #[test]
    fn introductions_are_rate_limited_per_requester_and_per_target() {
        let limits = RegistryLimits {
            new_ids_burst: 1000.0,
            ..RegistryLimits::default()
        };
        let mut reg = Registry::with_limits([], [7; 32], limits);
        for n in 1..=60u8 {
            register(&mut reg, n.into(), id(n), 4000 + u16::from(n));
        }
        let is_punch = |out: &Outcome| matches!(out.reply, Some(ControlMessage::Punch { .. }));
        let limited = |out: &Outcome| {
            matches!(&out.reply, Some(ControlMessage::Error { code: ErrorCode::RateLimited, message })
                if message.contains("too many introductions"))
        };
        // One requester introducing itself over and over to one target: the burst, then
        // refusals.
        let burst = limits.introductions_burst as usize;
        let made = (0..100)
            .filter(|_| is_punch(&connect(&mut reg, 1, id(1), id(2), T0)))
            .count();
        assert_eq!(made, burst);
        let refused = connect(&mut reg, 1, id(1), id(2), T0);
        assert!(limited(&refused), "{refused:?}");
        assert!(
            refused.pushes.is_empty(),
            "a refused introduction pushes nothing"
        );
        // A second later, its sustained rate.
        let t1 = T0 + time::Duration::seconds(1);
        let made = (0..100)
            .filter(|_| is_punch(&connect(&mut reg, 1, id(1), id(2), t1)))
            .count();
        assert_eq!(made, limits.introductions_per_s as usize);
        // Many requesters (each within its own rate) aiming at one target: the target's
        // bucket holds (id(1) took `burst` and then its sustained rate from it).
        let target_left = limits.introductions_to_target_burst as usize - burst
            + limits.introductions_to_target_per_s as usize
            - limits.introductions_per_s as usize;
        let made = (3..=60u8)
            .filter(|&n| is_punch(&connect(&mut reg, n.into(), id(n), id(2), t1)))
            .count();
        assert_eq!(made, target_left);
        assert!(limited(&connect(&mut reg, 60, id(60), id(2), t1)));
        // Others are not affected.
        assert!(is_punch(&connect(&mut reg, 60, id(60), id(59), t1)));
        assert!(reg.counters().refused_introduction_rate > 0);
    }

    #[test]
    fn only_usable_candidates_are_handed_out() {
        let mut reg = Registry::new([], [7; 32]);
        let server: SocketAddr = "203.0.113.100:3478".parse().unwrap();
        reg.set_own_addrs(vec![server]);
        let mut local_addrs: Vec<SocketAddr> = [
            "127.0.0.1:4000",
            "[::1]:4000",
            "224.0.0.1:4000",
            "255.255.255.255:4000",
            "0.0.0.0:4000",
            "240.0.0.9:4000",
            "203.0.113.100:3478",
            "10.0.0.1:0",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        local_addrs.extend((1..=8).map(|i| SocketAddr::from(([10, 0, 0, i], 4000))));
        assert_eq!(local_addrs.len(), MAX_LOCAL_ADDRS);
        reg.handle(
            1,
            id(1),
            addr(4000),
            ControlMessage::Register {
                version: PROTOCOL_VERSION,
                local_addrs,
                mapped_port: None,
            },
            T0,
        );
        register(&mut reg, 2, id(2), 5000);
        let out = reg.handle(2, id(2), addr(5000), ControlMessage::connect(id(1)), T0);
        let Some(ControlMessage::Punch { candidates, .. }) = out.reply else {
            panic!("{:?}", out.reply)
        };
        assert_eq!(candidates.len(), MAX_CANDIDATES);
        assert_eq!(candidates[0].addr, addr(4000));
        for c in &candidates[1..] {
            assert!(
                matches!(c.addr, SocketAddr::V4(v4) if v4.ip().octets()[..3] == [10, 0, 0] && v4.port() == 4000),
                "{candidates:?}"
            );
        }
        // Loopback candidates only between peers the server sees on loopback (all on one host,
        // as in tests).
        let lo = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let mut reg = Registry::new([], [7; 32]);
        for (conn, n, observed) in [(1, 1, lo(4001)), (2, 2, lo(4002)), (3, 3, addr(4003))] {
            reg.handle(
                conn,
                id(n),
                observed,
                ControlMessage::Register {
                    version: PROTOCOL_VERSION,
                    local_addrs: vec![lo(7000 + u16::from(n))],
                    mapped_port: None,
                },
                T0,
            );
        }
        let punch_candidates = |reg: &mut Registry, conn, from: u8, observed, to: u8| match reg
            .handle(
                conn,
                id(from),
                observed,
                ControlMessage::connect(id(to)),
                T0,
            )
            .reply
        {
            Some(ControlMessage::Punch { candidates, .. }) => {
                candidates.iter().map(|c| c.addr).collect::<Vec<_>>()
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(
            punch_candidates(&mut reg, 1, 1, lo(4001), 2),
            vec![lo(4002), lo(7002)]
        );
        // A public peer is not handed a loopback peer's addresses, nor the other way round.
        assert_eq!(
            punch_candidates(&mut reg, 3, 3, addr(4003), 1),
            Vec::<SocketAddr>::new()
        );
        assert_eq!(
            punch_candidates(&mut reg, 1, 1, lo(4001), 3),
            vec![addr(4003)]
        );
    }

    #[test]
    fn punch_results_are_counted_only_after_an_introduction() {
        let mut reg = Registry::new([], [7; 32]);
        register(&mut reg, 1, id(1), 4000);
        register(&mut reg, 2, id(2), 5000);
        let report = |direct| ControlMessage::PunchResult {
            peer: id(2),
            direct,
        };
        let out = reg.handle(1, id(1), addr(4000), report(true), T0);
        assert!(
            matches!(
                out.reply,
                Some(ControlMessage::Error {
                    code: ErrorCode::BadRequest,
                    ..
                })
            ),
            "{:?}",
            out.reply
        );
        reg.handle(1, id(1), addr(4000), ControlMessage::connect(id(2)), T0);
        let out = reg.handle(1, id(1), addr(4000), report(true), T0);
        assert_eq!(out.reply, Some(ControlMessage::Ack {}));
        // Either side of the introduction may report.
        let out = reg.handle(
            2,
            id(2),
            addr(5000),
            ControlMessage::PunchResult {
                peer: id(1),
                direct: false,
            },
            T0,
        );
        assert_eq!(out.reply, Some(ControlMessage::Ack {}));
        let counters = reg.counters();
        assert_eq!(
            (
                counters.punches,
                counters.punches_succeeded,
                counters.punches_failed
            ),
            (1, 1, 1)
        );
        // Not after the introduction expired.
        let late = T0 + INTRODUCTION_TTL + time::Duration::seconds(1);
        let out = reg.handle(1, id(1), addr(4000), report(true), late);
        assert!(matches!(out.reply, Some(ControlMessage::Error { .. })));
    }

    fn connect(
        reg: &mut Registry,
        conn: ConnId,
        from: PeerId,
        to: PeerId,
        now: OffsetDateTime,
    ) -> Outcome {
        reg.handle(conn, from, addr(4000), ControlMessage::connect(to), now)
    }

    fn nonce_of(out: &Outcome) -> u64 {
        match &out.reply {
            Some(ControlMessage::Punch { nonce, .. }) => *nonce,
            other => panic!("{other:?}"),
        }
    }

    fn accept(
        reg: &mut Registry,
        conn: ConnId,
        target: PeerId,
        requester: PeerId,
        nonce: u64,
        now: OffsetDateTime,
    ) -> Option<ControlMessage> {
        reg.handle(
            conn,
            target,
            addr(5000),
            ControlMessage::Accept {
                peer: requester,
                nonce,
            },
            now,
        )
        .reply
    }

    #[test]
    fn relaying_needs_an_introduction_accepted_by_its_target() {
        let mut reg = Registry::new([], [7; 32]);
        register(&mut reg, 1, id(1), 4000);
        register(&mut reg, 2, id(2), 5000);
        register(&mut reg, 3, id(3), 6000);
        assert_eq!(
            reg.relay_allowed(id(1), id(2), T0),
            Err(RelayRefusal::NotIntroduced)
        );
        let nonce = nonce_of(&connect(&mut reg, 1, id(1), id(2), T0));
        // Not before the target accepted.
        assert_eq!(
            reg.relay_allowed(id(1), id(2), T0),
            Err(RelayRefusal::NotAccepted)
        );
        assert_eq!(
            reg.relay_allowed(id(2), id(1), T0),
            Err(RelayRefusal::NotAccepted)
        );
        // Wrong nonce, wrong peer, or the requester accepting its own introduction: refused.
        for (who, conn, peer, n) in [
            (id(2), 2, id(1), nonce.wrapping_add(1)),
            (id(2), 2, id(3), nonce),
            (id(1), 1, id(2), nonce),
        ] {
            let reply = accept(&mut reg, conn, who, peer, n, T0);
            assert!(
                matches!(
                    reply,
                    Some(ControlMessage::Error {
                        code: ErrorCode::BadRequest,
                        ..
                    })
                ),
                "{reply:?}"
            );
        }
        assert_eq!(
            reg.relay_allowed(id(1), id(2), T0),
            Err(RelayRefusal::NotAccepted)
        );
        // The target accepts: both directions.
        assert_eq!(
            accept(&mut reg, 2, id(2), id(1), nonce, T0),
            Some(ControlMessage::Ack {})
        );
        assert_eq!(reg.relay_allowed(id(1), id(2), T0), Ok(()));
        assert_eq!(
            reg.relay_allowed(id(2), id(1), T0),
            Ok(()),
            "both directions"
        );
        assert_eq!(
            reg.relay_allowed(id(1), id(3), T0),
            Err(RelayRefusal::NotIntroduced)
        );
        assert_eq!(
            reg.relay_allowed(id(1), id(9), T0),
            Err(RelayRefusal::UnknownPeer)
        );
        // A new introduction of the same pair keeps the consent already given.
        let t1 = T0 + INTRODUCTION_TTL - time::Duration::seconds(30);
        let second = nonce_of(&connect(&mut reg, 2, id(2), id(1), t1));
        assert_eq!(reg.relay_allowed(id(1), id(2), t1), Ok(()));
        // The consent lasts its TTL from the accept; then the open introduction waits again.
        let later = T0 + INTRODUCTION_TTL + time::Duration::seconds(1);
        assert_eq!(
            reg.relay_allowed(id(1), id(2), later),
            Err(RelayRefusal::NotAccepted)
        );
        assert_eq!(
            accept(&mut reg, 1, id(1), id(2), second, later),
            Some(ControlMessage::Ack {})
        );
        assert_eq!(reg.relay_allowed(id(1), id(2), later), Ok(()));
        // An accept too late is refused; everything expires.
        let much_later = later + INTRODUCTION_TTL + time::Duration::seconds(1);
        assert!(matches!(
            accept(&mut reg, 1, id(1), id(2), second, much_later),
            Some(ControlMessage::Error { .. })
        ));
        assert_eq!(
            reg.relay_allowed(id(1), id(2), much_later),
            Err(RelayRefusal::NotIntroduced)
        );
    }

    #[test]
    fn introductions_expire_through_the_queue_and_are_bounded_per_requester() {
        // Forty peers from one test address: past the per-source limit on new identities. The
        // introduction rates are not what this tests.
        let limits = RegistryLimits {
            new_ids_burst: 1000.0,
            introductions_burst: 1e9,
            introductions_to_target_burst: 1e9,
            ..RegistryLimits::default()
        };
        let mut reg = Registry::with_limits([], [7; 32], limits);
        register(&mut reg, 1, id(1), 4000);
        for n in 2..(MAX_INTRODUCTIONS_PER_REQUESTER as u8 + 10) {
            register(&mut reg, n.into(), id(n), 5000);
        }
        let mut made = 0;
        for n in 2..(MAX_INTRODUCTIONS_PER_REQUESTER as u8 + 10) {
            match connect(&mut reg, 1, id(1), id(n), T0).reply {
                Some(ControlMessage::Punch { .. }) => made += 1,
                Some(ControlMessage::Error {
                    code: ErrorCode::RateLimited,
                    ..
                }) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(made, MAX_INTRODUCTIONS_PER_REQUESTER);
        assert_eq!(
            reg.introductions(),
            MAX_INTRODUCTIONS_PER_REQUESTER as usize
        );
        // Renewing an open one is not a new one.
        assert!(matches!(
            connect(&mut reg, 1, id(1), id(2), T0).reply,
            Some(ControlMessage::Punch { .. })
        ));
        // Others may still introduce themselves to the same targets.
        assert!(matches!(
            connect(&mut reg, 3, id(3), id(4), T0).reply,
            Some(ControlMessage::Punch { .. })
        ));
        // Many renewals leave the queue compacted, not growing.
        for i in 0..1000 {
            connect(
                &mut reg,
                1,
                id(1),
                id(2),
                T0 + time::Duration::milliseconds(i),
            );
        }
        assert!(reg.introductions.open_queue.len() <= 2 * reg.introductions() + 65);
        // An accepted introduction no longer counts against its requester.
        let nonce = nonce_of(&connect(&mut reg, 1, id(1), id(2), T0));
        assert_eq!(
            accept(&mut reg, 2, id(2), id(1), nonce, T0),
            Some(ControlMessage::Ack {})
        );
        assert!(matches!(
            connect(
                &mut reg,
                1,
                id(1),
                id(MAX_INTRODUCTIONS_PER_REQUESTER as u8 + 5),
                T0
            )
            .reply,
            Some(ControlMessage::Punch { .. })
        ));
        // After the accept window, the next operation pops the waiting ones; the accepted one
        // stays for its TTL.
        let soon = T0 + ACCEPT_WINDOW + time::Duration::seconds(2);
        assert!(matches!(
            connect(&mut reg, 1, id(1), id(5), soon).reply,
            Some(ControlMessage::Punch { .. })
        ));
        assert_eq!(reg.introductions(), 2);
        assert_eq!(reg.relay_allowed(id(1), id(2), soon), Ok(()));
        // After the TTL, nothing is left but the newest.
        let later = T0 + INTRODUCTION_TTL + time::Duration::seconds(2);
        assert!(matches!(
            connect(&mut reg, 1, id(1), id(5), later).reply,
            Some(ControlMessage::Punch { .. })
        ));
        assert_eq!(reg.introductions(), 1);
        assert_eq!(
            reg.introductions.pending_per_requester.get(&id(1)),
            Some(&1)
        );
        assert_eq!(reg.introductions.pending_per_requester.get(&id(3)), None);
    }

    #[test]
    fn introductions_waiting_for_an_accept_are_pushed_again_after_the_target_registers() {
        let mut reg = Registry::new([], [7; 32]);
        register(&mut reg, 1, id(1), 4000);
        register(&mut reg, 2, id(2), 5000);
        assert!(reg.pending_introductions(id(2), T0).is_empty());
        let out = connect(&mut reg, 1, id(1), id(2), T0);
        let nonce = nonce_of(&out);
        // The target's connection closes (its push may be lost) and it registers again.
        reg.disconnected(2, id(2), T0);
        register(&mut reg, 3, id(2), 5001);
        let again = reg.pending_introductions(id(2), T0);
        assert_eq!(again.len(), 1);
        let ControlMessage::Punch {
            peer,
            nonce: same,
            candidates,
            ..
        } = &again[0]
        else {
            panic!("{again:?}")
        };
        assert_eq!((*peer, *same), (id(1), nonce));
        assert_eq!(candidates[0].addr, addr(4000));
        // Nothing for the requester, and nothing once accepted or expired.
        assert!(reg.pending_introductions(id(1), T0).is_empty());
        assert_eq!(
            accept(&mut reg, 3, id(2), id(1), nonce, T0),
            Some(ControlMessage::Ack {})
        );
        assert!(reg.pending_introductions(id(2), T0).is_empty());
        let out = connect(&mut reg, 1, id(1), id(2), T0);
        assert!(!reg.pending_introductions(id(2), T0).is_empty());
        let late = T0 + ACCEPT_WINDOW + time::Duration::seconds(1);
        assert!(reg.pending_introductions(id(2), late).is_empty());
        let _ = out;
    }

    #[test]
    fn introductions_are_bounded_in_all() {
        let mut intros = Introductions::default();
        let peer = |n: u32| {
            let mut bytes = [0u8; 32];
            bytes[..4].copy_from_slice(&n.to_be_bytes());
            PeerId::from_key_digest(&bytes)
        };
        let per = MAX_INTRODUCTIONS_PER_REQUESTER;
        let requesters = (MAX_INTRODUCTIONS as u32).div_ceil(per);
        for r in 0..requesters {
            for t in 0..per {
                let _ = intros.introduce(
                    peer(r),
                    peer(1_000_000 + r * per + t),
                    1,
                    PunchKey::from_bytes([0; 16]),
                    T0,
                );
            }
        }
        assert_eq!(intros.len(), MAX_INTRODUCTIONS);
        assert_eq!(
            intros.introduce(peer(999_999), peer(5), 1, PunchKey::from_bytes([0; 16]), T0),
            Err(IntroductionRefusal::Full)
        );
        // Expiry frees them all at once, through the queue.
        let later = T0 + ACCEPT_WINDOW + time::Duration::seconds(1);
        assert_eq!(
            intros.introduce(
                peer(999_999),
                peer(5),
                1,
                PunchKey::from_bytes([0; 16]),
                later
            ),
            Ok(())
        );
        assert_eq!(intros.len(), 1);
        assert_eq!(intros.open_queue.len(), 1);
        assert_eq!(intros.pending_per_requester.len(), 1);
    }

    #[test]
    fn the_expiry_queue_keeps_entries_renewed_after_their_first_record() {
        let mut intros = Introductions::default();
        intros
            .introduce(id(1), id(2), 5, PunchKey::from_bytes([0; 16]), T0)
            .unwrap();
        let t1 = T0 + time::Duration::minutes(1);
        // Accepted later: the entry outlives its first record.
        assert!(intros.accept(id(2), id(1), 5, t1));
        assert!(!intros.accept(id(2), id(1), 5, t1), "accepted once");
        let t2 = T0 + ACCEPT_WINDOW + time::Duration::seconds(1);
        intros.expire(t2);
        assert_eq!(
            intros.len(),
            1,
            "the stale record did not remove the renewed entry"
        );
        assert!(intros.get(id(1), id(2), t2).is_some());
        intros.expire(t1 + INTRODUCTION_TTL + time::Duration::seconds(1));
        assert_eq!(intros.len(), 0);
        assert!(intros.pending_per_requester.is_empty());
        assert!(intros.open_queue.is_empty() && intros.consent_queue.is_empty());
    }

    #[test]
    fn connect_to_offline_unknown_or_self_is_an_error() {
        let mut reg = Registry::new([], [1; 32]);
        register(&mut reg, 1, id(1), 4000);
        register(&mut reg, 2, id(2), 5000);
        reg.disconnected(2, id(2), T0);
        for (target, code) in [
            (id(2), ErrorCode::PeerOffline),
            (id(3), ErrorCode::NotFound),
            (id(1), ErrorCode::BadRequest),
        ] {
            let out = reg.handle(1, id(1), addr(4000), ControlMessage::connect(target), T0);
            match out.reply {
                Some(ControlMessage::Error { code: got, .. }) => assert_eq!(got, code),
                other => panic!("{other:?}"),
            }
            assert!(out.pushes.is_empty());
        }
    }

    #[test]
    fn virtual_tunnel_addresses_are_not_candidates() {
        let mut reg = Registry::new([], [7; 32]);
        register(&mut reg, 1, id(1), 4000);
        let tunnel: SocketAddr = "241.0.0.1:443".parse().unwrap();
        reg.handle(
            2,
            id(2),
            tunnel,
            ControlMessage::Register {
                version: PROTOCOL_VERSION,
                local_addrs: vec![SocketAddr::from(([10, 0, 2, 2], 5000))],
                mapped_port: None,
            },
            T0,
        );
        let out = reg.handle(1, id(1), addr(4000), ControlMessage::connect(id(2)), T0);
        let Some(ControlMessage::Punch { candidates, .. }) = out.reply else {
            panic!("{:?}", out.reply)
        };
        assert_eq!(candidates.len(), 1);
        assert_eq!(candidates[0].kind, CandidateKind::Local);
    }

    #[test]
    fn a_stale_connection_closing_does_not_take_the_new_one_offline() {
        let mut reg = Registry::new([], [1; 32]);
        register(&mut reg, 1, id(1), 4000);
        register(&mut reg, 2, id(1), 4001);
        assert_eq!(reg.disconnected(1, id(1), T0), None);
        assert_eq!(reg.connection_of(&id(1)), Some(2));
    }

    #[test]
    fn older_peers_are_refused_clearly() {
        // Version 2 keyed probes by the public nonce; version 3 would not announce its port
        // mapping nor report its NAT profile for birthday punching; version 4 would not prove
        // its IPv6 address, and a version-4 server would refuse `confirm_address`; a version-5
        // peer would refuse `mapped_port` in `peer_info`; version 6 would not say that an early
        // packet takes its NAT's port, nor hold its probes for a peer behind such a NAT; a
        // version-7 peer would refuse `no_relay` in `punch`; a version-8 peer knows no relay
        // channels, and a version-8 server would answer `relay_channel` as an unknown type; a
        // version-9 peer would refuse `first_flight` in a pushed `punch`.
        assert_eq!(PROTOCOL_VERSION, 10);
        for version in [2, 3, 4, 5, 6, 7, 8, 9] {
            let mut reg = Registry::new([], [1; 32]);
            let out = reg.handle(
                1,
                id(1),
                addr(1),
                ControlMessage::Register {
                    version,
                    local_addrs: vec![],
                    mapped_port: None,
                },
                T0,
            );
            let Some(ControlMessage::Error {
                code: ErrorCode::UnsupportedVersion,
                message,
            }) = out.reply
            else {
                panic!("{:?}", out.reply)
            };
            assert!(
                message.contains("version 10")
                    && message.contains(&format!("version {version}"))
                    && message.contains("upgrade"),
                "{message}"
            );
            assert_eq!(reg.online(), 0);
        }
    }

    #[test]
    fn address_change_is_persisted_and_bad_registrations_refused() {
        let mut reg = Registry::new([], [1; 32]);
        register(&mut reg, 1, id(1), 4000);
        let out = reg.handle(1, id(1), addr(4444), ControlMessage::Ping { seq: 3 }, T0);
        assert_eq!(out.reply, Some(ControlMessage::Pong { seq: 3 }));
        assert_eq!(out.persist.unwrap().1.observed, addr(4444));
        let out = reg.handle(
            3,
            id(3),
            addr(1),
            ControlMessage::Register {
                version: 99,
                local_addrs: vec![],
                mapped_port: None,
            },
            T0,
        );
        assert!(matches!(
            out.reply,
            Some(ControlMessage::Error {
                code: ErrorCode::UnsupportedVersion,
                ..
            })
        ));
        let out = reg.handle(
            3,
            id(3),
            addr(1),
            ControlMessage::Register {
                version: PROTOCOL_VERSION,
                local_addrs: vec![addr(1); MAX_LOCAL_ADDRS + 1],
                mapped_port: None,
            },
            T0,
        );
        assert!(matches!(
            out.reply,
            Some(ControlMessage::Error {
                code: ErrorCode::BadRequest,
                ..
            })
        ));
        assert_eq!(reg.registered(), 1);
    }

    #[test]
    fn server_side_messages_from_peers_are_refused() {
        let mut reg = Registry::new([], [1; 32]);
        register(&mut reg, 1, id(1), 4000);
        let out = reg.handle(1, id(1), addr(4000), ControlMessage::Pong { seq: 1 }, T0);
        assert!(matches!(
            out.reply,
            Some(ControlMessage::Error {
                code: ErrorCode::BadRequest,
                ..
            })
        ));
    }

    // --- Registry growth: rate limits, cap, expiry ---

    fn register_from(
        reg: &mut Registry,
        conn: ConnId,
        peer: PeerId,
        from: SocketAddr,
        now: OffsetDateTime,
    ) -> Outcome {
        let out = reg.handle(
            conn,
            peer,
            from,
            ControlMessage::Register {
                version: PROTOCOL_VERSION,
                local_addrs: vec![],
                mapped_port: None,
            },
            now,
        );
        reg.check_invariants().unwrap();
        out
    }

    fn is_registered(out: &Outcome) -> bool {
        matches!(out.reply, Some(ControlMessage::Registered { .. }))
    }

    fn rate_limited_message(out: &Outcome) -> String {
        match &out.reply {
            Some(ControlMessage::Error {
                code: ErrorCode::RateLimited,
                message,
            }) => {
                assert!(out.persist.is_none(), "a refusal persists nothing");
                message.clone()
            }
            other => panic!("expected rate_limited, got {other:?}"),
        }
    }

    fn big_id(n: u32) -> PeerId {
        let mut digest = [0u8; 32];
        digest[..4].copy_from_slice(&n.to_be_bytes());
        PeerId::from_key_digest(&digest)
    }

    const DAY: time::Duration = time::Duration::days(1);

    fn limits(expire_days: u64) -> RegistryLimits {
        RegistryLimits {
            expire_after: Duration::from_secs(expire_days * 86_400),
            ..RegistryLimits::default()
        }
    }

    #[test]
    fn offline_rows_expire_after_the_configured_time_and_only_then() {
        let mut reg = Registry::with_limits([], [1; 32], limits(30));
        assert!(is_registered(&register_from(
            &mut reg,
            1,
            id(1),
            addr(1),
            T0
        )));
        assert!(is_registered(&register_from(
            &mut reg,
            2,
            id(2),
            addr(2),
            T0
        )));
        let gone_at = T0 + DAY;
        reg.disconnected(1, id(1), gone_at).unwrap();
        reg.check_invariants().unwrap();
        // The clock starts when the peer goes offline, not at registration.
        let expires = gone_at + 30 * DAY;
        assert!(reg
            .expire(expires - time::Duration::seconds(1), 100)
            .is_empty());
        assert_eq!(reg.expire(expires, 100), vec![(id(1), gone_at)]);
        reg.check_invariants().unwrap();
        assert_eq!(reg.registered(), 1);
        assert_eq!(reg.counters().expired, 1);
        // Gone: queries find nothing, relaying to it is refused.
        let out = reg.handle(
            2,
            id(2),
            addr(2),
            ControlMessage::Query { id: id(1) },
            expires,
        );
        assert!(matches!(
            out.reply,
            Some(ControlMessage::Error {
                code: ErrorCode::NotFound,
                ..
            })
        ));
        assert_eq!(
            reg.relay_allowed(id(2), id(1), expires),
            Err(RelayRefusal::UnknownPeer)
        );
    }

    #[test]
    fn online_peers_never_expire() {
        let mut reg = Registry::with_limits([], [1; 32], limits(30));
        register_from(&mut reg, 1, id(1), addr(1), T0);
        assert!(reg.expire(T0 + 1000 * DAY, 100).is_empty());
        assert_eq!(reg.registered(), 1);
        // A stale connection of the same peer closing does not start its clock.
        register_from(&mut reg, 2, id(1), addr(1), T0 + DAY);
        assert_eq!(reg.disconnected(1, id(1), T0 + 2 * DAY), None);
        assert!(reg.expire(T0 + 1000 * DAY, 100).is_empty());
        reg.check_invariants().unwrap();
    }

    #[test]
    fn registering_again_resets_the_expiry_clock() {
        let mut reg = Registry::with_limits([], [1; 32], limits(30));
        register_from(&mut reg, 1, id(1), addr(1), T0);
        reg.disconnected(1, id(1), T0);
        register_from(&mut reg, 2, id(1), addr(1), T0 + 20 * DAY);
        assert!(reg.expire(T0 + 31 * DAY, 100).is_empty(), "online again");
        reg.disconnected(2, id(1), T0 + 21 * DAY);
        reg.check_invariants().unwrap();
        assert!(reg.expire(T0 + 50 * DAY, 100).is_empty());
        assert_eq!(reg.expire(T0 + 51 * DAY, 100), vec![(id(1), T0 + 21 * DAY)]);
        reg.check_invariants().unwrap();
    }

    #[test]
    fn rows_loaded_from_storage_are_queued_for_expiry() {
        let record = |last_seen| Record {
            observed: addr(1),
            local_addrs: vec![],
            mapped_port: None,
            observed_other: None,
            last_seen,
            registered_at: T0,
        };
        let mut reg = Registry::with_limits(
            [(id(1), record(T0)), (id(2), record(T0 + 10 * DAY))],
            [1; 32],
            limits(30),
        );
        reg.check_invariants().unwrap();
        assert_eq!(reg.expire(T0 + 30 * DAY, 100), vec![(id(1), T0)]);
        // A loaded peer that comes back online leaves the queue.
        register_from(&mut reg, 1, id(2), addr(1), T0 + 11 * DAY);
        assert!(reg.expire(T0 + 100 * DAY, 100).is_empty());
    }

    #[test]
    fn expiry_is_drained_in_bounded_chunks_oldest_first() {
        let mut reg = Registry::with_limits([], [1; 32], limits(1));
        let source = |n: u32| SocketAddr::from(([198, 18, (n >> 8) as u8, n as u8], 1));
        for n in 0..2_500u32 {
            let conn = ConnId::from(n);
            let when = T0 + time::Duration::seconds(n.into());
            assert!(is_registered(&register_from(
                &mut reg,
                conn,
                big_id(n),
                source(n),
                when
            )));
            reg.disconnected(conn, big_id(n), when);
        }
        reg.check_invariants().unwrap();
        let late = T0 + 2 * DAY;
        let first = reg.expire(late, 1024);
        assert_eq!(first.len(), 1024);
        assert_eq!(first[0].0, big_id(0), "oldest first");
        assert_eq!(reg.expire(late, 1024).len(), 1024);
        assert_eq!(reg.expire(late, 1024).len(), 452);
        assert!(reg.expire(late, 1024).is_empty());
        assert_eq!(reg.registered(), 0);
        reg.check_invariants().unwrap();
    }

    #[test]
    fn new_identities_are_rate_limited_per_source() {
        let mut reg = Registry::with_limits([], [1; 32], limits(30));
        let attacker = SocketAddr::from(([198, 51, 100, 7], 5000));
        let burst = RegistryLimits::default().new_ids_burst as u32;
        for n in 0..burst {
            assert!(is_registered(&register_from(
                &mut reg,
                n.into(),
                big_id(n),
                attacker,
                T0
            )));
        }
        let refused = register_from(&mut reg, 100, big_id(100), attacker, T0);
        let message = rate_limited_message(&refused);
        assert!(
            message.contains("new identities from 198.51.100.7"),
            "{message}"
        );
        assert_eq!(reg.counters().refused_new_ids_rate, 1);
        assert_eq!(reg.registered(), burst as usize);
        // Known identities still re-register from there (another port: the same source).
        let other_port = SocketAddr::from(([198, 51, 100, 7], 5001));
        assert!(is_registered(&register_from(
            &mut reg,
            200,
            big_id(0),
            other_port,
            T0
        )));
        // Other sources are not affected.
        assert!(is_registered(&register_from(
            &mut reg,
            201,
            big_id(201),
            addr(1),
            T0
        )));
        // One more new identity a minute later, not two.
        let later = T0 + time::Duration::seconds(61);
        assert!(is_registered(&register_from(
            &mut reg,
            101,
            big_id(101),
            attacker,
            later
        )));
        rate_limited_message(&register_from(&mut reg, 102, big_id(102), attacker, later));
    }

    #[test]
    fn an_ipv6_64_is_one_source() {
        let mut reg = Registry::with_limits([], [1; 32], limits(30));
        let in_64 = |n: u32| -> SocketAddr {
            format!("[2001:db8:1:2:{:x}::{:x}]:4000", n >> 16, n & 0xffff)
                .parse()
                .unwrap()
        };
        let burst = RegistryLimits::default().new_ids_burst as u32;
        // A fresh address of the /64 for every identity does not help.
        for n in 0..burst {
            assert!(is_registered(&register_from(
                &mut reg,
                n.into(),
                big_id(n),
                in_64(n * 7919 + 1),
                T0
            )));
        }
        rate_limited_message(&register_from(&mut reg, 99, big_id(99), in_64(123_456), T0));
        // The neighbouring /64 is another source.
        let next_64: SocketAddr = "[2001:db8:1:3::1]:4000".parse().unwrap();
        assert!(is_registered(&register_from(
            &mut reg,
            100,
            big_id(100),
            next_64,
            T0
        )));
    }

    #[test]
    fn all_registrations_are_rate_limited_per_source_more_loosely() {
        let mut reg = Registry::with_limits([], [1; 32], limits(30));
        let defaults = RegistryLimits::default();
        let burst = defaults.registrations_burst as u64;
        // One peer behind a flaky NAT re-registers many times: more than the new-id burst.
        for n in 0..burst {
            assert!(
                is_registered(&register_from(&mut reg, n, id(1), addr(1), T0)),
                "registration {n}"
            );
        }
        let message = rate_limited_message(&register_from(&mut reg, 999, id(1), addr(1), T0));
        assert!(
            message.contains("too many registrations from 203.0.113.5"),
            "{message}"
        );
        assert_eq!(reg.counters().refused_source_rate, 1);
        // Refilled at the sustained rate.
        let later = T0 + time::Duration::seconds(1);
        let per_s = defaults.registrations_per_s as u64;
        for n in 0..per_s {
            assert!(is_registered(&register_from(
                &mut reg,
                1000 + n,
                id(1),
                addr(1),
                later
            )));
        }
        rate_limited_message(&register_from(&mut reg, 2000, id(1), addr(1), later));
        // A wall clock stepped back refills nothing.
        let earlier = T0 - DAY;
        rate_limited_message(&register_from(&mut reg, 2001, id(1), addr(1), earlier));
        rate_limited_message(&register_from(&mut reg, 2002, id(1), addr(1), later));
    }

    #[test]
    fn new_identities_are_refused_when_the_registry_is_full() {
        let mut reg = Registry::with_limits(
            [],
            [1; 32],
            RegistryLimits {
                max_registered: 3,
                ..limits(30)
            },
        );
        for n in 1..=3 {
            assert!(is_registered(&register_from(
                &mut reg,
                n.into(),
                id(n),
                addr(1),
                T0
            )));
        }
        let message = rate_limited_message(&register_from(&mut reg, 4, id(4), addr(2), T0));
        assert!(message.contains("registry is full (3 peers)"), "{message}");
        assert_eq!(reg.counters().refused_full, 1);
        assert_eq!(reg.registered(), 3);
        // Known identities still re-register.
        assert!(is_registered(&register_from(
            &mut reg,
            5,
            id(1),
            addr(1),
            T0
        )));
        // Room again once a row expires.
        reg.disconnected(2, id(2), T0);
        assert_eq!(reg.expire(T0 + 30 * DAY, 10).len(), 1);
        assert!(is_registered(&register_from(
            &mut reg,
            6,
            id(4),
            addr(2),
            T0 + 30 * DAY
        )));
    }

    #[test]
    fn registrations_through_tcp_tunnels_count_against_the_tunnels_real_source() {
        let mut reg = Registry::with_limits([], [1; 32], limits(30));
        let remote: IpAddr = "198.51.100.9".parse().unwrap();
        let tunnel = |n: u8| SocketAddr::from(([241, 0, 0, n], 443));
        let burst = RegistryLimits::default().new_ids_burst as u32;
        // Each identity through a fresh tunnel (a fresh virtual address) from one host.
        for n in 0..burst {
            reg.tunnel_opened(tunnel(n as u8), remote);
            assert!(is_registered(&register_from(
                &mut reg,
                n.into(),
                big_id(n),
                tunnel(n as u8),
                T0
            )));
            reg.tunnel_closed(tunnel(n as u8));
        }
        reg.tunnel_opened(tunnel(200), remote);
        let message =
            rate_limited_message(&register_from(&mut reg, 99, big_id(99), tunnel(200), T0));
        assert!(message.contains("from 198.51.100.9"), "{message}");
        // The same host over UDP is the same source.
        rate_limited_message(&register_from(
            &mut reg,
            98,
            big_id(98),
            SocketAddr::new(remote, 5000),
            T0,
        ));
        assert_eq!(reg.tunnel_sources.len(), 1, "closed tunnels are forgotten");
    }

    proptest::proptest! {
        /// Any sequence of registrations, requests, disconnections and expiry runs, from a few
        /// sources, as time moves on: the registry stays consistent and within its cap.
        #[test]
        fn invariants_hold_under_any_sequence(ops in proptest::collection::vec(
            (0u8..5, 0u8..6, 0u8..3, 0u32..200_000), 1..300)
        ) {
            let max_registered = 4;
            let mut reg = Registry::with_limits(
                [],
                [1; 32],
                RegistryLimits {
                    max_registered,
                    expire_after: Duration::from_secs(3_600),
                    new_ids_burst: 3.0,
                    registrations_burst: 5.0,
                    ..RegistryLimits::default()
                },
            );
            let mut now = T0;
            let mut conns: HashMap<PeerId, ConnId> = HashMap::new();
            let mut next_conn = 1;
            for (op, who, source, dt) in ops {
                now += time::Duration::seconds(i64::from(dt % 7_200));
                let peer = id(who);
                let from = SocketAddr::from(([198, 51, 100, source], 4000));
                match op {
                    0 => {
                        next_conn += 1;
                        let out = register_from(&mut reg, next_conn, peer, from, now);
                        if is_registered(&out) {
                            conns.insert(peer, next_conn);
                        }
                    }
                    1 => {
                        if let Some(conn) = conns.remove(&peer) {
                            reg.disconnected(conn, peer, now);
                        }
                    }
                    2 => {
                        let conn = conns.get(&peer).copied().unwrap_or(0);
                        reg.handle(conn, peer, from, ControlMessage::Ping { seq: 1 }, now);
                        reg.observe(peer, from, now);
                    }
                    3 => {
                        for (expired, _) in reg.expire(now, 2) {
                            proptest::prop_assert!(!conns.contains_key(&expired));
                        }
                    }
                    _ => {
                        // A stale connection of an online peer closes.
                        reg.disconnected(0, peer, now);
                    }
                }
                if let Err(e) = reg.check_invariants() {
                    return Err(proptest::test_runner::TestCaseError::fail(e));
                }
                proptest::prop_assert!(reg.registered() <= max_registered);
                proptest::prop_assert_eq!(reg.online(), conns.len());
            }
        }
    }

    /// Memory per registered row (at the default cap: the hash map's load factor matters), and
    /// of the registration buckets, measured from the process's resident set (run alone:
    /// `cargo test -p rendezvous --lib -- --ignored --nocapture memory_per_row`).
    #[test]
    #[ignore = "a measurement, not a check; run alone"]
    fn memory_per_row() {
        fn rss_kib() -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        }
        // The two per-source registration buckets, full.
        let before = rss_kib();
        let defaults = RegistryLimits::default();
        let mut buckets = [
            SourceBuckets::new(1.0, 1.0, defaults.sources_remembered),
            SourceBuckets::new(1.0, 1.0, defaults.sources_remembered),
        ];
        let now = Instant::now();
        for n in 0..defaults.sources_remembered as u32 {
            for b in &mut buckets {
                b.try_take(SourceKey::of(IpAddr::V4(n.into())), 1.0, now);
            }
        }
        let after = rss_kib();
        println!(
            "registration buckets: {} KiB for {} sources (both sets), {} bytes per source per set",
            after - before,
            defaults.sources_remembered,
            (after - before) * 1024 / (2 * defaults.sources_remembered as u64)
        );
        // (The buckets stay allocated, so the rows below get fresh memory.)
        const N: u32 = 1_000_000;
        // Kept alive to the end: memory freed by one round would be reused by the next.
        let mut kept = Vec::new();
        for local_addrs in [0usize, 2, MAX_LOCAL_ADDRS] {
            let before = rss_kib();
            let records = (0..N).map(|n| {
                let record = Record {
                    observed: SocketAddr::from(([198, 51, 100, 1], n as u16)),
                    local_addrs: (0..local_addrs)
                        .map(|i| SocketAddr::from(([10, 0, 0, i as u8], 4000)))
                        .collect(),
                    mapped_port: None,
                    observed_other: None,
                    last_seen: T0 + time::Duration::seconds(n.into()),
                    registered_at: T0,
                };
                (big_id(n), record)
            });
            let reg = Registry::with_limits(records, [1; 32], RegistryLimits::default());
            let after = rss_kib();
            println!(
                "{local_addrs} local addresses: {} bytes per offline row ({} rows, RSS +{} KiB)",
                (after - before) * 1024 / u64::from(N),
                reg.registered(),
                after - before
            );
            kept.push(reg);
        }
        // How long one expiry chunk holds the registry's lock at the cap.
        let reg = &mut kept[0];
        let started = Instant::now();
        let expired = reg.expire(T0 + 1000 * DAY, 1024);
        println!(
            "expiring {} of {} rows took {:?}",
            expired.len(),
            N,
            started.elapsed()
        );
    }
}
