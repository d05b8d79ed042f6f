//! Sans-IO UDP hole punching, in the manner of ICE connectivity checks (RFC 8445) and quinn-proto:
//! no sockets, no clocks, no tasks. The driver feeds received datagrams and the time, sends what
//! [`Puncher::poll_transmit`] returns, and wakes up at [`Puncher::poll_timeout`].
//!
//! Both peers run a puncher for the same introduction (same nonce) at about the same time:
//!
//! - each probes every candidate address of the other with STUN Binding requests tagged with the
//!   nonce and its id ([`common::stun::ProbeTag`]), at once and then backing off;
//! - each answers the other's probes, and when a probe arrives from an address that is not a
//!   known candidate (a symmetric NAT's new port, a hairpin path), probes that address at once
//!   (a "triggered check": the peer-reflexive candidate of ICE);
//! - a probe that is answered proves the path works both ways. The initiator takes the first
//!   such path for its QUIC connection. Both sides stop probing once a path is proven but keep
//!   answering the other's probes until the deadline, so that the other side can prove its path
//!   too;
//! - probes and answers carry MESSAGE-INTEGRITY keyed by the introduction's secret key
//!   ([`PunchKey`], ICE's short-term password; the nonce in the USERNAME and transaction ids is
//!   public and only routes datagrams): only the peer, which learned the key from the rendezvous
//!   over TLS, can produce a probe or an answer that counts, so neither a stranger answering at
//!   a candidate address nor a host that sees every probe can steer the path. Datagrams that
//!   carry our nonce but fail the check are ignored and counted ([`Event::Unauthenticated`]);
//! - what one session may send is bounded: at most [`MAX_CANDIDATES`] usable candidates (see
//!   [`usable_candidate`]), and at most [`PunchConfig::max_probes`] probes and
//!   [`PunchConfig::max_answers`] answers, whatever the candidates and the peer's probes.
//!
//! If nothing is answered by the deadline, the puncher fails with a report of what it saw, from
//! which [`FailureReport::reason`] explains why in words.

pub mod birthday;
pub mod budget;
pub mod heartbeat;
pub mod path;
pub mod peer_paths;
pub mod script;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use birthday::{BirthdayConfig, BirthdayPlan, Opening, Spray};
use common::message::{Candidate, CandidateKind};
use common::stun::{self, ProbeTag, PunchKey, StunPacket};
use common::PeerId;

/// Most addresses probed in one session (candidates plus peer-reflexive ones).
pub const MAX_TARGETS: usize = 32;
/// Most probes awaiting an answer.
const MAX_PENDING: usize = 512;
pub use common::message::{usable_candidate, MAX_CANDIDATES};
/// [`Event::Unauthenticated`] is reported for this many datagrams per session, then only
/// counted (a flood of forgeries must not flood the log).
const UNAUTHENTICATED_EVENTS: u32 = 8;

/// Timing of a punching session.
#[derive(Debug, Clone)]
pub struct PunchConfig {
    /// When to probe each address, counted from the moment it became known. Dense at first
    /// (the other side may start a little later and its NAT drops our first probes), sparse later.
    pub schedule: Vec<Duration>,
    /// When to give up, counted from the start.
    pub deadline: Duration,
    /// Most probes the session sends (scheduled and triggered): whoever the candidates are,
    /// one introduction makes us send no more than this.
    pub max_probes: u32,
    /// Most answers the session sends to the peer's (authenticated) probes.
    pub max_answers: u32,
    /// We have IPv6 that works (our address was proven to the rendezvous): an IPv4 path proven
    /// while the peer's proven IPv6 address is still being probed waits briefly for it (see
    /// `IPV6_PREFERENCE_RTTS`). Off by default.
    pub prefer_ipv6: bool,
    /// IP TTL of the opening probes: one to each public candidate at the start, before any
    /// probe that can reach the peer. It reaches our own NAT (which then holds a mapping for
    /// the peer's address) but dies before the peer's NAT. Some NATs (a Linux router whose WAN
    /// input accepts unsolicited packets) let a packet that arrives before our own first packet
    /// take our public port for that remote: our mapping toward the peer would then get a new
    /// port, as behind a symmetric NAT, and a port-restricted peer would drop everything from
    /// it. `None`: no opening probes.
    pub opening_ttl: Option<u8>,
    /// The responder is told of the introduction before the initiator (the rendezvous pushes
    /// to it first), so its probes could reach the initiator's NAT before the initiator's
    /// opening probe: the responder sends its opening probes at once but holds its other
    /// probes until the initiator's first authenticated probe arrives (the initiator has
    /// opened its NAT by then) or the driver learns otherwise that the initiator is under way
    /// ([`Puncher::release_hold`]), at most this long. Zero: no hold.
    pub responder_hold: Duration,
    /// How long a birthday punch ([`Puncher::with_birthday`]) waits for IPv6 when IPv6 is
    /// available to the pair (we proved our IPv6 address, `prefer_ipv6`, and the peer's
    /// proven one is a candidate): the IPv6 path needs no extra sockets or probes, so the
    /// birthday punch starts only if no direct path was proven by then, and never if one was.
    pub ipv6_before_birthday: Duration,
}

/// Default [`PunchConfig::ipv6_before_birthday`]: a dual-stack pair goes direct over IPv6 in
/// well under 200 ms in the lab, clean (a few hundred at 40 ms and 10 % loss, where the
/// probe schedule's early retries are what gets through); a second leaves room for both, and
/// a birthday punch (its session lasts 8 s) still has most of its time when IPv6 fails.
pub const DEFAULT_IPV6_BEFORE_BIRTHDAY: Duration = Duration::from_secs(1);

/// Default [`PunchConfig::opening_ttl`]: the first hop is our NAT (or home router) and the second
/// the next router upstream, where the probe dies. A CGNAT behind the home router is not
/// opened (its first packet toward the peer still comes from us before the peer's, in the
/// common case), and a peer two hops away hears the probe, which is only a probe.
pub const DEFAULT_OPENING_TTL: u8 = 2;

/// Default [`PunchConfig::responder_hold`]: longer than the gap between the two sides hearing
/// of the introduction even when the initiator's copy was lost once and sent again (a QUIC
/// retransmission after a few round trips). It is rarely waited out: the initiator's first
/// probe ends it, and so does its first packet over the relay (see `peer::punching`), whatever
/// our NAT; only a responder that neither hears the initiator's probes nor has the relay waits
/// this long.
pub const DEFAULT_RESPONDER_HOLD: Duration = Duration::from_secs(1);

impl Default for PunchConfig {
    fn default() -> Self {
        let ms = [
            0, 20, 40, 80, 160, 320, 640, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 4500,
        ];
        PunchConfig {
            schedule: ms.iter().map(|&m| Duration::from_millis(m)).collect(),
            deadline: Duration::from_secs(5),
            // The schedule times MAX_CANDIDATES targets and a few peer-reflexive ones: a normal
            // session sends far fewer (probing stops at the first answer).
            max_probes: 160,
            max_answers: 160,
            prefer_ipv6: false,
            opening_ttl: Some(DEFAULT_OPENING_TTL),
            responder_hold: DEFAULT_RESPONDER_HOLD,
            ipv6_before_birthday: DEFAULT_IPV6_BEFORE_BIRTHDAY,
        }
    }
}

/// Which side of the introduction we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We asked to connect; we pick the path and dial QUIC over it.
    Initiator,
    /// We were asked; we probe and answer so that the initiator's path opens.
    Responder,
}

/// How a path's address was learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// From the introduction.
    Candidate(CandidateKind),
    /// From the source of the peer's probe.
    PeerReflexive,
    /// Found by birthday punching ([`birthday`]): a port of the peer's symmetric NAT hit by one
    /// of our probes, or the peer's address reached from one of our extra sockets.
    Birthday,
}

impl PathKind {
    /// How the path is described to users.
    pub fn describe(&self) -> &'static str {
        match self {
            PathKind::Candidate(kind) => kind.describe(),
            PathKind::PeerReflexive => "address learned from the peer's probe",
            PathKind::Birthday => "birthday punch",
        }
    }
}

impl PathKind {
    /// How a path of this kind to `addr` is described to users (a global IPv6 interface
    /// address is a public address, see [`common::message::describe_candidate`]).
    pub fn describe_at(&self, addr: SocketAddr) -> &'static str {
        match self {
            PathKind::Candidate(kind) => common::message::describe_candidate(*kind, addr),
            PathKind::PeerReflexive | PathKind::Birthday => self.describe(),
        }
    }
}

/// A working direct path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    /// The peer's address on this path.
    pub addr: SocketAddr,
    /// Where the address came from.
    pub kind: PathKind,
    /// Round trip of the probe that proved it.
    pub rtt: Duration,
    /// Our address as the peer saw it on this path.
    pub our_mapping: Option<SocketAddr>,
    /// From the start of the session to the proof.
    pub elapsed: Duration,
}

/// What a failed session saw, to explain the failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureReport {
    /// The peer's candidates.
    pub candidates: Vec<Candidate>,
    /// Probes we sent.
    pub probes_sent: u32,
    /// Probes of the peer that reached us.
    pub probes_received: u32,
    /// Answers to our probes.
    pub answers_received: u32,
    /// Addresses the peer's probes came from.
    pub peer_sources: Vec<SocketAddr>,
    /// Datagrams with our nonce whose MESSAGE-INTEGRITY did not check (forged or corrupted).
    pub unauthenticated: u32,
    /// How long we tried.
    pub elapsed: Duration,
}

impl FailureReport {
    /// Why no direct path was found, from the evidence.
    pub fn reason(&self) -> String {
        let tried = format!(
            "{} probes to {} address{} over {:.1} s",
            self.probes_sent,
            self.candidates.len(),
            if self.candidates.len() == 1 { "" } else { "es" },
            self.elapsed.as_secs_f64()
        );
        let new_ports: Vec<String> = self
            .peer_sources
            .iter()
            .filter(|s| !self.candidates.iter().any(|c| c.addr == **s))
            .map(|s| s.to_string())
            .collect();
        let reason = self.reason_from_probes(&tried, &new_ports);
        if self.unauthenticated == 0 {
            return reason;
        }
        format!(
            "{reason}; {} datagram(s) with this introduction's nonce failed authentication \
             (forged by a host that sees the probes, or corrupted)",
            self.unauthenticated
        )
    }

    fn reason_from_probes(&self, tried: &str, new_ports: &[String]) -> String {
        if self.probes_received == 0 {
            format!(
                "nothing from the peer got through and none of our probes was answered ({tried}): \
                 both NATs drop packets from addresses they have not sent to, and at least one \
                 gives a new port for every destination (symmetric NAT), or UDP between the peers is blocked"
            )
        } else if !new_ports.is_empty() {
            format!(
                "the peer's probes reached us from {} (not the address it registered): its NAT gives \
                 a new port for every destination (symmetric), or gave one for us because a packet \
                 of ours reached it before the peer had sent to us (a Linux router that keeps state \
                 for unsolicited packets), and our answers to that port were dropped on the way \
                 back ({tried})",
                new_ports.join(", ")
            )
        } else {
            format!(
                "the peer's probes reached us but our probes and answers never got back ({tried}): \
                 our NAT gives a new port for every destination (symmetric) and the peer's NAT only \
                 accepts packets from addresses and ports it has sent to"
            )
        }
    }
}

impl fmt::Display for FailureReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason())
    }
}

/// Where the session stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Still probing.
    Probing,
    /// A path works.
    Direct(Path),
    /// Deadline passed without a working path.
    Failed(FailureReport),
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where.
    pub destination: SocketAddr,
    /// What.
    pub contents: Vec<u8>,
    /// The IP TTL (hop limit) to send with, if not the socket's default: an opening probe
    /// ([`PunchConfig::opening_ttl`]). A driver that cannot set it drops the datagram.
    pub ttl: Option<u8>,
    /// A birthday-punching datagram (paced and budgeted apart from ordinary probes; an opening
    /// probe leaves from an extra socket), or `None` for one from the primary socket.
    pub birthday: Option<BirthdayTransmit>,
}

/// What kind of birthday-punching datagram a [`Transmit`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BirthdayTransmit {
    /// The hard side's opening probe, from extra socket number `socket` (0-based, below the
    /// plan's `sockets`).
    Opening {
        /// Which extra socket sends it.
        socket: u16,
    },
    /// The easy side's probe of a port of the peer's NAT.
    Spray,
}

/// What a probe in flight was sent to.
#[derive(Debug, Clone, Copy)]
enum Probed {
    /// A target (by index).
    Target(usize),
    /// A port of the peer's NAT (birthday spray).
    Spray(SocketAddr),
    /// The peer's address, from an extra socket (birthday opening).
    Opening,
}

/// Events for logs and `--verbose`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A probe was sent.
    ProbeSent {
        /// To where.
        to: SocketAddr,
        /// Scheduled attempt number for that address (0-based), or `None` for a triggered check.
        attempt: Option<usize>,
    },
    /// An opening probe was sent: a probe with a short TTL that opens our NAT's mapping toward
    /// `to` and dies before the peer's NAT ([`PunchConfig::opening_ttl`]).
    OpeningSent {
        /// Toward where.
        to: SocketAddr,
        /// Its IP TTL.
        ttl: u8,
    },
    /// A probe of the peer arrived.
    ProbeReceived {
        /// From where.
        from: SocketAddr,
    },
    /// A new address to probe was learned from the peer's probe.
    PeerReflexive {
        /// The address.
        addr: SocketAddr,
    },
    /// A datagram with our nonce (a probe, or an answer to one of our probes) whose
    /// MESSAGE-INTEGRITY is missing or does not check with the introduction's key: ignored.
    /// Reported for the first few per session, then only counted.
    Unauthenticated {
        /// From where.
        from: SocketAddr,
        /// A probe (`true`) or an answer.
        probe: bool,
    },
    /// One of our probes was answered.
    Answered {
        /// By whom.
        from: SocketAddr,
        /// Round trip.
        rtt: Duration,
    },
}

#[derive(Debug)]
struct Target {
    addr: SocketAddr,
    kind: PathKind,
    known_at: Instant,
    attempt: usize,
    validated: bool,
    // An opening probe is still to be sent toward it.
    opening: bool,
}

/// One hole-punching session with one peer.
#[derive(Debug)]
pub struct Puncher {
    tag: ProbeTag,
    key: PunchKey,
    peer: PeerId,
    role: Role,
    config: PunchConfig,
    started: Instant,
    candidates: Vec<Candidate>,
    targets: Vec<Target>,
    triggered: VecDeque<usize>,
    replies: VecDeque<Transmit>,
    pending: HashMap<[u8; 12], (Probed, Instant)>,
    // Birthday punching (see [`birthday`]): the easy side's spray, the hard side's opening
    // probes, and the extra socket the peer was first heard on with the address it came from.
    spray: Option<Spray>,
    opening: Option<Opening>,
    birthday_winner: Option<(u16, SocketAddr)>,
    // A birthday plan waiting for IPv6 (PunchConfig::ipv6_before_birthday): started at the
    // instant given unless a direct path was proven by then.
    birthday_after_ipv6: Option<(BirthdayPlan, BirthdayConfig, u64, Instant)>,
    counter: u32,
    state: State,
    // The deadline has passed (set by handle_timeout): nothing more will be scheduled.
    expired: bool,
    events: VecDeque<Event>,
    probes_sent: u32,
    probes_received: u32,
    answers_received: u32,
    answers_sent: u32,
    unauthenticated: u32,
    peer_sources: Vec<SocketAddr>,
    // An IPv4 path proven while the peer's IPv6 probes already reach us: held until the IPv6
    // answer (preferred) or the instant given, whichever comes first (see `IPV6_PREFERENCE_*`).
    held: Option<(Path, Instant)>,
    // While set, scheduled probes wait (the responder's hold, PunchConfig::responder_hold).
    hold_until: Option<Instant>,
    // When scheduled probes may start: the schedule of a target counts from the later of this
    // and the moment the target became known.
    probes_from: Instant,
}

/// How long a proven IPv4 path waits for the IPv6 one, as a multiple of its round trip, when the
/// peer's IPv6 probes already reach us (so IPv6 works one way, and our answer to it, or our
/// own probe, is at most about a round trip away). Like Happy Eyeballs, IPv6 wins a near tie;
/// unlike it, there is no wait at all unless IPv6 has been seen working: a pair without IPv6,
/// or whose IPv6 is blocked, is never slower.
const IPV6_PREFERENCE_RTTS: u32 = 2;
/// Bounds of that wait.
const IPV6_PREFERENCE_MIN: Duration = Duration::from_millis(20);
/// As Happy Eyeballs' connection attempt delay (RFC 8305: 250 ms recommended).
const IPV6_PREFERENCE_MAX: Duration = Duration::from_millis(250);

/// What the rendezvous handed both sides of one introduction.
#[derive(Debug, Clone)]
pub struct Introduction {
    /// The nonce: public, it routes probes and answers to the session.
    pub nonce: u64,
    /// The secret key probes and answers are authenticated with.
    pub key: PunchKey,
}

impl Puncher {
    /// Starts a session: `me` probes `peer`'s `candidates` (the first [`MAX_CANDIDATES`]
    /// distinct ones; the caller drops unusable ones with [`usable_candidate`]), tagging probes
    /// with the introduction's nonce and authenticating them with its key.
    pub fn new(
        me: PeerId,
        peer: PeerId,
        introduction: Introduction,
        role: Role,
        candidates: &[Candidate],
        now: Instant,
        config: PunchConfig,
    ) -> Self {
        let hold = role == Role::Responder
            && config.opening_ttl.is_some()
            && !config.responder_hold.is_zero();
        let hold_until = hold.then(|| now + config.responder_hold);
        let mut puncher = Puncher {
            tag: ProbeTag {
                nonce: introduction.nonce,
                sender: me,
            },
            key: introduction.key,
            peer,
            role,
            config,
            started: now,
            candidates: Vec::new(),
            targets: Vec::new(),
            triggered: VecDeque::new(),
            replies: VecDeque::new(),
            pending: HashMap::new(),
            spray: None,
            opening: None,
            birthday_winner: None,
            birthday_after_ipv6: None,
            counter: 0,
            state: State::Probing,
            expired: false,
            events: VecDeque::new(),
            probes_sent: 0,
            probes_received: 0,
            answers_received: 0,
            answers_sent: 0,
            unauthenticated: 0,
            peer_sources: Vec::new(),
            held: None,
            hold_until,
            probes_from: hold_until.unwrap_or(now),
        };
        for candidate in candidates {
            if puncher.candidates.iter().any(|c| c.addr == candidate.addr) {
                continue;
            }
            if puncher.candidates.len() >= MAX_CANDIDATES {
                break;
            }
            puncher.candidates.push(*candidate);
            puncher.add_target(candidate.addr, PathKind::Candidate(candidate.kind), now);
        }
        puncher
    }

    /// Adds birthday punching to the session (see [`birthday`]), started at `now`: the easy
    /// side's spray of probes (ports drawn with `seed`), or the hard side's opening probes from
    /// extra sockets. Both stop at the first answer, as every probe does. When IPv6 is
    /// available to the pair ([`Puncher::ipv6_available`]) it starts only
    /// [`PunchConfig::ipv6_before_birthday`] later, and only if no path was proven by then.
    pub fn with_birthday(
        mut self,
        plan: BirthdayPlan,
        config: &BirthdayConfig,
        seed: u64,
        now: Instant,
    ) -> Self {
        if self.ipv6_available() && !self.config.ipv6_before_birthday.is_zero() {
            let at = now + self.config.ipv6_before_birthday;
            self.birthday_after_ipv6 = Some((plan, config.clone(), seed, at));
        } else {
            self.start_birthday(plan, config, seed, now);
        }
        self
    }

    /// Whether IPv6 is available to the pair: we proved our IPv6 address
    /// ([`PunchConfig::prefer_ipv6`]) and the peer's proven IPv6 address (an observed
    /// candidate) is among the targets.
    pub fn ipv6_available(&self) -> bool {
        self.config.prefer_ipv6
            && self
                .targets
                .iter()
                .any(|t| t.addr.is_ipv6() && t.kind == PathKind::Candidate(CandidateKind::Observed))
    }

    /// When the birthday punch waiting for IPv6 starts (unless a path is proven first); `None`
    /// when none waits (none at all, or it started).
    pub fn birthday_waits_until(&self) -> Option<Instant> {
        self.birthday_after_ipv6.as_ref().map(|(.., at)| *at)
    }

    fn start_birthday(
        &mut self,
        plan: BirthdayPlan,
        config: &BirthdayConfig,
        seed: u64,
        now: Instant,
    ) {
        match plan {
            BirthdayPlan::Easy { ip, observed_port } => {
                self.spray = Some(Spray::new(ip, observed_port, config, seed, now));
            }
            BirthdayPlan::Hard { toward, sockets } => {
                self.opening = Some(Opening::new(toward, sockets, config, now));
            }
        }
    }

    /// The extra socket (by number) on which the peer was first heard, with an authenticated
    /// probe or answer, and the address it came from: the birthday path, whose datagrams must
    /// leave from that socket from then on.
    pub fn birthday_winner(&self) -> Option<(u16, SocketAddr)> {
        self.birthday_winner
    }

    /// Birthday datagrams sent so far (spray probes and opening probes).
    pub fn birthday_sent(&self) -> u32 {
        self.spray.as_ref().map_or(0, |s| s.sent()) + self.opening.as_ref().map_or(0, |o| o.sent)
    }

    /// The introduction's nonce (datagrams are routed to sessions by it).
    pub fn nonce(&self) -> u64 {
        self.tag.nonce
    }

    /// The other side.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Where the session stands.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The role this side plays.
    pub fn role(&self) -> Role {
        self.role
    }

    /// True once nothing more will be sent: the deadline has passed (a proven path is still
    /// answered for until then, so that the other side can prove it too) and every answer is out.
    pub fn is_finished(&self, now: Instant) -> bool {
        self.replies.is_empty()
            && (matches!(self.state, State::Failed(_))
                || now >= self.started + self.config.deadline)
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn add_target(&mut self, addr: SocketAddr, kind: PathKind, now: Instant) -> Option<usize> {
        if let Some(i) = self.targets.iter().position(|t| t.addr == addr) {
            return Some(i);
        }
        if self.targets.len() >= MAX_TARGETS {
            return None;
        }
        self.targets.push(Target {
            addr,
            kind,
            known_at: now,
            attempt: 0,
            validated: false,
            // Only toward the introduction's public addresses: a mapping is what it opens.
            opening: self.config.opening_ttl.is_some()
                && !matches!(
                    kind,
                    PathKind::Candidate(CandidateKind::Local) | PathKind::PeerReflexive
                ),
        });
        Some(self.targets.len() - 1)
    }

    /// Datagrams with our nonce that failed authentication so far.
    pub fn unauthenticated(&self) -> u32 {
        self.unauthenticated
    }

    fn reject(&mut self, from: SocketAddr, probe: bool) {
        self.unauthenticated = self.unauthenticated.saturating_add(1);
        if self.unauthenticated <= UNAUTHENTICATED_EVENTS {
            self.events
                .push_back(Event::Unauthenticated { from, probe });
        }
    }

    fn probing(&self) -> bool {
        // The responder stops probing once one of its probes was answered: the path is open in
        // both NATs and the initiator's QUIC packets can follow it.
        matches!(self.state, State::Probing)
            && (self.held.is_some() || !self.targets.iter().any(|t| t.validated))
    }

    /// Whether an IPv4 path just proven should wait for IPv6: an IPv6 target is still unproven,
    /// and IPv6 is known to work on both sides: the peer's probes reach us over IPv6, or both
    /// our address and the target were proven to the rendezvous (ours: `prefer_ipv6`; theirs:
    /// an observed candidate).
    fn ipv6_on_the_way(&self) -> bool {
        let unproven = |t: &&Target| t.addr.is_ipv6() && !t.validated;
        let seen = self.peer_sources.iter().any(|a| a.is_ipv6());
        let both_proven = self.config.prefer_ipv6
            && self
                .targets
                .iter()
                .filter(unproven)
                .any(|t| t.kind == PathKind::Candidate(CandidateKind::Observed));
        // The initiator only: it chooses the path its connection is dialed on. A responder that
        // held out for IPv6 while the initiator took IPv4 would answer from another address
        // than the one the initiator's QUIC packets come to, which a QUIC client drops.
        self.role == Role::Initiator
            && self.targets.iter().any(|t| unproven(&t))
            && (seen || both_proven)
    }

    /// Offers a received datagram. Returns true if it belonged to this session (a probe of the
    /// peer with our nonce, or an answer to one of our probes).
    pub fn handle_datagram(&mut self, from: SocketAddr, data: &[u8], now: Instant) -> bool {
        self.handle_datagram_via(from, data, now, None)
    }

    /// [`Puncher::handle_datagram`] for a datagram that arrived on extra socket number `via`
    /// (birthday punching), or on the primary socket (`None`).
    pub fn handle_datagram_via(
        &mut self,
        from: SocketAddr,
        data: &[u8],
        now: Instant,
        via: Option<u16>,
    ) -> bool {
        let events_before = self.events.len();
        let taken = self.handle_stun(from, data, now, via);
        if taken && via.is_some() {
            // Only an authenticated probe or answer leaves its event (forgeries leave none):
            // one among the events this datagram left.
            if let (Some(socket), None) = (via, self.birthday_winner) {
                let proven = self.events.iter().skip(events_before).any(|e| {
                    matches!(e, Event::ProbeReceived { from: f } | Event::Answered { from: f, .. } if *f == from)
                });
                if proven {
                    self.birthday_winner = Some((socket, from));
                }
            }
        }
        taken
    }

    fn handle_stun(
        &mut self,
        from: SocketAddr,
        data: &[u8],
        now: Instant,
        via: Option<u16>,
    ) -> bool {
        match stun::decode(data) {
            Ok(StunPacket::BindingRequest {
                transaction,
                username: Some(username),
            }) => {
                let Some(tag) = ProbeTag::from_username(&username) else {
                    return false;
                };
                if tag.nonce != self.tag.nonce || tag.sender != self.peer {
                    return false;
                }
                if !stun::verify_probe(data, &self.key) {
                    // Ours by its tag, but not from the peer: claimed (no one else should
                    // answer it), counted, and otherwise ignored.
                    self.reject(from, true);
                    return true;
                }
                self.probes_received = self.probes_received.saturating_add(1);
                // The initiator probes: its NAT is open toward us, our probes may follow.
                self.release_hold(now);
                if !self.peer_sources.contains(&from) && self.peer_sources.len() < MAX_TARGETS {
                    self.peer_sources.push(from);
                }
                self.events.push_back(Event::ProbeReceived { from });
                if self.answers_sent < self.config.max_answers {
                    self.answers_sent += 1;
                    self.replies.push_back(Transmit {
                        destination: from,
                        contents: stun::probe_success(transaction, from, &self.key),
                        ttl: None,
                        birthday: None,
                    });
                }
                if self.probing() && now < self.started + self.config.deadline {
                    let known = self.targets.iter().any(|t| t.addr == from);
                    // Heard on an extra socket, or from a port of the NAT we spray: a birthday
                    // path if it is proven.
                    let kind =
                        if via.is_some() || self.spray.as_ref().is_some_and(|s| s.covers(from)) {
                            PathKind::Birthday
                        } else {
                            PathKind::PeerReflexive
                        };
                    if let Some(i) = self.add_target(from, kind, now) {
                        if !known {
                            self.events.push_back(Event::PeerReflexive { addr: from });
                        }
                        if !self.targets[i].validated && !self.triggered.contains(&i) {
                            self.triggered.push_back(i);
                        }
                    }
                }
                true
            }
            Ok(StunPacket::BindingSuccess {
                transaction,
                mapped,
            }) => {
                if !self.pending.contains_key(&transaction) {
                    return false;
                }
                if !stun::verify_probe(data, &self.key) {
                    // A forged answer to one of our probes (its transaction id is public): the
                    // probe stays pending, so that the peer's real answer still counts.
                    self.reject(from, false);
                    return true;
                }
                let Some((probed, sent_at)) = self.pending.remove(&transaction) else {
                    return false;
                };
                self.answers_received = self.answers_received.saturating_add(1);
                let rtt = now.saturating_duration_since(sent_at);
                self.events.push_back(Event::Answered { from, rtt });
                let index = match probed {
                    Probed::Target(index) => index,
                    // A birthday probe hit: the probed address (a port of the peer's NAT, or
                    // the peer's address reached from an extra socket) becomes a target of its
                    // own kind, proven at once (it may exceed MAX_TARGETS by this one).
                    Probed::Spray(addr) => self.birthday_target(addr, now),
                    Probed::Opening => match self.opening.as_ref().map(|o| o.toward) {
                        Some(addr) => self.birthday_target(addr, now),
                        None => return true,
                    },
                };
                let Some(target) = self.targets.get_mut(index) else {
                    return true;
                };
                target.validated = true;
                if via.is_some() {
                    target.kind = PathKind::Birthday;
                }
                if self.state == State::Probing {
                    // An answer from another address than probed still proves a round trip
                    // (some NATs rewrite the source); report the address probed, which QUIC
                    // will use.
                    let path = Path {
                        addr: target.addr,
                        kind: target.kind,
                        rtt,
                        our_mapping: Some(mapped),
                        elapsed: now.saturating_duration_since(self.started),
                    };
                    if path.addr.is_ipv4() && self.ipv6_on_the_way() {
                        // The first IPv4 path is kept; IPv6 gets a short head start.
                        if self.held.is_none() {
                            let wait = (rtt * IPV6_PREFERENCE_RTTS)
                                .clamp(IPV6_PREFERENCE_MIN, IPV6_PREFERENCE_MAX);
                            self.held = Some((path, now + wait));
                        }
                        return true;
                    }
                    // The responder records the path too, but goes on answering until the deadline.
                    self.state = State::Direct(path);
                    self.held = None;
                    self.triggered.clear();
                }
                true
            }
            _ => false,
        }
    }

    /// The index of the target for `addr`, added (of kind [`PathKind::Birthday`]) if needed.
    fn birthday_target(&mut self, addr: SocketAddr, now: Instant) -> usize {
        if let Some(i) = self.targets.iter().position(|t| t.addr == addr) {
            return i;
        }
        self.targets.push(Target {
            addr,
            kind: PathKind::Birthday,
            known_at: now,
            attempt: usize::MAX,
            validated: false,
            opening: false,
        });
        self.targets.len() - 1
    }

    /// The next datagram to send now, if any: answers first, then triggered checks, then
    /// scheduled probes, then birthday datagrams (paced by their own plan).
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if let Some(reply) = self.replies.pop_front() {
            return Some(reply);
        }
        if !self.probing() || now >= self.started + self.config.deadline {
            return None;
        }
        if self.probes_sent < self.config.max_probes {
            if let Some(ttl) = self.config.opening_ttl {
                if let Some(i) = self.targets.iter().position(|t| t.opening) {
                    return Some(self.opening_probe(i, ttl, now));
                }
            }
            if let Some(i) = self.triggered.pop_front() {
                return Some(self.probe(i, now, false));
            }
            // The responder's hold delays its scheduled probes only (not birthday datagrams).
            if !self.held(now) {
                let due = self.targets.iter().position(|t| {
                    !t.validated
                        && self
                            .config
                            .schedule
                            .get(t.attempt)
                            .is_some_and(|offset| self.schedule_base(t) + *offset <= now)
                });
                if let Some(due) = due {
                    return Some(self.probe(due, now, true));
                }
            }
        }
        self.birthday_transmit(now)
    }

    /// Ends the responder's hold ([`PunchConfig::responder_hold`]) now: the driver learned
    /// some other way that the initiator is under way (its connection's first packet came over
    /// the relay). Does nothing when there is no hold.
    pub fn release_hold(&mut self, now: Instant) {
        if self.hold_until.take().is_some() {
            self.probes_from = now;
        }
    }

    /// The responder's scheduled probes still wait for the initiator (see
    /// [`PunchConfig::responder_hold`]).
    fn held(&self, now: Instant) -> bool {
        self.hold_until.is_some_and(|until| now < until)
    }

    fn schedule_base(&self, target: &Target) -> Instant {
        target.known_at.max(self.probes_from)
    }

    fn opening_probe(&mut self, index: usize, ttl: u8, now: Instant) -> Transmit {
        self.targets[index].opening = false;
        let mut transmit = self.probe(index, now, false);
        // Not a triggered check: say what it is.
        if let Some(Event::ProbeSent { to, .. }) = self.events.pop_back() {
            self.events.push_back(Event::OpeningSent { to, ttl });
        }
        transmit.ttl = Some(ttl);
        transmit
    }

    /// The next birthday datagram due at `now`, if any (outside `max_probes`: the plan has its
    /// own budget).
    fn birthday_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if let Some(addr) = self.spray.as_mut().and_then(|s| s.next(now)) {
            let contents = self.tagged_probe(Probed::Spray(addr), now);
            return Some(Transmit {
                destination: addr,
                contents,
                birthday: Some(BirthdayTransmit::Spray),
                ttl: None,
            });
        }
        let (socket, toward) = {
            let opening = self.opening.as_mut()?;
            (opening.next(now)?, opening.toward)
        };
        let contents = self.tagged_probe(Probed::Opening, now);
        Some(Transmit {
            destination: toward,
            contents,
            birthday: Some(BirthdayTransmit::Opening { socket }),
            ttl: None,
        })
    }

    /// A new authenticated probe, remembered as in flight to `probed`.
    fn tagged_probe(&mut self, probed: Probed, now: Instant) -> Vec<u8> {
        self.counter = self.counter.wrapping_add(1);
        let contents = stun::probe_request(&self.tag, self.counter, &self.key);
        if self.pending.len() >= MAX_PENDING {
            // Forget the oldest probe: its answer, if it ever comes, is stale anyway.
            forget_oldest(&mut self.pending, |(_, sent)| *sent);
        }
        self.pending
            .insert(self.tag.transaction(self.counter), (probed, now));
        contents
    }

    fn probe(&mut self, index: usize, now: Instant, scheduled: bool) -> Transmit {
        let contents = self.tagged_probe(Probed::Target(index), now);
        let target = &mut self.targets[index];
        let attempt = scheduled.then_some(target.attempt);
        if scheduled {
            target.attempt += 1;
        }
        self.probes_sent = self.probes_sent.saturating_add(1);
        self.events.push_back(Event::ProbeSent {
            to: target.addr,
            attempt,
        });
        Transmit {
            destination: target.addr,
            contents,
            ttl: None,
            birthday: None,
        }
    }

    /// When the driver should call [`Puncher::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.expired && self.replies.is_empty() {
            return None;
        }
        let can_probe = self.probes_sent < self.config.max_probes && self.probing();
        if !self.replies.is_empty()
            || (!self.triggered.is_empty() && self.probes_sent < self.config.max_probes)
            || (can_probe && self.targets.iter().any(|t| t.opening))
        {
            return Some(self.started);
        }
        let deadline = self.started + self.config.deadline;
        if matches!(self.state, State::Direct(_)) {
            // Nothing more to probe; keep answering the peer until the deadline.
            return Some(deadline);
        }
        let deadline = match &self.held {
            Some((_, until)) => deadline.min(*until),
            None => deadline,
        };
        let birthday = [
            self.spray.as_ref().and_then(|s| s.due()),
            self.opening.as_ref().and_then(|o| o.due()),
            self.birthday_waits_until(),
        ];
        let next_probe = self
            .targets
            .iter()
            .filter(|_| self.probes_sent < self.config.max_probes)
            .filter(|t| !t.validated)
            .filter_map(|t| {
                self.config
                    .schedule
                    .get(t.attempt)
                    .map(|o| self.schedule_base(t) + *o)
            })
            .chain(birthday.into_iter().flatten())
            .min();
        Some(next_probe.map_or(deadline, |p| p.min(deadline)))
    }

    /// Advances time: fails the session at the deadline if no path was proven.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some((_, until)) = &self.held {
            if now >= *until && self.state == State::Probing {
                // IPv6 did not answer in time: the IPv4 path it was waiting beside wins.
                if let Some((path, _)) = self.held.take() {
                    self.state = State::Direct(path);
                    self.triggered.clear();
                }
            }
        }
        if self.birthday_waits_until().is_some_and(|at| now >= at) {
            if let Some((plan, config, seed, _)) = self.birthday_after_ipv6.take() {
                // No path proven in time (IPv6 failed, and nothing else answered): the birthday
                // punch after all. A path proven, even an IPv4 one held for IPv6: none.
                let proven = self.targets.iter().any(|t| t.validated);
                if self.state == State::Probing
                    && !proven
                    && now < self.started + self.config.deadline
                {
                    self.start_birthday(plan, &config, seed, now);
                }
            }
        }
        if now >= self.started + self.config.deadline {
            self.expired = true;
            self.triggered.clear();
        }
        if self.state == State::Probing && now >= self.started + self.config.deadline {
            // Checks triggered too late to send would otherwise stay queued for ever.
            self.triggered.clear();
            self.state = State::Failed(FailureReport {
                candidates: self.candidates.clone(),
                probes_sent: self.probes_sent,
                probes_received: self.probes_received,
                answers_received: self.answers_received,
                peer_sources: self.peer_sources.clone(),
                unauthenticated: self.unauthenticated,
                elapsed: now.saturating_duration_since(self.started),
            });
        }
    }
}

/// Removes the entry of `pending` with the smallest `age` (the oldest outstanding request of a
/// bounded table: probes here, heartbeats in [`heartbeat`]).
pub(crate) fn forget_oldest<V, T: Ord>(pending: &mut HashMap<[u8; 12], V>, age: impl Fn(&V) -> T) {
    if let Some(oldest) = pending.iter().min_by_key(|(_, v)| age(v)).map(|(k, _)| *k) {
        pending.remove(&oldest);
    }
}

#[cfg(test)]
mod tests;
