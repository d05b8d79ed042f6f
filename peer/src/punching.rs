//! The tokio side of hole punching: routes STUN datagrams from the shared socket to punching
//! sessions (by the nonce in the probe's USERNAME or its transaction id), runs a
//! [`punch::Puncher`] against real time, and answers everyone else's Binding requests.
//!
//! Every datagram a punching session sends goes through one [`ProbeBudget`] shared by all
//! sessions ([`punch::budget::DEFAULT_BURST`] at once, [`punch::budget::DEFAULT_PER_SECOND`]
//! per second): whoever gets us introduced to them, however often, cannot make us send more.
//!
//! Why it is a module of its own: the socket is shared by quinn, STUN and every punching
//! session at once; this is the one place that decides which session a datagram belongs to and
//! how many probes we may send in all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::message::Candidate;
use common::nat::{Behaviour, NatProfile};
use common::stun::{self, ProbeTag, StunPacket};
use common::PeerId;
use punch::budget::ProbeBudget;
use punch::{Event, Introduction, PunchConfig, Puncher, Role, State};
use tokio::sync::{mpsc, watch};
use transport::StunDatagram;

use crate::console::Console;
use crate::node::Node;

/// Datagrams queued for one punching session.
const SESSION_QUEUE: usize = 64;

/// Active punching sessions by nonce, and the budget they share.
#[derive(Clone, Default)]
pub struct Router {
    sessions: Arc<Mutex<HashMap<u64, mpsc::Sender<StunDatagram>>>>,
    budget: Arc<Mutex<ProbeBudget>>,
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

/// The punching timing for a peer whose own NAT is `ours` (as measured), with opening probes
/// of IP TTL `opening_ttl` (`None`: none, and no hold). The responder's hold
/// ([`PunchConfig::responder_hold`]) protects an initiator behind a NAT that an early packet
/// turns symmetric; it is left out when the initiator's probes could not reach us anyway, so
/// that they cannot end it early (our NAT maps per destination) or when nothing in front of us
/// translates (no NAT), as waiting would only delay the path.
pub fn config_for(ours: Option<&NatProfile>, opening_ttl: Option<u8>) -> PunchConfig {
    let mut config = PunchConfig {
        opening_ttl,
        ..PunchConfig::default()
    };
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
    verbose: Option<Console>,
    witness: Option<crate::paths::PunchWitness>,
    tasks: &crate::tasks::TaskSet,
    config: PunchConfig,
    initiator_started: Option<tokio::sync::oneshot::Receiver<()>>,
    first_sent: Option<tokio::sync::oneshot::Sender<()>>,
) -> State {
    let inbox = router.register(introduction.nonce);
    let puncher = Puncher::new(
        node.identity.id(),
        peer,
        introduction,
        role,
        candidates,
        Instant::now(),
        config,
    );
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let session = Session {
        node: node.clone(),
        router: router.clone(),
        puncher,
        inbox,
        verbose,
        witness,
        first: Some(first_tx),
        initiator_started,
        first_sent,
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
    // Fires when the initiator is known to be under way (ends the responder's hold).
    initiator_started: Option<tokio::sync::oneshot::Receiver<()>>,
    // Told once the first datagrams (the opening probes) are out.
    first_sent: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Session {
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
                if !self.router.may_send(now) {
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
                let sent = match transmit.ttl {
                    // An opening probe: best effort (it only matters before the peer's probes).
                    Some(ttl) => self.node.socket.send_with_ttl(
                        &transmit.contents,
                        transmit.destination,
                        ttl,
                    ),
                    None => {
                        self.node
                            .socket
                            .send_to(&transmit.contents, transmit.destination)
                            .await
                    }
                };
                if let Err(e) = sent {
                    tracing::debug!(to = %transmit.destination, error = %e, "probe not sent");
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
                        self.puncher.handle_datagram(d.from, &d.data, Instant::now());
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
                started = async {
                    match self.initiator_started.as_mut() {
                        Some(rx) => rx.await.is_ok(),
                        None => std::future::pending().await,
                    }
                } => {
                    self.initiator_started = None;
                    if started {
                        self.puncher.release_hold(Instant::now());
                    }
                }
            }
        }
        self.report_first();
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
