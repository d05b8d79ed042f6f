//! Who may talk to a listening peer: an allow-list of peer ids, from `--allow ID` and from
//! `<config dir>/authorized_peers` (one id per line, `#` starts a comment, like ssh's
//! `authorized_keys`).
//!
//! The id checked is the one the TLS handshake proved (the hash of the key in the client
//! certificate the connection was authenticated with), never one a peer claims in a message. A
//! refused connection is closed with [`REFUSED_CODE`] and a reason the dialer prints.
//!
//! Why it is a module of its own: the allow-list is read from a user's file and checked against
//! the network's claims, so its parser and its one decision are kept small and tested apart.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use common::PeerId;

/// QUIC application close code of a connection refused because its peer is not allowed.
pub const REFUSED_CODE: u32 = 0x5052; // "PR": peer refused
/// The reason sent with [`REFUSED_CODE`] (the dialer prints it).
pub const REFUSED_REASON: &str = "not on this peer's allow-list";
/// The allow-list file in a config dir.
pub const FILE_NAME: &str = "authorized_peers";
/// Largest allow-list file read (a file is input like any other: bounded).
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Why the allow-list could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AllowListError {
    /// The file exists but could not be read.
    #[error("cannot read the allow-list {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_FILE_BYTES`].
    #[error("the allow-list {path} is larger than {MAX_FILE_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// A line is neither blank, a comment, nor an id with an optional comment.
    #[error(
        "{path}:{line}: {reason} (expected one peer id per line, optionally followed by \
         `# comment`)"
    )]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// Which peers a listener accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Every peer that knows our id.
    Anyone,
    /// Only these (possibly none).
    Only(BTreeSet<PeerId>),
}

impl Access {
    /// Whether `peer` (as proved by its TLS certificate) may talk to us.
    pub fn allows(&self, peer: &PeerId) -> bool {
        match self {
            Access::Anyone => true,
            Access::Only(ids) => ids.contains(peer),
        }
    }
}

/// A peer closed our connection because its allow-list does not name us.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{peer} refused the connection: {reason}")]
pub struct Refused {
    /// The peer that refused.
    pub peer: PeerId,
    /// The reason it gave (control characters replaced).
    pub reason: String,
}

/// The error to report when `conn` was closed by a peer that refused us ([`REFUSED_CODE`]), with
/// the reason it gave; `None` when it was closed otherwise or is still open. Call it before
/// closing `conn` ourselves: a local close replaces the reason.
pub fn refusal(peer: PeerId, conn: &quinn::Connection) -> Option<Refused> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(close)
            if close.error_code == quinn::VarInt::from_u32(REFUSED_CODE) =>
        {
            let reason = crate::files::printable(&String::from_utf8_lossy(&close.reason));
            Some(Refused { peer, reason })
        }
        _ => None,
    }
}

/// Parses the text of an allow-list file (`path` only names it in errors).
pub fn parse(path: &Path, text: &str) -> Result<BTreeSet<PeerId>, AllowListError> {
    let mut ids = BTreeSet::new();
    for (i, raw) in text.lines().enumerate() {
        let malformed = |reason: String| AllowListError::Malformed {
            path: path.to_owned(),
            line: i + 1,
            reason,
        };
        let content = raw.split_once('#').map_or(raw, |(before, _)| before);
        let mut words = content.split_whitespace();
        let Some(word) = words.next() else { continue };
        if let Some(extra) = words.next() {
            return Err(malformed(format!(
                "unexpected {:?} after the id (a comment starts with `#`)",
                extra.escape_debug().to_string()
            )));
        }
        let id = word.parse::<PeerId>().map_err(|e| {
            malformed(format!(
                "{:?} is not a peer id: {e}",
                word.escape_debug().to_string()
            ))
        })?;
        ids.insert(id);
    }
    Ok(ids)
}

/// Reads `path`: `Ok(None)` when it does not exist.
pub fn load(path: &Path) -> Result<Option<BTreeSet<PeerId>>, AllowListError> {
    let io = |source| AllowListError::Io {
        path: path.to_owned(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(AllowListError::TooLarge {
            path: path.to_owned(),
        });
    }
    let text = String::from_utf8(bytes).map_err(|e| AllowListError::Malformed {
        path: path.to_owned(),
        line: 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count(),
        reason: "not UTF-8".into(),
    })?;
    parse(path, &text).map(Some)
}

/// Why the options do not make a usable access policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The allow-list file is unusable.
    #[error(transparent)]
    File(#[from] AllowListError),
    /// `--allow-any` together with an allow-list.
    #[error("--allow-any conflicts with the allow-list ({0}); remove one or the other")]
    Conflict(String),
    /// `--accept-files` with neither an allow-list nor `--allow-any`.
    #[error(
        "--accept-files needs an allow-list: name the peers allowed to send files with \
         --allow ID (repeatable) or in {0}, or pass --allow-any to take files from any peer \
         that knows this peer's id"
    )]
    FilesFromAnyone(PathBuf),
}

/// The policy of `peer listen`: `--allow` ids and the file together; `--allow-any` only without
/// either; `--accept-files` only with an allow-list or `--allow-any`.
pub fn policy(
    allow: &[PeerId],
    allow_any: bool,
    file: &Path,
    accept_files: bool,
) -> Result<Access, PolicyError> {
    let from_file = load(file)?;
    if allow_any {
        if !allow.is_empty() {
            return Err(PolicyError::Conflict("--allow".into()));
        }
        if from_file.is_some() {
            return Err(PolicyError::Conflict(file.display().to_string()));
        }
        return Ok(Access::Anyone);
    }
    if allow.is_empty() && from_file.is_none() {
        if accept_files {
            return Err(PolicyError::FilesFromAnyone(file.to_owned()));
        }
        return Ok(Access::Anyone);
    }
    let mut ids = from_file.unwrap_or_default();
    ids.extend(allow.iter().copied());
    Ok(Access::Only(ids))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::temp_dir;

    fn id(n: u8) -> PeerId {
        PeerId::from_key_digest(&[n; 32])
    }

    #[test]
    fn ids_comments_and_blank_lines() {
        let text = format!(
            "# my peers\n\n{}   # laptop\n  {}\n\t# indented comment\n{}#no space\n",
            id(1),
            id(2).to_string().replace('-', ""),
            id(3)
        );
        let ids = parse(Path::new("f"), &text).unwrap();
        assert_eq!(ids, BTreeSet::from([id(1), id(2), id(3)]));
        assert!(parse(Path::new("f"), "").unwrap().is_empty());
    }

    #[test]
    fn malformed_lines_name_the_file_and_line() {
        for (text, line, needle) in [
            (format!("{}\nnot-an-id\n", id(1)), 2, "not a peer id"),
            (format!("\n\n{} laptop\n", id(1)), 3, "after the id"),
            (format!("{}{}\n", id(1), id(2)), 1, "not a peer id"),
            ("\u{1b}[31m\n".to_owned(), 1, "\\u{1b}"),
        ] {
            let err = parse(Path::new("/cfg/authorized_peers"), &text).unwrap_err();
            let message = err.to_string();
            assert!(
                message.starts_with(&format!("/cfg/authorized_peers:{line}: ")),
                "{message}"
            );
            assert!(message.contains(needle), "{message}");
            // Control characters are never printed raw.
            assert!(!message.contains('\u{1b}'), "{message:?}");
        }
    }

    #[test]
    fn files_missing_oversized_and_not_utf8() {
        let dir = temp_dir("files");
        let path = dir.join(FILE_NAME);
        assert_eq!(load(&path).unwrap(), None);
        std::fs::write(&path, format!("{}\n", id(7))).unwrap();
        assert_eq!(load(&path).unwrap(), Some(BTreeSet::from([id(7)])));
        std::fs::write(&path, b"# ok\n\xff\xfe\n").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains(":2: not UTF-8"), "{err}");
        std::fs::write(&path, vec![b'#'; MAX_FILE_BYTES as usize + 1]).unwrap();
        assert!(matches!(load(&path), Err(AllowListError::TooLarge { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_policy_combines_flags_and_file_and_guards_files() {
        let dir = temp_dir("policy");
        let file = dir.join(FILE_NAME);
        // Nothing configured: anyone, but not with --accept-files.
        assert_eq!(policy(&[], false, &file, false).unwrap(), Access::Anyone);
        let err = policy(&[], false, &file, true).unwrap_err();
        assert!(matches!(err, PolicyError::FilesFromAnyone(_)), "{err}");
        assert!(err.to_string().contains("--allow-any"), "{err}");
        assert_eq!(policy(&[], true, &file, true).unwrap(), Access::Anyone);
        // --allow alone.
        let access = policy(&[id(1)], false, &file, true).unwrap();
        assert!(access.allows(&id(1)) && !access.allows(&id(2)));
        // The file and --allow together.
        std::fs::write(&file, format!("{}\n", id(2))).unwrap();
        let access = policy(&[id(1)], false, &file, true).unwrap();
        assert_eq!(access, Access::Only(BTreeSet::from([id(1), id(2)])));
        // An empty file is an allow-list that lets nobody in.
        std::fs::write(&file, "# nobody yet\n").unwrap();
        let access = policy(&[], false, &file, true).unwrap();
        assert_eq!(access, Access::Only(BTreeSet::new()));
        assert!(!access.allows(&id(1)));
        // --allow-any with an allow-list is a contradiction.
        assert!(matches!(
            policy(&[], true, &file, false),
            Err(PolicyError::Conflict(_))
        ));
        std::fs::remove_file(&file).unwrap();
        assert!(matches!(
            policy(&[id(1)], true, &file, false),
            Err(PolicyError::Conflict(_))
        ));
        // A broken file is an error, never "anyone".
        std::fs::write(&file, "garbage\n").unwrap();
        assert!(matches!(
            policy(&[], false, &file, false),
            Err(PolicyError::File(AllowListError::Malformed { line: 1, .. }))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
