//! File transfer over a peer connection: `open {app: file}`, a `file_header` (name, size), the
//! receiver's `file_resume` (how many bytes of this file it holds already, and their BLAKE3),
//! the sender's `file_start` (there, if its own first bytes hash the same, else 0), the raw
//! bytes from there, the sender's `file_end` (the BLAKE3 of the whole file, hashed as it was
//! read), and a `file_result` from the receiver once it has stored and checked the whole file.
//! Both sides stream from and to disk in 1 MiB pieces (a few of them queued): no file is ever
//! held in memory. The receiver's bytes are hashed and written by the disk writer
//! (`disk_writer`: direct I/O where the file system takes it).
//!
//! The receiver ([`Inbox`]) checks the header before it writes anything: the name (a plain name
//! without control characters, path separators or a leading dot), the size (at most
//! `--max-file-size`, and room on the disk for what is left to write and the transfers already
//! in progress), and how many transfers are running. It writes to a hidden
//! `.NAME.KEY.part` file (mode 0600, never through a symlink), whose KEY is a hash of the
//! sender's id, the name and the size: the same file sent again by the same peer finds it and
//! resumes, no other peer's transfer ever does. A resume is never trusted blindly: the sender
//! compares the prefix's hash with its own file, and the receiver checks the BLAKE3 of the whole
//! file at the end. It then syncs the file, gives it its final name without
//! ever replacing a file (`name.ext`, else `name (1).ext`, `name (2).ext`, ... taken atomically
//! with a no-replace rename or a hard link), syncs the directory, and only then answers
//! "verified". A `.part` file stays when the transfer is interrupted (stream or connection lost,
//! stalled, the listener stopped or killed), to be resumed; it is removed when its bytes are
//! wrong (hash mismatch, more bytes than announced). At most [`MAX_KEPT_PARTS`] are kept: a
//! new transfer removes the oldest beyond that.
//!
//! Why it is a module of its own: a received file is the one thing a remote peer writes to our
//! disk, so every check and bound on it lives here, next to the sender that must obey them.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::frame_io::{read_frame, write_frame, FrameIoError};
use common::message::PeerApp;
use common::{PeerId, PeerMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::console::Console;
use crate::disk_writer::{DirectIo, DiskWriter, DiskWritten};

const CHUNK: usize = 256 * 1024;

/// Space left free on the receiving disk after every file in progress (so that a peer cannot fill
/// the disk to the last byte).
pub const DISK_RESERVE: u64 = 64 << 20;
/// Files received at once by one listener (from all peers); more are refused.
pub const MAX_CONCURRENT_RECEIVES: usize = 8;
/// A transfer that delivers no byte for this long is abandoned.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// `.part` files of interrupted transfers kept in an inbox (for resuming); starting another
/// removes the oldest.
pub const MAX_KEPT_PARTS: usize = 16;
/// Most `name (N).ext` tried before a name is refused as taken.
const MAX_SUFFIX: u32 = 9999;
/// QUIC stream stop code sent when a file is refused (the verdict says why).
const REFUSED_STREAM: u32 = 1;

/// A BLAKE3 hash in hex, as the messages carry it: 64 hex digits.
fn is_hash_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `text` with control and other invisible formatting characters escaped (a peer's words are
/// never printed raw: they could move the cursor or hide an extension).
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if is_hidden(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// Control characters, and the Unicode bidirectional and zero-width formatting characters that
/// make a name display as something else (`evil\u{202e}fdp.exe` shows as `evilexe.pdf`).
fn is_hidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// Why sending a file failed. Each variant reads as the underlying error.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The connection failed.
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    /// Writing or reading a frame failed.
    #[error(transparent)]
    Frame(#[from] FrameIoError),
    /// Reading the file failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Writing the bytes failed.
    #[error(transparent)]
    Write(#[from] quinn::WriteError),
    /// The stream was already closed.
    #[error(transparent)]
    Finish(#[from] quinn::ClosedStream),
    /// The receiver's reply is not a message.
    #[error(transparent)]
    Decode(#[from] common::MessageError),
    /// The file, the receiver's verdict or the connection (the text says which).
    #[error("{0}")]
    Other(String),
}

/// Sends `path` on a new stream of `conn`; returns a summary once the receiver confirmed it.
///
/// A receiver that refuses the header (name, size, disk space) answers with its reason instead
/// of `file_resume`, before any byte goes out; otherwise the transfer starts where the receiver's
/// kept bytes end if they hash like ours (else at 0), and the verdict is read while the bytes go
/// out (a receiver that fails mid-way stops the stream and says why). An interrupted send says
/// that sending the same file again resumes.
pub async fn send(
    conn: &quinn::Connection,
    path: &Path,
    console: &Console,
) -> Result<String, SendError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| SendError::Other(format!("{} has no usable file name", path.display())))?
        .to_owned();
    if let Err(why) = check_name(&name) {
        return Err(SendError::Other(format!(
            "{}: the receiver would refuse this name: {why}",
            printable(&path.display().to_string())
        )));
    }
    // The file's length and modification time now: the bytes sent are exactly this many, and
    // the file must look the same once they are read (else it changed while being sent).
    let before = FileStamp::of(path)
        .map_err(|e| SendError::Other(format!("cannot read {}: {e}", path.display())))?;
    let size = before.len;
    let (mut tx, mut rx) = conn.open_bi().await?;
    write_frame(&mut tx, &PeerMessage::Open { app: PeerApp::File }.encode()).await?;
    let header = PeerMessage::FileHeader {
        name: name.clone(),
        size,
    };
    write_frame(&mut tx, &header.encode()).await?;
    // The receiver answers with what it holds of this file already (or refuses it).
    let answer = tokio::time::timeout(STALL_TIMEOUT, read_frame(&mut rx))
        .await
        .map_err(|_| {
            SendError::Other(format!(
                "the receiver did not answer the file header within {} s",
                STALL_TIMEOUT.as_secs()
            ))
        })??
        .ok_or_else(|| {
            SendError::Other("the receiver closed the stream without an answer".into())
        })?;
    let (start, hasher) = match PeerMessage::decode(&answer)? {
        PeerMessage::FileResume {
            offset,
            prefix_blake3,
        } => resume_point(path, size, offset, &prefix_blake3).await?,
        PeerMessage::FileResult { message, .. } | PeerMessage::Error { message } => {
            return Err(SendError::Other(format!(
                "the receiver refused {name}: {}",
                printable(&message)
            )))
        }
        other => {
            return Err(SendError::Other(format!(
                "unexpected answer `{}`",
                printable(&format!("{other:?}"))
            )))
        }
    };
    write_frame(&mut tx, &PeerMessage::FileStart { offset: start }.encode()).await?;
    if start > 0 {
        console
            .error(format!(
                "resuming {name} at byte {start} of {size} (the receiver holds them, and their \
                 blake3 matches ours)"
            ))
            .await;
    }
    // Reading a frame is not cancel-safe: the verdict is read alongside the copy, by a future
    // of this one (so that it ends with it), and waited for after.
    let mut verdict = Box::pin(async move { read_frame(&mut rx).await });
    let started = Instant::now();
    let copy = async {
        // A blocking thread reads the file in large chunks and hashes them, each handed to
        // quinn as it is (no copy into the stream's buffer), through a short queue: the disk,
        // the hash and the network overlap, and no chunk is a round trip through tokio's
        // blocking pool.
        let mut chunks = read_chunks(path.to_owned(), start, before, hasher);
        let mut sent = start;
        let mut last_report = Instant::now();
        let hash = loop {
            match chunks.recv().await {
                Some(Ok(ReadChunk::Bytes(chunk))) => {
                    sent += chunk.len() as u64;
                    tx.write_chunk(chunk).await?;
                }
                Some(Ok(ReadChunk::End(hash))) => break hash,
                Some(Err(e)) => {
                    return Err(SendError::Other(format!(
                        "cannot send {}: {e}",
                        path.display()
                    )))
                }
                None => {
                    return Err(SendError::Other(format!(
                        "the reader of {} stopped",
                        path.display()
                    )))
                }
            }
            if last_report.elapsed() >= Duration::from_secs(1) {
                last_report = Instant::now();
                console
                    .error(progress(sent, start, size, started.elapsed()))
                    .await;
            }
        };
        let blake3 = hash.to_hex().to_string();
        let end = PeerMessage::FileEnd {
            blake3: blake3.clone(),
        };
        write_frame(&mut tx, &end.encode()).await?;
        tx.finish()?;
        Ok::<String, SendError>(blake3)
    };
    let (copied, early_verdict) = crate::tasks::alongside(copy, verdict.as_mut()).await;
    // After a failed write the receiver has usually said why (it refused the file): wait a little
    // for that; after a complete one, give it time to sync and check.
    let wait = if copied.is_ok() {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(5)
    };
    let verdict = match early_verdict {
        Some(read) => Some(read),
        None => tokio::time::timeout(wait, verdict.as_mut()).await.ok(),
    };
    let reply = match verdict {
        Some(Ok(Some(reply))) => reply,
        _ => {
            // Interrupted: the receiver keeps what it got, and says so to the next send.
            const AGAIN: &str = "sending the same file again resumes from what the receiver kept";
            if let Err(e) = copied {
                return Err(SendError::Other(format!("{e}; {AGAIN}")));
            }
            return match conn.close_reason() {
                Some(e) => Err(SendError::Other(format!(
                    "the connection closed without a verdict: {e}; {AGAIN}"
                ))),
                None => Err(SendError::Other(format!(
                    "no verdict from the receiver within {} s",
                    wait.as_secs()
                ))),
            };
        }
    };
    let elapsed = started.elapsed();
    let resumed = if start > 0 {
        format!(
            " (resumed at byte {start}: {} bytes sent now)",
            size - start
        )
    } else {
        String::new()
    };
    let ours = copied.as_ref().ok();
    match PeerMessage::decode(&reply)? {
        PeerMessage::FileResult { ok: true, blake3: theirs, message } if Some(&theirs) == ours => Ok(format!(
            "sent {name}: {size} bytes{resumed} in {:.2} s ({:.1} MB/s), verified by the receiver (blake3 {theirs}; {})",
            elapsed.as_secs_f64(),
            (size - start) as f64 / elapsed.as_secs_f64().max(1e-9) / 1e6,
            printable(&message),
        )),
        PeerMessage::FileResult { ok: true, .. } => {
            copied?;
            Err(SendError::Other(format!(
                "the receiver stored {name} with another hash"
            )))
        }
        PeerMessage::FileResult { message, .. } | PeerMessage::Error { message } => {
            Err(SendError::Other(format!(
                "the receiver refused {name}: {}",
                printable(&message)
            )))
        }
        other => Err(SendError::Other(format!(
            "unexpected reply `{}`",
            printable(&format!("{other:?}"))
        ))),
    }
}

/// Bytes the sender reads from the file at once (one chunk handed to quinn).
const READ_BUFFER: usize = 1024 * 1024;
/// Chunks read ahead of the stream.
const READ_QUEUE: usize = 4;

/// A file's length and modification time, compared before and after sending it: a file that
/// changed meanwhile was not sent as it is (the receiver would get a mix of two versions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileStamp {
    fn of(path: &Path) -> std::io::Result<FileStamp> {
        FileStamp::of_meta(std::fs::metadata(path)?)
    }

    fn of_file(file: &std::fs::File) -> std::io::Result<FileStamp> {
        FileStamp::of_meta(file.metadata()?)
    }

    fn of_meta(meta: std::fs::Metadata) -> std::io::Result<FileStamp> {
        if !meta.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        Ok(FileStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }
}

/// What the sender's file reader hands over: the file's bytes in chunks, then the hash of the
/// whole file.
enum ReadChunk {
    /// The next bytes.
    Bytes(bytes::Bytes),
    /// Every byte was read: the BLAKE3 of the whole file (`hasher` of [`read_chunks`] fed the
    /// rest).
    End(blake3::Hash),
}

/// Reads `path` from `start` to `stamp.len` in [`READ_BUFFER`] chunks on a blocking thread,
/// hashing them into `hasher` (which holds the hash of the first `start` bytes), at most
/// [`READ_QUEUE`] ahead of the receiver; then checks that the file still has `stamp` and hands
/// over the hash. The thread ends there, at an error (sent as the last item: the file shrank or
/// changed, a read failed) or when the receiver is dropped.
fn read_chunks(
    path: PathBuf,
    start: u64,
    stamp: FileStamp,
    mut hasher: blake3::Hasher,
) -> tokio::sync::mpsc::Receiver<std::io::Result<ReadChunk>> {
    use std::io::{Read, Seek};
    let (chunks_tx, chunks) = tokio::sync::mpsc::channel(READ_QUEUE);
    tokio::task::spawn_blocking(move || {
        // Never blocks in the open: a FIFO put in the file's place is opened without waiting
        // for a writer, then refused as not the file measured.
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .and_then(|file| match FileStamp::of_file(&file)? {
                now if now == stamp => Ok(file),
                _ => Err(std::io::Error::other("the file changed before it was sent")),
            });
        let mut file = match opened.and_then(|mut file| {
            file.seek(std::io::SeekFrom::Start(start))?;
            Ok(file)
        }) {
            Ok(file) => file,
            Err(e) => {
                let _ = chunks_tx.blocking_send(Err(e));
                return;
            }
        };
        let mut left = stamp.len.saturating_sub(start);
        let item = loop {
            if left == 0 {
                break match FileStamp::of_file(&file) {
                    Ok(now) if now == stamp => Ok(ReadChunk::End(hasher.finalize())),
                    Ok(_) => Err(std::io::Error::other(
                        "the file changed while it was being sent",
                    )),
                    Err(e) => Err(e),
                };
            }
            let want = left.min(READ_BUFFER as u64);
            let mut buf = Vec::with_capacity(want as usize);
            match (&mut file).take(want).read_to_end(&mut buf) {
                Ok(0) => {
                    break Err(std::io::Error::other(
                        "the file shrank while it was being sent",
                    ))
                }
                Ok(n) => left -= n as u64,
                Err(e) => break Err(e),
            }
            hasher.update(&buf);
            if chunks_tx
                .blocking_send(Ok(ReadChunk::Bytes(bytes::Bytes::from(buf))))
                .is_err()
            {
                // The send was dropped.
                return;
            }
        };
        let _ = chunks_tx.blocking_send(item);
    });
    chunks
}

/// Where to start sending `path` (`size` bytes) when the receiver holds `offset` bytes of it
/// whose BLAKE3 is `prefix_blake3`: there if our own first `offset` bytes hash the same, else
/// at 0; with the hasher fed our bytes before that point. An offset beyond the file is a
/// receiver error.
async fn resume_point(
    path: &Path,
    size: u64,
    offset: u64,
    prefix_blake3: &str,
) -> Result<(u64, blake3::Hasher), SendError> {
    if offset > size {
        return Err(SendError::Other(format!(
            "the receiver claims {offset} bytes of a {size}-byte file"
        )));
    }
    if offset == 0 {
        return Ok((0, blake3::Hasher::new()));
    }
    let mut file = tokio::fs::File::open(path).await?;
    let mut hasher = blake3::Hasher::new();
    if !hash_prefix(&mut file, offset, &mut hasher).await? {
        return Ok((0, blake3::Hasher::new()));
    }
    if hasher
        .finalize()
        .to_hex()
        .eq_ignore_ascii_case(prefix_blake3)
    {
        Ok((offset, hasher))
    } else {
        Ok((0, blake3::Hasher::new()))
    }
}

/// A progress line: bar, share done, bytes, the rate of this run (from `start`) and the time
/// left at that rate.
fn progress(done: u64, start: u64, total: u64, elapsed: Duration) -> String {
    let pct = if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    };
    let width = 30;
    let filled = ((pct / 100.0) * width as f64) as usize;
    let rate = done.saturating_sub(start) as f64 / elapsed.as_secs_f64().max(1e-9);
    let left = if rate > 0.0 {
        let secs = (total.saturating_sub(done) as f64 / rate).round() as u64;
        format!("{}:{:02} left", secs / 60, secs % 60)
    } else {
        "time left unknown".to_owned()
    };
    format!(
        "[{}{}] {pct:5.1}% {done}/{total} bytes, {:.1} MB/s, {left}",
        "#".repeat(filled.min(width)),
        " ".repeat(width - filled.min(width)),
        rate / 1e6
    )
}

/// Why a file name is refused (the text goes to the sender).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name.len() > 255 {
        return Err(format!(
            "the name is {} bytes long (at most 255)",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a file name"));
    }
    if let Some(c) = name.chars().find(|c| matches!(c, '/' | '\\')) {
        return Err(format!(
            "the name contains a path separator ({c:?}): only plain names are accepted"
        ));
    }
    if let Some(c) = name.chars().find(|&c| is_hidden(c)) {
        return Err(format!(
            "the name contains a control or invisible formatting character ({})",
            c.escape_unicode()
        ));
    }
    if name.starts_with('.') {
        return Err("hidden names (a leading dot) are not accepted".into());
    }
    Ok(())
}

/// `name`, or `stem (n).ext` for n >= 1.
fn numbered(name: &str, n: u32) -> String {
    if n == 0 {
        return name.to_owned();
    }
    match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => format!("{stem} ({n}).{ext}"),
        _ => format!("{name} ({n})"),
    }
}

/// Free bytes for an unprivileged user on the filesystem of `dir` (statvfs).
pub fn available_bytes(dir: &Path) -> std::io::Result<u64> {
    let path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("the path contains a NUL byte"))?;
    // SAFETY: an all-zero statvfs is a valid value of a plain C struct.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` a valid, writable statvfs.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

/// Whether `size` more bytes fit on a disk with `available` free bytes of which `reserved` are
/// promised to transfers in progress, leaving [`DISK_RESERVE`] free.
fn check_space(size: u64, available: u64, reserved: u64) -> Result<(), String> {
    let usable = available
        .saturating_sub(reserved)
        .saturating_sub(DISK_RESERVE);
    if size > usable {
        return Err(format!(
            "not enough disk space: {size} bytes announced, {usable} usable ({available} free, \
             {reserved} promised to transfers in progress, {DISK_RESERVE} kept free)"
        ));
    }
    Ok(())
}

/// Gives `from` the name `to` unless `to` exists (then `AlreadyExists`), atomically: renameat2
/// with RENAME_NOREPLACE where the kernel and filesystem have it, else a hard link (which also
/// never replaces) and the removal of `from`.
fn rename_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let c = |p: &Path| {
            CString::new(p.as_os_str().as_bytes())
                .map_err(|_| std::io::Error::other("the path contains a NUL byte"))
        };
        let (from_c, to_c) = (c(from)?, c(to)?);
        // SAFETY: both paths are NUL-terminated; AT_FDCWD makes them relative to the cwd.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                from_c.as_ptr(),
                libc::AT_FDCWD,
                to_c.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        // EINVAL / ENOSYS: the filesystem or kernel has no RENAME_NOREPLACE.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            return Err(e);
        }
    }
    std::fs::hard_link(from, to)?;
    std::fs::remove_file(from)
}

/// Where received files go, and the bounds on them.
#[derive(Debug)]
pub struct Inbox {
    dir: PathBuf,
    max_size: u64,
    /// Transfers in progress and the bytes they still have to write.
    in_progress: Mutex<(usize, u64)>,
    /// The `.part` files being written now.
    active_parts: Mutex<std::collections::HashSet<PathBuf>>,
}

impl Inbox {
    /// Files into `dir`, each at most `max_size` bytes.
    pub fn new(dir: PathBuf, max_size: u64) -> Arc<Inbox> {
        Arc::new(Inbox {
            dir,
            max_size,
            in_progress: Mutex::new((0, 0)),
            active_parts: Mutex::new(Default::default()),
        })
    }

    /// Takes a slot for a file of `size` bytes, `remaining` of which are still to be written,
    /// if the bounds allow it.
    fn admit(self: &Arc<Self>, size: u64, remaining: u64) -> Result<Slot, String> {
        if size > self.max_size {
            return Err(format!(
                "the file is {size} bytes, more than this peer accepts ({} bytes, \
                 --max-file-size)",
                self.max_size
            ));
        }
        // statvfs before taking the lock: the lock is never held across a system call.
        let available = available_bytes(&self.dir)
            .map_err(|e| format!("cannot check the free space of the receiving disk: {e}"))?;
        let mut guard = self
            .in_progress
            .lock()
            .map_err(|_| "internal error: the inbox lock is poisoned".to_owned())?;
        let (count, reserved) = &mut *guard;
        if *count >= MAX_CONCURRENT_RECEIVES {
            return Err(format!(
                "{MAX_CONCURRENT_RECEIVES} files are being received already; try again later"
            ));
        }
        check_space(remaining, available, *reserved)?;
        *count += 1;
        *reserved += remaining;
        Ok(Slot {
            inbox: self.clone(),
            size: remaining,
        })
    }
}

/// A transfer's place in the [`Inbox`] bounds, given back when dropped.
struct Slot {
    inbox: Arc<Inbox>,
    size: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut guard) = self.inbox.in_progress.lock() {
            guard.0 = guard.0.saturating_sub(1);
            guard.1 = guard.1.saturating_sub(self.size);
        }
    }
}

/// A transfer's `.part` file: kept when the transfer is interrupted (so that the same file sent
/// again resumes from it), removed when its bytes are proven wrong or the file is refused.
struct PartFile {
    path: PathBuf,
    inbox: Arc<Inbox>,
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if let Ok(mut active) = self.inbox.active_parts.lock() {
            active.remove(&self.path);
        }
    }
}

/// The `.part` file of a transfer: one name per sender, file name and size, so that the same
/// file sent again by the same peer finds it, and no other peer's transfer ever does. (Another
/// file of the same name and size from the same peer finds it too: its first bytes hash
/// differently from what the part holds, so it starts over.)
fn part_path(dir: &Path, peer: &PeerId, name: &str, size: u64) -> PathBuf {
    let mut hasher = blake3::Hasher::new();
    hasher.update(peer.to_string().as_bytes());
    hasher.update(b"\0");
    hasher.update(name.as_bytes());
    hasher.update(b"\0");
    hasher.update(&size.to_be_bytes());
    let key = hasher.finalize().to_hex();
    dir.join(format!(".{name}.{}.part", &key[..16]))
}

/// Removes the oldest `.part` files of `dir` (by modification time) beyond `keep - 1`, leaving
/// room for one more, and never one being received now (`active`).
fn prune_parts(dir: &Path, keep: usize, active: &[PathBuf]) -> std::io::Result<usize> {
    let mut parts = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with('.') && name.ends_with(".part")) {
            continue;
        }
        let path = entry.path();
        if active.contains(&path) {
            continue;
        }
        let modified = entry
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
        parts.push((modified, path));
    }
    parts.sort();
    let excess = (parts.len() + active.len() + 1).saturating_sub(keep);
    let mut removed = 0;
    for (_, path) in parts.into_iter().take(excess) {
        if std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Hashes the first `len` bytes of `file` (from its start) into `hasher`; `Ok(false)` when the file
/// is shorter.
async fn hash_prefix(
    file: &mut tokio::fs::File,
    len: u64,
    hasher: &mut blake3::Hasher,
) -> std::io::Result<bool> {
    use tokio::io::AsyncSeekExt;
    file.seek(std::io::SeekFrom::Start(0)).await?;
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let want = left.min(CHUNK as u64) as usize;
        let n = file.read(&mut buf[..want]).await?;
        if n == 0 {
            return Ok(false);
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(true)
}

/// What a successful receive stored.
#[derive(Debug)]
struct Stored {
    path: PathBuf,
    blake3: String,
    size: u64,
    resumed_at: u64,
}

/// Receives one file on a stream whose `open` was already read; stores it in `inbox`'s
/// directory (or refuses it when this peer takes no files).
pub async fn receive(
    mut tx: quinn::SendStream,
    mut rx: quinn::RecvStream,
    peer: PeerId,
    inbox: Option<Arc<Inbox>>,
    console: &Console,
) {
    let result = receive_inner(&mut tx, &mut rx, peer, inbox, console).await;
    if result.is_err() {
        // Stop the sender's bytes at once; the verdict below tells it why.
        let _ = rx.stop(REFUSED_STREAM.into());
    }
    let reply = match &result {
        Ok(stored) => PeerMessage::FileResult {
            ok: true,
            blake3: stored.blake3.clone(),
            message: format!(
                "stored as {}",
                stored
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ),
        },
        Err((blake3, message)) => PeerMessage::FileResult {
            ok: false,
            blake3: blake3.clone(),
            message: message.clone(),
        },
    };
    let _ = write_frame(&mut tx, &reply.encode()).await;
    let _ = tx.finish();
    let _ = tokio::time::timeout(Duration::from_secs(5), tx.stopped()).await;
    match result {
        Ok(stored) => {
            let resumed = if stored.resumed_at > 0 {
                format!(", resumed at byte {}", stored.resumed_at)
            } else {
                String::new()
            };
            console
                .say(format!(
                    "received {} ({} bytes{resumed}) from {peer}, blake3 {} verified",
                    stored.path.display(),
                    stored.size,
                    stored.blake3
                ))
                .await
        }
        Err((_, message)) => {
            console
                .error(format!("did not store a file from {peer}: {message}"))
                .await
        }
    }
}

/// Why a transfer failed, and whether its `.part` file is worth keeping for a resume.
enum Failure {
    /// Interrupted (stream or connection lost, stalled): the bytes so far are kept.
    Interrupted(String),
    /// The bytes are wrong or the file was refused: the `.part` file goes.
    Bad(String),
}

async fn receive_inner(
    tx: &mut quinn::SendStream,
    rx: &mut quinn::RecvStream,
    peer: PeerId,
    inbox: Option<Arc<Inbox>>,
    console: &Console,
) -> Result<Stored, (String, String)> {
    let fail = |m: String| (String::new(), m);
    let Some(inbox) = inbox else {
        return Err(fail(
            "this peer does not accept files (start it with --accept-files DIR)".into(),
        ));
    };
    let header = tokio::time::timeout(Duration::from_secs(10), read_frame(rx))
        .await
        .map_err(|_| fail("no file header within 10 s".into()))?
        .map_err(|e| fail(e.to_string()))?
        .ok_or_else(|| fail("stream closed before the file header".into()))?;
    let (name, size) = match PeerMessage::decode(&header) {
        Ok(PeerMessage::FileHeader { name, size }) => (name, size),
        Ok(other) => {
            return Err(fail(format!(
                "expected a file header, got `{}`",
                printable(&format!("{other:?}"))
            )))
        }
        Err(e) => return Err(fail(printable(&e.to_string()))),
    };
    check_name(&name).map_err(|why| {
        fail(format!(
            "refusing the file name \"{}\": {why}",
            printable(&name)
        ))
    })?;
    let dir = inbox.dir.clone();
    let path = part_path(&dir, &peer, &name, size);
    // One transfer per .part file: a second send of the same file waits for the first to end.
    let active: Vec<PathBuf> = {
        let mut active = inbox
            .active_parts
            .lock()
            .map_err(|_| fail("internal error: the inbox lock is poisoned".into()))?;
        if !active.insert(path.clone()) {
            return Err(fail(format!(
                "{} is being received from you already",
                printable(&name)
            )));
        }
        active.iter().filter(|p| **p != path).cloned().collect()
    };
    let part = PartFile {
        path,
        inbox: inbox.clone(),
    };
    // What an interrupted transfer left: never trusted blindly, its hash goes to the sender,
    // who resumes only if it matches its own first bytes.
    let held = match std::fs::symlink_metadata(&part.path) {
        Ok(meta) if meta.is_file() && meta.len() <= size => meta.len(),
        Ok(_) => {
            let _ = std::fs::remove_file(&part.path);
            0
        }
        Err(_) => 0,
    };
    if held == 0 {
        prune_parts(&dir, MAX_KEPT_PARTS, &active)
            .map_err(|e| fail(format!("cannot list {}: {e}", dir.display())))?;
    }
    // Every bound is checked before anything is written (the bytes held are on the disk
    // already).
    let slot = inbox.admit(size, size - held).map_err(fail)?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&part.path)
        .map(tokio::fs::File::from_std)
        .map_err(|e| fail(format!("cannot create {}: {e}", part.path.display())))?;
    let mut hasher = blake3::Hasher::new();
    let held = match hash_prefix(&mut file, held, &mut hasher).await {
        Ok(true) => held,
        _ => {
            hasher = blake3::Hasher::new();
            0
        }
    };
    let resume = PeerMessage::FileResume {
        offset: held,
        prefix_blake3: hasher.finalize().to_hex().to_string(),
    };
    write_frame(tx, &resume.encode())
        .await
        .map_err(|e| fail(e.to_string()))?;
    // The sender hashes its own first bytes before it answers.
    let start = tokio::time::timeout(STALL_TIMEOUT, read_frame(rx))
        .await
        .map_err(|_| {
            fail(format!(
                "no file_start within {} s",
                STALL_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| fail(e.to_string()))?
        .ok_or_else(|| fail("stream closed before file_start".into()))?;
    let start = match PeerMessage::decode(&start) {
        Ok(PeerMessage::FileStart { offset }) if offset == held || offset == 0 => offset,
        Ok(PeerMessage::FileStart { offset }) => {
            return Err(fail(format!(
                "file_start at {offset}: only {held} (what this peer holds) or 0 may be asked"
            )))
        }
        Ok(other) => {
            return Err(fail(format!(
                "expected file_start, got `{}`",
                printable(&format!("{other:?}"))
            )))
        }
        Err(e) => return Err(fail(printable(&e.to_string()))),
    };
    if start == 0 && held > 0 {
        // The sender's first bytes differ from ours: start over.
        hasher = blake3::Hasher::new();
    }
    {
        use tokio::io::AsyncSeekExt;
        file.set_len(start)
            .await
            .and(file.seek(std::io::SeekFrom::Start(start)).await.map(|_| ()))
            .map_err(|e| fail(format!("cannot prepare {}: {e}", part.path.display())))?;
    }
    if start > 0 {
        console
            .say(format!(
                "receiving {name} ({size} bytes) from {peer}, resuming at byte {start}"
            ))
            .await;
    } else {
        console
            .say(format!("receiving {name} ({size} bytes) from {peer}"))
            .await;
    }
    // The stream is read here and the bytes are hashed and written by a blocking thread of
    // their own, behind a bounded queue: reading the stream never waits for the disk or the
    // hash, and neither waits for a round trip through tokio's blocking pool per chunk.
    let mut writer = DiskWriter::start(file.into_std().await, start, hasher, DirectIo::Try);
    let mut got = start;
    // Exactly the announced bytes, then the sender's `file_end` with the whole file's hash:
    // `Some(hash)` once both came, `None` when the stream ended before or the writer stopped.
    let outcome: Result<Option<String>, Failure> = async {
        while got < size {
            let space = writer.space();
            let want = space
                .len()
                .min(usize::try_from(size - got).unwrap_or(usize::MAX));
            let n = match tokio::time::timeout(STALL_TIMEOUT, rx.read(&mut space[..want])).await {
                Ok(Ok(Some(n))) => n,
                Ok(Ok(None)) => return Ok(None),
                Ok(Err(e)) => return Err(Failure::Interrupted(format!("transfer failed: {e}"))),
                Err(_) => {
                    return Err(Failure::Interrupted(format!(
                        "no data for {} s after {got} of {size} bytes",
                        STALL_TIMEOUT.as_secs()
                    )))
                }
            };
            got += n as u64;
            if !writer.filled(n).await {
                // The writer stopped; what it says is below.
                return Ok(None);
            }
        }
        let end = match tokio::time::timeout(STALL_TIMEOUT, read_frame(rx)).await {
            Ok(Ok(Some(end))) => end,
            Ok(Ok(None)) => return Ok(None),
            Ok(Err(e)) => {
                return Err(Failure::Interrupted(format!(
                    "transfer failed after the last byte: {e}"
                )))
            }
            Err(_) => {
                return Err(Failure::Interrupted(format!(
                    "no file_end for {} s after the last byte",
                    STALL_TIMEOUT.as_secs()
                )))
            }
        };
        match PeerMessage::decode(&end) {
            Ok(PeerMessage::FileEnd { blake3 }) if is_hash_hex(&blake3) => Ok(Some(blake3)),
            Ok(PeerMessage::FileEnd { .. }) => Err(Failure::Bad(
                "the file_end's blake3 is not 64 hex digits".into(),
            )),
            Ok(other) => Err(Failure::Bad(format!(
                "more than the announced {size} bytes, or not a file_end after them: `{}`",
                printable(&format!("{other:?}"))
            ))),
            Err(e) => Err(Failure::Bad(format!(
                "more than the announced {size} bytes, or not a file_end after them: {}",
                printable(&e.to_string())
            ))),
        }
    }
    .await;
    let Some(DiskWritten {
        file,
        hasher,
        bytes,
        direct_bytes,
        error,
    }) = writer.finish().await
    else {
        return Err(fail(format!(
            "the disk writer of {} failed",
            part.path.display()
        )));
    };
    let mut file = tokio::fs::File::from_std(file);
    let got = start + bytes;
    tracing::debug!(
        file = %part.path.display(),
        bytes,
        direct_bytes,
        "received bytes written"
    );
    let outcome = match (outcome, error) {
        (Err(Failure::Bad(m)), _) => Err(Failure::Bad(m)),
        (_, Some(e)) => Err(Failure::Interrupted(format!(
            "cannot write {}: {e}",
            part.path.display()
        ))),
        (Err(e), None) => Err(e),
        (Ok(None), None) if got == size => Err(Failure::Interrupted(
            "stream ended after the last byte, without file_end".into(),
        )),
        (Ok(None), None) => Err(Failure::Interrupted(format!(
            "stream ended after {got} of {size} bytes"
        ))),
        (Ok(Some(announced)), None) => Ok(announced),
    };
    let computed = hasher.finalize().to_hex().to_string();
    let remove = |m: String| {
        let _ = std::fs::remove_file(&part.path);
        (computed.clone(), m)
    };
    let announced = match outcome {
        Ok(announced) => announced,
        Err(Failure::Interrupted(m)) => {
            // The bytes written so far stay for a resume; they reach the disk first.
            let _ = file.flush().await;
            let _ = file.sync_data().await;
            return Err((
                computed.clone(),
                format!("{m}; {got} bytes kept: sending the same file again resumes there"),
            ));
        }
        Err(Failure::Bad(m)) => return Err(remove(m)),
    };
    if !computed.eq_ignore_ascii_case(&announced) {
        return Err(remove(format!(
            "blake3 mismatch: the sender's file hashes to {}, the bytes received to {computed}",
            printable(&announced)
        )));
    }
    // The data reaches the disk before the file gets its name, and the name before the verdict.
    file.flush()
        .await
        .and(file.sync_all().await)
        .map_err(|e| fail(format!("cannot sync {}: {e}", part.path.display())))?;
    drop(file);
    let final_path = store(&part.path, &dir, &name).map_err(remove)?;
    certs::durable::sync_dir(&dir)
        .map_err(|e| fail(format!("cannot sync the directory {}: {e}", dir.display())))?;
    drop(slot);
    Ok(Stored {
        path: final_path,
        blake3: computed,
        size,
        resumed_at: start,
    })
}

/// Gives the synced `.part` file the first free name of `name`, `name (1)`, ... in `dir`.
fn store(part: &Path, dir: &Path, name: &str) -> Result<PathBuf, String> {
    for n in 0..=MAX_SUFFIX {
        let candidate = dir.join(numbered(name, n));
        match rename_no_replace(part, &candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("cannot store {}: {e}", candidate.display())),
        }
    }
    Err(format!(
        "{} and {MAX_SUFFIX} numbered variants of it exist already in {}",
        printable(name),
        dir.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::temp_dir;

    /// Everything [`read_chunks`] hands over: the bytes, then the hash or the error it ended
    /// with.
    async fn read_all(
        path: &Path,
        start: u64,
        stamp: FileStamp,
        hasher: blake3::Hasher,
    ) -> (Vec<u8>, std::io::Result<blake3::Hash>) {
        let mut chunks = read_chunks(path.to_owned(), start, stamp, hasher);
        let mut got = Vec::new();
        while let Some(item) = chunks.recv().await {
            match item {
                Ok(ReadChunk::Bytes(chunk)) => {
                    assert!(!chunk.is_empty() && chunk.len() <= READ_BUFFER);
                    got.extend_from_slice(&chunk);
                }
                Ok(ReadChunk::End(hash)) => {
                    assert!(chunks.recv().await.is_none(), "nothing after the end");
                    return (got, Ok(hash));
                }
                Err(e) => {
                    assert!(chunks.recv().await.is_none(), "nothing after an error");
                    return (got, Err(e));
                }
            }
        }
        panic!("the reader ended without its hash or an error");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_fifo_or_a_file_that_changes_while_it_is_read_is_never_sent_as_the_file() {
        let dir = temp_dir("changes");
        // A FIFO is not a file to send, and reading it never waits for a writer.
        let fifo = dir.join("fifo");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        assert!(FileStamp::of(&fifo).is_err());
        let path = dir.join("data");
        let data: Vec<u8> = (0..3 * READ_BUFFER + 7).map(|i| (i % 241) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let stamp = FileStamp::of(&path).unwrap();
        let (got, end) = read_all(&fifo, 0, stamp, blake3::Hasher::new()).await;
        assert!(got.is_empty());
        let end = end.unwrap_err().to_string();
        assert!(end.contains("not a regular file"), "{end}");
        // Grown after it was measured: every measured byte goes, then the change is reported
        // instead of the hash.
        let mut longer = data.clone();
        longer.extend_from_slice(b"appended");
        std::fs::write(&path, &longer).unwrap();
        let (got, end) = read_all(&path, 0, stamp, blake3::Hasher::new()).await;
        assert!(got.is_empty(), "the open sees the new length already");
        assert!(end.unwrap_err().to_string().contains("changed"));
        // Shrunk while it is read (measured, then cut after the open): reported, never padded.
        // Long enough that the reader, at most its queue and one chunk ahead of us, cannot
        // reach the end before the cut.
        let data: Vec<u8> = (0..(READ_QUEUE + 4) * READ_BUFFER)
            .map(|i| (i % 241) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let stamp = FileStamp::of(&path).unwrap();
        let mut chunks = read_chunks(path.clone(), 0, stamp, blake3::Hasher::new());
        let Some(Ok(ReadChunk::Bytes(first))) = chunks.recv().await else {
            panic!("no first chunk");
        };
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(READ_BUFFER as u64 + 10)
            .unwrap();
        let mut total = first.len();
        let end = loop {
            match chunks.recv().await {
                Some(Ok(ReadChunk::Bytes(chunk))) => total += chunk.len(),
                Some(Ok(ReadChunk::End(_))) => panic!("a shrunk file was hashed as whole"),
                Some(Err(e)) => break e,
                None => panic!("no end"),
            }
        };
        assert!(total < data.len());
        let end = end.to_string();
        assert!(end.contains("shrank") || end.contains("changed"), "{end}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn the_sender_reads_the_file_from_the_start_offset_in_bounded_chunks_and_hashes_it_whole()
    {
        let dir = temp_dir("read-chunks");
        let data: Vec<u8> = (0..3 * READ_BUFFER + 99).map(|i| (i % 253) as u8).collect();
        let path = dir.join("in");
        std::fs::write(&path, &data).unwrap();
        let stamp = FileStamp::of(&path).unwrap();
        for start in [0, 1000, data.len() as u64] {
            // The hasher comes fed with the prefix (a resume); the hash covers the whole file.
            let mut hasher = blake3::Hasher::new();
            hasher.update(&data[..start as usize]);
            let (got, end) = read_all(&path, start, stamp, hasher).await;
            assert_eq!(got, data[start as usize..]);
            assert_eq!(end.unwrap(), blake3::hash(&data));
        }
        let (got, end) = read_all(&dir.join("missing"), 0, stamp, blake3::Hasher::new()).await;
        assert!(got.is_empty());
        assert_eq!(end.unwrap_err().kind(), std::io::ErrorKind::NotFound);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn names_cannot_escape_the_directory_or_hide_characters() {
        assert_eq!(check_name("report.pdf"), Ok(()));
        assert_eq!(check_name("résumé final.txt"), Ok(()));
        for (bad, why) in [
            ("", "empty"),
            (".", "not a file name"),
            ("..", "not a file name"),
            ("../etc/passwd", "path separator"),
            ("a/b", "path separator"),
            ("a\\b", "path separator"),
            (".hidden", "leading dot"),
            ("x\0y", "control"),
            ("bell\u{7}", "control"),
            ("esc\u{1b}[2J", "control"),
            ("new\nline", "control"),
            ("del\u{7f}", "control"),
            ("c1\u{9b}", "control"),
            ("evil\u{202e}fdp.exe", "invisible"),
        ] {
            let err = check_name(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
            // The reason never carries the character itself.
            assert!(!err.chars().any(is_hidden), "{err:?}");
        }
        assert!(check_name(&"x".repeat(256)).unwrap_err().contains("255"));
        assert_eq!(check_name(&"x".repeat(255)), Ok(()));
    }

    #[test]
    fn printable_escapes_what_a_terminal_would_obey() {
        assert_eq!(printable("plain ü"), "plain ü");
        assert_eq!(printable("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(printable("x\u{202e}y"), "x\\u{202e}y");
    }

    #[test]
    fn numbered_names_keep_the_extension() {
        assert_eq!(numbered("report.pdf", 0), "report.pdf");
        assert_eq!(numbered("report.pdf", 1), "report (1).pdf");
        assert_eq!(numbered("archive.tar.gz", 2), "archive.tar (2).gz");
        assert_eq!(numbered("README", 3), "README (3)");
    }

    #[test]
    fn storing_never_replaces_a_file() {
        let dir = temp_dir("store");
        let mut stored = Vec::new();
        for content in ["first", "second", "third"] {
            let part = dir.join(format!(".{content}.part"));
            std::fs::write(&part, content).unwrap();
            stored.push(store(&part, &dir, "report.pdf").unwrap());
            assert!(!part.exists(), "the .part file is gone once stored");
        }
        assert_eq!(
            stored,
            vec![
                dir.join("report.pdf"),
                dir.join("report (1).pdf"),
                dir.join("report (2).pdf")
            ]
        );
        for (path, content) in stored.iter().zip(["first", "second", "third"]) {
            assert_eq!(std::fs::read_to_string(path).unwrap(), content);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn concurrent_stores_of_one_name_all_get_their_own_file() {
        let dir = temp_dir("race");
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let part = dir.join(format!(".x.{i}.part"));
                    std::fs::write(&part, i.to_string()).unwrap();
                    store(&part, &dir, "same.bin").unwrap()
                })
            })
            .collect();
        let mut paths: Vec<PathBuf> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), 16, "every store got a distinct name");
        let mut contents: Vec<u32> = paths
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap().parse().unwrap())
            .collect();
        contents.sort();
        assert_eq!(
            contents,
            (0..16).collect::<Vec<u32>>(),
            "nothing overwritten"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn space_check_counts_transfers_in_progress_and_the_reserve() {
        let gib = 1u64 << 30;
        assert!(check_space(gib, 2 * gib, 0).is_ok());
        assert!(check_space(gib, 2 * gib, gib).is_err());
        assert!(check_space(gib, gib, 0).is_err(), "the reserve stays free");
        assert!(check_space(u64::MAX, u64::MAX, 0).is_err());
        let err = check_space(10, DISK_RESERVE, 0).unwrap_err();
        assert!(err.contains("not enough disk space"), "{err}");
    }

    #[test]
    fn the_inbox_bounds_size_and_concurrency_and_frees_slots() {
        let dir = temp_dir("inbox");
        let inbox = Inbox::new(dir.clone(), 1000);
        let err = inbox.admit(1001, 1001).err().unwrap();
        assert!(err.contains("--max-file-size"), "{err}");
        assert!(available_bytes(&dir).unwrap() > 0);
        let slots: Vec<Slot> = (0..MAX_CONCURRENT_RECEIVES)
            .map(|_| inbox.admit(1000, 1000).unwrap())
            .collect();
        let err = inbox.admit(1, 1).err().unwrap();
        assert!(err.contains("being received already"), "{err}");
        assert_eq!(
            *inbox.in_progress.lock().unwrap(),
            (
                MAX_CONCURRENT_RECEIVES,
                1000 * MAX_CONCURRENT_RECEIVES as u64
            )
        );
        drop(slots);
        assert_eq!(*inbox.in_progress.lock().unwrap(), (0, 0));
        assert!(inbox.admit(1000, 1000).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kept_part_files_are_bounded_oldest_first_and_never_an_active_one() {
        let dir = temp_dir("prune");
        let mut paths = Vec::new();
        for i in 0..MAX_KEPT_PARTS + 4 {
            let path = dir.join(format!(".f{i:02}.bin.0011223344556677.part"));
            std::fs::write(&path, "x").unwrap();
            let when = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1000 + i as u64);
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(when)
                .unwrap();
            paths.push(path);
        }
        std::fs::write(dir.join("received.bin"), "kept").unwrap();
        // The oldest is being received now: it stays, the next oldest go.
        let active = vec![paths[0].clone()];
        let removed = prune_parts(&dir, MAX_KEPT_PARTS, &active).unwrap();
        assert_eq!(removed, 5);
        let left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".part"))
            .collect();
        assert_eq!(
            left.len(),
            MAX_KEPT_PARTS - 1,
            "room for one more: {left:?}"
        );
        assert!(paths[0].exists(), "the active one stays");
        for gone in &paths[1..6] {
            assert!(!gone.exists(), "{} is among the oldest", gone.display());
        }
        assert!(
            dir.join("received.bin").exists(),
            "received files are never pruned"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn part_names_differ_by_sender_and_file() {
        let dir = Path::new("/inbox");
        let (a, b) = (
            PeerId::from_key_digest(&[1; 32]),
            PeerId::from_key_digest(&[2; 32]),
        );
        let base = part_path(dir, &a, "x.bin", 10);
        assert_eq!(base, part_path(dir, &a, "x.bin", 10));
        assert!(base
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(".x.bin."));
        for other in [
            part_path(dir, &b, "x.bin", 10),
            part_path(dir, &a, "y.bin", 10),
            part_path(dir, &a, "x.bin", 11),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn progress_lines_show_the_rate_and_the_time_left() {
        let line = progress(60 << 20, 10 << 20, 110 << 20, Duration::from_secs(5));
        // 50 MiB in 5 s: 10.5 MB/s, 50 MiB left: 5 s.
        assert!(line.contains("10.5 MB/s"), "{line}");
        assert!(line.contains("0:05 left"), "{line}");
        assert!(line.contains(" 54.5%"), "{line}");
    }
}

/// The receiver and the sender over a real QUIC connection on loopback.
#[cfg(test)]
mod wire_tests {
    use super::*;
    use crate::node::Node;

    struct Pair {
        /// Kept alive: dropping a node's STUN channel or endpoint ends the connection.
        _nodes: (Node, Node),
        _stun: Vec<tokio::sync::mpsc::Receiver<transport::StunDatagram>>,
        dialer: quinn::Connection,
        acceptor: quinn::Connection,
        dialer_id: PeerId,
    }

    async fn pair() -> Pair {
        let settings = transport::TransportSettings::default();
        let node = || {
            let identity = Arc::new(certs::Identity::generate().unwrap());
            Node::bind("127.0.0.1:0".parse().unwrap(), identity, settings).unwrap()
        };
        let ((a, a_stun), (b, b_stun)) = (node(), node());
        let target = b.local_addr().unwrap();
        let accept = tokio::spawn({
            let endpoint = b.endpoint.clone();
            async move { endpoint.accept().await.unwrap().await.unwrap() }
        });
        let dialer = a
            .dial(b.identity.id(), target, Duration::from_secs(10))
            .await
            .unwrap();
        let acceptor = accept.await.unwrap();
        let dialer_id = a.identity.id();
        Pair {
            _nodes: (a, b),
            _stun: vec![a_stun, b_stun],
            dialer,
            acceptor,
            dialer_id,
        }
    }

    /// Accepts the next stream on `pair.acceptor` and runs [`receive`] on it in a task.
    fn serve_one(pair: &Pair, inbox: Arc<Inbox>) -> tokio::task::JoinHandle<()> {
        let conn = pair.acceptor.clone();
        let peer = pair.dialer_id;
        tokio::spawn(async move {
            let (console, _printer) = Console::start_with(true);
            let (mut tx, mut rx) = conn.accept_bi().await.unwrap();
            let app = crate::chat::accept(&mut tx, &mut rx).await.unwrap();
            assert_eq!(app, PeerApp::File);
            receive(tx, rx, peer, Some(inbox), &console).await
        })
    }

    fn temp_inbox(tag: &str, max_size: u64) -> (PathBuf, Arc<Inbox>) {
        let dir = crate::test_support::temp_dir(&format!("wire-{tag}"));
        (dir.clone(), Inbox::new(dir, max_size))
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Opens a file stream and sends a header; returns the stream halves.
    async fn open_with_header(
        conn: &quinn::Connection,
        name: &str,
        size: u64,
    ) -> (quinn::SendStream, quinn::RecvStream) {
        let (mut tx, rx) = conn.open_bi().await.unwrap();
        write_frame(&mut tx, &PeerMessage::Open { app: PeerApp::File }.encode())
            .await
            .unwrap();
        let header = PeerMessage::FileHeader {
            name: name.into(),
            size,
        };
        write_frame(&mut tx, &header.encode()).await.unwrap();
        (tx, rx)
    }

    #[tokio::test]
    async fn a_name_with_a_control_character_is_refused_to_the_sender_with_the_reason() {
        let pair = pair().await;
        let (dir, inbox) = temp_inbox("name", 1 << 20);
        let served = serve_one(&pair, inbox);
        let (_tx, mut rx) = open_with_header(&pair.dialer, "esc\u{1b}[2J.txt", 3).await;
        let reply = read_frame(&mut rx).await.unwrap().unwrap();
        let PeerMessage::FileResult { ok, message, .. } = PeerMessage::decode(&reply).unwrap()
        else {
            panic!("not a file result");
        };
        assert!(!ok);
        assert!(
            message.contains("control") && message.contains("\\u{1b}"),
            "{message}"
        );
        assert!(!message.contains('\u{1b}'), "{message:?}");
        served.await.unwrap();
        assert!(entries(&dir).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn an_oversized_file_is_refused_before_a_byte_is_written_and_the_sender_says_why() {
        let pair = pair().await;
        let (dir, inbox) = temp_inbox("big", 1024);
        let served = serve_one(&pair, inbox);
        let source_dir = dir.with_extension("src");
        std::fs::create_dir_all(&source_dir).unwrap();
        let source = source_dir.join("big.bin");
        // Far more than the stream window: the refusal comes instead of `file_resume`, before
        // the sender writes a byte of it.
        std::fs::write(&source, vec![1u8; 8 << 20]).unwrap();
        let (console, _printer) = Console::start_with(true);
        let err = send(&pair.dialer, &source, &console).await.unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("the receiver refused big.bin") && err.contains("--max-file-size"),
            "{err}"
        );
        served.await.unwrap();
        assert!(
            entries(&dir).is_empty(),
            "nothing written: {:?}",
            entries(&dir)
        );
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&source_dir).unwrap();
    }

    /// Reads the receiver's `file_resume` and answers `file_start` at `offset`; returns what
    /// the receiver said it holds.
    async fn start_at(
        tx: &mut quinn::SendStream,
        rx: &mut quinn::RecvStream,
        offset: Option<u64>,
    ) -> u64 {
        let answer = read_frame(rx).await.unwrap().unwrap();
        let PeerMessage::FileResume { offset: held, .. } = PeerMessage::decode(&answer).unwrap()
        else {
            panic!("not a file_resume");
        };
        let start = PeerMessage::FileStart {
            offset: offset.unwrap_or(held),
        };
        write_frame(tx, &start.encode()).await.unwrap();
        held
    }

    async fn wait_for_part(dir: &Path, at_least: u64) -> PathBuf {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let part = entries(dir)
                .into_iter()
                .find(|n| n.ends_with(".part"))
                .map(|n| dir.join(n));
            if let Some(part) =
                part.filter(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) >= at_least)
            {
                return part;
            }
            assert!(
                Instant::now() < deadline,
                "no .part file: {:?}",
                entries(dir)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn pseudo_random(len: usize) -> Vec<u8> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    #[tokio::test]
    async fn an_interrupted_transfer_keeps_its_part_file_and_the_same_file_resumes_from_it() {
        let pair = pair().await;
        let (dir, inbox) = temp_inbox("resume", 1 << 30);
        let source_dir = dir.with_extension("src");
        std::fs::create_dir_all(&source_dir).unwrap();
        let source = source_dir.join("half.bin");
        let content = pseudo_random(4 << 20);
        std::fs::write(&source, &content).unwrap();
        let size = content.len() as u64;
        // A first transfer sends 1 MiB and is reset: the receiver keeps what it got.
        let served = serve_one(&pair, inbox.clone());
        let (mut tx, mut rx) = pair.dialer.open_bi().await.unwrap();
        write_frame(&mut tx, &PeerMessage::Open { app: PeerApp::File }.encode())
            .await
            .unwrap();
        let header = PeerMessage::FileHeader {
            name: "half.bin".into(),
            size,
        };
        write_frame(&mut tx, &header.encode()).await.unwrap();
        assert_eq!(start_at(&mut tx, &mut rx, None).await, 0);
        tx.write_all(&content[..1 << 20]).await.unwrap();
        let part = wait_for_part(&dir, 1 << 20).await;
        tx.reset(7u32.into()).unwrap();
        served.await.unwrap();
        assert_eq!(std::fs::metadata(&part).unwrap().len(), 1 << 20, "kept");
        assert_eq!(mode_of(&part), 0o600);
        // The same file again: only the rest crosses, and the whole is verified.
        let served = serve_one(&pair, inbox);
        let (console, _printer) = Console::start_with(true);
        let summary = send(&pair.dialer, &source, &console).await.unwrap();
        assert!(summary.contains("resumed at byte 1048576"), "{summary}");
        served.await.unwrap();
        assert_eq!(entries(&dir), ["half.bin"]);
        assert_eq!(std::fs::read(dir.join("half.bin")).unwrap(), content);
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&source_dir).unwrap();
    }

    fn mode_of(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn a_part_file_that_does_not_match_the_senders_bytes_is_never_used() {
        let pair = pair().await;
        let (dir, inbox) = temp_inbox("forged", 1 << 30);
        let source_dir = dir.with_extension("src");
        std::fs::create_dir_all(&source_dir).unwrap();
        let source = source_dir.join("data.bin");
        let content = pseudo_random(1 << 20);
        std::fs::write(&source, &content).unwrap();
        // Half of the file, but wrong bytes, where this sender's .part file would be.
        let part = part_path(&dir, &pair.dialer_id, "data.bin", content.len() as u64);
        std::fs::write(&part, vec![0xAA; 512 << 10]).unwrap();
        let served = serve_one(&pair, inbox);
        let (console, _printer) = Console::start_with(true);
        let summary = send(&pair.dialer, &source, &console).await.unwrap();
        assert!(!summary.contains("resumed"), "{summary}");
        served.await.unwrap();
        assert_eq!(entries(&dir), ["data.bin"]);
        assert_eq!(std::fs::read(dir.join("data.bin")).unwrap(), content);
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&source_dir).unwrap();
    }

    #[tokio::test]
    async fn a_sender_asking_to_start_past_what_the_receiver_holds_is_refused() {
        let pair = pair().await;
        let (dir, inbox) = temp_inbox("offset", 1 << 30);
        let served = serve_one(&pair, inbox);
        let (mut tx, mut rx) = open_with_header(&pair.dialer, "skip.bin", 1 << 20).await;
        assert_eq!(start_at(&mut tx, &mut rx, Some(1000)).await, 0);
        let reply = read_frame(&mut rx).await.unwrap().unwrap();
        let PeerMessage::FileResult { ok, message, .. } = PeerMessage::decode(&reply).unwrap()
        else {
            panic!("not a file result");
        };
        assert!(!ok);
        assert!(message.contains("file_start at 1000"), "{message}");
        served.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_receiver_claiming_more_than_the_file_is_not_believed() {
        let (dir, _inbox) = temp_inbox("claim", 1);
        let source = dir.join("f.bin");
        std::fs::write(&source, pseudo_random(1000)).unwrap();
        let err = resume_point(&source, 1000, 1001, "00").await.unwrap_err();
        assert!(err.to_string().contains("claims 1001 bytes"), "{err}");
        assert_eq!(resume_point(&source, 1000, 500, "00").await.unwrap().0, 0);
        let prefix = blake3::hash(&pseudo_random(1000)[..500])
            .to_hex()
            .to_string();
        let (start, hasher) = resume_point(&source, 1000, 500, &prefix).await.unwrap();
        assert_eq!(start, 500);
        // The sender goes on hashing from there: the hasher holds the prefix.
        assert_eq!(hasher.finalize().to_hex().as_str(), prefix);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_complete_file_is_stored_under_a_free_name_and_verified() {
        let pair = pair().await;
        let (dir, inbox) = temp_inbox("ok", 1 << 20);
        std::fs::write(dir.join("notes.txt"), "already here").unwrap();
        let served = serve_one(&pair, inbox);
        let source_dir = dir.with_extension("src");
        std::fs::create_dir_all(&source_dir).unwrap();
        let source = source_dir.join("notes.txt");
        std::fs::write(&source, "new notes").unwrap();
        let (console, _printer) = Console::start_with(true);
        let summary = send(&pair.dialer, &source, &console).await.unwrap();
        assert!(summary.contains("stored as notes (1).txt"), "{summary}");
        served.await.unwrap();
        assert_eq!(entries(&dir), ["notes (1).txt", "notes.txt"]);
        assert_eq!(
            std::fs::read_to_string(dir.join("notes.txt")).unwrap(),
            "already here"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("notes (1).txt")).unwrap(),
            "new notes"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&source_dir).unwrap();
    }
}
