//! The tokio side of hole punching: routes STUN datagrams from the shared socket to punching
//! sessions (by the nonce in the probe's USERNAME or its transaction id), runs a
//! [`punch::Puncher`] against real time, and answers everyone else's Binding requests.
//!
//! Every datagram a punching session sends goes through one [`ProbeBudget`] shared by all
//! sessions ([`punch::budget::DEFAULT_BURST`] at once, [`punch::budget::DEFAULT_PER_SECOND`]
//! per second): whoever gets us introduced to them, however often, cannot make us send more.
//!
//! Birthday punching ([`punch::birthday`]) has budgets of its own, because its probes are many by
//! design: every birthday datagram of all sessions goes through one bucket of
//! [`BIRTHDAY_PER_SECOND`] per second ([`BIRTHDAY_BURST`] at once); one introduction sends at
//! most [`punch::birthday::DEFAULT_PROBES`] probes (easy side) or
//! [`punch::birthday::DEFAULT_SOCKETS`] fan-out probes per round (hard side); and at most
//! [`BIRTHDAY_PER_PEER`] introductions with the same peer per [`BIRTHDAY_PEER_WINDOW`] use it at
//! all (later ones punch plainly).
//!
//! Why it is a module of its own: the socket is shared by quinn, STUN and every punching
//! session at once; this is the one place that decides which session a datagram belongs to and
//! how many probes we may send in all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::message::Candidate;
use common::nat::{Behaviour, NatProfile};
use common::stun::{self, ProbeTag, StunPacket};
use common::PeerId;
use punch::birthday::{BirthdayConfig, BirthdayRole};
use punch::budget::ProbeBudget;
use punch::{BirthdayTransmit, Event, Introduction, PunchConfig, Puncher, Role, State};
use tokio::sync::{mpsc, watch};
use transport::StunDatagram;

use crate::console::Console;
use crate::node::Node;

/// Datagrams queued for one punching session.
const SESSION_QUEUE: usize = 64;

/// Birthday datagrams (probes and fan-out probes) all sessions together send per second...
pub const BIRTHDAY_PER_SECOND: u32 = 1000;
/// ...and at once.
pub const BIRTHDAY_BURST: u32 = 100;
/// Introductions with one peer that may use birthday punching per [`BIRTHDAY_PEER_WINDOW`].
pub const BIRTHDAY_PER_PEER: usize = 3;
/// See [`BIRTHDAY_PER_PEER`].
pub const BIRTHDAY_PEER_WINDOW: Duration = Duration::from_secs(60);
/// Peers whose birthday punches are remembered for [`BIRTHDAY_PER_PEER`] (the oldest is
/// forgotten first).
const BIRTHDAY_PEERS_REMEMBERED: usize = 1024;
/// How long a birthday session may take (a plain one takes `PunchConfig::default().deadline`).
pub const BIRTHDAY_DEADLINE: Duration = Duration::from_secs(8);

/// Active punching sessions by nonce, and the budgets they share.
#[derive(Clone)]
pub struct Router {
    sessions: Arc<Mutex<HashMap<u64, mpsc::Sender<StunDatagram>>>>,
    budget: Arc<Mutex<ProbeBudget>>,
    birthday_budget: Arc<Mutex<ProbeBudget>>,
    birthday_starts: Arc<Mutex<HashMap<PeerId, Vec<Instant>>>>,
    /// Peers with a birthday punch running (one at a time per peer).
    birthday_active: Arc<Mutex<std::collections::HashSet<PeerId>>>,
    /// Birthday punching at all (`--no-birthday-punch` turns it off).
    pub birthday: bool,
}

impl Default for Router {
    fn default() -> Self {
        Router {
            sessions: Arc::default(),
            budget: Arc::default(),
            birthday_budget: Arc::new(Mutex::new(ProbeBudget::new(
                BIRTHDAY_BURST,
                BIRTHDAY_PER_SECOND,
            ))),
            birthday_starts: Arc::default(),
            birthday_active: Arc::default(),
            birthday: true,
        }
    }
}

impl Router {
    /// Receives the STUN datagrams tagged with `nonce` (for other users of STUN on the socket).
    pub fn register_raw(&self, nonce: u64) -> mpsc::Receiver<StunDatagram> {
        self.register(nonce)
    }

    fn register(&self, nonce: u64) -> mpsc::Receiver<StunDatagram> {
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.insert(nonce, tx);
        }
        rx
    }

    /// Whether the shared budget lets one more punching datagram out now (taking it if so).
    pub fn may_send(&self, now: Instant) -> bool {
        self.budget
            .lock()
            .map(|mut b| b.try_send(now))
            .unwrap_or(false)
    }

    /// Whether the birthday budget lets one more birthday datagram out now (taking it if so).
    pub fn may_send_birthday(&self, now: Instant) -> bool {
        self.birthday_budget
            .lock()
            .map(|mut b| b.try_send(now))
            .unwrap_or(false)
    }

    /// Whether an introduction with `peer` may use birthday punching now (none running with
    /// it, at most [`BIRTHDAY_PER_PEER`] per [`BIRTHDAY_PEER_WINDOW`]); counts it and marks it
    /// running if so (until [`Router::birthday_ended`]).
    pub fn may_start_birthday(&self, peer: PeerId, now: Instant) -> bool {
        let Ok(mut active) = self.birthday_active.lock() else {
            return false;
        };
        if active.contains(&peer) {
            return false;
        }
        let Ok(mut starts) = self.birthday_starts.lock() else {
            return false;
        };
        starts.retain(|_, times| {
            times.retain(|t| now.saturating_duration_since(*t) < BIRTHDAY_PEER_WINDOW);
            !times.is_empty()
        });
        if !starts.contains_key(&peer) && starts.len() >= BIRTHDAY_PEERS_REMEMBERED {
            // Full of peers within the window: no birthday for a new one until one ages out.
            return false;
        }
        let times = starts.entry(peer).or_default();
        if times.len() >= BIRTHDAY_PER_PEER {
            return false;
        }
        times.push(now);
        active.insert(peer);
        true
    }

    /// The birthday punch with `peer` is over.
    pub fn birthday_ended(&self, peer: PeerId) {
        if let Ok(mut active) = self.birthday_active.lock() {
            active.remove(&peer);
        }
    }

    /// Punching datagrams dropped by the shared budget so far.
    pub fn dropped(&self) -> u64 {
        self.budget.lock().map(|b| b.dropped()).unwrap_or(0)
    }

    /// Stops routing `nonce`.
    pub fn unregister(&self, nonce: u64) {
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.remove(&nonce);
        }
    }

    /// Hands a datagram to its session; false if no session claims it.
    fn route(&self, datagram: StunDatagram) -> Result<(), StunDatagram> {
        let nonce = match stun::decode(&datagram.data) {
            Ok(StunPacket::BindingRequest {
                username: Some(username),
                ..
            }) => ProbeTag::from_username(&username).map(|tag| tag.nonce),
            Ok(StunPacket::BindingSuccess { transaction, .. }) => {
                Some(stun::nonce_of_transaction(&transaction))
            }
            _ => None,
        };
        let Some(nonce) = nonce else {
            return Err(datagram);
        };
        // Clone the sender and drop the lock before sending.
        let sender = self
            .sessions
            .lock()
            .ok()
            .and_then(|s| s.get(&nonce).cloned());
        match sender {
            Some(sender) => {
                // A full queue drops the datagram, as the network might.
                let _ = sender.try_send(datagram);
                Ok(())
            }
            None => Err(datagram),
        }
    }
}

/// Reads STUN datagrams from the socket: probes and answers go to their session, other Binding
/// requests are answered (so that a late probe still gets a reply, and the peer can serve as a
/// STUN server).
pub async fn dispatch(
    node: Node,
    router: Router,
    mut stun_rx: mpsc::Receiver<StunDatagram>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let datagram = tokio::select! {
            d = stun_rx.recv() => match d { Some(d) => d, None => return },
            _ = shutdown.changed() => return,
        };
        if let Err(datagram) = router.route(datagram) {
            if let Some(reply) = stun::answer_binding(&datagram.data, datagram.from) {
                let _ = node.socket.send_to(&reply, datagram.from).await;
            }
        }
    }
}

/// The punching timing for a peer whose own NAT is `ours` (as measured) with a peer whose NAT
/// is `theirs` (as it reported it), with opening probes of IP TTL `opening_ttl` (`None`: none,
/// and no hold). The responder's hold ([`PunchConfig::responder_hold`]) protects an initiator
/// behind a NAT that an early packet turns symmetric; it is left out when the initiator's
/// probes could not reach us anyway, so that they cannot end it early (our NAT maps per
/// destination) or when nothing in front of us translates (no NAT), as waiting would only
/// delay the path. The initiator's hold ([`PunchConfig::initiator_hold`]) protects a
/// responder behind such a NAT, and is only set when the peer's NAT may be one (its profile
/// says `inbound_takes_port`, or the peer has not measured its NAT yet: a listener dialed in
/// its first seconds) and ours may filter by port (measured so, or not measured yet): against
/// a NAT that lets the peer's new port in, its packets are learned from anyway, and every
/// other pair goes on without waiting. The hold ends at the responder's first probe or relayed
/// packet, so against an unmeasured peer it costs at most the time until the responder is
/// under way, which a port-filtering NAT on our side makes us wait for anyway.
pub fn config_for(
    ours: Option<&NatProfile>,
    theirs: Option<&NatProfile>,
    opening_ttl: Option<u8>,
) -> PunchConfig {
    let mut config = PunchConfig {
        opening_ttl,
        ..PunchConfig::default()
    };
    let we_may_filter_by_port = ours.is_none_or(|p| {
        !(p.no_nat && p.filtering == Behaviour::EndpointIndependent)
            && matches!(
                p.filtering,
                Behaviour::AddressAndPortDependent | Behaviour::Unknown
            )
    });
    if theirs.is_none_or(|t| t.inbound_takes_port) && we_may_filter_by_port {
        config.initiator_hold = punch::DEFAULT_INITIATOR_HOLD;
    }
    if let Some(p) = ours {
        let per_destination = matches!(
            p.mapping,
            Behaviour::AddressDependent | Behaviour::AddressAndPortDependent
        );
        if p.no_nat || per_destination {
            config.responder_hold = std::time::Duration::ZERO;
        }
    }
    config
}

/// The birthday punch's sizes and pace against a peer whose NAT is `theirs`: the hard side's
/// fan-out rounds keep the opening TTL while the spray runs
/// ([`BirthdayConfig::short_ttl_until`]) only against a NAT that says an early packet takes its
/// port (`inbound_takes_port`), which a fan-out probe arriving before the spray would turn
/// symmetric for that port. Against any other NAT every round goes all the way from the start,
/// as before: a round that reaches the peer's NAT after the spray probed its port is found at
/// once, where a short round would leave it to the first full one.
pub fn birthday_config_for(theirs: Option<&NatProfile>) -> BirthdayConfig {
    let mut config = BirthdayConfig::default();
    if !theirs.is_some_and(|t| t.inbound_takes_port) {
        config.short_ttl_until = Duration::ZERO;
    }
    config
}

/// Runs one punching session. Returns as soon as a path is proven (or the session failed); a
/// session with a proven path goes on in the background until its deadline, answering the
/// peer's probes so that the peer can prove its side too.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    node: &Node,
    router: &Router,
    peer: PeerId,
    introduction: Introduction,
    role: Role,
    candidates: &[Candidate],
    birthday: Option<(BirthdayRole, BirthdayConfig)>,
    verbose: Option<Console>,
    witness: Option<crate::paths::PunchWitness>,
    tasks: &crate::tasks::TaskSet,
    timing: PunchConfig,
    peer_started: Option<tokio::sync::oneshot::Receiver<()>>,
    first_sent: Option<tokio::sync::oneshot::Sender<()>>,
) -> State {
    let inbox = router.register(introduction.nonce);
    let now = Instant::now();
    let (birthday, config) = match birthday {
        Some((role, config)) => (Some(role), config),
        None => (None, BirthdayConfig::default()),
    };
    let birthday = birthday.filter(|_| router.birthday && router.may_start_birthday(peer, now));
    let mut extras = Vec::new();
    let plan = birthday.and_then(|role| {
        if role == BirthdayRole::Hard {
            extras = node.socket.open_extras(usize::from(config.sockets));
            if extras.is_empty() {
                // Over the cap of extra sockets (another hard-side punch holds them), or the
                // system gives none: a plain punch.
                return None;
            }
        }
        let sockets = u16::try_from(extras.len()).unwrap_or(u16::MAX);
        punch::birthday::plan(role, candidates, sockets)
    });
    let punch_config = PunchConfig {
        deadline: if plan.is_some() {
            BIRTHDAY_DEADLINE
        } else {
            timing.deadline
        },
        prefer_ipv6: node.ipv6_proven.load(std::sync::atomic::Ordering::Relaxed),
        ..timing
    };
    let mut puncher = Puncher::new(
        node.identity.id(),
        peer,
        introduction,
        role,
        candidates,
        now,
        punch_config,
    );
    if let Some(plan) = plan.clone() {
        // A pair that can go direct over IPv6 tries that first (see PunchConfig::
        // ipv6_before_birthday): the birthday punch waits, and never starts if IPv6 works.
        puncher = puncher.with_birthday(plan.clone(), &config, rand::random(), now);
        let waits = puncher
            .birthday_waits_until()
            .map(|at| {
                format!(
                    " (after {} ms, unless IPv6 goes direct first)",
                    at.saturating_duration_since(now).as_millis()
                )
            })
            .unwrap_or_default();
        if let Some(console) = &verbose {
            console
                .error(match &plan {
                    punch::birthday::BirthdayPlan::Hard { toward, sockets } => format!(
                        "punch {}: birthday punching (our NAT is symmetric): {sockets} extra sockets send to {toward}{waits}",
                        peer.short()
                    ),
                    punch::birthday::BirthdayPlan::Easy { ip, .. } => format!(
                        "punch {}: birthday punching (the peer's NAT is symmetric): up to {} probes to ports of {ip} at {}/s{waits}",
                        peer.short(),
                        config.probes,
                        config.per_second
                    ),
                })
                .await;
        }
    } else if !extras.is_empty() {
        node.socket.release_extras(&extras, None);
        extras.clear();
    }
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let session = Session {
        node: node.clone(),
        router: router.clone(),
        puncher,
        inbox,
        verbose,
        witness,
        first: Some(first_tx),
        peer_started,
        first_sent,
        extras,
        pinned: None,
        birthday: birthday.is_some(),
        birthday_planned: plan.is_some(),
    };
    // The session outlives this call (see above) but not the endpoint.
    if !tasks.spawn(session.drive()) {
        return State::Probing;
    }
    first_rx.await.unwrap_or(State::Probing)
}

struct Session {
    node: Node,
    router: Router,
    puncher: Puncher,
    inbox: mpsc::Receiver<StunDatagram>,
    verbose: Option<Console>,
    // Told of the peer's authenticated probes and answers (its machine aliases their addresses
    // to the peer's stable address) and of the session's end.
    witness: Option<crate::paths::PunchWitness>,
    first: Option<tokio::sync::oneshot::Sender<State>>,
    // Fires when the other side is known to be under way (its first relayed packet: ends our
    // hold, PunchConfig::responder_hold or initiator_hold).
    peer_started: Option<tokio::sync::oneshot::Receiver<()>>,
    // Told once the first datagrams (the opening probes) are out.
    first_sent: Option<tokio::sync::oneshot::Sender<()>>,
    // Birthday punching, hard side: our extra sockets (by the puncher's socket number), and
    // the one the peer was reached through, once pinned.
    extras: Vec<transport::ExtraId>,
    pinned: Option<transport::ExtraId>,
    // This session is the peer's running birthday punch (see Router::may_start_birthday).
    birthday: bool,
    // It has a birthday plan (said at its end: how many birthday datagrams it took).
    birthday_planned: bool,
}

impl Session {
    /// Gives the extra sockets back once the session has its result: all but the winner close
    /// at once (the winner stays with the peer's connection, see DemuxSocket::release_extras).
    fn release_extras(&mut self) {
        if self.extras.is_empty() {
            return;
        }
        let keep = self
            .pinned
            .filter(|_| matches!(self.puncher.state(), State::Direct(_)));
        self.node.socket.release_extras(&self.extras, keep);
        self.extras.clear();
    }

    /// Sends one punching datagram within its budget; false if the budget dropped it.
    async fn send(&self, transmit: &punch::Transmit, now: Instant) -> bool {
        let allowed = match transmit.birthday {
            None => self.router.may_send(now),
            Some(_) => self.router.may_send_birthday(now),
        };
        if !allowed {
            return false;
        }
        let sent = match transmit.birthday {
            Some(BirthdayTransmit::FanOut { socket }) => {
                match (self.extras.get(usize::from(socket)), transmit.ttl) {
                    // A short round: best effort, as an opening probe.
                    (Some(id), Some(ttl)) => self.node.socket.send_from_with_ttl(
                        *id,
                        &transmit.contents,
                        transmit.destination,
                        ttl,
                    ),
                    (Some(id), None) => {
                        self.node
                            .socket
                            .send_from(*id, &transmit.contents, transmit.destination)
                            .await
                    }
                    (None, _) => return true,
                }
            }
            // An opening probe: best effort (it only matters before the peer's probes).
            None if transmit.ttl.is_some() => {
                let ttl = transmit.ttl.unwrap_or(punch::DEFAULT_OPENING_TTL);
                self.node
                    .socket
                    .send_with_ttl(&transmit.contents, transmit.destination, ttl)
            }
            _ => {
                self.node
                    .socket
                    .send_to(&transmit.contents, transmit.destination)
                    .await
            }
        };
        if let Err(e) = sent {
            tracing::debug!(to = %transmit.destination, error = %e, "probe not sent");
        }
        true
    }

    /// Hands the session's first result to the peer's machine (before the session's end
    /// releases the introduction) and to the caller, once.
    fn report_first(&mut self) {
        if let Some(first) = self.first.take() {
            let state = self.puncher.state().clone();
            if let Some(witness) = &self.witness {
                witness.result(self.puncher.nonce(), &state);
            }
            let _ = first.send(state);
        }
    }

    /// Once the peer was heard on one of our extra sockets (authenticated), everything to the
    /// address it came from leaves from that socket: our answer and probes now, QUIC and
    /// heartbeats later. Done before the answer goes out.
    fn pin_winner(&mut self) {
        if self.pinned.is_some() {
            return;
        }
        let Some((socket, from)) = self.puncher.birthday_winner() else {
            return;
        };
        if let Some(id) = self.extras.get(usize::from(socket)) {
            let quinn_addr = crate::relay::stable_addr(&self.puncher.peer());
            self.node.socket.pin(from, *id, quinn_addr);
            self.pinned = Some(*id);
            tracing::debug!(peer = %self.puncher.peer(), %from, "birthday punch: pinned the winning socket");
        }
    }

    async fn drive(mut self) {
        let peer = self.puncher.peer();
        let mut over_budget = false;
        loop {
            let now = Instant::now();
            self.puncher.handle_timeout(now);
            // The peer proved it sends from these addresses (authenticated probes or answers):
            // its packets from there are the connection's. Taken before our answers go out:
            // the peer dials as soon as it has an answer, and a handshake packet that arrived
            // before the alias would show quinn the real address and the next ones the stable
            // address; quinn drops a handshake that changes address (the connection would
            // never come up on our side). What to say about them is said after the sends.
            let mut said = Vec::new();
            while let Some(event) = self.puncher.poll_event() {
                let proven = match &event {
                    Event::ProbeReceived { from } | Event::Answered { from, .. } => Some(*from),
                    _ => None,
                };
                if let (Some(from), Some(witness)) = (proven, &self.witness) {
                    said.extend(witness.authenticated(self.puncher.nonce(), from));
                }
                if self.verbose.is_some() {
                    said.push(describe(peer, &event));
                }
            }
            while let Some(transmit) = self.puncher.poll_transmit(now) {
                if !self.send(&transmit, now).await {
                    // Dropped as the network might drop it; said once per session.
                    if !over_budget {
                        over_budget = true;
                        tracing::debug!(%peer, "punching budget exhausted; dropping datagrams");
                        if let Some(console) = &self.verbose {
                            console
                                .error(format!(
                                    "punch {}: over the budget of punching datagrams per \
                                     second; dropping some ({} so far)",
                                    peer.short(),
                                    self.router.dropped()
                                ))
                                .await;
                        }
                    }
                    continue;
                }
            }
            if let Some(first_sent) = self.first_sent.take() {
                let _ = first_sent.send(());
            }
            if let Some(console) = &self.verbose {
                for line in said {
                    console.error(line).await;
                }
            }
            if !matches!(self.puncher.state(), State::Probing) {
                self.report_first();
                self.release_extras();
            }
            if self.puncher.is_finished(now) {
                break;
            }
            let Some(wake) = self.puncher.poll_timeout() else {
                break;
            };
            tokio::select! {
                datagram = self.inbox.recv() => match datagram {
                    Some(d) => {
                        let via = d
                            .via
                            .and_then(|id| self.extras.iter().position(|e| *e == id))
                            .and_then(|i| u16::try_from(i).ok());
                        self.puncher.handle_datagram_via(d.from, &d.data, Instant::now(), via);
                        self.pin_winner();
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
                started = async {
                    match self.peer_started.as_mut() {
                        Some(rx) => rx.await.is_ok(),
                        None => std::future::pending().await,
                    }
                } => {
                    self.peer_started = None;
                    if started {
                        self.puncher.release_hold(Instant::now());
                    }
                }
            }
        }
        self.report_first();
        self.release_extras();
        if self.birthday_planned {
            if let Some(console) = &self.verbose {
                let sent = self.puncher.birthday_sent();
                console
                    .error(if sent == 0 {
                        format!(
                            "punch {}: birthday punch not needed (a direct path came first): no \
                             birthday datagram sent",
                            peer.short()
                        )
                    } else {
                        format!(
                            "punch {}: birthday punch sent {sent} birthday datagrams",
                            peer.short()
                        )
                    })
                    .await;
            }
        }
        if self.birthday {
            self.router.birthday_ended(self.puncher.peer());
        }
        self.router.unregister(self.puncher.nonce());
        if let Some(witness) = &self.witness {
            witness.ended(self.puncher.nonce());
        }
    }
}

fn describe(peer: PeerId, event: &Event) -> String {
    let peer = peer.short();
    match event {
        Event::ProbeSent {
            to,
            attempt: Some(attempt),
        } => format!("punch {peer}: probe #{attempt} -> {to}"),
        Event::ProbeSent { to, attempt: None } => {
            format!("punch {peer}: triggered probe -> {to}")
        }
        Event::OpeningSent { to, ttl } => format!(
            "punch {peer}: opening probe -> {to} (TTL {ttl}: opens our NAT toward it, dies before \
             the peer's)"
        ),
        Event::ProbeReceived { from } => format!("punch {peer}: probe from {from}"),
        Event::PeerReflexive { addr } => {
            format!("punch {peer}: new address {addr} learned from its probe; probing it")
        }
        Event::Unauthenticated { from, probe } => format!(
            "punch {peer}: ignored {} from {from} with this introduction's nonce but a wrong or \
             missing MESSAGE-INTEGRITY (forged?)",
            if *probe { "a probe" } else { "an answer" }
        ),
        Event::Answered { from, rtt } => format!(
            "punch {peer}: answer from {from} after {:.1} ms",
            rtt.as_secs_f64() * 1000.0
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        PeerId::from_key_digest(&[n; 32])
    }

    /// Short fan-out rounds only against a NAT that an early packet turns symmetric; full ones
    /// from the start against every other (as before).
    #[test]
    fn fan_out_rounds_are_short_only_against_a_nat_an_early_packet_turns_symmetric() {
        let port = NatProfile {
            udp: true,
            no_nat: false,
            mapping: Behaviour::EndpointIndependent,
            filtering: Behaviour::AddressAndPortDependent,
            inbound_takes_port: false,
        };
        let early = NatProfile {
            inbound_takes_port: true,
            ..port
        };
        assert_eq!(
            birthday_config_for(Some(&early)).short_ttl_until,
            punch::birthday::DEFAULT_SHORT_TTL_UNTIL
        );
        for theirs in [Some(&port), None] {
            assert_eq!(birthday_config_for(theirs).short_ttl_until, Duration::ZERO);
        }
    }

    /// The initiator holds its probes only against a peer whose NAT says an early packet takes
    /// its port or that has not measured its NAT yet, and only when our own NAT may filter by
    /// port (measured so, or not yet measured); every other pair punches as before.
    #[test]
    fn the_initiator_holds_only_against_a_nat_an_early_packet_turns_symmetric() {
        let profile = |mapping, filtering, inbound_takes_port| NatProfile {
            udp: true,
            no_nat: false,
            mapping,
            filtering,
            inbound_takes_port,
        };
        use Behaviour::*;
        let port = profile(EndpointIndependent, AddressAndPortDependent, false);
        let early = profile(EndpointIndependent, AddressAndPortDependent, true);
        let sym = profile(AddressAndPortDependent, AddressAndPortDependent, false);
        let addr = profile(EndpointIndependent, AddressDependent, false);
        let full = profile(EndpointIndependent, EndpointIndependent, false);
        let open = NatProfile {
            no_nat: true,
            ..full
        };
        let hold = |ours: Option<&NatProfile>, theirs: Option<&NatProfile>, ttl| {
            config_for(ours, theirs, ttl).initiator_hold
        };
        let held = punch::DEFAULT_INITIATOR_HOLD;
        for ours in [Some(&port), Some(&early), Some(&sym), None] {
            assert_eq!(hold(ours, Some(&early), Some(2)), held, "{ours:?}");
            assert_eq!(hold(ours, None, Some(2)), held, "{ours:?}");
            for theirs in [Some(&port), Some(&sym), Some(&full)] {
                assert_eq!(
                    hold(ours, theirs, Some(2)),
                    Duration::ZERO,
                    "{ours:?} {theirs:?}"
                );
            }
        }
        // Our NAT lets the peer's new port in: its packets are learned from, no hold.
        for ours in [&addr, &full, &open] {
            for theirs in [Some(&early), None] {
                assert_eq!(
                    hold(Some(ours), theirs, Some(2)),
                    Duration::ZERO,
                    "{ours:?} {theirs:?}"
                );
            }
        }
        // The responder's hold is unchanged by the peer's profile.
        assert_eq!(
            config_for(Some(&port), Some(&early), Some(2)).responder_hold,
            punch::DEFAULT_RESPONDER_HOLD
        );
    }

    /// Whoever gets us introduced, however often: at most BIRTHDAY_PER_PEER birthday punches
    /// with one peer per window, a bounded table of peers, and BIRTHDAY_PER_SECOND birthday
    /// datagrams per second in all.
    #[test]
    fn birthday_punching_is_bounded_per_peer_and_in_all() {
        let router = Router::default();
        let t0 = Instant::now();
        // One at a time per peer.
        assert!(router.may_start_birthday(peer(1), t0));
        assert!(!router.may_start_birthday(peer(1), t0));
        router.birthday_ended(peer(1));
        let started = 1
            + (0..10)
                .filter(|_| {
                    let started = router.may_start_birthday(peer(1), t0);
                    router.birthday_ended(peer(1));
                    started
                })
                .count();
        assert_eq!(started, BIRTHDAY_PER_PEER);
        // Another peer has its own allowance; the first gets its back after the window.
        assert!(router.may_start_birthday(peer(2), t0));
        router.birthday_ended(peer(2));
        assert!(!router.may_start_birthday(peer(1), t0 + BIRTHDAY_PEER_WINDOW / 2));
        assert!(router.may_start_birthday(peer(1), t0 + BIRTHDAY_PEER_WINDOW));
        // The table of peers is bounded: past it, new peers get no birthday punch until
        // entries age out.
        let router = Router::default();
        let mut refused = 0;
        for n in 0..(BIRTHDAY_PEERS_REMEMBERED + 50) {
            let digest = [(n % 251) as u8, (n / 251) as u8, 7, 7, 7, 7, 7, 7];
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&digest);
            if !router.may_start_birthday(PeerId::from_key_digest(&key), t0) {
                refused += 1;
            }
        }
        assert_eq!(refused, 50);
        assert!(router.may_start_birthday(peer(3), t0 + BIRTHDAY_PEER_WINDOW));
        // The datagram budget: a burst, then the rate.
        let sent = (0..5000).filter(|_| router.may_send_birthday(t0)).count();
        assert_eq!(sent, BIRTHDAY_BURST as usize);
        // Asked without pause for the next second: the rate, give or take a rounding.
        let sent: usize = (1..=1000u64)
            .map(|ms| {
                let at = t0 + Duration::from_millis(ms);
                (0..50).filter(|_| router.may_send_birthday(at)).count()
            })
            .sum();
        assert!(
            (BIRTHDAY_PER_SECOND as usize - 2..=BIRTHDAY_PER_SECOND as usize).contains(&sent),
            "{sent}"
        );
    }
}
