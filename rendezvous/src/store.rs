//! The registry on disk: one redb table, `peer id -> JSON record`.
//!
//! Writes go through one writer thread that batches whatever requests are queued into a single
//! durable transaction (group commit): a registration is acknowledged only once it is on disk,
//! and many registrations arriving together cost one fsync.

use std::path::{Path, PathBuf};

use common::PeerId;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use crate::core::Record;

const PEERS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("peers");

/// Most write requests waiting for the writer thread.
const WRITE_QUEUE: usize = 4096;

/// Most records committed in one transaction.
const MAX_BATCH: usize = 1024;

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed.
    #[error("database {path}: {message}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// What redb said.
        message: String,
    },
    /// The writer thread has stopped.
    #[error("database writer has stopped")]
    Closed,
}

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    writes: mpsc::Sender<WriteRequest>,
}

struct WriteRequest {
    id: PeerId,
    record: Record,
    done: Option<oneshot::Sender<Result<(), String>>>,
}

/// What [`open`] returns: a handle for writes, the stored records, and the writer thread (which
/// ends when every handle is dropped).
pub type Opened = (Store, Vec<(PeerId, Record)>, std::thread::JoinHandle<()>);

/// Opens (or creates) `dir/registry.redb`.
pub fn open(dir: &Path) -> Result<Opened, StoreError> {
    let path = dir.join("registry.redb");
    let db_err = |e: &dyn std::fmt::Display| StoreError::Db {
        path: path.clone(),
        message: e.to_string(),
    };
    let db = Database::create(&path).map_err(|e| db_err(&e))?;
    {
        let txn = db.begin_write().map_err(|e| db_err(&e))?;
        txn.open_table(PEERS).map_err(|e| db_err(&e))?;
        txn.commit().map_err(|e| db_err(&e))?;
    }
    let mut records = Vec::new();
    {
        let txn = db.begin_read().map_err(|e| db_err(&e))?;
        let table = txn.open_table(PEERS).map_err(|e| db_err(&e))?;
        for entry in table.iter().map_err(|e| db_err(&e))? {
            let (key, value) = entry.map_err(|e| db_err(&e))?;
            // A record this build cannot read is skipped, not fatal: the peer re-registers.
            let Ok(id) = PeerId::from_bytes(*key.value()) else {
                tracing::warn!("skipping a stored key that is not a peer id");
                continue;
            };
            match serde_json::from_slice::<Record>(value.value()) {
                Ok(record) => records.push((id, record)),
                Err(e) => tracing::warn!(peer = %id, error = %e, "skipping unreadable record"),
            }
        }
    }
    let (writes, rx) = mpsc::channel(WRITE_QUEUE);
    let writer = std::thread::Builder::new()
        .name("registry-writer".into())
        .spawn(move || writer_loop(db, path, rx))
        .map_err(|e| StoreError::Db {
            path: dir.join("registry.redb"),
            message: format!("starting writer thread: {e}"),
        })?;
    Ok((Store { writes }, records, writer))
}

impl Store {
    /// Writes a record and waits until it is durable.
    pub async fn put(&self, id: PeerId, record: Record) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.writes
            .send(WriteRequest {
                id,
                record,
                done: Some(done),
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(StoreError::Db {
                path: PathBuf::from("registry.redb"),
                message,
            }),
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// Queues a write without waiting (last-seen updates); dropped if the queue is full.
    pub fn put_later(&self, id: PeerId, record: Record) {
        if self
            .writes
            .try_send(WriteRequest {
                id,
                record,
                done: None,
            })
            .is_err()
        {
            tracing::warn!(peer = %id, "registry write queue full; dropping a last-seen update");
        }
    }
}

fn writer_loop(db: Database, path: PathBuf, mut rx: mpsc::Receiver<WriteRequest>) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(req) => batch.push(req),
                Err(_) => break,
            }
        }
        let result = commit(&db, &batch).map_err(|e| {
            tracing::error!(db = %path.display(), error = %e, "registry commit failed");
            e
        });
        for req in batch {
            if let Some(done) = req.done {
                let _ = done.send(result.clone());
            }
        }
    }
}

fn commit(db: &Database, batch: &[WriteRequest]) -> Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut table = txn.open_table(PEERS).map_err(|e| e.to_string())?;
        for req in batch {
            let value = serde_json::to_vec(&req.record).map_err(|e| e.to_string())?;
            table
                .insert(req.id.as_bytes(), value.as_slice())
                .map_err(|e| e.to_string())?;
        }
    }
    txn.commit().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[tokio::test]
    async fn records_survive_reopen() {
        let dir = std::env::temp_dir().join(format!("store-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let id = PeerId::from_key_digest(&[3; 32]);
        let record = Record {
            observed: "203.0.113.4:9".parse().unwrap(),
            local_addrs: vec![],
            last_seen: datetime!(2026-11-25 08:00 UTC),
            registered_at: datetime!(2026-11-25 08:00 UTC),
        };
        {
            let (store, records, writer) = open(&dir).unwrap();
            assert!(records.is_empty());
            store.put(id, record.clone()).await.unwrap();
            drop(store);
            writer.join().unwrap();
        }
        let (_store, records, _writer) = open(&dir).unwrap();
        assert_eq!(records, vec![(id, record)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
