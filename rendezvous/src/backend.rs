//! Where the registry's records go: the embedded redb store (the default, one node, nothing
//! else to install) or the cluster registry in Redis (`--cluster`). The protocol logic
//! ([`crate::core::Registry`]) is the same for both; this is what the driver calls to persist
//! what it returns.

use std::sync::Arc;

use common::PeerId;
use time::OffsetDateTime;

use crate::cluster::Cluster;
use crate::core::Record;
use crate::store::{Store, StoreError};

/// The registry's storage.
#[derive(Clone)]
pub enum Backend {
    /// redb on this host: every write durable before a registration is acknowledged.
    Embedded(Store),
    /// Redis, shared by the cluster's nodes.
    Cluster(Arc<Cluster>),
}

impl Backend {
    /// A registration (or another change of an online peer's record): on disk before the
    /// reply for the embedded store. In a cluster, in Redis before the reply when Redis
    /// answers; in degraded mode the registration is still accepted (the peer is reachable
    /// from this node's peers) and the refresh after recovery writes it.
    pub async fn put(&self, id: PeerId, record: Record) -> Result<(), StoreError> {
        match self {
            Backend::Embedded(store) => store.put(id, record).await,
            Backend::Cluster(cluster) => {
                if let Err(e) = cluster.online(id, record).await {
                    // Debug only: the outage itself is logged once, when it starts.
                    tracing::debug!(peer = %id, error = %e, "registration accepted on this node only until the cluster registry answers");
                }
                Ok(())
            }
        }
    }

    /// A change of an online peer's record, not waited for.
    pub fn put_later(&self, id: PeerId, record: Record) {
        match self {
            Backend::Embedded(store) => store.put_later(id, record),
            Backend::Cluster(cluster) => cluster.online_later(id, record),
        }
    }

    /// The peer's connection here closed: its record with its last-seen time.
    pub fn offline(&self, id: PeerId, record: Record) {
        match self {
            Backend::Embedded(store) => store.put_later(id, record),
            Backend::Cluster(cluster) => cluster.offline_later(id, record),
        }
    }

    /// Rows that expired in memory: deleted from redb; in Redis they expire by their TTL.
    pub async fn delete_expired(
        &self,
        rows: Vec<(PeerId, OffsetDateTime)>,
    ) -> Result<(), StoreError> {
        match self {
            Backend::Embedded(store) => store.delete_expired(rows).await,
            Backend::Cluster(_) => Ok(()),
        }
    }

    /// The cluster registry, if this node is part of a cluster.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        match self {
            Backend::Embedded(_) => None,
            Backend::Cluster(cluster) => Some(cluster),
        }
    }
}
