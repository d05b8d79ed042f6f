//! Birthday punching: a direct path between a symmetric NAT and a port-restricted one.
//!
//! Plain punching cannot open this pair: the symmetric ("hard") side's NAT gives its packets to
//! the other peer a public port nobody can know in advance, and the port-restricted ("easy")
//! side's NAT only lets in packets from an address and port it has sent to. The birthday
//! paradox gets around it:
//!
//! - the hard side opens [`BirthdayConfig::sockets`] extra sockets (256 by default) and sends an
//!   authenticated probe from each to the easy side's public address (the one the rendezvous
//!   observed), a "fan-out probe": its NAT opens as many mappings, each admitting packets from
//!   that address only. Against a NAT that an early packet turns symmetric, the first rounds of
//!   fan-out probes leave with the opening TTL ([`crate::PunchConfig::opening_ttl`]: they open
//!   our NAT and die before the peer's), see below;
//! - the easy side sends authenticated probes from its one socket to ports of the hard side's
//!   public IP (the IP the rendezvous observed), first the [`BirthdayConfig::predicted`] ports
//!   just above the port the rendezvous observed (a NAT that allocates ports sequentially gives
//!   the extra sockets those), then ports drawn at random without repetition from
//!   [`FIRST_PORT`]`..=65535`, paced at [`BirthdayConfig::per_second`] and at most
//!   [`BirthdayConfig::probes`] per introduction;
//! - a probe that lands on an open mapping reaches one of the extra sockets; the hard side
//!   answers it from that socket (the answer passes the easy side's NAT, which has just sent to
//!   that port) and probes back. Both sides stop at the first answer: the winning socket and
//!   the address it talks to are the path, the other extra sockets are closed.
//!
//! With `n` mappings open among the `N` ports of the range and `k` distinct ports probed, the
//! chance that no probe lands is the hypergeometric `C(N-n, k) / C(N, k)`
//! ([`success_probability`]): with 256 mappings, 1,000 probes succeed about 98 % of the time
//! and 2,048 about 99.97 %. A probe only counts once it reached a mapping opened before it:
//! the hard side re-sends from every socket on [`BirthdayConfig::fan_out_schedule`], and the
//! rounds from [`BirthdayConfig::short_ttl_until`] on go all the way (full TTL), so that a probe
//! that arrived before its mapping existed (and opened the easy side's filter for that port)
//! is answered by such a round; it also covers a symmetric NAT further away than the opening
//! TTL reaches (a carrier's NAT several hops out), whose mappings only the full rounds open.
//!
//! Why the first rounds must not reach the easy side: some NATs that measure as port-restricted
//! (a Linux router whose WAN input accepts unsolicited packets, `early` in the lab) keep state
//! for a packet that arrives before they have sent to its source, and that state takes their
//! public port for that remote. A fan-out probe from mapping `X` that reached such a NAT before
//! the easy side's spray probed `X` would make the spray's probe to `X` leave from another
//! port, which mapping `X` (open only to the easy side's observed address) drops: the very
//! ports that could win would be spoiled. So against such a NAT (its profile says
//! `inbound_takes_port`; the driver sets [`BirthdayConfig::short_ttl_until`] from it) the
//! fan-out probes stay short until the spray is over (2,048 probes at 1,000/s: about 2 s, plus
//! the two sides' start skew), and a full round comes after it. Against any other NAT the
//! rounds go all the way from the start: a spray probe that arrived before its mapping existed
//! is then answered by the next round, which matters when the spray starts well before the
//! fan-out (the hard side heard of the introduction late).
//!
//! Roles come from both sides' NAT profiles ([`role`]), which each side measured itself and the
//! rendezvous handed to the other at the introduction: only pairs that plain punching cannot
//! open take part, so an easy pair never sends one extra packet.
//!
//! What this may make a peer send, and where, is bounded (`docs/security.md`): probes go only to
//! the IP the rendezvous observed for the introduced peer, at most [`BirthdayConfig::probes`] per
//! introduction at [`BirthdayConfig::per_second`]; fan-out probes go only to the address the
//! rendezvous observed for the peer, [`BirthdayConfig::sockets`] per round.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::message::{Candidate, CandidateKind};
use common::nat::NatProfile;

/// The lowest port probed: NATs (Linux's included) map to ports from here up.
pub const FIRST_PORT: u16 = 1024;

/// Which side of a birthday punch we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BirthdayRole {
    /// Our NAT maps per destination: we open many mappings towards the peer.
    Hard,
    /// Our NAT keeps one port: we probe ports of the peer's NAT.
    Easy,
}

/// The sizes and pace of a birthday punch.
#[derive(Debug, Clone)]
pub struct BirthdayConfig {
    /// Extra sockets the hard side opens (mappings in its NAT).
    pub sockets: u16,
    /// Most probes the easy side sends per introduction.
    pub probes: u32,
    /// Most probes per second the easy side sends (and fan-out probes the hard side sends).
    pub per_second: u32,
    /// Ports just above the observed one probed first (sequential allocation).
    pub predicted: u16,
    /// When the hard side (re-)sends a fan-out probe from every extra socket, counted from the
    /// start.
    pub fan_out_schedule: Vec<Duration>,
    /// Fan-out rounds scheduled before this offset leave with the opening TTL
    /// ([`crate::PunchConfig::opening_ttl`]; none when that is `None`): they open our NAT's
    /// mappings without reaching the easy side's NAT while its spray runs (see the module
    /// documentation). Later rounds leave with the socket's TTL.
    pub short_ttl_until: Duration,
}

/// Default extra sockets of the hard side.
pub const DEFAULT_SOCKETS: u16 = 256;
/// Default most probes of the easy side per introduction.
pub const DEFAULT_PROBES: u32 = 2048;
/// Default pace of birthday datagrams, per second.
pub const DEFAULT_PER_SECOND: u32 = 1000;
/// Default ports probed first above the observed one.
pub const DEFAULT_PREDICTED: u16 = 64;
/// Default [`BirthdayConfig::short_ttl_until`]: the default spray (2,048 probes at 1,000/s)
/// takes about 2.05 s from the easy side's start, which may come a few hundred milliseconds
/// after ours (the rendezvous tells the two sides one after the other, over links that lose
/// packets): the rounds at 0, 1 and 2 s stay short, those at 3 and 4.5 s go all the way.
pub const DEFAULT_SHORT_TTL_UNTIL: Duration = Duration::from_millis(2500);

impl Default for BirthdayConfig {
    fn default() -> Self {
        BirthdayConfig {
            sockets: DEFAULT_SOCKETS,
            probes: DEFAULT_PROBES,
            per_second: DEFAULT_PER_SECOND,
            predicted: DEFAULT_PREDICTED,
            fan_out_schedule: [0, 1000, 2000, 3000, 4500]
                .iter()
                .map(|&ms| Duration::from_millis(ms))
                .collect(),
            short_ttl_until: DEFAULT_SHORT_TTL_UNTIL,
        }
    }
}

/// What one side does in a birthday punch, from the introduction.
#[derive(Debug, Clone)]
pub enum BirthdayPlan {
    /// Open `sockets` mappings towards `toward` (the peer's observed address).
    Hard {
        /// The easy side's public address.
        toward: SocketAddr,
        /// How many extra sockets the driver opened (may be fewer than configured).
        sockets: u16,
    },
    /// Probe ports of `ip` (the peer's observed IP).
    Easy {
        /// The hard side's public IP.
        ip: IpAddr,
        /// The port the rendezvous observed for it (sequential prediction starts above it).
        observed_port: u16,
    },
}

/// Our role in a birthday punch with a peer, from both NAT profiles; `None` for every pair that
/// plain punching opens (or that birthday punching cannot: two symmetric NATs, an unknown side).
pub fn role(ours: &NatProfile, theirs: &NatProfile) -> Option<BirthdayRole> {
    if ours.is_birthday_hard() && theirs.is_birthday_easy() {
        Some(BirthdayRole::Hard)
    } else if ours.is_birthday_easy() && theirs.is_birthday_hard() {
        Some(BirthdayRole::Easy)
    } else {
        None
    }
}

/// The plan for `role` against the peer's `candidates` (its observed one is the target); `None`
/// without an observed candidate. For [`BirthdayRole::Hard`], `sockets` is how many extra
/// sockets the driver could open.
pub fn plan(role: BirthdayRole, candidates: &[Candidate], sockets: u16) -> Option<BirthdayPlan> {
    let observed = candidates
        .iter()
        .find(|c| c.kind == CandidateKind::Observed)?
        .addr;
    Some(match role {
        BirthdayRole::Hard => BirthdayPlan::Hard {
            toward: observed,
            sockets,
        },
        BirthdayRole::Easy => BirthdayPlan::Easy {
            ip: observed.ip(),
            observed_port: observed.port(),
        },
    })
}

/// The chance that `probes` distinct ports drawn at random from `ports` hit at least one of
/// `open` mappings (hypergeometric: no port is probed twice).
pub fn success_probability(open: u32, probes: u32, ports: u32) -> f64 {
    if open == 0 || ports == 0 {
        return 0.0;
    }
    let mut miss = 1.0f64;
    for k in 0..probes.min(ports) {
        let left = f64::from(ports - k);
        miss *= (left - f64::from(open)).max(0.0) / left;
        if miss == 0.0 {
            break;
        }
    }
    1.0 - miss
}

/// splitmix64: port choice reproducible from a seed (the driver seeds it from the OS).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The easy side's probes: ports of one IP, paced and bounded.
#[derive(Debug, Clone)]
pub(crate) struct Spray {
    ip: IpAddr,
    observed_port: u16,
    predicted: u16,
    predicted_done: u16,
    budget: u32,
    interval: Duration,
    sent: u32,
    next_at: Instant,
    tried: HashSet<u16>,
    rng: Rng,
}

/// Probes that may go out at once after a late wake-up (then the pace holds again).
const SPRAY_BURST: u32 = 10;

impl Spray {
    pub(crate) fn new(
        ip: IpAddr,
        observed_port: u16,
        config: &BirthdayConfig,
        seed: u64,
        now: Instant,
    ) -> Spray {
        Spray {
            ip,
            observed_port,
            predicted: config.predicted,
            predicted_done: 0,
            budget: config.probes,
            interval: Duration::from_secs(1) / config.per_second.max(1),
            sent: 0,
            next_at: now,
            tried: HashSet::new(),
            rng: Rng(seed),
        }
    }

    /// Probes sent so far.
    pub(crate) fn sent(&self) -> u32 {
        self.sent
    }

    /// When the next probe is due, if any is left.
    pub(crate) fn due(&self) -> Option<Instant> {
        let span = usize::from(u16::MAX - FIRST_PORT) + 1;
        (self.sent < self.budget && self.tried.len() < span).then_some(self.next_at)
    }

    /// The next address to probe at `now`, if one is due.
    pub(crate) fn next(&mut self, now: Instant) -> Option<SocketAddr> {
        if self.due().is_none_or(|at| at > now) {
            return None;
        }
        let port = self.next_port()?;
        self.sent += 1;
        let earliest = now.checked_sub(self.interval * SPRAY_BURST).unwrap_or(now);
        self.next_at = self.next_at.max(earliest) + self.interval;
        Some(SocketAddr::new(self.ip, port))
    }

    fn next_port(&mut self) -> Option<u16> {
        let span = u32::from(u16::MAX - FIRST_PORT) + 1;
        // Sequential allocation first: the ports just above the one the rendezvous observed.
        while self.predicted_done < self.predicted {
            let base = u32::from(self.observed_port.max(FIRST_PORT) - FIRST_PORT);
            let offset = (base + 1 + u32::from(self.predicted_done)) % span;
            self.predicted_done += 1;
            let port = FIRST_PORT + offset as u16;
            if self.tried.insert(port) {
                return Some(port);
            }
        }
        if self.tried.len() as u32 >= span {
            return None;
        }
        loop {
            let port = FIRST_PORT + (self.rng.next_u64() % u64::from(span)) as u16;
            if self.tried.insert(port) {
                return Some(port);
            }
        }
    }

    /// Whether `addr` is one this spray may have probed (its IP).
    pub(crate) fn covers(&self, addr: SocketAddr) -> bool {
        addr.ip() == self.ip
    }
}

/// The hard side's fan-out probes: from every extra socket to one address, in rounds.
#[derive(Debug, Clone)]
pub(crate) struct FanOut {
    pub(crate) toward: SocketAddr,
    sockets: u16,
    schedule: Vec<Duration>,
    short_ttl_until: Duration,
    started: Instant,
    round: usize,
    next_socket: u16,
    interval: Duration,
    next_at: Instant,
    pub(crate) sent: u32,
}

impl FanOut {
    pub(crate) fn new(
        toward: SocketAddr,
        sockets: u16,
        config: &BirthdayConfig,
        now: Instant,
    ) -> FanOut {
        FanOut {
            toward,
            sockets,
            schedule: config.fan_out_schedule.clone(),
            short_ttl_until: config.short_ttl_until,
            started: now,
            round: 0,
            next_socket: 0,
            interval: Duration::from_secs(1) / config.per_second.max(1),
            next_at: now,
            sent: 0,
        }
    }

    /// When the next fan-out probe is due, if any.
    pub(crate) fn due(&self) -> Option<Instant> {
        if self.sockets == 0 {
            return None;
        }
        let round_at = self.started + *self.schedule.get(self.round)?;
        Some(round_at.max(self.next_at))
    }

    /// The extra socket to send the next fan-out probe from at `now`, if one is due, and
    /// whether it belongs to a short round (see [`BirthdayConfig::short_ttl_until`]).
    pub(crate) fn next(&mut self, now: Instant) -> Option<(u16, bool)> {
        if self.due().is_none_or(|at| at > now) {
            return None;
        }
        let short = self
            .schedule
            .get(self.round)
            .is_some_and(|offset| *offset < self.short_ttl_until);
        let socket = self.next_socket;
        self.next_socket += 1;
        if self.next_socket >= self.sockets {
            self.next_socket = 0;
            self.round += 1;
        }
        self.sent += 1;
        let earliest = now.checked_sub(self.interval * SPRAY_BURST).unwrap_or(now);
        self.next_at = self.next_at.max(earliest) + self.interval;
        Some((socket, short))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::nat::Behaviour;

    fn profile(mapping: Behaviour, filtering: Behaviour) -> NatProfile {
        NatProfile {
            udp: true,
            no_nat: false,
            mapping,
            filtering,
            inbound_takes_port: false,
        }
    }

    #[test]
    fn roles_only_for_pairs_plain_punching_cannot_open() {
        use Behaviour::*;
        let sym = profile(AddressAndPortDependent, AddressAndPortDependent);
        let port = profile(EndpointIndependent, AddressAndPortDependent);
        let addr = profile(EndpointIndependent, AddressDependent);
        let full = profile(EndpointIndependent, EndpointIndependent);
        let unknown = profile(Unknown, Unknown);
        assert_eq!(role(&sym, &port), Some(BirthdayRole::Hard));
        assert_eq!(role(&port, &sym), Some(BirthdayRole::Easy));
        for easy_pair in [
            (&port, &port),
            (&sym, &addr),
            (&sym, &full),
            (&addr, &sym),
            (&sym, &sym),
            (&sym, &unknown),
            (&unknown, &port),
        ] {
            assert_eq!(role(easy_pair.0, easy_pair.1), None, "{easy_pair:?}");
        }
        // Every pair given a role is one the forecast calls a birthday pair, and the roles agree.
        let kinds = [sym, port, addr, full, unknown];
        for a in &kinds {
            for b in &kinds {
                if let Some(r) = role(a, b) {
                    assert!(matches!(
                        common::nat::forecast(Some(a), Some(b)),
                        common::nat::Forecast::Birthday(_)
                    ));
                    let other = role(b, a);
                    assert_eq!(
                        other,
                        Some(match r {
                            BirthdayRole::Hard => BirthdayRole::Easy,
                            BirthdayRole::Easy => BirthdayRole::Hard,
                        })
                    );
                }
            }
        }
        // A UDP-blocked side takes no part.
        let blocked = NatProfile { udp: false, ..port };
        assert_eq!(role(&sym, &blocked), None);
    }

    #[test]
    fn the_model_matches_the_figures_of_the_docs() {
        let ports = u32::from(u16::MAX - FIRST_PORT) + 1;
        let p = |probes| success_probability(256, probes, ports);
        assert!((p(1000) - 0.98).abs() < 0.005, "{}", p(1000));
        assert!(p(2048) > 0.9996, "{}", p(2048));
        assert_eq!(success_probability(0, 1000, ports), 0.0);
        assert_eq!(success_probability(10, ports, ports), 1.0);
    }

    #[test]
    fn the_spray_is_paced_bounded_distinct_and_starts_with_predicted_ports() {
        let t0 = Instant::now();
        let config = BirthdayConfig {
            probes: 500,
            per_second: 1000,
            predicted: 4,
            ..BirthdayConfig::default()
        };
        let ip: IpAddr = [203, 0, 113, 7].into();
        let mut spray = Spray::new(ip, 40000, &config, 7, t0);
        let mut ports = Vec::new();
        let mut now = t0;
        // Woken every 5 ms for 2 s.
        while now < t0 + Duration::from_secs(2) {
            let mut this_wake = 0;
            while let Some(addr) = spray.next(now) {
                assert_eq!(addr.ip(), ip);
                ports.push(addr.port());
                this_wake += 1;
            }
            assert!(this_wake <= SPRAY_BURST as usize);
            // Never ahead of the pace: by `now`, at most per_second * elapsed + a burst.
            let elapsed = now.duration_since(t0).as_secs_f64();
            assert!(ports.len() as f64 <= elapsed * 1000.0 + 1.0 + f64::from(SPRAY_BURST));
            now += Duration::from_millis(5);
        }
        assert_eq!(ports.len(), 500);
        assert_eq!(&ports[..4], &[40001, 40002, 40003, 40004]);
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
        assert!(ports.iter().all(|p| *p >= FIRST_PORT));
        assert_eq!(spray.due(), None);
        // The last port of the range wraps to the first.
        let mut top = Spray::new(ip, u16::MAX, &config, 1, t0);
        assert_eq!(top.next(t0).map(|a| a.port()), Some(FIRST_PORT));
    }

    #[test]
    fn fan_out_rounds_cover_every_socket_at_the_pace_short_then_full() {
        let t0 = Instant::now();
        let config = BirthdayConfig {
            fan_out_schedule: vec![Duration::ZERO, Duration::from_secs(1)],
            short_ttl_until: Duration::from_millis(500),
            per_second: 1000,
            ..BirthdayConfig::default()
        };
        let toward: SocketAddr = "203.0.113.8:4000".parse().unwrap();
        let mut fan_out = FanOut::new(toward, 20, &config, t0);
        let mut sent = Vec::new();
        let mut now = t0;
        while now < t0 + Duration::from_secs(3) {
            while let Some((s, short)) = fan_out.next(now) {
                sent.push((now.duration_since(t0), s, short));
            }
            now += Duration::from_millis(1);
        }
        assert_eq!(sent.len(), 40);
        let first: Vec<u16> = sent[..20].iter().map(|(_, s, _)| *s).collect();
        assert_eq!(first, (0..20).collect::<Vec<_>>());
        // The first round (scheduled at 0, before 500 ms) is short, even its packets that leave
        // late; the second (at 1 s) goes all the way.
        assert!(sent[..20].iter().all(|(_, _, short)| *short));
        assert!(sent[20..]
            .iter()
            .all(|(at, _, short)| *at >= Duration::from_secs(1) && !*short));
        assert_eq!(fan_out.due(), None);
        // The default: the rounds the spray may still overlap are short, a full one follows.
        let default = BirthdayConfig::default();
        let spray = Duration::from_secs(1) * default.probes / default.per_second;
        assert!(default.short_ttl_until > spray);
        assert!(default
            .fan_out_schedule
            .iter()
            .any(|at| *at >= default.short_ttl_until));
    }
}
