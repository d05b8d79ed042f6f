//! The rendezvous's protocol logic as a state machine: no sockets, no clocks, no tasks.
//!
//! The driver feeds it who sent what (the id comes from the client certificate, the observed
//! address from the packets) and the time, and carries out what it returns: a reply, pushes to
//! other connections, and records to persist. Tests drive it directly.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use common::message::{Candidate, CandidateKind, PeerInfo, MAX_LOCAL_ADDRS};
use common::{ControlMessage, ErrorCode, PeerId, PROTOCOL_VERSION};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

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
                let requester = entry.requester;
                self.uncount(requester);
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

    fn uncount(&mut self, requester: PeerId) {
        if let Some(n) = self.pending_per_requester.get_mut(&requester) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.pending_per_requester.remove(&requester);
            }
        }
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
                self.uncount(old.requester);
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
                open_until,
                pending: true,
                consent_until: existing.as_ref().and_then(|e| e.consent_until),
                open_stamp,
                consent_stamp: existing.as_ref().map_or(0, |e| e.consent_stamp),
            },
        );
        self.open_queue.push_back((open_until, key, open_stamp));
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
        self.uncount(requester);
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
    /// Introductions whose requester reported a direct path.
    pub punches_succeeded: u64,
    /// Introductions whose requester reported that punching found no direct path.
    pub punches_failed: u64,
    /// Requests refused as invalid.
    pub rejected: u64,
}

/// The registry and punch coordinator.
#[derive(Debug)]
pub struct Registry {
    peers: HashMap<PeerId, Record>,
    online: HashMap<PeerId, ConnId>,
    introductions: Introductions,
    next_nonce: u64,
    counters: Counters,
}

impl Registry {
    /// A registry holding `records` loaded from storage; nobody online. `nonce_seed` should be
    /// random so that punch nonces cannot be guessed across restarts.
    pub fn new(records: impl IntoIterator<Item = (PeerId, Record)>, nonce_seed: u64) -> Self {
        Registry {
            peers: records.into_iter().collect(),
            online: HashMap::new(),
            introductions: Introductions::default(),
            next_nonce: nonce_seed,
            counters: Counters::default(),
        }
    }

    /// Registered peers (online or not).
    pub fn registered(&self) -> usize {
        self.peers.len()
    }

    /// Peers with a live control connection.
    pub fn online(&self) -> usize {
        self.online.len()
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
            } => self.register(conn, id, observed, version, local_addrs, now),
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
            ControlMessage::Connect { id: target } => {
                let mut outcome = self.touch(id, observed, now);
                let (reply, pushes) = self.introduce(id, target, now);
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

    fn register(
        &mut self,
        conn: ConnId,
        id: PeerId,
        observed: SocketAddr,
        version: u32,
        mut local_addrs: Vec<SocketAddr>,
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
        local_addrs.retain(|a| a.port() != 0 && !a.ip().is_unspecified());
        local_addrs.dedup();
        let registered_at = self.peers.get(&id).map_or(now, |r| r.registered_at);
        let record = Record {
            observed,
            local_addrs,
            last_seen: now,
            registered_at,
        };
        self.peers.insert(id, record.clone());
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
            }),
            pushes: Vec::new(),
            persist: Some((id, record)),
        }
    }

    /// Refreshes `last_seen` in memory, and the observed address if the peer's packets now come
    /// from elsewhere (NAT rebinding, migration); only the latter needs persisting.
    fn touch(&mut self, id: PeerId, observed: SocketAddr, now: OffsetDateTime) -> Outcome {
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
        now: OffsetDateTime,
    ) -> (ControlMessage, Vec<(ConnId, ControlMessage)>) {
        if target == from {
            self.counters.rejected += 1;
            return (
                ControlMessage::error(ErrorCode::BadRequest, "cannot connect to yourself"),
                Vec::new(),
            );
        }
        let Some(target_record) = self.peers.get(&target) else {
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
        let Some(from_record) = self.peers.get(&from) else {
            return (
                ControlMessage::error(ErrorCode::NotRegistered, "register first"),
                Vec::new(),
            );
        };
        let nonce = self.next_nonce.wrapping_add(0x9E37_79B9_7F4A_7C15);
        if let Err(refusal) = self.introductions.introduce(from, target, nonce, now) {
            self.counters.rejected += 1;
            let message = match refusal {
                IntroductionRefusal::RequesterFull => format!(
                    "you have {MAX_INTRODUCTIONS_PER_REQUESTER} introductions waiting for an \
                     accept; try again in a minute"
                ),
                IntroductionRefusal::Full => "the server has too many introductions open; \
                                               try again later"
                    .to_owned(),
            };
            return (
                ControlMessage::error(ErrorCode::RateLimited, message),
                Vec::new(),
            );
        }
        self.next_nonce = nonce;
        self.counters.punches += 1;
        let to_requester = ControlMessage::Punch {
            peer: target,
            candidates: candidates(target_record),
            nonce,
        };
        let to_target = ControlMessage::Punch {
            peer: from,
            candidates: candidates(from_record),
            nonce,
        };
        (to_requester, vec![(target_conn, to_target)])
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
        let record = self.peers.get_mut(&id)?;
        record.last_seen = now;
        Some((id, record.clone()))
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

fn candidates(record: &Record) -> Vec<Candidate> {
    let mut out = Vec::new();
    if !is_virtual(&record.observed) {
        out.push(Candidate {
            addr: record.observed,
            kind: CandidateKind::Observed,
        });
    }
    for &addr in &record.local_addrs {
        if addr != record.observed && !is_virtual(&addr) {
            out.push(Candidate {
                addr,
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
            },
            T0,
        )
    }

    #[test]
    fn register_reports_the_observed_address_and_persists() {
        let mut reg = Registry::new([], 1);
        let out = register(&mut reg, 1, id(1), 4000);
        assert_eq!(
            out.reply,
            Some(ControlMessage::Registered {
                id: id(1),
                observed: addr(4000),
                keepalive_s: KEEPALIVE_S,
                version: PROTOCOL_VERSION
            })
        );
        let (who, record) = out.persist.unwrap();
        assert_eq!(who, id(1));
        assert_eq!(record.observed, addr(4000));
        assert_eq!(reg.online(), 1);
    }

    #[test]
    fn requests_before_register_are_refused() {
        let mut reg = Registry::new([], 1);
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
        let mut reg = Registry::new([], 1);
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

    #[test]
    fn connect_pushes_punch_to_both_with_the_same_nonce() {
        let mut reg = Registry::new([], 7);
        register(&mut reg, 1, id(1), 4000);
        register(&mut reg, 2, id(2), 5000);
        let out = reg.handle(
            1,
            id(1),
            addr(4000),
            ControlMessage::Connect { id: id(2) },
            T0,
        );
        let Some(ControlMessage::Punch {
            peer,
            candidates,
            nonce,
        }) = out.reply
        else {
            panic!("{:?}", out.reply)
        };
        assert_eq!(peer, id(2));
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
            },
        ) = &out.pushes[0]
        else {
            panic!()
        };
        assert_eq!(*conn, 2);
        assert_eq!(*pushed_peer, id(1));
        assert_eq!(*pushed_nonce, nonce);
        assert_eq!(pushed[0].addr, addr(4000));
        assert_eq!(reg.counters().punches, 1);
    }

    #[test]
    fn punch_results_are_counted_only_after_an_introduction() {
        let mut reg = Registry::new([], 7);
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
        reg.handle(
            1,
            id(1),
            addr(4000),
            ControlMessage::Connect { id: id(2) },
            T0,
        );
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
        reg.handle(
            conn,
            from,
            addr(4000),
            ControlMessage::Connect { id: to },
            now,
        )
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
        let mut reg = Registry::new([], 7);
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
        let mut reg = Registry::new([], 7);
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
                let _ = intros.introduce(peer(r), peer(1_000_000 + r * per + t), 1, T0);
            }
        }
        assert_eq!(intros.len(), MAX_INTRODUCTIONS);
        assert_eq!(
            intros.introduce(peer(999_999), peer(5), 1, T0),
            Err(IntroductionRefusal::Full)
        );
        // Expiry frees them all at once, through the queue.
        let later = T0 + ACCEPT_WINDOW + time::Duration::seconds(1);
        assert_eq!(intros.introduce(peer(999_999), peer(5), 1, later), Ok(()));
        assert_eq!(intros.len(), 1);
        assert_eq!(intros.open_queue.len(), 1);
        assert_eq!(intros.pending_per_requester.len(), 1);
    }

    #[test]
    fn the_expiry_queue_keeps_entries_renewed_after_their_first_record() {
        let mut intros = Introductions::default();
        intros.introduce(id(1), id(2), 5, T0).unwrap();
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
        let mut reg = Registry::new([], 1);
        register(&mut reg, 1, id(1), 4000);
        register(&mut reg, 2, id(2), 5000);
        reg.disconnected(2, id(2), T0);
        for (target, code) in [
            (id(2), ErrorCode::PeerOffline),
            (id(3), ErrorCode::NotFound),
            (id(1), ErrorCode::BadRequest),
        ] {
            let out = reg.handle(
                1,
                id(1),
                addr(4000),
                ControlMessage::Connect { id: target },
                T0,
            );
            match out.reply {
                Some(ControlMessage::Error { code: got, .. }) => assert_eq!(got, code),
                other => panic!("{other:?}"),
            }
            assert!(out.pushes.is_empty());
        }
    }

    #[test]
    fn virtual_tunnel_addresses_are_not_candidates() {
        let mut reg = Registry::new([], 7);
        register(&mut reg, 1, id(1), 4000);
        let tunnel: SocketAddr = "241.0.0.1:443".parse().unwrap();
        reg.handle(
            2,
            id(2),
            tunnel,
            ControlMessage::Register {
                version: PROTOCOL_VERSION,
                local_addrs: vec![SocketAddr::from(([10, 0, 2, 2], 5000))],
            },
            T0,
        );
        let out = reg.handle(
            1,
            id(1),
            addr(4000),
            ControlMessage::Connect { id: id(2) },
            T0,
        );
        let Some(ControlMessage::Punch { candidates, .. }) = out.reply else {
            panic!("{:?}", out.reply)
        };
        assert_eq!(candidates.len(), 1);
        assert_eq!(candidates[0].kind, CandidateKind::Local);
    }

    #[test]
    fn a_stale_connection_closing_does_not_take_the_new_one_offline() {
        let mut reg = Registry::new([], 1);
        register(&mut reg, 1, id(1), 4000);
        register(&mut reg, 2, id(1), 4001);
        assert_eq!(reg.disconnected(1, id(1), T0), None);
        assert_eq!(reg.connection_of(&id(1)), Some(2));
    }

    #[test]
    fn address_change_is_persisted_and_bad_registrations_refused() {
        let mut reg = Registry::new([], 1);
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
        let mut reg = Registry::new([], 1);
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
}
