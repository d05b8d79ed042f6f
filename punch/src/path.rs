//! Which path a connection uses, as a state machine with time passed in (the magicsock idea:
//! quinn talks to one stable address per peer, and this decides where its packets really go).
//!
//! - A connection starts on the relay (it always works) or on a path a punch has proven.
//! - A proven direct path is used as soon as it is known (make-before-break: the relay carries
//!   traffic until then).
//! - While direct, a heartbeat (a STUN Binding request the peer's socket answers) goes out every
//!   [`PathConfig::heartbeat`], and every [`PathConfig::heartbeat_retry`] while one is
//!   unanswered. Traffic falls back to the relay only when no answer came for
//!   [`PathConfig::silence`] *and* at least [`PathConfig::unanswered`] heartbeats in a row went
//!   unanswered: on a lossy path (10 % loss per link is a round trip lost a third of the time)
//!   a few lost heartbeats are not a dead path, while a dead path is still left within about
//!   two seconds. Heartbeats go on, and the first answer moves traffic back.
//! - Without a working direct path, punching is retried with exponential backoff, and at once
//!   when an address changes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Timers of the path selector.
#[derive(Debug, Clone, Copy)]
pub struct PathConfig {
    /// Heartbeat interval on a direct path.
    pub heartbeat: Duration,
    /// Heartbeat interval on a direct path in use while the last heartbeat is unanswered (so
    /// that a lossy path gets enough chances within `silence`).
    pub heartbeat_retry: Duration,
    /// Silence after which a direct path is abandoned for the relay...
    pub silence: Duration,
    /// ...once at least this many heartbeats in a row went unanswered.
    pub unanswered: u32,
    /// First retry of a failed punch.
    pub repunch_min: Duration,
    /// Longest wait between punch retries.
    pub repunch_max: Duration,
}

impl Default for PathConfig {
    fn default() -> Self {
        PathConfig {
            heartbeat: Duration::from_millis(500),
            heartbeat_retry: Duration::from_millis(200),
            silence: Duration::from_millis(1500),
            // With 0.5 s then 0.2 s spacing the eighth goes out about 1.8 s after the last
            // answer, when seven have had time to come back: a round trip lost a third of the
            // time fails all seven about once in 1,700 tries (three in a row: once in 25).
            unanswered: 8,
            repunch_min: Duration::from_secs(2),
            repunch_max: Duration::from_secs(60),
        }
    }
}

/// Where a connection's packets go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Current {
    /// Through the rendezvous's relay.
    Relay,
    /// Straight to the peer at this address.
    Direct(SocketAddr),
}

/// What the driver must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send the connection's packets this way from now on.
    Switch(Current),
    /// Send a heartbeat to this address.
    Heartbeat(SocketAddr),
    /// Ask the rendezvous for a new introduction and punch.
    Repunch,
}

/// The path state of one connection.
#[derive(Debug)]
pub struct PathSelector {
    config: PathConfig,
    current: Current,
    direct: Option<SocketAddr>,
    last_answer: Option<Instant>,
    next_heartbeat: Option<Instant>,
    /// Heartbeats sent to `direct` since its last answer.
    unanswered: u32,
    /// When the last heartbeat went out.
    last_heartbeat: Option<Instant>,
    punching: bool,
    repunch_at: Option<Instant>,
    backoff: Duration,
}

impl PathSelector {
    /// A selector whose connection starts on `initial`. Starting on the relay, a punch is assumed
    /// to be under way (the caller punches as it connects); report its end with
    /// [`PathSelector::direct_proven`] or [`PathSelector::punch_failed`].
    pub fn new(initial: Current, now: Instant, config: PathConfig) -> Self {
        let (direct, last_answer) = match initial {
            Current::Direct(addr) => (Some(addr), Some(now)),
            Current::Relay => (None, None),
        };
        PathSelector {
            config,
            current: initial,
            direct,
            last_answer,
            next_heartbeat: direct.map(|_| now + config.heartbeat),
            unanswered: 0,
            last_heartbeat: None,
            punching: initial == Current::Relay,
            repunch_at: None,
            backoff: config.repunch_min,
        }
    }

    /// The path in use.
    pub fn current(&self) -> Current {
        self.current
    }

    /// The direct path known (in use or not).
    pub fn direct(&self) -> Option<SocketAddr> {
        self.direct
    }

    /// A punch proved `addr` works both ways.
    pub fn direct_proven(&mut self, addr: SocketAddr, now: Instant) {
        self.punching = false;
        self.repunch_at = None;
        self.backoff = self.config.repunch_min;
        self.direct = Some(addr);
        self.last_answer = Some(now);
        self.next_heartbeat = Some(now + self.config.heartbeat);
        self.unanswered = 0;
        self.last_heartbeat = None;
    }

    /// A punch found no path: try again later, backing off.
    pub fn punch_failed(&mut self, now: Instant) {
        self.punching = false;
        if self.direct.is_some() && self.current != Current::Relay {
            // A late failure of an older punch (two may run at once: a plain one and the
            // birthday one that followed our NAT measurement): the path in use stands, and if
            // it dies the switch to the relay schedules the next punch.
            return;
        }
        self.repunch_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(self.config.repunch_max);
    }

    /// A heartbeat sent to `addr` was answered.
    pub fn heartbeat_answered(&mut self, addr: SocketAddr, now: Instant) {
        if self.direct == Some(addr) {
            self.last_answer = Some(now);
            self.unanswered = 0;
            // Back to the normal pace (a retry may have been scheduled sooner).
            if let (Some(next), Some(sent)) = (self.next_heartbeat, self.last_heartbeat) {
                self.next_heartbeat = Some(next.max(sent + self.config.heartbeat));
            }
        }
    }

    /// Our or the peer's public address changed: the direct path may be gone; punch again now.
    pub fn address_changed(&mut self, now: Instant) {
        if !self.punching {
            self.repunch_at = Some(now);
            self.backoff = self.config.repunch_min;
        }
    }

    /// Whether a direct path is known and answered within `silence` (alive by this selector's
    /// rules, whether in use or not).
    pub fn answering(&self, now: Instant) -> bool {
        self.direct.is_some() && !self.silent(now)
    }

    /// The driver moved the connection's packets off the direct path in use (its route went
    /// back to the relay): the selector follows, so that what it says and where packets go
    /// agree, and the path's next answer moves the packets back.
    pub fn left_direct(&mut self) {
        if matches!(self.current, Current::Direct(_)) {
            self.current = Current::Relay;
        }
    }

    /// No answer for `silence`. Leaving a path in use also needs `unanswered` heartbeats.
    fn silent(&self, now: Instant) -> bool {
        self.last_answer
            .is_none_or(|at| now.saturating_duration_since(at) > self.config.silence)
    }

    /// The path in use is dead: silent, and enough heartbeats went unanswered.
    fn dead(&self, now: Instant) -> bool {
        self.silent(now) && self.unanswered >= self.config.unanswered
    }

    /// The next thing to do now, if any. Call until it returns `None`.
    pub fn poll(&mut self, now: Instant) -> Option<Action> {
        if let Some(addr) = self.direct {
            let silent = self.silent(now);
            if self.current == Current::Direct(addr) && self.dead(now) {
                self.current = Current::Relay;
                // The path may be gone for good (new NAT mapping): punch again soon, while
                // heartbeats keep testing the old path.
                if !self.punching && self.repunch_at.is_none() {
                    self.repunch_at = Some(now + self.config.repunch_min);
                }
                return Some(Action::Switch(Current::Relay));
            }
            if self.current != Current::Direct(addr) && !silent {
                self.current = Current::Direct(addr);
                return Some(Action::Switch(self.current));
            }
            if self.next_heartbeat.is_some_and(|at| now >= at) {
                self.unanswered = self.unanswered.saturating_add(1);
                self.last_heartbeat = Some(now);
                // The next one goes soon in case this one is lost; its answer puts the next
                // back at the normal pace. Only for the path in use: a path already left is
                // tested at the normal pace until it answers again.
                let interval = if self.current == Current::Direct(addr) {
                    self.config.heartbeat_retry
                } else {
                    self.config.heartbeat
                };
                self.next_heartbeat = Some(now + interval);
                return Some(Action::Heartbeat(addr));
            }
        }
        if !self.punching && self.repunch_at.is_some_and(|at| now >= at) {
            self.repunch_at = None;
            self.punching = true;
            return Some(Action::Repunch);
        }
        None
    }

    /// When to call [`PathSelector::poll`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        };
        if self.direct.is_some() {
            consider(self.next_heartbeat);
            // The silence deadline matters only once enough heartbeats went unanswered (until
            // then the next heartbeat is the next event); considered earlier, a past deadline
            // would be returned again and again and spin the driver until the path is dead.
            if self.current != Current::Relay && self.unanswered >= self.config.unanswered {
                consider(
                    self.last_answer
                        .map(|at| at + self.config.silence + Duration::from_millis(1)),
                );
            }
        }
        if !self.punching {
            consider(self.repunch_at);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        "203.0.113.21:4000".parse().unwrap()
    }

    /// Runs the selector to `until`, answering heartbeats while `answering(now)`; returns the
    /// switches seen with their times.
    fn run(
        sel: &mut PathSelector,
        from: Instant,
        until: Instant,
        answering: impl Fn(Instant) -> bool,
    ) -> Vec<(Duration, Action)> {
        let mut now = from;
        let mut seen = Vec::new();
        while now <= until {
            while let Some(action) = sel.poll(now) {
                match action {
                    Action::Heartbeat(a) if answering(now) => {
                        sel.heartbeat_answered(a, now + Duration::from_millis(20))
                    }
                    Action::Heartbeat(_) => {}
                    other => seen.push((now - from, other)),
                }
            }
            now += Duration::from_millis(10);
        }
        seen
    }

    #[test]
    fn starts_on_the_relay_and_moves_to_a_proven_path() {
        let t0 = Instant::now();
        let mut sel = PathSelector::new(Current::Relay, t0, PathConfig::default());
        assert_eq!(sel.poll(t0), None);
        sel.direct_proven(addr(), t0 + Duration::from_millis(30));
        assert_eq!(
            sel.poll(t0 + Duration::from_millis(30)),
            Some(Action::Switch(Current::Direct(addr())))
        );
        // Heartbeats answered: stays direct.
        let seen = run(&mut sel, t0, t0 + Duration::from_secs(10), |_| true);
        assert!(seen.is_empty(), "{seen:?}");
        assert_eq!(sel.current(), Current::Direct(addr()));
    }

    #[test]
    fn falls_back_within_two_seconds_of_silence_and_returns() {
        let t0 = Instant::now();
        let mut sel = PathSelector::new(Current::Direct(addr()), t0, PathConfig::default());
        let cut = t0 + Duration::from_secs(5);
        let back = t0 + Duration::from_secs(12);
        let seen = run(&mut sel, t0, t0 + Duration::from_secs(20), |now| {
            now < cut || now >= back
        });
        let fallback = seen
            .iter()
            .find(|(_, a)| *a == Action::Switch(Current::Relay))
            .expect("fell back");
        let after_cut = fallback.0 - Duration::from_secs(5);
        assert!(
            after_cut <= Duration::from_secs(2),
            "fell back {after_cut:?} after the cut"
        );
        let returned = seen
            .iter()
            .find(|(_, a)| *a == Action::Switch(Current::Direct(addr())))
            .expect("returned");
        assert!(
            returned.0 >= Duration::from_secs(12) && returned.0 <= Duration::from_millis(12_600)
        );
        // While relayed it asked to punch again.
        assert!(seen
            .iter()
            .any(|(at, a)| *a == Action::Repunch && *at > fallback.0 && *at < returned.0));
        assert_eq!(sel.current(), Current::Direct(addr()));
    }

    /// A path that loses about a third of its round trips (10 % loss on each of the four link
    /// crossings of a heartbeat and its answer) but is alive: counts the fallbacks to the relay
    /// in ten simulated minutes.
    fn fallbacks_on_a_lossy_path(config: PathConfig) -> usize {
        let t0 = Instant::now();
        let mut sel = PathSelector::new(Current::Direct(addr()), t0, config);
        // xorshift64: the same losses on every run.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut lost = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % 1000 < 344
        };
        let rtt = Duration::from_millis(90);
        let mut in_flight: Vec<Instant> = Vec::new();
        let mut fallbacks = 0;
        let mut now = t0;
        while now < t0 + Duration::from_secs(600) {
            in_flight.retain(|&at| {
                if at <= now {
                    sel.heartbeat_answered(addr(), at);
                    false
                } else {
                    true
                }
            });
            while let Some(action) = sel.poll(now) {
                match action {
                    Action::Heartbeat(_) if !lost() => in_flight.push(now + rtt),
                    Action::Switch(Current::Relay) => fallbacks += 1,
                    _ => {}
                }
            }
            now += Duration::from_millis(10);
        }
        fallbacks
    }

    #[test]
    fn a_lossy_but_live_path_is_kept() {
        let ours = fallbacks_on_a_lossy_path(PathConfig::default());
        // The rule before: three heartbeats at 0.5 s and 1.5 s of silence.
        let three_lost = fallbacks_on_a_lossy_path(PathConfig {
            heartbeat_retry: Duration::from_millis(500),
            unanswered: 0,
            ..PathConfig::default()
        });
        assert!(
            three_lost >= 20,
            "the old rule fell back {three_lost} times"
        );
        assert!(
            ours * 20 <= three_lost,
            "fell back {ours} times in 10 minutes (the old rule: {three_lost})"
        );
    }

    #[test]
    fn failed_punches_are_retried_with_backoff_and_at_once_on_address_change() {
        let t0 = Instant::now();
        let mut sel = PathSelector::new(Current::Relay, t0, PathConfig::default());
        let mut now = t0;
        let mut retries = Vec::new();
        for _ in 0..8 {
            sel.punch_failed(now);
            now = sel.poll_timeout().expect("a retry is scheduled");
            assert_eq!(sel.poll(now), Some(Action::Repunch));
            retries.push(now);
        }
        let gaps: Vec<u64> = retries
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs())
            .collect();
        assert_eq!(gaps, vec![4, 8, 16, 32, 60, 60, 60]);
        sel.punch_failed(now);
        sel.address_changed(now);
        assert_eq!(sel.poll(now), Some(Action::Repunch));
        // No second punch while one is running.
        sel.address_changed(now);
        assert_eq!(sel.poll(now), None);
    }

    /// Two punches may run at once (a plain one, then the birthday punch that followed our NAT
    /// measurement): the plain one's late failure leaves the path the other found alone.
    #[test]
    fn a_late_failure_does_not_repunch_a_path_in_use() {
        let t0 = Instant::now();
        let mut sel = PathSelector::new(Current::Relay, t0, PathConfig::default());
        sel.direct_proven(addr(), t0);
        assert_eq!(sel.poll(t0), Some(Action::Switch(Current::Direct(addr()))));
        sel.punch_failed(t0 + Duration::from_millis(100));
        let seen = run(&mut sel, t0, t0 + Duration::from_secs(120), |_| true);
        assert!(seen.is_empty(), "{seen:?}");
        assert_eq!(sel.current(), Current::Direct(addr()));
    }
}
