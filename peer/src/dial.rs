//! Connecting to a peer: cache first, then an introduction by the rendezvous; the connection
//! starts on the relay and moves to a direct path as soon as punching proves one.
//!
//! Why it is a module of its own: connecting is the one place where the cache, the rendezvous's
//! introduction, punching and the relay meet for a single peer, in an order that decides how fast
//! the first byte flows (the relay at once, direct when proven).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail};
use common::{ControlMessage, ErrorCode, PeerId};

use common::message::FirstFlight;
use tokio::sync::mpsc;
use transport::{DemuxSocket, VirtualPacket, VirtualSink};

use crate::cache::PeerCache;
use crate::node::Node;
use crate::paths::{PathKeeper, FIRST_PROBES_WAIT};
use crate::relay;
use crate::tasks::TaskSet;

/// Datagrams of an early handshake kept while its introduction is under way: its first
/// flight, and quinn's retransmissions should the introduction take that long.
const EARLY_CAPTURE: usize = 8;
/// Longest wait for quinn's first datagram of a handshake (it is sent at once).
const FIRST_FLIGHT_WAIT: Duration = Duration::from_millis(100);
/// How long an abandoned early handshake keeps its capture route: until quinn's close of it
/// has gone into the capture rather than out of the socket (at once, normally), at most this.
const ABANDON_GRACE: Duration = Duration::from_secs(1);

/// A handshake started before its introduction (see [`establish`]): its datagrams are
/// captured, not sent, until the introduction says where the peer is; the first one rides in
/// the `connect` (the rendezvous hands it to the peer with the introduction, so the peer's
/// answer is on its way a round trip to the rendezvous sooner than the relay could carry it).
/// [`EarlyDial::release`] sends what was captured the way quinn would have and hands back the
/// handshake; dropped instead, the handshake is abandoned and its capture route removed once
/// quinn's close of it is captured.
struct EarlyDial {
    /// `None` once released.
    connecting: Option<quinn::Connecting>,
    captured: Option<mpsc::Receiver<VirtualPacket>>,
    /// What was captured so far (the first flight first).
    held: Vec<Vec<u8>>,
    capture: VirtualSink,
    stable: SocketAddr,
    socket: Arc<DemuxSocket>,
    tasks: TaskSet,
}

impl EarlyDial {
    /// Starts the handshake with `peer` at its stable address into a capture, and waits for
    /// its first datagram; `None` when the address has a route already (another connection to
    /// the peer, a cached dial: the handshake then starts after the introduction, as before)
    /// or quinn refuses to start.
    async fn start(node: &Node, tasks: &TaskSet, peer: PeerId, stable: SocketAddr) -> Option<Self> {
        let (tx, rx) = mpsc::channel(EARLY_CAPTURE);
        let capture = VirtualSink::new(*peer.as_bytes(), tx);
        if !node.socket.set_route_if_none(stable, capture.clone()) {
            return None;
        }
        let mut early = EarlyDial {
            connecting: None,
            captured: Some(rx),
            held: Vec::new(),
            capture,
            stable,
            socket: node.socket.clone(),
            tasks: tasks.clone(),
        };
        early.connecting = Some(node.start_dial(peer, stable).ok()?);
        let first = tokio::time::timeout(FIRST_FLIGHT_WAIT, early.captured.as_mut()?.recv()).await;
        if let Ok(Some(packet)) = first {
            tracing::debug!(%peer, len = packet.data.len(), "first flight captured for the introduction");
            early.held.push(packet.data);
        }
        Some(early)
    }

    /// The handshake's first datagram, for the `connect`.
    fn first_flight(&self) -> Option<FirstFlight> {
        self.held.first().cloned().and_then(FirstFlight::new)
    }

    /// The introduction is in and the socket's route for the peer set (the relay, or a proven
    /// direct path): the capture route goes, what it captured leaves the way quinn's packets
    /// to the peer go now (the first flight too: it reaches a peer whose introduction did not
    /// carry it, and is a duplicate quinn drops for one whose did), and the handshake goes on.
    fn release(mut self) -> Option<quinn::Connecting> {
        self.socket.remove_route_into(self.stable, &self.capture);
        if let Some(mut captured) = self.captured.take() {
            while let Ok(packet) = captured.try_recv() {
                self.held.push(packet.data);
            }
        }
        for datagram in std::mem::take(&mut self.held) {
            // Sent as quinn sends (routes, relay channels); a send error is a lost datagram,
            // which quinn retransmits.
            let _ = quinn::AsyncUdpSocket::try_send(
                &*self.socket,
                &quinn::udp::Transmit {
                    destination: self.stable,
                    ecn: None,
                    contents: &datagram,
                    segment_size: None,
                    src_ip: None,
                },
            );
        }
        self.connecting.take()
    }
}

impl Drop for EarlyDial {
    fn drop(&mut self) {
        if self.captured.is_none() {
            // Released: the capture route is gone already.
            return;
        }
        let Some(connecting) = self.connecting.take() else {
            // quinn refused to start: nothing was sent.
            self.socket.remove_route_into(self.stable, &self.capture);
            return;
        };
        // Abandoned (the introduction failed): quinn closes the handshake once its last
        // handle is gone, and that close must go into the capture, not to the stable address.
        drop(connecting);
        let (socket, stable, capture) = (self.socket.clone(), self.stable, self.capture.clone());
        let captured = self.captured.take();
        let spawned = self.tasks.spawn(async move {
            if let Some(mut captured) = captured {
                // What was captured before the drop is not the close.
                while captured.try_recv().is_ok() {}
                let _ = tokio::time::timeout(ABANDON_GRACE, captured.recv()).await;
            }
            socket.remove_route_into(stable, &capture);
        });
        if !spawned {
            // Shutting down: nothing is sent any more.
            self.socket.remove_route_into(self.stable, &self.capture);
        }
    }
}

/// The path a connection was made on, for the user.
pub struct Via {
    /// `direct to ADDR (how)` or `relayed via rendezvous (UDP)`.
    pub text: String,
    /// How the path was found, for the link's later messages.
    pub describe: &'static str,
    /// The path `text` names (see [`crate::paths::PathKeeper::start_link`]).
    pub path: punch::path::Current,
}

impl Via {
    fn direct(addr: SocketAddr, describe: &'static str) -> Via {
        Via {
            text: format!("direct to {addr} ({describe})"),
            describe,
            path: punch::path::Current::Direct(addr),
        }
    }

    fn relayed(label: &str) -> Via {
        Via {
            text: label.to_owned(),
            describe: "public address",
            path: punch::path::Current::Relay,
        }
    }
}

/// Cache first; on a miss or a failure, ask the rendezvous to introduce us. The connection
/// starts on the relay at once while punching runs alongside; its link moves it to the direct
/// path as soon as one is proven. quinn always dials the peer's stable address, so the path can
/// change under the connection.
pub async fn establish(
    keeper: &PathKeeper,
    cache: &mut PeerCache,
    peer: PeerId,
    dial_timeout: Duration,
    verbose: bool,
) -> anyhow::Result<(quinn::Connection, Via)> {
    let socket = &keeper.node.socket;
    let console = &keeper.console;
    let stable = relay::stable_addr(&peer);
    // With --relay-only no direct address is dialed, not even a cached one.
    if let Some(entry) = cache.get(&peer).filter(|_| !keeper.relay_only) {
        // The address that worked last time. It only works without an introduction when the
        // peer's NAT lets anyone in (or there is none), and then it answers at once: keep this
        // attempt short.
        let cached = entry.candidates[0].addr;
        keeper.dialing_cached(peer, cached);
        if verbose {
            console
                .error(format!("dialing cached address {cached}"))
                .await;
        }
        let timeout = dial_timeout.min(Duration::from_secs(1));
        match keeper.node.dial(peer, stable, timeout).await {
            Ok(conn) => return Ok((conn, Via::direct(cached, "cached address"))),
            Err(e) => {
                keeper.cached_dial_failed(peer);
                console
                    .error(format!(
                        "cached address {cached} of {peer} failed ({}); asking the rendezvous",
                        e.to_string()
                            .replace(&stable.to_string(), &cached.to_string())
                    ))
                    .await;
                if let Err(e) = cache.remove(&peer) {
                    console
                        .error(format!("warning: cannot write the peer cache: {e}"))
                        .await;
                }
            }
        }
    }
    // The handshake starts now, into a capture: its first datagram goes with the `connect`.
    let early = EarlyDial::start(&keeper.node, &keeper.tasks, peer, stable).await;
    let connect = ControlMessage::Connect {
        id: peer,
        first_flight: early.as_ref().and_then(EarlyDial::first_flight),
    };
    let (candidates, introduction, peer_nat, no_relay) =
        match keeper.session.request(&connect).await? {
            ControlMessage::Punch {
                candidates,
                nonce,
                key,
                nat,
                no_relay,
                ..
            } => (
                keeper.screen_candidates(&candidates),
                punch::Introduction { nonce, key },
                nat,
                // The server's words: escaped before they are printed.
                no_relay.map(|why| crate::files::printable(&why)),
            ),
            ControlMessage::Error {
                code: ErrorCode::NotFound,
                ..
            } => {
                bail!("peer {peer} is not registered with the rendezvous")
            }
            ControlMessage::Error {
                code: ErrorCode::PeerOffline,
                message,
            } => bail!("{message}"),
            ControlMessage::Error { code, message } => {
                bail!("the rendezvous refused ({code:?}): {message}")
            }
            other => bail!("unexpected reply `{}` from the rendezvous", other.kind()),
        };
    if let Some(why) = no_relay.as_ref().filter(|_| keeper.relay_only) {
        bail!("the rendezvous cannot relay to {peer} (and --relay-only rules out a direct path): {why}");
    }
    if candidates.is_empty() && !keeper.relay_only {
        bail!("the rendezvous knows no address for {peer}");
    }
    if verbose {
        let list: Vec<String> = candidates
            .iter()
            .map(|c| format!("{} ({})", c.addr, c.describe()))
            .collect();
        console
            .error(format!("candidates of {peer}: {}", list.join(", ")))
            .await;
    }
    if candidates.is_empty() {
        // --relay-only: nothing to remember.
    } else if let Err(e) = cache.put(peer, candidates.clone()) {
        console
            .error(format!("warning: cannot write the peer cache: {e}"))
            .await;
    }
    // The relay stream opens just after registration: give it a moment.
    keeper.relay.wait_ready(Duration::from_secs(2)).await;
    keeper.prepare(peer, introduction.nonce, &candidates);
    // Started at once; the result is awaited below (no relay) or in a task of the endpoint.
    let (punch_tx, punch) = tokio::sync::oneshot::channel();
    let (first_sent_tx, first_sent) = tokio::sync::oneshot::channel();
    {
        let keeper2 = keeper.clone();
        let candidates = candidates.clone();
        keeper.tasks.spawn(async move {
            let state = keeper2
                .punch_telling_first_sent(
                    peer,
                    introduction,
                    punch::Role::Initiator,
                    &candidates,
                    peer_nat,
                    Some(first_sent_tx),
                )
                .await;
            let _ = punch_tx.send(state);
        });
    }
    // Our relayed handshake ends the responder's hold on its probes: it goes out only once our
    // opening probes have opened our NAT toward the responder (at once, normally; bounded in
    // case the session never starts).
    let _ = tokio::time::timeout(FIRST_PROBES_WAIT, first_sent).await;
    // A relay that cannot reach the peer (see `no_relay`) is no relay for this connection.
    let relayed = keeper.relay.is_ready() && no_relay.is_none();
    if !relayed {
        // No relay: the connection has to wait for a direct path.
        let path = match punch.await {
            Ok(punch::State::Direct(path)) => {
                keeper.report_punch(peer, true);
                path
            }
            Ok(punch::State::Failed(report)) => {
                keeper.report_punch(peer, false);
                match no_relay {
                    Some(why) => bail!(
                        "no direct path to {peer} ({}), and the rendezvous cannot relay to it: \
                         {why}",
                        report.reason()
                    ),
                    None => bail!(
                        "no direct path to {peer}, and the relay is not available: {}",
                        report.reason()
                    ),
                }
            }
            _ => bail!("punching to {peer} stopped"),
        };
        // The peer's machine routed the stable address to the proven path.
        let conn = dial_now(keeper, early, peer, stable, dial_timeout)
            .await
            .map_err(|e| anyhow!("cannot reach {peer} at {}: {e}", path.addr))?;
        return Ok((
            conn,
            Via::direct(path.addr, path.kind.describe_at(path.addr)),
        ));
    }
    // Relay first, direct as soon as proven: the punch result goes to the peer's machine, which
    // moves the connection (or, while the handshake is still running, the stable address's
    // route) to the proven path.
    let proven: Arc<Mutex<Option<&'static str>>> = Arc::default();
    {
        let keeper = keeper.clone();
        let proven = proven.clone();
        keeper.tasks.clone().spawn(async move {
            match punch.await {
                Ok(punch::State::Direct(path)) => {
                    keeper.report_punch(peer, true);
                    if let Ok(mut how) = proven.lock() {
                        *how = Some(path.kind.describe_at(path.addr));
                    }
                }
                Ok(punch::State::Failed(_)) => keeper.report_punch(peer, false),
                _ => {}
            }
        });
    }
    let conn = dial_now(keeper, early, peer, stable, dial_timeout)
        .await
        .map_err(|e| anyhow!("cannot reach {peer} through the relay: {e}"))?;
    let via = match socket.route_of(stable) {
        transport::PathTarget::Udp(addr) => {
            // The punch task may not have recorded its path yet when the handshake ends right
            // after the route moved: then the kind is that of the candidate at the address
            // (not a blanket "public address", which mislabelled port mappings).
            let how = proven
                .lock()
                .ok()
                .and_then(|h| *h)
                .unwrap_or_else(|| path_kind_of(addr, &candidates));
            Via::direct(addr, how)
        }
        transport::PathTarget::Virtual(_) => Via::relayed(keeper.relay_label()),
    };
    Ok((conn, via))
}

/// The handshake with `peer` from here: the early one, released, or a new one.
async fn dial_now(
    keeper: &PathKeeper,
    early: Option<EarlyDial>,
    peer: PeerId,
    stable: SocketAddr,
    timeout: Duration,
) -> Result<quinn::Connection, crate::node::DialError> {
    match early.and_then(EarlyDial::release) {
        Some(connecting) => Node::finish_dial(connecting, stable, timeout).await,
        None => keeper.node.dial(peer, stable, timeout).await,
    }
}

/// How the direct path to `addr` was found, from the introduction's `candidates`: the kind of
/// the candidate at that address, else learned from the peer's probe.
fn path_kind_of(addr: SocketAddr, candidates: &[common::message::Candidate]) -> &'static str {
    candidates
        .iter()
        .find(|c| c.addr == addr)
        .map_or(punch::PathKind::PeerReflexive.describe(), |c| c.describe())
}

/// Answers the streams the other side opens on a connection we made: `ping` streams are served,
/// anything else is refused (chat and files are served by `peer listen`). Ends with the
/// connection.
pub fn answer_pings(keeper: PathKeeper, conn: quinn::Connection) {
    let tasks = keeper.tasks.clone();
    tasks.clone().spawn(async move {
        loop {
            let Ok((mut tx, mut rx)) = conn.accept_bi().await else {
                break;
            };
            match crate::chat::accept(&mut tx, &mut rx).await {
                Ok(common::message::PeerApp::Ping) => {
                    // In the endpoint's task set (not a set of this task's, which would be
                    // aborted but not awaited when the shutdown drops this task): close()
                    // waits for it. It ends with its stream, so with the connection too.
                    tasks.spawn(crate::ping::serve(tx, rx, keeper.clone()));
                }
                Ok(app) => {
                    let refusal = common::PeerMessage::Error {
                        message: format!(
                            "this peer does not serve {app:?} on a connection it made; \
                             it serves only ping here"
                        ),
                    };
                    let _ = common::frame_io::write_frame(&mut tx, &refusal.encode()).await;
                    let _ = tx.finish();
                }
                Err(_) => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::message::{Candidate, CandidateKind};

    fn node() -> (Node, mpsc::Receiver<transport::StunDatagram>) {
        let identity = Arc::new(certs::Identity::generate().unwrap());
        Node::bind(
            "127.0.0.1:0".parse().unwrap(),
            identity,
            transport::TransportSettings::default(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn an_early_handshake_is_captured_then_released_into_the_route_or_abandoned_cleanly() {
        let (node, _stun) = node();
        let (_shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
        let tasks = TaskSet::new(shutdown);
        let peer = PeerId::from_key_digest(&[9; 32]);
        let stable = relay::stable_addr(&peer);

        // Captured: quinn's Initial, padded to 1,200 bytes, a QUIC long header; nothing sent.
        let early = EarlyDial::start(&node, &tasks, peer, stable)
            .await
            .expect("no route yet");
        let flight = early.first_flight().expect("the first flight");
        assert_eq!(flight.as_bytes().len(), 1200);
        assert_eq!(flight.as_bytes()[0] & 0xf0, 0xc0, "an Initial");
        // A second early dial to the same peer finds the route taken.
        assert!(EarlyDial::start(&node, &tasks, peer, stable)
            .await
            .is_none());

        // Released once the introduction set the peer's route: the captured datagrams leave
        // through it, the first flight first.
        let (tx, mut routed) = mpsc::channel(16);
        let relay_sink = VirtualSink::new(*peer.as_bytes(), tx);
        node.socket
            .set_route(stable, transport::PathTarget::Virtual(relay_sink.clone()));
        let connecting = early.release().expect("the handshake goes on");
        assert_eq!(routed.recv().await.unwrap().data, flight.as_bytes());
        // The relay's route stays: the capture's owner removes only its own.
        assert!(
            matches!(node.socket.route_of(stable), transport::PathTarget::Virtual(s) if s.is(&relay_sink))
        );
        drop(connecting);
        node.socket
            .set_route(stable, transport::PathTarget::Udp(stable));

        // Abandoned (the introduction was refused): the route goes once quinn's close of the
        // handshake has been captured.
        let early = EarlyDial::start(&node, &tasks, peer, stable)
            .await
            .expect("the route is free again");
        drop(early);
        // The abandon is the only task of the set: it ends once the close was captured (or
        // after its grace), having removed the route.
        tokio::time::timeout(Duration::from_secs(10), tasks.join())
            .await
            .expect("the abandon ends");
        assert!(
            matches!(node.socket.route_of(stable), transport::PathTarget::Udp(a) if a == stable),
            "the capture route stayed"
        );
        assert!(EarlyDial::start(&node, &tasks, peer, stable)
            .await
            .is_some());
    }

    #[test]
    fn a_direct_path_found_before_its_punch_reported_is_named_by_its_candidate() {
        let candidates = [
            Candidate {
                addr: "203.0.113.21:15352".parse().unwrap(),
                kind: CandidateKind::Observed,
            },
            Candidate {
                addr: "203.0.113.21:56998".parse().unwrap(),
                kind: CandidateKind::Mapped,
            },
        ];
        let kind = |a: &str| path_kind_of(a.parse().unwrap(), &candidates);
        assert_eq!(kind("203.0.113.21:56998"), "port mapping");
        assert_eq!(kind("203.0.113.21:15352"), "public address");
        assert_eq!(
            kind("203.0.113.21:40000"),
            "address learned from the peer's probe"
        );
    }
}
