//! The registry on disk: one redb table, `peer id -> JSON record`.
//!
//! Writes go through one writer thread that batches whatever requests are queued into a single
//! durable transaction (group commit): a registration is acknowledged only once it is on disk,
//! and many registrations arriving together cost one fsync. Expired rows are deleted through
//! the same thread and queue, so a delete and a later write of the same row are applied in
//! order; a delete also checks the row was not written again since it expired.

use std::path::{Path, PathBuf};

use common::PeerId;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use crate::core::Record;

const PEERS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("peers");

/// Most write requests waiting for the writer thread.
const WRITE_QUEUE: usize = 4096;

/// Most records committed in one transaction.
const MAX_BATCH: usize = 1024;

/// Bytes of database pages redb keeps in memory. Every row is also held in the registry's own
/// memory and the database is read only at start, so the cache only speeds up writes; redb's
/// default (1 GiB) would let the process grow with the file until it reached that.
pub const CACHE_BYTES: usize = 16 * 1024 * 1024;

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
    write: Write,
    done: Option<oneshot::Sender<Result<(), String>>>,
}

enum Write {
    /// Insert or replace a row.
    Put(PeerId, Record),
    /// Delete these rows, each only if its stored `last_seen` is not later than the one given
    /// (a row written again after it expired in memory is a new registration: kept).
    DeleteExpired(Vec<(PeerId, OffsetDateTime)>),
}

/// What [`open`] returns: a handle for writes, the stored records, and the writer thread (which
/// ends when every handle is dropped).
pub type Opened = (Store, Vec<(PeerId, Record)>, std::thread::JoinHandle<()>);

/// Opens (or creates) `dir/registry.redb` and loads every row.
pub fn open(dir: &Path) -> Result<Opened, StoreError> {
    open_expiring(dir, None)
}

/// Opens (or creates) `dir/registry.redb` and loads its rows, except rows last seen before
/// `expired_before`: those are deleted (durably) instead of loaded.
pub fn open_expiring(
    dir: &Path,
    expired_before: Option<OffsetDateTime>,
) -> Result<Opened, StoreError> {
    let path = dir.join("registry.redb");
    let db_err = |e: &dyn std::fmt::Display| StoreError::Db {
        path: path.clone(),
        message: e.to_string(),
    };
    let db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(&path)
        .map_err(|e| db_err(&e))?;
    {
        let txn = db.begin_write().map_err(|e| db_err(&e))?;
        txn.open_table(PEERS).map_err(|e| db_err(&e))?;
        txn.commit().map_err(|e| db_err(&e))?;
    }
    let mut records = Vec::new();
    let mut expired = Vec::new();
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
                Ok(record) if expired_before.is_some_and(|t| record.last_seen < t) => {
                    expired.push(*key.value());
                }
                Ok(record) => records.push((id, record)),
                Err(e) => tracing::warn!(peer = %id, error = %e, "skipping unreadable record"),
            }
        }
    }
    if !expired.is_empty() {
        let txn = db.begin_write().map_err(|e| db_err(&e))?;
        {
            let mut table = txn.open_table(PEERS).map_err(|e| db_err(&e))?;
            for key in &expired {
                table.remove(key).map_err(|e| db_err(&e))?;
            }
        }
        txn.commit().map_err(|e| db_err(&e))?;
        tracing::info!(
            rows = expired.len(),
            "deleted expired registry rows at start"
        );
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
        self.write_durably(Write::Put(id, record)).await
    }

    /// Deletes rows that expired in memory ([`crate::core::Registry::expire`]'s output) and
    /// waits until the deletes are durable. A row written again since it expired is kept.
    pub async fn delete_expired(
        &self,
        rows: Vec<(PeerId, OffsetDateTime)>,
    ) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.write_durably(Write::DeleteExpired(rows)).await
    }

    async fn write_durably(&self, write: Write) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.writes
            .send(WriteRequest {
                write,
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
                write: Write::Put(id, record),
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
            match &req.write {
                Write::Put(id, record) => {
                    let value = serde_json::to_vec(record).map_err(|e| e.to_string())?;
                    table
                        .insert(id.as_bytes(), value.as_slice())
                        .map_err(|e| e.to_string())?;
                }
                Write::DeleteExpired(rows) => {
                    for (id, expired_last_seen) in rows {
                        let rewritten = match table.get(id.as_bytes()).map_err(|e| e.to_string())? {
                            None => continue,
                            // An unreadable row would be skipped at load anyway: delete it.
                            Some(value) => serde_json::from_slice::<Record>(value.value())
                                .is_ok_and(|stored| stored.last_seen > *expired_last_seen),
                        };
                        if !rewritten {
                            table.remove(id.as_bytes()).map_err(|e| e.to_string())?;
                        }
                    }
                }
            }
        }
    }
    txn.commit().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    /// A fresh directory, removed on drop (also when the test fails).
    struct TestDir(PathBuf);

    impl TestDir {
        fn new(tag: &str) -> TestDir {
            let dir = std::env::temp_dir().join(format!(
                "store-test-{tag}-{}-{}",
                std::process::id(),
                rand::random::<u64>()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TestDir(dir)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const T0: OffsetDateTime = datetime!(2026-11-25 08:00 UTC);

    fn record(last_seen: OffsetDateTime) -> Record {
        Record {
            observed: "203.0.113.4:9".parse().unwrap(),
            local_addrs: vec![],
            mapped_port: None,
            last_seen,
            registered_at: T0,
        }
    }

    fn id(n: u8) -> PeerId {
        PeerId::from_key_digest(&[n; 32])
    }

    /// Opens, runs `f` on the store, and closes (waiting for the writer to finish).
    async fn with_store<F, Fut>(dir: &Path, expired_before: Option<OffsetDateTime>, f: F)
    where
        F: FnOnce(Store) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let (store, _, writer) = open_expiring(dir, expired_before).unwrap();
        f(store).await;
        tokio::task::spawn_blocking(move || writer.join().unwrap())
            .await
            .unwrap();
    }

    fn sorted(mut records: Vec<(PeerId, Record)>) -> Vec<(PeerId, Record)> {
        records.sort_by_key(|(id, _)| *id);
        records
    }

    #[tokio::test]
    async fn records_survive_reopen() {
        let dir = TestDir::new("reopen");
        let record = record(T0);
        {
            let (store, records, writer) = open(&dir.0).unwrap();
            assert!(records.is_empty());
            store.put(id(3), record.clone()).await.unwrap();
            drop(store);
            writer.join().unwrap();
        }
        let (_store, records, _writer) = open(&dir.0).unwrap();
        assert_eq!(records, vec![(id(3), record)]);
    }

    #[tokio::test]
    async fn deletes_are_durable_and_spare_rows_written_again() {
        let dir = TestDir::new("delete");
        let later = T0 + time::Duration::days(1);
        with_store(&dir.0, None, |store| async move {
            for n in 1..=3 {
                store.put(id(n), record(T0)).await.unwrap();
            }
            // Peer 2 registered again after it expired in memory: its newer row stays.
            store.put(id(2), record(later)).await.unwrap();
            store
                .delete_expired(vec![(id(1), T0), (id(2), T0), (id(9), T0)])
                .await
                .unwrap();
        })
        .await;
        let (_store, records, _writer) = open(&dir.0).unwrap();
        assert_eq!(
            sorted(records),
            sorted(vec![(id(2), record(later)), (id(3), record(T0))])
        );
    }

    #[tokio::test]
    async fn expired_rows_are_deleted_at_load_not_loaded() {
        let dir = TestDir::new("load");
        let recent = T0 + time::Duration::days(40);
        with_store(&dir.0, None, |store| async move {
            store.put(id(1), record(T0)).await.unwrap();
            store.put(id(2), record(recent)).await.unwrap();
        })
        .await;
        let cutoff = T0 + time::Duration::days(10);
        let (store, records, writer) = open_expiring(&dir.0, Some(cutoff)).unwrap();
        assert_eq!(records, vec![(id(2), record(recent))]);
        drop(store);
        writer.join().unwrap();
        // Gone from disk, not just skipped.
        let (_store, records, _writer) = open(&dir.0).unwrap();
        assert_eq!(records, vec![(id(2), record(recent))]);
    }
}
