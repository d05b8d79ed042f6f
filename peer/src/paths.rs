//! Keeping direct paths working: answer introductions (the other side punching, maybe again
//! after its NAT rebinds), watch our own public mapping, and re-punch every open connection when
//! it changes. A re-punched path that differs from the one quinn knows is installed as a route
//! in the socket, so the QUIC connection and its streams carry on untouched.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::message::Candidate;
use common::stun::{self, ProbeTag, StunPacket};
use common::{ControlMessage, PeerId};
use punch::{Role, State};
use tokio::sync::{mpsc, watch};

use crate::console::Console;
use crate::node::Node;
use crate::punching::{self, Router};
use crate::session::{ServerEvent, Session, SessionState};

/// How often we ask the rendezvous (over STUN) how it sees us. Also keeps the NAT mapping
/// towards it fresh.
pub const MAPPING_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Most punching sessions run at once in answer to introductions.
const MAX_RESPONDER_PUNCHES: usize = 64;

/// Open peer connections, by peer.
#[derive(Clone, Default)]
pub struct Connections {
    inner: Arc<Mutex<HashMap<PeerId, quinn::Connection>>>,
}

impl Connections {
    /// Records a connection (replacing an older one to the same peer).
    pub fn insert(&self, peer: PeerId, conn: quinn::Connection) {
        if let Ok(mut map) = self.inner.lock() {
            map.insert(peer, conn);
        }
    }

    /// Forgets `conn` if it is still the one recorded for `peer`.
    pub fn remove(&self, peer: PeerId, conn: &quinn::Connection) {
        if let Ok(mut map) = self.inner.lock() {
            if map
                .get(&peer)
                .is_some_and(|c| c.stable_id() == conn.stable_id())
            {
                map.remove(&peer);
            }
        }
    }

    fn get(&self, peer: &PeerId) -> Option<quinn::Connection> {
        self.inner.lock().ok().and_then(|m| m.get(peer).cloned())
    }

    fn all(&self) -> Vec<(PeerId, quinn::Connection)> {
        self.inner
            .lock()
            .map(|m| m.iter().map(|(p, c)| (*p, c.clone())).collect())
            .unwrap_or_default()
    }
}

/// Everything the path keepers share.
#[derive(Clone)]
pub struct PathKeeper {
    /// Our endpoint.
    pub node: Node,
    /// STUN routing.
    pub router: Router,
    /// Open connections.
    pub connections: Connections,
    /// Where to tell the user.
    pub console: Console,
    /// Show probe exchanges.
    pub verbose: bool,
}

impl PathKeeper {
    /// Points the connection to `peer` (if any) at `path` when quinn is using another address.
    async fn adopt(&self, peer: PeerId, path: SocketAddr, why: &str) {
        let Some(conn) = self.connections.get(&peer) else {
            return;
        };
        let quinn_addr = conn.remote_address();
        if self.node.socket.route_of(quinn_addr).udp() != Some(path) {
            self.node
                .socket
                .set_route(quinn_addr, transport::PathTarget::Udp(path));
            self.console
                .say(format!("path to {peer}: direct to {path} ({why})"))
                .await;
        }
    }

    async fn punch(&self, peer: PeerId, nonce: u64, role: Role, candidates: &[Candidate]) -> State {
        let log = self.verbose.then(|| self.console.clone());
        punching::run(&self.node, &self.router, peer, nonce, role, candidates, log).await
    }

    /// Answers introductions pushed by the rendezvous: punch as the responder and, if a
    /// connection to that peer is open, move it to the path that answered.
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
            } = event;
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
            let keeper = self.clone();
            punches.spawn(async move {
                match keeper
                    .punch(peer, nonce, Role::Responder, &candidates)
                    .await
                {
                    State::Direct(path) => {
                        keeper
                            .adopt(peer, path.addr, "the peer's address changed")
                            .await;
                    }
                    State::Failed(report) if keeper.verbose => {
                        keeper
                            .console
                            .error(format!(
                                "punch {}: no direct path: {}",
                                peer.short(),
                                report.reason()
                            ))
                            .await;
                    }
                    _ => {}
                }
            });
        }
    }

    /// Asks the rendezvous how it sees us every [`MAPPING_CHECK_INTERVAL`]; when our public
    /// address changes (the NAT rebound), re-punches every open connection.
    pub async fn watch_mapping(
        self,
        session: Session,
        server: SocketAddr,
        mut shutdown: watch::Receiver<bool>,
    ) {
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
                if let SessionState::Registered(reg) = session.state() {
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
            match last {
                Some(previous) if previous != mapped => {
                    // Any request makes the rendezvous look at our connection's new address, so
                    // that introductions hand out the new one.
                    let _ = session
                        .request(&ControlMessage::Ping {
                            seq: counter.into(),
                        })
                        .await;
                    let open = self.connections.all();
                    self.console
                        .say(format!(
                            "our public address changed from {previous} to {mapped} (NAT rebinding); \
                             re-punching {} connection(s)",
                            open.len()
                        ))
                        .await;
                    for (peer, _) in open {
                        let keeper = self.clone();
                        let session = session.clone();
                        tokio::spawn(async move { keeper.repunch(&session, peer).await });
                    }
                }
                _ => {}
            }
            last = Some(mapped);
        }
        self.router.unregister(nonce);
    }

    /// Asks for a new introduction to `peer` and moves its connection to the path that answers.
    async fn repunch(&self, session: &Session, peer: PeerId) {
        let reply = session.request(&ControlMessage::Connect { id: peer }).await;
        let (candidates, nonce) = match reply {
            Ok(ControlMessage::Punch {
                candidates, nonce, ..
            }) => (candidates, nonce),
            Ok(other) => {
                self.console
                    .error(format!(
                        "re-punch to {peer}: the rendezvous answered {}",
                        other.kind()
                    ))
                    .await;
                return;
            }
            Err(e) => {
                self.console.error(format!("re-punch to {peer}: {e}")).await;
                return;
            }
        };
        match self.punch(peer, nonce, Role::Initiator, &candidates).await {
            State::Direct(path) => {
                self.adopt(peer, path.addr, "re-punched after our NAT rebound")
                    .await
            }
            State::Failed(report) => {
                self.console
                    .error(format!(
                        "re-punch to {peer} found no direct path: {}",
                        report.reason()
                    ))
                    .await
            }
            State::Probing => {}
        }
    }
}
