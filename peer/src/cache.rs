//! The peer's address book: `peer id -> candidates`, kept on disk so that the rendezvous is asked
//! only on a miss (or when a cached address stops working).

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::message::Candidate;
use common::PeerId;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// One cached peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// Where the peer was reachable.
    pub candidates: Vec<Candidate>,
    /// When the entry was written.
    #[serde(with = "time::serde::rfc3339")]
    pub updated: OffsetDateTime,
}

/// The cache, loaded from and saved to a JSON file.
#[derive(Debug)]
pub struct PeerCache {
    /// Where it is saved; `None` for a cache kept in memory only.
    path: Option<PathBuf>,
    entries: HashMap<PeerId, CacheEntry>,
}

impl PeerCache {
    /// Loads `path`. A missing file is an empty cache; an unreadable or corrupt one is reported
    /// in the returned warning and ignored (it is only a cache).
    pub fn load(path: &Path) -> (Self, Option<String>) {
        let mut cache = PeerCache {
            path: Some(path.to_owned()),
            entries: HashMap::new(),
        };
        let warning = match fs::read(path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(entries) => {
                    cache.entries = entries;
                    None
                }
                Err(e) => Some(format!(
                    "ignoring corrupt peer cache {}: {e}",
                    path.display()
                )),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => Some(format!("cannot read peer cache {}: {e}", path.display())),
        };
        (cache, warning)
    }

    /// An empty cache that is never written to disk (a library endpoint without a cache file).
    pub fn in_memory() -> Self {
        PeerCache {
            path: None,
            entries: HashMap::new(),
        }
    }

    /// The cached entry for `id`.
    pub fn get(&self, id: &PeerId) -> Option<&CacheEntry> {
        self.entries.get(id)
    }

    /// Records `candidates` for `id` and saves.
    pub fn put(&mut self, id: PeerId, candidates: Vec<Candidate>) -> std::io::Result<()> {
        self.entries.insert(
            id,
            CacheEntry {
                candidates,
                updated: OffsetDateTime::now_utc(),
            },
        );
        self.save()
    }

    /// Forgets `id` (its addresses failed) and saves.
    pub fn remove(&mut self, id: &PeerId) -> std::io::Result<()> {
        if self.entries.remove(id).is_some() {
            self.save()?;
        }
        Ok(())
    }

    /// Writes the whole cache: mode 0600, atomically and durably (directory 0700 if missing).
    fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let bytes = serde_json::to_vec_pretty(&self.entries).map_err(std::io::Error::other)?;
        certs::durable::write_private_file(path, &bytes)
    }
}

/// The candidates of what the rendezvous knows about a peer: its observed address first, then
/// its router's mapping of its port (at the observed IP), then the interface addresses it
/// announced (without a repeat of the observed one).
pub fn candidates_of(info: &common::message::PeerInfo) -> Vec<Candidate> {
    let mut candidates = vec![Candidate {
        addr: info.observed,
        kind: common::message::CandidateKind::Observed,
    }];
    candidates.extend(
        info.local_addrs
            .iter()
            .filter(|a| **a != info.observed)
            .map(|&addr| Candidate {
                addr,
                kind: common::message::CandidateKind::Local,
            }),
    );
    // The router's mapping of its port: at the observed IP, as the rendezvous hands it out in
    // an introduction.
    if let Some(port) = info.mapped_port.filter(|&p| p != 0) {
        let addr = SocketAddr::new(info.observed.ip(), port);
        if addr != info.observed {
            candidates.insert(
                1,
                Candidate {
                    addr,
                    kind: common::message::CandidateKind::Mapped,
                },
            );
        }
    }
    candidates
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::message::CandidateKind;

    #[test]
    fn put_reload_remove_and_corrupt_file() {
        let dir = std::env::temp_dir().join(format!("cache-test-{}", std::process::id()));
        let path = dir.join("peers.json");
        let id = PeerId::from_key_digest(&[5; 32]);
        let candidate = Candidate {
            addr: "127.0.0.1:5000".parse().unwrap(),
            kind: CandidateKind::Observed,
        };
        let (mut cache, warning) = PeerCache::load(&path);
        assert!(warning.is_none());
        cache.put(id, vec![candidate]).unwrap();
        let (mut cache, _) = PeerCache::load(&path);
        assert_eq!(cache.get(&id).unwrap().candidates, vec![candidate]);
        cache.remove(&id).unwrap();
        let (cache, _) = PeerCache::load(&path);
        assert!(cache.get(&id).is_none());
        fs::write(&path, b"{ not json").unwrap();
        let (cache, warning) = PeerCache::load(&path);
        assert!(cache.get(&id).is_none());
        assert!(warning.unwrap().contains("corrupt"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
