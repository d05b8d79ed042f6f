//! Whether the rendezvous node we are registered with still answers, judged from QUIC itself.
//!
//! Why it matters: with several nodes ([`crate::failover`]), a node that dies must be left
//! quickly, because every relayed connection of ours stalls until it is introduced again on
//! another node. QUIC's idle timeout (30 s) is far too slow, and asking the server a question
//! every few seconds costs it a stream and a reply per peer even when nothing is wrong.
//!
//! What it watches instead: the datagrams the server's connection has delivered to us
//! (`quinn::Connection::stats`). Anything the server sends counts (acknowledgements of our
//! relayed packets, relayed packets for us, pushed introductions, keep-alives), so a busy
//! connection is never asked anything. Only when the server has been silent for a while does
//! the session send a `ping` request (a *probe*); its reply, and QUIC's acknowledgement of it,
//! end the silence. QUIC retransmits a lost probe itself, and a new probe (a request of its
//! own, while the earlier ones are still under way) goes out every [`PROBE_REPEAT`] while the
//! silence lasts; the server counts as gone once [`GRACE`] has passed since the first probe of
//! a silence with nothing from it.
//!
//! How long a silence may last before the first probe depends on what the server carries for
//! us: while we relay through it (a relayed packet written in the last [`RELAYING_FOR`]), a
//! user is waiting on it, so [`PROBE_AFTER_RELAYING`]; otherwise [`PROBE_AFTER_IDLE`], which
//! only decides how soon we are reachable again through another node. A relayed connection's
//! keep-alives (every 15 s) keep it relaying: an idle relayed peer is probed about once a
//! second, the price of noticing a node's loss within seconds on both sides of a pair where
//! only one types (a shorter window left the silent side on the idle threshold and doubled the
//! gap after a loss in the lab).
//! With those defaults a node's loss is noticed within 3.25 s by a relaying peer (the last
//! datagram, 1 s of silence, 2 s of probes, and the 250 ms between two looks at the
//! statistics), within 7.25 s otherwise.
//!
//! Why 10 % packet loss does not make us leave a live node: within [`GRACE`]
//! [`MAX_PROBES_IN_FLIGHT`] probes go out, each a packet of its own, and QUIC sends each again
//! at its loss timeout (about every 0.2 s, doubling, at a 100 ms round trip); each try is lost
//! with odds of about 0.19 (the request, or the answer), so the seven or more tries of a
//! silence are all lost with odds near one in a hundred thousand. Those odds are per silence,
//! and silences are frequent: an idle relayed peer has about one a second. (The session once
//! sent one probe per silence, the later ones waiting for it: with only QUIC's three or four
//! retransmissions of it, about one in a thousand silences would end in a move by this
//! estimate. The NAT lab's trials, `scripts/cluster-trials.sh`, saw no such move in 7 idle
//! minutes; see docs/cluster.md.)
//!
//! The decisions are a sans-IO value, [`Liveness`], with `now` and the counters passed in; the
//! session ([`crate::session`]) reads the counters and sends the probes.

use std::time::{Duration, Instant};

/// How long the server may stay silent, while we relay through it, before we probe.
pub const PROBE_AFTER_RELAYING: Duration = Duration::from_secs(1);
/// How long the server may stay silent, while we do not relay through it, before we probe.
pub const PROBE_AFTER_IDLE: Duration = Duration::from_secs(5);
/// A relayed packet written this recently means we relay through the server (a relayed
/// connection sends QUIC keep-alives well within it).
pub const RELAYING_FOR: Duration = Duration::from_secs(30);
/// How often a new probe goes out while the silence lasts (each one a request of its own).
pub const PROBE_REPEAT: Duration = Duration::from_millis(500);
/// Silence since the first probe after which the server counts as gone.
pub const GRACE: Duration = Duration::from_secs(2);
/// How often the session looks at the counters.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Probes of one silence: one every [`PROBE_REPEAT`] within the [`GRACE`] (the session sends
/// no more at once).
pub const MAX_PROBES_IN_FLIGHT: usize = (GRACE.as_millis() / PROBE_REPEAT.as_millis()) as usize;
// At 10 % loss each way a probe fails with odds of about 0.19: at least four fresh probes (and
// QUIC's retransmissions of them) within the grace make leaving a live node a rare mistake.
const _: () = assert!(MAX_PROBES_IN_FLIGHT >= 4);

/// What the session should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing: the server answers, or a probe is under way.
    Wait,
    /// Send a probe (a `ping` request), and say so with [`Liveness::probe_sent`] (asked again
    /// at the next poll until then).
    Probe,
    /// The server is gone: move to another.
    Gone {
        /// How long nothing has come from it.
        silent_for: Duration,
        /// Probes sent in that time.
        probes: u32,
    },
}

/// Liveness of one registration's connection (sans-IO; see the module documentation).
#[derive(Debug, Clone)]
pub struct Liveness {
    received: u64,
    last_received_at: Instant,
    relayed: u64,
    last_relayed_at: Option<Instant>,
    /// The first and latest probe of the current silence, and how many.
    first_probe_at: Option<Instant>,
    last_probe_at: Option<Instant>,
    probes: u32,
}

impl Liveness {
    /// A connection that has just registered: `received` datagrams from the server so far,
    /// `relayed` packets written to its relay so far.
    pub fn new(now: Instant, received: u64, relayed: u64) -> Self {
        Liveness {
            received,
            last_received_at: now,
            relayed,
            last_relayed_at: None,
            first_probe_at: None,
            last_probe_at: None,
            probes: 0,
        }
    }

    /// The counters now (they only grow; a smaller value counts as a change too); what to do.
    pub fn poll(&mut self, now: Instant, received: u64, relayed: u64) -> Verdict {
        if received != self.received {
            self.received = received;
            self.last_received_at = now;
            self.first_probe_at = None;
            self.last_probe_at = None;
            self.probes = 0;
        }
        if relayed != self.relayed {
            self.relayed = relayed;
            self.last_relayed_at = Some(now);
        }
        let silent_for = now.saturating_duration_since(self.last_received_at);
        if let Some(first) = self.first_probe_at {
            if now.saturating_duration_since(first) >= GRACE {
                return Verdict::Gone {
                    silent_for,
                    probes: self.probes,
                };
            }
            return match self.last_probe_at {
                Some(last) if now.saturating_duration_since(last) < PROBE_REPEAT => Verdict::Wait,
                _ => Verdict::Probe,
            };
        }
        if silent_for >= self.probe_after(now) {
            self.first_probe_at = Some(now);
            return Verdict::Probe;
        }
        Verdict::Wait
    }

    /// A probe the last [`Verdict::Probe`] asked for went out at `now` (the next one is due
    /// [`PROBE_REPEAT`] later; only probes sent are counted in [`Verdict::Gone`]).
    pub fn probe_sent(&mut self, now: Instant) {
        if self.first_probe_at.is_some() {
            self.last_probe_at = Some(now);
            self.probes += 1;
        }
    }

    /// Whether we relay through the server now (see [`RELAYING_FOR`]).
    pub fn relaying(&self, now: Instant) -> bool {
        self.last_relayed_at
            .is_some_and(|at| now.saturating_duration_since(at) < RELAYING_FOR)
    }

    fn probe_after(&self, now: Instant) -> Duration {
        if self.relaying(now) {
            PROBE_AFTER_RELAYING
        } else {
            PROBE_AFTER_IDLE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives `liveness` from `from` to `to` in [`POLL_INTERVAL`] steps with fixed counters;
    /// returns every verdict other than `Wait`, with its time since `from`.
    fn run(
        liveness: &mut Liveness,
        from: Instant,
        to: Duration,
        received: u64,
        relayed: u64,
    ) -> Vec<(Duration, Verdict)> {
        let mut out = Vec::new();
        let mut at = Duration::ZERO;
        while at <= to {
            let verdict = liveness.poll(from + at, received, relayed);
            if verdict == Verdict::Probe {
                liveness.probe_sent(from + at);
            }
            if verdict != Verdict::Wait {
                out.push((at, verdict));
            }
            at += POLL_INTERVAL;
        }
        out
    }

    #[test]
    fn a_server_that_keeps_sending_is_never_probed() {
        let t0 = Instant::now();
        let mut liveness = Liveness::new(t0, 0, 0);
        for step in 1..=400u64 {
            let now = t0 + POLL_INTERVAL * step as u32;
            // A datagram every other look (every 0.5 s), relaying all along.
            assert_eq!(liveness.poll(now, step / 2, step), Verdict::Wait);
        }
    }

    /// The verdicts of a silence whose first probe is at `first`: a probe every
    /// [`PROBE_REPEAT`] within the [`GRACE`], then gone.
    fn silence(first: Duration) -> Vec<(Duration, Verdict)> {
        let mut out: Vec<(Duration, Verdict)> = (0..MAX_PROBES_IN_FLIGHT as u32)
            .map(|k| (first + PROBE_REPEAT * k, Verdict::Probe))
            .collect();
        out.push((
            first + GRACE,
            Verdict::Gone {
                silent_for: first + GRACE,
                probes: MAX_PROBES_IN_FLIGHT as u32,
            },
        ));
        out
    }

    #[test]
    fn an_idle_peer_probes_after_five_silent_seconds_and_leaves_two_later() {
        let t0 = Instant::now();
        let mut liveness = Liveness::new(t0, 7, 0);
        let verdicts = run(&mut liveness, t0, Duration::from_secs(10), 7, 0);
        let expected = silence(PROBE_AFTER_IDLE);
        assert_eq!(verdicts[..expected.len()], expected[..]);
        let gone_at = PROBE_AFTER_IDLE + GRACE;
        // Asked again, the verdict stands (no more probes) until something arrives.
        assert!(verdicts[expected.len()..].iter().all(|(at, v)| *at > gone_at
            && matches!(v, Verdict::Gone { probes, .. } if *probes == MAX_PROBES_IN_FLIGHT as u32)));
        assert_eq!(
            liveness.poll(t0 + Duration::from_secs(11), 8, 0),
            Verdict::Wait
        );
    }

    #[test]
    fn a_relaying_peer_probes_after_one_silent_second() {
        let t0 = Instant::now();
        let mut liveness = Liveness::new(t0, 0, 0);
        // A relayed packet written at t0 + 250 ms; nothing ever arrives.
        assert_eq!(liveness.poll(t0 + POLL_INTERVAL, 0, 1), Verdict::Wait);
        assert!(liveness.relaying(t0 + POLL_INTERVAL));
        let verdicts = run(&mut liveness, t0, PROBE_AFTER_RELAYING + GRACE, 0, 1);
        assert_eq!(verdicts, silence(PROBE_AFTER_RELAYING));
    }

    #[test]
    fn an_answer_to_a_probe_ends_the_silence() {
        let t0 = Instant::now();
        let mut liveness = Liveness::new(t0, 3, 0);
        assert_eq!(liveness.poll(t0 + PROBE_AFTER_IDLE, 3, 0), Verdict::Probe);
        liveness.probe_sent(t0 + PROBE_AFTER_IDLE);
        // The reply arrives before the grace runs out: back to waiting, probes forgotten.
        let answered = t0 + PROBE_AFTER_IDLE + Duration::from_millis(500);
        assert_eq!(liveness.poll(answered, 4, 0), Verdict::Wait);
        assert_eq!(
            liveness.poll(answered + PROBE_AFTER_IDLE - POLL_INTERVAL, 4, 0),
            Verdict::Wait
        );
        // The next silence starts its own count.
        assert_eq!(
            liveness.poll(answered + PROBE_AFTER_IDLE, 4, 0),
            Verdict::Probe
        );
        liveness.probe_sent(answered + PROBE_AFTER_IDLE);
        assert_eq!(
            liveness.poll(answered + PROBE_AFTER_IDLE + GRACE, 4, 0),
            Verdict::Gone {
                silent_for: PROBE_AFTER_IDLE + GRACE,
                probes: 1
            }
        );
    }

    #[test]
    fn relaying_after_a_long_silence_probes_at_once() {
        let t0 = Instant::now();
        let mut liveness = Liveness::new(t0, 0, 0);
        // Idle for 3 s (below the idle threshold): no probe.
        assert!(run(&mut liveness, t0, Duration::from_secs(3), 0, 0).is_empty());
        // The user types into a relayed connection: the server must carry it, so the 3 s of
        // silence already call for a probe.
        let typed = t0 + Duration::from_secs(3) + POLL_INTERVAL;
        assert_eq!(liveness.poll(typed, 0, 1), Verdict::Probe);
    }

    /// A probe the session could not send (its earlier ones fill every slot) is asked for
    /// again at the next look, and the verdict counts only the probes that went out.
    #[test]
    fn a_probe_not_sent_is_asked_again_and_not_counted() {
        let t0 = Instant::now();
        let mut liveness = Liveness::new(t0, 0, 0);
        let first = t0 + PROBE_AFTER_IDLE;
        assert_eq!(liveness.poll(first, 0, 0), Verdict::Probe);
        liveness.probe_sent(first);
        assert_eq!(liveness.poll(first + POLL_INTERVAL, 0, 0), Verdict::Wait);
        // Due again; not sent this time (no slot), so asked again at every look.
        assert_eq!(liveness.poll(first + PROBE_REPEAT, 0, 0), Verdict::Probe);
        assert_eq!(
            liveness.poll(first + PROBE_REPEAT + POLL_INTERVAL, 0, 0),
            Verdict::Probe
        );
        assert_eq!(
            liveness.poll(first + GRACE, 0, 0),
            Verdict::Gone {
                silent_for: PROBE_AFTER_IDLE + GRACE,
                probes: 1
            }
        );
        // A stray report outside a silence counts nothing.
        let mut quiet = Liveness::new(t0, 0, 0);
        quiet.probe_sent(t0);
        assert_eq!(quiet.poll(t0 + POLL_INTERVAL, 0, 0), Verdict::Wait);
    }

    #[test]
    fn relaying_ends_after_a_quiet_while() {
        let t0 = Instant::now();
        let mut liveness = Liveness::new(t0, 0, 5);
        assert_eq!(liveness.poll(t0, 1, 6), Verdict::Wait);
        assert!(liveness.relaying(t0 + RELAYING_FOR - POLL_INTERVAL));
        assert!(!liveness.relaying(t0 + RELAYING_FOR));
    }

    #[test]
    fn time_going_backwards_or_counters_shrinking_do_not_panic() {
        let t0 = Instant::now() + Duration::from_secs(60);
        let mut liveness = Liveness::new(t0, 10, 10);
        assert_eq!(
            liveness.poll(t0 - Duration::from_secs(30), 2, 1),
            Verdict::Wait
        );
        // The shrunken counters count as news: silence is measured from that poll on.
        let since = t0 - Duration::from_secs(30);
        assert_eq!(liveness.poll(since + POLL_INTERVAL, 2, 1), Verdict::Wait);
        assert_eq!(
            liveness.poll(since + PROBE_AFTER_RELAYING, 2, 1),
            Verdict::Probe
        );
    }
}
