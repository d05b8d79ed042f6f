//! Basic exchanges without NATs; `tests/sim.rs` drives pairs through simulated NATs.

use super::*;
use std::collections::HashMap;

fn id(n: u8) -> PeerId {
    PeerId::from_key_digest(&[n; 32])
}

fn key(n: u8) -> PunchKey {
    PunchKey::from_bytes([n; PunchKey::LEN])
}

fn intro(nonce: u64) -> Introduction {
    Introduction {
        nonce,
        key: key(nonce as u8),
    }
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
        intro(9),
        Role::Initiator,
        &[observed("203.0.113.32:2000")],
        t0,
        PunchConfig::default(),
    );
    let mut b = Puncher::new(
        id(2),
        id(1),
        intro(9),
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
        intro(9),
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
        &key(10),
    );
    let other_sender = stun::probe_request(
        &ProbeTag {
            nonce: 9,
            sender: id(3),
        },
        1,
        &key(9),
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
        intro(9),
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
    // The opening probe, then the schedule.
    assert_eq!(sent, PunchConfig::default().schedule.len() + 1);
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

/// Everything an on-path host learns from the probes (USERNAME, nonce, transaction ids) is not
/// enough to forge a probe or an answer: the integrity is keyed by the introduction's secret.
/// The observer forges answers to every probe it sees (from the probed address and from its
/// own), and probes in the name of each side; neither side takes a path from them, answers
/// them, or probes the observer; both still find the real path.
#[test]
fn an_observer_of_every_probe_cannot_steer_either_side() {
    let t0 = Instant::now();
    let (a_addr, b_addr) = (addr("203.0.113.31:1000"), addr("203.0.113.32:2000"));
    let eve = addr("198.51.100.66:6666");
    let secret = Introduction {
        nonce: 0x1234_5678_9abc_def0,
        key: PunchKey::from_bytes(*b"only-a-and-b-kno"),
    };
    let mut a = Puncher::new(
        id(1),
        id(2),
        secret.clone(),
        Role::Initiator,
        &[observed("203.0.113.32:2000")],
        t0,
        PunchConfig::default(),
    );
    let mut b = Puncher::new(
        id(2),
        id(1),
        secret.clone(),
        Role::Responder,
        &[observed("203.0.113.31:1000")],
        t0,
        PunchConfig::default(),
    );
    // Keys an attacker might try: none at all (a plain answer), the old scheme's (derived from
    // the public nonce), one built from the nonce's bytes, one of its own.
    let guesses: Vec<Option<PunchKey>> = {
        let mut nonce_key = [0u8; PunchKey::LEN];
        nonce_key[..8].copy_from_slice(&secret.nonce.to_be_bytes());
        vec![None, Some(PunchKey::from_bytes(nonce_key)), Some(key(0xee))]
    };
    let forge_answer = |txid: [u8; 12], mapped: SocketAddr, guess: &Option<PunchKey>| match guess {
        None => stun::binding_success(txid, mapped),
        Some(k) => stun::probe_success(txid, mapped, k),
    };
    let forge_probe = |sender: PeerId, counter: u32, guess: &Option<PunchKey>| {
        let tag = ProbeTag {
            nonce: secret.nonce,
            sender,
        };
        stun::probe_request(&tag, counter, guess.as_ref().unwrap_or(&key(0)))
    };
    let mut forged = 0;
    let mut now = t0;
    // A few rounds of the schedule: each probe either side sends is seen by the observer,
    // which answers it first (from the probed address and from its own) and probes the sender
    // in the name of the other side. The genuine probes are lost (the observer is faster and
    // the path drops them), so nothing but forgeries reaches either side.
    for _ in 0..6 {
        for (me, sender_of_forged_probes) in [(0, id(2)), (1, id(1))] {
            let puncher = if me == 0 { &mut a } else { &mut b };
            puncher.handle_timeout(now);
            while let Some(t) = puncher.poll_transmit(now) {
                assert_ne!(t.destination, eve, "a puncher sent to the observer");
                let Ok(StunPacket::BindingRequest { transaction, .. }) = stun::decode(&t.contents)
                else {
                    continue;
                };
                for guess in &guesses {
                    for from in [t.destination, eve] {
                        let answer = forge_answer(transaction, eve, guess);
                        puncher.handle_datagram(from, &answer, now);
                        let probe = forge_probe(sender_of_forged_probes, 99, guess);
                        puncher.handle_datagram(from, &probe, now);
                        forged += 2;
                    }
                }
            }
            assert_eq!(puncher.state(), &State::Probing, "forgeries made a path");
            // Nothing forged is answered, and the observer's address is not probed.
            while let Some(t) = puncher.poll_transmit(now) {
                assert_ne!(t.destination, eve);
                assert!(
                    matches!(
                        stun::decode(&t.contents),
                        Ok(StunPacket::BindingRequest { .. })
                    ),
                    "a forged probe was answered"
                );
            }
        }
        now += Duration::from_millis(20);
    }
    assert_eq!(a.unauthenticated() + b.unauthenticated(), forged);
    let mut events = Vec::new();
    while let Some(e) = a.poll_event() {
        events.push(e);
    }
    assert!(events
        .iter()
        .all(|e| !matches!(e, Event::PeerReflexive { .. } | Event::Answered { .. })));
    assert!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Unauthenticated { .. }))
            .count()
            <= UNAUTHENTICATED_EVENTS as usize,
        "forgeries flood the events"
    );
    // The genuine exchange still works, and the path is the real one.
    let probe = a
        .poll_transmit(now + Duration::from_secs(1))
        .expect("a probes again");
    assert!(b.handle_datagram(a_addr, &probe.contents, now));
    let answer = b.poll_transmit(now).expect("b answers");
    assert!(a.handle_datagram(b_addr, &answer.contents, now));
    let State::Direct(path) = a.state() else {
        panic!("{:?}", a.state())
    };
    assert_eq!(path.addr, b_addr);
    // Once direct, forged answers to the next probes change nothing either.
    let before = a.state().clone();
    for counter in 0..200 {
        let txid = ProbeTag {
            nonce: secret.nonce,
            sender: id(1),
        }
        .transaction(counter);
        for guess in &guesses {
            a.handle_datagram(eve, &forge_answer(txid, eve, guess), now);
        }
    }
    assert_eq!(a.state(), &before);
}

/// One introduction makes us send at most `max_probes` probes and `max_answers` answers, and
/// probe at most MAX_CANDIDATES of the candidates, whatever the peer announces and sends.
#[test]
fn one_introduction_sends_no_more_than_its_budget() {
    let t0 = Instant::now();
    let config = PunchConfig::default();
    let victims: Vec<Candidate> = (0..40)
        .map(|i| observed(&format!("192.0.2.{}:{}", 1 + i % 200, 1000 + i)))
        .collect();
    let the_key = key(3);
    let mut b = Puncher::new(
        id(2),
        id(1),
        Introduction {
            nonce: 3,
            key: the_key.clone(),
        },
        Role::Responder,
        &victims,
        t0,
        config.clone(),
    );
    let mut probes_to = HashMap::<SocketAddr, u32>::new();
    let mut answers = 0u32;
    let mut now = t0;
    let mut counter = 0u32;
    while let Some(wake) = b.poll_timeout() {
        now = wake.max(now);
        b.handle_timeout(now);
        // The malicious peer knows the key: it sends authenticated probes from ever new
        // sources (each one a "peer-reflexive" address to probe and to answer).
        for _ in 0..20 {
            counter += 1;
            let probe = stun::probe_request(
                &ProbeTag {
                    nonce: 3,
                    sender: id(1),
                },
                counter,
                &the_key,
            );
            let from = SocketAddr::from(([198, 51, 100, (counter % 250) as u8], counter as u16));
            b.handle_datagram(from, &probe, now);
        }
        while let Some(t) = b.poll_transmit(now) {
            match stun::decode(&t.contents) {
                Ok(StunPacket::BindingRequest { .. }) => {
                    *probes_to.entry(t.destination).or_default() += 1
                }
                _ => answers += 1,
            }
        }
        now += Duration::from_millis(10);
        assert!(now < t0 + Duration::from_secs(60), "never finished");
    }
    let probes: u32 = probes_to.values().sum();
    assert!(probes <= config.max_probes, "{probes} probes");
    assert!(answers <= config.max_answers, "{answers} answers");
    let candidates_probed = victims
        .iter()
        .filter(|v| probes_to.contains_key(&v.addr))
        .count();
    assert_eq!(candidates_probed, MAX_CANDIDATES);
}

/// A peer announcing a victim's addresses as its candidates and getting itself introduced to
/// us 20 times a second for 10 s: through the shared per-second budget (as the peer's
/// punching driver applies it) we send the victim no more than the budget allows.
#[test]
fn repeated_introductions_make_us_send_no_more_than_the_budget() {
    use crate::budget::{ProbeBudget, DEFAULT_BURST, DEFAULT_PER_SECOND};
    let t0 = Instant::now();
    let victims: Vec<Candidate> = (0..8)
        .map(|i| observed(&format!("192.0.2.77:{}", 5000 + i)))
        .collect();
    let mut budget = ProbeBudget::default();
    let mut sessions: Vec<Puncher> = Vec::new();
    let mut sent_to_victim = 0u64;
    let mut offered = 0u64;
    let run_for = Duration::from_secs(10);
    let mut now = t0;
    let mut next_intro = t0;
    let mut nonce = 0u64;
    while now <= t0 + run_for + PunchConfig::default().deadline {
        if now >= next_intro && now < t0 + run_for {
            nonce += 1;
            sessions.push(Puncher::new(
                id(2),
                id(1),
                Introduction {
                    nonce,
                    key: key(nonce as u8),
                },
                Role::Responder,
                &victims,
                now,
                PunchConfig::default(),
            ));
            next_intro += Duration::from_millis(50);
        }
        for s in &mut sessions {
            s.handle_timeout(now);
            while let Some(t) = s.poll_transmit(now) {
                offered += 1;
                if budget.try_send(now) && t.destination.ip() == victims[0].addr.ip() {
                    sent_to_victim += 1;
                }
            }
        }
        sessions.retain(|s| !s.is_finished(now));
        now += Duration::from_millis(5);
    }
    let elapsed = (now - t0).as_secs_f64();
    let bound = f64::from(DEFAULT_BURST) + f64::from(DEFAULT_PER_SECOND) * elapsed;
    assert!(
        (sent_to_victim as f64) <= bound,
        "{sent_to_victim} datagrams to the victim in {elapsed:.1} s, budget {bound}"
    );
    // The budget is what held: the sessions wanted to send far more.
    assert!(offered as f64 > 2.0 * bound, "{offered} offered");
    assert_eq!(budget.dropped(), offered - sent_to_victim);
}

fn local(a: &str) -> Candidate {
    Candidate {
        addr: addr(a),
        kind: CandidateKind::Local,
    }
}

/// Everything `p` sends at `now`, as (destination, TTL, is an answer).
fn drain(p: &mut Puncher, now: Instant) -> Vec<(SocketAddr, Option<u8>, bool)> {
    std::iter::from_fn(|| p.poll_transmit(now))
        .map(|t| {
            let answer = matches!(
                stun::decode(&t.contents),
                Ok(StunPacket::BindingSuccess { .. })
            );
            (t.destination, t.ttl, answer)
        })
        .collect()
}

/// Each side first sends one opening probe (short TTL) to each public candidate, never to a
/// LAN address; the initiator's scheduled probes follow at once.
#[test]
fn the_initiator_opens_its_nat_then_probes_at_once() {
    let t0 = Instant::now();
    let (public, lan) = ("203.0.113.32:2000", "10.0.2.2:2000");
    let mut a = Puncher::new(
        id(1),
        id(2),
        intro(9),
        Role::Initiator,
        &[observed(public), local(lan)],
        t0,
        PunchConfig::default(),
    );
    assert_eq!(
        drain(&mut a, t0),
        vec![
            (addr(public), Some(DEFAULT_OPENING_TTL), false),
            (addr(public), None, false),
            (addr(lan), None, false),
        ]
    );
    let events: Vec<_> = std::iter::from_fn(|| a.poll_event()).collect();
    assert_eq!(
        events.first(),
        Some(&Event::OpeningSent {
            to: addr(public),
            ttl: DEFAULT_OPENING_TTL
        })
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::OpeningSent { .. }))
            .count(),
        1
    );
}

/// The responder (told first) opens its NAT and then waits: its probes could otherwise reach
/// the initiator's NAT before the initiator's own first packet. The initiator's first probe
/// ends the wait at once (answered, checked, and the schedule starts from there).
#[test]
fn the_responder_holds_its_probes_until_the_initiator_probes() {
    let t0 = Instant::now();
    let a_addr = addr("203.0.113.31:1000");
    let mut b = Puncher::new(
        id(2),
        id(1),
        intro(9),
        Role::Responder,
        &[observed("203.0.113.31:1000")],
        t0,
        PunchConfig::default(),
    );
    assert_eq!(
        drain(&mut b, t0),
        vec![(a_addr, Some(DEFAULT_OPENING_TTL), false)]
    );
    assert_eq!(b.poll_timeout(), Some(t0 + DEFAULT_RESPONDER_HOLD));
    let t1 = t0 + Duration::from_millis(30);
    assert!(drain(&mut b, t1).is_empty(), "held");
    let probe = stun::probe_request(
        &ProbeTag {
            nonce: 9,
            sender: id(1),
        },
        1,
        &key(9),
    );
    assert!(b.handle_datagram(a_addr, &probe, t1));
    // The answer, the triggered check, and the first scheduled probe, all at once.
    assert_eq!(
        drain(&mut b, t1),
        vec![
            (a_addr, None, true),
            (a_addr, None, false),
            (a_addr, None, false)
        ]
    );
    // The schedule goes on from the release.
    let next = PunchConfig::default().schedule[1];
    assert_eq!(b.poll_timeout(), Some(t1 + next));
}

/// Without a probe from the initiator (its probes cannot reach us), the responder's probes
/// start when the hold ends, on the schedule from there.
#[test]
fn the_responders_hold_ends_by_itself() {
    let t0 = Instant::now();
    let a_addr = addr("203.0.113.31:1000");
    let mut b = Puncher::new(
        id(2),
        id(1),
        intro(9),
        Role::Responder,
        &[observed("203.0.113.31:1000")],
        t0,
        PunchConfig::default(),
    );
    drain(&mut b, t0);
    let end = t0 + DEFAULT_RESPONDER_HOLD;
    assert!(drain(&mut b, end - Duration::from_millis(1)).is_empty());
    b.handle_timeout(end);
    assert_eq!(drain(&mut b, end), vec![(a_addr, None, false)]);
    assert_eq!(
        b.poll_timeout(),
        Some(end + PunchConfig::default().schedule[1])
    );
}

/// `opening_ttl: None` is punching as before: no opening probe, no hold, probes at once.
#[test]
fn without_opening_probes_the_responder_probes_at_once() {
    let t0 = Instant::now();
    let a_addr = addr("203.0.113.31:1000");
    let mut b = Puncher::new(
        id(2),
        id(1),
        intro(9),
        Role::Responder,
        &[observed("203.0.113.31:1000")],
        t0,
        PunchConfig {
            opening_ttl: None,
            ..PunchConfig::default()
        },
    );
    assert_eq!(drain(&mut b, t0), vec![(a_addr, None, false)]);
}

/// The driver ends the hold when it learns that the initiator is under way (its relayed
/// handshake arrived): the schedule starts then. Without a hold, it changes nothing.
#[test]
fn release_hold_ends_the_hold_at_once() {
    let t0 = Instant::now();
    let a_addr = addr("203.0.113.31:1000");
    let mut b = Puncher::new(
        id(2),
        id(1),
        intro(9),
        Role::Responder,
        &[observed("203.0.113.31:1000")],
        t0,
        PunchConfig::default(),
    );
    drain(&mut b, t0);
    let t1 = t0 + Duration::from_millis(12);
    b.release_hold(t1);
    assert_eq!(drain(&mut b, t1), vec![(a_addr, None, false)]);
    assert_eq!(
        b.poll_timeout(),
        Some(t1 + PunchConfig::default().schedule[1])
    );
    let mut a = Puncher::new(
        id(1),
        id(2),
        intro(9),
        Role::Initiator,
        &[observed("203.0.113.32:2000")],
        t0,
        PunchConfig::default(),
    );
    drain(&mut a, t0);
    let before = a.poll_timeout();
    a.release_hold(t1);
    assert_eq!(a.poll_timeout(), before);
}

/// The easy side's birthday probes: only to ports of the introduced peer's observed IP, paced,
/// at most the plan's budget, authenticated like every probe (a forged answer neither stops
/// them nor makes a path), and none after the first genuine answer.
#[test]
fn birthday_probes_are_bounded_aimed_and_stop_at_the_first_answer() {
    use crate::birthday::{BirthdayConfig, BirthdayPlan};
    let t0 = Instant::now();
    let hard_ip: std::net::IpAddr = [203, 0, 113, 21].into();
    let config = BirthdayConfig {
        probes: 300,
        per_second: 1000,
        ..BirthdayConfig::default()
    };
    let mut easy = Puncher::new(
        id(2),
        id(1),
        intro(5),
        Role::Responder,
        &[observed("203.0.113.21:40000")],
        t0,
        PunchConfig::default(),
    )
    .with_birthday(
        BirthdayPlan::Easy {
            ip: hard_ip,
            observed_port: 40000,
        },
        &config,
        42,
        t0,
    );
    let mut sprayed = Vec::new();
    let mut now = t0;
    let mut forged_once = false;
    while now < t0 + Duration::from_secs(2) {
        while let Some(t) = easy.poll_transmit(now) {
            assert_eq!(t.destination.ip(), hard_ip, "{t:?}");
            if t.birthday == Some(BirthdayTransmit::Spray) {
                sprayed.push((now, t));
            }
        }
        if !forged_once && sprayed.len() > 50 {
            // An answer to a spray probe forged with a guessed key: ignored.
            forged_once = true;
            let (_, probe) = &sprayed[10];
            let Ok(StunPacket::BindingRequest { transaction, .. }) = stun::decode(&probe.contents)
            else {
                panic!("a probe")
            };
            let forged = stun::probe_success(transaction, probe.destination, &key(0));
            assert!(easy.handle_datagram(probe.destination, &forged, now));
            assert_eq!(easy.state(), &State::Probing);
            assert_eq!(easy.unauthenticated(), 1);
        }
        now += Duration::from_millis(7);
    }
    assert_eq!(
        sprayed.len(),
        300,
        "the budget, all of it without an answer"
    );
    // Paced: never more than the rate over any second, plus a small burst.
    for (i, (at, _)) in sprayed.iter().enumerate() {
        let in_window = sprayed[i..]
            .iter()
            .take_while(|(later, _)| *later < *at + Duration::from_millis(100))
            .count();
        assert!(in_window <= 100 + 10, "{in_window} probes within 100 ms");
    }
    // Nothing more of the spray, however long we wait.
    let later = now + Duration::from_secs(1);
    assert!(std::iter::from_fn(|| easy.poll_transmit(later)).all(|t| t.birthday.is_none()));

    // A fresh session: the genuine answer to the 20th probe ends the spray at once.
    let mut easy = Puncher::new(
        id(2),
        id(1),
        intro(5),
        Role::Responder,
        &[observed("203.0.113.21:40000")],
        t0,
        PunchConfig::default(),
    )
    .with_birthday(
        BirthdayPlan::Easy {
            ip: hard_ip,
            observed_port: 40000,
        },
        &config,
        42,
        t0,
    );
    let mut probes = Vec::new();
    let mut now = t0;
    while probes.len() < 20 {
        while let Some(t) = easy.poll_transmit(now) {
            if t.birthday.is_some() {
                probes.push(t);
            }
        }
        now += Duration::from_millis(1);
    }
    let hit = probes[19].clone();
    let Ok(StunPacket::BindingRequest { transaction, .. }) = stun::decode(&hit.contents) else {
        panic!("a probe")
    };
    let answer = stun::probe_success(transaction, addr("203.0.113.22:5000"), &key(5));
    assert!(easy.handle_datagram(hit.destination, &answer, now));
    match easy.state() {
        State::Direct(path) => {
            assert_eq!(path.addr, hit.destination);
            assert_eq!(path.kind, PathKind::Birthday);
        }
        other => panic!("{other:?}"),
    }
    let after: Vec<Transmit> =
        std::iter::from_fn(|| easy.poll_transmit(now + Duration::from_secs(1))).collect();
    assert!(after.iter().all(|t| t.birthday.is_none()), "{after:?}");
    assert!(easy.birthday_sent() <= 22);
}

/// The hard side's opening probes: one per extra socket per round, only to the peer's observed
/// address; the first authenticated probe heard on an extra socket names the winner, which
/// answers it; a forged one on another socket names nothing.
#[test]
fn birthday_opening_probes_go_to_the_peer_only_and_the_first_heard_socket_wins() {
    use crate::birthday::{BirthdayConfig, BirthdayPlan};
    let t0 = Instant::now();
    let easy_addr = addr("203.0.113.22:5000");
    let config = BirthdayConfig {
        open_schedule: vec![Duration::ZERO, Duration::from_secs(1)],
        ..BirthdayConfig::default()
    };
    let mut hard = Puncher::new(
        id(1),
        id(2),
        intro(5),
        Role::Initiator,
        &[observed("203.0.113.22:5000")],
        t0,
        PunchConfig::default(),
    )
    .with_birthday(
        BirthdayPlan::Hard {
            toward: easy_addr,
            sockets: 8,
        },
        &config,
        1,
        t0,
    );
    let mut sockets = Vec::new();
    let mut now = t0;
    while now < t0 + Duration::from_millis(1500) {
        while let Some(t) = hard.poll_transmit(now) {
            assert_eq!(t.destination, easy_addr);
            if let Some(BirthdayTransmit::Opening { socket }) = t.birthday {
                sockets.push(socket);
            }
        }
        now += Duration::from_millis(5);
    }
    let mut expected: Vec<u16> = (0..8).collect();
    expected.extend(0..8);
    assert_eq!(sockets, expected);
    // A genuine probe on the primary socket (its event not yet read), a forged one on socket 3,
    // then the peer's genuine one on socket 5.
    let peer_tag = ProbeTag {
        nonce: 5,
        sender: id(2),
    };
    let primary = stun::probe_request(&peer_tag, 7, &key(5));
    assert!(hard.handle_datagram(easy_addr, &primary, now));
    assert_eq!(hard.birthday_winner(), None);
    let forged = stun::probe_request(&peer_tag, 1, &key(0));
    assert!(hard.handle_datagram_via(easy_addr, &forged, now, Some(3)));
    assert_eq!(hard.birthday_winner(), None);
    let genuine = stun::probe_request(&peer_tag, 2, &key(5));
    assert!(hard.handle_datagram_via(easy_addr, &genuine, now, Some(5)));
    assert_eq!(hard.birthday_winner(), Some((5, easy_addr)));
    let again = stun::probe_request(&peer_tag, 3, &key(5));
    assert!(hard.handle_datagram_via(easy_addr, &again, now, Some(6)));
    assert_eq!(
        hard.birthday_winner(),
        Some((5, easy_addr)),
        "the first stays"
    );
    let answers: Vec<Transmit> = std::iter::from_fn(|| hard.poll_transmit(now)).collect();
    assert!(answers.len() >= 3, "{answers:?}");
    assert!(answers
        .iter()
        .all(|t| t.destination == easy_addr && t.birthday.is_none()));
}

/// Everything `p` sends now.
fn drain_all(p: &mut Puncher, now: Instant) -> Vec<Transmit> {
    std::iter::from_fn(|| p.poll_transmit(now)).collect()
}

/// The one datagram of `sent` to `to`.
fn sent_to(sent: &[Transmit], to: SocketAddr) -> Vec<u8> {
    sent.iter()
        .find(|t| t.destination == to)
        .unwrap_or_else(|| panic!("nothing sent to {to}: {sent:?}"))
        .contents
        .clone()
}

/// Two dual-stack hosts, each with an IPv4 and an IPv6 candidate of the other; `a` has sent its
/// first probes and `b` answered the IPv4 one (not yet delivered). Returns (a, b, a's probes,
/// b's answer to the IPv4 probe).
struct DualStack {
    a: Puncher,
    b: Puncher,
    a_probes: Vec<Transmit>,
    t0: Instant,
}

const A4: &str = "203.0.113.31:1000";
const A6: &str = "[2001:db8:1::2]:1000";
const B4: &str = "203.0.113.32:2000";
const B6: &str = "[2001:db8:2::2]:2000";

fn dual_stack() -> DualStack {
    dual_stack_with(PunchConfig::default())
}

fn dual_stack_with(config: PunchConfig) -> DualStack {
    let t0 = Instant::now();
    let mut a = Puncher::new(
        id(1),
        id(2),
        intro(9),
        Role::Initiator,
        &[observed(B4), observed(B6)],
        t0,
        config,
    );
    let b = Puncher::new(
        id(2),
        id(1),
        intro(9),
        Role::Responder,
        &[observed(A4), observed(A6)],
        t0,
        PunchConfig::default(),
    );
    let a_probes = drain_all(&mut a, t0);
    DualStack { a, b, a_probes, t0 }
}

impl DualStack {
    /// `b`'s answer to `a`'s probe to `to`, as `b` received it from `from`.
    fn answer(&mut self, to: &str, from: &str, now: Instant) -> Vec<u8> {
        let probe = sent_to(&self.a_probes, addr(to));
        assert!(self.b.handle_datagram(addr(from), &probe, now));
        sent_to(&drain_all(&mut self.b, now), addr(from))
    }

    /// `b`'s own probe to `a`'s IPv6 address reaches `a`.
    fn ipv6_probe_reaches_a(&mut self, now: Instant) {
        let b_probes = drain_all(&mut self.b, now);
        let probe = sent_to(&b_probes, addr(A6));
        assert!(self.a.handle_datagram(addr(B6), &probe, now));
    }
}

/// Both paths work and the peer's IPv6 probe has reached us: an IPv4 answer that comes first
/// waits, and the IPv6 answer a moment later wins (Happy Eyeballs' preference).
#[test]
fn an_ipv4_path_waits_briefly_for_ipv6_once_the_peers_ipv6_probes_arrive() {
    let mut s = dual_stack();
    let t0 = s.t0;
    s.ipv6_probe_reaches_a(t0);
    let v4_answer = s.answer(B4, A4, t0);
    let v6_answer = s.answer(B6, A6, t0);
    let at = t0 + Duration::from_millis(3);
    assert!(s.a.handle_datagram(addr(B4), &v4_answer, at));
    assert_eq!(*s.a.state(), State::Probing, "the IPv4 path is held");
    // The wait is short (twice the round trip, at least 20 ms): the session wakes by then.
    assert!(s.a.poll_timeout() <= Some(at + Duration::from_millis(20)));
    let later = t0 + Duration::from_millis(5);
    assert!(s.a.handle_datagram(addr(B6), &v6_answer, later));
    match s.a.state() {
        State::Direct(path) => assert_eq!(path.addr, addr(B6)),
        other => panic!("{other:?}"),
    }
}

/// IPv6 probes of the peer arrived, but our IPv6 probes get no answer: the held IPv4 path is
/// taken when the short wait ends, long before the punch's deadline.
#[test]
fn a_held_ipv4_path_wins_when_ipv6_does_not_answer_in_time() {
    let mut s = dual_stack();
    let t0 = s.t0;
    s.ipv6_probe_reaches_a(t0);
    let v4_answer = s.answer(B4, A4, t0);
    let at = t0 + Duration::from_millis(50);
    assert!(s.a.handle_datagram(addr(B4), &v4_answer, at));
    assert_eq!(*s.a.state(), State::Probing);
    let until = at + Duration::from_millis(100);
    // Twice the 50 ms round trip: the session wakes by then.
    assert!(s.a.poll_timeout() <= Some(until));
    s.a.handle_timeout(until - Duration::from_millis(1));
    assert_eq!(*s.a.state(), State::Probing);
    s.a.handle_timeout(until);
    match s.a.state() {
        State::Direct(path) => {
            assert_eq!(path.addr, addr(B4));
            assert_eq!(path.rtt, Duration::from_millis(50));
        }
        other => panic!("{other:?}"),
    }
}

/// Without any sign that IPv6 works (no IPv6 probe from the peer), an IPv4 answer is taken at
/// once: a pair whose IPv6 is missing or blocked is never slower than before.
#[test]
fn without_ipv6_seen_working_an_ipv4_path_is_taken_at_once() {
    let mut s = dual_stack();
    let t0 = s.t0;
    let v4_answer = s.answer(B4, A4, t0);
    let at = t0 + Duration::from_millis(3);
    assert!(s.a.handle_datagram(addr(B4), &v4_answer, at));
    match s.a.state() {
        State::Direct(path) => assert_eq!(path.addr, addr(B4)),
        other => panic!("{other:?}"),
    }
}

/// Our IPv6 address and the peer's were both proven to the rendezvous (`prefer_ipv6`, an
/// observed IPv6 candidate): an IPv4 answer that comes before the peer's IPv6 probe still waits
/// briefly, and the IPv6 answer wins.
#[test]
fn with_ipv6_proven_on_both_sides_an_ipv4_path_waits_for_ipv6() {
    let mut s = dual_stack_with(PunchConfig {
        prefer_ipv6: true,
        ..PunchConfig::default()
    });
    let t0 = s.t0;
    let v4_answer = s.answer(B4, A4, t0);
    let v6_answer = s.answer(B6, A6, t0);
    assert!(s
        .a
        .handle_datagram(addr(B4), &v4_answer, t0 + Duration::from_millis(3)));
    assert_eq!(*s.a.state(), State::Probing, "held for IPv6");
    assert!(s
        .a
        .handle_datagram(addr(B6), &v6_answer, t0 + Duration::from_millis(4)));
    match s.a.state() {
        State::Direct(path) => assert_eq!(path.addr, addr(B6)),
        other => panic!("{other:?}"),
    }
}

/// The responder never holds out for IPv6: it takes the first path that answers, so that it
/// cannot settle on another family than the path the initiator dials its connection on.
#[test]
fn the_responder_takes_the_first_answer_whatever_the_family() {
    let t0 = Instant::now();
    let mut b = Puncher::new(
        id(2),
        id(1),
        intro(9),
        Role::Responder,
        &[observed(A4), observed(A6)],
        t0,
        PunchConfig {
            prefer_ipv6: true,
            responder_hold: Duration::ZERO,
            ..PunchConfig::default()
        },
    );
    let mut a = Puncher::new(
        id(1),
        id(2),
        intro(9),
        Role::Initiator,
        &[observed(B4), observed(B6)],
        t0,
        PunchConfig::default(),
    );
    let a_sent = drain_all(&mut a, t0);
    let b_sent = drain_all(&mut b, t0);
    // a's IPv6 probe reaches b (IPv6 works), then a answers b's IPv4 probe.
    assert!(b.handle_datagram(addr(A6), &sent_to(&a_sent, addr(B6)), t0));
    assert!(a.handle_datagram(addr(B4), &sent_to(&b_sent, addr(A4)), t0));
    let answer = sent_to(&drain_all(&mut a, t0), addr(B4));
    assert!(b.handle_datagram(addr(A4), &answer, t0 + Duration::from_millis(3)));
    match b.state() {
        State::Direct(path) => assert_eq!(path.addr, addr(A4)),
        other => panic!("{other:?}"),
    }
}

/// The easy side of a birthday pair (we are port-restricted, the peer symmetric) whose peer is
/// dual-stack too: candidates `B4` and `B6` (both observed), IPv6 proven on our side when
/// `ipv6`. Returns the session and the birthday plan's first instant of spray.
fn easy_side_of_a_dual_stack_birthday_pair(ipv6: bool) -> (Puncher, Instant) {
    use crate::birthday::{BirthdayConfig, BirthdayPlan};
    let t0 = Instant::now();
    let easy = Puncher::new(
        id(1),
        id(2),
        intro(9),
        Role::Initiator,
        &[observed(B4), observed(B6)],
        t0,
        PunchConfig {
            prefer_ipv6: ipv6,
            ..PunchConfig::default()
        },
    )
    .with_birthday(
        BirthdayPlan::Easy {
            ip: addr(B4).ip(),
            observed_port: addr(B4).port(),
        },
        &BirthdayConfig::default(),
        42,
        t0,
    );
    (easy, t0)
}

/// Runs `p` from `from` to `to` in 5 ms steps (answering nothing): what it sent, with when.
fn run_silent(p: &mut Puncher, from: Instant, to: Instant) -> Vec<(Instant, Transmit)> {
    let mut sent = Vec::new();
    let mut now = from;
    while now < to {
        p.handle_timeout(now);
        while let Some(t) = p.poll_transmit(now) {
            sent.push((now, t));
        }
        now += Duration::from_millis(5);
    }
    sent
}

/// A birthday pair that both sides can reach over IPv6 goes direct over IPv6 without a single
/// birthday datagram: the birthday punch waits for IPv6 first, and a proven path cancels it.
#[test]
fn a_birthday_punch_waits_for_ipv6_and_never_starts_when_ipv6_goes_direct() {
    let (mut easy, t0) = easy_side_of_a_dual_stack_birthday_pair(true);
    assert!(easy.ipv6_available());
    assert_eq!(
        easy.birthday_waits_until(),
        Some(t0 + DEFAULT_IPV6_BEFORE_BIRTHDAY)
    );
    let sent = run_silent(&mut easy, t0, t0 + Duration::from_millis(60));
    assert!(sent.iter().all(|(_, t)| t.birthday.is_none()), "{sent:?}");
    // The peer answers our IPv6 probe after 60 ms.
    let probe = sent_to(
        &sent.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>(),
        addr(B6),
    );
    let Ok(StunPacket::BindingRequest { transaction, .. }) = stun::decode(&probe) else {
        panic!("a probe")
    };
    let answer = stun::probe_success(transaction, addr(A6), &key(9));
    let at = t0 + Duration::from_millis(60);
    assert!(easy.handle_datagram(addr(B6), &answer, at));
    match easy.state() {
        State::Direct(path) => assert_eq!(path.addr, addr(B6)),
        other => panic!("{other:?}"),
    }
    // Long past the wait: still no birthday datagram.
    let later = run_silent(&mut easy, at, t0 + Duration::from_secs(3));
    assert!(later.iter().all(|(_, t)| t.birthday.is_none()), "{later:?}");
    assert_eq!(easy.birthday_sent(), 0);
}

/// IPv6 available but silent (a firewall drops it): the birthday punch starts once the wait is
/// over, not before.
#[test]
fn a_birthday_punch_starts_when_ipv6_does_not_answer_in_time() {
    let (mut easy, t0) = easy_side_of_a_dual_stack_birthday_pair(true);
    let sent = run_silent(&mut easy, t0, t0 + Duration::from_millis(1500));
    let first = sent
        .iter()
        .find(|(_, t)| t.birthday.is_some())
        .map(|(at, _)| *at)
        .expect("the birthday punch started");
    assert!(
        first >= t0 + DEFAULT_IPV6_BEFORE_BIRTHDAY
            && first < t0 + DEFAULT_IPV6_BEFORE_BIRTHDAY + Duration::from_millis(10),
        "first birthday datagram {:?} after the start",
        first - t0
    );
    assert!(sent.iter().any(|(_, t)| t.destination == addr(B6)));
    assert!(easy.birthday_sent() > 100, "{}", easy.birthday_sent());
    assert_eq!(easy.birthday_waits_until(), None);
}

/// Without IPv6 on our side (not proven), or without the peer's proven IPv6 address, nothing
/// waits: the birthday punch starts with the session, as before.
#[test]
fn without_ipv6_on_both_sides_a_birthday_punch_starts_at_once() {
    let (mut easy, t0) = easy_side_of_a_dual_stack_birthday_pair(false);
    assert!(!easy.ipv6_available());
    assert_eq!(easy.birthday_waits_until(), None);
    let sent = run_silent(&mut easy, t0, t0 + Duration::from_millis(20));
    assert!(sent.iter().any(|(at, t)| t.birthday.is_some() && *at == t0));

    use crate::birthday::{BirthdayConfig, BirthdayPlan};
    let only_v4 = Puncher::new(
        id(1),
        id(2),
        intro(9),
        Role::Initiator,
        &[observed(B4)],
        t0,
        PunchConfig {
            prefer_ipv6: true,
            ..PunchConfig::default()
        },
    )
    .with_birthday(
        BirthdayPlan::Easy {
            ip: addr(B4).ip(),
            observed_port: addr(B4).port(),
        },
        &BirthdayConfig::default(),
        42,
        t0,
    );
    assert!(!only_v4.ipv6_available());
    assert_eq!(only_v4.birthday_waits_until(), None);
}
