//! The receiving side's disk writer: a blocking thread that hashes and writes a received file's
//! bytes, behind a bounded queue, with direct I/O where the file system offers it.
//!
//! Why a module of its own: writing is the largest cost of a receive that is ours rather than
//! quinn's, and how it is done (buffers aligned for direct I/O, an unaligned head and tail
//! written through the page cache, the fallback when a file system refuses direct I/O) is a
//! small state machine with its own tests, apart from the protocol checks of [`crate::files`].
//!
//! **Direct I/O (Linux).** A received file is written with `O_DIRECT`: the disk reads the bytes
//! from our buffer, instead of the CPU copying them into the page cache first and the kernel's
//! write-back threads writing them out later. A file of gigabytes then neither costs a copy of
//! every byte (measured on a 2-core VM: 0.4 to 3.8 CPU seconds per GB for the page-cache copy
//! alone, against 0.15 for the direct write; docs/benchmarks.md) nor pushes everything else out
//! of the page cache. Direct I/O needs file offsets, lengths and memory addresses aligned to the
//! device's block size ([`DIRECT_ALIGN`] covers every common device): the buffers are aligned,
//! the first buffer of a resumed transfer ends where the file offset becomes aligned, and the
//! last few bytes of a file (less than one block) go through the page cache. A file system that
//! refuses direct I/O (tmpfs before Linux 6.6, some FUSE and network file systems) refuses it
//! when the flag is set or at the first direct write, with `EINVAL`: the writer then writes
//! through the page cache, as everywhere but Linux. Nothing changes in what is guaranteed: the
//! receiver still `fsync`s the file and its directory before its verdict (direct I/O does not
//! flush the disk's own cache, nor the file's size).

use std::io::Write;

/// Bytes of one buffer between the stream reader and the disk writer.
pub(crate) const WRITE_BUFFER: usize = 1024 * 1024;
/// Buffers queued for the disk writer (so at most this many + 2 buffers in memory per receive).
pub(crate) const WRITE_QUEUE: usize = 4;
/// The disk writer asks the kernel to start writing back every this many bytes it wrote through
/// the page cache (see [`start_writeback`]).
pub(crate) const WRITEBACK_EVERY: u64 = 8 * 1024 * 1024;
/// Alignment of direct I/O: file offsets, lengths and buffer addresses are multiples of it. The
/// logical block size of disks is 512 or 4,096 bytes; 4,096 suits both.
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// One buffer of [`WRITE_BUFFER`] usable bytes starting at an address aligned to
/// [`DIRECT_ALIGN`], and how many of them hold data.
pub(crate) struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new() -> AlignedBuf {
        let storage = vec![0u8; WRITE_BUFFER + DIRECT_ALIGN];
        // `align_offset` may decline (usize::MAX); the region then starts unaligned and its
        // bytes are written through the page cache (see `FileSink::write`).
        let start = match storage.as_ptr().align_offset(DIRECT_ALIGN) {
            offset if offset < DIRECT_ALIGN => offset,
            _ => 0,
        };
        AlignedBuf {
            storage,
            start,
            len: 0,
        }
    }

    fn region(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + WRITE_BUFFER]
    }

    fn data(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

/// Whether a file is written with direct I/O: whether to try, for tests and for platforms
/// without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DirectIo {
    /// Direct I/O where the file system takes it (Linux), the page cache elsewhere.
    Try,
    /// The page cache only.
    #[cfg(test)]
    Off,
}

/// The operations the writer needs of a file: a trait so that tests can refuse direct writes
/// or cut writes short, as some file systems do.
pub(crate) trait SinkFile: Send + 'static {
    /// Sets or clears direct I/O on the open file.
    fn set_direct(&mut self, on: bool) -> std::io::Result<()>;
    /// Writes some of `buf` at the file's position (`write(2)`).
    fn write_some(&mut self, buf: &[u8]) -> std::io::Result<usize>;
    /// Starts the write-back of a range written through the page cache (a hint).
    fn start_writeback(&self, offset: u64, len: u64);
}

impl SinkFile for std::fs::File {
    #[cfg(target_os = "linux")]
    fn set_direct(&mut self, on: bool) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = self.as_raw_fd();
        // SAFETY: `fd` is open (we hold the file); F_GETFL and F_SETFL read and write no memory
        // of ours.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let wanted = if on {
            flags | libc::O_DIRECT
        } else {
            flags & !libc::O_DIRECT
        };
        if wanted == flags {
            return Ok(());
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, wanted) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    #[cfg(not(target_os = "linux"))]
    fn set_direct(&mut self, on: bool) -> std::io::Result<()> {
        if on {
            Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
        } else {
            Ok(())
        }
    }

    fn write_some(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write(buf)
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        start_writeback(self, offset, len);
    }
}

/// The writer thread's file: where it is, whether direct I/O is on, and what went which way.
struct FileSink<F: SinkFile> {
    file: F,
    /// The file offset of the next byte.
    pos: u64,
    /// Direct I/O may still be used (not refused, not turned off).
    direct_allowed: bool,
    /// Direct I/O is set on the file now.
    direct_on: bool,
    /// Bytes written with direct I/O.
    direct_bytes: u64,
    /// Where the page-cache bytes not yet handed to write-back start.
    written_back: u64,
}

impl<F: SinkFile> FileSink<F> {
    fn new(file: F, pos: u64, direct: DirectIo) -> FileSink<F> {
        FileSink {
            file,
            pos,
            direct_allowed: direct == DirectIo::Try,
            direct_on: false,
            direct_bytes: 0,
            written_back: pos,
        }
    }

    /// Writes all of `data` at the current position: its block-aligned part with direct I/O
    /// when the position and the address allow it, the rest through the page cache.
    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        let mut rest = data;
        while !rest.is_empty() {
            let aligned = self.direct_allowed
                && self.pos.is_multiple_of(DIRECT_ALIGN as u64)
                && (rest.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN);
            let direct_len = if aligned {
                rest.len() - rest.len() % DIRECT_ALIGN
            } else {
                0
            };
            let direct = direct_len > 0
                && match self.set_direct(true) {
                    Ok(()) => true,
                    Err(_) => {
                        // This file system takes no direct I/O: the page cache from now on.
                        self.direct_allowed = false;
                        false
                    }
                };
            if !direct {
                self.set_direct(false)?;
            }
            let piece = if direct { &rest[..direct_len] } else { rest };
            match self.file.write_some(piece) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    rest = &rest[n..];
                    self.pos += n as u64;
                    if direct {
                        self.direct_bytes += n as u64;
                        // Page-cache bytes before a direct write are the kernel's to write back
                        // already (it flushes them before writing around them).
                        self.written_back = self.pos;
                    } else if self.pos - self.written_back >= WRITEBACK_EVERY {
                        self.file
                            .start_writeback(self.written_back, self.pos - self.written_back);
                        self.written_back = self.pos;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                    // Refused at the write rather than when the flag was set (some file
                    // systems do): the same bytes go through the page cache.
                    self.direct_allowed = false;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sets direct I/O on the file (`on`) or clears it, unless it is so already.
    fn set_direct(&mut self, on: bool) -> std::io::Result<()> {
        if self.direct_on != on {
            self.file.set_direct(on)?;
            self.direct_on = on;
        }
        Ok(())
    }

    /// The file, with direct I/O cleared. (Should that fail, nothing that follows needs it
    /// cleared: `fsync`, the rename and a resume's `fsync` work the same on a file in direct
    /// mode.)
    fn into_file(mut self) -> F {
        let _ = self.set_direct(false);
        self.file
    }
}

/// The disk writer: a blocking thread that hashes and writes the buffers it is queued (bounded:
/// [`WRITE_QUEUE`] of [`WRITE_BUFFER`] bytes), and hands each buffer back for reuse. The reader
/// fills [`DiskWriter::space`] and reports with [`DiskWriter::filled`]. (The stream is copied
/// into these buffers rather than queueing quinn's chunks as they are: a chunk keeps its whole
/// received datagram batch alive, so a peer sending tiny frames could make a queue of chunks hold
/// far more memory than the bytes it carries.)
pub(crate) struct DiskWriter<F: SinkFile = std::fs::File> {
    queue: tokio::sync::mpsc::Sender<AlignedBuf>,
    spare: std::sync::mpsc::Receiver<AlignedBuf>,
    thread: tokio::task::JoinHandle<DiskWritten<F>>,
    buf: AlignedBuf,
    /// Bytes the current buffer takes before it is queued: [`WRITE_BUFFER`], except the first
    /// buffer of a file whose offset is not block-aligned, which ends where it becomes aligned
    /// (so that every later buffer can be written directly).
    limit: usize,
}

/// What the disk writer did: the file, the hash of every byte it wrote, how many it wrote (and
/// how many of them directly), and the write error it stopped at (after which it writes nothing
/// more).
pub(crate) struct DiskWritten<F: SinkFile = std::fs::File> {
    /// The file written.
    pub file: F,
    /// The hash of the bytes before the offset it started at, and of every byte it wrote.
    pub hasher: blake3::Hasher,
    /// Bytes written.
    pub bytes: u64,
    /// Of them, written with direct I/O.
    pub direct_bytes: u64,
    /// The first write error (nothing was written after it).
    pub error: Option<std::io::Error>,
}

impl<F: SinkFile> DiskWriter<F> {
    /// Starts the writer on `file`, positioned at byte `offset`; `hasher` holds the hash of the
    /// bytes before it.
    pub(crate) fn start(
        file: F,
        offset: u64,
        hasher: blake3::Hasher,
        direct: DirectIo,
    ) -> DiskWriter<F> {
        let (queue, mut buffers) = tokio::sync::mpsc::channel::<AlignedBuf>(WRITE_QUEUE);
        let (spare_tx, spare) = std::sync::mpsc::channel();
        let thread = tokio::task::spawn_blocking(move || {
            let mut sink = FileSink::new(file, offset, direct);
            let mut hasher = hasher;
            let mut bytes = 0u64;
            let mut error = None;
            while let Some(buf) = buffers.blocking_recv() {
                if error.is_none() {
                    let data = buf.data();
                    match sink.write(data) {
                        Ok(()) => {
                            hasher.update(data);
                            bytes += data.len() as u64;
                        }
                        Err(e) => error = Some(e),
                    }
                }
                // The reader may be gone already; the buffer is then just freed.
                let _ = spare_tx.send(buf);
            }
            DiskWritten {
                direct_bytes: sink.direct_bytes,
                file: sink.into_file(),
                hasher,
                bytes,
                error,
            }
        });
        let head = (DIRECT_ALIGN - (offset % DIRECT_ALIGN as u64) as usize) % DIRECT_ALIGN;
        DiskWriter {
            queue,
            spare,
            thread,
            buf: AlignedBuf::new(),
            limit: if head == 0 { WRITE_BUFFER } else { head },
        }
    }

    /// Where the next bytes go.
    pub(crate) fn space(&mut self) -> &mut [u8] {
        let (filled, limit) = (self.buf.len, self.limit);
        &mut self.buf.region()[filled..limit]
    }

    /// `n` bytes were put into [`DiskWriter::space`]; a full buffer is queued for the writer
    /// (waiting while the queue is full). False if the writer is gone.
    pub(crate) async fn filled(&mut self, n: usize) -> bool {
        self.buf.len = (self.buf.len + n).min(self.limit);
        if self.buf.len < self.limit {
            return true;
        }
        let mut next = self.spare.try_recv().unwrap_or_else(|_| AlignedBuf::new());
        next.len = 0;
        self.limit = WRITE_BUFFER;
        let full = std::mem::replace(&mut self.buf, next);
        self.queue.send(full).await.is_ok()
    }

    /// Queues what is left and waits for the writer to write everything queued. `None` if the
    /// writer thread failed (it does not, short of a panic).
    pub(crate) async fn finish(self) -> Option<DiskWritten<F>> {
        if self.buf.len > 0 {
            let _ = self.queue.send(self.buf).await;
        }
        drop(self.queue);
        self.thread.await.ok()
    }
}

/// Asks the kernel to start writing `len` bytes of `file` from `offset` back to the disk, without
/// waiting for it. Only a head start for the `fsync` at the end, which is what guarantees the
/// bytes are on the disk (and reports any error): a failure here is ignored.
#[cfg(target_os = "linux")]
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (
        libc::off64_t::try_from(offset),
        libc::off64_t::try_from(len),
    ) else {
        return;
    };
    // SAFETY: the descriptor is open (we hold `file`); the call reads no memory of ours.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Elsewhere the final `fsync` does all the work.
#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &std::fs::File, _offset: u64, _len: u64) {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::temp_dir;
    use std::sync::{Arc, Mutex};

    fn pattern(len: usize, seed: usize) -> Vec<u8> {
        (0..len).map(|i| ((i + seed) * 31 % 251) as u8).collect()
    }

    /// Feeds `data` to a writer in odd-sized pieces, as reads from a stream come.
    async fn feed<F: SinkFile>(writer: &mut DiskWriter<F>, data: &[u8]) {
        let mut at = 0;
        while at < data.len() {
            let space = writer.space();
            assert!(!space.is_empty());
            let n = space.len().min(7777).min(data.len() - at);
            space[..n].copy_from_slice(&data[at..at + n]);
            at += n;
            assert!(writer.filled(n).await);
        }
    }

    /// Whether direct I/O works in `dir` (it does on ext4 and xfs, not on tmpfs before 6.6).
    fn direct_io_works(dir: &std::path::Path) -> bool {
        let path = dir.join("direct-probe");
        let Ok(mut file) = std::fs::File::create(&path) else {
            return false;
        };
        let mut buf = AlignedBuf::new();
        buf.len = DIRECT_ALIGN;
        let works = buf.start < DIRECT_ALIGN
            && file.set_direct(true).is_ok()
            && matches!(file.write_some(buf.data()), Ok(n) if n == DIRECT_ALIGN);
        let _ = std::fs::remove_file(&path);
        works
    }

    /// Whether `dir` is on ext4, xfs or btrfs (which take direct I/O).
    #[cfg(target_os = "linux")]
    fn takes_direct_io(dir: &std::path::Path) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
            return false;
        };
        // SAFETY: `path` is a NUL-terminated string and `stat` a buffer statfs fills.
        let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
            return false;
        }
        const EXT4: i64 = 0xEF53;
        const XFS: i64 = 0x5846_5342;
        const BTRFS: i64 = 0x9123_683E;
        #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
        let kind = stat.f_type as i64;
        [EXT4, XFS, BTRFS].contains(&kind)
    }

    #[cfg(not(target_os = "linux"))]
    fn takes_direct_io(_dir: &std::path::Path) -> bool {
        false
    }

    /// Bytes a writer started at `offset` writes directly out of `len` (when the file system
    /// takes direct I/O): everything after the unaligned head, but the last partial block.
    fn expected_direct(offset: u64, len: usize) -> u64 {
        let head = (DIRECT_ALIGN - (offset % DIRECT_ALIGN as u64) as usize) % DIRECT_ALIGN;
        let after_head = len - head.min(len);
        (after_head - after_head % DIRECT_ALIGN) as u64
    }

    #[tokio::test]
    async fn every_byte_is_written_in_order_and_hashed_at_any_offset_and_length() {
        let dir = temp_dir("offsets");
        let direct = direct_io_works(&dir);
        // Not a silent skip: where the file system is known to take direct I/O, it must have.
        assert!(
            direct || !takes_direct_io(&dir),
            "direct I/O refused in {}",
            dir.display()
        );
        let lengths = [
            0,
            1,
            DIRECT_ALIGN - 1,
            DIRECT_ALIGN,
            DIRECT_ALIGN + 1,
            WRITE_BUFFER - 1,
            WRITE_BUFFER + DIRECT_ALIGN + 17,
            3 * WRITE_BUFFER,
        ];
        let mut case = 0;
        for offset in [
            0u64,
            10,
            DIRECT_ALIGN as u64,
            DIRECT_ALIGN as u64 + 1,
            1_000_003,
        ] {
            for len in lengths {
                for mode in [DirectIo::Try, DirectIo::Off] {
                    case += 1;
                    let path = dir.join(format!("out-{case}"));
                    // A resumed file: the bytes held, then the writer appends after them.
                    let held = pattern(offset as usize, 7);
                    std::fs::write(&path, &held).unwrap();
                    let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                    {
                        use std::io::Seek;
                        file.seek(std::io::SeekFrom::End(0)).unwrap();
                    }
                    let mut hasher = blake3::Hasher::new();
                    hasher.update(&held);
                    let data = pattern(len, case);
                    let mut writer = DiskWriter::start(file, offset, hasher, mode);
                    feed(&mut writer, &data).await;
                    let done = writer.finish().await.unwrap();
                    let what = format!("offset {offset}, {len} bytes, {mode:?}");
                    assert!(done.error.is_none(), "{what}: {:?}", done.error);
                    assert_eq!(done.bytes, len as u64, "{what}");
                    let mut expected = held;
                    expected.extend_from_slice(&data);
                    assert_eq!(done.hasher.finalize(), blake3::hash(&expected), "{what}");
                    assert!(std::fs::read(&path).unwrap() == expected, "{what}: content");
                    let direct_bytes = if direct && mode == DirectIo::Try {
                        expected_direct(offset, len)
                    } else {
                        0
                    };
                    assert_eq!(done.direct_bytes, direct_bytes, "{what}");
                    std::fs::remove_file(&path).unwrap();
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_long_file_through_the_page_cache_is_handed_to_write_back_and_a_write_error_is_reported(
    ) {
        let dir = temp_dir("long");
        let path = dir.join("out");
        let data = pattern(2 * WRITEBACK_EVERY as usize + 5 * WRITE_BUFFER + 12345, 3);
        let file = std::fs::File::create(&path).unwrap();
        let mut writer = DiskWriter::start(file, 0, blake3::Hasher::new(), DirectIo::Off);
        feed(&mut writer, &data).await;
        let done = writer.finish().await.unwrap();
        assert!(done.error.is_none());
        assert_eq!(done.bytes, data.len() as u64);
        assert_eq!(done.hasher.finalize(), blake3::hash(&data));
        assert!(std::fs::read(&path).unwrap() == data);

        // A file it cannot write: the error is reported, nothing is counted as written.
        for mode in [DirectIo::Try, DirectIo::Off] {
            let read_only = std::fs::File::open(&path).unwrap();
            let mut writer = DiskWriter::start(read_only, 0, blake3::Hasher::new(), mode);
            feed(&mut writer, &pattern(WRITE_BUFFER + 10, 1)).await;
            let done = writer.finish().await.unwrap();
            assert!(done.error.is_some(), "{mode:?}");
            assert_eq!(done.bytes, 0, "{mode:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What a [`FakeFile`] is told to do.
    #[derive(Debug, Clone, Copy, Default)]
    struct Behaviour {
        /// Setting direct I/O fails (the file system has none).
        refuse_flag: bool,
        /// Direct writes fail with EINVAL (refused at the write).
        refuse_direct_writes: bool,
        /// Every write takes at most this many bytes.
        short: Option<usize>,
    }

    /// One write a [`FakeFile`] saw.
    #[derive(Debug, Clone, Copy)]
    struct SeenWrite {
        direct: bool,
        pos: u64,
        len: usize,
        addr: usize,
    }

    /// A file in memory that holds direct writes to the kernel's rules (offset, length and
    /// address aligned, else EINVAL) and records every write.
    struct FakeFile {
        content: Arc<Mutex<Vec<u8>>>,
        writes: Arc<Mutex<Vec<SeenWrite>>>,
        flag_changes: Arc<Mutex<usize>>,
        pos: u64,
        direct: bool,
        behaviour: Behaviour,
    }

    impl SinkFile for FakeFile {
        fn set_direct(&mut self, on: bool) -> std::io::Result<()> {
            if on && self.behaviour.refuse_flag {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            *self.flag_changes.lock().unwrap() += 1;
            self.direct = on;
            Ok(())
        }

        fn write_some(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let addr = buf.as_ptr() as usize;
            self.writes.lock().unwrap().push(SeenWrite {
                direct: self.direct,
                pos: self.pos,
                len: buf.len(),
                addr,
            });
            if self.direct {
                let aligned = |n: usize| n.is_multiple_of(DIRECT_ALIGN);
                if self.behaviour.refuse_direct_writes
                    || !aligned(self.pos as usize)
                    || !aligned(buf.len())
                    || !aligned(addr)
                {
                    return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
                }
            }
            let n = buf.len().min(self.behaviour.short.unwrap_or(usize::MAX));
            let mut content = self.content.lock().unwrap();
            let pos = self.pos as usize;
            if content.len() < pos + n {
                content.resize(pos + n, 0);
            }
            content[pos..pos + n].copy_from_slice(&buf[..n]);
            self.pos += n as u64;
            Ok(n)
        }

        fn start_writeback(&self, _offset: u64, _len: u64) {}
    }

    struct FakeRun {
        done: DiskWritten<FakeFile>,
        content: Vec<u8>,
        writes: Vec<SeenWrite>,
        flag_changes: usize,
    }

    async fn fake_run(offset: u64, data: &[u8], behaviour: Behaviour) -> FakeRun {
        let content = Arc::new(Mutex::new(pattern(offset as usize, 9)));
        let writes = Arc::new(Mutex::new(Vec::new()));
        let flag_changes = Arc::new(Mutex::new(0));
        let file = FakeFile {
            content: content.clone(),
            writes: writes.clone(),
            flag_changes: flag_changes.clone(),
            pos: offset,
            direct: false,
            behaviour,
        };
        let mut writer = DiskWriter::start(file, offset, blake3::Hasher::new(), DirectIo::Try);
        feed(&mut writer, data).await;
        let done = writer.finish().await.unwrap();
        let content = content.lock().unwrap().clone();
        let writes = writes.lock().unwrap().clone();
        let flag_changes = *flag_changes.lock().unwrap();
        FakeRun {
            done,
            content,
            writes,
            flag_changes,
        }
    }

    fn check_content(run: &FakeRun, offset: u64, data: &[u8], what: &str) {
        assert!(run.done.error.is_none(), "{what}: {:?}", run.done.error);
        assert_eq!(run.done.bytes, data.len() as u64, "{what}");
        let mut expected = pattern(offset as usize, 9);
        expected.extend_from_slice(data);
        assert!(run.content == expected, "{what}: content");
        assert!(
            !run.done.file.direct,
            "{what}: the file is handed back without direct I/O"
        );
    }

    #[tokio::test]
    async fn direct_writes_are_always_aligned_and_the_flag_changes_only_at_the_head_and_the_tail() {
        let data = pattern(3 * WRITE_BUFFER + 1000, 5);
        for offset in [0u64, 1, 4095, 4096, 123_457] {
            let run = fake_run(offset, &data, Behaviour::default()).await;
            let what = format!("offset {offset}");
            check_content(&run, offset, &data, &what);
            assert_eq!(
                run.done.direct_bytes,
                expected_direct(offset, data.len()),
                "{what}"
            );
            for w in run.writes.iter().filter(|w| w.direct) {
                assert_eq!(w.pos % DIRECT_ALIGN as u64, 0, "{what}: {w:?}");
                assert_eq!(w.len % DIRECT_ALIGN, 0, "{what}: {w:?}");
                assert_eq!(w.addr % DIRECT_ALIGN, 0, "{what}: {w:?}");
            }
            // On for the body, off for the tail: one syscall each, not one per buffer.
            assert_eq!(run.flag_changes, 2, "{what}: {:?}", run.writes);
        }
    }

    #[tokio::test]
    async fn a_file_system_without_direct_io_gets_every_byte_through_the_page_cache() {
        let data = pattern(2 * WRITE_BUFFER + 77, 2);
        // Refused when the flag is set: asked once, then never again.
        let refuse_flag = Behaviour {
            refuse_flag: true,
            ..Behaviour::default()
        };
        let run = fake_run(0, &data, refuse_flag).await;
        check_content(&run, 0, &data, "flag refused");
        assert_eq!(run.done.direct_bytes, 0);
        assert!(run.writes.iter().all(|w| !w.direct));
        // Refused at the first direct write: those bytes and every later one go buffered.
        let refuse_writes = Behaviour {
            refuse_direct_writes: true,
            ..Behaviour::default()
        };
        let run = fake_run(4096, &data, refuse_writes).await;
        check_content(&run, 4096, &data, "direct writes refused");
        assert_eq!(run.done.direct_bytes, 0);
        assert_eq!(run.writes.iter().filter(|w| w.direct).count(), 1);
    }

    #[tokio::test]
    async fn short_writes_lose_and_repeat_nothing() {
        let data = pattern(2 * WRITE_BUFFER + 4097, 4);
        // Short by whole blocks: direct I/O goes on after each.
        let blocks = Behaviour {
            short: Some(3 * DIRECT_ALIGN),
            ..Behaviour::default()
        };
        let run = fake_run(0, &data, blocks).await;
        check_content(&run, 0, &data, "short by blocks");
        assert_eq!(run.done.direct_bytes, expected_direct(0, data.len()));
        // Short mid-block: the position is unaligned from then on, so the rest goes through the
        // page cache, and no direct write is ever misaligned.
        let odd = Behaviour {
            short: Some(1000),
            ..Behaviour::default()
        };
        let run = fake_run(0, &data, odd).await;
        check_content(&run, 0, &data, "short mid-block");
        assert!(run.done.direct_bytes < data.len() as u64);
        for w in run.writes.iter().filter(|w| w.direct) {
            assert_eq!(w.pos % DIRECT_ALIGN as u64, 0, "{w:?}");
        }
    }
}
