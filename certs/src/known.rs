use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::identity::Fingerprint;

/// Errors reading or writing the known-servers file.
#[derive(Debug, thiserror::Error)]
pub enum KnownServersError {
    /// The file could not be read or written.
    #[error("{action} known-servers file {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line is not `SERVER FINGERPRINT`.
    #[error("known-servers file {path}, line {line}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Trust on first use: the fingerprint first seen for each server, one `SERVER FINGERPRINT` line
/// each (like ssh's `known_hosts`). `#` starts a comment.
#[derive(Debug)]
pub struct KnownServers {
    path: PathBuf,
    entries: BTreeMap<String, Fingerprint>,
}

impl KnownServers {
    /// Loads the file; a missing file is an empty list.
    pub fn load(path: &Path) -> Result<Self, KnownServersError> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(KnownServersError::Io {
                    action: "reading",
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let mut entries = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let parse_err = |reason: String| KnownServersError::Parse {
                path: path.to_owned(),
                line: i + 1,
                reason,
            };
            let mut words = line.split_whitespace();
            let (Some(server), Some(fp), None) = (words.next(), words.next(), words.next()) else {
                return Err(parse_err("expected `SERVER FINGERPRINT`".into()));
            };
            let fp = fp.parse().map_err(|e| parse_err(format!("{e}")))?;
            entries.insert(server.to_owned(), fp);
        }
        Ok(KnownServers {
            path: path.to_owned(),
            entries,
        })
    }

    /// The remembered fingerprint of `server`.
    pub fn get(&self, server: &str) -> Option<Fingerprint> {
        self.entries.get(server).copied()
    }

    /// Remembers `server`'s fingerprint and rewrites the file (atomically and durably, mode 0600;
    /// its directory, if missing, 0700).
    pub fn remember(&mut self, server: &str, fp: Fingerprint) -> Result<(), KnownServersError> {
        self.entries.insert(server.to_owned(), fp);
        let io_err = |source| KnownServersError::Io {
            action: "writing",
            path: self.path.clone(),
            source,
        };
        let mut text =
            String::from("# rendezvous servers trusted on first use: SERVER FINGERPRINT\n");
        for (server, fp) in &self.entries {
            text.push_str(&format!("{server} {fp}\n"));
        }
        crate::durable::write_private_file(&self.path, text.as_bytes()).map_err(io_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    #[test]
    fn remember_and_reload() {
        let dir = std::env::temp_dir().join(format!("known-test-{}", std::process::id()));
        let path = dir.join("known_servers");
        let fp = Identity::generate().unwrap().fingerprint();
        let mut known = KnownServers::load(&path).unwrap();
        assert_eq!(known.get("127.0.0.1:7000"), None);
        known.remember("127.0.0.1:7000", fp).unwrap();
        let known = KnownServers::load(&path).unwrap();
        assert_eq!(known.get("127.0.0.1:7000"), Some(fp));
        fs::write(&path, "server-without-fingerprint\n").unwrap();
        let err = KnownServers::load(&path).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
