//! The peer's overall budget of punching datagrams per second, shared by all its sessions.
//!
//! Each [`Puncher`](crate::Puncher) bounds what one introduction makes it send
//! ([`PunchConfig::max_probes`](crate::PunchConfig::max_probes) and
//! [`max_answers`](crate::PunchConfig::max_answers)), but introductions are cheap for whoever asks
//! for them: a peer that announces a victim's addresses as its candidates and asks to be
//! introduced over and over would make us a reflector aimed at the victim. The rendezvous
//! rate-limits introductions per requester and per target; this bucket is the peer's own bound,
//! whatever the rendezvous does: the driver asks it before sending each punching datagram and
//! drops the datagram when it is empty (as the network might; punching copes with loss).

use std::time::Instant;

/// Punching datagrams a peer sends at once by default...
pub const DEFAULT_BURST: u32 = 256;
/// ...and per second sustained after that.
pub const DEFAULT_PER_SECOND: u32 = 128;

/// A token bucket over punching datagrams, with `now` passed in.
#[derive(Debug, Clone)]
pub struct ProbeBudget {
    burst: f64,
    per_second: f64,
    tokens: f64,
    last: Option<Instant>,
    dropped: u64,
}

impl Default for ProbeBudget {
    fn default() -> Self {
        ProbeBudget::new(DEFAULT_BURST, DEFAULT_PER_SECOND)
    }
}

impl ProbeBudget {
    /// `burst` datagrams at once, `per_second` sustained.
    pub fn new(burst: u32, per_second: u32) -> Self {
        ProbeBudget {
            burst: f64::from(burst),
            per_second: f64::from(per_second),
            tokens: f64::from(burst),
            last: None,
            dropped: 0,
        }
    }

    /// Whether one more datagram may be sent at `now` (and takes its token if so).
    pub fn try_send(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            // Time never runs backwards here: an earlier `now` refills nothing.
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        }
        self.last = Some(self.last.map_or(now, |last| last.max(now)));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.dropped = self.dropped.saturating_add(1);
            false
        }
    }

    /// Datagrams refused so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut budget = ProbeBudget::new(10, 5);
        assert_eq!((0..100).filter(|_| budget.try_send(t0)).count(), 10);
        assert_eq!(budget.dropped(), 90);
        // One second later, five more; an earlier reading refills nothing.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..100).filter(|_| budget.try_send(t1)).count(), 5);
        assert!(!budget.try_send(t0));
        // Idle for long: back to the burst, never more.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!((0..100).filter(|_| budget.try_send(t2)).count(), 10);
    }
}
