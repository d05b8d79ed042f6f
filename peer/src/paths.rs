//! Keeping every peer connection on the best path, without the connection noticing.
//!
//! quinn talks to one stable address per peer ([`crate::relay::stable_addr`]); the socket sends
//! each packet on the current path, direct UDP or the relay. For each connection a link task runs
//! a [`punch::path::PathSelector`]: it starts on the relay or a proven direct path, moves to a
//! direct path as soon as a punch proves one (make-before-break), sends heartbeats on the direct
//! path and falls back to the relay when they go unanswered, and punches again with backoff, and
//! at once when our public address changes (NAT rebinding).
//!
//! Heartbeats are authenticated ([`punch::heartbeat`]) with keys both ends derive from the
//! connection's TLS exporter, so a host that sees them cannot keep a dead path alive, and an
//! answer counts only from the address the heartbeat went to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::message::{usable_candidate, Candidate, MAX_CANDIDATES};
use common::stun::{self, ProbeTag, PunchKey, StunPacket};
use common::{ControlMessage, PeerId};
use punch::heartbeat::{HeartbeatInput, HeartbeatKeys, Heartbeats, EXPORTER_LABEL};
use punch::path::{Action, Current, PathConfig, PathSelector};
use punch::{Introduction, Role, State};
use tokio::sync::{mpsc, watch};
use transport::PathTarget;

use crate::console::Console;
use crate::node::Node;
use crate::punching::{self, Router};
use crate::relay::{stable_addr, Relay};
use crate::session::{ServerEvent, Session, SessionState};

/// How often we ask the rendezvous (over STUN) how it sees us. Also keeps the NAT mapping
/// towards it fresh.
pub const MAPPING_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Most punching sessions run at once in answer to introductions.
const MAX_RESPONDER_PUNCHES: usize = 64;
/// Events queued for one link.
const LINK_QUEUE: usize = 16;
/// How long a path proven before its connection arrived is kept for it.
const PENDING_PATH_TTL: Duration = Duration::from_secs(30);

/// What a link is told.
#[derive(Debug, Clone)]
pub enum LinkEvent {
    /// A punch proved this direct path.
    DirectProven {
        /// The peer's address on it.
        addr: SocketAddr,
        /// How it was found, for the user.
        describe: &'static str,
    },
    /// A punch found nothing.
    PunchFailed(String),
    /// Our public address changed.
    AddressChanged,
}

struct LinkHandle {
    conn_id: usize,
    tx: mpsc::Sender<LinkEvent>,
    conn: quinn::Connection,
    /// Published so that a library user can follow the path ([`PathKeeper::watch_path`]).
    status: watch::Sender<LinkStatus>,
}

/// Where a link stands, for `peer status` and `peer ping`.
#[derive(Debug, Clone)]
pub struct LinkStatus {
    /// The path packets take now.
    pub path: Current,
    /// How the direct path was found (when direct).
    pub describe: &'static str,
    /// When the connection's link started.
    pub started: Instant,
    /// When the current path was taken.
    pub since: Instant,
    /// Why the last punch found no direct path (cleared when one is proven).
    pub punch_failure: Option<String>,
}

/// One connection as `peer status` shows it.
#[derive(Debug, Clone)]
pub struct LinkInfo {
    /// The other side.
    pub peer: PeerId,
    /// The connection.
    pub conn: quinn::Connection,
    /// Its path.
    pub status: LinkStatus,
}

/// Everything the path keepers share. Cheap to clone.
#[derive(Clone)]
pub struct PathKeeper {
    /// Our endpoint.
    pub node: Node,
    /// STUN routing.
    pub router: Router,
    /// The relay.
    pub relay: Relay,
    /// Our rendezvous session.
    pub session: Session,
    /// Where to tell the user.
    pub console: Console,
    /// Show probe exchanges.
    pub verbose: bool,
    /// Our NAT, once measured.
    pub nat: watch::Receiver<Option<crate::netcheck::Report>>,
    table: Arc<Mutex<LinkTable>>,
}

/// Links by peer, and punch results that arrived before their connection. One lock for both, so
/// that a result cannot slip between "no link yet" and "link created".
#[derive(Default)]
struct LinkTable {
    links: HashMap<PeerId, LinkHandle>,
    pending: HashMap<PeerId, (LinkEvent, Instant)>,
}

impl LinkTable {
    /// Drops `peer`'s link if its connection has closed; its task then ends without touching
    /// the peer's routes (which belong to the next connection).
    fn forget_closed(&mut self, peer: &PeerId) {
        if self
            .links
            .get(peer)
            .is_some_and(|h| h.conn.close_reason().is_some())
        {
            self.links.remove(peer);
        }
    }
}

impl PathKeeper {
    /// A keeper with no links yet.
    pub fn new(
        node: Node,
        router: Router,
        relay: Relay,
        session: Session,
        console: Console,
        verbose: bool,
        nat: watch::Receiver<Option<crate::netcheck::Report>>,
    ) -> Self {
        PathKeeper {
            node,
            router,
            relay,
            session,
            console,
            verbose,
            nat,
            table: Arc::default(),
        }
    }

    /// Every connection with a link, by peer.
    pub fn links(&self) -> Vec<LinkInfo> {
        let Ok(table) = self.table.lock() else {
            return Vec::new();
        };
        let mut links: Vec<LinkInfo> = table
            .links
            .iter()
            .filter(|(_, h)| h.conn.close_reason().is_none())
            .map(|(peer, h)| LinkInfo {
                peer: *peer,
                conn: h.conn.clone(),
                status: h.status.borrow().clone(),
            })
            .collect();
        links.sort_by_key(|l| l.status.started);
        links
    }

    /// Whether the link of connection `conn_id` is the one that manages `peer`'s route.
    fn is_current_link(&self, peer: &PeerId, conn_id: usize) -> bool {
        self.table
            .lock()
            .map(|t| t.links.get(peer).is_some_and(|h| h.conn_id == conn_id))
            .unwrap_or(false)
    }

    /// The link of `conn`, if it has one.
    pub fn link_of_conn(&self, conn: &quinn::Connection) -> Option<LinkInfo> {
        let id = conn.stable_id();
        self.links().into_iter().find(|l| l.conn.stable_id() == id)
    }

    /// A watch on the path of `conn` (ends when its link does), if it has a link.
    pub fn watch_path(&self, conn: &quinn::Connection) -> Option<watch::Receiver<LinkStatus>> {
        let id = conn.stable_id();
        let table = self.table.lock().ok()?;
        table
            .links
            .values()
            .find(|h| h.conn_id == id)
            .map(|h| h.status.subscribe())
    }

    /// The live connection to `peer`, if there is one.
    pub fn link(&self, peer: &PeerId) -> Option<LinkInfo> {
        self.links().into_iter().find(|l| l.peer == *peer)
    }

    /// Tells the rendezvous how a punch we asked for ended (its operator counts successes).
    /// Best effort: the request ends by itself within the request timeout.
    pub fn report_punch(&self, peer: PeerId, direct: bool) {
        let session = self.session.clone();
        tokio::spawn(async move {
            let _ = session
                .request(&ControlMessage::PunchResult { peer, direct })
                .await;
        });
    }

    /// Our NAT's profile, if measured.
    pub fn nat_profile(&self) -> Option<common::nat::NatProfile> {
        self.nat.borrow().as_ref().map(|r| r.profile())
    }

    /// How relayed traffic travels now, for the user.
    pub fn relay_label(&self) -> &'static str {
        match self.session.state() {
            SessionState::Registered(reg) if reg.over_tcp => "relayed via rendezvous (TCP)",
            _ => "relayed via rendezvous (UDP)",
        }
    }

    /// The candidates of an introduction that we will probe: usable ones only
    /// ([`usable_candidate`]: loopback only when our rendezvous is on loopback too, as in tests),
    /// never the rendezvous's own address, at most [`MAX_CANDIDATES`]. The rendezvous applies
    /// the same rules; we do not rely on it.
    pub fn screen_candidates(&self, candidates: &[Candidate]) -> Vec<Candidate> {
        let server = self.session.server_addr();
        let allow_loopback = server.ip().is_loopback();
        candidates
            .iter()
            .filter(|c| c.addr != server && usable_candidate(c.addr, allow_loopback))
            .take(MAX_CANDIDATES)
            .copied()
            .collect()
    }

    /// Readies the socket for talking to `peer` before any path is known: its stable address
    /// goes through the relay (if it is up). Returns the stable address.
    pub fn prepare(&self, peer: PeerId, candidates: &[Candidate]) -> SocketAddr {
        let stable = stable_addr(&peer);
        // A new introduction: a closed connection's link must not take the routes set up from
        // here with it when its task ends.
        let live_link = match self.table.lock() {
            Ok(mut table) => {
                table.forget_closed(&peer);
                table.links.contains_key(&peer)
            }
            Err(_) => false,
        };
        if !live_link {
            // Relayed packets from the peer go to the connection about to be made on the stable
            // address, not to an old connection's address (a connection dialed straight to a
            // cached address knows the peer by its real address).
            self.relay.forget(&peer);
        }
        // A direct route to an address the peer no longer announces is stale (the peer restarted
        // or moved while an old connection of ours still routed to it): the new handshake's
        // answers would go there and be lost until the old connection timed out.
        let usable_route = match self.node.socket.route_of(stable) {
            PathTarget::Udp(a) if a == stable => false,
            PathTarget::Udp(a) => candidates.iter().any(|c| c.addr == a),
            PathTarget::Virtual(_) => true,
        };
        // Route through the relay even if its stream is not open yet (it is re-opened after a
        // re-registration): packets sent meanwhile are dropped and QUIC retransmits them, whereas
        // a missing route would send them to an unroutable address for good.
        if !usable_route {
            self.node
                .socket
                .set_route(stable, PathTarget::Virtual(self.relay.sink(&peer)));
        }
        // No candidate is aliased to the peer here: a candidate is only what the peer (or the
        // rendezvous) claims, and may be another peer's address. Addresses are aliased once a
        // probe or an answer authenticated with the introduction's key came from them
        // (`punching`), and never away from another live connection.
        stable
    }

    /// Punches `peer`; probes from the peer's addresses are aliased to its stable address.
    pub async fn punch(
        &self,
        peer: PeerId,
        introduction: Introduction,
        role: Role,
        candidates: &[Candidate],
    ) -> State {
        let log = self.verbose.then(|| self.console.clone());
        let alias = Some(stable_addr(&peer));
        punching::run(
            &self.node,
            &self.router,
            peer,
            introduction,
            role,
            candidates,
            log,
            alias,
        )
        .await
    }

    /// Hands a punch result to `peer`'s link, or keeps it for the connection about to arrive
    /// (moving that connection's handshake to the proven direct path at once).
    pub async fn notify(&self, peer: PeerId, event: LinkEvent) {
        let tx = {
            let Ok(mut table) = self.table.lock() else {
                return;
            };
            // A link whose connection has closed (its task lingers a moment for the close) is
            // no link: the result is for the connection about to arrive.
            table.forget_closed(&peer);
            match table.links.get(&peer) {
                Some(handle) => Some(handle.tx.clone()),
                None => {
                    // No connection yet (its handshake may be running over the relay right
                    // now): move it to the proven path at once; its link starts from there.
                    if let LinkEvent::DirectProven { addr, .. } = &event {
                        self.node
                            .socket
                            .set_route(stable_addr(&peer), PathTarget::Udp(*addr));
                    }
                    table
                        .pending
                        .retain(|_, (_, at)| at.elapsed() < PENDING_PATH_TTL);
                    table.pending.insert(peer, (event.clone(), Instant::now()));
                    None
                }
            }
        };
        if let Some(tx) = tx {
            let _ = tx.send(event).await;
        }
    }

    /// Starts the link task of a new connection; its path starts as the socket routes it now.
    pub fn start_link(&self, peer: PeerId, conn: quinn::Connection, describe: &'static str) {
        let quinn_addr = conn.remote_address();
        let initial = match self.node.socket.route_of(quinn_addr) {
            PathTarget::Virtual(_) => Current::Relay,
            PathTarget::Udp(addr) => Current::Direct(addr),
        };
        // Its address is the connection's: no alias takes it away while the link runs.
        self.node.socket.claim(quinn_addr);
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let now = Instant::now();
        let (status, _) = watch::channel(LinkStatus {
            path: initial,
            describe,
            started: now,
            since: now,
            punch_failure: None,
        });
        let early = match self.table.lock() {
            Ok(mut table) => {
                table.links.insert(
                    peer,
                    LinkHandle {
                        conn_id: conn.stable_id(),
                        tx: tx.clone(),
                        conn: conn.clone(),
                        status: status.clone(),
                    },
                );
                table
                    .pending
                    .remove(&peer)
                    .filter(|(_, at)| at.elapsed() < PENDING_PATH_TTL)
                    .map(|(event, _)| event)
            }
            Err(_) => None,
        };
        if let Some(event) = early {
            let _ = tx.try_send(event);
        }
        let keeper = self.clone();
        tokio::spawn(async move {
            keeper
                .run_link(peer, conn, quinn_addr, initial, describe, tx, rx, status)
                .await
        });
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_link(
        self,
        peer: PeerId,
        conn: quinn::Connection,
        quinn_addr: SocketAddr,
        initial: Current,
        mut describe: &'static str,
        tx: mpsc::Sender<LinkEvent>,
        mut rx: mpsc::Receiver<LinkEvent>,
        status: watch::Sender<LinkStatus>,
    ) {
        let update = |f: &dyn Fn(&mut LinkStatus)| status.send_modify(|s| f(s));
        self.relay.set_quinn_addr(peer, quinn_addr);
        let mut selector = PathSelector::new(initial, Instant::now(), PathConfig::default());
        let mut heartbeats = heartbeats_of(&conn, self.node.identity.id(), peer);
        let nonce = heartbeats.nonce();
        let mut answers = self.router.register_raw(nonce);
        let mut explained = false;
        loop {
            let now = Instant::now();
            if conn.close_reason().is_some() {
                break;
            }
            // A newer connection to the same peer (it restarted, or dialed us as we dialed it)
            // took over the peer's route: only its link manages the route from now on.
            if !self.is_current_link(&peer, conn.stable_id()) {
                break;
            }
            while let Some(action) = selector.poll(now) {
                match action {
                    Action::Switch(Current::Relay) => {
                        update(&|s| {
                            s.path = Current::Relay;
                            s.since = Instant::now();
                        });
                        self.node
                            .socket
                            .set_route(quinn_addr, PathTarget::Virtual(self.relay.sink(&peer)));
                        self.console
                            .say(format!("path to {peer}: {}", self.relay_label()))
                            .await;
                    }
                    Action::Switch(Current::Direct(addr)) => {
                        update(&|s| {
                            s.path = Current::Direct(addr);
                            s.describe = describe;
                            s.since = Instant::now();
                            s.punch_failure = None;
                        });
                        self.node
                            .socket
                            .set_route(quinn_addr, PathTarget::Udp(addr));
                        self.console
                            .say(format!("path to {peer}: direct to {addr} ({describe})"))
                            .await;
                    }
                    Action::Heartbeat(addr) => {
                        let beat = heartbeats.request(addr);
                        let _ = self.node.socket.send_to(&beat.contents, addr).await;
                    }
                    Action::Repunch => {
                        let keeper = self.clone();
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let event = keeper.repunch(peer).await;
                            let _ = tx.send(event).await;
                        });
                    }
                }
            }
            let wake = selector
                .poll_timeout()
                .unwrap_or(now + Duration::from_secs(60));
            tokio::select! {
                event = rx.recv() => match event {
                    Some(LinkEvent::DirectProven { addr, describe: how }) => {
                        describe = how;
                        selector.direct_proven(addr, Instant::now());
                    }
                    Some(LinkEvent::PunchFailed(reason)) => {
                        update(&|s| s.punch_failure = Some(reason.clone()));
                        // Say once why the connection stays relayed; later retries only in -v.
                        if !explained && selector.current() == Current::Relay {
                            explained = true;
                            self.console
                                .say(format!(
                                    "path to {peer}: {}, no direct path: {reason}; \
                                     retrying in the background",
                                    self.relay_label()
                                ))
                                .await;
                        } else if self.verbose {
                            self.console.error(format!("punch to {peer}: {reason}")).await;
                        }
                        selector.punch_failed(Instant::now());
                    }
                    Some(LinkEvent::AddressChanged) => selector.address_changed(Instant::now()),
                    None => break,
                },
                answer = answers.recv() => {
                    let Some(answer) = answer else { break };
                    match heartbeats.handle(answer.from, &answer.data) {
                        HeartbeatInput::Answered(addr) => {
                            selector.heartbeat_answered(addr, Instant::now());
                        }
                        HeartbeatInput::Reply(reply) => {
                            let _ = self.node.socket.send_to(&reply.contents, reply.destination).await;
                        }
                        HeartbeatInput::Ignored(why) => {
                            tracing::debug!(%peer, from = %answer.from, ?why, "heartbeat datagram ignored");
                            // The first few in -v; the count in the log.
                            if self.verbose && heartbeats.ignored() <= 8 {
                                self.console
                                    .error(format!(
                                        "path to {peer}: ignored a heartbeat datagram from {}: {why:?}",
                                        answer.from
                                    ))
                                    .await;
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
                _ = conn.closed() => break,
            }
        }
        self.router.unregister(nonce);
        // The close frame (and its retransmissions while the connection drains) still need the
        // route: keep it a moment.
        tokio::time::sleep(Duration::from_secs(2)).await;
        if let Ok(mut table) = self.table.lock() {
            if table
                .links
                .get(&peer)
                .is_some_and(|h| h.conn_id == conn.stable_id())
            {
                table.links.remove(&peer);
                self.relay.forget(&peer);
                self.node.socket.remove_routes(quinn_addr);
            } else if table
                .links
                .get(&peer)
                .is_none_or(|h| h.conn.remote_address() != quinn_addr)
            {
                // A newer connection on another address took over: ours is no longer claimed.
                self.node.socket.release(quinn_addr);
            }
        }
    }

    /// Asks for a new introduction to `peer` and punches.
    async fn repunch(&self, peer: PeerId) -> LinkEvent {
        let reply = self
            .session
            .request(&ControlMessage::Connect { id: peer })
            .await;
        let (candidates, introduction) = match reply {
            Ok(ControlMessage::Punch {
                candidates,
                nonce,
                key,
                ..
            }) => (
                self.screen_candidates(&candidates),
                Introduction { nonce, key },
            ),
            Ok(other) => {
                return LinkEvent::PunchFailed(format!("the rendezvous answered {}", other.kind()))
            }
            Err(e) => return LinkEvent::PunchFailed(e.to_string()),
        };
        self.prepare(peer, &candidates);
        match self
            .punch(peer, introduction, Role::Initiator, &candidates)
            .await
        {
            State::Direct(path) => {
                self.report_punch(peer, true);
                LinkEvent::DirectProven {
                    addr: path.addr,
                    describe: path.kind.describe(),
                }
            }
            State::Failed(report) => {
                self.report_punch(peer, false);
                LinkEvent::PunchFailed(report.reason())
            }
            State::Probing => LinkEvent::PunchFailed("punch stopped".into()),
        }
    }

    /// Accepts an introduction pushed by the rendezvous (protocol version 2): without it the
    /// rendezvous does not relay between us and `peer`. Best effort, in the background; a
    /// refusal is shown in verbose mode.
    fn accept_introduction(&self, peer: PeerId, nonce: u64) {
        let session = self.session.clone();
        let console = self.verbose.then(|| self.console.clone());
        tokio::spawn(async move {
            let reply = session
                .request(&ControlMessage::Accept { peer, nonce })
                .await;
            let problem = match reply {
                Ok(ControlMessage::Ack {}) => return,
                Ok(ControlMessage::Error { code, message }) => format!("{code:?}: {message}"),
                Ok(other) => format!("unexpected `{}`", other.kind()),
                Err(e) => e.to_string(),
            };
            tracing::debug!(%peer, %problem, "accepting an introduction failed");
            if let Some(console) = console {
                console
                    .error(format!(
                        "accepting the introduction of {peer} failed: {problem}"
                    ))
                    .await;
            }
        });
    }

    /// Answers introductions pushed by the rendezvous: accept them, ready the socket for the peer, punch as
    /// the responder, and give a proven path to the peer's link.
    pub async fn serve_introductions(self, mut events: mpsc::Receiver<ServerEvent>) {
        let mut punches = tokio::task::JoinSet::new();
        loop {
            let event = tokio::select! {
                e = events.recv() => match e { Some(e) => e, None => break },
                Some(_) = punches.join_next(), if !punches.is_empty() => continue,
            };
            let ServerEvent::Punch {
                peer,
                candidates,
                nonce,
                key,
            } = event;
            let candidates = self.screen_candidates(&candidates);
            if self.verbose {
                let list: Vec<String> = candidates.iter().map(|c| c.addr.to_string()).collect();
                self.console
                    .error(format!(
                        "introduced to {peer} (candidates {})",
                        list.join(", ")
                    ))
                    .await;
            }
            if punches.len() >= MAX_RESPONDER_PUNCHES {
                self.console
                    .error(format!(
                        "too many introductions at once; ignoring one from {peer}"
                    ))
                    .await;
                continue;
            }
            // Agree to be relayed with the peer first: the rendezvous holds the peer's first
            // relayed packets (its QUIC handshake) until this arrives. Not awaited: the reply
            // takes a round trip, and punching should start at once.
            self.accept_introduction(peer, nonce);
            self.prepare(peer, &candidates);
            let keeper = self.clone();
            punches.spawn(async move {
                let event = match keeper
                    .punch(
                        peer,
                        Introduction { nonce, key },
                        Role::Responder,
                        &candidates,
                    )
                    .await
                {
                    State::Direct(path) => LinkEvent::DirectProven {
                        addr: path.addr,
                        describe: path.kind.describe(),
                    },
                    State::Failed(report) => LinkEvent::PunchFailed(report.reason()),
                    State::Probing => return,
                };
                keeper.notify(peer, event).await;
            });
        }
    }

    /// Asks the rendezvous how it sees us every [`MAPPING_CHECK_INTERVAL`]; when our public
    /// address changes (the NAT rebound), tells every link.
    pub async fn watch_mapping(self, server: SocketAddr, mut shutdown: watch::Receiver<bool>) {
        let nonce = rand::random::<u64>();
        let mut inbox = self.router.register_raw(nonce);
        let mut last: Option<SocketAddr> = None;
        let mut counter = 0u32;
        let mut ticker = tokio::time::interval(MAPPING_CHECK_INTERVAL);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => break,
            }
            if last.is_none() {
                if let SessionState::Registered(reg) = self.session.state() {
                    last = Some(reg.observed);
                }
            }
            counter = counter.wrapping_add(1);
            let tag = ProbeTag {
                nonce,
                sender: self.node.identity.id(),
            };
            let transaction = tag.transaction(counter);
            if self
                .node
                .socket
                .send_to(&stun::binding_request(transaction), server)
                .await
                .is_err()
            {
                continue;
            }
            let answer = tokio::time::timeout(Duration::from_secs(2), async {
                while let Some(d) = inbox.recv().await {
                    if let Ok(StunPacket::BindingSuccess {
                        transaction: t,
                        mapped,
                    }) = stun::decode(&d.data)
                    {
                        if t == transaction {
                            return Some(mapped);
                        }
                    }
                }
                None
            })
            .await;
            let Ok(Some(mapped)) = answer else { continue };
            self.session.udp_works();
            if matches!(self.session.state(), SessionState::Registered(r) if r.over_tcp) {
                // Registered through the tunnel: the tunnel's address is not ours to compare.
                continue;
            }
            if let Some(previous) = last.filter(|p| *p != mapped) {
                // Any request makes the rendezvous look at our connection's new address, so
                // that introductions hand out the new one.
                let _ = self
                    .session
                    .request(&ControlMessage::Ping {
                        seq: counter.into(),
                    })
                    .await;
                let links: Vec<mpsc::Sender<LinkEvent>> = self
                    .table
                    .lock()
                    .map(|t| t.links.values().map(|h| h.tx.clone()).collect())
                    .unwrap_or_default();
                self.console
                    .say(format!(
                        "our public address changed from {previous} to {mapped} (NAT rebinding); \
                         re-punching {} connection(s)",
                        links.len()
                    ))
                    .await;
                for link in links {
                    let _ = link.send(LinkEvent::AddressChanged).await;
                }
            }
            last = Some(mapped);
        }
        self.router.unregister(nonce);
    }
}

/// The heartbeats of `conn` between `me` and `peer`, keyed from the connection's TLS exporter
/// (see [`punch::heartbeat`]). If the exporter fails (it does not once the handshake is done),
/// random keys: the peer's answers then never count and the link falls back to the relay,
/// which is safe.
fn heartbeats_of(conn: &quinn::Connection, me: PeerId, peer: PeerId) -> Heartbeats {
    let keys = HeartbeatKeys::derive(me, peer, |out, context| {
        conn.export_keying_material(out, EXPORTER_LABEL, context)
            .is_ok()
    })
    .unwrap_or_else(|| {
        tracing::warn!(%peer, "TLS exporter unavailable; heartbeats to this peer cannot be answered");
        HeartbeatKeys {
            nonce: rand::random(),
            mine: PunchKey::from_bytes(rand::random()),
            theirs: PunchKey::from_bytes(rand::random()),
        }
    });
    Heartbeats::new(me, peer, keys)
}
