//! Authenticated heartbeats on a direct path.
//!
//! Once a connection runs on a direct path, its link sends a STUN Binding request to the peer's
//! address now and then, and falls back to the relay when they go unanswered
//! ([`crate::path::PathSelector`]). An answer that anyone could forge would let a host that
//! sees the heartbeats keep a dead path "alive" (the connection stalls instead of falling back
//! to the relay). So heartbeats are authenticated like probes (USERNAME + MESSAGE-INTEGRITY),
//! with keys neither side has to be handed: both ends derive them from the QUIC connection's
//! TLS exporter ([RFC 5705](https://www.rfc-editor.org/rfc/rfc5705), quinn's
//! `Connection::export_keying_material`), so every connection has them, including one dialed
//! straight to a cached address without an introduction. Only the two ends of that TLS session
//! know the exporter's output.
//!
//! - The nonce (which routes the datagrams to the link, in USERNAME and transaction ids) is
//!   exported too, so both ends use the same one without sending it.
//! - Each direction has its own key (the exporter's context names the side that sends the
//!   requests): the answers we send to the peer's heartbeats are sealed with the peer's key, so
//!   they can never pass for answers to our own heartbeats, even with a colliding transaction
//!   id.
//! - An answer counts only if it comes from the address the heartbeat went to: the path being
//!   tested is that address.

use std::collections::HashMap;
use std::net::SocketAddr;

use common::stun::{self, ProbeTag, PunchKey, StunPacket};
use common::PeerId;

use crate::Transmit;

/// The TLS exporter label of heartbeat keys (RFC 5705 labels of private use start with
/// "EXPORTER").
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-p2p-heartbeat-v1";

/// Heartbeats awaiting an answer; the oldest is forgotten beyond this.
const MAX_PENDING: usize = 64;

/// The secrets of one connection's heartbeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatKeys {
    /// Routes heartbeats and their answers to the link (public: it travels in clear).
    pub nonce: u64,
    /// Seals our heartbeats and the peer's answers to them.
    pub mine: PunchKey,
    /// Seals the peer's heartbeats and our answers to them.
    pub theirs: PunchKey,
}

impl HeartbeatKeys {
    /// Derives the keys of the connection between `me` and `peer` from its TLS exporter:
    /// `export(output, context)` fills `output` with the exporter's output for
    /// [`EXPORTER_LABEL`] and `context`, and returns false if it cannot. Both ends get the same
    /// nonce, and each one's `mine` is the other's `theirs`.
    pub fn derive(
        me: PeerId,
        peer: PeerId,
        mut export: impl FnMut(&mut [u8], &[u8]) -> bool,
    ) -> Option<HeartbeatKeys> {
        let mut nonce = [0u8; 8];
        if !export(&mut nonce, b"nonce") {
            return None;
        }
        let mut key_of = |sender: PeerId| {
            let mut context = b"key ".to_vec();
            context.extend_from_slice(sender.as_uuid().as_bytes());
            let mut key = [0u8; PunchKey::LEN];
            export(&mut key, &context).then(|| PunchKey::from_bytes(key))
        };
        Some(HeartbeatKeys {
            nonce: u64::from_be_bytes(nonce),
            mine: key_of(me)?,
            theirs: key_of(peer)?,
        })
    }
}

/// What a datagram routed to the link was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeartbeatInput {
    /// The authentic answer to our heartbeat to this address.
    Answered(SocketAddr),
    /// The peer's authentic heartbeat: send this answer.
    Reply(Transmit),
    /// Ignored: not authenticated with the connection's keys, or an answer from another address
    /// than the heartbeat went to, or an answer to no heartbeat of ours.
    Ignored(Ignored),
}

/// Why a datagram was ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// Its MESSAGE-INTEGRITY is missing or wrong (forged, or corrupted).
    Unauthenticated,
    /// An answer from another address than the one the heartbeat went to.
    WrongSource {
        /// Where the heartbeat went.
        expected: SocketAddr,
    },
    /// Not a heartbeat of this connection, nor an answer to a pending one.
    Unknown,
}

/// The heartbeats of one connection: builds ours, checks the answers, answers the peer's.
#[derive(Debug)]
pub struct Heartbeats {
    tag: ProbeTag,
    peer: PeerId,
    keys: HeartbeatKeys,
    counter: u32,
    pending: HashMap<[u8; 12], (SocketAddr, u32)>,
    ignored: u64,
}

impl Heartbeats {
    /// The heartbeats `me` exchanges with `peer` under `keys`.
    pub fn new(me: PeerId, peer: PeerId, keys: HeartbeatKeys) -> Self {
        Heartbeats {
            tag: ProbeTag {
                nonce: keys.nonce,
                sender: me,
            },
            peer,
            keys,
            counter: 0,
            pending: HashMap::new(),
            ignored: 0,
        }
    }

    /// The nonce the link receives its datagrams by.
    pub fn nonce(&self) -> u64 {
        self.keys.nonce
    }

    /// Datagrams ignored so far.
    pub fn ignored(&self) -> u64 {
        self.ignored
    }

    /// A heartbeat to `to`.
    pub fn request(&mut self, to: SocketAddr) -> Transmit {
        self.counter = self.counter.wrapping_add(1);
        if self.pending.len() >= MAX_PENDING {
            // Forget the oldest: an answer that late says nothing about the path now.
            crate::forget_oldest(&mut self.pending, |(_, n)| *n);
        }
        self.pending
            .insert(self.tag.transaction(self.counter), (to, self.counter));
        Transmit {
            destination: to,
            contents: stun::probe_request(&self.tag, self.counter, &self.keys.mine),
            ttl: None,
            birthday: None,
        }
    }

    /// A datagram routed to this connection (by the nonce) arrived from `from`.
    pub fn handle(&mut self, from: SocketAddr, data: &[u8]) -> HeartbeatInput {
        let input = self.classify(from, data);
        if matches!(input, HeartbeatInput::Ignored(_)) {
            self.ignored = self.ignored.saturating_add(1);
        }
        input
    }

    fn classify(&mut self, from: SocketAddr, data: &[u8]) -> HeartbeatInput {
        match stun::decode(data) {
            Ok(StunPacket::BindingRequest {
                transaction,
                username: Some(username),
            }) => {
                let ours = ProbeTag::from_username(&username)
                    .is_some_and(|t| t.nonce == self.keys.nonce && t.sender == self.peer);
                if !ours {
                    return HeartbeatInput::Ignored(Ignored::Unknown);
                }
                if !stun::verify_probe(data, &self.keys.theirs) {
                    return HeartbeatInput::Ignored(Ignored::Unauthenticated);
                }
                HeartbeatInput::Reply(Transmit {
                    destination: from,
                    contents: stun::probe_success(transaction, from, &self.keys.theirs),
                    ttl: None,
                    birthday: None,
                })
            }
            Ok(StunPacket::BindingSuccess { transaction, .. }) => {
                let Some(&(expected, _)) = self.pending.get(&transaction) else {
                    return HeartbeatInput::Ignored(Ignored::Unknown);
                };
                if !stun::verify_probe(data, &self.keys.mine) {
                    return HeartbeatInput::Ignored(Ignored::Unauthenticated);
                }
                if from != expected {
                    // The heartbeat stays pending: the answer from the path itself may follow.
                    return HeartbeatInput::Ignored(Ignored::WrongSource { expected });
                }
                self.pending.remove(&transaction);
                HeartbeatInput::Answered(expected)
            }
            _ => HeartbeatInput::Ignored(Ignored::Unknown),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> PeerId {
        PeerId::from_key_digest(&[n; 32])
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Stands in for the TLS exporter of one connection: a deterministic function of the
    /// connection's secret, the label and the context.
    fn exporter(secret: u8) -> impl FnMut(&mut [u8], &[u8]) -> bool {
        move |out: &mut [u8], context: &[u8]| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ u64::from(secret);
            for (i, byte) in out.iter_mut().enumerate() {
                for b in EXPORTER_LABEL.iter().chain(context).chain(&[i as u8]) {
                    h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
                }
                *byte = (h >> 24) as u8;
            }
            true
        }
    }

    fn pair() -> (Heartbeats, Heartbeats) {
        let a_keys = HeartbeatKeys::derive(id(1), id(2), exporter(7)).unwrap();
        let b_keys = HeartbeatKeys::derive(id(2), id(1), exporter(7)).unwrap();
        assert_eq!(a_keys.nonce, b_keys.nonce);
        assert_eq!(a_keys.mine, b_keys.theirs);
        assert_eq!(a_keys.theirs, b_keys.mine);
        assert_ne!(a_keys.mine, a_keys.theirs);
        (
            Heartbeats::new(id(1), id(2), a_keys),
            Heartbeats::new(id(2), id(1), b_keys),
        )
    }

    #[test]
    fn a_heartbeat_is_answered_and_the_answer_counts() {
        let (mut a, mut b) = pair();
        let (a_addr, b_addr) = (addr("203.0.113.1:1000"), addr("203.0.113.2:2000"));
        let beat = a.request(b_addr);
        assert_eq!(beat.destination, b_addr);
        let HeartbeatInput::Reply(answer) = b.handle(a_addr, &beat.contents) else {
            panic!("not answered")
        };
        assert_eq!(answer.destination, a_addr);
        assert_eq!(
            a.handle(b_addr, &answer.contents),
            HeartbeatInput::Answered(b_addr)
        );
        // Once only.
        assert_eq!(
            a.handle(b_addr, &answer.contents),
            HeartbeatInput::Ignored(Ignored::Unknown)
        );
    }

    #[test]
    fn answers_from_another_source_are_ignored() {
        let (mut a, mut b) = pair();
        let (a_addr, b_addr) = (addr("203.0.113.1:1000"), addr("203.0.113.2:2000"));
        let beat = a.request(b_addr);
        let HeartbeatInput::Reply(answer) = b.handle(a_addr, &beat.contents) else {
            panic!("not answered")
        };
        // The genuine answer, replayed from elsewhere (the heartbeat went to b_addr): ignored,
        // and the heartbeat still waits for the answer from the path itself.
        let elsewhere = addr("198.51.100.66:6666");
        assert_eq!(
            a.handle(elsewhere, &answer.contents),
            HeartbeatInput::Ignored(Ignored::WrongSource { expected: b_addr })
        );
        assert_eq!(
            a.handle(b_addr, &answer.contents),
            HeartbeatInput::Answered(b_addr)
        );
        assert_eq!(a.ignored(), 1);
    }

    #[test]
    fn an_observer_cannot_forge_answers_nor_heartbeats() {
        let (mut a, mut b) = pair();
        let (a_addr, b_addr) = (addr("203.0.113.1:1000"), addr("203.0.113.2:2000"));
        // The observer sees a's heartbeat: its USERNAME, nonce and transaction id.
        let beat = a.request(b_addr);
        let Ok(StunPacket::BindingRequest {
            transaction,
            username: Some(username),
        }) = stun::decode(&beat.contents)
        else {
            panic!("not a request")
        };
        let tag = ProbeTag::from_username(&username).unwrap();
        // Answers it forges from the path's address: without integrity, with a key of its
        // choosing, with the key of another connection.
        let other = HeartbeatKeys::derive(id(1), id(2), exporter(8)).unwrap();
        let forged = [
            stun::binding_success(transaction, a_addr),
            stun::probe_success(transaction, a_addr, &PunchKey::from_bytes([0; 16])),
            stun::probe_success(transaction, a_addr, &other.mine),
        ];
        for answer in &forged {
            assert_eq!(
                a.handle(b_addr, answer),
                HeartbeatInput::Ignored(Ignored::Unauthenticated)
            );
        }
        // Nor is a's answer to b's heartbeat, reflected back to a: it is sealed with b's key.
        let b_beat = b.request(a_addr);
        let HeartbeatInput::Reply(reply_to_b) = a.handle(b_addr, &b_beat.contents) else {
            panic!("b's heartbeat not answered")
        };
        // b's first heartbeat has the transaction id of a's (both count from 1 under the same
        // nonce), so the reflected answer matches a's pending heartbeat, and still does not
        // count.
        assert_eq!(
            stun::decode(&reply_to_b.contents).map(|p| matches!(p, StunPacket::BindingSuccess { transaction: t, .. } if t == transaction)),
            Ok(true)
        );
        assert_eq!(
            a.handle(b_addr, &reply_to_b.contents),
            HeartbeatInput::Ignored(Ignored::Unauthenticated)
        );
        // Forged heartbeats (as if from b) are not answered.
        let forged_beat = stun::probe_request(
            &ProbeTag {
                sender: id(2),
                ..tag
            },
            9,
            &other.theirs,
        );
        assert_eq!(
            a.handle(b_addr, &forged_beat),
            HeartbeatInput::Ignored(Ignored::Unauthenticated)
        );
        // The genuine answer still counts.
        let HeartbeatInput::Reply(answer) = b.handle(a_addr, &beat.contents) else {
            panic!("not answered")
        };
        assert_eq!(
            a.handle(b_addr, &answer.contents),
            HeartbeatInput::Answered(b_addr)
        );
        assert_eq!(a.ignored(), 5);
    }

    #[test]
    fn pending_heartbeats_are_bounded() {
        let (mut a, _) = pair();
        for _ in 0..10 * MAX_PENDING {
            a.request(addr("203.0.113.2:2000"));
        }
        assert_eq!(a.pending.len(), MAX_PENDING);
    }
}
