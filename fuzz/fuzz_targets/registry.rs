//! The rendezvous's registry state machine (`rendezvous::core::Registry`), driven by a script of
//! operations decoded from the input (see `p2p_fuzz::registry_script`): six peers, up to three
//! connections each, control messages (register, query, connect, ping, punch_result, and
//! messages only the server sends), connections closing, address migration, and a clock that
//! moves forward by arbitrary steps (seconds to months).
//!
//! The driver is modelled as the server runs it: a connection belongs to one peer (its id comes
//! from the client certificate), a closed connection sends nothing more. After every step:
//! - each peer is online on at most one connection, and only on one of its own live ones; a
//!   connection maps to at most one peer; `online()` counts them; every online peer is
//!   registered; a registration that succeeds makes its connection the peer's one;
//! - the reply has the kind the request calls for (per request: the success reply or one of the
//!   errors it may give), pushes come only with a `punch` and go to the target's connection with
//!   the same nonce; nonces never repeat; candidates never include a virtual (240/4) address, a
//!   port 0 or an unspecified address, and are at most 1 + MAX_LOCAL_ADDRS;
//! - a persisted record is the sender's, holds its current address and at most MAX_LOCAL_ADDRS;
//! - every reply and push encodes within MAX_FRAME_LEN and decodes back to itself;
//! - counters never decrease; registrations and punches count exactly the replies that say so;
//! - `relay_allowed(a, b)` only for pairs introduced (a `punch` between them) less than
//!   INTRODUCTION_TTL ago, with `b` registered; `punch_result` acknowledged only then.
//!
//! The calls into the registry are in `Driver`: when its API changes, that is the place to
//! adapt.

#![no_main]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use common::message::{CandidateKind, MAX_LOCAL_ADDRS};
use common::{ControlMessage, ErrorCode, PeerId, MAX_FRAME_LEN, PROTOCOL_VERSION};
use libfuzzer_sys::fuzz_target;
use p2p_fuzz::registry_script::{addr, peer, Msg, Op, CONNS_PER_PEER, FROM, PEERS};
use rendezvous::core::{ConnId, Counters, Outcome, Record, Registry, INTRODUCTION_TTL};
use time::OffsetDateTime;

const T0: OffsetDateTime = time::macros::datetime!(2026-11-25 08:00 UTC);

/// The registry and what the driver around it knows: live connections, the clock, and what the
/// script has seen happen (introductions, nonces).
struct Driver {
    registry: Registry,
    now: OffsetDateTime,
    next_conn: ConnId,
    live: HashMap<u8, Vec<ConnId>>,
    /// Unordered pair -> when its last introduction expires.
    introduced: HashMap<(PeerId, PeerId), OffsetDateTime>,
    nonces: HashSet<u64>,
    /// `registered` replies seen.
    registrations: u64,
    counters: Counters,
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
            registry: Registry::new([], 0x5eed),
            now: T0,
            next_conn: 1,
            live: HashMap::new(),
            introduced: HashMap::new(),
            nonces: HashSet::new(),
            registrations: 0,
            counters: Counters::default(),
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

    fn step(&mut self, op: Op) {
        match op {
            Op::Send {
                peer: p,
                conn,
                from,
                msg,
            } => {
                let p = p % PEERS;
                let conn = self.conn(p, conn);
                let observed = addr(&FROM, from);
                let message = msg.to_message();
                let online_before = self.registry.connection_of(&peer(p)) == Some(conn);
                let outcome =
                    self.registry
                        .handle(conn, peer(p), observed, message.clone(), self.now);
                self.check_outcome(p, conn, observed, msg, &message, online_before, outcome);
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
                } else {
                    assert_eq!(persisted, None, "a stale connection closing persisted");
                }
            }
            Op::Observe { peer: p, from } => {
                let p = p % PEERS;
                let observed = addr(&FROM, from);
                let registered = self.registry.observed_of(&peer(p)).is_some();
                if let Some((who, record)) = self.registry.observe(peer(p), observed, self.now) {
                    self.check_record(p, &who, &record);
                }
                if registered {
                    assert_eq!(self.registry.observed_of(&peer(p)), Some(observed));
                }
            }
            Op::Wait { secs } => {
                self.now += time::Duration::seconds(i64::from(secs));
            }
        }
        self.check_invariants();
    }

    fn check_record(&self, p: u8, who: &PeerId, record: &Record) {
        assert_eq!(*who, peer(p), "persisted someone else's record");
        assert_eq!(self.registry.observed_of(who), Some(record.observed));
        assert!(record.local_addrs.len() <= MAX_LOCAL_ADDRS);
        assert!(record.registered_at <= record.last_seen);
        assert!(record.last_seen <= self.now);
    }

    #[allow(clippy::too_many_arguments)]
    fn check_outcome(
        &mut self,
        p: u8,
        conn: ConnId,
        observed: SocketAddr,
        msg: Msg,
        message: &ControlMessage,
        online_before: bool,
        outcome: Outcome,
    ) {
        let me = peer(p);
        let reply = outcome
            .reply
            .as_ref()
            .unwrap_or_else(|| panic!("no reply to {message:?}"));
        assert_wire_safe(reply);
        for (_, push) in &outcome.pushes {
            assert_wire_safe(push);
        }
        if let Some((who, record)) = &outcome.persist {
            self.check_record(p, who, record);
        }
        if !matches!(msg, Msg::Register { .. }) && !online_before {
            assert_eq!(error_code(&outcome.reply), Some(ErrorCode::NotRegistered));
            assert!(outcome.pushes.is_empty() && outcome.persist.is_none());
            return;
        }
        match msg {
            Msg::Register {
                version_ok,
                too_many,
                ..
            } => match reply {
                ControlMessage::Registered {
                    id,
                    observed: seen,
                    version,
                    ..
                } => {
                    assert!(version_ok && !too_many, "accepted {message:?}");
                    self.registrations += 1;
                    assert_eq!((*id, *seen, *version), (me, observed, PROTOCOL_VERSION));
                    assert_eq!(self.registry.connection_of(&me), Some(conn));
                    let (_, record) = outcome.persist.as_ref().expect("a registration persists");
                    assert_eq!(record.last_seen, self.now);
                    for a in &record.local_addrs {
                        assert!(a.port() != 0 && !a.ip().is_unspecified(), "kept local {a}");
                    }
                    assert!(outcome.pushes.is_empty());
                }
                ControlMessage::Error { code, .. } => {
                    assert!(
                        matches!(
                            code,
                            ErrorCode::UnsupportedVersion
                                | ErrorCode::BadRequest
                                | ErrorCode::RateLimited
                        ),
                        "register refused with {code:?}"
                    );
                    if !version_ok {
                        assert_eq!(*code, ErrorCode::UnsupportedVersion);
                    }
                    assert!(outcome.pushes.is_empty() && outcome.persist.is_none());
                }
                other => panic!("register answered with {other:?}"),
            },
            Msg::Query(target) => match reply {
                ControlMessage::PeerInfo(info) => {
                    assert_eq!(info.id, peer(target));
                    let online = self.registry.connection_of(&info.id).is_some();
                    assert_eq!(info.online, online);
                    assert_eq!(Some(info.observed), self.registry.observed_of(&info.id));
                    assert!(info.local_addrs.len() <= MAX_LOCAL_ADDRS);
                    assert!(info.last_seen <= self.now);
                    if online {
                        assert_eq!(info.last_seen, self.now);
                    }
                }
                ControlMessage::Error { code, .. } => {
                    assert!(matches!(code, ErrorCode::NotFound | ErrorCode::RateLimited));
                    assert_eq!(self.registry.observed_of(&peer(target)), None);
                }
                other => panic!("query answered with {other:?}"),
            },
            Msg::Connect(target) => {
                let target = peer(target);
                match reply {
                    ControlMessage::Punch {
                        peer: whom,
                        candidates,
                        nonce,
                    } => {
                        assert_ne!(target, me, "introduced to itself");
                        assert_eq!(*whom, target);
                        assert!(self.nonces.insert(*nonce), "nonce {nonce} handed out twice");
                        let target_conn =
                            self.registry.connection_of(&target).expect("target online");
                        assert!(self.live.values().any(|c| c.contains(&target_conn)));
                        assert_eq!(outcome.pushes.len(), 1, "one push, to the target");
                        let (to, push) = &outcome.pushes[0];
                        assert_eq!(*to, target_conn);
                        match push {
                            ControlMessage::Punch {
                                peer: requester,
                                candidates: theirs,
                                nonce: same,
                            } => {
                                assert_eq!((*requester, *same), (me, *nonce));
                                for c in candidates.iter().chain(theirs) {
                                    assert!(!is_virtual(&c.addr), "virtual candidate {c:?}");
                                    assert!(c.addr.port() != 0 && !c.addr.ip().is_unspecified());
                                    if c.kind != CandidateKind::Observed {
                                        assert_eq!(c.kind, CandidateKind::Local);
                                    }
                                }
                                assert!(candidates.len() <= 1 + MAX_LOCAL_ADDRS);
                                assert!(theirs.len() <= 1 + MAX_LOCAL_ADDRS);
                            }
                            other => panic!("the target was pushed {other:?}"),
                        }
                        self.introduced
                            .insert(pair(me, target), self.now + INTRODUCTION_TTL);
                    }
                    ControlMessage::Error { code, .. } => {
                        assert!(outcome.pushes.is_empty());
                        match code {
                            ErrorCode::BadRequest => assert_eq!(target, me),
                            ErrorCode::NotFound => {
                                assert_eq!(self.registry.observed_of(&target), None)
                            }
                            ErrorCode::PeerOffline => {
                                assert_eq!(self.registry.connection_of(&target), None)
                            }
                            ErrorCode::RateLimited => {}
                            other => panic!("connect refused with {other:?}"),
                        }
                    }
                    other => panic!("connect answered with {other:?}"),
                }
            }
            Msg::Ping(seq) => {
                assert_eq!(*reply, ControlMessage::Pong { seq: seq.into() });
                assert!(outcome.pushes.is_empty());
            }
            Msg::PunchResult(other, _) => {
                match reply {
                    ControlMessage::Ack {} => {
                        let expires = self.introduced.get(&pair(me, peer(other)));
                        assert!(
                            expires.is_some_and(|e| *e > self.now),
                            "punch_result acknowledged without a live introduction"
                        );
                    }
                    ControlMessage::Error { code, .. } => {
                        assert!(matches!(
                            code,
                            ErrorCode::BadRequest | ErrorCode::RateLimited
                        ))
                    }
                    other => panic!("punch_result answered with {other:?}"),
                }
                assert!(outcome.pushes.is_empty());
            }
            Msg::ServerSide(_) => {
                assert_eq!(error_code(&outcome.reply), Some(ErrorCode::BadRequest));
                assert!(outcome.pushes.is_empty() && outcome.persist.is_none());
            }
        }
    }

    fn check_invariants(&mut self) {
        let mut online = 0;
        let mut conns = HashSet::new();
        for p in 0..PEERS {
            let id = peer(p);
            if let Some(conn) = self.registry.connection_of(&id) {
                online += 1;
                assert!(
                    self.live.get(&p).is_some_and(|live| live.contains(&conn)),
                    "peer {p} online on a connection that is not its live one"
                );
                assert!(conns.insert(conn), "connection {conn} maps to two peers");
                assert!(
                    self.registry.observed_of(&id).is_some(),
                    "online but not registered"
                );
            }
            for q in 0..PEERS {
                let other = peer(q);
                if self.registry.relay_allowed(id, other, self.now).is_ok() {
                    let expires = self.introduced.get(&pair(id, other));
                    assert!(
                        expires.is_some_and(|e| *e > self.now),
                        "relay allowed {p} -> {q} without a live introduction"
                    );
                    assert!(self.registry.observed_of(&other).is_some());
                }
            }
        }
        assert_eq!(self.registry.online(), online);
        assert!(self.registry.registered() >= online);
        assert!(self.registry.registered() <= usize::from(PEERS));
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
        ] {
            assert!(b >= a, "counter {field} went down: {a} -> {b}");
        }
        assert_eq!(
            now.punches,
            self.nonces.len() as u64,
            "punches != punch replies"
        );
        assert_eq!(
            now.registrations, self.registrations,
            "registrations != replies"
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
