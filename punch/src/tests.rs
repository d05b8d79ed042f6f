//! Basic exchanges without NATs; `tests/sim.rs` drives pairs through simulated NATs.

use super::*;

fn id(n: u8) -> PeerId {
    PeerId::from_key_digest(&[n; 32])
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn observed(a: &str) -> Candidate {
    Candidate {
        addr: addr(a),
        kind: CandidateKind::Observed,
    }
}

#[test]
fn two_open_hosts_find_each_other_in_one_round_trip() {
    let t0 = Instant::now();
    let (a_addr, b_addr) = (addr("203.0.113.31:1000"), addr("203.0.113.32:2000"));
    let mut a = Puncher::new(
        id(1),
        id(2),
        9,
        Role::Initiator,
        &[observed("203.0.113.32:2000")],
        t0,
        PunchConfig::default(),
    );
    let mut b = Puncher::new(
        id(2),
        id(1),
        9,
        Role::Responder,
        &[observed("203.0.113.31:1000")],
        t0,
        PunchConfig::default(),
    );
    let probe = a.poll_transmit(t0).unwrap();
    assert_eq!(probe.destination, b_addr);
    assert!(b.handle_datagram(a_addr, &probe.contents, t0));
    let answer = b.poll_transmit(t0).unwrap();
    assert_eq!(answer.destination, a_addr);
    let later = t0 + Duration::from_millis(3);
    assert!(a.handle_datagram(b_addr, &answer.contents, later));
    match a.state() {
        State::Direct(path) => {
            assert_eq!(path.addr, b_addr);
            assert_eq!(path.kind, PathKind::Candidate(CandidateKind::Observed));
            assert_eq!(path.rtt, Duration::from_millis(3));
            assert_eq!(path.our_mapping, Some(a_addr));
        }
        other => panic!("{other:?}"),
    }
    // It keeps answering until the deadline, then finishes.
    assert!(!a.is_finished(later));
    assert_eq!(a.poll_timeout(), Some(t0 + PunchConfig::default().deadline));
    assert!(a.is_finished(t0 + PunchConfig::default().deadline));
}

#[test]
fn foreign_datagrams_are_not_claimed() {
    let t0 = Instant::now();
    let mut a = Puncher::new(
        id(1),
        id(2),
        9,
        Role::Initiator,
        &[observed("203.0.113.32:2000")],
        t0,
        PunchConfig::default(),
    );
    let from = addr("198.51.100.1:9");
    // Another session's nonce, another sender, a plain STUN request, garbage.
    let other_nonce = stun::probe_request(
        &ProbeTag {
            nonce: 10,
            sender: id(2),
        },
        1,
    );
    let other_sender = stun::probe_request(
        &ProbeTag {
            nonce: 9,
            sender: id(3),
        },
        1,
    );
    for datagram in [
        other_nonce,
        other_sender,
        stun::binding_request([1; 12]),
        vec![0xff; 40],
        vec![],
    ] {
        assert!(!a.handle_datagram(from, &datagram, t0));
    }
    // An answer to a probe we never sent.
    let answer = stun::binding_success(
        ProbeTag {
            nonce: 9,
            sender: id(1),
        }
        .transaction(77),
        from,
    );
    assert!(!a.handle_datagram(from, &answer, t0));
    assert_eq!(a.state(), &State::Probing);
}

#[test]
fn gives_up_at_the_deadline_with_a_reason() {
    let t0 = Instant::now();
    let mut a = Puncher::new(
        id(1),
        id(2),
        9,
        Role::Initiator,
        &[observed("203.0.113.32:2000")],
        t0,
        PunchConfig::default(),
    );
    let mut now = t0;
    let mut sent = 0;
    while let Some(wake) = a.poll_timeout() {
        now = wake.max(now);
        a.handle_timeout(now);
        while a.poll_transmit(now).is_some() {
            sent += 1;
        }
        if now > t0 + Duration::from_secs(60) {
            panic!("never gave up");
        }
    }
    assert_eq!(sent, PunchConfig::default().schedule.len());
    let State::Failed(report) = a.state() else {
        panic!("{:?}", a.state())
    };
    assert_eq!(report.elapsed, Duration::from_secs(5));
    assert!(
        report
            .reason()
            .contains("nothing from the peer got through"),
        "{}",
        report.reason()
    );
}
