//! Keeping every peer connection on the best path, without the connection noticing.
//!
//! quinn talks to one stable address per peer ([`crate::relay::stable_addr`]); the socket sends
//! each packet on the current path, direct UDP or the relay. Every decision about a peer's
//! routes is taken by its [`punch::peer_paths::PeerPaths`], a sans-IO state machine; this module
//! is its thin tokio driver: it feeds introductions, punch results, connections, heartbeat
//! answers, address changes and time in, and carries out route, alias and claim changes on the
//! socket. For each connection a link task sends its heartbeats, reads their answers, wakes the
//! machine at its timers and tells the user when the path changes: the connection starts on the
//! relay or a proven direct path, moves to a direct path as soon as a punch proves one
//! (make-before-break), falls back to the relay when heartbeats go unanswered, and punches again
//! with backoff, and at once when our public address changes (NAT rebinding).
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
use punch::path::{Current, PathConfig};
use punch::peer_paths::{
    ConnId, ConnectionEnd, PathOutput, PeerPaths, PunchOutcome, RouteTarget, CLOSE_LINGER,
};
use punch::{Introduction, Role, State};
use tokio::sync::{mpsc, watch};
use transport::PathTarget;

use crate::console::Console;
use crate::node::Node;
use crate::punching::{self, Router};
use crate::relay::{stable_addr, Relay};
use crate::session::{ServerEvent, Session, SessionState};
use crate::tasks::TaskSet;

/// How often we ask the rendezvous (over STUN) how it sees us. Also keeps the NAT mapping
/// towards it fresh.
pub const MAPPING_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Most punching sessions run at once in answer to introductions.
const MAX_RESPONDER_PUNCHES: usize = 64;
/// Longest wait for a punching session's opening probes before our first QUIC packet toward
/// the peer (they go out at once; this only bounds a session that never starts): the dialer's
/// relayed handshake, the responder's answer to a first flight that came with the introduction.
pub(crate) const FIRST_PROBES_WAIT: Duration = Duration::from_millis(100);
/// When a connection whose path changed is [`nudge`]d, from the change: three times, so that
/// one nudge lost on a lossy path does not leave quinn's loss timer as it was.
const NUDGE_AT: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(500),
    Duration::from_millis(1500),
];

/// Makes `conn` send a packet that the peer acknowledges, now: a MAX_DATA frame (the receive
/// window shrunk by one byte and grown back announces one byte more of credit, which the next
/// announcement pays back).
///
/// Why: quinn does not know that the path under its packets changed (the socket moves them),
/// and what it sent on a path that died waits for its loss timer, which backs off
/// exponentially while nothing is acknowledged: a relay node lost for a few seconds leaves the
/// next retransmission 3 to 6 s away, and each one lost on a lossy link doubles that, so a
/// message typed during a failover could wait half a minute on a path that works again. One
/// packet acknowledged on the new path makes quinn declare the earlier ones lost, send them
/// again at once, and start its timer afresh. (quinn-proto's `path_changed` resets more, but
/// quinn 0.11 does not expose it.)
pub(crate) fn nudge(conn: &quinn::Connection) {
    let window = quinn::VarInt::from_u32(transport::PEER_CONNECTION_WINDOW);
    let shrunk = quinn::VarInt::from_u32(transport::PEER_CONNECTION_WINDOW.saturating_sub(1));
    conn.set_receive_window(shrunk);
    conn.set_receive_window(window);
}

/// [`nudge`]s `conn` at [`NUDGE_AT`] (ends early with the connection).
async fn nudges(conn: quinn::Connection) {
    let start = tokio::time::Instant::now();
    for at in NUDGE_AT {
        tokio::time::sleep_until(start + at).await;
        if conn.close_reason().is_some() {
            return;
        }
        nudge(&conn);
    }
}
/// Events queued for one link.
const LINK_QUEUE: usize = 64;

struct LinkHandle {
    tx: mpsc::Sender<PathOutput>,
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

impl LinkStatus {
    /// Whether this status already says the link is on `path`, found as `describe` (the name
    /// of a relayed path does not matter).
    fn says(&self, path: Current, describe: &str) -> bool {
        self.path == path && (path == Current::Relay || self.describe == describe)
    }
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
    /// The tasks spawned for links, punches and introductions: they end at the endpoint's
    /// shutdown, and [`Endpoint::close`](crate::endpoint::Endpoint::close) waits for them.
    pub tasks: TaskSet,
    /// IP TTL of punching's opening probes (`None`: none); see [`punching::config_for`].
    pub opening_ttl: Option<u8>,
    /// Never seek a direct path (`--relay-only`): introductions bring no candidates and
    /// punching ends at once, failed; connections stay on the relay.
    pub relay_only: bool,
    table: Arc<Mutex<PeerTable>>,
}

/// One peer: its path state machine and the link tasks of its connections.
struct PeerEntry {
    paths: PeerPaths,
    links: HashMap<ConnId, LinkHandle>,
    /// The peer's NAT profile from the last introduction that had one (see
    /// [`PathKeeper::nat_measured`]).
    peer_nat: Option<common::nat::NatProfile>,
}

/// Peers with anything to manage. One lock for the machines and the links, so that an input
/// and the outputs it causes are never interleaved with another's.
#[derive(Default)]
struct PeerTable {
    peers: HashMap<PeerId, PeerEntry>,
}

/// What executing a machine's outputs left for the caller.
#[derive(Default)]
struct Executed {
    /// Outputs for the link task that fed the input (it handles them itself).
    mine: Vec<PathOutput>,
    /// Lines for the user in verbose mode.
    verbose_lines: Vec<String>,
}

/// What a punching session tells its peer's [`PeerPaths`]: authenticated probes and answers
/// (their addresses become the peer's aliases) and its end.
#[derive(Clone)]
pub struct PunchWitness {
    keeper: PathKeeper,
    peer: PeerId,
}

impl PunchWitness {
    /// A probe or an answer authenticated with introduction `nonce`'s key came from `from`.
    /// Returns what to show in verbose mode.
    pub fn authenticated(&self, nonce: u64, from: SocketAddr) -> Vec<String> {
        self.keeper
            .feed(self.peer, None, |p| p.probe_authenticated(nonce, from))
            .1
            .verbose_lines
    }

    /// Introduction `nonce`'s punch ended with `state` (its first result; a session stopped
    /// without one counts as failed).
    pub fn result(&self, nonce: u64, state: &State) {
        let outcome = match state {
            State::Direct(path) => PunchOutcome::Direct {
                addr: path.addr,
                describe: path.kind.describe_at(path.addr),
            },
            State::Failed(report) => PunchOutcome::Failed(report.reason()),
            State::Probing => PunchOutcome::Failed("punch stopped".into()),
        };
        self.keeper.feed(self.peer, None, |p| {
            p.punch_result(nonce, outcome, Instant::now())
        });
    }

    /// Introduction `nonce`'s punching session ended.
    pub fn ended(&self, nonce: u64) {
        self.keeper.feed(self.peer, None, |p| {
            p.introduction_ended(nonce, Instant::now())
        });
    }
}

fn conn_id(conn: &quinn::Connection) -> ConnId {
    conn.stable_id() as ConnId
}

impl PathKeeper {
    /// A keeper with no links yet.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: Node,
        router: Router,
        relay: Relay,
        session: Session,
        console: Console,
        verbose: bool,
        nat: watch::Receiver<Option<crate::netcheck::Report>>,
        tasks: TaskSet,
    ) -> Self {
        PathKeeper {
            node,
            router,
            relay,
            session,
            console,
            verbose,
            nat,
            tasks,
            opening_ttl: Some(punch::DEFAULT_OPENING_TTL),
            relay_only: false,
            table: Arc::default(),
        }
    }

    /// Feeds one input to `peer`'s machine (created if needed) and carries out what it asks of
    /// the socket and the relay; outputs for other links go to their tasks, those for `me` are
    /// returned. The machine is dropped once it has nothing left to manage.
    fn feed<R>(
        &self,
        peer: PeerId,
        me: Option<ConnId>,
        input: impl FnOnce(&mut PeerPaths) -> R,
    ) -> (R, Executed) {
        let Ok(mut table) = self.table.lock() else {
            // A poisoned table: a task panicked holding it; nothing sensible is left to do.
            let mut scratch = PeerPaths::new(stable_addr(&peer), PathConfig::default());
            return (input(&mut scratch), Executed::default());
        };
        let entry = table.peers.entry(peer).or_insert_with(|| PeerEntry {
            paths: PeerPaths::new(stable_addr(&peer), PathConfig::default()),
            links: HashMap::new(),
            peer_nat: None,
        });
        let result = input(&mut entry.paths);
        let mut executed = Executed::default();
        while let Some(output) = entry.paths.poll_output() {
            self.execute(peer, entry, me, output, &mut executed);
        }
        if entry.paths.is_idle() && entry.links.is_empty() {
            table.peers.remove(&peer);
        }
        (result, executed)
    }

    /// Carries out one output (socket and relay changes are synchronous and cheap).
    fn execute(
        &self,
        peer: PeerId,
        entry: &PeerEntry,
        me: Option<ConnId>,
        output: PathOutput,
        executed: &mut Executed,
    ) {
        let socket = &self.node.socket;
        match output {
            PathOutput::SetRoute { quinn_addr, target } => {
                let target = match target {
                    RouteTarget::Direct(addr) => PathTarget::Udp(addr),
                    RouteTarget::Relay => PathTarget::Virtual(self.relay.sink(&peer)),
                };
                socket.set_route(quinn_addr, target);
            }
            PathOutput::RemoveRoutes { quinn_addr } => socket.remove_routes(quinn_addr),
            PathOutput::Claim { quinn_addr } => socket.claim(quinn_addr),
            PathOutput::Release { quinn_addr } => socket.release(quinn_addr),
            PathOutput::AddAlias { real, quinn_addr } => {
                if let Err(refusal) = socket.add_alias(real, quinn_addr) {
                    tracing::debug!(%peer, from = %real, ?refusal, "address not aliased to the peer");
                    if self.verbose {
                        executed.verbose_lines.push(format!(
                            "punch {}: {real} not taken as the peer's address: {}",
                            peer.short(),
                            match refusal {
                                transport::AliasRefusal::OwnedByAnother(_) =>
                                    "a live connection already uses it",
                                transport::AliasRefusal::Full => "too many addresses",
                            }
                        ));
                    }
                }
            }
            PathOutput::RemoveAlias { real, quinn_addr } => socket.remove_alias(real, quinn_addr),
            PathOutput::RelaySource(None) => self.relay.forget(&peer),
            PathOutput::RelaySource(Some(addr)) => self.relay.set_quinn_addr(peer, addr),
            PathOutput::PathChanged { conn, .. }
            | PathOutput::PunchFailed { conn, .. }
            | PathOutput::Heartbeat { conn, .. }
            | PathOutput::Repunch { conn }
            | PathOutput::PunchForIpv6 { conn } => {
                if me == Some(conn) {
                    executed.mine.push(output);
                } else if let Some(link) = entry.links.get(&conn) {
                    // A full queue drops it: a heartbeat is retried, and the link compares its
                    // path with the machine's each time it wakes (`run_link`).
                    let _ = link.tx.try_send(output);
                }
            }
        }
    }

    /// Every connection with a link, by peer.
    pub fn links(&self) -> Vec<LinkInfo> {
        let Ok(table) = self.table.lock() else {
            return Vec::new();
        };
        let mut links: Vec<LinkInfo> = table
            .peers
            .iter()
            .flat_map(|(peer, entry)| {
                let current = entry.paths.link().map(|l| l.conn);
                entry
                    .links
                    .iter()
                    .filter(move |(id, h)| Some(**id) == current && h.conn.close_reason().is_none())
                    .map(move |(_, h)| LinkInfo {
                        peer: *peer,
                        conn: h.conn.clone(),
                        status: h.status.borrow().clone(),
                    })
            })
            .collect();
        links.sort_by_key(|l| l.status.started);
        links
    }

    /// The link of `conn`, if it has one.
    pub fn link_of_conn(&self, conn: &quinn::Connection) -> Option<LinkInfo> {
        let id = conn.stable_id();
        self.links().into_iter().find(|l| l.conn.stable_id() == id)
    }

    /// A watch on the path of `conn` (ends when its link does), if it has a link.
    pub fn watch_path(&self, conn: &quinn::Connection) -> Option<watch::Receiver<LinkStatus>> {
        let id = conn_id(conn);
        let table = self.table.lock().ok()?;
        table
            .peers
            .values()
            .find_map(|e| e.links.get(&id))
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
        self.tasks.spawn(async move {
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
        if self.relay_only {
            return Vec::new();
        }
        let server = self.session.server_addr();
        let servers = self.session.server_addrs();
        let allow_loopback = server.ip().is_loopback();
        candidates
            .iter()
            .filter(|c| {
                c.addr != server
                    && !servers.contains(&c.addr)
                    && usable_candidate(c.addr, allow_loopback)
            })
            .take(MAX_CANDIDATES)
            .copied()
            .collect()
    }

    /// Readies the socket for talking to `peer` under introduction `nonce` before any path is
    /// known (see [`PeerPaths::introduction`]: through the relay unless a direct route to an
    /// address the peer still announces is in place). Returns the stable address.
    pub fn prepare(&self, peer: PeerId, nonce: u64, candidates: &[Candidate]) -> SocketAddr {
        let addrs: Vec<SocketAddr> = candidates.iter().map(|c| c.addr).collect();
        let ours_ipv6 = self
            .node
            .ipv6_proven
            .load(std::sync::atomic::Ordering::Relaxed);
        self.feed(peer, None, |p| {
            p.our_ipv6(ours_ipv6);
            p.introduction(nonce, &addrs, Instant::now());
        });
        stable_addr(&peer)
    }

    /// We dial `peer` at its cached address `addr` (the handshake authenticates it).
    pub fn dialing_cached(&self, peer: PeerId, addr: SocketAddr) {
        self.feed(peer, None, |p| p.dialing_cached(addr));
    }

    /// The cached address of `peer` did not answer.
    pub fn cached_dial_failed(&self, peer: PeerId) {
        self.feed(peer, None, |p| p.cached_dial_failed());
    }

    /// Punches `peer` (after [`PathKeeper::prepare`] with the same introduction); probes from
    /// the peer's addresses are aliased to its stable address, and the result goes to the peer's
    /// [`PeerPaths`] (its connection, or the one about to arrive).
    pub async fn punch(
        &self,
        peer: PeerId,
        introduction: Introduction,
        role: Role,
        candidates: &[Candidate],
        peer_nat: Option<common::nat::NatProfile>,
    ) -> State {
        self.punch_telling_first_sent(peer, introduction, role, candidates, peer_nat, None)
            .await
    }

    /// As [`PathKeeper::punch`], and tells `first_sent` once the session's first datagrams (its
    /// opening probes) are out: a dialer starts its relayed handshake only then, because that
    /// handshake ends the responder's hold ([`punch::PunchConfig::responder_hold`]), which must
    /// not happen before our NAT is open toward the responder.
    pub async fn punch_telling_first_sent(
        &self,
        peer: PeerId,
        introduction: Introduction,
        role: Role,
        candidates: &[Candidate],
        peer_nat: Option<common::nat::NatProfile>,
        first_sent: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> State {
        if self.relay_only {
            return self.no_punch(peer, introduction.nonce, first_sent);
        }
        let log = self.verbose.then(|| self.console.clone());
        // Birthday punching only for a pair plain punching cannot open, known from both
        // profiles (ours measured, theirs handed over by the rendezvous); never while we are
        // registered through the TCP tunnel: the peer then has no public UDP address of ours to
        // aim at, and a birthday session that cannot work would take the pair's one running
        // birthday (and one of its few per window) from the punch that follows our move back
        // to UDP (found in the lab under load: a listener that started on the tunnel).
        if let (Some(theirs), Ok(mut table)) = (peer_nat, self.table.lock()) {
            if let Some(entry) = table.peers.get_mut(&peer) {
                entry.peer_nat = Some(theirs);
            }
        }
        let over_tcp = matches!(self.session.state(), SessionState::Registered(r) if r.over_tcp);
        let birthday = match (self.nat_profile(), peer_nat) {
            (Some(ours), Some(theirs)) if !over_tcp => punch::birthday::role(&ours, &theirs)
                .map(|role| (role, punching::birthday_config_for(Some(&theirs)))),
            _ => None,
        };
        let witness = PunchWitness {
            keeper: self.clone(),
            peer,
        };
        let timing = punching::config_for(
            self.nat_profile().as_ref(),
            peer_nat.as_ref(),
            self.opening_ttl,
        );
        // The initiator's relayed handshake tells a responder that it is under way; the
        // responder's relayed answer tells a holding initiator the same (its opening probes are
        // out by then).
        let peer_started = (role == Role::Responder || !timing.initiator_hold.is_zero())
            .then(|| self.relay.next_packet_from(peer));
        punching::run(
            &self.node,
            &self.router,
            peer,
            introduction,
            role,
            candidates,
            birthday,
            log,
            Some(witness),
            &self.tasks,
            timing,
            peer_started,
            first_sent,
        )
        .await
    }

    /// A punch that is not made (`--relay-only`): it fails at once, as one that found nothing
    /// would, so that the peer's machine keeps the connection on the relay.
    fn no_punch(
        &self,
        peer: PeerId,
        nonce: u64,
        first_sent: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> State {
        if let Some(first_sent) = first_sent {
            let _ = first_sent.send(());
        }
        let now = Instant::now();
        self.feed(peer, None, |p| {
            p.punch_result(
                nonce,
                PunchOutcome::Failed("no direct path sought (--relay-only)".to_owned()),
                now,
            );
            p.introduction_ended(nonce, now);
        });
        State::Failed(punch::FailureReport {
            candidates: Vec::new(),
            probes_sent: 0,
            probes_received: 0,
            answers_received: 0,
            peer_sources: Vec::new(),
            unauthenticated: 0,
            elapsed: Duration::ZERO,
        })
    }

    /// After every re-registration, asks for a new introduction to each peer whose connection
    /// is relayed now, as a repunch does: the relay lets packets through only between peers
    /// introduced on the server that relays them, and the server we registered with again may
    /// not know our introductions (another node of a cluster we moved to, or a server that
    /// restarted). Each such peer costs one `connect`; a peer that has not re-registered yet
    /// answers later with its own, as it re-registers too.
    pub async fn reintroduce_after_reregistration(self, mut shutdown: watch::Receiver<bool>) {
        let mut state = self.session.watch();
        let mut seen: Option<u64> = None;
        loop {
            let generation = match &*state.borrow_and_update() {
                SessionState::Registered(reg) => Some((reg.generation, reg.server.name.clone())),
                _ => None,
            };
            if let Some((generation, server)) = generation {
                if seen.is_some_and(|g| g != generation) {
                    let relayed: Vec<PeerId> = match self.table.lock() {
                        Ok(table) => table
                            .peers
                            .iter()
                            .filter(|(_, e)| {
                                e.paths.link().is_some_and(|l| l.path == Current::Relay)
                            })
                            .map(|(peer, _)| *peer)
                            .collect(),
                        Err(_) => Vec::new(),
                    };
                    if !relayed.is_empty() {
                        tracing::info!(%server, peers = relayed.len(), "registered again: introducing relayed peers again");
                    }
                    for peer in relayed {
                        let keeper = self.clone();
                        self.tasks
                            .spawn(async move { keeper.repunch(peer, true).await });
                    }
                }
                seen = Some(generation);
            }
            tokio::select! {
                r = state.changed() => if r.is_err() { return },
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Starts the link task of a new connection; its path starts as the socket routes it now.
    /// `announced` is the path the caller told the user the connection is on: if a punch result
    /// moved the route since, the link says so at once.
    pub fn start_link(
        &self,
        peer: PeerId,
        conn: quinn::Connection,
        describe: &'static str,
        announced: Current,
    ) {
        let quinn_addr = transport::canonical(conn.remote_address());
        let id = conn_id(&conn);
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let now = Instant::now();
        let (status, _) = watch::channel(LinkStatus {
            path: Current::Relay,
            describe,
            started: now,
            since: now,
            punch_failure: None,
        });
        // The handle goes in first, so that outputs of the connection's start reach its task.
        if let Ok(mut table) = self.table.lock() {
            let entry = table.peers.entry(peer).or_insert_with(|| PeerEntry {
                paths: PeerPaths::new(stable_addr(&peer), PathConfig::default()),
                links: HashMap::new(),
                peer_nat: None,
            });
            entry.links.insert(
                id,
                LinkHandle {
                    tx,
                    conn: conn.clone(),
                    status: status.clone(),
                },
            );
        }
        self.feed(peer, None, |p| {
            p.connection_up(id, quinn_addr, describe, now);
            p.announced(id, announced);
        });
        // What the user was told; the link says at once if the machine's path differs.
        status.send_modify(|s| s.path = announced);
        let keeper = self.clone();
        // At shutdown the task is dropped where it waits: the route stays as it is, for the
        // close frames the endpoint sends last.
        self.tasks
            .spawn(async move { keeper.run_link(peer, conn, rx, status).await });
    }

    /// Drives one connection's part of its peer's machine: its timers, heartbeats and their
    /// answers, and what the machine asks of it, until the connection closes or a newer one
    /// takes over; then waits out the close linger.
    async fn run_link(
        self,
        peer: PeerId,
        conn: quinn::Connection,
        mut rx: mpsc::Receiver<PathOutput>,
        status: watch::Sender<LinkStatus>,
    ) {
        let id = conn_id(&conn);
        let mut heartbeats = heartbeats_of(&conn, self.node.identity.id(), peer);
        let nonce = heartbeats.nonce();
        let mut answers = self.router.register_raw(nonce);
        loop {
            if conn.close_reason().is_some() {
                break;
            }
            // A newer connection to the same peer (it restarted, or dialed us as we dialed it)
            // took over the peer's route: only its link manages the route from now on.
            let (link, wake) = self.peek(peer, |p| {
                (p.link().filter(|l| l.conn == id), p.poll_timeout())
            });
            let Some(link) = link else {
                break;
            };
            // The machine's path, if our status lags behind it: a path change whose output was
            // dropped on a full queue (see `execute`) is said now rather than never. One still
            // queued is then said here first and skipped when it comes (`link_output`).
            if !status.borrow().says(link.path, link.describe) {
                let change = PathOutput::PathChanged {
                    conn: id,
                    path: link.path,
                    describe: link.describe,
                };
                self.link_output(peer, &conn, change, &status, &mut heartbeats)
                    .await;
            }
            let wake = wake.unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
            let mine = tokio::select! {
                output = rx.recv() => match output {
                    Some(output) => vec![output],
                    None => break,
                },
                answer = answers.recv() => {
                    let Some(answer) = answer else { break };
                    match heartbeats.handle(answer.from, &answer.data) {
                        HeartbeatInput::Answered(addr) => {
                            self.feed(peer, Some(id), |p| p.heartbeat_answered(id, addr, Instant::now())).1.mine
                        }
                        HeartbeatInput::Reply(reply) => {
                            let _ = self.node.socket.send_to(&reply.contents, reply.destination).await;
                            Vec::new()
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
                            Vec::new()
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    self.feed(peer, Some(id), |p| p.handle_timeout(Instant::now())).1.mine
                }
                _ = conn.closed() => break,
            };
            for output in mine {
                self.link_output(peer, &conn, output, &status, &mut heartbeats)
                    .await;
            }
        }
        self.router.unregister(nonce);
        let end = connection_end(&conn);
        self.feed(peer, Some(id), |p| {
            p.connection_closed(id, end, Instant::now())
        });
        // The close frame we send (and its retransmissions while the connection closes) still
        // need the route: the machine keeps it for CLOSE_LINGER unless something newer takes
        // it over. One the peer closed gave its routes up at once (ConnectionEnd::Remote).
        tokio::time::sleep(CLOSE_LINGER).await;
        if let Ok(mut table) = self.table.lock() {
            if let Some(entry) = table.peers.get_mut(&peer) {
                entry.links.remove(&id);
            }
        }
        self.feed(peer, Some(id), |p| p.handle_timeout(Instant::now()));
    }

    /// Reads `peer`'s machine (None if it has none).
    fn peek<R: Default>(&self, peer: PeerId, read: impl FnOnce(&PeerPaths) -> R) -> R {
        self.table
            .lock()
            .ok()
            .and_then(|t| t.peers.get(&peer).map(|e| read(&e.paths)))
            .unwrap_or_default()
    }

    /// Does what the machine asked of this link.
    async fn link_output(
        &self,
        peer: PeerId,
        conn: &quinn::Connection,
        output: PathOutput,
        status: &watch::Sender<LinkStatus>,
        heartbeats: &mut Heartbeats,
    ) {
        let update = |f: &dyn Fn(&mut LinkStatus)| status.send_modify(|s| f(s));
        match output {
            // Already said (the link caught up with the machine before this output came).
            PathOutput::PathChanged { path, describe, .. }
                if status.borrow().says(path, describe) => {}
            PathOutput::PathChanged {
                path: Current::Relay,
                ..
            } => {
                update(&|s| {
                    s.path = Current::Relay;
                    s.since = Instant::now();
                });
                self.tasks.spawn(nudges(conn.clone()));
                self.console
                    .say(format!("path to {peer}: {}", self.relay_label()))
                    .await;
            }
            PathOutput::PathChanged {
                path: Current::Direct(addr),
                describe,
                ..
            } => {
                update(&|s| {
                    // A new name for the path in use (see `PeerPaths::punch_result`) keeps
                    // its start.
                    if s.path != Current::Direct(addr) {
                        s.since = Instant::now();
                    }
                    s.path = Current::Direct(addr);
                    s.describe = describe;
                    s.punch_failure = None;
                });
                self.tasks.spawn(nudges(conn.clone()));
                self.console
                    .say(format!("path to {peer}: direct to {addr} ({describe})"))
                    .await;
            }
            PathOutput::PunchFailed {
                reason, explain, ..
            } => {
                update(&|s| s.punch_failure = Some(reason.clone()));
                // Say once why the connection stays relayed; later retries only in -v.
                if explain {
                    // With --relay-only nothing is retried (the machine's retries only back off).
                    let retrying = if self.relay_only {
                        ""
                    } else {
                        "; retrying in the background"
                    };
                    self.console
                        .say(format!(
                            "path to {peer}: {}, no direct path: {reason}{retrying}",
                            self.relay_label()
                        ))
                        .await;
                } else if self.verbose {
                    self.console
                        .error(format!("punch to {peer}: {reason}"))
                        .await;
                }
            }
            PathOutput::Heartbeat { addr, .. } => {
                let beat = heartbeats.request(addr);
                let _ = self.node.socket.send_to(&beat.contents, addr).await;
            }
            PathOutput::Repunch { .. } | PathOutput::PunchForIpv6 { .. } if self.relay_only => {
                // No direct path is sought: no introduction is asked for (the machine backs off
                // as after any failed repunch).
                self.repunch_failed(peer, "no direct path sought (--relay-only)".to_owned())
                    .await;
            }
            PathOutput::Repunch { .. } => {
                let keeper = self.clone();
                self.tasks
                    .spawn(async move { keeper.repunch(peer, true).await });
            }
            PathOutput::PunchForIpv6 { .. } => {
                if self.verbose {
                    self.console
                        .error(format!(
                            "punch {}: direct over IPv4 while both sides have IPv6: punching \
                             once more for an IPv6 path",
                            peer.short()
                        ))
                        .await;
                }
                let keeper = self.clone();
                self.tasks
                    .spawn(async move { keeper.repunch(peer, false).await });
            }
            // Socket and relay outputs are carried out where they are fed.
            _ => {}
        }
    }

    /// Our NAT was just measured (and the rendezvous told): a connection that is relayed now
    /// may need birthday punching, which its first punch could not choose without the
    /// profile. Each punches again at once with a new introduction, which carries both
    /// profiles, instead of waiting for its next retry; not one whose peer's profile we know
    /// and which needs no birthday punch with ours (its punch, perhaps still running, was
    /// already the right one: a handshake that rode the introduction often ends on the relay
    /// a moment before the punch proves the direct path).
    /// In verbose mode it says so (`NAT measured: ...`), with what `profile` tells peers.
    pub async fn nat_measured(&self, profile: &common::nat::NatProfile) {
        if self.verbose {
            let early = if profile.inbound_takes_port {
                "; an early packet takes its port for its sender"
            } else {
                ""
            };
            self.console
                .error(format!(
                    "NAT measured: {}{early} (told the rendezvous)",
                    profile.kind()
                ))
                .await;
        }
        let relayed: Vec<PeerId> = match self.table.lock() {
            Ok(table) => table
                .peers
                .iter()
                .filter(|(_, e)| e.paths.link().is_some_and(|l| l.path == Current::Relay))
                .filter(|(_, e)| {
                    e.peer_nat
                        .is_none_or(|theirs| punch::birthday::role(profile, &theirs).is_some())
                })
                .map(|(peer, _)| *peer)
                .collect(),
            Err(_) => return,
        };
        for peer in relayed {
            let keeper = self.clone();
            self.tasks
                .spawn(async move { keeper.repunch(peer, true).await });
        }
    }

    /// Our IPv6 address was just proven to the rendezvous: a connection made before (relayed,
    /// or direct over IPv4 because IPv4 answered first) to a peer that offered an IPv6 address
    /// may go direct over IPv6 now (see [`PeerPaths::ipv6_upgrade_possible`]). Each punches
    /// again at once; a proven IPv6 path replaces the one in use, and an IPv4 answer changes
    /// nothing. Once per proof (after a registration), so at most one extra introduction per
    /// such peer and registration.
    pub fn ipv6_proven(&self) {
        let peers: Vec<PeerId> = match self.table.lock() {
            Ok(table) => table
                .peers
                .iter()
                .filter(|(_, e)| e.paths.ipv6_upgrade_possible())
                .map(|(peer, _)| *peer)
                .collect(),
            Err(_) => return,
        };
        for peer in peers {
            tracing::debug!(%peer, "our IPv6 address is proven: punching again for an IPv6 path");
            let keeper = self.clone();
            // A relayed connection may need a birthday punch; one direct over IPv4 does not.
            let relayed = self.peer_relayed(peer);
            self.tasks
                .spawn(async move { keeper.repunch(peer, relayed).await });
        }
    }

    /// [`nudges`] every connection to `peer` whose path is the relay.
    fn nudge_relayed(&self, peer: PeerId) {
        let relayed: Vec<quinn::Connection> = match self.table.lock() {
            Ok(table) => table
                .peers
                .get(&peer)
                .filter(|e| e.paths.link().is_some_and(|l| l.path == Current::Relay))
                .map(|e| e.links.values().map(|l| l.conn.clone()).collect())
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        for conn in relayed {
            self.tasks.spawn(nudges(conn));
        }
    }

    /// Whether `peer`'s live connection is relayed now.
    fn peer_relayed(&self, peer: PeerId) -> bool {
        self.table.lock().is_ok_and(|t| {
            t.peers
                .get(&peer)
                .and_then(|e| e.paths.link())
                .is_some_and(|l| l.path == Current::Relay)
        })
    }

    /// Asks for a new introduction to `peer` and punches; the result goes to the peer's machine.
    /// Without `birthday`, a plain punch whatever the NAT profiles (an IPv6 path sought beside
    /// a direct one must not cost a birthday punch).
    async fn repunch(&self, peer: PeerId, birthday: bool) {
        let reply = self.session.request(&ControlMessage::connect(peer)).await;
        let (candidates, introduction, peer_nat, no_relay) = match reply {
            Ok(ControlMessage::Punch {
                candidates,
                nonce,
                key,
                nat,
                no_relay,
                ..
            }) => (
                self.screen_candidates(&candidates),
                Introduction { nonce, key },
                nat,
                no_relay,
            ),
            Ok(other) => {
                let reason = format!("the rendezvous answered {}", other.kind());
                self.repunch_failed(peer, reason).await;
                return;
            }
            Err(e) => {
                self.repunch_failed(peer, e.to_string()).await;
                return;
            }
        };
        if let Some(why) = no_relay.filter(|_| self.peer_relayed(peer)) {
            self.relay_lost(peer, &why).await;
        }
        self.prepare(peer, introduction.nonce, &candidates);
        // Introduced again (after a move to another node, or a retry): the relay carries our
        // packets to the peer again once it accepts.
        self.nudge_relayed(peer);
        let peer_nat = peer_nat.filter(|_| birthday);
        match self
            .punch(peer, introduction, Role::Initiator, &candidates, peer_nat)
            .await
        {
            State::Direct(_) => self.report_punch(peer, true),
            State::Failed(_) => self.report_punch(peer, false),
            State::Probing => {}
        }
    }

    /// A relayed connection whose relay cannot reach the peer any more (one of us moved to a
    /// node without a link to the other's): it stalls until a direct path is found, and the
    /// user is told why rather than left with a silent connection. Said by whichever side
    /// learns it: from its own new introduction or from one the other side asked for (which
    /// of the two comes first depends on which peer re-registered first).
    async fn relay_lost(&self, peer: PeerId, why: &str) {
        self.console
            .error(format!(
                "the connection to {peer} is relayed, but the rendezvous cannot relay to it now \
                 ({}); waiting for a direct path",
                crate::files::printable(why)
            ))
            .await;
    }

    async fn repunch_failed(&self, peer: PeerId, reason: String) {
        self.feed(peer, None, |p| p.repunch_failed(reason, Instant::now()));
    }

    fn accept_introduction(&self, peer: PeerId, nonce: u64) {
        let session = self.session.clone();
        let console = self.verbose.then(|| self.console.clone());
        self.tasks.spawn(async move {
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
                nat,
                no_relay,
                first_flight,
            } = event;
            let candidates = self.screen_candidates(&candidates);
            if let Some(why) = &no_relay {
                if self.peer_relayed(peer) {
                    self.relay_lost(peer, why).await;
                } else if self.relay_only {
                    // Only the relay would do, and it cannot: the dialer is refused too; say
                    // why here as well (the server's words, escaped).
                    self.console
                        .error(format!(
                            "{peer} asked to connect, but the rendezvous cannot relay between \
                             you: {}",
                            crate::files::printable(why)
                        ))
                        .await;
                }
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
            self.prepare(peer, nonce, &candidates);
            // A relayed connection introduced again (the peer moved to our node, or retries):
            // our packets pass the relay again once our accept is in.
            self.nudge_relayed(peer);
            let list: Vec<String> = candidates.iter().map(|c| c.addr.to_string()).collect();
            let keeper = self.clone();
            punches.spawn(async move {
                let (first_sent_tx, first_sent) = tokio::sync::oneshot::channel();
                // The result goes to the peer's machine.
                let punch = keeper.punch_telling_first_sent(
                    peer,
                    Introduction { nonce, key },
                    Role::Responder,
                    &candidates,
                    nat,
                    Some(first_sent_tx),
                );
                // The dialer's first flight, once our opening probes are out (our answer to it
                // goes over the relay, but our probes must lead whatever we send the peer).
                let first_flight = async {
                    let Some(flight) = first_flight else { return };
                    let _ = tokio::time::timeout(FIRST_PROBES_WAIT, first_sent).await;
                    let len = flight.as_bytes().len();
                    if keeper.relay.inject_first_flight(&peer, flight.into_bytes()) {
                        tracing::debug!(%peer, len, "first flight taken with the introduction");
                    } else {
                        tracing::debug!(%peer, "first flight dropped: the receive queue is full");
                    }
                };
                tokio::join!(punch, first_flight);
            });
            // Said after the session started: its opening probes should leave before the
            // initiator's probes can reach our NAT, and the console may keep us waiting.
            if self.verbose {
                self.console
                    .error(format!(
                        "introduced to {peer} (candidates {})",
                        list.join(", ")
                    ))
                    .await;
            }
        }
        // Aborted and awaited here (dropping the set would only abort them): the endpoint's
        // close awaits this task, and so every punch it started.
        punches.shutdown().await;
    }

    /// Asks the rendezvous how it sees us every [`MAPPING_CHECK_INTERVAL`]; when our public
    /// address changes (the NAT rebound), tells every link.
    pub async fn watch_mapping(self, mut shutdown: watch::Receiver<bool>) {
        let nonce = rand::random::<u64>();
        let mut inbox = self.router.register_raw(nonce);
        let mut last: Option<SocketAddr> = None;
        let mut last_server: Option<SocketAddr> = None;
        let mut counter = 0u32;
        let mut ticker = tokio::time::interval(MAPPING_CHECK_INTERVAL);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => break,
            }
            // The server we are registered with now (it changes when we move to another of
            // several): our mapping towards another server is not comparable (a symmetric NAT
            // maps each destination apart), so comparisons start over.
            let server = self.session.server_addr();
            if last_server != Some(server) {
                last_server = Some(server);
                last = None;
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
                let peers: Vec<PeerId> = self
                    .table
                    .lock()
                    .map(|t| {
                        t.peers
                            .iter()
                            .filter(|(_, e)| e.paths.link().is_some())
                            .map(|(peer, _)| *peer)
                            .collect()
                    })
                    .unwrap_or_default();
                self.console
                    .say(format!(
                        "our public address changed from {previous} to {mapped} (NAT rebinding); \
                         re-punching {} connection(s)",
                        peers.len()
                    ))
                    .await;
                for peer in peers {
                    let (_, executed) =
                        self.feed(peer, None, |p| p.address_changed(Instant::now()));
                    debug_assert!(executed.mine.is_empty());
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
/// Whether a connection's routes must outlive it: only when we send its close frame (and answer
/// the peer's late packets with it); a connection the peer closed, or that timed out or was
/// reset, sends nothing more. Still open (the task stops at shutdown): we are about to close it.
fn connection_end(conn: &quinn::Connection) -> ConnectionEnd {
    use quinn::ConnectionError as E;
    match conn.close_reason() {
        Some(E::ApplicationClosed(_) | E::ConnectionClosed(_) | E::TimedOut | E::Reset) => {
            ConnectionEnd::Remote
        }
        _ => ConnectionEnd::Local,
    }
}

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
