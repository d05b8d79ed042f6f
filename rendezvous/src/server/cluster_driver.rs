//! The driver's cluster side: `query` and `connect` for peers not online on this node go
//! through the cluster registry, and introductions forwarded by other nodes are pushed to
//! their targets here. Peers online on this node are answered by the core alone, exactly as
//! on a single node (and so still are while Redis is down).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::{ControlMessage, ErrorCode, PeerId};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{lock, Shared};
use crate::cluster::{Cluster, ClusterError, Envelope};
use crate::core::{ConnId, Outcome, RemotePeer};
use crate::nodelink::LinkHandler;

/// Starts the node's cluster tasks (renewing its entries, receiving forwarded introductions);
/// they end on shutdown.
pub(super) fn spawn(
    tasks: &mut JoinSet<()>,
    cluster: Arc<Cluster>,
    shared: &Arc<Shared>,
    shutdown: &watch::Receiver<bool>,
) {
    let for_refresh = shared.clone();
    tasks.spawn(cluster.clone().run_maintenance(
        move || lock(&for_refresh.registry).online_records(),
        shutdown.clone(),
    ));
    let for_delivery = shared.clone();
    tasks.spawn(cluster.run_subscriber(
        move |envelope| for_delivery.deliver_forwarded(envelope),
        shutdown.clone(),
    ));
    if let Some(links) = &shared.links {
        // Weak: the links live in the shared state they hand packets to.
        let handler: Arc<dyn LinkHandler> = shared.clone();
        tasks.spawn(
            links
                .clone()
                .run(Arc::downgrade(&handler), shutdown.clone()),
        );
    }
}

/// The reply when the cluster registry cannot be asked: a clear error, never a wrong answer
/// (such as `not_found` for a peer registered on another node).
fn unavailable(e: &ClusterError) -> Outcome {
    Outcome {
        reply: Some(ControlMessage::error(
            ErrorCode::Internal,
            format!(
                "{e}: peers on other nodes of this cluster cannot be looked up or introduced \
                 until it is back (peers on this node still can); try again later"
            ),
        )),
        ..Outcome::default()
    }
}

fn error(code: ErrorCode, message: String) -> Outcome {
    Outcome {
        reply: Some(ControlMessage::error(code, message)),
        ..Outcome::default()
    }
}

impl Shared {
    /// The outcome of a `query` or `connect` from `id` (registered here on `conn`) about a
    /// peer not online on this node, from the cluster registry; `None` when the core answers
    /// alone (the target is online here, or unknown to the cluster, or the message is another).
    pub(super) async fn cluster_outcome(
        &self,
        cluster: &Arc<Cluster>,
        conn: ConnId,
        id: PeerId,
        observed: SocketAddr,
        msg: &ControlMessage,
    ) -> Option<Outcome> {
        let (target, connect, first_flight) = match msg {
            ControlMessage::Query { id } => (*id, false, None),
            ControlMessage::Connect { id, first_flight } => (*id, true, first_flight.clone()),
            _ => return None,
        };
        {
            let registry = lock(&self.registry);
            // Unregistered connections, and targets online here: the core answers as on one
            // node (so an unregistered connection never costs a Redis call).
            if target == id
                || registry.connection_of(&id) != Some(conn)
                || registry.connection_of(&target).is_some()
            {
                return None;
            }
        }
        let found = match cluster.lookup(&target).await {
            Ok(Some(found)) => found,
            // Unknown to the cluster: the core answers (`not_found`, or a row of its own).
            Ok(None) => return None,
            Err(e @ ClusterError::Malformed { .. }) => {
                // The peer is told (and asked to tell the operator); not logged per request.
                tracing::debug!(peer = %target, error = %e, "cluster lookup found a malformed value");
                return Some(error(
                    ErrorCode::Internal,
                    format!("peer {target} cannot be looked up: {e}; tell the operator"),
                ));
            }
            Err(e) => {
                tracing::debug!(peer = %target, error = %e, "cluster lookup failed");
                return Some(unavailable(&e));
            }
        };
        let now = OffsetDateTime::now_utc();
        let node = match found.node {
            // Our own mark without a connection here: stale (the peer just left); the core
            // answers from its row.
            Some(node) if node == cluster.node() => return None,
            node => node,
        };
        let remote = RemotePeer {
            record: found.record,
            online: node.is_some(),
        };
        if !connect {
            return Some(lock(&self.registry).query_remote(
                conn,
                id,
                observed,
                target,
                Some(remote),
                now,
            ));
        }
        let Some(node) = node else {
            let last_seen = remote
                .record
                .last_seen
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            return Some(error(
                ErrorCode::PeerOffline,
                format!("peer {target} is registered but not online (last seen {last_seen})"),
            ));
        };
        let no_relay = self.no_relay_to(cluster, target, &node).await;
        let relay_across = no_relay.is_none();
        let (outcome, forward) = lock(&self.registry).introduce_remote(
            conn,
            id,
            observed,
            target,
            &remote.record,
            found.nat,
            no_relay,
            first_flight,
            now,
        );
        let Some(forward) = forward else {
            return Some(outcome);
        };
        let sent = cluster.forward(&node, forward).await;
        if let (Ok(1..), Some(links), true) = (&sent, &self.links, relay_across) {
            // Packets relayed to the target go to its node (unless it has no link: then they
            // are dropped here, never dialed for).
            links.set_route(target, &node);
        }
        match sent {
            Ok(0) => Some(error(
                ErrorCode::PeerOffline,
                format!(
                    "peer {target} is online on node {node}, which is not answering; try again \
                     later"
                ),
            )),
            Ok(_) => Some(outcome),
            Err(e) => Some(unavailable(&e)),
        }
    }

    /// Why the relay cannot carry packets between a peer here and `target` on `node`, if it
    /// cannot: this node has no node link, or `node` announces none (a node started without
    /// `--cluster-link`). Said in the introduction, so that a peer that needs the relay is
    /// refused at once rather than left to time out. When Redis cannot say (an error), the
    /// relay is tried as usual.
    async fn no_relay_to(&self, cluster: &Cluster, target: PeerId, node: &str) -> Option<String> {
        let me = cluster.node();
        if self.links.is_none() {
            return Some(format!(
                "peer {target} is on node {node} of this cluster, and this node ({me}) has no \
                 node link (--cluster-link): the relay cannot join you, only a direct path can"
            ));
        }
        match cluster.node_link_addr(node).await {
            Ok(None) => Some(format!(
                "peer {target} is on node {node} of this cluster, which has no node link \
                 (--cluster-link): the relay cannot join you, only a direct path can"
            )),
            Ok(Some(_)) => None,
            Err(e) => {
                tracing::debug!(%node, error = %e, "cannot read the node's link address");
                None
            }
        }
    }

    /// An introduction forwarded by another node: pushed to its target if it is online here.
    fn deliver_forwarded(&self, envelope: Envelope) {
        let Some(cluster) = self.backend.cluster() else {
            return;
        };
        let (requester, target) = (envelope.intro.requester, envelope.intro.target);
        let (from, me) = (&envelope.from, cluster.node());
        // This node knows whether it has a link; the requester's node said whether it can
        // relay to this one.
        let no_relay = if self.links.is_none() {
            Some(format!(
                "peer {requester} is on node {from} of this cluster, and this node ({me}) has no \
                 node link (--cluster-link): the relay cannot join you, only a direct path can"
            ))
        } else if !envelope.intro.relay_across {
            Some(format!(
                "peer {requester} is on node {from} of this cluster, which cannot relay to this \
                 node ({me}) (no node link, --cluster-link): the relay cannot join you, only a \
                 direct path can"
            ))
        } else {
            None
        };
        let relay_across = no_relay.is_none();
        let result = lock(&self.registry).forwarded_introduction(
            envelope.intro,
            no_relay,
            OffsetDateTime::now_utc(),
        );
        match result {
            Ok((conn, punch)) => {
                if let (Some(links), true) = (&self.links, relay_across) {
                    // Packets relayed to the requester, and the target's accept, go to its
                    // node (unless it cannot relay to this one: then nothing is sent there).
                    links.set_route(requester, &envelope.from);
                }
                if self.push(conn, punch) {
                    cluster.counters.received.fetch_add(1, Ordering::Relaxed);
                }
                self.relay.permissions_changed(target, requester);
            }
            Err(refusal) => {
                cluster.counters.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    from = %envelope.from, %requester, %target, %refusal,
                    "forwarded introduction not pushed"
                );
            }
        }
    }
}

impl Shared {
    /// `target` (here) accepted the introduction `nonce` of `requester`: if the requester is on
    /// another node (an introduction taught which), that node is told over the link, so that
    /// it lets the requester's relayed packets through too.
    pub(super) fn consent_to_other_node(&self, requester: PeerId, target: PeerId, nonce: u64) {
        let Some(links) = &self.links else { return };
        if lock(&self.registry).connection_of(&requester).is_some() {
            return;
        }
        if let Some(node) = links.route(&requester) {
            links.send_consent(&node, requester, target, nonce);
        }
    }
}

impl LinkHandler for Shared {
    fn packets(&self, node: &str, to: PeerId, frames: &[u8]) {
        let Some(links) = &self.links else {
            return;
        };
        let registry = &self.registry;
        let counted = [
            &links.counters.packets_received,
            &links.counters.bytes_received,
        ];
        let _ = self
            .relay
            .deliver_from_link(to, frames, self.limits.relay, counted, |from| {
                // The sender is on the node the link comes from, and introduced to `to` with
                // the accept this node saw.
                links.route(&from).as_deref() == Some(node)
                    && lock(registry)
                        .relay_allowed(from, to, OffsetDateTime::now_utc())
                        .is_ok()
            });
    }

    fn consent(&self, node: &str, requester: PeerId, target: PeerId, nonce: u64) {
        let Some(links) = &self.links else { return };
        // Only from the node the target is on.
        if links.route(&target).as_deref() != Some(node) {
            tracing::debug!(%node, %target, "consent from a node that does not hold the target; ignored");
            return;
        }
        let accepted = lock(&self.registry).remote_accepted(
            requester,
            target,
            nonce,
            OffsetDateTime::now_utc(),
        );
        if accepted {
            self.relay.permissions_changed(requester, target);
        }
    }
}
