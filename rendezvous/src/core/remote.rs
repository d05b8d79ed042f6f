//! Lookups and introductions across the nodes of a cluster (see [`crate::cluster`]), still
//! without IO: the driver looks the other peer up in the cluster registry and hands the answer
//! in; the requester's node decides on the introduction (its rate limits, its nonce and key)
//! and returns what to forward; the target's node records the forwarded introduction (so that
//! the target's `accept` checks) and returns the `punch` to push.

use common::nat::NatProfile;

use super::*;

/// An introduction decided on the requester's node for a target online on another node: what
/// the target's node needs to push the target its `punch` and to check its `accept`. Travels
/// as JSON through the cluster (hostile input on arrival: checked by
/// [`Registry::forwarded_introduction`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardedIntroduction {
    /// Who asked (registered on the sending node).
    pub requester: PeerId,
    /// The requester's record: the target's node derives the requester's candidates from it,
    /// with the same filters as for a local introduction.
    pub requester_record: Record,
    /// The NAT profile the requester reported, if any.
    #[serde(default)]
    pub requester_nat: Option<NatProfile>,
    /// Who is asked (online on the receiving node).
    pub target: PeerId,
    /// The introduction's nonce.
    pub nonce: u64,
    /// The introduction's secret key.
    pub key: PunchKey,
    /// Whether the requester's node can relay to the target's node (it has a node link and the
    /// target's node announces one). Absent from a node that predates it: taken as yes, as
    /// such a node would have tried.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub relay_across: bool,
    /// The requester's first QUIC datagram from its `connect` (only when the relay joins the
    /// two nodes: the target answers it over the relay), for the target's `punch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_flight: Option<FirstFlight>,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// A peer as the cluster registry knows it, for a peer not online on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePeer {
    /// Its record.
    pub record: Record,
    /// Whether a node holds it online.
    pub online: bool,
}

/// Why a forwarded introduction is not pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ForwardRefusal {
    /// The target is not online on this node (it left, or moved to another node).
    #[error("the target is not online on this node")]
    TargetNotHere,
    /// The introduction names the target as its own requester.
    #[error("the requester is the target")]
    SelfIntroduction,
    /// The target was asked for too many introductions.
    #[error("the target was asked for too many introductions")]
    RateLimited,
    /// Too many introductions are open on this node.
    #[error("too many introductions are open")]
    Full,
}

impl Registry {
    /// `id` (registered here on `conn`) asks about `target`, which is not online on this node:
    /// `remote` is what the cluster registry holds (`None`: not registered anywhere).
    pub fn query_remote(
        &mut self,
        conn: ConnId,
        id: PeerId,
        observed: SocketAddr,
        target: PeerId,
        remote: Option<RemotePeer>,
        now: OffsetDateTime,
    ) -> Outcome {
        if self.online.get(&id) != Some(&conn) {
            return self.not_registered();
        }
        let mut outcome = self.touch(id, observed, now);
        self.counters.queries += 1;
        outcome.reply = Some(match remote {
            Some(peer) => ControlMessage::PeerInfo(PeerInfo {
                id: target,
                observed: peer.record.observed,
                local_addrs: peer.record.local_addrs,
                mapped_port: peer.record.mapped_port,
                online: peer.online,
                last_seen: if peer.online {
                    now
                } else {
                    peer.record.last_seen
                },
            }),
            None => ControlMessage::error(
                ErrorCode::NotFound,
                format!("peer {target} is not registered"),
            ),
        });
        outcome
    }

    /// `from` (registered here on `conn`) asks to connect to `target`, online on another node
    /// with `target_record`. Decided as a local introduction (same rate limits, same bounds):
    /// the reply is the requester's `punch` or a refusal, and with a `punch` comes what to
    /// forward to the target's node. `no_relay`: why the relay cannot join the two nodes, if
    /// it cannot (told to the requester in its `punch`, and to the target's node).
    #[allow(clippy::too_many_arguments)]
    pub fn introduce_remote(
        &mut self,
        conn: ConnId,
        from: PeerId,
        observed: SocketAddr,
        target: PeerId,
        target_record: &Record,
        target_nat: Option<NatProfile>,
        no_relay: Option<String>,
        first_flight: Option<FirstFlight>,
        now: OffsetDateTime,
    ) -> (Outcome, Option<ForwardedIntroduction>) {
        if self.online.get(&from) != Some(&conn) {
            return (self.not_registered(), None);
        }
        if target == from {
            self.counters.rejected += 1;
            return (
                Outcome::error(ErrorCode::BadRequest, "cannot connect to yourself"),
                None,
            );
        }
        let mut outcome = self.touch(from, observed, now);
        let Some(from_record) = self.peers.get(&from).cloned() else {
            return (self.not_registered(), None);
        };
        let (nonce, key) = match self.admit_introduction(from, target, now) {
            Ok(admitted) => admitted,
            Err(refusal) => {
                outcome.reply = Some(refusal);
                return (outcome, None);
            }
        };
        outcome.reply = Some(ControlMessage::Punch {
            peer: target,
            candidates: candidates(target_record, &from_record, &self.own_addrs),
            nonce,
            key: key.clone(),
            // What the target reported to its node, through the cluster registry.
            nat: target_nat,
            no_relay: no_relay.clone(),
            first_flight: None,
        });
        let forward = ForwardedIntroduction {
            requester: from,
            requester_nat: self.nat_profiles.get(&from).copied(),
            requester_record: from_record,
            target,
            nonce,
            key,
            relay_across: no_relay.is_none(),
            first_flight: first_flight.filter(|_| no_relay.is_none()),
        };
        (outcome, Some(forward))
    }

    /// An introduction forwarded by the requester's node: if its target is online here, it is
    /// recorded (the target's `accept` then checks here) and the target's `punch` is returned
    /// with the target's connection. The target's own rate limit applies here too, since any
    /// node may forward. `no_relay`: why the relay cannot join the two nodes, if it cannot
    /// (said in the target's `punch`).
    pub fn forwarded_introduction(
        &mut self,
        mut forwarded: ForwardedIntroduction,
        no_relay: Option<String>,
        now: OffsetDateTime,
    ) -> Result<(ConnId, ControlMessage), ForwardRefusal> {
        let target = forwarded.target;
        let requester = forwarded.requester;
        let Some(&target_conn) = self.online.get(&target) else {
            return Err(ForwardRefusal::TargetNotHere);
        };
        let Some(target_record) = self.peers.get(&target).cloned() else {
            return Err(ForwardRefusal::TargetNotHere);
        };
        if requester == target {
            self.counters.rejected += 1;
            return Err(ForwardRefusal::SelfIntroduction);
        }
        let mono = self.clock.at(now);
        if !self.introductions_by_target.try_take(target, 1.0, mono) {
            self.counters.refused_introduction_rate += 1;
            return Err(ForwardRefusal::RateLimited);
        }
        self.introductions
            .introduce(
                requester,
                target,
                forwarded.nonce,
                forwarded.key.clone(),
                now,
            )
            .map_err(|_| ForwardRefusal::Full)?;
        // Hostile input: as many local addresses as a registration may announce, at most.
        forwarded
            .requester_record
            .local_addrs
            .truncate(MAX_LOCAL_ADDRS);
        // The first flight only where the target's answer can come back over the relay.
        let first_flight = forwarded.first_flight.filter(|_| no_relay.is_none());
        self.counters.first_flights += u64::from(first_flight.is_some());
        let punch = ControlMessage::Punch {
            peer: requester,
            candidates: candidates(&forwarded.requester_record, &target_record, &self.own_addrs),
            nonce: forwarded.nonce,
            key: forwarded.key,
            nat: forwarded.requester_nat,
            no_relay,
            first_flight,
        };
        Ok((target_conn, punch))
    }

    /// The records and reported NAT profiles of the peers online here (what a node re-asserts
    /// in the cluster registry).
    pub fn online_records(&self) -> Vec<(PeerId, Record, Option<NatProfile>)> {
        self.online
            .keys()
            .filter_map(|id| {
                let record = self.peers.get(id)?.clone();
                Some((*id, record, self.nat_profiles.get(id).copied()))
            })
            .collect()
    }

    fn not_registered(&mut self) -> Outcome {
        self.counters.rejected += 1;
        Outcome::error(
            ErrorCode::NotRegistered,
            "send `register` on the control stream first",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-11-26 08:00 UTC);

    fn id(n: u8) -> PeerId {
        PeerId::from_key_digest(&[n; 32])
    }

    fn addr(n: u8, port: u16) -> SocketAddr {
        SocketAddr::from(([203, 0, 113, n], port))
    }

    fn register(reg: &mut Registry, conn: ConnId, peer: PeerId, at: SocketAddr) {
        let out = reg.handle(
            conn,
            peer,
            at,
            ControlMessage::Register {
                version: PROTOCOL_VERSION,
                local_addrs: vec![],
                mapped_port: None,
            },
            T0,
        );
        assert!(matches!(out.reply, Some(ControlMessage::Registered { .. })));
    }

    /// Two nodes: x with peer 1 registered (connection 10), y with peer 2 (connection 20).
    fn two_nodes() -> (Registry, Registry) {
        let mut x = Registry::new([], [1; 32]);
        let mut y = Registry::new([], [2; 32]);
        register(&mut x, 10, id(1), addr(1, 4000));
        register(&mut y, 20, id(2), addr(2, 5000));
        (x, y)
    }

    /// Node X introduces its peer 1 to peer 2 of node Y: both get a `punch` with the same nonce
    /// and key and each other's public address, and Y accepts peer 2's `accept`.
    #[test]
    fn an_introduction_crosses_nodes_and_the_target_accepts_on_its_node() {
        let (mut x, mut y) = two_nodes();
        let profile = NatProfile {
            udp: true,
            no_nat: false,
            mapping: common::nat::Behaviour::AddressAndPortDependent,
            filtering: common::nat::Behaviour::AddressAndPortDependent,
            // Crosses nodes like the rest of the profile (the requester's initiator hold).
            inbound_takes_port: true,
        };
        let nat = y.handle(
            20,
            id(2),
            addr(2, 5000),
            ControlMessage::Nat { nat: profile },
            T0,
        );
        assert_eq!(nat.reply, Some(ControlMessage::Ack {}));
        let (_, target_record, target_nat) = y.online_records().pop().unwrap();
        assert_eq!(target_nat, Some(profile));
        let flight = FirstFlight::new(vec![0xc3; 1200]).unwrap();
        let (outcome, forward) = x.introduce_remote(
            10,
            id(1),
            addr(1, 4000),
            id(2),
            &target_record,
            target_nat,
            None,
            Some(flight.clone()),
            T0,
        );
        let Some(ControlMessage::Punch {
            peer,
            candidates,
            nonce,
            key,
            nat: requester_sees,
            no_relay,
            first_flight,
        }) = outcome.reply
        else {
            panic!("{:?}", outcome.reply);
        };
        assert_eq!(peer, id(2));
        assert_eq!(candidates[0].addr, addr(2, 5000));
        // The requester learns the target's NAT from the target's node, as on one node.
        assert_eq!(requester_sees, Some(profile));
        assert_eq!(no_relay, None);
        assert_eq!(first_flight, None);
        let forward = forward.unwrap();
        assert!(forward.relay_across);
        // Through the cluster as JSON.
        let forward: ForwardedIntroduction =
            serde_json::from_slice(&serde_json::to_vec(&forward).unwrap()).unwrap();
        let (conn, push) = y.forwarded_introduction(forward.clone(), None, T0).unwrap();
        assert_eq!(conn, 20);
        let ControlMessage::Punch {
            peer,
            candidates,
            nonce: pushed_nonce,
            key: pushed_key,
            first_flight: pushed_flight,
            ..
        } = push
        else {
            panic!("{push:?}");
        };
        assert_eq!(
            (peer, candidates[0].addr, pushed_nonce, pushed_key),
            (id(1), addr(1, 4000), nonce, key)
        );
        // The requester's first flight crossed with the introduction, to the target only.
        assert_eq!(pushed_flight, Some(flight));
        assert_eq!(y.counters().first_flights, 1);
        let accept = y.handle(
            20,
            id(2),
            addr(2, 5000),
            ControlMessage::Accept { peer: id(1), nonce },
            T0,
        );
        assert_eq!(accept.reply, Some(ControlMessage::Ack {}));
        // A forward for a peer that is not online here is refused, not pushed.
        let mut elsewhere = forward;
        elsewhere.target = id(3);
        assert_eq!(
            y.forwarded_introduction(elsewhere, None, T0),
            Err(ForwardRefusal::TargetNotHere)
        );
    }

    /// Nodes that cannot relay to each other (one has no node link): the requester's `punch`
    /// says why, the forwarded introduction says the requester's node cannot relay across, and
    /// the target's `punch` carries the reason its node gives. A forward from a node that
    /// predates the field reads as one that can.
    #[test]
    fn an_introduction_between_unlinked_nodes_says_the_relay_cannot_join_them() {
        let (mut x, mut y) = two_nodes();
        let (_, target_record, _) = y.online_records().pop().unwrap();
        let why = "node y has no node link".to_owned();
        let (outcome, forward) = x.introduce_remote(
            10,
            id(1),
            addr(1, 4000),
            id(2),
            &target_record,
            None,
            Some(why.clone()),
            FirstFlight::new(vec![0xc3; 1200]),
            T0,
        );
        let Some(ControlMessage::Punch { no_relay, .. }) = outcome.reply else {
            panic!("{:?}", outcome.reply);
        };
        assert_eq!(no_relay, Some(why));
        let forward = forward.unwrap();
        assert!(!forward.relay_across);
        // No relay to answer it over: the first flight stays with the requester's node.
        assert_eq!(forward.first_flight, None);
        let json = serde_json::to_value(&forward).unwrap();
        assert_eq!(json["relay_across"], serde_json::json!(false));
        let back: ForwardedIntroduction = serde_json::from_value(json.clone()).unwrap();
        assert!(!back.relay_across);
        let mut older = json;
        older.as_object_mut().unwrap().remove("relay_across");
        let older: ForwardedIntroduction = serde_json::from_value(older).unwrap();
        assert!(older.relay_across);
        let theirs = "node x, where the requester is, has no node link".to_owned();
        let (_, push) = y
            .forwarded_introduction(back, Some(theirs.clone()), T0)
            .unwrap();
        let ControlMessage::Punch {
            no_relay,
            first_flight,
            ..
        } = push
        else {
            panic!("{push:?}");
        };
        assert_eq!(no_relay, Some(theirs));
        assert_eq!(first_flight, None);
    }

    /// The relay across nodes: the requester's node lets its packets to the remote target
    /// through only once the target's node reports the accept (with the introduction's own
    /// nonce); the target's node, which saw the accept, lets packets through both ways.
    #[test]
    fn relay_across_nodes_waits_for_the_accept_reported_by_the_targets_node() {
        let (mut x, mut y) = two_nodes();
        let (_, target_record, _) = y.online_records().pop().unwrap();
        let (outcome, forward) = x.introduce_remote(
            10,
            id(1),
            addr(1, 4000),
            id(2),
            &target_record,
            None,
            None,
            None,
            T0,
        );
        let Some(ControlMessage::Punch { nonce, .. }) = outcome.reply else {
            panic!("{:?}", outcome.reply);
        };
        // Not registered on x: the local check knows nothing of it.
        assert_eq!(
            x.relay_allowed(id(1), id(2), T0),
            Err(RelayRefusal::UnknownPeer)
        );
        assert_eq!(
            x.relay_allowed_remote(id(1), id(2), T0),
            Err(RelayRefusal::NotAccepted)
        );
        y.forwarded_introduction(forward.unwrap(), None, T0)
            .unwrap();
        assert_eq!(
            y.relay_allowed_remote(id(2), id(1), T0),
            Err(RelayRefusal::NotAccepted)
        );
        let accept = y.handle(
            20,
            id(2),
            addr(2, 5000),
            ControlMessage::Accept { peer: id(1), nonce },
            T0,
        );
        assert_eq!(accept.reply, Some(ControlMessage::Ack {}));
        assert_eq!(y.relay_allowed(id(1), id(2), T0), Ok(()));
        assert_eq!(y.relay_allowed_remote(id(2), id(1), T0), Ok(()));
        // A report with another nonce, or about a requester not online here, changes nothing.
        assert!(!x.remote_accepted(id(1), id(2), nonce.wrapping_add(1), T0));
        assert!(!x.remote_accepted(id(3), id(2), nonce, T0));
        assert_eq!(
            x.relay_allowed_remote(id(1), id(2), T0),
            Err(RelayRefusal::NotAccepted)
        );
        assert!(x.remote_accepted(id(1), id(2), nonce, T0));
        assert_eq!(x.relay_allowed_remote(id(1), id(2), T0), Ok(()));
        assert_eq!(x.relay_allowed_remote(id(2), id(1), T0), Ok(()));
        // Once only: the introduction no longer waits.
        assert!(!x.remote_accepted(id(1), id(2), nonce, T0));
    }

    /// The target's node applies the target's introduction rate, whoever forwards: a flood of
    /// forwarded introductions is refused past the burst and never pushed.
    #[test]
    fn forwarded_introductions_are_rate_limited_per_target() {
        let mut y = Registry::new([], [2; 32]);
        register(&mut y, 20, id(2), addr(2, 5000));
        let burst = RegistryLimits::default().introductions_to_target_burst as usize;
        let mut pushed = 0;
        for n in 0..(burst + 10) {
            let forward = ForwardedIntroduction {
                requester: PeerId::from_key_digest(&[(n % 250) as u8 + 3; 32]),
                requester_record: y.online_records()[0].1.clone(),
                requester_nat: None,
                target: id(2),
                nonce: n as u64,
                key: PunchKey::from_bytes([7; 16]),
                relay_across: true,
                // The largest: a flood carries it at most once per admitted introduction.
                first_flight: FirstFlight::new(vec![0xc3; common::message::MAX_FIRST_FLIGHT]),
            };
            // With its largest first flight it stays far below the cluster's message cap.
            let json = serde_json::to_vec(&forward).unwrap();
            assert!(
                json.len() * 4 < crate::cluster::MAX_MESSAGE_BYTES,
                "{}",
                json.len()
            );
            match y.forwarded_introduction(forward, None, T0) {
                Ok(_) => pushed += 1,
                Err(ForwardRefusal::RateLimited) => {}
                Err(other) => panic!("{other}"),
            }
        }
        assert_eq!(pushed, burst);
        assert_eq!(y.counters().first_flights, burst as u64);
    }

    /// Unregistered connections get nothing from the cluster paths.
    /// A lookup of a peer held by another node answers what its record holds, the port its
    /// router maps for it included (`peer lookup` shows that candidate, issue 14).
    #[test]
    fn a_remote_lookup_answers_the_record_and_its_mapped_port() {
        let mut x = Registry::new([], [1; 32]);
        register(&mut x, 10, id(1), addr(1, 4000));
        let record = Record {
            observed: addr(2, 5000),
            local_addrs: vec![SocketAddr::from(([192, 168, 1, 2], 5000))],
            mapped_port: Some(6000),
            observed_other: None,
            last_seen: T0,
            registered_at: T0,
        };
        let remote = RemotePeer {
            record: record.clone(),
            online: true,
        };
        let out = x.query_remote(10, id(1), addr(1, 4000), id(2), Some(remote), T0);
        let Some(ControlMessage::PeerInfo(info)) = out.reply else {
            panic!("expected peer_info, got {:?}", out.reply);
        };
        assert_eq!(info.id, id(2));
        assert_eq!(info.observed, record.observed);
        assert_eq!(info.local_addrs, record.local_addrs);
        assert_eq!(info.mapped_port, Some(6000));
        assert!(info.online);
        let out = x.query_remote(10, id(1), addr(1, 4000), id(3), None, T0);
        assert!(matches!(
            out.reply,
            Some(ControlMessage::Error {
                code: ErrorCode::NotFound,
                ..
            })
        ));
    }

    #[test]
    fn remote_paths_need_a_registration_here() {
        let mut x = Registry::new([], [1; 32]);
        let record = Record {
            observed: addr(2, 5000),
            local_addrs: vec![],
            mapped_port: None,
            observed_other: None,
            last_seen: T0,
            registered_at: T0,
        };
        let out = x.query_remote(1, id(1), addr(1, 1), id(2), None, T0);
        assert!(matches!(
            out.reply,
            Some(ControlMessage::Error {
                code: ErrorCode::NotRegistered,
                ..
            })
        ));
        let (out, forward) =
            x.introduce_remote(1, id(1), addr(1, 1), id(2), &record, None, None, None, T0);
        assert!(forward.is_none());
        assert!(matches!(
            out.reply,
            Some(ControlMessage::Error {
                code: ErrorCode::NotRegistered,
                ..
            })
        ));
    }
}
