//! Everything that decides where one remote peer's packets go, as one state machine with time
//! passed in: [`PeerPaths`].
//!
//! quinn talks to the peer at a *quinn address*: the peer's stable (virtual) address for the
//! connections we dial and the relayed ones, or the peer's real address for a connection it
//! dialed straight to us. The socket's demultiplexer maps each quinn address to a path (a direct
//! UDP address or the relay) and shows packets from the peer's other proven addresses (aliases)
//! as coming from it. `PeerPaths` is the only thing that changes those tables for its peer: the
//! driver feeds it what happened (an introduction, authenticated probes, punch results, a
//! connection up or closed, heartbeat answers, our public address changed, the time) and carries
//! out what [`PeerPaths::poll_output`] returns, in order.
//!
//! Rules it keeps (each was a bug once):
//!
//! - A direct route goes only to an address a punch of this peer proved (an authenticated
//!   answer), or to a cached address the driver dials (the QUIC handshake then authenticates
//!   the peer); an alias only to an address an authenticated probe or answer of one of this
//!   peer's introductions came from.
//! - A punch result that arrives before its connection moves the stable address's route at once
//!   (the handshake may be running over the relay) and is kept for the connection for
//!   [`PENDING_PATH_TTL`].
//! - A closed connection's routes are kept for [`CLOSE_LINGER`] (its close frame needs them),
//!   unless a new introduction or punch result for the peer arrives first: they then belong to
//!   the connection about to be made, and the closed one leaves them alone (a peer that
//!   reconnects right after its previous connection closed).
//! - A new introduction with no live connection shows relayed packets as coming from the stable
//!   address again (after a connection made straight to a cached address), and a direct route to
//!   an address the peer no longer announces goes back to the relay, unless it is the live
//!   connection's path and answers its heartbeats (a learned or birthday-punched address is
//!   never announced).
//! - The live connection's route always follows its selector: where packets go and what the
//!   user is told never disagree.
//! - Aliases of an introduction are released when it ends, unless a live connection on the
//!   stable address took them (they then go with its routes): whoever gets us introduced cannot
//!   make entries pile up.
//! - Each live connection's path is a [`PathSelector`] (heartbeats, fallback to the relay,
//!   re-punching with backoff and at once when our public address changes).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::path::{Action, Current, PathConfig, PathSelector};

/// How long a path proven before its connection arrived is kept for it.
pub const PENDING_PATH_TTL: Duration = Duration::from_secs(30);
/// How long a closed connection keeps its routes (its close frame and the retransmissions while
/// it drains still need them).
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Most introductions of one peer tracked at once; a further one ends the oldest (releasing its
/// aliases). Introductions are rate-limited by the rendezvous; this bounds what a stream of them
/// could make us hold.
pub const MAX_INTRODUCTIONS: usize = 16;
/// Most aliases one introduction adds (the demultiplexer's own bound per address is the same).
pub const MAX_ALIASES_PER_INTRODUCTION: usize = 16;
/// Most superseded or closed connections waiting out [`CLOSE_LINGER`]; beyond it the oldest
/// ends at once.
pub const MAX_LINGERING: usize = 8;
/// How long after a connection went direct over IPv4, while both sides have IPv6 (ours proven,
/// the peer's address offered), it punches once more for an IPv6 path: the first punch takes
/// IPv4 when IPv6 loses a probe or an answer (its short wait for IPv6 is then over).
pub const IPV6_UPGRADE_AFTER: Duration = Duration::from_secs(3);

/// The driver's name for one connection (quinn's `stable_id`).
pub type ConnId = u64;

/// Where packets sent to a quinn address go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteTarget {
    /// Straight to this UDP address (the quinn address itself: no route).
    Direct(SocketAddr),
    /// Through the rendezvous's relay.
    Relay,
}

/// Something the driver must do, in the order returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathOutput {
    /// Packets quinn sends to `quinn_addr` take `target` from now on; for a direct target, packets
    /// from it are shown to quinn as coming from `quinn_addr` (`Direct(quinn_addr)`: no route).
    SetRoute {
        /// The connection's address as quinn sees it.
        quinn_addr: SocketAddr,
        /// Where its packets go.
        target: RouteTarget,
    },
    /// Forget every route and alias of `quinn_addr`, and its claim.
    RemoveRoutes {
        /// The address whose routes go.
        quinn_addr: SocketAddr,
    },
    /// `quinn_addr` is a live connection's address: never alias it to another.
    Claim {
        /// The connection's address.
        quinn_addr: SocketAddr,
    },
    /// `quinn_addr` is no longer a live connection's.
    Release {
        /// The former connection's address.
        quinn_addr: SocketAddr,
    },
    /// Show packets from `real` to quinn as coming from `quinn_addr` (the driver may be refused;
    /// that is fine).
    AddAlias {
        /// The peer's proven address.
        real: SocketAddr,
        /// Where quinn knows the peer.
        quinn_addr: SocketAddr,
    },
    /// Undo an [`PathOutput::AddAlias`] (only if `real` still maps to `quinn_addr` and is not its
    /// direct route).
    RemoveAlias {
        /// The address aliased.
        real: SocketAddr,
        /// Where it was aliased to.
        quinn_addr: SocketAddr,
    },
    /// Relayed packets of the peer are shown to quinn as coming from this address (`None`: the
    /// stable address).
    RelaySource(Option<SocketAddr>),
    /// Connection `conn`'s path changed (tell the user).
    PathChanged {
        /// The connection.
        conn: ConnId,
        /// Its path now.
        path: Current,
        /// How the direct path was found.
        describe: &'static str,
    },
    /// A punch for connection `conn` found no direct path.
    PunchFailed {
        /// The connection.
        conn: ConnId,
        /// Why, in words.
        reason: String,
        /// The first failure while the connection is relayed: say why it stays relayed (later
        /// ones only in verbose mode).
        explain: bool,
    },
    /// Send a heartbeat of connection `conn` to `addr`.
    Heartbeat {
        /// The connection.
        conn: ConnId,
        /// The direct path tested.
        addr: SocketAddr,
    },
    /// Ask the rendezvous for a new introduction to the peer and punch (for connection `conn`).
    Repunch {
        /// The connection.
        conn: ConnId,
    },
    /// As [`PathOutput::Repunch`], for an IPv6 path beside the direct IPv4 one in use (see
    /// [`IPV6_UPGRADE_AFTER`]): a plain punch, never a birthday punch (the connection has its
    /// direct path).
    PunchForIpv6 {
        /// The connection.
        conn: ConnId,
    },
}

/// How a punch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PunchOutcome {
    /// An authenticated answer proved this address.
    Direct {
        /// The peer's address on the path.
        addr: SocketAddr,
        /// How it was found, for the user.
        describe: &'static str,
    },
    /// Nothing was proven.
    Failed(String),
}

/// A live connection and its path.
#[derive(Debug)]
struct Link {
    conn: ConnId,
    quinn_addr: SocketAddr,
    selector: PathSelector,
    describe: &'static str,
    punch_failure: Option<String>,
    explained: bool,
    /// Aliases of ended introductions, now the connection's (removed with its routes).
    adopted: Vec<SocketAddr>,
    closed_at: Option<Instant>,
    /// The one punch for an IPv6 path after going direct over IPv4 (see
    /// [`IPV6_UPGRADE_AFTER`]): when it is due, and whether it was asked for already.
    ipv6_upgrade_at: Option<Instant>,
    ipv6_upgrade_asked: bool,
}

/// How a connection ended, which decides whether its routes must outlive it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionEnd {
    /// We closed it (or are about to): quinn answers the peer's late packets with its close
    /// frame for a while, which still needs the routes, so they stay for [`CLOSE_LINGER`].
    Local,
    /// The peer closed it, or it timed out or was reset: nothing more is sent on it, and its
    /// routes go at once. Kept, they would take the next user of the peer's address (a port
    /// the OS or a NAT hands out again) for this peer: that party's new connection would
    /// arrive on this peer's stable address and be refused.
    Remote,
}

/// A connection that no longer manages the routes, waiting out [`CLOSE_LINGER`].
#[derive(Debug)]
struct Lingering {
    quinn_addr: SocketAddr,
    until: Instant,
    /// The aliases it had taken over from ended introductions.
    aliases: Vec<SocketAddr>,
}

#[derive(Debug)]
struct Intro {
    nonce: u64,
    aliases: Vec<SocketAddr>,
    result_seen: bool,
}

/// A connection's path as the user sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkPath {
    /// The connection.
    pub conn: ConnId,
    /// Where its packets go.
    pub path: Current,
    /// How the direct path was found.
    pub describe: &'static str,
    /// Why the last punch found no direct path (cleared when one is proven).
    pub punch_failure: Option<String>,
}

/// The paths of one remote peer: its routes, aliases and claims in the socket, its live
/// connection's [`PathSelector`], the punch results waiting for a connection, and the connections
/// waiting out their close. See the [module documentation](self).
#[derive(Debug)]
pub struct PeerPaths {
    stable: SocketAddr,
    config: PathConfig,
    link: Option<Link>,
    lingering: VecDeque<Lingering>,
    introductions: VecDeque<Intro>,
    pending: Option<(PunchOutcome, Instant)>,
    /// A cached address is being dialed (its route must stay until the dial ends).
    dialing: bool,
    /// The routes we set, as the socket has them.
    routes: Vec<(SocketAddr, RouteTarget)>,
    outputs: VecDeque<PathOutput>,
    /// The peer's last introduction offered an IPv6 address.
    peer_ipv6: bool,
    /// Our IPv6 address is proven (the driver says so before each introduction).
    ours_ipv6: bool,
}

impl PeerPaths {
    /// The paths of the peer whose stable address is `stable`; nothing routed yet.
    pub fn new(stable: SocketAddr, config: PathConfig) -> Self {
        PeerPaths {
            stable,
            config,
            link: None,
            lingering: VecDeque::new(),
            introductions: VecDeque::new(),
            pending: None,
            dialing: false,
            routes: Vec::new(),
            outputs: VecDeque::new(),
            peer_ipv6: false,
            ours_ipv6: false,
        }
    }

    /// Whether our IPv6 address is proven to the rendezvous now (so that a connection on IPv4
    /// with a peer that offers IPv6 tries IPv6 once more, see [`IPV6_UPGRADE_AFTER`]).
    pub fn our_ipv6(&mut self, proven: bool) {
        self.ours_ipv6 = proven;
    }

    /// Whether a new punch could move the live connection to IPv6: it is relayed or direct
    /// over IPv4, and the peer's last introduction offered an IPv6 address. The driver asks
    /// when our own IPv6 address has just been proven (a connection made before that took
    /// whichever path answered first, see `PunchConfig::prefer_ipv6`), and punches such a
    /// peer again: a proven IPv6 path then replaces the IPv4 one as any punch result does.
    pub fn ipv6_upgrade_possible(&self) -> bool {
        self.peer_ipv6
            && self.link().is_some_and(|l| match l.path {
                Current::Relay => true,
                Current::Direct(addr) => !is_ipv6(addr),
            })
    }

    /// The peer's stable address.
    pub fn stable(&self) -> SocketAddr {
        self.stable
    }

    /// Where packets to `quinn_addr` go now (as this machine routed them).
    pub fn route(&self, quinn_addr: SocketAddr) -> RouteTarget {
        self.routes
            .iter()
            .find(|(q, _)| *q == quinn_addr)
            .map_or(RouteTarget::Direct(quinn_addr), |(_, t)| *t)
    }

    /// The live connection's path, if there is one.
    pub fn link(&self) -> Option<LinkPath> {
        self.link
            .as_ref()
            .filter(|l| l.closed_at.is_none())
            .map(|l| LinkPath {
                conn: l.conn,
                path: l.selector.current(),
                describe: l.describe,
                punch_failure: l.punch_failure.clone(),
            })
    }

    /// Nothing left to manage: no connection, none closing, no introduction, no result waiting,
    /// no route in place. The driver may drop the machine (a fresh one starts from the same
    /// state).
    pub fn is_idle(&self) -> bool {
        self.link.is_none()
            && self.lingering.is_empty()
            && self.introductions.is_empty()
            && self.pending.is_none()
            && self.routes.is_empty()
    }

    /// The next thing to do, if any.
    pub fn poll_output(&mut self) -> Option<PathOutput> {
        self.outputs.pop_front()
    }

    fn set_route(&mut self, quinn_addr: SocketAddr, target: RouteTarget) {
        self.routes.retain(|(q, _)| *q != quinn_addr);
        if target != RouteTarget::Direct(quinn_addr) {
            self.routes.push((quinn_addr, target));
        }
        self.outputs
            .push_back(PathOutput::SetRoute { quinn_addr, target });
    }

    fn remove_routes(&mut self, quinn_addr: SocketAddr) {
        self.routes.retain(|(q, _)| *q != quinn_addr);
        self.outputs
            .push_back(PathOutput::RemoveRoutes { quinn_addr });
    }

    /// A closed connection that still holds the routes hands them to what comes next: it
    /// releases its claim at the end of its linger but leaves the routes alone.
    fn forget_closed(&mut self) {
        if let Some(closed) = self.link.as_ref().and_then(|l| l.closed_at) {
            if let Some(link) = self.link.take() {
                self.linger(link.quinn_addr, closed + CLOSE_LINGER, link.adopted);
            }
        }
    }

    fn linger(&mut self, quinn_addr: SocketAddr, until: Instant, aliases: Vec<SocketAddr>) {
        if self.lingering.len() >= MAX_LINGERING {
            if let Some(oldest) = self.lingering.pop_front() {
                self.end_linger(oldest);
            }
        }
        self.lingering.push_back(Lingering {
            quinn_addr,
            until,
            aliases,
        });
    }

    /// A superseded connection's linger ended: its claim goes unless the connection now in
    /// charge uses the same address, and so do the aliases it had taken over unless something
    /// else holds them. The routes are the newer connection's.
    ///
    /// Its routes are orphaned, and go, when the connection in charge runs on another address
    /// (the peer dialed us straight from its real address after a connection on its stable
    /// address) and no connection is about to arrive on this one (no introduction, no result
    /// waiting): left in place, the old direct route would show whoever gets that real address
    /// next (a port the OS hands out again) as this peer.
    fn end_linger(&mut self, lingering: Lingering) {
        let quinn_addr = lingering.quinn_addr;
        let live_on_same = self
            .link
            .as_ref()
            .is_some_and(|l| l.quinn_addr == quinn_addr);
        if self.drop_orphaned(quinn_addr) {
            return;
        }
        if quinn_addr == self.stable {
            self.release_aliases(lingering.aliases);
        }
        if !live_on_same {
            self.outputs.push_back(PathOutput::Release { quinn_addr });
        }
    }

    /// The closed connection in charge is done: relayed packets no longer appear from its
    /// address, and its routes (with its claim and the aliases it had taken over) go.
    fn drop_closed_link(&mut self) {
        if let Some(link) = self.link.take() {
            self.outputs.push_back(PathOutput::RelaySource(None));
            self.remove_routes(link.quinn_addr);
        }
    }

    /// Removes the routes of `quinn_addr` if nothing holds them any more: no connection on it
    /// (live or closing), none waiting out its close, and, for the stable address, no
    /// introduction running, no result waiting for its connection and no cached dial.
    fn drop_orphaned(&mut self, quinn_addr: SocketAddr) -> bool {
        let held = self
            .link
            .as_ref()
            .is_some_and(|l| l.quinn_addr == quinn_addr)
            || self.lingering.iter().any(|l| l.quinn_addr == quinn_addr)
            || (quinn_addr == self.stable
                && (!self.introductions.is_empty() || self.pending.is_some() || self.dialing));
        if held || !self.routes.iter().any(|(q, _)| *q == quinn_addr) {
            return false;
        }
        self.remove_routes(quinn_addr);
        true
    }

    /// The rendezvous introduced us to the peer (we asked, or it pushed the introduction) with
    /// nonce `nonce`; the peer announces `candidates`. Readies the stable address: through the
    /// relay unless a direct route to an address the peer still announces is in place.
    pub fn introduction(&mut self, nonce: u64, candidates: &[SocketAddr], now: Instant) {
        self.forget_closed();
        self.peer_ipv6 = candidates.iter().any(|a| is_ipv6(*a));
        if self.link.is_none() {
            // Relayed packets go to the connection about to be made on the stable address, not
            // to an old connection's address (one dialed straight to a cached address knows the
            // peer by its real address).
            self.outputs.push_back(PathOutput::RelaySource(None));
        }
        // A direct route to an address the peer no longer announces is stale (the peer restarted
        // or moved): the new handshake's answers would go there and be lost. Without a route,
        // packets would go to the unroutable stable address: the relay, even before its stream
        // is open (QUIC retransmits what is dropped meanwhile). Not stale: the live
        // connection's direct path while it answers its heartbeats. An address learned from
        // the peer's probe or found by a birthday punch is never among the candidates, and a
        // second introduction (our NAT just measured, the peer punching again) must not move
        // such a path to the relay.
        let stable = self.stable;
        let live = self.live_link_on_stable();
        let answering = |a: SocketAddr| {
            live.is_some_and(|l| {
                l.selector.current() == Current::Direct(a) && l.selector.answering(now)
            })
        };
        let usable = match self.route(stable) {
            RouteTarget::Direct(a) if a == stable => false,
            RouteTarget::Direct(a) => candidates.contains(&a) || answering(a),
            RouteTarget::Relay => true,
        };
        if !usable {
            self.set_route(stable, RouteTarget::Relay);
            // The live connection's selector follows the route (it returns to the path at its
            // next answer); left on the direct path, it would never move the packets back.
            let moved = self
                .live_link_on_stable_mut()
                .filter(|link| matches!(link.selector.current(), Current::Direct(_)))
                .map(|link| {
                    link.selector.left_direct();
                    PathOutput::PathChanged {
                        conn: link.conn,
                        path: Current::Relay,
                        describe: link.describe,
                    }
                });
            self.outputs.extend(moved);
        }
        if self.introductions.iter().any(|i| i.nonce == nonce) {
            return;
        }
        if self.introductions.len() >= MAX_INTRODUCTIONS {
            if let Some(oldest) = self.introductions.front().map(|i| i.nonce) {
                self.introduction_ended(oldest, now);
            }
        }
        self.introductions.push_back(Intro {
            nonce,
            aliases: Vec::new(),
            result_seen: false,
        });
    }

    /// A probe or an answer authenticated with introduction `nonce`'s key came from `from`: the
    /// peer's packets from there are its connection's.
    pub fn probe_authenticated(&mut self, nonce: u64, from: SocketAddr) {
        let stable = self.stable;
        let Some(intro) = self.introductions.iter_mut().find(|i| i.nonce == nonce) else {
            return;
        };
        if from == stable
            || intro.aliases.contains(&from)
            || intro.aliases.len() >= MAX_ALIASES_PER_INTRODUCTION
        {
            return;
        }
        intro.aliases.push(from);
        self.outputs.push_back(PathOutput::AddAlias {
            real: from,
            quinn_addr: stable,
        });
    }

    /// Introduction `nonce`'s punch ended with `outcome` (its first result; the puncher may go on
    /// answering until its deadline).
    pub fn punch_result(&mut self, nonce: u64, outcome: PunchOutcome, now: Instant) {
        let Some(intro) = self.introductions.iter_mut().find(|i| i.nonce == nonce) else {
            return;
        };
        if std::mem::replace(&mut intro.result_seen, true) {
            return;
        }
        // A closed connection is no connection: the result is for the one about to arrive.
        self.forget_closed();
        if let Some(link) = self.link.as_mut() {
            Self::apply(link, outcome, now, &mut self.outputs);
            self.drain_link(now);
            return;
        }
        if let PunchOutcome::Direct { addr, .. } = &outcome {
            // The handshake may be running over the relay right now: move it at once.
            self.set_route(self.stable, RouteTarget::Direct(*addr));
        }
        self.pending = Some((outcome, now));
    }

    fn apply(link: &mut Link, outcome: PunchOutcome, now: Instant, out: &mut VecDeque<PathOutput>) {
        match outcome {
            PunchOutcome::Direct { addr, .. }
                if !is_ipv6(addr)
                    && matches!(link.selector.current(), Current::Direct(a) if is_ipv6(a)) =>
            {
                // A direct IPv6 path in use (alive: a dead one falls back to the relay first)
                // stays: a later punch may prove IPv4 first (its responder takes the first
                // answer, e.g. in the other side's punch for IPv6), which is no better.
            }
            PunchOutcome::Direct { addr, describe } => {
                // The address in use proven again, under another name (the connection came in
                // from it before the punch said which candidate it is): no switch, so the new
                // name is reported here or the user would keep the old one.
                let renamed =
                    link.describe != describe && link.selector.current() == Current::Direct(addr);
                link.describe = describe;
                link.selector.direct_proven(addr, now);
                if renamed {
                    out.push_back(PathOutput::PathChanged {
                        conn: link.conn,
                        path: Current::Direct(addr),
                        describe,
                    });
                }
            }
            PunchOutcome::Failed(reason) => {
                let explain = !link.explained && link.selector.current() == Current::Relay;
                link.explained |= explain;
                link.punch_failure = Some(reason.clone());
                out.push_back(PathOutput::PunchFailed {
                    conn: link.conn,
                    reason,
                    explain,
                });
                link.selector.punch_failed(now);
            }
        }
    }

    /// A re-punch asked for by the live connection could not start (the rendezvous did not
    /// introduce us): counts as a failed punch, retried with backoff.
    pub fn repunch_failed(&mut self, reason: String, now: Instant) {
        if let Some(link) = self.link.as_mut().filter(|l| l.closed_at.is_none()) {
            Self::apply(link, PunchOutcome::Failed(reason), now, &mut self.outputs);
            self.drain_link(now);
        }
    }

    /// Introduction `nonce`'s punching session finished: its aliases go, unless the live
    /// connection on the stable address has them (they then go with its routes).
    pub fn introduction_ended(&mut self, nonce: u64, _now: Instant) {
        let Some(pos) = self.introductions.iter().position(|i| i.nonce == nonce) else {
            return;
        };
        let Some(intro) = self.introductions.remove(pos) else {
            return;
        };
        let adopted = self.live_on_stable();
        self.release_aliases(intro.aliases);
        if !adopted {
            self.drop_orphaned(self.stable);
        }
    }

    /// Removes aliases to the stable address that nothing holds any more: not the live
    /// connection on it (which then takes them), not a running introduction, not the direct
    /// route.
    fn release_aliases(&mut self, aliases: Vec<SocketAddr>) {
        let stable = self.stable;
        if let Some(link) = self.live_link_on_stable_mut() {
            for real in aliases {
                if !link.adopted.contains(&real) {
                    link.adopted.push(real);
                }
            }
            return;
        }
        let direct = self.route(stable);
        for real in aliases {
            let held = direct == RouteTarget::Direct(real)
                || self.introductions.iter().any(|i| i.aliases.contains(&real));
            if !held {
                self.outputs.push_back(PathOutput::RemoveAlias {
                    real,
                    quinn_addr: stable,
                });
            }
        }
    }

    /// The driver dials the peer at `addr` from its cache (no introduction: only a peer whose
    /// NAT lets anyone in answers, and the handshake authenticates it).
    /// With a live connection on the stable address (a library user connecting again to a
    /// peer it is connected to), the route stays that connection's: it reaches the peer, so the
    /// new handshake gets through on it too, and the live connection keeps its path.
    pub fn dialing_cached(&mut self, addr: SocketAddr) {
        self.dialing = true;
        if !self.live_on_stable() {
            self.set_route(self.stable, RouteTarget::Direct(addr));
        }
    }

    /// A live connection runs on the stable address (and so owns its route).
    fn live_on_stable(&self) -> bool {
        self.live_link_on_stable().is_some()
    }

    /// The live connection on the stable address, if there is one.
    fn live_link_on_stable(&self) -> Option<&Link> {
        self.link
            .as_ref()
            .filter(|l| l.closed_at.is_none() && l.quinn_addr == self.stable)
    }

    /// [`Self::live_link_on_stable`], to change.
    fn live_link_on_stable_mut(&mut self) -> Option<&mut Link> {
        let stable = self.stable;
        self.link
            .as_mut()
            .filter(|l| l.closed_at.is_none() && l.quinn_addr == stable)
    }

    /// The cached address did not answer.
    pub fn cached_dial_failed(&mut self) {
        self.dialing = false;
        if !self.live_on_stable() {
            self.remove_routes(self.stable);
        }
    }

    /// A connection is up on `quinn_addr`; returns the path it starts on (as the socket routes
    /// it). It manages the peer's routes from now on; an older connection stops.
    pub fn connection_up(
        &mut self,
        conn: ConnId,
        quinn_addr: SocketAddr,
        describe: &'static str,
        now: Instant,
    ) -> Current {
        self.dialing = false;
        if let Some(old) = self.link.take() {
            let until = old.closed_at.unwrap_or(now) + CLOSE_LINGER;
            self.linger(old.quinn_addr, until, old.adopted);
        }
        let initial = match self.route(quinn_addr) {
            RouteTarget::Relay => Current::Relay,
            RouteTarget::Direct(addr) => Current::Direct(addr),
        };
        // Its address is the connection's: no alias takes it away while it lives.
        self.outputs.push_back(PathOutput::Claim { quinn_addr });
        self.outputs
            .push_back(PathOutput::RelaySource(Some(quinn_addr)));
        self.link = Some(Link {
            conn,
            quinn_addr,
            selector: PathSelector::new(initial, now, self.config),
            describe,
            punch_failure: None,
            explained: false,
            adopted: Vec::new(),
            closed_at: None,
            ipv6_upgrade_at: None,
            ipv6_upgrade_asked: false,
        });
        if let Some((outcome, at)) = self.pending.take() {
            if now.saturating_duration_since(at) < PENDING_PATH_TTL {
                if let Some(link) = self.link.as_mut() {
                    Self::apply(link, outcome, now, &mut self.outputs);
                }
            }
        }
        self.drain_link(now);
        // A connection on the peer's real address leaves nothing waiting on the stable one.
        self.drop_orphaned(self.stable);
        initial
    }

    /// The driver told the user that connection `conn` is on `path` (its `connected` line,
    /// read from the socket's route after the handshake). A punch result that came between
    /// that read and [`PeerPaths::connection_up`] moved the route already, so the connection
    /// started on the new path with no change to report, and the user would never hear of it:
    /// then the path it is on is reported now ([`PathOutput::PathChanged`]).
    pub fn announced(&mut self, conn: ConnId, path: Current) {
        let Some(link) = self
            .link
            .as_ref()
            .filter(|l| l.conn == conn && l.closed_at.is_none())
        else {
            return;
        };
        let current = link.selector.current();
        if current != path {
            self.outputs.push_back(PathOutput::PathChanged {
                conn,
                path: current,
                describe: link.describe,
            });
        }
    }

    /// Connection `conn` closed: it stops managing the path. If we closed it, its routes go
    /// after [`CLOSE_LINGER`] unless a new introduction, punch result or connection comes
    /// first; if the peer closed it (or it timed out or was reset), they go at once.
    pub fn connection_closed(&mut self, conn: ConnId, end: ConnectionEnd, now: Instant) {
        let Some(link) = self
            .link
            .as_mut()
            .filter(|l| l.conn == conn && l.closed_at.is_none())
        else {
            return;
        };
        link.closed_at = Some(now);
        if end == ConnectionEnd::Remote {
            self.drop_closed_link();
        }
    }

    /// A heartbeat of connection `conn` to `addr` was answered (authenticated, from `addr`).
    pub fn heartbeat_answered(&mut self, conn: ConnId, addr: SocketAddr, now: Instant) {
        if let Some(link) = self
            .link
            .as_mut()
            .filter(|l| l.conn == conn && l.closed_at.is_none())
        {
            link.selector.heartbeat_answered(addr, now);
            self.drain_link(now);
        }
    }

    /// Our public address changed (NAT rebinding): the direct path may be gone; punch again now.
    pub fn address_changed(&mut self, now: Instant) {
        if let Some(link) = self.link.as_mut().filter(|l| l.closed_at.is_none()) {
            link.selector.address_changed(now);
            self.drain_link(now);
        }
    }

    /// Runs what is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(pos) = self.lingering.iter().position(|l| l.until <= now) {
            if let Some(done) = self.lingering.remove(pos) {
                self.end_linger(done);
            }
        }
        if self
            .link
            .as_ref()
            .is_some_and(|l| l.closed_at.is_some_and(|at| at + CLOSE_LINGER <= now))
        {
            // Still the peer's connection: nothing newer took the routes, they go.
            self.drop_closed_link();
        }
        if self
            .pending
            .as_ref()
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) >= PENDING_PATH_TTL)
        {
            self.pending = None;
            self.drop_orphaned(self.stable);
        }
        self.drain_link(now);
    }

    /// When to call [`PeerPaths::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let link = self.link.as_ref().and_then(|l| match l.closed_at {
            Some(at) => Some(at + CLOSE_LINGER),
            None => [l.selector.poll_timeout(), l.ipv6_upgrade_at]
                .into_iter()
                .flatten()
                .min(),
        });
        let lingering = self.lingering.iter().map(|l| l.until).min();
        let pending = self.pending.as_ref().map(|(_, at)| *at + PENDING_PATH_TTL);
        [link, lingering, pending].into_iter().flatten().min()
    }

    /// Turns the live connection's selector actions into outputs.
    fn drain_link(&mut self, now: Instant) {
        let PeerPaths {
            link,
            routes,
            outputs,
            peer_ipv6,
            ours_ipv6,
            ..
        } = self;
        let Some(link) = link.as_mut().filter(|l| l.closed_at.is_none()) else {
            return;
        };
        while let Some(action) = link.selector.poll(now) {
            match action {
                Action::Switch(path) => {
                    if let Current::Direct(_) = path {
                        link.punch_failure = None;
                    }
                    Self::switch(routes, outputs, link, path);
                }
                Action::Heartbeat(addr) => outputs.push_back(PathOutput::Heartbeat {
                    conn: link.conn,
                    addr,
                }),
                Action::Repunch => outputs.push_back(PathOutput::Repunch { conn: link.conn }),
            }
        }
        // Where the packets go follows the selector: a punch proving the address already in
        // use changes nothing in the selector, so a route moved meanwhile would stay moved.
        let path = link.selector.current();
        let wanted = match path {
            Current::Relay => RouteTarget::Relay,
            Current::Direct(addr) => RouteTarget::Direct(addr),
        };
        let routed = routes
            .iter()
            .find(|(q, _)| *q == link.quinn_addr)
            .map_or(RouteTarget::Direct(link.quinn_addr), |(_, t)| *t);
        if routed != wanted {
            Self::switch(routes, outputs, link, path);
        }
        // Direct over IPv4 while both sides have IPv6: one more punch, a little later.
        let on_ipv4 = matches!(link.selector.current(), Current::Direct(a) if !is_ipv6(a));
        if !on_ipv4 || !*peer_ipv6 || !*ours_ipv6 || link.ipv6_upgrade_asked {
            link.ipv6_upgrade_at = None;
            return;
        }
        match link.ipv6_upgrade_at {
            None => link.ipv6_upgrade_at = Some(now + IPV6_UPGRADE_AFTER),
            Some(at) if now >= at => {
                link.ipv6_upgrade_at = None;
                link.ipv6_upgrade_asked = true;
                outputs.push_back(PathOutput::PunchForIpv6 { conn: link.conn });
            }
            Some(_) => {}
        }
    }

    fn switch(
        routes: &mut Vec<(SocketAddr, RouteTarget)>,
        outputs: &mut VecDeque<PathOutput>,
        link: &Link,
        path: Current,
    ) {
        let quinn_addr = link.quinn_addr;
        let target = match path {
            Current::Relay => RouteTarget::Relay,
            Current::Direct(addr) => RouteTarget::Direct(addr),
        };
        routes.retain(|(q, _)| *q != quinn_addr);
        if target != RouteTarget::Direct(quinn_addr) {
            routes.push((quinn_addr, target));
        }
        outputs.push_back(PathOutput::SetRoute { quinn_addr, target });
        outputs.push_back(PathOutput::PathChanged {
            conn: link.conn,
            path,
            describe: link.describe,
        });
    }
}

/// An IPv6 address that is not an IPv4-mapped one.
fn is_ipv6(addr: SocketAddr) -> bool {
    match addr.ip() {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().is_none(),
        std::net::IpAddr::V4(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn stable() -> SocketAddr {
        addr("[fd00::1]:1")
    }

    fn drain(paths: &mut PeerPaths) -> Vec<PathOutput> {
        std::iter::from_fn(|| paths.poll_output()).collect()
    }

    fn direct(a: SocketAddr) -> PunchOutcome {
        PunchOutcome::Direct {
            addr: a,
            describe: "public address",
        }
    }

    /// The socket's tables as the outputs leave them (the demultiplexer's rules, reduced).
    #[derive(Default, Debug)]
    struct Socket {
        routes: HashMap<SocketAddr, RouteTarget>,
        aliases: HashMap<SocketAddr, SocketAddr>,
        claims: HashSet<SocketAddr>,
        relay_source: Option<SocketAddr>,
    }

    impl Socket {
        fn apply(&mut self, out: &PathOutput) {
            match out {
                PathOutput::SetRoute { quinn_addr, target } => {
                    if let Some(RouteTarget::Direct(old)) = self.routes.remove(quinn_addr) {
                        if self.aliases.get(&old) == Some(quinn_addr) {
                            self.aliases.remove(&old);
                        }
                    }
                    match target {
                        RouteTarget::Direct(a) if a == quinn_addr => {}
                        RouteTarget::Direct(a) => {
                            self.aliases.insert(*a, *quinn_addr);
                            self.routes.insert(*quinn_addr, *target);
                        }
                        RouteTarget::Relay => {
                            self.routes.insert(*quinn_addr, *target);
                        }
                    }
                }
                PathOutput::RemoveRoutes { quinn_addr } => {
                    self.routes.remove(quinn_addr);
                    self.claims.remove(quinn_addr);
                    self.aliases.retain(|_, q| q != quinn_addr);
                }
                PathOutput::Claim { quinn_addr } => {
                    self.claims.insert(*quinn_addr);
                }
                PathOutput::Release { quinn_addr } => {
                    self.claims.remove(quinn_addr);
                }
                PathOutput::AddAlias { real, quinn_addr } if !self.claims.contains(real) => {
                    self.aliases.insert(*real, *quinn_addr);
                }
                PathOutput::RemoveAlias { real, quinn_addr }
                    if self.aliases.get(real) == Some(quinn_addr)
                        && self.routes.get(quinn_addr) != Some(&RouteTarget::Direct(*real)) =>
                {
                    self.aliases.remove(real);
                }
                PathOutput::RelaySource(a) => self.relay_source = *a,
                _ => {}
            }
        }

        fn run(&mut self, paths: &mut PeerPaths) -> Vec<PathOutput> {
            let outs = drain(paths);
            for o in &outs {
                self.apply(o);
            }
            outs
        }
    }

    fn t(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    /// Runs timers until `until`, answering heartbeats of `conn` while `answering(now)`.
    fn run_until(
        paths: &mut PeerPaths,
        socket: &mut Socket,
        now: &mut Instant,
        until: Instant,
        conn: ConnId,
        answering: impl Fn(Instant) -> bool,
    ) -> Vec<(Instant, PathOutput)> {
        let mut seen = Vec::new();
        let mut steps = 0;
        while let Some(at) = paths.poll_timeout().filter(|at| *at <= until) {
            steps += 1;
            assert!(steps < 100_000, "timers do not advance at {at:?}");
            assert!(
                at >= *now || steps == 1,
                "a timer in the past: the driver would spin"
            );
            *now = at.max(*now);
            paths.handle_timeout(*now);
            for out in socket.run(paths) {
                if let PathOutput::Heartbeat { addr, .. } = out {
                    if answering(*now) {
                        paths.heartbeat_answered(conn, addr, *now + Duration::from_millis(20));
                        for out in socket.run(paths) {
                            seen.push((*now, out));
                        }
                    }
                }
                seen.push((*now, out));
            }
        }
        *now = until;
        seen
    }

    #[test]
    fn a_proven_path_before_the_connection_moves_the_handshake_and_starts_the_link_direct() {
        let t0 = Instant::now();
        let mut socket = Socket::default();
        let mut paths = PeerPaths::new(stable(), PathConfig::default());
        let peer = addr("203.0.113.5:4000");
        paths.introduction(7, &[peer], t0);
        socket.run(&mut paths);
        assert_eq!(socket.routes.get(&stable()), Some(&RouteTarget::Relay));
        paths.probe_authenticated(7, peer);
        paths.punch_result(7, direct(peer), t(t0, 30));
        socket.run(&mut paths);
        assert_eq!(
            socket.routes.get(&stable()),
            Some(&RouteTarget::Direct(peer))
        );
        let initial = paths.connection_up(1, stable(), "public address", t(t0, 60));
        assert_eq!(initial, Current::Direct(peer));
        socket.run(&mut paths);
        assert!(socket.claims.contains(&stable()));
        assert_eq!(paths.link().map(|l| l.path), Some(Current::Direct(peer)));
    }

    /// Regression (found in the lab: a dialer said `connected ... relayed` and then never
    /// `path to ...: direct`, although its punch had been answered): the driver reads the route
    /// for its `connected` line when the handshake ends, and hands the connection to the machine
    /// a moment later. A punch result in between moves the route and waits for the connection,
    /// which then starts on the direct path: nothing changes, so nothing was reported. The
    /// announced path says what the user was told; a different one is reported at once.
    #[test]
    fn a_punch_result_between_the_connected_line_and_the_link_is_still_reported() {
        let t0 = Instant::now();
        let mut socket = Socket::default();
        let mut paths = PeerPaths::new(stable(), PathConfig::default());
        let peer = addr("203.0.113.5:4000");
        paths.introduction(7, &[peer], t0);
        socket.run(&mut paths);
        // The handshake ended over the relay: the driver says "relayed" ...
        let told = match socket.routes.get(&stable()) {
            Some(RouteTarget::Relay) => Current::Relay,
            other => panic!("{other:?}"),
        };
        // ... the punch result comes ...
        paths.probe_authenticated(7, peer);
        paths.punch_result(7, direct(peer), t(t0, 30));
        socket.run(&mut paths);
        // ... and then the connection reaches the machine.
        let initial = paths.connection_up(1, stable(), "public address", t(t0, 31));
        assert_eq!(initial, Current::Direct(peer));
        let quiet = path_changes(&mut paths);
        assert!(quiet.is_empty(), "{quiet:?}");
        paths.announced(1, told);
        assert_eq!(
            drain(&mut paths),
            vec![PathOutput::PathChanged {
                conn: 1,
                path: Current::Direct(peer),
                describe: "public address",
            }]
        );
        // Told the path it is on (or about another connection): nothing to say.
        paths.announced(1, Current::Direct(peer));
        paths.announced(2, Current::Relay);
        assert!(drain(&mut paths).is_empty());
    }

    /// The path changes among the outputs waiting (the rest are dropped).
    fn path_changes(paths: &mut PeerPaths) -> Vec<PathOutput> {
        drain(paths)
            .into_iter()
            .filter(|o| matches!(o, PathOutput::PathChanged { .. }))
            .collect()
    }

    /// Regression (found in CI: the UPnP lab test's listener kept saying "direct to ... (the
    /// peer's address)"): the listener's punch proved the dialer's port mapping before the
    /// dialer's handshake reached it, so the connection came in on that address already and
    /// the punch result changed no path, only its name. The new name is reported, once.
    #[test]
    fn a_punch_proving_the_address_in_use_reports_its_name() {
        let t0 = Instant::now();
        let mut socket = Socket::default();
        let mut paths = PeerPaths::new(stable(), PathConfig::default());
        let mapped = addr("203.0.113.22:60829");
        let by_mapping = PunchOutcome::Direct {
            addr: mapped,
            describe: "port mapping",
        };
        paths.introduction(7, &[mapped], t0);
        paths.probe_authenticated(7, mapped);
        paths.punch_result(7, by_mapping.clone(), t(t0, 5));
        socket.run(&mut paths);
        let initial = paths.connection_up(1, stable(), "the peer's address", t(t0, 6));
        assert_eq!(initial, Current::Direct(mapped));
        let said = path_changes(&mut paths);
        assert_eq!(
            said,
            vec![PathOutput::PathChanged {
                conn: 1,
                path: Current::Direct(mapped),
                describe: "port mapping",
            }]
        );
        paths.announced(1, Current::Direct(mapped));
        assert!(drain(&mut paths).is_empty());
        assert_eq!(paths.link().map(|l| l.describe), Some("port mapping"));
        // The same result again (a re-punch): nothing new to say.
        paths.introduction(8, &[mapped], t(t0, 100));
        paths.punch_result(8, by_mapping, t(t0, 101));
        let said = path_changes(&mut paths);
        assert!(said.is_empty(), "{said:?}");
        // The same address proven under another name, on a live connection: renamed.
        paths.introduction(9, &[mapped], t(t0, 200));
        paths.punch_result(9, direct(mapped), t(t0, 201));
        let said = path_changes(&mut paths);
        assert_eq!(
            said,
            vec![PathOutput::PathChanged {
                conn: 1,
                path: Current::Direct(mapped),
                describe: "public address",
            }]
        );
    }

    /// Regression (commit 912ed4a, found in the lab): the peer reconnects right after its
    /// previous connection closed. The closed connection's linger must not remove the routes the
    /// new introduction set up, and the punch result goes to the new connection.
    #[test]
    fn a_peer_that_reconnects_right_after_its_connection_closed_keeps_its_new_route() {
        let t0 = Instant::now();
        let mut socket = Socket::default();
        let mut paths = PeerPaths::new(stable(), PathConfig::default());
        let old = addr("203.0.113.5:4000");
        let new = addr("203.0.113.5:4001");
        paths.introduction(1, &[old], t0);
        paths.punch_result(1, direct(old), t0);
        paths.connection_up(1, stable(), "public address", t0);
        socket.run(&mut paths);
        let mut now = t0;
        run_until(&mut paths, &mut socket, &mut now, t(t0, 3000), 1, |_| true);
        paths.connection_closed(1, ConnectionEnd::Local, now);
        // The peer restarted on another port and is introduced again 100 ms later.
        now += Duration::from_millis(100);
        paths.introduction(2, &[new], now);
        socket.run(&mut paths);
        // The old route is stale: the new handshake goes over the relay until the punch proves.
        assert_eq!(socket.routes.get(&stable()), Some(&RouteTarget::Relay));
        paths.probe_authenticated(2, new);
        paths.punch_result(2, direct(new), now + Duration::from_millis(20));
        socket.run(&mut paths);
        assert_eq!(
            socket.routes.get(&stable()),
            Some(&RouteTarget::Direct(new))
        );
        // The old connection's linger ends; the new route stays.
        let outs = run_until(&mut paths, &mut socket, &mut now, t(t0, 6000), 2, |_| true);
        assert!(
            !outs
                .iter()
                .any(|(_, o)| matches!(o, PathOutput::RemoveRoutes { .. })),
            "{outs:?}"
        );
        assert_eq!(
            socket.routes.get(&stable()),
            Some(&RouteTarget::Direct(new))
        );
        assert!(socket.aliases.get(&new) == Some(&stable()));
        // The new connection starts direct, with the result kept for it.
        let start = paths.connection_up(2, stable(), "public address", now);
        assert_eq!(start, Current::Direct(new));
    }

    /// Regression (commit 50745ff): after a connection made straight to a cached address, the
    /// next introduced connection's relayed packets must appear from the stable address, not
    /// from the old connection's.
    #[test]
    fn a_second_connection_after_one_to_a_cached_address_is_relayed_from_the_stable_address() {
        let t0 = Instant::now();
        let mut socket = Socket::default();
        let mut paths = PeerPaths::new(stable(), PathConfig::default());
        let cached = addr("203.0.113.5:4000");
        // A connection the peer made to us from its real address (known by it, no route), or
        // one we dialed to its cached address.
        paths.dialing_cached(cached);
        paths.connection_up(1, cached, "cached address", t0);
        socket.run(&mut paths);
        assert_eq!(socket.relay_source, Some(cached));
        paths.connection_closed(1, ConnectionEnd::Local, t(t0, 1000));
        // The next one, right after (while the old one waits out its close), goes through an
        // introduction and the relay.
        let mut now = t(t0, 1100);
        paths.introduction(2, &[addr("203.0.113.5:4002")], now);
        socket.run(&mut paths);
        assert_eq!(
            socket.relay_source, None,
            "relayed packets from the stable address"
        );
        assert_eq!(socket.routes.get(&stable()), Some(&RouteTarget::Relay));
        run_until(&mut paths, &mut socket, &mut now, t(t0, 5000), 1, |_| true);
        assert!(!socket.claims.contains(&cached));
        assert_eq!(socket.relay_source, None);
        assert_eq!(
            paths.connection_up(2, stable(), "public address", now),
            Current::Relay
        );
        socket.run(&mut paths);
        assert_eq!(socket.relay_source, Some(stable()));
    }

    /// Found by `loopback::two_hundred_piped_chats_lose_nothing` under load: a peer's
    /// connection on its stable address (punched direct to its port) is closed by the peer,
    /// whose process exits; within the close linger the OS gives that port to another peer,
    /// whose new connection was translated to the first peer's stable address and refused.
    /// A connection the peer closed needs no linger (we send nothing more on it): its routes,
    /// claim and aliases go at once; one we closed keeps them for the close frames.
    #[test]
    fn a_connection_the_peer_closed_leaves_its_address_at_once() {
        let t0 = Instant::now();
        let real = addr("127.0.0.1:40073");
        for end in [ConnectionEnd::Remote, ConnectionEnd::Local] {
            let mut socket = Socket::default();
            let mut paths = PeerPaths::new(stable(), PathConfig::default());
            paths.introduction(1, &[real], t0);
            paths.probe_authenticated(1, real);
            paths.punch_result(1, direct(real), t0);
            paths.connection_up(1, stable(), "public address", t0);
            socket.run(&mut paths);
            assert_eq!(socket.aliases.get(&real), Some(&stable()));
            // The punching session is still running (it ends after its deadline).
            paths.connection_closed(1, end, t(t0, 100));
            socket.run(&mut paths);
            match end {
                ConnectionEnd::Remote => {
                    assert!(
                        !socket.routes.contains_key(&stable())
                            && !socket.aliases.contains_key(&real)
                            && socket.claims.is_empty(),
                        "{socket:?}"
                    );
                    assert!(paths.link().is_none());
                }
                ConnectionEnd::Local => {
                    assert_eq!(
                        socket.routes.get(&stable()),
                        Some(&RouteTarget::Direct(real)),
                        "the close frames still need the route"
                    );
                    let mut now = t(t0, 100);
                    run_until(&mut paths, &mut socket, &mut now, t(t0, 3000), 1, |_| true);
                    assert!(!socket.routes.contains_key(&stable()), "{socket:?}");
                }
            }
            // Nothing of it comes back when its punching session ends.
            paths.introduction_ended(1, t(t0, 5000));
            socket.run(&mut paths);
            assert!(
                socket.routes.is_empty() && socket.aliases.is_empty() && socket.claims.is_empty(),
                "{end:?}: {socket:?}"
            );
        }
    }

    /// Issue 12 item 3: aliases of a punch that never became a connection go when its
    /// introduction ends.
    #[test]
    fn aliases_of_an_introduction_without_a_connection_are_released_when_it_ends() {
        let t0 = Instant::now();
        let mut socket = Socket::default();
        let mut paths = PeerPaths::new(stable(), PathConfig::default());
        let (a, b) = (addr("203.0.113.5:4000"), addr("10.0.0.5:4000"));
        paths.introduction(3, &[a, b], t0);
        paths.probe_authenticated(3, a);
        paths.probe_authenticated(3, b);
        // Forged or foreign introductions alias nothing.
        paths.probe_authenticated(4, addr("198.51.100.9:9"));
        socket.run(&mut paths);
        assert_eq!(socket.aliases.len(), 2);
        paths.punch_result(3, PunchOutcome::Failed("no answer".into()), t(t0, 5000));
        paths.introduction_ended(3, t(t0, 5000));
        socket.run(&mut paths);
        assert!(socket.aliases.is_empty(), "{socket:?}");
        assert!(paths.introductions.is_empty() && paths.link.is_none());
        // With a live connection on the stable address, the connection takes them and they go
        // with its routes.
        paths.introduction(5, &[a], t(t0, 6000));
        paths.connection_up(9, stable(), "public address", t(t0, 6000));
        paths.probe_authenticated(5, a);
        paths.introduction_ended(5, t(t0, 7000));
        socket.run(&mut paths);
        assert_eq!(socket.aliases.get(&a), Some(&stable()));
        paths.connection_closed(9, ConnectionEnd::Local, t(t0, 8000));
        let mut now = t(t0, 8000);
        run_until(&mut paths, &mut socket, &mut now, t(t0, 20_000), 9, |_| {
            false
        });
        assert!(
            socket.aliases.is_empty() && socket.claims.is_empty(),
            "{socket:?}"
        );
    }

    /// Found by `loopback::two_hundred_piped_chats_lose_nothing`: a peer connects through an
    /// introduction (direct route of its stable address to its port), exits, and its next
    /// process dials us straight from another port. The first connection's route must not
    /// outlive it: the OS may give its port to another peer, whose connection would then appear
    /// on this peer's stable address.
    #[test]
    fn a_connection_from_the_real_address_after_one_on_the_stable_address_leaves_no_route() {
        let t0 = Instant::now();
        let mut socket = Socket::default();
        let mut paths = PeerPaths::new(stable(), PathConfig::default());
        let (first, second) = (addr("127.0.0.1:40000"), addr("127.0.0.1:40001"));
        paths.introduction(1, &[first], t0);
        paths.probe_authenticated(1, first);
        paths.punch_result(1, direct(first), t0);
        paths.connection_up(1, stable(), "public address", t0);
        paths.connection_closed(1, ConnectionEnd::Local, t(t0, 500));
        paths.connection_up(2, second, "the peer's address", t(t0, 600));
        socket.run(&mut paths);
        let mut now = t(t0, 600);
        run_until(&mut paths, &mut socket, &mut now, t(t0, 6000), 2, |_| true);
        paths.introduction_ended(1, now);
        socket.run(&mut paths);
        assert!(!socket.routes.contains_key(&stable()), "{socket:?}");
        assert!(!socket.aliases.contains_key(&first), "{socket:?}");
        assert!(socket.claims.contains(&second) && !socket.claims.contains(&stable()));
    }

    #[test]
    fn a_dead_path_falls_back_within_two_seconds_and_a_lossy_one_is_kept() {
        let t0 = Instant::now();
        let mut socket = Socket::default();
        let mut paths = PeerPaths::new(stable(), PathConfig::default());
        let peer = addr("203.0.113.5:4000");
        paths.introduction(1, &[peer], t0);
        paths.punch_result(1, direct(peer), t0);
        paths.connection_up(1, stable(), "public address", t0);
        socket.run(&mut paths);
        // Lossy but live: every other heartbeat answered.
        let mut now = t0;
        let counter = std::cell::Cell::new(0u32);
        let outs = run_until(&mut paths, &mut socket, &mut now, t(t0, 60_000), 1, |_| {
            counter.set(counter.get() + 1);
            counter.get().is_multiple_of(2)
        });
        assert!(
            !outs
                .iter()
                .any(|(_, o)| matches!(o, PathOutput::SetRoute { .. })),
            "{outs:?}"
        );
        // Cut: falls back within 2 s.
        let cut = now;
        let outs = run_until(
            &mut paths,
            &mut socket,
            &mut now,
            cut + Duration::from_secs(10),
            1,
            |_| false,
        );
        let (at, _) = outs
            .iter()
            .find(|(_, o)| {
                matches!(
                    o,
                    PathOutput::SetRoute {
                        target: RouteTarget::Relay,
                        ..
                    }
                )
            })
            .expect("fell back to the relay");
        assert!(*at - cut <= Duration::from_secs(2), "after {:?}", *at - cut);
        assert_eq!(socket.routes.get(&stable()), Some(&RouteTarget::Relay));
        assert!(outs
            .iter()
            .any(|(_, o)| matches!(o, PathOutput::Repunch { conn: 1 })));
    }

    /// Regression (found by CI in the lab matrix, `sym / full`, `early / open`, `cgnat / sym`
    /// impaired): a connection direct over an address learned from the peer's probe (or a
    /// birthday-punched port), which is never among the candidates, got a second introduction
    /// (our NAT measured while the first punch was running). The route went back to the relay
    /// as "stale" while the selector stayed direct, and the second punch proving the same
    /// address changed nothing: `ping` then said relayed for good. A live path that answers
    /// stays; one that has gone silent goes to the relay with the selector, and comes back at
    /// its next answer.
    #[test]
    fn a_second_introduction_keeps_a_live_direct_path_that_is_not_a_candidate() {
        let t0 = Instant::now();
        let mut socket = Socket::default();
        let mut paths = PeerPaths::new(stable(), PathConfig::default());
        let registered = addr("203.0.113.5:4000");
        let learned = addr("203.0.113.5:6800");
        paths.introduction(1, &[registered], t0);
        paths.probe_authenticated(1, learned);
        paths.punch_result(1, direct(learned), t(t0, 30));
        paths.connection_up(
            1,
            stable(),
            "address learned from the peer's probe",
            t(t0, 40),
        );
        socket.run(&mut paths);
        assert_eq!(
            socket.routes.get(&stable()),
            Some(&RouteTarget::Direct(learned))
        );
        let mut now = t(t0, 40);
        run_until(&mut paths, &mut socket, &mut now, t(t0, 1_000), 1, |_| true);

        // The second introduction (the candidates again, without the learned address).
        paths.introduction(2, &[registered], now);
        let outs = socket.run(&mut paths);
        assert_eq!(
            socket.routes.get(&stable()),
            Some(&RouteTarget::Direct(learned)),
            "{outs:?}"
        );
        paths.probe_authenticated(2, learned);
        paths.punch_result(2, direct(learned), now);
        socket.run(&mut paths);
        assert_eq!(paths.link().map(|l| l.path), Some(Current::Direct(learned)));
        assert_eq!(
            socket.routes.get(&stable()),
            Some(&RouteTarget::Direct(learned))
        );

        // Silent for longer than `silence`, not yet given up: a third introduction moves the
        // packets to the relay, and the selector says so.
        let quiet_until = now + Duration::from_millis(1_700);
        run_until(&mut paths, &mut socket, &mut now, quiet_until, 1, |_| false);
        assert_eq!(paths.link().map(|l| l.path), Some(Current::Direct(learned)));
        paths.introduction(3, &[registered], now);
        let outs = socket.run(&mut paths);
        assert_eq!(
            socket.routes.get(&stable()),
            Some(&RouteTarget::Relay),
            "{outs:?}"
        );
        assert!(
            outs.iter().any(|o| matches!(
                o,
                PathOutput::PathChanged {
                    conn: 1,
                    path: Current::Relay,
                    ..
                }
            )),
            "{outs:?}"
        );
        assert_eq!(paths.link().map(|l| l.path), Some(Current::Relay));
        // Its next answer moves the packets back.
        let back_until = now + Duration::from_secs(2);
        run_until(&mut paths, &mut socket, &mut now, back_until, 1, |_| true);
        assert_eq!(paths.link().map(|l| l.path), Some(Current::Direct(learned)));
        assert_eq!(
            socket.routes.get(&stable()),
            Some(&RouteTarget::Direct(learned))
        );
    }

    #[test]
    fn a_public_address_change_repunches_at_once_and_failures_are_explained_once() {
        let t0 = Instant::now();
        let mut paths = PeerPaths::new(stable(), PathConfig::default());
        paths.introduction(1, &[addr("203.0.113.5:4000")], t0);
        paths.connection_up(1, stable(), "public address", t0);
        paths.punch_result(1, PunchOutcome::Failed("no answer".into()), t0);
        let outs = drain(&mut paths);
        assert!(outs.contains(&PathOutput::PunchFailed {
            conn: 1,
            reason: "no answer".into(),
            explain: true
        }));
        // The retry is backed off; an address change punches at once.
        paths.handle_timeout(t(t0, 100));
        assert!(drain(&mut paths).is_empty());
        paths.address_changed(t(t0, 100));
        assert_eq!(drain(&mut paths), vec![PathOutput::Repunch { conn: 1 }]);
        paths.introduction(2, &[addr("203.0.113.5:4000")], t(t0, 200));
        paths.punch_result(2, PunchOutcome::Failed("again".into()), t(t0, 5200));
        assert!(drain(&mut paths).contains(&PathOutput::PunchFailed {
            conn: 1,
            reason: "again".into(),
            explain: false
        }));
    }

    /// A connection that went direct over IPv4 while the peer offered IPv6 can be moved: a
    /// later punch that proves the IPv6 address switches the route to it; once there (or
    /// without an IPv6 address of the peer) there is nothing to upgrade.
    #[test]
    fn an_ipv4_connection_moves_to_ipv6_when_a_later_punch_proves_it() {
        let t0 = Instant::now();
        let v4 = addr("203.0.113.5:4000");
        let v6 = addr("[2001:db8:1::2]:4000");
        let mut socket = Socket::default();
        let mut paths = PeerPaths::new(stable(), PathConfig::default());
        assert!(!paths.ipv6_upgrade_possible(), "no connection");
        paths.introduction(1, &[v4, v6], t0);
        paths.connection_up(1, stable(), "public address", t0);
        paths.punch_result(1, direct(v4), t0);
        socket.run(&mut paths);
        assert_eq!(paths.link().map(|l| l.path), Some(Current::Direct(v4)));
        assert!(paths.ipv6_upgrade_possible());
        // The punch the driver starts then (a new introduction) proves the IPv6 address.
        paths.introduction(2, &[v4, v6], t(t0, 1000));
        paths.punch_result(2, direct(v6), t(t0, 1100));
        socket.run(&mut paths);
        assert_eq!(paths.link().map(|l| l.path), Some(Current::Direct(v6)));
        assert_eq!(socket.routes.get(&stable()), Some(&RouteTarget::Direct(v6)));
        assert!(!paths.ipv6_upgrade_possible(), "already on IPv6");
        // A later punch that proves IPv4 (the other side's punch for IPv6, where we answer the
        // first probe that reaches us) leaves the IPv6 path in use.
        paths.introduction(3, &[v4, v6], t(t0, 2000));
        paths.punch_result(3, direct(v4), t(t0, 2100));
        socket.run(&mut paths);
        assert_eq!(paths.link().map(|l| l.path), Some(Current::Direct(v6)));
        // A peer whose introduction offers no IPv6 address (an IPv4-mapped one is IPv4).
        let mut paths = PeerPaths::new(stable(), PathConfig::default());
        paths.introduction(1, &[v4, addr("[::ffff:203.0.113.5]:4001")], t0);
        paths.connection_up(1, stable(), "public address", t0);
        paths.punch_result(1, direct(v4), t0);
        drain(&mut paths);
        assert!(!paths.ipv6_upgrade_possible());
        // With our IPv6 proven, a connection that went direct over IPv4 punches once more for
        // IPv6 IPV6_UPGRADE_AFTER later, and only once (an IPv4 answer again changes nothing).
        let mut paths = PeerPaths::new(stable(), PathConfig::default());
        paths.our_ipv6(true);
        paths.introduction(1, &[v4, v6], t0);
        paths.connection_up(1, stable(), "public address", t0);
        paths.punch_result(1, direct(v4), t0);
        assert!(!drain(&mut paths).contains(&PathOutput::PunchForIpv6 { conn: 1 }));
        assert!(paths.poll_timeout() <= Some(t0 + IPV6_UPGRADE_AFTER));
        let mut repunches = Vec::new();
        let mut now = t0;
        while now < t(t0, 60_000) {
            paths.handle_timeout(now);
            for out in drain(&mut paths) {
                match out {
                    PathOutput::PunchForIpv6 { conn: 1 } => repunches.push(now),
                    PathOutput::Repunch { .. } => panic!("no other punch"),
                    PathOutput::Heartbeat { conn: 1, addr } => {
                        paths.heartbeat_answered(1, addr, now)
                    }
                    _ => {}
                }
            }
            if repunches.len() == 1 && paths.introductions.len() == 1 {
                // The upgrade punch proves IPv4 again.
                paths.introduction(2, &[v4, v6], now);
                paths.punch_result(2, direct(v4), now);
            }
            now += Duration::from_millis(100);
        }
        assert_eq!(repunches, vec![t0 + IPV6_UPGRADE_AFTER], "once, on time");
        assert_eq!(paths.link().map(|l| l.path), Some(Current::Direct(v4)));
        // Without our IPv6 proven: none.
        let mut paths = PeerPaths::new(stable(), PathConfig::default());
        paths.introduction(1, &[v4, v6], t0);
        paths.connection_up(1, stable(), "public address", t0);
        paths.punch_result(1, direct(v4), t0);
        paths.handle_timeout(t(t0, 10_000));
        assert!(!drain(&mut paths).contains(&PathOutput::PunchForIpv6 { conn: 1 }));
        // A relayed connection with an IPv6 peer: a punch may still bring it to IPv6.
        let mut paths = PeerPaths::new(stable(), PathConfig::default());
        paths.introduction(1, &[v4, v6], t0);
        paths.connection_up(1, stable(), "relay", t0);
        drain(&mut paths);
        assert_eq!(paths.link().map(|l| l.path), Some(Current::Relay));
        assert!(paths.ipv6_upgrade_possible());
    }

    #[test]
    fn introductions_and_aliases_are_bounded() {
        let t0 = Instant::now();
        let mut socket = Socket::default();
        let mut paths = PeerPaths::new(stable(), PathConfig::default());
        for nonce in 0..100u64 {
            paths.introduction(nonce, &[], t0);
            for port in 0..40u16 {
                paths.probe_authenticated(nonce, SocketAddr::from(([10, 0, nonce as u8, 1], port)));
            }
            socket.run(&mut paths);
        }
        assert!(paths.introductions.len() <= MAX_INTRODUCTIONS);
        assert!(socket.aliases.len() <= MAX_INTRODUCTIONS * MAX_ALIASES_PER_INTRODUCTION);
        for nonce in 0..100u64 {
            paths.introduction_ended(nonce, t0);
        }
        socket.run(&mut paths);
        assert!(socket.aliases.is_empty());
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Input {
            Introduction(u8, Vec<u8>),
            Probe(u8, u8),
            Punch(u8, Option<u8>),
            Ended(u8),
            Cached(u8),
            CachedFailed,
            Up(u8, Option<u8>),
            Closed(u8, bool),
            Answered(u8, u8),
            AddressChanged,
            Wait(u16),
        }

        fn real(n: u8) -> SocketAddr {
            SocketAddr::from(([203, 0, 113, n % 8], 4000))
        }

        fn input() -> impl Strategy<Value = Input> {
            prop_oneof![
                (0u8..6, proptest::collection::vec(0u8..8, 0..4))
                    .prop_map(|(n, c)| Input::Introduction(n, c)),
                (0u8..8, 0u8..8).prop_map(|(n, a)| Input::Probe(n, a)),
                (0u8..8, proptest::option::of(0u8..8)).prop_map(|(n, a)| Input::Punch(n, a)),
                (0u8..8).prop_map(Input::Ended),
                (0u8..8).prop_map(Input::Cached),
                Just(Input::CachedFailed),
                (0u8..4, proptest::option::of(0u8..8)).prop_map(|(c, a)| Input::Up(c, a)),
                (0u8..4, any::<bool>()).prop_map(|(c, by_peer)| Input::Closed(c, by_peer)),
                (0u8..4, 0u8..8).prop_map(|(c, a)| Input::Answered(c, a)),
                Just(Input::AddressChanged),
                (0u16..5000).prop_map(Input::Wait),
            ]
        }

        proptest! {
            /// Whatever happens in whatever order: a direct route only to an address proven by
            /// a punch of this peer (or dialed from the cache, or the connection's own), an alias
            /// only from an authenticated probe of a known introduction, and once every
            /// connection closed and every introduction ended, no alias and no claim is left.
            #[test]
            fn outputs_stay_consistent(inputs in proptest::collection::vec(input(), 0..60)) {
                let t0 = Instant::now();
                let mut now = t0;
                let mut socket = Socket::default();
                let mut paths = PeerPaths::new(stable(), PathConfig::default());
                let mut proven: HashSet<SocketAddr> = HashSet::new();
                let mut probed: HashSet<SocketAddr> = HashSet::new();
                let mut known: HashSet<u64> = HashSet::new();
                let mut conns: HashSet<ConnId> = HashSet::new();
                let mut quinn_addrs: HashSet<SocketAddr> = HashSet::from([stable()]);
                // A cached dial whose end never came holds its route (as it should).
                let mut dialing = false;
                for input in inputs {
                    match input {
                        Input::Introduction(n, c) => {
                            let c: Vec<SocketAddr> = c.into_iter().map(real).collect();
                            paths.introduction(n.into(), &c, now);
                            known.insert(n.into());
                        }
                        Input::Probe(n, a) => {
                            if known.contains(&u64::from(n)) {
                                probed.insert(real(a));
                            }
                            paths.probe_authenticated(n.into(), real(a));
                        }
                        Input::Punch(n, a) => {
                            let outcome = match a {
                                Some(a) => {
                                    if known.contains(&u64::from(n)) {
                                        proven.insert(real(a));
                                    }
                                    direct(real(a))
                                }
                                None => PunchOutcome::Failed("no".into()),
                            };
                            paths.punch_result(n.into(), outcome, now);
                        }
                        Input::Ended(n) => {
                            paths.introduction_ended(n.into(), now);
                            known.remove(&u64::from(n));
                        }
                        Input::Cached(a) => {
                            dialing = true;
                            proven.insert(real(a));
                            paths.dialing_cached(real(a));
                        }
                        Input::CachedFailed => {
                            dialing = false;
                            paths.cached_dial_failed();
                        }
                        Input::Up(c, a) => {
                            dialing = false;
                            let q = a.map_or(stable(), real);
                            quinn_addrs.insert(q);
                            conns.insert(c.into());
                            paths.connection_up(c.into(), q, "x", now);
                        }
                        Input::Closed(c, by_peer) => {
                            conns.remove(&u64::from(c));
                            let end = if by_peer { ConnectionEnd::Remote } else { ConnectionEnd::Local };
                            paths.connection_closed(c.into(), end, now)
                        }
                        Input::Answered(c, a) => paths.heartbeat_answered(c.into(), real(a), now),
                        Input::AddressChanged => paths.address_changed(now),
                        Input::Wait(ms) => {
                            now += Duration::from_millis(ms.into());
                            if paths.poll_timeout().is_some_and(|at| at <= now) {
                                paths.handle_timeout(now);
                                // Nothing due is left: a driver waking at the next timeout
                                // never spins.
                                prop_assert!(paths.poll_timeout().is_none_or(|at| at > now));
                            }
                        }
                    }
                    for out in drain(&mut paths) {
                        match &out {
                            PathOutput::SetRoute { quinn_addr, target: RouteTarget::Direct(a) } => {
                                prop_assert!(
                                    a == quinn_addr || proven.contains(a),
                                    "direct route to unproven {a}"
                                );
                            }
                            PathOutput::AddAlias { real, quinn_addr } => {
                                prop_assert_eq!(*quinn_addr, stable());
                                prop_assert!(probed.contains(real), "alias of unprobed {}", real);
                            }
                            PathOutput::SetRoute { quinn_addr, .. }
                            | PathOutput::Claim { quinn_addr } => {
                                prop_assert!(quinn_addrs.contains(quinn_addr));
                            }
                            _ => {}
                        }
                        socket.apply(&out);
                    }
                    // Where the live connection's packets go is what its selector says (and
                    // so what the user is told).
                    if let Some(link) = paths.link.as_ref().filter(|l| l.closed_at.is_none()) {
                        let routed = socket
                            .routes
                            .get(&link.quinn_addr)
                            .copied()
                            .unwrap_or(RouteTarget::Direct(link.quinn_addr));
                        let said = match link.selector.current() {
                            Current::Relay => RouteTarget::Relay,
                            Current::Direct(a) => RouteTarget::Direct(a),
                        };
                        prop_assert_eq!(routed, said, "the route and the selector disagree");
                    }
                    prop_assert!(paths.poll_timeout().is_none_or(|at| at + Duration::from_secs(120) > now));
                }
                // Everything ends.
                for c in conns.drain() {
                    paths.connection_closed(c, ConnectionEnd::Local, now);
                }
                for n in 0..8u64 {
                    paths.introduction_ended(n, now);
                }
                now += PENDING_PATH_TTL + CLOSE_LINGER;
                paths.handle_timeout(now);
                socket.run(&mut paths);
                prop_assert!(socket.aliases.keys().all(|a| socket.routes.values().any(|r| *r == RouteTarget::Direct(*a))),
                    "aliases left: {:?}", socket);
                prop_assert!(socket.claims.is_empty(), "claims left: {:?}", socket);
                prop_assert!(paths.link.is_none() && paths.lingering.is_empty());
                prop_assert!(paths.introductions.is_empty() && paths.pending.is_none());
                if !dialing {
                    prop_assert!(socket.routes.is_empty(), "routes left: {:?}", socket);
                    prop_assert!(paths.is_idle());
                }
                prop_assert_eq!(paths.poll_timeout(), None);
            }
        }
    }
}
