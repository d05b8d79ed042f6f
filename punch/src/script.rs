//! A [`Puncher`] driven by a byte script, as the fuzz target `puncher` and the property tests
//! drive it: either role, up to [`MAX_CANDIDATES`] candidates, time moving forward, and every
//! datagram an attacker or the real peer could send (genuine probes and answers made with the
//! introduction's key, forgeries made with a guessed key or none, answers to probes never sent,
//! arbitrary bytes), from any of a pool of addresses.
//!
//! After every step it checks what the peer-hardening work promises: a direct path only to an
//! address whose probe got a genuine answer; datagrams only to the candidates and to the sources
//! of genuine probes (forgeries never make the puncher send anywhere new); at most
//! `max_probes` probes and `max_answers` answers per session; at most
//! `UNAUTHENTICATED_EVENTS` events about forgeries, and every forgery counted.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::message::{Candidate, CandidateKind};
use common::stun::{self, ProbeTag, PunchKey, StunPacket};
use common::PeerId;

use crate::{
    Event, Introduction, PunchConfig, Puncher, Role, State, MAX_CANDIDATES, UNAUTHENTICATED_EVENTS,
};

/// What a script made the puncher do (for tests that check a script reaches its case).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptOutcome {
    /// The session ended direct.
    pub direct: bool,
    /// Probes it sent.
    pub probes_sent: u32,
    /// Answers it sent.
    pub answers_sent: u32,
    /// Forgeries it was offered and counted.
    pub forged: u32,
}

/// Runs `script` (the format is in the match below; bytes past the end read as 0, and the script
/// ends with its bytes). `Err` names the first property broken.
pub fn check_puncher_script(script: &[u8]) -> Result<ScriptOutcome, String> {
    let mut bytes = script.iter().copied();
    let mut next = || bytes.next();
    let pool = |i: u8| -> SocketAddr {
        let host = i % 16;
        if host < 12 {
            SocketAddr::from(([203, 0, 113, host], 4000 + u16::from(i % 3)))
        } else {
            SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(host)], 5000))
        }
    };
    let me = PeerId::from_key_digest(&[1; 32]);
    let peer = PeerId::from_key_digest(&[2; 32]);
    let key = PunchKey::from_bytes([0x5a; PunchKey::LEN]);
    let nonce = 0x0123_4567_89ab_cdef;
    let guesses = [
        PunchKey::from_bytes([0; PunchKey::LEN]),
        PunchKey::from_bytes({
            let mut k = [0u8; PunchKey::LEN];
            k[..8].copy_from_slice(&u64::to_be_bytes(nonce));
            k
        }),
    ];
    let head = next().unwrap_or(0);
    let role = if head & 1 == 0 {
        Role::Initiator
    } else {
        Role::Responder
    };
    let count = usize::from(head >> 1) % MAX_CANDIDATES + 1;
    let candidates: Vec<Candidate> = (0..count)
        .map(|_| Candidate {
            addr: pool(next().unwrap_or(0)),
            kind: CandidateKind::Observed,
        })
        .collect();
    let config = PunchConfig::default();
    let t0 = Instant::now();
    let mut now = t0;
    let mut puncher = Puncher::new(
        me,
        peer,
        Introduction {
            nonce,
            key: key.clone(),
        },
        role,
        &candidates,
        now,
        config.clone(),
    );
    let peer_tag = ProbeTag {
        nonce,
        sender: peer,
    };
    // Where the puncher may send: the candidates it took, and sources of genuine probes.
    let mut allowed: HashSet<SocketAddr> = candidates
        .iter()
        .take(MAX_CANDIDATES)
        .map(|c| c.addr)
        .collect();
    // Addresses whose probe got a genuine answer.
    let mut proven: HashSet<SocketAddr> = HashSet::new();
    // Probes seen (transaction, destination), most recent last.
    let mut probes: Vec<([u8; 12], SocketAddr)> = Vec::new();
    let (mut probes_sent, mut answers_sent) = (0u32, 0u32);
    let mut forged = 0u32;
    let mut forgery_events = 0u32;
    let mut step = 0;
    while let Some(op) = next() {
        step += 1;
        let at = |what: String| format!("step {step} (op {}): {what}", op % 8);
        let from = pool(next().unwrap_or(0));
        let pick = usize::from(next().unwrap_or(0));
        match op % 8 {
            // Time passes (up to 2.55 s).
            0 => {
                now += Duration::from_millis(10 * pick as u64);
                puncher.handle_timeout(now);
            }
            // Everything the puncher wants to send now.
            1 => {
                while let Some(t) = puncher.poll_transmit(now) {
                    if !allowed.contains(&t.destination) {
                        return Err(at(format!("sent to {} (never allowed)", t.destination)));
                    }
                    match stun::decode(&t.contents) {
                        Ok(StunPacket::BindingRequest { transaction, .. }) => {
                            probes_sent += 1;
                            if probes.len() >= 4096 {
                                probes.remove(0);
                            }
                            probes.push((transaction, t.destination));
                        }
                        Ok(StunPacket::BindingSuccess { .. }) => answers_sent += 1,
                        other => return Err(at(format!("sent something else: {other:?}"))),
                    }
                    if probes_sent > config.max_probes || answers_sent > config.max_answers {
                        return Err(at(format!(
                            "{probes_sent} probes and {answers_sent} answers sent"
                        )));
                    }
                }
            }
            // The peer's genuine answer to one of the probes seen.
            2 => {
                if let Some(&(transaction, destination)) = probes.get(pick % probes.len().max(1)) {
                    let answer = stun::probe_success(transaction, from, &key);
                    if puncher.handle_datagram(from, &answer, now) {
                        proven.insert(destination);
                    }
                }
            }
            // The peer's genuine probe.
            3 => {
                let probe = stun::probe_request(&peer_tag, pick as u32, &key);
                if !puncher.handle_datagram(from, &probe, now) {
                    return Err(at("a genuine probe was not taken".into()));
                }
                allowed.insert(from);
            }
            // A forged answer to a probe seen (its transaction id is public): a guessed key, or
            // a plain Binding success.
            4 => {
                if let Some(&(transaction, _)) = probes.get(pick % probes.len().max(1)) {
                    let answer = match guesses.get(pick % 3) {
                        Some(k) => stun::probe_success(transaction, from, k),
                        None => stun::binding_success(transaction, from),
                    };
                    if puncher.handle_datagram(from, &answer, now) {
                        forged += 1;
                    }
                }
            }
            // A forged probe in the peer's name.
            5 => {
                let probe = stun::probe_request(&peer_tag, pick as u32, &guesses[pick % 2]);
                if puncher.handle_datagram(from, &probe, now) {
                    forged += 1;
                }
            }
            // Arbitrary bytes.
            6 => {
                let data: Vec<u8> = (0..pick).map(|_| next().unwrap_or(0)).collect();
                puncher.handle_datagram(from, &data, now);
            }
            // A genuinely keyed answer to a probe never sent: not ours.
            _ => {
                let transaction =
                    ProbeTag { nonce, sender: me }.transaction(1_000_000 + pick as u32);
                let answer = stun::probe_success(transaction, from, &key);
                if puncher.handle_datagram(from, &answer, now) {
                    return Err(at("an answer to no probe was taken".into()));
                }
            }
        }
        if let State::Direct(path) = puncher.state() {
            if !proven.contains(&path.addr) {
                return Err(at(format!(
                    "a direct path to {} with no genuine answer",
                    path.addr
                )));
            }
        }
        while let Some(event) = puncher.poll_event() {
            if matches!(event, Event::Unauthenticated { .. }) {
                forgery_events += 1;
            }
        }
        if forgery_events > UNAUTHENTICATED_EVENTS {
            return Err(at(format!("{forgery_events} events about forgeries")));
        }
        // Arbitrary bytes may be forgeries too: the count is at least the ones made here.
        if puncher.unauthenticated() < forged {
            return Err(at(format!(
                "{forged} forgeries, {} counted",
                puncher.unauthenticated()
            )));
        }
    }
    Ok(ScriptOutcome {
        direct: matches!(puncher.state(), State::Direct(_)),
        probes_sent,
        answers_sent,
        forged,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn the_puncher_keeps_its_promises(script in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Err(e) = super::check_puncher_script(&script) {
                panic!("{e}");
            }
        }
    }

    /// Probes sent, a forged answer, then the genuine one: a path to the probed address.
    #[test]
    fn a_genuine_answer_after_a_forgery_makes_the_path() {
        let script = [
            0, 5, // initiator, one candidate: 203.0.113.5:4002
            1, 0, 0, // send: the opening probe and probe #0
            4, 9, 0, // a forged answer (zero key) from 203.0.113.9
            2, 5, 0, // the genuine answer from the candidate
        ];
        let outcome = super::check_puncher_script(&script).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            outcome,
            super::ScriptOutcome {
                direct: true,
                probes_sent: 2,
                answers_sent: 0,
                forged: 1
            }
        );
    }
}
