//! The rendezvous's registry state machine (`rendezvous::core::Registry`), driven by a script of
//! operations decoded from the input (see `p2p_fuzz::registry_script`): six peers, up to three
//! connections each, control messages (register, query, connect, accept with the right or a
//! wrong nonce, ping, punch_result, and messages only the server sends), connections closing,
//! address migration, the expiry sweep (`Registry::expire` in small batches), and a clock that
//! moves forward by arbitrary steps (seconds to months).
//!
//! The driver is modelled as the server runs it: a connection belongs to one peer (its id comes
//! from the client certificate), a closed connection sends nothing more. It keeps its own model
//! of what the registry must remember (introductions with their nonce, accept window and
//! consent; offline peers and their last_seen; registrations per source) and checks the
//! registry against it. After every step:
//! - `Registry::check_invariants()` holds;
//! - each peer is online on at most one connection, and only on one of its own live ones; a
//!   connection maps to at most one peer; `online()` counts them; every online peer is
//!   registered; a registration that succeeds makes its connection the peer's one; the
//!   registered peers that are not online are exactly those whose online connection closed
//!   (and that did not register again or expire since);
//! - the reply has the kind the request calls for: `register` is refused `unsupported_version`
//!   exactly for another version, `bad_request` exactly for too many addresses, and otherwise
//!   registers or is `rate_limited`, and then only by a bucket that the source really emptied
//!   (at least a burst's worth of registrations, or of new identities, within the time the
//!   bucket takes to refill), never because the registry is full (six peers); a registration
//!   keeps the first `registered_at`; `connect` gives `punch` or exactly the error its target's
//!   state calls for (never `rate_limited`: six peers stay below the per-requester cap);
//!   `accept` is acknowledged exactly when it names the requester and the nonce of the pair's
//!   waiting introduction, is sent by its target, and comes within ACCEPT_WINDOW of the
//!   `connect`; `punch_result` is acknowledged exactly within ACCEPT_WINDOW of the pair's last
//!   `connect` (either side, accepted or not);
//! - pushes come only with a `punch` and go to the target's connection with the same nonce;
//!   nonces never repeat; candidates never include a virtual (240/4) address, a port 0 or an
//!   unspecified address, and are at most MAX_CANDIDATES;
//! - a persisted record is the sender's, holds its current address and at most MAX_LOCAL_ADDRS;
//! - every reply and push encodes within MAX_FRAME_LEN and decodes back to itself;
//! - counters never decrease, and each counts exactly the replies (and expiries) that say so;
//! - `relay_allowed(a, b)` is `UnknownPeer` exactly when `b` is not registered, otherwise `Ok`
//!   exactly while an accept acknowledged for the pair less than INTRODUCTION_TTL ago lasts (a
//!   later `connect` keeps it), else `NotAccepted` exactly while the pair's last `connect` is
//!   within ACCEPT_WINDOW and not accepted, else `NotIntroduced`;
//! - `expire(now, max)` deletes exactly the offline peers whose last_seen is at least
//!   `expire_after` (30 days) old, oldest first, at most `max`, and returns each with the
//!   last_seen it had; they are no longer registered, and an online peer never expires.
//!
//! The calls into the registry are in `Driver`: when its API changes, that is the place to
//! adapt. With `REGISTRY_TRACE` set in the environment, replaying an input prints each step
//! and its reply on stderr.

#![no_main]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use common::message::{CandidateKind, MAX_CANDIDATES, MAX_LOCAL_ADDRS};
use common::{ControlMessage, ErrorCode, PeerId, MAX_FRAME_LEN, PROTOCOL_VERSION};
use libfuzzer_sys::fuzz_target;
use p2p_fuzz::registry_script::{addr, peer, Msg, Op, CONNS_PER_PEER, FROM, PEERS};
use rendezvous::core::{
    ConnId, Counters, Outcome, Record, Registry, RegistryLimits, RelayRefusal, ACCEPT_WINDOW,
    INTRODUCTION_TTL, MAX_INTRODUCTIONS_PER_REQUESTER,
};
use rendezvous::sources::SourceKey;
use time::OffsetDateTime;

const T0: OffsetDateTime = time::macros::datetime!(2026-11-25 08:00 UTC);

/// What the driver knows of the introduction between two peers (either way round): the last
/// `connect` that got a `punch`, and the last accept that was acknowledged.
#[derive(Debug, Clone, Copy)]
struct Intro {
    /// Who sent the last `connect`.
    requester: PeerId,
    /// Who was asked, and must accept.
    target: PeerId,
    /// The last `punch`'s nonce.
    nonce: u64,
    /// The last `connect` plus ACCEPT_WINDOW: until then it can be accepted and reported on.
    open_until: OffsetDateTime,
    /// The last `connect` has not been accepted.
    pending: bool,
    /// The last acknowledged accept plus INTRODUCTION_TTL (a later `connect` keeps it).
    consent_until: Option<OffsetDateTime>,
}

impl Intro {
    /// What `relay_allowed` must say between the two (both registered) at `now`.
    fn relay(&self, now: OffsetDateTime) -> Result<(), RelayRefusal> {
        if self.consent_until.is_some_and(|until| until > now) {
            Ok(())
        } else if self.pending && self.open_until > now {
            Err(RelayRefusal::NotAccepted)
        } else {
            Err(RelayRefusal::NotIntroduced)
        }
    }
}

/// A message sent, with what the driver knew just before.
struct Sent {
    p: u8,
    conn: ConnId,
    observed: SocketAddr,
    msg: Msg,
    message: ControlMessage,
    /// `conn` was the peer's online connection.
    online_before: bool,
    /// The peer had a row.
    registered_before: bool,
}

/// The registry and what the driver around it knows: live connections, the clock, and what the
/// script has seen happen (introductions, nonces, who went offline when, registrations).
struct Driver {
    registry: Registry,
    now: OffsetDateTime,
    next_conn: ConnId,
    live: HashMap<u8, Vec<ConnId>>,
    /// Unordered pair -> its introduction.
    intros: HashMap<(PeerId, PeerId), Intro>,
    nonces: HashSet<u64>,
    /// Registered script peers that are offline -> their last_seen (when their online
    /// connection closed).
    offline: HashMap<u8, OffsetDateTime>,
    /// Registered script peers -> their first registration.
    registered_at: HashMap<u8, OffsetDateTime>,
    /// When each source's registration bucket gave a token.
    source_takes: HashMap<SourceKey, Vec<OffsetDateTime>>,
    /// When each source's new-identity bucket gave a token.
    new_id_takes: HashMap<SourceKey, Vec<OffsetDateTime>>,
    /// The counters as the replies and expiries seen account for them.
    expected: Counters,
    /// The registry's counters after the last step.
    counters: Counters,
    /// Print each step (`REGISTRY_TRACE`).
    trace: bool,
}

fn pair(a: PeerId, b: PeerId) -> (PeerId, PeerId) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

fn is_virtual(addr: &SocketAddr) -> bool {
    matches!(addr, SocketAddr::V4(v4) if v4.ip().octets()[0] >= 240)
}

/// The source a registration from `observed` counts against: no tunnel is ever opened here, so
/// a virtual address counts against the shared unknown-tunnel key.
fn source_of(observed: SocketAddr) -> SourceKey {
    if is_virtual(&observed) {
        SourceKey::of(IpAddr::V4(Ipv4Addr::new(240, 0, 0, 0)))
    } else {
        SourceKey::of(observed.ip())
    }
}

/// A window over which a bucket of `burst` refilling at `rate` per second refills at least a
/// whole burst: a bucket that is empty at some time gave at least `burst - 1` tokens more
/// (so, counting whole tokens, `burst`) during the window before it.
fn refill_window(burst: f64, rate: f64) -> time::Duration {
    time::Duration::seconds_f64(burst / rate * 1.05 + 1.0)
}

/// Takes in `takes` within `window` before `now`.
fn recent(
    takes: Option<&Vec<OffsetDateTime>>,
    now: OffsetDateTime,
    window: time::Duration,
) -> usize {
    takes.map_or(0, |t| t.iter().filter(|at| **at >= now - window).count())
}

fn error_code(msg: &Option<ControlMessage>) -> Option<ErrorCode> {
    match msg {
        Some(ControlMessage::Error { code, .. }) => Some(*code),
        _ => None,
    }
}

fn assert_wire_safe(msg: &ControlMessage) {
    let bytes = msg.encode();
    assert!(
        bytes.len() <= MAX_FRAME_LEN,
        "a {}-byte {}",
        bytes.len(),
        msg.kind()
    );
    assert_eq!(
        ControlMessage::decode(&bytes).as_ref(),
        Ok(msg),
        "does not survive the wire"
    );
}

impl Driver {
    fn new() -> Self {
        Driver {
            // The introduction rates (per requester and per target) are unit-tested in
            // `core::tests`; the model here does not predict them, so they are out of the way.
            registry: Registry::with_limits(
                [],
                [0x5e; 32],
                RegistryLimits {
                    introductions_burst: 1e12,
                    introductions_to_target_burst: 1e12,
                    ..RegistryLimits::default()
                },
            ),
            now: T0,
            next_conn: 1,
            live: HashMap::new(),
            intros: HashMap::new(),
            nonces: HashSet::new(),
            offline: HashMap::new(),
            registered_at: HashMap::new(),
            source_takes: HashMap::new(),
            new_id_takes: HashMap::new(),
            expected: Counters::default(),
            counters: Counters::default(),
            trace: std::env::var_os("REGISTRY_TRACE").is_some(),
        }
    }

    /// Connection number `n` of script peer `p`: one of its live ones, or a new one.
    fn conn(&mut self, p: u8, n: u8) -> ConnId {
        let live = self.live.entry(p).or_default();
        let n = usize::from(n) % (CONNS_PER_PEER + 1);
        if n < live.len() {
            return live[n];
        }
        if live.len() == CONNS_PER_PEER {
            return live[live.len() - 1];
        }
        let conn = self.next_conn;
        self.next_conn += 1;
        live.push(conn);
        conn
    }

    /// The nonce an `accept` from `me` carries: the pair's last introduction's, or a wrong one.
    fn accept_nonce(&self, me: PeerId, msg: Msg) -> u64 {
        let Msg::Accept(requester, right_nonce) = msg else {
            return 0;
        };
        match self.intros.get(&pair(me, peer(requester))) {
            Some(intro) if right_nonce => intro.nonce,
            Some(intro) => intro.nonce ^ 1,
            None => u64::from(right_nonce),
        }
    }

    fn step(&mut self, op: Op) {
        if self.trace {
            eprintln!("{} {op:?}", self.now);
        }
        match op {
            Op::Send {
                peer: p,
                conn,
                from,
                msg,
            } => {
                let p = p % PEERS;
                let me = peer(p);
                let conn = self.conn(p, conn);
                let observed = addr(&FROM, from);
                let message = msg.to_message(self.accept_nonce(me, msg));
                let online_before = self.registry.connection_of(&me) == Some(conn);
                let registered_before = self.registry.observed_of(&me).is_some();
                let outcome = self
                    .registry
                    .handle(conn, me, observed, message.clone(), self.now);
                let sent = Sent {
                    p,
                    conn,
                    observed,
                    msg,
                    message,
                    online_before,
                    registered_before,
                };
                self.check_outcome(&sent, outcome);
            }
            Op::Close { peer: p, conn } => {
                let p = p % PEERS;
                let live = self.live.entry(p).or_default();
                if live.is_empty() {
                    return;
                }
                let conn = live.remove(usize::from(conn) % live.len());
                let was_online = self.registry.connection_of(&peer(p)) == Some(conn);
                let persisted = self.registry.disconnected(conn, peer(p), self.now);
                if was_online {
                    let (who, record) = persisted.expect("closing the online connection persists");
                    assert_eq!(who, peer(p));
                    assert_eq!(record.last_seen, self.now);
                    assert_eq!(self.registry.connection_of(&peer(p)), None);
                    self.offline.insert(p, self.now);
                } else {
                    assert_eq!(persisted, None, "a stale connection closing persisted");
                }
            }
            Op::Observe { peer: p, from } => {
                let p = p % PEERS;
                let observed = addr(&FROM, from);
                let online = self.registry.connection_of(&peer(p)).is_some();
                let before = self.registry.observed_of(&peer(p));
                if let Some((who, record)) = self.registry.observe(peer(p), observed, self.now) {
                    assert!(online, "an offline peer's record persisted on migration");
                    self.check_record(p, &who, &record);
                }
                if online {
                    assert_eq!(self.registry.observed_of(&peer(p)), Some(observed));
                } else {
                    assert_eq!(self.registry.observed_of(&peer(p)), before);
                }
            }
            Op::Wait { secs } => {
                self.now += time::Duration::seconds(i64::from(secs));
            }
            Op::Expire { max } => self.expire(1 + usize::from(max % 8)),
        }
        self.check_invariants();
    }

    fn expire(&mut self, max: usize) {
        let expire_after = time::Duration::try_from(self.registry.limits().expire_after)
            .expect("the expiry time fits");
        let cutoff = self.now - expire_after;
        let mut due: Vec<(OffsetDateTime, PeerId)> = self
            .offline
            .iter()
            .filter(|(_, last_seen)| **last_seen <= cutoff)
            .map(|(p, last_seen)| (*last_seen, peer(*p)))
            .collect();
        due.sort();
        due.truncate(max);
        let expired = self.registry.expire(self.now, max);
        if self.trace {
            eprintln!("  -> expired {expired:?}");
        }
        assert!(
            expired.len() <= max,
            "{} rows expired, max {max}",
            expired.len()
        );
        for (id, last_seen) in &expired {
            let p = (0..PEERS)
                .find(|p| peer(*p) == *id)
                .unwrap_or_else(|| panic!("expired {id}, who never registered"));
            let offline_since = self
                .offline
                .remove(&p)
                .unwrap_or_else(|| panic!("expired peer {p}, who is online or not registered"));
            assert_eq!(
                *last_seen, offline_since,
                "peer {p} expired with the wrong last_seen"
            );
            assert!(
                *last_seen <= cutoff,
                "peer {p} expired at {}, last seen {last_seen}",
                self.now
            );
            assert_eq!(self.registry.connection_of(id), None);
            assert_eq!(
                self.registry.observed_of(id),
                None,
                "peer {p} expired but still registered"
            );
            self.registered_at.remove(&p);
        }
        let want: Vec<(PeerId, OffsetDateTime)> = due.iter().map(|(at, id)| (*id, *at)).collect();
        assert_eq!(
            expired, want,
            "expire(now, {max}) must delete the oldest offline rows past the expiry"
        );
        self.expected.expired += expired.len() as u64;
    }

    fn check_record(&self, p: u8, who: &PeerId, record: &Record) {
        assert_eq!(*who, peer(p), "persisted someone else's record");
        assert_eq!(self.registry.observed_of(who), Some(record.observed));
        assert!(record.local_addrs.len() <= MAX_LOCAL_ADDRS);
        assert!(record.registered_at <= record.last_seen);
        assert!(record.last_seen <= self.now);
    }

    fn check_outcome(&mut self, sent: &Sent, outcome: Outcome) {
        let Sent {
            p,
            observed,
            msg,
            ref message,
            online_before,
            ..
        } = *sent;
        let me = peer(p);
        let reply = outcome
            .reply
            .as_ref()
            .unwrap_or_else(|| panic!("no reply to {message:?}"));
        if self.trace {
            eprintln!("  {message:?}\n  -> {reply:?}");
        }
        assert_wire_safe(reply);
        for (_, push) in &outcome.pushes {
            assert_wire_safe(push);
        }
        if let Some((who, record)) = &outcome.persist {
            self.check_record(p, who, record);
            assert_eq!(record.observed, observed);
        }
        let code = error_code(&outcome.reply);
        if matches!(
            code,
            Some(ErrorCode::BadRequest | ErrorCode::NotRegistered | ErrorCode::UnsupportedVersion)
        ) {
            self.expected.rejected += 1;
        }
        if !matches!(msg, Msg::Register { .. }) && !online_before {
            assert_eq!(code, Some(ErrorCode::NotRegistered));
            assert!(outcome.pushes.is_empty() && outcome.persist.is_none());
            return;
        }
        if !matches!(msg, Msg::Connect(_)) {
            assert!(outcome.pushes.is_empty(), "pushes for {message:?}");
        }
        match msg {
            Msg::Register { version_ok, .. } => {
                let announced = match message {
                    ControlMessage::Register { local_addrs, .. } => local_addrs.len(),
                    _ => unreachable!(),
                };
                self.check_register(sent, &outcome, version_ok, announced);
            }
            Msg::Query(target) => {
                self.expected.queries += 1;
                match reply {
                    ControlMessage::PeerInfo(info) => {
                        assert_eq!(info.id, peer(target));
                        let online = self.registry.connection_of(&info.id).is_some();
                        assert_eq!(info.online, online);
                        assert_eq!(Some(info.observed), self.registry.observed_of(&info.id));
                        assert!(info.local_addrs.len() <= MAX_LOCAL_ADDRS);
                        if online {
                            assert_eq!(info.last_seen, self.now);
                        } else {
                            assert_eq!(
                                Some(&info.last_seen),
                                self.offline.get(&(target % PEERS)),
                                "an offline peer's last_seen is when its connection closed"
                            );
                        }
                    }
                    ControlMessage::Error { code, .. } => {
                        assert_eq!(*code, ErrorCode::NotFound);
                        assert_eq!(self.registry.observed_of(&peer(target)), None);
                    }
                    other => panic!("query answered with {other:?}"),
                }
            }
            // The script's connects to odd targets carry a first flight (registry_script).
            Msg::Connect(target) => self.check_connect(me, peer(target), target % 2 == 1, &outcome),
            Msg::Ping(seq) => {
                assert_eq!(*reply, ControlMessage::Pong { seq: seq.into() });
            }
            Msg::PunchResult(other, direct) => {
                let intro = self.intros.get(&pair(me, peer(other)));
                let open = intro.is_some_and(|e| e.open_until > self.now);
                match reply {
                    ControlMessage::Ack {} => {
                        assert!(
                            open,
                            "punch_result acknowledged at {} outside the accept window: {intro:?}",
                            self.now
                        );
                        if direct {
                            self.expected.punches_succeeded += 1;
                        } else {
                            self.expected.punches_failed += 1;
                        }
                    }
                    ControlMessage::Error { code, .. } => {
                        assert_eq!(*code, ErrorCode::BadRequest);
                        assert!(
                            !open,
                            "punch_result refused at {} within the accept window: {intro:?}",
                            self.now
                        );
                    }
                    other => panic!("punch_result answered with {other:?}"),
                }
            }
            Msg::Accept(requester, _) => {
                let requester = peer(requester);
                let ControlMessage::Accept { nonce, .. } = *message else {
                    unreachable!()
                };
                let now = self.now;
                let intro = self.intros.get_mut(&pair(me, requester));
                let acceptable = intro.as_ref().is_some_and(|e| {
                    e.pending
                        && e.target == me
                        && e.requester == requester
                        && e.nonce == nonce
                        && e.open_until > now
                });
                match reply {
                    ControlMessage::Ack {} => {
                        assert!(
                            acceptable,
                            "accept from {p} (nonce {nonce}) acknowledged at {now}: {intro:?}"
                        );
                        let intro = intro.expect("acceptable");
                        intro.pending = false;
                        intro.consent_until = Some(now + INTRODUCTION_TTL);
                    }
                    ControlMessage::Error { code, .. } => {
                        assert_eq!(*code, ErrorCode::BadRequest);
                        assert!(
                            !acceptable,
                            "accept from {p} (nonce {nonce}) refused at {now}: {intro:?}"
                        );
                    }
                    other => panic!("accept answered with {other:?}"),
                }
            }
            Msg::ServerSide(_) => {
                assert_eq!(code, Some(ErrorCode::BadRequest));
                assert!(outcome.persist.is_none());
            }
        }
    }

    fn check_register(
        &mut self,
        sent: &Sent,
        outcome: &Outcome,
        version_ok: bool,
        announced: usize,
    ) {
        let me = peer(sent.p);
        let source = source_of(sent.observed);
        let reply = outcome.reply.as_ref().expect("checked");
        match reply {
            ControlMessage::Registered {
                id,
                observed: seen,
                version,
                ..
            } => {
                assert!(
                    version_ok && announced <= MAX_LOCAL_ADDRS,
                    "accepted {:?}",
                    sent.message
                );
                self.expected.registrations += 1;
                assert_eq!(
                    (*id, *seen, *version),
                    (me, sent.observed, PROTOCOL_VERSION)
                );
                assert_eq!(self.registry.connection_of(&me), Some(sent.conn));
                let (_, record) = outcome.persist.as_ref().expect("a registration persists");
                assert_eq!(record.last_seen, self.now);
                for a in &record.local_addrs {
                    assert!(a.port() != 0 && !a.ip().is_unspecified(), "kept local {a}");
                }
                assert_eq!(
                    sent.registered_before,
                    self.registered_at.contains_key(&sent.p)
                );
                let first = *self.registered_at.entry(sent.p).or_insert(self.now);
                assert_eq!(record.registered_at, first, "registered_at changed");
                self.offline.remove(&sent.p);
                self.source_takes.entry(source).or_default().push(self.now);
                if !sent.registered_before {
                    self.new_id_takes.entry(source).or_default().push(self.now);
                }
            }
            ControlMessage::Error { code, .. } => {
                assert!(outcome.persist.is_none());
                let want = if !version_ok {
                    ErrorCode::UnsupportedVersion
                } else if announced > MAX_LOCAL_ADDRS {
                    ErrorCode::BadRequest
                } else {
                    ErrorCode::RateLimited
                };
                assert_eq!(*code, want, "register refused: {:?}", sent.message);
                if *code == ErrorCode::RateLimited {
                    self.check_rate_limited(sent, source);
                }
            }
            other => panic!("register answered with {other:?}"),
        }
    }

    /// A registration was refused `rate_limited`: by the limit whose counter rose, which must
    /// have been used up.
    fn check_rate_limited(&mut self, sent: &Sent, source: SourceKey) {
        let limits = *self.registry.limits();
        let (before, after) = (self.counters, self.registry.counters());
        let rises = (
            after
                .refused_source_rate
                .saturating_sub(before.refused_source_rate),
            after
                .refused_new_ids_rate
                .saturating_sub(before.refused_new_ids_rate),
            after.refused_full.saturating_sub(before.refused_full),
        );
        match rises {
            (1, 0, 0) => {
                let window = refill_window(limits.registrations_burst, limits.registrations_per_s);
                let n = recent(self.source_takes.get(&source), self.now, window);
                assert!(
                    n as f64 > limits.registrations_burst - 1.0,
                    "registration refused for the source's rate after {n} registrations \
                     from {source} within {window}"
                );
                self.expected.refused_source_rate += 1;
            }
            (0, 1, 0) => {
                assert!(
                    !sent.registered_before,
                    "a known identity refused as a new one"
                );
                // The source's registration bucket gave its token before.
                self.source_takes.entry(source).or_default().push(self.now);
                let window = refill_window(limits.new_ids_burst, limits.new_ids_per_s);
                let n = recent(self.new_id_takes.get(&source), self.now, window);
                assert!(
                    n as f64 > limits.new_ids_burst - 1.0,
                    "new identity refused for the source's rate after {n} new identities \
                     from {source} within {window}"
                );
                self.expected.refused_new_ids_rate += 1;
            }
            (0, 0, 1) => panic!(
                "registry full with {} rows (max {})",
                self.registry.registered(),
                limits.max_registered
            ),
            other => panic!("rate_limited, refusal counters rose by {other:?}"),
        }
    }

    fn check_connect(&mut self, me: PeerId, target: PeerId, flight: bool, outcome: &Outcome) {
        let reply = outcome.reply.as_ref().expect("checked");
        match reply {
            ControlMessage::Punch {
                peer: whom,
                candidates,
                nonce,
                key,
                first_flight: echoed,
                ..
            } => {
                assert!(echoed.is_none(), "the first flight echoed to its requester");
                assert_ne!(target, me, "introduced to itself");
                assert_eq!(*whom, target);
                assert!(self.nonces.insert(*nonce), "nonce {nonce} handed out twice");
                let target_conn = self.registry.connection_of(&target).expect("target online");
                assert!(self.live.values().any(|c| c.contains(&target_conn)));
                assert_eq!(outcome.pushes.len(), 1, "one push, to the target");
                let (to, push) = &outcome.pushes[0];
                assert_eq!(*to, target_conn);
                match push {
                    ControlMessage::Punch {
                        peer: requester,
                        candidates: theirs,
                        nonce: same,
                        key: same_key,
                        first_flight: pushed,
                        ..
                    } => {
                        assert_eq!((*requester, *same), (me, *nonce));
                        assert_eq!(pushed.is_some(), flight, "the first flight, to the target");
                        assert_eq!(same_key, key, "both sides get the same key");
                        for c in candidates.iter().chain(theirs) {
                            assert!(!is_virtual(&c.addr), "virtual candidate {c:?}");
                            assert!(c.addr.port() != 0 && !c.addr.ip().is_unspecified());
                            if c.kind != CandidateKind::Observed {
                                assert_eq!(c.kind, CandidateKind::Local);
                            }
                        }
                        assert!(candidates.len() <= MAX_CANDIDATES);
                        assert!(theirs.len() <= MAX_CANDIDATES);
                    }
                    other => panic!("the target was pushed {other:?}"),
                }
                self.expected.punches += 1;
                self.expected.first_flights += u64::from(flight);
                let key = pair(me, target);
                let consent_until = self.intros.get(&key).and_then(|e| e.consent_until);
                self.intros.insert(
                    key,
                    Intro {
                        requester: me,
                        target,
                        nonce: *nonce,
                        open_until: self.now + ACCEPT_WINDOW,
                        pending: true,
                        consent_until,
                    },
                );
            }
            ControlMessage::Error { code, .. } => {
                assert!(outcome.pushes.is_empty());
                match code {
                    ErrorCode::BadRequest => assert_eq!(target, me),
                    ErrorCode::NotFound => {
                        assert_ne!(target, me);
                        assert_eq!(self.registry.observed_of(&target), None)
                    }
                    ErrorCode::PeerOffline => {
                        assert_ne!(target, me);
                        assert!(self.registry.observed_of(&target).is_some());
                        assert_eq!(self.registry.connection_of(&target), None)
                    }
                    ErrorCode::RateLimited => panic!(
                        "connect refused rate_limited, though a peer here has at most {} \
                         introductions waiting (the cap is {MAX_INTRODUCTIONS_PER_REQUESTER})",
                        PEERS - 1
                    ),
                    other => panic!("connect refused with {other:?}"),
                }
            }
            other => panic!("connect answered with {other:?}"),
        }
    }

    fn check_invariants(&mut self) {
        if let Err(e) = self.registry.check_invariants() {
            panic!("Registry::check_invariants: {e}");
        }
        let mut online = 0;
        let mut conns = HashSet::new();
        let registered: Vec<bool> = (0..PEERS)
            .map(|p| self.registry.observed_of(&peer(p)).is_some())
            .collect();
        for p in 0..PEERS {
            let id = peer(p);
            let is_registered = registered[usize::from(p)];
            assert_eq!(
                is_registered,
                self.registered_at.contains_key(&p),
                "peer {p} registered, or not, behind the driver's back"
            );
            if let Some(conn) = self.registry.connection_of(&id) {
                online += 1;
                assert!(
                    self.live.get(&p).is_some_and(|live| live.contains(&conn)),
                    "peer {p} online on a connection that is not its live one"
                );
                assert!(conns.insert(conn), "connection {conn} maps to two peers");
                assert!(is_registered, "online but not registered");
                assert!(!self.offline.contains_key(&p), "peer {p} online again");
            } else {
                assert_eq!(
                    is_registered,
                    self.offline.contains_key(&p),
                    "peer {p} is offline: registered, or not"
                );
            }
            for q in 0..PEERS {
                let other = peer(q);
                let intro = self.intros.get(&pair(id, other));
                let want = if !registered[usize::from(q)] {
                    Err(RelayRefusal::UnknownPeer)
                } else {
                    intro.map_or(Err(RelayRefusal::NotIntroduced), |e| e.relay(self.now))
                };
                assert_eq!(
                    self.registry.relay_allowed(id, other, self.now),
                    want,
                    "relay_allowed({p} -> {q}) at {}, introduction {intro:?}",
                    self.now
                );
            }
        }
        assert_eq!(self.registry.online(), online);
        assert_eq!(self.registry.registered(), online + self.offline.len());
        let now = self.registry.counters();
        let before = self.counters;
        for (field, a, b) in [
            ("registrations", before.registrations, now.registrations),
            ("queries", before.queries, now.queries),
            ("punches", before.punches, now.punches),
            (
                "punches_succeeded",
                before.punches_succeeded,
                now.punches_succeeded,
            ),
            ("punches_failed", before.punches_failed, now.punches_failed),
            ("rejected", before.rejected, now.rejected),
            (
                "refused_source_rate",
                before.refused_source_rate,
                now.refused_source_rate,
            ),
            (
                "refused_new_ids_rate",
                before.refused_new_ids_rate,
                now.refused_new_ids_rate,
            ),
            ("refused_full", before.refused_full, now.refused_full),
            ("expired", before.expired, now.expired),
        ] {
            assert!(b >= a, "counter {field} went down: {a} -> {b}");
        }
        assert_eq!(
            now.punches,
            self.nonces.len() as u64,
            "punches != punch replies"
        );
        assert_eq!(
            now, self.expected,
            "counters != what the replies account for"
        );
        self.counters = now;
    }
}

fuzz_target!(|data: &[u8]| {
    let mut driver = Driver::new();
    let mut input = data;
    while let Some(op) = Op::decode(&mut input) {
        driver.step(op);
    }
});
