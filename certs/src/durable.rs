//! Local state that survives a crash or a power loss and that only its owner can read.
//!
//! Every file the peer and the rendezvous keep (identity keys, `known_servers`, the peer cache)
//! goes through [`write_atomically`]: a fresh temporary file created with its final mode (never
//! chmodded afterwards, so there is no moment when it is readable by others), written, synced,
//! renamed over the old file, and then the directory synced so that the rename itself is durable.
//! Without the directory sync a power loss after the rename can leave the old file, or no file at
//! all when it was new (the server's key lost, and with it its id).
//!
//! Directories are made by [`create_private_dir`] with mode 0700 at creation.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Mode of every state file: read and write for the owner only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of every state directory: the owner only.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Distinguishes temporary files of concurrent writes from one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The directory that holds `path` (`.` for a bare file name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Makes `dir` durable: its entries (a file created or renamed into it) survive a power loss.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Creates `dir` and any missing parents with mode 0700 (set at creation, before the umask could
/// widen anything, never by a chmod afterwards). An existing directory is left as it is.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
}

/// Why a directory is not private.
#[derive(Debug, thiserror::Error)]
pub enum PrivateDirError {
    /// It could not be created or examined.
    #[error("{path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// It exists but others may enter it, or it is not ours.
    #[error(
        "{path} has mode {mode:o} and owner uid {uid}: it must be a directory only this user \
         (uid {me}) can enter; run `chmod 700 {path}`"
    )]
    NotPrivate {
        /// The directory.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
        /// Its owner.
        uid: u32,
        /// Our effective uid.
        me: u32,
    },
}

/// Creates `dir` with mode 0700 if it is missing; refuses an existing one that group or others
/// can enter or that another user owns (what must not leak through it: a Unix socket created in
/// it would otherwise be reachable by them between `bind` and any chmod).
pub fn ensure_private_dir(dir: &Path) -> Result<(), PrivateDirError> {
    let io = |source| PrivateDirError::Io {
        path: dir.to_owned(),
        source,
    };
    create_private_dir(dir).map_err(io)?;
    let meta = fs::symlink_metadata(dir).map_err(io)?;
    let mode = meta.mode() & 0o7777;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || mode & 0o077 != 0 || meta.uid() != me {
        return Err(PrivateDirError::NotPrivate {
            path: dir.to_owned(),
            mode,
            uid: meta.uid(),
            me,
        });
    }
    Ok(())
}

/// Makes an existing `dir` that we own private (mode 0700) if group or others can enter it;
/// returns its old mode when it changed. For the peer's own config dir, which holds its identity
/// key and control socket: one made by an older version (or by hand) with wider permissions is
/// tightened rather than left unusable. A directory another user owns is left alone (and
/// [`ensure_private_dir`] refuses it).
pub fn tighten_own_dir(dir: &Path) -> std::io::Result<Option<u32>> {
    let meta = fs::symlink_metadata(dir)?;
    let mode = meta.mode() & 0o7777;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me || mode & 0o077 == 0 {
        return Ok(None);
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(mode & 0o700))?;
    Ok(Some(mode))
}

/// A name in `dir`, starting with `prefix`, that no other write of this process uses at the same
/// time (another process's clash is caught by `create_new`).
fn temp_path_in(dir: &Path, prefix: &str) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{prefix}.{}.{n}.tmp", std::process::id()))
}

/// Replaces `path` with `bytes` atomically and durably: a fresh temporary file beside it (created
/// with `mode`, so a stale file can never lend it wider permissions), written and synced, renamed
/// over `path`, and the directory synced. A reader sees the old content or the new, never a mix;
/// after a crash at any point the file holds one or the other. The directory must exist (see
/// [`create_private_dir`]).
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = parent_of(path);
    let stem = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = temp_path_in(dir, &format!(".{stem}"));
    let write = || -> std::io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })?;
    sync_dir(dir)
}

/// [`create_private_dir`] for `path`'s directory, then [`write_atomically`] with mode 0600.
pub fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    create_private_dir(parent_of(path))?;
    write_atomically(path, bytes, PRIVATE_FILE_MODE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "durable-{tag}-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ))
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn private_files_and_dirs_have_their_modes_from_creation() {
        let root = temp_dir("modes");
        let path = root.join("a").join("b").join("state");
        write_private_file(&path, b"one").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&root.join("a").join("b")), 0o700);
        assert_eq!(mode(&root.join("a")), 0o700);
        // Replacing keeps the mode and leaves no temporary file behind.
        write_private_file(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(mode(&path), 0o600);
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state")]);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_world_readable_file_being_replaced_does_not_lend_its_mode() {
        let root = temp_dir("replace");
        create_private_dir(&root).unwrap();
        let path = root.join("known");
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_private_file(&path, b"new").unwrap();
        assert_eq!(mode(&path), 0o600);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let root = temp_dir("fail");
        create_private_dir(&root).unwrap();
        // A directory where the file should go: the rename fails.
        let path = root.join("target");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("inside"), "x").unwrap();
        assert!(write_atomically(&path, b"data", 0o600).is_err());
        let names: Vec<_> = fs::read_dir(&root).unwrap().collect();
        assert_eq!(names.len(), 1, "only the directory remains: {names:?}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn concurrent_writes_of_one_file_never_mix() {
        let root = temp_dir("concurrent");
        create_private_dir(&root).unwrap();
        let path = root.join("file");
        let threads: Vec<_> = (0..8u8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        write_atomically(&path, &[i; 4096], 0o600).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let content = fs::read(&path).unwrap();
        assert_eq!(content.len(), 4096);
        assert!(content.iter().all(|&b| b == content[0]));
        assert_eq!(fs::read_dir(&root).unwrap().count(), 1);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn ensure_private_dir_creates_0700_and_refuses_an_open_one() {
        let root = temp_dir("ensure");
        let dir = root.join("config");
        ensure_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        ensure_private_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let err = ensure_private_dir(&dir).unwrap_err();
        assert!(err.to_string().contains("chmod 700"), "{err}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn an_open_dir_of_ours_is_tightened_once() {
        let root = temp_dir("tighten");
        let dir = root.join("config");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(tighten_own_dir(&dir).unwrap(), Some(0o755));
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(tighten_own_dir(&dir).unwrap(), None);
        ensure_private_dir(&dir).unwrap();
        fs::remove_dir_all(&root).unwrap();
    }
}
